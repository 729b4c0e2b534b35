//! A soak of the lock on a real control plane: a few hundred one-cell runs on three locks,
//! created from a seeded pseudo-random sequence (mostly Queue, some Forbid and Replace), with
//! random cancels and deletes of Running and Queued runs, and concurrent `/start` calls to the
//! REST facade (`notebook-operator api`) on one of the locks. Afterwards every guarantee of
//! DESIGN.md section 11 must hold: no two runs sharing a lock had a live container at the same
//! time (what the node saw, over every run, deleted ones included), no Lease left, every run
//! terminal with a reason, no Job or ConfigMap left of a run that is gone, no run stuck.
//! The controller runs with a small `--history-limit`, so retention prunes during the churn, and
//! its promises are checked too: only finished runs pruned, never more than the limit asks, and
//! the limit holds once every run settled.
//!
//! `SOAK_SEED=<n>` replays a sequence (the seed is printed); the runs' timing still varies.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use notebook_operator::{NotebookRun, RunPhase};
use serde_json::{Value, json};

use support::facade::Facade;
use support::operator::{Operator, install_crd};
use support::overlap::{self, RUN_LABEL, RunLocks};
use support::{ControlPlane, from_json, ipynb, process, try_wait_for, wait_for};

/// How many runs the test creates (the facade's `/start` calls add theirs).
const RUNS: usize = 300;
const LOCKS: [&str; 3] = ["soak-a", "soak-b", "soak-c"];
/// The controller's `--history-limit`: small, so retention prunes runs on every lock during the
/// soak (about a hundred runs each).
const HISTORY_LIMIT: usize = 40;
/// How long the checks wait for retention to bring every lock down to the limit.
const PRUNE_TIMEOUT: Duration = Duration::from_secs(30);
/// The lock of the facade's runs.
const FACADE_LOCK: &str = "soak-c";
/// The whole test, control plane start included; past it the test fails with what it was doing.
const DEADLINE: Duration = Duration::from_secs(6 * 60);
/// Kept for the checks after every run settled.
const CHECKS_RESERVE: Duration = Duration::from_secs(75);
/// Pause between two steps of the sequence.
const STEP: Duration = Duration::from_millis(150);
/// Runs not yet finished (on all locks) above which the sequence waits: the load stays bounded
/// and so does the time it takes to settle.
const MAX_UNFINISHED: usize = 12;
/// Out of 100: the policy of a created run, and the chance of a cancel and of a delete per step.
const FORBID_PERCENT: u64 = 15;
const REPLACE_PERCENT: u64 = 10;
const CANCEL_PERCENT: u64 = 20;
const DELETE_PERCENT: u64 = 12;
/// Out of 100: the chance that a new run is cancelled or deleted at once, racing its admission.
const RACE_PERCENT: u64 = 6;
/// Every this many steps, this many concurrent `/start` calls.
const FACADE_EVERY: usize = 25;
const FACADE_BURST: usize = 3;
/// How long the facade waits for the controller to admit or reject a run before its 503.
const ADMIT_TIMEOUT: &str = "30s";
/// Before a burst of `/start` calls, how long the sequence waits for the facade's lock to be free.
const FACADE_IDLE_WAIT: Duration = Duration::from_secs(10);
/// For the kubelet's own check.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Waits for the last leftovers to go (garbage collection, Lease release, pods stopping).
const LEFTOVER_TIMEOUT: Duration = Duration::from_secs(30);

// === the random sequence ===

/// xorshift64: a tiny reproducible sequence, no crate needed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

fn seed() -> u64 {
    match std::env::var("SOAK_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("SOAK_SEED is not a number: {s:?}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Policy {
    Queue,
    Forbid,
    Replace,
}

impl Policy {
    fn roll(rng: &mut Rng) -> Self {
        let n = rng.next() % 100;
        if n < FORBID_PERCENT {
            Policy::Forbid
        } else if n < FORBID_PERCENT + REPLACE_PERCENT {
            Policy::Replace
        } else {
            Policy::Queue
        }
    }

    fn name(self) -> &'static str {
        match self {
            Policy::Queue => "Queue",
            Policy::Forbid => "Forbid",
            Policy::Replace => "Replace",
        }
    }
}

// === what the soak did, for the report ===

#[derive(Default)]
struct Tally {
    phase: String,
    created: usize,
    by_policy: BTreeMap<&'static str, usize>,
    cancels: usize,
    deletes: usize,
    facade: BTreeMap<u16, usize>,
    facade_failures: Vec<String>,
    /// Runs the test asked to delete (they may wait on the lock finalizer before they go).
    deleted: BTreeSet<String>,
    /// Runs that must stay unless deleted: created by the test or admitted by the facade.
    kept: BTreeSet<String>,
    /// Every run and its lock: created by the test, admitted by the facade, or seen by the watch.
    locks: RunLocks,
    /// The last state the watch saw of each run (of a pruned run: what it was when it went).
    last_seen: BTreeMap<String, NotebookRun>,
    /// What the test did to which run, and when (since the kubelet's start, as the overlap
    /// report prints its intervals).
    actions: Vec<(Duration, String, String)>,
}

impl Tally {
    fn act(&mut self, run: &str, what: impl Into<String>) {
        let at = ControlPlane::shared().kubelet_started().elapsed();
        self.actions.push((at, run.to_string(), what.into()));
    }

    /// What the test did to `run`, one line per action.
    fn history(&self, run: &str) -> String {
        let lines: Vec<String> = self
            .actions
            .iter()
            .filter(|(_, r, _)| r == run)
            .map(|(at, _, what)| format!("{:.3}s {what}", at.as_secs_f64()))
            .collect();
        lines.join("; ")
    }

    fn summary(&self) -> String {
        let mut text = format!(
            "created {} ({:?}), cancel patches {}, deletes {}, facade /start answers {:?}",
            self.created, self.by_policy, self.cancels, self.deletes, self.facade
        );
        if !self.facade_failures.is_empty() {
            let _ = write!(text, ", facade failures: {:?}", self.facade_failures);
        }
        text
    }
}

type Shared = Arc<Mutex<Tally>>;

fn tally(shared: &Shared) -> std::sync::MutexGuard<'_, Tally> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

// === the facade ===

/// The facade's starts, racing the rest of the soak.
struct FacadeStarts;

impl FacadeStarts {
    /// `POST /start`: 200 (admitted) and 400 (the lock is held) are both valid answers.
    async fn start_run(http: reqwest::Client, url: String, shared: Shared) {
        let answer = http.post(format!("{url}/start")).send().await;
        let (code, body) = match answer {
            Ok(resp) => {
                let code = resp.status().as_u16();
                (code, resp.json::<Value>().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({"error": e.to_string()})),
        };
        let mut t = tally(&shared);
        *t.facade.entry(code).or_default() += 1;
        match code {
            200 => match body["id"].as_str() {
                Some(id) => {
                    t.locks.insert(id.to_string(), FACADE_LOCK.to_string());
                    t.kept.insert(id.to_string());
                    t.act(id, format!("admitted by the facade's /start ({})", body["status"]));
                }
                None => t.facade_failures.push(format!("200 without an id: {body}")),
            },
            400 if body["detail"].as_str().is_some_and(|d| d.starts_with("Another")) => {}
            _ => t.facade_failures.push(format!("{code}: {body}")),
        }
    }
}

// === the soak ===

fn run_of(name: &str, lock: &str, policy: Policy) -> NotebookRun {
    from_json(json!({
        "apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun",
        "metadata": {"name": name},
        "spec": {"notebook": {"inline": ipynb(&["x = 1"])}, "lock": lock, "concurrencyPolicy": policy.name()},
    }))
}

fn is_terminal(run: &NotebookRun) -> bool {
    run.phase().is_some_and(RunPhase::is_terminal)
}

/// The finished runs on `lock` among `all`.
fn finished_on(all: &[NotebookRun], lock: &str) -> usize {
    all.iter().filter(|r| r.spec.lock == lock && is_terminal(r)).count()
}

/// Runs the test kept (created, or admitted by the facade) that are gone though nobody deleted
/// them: only retention may do that, and only as `--history-limit` allows. Each was finished,
/// with a reason, when it went; and when retention pruned on a lock, the `HISTORY_LIMIT` newer
/// finished runs it kept are still there, or were deleted by someone else. Returns how many.
fn check_pruned(all: &[NotebookRun], t: &Tally, broken: &mut Vec<String>) -> usize {
    let present: BTreeSet<String> = all.iter().map(|r| r.name_any()).collect();
    let pruned: BTreeSet<&String> =
        t.kept.iter().filter(|r| !present.contains(*r) && !t.deleted.contains(*r)).collect();
    let unfinished: Vec<String> = pruned
        .iter()
        .filter(|r| {
            t.last_seen
                .get(**r)
                .is_none_or(|run| !is_terminal(run) || run.status.as_ref().and_then(|s| s.reason).is_none())
        })
        .map(|r| t.last_seen.get(*r).map_or_else(|| format!("{r} (never seen by the watch)"), describe))
        .collect();
    if !unfinished.is_empty() {
        broken.push(format!(
            "runs gone though nobody deleted them, and not finished with a reason when they went:\n  {}",
            unfinished.join("\n  ")
        ));
    }
    for lock in LOCKS {
        let on_lock = |r: &str| t.locks.get(r).is_some_and(|l| l == lock);
        let pruned_here = pruned.iter().filter(|r| on_lock(r)).count();
        // Gone for another reason: deleted by the test, or by the facade after its 400.
        let deleted_here =
            t.locks.keys().filter(|r| on_lock(r) && !present.contains(*r) && !pruned.contains(r)).count();
        let kept_here = finished_on(all, lock);
        if pruned_here > 0 && kept_here + deleted_here < HISTORY_LIMIT {
            broken.push(format!(
                "lock {lock}: {pruned_here} runs pruned, though only {kept_here} finished runs remain and \
                 {deleted_here} were deleted otherwise (the limit keeps {HISTORY_LIMIT})"
            ));
        }
    }
    if pruned.is_empty() {
        broken.push(format!(
            "no run was pruned with --history-limit {HISTORY_LIMIT}, so the soak proved nothing of it"
        ));
    }
    pruned.len()
}

/// Running or Queued, and not already being cancelled or deleted: what a step may cancel or delete.
fn is_target(run: &NotebookRun) -> bool {
    matches!(run.phase(), Some(RunPhase::Running | RunPhase::Queued))
        && !run.spec.cancel
        && run.metadata.deletion_timestamp.is_none()
}

fn describe(run: &NotebookRun) -> String {
    let status = run.status.clone().unwrap_or_default();
    format!(
        "{} lock={} policy={:?} cancel={} phase={:?} reason={:?} message={:?} blockedBy={:?} deleting={} finalizers={:?}",
        run.name_any(),
        run.spec.lock,
        run.spec.concurrency_policy,
        run.spec.cancel,
        status.phase,
        status.reason,
        status.message,
        status.blocked_by,
        run.metadata.deletion_timestamp.is_some(),
        run.finalizers(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_runs_on_three_locks_keep_every_promise() {
    let started = Instant::now();
    let shared: Shared = Arc::default();
    let outcome = tokio::time::timeout(DEADLINE, soak(started, shared.clone())).await;
    if outcome.is_err() {
        let t = tally(&shared);
        panic!("the soak exceeded its {DEADLINE:?} deadline while {}; so far: {}", t.phase, t.summary());
    }
}

async fn soak(started: Instant, shared: Shared) {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("soak").await;
    let _op = Operator::start_with(cp, &ns, &["--history-limit", &HISTORY_LIMIT.to_string()]);
    let cm: ConfigMap =
        from_json(json!({"metadata": {"name": "nb"}, "data": {"notebook.ipynb": ipynb(&["x = 1"])}}));
    ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await.expect("the facade's notebook");
    let facade = Facade::start(cp, &ns, FACADE_LOCK, ADMIT_TIMEOUT, &[]).await;
    let runs: Api<NotebookRun> = ns.api();
    let store = watch_runs(runs.clone(), shared.clone());
    store.wait_until_ready().await.expect("the runs' cache");

    let seed = seed();
    eprintln!("soak: seed {seed} (SOAK_SEED={seed} replays the sequence), {RUNS} runs on {LOCKS:?}");
    let mut rng = Rng::new(seed);
    let settle_by = started + DEADLINE - CHECKS_RESERVE;
    let mut facade_calls = Vec::new();
    tally(&shared).phase = "creating runs".into();
    let creating = Instant::now();
    for i in 0..RUNS {
        // Bounded load: wait while too many runs are unfinished.
        let unfinished = || store.state().iter().filter(|r| !is_terminal(r)).count();
        let calm = try_wait_for(settle_by.saturating_duration_since(Instant::now()), || async {
            unfinished() < MAX_UNFINISHED
        })
        .await;
        assert!(calm.is_some(), "{} runs stayed unfinished: {}", unfinished(), stuck_report(&store.state()));

        let lock = LOCKS[rng.below(LOCKS.len())];
        let policy = Policy::roll(&mut rng);
        let name = format!("{lock}-{i:03}-{}", policy.name().to_lowercase());
        runs.create(&PostParams::default(), &run_of(&name, lock, policy))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        {
            let mut t = tally(&shared);
            t.created += 1;
            *t.by_policy.entry(policy.name()).or_default() += 1;
            t.locks.insert(name.clone(), lock.to_string());
            t.kept.insert(name.clone());
            t.act(&name, "created");
        }

        // Sometimes the new run itself, racing its admission (a cancel or a delete that lands
        // before, while or after its Job is created).
        let (racing, race_delete) = (rng.percent(RACE_PERCENT), rng.percent(50));
        if racing && race_delete {
            delete(&runs, &shared, &name, "racing its admission").await;
        } else if racing {
            cancel(&runs, &shared, &name, "racing its admission").await;
        }
        if rng.percent(CANCEL_PERCENT) {
            let targets: Vec<String> =
                store.state().iter().filter(|r| is_target(r)).map(|r| r.name_any()).collect();
            if !targets.is_empty() {
                let target = &targets[rng.below(targets.len())];
                cancel(&runs, &shared, target, &format!("cache said {}", phase_in(&store, target))).await;
            }
        }
        if rng.percent(DELETE_PERCENT) {
            let targets: Vec<String> =
                store.state().iter().filter(|r| is_target(r)).map(|r| r.name_any()).collect();
            if !targets.is_empty() {
                let target = &targets[rng.below(targets.len())];
                delete(&runs, &shared, target, &format!("cache said {}", phase_in(&store, target))).await;
            }
        }
        if i % FACADE_EVERY == FACADE_EVERY / 2 {
            // Racing starts on a free lock, if it frees up soon: one is admitted, the rest refused.
            let lock_busy = || store.state().iter().any(|r| r.spec.lock == FACADE_LOCK && !is_terminal(r));
            try_wait_for(FACADE_IDLE_WAIT, || async { !lock_busy() }).await;
            for _ in 0..FACADE_BURST {
                let call = FacadeStarts::start_run(facade.http.clone(), facade.url.clone(), shared.clone());
                facade_calls.push(tokio::spawn(call));
            }
        }
        tokio::time::sleep(STEP).await;
    }
    tally(&shared).phase = "waiting for the facade's answers".into();
    for call in facade_calls {
        call.await.expect("a /start call");
    }
    eprintln!(
        "soak: {RUNS} runs created in {:.1}s; {}",
        creating.elapsed().as_secs_f64(),
        tally(&shared).summary()
    );

    // Every run settles: terminal, or gone once deleted (after the controller released it).
    tally(&shared).phase = "waiting for every run to settle".into();
    let settling = Instant::now();
    let deleted = tally(&shared).deleted.clone();
    let unsettled = |all: &[NotebookRun]| -> Vec<String> {
        all.iter().filter(|r| !is_terminal(r) || deleted.contains(&r.name_any())).map(describe).collect()
    };
    let settled = try_wait_for(settle_by.saturating_duration_since(Instant::now()), || async {
        let all = runs.list(&ListParams::default()).await.ok()?.items;
        unsettled(&all).is_empty().then_some(())
    })
    .await;
    // Every broken invariant is reported, not only the first.
    let mut broken = Vec::new();
    if settled.is_some() {
        eprintln!(
            "soak: every run settled {:.1}s after the last was created",
            settling.elapsed().as_secs_f64()
        );
    } else {
        let all = runs.list(&ListParams::default()).await.expect("list runs").items;
        broken.push(format!(
            "runs stuck {:.0}s after the last was created (not terminal, or deleted but still there):\n  {}",
            settling.elapsed().as_secs_f64(),
            unsettled(&all).join("\n  ")
        ));
    }

    tally(&shared).phase = "checking the invariants".into();
    let (facade_failures, locks) = {
        let t = tally(&shared);
        (t.facade_failures.clone(), t.locks.clone())
    };
    if !facade_failures.is_empty() {
        broken.push(format!("the facade answered /start with neither 200 nor 400: {facade_failures:?}"));
    }
    // Retention: given a moment, every lock is down to the limit.
    let over_limit = |all: &[NotebookRun]| -> Vec<String> {
        LOCKS
            .iter()
            .map(|lock| (lock, finished_on(all, lock)))
            .filter(|(_, n)| *n > HISTORY_LIMIT)
            .map(|(lock, n)| format!("{lock}: {n} finished runs"))
            .collect()
    };
    let all = match try_wait_for(PRUNE_TIMEOUT, || async {
        let all = runs.list(&ListParams::default()).await.ok()?.items;
        over_limit(&all).is_empty().then_some(all)
    })
    .await
    {
        Some(all) => all,
        None => {
            let all = runs.list(&ListParams::default()).await.expect("list runs").items;
            broken.push(format!(
                "the history limit ({HISTORY_LIMIT}) not enforced {PRUNE_TIMEOUT:?} after every run settled: {:?}",
                over_limit(&all)
            ));
            all
        }
    };
    let pruned = check_pruned(&all, &tally(&shared), &mut broken);
    let no_reason: Vec<String> = all
        .iter()
        .filter(|r| is_terminal(r) && r.status.as_ref().and_then(|s| s.reason).is_none())
        .map(describe)
        .collect();
    if !no_reason.is_empty() {
        broken.push(format!("terminal runs without a reason:\n  {}", no_reason.join("\n  ")));
    }

    // What must be gone once every run settled: given a moment for garbage collection.
    let leftovers = || leftovers(cp, &ns);
    let cleared = try_wait_for(LEFTOVER_TIMEOUT, || async { leftovers().await.is_empty() }).await;
    if cleared.is_none() {
        for (what, found) in leftovers().await {
            broken.push(format!(
                "{what} {LEFTOVER_TIMEOUT:?} after every run settled:\n  {}",
                found.join("\n  ")
            ));
        }
    }

    // The lock's promise, over every run created, deleted ones included.
    let checked = match overlap::check_no_overlap(cp, &ns, &locks).await {
        Ok(checked) => checked,
        Err(overlaps) => {
            let t = tally(&shared);
            let mut context = String::from("what the soak did to these runs, and where they ended:\n");
            for run in overlaps.runs() {
                let end = all.iter().find(|r| r.name_any() == run).map_or_else(|| "gone".into(), describe);
                let _ = writeln!(context, "  {run}: {}\n    now: {end}", t.history(&run));
            }
            broken.push(format!("{overlaps}{context}"));
            overlaps.checked
        }
    };
    if checked.unlabelled > 0 {
        broken
            .push(format!("containers of pods without the {RUN_LABEL} label, so of no known run: {checked}"));
    }
    for lock in LOCKS {
        if checked.pods_on(lock) == 0 {
            broken.push(format!(
                "no container ran on lock {lock}, so the soak proved nothing there: {checked}"
            ));
        }
    }

    report(&all, &shared, &checked, pruned, started);
    assert!(
        broken.is_empty(),
        "{} invariant(s) broken (seed {seed}):\n\n{}",
        broken.len(),
        broken.join("\n\n")
    );
}

/// What should not exist once every run settled, by kind: containers still alive, Leases,
/// pods not finished, and Jobs or ConfigMaps whose run is gone.
async fn leftovers(cp: &ControlPlane, ns: &str) -> Vec<(&'static str, Vec<String>)> {
    let alive: Vec<String> = cp
        .container_lifetimes()
        .into_iter()
        .filter(|l| l.namespace == ns && l.ended.is_none())
        .map(|l| format!("pod {} of run {}", l.pod, l.label(RUN_LABEL).unwrap_or("-")))
        .collect();
    let leases: Vec<String> = list::<Lease>(cp, ns, &ListParams::default())
        .await
        .iter()
        .map(|l| {
            format!("{} held by {:?}", l.name_any(), l.spec.as_ref().and_then(|s| s.holder_identity.clone()))
        })
        .collect();
    let pods: Vec<String> = list::<Pod>(cp, ns, &ListParams::default())
        .await
        .iter()
        .filter(|p| {
            !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
        })
        .map(|p| format!("{} of run {}", p.name_any(), p.labels().get(RUN_LABEL).map_or("-", String::as_str)))
        .collect();
    let existing: BTreeSet<String> =
        list::<NotebookRun>(cp, ns, &ListParams::default()).await.iter().map(|r| r.name_any()).collect();
    let of_gone_run =
        |labels: &BTreeMap<String, String>| labels.get(RUN_LABEL).filter(|r| !existing.contains(*r)).cloned();
    let lp = ListParams::default().labels(RUN_LABEL);
    let mut orphans = Vec::new();
    for job in list::<Job>(cp, ns, &lp).await {
        if let Some(run) = of_gone_run(job.labels()) {
            orphans.push(format!("Job {} of run {run}", job.name_any()));
        }
    }
    for cm in list::<ConfigMap>(cp, ns, &lp).await {
        if let Some(run) = of_gone_run(cm.labels()) {
            orphans.push(format!("ConfigMap {} of run {run}", cm.name_any()));
        }
    }
    [
        ("containers still alive", alive),
        ("Leases left", leases),
        ("pods not finished", pods),
        ("Jobs or ConfigMaps of runs that are gone", orphans),
    ]
    .into_iter()
    .filter(|(_, found)| !found.is_empty())
    .collect()
}

async fn list<K>(cp: &ControlPlane, ns: &str, lp: &ListParams) -> Vec<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(cp.client(), ns);
    api.list(lp).await.unwrap_or_else(|e| panic!("list in {ns}: {e}")).items
}

/// A reflector over the namespace's runs; every run it sees has its lock recorded, so runs the
/// facade creates (and deletes after a 400) count in the overlap check.
fn watch_runs(runs: Api<NotebookRun>, shared: Shared) -> Store<NotebookRun> {
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(runs, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let Ok(watcher::Event::Apply(run) | watcher::Event::InitApply(run) | watcher::Event::Delete(run)) =
                event
            else {
                continue;
            };
            let mut t = tally(&shared);
            t.locks.entry(run.name_any()).or_insert_with(|| run.spec.lock.clone());
            t.last_seen.insert(run.name_any(), run);
        }
    });
    store
}

/// Sets `spec.cancel` on `run` (already gone is fine).
async fn cancel(runs: &Api<NotebookRun>, shared: &Shared, run: &str, why: &str) {
    let patch = json!({"spec": {"cancel": true}});
    match runs.patch(run, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            let mut t = tally(shared);
            t.cancels += 1;
            t.act(run, format!("cancel patched ({why})"));
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("cancel {run}: {e}"),
    }
}

/// Deletes `run` (already gone is fine); it may wait on the lock finalizer before it goes.
async fn delete(runs: &Api<NotebookRun>, shared: &Shared, run: &str, why: &str) {
    match runs.delete(run, &DeleteParams::background()).await {
        Ok(_) => {
            let mut t = tally(shared);
            t.deletes += 1;
            t.act(run, format!("deleted ({why})"));
            t.deleted.insert(run.to_string());
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("delete {run}: {e}"),
    }
}

fn phase_in(store: &Store<NotebookRun>, name: &str) -> String {
    let run = store.state().into_iter().find(|r| r.name_any() == name);
    format!("{:?}", run.and_then(|r| r.phase()))
}

fn stuck_report(runs: &[Arc<NotebookRun>]) -> String {
    runs.iter()
        .filter(|r| !is_terminal(r) || r.metadata.deletion_timestamp.is_some())
        .map(|r| describe(r))
        .collect::<Vec<_>>()
        .join("\n")
}

fn report(all: &[NotebookRun], shared: &Shared, checked: &overlap::Checked, pruned: usize, started: Instant) {
    let t = tally(shared);
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    for run in all {
        let status = run.status.clone().unwrap_or_default();
        let key = format!("{:?}/{:?}", status.phase.unwrap_or(RunPhase::Pending), status.reason);
        *phases.entry(key).or_default() += 1;
    }
    let count = |phase: RunPhase| all.iter().filter(|r| r.phase() == Some(phase)).count();
    eprintln!(
        "soak: done in {:.1}s. {}\n  remaining runs {}: succeeded {}, failed {}, cancelled {}, rejected {}; \
         deleted (gone) {}, pruned by the history limit {pruned}\n  by phase/reason: {phases:?}\n  {checked}",
        started.elapsed().as_secs_f64(),
        t.summary(),
        all.len(),
        count(RunPhase::Succeeded),
        count(RunPhase::Failed),
        count(RunPhase::Cancelled),
        count(RunPhase::Rejected),
        t.deleted.len(),
    );
}

// === the instrument ===

/// The soak trusts what the test kubelet records: check it on plain pods first.
#[tokio::test]
async fn the_node_records_each_container_lifetime_and_kills_what_it_left_behind() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("lifetimes").await;
    let pods: Api<Pod> = ns.api();
    let dir = tempfile::tempdir().expect("a folder for the stray's pid");
    let pod = |name: &str, script: &str| -> Pod {
        from_json(json!({
            "metadata": {"name": name, "labels": {RUN_LABEL: name}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "busybox:1", "command": ["/bin/sh", "-c", script],
                "env": [{"name": "PID_DIR", "value": dir.path().display().to_string()}],
            }]},
        }))
    };
    // A process in a session of its own, as a Jupyter kernel is: it must die with the container.
    let escapes = "setsid sleep 300 & echo $! > \"$PID_DIR/stray\"; sleep 1";
    pods.create(&PostParams::default(), &pod("escapes", escapes)).await.expect("create pod");
    pods.create(&PostParams::default(), &pod("sleeps", "exec sleep 300")).await.expect("create pod");
    let lifetime =
        |name: &str| cp.container_lifetimes().into_iter().find(|l| l.namespace == *ns && l.pod == name);
    let sleeping = wait_for(TIMEOUT, "sleeps to start", || async { lifetime("sleeps") }).await;
    assert_eq!((sleeping.container.as_str(), sleeping.label(RUN_LABEL)), ("main", Some("sleeps")));
    assert_eq!(sleeping.ended, None, "alive: {sleeping:?}");

    wait_for(TIMEOUT, "escapes to succeed", || async {
        pods.get("escapes").await.ok().and_then(|p| p.status?.phase).is_some_and(|p| p == "Succeeded")
    })
    .await;
    let stray: u32 =
        std::fs::read_to_string(dir.path().join("stray")).expect("the stray's pid").trim().parse().unwrap();
    assert!(
        !process::is_alive(stray),
        "the process that left the container's group died before the pod was reported done"
    );
    let escaped = lifetime("escapes").expect("recorded");
    let lived = escaped.ended.expect("ended once reported Succeeded") - escaped.started;
    assert!(lived >= Duration::from_secs(1), "it slept 1s: {lived:?}");

    pods.delete("sleeps", &DeleteParams::default().grace_period(1)).await.expect("delete pod");
    wait_for(TIMEOUT, "sleeps gone", || async { pods.get_opt("sleeps").await.is_ok_and(|p| p.is_none()) })
        .await;
    let gone = lifetime("sleeps").expect("a deleted pod's lifetime is kept");
    assert!(gone.ended.is_some_and(|end| end > sleeping.started), "{gone:?}");
    assert_eq!(gone.pod_uid, sleeping.pod_uid);
}
