//! Pure builders: the inputs ConfigMap and the Job of a NotebookRun. No I/O here.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{NotebookRun, parse_duration};
use crate::progress::exit_code;

pub const MANAGED_BY: &str = "notebook-operator";
pub const RUN_LABEL: &str = "notebooks.dev/run";
pub const CONTAINER: &str = "runner";
pub const INPUTS_DIR: &str = "/run/notebook-operator/inputs";
pub const WORK_DIR: &str = "/run/notebook-operator/work";
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

fn child_name(run: &str, suffix: &str) -> String {
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

/// The run's frozen inputs: the runner, the parameters and (for inline and configMap sources)
/// the notebook itself, so the run stays reproducible whatever happens to its source.
pub fn inputs_config_map(run: &NotebookRun, notebook: Option<&str>) -> ConfigMap {
    let mut data = BTreeMap::from([(RUNNER_KEY.to_string(), crate::runner::RUN_PY.to_string())]);
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
    let mut args = vec![
        format!("{INPUTS_DIR}/{RUNNER_KEY}"),
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
    let mut env = vec![
        EnvVar { name: "PYTHONUNBUFFERED".into(), value: Some("1".into()), ..Default::default() },
        EnvVar {
            name: "JUPYTER_RUNTIME_DIR".into(),
            value: Some(format!("{WORK_DIR}/runtime")),
            ..Default::default()
        },
    ];
    env.extend(spec.env.iter().flatten().cloned());
    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone().unwrap_or_else(|| config.default_image.clone())),
        command: Some(vec![config.python.clone()]),
        args: Some(args),
        env: Some(env),
        env_from: spec.env_from.clone(),
        resources: spec.resources.clone(),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "inputs".into(),
                mount_path: INPUTS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount { name: "work".into(), mount_path: WORK_DIR.into(), ..Default::default() },
        ]),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            run_as_non_root: Some(true),
            ..Default::default()
        }),
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
                name: "work".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            },
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
        let job = build(
            &run("daily"),
            &JobConfig { default_image: "jupyter/base:1".into(), python: "python3".into() },
        );
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
        assert!(data[RUNNER_KEY].contains("nbclient"));
        assert_eq!(cm.immutable, Some(true));
    }
}
