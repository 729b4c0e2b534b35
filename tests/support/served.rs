//! A facade process the tests talk to over HTTP: `notebook-operator local` on a notebook made of
//! cells, or any command that prints its URL first; killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::operator::binary;
use super::{ControlPlane, ipynb, process};

pub struct Served {
    pub child: Child,
    pub url: String,
    /// The folder the server works in (its notebook, its data).
    pub dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` and reads the URL from the first line it prints; `dir` lives as long as it.
pub fn spawn(mut cmd: Command, dir: tempfile::TempDir) -> Served {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn the server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("its first line");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("URL").to_string();
    Served { child, url, dir }
}

/// `notebook-operator local --token TOKEN` on a notebook of `cells`.
pub fn local(cells: &[&str], token: &str) -> Served {
    let dir = tempfile::tempdir().expect("temporary folder");
    let nb = dir.path().join("notebook.ipynb");
    std::fs::write(&nb, ipynb(cells)).expect("write the notebook");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make venv` first", python.display());
    let mut cmd = Command::new(binary());
    cmd.args(["local", "--listen", "127.0.0.1:0", "--kill-grace", "5s", "--token", token])
        .arg("--notebook")
        .arg(&nb)
        .arg("--python")
        .arg(python)
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    spawn(cmd, dir)
}

/// `notebook-operator api --token TOKEN` on the notebook in ConfigMap `configmap` of `ns`.
pub fn kube_facade(cp: &ControlPlane, ns: &str, configmap: &str, token: &str) -> Served {
    let mut cmd = Command::new(binary());
    cmd.args(["api", "--listen", "127.0.0.1:0", "--namespace", ns, "--notebook-configmap", configmap])
        .args([
            "--image",
            "quay.io/jupyter/minimal-notebook:test",
            "--admit-timeout",
            "20s",
            "--token",
            token,
        ])
        .env("KUBECONFIG", cp.kubeconfig())
        .stdin(Stdio::null());
    process::contain(&mut cmd);
    spawn(cmd, tempfile::tempdir().expect("temporary folder"))
}
