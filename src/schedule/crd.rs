//! The `NotebookSchedule` custom resource: a cron schedule and the NotebookRun it creates on
//! each tick, its status (ticks, active runs, the last run), and the CRD with bounds and CEL rules.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::crd::{NotebookRunSpec, Reason, RunPhase};

/// When to run and what: a cron schedule and a NotebookRun template.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "notebooks.dev",
    version = "v1alpha1",
    kind = "NotebookSchedule",
    plural = "notebookschedules",
    shortname = "nbsched",
    namespaced,
    status = "NotebookScheduleStatus",
    doc = "Runs a Jupyter notebook on a cron schedule: one NotebookRun per tick",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspend","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Last Result","type":"string","jsonPath":".status.lastRun.phase"}"#,
    printcolumn = r#"{"name":"Next","type":"string","jsonPath":".status.nextScheduleTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NotebookScheduleSpec {
    /// Cron: 5 fields (minute hour day-of-month month day-of-week), 6 with a leading seconds
    /// field, or one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly.
    #[schemars(length(min = 1, max = 128))]
    pub schedule: String,
    /// IANA time zone the schedule is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// `true` creates no runs until set back to false (runs already created go on).
    #[serde(default)]
    pub suspend: bool,
    /// The NotebookRun each tick creates.
    pub run_template: RunTemplate,
    /// A tick missed (controller down, schedule suspended) is still run if no more than this
    /// late; without it, the most recent missed tick is always run (once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub starting_deadline_seconds: Option<i64>,
    /// Succeeded runs kept (older ones are deleted with their children).
    #[serde(default = "default_successful_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub successful_runs_history_limit: i32,
    /// Runs that did not succeed (Failed, Cancelled, Rejected) kept.
    #[serde(default = "default_failed_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub failed_runs_history_limit: i32,
}

fn default_successful_limit() -> i32 {
    3
}

fn default_failed_limit() -> i32 {
    1
}

/// A NotebookRun's labels, annotations and spec. Without `spec.lock` the runs lock on the
/// schedule's name (one run of a schedule at a time).
#[derive(Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    pub spec: NotebookRunSpec,
    /// Whether `spec.lock` was given (NotebookRunSpec fills in its own default).
    #[serde(skip)]
    #[schemars(skip)]
    pub lock_given: bool,
}

impl<'de> Deserialize<'de> for RunTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: Option<TemplateMetadata>,
            spec: Value,
        }
        let raw = Raw::deserialize(deserializer)?;
        let lock_given = raw.spec.get("lock").is_some_and(|l| !l.is_null());
        let spec = serde_json::from_value(raw.spec).map_err(serde::de::Error::custom)?;
        Ok(Self { metadata: raw.metadata, spec, lock_given })
    }
}

impl Serialize for RunTemplate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut spec = serde_json::to_value(&self.spec).map_err(serde::ser::Error::custom)?;
        if !self.lock_given
            && let Some(map) = spec.as_object_mut()
        {
            map.remove("lock");
        }
        let mut out = serde_json::Map::new();
        if let Some(metadata) = &self.metadata {
            out.insert("metadata".into(), serde_json::to_value(metadata).map_err(serde::ser::Error::custom)?);
        }
        out.insert("spec".into(), spec);
        out.serialize(serializer)
    }
}

impl RunTemplate {
    /// The lock the runs take: the template's, else the schedule's name (a lock is a DNS-1123
    /// label: a dot in the name becomes a dash).
    pub fn lock(&self, schedule: &str) -> String {
        if self.lock_given { self.spec.lock.clone() } else { schedule.replace('.', "-") }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotebookScheduleStatus {
    /// The most recent tick a run was created for (or that was skipped as too late).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The next tick (absent while suspended or invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// When the most recent successful run of this schedule finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Time>,
    /// The schedule's runs that have not finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub active: Vec<ObjectReference>,
    /// The newest run of the schedule (ticks and manual runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastRun {
    #[schemars(length(max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

// === CRD generation ===

/// The CRD as installed: kube's generated schema plus bounds and CEL rules.
pub fn crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(NotebookSchedule::crd()).expect("CRD serializes");
    let schema = &mut value["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    crate::crd::bound_schema(schema);
    let template = &mut schema["properties"]["spec"]["properties"]["runTemplate"]["properties"]["spec"];
    // Without a lock the runs lock on the schedule's name, so the schema must not default it.
    if let Some(lock) = template["properties"]["lock"].as_object_mut() {
        lock.remove("default");
    }
    template["properties"]["notebook"]["x-kubernetes-validations"] = json!([{
        "rule": "[has(self.configMap), has(self.path), has(self.inline)].filter(x, x).size() == 1",
        "message": "exactly one of notebook.configMap, notebook.path and notebook.inline must be set"
    }]);
    template["properties"]["cancel"]["x-kubernetes-validations"] = json!([{
        "rule": "!self",
        "message": "a run template cannot be cancelled"
    }]);
    let phases =
        &mut template["properties"]["notify"]["properties"]["webhooks"]["items"]["properties"]["phases"];
    if phases.is_object() {
        phases["x-kubernetes-list-type"] = json!("set");
        phases["x-kubernetes-validations"] = json!([{
            "rule": "self.all(p, p in ['Succeeded', 'Failed', 'Cancelled', 'Rejected'])",
            "message": "phases must be terminal phases: Succeeded, Failed, Cancelled, Rejected"
        }]);
    }
    // The name is a label value on every run (`notebooks.dev/schedule`): at most 63 characters.
    schema["x-kubernetes-validations"] = json!([{
        "rule": "self.metadata.name.size() <= 63",
        "message": "a NotebookSchedule name has at most 63 characters (it labels the schedule's runs)"
    }]);
    let status = &mut schema["properties"]["status"];
    status["properties"]["conditions"]["x-kubernetes-list-type"] = json!("map");
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = json!(["type"]);
    serde_json::from_value(value).expect("CRD deserializes")
}

/// `notebook-operator crd`: the YAML written to `crds/notebookschedule.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("CRD serializes to YAML");
    format!("# Generated by `notebook-operator crd`; do not edit.\n---\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_lock_is_the_schedules_name_unless_given() {
        let t: RunTemplate =
            serde_json::from_value(json!({"spec": {"notebook": {"path": "a.ipynb"}}})).unwrap();
        assert!(!t.lock_given);
        assert_eq!(t.lock("nightly"), "nightly");
        assert!(serde_json::to_value(&t).unwrap()["spec"].get("lock").is_none(), "no lock written back");
        let t: RunTemplate = serde_json::from_value(
            json!({"spec": {"notebook": {"path": "a.ipynb"}, "lock": "notebook-run"}}),
        )
        .unwrap();
        assert_eq!(t.lock("nightly"), "notebook-run");
        let t: RunTemplate =
            serde_json::from_value(json!({"spec": {"notebook": {"path": "a.ipynb"}}})).unwrap();
        assert_eq!(t.lock("team.nightly"), "team-nightly", "a lock is a DNS-1123 label");
    }

    #[test]
    fn crd_has_defaults_rules_and_columns() {
        let crd = serde_json::to_value(crd()).unwrap();
        let version = &crd["spec"]["versions"][0];
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["successfulRunsHistoryLimit"]["default"], json!(3));
        assert_eq!(spec["properties"]["failedRunsHistoryLimit"]["default"], json!(1));
        let template = &spec["properties"]["runTemplate"]["properties"]["spec"];
        assert!(template["properties"]["lock"].get("default").is_none());
        assert!(template["properties"]["notebook"]["x-kubernetes-validations"].is_array());
        assert!(template["properties"]["notify"].is_object(), "notify comes with the run spec");
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Schedule", "Suspend", "Last Result", "Next", "Age"]);
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["nbsched"]));
    }

    #[test]
    fn crd_yaml_in_the_repo_is_generated() {
        let committed = include_str!("../../crds/notebookschedule.yaml");
        assert!(committed == crd_yaml(), "crds/notebookschedule.yaml drifted from the code: run `make crds`");
    }
}
