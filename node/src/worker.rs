//! The worker runtime: pull, run, reply with confirm, then settle.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use callq_broker::{
    Assignment, Broker, Delivery, Disposition, Error as BrokerError, Message, QueueSpec,
    worker_queue,
};
use callq_schemas::protocol::{
    AnswerBody, CompleteDecision, Completion, InFlightCall, Lease, RequestBody, ResumeDecision,
    WorkerState,
};
use callq_schemas::{Limits, Reply, codes, decode_call, peek};
use futures::{FutureExt, StreamExt, stream};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::faults::{Crash, CrashPoint, CrashSite, Faults};
use crate::link::{Abort, Attempt, Link, Order};
use crate::session::{CallSession, SessionCache};
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
    #[serde(with = "callq_schemas::millis")]
    pub drain_timeout: Duration,
    /// How long a reply publish is retried while the broker refuses it
    /// transiently (queue full, no confirm) before the call is requeued.
    #[serde(with = "callq_schemas::millis")]
    pub reply_retry: Duration,
    /// Whether a coordinator arbitrates this worker's calls (the default).
    /// Without one, redeliveries run without asking, traces are granted
    /// locally, and a lost worker's calls are retried by the broker alone:
    /// at-least-once, for a single machine and tests.
    pub coordinated: bool,
    /// Start as a standby: load the services and declare their queues, but
    /// consume nothing until the coordinator promotes the worker.
    pub standby: bool,
    /// How often the worker heartbeats to the coordinator.
    #[serde(with = "callq_schemas::millis")]
    pub heartbeat_interval: Duration,
    /// How long a request to the coordinator (`resume`, `trace`,
    /// `complete`) is tried before the worker gives up on it: the call goes
    /// back to its queue.
    #[serde(with = "callq_schemas::millis")]
    pub coordinator_patience: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", uuid::Uuid::now_v7().simple()),
            capacity: 64,
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(30),
            reply_retry: Duration::from_secs(30),
            coordinated: true,
            standby: false,
            heartbeat_interval: Duration::from_millis(250),
            coordinator_patience: Duration::from_secs(10),
        }
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
    /// Deliveries that asked the coordinator `resume` first.
    pub resumed: AtomicU64,
    /// Deliveries acked without running because the coordinator said the
    /// call was done, failed or superseded.
    pub dropped: AtomicU64,
    /// Attempts whose trace was refused (revoked): their result was dropped.
    pub revoked: AtomicU64,
    /// Traces granted.
    pub traces: AtomicU64,
}

impl WorkerStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
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
    faults: Option<Arc<dyn Faults>>,
}

/// A call in flight, as heartbeats report it.
struct Flight {
    lease: Lease,
    service: String,
    reply_to: Option<String>,
    /// The body, until a heartbeat carried it to the coordinator.
    body: Option<Bytes>,
    /// Whether a heartbeat reported it: then its end is reported too.
    reported: bool,
}

/// A completion on its way to the coordinator, and who waits for it.
type Outgoing = (Completion, oneshot::Sender<()>);

/// Runs of one attempt at most when its session write keeps meeting newer
/// versions; then the call answers `session_conflict`.
const SESSION_RUNS: u32 = 16;

/// Bodies one heartbeat carries at most, in bytes; the rest wait for the
/// next beat.
const HEARTBEAT_BODY_BUDGET: usize = 8 * 1024 * 1024;

struct Shared {
    opts: WorkerOptions,
    broker: Arc<dyn Broker>,
    services: HashMap<String, (Service, QueueSpec)>,
    stats: Arc<WorkerStats>,
    link: Option<Arc<Link>>,
    flights: Mutex<HashMap<Uuid, Flight>>,
    /// Where the broker partitions: each service consumer's partitions.
    assignments: Mutex<BTreeMap<String, Assignment>>,
    state: Mutex<WorkerState>,
    completions: Option<mpsc::Sender<Outgoing>>,
    crash: Option<Crash>,
    sessions: Arc<SessionCache>,
}

/// Aborts a background task when the worker's future is dropped.
struct Background(JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Incoming = stream::SelectAll<stream::BoxStream<'static, Result<Delivery, BrokerError>>>;

impl Worker {
    /// A worker with no services yet.
    pub fn new(opts: WorkerOptions, broker: Arc<dyn Broker>) -> Self {
        Self {
            opts,
            broker,
            services: HashMap::new(),
            stats: Arc::default(),
            faults: None,
        }
    }

    /// Gives the worker a crash plan, for fault-injection tests: the worker
    /// dies wherever the plan says (see [`Faults`]).
    #[must_use]
    pub fn faults(mut self, plan: Arc<dyn Faults>) -> Self {
        self.faults = Some(plan);
        self
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

    /// Runs until `shutdown` is cancelled or the coordinator orders a drain,
    /// then drains: stops pulling, finishes the calls in flight within the
    /// drain timeout, tells the coordinator it leaves, and returns.
    ///
    /// A standby worker consumes nothing until the coordinator promotes it.
    ///
    /// Dropping the returned future instead kills the worker on the spot:
    /// its calls stop at their next await point, its heartbeats stop, and the
    /// broker returns their deliveries to the queues. A worker with a crash
    /// plan does the same where the plan says, and returns
    /// [`Error::Crashed`].
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let Some(crash) = self.faults.take().map(Crash::new) else {
            return self.serve(shutdown, None).await;
        };
        let switch = crash.switch.clone();
        let id = self.opts.worker_id.clone();
        tokio::select! {
            biased;
            () = switch.cancelled() => {
                warn!(worker = %id, "worker crashed by its fault plan");
                Err(Error::Crashed)
            }
            ended = self.serve(shutdown, Some(crash)) => ended,
        }
    }

    async fn serve(self, shutdown: CancellationToken, crash: Option<Crash>) -> Result<(), Error> {
        if self.services.is_empty() {
            return Err(Error::Config("a worker needs at least one service".into()));
        }
        if self.opts.capacity == 0 {
            return Err(Error::Config("capacity must be at least 1".into()));
        }
        if self.opts.coordinated && self.opts.heartbeat_interval.is_zero() {
            return Err(Error::Config("heartbeat_interval must not be zero".into()));
        }
        self.declare().await?;
        let (link, mut orders) = if self.opts.coordinated {
            let (link, orders) = Link::connect(
                self.broker.clone(),
                &self.opts.worker_id,
                worker_queue(&self.opts.worker_id),
                self.opts.coordinator_patience,
            )
            .await?;
            (Some(link), orders)
        } else {
            (None, mpsc::channel(1).1)
        };
        let (completions, outgoing) = if link.is_some() {
            let (tx, rx) = mpsc::channel(usize::from(self.opts.capacity) * 2);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let standby = self.opts.standby;
        let shared = Arc::new(Shared {
            services: self
                .services
                .into_iter()
                .map(|(name, service)| {
                    let spec = QueueSpec::calls(&name);
                    (name, (service, spec))
                })
                .collect(),
            opts: self.opts,
            broker: self.broker,
            stats: self.stats,
            link: link.clone(),
            flights: Mutex::default(),
            assignments: Mutex::default(),
            state: Mutex::new(if standby {
                WorkerState::Standby
            } else {
                WorkerState::Active
            }),
            completions,
            crash,
            sessions: Arc::default(),
        });
        let outbox_task = match (link, outgoing) {
            (Some(link), Some(rx)) => {
                Some(Background(tokio::spawn(outbox(shared.clone(), link, rx))))
            }
            _ => None,
        };
        let mut incoming = if standby {
            info!(worker = %shared.opts.worker_id, services = ?shared.service_names(), "worker standing by");
            None
        } else {
            Some(open_consumers(&shared).await?)
        };
        let capacity = usize::from(shared.opts.capacity);

        let mut calls = JoinSet::new();
        let ended = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                Some(order) = orders.recv() => match order {
                    Order::Promote if incoming.is_none() => {
                        info!(worker = %shared.opts.worker_id, "promoted: consuming now");
                        match open_consumers(&shared).await {
                            Ok(c) => {
                                incoming = Some(c);
                                shared.set_state(WorkerState::Active);
                            }
                            Err(e) => break Err(e),
                        }
                    }
                    Order::Promote => {}
                    Order::Drain => {
                        info!(worker = %shared.opts.worker_id, "the coordinator asks this worker to drain");
                        break Ok(());
                    }
                    Order::StartStandby(_) => {}
                    Order::SessionChanged(id, version) => shared.sessions.changed(&id, version),
                },
                Some(joined) = calls.join_next(), if !calls.is_empty() => {
                    if let Err(e) = joined {
                        error!(worker = %shared.opts.worker_id, "call task failed: {e}");
                    }
                }
                item = next_delivery(&mut incoming), if incoming.is_some() && calls.len() < capacity => match item {
                    Some(Ok(delivery)) => {
                        calls.spawn(handle(shared.clone(), delivery));
                    }
                    Some(Err(BrokerError::Closed)) | None => {
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
        // flight) until those calls are settled or abandoned; heartbeats go on.
        shared.set_state(WorkerState::Draining);
        // Its sessions go back to the store: another worker reads them from
        // there (and the coordinator forgets this one with its `leave`).
        shared.sessions.clear();
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
        // No heartbeat may follow the leave and register the worker again.
        drop(outbox_task);
        if let Some(link) = &shared.link
            && let Err(e) = link.send(RequestBody::Leave {}).await
        {
            warn!(worker = %shared.opts.worker_id, "telling the coordinator this worker leaves: {e}");
        }
        info!(worker = %shared.opts.worker_id, "worker stopped");
        ended
    }
}

impl Shared {
    fn service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.services.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    fn set_state(&self, state: WorkerState) {
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
    }

    /// The heartbeat: state, load and the calls in flight, with the bodies
    /// of calls not reported before (within the budget); and the tokens of
    /// the calls it carries, to mark reported once it is sent.
    fn heartbeat(&self) -> (RequestBody, Vec<Uuid>) {
        let state = self.state.lock().map(|s| *s).unwrap_or(WorkerState::Active);
        let capacity = u32::from(self.opts.capacity);
        let mut in_flight = Vec::new();
        let mut tokens = Vec::new();
        if let Ok(flights) = self.flights.lock() {
            let mut budget = HEARTBEAT_BODY_BUDGET;
            for f in flights.values() {
                let body = if f.reported {
                    None
                } else {
                    let len = f.body.as_ref().map_or(0, Bytes::len);
                    if len > budget {
                        continue;
                    }
                    budget -= len;
                    f.body
                        .as_ref()
                        .and_then(|b| String::from_utf8(b.to_vec()).ok())
                };
                tokens.push(f.lease.token);
                in_flight.push(InFlightCall {
                    lease: f.lease,
                    service: f.service.clone(),
                    reply_to: f.reply_to.clone(),
                    body,
                });
            }
        }
        let busy = u32::try_from(in_flight.len()).unwrap_or(u32::MAX);
        let partitions = self
            .assignments
            .lock()
            .map(|a| {
                a.iter()
                    .map(|(service, a)| (service.clone(), a.get()))
                    .filter(|(_, p)| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let beat = RequestBody::Heartbeat {
            services: self.service_names(),
            state,
            capacity,
            free: capacity.saturating_sub(busy),
            in_flight,
            partitions,
        };
        (beat, tokens)
    }

    /// The coordinator has the calls of a sent heartbeat, bodies included.
    fn reported(&self, tokens: &[Uuid]) {
        if let Ok(mut flights) = self.flights.lock() {
            for t in tokens {
                if let Some(f) = flights.get_mut(t) {
                    f.reported = true;
                    f.body = None;
                }
            }
        }
    }
}

/// Heartbeats and batched completions, from one task. They travel on
/// different queues, so the coordinator may read a heartbeat that still
/// lists a call after the completion sent ahead of it, and hold the call as
/// in flight until the next heartbeat. Should the worker die in that
/// moment, a traced call is answered from the ledger (`done`), and a
/// traceless one may run again, which leaves nothing and whose second
/// reply the client drops.
async fn outbox(shared: Arc<Shared>, link: Arc<Link>, mut rx: mpsc::Receiver<Outgoing>) {
    let mut tick = tokio::time::interval(shared.opts.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (beat, tokens) = shared.heartbeat();
                match link.beat(beat).await {
                    Ok(()) => shared.reported(&tokens),
                    Err(e) => warn!(worker = %shared.opts.worker_id, "heartbeat not sent: {e}"),
                }
            }
            first = rx.recv() => {
                let Some(first) = first else { return };
                let mut batch = vec![first];
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (calls, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                if let Err(e) = link.send(RequestBody::Completed { calls }).await {
                    warn!(worker = %shared.opts.worker_id, "completions not sent: {e}");
                }
                for w in waiters {
                    let _ = w.send(());
                }
            }
        }
    }
}

/// Opens one consumer per service, each prefetching the worker's capacity.
async fn open_consumers(shared: &Shared) -> Result<Incoming, Error> {
    let mut consumers = Vec::with_capacity(shared.services.len());
    for (name, (_, spec)) in &shared.services {
        let consumer = shared
            .broker
            .consume(&spec.name, shared.opts.capacity)
            .await?;
        if let (Some(a), Ok(mut assignments)) = (consumer.assignment(), shared.assignments.lock()) {
            assignments.insert(name.clone(), a);
        }
        // A consumer that ends yields one `Closed` error, so the worker
        // learns that a service lost its consumer instead of going quiet.
        consumers.push(
            stream::unfold(Some(consumer), |c| async move {
                let mut c = c?;
                match c.next().await {
                    Some(item) => Some((item, Some(c))),
                    None => Some((Err(BrokerError::Closed), None)),
                }
            })
            .boxed(),
        );
    }
    info!(worker = %shared.opts.worker_id, services = ?shared.service_names(), capacity = shared.opts.capacity, "worker serving");
    Ok(stream::select_all(consumers))
}

async fn next_delivery(incoming: &mut Option<Incoming>) -> Option<Result<Delivery, BrokerError>> {
    match incoming {
        Some(s) => s.next().await,
        None => std::future::pending().await,
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

/// A call's registration in the worker's flights; removed however the call
/// ends.
struct FlightGuard<'a> {
    shared: &'a Shared,
    token: Uuid,
}

impl FlightGuard<'_> {
    /// Ends the flight; whether a heartbeat had reported it.
    fn land(self) -> bool {
        self.shared
            .flights
            .lock()
            .ok()
            .and_then(|mut f| f.remove(&self.token))
            .is_some_and(|f| f.reported)
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut f) = self.shared.flights.lock() {
            f.remove(&self.token);
        }
    }
}

/// The one place where a delivery's fate is decided. The reply, if any, is
/// confirmed by the broker before this returns `Ack`.
async fn decide(shared: &Shared, delivery: &Delivery) -> Disposition {
    let stats = &shared.stats;
    let limits = &shared.opts.limits;
    let mut call = match decode_call(&delivery.body, limits) {
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
    let copy = delivery.attempt();
    let Some((service, spec)) = shared.services.get(&call.service) else {
        WorkerStats::bump(&stats.error);
        let msg = format!(
            "this worker serves no service `{}` (the call came from queue `{}`)",
            call.service, delivery.queue
        );
        let reply = Reply::error(call.call_id, copy, codes::UNKNOWN_SERVICE, msg.clone());
        return match publish_reply(shared, call.reply_to.as_deref(), &reply).await {
            Disposition::Ack => Disposition::DeadLetter { reason: msg },
            other => other,
        };
    };

    let lease = Lease {
        call_id: call.call_id,
        copy,
        token: Uuid::now_v7(),
    };
    let flight = shared.link.as_ref().map(|_| {
        if let Ok(mut f) = shared.flights.lock() {
            f.insert(
                lease.token,
                Flight {
                    lease,
                    service: call.service.clone(),
                    reply_to: call.reply_to.clone(),
                    body: Some(delivery.body.clone()),
                    reported: false,
                },
            );
        }
        FlightGuard {
            shared,
            token: lease.token,
        }
    });

    // A redelivery, or a copy above the first, may race another copy or
    // follow an attempt that left traces: the coordinator decides.
    let mut attempt = copy;
    let resumed = match &shared.link {
        Some(link) if delivery.redelivered || copy > 1 => {
            WorkerStats::bump(&stats.resumed);
            let asked = link
                .ask(|req_id| RequestBody::Resume {
                    req_id,
                    lease,
                    service: call.service.clone(),
                    call_reply_to: call.reply_to.clone(),
                })
                .await;
            match asked {
                Ok(AnswerBody::Resume {
                    decision: ResumeDecision::Run { attempt: a },
                    ..
                }) => attempt = a,
                Ok(AnswerBody::Resume { decision, .. }) => {
                    WorkerStats::bump(&stats.dropped);
                    debug!(worker = %shared.opts.worker_id, call_id = %call.call_id, ?decision, "not running this copy");
                    return match decision {
                        // The attempt that completed may have died before
                        // its reply went out, and the coordinator's `fatal`
                        // answer may have been lost with a crash: both are
                        // published again; the client drops duplicates.
                        ResumeDecision::Done { reply: Some(r) }
                        | ResumeDecision::Fatal { reply: r } => {
                            publish_reply(shared, call.reply_to.as_deref(), &r).await
                        }
                        _ => Disposition::Ack,
                    };
                }
                Ok(other) => {
                    warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "unexpected answer to resume: {other:?}");
                    return Disposition::Requeue;
                }
                Err(e) => {
                    warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "resume not answered, returning the call to its queue: {e}");
                    return Disposition::Requeue;
                }
            }
            true
        }
        _ => false,
    };
    let standing = Arc::new(Attempt::new(
        shared.link.clone(),
        lease,
        attempt,
        call.service.clone(),
        call.reply_to.clone(),
    ));

    // Deliveries that did not complete: the broker counts those of this
    // copy; the attempt number counts the lost attempts of every copy, in
    // every process (the coordinator's ledger revoked each of them).
    let lost = delivery.delivery_count.max(attempt.saturating_sub(1));
    let (reply, then) = if let Some(limit) = spec.delivery_limit
        && lost >= limit
    {
        WorkerStats::bump(&stats.error);
        let msg = format!(
            "the call was delivered {} times without completing (it may crash workers); it was moved to `{}`",
            lost + 1,
            spec.dead_letter.as_deref().unwrap_or("nowhere")
        );
        warn!(worker = %shared.opts.worker_id, call_id = %call.call_id, "{msg}");
        let reply = Reply::error(call.call_id, attempt, codes::DELIVERY_LIMIT, msg);
        let dead = Disposition::DeadLetter {
            reason: codes::DELIVERY_LIMIT.into(),
        };
        (reply, dead)
    } else if call.is_expired_at(OffsetDateTime::now_utc()) {
        WorkerStats::bump(&stats.expired);
        (Reply::expired(call.call_id, attempt), Disposition::Ack)
    } else {
        let session = match (&call.session_id, &shared.link) {
            (Some(id), Some(link)) => Some(Arc::new(CallSession::new(
                id.clone(),
                shared.sessions.clone(),
                link.clone(),
            ))),
            _ => None,
        };
        let mut runs = 0;
        loop {
            runs += 1;
            let ctx = Ctx {
                call_id: call.call_id,
                attempt,
                service: service.name_arc(),
                method: call.method.clone(),
                session_id: call.session_id.clone(),
                idempotency_key: call.idempotency_key.clone(),
                deadline: call.deadline,
                traceparent: call.traceparent.clone(),
                standing: Some(standing.clone()),
                crash: shared.crash.clone(),
                session: session.clone(),
            };
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
            match standing.aborted() {
                Some(Abort::Revoked(reason)) => {
                    WorkerStats::bump(&stats.revoked);
                    info!(worker = %shared.opts.worker_id, call_id = %call.call_id, attempt, "attempt revoked, its result is dropped: {reason}");
                    // The delivery goes back rather than away: the revocation
                    // may have produced no other copy (a re-issue needs the
                    // body), and `resume` on the redelivery runs it, or drops
                    // it where another copy holds or decided the call.
                    return Disposition::Requeue;
                }
                Some(Abort::Unreachable) => return Disposition::Requeue,
                None => {}
            }
            if let Some(crash) = &shared.crash {
                crash
                    .at(CrashSite {
                        point: CrashPoint::BeforeReply,
                        call_id: call.call_id,
                        attempt,
                        trace: None,
                        granted: &standing.traces(),
                    })
                    .await;
            }
            let (Some(session), Some(link)) = (&session, &shared.link) else {
                break (reply, Disposition::Ack);
            };
            let Some(write) = session.write() else {
                break (reply, Disposition::Ack);
            };
            // The session write commits with the completion, before the
            // reply goes out.
            let reply_to = call.reply_to.as_deref();
            match complete_first(
                shared,
                link,
                lease,
                attempt,
                &reply,
                reply_to,
                Some(write.clone()),
            )
            .await
            {
                Ledgered::Accepted => {
                    session.committed(&write);
                    WorkerStats::add(&stats.traces, standing.traces().len());
                    return then_if_sent(
                        publish_reply(shared, reply_to, &reply).await,
                        Disposition::Ack,
                    );
                }
                Ledgered::Settle(disposition) => return disposition,
                Ledgered::SessionRefused { code, reason } => {
                    session.reset();
                    if code == codes::SESSION_CONFLICT
                        && runs < SESSION_RUNS
                        && callq_schemas::protocol::retryable(&standing.traces())
                    {
                        debug!(worker = %shared.opts.worker_id, call_id = %call.call_id, "{reason}: running the call again");
                        continue;
                    }
                    break (
                        Reply::error(call.call_id, attempt, &code, reason),
                        Disposition::Ack,
                    );
                }
            }
        }
    };
    let reply_to = call.reply_to.as_deref();
    let traces = standing.traces();
    WorkerStats::add(&stats.traces, traces.len());
    let Some(link) = &shared.link else {
        return then_if_sent(publish_reply(shared, reply_to, &reply).await, then);
    };
    if !traces.is_empty() {
        // An attempt with traces completes synchronously before its reply
        // goes out: the ledger, not a race, says which outcome the client
        // gets.
        return match complete_first(shared, link, lease, attempt, &reply, reply_to, None).await {
            Ledgered::Accepted => then_if_sent(publish_reply(shared, reply_to, &reply).await, then),
            Ledgered::Settle(disposition) => disposition,
            Ledgered::SessionRefused { .. } => Disposition::Requeue,
        };
    }
    let sent = publish_reply(shared, reply_to, &reply).await;
    // The coordinator hears of a traceless completion only when it knows the
    // call: from a heartbeat, or from `resume`.
    let reported = flight.is_some_and(FlightGuard::land);
    if (reported || resumed)
        && let Some(completions) = &shared.completions
    {
        let completion = Completion {
            lease,
            attempt,
            reply: resumed.then(|| reply.clone()),
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
    then_if_sent(sent, then)
}

/// What the ledger made of a synchronous completion.
enum Ledgered {
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
async fn complete_first(
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
            return Ledgered::Settle(Disposition::Requeue);
        }
        Err(e) => {
            warn!(worker = %shared.opts.worker_id, %call_id, "completion not answered, returning the call to its queue: {e}");
            return Ledgered::Settle(Disposition::Requeue);
        }
    };
    match decision {
        CompleteDecision::Accepted => Ledgered::Accepted,
        CompleteDecision::SessionRefused { code, reason } => {
            Ledgered::SessionRefused { code, reason }
        }
        CompleteDecision::Fatal { reply } => {
            WorkerStats::bump(&stats.revoked);
            warn!(worker = %shared.opts.worker_id, %call_id, "the call was decided fatal while it ran; its result is dropped");
            Ledgered::Settle(publish_reply(shared, reply_to, &reply).await)
        }
        decision @ CompleteDecision::Refused { .. } => {
            WorkerStats::bump(&stats.revoked);
            warn!(worker = %shared.opts.worker_id, %call_id, ?decision, "completion refused, the result is dropped; the delivery goes back for `resume` to settle");
            Ledgered::Settle(Disposition::Requeue)
        }
    }
}

/// `then` once the reply went out (or could not be heard); the reply's own
/// disposition otherwise.
fn then_if_sent(sent: Disposition, then: Disposition) -> Disposition {
    match sent {
        Disposition::Ack => then,
        other => other,
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
    // A handler may panic before its future exists (in the closure's own
    // body) or while it runs: both are caught.
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| service.invoke(method, ctx, args)));
    let outcome = match started {
        Err(panic) => Err(panic),
        Ok(None) => Ok(None),
        Ok(Some(run)) => AssertUnwindSafe(run).catch_unwind().await.map(Some),
    };
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
            Reply::error(call_id, attempt, &e.code, e.message)
        }
    }
}

/// Publishes a reply where the call asked for one; `Ack` when it has no
/// reply queue.
async fn publish_reply(shared: &Shared, reply_to: Option<&str>, reply: &Reply) -> Disposition {
    match reply_to {
        None => Disposition::Ack,
        Some(to) => send_reply(shared, to, reply).await,
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

/// Publishes a reply with confirm, retrying transient refusals within the
/// worker's reply retry budget. `Ack` once confirmed, or when nobody can
/// receive it (its queue is gone); `Requeue` when the broker kept refusing.
async fn send_reply(shared: &Shared, to: &str, reply: &Reply) -> Disposition {
    let message = Message::new(reply.to_bytes()).key(reply.call_id.to_string());
    let budget = shared.opts.reply_retry;
    match callq_broker::publish_within(shared.broker.as_ref(), to, &message, budget).await {
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
