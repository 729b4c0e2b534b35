//! Where runs execute: the `Backend` trait the REST facade is written against, with two
//! implementations, `kubernetes` (NotebookRuns) and `local` (child processes).

use std::cmp::Ordering;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::crd::{Progress, Reason, RunError, RunPhase};

pub mod kubernetes;
pub mod local;
mod lock_index;
pub mod remote;

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
    /// The current run (see `Standing`), else the last one to finish, if any ever ran.
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
    /// An object of the run in the s3 results store (notebook, report, log), streamed.
    async fn stored(&self, _id: &str, _object: crate::results::ResultObject) -> Result<Stored> {
        Ok(Stored::NoStore)
    }
    /// True once the backend can answer (reflector synced, data dir loaded).
    fn ready(&self) -> bool;
}

/// What the results store holds of a run's object.
pub enum Stored {
    /// This backend keeps results in no object store (the notebook comes from `notebook`).
    NoStore,
    /// The store holds no such object: why, for a person.
    Missing(String),
    Object(crate::results::StoredObject),
}

/// What picking the current run looks at, borrowed from a run of either backend.
#[derive(Debug, Clone, Copy)]
pub struct Standing<'a> {
    pub phase: RunPhase,
    pub created_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub id: &'a str,
}

impl Standing<'_> {
    /// The order of the seed endpoints without `task_id` (greater = more current): a run holding
    /// or waiting for the lock (Running, then Queued, then Pending; among equals the oldest, the
    /// next in line) beats every finished run; finished runs go by completion time, then (times
    /// have second resolution) a run that ran before a Rejected one, then creation time, then id.
    /// Never by creation time alone: a run refused in the same second must not hide the real one.
    pub fn cmp_current(&self, other: &Self) -> Ordering {
        fn rank(phase: RunPhase) -> u8 {
            match phase {
                RunPhase::Running => 3,
                RunPhase::Queued => 2,
                RunPhase::Pending => 1,
                RunPhase::Succeeded | RunPhase::Failed | RunPhase::Cancelled | RunPhase::Rejected => 0,
            }
        }
        let by_rank = rank(self.phase).cmp(&rank(other.phase));
        if by_rank != Ordering::Equal {
            return by_rank;
        }
        if rank(self.phase) > 0 {
            (other.created_at, other.id).cmp(&(self.created_at, self.id))
        } else {
            let ran = |s: &Self| s.phase != RunPhase::Rejected;
            (self.finished_at, ran(self), self.created_at, self.id).cmp(&(
                other.finished_at,
                ran(other),
                other.created_at,
                other.id,
            ))
        }
    }
}

/// Longest line read from a run's output (newline included); the rest of a longer line is
/// skipped, so memory never depends on what a notebook prints.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Cuts a byte stream into lines of at most `max` bytes (newline included), skipping the rest
/// of a longer line; a cut line still ends with `\n`.
#[derive(Debug)]
pub(crate) struct LineSplitter {
    max: usize,
    line: Vec<u8>,
    cut: bool,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), line: Vec::new(), cut: false }
    }

    /// Takes bytes from `buf` up to the end of a line: how many it took, and whether the line
    /// (in `line()`) is complete. Call `clear()` before the next line.
    pub fn feed(&mut self, buf: &[u8]) -> (usize, bool) {
        let (take, ended) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if !self.cut {
            let room = self.max - self.line.len();
            self.line.extend_from_slice(&buf[..take.min(room)]);
            self.cut = take > room;
        }
        if ended && self.cut {
            self.line.truncate(self.max - 1);
            self.line.push(b'\n');
        }
        (take, ended)
    }

    pub fn line(&self) -> &[u8] {
        &self.line
    }

    pub fn clear(&mut self) {
        self.line.clear();
        self.cut = false;
    }
}

/// The next line of `reader` (see `LineSplitter`); false at the end of the input. A last line
/// without a newline is still a line.
pub(crate) async fn read_line<R>(reader: &mut R, lines: &mut LineSplitter) -> std::io::Result<bool>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    lines.clear();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(!lines.line().is_empty());
        }
        let (took, ended) = lines.feed(buf);
        reader.consume(took);
        if ended {
            return Ok(true);
        }
    }
}

/// `read_line` for the futures flavour of `AsyncBufRead` (pod log streams).
pub(crate) async fn read_line_futures<R>(reader: &mut R, lines: &mut LineSplitter) -> std::io::Result<bool>
where
    R: futures::AsyncBufRead + Unpin,
{
    use futures::AsyncBufReadExt;
    lines.clear();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(!lines.line().is_empty());
        }
        let (took, ended) = lines.feed(buf);
        reader.consume_unpin(took);
        if ended {
            return Ok(true);
        }
    }
}

/// Decodes a byte stream chunk by chunk, lossily: an invalid byte becomes U+FFFD and never stops
/// the stream; a character split between two chunks is kept whole.
#[derive(Debug, Default)]
pub(crate) struct LossyDecoder {
    /// The start of a character whose end is in the next chunk (at most 3 bytes).
    carry: Vec<u8>,
}

impl LossyDecoder {
    pub fn decode(&mut self, chunk: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        let mut out = String::with_capacity(bytes.len());
        let mut rest = &bytes[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        None => {
                            self.carry = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// What is left at the end of the stream: an unfinished character, replaced.
    pub fn finish(&mut self) -> String {
        if std::mem::take(&mut self.carry).is_empty() {
            String::new()
        } else {
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
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

    /// A run as `Standing` sees it: id, phase, created and finished (seconds).
    struct Row(&'static str, RunPhase, i64, Option<i64>);

    fn standing(id: &'static str, phase: RunPhase, created: i64, finished: Option<i64>) -> Row {
        Row(id, phase, created, finished)
    }

    fn current(runs: &[Row]) -> &'static str {
        let at = |s: i64| Timestamp::from_second(s).ok();
        let of =
            |r: &Row| Standing { phase: r.1, created_at: at(r.2), finished_at: r.3.and_then(at), id: r.0 };
        runs.iter().max_by(|a, b| of(a).cmp_current(&of(b))).map(|r| r.0).unwrap_or_default()
    }

    #[test]
    fn the_current_run_holds_or_waits_for_the_lock_else_finished_last() {
        use RunPhase::*;
        let table: &[(&str, Vec<Row>, &str)] = &[
            (
                "a run rejected in the same second does not hide the running one",
                vec![
                    standing("a-running", Running, 10, None),
                    standing("z-rejected", Rejected, 10, Some(10)),
                ],
                "a-running",
            ),
            (
                "a newer rejected run does not hide the running one",
                vec![
                    standing("a-running", Running, 10, None),
                    standing("b-rejected", Rejected, 11, Some(11)),
                ],
                "a-running",
            ),
            (
                "the holder before the waiting, the waiting before the unadmitted",
                vec![
                    standing("pending", Pending, 12, None),
                    standing("queued", Queued, 11, None),
                    standing("running", Running, 10, None),
                ],
                "running",
            ),
            (
                "among waiting runs, the next in line",
                vec![standing("second", Queued, 11, None), standing("first", Queued, 10, None)],
                "first",
            ),
            (
                "queued beats every finished run",
                vec![standing("queued", Queued, 1, None), standing("done", Succeeded, 50, Some(60))],
                "queued",
            ),
            (
                "finished runs: the last to finish, not the last created",
                vec![standing("long", Cancelled, 10, Some(30)), standing("refused", Rejected, 12, Some(12))],
                "long",
            ),
            (
                "same completion second: the run that ran, not the one refused after it",
                vec![standing("ran", Cancelled, 10, Some(30)), standing("refused", Rejected, 12, Some(30))],
                "ran",
            ),
            (
                "same completion second: the newer creation",
                vec![standing("old", Succeeded, 10, Some(30)), standing("new", Failed, 20, Some(30))],
                "new",
            ),
        ];
        for (what, runs, want) in table {
            assert_eq!(current(runs), *want, "{what}");
        }
    }

    async fn lines(input: &[u8], max: usize) -> Vec<Vec<u8>> {
        let mut reader = tokio::io::BufReader::with_capacity(7, input);
        let mut lines = LineSplitter::new(max);
        let mut out = Vec::new();
        while read_line(&mut reader, &mut lines).await.unwrap() {
            out.push(lines.line().to_vec());
        }
        let mut reader = futures::io::BufReader::with_capacity(5, input);
        let mut again = Vec::new();
        while read_line_futures(&mut reader, &mut lines).await.unwrap() {
            again.push(lines.line().to_vec());
        }
        assert_eq!(out, again, "both flavours cut alike");
        out
    }

    #[tokio::test]
    async fn lines_are_capped_and_the_rest_skipped() {
        let long = format!("{}\n", "x".repeat(100));
        let input = format!("short\n{long}after\nno newline");
        let got = lines(input.as_bytes(), 16).await;
        let want: Vec<Vec<u8>> = vec![
            b"short\n".to_vec(),
            format!("{}\n", "x".repeat(15)).into_bytes(),
            b"after\n".to_vec(),
            b"no newline".to_vec(),
        ];
        assert_eq!(got, want);
        assert_eq!(lines(b"exactly16bytes!\n", 16).await, vec![b"exactly16bytes!\n".to_vec()]);
        assert!(lines(b"", 16).await.is_empty());
    }

    #[test]
    fn decoding_is_lossy_and_keeps_split_characters() {
        let mut d = LossyDecoder::default();
        let text = "é€😀".as_bytes();
        let mut out = String::new();
        for b in text {
            out.push_str(&d.decode(std::slice::from_ref(b)));
        }
        assert_eq!(out, "é€😀", "characters split byte by byte are kept");
        assert_eq!(d.decode(b"a\xffb\n"), "a\u{fffd}b\n", "one odd byte is replaced, the rest kept");
        assert_eq!(d.decode(b"c\xe2\x82"), "c");
        assert_eq!(d.decode(b"x"), "\u{fffd}x", "a broken sequence is replaced once complete");
        assert_eq!(d.decode(b"\xe2"), "");
        assert_eq!(d.finish(), "\u{fffd}", "an unfinished character at the end is replaced");
    }
}
