//! The Lease lock: a pure `decide()` over the Lease and the runs sharing the lock, and the
//! API calls that acquire (create), recover (delete a stale Lease) and release it.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Resource, ResourceExt};

use crate::crd::{NotebookRun, RunPhase};

pub const LEASE_DURATION_SECONDS: i32 = 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The Lease names this run.
    Owned,
    /// Nobody holds the lock and nobody older waits: create the Lease.
    Acquire,
    /// The Lease names a run that is gone, finished, or another object with that name: recover it.
    Stale { holder: String },
    /// Another live run holds the lock.
    HeldBy { holder: String },
    /// A Lease of that name that notebook-operator does not manage (never deleted, never cancelled).
    Foreign { holder: String },
    /// The lock is free but an older run waits for it first (FIFO).
    Behind { ahead: String },
}

/// Creation order: creationTimestamp, then name.
fn older(a: &NotebookRun, b: &NotebookRun) -> bool {
    let key = |r: &NotebookRun| (r.metadata.creation_timestamp.as_ref().map(|t| t.0), r.name_any());
    key(a) < key(b)
}

/// Who may hold `run.spec.lock`, from the Lease (if any) and the runs of the namespace.
pub fn decide<'a>(
    run: &NotebookRun,
    lease: Option<&Lease>,
    runs: impl IntoIterator<Item = &'a NotebookRun>,
) -> Decision {
    let lock = &run.spec.lock;
    let me = run.name_any();
    let same_lock: Vec<&NotebookRun> = runs
        .into_iter()
        .filter(|r| &r.spec.lock == lock && r.name_any() != me && r.namespace() == run.namespace())
        .collect();
    if let Some(lease) = lease {
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default();
        let ours = lease.labels().get("app.kubernetes.io/managed-by").map(String::as_str)
            == Some(crate::job::MANAGED_BY);
        if !ours {
            // Someone else's Lease by that name (leader election, say): never ours to delete.
            return Decision::Foreign { holder };
        }
        let owner_uid = lease.metadata.owner_references.iter().flatten().map(|o| o.uid.clone()).next();
        if holder == me {
            // A Lease left by a deleted run of the same name is stale, not ours.
            return if owner_uid.is_none() || owner_uid == run.uid() {
                Decision::Owned
            } else {
                Decision::Stale { holder }
            };
        }
        let holder_run = same_lock.iter().find(|r| r.name_any() == holder);
        return match holder_run {
            Some(h) if !h.is_finished() && (owner_uid.is_none() || owner_uid == h.uid()) => {
                Decision::HeldBy { holder }
            }
            _ => Decision::Stale { holder },
        };
    }
    // No Lease: a run already executing keeps the lock (its Lease was deleted by hand and will be restored).
    if let Some(holder) = same_lock.iter().find(|r| r.phase() == Some(RunPhase::Running)) {
        return Decision::HeldBy { holder: holder.name_any() };
    }
    let ahead = same_lock
        .iter()
        .filter(|r| !r.is_finished() && !r.spec.cancel && older(r, run))
        .filter(|r| r.spec.concurrency_policy != crate::crd::ConcurrencyPolicy::Forbid || r.phase().is_none())
        .min_by(|a, b| if older(a, b) { std::cmp::Ordering::Less } else { std::cmp::Ordering::Greater });
    match ahead {
        Some(a) => Decision::Behind { ahead: a.name_any() },
        None => Decision::Acquire,
    }
}

pub fn lease_for(run: &NotebookRun, now: jiff::Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(run.spec.lock.clone()),
            namespace: run.namespace(),
            labels: Some(crate::job::labels(run)),
            // Deleting the holder frees the lock by garbage collection.
            owner_references: run.controller_owner_ref(&()).map(|mut o| {
                o.controller = Some(false);
                vec![o]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(run.name_any()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            ..Default::default()
        }),
    }
}

/// Create-is-acquire: `Ok(true)` when this run now holds the lock, `Ok(false)` when another won.
pub async fn acquire(leases: &Api<Lease>, run: &NotebookRun) -> kube::Result<bool> {
    match leases.create(&PostParams::default(), &lease_for(run, jiff::Timestamp::now())).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the Lease only if it is still the one we looked at (uid and resourceVersion).
pub async fn delete_exact(leases: &Api<Lease>, lease: &Lease) -> kube::Result<bool> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: lease.uid(), resource_version: lease.resource_version() }),
        ..Default::default()
    };
    match leases.delete(&lease.name_any(), &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Releases the lock if `run` holds it.
pub async fn release(leases: &Api<Lease>, run: &NotebookRun) -> kube::Result<bool> {
    let Some(lease) = leases.get_opt(&run.spec.lock).await? else { return Ok(false) };
    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
    if holder != Some(run.name_any().as_str()) {
        return Ok(false);
    }
    delete_exact(leases, &lease).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConcurrencyPolicy, NotebookRunStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    fn run(name: &str, second: i64, phase: Option<RunPhase>) -> NotebookRun {
        let mut r = NotebookRun::new(
            name,
            serde_json::from_value(serde_json::json!({"notebook": {"path": "/nb"}})).unwrap(),
        );
        r.metadata.namespace = Some("ns".into());
        r.metadata.uid = Some(format!("uid-{name}"));
        r.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(second).unwrap()));
        r.status = phase.map(|p| NotebookRunStatus { phase: Some(p), ..Default::default() });
        r
    }

    fn lease(holder: &str, uid: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                owner_references: Some(vec![OwnerReference { uid: uid.into(), ..Default::default() }]),
                labels: Some(
                    [("app.kubernetes.io/managed-by".to_string(), "notebook-operator".to_string())].into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec { holder_identity: Some(holder.into()), ..Default::default() }),
        }
    }

    #[test]
    fn free_lock_is_acquired() {
        let me = run("a", 1, None);
        assert_eq!(decide(&me, None, [&me]), Decision::Acquire);
    }

    #[test]
    fn own_lease_is_owned_and_a_live_holder_holds() {
        let me = run("b", 2, Some(RunPhase::Queued));
        let holder = run("a", 1, Some(RunPhase::Running));
        assert_eq!(decide(&me, Some(&lease("b", "uid-b")), [&me, &holder]), Decision::Owned);
        assert_eq!(
            decide(&me, Some(&lease("a", "uid-a")), [&me, &holder]),
            Decision::HeldBy { holder: "a".into() }
        );
    }

    #[test]
    fn stale_holders_are_recovered() {
        let me = run("b", 2, None);
        let done = run("a", 1, Some(RunPhase::Succeeded));
        assert_eq!(
            decide(&me, Some(&lease("a", "uid-a")), [&me, &done]),
            Decision::Stale { holder: "a".into() }
        );
        assert_eq!(decide(&me, Some(&lease("gone", "x")), [&me]), Decision::Stale { holder: "gone".into() });
        let recreated = run("a", 1, Some(RunPhase::Running));
        assert_eq!(
            decide(&me, Some(&lease("a", "old-uid")), [&me, &recreated]),
            Decision::Stale { holder: "a".into() }
        );
    }

    #[test]
    fn queue_is_fifo_and_a_running_run_keeps_a_deleted_lease() {
        let first = run("z-first", 1, Some(RunPhase::Queued));
        let me = run("a-second", 2, Some(RunPhase::Queued));
        assert_eq!(decide(&me, None, [&me, &first]), Decision::Behind { ahead: "z-first".into() });
        assert_eq!(decide(&first, None, [&me, &first]), Decision::Acquire);
        let running = run("r", 0, Some(RunPhase::Running));
        assert_eq!(decide(&first, None, [&first, &running]), Decision::HeldBy { holder: "r".into() });
        let mut cancelled = run("c", 0, Some(RunPhase::Queued));
        cancelled.spec.cancel = true;
        assert_eq!(decide(&me, None, [&me, &cancelled]), Decision::Acquire);
    }

    #[test]
    fn foreign_leases_and_same_name_leftovers() {
        let me = run("b", 2, None);
        let mut foreign = lease("someone", "x");
        foreign.metadata.labels = None;
        assert_eq!(decide(&me, Some(&foreign), [&me]), Decision::Foreign { holder: "someone".into() });
        assert_eq!(
            decide(&me, Some(&lease("b", "uid-of-a-deleted-b")), [&me]),
            Decision::Stale { holder: "b".into() }
        );
    }

    #[test]
    fn other_locks_do_not_interfere() {
        let me = run("b", 2, None);
        let mut other = run("a", 1, Some(RunPhase::Running));
        other.spec.lock = "another".into();
        other.spec.concurrency_policy = ConcurrencyPolicy::Queue;
        assert_eq!(decide(&me, None, [&me, &other]), Decision::Acquire);
    }
}
