//! Recording what happened: status transitions (server-side apply of the whole status, bounded
//! to the CRD's limits), the `Stopping` condition, and Events.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Api, Resource};
use serde_json::json;
use tracing::{debug, info};

use super::{FIELD_MANAGER, Reconciler, Result};

/// A status as stored, and the resourceVersion it was read at.
pub(super) struct Stored {
    pub status: NotebookRunStatus,
    pub resource_version: Option<String>,
}
use crate::crd::{NotebookRun, NotebookRunStatus, Reason, RunPhase};
use crate::status::{self, CONDITION_STOPPING};

impl Reconciler<'_> {
    /// The stored status (the cache may lag behind our own last write), with the resourceVersion
    /// it was read at: the write that follows is conditional on it.
    pub(super) async fn stored_status(&self) -> Result<Stored> {
        let runs: Api<NotebookRun> = self.api();
        let run = runs.get_status(&self.name()).await?;
        Ok(Stored { status: run.status.unwrap_or_default(), resource_version: run.metadata.resource_version })
    }

    /// Moves the run to `phase` with `reason`: status, condition, Event, metrics.
    pub(super) async fn transition(
        &self,
        phase: RunPhase,
        reason: Reason,
        message: String,
        edit: impl FnOnce(&mut NotebookRunStatus),
    ) -> Result<()> {
        // Start from the stored status, and do not repeat a transition an earlier pass already
        // made (no second Event, metric or startTime).
        let mut stored = self.stored_status().await?;
        let status = &mut stored.status;
        if status.phase == Some(phase) && (phase == RunPhase::Running || phase.is_terminal()) {
            debug!(phase = phase.as_str(), "transition already made");
            return Ok(());
        }
        let now = Time(jiff::Timestamp::now());
        status.phase = Some(phase);
        status.reason = Some(reason);
        status.message = Some(message.clone());
        status.observed_generation = self.run.metadata.generation;
        if phase.is_terminal() {
            status.completion_time = Some(now.clone());
            status.blocked_by = None;
            if status.conditions.iter().any(|c| c.type_ == CONDITION_STOPPING) {
                let generation = self.run.metadata.generation;
                let note = "no pod of this run executes any more";
                status::upsert_condition(
                    &mut status.conditions,
                    CONDITION_STOPPING,
                    "False",
                    "PodsStopped",
                    note,
                    generation,
                    now.clone(),
                );
            }
        }
        status::set_condition(
            &mut status.conditions,
            phase,
            reason,
            &message,
            self.run.metadata.generation,
            now,
        );
        edit(status);
        let (start_time, completion_time) = (status.start_time.clone(), status.completion_time.clone());
        self.apply_status(&mut stored).await?;
        let kind = if matches!(phase, RunPhase::Failed | RunPhase::Rejected) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.event(kind, reason.as_str(), message).await;
        if phase == RunPhase::Running {
            self.ctx.metrics.run_started();
        }
        if phase.is_terminal() {
            self.ctx.metrics.run_finished(reason, start_time.map(|t| t.0), completion_time.map(|t| t.0));
        }
        info!(phase = phase.as_str(), reason = reason.as_str(), "transition");
        Ok(())
    }

    /// Says the run waits for its pods to stop before it lets the lock go (condition `Stopping`,
    /// an Event when what it waits for changes). `stuck` marks pods past their grace period.
    pub(super) async fn record_stopping(&self, waiting_for: &str, stuck: bool) -> Result<()> {
        let mut stored = self.stored_status().await?;
        let status = &mut stored.status;
        let reason = if stuck { "PodNotStopping" } else { "WaitingForPods" };
        let message = format!(
            "{waiting_for}; lock {} stays held until no pod of this run executes",
            self.run.spec.lock
        );
        let unchanged = status.conditions.iter().any(|c| {
            c.type_ == CONDITION_STOPPING && c.status == "True" && c.reason == reason && c.message == message
        });
        if unchanged {
            return Ok(());
        }
        let now = Time(jiff::Timestamp::now());
        let generation = self.run.metadata.generation;
        status::upsert_condition(
            &mut status.conditions,
            CONDITION_STOPPING,
            "True",
            reason,
            &message,
            generation,
            now,
        );
        self.apply_status(&mut stored).await?;
        let kind = if stuck { EventType::Warning } else { EventType::Normal };
        self.event(kind, "Stopping", message).await;
        Ok(())
    }

    /// Server-side apply of the whole status: fields this manager no longer sets are removed. The
    /// write is conditional on the resourceVersion the status was read at, so a controller that
    /// lost the lead (or raced another pass) cannot overwrite a newer status: it gets a conflict.
    pub(super) async fn apply_status(&self, stored: &mut Stored) -> Result<()> {
        status::bound(&mut stored.status);
        let runs: Api<NotebookRun> = self.api();
        let patch = json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookRun",
            "metadata": {"name": self.name(), "resourceVersion": stored.resource_version},
            "status": stored.status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        runs.patch_status(&self.name(), &pp, &Patch::Apply(&patch)).await?;
        Ok(())
    }

    pub(super) async fn event(&self, type_: EventType, reason: &str, note: String) {
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
