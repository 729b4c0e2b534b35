//! One run of a container: a host process in its own process group and
//! private mount namespace, its output copied to a log file.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::mpsc;

use super::super::process;
use super::lifetimes::{self, CONTAINER_MARKER, ContainerLifetime};
use super::logs::{self, LogFile};
use super::node::now;
use super::volumes::Mount;
use super::{KubeletState, lock};

const MAX_TERMINATION_MESSAGE: usize = 4096;
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;
/// How long the processes a container left behind get to die after SIGKILL.
const STRAY_KILL_LIMIT: Duration = Duration::from_secs(5);

/// The pod a container belongs to, for its recorded lifetime.
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
}

pub struct Launch {
    /// Unique per run of a container; marks its processes (see [`CONTAINER_MARKER`]).
    pub id: String,
    pub pod: PodRef,
    pub container: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: PathBuf,
    pub mounts: Vec<Mount>,
    pub log: Arc<LogFile>,
    pub termination_file: PathBuf,
    pub fallback_to_logs_on_error: bool,
}

/// How a run ended, sent to the pod worker.
pub struct Exit {
    pub container: String,
    pub exit_code: i32,
    pub started_at: Time,
    pub finished_at: Time,
    pub message: Option<String>,
}

/// Starts the process; its [`Exit`] is sent on `exits`. Returns its pid,
/// which is also its process group.
pub fn launch(
    state: &Arc<KubeletState>,
    launch: Launch,
    exits: mpsc::UnboundedSender<Exit>,
) -> anyhow::Result<i32> {
    let Some((program, args)) = launch.argv.split_first() else {
        bail!("no command: the test kubelet cannot run an image's entrypoint");
    };
    let mounts: Vec<(CString, CString, bool)> = launch
        .mounts
        .iter()
        .map(|m| Ok((c_path(&m.source)?, c_path(&m.target)?, m.read_only)))
        .collect::<anyhow::Result<_>>()?;
    let working_dir = c_path(&launch.working_dir)?;
    std::fs::File::create(&launch.termination_file)?;

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&launch.env)
        .env(CONTAINER_MARKER, &launch.id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process::contain(cmd.as_std_mut());
    // SAFETY: only async-signal-safe syscalls on pre-built C strings.
    unsafe {
        cmd.pre_exec(move || enter_container(&mounts, &working_dir));
    }
    // Before the spawn, so the recorded interval covers the process's whole life.
    let spawning = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("start {program}"))?;
    let pid = child.id().context("no pid")? as i32;
    process::track_group(pid);
    lock(&state.groups).insert(pid);
    let started_at = now();
    let lifetime = state.lifetimes.begin(ContainerLifetime {
        namespace: launch.pod.namespace.clone(),
        pod: launch.pod.name.clone(),
        pod_uid: launch.pod.uid.clone(),
        labels: launch.pod.labels.clone(),
        container: launch.container.clone(),
        started: spawning,
        ended: None,
    });

    let stdout = child.stdout.take().map(|p| tokio::spawn(logs::pump(p, "stdout", launch.log.clone())));
    let stderr = child.stderr.take().map(|p| tokio::spawn(logs::pump(p, "stderr", launch.log.clone())));
    let state = state.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        // Like a container's PID namespace: the rest of the group dies with it, and so does
        // any descendant that left the group (a Jupyter kernel starts its own session).
        process::signal_group(pid, libc::SIGKILL);
        let log = |message: String| state.log(format!("container {}: {message}", launch.id));
        lifetimes::kill_marked(&launch.id, STRAY_KILL_LIMIT, log).await;
        // Before the exit is reported: whoever learns that the container stopped finds it closed.
        state.lifetimes.end(lifetime, Instant::now());
        process::untrack_group(pid);
        lock(&state.groups).remove(&pid);
        for pump in [stdout, stderr].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }
        launch.log.close();
        let exit_code = match status {
            Ok(status) => status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(128),
            Err(_) => 128,
        };
        let message = termination_message(
            &launch.termination_file,
            &launch.log,
            exit_code,
            launch.fallback_to_logs_on_error,
        );
        let _ = exits.send(Exit {
            container: launch.container,
            exit_code,
            started_at,
            finished_at: now(),
            message,
        });
    });
    Ok(pid)
}

fn termination_message(file: &Path, log: &LogFile, exit_code: i32, fallback: bool) -> Option<String> {
    let mut bytes = std::fs::read(file).unwrap_or_default();
    bytes.truncate(MAX_TERMINATION_MESSAGE);
    let message = String::from_utf8_lossy(&bytes).into_owned();
    if !message.is_empty() {
        return Some(message);
    }
    if fallback && exit_code != 0 {
        let tail = log.tail(FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES);
        return (!tail.is_empty()).then_some(tail);
    }
    None
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).with_context(|| format!("path {}", path.display()))
}

/// Runs in the child between fork and exec.
fn enter_container(mounts: &[(CString, CString, bool)], working_dir: &CString) -> io::Result<()> {
    let check = |result: libc::c_int| {
        if result == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    };
    // SAFETY: plain syscalls with valid, NUL-terminated paths.
    unsafe {
        if !mounts.is_empty() {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Keep the host's mount table untouched.
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                ptr::null(),
            ))?;
            for (source, target, read_only) in mounts {
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    ptr::null(),
                ))?;
                if *read_only {
                    check(libc::mount(
                        ptr::null(),
                        target.as_ptr(),
                        ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        ptr::null(),
                    ))?;
                }
            }
        }
        if libc::chdir(working_dir.as_ptr()) != 0 {
            libc::mkdir(working_dir.as_ptr(), 0o755);
            check(libc::chdir(working_dir.as_ptr()))?;
        }
    }
    Ok(())
}
