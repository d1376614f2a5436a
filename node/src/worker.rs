//! The worker runtime: pull, run, reply with confirm, then settle.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use callq_broker::{Broker, Delivery, Disposition, Message, QueueSpec};
use callq_schemas::{Limits, Reply, codes, decode_call, peek};
use futures::{FutureExt, StreamExt, stream};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{Ctx, Error, Service};

/// How a worker runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerOptions {
    /// The worker's id in the cluster; unique.
    pub worker_id: String,
    /// Calls run at once, at most. Each service's consumer prefetches this
    /// many, so the broker never hands the worker more than it can run.
    pub capacity: u16,
    /// Body limits, checked before parsing.
    pub limits: Limits,
    /// How long a graceful shutdown waits for calls in flight before it
    /// abandons them (they return to the queue and run elsewhere).
    #[serde(with = "millis")]
    pub drain_timeout: Duration,
    /// How long a reply publish is retried while the broker refuses it
    /// transiently (queue full, no confirm) before the call is requeued.
    #[serde(with = "millis")]
    pub reply_retry: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", uuid::Uuid::now_v7().simple()),
            capacity: 64,
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(30),
            reply_retry: Duration::from_secs(30),
        }
    }
}

pub(crate) mod millis {
    //! Durations as whole milliseconds in configuration.
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Counters of what a worker did, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Calls answered `ok`.
    pub ok: AtomicU64,
    /// Calls answered `error` by their handler (including unknown methods).
    pub error: AtomicU64,
    /// Calls whose handler panicked (answered `error`, `handler_panicked`).
    pub panicked: AtomicU64,
    /// Calls answered `expired` without running.
    pub expired: AtomicU64,
    /// Bodies that could not be read (answered `bad_request` where
    /// possible, and dead-lettered).
    pub bad_request: AtomicU64,
    /// Calls dead-lettered for any reason.
    pub dead_lettered: AtomicU64,
    /// Replies that could not be published.
    pub reply_failed: AtomicU64,
    /// Calls running now.
    pub in_flight: AtomicU64,
}

impl WorkerStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls finished, whatever their outcome.
    pub fn finished(&self) -> u64 {
        [
            &self.ok,
            &self.error,
            &self.panicked,
            &self.expired,
            &self.bad_request,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// A worker process's runtime: a set of services and a broker.
pub struct Worker {
    opts: WorkerOptions,
    broker: Arc<dyn Broker>,
    services: HashMap<String, Service>,
    stats: Arc<WorkerStats>,
}

struct Shared {
    opts: WorkerOptions,
    broker: Arc<dyn Broker>,
    services: HashMap<String, (Service, QueueSpec)>,
    stats: Arc<WorkerStats>,
}

impl Worker {
    /// A worker with no services yet.
    pub fn new(opts: WorkerOptions, broker: Arc<dyn Broker>) -> Self {
        Self {
            opts,
            broker,
            services: HashMap::new(),
            stats: Arc::default(),
        }
    }

    /// Adds a service.
    #[must_use]
    pub fn service(mut self, service: Service) -> Self {
        self.services.insert(service.name().to_owned(), service);
        self
    }

    /// The worker's counters.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.opts.worker_id
    }

    /// Declares the call queues of the worker's services; [`Worker::run`]
    /// does it too.
    pub async fn declare(&self) -> Result<(), Error> {
        for name in self.services.keys() {
            self.broker.declare(&QueueSpec::calls(name)).await?;
        }
        Ok(())
    }

    /// Runs until `shutdown` is cancelled, then drains: stops pulling,
    /// finishes the calls in flight within the drain timeout, and leaves.
    ///
    /// Dropping the returned future instead kills the worker on the spot:
    /// its calls stop at their next await point and the broker returns their
    /// deliveries to the queues.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        if self.services.is_empty() {
            return Err(Error::Config("a worker needs at least one service".into()));
        }
        if self.opts.capacity == 0 {
            return Err(Error::Config("capacity must be at least 1".into()));
        }
        self.declare().await?;
        let mut consumers = Vec::with_capacity(self.services.len());
        let mut services = HashMap::with_capacity(self.services.len());
        for (name, service) in self.services {
            let spec = QueueSpec::calls(&name);
            let consumer = self.broker.consume(&spec.name, self.opts.capacity).await?;
            // A consumer that ends yields one `Closed` error, so the worker
            // learns that a service lost its consumer instead of going quiet.
            consumers.push(stream::unfold(Some(consumer), |c| async move {
                let mut c = c?;
                match c.next().await {
                    Some(item) => Some((item, Some(c))),
                    None => Some((Err(callq_broker::Error::Closed), None)),
                }
            }));
            services.insert(name, (service, spec));
        }
        let capacity = usize::from(self.opts.capacity);
        let shared = Arc::new(Shared {
            opts: self.opts,
            broker: self.broker,
            services,
            stats: self.stats,
        });
        info!(worker = %shared.opts.worker_id, services = ?shared.services.keys().collect::<Vec<_>>(), capacity, "worker serving");

        let mut incoming = stream::select_all(consumers.into_iter().map(StreamExt::boxed));
        let mut calls = JoinSet::new();
        let ended = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                Some(joined) = calls.join_next(), if !calls.is_empty() => {
                    if let Err(e) = joined {
                        error!(worker = %shared.opts.worker_id, "call task failed: {e}");
                    }
                }
                item = incoming.next(), if calls.len() < capacity => match item {
                    Some(Ok(delivery)) => {
                        calls.spawn(handle(shared.clone(), delivery));
                    }
                    Some(Err(callq_broker::Error::Closed)) | None => {
                        error!(worker = %shared.opts.worker_id, "a consumer ended: the broker connection is lost");
                        break Err(Error::Disconnected);
                    }
                    Some(Err(e)) => {
                        warn!(worker = %shared.opts.worker_id, "consumer error: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        };

        // Drain: the consumers stay open (they hold the leases of the calls in
        // flight) until those calls are settled or abandoned.
        info!(worker = %shared.opts.worker_id, in_flight = calls.len(), "worker draining");
        let finish = async { while calls.join_next().await.is_some() {} };
        if tokio::time::timeout(shared.opts.drain_timeout, finish)
            .await
            .is_err()
        {
            warn!(
                worker = %shared.opts.worker_id,
                abandoned = calls.len(),
                "drain timeout: abandoning calls in flight; the broker redelivers them"
            );
            calls.shutdown().await;
        }
        drop(incoming);
        info!(worker = %shared.opts.worker_id, "worker stopped");
        ended
    }
}

/// Runs one delivery to its end: decides its fate, then settles it.
async fn handle(shared: Arc<Shared>, delivery: Delivery) {
    shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    let fate = decide(&shared, &delivery).await;
    if matches!(fate, Disposition::DeadLetter { .. }) {
        WorkerStats::bump(&shared.stats.dead_lettered);
    }
    if let Err(e) = delivery.settle(fate).await {
        warn!(worker = %shared.opts.worker_id, "settling a delivery failed: {e}");
    }
    shared.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// The one place where a delivery's fate is decided. The reply, if any, is
/// confirmed by the broker before this returns `Ack`.
async fn decide(shared: &Shared, delivery: &Delivery) -> Disposition {
    let stats = &shared.stats;
    let limits = &shared.opts.limits;
    let call = match decode_call(&delivery.body, limits) {
        Ok(call) => call,
        Err(e) => {
            WorkerStats::bump(&stats.bad_request);
            let p = peek(&delivery.body, limits.max_bytes.saturating_mul(4));
            warn!(worker = %shared.opts.worker_id, queue = %delivery.queue, kind = e.kind(), call_id = ?p.call_id, "bad request: {e}");
            if let Some(reply_to) = p.reply_to {
                let reply = Reply::bad_request(p.call_id, e.to_string());
                // The call is dead-lettered whether or not the reply goes out.
                let _ = send_reply(shared, &reply_to, &reply).await;
            }
            return Disposition::DeadLetter {
                reason: format!("{}: {e}", codes::BAD_REQUEST),
            };
        }
    };
    let attempt = delivery.attempt();
    let reply_to = call.reply_to.clone();
    let answer = |reply: Reply| async move {
        match reply_to {
            None => Disposition::Ack,
            Some(to) => send_reply(shared, &to, &reply).await,
        }
    };

    let Some((service, spec)) = shared.services.get(&call.service) else {
        WorkerStats::bump(&stats.error);
        let msg = format!(
            "this worker serves no service `{}` (the call came from queue `{}`)",
            call.service, delivery.queue
        );
        return match answer(Reply::error(
            call.call_id,
            attempt,
            codes::UNKNOWN_SERVICE,
            msg.clone(),
        ))
        .await
        {
            Disposition::Ack => Disposition::DeadLetter { reason: msg },
            other => other,
        };
    };
    if let Some(limit) = spec.delivery_limit
        && delivery.delivery_count >= limit
    {
        WorkerStats::bump(&stats.error);
        let msg = format!(
            "the call was delivered {} times without completing (it may crash workers); it was moved to `{}`",
            delivery.delivery_count + 1,
            spec.dead_letter.as_deref().unwrap_or("nowhere")
        );
        warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "{msg}");
        return match answer(Reply::error(
            call.call_id,
            attempt,
            codes::DELIVERY_LIMIT,
            msg,
        ))
        .await
        {
            Disposition::Ack => Disposition::DeadLetter {
                reason: codes::DELIVERY_LIMIT.into(),
            },
            other => other,
        };
    }
    if call.is_expired_at(OffsetDateTime::now_utc()) {
        WorkerStats::bump(&stats.expired);
        return answer(Reply::expired(call.call_id, attempt)).await;
    }

    let ctx = Ctx {
        call_id: call.call_id,
        attempt,
        service: service.name_arc(),
        method: call.method.clone(),
        session_id: call.session_id,
        idempotency_key: call.idempotency_key,
        deadline: call.deadline,
        traceparent: call.traceparent,
    };
    // A handler may panic before its future exists (in the closure's own
    // body) or while it runs: both are caught.
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
        service.invoke(&call.method, ctx, call.args)
    }));
    let outcome = match started {
        Err(panic) => Err(panic),
        Ok(None) => Ok(None),
        Ok(Some(run)) => AssertUnwindSafe(run).catch_unwind().await.map(Some),
    };
    let reply = match outcome {
        Err(panic) => {
            WorkerStats::bump(&stats.panicked);
            panicked(
                shared,
                &call.service,
                &call.method,
                call.call_id,
                attempt,
                panic,
            )
        }
        Ok(None) => {
            WorkerStats::bump(&stats.error);
            Reply::error(
                call.call_id,
                attempt,
                codes::UNKNOWN_METHOD,
                format!(
                    "service `{}` has no method `{}` (it has: {})",
                    call.service,
                    call.method,
                    service.methods().join(", ")
                ),
            )
        }
        Ok(Some(Ok(result))) => {
            WorkerStats::bump(&stats.ok);
            Reply::ok(call.call_id, attempt, result)
        }
        Ok(Some(Err(e))) => {
            WorkerStats::bump(&stats.error);
            Reply::error(call.call_id, attempt, &e.code, e.message)
        }
    };
    answer(reply).await
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

/// Publishes a reply with confirm, retrying transient refusals within the
/// worker's reply retry budget. `Ack` once confirmed, or when nobody can
/// receive it (its queue is gone); `Requeue` when the broker kept refusing.
async fn send_reply(shared: &Shared, to: &str, reply: &Reply) -> Disposition {
    let message = Message::new(reply.to_bytes()).key(reply.call_id.to_string());
    let give_up = tokio::time::Instant::now() + shared.opts.reply_retry;
    let mut backoff = Duration::from_millis(5);
    loop {
        let sent = tokio::time::timeout_at(give_up, shared.broker.publish(to, message.clone()))
            .await
            .unwrap_or(Err(callq_broker::Error::Timeout(shared.opts.reply_retry)));
        match sent {
            Ok(()) => return Disposition::Ack,
            Err(e) if e.is_transient() && tokio::time::Instant::now() + backoff < give_up => {
                debug!(worker = %shared.opts.worker_id, to, "reply publish refused, retrying: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e @ callq_broker::Error::NoSuchQueue(_)) => {
                // Nobody can ever receive it: the outcome stands, unheard.
                WorkerStats::bump(&shared.stats.reply_failed);
                warn!(worker = %shared.opts.worker_id, to, call_id = %reply.call_id, "reply cannot be delivered, dropping it: {e}");
                return Disposition::Ack;
            }
            Err(e) => {
                WorkerStats::bump(&shared.stats.reply_failed);
                warn!(worker = %shared.opts.worker_id, to, call_id = %reply.call_id, "reply not confirmed, requeueing the call: {e}");
                return Disposition::Requeue;
            }
        }
    }
}
