//! Running: keep the lock, watch the pod start (a start window per pod, not per Job), follow
//! progress in the log, and hand over to `finish` or `stop` when the Job ends or is cancelled.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::{Reconciler, Result, locked, logs, pod_phase};
use crate::crd::{Reason, RunPhase, parse_duration};
use crate::{lock, status};

const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(600);
/// The Lease's renewTime is refreshed when older than this.
const RENEW_AFTER: Duration = Duration::from_secs(15);

impl Reconciler<'_> {
    /// Running: keep the lock, follow the pod, finish from the Job.
    pub(super) async fn running(&self) -> Result<Action> {
        let status = self.status();
        let Some(job_name) = status.job_name.clone() else { return self.admit().await };
        self.keep_lock().await?;
        let jobs: Api<Job> = self.api();
        let job = jobs.get_opt(&job_name).await?.filter(|j| j.metadata.deletion_timestamp.is_none());
        let Some(job) = job else {
            // Deleted by our cancel, or out of band: either way the lock waits for the pods.
            if let Some(wait) = self.stop_pods(self.run.spec.cancel).await? {
                return Ok(wait);
            }
            if self.run.spec.cancel {
                return self.cancelled().await;
            }
            // Stopped by us because the pod did not or cannot start (recorded before the Job was
            // deleted), or out of band.
            if let Some(reason @ (Reason::StartTimeout | Reason::PodFailed)) = status.reason {
                return self.fail_now(reason, status.message.unwrap_or_default()).await;
            }
            let message = format!("job {job_name} was deleted; it is not recreated");
            return self.fail_now(Reason::JobDeleted, message).await;
        };
        let pods = self.run_pods().await?;
        let pod = pods.last();
        if let Some(outcome) = status::outcome(&job, pod) {
            // A cancel that lands once the Job has finished changes nothing.
            return self.finish(outcome, &pods).await;
        }
        if self.run.spec.cancel {
            if let Some(wait) = self.stop_pods(true).await? {
                return Ok(wait);
            }
            return self.cancelled().await;
        }
        let started = pod.is_some_and(|p| pod_phase(p) != "Pending");
        if !started {
            return self.waiting_for_start(&job, pod).await;
        }
        locked(&self.ctx.no_pod_since).remove(&self.uid());
        if let Some(pod) = pod {
            self.update_progress(pod).await?;
        }
        Ok(Action::requeue(self.ctx.config.progress_interval))
    }

    /// No pod runs yet (or again): fail with the waiting reason once the start window is over,
    /// or at once when the pod waits for something that will never come.
    async fn waiting_for_start(&self, job: &Job, pod: Option<&Pod>) -> Result<Action> {
        if let Some(problem) = pod.and_then(status::start_failure) {
            return self.stop_unstarted(Reason::PodFailed, format!("the pod cannot start: {problem}")).await;
        }
        let limit = self.start_timeout();
        let now = jiff::Timestamp::now();
        let created = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.map(|t| t.0);
        // The window opens when the run last had no running pod: a pod retried after an
        // eviction gets a full window of its own.
        let since = match pod {
            Some(p) => created(p.metadata.creation_timestamp.as_ref()),
            None if self.status().pod_name.is_some() => {
                Some(*locked(&self.ctx.no_pod_since).entry(self.uid()).or_insert(now))
            }
            None => None,
        };
        let since = [since, created(job.metadata.creation_timestamp.as_ref())].into_iter().flatten().max();
        // creationTimestamps have second resolution: count from the end of that second, so the
        // window is never cut short.
        let waited = since
            .map(|t| now.duration_since(t).unsigned_abs().saturating_sub(Duration::from_secs(1)))
            .unwrap_or_default();
        if waited < limit {
            return Ok(Action::requeue((limit - waited).min(Duration::from_secs(5))));
        }
        let job_name = job.name_any();
        let problem = match pod {
            Some(p) => {
                status::start_problem(p).unwrap_or_else(|| format!("pod {} is still Pending", p.name_any()))
            }
            None => format!(
                "no pod was created for Job {job_name} (quota, admission or a missing ServiceAccount?)"
            ),
        };
        let message = format!("the pod did not start within {}s: {problem}", limit.as_secs());
        self.stop_unstarted(Reason::StartTimeout, message).await
    }

    /// The run fails once its pods are gone; until then the status says why it stops.
    async fn stop_unstarted(&self, reason: Reason, message: String) -> Result<Action> {
        let mut stored = self.stored_status().await?;
        if stored.status.reason != Some(reason) {
            stored.status.reason = Some(reason);
            stored.status.message = Some(message.clone());
            self.apply_status(&mut stored).await?;
        }
        if let Some(wait) = self.stop_pods(false).await? {
            return Ok(wait);
        }
        self.fail_now(reason, message).await
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
                if spec.holder_identity.as_deref() != Some(self.name().as_str()) {
                    let note = format!(
                        "lock {} names {} while this run executes: two runs may share the lock",
                        self.run.spec.lock,
                        spec.holder_identity.as_deref().unwrap_or("nobody")
                    );
                    warn!("{note}");
                    self.event(EventType::Warning, Reason::LockHeld.as_str(), note).await;
                    return Ok(());
                }
                let stale = spec
                    .renew_time
                    .is_none_or(|t| jiff::Timestamp::now().duration_since(t.0).unsigned_abs() > RENEW_AFTER);
                if stale {
                    let patch = json!({"spec": {"renewTime": MicroTime(jiff::Timestamp::now())}});
                    leases.patch(&self.run.spec.lock, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                }
            }
        }
        Ok(())
    }

    async fn update_progress(&self, pod: &Pod) -> Result<()> {
        let pod_name = pod.name_any();
        let status = self.status();
        let mut progress = status.progress.clone();
        if pod_phase(pod) == "Running" {
            let pods: Api<Pod> = self.api();
            let log =
                logs::tail(&pods, &pod_name, logs::PROGRESS_TAIL_LINES, logs::PROGRESS_LIMIT_BYTES).await;
            if let Some(p) = log.as_deref().and_then(crate::progress::latest_progress) {
                progress = Some(p);
            }
        }
        let image_id = runner_image_id(pod).or(status.image_id.clone());
        if progress != status.progress
            || status.pod_name.as_deref() != Some(pod_name.as_str())
            || image_id != status.image_id
        {
            // Never write a cached (possibly stale) status over a newer one: re-read it.
            let mut stored = self.stored_status().await?;
            if stored.status.phase != Some(RunPhase::Running) {
                return Ok(());
            }
            stored.status.progress = progress;
            stored.status.pod_name = Some(pod_name);
            stored.status.image_id = image_id;
            self.apply_status(&mut stored).await?;
        }
        Ok(())
    }
}

/// The image the runner container runs, as the node reports it (empty until it started).
fn runner_image_id(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let id = &statuses.iter().find(|c| c.name == crate::job::CONTAINER)?.image_id;
    (!id.is_empty()).then(|| id.clone())
}
