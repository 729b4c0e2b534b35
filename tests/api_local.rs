//! The REST API on the local backend, end to end: the real binary, the real runner and a real
//! Jupyter kernel (the venv made by `make venv`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

#[path = "support/api_tools.rs"]
mod api_tools;
#[path = "support/notebook.rs"]
mod notebook_support;
use notebook_support::ipynb as notebook;

const BIN: &str = env!("CARGO_BIN_EXE_notebook-operator");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn python() -> PathBuf {
    let venv = Path::new(REPO).join(".venv/bin/python");
    assert!(venv.exists(), "{} is missing: run `make venv` first", venv.display());
    venv
}

struct Server {
    child: Child,
    url: String,
    data_dir: PathBuf,
    http: reqwest::Client,
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Options<'a> {
    notebook: &'a str,
    data_dir: Option<&'a Path>,
    token: Option<&'a str>,
    /// More arguments for `local`.
    args: &'a [&'a str],
}

fn spawn(opts: Options<'_>) -> std::io::Result<(Child, Option<tempfile::TempDir>, PathBuf, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let nb_path = tmp.path().join("notebook.ipynb");
    std::fs::write(&nb_path, opts.notebook)?;
    // Relative by default, as in `make run`: runs execute in their own directory.
    let data_dir = opts.data_dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("data"));
    let mut cmd = Command::new(BIN);
    cmd.args(["local", "--listen", "127.0.0.1:0", "--kill-grace", "5s"])
        .arg("--notebook")
        .arg(&nb_path)
        .arg("--python")
        .arg(python())
        .arg("--data-dir")
        .arg(&data_dir)
        .current_dir(tmp.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = opts.token {
        cmd.arg("--token").arg(t);
    }
    cmd.args(opts.args);
    let data_dir = if data_dir.is_relative() { tmp.path().join(data_dir) } else { data_dir };
    Ok((cmd.spawn()?, Some(tmp), data_dir, nb_path))
}

async fn start_server(opts: Options<'_>) -> Server {
    let (mut child, tmp, data_dir, _) = spawn(opts).expect("spawn notebook-operator");
    let stdout = child.stdout.take().expect("stdout");
    // The first stdout line names the address.
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("join")
    .expect("read stdout");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in the server's first line: {line:?}"))
        .to_string();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
    Server { child, url, data_dir, http, _tmp: tmp }
}

impl Server {
    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await.expect("GET");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn text(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await.expect("GET");
        (resp.status().as_u16(), resp.text().await.expect("text"))
    }

    /// Polls `/progress?task_id=` until `done` holds, or panics after `limit`.
    async fn wait_for(&self, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (_, run) = self.get(&format!("/progress?task_id={id}")).await;
            if done(&run) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} did not reach the expected state in {limit:?}: {run}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_finished(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(90), |r| r["date"].is_string()).await
    }
}

fn pid_alive(pid: i32) -> bool {
    // A zombie is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z')),
        Err(_) => false,
    }
}

async fn wait_gone(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) is still alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SUCCESS_NB: [&str; 3] =
    ["print('one')", "import time; time.sleep(1.0); print('two')", "print('three')"];

#[tokio::test]
async fn seed_flow_matches_the_original() {
    let s =
        start_server(Options { notebook: &notebook(&SUCCESS_NB), data_dir: None, token: None, args: &[] })
            .await;

    assert_eq!(s.get("/ping").await, (200, json!("I am alive")));
    assert_eq!(s.get("/progress").await, (400, json!({"detail": "The task never ran."})));
    assert_eq!(s.get("/output").await, (400, json!({"detail": "The task never ran."})));
    assert_eq!(s.get("/kill").await, (400, json!({"detail": "The task never ran."})));

    let (code, started) = s.get("/start").await;
    assert_eq!(code, 200, "{started}");
    let id = started["id"].as_str().expect("id").to_string();
    assert_eq!(started["status"], "STARTED");
    assert!(started["date"].is_null());
    assert_eq!(started["message"], "running notebook.ipynb", "the notebook's name, not its path here");

    let (code, again) = s.post("/start", None).await;
    assert_eq!((code, again), (400, json!({"detail": format!("Another task is already running: {id}")})));

    let (code, body) = s.get("/output").await;
    assert_eq!(code, 400);
    assert!(body["detail"].as_str().unwrap().contains("is in state STARTED"), "{body}");

    // An unknown task_id: 400 as the original answered on the seed endpoints, 404 on /runs.
    let unknown = json!({"detail": "Could not find task nope"});
    assert_eq!(s.get("/progress?task_id=nope").await, (400, unknown.clone()));
    assert_eq!(s.get("/output?task_id=nope").await, (400, unknown.clone()));
    assert_eq!(s.get("/output?task_id=nope&full=true").await, (400, unknown.clone()));
    assert_eq!(s.post("/kill?task_id=nope", None).await, (400, unknown.clone()));
    assert_eq!(s.get("/kill?task_id=nope").await, (400, unknown.clone()));
    assert_eq!(s.get("/runs/nope").await, (404, unknown.clone()));
    assert_eq!(s.post("/runs/nope/cancel", None).await, (404, unknown));

    let done = s.wait_finished(&id).await;
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(done["phase"], "Succeeded");
    assert_eq!(done["progress"]["percent"], 100);
    assert_eq!(done["progress"]["cellsTotal"], 3);
    let date = done["date"].as_str().unwrap();
    assert!(
        date.parse::<jiff::Timestamp>().is_ok() && date.ends_with('Z'),
        "date {date} is RFC 3339 with a zone"
    );

    assert_eq!(s.text("/output").await, (200, format!("✅ Task {id} finished with success.\n")));
    let (code, full) = s.text("/output?full=true").await;
    assert_eq!(code, 200);
    let nb: Value = serde_json::from_str(&full).expect("full=true is ipynb JSON");
    let outputs = nb["cells"][2]["outputs"].to_string();
    assert!(outputs.contains("three"), "executed notebook has the outputs: {outputs}");

    // /kill of a finished run leaves it as it is.
    let (code, killed) = s.post(&format!("/kill?task_id={id}"), None).await;
    assert_eq!((code, killed["status"].as_str()), (200, Some("SUCCESS")));

    let (code, page) = s.get("/runs").await;
    assert_eq!(code, 200);
    assert_eq!(page["items"][0]["id"], id.as_str());
    let (_, log) = s.text(&format!("/runs/{id}/logs")).await;
    assert_eq!(log, "one\ntwo\nthree\n", "the log is what the cells printed");
    let (code, _) = s.text(&format!("/runs/{id}/notebook")).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn failure_answers_the_traceback() {
    let nb = notebook(&["x = 1", "raise ValueError('bad value here')", "print('never')"]);
    let s = start_server(Options { notebook: &nb, data_dir: None, token: None, args: &[] }).await;
    let (_, started) = s.post("/start", None).await;
    let id = started["id"].as_str().unwrap().to_string();
    let done = s.wait_finished(&id).await;
    assert_eq!(done["status"], "FAILURE", "{done}");
    assert_eq!(done["reason"], "CellError");
    let (code, text) = s.text("/output").await;
    assert_eq!(code, 200);
    let header = format!("❗❗Task {id} finished with failure ❗❗\n\n");
    assert!(text.starts_with(&header), "{text}");
    assert!(text.contains("ValueError") && text.contains("bad value here"), "{text}");
    assert!(!text.contains('\u{1b}'), "traceback is ANSI-free: {text:?}");
    let (_, run) = s.get(&format!("/runs/{id}")).await;
    assert_eq!(run["error"]["ename"], "ValueError");
    assert_eq!(run["error"]["cell"], 1);
    // The partial notebook is kept.
    let (code, full) = s.text("/output?full=true").await;
    assert_eq!(code, 200);
    assert!(full.contains("ValueError"));
}

#[tokio::test]
async fn fifty_simultaneous_starts_admit_exactly_one() {
    let s =
        start_server(Options { notebook: &notebook(&SUCCESS_NB), data_dir: None, token: None, args: &[] })
            .await;
    let calls = (0..50).map(|_| s.post("/start", None));
    let answers = futures::future::join_all(calls).await;
    let accepted: Vec<&Value> = answers.iter().filter(|(c, _)| *c == 200).map(|(_, b)| b).collect();
    assert_eq!(accepted.len(), 1, "exactly one /start is accepted: {answers:?}");
    let id = accepted[0]["id"].as_str().unwrap();
    let refused =
        answers.iter().filter(|(c, b)| *c == 400 && b["detail"].as_str().unwrap().ends_with(id)).count();
    assert_eq!(refused, 49);
    let (_, page) = s.get("/runs").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    s.wait_finished(id).await;
}

/// A notebook that reports its kernel's pid, then runs until killed.
fn pid_then_sleep() -> String {
    notebook(&[
        "import os; print('kernel-pid', os.getpid(), flush=True)",
        "import time\nfor i in range(600):\n    time.sleep(0.5)",
    ])
}

async fn kernel_pid(s: &Server, id: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, log) = s.text(&format!("/runs/{id}/logs")).await;
        if let Some(pid) = log.lines().find_map(|l| l.strip_prefix("kernel-pid ")) {
            return pid.trim().parse().expect("pid");
        }
        assert!(Instant::now() < deadline, "the kernel never printed its pid: {log:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn runner_pid(data_dir: &Path, id: &str) -> i32 {
    let record: Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("runs").join(id).join("run.json")).unwrap())
            .unwrap();
    record["pid"].as_i64().expect("an active run records its pid") as i32
}

#[tokio::test]
async fn kill_stops_the_group_and_the_kernel_and_keeps_the_partial_notebook() {
    let s =
        start_server(Options { notebook: &pid_then_sleep(), data_dir: None, token: None, args: &[] }).await;
    let (_, started) = s.get("/start").await;
    let id = started["id"].as_str().unwrap().to_string();
    let kernel = kernel_pid(&s, &id).await;
    let runner = runner_pid(&s.data_dir, &id);
    assert!(pid_alive(kernel) && pid_alive(runner));

    let (code, killed) = s.get("/kill").await;
    assert_eq!(code, 200);
    assert_eq!(killed["status"], "REVOKED", "{killed}");
    assert_eq!(killed["reason"], "Cancelled");
    wait_gone(runner, "runner").await;
    wait_gone(kernel, "kernel").await;

    let (code, full) = s.text(&format!("/output?task_id={id}&full=true")).await;
    assert_eq!(code, 200);
    assert!(full.contains("kernel-pid"), "partial notebook keeps the first cell's output");
    let (code, text) = s.text("/output").await;
    assert_eq!(code, 200);
    assert!(text.contains("revoked"), "{text}");

    let (code, next) = s.post("/start", None).await;
    assert_eq!(code, 200, "the next /start is accepted: {next}");
    assert_ne!(next["id"], id.as_str());
    s.post("/kill", None).await;
}

#[tokio::test]
async fn a_server_killed_mid_run_marks_it_interrupted_on_restart() {
    let data = tempfile::tempdir().unwrap();
    let nb = pid_then_sleep();
    let mut first =
        start_server(Options { notebook: &nb, data_dir: Some(data.path()), token: None, args: &[] }).await;
    let (_, started) = first.get("/start").await;
    let id = started["id"].as_str().unwrap().to_string();
    let kernel = kernel_pid(&first, &id).await;
    let runner = runner_pid(data.path(), &id);
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    wait_gone(runner, "runner of the killed server").await;
    wait_gone(kernel, "kernel of the killed server").await;

    let second =
        start_server(Options { notebook: &nb, data_dir: Some(data.path()), token: None, args: &[] }).await;
    let (code, run) = second.get(&format!("/progress?task_id={id}")).await;
    assert_eq!(code, 200);
    assert_eq!(
        (run["status"].as_str(), run["reason"].as_str()),
        (Some("FAILURE"), Some("Interrupted")),
        "{run}"
    );
    let (code, next) = second.post("/start", None).await;
    assert_eq!(code, 200, "{next}");
    second.post("/kill", None).await;
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let nb = notebook(&SUCCESS_NB);
    let _first =
        start_server(Options { notebook: &nb, data_dir: Some(data.path()), token: None, args: &[] }).await;
    let (child, _tmp, _, _) =
        spawn(Options { notebook: &nb, data_dir: Some(data.path()), token: None, args: &[] }).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is in use by another notebook-operator"), "clear message: {stderr}");
}

#[tokio::test]
async fn token_guards_everything_but_ping_and_probes() {
    let s = start_server(Options {
        notebook: &notebook(&SUCCESS_NB),
        data_dir: None,
        token: Some("s3cret"),
        args: &[],
    })
    .await;
    assert_eq!(s.get("/ping").await.0, 200);
    assert_eq!(s.get("/healthz").await.0, 200);
    assert_eq!(s.get("/readyz").await.0, 200);
    assert_eq!(s.get("/metrics").await.0, 200);
    let (code, body) = s.get("/progress").await;
    assert_eq!(code, 401);
    assert!(body["detail"].as_str().unwrap().contains("Bearer"));
    assert_eq!(s.get("/openapi.json").await.0, 401);
    let wrong = s.http.get(format!("{}/progress", s.url)).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = s.http.get(format!("{}/progress", s.url)).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(right.status().as_u16(), 400, "authorized, and no run ever ran");
}

#[tokio::test]
async fn bad_bodies_get_413_and_422() {
    let s =
        start_server(Options { notebook: &notebook(&SUCCESS_NB), data_dir: None, token: None, args: &[] })
            .await;
    let big = format!("{{\"parameters\": {{\"x\": \"{}\"}}}}", "a".repeat(1024 * 1024 + 1024));
    assert_eq!(s.post("/start", Some(&big)).await.0, 413);
    for bad in
        [r#"{"parameters": {}, "extra": 1}"#, "not json", r#"{"parameters": [1, 2]}"#, "[null]", "[]", "7"]
    {
        let (code, body) = s.post("/start", Some(bad)).await;
        assert_eq!(code, 422, "{bad}: {body}");
        assert!(body["detail"].is_string());
    }
    assert_eq!(s.get("/progress").await.0, 400, "nothing was started by a bad body");
    let (code, body) = s.get("/output?full=maybe").await;
    assert_eq!(code, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().starts_with("invalid query"), "{body}");
    assert_eq!(s.get("/runs?limit=x").await.0, 422);
    assert_eq!(s.get("/runs?limit=0").await.0, 422, "limit is 1 to 500, as documented");
    assert_eq!(s.get("/runs?limit=501").await.0, 422);
    assert_eq!(s.get("/runs?continue=gone").await.0, 422, "an unknown continue token is refused");
    assert_eq!(s.get("/nowhere").await, (404, json!({"detail": "Not Found"})));
    let resp = s.http.delete(format!("{}/start", s.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"detail": "Method Not Allowed"}));
}

#[tokio::test]
async fn parameters_are_injected() {
    let path = Path::new(REPO).join("notebooks/parameters.ipynb");
    let nb = std::fs::read_to_string(path).unwrap();
    let s = start_server(Options { notebook: &nb, data_dir: None, token: None, args: &[] }).await;
    let (code, started) = s.post("/start", Some(r#"{"parameters": {"name": "operator", "count": 2}}"#)).await;
    assert_eq!(code, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    let done = s.wait_finished(&id).await;
    assert_eq!(done["status"], "SUCCESS", "{done}");
    let (_, log) = s.text(&format!("/runs/{id}/logs")).await;
    assert!(log.contains("hello operator, hello operator"), "{log}");
    let (_, full) = s.text("/output?full=true").await;
    assert!(full.contains("injected-parameters"));
}

#[tokio::test]
async fn follow_streams_the_log_before_the_run_ends() {
    let nb =
        notebook(&["print('first line', flush=True)", "import time; time.sleep(4)", "print('last line')"]);
    let s = start_server(Options { notebook: &nb, data_dir: None, token: None, args: &[] }).await;
    let (_, started) = s.post("/start", None).await;
    let id = started["id"].as_str().unwrap().to_string();
    let resp = s.http.get(format!("{}/output?follow=true", s.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("first line") {
        let chunk =
            tokio::time::timeout(Duration::from_secs(60), stream.next()).await.expect("a chunk in time");
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("stream open").unwrap()));
    }
    let (_, run) = s.get(&format!("/progress?task_id={id}")).await;
    assert_eq!(run["status"], "STARTED", "the first line arrived while the run was going");
    while let Some(chunk) = stream.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(seen.ends_with("last line\n"), "the stream ends with the run: {seen:?}");
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let s =
        start_server(Options { notebook: &notebook(&SUCCESS_NB), data_dir: None, token: None, args: &[] })
            .await;
    let (code, doc) = s.get("/openapi.json").await;
    assert_eq!(code, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/start",
        "/progress",
        "/output",
        "/kill",
        "/ping",
        "/runs",
        "/runs/{id}",
        "/runs/{id}/logs",
        "/runs/{id}/notebook",
        "/runs/{id}/cancel",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains_key(p), "OpenAPI lists {p}");
    }
    assert!(paths["/start"]["get"].is_object() && paths["/start"]["post"].is_object());
    assert!(paths["/start"]["get"]["responses"]["400"].is_object());
    // Query parameters are declared where they are read; no token, no security requirement.
    for (path, names) in [
        ("/progress", &["task_id"][..]),
        ("/output", &["task_id", "full", "follow"]),
        ("/runs", &["limit", "continue"]),
    ] {
        let params = paths[path]["get"]["parameters"].as_array().unwrap();
        let declared: Vec<(&str, &str, bool)> = params
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), p["in"].as_str().unwrap(), p["required"] == true))
            .collect();
        let expected: Vec<(&str, &str, bool)> = names.iter().map(|n| (*n, "query", false)).collect();
        assert_eq!(declared, expected, "{path}");
    }
    assert_eq!(paths["/start"]["get"]["operationId"], "start_get");
    assert_eq!(paths["/start"]["post"]["operationId"], "start_post");
    assert!(doc.get("security").is_none(), "no token, no security requirement: {}", doc["security"]);
    assert!(doc["components"]["securitySchemes"].get("bearer").is_none());
    api_tools::validate_document(&s.url, None).await;
    let (code, html) = s.text("/docs/").await;
    assert_eq!(code, 200);
    assert!(html.contains("swagger"), "Swagger UI is served from the binary");
}

#[tokio::test]
async fn openapi_document_validates_and_schemathesis_finds_nothing_with_auth_on() {
    let s = start_server(Options {
        notebook: &notebook(&["x = 1", "print(x)"]),
        data_dir: None,
        token: Some("s3cret"),
        args: &[],
    })
    .await;
    let doc = api_tools::validate_document(&s.url, Some("s3cret")).await;
    assert_eq!(doc["security"], json!([{"bearer": []}]), "with a token, the document asks for it");
    assert_eq!(doc["paths"]["/ping"]["get"]["security"], json!([{}]), "/ping stays open");
    api_tools::schemathesis(&s.url, "s3cret", 10).await;

    // The runs it started say what they run, never where the notebook lies on this server.
    let page: Value = s
        .http
        .get(format!("{}/runs?limit=500", s.url))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let runs = page["items"].as_array().unwrap();
    assert!(!runs.is_empty(), "schemathesis started runs");
    let root = s.data_dir.parent().unwrap().to_str().unwrap();
    for run in runs {
        let message = run["message"].as_str().unwrap_or_default();
        assert!(!message.contains(root) && !message.contains("/tmp/"), "{run}");
    }
}

#[tokio::test]
async fn sigterm_stops_the_active_run_and_records_it_interrupted() {
    let data = tempfile::tempdir().unwrap();
    let nb = pid_then_sleep();
    let mut server =
        start_server(Options { notebook: &nb, data_dir: Some(data.path()), token: None, args: &[] }).await;
    let (_, started) = server.get("/start").await;
    let id = started["id"].as_str().unwrap().to_string();
    let kernel = kernel_pid(&server, &id).await;
    let pid = server.child.id() as i32;
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait();
        (server, status)
    });
    let (_server, status) =
        tokio::time::timeout(Duration::from_secs(30), status).await.expect("exits in time").unwrap();
    assert!(status.unwrap().success(), "a clean exit on SIGTERM");
    wait_gone(kernel, "kernel").await;
    let record: Value =
        serde_json::from_slice(&std::fs::read(data.path().join("runs").join(&id).join("run.json")).unwrap())
            .unwrap();
    assert_eq!(
        (record["phase"].as_str(), record["reason"].as_str()),
        (Some("Failed"), Some("Interrupted")),
        "{record}"
    );
    let partial = std::fs::read_to_string(data.path().join("runs").join(&id).join("notebook.ipynb")).unwrap();
    assert!(partial.contains("kernel-pid"), "the partial notebook was saved");
}

#[tokio::test]
async fn the_resource_api_creates_pages_cancels_and_deletes_runs() {
    let s =
        start_server(Options { notebook: &pid_then_sleep(), data_dir: None, token: None, args: &[] }).await;
    let (code, first) = s.post("/runs", None).await;
    assert_eq!(code, 201, "{first}");
    let first = first["id"].as_str().unwrap().to_string();
    let (code, body) = s.post("/runs", None).await;
    assert_eq!(code, 409, "Forbid meets a held lock: {body}");
    let resp = s.http.delete(format!("{}/runs/{first}", s.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 409, "an active run is not deleted");
    let (code, cancelled) = s.post(&format!("/runs/{first}/cancel"), None).await;
    assert_eq!((code, cancelled["phase"].as_str()), (200, Some("Cancelled")), "{cancelled}");

    let (_, second) = s.post("/runs", None).await;
    let second = second["id"].as_str().unwrap().to_string();
    s.post(&format!("/runs/{second}/cancel"), None).await;
    let (code, page) = s.get("/runs?limit=1").await;
    assert_eq!(code, 200);
    assert_eq!(page["items"][0]["id"], second.as_str(), "newest first");
    let token = page["continue"].as_str().expect("a continue token").to_string();
    let (_, next) = s.get(&format!("/runs?limit=1&continue={token}")).await;
    assert_eq!(next["items"][0]["id"], first.as_str());
    assert!(next["continue"].is_null(), "the last page has no token");

    let resp = s.http.delete(format!("{}/runs/{first}", s.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(s.get(&format!("/runs/{first}")).await.0, 404);
    assert!(!s.data_dir.join("runs").join(&first).exists(), "what the run kept is gone");
}

/// The value of one series in a Prometheus text exposition, 0 when absent.
fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_requests_and_starts() {
    let s =
        start_server(Options { notebook: &notebook(&SUCCESS_NB), data_dir: None, token: None, args: &[] })
            .await;
    let requests = |route: &str, class: &str| {
        format!(r#"notebook_operator_http_requests_total{{route="{route}",status="{class}"}}"#)
    };
    let (code, before) = s.text("/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(series(&before, &requests("/progress", "4xx")), 0.0, "{before}");
    s.get("/progress").await;
    s.get("/progress?task_id=nope").await;
    let (code, started) = s.post("/start", None).await;
    assert_eq!(code, 200, "{started}");
    assert_eq!(s.post("/start", None).await.0, 400);
    assert_eq!(s.get("/nowhere").await.0, 404);
    let id = started["id"].as_str().unwrap().to_string();
    s.wait_finished(&id).await;

    let (_, after) = s.text("/metrics").await;
    assert_eq!(series(&after, &requests("/progress", "4xx")), 2.0, "{after}");
    assert_eq!(series(&after, &requests("/start", "2xx")), 1.0, "{after}");
    assert_eq!(series(&after, &requests("/start", "4xx")), 1.0, "{after}");
    assert_eq!(series(&after, &requests("unmatched", "4xx")), 1.0, "{after}");
    assert!(series(&after, &requests("/metrics", "2xx")) >= 1.0, "{after}");
    assert_eq!(series(&after, r#"notebook_operator_api_starts_total{outcome="admitted"}"#), 1.0, "{after}");
    assert_eq!(series(&after, r#"notebook_operator_api_starts_total{outcome="refused"}"#), 1.0, "{after}");
    assert_eq!(
        series(&after, "notebook_operator_runs_started_total"),
        1.0,
        "the local backend counts runs: {after}"
    );
    assert_eq!(
        series(&after, r#"notebook_operator_runs_finished_total{reason="Succeeded"}"#),
        1.0,
        "{after}"
    );
}

/// A cell writing a byte that is not UTF-8 straight to fd 1 (ipykernel has no
/// `sys.stdout.buffer`; the raw write reaches the runner's output as is), then a 200,000-byte line.
const ODD_OUTPUT_NB: [&str; 4] = [
    "import os; os.write(1, b'odd \\xff byte\\n')",
    "print('y' * 200_000, flush=True)",
    "import time; time.sleep(1)",
    "print('last line', flush=True)",
];

/// What the local backend keeps of a line: 64 KiB, newline included.
const MAX_LINE: usize = 64 * 1024;

fn assert_bounded_utf8_log(bytes: &[u8]) -> String {
    let log = String::from_utf8(bytes.to_vec()).expect("the log is UTF-8, as its content type says");
    assert!(
        log.contains("odd \u{fffd} byte"),
        "the odd byte is replaced, its line kept: {:?}",
        &log[..log.len().min(300)]
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < MAX_LINE, "lines are cut at 64 KiB, the rest skipped: longest {longest}");
    assert!(
        log.lines().any(|l| l.len() > 60_000 && l.bytes().all(|b| b == b'y')),
        "the cut line keeps its start"
    );
    assert!(
        log.ends_with("last line\n"),
        "output after the odd byte and the long line is kept: {:?}",
        &log[log.len().saturating_sub(200)..]
    );
    log
}

#[tokio::test]
async fn an_odd_byte_and_a_long_line_stop_neither_progress_nor_output() {
    let s =
        start_server(Options { notebook: &notebook(&ODD_OUTPUT_NB), data_dir: None, token: None, args: &[] })
            .await;
    let (code, started) = s.post("/start", None).await;
    assert_eq!(code, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();

    // The live log, followed from the start to the run's end, without an error.
    let resp = s.http.get(format!("{}/output?follow=true", s.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let mut followed = Vec::new();
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(90), stream.next()).await.expect("a chunk in time")
    {
        followed.extend_from_slice(&chunk.expect("the stream never fails"));
    }
    assert_bounded_utf8_log(&followed);

    let done = s.wait_finished(&id).await;
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(done["progress"]["percent"], 100, "{done}");
    let (code, full) = s.text("/output?full=true").await;
    assert_eq!(code, 200);
    let nb: Value = serde_json::from_str(&full).expect("full=true is the executed notebook");
    assert!(nb["cells"][3]["outputs"].to_string().contains("last line"), "{}", nb["cells"][3]);
    assert!(
        nb["cells"][1]["outputs"].to_string().contains(&"y".repeat(200_000)),
        "the notebook keeps the whole line"
    );

    let resp = s.http.get(format!("{}/runs/{id}/logs", s.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let kept = resp.bytes().await.unwrap();
    assert_eq!(
        assert_bounded_utf8_log(&kept),
        String::from_utf8_lossy(&followed),
        "the kept log is what was followed"
    );
}

// === the warm spare runner ===

/// The idle spare runner of a server: the `--warm` runner waiting in `<data dir>/spare`.
fn spare_pid(data_dir: &Path) -> Option<i32> {
    let spare_dir = std::fs::canonicalize(data_dir.join("spare")).ok()?;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|b| *b == 0).any(|arg| arg == b"--warm")
                && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == spare_dir)
                && pid_alive(*pid)
        })
}

/// Waits for an idle spare other than `not`.
async fn wait_spare(data_dir: &Path, not: Option<i32>) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(pid) = spare_pid(data_dir).filter(|p| Some(*p) != not) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no spare runner appeared in {}", data_dir.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Server {
    async fn run_to_end(&self, body: Option<&str>) -> (String, Value, String) {
        let (code, started) = self.post("/start", body).await;
        assert_eq!(code, 200, "{started}");
        let id = started["id"].as_str().expect("id").to_string();
        let done = self.wait_finished(&id).await;
        let (_, log) = self.text(&format!("/runs/{id}/logs")).await;
        (id, done, log)
    }
}

#[tokio::test]
async fn a_warm_start_reads_its_inputs_at_start_and_runs_in_its_own_folder_and_kernel() {
    let cells = ["print('version', 1)"];
    let s =
        start_server(Options { notebook: &notebook(&cells), data_dir: None, token: None, args: &[] }).await;
    let spare = wait_spare(&s.data_dir, None).await;

    // The notebook and the parameters change after the spare started: the run reads them at /start.
    let nb = std::fs::read_to_string(Path::new(REPO).join("notebooks/parameters.ipynb")).unwrap();
    let mut nb: Value = serde_json::from_str(&nb).unwrap();
    let probe = "import os\nprint('cwd', os.getcwd())\nseen = globals().get('leak', 'none'); leak = 'set'\nprint('leak', seen)";
    nb["cells"].as_array_mut().unwrap().push(json!({
        "cell_type": "code", "id": "probe", "metadata": {}, "execution_count": null, "outputs": [], "source": probe
    }));
    std::fs::write(s._tmp.as_ref().unwrap().path().join("notebook.ipynb"), nb.to_string()).unwrap();
    let (id, done, log) = s.run_to_end(Some(r#"{"parameters": {"name": "operator", "count": 2}}"#)).await;
    assert_eq!(done["status"], "SUCCESS", "{done}\n{log}");
    assert!(log.contains("hello operator, hello operator"), "parameters given at /start: {log}");
    assert!(!log.contains("version 1"), "the notebook as it is at /start: {log}");
    let run_dir = std::fs::canonicalize(s.data_dir.join("runs").join(&id)).unwrap();
    assert!(
        log.contains(&format!("cwd {}", run_dir.display())),
        "the kernel works in the run's folder: {log}"
    );
    assert!(log.contains("leak none"), "{log}");
    // This run took the spare: it is gone, and a new one replaces it.
    assert!(!pid_alive(spare) || spare_pid(&s.data_dir) != Some(spare), "the spare is used once");
    wait_spare(&s.data_dir, Some(spare)).await;

    // The next run gets a fresh kernel: nothing of the previous run is left in it.
    let (_, done, log) = s.run_to_end(Some(r#"{"parameters": {"name": "again", "count": 1}}"#)).await;
    assert_eq!(done["status"], "SUCCESS", "{done}\n{log}");
    assert!(log.contains("leak none") && !log.contains("leak set"), "no state shared between runs: {log}");
}

#[tokio::test]
async fn a_spare_that_died_is_replaced_and_runs_still_start() {
    let s =
        start_server(Options { notebook: &notebook(&SUCCESS_NB), data_dir: None, token: None, args: &[] })
            .await;
    let spare = wait_spare(&s.data_dir, None).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(spare), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_gone(spare, "killed spare").await;
    let (_, done, log) = s.run_to_end(None).await;
    assert_eq!(done["status"], "SUCCESS", "a run starts with or without a spare: {done}\n{log}");
    wait_spare(&s.data_dir, Some(spare)).await;
}

#[tokio::test]
async fn warm_kernel_off_starts_every_run_cold() {
    let args = ["--warm-kernel=false"];
    let s =
        start_server(Options { notebook: &notebook(&SUCCESS_NB), data_dir: None, token: None, args: &args })
            .await;
    let (_, done, log) = s.run_to_end(None).await;
    assert_eq!(done["status"], "SUCCESS", "{done}\n{log}");
    // Spares wait in <data dir>/spare, made before the first spare starts: there is none.
    assert!(!s.data_dir.join("spare").exists(), "no spare runner with --warm-kernel=false");
}
