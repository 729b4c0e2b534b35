//! The operator's own processes for tests: the CRD installed once, the controller binary
//! watching one namespace and dying with the test.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;

use super::process;
use super::{ControlPlane, NodeKind, real_node};

/// Runs the tests' controllers from another build (e.g. an older commit, to see a test fail
/// before its fix); the facade and other commands still use the binary under test.
pub const CONTROLLER_OVERRIDE_ENV: &str = "NOTEBOOK_OPERATOR_TEST_CONTROLLER";

/// The operator binary cargo built for this test binary (examples that share this module have none).
pub fn binary() -> &'static str {
    match option_env!("CARGO_BIN_EXE_notebook-operator") {
        Some(path) => path,
        None => panic!("only integration tests run the operator binary"),
    }
}
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The CRD, installed once per test binary (on the shared control plane).
pub fn install_crd(cp: &ControlPlane) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| apply_crd(cp));
}

/// Applies the CRDs (NotebookRun, NotebookSchedule) and waits until they are established (a
/// control plane of a test's own).
pub fn apply_crd(cp: &ControlPlane) {
    let crds = format!("{REPO}/crds/");
    let out = cp.kubectl().args(["apply", "--server-side", "-f", &crds]).output().expect("kubectl apply");
    assert!(out.status.success(), "CRD apply: {}", String::from_utf8_lossy(&out.stderr));
    let established = ["crd/notebookruns.notebooks.dev", "crd/notebookschedules.notebooks.dev"];
    let out = cp
        .kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=60s"])
        .args(established)
        .output()
        .expect("kubectl wait");
    assert!(out.status.success(), "CRD established: {}", String::from_utf8_lossy(&out.stderr));
}

/// The controller binary, watching one namespace; killed when dropped (or with the test thread).
pub struct Operator {
    child: Option<Child>,
    log: PathBuf,
    ns: String,
    kubeconfig: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Operator {
    pub fn start(cp: &ControlPlane, ns: &str) -> Self {
        Self::start_with(cp, ns, &[])
    }

    /// The controller with `args` (a flag given there replaces its test default).
    pub fn start_with(cp: &ControlPlane, ns: &str, args: &[&str]) -> Self {
        Self::start_with_env(cp, ns, args, &[])
    }

    /// Like [`Operator::start_with`], with environment variables (e.g. a failpoint) for this start.
    pub fn start_with_env(cp: &ControlPlane, ns: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        // Several controllers may watch one namespace (leader election): one log each.
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("notebook-operator-controller-{ns}-{n}.log"));
        // The test kubelet records the image and runs the host's Python; a real node runs the
        // image it was given, and nothing can be pulled there.
        let image: &[&str] = match cp.node_kind() {
            NodeKind::TestKubelet => &["--default-image", "quay.io/jupyter/minimal-notebook:test"],
            NodeKind::Real => &["--default-image", real_node::RUNNER_IMAGE, "--image-pull-policy", "Never"],
        };
        let args = image.iter().chain(args).map(|a| a.to_string()).collect();
        let kubeconfig = cp.kubeconfig().to_path_buf();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut op = Operator { child: None, log, ns: ns.into(), kubeconfig, args, env };
        op.spawn();
        op
    }

    /// Starts again without the environment given at the first start.
    #[allow(dead_code)] // the fault-injection tests only
    pub fn restart_clean(&mut self) {
        self.kill();
        self.env.clear();
        self.spawn();
    }

    /// The process id while it runs.
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited (by itself: a crash, a failpoint).
    #[allow(dead_code)]
    pub fn has_exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Sends `signal` (SIGSTOP, SIGCONT...) to the process.
    #[allow(dead_code)]
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// What it logged so far.
    #[allow(dead_code)]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("controller log");
        let program = std::env::var(CONTROLLER_OVERRIDE_ENV).unwrap_or_else(|_| binary().to_string());
        let mut cmd = Command::new(program);
        // The test defaults, each unless `args` gives that flag itself.
        let defaults =
            [("--listen", "127.0.0.1:0"), ("--progress-interval", "300ms"), ("--cancel-grace", "20s")];
        let defaults = defaults.into_iter().filter(|(flag, _)| !self.args.iter().any(|a| a == flag));
        cmd.args(["controller", "--namespace", &self.ns])
            .args(defaults.flat_map(|(flag, value)| [flag, value]))
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,notebook_operator=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        process::contain(&mut cmd);
        self.child = Some(cmd.spawn().expect("spawn the controller"));
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as a rollout would, and waits up to `limit` for the exit (then SIGKILL): the
    /// exit status if it exited by itself.
    pub fn terminate(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    #[allow(dead_code)] // not every test binary restarts it
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let mut text = String::new();
            let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("--- controller log (last 60 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
