//! Retention: each lock keeps its newest finished runs (`--history-limit`), older ones are
//! deleted with background propagation, so their Job, pods and ConfigMaps go with them by
//! garbage collection. The choice is a pure `select` over the settled runs' index (history.rs;
//! no list per pass);
//! the loop around it runs when a run finishes and on a slow tick, at most once a second, and
//! also recounts the running gauge there, so no reconcile scans the cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::future::Shared;
use kube::api::{DeleteParams, Preconditions, PropagationPolicy};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::history::{Entry, Key};
use crate::crd::{NotebookRun, RunPhase};

/// Runs created by a NotebookSchedule carry this label; the schedule prunes them itself.
pub const SCHEDULE_LABEL: &str = "notebooks.dev/schedule";
const SCHEDULE_KIND: &str = "NotebookSchedule";
/// Passes are at most this often, however many runs finish.
const MIN_PASS_INTERVAL: Duration = Duration::from_secs(1);
/// A pass also runs on this tick: it recounts the running gauge and prunes runs whose
/// notifications were still pending at the last pass.
const TICK: Duration = Duration::from_secs(15);

/// How many finished runs each lock keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryLimit {
    /// The newest N finished runs of each lock are kept (0: none, each run goes once finished).
    Keep(usize),
    /// Nothing is pruned.
    Unlimited,
}

impl Default for HistoryLimit {
    fn default() -> Self {
        Self::Keep(100)
    }
}

/// Parses `--history-limit`: a count (0 keeps none) or `unlimited`.
pub fn parse_history_limit(text: &str) -> Result<HistoryLimit, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("unlimited") {
        return Ok(HistoryLimit::Unlimited);
    }
    text.parse::<usize>()
        .map(HistoryLimit::Keep)
        .map_err(|_| format!("{text:?}: expected a count of finished runs (0 or more) or `unlimited`"))
}

/// Whether retention may delete this run: finished, not already going, not left to its own
/// TTL (`ttlSecondsAfterFinished` wins) or to its schedule's history limits, and with no
/// notification still to deliver (the next pass takes it).
pub fn prunable(run: &NotebookRun) -> bool {
    run.is_finished()
        && run.metadata.deletion_timestamp.is_none()
        && run.spec.ttl_seconds_after_finished.is_none()
        && !scheduled(run)
        && crate::notify::due(run).is_empty()
}

fn scheduled(run: &NotebookRun) -> bool {
    run.labels().contains_key(SCHEDULE_LABEL)
        || run.owner_references().iter().any(|o| o.kind == SCHEDULE_KIND)
}

/// The runs to delete so that each lock (namespace and `spec.lock`) keeps its `limit` newest
/// prunable runs (the settled ones `History` keeps): newest by completion time, then creation
/// time, then name.
pub(super) fn select<'a>(
    runs: impl IntoIterator<Item = (&'a Key, &'a Entry)>,
    limit: usize,
) -> Vec<ObjectRef<NotebookRun>> {
    type Lock<'a> = (&'a Option<String>, &'a str);
    let mut by_lock: HashMap<Lock<'a>, Vec<(&Key, &Entry)>> = HashMap::new();
    for (key, entry) in runs {
        by_lock.entry((&key.0, entry.lock.as_str())).or_default().push((key, entry));
    }
    let mut doomed = Vec::new();
    for mut finished in by_lock.into_values() {
        if finished.len() <= limit {
            continue;
        }
        finished.sort_by_key(|(key, e)| std::cmp::Reverse((e.done, e.created, key.1.as_str())));
        doomed.extend(finished[limit..].iter().map(|((ns, name), e)| {
            let mut run = ObjectRef::new(name);
            if let Some(ns) = ns {
                run = run.within(ns);
            }
            run.extra.uid = e.uid.clone();
            run
        }));
    }
    doomed
}

/// How many cached runs execute now (the running gauge).
pub fn count_running<'a>(runs: impl IntoIterator<Item = &'a NotebookRun>) -> usize {
    runs.into_iter().filter(|r| r.phase() == Some(RunPhase::Running)).count()
}

/// Wakes the retention loop; cheap, and many wakes before a pass make one pass.
#[derive(Clone, Default)]
pub struct Pruner(Arc<Notify>);

impl Pruner {
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// The retention loop: one pass at start-up once the cache has synced (`synced` turns true),
/// then one after wakes (rate-limited) and on each tick.
pub(super) async fn run(
    ctx: Arc<super::Context>,
    mut synced: tokio::sync::watch::Receiver<bool>,
    shutdown: Shared<BoxFuture<'static, ()>>,
) {
    tokio::select! {
        () = shutdown.clone() => return,
        ready = synced.wait_for(|synced| *synced) => if ready.is_err() { return },
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.clone() => return,
            () = ctx.pruner.0.notified() => {}
            _ = tick.tick() => {}
        }
        pass(&ctx, ctx.config.history_limit).await;
        tokio::select! {
            () = shutdown.clone() => return,
            () = tokio::time::sleep(MIN_PASS_INTERVAL) => {}
        }
    }
}

async fn pass(ctx: &super::Context, limit: HistoryLimit) {
    let (client, metrics) = (&ctx.client, &ctx.metrics);
    let running = count_running(ctx.runs.state().iter().filter_map(|g| g.0.as_ref().ok()));
    metrics.set_running(i64::try_from(running).unwrap_or(i64::MAX));
    let HistoryLimit::Keep(limit) = limit else { return };
    if !ctx.leadership.is_leading() {
        return;
    }
    let doomed = ctx.history.read(|runs| select(runs, limit));
    for run in doomed {
        let ns = run.namespace.clone().unwrap_or_default();
        let api: Api<NotebookRun> = Api::namespaced(client.clone(), &ns);
        // Only the run that was selected: a new run of the same name is not touched.
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            preconditions: Some(Preconditions { uid: run.extra.uid.clone(), resource_version: None }),
            ..Default::default()
        };
        match api.delete(&run.name, &dp).await {
            Ok(_) => {
                info!(run = %run.name, ns = %ns, limit, "history limit reached: run deleted");
                metrics.run_pruned();
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                debug!(run = %run.name, ns = %ns, "already gone or replaced")
            }
            Err(e) => warn!(run = %run.name, ns = %ns, error = %e, "pruning failed (next pass retries)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::NotebookRunStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(second).unwrap())
    }

    /// A run on `lock` created at `created`, finished at `done` (None: still running).
    fn run(name: &str, lock: &str, created: i64, done: Option<i64>) -> NotebookRun {
        let mut r = NotebookRun::new(
            name,
            serde_json::from_value(serde_json::json!({"notebook": {"path": "/nb"}, "lock": lock})).unwrap(),
        );
        r.metadata.namespace = Some("ns".into());
        r.metadata.uid = Some(format!("uid-{name}"));
        r.metadata.creation_timestamp = Some(at(created));
        r.status = Some(NotebookRunStatus {
            phase: Some(if done.is_some() { RunPhase::Succeeded } else { RunPhase::Running }),
            completion_time: done.map(at),
            ..Default::default()
        });
        r
    }

    /// What a pass picks among `runs`, once they went through the run cache's routing.
    fn pick(runs: &[NotebookRun], limit: usize) -> Vec<ObjectRef<NotebookRun>> {
        let history = super::super::history::History::default();
        for run in runs {
            history
                .observe(kube::runtime::watcher::Event::Apply(kube::core::DeserializeGuard(Ok(run.clone()))));
        }
        history.read(|settled| select(settled, limit))
    }

    fn names(refs: Vec<ObjectRef<NotebookRun>>) -> Vec<String> {
        let mut names: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    #[test]
    fn each_lock_keeps_its_newest_finished_runs() {
        let runs = [
            run("a1", "a", 1, Some(10)),
            run("a2", "a", 2, Some(20)),
            run("a3", "a", 3, Some(30)),
            run("a4", "a", 4, Some(40)),
            run("b1", "b", 1, Some(5)),
            run("a-running", "a", 0, None),
        ];
        let doomed = pick(&runs, 2);
        assert_eq!(names(doomed.clone()), ["a1", "a2"]);
        assert_eq!(doomed[0].extra.uid.as_deref().map(|u| u.starts_with("uid-a")), Some(true));
        assert_eq!(names(pick(&runs, 4)), Vec::<String>::new());
        assert_eq!(names(pick(&runs, 0)), ["a1", "a2", "a3", "a4", "b1"], "0 keeps none");
    }

    #[test]
    fn newest_is_by_finish_time_then_creation_then_name() {
        // Created late, finished early: the oldest by finish time goes first.
        let runs = [run("late", "l", 9, Some(10)), run("early", "l", 1, Some(50))];
        assert_eq!(names(pick(&runs, 1)), ["late"]);
        // Same finish second: the older creation goes.
        let runs = [run("x", "l", 2, Some(10)), run("y", "l", 1, Some(10))];
        assert_eq!(names(pick(&runs, 1)), ["y"]);
        let runs = [run("b", "l", 1, Some(10)), run("a", "l", 1, Some(10))];
        assert_eq!(names(pick(&runs, 1)), ["a"]);
    }

    #[test]
    fn locks_are_per_namespace() {
        let mut other = run("other-ns", "a", 1, Some(1));
        other.metadata.namespace = Some("elsewhere".into());
        let runs = [other, run("mine", "a", 2, Some(2))];
        assert_eq!(names(pick(&runs, 1)), Vec::<String>::new());
    }

    #[test]
    fn unfinished_ttl_scheduled_and_deleting_runs_are_never_selected() {
        let mut ttl = run("ttl", "a", 1, Some(1));
        ttl.spec.ttl_seconds_after_finished = Some(3600);
        let mut labelled = run("labelled", "a", 1, Some(1));
        labelled.metadata.labels = Some([(SCHEDULE_LABEL.to_string(), "nightly".to_string())].into());
        let mut owned = run("owned", "a", 1, Some(1));
        owned.metadata.owner_references = Some(vec![OwnerReference {
            kind: SCHEDULE_KIND.into(),
            name: "nightly".into(),
            ..Default::default()
        }]);
        let mut deleting = run("deleting", "a", 1, Some(1));
        deleting.metadata.deletion_timestamp = Some(at(5));
        let mut queued = run("queued", "a", 1, None);
        queued.status.as_mut().unwrap().phase = Some(RunPhase::Queued);
        let pending = run("pending", "a", 1, None);
        let mut no_status = run("new", "a", 1, None);
        no_status.status = None;
        let runs = [ttl, labelled, owned, deleting, queued, pending, no_status];
        assert_eq!(names(pick(&runs, 0)), Vec::<String>::new());
        assert_eq!(count_running(&runs), 1);
    }

    #[test]
    fn every_terminal_phase_counts_as_finished() {
        let mut runs: Vec<NotebookRun> = [RunPhase::Failed, RunPhase::Cancelled, RunPhase::Rejected]
            .into_iter()
            .enumerate()
            .map(|(i, phase)| {
                let mut r = run(&format!("r{i}"), "a", i as i64, Some(i as i64));
                r.status.as_mut().unwrap().phase = Some(phase);
                r
            })
            .collect();
        runs.push(run("newest", "a", 9, Some(9)));
        assert_eq!(names(pick(&runs, 1)), ["r0", "r1", "r2"]);
    }

    #[test]
    fn history_limits_parse() {
        assert_eq!(parse_history_limit("100"), Ok(HistoryLimit::Keep(100)));
        assert_eq!(parse_history_limit("0"), Ok(HistoryLimit::Keep(0)));
        assert_eq!(parse_history_limit("Unlimited"), Ok(HistoryLimit::Unlimited));
        assert!(parse_history_limit("-1").unwrap_err().contains("unlimited"));
        assert!(parse_history_limit("ten").is_err());
        assert_eq!(HistoryLimit::default(), HistoryLimit::Keep(100));
    }
}
