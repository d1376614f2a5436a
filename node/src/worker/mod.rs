//! The worker runtime: pull, run, reply with confirm, then settle.
//!
//! One delivery takes four steps, each in a file of its own:
//!
//! 1. [`intake`]: the consumers hand a delivery over; its body is read
//!    (a bad one is answered `bad_request` and dead-lettered) and the call
//!    is registered as in flight, for the heartbeats.
//! 2. [`gate`]: whether it may run: `resume` with the coordinator for a
//!    redelivery or a copy above the first, the delivery limit, the
//!    deadline.
//! 3. [`attempt`]: the handler runs with its context, again on fresher
//!    session data when its session write meets a newer version.
//! 4. [`finish`]: the completion goes to the coordinator (synchronously
//!    for an attempt with traces or a session write), the reply is
//!    published with confirm, and only then is the delivery settled.
//!
//! [`shared`] holds what the calls of one worker share: options, flights,
//! heartbeats and batched completions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use callq_broker::{Broker, Error as BrokerError, QueueSpec, worker_queue};
use callq_schemas::Limits;
use callq_schemas::protocol::{RequestBody, WorkerState};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::link::{Link, Order};
use crate::probe::{Probe, Probed};
use crate::{Error, Service};

mod admission;
mod attempt;
mod finish;
mod gate;
mod intake;
mod retry;
mod shared;

use intake::Incoming;
use shared::{Background, Shared};

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
    /// Answer a call only into a reply queue its publisher owns: the
    /// broker must vouch for the publisher ([`callq_broker::Delivery::publisher`],
    /// RabbitMQ's `user_id`), and its `reply_to` must be
    /// `callq.reply.<publisher>` or start with `callq.reply.<publisher>.`.
    /// Any other call is dead-lettered unanswered (`reply_not_owned`), so
    /// that no client can make a call answer into another's queue
    /// (docs/SECURITY.md).
    pub reply_owners: bool,
    /// With [`Self::reply_owners`], the broker users whose calls may name
    /// any reply queue: the cluster's own (a coordinator re-issues a dead
    /// worker's calls, a worker releases a call to the back of its queue).
    pub trusted_publishers: Vec<String>,
    /// Per service, calls of one `concurrency_key` that run at once, at
    /// most, across the cluster (the coordinator counts them). A service
    /// not named here runs keyed calls without a limit. Every worker of a
    /// service should say the same.
    #[serde(default)]
    pub max_running_per_key: std::collections::BTreeMap<String, u32>,
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
            reply_owners: false,
            trusted_publishers: Vec::new(),
            max_running_per_key: std::collections::BTreeMap::new(),
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
    /// Attempts that ended with a retryable error and were handed to the
    /// coordinator for their next attempt.
    pub retried: AtomicU64,
    /// Calls that came before their `not_before` and were handed to the
    /// coordinator, which holds them until they are due.
    pub deferred: AtomicU64,
    /// Keyed calls handed to the coordinator to wait for a place of their
    /// key.
    pub waited: AtomicU64,
    /// Calls answered `cancelled` without running (a call cancelled while
    /// it ran counts under its handler's outcome).
    pub cancelled: AtomicU64,
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
    /// The worker's state, as its heartbeats report it (`None` before it
    /// runs).
    state: std::sync::Mutex<Option<WorkerState>>,
    /// Per service, the calls its handlers ran to an answer (its services
    /// only: bounded).
    finished: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl WorkerStats {
    /// The worker's state: active, standby or draining (`None` before it
    /// runs), for a readiness probe.
    pub fn state(&self) -> Option<WorkerState> {
        self.state.lock().ok().and_then(|s| *s)
    }

    /// Per service, the calls its handlers ran to an answer so far.
    pub fn finished_by_service(&self) -> std::collections::BTreeMap<String, u64> {
        self.finished.lock().map(|f| f.clone()).unwrap_or_default()
    }

    fn finish(&self, service: &str) {
        if let Ok(mut f) = self.finished.lock() {
            match f.get_mut(service) {
                Some(n) => *n += 1,
                None => {
                    f.insert(service.to_owned(), 1);
                }
            }
        }
    }

    fn set_state(&self, state: WorkerState) {
        if let Ok(mut s) = self.state.lock() {
            *s = Some(state);
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt's result was dropped: the coordinator refused it.
    fn revoke(&self) {
        Self::bump(&self.revoked);
        crate::metrics::count(crate::metrics::REVOKED);
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
            &self.cancelled,
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
    probe: Option<Probed>,
}

/// What the serving loop does after an order.
enum Flow {
    Serve,
    Drain,
}

impl Worker {
    /// A worker with no services yet.
    pub fn new(opts: WorkerOptions, broker: Arc<dyn Broker>) -> Self {
        Self {
            opts,
            broker,
            services: HashMap::new(),
            stats: Arc::default(),
            probe: None,
        }
    }

    /// Gives the worker a probe that sees each call at each
    /// [`Point`](crate::probe::Point) (a test harness's fault plan, for
    /// one): the call waits for it there.
    #[must_use]
    pub fn probe(mut self, probe: Arc<dyn Probe>) -> Self {
        self.probe = Some(Probed(probe));
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

    /// Declares the call queues of the worker's services, both bands;
    /// [`Worker::run`] does it too.
    pub async fn declare(&self) -> Result<(), Error> {
        for name in self.services.keys() {
            for spec in QueueSpec::call_bands(name) {
                self.broker.declare(&spec).await?;
            }
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
    /// broker returns their deliveries to the queues.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        self.check()?;
        self.declare().await?;
        let (shared, mut orders) = self.start().await?;
        let outbox = shared.start_outbox();
        let mut incoming = if shared.opts.standby {
            info!(worker = %shared.opts.worker_id, services = ?shared.service_names(), "worker standing by");
            None
        } else {
            Some(intake::open_consumers(&shared).await?)
        };
        let mut calls = JoinSet::new();
        let ended = serve(&shared, &shutdown, &mut orders, &mut incoming, &mut calls).await;
        if ended.is_err() {
            // The connection is gone, and with it the leases of the calls
            // in flight: the broker has returned their deliveries. Nothing
            // they could still send would be heard.
            calls.shutdown().await;
        }
        drain(&shared, calls, incoming, outbox, ended.is_ok()).await;
        ended
    }

    fn check(&self) -> Result<(), Error> {
        if self.services.is_empty() {
            return Err(Error::Config("a worker needs at least one service".into()));
        }
        if self.opts.capacity == 0 {
            return Err(Error::Config("capacity must be at least 1".into()));
        }
        let most = callq_schemas::protocol::MAX_SERVICES_PER_WORKER;
        if self.services.len() > most {
            return Err(Error::Config(format!(
                "a worker serves at most {most} services, not {}",
                self.services.len()
            )));
        }
        if self.opts.coordinated && self.opts.heartbeat_interval.is_zero() {
            return Err(Error::Config("heartbeat_interval must not be zero".into()));
        }
        if let Some((service, _)) = self.opts.max_running_per_key.iter().next()
            && !self.opts.coordinated
        {
            return Err(Error::Config(format!(
                "max_running_per_key.{service} needs a coordinator, which counts a key's running \
                 calls across workers: run the worker coordinated, or drop the limit"
            )));
        }
        if let Some((service, _)) = self.opts.max_running_per_key.iter().find(|(_, n)| **n == 0) {
            return Err(Error::Config(format!(
                "max_running_per_key.{service} is 0, which would run nothing: use 1 or more, or \
                 drop the limit"
            )));
        }
        Ok(())
    }

    /// Connects to the coordinator (when coordinated) and builds what the
    /// calls share.
    async fn start(self) -> Result<(Arc<Shared>, mpsc::Receiver<Order>), Error> {
        let (link, orders) = if self.opts.coordinated {
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
        let services = self
            .services
            .into_iter()
            .map(|(name, service)| {
                let spec = QueueSpec::calls(&name);
                (name, (service, spec))
            })
            .collect();
        let shared = Shared::new(
            self.opts,
            self.broker,
            services,
            self.stats,
            link,
            self.probe,
        );
        Ok((Arc::new(shared), orders))
    }
}

/// Pulls deliveries while there is room and follows the coordinator's
/// orders, until shutdown, a drain order or a lost connection.
async fn serve(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    orders: &mut mpsc::Receiver<Order>,
    incoming: &mut Option<Incoming>,
    calls: &mut JoinSet<()>,
) -> Result<(), Error> {
    let capacity = usize::from(shared.opts.capacity);
    let gone = shared.link.as_ref().map(|l| l.gone()).unwrap_or_default();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            () = gone.cancelled() => {
                error!(worker = %shared.opts.worker_id, "the coordinator link's consumer ended: the broker connection is lost");
                return Err(Error::Disconnected);
            }
            Some(order) = orders.recv() => match on_order(shared, order, incoming).await? {
                Flow::Serve => {}
                Flow::Drain => return Ok(()),
            },
            Some(joined) = calls.join_next(), if !calls.is_empty() => {
                if let Err(e) = joined {
                    error!(worker = %shared.opts.worker_id, "call task failed: {e}");
                }
            }
            item = intake::next_delivery(incoming), if incoming.is_some() && calls.len() < capacity => match item {
                Some(Ok(arriving)) => {
                    calls.spawn(intake::handle(shared.clone(), arriving));
                }
                Some(Err(BrokerError::Closed)) | None => {
                    error!(worker = %shared.opts.worker_id, "a consumer ended: the broker connection is lost");
                    return Err(Error::Disconnected);
                }
                Some(Err(e)) => {
                    warn!(worker = %shared.opts.worker_id, "consumer error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Follows one order of the coordinator.
async fn on_order(
    shared: &Arc<Shared>,
    order: Order,
    incoming: &mut Option<Incoming>,
) -> Result<Flow, Error> {
    match order {
        Order::Promote if incoming.is_none() => {
            info!(worker = %shared.opts.worker_id, "promoted: consuming now");
            *incoming = Some(intake::open_consumers(shared).await?);
            shared.set_state(WorkerState::Active);
        }
        Order::Promote | Order::StartStandby(_) => {}
        Order::Drain => {
            info!(worker = %shared.opts.worker_id, "the coordinator asks this worker to drain");
            return Ok(Flow::Drain);
        }
        Order::SessionChanged(id, version) => shared.sessions.changed(&id, version),
        Order::Cancel(call_ids) => shared.cancel(&call_ids),
    }
    Ok(Flow::Serve)
}

/// Drains: the consumers stay open (they hold the leases of the calls in
/// flight) until those calls are settled or abandoned, heartbeats go on;
/// then the worker tells the coordinator it leaves (`leave`; a worker that
/// lost its connection does not: the coordinator treats it as lost, and
/// the redeliveries of its calls are arbitrated).
async fn drain(
    shared: &Shared,
    mut calls: JoinSet<()>,
    incoming: Option<Incoming>,
    outbox: Option<Background>,
    leave: bool,
) {
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
    drop(outbox);
    if leave
        && let Some(link) = &shared.link
        && let Err(e) = link.send(RequestBody::Leave {}).await
    {
        warn!(worker = %shared.opts.worker_id, "telling the coordinator this worker leaves: {e}");
    }
    info!(worker = %shared.opts.worker_id, "worker stopped");
}
