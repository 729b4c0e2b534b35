//! A real node beside the control plane: containerd with runc and the CNI bridge plugin (Debian
//! packages), the kubelet and kube-scheduler (built by `tests/control-plane/build.sh`), and the
//! images of `tests/images/build.sh` imported into containerd, since nothing can be pulled.
//!
//! Pods run in real containers: images, securityContext, seccomp, cgroups (memory limits, OOM
//! kills), PID namespaces and the kubelet's own status reporting are all the real thing. Needs
//! root. Everything lives under the control plane's folder except what the components put at
//! fixed paths; [`teardown`] removes all of it, also at exit for the shared node.

mod config;
mod teardown;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use std::{env, fs};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};

use super::process::{self, Daemon};
use teardown::Teardown;

/// The node's name: the kubelet refuses a loopback node IP, so the API server reaches it by
/// its Hostname address, which must resolve to 127.0.0.1.
pub const NODE_NAME: &str = "localhost";
/// The runner image, shaped like Jupyter docker-stacks (numeric `USER 1000`, tini entrypoint).
pub const RUNNER_IMAGE: &str = "localhost/notebook-runner:test";
/// The same image with `USER 0`.
pub const ROOT_IMAGE: &str = "localhost/notebook-runner:test-root";
pub const PAUSE_IMAGE: &str = "localhost/pause:test";
/// Every node's cgroups live under `<hierarchy>/notebook-operator/<node id>`.
pub const CGROUP_PARENT: &str = "/notebook-operator";
/// Every node's bridge is named `nbo<node id>`.
pub const BRIDGE_PREFIX: &str = "nbo";

const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const IMPORT_TIMEOUT: Duration = Duration::from_secs(300);
const DEBIAN_PACKAGES: &str = "containerd runc containernetworking-plugins iproute2 debootstrap tini";

/// Where one node keeps everything, and the names it gives what it creates outside its folder.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
    pub containerd_root: PathBuf,
    pub containerd_state: PathBuf,
    pub socket: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub kubelet_root: PathBuf,
    /// cgroupfs path of the node's pods (the kubelet's `cgroupRoot`).
    pub cgroup: String,
    pub bridge: String,
    /// The CNI network's name (libcni names its cache files after it).
    pub network: String,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        let id = format!("{:08x}", rand::random::<u32>());
        // Short names: unix socket paths under these folders must stay within 108 bytes.
        let state = dir.join("s");
        Layout {
            dir: dir.to_path_buf(),
            containerd_root: dir.join("c"),
            socket: state.join("containerd.sock"),
            containerd_state: state,
            cni_conf_dir: dir.join("cni"),
            kubelet_root: dir.join("k"),
            cgroup: format!("{CGROUP_PARENT}/{id}"),
            bridge: format!("{BRIDGE_PREFIX}{id}"),
            network: format!("notebook-operator-{id}"),
        }
    }
}

/// What the node needs from the control plane.
pub struct NodeApi<'a> {
    pub client: Client,
    pub server: &'a str,
    pub ca_cert: &'a Path,
    /// A bearer token of `system:node:localhost` in group `system:nodes`.
    pub kubelet_token: &'a str,
    /// Kubeconfig for kube-scheduler.
    pub admin_kubeconfig: &'a Path,
    /// The kubelet's serving certificate (signed by `ca_cert`, for `localhost`).
    pub serving_cert: &'a Path,
    pub serving_key: &'a Path,
    /// The folder with kubelet and kube-scheduler.
    pub assets: &'a Path,
    pub logs: &'a Path,
}

/// containerd running and the images on their way in: the half of a node that needs no API
/// server, started first so that importing the runner image overlaps the control plane's start.
pub struct Runtime {
    layout: Layout,
    containerd: Daemon,
    import: Child,
    teardown: Arc<Teardown>,
    started: Instant,
}

/// A running real node. [`RealNode::stop`] removes every trace of it.
pub struct RealNode {
    daemons: Vec<Daemon>,
    teardown: Arc<Teardown>,
    log_files: Vec<PathBuf>,
    startup: Duration,
}

impl Runtime {
    /// Builds or reuses the images, writes the configuration under `dir`, starts containerd and
    /// imports the images (the runner's in the background).
    pub fn start(dir: &Path, logs: &Path) -> anyhow::Result<Runtime> {
        let started = Instant::now();
        check_prerequisites()?;
        let images = images_dir()?;
        let layout = Layout::new(dir);
        for d in
            [&layout.containerd_root, &layout.containerd_state, &layout.cni_conf_dir, &layout.kubelet_root]
        {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let containerd_config = dir.join("containerd.toml");
        fs::write(&containerd_config, config::containerd_toml(&layout, PAUSE_IMAGE))?;
        fs::write(layout.cni_conf_dir.join("10-notebook-operator.conflist"), config::cni_conflist(&layout))?;
        create_cgroup(&layout.cgroup)?;
        let created: Vec<PathBuf> =
            teardown::FIXED_PATHS.iter().map(PathBuf::from).filter(|p| !p.exists()).collect();

        let containerd = Daemon::spawn(
            "containerd",
            Path::new("containerd"),
            &["--config".into(), containerd_config.display().to_string()],
            logs.join("containerd.log"),
        )?;
        // After the first spawn: this node's exit hook then runs before the one of `process`.
        let teardown = Teardown::register(layout.clone(), created);
        teardown.set_containerd(containerd.pid());
        let mut runtime = RuntimeStart { layout: &layout, containerd };
        runtime.wait_for_containerd()?;
        runtime.import(&images.join("pause.oci.tar"))?;
        let import = runtime.spawn_import(&images.join("runner.oci.tar"), &logs.join("import-runner.log"))?;
        Ok(Runtime { containerd: runtime.containerd, layout, import, teardown, started })
    }

    /// Starts kube-scheduler and the kubelet, and waits until the node is Ready and the runner
    /// image is imported.
    pub async fn start_node(mut self, api: NodeApi<'_>) -> anyhow::Result<RealNode> {
        let layout = &self.layout;
        let dir = &layout.dir;
        let (port, healthz) = (free_port()?, free_port()?);
        let kubelet_config = dir.join("kubelet.yaml");
        let ports = config::KubeletPorts { port, healthz };
        fs::write(
            &kubelet_config,
            config::kubelet_yaml(layout, &ports, api.ca_cert, api.serving_cert, api.serving_key),
        )?;
        let kubelet_kubeconfig = dir.join("kubelet.kubeconfig");
        fs::write(&kubelet_kubeconfig, config::kubeconfig(api.server, api.ca_cert, api.kubelet_token))?;

        let admin = api.admin_kubeconfig.display().to_string();
        let scheduler = Daemon::spawn(
            "kube-scheduler",
            &api.assets.join("kube-scheduler"),
            &[
                format!("--kubeconfig={admin}"),
                format!("--authentication-kubeconfig={admin}"),
                format!("--authorization-kubeconfig={admin}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()?),
                format!("--cert-dir={}", dir.join("scheduler").display()),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
            ],
            api.logs.join("kube-scheduler.log"),
        )?;
        self.teardown.set_scheduler(scheduler.pid());
        let mut kubelet = Daemon::spawn(
            "kubelet",
            &api.assets.join("kubelet"),
            &[
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", kubelet_kubeconfig.display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--root-dir={}", layout.kubelet_root.display()),
                format!("--cert-dir={}", dir.join("kubelet-pki").display()),
                "--v=2".into(),
            ],
            api.logs.join("kubelet.log"),
        )?;
        self.teardown.set_kubelet(kubelet.pid());

        let nodes = Api::<Node>::all(api.client.clone());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            kubelet.ensure_running()?;
            self.containerd.ensure_running()?;
            let node = nodes.get_opt(NODE_NAME).await.ok().flatten();
            if node.as_ref().is_some_and(is_ready) {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {NODE_NAME} not Ready after {READY_TIMEOUT:?}; see {}", kubelet.log().display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let import_deadline = Instant::now() + IMPORT_TIMEOUT;
        loop {
            if let Some(status) = self.import.try_wait()? {
                if !status.success() {
                    bail!(
                        "importing {RUNNER_IMAGE} failed ({status}): {}",
                        process::tail(&api.logs.join("import-runner.log"), 20)
                    );
                }
                break;
            }
            if Instant::now() > import_deadline {
                bail!("importing {RUNNER_IMAGE} took longer than {IMPORT_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log_files =
            [&kubelet, &scheduler, &self.containerd].iter().map(|d| d.log().to_path_buf()).collect();
        Ok(RealNode {
            daemons: vec![kubelet, scheduler, self.containerd],
            teardown: self.teardown,
            log_files,
            startup: self.started.elapsed(),
        })
    }
}

/// containerd while it starts, before the node owns it.
struct RuntimeStart<'a> {
    layout: &'a Layout,
    containerd: Daemon,
}

impl RuntimeStart<'_> {
    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.layout.socket).args(["--namespace", "k8s.io"]);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn wait_for_containerd(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + CONTAINERD_TIMEOUT;
        loop {
            self.containerd.ensure_running()?;
            let answered = self.ctr().arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status();
            if answered.is_ok_and(|s| s.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd not answering after {CONTAINERD_TIMEOUT:?}; see {}",
                    self.containerd.log().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn import_command(&self, archive: &Path) -> Command {
        let mut cmd = self.ctr();
        cmd.args(["images", "import", "--snapshotter", "overlayfs"]).arg(archive);
        cmd
    }

    fn import(&self, archive: &Path) -> anyhow::Result<()> {
        let out = self.import_command(archive).output().context("run ctr images import")?;
        if !out.status.success() {
            bail!("ctr images import {}: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn spawn_import(&self, archive: &Path, log: &Path) -> anyhow::Result<Child> {
        let out = fs::File::create(log)?;
        let mut cmd = self.import_command(archive);
        cmd.stdout(out.try_clone()?).stderr(out);
        process::contain(&mut cmd);
        let child = cmd.spawn().context("spawn ctr images import")?;
        process::track_group(child.id() as i32);
        Ok(child)
    }
}

impl RealNode {
    /// Log files of the kubelet, kube-scheduler and containerd.
    pub fn log_files(&self) -> &[PathBuf] {
        &self.log_files
    }

    /// From the start of containerd until the node was Ready with its images.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Stops the node and removes every trace of it; prints what could not be removed.
    pub fn stop(mut self) {
        for problem in self.teardown.run() {
            eprintln!("real node: {problem}");
        }
        for daemon in &mut self.daemons {
            daemon.kill();
        }
    }
}

fn is_ready(node: &Node) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Fails loudly with what is missing: a test that cannot run here must not pass.
fn check_prerequisites() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the real node needs root (containerd, runc, mounts, cgroups)");
    }
    let on_path = |tool: &str| {
        env::var_os("PATH").is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
    };
    let mut missing: Vec<String> = ["containerd", "ctr", "ip", "sha256sum"]
        .into_iter()
        .filter(|t| !on_path(t))
        .map(String::from)
        .collect();
    for file in ["/usr/sbin/runc", "/usr/lib/cni/bridge", "/usr/lib/cni/host-local", "/usr/lib/cni/loopback"]
    {
        if !Path::new(file).is_file() {
            missing.push(file.into());
        }
    }
    if !missing.is_empty() {
        bail!(
            "the real node needs {} (Debian packages: {DEBIAN_PACKAGES}; .ci/run installs them)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The node's cgroup in every hierarchy: the kubelet refuses a `cgroupRoot` that does not exist.
fn create_cgroup(cgroup: &str) -> anyhow::Result<()> {
    let hierarchies = teardown::cgroup_hierarchies();
    if hierarchies.is_empty() {
        bail!("no cgroup hierarchy is mounted");
    }
    for hierarchy in hierarchies {
        let mut dir = hierarchy.clone();
        for part in cgroup.trim_start_matches('/').split('/') {
            let parent = dir.clone();
            dir.push(part);
            if dir.exists() {
                continue;
            }
            fs::create_dir(&dir).with_context(|| format!("create cgroup {}", dir.display()))?;
            // A new cpuset cgroup has no CPUs or memory nodes: give it its parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = fs::read_to_string(parent.join(file)) {
                    let _ = fs::write(dir.join(file), value.trim());
                }
            }
        }
    }
    Ok(())
}

/// The folder with the images: what `tests/images/build.sh` prints last (it reuses its cache).
pub fn images_dir() -> anyhow::Result<PathBuf> {
    // Held while building, so concurrent starts run the script once.
    static IMAGES: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = images.as_ref() {
        return Ok(dir.clone());
    }
    let dir = super::process::run_build_script("tests/images/build.sh")?;
    for archive in ["pause.oci.tar", "runner.oci.tar"] {
        if !dir.join(archive).is_file() {
            bail!("{} has no {archive}", dir.display());
        }
    }
    *images = Some(dir.clone());
    Ok(dir)
}
