//! The runner's upload reports (`##notebook-operator:results <JSON>` lines) and what the
//! controller makes of them: `status.output` for the s3 store. Pure: no I/O here.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ResultObject;
use crate::crd::OutputRef;

/// Longest `status.output.message`.
const MAX_MESSAGE: usize = 2048;

/// One upload report of the runner.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Upload {
    /// `notebook`, `report` or `log`.
    pub object: String,
    /// True when the store accepted the object.
    pub ok: bool,
    /// The upload at the end of the run (the notebook is also uploaded after every cell).
    #[serde(default, rename = "final")]
    pub last: bool,
    /// The cell after which the notebook was uploaded.
    #[serde(default)]
    pub cell: Option<u32>,
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub sha256: Option<String>,
    /// Why the upload failed, or why the object was not produced (`skipped`).
    #[serde(default)]
    pub error: Option<String>,
    /// The object was not produced at all (an image without nbconvert has no report).
    #[serde(default)]
    pub skipped: bool,
}

impl Upload {
    pub fn parse(json: &str) -> Option<Self> {
        let upload: Upload = serde_json::from_str(json).ok()?;
        ResultObject::from_name(&upload.object).map(|_| upload)
    }

    fn object(&self) -> Option<ResultObject> {
        ResultObject::from_name(&self.object)
    }
}

/// The newest report per object in a log.
pub fn latest_uploads(log: &str) -> BTreeMap<ResultObject, Upload> {
    let mut latest = BTreeMap::new();
    for line in log.lines() {
        if let crate::progress::Line::Results(json) = crate::progress::classify(line)
            && let Some(upload) = Upload::parse(json)
            && let Some(object) = upload.object()
        {
            latest.insert(object, upload);
        }
    }
    latest
}

/// What is known of one object at the end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// The runner reported on it.
    Reported(Upload),
    /// No report (the log is gone, or the runner was killed first): the store was asked.
    Found(Option<u64>),
    /// No report, and the store could not be asked.
    Unknown(String),
}

/// `status.output` of an s3 run from what is known of each object. An object is named only when
/// the store holds it; the message says what is missing or stale, and why.
pub fn output_ref(keys: &BTreeMap<ResultObject, String>, known: &BTreeMap<ResultObject, Known>) -> OutputRef {
    let mut output = OutputRef { store: Some("s3".into()), ..Default::default() };
    let mut notes: Vec<String> = Vec::new();
    for object in ResultObject::ALL {
        let file = object.file_name();
        let kept = match known.get(&object) {
            Some(Known::Reported(u)) if u.ok => {
                if object == ResultObject::Notebook && !u.last {
                    let after = u.cell.map(|c| format!(" after cell {c}")).unwrap_or_default();
                    notes.push(format!(
                        "the runner stopped before its final upload: {file} is the notebook as saved{after}"
                    ));
                }
                true
            }
            Some(Known::Reported(u)) if u.skipped => {
                notes.push(format!("{file} not made: {}", u.error.as_deref().unwrap_or("skipped")));
                false
            }
            Some(Known::Reported(u)) => {
                let why = u.error.as_deref().unwrap_or("unknown error");
                let earlier = if object == ResultObject::Notebook {
                    " (the store may hold an earlier state of it)"
                } else {
                    ""
                };
                notes.push(format!("{file} was not kept: the upload failed: {why}{earlier}"));
                false
            }
            Some(Known::Found(Some(_))) => true,
            Some(Known::Found(None)) | None => {
                notes.push(format!("{file} was not kept: the runner never uploaded it"));
                false
            }
            Some(Known::Unknown(why)) => {
                notes.push(format!("{file}: the results store could not be asked: {why}"));
                false
            }
        };
        if kept {
            let key = keys.get(&object).cloned();
            match object {
                ResultObject::Notebook => output.notebook = key,
                ResultObject::Report => output.report = key,
                ResultObject::Log => output.log = key,
            }
        }
    }
    if !notes.is_empty() {
        output.message = Some(crate::progress::keep_tail(&notes.join("; "), MAX_MESSAGE));
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> BTreeMap<ResultObject, String> {
        ResultObject::ALL.into_iter().map(|o| (o, format!("ns/r/{}", o.file_name()))).collect()
    }

    fn up(json: &str) -> Known {
        Known::Reported(Upload::parse(json).unwrap())
    }

    #[test]
    fn the_newest_report_per_object_wins_and_other_lines_are_ignored() {
        let log = "hello\n\
            ##notebook-operator:results {\"object\":\"notebook\",\"ok\":true,\"cell\":0}\n\
            ##notebook-operator:results {\"object\":\"notebook\",\"ok\":false,\"error\":\"refused\"}\n\
            ##notebook-operator:results {\"object\":\"bogus\",\"ok\":true}\n\
            ##notebook-operator:results {broken\n\
            ##notebook-operator:results {\"object\":\"log\",\"ok\":true,\"final\":true}\n";
        let latest = latest_uploads(log);
        assert_eq!(latest.len(), 2);
        assert!(!latest[&ResultObject::Notebook].ok);
        assert!(latest[&ResultObject::Log].last);
    }

    #[test]
    fn everything_uploaded_names_every_object_without_a_message() {
        let known: BTreeMap<_, _> = [
            (ResultObject::Notebook, up(r#"{"object":"notebook","ok":true,"final":true}"#)),
            (ResultObject::Report, up(r#"{"object":"report","ok":true,"final":true}"#)),
            (ResultObject::Log, up(r#"{"object":"log","ok":true,"final":true}"#)),
        ]
        .into();
        let out = output_ref(&keys(), &known);
        assert_eq!(out.store.as_deref(), Some("s3"));
        assert_eq!(out.notebook.as_deref(), Some("ns/r/notebook.ipynb"));
        assert_eq!(out.report.as_deref(), Some("ns/r/report.html"));
        assert_eq!(out.log.as_deref(), Some("ns/r/log.txt"));
        assert_eq!(out.message, None);
    }

    #[test]
    fn failures_skips_and_a_killed_runner_are_said() {
        let known: BTreeMap<_, _> = [
            (ResultObject::Notebook, up(r#"{"object":"notebook","ok":true,"cell":3}"#)),
            (
                ResultObject::Report,
                up(r#"{"object":"report","ok":false,"skipped":true,"error":"nbconvert is not installed"}"#),
            ),
            (ResultObject::Log, Known::Unknown("connection refused".into())),
        ]
        .into();
        let out = output_ref(&keys(), &known);
        assert_eq!(out.notebook.as_deref(), Some("ns/r/notebook.ipynb"));
        assert_eq!(out.report, None);
        assert_eq!(out.log, None);
        let message = out.message.unwrap();
        assert!(message.contains("as saved after cell 3"), "{message}");
        assert!(message.contains("nbconvert is not installed"), "{message}");
        assert!(message.contains("connection refused"), "{message}");

        let failed = [(
            ResultObject::Notebook,
            up(r#"{"object":"notebook","ok":false,"final":true,"error":"Connection refused"}"#),
        )];
        let out = output_ref(&keys(), &failed.into());
        assert_eq!(out.notebook, None);
        assert!(
            out.message
                .unwrap()
                .contains("notebook.ipynb was not kept: the upload failed: Connection refused")
        );
    }
}
