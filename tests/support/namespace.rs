//! A fresh namespace per test, dumped when the test fails.

use std::fmt::{self, Write as _};
use std::fs;
use std::path::PathBuf;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Client, Config};
use serde::de::DeserializeOwned;

use super::process;

const DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Above this many custom resources of a kind, the dump shows one line per object, not its YAML
/// (a soak leaves hundreds).
const FULL_OBJECTS: usize = 20;
/// The dump shows the newest events only, at most this many.
const EVENTS: usize = 300;

/// A namespace created for one test. Derefs to its name.
///
/// When dropped while the test panics, it prints a dump of the namespace
/// (pods, jobs, events, config maps, custom resources) and the log files of the
/// control plane, and keeps the control plane's directory.
pub struct TestNamespace {
    name: String,
    config: Config,
    log_files: Vec<PathBuf>,
}

impl TestNamespace {
    pub(crate) fn new(name: String, config: Config, log_files: Vec<PathBuf>) -> Self {
        Self { name, config, log_files }
    }

    #[allow(dead_code)] // most tests use the `Deref` to `str`
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh client (call inside the test's runtime).
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("build a kube client")
    }

    /// A namespaced `Api` for this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client(), &self.name)
    }

    /// Prints the namespace's objects and the control plane's log files.
    #[allow(dead_code)] // for tests that want a dump without failing
    pub async fn dump(&self) {
        eprintln!("{}", dump(&self.client(), &self.name, &self.log_files).await);
    }
}

impl std::ops::Deref for TestNamespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for TestNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        process::keep_dirs();
        // Drop cannot await, and the test's runtime is unwinding: dump from a
        // thread with its own runtime.
        let config = self.config.clone();
        let name = self.name.clone();
        let logs = self.log_files.clone();
        let dumped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for the namespace dump");
            runtime.block_on(async move {
                let client = match Client::try_from(config) {
                    Ok(client) => client,
                    Err(e) => return format!("cannot dump namespace {name}: {e}"),
                };
                // The control plane may be what broke: do not hang the failing test.
                tokio::time::timeout(DUMP_TIMEOUT, dump(&client, &name, &logs))
                    .await
                    .unwrap_or_else(|_| format!("dump of namespace {name} timed out; logs: {logs:?}"))
            })
        })
        .join();
        if let Ok(text) = dumped {
            eprintln!("{text}");
        }
    }
}

/// A readable summary of a namespace, for failure messages.
pub async fn dump(client: &Client, ns: &str, log_files: &[PathBuf]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n========== dump of namespace {ns} ==========");

    let _ = writeln!(out, "--- pods");
    for pod in list::<Pod>(client, ns, &mut out).await {
        let status = pod.status.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{} phase={} node={} deleting={} reason={} message={}",
            name_of(&pod.metadata),
            status.phase.as_deref().unwrap_or("-"),
            spec.node_name.as_deref().unwrap_or("-"),
            pod.metadata.deletion_timestamp.is_some(),
            status.reason.as_deref().unwrap_or("-"),
            status.message.as_deref().unwrap_or("-"),
        );
        for c in &spec.containers {
            let _ = writeln!(
                out,
                "  container {} image={} command={:?} args={:?}",
                c.name,
                c.image.as_deref().unwrap_or("-"),
                c.command.as_deref().unwrap_or_default(),
                c.args.as_deref().unwrap_or_default()
            );
        }
        for cs in status.init_container_statuses.iter().chain(status.container_statuses.iter()).flatten() {
            let _ = writeln!(
                out,
                "  status {} ready={} restarts={} state={}",
                cs.name,
                cs.ready,
                cs.restart_count,
                serde_json::to_string(&cs.state).unwrap_or_default()
            );
        }
    }

    let _ = writeln!(out, "--- jobs");
    for job in list::<Job>(client, ns, &mut out).await {
        let status = job.status.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{} active={} succeeded={} failed={} deleting={}",
            name_of(&job.metadata),
            status.active.unwrap_or(0),
            status.succeeded.unwrap_or(0),
            status.failed.unwrap_or(0),
            job.metadata.deletion_timestamp.is_some(),
        );
        for c in status.conditions.iter().flatten() {
            let _ = writeln!(
                out,
                "  condition {}={} reason={} message={}",
                c.type_,
                c.status,
                c.reason.as_deref().unwrap_or("-"),
                c.message.as_deref().unwrap_or("-")
            );
        }
    }

    let _ = writeln!(out, "--- config maps");
    let names: Vec<String> =
        list::<ConfigMap>(client, ns, &mut out).await.iter().map(|cm| name_of(&cm.metadata)).collect();
    let _ = writeln!(out, "{}", names.join(" "));

    dump_custom_resources(client, ns, &mut out).await;

    let _ = writeln!(out, "--- events");
    let mut events = list::<Event>(client, ns, &mut out).await;
    events.sort_by_key(|e| e.metadata.creation_timestamp.clone());
    if events.len() > EVENTS {
        let _ = writeln!(out, "({} older events left out)", events.len() - EVENTS);
        events.drain(..events.len() - EVENTS);
    }
    for e in events {
        let _ = writeln!(
            out,
            "{} {} {}/{}: {} (x{})",
            e.type_.as_deref().unwrap_or("-"),
            e.reason.as_deref().unwrap_or("-"),
            e.involved_object.kind.as_deref().unwrap_or("-"),
            e.involved_object.name.as_deref().unwrap_or("-"),
            e.message.as_deref().unwrap_or("-"),
            e.count.unwrap_or(1)
        );
    }

    let _ = writeln!(out, "--- control plane logs");
    for path in log_files {
        let _ = writeln!(out, "{}", path.display());
        if path.file_name().is_some_and(|n| n == "kubelet.log") {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(ns)).collect();
            for line in &lines[lines.len().saturating_sub(40)..] {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    if process::dirs_kept() {
        let _ = writeln!(out, "(the control plane's directory is kept after the run)");
    }
    let _ = writeln!(out, "========== end of dump of namespace {ns} ==========");
    out
}

async fn list<K>(client: &Client, ns: &str, out: &mut String) -> Vec<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    match Api::<K>::namespaced(client.clone(), ns).list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            let _ = writeln!(out, "(cannot list: {e})");
            Vec::new()
        }
    }
}

async fn dump_custom_resources(client: &Client, ns: &str, out: &mut String) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    for crd in crds {
        if crd.spec.scope != "Namespaced" {
            continue;
        }
        let Some(version) = crd.spec.versions.iter().find(|v| v.storage) else {
            continue;
        };
        let gvk = GroupVersionKind::gvk(&crd.spec.group, &version.name, &crd.spec.names.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural);
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource);
        let Ok(list) = api.list(&ListParams::default()).await else {
            continue;
        };
        if list.items.is_empty() {
            continue;
        }
        let _ = writeln!(out, "--- {}", crd.spec.names.plural);
        if list.items.len() > FULL_OBJECTS {
            for object in &list.items {
                let status = object.data.get("status");
                let field =
                    |key: &str| status.and_then(|s| s.get(key)).and_then(|v| v.as_str()).unwrap_or("-");
                let _ = writeln!(
                    out,
                    "{} phase={} reason={} deleting={} finalizers={:?}",
                    name_of(&object.metadata),
                    field("phase"),
                    field("reason"),
                    object.metadata.deletion_timestamp.is_some(),
                    object.metadata.finalizers.as_deref().unwrap_or_default(),
                );
            }
            continue;
        }
        for mut object in list.items {
            object.metadata.managed_fields = None;
            let _ = writeln!(out, "{}", serde_yaml::to_string(&object).unwrap_or_default());
        }
    }
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}
