//! Step 4, the finish: an attempt with traces completes with the
//! coordinator synchronously before its reply goes out (the ledger, not a
//! race, says which outcome the client gets); a traceless one publishes its
//! reply first and hands its completion to the batched outbox. The reply is
//! confirmed by the broker before the delivery is acked.

use callq_broker::telemetry::{self, Attribute};
use callq_broker::{Disposition, Message};
use callq_schemas::protocol::{AnswerBody, CompleteDecision, Completion, Lease, RequestBody};
use callq_schemas::{Call, Reply};
use tokio::sync::oneshot;
use tracing::warn;

use super::WorkerStats;
use super::gate::Passed;
use super::shared::{FlightGuard, Shared};
use crate::link::Link;

/// Completes the attempt and answers its reply, then settles as `then`.
pub(super) async fn finish(
    shared: &Shared,
    call: &Call,
    lease: Lease,
    passed: Passed,
    traces: &[String],
    (reply, then): (Reply, Disposition),
    flight: Option<FlightGuard<'_>>,
) -> Disposition {
    let reply_to = call.reply_to.as_deref();
    WorkerStats::add(&shared.stats.traces, traces.len());
    telemetry::set_current(|| Attribute::new("callq.outcome", reply.outcome.as_str()));
    let Some(link) = &shared.link else {
        return then_if_sent(publish_reply(shared, reply_to, &reply).await, then);
    };
    let attempt = passed.attempt;
    if !traces.is_empty() {
        return match complete_first(shared, link, lease, attempt, &reply, reply_to, None).await {
            Ledgered::Accepted => then_if_sent(publish_reply(shared, reply_to, &reply).await, then),
            Ledgered::Settle(disposition) => disposition,
            Ledgered::SessionRefused { .. } => Disposition::Release,
        };
    }
    let sent = publish_reply(shared, reply_to, &reply).await;
    // The coordinator hears of a traceless completion only when it knows the
    // call: from a heartbeat, or from `resume`.
    let reported = flight.is_some_and(FlightGuard::land);
    if reported || passed.resumed {
        hand_on(
            shared,
            Completion {
                lease,
                attempt,
                reply: passed.resumed.then(|| reply.clone()),
            },
        )
        .await;
    }
    then_if_sent(sent, then)
}

/// Hands a traceless completion to the outbox, which batches it to the
/// coordinator; waits until it is sent, within the coordinator patience.
async fn hand_on(shared: &Shared, completion: Completion) {
    let Some(completions) = &shared.completions else {
        return;
    };
    let (tx, rx) = oneshot::channel();
    // Bounded: a stuck outbox delays the ack, it never holds it.
    let handed_on = async {
        if completions.send((completion, tx)).await.is_ok() {
            let _ = rx.await;
        }
    };
    let _ = tokio::time::timeout(shared.opts.coordinator_patience, handed_on).await;
}

/// What the ledger made of a synchronous completion.
pub(super) enum Ledgered {
    /// Recorded (with the session write, if any): publish the reply.
    Accepted,
    /// Not recorded: settle the delivery so (the `fatal` reply the call got
    /// is published again; a refused or unanswered one goes back for
    /// `resume`).
    Settle(Disposition),
    /// The session write was refused; nothing was recorded.
    SessionRefused { code: String, reason: String },
}

/// Completes an attempt with the ledger before its reply goes out: an
/// attempt with traces, or with a session write.
pub(super) async fn complete_first(
    shared: &Shared,
    link: &Link,
    lease: Lease,
    attempt: u32,
    reply: &Reply,
    reply_to: Option<&str>,
    session: Option<callq_schemas::protocol::SessionWrite>,
) -> Ledgered {
    let stats = &shared.stats;
    let call_id = lease.call_id;
    let asked = link
        .ask(|req_id| RequestBody::Complete {
            req_id,
            lease,
            attempt,
            reply: Some(reply.clone()),
            session: session.clone(),
        })
        .await;
    let decision = match asked {
        Ok(AnswerBody::Complete { decision, .. }) => decision,
        Ok(other) => {
            warn!(worker = %shared.opts.worker_id, %call_id, "unexpected answer to complete: {other:?}");
            return Ledgered::Settle(Disposition::Release);
        }
        Err(e) => {
            warn!(worker = %shared.opts.worker_id, %call_id, "completion not answered, returning the call to its queue: {e}");
            // A late completion is still good (it carries the outcome):
            // the redelivery's `resume` reads it, or runs the call again
            // where it never arrived.
            return Ledgered::Settle(Disposition::Release);
        }
    };
    match decision {
        CompleteDecision::Accepted => Ledgered::Accepted,
        CompleteDecision::SessionRefused { code, reason } => {
            Ledgered::SessionRefused { code, reason }
        }
        CompleteDecision::Fatal { reply } => {
            stats.revoke();
            warn!(worker = %shared.opts.worker_id, %call_id, "the call was decided fatal while it ran; its result is dropped");
            Ledgered::Settle(publish_reply(shared, reply_to, &reply).await)
        }
        CompleteDecision::Refused {
            reason,
            superseded: true,
            reply: decided,
        } => {
            stats.revoke();
            warn!(worker = %shared.opts.worker_id, %call_id, "completion refused, the result is dropped; another delivery carries the call: {reason}");
            // The attempt that decided the call may have died before its
            // reply went out: the recorded one goes out again.
            match decided {
                Some(reply) => Ledgered::Settle(publish_reply(shared, reply_to, &reply).await),
                None => Ledgered::Settle(Disposition::Ack),
            }
        }
        CompleteDecision::Refused { reason, .. } => {
            stats.revoke();
            warn!(worker = %shared.opts.worker_id, %call_id, "completion refused, the result is dropped; the delivery goes back for `resume` to settle: {reason}");
            Ledgered::Settle(Disposition::Release)
        }
    }
}

/// `then` once the reply went out (or could not be heard); the reply's own
/// disposition otherwise.
pub(super) fn then_if_sent(sent: Disposition, then: Disposition) -> Disposition {
    match sent {
        Disposition::Ack => then,
        other => other,
    }
}

/// Publishes a reply where the call asked for one; `Ack` when it has no
/// reply queue.
pub(super) async fn publish_reply(
    shared: &Shared,
    reply_to: Option<&str>,
    reply: &Reply,
) -> Disposition {
    match reply_to {
        None => Disposition::Ack,
        Some(to) => send_reply(shared, to, reply).await,
    }
}

/// Publishes a reply with confirm, retrying transient refusals within the
/// worker's reply retry budget. `Ack` once confirmed, or when nobody can
/// receive it (its queue is gone); `Requeue` when the broker kept refusing.
pub(super) async fn send_reply(shared: &Shared, to: &str, reply: &Reply) -> Disposition {
    let message = Message::new(reply.to_bytes()).key(reply.call_id.to_string());
    let budget = shared.opts.reply_retry;
    let clock = std::time::Instant::now();
    let published =
        callq_broker::publish_within(shared.broker.as_ref(), to, &message, budget).await;
    crate::metrics::reply_published(clock.elapsed());
    match published {
        Ok(()) => Disposition::Ack,
        Err(e @ callq_broker::Error::NoSuchQueue(_)) => {
            // Nobody can ever receive it: the outcome stands, unheard.
            WorkerStats::bump(&shared.stats.reply_failed);
            warn!(worker = %shared.opts.worker_id, to, call_id = %reply.call_id, "reply cannot be delivered, dropping it: {e}");
            Disposition::Ack
        }
        Err(e) => {
            WorkerStats::bump(&shared.stats.reply_failed);
            warn!(worker = %shared.opts.worker_id, to, call_id = %reply.call_id, "reply not confirmed, requeueing the call: {e}");
            Disposition::Requeue
        }
    }
}
