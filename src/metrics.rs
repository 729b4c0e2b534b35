//! Prometheus metrics of the controller, the local backend and the REST facade. Each process
//! registers only what it updates (`Metrics::new`, `with_api`, `api_only`): a registry of
//! zeros nobody updates would pretend. Labels are bounded: the closed set of reasons, the
//! router's route templates, status classes; never names or error strings.

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template that matched (`/runs/{id}`), or `unmatched`.
    pub route: String,
    /// `2xx`, `4xx`, `5xx`...
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// How the facade answered a start (`/start`, `POST /runs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartOutcome {
    /// A run was admitted (it runs, or ran at once).
    Admitted,
    /// Another run holds the lock.
    Refused,
    /// Anything else: invalid body, no controller, the API server failing.
    Failed,
}

impl StartOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    runs_started: Counter,
    runs_finished: Family<ReasonLabel, Counter>,
    run_duration: Histogram,
    runs_running: Gauge,
    reconcile_errors: Family<ReasonLabel, Counter>,
    leader: Gauge,
    http_requests: Family<RequestLabels, Counter>,
    api_starts: Family<OutcomeLabel, Counter>,
    notifications: Family<OutcomeLabel, Counter>,
    runs_pruned: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The run metrics only: the controller (its own /metrics port).
    pub fn new() -> Self {
        Self::build(true, false)
    }

    /// Run and REST API metrics: the local backend and `all`, which update both.
    pub fn with_api() -> Self {
        Self::build(true, true)
    }

    /// REST API metrics only: `api`, where runs are the controller's to count.
    pub fn api_only() -> Self {
        Self::build(false, true)
    }

    fn build(runs: bool, api: bool) -> Self {
        let mut registry = Registry::with_prefix("notebook_operator");
        let runs_started = Counter::default();
        let runs_finished = Family::<ReasonLabel, Counter>::default();
        let run_duration = Histogram::new([1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0]);
        let runs_running = Gauge::default();
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        let leader = Gauge::default();
        let http_requests = Family::<RequestLabels, Counter>::default();
        let api_starts = Family::<OutcomeLabel, Counter>::default();
        let notifications = Family::<OutcomeLabel, Counter>::default();
        let runs_pruned = Counter::default();
        if runs {
            registry.register(
                "runs_pruned",
                "Finished runs deleted by the history limit (--history-limit)",
                runs_pruned.clone(),
            );
            registry.register("runs_started", "Runs that started executing", runs_started.clone());
            registry.register("runs_finished", "Runs that finished, by reason", runs_finished.clone());
            registry.register(
                "run_duration_seconds",
                "Run duration from start to finish",
                run_duration.clone(),
            );
            registry.register("runs_running", "Runs executing now", runs_running.clone());
            registry.register("reconcile_errors", "Reconcile errors, by reason", reconcile_errors.clone());
            registry.register(
                "leader",
                "1 while this controller reconciles (the elected leader, or the only one), else 0",
                leader.clone(),
            );
            registry.register(
                "notifications",
                "Run-end notifications finished, by outcome (delivered, failed)",
                notifications.clone(),
            );
        }
        if api {
            registry.register(
                "http_requests",
                "REST API requests answered, by route and status class",
                http_requests.clone(),
            );
            registry.register("api_starts", "Starts asked of the REST API, by outcome", api_starts.clone());
        }
        Self {
            registry: Arc::new(registry),
            runs_started,
            runs_finished,
            run_duration,
            runs_running,
            reconcile_errors,
            leader,
            http_requests,
            api_starts,
            notifications,
            runs_pruned,
        }
    }

    /// One answered request; `route` is the router's template, so the label set stays bounded.
    pub fn http_request(&self, route: &str, status: u16) {
        let status = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests.get_or_create(&RequestLabels { route: route.to_string(), status }).inc();
    }

    /// A notification delivered or given up (`delivered`, `failed`).
    pub fn notification(&self, outcome: &'static str) {
        self.notifications.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn api_start(&self, outcome: StartOutcome) {
        self.api_starts.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
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

    pub fn run_pruned(&self) {
        self.runs_pruned.inc();
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_shows_only_what_it_updates() {
        let api = Metrics::api_only();
        api.http_request("/progress", 400);
        api.api_start(StartOutcome::Refused);
        let text = api.render();
        assert!(
            text.contains(r#"notebook_operator_http_requests_total{route="/progress",status="4xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"notebook_operator_api_starts_total{outcome="refused"} 1"#), "{text}");
        assert!(!text.contains("runs_started"), "run metrics are the controller's: {text}");
        let controller = Metrics::new();
        controller.http_request("/progress", 200);
        let controller = controller.render();
        assert!(controller.contains("runs_started") && !controller.contains("http_requests"), "{controller}");
        let both = Metrics::with_api();
        both.http_request("/ping", 200);
        let both = both.render();
        assert!(both.contains("runs_started") && both.contains("http_requests"), "{both}");
    }
}
