//! The s3 results store in the run's lifecycle (`crate::results`): presigned URLs for the runner
//! at admission, `status.output` at the end, the objects deleted with the run. An unreachable
//! store never keeps a run from finishing, nor a deletion from completing (bounded retries, then
//! a Warning Event).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::logs;
use super::{Reconciler, Result, locked};
use crate::crd::{OutputRef, parse_duration};
use crate::job;
use crate::results::events::{self, Known};
use crate::results::{ResultObject, presign_expiry};

/// Held by a run whose objects are in the s3 store until they are deleted (the lock finalizer
/// goes when the run finishes; this one stays for the run's lifetime).
pub const RESULTS_FINALIZER: &str = "notebooks.dev/results";
/// The runner's presigned URLs, in the inputs ConfigMap (capabilities for three keys, not credentials).
pub const RESULTS_KEY: &str = "results.json";
/// Attempts at deleting a run's objects before giving up (1s, 2s, 4s, 8s, 16s apart: about 30 s).
const DELETE_ATTEMPTS: u32 = 6;

impl Reconciler<'_> {
    /// With the s3 store: the presigned URLs go into the inputs, and the runner is told to use them.
    pub(super) async fn add_results_urls(&self, inputs: &mut ConfigMap, job: &mut Job) -> Result<()> {
        let Some(store) = self.ctx.config.results.s3() else { return Ok(()) };
        let timeouts = self.run.spec.timeouts.as_ref();
        let run_timeout = timeouts.and_then(|t| t.run.as_deref()).and_then(parse_duration);
        let start_timeout = timeouts.and_then(|t| t.start.as_deref()).and_then(parse_duration);
        let urls = store
            .presign_puts(&self.ns, &self.name(), presign_expiry(run_timeout, start_timeout))
            .await
            .map_err(|e| super::Error::Invalid(e.to_string()))?;
        let text = serde_json::to_string(&urls).map_err(|e| super::Error::Invalid(e.to_string()))?;
        inputs.data.get_or_insert_default().insert(RESULTS_KEY.into(), text);
        let container = job
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
            .and_then(|p| p.containers.iter_mut().find(|c| c.name == job::CONTAINER));
        if let Some(c) = container {
            let args = c.args.get_or_insert_default();
            args.push("--results".into());
            args.push(format!("{}/{RESULTS_KEY}", job::INPUTS_DIR));
        }
        Ok(())
    }

    /// The finalizers a run takes at admission beyond the lock's.
    pub(super) fn results_finalizer(&self) -> Option<&'static str> {
        self.ctx.config.results.s3().map(|_| RESULTS_FINALIZER)
    }

    /// Whether the run was admitted with the s3 store (its runner uploads there), whatever this
    /// controller is configured with now.
    pub(super) fn results_in_s3(&self) -> bool {
        self.run.finalizers().iter().any(|f| f == RESULTS_FINALIZER)
    }

    /// `status.output` with the s3 store: from the runner's upload reports in the pod log; an
    /// object it did not report on (log gone, runner killed) is looked up in the store.
    pub(super) async fn s3_output(&self, pod: Option<&Pod>) -> Option<OutputRef> {
        let Some(store) = self.ctx.config.results.s3() else {
            let message = "the run was admitted with the s3 results store, which this controller is not \
                           configured for (--results-store s3): its objects are not looked at";
            return Some(OutputRef {
                store: Some("s3".into()),
                message: Some(message.into()),
                ..Default::default()
            });
        };
        let mut known: BTreeMap<ResultObject, Known> = BTreeMap::new();
        if let Some(pod) = pod {
            let api: Api<Pod> = self.api();
            let log =
                logs::tail(&api, &pod.name_any(), logs::PROGRESS_TAIL_LINES, logs::PROGRESS_LIMIT_BYTES)
                    .await;
            if let Some(log) = log {
                known.extend(events::latest_uploads(&log).into_iter().map(|(o, u)| (o, Known::Reported(u))));
            }
        }
        let keys: BTreeMap<ResultObject, String> =
            ResultObject::ALL.into_iter().map(|o| (o, store.key(&self.ns, &self.name(), o))).collect();
        for object in ResultObject::ALL {
            if known.contains_key(&object) {
                continue;
            }
            let found = match store.head(&keys[&object]).await {
                Ok(size) => Known::Found(size),
                Err(e) => Known::Unknown(e.to_string()),
            };
            known.insert(object, found);
        }
        let output = events::output_ref(&keys, &known);
        if let Some(message) = &output.message {
            warn!(message = %message, "results not all kept");
        }
        Some(output)
    }

    /// A run being deleted, its pods gone and its lock released: delete its objects, then let it go.
    pub(super) async fn delete_results(&self) -> Result<Action> {
        if !self.run.finalizers().iter().any(|f| f == RESULTS_FINALIZER) {
            return Ok(Action::await_change());
        }
        let uid = self.uid();
        let failure = match self.ctx.config.results.s3() {
            Some(store) => match store.delete_run(&self.ns, &self.name()).await {
                Ok(()) => {
                    info!(bucket = store.bucket(), "results deleted");
                    None
                }
                Err(e) => Some(format!("{e} (bucket {})", store.bucket())),
            },
            None => Some(
                "this controller has no s3 results store (--results-store s3) to delete them from".into(),
            ),
        };
        if let Some(why) = failure {
            let attempts = {
                let mut counts = locked(&self.ctx.results_deletes);
                let n = counts.entry(uid.clone()).or_insert(0);
                *n += 1;
                *n
            };
            if attempts < DELETE_ATTEMPTS && self.ctx.config.results.s3().is_some() {
                warn!(attempts, why = %why, "results not deleted yet; retrying");
                return Ok(Action::requeue(Duration::from_secs(1 << (attempts - 1).min(4))));
            }
            let note = format!(
                "the results of {} were not deleted after {attempts} attempts, the run goes without them: {why}",
                self.name()
            );
            self.event(EventType::Warning, "ResultsNotDeleted", note).await;
        }
        locked(&self.ctx.results_deletes).remove(&uid);
        self.remove_results_finalizer().await
    }

    async fn remove_results_finalizer(&self) -> Result<Action> {
        self.drop_finalizer(RESULTS_FINALIZER).await
    }
}
