//! The kubernetes backend: a run is a NotebookRun. `/start` creates one (policy Forbid) and
//! answers once the controller admitted or rejected it; reads come from a reflector cache; the
//! facade never touches Leases or Jobs (the controller is the one writer).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Map, Value, json};
use tracing::{error, info, warn};

use super::lock_index::LockIndex;
use super::{
    Backend, BackendError, LineSplitter, LogStream, MAX_LINE_BYTES, Result, RunInfo, RunPage, Standing,
    paginate, read_line_futures,
};
use crate::crd::{
    ConcurrencyPolicy, ConfigMapNotebook, NotebookRun, NotebookRunSpec, NotebookSource, Reason, RunPhase,
};
use crate::job;
use crate::progress::{self, Line};

pub const CREATED_BY_LABEL: &str = "app.kubernetes.io/created-by";
pub const CREATED_BY_API: &str = "notebook-operator-api";

/// The notebook the facade's runs execute.
#[derive(Clone, Debug)]
pub enum NotebookRef {
    ConfigMap {
        name: String,
        key: String,
    },
    Path(String),
    /// The notebook itself, in the run's spec (the command-line client's `run NOTEBOOK.ipynb`).
    Inline(String),
}

#[derive(Clone, Debug)]
pub struct KubeConfig {
    pub namespace: String,
    pub notebook: NotebookRef,
    pub image: Option<String>,
    pub lock: String,
    /// How long `/start` waits for the controller to admit or reject a run.
    pub admit_timeout: Duration,
    /// How long `/kill` waits for the run to reach Cancelled.
    pub cancel_timeout: Duration,
    /// Where the controller keeps results (`--results-store`): read back from there.
    pub results: crate::results::ResultsStore,
}

pub struct KubeBackend {
    client: Client,
    config: KubeConfig,
    runs: Api<NotebookRun>,
    store: Store<NotebookRun>,
    /// The names of the runs of `config.lock`.
    index: Arc<LockIndex>,
}

// === impl KubeBackend ===

impl KubeBackend {
    /// Starts the reflector over the namespace's NotebookRuns; it runs until `shutdown`.
    pub fn new(
        client: Client,
        config: KubeConfig,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Arc<Self> {
        let runs: Api<NotebookRun> = Api::namespaced(client.clone(), &config.namespace);
        let (store, writer) = reflector::store();
        let index = Arc::new(LockIndex::new(config.lock.clone()));
        let indexer = index.clone();
        // The cache keeps what the facade reads: no managed fields, no inline notebooks (which
        // made it about 190 MiB at 10,000 runs). The index sees each event before the cache.
        let stream = watcher(runs.clone(), watcher::Config::default())
            .default_backoff()
            .modify(crate::controller::cache::strip)
            .inspect(move |event| {
                if let Ok(event) = event {
                    indexer.observe(event);
                }
            })
            .reflect(writer)
            .applied_objects();
        tokio::spawn(async move {
            let drain = stream.for_each(|res| async move {
                if let Err(e) = res {
                    warn!(error = %e, "NotebookRun watch error; retrying");
                }
            });
            tokio::select! {
                () = drain => {},
                () = shutdown => {},
            }
        });
        Arc::new(Self { client, config, runs, store, index })
    }

    fn cached(&self, id: &str) -> Option<Arc<NotebookRun>> {
        self.store.get(&ObjectRef::new(id).within(&self.config.namespace))
    }

    /// Runs of this facade's lock, from the cache (by the index: never a scan of the namespace).
    fn lock_runs(&self) -> Vec<Arc<NotebookRun>> {
        self.index
            .names()
            .iter()
            .filter_map(|id| self.cached(id))
            .filter(|r| r.spec.lock == self.config.lock)
            .collect()
    }

    fn spec(&self, parameters: Option<Map<String, Value>>) -> NotebookRunSpec {
        let notebook = match &self.config.notebook {
            NotebookRef::ConfigMap { name, key } => NotebookSource {
                config_map: Some(ConfigMapNotebook { name: name.clone(), key: key.clone() }),
                ..Default::default()
            },
            NotebookRef::Path(p) => NotebookSource { path: Some(p.clone()), ..Default::default() },
            NotebookRef::Inline(nb) => NotebookSource { inline: Some(nb.clone()), ..Default::default() },
        };
        let mut spec: NotebookRunSpec = serde_json::from_value(json!({"notebook": notebook}))
            .expect("a spec with a notebook deserializes");
        spec.image = self.config.image.clone();
        spec.parameters = parameters;
        spec.lock = self.config.lock.clone();
        spec.concurrency_policy = ConcurrencyPolicy::Forbid;
        spec
    }

    /// Polls the cache (fed by the watch) until `done` holds for run `id`, or `limit` passes.
    async fn wait_cached(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&NotebookRun) -> bool,
    ) -> Option<Arc<NotebookRun>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(run) = self.cached(id).filter(|r| done(r)) {
                return Some(run);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn delete_run(&self, id: &str) {
        let dp = DeleteParams::background();
        if let Err(e) = self.runs.delete(id, &dp).await {
            warn!(run = id, error = %e, "could not delete run");
        }
    }

    /// A failed API call as the facade answers it: the detail (the facade's identity, what the
    /// API server said) goes to the log only; the answer says what failed and where to look.
    fn api_error<'a>(run: &'a str, action: &'static str) -> impl FnOnce(kube::Error) -> BackendError + 'a {
        move |e| match e {
            kube::Error::Api(ae) if ae.code == 404 => BackendError::NotFound(run.to_string()),
            // Validation of the facade's own object (e.g. parameters too large): about the request.
            kube::Error::Api(ae) if ae.code == 400 || ae.code == 422 => {
                warn!(run, action, code = ae.code, error = %ae.message, "invalid for the Kubernetes API");
                BackendError::InvalidInput(ae.message)
            }
            kube::Error::Api(ae) if ae.code == 429 || ae.code >= 500 => {
                error!(run, action, code = ae.code, error = %ae.message, "the Kubernetes API failed");
                BackendError::Unavailable(format!(
                    "the Kubernetes API is unavailable (could not {action}); \
                     try again, or see the facade's log"
                ))
            }
            kube::Error::Api(ae) => {
                let (code, reason) = (ae.code, &ae.reason);
                error!(run, action, code, reason, error = %ae.message, "the Kubernetes API refused");
                BackendError::Internal(format!(
                    "the Kubernetes API refused the request (could not {action}); see the facade's log"
                ))
            }
            e => {
                error!(run, action, error = %e, "the Kubernetes API is unreachable");
                BackendError::Unavailable(format!(
                    "the Kubernetes API is unreachable (could not {action}); \
                     try again, or see the facade's log"
                ))
            }
        }
    }

    async fn pod_of(&self, run: &NotebookRun) -> Result<Option<String>> {
        if let Some(pod) = run.status.as_ref().and_then(|s| s.pod_name.clone()) {
            return Ok(Some(pod));
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let lp = ListParams::default().labels(&format!("{}={}", job::RUN_LABEL, run.name_any()));
        let list = pods.list(&lp).await.map_err(Self::api_error(&run.name_any(), "list the run's pods"))?;
        Ok(list
            .items
            .into_iter()
            .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .map(|p| p.name_any()))
    }
}

pub fn run_info(run: &NotebookRun) -> RunInfo {
    let status = run.status.clone().unwrap_or_default();
    RunInfo {
        id: run.name_any(),
        phase: status.phase.unwrap_or(RunPhase::Pending),
        reason: status.reason,
        message: status.message,
        progress: status.progress,
        error: status.error,
        created_at: run.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(Timestamp::UNIX_EPOCH),
        started_at: status.start_time.map(|t| t.0),
        finished_at: status.completion_time.map(|t| t.0),
        parameters: run.spec.parameters.clone(),
        blocked_by: status.blocked_by,
    }
}

fn standing(run: &NotebookRun) -> Standing<'_> {
    let status = run.status.as_ref();
    Standing {
        phase: run.phase().unwrap_or(RunPhase::Pending),
        created_at: run.metadata.creation_timestamp.as_ref().map(|t| t.0),
        finished_at: status.and_then(|s| s.completion_time.as_ref()).map(|t| t.0),
        id: run.metadata.name.as_deref().unwrap_or_default(),
    }
}

fn admitted(run: &NotebookRun) -> bool {
    run.phase() == Some(RunPhase::Running) || run.is_finished()
}

#[async_trait::async_trait]
impl Backend for Arc<KubeBackend> {
    async fn start(&self, parameters: Option<Map<String, Value>>) -> Result<RunInfo> {
        // Fast path from the cache; the controller remains the arbiter of the lock.
        if let Some(active) =
            self.lock_runs().into_iter().find(|r| r.phase() == Some(RunPhase::Running) && !r.spec.cancel)
        {
            return Err(BackendError::AlreadyRunning(active.name_any()));
        }
        let id = super::new_run_id();
        let mut run = NotebookRun::new(&id, self.spec(parameters));
        run.metadata.labels = Some([(CREATED_BY_LABEL.to_string(), CREATED_BY_API.to_string())].into());
        self.runs.create(&PostParams::default(), &run).await.map_err(|e| match e {
            kube::Error::Api(ae) if ae.code == 404 => {
                error!(run = %id, error = %ae.message, "cannot create runs: namespace or CRD missing");
                BackendError::Internal(format!(
                    "cannot create runs in namespace {}: the namespace or the NotebookRun CRD is missing",
                    self.config.namespace
                ))
            }
            e => KubeBackend::api_error(&id, "create the run")(e),
        })?;
        crate::failpoint::crash_after("after-create");
        let Some(run) = self.wait_cached(&id, self.config.admit_timeout, admitted).await else {
            self.delete_run(&id).await;
            return Err(BackendError::Unavailable(format!(
                "no controller admitted run {id} within {}s: is `notebook-operator controller` running for namespace {}?",
                self.config.admit_timeout.as_secs(),
                self.config.namespace
            )));
        };
        let status = run.status.clone().unwrap_or_default();
        if status.phase == Some(RunPhase::Rejected) && status.reason == Some(Reason::LockHeld) {
            // The original kept no record of refused starts.
            self.delete_run(&id).await;
            let holder = status.blocked_by.unwrap_or_else(|| "another run".into());
            return Err(BackendError::AlreadyRunning(holder));
        }
        info!(run = %id, phase = ?status.phase, "run admitted");
        Ok(run_info(&run))
    }

    async fn latest(&self) -> Result<Option<RunInfo>> {
        Ok(self
            .lock_runs()
            .into_iter()
            .max_by(|a, b| standing(a).cmp_current(&standing(b)))
            .map(|r| run_info(&r)))
    }

    async fn get(&self, id: &str) -> Result<RunInfo> {
        self.cached(id).map(|r| run_info(&r)).ok_or_else(|| BackendError::NotFound(id.to_string()))
    }

    async fn list(&self, limit: usize, continue_token: Option<&str>) -> Result<RunPage> {
        let runs = self.lock_runs().iter().map(|r| run_info(r)).collect();
        paginate(runs, limit, continue_token)
    }

    async fn cancel(&self, id: &str) -> Result<RunInfo> {
        let run = self.cached(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        if run.is_finished() {
            return Ok(run_info(&run));
        }
        let patch = json!({"spec": {"cancel": true}});
        self.runs
            .patch(id, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(KubeBackend::api_error(id, "cancel the run"))?;
        let terminal = |r: &NotebookRun| r.is_finished();
        match self.wait_cached(id, self.config.cancel_timeout, terminal).await {
            Some(run) => Ok(run_info(&run)),
            None => self.get(id).await,
        }
    }

    async fn notebook(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let run = self.cached(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        let Some(name) =
            run.status.as_ref().and_then(|s| s.output.as_ref()).and_then(|o| o.config_map.clone())
        else {
            return Ok(None);
        };
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let Some(cm) =
            cms.get_opt(&name).await.map_err(KubeBackend::api_error(id, "read the executed notebook"))?
        else {
            return Ok(None);
        };
        let gz = cm.binary_data.and_then(|mut d| d.remove(job::OUTPUT_KEY));
        match gz {
            Some(gz) => progress::gunzip(&gz.0).map(Some).map_err(BackendError::internal),
            None => Ok(None),
        }
    }

    async fn logs(&self, id: &str, follow: bool) -> Result<LogStream> {
        let run = self.cached(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        // A finished run's full log is in the s3 store when it has one, pod or no pod (a store
        // that cannot be read leaves the pod log, while the pod exists).
        if run.is_finished()
            && run.status.as_ref().and_then(|s| s.output.as_ref()).is_some_and(|o| o.log.is_some())
            && let Ok(super::Stored::Object(log)) =
                crate::results::stored(&self.config.results, &run, crate::results::ResultObject::Log).await
        {
            return Ok(crate::results::user_log(log));
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.config.namespace);
        // Following a run that has not started its container yet waits for it (bounded).
        let deadline = tokio::time::Instant::now() + self.config.admit_timeout.max(Duration::from_secs(120));
        let pod = loop {
            let run = self.cached(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
            let finished = run.is_finished();
            let pod = match self.pod_of(&run).await? {
                Some(name) => {
                    pods.get_opt(&name).await.map_err(KubeBackend::api_error(id, "read the run's pod"))?
                }
                None => None,
            };
            let started = pod
                .as_ref()
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p != "Pending");
            match pod {
                Some(p) if started || finished => break p.name_any(),
                Some(_) if !follow => {
                    return Err(BackendError::Missing(format!("{id} has not started yet: no log to show")));
                }
                None if finished || !follow => {
                    return Err(BackendError::Missing(format!("{id} has no pod (any more): no log to show")));
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(BackendError::Unavailable(format!("the pod of {id} did not start in time")));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let lp = LogParams { container: Some(job::CONTAINER.into()), follow, ..Default::default() };
        let reader = pods.log_stream(&pod, &lp).await.map_err(|e| match e {
            kube::Error::Api(ae) if ae.code == 404 => {
                BackendError::Missing(format!("{id} has no pod (any more): no log to show"))
            }
            e => KubeBackend::api_error(id, "read the pod log")(e),
        })?;
        // Only what the notebook printed: progress events and the trailer are protocol. Lines are
        // bounded and decoded lossily: a long line or an odd byte never ends the stream.
        let lines = async_stream::try_stream! {
            let mut reader = Box::pin(reader);
            let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
            while read_line_futures(&mut reader, &mut splitter).await? {
                let text = String::from_utf8_lossy(splitter.line());
                if let Line::Output(out) = progress::classify(&text) {
                    yield bytes::Bytes::from(format!("{out}\n"));
                }
            }
        };
        Ok(Box::pin(lines))
    }

    async fn stored(&self, id: &str, object: crate::results::ResultObject) -> Result<super::Stored> {
        let run = self.cached(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        crate::results::stored(&self.config.results, &run, object).await
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let run = self.cached(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        if !run.is_finished() {
            return Err(BackendError::Conflict(format!("run {id} is active: cancel it first")));
        }
        self.runs
            .delete(id, &DeleteParams::background())
            .await
            .map_err(KubeBackend::api_error(id, "delete the run"))?;
        Ok(())
    }

    fn ready(&self) -> bool {
        // Ready once the first list has landed in the cache.
        futures::FutureExt::now_or_never(self.store.wait_until_ready()).is_some_and(|r| r.is_ok())
    }
}
