//! Test support: a real control plane (etcd, kube-apiserver,
//! kube-controller-manager) with a test kubelet that runs containers as host
//! processes or a real node (kubelet, containerd, runc), a fresh namespace per
//! test, and waiting with deadlines.
//!
//! ```ignore
//! mod support;
//! use support::{ControlPlane, wait_for};
//!
//! #[tokio::test]
//! async fn something() {
//!     let cp = ControlPlane::shared();
//!     let ns = cp.namespace("something").await;
//!     let pods: Api<Pod> = ns.api();
//!     // ...
//! }
//! ```

mod certs;
pub mod control_plane;
#[cfg(test)]
#[allow(dead_code)] // the binaries that drive the facade
pub mod facade;
pub mod kubelet;
pub mod namespace;
#[allow(dead_code)] // not every test binary builds notebooks
pub mod notebook;
// Test binaries only: it needs `CARGO_BIN_EXE_*`, which examples do not get.
#[cfg(test)]
#[allow(dead_code)] // used by the operator's test binaries, not by control_plane
pub mod operator;
#[allow(dead_code)] // used by the operator's lock tests
pub mod overlap;
pub mod process;
#[allow(dead_code)] // used by the real-node tests and the dev cluster
pub mod real_node;
#[cfg(test)]
#[allow(dead_code)] // each test binary uses part of the harness
pub mod runs;
#[cfg(test)]
#[allow(dead_code)] // the results-store tests
pub mod s3;
#[cfg(test)]
#[allow(dead_code)] // the binaries that drive a facade over HTTP
pub mod served;
pub mod wait;

#[allow(unused_imports)]
pub use control_plane::{ControlPlane, NodeKind};
#[allow(unused_imports)]
pub use kubelet::{ContainerLifetime, FAILING_REGISTRY};
#[allow(unused_imports)]
pub use namespace::TestNamespace;
#[allow(unused_imports)]
pub use notebook::ipynb;
#[allow(unused_imports)]
pub use wait::{try_wait_for, wait_for};

/// Builds a typed object from JSON (handy for Kubernetes manifests in tests).
#[allow(dead_code)]
pub fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("invalid object: {e}"))
}
