//! `notebook-operator api` (the REST facade over NotebookRuns) as a process for tests: started on
//! the notebook in ConfigMap `nb`, ready once `/readyz` answers, killed on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::operator::binary;
use super::{ControlPlane, process, try_wait_for};

pub struct Facade {
    pub child: Child,
    pub url: String,
    pub http: reqwest::Client,
    pub log: PathBuf,
}

impl Facade {
    /// The facade for `ns` on `lock`, with `admit_timeout` (a duration flag) and extra `env`.
    pub async fn start(
        cp: &ControlPlane,
        ns: &str,
        lock: &str,
        admit_timeout: &str,
        env: &[(&str, &str)],
    ) -> Facade {
        Self::start_command(cp, ns, "api", lock, admit_timeout, &[], env).await
    }

    /// Like [`Facade::start`], as `command` (`api`, or `all`: the controller in the same
    /// process) with extra `args`.
    pub async fn start_command(
        cp: &ControlPlane,
        ns: &str,
        command: &str,
        lock: &str,
        admit_timeout: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Facade {
        let log = std::env::temp_dir().join(format!("notebook-operator-{command}-{ns}-{lock}.log"));
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("facade log");
        let mut cmd = Command::new(binary());
        cmd.args([command, "--listen", "127.0.0.1:0", "--namespace", ns, "--notebook-configmap", "nb"])
            .args(["--lock", lock, "--image", "quay.io/jupyter/minimal-notebook:test"])
            .args(["--admit-timeout", admit_timeout])
            .args(args)
            .env("KUBECONFIG", cp.kubeconfig())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        process::contain(&mut cmd);
        let mut child = cmd.spawn().expect("spawn notebook-operator api");
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .expect("read the facade's first line")
        .expect("the facade's first line");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in the facade's first line: {line:?}"))
            .to_string();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(90)).build().expect("HTTP client");
        let facade = Facade { child, url, http, log };
        let ready = try_wait_for(Duration::from_secs(60), || async {
            facade
                .http
                .get(format!("{}/readyz", facade.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(ready.is_some(), "the facade is not ready; log:\n{}", process::tail(&facade.log, 30));
        facade
    }
}

impl Drop for Facade {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- facade log (last 30 lines) ---\n{}", process::tail(&self.log, 30));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
