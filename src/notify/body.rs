//! Pure builders of what a webhook receives: the JSON body, the Slack message, the links to the
//! facade and the idempotency key. No I/O: table tests below.

use serde_json::{Value, json};

use crate::crd::{NotebookRun, RunPhase};
use kube::ResourceExt;

/// Longest message or error value quoted in a Slack message (Slack cuts a section at 3000).
const SLACK_MAX_TEXT: usize = 500;

/// `Idempotency-Key`: the same for every attempt (and every controller) delivering one phase of one run.
pub fn idempotency_key(uid: &str, phase: RunPhase) -> String {
    format!("{uid}-{}", phase.as_str())
}

/// Links to the run on the REST facade at `public_url` (its dashboard page, resource and seed
/// endpoints), or None when no public URL is configured.
pub fn links(public_url: Option<&str>, run: &str) -> Option<Value> {
    let base = public_url?.trim_end_matches('/');
    Some(json!({
        "dashboard": format!("{base}/ui/#/runs/{run}"),
        "run": format!("{base}/runs/{run}"),
        "progress": format!("{base}/progress?task_id={run}"),
        "output": format!("{base}/output?task_id={run}"),
        "logs": format!("{base}/runs/{run}/logs"),
        "notebook": format!("{base}/runs/{run}/notebook"),
    }))
}

/// The JSON body (`format: json`): every key always present, null when unknown.
pub fn json_body(run: &NotebookRun, phase: RunPhase, public_url: Option<&str>) -> Value {
    let status = run.status.clone().unwrap_or_default();
    let error = status.error.as_ref().map(|e| json!({"ename": e.ename, "evalue": e.evalue, "cell": e.cell}));
    let started = status.start_time.as_ref().map(|t| t.0);
    let finished = status.completion_time.as_ref().map(|t| t.0);
    let duration = match (started, finished) {
        (Some(s), Some(f)) => Some(f.duration_since(s).as_secs().max(0)),
        _ => None,
    };
    json!({
        "run": run.name_any(),
        "namespace": run.namespace(),
        "uid": run.uid(),
        "phase": phase.as_str(),
        "reason": status.reason.map(|r| r.as_str()),
        "message": status.message,
        "error": error,
        "startedAt": started.map(|t| t.to_string()),
        "finishedAt": finished.map(|t| t.to_string()),
        "durationSeconds": duration,
        "links": links(public_url, &run.name_any()),
    })
}

/// A Slack incoming-webhook message (`format: slack`): `text` for notifications and clients
/// without blocks, `blocks` with the run, phase, reason, error and a link when there is one.
pub fn slack_body(run: &NotebookRun, phase: RunPhase, public_url: Option<&str>) -> Value {
    let status = run.status.clone().unwrap_or_default();
    let name = run.name_any();
    let ns = run.namespace().unwrap_or_default();
    let reason = status.reason.map(|r| r.as_str()).unwrap_or(phase.as_str());
    let icon = match phase {
        RunPhase::Succeeded => ":white_check_mark:",
        RunPhase::Failed => ":x:",
        RunPhase::Cancelled => ":no_entry_sign:",
        _ => ":warning:",
    };
    let error_line = status.error.as_ref().and_then(|e| {
        let line = match (&e.ename, &e.evalue) {
            (Some(n), Some(v)) => format!("{n}: {v}"),
            (Some(n), None) => n.clone(),
            (None, Some(v)) => v.clone(),
            (None, None) => return None,
        };
        Some((cut(&line, SLACK_MAX_TEXT), e.cell))
    });
    let mut text = format!("{icon} NotebookRun {ns}/{name} {} ({reason})", phase.as_str());
    if let Some((line, _)) = &error_line {
        text.push_str(&format!(": {line}"));
    }
    let mut head = format!(
        "{icon} *NotebookRun `{}` {}* in namespace `{}`\n*Reason:* {reason}",
        escape(&name),
        phase.as_str(),
        escape(&ns)
    );
    if let Some(message) = status.message.as_deref().filter(|m| !m.is_empty()) {
        head.push('\n');
        head.push_str(&escape(&cut(message, SLACK_MAX_TEXT)));
    }
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": head}})];
    if let Some((line, cell)) = &error_line {
        let at = cell.map(|c| format!(" in cell {c}")).unwrap_or_default();
        let error = format!("*Error{at}:*\n```{}```", escape(line));
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": error}}));
    }
    let started = status.start_time.as_ref().map(|t| t.0);
    let finished = status.completion_time.as_ref().map(|t| t.0);
    let mut context = Vec::new();
    if let Some(s) = started {
        context.push(format!("started {s}"));
    }
    if let Some(f) = finished {
        context.push(format!("finished {f}"));
    }
    if let (Some(s), Some(f)) = (started, finished) {
        context.push(format!("{} s", f.duration_since(s).as_secs().max(0)));
    }
    if !context.is_empty() {
        blocks
            .push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": context.join(" · ")}]}));
    }
    if let Some(links) = links(public_url, &name) {
        let link = |key: &str, label: &str| format!("<{}|{label}>", links[key].as_str().unwrap_or_default());
        let text =
            [link("dashboard", "Open the run"), link("output", "Output"), link("logs", "Log")].join(" · ");
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": text}}));
    }
    json!({"text": text, "blocks": blocks})
}

/// Slack's mrkdwn escapes: `&`, `<` and `>` only.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn cut(text: &str, max: usize) -> String {
    crate::status::keep_head(text, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(status: Value) -> NotebookRun {
        serde_json::from_value(json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookRun",
            "metadata": {"name": "nightly", "namespace": "team-a", "uid": "u-1"},
            "spec": {"notebook": {"path": "/nb.ipynb"}},
            "status": status,
        }))
        .unwrap()
    }

    fn failed() -> NotebookRun {
        run(json!({
            "phase": "Failed",
            "reason": "CellError",
            "message": "cell 2 raised ZeroDivisionError",
            "startTime": "2026-11-29T07:00:00Z",
            "completionTime": "2026-11-29T07:00:12Z",
            "error": {"reason": "CellError", "ename": "ZeroDivisionError", "evalue": "division by zero", "cell": 2, "traceback": "..."}
        }))
    }

    #[test]
    fn json_body_carries_the_outcome() {
        let body = json_body(&failed(), RunPhase::Failed, None);
        assert_eq!(
            body,
            json!({
                "run": "nightly",
                "namespace": "team-a",
                "uid": "u-1",
                "phase": "Failed",
                "reason": "CellError",
                "message": "cell 2 raised ZeroDivisionError",
                "error": {"ename": "ZeroDivisionError", "evalue": "division by zero", "cell": 2},
                "startedAt": "2026-11-29T07:00:00Z",
                "finishedAt": "2026-11-29T07:00:12Z",
                "durationSeconds": 12,
                "links": null,
            })
        );
    }

    #[test]
    fn json_body_has_nulls_for_what_a_run_never_had() {
        // A Rejected run never started and has no error: the keys stay, with null.
        let rejected = run(json!({"phase": "Rejected", "reason": "LockHeld", "message": "held by a",
            "completionTime": "2026-11-29T07:00:00Z"}));
        let body = json_body(&rejected, RunPhase::Rejected, None);
        assert_eq!(body["reason"], "LockHeld");
        assert_eq!(body["error"], Value::Null);
        assert_eq!(body["startedAt"], Value::Null);
        assert_eq!(body["durationSeconds"], Value::Null);
        assert_eq!(body["finishedAt"], "2026-11-29T07:00:00Z");
        assert_eq!(body.as_object().unwrap().len(), 11, "every key is always there: {body}");
    }

    #[test]
    fn links_point_at_the_facade_when_it_has_a_public_url() {
        let table = [
            (None, None),
            (
                Some("https://nb.example.com/"),
                Some(json!({
                    "dashboard": "https://nb.example.com/ui/#/runs/nightly",
                    "run": "https://nb.example.com/runs/nightly",
                    "progress": "https://nb.example.com/progress?task_id=nightly",
                    "output": "https://nb.example.com/output?task_id=nightly",
                    "logs": "https://nb.example.com/runs/nightly/logs",
                    "notebook": "https://nb.example.com/runs/nightly/notebook",
                })),
            ),
            (
                Some("http://10.0.0.1:8000/nb"),
                Some(json!({
                    "dashboard": "http://10.0.0.1:8000/nb/ui/#/runs/nightly",
                    "run": "http://10.0.0.1:8000/nb/runs/nightly",
                    "progress": "http://10.0.0.1:8000/nb/progress?task_id=nightly",
                    "output": "http://10.0.0.1:8000/nb/output?task_id=nightly",
                    "logs": "http://10.0.0.1:8000/nb/runs/nightly/logs",
                    "notebook": "http://10.0.0.1:8000/nb/runs/nightly/notebook",
                })),
            ),
        ];
        for (url, expected) in table {
            assert_eq!(links(url, "nightly"), expected, "{url:?}");
            assert_eq!(json_body(&failed(), RunPhase::Failed, url)["links"], expected.unwrap_or(Value::Null));
        }
    }

    #[test]
    fn idempotency_key_is_uid_and_phase() {
        assert_eq!(idempotency_key("u-1", RunPhase::Failed), "u-1-Failed");
        assert_eq!(idempotency_key("u-1", RunPhase::Succeeded), "u-1-Succeeded");
    }

    #[test]
    fn slack_body_has_text_and_blocks() {
        let body = slack_body(&failed(), RunPhase::Failed, Some("https://nb.example.com"));
        assert_eq!(
            body["text"],
            ":x: NotebookRun team-a/nightly Failed (CellError): ZeroDivisionError: division by zero"
        );
        let blocks = body["blocks"].as_array().unwrap();
        let types: Vec<&str> = blocks.iter().map(|b| b["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["section", "section", "context", "section"]);
        let head = blocks[0]["text"]["text"].as_str().unwrap();
        assert!(head.contains("*NotebookRun `nightly` Failed* in namespace `team-a`"), "{head}");
        assert!(head.contains("*Reason:* CellError"), "{head}");
        assert_eq!(
            blocks[1]["text"]["text"],
            "*Error in cell 2:*\n```ZeroDivisionError: division by zero```"
        );
        assert_eq!(
            blocks[2]["elements"][0]["text"],
            "started 2026-11-29T07:00:00Z · finished 2026-11-29T07:00:12Z · 12 s"
        );
        let link = blocks[3]["text"]["text"].as_str().unwrap();
        assert!(link.starts_with("<https://nb.example.com/ui/#/runs/nightly|Open the run>"), "{link}");
        for block in blocks {
            assert_eq!(block.get("text").map_or("mrkdwn", |t| t["type"].as_str().unwrap()), "mrkdwn");
        }
    }

    #[test]
    fn slack_body_without_error_or_links() {
        let ok = run(json!({"phase": "Succeeded", "reason": "Succeeded", "message": "3 cells ran",
            "startTime": "2026-11-29T07:00:00Z", "completionTime": "2026-11-29T07:00:01Z"}));
        let body = slack_body(&ok, RunPhase::Succeeded, None);
        assert_eq!(body["text"], ":white_check_mark: NotebookRun team-a/nightly Succeeded (Succeeded)");
        let types: Vec<&str> =
            body["blocks"].as_array().unwrap().iter().map(|b| b["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["section", "context"]);
    }

    #[test]
    fn slack_text_is_escaped_and_bounded() {
        let long = format!("<script> & {}", "x".repeat(2000));
        let odd = run(json!({"phase": "Failed", "reason": "CellError", "message": long,
            "error": {"ename": "E", "evalue": "a < b"}}));
        let body = slack_body(&odd, RunPhase::Failed, None);
        let head = body["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(head.contains("&lt;script&gt; &amp; x"), "{head}");
        assert!(head.chars().count() < 700, "bounded: {}", head.len());
        assert_eq!(body["blocks"][1]["text"]["text"], "*Error:*\n```E: a &lt; b```");
    }
}
