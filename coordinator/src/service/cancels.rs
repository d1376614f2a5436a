//! Cancellations: an operator's `cancel` is decided by the ledger; a call
//! it cancels is announced to every worker (a copy not started is answered
//! `cancelled` without running, an attempt that runs sees its context
//! cancelled), and the most recent ones are told to each worker that joins
//! later.

use std::collections::VecDeque;

use callq_schemas::Uuid;
use callq_schemas::protocol::{Answer, AnswerBody, CancelDecision};

use super::registry::Registry;
use super::{Coordinator, Outbox};
use crate::{Error, Store};

/// Cancelled calls told to a worker that joins, at most: the most recent.
/// An older cancelled call a new worker receives on the fast path runs
/// there; its record still refuses every trace and redelivery.
const RECENT_KEPT: usize = 4096;

/// The most recently cancelled calls, oldest first.
#[derive(Debug, Default)]
pub(super) struct Cancels {
    recent: VecDeque<Uuid>,
}

impl Cancels {
    fn cancelled(&mut self, call_id: Uuid) {
        if self.recent.contains(&call_id) {
            return;
        }
        if self.recent.len() >= RECENT_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(call_id);
    }

    /// The order that tells a worker joining now of the recent
    /// cancellations, if there are any.
    pub(super) fn for_newcomer(&self) -> Option<Answer> {
        (!self.recent.is_empty()).then(|| {
            Answer::new(AnswerBody::Cancelled {
                call_ids: self.recent.iter().copied().collect(),
            })
        })
    }
}

impl<S: Store> Coordinator<S> {
    /// An operator cancels `call_id`: the ledger decides; a call it
    /// cancels is announced to every registered worker once the decision
    /// is durable (the announcements wait in `out` for the group commit).
    pub(super) fn cancel(
        &mut self,
        call_id: Uuid,
        out: &mut Outbox,
    ) -> Result<CancelDecision, Error> {
        let decision = self.ledger.cancel(call_id)?;
        if decision == CancelDecision::Cancelled {
            crate::metrics::count(crate::metrics::CANCELLED);
            self.cancels.cancelled(call_id);
            announce(&self.registry, call_id, out);
        }
        Ok(decision)
    }
}

fn announce(registry: &Registry, call_id: Uuid, out: &mut Outbox) {
    let order = Answer::new(AnswerBody::Cancelled {
        call_ids: vec![call_id],
    });
    for (_, worker) in registry.workers() {
        out.push((worker.queue.clone(), order.clone()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_recent_cancellations_are_bounded_and_deduplicated() {
        let mut c = Cancels::default();
        assert!(c.for_newcomer().is_none());
        let first = Uuid::now_v7();
        c.cancelled(first);
        c.cancelled(first);
        for _ in 0..RECENT_KEPT {
            c.cancelled(Uuid::now_v7());
        }
        let Some(Answer {
            body: AnswerBody::Cancelled { call_ids },
            ..
        }) = c.for_newcomer()
        else {
            panic!("no order");
        };
        assert_eq!(call_ids.len(), RECENT_KEPT);
        assert!(!call_ids.contains(&first), "the oldest went first");
    }
}
