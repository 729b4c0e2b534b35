//! Where runs execute: the `Backend` trait the REST facade is written against, with two
//! implementations, `kubernetes` (NotebookRuns) and `local` (child processes).

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::crd::{Progress, Reason, RunError, RunPhase};

pub mod kubernetes;
pub mod local;

/// A run as the API shows it, whichever backend holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunInfo {
    pub id: String,
    pub phase: RunPhase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// The run holding the lock, while Queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
}

pub type LogStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// One page of history, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunPage {
    pub items: Vec<RunInfo>,
    /// Pass as `continue` to get the next page; absent on the last page.
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No run with this id (the seed endpoints answer it 400, as the original did).
    #[error("Could not find task {0}")]
    NotFound(String),
    /// The run exists but what was asked of it does not (yet), e.g. a log before the pod.
    #[error("{0}")]
    Missing(String),
    #[error("Another task is already running: {0}")]
    AlreadyRunning(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl BackendError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// What the REST facade needs from wherever runs execute.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Starts a run now, or fails with `AlreadyRunning` if one holds the lock (policy Forbid).
    async fn start(&self, parameters: Option<Map<String, Value>>) -> Result<RunInfo>;
    /// The newest run (the current one, or the last one), if any ever ran.
    async fn latest(&self) -> Result<Option<RunInfo>>;
    async fn get(&self, id: &str) -> Result<RunInfo>;
    async fn list(&self, limit: usize, continue_token: Option<&str>) -> Result<RunPage>;
    /// Records the cancel; a finished run is left as it is.
    async fn cancel(&self, id: &str) -> Result<RunInfo>;
    /// The executed notebook (ipynb JSON), partial for a failed or cancelled run.
    async fn notebook(&self, id: &str) -> Result<Option<Vec<u8>>>;
    /// What the notebook printed; with `follow`, streams until the run ends.
    async fn logs(&self, id: &str, follow: bool) -> Result<LogStream>;
    async fn delete(&self, id: &str) -> Result<()>;
    /// True once the backend can answer (reflector synced, data dir loaded).
    fn ready(&self) -> bool;
}

/// Sorts runs newest first (creation time, then id) and cuts one page after `continue_token`.
pub fn paginate(mut runs: Vec<RunInfo>, limit: usize, continue_token: Option<&str>) -> Result<RunPage> {
    runs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
    let start = match continue_token {
        None => 0,
        Some(t) => runs.iter().position(|r| r.id == t).map(|i| i + 1).ok_or_else(|| {
            BackendError::InvalidInput(format!(
                "unknown continue token {t:?}: that run is gone; list again from the start"
            ))
        })?,
    };
    let limit = limit.clamp(1, 500);
    let mut items: Vec<RunInfo> = runs.into_iter().skip(start).take(limit + 1).collect();
    let continue_token = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(RunPage { items, continue_token })
}

/// A random UUID v4, as Celery task ids were.
pub(crate) fn new_run_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_uuid_v4_and_dns_names() {
        let id = new_run_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        assert_ne!(id, new_run_id());
    }

    fn run(id: &str, second: i64) -> RunInfo {
        RunInfo {
            id: id.into(),
            phase: RunPhase::Succeeded,
            reason: None,
            message: None,
            progress: None,
            error: None,
            created_at: Timestamp::from_second(second).unwrap(),
            started_at: None,
            finished_at: None,
            parameters: None,
            blocked_by: None,
        }
    }

    #[test]
    fn pages_newest_first_and_refuse_unknown_tokens() {
        let runs = vec![run("a", 1), run("b", 2), run("c", 3)];
        let first = paginate(runs.clone(), 2, None).unwrap();
        assert_eq!(first.items.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["c", "b"]);
        assert_eq!(first.continue_token.as_deref(), Some("b"));
        let second = paginate(runs.clone(), 2, Some("b")).unwrap();
        assert_eq!((second.items.len(), second.continue_token), (1, None));
        assert!(matches!(paginate(runs, 2, Some("gone")), Err(BackendError::InvalidInput(_))));
    }
}
