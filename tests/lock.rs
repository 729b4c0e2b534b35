//! The lock's promise under deletes, races and refused writes (DESIGN.md section 11): no two runs
//! sharing a lock ever have a live pod at the same time — checked from the container lifetimes the
//! test kubelet saw — and no permanent error ever holds a lock.
//!
//! Faults are injected with real parts: ValidatingAdmissionPolicies refuse writes, the test
//! kubelet is told (through a container's env) to act late or never on a pod's deletion, as a
//! slow or unreachable node does, or to take a while to start a pod, as a slow image pull does.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use notebook_operator::{NotebookRun, Reason, RunPhase};
use serde_json::{Value, json};

use support::kubelet::{REPORT_DELAY_ENV, START_DELAY_ENV, STOP_DELAY_ENV};
use support::runs::{RUN_TIMEOUT, RunEnv, phase_of, reason_of, run_of};
use support::{ControlPlane, from_json, wait_for};

/// The lock tests' controllers give a cancelled pod this long: the controller before section 11
/// gave up waiting for pods after it plus 10 s.
const CANCEL_GRACE: &str = "3s";

async fn setup(prefix: &str) -> RunEnv {
    RunEnv::start_with(prefix, &["--cancel-grace", CANCEL_GRACE]).await
}

fn env_var(name: &str, value: &str) -> Value {
    json!([{"name": name, "value": value}])
}

fn condition<'a>(
    run: &'a NotebookRun,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    run.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

fn holder(lease: &Option<Lease>) -> Option<String> {
    lease.as_ref()?.spec.as_ref()?.holder_identity.clone()
}

async fn cancel(env: &RunEnv, name: &str) {
    let patch = json!({"spec": {"cancel": true}});
    env.runs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("cancel");
}

async fn running_pod(env: &RunEnv, run: &str) -> Pod {
    let pods: Api<Pod> = env.ns.api();
    let lp = ListParams::default().labels(&format!("notebooks.dev/run={run}"));
    wait_for(RUN_TIMEOUT, format!("a running pod of {run}"), || {
        let (pods, lp) = (pods.clone(), lp.clone());
        async move {
            let list = pods.list(&lp).await.ok()?.items;
            list.into_iter().find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        }
    })
    .await
}

/// A ValidatingAdmissionPolicy (and its binding) refusing some writes in one namespace; removed
/// when dropped. Returns once the API server enforces it.
struct Refusal {
    cp: &'static ControlPlane,
    name: String,
}

impl Refusal {
    /// Refuses `operations` on `resource` (e.g. `notebookruns/status`) of `group` in `ns` where the
    /// CEL `refuse_when` (over `object`) holds, with `message`. `probe` is a dry-run write that
    /// must be refused once the policy is in force.
    async fn new<F, Fut>(
        name: &str,
        ns: &str,
        group: &str,
        resource: &str,
        refuse_when: &str,
        message: &str,
        probe: F,
    ) -> Self
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let cp = ControlPlane::shared();
        let name = format!("{ns}-{name}");
        let (plural, sub) = resource.split_once('/').map_or((resource, None), |(p, s)| (p, Some(s)));
        let resources = match sub {
            Some(s) => vec![format!("{plural}/{s}")],
            None => vec![plural.to_string()],
        };
        let policy = json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": [group], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": resources}]},
                "validations": [{"expression": format!("!({refuse_when})"), "message": message}]
            }
        });
        let binding = json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}
        });
        for doc in [policy, binding] {
            let mut child = cp
                .kubectl()
                .args(["apply", "--server-side", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kubectl apply");
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(doc.to_string().as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "apply policy: {}", String::from_utf8_lossy(&out.stderr));
        }
        let refusal = Refusal { cp, name };
        wait_for(Duration::from_secs(30), "the admission policy in force", &probe).await;
        refusal
    }
}

impl Drop for Refusal {
    fn drop(&mut self) {
        for kind in ["validatingadmissionpolicybinding", "validatingadmissionpolicy"] {
            let _ = self.cp.kubectl().args(["delete", kind, &self.name, "--ignore-not-found"]).output();
        }
    }
}

fn is_refused<T>(result: kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422)
}

// === 1, 2, 12: pods that stop late or never keep the lock ===

#[tokio::test]
async fn a_deleted_running_run_keeps_the_lock_until_its_pod_is_gone() {
    let env = setup("delete-running").await;
    let slow =
        run_of("slow", &["import time; time.sleep(600)"], json!({"env": env_var(STOP_DELAY_ENV, "5")}));
    env.create(&slow).await;
    env.wait_phase("slow", RunPhase::Running).await;
    running_pod(&env, "slow").await;
    env.create(&run_of("next", &["print('next ran')"], json!({}))).await;
    env.wait_phase("next", RunPhase::Queued).await;

    env.runs.delete("slow", &DeleteParams::default()).await.expect("delete slow");
    // The node takes 5 s to stop the pod: all that time the lock stays with the deleted run.
    let gone = wait_for(RUN_TIMEOUT, "the deleted run gone", || async {
        env.runs.get_opt("slow").await.ok().map(|r| r.is_none()).filter(|gone| *gone)
    })
    .await;
    assert!(gone);
    let next = env.wait_terminal("next").await;
    assert_eq!(phase_of(&next), Some(RunPhase::Succeeded), "{:?}", next.status);
    let locks =
        BTreeMap::from([("slow".into(), "notebook-run".into()), ("next".into(), "notebook-run".into())]);
    let checked = env.assert_no_overlap_of(&locks).await;
    assert_eq!(checked.runs_on("notebook-run"), 2, "{checked}");
    env.wait_lock_free("notebook-run").await;
}

#[tokio::test]
async fn a_pod_that_will_not_stop_keeps_the_lock_and_says_so() {
    let env = setup("unreachable").await;
    let stuck =
        run_of("stuck", &["import time; time.sleep(600)"], json!({"env": env_var(STOP_DELAY_ENV, "never")}));
    env.create(&stuck).await;
    env.wait_phase("stuck", RunPhase::Running).await;
    let pod = running_pod(&env, "stuck").await;
    env.create(&run_of("waiter", &["print('waiter ran')"], json!({}))).await;
    env.wait_phase("waiter", RunPhase::Queued).await;

    cancel(&env, "stuck").await;
    let run = env
        .wait_until("stuck", "condition Stopping: PodNotStopping", |r| {
            condition(r, "Stopping").is_some_and(|c| c.status == "True" && c.reason == "PodNotStopping")
        })
        .await;
    let message = &condition(&run, "Stopping").unwrap().message;
    assert!(message.contains(&pod.name_any()) && message.contains("force-delete"), "{message}");
    assert_eq!(phase_of(&run), Some(RunPhase::Running), "the run is not over while its pod lives");
    // Past the grace period and the 10 s the controller once waited: the lock is still held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(holder(&env.lease("notebook-run").await).as_deref(), Some("stuck"));
    assert_eq!(phase_of(&env.get("waiter").await), Some(RunPhase::Queued));
    let events = env.events_for("stuck").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("Stopping") && e.type_.as_deref() == Some("Warning")),
        "a Warning Event says the pod does not stop: {events:?}"
    );

    // The node is gone for good: the pod is force-deleted, and only then does the lock move on.
    let pods: Api<Pod> = env.ns.api();
    pods.delete(&pod.name_any(), &DeleteParams::default().grace_period(0)).await.expect("force-delete");
    let run = env.wait_terminal("stuck").await;
    assert_eq!(reason_of(&run), Some(Reason::Cancelled), "{:?}", run.status);
    assert_eq!(condition(&run, "Stopping").map(|c| c.status.as_str()), Some("False"));
    let waiter = env.wait_terminal("waiter").await;
    assert_eq!(phase_of(&waiter), Some(RunPhase::Succeeded));
    env.assert_no_overlap().await;
}

#[tokio::test]
async fn a_stopping_run_does_not_hold_up_the_controller() {
    // The default test controller gives a cancelled pod 20 s: one that waited inside a reconcile
    // would keep a shutting-down controller for that long.
    let mut env = RunEnv::start_with("no-block", &[]).await;
    let stuck =
        run_of("stuck", &["import time; time.sleep(600)"], json!({"env": env_var(STOP_DELAY_ENV, "never")}));
    env.create(&stuck).await;
    env.wait_phase("stuck", RunPhase::Running).await;
    let pod = running_pod(&env, "stuck").await;
    cancel(&env, "stuck").await;
    env.wait_until("stuck", "condition Stopping", |r| {
        condition(r, "Stopping").is_some_and(|c| c.status == "True")
    })
    .await;
    let asked = Instant::now();
    let exit = env.op.terminate(Duration::from_secs(60));
    let took = asked.elapsed();
    assert!(exit.is_some_and(|s| s.success()), "the controller exits cleanly on SIGTERM: {exit:?}");
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM to exit took {took:?}: a reconcile was waiting on a pod"
    );
    env.op.restart();
    let pods: Api<Pod> = env.ns.api();
    pods.delete(&pod.name_any(), &DeleteParams::default().grace_period(0)).await.expect("force-delete");
    let run = env.wait_terminal("stuck").await;
    assert_eq!(reason_of(&run), Some(Reason::Cancelled));
}

// === 3, 4: cancels racing the controller and the notebook ===

#[tokio::test]
async fn a_cancel_before_the_running_status_stops_the_job() {
    let env = setup("cancel-window").await;
    let ns = env.ns.to_string();
    // The Running status write is refused for runs labelled `hold-status`, so the cancel lands
    // after the Job exists and before the status says Running.
    let probe_runs = env.runs.clone();
    let probe = run_of("probe", &["1"], json!({"cancel": true, "lock": "probe"}));
    let mut probe = probe;
    probe.metadata.labels = Some([("hold-status".to_string(), "yes".to_string())].into());
    env.create(&probe).await;
    let refusal = Refusal::new(
        "hold-status",
        &ns,
        "notebooks.dev",
        "notebookruns/status",
        "has(object.metadata.labels) && 'hold-status' in object.metadata.labels",
        "status writes are held for this test",
        || {
            let runs = probe_runs.clone();
            async move {
                let patch = json!({"status": {"message": "probe"}});
                let pp = PatchParams { dry_run: true, ..Default::default() };
                is_refused(runs.patch_status("probe", &pp, &Patch::Merge(&patch)).await)
            }
        },
    )
    .await;
    let mut held = run_of("held", &["import time; time.sleep(600)"], json!({}));
    held.metadata.labels = Some([("hold-status".to_string(), "yes".to_string())].into());
    env.create(&held).await;
    running_pod(&env, "held").await;
    assert_eq!(phase_of(&env.get("held").await), None, "the Running status write was refused");
    cancel(&env, "held").await;
    drop(refusal);

    let run = env.wait_terminal("held").await;
    assert_eq!(reason_of(&run), Some(Reason::Cancelled), "{:?}", run.status);
    wait_for(RUN_TIMEOUT, "held's Job gone", || async {
        env.ns.api::<Job>().get_opt("held").await.ok().map(|j| j.is_none()).filter(|gone| *gone)
    })
    .await;
    // The next run on the lock never meets held's pod.
    env.create(&run_of("after", &["print('after ran')"], json!({}))).await;
    assert_eq!(phase_of(&env.wait_terminal("after").await), Some(RunPhase::Succeeded));
    let checked = env.assert_no_overlap().await;
    assert!(checked.ran("notebook-run", "held") && checked.ran("notebook-run", "after"), "{checked}");
}

#[tokio::test]
async fn a_cancel_racing_a_successful_end_leaves_the_run_succeeded() {
    let env = setup("cancel-race").await;
    // The node reports the runner's exit 4 s late, so the cancel lands after the notebook ran to
    // its end and before the Job completes.
    let spec = json!({"env": env_var(REPORT_DELAY_ENV, "4")});
    env.create(&run_of("racer", &["print('work done')"], spec)).await;
    let pod = running_pod(&env, "racer").await;
    let pods: Api<Pod> = env.ns.api();
    wait_for(RUN_TIMEOUT, "the runner's finished event", || {
        let (pods, name) = (pods.clone(), pod.name_any());
        async move {
            pods.logs(&name, &Default::default()).await.ok().filter(|l| l.contains(r#""event":"finished""#))
        }
    })
    .await;
    let job = env.ns.api::<Job>().get("racer").await.expect("racer's Job");
    assert!(
        job.status.as_ref().and_then(|s| s.completion_time.as_ref()).is_none(),
        "the cancel must land before the Job completes"
    );
    cancel(&env, "racer").await;
    let run = env.wait_terminal("racer").await;
    let status = run.status.clone().unwrap();
    assert_eq!(
        (status.phase, status.reason),
        (Some(RunPhase::Succeeded), Some(Reason::Succeeded)),
        "{status:?}"
    );
    assert_eq!(status.progress.map(|p| p.percent), Some(100));
    let nb = env.executed_notebook(&run).await;
    assert!(nb["cells"][0]["outputs"].to_string().contains("work done"), "{nb}");
    env.wait_lock_free("notebook-run").await;
}

// === 5, 6: refused writes and names taken by objects the run does not own ===

#[tokio::test]
async fn objects_named_like_a_runs_children_fail_it_with_name_conflict() {
    let env = setup("name-conflict").await;
    let cms: Api<ConfigMap> = env.ns.api();
    let foreign_cm: ConfigMap =
        from_json(json!({"metadata": {"name": "nc-cm-inputs"}, "data": {"mine": "yes"}}));
    cms.create(&PostParams::default(), &foreign_cm).await.unwrap();
    let jobs: Api<Job> = env.ns.api();
    let foreign_job: Job = from_json(json!({"metadata": {"name": "nc-job"}, "spec": {"suspend": true,
        "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}}));
    jobs.create(&PostParams::default(), &foreign_job).await.unwrap();

    for (run, kind, object) in [("nc-cm", "ConfigMap", "nc-cm-inputs"), ("nc-job", "Job", "nc-job")] {
        env.create(&run_of(run, &["print(1)"], json!({"lock": run}))).await;
        let done = env.wait_terminal(run).await;
        let status = done.status.clone().unwrap();
        assert_eq!(
            (status.phase, status.reason),
            (Some(RunPhase::Failed), Some(Reason::NameConflict)),
            "{status:?}"
        );
        let message = status.message.unwrap_or_default();
        assert!(message.contains(&format!("{kind} {object}")), "the message names the object: {message}");
        env.wait_lock_free(run).await;
        let events = env.events_for(run).await;
        assert!(events.iter().any(|e| e.reason.as_deref() == Some("NameConflict")), "{events:?}");
    }
    // Neither object was touched.
    let cm = cms.get("nc-cm-inputs").await.unwrap();
    assert!(cm.owner_references().is_empty() && cm.data.unwrap()["mine"] == "yes");
    let job = jobs.get("nc-job").await.unwrap();
    assert!(job.owner_references().is_empty());
}

#[tokio::test]
async fn a_notebook_that_cannot_be_kept_never_holds_the_run() {
    let env = setup("output-refused").await;
    let ns = env.ns.to_string();
    let cms: Api<ConfigMap> = env.ns.api();
    let probe_cms = cms.clone();
    let _refusal = Refusal::new(
        "no-output",
        &ns,
        "",
        "configmaps",
        "object.metadata.name.endsWith('-output')",
        "output ConfigMaps are refused here (a quota, say)",
        || {
            let cms = probe_cms.clone();
            async move {
                let cm: ConfigMap = from_json(json!({"metadata": {"name": "probe-output"}}));
                let pp = PostParams { dry_run: true, ..Default::default() };
                is_refused(cms.create(&pp, &cm).await)
            }
        },
    )
    .await;
    env.create(&run_of("refused", &["print('computed')"], json!({}))).await;
    let run = env.wait_terminal("refused").await;
    let status = run.status.clone().unwrap();
    assert_eq!(status.phase, Some(RunPhase::Succeeded), "{status:?}");
    let output = status.output.expect("status.output says what happened to the notebook");
    assert_eq!(output.config_map, None);
    let why = output.message.unwrap_or_default();
    assert!(why.contains("refused-output") && why.contains("refused"), "{why}");
    env.wait_lock_free("notebook-run").await;
}

#[tokio::test]
async fn a_users_configmap_named_like_the_output_is_never_adopted() {
    let env = setup("no-adopt").await;
    let cms: Api<ConfigMap> = env.ns.api();
    let users: ConfigMap =
        from_json(json!({"metadata": {"name": "mine-output"}, "data": {"precious": "data"}}));
    cms.create(&PostParams::default(), &users).await.unwrap();
    env.create(&run_of("mine", &["print('done')"], json!({}))).await;
    let run = env.wait_terminal("mine").await;
    let status = run.status.clone().unwrap();
    assert_eq!(status.phase, Some(RunPhase::Succeeded), "{status:?}");
    let output = status.output.expect("output");
    assert_eq!(output.config_map, None);
    assert!(output.message.unwrap_or_default().contains("does not belong to this run"));
    let cm = cms.get("mine-output").await.unwrap();
    assert!(cm.owner_references().is_empty(), "not adopted: {:?}", cm.metadata.owner_references);
    assert_eq!(cm.data.as_ref().unwrap()["precious"], "data");
    assert!(cm.binary_data.is_none(), "not written");
    // Deleting the run leaves it alone too.
    env.runs.delete("mine", &DeleteParams::default()).await.unwrap();
    wait_for(RUN_TIMEOUT, "the run gone", || async {
        env.runs.get_opt("mine").await.ok().is_some_and(|r| r.is_none())
    })
    .await;
    wait_for(RUN_TIMEOUT, "the run's inputs collected", || async {
        cms.get_opt("mine-inputs").await.ok().is_some_and(|c| c.is_none())
    })
    .await;
    assert!(cms.get_opt("mine-output").await.unwrap().is_some(), "the user's ConfigMap survives the run");
}

// === 7: a Lease the operator does not manage ===

#[tokio::test]
async fn replace_against_a_foreign_lease_waits_for_it() {
    let env = setup("foreign-lease").await;
    let leases: Api<Lease> = env.ns.api();
    let foreign: Lease =
        from_json(json!({"metadata": {"name": "shared"}, "spec": {"holderIdentity": "someone-else"}}));
    leases.create(&PostParams::default(), &foreign).await.unwrap();
    env.create(&run_of(
        "replacer",
        &["print('ran')"],
        json!({"lock": "shared", "concurrencyPolicy": "Replace"}),
    ))
    .await;
    let run = env.wait_phase("replacer", RunPhase::Queued).await;
    let message = run.status.unwrap().message.unwrap_or_default();
    assert!(
        message.contains("someone-else") && message.contains("not managed by notebook-operator"),
        "{message}"
    );
    assert!(leases.get("shared").await.is_ok(), "a foreign Lease is never deleted");
    leases.delete("shared", &DeleteParams::default()).await.unwrap();
    let run = env.wait_terminal("replacer").await;
    assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{:?}", run.status);
}

// === 8: the start window of a retried pod ===

#[tokio::test]
async fn a_pod_retried_after_an_eviction_gets_its_own_start_window() {
    let env = setup("start-window").await;
    // Every pod of this run takes 2 s to start (a slow pull) against a 20 s start window; the
    // eviction comes 22 s after the Job was created, so a window counted from the Job would be
    // over before the replacement could start. The first attempt sleeps (a marker file on the
    // test kubelet's host tells the attempts apart); the replacement ends at once.
    let marker = std::env::temp_dir().join(format!("{}-first-attempt", env.ns.name()));
    let cell = format!(
        "import os, time\nfirst = not os.path.exists({marker:?})\nopen({marker:?}, 'w').close()\ntime.sleep(60 if first else 0)"
    );
    let spec = json!({"env": env_var(START_DELAY_ENV, "2"), "timeouts": {"start": "20s"}, "retries": 1});
    env.create(&run_of("evicted", &[&cell, "print('second pod')"], spec)).await;
    let first = running_pod(&env, "evicted").await;
    let job = env.ns.api::<Job>().get("evicted").await.expect("the Job");
    let created = job.metadata.creation_timestamp.clone().expect("created").0;
    while jiff::Timestamp::now().duration_since(created) < jiff::SignedDuration::from_secs(22) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pods: Api<Pod> = env.ns.api();
    pods.evict(&first.name_any(), &EvictParams::default()).await.expect("evict");
    let run = env.wait_terminal("evicted").await;
    let _ = std::fs::remove_file(&marker);
    assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{:?}", run.status);
    let nb = env.executed_notebook(&run).await;
    assert!(nb["cells"][1]["outputs"].to_string().contains("second pod"), "{nb}");
    let checked = env.assert_no_overlap().await;
    assert_eq!(checked.pods_on("notebook-run"), 2, "the evicted pod and its replacement: {checked}");
}

// === 9: status strings within the CRD's bounds ===

#[tokio::test]
async fn a_long_refusal_is_cut_to_fit_the_status() {
    let env = setup("long-message").await;
    let ns = env.ns.to_string();
    let jobs: Api<Job> = env.ns.api();
    let probe_jobs = jobs.clone();
    let long = format!("jobs are refused here: {}", "very long reason ".repeat(400));
    let _refusal = Refusal::new("no-jobs", &ns, "batch", "jobs", "true", &long, || {
        let jobs = probe_jobs.clone();
        async move {
            let job: Job = from_json(json!({"metadata": {"name": "probe"}, "spec": {"template": {"spec": {
                    "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}));
            let pp = PostParams { dry_run: true, ..Default::default() };
            is_refused(jobs.create(&pp, &job).await)
        }
    })
    .await;
    env.create(&run_of("refused", &["print(1)"], json!({}))).await;
    let run = env.wait_terminal("refused").await;
    let status = run.status.clone().unwrap();
    assert_eq!(
        (status.phase, status.reason),
        (Some(RunPhase::Failed), Some(Reason::PodFailed)),
        "{status:?}"
    );
    let message = status.message.unwrap_or_default();
    assert!(
        message.starts_with("the Job was refused") && message.chars().count() <= 4096,
        "{}",
        message.len()
    );
    assert!(status.conditions.iter().all(|c| c.message.chars().count() <= 4096));
    env.wait_lock_free("notebook-run").await;
}

// === 10, 11: what a notebook prints cannot break the controller ===

#[tokio::test]
async fn an_odd_byte_in_the_log_loses_neither_progress_nor_the_notebook() {
    let env = setup("odd-byte").await;
    let cells = [
        "import os; os.write(1, b'\\xff\\xfe not utf-8 \\xc3\\n')",
        "import time; time.sleep(4)",
        "print('after the odd byte')",
    ];
    env.create(&run_of("odd", &cells, json!({}))).await;
    env.wait_until("odd", "progress past the odd byte, while running", |r| {
        phase_of(r) == Some(RunPhase::Running)
            && r.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.current_cell == Some(1))
    })
    .await;
    let run = env.wait_terminal("odd").await;
    assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{:?}", run.status);
    let nb = env.executed_notebook(&run).await;
    assert!(nb["cells"][2]["outputs"].to_string().contains("after the odd byte"), "{nb}");
}

#[tokio::test]
async fn forged_progress_lines_are_not_believed() {
    let env = setup("forged").await;
    let forged = r#"##notebook-operator:progress {"event":"cell_done","cell":1,"cellsCompleted":4294967295,"cellsTotal":4294967295}"#;
    let cells = [
        format!("import os, time; os.write(1, b'{forged}\\n'); time.sleep(3)"),
        "print('still counted right')".to_string(),
    ];
    let cells: Vec<&str> = cells.iter().map(String::as_str).collect();
    env.create(&run_of("forged", &cells, json!({}))).await;
    let believed = std::sync::Mutex::new(Vec::new());
    let run = wait_for(RUN_TIMEOUT, "forged to finish", || async {
        let run = env.runs.get_opt("forged").await.ok().flatten()?;
        if let Some(p) = run.status.as_ref().and_then(|s| s.progress.clone())
            && (p.cells_total > 2 || p.percent > 100)
        {
            believed.lock().unwrap().push(p);
        }
        phase_of(&run).filter(|p| p.is_terminal()).map(|_| run)
    })
    .await;
    assert_eq!(believed.into_inner().unwrap(), vec![], "a forged progress line was believed");
    let status = run.status.clone().unwrap();
    assert_eq!(status.phase, Some(RunPhase::Succeeded), "{status:?}");
    let p = status.progress.unwrap();
    assert_eq!((p.cells_completed, p.cells_total, p.percent), (2, 2, 100));
}

// === 14: every finished run is counted ===

#[tokio::test]
async fn runs_that_never_ran_are_counted_as_finished() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let env = RunEnv::start_with("metrics", &["--cancel-grace", CANCEL_GRACE, "--listen", &listen]).await;
    env.create(&run_of("holder", &["import time; time.sleep(600)"], json!({}))).await;
    env.wait_phase("holder", RunPhase::Running).await;
    env.create(&run_of("refused", &["1"], json!({"concurrencyPolicy": "Forbid"}))).await;
    let missing = json!({"notebook": {"configMap": {"name": "nowhere"}}, "lock": "other"});
    let mut lost = run_of("lost", &["1"], json!({}));
    lost.spec = from_json(missing);
    env.create(&lost).await;
    env.wait_terminal("refused").await;
    env.wait_terminal("lost").await;
    let http = reqwest::Client::new();
    let text = wait_for(RUN_TIMEOUT, "both counted in /metrics", || async {
        let text = http.get(format!("http://{listen}/metrics")).send().await.ok()?.text().await.ok()?;
        (text.contains(r#"runs_finished_total{reason="LockHeld"} 1"#)
            && text.contains(r#"runs_finished_total{reason="NotebookNotFound"} 1"#))
        .then_some(text)
    })
    .await;
    assert!(text.contains("notebook_operator_leader 1"), "{text}");
    cancel(&env, "holder").await;
    env.wait_terminal("holder").await;
}
