//! The session sweep: idle sessions expire and ended ones are forgotten in
//! the background, on the sweep's own schedule, whatever the workers do (a
//! session is also expired at its next use).

use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::Coordinator;
use crate::Store;

/// Sessions one sweep expires (and forgets) at most; the next sweep takes
/// the rest.
const SWEEP_MAX: usize = 1_000;

/// The longest time between two sweeps.
const SWEEP_AT_MOST_EVERY: Duration = Duration::from_secs(60);

/// Batches of decided calls one sweep deletes at most (each one
/// transaction of up to [`SWEEP_MAX`]): up to 10,000 a minute.
const FORGET_BATCHES: usize = 10;

/// When the sessions were last swept.
#[derive(Debug)]
pub(super) struct Sweeper {
    swept: Instant,
}

impl Sweeper {
    /// A sweeper whose first sweep is one period from now.
    pub(super) fn new() -> Self {
        Self {
            swept: Instant::now(),
        }
    }

    /// Whether a sweep is due (every quarter of the expiry, at most a
    /// minute apart); if it is, it counts as done from now.
    fn due(&mut self, session_idle: Duration) -> bool {
        let every = (session_idle / 4).min(SWEEP_AT_MOST_EVERY);
        if self.swept.elapsed() < every {
            return false;
        }
        self.swept = Instant::now();
        true
    }
}

impl<S: Store> Coordinator<S> {
    /// Deletes the records of calls decided longer than the retention ago,
    /// a bounded batch at a time, stopping at the first batch that is not
    /// full.
    fn forget_decided(&mut self, now: i64) {
        let mut forgotten = 0;
        for _ in 0..FORGET_BATCHES {
            match self.ledger.forget_decided(now, SWEEP_MAX) {
                Ok(n) => {
                    forgotten += n;
                    if n < SWEEP_MAX {
                        break;
                    }
                }
                Err(e) => {
                    warn!("forgetting decided calls: {e}");
                    break;
                }
            }
        }
        if forgotten > 0 {
            info!(
                calls = forgotten,
                "decided calls past the retention forgotten"
            );
        }
    }

    /// Expires idle sessions and forgets those that ended longer than
    /// `session_forget` ago, when a sweep is due.
    pub(super) async fn sweep_sessions(&mut self) {
        if !self.sweeper.due(self.opts.session_idle) {
            return;
        }
        let now = self.clock.now_ms();
        match self.ledger.sweep_sessions(now, SWEEP_MAX) {
            Ok(0) => {}
            Ok(n) => info!(sessions = n, "idle sessions expired"),
            Err(e) => warn!("sweeping idle sessions: {e}"),
        }
        match self.ledger.forget_sessions(now, SWEEP_MAX) {
            Ok(0) => {}
            Ok(n) => info!(sessions = n, "ended sessions forgotten"),
            Err(e) => warn!("forgetting ended sessions: {e}"),
        }
        self.forget_decided(now);
        match self.ledger.commit() {
            Ok(effects) => self.carry_out(effects).await,
            // Nothing expired is durable: the next sweep finds them again.
            Err(e) => error!("committing expired sessions failed: {e}"),
        }
    }
}
