//! The dashboard (`/ui/`) in a real headless Chromium, against `notebook-operator local --token`
//! and against the kubernetes backend on the real control plane: the token form, a run started
//! from the page whose bar reaches 100 %, a failure's traceback, a kill from the page, a narrow
//! screen. Screenshots go to target/ui-screenshots/.

mod support;
#[path = "support/webdriver.rs"]
mod webdriver;

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use notebook_operator::schedule::NotebookSchedule;
use serde_json::json;

use support::operator::{Operator, install_crd};
use support::served::{self, Served};
use support::{ControlPlane, from_json, ipynb};
use webdriver::Browser;

const TOKEN: &str = "s3cret";
const LIMIT: Duration = Duration::from_secs(90);

fn local(cells: &[&str]) -> Served {
    served::local(cells, TOKEN)
}

/// Opens the dashboard and passes the token form (a wrong token first: it is refused).
async fn open_with_token(b: &Browser, url: &str) {
    b.goto(&format!("{url}/ui/")).await;
    b.wait("the token form", LIMIT, "return !document.getElementById('token-view').hidden;", json!([])).await;
    b.type_into("#token-input", "wrong").await;
    b.click("#token-form button[type=submit]").await;
    b.wait(
        "the wrong token refused",
        LIMIT,
        "return document.getElementById('token-error').textContent;",
        json!([]),
    )
    .await;
    b.type_into("#token-input", TOKEN).await;
    b.click("#token-form button[type=submit]").await;
    b.wait("the runs list", LIMIT, "return !document.getElementById('list-view').hidden;", json!([])).await;
}

/// Starts a run from the page (with `parameters`) and waits for its page; answers its id.
async fn start_from_page(b: &Browser, parameters: &str) -> String {
    b.type_into("#parameters", parameters).await;
    b.click("#start").await;
    let hash = b
        .wait(
            "the run's page",
            LIMIT,
            "return location.hash.startsWith('#/runs/') && location.hash;",
            json!([]),
        )
        .await;
    hash.as_str().unwrap().trim_start_matches("#/runs/").to_string()
}

async fn wait_phase(b: &Browser, phase: &str) {
    b.wait(
        &format!("phase {phase}"),
        LIMIT,
        "return document.getElementById('run-phase').textContent === arguments[0];",
        json!([phase]),
    )
    .await;
}

/// A run started from the page reaches 100 %, shows its log and its executed notebook, and is
/// listed with its phase, bar and parameters; screenshots of both pages and a narrow list.
async fn success_flow(b: &Browser, url: &str, shots: &str) {
    open_with_token(b, url).await;
    let id = start_from_page(b, r#"{"name": "dashboard"}"#).await;
    wait_phase(b, "Succeeded").await;
    b.wait(
        "the bar at 100 %",
        LIMIT,
        "return document.getElementById('run-progress').value === 100;",
        json!([]),
    )
    .await;
    b.wait(
        "the log",
        LIMIT,
        "return document.getElementById('run-log').textContent.includes('hello dashboard');",
        json!([]),
    )
    .await;
    b.wait(
        "the executed notebook",
        LIMIT,
        "return document.getElementById('run-notebook').textContent.includes('hello dashboard');",
        json!([]),
    )
    .await;
    assert!(b.text("#run-download").await.contains("Download"));
    b.screenshot(&format!("{shots}-run")).await;

    b.click("header h1 a").await;
    let row = b
        .wait(
            "the run in the list",
            LIMIT,
            "const r = document.querySelector(`tr[data-run='${arguments[0]}']`); \
             return r && r.querySelector('progress').value === 100 && r.innerText;",
            json!([id]),
        )
        .await;
    let row = row.as_str().unwrap();
    assert!(row.contains("Succeeded") && row.contains("dashboard"), "{row}");
    b.screenshot(&format!("{shots}-list")).await;
    b.resize(390, 800).await;
    b.wait(
        "the narrow list",
        LIMIT,
        "return document.querySelector('thead').offsetParent === null;",
        json!([]),
    )
    .await;
    b.screenshot(&format!("{shots}-list-narrow")).await;
}

const HELLO: [&str; 3] = [
    "name = 'world'",
    "import time; time.sleep(0.5); print('hello', name, flush=True)",
    "time.sleep(0.5); print('done')",
];

/// HELLO with its first cell tagged `parameters`, so the page's parameters follow it.
fn tagged_hello() -> String {
    ipynb(&HELLO).replacen("\"metadata\":{}", "\"metadata\":{\"tags\":[\"parameters\"]}", 1)
}

#[tokio::test]
async fn local_start_from_the_page_reaches_100_percent() {
    let s = local(&[]);
    std::fs::write(s.dir.path().join("notebook.ipynb"), tagged_hello()).unwrap();
    let b = Browser::start(1200, 800).await;
    success_flow(&b, &s.url, "local").await;
}

const FAILING: [&str; 2] = ["print('before')", "1 / 0"];
const SLEEPY: [&str; 2] = ["print('started', flush=True)", "import time; time.sleep(60)"];

/// A failure shows its traceback and cell (on the facade at `failing`); a run on the facade at
/// `sleepy` is killed from its page.
async fn failure_and_kill(b: &Browser, failing: &str, sleepy: &str, shots: &str) {
    open_with_token(b, failing).await;
    start_from_page(b, "").await;
    wait_phase(b, "Failed").await;
    let tb = b
        .wait(
            "the traceback",
            LIMIT,
            "return document.getElementById('run-traceback').textContent;",
            json!([]),
        )
        .await;
    assert!(tb.as_str().unwrap().contains("ZeroDivisionError"), "{tb}");
    assert_eq!(b.text("#error-title").await, "Traceback (cell 1)");
    b.screenshot(&format!("{shots}-failure")).await;

    open_with_token(b, sleepy).await;
    start_from_page(b, "").await;
    wait_phase(b, "Running").await;
    b.wait(
        "the first line",
        LIMIT,
        "return document.getElementById('run-log').textContent.includes('started');",
        json!([]),
    )
    .await;
    b.click("#run-kill").await;
    wait_phase(b, "Cancelled").await;
}

#[tokio::test]
async fn local_a_failure_shows_its_traceback_and_a_run_is_killed_from_the_page() {
    let (failing, sleepy) = (local(&FAILING), local(&SLEEPY));
    let b = Browser::start(1200, 800).await;
    failure_and_kill(&b, &failing.url, &sleepy.url, "local").await;
}

/// The kubernetes facade (`api --token`) of namespace `ns` on ConfigMap `nb` holding `notebook`.
async fn kube_facade(cp: &ControlPlane, ns: &str, cm_name: &str, notebook: String) -> Served {
    let cm: ConfigMap =
        from_json(json!({"metadata": {"name": cm_name}, "data": {"notebook.ipynb": notebook}}));
    kube::Api::<ConfigMap>::namespaced(cp.client(), ns).create(&PostParams::default(), &cm).await.unwrap();
    served::kube_facade(cp, ns, cm_name, TOKEN)
}

#[tokio::test]
async fn kube_start_from_the_page_reaches_100_percent() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("ui").await;
    let _op = Operator::start(cp, &ns);
    let s = kube_facade(cp, &ns, "nb", tagged_hello()).await;
    let b = Browser::start(1200, 800).await;
    success_flow(&b, &s.url, "kube").await;
}

#[tokio::test]
async fn kube_a_failure_shows_its_traceback_and_a_run_is_killed_from_the_page() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    // One namespace each: one run at a time per lock.
    let (ns_fail, ns_sleep) = (cp.namespace("ui-fail").await, cp.namespace("ui-kill").await);
    let (_op1, _op2) = (Operator::start(cp, &ns_fail), Operator::start(cp, &ns_sleep));
    let failing = kube_facade(cp, &ns_fail, "nb", ipynb(&FAILING)).await;
    let sleepy = kube_facade(cp, &ns_sleep, "nb", ipynb(&SLEEPY)).await;
    let b = Browser::start(1200, 800).await;
    failure_and_kill(&b, &failing.url, &sleepy.url, "kube").await;
}

/// The schedules of the namespace on the list page: listed with their state and next tick,
/// suspended and resumed from the page (the schedule's spec follows), and run now (the page
/// moves to the new run, which succeeds).
#[tokio::test]
async fn kube_schedules_are_suspended_resumed_and_run_from_the_page() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("ui-sched").await;
    let _op = Operator::start(cp, &ns);
    let s = kube_facade(cp, &ns, "nb", tagged_hello()).await;
    let schedules = kube::Api::<NotebookSchedule>::namespaced(cp.client(), &ns);
    let yearly: NotebookSchedule = from_json(json!({
        "apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookSchedule",
        "metadata": {"name": "yearly"},
        "spec": {"schedule": "0 0 1 1 *", "runTemplate": {"spec": {"notebook": {"inline": ipynb(&["print('scheduled hello')"])}}}},
    }));
    schedules.create(&PostParams::default(), &yearly).await.unwrap();
    let b = Browser::start(1200, 800).await;
    open_with_token(&b, &s.url).await;

    let row = "#schedules tr[data-schedule='yearly']";
    let state = "const r = document.querySelector(arguments[0]); \
                 return r && r.querySelector('.badge').textContent === arguments[1] && r.cells[4].textContent === arguments[2];";
    // Active, with the next tick the controller computed (the page shows it only once known).
    b.wait(
        "the schedule listed, active, with its next tick",
        LIMIT,
        "const r = document.querySelector(arguments[0]); \
         return r && r.querySelector('.badge').textContent === 'Active' && r.cells[4].textContent !== '';",
        json!([row]),
    )
    .await;
    b.screenshot("kube-schedules").await;
    for (button, suspended, badge) in
        [("Suspend yearly", true, "Suspended"), ("Resume yearly", false, "Active")]
    {
        b.click(&format!("{row} button[aria-label='{button}']")).await;
        let deadline = std::time::Instant::now() + LIMIT;
        while schedules.get("yearly").await.unwrap().spec.suspend != suspended {
            assert!(std::time::Instant::now() < deadline, "{button}: spec.suspend never became {suspended}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if suspended {
            b.wait(&format!("the row {badge}"), LIMIT, state, json!([row, badge, ""])).await;
        } else {
            b.wait(
                &format!("the row {badge}"),
                LIMIT,
                "const r = document.querySelector(arguments[0]); \
                 return r && r.querySelector('.badge').textContent === arguments[1];",
                json!([row, badge]),
            )
            .await;
        }
    }
    b.click(&format!("{row} button[aria-label='Run yearly now']")).await;
    let hash = b
        .wait(
            "the new run's page",
            LIMIT,
            "return location.hash.startsWith('#/runs/yearly-') && location.hash;",
            json!([]),
        )
        .await;
    wait_phase(&b, "Succeeded").await;
    b.wait(
        "the scheduled notebook's log",
        LIMIT,
        "return document.getElementById('run-log').textContent.includes('scheduled hello');",
        json!([]),
    )
    .await;
    let name = hash.as_str().unwrap().trim_start_matches("#/runs/").to_string();
    let run =
        kube::Api::<notebook_operator::NotebookRun>::namespaced(cp.client(), &ns).get(&name).await.unwrap();
    let owner = run.metadata.owner_references.unwrap_or_default();
    assert!(owner.iter().any(|o| o.kind == "NotebookSchedule" && o.name == "yearly"), "{owner:?}");
}
