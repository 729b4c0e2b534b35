//! The runner's stdout protocol: progress events, the executed-notebook trailer and the
//! termination message. Shared by the controller (pod logs) and the local backend (child stdout).

use std::io::{Read, Write};

use base64::Engine;
use serde::Deserialize;

use crate::crd::{Progress, Reason, RunError};

pub const PROGRESS_PREFIX: &str = "##notebook-operator:progress ";
pub const TRAILER_PREFIX: &str = "##notebook-operator:notebook ";
/// The runner's upload reports with the s3 results store (`results::events`).
pub const RESULTS_PREFIX: &str = "##notebook-operator:results ";
/// Largest executed notebook we decode from a trailer (decompressed).
pub const MAX_NOTEBOOK_BYTES: u64 = 64 * 1024 * 1024;
/// Most cells a progress event may claim: a kernel can print anything to fd 1, so events are
/// checked before they are believed.
pub const MAX_CELLS: u32 = 100_000;

/// Runner exit codes (DESIGN.md section 6).
pub mod exit_code {
    pub const SUCCESS: i32 = 0;
    pub const CELL_ERROR: i32 = 1;
    pub const INVALID_INPUT: i32 = 2;
    pub const CELL_TIMEOUT: i32 = 3;
    pub const KERNEL_DIED: i32 = 4;
    pub const CANCELLED: i32 = 143;
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    #[serde(rename_all = "camelCase")]
    Start { cells_total: u32 },
    #[serde(rename_all = "camelCase")]
    CellStart { cell: u32, cells_completed: u32, cells_total: u32 },
    #[serde(rename_all = "camelCase")]
    CellDone { cell: u32, cells_completed: u32, cells_total: u32 },
    #[serde(rename_all = "camelCase")]
    Finished { reason: String, cells_completed: u32, cells_total: u32 },
}

impl Event {
    /// Whether the numbers hang together (a forged or garbled line is ignored, not believed).
    pub fn is_plausible(&self) -> bool {
        let (total, done, cell) = match *self {
            Event::Start { cells_total } => (cells_total, 0, None),
            Event::CellStart { cell, cells_completed, cells_total } => {
                (cells_total, cells_completed, Some(cell))
            }
            Event::CellDone { cell, cells_completed, cells_total } => {
                (cells_total, cells_completed, Some(cell))
            }
            Event::Finished { cells_completed, cells_total, .. } => (cells_total, cells_completed, None),
        };
        total <= MAX_CELLS && done <= total && cell.is_none_or(|c| c < MAX_CELLS)
    }

    pub fn progress(&self) -> Progress {
        match *self {
            Event::Start { cells_total } => Progress::new(cells_total, 0, None),
            Event::CellStart { cell, cells_completed, cells_total } => {
                Progress::new(cells_total, cells_completed, Some(cell))
            }
            Event::CellDone { cells_completed, cells_total, .. }
            | Event::Finished { cells_completed, cells_total, .. } => {
                Progress::new(cells_total, cells_completed, None)
            }
        }
    }
}

/// One line of runner output, classified.
#[derive(Debug, PartialEq)]
pub enum Line<'a> {
    Event(Event),
    Trailer(&'a str),
    /// An upload report (JSON) of the s3 results store.
    Results(&'a str),
    Output(&'a str),
}

pub fn classify(line: &str) -> Line<'_> {
    let line = line.trim_end_matches(['\r', '\n']);
    // Pod logs may carry a timestamp prefix; the runner's own lines start at column 0.
    if let Some(json) = line.strip_prefix(PROGRESS_PREFIX) {
        if let Ok(event) = serde_json::from_str::<Event>(json)
            && event.is_plausible()
        {
            return Line::Event(event);
        }
    } else if let Some(data) = line.strip_prefix(TRAILER_PREFIX) {
        return Line::Trailer(data);
    } else if let Some(json) = line.strip_prefix(RESULTS_PREFIX) {
        return Line::Results(json);
    }
    Line::Output(line)
}

/// The newest progress in a chunk of log text (None if it has no event).
pub fn latest_progress(log: &str) -> Option<Progress> {
    log.lines().rev().find_map(|l| match classify(l) {
        Line::Event(e) => Some(e.progress()),
        _ => None,
    })
}

/// The executed notebook from a log, if it holds a trailer.
pub fn notebook_from_log(log: &str) -> Option<Vec<u8>> {
    log.lines().rev().find_map(|l| match classify(l) {
        Line::Trailer(data) => decode_trailer(data).ok(),
        _ => None,
    })
}

/// The log with protocol lines removed: what the notebook itself printed.
pub fn user_output(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    for l in log.lines() {
        if let Line::Output(text) = classify(l) {
            out.push_str(text);
            out.push('\n');
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum TrailerError {
    #[error("trailer is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("trailer is not gzip: {0}")]
    Gzip(#[from] std::io::Error),
    #[error("executed notebook is larger than {MAX_NOTEBOOK_BYTES} bytes")]
    TooLarge,
}

pub fn decode_trailer(data: &str) -> Result<Vec<u8>, TrailerError> {
    let gz = base64::engine::general_purpose::STANDARD.decode(data.trim())?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).take(MAX_NOTEBOOK_BYTES + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_NOTEBOOK_BYTES {
        return Err(TrailerError::TooLarge);
    }
    Ok(out)
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

pub fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data).take(MAX_NOTEBOOK_BYTES + 1).read_to_end(&mut out)?;
    Ok(out)
}

/// The runner's termination message (`--termination-log`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TerminationMessage {
    pub reason: Option<String>,
    pub message: Option<String>,
    pub ename: Option<String>,
    pub evalue: Option<String>,
    pub traceback: Option<String>,
    pub cell: Option<u32>,
    pub cells_total: Option<u32>,
    pub cells_completed: Option<u32>,
}

impl TerminationMessage {
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text.trim()).ok()
    }

    pub fn reason(&self) -> Option<Reason> {
        self.reason.as_deref().and_then(Reason::parse)
    }

    /// The status `error` for a failed run (None for success or cancel).
    pub fn error(&self) -> Option<RunError> {
        let reason = self.reason()?;
        if matches!(reason, Reason::Succeeded | Reason::Cancelled) {
            return None;
        }
        Some(RunError {
            reason: Some(reason),
            ename: self.ename.clone(),
            evalue: self.evalue.clone(),
            traceback: self.traceback.as_deref().map(strip_ansi).map(|t| keep_tail(&t, 4096)),
            cell: self.cell,
        })
    }

    pub fn progress(&self) -> Option<Progress> {
        Some(Progress::new(self.cells_total?, self.cells_completed.unwrap_or(0), None))
    }
}

/// The reason a runner exit code stands for, when the termination message is missing.
pub fn reason_for_exit_code(code: i32) -> Reason {
    match code {
        exit_code::SUCCESS => Reason::Succeeded,
        exit_code::CELL_ERROR => Reason::CellError,
        exit_code::INVALID_INPUT => Reason::InvalidNotebook,
        exit_code::CELL_TIMEOUT => Reason::CellTimeout,
        exit_code::KERNEL_DIED => Reason::KernelDied,
        exit_code::CANCELLED => Reason::Cancelled,
        _ => Reason::PodFailed,
    }
}

/// Removes ANSI escape sequences (CSI and OSC), as Jupyter tracebacks are coloured.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('[') => {
                chars.next();
                // Parameters and intermediates, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                chars.next();
                while let Some(c) = chars.next() {
                    if c == '\u{7}' || (c == '\u{1b}' && chars.peek() == Some(&'\\')) {
                        if c == '\u{1b}' {
                            chars.next();
                        }
                        break;
                    }
                }
            }
            _ => {
                chars.next();
            }
        }
    }
    out
}

/// The last `max` bytes of `text`, cut at a character boundary.
pub fn keep_tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_events_trailers_and_output() {
        let l = r#"##notebook-operator:progress {"event":"cell_done","cell":3,"cellsCompleted":2,"cellsTotal":4}"#;
        assert_eq!(classify(l), Line::Event(Event::CellDone { cell: 3, cells_completed: 2, cells_total: 4 }));
        assert_eq!(classify("hello"), Line::Output("hello"));
        assert_eq!(
            classify("##notebook-operator:progress {broken"),
            Line::Output("##notebook-operator:progress {broken")
        );
        assert_eq!(classify("##notebook-operator:notebook abc"), Line::Trailer("abc"));
    }

    #[test]
    fn forged_or_garbled_events_are_not_believed() {
        let max = u32::MAX;
        for json in [
            format!(r#"{{"event":"cell_done","cell":1,"cellsCompleted":{max},"cellsTotal":{max}}}"#),
            r#"{"event":"cell_done","cell":1,"cellsCompleted":5,"cellsTotal":4}"#.to_string(),
            format!(r#"{{"event":"cell_start","cell":{max},"cellsCompleted":0,"cellsTotal":4}}"#),
        ] {
            let line = format!("{PROGRESS_PREFIX}{json}");
            assert!(matches!(classify(&line), Line::Output(_)), "{line}");
        }
        // Even past the parser, percentages cannot overflow.
        assert_eq!(Progress::new(max, max, None).percent, 100);
        assert_eq!(Progress::new(max, max / 2, None).percent, 49);
    }

    #[test]
    fn latest_progress_takes_the_newest_event() {
        let log = "a\n##notebook-operator:progress {\"event\":\"start\",\"cellsTotal\":4}\nb\n\
                   ##notebook-operator:progress {\"event\":\"cell_start\",\"cell\":1,\"cellsCompleted\":1,\"cellsTotal\":4}\n";
        let p = latest_progress(log).unwrap();
        assert_eq!((p.cells_completed, p.cells_total, p.current_cell, p.percent), (1, 4, Some(1), 25));
        assert_eq!(latest_progress("nothing here"), None);
    }

    #[test]
    fn trailer_round_trips() {
        use base64::Engine;
        let nb = br#"{"cells":[],"nbformat":4}"#;
        let line = format!("{TRAILER_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(gzip(nb)));
        assert_eq!(notebook_from_log(&format!("x\n{line}\n")).unwrap(), nb);
        assert!(decode_trailer("!!!").is_err());
    }

    #[test]
    fn strips_ansi_and_keeps_tail() {
        assert_eq!(strip_ansi("\u{1b}[0;31mValueError\u{1b}[0m: bad"), "ValueError: bad");
        assert_eq!(strip_ansi("\u{1b}]8;;http://x\u{7}link\u{1b}]8;;\u{7}"), "link");
        assert_eq!(keep_tail("abcdef", 3), "def");
        assert_eq!(keep_tail("ééé", 3), "é");
    }

    #[test]
    fn termination_message_gives_the_error() {
        let m = TerminationMessage::parse(
            r#"{"reason":"CellError","ename":"ValueError","evalue":"bad","traceback":"\u001b[31mTrace\u001b[0m","cell":2,"cellsTotal":3,"cellsCompleted":1}"#,
        )
        .unwrap();
        let e = m.error().unwrap();
        assert_eq!(e.reason, Some(Reason::CellError));
        assert_eq!(e.traceback.as_deref(), Some("Trace"));
        assert_eq!(e.cell, Some(2));
        assert_eq!(reason_for_exit_code(4), Reason::KernelDied);
    }
}
