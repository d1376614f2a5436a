//! Delayed calls: a worker that receives a call before its `not_before`
//! hands it over (`defer`); the coordinator holds it in its store, with no
//! worker slot and nothing in the call queue, and every tick publishes the
//! calls that came due, as re-issues.

use callq_schemas::Uuid;
use tracing::{error, info, warn};

use super::Coordinator;
use crate::{Delayed, Store};

/// Calls published per tick at most; the next tick takes the rest.
const RELEASE_MAX: usize = 1_000;

impl<S: Store> Coordinator<S> {
    /// Holds a call until `due_ms`, durably with the batch's commit.
    pub(super) fn defer(&mut self, call_id: Uuid, service: String, due_ms: i64, body: String) {
        self.ledger.defer(Delayed {
            call_id,
            due_ms,
            service,
            body,
            attempt: 2,
        });
    }

    /// Publishes the calls that are due, then lets go of them.
    pub(super) async fn release_delayed(&mut self) {
        let now = self.clock.now_ms();
        let released = match self.ledger.release_due(now, RELEASE_MAX) {
            Ok(ids) if ids.is_empty() => return,
            Ok(ids) => ids,
            Err(e) => {
                warn!("reading the delayed calls that are due: {e}");
                return;
            }
        };
        match self.ledger.commit() {
            Ok(effects) => self.carry_out(effects).await,
            // Nothing is durable: the next tick finds them again.
            Err(e) => {
                error!("committing the release of delayed calls failed: {e}");
                return;
            }
        }
        if let Err(e) = self.ledger.forget_delayed(&released) {
            // Found again next tick: published again, which the ledger's
            // record of each makes harmless.
            warn!("letting go of published delayed calls: {e}");
        }
        info!(
            calls = released.len(),
            "delayed calls came due and were published"
        );
    }
}
