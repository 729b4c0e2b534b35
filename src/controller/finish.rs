//! Finishing: the outcome from the Job, the executed notebook kept (never a reason to keep the
//! lock), the lock released, the finalizer dropped, and the run deleted when its TTL is up.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::logs::{self, Followed};
use super::{FIELD_MANAGER, LOCK_FINALIZER, Reconciler, Result, background, ignore_not_found, owned_by};
use crate::crd::{NotebookRun, OutputRef, Progress, Reason, RunPhase};
use crate::job;
use crate::progress;
use crate::status::Outcome;

/// Largest gzip'd notebook kept in the output ConfigMap (ConfigMaps hold at most 1 MiB).
const MAX_OUTPUT_GZ: usize = 900 * 1024;

impl Reconciler<'_> {
    /// The Job finished: once its pods stopped, record the outcome and keep the executed notebook.
    pub(super) async fn finish(&self, outcome: Outcome, pods: &[Pod]) -> Result<Action> {
        // A Job past its deadline is failed while its pod still stops.
        if let Some(wait) = self.wait_pods(pods).await? {
            return Ok(wait);
        }
        let pod = pods.last();
        if self.results_in_s3() {
            let output = self.s3_output(pod).await;
            return self.record_outcome(outcome, output, pod.map(ResourceExt::name_any)).await;
        }
        let mut notebook = None;
        if let Some(pod) = pod {
            let api: Api<Pod> = self.api();
            let log =
                logs::tail(&api, &pod.name_any(), logs::TRAILER_TAIL_LINES, logs::TRAILER_LIMIT_BYTES).await;
            notebook = log.as_deref().and_then(progress::notebook_from_log);
        }
        let output = match notebook {
            Some(nb) => Some(self.keep_notebook(&nb).await),
            None => None,
        };
        self.record_outcome(outcome, output, pod.map(ResourceExt::name_any)).await
    }

    async fn record_outcome(
        &self,
        outcome: Outcome,
        output: Option<OutputRef>,
        pod_name: Option<String>,
    ) -> Result<Action> {
        let Outcome { phase, reason, message, error, progress } = outcome;
        self.transition(phase, reason, message, |s| {
            s.error = error;
            if progress.is_some() {
                s.progress = progress;
            } else if phase == RunPhase::Succeeded {
                let total = s.progress.as_ref().map(|p| p.cells_total).unwrap_or_default();
                s.progress = Some(Progress::new(total, total, None));
            }
            s.output = output;
            if pod_name.is_some() {
                s.pod_name = pod_name;
            }
        })
        .await?;
        self.finished().await
    }

    /// Cancelled, and nothing of the run executes any more: keep the partial notebook. A cancel
    /// that raced the notebook's successful end leaves the run Succeeded.
    pub(super) async fn cancelled(&self) -> Result<Action> {
        let Ok(followed) = self.take_followed() else {
            // The follower reads the runner's last lines; it ends within the cancel grace.
            return Ok(Action::requeue(Duration::from_millis(500)));
        };
        let Followed { notebook, succeeded } = followed.unwrap_or_default();
        let pods = self.run_pods().await?;
        let exited_zero = pods.last().and_then(runner_exit_code) == Some(0);
        let output = match notebook {
            _ if self.results_in_s3() => self.s3_output(pods.last()).await,
            Some(nb) => Some(self.keep_notebook(&nb).await),
            None => None,
        };
        if succeeded || exited_zero {
            let outcome = Outcome {
                phase: RunPhase::Succeeded,
                reason: Reason::Succeeded,
                message: "the notebook ran to the end before the cancel could stop it".into(),
                error: None,
                progress: None,
            };
            return self.record_outcome(outcome, output, None).await;
        }
        let (reason, message) = (self.cancel_reason(), self.cancel_message());
        self.transition(RunPhase::Cancelled, reason, message, |s| s.output = output).await?;
        self.finished().await
    }

    /// Stores the executed notebook, gzip, in a ConfigMap owned by the run (outputs cut to fit).
    /// Never fails the run: what could not be kept is said in the returned reference.
    pub(super) async fn keep_notebook(&self, notebook: &[u8]) -> OutputRef {
        let (gz, truncated) = fit_notebook(notebook);
        let cm = job::output_config_map(self.run, gz);
        let name = cm.name_any();
        match self.write_output(cm).await {
            Ok(()) => OutputRef { config_map: Some(name), truncated, ..Default::default() },
            Err(why) => {
                warn!(config_map = %name, why = %why, "executed notebook not kept");
                OutputRef {
                    message: Some(format!("the executed notebook was not kept: {why}")),
                    ..Default::default()
                }
            }
        }
    }

    /// Creates the output ConfigMap, or updates the one this run created before; an object of
    /// that name the run does not own is left as it is.
    async fn write_output(&self, cm: ConfigMap) -> std::result::Result<(), String> {
        let cms: Api<ConfigMap> = self.api();
        let name = cm.name_any();
        let refused = |e: kube::Error| match e {
            kube::Error::Api(ae) => format!("ConfigMap {name} was refused: {}", ae.message),
            other => format!("ConfigMap {name} could not be written: {other}"),
        };
        match cms.create(&PostParams::default(), &cm).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(refused(e)),
        }
        let existing = cms.get_opt(&name).await.map_err(&refused)?;
        if !existing.is_some_and(|c| owned_by(&c.metadata, self.run)) {
            return Err(format!("ConfigMap {name} already exists and does not belong to this run"));
        }
        let mut value = serde_json::to_value(&cm).map_err(|e| e.to_string())?;
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("ConfigMap");
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        cms.patch(&name, &pp, &Patch::Apply(&value)).await.map_err(refused)?;
        Ok(())
    }

    /// Finished: the lock is released, the finalizer dropped, and the run goes when its TTL is up.
    /// Also called right after the terminal transition, so the lock never waits for the cache.
    pub(super) async fn finished(&self) -> Result<Action> {
        crate::failpoint::crash_after("before-release");
        // Cached as finished and without the lock finalizer: the finalizer went only after the
        // lock did (or was never added: the run never held it), and the cache shows writes in
        // order. Nothing to ask the API server: a restart with many finished runs reads nothing.
        let settled = self.run.is_finished() && !self.run.finalizers().iter().any(|f| f == LOCK_FINALIZER);
        if !settled {
            self.release_lock().await?;
        }
        let dropped = self.remove_finalizer().await?;
        if dropped != Action::await_change() {
            return Ok(dropped);
        }
        // Retention looks at this run's lock (many wakes make one pass, at most once a second).
        self.ctx.pruner.wake();
        let status = self.status();
        if let (Some(ttl), Some(done)) = (self.run.spec.ttl_seconds_after_finished, status.completion_time) {
            let due = done.0 + jiff::SignedDuration::from_secs(i64::from(ttl));
            let now = jiff::Timestamp::now();
            if now >= due {
                let runs: Api<NotebookRun> = self.api();
                ignore_not_found(runs.delete(&self.name(), &background()).await)?;
                info!(ttl, "TTL after finish reached: run deleted");
                return Ok(Action::await_change());
            }
            return Ok(Action::requeue(due.duration_since(now).unsigned_abs()));
        }
        Ok(Action::await_change())
    }
}

/// The runner container's exit code, if it ended.
fn runner_exit_code(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == job::CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

/// The notebook gzip'd to fit a ConfigMap: whole, else without outputs, else empty; and whether it was cut.
fn fit_notebook(notebook: &[u8]) -> (Vec<u8>, bool) {
    let gz = progress::gzip(notebook);
    if gz.len() <= MAX_OUTPUT_GZ {
        return (gz, false);
    }
    let gz = progress::gzip(&strip_outputs(notebook));
    if gz.len() <= MAX_OUTPUT_GZ {
        return (gz, true);
    }
    (progress::gzip(b"{\"cells\": [], \"metadata\": {}, \"nbformat\": 4, \"nbformat_minor\": 5}"), true)
}

/// The notebook with every cell's outputs removed, marked as truncated.
fn strip_outputs(notebook: &[u8]) -> Vec<u8> {
    let Ok(mut nb) = serde_json::from_slice::<serde_json::Value>(notebook) else { return Vec::new() };
    if let Some(cells) = nb.get_mut("cells").and_then(serde_json::Value::as_array_mut) {
        for cell in cells {
            if let Some(outputs) = cell.get_mut("outputs") {
                *outputs = json!([]);
            }
        }
    }
    nb["metadata"]["notebook_operator"] = json!({"truncated": true, "note": "outputs removed to fit 1 MiB"});
    serde_json::to_vec(&nb).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn strip_outputs_keeps_sources() {
        let nb = br#"{"cells":[{"cell_type":"code","source":"x","outputs":[{"text":"big"}]}],"metadata":{}}"#;
        let out: serde_json::Value = serde_json::from_slice(&super::strip_outputs(nb)).unwrap();
        assert_eq!(out["cells"][0]["outputs"], serde_json::json!([]));
        assert_eq!(out["cells"][0]["source"], "x");
        assert_eq!(out["metadata"]["notebook_operator"]["truncated"], true);
    }

    #[test]
    fn small_notebooks_fit_whole() {
        let (gz, cut) = super::fit_notebook(br#"{"cells":[]}"#);
        assert!(!cut);
        assert_eq!(crate::progress::gunzip(&gz).unwrap(), br#"{"cells":[]}"#);
    }
}
