//! Effects: publishing what the coordinator decided, once it is durable:
//! answers and orders to workers, re-issued copies of dead workers' calls,
//! `fatal` answers to clients, and session change notices.

use std::time::Duration;

use callq_broker::{ATTEMPT_HEADER, Message, call_queue_for};
use callq_schemas::Uuid;
use callq_schemas::protocol::Answer;
use futures::{StreamExt, stream};
use tracing::{debug, error, info, warn};

use super::{Coordinator, IN_FLIGHT, Outbox};
use crate::{Effect, Store};

/// How long the coordinator waits for the broker to confirm one publish.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

impl<S: Store> Coordinator<S> {
    /// Sends answers and orders, their confirms pipelined; a lost one is
    /// asked for again by its worker (decisions are durable) or repeated by
    /// the next tick.
    pub(super) async fn tell(&self, messages: Outbox) {
        stream::iter(messages)
            .for_each_concurrent(IN_FLIGHT, |(to, answer)| async move {
                if let Err(e) = self.publish_answer(&to, &answer).await {
                    warn!(to, "answer not delivered: {e}");
                }
            })
            .await;
    }

    /// Carries out the effects of durable decisions: notices to the readers
    /// of changed sessions, then re-issues and `fatal` answers, their
    /// confirms pipelined.
    pub(super) async fn carry_out(&mut self, mut effects: Vec<Effect>) {
        let notices = self.notices.take_changes(&mut effects, &self.registry);
        self.notify(notices).await;
        stream::iter(effects)
            .for_each_concurrent(IN_FLIGHT, |effect| self.publish_effect(effect))
            .await;
    }

    /// Sends session change notices, their confirms pipelined. A notice is
    /// a hint (a worker checks the version with every call anyway): one
    /// not sent is only logged.
    async fn notify(&self, notices: Outbox) {
        stream::iter(notices)
            .for_each_concurrent(IN_FLIGHT, |(to, answer)| async move {
                if let Err(e) = self.publish_answer(&to, &answer).await {
                    debug!(to, "a session change notice was not sent: {e}");
                }
            })
            .await;
    }

    /// Publishes one answer, order or notice, once, within
    /// [`PUBLISH_TIMEOUT`].
    async fn publish_answer(&self, to: &str, answer: &Answer) -> Result<(), callq_broker::Error> {
        let stamped = Answer {
            epoch: self.ledger.store().epoch(),
            ..answer.clone()
        };
        let publish = self.broker.publish(to, Message::new(stamped.to_bytes()));
        tokio::time::timeout(PUBLISH_TIMEOUT, publish)
            .await
            .unwrap_or(Err(callq_broker::Error::Timeout(PUBLISH_TIMEOUT)))
    }

    /// Publishes a re-issue or a `fatal` answer, tried again until
    /// [`PUBLISH_TIMEOUT`]; one that fails is logged: the decision is
    /// durable, and the next copy's resume learns it.
    async fn publish_effect(&self, effect: Effect) {
        let (to, message) = match effect {
            Effect::Reissue {
                call_id,
                service,
                attempt,
                body,
            } => {
                // The copy goes back to its own band: a body's priority
                // is read where it can be, and a body that does not say
                // goes to the call queue.
                let priority = callq_schemas::peek(&body, body.len()).priority;
                let queue = call_queue_for(&service, priority);
                let message = self.reissued_copy(call_id, &service, attempt, body, priority);
                crate::metrics::count(crate::metrics::REISSUES);
                (queue, message)
            }
            Effect::AnswerFatal { reply_to, reply } => {
                if let Err(e) = callq_schemas::check_reply_to(&reply_to) {
                    warn!(call_id = %reply.call_id, "not answering fatal: {e}");
                    return;
                }
                warn!(call_id = %reply.call_id, "answering fatal: {}", reply.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default());
                crate::metrics::count(crate::metrics::FATAL);
                (
                    reply_to,
                    Message::new(reply.to_bytes()).key(reply.call_id.to_string()),
                )
            }
            Effect::Answer { reply_to, reply } => {
                if let Err(e) = callq_schemas::check_reply_to(&reply_to) {
                    warn!(call_id = %reply.call_id, "not answering a follower: {e}");
                    return;
                }
                debug!(call_id = %reply.call_id, outcome = %reply.outcome, "answering a call that followed another with its idempotency key");
                (
                    reply_to,
                    Message::new(reply.to_bytes()).key(reply.call_id.to_string()),
                )
            }
            // Its notices went out with `notify`.
            Effect::SessionChanged { .. } => return,
        };
        if let Err(e) =
            callq_broker::publish_within(self.broker.as_ref(), &to, &message, PUBLISH_TIMEOUT).await
        {
            error!(to, "publishing a decision's effect failed: {e}");
        }
    }

    /// The new copy of a dead worker's call, carrying its next attempt:
    /// where the broker partitions, into a partition a live worker owns.
    fn reissued_copy(
        &self,
        call_id: Uuid,
        service: &str,
        attempt: u32,
        body: Vec<u8>,
        priority: Option<u8>,
    ) -> Message {
        let message = Message::new(body)
            .header(ATTEMPT_HEADER, attempt.to_string())
            .key(call_id.to_string());
        // Workers report the partitions of their call queue's topic only:
        // a high band's copy goes where its key puts it.
        let high = priority.is_some_and(|p| p >= callq_broker::HIGH_PRIORITY);
        match (!high)
            .then(|| self.registry.live_partition(service, call_id))
            .flatten()
        {
            Some((worker, p)) => {
                info!(%call_id, attempt, service, worker, partition = p, "re-issuing a dead worker's call into a live worker's partition");
                message.partition(p)
            }
            None => {
                info!(%call_id, attempt, service, "re-issuing a dead worker's call");
                message
            }
        }
    }
}
