//! The coordinator service: requests on the bus, group commit, failure
//! detection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{
    ATTEMPT_HEADER, Broker, COORDINATOR_QUEUE, Delivery, Disposition, Message, QueueSpec,
    call_queue,
};
use callq_schemas::protocol::{Answer, AnswerBody, Request, RequestBody, WorkerState};
use callq_schemas::{Limits, Uuid};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{Effect, Error, InFlight, Ledger, Store};

/// How long the coordinator waits for the broker to confirm one publish.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How the coordinator runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorOptions {
    /// How often workers heartbeat; the failure detector ticks as often.
    #[serde(with = "millis")]
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals of silence after which a worker is dead.
    pub dead_after: u32,
    /// Requests applied in one group commit, at most.
    pub batch_max: u16,
    /// Requests the coordinator queue holds, at most.
    pub queue_length: usize,
    /// Limits on request bodies (a heartbeat carries call bodies).
    pub limits: Limits,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(250),
            dead_after: 4,
            batch_max: 256,
            queue_length: 100_000,
            limits: Limits {
                max_bytes: 64 * 1024 * 1024,
                max_depth: 128,
            },
        }
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A worker as the registry knows it.
#[derive(Debug)]
struct WorkerEntry {
    state: WorkerState,
    services: Vec<String>,
    last_seen: Instant,
    in_flight: HashMap<Uuid, InFlight>,
}

/// The coordinator: registry, failure detector and call ledger.
pub struct Coordinator<S: Store> {
    opts: CoordinatorOptions,
    broker: Arc<dyn Broker>,
    ledger: Ledger<S>,
    workers: HashMap<String, WorkerEntry>,
}

impl<S: Store> Coordinator<S> {
    /// A coordinator over a ledger (opened from its store).
    pub fn new(opts: CoordinatorOptions, broker: Arc<dyn Broker>, ledger: Ledger<S>) -> Self {
        Self {
            opts,
            broker,
            ledger,
            workers: HashMap::new(),
        }
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let spec = QueueSpec::plain(COORDINATOR_QUEUE).max_length(self.opts.queue_length);
        self.broker.declare(&spec).await?;
        let mut requests = self
            .broker
            .consume(COORDINATOR_QUEUE, self.opts.batch_max.max(1))
            .await?;
        let mut tick = tokio::time::interval(self.opts.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!("coordinator serving");
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => self.detect_deaths().await,
                next = requests.next() => {
                    let first = match next {
                        None => return Err(Error::Disconnected),
                        Some(Err(e)) => { warn!("coordinator consumer: {e}"); continue; }
                        Some(Ok(d)) => d,
                    };
                    // Group commit: whatever else is ready joins this batch.
                    let mut batch = vec![first];
                    while batch.len() < usize::from(self.opts.batch_max) {
                        match requests.next().now_or_never() {
                            Some(Some(Ok(d))) => batch.push(d),
                            _ => break,
                        }
                    }
                    self.process(batch).await;
                }
            }
        }
    }

    /// Applies a batch of requests, commits once, then answers and acks.
    async fn process(&mut self, batch: Vec<Delivery>) {
        let mut answers = Vec::new();
        for d in &batch {
            match decode_request(&d.body, &self.opts.limits) {
                Ok(req) => match self.apply(req) {
                    Ok(Some(answer)) => answers.push(answer),
                    Ok(None) => {}
                    Err(e) => error!("coordinator store: {e}"),
                },
                Err(e) => warn!(queue = %d.queue, "unreadable coordinator request dropped: {e}"),
            }
        }
        let effects = match self.ledger.commit() {
            Ok(effects) => effects,
            Err(e) => {
                // Nothing was announced: the requests go back and are asked again.
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
        for (to, answer) in answers {
            let publish = self.broker.publish(&to, Message::new(answer.to_bytes()));
            let sent = tokio::time::timeout(PUBLISH_TIMEOUT, publish)
                .await
                .unwrap_or(Err(callq_broker::Error::Timeout(PUBLISH_TIMEOUT)));
            if let Err(e) = sent {
                // The worker asks again after its own timeout; the decision is durable.
                warn!(to, "answer not delivered: {e}");
            }
        }
        self.carry_out(effects).await;
        for d in batch {
            if let Err(e) = d.settle(Disposition::Ack).await {
                warn!("acking a coordinator request: {e}");
            }
        }
    }

    /// Applies one request; returns the answer to send, if any.
    fn apply(&mut self, req: Request) -> Result<Option<(String, Answer)>, Error> {
        let worker = req.worker_id;
        let answer = |body| Some((req.reply_to.clone(), Answer { v: 1, body }));
        match req.body {
            RequestBody::Heartbeat {
                services,
                state,
                in_flight,
                ..
            } => {
                let entry = self.workers.entry(worker.clone()).or_insert_with(|| {
                    info!(worker, ?services, ?state, "worker joined");
                    WorkerEntry {
                        state,
                        services: services.clone(),
                        last_seen: Instant::now(),
                        in_flight: HashMap::new(),
                    }
                });
                entry.state = state;
                entry.services = services;
                entry.last_seen = Instant::now();
                let mut now = HashMap::with_capacity(in_flight.len());
                for call in in_flight {
                    let id = call.lease.call_id;
                    let known_body = entry.in_flight.remove(&id).and_then(|f| f.body);
                    let body = call.body.map(String::into_bytes).or(known_body);
                    now.insert(
                        id,
                        InFlight {
                            lease: call.lease,
                            service: call.service,
                            reply_to: call.reply_to,
                            body,
                        },
                    );
                }
                entry.in_flight = now;
                Ok(None)
            }
            RequestBody::Resume {
                req_id,
                lease,
                service,
                call_reply_to,
            } => {
                let decision =
                    self.ledger
                        .resume(lease, &worker, &service, call_reply_to.as_deref())?;
                Ok(answer(AnswerBody::Resume { req_id, decision }))
            }
            RequestBody::Trace {
                req_id,
                lease,
                attempt,
                kind,
                service,
                call_reply_to,
            } => {
                let decision = self.ledger.trace(
                    lease,
                    attempt,
                    &worker,
                    &kind,
                    &service,
                    call_reply_to.as_deref(),
                )?;
                Ok(answer(AnswerBody::Trace { req_id, decision }))
            }
            RequestBody::Complete {
                req_id,
                lease,
                attempt,
                reply,
            } => {
                let decision = self.ledger.complete(lease, attempt, reply)?;
                Ok(answer(AnswerBody::Complete { req_id, decision }))
            }
            RequestBody::Leave {} => {
                if self.workers.remove(&worker).is_some() {
                    info!(worker, "worker left");
                }
                Ok(None)
            }
        }
    }

    /// Declares silent workers dead and revokes their calls.
    async fn detect_deaths(&mut self) {
        let silence = self.opts.heartbeat_interval * self.opts.dead_after;
        let now = Instant::now();
        let dead: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > silence)
            .map(|(id, _)| id.clone())
            .collect();
        if dead.is_empty() {
            return;
        }
        let mut lost = Vec::new();
        for id in dead {
            if let Some(w) = self.workers.remove(&id) {
                warn!(worker = id, services = ?w.services, in_flight = w.in_flight.len(), "worker dead: no heartbeat for {silence:?}");
                let calls: Vec<InFlight> = w.in_flight.values().cloned().collect();
                if let Err(e) = self.ledger.worker_lost(&id, &calls) {
                    error!(worker = id, "revoking a dead worker's calls: {e}");
                }
                lost.push((id, w));
            }
        }
        match self.ledger.commit() {
            Ok(effects) => self.carry_out(effects).await,
            Err(e) => {
                // Try again at the next tick: the workers stay in the registry.
                error!("committing dead workers' calls failed: {e}");
                for (id, w) in lost {
                    self.workers.insert(id, w);
                }
            }
        }
    }

    /// Publishes re-issues and fatal answers of durable decisions.
    async fn carry_out(&self, effects: Vec<Effect>) {
        for effect in effects {
            let (to, message) = match effect {
                Effect::Reissue {
                    call_id,
                    service,
                    attempt,
                    body,
                } => {
                    info!(%call_id, attempt, service, "re-issuing a dead worker's call");
                    (
                        call_queue(&service),
                        Message::new(body)
                            .header(ATTEMPT_HEADER, attempt.to_string())
                            .key(call_id.to_string()),
                    )
                }
                Effect::AnswerFatal { reply_to, reply } => {
                    warn!(call_id = %reply.call_id, "answering fatal: {}", reply.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default());
                    (
                        reply_to,
                        Message::new(reply.to_bytes()).key(reply.call_id.to_string()),
                    )
                }
            };
            let mut backoff = Duration::from_millis(10);
            for attempt in 1..=5 {
                let publish = self.broker.publish(&to, message.clone());
                let sent = tokio::time::timeout(PUBLISH_TIMEOUT, publish)
                    .await
                    .unwrap_or(Err(callq_broker::Error::Timeout(PUBLISH_TIMEOUT)));
                match sent {
                    Ok(()) => break,
                    Err(e) if e.is_transient() && attempt < 5 => {
                        tokio::time::sleep(backoff).await;
                        backoff *= 4;
                    }
                    Err(e) => {
                        // Durable all the same: the next copy's resume learns it.
                        error!(to, "publishing a decision's effect failed: {e}");
                        break;
                    }
                }
            }
        }
    }
}

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
