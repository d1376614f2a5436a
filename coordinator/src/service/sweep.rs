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

/// The share of each tick spent deleting decided calls at most: a tenth
/// of the heartbeat interval (at least one batch of [`SWEEP_MAX`] a tick).
const FORGET_SHARE: u32 = 10;

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
    /// every tick, a bounded batch at a time, until a batch is not full or
    /// the tick's share of time for it is spent: the deletions keep up
    /// with the calls the cluster decides (a batch of 1,000 takes some
    /// 10 ms on redb, so a tenth of a 1 s tick deletes about 10,000 a
    /// second) and never hold the coordinator up for long.
    pub(super) fn forget_decided(&mut self) {
        let now = self.clock.now_ms();
        let budget = self.opts.heartbeat_interval / FORGET_SHARE;
        let started = std::time::Instant::now();
        let mut forgotten = 0;
        loop {
            match self.ledger.forget_decided(now, SWEEP_MAX) {
                Ok(n) => {
                    forgotten += n;
                    if n < SWEEP_MAX || started.elapsed() >= budget {
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
        match self.ledger.commit() {
            Ok(effects) => self.carry_out(effects).await,
            // Nothing expired is durable: the next sweep finds them again.
            Err(e) => error!("committing expired sessions failed: {e}"),
        }
    }
}
