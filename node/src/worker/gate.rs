//! Step 2, the gate: whether a delivery may run. A redelivery, or a copy
//! above the first, may race another copy or follow an attempt that left
//! traces: the coordinator decides (`resume`). Then the delivery limit and
//! the deadline. A first delivery passes without a coordinator round trip.
//! A call past its delivery limit (its last delivery lost with a worker)
//! never runs: once the coordinator has said whether an attempt left
//! traces, its client is answered.

use callq_broker::{Delivery, Disposition, QueueSpec};
use callq_schemas::protocol::{AnswerBody, KeyedCall, Lease, RequestBody, ResumeDecision};
use callq_schemas::{Call, Reply, codes};
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use super::shared::Shared;
use super::{WorkerStats, finish};
use crate::link::body_digest;

/// How a delivery passed the gate.
#[derive(Debug, Clone, Copy)]
pub(super) struct Passed {
    /// The attempt it runs as.
    pub(super) attempt: u32,
    /// Whether the coordinator was asked `resume` (it then knows the call
    /// and hears of its end).
    pub(super) resumed: bool,
}

/// The dead-letter reason of a copy whose body differs from the one its
/// `call_id` was recorded with.
const BODY_MISMATCH: &str = "body_mismatch";

/// The gate's verdict.
pub(super) enum Gate {
    /// Run the handler.
    Run(Passed),
    /// Do not run it: answer this reply, then settle so.
    Answer(Passed, Reply, Disposition),
    /// Settle so at once: there is nothing (more) to answer.
    Settle(Disposition),
}

/// Asks `resume` where needed, then checks the delivery limit and the
/// deadline.
pub(super) async fn pass(
    shared: &Shared,
    delivery: &Delivery,
    past_limit: bool,
    call: &Call,
    spec: &QueueSpec,
    lease: Lease,
) -> Gate {
    // A first copy that came before its `not_before` waits with the
    // coordinator, holding no slot (a copy it published when the call came
    // due carries attempt 2, and runs).
    if lease.copy == 1 && !past_limit && call.is_early_at(OffsetDateTime::now_utc()) {
        return defer(shared, call, &delivery.body).await;
    }
    let ask = past_limit || delivery.redelivered || lease.copy > 1;
    // The first delivery of a call with an idempotency key claims the key.
    let key = call.idempotency_key.as_deref().filter(|_| !ask);
    let passed = if shared.link.is_some() && (ask || key.is_some()) {
        match resume(shared, call, lease, &delivery.body, key).await {
            Ok(attempt) => Passed {
                attempt,
                resumed: true,
            },
            Err(fate) => return Gate::Settle(fate),
        }
    } else {
        Passed {
            attempt: lease.copy,
            resumed: false,
        }
    };
    let stats = &shared.stats;
    // Deliveries that did not complete: the broker counts those of this
    // copy; the attempt number counts the lost attempts of every copy, in
    // every process (the coordinator's ledger revoked each of them).
    let lost = delivery
        .delivery_count
        .max(passed.attempt.saturating_sub(1));
    let limit = spec.delivery_limit.unwrap_or(u32::MAX);
    if past_limit || lost >= limit {
        WorkerStats::bump(&stats.error);
        let dead = spec.dead_letter.as_deref().unwrap_or("nowhere");
        let msg = if past_limit {
            format!(
                "the call was delivered {} times without completing, the last time to a worker that was lost (it may crash workers); it was moved to `{dead}`",
                limit.saturating_add(1)
            )
        } else {
            format!(
                "the call was delivered {} times without completing (it may crash workers); it was moved to `{dead}`",
                lost + 1
            )
        };
        warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "{msg}");
        let reply = Reply::error(call.call_id, passed.attempt, codes::DELIVERY_LIMIT, msg);
        let dead = Disposition::DeadLetter {
            reason: codes::DELIVERY_LIMIT.into(),
        };
        return Gate::Answer(passed, reply, dead);
    }
    if shared.is_cancelled(call.call_id) {
        WorkerStats::bump(&stats.cancelled);
        debug!(worker = %shared.opts.worker_id, call_id = %call.call_id, "the call was cancelled: answering `cancelled`, not running it");
        let reply = Reply::cancelled(call.call_id, passed.attempt);
        return Gate::Answer(passed, reply, Disposition::Ack);
    }
    if call.is_expired_at(OffsetDateTime::now_utc()) {
        WorkerStats::bump(&stats.expired);
        let reply = Reply::expired(call.call_id, passed.attempt);
        return Gate::Answer(passed, reply, Disposition::Ack);
    }
    if let Some(fate) = admit(shared, call, lease, passed, &delivery.body).await {
        return Gate::Settle(fate);
    }
    Gate::Run(passed)
}

/// A call with a `concurrency_key`, of a service with a
/// `max_running_per_key`, asks the coordinator for a place of its key:
/// `None` runs it; otherwise how to settle the delivery (acked: the
/// coordinator holds the call until a place is free).
async fn admit(
    shared: &Shared,
    call: &Call,
    lease: Lease,
    passed: Passed,
    body: &[u8],
) -> Option<Disposition> {
    let key = call.concurrency_key.as_deref()?;
    let limit = *shared.opts.max_running_per_key.get(&call.service)?;
    // A worker with a limit runs coordinated (checked when it starts).
    let (link, admissions) = (shared.link.as_ref()?, shared.admissions.as_ref()?);
    let asking = KeyedCall {
        lease,
        attempt: passed.attempt,
        service: call.service.clone(),
        key: key.to_owned(),
        limit,
        body: String::from_utf8_lossy(body).into_owned(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let answer = match admissions.send((asking, tx)).await {
        Ok(()) => rx.await.ok().flatten(),
        Err(_) => None,
    };
    let worker = &shared.opts.worker_id;
    match answer {
        Some(true) => {
            shared.admitted(lease.token, key);
            None
        }
        Some(false) => {
            WorkerStats::bump(&shared.stats.waited);
            debug!(%worker, call_id = %call.call_id, key, "every place of the call's key is taken: the coordinator holds it until one is free");
            Some(Disposition::Ack)
        }
        None => {
            if passed.resumed
                && !link.is_gone()
                && let Err(e) = link.send(RequestBody::Unclaim { lease }).await
            {
                debug!(%worker, call_id = %call.call_id, "telling the coordinator the delivery went back unrun: {e}");
            }
            Some(Disposition::Release)
        }
    }
}

/// Hands a call that came before its `not_before` to the coordinator,
/// which holds it until it is due: acked once the coordinator has it,
/// returned to its queue when the coordinator does not answer. A worker
/// without a coordinator cannot hold it, and answers it so.
async fn defer(shared: &Shared, call: &Call, body: &[u8]) -> Gate {
    let now = OffsetDateTime::now_utc();
    let Some(link) = &shared.link else {
        let passed = Passed {
            attempt: 1,
            resumed: false,
        };
        let reply = Reply::error(
            call.call_id,
            1,
            codes::NOT_BEFORE_UNSUPPORTED,
            "the call has a not_before in the future and this worker runs without a coordinator, \
             which holds delayed calls",
        );
        return Gate::Answer(passed, reply, Disposition::Ack);
    };
    let due = call.not_before.unwrap_or(now);
    let due_ms = i64::try_from(due.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    let body = String::from_utf8_lossy(body).into_owned();
    let asked = link
        .ask(|req_id| RequestBody::Defer {
            req_id,
            call_id: call.call_id,
            service: call.service.clone(),
            due_ms,
            body: body.clone(),
        })
        .await;
    match asked {
        Ok(AnswerBody::Deferred { .. }) => {
            WorkerStats::bump(&shared.stats.deferred);
            debug!(worker = %shared.opts.worker_id, call_id = %call.call_id, wait_ms = (due - now).whole_milliseconds(), "the call is early: the coordinator holds it until it is due");
            Gate::Settle(Disposition::Ack)
        }
        Ok(other) => {
            warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "unexpected answer to defer: {other:?}");
            Gate::Settle(Disposition::Release)
        }
        Err(e) => {
            warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "defer not answered, returning the early call to its queue: {e}");
            Gate::Settle(Disposition::Release)
        }
    }
}

/// Asks the coordinator whether this copy runs: the attempt it runs as, or
/// how to settle the delivery instead.
/// With `key`, the first delivery of a call with that idempotency key asks
/// `claim` instead: the same answers, and `follow`.
async fn resume(
    shared: &Shared,
    call: &Call,
    lease: Lease,
    body: &[u8],
    key: Option<&str>,
) -> Result<u32, Disposition> {
    let Some(link) = &shared.link else {
        return Ok(lease.copy);
    };
    WorkerStats::bump(&shared.stats.resumed);
    let digest = body_digest(body);
    let asked = link
        .ask(|req_id| match key {
            Some(key) => RequestBody::Claim {
                req_id,
                lease,
                service: call.service.clone(),
                key: key.to_owned(),
                call_reply_to: call.reply_to.clone(),
                digest: Some(digest.clone()),
            },
            None => RequestBody::Resume {
                req_id,
                lease,
                service: call.service.clone(),
                call_reply_to: call.reply_to.clone(),
                digest: Some(digest.clone()),
            },
        })
        .await;
    let decision = match asked {
        Ok(AnswerBody::Resume { decision, .. }) => decision,
        Ok(other) => {
            warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "unexpected answer to resume: {other:?}");
            crate::metrics::resumed("released");
            return Err(Disposition::Release);
        }
        Err(e) => {
            // Waiting for the coordinator is no failure of the call: the
            // delivery goes back without using up its delivery limit, and
            // an attempt the coordinator may yet grant it is given back
            // (sent before the copy is, so that the coordinator reads it
            // before the next copy's `resume`).
            warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "resume not answered, returning the call to its queue: {e}");
            if !link.is_gone()
                && let Err(e) = link.send(RequestBody::Unclaim { lease }).await
            {
                debug!(worker = %shared.opts.worker_id, call_id = %call.call_id, "telling the coordinator the delivery went back unrun: {e}");
            }
            crate::metrics::resumed("released");
            return Err(Disposition::Release);
        }
    };
    crate::metrics::resumed(decision.as_str());
    if let ResumeDecision::Run { attempt } = decision {
        return Ok(attempt);
    }
    WorkerStats::bump(&shared.stats.dropped);
    debug!(worker = %shared.opts.worker_id, call_id = %call.call_id, ?decision, "not running this copy");
    Err(match decision {
        // The attempt that completed may have died before its reply went
        // out, and the coordinator's `fatal` answer may have been lost with
        // a crash: both are published again; the client drops duplicates.
        ResumeDecision::Done { reply: Some(r) } | ResumeDecision::Fatal { reply: r } => {
            finish::publish_reply(shared, call.reply_to.as_deref(), &r).await
        }
        // Another body under a known call id: kept for a person to see.
        ResumeDecision::Refused { reason } => {
            warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "the coordinator refused this copy: {reason}");
            Disposition::DeadLetter {
                reason: format!("{BODY_MISMATCH}: {reason}"),
            }
        }
        // An earlier call with the same idempotency key runs: the
        // coordinator answers this one with its outcome.
        ResumeDecision::Follow { first } => {
            info!(worker = %shared.opts.worker_id, call_id = %call.call_id, %first, "follows the call that holds its idempotency key: answered with its outcome");
            Disposition::Ack
        }
        _ => Disposition::Ack,
    })
}
