//! etcd + kube-apiserver + kube-controller-manager + a node, started envtest-style on
//! loopback with generated certificates and token auth. The node is the test kubelet
//! (containers as host processes) or a real one (kubelet, kube-scheduler, containerd, runc:
//! see [`super::real_node`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};
use std::{env, fs};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use super::certs;
use super::kubelet::{ContainerLifetime, Kubelet, KubeletConfig, Lifetimes};
use super::namespace::TestNamespace;
use super::process::{self, Daemon};
use super::real_node::{self, NodeApi, RealNode};
use super::wait::try_wait_for;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);
const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(60);
const NODE_NAME: &str = "test-node";
/// `test` (default) or `real`: the node of [`ControlPlane::shared`].
pub const NODE_ENV: &str = "NOTEBOOK_OPERATOR_TEST_NODE";
const CONTROLLERS: &[&str] = &[
    "job-controller",
    "cronjob-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "serviceaccount-controller",
    "namespace-controller",
    "root-ca-certificate-publisher-controller",
    "deployment-controller",
    "replicaset-controller",
    "clusterrole-aggregation-controller",
];

/// Which node runs the pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// The test kubelet: containers as host processes, fast, with fault injection.
    TestKubelet,
    /// A real kubelet with containerd and runc: real containers, images and cgroups.
    Real,
}

/// A running control plane. Owned instances ([`ControlPlane::start`]) stop
/// every child process on drop; the [`ControlPlane::shared`] one lives until
/// the test process exits.
pub struct ControlPlane {
    info: Arc<Info>,
    orders: Option<tokio::sync::mpsc::UnboundedSender<Order>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// What the control-plane thread is asked to do.
enum Order {
    /// Kill one daemon, keep it down for a while, start it again with the same data, wait until it serves.
    Outage {
        daemon: &'static str,
        downtime: Duration,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

struct Info {
    dir: PathBuf,
    assets: PathBuf,
    config: Config,
    kubeconfig: PathBuf,
    server: String,
    #[allow(dead_code)] // read by accessors only some test binaries use
    token: String,
    #[allow(dead_code)]
    node_name: String,
    #[allow(dead_code)]
    node_kind: NodeKind,
    pids: Vec<u32>,
    log_files: Vec<PathBuf>,
    startup: Duration,
    #[allow(dead_code)]
    lifetimes: Arc<Lifetimes>,
}

/// What the control-plane thread owns while the control plane runs.
struct Running {
    daemons: Vec<Daemon>,
    node: RunningNode,
    http: reqwest::Client,
    /// Each daemon's health URL, and the token it needs.
    health: Vec<(&'static str, String, Option<String>)>,
}

enum RunningNode {
    Test(Kubelet),
    Real(RealNode),
}

impl ControlPlane {
    /// The control plane of this test binary, started on first use: with the test kubelet, or
    /// with a real node when `NOTEBOOK_OPERATOR_TEST_NODE=real` (for suites that need no fault
    /// injection from the node; see the README).
    pub fn shared() -> &'static ControlPlane {
        // A failed start is kept too, so that every test fails fast with its cause.
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        match env::var(NODE_ENV).as_deref() {
            Ok("real") => Self::shared_real_node(),
            Ok("test") | Err(_) => Self::shared_in(&SHARED, NodeKind::TestKubelet),
            Ok(other) => panic!("{NODE_ENV}={other}: expected test or real"),
        }
    }

    /// The control plane of this test binary with a real node, started on first use.
    pub fn shared_real_node() -> &'static ControlPlane {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        Self::shared_in(&SHARED, NodeKind::Real)
    }

    fn shared_in(
        cell: &'static OnceLock<Result<ControlPlane, String>>,
        kind: NodeKind,
    ) -> &'static ControlPlane {
        let started = cell.get_or_init(|| {
            let cp = Self::try_start_with(kind).map_err(|e| format!("{e:#}"))?;
            process::remove_at_exit(cp.info.dir.clone());
            Ok(cp)
        });
        match started {
            Ok(cp) => cp,
            Err(e) => panic!("cannot start the control plane ({kind:?} node): {e}"),
        }
    }

    /// Starts a control plane owned by the caller; panics when it cannot.
    #[allow(dead_code)] // most test binaries use the shared one
    pub fn start() -> ControlPlane {
        Self::try_start().unwrap_or_else(|e| panic!("cannot start the control plane: {e:#}"))
    }

    pub fn try_start() -> anyhow::Result<ControlPlane> {
        Self::try_start_with(NodeKind::TestKubelet)
    }

    pub fn try_start_with(kind: NodeKind) -> anyhow::Result<ControlPlane> {
        let assets = assets_dir()?;
        let dir = tempfile::Builder::new().prefix("notebook-operator-cp-").tempdir()?.keep();
        if env::var("KEEP_CONTROL_PLANE").is_ok_and(|v| v == "1") {
            process::keep_dirs();
        }
        let (ready_tx, ready_rx) = mpsc::channel();
        let (orders_tx, mut orders_rx) = tokio::sync::mpsc::unbounded_channel::<Order>();
        let boot_dir = dir.clone();
        // Children are spawned from this thread and its runtime's workers, which
        // live as long as the control plane: PR_SET_PDEATHSIG follows threads.
        let thread = thread::Builder::new().name("control-plane".into()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("control-plane-worker")
                .enable_all()
                .build()
                .expect("control-plane runtime");
            runtime.block_on(async move {
                match boot(&boot_dir, &assets, kind).await {
                    Ok((mut running, info)) => {
                        let _ = ready_tx.send(Ok(info));
                        // Until the ControlPlane is dropped (the channel closes).
                        while let Some(order) = orders_rx.recv().await {
                            match order {
                                Order::Outage { daemon, downtime, done } => {
                                    let outcome = running.outage(daemon, downtime).await;
                                    let _ = done.send(outcome.map_err(|e| format!("{e:#}")));
                                }
                            }
                        }
                        running.stop().await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(5));
        })?;
        match ready_rx.recv() {
            Ok(Ok(info)) => {
                eprintln!(
                    "control plane ready in {:.1}s: {} (kubeconfig {})",
                    info.startup.as_secs_f64(),
                    info.server,
                    info.kubeconfig.display()
                );
                Ok(ControlPlane { info: Arc::new(info), orders: Some(orders_tx), thread: Some(thread) })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                process::keep_dirs();
                Err(e.context(format!("control plane directory {}", dir.display())))
            }
            Err(_) => {
                let _ = thread.join();
                bail!("the control-plane thread died; see {}", dir.display())
            }
        }
    }

    /// Kills `daemon` (`etcd`, `kube-apiserver` or `kube-controller-manager`), keeps it down for
    /// `downtime`, starts it again on the same data and ports, and returns once it serves.
    #[allow(dead_code)] // the fault-injection tests only
    pub async fn outage(&self, daemon: &'static str, downtime: Duration) {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let orders = self.orders.as_ref().expect("the control plane runs");
        orders.send(Order::Outage { daemon, downtime, done }).expect("the control-plane thread runs");
        if let Err(e) = outcome.await.expect("the control-plane thread answers") {
            panic!("{daemon} did not come back: {e}");
        }
    }

    /// A copy of the admin client configuration.
    pub fn config(&self) -> Config {
        self.info.config.clone()
    }

    /// A fresh admin client. Clients are bound to the runtime that creates
    /// them, so every test makes its own.
    pub fn client(&self) -> Client {
        Client::try_from(self.config()).expect("build a kube client")
    }
}

// Accessors for test binaries; each binary uses only some of them.
#[allow(dead_code)]
impl ControlPlane {
    /// The admin kubeconfig file (token auth, CA data inline).
    pub fn kubeconfig(&self) -> &Path {
        &self.info.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.info.server
    }

    /// The bearer token of the admin user (group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.info.token
    }

    /// The folder with kube-apiserver, kubectl, helm, ...
    pub fn assets(&self) -> &Path {
        &self.info.assets
    }

    /// A binary from [`Self::assets`], e.g. `kubectl` or `helm`.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.info.assets.join(name)
    }

    /// `kubectl --kubeconfig <admin kubeconfig>`.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.binary("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.info.kubeconfig);
        cmd
    }

    /// The temporary folder holding certificates, data and logs.
    pub fn dir(&self) -> &Path {
        &self.info.dir
    }

    pub fn node_name(&self) -> &str {
        &self.info.node_name
    }

    pub fn node_kind(&self) -> NodeKind {
        self.info.node_kind
    }

    /// Pids of etcd, kube-apiserver and kube-controller-manager.
    pub fn pids(&self) -> &[u32] {
        &self.info.pids
    }

    /// Log files of etcd, kube-apiserver, kube-controller-manager and the node's (the test
    /// kubelet; or kubelet, kube-scheduler and containerd).
    pub fn log_files(&self) -> &[PathBuf] {
        &self.info.log_files
    }

    /// How long the start took, until the `default` service account existed.
    pub fn startup_time(&self) -> Duration {
        self.info.startup
    }

    /// Every container process the test kubelet ran (none on a real node), in start order: namespace, pod, labels,
    /// container, and when it started and ended by the monotonic clock (`ended` is `None` while
    /// it runs). Deleted pods are kept: this is what the node saw, not what the API says now.
    pub fn container_lifetimes(&self) -> Vec<ContainerLifetime> {
        self.info.lifetimes.snapshot()
    }

    /// When the test kubelet started: the origin for printing lifetimes as offsets.
    pub fn kubelet_started(&self) -> Instant {
        self.info.lifetimes.origin()
    }

    /// Prints a namespace's objects and the log files (see [`TestNamespace`]).
    pub async fn dump(&self, ns: &str) {
        let text = super::namespace::dump(&self.client(), ns, &self.info.log_files).await;
        eprintln!("{text}");
    }
}

impl ControlPlane {
    /// Creates a namespace with a unique name starting with `prefix`, and
    /// waits for its `default` service account and `kube-root-ca.crt`.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let mut prefix: String = prefix
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        prefix = prefix.trim_matches('-').to_string();
        if prefix.is_empty() {
            prefix = "test".into();
        }
        let name =
            format!("{prefix}-{}-{:04x}", COUNTER.fetch_add(1, Ordering::SeqCst), rand::random::<u16>());
        let client = self.client();
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "test.notebook-operator/namespace": "true" } }
        }))
        .expect("namespace object");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &name);
        let config_maps = Api::<ConfigMap>::namespaced(client, &name);
        let ready = try_wait_for(NAMESPACE_TIMEOUT, || async {
            matches!(accounts.get_opt("default").await, Ok(Some(_)))
                && matches!(config_maps.get_opt("kube-root-ca.crt").await, Ok(Some(_)))
        })
        .await;
        assert!(
            ready.is_some(),
            "namespace {name}: no `default` service account or `kube-root-ca.crt` after \
             {NAMESPACE_TIMEOUT:?}; is kube-controller-manager running? logs: {:?}",
            self.info.log_files
        );
        TestNamespace::new(name, self.config(), self.info.log_files.clone())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Closing the channel stops the control-plane thread.
        drop(self.orders.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if std::thread::panicking() || process::dirs_kept() {
            eprintln!("control plane: kept {}", self.info.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.info.dir);
        }
    }
}

impl Running {
    /// `daemon` (etcd, kube-apiserver, kube-controller-manager) killed, down for `downtime`, then
    /// started again on the same data and ports; returns once it serves again.
    async fn outage(&mut self, daemon: &str, downtime: Duration) -> anyhow::Result<()> {
        let Some(d) = self.daemons.iter_mut().find(|d| d.name() == daemon) else {
            bail!("no daemon {daemon}");
        };
        d.kill();
        tokio::time::sleep(downtime).await;
        d.respawn()?;
        if let Some((_, url, token)) = self.health.iter().find(|(name, _, _)| *name == daemon) {
            poll_until_ok(&self.http, url, token.as_deref(), d).await?;
        }
        Ok(())
    }

    async fn stop(self) {
        match self.node {
            RunningNode::Test(kubelet) => kubelet.stop().await,
            RunningNode::Real(node) => node.stop(),
        }
        // Controller manager first, etcd last: fewer errors in the logs.
        for mut daemon in self.daemons.into_iter().rev() {
            daemon.kill();
        }
    }
}

/// The folder with the binaries: `KUBEBUILDER_ASSETS`, else what
/// `tests/control-plane/build.sh` prints last (it reuses its cache).
fn assets_dir() -> anyhow::Result<PathBuf> {
    // Held while looking, so concurrent tests run build.sh once.
    static ASSETS: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut assets = ASSETS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = assets.as_ref() {
        return Ok(dir.clone());
    }
    let dir = match env::var("KUBEBUILDER_ASSETS") {
        Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => process::run_build_script("tests/control-plane/build.sh")?,
    };
    for binary in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        if !dir.join(binary).is_file() {
            bail!("{} has no {binary}", dir.display());
        }
    }
    *assets = Some(dir.clone());
    Ok(dir)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn boot(dir: &Path, assets: &Path, kind: NodeKind) -> anyhow::Result<(Running, Info)> {
    let started = Instant::now();
    let pki = certs::generate(&dir.join("pki"))?;
    let token = format!("{:032x}", rand::random::<u128>());
    let node_token = format!("{:032x}", rand::random::<u128>());
    let token_file = dir.join("tokens.csv");
    fs::write(
        &token_file,
        format!(
            "{token},admin,admin,\"system:masters\"\n\
             {node_token},system:node:{},kubelet,\"system:nodes\"\n",
            real_node::NODE_NAME
        ),
    )?;
    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    // containerd and the image imports first: they overlap with the control plane's start.
    let runtime = match kind {
        NodeKind::Real => Some(real_node::Runtime::start(&dir.join("node"), &logs)?),
        NodeKind::TestKubelet => None,
    };

    let (etcd_port, etcd_peer_port) = (free_port()?, free_port()?);
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
    let mut etcd = Daemon::spawn(
        "etcd",
        &assets.join("etcd"),
        &[
            "--name=test".into(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=test={peer_url}"),
            "--unsafe-no-fsync=true".into(),
        ],
        logs.join("etcd.log"),
    )?;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes())?)
        .timeout(Duration::from_secs(5))
        .build()?;
    poll_until_ok(&http, &format!("{etcd_url}/health"), None, &mut etcd).await?;

    let api_port = free_port()?;
    let server = format!("https://127.0.0.1:{api_port}");
    let mut apiserver = Daemon::spawn(
        "kube-apiserver",
        &assets.join("kube-apiserver"),
        &[
            "--advertise-address=127.0.0.1".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.join("apiserver").display()),
            format!("--tls-cert-file={}", pki.apiserver_cert.display()),
            format!("--tls-private-key-file={}", pki.apiserver_key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            format!("--etcd-servers={etcd_url}"),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--authorization-mode=Node,RBAC".into(),
            format!("--token-auth-file={}", token_file.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", pki.service_account_public_key.display()),
            format!("--service-account-signing-key-file={}", pki.service_account_private_key.display()),
            format!("--kubelet-certificate-authority={}", pki.ca_cert.display()),
            format!("--kubelet-client-certificate={}", pki.apiserver_kubelet_client_cert.display()),
            format!("--kubelet-client-key={}", pki.apiserver_kubelet_client_key.display()),
            // A real kubelet refuses a loopback node IP; its Hostname address (`localhost`) is how
            // to reach it.
            match kind {
                NodeKind::TestKubelet => "--kubelet-preferred-address-types=InternalIP".into(),
                NodeKind::Real => "--kubelet-preferred-address-types=Hostname,InternalIP".into(),
            },
            // No node-lifecycle controller removes the not-ready taint.
            "--disable-admission-plugins=TaintNodesByCondition".into(),
            "--endpoint-reconciler-type=none".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
        ],
        logs.join("kube-apiserver.log"),
    )?;
    poll_until_ok(&http, &format!("{server}/readyz"), Some(&token), &mut apiserver).await?;

    let kubeconfig = dir.join("kubeconfig");
    fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki.ca_pem, &token))?;
    let config =
        Config::from_custom_kubeconfig(Kubeconfig::read_from(&kubeconfig)?, &KubeConfigOptions::default())
            .await?;

    let kcm_port = free_port()?;
    let controllers = CONTROLLERS.join(",");
    let mut kcm = Daemon::spawn(
        "kube-controller-manager",
        &assets.join("kube-controller-manager"),
        &[
            format!("--kubeconfig={}", kubeconfig.display()),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            format!("--cert-dir={}", dir.join("controller-manager").display()),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=false".into(),
            format!("--controllers={controllers}"),
            format!("--root-ca-file={}", pki.ca_cert.display()),
            format!("--service-account-private-key-file={}", pki.service_account_private_key.display()),
            "--profiling=false".into(),
        ],
        logs.join("kube-controller-manager.log"),
    )?;

    let client = Client::try_from(config.clone())?;
    let (node, node_name, node_logs, lifetimes) = match runtime {
        None => {
            let kubelet_log = logs.join("kubelet.log");
            let kubelet = Kubelet::start(KubeletConfig {
                client: client.clone(),
                node_name: NODE_NAME.into(),
                root: dir.join("kubelet"),
                identity: pki.kubelet,
                api_server_port: api_port,
                path_prepend: env::var("TEST_KUBELET_PATH_PREPEND").unwrap_or_else(|_| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").display().to_string()
                }),
                log_file: kubelet_log.clone(),
            })
            .await
            .context("start the test kubelet")?;
            let lifetimes = kubelet.lifetimes();
            (RunningNode::Test(kubelet), NODE_NAME, vec![kubelet_log], lifetimes)
        }
        Some(runtime) => {
            let node = runtime
                .start_node(NodeApi {
                    client: client.clone(),
                    server: &server,
                    ca_cert: &pki.ca_cert,
                    kubelet_token: &node_token,
                    admin_kubeconfig: &kubeconfig,
                    serving_cert: &pki.kubelet_cert,
                    serving_key: &pki.kubelet_key,
                    assets,
                    logs: &logs,
                })
                .await
                .context("start the real node")?;
            eprintln!("real node ready {:.1}s after containerd started", node.startup_time().as_secs_f64());
            let node_logs = node.log_files().to_vec();
            (RunningNode::Real(node), real_node::NODE_NAME, node_logs, Arc::new(Lifetimes::new()))
        }
    };

    // The controller manager is up once it has made the `default` service account.
    let accounts = Api::<ServiceAccount>::namespaced(client, "default");
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        kcm.ensure_running()?;
        if matches!(accounts.get_opt("default").await, Ok(Some(_))) {
            break;
        }
        if Instant::now() > deadline {
            bail!("no `default` service account after {STARTUP_TIMEOUT:?}; see {}", kcm.log().display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let daemons = vec![etcd, apiserver, kcm];
    let info = Info {
        dir: dir.to_path_buf(),
        assets: assets.to_path_buf(),
        config,
        kubeconfig,
        server,
        token,
        node_name: node_name.into(),
        node_kind: kind,
        pids: daemons.iter().map(Daemon::pid).collect(),
        log_files: daemons.iter().map(|d| d.log().to_path_buf()).chain(node_logs).collect(),
        startup: started.elapsed(),
        lifetimes,
    };
    let health = vec![
        ("etcd", format!("{etcd_url}/health"), None),
        ("kube-apiserver", format!("{}/readyz", info.server), Some(info.token.clone())),
    ];
    Ok((Running { daemons, node, http, health }, info))
}

/// Polls `url` until it answers 200, failing early when `daemon` exits.
async fn poll_until_ok(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    daemon: &mut Daemon,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        daemon.ensure_running()?;
        let mut request = http.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let last = match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => format!("{}: {}", response.status(), response.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("{url} not ready after {STARTUP_TIMEOUT:?} (last: {last}); see {}", daemon.log().display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: test
  context:
    cluster: test
    user: admin
    namespace: default
current-context: test
"
    )
}
