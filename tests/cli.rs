//! The binary as a client (DESIGN.md section 14), run as a user would: `start`, `list`, `get`,
//! `logs`, `cancel` and `notebook` against `notebook-operator local --token ...`, and `run
//! NOTEBOOK.ipynb` with the same reads against the cluster (the real control plane, a controller,
//! the kubeconfig). Exit codes are the runner's: 0, 1, 2, 143; Ctrl-C asks whether to cancel.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use serde_json::{Value, json};

use support::operator::{Operator, binary, install_crd};
use support::served::{self, Served};
use support::{ControlPlane, from_json, ipynb, process};

const TOKEN: &str = "s3cret";
const SLEEPY: [&str; 3] = ["print('started', flush=True)", "import time; time.sleep(60)", "print('never')"];
const FAILING: [&str; 2] = ["print('before')", "1 / 0"];

fn local(cells: &[&str]) -> Served {
    served::local(cells, TOKEN)
}

/// The client with `args`, its output once it exits (bounded).
fn client(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null());
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_output(child, Duration::from_secs(120))
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the client did not exit in {limit:?}: {:?}", child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| panic!("killed by a signal: {out:?}"))
}

/// The id in the client's first stderr line (`run <id> <phase>`).
fn run_id(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("run "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string()
}

#[test]
fn start_follow_list_get_logs_and_notebook_against_a_facade() {
    let s = local(&["print('one')", "print('two', 40 + 2)"]);
    let out = client(&["start", "--server", &s.url, "--token", TOKEN, "--follow", "-p", "x=1"], &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(code(&out), 0, "{stdout}\n{stderr}");
    assert_eq!(stdout, "one\ntwo 42\n", "--follow streams what the notebook printed");
    assert!(stderr.contains("Succeeded"), "{stderr}");
    let id = run_id(&stderr);

    let target = ["--server", &s.url, "--token", TOKEN];
    let list = client(&[&["list"][..], &target].concat(), &[]);
    assert_eq!(code(&list), 0, "{list:?}");
    let listed = text(&list.stdout);
    assert!(
        listed.lines().any(|l| l.starts_with(&id) && l.contains("Succeeded") && l.contains("3/3")),
        "{listed}"
    );

    let get = client(&[&["get", &id][..], &target].concat(), &[]);
    let run: Value = serde_json::from_slice(&get.stdout).expect("get prints JSON");
    assert_eq!((run["id"].as_str(), run["phase"].as_str()), (Some(id.as_str()), Some("Succeeded")));
    assert_eq!(run["parameters"]["x"], 1, "-p x=1 is the JSON number 1");

    let logs = client(&[&["logs", &id][..], &target].concat(), &[]);
    assert_eq!((code(&logs), text(&logs.stdout)), (0, "one\ntwo 42\n".to_string()));

    let nb = client(&[&["notebook", &id][..], &target].concat(), &[]);
    let nb: Value = serde_json::from_slice(&nb.stdout).expect("notebook prints ipynb JSON");
    assert!(nb["cells"].to_string().contains("two 42"), "{nb}");

    // The token can come from the environment; without one the facade's refusal is explained.
    let env = client(&["list", "--server", &s.url], &[("NOTEBOOK_OPERATOR_TOKEN", TOKEN)]);
    assert_eq!(code(&env), 0, "{env:?}");
    let refused = client(&["list", "--server", &s.url], &[]);
    assert_eq!(code(&refused), 1);
    assert!(text(&refused.stderr).contains("--token"), "{refused:?}");
    let unknown = client(&[&["get", "nope"][..], &target].concat(), &[]);
    assert_eq!(code(&unknown), 1);
    assert!(text(&unknown.stderr).contains("Could not find task nope"), "{unknown:?}");
}

#[test]
fn a_failing_notebook_prints_its_traceback_and_exits_as_the_runner() {
    let s = local(&FAILING);
    let out = client(&["start", "--server", &s.url, "--token", TOKEN], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 1, "a cell error exits 1: {stderr}");
    assert!(stderr.contains("CellError") && stderr.contains("ZeroDivisionError"), "{stderr}");
    assert!(stderr.contains("traceback in cell 1"), "{stderr}");

    let bad = local(&[]);
    std::fs::write(bad.dir.path().join("notebook.ipynb"), "not a notebook").unwrap();
    let out = client(&["start", "--server", &bad.url, "--token", TOKEN], &[]);
    assert_eq!(code(&out), 2, "invalid input exits 2: {}", text(&out.stderr));
}

#[test]
fn cancel_ends_a_followed_run_with_143() {
    let s = local(&SLEEPY);
    let follower = Command::new(binary())
        .args(["start", "--server", &s.url, "--token", TOKEN, "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let target = ["--server", &s.url, "--token", TOKEN];
    let id = wait_running(&target);
    wait_printed(&target, &id);
    let logs_follower = Command::new(binary())
        .args([&["logs", &id, "-f"][..], &target].concat())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cancel = client(&[&["cancel", &id][..], &target].concat(), &[]);
    assert_eq!((code(&cancel), text(&cancel.stdout)), (0, format!("{id} Cancelled\n")));
    let logs = wait_output(logs_follower, Duration::from_secs(60));
    assert_eq!(code(&logs), 0, "logs -f ends with the run: {logs:?}");
    assert!(text(&logs.stdout).starts_with("started\n"), "{logs:?}");
    let out = wait_output(follower, Duration::from_secs(60));
    assert_eq!(code(&out), 143, "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("started\n"), "{out:?}");
}

#[test]
fn a_terminal_shows_a_progress_bar_with_the_current_cell() {
    let s = local(&["import time", "time.sleep(1.5)", "print('x')"]);
    // script(1) gives the client a terminal; the bar is drawn on terminals only.
    let command = format!("{} start --server {} --token {TOKEN}", binary(), s.url);
    let out = client_in(Command::new("script").args(["-qec", &command, "/dev/null"]));
    let screen = text(&out.stdout);
    assert_eq!(code(&out), 0, "{screen}");
    assert!(screen.contains("1/3 cells (cell 1 running)"), "the bar names the running cell: {screen}");
    assert!(screen.contains("3/3 cells Succeeded"), "{screen}");
}

fn client_in(cmd: &mut Command) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_output(child, Duration::from_secs(120))
}

#[test]
fn ctrl_c_asks_whether_to_cancel() {
    let s = local(&SLEEPY);
    let target = ["--server", &s.url, "--token", TOKEN];
    for (answer, expected) in [("n\n", 130), ("y\n", 143)] {
        let mut child = Command::new(binary())
            .args(["start", "--server", &s.url, "--token", TOKEN])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let id = wait_running(&target);
        wait_printed(&target, &id);
        // SAFETY: a plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        child.stdin.take().unwrap().write_all(answer.as_bytes()).unwrap();
        let out = wait_output(child, Duration::from_secs(60));
        let stderr = text(&out.stderr);
        assert_eq!(code(&out), expected, "{stderr}");
        assert!(stderr.contains(&format!("cancel run {id}? [y/N]")), "{stderr}");
        let get = client(&[&["get", &id][..], &target].concat(), &[]);
        let run: Value = serde_json::from_slice(&get.stdout).unwrap();
        if expected == 130 {
            assert_eq!(run["phase"], "Running", "no: the run goes on");
            assert!(stderr.contains("goes on"), "{stderr}");
            client(&[&["cancel", &id][..], &target].concat(), &[]);
        } else {
            assert_eq!(run["phase"], "Cancelled");
        }
    }
}

/// Waits until run `id` has printed its first line (its kernel is executing cells).
fn wait_printed(target: &[&str], id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = client(&[&["logs", id][..], target].concat(), &[]);
        if text(&logs.stdout).starts_with("started\n") {
            return;
        }
        assert!(Instant::now() < deadline, "run {id} printed nothing: {logs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The id of the run that is Running, once there is one.
fn wait_running(target: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = client(&[&["list"][..], target].concat(), &[]);
        if let Some(line) = text(&list.stdout).lines().find(|l| l.contains(" Running ")) {
            return line.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no run reached Running: {list:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn run_a_notebook_in_the_cluster_and_read_it_back() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("cli").await;
    let _op = Operator::start(cp, &ns);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cp.kubeconfig().to_str().unwrap().to_string();
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let ok = dir.path().join("ok.ipynb");
    std::fs::write(&ok, ipynb(&["print('in the cluster', 6 * 7)"])).unwrap();
    let ns_name = ns.to_string();

    let target: [&str; 2] = ["-n", &ns_name];
    let out = cluster_client(&[&["run", ok.to_str().unwrap(), "--follow"][..], &target].concat(), &env).await;
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 0, "{stderr}");
    assert_eq!(text(&out.stdout), "in the cluster 42\n");
    let id = run_id(&stderr);

    let list = cluster_client(&[&["list"][..], &target].concat(), &env).await;
    assert!(text(&list.stdout).lines().any(|l| l.starts_with(&id) && l.contains("Succeeded")), "{list:?}");
    let get = cluster_client(&[&["get", &id][..], &target].concat(), &env).await;
    let run: Value = serde_json::from_slice(&get.stdout).expect("JSON");
    assert_eq!(run["phase"], "Succeeded");
    let logs = cluster_client(&[&["logs", &id][..], &target].concat(), &env).await;
    assert_eq!(text(&logs.stdout), "in the cluster 42\n", "{logs:?}");
    let nb = cluster_client(&[&["notebook", &id][..], &target].concat(), &env).await;
    let nb: Value = serde_json::from_slice(&nb.stdout).expect("ipynb JSON");
    assert!(nb["cells"].to_string().contains("in the cluster 42"));

    let failing = dir.path().join("failing.ipynb");
    std::fs::write(&failing, ipynb(&FAILING)).unwrap();
    let out = cluster_client(&[&["run", failing.to_str().unwrap()][..], &target].concat(), &env).await;
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(stderr.contains("ZeroDivisionError"), "{stderr}");

    // A run cancelled from another client ends its `run` with 143.
    let sleepy = dir.path().join("sleepy.ipynb");
    std::fs::write(&sleepy, ipynb(&SLEEPY)).unwrap();
    let mut cmd = Command::new(binary());
    cmd.args(["run", sleepy.to_str().unwrap(), "-n", &ns_name])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process::contain(&mut cmd);
    let runner = cmd.spawn().unwrap();
    let mut running = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while running.is_none() {
        let list = cluster_client(&[&["list"][..], &target].concat(), &env).await;
        running = text(&list.stdout)
            .lines()
            .find(|l| l.contains(" Running "))
            .map(|l| l.split_whitespace().next().unwrap().to_string());
        assert!(Instant::now() < deadline, "the sleepy run never ran: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let running = running.unwrap();
    let mut cmd = Command::new(binary());
    cmd.args(["logs", &running, "-f", "-n", &ns_name])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let logs_follower = cmd.spawn().unwrap();
    let cancel = cluster_client(&[&["cancel", &running][..], &target].concat(), &env).await;
    assert_eq!(text(&cancel.stdout), format!("{running} Cancelled\n"), "{cancel:?}");
    let logs = tokio::task::spawn_blocking(move || wait_output(logs_follower, Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(code(&logs), 0, "logs -f ends with the run: {logs:?}");
    let out =
        tokio::task::spawn_blocking(move || wait_output(runner, Duration::from_secs(120))).await.unwrap();
    assert_eq!(code(&out), 143, "{}", text(&out.stderr));
}

async fn cluster_client(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        client(&args, &env)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn start_through_a_kubernetes_facade() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("cli-facade").await;
    let cm: ConfigMap = from_json(
        json!({"metadata": {"name": "nb"}, "data": {"notebook.ipynb": ipynb(&["print('through the facade')"])}}),
    );
    ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await.unwrap();
    let _op = Operator::start(cp, &ns);
    let facade = served::kube_facade(cp, &ns, "nb", TOKEN);
    let url = facade.url.clone();

    let out = cluster_client(&["start", "--server", &url, "--token", TOKEN, "--follow"], &[]).await;
    let stderr = text(&out.stderr);
    drop(facade);
    assert_eq!(code(&out), 0, "{stderr}");
    assert_eq!(text(&out.stdout), "through the facade\n");
    let id = run_id(&stderr);
    let run = ns.api::<notebook_operator::NotebookRun>().get(&id).await.unwrap();
    assert!(run.status.and_then(|s| s.phase).is_some_and(|p| p.is_terminal()), "the NotebookRun {id} ended");
}

#[tokio::test]
async fn ctrl_c_cancels_a_run_in_the_cluster_when_asked() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("cli-ctrl-c").await;
    let _op = Operator::start(cp, &ns);
    let dir = tempfile::tempdir().unwrap();
    let sleepy = dir.path().join("sleepy.ipynb");
    std::fs::write(&sleepy, ipynb(&SLEEPY)).unwrap();
    let mut cmd = Command::new(binary());
    cmd.args(["run", sleepy.to_str().unwrap(), "-n", &ns, "--follow"])
        .env("KUBECONFIG", cp.kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process::contain(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    // Once the notebook has printed its first line, it is executing its cells.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stdout.read_line(&mut line).map(|_| line)
    });
    let first =
        tokio::time::timeout(Duration::from_secs(90), first).await.expect("a first line").unwrap().unwrap();
    assert_eq!(first, "started\n");
    // SAFETY: a plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    child.stdin.take().unwrap().write_all(b"y\n").unwrap();
    let out =
        tokio::task::spawn_blocking(move || wait_output(child, Duration::from_secs(120))).await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 143, "{stderr}");
    assert!(stderr.contains("? [y/N]") && stderr.contains("Cancelled"), "{stderr}");
    let id = run_id(&stderr);
    let run = ns.api::<notebook_operator::NotebookRun>().get(&id).await.unwrap();
    assert_eq!(run.status.and_then(|s| s.phase), Some(notebook_operator::crd::RunPhase::Cancelled));
}
