//! The client: publish calls with confirm, await their first final outcome.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callq_broker::telemetry::{self, Attribute, Kind, TraceContext};
use callq_broker::{Broker, Disposition, Message, QueueSpec, reply_queue};
use callq_schemas::{Call, Limits, Reply, decode_reply};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{OnceCell, Semaphore, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::Error;

/// How a client runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientOptions {
    /// The client's id; its replies arrive on `callq.reply.<client_id>`.
    pub client_id: String,
    /// The timeout of a call that sets none: its deadline is now + this.
    #[serde(with = "callq_schemas::millis")]
    pub default_timeout: Duration,
    /// Calls in flight at once, at most; further calls wait for a slot.
    pub max_in_flight: usize,
    /// Replies the client's consumer prefetches.
    pub prefetch: u16,
    /// Body limits for replies.
    pub limits: Limits,
    /// Whether the client declares a service's call queue before its first
    /// call (so that calls wait for a worker that has not started yet).
    /// Off for a client of the least-privilege set-up, which may not
    /// declare call queues: its calls then need a worker to have declared
    /// the queue, else they fail with `NoSuchQueue` (docs/SECURITY.md).
    pub declare_call_queues: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_id: format!("client-{}", Uuid::now_v7().simple()),
            default_timeout: Duration::from_secs(30),
            max_in_flight: 10_000,
            prefetch: 512,
            limits: Limits::default(),
            declare_call_queues: true,
        }
    }
}

/// Options of one call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// How long to wait for the outcome; the client's default if `None`.
    /// The call's deadline is now + timeout: after it the call is answered
    /// `expired` (by a worker that had not started it, or by the client).
    pub timeout: Option<Duration>,
    /// The client's session.
    pub session_id: Option<String>,
    /// The publisher's own key for the request.
    pub idempotency_key: Option<String>,
    /// Calls of the service with the same key run at most the service's
    /// `max_running_per_key` at once, across workers (its
    /// `concurrency_key`).
    pub concurrency_key: Option<String>,
    /// 0 to 9 (its `priority`): from 5 up the call goes to the service's
    /// high band, which workers serve first. Above 9 the call is refused
    /// before it is sent.
    pub priority: Option<u8>,
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// Run the call no earlier than this from now (its `not_before`); the
    /// deadline and the wait count `timeout` from then.
    pub delay: Option<Duration>,
    /// How the handler's retryable errors are retried (its `retry`).
    pub retry: Option<callq_schemas::RetryPolicy>,
    /// The call's id; a fresh UUID v7 if `None`. Set it to know the id
    /// before the outcome (to cancel the call, [`Client::cancel`]).
    pub call_id: Option<Uuid>,
}

type Pending = Mutex<HashMap<Uuid, oneshot::Sender<Reply>>>;

struct Inner {
    broker: Arc<dyn Broker>,
    opts: ClientOptions,
    reply_queue: String,
    pending: Arc<Pending>,
    /// Per service, its call queue's declaration: made once, by the first
    /// call; concurrent calls wait for it instead of declaring again.
    declared: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
    slots: Semaphore,
    closed: Arc<AtomicBool>,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A client of the cluster. Cheap to clone; every clone shares one reply
/// queue and one reply consumer, and many calls may be in flight at once.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Declares the client's reply queue and starts consuming it.
    pub async fn connect(broker: Arc<dyn Broker>, opts: ClientOptions) -> Result<Self, Error> {
        if opts.max_in_flight == 0 || opts.prefetch == 0 {
            return Err(Error::Config(
                "max_in_flight and prefetch must be at least 1".into(),
            ));
        }
        let spec = QueueSpec::replies(&opts.client_id);
        // Bounded like a call: the broker must answer within the default timeout.
        let bound = opts.default_timeout;
        let setup = async {
            broker.declare(&spec).await?;
            broker.consume(&spec.name, opts.prefetch).await
        };
        let consumer = tokio::time::timeout(bound, setup)
            .await
            .map_err(|_| Error::Timeout(bound))??;
        let pending: Arc<Pending> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_replies(
            consumer,
            pending.clone(),
            opts.limits,
            closed.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                reply_queue: reply_queue(&opts.client_id),
                slots: Semaphore::new(opts.max_in_flight),
                declared: Mutex::default(),
                broker,
                opts,
                pending,
                closed,
                reader,
            }),
        })
    }

    /// The queue the client's replies arrive on.
    pub fn reply_queue(&self) -> &str {
        &self.inner.reply_queue
    }

    /// Calls `service.method(args)` and returns its first final outcome.
    /// When the deadline passes without an outcome, returns an `expired`
    /// reply made by the client. `Err` only when the call could not be
    /// published or the reply queue was lost.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        args: Value,
        opts: CallOptions,
    ) -> Result<Reply, Error> {
        let timeout = opts.timeout.unwrap_or(self.inner.opts.default_timeout);
        let mut call = Call::new(service, method, args);
        if let Some(id) = opts.call_id {
            call.call_id = id;
        }
        call.session_id = opts.session_id;
        call.retry = opts.retry;
        call.idempotency_key = opts.idempotency_key;
        call.concurrency_key = opts.concurrency_key;
        call.priority = opts.priority;
        call.traceparent = opts.traceparent;
        let now = OffsetDateTime::now_utc();
        let delay = opts.delay.unwrap_or_default();
        if opts.delay.is_some() {
            call.not_before = Some(now + delay);
        }
        call.deadline = Some(now + delay + timeout);
        self.send(call, delay + timeout).await
    }

    /// Cancels a call this client (or any other) sent: asks the
    /// coordinator, within the client's default timeout, with the
    /// operator's rights (the client's broker user must be allowed to
    /// write `callq.coordinator`, and a cluster key must sign the request
    /// where one is configured). The call's waiter gets the `cancelled`
    /// reply; the decision says whether the call was cancelled, had
    /// finished, or had left a trace and could not be.
    pub async fn cancel(
        &self,
        call_id: Uuid,
    ) -> Result<callq_schemas::protocol::CancelDecision, Error> {
        let admin =
            crate::Admin::connect(self.inner.broker.clone(), self.inner.opts.default_timeout)
                .await?;
        admin.cancel(call_id).await
    }

    /// Publishes a call envelope as it is (its `reply_to` is replaced by this
    /// client's reply queue) and waits up to `timeout` for its outcome. A
    /// call published again with the same `call_id` is answered once.
    pub async fn send(&self, mut call: Call, timeout: Duration) -> Result<Reply, Error> {
        if let Some(p) = call.priority.filter(|p| *p > callq_schemas::MAX_PRIORITY) {
            return Err(Error::InvalidCall(format!(
                "priority {p} is out of range: use 0 to {}",
                callq_schemas::MAX_PRIORITY
            )));
        }
        let inner = &self.inner;
        let _slot = inner
            .slots
            .acquire()
            .await
            .map_err(|_| Error::Disconnected)?;
        let give_up = tokio::time::Instant::now() + timeout;
        call.reply_to = Some(inner.reply_queue.clone());
        let call_id = call.call_id;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Disconnected);
        }
        let (tx, rx) = oneshot::channel();
        let _pending = PendingGuard::register(&inner.pending, call_id, tx)?;
        tokio::time::timeout_at(give_up, self.ensure_declared(&call.service))
            .await
            .map_err(|_| Error::Timeout(timeout))??;

        let queue = callq_broker::call_queue_for(&call.service, call.priority);
        let span = send_span(inner.broker.kind(), &queue, &mut call);
        let mut message = Message::new(call.to_bytes());
        message.key = Some(
            call.session_id
                .clone()
                .unwrap_or_else(|| call_id.to_string()),
        );
        // Retried with the same call id: a copy that was stored after all is
        // one body under one id, which the cluster runs once.
        let published =
            callq_broker::publish_until(inner.broker.as_ref(), &queue, &message, give_up, timeout)
                .await;
        let error = published.as_ref().err().map(ToString::to_string);
        telemetry::end(span, error);
        published?;
        match tokio::time::timeout_at(give_up, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => Ok(Reply::expired(call_id, 1)),
        }
    }

    async fn ensure_declared(&self, service: &str) -> Result<(), Error> {
        if !self.inner.opts.declare_call_queues {
            return Ok(());
        }
        let once = match self.inner.declared.lock() {
            Ok(mut declared) => declared.entry(service.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        // A burst of first calls declares once; a failed declaration is
        // tried again by the next call.
        once.get_or_try_init(|| async {
            for spec in QueueSpec::call_bands(service) {
                self.inner.broker.declare(&spec).await?;
            }
            Ok::<(), callq_broker::Error>(())
        })
        .await?;
        Ok(())
    }
}

/// The call's `send` span, a child of the `traceparent` the caller gave
/// (or of the current span), which becomes the envelope's `traceparent`:
/// the parent of every attempt's `process` span. `None` when spans are off.
fn send_span(kind: &str, queue: &str, call: &mut Call) -> Option<TraceContext> {
    if !telemetry::enabled() {
        return None;
    }
    let parent = match call.traceparent.as_deref() {
        Some(given) => telemetry::remote(Some(given)),
        None => TraceContext::current(),
    };
    let mut id = [0; uuid::fmt::Hyphenated::LENGTH];
    let attributes = vec![
        Attribute::new("messaging.system", telemetry::system(kind)),
        Attribute::new("messaging.operation.type", "send"),
        Attribute::new("messaging.destination.name", queue.to_owned()),
        Attribute::new(
            "messaging.message.id",
            call.call_id.hyphenated().encode_lower(&mut id).to_owned(),
        ),
        Attribute::new("callq.method", call.method.clone()),
    ];
    let ids = telemetry::call_ids(call.call_id.as_u128());
    let name = ["send ", queue].concat();
    let span = telemetry::start_as(ids, name, Kind::Producer, &parent, attributes)?;
    if let Some(traceparent) = telemetry::traceparent(&span) {
        call.traceparent = Some(traceparent);
    }
    Some(span)
}

/// Removes a call's pending entry however its wait ends.
struct PendingGuard<'a> {
    pending: &'a Pending,
    call_id: Uuid,
}

impl<'a> PendingGuard<'a> {
    /// Registers the waiter; refuses a call id that already has one, whose
    /// guard would otherwise remove the other's entry.
    fn register(
        pending: &'a Pending,
        call_id: Uuid,
        tx: oneshot::Sender<Reply>,
    ) -> Result<Self, Error> {
        let mut p = pending.lock().map_err(|_| Error::Disconnected)?;
        if p.contains_key(&call_id) {
            return Err(Error::AlreadyPending(call_id));
        }
        p.insert(call_id, tx);
        Ok(Self { pending, call_id })
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&self.call_id);
        }
    }
}

/// Hands each reply to the call waiting for it; the first final outcome per
/// call id wins and later duplicates are dropped.
async fn read_replies(
    mut consumer: Box<dyn callq_broker::Consumer>,
    pending: Arc<Pending>,
    limits: Limits,
    closed: Arc<AtomicBool>,
) {
    while let Some(item) = consumer.next().await {
        let delivery = match item {
            Ok(d) => d,
            Err(e) => {
                warn!("reply consumer error: {e}");
                continue;
            }
        };
        let fate = match decode_reply(&delivery.body, &limits) {
            Ok(reply) => {
                let waiter = pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.remove(&reply.call_id));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(reply);
                    }
                    None => {
                        debug!(call_id = %reply.call_id, outcome = %reply.outcome, "duplicate or late reply dropped")
                    }
                }
                Disposition::Ack
            }
            Err(e) => {
                warn!(queue = %delivery.queue, "unreadable reply dropped: {e}");
                Disposition::DeadLetter {
                    reason: e.to_string(),
                }
            }
        };
        if let Err(e) = delivery.settle(fate).await {
            warn!("settling a reply failed: {e}");
        }
    }
    // The consumer ended: fail the waiting calls rather than leave them
    // hanging, and refuse new ones.
    closed.store(true, Ordering::Release);
    warn!("the client's reply consumer ended: calls fail with `Disconnected`");
    if let Ok(mut p) = pending.lock() {
        p.clear();
    }
}
