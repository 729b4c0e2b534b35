//! Packaging: the Helm chart, the plain manifests of `deploy/` and the image's Dockerfile.
//!
//! Rendered with the real helm and applied to the real control plane: server-side dry runs for
//! every manifest, a real `helm install` / `upgrade` / `uninstall` (the image comes from the test
//! kubelet's unreachable registry, so pods are admitted but never run), a `helm install` whose pods
//! run on the test kubelet (`image.binary` set to the binary under test, in-cluster config) and
//! complete a run started through the API, and the chart's RBAC proven by running the binary as the
//! chart's service accounts, with the chart's own arguments.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::api::{Api, ListParams, PostParams};
use notebook_operator::schedule::NotebookSchedule;
use notebook_operator::{NotebookRun, Reason, RunPhase};
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use support::{ControlPlane, FAILING_REGISTRY, from_json, ipynb, process, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_notebook-operator");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/notebook-operator");
/// Where deploy/Dockerfile puts the binary, and what the chart's containers run.
const BINARY_IN_IMAGE: &str = "/usr/local/bin/notebook-operator";
const RELEASE: &str = "nbo";
const FULLNAME: &str = "nbo-notebook-operator";
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

// === harness ===

/// `helm` with its cache and config in a private folder, talking to the control plane.
fn helm(cp: &ControlPlane) -> Command {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    let home = HOME.get_or_init(|| {
        let dir =
            tempfile::Builder::new().prefix("notebook-operator-helm-").tempdir().expect("tempdir").keep();
        process::remove_at_exit(dir.clone());
        dir
    });
    let mut cmd = Command::new(cp.binary("helm"));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", cp.kubeconfig());
    cmd
}

fn output(cmd: &mut Command, stdin: Option<&str>) -> Output {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

/// Runs `cmd` and returns its stdout; panics with its stderr when it fails.
fn succeed(cmd: &mut Command, stdin: Option<&str>) -> String {
    let out = output(cmd, stdin);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The CRD, installed once per test binary.
fn install_crd(cp: &ControlPlane) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (file, crd) in [
            ("notebookrun.yaml", "crd/notebookruns.notebooks.dev"),
            ("notebookschedule.yaml", "crd/notebookschedules.notebooks.dev"),
        ] {
            let path = format!("{REPO}/crds/{file}");
            succeed(cp.kubectl().args(["apply", "--server-side", "-f", &path]), None);
            succeed(cp.kubectl().args(["wait", "--for=condition=Established", "--timeout=60s", crd]), None);
        }
    });
}

/// Labels a namespace so that the API server checks pods (enforce) and pod templates (warn)
/// against the `restricted` Pod Security Standard.
fn restrict(cp: &ControlPlane, ns: &str) {
    succeed(
        cp.kubectl().args([
            "label",
            "namespace",
            ns,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/warn=restricted",
        ]),
        None,
    );
}

/// The documents of a multi-document YAML stream, as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            let value = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("invalid YAML: {e}"));
            serde_json::to_value(value).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Rendered manifests.
struct Manifests {
    yaml: String,
    docs: Vec<Value>,
}

impl Manifests {
    fn parse(yaml: String) -> Self {
        let docs = documents(&yaml);
        Self { yaml, docs }
    }

    fn kinds(&self) -> BTreeSet<(String, String)> {
        self.docs.iter().map(|d| (str_at(d, "/kind"), str_at(d, "/metadata/name"))).collect()
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn get<K: DeserializeOwned>(&self, kind: &str, name: &str) -> K {
        let doc = self.find(kind, name).unwrap_or_else(|| panic!("no {kind} {name} in {:?}", self.kinds()));
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    /// The documents for which `keep` holds, as one YAML stream.
    fn select(&self, keep: impl Fn(&Value) -> bool) -> String {
        self.docs
            .iter()
            .filter(|d| keep(d))
            .map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("YAML")))
            .collect()
    }
}

fn str_at(v: &Value, pointer: &str) -> String {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_string()
}

/// `helm template` arguments: each `key=value` becomes `--set key=value`; `--flag=...` passes as is.
fn helm_values(values: &[&str]) -> Vec<String> {
    values
        .iter()
        .flat_map(
            |v| if v.starts_with("--") { vec![v.to_string()] } else { vec!["--set".into(), v.to_string()] },
        )
        .collect()
}

fn try_render(cp: &ControlPlane, ns: &str, values: &[&str]) -> Output {
    output(helm(cp).args(["template", RELEASE, CHART, "--namespace", ns]).args(helm_values(values)), None)
}

/// `helm template` of the chart as release `nbo` in `ns`.
fn render(cp: &ControlPlane, ns: &str, values: &[&str]) -> Manifests {
    let out = try_render(cp, ns, values);
    assert!(out.status.success(), "helm template {values:?}:\n{}", stderr_of(&out));
    Manifests::parse(String::from_utf8(out.stdout).expect("utf-8"))
}

/// `kubectl apply --dry-run=server` of a YAML stream; returns stderr (warnings).
fn dry_run(cp: &ControlPlane, ns: &str, yaml: &str) -> String {
    let out = output(cp.kubectl().args(["apply", "--dry-run=server", "-n", ns, "-f", "-"]), Some(yaml));
    assert!(out.status.success(), "server-side dry run refused:\n{}", stderr_of(&out));
    stderr_of(&out)
}

fn container<'a>(deployment: &'a Deployment, name: &str) -> &'a Container {
    let spec = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    spec.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

fn args_of(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

fn arg_value(c: &Container, flag: &str) -> Option<String> {
    args_of(c).iter().find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_string))
}

fn rules(m: &Manifests, kind: &str, name: &str) -> Vec<PolicyRule> {
    let doc = m.find(kind, name).unwrap_or_else(|| panic!("no {kind} {name}"));
    serde_json::from_value(doc["rules"].clone()).expect("rules")
}

/// Every (group, resource, verb) a set of rules grants.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn grant(group: &str, resource: &str, verbs: &[&str]) -> Vec<(String, String, String)> {
    verbs.iter().map(|v| (group.to_string(), resource.to_string(), v.to_string())).collect()
}

// === the chart, rendered ===

#[test]
fn chart_lints_and_tracks_the_repository() {
    let cp = ControlPlane::shared();
    let out = succeed(helm(cp).args(["lint", "--strict", CHART]), None);
    assert!(out.contains("0 chart(s) failed"), "{out}");

    let chart_crd = fs::read_to_string(format!("{CHART}/crds/notebookrun.yaml")).expect("chart CRD");
    let crd = fs::read_to_string(format!("{REPO}/crds/notebookrun.yaml")).expect("repository CRD");
    assert!(
        chart_crd == crd,
        "charts/notebook-operator/crds/notebookrun.yaml drifted: cp crds/notebookrun.yaml charts/notebook-operator/crds/"
    );
    let chart_crd = fs::read_to_string(format!("{CHART}/crds/notebookschedule.yaml")).expect("chart CRD");
    let crd = fs::read_to_string(format!("{REPO}/crds/notebookschedule.yaml")).expect("repository CRD");
    assert!(
        chart_crd == crd,
        "charts/notebook-operator/crds/notebookschedule.yaml drifted: cp crds/notebookschedule.yaml charts/notebook-operator/crds/"
    );
    let chart_nb = fs::read_to_string(format!("{CHART}/files/hello.ipynb")).expect("chart notebook");
    let nb = fs::read_to_string(format!("{REPO}/notebooks/hello.ipynb")).expect("hello notebook");
    assert!(chart_nb == nb, "charts/notebook-operator/files/hello.ipynb drifted from notebooks/hello.ipynb");

    let chart: Value =
        serde_yaml::from_str(&fs::read_to_string(format!("{CHART}/Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"), "Chart appVersion follows Cargo.toml");
}

#[tokio::test]
async fn default_render_is_namespaced_and_locked_down() {
    let cp = ControlPlane::shared();
    let m = render(cp, "team-a", &[]);
    let expected: BTreeSet<(String, String)> = [
        ("ServiceAccount", "nbo-notebook-operator-controller"),
        ("ServiceAccount", "nbo-notebook-operator-api"),
        ("Role", "nbo-notebook-operator-controller"),
        ("RoleBinding", "nbo-notebook-operator-controller"),
        ("Role", "nbo-notebook-operator-controller-election"),
        ("RoleBinding", "nbo-notebook-operator-controller-election"),
        ("PodDisruptionBudget", "nbo-notebook-operator-controller"),
        ("Role", "nbo-notebook-operator-api"),
        ("RoleBinding", "nbo-notebook-operator-api"),
        ("Deployment", "nbo-notebook-operator-controller"),
        ("Deployment", "nbo-notebook-operator-api"),
        ("Service", "nbo-notebook-operator-controller"),
        ("Service", "nbo-notebook-operator-api"),
        ("Secret", "nbo-notebook-operator-api-token"),
        ("ConfigMap", "nbo-notebook-operator-notebook"),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(
        m.kinds(),
        expected,
        "no cluster-scoped object, no NetworkPolicy or ServiceMonitor by default"
    );
    for doc in &m.docs {
        assert_eq!(doc["metadata"]["namespace"], "team-a", "{}", doc["metadata"]["name"]);
    }

    for (name, component, port) in [
        ("nbo-notebook-operator-controller", "controller", "metrics"),
        ("nbo-notebook-operator-api", "api", "http"),
    ] {
        let d: Deployment = m.get("Deployment", name);
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().expect("pod securityContext");
        assert_eq!(psc.run_as_non_root, Some(true), "{name}");
        assert_eq!(psc.run_as_user, Some(65532), "{name}: the image's USER");
        assert_eq!(psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"), "{name}");
        assert_eq!(pod.containers.len(), 1);
        let c = container(&d, component);
        let sc = c.security_context.as_ref().expect("container securityContext");
        assert_eq!(sc.run_as_non_root, Some(true), "{name}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{name}");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{name}");
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()]),
            "{name}"
        );
        assert_eq!(sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"), "{name}");
        assert_eq!(
            c.image.as_deref(),
            Some(format!("notebook-operator:{}", env!("CARGO_PKG_VERSION")).as_str())
        );
        assert_eq!(c.command.clone().unwrap(), vec![BINARY_IN_IMAGE.to_string(), component.to_string()]);
        let res = c.resources.as_ref().expect("resources");
        assert!(
            res.requests.as_ref().is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
            "{name}"
        );
        assert!(res.limits.as_ref().is_some_and(|r| r.contains_key("memory")), "{name}");
        let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            let get = p.as_ref().and_then(|p| p.http_get.as_ref()).expect("httpGet probe");
            (get.path.clone().unwrap_or_default(), serde_json::to_value(&get.port).unwrap())
        };
        assert_eq!(probe_path(&c.readiness_probe), ("/readyz".to_string(), json!(port)), "{name}");
        assert_eq!(probe_path(&c.liveness_probe), ("/healthz".to_string(), json!(port)), "{name}");
        assert_eq!(arg_value(c, "--namespace").as_deref(), Some("team-a"), "{name}");
    }

    let controller: Deployment = m.get("Deployment", "nbo-notebook-operator-controller");
    let spec = controller.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2), "a leader and a standby");
    assert_eq!(spec.strategy.as_ref().and_then(|s| s.type_.as_deref()), Some("RollingUpdate"));
    let c = container(&controller, "controller");
    assert!(c.args.iter().flatten().any(|a| a == "--leader-elect"), "only the elected leader reconciles");
    assert_eq!(arg_value(c, "--leader-election-namespace").as_deref(), Some("team-a"));
    let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget =
        m.get("PodDisruptionBudget", "nbo-notebook-operator-controller");
    assert_eq!(
        pdb.spec.unwrap().min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let election: k8s_openapi::api::rbac::v1::Role =
        m.get("Role", "nbo-notebook-operator-controller-election");
    assert_eq!(
        election.metadata.namespace.as_deref(),
        Some("team-a"),
        "the election Lease in its own namespace only"
    );
    assert_eq!(arg_value(c, "--listen").as_deref(), Some("0.0.0.0:8081"));
    let pod_name = c.env.iter().flatten().find(|e| e.name == "POD_NAME").expect("POD_NAME");
    assert_eq!(
        pod_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str()),
        Some("metadata.name")
    );

    let api: Deployment = m.get("Deployment", "nbo-notebook-operator-api");
    let c = container(&api, "api");
    assert_eq!(arg_value(c, "--listen").as_deref(), Some("0.0.0.0:8000"), "reachable through its Service");
    assert_eq!(
        arg_value(c, "--notebook-configmap").as_deref(),
        Some("nbo-notebook-operator-notebook/notebook.ipynb")
    );
    assert_eq!(arg_value(c, "--lock").as_deref(), Some("notebook-run"));
    assert_eq!(token_file_secret(&api), ("nbo-notebook-operator-api-token".to_string(), "token".to_string()));

    let cm = m.find("ConfigMap", "nbo-notebook-operator-notebook").unwrap();
    let nb: Value = serde_json::from_str(cm["data"]["notebook.ipynb"].as_str().unwrap()).expect("ipynb");
    assert_eq!(nb, hello_notebook(), "the default notebook is notebooks/hello.ipynb");

    let token = token_of(&m);
    assert_eq!(token.len(), 48, "a generated token: {token:?}");
    assert_ne!(
        token_of(&render(cp, "team-a", &[])),
        token,
        "each install without a Secret gets its own token"
    );

    let api_grants = grants(&rules(&m, "Role", "nbo-notebook-operator-api"));
    for (group, resource) in [("coordination.k8s.io", "leases"), ("batch", "jobs"), ("", "secrets")] {
        assert!(
            !api_grants.iter().any(|(g, r, _)| g == group && r == resource),
            "the API gets no {resource}: {api_grants:?}"
        );
    }
    let controller_grants = grants(&rules(&m, "Role", "nbo-notebook-operator-controller"));
    // Webhook URLs (spec.notify) are read by name; Secrets are never listed or watched.
    let secret_verbs: Vec<&str> =
        controller_grants.iter().filter(|(_, r, _)| r == "secrets").map(|(_, _, v)| v.as_str()).collect();
    assert_eq!(secret_verbs, ["get"], "the controller only gets Secrets by name");
    let needed: Vec<_> = [
        grant("events.k8s.io", "events", &["create", "patch"]),
        grant("", "events", &["create", "patch"]),
        grant("coordination.k8s.io", "leases", &["create", "delete"]),
        grant("batch", "jobs", &["create", "delete", "watch"]),
        grant("notebooks.dev", "notebookruns/status", &["patch"]),
        grant("notebooks.dev", "notebookschedules", &["get", "list", "watch"]),
        grant("notebooks.dev", "notebookschedules/status", &["patch"]),
        grant("notebooks.dev", "notebookruns", &["create"]),
    ]
    .concat();
    for g in needed {
        assert!(controller_grants.contains(&g), "controller misses {g:?}");
    }
    // The controller never edits a schedule's spec; the API suspends and resumes (patch) only.
    let schedule_verbs = |grants: &BTreeSet<(String, String, String)>| -> Vec<String> {
        grants.iter().filter(|(_, r, _)| r == "notebookschedules").map(|(_, _, v)| v.clone()).collect()
    };
    assert_eq!(schedule_verbs(&controller_grants), ["get", "list", "watch"]);
    assert_eq!(schedule_verbs(&api_grants), ["get", "list", "patch"]);
}

/// The Secret the API's `--token-file` points into: (secret name, key).
fn token_file_secret(api: &Deployment) -> (String, String) {
    let c = container(api, "api");
    let file = arg_value(c, "--token-file").expect("--token-file");
    let pod = api.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    for mount in c.volume_mounts.iter().flatten() {
        let Some(rest) = file.strip_prefix(&format!("{}/", mount.mount_path)) else { continue };
        let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("volume");
        let secret = volume.secret.as_ref().expect("a secret volume");
        let item = secret.items.iter().flatten().find(|i| i.path == rest).expect("the token item");
        return (secret.secret_name.clone().unwrap(), item.key.clone());
    }
    panic!("--token-file={file} is in no volume mount");
}

fn token_of(m: &Manifests) -> String {
    let secret: Secret = m.get("Secret", "nbo-notebook-operator-api-token");
    String::from_utf8(secret.data.expect("data")["token"].0.clone()).expect("utf-8 token")
}

fn hello_notebook() -> Value {
    serde_json::from_str(&fs::read_to_string(format!("{REPO}/notebooks/hello.ipynb")).unwrap()).unwrap()
}

#[tokio::test]
async fn non_default_values_render_what_they_say() {
    let cp = ControlPlane::shared();
    let notebook = format!("{REPO}/notebooks/failing.ipynb");
    let m = render(
        cp,
        "ops",
        &[
            "watchAllNamespaces=true",
            "image.repository=registry.example.com/notebook-operator",
            "image.tag=1.2.3",
            "image.binary=/opt/nbo/notebook-operator",
            "api.replicas=3",
            "api.image=quay.io/jupyter/scipy-notebook:2025-01-01",
            "api.lock=reports",
            "api.auth.existingSecret=my-token",
            &format!("--set-file=api.notebook.content={notebook}"),
            "networkPolicy.enabled=true",
            "networkPolicy.apiFrom[0].podSelector.matchLabels.role=client",
            "serviceMonitor.enabled=true",
            "controller.progressInterval=500ms",
            "controller.notifyRetryFor=1h",
            "controller.notifyAttemptTimeout=30s",
            "controller.runnerImagePullPolicy=Never",
            "controller.defaultResources.limits.memory=2Gi",
            "controller.defaultResources.requests.cpu=500m",
            "publicUrl=https://notebooks.example.com",
            "logFormat=text",
        ],
    );
    let kinds = m.kinds();
    for (kind, name) in [
        ("ClusterRole", "nbo-notebook-operator-controller"),
        ("ClusterRoleBinding", "nbo-notebook-operator-controller"),
        ("NetworkPolicy", "nbo-notebook-operator-controller"),
        ("NetworkPolicy", "nbo-notebook-operator-api"),
        ("NetworkPolicy", "nbo-notebook-operator-runs"),
        ("ServiceMonitor", "nbo-notebook-operator-controller"),
        ("ServiceMonitor", "nbo-notebook-operator-api"),
        ("Role", "nbo-notebook-operator-api"),
    ] {
        assert!(kinds.contains(&(kind.to_string(), name.to_string())), "no {kind} {name}: {kinds:?}");
    }
    assert!(
        m.find("Role", "nbo-notebook-operator-controller").is_none(),
        "cluster-wide: no namespaced controller Role"
    );
    assert!(m.of_kind("Secret").is_empty(), "an existing Secret: none generated");

    // The same rules, cluster-wide.
    let namespaced = render(cp, "ops", &[]);
    assert_eq!(
        grants(&rules(&m, "ClusterRole", "nbo-notebook-operator-controller")),
        grants(&rules(&namespaced, "Role", "nbo-notebook-operator-controller"))
    );
    let binding = m.find("ClusterRoleBinding", "nbo-notebook-operator-controller").unwrap();
    assert_eq!(
        binding["subjects"][0],
        json!({"kind": "ServiceAccount", "name": "nbo-notebook-operator-controller", "namespace": "ops"})
    );

    let controller: Deployment = m.get("Deployment", "nbo-notebook-operator-controller");
    let c = container(&controller, "controller");
    assert_eq!(arg_value(c, "--namespace"), None, "every namespace");
    assert_eq!(arg_value(c, "--progress-interval").as_deref(), Some("500ms"));
    assert_eq!(arg_value(c, "--notify-retry-for").as_deref(), Some("1h"));
    assert_eq!(arg_value(c, "--notify-attempt-timeout").as_deref(), Some("30s"));
    assert_eq!(arg_value(c, "--image-pull-policy").as_deref(), Some("Never"));
    let resources: Value =
        serde_json::from_str(&arg_value(c, "--default-resources").expect("--default-resources"))
            .expect("--default-resources is JSON");
    assert_eq!(resources, json!({"limits": {"memory": "2Gi"}, "requests": {"cpu": "500m"}}));
    assert_eq!(arg_value(c, "--public-url").as_deref(), Some("https://notebooks.example.com"));
    assert_eq!(c.image.as_deref(), Some("registry.example.com/notebook-operator:1.2.3"));
    assert_eq!(c.command.clone().unwrap(), ["/opt/nbo/notebook-operator", "controller"]);
    assert!(c.env.iter().flatten().any(|e| e.name == "LOG_FORMAT" && e.value.as_deref() == Some("text")));

    let api: Deployment = m.get("Deployment", "nbo-notebook-operator-api");
    assert_eq!(api.spec.as_ref().unwrap().replicas, Some(3));
    let c = container(&api, "api");
    assert_eq!(c.command.clone().unwrap(), ["/opt/nbo/notebook-operator", "api"]);
    assert_eq!(arg_value(c, "--image").as_deref(), Some("quay.io/jupyter/scipy-notebook:2025-01-01"));
    assert_eq!(arg_value(c, "--lock").as_deref(), Some("reports"));
    assert_eq!(token_file_secret(&api).0, "my-token");
    let cm = m.find("ConfigMap", "nbo-notebook-operator-notebook").unwrap();
    let content: Value = serde_json::from_str(cm["data"]["notebook.ipynb"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(&fs::read_to_string(&notebook).unwrap()).unwrap();
    assert_eq!(content, file, "--set-file api.notebook.content");

    let policy = m.find("NetworkPolicy", "nbo-notebook-operator-api").unwrap();
    assert_eq!(
        policy["spec"]["ingress"][0]["from"],
        json!([{"podSelector": {"matchLabels": {"role": "client"}}}])
    );
    let runs = m.find("NetworkPolicy", "nbo-notebook-operator-runs").unwrap();
    assert_eq!(runs["spec"]["ingress"], json!([]), "notebook pods accept nothing");

    // The other notebook sources, and the API switched off.
    let path = render(cp, "ops", &["api.notebook.path=/opt/report.ipynb"]);
    let c = container_of(&path, "nbo-notebook-operator-api", "api");
    assert_eq!(arg_value(&c, "--notebook-path").as_deref(), Some("/opt/report.ipynb"));
    assert!(path.of_kind("ConfigMap").is_empty());
    let existing = render(cp, "ops", &["api.notebook.configMap=reports/daily.ipynb"]);
    let c = container_of(&existing, "nbo-notebook-operator-api", "api");
    assert_eq!(arg_value(&c, "--notebook-configmap").as_deref(), Some("reports/daily.ipynb"));
    assert!(existing.of_kind("ConfigMap").is_empty());
    let no_auth = render(cp, "ops", &["api.auth.enabled=false"]);
    let c = container_of(&no_auth, "nbo-notebook-operator-api", "api");
    assert_eq!(arg_value(&c, "--token-file"), None);
    assert!(no_auth.of_kind("Secret").is_empty());
    let off = render(cp, "ops", &["api.enabled=false"]);
    let names: Vec<String> = off.docs.iter().map(|d| str_at(d, "/metadata/name")).collect();
    assert!(
        names.iter().all(|n| n.starts_with("nbo-notebook-operator-controller")),
        "only the controller's objects: {names:?}"
    );
}

fn container_of(m: &Manifests, deployment: &str, name: &str) -> Container {
    let d: Deployment = m.get("Deployment", deployment);
    container(&d, name).clone()
}

#[test]
fn schema_and_templates_refuse_bad_values() {
    let cp = ControlPlane::shared();
    let cases: &[(&[&str], &str)] = &[
        (&["api.replicas=-1"], "/api/replicas"),
        (&["api.replicas=three"], "/api/replicas"),
        (&["watchAllNamespaces=yes"], "/watchAllNamespaces"),
        (&["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (&["image.binary=notebook-operator"], "/image/binary"),
        (&["logFormat=xml"], "/logFormat"),
        (&["api.service.type=Ingress"], "/api/service/type"),
        (&["api.port=70000"], "/api/port"),
        (&["api.lock=Not_A_Name"], "/api/lock"),
        (&["controller.cancelGrace=soon"], "/controller/cancelGrace"),
        (&["controller.notifyRetryFor=forever"], "/controller/notifyRetryFor"),
        (&["controller.notifyAttemptTimeout=a while"], "/controller/notifyAttemptTimeout"),
        (&["controller.runnerImagePullPolicy=Sometimes"], "/controller/runnerImagePullPolicy"),
        (&["controller.defaultResources.limits.memory=2"], "/controller/defaultResources/limits/memory"),
        (&["controller.defaultResources.storage=1Gi"], "/controller/defaultResources"),
        (&["publicUrl=notebooks.example.com"], "/publicUrl"),
        (&["controller.resources.limits.memory=lots"], "/controller/resources/limits/memory"),
        (&["controller.replicas=0"], "/controller/replicas"),
        (&["controller.leaderElection.enabled=false"], "controller.replicas must be 1"),
        (&["controller.leaderElection.leaseDuration=long"], "/controller/leaderElection/leaseDuration"),
        (&["api.notebook.path=relative.ipynb"], "/api/notebook/path"),
        (
            &["api.notebook.path=/a.ipynb", "api.notebook.configMap=b"],
            "set at most one of content, configMap and path",
        ),
        (&["controller.serviceAccount.create=false"], "controller.serviceAccount.name is required"),
    ];
    for (args, message) in cases {
        let out = try_render(cp, "default", args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = stderr_of(&out);
        assert!(err.contains(message), "{args:?}: expected {message:?} in:\n{err}");
    }
}

// === on the control plane ===

#[tokio::test]
async fn rendered_manifests_pass_a_server_side_dry_run() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    install_service_monitor_stub(cp);
    let ns = cp.namespace("dry-run").await;
    restrict(cp, &ns);

    // The check below would catch a pod template that breaks the restricted profile.
    let careless = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "careless"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
        "spec": {"containers": [{"name": "c", "image": "x", "command": ["x"]}]}}}});
    let warnings = dry_run(cp, &ns, &careless.to_string());
    assert!(warnings.contains("would violate PodSecurity"), "the namespace warns: {warnings}");

    let defaults = render(cp, &ns, &[]);
    let warnings = dry_run(cp, &ns, &defaults.yaml);
    assert!(!warnings.contains("PodSecurity"), "the chart's pods meet the restricted profile:\n{warnings}");

    let others = render(
        cp,
        &ns,
        &[
            "watchAllNamespaces=true",
            "networkPolicy.enabled=true",
            "networkPolicy.apiFrom[0].namespaceSelector.matchLabels.team=data",
            "networkPolicy.metricsFrom[0].podSelector.matchLabels.app=prometheus",
            "serviceMonitor.enabled=true",
            "serviceMonitor.scrapeTimeout=10s",
            "api.replicas=0",
            "api.service.type=NodePort",
            "fullnameOverride=other",
        ],
    );
    let warnings = dry_run(cp, &ns, &others.yaml);
    assert!(!warnings.contains("PodSecurity"), "{warnings}");
}

/// prometheus-operator's ServiceMonitor kind, schema-less: the dry run checks kind, group and metadata.
fn install_service_monitor_stub(cp: &ControlPlane) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
        });
        succeed(cp.kubectl().args(["apply", "-f", "-"]), Some(&crd.to_string()));
        succeed(
            cp.kubectl().args(["wait", "--for=condition=Established", "--timeout=60s", "crd/servicemonitors.monitoring.coreos.com"]),
            None,
        );
    });
}

#[test]
fn deploy_is_the_rendered_chart() {
    let cp = ControlPlane::shared();
    let out = tempfile::tempdir().expect("tempdir");
    succeed(
        Command::new(format!("{REPO}/scripts/render-deploy.sh"))
            .arg(out.path())
            .env("HELM", cp.binary("helm")),
        None,
    );
    for file in ["crd.yaml", "notebook-operator.yaml", "examples/notebook-configmap.yaml"] {
        let fresh = fs::read_to_string(out.path().join(file)).expect("rendered");
        let committed = fs::read_to_string(format!("{REPO}/deploy/{file}")).unwrap_or_default();
        assert!(fresh == committed, "deploy/{file} drifted from the chart: run scripts/render-deploy.sh");
    }
}

#[tokio::test]
async fn deploy_and_examples_pass_a_server_side_dry_run() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let manifests =
        Manifests::parse(fs::read_to_string(format!("{REPO}/deploy/notebook-operator.yaml")).unwrap());
    let namespace = manifests.of_kind("Namespace");
    assert_eq!(namespace.len(), 1);
    assert_eq!(manifests.docs[0]["kind"], "Namespace", "the namespace comes first");
    // The namespace for real (a dry run of namespaced objects needs it), then everything.
    succeed(cp.kubectl().args(["apply", "-f", "-"]), Some(&serde_json::to_string(namespace[0]).unwrap()));
    let out = output(
        cp.kubectl().args(["apply", "--server-side", "--dry-run=server", "-f", &format!("{REPO}/deploy/")]),
        None,
    );
    assert!(out.status.success(), "kubectl apply -f deploy/:\n{}", stderr_of(&out));
    let warnings = stderr_of(&out);
    assert!(!warnings.contains("PodSecurity"), "{warnings}");
    let applied = String::from_utf8_lossy(&out.stdout);
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/notebookruns.notebooks.dev",
        "customresourcedefinition.apiextensions.k8s.io/notebookschedules.notebooks.dev",
        "deployment.apps/notebook-operator-controller",
        "deployment.apps/notebook-operator-api",
    ] {
        assert!(applied.contains(object), "{object} not in:\n{applied}");
    }
    assert!(manifests.of_kind("Secret").is_empty(), "deploy/ commits no token");
    let api: Deployment = manifests.get("Deployment", "notebook-operator-api");
    assert_eq!(
        token_file_secret(&api).0,
        "notebook-operator-api-token",
        "the Secret README's Install creates"
    );

    let ns = cp.namespace("examples").await;
    let out = output(
        cp.kubectl().args([
            "apply",
            "--dry-run=server",
            "-n",
            &ns,
            "-f",
            &format!("{REPO}/deploy/examples/"),
        ]),
        None,
    );
    assert!(out.status.success(), "kubectl apply -f deploy/examples/:\n{}", stderr_of(&out));
    let examples = Manifests::parse(
        fs::read_to_string(format!("{REPO}/deploy/examples/notebook-configmap.yaml")).unwrap(),
    );
    let cm = examples.find("ConfigMap", "hello-notebook").expect("hello-notebook");
    let nb: Value = serde_json::from_str(cm["data"]["notebook.ipynb"].as_str().unwrap()).unwrap();
    assert_eq!(nb, hello_notebook());
}

#[tokio::test]
async fn helm_install_keeps_the_api_token_across_upgrades() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("helm-install").await;
    restrict(cp, &ns);
    // The test kubelet never pulls from this registry: pods are admitted, then wait in ErrImagePull.
    let image = format!("image.repository={FAILING_REGISTRY}notebook-operator");
    let notes = succeed(
        helm(cp).args(["install", RELEASE, CHART, "--namespace", &ns]).args(helm_values(&[&image])),
        None,
    );
    assert!(
        notes.contains("Authorization: Bearer $TOKEN") && notes.contains("/start"),
        "NOTES tell how to call /start:\n{notes}"
    );
    assert!(notes.contains(&format!("get secret {FULLNAME}-api-token")), "{notes}");

    let secrets: Api<Secret> = ns.api();
    let token = |s: Secret| s.data.expect("data")["token"].0.clone();
    let first = token(secrets.get(&format!("{FULLNAME}-api-token")).await.expect("the token Secret"));
    assert_eq!(first.len(), 48);

    // Both Deployments' pods pass the namespace's `restricted` enforcement and try the chart's image.
    let pods: Api<Pod> = ns.api();
    let expected_image = format!("{FAILING_REGISTRY}notebook-operator:{}", env!("CARGO_PKG_VERSION"));
    wait_for(RUN_TIMEOUT, "the controller and API pods to wait for their image", || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        let components: BTreeSet<String> = list
            .items
            .iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .is_some_and(|s| s.containers[0].image.as_deref() == Some(expected_image.as_str()))
            })
            .filter(|p| {
                p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()).any(|cs| {
                    cs.state
                        .as_ref()
                        .and_then(|s| s.waiting.as_ref())
                        .and_then(|w| w.reason.as_deref())
                        .is_some_and(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
                })
            })
            .filter_map(|p| p.metadata.labels.as_ref()?.get("app.kubernetes.io/component").cloned())
            .collect();
        (components.len() == 2).then_some(())
    })
    .await;

    succeed(
        helm(cp)
            .args(["upgrade", RELEASE, CHART, "--namespace", &ns])
            .args(helm_values(&[&image, "api.replicas=2"])),
        None,
    );
    let second = token(secrets.get(&format!("{FULLNAME}-api-token")).await.expect("the token Secret"));
    assert_eq!(first, second, "an upgrade keeps the token");
    let deployments: Api<Deployment> = ns.api();
    let api = deployments.get(&format!("{FULLNAME}-api")).await.expect("API Deployment");
    assert_eq!(api.spec.unwrap().replicas, Some(2), "the upgrade applied");

    succeed(helm(cp).args(["uninstall", RELEASE, "--namespace", &ns, "--wait", "--timeout", "60s"]), None);
    assert!(
        secrets.get_opt(&format!("{FULLNAME}-api-token")).await.expect("get").is_none(),
        "uninstall removes the Secret"
    );
    assert!(deployments.list(&ListParams::default()).await.unwrap().items.is_empty());
}

/// The chart's pods on the test kubelet: each container's command runs as a host process (the image
/// is only recorded), so `image.binary` points the chart at the binary under test.
#[tokio::test]
async fn helm_install_runs_notebooks_from_the_charts_own_pods() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("helm-works").await;
    restrict(cp, &ns);
    // Pods share the host network: both listening ports must be free.
    let api_port = free_port();
    let controller_port = std::iter::repeat_with(free_port).find(|p| *p != api_port).unwrap();
    let values = [
        format!("image.binary={BIN}"),
        "image.repository=registry.example.com/notebook-operator".to_string(),
        format!("api.port={api_port}"),
        format!("controller.port={controller_port}"),
        "controller.defaultImage=quay.io/jupyter/minimal-notebook:test".to_string(),
        "logFormat=text".to_string(),
    ];
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    succeed(helm(cp).args(["install", RELEASE, CHART, "--namespace", &ns]).args(helm_values(&values)), None);
    let installed = Installed { cp, ns: ns.to_string(), uninstalled: false };

    // Both Deployments' pods run, with the service account token the API server injected.
    let pods: Api<Pod> = ns.api();
    let operator_pods = || async {
        let list = pods.list(&ListParams::default().labels("app.kubernetes.io/instance=nbo")).await.ok()?;
        Some(list.items)
    };
    wait_for(RUN_TIMEOUT, "the controller and API pods to run", || async {
        let items = operator_pods().await?;
        let running: BTreeSet<String> = items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter(|p| {
                p.status
                    .iter()
                    .flat_map(|s| s.conditions.iter().flatten())
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .filter_map(|p| p.metadata.labels.as_ref()?.get("app.kubernetes.io/component").cloned())
            .collect();
        (running.len() == 2).then_some(())
    })
    .await;
    for pod in operator_pods().await.expect("list pods") {
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.containers[0].command.as_ref().unwrap()[0], BIN);
        assert!(
            spec.volumes.iter().flatten().any(|v| v.name.starts_with("kube-api-access-")),
            "in-cluster config: {:?}",
            spec.volumes
        );
        assert!(spec.containers[0].env.iter().flatten().all(|e| e.name != "KUBECONFIG"));
    }
    let processes = operator_processes(&ns);
    assert_eq!(processes.len(), 2, "the controller and the API, as host processes: {processes:?}");

    // The token as NOTES.txt reads it.
    let encoded = succeed(
        cp.kubectl().args([
            "get",
            "secret",
            &format!("{FULLNAME}-api-token"),
            "-n",
            &ns,
            "-o",
            "jsonpath={.data.token}",
        ]),
        None,
    );
    let token = String::from_utf8(
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded.trim()).expect("base64"),
    )
    .expect("utf-8 token");

    let base = format!("http://127.0.0.1:{api_port}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    wait_for(Duration::from_secs(60), "the API pod to listen", || async {
        http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    let refused = http.post(format!("{base}/start")).send().await.unwrap();
    assert_eq!(refused.status(), 401, "/start needs the token");
    seed_run_succeeds(&http, &base, &token, "the run started through the API pod", || {}).await;
    let controller_metrics = http.get(format!("http://127.0.0.1:{controller_port}/metrics")).send().await;
    assert!(
        controller_metrics.is_ok_and(|r| r.status().is_success()),
        "the controller pod serves /metrics on controller.port"
    );

    // Uninstalling deletes the pods, and the kubelet stops their processes.
    installed.uninstall();
    wait_for(Duration::from_secs(60), "the operator's pods to be deleted", || async {
        operator_pods().await.is_some_and(|items| items.is_empty())
    })
    .await;
    wait_for(Duration::from_secs(30), "the operator's processes to exit", || async {
        operator_processes(&ns).is_empty()
    })
    .await;
}

/// A Helm release of the chart; on failure, prints its pods' logs and uninstalls it.
struct Installed<'a> {
    cp: &'a ControlPlane,
    ns: String,
    uninstalled: bool,
}

impl Installed<'_> {
    fn uninstall(mut self) {
        self.uninstalled = true;
        succeed(
            helm(self.cp).args(["uninstall", RELEASE, "--namespace", &self.ns, "--wait", "--timeout", "60s"]),
            None,
        );
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if self.uninstalled {
            return;
        }
        if std::thread::panicking() {
            for component in ["controller", "api"] {
                let out = output(
                    self.cp.kubectl().args([
                        "logs",
                        "-n",
                        &self.ns,
                        &format!("deployment/{FULLNAME}-{component}"),
                        "--tail=60",
                    ]),
                    None,
                );
                eprintln!(
                    "--- {component} pod log ---\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    stderr_of(&out)
                );
            }
        }
        let _ = output(helm(self.cp).args(["uninstall", RELEASE, "--namespace", &self.ns]), None);
    }
}

/// Pids of the binary under test running with `--namespace=<ns>`: the chart's containers.
fn operator_processes(ns: &str) -> Vec<u32> {
    let flag = format!("--namespace={ns}");
    fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (args.first() == Some(&BIN.as_bytes()) && args.contains(&flag.as_bytes())).then_some(pid)
        })
        .collect()
}

// === the chart's RBAC, proven by running the binary as its service accounts ===

/// A process of the binary, killed when dropped (or with the test thread); its log is printed on failure.
struct Running {
    name: &'static str,
    child: Mutex<Child>,
    log: PathBuf,
}

impl Running {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        process::contain(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { name, child: Mutex::new(child), log }
    }

    /// Fails the test with the log's tail when the process has exited.
    fn ensure_running(&self) {
        if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, process::tail(&self.log, 40));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log (last 60 lines) ---\n{}", self.name, process::tail(&self.log, 60));
        }
    }
}

/// A kubeconfig for a service account, with a token from the TokenRequest API.
fn service_account_kubeconfig(cp: &ControlPlane, ns: &str, account: &str, dir: &Path) -> PathBuf {
    let token = succeed(cp.kubectl().args(["create", "token", account, "-n", ns, "--duration=2h"]), None);
    let admin: Value = serde_yaml::from_str(&fs::read_to_string(cp.kubeconfig()).unwrap()).unwrap();
    let ca = str_at(&admin, "/clusters/0/cluster/certificate-authority-data");
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": cp.server(), "certificate-authority-data": ca}}],
        "users": [{"name": account, "user": {"token": token.trim()}}],
        "contexts": [{"name": account, "context": {"cluster": "test", "user": account, "namespace": ns}}],
        "current-context": account,
    });
    let path = dir.join(format!("{account}.kubeconfig"));
    fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// The chart's container as a host command: its command, arguments and environment, with the
/// image's binary swapped for the one under test and `adapt` applied to each argument.
fn command_of(c: &Container, pod_name: &str, pod_namespace: &str, adapt: impl Fn(&str) -> String) -> Command {
    let command = c.command.clone().expect("an explicit command");
    assert_eq!(command[0], BINARY_IN_IMAGE);
    let mut cmd = Command::new(BIN);
    cmd.args(&command[1..]).args(args_of(c).iter().map(|a| adapt(a))).env_clear();
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => pod_name.to_string(),
                Some("metadata.namespace") => pod_namespace.to_string(),
                other => panic!("{}: unexpected env source {other:?}", var.name),
            },
            (None, None) => String::new(),
        };
        cmd.env(&var.name, value);
    }
    cmd
}

/// `/start` with the token, `/progress` until the run ends, which must be SUCCESS with a
/// success line from `/output`; `each_poll` runs on every poll. Returns the run's id.
async fn seed_run_succeeds(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    what: &str,
    mut each_poll: impl FnMut(),
) -> String {
    let call = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{base}{path}")).bearer_auth(token)
    };
    let started = call(reqwest::Method::POST, "/start").send().await.unwrap();
    assert_eq!(started.status(), 200);
    let started: Value = started.json().await.unwrap();
    let id = started["id"].as_str().expect("an id").to_string();
    let done = wait_for(RUN_TIMEOUT, format!("{what} to finish"), || {
        each_poll();
        let progress = call(reqwest::Method::GET, &format!("/progress?task_id={id}"));
        async move {
            let p: Value = progress.send().await.ok()?.json().await.ok()?;
            matches!(p["status"].as_str(), Some("SUCCESS" | "FAILURE" | "REVOKED")).then_some(p)
        }
    })
    .await;
    assert_eq!(done["status"], "SUCCESS", "{done}");
    let summary = call(reqwest::Method::GET, &format!("/output?task_id={id}")).send().await.unwrap();
    assert_eq!(summary.status(), 200);
    let summary = summary.text().await.unwrap();
    assert!(summary.contains("success"), "{summary}");
    id
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn inline_run(name: &str, cells: &[&str]) -> NotebookRun {
    from_json(
        json!({"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun", "metadata": {"name": name},
                     "spec": {"notebook": {"inline": ipynb(cells)}}}),
    )
}

fn phase_of(run: &NotebookRun) -> Option<RunPhase> {
    run.phase()
}

async fn wait_terminal(runs: &Api<NotebookRun>, name: &str, controller: &Running) -> NotebookRun {
    wait_for(RUN_TIMEOUT, format!("{name} to finish"), || async {
        controller.ensure_running();
        runs.get_opt(name).await.ok().flatten().filter(|r| phase_of(r).is_some_and(RunPhase::is_terminal))
    })
    .await
}

fn assert_forbidden(out: Output, what: &str) {
    let err = stderr_of(&out);
    assert!(
        !out.status.success() && err.contains("is forbidden: User \"system:serviceaccount:"),
        "{what} should be forbidden to the service account; got {}:\n{err}",
        out.status
    );
}

#[tokio::test]
async fn the_charts_service_accounts_run_notebooks_and_nothing_more() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.namespace("rbac").await;
    restrict(cp, &ns);
    let dir = tempfile::tempdir().expect("tempdir");

    // The chart's namespaced objects for real; the Deployments run below as host processes.
    let m = render(cp, &ns, &[]);
    let objects = m.select(|d| d["kind"] != "Deployment");
    succeed(cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]), Some(&objects));
    let controller_kubeconfig =
        service_account_kubeconfig(cp, &ns, &format!("{FULLNAME}-controller"), dir.path());
    let api_kubeconfig = service_account_kubeconfig(cp, &ns, &format!("{FULLNAME}-api"), dir.path());

    // The controller, as the chart runs it.
    let deployment: Deployment = m.get("Deployment", &format!("{FULLNAME}-controller"));
    let mut cmd = command_of(container(&deployment, "controller"), "controller-0", &ns, |arg| {
        if arg.starts_with("--listen=") { "--listen=127.0.0.1:0".into() } else { arg.to_string() }
    });
    cmd.env("KUBECONFIG", &controller_kubeconfig);
    let controller = Running::spawn("controller", cmd, dir.path().join("controller.log"));

    // A run that succeeds and one that fails, created by a user.
    let runs: Api<NotebookRun> = ns.api();
    runs.create(&PostParams::default(), &inline_run("ok", &["print('fine')"])).await.expect("create ok");
    runs.create(&PostParams::default(), &inline_run("broken", &["raise ValueError('boom')"]))
        .await
        .expect("create broken");
    let ok = wait_terminal(&runs, "ok", &controller).await;
    assert_eq!(phase_of(&ok), Some(RunPhase::Succeeded), "{:?}", ok.status);
    let kept = ok.status.as_ref().and_then(|s| s.output.as_ref()).and_then(|o| o.config_map.clone());
    assert!(kept.is_some(), "the executed notebook is kept, from the pod log (pods/log): {:?}", ok.status);
    let broken = wait_terminal(&runs, "broken", &controller).await;
    assert_eq!(phase_of(&broken), Some(RunPhase::Failed), "{:?}", broken.status);
    assert_eq!(broken.status.as_ref().and_then(|s| s.reason), Some(Reason::CellError));

    // The examples of deploy/examples/ that need no custom image.
    for file in ["notebook-configmap.yaml", "run-inline.yaml", "run-configmap.yaml"] {
        succeed(
            cp.kubectl().args(["apply", "-n", &ns, "-f", &format!("{REPO}/deploy/examples/{file}")]),
            None,
        );
    }
    for name in ["hello-inline", "hello-configmap"] {
        let run = wait_terminal(&runs, name, &controller).await;
        assert_eq!(phase_of(&run), Some(RunPhase::Succeeded), "{name}: {:?}", run.status);
    }

    // The API, as the chart runs it, with the token of the chart's Secret.
    let token = token_of(&m);
    let deployment: Deployment = m.get("Deployment", &format!("{FULLNAME}-api"));
    let token_file = dir.path().join("token");
    fs::write(&token_file, &token).unwrap();
    let port = free_port();
    let mut cmd = command_of(container(&deployment, "api"), "api-0", &ns, |arg| {
        if arg.starts_with("--listen=") {
            format!("--listen=127.0.0.1:{port}")
        } else if arg.starts_with("--token-file=") {
            format!("--token-file={}", token_file.display())
        } else {
            arg.to_string()
        }
    });
    cmd.env("KUBECONFIG", &api_kubeconfig);
    let api = Running::spawn("api", cmd, dir.path().join("api.log"));
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    wait_for(Duration::from_secs(30), "the API to be ready", || async {
        api.ensure_running();
        http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;

    let ping = http.get(format!("{base}/ping")).send().await.unwrap();
    assert_eq!(ping.status(), 200, "/ping needs no token");
    let refused = http.post(format!("{base}/start")).send().await.unwrap();
    assert_eq!(refused.status(), 401, "/start needs the token");

    let call = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{base}{path}")).bearer_auth(&token)
    };
    let id = seed_run_succeeds(&http, &base, &token, "the API's run", || {
        api.ensure_running();
        controller.ensure_running();
    })
    .await;
    let full: Value = call(reqwest::Method::GET, &format!("/output?task_id={id}&full=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        full["cells"].to_string().contains("hello from cell 1"),
        "the executed notebook is read back (configmaps get)"
    );

    // A second start, refused while it runs, then killed.
    let second: Value = call(reqwest::Method::POST, "/start").send().await.unwrap().json().await.unwrap();
    let second_id = second["id"].as_str().expect("an id").to_string();
    let busy = call(reqwest::Method::POST, "/start").send().await.unwrap();
    assert_eq!(busy.status(), 400, "one run at a time");
    let killed: Value = call(reqwest::Method::POST, &format!("/kill?task_id={second_id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(killed["status"], "REVOKED", "{killed}");

    // A schedule ticked by the controller as its own account (schedules watched, status patched,
    // runs created and owned), listed, suspended and run now through the API as its own.
    let schedule = json!({"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookSchedule",
        "metadata": {"name": "nightly"},
        "spec": {"schedule": "*/2 * * * * *",
                 "runTemplate": {"spec": {"notebook": {"inline": ipynb(&["print('tick')"])}}}}});
    succeed(cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]), Some(&schedule.to_string()));
    let schedules: Api<NotebookSchedule> = ns.api();
    let ticked = wait_for(RUN_TIMEOUT, "a tick's run in the schedule's status", || async {
        controller.ensure_running();
        schedules.get("nightly").await.ok()?.status?.last_run.map(|l| l.name)
    })
    .await;
    let tick_run = wait_terminal(&runs, &ticked, &controller).await;
    assert_eq!(phase_of(&tick_run), Some(RunPhase::Succeeded), "{:?}", tick_run.status);
    let listed: Value = call(reqwest::Method::GET, "/schedules").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed[0]["name"], "nightly", "{listed}");
    let suspended = call(reqwest::Method::POST, "/schedules/nightly/suspend").send().await.unwrap();
    assert_eq!(suspended.status(), 200, "suspend (notebookschedules patch)");
    let ran = call(reqwest::Method::POST, "/schedules/nightly/run").send().await.unwrap();
    assert_eq!(ran.status(), 201, "run now (notebookruns create, owned by the schedule)");
    let ran: Value = ran.json().await.unwrap();
    let manual = wait_terminal(&runs, ran["id"].as_str().expect("an id"), &controller).await;
    assert_eq!(phase_of(&manual), Some(RunPhase::Succeeded), "{:?}", manual.status);

    // What the API may not do, done for real with its own credentials.
    let as_api = || {
        let mut cmd = cp.kubectl();
        cmd.args(["--kubeconfig", api_kubeconfig.to_str().unwrap(), "-n", &ns]);
        cmd
    };
    succeed(as_api().args(["get", "notebookruns"]), None);
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "notebook-run"},
                       "spec": {"holderIdentity": "intruder"}});
    assert_forbidden(
        output(as_api().args(["create", "-f", "-"]), Some(&lease.to_string())),
        "the API creating a Lease",
    );
    assert_forbidden(
        output(as_api().args(["create", "job", "intruder", "--image=busybox", "--", "true"]), None),
        "the API creating a Job",
    );
    assert_forbidden(
        output(as_api().args(["get", "secret", &format!("{FULLNAME}-api-token")]), None),
        "the API reading a Secret",
    );
    assert_forbidden(output(as_api().args(["delete", "job", "--all"]), None), "the API deleting Jobs");
    assert_forbidden(
        output(as_api().args(["delete", "notebookschedule", "nightly"]), None),
        "the API deleting a schedule",
    );

    let as_controller = || {
        let mut cmd = cp.kubectl();
        cmd.args(["--kubeconfig", controller_kubeconfig.to_str().unwrap()]);
        cmd
    };
    assert_forbidden(
        output(as_controller().args(["-n", &ns, "get", "secrets"]), None),
        "the controller reading Secrets",
    );
    assert_forbidden(
        output(as_controller().args(["-n", "default", "get", "notebookruns"]), None),
        "the controller outside its namespace",
    );
    assert_forbidden(output(as_controller().args(["get", "nodes"]), None), "the controller reading nodes");
    assert_forbidden(
        output(
            as_controller()
                .args(["-n", &ns, "patch", "notebookschedule", "nightly", "--type=merge", "-p"])
                .arg(r#"{"spec":{"suspend":false}}"#),
            None,
        ),
        "the controller editing a schedule's spec",
    );
}

// === the image ===

/// deploy/Dockerfile's instructions, continuation lines joined: (INSTRUCTION, rest).
fn dockerfile() -> Vec<(String, String)> {
    let text = fs::read_to_string(format!("{REPO}/deploy/Dockerfile")).expect("deploy/Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                let (instruction, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((instruction.to_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn dockerfile_builds_the_binary_into_a_non_root_image() {
    let steps = dockerfile();
    let stages: Vec<&String> = steps.iter().filter(|(i, _)| i == "FROM").map(|(_, r)| r).collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {stages:?}");
    assert_eq!(stages[0], "rust:1-bookworm AS build");
    assert_eq!(
        stages[1], "gcr.io/distroless/cc-debian12:nonroot",
        "Debian 12 (bookworm) glibc, like the build stage"
    );

    // The build runs make's cargo flags, plus --release.
    let run =
        steps.iter().find(|(i, r)| i == "RUN" && r.contains("cargo build")).expect("a RUN with cargo build");
    let cargo: Vec<&str> =
        run.1[run.1.find("cargo build").unwrap()..].split("&&").next().unwrap().split_whitespace().collect();
    assert_eq!(cargo, ["cargo", "build", "--release", "--locked"], "{}", run.1);
    let makefile = fs::read_to_string(format!("{REPO}/Makefile")).expect("Makefile");
    let make_build = makefile
        .lines()
        .skip_while(|l| !l.starts_with("build:"))
        .nth(1)
        .expect("the Makefile's build target");
    let make_flags: Vec<&str> = make_build.split_whitespace().skip_while(|w| *w != "build").skip(1).collect();
    for flag in make_flags {
        assert!(cargo.contains(&flag), "`make build` passes {flag}; the Dockerfile does not");
    }
    assert!(run.1.contains("target/release/notebook-operator"), "the release binary is what gets copied");

    // Only what the build needs goes into the context and the build stage.
    let copied: Vec<String> = steps
        .iter()
        .filter(|(i, r)| i == "COPY" && !r.starts_with("--from"))
        .flat_map(|(_, r)| {
            let words: Vec<&str> = r.split_whitespace().collect();
            words[..words.len() - 1].iter().map(|w| w.trim_end_matches('/').to_string()).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(copied, ["Cargo.toml", "Cargo.lock", "src"]);
    assert!(!Path::new(REPO).join("build.rs").exists(), "a build script would need copying too");
    let ignore = fs::read_to_string(format!("{REPO}/deploy/Dockerfile.dockerignore")).expect("dockerignore");
    for path in &copied {
        assert!(ignore.lines().any(|l| l.trim_end_matches('/') == format!("!{path}")), "{path} is not sent");
    }

    // The runtime stage: the binary where the chart runs it, as a numeric non-root user.
    let copy =
        steps.iter().find(|(i, r)| i == "COPY" && r.starts_with("--from=build")).expect("COPY --from=build");
    assert_eq!(copy.1.split_whitespace().last(), Some(BINARY_IN_IMAGE));
    let user = &steps.iter().rfind(|(i, _)| i == "USER").expect("a USER").1;
    let uid: u32 = user.split(':').next().unwrap().parse().expect("a numeric uid (runAsNonRoot checks it)");
    assert_eq!(uid, 65532, "the chart's runAsUser");
    let entrypoint = &steps.iter().rfind(|(i, _)| i == "ENTRYPOINT").expect("an ENTRYPOINT").1;
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec form");
    assert_eq!(entrypoint, [BINARY_IN_IMAGE]);

    // The binary runs, and needs no library distroless/cc lacks.
    let version = succeed(Command::new(BIN).arg("--version"), None);
    assert_eq!(version.trim(), format!("notebook-operator {}", env!("CARGO_PKG_VERSION")));
    let dynamic = succeed(Command::new("readelf").args(["--dynamic", BIN]), None);
    let needed: BTreeSet<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.strip_suffix(']'))
        .collect();
    let distroless_cc = [
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
    ];
    for lib in &needed {
        assert!(distroless_cc.contains(lib), "the binary needs {lib}, which distroless/cc lacks");
    }
}
