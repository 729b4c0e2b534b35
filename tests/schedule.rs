//! NotebookSchedules on the real control plane: the controller binary turns each tick of a
//! seconds-field cron into one NotebookRun named from the tick, never two (a restart between
//! ticks included), stops while suspended (also through the facade), prunes history, reports a
//! Forbid template's skipped tick, and says clearly when the cron or the time zone is wrong.

mod support;

use std::collections::BTreeSet;
use std::sync::Once;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use notebook_operator::schedule::{self, NotebookSchedule};
use notebook_operator::{NotebookRun, Reason, RunPhase};
use serde_json::{Value, json};

use support::runs::{RUN_TIMEOUT, RunEnv, setup};
use support::{ControlPlane, from_json, ipynb, served, try_wait_for, wait_for};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const TOKEN: &str = "schedule-test-token";

/// The NotebookSchedule CRD, once per test binary (the harness installs NotebookRun's).
fn install_schedule_crd(cp: &ControlPlane) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let crd = format!("{REPO}/crds/notebookschedule.yaml");
        let out = cp.kubectl().args(["apply", "--server-side", "-f", &crd]).output().expect("kubectl apply");
        assert!(out.status.success(), "CRD apply: {}", String::from_utf8_lossy(&out.stderr));
        let out = cp
            .kubectl()
            .args([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/notebookschedules.notebooks.dev",
            ])
            .output()
            .expect("kubectl wait");
        assert!(out.status.success(), "CRD established: {}", String::from_utf8_lossy(&out.stderr));
    });
}

async fn env(prefix: &str) -> RunEnv {
    install_schedule_crd(ControlPlane::shared());
    setup(prefix).await
}

/// A schedule of an inline notebook of `cells`; `extra` is merged into the spec.
fn schedule_of(name: &str, cron: &str, cells: &[&str], extra: Value) -> NotebookSchedule {
    let mut spec = json!({
        "schedule": cron,
        "runTemplate": {"spec": {"notebook": {"inline": ipynb(cells)}}},
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            if k == "runTemplate" {
                // Merged into the template's spec.
                let t = s["runTemplate"]["spec"].as_object_mut().unwrap();
                t.extend(v["spec"].as_object().unwrap().clone());
            } else {
                s.insert(k.clone(), v.clone());
            }
        }
    }
    from_json(json!({
        "apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookSchedule",
        "metadata": {"name": name}, "spec": spec,
    }))
}

async fn create(env: &RunEnv, schedule: &NotebookSchedule) -> NotebookSchedule {
    env.ns.api::<NotebookSchedule>().create(&PostParams::default(), schedule).await.expect("create schedule")
}

/// The schedule's runs, oldest tick first.
async fn runs_of(env: &RunEnv, schedule: &str) -> Vec<NotebookRun> {
    let lp = ListParams::default().labels(&format!("{}={schedule}", schedule::SCHEDULE_LABEL));
    let mut runs = env.runs.list(&lp).await.expect("list runs").items;
    runs.sort_by_key(|r| r.name_any());
    runs
}

/// The tick a run was created for, from its annotation (None: started by hand).
fn tick_of(run: &NotebookRun) -> Option<jiff::Timestamp> {
    run.annotations().get(schedule::SCHEDULED_AT).map(|t| t.parse().expect("an RFC 3339 tick"))
}

/// Waits until `schedule` has at least `n` runs created by ticks; returns them all.
async fn wait_runs(env: &RunEnv, schedule: &str, n: usize) -> Vec<NotebookRun> {
    wait_for(RUN_TIMEOUT, format!("{schedule}: {n} ticks' runs"), || async {
        let runs = runs_of(env, schedule).await;
        (runs.iter().filter(|r| tick_of(r).is_some()).count() >= n).then_some(runs)
    })
    .await
}

async fn get_schedule(env: &RunEnv, name: &str) -> NotebookSchedule {
    env.ns.api::<NotebookSchedule>().get(name).await.expect("get schedule")
}

fn condition<'a>(
    s: &'a NotebookSchedule,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

async fn events_of(env: &RunEnv, name: &str, reason: &str) -> Vec<Event> {
    let events: Api<Event> = env.ns.api();
    let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
    let list = events.list(&lp).await.map(|l| l.items).unwrap_or_default();
    list.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).collect()
}

/// Every tick run is named `<schedule>-<tick unix seconds>`, owned by the schedule, on a tick.
fn assert_tick_runs(schedule: &NotebookSchedule, runs: &[NotebookRun], every: i64) {
    let mut ticks = BTreeSet::new();
    for run in runs {
        let Some(tick) = tick_of(run) else { continue };
        assert_eq!(run.name_any(), format!("{}-{}", schedule.name_any(), tick.as_second()));
        assert_eq!(tick.as_second() % every, 0, "{} is on the schedule", run.name_any());
        assert!(ticks.insert(tick), "two runs for the tick of {tick}");
        let owner = &run.owner_references()[0];
        assert_eq!(owner.kind, "NotebookSchedule");
        assert_eq!(Some(&owner.uid), schedule.uid().as_ref());
        assert_eq!(owner.controller, Some(true));
    }
}

#[tokio::test]
async fn ticks_create_one_run_each_even_across_a_restart() {
    let mut env = env("sched-ticks").await;
    let s = create(
        &env,
        &schedule_of(
            "every3",
            "*/3 * * * * *",
            &["print('tick')"],
            json!({"successfulRunsHistoryLimit": 100, "failedRunsHistoryLimit": 100}),
        ),
    )
    .await;
    let runs = wait_runs(&env, "every3", 2).await;
    assert_tick_runs(&s, &runs, 3);
    let first = &runs[0];
    assert_eq!(first.spec.lock, "every3", "the lock defaults to the schedule's name");
    assert_eq!(first.labels().get(schedule::SCHEDULE_LABEL).map(String::as_str), Some("every3"));
    let done = env.wait_terminal(&first.name_any()).await;
    assert_eq!(done.phase(), Some(RunPhase::Succeeded), "{:?}", done.status);

    let status = wait_for(RUN_TIMEOUT, "the status to name the last tick and the next", || async {
        let s = get_schedule(&env, "every3").await;
        let st = s.status.clone()?;
        (st.last_schedule_time.is_some()
            && st.next_schedule_time.is_some()
            && st.last_successful_time.is_some())
        .then_some(st)
    })
    .await;
    let next = status.next_schedule_time.unwrap().0;
    assert_eq!(next.as_second() % 3, 0);
    assert!(next > status.last_schedule_time.unwrap().0);
    assert!(status.last_run.is_some());
    assert_eq!(
        condition(&get_schedule(&env, "every3").await, "Ready").map(|c| c.status.as_str()),
        Some("True")
    );
    let table =
        ControlPlane::shared().kubectl().args(["get", "nbsched", "-n", env.ns.name()]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    for column in ["SCHEDULE", "SUSPEND", "LAST RESULT", "NEXT", "AGE", "*/3 * * * * *"] {
        assert!(table.contains(column), "kubectl get nbsched shows {column}:\n{table}");
    }

    // The controller dies between ticks and stays down over two ticks: on restart, one run for
    // the most recent missed tick (a catch-up, as CronJob), no run twice.
    env.op.kill();
    let killed_at = jiff::Timestamp::now();
    let before: BTreeSet<String> = runs_of(&env, "every3").await.iter().map(|r| r.name_any()).collect();
    wait_for(Duration::from_secs(20), "two ticks to pass", || async {
        jiff::Timestamp::now().as_second() >= killed_at.as_second() + 7
    })
    .await;
    let restarted_at = jiff::Timestamp::now();
    env.op.restart();
    let after = wait_for(RUN_TIMEOUT, "runs after the restart", || async {
        let runs = runs_of(&env, "every3").await;
        let later = runs.iter().filter(|r| tick_of(r).is_some_and(|t| t > restarted_at)).count();
        (later >= 2).then_some(runs)
    })
    .await;
    assert_tick_runs(&s, &after, 3);
    let missed: Vec<String> = after
        .iter()
        .filter(|r| !before.contains(&r.name_any()))
        .filter(|r| tick_of(r).is_some_and(|t| t <= restarted_at))
        .map(|r| r.name_any())
        .collect();
    assert_eq!(missed.len(), 1, "ticks missed while down make one catch-up run: {missed:?}");
    for run in &after {
        let run = env.wait_terminal(&run.name_any()).await;
        assert_eq!(run.phase(), Some(RunPhase::Succeeded), "{}: {:?}", run.name_any(), run.status);
    }
}

#[tokio::test]
async fn suspend_and_resume_through_the_facade_and_run_now() {
    let env = env("sched-suspend").await;
    let cp = ControlPlane::shared();
    let facade = served::kube_facade(cp, env.ns.name(), "nb", TOKEN);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let call = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{}{path}", facade.url)).bearer_auth(TOKEN)
    };
    wait_for(Duration::from_secs(30), "the facade to be ready", || async {
        http.get(format!("{}/readyz", facade.url)).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;

    create(&env, &schedule_of("pausable", "*/2 * * * * *", &["print('x')"], json!({}))).await;
    wait_runs(&env, "pausable", 1).await;

    let listed: Value = call(reqwest::Method::GET, "/schedules").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed[0]["name"], "pausable", "{listed}");
    assert_eq!(listed[0]["schedule"], "*/2 * * * * *");
    assert_eq!(listed[0]["lock"], "pausable");
    let missing = call(reqwest::Method::GET, "/schedules/nope").send().await.unwrap();
    assert_eq!(missing.status(), 404);
    // A name no object can have is not looked up: 404 too (not an API server error).
    let impossible =
        call(reqwest::Method::POST, "/schedules/Not%20a%20name%0D/suspend").send().await.unwrap();
    assert_eq!(impossible.status(), 404);
    let doc: Value = call(reqwest::Method::GET, "/openapi.json").send().await.unwrap().json().await.unwrap();
    for path in ["/schedules", "/schedules/{name}", "/schedules/{name}/run", "/schedules/{name}/suspend"] {
        assert!(doc["paths"][path].is_object(), "{path} in the kubernetes facade's OpenAPI document");
    }
    let unauthorized = http.get(format!("{}/schedules", facade.url)).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401, "schedules need the token");

    let suspended = call(reqwest::Method::POST, "/schedules/pausable/suspend").send().await.unwrap();
    assert_eq!(suspended.status(), 200);
    let suspended: Value = suspended.json().await.unwrap();
    assert_eq!(suspended["suspend"], true, "{suspended}");
    assert!(get_schedule(&env, "pausable").await.spec.suspend);
    // A tick in flight as the patch landed may still make its run; none after that.
    let quiet_from = jiff::Timestamp::now().as_second() + 2;
    let ticked = try_wait_for(Duration::from_secs(8), || async {
        runs_of(&env, "pausable").await.iter().any(|r| tick_of(r).is_some_and(|t| t.as_second() > quiet_from))
    })
    .await;
    assert!(ticked.is_none(), "a suspended schedule made a run: {:?}", runs_of(&env, "pausable").await);
    let s = get_schedule(&env, "pausable").await;
    assert_eq!(condition(&s, "Ready").map(|c| c.reason.as_str()), Some("Suspended"), "{:?}", s.status);
    assert!(s.status.as_ref().unwrap().next_schedule_time.is_none(), "no next tick while suspended");

    // Run now works while suspended: a manual run owned by the schedule.
    let ran = call(reqwest::Method::POST, "/schedules/pausable/run").send().await.unwrap();
    assert_eq!(ran.status(), 201);
    let ran: Value = ran.json().await.unwrap();
    let id = ran["id"].as_str().expect("an id").to_string();
    assert!(id.starts_with("pausable-manual-"), "{id}");
    let manual = env.wait_terminal(&id).await;
    assert_eq!(manual.phase(), Some(RunPhase::Succeeded), "{:?}", manual.status);
    assert_eq!(manual.owner_references()[0].name, "pausable");
    assert!(tick_of(&manual).is_none(), "a manual run has no tick");
    let shown: Value =
        call(reqwest::Method::GET, "/schedules/pausable").send().await.unwrap().json().await.unwrap();
    assert_eq!(shown["suspend"], true);

    let resumed: Value =
        call(reqwest::Method::POST, "/schedules/pausable/resume").send().await.unwrap().json().await.unwrap();
    assert_eq!(resumed["suspend"], false, "{resumed}");
    let resumed_at = jiff::Timestamp::now();
    wait_for(RUN_TIMEOUT, "a tick after the resume", || async {
        runs_of(&env, "pausable").await.iter().any(|r| tick_of(r).is_some_and(|t| t > resumed_at))
    })
    .await;
    let unknown = call(reqwest::Method::POST, "/schedules/nope/run").send().await.unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn the_local_backend_has_no_schedules() {
    let local = served::local(&["print(1)"], TOKEN);
    let http = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::GET, "/schedules"),
        (reqwest::Method::GET, "/schedules/x"),
        (reqwest::Method::POST, "/schedules/x/run"),
        (reqwest::Method::POST, "/schedules/x/suspend"),
        (reqwest::Method::POST, "/schedules/x/resume"),
    ] {
        let resp =
            http.request(method, format!("{}{path}", local.url)).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(resp.status(), 501, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["detail"].as_str().unwrap().contains("kubernetes backend"), "{body}");
    }
    let doc: Value = http
        .get(format!("{}/openapi.json", local.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/schedules",
        "/schedules/{name}",
        "/schedules/{name}/run",
        "/schedules/{name}/suspend",
        "/schedules/{name}/resume",
    ] {
        assert!(doc["paths"].get(path).is_none(), "{path} is not in the local backend's OpenAPI document");
    }
}

#[tokio::test]
async fn history_limits_prune_the_oldest_finished_runs() {
    let env = env("sched-history").await;
    create(
        &env,
        &schedule_of("fine", "*/2 * * * * *", &["print('ok')"], json!({"successfulRunsHistoryLimit": 2})),
    )
    .await;
    create(
        &env,
        &schedule_of(
            "broken",
            "*/2 * * * * *",
            &["raise ValueError('no')"],
            json!({"failedRunsHistoryLimit": 1}),
        ),
    )
    .await;
    for (name, phase, limit) in [("fine", RunPhase::Succeeded, 2), ("broken", RunPhase::Failed, 1)] {
        let seen = std::sync::Mutex::new(BTreeSet::new());
        wait_for(RUN_TIMEOUT, format!("{name}: more runs than its limit, then pruned to it"), || {
            let (seen, env) = (&seen, &env);
            async move {
                let runs = runs_of(env, name).await;
                let mut seen = seen.lock().unwrap();
                seen.extend(runs.iter().map(|r| r.name_any()));
                let finished = runs
                    .iter()
                    .filter(|r| r.is_finished() && r.metadata.deletion_timestamp.is_none())
                    .count();
                (seen.len() >= limit + 3 && finished == limit).then_some(())
            }
        })
        .await;
        let seen = seen.into_inner().unwrap();
        // What is kept is the newest of what finished; nothing kept is of another phase.
        let runs = runs_of(&env, name).await;
        let finished: Vec<&NotebookRun> = runs.iter().filter(|r| r.is_finished()).collect();
        assert!(
            finished.len() <= limit,
            "{name}: {:?}",
            finished.iter().map(|r| r.name_any()).collect::<Vec<_>>()
        );
        for run in &finished {
            assert_eq!(run.phase(), Some(phase), "{}", run.name_any());
        }
        let oldest_seen = seen.iter().next().unwrap();
        assert!(
            runs.iter().all(|r| &r.name_any() != oldest_seen),
            "{name}: the oldest run ({oldest_seen}) was pruned first"
        );
    }
    let fine = get_schedule(&env, "fine").await;
    assert!(fine.status.unwrap().last_successful_time.is_some());
    let broken = get_schedule(&env, "broken").await;
    let last = broken.status.unwrap().last_run.expect("lastRun");
    assert!(last.name.starts_with("broken-"));
}

#[tokio::test]
async fn a_forbid_template_skips_a_tick_while_the_lock_is_held() {
    let env = env("sched-forbid").await;
    create(
        &env,
        &schedule_of(
            "exclusive",
            "*/2 * * * * *",
            &["import time", "time.sleep(8)"],
            json!({"runTemplate": {"spec": {"concurrencyPolicy": "Forbid"}}, "failedRunsHistoryLimit": 20}),
        ),
    )
    .await;
    let s = wait_for(RUN_TIMEOUT, "the schedule to report a rejected tick", || async {
        let s = get_schedule(&env, "exclusive").await;
        let last = s.status.as_ref()?.last_run.clone()?;
        let skipped = condition(&s, schedule::CONDITION_TICK_SKIPPED)?;
        (last.phase == Some(RunPhase::Rejected) && skipped.status == "True").then_some(s)
    })
    .await;
    let last = s.status.as_ref().unwrap().last_run.clone().unwrap();
    assert_eq!(last.reason, Some(Reason::LockHeld), "{last:?}");
    let skipped = condition(&s, schedule::CONDITION_TICK_SKIPPED).unwrap();
    assert_eq!(skipped.reason, "LockHeld");
    assert!(skipped.message.contains(&last.name), "{}", skipped.message);
    let rejected = env.get(&last.name).await;
    assert_eq!(rejected.spec.lock, "exclusive");
    let events = wait_for(Duration::from_secs(30), "a TickSkipped Event", || async {
        let events = events_of(&env, "exclusive", "TickSkipped").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    // The holder was not disturbed by the rejected ticks.
    let runs = runs_of(&env, "exclusive").await;
    let holder =
        runs.iter().find(|r| r.phase() != Some(RunPhase::Rejected)).expect("a run that held the lock");
    let holder = env.wait_terminal(&holder.name_any()).await;
    assert_eq!(holder.phase(), Some(RunPhase::Succeeded), "{:?}", holder.status);
}

#[tokio::test]
async fn invalid_cron_or_time_zone_is_a_clear_condition_and_bad_specs_are_refused() {
    let env = env("sched-invalid").await;
    for (name, extra, reason) in [
        ("bad-cron", json!({"schedule": "61 * * * *"}), "InvalidSchedule"),
        ("bad-zone", json!({"timeZone": "Mars/Olympus"}), "InvalidTimeZone"),
    ] {
        create(&env, &schedule_of(name, "*/2 * * * * *", &["print(1)"], extra)).await;
        let s = wait_for(RUN_TIMEOUT, format!("{name}: Ready=False"), || async {
            let s = get_schedule(&env, name).await;
            condition(&s, "Ready").is_some_and(|c| c.status == "False").then_some(s)
        })
        .await;
        let ready = condition(&s, "Ready").unwrap();
        assert_eq!(ready.reason, reason);
        assert!(
            ready.message.contains(if reason == "InvalidSchedule" { "61 * * * *" } else { "Mars/Olympus" }),
            "{}",
            ready.message
        );
        wait_for(Duration::from_secs(30), format!("{name}: a {reason} Event"), || async {
            events_of(&env, name, reason).await.iter().any(|e| e.type_.as_deref() == Some("Warning"))
        })
        .await;
        assert!(s.status.unwrap().next_schedule_time.is_none());
    }
    // Two ticks later, still no run; a fix makes it tick.
    let from = jiff::Timestamp::now();
    let any = try_wait_for(Duration::from_secs(5), || async {
        !runs_of(&env, "bad-cron").await.is_empty() || !runs_of(&env, "bad-zone").await.is_empty()
    })
    .await;
    assert!(any.is_none(), "an invalid schedule made a run");
    let api: Api<NotebookSchedule> = env.ns.api();
    let fix = json!({"spec": {"timeZone": "Europe/Paris"}});
    api.patch("bad-zone", &PatchParams::default(), &Patch::Merge(&fix)).await.expect("patch");
    wait_for(RUN_TIMEOUT, "the fixed schedule to tick", || async {
        runs_of(&env, "bad-zone").await.iter().any(|r| tick_of(r).is_some_and(|t| t > from))
    })
    .await;
    let s = get_schedule(&env, "bad-zone").await;
    assert_eq!(condition(&s, "Ready").map(|c| c.status.as_str()), Some("True"));

    // What the API server refuses outright.
    let refused = |s: NotebookSchedule| {
        let env = &env;
        async move { api_create(env, &s).await.expect_err("refused").to_string() }
    };
    let mut two_sources = schedule_of("two-sources", "@daily", &["print(1)"], json!({}));
    two_sources.spec.run_template.spec.notebook.path = Some("x.ipynb".into());
    assert!(refused(two_sources).await.contains("exactly one of notebook"));
    let long = schedule_of(&"x".repeat(64), "@daily", &["print(1)"], json!({}));
    assert!(refused(long).await.contains("at most 63 characters"));
    let mut cancelled = schedule_of("cancelled", "@daily", &["print(1)"], json!({}));
    cancelled.spec.run_template.spec.cancel = true;
    assert!(refused(cancelled).await.contains("cannot be cancelled"));
}

async fn api_create(env: &RunEnv, s: &NotebookSchedule) -> kube::Result<NotebookSchedule> {
    env.ns.api::<NotebookSchedule>().create(&PostParams::default(), s).await
}

#[tokio::test]
async fn two_controllers_at_once_make_one_run_per_tick() {
    let env = env("sched-two").await;
    // A second controller on the same namespace, without an election: both tick every schedule.
    let second = support::operator::Operator::start(ControlPlane::shared(), env.ns.name());
    let s = create(
        &env,
        &schedule_of(
            "twice",
            "*/2 * * * * *",
            &["print('once')"],
            json!({"successfulRunsHistoryLimit": 100, "failedRunsHistoryLimit": 100}),
        ),
    )
    .await;
    let runs = wait_runs(&env, "twice", 4).await;
    assert_tick_runs(&s, &runs, 2);
    // Each run was created by one controller; the other met AlreadyExists and took it as done.
    let logs = strip_ansi(&format!("{}\n{}", env.op.log_text(), second.log_text()));
    for run in &runs {
        let created = logs
            .lines()
            .filter(|l| l.contains("tick: run created") && l.contains(&format!("run={}", run.name_any())))
            .count();
        assert_eq!(created, 1, "{} created {created} times", run.name_any());
    }
    assert!(logs.contains("tick already done"), "both controllers ticked: the AlreadyExists path ran");
    for reason in ["NameConflict", "FailedCreate"] {
        assert!(events_of(&env, "twice", reason).await.is_empty(), "a {reason} Event");
    }
}

/// The log without its colours.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape runs to its final letter (`m` for colours).
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
