//! The operator's end-to-end harness: a namespace with the controller binary watching it, runs of
//! inline notebooks, and waits with deadlines. Shared by the test binaries that drive runs.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use notebook_operator::{NotebookRun, Reason, RunPhase};
use serde_json::{Value, json};

use super::operator::{Operator, install_crd};
use super::overlap::{self, Checked, RunLocks};
use super::{ControlPlane, TestNamespace, from_json, ipynb, wait_for};

/// How long a run of a test notebook may take to reach what a test waits for.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);

pub struct RunEnv {
    // Dropped in order: the controller first, then the namespace (which dumps on failure).
    pub op: Operator,
    pub ns: TestNamespace,
    pub runs: Api<NotebookRun>,
}

/// A fresh namespace with a controller watching it (the CRD installed once per test binary).
pub async fn setup(prefix: &str) -> RunEnv {
    RunEnv::start_with(prefix, &[]).await
}

/// A run of an inline notebook; `extra` is merged into the spec.
pub fn run_of(name: &str, cells: &[&str], extra: Value) -> NotebookRun {
    let mut spec = json!({"notebook": {"inline": ipynb(cells)}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    from_json(
        json!({"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun", "metadata": {"name": name}, "spec": spec}),
    )
}

impl RunEnv {
    /// Like [`setup`], the controller started with `args` added to the test defaults.
    pub async fn start_with(prefix: &str, args: &[&str]) -> RunEnv {
        let cp = ControlPlane::shared();
        install_crd(cp);
        let ns = cp.namespace(prefix).await;
        let op = Operator::start_with(cp, &ns, args);
        let runs = ns.api();
        RunEnv { op, ns, runs }
    }

    pub async fn create(&self, run: &NotebookRun) -> NotebookRun {
        self.runs.create(&PostParams::default(), run).await.expect("create NotebookRun")
    }

    pub async fn get(&self, name: &str) -> NotebookRun {
        self.runs.get(name).await.expect("get NotebookRun")
    }

    pub async fn wait_until(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&NotebookRun) -> bool,
    ) -> NotebookRun {
        let runs = self.runs.clone();
        wait_for(RUN_TIMEOUT, format!("{name}: {what}"), || {
            let runs = runs.clone();
            let pred = &pred;
            async move { runs.get_opt(name).await.ok().flatten().filter(|r| pred(r)) }
        })
        .await
    }

    pub async fn wait_phase(&self, name: &str, phase: RunPhase) -> NotebookRun {
        self.wait_until(name, &format!("phase {phase:?}"), |r| phase_of(r) == Some(phase)).await
    }

    pub async fn wait_terminal(&self, name: &str) -> NotebookRun {
        self.wait_until(name, "a terminal phase", |r| phase_of(r).is_some_and(RunPhase::is_terminal)).await
    }

    pub async fn lease(&self, lock: &str) -> Option<Lease> {
        self.ns.api::<Lease>().get_opt(lock).await.expect("get lease")
    }

    pub async fn wait_lock_free(&self, lock: &str) {
        let leases: Api<Lease> = self.ns.api();
        wait_for(RUN_TIMEOUT, format!("lock {lock} released"), || {
            let leases = leases.clone();
            async move { leases.get_opt(lock).await.ok().is_some_and(|l| l.is_none()) }
        })
        .await
    }

    /// The executed notebook the run kept (its output ConfigMap, gunzipped).
    pub async fn executed_notebook(&self, run: &NotebookRun) -> Value {
        let name = run.status.as_ref().and_then(|s| s.output.as_ref()).and_then(|o| o.config_map.clone());
        let name =
            name.unwrap_or_else(|| panic!("run {} kept no notebook: {:?}", run.name_any(), run.status));
        let cm = self.ns.api::<ConfigMap>().get(&name).await.expect("output ConfigMap");
        let gz = &cm.binary_data.expect("binaryData")["notebook.ipynb.gz"].0;
        let raw = notebook_operator::progress::gunzip(gz).expect("gzip");
        serde_json::from_slice(&raw).expect("ipynb JSON")
    }

    pub async fn jobs(&self) -> Vec<Job> {
        self.ns.api::<Job>().list(&ListParams::default()).await.expect("list jobs").items
    }

    /// Like [`Self::assert_no_overlap`], for runs that may have been deleted: `known` maps each
    /// run name to its lock.
    pub async fn assert_no_overlap_of(&self, known: &RunLocks) -> Checked {
        overlap::assert_no_overlap(ControlPlane::shared(), &self.ns, known).await
    }

    /// No two runs of this namespace sharing a lock had a live container at the same instant,
    /// as the node saw it. The runs are read from the API: these tests delete none.
    pub async fn assert_no_overlap(&self) -> Checked {
        overlap::assert_no_overlap(ControlPlane::shared(), &self.ns, &RunLocks::new()).await
    }

    pub async fn events_for(&self, name: &str) -> Vec<Event> {
        let events: Api<Event> = self.ns.api();
        let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
        events.list(&lp).await.map(|l| l.items).unwrap_or_default()
    }
}

pub fn phase_of(run: &NotebookRun) -> Option<RunPhase> {
    run.phase()
}

pub fn reason_of(run: &NotebookRun) -> Option<Reason> {
    run.status.as_ref().and_then(|s| s.reason)
}
