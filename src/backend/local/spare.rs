//! The warm spare: one runner started ahead of `/start`, its kernel launched, handshaken and
//! idle (`run.py --warm KERNEL`). A `/start` takes it and hands it the run on its stdin (the
//! folder and the arguments a cold runner would get), so the notebook and the parameters are
//! read at `/start`, never earlier. A spare is used once and replaced in the background; one that
//! dies while idle is replaced too (with backoff, so a Python that cannot start a kernel does not
//! spin). Isolation is that of a cold start: a fresh process and kernel per run.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use super::runner_command;

/// A spare runner, ready (or getting ready) for one run.
pub(super) struct Spare {
    pub child: Child,
    pub pid: Pid,
    stdin: ChildStdin,
    pub output: tokio::net::unix::pipe::Receiver,
}

impl Spare {
    /// Hands the spare its run: after this it is the run's runner. An error means the spare
    /// is gone (the caller starts a cold runner instead).
    pub async fn hand_over(&mut self, cwd: &str, argv: &[String]) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&serde_json::json!({ "cwd": cwd, "argv": argv }))?;
        line.push(b'\n');
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(std::io::Error::other(format!("the spare runner had exited ({status})")));
        }
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await
    }
}

/// What starting a spare needs.
#[derive(Clone, Debug)]
pub(super) struct SpareCommand {
    pub python: PathBuf,
    pub runner: PathBuf,
    /// Where idle spares wait (their kernel moves into the run's folder when handed a run).
    pub dir: PathBuf,
    /// The kernel to warm: the server's `--kernel`, else the notebook's kernelspec.
    pub kernel: Option<String>,
    pub notebook: PathBuf,
}

impl SpareCommand {
    async fn spawn(&self) -> std::io::Result<Spare> {
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => notebook_kernel(&self.notebook).await.unwrap_or_else(|| "python3".into()),
        };
        tokio::fs::create_dir_all(&self.dir).await?;
        let mut cmd = runner_command(&self.python, &self.runner, &self.dir);
        cmd.arg("--warm").arg(&kernel);
        let (reader, writer) = std::io::pipe()?;
        let writer_err = writer.try_clone()?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::from(OwnedFd::from(writer)))
            .stderr(Stdio::from(OwnedFd::from(writer_err)));
        let mut child = cmd.spawn()?;
        drop(cmd);
        let pid = child
            .id()
            .map(|p| Pid::from_raw(p as i32))
            .ok_or_else(|| std::io::Error::other("the spare runner exited at once"))?;
        let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin"))?;
        let output = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        debug!(pid = pid.as_raw(), kernel = %kernel, "spare runner started");
        Ok(Spare { child, pid, stdin, output })
    }
}

/// The kernelspec name a notebook asks for, if it can be read.
async fn notebook_kernel(path: &std::path::Path) -> Option<String> {
    let bytes = tokio::fs::read(path).await.ok()?;
    let nb: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    nb.pointer("/metadata/kernelspec/name")?.as_str().map(str::to_owned)
}

enum Request {
    Take(oneshot::Sender<Option<Spare>>),
    Stop(oneshot::Sender<()>),
}

/// Keeps one spare runner ready; dropping it (or `stop`) ends the spare.
pub(super) struct Spares {
    tx: mpsc::Sender<Request>,
}

impl Spares {
    pub fn start(command: SpareCommand) -> Self {
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(supervise(command, rx).instrument(info_span!("spare")));
        Spares { tx }
    }

    /// The spare, if one is running; a replacement starts at once.
    pub async fn take(&self) -> Option<Spare> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request::Take(reply)).await.ok()?;
        answer.await.ok().flatten()
    }

    /// Ends the spare (server shutdown); no new one starts.
    pub async fn stop(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Request::Stop(reply)).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// Delay before replacing a spare that failed `failures` times in a row: 1 s doubling, at most a minute.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

async fn supervise(command: SpareCommand, mut rx: mpsc::Receiver<Request>) {
    let mut spare: Option<Spare> = None;
    let mut failures = 0u32;
    let mut next_start = Some(Instant::now());
    loop {
        if spare.is_none() && next_start.is_some_and(|at| at <= Instant::now()) {
            next_start = None;
            match command.spawn().await {
                Ok(s) => spare = Some(s),
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, retry_in = ?backoff(failures), "could not start a spare runner");
                    next_start = Some(Instant::now() + backoff(failures));
                }
            }
        }
        let event = {
            let exited = async {
                match spare.as_mut() {
                    Some(s) => s.child.wait().await.ok(),
                    None => std::future::pending().await,
                }
            };
            let retry = async {
                match next_start {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                status = exited => Event::Exited(status),
                () = retry => Event::Retry,
                request = rx.recv() => Event::Request(request),
            }
        };
        match event {
            Event::Exited(status) => {
                failures += 1;
                warn!(status = ?status, retry_in = ?backoff(failures), "the spare runner exited while idle: replacing it");
                spare = None;
                next_start = Some(Instant::now() + backoff(failures));
            }
            Event::Retry => {}
            Event::Request(Some(Request::Take(reply))) => {
                let taken = spare.take();
                if taken.is_some() {
                    failures = 0;
                }
                let _ = reply.send(taken);
                next_start.get_or_insert_with(Instant::now);
            }
            Event::Request(Some(Request::Stop(done))) => {
                end(spare.take()).await;
                let _ = done.send(());
                return;
            }
            Event::Request(None) => {
                end(spare.take()).await;
                return;
            }
        }
    }
}

enum Event {
    Exited(Option<std::process::ExitStatus>),
    Retry,
    Request(Option<Request>),
}

/// SIGTERM to an idle spare (it kills its kernel and exits), SIGKILL if it lingers.
async fn end(spare: Option<Spare>) {
    let Some(mut spare) = spare else { return };
    let _ = killpg(spare.pid, Signal::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(3), spare.child.wait()).await.is_err() {
        let _ = killpg(spare.pid, Signal::SIGKILL);
        let _ = spare.child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!(super::backoff(1), Duration::from_secs(1));
        assert_eq!(super::backoff(2), Duration::from_secs(2));
        assert_eq!(super::backoff(7), Duration::from_secs(60));
        assert_eq!(super::backoff(40), Duration::from_secs(60));
    }
}
