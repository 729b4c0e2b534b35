//! The operator's own processes for tests: the CRD installed once, the controller binary
//! watching one namespace and dying with the test.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;

use super::ControlPlane;
use super::process;

/// The operator binary cargo built for this test binary (examples that share this module have none).
pub fn binary() -> &'static str {
    match option_env!("CARGO_BIN_EXE_notebook-operator") {
        Some(path) => path,
        None => panic!("only integration tests run the operator binary"),
    }
}
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The CRD, installed once per test binary.
pub fn install_crd(cp: &ControlPlane) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let crd = format!("{REPO}/crds/notebookrun.yaml");
        let out = cp.kubectl().args(["apply", "--server-side", "-f", &crd]).output().expect("kubectl apply");
        assert!(out.status.success(), "CRD apply: {}", String::from_utf8_lossy(&out.stderr));
        let out = cp
            .kubectl()
            .args(["wait", "--for=condition=Established", "--timeout=60s", "crd/notebookruns.notebooks.dev"])
            .output()
            .expect("kubectl wait");
        assert!(out.status.success(), "CRD established: {}", String::from_utf8_lossy(&out.stderr));
    });
}

/// The controller binary, watching one namespace; killed when dropped (or with the test thread).
pub struct Operator {
    child: Option<Child>,
    log: PathBuf,
    ns: String,
    kubeconfig: PathBuf,
}

impl Operator {
    pub fn start(cp: &ControlPlane, ns: &str) -> Self {
        let log = std::env::temp_dir().join(format!("notebook-operator-controller-{ns}.log"));
        let mut op = Operator { child: None, log, ns: ns.into(), kubeconfig: cp.kubeconfig().to_path_buf() };
        op.spawn();
        op
    }

    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("controller log");
        let mut cmd = Command::new(binary());
        cmd.args([
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--default-image",
            "quay.io/jupyter/minimal-notebook:test",
        ])
        .args(["--namespace", &self.ns, "--progress-interval", "300ms", "--cancel-grace", "20s"])
        .env("KUBECONFIG", &self.kubeconfig)
        .env("RUST_LOG", "info,notebook_operator=debug")
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
