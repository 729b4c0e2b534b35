//! Child processes that never outlive the test process.
//!
//! Every child is the leader of its own process group, gets `SIGKILL` when the
//! thread that spawned it dies (`PR_SET_PDEATHSIG`), and is registered so that
//! an `atexit` hook kills whatever group is still alive when the process exits
//! (statics such as the shared control plane are never dropped).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use anyhow::{Context, bail};

static GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
static DIRS_TO_REMOVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static KEEP_DIRS: AtomicBool = AtomicBool::new(false);
static EXITING: AtomicBool = AtomicBool::new(false);
static AT_EXIT: Once = Once::new();

/// Makes `cmd` start a new process group and die with the spawning thread.
pub fn contain(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Registers a process group to be killed at process exit.
pub fn track_group(pgid: i32) {
    AT_EXIT.call_once(|| {
        // SAFETY: registering a plain extern "C" fn.
        unsafe { libc::atexit(kill_everything_at_exit) };
    });
    GROUPS.lock().unwrap_or_else(|e| e.into_inner()).insert(pgid);
    // Spawned by a thread that raced with the exit hook.
    if EXITING.load(Ordering::SeqCst) {
        signal_group(pgid, libc::SIGKILL);
    }
}

/// Forgets a process group once its leader has been reaped.
pub fn untrack_group(pgid: i32) {
    GROUPS.lock().unwrap_or_else(|e| e.into_inner()).remove(&pgid);
}

/// Sends `signal` to every process of the group led by `pgid`.
pub fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid targets a process group.
    unsafe { libc::kill(-pgid, signal) };
}

/// Removes `dir` at process exit, after every tracked group has been killed.
pub fn remove_at_exit(dir: PathBuf) {
    DIRS_TO_REMOVE.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
}

/// Keeps the directories registered with [`remove_at_exit`] (for example after
/// a test failed, so its logs can be read).
pub fn keep_dirs() {
    KEEP_DIRS.store(true, Ordering::SeqCst);
}

pub fn dirs_kept() -> bool {
    KEEP_DIRS.load(Ordering::SeqCst)
}

extern "C" fn kill_everything_at_exit() {
    EXITING.store(true, Ordering::SeqCst);
    // try_lock: another thread may hold the lock while the process exits.
    if let Ok(groups) = GROUPS.try_lock() {
        for pgid in groups.iter() {
            signal_group(*pgid, libc::SIGKILL);
        }
        // Reap the leaders (our children), so no zombie outlives the process.
        for pgid in groups.iter() {
            for _ in 0..100 {
                // SAFETY: waitpid on our own child; no status is read.
                let reaped = unsafe { libc::waitpid(*pgid, std::ptr::null_mut(), libc::WNOHANG) };
                if reaped != 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    if let Ok(dirs) = DIRS_TO_REMOVE.try_lock() {
        for dir in dirs.iter() {
            if dirs_kept() {
                eprintln!("control plane: kept {}", dir.display());
                continue;
            }
            // Killed processes may still be closing files for a moment.
            for _ in 0..20 {
                if fs::remove_dir_all(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
}

/// A long-running server process (etcd, kube-apiserver, ...) whose output
/// goes to a log file. Killed, with its group, on drop.
pub struct Daemon {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Daemon {
    pub fn spawn(name: &'static str, program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let out = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Self::start(program, args, out)?;
        Ok(Self { name, program: program.to_path_buf(), args: args.to_vec(), child, log, reaped: false })
    }

    fn start(program: &Path, args: &[String], out: fs::File) -> anyhow::Result<Child> {
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        contain(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawn {}", program.display()))?;
        track_group(child.id() as i32);
        Ok(child)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Starts it again, as it was started (its log continues), after a [`Daemon::kill`].
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        self.kill();
        let out = fs::OpenOptions::new().append(true).open(&self.log)?;
        self.child = Self::start(&self.program, &self.args, out)?;
        self.reaped = false;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails with the tail of the log when the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.reaped = true;
            untrack_group(self.child.id() as i32);
            bail!("{} exited with {status}; log {}:\n{}", self.name, self.log.display(), tail(&self.log, 30));
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        self.reaped = true;
        let pgid = self.child.id() as i32;
        signal_group(pgid, libc::SIGKILL);
        let _ = self.child.wait();
        untrack_group(pgid);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a text file (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether a process with this pid exists and is not a zombie.
#[allow(dead_code)] // for leak checks in some test binaries
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false)
        }
        Err(_) => false,
    }
}

/// Pids of live processes whose command line contains `needle`.
#[allow(dead_code)] // for leak checks in some test binaries
pub fn pids_with_cmdline_containing(needle: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " ").contains(needle))
                .unwrap_or(false)
        })
        .filter(|pid| is_alive(*pid))
        .collect()
}

/// Runs one of the repository's build scripts (`tests/control-plane/build.sh`,
/// `tests/images/build.sh`), its progress on our stderr, and returns the folder it prints last.
pub fn run_build_script(relative: &str) -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let output = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed with {}", script.display(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow::anyhow!("{} printed nothing", script.display()))?;
    Ok(PathBuf::from(last.trim()))
}
