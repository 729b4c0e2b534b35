//! The local backend: the embedded runner as a child process group on this machine, one run at
//! a time per data dir, each run kept under `DATA_DIR/runs/<id>/`. With `warm_kernel`, a spare
//! runner with its kernel started waits for the next `/start` (see `spare`).

mod spare;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, watch};
use tracing::{Instrument, info, info_span, warn};

use super::{
    Backend, BackendError, LineSplitter, LogStream, LossyDecoder, MAX_LINE_BYTES, Result, RunInfo, RunPage,
    Standing, paginate, read_line,
};
use crate::crd::{Progress, Reason, RunPhase};
use crate::metrics::Metrics;
use crate::progress::{self, Line, TerminationMessage};

const RUN_FILE: &str = "run.json";
const LOG_FILE: &str = "log";
const NOTEBOOK_FILE: &str = "notebook.ipynb";
const INPUT_FILE: &str = "input.ipynb";
const PARAMETERS_FILE: &str = "parameters.json";
const TERMINATION_FILE: &str = "termination.json";
/// Bytes read from a log file at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Largest termination message read (the runner's is a few KiB; Kubernetes keeps 4 KiB).
const MAX_TERMINATION_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub notebook: PathBuf,
    pub python: PathBuf,
    pub data_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL on cancel.
    pub kill_grace: Duration,
    pub cell_timeout: Option<Duration>,
    pub kernel: Option<String>,
    /// Keep one runner with its kernel started ahead of `/start` (used once, then replaced).
    pub warm_kernel: bool,
}

pub struct LocalBackend {
    config: LocalConfig,
    runner: PathBuf,
    state: Mutex<State>,
    metrics: Metrics,
    /// The warm spare runner, when `warm_kernel` is on.
    spares: Option<spare::Spares>,
    /// Set when the server starts shutting down: no new runs, not ready.
    shutting_down: AtomicBool,
    /// Held for the life of the process: one server per data dir.
    _dir_lock: Flock<File>,
}

#[derive(Default)]
struct State {
    runs: BTreeMap<String, RunInfo>,
    active: Option<Active>,
}

/// What stopping a runner needs.
struct Stop {
    pgid: Pid,
    log_len: watch::Receiver<u64>,
    exited: Arc<AtomicBool>,
}

struct Active {
    id: String,
    pgid: Pid,
    cancel_requested: bool,
    /// The server is shutting down: the run ends Failed/Interrupted, not Cancelled.
    interrupted: bool,
    /// Set once the runner is reaped: its pgid may then be reused, so it is never signalled again.
    exited: Arc<AtomicBool>,
    /// Bytes appended to the log; closed when the run has ended.
    log_len: watch::Receiver<u64>,
}

// === impl LocalBackend ===

impl LocalBackend {
    pub async fn open(mut config: LocalConfig, metrics: Metrics) -> anyhow::Result<Arc<Self>> {
        // Runs execute in their own directory: every path handed to them must be absolute.
        config.data_dir = std::path::absolute(&config.data_dir)?;
        config.notebook = std::path::absolute(&config.notebook)?;
        let runs_dir = config.data_dir.join("runs");
        std::fs::create_dir_all(&runs_dir)?;
        let dir_lock = lock_data_dir(&config.data_dir)?;
        let runner = config.data_dir.join("runner").join("run.py");
        std::fs::create_dir_all(runner.parent().unwrap_or(&config.data_dir))?;
        write_atomic(&runner, crate::runner::RUN_PY.as_bytes())?;

        let mut state = State::default();
        for entry in std::fs::read_dir(&runs_dir)? {
            let dir = entry?.path();
            let Ok(text) = std::fs::read(dir.join(RUN_FILE)) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<StoredRun>(&text) else {
                warn!(dir = %dir.display(), "skipping unreadable run record");
                continue;
            };
            let mut run = record.run;
            if !run.phase.is_terminal() {
                if let Some(pid) = record.pid {
                    kill_stale_runner(pid, &runner);
                }
                run.phase = RunPhase::Failed;
                run.reason = Some(Reason::Interrupted);
                run.message = Some("the server stopped while this run was active".into());
                run.finished_at = Some(Timestamp::now());
                write_atomic(
                    &dir.join(RUN_FILE),
                    &serde_json::to_vec_pretty(&StoredRun { run: run.clone(), pid: None })?,
                )?;
                info!(run = %run.id, "marked interrupted run as Failed");
            }
            state.runs.insert(run.id.clone(), run);
        }
        let spares = config.warm_kernel.then(|| {
            spare::Spares::start(spare::SpareCommand {
                python: config.python.clone(),
                runner: runner.clone(),
                dir: config.data_dir.join("spare"),
                kernel: config.kernel.clone(),
                notebook: config.notebook.clone(),
            })
        });
        let backend = Arc::new(Self {
            config,
            runner,
            state: Mutex::new(state),
            metrics,
            spares,
            shutting_down: AtomicBool::new(false),
            _dir_lock: dir_lock,
        });
        Ok(backend)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("runs").join(id)
    }

    fn persist(&self, run: &RunInfo, pid: Option<i32>) {
        let path = self.run_dir(&run.id).join(RUN_FILE);
        let stored = StoredRun { run: run.clone(), pid };
        let result = serde_json::to_vec_pretty(&stored)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomic(&path, &bytes));
        if let Err(e) = result {
            warn!(run = %run.id, error = %e, "could not persist run record");
        }
    }

    async fn spawn_runner(
        self: &Arc<Self>,
        run: &mut RunInfo,
        dir: &Path,
    ) -> std::io::Result<(Pid, watch::Receiver<u64>, Arc<AtomicBool>)> {
        // The runner works in the run's folder and is given names relative to it, so what it
        // reports (served as the run's message) never carries a path on this server. A
        // notebook that is gone leaves no copy, and the runner reports NotebookNotFound.
        if let Err(e) = tokio::fs::copy(&self.config.notebook, dir.join(INPUT_FILE)).await {
            warn!(run = %run.id, notebook = %self.config.notebook.display(), error = %e, "could not read the notebook");
        }
        let mut argv: Vec<String> =
            ["--notebook", INPUT_FILE, "--output", NOTEBOOK_FILE, "--termination-log", TERMINATION_FILE]
                .map(String::from)
                .into();
        if let Some(parameters) = &run.parameters {
            write_atomic(&dir.join(PARAMETERS_FILE), &serde_json::to_vec(parameters)?)?;
            argv.extend(["--parameters".into(), PARAMETERS_FILE.into()]);
        }
        if let Some(timeout) = self.config.cell_timeout {
            argv.extend(["--cell-timeout".into(), timeout.as_secs().max(1).to_string()]);
        }
        if let Some(kernel) = &self.config.kernel {
            argv.extend(["--kernel".into(), kernel.clone()]);
        }
        let (mut child, reader) = match self.warm_runner(dir, &argv).await {
            Some(spare) => (spare.child, spare.output),
            None => {
                let mut cmd = runner_command(&self.config.python, &self.runner, dir);
                cmd.args(&argv);
                let (reader, writer) = std::io::pipe()?;
                let writer_err = writer.try_clone()?;
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::from(OwnedFd::from(writer)))
                    .stderr(Stdio::from(OwnedFd::from(writer_err)));
                let child = cmd.spawn()?;
                drop(cmd);
                (child, tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?)
            }
        };
        let pid = child
            .id()
            .map(|p| Pid::from_raw(p as i32))
            .ok_or_else(|| std::io::Error::other("runner exited at once"))?;
        let (log_tx, log_rx) = watch::channel(0u64);
        let exited = Arc::new(AtomicBool::new(false));
        let reaped = Arc::clone(&exited);
        let me = Arc::clone(self);
        let id = run.id.clone();
        let log_path = dir.join(LOG_FILE);
        tokio::spawn(
            async move {
                let mut pump = Box::pin(me.pump_output(&id, reader, &log_path, &log_tx));
                // A kernel that outlives the runner may hold the pipe open: the process decides.
                let status = tokio::select! {
                    status = child.wait() => {
                        reaped.store(true, Ordering::SeqCst);
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut pump).await;
                        status
                    }
                    () = &mut pump => child.wait().await,
                };
                reaped.store(true, Ordering::SeqCst);
                drop(pump);
                me.finish(&id, status).await;
                // Dropping the sender tells followers and cancel() that the run has ended.
                drop(log_tx);
            }
            .instrument(info_span!("run", run = %run.id)),
        );
        Ok((pid, log_rx, exited))
    }

    /// The spare runner, handed this run; None when there is none (or it is gone): start cold.
    async fn warm_runner(&self, dir: &Path, argv: &[String]) -> Option<spare::Spare> {
        let mut spare = self.spares.as_ref()?.take().await?;
        let cwd = dir.to_str()?;
        match spare.hand_over(cwd, argv).await {
            Ok(()) => Some(spare),
            Err(e) => {
                warn!(error = %e, "the spare runner could not take the run: starting one");
                let _ = killpg(spare.pid, Signal::SIGKILL);
                None
            }
        }
    }

    /// Copies what the notebook prints to the log and turns progress events into status.
    async fn pump_output(
        &self,
        id: &str,
        reader: tokio::net::unix::pipe::Receiver,
        log_path: &Path,
        log_tx: &watch::Sender<u64>,
    ) {
        let mut log = match tokio::fs::OpenOptions::new().create(true).append(true).open(log_path).await {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "cannot open run log");
                return;
            }
        };
        let mut lines = BufReader::new(reader);
        let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
        let mut written = 0u64;
        // Bounded per line; one odd byte is replaced, never the end of progress or of the log.
        while let Ok(true) = read_line(&mut lines, &mut splitter).await {
            let text = String::from_utf8_lossy(splitter.line());
            match progress::classify(&text) {
                Line::Event(event) => self.update_progress(id, event.progress()).await,
                Line::Trailer(_) | Line::Results(_) => {} // the runner also wrote the notebook file
                Line::Output(_) => {
                    if log.write_all(text.as_bytes()).await.is_ok() {
                        let _ = log.flush().await;
                        written += text.len() as u64;
                        log_tx.send_replace(written);
                    }
                }
            }
        }
    }

    async fn update_progress(&self, id: &str, progress: Progress) {
        let mut state = self.state.lock().await;
        let pid = state.active.as_ref().map(|a| a.pgid.as_raw());
        if let Some(run) = state.runs.get_mut(id) {
            run.progress = Some(progress);
            let run = run.clone();
            drop(state);
            self.persist(&run, pid);
        }
    }

    async fn finish(&self, id: &str, status: std::io::Result<std::process::ExitStatus>) {
        let dir = self.run_dir(id);
        let message = read_capped(&dir.join(TERMINATION_FILE), MAX_TERMINATION_BYTES)
            .await
            .and_then(|t| TerminationMessage::parse(&String::from_utf8_lossy(&t)));
        let mut state = self.state.lock().await;
        let active = state.active.take().filter(|a| a.id == id);
        let cancel_requested = active.as_ref().is_some_and(|a| a.cancel_requested);
        let interrupted = active.as_ref().is_some_and(|a| a.interrupted);
        let Some(run) = state.runs.get_mut(id) else {
            return;
        };
        let mut outcome = local_outcome(status.as_ref().ok(), message.as_ref(), cancel_requested);
        if interrupted && outcome.phase != RunPhase::Succeeded {
            outcome = Outcome {
                phase: RunPhase::Failed,
                reason: Reason::Interrupted,
                message: "the server shut down while this run was active".into(),
            };
        }
        run.phase = outcome.phase;
        run.reason = Some(outcome.reason);
        run.message = Some(outcome.message);
        run.error = message.as_ref().and_then(TerminationMessage::error);
        if let Some(p) = message.as_ref().and_then(TerminationMessage::progress) {
            run.progress = Some(p);
        }
        run.finished_at = Some(Timestamp::now());
        let run = run.clone();
        drop(state);
        self.persist(&run, None);
        self.metrics.run_finished(run.reason.unwrap_or(Reason::PodFailed), run.started_at, run.finished_at);
        info!(phase = run.phase.as_str(), reason = ?run.reason, "run finished");
    }

    /// On server shutdown: stops the active run (SIGTERM, then SIGKILL after the grace period)
    /// so it ends Failed/Interrupted with its partial notebook, instead of dying unrecorded.
    pub async fn shutdown(&self) {
        let stopping = {
            let mut state = self.state.lock().await;
            self.shutting_down.store(true, Ordering::Relaxed);
            state.active.as_mut().map(|a| {
                a.interrupted = true;
                (
                    a.id.clone(),
                    Stop { pgid: a.pgid, log_len: a.log_len.clone(), exited: Arc::clone(&a.exited) },
                )
            })
        };
        if let Some(spares) = &self.spares {
            spares.stop().await;
        }
        let Some((id, stop)) = stopping else { return };
        info!(run = %id, "server shutting down: stopping the active run");
        self.stop_group(stop).await;
    }

    /// SIGTERM to the runner's group, SIGKILL if it is still there after the grace period;
    /// never to a reaped runner, whose pgid may belong to someone else by now.
    async fn stop_group(&self, stop: Stop) {
        let signal = |sig| {
            if !stop.exited.load(Ordering::SeqCst) {
                let _ = killpg(stop.pgid, sig);
            }
        };
        signal(Signal::SIGTERM);
        if !Self::wait_ended(stop.log_len.clone(), self.config.kill_grace).await {
            warn!(grace = ?self.config.kill_grace, "runner ignored SIGTERM: SIGKILL");
            signal(Signal::SIGKILL);
            Self::wait_ended(stop.log_len, Duration::from_secs(10)).await;
        }
    }

    /// Waits (bounded) until the run whose log sender this is has ended and been recorded.
    async fn wait_ended(mut log_len: watch::Receiver<u64>, limit: Duration) -> bool {
        tokio::time::timeout(limit, async { while log_len.changed().await.is_ok() {} }).await.is_ok()
    }
}

#[async_trait::async_trait]
impl Backend for Arc<LocalBackend> {
    async fn start(&self, parameters: Option<Map<String, Value>>) -> Result<RunInfo> {
        let mut state = self.state.lock().await;
        if let Some(active) = &state.active {
            return Err(BackendError::AlreadyRunning(active.id.clone()));
        }
        let now = Timestamp::now();
        let mut run = RunInfo {
            id: super::new_run_id(),
            phase: RunPhase::Running,
            reason: Some(Reason::Started),
            // The notebook's name, never its path on this server (the message is served).
            message: Some(format!("running {}", notebook_name(&self.config.notebook))),
            progress: None,
            error: None,
            created_at: now,
            started_at: Some(now),
            finished_at: None,
            parameters,
            blocked_by: None,
        };
        let dir = self.run_dir(&run.id);
        std::fs::create_dir_all(&dir).map_err(BackendError::internal)?;
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(BackendError::Unavailable("the server is shutting down".into()));
        }
        let (pgid, log_len, exited) = match self.spawn_runner(&mut run, &dir).await {
            Ok(spawned) => spawned,
            Err(e) => {
                run.phase = RunPhase::Failed;
                run.reason = Some(Reason::PodFailed);
                warn!(run = %run.id, python = %self.config.python.display(), error = %e, "could not start the runner");
                run.message = Some(format!("could not start the runner's Python: {e}"));
                run.finished_at = Some(Timestamp::now());
                self.persist(&run, None);
                state.runs.insert(run.id.clone(), run.clone());
                return Ok(run);
            }
        };
        self.persist(&run, Some(pgid.as_raw()));
        self.metrics.run_started();
        state.runs.insert(run.id.clone(), run.clone());
        state.active = Some(Active {
            id: run.id.clone(),
            pgid,
            cancel_requested: false,
            interrupted: false,
            exited,
            log_len,
        });
        info!(run = %run.id, pid = pgid.as_raw(), "run started");
        Ok(run)
    }

    async fn latest(&self) -> Result<Option<RunInfo>> {
        let state = self.state.lock().await;
        Ok(state.runs.values().max_by(|a, b| standing(a).cmp_current(&standing(b))).cloned())
    }

    async fn get(&self, id: &str) -> Result<RunInfo> {
        let state = self.state.lock().await;
        state.runs.get(id).cloned().ok_or_else(|| BackendError::NotFound(id.to_string()))
    }

    async fn list(&self, limit: usize, continue_token: Option<&str>) -> Result<RunPage> {
        let runs: Vec<RunInfo> = self.state.lock().await.runs.values().cloned().collect();
        paginate(runs, limit, continue_token)
    }

    async fn cancel(&self, id: &str) -> Result<RunInfo> {
        let mut state = self.state.lock().await;
        let run = state.runs.get(id).cloned().ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        let Some(active) = state.active.as_mut().filter(|a| a.id == id) else {
            return Ok(run); // finished: left as it is
        };
        active.cancel_requested = true;
        let stop =
            Stop { pgid: active.pgid, log_len: active.log_len.clone(), exited: Arc::clone(&active.exited) };
        drop(state);
        info!(run = %id, "cancelling: SIGTERM to the runner's process group");
        self.stop_group(stop).await;
        self.get(id).await
    }

    async fn notebook(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.get(id).await?;
        match tokio::fs::read(self.run_dir(id).join(NOTEBOOK_FILE)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BackendError::internal(e)),
        }
    }

    async fn logs(&self, id: &str, follow: bool) -> Result<LogStream> {
        self.get(id).await?;
        let path = self.run_dir(id).join(LOG_FILE);
        let live = {
            let state = self.state.lock().await;
            state.active.as_ref().filter(|a| a.id == id && follow).map(|a| a.log_len.clone())
        };
        Ok(Box::pin(follow_file(path, live)))
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let mut state = self.state.lock().await;
        if state.active.as_ref().is_some_and(|a| a.id == id) {
            return Err(BackendError::Conflict(format!("run {id} is active: cancel it first")));
        }
        state.runs.remove(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        std::fs::remove_dir_all(self.run_dir(id)).map_err(BackendError::internal)
    }

    fn ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Streams a log file from the start, in bounded chunks decoded lossily; with `live`, keeps
/// reading until the run ends.
fn follow_file(
    path: PathBuf,
    live: Option<watch::Receiver<u64>>,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    async_stream::try_stream! {
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Err(e)?,
        };
        let mut live = live;
        let mut decoder = LossyDecoder::default();
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        loop {
            if file.is_none() {
                file = tokio::fs::File::open(&path).await.ok();
            }
            if let Some(f) = file.as_mut() {
                // The file keeps its position: each pass reads what was appended since the last.
                loop {
                    let n = f.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    let text = decoder.decode(&buf[..n]);
                    if !text.is_empty() {
                        yield Bytes::from(text);
                    }
                }
            }
            let Some(rx) = live.as_mut() else { break };
            if rx.changed().await.is_err() {
                live = None; // run ended: one last read
            }
        }
        let rest = decoder.finish();
        if !rest.is_empty() {
            yield Bytes::from(rest);
        }
    }
}

/// A notebook's file name, for messages.
fn notebook_name(path: &Path) -> std::borrow::Cow<'_, str> {
    path.file_name().unwrap_or(path.as_os_str()).to_string_lossy()
}

fn standing(run: &RunInfo) -> Standing<'_> {
    Standing { phase: run.phase, created_at: Some(run.created_at), finished_at: run.finished_at, id: &run.id }
}

/// At most `limit` bytes of a file; None if it cannot be read.
async fn read_capped(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let file = tokio::fs::File::open(path).await.ok()?;
    let mut out = Vec::new();
    file.take(limit).read_to_end(&mut out).await.ok()?;
    Some(out)
}

struct Outcome {
    phase: RunPhase,
    reason: Reason,
    message: String,
}

/// Phase and reason of a finished local run, from its exit status and termination message.
fn local_outcome(
    status: Option<&std::process::ExitStatus>,
    message: Option<&TerminationMessage>,
    cancel_requested: bool,
) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    let code = status.and_then(|s| s.code());
    let signal = status.and_then(|s| s.signal());
    let summary = message.and_then(|m| m.message.clone());
    if code == Some(progress::exit_code::SUCCESS) {
        return Outcome {
            phase: RunPhase::Succeeded,
            reason: Reason::Succeeded,
            message: summary.unwrap_or_else(|| "the notebook ran to the end".into()),
        };
    }
    if cancel_requested {
        return Outcome {
            phase: RunPhase::Cancelled,
            reason: Reason::Cancelled,
            message: "cancelled on request".into(),
        };
    }
    let reason = match (message.and_then(TerminationMessage::reason), code) {
        (Some(reason), _) => reason,
        (None, Some(code)) => progress::reason_for_exit_code(code),
        (None, None) => Reason::PodFailed,
    };
    let message = summary.unwrap_or_else(|| match (code, signal) {
        (Some(code), _) => format!("the runner exited with code {code}"),
        (_, Some(sig)) => format!("the runner was killed by signal {sig}"),
        _ => "the runner's exit status is unknown".into(),
    });
    Outcome { phase: RunPhase::Failed, reason, message }
}

/// What `run.json` holds: the run and, while it is active, its process group.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredRun {
    #[serde(flatten)]
    run: RunInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<i32>,
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = dir.join("server.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            use std::io::{Seek, Write};
            lock.set_len(0)?;
            lock.seek(std::io::SeekFrom::Start(0))?;
            write!(lock, "{}", std::process::id())?;
            Ok(lock)
        }
        Err((_, errno)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "data dir {} is in use by another notebook-operator (pid {}): {errno}; stop it or pass another --data-dir",
                dir.display(),
                holder.trim()
            )
        }
    }
}

/// Kills a runner left by a server that died, if that pid is still our runner.
fn kill_stale_runner(pid: i32, runner: &Path) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let runner = runner.to_string_lossy();
    if String::from_utf8_lossy(&cmdline).contains(runner.as_ref()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// `python -u run.py` in `cwd`, in its own process group, dying with this server.
fn runner_command(python: &Path, runner: &Path, cwd: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg("-u")
        .arg(runner)
        .current_dir(cwd)
        .env("PYTHONUNBUFFERED", "1")
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: prctl is async-signal-safe; the runner dies with this server, so a restarted
    // server never finds a run still executing behind its back.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
    cmd
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn outcome_prefers_the_termination_message() {
        let msg = TerminationMessage {
            reason: Some("CellTimeout".into()),
            message: Some("Cell 2 timed out".into()),
            ..Default::default()
        };
        let o = local_outcome(Some(&std::process::ExitStatus::from_raw(3 << 8)), Some(&msg), false);
        assert_eq!(
            (o.phase, o.reason, o.message.as_str()),
            (RunPhase::Failed, Reason::CellTimeout, "Cell 2 timed out")
        );
        let o = local_outcome(Some(&std::process::ExitStatus::from_raw(4 << 8)), None, false);
        assert_eq!(o.reason, Reason::KernelDied);
        let o = local_outcome(Some(&std::process::ExitStatus::from_raw(9)), None, true);
        assert_eq!((o.phase, o.reason), (RunPhase::Cancelled, Reason::Cancelled));
        let o = local_outcome(Some(&std::process::ExitStatus::from_raw(0)), None, true);
        assert_eq!(o.phase, RunPhase::Succeeded);
    }
}
