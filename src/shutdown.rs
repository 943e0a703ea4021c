//! SIGINT/SIGTERM -> a cancellation token every task watches.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGINT or SIGTERM.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // Cancel first: nothing (not even a failing log write) may stand between a signal and
        // the shutdown.
        t.cancel();
        tracing::info!(signal = name, "stopping");
    });
    token
}

/// Logs and otherwise ignores SIGHUP (whose default action would end the process with 129):
/// for the clients, which have nothing to reload. `why` says so in the log line.
pub fn ignore_hangup(why: &'static str) {
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP ignored: {why}");
        }
    });
}
