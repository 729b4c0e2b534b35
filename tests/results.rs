//! The s3 results store against a real S3-compatible server (s3s-fs, tests/s3/build.sh): the
//! controller binary with `--results-store s3`, the test kubelet running the real runner, the
//! facade streaming the objects back. DESIGN.md section 12.

mod support;

use base64::Engine;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use kube::api::{Api, DeleteParams, LogParams};
use notebook_operator::{NotebookRun, RunPhase};
use serde_json::{Value, json};
use support::facade::Facade;
use support::operator::{Operator, install_crd};
use support::runs::{RUN_TIMEOUT, RunEnv, run_of};
use support::s3::S3Server;
use support::{ControlPlane, wait_for};

/// A namespace, a controller with the s3 store, and its facade (configured by env vars).
async fn setup(prefix: &str, s3: &S3Server) -> (RunEnv, Facade) {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace(prefix).await;
    let flags = s3.flags();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let op = Operator::start_with_env(cp, &ns, &args, &s3.env());
    let runs = ns.api();
    let mut env = s3.env();
    env.extend([
        ("NOTEBOOK_OPERATOR_RESULTS_STORE", "s3"),
        ("NOTEBOOK_OPERATOR_S3_BUCKET", support::s3::BUCKET),
        ("NOTEBOOK_OPERATOR_S3_PREFIX", "runs/"),
    ]);
    env.push(("NOTEBOOK_OPERATOR_S3_ENDPOINT", Box::leak(s3.endpoint.clone().into_boxed_str())));
    let facade = Facade::start(cp, &ns, "notebook-run", "20s", &env).await;
    (RunEnv { op, ns, runs }, facade)
}

fn sha256_hex(bytes: &[u8]) -> String {
    notebook_operator::job::sha256_hex(bytes)
}

fn output(run: &NotebookRun) -> notebook_operator::crd::OutputRef {
    run.status
        .as_ref()
        .and_then(|s| s.output.clone())
        .unwrap_or_else(|| panic!("no status.output: {:?}", run.status))
}

async fn get(facade: &Facade, path: &str) -> reqwest::Response {
    facade.http.get(format!("{}{path}", facade.url)).send().await.expect("GET the facade")
}

/// The runner's upload reports (`##notebook-operator:results`) in the pod log.
async fn uploads(env: &RunEnv, run: &NotebookRun) -> Vec<Value> {
    let pod = run.status.as_ref().and_then(|s| s.pod_name.clone()).expect("status.podName");
    let pods: Api<Pod> = env.ns.api();
    let log = pods.logs(&pod, &LogParams::default()).await.expect("the pod log");
    log.lines()
        .filter_map(|l| l.strip_prefix("##notebook-operator:results "))
        .map(|j| serde_json::from_str(j).expect("an upload report is JSON"))
        .collect()
}

/// A cell that shows `n` PNG images of random pixels (about 1 MiB of base64 each) made with the
/// standard library, and prints the seed and SHA-256 of each.
fn plots_cell(first_seed: u32, n: u32) -> String {
    format!(
        "for seed in range({first_seed}, {}):\n    data = png(seed)\n    display(Image(data=data))\n    \
         print(seed, hashlib.sha256(data).hexdigest())",
        first_seed + n
    )
}

const PNG_HELPER: &str = "import hashlib, random, struct, zlib\n\
from IPython.display import Image, display\n\
def png(seed, w=512, h=512):\n    \
    rnd = random.Random(seed)\n    \
    raw = b''.join(b'\\x00' + rnd.randbytes(w * 3) for _ in range(h))\n    \
    def chunk(t, d):\n        \
        return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)\n    \
    ihdr = struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)\n    \
    return b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(raw, 1)) + chunk(b'IEND', b'')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_notebook_with_plots_is_kept_byte_for_byte_its_report_served_and_deleted_with_the_run() {
    let s3 = S3Server::start().await;
    let (env, facade) = setup("results-large", &s3).await;
    let cells: Vec<String> =
        [PNG_HELPER.to_string(), plots_cell(0, 6), plots_cell(6, 6), plots_cell(12, 6), plots_cell(18, 6)]
            .into();
    let cells: Vec<&str> = cells.iter().map(String::as_str).collect();
    env.create(&run_of("large", &cells, json!({"timeouts": {"run": "10m"}}))).await;
    let run = env.wait_terminal("large").await;
    assert_eq!(run.phase(), Some(RunPhase::Succeeded), "{:?}", run.status);
    let out = output(&run);
    let ns = env.ns.to_string();
    assert_eq!(out.store.as_deref(), Some("s3"));
    assert_eq!(out.notebook, Some(format!("runs/{ns}/large/notebook.ipynb")));
    assert_eq!(out.report, Some(format!("runs/{ns}/large/report.html")));
    assert_eq!(out.log, Some(format!("runs/{ns}/large/log.txt")));
    assert_eq!(out.message, None);
    assert_eq!(out.config_map, None, "with s3 no output ConfigMap");

    // What the store holds is what the runner wrote: its final upload's SHA-256, byte for byte.
    let reports = uploads(&env, &run).await;
    let final_nb = reports
        .iter()
        .rfind(|r| r["object"] == "notebook" && r["final"] == true)
        .unwrap_or_else(|| panic!("no final notebook upload: {reports:?}"));
    assert_eq!(final_nb["ok"], true, "{final_nb}");
    let per_cell = reports.iter().filter(|r| r["object"] == "notebook" && r["final"].is_null()).count();
    assert_eq!(per_cell, 5, "one upload after each code cell: {reports:?}");
    let on_disk = std::fs::read(s3.object_file(out.notebook.as_deref().unwrap())).expect("the object's file");
    assert!(on_disk.len() > 20 * 1024 * 1024, "a notebook over 20 MiB: {} bytes", on_disk.len());
    assert_eq!(sha256_hex(&on_disk), final_nb["sha256"].as_str().unwrap());
    assert_eq!(final_nb["bytes"].as_u64(), Some(on_disk.len() as u64));

    // Streamed back by the facade, whole, by both of its paths.
    let resp = get(&facade, "/runs/large/notebook").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ipynb+json");
    let served = resp.bytes().await.expect("the notebook");
    assert!(served == on_disk, "/runs/large/notebook differs from the stored object");
    let resp = get(&facade, "/output?task_id=large&full=true").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap() == on_disk, "/output?full=true differs from the stored object");

    // Every image is there, exactly: each PNG's SHA-256 is the one its cell printed.
    let nb: Value = serde_json::from_slice(&served).expect("ipynb JSON");
    let mut images = 0;
    for cell in nb["cells"].as_array().unwrap().iter().skip(1) {
        let outputs = cell["outputs"].as_array().unwrap();
        let printed: String = outputs
            .iter()
            .filter(|o| o["output_type"] == "stream")
            .map(|o| match &o["text"] {
                Value::Array(parts) => parts.iter().filter_map(Value::as_str).collect::<String>(),
                t => t.as_str().unwrap_or_default().to_string(),
            })
            .collect();
        let hashes: Vec<&str> = printed.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
        let pngs: Vec<Vec<u8>> = outputs
            .iter()
            .filter_map(|o| o["data"]["image/png"].as_str())
            .map(|b| {
                base64::engine::general_purpose::STANDARD.decode(b.replace('\n', "")).expect("base64 PNG")
            })
            .collect();
        assert_eq!(pngs.len(), 6, "{}", cell["source"]);
        let got: Vec<String> = pngs.iter().map(|p| sha256_hex(p)).collect();
        assert_eq!(got, hashes, "the images of a cell are the ones it made");
        images += pngs.len();
    }
    assert_eq!(images, 24);

    // The HTML report, served as HTML.
    let resp = get(&facade, "/runs/large/report").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = resp.text().await.unwrap();
    assert!(html.to_lowercase().contains("<html"), "not HTML");
    let first_hash = sha256_hex(
        &base64::engine::general_purpose::STANDARD
            .decode(nb["cells"][1]["outputs"][0]["data"]["image/png"].as_str().unwrap().replace('\n', ""))
            .unwrap(),
    );
    assert!(html.contains(&first_hash), "the report shows the cells' output");

    // The log: what the notebook printed, without the protocol lines.
    let logs = get(&facade, "/runs/large/logs").await.text().await.unwrap();
    assert!(logs.contains(&first_hash), "{logs}");
    assert!(!logs.contains("##notebook-operator"), "{logs}");

    // The pod never holds credentials: no AWS_* variable, no Secret; only presigned URLs, one per key.
    let job: Job =
        env.ns.api::<Job>().get(run.status.as_ref().unwrap().job_name.as_deref().unwrap()).await.unwrap();
    let pod_spec = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let job_json = serde_json::to_string(&job).unwrap();
    for c in &pod_spec.containers {
        for e in c.env.iter().flatten() {
            assert!(!e.name.starts_with("AWS_"), "the pod gets {}", e.name);
            assert!(e.value_from.as_ref().is_none_or(|v| v.secret_key_ref.is_none()), "a secret ref: {e:?}");
        }
        assert!(c.env_from.iter().flatten().all(|f| f.secret_ref.is_none()), "envFrom a Secret");
    }
    assert!(pod_spec.volumes.iter().flatten().all(|v| v.secret.is_none()), "a Secret volume");
    assert!(!job_json.contains(support::s3::SECRET_KEY));
    let inputs: ConfigMap = env.ns.api::<ConfigMap>().get("large-inputs").await.expect("inputs ConfigMap");
    let urls: Value = serde_json::from_str(&inputs.data.as_ref().unwrap()["results.json"]).unwrap();
    for (object, file) in [("notebook", "notebook.ipynb"), ("report", "report.html"), ("log", "log.txt")] {
        let url = urls[object].as_str().unwrap();
        assert!(url.starts_with(&format!("{}/results/runs/{ns}/large/{file}?", s3.endpoint)), "{url}");
        assert!(url.contains("X-Amz-Signature="), "{url}");
        assert!(!url.contains(support::s3::SECRET_KEY), "{url}");
    }

    // Deleting the run deletes its objects.
    env.runs.delete("large", &DeleteParams::default()).await.expect("delete the run");
    let runs = env.runs.clone();
    wait_for(RUN_TIMEOUT, "the run deleted", || {
        let runs = runs.clone();
        async move { runs.get_opt("large").await.ok().is_some_and(|r| r.is_none()) }
    })
    .await;
    for key in [out.notebook.unwrap(), out.report.unwrap(), out.log.unwrap()] {
        assert!(!s3.object_file(&key).exists(), "{key} outlived its run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_runner_keeps_its_last_saved_cell() {
    let s3 = S3Server::start().await;
    let (env, facade) = setup("results-kill", &s3).await;
    let cells = [
        "print('first')",
        "print('second')",
        // SIGKILL to the runner (the kernel's parent) in the middle of the third cell.
        "import os, signal, time\nprint('third', flush=True)\ntime.sleep(0.5)\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(60)",
    ];
    env.create(&run_of("killed", &cells, json!({}))).await;
    let run = env.wait_terminal("killed").await;
    assert_eq!(run.phase(), Some(RunPhase::Failed), "{:?}", run.status);
    let out = output(&run);
    assert_eq!(out.notebook, Some(format!("runs/{}/killed/notebook.ipynb", env.ns)), "{out:?}");
    assert_eq!(out.report, None);
    assert_eq!(out.log, None);
    let message = out.message.unwrap_or_default();
    assert!(message.contains("as saved after cell 1"), "{message}");

    let resp = get(&facade, "/runs/killed/notebook").await;
    assert_eq!(resp.status(), 200);
    let nb: Value = resp.json().await.expect("ipynb JSON");
    let text = |i: usize| nb["cells"][i]["outputs"].to_string();
    assert!(text(0).contains("first"), "{}", text(0));
    assert!(text(1).contains("second"), "{}", text(1));
    assert_eq!(nb["cells"][2]["outputs"], json!([]), "the cell the runner died in was never saved");

    let resp = get(&facade, "/runs/killed/report").await;
    assert_eq!(resp.status(), 404);
    let detail = resp.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("report.html"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_at_the_end_neither_fails_the_run_nor_holds_its_deletion() {
    let mut s3 = S3Server::start().await;
    let (env, facade) = setup("results-down", &s3).await;
    let port = s3.endpoint.rsplit(':').next().unwrap().to_string();
    let cells = [
        "print('before')".to_string(),
        // The last cell ends once the store stops answering.
        format!(
            "import socket, time\nwhile True:\n    try:\n        socket.create_connection(('127.0.0.1', {port}), 1).close()\n    \
             except OSError:\n        break\n    time.sleep(0.2)\nprint('store gone')"
        ),
    ];
    let cells: Vec<&str> = cells.iter().map(String::as_str).collect();
    env.create(&run_of("down", &cells, json!({}))).await;
    env.wait_until("down", "the last cell running", |r| {
        r.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.cells_completed == 1)
    })
    .await;
    s3.stop();
    let run = env.wait_terminal("down").await;
    assert_eq!(run.phase(), Some(RunPhase::Succeeded), "{:?}", run.status);
    let out = output(&run);
    assert_eq!(out.store.as_deref(), Some("s3"));
    assert_eq!((out.notebook.as_ref(), out.report.as_ref(), out.log.as_ref()), (None, None, None), "{out:?}");
    let message = out.message.unwrap_or_default();
    assert!(message.contains("notebook.ipynb was not kept: the upload failed"), "{message}");
    assert!(message.contains("log.txt was not kept"), "{message}");

    let resp = get(&facade, "/runs/down/notebook").await;
    assert_eq!(resp.status(), 404);
    let detail = resp.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("the upload failed"), "{detail}");

    // Deleting the run while the store is still down: bounded retries, a Warning, the run goes.
    env.runs.delete("down", &DeleteParams::default()).await.expect("delete the run");
    let runs = env.runs.clone();
    wait_for(std::time::Duration::from_secs(120), "the run deleted despite the store", || {
        let runs = runs.clone();
        async move { runs.get_opt("down").await.ok().is_some_and(|r| r.is_none()) }
    })
    .await;
    let events: Api<Event> = env.ns.api();
    let warned =
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("ResultsNotDeleted") && e.type_.as_deref() == Some("Warning")
        });
    assert!(warned, "a Warning Event says the objects were left");
    // The store back: the notebook as saved after the first cell is still there (nothing deleted it).
    s3.restart().await;
    let key = format!("runs/{}/down/notebook.ipynb", env.ns);
    assert!(s3.object_file(&key).exists(), "{key}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_keeps_its_partial_notebook_report_and_log() {
    let s3 = S3Server::start().await;
    let (env, facade) = setup("results-cancel", &s3).await;
    let cells =
        ["print('done before the cancel')", "import time\nprint('waiting', flush=True)\ntime.sleep(300)"];
    env.create(&run_of("cancelled", &cells, json!({}))).await;
    env.wait_until("cancelled", "the second cell running", |r| {
        r.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.cells_completed == 1)
    })
    .await;
    let patch = json!({"spec": {"cancel": true}});
    env.runs
        .patch("cancelled", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .expect("cancel");
    let run = env.wait_terminal("cancelled").await;
    assert_eq!(run.phase(), Some(RunPhase::Cancelled), "{:?}", run.status);
    let out = output(&run);
    let ns = env.ns.to_string();
    assert_eq!(out.notebook, Some(format!("runs/{ns}/cancelled/notebook.ipynb")), "{out:?}");
    assert_eq!(out.report, Some(format!("runs/{ns}/cancelled/report.html")), "{out:?}");
    assert_eq!(out.log, Some(format!("runs/{ns}/cancelled/log.txt")), "{out:?}");

    let nb: Value = get(&facade, "/runs/cancelled/notebook").await.json().await.expect("ipynb JSON");
    assert!(nb["cells"][0]["outputs"].to_string().contains("done before the cancel"));
    assert!(
        nb["cells"][1]["outputs"].to_string().contains("waiting"),
        "the partial cell is saved on SIGTERM"
    );
    let resp = get(&facade, "/runs/cancelled/report").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("done before the cancel"));
    let logs = get(&facade, "/runs/cancelled/logs").await.text().await.unwrap();
    assert!(logs.contains("done before the cancel") && logs.contains("waiting"), "{logs}");
}

/// `notebook-operator all` (the controller and the facade in one process) with the s3 store:
/// one set of flags configures both halves, the runner uploads to the bucket and the facade
/// serves what it wrote.
#[tokio::test]
async fn all_in_one_process_keeps_and_serves_results_in_s3() {
    let s3 = S3Server::start().await;
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("results-all").await;
    let flags = s3.flags();
    let mut args =
        vec!["--default-image", "quay.io/jupyter/minimal-notebook:test", "--progress-interval", "300ms"];
    args.extend(flags.iter().map(String::as_str));
    let all = Facade::start_command(cp, &ns, "all", "notebook-run", "20s", &args, &s3.env()).await;
    let runs: Api<NotebookRun> = ns.api();
    runs.create(&Default::default(), &run_of("in-one", &["print('kept in the bucket')"], json!({})))
        .await
        .expect("create the run");
    let run = wait_for(RUN_TIMEOUT, "in-one finished", || async {
        runs.get("in-one").await.ok().filter(|r| r.phase().is_some_and(RunPhase::is_terminal))
    })
    .await;
    assert_eq!(run.phase(), Some(RunPhase::Succeeded), "{:?}", run.status);
    let out = output(&run);
    assert_eq!(out.store.as_deref(), Some("s3"), "{out:?}");
    let key = format!("runs/{ns}/in-one/notebook.ipynb");
    assert_eq!(out.notebook.as_deref(), Some(key.as_str()));
    let stored = std::fs::read(s3.object_file(&key)).expect("the notebook in the bucket");

    let resp = get(&all, "/runs/in-one/notebook").await;
    assert_eq!(resp.status(), 200);
    let served = resp.bytes().await.expect("the notebook");
    assert!(served == stored, "/runs/in-one/notebook differs from the stored object");
    let nb: Value = serde_json::from_slice(&served).expect("ipynb JSON");
    assert!(nb["cells"][0]["outputs"].to_string().contains("kept in the bucket"), "{nb}");
    let resp = get(&all, "/runs/in-one/report").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("kept in the bucket"));
}
