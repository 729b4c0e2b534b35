//! The controller: reconciles each NotebookRun into a Lease (the lock), an inputs ConfigMap and
//! a Job, and its status from the Job, the pod and the runner's log. Orchestration only: the
//! decisions are in `lock`, `job` and `status`; each step of the lifecycle has its own file:
//! `admit` (lock, inputs, Job), `running` (progress, start window), `stop` (pods gone before the
//! lock goes: cancel, deletion, the finalizer), `finish` (outcome, notebook, release, TTL) and
//! `record` (status writes and Events).

mod admit;
pub(crate) mod cache;
mod finish;
mod history;
mod logs;
pub mod prune;
mod record;
mod results;
mod running;
mod stop;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PropagationPolicy};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::crd::{NotebookRun, NotebookRunStatus, RunPhase};
use crate::job::{self, JobConfig};
use crate::leader::Leadership;
use crate::metrics::Metrics;

pub const FIELD_MANAGER: &str = "notebook-operator";
/// Held by a run from before it takes the lock until it has released it: deleting the run
/// cannot free the lock while one of its pods still executes.
pub const LOCK_FINALIZER: &str = "notebooks.dev/lock";
const REPLACED_BY: &str = "notebooks.dev/replaced-by";
/// Runs per page of the run cache's initial list (kube's default is 500): inline notebooks
/// (up to 1 MB each) are dropped page by page, so the decoding peak stays bounded.
const LIST_PAGE_SIZE: u32 = 100;
/// Reconciles at once (kube-runtime's default is unbounded).
const RECONCILE_CONCURRENCY: u16 = 32;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub job: JobConfig,
    /// Watch one namespace, or all when None.
    pub namespace: Option<String>,
    /// How often a running run's progress is read from its log.
    pub progress_interval: Duration,
    /// How long a cancelled run's pod gets to save its partial notebook.
    pub cancel_grace: Duration,
    /// Webhooks when runs end (`spec.notify`).
    pub notify: crate::notify::NotifyConfig,
    /// Finished runs kept per lock (`--history-limit`).
    pub history_limit: prune::HistoryLimit,
    /// Where executed notebooks, reports and logs are kept (`--results-store`).
    pub results: crate::results::ResultsStore,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "ClientError",
            Error::Invalid(_) => "InvalidObject",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

type RunKey = ObjectRef<DeserializeGuard<NotebookRun>>;

pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Runs that still need reconciles; settled ones are in `history`.
    pub runs: Store<DeserializeGuard<NotebookRun>>,
    /// What retention reads of settled runs (history.rs).
    history: Arc<history::History>,
    /// Whether this process may reconcile (elected, or the only controller).
    pub leadership: Leadership,
    /// Consecutive reconcile failures per run, for exponential backoff.
    pub failures: Mutex<HashMap<RunKey, u32>>,
    /// Log followers of cancelled runs (by run uid): they keep the partial notebook the runner
    /// prints on SIGTERM, outside the reconcile, which never waits on a pod.
    followers: Mutex<HashMap<String, stop::Follower>>,
    /// Since when a run that had a pod has had none (by run uid): the start window of a retried
    /// pod. Lost on restart, which only lengthens the window.
    no_pod_since: Mutex<HashMap<String, jiff::Timestamp>>,
    /// Wakes the retention loop when a run finishes.
    pruner: prune::Pruner,
    /// Namespaces where this process created or found the shared runner ConfigMap.
    runners: Mutex<HashSet<String>>,
    /// Failed attempts at deleting a deleted run's objects from the s3 store (by run uid).
    results_deletes: Mutex<HashMap<String, u32>>,
}

/// Readiness of the controller: true once the run cache has synced.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// A standby replica is healthy while it waits to lead.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    metrics: Metrics,
    readiness: Readiness,
    leadership: Leadership,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // One shutdown signal for every loop of the controller (each gets a clone).
    let shutdown = shutdown.boxed().shared();
    let runs: Api<DeserializeGuard<NotebookRun>> = scoped(&client, config.namespace.as_deref());
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=notebook-operator");
    // The cache keeps slimmed runs (cache.rs): no managed fields, no inline notebooks.
    let (store, writer) = reflector::store();
    // Synced when the first list is in: readiness and retention learn it from the stream, not
    // from a second waiter on the store (kube-runtime's store wakes one waiter only, the
    // Controller's own, so `/readyz` never turned 200).
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let pruner = prune::Pruner::default();
    // Settled runs (finished, holding nothing) leave the cache for retention's compact index.
    let history = Arc::new(history::History::new(pruner.clone()));
    let run_events = watcher(runs, watcher::Config::default().page_size(LIST_PAGE_SIZE))
        .default_backoff()
        .modify(cache::slim_guard);
    let run_events = history
        .clone()
        .route(run_events)
        .reflect(writer)
        .inspect(move |event| {
            if matches!(event, Ok(watcher::Event::InitDone)) && !readiness.is_ready() {
                readiness.set_ready();
                synced_tx.send_replace(true);
                info!("run cache synced: ready");
            }
        })
        .applied_objects();
    // Bounded: a restart over thousands of finished runs does not reconcile them all at once.
    let controller = Controller::for_stream(run_events, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
    let lease_store = store.clone();
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "notebook-operator".into(), instance: std::env::var("POD_NAME").ok() },
    );
    let notify_loop = crate::notify::run(
        client.clone(),
        config.notify.clone(),
        config.namespace.clone(),
        metrics.clone(),
        leadership.clone(),
        shutdown.clone(),
    );
    let schedules_loop =
        crate::schedule::run(client.clone(), config.namespace.clone(), leadership.clone(), shutdown.clone());
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: config.clone(),
        metrics,
        recorder,
        runs: store,
        history,
        leadership,
        failures: Default::default(),
        followers: Default::default(),
        no_pod_since: Default::default(),
        pruner,
        runners: Default::default(),
        results_deletes: Default::default(),
    });
    let prune_loop = prune::run(ctx.clone(), synced, shutdown.clone());
    let runs_loop = controller
        .owns(scoped::<Job>(&client, config.namespace.as_deref()), managed.clone())
        // Pods wake their run: a pod that stopped lets a stopping run release the lock.
        // Children are watched for their metadata only: they wake runs, nothing caches them.
        .watches_stream(
            watcher(scoped::<PartialObjectMeta<Pod>>(&client, config.namespace.as_deref()), managed.clone())
                .touched_objects(),
            |pod| {
                let run = pod.labels().get(job::RUN_LABEL).cloned();
                run.map(|r| ObjectRef::new(&r).within(&pod.namespace().unwrap_or_default()))
            },
        )
        // A released (deleted) Lease wakes the runs waiting for it at once (a foreign Lease is
        // not watched: node heartbeats would wake the scan below every few seconds; those runs poll).
        // Only the keys of the waiting runs are copied, never the runs.
        .watches_stream(
            watcher(scoped::<PartialObjectMeta<Lease>>(&client, config.namespace.as_deref()), managed)
                .touched_objects(),
            move |lease| {
                let (ns, lock) = (lease.namespace(), lease.name_any());
                lease_store
                    .state()
                    .iter()
                    .filter(|g| {
                        g.0.as_ref().is_ok_and(|r| {
                            r.spec.lock == lock && !r.is_finished() && r.metadata.namespace == ns
                        })
                    })
                    .map(|g| ObjectRef::from_obj(g.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile failed");
            }
        });
    // The other loops of the controller (schedules, notifications) join here, each with
    // `shutdown.clone()` and the same `leadership`.
    tokio::join!(runs_loop, notify_loop, prune_loop, schedules_loop);
}

/// The API of `K` in one namespace, or in all when None.
pub(crate) fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

pub fn error_policy(guard: Arc<DeserializeGuard<NotebookRun>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(error.reason());
    let key = ObjectRef::from_obj(guard.as_ref());
    let failures = {
        let mut counts = locked(&ctx.failures);
        let n = counts.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    // An unreachable API server (a restart, a network blip) is retried at least every few
    // seconds, so runs move on soon after it returns; refusals back off up to minutes.
    let cap = match error {
        Error::Kube(kube::Error::Api(_)) | Error::Invalid(_) => MAX_BACKOFF,
        Error::Kube(_) => MAX_BACKOFF_UNREACHABLE,
    };
    let delay = backoff(failures).min(cap);
    let name = guard.0.as_ref().map(|r| r.name_any()).unwrap_or_default();
    warn!(run = %name, reason = error.reason(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

const MAX_BACKOFF: Duration = Duration::from_secs(300);
const MAX_BACKOFF_UNREACHABLE: Duration = Duration::from_secs(4);

/// Exponential backoff: 500ms after the first failure, doubling, at most 5 minutes.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(10);
    (Duration::from_millis(500) * 2u32.pow(exp)).min(MAX_BACKOFF)
}

/// One pass over a run: read the world, move the run one step along its lifecycle.
pub async fn reconcile(guard: Arc<DeserializeGuard<NotebookRun>>, ctx: Arc<Context>) -> Result<Action> {
    let run = match &guard.0 {
        Ok(run) => run,
        Err(invalid) => {
            // One malformed object must not break the watch: report it and wait for a fix.
            warn!(error = %invalid.error, "skipping a NotebookRun that does not parse");
            return Ok(Action::await_change());
        }
    };
    if !ctx.leadership.is_leading() {
        // A leader whose lease ran out stops at once; the next leader takes the run from here.
        return Ok(Action::await_change());
    }
    let span = info_span!("reconcile", run = %run.name_any(), ns = %run.namespace().unwrap_or_default());
    let r = Reconciler { run, ctx: &ctx, ns: run.namespace().unwrap_or_default() };
    let action = async move {
        if run.metadata.deletion_timestamp.is_some() {
            return r.deleting().await;
        }
        match r.phase() {
            Some(p) if p.is_terminal() => r.finished().await,
            Some(RunPhase::Running) => r.running().await,
            _ => r.admit().await,
        }
    }
    .instrument(span)
    .await?;
    locked(&ctx.failures).remove(&ObjectRef::from_obj(guard.as_ref()));
    // The running gauge moves with each transition (record.rs) and is recounted from the cache
    // by the retention loop (prune.rs), not here: no reconcile scans the cache.
    Ok(action)
}

/// One run being reconciled; its methods are spread over this module's files, one step each.
struct Reconciler<'a> {
    run: &'a NotebookRun,
    ctx: &'a Context,
    ns: String,
}

// === impl Reconciler ===

impl Reconciler<'_> {
    fn phase(&self) -> Option<RunPhase> {
        self.run.phase()
    }

    fn status(&self) -> NotebookRunStatus {
        self.run.status.clone().unwrap_or_default()
    }

    fn name(&self) -> String {
        self.run.name_any()
    }

    fn uid(&self) -> String {
        self.run.uid().unwrap_or_default()
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    fn cancel_reason(&self) -> crate::crd::Reason {
        if self.run.annotations().contains_key(REPLACED_BY) {
            crate::crd::Reason::Replaced
        } else {
            crate::crd::Reason::Cancelled
        }
    }

    fn cancel_message(&self) -> String {
        match self.run.annotations().get(REPLACED_BY) {
            Some(by) => format!("replaced by {by}"),
            None => "cancelled on request (spec.cancel)".into(),
        }
    }
}

fn background() -> DeleteParams {
    DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() }
}

fn ignore_not_found<T>(result: kube::Result<T>) -> kube::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(ae)) if ae.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

/// Whether an object names this very run (same uid) as its owner.
fn owned_by(meta: &ObjectMeta, run: &NotebookRun) -> bool {
    meta.owner_references.iter().flatten().any(|o| Some(&o.uid) == run.uid().as_ref())
}

/// Whether an object was left by an earlier, deleted run of the same name: the garbage collector
/// takes it soon, so the run waits instead of failing.
fn left_by_namesake(meta: &ObjectMeta, run: &NotebookRun) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "NotebookRun" && o.name == run.name_any() && Some(&o.uid) != run.uid().as_ref())
}

/// API answers that retrying the same request cannot change: the controller, the schedules and
/// the notifications give up on these (400, 403, 413 too large, 422 invalid).
pub(crate) fn is_permanent(code: u16) -> bool {
    matches!(code, 400 | 403 | 413 | 422)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(super::backoff(1), Duration::from_millis(500));
        assert_eq!(super::backoff(2), Duration::from_secs(1));
        assert_eq!(super::backoff(4), Duration::from_secs(4));
        assert_eq!(super::backoff(30), Duration::from_secs(300));
    }
}
