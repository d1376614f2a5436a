//! Step 3, the attempt: the handler runs with its context, its panics
//! caught. A call with a session whose write meets a newer version runs
//! again on the fresher data (up to [`SESSION_RUNS`] times), where its
//! traces allow; the write commits with the completion, before the reply
//! goes out.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use callq_broker::{Bytes, Disposition};
use callq_schemas::protocol::{Lease, RequestBody};
use callq_schemas::{Call, Reply, codes};
use futures::FutureExt;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::WorkerStats;
use super::finish::{self, Ledgered};
use super::gate::Passed;
use super::shared::Shared;
use crate::link::{Abort, Attempt};
use crate::probe::{Point, Probed, Site};
use crate::session::CallSession;
use crate::{Ctx, Service};

/// Runs of one attempt at most when its session write keeps meeting newer
/// versions; then the call answers `session_conflict`.
const SESSION_RUNS: u32 = 16;

/// How the attempt ended.
pub(super) enum Ran {
    /// The handler's reply, to finish with, and the traces it left.
    Answer {
        /// The reply.
        reply: Reply,
        /// The traces granted to the attempt.
        traces: Vec<String>,
        /// The retry a retryable error asked for (calls that wrote no
        /// session data only).
        retry: Option<crate::handler::Retry>,
    },
    /// Settled already (revoked, or completed with its session write and
    /// answered): nothing more to do.
    Settle(Disposition),
}

/// Runs the call's handler as the attempt the gate passed.
pub(super) async fn run(
    shared: &Shared,
    service: &Service,
    call: &mut Call,
    lease: Lease,
    passed: Passed,
    body: Bytes,
) -> Ran {
    let attempt = passed.attempt;
    let standing = Arc::new(Attempt::new(
        shared.link.clone(),
        lease,
        attempt,
        (call.service.clone(), call.reply_to.clone()),
        body,
        shared.cancel_token(lease.token),
    ));
    let session = call_session(shared, call);
    pass(shared, Point::BeforeHandler, call.call_id, attempt).await;
    let mut runs = 0;
    loop {
        runs += 1;
        let ctx = context(shared, service, call, attempt, &standing, session.as_ref());
        // A call with a session may run again on fresher data.
        let args = if session.is_some() {
            call.args.clone()
        } else {
            std::mem::take(&mut call.args)
        };
        let reply = run_handler(
            shared,
            service,
            &call.method,
            call.call_id,
            attempt,
            ctx,
            args,
        )
        .await;
        if let Some(fate) = aborted(shared, call, lease, attempt, &standing).await {
            return Ran::Settle(fate);
        }
        let granted = standing.traces();
        if let Some(ran) = cancelled(shared, call, &standing, &granted) {
            return ran;
        }
        let site = Site {
            point: Point::BeforeReply,
            call_id: call.call_id,
            attempt,
            trace: None,
            granted: &granted,
        };
        Probed::pass(shared.probe.as_ref(), site).await;
        let Some(session) = &session else {
            return Ran::Answer {
                reply,
                traces: granted,
                retry: standing.retry_wish(),
            };
        };
        match commit_session(shared, call, lease, attempt, &reply, session, &granted).await {
            Committed::Nothing => {
                return Ran::Answer {
                    reply,
                    traces: granted,
                    retry: standing.retry_wish(),
                };
            }
            Committed::Settled(fate) => return Ran::Settle(fate),
            Committed::Conflict { code, reason } => {
                if runs_again(&code, runs, &granted) {
                    debug!(worker = %shared.opts.worker_id, call_id = %call.call_id, "{reason}: running the call again");
                    continue;
                }
                let reply = Reply::error(call.call_id, attempt, &code, reason);
                return Ran::Answer {
                    reply,
                    traces: granted,
                    retry: None,
                };
            }
        }
    }
}

/// The session of a call that names one, on a worker with a coordinator.
fn call_session(shared: &Shared, call: &Call) -> Option<Arc<CallSession>> {
    match (&call.session_id, &shared.link) {
        (Some(id), Some(link)) => Some(Arc::new(CallSession::new(
            id.clone(),
            shared.sessions.clone(),
            link.clone(),
        ))),
        _ => None,
    }
}

/// A call cancelled while it ran, that left nothing: its result is dropped
/// (a session write too) and it ends `cancelled`.
fn cancelled(shared: &Shared, call: &Call, standing: &Attempt, granted: &[String]) -> Option<Ran> {
    if !standing.cancel.is_cancelled() || !granted.is_empty() {
        return None;
    }
    let attempt = standing.attempt;
    info!(worker = %shared.opts.worker_id, call_id = %call.call_id, attempt, "the call was cancelled while it ran: answering `cancelled`");
    Some(Ran::Answer {
        reply: Reply::cancelled(call.call_id, attempt),
        traces: Vec::new(),
        retry: None,
    })
}

/// Whether a run whose session write was refused with `code` runs again
/// on fresher data: a conflict, within [`SESSION_RUNS`], where its traces
/// allow.
fn runs_again(code: &str, runs: u32, granted: &[String]) -> bool {
    if code != codes::SESSION_CONFLICT {
        return false;
    }
    crate::metrics::count(crate::metrics::SESSION_CONFLICTS);
    let again = runs < SESSION_RUNS && callq_schemas::protocol::retryable(granted);
    if again {
        crate::metrics::count(crate::metrics::SESSION_RERUNS);
    }
    again
}

/// The handler's context for one run.
fn context(
    shared: &Shared,
    service: &Service,
    call: &Call,
    attempt: u32,
    standing: &Arc<Attempt>,
    session: Option<&Arc<CallSession>>,
) -> Ctx {
    Ctx {
        call_id: call.call_id,
        attempt,
        service: service.name_arc(),
        method: call.method.clone(),
        session_id: call.session_id.clone(),
        idempotency_key: call.idempotency_key.clone(),
        deadline: call.deadline,
        // The handler's own spans are children of the attempt's.
        traceparent: callq_broker::telemetry::current_traceparent()
            .or_else(|| call.traceparent.clone()),
        standing: Some(standing.clone()),
        probe: shared.probe.clone(),
        session: session.cloned(),
    }
}

/// How the delivery settles when the attempt lost its standing while the
/// handler ran. Neither is a failure of the call: the delivery goes back
/// without using up its delivery limit.
async fn aborted(
    shared: &Shared,
    call: &Call,
    lease: Lease,
    attempt: u32,
    standing: &Attempt,
) -> Option<Disposition> {
    match standing.aborted()? {
        Abort::Revoked {
            reason,
            superseded,
            reply,
        } => {
            shared.stats.revoke();
            info!(worker = %shared.opts.worker_id, call_id = %call.call_id, attempt, superseded, "attempt revoked, its result is dropped: {reason}");
            // Where another delivery holds the call (or it is decided), this
            // one is a spare and goes away: sent back, it would claim the
            // call again on its redelivery and revoke the holder in turn, two
            // copies taking it from each other until the delivery limit.
            // Otherwise it goes back: the revocation may have produced no
            // other copy (a re-issue needs the body), and `resume` on the
            // redelivery runs the next attempt.
            // A decided call's recorded reply goes out again first: the
            // attempt that decided it may have died before its own reply
            // went out.
            Some(match (superseded, reply) {
                (true, Some(reply)) => {
                    finish::publish_reply(shared, call.reply_to.as_deref(), &reply).await
                }
                (true, None) => Disposition::Ack,
                (false, _) => Disposition::Release,
            })
        }
        Abort::Unreachable => {
            // A trace the coordinator did not answer may yet be granted
            // when it reads the request: tell it which grants this attempt
            // received, so that one it never heard of is void.
            if let Some(link) = &shared.link
                && !link.is_gone()
            {
                let kept = standing.traces();
                let abandon = RequestBody::Abandon {
                    lease,
                    attempt,
                    kept,
                };
                if let Err(e) = link.send(abandon).await {
                    warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "telling the coordinator the attempt is abandoned: {e}");
                }
            }
            Some(Disposition::Release)
        }
    }
}

/// What committing a session write made of the run.
enum Committed {
    /// The run wrote nothing: finish as any call.
    Nothing,
    /// The write committed with the completion and the reply was sent (or
    /// the completion was refused): settle so.
    Settled(Disposition),
    /// The write was refused (a newer version, an ended session).
    Conflict { code: String, reason: String },
}

/// Commits the run's session write with its completion, before the reply
/// goes out, then publishes the reply.
async fn commit_session(
    shared: &Shared,
    call: &Call,
    lease: Lease,
    attempt: u32,
    reply: &Reply,
    session: &CallSession,
    granted: &[String],
) -> Committed {
    let (Some(link), Some(write)) = (&shared.link, session.write()) else {
        return Committed::Nothing;
    };
    let reply_to = call.reply_to.as_deref();
    let ledgered = finish::complete_first(
        shared,
        link,
        lease,
        attempt,
        reply,
        reply_to,
        Some(write.clone()),
    )
    .await;
    match ledgered {
        Ledgered::Accepted => {
            session.committed(&write);
            WorkerStats::add(&shared.stats.traces, granted.len());
            let sent = finish::publish_reply(shared, reply_to, reply).await;
            Committed::Settled(finish::then_if_sent(sent, Disposition::Ack))
        }
        Ledgered::Settle(fate) => Committed::Settled(fate),
        Ledgered::SessionRefused { code, reason } => {
            session.reset();
            Committed::Conflict { code, reason }
        }
    }
}

/// Runs the handler of `method`, catching panics, and makes its reply.
async fn run_handler(
    shared: &Shared,
    service: &Service,
    method: &str,
    call_id: Uuid,
    attempt: u32,
    ctx: Ctx,
    args: serde_json::Value,
) -> Reply {
    let stats = &shared.stats;
    crate::metrics::started(service);
    let clock = std::time::Instant::now();
    // A handler may panic before its future exists (in the closure's own
    // body) or while it runs: both are caught.
    let standing = ctx.standing.clone();
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| service.invoke(method, ctx, args)));
    let outcome = match started {
        Err(panic) => Err(panic),
        Ok(None) => Ok(None),
        Ok(Some(run)) => AssertUnwindSafe(run).catch_unwind().await.map(Some),
    };
    crate::metrics::handled(service, method, &outcome, clock.elapsed());
    stats.finish(service.name());
    match outcome {
        Err(panic) => {
            WorkerStats::bump(&stats.panicked);
            panicked(shared, service.name(), method, call_id, attempt, panic)
        }
        Ok(None) => {
            WorkerStats::bump(&stats.error);
            Reply::error(
                call_id,
                attempt,
                codes::UNKNOWN_METHOD,
                format!(
                    "service `{}` has no method `{method}` (it has: {})",
                    service.name(),
                    service.methods().join(", ")
                ),
            )
        }
        Ok(Some(Ok(result))) => {
            WorkerStats::bump(&stats.ok);
            Reply::ok(call_id, attempt, result)
        }
        Ok(Some(Err(e))) => {
            WorkerStats::bump(&stats.error);
            if let (Some(retry), Some(standing)) = (e.retry, &standing) {
                standing.wish_retry(retry);
            }
            Reply::error(call_id, attempt, &e.code, e.message)
        }
    }
}

/// The `handler_panicked` reply for a caught panic.
fn panicked(
    shared: &Shared,
    service: &str,
    method: &str,
    call_id: uuid::Uuid,
    attempt: u32,
    panic: Box<dyn std::any::Any + Send>,
) -> Reply {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    error!(worker = %shared.opts.worker_id, %call_id, method, "handler panicked: {what}");
    Reply::error(
        call_id,
        attempt,
        codes::HANDLER_PANICKED,
        format!("the handler of {service}.{method} panicked: {what}"),
    )
}

/// Tells the worker's probe, if any, that the call is at `point` with no
/// trace at hand.
pub(super) async fn pass(shared: &Shared, point: Point, call_id: Uuid, attempt: u32) {
    let site = Site {
        point,
        call_id,
        attempt,
        trace: None,
        granted: &[],
    };
    Probed::pass(shared.probe.as_ref(), site).await;
}
