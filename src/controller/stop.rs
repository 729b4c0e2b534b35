//! Stopping: a run lets its lock go only once no pod of it executes. Cancel, a deleted run (the
//! lock finalizer), a start timeout and a deleted Job all come through here; the waiting is
//! recorded (condition `Stopping`, Events) and woken by the Pod watch, never slept through.

use std::time::Duration;

use futures::FutureExt as _;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::info;

use super::logs::{self, Followed};
use super::{LOCK_FINALIZER, Reconciler, Result, background, ignore_not_found, locked, owned_by, pod_phase};
use crate::crd::NotebookRun;
use crate::{job, lock};

/// A pod past its grace period by this much is reported as not stopping.
const STUCK_AFTER: Duration = Duration::from_secs(10);
/// While pods stop, the run is looked at again this often (the Pod watch usually wakes it first).
const STOPPING_POLL: Duration = Duration::from_secs(5);

/// A log follower of a stopping run (see `Context::followers`).
pub struct Follower(tokio::task::JoinHandle<Followed>);

pub fn is_live(pod: &Pod) -> bool {
    matches!(pod_phase(pod), "Pending" | "Running")
}

impl Reconciler<'_> {
    /// Every pod of this run, newest last.
    pub(super) async fn run_pods(&self) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = self.api();
        let lp = ListParams::default().labels(&format!("{}={}", job::RUN_LABEL, self.name()));
        let mut list = pods.list(&lp).await?.items;
        list.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        Ok(list)
    }

    /// Stops everything of this run that executes: the Job, then any pod still live. `None` once
    /// nothing executes; else what to wait for (recorded in status). With `keep_notebook`, the
    /// log of a running pod is followed for the partial notebook the runner prints on SIGTERM.
    pub(super) async fn stop_pods(&self, keep_notebook: bool) -> Result<Option<Action>> {
        let jobs: Api<Job> = self.api();
        let job_name = self.status().job_name.unwrap_or_else(|| job::job_name(self.run));
        let pods = self.run_pods().await?;
        if keep_notebook && let Some(running) = pods.iter().rev().find(|p| pod_phase(p) == "Running") {
            self.start_follower(running);
        }
        if let Some(j) = jobs.get_opt(&job_name).await?
            && owned_by(&j.metadata, self.run)
            && j.metadata.deletion_timestamp.is_none()
        {
            ignore_not_found(jobs.delete(&job_name, &background()).await)?;
            info!(job = %job_name, "job deleted");
        }
        // Pods are deleted too, not left to the garbage collector: one orphaned from its Job
        // (kubectl delete --cascade=orphan) must stop as well.
        let api: Api<Pod> = self.api();
        for pod in pods.iter().filter(|p| is_live(p) && p.metadata.deletion_timestamp.is_none()) {
            ignore_not_found(api.delete(&pod.name_any(), &DeleteParams::default()).await)?;
        }
        self.wait_pods(&pods).await
    }

    /// `None` when no pod of `pods` is live; else records what the run waits for.
    pub(super) async fn wait_pods(&self, pods: &[Pod]) -> Result<Option<Action>> {
        let live: Vec<&Pod> = pods.iter().filter(|p| is_live(p)).collect();
        if live.is_empty() {
            return Ok(None);
        }
        let now = jiff::Timestamp::now();
        let overdue = |p: &Pod| {
            p.metadata
                .deletion_timestamp
                .as_ref()
                .is_some_and(|t| now.duration_since(t.0).unsigned_abs() > STUCK_AFTER && now > t.0)
        };
        let stuck: Vec<&Pod> = live.iter().copied().filter(|p| overdue(p)).collect();
        let describe = |p: &Pod| {
            let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("no node");
            format!("{} (on {node})", p.name_any())
        };
        let message = if stuck.is_empty() {
            let names: Vec<String> = live.iter().map(|p| describe(p)).collect();
            format!("waiting for pod {} to stop", names.join(", "))
        } else {
            let names: Vec<String> = stuck.iter().map(|p| describe(p)).collect();
            format!(
                "pod {} has not stopped past its grace period: its node may be unreachable. If the node is gone \
                 for good, force-delete the pod (kubectl delete pod NAME --force --grace-period=0)",
                names.join(", ")
            )
        };
        self.record_stopping(&message, !stuck.is_empty()).await?;
        Ok(Some(Action::requeue(STOPPING_POLL)))
    }

    fn start_follower(&self, pod: &Pod) {
        let mut followers = locked(&self.ctx.followers);
        if followers.contains_key(&self.uid()) {
            return;
        }
        let pods: Api<Pod> = self.api();
        let limit = self.ctx.config.cancel_grace + Duration::from_secs(5);
        let handle = tokio::spawn(logs::follow(pods, pod.name_any(), limit));
        followers.insert(self.uid(), Follower(handle));
    }

    /// What the follower found, once it is done; `Err(())` while it still reads.
    pub(super) fn take_followed(&self) -> std::result::Result<Option<Followed>, ()> {
        let mut followers = locked(&self.ctx.followers);
        let Some(Follower(handle)) = followers.get_mut(&self.uid()) else { return Ok(None) };
        if !handle.is_finished() {
            return Err(());
        }
        let followed = handle.now_or_never().and_then(std::result::Result::ok);
        followers.remove(&self.uid());
        Ok(followed)
    }

    /// A run being deleted: if it may hold the lock, stop its pods, release, then let it go.
    pub(super) async fn deleting(&self) -> Result<Action> {
        if !self.run.finalizers().iter().any(|f| f == LOCK_FINALIZER) {
            // Then its objects in the s3 store, if it has some (the next pass after the lock's).
            return self.delete_results().await;
        }
        if let Some(wait) = self.stop_pods(false).await? {
            return Ok(wait);
        }
        locked(&self.ctx.followers).remove(&self.uid());
        self.release_lock().await?;
        self.remove_finalizer().await
    }

    pub(super) async fn release_lock(&self) -> Result<()> {
        let leases: Api<Lease> = self.api();
        if lock::release(&leases, self.run).await? {
            info!(lock = %self.run.spec.lock, "lock released");
        }
        Ok(())
    }

    /// Drops the lock finalizer (the lock is released by then), from the stored run: the cached
    /// one may lag behind.
    pub(super) async fn remove_finalizer(&self) -> Result<Action> {
        if !self.run.finalizers().iter().any(|f| f == LOCK_FINALIZER) {
            return Ok(Action::await_change());
        }
        self.drop_finalizer(LOCK_FINALIZER).await
    }

    /// Removes `finalizer` from the stored run (this very run, by uid), conditional on the
    /// resourceVersion read; a run gone or without it is left alone.
    pub(super) async fn drop_finalizer(&self, finalizer: &str) -> Result<Action> {
        let runs: Api<NotebookRun> = self.api();
        let Some(stored) = runs.get_opt(&self.name()).await? else { return Ok(Action::await_change()) };
        if stored.uid() != self.run.uid() || !stored.finalizers().iter().any(|f| f == finalizer) {
            return Ok(Action::await_change());
        }
        let kept: Vec<&String> = stored.finalizers().iter().filter(|f| *f != finalizer).collect();
        let patch = json!({"metadata": {"resourceVersion": stored.resource_version(), "finalizers": kept}});
        match runs.patch(&self.name(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(Action::await_change()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Action::await_change()),
            // Written meanwhile: look again.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Action::requeue(Duration::from_millis(100))),
            Err(e) => Err(e.into()),
        }
    }
}
