//! The operator on a real node: kubelet, containerd and runc run the controller's own Job in
//! real containers of the runner image (`tests/images/build.sh`), so what the test kubelet cannot
//! show is checked here: the security context as the kernel enforces it, memory limits and OOM
//! kills, evictions, signals through the image's entrypoint, zombie reaping, images that cannot
//! start, and a read-only root filesystem. Each test has its own namespace and controller
//! (`--default-image` the runner image, pull policy Never unless a test needs a pull: see
//! `support::operator`).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use notebook_operator::{NotebookRun, Reason, RunPhase};
use serde_json::{Value, json};

use support::operator::{Operator, install_crd};
use support::real_node::{ROOT_IMAGE, RUNNER_IMAGE};
use support::runs::run_of;
use support::{ControlPlane, NodeKind, TestNamespace, wait_for};

/// A run in a real container takes a few seconds to start (sandbox, kernel) and to be seen done.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Well under any start timeout these tests set: "at once" means within this.
const FAIL_FAST: Duration = Duration::from_secs(45);

// === harness ===

struct Env {
    // Dropped in order: the controller first, then the namespace (which dumps on failure).
    _op: Operator,
    ns: TestNamespace,
    runs: Api<NotebookRun>,
}

/// A namespace on the real node's control plane with a controller watching it, running the
/// runner image without pulling; `args` are added to the controller's flags.
async fn setup(prefix: &str, args: &[&str]) -> Env {
    let cp = ControlPlane::shared_real_node();
    assert_eq!(cp.node_kind(), NodeKind::Real);
    install_crd(cp);
    let ns = cp.namespace(prefix).await;
    // On a real node the controller runs the runner image and never pulls, unless `args` say.
    let op = Operator::start_with(cp, &ns, args);
    let runs = ns.api();
    Env { _op: op, ns, runs }
}

impl Env {
    async fn create(&self, run: &NotebookRun) {
        self.runs.create(&PostParams::default(), run).await.expect("create NotebookRun");
    }

    async fn wait_until(&self, name: &str, what: &str, pred: impl Fn(&NotebookRun) -> bool) -> NotebookRun {
        let runs = self.runs.clone();
        wait_for(RUN_TIMEOUT, format!("{name}: {what}"), || {
            let runs = runs.clone();
            let pred = &pred;
            async move { runs.get_opt(name).await.ok().flatten().filter(|r| pred(r)) }
        })
        .await
    }

    async fn wait_terminal(&self, name: &str) -> NotebookRun {
        self.wait_until(name, "a terminal phase", NotebookRun::is_finished).await
    }

    /// The executed notebook the run kept (its output ConfigMap, gunzipped).
    async fn executed_notebook(&self, run: &NotebookRun) -> Value {
        let name = run.status.as_ref().and_then(|s| s.output.as_ref()).and_then(|o| o.config_map.clone());
        let name =
            name.unwrap_or_else(|| panic!("run {} kept no notebook: {:?}", run.name_any(), run.status));
        let cm = self.ns.api::<ConfigMap>().get(&name).await.expect("output ConfigMap");
        let gz = &cm.binary_data.expect("binaryData")["notebook.ipynb.gz"].0;
        let raw = notebook_operator::progress::gunzip(gz).expect("gzip");
        serde_json::from_slice(&raw).expect("ipynb JSON")
    }

    /// The JSON a cell printed after `PROBE ` (what it saw from inside the container).
    async fn probe(&self, run: &NotebookRun, cell: usize) -> Value {
        let nb = self.executed_notebook(run).await;
        let text = stream_text(&nb, cell);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("PROBE "))
            .unwrap_or_else(|| panic!("cell {cell} printed no PROBE line: {text:?}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("PROBE line {line:?}: {e}"))
    }

    async fn pods_of(&self, run: &str) -> Vec<Pod> {
        let lp = ListParams::default().labels(&format!("notebooks.dev/run={run}"));
        let mut pods = self.ns.api::<Pod>().list(&lp).await.expect("list pods").items;
        pods.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        pods
    }
}

fn stream_text(nb: &Value, cell: usize) -> String {
    let text = |v: &Value| match v {
        Value::Array(parts) => parts.iter().filter_map(Value::as_str).collect(),
        other => other.as_str().unwrap_or_default().to_string(),
    };
    nb["cells"][cell]["outputs"].as_array().into_iter().flatten().map(|o| text(&o["text"])).collect()
}

fn outcome(run: &NotebookRun) -> (Option<RunPhase>, Option<Reason>) {
    (run.phase(), run.status.as_ref().and_then(|s| s.reason))
}

fn message(run: &NotebookRun) -> String {
    run.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default()
}

/// What a process sees of itself and its container, printed as one `PROBE` JSON line.
const SELF_PROBE: &str = r#"
import json, os, pwd, tempfile
status = dict(l.split(':\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\t' in l)
def writable(d):
    try:
        with tempfile.NamedTemporaryFile(dir=d):
            return True
    except OSError:
        return False
print('PROBE ' + json.dumps({
    'uid': os.getuid(), 'gid': os.getgid(), 'groups': sorted(os.getgroups()),
    'NoNewPrivs': status['NoNewPrivs'].strip(), 'Seccomp': status['Seccomp'].strip(),
    'CapEff': status['CapEff'].strip(), 'CapBnd': status['CapBnd'].strip(),
    'token': os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount/token'),
    'home': os.environ.get('HOME'), 'home_writable': writable(os.environ['HOME']),
    'tmpdir': tempfile.gettempdir(), 'tmp_writable': writable(tempfile.gettempdir()),
    'root_writable': writable('/'), 'image_home_writable': writable('/home/jovyan'),
    'pid1': open('/proc/1/cmdline').read().replace('\0', ' ').strip(),
}))
"#;

// === a run in a real container ===

#[tokio::test]
async fn the_default_job_runs_locked_down_in_a_real_container() {
    let env = setup("secure", &[]).await;
    env.create(&run_of("secure", &["print('hello from a container')", SELF_PROBE], json!({}))).await;
    let run = env.wait_terminal("secure").await;
    assert_eq!(outcome(&run), (Some(RunPhase::Succeeded), Some(Reason::Succeeded)), "{:?}", run.status);
    let seen = env.probe(&run, 1).await;
    // The kernel's view, not the pod spec's: runAsNonRoot with the image's numeric USER 1000,
    // allowPrivilegeEscalation false, seccomp RuntimeDefault (mode 2: filter), no capabilities,
    // no service-account token.
    assert_eq!(seen["uid"], 1000, "{seen}");
    assert_eq!(seen["NoNewPrivs"], "1", "{seen}");
    assert_eq!(seen["Seccomp"], "2", "{seen}");
    assert_eq!(seen["CapEff"], "0000000000000000", "{seen}");
    assert_eq!(seen["CapBnd"], "0000000000000000", "{seen}");
    assert_eq!(seen["token"], false, "{seen}");
    // HOME and TMPDIR are the pod's own emptyDirs.
    assert_eq!(seen["home"], "/run/notebook-operator/home", "{seen}");
    assert_eq!(seen["tmpdir"], "/run/notebook-operator/tmp", "{seen}");
    assert_eq!((&seen["home_writable"], &seen["tmp_writable"]), (&json!(true), &json!(true)), "{seen}");
    // The image's entrypoint is PID 1, not the runner.
    assert!(seen["pid1"].as_str().unwrap().starts_with("/usr/bin/tini"), "{seen}");
    // The image the pod ran, by digest, as the node reported it.
    let image_id = run.status.as_ref().and_then(|s| s.image_id.clone()).unwrap_or_default();
    let digest = image_id.rsplit("sha256:").next().unwrap_or_default();
    assert!(
        image_id.contains("sha256:") && digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()),
        "status.imageID {image_id:?}"
    );
    let pods = env.pods_of("secure").await;
    let image = pods[0].spec.as_ref().unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some(RUNNER_IMAGE), "the controller's --default-image");
    let cs = &pods[0].status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0];
    assert_eq!(cs.image_id, image_id, "status.imageID is the container's");
}

#[tokio::test]
async fn a_memory_limit_from_the_controller_ends_in_oom_killed() {
    let env = setup("oom", &["--default-resources", "limits.memory=128Mi"]).await;
    let cells = ["print('allocating 1 GB', flush=True)", "x = b'x' * (1 << 30)\nprint('survived?!')"];
    env.create(&run_of("oom", &cells, json!({}))).await;
    let run = env.wait_terminal("oom").await;
    assert_eq!(outcome(&run), (Some(RunPhase::Failed), Some(Reason::OomKilled)), "{:?}", run.status);
    // The limit came from --default-resources: the run names none.
    assert!(run.spec.resources.is_none());
    let pods = env.pods_of("oom").await;
    let limits =
        pods[0].spec.as_ref().unwrap().containers[0].resources.as_ref().and_then(|r| r.limits.clone());
    assert_eq!(limits.unwrap()["memory"].0, "128Mi");
    let cs = &pods[0].status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0];
    let terminated = cs.state.as_ref().and_then(|s| s.terminated.as_ref()).expect("terminated");
    assert_eq!(terminated.reason.as_deref(), Some("OOMKilled"), "{terminated:?}");
}

#[tokio::test]
async fn an_evicted_pod_is_replaced_and_the_run_succeeds() {
    let env = setup("evict", &[]).await;
    // Every state of the run's pods, as they change: the evicted one is gone by the end.
    let seen = PodHistory::watch(&env, "evicted");
    let hostname = "import json, socket; print('PROBE ' + json.dumps(socket.gethostname()))";
    env.create(&run_of("evicted", &["import time; time.sleep(10)", hostname], json!({"retries": 1}))).await;
    let first = env
        .wait_until("evicted", "the first cell running", |r| {
            r.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.current_cell == Some(0))
        })
        .await;
    let first_pod = first.status.as_ref().and_then(|s| s.pod_name.clone()).expect("status.podName");
    env.ns.api::<Pod>().evict(&first_pod, &EvictParams::default()).await.expect("evict");
    let run = env.wait_terminal("evicted").await;
    assert_eq!(outcome(&run), (Some(RunPhase::Succeeded), Some(Reason::Succeeded)), "{:?}", run.status);
    // The notebook ran to the end in the replacement pod.
    let ran_in = env.probe(&run, 1).await;
    assert_ne!(ran_in, json!(first_pod), "the replacement pod ran the notebook");
    let pods = seen.names();
    assert_eq!(pods.len(), 2, "the evicted pod and its replacement: {pods:?}");
    assert!(seen.had_condition(&first_pod, "DisruptionTarget"), "the evicted pod carried DisruptionTarget");
    // Not counted as a failure: podFailurePolicy ignores disruptions.
    let job_name = run.status.as_ref().and_then(|s| s.job_name.clone()).expect("status.jobName");
    let job = env.ns.api::<Job>().get(&job_name).await.expect("get Job");
    let failed = job.status.as_ref().and_then(|s| s.failed).unwrap_or(0);
    assert_eq!(failed, 0, "the Job counts no failed pod: {:?}", job.status);
}

/// Every state a run's pods were seen in, from a watch started before the run.
struct PodHistory {
    states: std::sync::Arc<std::sync::Mutex<Vec<Pod>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodHistory {
    fn watch(env: &Env, run: &str) -> PodHistory {
        use futures::StreamExt as _;
        let config = watcher::Config::default().labels(&format!("notebooks.dev/run={run}"));
        let states = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = states.clone();
        let mut events = watcher(env.ns.api::<Pod>(), config).applied_objects().boxed();
        let task = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let Ok(pod) = event {
                    sink.lock().unwrap().push(pod);
                }
            }
        });
        PodHistory { states, task }
    }

    fn names(&self) -> std::collections::BTreeSet<String> {
        self.states.lock().unwrap().iter().map(|p| p.name_any()).collect()
    }

    fn had_condition(&self, pod: &str, condition: &str) -> bool {
        self.states.lock().unwrap().iter().filter(|p| p.name_any() == pod).any(|p| {
            let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
            conditions.into_iter().flatten().any(|c| c.type_ == condition && c.status == "True")
        })
    }
}

impl Drop for PodHistory {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn cancel_reaches_the_runner_through_the_entrypoint_and_keeps_the_partial_notebook() {
    let env = setup("cancel", &[]).await;
    let cells = [
        "print('first cell done', flush=True)",
        "import time\nprint('second cell started', flush=True)\ntime.sleep(600)",
    ];
    env.create(&run_of("cancelled", &cells, json!({}))).await;
    env.wait_until("cancelled", "the second cell running", |r| {
        r.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.current_cell == Some(1))
    })
    .await;
    let patch = json!({"spec": {"cancel": true}});
    env.runs.patch("cancelled", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("cancel");
    let run = env.wait_terminal("cancelled").await;
    assert_eq!(outcome(&run), (Some(RunPhase::Cancelled), Some(Reason::Cancelled)), "{:?}", run.status);
    // Only a runner that got SIGTERM (tini forwards it) prints the partial notebook on its way out.
    let nb = env.executed_notebook(&run).await;
    assert!(stream_text(&nb, 0).contains("first cell done"), "partial notebook: {nb}");
    assert!(stream_text(&nb, 1).contains("second cell started"), "partial notebook: {nb}");
}

#[tokio::test]
async fn a_kernels_orphans_are_reaped() {
    let env = setup("zombies", &[]).await;
    // Each `sh` exits at once and leaves its `sleep` to PID 1 of the container.
    let probe = r#"
import json, os, time
def processes():
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            stat = open(f'/proc/{pid}/stat').read()
        except OSError:
            continue
        name = stat[stat.index('(') + 1:stat.rindex(')')]
        state, ppid = stat[stat.rindex(')') + 2:].split()[:2]
        yield int(pid), name, state, int(ppid)
for _ in range(10):
    os.system("sh -c 'sleep 0.3 &'")
orphans = [p for p in processes() if p[1] == 'sleep' and p[3] == 1]
time.sleep(2)
zombies = [p for p in processes() if p[2] == 'Z']
print('PROBE ' + json.dumps({'orphans': len(orphans), 'zombies': zombies,
                             'pid1': open('/proc/1/cmdline').read().replace('\0', ' ').strip()}))
"#;
    env.create(&run_of("zombies", &[probe], json!({}))).await;
    let run = env.wait_terminal("zombies").await;
    assert_eq!(outcome(&run), (Some(RunPhase::Succeeded), Some(Reason::Succeeded)), "{:?}", run.status);
    let seen = env.probe(&run, 0).await;
    assert!(seen["orphans"].as_u64().unwrap() >= 5, "orphans were handed to PID 1: {seen}");
    assert_eq!(seen["zombies"], json!([]), "PID 1 reaps them: {seen}");
    assert!(seen["pid1"].as_str().unwrap().starts_with("/usr/bin/tini"), "{seen}");
}

// === pods that cannot start ===

#[tokio::test]
async fn waits_that_cannot_heal_fail_the_run_at_once() {
    let env = setup("nostart", &[]).await;
    // A generous start timeout: failing within FAIL_FAST is not the timeout.
    let cases = [
        ("root", ROOT_IMAGE, "CreateContainerConfigError", "runAsNonRoot"),
        ("badname", "localhost/Not_A_Valid_Name:test", "InvalidImageName", "Not_A_Valid_Name"),
        (
            "absent",
            "localhost/notebook-runner:absent",
            "ErrImageNeverPull",
            "localhost/notebook-runner:absent",
        ),
    ];
    let created = Instant::now();
    for (name, image, _, _) in cases {
        let spec = json!({"image": image, "timeouts": {"start": "10m"}});
        env.create(&run_of(name, &["print('never runs')"], spec)).await;
    }
    for (name, _, reason, detail) in cases {
        let run = env.wait_terminal(name).await;
        assert!(created.elapsed() < FAIL_FAST, "{name}: failed only after {:?}", created.elapsed());
        assert_eq!(
            outcome(&run),
            (Some(RunPhase::Failed), Some(Reason::PodFailed)),
            "{name}: {:?}",
            run.status
        );
        let text = message(&run);
        assert!(text.contains(reason) && text.contains(detail), "{name}: {text}");
    }
}

#[tokio::test]
async fn an_image_pull_back_off_waits_for_the_start_timeout() {
    let env = setup("backoff", &["--image-pull-policy", "IfNotPresent"]).await;
    // Nothing listens on port 1: every pull fails, and a registry could come back.
    let image = "127.0.0.1:1/notebook-runner:test";
    let created = Instant::now();
    env.create(&run_of(
        "backoff",
        &["print('never runs')"],
        json!({"image": image, "timeouts": {"start": "25s"}}),
    ))
    .await;
    let pods: Api<Pod> = env.ns.api();
    let lp = ListParams::default().labels("notebooks.dev/run=backoff");
    wait_for(RUN_TIMEOUT, "the pod waiting on its image", || async {
        let list = pods.list(&lp).await.map(|l| l.items).unwrap_or_default();
        list.iter().flat_map(|p| p.status.iter().flat_map(|s| s.container_statuses.iter().flatten())).any(
            |c| {
                let reason =
                    c.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref());
                matches!(reason, Some("ErrImagePull" | "ImagePullBackOff"))
            },
        )
    })
    .await;
    let waiting = env.runs.get("backoff").await.expect("get run");
    assert!(!waiting.is_finished(), "a pull that fails is waited out: {:?}", waiting.status);
    let run = env.wait_terminal("backoff").await;
    let waited = created.elapsed();
    assert_eq!(outcome(&run), (Some(RunPhase::Failed), Some(Reason::StartTimeout)), "{:?}", run.status);
    assert!(waited >= Duration::from_secs(25), "failed after {waited:?}, before the start timeout");
    let text = message(&run);
    assert!(
        (text.contains("ImagePullBackOff") || text.contains("ErrImagePull")) && text.contains(image),
        "the message says what the pod waited for: {text}"
    );
}

// === security context overrides ===

#[tokio::test]
async fn a_read_only_root_filesystem_works_with_home_and_tmpdir_on_volumes() {
    let env = setup("readonly", &[]).await;
    let spec = json!({"securityContext": {"readOnlyRootFilesystem": true}});
    env.create(&run_of("readonly", &[SELF_PROBE], spec)).await;
    let run = env.wait_terminal("readonly").await;
    assert_eq!(outcome(&run), (Some(RunPhase::Succeeded), Some(Reason::Succeeded)), "{:?}", run.status);
    let seen = env.probe(&run, 0).await;
    assert_eq!(seen["root_writable"], false, "the image is read-only: {seen}");
    assert_eq!(seen["image_home_writable"], false, "the image's HOME too: {seen}");
    assert_eq!((&seen["home_writable"], &seen["tmp_writable"]), (&json!(true), &json!(true)), "{seen}");
}

#[tokio::test]
async fn a_root_image_runs_as_the_user_the_run_names() {
    let env = setup("rootimage", &[]).await;
    let spec = json!({"image": ROOT_IMAGE, "securityContext": {"runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100}});
    env.create(&run_of("as-user", &[SELF_PROBE], spec)).await;
    let run = env.wait_terminal("as-user").await;
    assert_eq!(outcome(&run), (Some(RunPhase::Succeeded), Some(Reason::Succeeded)), "{:?}", run.status);
    let seen = env.probe(&run, 0).await;
    assert_eq!((&seen["uid"], &seen["gid"]), (&json!(1000), &json!(100)), "{seen}");
    assert!(
        seen["groups"].as_array().unwrap().contains(&json!(100)),
        "fsGroup is a supplementary group: {seen}"
    );
    assert_eq!(seen["CapEff"], "0000000000000000", "{seen}");
}
