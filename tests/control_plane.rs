//! The test control plane and kubelet on plain Kubernetes objects (no
//! operator): what the operator's tests rely on.

mod support;

use std::path::Path;
use std::time::Duration;

use futures::{AsyncBufReadExt as _, TryStreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, ContainerStateTerminated, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use serde_json::json;

use support::process;
use support::{ControlPlane, from_json, wait_for};

const TIMEOUT: Duration = Duration::from_secs(60);
/// `$$$$` is the shell's `$$`: Kubernetes expands `$$` in commands to `$`.
const WRITE_PID_AND_SLEEP: &str = "echo $$$$ > \"$PID_DIR/pid\"; exec sleep 300";

fn job_is(job: &Job, condition: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == condition && c.status == "True"))
}

fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

fn terminated<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == container)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}

fn shell_pod(name: &str, script: &str) -> Pod {
    from_json(json!({
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{ "name": "main", "image": "busybox:1", "command": ["/bin/sh", "-c", script] }],
        },
    }))
}

fn shell_job(name: &str, script: &str, env: serde_json::Value) -> Job {
    from_json(json!({
        "metadata": { "name": name },
        "spec": {
            "backoffLimit": 0,
            "template": { "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main",
                    "image": "busybox:1",
                    "command": ["/bin/sh", "-c", script],
                    "env": env,
                }],
            }},
        },
    }))
}

async fn job_pods(pods: &Api<Pod>, job: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

async fn read_pid(file: &Path) -> u32 {
    wait_for(TIMEOUT, format!("pid file {}", file.display()), || async {
        std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse::<u32>().ok())
    })
    .await
}

#[tokio::test]
async fn a_job_completes_and_its_log_is_readable_through_the_api_server() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("job-log").await;
    let jobs: Api<Job> = ns.api();
    let pods: Api<Pod> = ns.api();
    jobs.create(&PostParams::default(), &shell_job("hello", "echo one; echo two; exit 0", json!([])))
        .await
        .expect("create job");

    wait_for(TIMEOUT, "job hello to complete", || async {
        jobs.get("hello").await.is_ok_and(|j| job_is(&j, "Complete"))
    })
    .await;
    let pod = job_pods(&pods, "hello").await.pop().expect("the job's pod");
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    assert_eq!(phase(&pod), "Succeeded");
    assert_eq!(terminated(&pod, "main").map(|t| t.exit_code), Some(0));

    let log = pods.logs(&pod_name, &LogParams::default()).await.expect("pods/log through the API server");
    assert_eq!(log, "one\ntwo\n");

    let tail = pods
        .logs(&pod_name, &LogParams { tail_lines: Some(1), timestamps: true, ..LogParams::default() })
        .await
        .expect("pods/log with tailLines and timestamps");
    let (time, text) = tail.trim_end().split_once(' ').expect("a timestamp");
    assert!(time.parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "{tail:?}");
    assert_eq!(text, "two");

    let output = cp.kubectl().args(["logs", "-n", &ns, &pod_name]).output().expect("run kubectl");
    assert!(output.status.success(), "kubectl logs failed: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "one\ntwo\n");
}

#[tokio::test]
async fn exit_code_and_termination_message_are_reported() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("termination").await;
    let pods: Api<Pod> = ns.api();
    let pod: Pod = from_json(json!({
        "metadata": { "name": "failing" },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox:1",
                    "command": ["/bin/sh", "-c", "printf 'kernel died' > /dev/termination-log; exit 3"],
                },
                {
                    "name": "fallback",
                    "image": "busybox:1",
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "command": ["/bin/sh", "-c", "echo first words; echo last words; exit 4"],
                },
            ],
        },
    }));
    pods.create(&PostParams::default(), &pod).await.expect("create pod");

    let pod = wait_for(TIMEOUT, "pod failing to fail", || async {
        pods.get("failing").await.ok().filter(|p| phase(p) == "Failed")
    })
    .await;
    let main = terminated(&pod, "main").expect("main terminated");
    assert_eq!(main.exit_code, 3);
    assert_eq!(main.reason.as_deref(), Some("Error"));
    assert_eq!(main.message.as_deref(), Some("kernel died"));
    let fallback = terminated(&pod, "fallback").expect("fallback terminated");
    assert_eq!(fallback.exit_code, 4);
    assert_eq!(fallback.message.as_deref(), Some("first words\nlast words\n"));
}

#[tokio::test]
async fn following_a_log_streams_lines_while_the_process_runs() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("follow").await;
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &shell_pod("talker", "echo first; sleep 5; echo second"))
        .await
        .expect("create pod");
    wait_for(TIMEOUT, "pod talker to run", || async {
        pods.get("talker").await.is_ok_and(|p| phase(&p) == "Running")
    })
    .await;

    let params = LogParams { follow: true, ..LogParams::default() };
    let mut lines = pods.log_stream("talker", &params).await.expect("follow the log").lines();
    let first = tokio::time::timeout(TIMEOUT, lines.try_next())
        .await
        .expect("the first line in time")
        .expect("read the log");
    assert_eq!(first.as_deref(), Some("first"));
    let pod = pods.get("talker").await.expect("get pod");
    assert_eq!(phase(&pod), "Running", "the first line arrived after the process ended");

    let rest: Vec<String> = tokio::time::timeout(TIMEOUT, lines.try_collect())
        .await
        .expect("the log to end with the process")
        .expect("read the log");
    assert_eq!(rest, ["second"]);
}

#[tokio::test]
async fn a_job_past_its_deadline_gets_sigterm_and_fails() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("deadline").await;
    let jobs: Api<Job> = ns.api();
    let marker_dir = tempfile::tempdir().expect("marker dir");
    let mut job = shell_job(
        "slow",
        "trap 'echo got-sigterm > \"$MARKER_DIR/marker\"; exit 143' TERM; sleep 60 & wait",
        json!([{ "name": "MARKER_DIR", "value": marker_dir.path() }]),
    );
    job.spec.as_mut().expect("spec").active_deadline_seconds = Some(2);
    jobs.create(&PostParams::default(), &job).await.expect("create job");

    let job = wait_for(TIMEOUT, "job slow to fail", || async {
        jobs.get("slow").await.ok().filter(|j| job_is(j, "Failed"))
    })
    .await;
    let failed = job
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    assert_eq!(failed.reason.as_deref(), Some("DeadlineExceeded"));
    let marker = marker_dir.path().join("marker");
    wait_for(TIMEOUT, "the process to record SIGTERM", || async {
        std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == "got-sigterm")
    })
    .await;
}

#[tokio::test]
async fn volumes_secret_env_and_downward_api_are_visible_to_the_process() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("inputs").await;
    let config_map: ConfigMap = from_json(json!({
        "metadata": { "name": "settings" },
        "data": { "greeting": "hello from a config map" },
    }));
    ns.api::<ConfigMap>().create(&PostParams::default(), &config_map).await.expect("create config map");
    let secret: Secret = from_json(json!({
        "metadata": { "name": "credentials" },
        "stringData": { "password": "s3cret" },
    }));
    ns.api::<Secret>().create(&PostParams::default(), &secret).await.expect("create secret");

    // Mount points are created on the host if missing, but stay empty there.
    let base = format!("/tmp/test-kubelet-{}", ns.name());
    let script = r#"
        cat "$BASE/settings/greeting"; echo
        echo "password=$PASSWORD"
        echo "pod=$POD_NAME"
        echo "downward-name=$(cat "$BASE/podinfo/name")"
        echo "downward-labels=$(cat "$BASE/podinfo/labels")"
        touch "$BASE/settings/new" 2>/dev/null && echo settings-writable || echo settings-read-only
        echo "scratch" > "$BASE/scratch/file" && cat "$BASE/scratch/file"
        echo "arg=$1"
    "#;
    let pod: Pod = from_json(json!({
        "metadata": { "name": "reader", "labels": { "app": "reader" } },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": "busybox:1",
                "command": ["/bin/sh", "-c", script, "sh", "$(POD_NAME)-expanded"],
                "env": [
                    { "name": "BASE", "value": base },
                    { "name": "PASSWORD", "valueFrom": { "secretKeyRef": { "name": "credentials", "key": "password" } } },
                    { "name": "MISSING", "valueFrom": { "secretKeyRef": { "name": "nope", "key": "x", "optional": true } } },
                    { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                ],
                "volumeMounts": [
                    { "name": "settings", "mountPath": format!("{base}/settings"), "readOnly": true },
                    { "name": "podinfo", "mountPath": format!("{base}/podinfo") },
                    { "name": "scratch", "mountPath": format!("{base}/scratch") },
                ],
            }],
            "volumes": [
                { "name": "settings", "configMap": { "name": "settings" } },
                { "name": "podinfo", "downwardAPI": { "items": [
                    { "path": "name", "fieldRef": { "fieldPath": "metadata.name" } },
                    { "path": "labels", "fieldRef": { "fieldPath": "metadata.labels" } },
                ]}},
                { "name": "scratch", "emptyDir": {} },
            ],
        },
    }));
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &pod).await.expect("create pod");
    let pod = wait_for(TIMEOUT, "pod reader to finish", || async {
        pods.get("reader").await.ok().filter(|p| matches!(phase(p), "Succeeded" | "Failed"))
    })
    .await;
    let log = pods.logs("reader", &LogParams::default()).await.expect("log");
    assert_eq!(phase(&pod), "Succeeded", "log:\n{log}");
    let expected = [
        "hello from a config map",
        "password=s3cret",
        "pod=reader",
        "downward-name=reader",
        "downward-labels=app=\"reader\"",
        "settings-read-only",
        "scratch",
        "arg=reader-expanded",
    ];
    assert_eq!(log.lines().collect::<Vec<_>>(), expected, "log:\n{log}");
    let on_host = std::fs::read_dir(format!("{base}/settings")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(on_host, 0, "the config map leaked onto the host's {base}/settings");
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn deleting_a_job_removes_its_pod_and_ends_its_process() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("delete-job").await;
    let jobs: Api<Job> = ns.api();
    let pods: Api<Pod> = ns.api();
    let pid_dir = tempfile::tempdir().expect("pid dir");
    jobs.create(
        &PostParams::default(),
        &shell_job("sleeper", WRITE_PID_AND_SLEEP, json!([{ "name": "PID_DIR", "value": pid_dir.path() }])),
    )
    .await
    .expect("create job");
    let pid = read_pid(&pid_dir.path().join("pid")).await;
    assert!(process::is_alive(pid), "process {pid} should run");

    jobs.delete("sleeper", &DeleteParams::background()).await.expect("delete job");
    wait_for(TIMEOUT, "the job's pod to be removed", || async {
        job_pods(&pods, "sleeper").await.is_empty()
    })
    .await;
    wait_for(TIMEOUT, format!("process {pid} to end"), || async { !process::is_alive(pid) }).await;
    assert!(jobs.get_opt("sleeper").await.expect("get job").is_none(), "the job should be gone");
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("gc").await;
    let config_maps: Api<ConfigMap> = ns.api();
    let owner = config_maps
        .create(&PostParams::default(), &from_json(json!({ "metadata": { "name": "owner" } })))
        .await
        .expect("create owner");
    let dependent: ConfigMap = from_json(json!({
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": "owner",
                "uid": owner.metadata.uid,
            }],
        },
    }));
    config_maps.create(&PostParams::default(), &dependent).await.expect("create dependent");

    config_maps.delete("owner", &DeleteParams::default()).await.expect("delete owner");
    wait_for(TIMEOUT, "the dependent config map to be collected", || async {
        matches!(config_maps.get_opt("dependent").await, Ok(None))
    })
    .await;
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_never_runs() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("image-pull").await;
    let pods: Api<Pod> = ns.api();
    let marker_dir = tempfile::tempdir().expect("marker dir");
    let mut pod = shell_pod("unpullable", "touch \"$MARKER_DIR/ran\"");
    let container = &mut pod.spec.as_mut().expect("spec").containers[0];
    container.image = Some(format!("{}nope:1", support::FAILING_REGISTRY));
    container.env = Some(vec![from_json(json!({ "name": "MARKER_DIR", "value": marker_dir.path() }))]);
    pods.create(&PostParams::default(), &pod).await.expect("create pod");

    let pod = wait_for(TIMEOUT, "ImagePullBackOff", || async {
        pods.get("unpullable").await.ok().filter(|p| {
            let waiting = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref());
            waiting == Some("ImagePullBackOff")
        })
    })
    .await;
    assert_eq!(phase(&pod), "Pending");
    assert!(
        pods.logs("unpullable", &LogParams::default()).await.is_err(),
        "a container that never started has no log"
    );
    assert!(!marker_dir.path().join("ran").exists(), "the container must not run");
}

#[tokio::test]
async fn a_dropped_control_plane_leaves_no_process_behind() {
    let cp = ControlPlane::start();
    let dir = cp.dir().to_path_buf();
    let mut pids = cp.pids().to_vec();
    assert_eq!(pids.len(), 3, "etcd, kube-apiserver, kube-controller-manager");

    let ns = cp.namespace("leaks").await;
    let pid_dir = tempfile::tempdir().expect("pid dir");
    let pod: Pod = from_json(json!({
        "metadata": { "name": "lingering" },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": "busybox:1",
                "command": ["/bin/sh", "-c", WRITE_PID_AND_SLEEP],
                "env": [{ "name": "PID_DIR", "value": pid_dir.path() }],
            }],
        },
    }));
    ns.api::<Pod>().create(&PostParams::default(), &pod).await.expect("create pod");
    pids.push(read_pid(&pid_dir.path().join("pid")).await);
    assert!(pids.iter().all(|pid| process::is_alive(*pid)));

    drop(ns);
    drop(cp);
    let alive: Vec<u32> = pids.into_iter().filter(|pid| process::is_alive(*pid)).collect();
    assert!(alive.is_empty(), "still running after drop: {alive:?}");
    let stragglers = process::pids_with_cmdline_containing(&dir.display().to_string());
    assert!(stragglers.is_empty(), "processes using {}: {stragglers:?}", dir.display());
    assert!(process::dirs_kept() || !dir.exists(), "{} should be removed", dir.display());
}
