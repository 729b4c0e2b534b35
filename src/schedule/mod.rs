//! Schedules: a loop beside the run controller that turns each tick of a `NotebookSchedule`
//! into one NotebookRun. Idempotent by name: a tick's run is `<schedule>-<tick unix seconds>`,
//! created with `create`, so a restarted or second controller meets AlreadyExists instead of
//! making a second run. The tick arithmetic is in `cron` (pure); this file reads the world,
//! creates the run, prunes history and records the status (server-side apply) and Events.

pub mod crd;
pub mod cron;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

pub use crd::{LastRun, NotebookSchedule, NotebookScheduleSpec, NotebookScheduleStatus, RunTemplate};

use crate::crd::{NotebookRun, Reason, RunPhase};
use crate::leader::Leadership;
use crate::status::{keep_head, upsert_condition};

/// Every run of a schedule carries its name here (the owner reference carries its uid).
pub const SCHEDULE_LABEL: &str = "notebooks.dev/schedule";
/// The tick a run was created for (RFC 3339); absent on runs started by hand.
pub const SCHEDULED_AT: &str = "notebooks.dev/scheduled-at";
/// Whether the schedule can tick: False with InvalidSchedule or InvalidTimeZone.
pub const CONDITION_READY: &str = "Ready";
/// Whether the last run was rejected because its lock was held (a Forbid template).
pub const CONDITION_TICK_SKIPPED: &str = "TickSkipped";
/// Status writes of schedules share the run controller's field manager.
const FIELD_MANAGER: &str = crate::controller::FIELD_MANAGER;
/// However far the next tick, a schedule is looked at again this often (clock steps, restarts).
const MAX_WAIT: Duration = Duration::from_secs(600);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

type Key = ObjectRef<DeserializeGuard<NotebookSchedule>>;

struct Context {
    client: Client,
    recorder: Recorder,
    leadership: Leadership,
    failures: Mutex<HashMap<Key, u32>>,
}

/// Runs the schedule controller until `shutdown` resolves; only a leader creates runs.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    leadership: Leadership,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let schedules: Api<DeserializeGuard<NotebookSchedule>> =
        crate::controller::scoped(&client, namespace.as_deref());
    let runs: Api<DeserializeGuard<NotebookRun>> = crate::controller::scoped(&client, namespace.as_deref());
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "notebook-operator".into(), instance: std::env::var("POD_NAME").ok() },
    );
    let ctx = Arc::new(Context { client, recorder, leadership, failures: Default::default() });
    Controller::new(schedules, watcher::Config::default())
        // A run that moves on (finishes, is rejected) updates its schedule's status.
        .owns(runs, watcher::Config::default().labels(SCHEDULE_LABEL))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                // Retried with backoff; said loudly, as it stops every schedule.
                Err(kube::runtime::controller::Error::QueueError(e)) => {
                    warn!(error = %e, "watching NotebookSchedules failed (is crds/notebookschedule.yaml installed?); retrying");
                }
                Err(e) => debug!(error = %e, "schedule reconcile failed"),
                Ok(_) => {}
            }
        })
        .await;
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn error_policy(guard: Arc<DeserializeGuard<NotebookSchedule>>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut counts = locked(&ctx.failures);
        let n = counts.entry(ObjectRef::from_obj(guard.as_ref())).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = (Duration::from_millis(500) * 2u32.pow(failures.saturating_sub(1).min(10))).min(MAX_BACKOFF);
    let name = guard.0.as_ref().map(|s| s.name_any()).unwrap_or_default();
    warn!(schedule = %name, error = %error, retry_in = ?delay, "schedule reconcile failed");
    Action::requeue(delay)
}

async fn reconcile(
    guard: Arc<DeserializeGuard<NotebookSchedule>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let schedule = match &guard.0 {
        Ok(s) => s,
        Err(invalid) => {
            warn!(error = %invalid.error, "skipping a NotebookSchedule that does not parse");
            return Ok(Action::await_change());
        }
    };
    if !ctx.leadership.is_leading() {
        // A standby creates nothing; the loop is dropped soon after the lead is lost.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    if schedule.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = schedule.namespace().unwrap_or_default();
    let span = info_span!("schedule", schedule = %schedule.name_any(), ns = %ns);
    let r = Reconciler { schedule, ctx: &ctx, ns };
    let action = r.reconcile().instrument(span).await?;
    locked(&ctx.failures).remove(&ObjectRef::from_obj(guard.as_ref()));
    Ok(action)
}

/// The NotebookRun a schedule creates: the template's labels, annotations and spec, the
/// schedule's label and controller owner reference, the lock defaulted to the schedule's name.
/// `tick` is the tick it runs for (None: started by hand).
pub fn build_run(
    schedule: &NotebookSchedule,
    name: &str,
    tick: Option<Timestamp>,
) -> Result<NotebookRun, Error> {
    let owner = schedule
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Invalid("the schedule has no uid yet".into()))?;
    let template = &schedule.spec.run_template;
    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = meta.labels.unwrap_or_default();
    labels.insert(SCHEDULE_LABEL.into(), schedule.name_any());
    let mut annotations: BTreeMap<String, String> = meta.annotations.unwrap_or_default();
    if let Some(tick) = tick {
        annotations.insert(SCHEDULED_AT.into(), tick.to_string());
    }
    let mut spec = template.spec.clone();
    spec.lock = template.lock(&schedule.name_any());
    spec.cancel = false;
    let mut run = NotebookRun::new(name, spec);
    run.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: schedule.namespace(),
        labels: Some(labels),
        annotations: (!annotations.is_empty()).then_some(annotations),
        owner_references: Some(vec![owner]),
        ..Default::default()
    };
    Ok(run)
}

/// The runs of `schedule`: labelled with its name and owned by this very schedule (its uid).
pub async fn runs_of(runs: &Api<NotebookRun>, schedule: &NotebookSchedule) -> kube::Result<Vec<NotebookRun>> {
    let selector = format!("{SCHEDULE_LABEL}={}", schedule.name_any());
    let list = runs.list(&ListParams::default().labels(&selector)).await?;
    let uid = schedule.uid();
    Ok(list
        .items
        .into_iter()
        .filter(|r| {
            r.owner_references().iter().any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
        })
        .collect())
}

/// One schedule being reconciled.
struct Reconciler<'a> {
    schedule: &'a NotebookSchedule,
    ctx: &'a Context,
    ns: String,
}

// === impl Reconciler ===

impl Reconciler<'_> {
    fn name(&self) -> String {
        self.schedule.name_any()
    }

    fn runs_api(&self) -> Api<NotebookRun> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    /// One pass: validate, create the due tick's run, prune history, record the status.
    async fn reconcile(&self) -> Result<Action, Error> {
        let spec = &self.schedule.spec;
        // The stored status, not the cache's (which may lag behind our own last write): the last
        // tick and the Events already sent are decided from it.
        let api: Api<NotebookSchedule> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let stored = match api.get_status(&self.name()).await {
            Ok(fresh) => fresh.status.unwrap_or_default(),
            Err(kube::Error::Api(ae)) if ae.code == 404 => return Ok(Action::await_change()),
            Err(e) => return Err(e.into()),
        };
        let mut status = stored.clone();
        status.observed_generation = self.schedule.metadata.generation;
        let now = Timestamp::now();
        let cron = match cron::parse(&spec.schedule, spec.time_zone.as_deref()) {
            Ok(cron) => cron,
            Err(invalid) => {
                // No tick can be computed: say so once, create nothing, wait for a fix.
                status.next_schedule_time = None;
                let changed = self.set_ready(&mut status, "False", invalid.reason(), &invalid.to_string());
                self.write_status(&stored, status).await?;
                if changed {
                    self.event(EventType::Warning, invalid.reason(), invalid.to_string()).await;
                }
                return Ok(Action::await_change());
            }
        };
        let runs_api = self.runs_api();
        let mut runs = runs_of(&runs_api, self.schedule).await?;
        let mut wait = None;
        if spec.suspend {
            status.next_schedule_time = None;
            self.set_ready(&mut status, "True", "Suspended", "suspended: no tick creates a run");
        } else {
            let last = status
                .last_schedule_time
                .as_ref()
                .map(|t| t.0)
                .or_else(|| self.schedule.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .unwrap_or(now);
            let plan = cron::plan(&cron, last, now, spec.starting_deadline_seconds);
            if plan.too_many_missed() {
                let note = format!(
                    "more than {} ticks were missed since {last}; only the most recent runs (set startingDeadlineSeconds to bound catch-up)",
                    cron::MAX_MISSED
                );
                self.event(EventType::Warning, "TooManyMissedTimes", note).await;
            }
            if let Some(tick) = plan.run {
                if let Some(run) = self.create_tick_run(&runs_api, tick).await? {
                    runs.push(run);
                }
                status.last_schedule_time = Some(Time(tick));
            } else if let Some(tick) = plan.too_late {
                let deadline = spec.starting_deadline_seconds.unwrap_or_default();
                let note = format!(
                    "missed the tick of {tick} by more than startingDeadlineSeconds ({deadline}s): no run for it"
                );
                self.event(EventType::Warning, "MissedSchedule", note).await;
                status.last_schedule_time = Some(Time(tick));
            }
            status.next_schedule_time = plan.next.map(Time);
            let next = plan.next.map_or_else(|| "none".to_string(), |t| t.to_string());
            self.set_ready(&mut status, "True", "Scheduled", &format!("next tick at {next}"));
            wait = plan.next.map(|t| t.duration_since(now).unsigned_abs());
        }
        self.prune(&runs_api, &mut runs).await?;
        self.observe_runs(&stored, &mut status, &runs).await;
        self.write_status(&stored, status).await?;
        Ok(match wait {
            // The tick's second has begun once the timer fires; a little slack for the clocks.
            Some(d) => Action::requeue((d + Duration::from_millis(20)).min(MAX_WAIT)),
            None => Action::requeue(MAX_WAIT),
        })
    }

    /// Creates the run of `tick`; AlreadyExists means the tick is done (by an earlier pass, a
    /// previous controller or another one). A refusal that retrying cannot change skips the tick.
    async fn create_tick_run(
        &self,
        runs_api: &Api<NotebookRun>,
        tick: Timestamp,
    ) -> Result<Option<NotebookRun>, Error> {
        let name = cron::tick_run_name(&self.name(), tick);
        let run = build_run(self.schedule, &name, Some(tick))?;
        match runs_api.create(&PostParams::default(), &run).await {
            Ok(created) => {
                info!(run = %name, %tick, "tick: run created");
                self.event(
                    EventType::Normal,
                    "RunCreated",
                    format!("created run {name} for the tick of {tick}"),
                )
                .await;
                Ok(Some(created))
            }
            Err(kube::Error::Api(ae)) if ae.code == 409 => {
                let existing = runs_api.get_opt(&name).await?;
                let ours = existing.as_ref().is_some_and(|r| {
                    r.owner_references().iter().any(|o| Some(&o.uid) == self.schedule.uid().as_ref())
                });
                if !ours {
                    let note = format!(
                        "run {name} exists and is not this schedule's: the tick of {tick} is skipped"
                    );
                    self.event(EventType::Warning, "NameConflict", note).await;
                }
                debug!(run = %name, "tick already done");
                Ok(None)
            }
            Err(kube::Error::Api(ae)) if crate::controller::is_permanent(ae.code) => {
                let note = format!("could not create run {name} for the tick of {tick}: {}", ae.message);
                warn!(run = %name, error = %ae.message, "tick skipped: run refused");
                self.event(EventType::Warning, "FailedCreate", note).await;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes finished runs beyond the history limits, oldest first (with their children).
    async fn prune(&self, runs_api: &Api<NotebookRun>, runs: &mut Vec<NotebookRun>) -> Result<(), Error> {
        runs.retain(|r| r.metadata.deletion_timestamp.is_none());
        runs.sort_by(|a, b| created(a).cmp(&created(b)).then_with(|| a.name_any().cmp(&b.name_any())));
        let spec = &self.schedule.spec;
        let mut doomed = Vec::new();
        for (succeeded, limit) in
            [(true, spec.successful_runs_history_limit), (false, spec.failed_runs_history_limit)]
        {
            let finished: Vec<&NotebookRun> = runs
                .iter()
                .filter(|r| r.is_finished() && (r.phase() == Some(RunPhase::Succeeded)) == succeeded)
                .collect();
            let excess = finished.len().saturating_sub(usize::try_from(limit.max(0)).unwrap_or(0));
            doomed.extend(finished[..excess].iter().map(|r| r.name_any()));
        }
        let background =
            DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
        for name in &doomed {
            match runs_api.delete(name, &background).await {
                Ok(_) => info!(run = %name, "history limit: run deleted"),
                Err(kube::Error::Api(ae)) if ae.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        runs.retain(|r| !doomed.contains(&r.name_any()));
        Ok(())
    }

    /// active, lastRun, lastSuccessfulTime and the TickSkipped condition from the runs; an Event
    /// when the newest run was rejected because its lock was held.
    async fn observe_runs(
        &self,
        stored: &NotebookScheduleStatus,
        status: &mut NotebookScheduleStatus,
        runs: &[NotebookRun],
    ) {
        status.active = runs
            .iter()
            .filter(|r| !r.is_finished())
            .take(64)
            .map(|r| ObjectReference {
                api_version: Some("notebooks.dev/v1alpha1".into()),
                kind: Some("NotebookRun".into()),
                name: Some(r.name_any()),
                namespace: r.namespace(),
                uid: r.uid(),
                ..Default::default()
            })
            .collect();
        let succeeded = runs
            .iter()
            .filter(|r| r.phase() == Some(RunPhase::Succeeded))
            .filter_map(|r| r.status.as_ref()?.completion_time.as_ref().map(|t| t.0))
            .max();
        let kept = stored.last_successful_time.as_ref().map(|t| t.0);
        status.last_successful_time = kept.max(succeeded).map(Time);
        // Runs are sorted oldest first; the newest is the last.
        let Some(newest) = runs.last() else { return };
        let st = newest.status.clone().unwrap_or_default();
        let last = LastRun {
            name: newest.name_any(),
            phase: st.phase,
            reason: st.reason,
            message: st.message.as_deref().map(|m| keep_head(m, 1024)),
        };
        let rejected = st.phase == Some(RunPhase::Rejected) && st.reason == Some(Reason::LockHeld);
        let generation = self.schedule.metadata.generation;
        let now = Time(Timestamp::now());
        if rejected {
            let note = format!(
                "run {} was rejected: {} (the template's concurrencyPolicy is Forbid)",
                last.name,
                st.message.as_deref().unwrap_or("its lock is held")
            );
            upsert_condition(
                &mut status.conditions,
                CONDITION_TICK_SKIPPED,
                "True",
                "LockHeld",
                &note,
                generation,
                now,
            );
            let already =
                stored.last_run.as_ref().is_some_and(|l| l.name == last.name && l.phase == last.phase);
            if !already {
                self.event(EventType::Warning, "TickSkipped", note).await;
            }
        } else if status.conditions.iter().any(|c| c.type_ == CONDITION_TICK_SKIPPED) {
            let note = format!("run {} was not rejected", last.name);
            upsert_condition(
                &mut status.conditions,
                CONDITION_TICK_SKIPPED,
                "False",
                "RunAdmitted",
                &note,
                generation,
                now,
            );
        }
        status.last_run = Some(last);
    }

    /// Sets the Ready condition; true when it changed (status or reason).
    fn set_ready(
        &self,
        status: &mut NotebookScheduleStatus,
        value: &str,
        reason: &str,
        message: &str,
    ) -> bool {
        let changed = !status
            .conditions
            .iter()
            .any(|c| c.type_ == CONDITION_READY && c.status == value && c.reason == reason);
        let generation = self.schedule.metadata.generation;
        upsert_condition(
            &mut status.conditions,
            CONDITION_READY,
            value,
            reason,
            message,
            generation,
            Time(Timestamp::now()),
        );
        changed
    }

    /// Server-side apply of the whole status, when it differs from the stored one.
    async fn write_status(
        &self,
        stored: &NotebookScheduleStatus,
        status: NotebookScheduleStatus,
    ) -> Result<(), Error> {
        if &status == stored {
            return Ok(());
        }
        let api: Api<NotebookSchedule> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let patch = json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookSchedule",
            "metadata": {"name": self.name()},
            "status": status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&self.name(), &pp, &Patch::Apply(&patch)).await?;
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Schedule".into(),
            secondary: None,
        };
        if let Err(e) = self.ctx.recorder.publish(&event, &self.schedule.object_ref(&())).await {
            debug!(error = %e, "could not publish event");
        }
    }
}

fn created(run: &NotebookRun) -> Option<Timestamp> {
    run.metadata.creation_timestamp.as_ref().map(|t| t.0)
}
