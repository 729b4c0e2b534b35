//! The names of the facade's runs (those of its lock), kept from the watch stream, so that
//! `/progress`, `/runs` and `/start` read a few runs from the cache instead of scanning the
//! namespace's whole history on every request (DESIGN.md section 16, B5).
//!
//! It sees each event before the cache does, so a run the cache has is always named here; a name
//! here whose run the cache does not (yet, or any more) have is skipped by the reader.

use std::collections::BTreeSet;
use std::sync::Mutex;

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::crd::NotebookRun;

#[derive(Debug)]
pub struct LockIndex {
    lock: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    names: BTreeSet<String>,
    /// While the watch lists again: the names seen so far, which replace `names` when it is done.
    relisting: Option<BTreeSet<String>>,
}

impl LockIndex {
    pub fn new(lock: impl Into<String>) -> Self {
        Self { lock: lock.into(), state: Mutex::default() }
    }

    /// Updates the index from one watch event.
    pub fn observe(&self, event: &Event<NotebookRun>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ours = |run: &NotebookRun| run.spec.lock == self.lock;
        match event {
            Event::Apply(run) if ours(run) => {
                state.names.insert(run.name_any());
            }
            // The lock of a run does not change; if it ever did, the run is no longer ours.
            Event::Apply(run) | Event::Delete(run) => {
                state.names.remove(&run.name_any());
            }
            Event::Init => state.relisting = Some(BTreeSet::new()),
            Event::InitApply(run) if ours(run) => {
                state.names.insert(run.name_any());
                state.relisting.get_or_insert_default().insert(run.name_any());
            }
            Event::InitApply(_) => {}
            Event::InitDone => {
                if let Some(seen) = state.relisting.take() {
                    state.names = seen;
                }
            }
        }
    }

    /// The names of the lock's runs.
    pub fn names(&self) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.names.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, lock: &str) -> NotebookRun {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "notebooks.dev/v1alpha1",
            "kind": "NotebookRun",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"notebook": {"path": "/nb"}, "lock": lock}
        }))
        .unwrap()
    }

    #[test]
    fn keeps_the_runs_of_its_lock_only() {
        let index = LockIndex::new("mine");
        index.observe(&Event::Apply(run("a", "mine")));
        index.observe(&Event::Apply(run("b", "other")));
        index.observe(&Event::Apply(run("c", "mine")));
        index.observe(&Event::Apply(run("a", "mine")));
        assert_eq!(index.names(), ["a", "c"]);
        index.observe(&Event::Delete(run("a", "mine")));
        assert_eq!(index.names(), ["c"]);
        // A run whose lock changed (a replaced object of the same name) is no longer ours.
        index.observe(&Event::Apply(run("c", "other")));
        assert!(index.names().is_empty());
    }

    #[test]
    fn a_relist_replaces_what_it_knew_once_done() {
        let index = LockIndex::new("mine");
        index.observe(&Event::Apply(run("gone-while-disconnected", "mine")));
        index.observe(&Event::Apply(run("kept", "mine")));
        index.observe(&Event::Init);
        index.observe(&Event::InitApply(run("kept", "mine")));
        index.observe(&Event::InitApply(run("new", "mine")));
        index.observe(&Event::InitApply(run("theirs", "other")));
        // Until the list is in, old names stay (the cache still has their runs too).
        assert_eq!(index.names(), ["gone-while-disconnected", "kept", "new"]);
        index.observe(&Event::InitDone);
        assert_eq!(index.names(), ["kept", "new"]);
    }
}
