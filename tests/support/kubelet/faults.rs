//! Faults a test asks of the node, through the environment of a pod's first container (which a
//! NotebookRun's `spec.env` reaches): a node that is slow or unreachable when a pod is deleted, a
//! slow image pull, a kubelet that reports a container's exit late.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

/// Seconds the node waits before it acts on the pod's deletion, or `never`: an unreachable node,
/// whose pod stays Terminating (and its processes alive) until the pod object is force-deleted.
pub const STOP_DELAY_ENV: &str = "TEST_KUBELET_STOP_DELAY";
/// Seconds the pod stays in ContainerCreating before its containers start (a slow pull).
pub const START_DELAY_ENV: &str = "TEST_KUBELET_START_DELAY";
/// Seconds between a main container's exit and the node reporting it (a slow status update).
pub const REPORT_DELAY_ENV: &str = "TEST_KUBELET_REPORT_DELAY";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopDelay {
    After(Duration),
    Never,
}

fn value(pod: &Pod, name: &str) -> Option<String> {
    let container = pod.spec.as_ref()?.containers.first()?;
    container.env.iter().flatten().find(|e| e.name == name)?.value.clone()
}

fn seconds(pod: &Pod, name: &str) -> Option<Duration> {
    value(pod, name)?.parse::<f64>().ok().filter(|s| *s >= 0.0).map(Duration::from_secs_f64)
}

pub fn stop_delay(pod: &Pod) -> Option<StopDelay> {
    match value(pod, STOP_DELAY_ENV)?.as_str() {
        "never" => Some(StopDelay::Never),
        _ => seconds(pod, STOP_DELAY_ENV).map(StopDelay::After),
    }
}

pub fn start_delay(pod: &Pod) -> Option<Duration> {
    seconds(pod, START_DELAY_ENV)
}

pub fn report_delay(pod: &Pod) -> Option<Duration> {
    seconds(pod, REPORT_DELAY_ENV)
}
