//! Polling with a deadline: the only way tests wait.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, sleep};

const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What a condition passed to [`wait_for`] returns: `true`/`Some(value)` when met.
pub trait Outcome {
    type Value;
    fn into_value(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn into_value(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_value(self) -> Option<T> {
        self
    }
}

/// Polls `condition` until it holds, and panics after `timeout` with `what`.
///
/// ```ignore
/// let pod = wait_for(Duration::from_secs(30), "pod to run", || async {
///     pods.get_opt("p").await.ok().flatten().filter(is_running)
/// }).await;
/// ```
pub async fn wait_for<F, Fut>(
    timeout: Duration,
    what: impl Display,
    condition: F,
) -> <Fut::Output as Outcome>::Value
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Outcome,
{
    match try_wait_for(timeout, condition).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Like [`wait_for`], but returns `None` on timeout instead of panicking.
pub async fn try_wait_for<F, Fut>(
    timeout: Duration,
    mut condition: F,
) -> Option<<Fut::Output as Outcome>::Value>
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Outcome,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await.into_value() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(POLL_INTERVAL.min(deadline - Instant::now())).await;
    }
}
