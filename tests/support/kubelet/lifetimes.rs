//! What the node saw: when each container process lived, by the monotonic clock.
//!
//! A lifetime starts just before the process is spawned and ends once the process is reaped
//! and no process of the container is left (its group and any descendant that escaped it),
//! and always before the kubelet reports the container terminated. So an interval covers at
//! least the real one, and a controller that waits for the pod to stop sees it closed.

use std::collections::BTreeMap;
use std::fs;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::super::process;
use super::lock;

/// The environment variable that marks every process of a container (descendants inherit it),
/// so that processes which left the container's process group can still be found.
pub const CONTAINER_MARKER: &str = "TEST_KUBELET_CONTAINER";

/// One run of one container, as the node saw it.
#[derive(Clone, Debug)]
pub struct ContainerLifetime {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// The pod's labels when the container started (`notebooks.dev/run` among them).
    pub labels: BTreeMap<String, String>,
    pub container: String,
    /// Taken just before the process was spawned.
    pub started: Instant,
    /// Taken once the process was reaped and none of its processes was left; `None` while alive.
    pub ended: Option<Instant>,
}

impl ContainerLifetime {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// Every container lifetime of one kubelet, kept for the kubelet's whole life
/// (pods deleted since included).
pub struct Lifetimes {
    origin: Instant,
    records: Mutex<Vec<ContainerLifetime>>,
}

/// Identifies a lifetime recorded by [`Lifetimes::begin`].
#[derive(Clone, Copy, Debug)]
pub struct LifetimeId(usize);

impl Lifetimes {
    pub fn new() -> Self {
        Self { origin: Instant::now(), records: Mutex::default() }
    }

    /// When the kubelet started: the origin for printing lifetimes as offsets.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    pub fn begin(&self, lifetime: ContainerLifetime) -> LifetimeId {
        let mut records = lock(&self.records);
        records.push(lifetime);
        LifetimeId(records.len() - 1)
    }

    pub fn end(&self, id: LifetimeId, at: Instant) {
        if let Some(record) = lock(&self.records).get_mut(id.0) {
            record.ended.get_or_insert(at);
        }
    }

    /// A copy of every lifetime, in start order.
    pub fn snapshot(&self) -> Vec<ContainerLifetime> {
        lock(&self.records).clone()
    }
}

/// Kills every live process marked as belonging to container `id` and waits until none is
/// left, as the end of a container's PID namespace would; returns how many were found.
/// Gives up after `limit` (a process stuck in the kernel), logging what is left through `log`.
pub async fn kill_marked(id: &str, limit: Duration, log: impl Fn(String)) -> usize {
    let needle = format!("{CONTAINER_MARKER}={id}");
    let deadline = tokio::time::Instant::now() + limit;
    let mut found = 0;
    loop {
        let needle_for_scan = needle.clone();
        let pids =
            tokio::task::spawn_blocking(move || marked_pids(&needle_for_scan)).await.unwrap_or_default();
        if pids.is_empty() {
            return found;
        }
        if found == 0 {
            log(format!("killing {} process(es) left by container {id}: {pids:?}", pids.len()));
        }
        found = found.max(pids.len());
        for pid in &pids {
            // SAFETY: kill(2) on a pid read from /proc; at worst it is gone already.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        if tokio::time::Instant::now() >= deadline {
            log(format!("processes of container {id} still alive after SIGKILL: {pids:?}"));
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Live (not zombie) processes whose initial environment holds `needle` (`KEY=value`).
fn marked_pids(needle: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id();
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|raw| raw.split(|b| *b == 0).any(|entry| entry == needle.as_bytes()))
        })
        .filter(|pid| process::is_alive(*pid))
        .collect()
}
