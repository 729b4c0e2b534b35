//! Notifications when a run ends (`spec.notify`), on the real control plane: the controller
//! binary delivers to webhook receivers listening on the loopback inside the test.

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use notebook_operator::crd::{NotificationState, NotificationStatus};
use notebook_operator::{NotebookRun, RunPhase};
use serde_json::{Value, json};

use support::operator::install_crd;
use support::runs::{RUN_TIMEOUT, RunEnv, run_of};
use support::{ControlPlane, wait_for};

const PUBLIC_URL: &str = "http://notebooks.test:8000";
/// The failing notebook: cell 1 raises.
const FAILING: [&str; 2] = ["x = 1", "x / 0"];
const SUCCEEDING: [&str; 1] = ["print('fine')"];

// === a webhook receiver on the loopback ===

/// What a receiver answers, in turn; 200 once the script is used up.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// Accept the request and never answer.
    Hang,
}

#[derive(Clone, Debug)]
struct Seen {
    headers: HeaderMap,
    body: Value,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }
}

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
}

impl Receiver {
    /// Listens on 127.0.0.1; the URL carries a token in its path, as chat webhooks do.
    async fn start(script: &[Answer]) -> (Self, String) {
        let receiver = Receiver::default();
        receiver.script.lock().unwrap().extend(script.iter().copied());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(Self::handle).with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, format!("http://{addr}/hooks/T0KEN-s3cr3t"))
    }

    async fn handle(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
        let body = serde_json::from_slice(&body)
            .unwrap_or_else(|_| json!({"unparsed": String::from_utf8_lossy(&body)}));
        r.seen.lock().unwrap().push(Seen { headers, body });
        let answer = r.script.lock().unwrap().pop_front();
        match answer {
            Some(Answer::Status(code)) => {
                (StatusCode::from_u16(code).unwrap(), "the receiver is unwell today").into_response()
            }
            Some(Answer::Hang) => std::future::pending().await,
            None => (StatusCode::OK, "thanks").into_response(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The deliveries about one run.
    fn about(&self, run: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.body["run"] == run || text_names(&s.body, run)).collect()
    }

    async fn wait_for_requests(&self, n: usize, what: &str) -> Vec<Seen> {
        wait_for(RUN_TIMEOUT, format!("{n} request(s): {what}"), || {
            let seen = self.seen();
            async move { (seen.len() >= n).then_some(seen) }
        })
        .await
    }
}

/// Whether a Slack body names the run.
fn text_names(body: &Value, run: &str) -> bool {
    body["text"].as_str().is_some_and(|t| t.contains(&format!("/{run} ")))
}

// === helpers ===

async fn env(prefix: &str, args: &[&str]) -> RunEnv {
    let mut all = vec!["--public-url", PUBLIC_URL];
    all.extend_from_slice(args);
    RunEnv::start_with(prefix, &all).await
}

async fn secret(env: &RunEnv, name: &str, data: Value) {
    let secret: Secret = support::from_json(json!({"metadata": {"name": name}, "stringData": data}));
    env.ns.api::<Secret>().create(&PostParams::default(), &secret).await.expect("create Secret");
}

fn webhook(secret: &str, phases: Option<Value>, format: Option<&str>) -> Value {
    let mut hook = json!({"urlFrom": {"secretKeyRef": {"name": secret, "key": "url"}}});
    if let Some(p) = phases {
        hook["phases"] = p;
    }
    if let Some(f) = format {
        hook["format"] = json!(f);
    }
    hook
}

fn notify(hooks: &[Value]) -> Value {
    json!({"notify": {"webhooks": hooks}})
}

fn notifications(run: &NotebookRun) -> Vec<NotificationStatus> {
    run.status.as_ref().map(|s| s.notifications.clone()).unwrap_or_default()
}

fn entry(run: &NotebookRun, webhook: u32) -> Option<NotificationStatus> {
    notifications(run).into_iter().find(|n| n.webhook == webhook)
}

/// Waits until webhook `index` of `run` reached a final state, and returns the run.
async fn wait_final(env: &RunEnv, run: &str, index: u32) -> NotebookRun {
    env.wait_until(run, &format!("webhook {index} delivered or given up"), |r| {
        entry(r, index).is_some_and(|e| e.state != NotificationState::Pending)
    })
    .await
}

async fn event_reasons(env: &RunEnv, run: &str) -> Vec<(String, String, String)> {
    env.events_for(run)
        .await
        .into_iter()
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

// === tests ===

#[tokio::test]
async fn a_failed_run_is_delivered_once_with_its_outcome_and_key() {
    let mut env = env("notify-once", &["--notify-retry-for", "30s"]).await;
    let (json_hook, json_url) = Receiver::start(&[]).await;
    let (slack_hook, slack_url) = Receiver::start(&[]).await;
    secret(&env, "hooks", json!({"url": json_url})).await;
    secret(&env, "slack", json!({"url": slack_url})).await;

    // Default phases ([Failed]) and a Slack webhook on the same run.
    let hooks = [webhook("hooks", None, None), webhook("slack", None, Some("slack"))];
    env.create(&run_of("fails", &FAILING, notify(&hooks))).await;
    // A success is not reported to a webhook of [Failed]; one of [Succeeded] is.
    let mut quiet = notify(&[webhook("hooks", Some(json!(["Failed"])), None)]);
    quiet["lock"] = json!("quiet");
    env.create(&run_of("quiet", &SUCCEEDING, quiet)).await;
    let mut told = notify(&[webhook("hooks", Some(json!(["Succeeded"])), None)]);
    told["lock"] = json!("told");
    env.create(&run_of("told", &SUCCEEDING, told)).await;

    wait_final(&env, "fails", 0).await;
    let fails = wait_final(&env, "fails", 1).await;
    let status = fails.status.clone().unwrap();
    assert_eq!(status.phase, Some(RunPhase::Failed), "{status:?}");
    for n in notifications(&fails) {
        assert_eq!(
            (n.phase, n.state, n.attempts),
            (RunPhase::Failed, NotificationState::Delivered, 1),
            "{n:?}"
        );
        assert!(n.delivered_at.is_some() && n.last_attempt_time.is_some(), "{n:?}");
    }
    let uid = fails.uid().unwrap();

    let seen = json_hook.about("fails");
    assert_eq!(seen.len(), 1, "one delivery: {seen:?}");
    let got = &seen[0];
    assert_eq!(got.header("idempotency-key"), format!("{uid}-Failed"));
    assert!(got.header("content-type").starts_with("application/json"), "{:?}", got.headers);
    assert!(got.header("user-agent").starts_with("notebook-operator/"), "{:?}", got.headers);
    let error = status.error.clone().expect("the run's error");
    let (started, finished) = (status.start_time.unwrap().0, status.completion_time.unwrap().0);
    let expected = json!({
        "run": "fails",
        "namespace": env.ns.name(),
        "uid": uid,
        "phase": "Failed",
        "reason": "CellError",
        "message": status.message,
        "error": {"ename": "ZeroDivisionError", "evalue": error.evalue, "cell": error.cell},
        "startedAt": started.to_string(),
        "finishedAt": finished.to_string(),
        "durationSeconds": finished.duration_since(started).as_secs(),
        "links": {
            "dashboard": format!("{PUBLIC_URL}/ui/#/runs/fails"),
            "run": format!("{PUBLIC_URL}/runs/fails"),
            "progress": format!("{PUBLIC_URL}/progress?task_id=fails"),
            "output": format!("{PUBLIC_URL}/output?task_id=fails"),
            "logs": format!("{PUBLIC_URL}/runs/fails/logs"),
            "notebook": format!("{PUBLIC_URL}/runs/fails/notebook"),
        },
    });
    assert_eq!(got.body, expected);
    assert_eq!(error.cell, Some(1), "{error:?}");

    // The Slack webhook got a Slack message: text and blocks, with the error and a link.
    let slack = slack_hook.seen();
    assert_eq!(slack.len(), 1, "{slack:?}");
    let body = &slack[0].body;
    let text = body["text"].as_str().expect("text");
    assert!(text.contains(&format!("NotebookRun {}/fails Failed (CellError)", env.ns.name())), "{text}");
    assert!(text.contains("ZeroDivisionError"), "{text}");
    let blocks = body["blocks"].as_array().expect("blocks");
    let all = serde_json::to_string(blocks).unwrap();
    assert!(
        all.contains("*Error in cell 1:*") && all.contains(&format!("<{PUBLIC_URL}/ui/#/runs/fails|")),
        "{all}"
    );
    assert!(blocks.iter().all(|b| b["type"].is_string()), "{all}");
    assert_eq!(slack[0].header("idempotency-key"), format!("{uid}-Failed"));

    let told = wait_final(&env, "told", 0).await;
    assert_eq!(
        entry(&told, 0).map(|e| (e.phase, e.state)),
        Some((RunPhase::Succeeded, NotificationState::Delivered))
    );
    let told_seen = json_hook.about("told");
    assert_eq!(told_seen.len(), 1, "{told_seen:?}");
    assert_eq!(told_seen[0].body["phase"], "Succeeded");
    assert_eq!(told_seen[0].body["error"], Value::Null);

    let quiet = env.wait_phase("quiet", RunPhase::Succeeded).await;
    assert!(notifications(&quiet).is_empty(), "{:?}", quiet.status);

    // At least once, never twice: a restarted controller sends nothing already delivered. A
    // sentinel run reported after the restart marks the point where the resend would have gone.
    env.op.restart();
    let mut sentinel = notify(&[webhook("hooks", None, None)]);
    sentinel["lock"] = json!("sentinel");
    env.create(&run_of("sentinel", &FAILING, sentinel)).await;
    wait_final(&env, "sentinel", 0).await;
    let runs: Vec<Value> = json_hook.seen().iter().map(|s| s.body["run"].clone()).collect();
    let mut sorted = runs.clone();
    sorted.sort_by_key(|v| v.to_string());
    assert_eq!(sorted, [json!("fails"), json!("sentinel"), json!("told")], "one delivery each: {runs:?}");
    assert_eq!(slack_hook.seen().len(), 1);
    assert!(notifications(&env.get("quiet").await).is_empty());
}

#[tokio::test]
async fn a_failing_receiver_is_retried_with_the_same_key_until_it_answers_2xx() {
    let env = env("notify-retry", &["--notify-retry-for", "60s"]).await;
    let (hook, url) = Receiver::start(&[Answer::Status(500), Answer::Status(500)]).await;
    secret(&env, "hooks", json!({"url": url})).await;
    env.create(&run_of("flaky", &FAILING, notify(&[webhook("hooks", None, None)]))).await;

    // While retried, the status says so.
    let pending = env
        .wait_until("flaky", "a failed attempt recorded", |r| entry(r, 0).is_some_and(|e| e.attempts >= 1))
        .await;
    let first = entry(&pending, 0).unwrap();
    let error = first.last_error.clone().unwrap_or_default();
    assert!(error.contains("HTTP 500"), "{first:?}");
    assert!(!error.contains("T0KEN") && !error.contains("127.0.0.1"), "the URL is a secret: {error}");

    let done = wait_final(&env, "flaky", 0).await;
    let e = entry(&done, 0).unwrap();
    assert_eq!((e.state, e.attempts), (NotificationState::Delivered, 3), "{e:?}");
    assert!(e.delivered_at.is_some());
    let seen = hook.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let key = format!("{}-Failed", done.uid().unwrap());
    assert!(
        seen.iter().all(|s| s.header("idempotency-key") == key),
        "{:?}",
        seen.iter().map(|s| s.header("idempotency-key")).collect::<Vec<_>>()
    );
    assert!(seen.windows(2).all(|w| w[0].body == w[1].body), "every attempt sends the same body");
    // The notifier owns its entries under a field manager of its own; the run's own status
    // was not disturbed by its writes.
    let managers: Vec<(String, String)> = done
        .managed_fields()
        .iter()
        .map(|m| (m.manager.clone().unwrap_or_default(), m.subresource.clone().unwrap_or_default()))
        .collect();
    assert!(managers.contains(&("notebook-operator-notify".into(), "status".into())), "{managers:?}");
    let status = done.status.unwrap();
    assert_eq!(
        (status.phase, status.reason.map(|r| r.as_str())),
        (Some(RunPhase::Failed), Some("CellError"))
    );
    assert!(status.error.is_some() && !status.conditions.is_empty());
}

#[tokio::test]
async fn a_restarted_controller_resumes_a_pending_delivery_with_the_same_key() {
    let mut env = env("notify-resume", &["--notify-retry-for", "60s"]).await;
    let (hook, url) = Receiver::start(&[Answer::Status(503), Answer::Status(503), Answer::Status(503)]).await;
    secret(&env, "hooks", json!({"url": url})).await;
    env.create(&run_of("resumed", &FAILING, notify(&[webhook("hooks", None, None)]))).await;
    env.wait_until("resumed", "a failed attempt recorded", |r| entry(r, 0).is_some_and(|e| e.attempts >= 1))
        .await;
    // A crash while the delivery is pending: the next controller reads where it stood.
    env.op.kill();
    let recorded = entry(&env.get("resumed").await, 0).unwrap().attempts;
    let sent = hook.seen().len();
    env.op.restart();
    let done = wait_final(&env, "resumed", 0).await;
    let e = entry(&done, 0).unwrap();
    assert_eq!(e.state, NotificationState::Delivered, "{e:?}");
    let sent_since = hook.seen().len() - sent;
    assert!(sent_since >= 1, "the restarted controller delivered");
    assert_eq!(e.attempts, recorded + sent_since as u32, "attempts count on from the status: {e:?}");
    let seen = hook.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    let key = format!("{}-Failed", done.uid().unwrap());
    assert!(seen.iter().all(|s| s.header("idempotency-key") == key));
}

#[tokio::test]
async fn a_run_deleted_at_once_gets_one_attempt_and_no_retries() {
    let env = env("notify-ttl", &["--notify-retry-for", "60s"]).await;
    let (hook, url) = Receiver::start(&[Answer::Status(500)]).await;
    secret(&env, "hooks", json!({"url": url})).await;
    let mut spec = notify(&[webhook("hooks", None, None)]);
    spec["ttlSecondsAfterFinished"] = json!(0);
    spec["lock"] = json!("gone");
    env.create(&run_of("gone", &FAILING, spec)).await;
    hook.wait_for_requests(1, "the deleted run's attempt").await;
    wait_for(RUN_TIMEOUT, "the run deleted by its TTL", || {
        let runs = env.runs.clone();
        async move { runs.get_opt("gone").await.is_ok_and(|r| r.is_none()) }
    })
    .await;
    // The 500 would be retried after 1s for a run that still existed: a sentinel reported
    // afterwards (it runs for longer than that) marks the point where the retry would have come.
    let mut sentinel = notify(&[webhook("hooks", None, None)]);
    sentinel["lock"] = json!("sentinel");
    env.create(&run_of("sentinel", &FAILING, sentinel)).await;
    wait_final(&env, "sentinel", 0).await;
    let runs: Vec<Value> = hook.seen().iter().map(|s| s.body["run"].clone()).collect();
    assert_eq!(runs, [json!("gone"), json!("sentinel")], "one attempt for the deleted run, no retry");
}

#[tokio::test]
async fn a_receiver_that_never_answers_fails_after_the_budget_and_blocks_no_other_run() {
    // One attempt may hang 20s; retries stop 1s after the run ended: one attempt, then Failed.
    let env = env("notify-hang", &["--notify-retry-for", "1s", "--notify-attempt-timeout", "20s"]).await;
    let (hung, hung_url) = Receiver::start(&[Answer::Hang]).await;
    let (good, good_url) = Receiver::start(&[]).await;
    secret(&env, "hung", json!({"url": hung_url})).await;
    secret(&env, "good", json!({"url": good_url})).await;

    let mut spec = notify(&[webhook("hung", None, None)]);
    spec["lock"] = json!("a");
    env.create(&run_of("stuck", &FAILING, spec)).await;
    hung.wait_for_requests(1, "the hanging receiver got the notification").await;

    // Meanwhile another run's notification goes through.
    let mut spec = notify(&[webhook("good", None, None)]);
    spec["lock"] = json!("b");
    env.create(&run_of("other", &FAILING, spec)).await;
    let other = wait_final(&env, "other", 0).await;
    assert_eq!(entry(&other, 0).map(|e| e.state), Some(NotificationState::Delivered));
    assert_eq!(good.about("other").len(), 1);
    let stuck = env.get("stuck").await;
    assert!(
        entry(&stuck, 0).is_none_or(|e| e.state == NotificationState::Pending),
        "the other run was delivered while the hanging attempt was still open: {:?}",
        notifications(&stuck)
    );

    let stuck = wait_final(&env, "stuck", 0).await;
    let e = entry(&stuck, 0).unwrap();
    assert_eq!((e.state, e.attempts), (NotificationState::Failed, 1), "{e:?}");
    let error = e.last_error.unwrap_or_default();
    assert!(error.contains("no answer within 20s"), "{error}");
    assert!(!error.contains("T0KEN"), "{error}");
    let events = wait_for(RUN_TIMEOUT, "a NotificationFailed Event", || {
        let env = &env;
        async move {
            let events = event_reasons(env, "stuck").await;
            events.iter().any(|(_, reason, _)| reason == "NotificationFailed").then_some(events)
        }
    })
    .await;
    let (kind, _, message) = events.iter().find(|(_, r, _)| r == "NotificationFailed").unwrap();
    assert_eq!(kind, "Warning");
    assert!(message.contains("webhook 0 (Failed)") && message.contains("no answer within 20s"), "{message}");
    assert_eq!(hung.seen().len(), 1, "no retry past the budget");
}

#[tokio::test]
async fn a_missing_secret_or_key_fails_the_notification_with_a_clear_error() {
    let env = env("notify-secret", &["--notify-retry-for", "2s"]).await;
    secret(&env, "keyless", json!({"other": "http://127.0.0.1:1/"})).await;
    let hooks = [webhook("absent", None, None), webhook("keyless", None, None)];
    env.create(&run_of("nohook", &FAILING, notify(&hooks))).await;
    wait_final(&env, "nohook", 0).await;
    let run = wait_final(&env, "nohook", 1).await;
    let absent = entry(&run, 0).unwrap();
    assert_eq!(absent.state, NotificationState::Failed, "{absent:?}");
    assert!(absent.attempts >= 1);
    assert_eq!(absent.last_error.as_deref(), Some("Secret absent not found"));
    let keyless = entry(&run, 1).unwrap();
    assert_eq!(keyless.state, NotificationState::Failed, "{keyless:?}");
    assert_eq!(keyless.last_error.as_deref(), Some("Secret keyless has no key url"));
    let events = wait_for(RUN_TIMEOUT, "two NotificationFailed Events", || {
        let env = &env;
        async move {
            let events = event_reasons(env, "nohook").await;
            let failed: Vec<_> = events.into_iter().filter(|(_, r, _)| r == "NotificationFailed").collect();
            (failed.len() >= 2).then_some(failed)
        }
    })
    .await;
    assert!(events.iter().any(|(_, _, m)| m.contains("Secret absent not found")), "{events:?}");
    // The run itself ended as it would have without webhooks.
    assert_eq!(run.status.unwrap().reason.map(|r| r.as_str()), Some("CellError"));
}

#[tokio::test]
async fn webhooks_report_terminal_phases_only() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("notify-valid").await;
    let runs: Api<NotebookRun> = ns.api();
    let bad = run_of("bad", &SUCCEEDING, notify(&[webhook("hooks", Some(json!(["Running"])), None)]));
    let err = runs.create(&PostParams::default(), &bad).await.expect_err("a non-terminal phase is refused");
    assert!(err.to_string().contains("phases must be terminal phases"), "{err}");
    let many: Vec<Value> = (0..11).map(|_| webhook("hooks", None, None)).collect();
    let err = runs
        .create(&PostParams::default(), &run_of("many", &SUCCEEDING, notify(&many)))
        .await
        .expect_err("at most 10 webhooks");
    assert!(err.to_string().contains("webhooks"), "{err}");
    // Defaults filled by the API server: phases [Failed], format json; and notify is immutable.
    let ok = runs
        .create(&PostParams::default(), &run_of("ok", &SUCCEEDING, notify(&[webhook("hooks", None, None)])))
        .await
        .expect("a valid notify");
    let hook = &ok.spec.notify.as_ref().unwrap().webhooks[0];
    assert_eq!(hook.phases, [RunPhase::Failed]);
    assert_eq!(serde_json::to_value(hook.format).unwrap(), json!("json"));
    let patch = json!({"spec": {"notify": {"webhooks": []}}});
    let err = runs
        .patch("ok", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .expect_err("notify is immutable");
    assert!(err.to_string().contains("immutable"), "{err}");
}
