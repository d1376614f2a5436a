//! Intake: the workers' requests and heartbeats read off the bus in
//! batches; each batch is applied with one group commit, and only then
//! answered and acked (or, when the commit fails, requeued unanswered).

use callq_broker::telemetry;
use callq_broker::{Broker, COORDINATOR_QUEUE, Consumer, Delivery, Disposition, HEARTBEAT_QUEUE};
use callq_schemas::Limits;
use callq_schemas::protocol::Request;
use futures::{FutureExt, StreamExt, stream};
use tracing::{debug, error, warn};

use super::{Coordinator, IN_FLIGHT, Outbox};
use crate::{Error, Store};

/// The coordinator's two queues: requests, and workers' heartbeats.
pub(super) struct Inbox {
    pub(super) requests: Box<dyn Consumer>,
    pub(super) beats: Box<dyn Consumer>,
}

impl Inbox {
    /// Consumes both queues (declared already), `prefetch` deliveries each.
    pub(super) async fn open(broker: &dyn Broker, prefetch: u16) -> Result<Self, Error> {
        Ok(Self {
            requests: broker.consume(COORDINATOR_QUEUE, prefetch).await?,
            beats: broker.consume(HEARTBEAT_QUEUE, prefetch).await?,
        })
    }
}

/// The first delivery of a batch; a consumer that ended ends the service.
pub(super) fn first(
    next: Option<Result<Delivery, callq_broker::Error>>,
    queue: &str,
) -> Result<Option<Delivery>, Error> {
    match next {
        None => Err(Error::Disconnected),
        Some(Err(e)) => {
            warn!("coordinator {queue} consumer: {e}");
            Ok(None)
        }
        Some(Ok(d)) => Ok(Some(d)),
    }
}

/// The deliveries ready now, up to `max`.
fn ready(consumer: &mut Box<dyn Consumer>, max: usize) -> Vec<Delivery> {
    let mut batch = Vec::new();
    while batch.len() < max {
        match consumer.next().now_or_never() {
            Some(Some(Ok(d))) => batch.push(d),
            _ => break,
        }
    }
    batch
}

impl<S: Store> Coordinator<S> {
    /// Applies what is ready in both queues, up to a batch of each
    /// (heartbeats first), as one group commit. Returns whether either
    /// queue had a full batch ready: it may hold more.
    pub(super) async fn drain_requests(&mut self, inbox: &mut Inbox) -> bool {
        let max = self.opts.batch();
        let requests = ready(&mut inbox.requests, max);
        let mut batch = ready(&mut inbox.beats, max);
        let full = requests.len() >= max || batch.len() >= max;
        batch.extend(requests);
        if !batch.is_empty() {
            self.process(batch).await;
        }
        full
    }

    /// A delivery arrived between ticks: it and whatever else is ready, on
    /// its own queue first and then on the other, make one group commit.
    pub(super) async fn serve_arrival(
        &mut self,
        first: Option<Delivery>,
        its_queue: &mut Box<dyn Consumer>,
        other_queue: &mut Box<dyn Consumer>,
    ) {
        let max = self.opts.batch();
        let mut batch: Vec<Delivery> = first.into_iter().collect();
        batch.extend(ready(its_queue, max));
        batch.extend(ready(other_queue, max));
        if !batch.is_empty() {
            self.process(batch).await;
        }
    }

    /// Applies a batch of requests, commits once, then answers, carries out
    /// the effects and acks; when the commit fails, nothing is announced and
    /// the requests are requeued, to be asked again.
    async fn process(&mut self, batch: Vec<Delivery>) {
        let answers = self.apply_all(&batch);
        let clock = std::time::Instant::now();
        let committed = self.ledger.commit();
        crate::metrics::committed(batch.len(), clock.elapsed());
        let effects = match committed {
            Ok(effects) => effects,
            Err(e) => {
                for span in self.spans.drain(..) {
                    telemetry::end(Some(span), Some(format!("group commit failed: {e}")));
                }
                error!(
                    "group commit failed, requeueing {} requests: {e}",
                    batch.len()
                );
                for d in batch {
                    let _ = d.settle(Disposition::Requeue).await;
                }
                return;
            }
        };
        self.tell(answers).await;
        for span in self.spans.drain(..) {
            telemetry::end(Some(span), None);
        }
        self.carry_out(effects).await;
        stream::iter(batch)
            .for_each_concurrent(IN_FLIGHT, |d| async move {
                if let Err(e) = d.settle(Disposition::Ack).await {
                    warn!("acking a coordinator request: {e}");
                }
            })
            .await;
        self.fill_keys().await;
    }

    /// Decodes and applies each request of a batch (an unreadable one is
    /// logged and dropped: it is acked with the batch). Returns the
    /// answers and orders to send once the batch is durable.
    fn apply_all(&mut self, batch: &[Delivery]) -> Outbox {
        let mut answers = Vec::new();
        let margin = i64::try_from(self.opts.clock_skew.as_millis()).unwrap_or(i64::MAX);
        let stale_before = self.clock.now_ms().saturating_add(margin);
        for d in batch {
            match decode_request(&d.body, &self.opts.limits) {
                Ok(req) if req.expires_ms.is_some_and(|at| at <= stale_before) => {
                    // Its sender gave up on it: granting it now could only
                    // make a call look as if it left a trace.
                    self.stale_dropped += 1;
                    crate::metrics::count(crate::metrics::STALE_DROPPED);
                    debug!(worker = %req.worker_id, kind = req.body.kind(), "stale request dropped: its sender gave up on it");
                }
                Ok(req) => {
                    if let Err(e) = self.apply(req, &mut answers) {
                        self.store_failed(&e);
                    }
                }
                Err(e) => warn!(queue = %d.queue, "unreadable coordinator request dropped: {e}"),
            }
        }
        answers
    }
}

impl<S: Store> Coordinator<S> {
    /// Logs a failure of the store, at most once a second, with the count
    /// of requests it failed since the last line.
    fn store_failed(&mut self, e: &Error) {
        self.store_failures += 1;
        let now = std::time::Instant::now();
        if self.store_quiet_until.is_some_and(|until| now < until) {
            return;
        }
        error!(requests = self.store_failures, "coordinator store: {e}");
        self.store_failures = 0;
        self.store_quiet_until = Some(now + std::time::Duration::from_secs(1));
    }
}

/// A request, read within the limits.
fn decode_request(body: &[u8], limits: &Limits) -> Result<Request, String> {
    if body.len() > limits.max_bytes {
        return Err(format!(
            "{} bytes, above the limit of {}",
            body.len(),
            limits.max_bytes
        ));
    }
    let req: Request = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if req.v != 1 {
        return Err(format!("unknown protocol version v={}", req.v));
    }
    Ok(req)
}
