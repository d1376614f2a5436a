//! How a long-running command learns to stop: a signal, or (for a worker
//! an agent started) its standard input closing.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cancelled on SIGTERM or Ctrl-C: the process drains and exits; a second
/// signal ends it at once.
pub(crate) fn shutdown_on_signal() -> CancellationToken {
    on_signal(true)
}

/// As [`shutdown_on_signal`], for a worker an agent started: a second
/// signal does not cut its drain short (Ctrl-C reaches the agent and its
/// workers at once, and the agent then asks each worker to stop).
pub(crate) fn shutdown_on_signal_supervised() -> CancellationToken {
    on_signal(false)
}

fn on_signal(second_exits: bool) -> CancellationToken {
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
        if !second_exits {
            return;
        }
        // A second signal stops the process at once, drained or not.
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        warn!("a second signal: exiting without waiting for the drain");
        std::process::exit(130);
    });
    token
}

/// Cancels `shutdown` when stdin reaches its end: the agent that started
/// this worker is gone. Read on a thread of its own, not the runtime's
/// blocking pool: a read blocked on a pipe that stays open (the agent asked
/// this worker to stop with SIGTERM and waits for it) would otherwise hold
/// the runtime's shutdown, and with it the process, until the agent gave up
/// and killed it.
pub(crate) fn stop_when_stdin_closes(shutdown: CancellationToken) {
    let spawned = std::thread::Builder::new()
        .name("agent-lifeline".into())
        .spawn(move || {
            use std::io::Read as _;
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            warn!("the node agent that started this worker is gone: draining");
            shutdown.cancel();
        });
    if let Err(e) = spawned {
        warn!("cannot watch the node agent's pipe: {e}");
    }
}
