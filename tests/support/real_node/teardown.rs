//! Removing every trace of a real node: its pods' processes, containerd's shims, the mounts
//! under its folder, its cgroups, its bridge and the few files it leaves outside its folder.
//!
//! It runs when an owned node stops and, for the shared node that is never dropped, from an
//! `atexit` hook that runs before the one of `process` (which kills the daemons and then
//! removes the folder: the mounts must be gone by then).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use super::super::process;
use super::{CGROUP_PARENT, Layout};

/// Folders outside the node's own that containerd, libcni and the kubelet use by fixed paths.
pub const FIXED_PATHS: [&str; 3] = ["/run/containerd", "/var/lib/cni", "/var/lib/kubelet"];

static NODES: Mutex<Vec<Arc<Teardown>>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();

/// What one node created, and the pids of its daemons once they run.
pub struct Teardown {
    layout: Layout,
    /// Of [`FIXED_PATHS`], those that did not exist before the node started.
    created: Vec<PathBuf>,
    kubelet: AtomicU32,
    scheduler: AtomicU32,
    containerd: AtomicU32,
    done: AtomicBool,
}

impl Teardown {
    /// Registers a node about to be started; call after its first daemon was spawned, so this
    /// hook runs before the one of `process` at exit.
    pub fn register(layout: Layout, created: Vec<PathBuf>) -> Arc<Teardown> {
        let teardown = Arc::new(Teardown {
            layout,
            created,
            kubelet: AtomicU32::new(0),
            scheduler: AtomicU32::new(0),
            containerd: AtomicU32::new(0),
            done: AtomicBool::new(false),
        });
        NODES.lock().unwrap_or_else(|e| e.into_inner()).push(teardown.clone());
        AT_EXIT.call_once(|| {
            // SAFETY: registering a plain extern "C" fn.
            unsafe { libc::atexit(tear_down_every_node) };
        });
        teardown
    }

    pub fn set_containerd(&self, pid: u32) {
        self.containerd.store(pid, Ordering::SeqCst);
    }

    pub fn set_kubelet(&self, pid: u32) {
        self.kubelet.store(pid, Ordering::SeqCst);
    }

    pub fn set_scheduler(&self, pid: u32) {
        self.scheduler.store(pid, Ordering::SeqCst);
    }

    /// Removes everything; runs once. Returns what could not be removed (empty when clean).
    pub fn run(&self) -> Vec<String> {
        if self.done.swap(true, Ordering::SeqCst) {
            return Vec::new();
        }
        let layout = &self.layout;
        // The kubelet first: it would restart what goes next.
        for pid in [&self.kubelet, &self.scheduler] {
            kill_daemon(layout, pid.load(Ordering::SeqCst));
        }
        kill_cgroup_processes(&layout.cgroup);
        let containerd = self.containerd.load(Ordering::SeqCst);
        let ids = container_ids(layout);
        if containerd != 0 && process::is_alive(containerd) {
            delete_containers(layout);
        }
        kill_daemon(layout, containerd);
        wait_gone(containerd, Duration::from_secs(5));
        kill_shims(layout, &ids);
        let mut left = Vec::new();
        left.extend(unmount_under(&layout.dir));
        left.extend(remove_cgroups(&layout.cgroup));
        left.extend(remove_bridge(&layout.bridge));
        remove_cni_cache(&layout.network, &ids);
        remove_fixed_paths(&self.created);
        NODES.lock().unwrap_or_else(|e| e.into_inner()).retain(|t| !std::ptr::eq(t.as_ref(), self));
        left
    }
}

extern "C" fn tear_down_every_node() {
    let nodes: Vec<Arc<Teardown>> = match NODES.try_lock() {
        Ok(nodes) => nodes.clone(),
        Err(_) => return,
    };
    for node in nodes {
        for problem in node.run() {
            eprintln!("real node: {problem}");
        }
    }
}

/// SIGKILL to a daemon's group, if `pid` is still that daemon (its command line names the
/// node's folder): a daemon reaped earlier may have left its pid to another process.
fn kill_daemon(layout: &Layout, pid: u32) {
    let ours = fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|raw| String::from_utf8_lossy(&raw).contains(&*layout.dir.to_string_lossy()));
    if pid != 0 && ours {
        process::signal_group(pid as i32, libc::SIGKILL);
    }
}

fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pid != 0 && process::is_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every cgroup folder of the node, in each mounted hierarchy (cgroup v1 controllers and the
/// unified one), deepest first.
fn cgroup_dirs(cgroup: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        let root = hierarchy.join(cgroup.trim_start_matches('/'));
        collect_dirs(&root, &mut dirs);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs
}

/// Mount points of every cgroup hierarchy.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split_whitespace().next()?;
            let point = before.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(unescape(point)))
        })
        .collect()
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    out.push(dir.to_path_buf());
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// SIGKILL to every process in the node's cgroups (the pods' containers and sandboxes), until
/// none is left: a container that forks while it is killed is caught on the next round.
fn kill_cgroup_processes(cgroup: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: BTreeSet<i32> = cgroup_dirs(cgroup)
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
            .collect();
        let alive: Vec<i32> = pids.into_iter().filter(|p| process::is_alive(*p as u32)).collect();
        if alive.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in alive {
            // SAFETY: kill(2) on a pid read from the node's own cgroups.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ctr` on the node's containerd, in the kubelet's namespace; `None` if it failed or hung.
fn ctr(layout: &Layout, args: &[&str]) -> Option<String> {
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(&layout.socket)
        .args(["--namespace", "k8s.io"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                use std::io::Read as _;
                child.stdout.take()?.read_to_string(&mut out).ok()?;
                return status.success().then_some(out);
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Tasks and containers deleted through containerd, so that their shims exit and unmount the
/// containers' root filesystems themselves.
fn delete_containers(layout: &Layout) {
    let list = |what: &str| -> Vec<String> {
        ctr(layout, &[what, "ls", "-q"])
            .map(|out| out.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let tasks = list("tasks");
    if !tasks.is_empty() {
        let mut args = vec!["tasks", "delete", "--force"];
        args.extend(tasks.iter().map(String::as_str));
        ctr(layout, &args);
    }
    let containers = list("containers");
    if !containers.is_empty() {
        let mut args = vec!["containers", "delete"];
        args.extend(containers.iter().map(String::as_str));
        ctr(layout, &args);
    }
}

/// The ids of the containers containerd ran for the node (one folder per task).
fn container_ids(layout: &Layout) -> Vec<String> {
    let tasks = layout.containerd_state.join("io.containerd.runtime.v2.task/k8s.io");
    fs::read_dir(tasks)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Shims of the node's containerd still alive (found by the socket on their command line), and
/// the sockets containerd 1.6 gives them under the fixed `/run/containerd/s`.
fn kill_shims(layout: &Layout, ids: &[String]) {
    let address = format!("-address {} ", layout.socket.display());
    for pid in process::pids_with_cmdline_containing(&address) {
        // SAFETY: kill(2) on a shim of this node's containerd.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    for id in ids {
        // containerd's shim.SocketAddress: sha256 of "<address>/<namespace>/<id>".
        let key = layout.socket.join("k8s.io").join(id);
        let digest = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(
            |mut child| {
                use std::io::Write as _;
                child.stdin.take().map(|mut s| s.write_all(key.as_os_str().as_bytes())).transpose()?;
                child.wait_with_output()
            },
        );
        if let Ok(out) = digest
            && let Some(hex) = String::from_utf8_lossy(&out.stdout).split_whitespace().next()
        {
            let _ = fs::remove_file(Path::new("/run/containerd/s").join(hex));
        }
    }
}

/// Unmounts everything mounted under `dir` (root filesystems, shm, network namespaces, volumes),
/// deepest first. Returns the mounts that stayed.
fn unmount_under(dir: &Path) -> Vec<String> {
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Vec::new();
        }
        for mount in mounts {
            let Ok(path) = CString::new(mount.as_os_str().as_bytes()) else { continue };
            // SAFETY: umount2 with a valid C string.
            unsafe {
                if libc::umount2(path.as_ptr(), 0) != 0 {
                    libc::umount2(path.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
    mounts_under(dir).into_iter().map(|m| format!("still mounted: {}", m.display())).collect()
}

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}/", dir.display());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(unescape))
        .filter(|point| point.starts_with(&prefix))
        .map(PathBuf::from)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => out.push_str(&code),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Removes the node's cgroup folders (leaves first), then the shared parent if it is empty.
fn remove_cgroups(cgroup: &str) -> Vec<String> {
    let mut left = Vec::new();
    for dir in cgroup_dirs(cgroup) {
        if fs::remove_dir(&dir).is_err() && dir.exists() {
            left.push(format!("cgroup not removed (busy?): {}", dir.display()));
        }
    }
    for hierarchy in cgroup_hierarchies() {
        // Another node may still use it: then it is not empty and stays.
        let _ = fs::remove_dir(hierarchy.join(CGROUP_PARENT.trim_start_matches('/')));
    }
    left
}

fn remove_bridge(bridge: &str) -> Vec<String> {
    if !Path::new("/sys/class/net").join(bridge).exists() {
        return Vec::new();
    }
    let deleted = Command::new("ip")
        .args(["link", "delete", bridge])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if deleted { Vec::new() } else { vec![format!("bridge {bridge} not deleted")] }
}

/// libcni keeps each attachment's result under the fixed `/var/lib/cni/results`, named after the
/// network and the sandbox (`<network>-<id>-eth0`, and `cni-loopback-<id>-lo` for the loopback
/// that containerd adds): those of sandboxes stopped without the CRI are left there.
fn remove_cni_cache(network: &str, ids: &[String]) {
    let results = Path::new("/var/lib/cni/results");
    let Ok(entries) = fs::read_dir(results) else { return };
    let ours = |name: &str| {
        name.starts_with(&format!("{network}-"))
            || ids.iter().any(|id| name.starts_with(&format!("cni-loopback-{id}-")))
    };
    for entry in entries.flatten() {
        if ours(&entry.file_name().to_string_lossy()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// In the fixed folders the node created, only sockets, the device manager's checkpoint and
/// empty folders go: nothing that someone else put there.
fn remove_fixed_paths(created: &[PathBuf]) {
    fn prune(dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => prune(&path),
                Ok(t) if std::os::unix::fs::FileTypeExt::is_socket(&t) => {
                    let _ = fs::remove_file(&path);
                }
                Ok(_) if entry.file_name() == "kubelet_internal_checkpoint" => {
                    let _ = fs::remove_file(&path);
                }
                _ => {}
            }
        }
        let _ = fs::remove_dir(dir);
    }
    for dir in created {
        prune(dir);
    }
}
