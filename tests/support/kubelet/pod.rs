//! One worker per pod on the node: volumes, init containers, containers,
//! restarts, the pod's active deadline, deletion, and status reports.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Event, EventSource, HostIP, ObjectReference, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::super::process;
use super::container::{self, Exit, Launch, PodRef};
use super::env::{self, expand};
use super::faults::{self, StopDelay};
use super::node::now;
use super::volumes::{self, Volumes};
use super::{FAILING_REGISTRY, KubeletState};

const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const RETRY: Duration = Duration::from_secs(2);
const IMAGE_PULL_BACKOFF_AFTER: Duration = Duration::from_secs(1);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);
const DEFAULT_GRACE_SECONDS: i64 = 30;

pub fn is_terminal(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Init,
    Main,
}

/// What the kubelet knows about one container of the pod.
struct Record {
    spec: Container,
    state: ContainerState,
    last_state: Option<ContainerState>,
    restart_count: i32,
    runs: u32,
    pid: Option<i32>,
    container_id: Option<String>,
    /// When to (re)start it: after a crash back-off or a configuration error.
    start_at: Option<Instant>,
}

impl Record {
    fn new(spec: Container, reason: &str) -> Self {
        Self {
            spec,
            state: waiting(reason, None),
            last_state: None,
            restart_count: 0,
            runs: 0,
            pid: None,
            container_id: None,
            start_at: None,
        }
    }

    fn exit_code(&self) -> Option<i32> {
        self.state.terminated.as_ref().map(|t| t.exit_code)
    }

    fn status(&self) -> ContainerStatus {
        let image = self.spec.image.clone().unwrap_or_default();
        let running = self.state.running.is_some();
        ContainerStatus {
            name: self.spec.name.clone(),
            image_id: format!("test-kubelet://{image}"),
            image,
            container_id: self.container_id.clone(),
            ready: running,
            started: Some(running),
            restart_count: self.restart_count,
            state: Some(self.state.clone()),
            last_state: self.last_state.clone(),
            ..Default::default()
        }
    }
}

/// Status updates retried through an API server outage, once a second.
const STATUS_RETRIES: u32 = 120;

enum Paused {
    Done,
    Deleting,
    Gone,
}

enum Wake {
    Exit(Exit),
    Updated,
    Deleting,
    Gone,
    Timer,
}

enum Started {
    Running,
    /// Missing config map, secret or key: retried, like `CreateContainerConfigError`.
    ConfigError,
    /// The process could not be started (`StartError`, exit code 128).
    Failed,
}

pub struct PodWorker {
    state: Arc<KubeletState>,
    updates: watch::Receiver<Option<Arc<Pod>>>,
    pod: Arc<Pod>,
    api: Api<Pod>,
    uid: String,
    namespace: String,
    name: String,
    dir: PathBuf,
    start_time: Time,
    init: Vec<Record>,
    main: Vec<Record>,
    conditions: BTreeMap<&'static str, PodCondition>,
    phase: &'static str,
    reason: Option<String>,
    message: Option<String>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    volumes: Option<Volumes>,
    deletion_seen: bool,
    delete_requested: bool,
    active_deadline: Option<Instant>,
}

impl PodWorker {
    pub fn new(state: Arc<KubeletState>, pod: Arc<Pod>, updates: watch::Receiver<Option<Arc<Pod>>>) -> Self {
        let uid = pod.uid().unwrap_or_default();
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let spec = pod.spec.clone().unwrap_or_default();
        let has_init = spec.init_containers.as_ref().is_some_and(|c| !c.is_empty());
        let main_reason = if has_init { "PodInitializing" } else { "ContainerCreating" };
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Self {
            api: Api::namespaced(state.client.clone(), &namespace),
            dir: state.root.join("pods").join(&uid),
            init: spec
                .init_containers
                .into_iter()
                .flatten()
                .map(|c| Record::new(c, "PodInitializing"))
                .collect(),
            main: spec.containers.into_iter().map(|c| Record::new(c, main_reason)).collect(),
            active_deadline: spec
                .active_deadline_seconds
                .map(|s| Instant::now() + Duration::from_secs(s.max(0) as u64)),
            state,
            updates,
            pod,
            uid,
            namespace,
            name,
            start_time: now(),
            conditions: BTreeMap::new(),
            phase: "Pending",
            reason: None,
            message: None,
            exits_tx,
            exits_rx,
            volumes: None,
            deletion_seen: false,
            delete_requested: false,
        }
    }

    pub async fn run(mut self) {
        self.lifecycle().await;
        for record in self.init.iter().chain(&self.main) {
            if let Some(pid) = record.pid {
                process::signal_group(pid, libc::SIGKILL);
            }
        }
        self.state.logs.remove_pod(&self.namespace, &self.name);
        let _ = fs::remove_dir_all(&self.dir);
        self.state.forget_pod(&self.uid);
        self.log("worker done");
    }

    async fn lifecycle(&mut self) {
        if is_terminal(&self.pod) {
            return self.await_removal().await;
        }
        if self.pod.metadata.deletion_timestamp.is_some() {
            self.deletion_seen = true;
            return self.finish().await;
        }
        for record in self.init.iter().chain(&self.main) {
            let reason = record.state.waiting.as_ref().and_then(|w| w.reason.as_deref()).unwrap_or_default();
            self.state.logs.set_waiting(&self.namespace, &self.name, &record.spec.name, reason);
        }
        self.report().await;

        if let Some(i) =
            self.main.iter().chain(&self.init).position(|r| {
                r.spec.image.as_deref().is_some_and(|image| image.starts_with(FAILING_REGISTRY))
            })
        {
            return self.fail_image_pull(i).await;
        }

        loop {
            match volumes::prepare(&self.state.client, &self.pod, &self.dir.join("volumes")).await {
                Ok((volumes, warnings)) => {
                    for warning in warnings {
                        self.log(&warning);
                    }
                    self.volumes = Some(volumes);
                    break;
                }
                Err(e) => {
                    let message = format!("MountVolume.SetUp failed: {e:#}");
                    self.log(&message);
                    for record in self.init.iter_mut().chain(self.main.iter_mut()) {
                        record.state = waiting("ContainerCreating", Some(message.clone()));
                    }
                    self.event("Warning", "FailedMount", &message).await;
                    self.report().await;
                    match self.next(Some(Instant::now() + RETRY)).await {
                        Wake::Gone => return,
                        Wake::Deleting => return self.finish().await,
                        _ => {}
                    }
                }
            }
        }

        for i in 0..self.init.len() {
            if !self.run_init_container(i).await {
                return;
            }
        }

        if let Some(delay) = faults::start_delay(&self.pod) {
            self.log(format!("pulling slowly: containers start in {delay:?}"));
            match self.pause(delay).await {
                Paused::Gone => return,
                Paused::Deleting => return self.finish().await,
                Paused::Done => {}
            }
        }
        for i in 0..self.main.len() {
            self.start(Kind::Main, i).await;
        }
        self.report().await;
        loop {
            if self.main_finished() {
                let all_succeeded = self.main.iter().all(|r| r.exit_code() == Some(0));
                self.phase = if all_succeeded { "Succeeded" } else { "Failed" };
                self.report().await;
                return self.await_removal().await;
            }
            let timer = self.main.iter().filter_map(|r| r.start_at).chain(self.active_deadline).min();
            match self.next(timer).await {
                Wake::Exit(exit) => {
                    if let Some((Kind::Main, i)) = self.record_exit(exit) {
                        self.schedule_restart(i);
                        if let Some(delay) = faults::report_delay(&self.pod) {
                            self.log(format!("reporting the exit {delay:?} late"));
                            match self.pause(delay).await {
                                Paused::Gone => return,
                                Paused::Deleting => return self.finish().await,
                                Paused::Done => {}
                            }
                        }
                    }
                    self.report().await;
                }
                Wake::Timer => {
                    if self.active_deadline.is_some_and(|d| d <= Instant::now()) {
                        return self.exceed_deadline().await;
                    }
                    for i in 0..self.main.len() {
                        if self.main[i].start_at.is_some_and(|t| t <= Instant::now()) {
                            self.start(Kind::Main, i).await;
                        }
                    }
                    self.report().await;
                }
                Wake::Deleting => return self.finish().await,
                Wake::Gone => return,
                Wake::Updated => {}
            }
        }
    }

    /// Runs init container `i` until it succeeds; false when the pod is done.
    async fn run_init_container(&mut self, i: usize) -> bool {
        self.init[i].start_at = Some(Instant::now());
        loop {
            let timer = self.init[i].start_at.into_iter().chain(self.active_deadline).min();
            match self.next(timer).await {
                Wake::Timer => {
                    if self.active_deadline.is_some_and(|d| d <= Instant::now()) {
                        self.exceed_deadline().await;
                        return false;
                    }
                    if self.init[i].start_at.is_some_and(|t| t <= Instant::now()) {
                        self.start(Kind::Init, i).await;
                        self.report().await;
                    }
                }
                Wake::Exit(exit) => {
                    self.record_exit(exit);
                    self.report().await;
                }
                Wake::Deleting => {
                    self.finish().await;
                    return false;
                }
                Wake::Gone => return false,
                Wake::Updated => {}
            }
            if self.init[i].pid.is_some() || self.init[i].start_at.is_some() {
                continue;
            }
            match self.init[i].exit_code() {
                Some(0) => return true,
                Some(_) if self.restart_policy() == "Never" => {
                    self.phase = "Failed";
                    self.report().await;
                    self.await_removal().await;
                    return false;
                }
                Some(_) => self.schedule_backoff(Kind::Init, i),
                None => {}
            }
        }
    }

    fn restart_policy(&self) -> String {
        self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into())
    }

    fn main_finished(&self) -> bool {
        self.main.iter().all(|r| r.pid.is_none() && r.start_at.is_none() && r.exit_code().is_some())
    }

    fn schedule_restart(&mut self, i: usize) {
        let restart = match self.restart_policy().as_str() {
            "Never" => false,
            "OnFailure" => self.main[i].exit_code() != Some(0),
            _ => true,
        };
        if restart {
            self.schedule_backoff(Kind::Main, i);
        }
    }

    fn schedule_backoff(&mut self, kind: Kind, i: usize) {
        let pod = self.name.clone();
        let record = self.record_mut(kind, i);
        let backoff = Duration::from_secs(1 << record.restart_count.clamp(0, 5)).min(MAX_RESTART_BACKOFF);
        record.last_state = Some(record.state.clone());
        record.state = waiting(
            "CrashLoopBackOff",
            Some(format!(
                "back-off {}s restarting failed container={} pod={}",
                backoff.as_secs(),
                record.spec.name,
                pod
            )),
        );
        record.start_at = Some(Instant::now() + backoff);
    }

    fn record_mut(&mut self, kind: Kind, i: usize) -> &mut Record {
        match kind {
            Kind::Init => &mut self.init[i],
            Kind::Main => &mut self.main[i],
        }
    }

    /// Starts (or restarts) a container.
    async fn start(&mut self, kind: Kind, i: usize) -> Started {
        let spec = self.record_mut(kind, i).spec.clone();
        let record = self.record_mut(kind, i);
        record.start_at = None;
        if record.runs > 0 {
            record.restart_count += 1;
            if record.state.terminated.is_some() {
                record.last_state = Some(record.state.clone());
            }
        }
        let outcome = self.launch(&spec).await;
        let record = self.record_mut(kind, i);
        let started = match outcome {
            Ok((pid, container_id)) => {
                record.runs += 1;
                record.pid = Some(pid);
                record.container_id = Some(container_id);
                record.state = ContainerState {
                    running: Some(ContainerStateRunning { started_at: Some(now()) }),
                    ..Default::default()
                };
                Started::Running
            }
            Err(LaunchError::Config(message)) => {
                if record.runs > 0 {
                    record.restart_count -= 1;
                }
                record.state = waiting("CreateContainerConfigError", Some(message.clone()));
                record.start_at = Some(Instant::now() + RETRY);
                let logs = &self.state.logs;
                logs.set_waiting(&self.namespace, &self.name, &spec.name, "CreateContainerConfigError");
                self.log(format!("container {}: {message}", spec.name));
                self.event("Warning", "Failed", &format!("Error: {message}")).await;
                return Started::ConfigError;
            }
            Err(LaunchError::Start(message)) => {
                record.runs += 1;
                record.state = ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 128,
                        reason: Some("StartError".into()),
                        message: Some(message.clone()),
                        started_at: Some(now()),
                        finished_at: Some(now()),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                self.log(format!("container {}: {message}", spec.name));
                self.event("Warning", "Failed", &format!("Error: {message}")).await;
                if kind == Kind::Main {
                    self.schedule_restart(i);
                }
                return Started::Failed;
            }
        };
        self.log(format!("container {} started", spec.name));
        self.event("Normal", "Started", &format!("Started container {}", spec.name)).await;
        started
    }

    async fn launch(&mut self, spec: &Container) -> Result<(i32, String), LaunchError> {
        let port = self.state.api_server_port;
        let service_env: Vec<(String, String)> = [
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_string()),
            ("KUBERNETES_SERVICE_PORT", port.to_string()),
            ("KUBERNETES_SERVICE_PORT_HTTPS", port.to_string()),
            ("KUBERNETES_PORT", format!("tcp://127.0.0.1:{port}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let resolved = env::resolve(&self.state.client, &self.pod, spec, &service_env)
            .await
            .map_err(|e| LaunchError::Config(format!("{e:#}")))?;

        let run = self.record_count(&spec.name) + 1;
        let container_dir = self.dir.join("containers").join(&spec.name);
        let home = self.dir.join("home");
        let default_working_dir = container_dir.join("work");
        for dir in [&container_dir, &home, &default_working_dir] {
            fs::create_dir_all(dir).map_err(|e| LaunchError::Start(format!("{}: {e}", dir.display())))?;
        }
        let path = if self.state.path_prepend.is_empty() {
            SYSTEM_PATH.to_string()
        } else {
            format!("{}:{SYSTEM_PATH}", self.state.path_prepend)
        };
        let mut process_env: BTreeMap<String, String> = [
            ("PATH".to_string(), path),
            ("HOME".to_string(), home.display().to_string()),
            ("HOSTNAME".to_string(), self.name.clone()),
        ]
        .into();
        process_env.extend(resolved.clone());

        let argv: Vec<String> = spec
            .command
            .iter()
            .flatten()
            .chain(spec.args.iter().flatten())
            .map(|arg| expand(arg, &resolved))
            .collect();
        let termination_file = container_dir.join(format!("termination-log.{run}"));
        let volumes = self.volumes.as_ref().expect("volumes are prepared before containers");
        let mounts = volumes
            .mounts(spec, &resolved, &termination_file)
            .map_err(|e| LaunchError::Config(format!("{e:#}")))?;
        let log = self
            .state
            .logs
            .new_run(
                &self.namespace,
                &self.name,
                &spec.name,
                self.dir.join("logs").join(&spec.name).join(format!("{run}.log")),
            )
            .map_err(|e| LaunchError::Start(e.to_string()))?;
        let id = format!("{}-{}-{run}", self.uid, spec.name);
        let launch = Launch {
            id: id.clone(),
            pod: PodRef {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                uid: self.uid.clone(),
                labels: self.pod.labels().clone(),
            },
            container: spec.name.clone(),
            argv,
            env: process_env,
            working_dir: spec
                .working_dir
                .clone()
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .unwrap_or(default_working_dir),
            mounts,
            log: log.clone(),
            termination_file,
            fallback_to_logs_on_error: spec.termination_message_policy.as_deref()
                == Some("FallbackToLogsOnError"),
        };
        match container::launch(&self.state, launch, self.exits_tx.clone()) {
            Ok(pid) => Ok((pid, format!("test-kubelet://{id}"))),
            Err(e) => {
                log.close();
                Err(LaunchError::Start(format!("failed to start container {:?}: {e:#}", spec.name)))
            }
        }
    }

    fn record_count(&self, name: &str) -> u32 {
        self.init.iter().chain(&self.main).find(|r| r.spec.name == name).map_or(0, |r| r.runs)
    }

    /// Records a container's exit; returns which container it was.
    fn record_exit(&mut self, exit: Exit) -> Option<(Kind, usize)> {
        let found =
            self.init.iter().position(|r| r.spec.name == exit.container).map(|i| (Kind::Init, i)).or_else(
                || self.main.iter().position(|r| r.spec.name == exit.container).map(|i| (Kind::Main, i)),
            );
        let (kind, i) = found?;
        let name = self.name.clone();
        let record = self.record_mut(kind, i);
        record.pid = None;
        record.state = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: exit.exit_code,
                reason: Some(if exit.exit_code == 0 { "Completed" } else { "Error" }.into()),
                message: exit.message,
                started_at: Some(exit.started_at),
                finished_at: Some(exit.finished_at),
                container_id: record.container_id.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let message = format!("container {} of {name} exited with {}", exit.container, exit.exit_code);
        self.log(message);
        Some((kind, i))
    }

    async fn next(&mut self, timer: Option<Instant>) -> Wake {
        let sleep = async move {
            match timer {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(exit) = self.exits_rx.recv() => Wake::Exit(exit),
            changed = self.updates.changed() => {
                if changed.is_err() {
                    return Wake::Gone;
                }
                let latest = self.updates.borrow_and_update().clone();
                match latest {
                    None => Wake::Gone,
                    Some(pod) => {
                        self.pod = pod;
                        if !self.deletion_seen && self.pod.metadata.deletion_timestamp.is_some() {
                            self.deletion_seen = true;
                            Wake::Deleting
                        } else {
                            Wake::Updated
                        }
                    }
                }
            }
            _ = sleep => Wake::Timer,
        }
    }

    fn running_pids(&self) -> Vec<i32> {
        self.init.iter().chain(&self.main).filter_map(|r| r.pid).collect()
    }

    /// SIGTERM to every running container, SIGKILL after `grace`; false when the pod is gone.
    async fn stop_containers(&mut self, grace: Duration) -> bool {
        let pids = self.running_pids();
        if !pids.is_empty() {
            self.event("Normal", "Killing", "Stopping containers").await;
        }
        for pid in &pids {
            process::signal_group(*pid, libc::SIGTERM);
        }
        let mut deadline = Instant::now() + grace;
        let mut killed = false;
        while !self.running_pids().is_empty() {
            match self.next(Some(deadline)).await {
                Wake::Exit(exit) => {
                    self.record_exit(exit);
                }
                Wake::Timer => {
                    for pid in self.running_pids() {
                        process::signal_group(pid, libc::SIGKILL);
                    }
                    if killed {
                        self.log("containers did not exit after SIGKILL");
                        break;
                    }
                    killed = true;
                    deadline = Instant::now() + Duration::from_secs(10);
                }
                Wake::Gone => return false,
                Wake::Deleting | Wake::Updated => {
                    let shorter = Instant::now() + self.grace_period();
                    if !killed && shorter < deadline {
                        deadline = shorter;
                    }
                }
            }
        }
        for record in self.init.iter_mut().chain(self.main.iter_mut()) {
            record.start_at = None;
        }
        true
    }

    fn grace_period(&self) -> Duration {
        let seconds = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(DEFAULT_GRACE_SECONDS);
        Duration::from_secs(seconds.max(0) as u64)
    }

    /// Waits `delay` (container exits are recorded meanwhile, not reported).
    async fn pause(&mut self, delay: Duration) -> Paused {
        let until = Instant::now() + delay;
        let mut deleting = false;
        loop {
            match self.next(Some(until)).await {
                Wake::Timer => return if deleting { Paused::Deleting } else { Paused::Done },
                Wake::Gone => return Paused::Gone,
                Wake::Deleting => deleting = true,
                Wake::Exit(exit) => {
                    self.record_exit(exit);
                }
                Wake::Updated => {}
            }
        }
    }

    /// The pod is being deleted: stop it, report its final phase, remove it.
    async fn finish(&mut self) {
        self.log("deleting");
        match faults::stop_delay(&self.pod) {
            Some(StopDelay::Never) => {
                // An unreachable node: nothing is stopped or reported until the pod object is gone.
                self.log("unreachable: the deletion is not acted upon");
                while !matches!(self.next(None).await, Wake::Gone) {}
                return;
            }
            Some(StopDelay::After(delay)) => {
                self.log(format!("slow node: acting on the deletion in {delay:?}"));
                if let Paused::Gone = self.pause(delay).await {
                    return;
                }
            }
            None => {}
        }
        if !self.stop_containers(self.grace_period()).await {
            return;
        }
        if !matches!(self.phase, "Succeeded" | "Failed") {
            let all_succeeded = self.main.iter().all(|r| r.exit_code() == Some(0));
            self.phase = if all_succeeded { "Succeeded" } else { "Failed" };
        }
        self.report().await;
        self.await_removal().await;
    }

    /// `spec.activeDeadlineSeconds` of the pod passed.
    async fn exceed_deadline(&mut self) {
        self.log("active deadline exceeded");
        self.phase = "Failed";
        self.reason = Some("DeadlineExceeded".into());
        self.message = Some("Pod was active on the node longer than the specified deadline".into());
        self.event("Normal", "DeadlineExceeded", self.message.clone().unwrap_or_default().as_str()).await;
        if !self.stop_containers(self.grace_period()).await {
            return;
        }
        self.report().await;
        self.await_removal().await;
    }

    /// Waits until the pod is gone, deleting it for good once it is being deleted.
    async fn await_removal(&mut self) {
        loop {
            if self.pod.metadata.deletion_timestamp.is_some() && !self.delete_requested {
                self.delete_requested = true;
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(self.uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match self.api.delete(&self.name, &params).await {
                    Ok(_) => self.log("deleted"),
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                    Err(e) => self.log(format!("delete failed: {e}")),
                }
            }
            if let Wake::Gone = self.next(None).await {
                return;
            }
        }
    }

    /// Images from `fail.invalid/` never pull: ErrImagePull, then ImagePullBackOff.
    async fn fail_image_pull(&mut self, index: usize) {
        let (kind, i) =
            if index < self.main.len() { (Kind::Main, index) } else { (Kind::Init, index - self.main.len()) };
        let image = self.record_mut(kind, i).spec.image.clone().unwrap_or_default();
        let container = self.record_mut(kind, i).spec.name.clone();
        let error = format!(
            "failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": \
             {FAILING_REGISTRY} is the test kubelet's unreachable registry"
        );
        self.record_mut(kind, i).state = waiting("ErrImagePull", Some(error.clone()));
        self.state.logs.set_waiting(&self.namespace, &self.name, &container, "ErrImagePull");
        self.event("Warning", "Failed", &format!("Failed to pull image \"{image}\": {error}")).await;
        self.report().await;
        match self.next(Some(Instant::now() + IMAGE_PULL_BACKOFF_AFTER)).await {
            Wake::Gone => return,
            Wake::Deleting => return self.finish().await,
            _ => {}
        }
        self.record_mut(kind, i).state = waiting(
            "ImagePullBackOff",
            Some(format!("Back-off pulling image \"{image}\": ErrImagePull: {error}")),
        );
        self.state.logs.set_waiting(&self.namespace, &self.name, &container, "ImagePullBackOff");
        self.event("Normal", "BackOff", &format!("Back-off pulling image \"{image}\"")).await;
        self.report().await;
        loop {
            match self.next(None).await {
                Wake::Gone => return,
                Wake::Deleting => return self.finish().await,
                _ => {}
            }
        }
    }

    fn set_condition(
        &mut self,
        type_: &'static str,
        status: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) {
        let status = if status { "True" } else { "False" }.to_string();
        let changed = self.conditions.get(type_).is_none_or(|c| c.status != status);
        let since = match self.conditions.get(type_) {
            Some(c) if !changed => c.last_transition_time.clone(),
            _ => Some(now()),
        };
        self.conditions.insert(
            type_,
            PodCondition {
                type_: type_.into(),
                status,
                reason: reason.map(str::to_string),
                message,
                last_transition_time: since,
                observed_generation: self.pod.metadata.generation,
                ..Default::default()
            },
        );
    }

    fn update_conditions(&mut self) {
        let terminal = matches!(self.phase, "Succeeded" | "Failed");
        self.set_condition("PodScheduled", true, None, None);
        self.set_condition("PodReadyToStartContainers", self.volumes.is_some(), None, None);
        let initialized = self.init.iter().all(|r| r.exit_code() == Some(0));
        if initialized {
            self.set_condition("Initialized", true, None, None);
        } else {
            let pending: Vec<&str> =
                self.init.iter().filter(|r| r.exit_code() != Some(0)).map(|r| r.spec.name.as_str()).collect();
            let message = format!("containers with incomplete status: [{}]", pending.join(" "));
            self.set_condition("Initialized", false, Some("ContainersNotInitialized"), Some(message));
        }
        let unready: Vec<String> =
            self.main.iter().filter(|r| r.state.running.is_none()).map(|r| r.spec.name.clone()).collect();
        for type_ in ["ContainersReady", "Ready"] {
            if terminal {
                self.set_condition(type_, false, Some("PodCompleted"), None);
            } else if unready.is_empty() {
                self.set_condition(type_, true, None, None);
            } else {
                let message = format!("containers with unready status: [{}]", unready.join(" "));
                self.set_condition(type_, false, Some("ContainersNotReady"), Some(message));
            }
        }
        if !terminal && self.main.iter().any(|r| r.state.running.is_some()) {
            self.phase = "Running";
        }
    }

    fn status(&self) -> PodStatus {
        PodStatus {
            phase: Some(self.phase.into()),
            reason: self.reason.clone(),
            message: self.message.clone(),
            host_ip: Some("127.0.0.1".into()),
            host_ips: Some(vec![HostIP { ip: "127.0.0.1".into() }]),
            pod_ip: Some("127.0.0.1".into()),
            pod_ips: Some(vec![PodIP { ip: "127.0.0.1".into() }]),
            start_time: Some(self.start_time.clone()),
            conditions: Some(self.conditions.values().cloned().collect()),
            init_container_statuses: (!self.init.is_empty())
                .then(|| self.init.iter().map(Record::status).collect()),
            container_statuses: Some(self.main.iter().map(Record::status).collect()),
            observed_generation: self.pod.metadata.generation,
            ..Default::default()
        }
    }

    async fn report(&mut self) {
        self.update_conditions();
        let mut status = serde_json::to_value(self.status()).unwrap_or_default();
        // Explicit nulls, so the merge patch clears a condition's stale reason and message.
        let conditions = status["conditions"].as_array_mut().into_iter().flatten();
        for condition in conditions.filter_map(|c| c.as_object_mut()) {
            for key in ["reason", "message"] {
                condition.entry(key).or_insert(serde_json::Value::Null);
            }
        }
        let patch = json!({
            "metadata": { "uid": self.uid },
            "status": status,
        });
        // As a kubelet does, keep reporting through an API server outage (a status lost there
        // would leave the pod Running for ever); an answer from the server is final.
        for attempt in 0..STATUS_RETRIES {
            match self
                .api
                .patch_status(&self.name, &PatchParams::default(), &Patch::Strategic(patch.clone()))
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return,
                Err(kube::Error::Api(e)) => return self.log(format!("status update refused: {e}")),
                Err(e) => {
                    if attempt == 0 {
                        self.log(format!("status update failed, retrying: {e}"));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.log("status update failed: giving up");
    }

    async fn event(&self, type_: &str, reason: &str, message: &str) {
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", self.name)),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                uid: Some(self.uid.clone()),
                ..Default::default()
            },
            type_: Some(type_.into()),
            reason: Some(reason.into()),
            message: Some(message.into()),
            count: Some(1),
            first_timestamp: Some(now()),
            last_timestamp: Some(now()),
            source: Some(EventSource {
                component: Some("kubelet".into()),
                host: Some(self.state.node_name.clone()),
            }),
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(self.state.node_name.clone()),
            ..Default::default()
        };
        let events = Api::<Event>::namespaced(self.state.client.clone(), &self.namespace);
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            self.log(format!("event {reason} not recorded: {e}"));
        }
    }

    fn log(&self, message: impl AsRef<str>) {
        self.state.log(format!("pod {}/{} ({}): {}", self.namespace, self.name, self.uid, message.as_ref()));
    }
}

enum LaunchError {
    Config(String),
    Start(String),
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting { reason: Some(reason.into()), message }),
        ..Default::default()
    }
}
