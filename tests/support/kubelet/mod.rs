//! The test kubelet: a Ready node on 127.0.0.1 that binds pending pods to
//! itself and runs each container's command as a host process.
//!
//! - `node`: registration, heartbeat and lease;
//! - `pod`: one worker per pod (lifecycle, restarts, deletion, status);
//! - `container`: a process in a private mount namespace with its volumes;
//! - `env`, `volumes`: the container's environment and files;
//! - `logs`: CRI-style log files and the HTTPS `/containerLogs` endpoint;
//! - `lifetimes`: when each container process lived, kept for the kubelet's whole life;
//! - `faults`: a slow or unreachable node, a slow pull, late reports, asked for through env.

mod container;
mod env;
mod faults;
mod lifetimes;
mod logs;
mod node;
mod pod;
mod volumes;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::certs::ServingIdentity;
use super::process;

pub use lifetimes::{ContainerLifetime, Lifetimes};

/// Images from this registry never "pull": the pod shows `ImagePullBackOff`.
#[allow(unused_imports)] // the lock tests ask for faults; other binaries do not
pub use faults::{REPORT_DELAY_ENV, START_DELAY_ENV, STOP_DELAY_ENV};

pub const FAILING_REGISTRY: &str = "fail.invalid/";

pub struct KubeletConfig {
    pub client: Client,
    pub node_name: String,
    /// Where pod folders (volumes, logs, home) go.
    pub root: PathBuf,
    pub identity: ServingIdentity,
    /// For `KUBERNETES_SERVICE_HOST`/`PORT` in containers (in-cluster config).
    pub api_server_port: u16,
    /// Put before the system `PATH` of every container.
    pub path_prepend: String,
    pub log_file: PathBuf,
}

/// A running test kubelet; [`Kubelet::stop`] kills every container.
pub struct Kubelet {
    state: Arc<KubeletState>,
    tasks: Vec<JoinHandle<()>>,
}

pub(crate) struct KubeletState {
    client: Client,
    node_name: String,
    root: PathBuf,
    api_server_port: u16,
    path_prepend: String,
    port: u16,
    log: Mutex<fs::File>,
    logs: logs::LogRegistry,
    pods: Mutex<HashMap<String, PodEntry>>,
    binding: Mutex<HashSet<String>>,
    groups: Mutex<BTreeSet<i32>>,
    lifetimes: Arc<Lifetimes>,
}

struct PodEntry {
    updates: watch::Sender<Option<Arc<Pod>>>,
    task: JoinHandle<()>,
}

impl Kubelet {
    pub async fn start(config: KubeletConfig) -> anyhow::Result<Kubelet> {
        fs::create_dir_all(&config.root)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(KubeletState {
            client: config.client,
            node_name: config.node_name,
            root: config.root,
            api_server_port: config.api_server_port,
            path_prepend: config.path_prepend,
            port,
            log: Mutex::new(fs::OpenOptions::new().create(true).append(true).open(&config.log_file)?),
            logs: logs::LogRegistry::default(),
            pods: Mutex::default(),
            binding: Mutex::default(),
            groups: Mutex::default(),
            lifetimes: Arc::new(Lifetimes::new()),
        });
        node::register(&state).await?;
        let server = logs::serve(listener, &config.identity, state.logs.clone())?;
        state.log(format!("serving on 127.0.0.1:{port}"));
        let tasks = vec![
            tokio::spawn(server),
            tokio::spawn(node::heartbeat(state.clone())),
            tokio::spawn(watch_pods(state.clone())),
        ];
        Ok(Kubelet { state, tasks })
    }

    /// Every container process this kubelet ran: shared, it stays readable after [`Kubelet::stop`].
    pub fn lifetimes(&self) -> Arc<Lifetimes> {
        self.state.lifetimes.clone()
    }

    /// Stops watching and kills every container process.
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        let entries: Vec<PodEntry> = lock(&self.state.pods).drain().map(|(_, e)| e).collect();
        for entry in &entries {
            entry.task.abort();
        }
        let groups: Vec<i32> = lock(&self.state.groups).iter().copied().collect();
        for pgid in groups {
            process::signal_group(pgid, libc::SIGKILL);
            process::untrack_group(pgid);
        }
        for entry in entries {
            let _ = entry.task.await;
        }
    }
}

impl KubeletState {
    fn log(&self, message: impl AsRef<str>) {
        let mut file = lock(&self.log);
        let _ = writeln!(file, "{} {}", Timestamp::now(), message.as_ref());
    }

    fn on_pod(self: &Arc<Self>, pod: Pod) {
        let Some(uid) = pod.uid() else { return };
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        match node.as_deref() {
            None | Some("") => self.bind(pod, uid),
            Some(node) if node == self.node_name => {
                let mut pods = lock(&self.pods);
                if let Some(entry) = pods.get(&uid) {
                    entry.updates.send_replace(Some(Arc::new(pod)));
                    return;
                }
                // A pod that finished before this kubelet started has nothing to run.
                if pod::is_terminal(&pod) && pod.metadata.deletion_timestamp.is_none() {
                    return;
                }
                self.log(format!(
                    "pod {}/{} ({uid}): starting worker",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any()
                ));
                let pod = Arc::new(pod);
                let (updates, receiver) = watch::channel(Some(pod.clone()));
                let task = tokio::spawn(pod::PodWorker::new(self.clone(), pod, receiver).run());
                pods.insert(uid, PodEntry { updates, task });
            }
            Some(_) => {}
        }
    }

    fn on_pod_gone(&self, uid: &str) {
        if let Some(entry) = lock(&self.pods).get(uid) {
            entry.updates.send_replace(None);
        }
    }

    /// Called by a worker when it is done with its pod.
    fn forget_pod(&self, uid: &str) {
        lock(&self.pods).remove(uid);
    }

    /// Binds an unscheduled pod to this node, as the scheduler would.
    fn bind(self: &Arc<Self>, pod: Pod, uid: String) {
        let gated =
            pod.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref()).is_some_and(|g| !g.is_empty());
        if gated || pod.metadata.deletion_timestamp.is_some() || pod::is_terminal(&pod) {
            return;
        }
        if !lock(&self.binding).insert(uid.clone()) {
            return;
        }
        let state = self.clone();
        tokio::spawn(async move {
            let ns = pod.namespace().unwrap_or_default();
            let name = pod.name_any();
            let binding = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": { "name": name, "uid": uid },
                "target": { "apiVersion": "v1", "kind": "Node", "name": state.node_name },
            });
            let result: Result<serde_json::Value, _> = Api::<Pod>::namespaced(state.client.clone(), &ns)
                .create_subresource("binding", &name, &PostParams::default(), &binding)
                .await;
            match result {
                Ok(_) => state.log(format!("pod {ns}/{name} ({uid}): bound to {}", state.node_name)),
                Err(e) => {
                    state.log(format!("pod {ns}/{name} ({uid}): binding failed: {e}"));
                    // Let a later event retry.
                    lock(&state.binding).remove(&uid);
                }
            }
        });
    }
}

async fn watch_pods(state: Arc<KubeletState>) {
    let api = Api::<Pod>::all(state.client.clone());
    let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut listed = HashSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(pod)) => {
                listed.extend(pod.uid());
                state.on_pod(pod);
            }
            Ok(Event::InitDone) => {
                let known: Vec<String> = lock(&state.pods).keys().cloned().collect();
                for uid in known.iter().filter(|uid| !listed.contains(*uid)) {
                    state.on_pod_gone(uid);
                }
            }
            Ok(Event::Apply(pod)) => state.on_pod(pod),
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.uid() {
                    lock(&state.binding).remove(&uid);
                    state.on_pod_gone(&uid);
                }
            }
            Err(e) => state.log(format!("pod watch error: {e}")),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
