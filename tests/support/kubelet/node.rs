//! The Node object, its Ready heartbeat and its Lease.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::KubeletState;

const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const CPU: &str = "2";
pub const MEMORY: &str = "24Gi";

pub async fn register(state: &KubeletState) -> anyhow::Result<()> {
    let nodes = Api::<Node>::all(state.client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": state.node_name,
            "labels": {
                "kubernetes.io/hostname": state.node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        },
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let registered = now();
    nodes
        .patch_status(
            &state.node_name,
            &PatchParams::default(),
            &Patch::Strategic(node_status(state, &registered)),
        )
        .await?;
    renew_lease(state).await?;
    Ok(())
}

pub async fn heartbeat(state: Arc<KubeletState>) {
    let nodes = Api::<Node>::all(state.client.clone());
    let registered = now();
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let patch = Patch::Strategic(node_status(&state, &registered));
        if let Err(e) = nodes.patch_status(&state.node_name, &PatchParams::default(), &patch).await {
            state.log(format!("node heartbeat failed: {e}"));
        }
        if let Err(e) = renew_lease(&state).await {
            state.log(format!("lease renewal failed: {e}"));
        }
    }
}

fn node_status(state: &KubeletState, since: &Time) -> Value {
    let resources = json!({
        "cpu": CPU,
        "memory": MEMORY,
        "pods": "110",
        "ephemeral-storage": "100Gi",
    });
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now(),
            "lastTransitionTime": since,
        })
    };
    json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                condition("Ready", "True", "KubeletReady", "test kubelet is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "test kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "test kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "test kubelet has sufficient PID available"),
            ],
            "addresses": [
                { "type": "InternalIP", "address": "127.0.0.1" },
                { "type": "Hostname", "address": state.node_name },
            ],
            "daemonEndpoints": { "kubeletEndpoint": { "Port": state.port } },
            "nodeInfo": {
                "machineID": "test-kubelet",
                "systemUUID": "test-kubelet",
                "bootID": "test-kubelet",
                "kernelVersion": "host",
                "osImage": "host processes (test kubelet)",
                "containerRuntimeVersion": "test-kubelet://0",
                "kubeletVersion": "v1.35.4",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        }
    })
}

async fn renew_lease(state: &KubeletState) -> anyhow::Result<()> {
    let leases = Api::<Lease>::namespaced(state.client.clone(), LEASE_NAMESPACE);
    let renew = MicroTime(Timestamp::now());
    let patch = json!({ "spec": { "renewTime": renew } });
    match leases.patch(&state.node_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": { "name": state.node_name, "namespace": LEASE_NAMESPACE },
                "spec": {
                    "holderIdentity": state.node_name,
                    "leaseDurationSeconds": 40,
                    "renewTime": renew,
                },
            }))?;
            leases.create(&PostParams::default(), &lease).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub fn now() -> Time {
    Time(Timestamp::now())
}
