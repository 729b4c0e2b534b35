//! Prometheus metrics, shared by the controller and the local backend. Labels are bounded:
//! only the closed set of reasons, never names or error strings.

use std::sync::Arc;

use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::crd::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    runs_started: Counter,
    runs_finished: Family<ReasonLabel, Counter>,
    run_duration: Histogram,
    runs_running: Gauge,
    reconcile_errors: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("notebook_operator");
        let runs_started = Counter::default();
        let runs_finished = Family::<ReasonLabel, Counter>::default();
        let run_duration = Histogram::new([1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0]);
        let runs_running = Gauge::default();
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        registry.register("runs_started", "Runs that started executing", runs_started.clone());
        registry.register("runs_finished", "Runs that finished, by reason", runs_finished.clone());
        registry.register("run_duration_seconds", "Run duration from start to finish", run_duration.clone());
        registry.register("runs_running", "Runs executing now", runs_running.clone());
        registry.register("reconcile_errors", "Reconcile errors, by reason", reconcile_errors.clone());
        Self {
            registry: Arc::new(registry),
            runs_started,
            runs_finished,
            run_duration,
            runs_running,
            reconcile_errors,
        }
    }

    pub fn run_started(&self) {
        self.runs_started.inc();
        self.runs_running.inc();
    }

    pub fn run_finished(&self, reason: Reason, started: Option<Timestamp>, finished: Option<Timestamp>) {
        self.runs_finished.get_or_create(&ReasonLabel { reason: reason.as_str().into() }).inc();
        if let (Some(s), Some(f)) = (started, finished) {
            let secs = f.duration_since(s).as_secs_f64();
            self.run_duration.observe(secs.max(0.0));
            self.runs_running.dec();
        }
    }

    /// Sets the running gauge from an authoritative count (the controller's cache).
    pub fn set_running(&self, n: i64) {
        self.runs_running.set(n);
    }

    pub fn reconcile_error(&self, reason: &'static str) {
        self.reconcile_errors.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
