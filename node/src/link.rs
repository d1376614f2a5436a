//! The worker's link to the coordinator: requests go to `callq.coordinator`,
//! heartbeats to `callq.heartbeats` (no durable write), answers and orders
//! come back on the worker's own queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use callq_broker::telemetry::{self, Attribute, Kind, TraceContext};
use callq_broker::{
    Broker, Bytes, COORDINATOR_QUEUE, Disposition, HEARTBEAT_QUEUE, Message, QueueSpec,
};
use callq_schemas::Reply;
use callq_schemas::codes;
use callq_schemas::protocol::{
    Answer, AnswerBody, Lease, Request, RequestBody, SessionWrite, TraceDecision,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::{Error, HandlerError};

/// An order of the coordinator to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Order {
    /// Start consuming (a standby that is promoted).
    Promote,
    /// Stop pulling, finish the calls in flight, leave.
    Drain,
    /// To a node agent: start a standby worker of these services.
    StartStandby(Vec<String>),
    /// A session changed: cached versions below this one are stale.
    SessionChanged(String, u64),
    /// These calls are cancelled.
    Cancel(Vec<Uuid>),
}

/// The coordinator did not answer within the worker's patience.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the coordinator did not answer within {0:?}")]
pub(crate) struct Unreachable(pub(crate) Duration);

type Waiters = Mutex<HashMap<Uuid, oneshot::Sender<AnswerBody>>>;

/// A worker's connection to the coordinator.
pub(crate) struct Link {
    broker: Arc<dyn Broker>,
    worker_id: String,
    queue: String,
    waiters: Arc<Waiters>,
    /// How long one try of a request waits for its answer.
    try_timeout: Duration,
    /// How long a request is tried in all.
    patience: Duration,
    reader: JoinHandle<()>,
    /// Cancelled when the answer consumer ends (the connection is lost):
    /// every wait on the coordinator ends at once.
    gone: CancellationToken,
    clock: Clock,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Link {
    /// Declares `queue` (the worker's or agent's own) and starts reading it.
    /// Orders arrive on the returned channel.
    pub(crate) async fn connect(
        broker: Arc<dyn Broker>,
        id: &str,
        queue: String,
        patience: Duration,
    ) -> Result<(Arc<Self>, mpsc::Receiver<Order>), Error> {
        let worker_id = id;
        let setup = async {
            broker.declare(&QueueSpec::coordinator()).await?;
            broker.declare(&QueueSpec::heartbeats()).await?;
            broker.declare(&QueueSpec::control(&queue)).await?;
            broker.consume(&queue, 256).await
        };
        let consumer = tokio::time::timeout(patience, setup)
            .await
            .map_err(|_| Error::Timeout(patience))??;
        let waiters: Arc<Waiters> = Arc::default();
        let (orders_tx, orders) = mpsc::channel(1024);
        let gone = CancellationToken::new();
        let reader = tokio::spawn(read_answers(
            consumer,
            waiters.clone(),
            orders_tx,
            worker_id.to_owned(),
            gone.clone(),
        ));
        let link = Self {
            broker,
            worker_id: worker_id.to_owned(),
            queue,
            waiters,
            try_timeout: (patience / 10).clamp(Duration::from_millis(100), Duration::from_secs(2)),
            patience,
            reader,
            gone,
            clock: Clock::start(),
        };
        Ok((Arc::new(link), orders))
    }

    /// Publishes a request that needs no answer.
    pub(crate) async fn send(&self, body: RequestBody) -> Result<(), callq_broker::Error> {
        self.publish(COORDINATOR_QUEUE, body, None, None).await
    }

    /// Publishes a heartbeat: to the heartbeat queue, which costs the broker
    /// no disk write.
    pub(crate) async fn beat(&self, body: RequestBody) -> Result<(), callq_broker::Error> {
        self.publish(HEARTBEAT_QUEUE, body, None, None).await
    }

    /// Whether the link's connection is gone: nothing sent on it is
    /// answered any more.
    pub(crate) fn is_gone(&self) -> bool {
        self.gone.is_cancelled()
    }

    /// Cancelled once the link's connection is gone.
    pub(crate) fn gone(&self) -> CancellationToken {
        self.gone.clone()
    }

    async fn publish(
        &self,
        queue: &str,
        body: RequestBody,
        expires_ms: Option<i64>,
        traceparent: Option<String>,
    ) -> Result<(), callq_broker::Error> {
        let req = Request {
            v: 1,
            worker_id: self.worker_id.clone(),
            reply_to: self.queue.clone(),
            expires_ms,
            traceparent,
            body,
        };
        let publish = self.broker.publish(queue, Message::new(req.to_bytes()));
        tokio::time::timeout(self.try_timeout, publish)
            .await
            .unwrap_or(Err(callq_broker::Error::Timeout(self.try_timeout)))
    }

    /// Asks the coordinator and waits for its answer, asking again with the
    /// same request id while it stays silent (its decisions are idempotent
    /// per request), up to the worker's patience, or until the link's
    /// connection is gone. Each request carries the moment the worker gives
    /// up on it, after which the coordinator drops it unanswered; except a
    /// completion, which stays good however late it is read (it carries
    /// the outcome a later copy of the call is answered with).
    pub(crate) async fn ask(
        &self,
        body: impl Fn(Uuid) -> RequestBody,
    ) -> Result<AnswerBody, Unreachable> {
        if self.is_gone() {
            return Err(Unreachable(Duration::ZERO));
        }
        let req_id = Uuid::now_v7();
        let first = body(req_id);
        let kind = first.kind();
        let expires_ms = match first {
            RequestBody::Complete { .. } => None,
            _ => Some(self.clock.ms_in(self.patience)),
        };
        // The round trip is a span of the call's trace (a child of the
        // attempt's `process` span), the parent of the coordinator's.
        let span = telemetry::enabled()
            .then(|| {
                let name = kind.to_owned();
                TraceContext::map_current(|cx| telemetry::start(name, Kind::Client, cx, vec![]))
            })
            .flatten();
        let traceparent = span.as_ref().and_then(telemetry::traceparent);
        let clock = std::time::Instant::now();
        let answer = self
            .ask_until_answered(req_id, &body, expires_ms, traceparent)
            .await;
        crate::metrics::coordinator_round_trip(kind, clock.elapsed());
        match &answer {
            Ok(answer) => {
                telemetry::set(
                    span.as_ref(),
                    Attribute::new("callq.decision", answer.decision()),
                );
                telemetry::end(span, None);
            }
            Err(e) => telemetry::end(span, Some(e.to_string())),
        }
        answer
    }

    async fn ask_until_answered(
        &self,
        req_id: Uuid,
        body: &impl Fn(Uuid) -> RequestBody,
        expires_ms: Option<i64>,
        traceparent: Option<String>,
    ) -> Result<AnswerBody, Unreachable> {
        let (tx, mut rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(req_id, tx);
        }
        let _forget = Forget {
            waiters: &self.waiters,
            req_id,
        };
        let give_up = tokio::time::Instant::now() + self.patience;
        loop {
            let try_until = (tokio::time::Instant::now() + self.try_timeout).min(give_up);
            let sent = self
                .publish(
                    COORDINATOR_QUEUE,
                    body(req_id),
                    expires_ms,
                    traceparent.clone(),
                )
                .await;
            if let Err(e) = sent {
                debug!(worker = %self.worker_id, "a coordinator request was not sent: {e}");
            }
            let answer = tokio::select! {
                answer = tokio::time::timeout_at(try_until, &mut rx) => answer,
                () = self.gone.cancelled() => {
                    debug!(worker = %self.worker_id, %req_id, "the connection is gone: giving up at once");
                    return Err(Unreachable(self.patience));
                }
            };
            match answer {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(_)) => return Err(Unreachable(self.patience)),
                Err(_) if tokio::time::Instant::now() >= give_up => {
                    return Err(Unreachable(self.patience));
                }
                Err(_) => {
                    debug!(worker = %self.worker_id, %req_id, "no answer yet, asking again");
                }
            }
        }
    }
}

/// Removes a request's waiter however its wait ends.
struct Forget<'a> {
    waiters: &'a Waiters,
    req_id: Uuid,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(&self.req_id);
        }
    }
}

fn req_id(answer: &AnswerBody) -> Option<Uuid> {
    match answer {
        AnswerBody::Resume { req_id, .. }
        | AnswerBody::Trace { req_id, .. }
        | AnswerBody::Complete { req_id, .. }
        | AnswerBody::Session { req_id, .. }
        | AnswerBody::Draining { req_id, .. }
        | AnswerBody::Status { req_id, .. }
        | AnswerBody::Cancel { req_id, .. }
        | AnswerBody::Deferred { req_id }
        | AnswerBody::Admission { req_id, .. }
        | AnswerBody::Retrying { req_id, .. } => Some(*req_id),
        AnswerBody::Cancelled { .. }
        | AnswerBody::Promote {}
        | AnswerBody::Drain {}
        | AnswerBody::StartStandby { .. }
        | AnswerBody::SessionChanged { .. } => None,
    }
}

/// The wall clock as the link reads it: the wall time when the link
/// connected plus the (tokio) time since, so that it runs with the
/// coordinator's under a test's paused clock.
#[derive(Debug, Clone, Copy)]
struct Clock {
    started: tokio::time::Instant,
    epoch_ms: i64,
}

impl Clock {
    fn start() -> Self {
        let epoch_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            started: tokio::time::Instant::now(),
            epoch_ms,
        }
    }

    /// Milliseconds since the Unix epoch, `after` from now.
    fn ms_in(&self, after: Duration) -> i64 {
        let since = self.started.elapsed() + after;
        self.epoch_ms
            .saturating_add(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
    }
}

async fn read_answers(
    mut consumer: Box<dyn callq_broker::Consumer>,
    waiters: Arc<Waiters>,
    orders: mpsc::Sender<Order>,
    worker_id: String,
    gone: CancellationToken,
) {
    // However this ends, the waits on the coordinator end with it.
    let _gone = gone.drop_guard();
    let mut epochs = Epochs::default();
    while let Some(item) = consumer.next().await {
        let delivery = match item {
            Ok(d) => d,
            Err(e) => {
                warn!(worker = %worker_id, "answer consumer error: {e}");
                continue;
            }
        };
        match serde_json::from_slice::<Answer>(&delivery.body) {
            Ok(answer) if answer.v == 1 => {
                if epochs.admit(&answer) {
                    route(answer.body, &waiters, &orders, &worker_id);
                } else {
                    warn!(worker = %worker_id, epoch = ?answer.epoch, highest = epochs.highest, "order of a coordinator that no longer leads dropped: {:?}", answer.body);
                }
            }
            Ok(answer) => {
                warn!(worker = %worker_id, v = answer.v, "coordinator answer of an unknown protocol version dropped");
            }
            Err(e) => warn!(worker = %worker_id, "unreadable coordinator answer dropped: {e}"),
        }
        if let Err(e) = delivery.settle(Disposition::Ack).await {
            debug!(worker = %worker_id, "acking an answer: {e}");
        }
    }
    warn!(worker = %worker_id, "the worker's answer queue consumer ended");
}

/// The highest leadership epoch seen in the coordinator's answers.
#[derive(Debug, Default)]
struct Epochs {
    highest: u64,
}

impl Epochs {
    /// Notes the answer's epoch; whether it is to be acted on. An order
    /// (`promote`, `drain`, `start_standby`) below the highest epoch seen
    /// comes from a coordinator that no longer leads; answers to requests
    /// are matched by their request ids and always pass.
    fn admit(&mut self, answer: &Answer) -> bool {
        let epoch = answer.epoch.unwrap_or(0);
        self.highest = self.highest.max(epoch);
        req_id(&answer.body).is_some()
            || matches!(answer.body, AnswerBody::SessionChanged { .. })
            || epoch >= self.highest
    }
}

fn route(answer: AnswerBody, waiters: &Waiters, orders: &mpsc::Sender<Order>, worker_id: &str) {
    if let Some(id) = req_id(&answer) {
        // An answer nobody waits for is a late duplicate.
        if let Some(tx) = waiters.lock().ok().and_then(|mut w| w.remove(&id)) {
            let _ = tx.send(answer);
        }
        return;
    }
    let order = match answer {
        AnswerBody::Promote {} => Order::Promote,
        AnswerBody::Drain {} => Order::Drain,
        AnswerBody::StartStandby { services } => Order::StartStandby(services),
        AnswerBody::Cancelled { call_ids } => Order::Cancel(call_ids),
        AnswerBody::SessionChanged {
            session_id,
            version,
        } => {
            // A hint: the worker checks the version with every call anyway.
            let _ = orders.try_send(Order::SessionChanged(session_id, version));
            return;
        }
        other => {
            warn!(worker = %worker_id, "unexpected coordinator message dropped: {other:?}");
            return;
        }
    };
    if let Err(e) = orders.try_send(order) {
        warn!(worker = %worker_id, "order dropped, the worker is not reading orders: {e}");
    }
}

/// Why an attempt stopped short.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Abort {
    /// The coordinator refused a trace: the attempt was revoked or the call
    /// is decided. The result is dropped. Where another delivery holds the
    /// call or it is decided (`superseded`), this delivery is acked: it is a
    /// spare. Otherwise it goes back to its queue, and `resume` on the
    /// redelivery runs the next attempt.
    Revoked {
        /// Why, for logs.
        reason: String,
        /// Another delivery carries the call on.
        superseded: bool,
        /// The call is decided: its recorded reply, published again before
        /// the spare is acked.
        reply: Option<Reply>,
    },
    /// The coordinator did not answer a trace: the delivery goes back to the
    /// queue and `resume` decides on the redelivery.
    Unreachable,
}

/// One attempt's standing with the coordinator: its lease and the traces it
/// was granted. Shared by the worker and the handler's context.
pub(crate) struct Attempt {
    /// `None` for a worker without a coordinator: traces are granted
    /// locally.
    pub(crate) link: Option<Arc<Link>>,
    pub(crate) lease: Lease,
    pub(crate) attempt: u32,
    pub(crate) service: String,
    pub(crate) reply_to: Option<String>,
    /// The call's body, and its digest once a trace needed it (every
    /// trace request carries it; a call that asks none costs no hashing).
    body: Bytes,
    digest: OnceLock<String>,
    traces: Mutex<Vec<String>>,
    abort: Mutex<Option<Abort>>,
    /// Cancelled when the caller cancels the call while it runs.
    pub(crate) cancel: CancellationToken,
    /// The retryable error's wish, when the handler returned one.
    retry: Mutex<Option<crate::handler::Retry>>,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("lease", &self.lease)
            .field("attempt", &self.attempt)
            .field("traces", &self.traces())
            .field("aborted", &self.aborted())
            .finish_non_exhaustive()
    }
}

impl Attempt {
    pub(crate) fn new(
        link: Option<Arc<Link>>,
        lease: Lease,
        attempt: u32,
        (service, reply_to): (String, Option<String>),
        body: Bytes,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            link,
            lease,
            attempt,
            service,
            reply_to,
            body,
            digest: OnceLock::new(),
            traces: Mutex::default(),
            abort: Mutex::default(),
            cancel,
            retry: Mutex::default(),
        }
    }

    /// The handler returned a retryable error with this wish.
    pub(crate) fn wish_retry(&self, retry: crate::handler::Retry) {
        if let Ok(mut r) = self.retry.lock() {
            *r = Some(retry);
        }
    }

    /// The retry the handler's error asked for, if it did.
    pub(crate) fn retry_wish(&self) -> Option<crate::handler::Retry> {
        self.retry.lock().ok().and_then(|r| *r)
    }

    /// The traces granted so far.
    pub(crate) fn traces(&self) -> Vec<String> {
        self.traces.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Why the attempt stopped short, if it did.
    pub(crate) fn aborted(&self) -> Option<Abort> {
        self.abort.lock().ok().and_then(|a| a.clone())
    }

    /// The coordinator did not answer a request of this attempt: it stops,
    /// and its delivery goes back to the queue.
    pub(crate) fn unreachable(&self) -> HandlerError {
        self.stop(Abort::Unreachable)
    }

    fn stop(&self, why: Abort) -> HandlerError {
        let err = match &why {
            Abort::Revoked { reason, .. } => HandlerError::new(
                codes::TRACE_REFUSED,
                format!("the coordinator refused the trace: {reason}"),
            ),
            Abort::Unreachable => HandlerError::new(
                codes::TRACE_REFUSED,
                "the coordinator did not answer the trace request",
            ),
        };
        if let Ok(mut a) = self.abort.lock() {
            a.get_or_insert(why);
        }
        err
    }

    /// Asks for a grant to leave a trace of `kind`.
    pub(crate) async fn trace(&self, kind: &str) -> Result<(), HandlerError> {
        self.trace_with(kind, None).await
    }

    /// Asks for a grant to leave a trace of `kind`, committing `session`
    /// with it. A refused session write is the handler's error; the attempt
    /// goes on.
    pub(crate) async fn trace_with(
        &self,
        kind: &str,
        session: Option<SessionWrite>,
    ) -> Result<(), HandlerError> {
        if let Some(why) = self.aborted() {
            return Err(self.stop(why));
        }
        if let Some(link) = &self.link {
            let asked = link
                .ask(|req_id| RequestBody::Trace {
                    req_id,
                    lease: self.lease,
                    attempt: self.attempt,
                    kind: kind.to_owned(),
                    service: self.service.clone(),
                    call_reply_to: self.reply_to.clone(),
                    session: session.clone(),
                    digest: Some(self.digest.get_or_init(|| body_digest(&self.body)).clone()),
                })
                .await;
            crate::metrics::traced(match &asked {
                Ok(answer @ AnswerBody::Trace { .. }) => answer.decision(),
                _ => "unanswered",
            });
            match asked {
                Ok(AnswerBody::Trace {
                    decision: TraceDecision::Granted,
                    ..
                }) => {}
                Ok(AnswerBody::Trace {
                    decision: TraceDecision::SessionRefused { code, reason },
                    ..
                }) => return Err(HandlerError::new(code, reason)),
                Ok(AnswerBody::Trace {
                    decision:
                        TraceDecision::Refused {
                            reason,
                            superseded,
                            reply,
                        },
                    ..
                }) => {
                    return Err(self.stop(Abort::Revoked {
                        reason,
                        superseded,
                        reply,
                    }));
                }
                Ok(other) => {
                    warn!(call_id = %self.lease.call_id, "unexpected answer to a trace: {other:?}");
                    return Err(self.stop(Abort::Unreachable));
                }
                Err(e) => {
                    warn!(call_id = %self.lease.call_id, kind, "trace not granted: {e}");
                    return Err(self.stop(Abort::Unreachable));
                }
            }
        }
        if let Ok(mut t) = self.traces.lock() {
            t.push(kind.to_owned());
        }
        Ok(())
    }
}

/// The SHA-256 of a call's body, in lowercase hex: what `resume` and
/// `trace` carry, so that the coordinator refuses a copy of a `call_id`
/// with another body.
pub(crate) fn body_digest(body: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with_epoch(body: AnswerBody, epoch: Option<u64>) -> Answer {
        Answer {
            epoch,
            ..Answer::new(body)
        }
    }

    #[test]
    fn the_body_digest_is_sha256_in_lowercase_hex() {
        assert_eq!(
            body_digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_order_below_the_highest_epoch_seen_is_dropped() {
        let mut epochs = Epochs::default();
        // A file-store coordinator stamps none: its orders pass.
        assert!(epochs.admit(&with_epoch(AnswerBody::Drain {}, None)));
        let answer = AnswerBody::Draining {
            req_id: Uuid::now_v7(),
            found: true,
        };
        // The new leader (epoch 7) answers; the old one (6) then orders.
        assert!(epochs.admit(&with_epoch(answer.clone(), Some(7))));
        assert!(!epochs.admit(&with_epoch(AnswerBody::Drain {}, Some(6))));
        assert!(!epochs.admit(&with_epoch(AnswerBody::Promote {}, Some(6))));
        let standby = AnswerBody::StartStandby {
            services: vec!["echo".into()],
        };
        assert!(!epochs.admit(&with_epoch(standby.clone(), None)));
        // Answers are matched by request id and pass whatever their epoch.
        assert!(epochs.admit(&with_epoch(answer, Some(6))));
        // The leader's own orders, and a later leader's, pass.
        assert!(epochs.admit(&with_epoch(AnswerBody::Promote {}, Some(7))));
        assert!(epochs.admit(&with_epoch(standby, Some(8))));
        assert!(!epochs.admit(&with_epoch(AnswerBody::Drain {}, Some(7))));
        assert_eq!(epochs.highest, 8);
    }
}
