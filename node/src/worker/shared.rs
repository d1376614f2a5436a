//! What the calls of one worker share: its options, the calls in flight
//! (which the heartbeats report), and the task that sends heartbeats and
//! batched completions to the coordinator.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use callq_broker::{Assignment, Broker, QueueSpec};
use callq_schemas::protocol::{Completion, InFlightCall, Lease, RequestBody, WorkerState};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::{WorkerOptions, WorkerStats};
use crate::Service;
use crate::link::Link;
use crate::probe::Probed;
use crate::session::SessionCache;

/// A call in flight, as heartbeats report it.
pub(super) struct Flight {
    pub(super) lease: Lease,
    pub(super) service: String,
    pub(super) reply_to: Option<String>,
    /// The body, until a heartbeat carried it to the coordinator.
    pub(super) body: Option<Bytes>,
    /// Whether a heartbeat reported it: then its end is reported too.
    pub(super) reported: bool,
    /// Cancelled when the coordinator says the call is cancelled.
    pub(super) cancel: CancellationToken,
    /// The concurrency key it was admitted under: its place is given back
    /// when it lands.
    pub(super) key: Option<String>,
}

/// Cancelled calls a worker remembers at most; the oldest are forgotten
/// first (the coordinator's record still refuses their traces and answers
/// their redeliveries).
const CANCELLED_KEPT: usize = 100_000;

/// The calls the coordinator said are cancelled, most recent last.
#[derive(Default)]
pub(super) struct CancelledCalls {
    ids: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl CancelledCalls {
    fn insert(&mut self, id: Uuid) {
        if !self.ids.insert(id) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > CANCELLED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

/// Calls whose places of their keys wait to be given back, at most (past
/// it, the coordinator takes them back when heartbeats stop listing them).
const VACATED_MAX: usize = 4_096;

/// A completion on its way to the coordinator, and who waits for it.
pub(super) type Outgoing = (Completion, oneshot::Sender<()>);

/// Bodies one heartbeat carries at most, in bytes; the rest wait for the
/// next beat.
const HEARTBEAT_BODY_BUDGET: usize = 8 * 1024 * 1024;

pub(super) struct Shared {
    pub(super) opts: WorkerOptions,
    pub(super) broker: Arc<dyn Broker>,
    pub(super) services: HashMap<String, (Service, QueueSpec)>,
    pub(super) stats: Arc<WorkerStats>,
    pub(super) link: Option<Arc<Link>>,
    pub(super) flights: Mutex<HashMap<Uuid, Flight>>,
    /// Where the broker partitions: each service consumer's partitions.
    pub(super) assignments: Mutex<BTreeMap<String, Assignment>>,
    pub(super) state: Mutex<WorkerState>,
    pub(super) completions: Option<mpsc::Sender<Outgoing>>,
    /// The completions' receiving end, until the outbox task takes it.
    outgoing: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    pub(super) probe: Option<Probed>,
    pub(super) sessions: Arc<SessionCache>,
    /// Calls cancelled: a copy of one is answered `cancelled`, not run.
    cancelled: Mutex<CancelledCalls>,
    /// Keyed calls that ended here, whose places are given back.
    vacated: Mutex<Vec<Uuid>>,
    pub(super) vacated_ready: tokio::sync::Notify,
    /// Keyed calls that ask for a place, to the admission task.
    pub(super) admissions: Option<mpsc::Sender<super::admission::Asking>>,
    admissions_rx: Mutex<Option<mpsc::Receiver<super::admission::Asking>>>,
}

/// Aborts background tasks when the worker's future is dropped.
pub(super) struct Background(Vec<JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Shared {
    pub(super) fn new(
        opts: WorkerOptions,
        broker: Arc<dyn Broker>,
        services: HashMap<String, (Service, QueueSpec)>,
        stats: Arc<WorkerStats>,
        link: Option<Arc<Link>>,
        probe: Option<Probed>,
    ) -> Self {
        let completions = link
            .as_ref()
            .map(|_| mpsc::channel(usize::from(opts.capacity) * 2));
        let state = if opts.standby {
            WorkerState::Standby
        } else {
            WorkerState::Active
        };
        let (tx, rx) = completions.map_or((None, None), |(tx, rx)| (Some(tx), Some(rx)));
        let (admissions, admissions_rx) = match &link {
            Some(_) => {
                let (tx, rx) = mpsc::channel(usize::from(opts.capacity) * 2);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        stats.set_state(state);
        Self {
            opts,
            broker,
            services,
            stats,
            link,
            flights: Mutex::default(),
            assignments: Mutex::default(),
            state: Mutex::new(state),
            completions: tx,
            outgoing: Mutex::new(rx),
            probe,
            sessions: Arc::default(),
            cancelled: Mutex::default(),
            vacated: Mutex::default(),
            vacated_ready: tokio::sync::Notify::new(),
            admissions,
            admissions_rx: Mutex::new(admissions_rx),
        }
    }

    /// The calls whose places wait to be given back.
    pub(super) fn take_vacated(&self) -> Vec<Uuid> {
        self.vacated
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// The call in flight under `token` was admitted under `key`.
    pub(super) fn admitted(&self, token: Uuid, key: &str) {
        if let Ok(mut flights) = self.flights.lock()
            && let Some(f) = flights.get_mut(&token)
        {
            f.key = Some(key.to_owned());
        }
    }

    /// A flight ended: a keyed one gives its place back.
    fn landed(&self, flight: Option<Flight>) -> bool {
        let Some(f) = flight else {
            return false;
        };
        if f.key.is_some()
            && let Ok(mut v) = self.vacated.lock()
            && v.len() < VACATED_MAX
        {
            v.push(f.lease.call_id);
            self.vacated_ready.notify_one();
        }
        f.reported
    }

    /// The coordinator says these calls are cancelled: remembered, and the
    /// attempts of them in flight here see their context cancelled.
    pub(super) fn cancel(&self, call_ids: &[Uuid]) {
        if let Ok(mut c) = self.cancelled.lock() {
            for id in call_ids {
                c.insert(*id);
            }
        }
        if let Ok(flights) = self.flights.lock() {
            for f in flights.values() {
                if call_ids.contains(&f.lease.call_id) {
                    info!(worker = %self.opts.worker_id, call_id = %f.lease.call_id, "the call was cancelled while it runs");
                    f.cancel.cancel();
                }
            }
        }
    }

    /// Whether the coordinator said the call is cancelled.
    pub(super) fn is_cancelled(&self, call_id: Uuid) -> bool {
        self.cancelled
            .lock()
            .is_ok_and(|c| c.ids.contains(&call_id))
    }

    /// The cancellation of a registered flight, or a fresh one.
    pub(super) fn cancel_token(&self, token: Uuid) -> CancellationToken {
        self.flights
            .lock()
            .ok()
            .and_then(|f| f.get(&token).map(|f| f.cancel.clone()))
            .unwrap_or_default()
    }

    /// Starts the tasks that send heartbeats and batched completions, and
    /// the requests of keyed calls (a coordinated worker's); they stop when
    /// the returned guard drops.
    pub(super) fn start_outbox(self: &Arc<Self>) -> Option<Background> {
        let link = self.link.clone()?;
        let rx = self.outgoing.lock().ok()?.take()?;
        let asking = self.admissions_rx.lock().ok()?.take()?;
        Some(Background(vec![
            tokio::spawn(outbox(self.clone(), link.clone(), rx)),
            tokio::spawn(super::admission::run(self.clone(), link, asking)),
        ]))
    }

    pub(super) fn service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.services.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    pub(super) fn set_state(&self, state: WorkerState) {
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
        self.stats.set_state(state);
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
                    key: f.key.clone(),
                });
            }
        }
        let busy = u32::try_from(in_flight.len()).unwrap_or(u32::MAX);
        let services = self.service_names();
        crate::metrics::load(
            services.iter().map(|name| {
                let n = in_flight.iter().filter(|c| &c.service == name).count();
                (name.as_str(), n)
            }),
            capacity.saturating_sub(busy),
        );
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
            services,
            state,
            capacity,
            free: capacity.saturating_sub(busy),
            in_flight,
            partitions,
            finished: self.stats.finished_by_service(),
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

/// A call's registration in the worker's flights; removed however the call
/// ends.
pub(super) struct FlightGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) token: Uuid,
}

impl FlightGuard<'_> {
    /// Ends the flight; whether a heartbeat had reported it.
    pub(super) fn land(self) -> bool {
        self.remove()
    }

    fn remove(&self) -> bool {
        let flight = self
            .shared
            .flights
            .lock()
            .ok()
            .and_then(|mut f| f.remove(&self.token));
        self.shared.landed(flight)
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}
