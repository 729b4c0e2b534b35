//! The REST API on the kubernetes backend, on the real control plane: `/start` creates a
//! NotebookRun the controller admits, reads come from the cache, `/kill` sets `cancel`.

#[path = "support/api_tools.rs"]
mod api_tools;
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use notebook_operator::NotebookRun;
use serde_json::{Value, json};

use support::operator::{Operator, binary, install_crd};
use support::{ControlPlane, TestNamespace, from_json, ipynb, process, wait_for};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// `notebook-operator api` for one namespace, on the notebook in ConfigMap `nb`.
struct ApiServer {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Who admits the runs: a separate controller, nobody, or the same process (`notebook-operator all`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    WithController,
    WithoutController,
    All,
}

async fn start_api(cp: &ControlPlane, ns: &str, mode: Mode) -> ApiServer {
    start_api_as(ns, mode, cp.kubeconfig(), Stdio::inherit(), None).await
}

/// `start_api` with the credentials of `kubeconfig`, the facade's log going to `stderr`, and
/// the bearer `token` when there is one.
async fn start_api_as(
    ns: &str,
    mode: Mode,
    kubeconfig: &Path,
    stderr: Stdio,
    token: Option<&str>,
) -> ApiServer {
    let (command, admit_timeout) = match mode {
        Mode::WithController => ("api", "20s"),
        Mode::WithoutController => ("api", "3s"),
        Mode::All => ("all", "20s"),
    };
    let mut cmd = Command::new(binary());
    cmd.args([command, "--listen", "127.0.0.1:0", "--namespace", ns, "--notebook-configmap", "nb"])
        .args(["--image", "quay.io/jupyter/minimal-notebook:test", "--admit-timeout", admit_timeout])
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    if mode == Mode::All {
        cmd.args([
            "--default-image",
            "quay.io/jupyter/minimal-notebook:test",
            "--progress-interval",
            "300ms",
        ]);
    }
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    process::contain(&mut cmd);
    let mut child = cmd.spawn().expect("spawn notebook-operator api");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .expect("read the first line");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("URL in the first line")
        .to_string();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let server = ApiServer { child, url, http };
    wait_for(RUN_TIMEOUT, "the API ready", || async {
        server.http.get(format!("{}/readyz", server.url)).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    server
}

impl ApiServer {
    async fn call(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let resp = self.http.request(method, format!("{}{path}", self.url)).send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn text(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await.expect("GET");
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.http.post(format!("{}{path}", self.url)).json(body).send().await.expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn wait_status(&self, id: &str, status: &str) -> Value {
        wait_for(RUN_TIMEOUT, format!("{id} to be {status}"), || async {
            let (_, run) = self.call(reqwest::Method::GET, &format!("/progress?task_id={id}")).await;
            (run["status"] == status).then_some(run)
        })
        .await
    }
}

struct Env {
    _op: Option<Operator>,
    ns: TestNamespace,
    api: ApiServer,
}

async fn setup(prefix: &str, cells: &[&str], mode: Mode) -> Env {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace(prefix).await;
    let cm: ConfigMap =
        from_json(json!({"metadata": {"name": "nb"}, "data": {"notebook.ipynb": ipynb(cells)}}));
    ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await.unwrap();
    let op = (mode == Mode::WithController).then(|| Operator::start(cp, &ns));
    let api = start_api(cp, &ns, mode).await;
    Env { _op: op, ns, api }
}

/// The value of one series in a Prometheus text exposition, 0 when absent.
fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

async fn runs(ns: &TestNamespace) -> Vec<NotebookRun> {
    ns.api::<NotebookRun>().list(&ListParams::default()).await.unwrap().items
}

#[tokio::test]
async fn the_seed_flow_runs_a_notebook_run() {
    let cells = ["print('first', flush=True)", "import time; time.sleep(3)", "print('last')"];
    let env = setup("apiseed", &cells, Mode::WithController).await;
    use reqwest::Method;
    assert_eq!(env.api.call(Method::GET, "/progress").await, (400, json!({"detail": "The task never ran."})));
    // An unknown task_id: 400 as the original answered on the seed endpoints, 404 on /runs.
    let unknown = json!({"detail": "Could not find task nope"});
    assert_eq!(env.api.call(Method::GET, "/progress?task_id=nope").await, (400, unknown.clone()));
    assert_eq!(env.api.call(Method::GET, "/output?task_id=nope&full=true").await, (400, unknown.clone()));
    assert_eq!(env.api.call(Method::POST, "/kill?task_id=nope").await, (400, unknown.clone()));
    assert_eq!(env.api.call(Method::GET, "/runs/nope").await, (404, unknown.clone()));
    assert_eq!(env.api.call(Method::POST, "/runs/nope/cancel").await, (404, unknown));
    let (code, started) = env.api.call(Method::POST, "/start").await;
    assert_eq!(code, 200, "{started}");
    assert_eq!(started["status"], "STARTED");
    let id = started["id"].as_str().unwrap().to_string();
    let run = env.ns.api::<NotebookRun>().get(&id).await.expect("the run is a NotebookRun");
    assert_eq!(run.spec.concurrency_policy, notebook_operator::crd::ConcurrencyPolicy::Forbid);

    // follow=true streams what the notebook prints before the run ends.
    let resp = env.api.http.get(format!("{}/output?follow=true", env.api.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("first") {
        let chunk = tokio::time::timeout(RUN_TIMEOUT, stream.next()).await.expect("a chunk in time");
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("stream open").unwrap()));
    }
    let (_, now) = env.api.call(Method::GET, &format!("/progress?task_id={id}")).await;
    assert_eq!(now["status"], "STARTED", "the first line arrived while the run was going");
    assert!(!seen.contains("##notebook-operator"), "protocol lines are not shown: {seen}");

    let done = env.api.wait_status(&id, "SUCCESS").await;
    assert!(done["date"].as_str().unwrap().ends_with('Z'));
    assert_eq!(env.api.text("/output").await, (200, format!("✅ Task {id} finished with success.\n")));
    // full=true still works after the pods are gone.
    let pods: Api<Pod> = env.ns.api();
    pods.delete_collection(&DeleteParams::default().grace_period(0), &ListParams::default()).await.unwrap();
    wait_for(RUN_TIMEOUT, "pods gone", || async {
        pods.list(&ListParams::default()).await.is_ok_and(|l| l.items.is_empty())
    })
    .await;
    let (code, full) = env.api.text("/output?full=true").await;
    assert_eq!(code, 200);
    let nb: Value = serde_json::from_str(&full).expect("ipynb");
    assert!(nb["cells"][2]["outputs"].to_string().contains("last"));
    let (code, page) = env.api.call(Method::GET, "/runs").await;
    assert_eq!((code, page["items"][0]["id"].as_str()), (200, Some(id.as_str())));
}

#[tokio::test]
async fn twenty_simultaneous_starts_admit_exactly_one_run() {
    let env = setup("apiconcurrent", &["import time; time.sleep(5)"], Mode::WithController).await;
    let calls = (0..20).map(|_| env.api.call(reqwest::Method::POST, "/start"));
    let answers = futures::future::join_all(calls).await;
    let ok: Vec<&Value> = answers.iter().filter(|(c, _)| (200..300).contains(c)).map(|(_, b)| b).collect();
    assert_eq!(ok.len(), 1, "exactly one 2xx: {answers:?}");
    let id = ok[0]["id"].as_str().unwrap();
    for (code, body) in answers.iter().filter(|(c, _)| *c != 200) {
        assert_eq!(*code, 400, "{body}");
        assert!(body["detail"].as_str().unwrap().starts_with("Another task is already running: "), "{body}");
    }
    // `api` mode shows what the facade updates: its requests and starts, not the controller's runs.
    let (code, metrics) = env.api.text("/metrics").await;
    assert_eq!(code, 200);
    let requests =
        |class: &str| format!(r#"notebook_operator_http_requests_total{{route="/start",status="{class}"}}"#);
    assert_eq!(series(&metrics, &requests("2xx")), 1.0, "{metrics}");
    assert_eq!(series(&metrics, &requests("4xx")), 19.0, "{metrics}");
    assert_eq!(
        series(&metrics, r#"notebook_operator_api_starts_total{outcome="admitted"}"#),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, r#"notebook_operator_api_starts_total{outcome="refused"}"#),
        19.0,
        "{metrics}"
    );
    assert!(!metrics.contains("runs_started"), "runs are counted by the controller: {metrics}");
    // Refused starts leave no record: exactly one NotebookRun, the admitted one.
    wait_for(RUN_TIMEOUT, "rejected runs removed", || async {
        let all = runs(&env.ns).await;
        (all.len() == 1 && all[0].metadata.name.as_deref() == Some(id)).then_some(())
    })
    .await;
    env.api.wait_status(id, "SUCCESS").await;
}

#[tokio::test]
async fn kill_cancels_the_run() {
    let env =
        setup("apikill", &["print('up', flush=True)", "import time; time.sleep(600)"], Mode::WithController)
            .await;
    let (code, started) = env.api.call(reqwest::Method::GET, "/start").await;
    assert_eq!(code, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    wait_for(RUN_TIMEOUT, "the first cell done", || async {
        let (_, run) = env.api.call(reqwest::Method::GET, "/progress").await;
        run["progress"]["cellsCompleted"].as_u64().is_some_and(|n| n >= 1)
    })
    .await;
    let (code, killed) = env.api.call(reqwest::Method::POST, "/kill").await;
    assert_eq!(code, 200);
    assert_eq!(killed["status"], "REVOKED", "{killed}");
    let run = env.ns.api::<NotebookRun>().get(&id).await.unwrap();
    assert!(run.spec.cancel);
    let (code, full) = env.api.text("/output?full=true").await;
    assert_eq!(code, 200);
    assert!(full.contains("up"), "the partial notebook is kept");
    let (code, again) = env.api.call(reqwest::Method::POST, "/kill").await;
    assert_eq!((code, again["status"].as_str()), (200, Some("REVOKED")), "kill is idempotent");
}

#[tokio::test]
async fn without_a_controller_start_answers_503_and_leaves_nothing() {
    let env = setup("apinocontroller", &["print(1)"], Mode::WithoutController).await;
    let (code, body) = env.api.call(reqwest::Method::POST, "/start").await;
    assert_eq!(code, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("no controller"), "{body}");
    wait_for(RUN_TIMEOUT, "the orphan run removed", || async { runs(&env.ns).await.is_empty() }).await;
}

#[tokio::test]
async fn all_serves_and_reconciles_in_one_process_and_stops_on_sigterm() {
    let mut env = setup("apiall", &["print('all in one')"], Mode::All).await;
    let (code, started) = env.api.call(reqwest::Method::POST, "/start").await;
    assert_eq!(code, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    env.api.wait_status(&id, "SUCCESS").await;
    let pid = env.api.child.id() as i32;
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let exited = wait_for(RUN_TIMEOUT, "notebook-operator all to exit", || {
        let status = env.api.child.try_wait();
        async move { status.ok().flatten() }
    })
    .await;
    assert!(exited.success(), "one shutdown signal stops both halves cleanly: {exited:?}");
}

/// A run on the facade's lock, created by someone else (kubectl), with policy Forbid.
fn foreign_forbid_run(name: &str) -> NotebookRun {
    from_json(json!({
        "apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun", "metadata": {"name": name},
        "spec": {"notebook": {"configMap": {"name": "nb"}}, "concurrencyPolicy": "Forbid",
                 "image": "quay.io/jupyter/minimal-notebook:test"}
    }))
}

#[tokio::test]
async fn without_task_id_progress_and_kill_address_the_running_run_not_a_newer_refused_one() {
    let env = setup(
        "apicurrent",
        &["print('up', flush=True)", "import time; time.sleep(600)"],
        Mode::WithController,
    )
    .await;
    let (code, started) = env.api.call(reqwest::Method::POST, "/start").await;
    assert_eq!(code, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    // Refused on the same lock, created in the same second or later, with a name that sorts
    // after any UUID: "newest by (creationTimestamp, name)" would pick it.
    let refused = "zzzz-refused";
    let runs = env.ns.api::<NotebookRun>();
    runs.create(&PostParams::default(), &foreign_forbid_run(refused)).await.unwrap();
    wait_for(RUN_TIMEOUT, "the second run rejected", || async {
        runs.get(refused).await.ok().filter(|r| r.phase() == Some(notebook_operator::crd::RunPhase::Rejected))
    })
    .await;

    let (code, current) = env.api.call(reqwest::Method::GET, "/progress").await;
    assert_eq!((code, current["id"].as_str()), (200, Some(id.as_str())), "{current}");
    assert_eq!(current["status"], "STARTED");
    let (code, killed) = env.api.call(reqwest::Method::POST, "/kill").await;
    assert_eq!(
        (code, killed["id"].as_str()),
        (200, Some(id.as_str())),
        "/kill cancels the running run: {killed}"
    );
    assert_eq!(killed["status"], "REVOKED", "{killed}");
    assert!(runs.get(&id).await.unwrap().spec.cancel);
    assert!(!runs.get(refused).await.unwrap().spec.cancel, "the refused run is left alone");

    // Both finished: the last one to finish, not the last one created.
    let (code, last) = env.api.call(reqwest::Method::GET, "/progress").await;
    assert_eq!(
        (code, last["id"].as_str(), last["status"].as_str()),
        (200, Some(id.as_str()), Some("REVOKED")),
        "{last}"
    );
}

/// A kubeconfig for `account` (created with a Role granting `rules`), with a token from the
/// TokenRequest API.
async fn service_account_kubeconfig(
    cp: &ControlPlane,
    ns: &TestNamespace,
    account: &str,
    rules: Value,
    dir: &Path,
) -> PathBuf {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let pp = PostParams::default();
    ns.api::<ServiceAccount>().create(&pp, &from_json(json!({"metadata": {"name": account}}))).await.unwrap();
    ns.api::<Role>()
        .create(&pp, &from_json(json!({"metadata": {"name": account}, "rules": rules})))
        .await
        .unwrap();
    let binding = json!({
        "metadata": {"name": account},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns.name()}]
    });
    ns.api::<RoleBinding>().create(&pp, &from_json(binding)).await.unwrap();
    let out =
        cp.kubectl().args(["create", "token", account, "-n", ns.name(), "--duration=1h"]).output().unwrap();
    assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let admin: Value = serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig()).unwrap()).unwrap();
    let ca = admin
        .pointer("/clusters/0/cluster/certificate-authority-data")
        .cloned()
        .expect("the CA in the kubeconfig");
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": cp.server(), "certificate-authority-data": ca}}],
        "users": [{"name": account, "user": {"token": token.trim()}}],
        "contexts": [{"name": account,
                      "context": {"cluster": "test", "user": account, "namespace": ns.name()}}],
        "current-context": account,
    });
    let path = dir.join(format!("{account}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn a_refused_api_call_answers_a_clear_message_and_logs_the_detail() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("apiforbidden").await;
    let dir = tempfile::tempdir().unwrap();
    // May watch runs (so the facade gets ready) but not create them.
    let rules = json!([{"apiGroups": ["notebooks.dev"], "resources": ["notebookruns"],
                        "verbs": ["get", "list", "watch"]}]);
    let kubeconfig = service_account_kubeconfig(cp, &ns, "watch-only", rules, dir.path()).await;
    let log_path = dir.path().join("api.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let api = start_api_as(&ns, Mode::WithoutController, &kubeconfig, Stdio::from(log), None).await;

    for path in ["/start", "/runs"] {
        let (code, body) = api.post_json(path, &json!({"parameters": {"x": 1}})).await;
        assert_eq!(code, 500, "{path}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert_eq!(
            detail, "the Kubernetes API refused the request (could not create the run); see the facade's log",
            "{path}"
        );
        assert!(
            !detail.contains("system:serviceaccount"),
            "{path} does not tell who the facade is: {detail}"
        );
    }
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("system:serviceaccount") && logged.contains("forbidden"),
        "the detail is in the facade's log: {logged}"
    );
    let (_, metrics) = api.text("/metrics").await;
    assert_eq!(series(&metrics, r#"notebook_operator_api_starts_total{outcome="failed"}"#), 2.0, "{metrics}");
}

#[tokio::test]
async fn follow_streams_a_log_with_an_odd_byte_and_a_long_line_to_the_end() {
    // os.write reaches the pod log as is: a byte that is not UTF-8, then a 200,000-byte line.
    let cells = [
        "import os; os.write(1, b'odd \\xff byte\\n')",
        "print('y' * 200_000, flush=True)",
        "import time; time.sleep(1)",
        "print('last line', flush=True)",
    ];
    let env = setup("apioddlog", &cells, Mode::WithController).await;
    let (code, started) = env.api.call(reqwest::Method::POST, "/start").await;
    assert_eq!(code, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    let resp = env.api.http.get(format!("{}/output?follow=true", env.api.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let mut followed = Vec::new();
    while let Some(chunk) = tokio::time::timeout(RUN_TIMEOUT, stream.next()).await.expect("a chunk in time") {
        followed.extend_from_slice(&chunk.expect("the stream never fails"));
    }
    let log = String::from_utf8(followed).expect("the streamed log is UTF-8");
    assert!(log.contains("odd \u{fffd} byte"), "the odd byte is replaced, its line kept");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 64 * 1024, "lines are cut at 64 KiB: longest {longest}");
    assert!(
        log.ends_with("last line\n"),
        "the stream goes on to the end: {:?}",
        &log[log.len().saturating_sub(200)..]
    );
    let done = env.api.wait_status(&id, "SUCCESS").await;
    assert_eq!(done["progress"]["percent"], 100, "{done}");
}

#[tokio::test]
async fn openapi_document_validates_and_schemathesis_finds_nothing_with_auth_on() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("openapi").await;
    let cm: ConfigMap = from_json(
        json!({"metadata": {"name": "nb"}, "data": {"notebook.ipynb": ipynb(&["x = 1", "print(x)"])}}),
    );
    ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await.unwrap();
    let _op = Operator::start(cp, &ns);
    let api =
        start_api_as(&ns, Mode::WithController, cp.kubeconfig(), Stdio::inherit(), Some("s3cret")).await;

    let doc = api_tools::validate_document(&api.url, Some("s3cret")).await;
    assert_eq!(doc["security"], json!([{"bearer": []}]), "with a token, the document asks for it");
    api_tools::schemathesis(&api.url, "s3cret", 10).await;
    assert!(!runs(&ns).await.is_empty(), "schemathesis started runs through the facade");
}
