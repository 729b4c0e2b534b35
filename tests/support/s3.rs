//! A real S3-compatible server for the results-store tests: s3s-fs (built once per version by
//! `tests/s3/build.sh`) on a free loopback port, over its own data folder under TMPDIR, with one
//! bucket. Killed (with its process group) on drop; it can be stopped and started again on the
//! same port and data to play an unreachable store.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::process::{Daemon, run_build_script};
use super::try_wait_for;

pub const ACCESS_KEY: &str = "notebook-operator-test";
pub const SECRET_KEY: &str = "notebook-operator-test-secret";
pub const BUCKET: &str = "results";

pub struct S3Server {
    daemon: Daemon,
    pub endpoint: String,
    port: u16,
    data: tempfile::TempDir,
}

/// The s3s-fs binary, built or reused once per test binary.
fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir =
            run_build_script("tests/s3/build.sh").unwrap_or_else(|e| panic!("tests/s3/build.sh: {e:#}"));
        dir.join("bin/s3s-fs")
    })
}

impl S3Server {
    /// Starts the server with an empty bucket [`BUCKET`] and waits until it answers.
    pub async fn start() -> S3Server {
        let program = binary();
        let data =
            tempfile::Builder::new().prefix("notebook-operator-s3-").tempdir().expect("s3 data folder");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let args: Vec<String> = [
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            ACCESS_KEY,
            "--secret-key",
            SECRET_KEY,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([data.path().join("root").display().to_string()])
        .collect();
        // s3s-fs serves the folder it is given: buckets are its sub-folders.
        std::fs::create_dir_all(data.path().join("root").join(BUCKET)).expect("the bucket's folder");
        let log = data.path().join("s3s-fs.log");
        let daemon = Daemon::spawn("s3s-fs", program, &args, log).expect("spawn s3s-fs");
        let server = S3Server { daemon, endpoint: format!("http://127.0.0.1:{port}"), port, data };
        server.wait_up().await;
        server
    }

    async fn wait_up(&self) {
        let port = self.port;
        let up = try_wait_for(Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(
            up.is_some(),
            "s3s-fs did not listen on {port}:\n{}",
            super::process::tail(self.daemon.log(), 30)
        );
    }

    /// Stops the server (SIGKILL): the store becomes unreachable.
    pub fn stop(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.daemon.respawn().expect("respawn s3s-fs");
        self.wait_up().await;
    }

    /// The file s3s-fs keeps an object in (`<root>/<bucket>/<key>`): what the store holds, read
    /// without going through any S3 client.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.data.path().join("root").join(BUCKET).join(key)
    }

    /// Flags of `controller`, `api` and `all` for this store.
    pub fn flags(&self) -> Vec<String> {
        [
            "--results-store",
            "s3",
            "--s3-endpoint",
            &self.endpoint,
            "--s3-bucket",
            BUCKET,
            "--s3-prefix",
            "runs/",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The credentials, as the controller and the facade read them.
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        vec![("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)]
    }
}
