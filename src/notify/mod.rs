//! Notifications when a run ends (`spec.notify`): a loop of its own beside the run controller,
//! so delivery never delays a run's transitions. It watches NotebookRuns, and for each finished
//! run with a webhook due spawns one delivery task; a receiver that never answers holds only
//! its own task (each attempt has a timeout, at most `MAX_CONCURRENT_ATTEMPTS` are in flight).
//!
//! At least once: progress is kept in `status.notifications` (server-side apply under
//! [`FIELD_MANAGER`]), so a restarted or new leader resumes where the last one stopped, and
//! every attempt of one run's phase carries the same `Idempotency-Key`. A run deleted before
//! its notification was delivered stops its retries (the attempt in flight ends first); one
//! deleted before the first attempt (a TTL of 0) still gets that attempt, unrecorded.

pub mod body;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::crd::{NotebookRun, NotificationState, NotificationStatus, NotifyFormat, RunPhase, Webhook};
use crate::leader::Leadership;
use crate::metrics::Metrics;

/// The field manager of `status.notifications`: the run controller's status writes carry the
/// entries they read back unchanged, and never remove them.
pub const FIELD_MANAGER: &str = "notebook-operator-notify";
const USER_AGENT: &str = concat!("notebook-operator/", env!("CARGO_PKG_VERSION"));
/// Attempts in flight at once, over all runs.
const MAX_CONCURRENT_ATTEMPTS: usize = 64;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest `lastError` kept (the CRD's bound).
const MAX_ERROR_CHARS: usize = 1024;
/// Longest part of a receiver's answer quoted in `lastError`.
const MAX_ANSWER_BYTES: usize = 256;

#[derive(Clone, Debug)]
pub struct NotifyConfig {
    /// The REST facade's public URL: links in the bodies when set.
    pub public_url: Option<String>,
    /// How long after a run finished its webhooks are retried (at least one attempt is made).
    pub retry_for: Duration,
    /// How long one attempt may take, answer included.
    pub attempt_timeout: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            public_url: None,
            retry_for: Duration::from_secs(600),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

/// What the delivery tasks share.
struct Notifier {
    client: Client,
    config: NotifyConfig,
    metrics: Metrics,
    leadership: Leadership,
    recorder: Recorder,
    http: reqwest::Client,
    attempts: Semaphore,
}

/// Delivers notifications until `shutdown` resolves (or the future is dropped, when the lead is
/// lost: the delivery tasks go with it, and the next leader resumes from the status).
pub async fn run(
    client: Client,
    config: NotifyConfig,
    namespace: Option<String>,
    metrics: Metrics,
    leadership: Leadership,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let http = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .timeout(config.attempt_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build();
    let http = match http {
        Ok(http) => http,
        Err(e) => {
            warn!(error = %e, "no HTTP client: notifications are not delivered");
            return;
        }
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "notebook-operator".into(), instance: std::env::var("POD_NAME").ok() },
    );
    let runs: Api<DeserializeGuard<NotebookRun>> = match namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let notifier = Arc::new(Notifier {
        client,
        config,
        metrics,
        leadership,
        recorder,
        http,
        attempts: Semaphore::new(MAX_CONCURRENT_ATTEMPTS),
    });
    let mut events = watcher(runs, watcher::Config::default()).default_backoff().boxed();
    // One task per run with deliveries due (by uid), and a way to stop it when the run goes.
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut running: HashMap<String, (tokio::task::Id, CancellationToken)> = HashMap::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        warn!(error = %e, "a delivery task failed");
                        e.id()
                    }
                };
                running.retain(|_, (task, _)| *task != id);
            }
            event = events.next() => match event {
                None => break,
                Some(Err(e)) => debug!(error = %e, "NotebookRun watch (retried)"),
                Some(Ok(watcher::Event::Apply(guard) | watcher::Event::InitApply(guard))) => {
                    let Ok(run) = guard.0 else { continue };
                    let Some(uid) = run.uid() else { continue };
                    if running.contains_key(&uid) || !notifier.leadership.is_leading() || due(&run).is_empty() {
                        continue;
                    }
                    let stop = CancellationToken::new();
                    let span = info_span!("notify", run = %run.name_any(), ns = %run.namespace().unwrap_or_default());
                    let task = tasks.spawn(deliver_run(notifier.clone(), run, stop.clone()).instrument(span));
                    running.insert(uid, (task.id(), stop));
                }
                Some(Ok(watcher::Event::Delete(guard))) => {
                    let uid = guard.0.as_ref().ok().and_then(|r| r.uid());
                    if let Some((_, stop)) = uid.and_then(|uid| running.remove(&uid)) {
                        stop.cancel();
                    }
                }
                Some(Ok(_)) => {}
            }
        }
    }
    // Dropping the set aborts the deliveries in flight: their entries stay Pending in the
    // status and the next controller sends them again (at least once).
    tasks.shutdown().await;
}

/// The webhooks of a finished run whose notification of its phase is neither delivered nor
/// given up: (index, webhook).
pub fn due(run: &NotebookRun) -> Vec<(u32, Webhook)> {
    let Some(phase) = run.phase().filter(|p| p.is_terminal()) else { return Vec::new() };
    if run.metadata.deletion_timestamp.is_some() {
        return Vec::new();
    }
    let Some(notify) = &run.spec.notify else { return Vec::new() };
    let entries = run.status.as_ref().map(|s| s.notifications.as_slice()).unwrap_or_default();
    notify
        .webhooks
        .iter()
        .zip(0u32..)
        .filter(|(hook, _)| hook.phases.contains(&phase))
        .filter(|(_, i)| {
            !entries
                .iter()
                .any(|e| e.webhook == *i && e.phase == phase && e.state != NotificationState::Pending)
        })
        .map(|(hook, i)| (i, hook.clone()))
        .collect()
}

/// Backoff before the attempt that follows `attempts` failed ones: 1 s doubling, at most 60 s.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(6);
    (FIRST_BACKOFF * 2u32.pow(exp)).min(MAX_BACKOFF)
}

/// One run's deliveries: every webhook due, side by side; the entries are written together
/// (one apply carries all of this manager's entries of the run).
async fn deliver_run(notifier: Arc<Notifier>, run: NotebookRun, stop: CancellationToken) {
    let (name, ns) = (run.name_any(), run.namespace().unwrap_or_default());
    let runs: Api<NotebookRun> = Api::namespaced(notifier.client.clone(), &ns);
    // The stored status, not the event's: a stale event must not send what was delivered since.
    // A run already gone (a TTL of 0) gets one attempt from what the event showed.
    let mut wait = FIRST_BACKOFF;
    let (mut run, gone) = loop {
        match runs.get_status(&name).await {
            Ok(fresh) if fresh.uid() == run.uid() => break (fresh, false),
            Ok(_) => break (run, true),
            Err(kube::Error::Api(ae)) if ae.code == 404 => break (run, true),
            Err(e) => debug!(error = %e, "reading the run's status (retried)"),
        }
        tokio::select! {
            () = stop.cancelled() => break (run, true),
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(MAX_BACKOFF);
    };
    // Held until delivered: keep what the bodies need, not an inline notebook.
    run.spec.notebook.inline = None;
    run.metadata.managed_fields = None;
    let Some(phase) = run.phase() else { return };
    let due = due(&run);
    if due.is_empty() {
        return;
    }
    let finished = run
        .status
        .as_ref()
        .and_then(|s| s.completion_time.as_ref())
        .map_or_else(jiff::Timestamp::now, |t| t.0);
    let deadline = finished + notifier.config.retry_for;
    let entries = Mutex::new(run.status.clone().unwrap_or_default().notifications);
    let delivery = Delivery {
        notifier: &notifier,
        run: &run,
        runs: &runs,
        phase,
        deadline,
        entries: &entries,
        stop: &stop,
        gone,
    };
    futures::future::join_all(due.into_iter().map(|(i, hook)| delivery.deliver(i, hook))).await;
}

/// The deliveries of one run's phase.
struct Delivery<'a> {
    notifier: &'a Notifier,
    run: &'a NotebookRun,
    runs: &'a Api<NotebookRun>,
    phase: RunPhase,
    /// Retries stop after this instant (one attempt is made anyway).
    deadline: jiff::Timestamp,
    /// This manager's entries of the run, as last written.
    entries: &'a Mutex<Vec<NotificationStatus>>,
    stop: &'a CancellationToken,
    /// The run was deleted before the first attempt: one attempt, nothing recorded.
    gone: bool,
}

// === impl Delivery ===

impl Delivery<'_> {
    /// Attempts until delivered or the retries run out, recording each attempt in the status.
    async fn deliver(&self, index: u32, hook: Webhook) {
        let phase = self.phase;
        let mut entry =
            self.entries.lock().await.iter().find(|e| e.webhook == index && e.phase == phase).cloned();
        let mut entry = entry.take().unwrap_or(NotificationStatus {
            webhook: index,
            phase,
            state: NotificationState::Pending,
            attempts: 0,
            last_attempt_time: None,
            last_error: None,
            delivered_at: None,
        });
        loop {
            // After a restart the backoff counts from the last recorded attempt.
            if let Some(last) = &entry.last_attempt_time {
                let next = last.0 + backoff(entry.attempts);
                let wait = next.duration_since(jiff::Timestamp::now());
                if wait.is_positive() {
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(wait.unsigned_abs()) => {}
                    }
                }
            }
            // A run deleted meanwhile stops its retries; its first attempt is still made.
            let first = entry.last_attempt_time.is_none();
            if (!first && self.stop.is_cancelled()) || !self.notifier.leadership.is_leading() {
                return;
            }
            let result = {
                let Ok(_permit) = self.notifier.attempts.acquire().await else { return };
                self.attempt(&hook).await
            };
            if self.gone {
                let outcome = if result.is_ok() { "delivered" } else { "failed" };
                self.notifier.metrics.notification(outcome);
                match result {
                    Ok(()) => info!(webhook = index, "notification of a deleted run delivered"),
                    Err(why) => {
                        warn!(webhook = index, error = %why, "notification of a deleted run failed (not retried)")
                    }
                }
                return;
            }
            let now = jiff::Timestamp::now();
            entry.attempts = entry.attempts.saturating_add(1);
            entry.last_attempt_time = Some(Time(now));
            match result {
                Ok(()) => {
                    entry.state = NotificationState::Delivered;
                    entry.delivered_at = Some(Time(now));
                }
                Err(why) => {
                    debug!(webhook = index, attempts = entry.attempts, error = %why, "notification attempt failed");
                    entry.last_error = Some(crate::status::keep_head(&why, MAX_ERROR_CHARS));
                    if now + backoff(entry.attempts) > self.deadline {
                        entry.state = NotificationState::Failed;
                    }
                }
            }
            // A run deleted meanwhile, or a lead lost: nothing more to write.
            if !self.notifier.leadership.is_leading() || !self.record(&entry).await {
                return;
            }
            match entry.state {
                NotificationState::Pending => {}
                NotificationState::Delivered => {
                    self.notifier.metrics.notification("delivered");
                    let note = format!(
                        "webhook {index} ({}) delivered after {} attempt(s)",
                        phase.as_str(),
                        entry.attempts
                    );
                    info!(webhook = index, attempts = entry.attempts, "notification delivered");
                    self.event(index, EventType::Normal, "NotificationDelivered", note).await;
                    return;
                }
                NotificationState::Failed => {
                    self.notifier.metrics.notification("failed");
                    let note = format!(
                        "webhook {index} ({}): gave up after {} attempt(s) in {}: {}",
                        phase.as_str(),
                        entry.attempts,
                        humantime(self.notifier.config.retry_for),
                        entry.last_error.as_deref().unwrap_or_default()
                    );
                    warn!(webhook = index, attempts = entry.attempts, "notification failed");
                    self.event(index, EventType::Warning, "NotificationFailed", note).await;
                    return;
                }
            }
        }
    }

    /// One POST: the URL read from its Secret now (a fixed Secret heals the next attempt).
    async fn attempt(&self, hook: &Webhook) -> Result<(), String> {
        let url = self.url(hook).await?;
        let public_url = self.notifier.config.public_url.as_deref();
        let body = match hook.format {
            NotifyFormat::Json => body::json_body(self.run, self.phase, public_url),
            NotifyFormat::Slack => body::slack_body(self.run, self.phase, public_url),
        };
        let key = body::idempotency_key(&self.run.uid().unwrap_or_default(), self.phase);
        let sent =
            self.notifier.http.post(url.clone()).header("Idempotency-Key", key).json(&body).send().await;
        let scrub = |text: String| text.replace(url.as_str(), "<url>");
        let mut answer = match sent {
            Ok(answer) => answer,
            Err(e) => return Err(scrub(describe(&e, self.notifier.config.attempt_timeout))),
        };
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        let mut text = Vec::new();
        while text.len() < MAX_ANSWER_BYTES {
            match answer.chunk().await {
                Ok(Some(chunk)) => text.extend_from_slice(&chunk),
                _ => break,
            }
        }
        text.truncate(MAX_ANSWER_BYTES);
        let text = String::from_utf8_lossy(&text);
        let text = text.trim();
        let mut why = format!("HTTP {status}");
        if status.is_redirection() {
            why.push_str(" (redirects are not followed)");
        }
        if !text.is_empty() {
            why.push_str(": ");
            why.push_str(text);
        }
        Err(scrub(why))
    }

    /// The webhook's URL from its Secret in the run's namespace.
    async fn url(&self, hook: &Webhook) -> Result<reqwest::Url, String> {
        let r = &hook.url_from.secret_key_ref;
        let secrets: Api<Secret> = Api::namespaced(self.notifier.client.clone(), &self.ns());
        let secret = match secrets.get_opt(&r.name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => return Err(format!("Secret {} not found", r.name)),
            Err(kube::Error::Api(ae)) => {
                return Err(format!("Secret {} could not be read: {}", r.name, ae.message));
            }
            Err(e) => return Err(format!("Secret {} could not be read: {e}", r.name)),
        };
        let value = secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|v| v.0.clone()).or_else(|| {
            secret.string_data.as_ref().and_then(|d| d.get(&r.key)).map(|v| v.clone().into_bytes())
        });
        let Some(value) = value else { return Err(format!("Secret {} has no key {}", r.name, r.key)) };
        let text = String::from_utf8_lossy(&value);
        match reqwest::Url::parse(text.trim()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
            _ => Err(format!("key {} of Secret {} is not an http(s) URL", r.key, r.name)),
        }
    }

    /// Writes this entry beside the others of the run; false when the run is gone (or the
    /// delivery was stopped while the write was retried).
    async fn record(&self, entry: &NotificationStatus) -> bool {
        let mut entries = self.entries.lock().await;
        match entries.iter_mut().find(|e| e.webhook == entry.webhook && e.phase == entry.phase) {
            Some(e) => *e = entry.clone(),
            None => entries.push(entry.clone()),
        }
        let patch = json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookRun",
            "metadata": {"name": self.run.name_any()},
            "status": {"notifications": *entries},
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut wait = FIRST_BACKOFF;
        loop {
            match self.runs.patch_status(&self.run.name_any(), &pp, &Patch::Apply(&patch)).await {
                Ok(_) => return true,
                Err(kube::Error::Api(ae)) if ae.code == 404 => return false,
                // Refused for good (RBAC, an outdated CRD): retrying the same write cannot help.
                Err(kube::Error::Api(ae)) if crate::controller::is_permanent(ae.code) => {
                    warn!(code = ae.code, error = %ae.message, "the notification's status was refused");
                    return false;
                }
                Err(e) => warn!(error = %e, "recording a notification (retried)"),
            }
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = tokio::time::sleep(wait) => {}
            }
            if !self.notifier.leadership.is_leading() {
                return false;
            }
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }

    /// An Event about the run; the action names the webhook, so the recorder does not fold two
    /// webhooks' outcomes into one series (it keys on type, reason and action).
    async fn event(&self, index: u32, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: format!("NotifyWebhook{index}"),
            secondary: None,
        };
        if let Err(e) = self.notifier.recorder.publish(&event, &self.run.object_ref(&())).await {
            debug!(error = %e, "could not publish event");
        }
    }

    fn ns(&self) -> String {
        self.run.namespace().unwrap_or_default()
    }
}

/// Why a request failed, without its URL (a secret).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {}", humantime(timeout));
    }
    let mut why = if e.is_connect() { "could not connect".to_string() } else { "request failed".to_string() };
    let mut source = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = source {
        let text = s.to_string();
        // Each layer of hyper's chain tends to repeat the next: keep the distinct ones.
        if !text.is_empty() && !last.contains(&text) {
            why.push_str(": ");
            why.push_str(&text);
        }
        last = text;
        source = s.source();
    }
    why
}

fn humantime(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        s if s % 60 == 0 && s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn run(phase: &str, notify: Value, notifications: Value) -> NotebookRun {
        serde_json::from_value(json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u"},
            "spec": {"notebook": {"path": "/nb.ipynb"}, "notify": notify},
            "status": {"phase": phase, "notifications": notifications},
        }))
        .unwrap()
    }

    fn hook(phases: Value) -> Value {
        json!({"urlFrom": {"secretKeyRef": {"name": "hooks", "key": "url"}}, "phases": phases})
    }

    fn indexes(run: &NotebookRun) -> Vec<u32> {
        due(run).into_iter().map(|(i, _)| i).collect()
    }

    #[test]
    fn webhooks_are_due_for_their_phases_until_delivered_or_given_up() {
        let hooks = json!({"webhooks": [hook(json!(["Failed"])), hook(json!(["Succeeded"])), hook(json!(["Failed", "Cancelled"]))]});
        let table: [(&str, Value, Vec<u32>); 6] = [
            ("Running", json!([]), vec![]),
            ("Failed", json!([]), vec![0, 2]),
            ("Succeeded", json!([]), vec![1]),
            (
                "Failed",
                json!([{"webhook": 0, "phase": "Failed", "state": "Pending", "attempts": 2}]),
                vec![0, 2],
            ),
            (
                "Failed",
                json!([{"webhook": 0, "phase": "Failed", "state": "Delivered", "attempts": 1},
                              {"webhook": 2, "phase": "Failed", "state": "Failed", "attempts": 9}]),
                vec![],
            ),
            ("Cancelled", json!([{"webhook": 2, "phase": "Failed", "state": "Delivered"}]), vec![2]),
        ];
        for (phase, notifications, expected) in table {
            assert_eq!(
                indexes(&run(phase, hooks.clone(), notifications.clone())),
                expected,
                "{phase} {notifications}"
            );
        }
    }

    #[test]
    fn default_phases_are_failed_only() {
        let hooks = json!({"webhooks": [{"urlFrom": {"secretKeyRef": {"name": "h", "key": "u"}}}]});
        assert_eq!(indexes(&run("Failed", hooks.clone(), json!([]))), vec![0]);
        assert_eq!(indexes(&run("Succeeded", hooks, json!([]))), Vec::<u32>::new());
    }

    #[test]
    fn a_run_without_notify_or_being_deleted_has_nothing_due() {
        let mut r = run("Failed", Value::Null, json!([]));
        assert!(due(&r).is_empty());
        r = run("Failed", json!({"webhooks": [hook(json!(["Failed"]))]}), json!([]));
        r.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert!(due(&r).is_empty());
    }

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // Ten minutes of retries make a dozen attempts or more.
        let mut total = Duration::ZERO;
        let mut n = 0;
        while total <= Duration::from_secs(600) {
            n += 1;
            total += backoff(n);
        }
        assert!(n >= 12, "{n}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_described_without_its_url() {
        // Port 1 on the loopback: nothing listens there.
        let url = "http://127.0.0.1:1/hooks/T0KEN-s3cr3t";
        let err = reqwest::Client::new().post(url).send().await.expect_err("nothing listens");
        let why = describe(&err, Duration::from_secs(10));
        assert!(why.starts_with("could not connect"), "{why}");
        assert!(!why.contains("T0KEN") && !why.contains("127.0.0.1:1"), "{why}");
    }

    #[test]
    fn durations_read_as_flags() {
        assert_eq!(humantime(Duration::from_secs(600)), "10m");
        assert_eq!(humantime(Duration::from_secs(90)), "90s");
        assert_eq!(humantime(Duration::from_millis(500)), "500ms");
    }
}
