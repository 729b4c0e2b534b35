//! Reading a run's objects back for the facade: streamed from the store, never buffered whole.

use futures::TryStreamExt;

use super::{ResultObject, ResultsStore};
use crate::backend::{BackendError, LineSplitter, LogStream, MAX_LINE_BYTES, Stored, read_line_futures};
use crate::crd::NotebookRun;
use crate::progress::{self, Line};

/// An object of `run` in the store. A finished run's object is the one its status names; a
/// running run's notebook is the one uploaded after its last cell so far.
pub async fn stored(
    store: &ResultsStore,
    run: &NotebookRun,
    object: ResultObject,
) -> Result<Stored, BackendError> {
    let id = run.metadata.name.clone().unwrap_or_default();
    let output = run.status.as_ref().and_then(|s| s.output.as_ref());
    let in_s3 = output.is_some_and(|o| o.store.as_deref() == Some("s3"));
    let Some(s3) = store.s3() else {
        if in_s3 {
            return Ok(Stored::Missing(format!(
                "the results of {id} are in the s3 results store, which this server is not configured for \
                 (--results-store s3)"
            )));
        }
        return Ok(Stored::NoStore);
    };
    let key = match output {
        Some(o) if in_s3 => match object {
            ResultObject::Notebook => o.notebook.clone(),
            ResultObject::Report => o.report.clone(),
            ResultObject::Log => o.log.clone(),
        },
        // A run kept in a ConfigMap before the store was switched.
        Some(o) if o.config_map.is_some() => return Ok(Stored::NoStore),
        _ if run.is_finished() => None,
        _ => Some(s3.key(run.metadata.namespace.as_deref().unwrap_or_default(), &id, object)),
    };
    let Some(key) = key else {
        let why = output.and_then(|o| o.message.clone()).unwrap_or_else(|| "it was not kept".into());
        return Ok(Stored::Missing(format!("Run {id} has no {}: {why}", object.file_name())));
    };
    match s3.open(&key).await {
        Ok(Some(object)) => Ok(Stored::Object(object)),
        Ok(None) if run.is_finished() => Ok(Stored::Missing(format!(
            "Run {id} has no {}: the store no longer holds {key}",
            object.file_name()
        ))),
        Ok(None) => Ok(Stored::Missing(format!("Run {id} has no {} yet", object.file_name()))),
        Err(e) => Err(BackendError::Unavailable(format!("cannot read {key}: {e}"))),
    }
}

/// The stored log as `/runs/{id}/logs` shows it: only what the notebook printed (protocol lines
/// dropped), lines bounded and decoded lossily.
pub fn user_log(object: super::StoredObject) -> LogStream {
    let lines = async_stream::try_stream! {
        let mut reader = object.body.into_async_read();
        let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
        while read_line_futures(&mut reader, &mut splitter).await? {
            let text = String::from_utf8_lossy(splitter.line());
            if let Line::Output(out) = progress::classify(&text) {
                yield bytes::Bytes::from(format!("{out}\n"));
            }
        }
    };
    Box::pin(lines)
}
