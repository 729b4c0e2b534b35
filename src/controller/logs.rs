//! Reading the runner's log through the API server: bytes, bounded by constants, decoded lossily,
//! so one odd byte never loses a notebook or stops progress, and nothing a notebook prints can
//! grow the controller's memory.

use std::time::Duration;

use futures::AsyncReadExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::LogParams;
use tracing::debug;

use crate::backend::{LineSplitter, read_line_futures};
use crate::job;
use crate::progress::{self, Event, Line};

/// Log lines searched for the newest progress event (a chatty cell prints many between polls).
pub const PROGRESS_TAIL_LINES: i64 = 1000;
/// At most this much log is read per progress poll.
pub const PROGRESS_LIMIT_BYTES: i64 = 2 * 1024 * 1024;
/// Log lines searched for the trailer: stderr (the failure's traceback) may land after it.
pub const TRAILER_TAIL_LINES: i64 = 500;
/// At most this much log is read for the trailer, and the longest line kept while following:
/// the base64 of the largest executed notebook the controller keeps, with room to spare.
pub const TRAILER_LIMIT_BYTES: i64 = 48 * 1024 * 1024;

/// The last `tail_lines` lines of the runner's log (at most `limit_bytes`), decoded lossily.
pub async fn tail(pods: &Api<Pod>, pod: &str, tail_lines: i64, limit_bytes: i64) -> Option<String> {
    let lp = LogParams {
        container: Some(job::CONTAINER.into()),
        tail_lines: Some(tail_lines),
        limit_bytes: Some(limit_bytes),
        ..Default::default()
    };
    let read = async {
        let stream = pods.log_stream(pod, &lp).await?;
        let mut bytes = Vec::new();
        // limitBytes bounds the server; take() bounds us whatever the server does.
        stream.take(limit_bytes as u64).read_to_end(&mut bytes).await.map_err(kube::Error::ReadEvents)?;
        Ok::<_, kube::Error>(bytes)
    };
    match read.await {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => {
            debug!(error = %e, pod, "log not readable");
            None
        }
    }
}

/// What following a stopping runner's log found.
#[derive(Debug, Default)]
pub struct Followed {
    /// The executed (partial) notebook from the trailer.
    pub notebook: Option<Vec<u8>>,
    /// The runner reported that the notebook ran to the end before it was stopped.
    pub succeeded: bool,
}

/// Follows the runner's log until it ends or `limit` passes, keeping the newest trailer and
/// whether the runner finished with success.
pub async fn follow(pods: Api<Pod>, pod: String, limit: Duration) -> Followed {
    let lp = LogParams {
        container: Some(job::CONTAINER.into()),
        follow: true,
        tail_lines: Some(TRAILER_TAIL_LINES),
        ..Default::default()
    };
    let mut found = Followed::default();
    let read = async {
        let Ok(stream) = pods.log_stream(&pod, &lp).await else { return };
        let mut stream = Box::pin(stream);
        let mut lines = LineSplitter::new(TRAILER_LIMIT_BYTES as usize);
        while let Ok(true) = read_line_futures(&mut stream, &mut lines).await {
            let text = String::from_utf8_lossy(lines.line());
            match progress::classify(&text) {
                Line::Trailer(data) => {
                    found.notebook = progress::decode_trailer(data).ok().or(found.notebook.take())
                }
                Line::Event(Event::Finished { reason, .. }) => found.succeeded = reason == "Succeeded",
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    found
}
