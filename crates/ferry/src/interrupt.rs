//! The one way a command learns it was asked to stop: Ctrl-C (SIGINT) or SIGTERM. Copies
//! cancel cleanly on it (servers started for them are stopped, their sockets removed); the
//! servers shut down.

use std::future::Future;

/// Resolves at the first SIGINT or SIGTERM. The handlers are installed here, before the
/// future is first polled, so a signal that comes in the meantime is not lost.
pub fn interrupted() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
