//! The health check task (--check): a watch channel that changes when the check flips.

use super::*;

// ---------------------------------------------------------------------------------------------
// The health check task.

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CheckState {
    /// Not run yet.
    Pending,
    Pass,
    Fail(String),
}

impl CheckState {
    pub(crate) fn passes(&self) -> bool {
        *self == CheckState::Pass
    }
}

/// Runs the check until `stop`; the channel changes only when pass/fail flips.
pub(crate) fn spawn_check(
    check: Check,
    http: reqwest::Client,
    every: Duration,
    stop: CancellationToken,
) -> watch::Receiver<CheckState> {
    let (tx, rx) = watch::channel(CheckState::Pending);
    tokio::spawn(async move {
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = check.run(&http) => r,
            };
            let passing = result.is_ok();
            tx.send_if_modified(|s| {
                let flipped = s.passes() != passing || *s == CheckState::Pending;
                if flipped {
                    *s = match result {
                        Ok(()) => CheckState::Pass,
                        Err(e) => CheckState::Fail(e),
                    };
                }
                flipped
            });
            let wait = if passing { every } else { CHECK_RETRY };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
    rx
}

/// Waits for the check to change; never returns without a check (or once its task is gone).
pub(crate) async fn check_changed(check: &mut Option<watch::Receiver<CheckState>>) {
    match check {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}
