//! Settled runs leave the run cache. A run that is finished, holds no lock (its lock finalizer is
//! gone, and it went only after the Lease did), is not being deleted and has no TTL to wait out
//! needs no reconcile any more: nothing it could be woken for changes anything. Such a run is
//! taken out of the cache on its way in (the reflector is told it was deleted) and only what
//! retention reads is kept of it, a few strings per run, so the controller's memory does not
//! grow with history (DESIGN.md section 12, benchmark B7).
//!
//! A settled run that changes again comes back: once it is being deleted (`deletionTimestamp`,
//! with our results finalizer still on it) it is unsettled, so the event goes to the cache and
//! wakes its reconcile as before. (A run's spec cannot change after creation, so a run with a
//! TTL is never settled and one without never gets one.)

use std::collections::HashMap;
use std::sync::Mutex;

use futures::{Stream, StreamExt, future};
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::watcher::{self, Event};

use super::LOCK_FINALIZER;
use super::prune::{self, Pruner};
use crate::crd::NotebookRun;

/// A run by namespace and name.
pub(super) type Key = (Option<String>, String);

/// What retention reads of a settled run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub uid: Option<String>,
    pub lock: String,
    pub done: Option<jiff::Timestamp>,
    pub created: Option<jiff::Timestamp>,
}

/// The settled runs retention may prune (`prune::prunable`), by namespace and name.
#[derive(Default)]
pub struct History {
    state: Mutex<State>,
    pruner: Pruner,
}

#[derive(Default)]
struct State {
    runs: HashMap<Key, Entry>,
    /// While the watch lists again: what it listed so far, which replaces `runs` when it is done.
    relisting: Option<HashMap<Key, Entry>>,
}

/// Whether a run needs no more reconciles (see the module's documentation).
pub fn settled(run: &NotebookRun) -> bool {
    run.is_finished()
        && run.metadata.deletion_timestamp.is_none()
        && run.spec.ttl_seconds_after_finished.is_none()
        && !run.finalizers().iter().any(|f| f == LOCK_FINALIZER)
}

impl History {
    pub fn new(pruner: Pruner) -> Self {
        Self { state: Mutex::default(), pruner }
    }

    /// The watch stream of runs with the settled ones routed here: an update that settles a run
    /// reaches the cache as its deletion, a settled run in a (re)list does not reach it at all.
    pub fn route<S>(
        self: std::sync::Arc<Self>,
        events: S,
    ) -> impl Stream<Item = Result<Event<DeserializeGuard<NotebookRun>>, watcher::Error>> + Send + use<S>
    where
        S: Stream<Item = Result<Event<DeserializeGuard<NotebookRun>>, watcher::Error>> + Send,
    {
        events.filter_map(move |event| future::ready(event.map(|e| self.observe(e)).transpose()))
    }

    /// One event: recorded here, and what the cache gets instead (None: nothing).
    pub(super) fn observe(
        &self,
        event: Event<DeserializeGuard<NotebookRun>>,
    ) -> Option<Event<DeserializeGuard<NotebookRun>>> {
        let key = |guard: &DeserializeGuard<NotebookRun>| (guard.namespace(), guard.name_any());
        let settled_run =
            |guard: &DeserializeGuard<NotebookRun>| guard.0.as_ref().ok().filter(|r| settled(r)).is_some();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Apply(guard) if settled_run(&guard) => {
                let added = state.record(key(&guard), guard.0.as_ref().ok());
                drop(state);
                if added {
                    self.pruner.wake();
                }
                Some(Event::Delete(guard))
            }
            Event::Apply(guard) => {
                state.runs.remove(&key(&guard));
                Some(Event::Apply(guard))
            }
            Event::Delete(guard) => {
                state.runs.remove(&key(&guard));
                Some(Event::Delete(guard))
            }
            Event::Init => {
                state.relisting = Some(HashMap::new());
                Some(Event::Init)
            }
            Event::InitApply(guard) if settled_run(&guard) => {
                if let (Some(listed), Ok(run)) = (state.relisting.as_mut(), guard.0.as_ref())
                    && prune::prunable(run)
                {
                    listed.insert(key(&guard), entry(run));
                }
                None
            }
            Event::InitApply(guard) => Some(Event::InitApply(guard)),
            Event::InitDone => {
                if let Some(listed) = state.relisting.take() {
                    state.runs = listed;
                }
                drop(state);
                self.pruner.wake();
                Some(Event::InitDone)
            }
        }
    }

    /// The settled runs, by namespace and name, for `f` to read.
    pub(super) fn read<T>(&self, f: impl FnOnce(&HashMap<Key, Entry>) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|e| e.into_inner()).runs)
    }
}

impl State {
    /// Records a settled run if retention may prune it (else forgets it); whether it is new here.
    fn record(&mut self, key: Key, run: Option<&NotebookRun>) -> bool {
        match run.filter(|r| prune::prunable(r)) {
            Some(run) => self.runs.insert(key, entry(run)).is_none(),
            None => {
                self.runs.remove(&key);
                false
            }
        }
    }
}

fn entry(run: &NotebookRun) -> Entry {
    let status = run.status.as_ref();
    Entry {
        uid: run.uid(),
        lock: run.spec.lock.clone(),
        done: status.and_then(|s| s.completion_time.as_ref()).map(|t| t.0),
        created: run.metadata.creation_timestamp.as_ref().map(|t| t.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, phase: &str, finalizers: &[&str]) -> DeserializeGuard<NotebookRun> {
        DeserializeGuard(Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookRun",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "finalizers": finalizers,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"notebook": {"path": "/nb"}, "lock": "l"},
            "status": {"phase": phase, "completionTime": "2026-01-01T00:01:00Z"}
        }))
        .unwrap()))
    }

    /// What the cache gets: the kind of event and the run's name.
    fn routed(
        history: &History,
        event: Event<DeserializeGuard<NotebookRun>>,
    ) -> Option<(&'static str, String)> {
        history.observe(event).map(|e| match e {
            Event::Apply(g) => ("apply", g.name_any()),
            Event::Delete(g) => ("delete", g.name_any()),
            Event::InitApply(g) => ("init-apply", g.name_any()),
            Event::Init => ("init", String::new()),
            Event::InitDone => ("init-done", String::new()),
        })
    }

    fn names(history: &History) -> Vec<String> {
        let mut names: Vec<String> = history.read(|runs| runs.keys().map(|k| k.1.clone()).collect());
        names.sort();
        names
    }

    #[test]
    fn a_run_leaves_the_cache_once_settled_and_comes_back_when_deleted() {
        let history = History::default();
        let apply =
            |name, phase, finalizers: &[&str]| routed(&history, Event::Apply(run(name, phase, finalizers)));
        assert_eq!(apply("r", "Running", &[LOCK_FINALIZER]), Some(("apply", "r".into())));
        // Finished, still holding the lock (its finalizer): reconciled until it lets go.
        assert_eq!(apply("r", "Succeeded", &[LOCK_FINALIZER]), Some(("apply", "r".into())));
        assert!(names(&history).is_empty());
        // Settled: the cache is told it went, retention keeps its entry.
        assert_eq!(apply("r", "Succeeded", &["notebooks.dev/results"]), Some(("delete", "r".into())));
        assert_eq!(names(&history), ["r"]);
        let entry = history.read(|runs| runs.values().next().cloned()).unwrap();
        assert_eq!((entry.uid.as_deref(), entry.lock.as_str()), (Some("uid-r"), "l"));
        assert!(entry.done > entry.created);
        // Being deleted (a finalizer of ours still on it): back in the cache, out of retention.
        let mut deleting = run("r", "Succeeded", &["notebooks.dev/results"]);
        deleting.0.as_mut().unwrap().metadata.deletion_timestamp =
            entry.done.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
        assert_eq!(routed(&history, Event::Apply(deleting)), Some(("apply", "r".into())));
        assert!(names(&history).is_empty());
        // Any change that unsettles a run brings it back (a TTL cannot be added to a stored run;
        // the routing does not rely on that).
        assert_eq!(apply("t", "Failed", &[]), Some(("delete", "t".into())));
        let mut ttl = run("t", "Failed", &[]);
        ttl.0.as_mut().unwrap().spec.ttl_seconds_after_finished = Some(60);
        assert_eq!(routed(&history, Event::Apply(ttl)), Some(("apply", "t".into())));
        assert!(names(&history).is_empty());
        assert_eq!(routed(&history, Event::Delete(run("t", "Failed", &[]))), Some(("delete", "t".into())));
    }

    #[test]
    fn a_list_keeps_settled_runs_out_of_the_cache_and_replaces_the_index() {
        let history = History::default();
        routed(&history, Event::Apply(run("deleted-meanwhile", "Succeeded", &[])));
        assert_eq!(routed(&history, Event::Init), Some(("init", String::new())));
        assert_eq!(routed(&history, Event::InitApply(run("old", "Cancelled", &[]))), None);
        assert_eq!(
            routed(&history, Event::InitApply(run("live", "Running", &[LOCK_FINALIZER]))),
            Some(("init-apply", "live".into()))
        );
        // The index in use stays whole until the list is in.
        assert_eq!(names(&history), ["deleted-meanwhile"]);
        assert_eq!(routed(&history, Event::InitDone), Some(("init-done", String::new())));
        assert_eq!(names(&history), ["old"]);
    }

    #[test]
    fn settled_runs_retention_may_not_prune_are_not_indexed() {
        let history = History::default();
        let mut scheduled = run("nightly-1", "Succeeded", &[]);
        scheduled.0.as_mut().unwrap().metadata.labels =
            Some([(prune::SCHEDULE_LABEL.to_string(), "nightly".to_string())].into());
        assert_eq!(routed(&history, Event::Apply(scheduled)), Some(("delete", "nightly-1".into())));
        assert!(names(&history).is_empty());
    }
}
