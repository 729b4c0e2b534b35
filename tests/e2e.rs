//! The operator end to end on a real control plane: the CRD installed, the controller binary
//! running (one per test, watching the test's namespace), the runner executed by the test
//! kubelet on a real kernel.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use notebook_operator::{NotebookRun, Reason, RunPhase};
use serde_json::{Value, json};

use support::overlap::{self, RunLocks};
use support::runs::{RUN_TIMEOUT, phase_of, reason_of, run_of, setup};
use support::{ControlPlane, from_json, wait_for};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn cell_text(nb: &Value, cell: usize) -> String {
    nb["cells"][cell]["outputs"].to_string()
}

// === lifecycle ===

#[tokio::test]
async fn success_reports_progress_and_keeps_the_notebook() {
    let env = setup("success").await;
    let cells = [
        "import time; print('one')",
        "time.sleep(1.5); print('two')",
        "time.sleep(1.5); print('three')",
        "print('four')",
    ];
    env.create(&run_of("ok", &cells, json!({}))).await;
    let seen = std::sync::Mutex::new(BTreeSet::new());
    let done = wait_for(RUN_TIMEOUT, "ok to finish", || {
        let runs = env.runs.clone();
        let seen = &seen;
        async move {
            let run = runs.get("ok").await.ok()?;
            let status = run.status.clone()?;
            if status.phase == Some(RunPhase::Running)
                && let Some(p) = &status.progress
            {
                seen.lock().unwrap().insert(p.percent);
            }
            status.phase.filter(|p| p.is_terminal()).map(|_| run)
        }
    })
    .await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, Some(RunPhase::Succeeded), "{status:?}");
    assert_eq!(status.reason, Some(Reason::Succeeded));
    assert_eq!(
        status.progress.as_ref().map(|p| (p.percent, p.cells_total, p.current_cell)),
        Some((100, 4, None))
    );
    assert_eq!(status.blocked_by, None);
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter().any(|p| *p > 0 && *p < 100),
        "an intermediate progress was seen while running: {seen:?}"
    );
    assert!(status.job_name.is_some() && status.start_time.is_some() && status.completion_time.is_some());
    let cond = &status.conditions[0];
    assert_eq!((cond.type_.as_str(), cond.status.as_str()), ("Succeeded", "True"));
    let nb = env.executed_notebook(&done).await;
    assert!(cell_text(&nb, 3).contains("four"));
    env.wait_lock_free("notebook-run").await;
    // The executed notebook outlives the pods.
    let pods: Api<Pod> = env.ns.api();
    pods.delete_collection(&DeleteParams::default().grace_period(0), &ListParams::default()).await.unwrap();
    wait_for(RUN_TIMEOUT, "pods gone", || {
        let pods = pods.clone();
        async move { pods.list(&ListParams::default()).await.is_ok_and(|l| l.items.is_empty()) }
    })
    .await;
    assert!(cell_text(&env.executed_notebook(&env.get("ok").await).await, 0).contains("one"));
    let reasons: Vec<String> = env.events_for("ok").await.into_iter().filter_map(|e| e.reason).collect();
    assert!(
        reasons.contains(&"Started".to_string()) && reasons.contains(&"Succeeded".to_string()),
        "{reasons:?}"
    );
    // kubectl shows the columns.
    let out = ControlPlane::shared().kubectl().args(["get", "nbrun", "-n", &env.ns, "ok"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("PHASE")
            && table.contains("PROGRESS")
            && table.contains("LOCK")
            && table.contains("AGE"),
        "{table}"
    );
    assert!(
        table.contains("Succeeded") && table.contains("4/4") && table.contains("notebook-run"),
        "{table}"
    );
}

#[tokio::test]
async fn a_failing_cell_gives_reason_and_traceback() {
    let env = setup("cellerror").await;
    env.create(&run_of("bad", &["x = 1", "raise ValueError('no good')", "print('never')"], json!({}))).await;
    let run = env.wait_terminal("bad").await;
    let status = run.status.clone().unwrap();
    assert_eq!(
        (status.phase, status.reason),
        (Some(RunPhase::Failed), Some(Reason::CellError)),
        "{status:?}"
    );
    let error = status.error.clone().expect("error");
    assert_eq!(error.ename.as_deref(), Some("ValueError"));
    assert_eq!(error.evalue.as_deref(), Some("no good"));
    assert_eq!(error.cell, Some(1));
    let tb = error.traceback.expect("traceback");
    assert!(tb.contains("ValueError") && !tb.contains('\u{1b}'), "ANSI-free traceback: {tb:?}");
    assert!(cell_text(&env.executed_notebook(&run).await, 1).contains("ValueError"), "partial notebook kept");
    env.wait_lock_free("notebook-run").await;
}

#[tokio::test]
async fn invalid_and_missing_notebooks_fail_without_a_job() {
    let env = setup("invalid").await;
    let mut bad = run_of("invalid", &[], json!({}));
    bad.spec.notebook.inline = Some("{not json".into());
    env.create(&bad).await;
    let missing: NotebookRun =
        from_json(json!({"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun",
        "metadata": {"name": "missing"}, "spec": {"notebook": {"configMap": {"name": "nope"}}}}));
    env.create(&missing).await;
    let run = env.wait_terminal("invalid").await;
    assert_eq!((phase_of(&run), reason_of(&run)), (Some(RunPhase::Failed), Some(Reason::InvalidNotebook)));
    let run = env.wait_terminal("missing").await;
    assert_eq!((phase_of(&run), reason_of(&run)), (Some(RunPhase::Failed), Some(Reason::NotebookNotFound)));
    assert!(run.status.unwrap().message.unwrap().contains("nope"));
    assert!(env.jobs().await.is_empty(), "no Job for a run that cannot start");
    env.wait_lock_free("notebook-run").await;
    // A notebook path inside the image that is not a notebook: the runner says so.
    let path: NotebookRun = from_json(json!({"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun",
        "metadata": {"name": "path"}, "spec": {"notebook": {"path": "/etc/hostname"}}}));
    env.create(&path).await;
    let run = env.wait_terminal("path").await;
    assert_eq!(
        (phase_of(&run), reason_of(&run)),
        (Some(RunPhase::Failed), Some(Reason::InvalidNotebook)),
        "{:?}",
        run.status
    );
    let checked = env.assert_no_overlap().await;
    assert_eq!(checked.runs_on("notebook-run"), 1, "only `path` got a container: {checked}");
}

#[tokio::test]
async fn cell_and_run_timeouts() {
    let env = setup("timeouts").await;
    let cell =
        run_of("cell", &["import time; time.sleep(60)"], json!({"timeouts": {"cell": "2s"}, "lock": "cell"}));
    let whole = run_of(
        "whole",
        &["import time; time.sleep(120)"],
        json!({"timeouts": {"run": "4s"}, "lock": "whole"}),
    );
    env.create(&cell).await;
    env.create(&whole).await;
    let run = env.wait_terminal("cell").await;
    assert_eq!(
        (phase_of(&run), reason_of(&run)),
        (Some(RunPhase::Failed), Some(Reason::CellTimeout)),
        "{:?}",
        run.status
    );
    let run = env.wait_terminal("whole").await;
    assert_eq!(
        (phase_of(&run), reason_of(&run)),
        (Some(RunPhase::Failed), Some(Reason::DeadlineExceeded)),
        "{:?}",
        run.status
    );
    env.wait_lock_free("cell").await;
    env.wait_lock_free("whole").await;
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_times_out_the_start() {
    let env = setup("imagepull").await;
    let image = format!("{}/nope:1", support::FAILING_REGISTRY);
    env.create(&run_of("pull", &["print(1)"], json!({"image": image, "timeouts": {"start": "3s"}}))).await;
    let run = env.wait_terminal("pull").await;
    assert_eq!(
        (phase_of(&run), reason_of(&run)),
        (Some(RunPhase::Failed), Some(Reason::StartTimeout)),
        "{:?}",
        run.status
    );
    let message = run.status.unwrap().message.unwrap();
    assert!(message.contains("ImagePullBackOff") || message.contains("ErrImagePull"), "{message}");
    env.wait_lock_free("notebook-run").await;
}

#[tokio::test]
async fn a_run_that_cannot_get_a_pod_or_fit_its_inputs_fails_and_frees_the_lock() {
    let env = setup("nopod").await;
    let sa =
        run_of("no-sa", &["print(1)"], json!({"serviceAccountName": "missing", "timeouts": {"start": "3s"}}));
    env.create(&sa).await;
    let run = env.wait_terminal("no-sa").await;
    assert_eq!(
        (phase_of(&run), reason_of(&run)),
        (Some(RunPhase::Failed), Some(Reason::StartTimeout)),
        "{:?}",
        run.status
    );
    assert!(run.status.unwrap().message.unwrap().contains("no pod was created"));
    env.wait_lock_free("notebook-run").await;
    // An inline notebook and parameters the API server accepts, but together too large to
    // freeze into one ConfigMap.
    let big = format!(
        "{{\"cells\": [], \"metadata\": {{\"pad\": \"{}\"}}, \"nbformat\": 4, \"nbformat_minor\": 5}}",
        "x".repeat(990_000)
    );
    let mut huge = run_of("huge", &[], json!({"parameters": {"pad": "y".repeat(20_000)}}));
    huge.spec.notebook.inline = Some(big);
    env.create(&huge).await;
    let run = env.wait_terminal("huge").await;
    assert_eq!(
        (phase_of(&run), reason_of(&run)),
        (Some(RunPhase::Failed), Some(Reason::InvalidNotebook)),
        "{:?}",
        run.status
    );
    env.wait_lock_free("notebook-run").await;
    assert!(env.jobs().await.is_empty());
    let checked = overlap::check_no_overlap(ControlPlane::shared(), &env.ns, &RunLocks::new())
        .await
        .unwrap_or_else(|broken| panic!("{broken}"));
    assert_eq!(checked.containers(), 0, "no container ran: {checked}");
}

#[tokio::test]
async fn a_killed_kernel_is_kernel_died() {
    let env = setup("kernel").await;
    env.create(&run_of(
        "dies",
        &["print('before')", "import os; os.kill(os.getpid(), 9)", "print('after')"],
        json!({}),
    ))
    .await;
    let run = env.wait_terminal("dies").await;
    assert_eq!(
        (phase_of(&run), reason_of(&run)),
        (Some(RunPhase::Failed), Some(Reason::KernelDied)),
        "{:?}",
        run.status
    );
}

#[tokio::test]
async fn parameters_are_injected_into_the_executed_notebook() {
    let env = setup("params").await;
    let nb = std::fs::read_to_string(format!("{REPO}/notebooks/parameters.ipynb")).unwrap();
    let run: NotebookRun = from_json(json!({"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun",
        "metadata": {"name": "p"}, "spec": {"notebook": {"inline": nb}, "parameters": {"name": "cluster", "count": 2}}}));
    env.create(&run).await;
    let run = env.wait_terminal("p").await;
    assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{:?}", run.status);
    let nb = env.executed_notebook(&run).await.to_string();
    assert!(nb.contains("injected-parameters"), "the injected cell is in the executed notebook");
    assert!(nb.contains("hello cluster, hello cluster"), "{nb}");
}

#[tokio::test]
async fn cancel_stops_the_run_and_keeps_the_partial_notebook() {
    let env = setup("cancel").await;
    env.create(&run_of("long", &["print('started', flush=True)", "import time; time.sleep(600)"], json!({})))
        .await;
    env.wait_until("long", "the second cell running", |r| {
        r.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.cells_completed >= 1)
    })
    .await;
    let patch = json!({"spec": {"cancel": true}});
    env.runs.patch("long", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let run = env.wait_terminal("long").await;
    assert_eq!(
        (phase_of(&run), reason_of(&run)),
        (Some(RunPhase::Cancelled), Some(Reason::Cancelled)),
        "{:?}",
        run.status
    );
    // The runner handled SIGTERM: it handed over the partial notebook, marked as cancelled.
    let nb = env.executed_notebook(&run).await;
    assert!(cell_text(&nb, 0).contains("started"), "partial notebook kept: {nb}");
    env.wait_lock_free("notebook-run").await;
    wait_for(RUN_TIMEOUT, "the Job gone", || async { env.jobs().await.is_empty() }).await;
    // cancel cannot go back.
    let undo = json!({"spec": {"cancel": false}});
    let err = env.runs.patch("long", &PatchParams::default(), &Patch::Merge(&undo)).await.unwrap_err();
    assert!(err.to_string().contains("cancel"), "{err}");
}

// === the lock ===

#[tokio::test]
async fn queue_forbid_and_replace() {
    let env = setup("policies").await;
    let long = ["print('holding', flush=True)", "import time; time.sleep(600)"];
    env.create(&run_of("holder", &long, json!({}))).await;
    env.wait_phase("holder", RunPhase::Running).await;

    env.create(&run_of("forbidden", &["print(1)"], json!({"concurrencyPolicy": "Forbid"}))).await;
    let run = env.wait_terminal("forbidden").await;
    assert_eq!((phase_of(&run), reason_of(&run)), (Some(RunPhase::Rejected), Some(Reason::LockHeld)));
    assert!(run.status.unwrap().message.unwrap().contains("holder"), "the message names the holder");

    env.create(&run_of("queued", &["print('queued ran')"], json!({}))).await;
    let run = env.wait_phase("queued", RunPhase::Queued).await;
    assert_eq!(run.status.unwrap().blocked_by.as_deref(), Some("holder"));

    env.create(&run_of("replacer", &["print('replacer ran')"], json!({"concurrencyPolicy": "Replace"})))
        .await;
    let holder = env.wait_terminal("holder").await;
    assert_eq!((phase_of(&holder), reason_of(&holder)), (Some(RunPhase::Cancelled), Some(Reason::Replaced)));
    // Queue is FIFO: "queued" came first, then the replacer.
    let queued = env.wait_terminal("queued").await;
    let replacer = env.wait_terminal("replacer").await;
    assert_eq!(phase_of(&queued), Some(RunPhase::Succeeded));
    assert_eq!(phase_of(&replacer), Some(RunPhase::Succeeded));
    let start = |r: &NotebookRun| r.status.as_ref().unwrap().start_time.clone().unwrap().0;
    let end = |r: &NotebookRun| r.status.as_ref().unwrap().completion_time.clone().unwrap().0;
    assert!(end(&queued) <= start(&replacer), "queued ran before the replacer");
    env.wait_lock_free("notebook-run").await;
    let checked = env.assert_no_overlap().await;
    for ran in ["queued", "replacer"] {
        assert!(checked.ran("notebook-run", ran), "{ran} had a container: {checked}");
    }
    assert!(!checked.ran("notebook-run", "forbidden"), "the rejected run had no container: {checked}");
}

#[tokio::test]
async fn twenty_runs_on_one_lock_run_one_at_a_time_in_order() {
    let env = setup("twenty").await;
    let names: Vec<String> = (0..20).map(|i| format!("r{i:02}")).collect();
    let all: Vec<NotebookRun> = names.iter().map(|n| run_of(n, &["print('hi')"], json!({}))).collect();
    // Created at once: the order is creationTimestamp (seconds), then name.
    futures::future::join_all(all.iter().map(|r| env.create(r))).await;
    let mut runs = Vec::new();
    for n in &names {
        let run = wait_for(Duration::from_secs(300), format!("{n} to finish"), || {
            let runs = env.runs.clone();
            async move {
                runs.get_opt(n)
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| phase_of(r).is_some_and(RunPhase::is_terminal))
            }
        })
        .await;
        assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{n}: {:?}", run.status);
        runs.push(run);
    }
    let mut intervals: Vec<(jiff::Timestamp, jiff::Timestamp, jiff::Timestamp, String)> = runs
        .iter()
        .map(|r| {
            let s = r.status.as_ref().unwrap();
            (
                r.metadata.creation_timestamp.clone().unwrap().0,
                s.start_time.clone().unwrap().0,
                s.completion_time.clone().unwrap().0,
                r.name_any(),
            )
        })
        .collect();
    intervals.sort_by(|a, b| (a.0, &a.3).cmp(&(b.0, &b.3)));
    for w in intervals.windows(2) {
        assert!(w[0].2 <= w[1].1, "{} ended at {} after {} started at {}", w[0].3, w[0].2, w[1].3, w[1].1);
    }
    env.wait_lock_free("notebook-run").await;
    let checked = env.assert_no_overlap().await;
    assert_eq!(checked.runs_on("notebook-run"), 20, "every run had a container: {checked}");
}

#[tokio::test]
async fn a_job_deleted_out_of_band_fails_the_run_and_is_not_recreated() {
    let env = setup("jobdeleted").await;
    env.create(&run_of("victim", &["import time; time.sleep(600)"], json!({}))).await;
    let run = env.wait_phase("victim", RunPhase::Running).await;
    let job = run.status.unwrap().job_name.unwrap();
    env.ns.api::<Job>().delete(&job, &DeleteParams::background()).await.unwrap();
    let run = env.wait_terminal("victim").await;
    assert_eq!((phase_of(&run), reason_of(&run)), (Some(RunPhase::Failed), Some(Reason::JobDeleted)));
    wait_for(RUN_TIMEOUT, "the Job gone", || async { env.jobs().await.is_empty() }).await;
    env.wait_lock_free("notebook-run").await;
    assert!(env.jobs().await.is_empty(), "the Job was not recreated");
}

#[tokio::test]
async fn a_lease_deleted_by_hand_is_restored_and_admits_no_one_else() {
    let env = setup("leasedeleted").await;
    env.create(&run_of("holder", &["import time; time.sleep(6)"], json!({}))).await;
    env.wait_phase("holder", RunPhase::Running).await;
    env.create(&run_of("waiter", &["print('after')"], json!({}))).await;
    env.wait_phase("waiter", RunPhase::Queued).await;
    let leases: Api<Lease> = env.ns.api();
    let before = env.lease("notebook-run").await.expect("lease");
    leases.delete("notebook-run", &DeleteParams::default()).await.unwrap();
    let restored = wait_for(RUN_TIMEOUT, "the lease restored", || {
        let leases = leases.clone();
        let uid = before.uid();
        async move { leases.get_opt("notebook-run").await.ok().flatten().filter(|l| l.uid() != uid) }
    })
    .await;
    assert_eq!(restored.spec.unwrap().holder_identity.as_deref(), Some("holder"));
    assert_eq!(
        phase_of(&env.get("waiter").await),
        Some(RunPhase::Queued),
        "no second run admitted meanwhile"
    );
    let reasons: Vec<String> = env.events_for("holder").await.into_iter().filter_map(|e| e.reason).collect();
    assert!(reasons.contains(&"LockRecovered".to_string()), "{reasons:?}");
    let holder = env.wait_terminal("holder").await;
    let waiter = env.wait_terminal("waiter").await;
    assert_eq!(phase_of(&waiter), Some(RunPhase::Succeeded));
    assert!(
        holder.status.unwrap().completion_time.unwrap().0 <= waiter.status.unwrap().start_time.unwrap().0
    );
    let checked = env.assert_no_overlap().await;
    assert_eq!(checked.runs_on("notebook-run"), 2, "holder and waiter had a container: {checked}");
}

#[tokio::test]
async fn a_controller_restarted_mid_run_creates_no_second_job() {
    let mut env = setup("restart").await;
    env.create(&run_of("survivor", &["import time; time.sleep(4); print('done')"], json!({}))).await;
    env.wait_phase("survivor", RunPhase::Running).await;
    env.op.restart();
    let run = env.wait_terminal("survivor").await;
    assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{:?}", run.status);
    assert_eq!(env.jobs().await.len(), 1, "exactly one Job");
    env.wait_lock_free("notebook-run").await;
}

#[tokio::test]
async fn ttl_deletes_the_run_and_its_children() {
    let env = setup("ttl").await;
    env.create(&run_of("short-lived", &["print(1)"], json!({"ttlSecondsAfterFinished": 2}))).await;
    env.wait_terminal("short-lived").await;
    wait_for(RUN_TIMEOUT, "the run deleted by its TTL", || async {
        env.runs.get_opt("short-lived").await.ok().is_some_and(|r| r.is_none())
    })
    .await;
    let cms: Api<ConfigMap> = env.ns.api();
    wait_for(RUN_TIMEOUT, "children garbage-collected", || {
        let cms = cms.clone();
        let jobs = env.ns.api::<Job>();
        async move {
            let lp = ListParams::default().labels("notebooks.dev/run=short-lived");
            cms.list(&lp).await.is_ok_and(|l| l.items.is_empty())
                && jobs.list(&lp).await.is_ok_and(|l| l.items.is_empty())
        }
    })
    .await;
}

#[tokio::test]
async fn the_api_server_refuses_invalid_runs() {
    let env = setup("validation").await;
    let two: NotebookRun = from_json(json!({"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun",
        "metadata": {"name": "two"}, "spec": {"notebook": {"path": "/a.ipynb", "inline": "{}"}}}));
    let err = env.runs.create(&PostParams::default(), &two).await.unwrap_err();
    assert!(err.to_string().contains("exactly one of"), "{err}");
    let long = run_of(&"n".repeat(64), &["print(1)"], json!({}));
    let err = env.runs.create(&PostParams::default(), &long).await.unwrap_err();
    assert!(err.to_string().contains("at most 63"), "{err}");
    let bad_lock = run_of("badlock", &["print(1)"], json!({"lock": "Not_A_DNS_Name"}));
    let err = env.runs.create(&PostParams::default(), &bad_lock).await.unwrap_err();
    assert!(err.to_string().contains("lock"), "{err}");
    let ok = env.create(&run_of("immutable", &["print(1)"], json!({"cancel": true}))).await;
    let patch = json!({"spec": {"cancel": false}});
    let err =
        env.runs.patch(&ok.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap_err();
    assert!(err.to_string().contains("cancel cannot go back"), "{err}");
    let patch = json!({"spec": {"image": "other:1"}});
    let err =
        env.runs.patch(&ok.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap_err();
    assert!(err.to_string().contains("immutable"), "{err}");
}
