//! A local cluster for trying the operator by hand: etcd, kube-apiserver,
//! kube-controller-manager and a node, in the foreground. The node is the test
//! kubelet (containers run as host processes) or, with `--node real`, a real one
//! (kubelet, kube-scheduler, containerd and runc; needs root).
//!
//! ```text
//! cargo run --example dev_cluster                  # or: make dev-cluster
//! cargo run --example dev_cluster -- --node real   # or: make dev-cluster NODE=real
//! ```
//!
//! Writes the admin kubeconfig to `$KUBECONFIG_OUT` (default
//! `.dev-cluster/kubeconfig`) once ready; Ctrl-C or SIGTERM stops every process.

// The shared test module: this binary uses only part of it.
#[allow(dead_code)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::{env, fs};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use support::{ControlPlane, NodeKind};

fn main() -> anyhow::Result<()> {
    let kind = match env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => NodeKind::TestKubelet,
        [flag, node] if flag == "--node" && node == "test" => NodeKind::TestKubelet,
        [flag, node] if flag == "--node" && node == "real" => NodeKind::Real,
        other => anyhow::bail!("usage: dev_cluster [--node test|real] (got {other:?})"),
    };
    let out = PathBuf::from(env::var("KUBECONFIG_OUT").unwrap_or_else(|_| ".dev-cluster/kubeconfig".into()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Listen before starting, so a signal during start-up is not lost.
    let (mut interrupt, mut terminate) = {
        let _guard = runtime.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };

    eprintln!(
        "starting etcd, kube-apiserver, kube-controller-manager and {}...",
        match kind {
            NodeKind::TestKubelet => "the test kubelet",
            NodeKind::Real => "a real node (containerd, kubelet, kube-scheduler)",
        }
    );
    let cp = ControlPlane::try_start_with(kind)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    fs::copy(cp.kubeconfig(), &out).with_context(|| format!("write {}", out.display()))?;
    let out = fs::canonicalize(&out)?;
    print_usage(&cp, &out);

    runtime.block_on(async {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    });
    eprintln!("stopping...");
    drop(cp);
    let _ = fs::remove_file(&out);
    eprintln!("stopped");
    Ok(())
}

fn print_usage(cp: &ControlPlane, kubeconfig: &Path) {
    let (operator, pods) = match cp.node_kind() {
        NodeKind::TestKubelet => (
            "cargo run -- all".to_string(),
            format!(
                "Pods run as host processes (PATH starts with .venv/bin); images are not pulled,
images from {} fail to pull.",
                support::FAILING_REGISTRY
            ),
        ),
        NodeKind::Real => (
            format!(
                "cargo run -- all --default-image {} --image-pull-policy Never",
                support::real_node::RUNNER_IMAGE
            ),
            format!(
                "Pods run in real containers (containerd + runc). Nothing can be pulled: the images are
{}, {} (USER 0) and {}.",
                support::real_node::RUNNER_IMAGE,
                support::real_node::ROOT_IMAGE,
                support::real_node::PAUSE_IMAGE
            ),
        ),
    };
    println!(
        "\ndev cluster ready in {:.1}s: {} (node {})
  export KUBECONFIG={}
  export PATH={}:$PATH    # kubectl, helm
  kubectl get nodes
  {operator}    # the operator against this cluster
{pods}
Logs: {}
Ctrl-C or SIGTERM stops everything.",
        cp.startup_time().as_secs_f64(),
        cp.server(),
        cp.node_name(),
        kubeconfig.display(),
        cp.assets().display(),
        cp.dir().join("logs").display(),
    );
}
