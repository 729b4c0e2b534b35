//! Pure status derivation: a finished Job and its pod → phase, reason, message, error; a pod
//! stuck before start → the waiting reason; conditions with stable transition times.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{NotebookRunStatus, Progress, Reason, RunError, RunPhase};
use crate::progress::{self, TerminationMessage};

/// Waiting reasons that mean the pod will not start by itself soon.
pub const START_PROBLEMS: [&str; 6] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "Unschedulable",
];

/// Waiting reasons that no wait can heal: the run fails as soon as its pod shows one.
pub const START_FAILURES: [&str; 3] = ["CreateContainerConfigError", "InvalidImageName", "ErrImageNeverPull"];

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub phase: RunPhase,
    pub reason: Reason,
    pub message: String,
    pub error: Option<RunError>,
    pub progress: Option<Progress>,
}

/// `Some(true)` when the Job completed, `Some(false)` when it failed, `None` while it runs.
pub fn job_finished(job: &Job) -> Option<(bool, Option<String>)> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().filter(|c| c.status == "True").find_map(|c| match c.type_.as_str() {
        "Complete" => Some((true, c.reason.clone())),
        "Failed" => Some((false, c.reason.clone())),
        _ => None,
    })
}

/// The terminated state of the runner container, if it ended.
fn terminated(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == crate::job::CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}

/// Phase and reason of a finished Job, from its conditions, the container's terminated state
/// and the runner's termination message.
pub fn outcome(job: &Job, pod: Option<&Pod>) -> Option<Outcome> {
    let (complete, job_reason) = job_finished(job)?;
    let term = pod.and_then(terminated);
    let message = term.and_then(|t| t.message.as_deref()).and_then(TerminationMessage::parse);
    let progress = message.as_ref().and_then(TerminationMessage::progress);
    let summary = message.as_ref().and_then(|m| m.message.clone());
    if complete {
        return Some(Outcome {
            phase: RunPhase::Succeeded,
            reason: Reason::Succeeded,
            message: summary.unwrap_or_else(|| "the notebook ran to the end".into()),
            error: None,
            progress,
        });
    }
    if job_reason.as_deref() == Some("DeadlineExceeded") {
        let deadline = job.spec.as_ref().and_then(|s| s.active_deadline_seconds).unwrap_or_default();
        return Some(Outcome {
            phase: RunPhase::Failed,
            reason: Reason::DeadlineExceeded,
            message: format!("the run exceeded its {deadline}s timeout"),
            error: Some(RunError { reason: Some(Reason::DeadlineExceeded), ..Default::default() }),
            progress,
        });
    }
    let oom = term.is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"));
    let reason = if oom {
        Reason::OomKilled
    } else if let Some(r) = message.as_ref().and_then(TerminationMessage::reason) {
        // SIGTERM that no cancel asked for: evicted or preempted, an infrastructure failure.
        if r == Reason::Cancelled { Reason::PodFailed } else { r }
    } else if let Some(t) = term {
        progress::reason_for_exit_code(t.exit_code)
    } else {
        Reason::PodFailed
    };
    let message_text = summary.unwrap_or_else(|| match (term, oom) {
        (Some(_), true) => "the runner was killed for using more memory than its limit".into(),
        (Some(t), false) => format!(
            "the runner exited with code {}{}",
            t.exit_code,
            t.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
        ),
        (None, _) => format!("the Job failed: {}", job_reason.as_deref().unwrap_or("no reason given")),
    });
    let error = message.as_ref().and_then(TerminationMessage::error).or_else(|| {
        Some(RunError {
            reason: Some(reason),
            // The log tail (FallbackToLogsOnError) without the runner's protocol lines.
            traceback: term
                .and_then(|t| t.message.as_deref())
                .map(|m| progress::keep_tail(&progress::strip_ansi(&progress::user_output(m)), 4096)),
            ..Default::default()
        })
    });
    Some(Outcome { phase: RunPhase::Failed, reason, message: message_text, error, progress })
}

/// Why the pod has not started, if it is stuck on something that will not fix itself.
pub fn start_problem(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let waiting = status.container_statuses.iter().flatten().find_map(|c| {
        let w = c.state.as_ref()?.waiting.as_ref()?;
        let reason = w.reason.as_deref()?;
        START_PROBLEMS.contains(&reason).then(|| match &w.message {
            Some(m) => format!("{reason}: {m}"),
            None => reason.to_string(),
        })
    });
    waiting.or_else(|| {
        status.conditions.iter().flatten().find_map(|c| {
            (c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
                .then(|| format!("Unschedulable: {}", c.message.clone().unwrap_or_default()))
        })
    })
}

/// Why the pod cannot start, if it waits for something that will never come: an image that
/// runs as root under runAsNonRoot, an image name that cannot be parsed, an image the node does
/// not have under pull policy Never. A ConfigMap or Secret the container needs may still be
/// created, so that one waits for the start timeout like an image pull does.
pub fn start_failure(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let w = c.state.as_ref()?.waiting.as_ref()?;
        let reason = w.reason.as_deref().filter(|r| START_FAILURES.contains(r))?;
        let message = w.message.as_deref().unwrap_or_default();
        let lower = message.to_ascii_lowercase();
        let may_appear = reason == "CreateContainerConfigError"
            && (lower.contains("configmap") || lower.contains("secret"));
        (!may_appear)
            .then(|| if message.is_empty() { reason.to_string() } else { format!("{reason}: {message}") })
    })
}

/// The run's condition types.
pub const CONDITION_SUCCEEDED: &str = "Succeeded";
/// True while the run waits for its pods to stop before it releases the lock.
pub const CONDITION_STOPPING: &str = "Stopping";
/// Longest free text the CRD admits in a status string (its default `maxLength`).
pub const MAX_STATUS_TEXT: usize = 4096;

/// Sets the `Succeeded` condition for a phase; `lastTransitionTime` moves only when its status does.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    phase: RunPhase,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
    now: Time,
) {
    let status = match phase {
        RunPhase::Succeeded => "True",
        RunPhase::Failed | RunPhase::Cancelled | RunPhase::Rejected => "False",
        _ => "Unknown",
    };
    upsert_condition(conditions, CONDITION_SUCCEEDED, status, reason.as_str(), message, generation, now);
}

/// Sets (or replaces) the condition of `type_`; `lastTransitionTime` moves only when its status does.
pub fn upsert_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Time,
) {
    let message = keep_head(message, MAX_STATUS_TEXT);
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

/// The first `max` characters of `text`, marked with an ellipsis when cut.
pub fn keep_head(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Cuts every free-text field to the CRD's bounds, so no status write is refused for its size:
/// messages keep their start, tracebacks their end (where the error is).
pub fn bound(status: &mut NotebookRunStatus) {
    let head = |s: &mut Option<String>| {
        if let Some(text) = s.as_mut() {
            *text = keep_head(text, MAX_STATUS_TEXT);
        }
    };
    head(&mut status.message);
    head(&mut status.blocked_by);
    if let Some(output) = status.output.as_mut() {
        head(&mut output.message);
    }
    if let Some(error) = status.error.as_mut() {
        head(&mut error.ename);
        head(&mut error.evalue);
        if let Some(tb) = error.traceback.as_mut()
            && tb.chars().count() > MAX_STATUS_TEXT
        {
            *tb = keep_chars_tail(tb, MAX_STATUS_TEXT);
        }
    }
    for c in &mut status.conditions {
        c.message = keep_head(&c.message, MAX_STATUS_TEXT);
    }
}

fn keep_chars_tail(text: &str, max: usize) -> String {
    let n = text.chars().count();
    text.chars().skip(n.saturating_sub(max)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(cond: &str, reason: &str) -> Job {
        serde_json::from_value(json!({"spec": {"activeDeadlineSeconds": 5, "template": {}},
            "status": {"conditions": [{"type": cond, "status": "True", "reason": reason}]}}))
        .unwrap()
    }

    fn pod(exit: i32, reason: &str, message: &str) -> Pod {
        serde_json::from_value(
            json!({"status": {"containerStatuses": [{"name": "runner", "image": "i", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit, "reason": reason, "message": message}}}]}}),
        )
        .unwrap()
    }

    #[test]
    fn bound_cuts_every_text_to_the_crd_limits() {
        let long = "é".repeat(10_000);
        let mut st = NotebookRunStatus {
            message: Some(long.clone()),
            error: Some(RunError {
                evalue: Some(long.clone()),
                traceback: Some(format!("{long}END")),
                ..Default::default()
            }),
            ..Default::default()
        };
        set_condition(
            &mut st.conditions,
            RunPhase::Failed,
            Reason::PodFailed,
            &long,
            None,
            Time(jiff::Timestamp::UNIX_EPOCH),
        );
        bound(&mut st);
        let count = |s: &str| s.chars().count();
        assert_eq!(count(st.message.as_deref().unwrap()), MAX_STATUS_TEXT);
        assert!(st.message.as_deref().unwrap().ends_with('…'));
        let err = st.error.unwrap();
        assert_eq!(count(err.evalue.as_deref().unwrap()), MAX_STATUS_TEXT);
        assert!(err.traceback.as_deref().unwrap().ends_with("END"), "the traceback keeps its end");
        assert_eq!(count(err.traceback.as_deref().unwrap()), MAX_STATUS_TEXT);
        assert_eq!(count(&st.conditions[0].message), MAX_STATUS_TEXT);
        assert_eq!(keep_head("short", 10), "short");
    }

    #[test]
    fn running_job_has_no_outcome() {
        let j: Job = serde_json::from_value(json!({"status": {"active": 1}})).unwrap();
        assert_eq!(outcome(&j, None), None);
    }

    #[test]
    fn cell_error_comes_from_the_termination_message() {
        let msg = r#"{"reason":"CellError","message":"Cell 2 raised ValueError: bad","ename":"ValueError","evalue":"bad","traceback":"T","cell":2,"cellsTotal":3,"cellsCompleted":1}"#;
        let o = outcome(&job("Failed", "PodFailurePolicy"), Some(&pod(1, "Error", msg))).unwrap();
        assert_eq!((o.phase, o.reason), (RunPhase::Failed, Reason::CellError));
        assert_eq!(o.message, "Cell 2 raised ValueError: bad");
        assert_eq!(o.error.unwrap().ename.as_deref(), Some("ValueError"));
        assert_eq!(o.progress.unwrap().cells_completed, 1);
    }

    #[test]
    fn deadline_oom_and_exit_codes() {
        let o = outcome(&job("Failed", "DeadlineExceeded"), None).unwrap();
        assert_eq!(o.reason, Reason::DeadlineExceeded);
        let o = outcome(&job("Failed", "BackoffLimitExceeded"), Some(&pod(137, "OOMKilled", ""))).unwrap();
        assert_eq!(o.reason, Reason::OomKilled);
        let o = outcome(&job("Failed", "PodFailurePolicy"), Some(&pod(4, "Error", "not json"))).unwrap();
        assert_eq!(o.reason, Reason::KernelDied);
        let o = outcome(&job("Complete", "CompletionsReached"), Some(&pod(0, "Completed", ""))).unwrap();
        assert_eq!(o.phase, RunPhase::Succeeded);
        let evicted = r#"{"reason":"Cancelled","message":"Cancelled (SIGTERM)"}"#;
        let o = outcome(&job("Failed", "BackoffLimitExceeded"), Some(&pod(143, "Error", evicted))).unwrap();
        assert_eq!((o.phase, o.reason), (RunPhase::Failed, Reason::PodFailed));
        let tail = "##notebook-operator:progress {\"event\":\"start\",\"cellsTotal\":1}\nKilled\n";
        let o = outcome(&job("Failed", "BackoffLimitExceeded"), Some(&pod(137, "Error", tail))).unwrap();
        assert_eq!(o.error.unwrap().traceback.as_deref(), Some("Killed\n"));
    }

    #[test]
    fn start_problems_name_the_waiting_reason() {
        let p: Pod =
            serde_json::from_value(json!({"status": {"containerStatuses": [{"name": "runner", "image": "i",
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}}))
            .unwrap();
        assert_eq!(start_problem(&p).as_deref(), Some("ImagePullBackOff: Back-off pulling image"));
        let p: Pod = serde_json::from_value(json!({"status": {"containerStatuses": [{"name": "runner", "image": "i",
            "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}}))
        .unwrap();
        assert_eq!(start_problem(&p), None);
    }

    #[test]
    fn start_failures_are_the_waits_that_cannot_heal() {
        let waiting = |reason: &str, message: &str| -> Pod {
            serde_json::from_value(json!({"status": {"containerStatuses": [{"name": "runner", "image": "i",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}}}]}}))
            .unwrap()
        };
        let root = "container has runAsNonRoot and image will run as root (pod: \"p\", container: runner)";
        assert_eq!(
            start_failure(&waiting("CreateContainerConfigError", root)),
            Some(format!("CreateContainerConfigError: {root}"))
        );
        assert!(start_failure(&waiting("InvalidImageName", "couldn't parse image name")).is_some());
        assert!(start_failure(&waiting("ErrImageNeverPull", "image is not present")).is_some());
        // These may heal: a registry comes back, a ConfigMap or Secret is created.
        assert_eq!(start_failure(&waiting("ImagePullBackOff", "Back-off pulling image")), None);
        assert_eq!(start_failure(&waiting("ErrImagePull", "connection refused")), None);
        assert_eq!(
            start_failure(&waiting("CreateContainerConfigError", "configmap \"cfg\" not found")),
            None
        );
        assert_eq!(start_failure(&waiting("CreateContainerConfigError", "secret \"s\" not found")), None);
        assert_eq!(start_failure(&waiting("ContainerCreating", "")), None);
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let t0 = Time(jiff::Timestamp::from_second(1).unwrap());
        let t1 = Time(jiff::Timestamp::from_second(2).unwrap());
        let mut c = Vec::new();
        set_condition(&mut c, RunPhase::Queued, Reason::Queued, "q", Some(1), t0.clone());
        set_condition(&mut c, RunPhase::Running, Reason::Started, "r", Some(1), t1.clone());
        assert_eq!(c[0].last_transition_time, t0);
        set_condition(&mut c, RunPhase::Succeeded, Reason::Succeeded, "s", Some(1), t1.clone());
        assert_eq!((c[0].status.as_str(), &c[0].last_transition_time), ("True", &t1));
    }
}
