//! Admission: take the lock (or queue, reject, replace), look up and freeze the inputs, create
//! the Job once. Everything that can be checked before a pod exists is checked here.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::{
    LOCK_FINALIZER, REPLACED_BY, Reconciler, Result, ignore_not_found, is_permanent, left_by_namesake,
    owned_by,
};
use crate::crd::{ConcurrencyPolicy, NotebookRun, Reason, RunPhase};
use crate::job;
use crate::lock::{self, Decision};

/// What the inputs ConfigMap may hold (ConfigMaps hold at most 1 MiB, metadata included).
const MAX_INPUTS_BYTES: usize = 1_000_000;
/// A queued run behind a Lease the operator does not manage polls it (such Leases are not watched).
const FOREIGN_LEASE_POLL: Duration = Duration::from_secs(5);

/// Who keeps a run from taking the lock.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blocker {
    /// A live run holds the Lease.
    Holder,
    /// The lock is free, but an older run waits for it first.
    Ahead,
    /// A Lease of that name that the operator does not manage.
    Foreign,
}

/// The answer to creating one of the run's children.
enum Created {
    /// Created now, or by an earlier pass of this run.
    Ready,
    /// Left by a deleted run of the same name: the garbage collector takes it soon.
    Wait,
    /// Taken by an object this run does not own: never written, never adopted.
    Conflict(String),
    /// Refused for good (quota, admission, validation).
    Refused(String),
}

impl Reconciler<'_> {
    /// Not started yet: take the lock (or queue, reject, replace), check inputs, create the Job.
    pub(super) async fn admit(&self) -> Result<Action> {
        if self.run.spec.cancel {
            // A pass that created the Job may have lost its Running status write: stop that Job too.
            if let Some(wait) = self.stop_pods(true).await? {
                return Ok(wait);
            }
            return self.cancelled().await;
        }
        let leases: Api<Lease> = self.api();
        let lease = leases.get_opt(&self.run.spec.lock).await?;
        // The cached runs by reference: nothing is cloned but the store's list of pointers.
        let cached = self.ctx.runs.state();
        let runs = cached
            .iter()
            .filter_map(|g| g.0.as_ref().ok())
            .filter(|r| r.metadata.namespace.as_deref() == Some(self.ns.as_str()));
        match lock::decide(self.run, lease.as_ref(), runs) {
            Decision::Owned => {
                if !self.add_finalizer().await? {
                    return Ok(Action::requeue(Duration::from_millis(100)));
                }
                self.start().await
            }
            Decision::Acquire => {
                // The finalizer first: from the moment the Lease exists, deleting the run waits
                // for its pods before the lock can go.
                if !self.add_finalizer().await? {
                    return Ok(Action::requeue(Duration::from_millis(100)));
                }
                if lock::acquire(&leases, self.run).await? {
                    info!(lock = %self.run.spec.lock, "lock acquired");
                    crate::failpoint::crash_after("after-lease");
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
            Decision::HeldBy { holder } => self.wait_for(&holder, Blocker::Holder).await,
            Decision::Behind { ahead } => self.wait_for(&ahead, Blocker::Ahead).await,
            Decision::Foreign { holder } => self.wait_for(&holder, Blocker::Foreign).await,
        }
    }

    /// Adds the lock finalizer; `Ok(false)` when the cached run was stale (try again next pass).
    async fn add_finalizer(&self) -> Result<bool> {
        if self.run.finalizers().iter().any(|f| f == LOCK_FINALIZER) {
            return Ok(true);
        }
        let mut finalizers = self.run.finalizers().to_vec();
        finalizers.push(LOCK_FINALIZER.into());
        // With the s3 store the run's objects go with it: a finalizer of their own, kept past the end.
        finalizers.extend(self.results_finalizer().map(String::from).filter(|f| !finalizers.contains(f)));
        let runs: Api<NotebookRun> = self.api();
        // The resourceVersion makes the list write conditional: no other finalizer is dropped.
        let patch =
            json!({"metadata": {"resourceVersion": self.run.resource_version(), "finalizers": finalizers}});
        match runs.patch(&self.name(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The lock is taken by someone else: apply the concurrency policy.
    async fn wait_for(&self, other: &str, blocker: Blocker) -> Result<Action> {
        let lock = &self.run.spec.lock;
        let who = match blocker {
            Blocker::Foreign => format!("{other} (a Lease not managed by notebook-operator)"),
            _ => other.to_string(),
        };
        match self.run.spec.concurrency_policy {
            ConcurrencyPolicy::Forbid => {
                let message = format!("lock {lock} is held by {who}");
                let holder = other.to_string();
                self.transition(RunPhase::Rejected, Reason::LockHeld, message, |s| {
                    s.blocked_by = Some(holder)
                })
                .await?;
                return self.finished().await;
            }
            // Replace cancels the run holding the lock it found on arrival, once; then it waits
            // its turn like Queue. A foreign Lease is nobody's to cancel.
            ConcurrencyPolicy::Replace
                if blocker == Blocker::Holder && self.phase() != Some(RunPhase::Queued) =>
            {
                let runs: Api<NotebookRun> = self.api();
                let patch = json!({
                    "metadata": {"annotations": {REPLACED_BY: self.name()}},
                    "spec": {"cancel": true}
                });
                ignore_not_found(runs.patch(other, &PatchParams::default(), &Patch::Merge(&patch)).await)?;
                info!(holder = other, "replacing the holder of the lock");
            }
            _ => {}
        }
        let message = match blocker {
            Blocker::Ahead => format!("waiting for lock {lock}, behind {who}"),
            _ => format!("waiting for lock {lock}, held by {who}"),
        };
        let current = self.status();
        if self.phase() != Some(RunPhase::Queued) || current.blocked_by.as_deref() != Some(other) {
            let blocked_by = other.to_string();
            let reason = if blocker == Blocker::Ahead { Reason::Queued } else { Reason::LockHeld };
            self.transition(RunPhase::Queued, reason, message, |s| s.blocked_by = Some(blocked_by)).await?;
        }
        // Woken at once by the Lease watch; the requeue is a safety net.
        Ok(Action::requeue(if blocker == Blocker::Foreign {
            FOREIGN_LEASE_POLL
        } else {
            Duration::from_secs(30)
        }))
    }

    /// Holds the lock: check the inputs, freeze them, create the Job once.
    async fn start(&self) -> Result<Action> {
        let notebook = match self.dereference().await? {
            Ok(nb) => nb,
            Err((reason, message)) => return self.fail_now(reason, message).await,
        };
        let mut inputs = job::inputs_config_map(self.run, notebook.as_deref());
        let mut desired = job::build(self.run, &self.ctx.config.job);
        self.add_results_urls(&mut inputs, &mut desired).await?;
        if let Err(message) = validate_inputs(&inputs) {
            return self.fail_now(Reason::InvalidNotebook, message).await;
        }
        if let Err(message) = self.ensure_runner().await? {
            return self.fail_now(Reason::PodFailed, message).await;
        }
        match self.create_child(&inputs).await? {
            Created::Ready => crate::failpoint::crash_after("after-inputs"),
            Created::Wait => return Ok(Action::requeue(Duration::from_secs(1))),
            Created::Conflict(message) => return self.fail_now(Reason::NameConflict, message).await,
            Created::Refused(why) => {
                return self
                    .fail_now(Reason::InvalidNotebook, format!("the inputs ConfigMap was refused: {why}"))
                    .await;
            }
        }
        // The runner gets the cancel grace to save its partial notebook before SIGKILL.
        if let Some(pod) = desired.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
            pod.termination_grace_period_seconds = Some(self.ctx.config.cancel_grace.as_secs().max(1) as i64);
        }
        let job_name = desired.name_any();
        match self.create_child(&desired).await? {
            Created::Ready => crate::failpoint::crash_after("after-job"),
            Created::Wait => return Ok(Action::requeue(Duration::from_secs(1))),
            Created::Conflict(message) => return self.fail_now(Reason::NameConflict, message).await,
            Created::Refused(why) => {
                return self.fail_now(Reason::PodFailed, format!("the Job was refused: {why}")).await;
            }
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

    /// The namespace's shared runner ConfigMap exists: created by the first run of this version
    /// in the namespace (a 409 is another pass or replica that did it first). Once seen, later
    /// runs check it with a metadata-only GET, so one deleted by hand comes back at the next run.
    /// `Ok(Err(why))`: refused for good (quota, admission) or taken by a foreign object.
    async fn ensure_runner(&self) -> Result<std::result::Result<(), String>> {
        let cms: Api<ConfigMap> = self.api();
        let name = job::runner_name();
        let seen = super::locked(&self.ctx.runners).contains(&self.ns);
        if seen && cms.get_metadata_opt(name).await?.is_some() {
            return Ok(Ok(()));
        }
        match cms.create(&PostParams::default(), &job::runner_config_map(&self.ns)).await {
            Ok(_) => info!(config_map = name, "shared runner created"),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Named by its content: one with other content is not ours, and never overwritten.
                let existing = cms.get_opt(name).await?;
                let script = existing.as_ref().and_then(|c| c.data.as_ref()?.get(job::RUNNER_KEY));
                if existing.is_some() && script.map(String::as_str) != Some(crate::runner::RUN_PY) {
                    return Ok(Err(format!(
                        "ConfigMap {name} exists but does not hold this version's runner; delete it so \
                         the operator can create it again"
                    )));
                }
            }
            Err(kube::Error::Api(e)) if is_permanent(e.code) => {
                return Ok(Err(format!("the runner ConfigMap {name} was refused: {}", e.message)));
            }
            Err(e) => return Err(e.into()),
        }
        super::locked(&self.ctx.runners).insert(self.ns.clone());
        Ok(Ok(()))
    }

    /// Creates a child of the run, or finds the one an earlier pass created; never adopts or
    /// overwrites an object the run does not own.
    async fn create_child<K>(&self, desired: &K) -> Result<Created>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
        <K as Resource>::DynamicType: Default,
    {
        let api: Api<K> = self.api();
        let kind = K::kind(&Default::default()).to_string();
        let name = desired.meta().name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), desired).await {
            Ok(_) => {
                info!(kind = %kind, name = %name, "created");
                Ok(Created::Ready)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let Some(existing) = api.get_opt(&name).await? else { return Ok(Created::Wait) };
                let meta = existing.meta();
                if owned_by(meta, self.run) {
                    Ok(Created::Ready)
                } else if left_by_namesake(meta, self.run) {
                    Ok(Created::Wait)
                } else {
                    Ok(Created::Conflict(format!(
                        "{kind} {name} already exists and does not belong to this run; it is left as it is \
                         (delete or rename it, then create the run again)"
                    )))
                }
            }
            Err(kube::Error::Api(e)) if is_permanent(e.code) => Ok(Created::Refused(e.message)),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails the run at once, and releases the lock.
    pub(super) async fn fail_now(&self, reason: Reason, message: String) -> Result<Action> {
        self.transition(RunPhase::Failed, reason, message, |_| {}).await?;
        self.finished().await
    }

    /// The notebook to freeze into the inputs (None for a path inside the image), or why the run fails now.
    async fn dereference(&self) -> Result<std::result::Result<Option<String>, (Reason, String)>> {
        let source = &self.run.spec.notebook;
        let text = if let Some(inline) = &source.inline {
            inline.clone()
        } else if source.inline_sha256.is_some() {
            // The cache keeps the hash of an inline notebook, not its text (cache.rs).
            let runs: Api<NotebookRun> = self.api();
            let stored = runs.get(&self.name()).await?;
            if stored.uid() != self.run.uid() {
                return Err(super::Error::Invalid(format!(
                    "NotebookRun {} was replaced while it was admitted",
                    self.name()
                )));
            }
            stored.spec.notebook.inline.unwrap_or_default()
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
        Ok(validate_notebook(&text).map(|()| Some(text)))
    }
}

/// An ipynb is a JSON object with a list of cells.
fn validate_notebook(text: &str) -> std::result::Result<(), (Reason, String)> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if v.get("cells").is_some_and(serde_json::Value::is_array) => Ok(()),
        Ok(_) => Err((Reason::InvalidNotebook, "the notebook has no cells list: not an ipynb".into())),
        Err(e) => Err((Reason::InvalidNotebook, format!("the notebook is not valid JSON: {e}"))),
    }
}

/// The frozen inputs must fit one ConfigMap.
fn validate_inputs(inputs: &ConfigMap) -> std::result::Result<(), String> {
    let size: usize = inputs.data.iter().flatten().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_INPUTS_BYTES {
        return Err(format!(
            "the run's inputs (notebook, parameters) take {size} bytes; at most {MAX_INPUTS_BYTES} fit a ConfigMap"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notebooks_and_inputs_are_checked_before_a_job_exists() {
        assert!(validate_notebook(r#"{"cells": []}"#).is_ok());
        assert_eq!(validate_notebook(r#"{"x": 1}"#).unwrap_err().0, Reason::InvalidNotebook);
        assert_eq!(validate_notebook("{").unwrap_err().0, Reason::InvalidNotebook);
        let big = ConfigMap {
            data: Some([("k".to_string(), "x".repeat(MAX_INPUTS_BYTES))].into()),
            ..Default::default()
        };
        assert!(validate_inputs(&big).unwrap_err().contains("fit a ConfigMap"));
        assert!(validate_inputs(&ConfigMap::default()).is_ok());
    }
}
