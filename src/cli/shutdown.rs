//! How a long-running command learns to stop: a signal, or (for a worker
//! an agent started) its standard input closing.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cancelled on SIGTERM or Ctrl-C: the process drains and exits.
pub(crate) fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot watch SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    cancel.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => info!("interrupted: stopping"),
        }
        cancel.cancel();
    });
    token
}

/// Cancels `shutdown` when stdin reaches its end: the agent that started
/// this worker is gone.
pub(crate) fn stop_when_stdin_closes(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        warn!("the node agent that started this worker is gone: draining");
        shutdown.cancel();
    });
}
