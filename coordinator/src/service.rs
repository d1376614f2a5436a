//! The coordinator service: requests on the bus, group commit, failure
//! detection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{
    ATTEMPT_HEADER, Broker, COORDINATOR_QUEUE, Delivery, Disposition, HEARTBEAT_QUEUE, Message,
    QueueSpec, call_queue,
};
use callq_schemas::protocol::{
    Answer, AnswerBody, ClusterStatus, CompleteDecision, Request, RequestBody, WorkerState,
    WorkerStatus,
};
use callq_schemas::{Limits, Uuid};
use futures::{FutureExt, StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{Effect, Error, InFlight, Ledger, Store};

/// How long the coordinator waits for the broker to confirm one publish.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes (and acks) the coordinator keeps in flight at once: their
/// confirms are pipelined instead of awaited one by one.
const IN_FLIGHT: usize = 64;

/// How the coordinator runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorOptions {
    /// How often workers heartbeat; the failure detector ticks as often.
    #[serde(with = "callq_schemas::millis")]
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals of silence after which a worker is dead.
    pub dead_after: u32,
    /// Requests applied in one group commit, at most.
    pub batch_max: u16,
    /// Limits on request bodies (a heartbeat carries call bodies).
    pub limits: Limits,
    /// Standby workers to keep per reserved service; services not named
    /// here have none.
    pub standby_per_service: BTreeMap<String, u32>,
    /// How long a session may go unused before it expires.
    #[serde(with = "callq_schemas::millis")]
    pub session_idle: Duration,
    /// How long an ended (expired or closed) session is remembered, so that
    /// calls on it are told so, before it is forgotten.
    #[serde(with = "callq_schemas::millis")]
    pub session_forget: Duration,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(250),
            dead_after: 4,
            batch_max: 256,
            standby_per_service: BTreeMap::new(),
            session_idle: Duration::from_secs(30 * 60),
            session_forget: Duration::from_secs(7 * 24 * 3600),
            limits: Limits {
                max_bytes: 64 * 1024 * 1024,
                max_depth: 128,
            },
        }
    }
}

/// A worker as the registry knows it.
#[derive(Debug)]
struct WorkerEntry {
    state: WorkerState,
    services: Vec<String>,
    capacity: u32,
    free: u32,
    /// Where its answers and orders go.
    queue: String,
    last_seen: Instant,
    in_flight: HashMap<Uuid, InFlight>,
    /// Per service, the partitions of its call queue the worker owns, where
    /// the broker partitions.
    partitions: BTreeMap<String, Vec<u32>>,
}

/// A node agent as the registry knows it.
#[derive(Debug)]
struct AgentEntry {
    services: Vec<String>,
    workers: u32,
    queue: String,
    last_seen: Instant,
}

/// A standby the coordinator asked an agent for and has not seen yet.
#[derive(Debug)]
struct Asked {
    service: String,
    until: Instant,
}

/// Heartbeat intervals an agent is given to bring up a standby it was asked
/// for before the coordinator asks again.
const STANDBY_PATIENCE: u32 = 40;

/// The coordinator: registry, failure detector and call ledger.
pub struct Coordinator<S: Store> {
    opts: CoordinatorOptions,
    broker: Arc<dyn Broker>,
    ledger: Ledger<S>,
    workers: HashMap<String, WorkerEntry>,
    agents: HashMap<String, AgentEntry>,
    asked: Vec<Asked>,
    started: Instant,
    deaths: u64,
    promotions: u64,
    /// Since when the request queue has had a backlog, if it has.
    behind_since: Option<Instant>,
    /// The wall clock when `started` was taken, in milliseconds since the
    /// Unix epoch: session times are this plus the (tokio) time since.
    epoch_ms: i64,
    /// Workers that read each session since it last changed: they hear of
    /// its next change.
    session_readers: HashMap<String, HashSet<String>>,
    /// When idle sessions were last swept.
    swept: Instant,
}

/// Sessions one sweep expires at most; the next sweep takes the rest.
const SWEEP_MAX: usize = 1_000;

/// Sessions whose readers are tracked, at most; past that the tracking
/// starts afresh (workers validate their cache on every call anyway).
const SESSIONS_TRACKED: usize = 100_000;

impl<S: Store> Coordinator<S> {
    /// A coordinator over a ledger (opened from its store).
    pub fn new(opts: CoordinatorOptions, broker: Arc<dyn Broker>, mut ledger: Ledger<S>) -> Self {
        ledger.set_session_idle(opts.session_idle);
        ledger.set_session_forget(opts.session_forget);
        Self {
            opts,
            broker,
            ledger,
            workers: HashMap::new(),
            agents: HashMap::new(),
            asked: Vec::new(),
            started: Instant::now(),
            deaths: 0,
            promotions: 0,
            behind_since: None,
            epoch_ms: wall_ms(),
            session_readers: HashMap::new(),
            swept: Instant::now(),
        }
    }

    /// A worker that left or died caches no session any more.
    fn forget_reader(&mut self, worker: &str) {
        self.session_readers.retain(|_, readers| {
            readers.remove(worker);
            !readers.is_empty()
        });
    }

    /// Now, for sessions, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64 {
        self.epoch_ms
            .saturating_add(i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX))
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        self.broker.declare(&QueueSpec::coordinator()).await?;
        self.broker.declare(&QueueSpec::heartbeats()).await?;
        self.started = Instant::now();
        self.epoch_ms = wall_ms();
        let prefetch = self.opts.batch_max.max(1);
        let mut requests = self.broker.consume(COORDINATOR_QUEUE, prefetch).await?;
        let mut beats = self.broker.consume(HEARTBEAT_QUEUE, prefetch).await?;
        let mut tick = tokio::time::interval(self.opts.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!("coordinator serving");
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    // A leader whose lease went to another coordinator (it
                    // was paused, or cut off) stops before it reads more.
                    self.ledger.renew()?;
                    // What workers sent before the tick counts: a heartbeat or
                    // a completion already queued is read before judging.
                    let ready = self.ready(&mut requests);
                    let beaten = self.ready(&mut beats);
                    let batch = usize::from(self.opts.batch_max);
                    let full = ready.len() >= batch || beaten.len() >= batch;
                    let mut all = beaten;
                    all.extend(ready);
                    if !all.is_empty() {
                        self.process(all).await;
                    }
                    // Silence is judged only when the queues hold no backlog
                    // of more than a batch: a coordinator behind on its
                    // requests would take its own backlog for dead workers.
                    if !full && self.caught_up().await {
                        self.detect_deaths().await;
                    }
                    self.sweep_sessions().await;
                    self.keep_standbys().await;
                }
                next = requests.next() => {
                    let first = Self::first(next, "request")?;
                    // Group commit: whatever else is ready joins this batch.
                    let mut batch: Vec<Delivery> = first.into_iter().collect();
                    batch.extend(self.ready(&mut requests));
                    batch.extend(self.ready(&mut beats));
                    if !batch.is_empty() {
                        self.process(batch).await;
                    }
                }
                next = beats.next() => {
                    let first = Self::first(next, "heartbeat")?;
                    let mut batch: Vec<Delivery> = first.into_iter().collect();
                    batch.extend(self.ready(&mut beats));
                    batch.extend(self.ready(&mut requests));
                    if !batch.is_empty() {
                        self.process(batch).await;
                    }
                }
            }
        }
    }

    /// The first delivery of a batch; a consumer that ended ends the service.
    fn first(
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

    /// Whether the request and heartbeat queues hold less than one batch
    /// each: what waits in them is then about as recent as what was just
    /// read.
    async fn caught_up(&mut self) -> bool {
        let mut backlog = 0;
        for queue in [COORDINATOR_QUEUE, HEARTBEAT_QUEUE] {
            match self.broker.depth(queue).await {
                Ok(depth) => backlog = backlog.max(depth.ready),
                Err(e) => {
                    warn!("reading the depth of `{queue}`: {e}; deaths are not judged this tick");
                    return false;
                }
            }
        }
        if backlog < u64::from(self.opts.batch_max) {
            self.behind_since = None;
            return true;
        }
        let since = *self.behind_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.opts.heartbeat_interval * self.opts.dead_after {
            warn!(
                ready = backlog,
                "the coordinator is behind on its requests: deaths are not judged until it catches up"
            );
            self.behind_since = Some(Instant::now());
        }
        false
    }

    /// The requests ready now, up to a batch.
    fn ready(&self, requests: &mut Box<dyn callq_broker::Consumer>) -> Vec<Delivery> {
        let mut batch = Vec::new();
        while batch.len() < usize::from(self.opts.batch_max) {
            match requests.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        batch
    }

    /// Applies a batch of requests, commits once, then answers and acks.
    async fn process(&mut self, batch: Vec<Delivery>) {
        let mut answers = Vec::new();
        for d in &batch {
            match decode_request(&d.body, &self.opts.limits) {
                Ok(req) => {
                    if let Err(e) = self.apply(req, &mut answers) {
                        error!("coordinator store: {e}");
                    }
                }
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
        self.tell(answers).await;
        self.carry_out(effects).await;
        stream::iter(batch)
            .for_each_concurrent(IN_FLIGHT, |d| async move {
                if let Err(e) = d.settle(Disposition::Ack).await {
                    warn!("acking a coordinator request: {e}");
                }
            })
            .await;
    }

    /// Sends answers and orders, their confirms pipelined; a lost one is
    /// asked for again by its worker (decisions are durable) or repeated by
    /// the next tick.
    async fn tell(&self, messages: Vec<(String, Answer)>) {
        stream::iter(messages)
            .for_each_concurrent(IN_FLIGHT, |(to, answer)| async move {
                let publish = self.broker.publish(&to, Message::new(answer.to_bytes()));
                let sent = tokio::time::timeout(PUBLISH_TIMEOUT, publish)
                    .await
                    .unwrap_or(Err(callq_broker::Error::Timeout(PUBLISH_TIMEOUT)));
                if let Err(e) = sent {
                    warn!(to, "answer not delivered: {e}");
                }
            })
            .await;
    }

    /// Applies one request; queues the answer to send, if any.
    fn apply(&mut self, req: Request, out: &mut Vec<(String, Answer)>) -> Result<(), Error> {
        let worker = req.worker_id;
        let to = req.reply_to;
        let mut answer = |body| out.push((to.clone(), Answer { v: 1, body }));
        match req.body {
            RequestBody::Heartbeat {
                services,
                state,
                capacity,
                free,
                in_flight,
                partitions,
            } => {
                if !self.workers.contains_key(&worker) {
                    info!(worker, ?services, ?state, "worker joined");
                    if state == WorkerState::Standby {
                        self.standby_arrived(&services);
                    }
                }
                let entry = self.workers.entry(worker).or_insert_with(|| WorkerEntry {
                    state,
                    services: Vec::new(),
                    capacity,
                    free,
                    queue: to.clone(),
                    last_seen: Instant::now(),
                    in_flight: HashMap::new(),
                    partitions: BTreeMap::new(),
                });
                // A promotion or drain the coordinator ordered stands until
                // the worker's own heartbeats catch up with it.
                let ordered = matches!(
                    (entry.state, state),
                    (WorkerState::Active, WorkerState::Standby)
                        | (
                            WorkerState::Draining,
                            WorkerState::Active | WorkerState::Standby
                        )
                );
                if ordered {
                    // The order may have been lost: repeat it until the
                    // worker's heartbeats show it obeyed.
                    let order = match entry.state {
                        WorkerState::Draining => AnswerBody::Drain {},
                        _ => AnswerBody::Promote {},
                    };
                    out.push((to.clone(), Answer { v: 1, body: order }));
                } else {
                    entry.state = state;
                }
                entry.services = services;
                entry.capacity = capacity;
                entry.free = free;
                entry.partitions = partitions;
                entry.queue = to;
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
                answer(AnswerBody::Resume { req_id, decision });
            }
            RequestBody::Trace {
                req_id,
                lease,
                attempt,
                kind,
                service,
                call_reply_to,
                session,
            } => {
                let now = self.now_ms();
                let decision = self.ledger.trace(
                    lease,
                    attempt,
                    &worker,
                    &kind,
                    &service,
                    call_reply_to.as_deref(),
                    session.as_ref(),
                    now,
                )?;
                answer(AnswerBody::Trace { req_id, decision });
            }
            RequestBody::Complete {
                req_id,
                lease,
                attempt,
                reply,
                session,
            } => {
                self.landed(&worker, lease.call_id);
                let now = self.now_ms();
                let decision =
                    self.ledger
                        .complete(lease, attempt, reply, session.as_ref(), now)?;
                answer(AnswerBody::Complete { req_id, decision });
            }
            RequestBody::Session {
                req_id,
                session_id,
                have,
            } => {
                let now = self.now_ms();
                let state = self.ledger.session(&session_id, have, now)?;
                if self.session_readers.len() >= SESSIONS_TRACKED {
                    self.session_readers.clear();
                }
                self.session_readers
                    .entry(session_id)
                    .or_default()
                    .insert(worker.clone());
                answer(AnswerBody::Session { req_id, state });
            }
            RequestBody::Completed { calls } => {
                for c in calls {
                    self.landed(&worker, c.lease.call_id);
                    let now = self.now_ms();
                    let decision = self
                        .ledger
                        .complete(c.lease, c.attempt, c.reply, None, now)?;
                    if !matches!(decision, CompleteDecision::Accepted) {
                        info!(worker, call_id = %c.lease.call_id, ?decision, "a revoked attempt completed; ignored");
                    }
                }
            }
            RequestBody::Leave {} => {
                if self.workers.remove(&worker).is_some() {
                    info!(worker, "worker left");
                    // Its sessions are back with the store.
                    self.forget_reader(&worker);
                }
                if self.agents.remove(&worker).is_some() {
                    info!(agent = worker, "node agent left");
                }
            }
            RequestBody::AgentHeartbeat { services, workers } => {
                let now = Instant::now();
                self.agents
                    .entry(worker.clone())
                    .and_modify(|a| {
                        a.services.clone_from(&services);
                        a.workers = workers;
                        a.queue.clone_from(&to);
                        a.last_seen = now;
                    })
                    .or_insert_with(|| {
                        info!(agent = worker, ?services, "node agent joined");
                        AgentEntry {
                            services: services.clone(),
                            workers,
                            queue: to.clone(),
                            last_seen: now,
                        }
                    });
            }
            RequestBody::Drain {
                req_id,
                worker: target,
            } => {
                let found = match self.workers.get_mut(&target) {
                    Some(w) => {
                        info!(worker = target, "draining on request");
                        w.state = WorkerState::Draining;
                        out.push((
                            w.queue.clone(),
                            Answer {
                                v: 1,
                                body: AnswerBody::Drain {},
                            },
                        ));
                        true
                    }
                    None => false,
                };
                out.push((
                    to,
                    Answer {
                        v: 1,
                        body: AnswerBody::Draining { req_id, found },
                    },
                ));
            }
            RequestBody::Status { req_id } => {
                let status = self.status();
                answer(AnswerBody::Status { req_id, status });
            }
        }
        Ok(())
    }

    /// A worker's call ended: it is no longer in flight there.
    fn landed(&mut self, worker: &str, call_id: Uuid) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.in_flight.remove(&call_id);
        }
    }

    /// The cluster as `status` shows it.
    fn status(&self) -> ClusterStatus {
        let now = Instant::now();
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerStatus {
                worker_id: id.clone(),
                state: w.state,
                services: w.services.clone(),
                capacity: w.capacity,
                free: w.free,
                last_seen_ms: u64::try_from(now.duration_since(w.last_seen).as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        let mut agents: Vec<String> = self.agents.keys().cloned().collect();
        agents.sort_unstable();
        ClusterStatus {
            workers,
            agents,
            standby_per_service: self.opts.standby_per_service.clone(),
            open_calls: u64::try_from(self.ledger.open_calls()).unwrap_or(u64::MAX),
            deaths: self.deaths,
            promotions: self.promotions,
        }
    }

    /// A new standby joined: it answers one request made to an agent.
    fn standby_arrived(&mut self, services: &[String]) {
        for s in services {
            if let Some(i) = self.asked.iter().position(|a| &a.service == s) {
                self.asked.swap_remove(i);
            }
        }
    }

    /// Promotes standbys for the reserved services of a dead worker: one
    /// standby covers every service it serves.
    fn promote_for(&mut self, dead: &WorkerEntry, out: &mut Vec<(String, Answer)>) {
        if dead.state != WorkerState::Active {
            return;
        }
        let mut covered: Vec<&String> = Vec::new();
        for service in &dead.services {
            if !self.opts.standby_per_service.contains_key(service) || covered.contains(&service) {
                continue;
            }
            let standby = self
                .workers
                .iter_mut()
                .filter(|(_, w)| w.state == WorkerState::Standby && w.services.contains(service))
                .min_by(|(a, _), (b, _)| a.cmp(b));
            let Some((id, w)) = standby else {
                warn!(
                    service,
                    "no standby to promote: the service runs on its remaining workers"
                );
                continue;
            };
            info!(worker = id, service, "promoting a standby");
            w.state = WorkerState::Active;
            self.promotions += 1;
            covered.extend(dead.services.iter().filter(|s| w.services.contains(s)));
            out.push((
                w.queue.clone(),
                Answer {
                    v: 1,
                    body: AnswerBody::Promote {},
                },
            ));
        }
    }

    /// Asks node agents for standbys where a reserved service has fewer
    /// than it should.
    async fn keep_standbys(&mut self) {
        let now = Instant::now();
        let beat = self.opts.heartbeat_interval;
        let silence = beat * self.opts.dead_after;
        self.agents
            .retain(|_, a| now.duration_since(a.last_seen) <= silence);
        self.asked.retain(|a| a.until > now);
        // Workers an agent starts on its own need time to register first.
        if now.duration_since(self.started) <= silence {
            return;
        }
        let mut orders = Vec::new();
        for (service, &wanted) in &self.opts.standby_per_service {
            let have = self
                .workers
                .values()
                .filter(|w| w.state == WorkerState::Standby && w.services.contains(service))
                .count()
                + self.asked.iter().filter(|a| &a.service == service).count();
            for _ in have..usize::try_from(wanted).unwrap_or(0) {
                let agent = self
                    .agents
                    .iter_mut()
                    .filter(|(_, a)| a.services.contains(service))
                    .min_by_key(|(id, a)| (a.workers, (*id).clone()));
                let Some((id, a)) = agent else {
                    break;
                };
                info!(agent = id, service, "asking for a standby");
                a.workers += 1;
                orders.push((
                    a.queue.clone(),
                    Answer {
                        v: 1,
                        body: AnswerBody::StartStandby {
                            services: vec![service.clone()],
                        },
                    },
                ));
                self.asked.push(Asked {
                    service: service.clone(),
                    until: now + beat * STANDBY_PATIENCE,
                });
            }
        }
        self.tell(orders).await;
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
                self.deaths += 1;
                self.forget_reader(&id);
                let calls: Vec<InFlight> = w.in_flight.values().cloned().collect();
                if let Err(e) = self.ledger.worker_lost(&id, &calls) {
                    error!(worker = id, "revoking a dead worker's calls: {e}");
                }
                lost.push((id, w));
            }
        }
        match self.ledger.commit() {
            Ok(effects) => {
                let mut orders = Vec::new();
                for (_, w) in &lost {
                    self.promote_for(w, &mut orders);
                }
                self.tell(orders).await;
                self.carry_out(effects).await;
            }
            Err(e) => {
                // Try again at the next tick: the workers stay in the registry.
                error!("committing dead workers' calls failed: {e}");
                for (id, w) in lost {
                    self.workers.insert(id, w);
                }
            }
        }
    }

    /// Expires idle sessions and forgets ended ones, whatever the workers
    /// do (a session is also expired at its next use): every quarter of
    /// the expiry, at most a minute apart.
    async fn sweep_sessions(&mut self) {
        let sweep_every = (self.opts.session_idle / 4).min(Duration::from_secs(60));
        if self.swept.elapsed() < sweep_every {
            return;
        }
        self.swept = Instant::now();
        let now = self.now_ms();
        match self.ledger.sweep_sessions(now, SWEEP_MAX) {
            Ok(0) => {}
            Ok(n) => info!(sessions = n, "idle sessions expired"),
            Err(e) => warn!("sweeping idle sessions: {e}"),
        }
        match self.ledger.forget_sessions(now, SWEEP_MAX) {
            Ok(0) => {}
            Ok(n) => info!(sessions = n, "ended sessions forgotten"),
            Err(e) => warn!("forgetting ended sessions: {e}"),
        }
        match self.ledger.commit() {
            Ok(effects) => self.carry_out(effects).await,
            // Nothing expired is durable: the next sweep finds them again.
            Err(e) => error!("committing expired sessions failed: {e}"),
        }
    }

    /// Publishes re-issues and fatal answers of durable decisions, their
    /// confirms pipelined.
    async fn carry_out(&mut self, effects: Vec<Effect>) {
        // A changed session's readers hear of it (and are forgotten until
        // they read it again).
        let mut publishes = Vec::new();
        let mut effects = effects;
        effects.retain(|e| match e {
            Effect::SessionChanged {
                session_id,
                version,
            } => {
                for reader in self.session_readers.remove(session_id).unwrap_or_default() {
                    if let Some(w) = self.workers.get(&reader) {
                        let body = AnswerBody::SessionChanged {
                            session_id: session_id.clone(),
                            version: *version,
                        };
                        publishes.push((w.queue.clone(), Answer { v: 1, body }));
                    }
                }
                false
            }
            _ => true,
        });
        let this = &*self;
        stream::iter(publishes)
            .for_each_concurrent(IN_FLIGHT, |(to, answer)| async move {
                let publish = this.broker.publish(&to, Message::new(answer.to_bytes()));
                // A hint: a worker checks the version with every call anyway.
                if let Err(e) = tokio::time::timeout(PUBLISH_TIMEOUT, publish)
                    .await
                    .unwrap_or(Err(callq_broker::Error::Timeout(PUBLISH_TIMEOUT)))
                {
                    debug!(to, "a session change notice was not sent: {e}");
                }
            })
            .await;
        stream::iter(effects)
            .for_each_concurrent(IN_FLIGHT, |effect| self.carry_out_one(effect))
            .await;
    }

    /// Where the broker partitions: a partition of `service`'s queue that a
    /// live active worker owns, so that a re-issued copy does not wait for
    /// the broker to move the dead worker's partitions. Spread by call id
    /// over the workers with room (all of them when none has).
    fn live_partition(&self, service: &str, call_id: Uuid) -> Option<(&str, u32)> {
        let owners: Vec<(&String, &WorkerEntry, &Vec<u32>)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state == WorkerState::Active)
            .filter_map(|(id, w)| {
                w.partitions
                    .get(service)
                    .filter(|p| !p.is_empty())
                    .map(|p| (id, w, p))
            })
            .collect();
        let with_room: Vec<_> = owners.iter().filter(|(_, w, _)| w.free > 0).collect();
        let pool: Vec<_> = if with_room.is_empty() {
            owners.iter().collect()
        } else {
            with_room
        };
        if pool.is_empty() {
            return None;
        }
        // A stable order, so that the call id alone picks.
        let mut pool = pool;
        pool.sort_by(|a, b| a.0.cmp(b.0));
        let spread = call_id.as_u128();
        let (id, _, partitions) = pool[(spread % pool.len() as u128) as usize];
        let p = partitions[((spread >> 64) % partitions.len() as u128) as usize];
        Some((id.as_str(), p))
    }

    async fn carry_out_one(&self, effect: Effect) {
        let (to, message) = match effect {
            Effect::Reissue {
                call_id,
                service,
                attempt,
                body,
            } => {
                let message = Message::new(body)
                    .header(ATTEMPT_HEADER, attempt.to_string())
                    .key(call_id.to_string());
                let message = match self.live_partition(&service, call_id) {
                    Some((worker, p)) => {
                        info!(%call_id, attempt, service, worker, partition = p, "re-issuing a dead worker's call into a live worker's partition");
                        message.partition(p)
                    }
                    None => {
                        info!(%call_id, attempt, service, "re-issuing a dead worker's call");
                        message
                    }
                };
                (call_queue(&service), message)
            }
            Effect::SessionChanged { .. } => return,
            Effect::AnswerFatal { reply_to, reply } => {
                warn!(call_id = %reply.call_id, "answering fatal: {}", reply.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default());
                (
                    reply_to,
                    Message::new(reply.to_bytes()).key(reply.call_id.to_string()),
                )
            }
        };
        if let Err(e) =
            callq_broker::publish_within(self.broker.as_ref(), &to, &message, PUBLISH_TIMEOUT).await
        {
            // Durable all the same: the next copy's resume learns it.
            error!(to, "publishing a decision's effect failed: {e}");
        }
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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
