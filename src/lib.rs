//! notebook-operator: run Jupyter notebooks on demand as Kubernetes Jobs (or local processes),
//! one at a time per lock, behind the original notebook runner's REST API.

pub mod api;
pub mod backend;
pub mod controller;
pub mod crd;
pub mod failpoint;
pub mod job;
pub mod leader;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod progress;
pub mod results;
pub mod runner;
pub mod schedule;
pub mod status;
pub mod telemetry;

pub use crd::{NotebookRun, NotebookRunSpec, NotebookRunStatus, Reason, RunPhase};
