//! The `NotebookRun` custom resource: spec (what to run), status (where it is), the closed
//! set of phases and reasons, and the CRD with its bounds and CEL rules.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub const GROUP: &str = "notebooks.dev";
pub const DEFAULT_LOCK: &str = "notebook-run";
pub const DEFAULT_NOTEBOOK_KEY: &str = "notebook.ipynb";
/// Largest inline notebook accepted in a spec (the whole object must stay under etcd's 1.5 MiB).
pub const MAX_INLINE_NOTEBOOK_BYTES: usize = 1_000_000;

/// What to run and how. Immutable once created, except `cancel` (false → true).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "notebooks.dev",
    version = "v1alpha1",
    kind = "NotebookRun",
    plural = "notebookruns",
    shortname = "nbrun",
    namespaced,
    status = "NotebookRunStatus",
    doc = "A run of a Jupyter notebook as a Kubernetes Job, one at a time per lock",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress.display"}"#,
    printcolumn = r#"{"name":"Lock","type":"string","jsonPath":".spec.lock"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NotebookRunSpec {
    /// Where the notebook comes from: exactly one of configMap, path, inline.
    pub notebook: NotebookSource,
    /// Container image with Python and nbclient (default: the controller's --default-image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    /// Kernel name (default: the notebook's kernelspec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub kernel: Option<String>,
    /// Parameters injected papermill-style after the cell tagged `parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "parameters_schema")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_from: Option<Vec<EnvFromSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Overrides of the pod's security context, for images whose USER is not numeric or is
    /// root. The rest stays locked down (runAsNonRoot, no privilege escalation, no
    /// capabilities, seccomp RuntimeDefault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<RunSecurityContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries for infrastructure failures only (evictions): a notebook error is never retried.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10))]
    pub retries: i32,
    /// Lease name: runs sharing a lock run one at a time in a namespace.
    #[serde(default = "default_lock")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub lock: String,
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// `true` stops the run; it cannot go back to false.
    #[serde(default)]
    pub cancel: bool,
    /// Delete the run and its children this long after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Webhooks told when the run ends (docs/notifications.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
}

impl NotebookRun {
    /// The run's phase; None until the controller has seen it.
    pub fn phase(&self) -> Option<RunPhase> {
        self.status.as_ref().and_then(|s| s.phase)
    }

    /// Whether the run reached a terminal phase.
    pub fn is_finished(&self) -> bool {
        self.phase().is_some_and(RunPhase::is_terminal)
    }
}

fn default_lock() -> String {
    DEFAULT_LOCK.to_string()
}

fn parameters_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "JSON object of parameters",
        "x-kubernetes-preserve-unknown-fields": true,
        "maxProperties": 128
    })
}

/// Exactly one of the three sources (enforced by CEL in the CRD).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotebookSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapNotebook>,
    /// A file inside the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub path: Option<String>,
    /// The ipynb JSON itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1_000_000))]
    pub inline: Option<String>,
    /// In the controller's cache only (never serialized): the SHA-256 of an inline notebook
    /// whose text was dropped from the cached copy; admission reads the text from the API.
    #[serde(skip)]
    #[schemars(skip)]
    pub inline_sha256: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapNotebook {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_notebook_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_notebook_key() -> String {
    DEFAULT_NOTEBOOK_KEY.to_string()
}

/// What a run may change of its pod's security context.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSecurityContext {
    /// The user the runner runs as (never 0: the pod keeps runAsNonRoot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2_147_483_647))]
    pub run_as_user: Option<i64>,
    /// The primary group of the runner's processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2_147_483_647))]
    pub run_as_group: Option<i64>,
    /// The group that owns the pod's volumes (and a supplementary group of its processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2_147_483_647))]
    pub fs_group: Option<i64>,
    /// Mount the image read-only; HOME and TMPDIR are on the pod's own writable volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
}

/// Where a run's end is reported: webhooks, each with its URL in a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notify {
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub webhooks: Vec<Webhook>,
}

/// One webhook: an HTTP POST of the run's outcome when it ends in one of `phases`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// The URL is a secret (Slack's and most chat webhooks carry their credential in it).
    pub url_from: WebhookUrlSource,
    /// The terminal phases reported (default: Failed).
    #[serde(default = "default_notify_phases")]
    #[schemars(length(min = 1, max = 4))]
    pub phases: Vec<RunPhase>,
    /// The body: `json` (the run's outcome) or `slack` (a Slack incoming-webhook message).
    #[serde(default)]
    pub format: NotifyFormat,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookUrlSource {
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret in the run's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    #[default]
    Json,
    Slack,
}

fn default_notify_phases() -> Vec<RunPhase> {
    vec![RunPhase::Failed]
}

/// Durations in Go syntax (`90s`, `10m`, `1h30m`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole run (the Job's activeDeadlineSeconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub run: Option<String>,
    /// Each cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub cell: Option<String>,
    /// The longest time the pod may wait to start (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub start: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConcurrencyPolicy {
    /// Wait for the lock, first come first served.
    #[default]
    Queue,
    /// Fail at once (phase Rejected) when the lock is held.
    Forbid,
    /// Cancel the holder, then wait for the lock.
    Replace,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, utoipa::ToSchema)]
pub enum RunPhase {
    Pending,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Rejected,
}

impl RunPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled | Self::Rejected)
    }

    /// The original service's (Celery's) vocabulary.
    pub fn seed_status(self) -> &'static str {
        match self {
            Self::Pending | Self::Queued => "PENDING",
            Self::Running => "STARTED",
            Self::Succeeded => "SUCCESS",
            Self::Failed | Self::Rejected => "FAILURE",
            Self::Cancelled => "REVOKED",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Queued => "Queued",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
            Self::Rejected => "Rejected",
        }
    }
}

/// The closed set of reasons used in status, Events and metric labels.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, utoipa::ToSchema)]
pub enum Reason {
    LockHeld,
    Queued,
    Started,
    Succeeded,
    CellError,
    CellTimeout,
    KernelDied,
    InvalidNotebook,
    NotebookNotFound,
    DeadlineExceeded,
    StartTimeout,
    #[serde(rename = "OOMKilled")]
    OomKilled,
    Cancelled,
    Replaced,
    JobDeleted,
    Interrupted,
    PodFailed,
    /// An object the run would create exists and is not the run's own.
    NameConflict,
}

impl Reason {
    pub const ALL: [Reason; 18] = [
        Self::LockHeld,
        Self::Queued,
        Self::Started,
        Self::Succeeded,
        Self::CellError,
        Self::CellTimeout,
        Self::KernelDied,
        Self::InvalidNotebook,
        Self::NotebookNotFound,
        Self::DeadlineExceeded,
        Self::StartTimeout,
        Self::OomKilled,
        Self::Cancelled,
        Self::Replaced,
        Self::JobDeleted,
        Self::Interrupted,
        Self::PodFailed,
        Self::NameConflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LockHeld => "LockHeld",
            Self::Queued => "Queued",
            Self::Started => "Started",
            Self::Succeeded => "Succeeded",
            Self::CellError => "CellError",
            Self::CellTimeout => "CellTimeout",
            Self::KernelDied => "KernelDied",
            Self::InvalidNotebook => "InvalidNotebook",
            Self::NotebookNotFound => "NotebookNotFound",
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::StartTimeout => "StartTimeout",
            Self::OomKilled => "OOMKilled",
            Self::Cancelled => "Cancelled",
            Self::Replaced => "Replaced",
            Self::JobDeleted => "JobDeleted",
            Self::Interrupted => "Interrupted",
            Self::PodFailed => "PodFailed",
            Self::NameConflict => "NameConflict",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotebookRunStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The run holding the lock, while Queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The image the runner's container ran, by digest where the node reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputRef>,
    /// Delivery of `spec.notify`, one entry per webhook and phase; written by the notifier
    /// under its own field manager.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 40))]
    pub notifications: Vec<NotificationStatus>,
}

/// The delivery of one webhook's notification of one phase.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotificationStatus {
    /// Index of the webhook in `spec.notify.webhooks`.
    #[schemars(range(max = 9))]
    pub webhook: u32,
    pub phase: RunPhase,
    pub state: NotificationState,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_time: Option<Time>,
    /// Why the last attempt failed (never the URL: it is a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Time>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NotificationState {
    /// Being delivered (retried with backoff).
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Retries ran out; a Warning Event said so.
    Failed,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub cells_total: u32,
    pub cells_completed: u32,
    /// Index (in the notebook's cell list) of the cell being executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_cell: Option<u32>,
    pub percent: u32,
    /// `completed/total` for the printer column.
    #[serde(default)]
    pub display: String,
}

impl Progress {
    pub fn new(cells_total: u32, cells_completed: u32, current_cell: Option<u32>) -> Self {
        let done = u64::from(cells_completed.min(cells_total));
        let percent = (done * 100).checked_div(u64::from(cells_total)).map_or(100, |p| p as u32);
        Self {
            cells_total,
            cells_completed,
            current_cell,
            percent,
            display: format!("{cells_completed}/{cells_total}"),
        }
    }
}

/// Why a run failed, from the runner's termination message.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evalue: Option<String>,
    /// ANSI-free, at most 4 KiB (the tail is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<u32>,
}

/// Where the executed notebook is kept.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputRef {
    /// ConfigMap owned by the run, key `notebook.ipynb.gz` (binaryData, gzip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// True when the notebook's outputs were cut to fit.
    #[serde(default)]
    pub truncated: bool,
    /// `s3` when the results are in the S3 store (absent: the ConfigMap above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Object key of the executed notebook in the bucket (s3), when the store holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notebook: Option<String>,
    /// Object key of the HTML report (s3), when the store holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// Object key of the full log (s3), when the store holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Why the executed notebook was not kept, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Kubernetes duration syntax used in `timeouts` (`1h30m`, `90s`, `500ms`).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let mut total_ms: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return None;
        };
        total_ms = total_ms.checked_add(n.checked_mul(unit_ms)?)?;
        rest = &rest[len..];
    }
    Some(std::time::Duration::from_millis(total_ms))
}

// === CRD generation ===

/// Optional spec fields, compared one by one by the immutability rule.
const OPTIONAL_SPEC_FIELDS: [&str; 13] = [
    "image",
    "kernel",
    "parameters",
    "env",
    "envFrom",
    "resources",
    "serviceAccountName",
    "nodeSelector",
    "tolerations",
    "securityContext",
    "timeouts",
    "ttlSecondsAfterFinished",
    "notify",
];
const DEFAULTED_SPEC_FIELDS: [&str; 4] = ["notebook", "retries", "lock", "concurrencyPolicy"];
/// Bounds given to every string and list that has none, so CEL cost estimates stay bounded.
const DEFAULT_MAX_STRING: u64 = 4096;
const DEFAULT_MAX_ITEMS: u64 = 64;
const DEFAULT_MAX_PROPERTIES: u64 = 64;

/// The CRD as installed: kube's generated schema plus bounds and CEL rules.
pub fn crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(NotebookRun::crd()).expect("CRD serializes");
    let schema = &mut value["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    bound_schema(schema);
    let spec = &mut schema["properties"]["spec"];
    spec["properties"]["notebook"]["x-kubernetes-validations"] = json!([{
        "rule": "[has(self.configMap), has(self.path), has(self.inline)].filter(x, x).size() == 1",
        "message": "exactly one of notebook.configMap, notebook.path and notebook.inline must be set"
    }]);
    spec["x-kubernetes-validations"] = json!([
        {"rule": immutability_rule(), "message": "spec is immutable except cancel (false to true)"},
        {"rule": "!oldSelf.cancel || self.cancel", "message": "cancel cannot go back from true to false"}
    ]);
    // The name labels the run's Job and pods, and label values hold at most 63 characters.
    schema["x-kubernetes-validations"] = json!([{
        "rule": "self.metadata.name.size() <= 63",
        "message": "a NotebookRun name has at most 63 characters (it labels the run's Job and pods)"
    }]);
    let status = &mut schema["properties"]["status"];
    status["properties"]["conditions"]["x-kubernetes-list-type"] = json!("map");
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = json!(["type"]);
    // One entry per webhook and phase, owned by the notifier's field manager.
    status["properties"]["notifications"]["x-kubernetes-list-type"] = json!("map");
    status["properties"]["notifications"]["x-kubernetes-list-map-keys"] = json!(["webhook", "phase"]);
    notify_rules(&mut schema["properties"]["spec"]["properties"]["notify"]);
    serde_json::from_value(value).expect("CRD deserializes")
}

/// A webhook reports terminal phases only, each once.
fn notify_rules(notify: &mut Value) {
    let phases = &mut notify["properties"]["webhooks"]["items"]["properties"]["phases"];
    phases["x-kubernetes-list-type"] = json!("set");
    phases["x-kubernetes-validations"] = json!([{
        "rule": "self.all(p, p in ['Succeeded', 'Failed', 'Cancelled', 'Rejected'])",
        "message": "phases must be terminal phases: Succeeded, Failed, Cancelled, Rejected"
    }]);
}

fn immutability_rule() -> String {
    let mut parts: Vec<String> =
        DEFAULTED_SPEC_FIELDS.iter().map(|f| format!("self.{f} == oldSelf.{f}")).collect();
    for f in OPTIONAL_SPEC_FIELDS {
        parts.push(format!(
            "(has(self.{f}) ? (has(oldSelf.{f}) && self.{f} == oldSelf.{f}) : !has(oldSelf.{f}))"
        ));
    }
    parts.join(" && ")
}

/// Gives every unbounded string, list and map a bound (kube's schema has none for core types).
pub(crate) fn bound_schema(node: &mut Value) {
    match node {
        Value::Object(map) => {
            let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            match map.get("type").and_then(Value::as_str) {
                Some("string")
                    if !map.contains_key("maxLength")
                        && !map.contains_key("enum")
                        && map.get("format").and_then(Value::as_str) != Some("date-time") =>
                {
                    map.insert("maxLength".into(), json!(DEFAULT_MAX_STRING));
                }
                Some("array") if !map.contains_key("maxItems") => {
                    map.insert("maxItems".into(), json!(DEFAULT_MAX_ITEMS));
                }
                Some("object")
                    if map.contains_key("additionalProperties")
                        && !map.contains_key("maxProperties")
                        && !preserve =>
                {
                    map.insert("maxProperties".into(), json!(DEFAULT_MAX_PROPERTIES));
                }
                _ => {}
            }
            for (_, child) in map.iter_mut() {
                bound_schema(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_schema),
        _ => {}
    }
}

/// `notebook-operator crd`: the YAML written to `crds/notebookrun.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("CRD serializes to YAML");
    format!("# Generated by `notebook-operator crd`; do not edit.\n---\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubernetes() {
        assert_eq!(parse_duration("90s"), Some(std::time::Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(std::time::Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("5d"), None);
    }

    #[test]
    fn reasons_round_trip_through_their_names() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            assert_eq!(serde_json::to_value(r).unwrap(), json!(r.as_str()));
        }
        assert_eq!(Reason::OomKilled.as_str(), "OOMKilled");
    }

    #[test]
    fn seed_status_matches_the_original_vocabulary() {
        assert_eq!(RunPhase::Queued.seed_status(), "PENDING");
        assert_eq!(RunPhase::Running.seed_status(), "STARTED");
        assert_eq!(RunPhase::Rejected.seed_status(), "FAILURE");
        assert_eq!(RunPhase::Cancelled.seed_status(), "REVOKED");
    }

    #[test]
    fn crd_has_rules_bounds_and_columns() {
        let crd = serde_json::to_value(crd()).unwrap();
        let version = &crd["spec"]["versions"][0];
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert!(spec["x-kubernetes-validations"][0]["rule"].as_str().unwrap().contains("oldSelf.image"));
        assert_eq!(spec["properties"]["env"]["maxItems"], json!(DEFAULT_MAX_ITEMS));
        assert_eq!(spec["properties"]["lock"]["maxLength"], json!(63));
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Phase", "Progress", "Lock", "Reason", "Age"]);
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["nbrun"]));
    }

    #[test]
    fn crd_yaml_in_the_repo_is_generated() {
        let committed = include_str!("../crds/notebookrun.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/notebookrun.yaml drifted from the code: run `make crds` (notebook-operator crd > crds/notebookrun.yaml)"
        );
    }
}
