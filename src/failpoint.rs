//! Crash points for fault-injection tests, compiled into debug (test) builds only:
//! `NOTEBOOK_OPERATOR_FAILPOINT=<step>` SIGKILLs the process right after that step, as a crash
//! there would. Release builds read no such variable.

/// Steps: `after-lease`, `after-inputs`, `after-job` (before the Running status), `before-release`
/// (the run finished, its Lease not yet released), `after-create` (the facade created a run and
/// has not answered).
#[cfg(debug_assertions)]
pub fn crash_after(step: &str) {
    if std::env::var("NOTEBOOK_OPERATOR_FAILPOINT").is_ok_and(|s| s == step) {
        tracing::warn!(step, "failpoint: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(debug_assertions))]
pub fn crash_after(_step: &str) {}
