//! Retention on a real control plane (DESIGN.md section 12): each lock keeps its newest finished
//! runs (`--history-limit`), older ones go with their children by garbage collection; runs of
//! other locks, unfinished runs and runs with their own TTL are never pruned; the runner is one
//! shared ConfigMap per namespace and version, which pruning leaves alone.

mod support;

use std::collections::BTreeSet;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use notebook_operator::RunPhase;
use serde_json::json;

use support::runs::{RUN_TIMEOUT, RunEnv, phase_of, run_of};
use support::wait_for;

const RUN_LABEL: &str = "notebooks.dev/run";

async fn run_names(env: &RunEnv) -> BTreeSet<String> {
    env.runs
        .list(&ListParams::default())
        .await
        .expect("list runs")
        .items
        .iter()
        .map(|r| r.name_any())
        .collect()
}

/// What is left in the namespace of one run: its Job, pods and ConfigMaps.
async fn children_of(env: &RunEnv, run: &str) -> Vec<String> {
    let by_label = ListParams::default().labels(&format!("{RUN_LABEL}={run}"));
    let mut left = Vec::new();
    for job in env.ns.api::<Job>().list(&by_label).await.expect("list jobs") {
        left.push(format!("Job {}", job.name_any()));
    }
    for pod in env.ns.api::<Pod>().list(&by_label).await.expect("list pods") {
        left.push(format!("Pod {}", pod.name_any()));
    }
    for cm in env.ns.api::<ConfigMap>().list(&by_label).await.expect("list config maps") {
        left.push(format!("ConfigMap {}", cm.name_any()));
    }
    left
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn each_lock_keeps_its_newest_finished_runs_and_the_rest_go_with_their_children() {
    let env = RunEnv::start_with("retention", &["--history-limit", "2", "--cancel-grace", "3s"]).await;
    let other_lock = json!({"lock": "other"});
    // Another lock's runs, older than all of lock `main`'s: per-lock counting keeps them.
    for name in ["other-1", "other-2"] {
        env.create(&run_of(name, &["print('other')"], other_lock.clone())).await;
        env.wait_terminal(name).await;
    }
    // A run on `main` whose TTL governs it: older than the others, yet never pruned.
    let main = json!({"lock": "main"});
    let mut ttl = main.clone();
    ttl["ttlSecondsAfterFinished"] = json!(3600);
    env.create(&run_of("main-0-ttl", &["print(0)"], ttl)).await;
    env.wait_terminal("main-0-ttl").await;
    // Four finished runs on `main` (queued behind each other, so they finish in order), and a
    // fifth that keeps running while the others are pruned.
    for name in ["main-1", "main-2", "main-3", "main-4"] {
        env.create(&run_of(name, &["print('main')"], main.clone())).await;
    }
    env.create(&run_of("main-5-running", &["import time; time.sleep(600)"], main.clone())).await;
    for name in ["main-1", "main-2", "main-3", "main-4"] {
        wait_for(RUN_TIMEOUT, format!("{name} finished or pruned"), || async {
            match env.runs.get_opt(name).await.expect("get run") {
                Some(r) => phase_of(&r).is_some_and(RunPhase::is_terminal),
                None => true,
            }
        })
        .await;
    }
    env.wait_phase("main-5-running", RunPhase::Running).await;

    let expected = names(&["other-1", "other-2", "main-0-ttl", "main-3", "main-4", "main-5-running"]);
    wait_for(RUN_TIMEOUT, format!("exactly {expected:?} left"), || async {
        run_names(&env).await == expected
    })
    .await;
    for pruned in ["main-1", "main-2"] {
        wait_for(RUN_TIMEOUT, format!("the Job, pods and ConfigMaps of {pruned} collected"), || async {
            children_of(&env, pruned).await.is_empty()
        })
        .await;
    }
    for kept in ["main-3", "main-4", "other-1", "other-2"] {
        let children = children_of(&env, kept).await;
        assert!(children.iter().any(|c| c.starts_with("Job ")), "{kept} keeps its Job: {children:?}");
        assert!(
            children.iter().any(|c| c.starts_with("ConfigMap ")),
            "{kept} keeps its inputs: {children:?}"
        );
    }
    let running = env.get("main-5-running").await;
    assert_eq!(phase_of(&running), Some(RunPhase::Running), "{:?}", running.status);

    // The runner is one shared ConfigMap, owned by no run, that pruning leaves alone.
    let runners = env
        .ns
        .api::<ConfigMap>()
        .list(&ListParams::default().labels("app.kubernetes.io/component=runner"))
        .await
        .expect("list runner config maps")
        .items;
    assert_eq!(runners.len(), 1, "one runner ConfigMap for the namespace: {runners:?}");
    let runner = &runners[0];
    assert!(runner.name_any().starts_with("notebook-runner-"), "{}", runner.name_any());
    assert_eq!(runner.metadata.owner_references, None);
    assert!(runner.data.as_ref().is_some_and(|d| d["run.py"].contains("nbclient")));
    let inputs = env.ns.api::<ConfigMap>().get("main-4-inputs").await.expect("inputs of main-4");
    let keys: Vec<&String> = inputs.data.iter().flatten().map(|(k, _)| k).collect();
    assert!(!keys.iter().any(|k| *k == "run.py"), "the runner is not copied into the inputs: {keys:?}");

    // Deleted by hand, the shared runner comes back with the next run.
    let cms: Api<ConfigMap> = env.ns.api();
    cms.delete(&runner.name_any(), &DeleteParams::default()).await.expect("delete runner");
    let runs: Api<notebook_operator::NotebookRun> = env.ns.api();
    runs.patch("main-5-running", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}})))
        .await
        .expect("cancel the running run");
    env.create(&run_of("main-6", &["print('after the runner was deleted')"], main.clone())).await;
    let last = env.wait_terminal("main-6").await;
    assert_eq!(phase_of(&last), Some(RunPhase::Succeeded), "{:?}", last.status);
    assert!(cms.get_opt(&runner.name_any()).await.expect("get runner").is_some());
    // main-5 (cancelled) and main-6 are now the newest two of `main`.
    let expected = names(&["other-1", "other-2", "main-0-ttl", "main-5-running", "main-6"]);
    wait_for(RUN_TIMEOUT, format!("exactly {expected:?} left"), || async {
        run_names(&env).await == expected
    })
    .await;
}
