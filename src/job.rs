//! Pure builders: the inputs ConfigMap and the Job of a NotebookRun. No I/O here.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{NotebookRun, parse_duration};
use crate::progress::exit_code;

pub const MANAGED_BY: &str = "notebook-operator";
pub const RUN_LABEL: &str = "notebooks.dev/run";
pub const CONTAINER: &str = "runner";
pub const INPUTS_DIR: &str = "/run/notebook-operator/inputs";
/// The runner script, from the namespace's shared runner ConfigMap (`runner_config_map`).
pub const RUNNER_DIR: &str = "/run/notebook-operator/runner";
/// `app.kubernetes.io/component` of the shared runner ConfigMaps.
pub const RUNNER_COMPONENT: &str = "runner";
pub const WORK_DIR: &str = "/run/notebook-operator/work";
/// HOME and TMPDIR of the runner and its kernel: on the pod's own emptyDirs, so that they are
/// writable whatever the image (a read-only root filesystem, a HOME owned by another user).
pub const HOME_DIR: &str = "/run/notebook-operator/home";
pub const TMP_DIR: &str = "/run/notebook-operator/tmp";
pub const TERMINATION_LOG: &str = "/dev/termination-log";
pub const RUNNER_KEY: &str = "run.py";
pub const NOTEBOOK_KEY: &str = "notebook.ipynb";
pub const PARAMETERS_KEY: &str = "parameters.json";
pub const OUTPUT_KEY: &str = "notebook.ipynb.gz";

/// What the controller was told about the cluster it runs notebooks on.
#[derive(Clone, Debug)]
pub struct JobConfig {
    pub default_image: String,
    /// The interpreter in the image (docker-stacks images: `python3` on PATH).
    pub python: String,
    /// Resources of runs that name none (`--default-resources`).
    pub default_resources: Option<ResourceRequirements>,
    /// The runner container's imagePullPolicy (`--image-pull-policy`); unset, Kubernetes'
    /// default applies.
    pub image_pull_policy: Option<String>,
}

impl JobConfig {
    pub fn new(default_image: impl Into<String>, python: impl Into<String>) -> Self {
        Self {
            default_image: default_image.into(),
            python: python.into(),
            default_resources: None,
            image_pull_policy: None,
        }
    }
}

/// Parses `--default-resources`: either the JSON of a ResourceRequirements
/// (`{"limits": {"memory": "2Gi"}}`) or comma-separated `requests.NAME=QUANTITY` and
/// `limits.NAME=QUANTITY` pairs (`requests.cpu=500m,limits.memory=2Gi`).
pub fn parse_resources(text: &str) -> Result<ResourceRequirements, String> {
    let text = text.trim();
    let resources: ResourceRequirements = if text.starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("invalid resources JSON: {e}"))?
    } else {
        let mut resources = ResourceRequirements::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| format!("{pair:?}: expected requests.NAME=QUANTITY"))?;
            let (section, name) = match key.trim().split_once('.') {
                Some(("requests", name)) => (&mut resources.requests, name),
                Some(("limits", name)) => (&mut resources.limits, name),
                _ => return Err(format!("{key:?}: expected requests.NAME or limits.NAME")),
            };
            section.get_or_insert_default().insert(name.to_string(), Quantity(value.trim().to_string()));
        }
        resources
    };
    for (name, quantity) in resources.requests.iter().chain(resources.limits.iter()).flatten() {
        if !is_quantity(&quantity.0) {
            return Err(format!("{name}: {:?} is not a quantity (e.g. 500m, 2Gi, 1.5)", quantity.0));
        }
    }
    Ok(resources)
}

/// Kubernetes' quantity syntax: a decimal number, then an optional binary (Ki..Ei), decimal
/// (n, u, m, k, M..E) or exponent (e3) suffix.
fn is_quantity(s: &str) -> bool {
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let number_end = unsigned.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    let number_ok = digits > 0 && number.matches('.').count() <= 1;
    let exponent = |e: &str| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    };
    let suffix_ok = matches!(
        suffix,
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(exponent);
    number_ok && suffix_ok
}

/// Names of a run's children, derived from the run's name so they are stable across restarts.
pub fn inputs_name(run: &NotebookRun) -> String {
    child_name(&run.name_any(), "inputs")
}

pub fn output_name(run: &NotebookRun) -> String {
    child_name(&run.name_any(), "output")
}

/// The Job's name: the run's name where it fits the 63 characters a label value allows.
pub fn job_name(run: &NotebookRun) -> String {
    child_name(&run.name_any(), "")
}

/// `<owner>-<suffix>` (or `<owner>` alone), at most the 63 characters a label value allows: a
/// longer owner name is cut and followed by a hash of the whole, so two long names that share a
/// prefix still differ. Also names a schedule's runs.
pub fn child_name(run: &str, suffix: &str) -> String {
    let sep = if suffix.is_empty() { "" } else { "-" };
    let full = format!("{run}{sep}{suffix}");
    if full.len() <= 63 {
        return full;
    }
    // Keep it unique: a short hash of the whole run name replaces the cut part.
    let hash = fnv1a(run.as_bytes());
    let keep = 63 - suffix.len() - sep.len() - 9;
    let stem = run[..keep].trim_end_matches(['-', '.']);
    format!("{stem}-{hash:08x}{sep}{suffix}")
}

/// FNV-1a, 32 bits: stable across builds and platforms (std's hasher is not promised to be).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x01000193))
}

pub fn labels(run: &NotebookRun) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
        (RUN_LABEL.to_string(), run.name_any()),
    ])
}

fn owned_meta(run: &NotebookRun, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: run.namespace(),
        labels: Some(labels(run)),
        owner_references: run.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The shared runner ConfigMap's name: named by its content, so each version of the runner has
/// its own and runs of different versions never see each other's script.
pub fn runner_name() -> &'static str {
    static NAME: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("notebook-runner-{}", &sha256_hex(crate::runner::RUN_PY.as_bytes())[..10])
    });
    NAME.as_str()
}

/// The runner script, stored once per namespace and version and shared by the runs (no owner:
/// it outlives each of them; a later version creates its own beside it).
pub fn runner_config_map(namespace: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(runner_name().to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
                ("app.kubernetes.io/component".to_string(), RUNNER_COMPONENT.to_string()),
                ("app.kubernetes.io/version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(RUNNER_KEY.to_string(), crate::runner::RUN_PY.to_string())])),
        immutable: Some(true),
        ..Default::default()
    }
}

/// The run's frozen inputs: the parameters and (for inline and configMap sources) the notebook
/// itself, so the run stays reproducible whatever happens to its source. The runner script is
/// not among them: it is in the shared runner ConfigMap.
pub fn inputs_config_map(run: &NotebookRun, notebook: Option<&str>) -> ConfigMap {
    let mut data = BTreeMap::new();
    if let Some(nb) = notebook {
        data.insert(NOTEBOOK_KEY.to_string(), nb.to_string());
    }
    if let Some(p) = &run.spec.parameters {
        data.insert(PARAMETERS_KEY.to_string(), serde_json::Value::Object(p.clone()).to_string());
    }
    ConfigMap {
        metadata: owned_meta(run, inputs_name(run)),
        data: Some(data),
        immutable: Some(true),
        ..Default::default()
    }
}

/// The executed notebook, gzip, owned by the run.
pub fn output_config_map(run: &NotebookRun, gz: Vec<u8>) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(run, output_name(run)),
        binary_data: Some(BTreeMap::from([(OUTPUT_KEY.to_string(), ByteString(gz))])),
        ..Default::default()
    }
}

/// The Job running the runner on the notebook.
pub fn build(run: &NotebookRun, config: &JobConfig) -> Job {
    let spec = &run.spec;
    let notebook_path = match &spec.notebook.path {
        Some(p) => p.clone(),
        None => format!("{INPUTS_DIR}/{NOTEBOOK_KEY}"),
    };
    // No `command`: the image's entrypoint stays (docker-stacks: tini), so the kernel's orphaned
    // children are reaped and signals are forwarded; the interpreter comes first in `args`.
    let mut args = vec![
        config.python.clone(),
        format!("{RUNNER_DIR}/{RUNNER_KEY}"),
        "--notebook".into(),
        notebook_path,
        "--output".into(),
        format!("{WORK_DIR}/output.ipynb"),
        "--termination-log".into(),
        TERMINATION_LOG.into(),
    ];
    if spec.parameters.is_some() {
        args.extend(["--parameters".into(), format!("{INPUTS_DIR}/{PARAMETERS_KEY}")]);
    }
    if let Some(kernel) = &spec.kernel {
        args.extend(["--kernel".into(), kernel.clone()]);
    }
    if let Some(cell) = spec.timeouts.as_ref().and_then(|t| t.cell.as_deref()).and_then(parse_duration) {
        args.extend(["--cell-timeout".into(), cell.as_secs().max(1).to_string()]);
    }
    let var =
        |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..Default::default() };
    let mut env = vec![
        var("PYTHONUNBUFFERED", "1".into()),
        var("JUPYTER_RUNTIME_DIR", format!("{WORK_DIR}/runtime")),
        var("HOME", HOME_DIR.into()),
        var("TMPDIR", TMP_DIR.into()),
    ];
    // The run's own variables come last: where names repeat, the last one wins.
    env.extend(spec.env.iter().flatten().cloned());
    let overrides = spec.security_context.clone().unwrap_or_default();
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: (name == "inputs" || name == "runner").then_some(true),
        ..Default::default()
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone().unwrap_or_else(|| config.default_image.clone())),
        image_pull_policy: config.image_pull_policy.clone(),
        args: Some(args),
        env: Some(env),
        env_from: spec.env_from.clone(),
        resources: spec.resources.clone().or_else(|| config.default_resources.clone()),
        volume_mounts: Some(vec![
            mount("inputs", INPUTS_DIR),
            mount("runner", RUNNER_DIR),
            mount("work", WORK_DIR),
            mount("home", HOME_DIR),
            mount("tmp", TMP_DIR),
        ]),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            run_as_non_root: Some(true),
            read_only_root_filesystem: overrides.read_only_root_filesystem,
            ..Default::default()
        }),
        ..Default::default()
    };
    let empty_dir = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        // A notebook is arbitrary code: it gets no API credentials.
        automount_service_account_token: Some(false),
        service_account_name: spec.service_account_name.clone(),
        node_selector: spec.node_selector.clone(),
        tolerations: spec.tolerations.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: overrides.run_as_user,
            run_as_group: overrides.run_as_group,
            fs_group: overrides.fs_group,
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        volumes: Some(vec![
            Volume {
                name: "inputs".into(),
                config_map: Some(ConfigMapVolumeSource { name: inputs_name(run), ..Default::default() }),
                ..Default::default()
            },
            Volume {
                name: "runner".into(),
                config_map: Some(ConfigMapVolumeSource { name: runner_name().into(), ..Default::default() }),
                ..Default::default()
            },
            empty_dir("work"),
            empty_dir("home"),
            empty_dir("tmp"),
        ]),
        ..Default::default()
    };
    // 143 (SIGTERM) is left out: an evicted runner exits 143, and evictions may be retried.
    let failing_codes =
        [exit_code::CELL_ERROR, exit_code::INVALID_INPUT, exit_code::CELL_TIMEOUT, exit_code::KERNEL_DIED];
    let pod_failure_policy = PodFailurePolicy {
        rules: vec![
            // First, as the first matching rule wins: evictions and preemptions cost no retry.
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: Some("True".into()),
                }]),
                ..Default::default()
            },
            // A notebook error is never retried.
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(CONTAINER.into()),
                    operator: "In".into(),
                    values: failing_codes.to_vec(),
                }),
                ..Default::default()
            },
        ],
    };
    let mut meta = owned_meta(run, job_name(run));
    meta.annotations =
        Some(BTreeMap::from([("notebooks.dev/run-uid".to_string(), run.uid().unwrap_or_default())]));
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(spec.retries),
            active_deadline_seconds: spec
                .timeouts
                .as_ref()
                .and_then(|t| t.run.as_deref())
                .and_then(parse_duration)
                .map(|d| d.as_secs().max(1) as i64),
            pod_failure_policy: Some(pod_failure_policy),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(run)), ..Default::default() }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{NotebookRunSpec, NotebookSource, Timeouts};

    fn run(name: &str) -> NotebookRun {
        let spec: NotebookRunSpec = serde_json::from_value(serde_json::json!({
            "notebook": {"path": "/home/jovyan/work.ipynb"},
            "parameters": {"n": 3},
            "timeouts": {"run": "1h", "cell": "90s"},
            "retries": 2
        }))
        .unwrap();
        let mut r = NotebookRun::new(name, spec);
        r.metadata.namespace = Some("ns".into());
        r.metadata.uid = Some("uid-1".into());
        r
    }

    #[test]
    fn job_is_locked_down_and_owned() {
        let job = build(&run("daily"), &JobConfig::new("jupyter/base:1", "python3"));
        assert_eq!(job.metadata.name.as_deref(), Some("daily"));
        assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].controller, Some(true));
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(2));
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        let rules = spec.pod_failure_policy.unwrap().rules;
        assert_eq!(rules[0].action, "Ignore", "disruptions first: the first matching rule wins");
        assert_eq!(rules[1].on_exit_codes.as_ref().unwrap().values, vec![1, 2, 3, 4]);
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.security_context.unwrap().seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(c.termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(args.contains("--notebook /home/jovyan/work.ipynb"), "{args}");
        assert!(args.contains("--cell-timeout 90"), "{args}");
        assert!(args.contains("--parameters"), "{args}");
        assert_eq!(c.image.as_deref(), Some("jupyter/base:1"));
        assert_eq!(spec.template.metadata.unwrap().labels.unwrap()[RUN_LABEL], "daily");
    }

    fn container(job: &Job) -> &Container {
        &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
    }

    fn env_of(c: &Container, name: &str) -> Option<String> {
        c.env.iter().flatten().rfind(|e| e.name == name).and_then(|e| e.value.clone())
    }

    #[test]
    fn the_image_entrypoint_stays_and_home_and_tmpdir_are_writable_volumes() {
        let job = build(&run("x"), &JobConfig::new("img", "python3"));
        let c = container(&job);
        assert_eq!(c.command, None, "the image's entrypoint (tini) must run: it reaps the kernel's orphans");
        assert_eq!(
            c.args.as_ref().unwrap()[..2],
            ["python3".to_string(), format!("{RUNNER_DIR}/{RUNNER_KEY}")]
        );
        assert_eq!(env_of(c, "HOME").as_deref(), Some(HOME_DIR));
        assert_eq!(env_of(c, "TMPDIR").as_deref(), Some(TMP_DIR));
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        for (name, path) in [("work", WORK_DIR), ("home", HOME_DIR), ("tmp", TMP_DIR)] {
            let volume = pod.volumes.iter().flatten().find(|v| v.name == name).unwrap();
            assert!(volume.empty_dir.is_some(), "{name} is an emptyDir");
            let m = c.volume_mounts.iter().flatten().find(|m| m.name == name).unwrap();
            assert_eq!((m.mount_path.as_str(), m.read_only), (path, None));
        }
        assert_eq!(c.security_context.as_ref().unwrap().read_only_root_filesystem, None);
        assert_eq!((c.image_pull_policy.as_ref(), c.resources.as_ref()), (None, None));
        // A run may set its own HOME: its variables come last.
        let mut r = run("x");
        r.spec.env =
            Some(vec![EnvVar { name: "HOME".into(), value: Some("/home/me".into()), ..Default::default() }]);
        let job = build(&r, &JobConfig::new("img", "python3"));
        assert_eq!(env_of(container(&job), "HOME").as_deref(), Some("/home/me"));
    }

    #[test]
    fn security_context_overrides_keep_the_pod_locked_down() {
        let mut r = run("x");
        r.spec.security_context = Some(crate::crd::RunSecurityContext {
            run_as_user: Some(1001),
            run_as_group: Some(100),
            fs_group: Some(100),
            read_only_root_filesystem: Some(true),
        });
        let job = build(&r, &JobConfig::new("img", "python3"));
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!((psc.run_as_user, psc.run_as_group, psc.fs_group), (Some(1001), Some(100), Some(100)));
        assert_eq!(psc.run_as_non_root, Some(true));
        let sc = container(&job).security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!((sc.run_as_non_root, sc.allow_privilege_escalation), (Some(true), Some(false)));
    }

    #[test]
    fn default_resources_and_pull_policy_come_from_the_controller() {
        let mut config = JobConfig::new("img", "python3");
        config.default_resources = Some(parse_resources("limits.memory=2Gi").unwrap());
        config.image_pull_policy = Some("Never".into());
        let job = build(&run("x"), &config);
        let c = container(&job);
        assert_eq!(c.image_pull_policy.as_deref(), Some("Never"));
        assert_eq!(c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0, "2Gi");
        // A run's own resources replace the default as a whole.
        let mut r = run("x");
        r.spec.resources = Some(parse_resources("requests.cpu=1").unwrap());
        let job = build(&r, &config);
        let resources = container(&job).resources.clone().unwrap();
        assert_eq!((resources.requests.unwrap()["cpu"].0.as_str(), resources.limits), ("1", None));
    }

    #[test]
    fn resources_parse_from_json_or_pairs() {
        let pairs = parse_resources("requests.cpu=500m, requests.memory=1Gi,limits.memory=2Gi").unwrap();
        let json =
            parse_resources(r#"{"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}"#)
                .unwrap();
        assert_eq!(pairs, json);
        assert_eq!(pairs.requests.as_ref().unwrap()["cpu"].0, "500m");
        for ok in ["1", "0.5", "1.5Gi", "100M", "1e3", "250m", "2k"] {
            assert!(parse_resources(&format!("limits.cpu={ok}")).is_ok(), "{ok}");
        }
        for bad in [
            "cpu=1",
            "requests.cpu",
            "request.cpu=1",
            "limits.memory=2GB",
            "limits.memory=",
            "limits.cpu=1..5",
        ] {
            assert!(parse_resources(bad).is_err(), "{bad}");
        }
        assert!(parse_resources(r#"{"limits": {"memory": "lots"}}"#).is_err());
        assert!(parse_resources("{not json").is_err());
    }

    #[test]
    fn long_names_are_cut_and_stay_unique() {
        let a = "a".repeat(70);
        let b = format!("{}b", "a".repeat(69));
        let (na, nb) = (child_name(&a, "inputs"), child_name(&b, "inputs"));
        assert!(na.len() <= 63 && nb.len() <= 63);
        assert_ne!(na, nb);
        assert!(na.ends_with("-inputs"));
        assert_eq!(child_name("short", ""), "short");
    }

    #[test]
    fn inputs_freeze_the_notebook_and_parameters() {
        let mut r = run("x");
        r.spec.notebook = NotebookSource { inline: Some("{}".into()), ..Default::default() };
        r.spec.timeouts = Some(Timeouts::default());
        let cm = inputs_config_map(&r, Some("{\"cells\":[]}"));
        let data = cm.data.unwrap();
        assert_eq!(data[NOTEBOOK_KEY], "{\"cells\":[]}");
        assert_eq!(data[PARAMETERS_KEY], "{\"n\":3}");
        assert!(!data.contains_key(RUNNER_KEY), "the runner is shared, not copied into each run");
        assert_eq!(cm.immutable, Some(true));
    }

    #[test]
    fn the_runner_is_one_shared_config_map_per_version_mounted_read_only() {
        let cm = runner_config_map("ns");
        let name = runner_name();
        assert_eq!(cm.metadata.name.as_deref(), Some(name));
        let hash = name.strip_prefix("notebook-runner-").unwrap();
        assert_eq!(hash.len(), 10);
        assert!(sha256_hex(crate::runner::RUN_PY.as_bytes()).starts_with(hash));
        assert_eq!(cm.metadata.owner_references, None, "shared by runs: owned by none");
        let labels = cm.metadata.labels.unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], MANAGED_BY);
        assert_eq!(labels["app.kubernetes.io/component"], RUNNER_COMPONENT);
        assert_eq!(cm.data.unwrap()[RUNNER_KEY], crate::runner::RUN_PY);
        assert_eq!(cm.immutable, Some(true));
        let job = build(&run("x"), &JobConfig::new("img", "python3"));
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "runner").unwrap();
        assert_eq!(volume.config_map.as_ref().unwrap().name, name);
        let m = container(&job).volume_mounts.iter().flatten().find(|m| m.name == "runner").unwrap();
        assert_eq!((m.mount_path.as_str(), m.read_only), (RUNNER_DIR, Some(true)));
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
