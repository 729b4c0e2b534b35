//! High availability and faults (DESIGN.md section 11): the controller crashing after each step
//! of a run, a leader killed with a standby waiting, a leader paused past its lease, the API
//! server and etcd restarted mid-run, and the facade killed mid-`/start`. After each: the run
//! completes, exactly one Job ever existed, the lock is released, nothing is left behind.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use notebook_operator::{NotebookRun, RunPhase};
use serde_json::json;

use support::facade::Facade;
use support::operator::{Operator, apply_crd, install_crd};
use support::runs::{RUN_TIMEOUT, phase_of, run_of};
use support::{ControlPlane, TestNamespace, from_json, ipynb, wait_for};

/// The election in these tests: short, so take-overs take seconds.
const ELECTION: [&str; 5] =
    ["--leader-elect", "--leader-election-lease-duration", "6s", "--leader-election-renew-before", "2s"];
const LEASE_DURATION: Duration = Duration::from_secs(6);
const ELECTION_ID: &str = "notebook-operator-controller";

/// Every Job uid ever seen in a namespace, from a watch started before the run.
struct JobsSeen(Arc<Mutex<BTreeSet<String>>>, tokio::task::JoinHandle<()>);

impl JobsSeen {
    /// The Jobs of run `run`.
    fn watch(ns: &TestNamespace, run: &str) -> Self {
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let jobs: Api<Job> = ns.api();
        let record = seen.clone();
        let config = watcher::Config::default().labels(&format!("notebooks.dev/run={run}"));
        let task = tokio::spawn(async move {
            let mut stream = watcher(jobs, config).default_backoff().applied_objects().boxed();
            while let Some(event) = stream.next().await {
                if let Ok(job) = event {
                    record.lock().unwrap().insert(job.uid().unwrap_or_default());
                }
            }
        });
        Self(seen, task)
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl Drop for JobsSeen {
    fn drop(&mut self) {
        self.1.abort();
    }
}

async fn wait_terminal(runs: &Api<NotebookRun>, name: &str) -> NotebookRun {
    wait_for(RUN_TIMEOUT, format!("{name} to finish"), || async {
        runs.get_opt(name).await.ok().flatten().filter(|r| r.phase().is_some_and(RunPhase::is_terminal))
    })
    .await
}

/// The run Succeeded with one Job ever, its lock released, and every child owned by a live run.
async fn assert_clean_finish(ns: &TestNamespace, runs: &Api<NotebookRun>, name: &str, jobs: &JobsSeen) {
    let run = wait_terminal(runs, name).await;
    assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{name}: {:?}", run.status);
    let leases: Api<Lease> = ns.api();
    wait_for(RUN_TIMEOUT, format!("{name}'s lock released"), || async {
        leases.get_opt(&run.spec.lock).await.ok().is_some_and(|l| l.is_none())
    })
    .await;
    assert_eq!(jobs.count(), 1, "{name}: exactly one Job ever existed");
    let live: BTreeSet<String> =
        runs.list(&Default::default()).await.unwrap().items.iter().filter_map(|r| r.uid()).collect();
    let owned = |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
        refs.iter().any(|o| live.contains(&o.uid))
    };
    for job in ns.api::<Job>().list(&Default::default()).await.unwrap() {
        assert!(owned(job.owner_references()), "orphan Job {}", job.name_any());
    }
    // The runner's ConfigMap is shared by the namespace's runs and owned by none of them.
    let runner = notebook_operator::job::runner_name();
    for cm in ns.api::<ConfigMap>().list(&Default::default()).await.unwrap() {
        if !["kube-root-ca.crt", "nb", runner].contains(&cm.name_any().as_str()) {
            assert!(owned(cm.owner_references()), "orphan ConfigMap {}", cm.name_any());
        }
    }
}

async fn holder(ns: &TestNamespace, lease: &str) -> Option<String> {
    let leases: Api<Lease> = ns.api();
    leases.get_opt(lease).await.ok().flatten()?.spec?.holder_identity
}

fn leader_of(ops: &mut [Operator], holder: &str) -> Option<usize> {
    ops.iter().position(|op| op.pid().is_some_and(|pid| holder.ends_with(&format!("-{pid}"))))
}

// === 1: the controller crashing after each step ===

#[tokio::test]
async fn a_controller_killed_after_each_step_completes_the_run_with_one_job() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    for step in ["after-lease", "after-inputs", "after-job", "before-release"] {
        let ns = cp.namespace(&format!("crash-{step}")).await;
        let jobs = JobsSeen::watch(&ns, "crash");
        let runs: Api<NotebookRun> = ns.api();
        let mut op = Operator::start_with_env(cp, &ns, &[], &[("NOTEBOOK_OPERATOR_FAILPOINT", step)]);
        runs.create(&PostParams::default(), &run_of("crash", &["print('ran')"], json!({}))).await.unwrap();
        let deadline = Instant::now() + RUN_TIMEOUT;
        while !op.has_exited() {
            assert!(Instant::now() < deadline, "the controller did not crash {step}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(op.log_text().contains("failpoint: SIGKILL"), "{step}: {}", op.log_text());
        op.restart_clean();
        assert_clean_finish(&ns, &runs, "crash", &jobs).await;
        eprintln!("crash {step}: the run completed with one Job after a restart");
    }
}

// === 2, 5: leader election ===

/// Two controllers electing a leader in a fresh namespace: the namespace, the controllers, the
/// leader's identity and its index.
async fn two_replicas(prefix: &str) -> (TestNamespace, Vec<Operator>, String, usize) {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace(prefix).await;
    let ports: Vec<String> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string())
        .collect();
    let start = |listen: &str| {
        let args = [&ELECTION[..], &["--leader-election-namespace", &ns, "--listen", listen]].concat();
        Operator::start_with(cp, &ns, &args)
    };
    let mut ops = vec![start(&ports[0]), start(&ports[1])];
    let first = wait_for(RUN_TIMEOUT, "a leader", || async { holder(&ns, ELECTION_ID).await }).await;
    let leader = leader_of(&mut ops, &first).expect("the leader is one of ours");
    // Both are ready (a standby is healthy); the gauge says which one leads.
    let http = reqwest::Client::new();
    for (i, addr) in ports.iter().enumerate() {
        let expected = if i == leader { "notebook_operator_leader 1" } else { "notebook_operator_leader 0" };
        wait_for(RUN_TIMEOUT, format!("replica {i} ready, {expected}"), || async {
            let ready = http.get(format!("http://{addr}/readyz")).send().await.ok()?.status().is_success();
            let metrics = http.get(format!("http://{addr}/metrics")).send().await.ok()?.text().await.ok()?;
            (ready && metrics.contains(expected)).then_some(())
        })
        .await;
    }
    (ns, ops, first, leader)
}

#[tokio::test]
async fn the_standby_takes_over_a_killed_leader_within_the_lease() {
    let (ns, mut ops, first, leader) = two_replicas("takeover").await;
    let jobs = JobsSeen::watch(&ns, "long");
    let runs: Api<NotebookRun> = ns.api();
    let cells =
        ["import time", "time.sleep(2)", "time.sleep(2)", "time.sleep(2)", "time.sleep(2)", "print('done')"];
    runs.create(&PostParams::default(), &run_of("long", &cells, json!({}))).await.unwrap();
    let before = wait_for(RUN_TIMEOUT, "progress under the first leader", || async {
        let run = runs.get_opt("long").await.ok().flatten()?;
        run.status?.progress.filter(|p| p.cells_completed >= 1).map(|p| p.cells_completed)
    })
    .await;

    ops[leader].kill();
    let killed = Instant::now();
    let next = wait_for(RUN_TIMEOUT, "the standby to lead", || async {
        holder(&ns, ELECTION_ID).await.filter(|h| *h != first)
    })
    .await;
    let took = killed.elapsed();
    eprintln!(
        "take-over: the standby led {:.1}s after the leader was killed (lease {LEASE_DURATION:?})",
        took.as_secs_f64()
    );
    assert!(leader_of(&mut ops, &next).is_some_and(|i| i != leader));
    assert!(took <= LEASE_DURATION * 2, "take-over took {took:?}, lease {LEASE_DURATION:?}");
    wait_for(RUN_TIMEOUT, "progress under the new leader", || async {
        let run = runs.get_opt("long").await.ok().flatten()?;
        run.status?.progress.filter(|p| p.cells_completed > before).map(|_| ())
    })
    .await;
    assert_clean_finish(&ns, &runs, "long", &jobs).await;
}

#[tokio::test]
async fn a_leader_paused_past_its_lease_does_not_write_when_it_resumes() {
    let (ns, ops, first, leader) = two_replicas("partition").await;
    let jobs = JobsSeen::watch(&ns, "run");
    let runs: Api<NotebookRun> = ns.api();
    let cells = ["import time", "time.sleep(3)", "print('done')"];
    runs.create(&PostParams::default(), &run_of("run", &cells, json!({}))).await.unwrap();
    wait_for(RUN_TIMEOUT, "the run running", || async {
        runs.get_opt("run").await.ok().flatten().filter(|r| phase_of(r) == Some(RunPhase::Running))
    })
    .await;

    // Cut off: the leader is frozen with the run in flight, past its lease.
    ops[leader].signal(libc::SIGSTOP);
    wait_for(RUN_TIMEOUT, "the standby to lead", || async {
        holder(&ns, ELECTION_ID).await.filter(|h| *h != first)
    })
    .await;
    let done = wait_terminal(&runs, "run").await;
    assert_eq!(phase_of(&done), Some(RunPhase::Succeeded), "{:?}", done.status);
    let version = done.resource_version();

    ops[leader].signal(libc::SIGCONT);
    wait_for(Duration::from_secs(30), "the old leader to step down", || async {
        ops[leader].log_text().contains("the lease can no longer be trusted")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = runs.get("run").await.unwrap();
    assert_eq!(
        after.resource_version(),
        version,
        "nobody wrote the finished run after the old leader resumed"
    );
    assert_eq!(phase_of(&after), Some(RunPhase::Succeeded));
    assert_clean_finish(&ns, &runs, "run", &jobs).await;
}

// === 3, 4: the API server and etcd restarted mid-run ===

async fn survive_outage(daemon: &'static str) {
    // An outage of its own: the shared control plane serves the other tests.
    let cp = ControlPlane::start();
    apply_crd(&cp);
    let ns = cp.namespace(&format!("outage-{daemon}")).await;
    let cms: Api<ConfigMap> = ns.api();
    let nb: ConfigMap =
        from_json(json!({"metadata": {"name": "nb"}, "data": {"notebook.ipynb": ipynb(&["print(1)"])}}));
    cms.create(&PostParams::default(), &nb).await.unwrap();
    let _op = Operator::start(&cp, &ns);
    let facade = Facade::start(&cp, &ns, "facade", "20s", &[]).await;
    let jobs = JobsSeen::watch(&ns, "through");
    let runs: Api<NotebookRun> = ns.api();
    let cells = ["import time", "time.sleep(8)", "time.sleep(8)", "print('done')"];
    runs.create(&PostParams::default(), &run_of("through", &cells, json!({}))).await.unwrap();
    wait_for(RUN_TIMEOUT, "the run running", || async {
        runs.get_opt("through").await.ok().flatten().filter(|r| phase_of(r) == Some(RunPhase::Running))
    })
    .await;

    let outage = cp.outage(daemon, Duration::from_secs(20));
    let probe = async {
        // While the API server cannot be reached, the facade answers, never hangs up.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let resp =
            facade.http.post(format!("{}/start", facade.url)).send().await.expect("the facade answers");
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        (status, body)
    };
    let ((), (status, body)) = tokio::join!(outage, probe);
    // With the API server down the facade cannot reach it: 503 with a clear message. With etcd
    // down the API server holds requests until etcd is back, and the start may go through.
    let expected: &[u16] = if daemon == "etcd" { &[200, 503] } else { &[503] };
    assert!(expected.contains(&status), "{daemon} down: /start answered {status}: {body}");
    if status == 503 {
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "a clear message: {body}");
    }
    let back = Instant::now();
    let run = wait_terminal(&runs, "through").await;
    eprintln!("{daemon} back: the run finished {:.1}s later", back.elapsed().as_secs_f64());
    assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{:?}", run.status);
    assert_eq!(jobs.count(), 1, "exactly one Job ever existed");
    let progress = facade.http.get(format!("{}/progress?task_id=through", facade.url)).send().await.unwrap();
    assert_eq!(progress.status().as_u16(), 200, "the facade reconnected");
    let leases: Api<Lease> = ns.api();
    wait_for(RUN_TIMEOUT, "the lock released", || async {
        leases.get_opt("notebook-run").await.ok().is_some_and(|l| l.is_none())
    })
    .await;
}

#[tokio::test]
async fn a_run_survives_an_api_server_restart() {
    survive_outage("kube-apiserver").await;
}

#[tokio::test]
async fn a_run_survives_an_etcd_restart() {
    survive_outage("etcd").await;
}

// === 6: the facade killed mid-/start ===

#[tokio::test]
async fn a_facade_killed_mid_start_leaves_no_unobserved_run() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("facade-crash").await;
    let cms: Api<ConfigMap> = ns.api();
    let nb = ipynb(&["import time; time.sleep(6)", "print('done')"]);
    let nb: ConfigMap = from_json(json!({"metadata": {"name": "nb"}, "data": {"notebook.ipynb": nb}}));
    cms.create(&PostParams::default(), &nb).await.unwrap();
    let _op = Operator::start(cp, &ns);
    let mut facade =
        Facade::start(cp, &ns, "notebook-run", "20s", &[("NOTEBOOK_OPERATOR_FAILPOINT", "after-create")])
            .await;
    let answer = facade.http.post(format!("{}/start", facade.url)).send().await;
    assert!(answer.is_err(), "the facade died before answering: {answer:?}");
    assert!(facade.child.wait().is_ok());
    let runs: Api<NotebookRun> = ns.api();
    let created = wait_for(RUN_TIMEOUT, "the run the facade created", || async {
        runs.list(&Default::default()).await.ok()?.items.into_iter().next()
    })
    .await;
    let id = created.name_any();

    // The retried /start sees that run, as the original would: 400 naming it, and /progress shows it.
    let facade = Facade::start(cp, &ns, "notebook-run", "20s", &[]).await;
    wait_for(RUN_TIMEOUT, "the orphan admitted", || async {
        runs.get_opt(&id).await.ok().flatten().filter(|r| phase_of(r) == Some(RunPhase::Running))
    })
    .await;
    let resp = facade.http.post(format!("{}/start", facade.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["detail"], format!("Another task is already running: {id}"));
    let progress: serde_json::Value =
        facade.http.get(format!("{}/progress", facade.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(progress["id"], id.as_str(), "{progress}");
    let run = wait_terminal(&runs, &id).await;
    assert_eq!(phase_of(&run), Some(RunPhase::Succeeded));
    let leases: Api<Lease> = ns.api();
    wait_for(RUN_TIMEOUT, "the lock released", || async {
        leases.get_opt("notebook-run").await.ok().is_some_and(|l| l.is_none())
    })
    .await;
}
