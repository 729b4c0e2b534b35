//! The Python runner, embedded in the binary so every backend runs the same script.

/// `run.py`: executes a notebook with nbclient and reports progress (DESIGN.md section 6).
pub const RUN_PY: &str = include_str!("run.py");
