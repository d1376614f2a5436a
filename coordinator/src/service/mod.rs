//! The coordinator service, made of parts with one job each:
//!
//! - `intake`: the workers' requests and heartbeats read in batches, one
//!   group commit per batch, answered and acked only once it is durable;
//! - `requests`: one function per kind of request;
//! - `registry`: the workers and node agents, as their heartbeats report
//!   them;
//! - `detector`: failure detection, who is dead, and revoking their calls;
//! - `standbys`: promoting a standby for a dead worker, and keeping the
//!   number of standbys each reserved service should have;
//! - `notices`: which workers read a session, and the `session_changed`
//!   notices they get;
//! - `sweep`: idle sessions expired and ended ones forgotten, decided calls
//!   past the retention deleted;
//! - `effects`: publishing answers, orders, re-issues and `fatal` answers.
//!
//! [`Coordinator::run`] serves requests as they arrive and, every
//! heartbeat interval, takes the steps of a tick: renew the leadership,
//! drain the requests, detect deaths, sweep sessions, delete decided calls
//! past the retention, restore standbys.

mod cancels;
mod delayed;
mod detector;
mod effects;
mod intake;
mod keys;
mod notices;
mod options;
mod registry;
mod requests;
mod standbys;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

use callq_broker::{Backoff, Broker, QueueSpec};
use callq_schemas::protocol::Answer;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Error, Ledger, Store};
use detector::Detector;
use intake::Inbox;
use notices::Notices;
pub use options::CoordinatorOptions;
use registry::Registry;
use standbys::Standbys;
use sweep::Sweeper;

/// Publishes (and acks) the coordinator keeps in flight at once: their
/// confirms are pipelined instead of awaited one by one.
const IN_FLIGHT: usize = 64;

/// A connection that served this long starts the reconnect backoff over.
const RECONNECT_RESET: Duration = Duration::from_secs(30);

/// Answers and orders to send, each with the queue it goes to.
type Outbox = Vec<(String, Answer)>;

/// The coordinator's clock: tokio time, read as wall-clock milliseconds
/// for sessions.
#[derive(Debug)]
struct Clock {
    started: Instant,
    /// The wall clock when `started` was taken, in milliseconds since the
    /// Unix epoch: session times are this plus the (tokio) time since.
    epoch_ms: i64,
}

impl Clock {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            epoch_ms: wall_ms(),
        }
    }

    /// When the coordinator started serving.
    fn started(&self) -> Instant {
        self.started
    }

    /// Now, for sessions, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64 {
        self.epoch_ms
            .saturating_add(i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX))
    }
}

/// How long a coordinator that starts admits no keyed call: every live
/// worker has reported its running keyed calls by then.
fn warm_up(opts: &CoordinatorOptions) -> Duration {
    opts.silence() + opts.heartbeat_interval
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The coordinator: the call ledger, and the parts of the service around
/// it.
pub struct Coordinator<S: Store> {
    opts: CoordinatorOptions,
    broker: Arc<dyn Broker>,
    ledger: Ledger<S>,
    clock: Clock,
    registry: Registry,
    detector: Detector,
    standbys: Standbys,
    notices: Notices,
    sweeper: Sweeper,
    /// Requests dropped because their sender had given up on them.
    stale_dropped: u64,
    /// Requests the store failed since the last time that was logged, and
    /// when it may be logged again: an unreachable store fails every
    /// request, and one line a second says so.
    store_failures: u64,
    store_quiet_until: Option<std::time::Instant>,
    /// Control messages dropped unauthenticated, counted by the broker the
    /// coordinator was given (reported in its status).
    unauthenticated: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Set while it serves on a live broker connection.
    serving: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Times the coordinator connected again after losing the broker.
    reconnects: u64,
    /// When the call queues' depths were last read (for the metrics).
    queues_sampled: Option<std::time::Instant>,
    /// The spans of the batch's requests, ended once it is committed and
    /// answered (at most a batch of them).
    spans: Vec<callq_broker::telemetry::TraceContext>,
    /// The most recent cancellations, told to workers that join.
    cancels: cancels::Cancels,
    /// The places of concurrency keys, and the calls waiting for them.
    keys: keys::KeySlots,
}

impl<S: Store> Coordinator<S> {
    /// A coordinator over a ledger (opened from its store).
    pub fn new(opts: CoordinatorOptions, broker: Arc<dyn Broker>, mut ledger: Ledger<S>) -> Self {
        ledger.set_session_idle(opts.session_idle);
        ledger.set_session_forget(opts.session_forget);
        ledger.set_retention(opts.retention);
        ledger.set_idempotency_window(opts.idempotency_window);
        let keys = keys::KeySlots::new(Instant::now(), warm_up(&opts));
        Self {
            opts,
            broker,
            ledger,
            clock: Clock::start(),
            registry: Registry::default(),
            detector: Detector::default(),
            standbys: Standbys::default(),
            notices: Notices::default(),
            sweeper: Sweeper::new(),
            stale_dropped: 0,
            store_failures: 0,
            store_quiet_until: None,
            unauthenticated: None,
            serving: None,
            reconnects: 0,
            queues_sampled: None,
            spans: Vec::new(),
            cancels: cancels::Cancels::default(),
            keys,
        }
    }

    /// Sets `serving` while it serves on a live broker connection, and
    /// clears it while it connects again (for a readiness probe).
    #[must_use]
    pub fn signalling_serving(mut self, serving: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.serving = Some(serving);
        self
    }

    fn set_serving(&self, on: bool) {
        if let Some(flag) = &self.serving {
            flag.store(on, std::sync::atomic::Ordering::Release);
        }
    }

    /// Reports `dropped` in the status as the control messages dropped
    /// because the cluster key did not sign them.
    #[must_use]
    pub fn counting_unauthenticated(mut self, dropped: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.unauthenticated = Some(dropped);
        self
    }

    /// Serves until `shutdown` is cancelled. A lost broker connection
    /// does not end it: it connects again with backoff (bounded, jittered),
    /// gives every registered worker a fresh `dead_after` to be heard from
    /// (it heard nothing while it was away), and serves on; the first step
    /// of every tick re-checks its leadership before it decides anything.
    /// It returns an error only for what reconnecting cannot mend: a lost
    /// lease ([`Error::Fenced`]), a failed or damaged store, a broker that
    /// refuses it for good.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        self.clock = Clock::start();
        loop {
            let started = Instant::now();
            let served = self.serve(&shutdown).await;
            self.set_serving(false);
            let lost = match served {
                Ok(()) => {
                    self.ledger.release();
                    return Ok(());
                }
                Err(Error::Disconnected) => "the broker connection was lost".to_owned(),
                Err(Error::Broker(e)) if e.is_transient() || e == callq_broker::Error::Closed => {
                    format!("the broker failed: {e}")
                }
                Err(e) => return Err(e),
            };
            if started.elapsed() > RECONNECT_RESET {
                backoff.reset();
            }
            let pause = backoff.next_delay();
            self.reconnects += 1;
            warn!("{lost}; connecting again in {pause:?}");
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
            self.registry.heard_all_now();
        }
    }

    /// Serves on one connection until shutdown or until it is lost.
    async fn serve(&mut self, shutdown: &CancellationToken) -> Result<(), Error> {
        self.broker.declare(&QueueSpec::coordinator()).await?;
        self.broker.declare(&QueueSpec::heartbeats()).await?;
        let mut inbox = Inbox::open(self.broker.as_ref(), self.opts.batch_max.max(1)).await?;
        self.set_serving(true);
        let mut tick = tokio::time::interval(self.opts.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(reconnects = self.reconnects, "coordinator serving");
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => self.tick(&mut inbox).await?,
                next = inbox.requests.next() => {
                    let first = intake::first(next, "request")?;
                    self.serve_arrival(first, &mut inbox.requests, &mut inbox.beats).await;
                }
                next = inbox.beats.next() => {
                    let first = intake::first(next, "heartbeat")?;
                    self.serve_arrival(first, &mut inbox.beats, &mut inbox.requests).await;
                }
            }
        }
    }

    /// The steps of one tick.
    async fn tick(&mut self, inbox: &mut Inbox) -> Result<(), Error> {
        self.renew()?;
        // What workers sent before the tick counts: a heartbeat or a
        // completion already queued is read before judging.
        let full = self.drain_requests(inbox).await;
        // Silence is judged only when the queues hold no backlog of more
        // than a batch: a coordinator behind on its requests would take its
        // own backlog for dead workers.
        if !full
            && self
                .detector
                .caught_up(self.broker.as_ref(), &self.opts)
                .await
        {
            self.detect_deaths().await;
        }
        self.sweep_sessions().await;
        self.forget_decided();
        self.release_delayed().await;
        self.keys.expire(Instant::now());
        self.fill_keys().await;
        self.restore_standbys().await;
        self.sample().await;
        Ok(())
    }

    /// Reads the depth of every served call queue into the metric
    /// `callq_queue_depth`, the workers by state, the open records and the
    /// store's size, at most once a second.
    async fn sample(&mut self) {
        if self
            .queues_sampled
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1))
        {
            return;
        }
        self.queues_sampled = Some(std::time::Instant::now());
        let states: Vec<&str> = self
            .registry
            .workers()
            .map(|(_, w)| w.state.as_str())
            .collect();
        let size = self.ledger.store().size_bytes();
        let delayed = self.ledger.store().delayed_count().ok();
        crate::metrics::cluster(&states, self.ledger.open_calls(), delayed, size);
        crate::metrics::keyed(self.keys.running(), self.keys.waiting());
        'services: for service in self.registry.services() {
            // Both bands: the calls waiting for the service, whatever
            // their priority.
            let mut ready = None;
            for queue in [
                callq_broker::call_queue(&service),
                callq_broker::high_queue(&service),
            ] {
                match tokio::time::timeout(self.opts.silence(), self.broker.depth(&queue)).await {
                    Ok(Ok(depth)) => *ready.get_or_insert(0) += depth.ready,
                    // A queue not declared yet, say: the others still count.
                    Ok(Err(_)) => {}
                    // A broker that does not answer would hold the tick up
                    // once per service: the rest wait for the next second.
                    Err(_) => break 'services,
                }
            }
            if let Some(ready) = ready {
                crate::metrics::queue_depth(&service, ready);
            }
        }
    }

    /// Keeps the leadership: a leader whose lease went to another
    /// coordinator (it was paused, or cut off) is fenced, and stops before
    /// it reads more.
    fn renew(&mut self) -> Result<(), Error> {
        self.ledger.renew()
    }
}
