//! Leader election for `controller --leader-elect`: replicas compete for a Lease in the
//! controller's own namespace (kube-lease-manager does the electing and renewing); only the
//! leader runs the controller, and it stops the moment its lease can no longer be trusted.
//!
//! The fence is local and needs no clock agreement: the Lease's `renewTime` is written by this
//! very process, so "renewTime + duration - renew-before" translates into a deadline on this
//! process's monotonic clock. Past it (a renewal that did not come through, or a process that was
//! paused — SIGSTOP, a frozen VM — and resumes) the leader stops reconciling before anyone else
//! may take over. Writes made in flight are refused by the API server's resourceVersion checks.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// How often the leader confirms its own lease record.
const CONFIRM_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// Namespace of the election Lease (the controller's own).
    pub namespace: String,
    /// Name of the election Lease.
    pub lease_name: String,
    /// This replica's identity (the pod name, else host name and pid).
    pub identity: String,
    /// How long a lease stays valid after its last renewal.
    pub lease_duration: Duration,
    /// How long before expiry the leader renews (and stops trusting a lease it could not renew).
    pub renew_before: Duration,
}

/// Whether this process may reconcile now. Without an election it always may.
#[derive(Clone)]
pub struct Leadership(Arc<Mutex<Fence>>);

#[derive(Clone, Copy)]
enum Fence {
    Unconditional,
    Until(Option<Instant>),
}

impl Leadership {
    /// A process that is the only controller (`controller` without `--leader-elect`, `all`).
    pub fn unconditional() -> Self {
        Self(Arc::new(Mutex::new(Fence::Unconditional)))
    }

    fn elected() -> Self {
        Self(Arc::new(Mutex::new(Fence::Until(None))))
    }

    pub fn is_leading(&self) -> bool {
        match *self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Fence::Unconditional => true,
            Fence::Until(until) => until.is_some_and(|t| Instant::now() < t),
        }
    }

    fn set(&self, until: Option<Instant>) {
        let mut fence = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Fence::Until(current) = &mut *fence {
            *current = until;
        }
    }
}

/// The process identity for the election: `POD_NAME`, else host name and pid.
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// Competes for the election Lease until `shutdown`; while this replica leads, runs the future
/// `lead(leadership)` makes, and drops it (stopping every reconcile at once) when the lead is lost.
/// A replica that is not leading is healthy and waits.
pub async fn run_elected<F, Fut>(
    client: Client,
    config: ElectionConfig,
    metrics: Metrics,
    mut lead: F,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LeaseManagerError>
where
    F: FnMut(Leadership) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let secs = |d: Duration| d.as_secs().max(1);
    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(secs(config.lease_duration))
        .with_grace(secs(config.renew_before))
        .build()
        .await?;
    let (mut elected, task) = manager.watch().await;
    let leadership = Leadership::elected();
    let confirm = tokio::spawn(confirm_lease(client, config.clone(), leadership.clone()));
    metrics.set_leader(false);
    info!(identity = %config.identity, lease = %config.lease_name, namespace = %config.namespace, "waiting to lead");
    tokio::pin!(shutdown);
    loop {
        // Standby until elected and the lease record confirms it.
        let became_leader = async {
            loop {
                if *elected.borrow_and_update() && leadership.is_leading() {
                    return true;
                }
                tokio::select! {
                    changed = elected.changed() => if changed.is_err() { return false },
                    () = tokio::time::sleep(CONFIRM_EVERY) => {}
                }
            }
        };
        let leading = tokio::select! {
            leading = became_leader => leading,
            () = &mut shutdown => false,
        };
        if !leading {
            break;
        }
        info!(identity = %config.identity, "leading: reconciling");
        metrics.set_leader(true);
        let lost = async {
            loop {
                tokio::select! {
                    changed = elected.changed() => if changed.is_err() || !*elected.borrow_and_update() { return },
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if !leadership.is_leading() {
                    return;
                }
            }
        };
        let stop = tokio::select! {
            () = lead(leadership.clone()) => true,
            () = lost => {
                warn!(identity = %config.identity, "the lease can no longer be trusted: stopped reconciling");
                false
            }
            () = &mut shutdown => true,
        };
        metrics.set_leader(false);
        if stop {
            break;
        }
    }
    confirm.abort();
    leadership.set(None);
    // Closing the channel makes the manager release the Lease, so a standby takes over at once.
    drop(elected);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(_))) => info!("election Lease released"),
        Ok(Ok(Err(e))) => warn!(error = %e, "could not release the election Lease"),
        _ => warn!("the election Lease was not released in time; it expires by itself"),
    }
    Ok(())
}

/// Keeps the fence: while the Lease names this replica, it is trusted until its renewal (by this
/// process's own clock) plus duration minus renew-before.
async fn confirm_lease(client: Client, config: ElectionConfig, leadership: Leadership) {
    let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
    let trusted = config.lease_duration.saturating_sub(config.renew_before);
    loop {
        let asked = Instant::now();
        let wall = jiff::Timestamp::now();
        match leases.get_opt(&config.lease_name).await {
            Ok(Some(lease)) => {
                let spec = lease.spec.unwrap_or_default();
                let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
                match spec.renew_time.filter(|_| ours) {
                    Some(renewed) => {
                        // Renewed after we looked at the clock: it is at least as fresh as `asked`.
                        let age = if renewed.0 > wall {
                            Duration::ZERO
                        } else {
                            wall.duration_since(renewed.0).unsigned_abs()
                        };
                        leadership.set(trusted.checked_sub(age).map(|left| asked + left));
                    }
                    None => leadership.set(None),
                }
            }
            Ok(None) => leadership.set(None),
            // Unreachable: the fence stays where it was and runs out by itself.
            Err(e) => tracing::debug!(error = %e, "election Lease not readable"),
        }
        tokio::time::sleep(CONFIRM_EVERY).await;
    }
}
