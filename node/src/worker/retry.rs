//! Retries: an attempt whose handler returned a retryable error, of a call
//! whose `retry` policy has attempts left, is handed to the coordinator,
//! which revokes it and holds the call until its next attempt is due (no
//! worker slot held, nothing blocking the queue behind it); the delivery
//! is acked unanswered. Otherwise the error is the outcome.

use callq_broker::Disposition;
use callq_schemas::protocol::{AnswerBody, Lease, RequestBody, retryable};
use callq_schemas::{Call, Reply};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::WorkerStats;
use super::gate::Passed;
use super::shared::Shared;
use crate::handler::Retry;

/// Attempts in all a policy may ask for, at most: a call's attempts also
/// count its lost deliveries against the queue's delivery limit.
fn attempts_allowed(shared: &Shared, call: &Call, wanted: u32) -> u32 {
    let limit = shared
        .services
        .get(&call.service)
        .and_then(|(_, spec)| spec.delivery_limit)
        .unwrap_or(u32::MAX);
    wanted.min(limit)
}

/// When the next attempt is due: when the handler said, or after the
/// policy's backoff with jitter.
fn next_due(call: &Call, attempt: u32, wish: Retry) -> Option<OffsetDateTime> {
    let policy = call.retry?;
    let wait = wish.after.unwrap_or_else(|| {
        // The low bits of a UUID v7 are random.
        let bits = uuid::Uuid::now_v7().as_u128() & u128::from(u32::MAX);
        let jitter = bits as f64 / f64::from(u32::MAX);
        policy.backoff(attempt, jitter)
    });
    // A policy's numbers come from the message: a wait past what a date
    // can hold is no retry (the error stands), not an overflow.
    OffsetDateTime::now_utc().checked_add(time::Duration::try_from(wait).ok()?)
}

/// Hands the attempt over for its retry where the policy allows; the
/// delivery's disposition if it did (acked: the call waits with the
/// coordinator), `None` when the error stands.
pub(super) async fn hand_over(
    shared: &Shared,
    call: &Call,
    (lease, passed): (Lease, Passed),
    reply: &Reply,
    traces: &[String],
    (wish, body): (Option<Retry>, &[u8]),
) -> Option<Disposition> {
    let (wish, policy, link) = (wish?, call.retry?, shared.link.as_ref()?);
    let attempt = passed.attempt;
    if attempt >= attempts_allowed(shared, call, policy.max_attempts) || !retryable(traces) {
        return None;
    }
    let due = next_due(call, attempt, wish)?;
    if call.deadline.is_some_and(|d| d <= due) {
        info!(worker = %shared.opts.worker_id, call_id = %call.call_id, attempt, "not retrying: the next attempt would come after the deadline");
        return None;
    }
    let due_ms = i64::try_from(due.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    let body = String::from_utf8_lossy(body).into_owned();
    let asked = link
        .ask(|req_id| RequestBody::Retry {
            req_id,
            lease,
            attempt,
            service: call.service.clone(),
            call_reply_to: call.reply_to.clone(),
            due_ms,
            body: body.clone(),
        })
        .await;
    match asked {
        Ok(AnswerBody::Retrying { retrying: true, .. }) => {
            WorkerStats::bump(&shared.stats.retried);
            info!(worker = %shared.opts.worker_id, call_id = %call.call_id, attempt, code = reply.code().unwrap_or_default(), wait_ms = (due - OffsetDateTime::now_utc()).whole_milliseconds(), "retryable error: the next attempt is due later");
            Some(Disposition::Ack)
        }
        Ok(AnswerBody::Retrying {
            retrying: false, ..
        }) => None,
        Ok(other) => {
            warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "unexpected answer to retry: {other:?}");
            None
        }
        Err(e) => {
            // Not knowing whether the coordinator holds the call, the
            // delivery goes back: its redelivery's `resume` says.
            warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "retry not answered, returning the call to its queue: {e}");
            Some(Disposition::Release)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_hostile_policy_is_no_retry_not_an_overflow() {
        let mut call = Call::new("echo", "flaky", serde_json::json!({}));
        call.retry = Some(callq_schemas::RetryPolicy {
            max_attempts: 5,
            backoff_ms: u64::MAX,
            max_backoff_ms: u64::MAX,
        });
        assert_eq!(next_due(&call, 40, Retry::default()), None);
        let far = Retry {
            after: Some(std::time::Duration::MAX),
        };
        assert_eq!(next_due(&call, 1, far), None);
        call.retry = Some(callq_schemas::RetryPolicy {
            max_attempts: 5,
            backoff_ms: 100,
            max_backoff_ms: 1_000,
        });
        let due = next_due(&call, 1, Retry::default()).unwrap();
        assert!(
            due > OffsetDateTime::now_utc()
                && due < OffsetDateTime::now_utc() + time::Duration::SECOND
        );
    }
}
