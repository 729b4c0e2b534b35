//! What the controller's cache keeps of each NotebookRun: what a reconcile reads, not what the
//! API server stores. Managed fields, the `kubectl apply` copy of the object and inline notebooks
//! (up to 1 MB each) are dropped on the way into the cache; an inline notebook leaves its SHA-256,
//! and admission reads its text from the API server (`Reconciler::dereference`).

use kube::core::DeserializeGuard;

use crate::crd::NotebookRun;

/// `kubectl apply`'s copy of the whole object, inline notebook included.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops from a run what no cache of runs reads (the controller's, the facade's): managed fields,
/// `kubectl apply`'s copy and the inline notebook's text (its hash stays).
pub fn strip(run: &mut NotebookRun) {
    run.metadata.managed_fields = None;
    if let Some(annotations) = run.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    if let Some(inline) = run.spec.notebook.inline.take() {
        run.spec.notebook.inline_sha256 = Some(crate::job::sha256_hex(inline.as_bytes()));
    }
}

/// Drops from a run what no reconcile reads from the cache.
pub fn slim(run: &mut NotebookRun) {
    strip(run);
    // A finished run is read for its lock, its end and what it still owns (Job, pod, outputs,
    // notifications to deliver), never again for what built its pod or told its story.
    if run.is_finished() {
        let spec = &mut run.spec;
        (spec.parameters, spec.env, spec.env_from, spec.resources) = (None, None, None, None);
        (spec.node_selector, spec.tolerations, spec.security_context) = (None, None, None);
        if let Some(status) = run.status.as_mut() {
            (status.message, status.image_id, status.progress, status.error) = (None, None, None, None);
            status.conditions = Vec::new();
        }
    }
}

/// `slim` for the watch stream, which carries runs that may not parse.
pub fn slim_guard(guard: &mut DeserializeGuard<NotebookRun>) {
    if let Ok(run) = &mut guard.0 {
        slim(run);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    use kube::ResourceExt;

    use super::*;

    #[test]
    fn cached_runs_keep_what_reconciles_read_and_drop_the_rest() {
        let notebook = format!("{{\"cells\": [], \"metadata\": {{\"pad\": \"{}\"}}}}", "x".repeat(100_000));
        let mut run: NotebookRun = serde_json::from_value(serde_json::json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookRun",
            "metadata": {
                "name": "r",
                "namespace": "ns",
                "annotations": {LAST_APPLIED: notebook.clone(), "keep": "me"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {"notebook": {"inline": notebook.clone()}, "lock": "l", "parameters": {"n": 1}},
            "status": {"phase": "Succeeded"}
        }))
        .unwrap();
        assert_eq!(run.metadata.managed_fields.as_ref().map(Vec::len), Some(1));
        let before = serde_json::to_vec(&run).unwrap().len();
        slim(&mut run);
        assert_eq!(run.metadata.managed_fields, None::<Vec<ManagedFieldsEntry>>);
        assert_eq!(run.annotations().get("keep").map(String::as_str), Some("me"));
        assert!(!run.annotations().contains_key(LAST_APPLIED));
        assert_eq!(run.spec.notebook.inline, None);
        assert_eq!(run.spec.notebook.inline_sha256, Some(crate::job::sha256_hex(notebook.as_bytes())));
        assert_eq!((run.spec.lock.as_str(), run.is_finished()), ("l", true));
        assert_eq!(run.spec.parameters, None, "a finished run's pod is never built again");
        let after = serde_json::to_vec(&run).unwrap().len();
        assert!(after < 1_000 && before > 200_000, "{before} -> {after} bytes");
        // The hash never reaches the API server.
        assert!(!serde_json::to_string(&run).unwrap().contains("inlineSha256"));
        // Runs with a path or ConfigMap source keep it as it is.
        let mut by_path = run.clone();
        by_path.spec.notebook = crate::crd::NotebookSource { path: Some("/nb".into()), ..Default::default() };
        slim(&mut by_path);
        assert_eq!(
            (by_path.spec.notebook.path.as_deref(), by_path.spec.notebook.inline_sha256),
            (Some("/nb"), None)
        );
    }

    #[test]
    fn finished_runs_keep_their_lock_end_and_what_they_own() {
        let run = |phase: &str| -> NotebookRun {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "notebooks.dev/v1alpha1",
                "kind": "NotebookRun",
                "metadata": {"name": "r", "namespace": "ns", "finalizers": ["notebooks.dev/lock"]},
                "spec": {"notebook": {"path": "/nb"}, "lock": "l", "parameters": {"n": 1},
                         "ttlSecondsAfterFinished": 60, "cancel": true},
                "status": {"phase": phase, "message": "m", "jobName": "j", "podName": "p",
                           "completionTime": "2026-01-01T00:00:00Z",
                           "error": {"reason": "CellError", "traceback": "x".repeat(10_000)},
                           "output": {"configMap": "r-output"},
                           "conditions": [{"type": "Succeeded", "status": "False", "reason": "CellError",
                                           "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
            }))
            .unwrap()
        };
        let mut running = run("Running");
        slim(&mut running);
        assert!(running.spec.parameters.is_some(), "an unfinished run may still build its pod");
        assert_eq!(running.status.as_ref().unwrap().conditions.len(), 1);
        let mut failed = run("Failed");
        slim(&mut failed);
        let status = failed.status.as_ref().unwrap();
        assert_eq!(
            (status.error.as_ref(), status.message.as_ref(), status.conditions.len()),
            (None, None, 0)
        );
        assert_eq!((status.job_name.as_deref(), status.pod_name.as_deref()), (Some("j"), Some("p")));
        assert!(status.completion_time.is_some() && status.output.is_some());
        assert_eq!(
            (failed.spec.lock.as_str(), failed.spec.ttl_seconds_after_finished, failed.spec.cancel),
            ("l", Some(60), true)
        );
        assert_eq!(failed.finalizers(), ["notebooks.dev/lock"]);
        assert_eq!(failed.spec.parameters, None);
    }
}
