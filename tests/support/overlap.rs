//! The lock's promise, checked from what the node saw: no two runs sharing a lock ever had a
//! live container at the same instant. The intervals come from the test kubelet (process spawn
//! to reap, monotonic clock), never from timestamps the controller wrote.
//!
//! ```ignore
//! let checked = overlap::assert_no_overlap(cp, &ns, &RunLocks::new()).await;
//! assert_eq!(checked.runs_on("notebook-run"), 3);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::time::Instant;

use kube::api::Api;
use notebook_operator::NotebookRun;

use super::ControlPlane;
use super::kubelet::ContainerLifetime;

/// The label the operator puts on a run's Job and pods.
pub const RUN_LABEL: &str = "notebooks.dev/run";

/// The lock of each run, by run name: what a test knew when it created the runs, so that runs
/// deleted since still count.
pub type RunLocks = BTreeMap<String, String>;

/// When a container was alive: from `start` to `end`, or until now while `end` is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    pub start: Instant,
    pub end: Option<Instant>,
}

impl Interval {
    /// Whether both were alive at one same instant; an open interval lasts until `now`.
    /// Intervals that only touch (one ends the instant the other starts) do not overlap.
    pub fn overlaps(&self, other: &Interval, now: Instant) -> bool {
        let end = |i: &Interval| i.end.unwrap_or(now).max(i.start);
        self.start < end(other) && other.start < end(self)
    }
}

impl From<&ContainerLifetime> for Interval {
    fn from(l: &ContainerLifetime) -> Self {
        Interval { start: l.started, end: l.ended }
    }
}

/// Two containers of different runs on one lock, alive at the same time.
#[derive(Clone, Debug)]
pub struct Overlap {
    pub lock: String,
    pub first: ContainerLifetime,
    pub second: ContainerLifetime,
}

/// What was checked on one lock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockChecked {
    pub runs: BTreeSet<String>,
    /// Pod uids.
    pub pods: BTreeSet<String>,
    pub containers: usize,
}

/// What a check looked at: per lock, and what it could not attribute.
#[derive(Clone, Debug, Default)]
pub struct Checked {
    pub namespace: String,
    pub per_lock: BTreeMap<String, LockChecked>,
    /// Containers of pods without the run label (not the operator's).
    pub unlabelled: usize,
    /// Runs that had containers but whose lock is unknown (deleted and not in the map).
    pub unknown_runs: BTreeSet<String>,
}

impl Checked {
    pub fn containers(&self) -> usize {
        self.per_lock.values().map(|l| l.containers).sum()
    }

    pub fn pods(&self) -> usize {
        self.per_lock.values().map(|l| l.pods.len()).sum()
    }

    /// How many runs had a container on `lock`.
    pub fn runs_on(&self, lock: &str) -> usize {
        self.per_lock.get(lock).map_or(0, |l| l.runs.len())
    }

    /// Whether `run` had a container on `lock`.
    pub fn ran(&self, lock: &str, run: &str) -> bool {
        self.per_lock.get(lock).is_some_and(|l| l.runs.contains(run))
    }

    /// How many pods ran on `lock`.
    pub fn pods_on(&self, lock: &str) -> usize {
        self.per_lock.get(lock).map_or(0, |l| l.pods.len())
    }
}

impl fmt::Display for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "overlap check in {}:", self.namespace)?;
        if self.per_lock.is_empty() {
            write!(f, " no container seen")?;
        }
        for (lock, c) in &self.per_lock {
            write!(
                f,
                " lock {lock}: {} runs, {} pods, {} containers;",
                c.runs.len(),
                c.pods.len(),
                c.containers
            )?;
        }
        if self.unlabelled > 0 {
            write!(f, " {} containers without the {RUN_LABEL} label (ignored);", self.unlabelled)?;
        }
        if !self.unknown_runs.is_empty() {
            write!(f, " runs of unknown lock: {:?}", self.unknown_runs)?;
        }
        Ok(())
    }
}

/// Pure: groups `lifetimes` by run (label [`RUN_LABEL`]) and lock (`locks`), and returns every
/// pair of containers of different runs on one lock that were alive at the same instant
/// (an interval still open lasts until `now`).
pub fn find_overlaps(
    namespace: &str,
    lifetimes: &[ContainerLifetime],
    locks: &RunLocks,
    now: Instant,
) -> (Checked, Vec<Overlap>) {
    let mut checked = Checked { namespace: namespace.to_string(), ..Checked::default() };
    let mut by_lock: BTreeMap<&str, Vec<(&str, &ContainerLifetime)>> = BTreeMap::new();
    for lifetime in lifetimes.iter().filter(|l| l.namespace == namespace) {
        let Some(run) = lifetime.label(RUN_LABEL) else {
            checked.unlabelled += 1;
            continue;
        };
        let Some(lock) = locks.get(run) else {
            checked.unknown_runs.insert(run.to_string());
            continue;
        };
        let entry = checked.per_lock.entry(lock.clone()).or_default();
        entry.runs.insert(run.to_string());
        entry.pods.insert(lifetime.pod_uid.clone());
        entry.containers += 1;
        by_lock.entry(lock).or_default().push((run, lifetime));
    }
    let mut overlaps = Vec::new();
    for (lock, containers) in by_lock {
        for (i, (run_a, a)) in containers.iter().enumerate() {
            for (run_b, b) in &containers[i + 1..] {
                if run_a != run_b && Interval::from(*a).overlaps(&Interval::from(*b), now) {
                    let (first, second) = if a.started <= b.started { (a, b) } else { (b, a) };
                    overlaps.push(Overlap {
                        lock: lock.to_string(),
                        first: (*first).clone(),
                        second: (*second).clone(),
                    });
                }
            }
        }
    }
    (checked, overlaps)
}

/// A failed check: the overlaps found, and the runs whose lock was unknown.
#[derive(Clone, Debug)]
pub struct Broken {
    pub checked: Checked,
    pub overlaps: Vec<Overlap>,
    /// Readable: both runs, their pods and intervals as offsets from the kubelet's start.
    pub report: String,
}

impl Broken {
    /// The runs involved in an overlap.
    pub fn runs(&self) -> BTreeSet<String> {
        let run = |l: &ContainerLifetime| l.label(RUN_LABEL).unwrap_or_default().to_string();
        self.overlaps.iter().flat_map(|o| [run(&o.first), run(&o.second)]).collect()
    }
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report)
    }
}

/// Like [`assert_no_overlap`], without requiring that any container was seen.
///
/// The lock of a run missing from `known` is read from the API (`spec.lock`); a run deleted
/// since must be in `known`, else the check fails (its containers cannot be attributed).
pub async fn check_no_overlap(
    cp: &ControlPlane,
    namespace: &str,
    known: &RunLocks,
) -> Result<Checked, Broken> {
    let lifetimes: Vec<ContainerLifetime> =
        cp.container_lifetimes().into_iter().filter(|l| l.namespace == namespace).collect();
    let now = Instant::now();
    let mut locks = known.clone();
    let missing: BTreeSet<&str> =
        lifetimes.iter().filter_map(|l| l.label(RUN_LABEL)).filter(|run| !known.contains_key(*run)).collect();
    if !missing.is_empty() {
        let runs: Api<NotebookRun> = Api::namespaced(cp.client(), namespace);
        for run in missing {
            let found =
                runs.get_opt(run).await.unwrap_or_else(|e| panic!("read NotebookRun {namespace}/{run}: {e}"));
            if let Some(found) = found {
                locks.insert(run.to_string(), found.spec.lock.clone());
            }
        }
    }
    let (checked, overlaps) = find_overlaps(namespace, &lifetimes, &locks, now);
    if overlaps.is_empty() && checked.unknown_runs.is_empty() {
        return Ok(checked);
    }
    let report = report(cp.kubelet_started(), now, &checked, &overlaps);
    Err(Broken { checked, overlaps, report })
}

/// Asserts that no two runs sharing a lock had a live container at the same instant in
/// `namespace`, over every container the test kubelet ever ran there (pods deleted since
/// included), and that at least one container was seen (a check that saw nothing proves
/// nothing; use [`check_no_overlap`] where none is expected). Prints and returns what it checked.
pub async fn assert_no_overlap(cp: &ControlPlane, namespace: &str, known: &RunLocks) -> Checked {
    let checked = check_no_overlap(cp, namespace, known).await.unwrap_or_else(|broken| panic!("{broken}"));
    eprintln!("{checked}");
    assert!(
        checked.containers() > 0,
        "{checked}: no container of a run was seen in namespace {namespace}, so the check proved nothing"
    );
    checked
}

/// `instant` as seconds since `origin` (the kubelet's start), as the reports print it.
pub fn offset(origin: Instant, instant: Instant) -> String {
    format!("{:.3}s", instant.saturating_duration_since(origin).as_secs_f64())
}

fn report(origin: Instant, now: Instant, checked: &Checked, overlaps: &[Overlap]) -> String {
    let at = |i: Instant| offset(origin, i);
    let interval = |l: &ContainerLifetime| {
        let end = l.ended.map_or_else(|| format!("still alive at {}", at(now)), at);
        format!("pod {} (uid {}) container {}: {} .. {}", l.pod, l.pod_uid, l.container, at(l.started), end)
    };
    let mut text = format!("the lock's promise is broken: {checked}\n");
    if !checked.unknown_runs.is_empty() {
        let _ = writeln!(
            text,
            "containers of runs whose lock is unknown (deleted and not in the map): {:?}",
            checked.unknown_runs
        );
    }
    for o in overlaps {
        let run = |l: &ContainerLifetime| l.label(RUN_LABEL).unwrap_or_default().to_string();
        let _ = writeln!(
            text,
            "lock {}: runs {} and {} were alive at the same time (offsets from the kubelet's start):\n  \
             {}: {}\n  {}: {}",
            o.lock,
            run(&o.first),
            run(&o.second),
            run(&o.first),
            interval(&o.first),
            run(&o.second),
            interval(&o.second),
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(origin: Instant, ms: u64) -> Instant {
        origin + Duration::from_millis(ms)
    }

    fn interval(origin: Instant, start: u64, end: Option<u64>) -> Interval {
        Interval { start: at(origin, start), end: end.map(|e| at(origin, e)) }
    }

    fn lifetime(origin: Instant, run: &str, start: u64, end: Option<u64>) -> ContainerLifetime {
        ContainerLifetime {
            namespace: "ns".into(),
            pod: format!("{run}-pod"),
            pod_uid: format!("{run}-uid-{start}"),
            labels: [(RUN_LABEL.to_string(), run.to_string())].into(),
            container: "runner".into(),
            started: at(origin, start),
            ended: end.map(|e| at(origin, e)),
        }
    }

    #[test]
    fn intervals_overlap_only_when_both_are_alive_at_one_instant() {
        let o = Instant::now();
        let now = at(o, 1000);
        let cases = [
            // (a, b, overlap)
            ((0, Some(10)), (10, Some(20)), false), // touching
            ((0, Some(10)), (11, Some(20)), false),
            ((0, Some(11)), (10, Some(20)), true),
            ((5, Some(6)), (0, Some(20)), true), // contained
            ((0, None), (500, Some(600)), true), // open until now
            ((0, None), (999, None), true),
            ((0, Some(10)), (20, None), false),
            ((0, Some(10)), (0, Some(10)), true),
        ];
        for ((a0, a1), (b0, b1), expected) in cases {
            let (a, b) = (interval(o, a0, a1), interval(o, b0, b1));
            assert_eq!(a.overlaps(&b, now), expected, "{a0}..{a1:?} vs {b0}..{b1:?}");
            assert_eq!(b.overlaps(&a, now), expected, "symmetric: {b0}..{b1:?} vs {a0}..{a1:?}");
        }
    }

    #[test]
    fn overlaps_are_found_between_runs_sharing_a_lock_only() {
        let o = Instant::now();
        let now = at(o, 1000);
        let lifetimes = vec![
            lifetime(o, "a", 0, Some(100)),
            lifetime(o, "a", 50, Some(150)), // a's own retry: same run, not an overlap
            lifetime(o, "b", 200, Some(300)),
            lifetime(o, "c", 250, None), // overlaps b, same lock
            lifetime(o, "d", 0, None),   // another lock
            lifetime(o, "gone", 400, Some(500)),
        ];
        let locks: RunLocks = [("a", "x"), ("b", "x"), ("c", "x"), ("d", "y")]
            .into_iter()
            .map(|(r, l)| (r.to_string(), l.to_string()))
            .collect();
        let (checked, overlaps) = find_overlaps("ns", &lifetimes, &locks, now);
        let pairs: Vec<(&str, &str, &str)> = overlaps
            .iter()
            .map(|o| (o.lock.as_str(), o.first.label(RUN_LABEL).unwrap(), o.second.label(RUN_LABEL).unwrap()))
            .collect();
        assert_eq!(pairs, [("x", "b", "c")]);
        assert_eq!((checked.runs_on("x"), checked.pods_on("x"), checked.runs_on("y")), (3, 4, 1));
        assert_eq!(checked.unknown_runs, BTreeSet::from(["gone".to_string()]));
        let (other, none) = find_overlaps("elsewhere", &lifetimes, &locks, now);
        assert_eq!((other.containers(), none.len()), (0, 0));
    }
}
