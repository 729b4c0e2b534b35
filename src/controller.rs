//! The controller: reconciles each NotebookRun into a Lease (the lock), an inputs ConfigMap and
//! a Job, and its status from the Job, the pod and the runner's log. Orchestration only: the
//! decisions are in `lock`, `job` and `status`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::crd::{
    ConcurrencyPolicy, NotebookRun, NotebookRunStatus, OutputRef, Progress, Reason, RunPhase, parse_duration,
};
use crate::job::{self, JobConfig};
use crate::lock::{self, Decision};
use crate::metrics::Metrics;
use crate::progress;
use crate::status::{self, Outcome};

pub const FIELD_MANAGER: &str = "notebook-operator";
const REPLACED_BY: &str = "notebooks.dev/replaced-by";
/// Largest gzip'd notebook kept in the output ConfigMap (ConfigMaps hold at most 1 MiB).
const MAX_OUTPUT_GZ: usize = 900 * 1024;
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(600);
/// What the inputs ConfigMap may hold (ConfigMaps hold at most 1 MiB, metadata included).
const MAX_INPUTS_BYTES: usize = 1_000_000;
/// Log lines searched for the newest progress event (a chatty cell prints many between polls).
const PROGRESS_TAIL_LINES: i64 = 1000;
/// Log lines searched for the trailer: stderr (the failure's traceback) may land after it.
const TRAILER_TAIL_LINES: i64 = 500;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub job: JobConfig,
    /// Watch one namespace, or all when None.
    pub namespace: Option<String>,
    /// How often a running run's progress is read from its log.
    pub progress_interval: Duration,
    /// How long a cancelled run's pod gets to save its partial notebook.
    pub cancel_grace: Duration,
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

pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub runs: Store<DeserializeGuard<NotebookRun>>,
    /// Consecutive reconcile failures per run, for exponential backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<DeserializeGuard<NotebookRun>>, u32>>,
}

/// Readiness of the controller: true once the run cache has synced.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let runs: Api<DeserializeGuard<NotebookRun>> = scoped(&client, config.namespace.as_deref());
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=notebook-operator");
    let controller = Controller::new(runs, watcher::Config::default());
    let store = controller.store();
    let lease_store = store.clone();
    let ready_store = store.clone();
    tokio::spawn(async move {
        if ready_store.wait_until_ready().await.is_ok() {
            readiness.0.store(true, Ordering::Relaxed);
            info!("run cache synced: ready");
        }
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "notebook-operator".into(), instance: std::env::var("POD_NAME").ok() },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: config.clone(),
        metrics,
        recorder,
        runs: store,
        failures: Default::default(),
    });
    controller
        .owns(scoped::<Job>(&client, config.namespace.as_deref()), managed.clone())
        .watches(scoped::<Pod>(&client, config.namespace.as_deref()), managed.clone(), |pod| {
            let run = pod.labels().get(job::RUN_LABEL).cloned();
            run.map(|r| ObjectRef::new(&r).within(&pod.namespace().unwrap_or_default()))
        })
        // A released (deleted) Lease wakes the runs waiting for it at once.
        .watches(scoped::<Lease>(&client, config.namespace.as_deref()), managed, move |lease| {
            let ns = lease.namespace();
            let lock = lease.name_any();
            lease_store
                .state()
                .into_iter()
                .filter_map(|g| g.0.as_ref().ok().cloned())
                .filter(|r| r.namespace() == ns && r.spec.lock == lock)
                .filter(|r| !r.is_finished())
                .map(|r| ObjectRef::from_obj(&DeserializeGuard(Ok(r))))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile failed");
            }
        })
        .await;
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
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
        let mut counts = ctx.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    let name = guard.0.as_ref().map(|r| r.name_any()).unwrap_or_default();
    warn!(run = %name, reason = error.reason(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Exponential backoff: 500ms after the first failure, doubling, at most 5 minutes.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(10);
    (Duration::from_millis(500) * 2u32.pow(exp)).min(Duration::from_secs(300))
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
    if run.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change()); // children and the Lease go by garbage collection
    }
    let span = info_span!("reconcile", run = %run.name_any(), ns = %run.namespace().unwrap_or_default());
    let r = Reconciler { run, ctx: &ctx, ns: run.namespace().unwrap_or_default() };
    let action = async move {
        match r.phase() {
            Some(p) if p.is_terminal() => r.finished().await,
            Some(RunPhase::Running) => r.running().await,
            _ => r.admit().await,
        }
    }
    .instrument(span)
    .await?;
    ctx.failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&ObjectRef::from_obj(guard.as_ref()));
    // The gauge counts what the cluster holds, so it survives controller restarts.
    let running = ctx
        .runs
        .state()
        .iter()
        .filter(|g| g.0.as_ref().is_ok_and(|r| r.phase() == Some(RunPhase::Running)))
        .count();
    ctx.metrics.set_running(i64::try_from(running).unwrap_or(i64::MAX));
    Ok(action)
}

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

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    fn same_namespace_runs(&self) -> Vec<NotebookRun> {
        self.ctx
            .runs
            .state()
            .into_iter()
            .filter_map(|g| g.0.as_ref().ok().cloned())
            .filter(|r| r.namespace().as_deref() == Some(self.ns.as_str()))
            .collect()
    }

    /// Not started yet: take the lock (or queue, reject, replace), check inputs, create the Job.
    async fn admit(&self) -> Result<Action> {
        if self.run.spec.cancel {
            self.transition(
                RunPhase::Cancelled,
                Reason::Cancelled,
                "cancelled before it started".into(),
                |_| {},
            )
            .await?;
            return Ok(Action::requeue(Duration::from_millis(10)));
        }
        let leases: Api<Lease> = self.api();
        let lease = leases.get_opt(&self.run.spec.lock).await?;
        let runs = self.same_namespace_runs();
        match lock::decide(self.run, lease.as_ref(), runs.iter()) {
            Decision::Owned => self.start().await,
            Decision::Acquire => {
                if lock::acquire(&leases, self.run).await? {
                    info!(lock = %self.run.spec.lock, "lock acquired");
                    self.start().await
                } else {
                    Ok(Action::requeue(Duration::from_millis(100)))
                }
            }
            Decision::Stale { holder } => {
                if let Some(lease) = &lease
                    && lock::delete_exact(&leases, lease).await?
                {
                    let note = format!(
                        "lock {} was held by {holder}, which is gone or finished",
                        self.run.spec.lock
                    );
                    self.event(EventType::Warning, "LockRecovered", note).await;
                }
                Ok(Action::requeue(Duration::from_millis(50)))
            }
            Decision::HeldBy { holder } => self.wait_for(&holder, true).await,
            Decision::Behind { ahead } => self.wait_for(&ahead, false).await,
        }
    }

    /// The lock is taken: apply the concurrency policy.
    async fn wait_for(&self, other: &str, holds: bool) -> Result<Action> {
        let lock = &self.run.spec.lock;
        match self.run.spec.concurrency_policy {
            ConcurrencyPolicy::Forbid => {
                let message = format!("lock {lock} is held by {other}");
                let holder = other.to_string();
                self.transition(RunPhase::Rejected, Reason::LockHeld, message, |s| {
                    s.blocked_by = Some(holder)
                })
                .await?;
                return Ok(Action::requeue(Duration::from_millis(10)));
            }
            // Replace cancels the holder it found on arrival, once; then it waits its turn like Queue.
            ConcurrencyPolicy::Replace if holds && self.phase() != Some(RunPhase::Queued) => {
                let runs: Api<NotebookRun> = self.api();
                let patch = json!({
                    "metadata": {"annotations": {REPLACED_BY: self.run.name_any()}},
                    "spec": {"cancel": true}
                });
                runs.patch(other, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                info!(holder = other, "replacing the holder of the lock");
            }
            _ => {}
        }
        let message = if holds {
            format!("waiting for lock {lock}, held by {other}")
        } else {
            format!("waiting for lock {lock}, behind {other}")
        };
        let current = self.status();
        if self.phase() != Some(RunPhase::Queued) || current.blocked_by.as_deref() != Some(other) {
            let blocked_by = other.to_string();
            let reason = if holds { Reason::LockHeld } else { Reason::Queued };
            self.transition(RunPhase::Queued, reason, message, |s| s.blocked_by = Some(blocked_by)).await?;
        }
        // Woken at once by the Lease watch; the requeue is a safety net.
        Ok(Action::requeue(Duration::from_secs(30)))
    }

    /// Holds the lock: check the inputs, freeze them, create the Job once.
    async fn start(&self) -> Result<Action> {
        let notebook = match self.notebook_source().await? {
            Ok(nb) => nb,
            Err((reason, message)) => {
                self.transition(RunPhase::Failed, reason, message, |_| {}).await?;
                return Ok(Action::requeue(Duration::from_millis(10)));
            }
        };
        let cms: Api<ConfigMap> = self.api();
        let inputs = job::inputs_config_map(self.run, notebook.as_deref());
        let size: usize = inputs.data.iter().flatten().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_INPUTS_BYTES {
            let message = format!(
                "the run's inputs (notebook, parameters, runner) take {size} bytes; at most {MAX_INPUTS_BYTES} fit a ConfigMap"
            );
            return self.fail_now(Reason::InvalidNotebook, message).await;
        }
        match cms.create(&PostParams::default(), &inputs).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Kept from an earlier pass, or left by a deleted run of the same name until GC takes it.
                let existing = cms.get(&inputs.name_any()).await?;
                if !owned_by(&existing.metadata, self.run) {
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
            }
            Err(kube::Error::Api(e)) if is_permanent(e.code) => {
                return self
                    .fail_now(
                        Reason::InvalidNotebook,
                        format!("the inputs ConfigMap was refused: {}", e.message),
                    )
                    .await;
            }
            Err(e) => return Err(e.into()),
        }
        let jobs: Api<Job> = self.api();
        let desired = job::build(self.run, &self.ctx.config.job);
        let job_name = desired.name_any();
        match jobs.create(&PostParams::default(), &desired).await {
            Ok(_) => info!(job = %job_name, "job created"),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Created by an earlier pass whose status write was lost: adopt it if it is ours;
                // one left by a deleted run of the same name goes by GC: wait for it.
                let existing = jobs.get(&job_name).await?;
                if !owned_by(&existing.metadata, self.run) {
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
            }
            Err(kube::Error::Api(e)) if is_permanent(e.code) => {
                return self.fail_now(Reason::PodFailed, format!("the Job was refused: {}", e.message)).await;
            }
            Err(e) => return Err(e.into()),
        }
        let now = Time(jiff::Timestamp::now());
        self.transition(RunPhase::Running, Reason::Started, format!("job {job_name} created"), |s| {
            s.job_name = Some(job_name.clone());
            s.start_time = Some(now);
            s.blocked_by = None;
            s.progress = None;
        })
        .await?;
        Ok(Action::requeue(self.ctx.config.progress_interval))
    }

    /// Fails the run at once (the next pass releases the lock).
    async fn fail_now(&self, reason: Reason, message: String) -> Result<Action> {
        self.transition(RunPhase::Failed, reason, message, |_| {}).await?;
        Ok(Action::requeue(Duration::from_millis(10)))
    }

    /// The notebook to freeze into the inputs (None for a path inside the image), or why the run fails now.
    async fn notebook_source(&self) -> Result<std::result::Result<Option<String>, (Reason, String)>> {
        let source = &self.run.spec.notebook;
        let text = if let Some(inline) = &source.inline {
            inline.clone()
        } else if let Some(cm_ref) = &source.config_map {
            let cms: Api<ConfigMap> = self.api();
            let Some(cm) = cms.get_opt(&cm_ref.name).await? else {
                return Ok(Err((Reason::NotebookNotFound, format!("ConfigMap {} not found", cm_ref.name))));
            };
            match cm.data.as_ref().and_then(|d| d.get(&cm_ref.key)) {
                Some(t) => t.clone(),
                None => {
                    let message = format!("ConfigMap {} has no key {}", cm_ref.name, cm_ref.key);
                    return Ok(Err((Reason::NotebookNotFound, message)));
                }
            }
        } else {
            return Ok(Ok(None));
        };
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if v.get("cells").is_some_and(serde_json::Value::is_array) => Ok(Ok(Some(text))),
            Ok(_) => {
                Ok(Err((Reason::InvalidNotebook, "the notebook has no cells list: not an ipynb".into())))
            }
            Err(e) => Ok(Err((Reason::InvalidNotebook, format!("the notebook is not valid JSON: {e}")))),
        }
    }

    /// Running: keep the lock, follow the pod, finish from the Job.
    async fn running(&self) -> Result<Action> {
        let status = self.status();
        let Some(job_name) = status.job_name.clone() else { return self.admit().await };
        self.keep_lock().await?;
        let jobs: Api<Job> = self.api();
        let Some(job) = jobs.get_opt(&job_name).await? else {
            let (phase, reason, message) = if self.run.spec.cancel {
                (RunPhase::Cancelled, self.cancel_reason(), "cancelled".to_string())
            } else {
                (
                    RunPhase::Failed,
                    Reason::JobDeleted,
                    format!("job {job_name} was deleted; it is not recreated"),
                )
            };
            // The lock is released only once no pod of this run executes any more.
            self.wait_pods_stopped().await?;
            self.transition(phase, reason, message, |_| {}).await?;
            return Ok(Action::requeue(Duration::from_millis(10)));
        };
        let pod = self.newest_pod().await?;
        if self.run.spec.cancel && status::job_finished(&job).is_none() {
            return self.cancel_running(&jobs, &job_name, pod.as_ref()).await;
        }
        if let Some(outcome) = status::outcome(&job, pod.as_ref()) {
            return self.finish(outcome, pod.as_ref()).await;
        }
        let started = pod.as_ref().is_some_and(|p| pod_phase(p) != "Pending");
        if !started {
            let limit = self.start_timeout();
            let waited = job
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| jiff::Timestamp::now().duration_since(t.0).unsigned_abs())
                .unwrap_or_default();
            if waited < limit {
                return Ok(Action::requeue((limit - waited).min(Duration::from_secs(5))));
            }
            let problem = match &pod {
                Some(p) => status::start_problem(p)
                    .unwrap_or_else(|| format!("pod {} is still Pending", p.name_any())),
                None => format!(
                    "no pod was created for Job {job_name} (quota, admission or a missing ServiceAccount?)"
                ),
            };
            ignore_not_found(jobs.delete(&job_name, &background()).await)?;
            self.wait_pods_stopped().await?;
            let message = format!("the pod did not start within {}s: {problem}", limit.as_secs());
            return self.fail_now(Reason::StartTimeout, message).await;
        }
        if let Some(pod) = &pod {
            self.update_progress(pod).await?;
        }
        Ok(Action::requeue(self.ctx.config.progress_interval))
    }

    /// Waits (bounded by the cancel grace) until no pod of this run is Pending or Running.
    async fn wait_pods_stopped(&self) -> Result<()> {
        let pods: Api<Pod> = self.api();
        let lp = ListParams::default().labels(&format!("{}={}", job::RUN_LABEL, self.run.name_any()));
        let deadline = tokio::time::Instant::now() + self.ctx.config.cancel_grace + Duration::from_secs(10);
        loop {
            let live =
                pods.list(&lp).await?.items.iter().any(|p| matches!(pod_phase(p), "Pending" | "Running"));
            if !live {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                warn!("pods of this run are still running past the grace period");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn start_timeout(&self) -> Duration {
        self.run
            .spec
            .timeouts
            .as_ref()
            .and_then(|t| t.start.as_deref())
            .and_then(parse_duration)
            .unwrap_or(DEFAULT_START_TIMEOUT)
    }

    fn cancel_reason(&self) -> Reason {
        if self.run.annotations().contains_key(REPLACED_BY) { Reason::Replaced } else { Reason::Cancelled }
    }

    /// While running, the Lease must name this run: restore it if it was deleted by hand, renew it.
    async fn keep_lock(&self) -> Result<()> {
        let leases: Api<Lease> = self.api();
        match leases.get_opt(&self.run.spec.lock).await? {
            None => {
                if lock::acquire(&leases, self.run).await? {
                    let note =
                        format!("lock {} was deleted while this run held it; restored", self.run.spec.lock);
                    self.event(EventType::Warning, "LockRecovered", note).await;
                }
            }
            Some(lease) => {
                let spec = lease.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(self.run.name_any().as_str()) {
                    let note = format!(
                        "lock {} names {} while this run executes: two runs may share the lock",
                        self.run.spec.lock,
                        spec.holder_identity.as_deref().unwrap_or("nobody")
                    );
                    warn!("{note}");
                    self.event(EventType::Warning, Reason::LockHeld.as_str(), note).await;
                    return Ok(());
                }
                let stale = spec.renew_time.is_none_or(|t| {
                    jiff::Timestamp::now().duration_since(t.0).unsigned_abs() > Duration::from_secs(15)
                });
                if stale {
                    let patch = json!({"spec": {"renewTime": MicroTime(jiff::Timestamp::now())}});
                    leases.patch(&self.run.spec.lock, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                }
            }
        }
        Ok(())
    }

    async fn newest_pod(&self) -> Result<Option<Pod>> {
        let pods: Api<Pod> = self.api();
        let lp = ListParams::default().labels(&format!("{}={}", job::RUN_LABEL, self.run.name_any()));
        let mut list = pods.list(&lp).await?.items;
        list.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        Ok(list.pop())
    }

    async fn update_progress(&self, pod: &Pod) -> Result<()> {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let pod_name = pod.name_any();
        let status = self.status();
        let mut progress = status.progress.clone();
        if running {
            let pods: Api<Pod> = self.api();
            let lp = LogParams {
                container: Some(job::CONTAINER.into()),
                tail_lines: Some(PROGRESS_TAIL_LINES),
                ..Default::default()
            };
            match pods.logs(&pod_name, &lp).await {
                Ok(log) => {
                    if let Some(p) = progress::latest_progress(&log) {
                        progress = Some(p);
                    }
                }
                Err(e) => debug!(error = %e, "log not readable yet"),
            }
        }
        if progress != status.progress || status.pod_name.as_deref() != Some(pod_name.as_str()) {
            // Never write a cached (possibly stale) status over a newer one: re-read it.
            let runs: Api<NotebookRun> = self.api();
            let mut status = runs.get_status(&self.run.name_any()).await?.status.unwrap_or_default();
            if status.phase != Some(RunPhase::Running) {
                return Ok(());
            }
            status.progress = progress;
            status.pod_name = Some(pod_name);
            self.apply_status(&status).await?;
        }
        Ok(())
    }

    /// Cancel: delete the Job (the pod gets SIGTERM), keep the partial notebook from the log.
    async fn cancel_running(&self, jobs: &Api<Job>, job_name: &str, pod: Option<&Pod>) -> Result<Action> {
        let pods: Api<Pod> = self.api();
        let live_log = match pod {
            Some(p) if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") => {
                let lp = LogParams {
                    container: Some(job::CONTAINER.into()),
                    follow: true,
                    tail_lines: Some(1),
                    ..Default::default()
                };
                pods.log_stream(&p.name_any(), &lp).await.ok()
            }
            _ => None,
        };
        ignore_not_found(jobs.delete(job_name, &background()).await)?;
        let mut notebook = None;
        if let Some(stream) = live_log {
            let mut lines = stream.lines();
            let read = async {
                while let Some(Ok(line)) = lines.next().await {
                    if let progress::Line::Trailer(data) = progress::classify(&line) {
                        notebook = progress::decode_trailer(data).ok();
                    }
                }
            };
            let _ = tokio::time::timeout(self.ctx.config.cancel_grace, read).await;
        }
        let output = match notebook {
            Some(nb) => Some(self.keep_notebook(&nb).await?),
            None => None,
        };
        self.wait_pods_stopped().await?;
        let reason = self.cancel_reason();
        let message = match self.run.annotations().get(REPLACED_BY) {
            Some(by) => format!("replaced by {by}"),
            None => "cancelled on request (spec.cancel)".into(),
        };
        self.transition(RunPhase::Cancelled, reason, message, |s| s.output = output).await?;
        Ok(Action::requeue(Duration::from_millis(10)))
    }

    /// The Job finished: record the outcome and keep the executed notebook from the log trailer.
    async fn finish(&self, outcome: Outcome, pod: Option<&Pod>) -> Result<Action> {
        let mut output = None;
        if let Some(pod) = pod {
            let pods: Api<Pod> = self.api();
            let lp = LogParams {
                container: Some(job::CONTAINER.into()),
                tail_lines: Some(TRAILER_TAIL_LINES),
                ..Default::default()
            };
            if let Ok(log) = pods.logs(&pod.name_any(), &lp).await
                && let Some(nb) = progress::notebook_from_log(&log)
            {
                output = Some(self.keep_notebook(&nb).await?);
            }
        }
        let Outcome { phase, reason, message, error, progress } = outcome;
        let pod_name = pod.map(ResourceExt::name_any);
        self.transition(phase, reason, message, |s| {
            s.error = error;
            if progress.is_some() {
                s.progress = progress;
            } else if phase == RunPhase::Succeeded {
                let total = s.progress.as_ref().map(|p| p.cells_total).unwrap_or_default();
                s.progress = Some(Progress::new(total, total, None));
            }
            s.output = output;
            if pod_name.is_some() {
                s.pod_name = pod_name;
            }
        })
        .await?;
        Ok(Action::requeue(Duration::from_millis(10)))
    }

    /// Stores the executed notebook, gzip, in a ConfigMap owned by the run (outputs cut to fit).
    async fn keep_notebook(&self, notebook: &[u8]) -> Result<OutputRef> {
        let mut gz = progress::gzip(notebook);
        let mut truncated = false;
        if gz.len() > MAX_OUTPUT_GZ {
            truncated = true;
            gz = progress::gzip(&strip_outputs(notebook));
            if gz.len() > MAX_OUTPUT_GZ {
                gz = progress::gzip(
                    b"{\"cells\": [], \"metadata\": {}, \"nbformat\": 4, \"nbformat_minor\": 5}",
                );
            }
        }
        let cms: Api<ConfigMap> = self.api();
        let cm = job::output_config_map(self.run, gz);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut value = serde_json::to_value(&cm).map_err(|e| Error::Invalid(e.to_string()))?;
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("ConfigMap");
        cms.patch(&cm.name_any(), &pp, &Patch::Apply(&value)).await?;
        Ok(OutputRef { config_map: Some(cm.name_any()), truncated })
    }

    /// Finished: the lock is released, and the run goes when its TTL is up.
    async fn finished(&self) -> Result<Action> {
        let leases: Api<Lease> = self.api();
        if lock::release(&leases, self.run).await? {
            info!(lock = %self.run.spec.lock, "lock released");
        }
        let status = self.status();
        if let (Some(ttl), Some(done)) = (self.run.spec.ttl_seconds_after_finished, status.completion_time) {
            let due = done.0 + jiff::SignedDuration::from_secs(i64::from(ttl));
            let now = jiff::Timestamp::now();
            if now >= due {
                let runs: Api<NotebookRun> = self.api();
                ignore_not_found(runs.delete(&self.run.name_any(), &background()).await)?;
                info!(ttl, "TTL after finish reached: run deleted");
                return Ok(Action::await_change());
            }
            return Ok(Action::requeue(due.duration_since(now).unsigned_abs()));
        }
        Ok(Action::await_change())
    }

    /// Moves the run to `phase` with `reason`: status, condition, Event, metrics.
    async fn transition(
        &self,
        phase: RunPhase,
        reason: Reason,
        message: String,
        edit: impl FnOnce(&mut NotebookRunStatus),
    ) -> Result<()> {
        // The cache may lag behind our own last write: start from the stored status, and do not
        // repeat a transition an earlier pass already made (no second Event, metric or startTime).
        let runs: Api<NotebookRun> = self.api();
        let mut status = runs.get_status(&self.run.name_any()).await?.status.unwrap_or_default();
        if status.phase == Some(phase) && (phase == RunPhase::Running || phase.is_terminal()) {
            debug!(phase = phase.as_str(), "transition already made");
            return Ok(());
        }
        let now = Time(jiff::Timestamp::now());
        let was_running = status.phase == Some(RunPhase::Running);
        status.phase = Some(phase);
        status.reason = Some(reason);
        status.message = Some(message.clone());
        status.observed_generation = self.run.metadata.generation;
        if phase.is_terminal() {
            status.completion_time = Some(now.clone());
            status.blocked_by = None;
        }
        status::set_condition(
            &mut status.conditions,
            phase,
            reason,
            &message,
            self.run.metadata.generation,
            now,
        );
        edit(&mut status);
        self.apply_status(&status).await?;
        let kind = if matches!(phase, RunPhase::Failed | RunPhase::Rejected) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.event(kind, reason.as_str(), message).await;
        if phase == RunPhase::Running {
            self.ctx.metrics.run_started();
        }
        if phase.is_terminal() && was_running {
            self.ctx.metrics.run_finished(
                reason,
                status.start_time.map(|t| t.0),
                status.completion_time.map(|t| t.0),
            );
        }
        info!(phase = phase.as_str(), reason = reason.as_str(), "transition");
        Ok(())
    }

    /// Server-side apply of the whole status: fields this manager no longer sets are removed.
    async fn apply_status(&self, status: &NotebookRunStatus) -> Result<()> {
        let runs: Api<NotebookRun> = self.api();
        let patch = json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookRun",
            "metadata": {"name": self.run.name_any()},
            "status": status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        runs.patch_status(&self.run.name_any(), &pp, &Patch::Apply(&patch)).await?;
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.ctx.recorder.publish(&event, &self.run.object_ref(&())).await {
            debug!(error = %e, "could not publish event");
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

/// Whether a child names this very run (same uid) as its owner, not an earlier run of that name.
fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, run: &NotebookRun) -> bool {
    meta.owner_references.iter().flatten().any(|o| Some(&o.uid) == run.uid().as_ref())
}

/// API answers that retrying the same request cannot change.
fn is_permanent(code: u16) -> bool {
    matches!(code, 400 | 403 | 413 | 422)
}

/// The notebook with every cell's outputs removed, marked as truncated.
fn strip_outputs(notebook: &[u8]) -> Vec<u8> {
    let Ok(mut nb) = serde_json::from_slice::<serde_json::Value>(notebook) else { return Vec::new() };
    if let Some(cells) = nb.get_mut("cells").and_then(serde_json::Value::as_array_mut) {
        for cell in cells {
            if let Some(outputs) = cell.get_mut("outputs") {
                *outputs = json!([]);
            }
        }
    }
    nb["metadata"]["notebook_operator"] = json!({"truncated": true, "note": "outputs removed to fit 1 MiB"});
    serde_json::to_vec(&nb).unwrap_or_default()
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

    #[test]
    fn strip_outputs_keeps_sources() {
        let nb = br#"{"cells":[{"cell_type":"code","source":"x","outputs":[{"text":"big"}]}],"metadata":{}}"#;
        let out: serde_json::Value = serde_json::from_slice(&super::strip_outputs(nb)).unwrap();
        assert_eq!(out["cells"][0]["outputs"], serde_json::json!([]));
        assert_eq!(out["cells"][0]["source"], "x");
        assert_eq!(out["metadata"]["notebook_operator"]["truncated"], true);
    }
}
