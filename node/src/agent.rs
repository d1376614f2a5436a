//! The node agent: starts the workers of its host, restarts a crashed one,
//! and starts standbys when the coordinator asks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callq_broker::{Broker, agent_queue};
use callq_schemas::protocol::RequestBody;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::link::{Link, Order};
use crate::{Error, Worker, WorkerOptions, services};

/// Workers of one kind that an agent keeps running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The built-in services they serve.
    pub services: Vec<String>,
    /// Whether they start as standbys.
    #[serde(default)]
    pub standby: bool,
    /// How many.
    #[serde(default = "one")]
    pub count: u32,
    /// Calls each runs at once.
    #[serde(default = "capacity")]
    pub capacity: u16,
}

fn one() -> u32 {
    1
}

fn capacity() -> u16 {
    WorkerOptions::default().capacity
}

/// How an agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentOptions {
    /// The agent's id; unique in the cluster (the host name, say).
    pub agent_id: String,
    /// The workers it keeps running.
    pub workers: Vec<WorkerSpec>,
    /// Services it may start standbys of when the coordinator asks; the
    /// services of its workers when empty.
    pub services: Vec<String>,
    /// How often it heartbeats to the coordinator.
    #[serde(with = "callq_schemas::millis")]
    pub heartbeat_interval: Duration,
    /// The first wait before restarting a crashed worker; it doubles with
    /// each crash in a row of the same worker, up to a minute.
    #[serde(with = "callq_schemas::millis")]
    pub restart_backoff: Duration,
    /// How long its workers get to drain when the agent stops.
    #[serde(with = "callq_schemas::millis")]
    pub drain_timeout: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            agent_id: format!("agent-{}", uuid::Uuid::now_v7().simple()),
            workers: Vec::new(),
            services: Vec::new(),
            heartbeat_interval: Duration::from_millis(250),
            restart_backoff: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Starts workers. The future [`Launcher::launch`] returns runs the worker
/// until it exits: `Ok` for a clean exit (it drained), `Err` for a crash.
/// Dropping the future kills the worker; cancelling `stop` drains it.
pub trait Launcher: Send + Sync {
    /// Starts a worker with this id.
    fn launch(
        &self,
        worker_id: &str,
        spec: &WorkerSpec,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// Runs workers as tasks of this process (one machine, tests, the demo).
pub struct InProcess {
    broker: Arc<dyn Broker>,
    template: WorkerOptions,
    kills: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl InProcess {
    /// Workers on `broker`, with `template`'s options (their ids, services,
    /// capacity and standby flag come from the agent).
    pub fn new(broker: Arc<dyn Broker>, template: WorkerOptions) -> Self {
        Self {
            broker,
            template,
            kills: Arc::default(),
        }
    }

    /// Kills a worker on the spot, as a crash would; `false` if no such
    /// worker runs.
    pub fn kill(&self, worker_id: &str) -> bool {
        let token = self
            .kills
            .lock()
            .ok()
            .and_then(|k| k.get(worker_id).cloned());
        token.map(|t| t.cancel()).is_some()
    }

    /// Ids of the workers running now.
    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .kills
            .lock()
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }
}

impl Launcher for InProcess {
    fn launch(
        &self,
        worker_id: &str,
        spec: &WorkerSpec,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Result<(), String>> {
        let opts = WorkerOptions {
            worker_id: worker_id.to_owned(),
            capacity: spec.capacity,
            standby: spec.standby,
            ..self.template.clone()
        };
        let mut worker = Worker::new(opts, self.broker.clone());
        for name in &spec.services {
            match services::by_name(name) {
                Some(s) => worker = worker.service(s),
                None => {
                    let e = format!("no built-in service `{name}`");
                    return Box::pin(async move { Err(e) });
                }
            }
        }
        let kill = CancellationToken::new();
        if let Ok(mut k) = self.kills.lock() {
            k.insert(worker_id.to_owned(), kill.clone());
        }
        let kills = self.kills.clone();
        let id = worker_id.to_owned();
        Box::pin(async move {
            let ended = tokio::select! {
                r = worker.run(stop) => r.map_err(|e| e.to_string()),
                () = kill.cancelled() => Err("killed".to_owned()),
            };
            if let Ok(mut k) = kills.lock() {
                k.remove(&id);
            }
            ended
        })
    }
}

/// Runs workers as processes: `program [args..] worker --worker-id ID
/// --services a,b --capacity N [--standby]`, with the agent's environment.
pub struct Processes {
    program: PathBuf,
    args: Vec<String>,
}

impl Processes {
    /// Workers started as `program args.. worker .. --supervised`; usually
    /// the `callq` binary itself with its `--config` arguments. Each gets a
    /// pipe on its stdin and drains and exits when it closes, so that the
    /// workers of an agent that died do not run on unsupervised.
    pub fn new(program: impl Into<PathBuf>, args: Vec<String>) -> Self {
        Self {
            program: program.into(),
            args,
        }
    }
}

impl Launcher for Processes {
    fn launch(
        &self,
        worker_id: &str,
        spec: &WorkerSpec,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Result<(), String>> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .arg("worker")
            .args(["--worker-id", worker_id])
            .args(["--services", &spec.services.join(",")])
            .args(["--capacity", &spec.capacity.to_string()])
            .arg("--supervised")
            // The agent answers the probes and serves the metrics of its
            // host: its workers would all bind its address.
            .env_remove("CALLQ_HTTP")
            .kill_on_drop(true)
            // The worker drains and exits when this pipe closes: when the
            // agent dies, even by SIGKILL, its workers do not outlive it.
            .stdin(std::process::Stdio::piped());
        if spec.standby {
            cmd.arg("--standby");
        }
        let spawned = cmd.spawn();
        let program = self.program.display().to_string();
        Box::pin(async move {
            let mut child =
                spawned.map_err(|e| format!("cannot start worker process `{program}`: {e}"))?;
            let _lifeline = child.stdin.take();
            let status = tokio::select! {
                s = child.wait() => s,
                () = stop.cancelled() => {
                    // Ask it to drain (SIGTERM), then wait for it to leave.
                    if let Some(pid) = child.id() {
                        let _ = tokio::process::Command::new("kill")
                            .args(["-TERM", &pid.to_string()])
                            .status()
                            .await;
                    }
                    child.wait().await
                }
            }
            .map_err(|e| format!("waiting for the worker process: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("the worker process exited with {status}"))
            }
        })
    }
}

/// What an agent did, for status and tests.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Workers started, restarts included.
    pub launched: AtomicU64,
    /// Crashed workers restarted.
    pub restarted: AtomicU64,
    /// Standbys started because the coordinator asked.
    pub standbys_started: AtomicU64,
    /// Workers running now.
    pub running: AtomicU64,
}

/// One worker the agent keeps: its spec, and whether it is restarted when
/// it crashes (configured workers are; standbys the coordinator asked for
/// are not: the coordinator asks again where it needs them).
struct Slot {
    name: String,
    spec: WorkerSpec,
    restart: bool,
    generation: u32,
    crashes_in_a_row: u32,
}

/// A node agent.
pub struct Agent {
    opts: AgentOptions,
    broker: Arc<dyn Broker>,
    launcher: Arc<dyn Launcher>,
    stats: Arc<AgentStats>,
}

/// The workers of a running agent: the slots it keeps and their tasks.
struct Node {
    can_start: Vec<String>,
    /// Live slots by index; a slot whose worker is not restarted is removed
    /// when that worker ends, so standbys started over a long life do not
    /// pile up.
    slots: BTreeMap<usize, Slot>,
    next_slot: usize,
    running: JoinSet<Exit>,
    stop: CancellationToken,
}

/// Standbys one agent keeps at most, whatever the coordinator asks.
const MAX_STANDBYS: usize = 64;

/// A slot's worker ended: the slot, how, and how long it ran.
type Exit = (usize, Result<(), String>, Duration);

/// A worker that ran this long before it crashed starts its backoff over.
const STABLE_RUN: Duration = Duration::from_secs(60);

impl Agent {
    /// An agent that starts its workers with `launcher`.
    pub fn new(opts: AgentOptions, broker: Arc<dyn Broker>, launcher: Arc<dyn Launcher>) -> Self {
        Self {
            opts,
            broker,
            launcher,
            stats: Arc::default(),
        }
    }

    /// The agent's counters.
    pub fn stats(&self) -> Arc<AgentStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` is cancelled; then drains its workers.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let id = self.opts.agent_id.clone();
        let patience = self.opts.heartbeat_interval * 40;
        let (mut link, mut orders) =
            Link::connect(self.broker.clone(), &id, agent_queue(&id), patience).await?;
        let mut gone = link.gone();
        let mut node = Node {
            can_start: self.can_start(),
            slots: BTreeMap::new(),
            next_slot: 0,
            running: JoinSet::new(),
            stop: shutdown.child_token(),
        };
        for spec in &self.opts.workers {
            for _ in 0..spec.count {
                let name = format!("{id}.w{}", node.next_slot + 1);
                let spec = WorkerSpec {
                    count: 1,
                    ..spec.clone()
                };
                self.add(&mut node, name, spec, true);
            }
        }
        info!(agent = %id, workers = node.slots.len(), services = ?node.can_start, "node agent serving");
        let mut tick = tokio::time::interval(self.opts.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    let workers = u32::try_from(node.running.len()).unwrap_or(u32::MAX);
                    let beat = RequestBody::AgentHeartbeat { services: node.can_start.clone(), workers };
                    if let Err(e) = link.beat(beat).await {
                        warn!(agent = %id, "heartbeat not sent: {e}");
                    }
                }
                Some(order) = orders.recv() => {
                    if let Order::StartStandby(services) = order {
                        self.start_standby(&mut node, services);
                    }
                }
                () = gone.cancelled() => {
                    // The broker connection is lost: the workers go on (each
                    // reconnects on its own), the agent links up again.
                    let Some((l, o)) = self.relink(&shutdown).await else { break };
                    (link, orders) = (l, o);
                    gone = link.gone();
                }
                Some(joined) = node.running.join_next(), if !node.running.is_empty() => {
                    self.stats.running.store(node.running.len() as u64, Ordering::Relaxed);
                    crate::metrics::agent_running(node.running.len());
                    match joined {
                        Ok(exit) => self.ended(&mut node, exit),
                        Err(e) => error!(agent = %id, "a worker task failed: {e}"),
                    }
                }
            }
        }
        self.drain(node).await;
        if let Err(e) = link.send(RequestBody::Leave {}).await {
            warn!(agent = %id, "telling the coordinator this agent leaves: {e}");
        }
        Ok(())
    }

    /// Connects the agent's link to the coordinator again, with backoff,
    /// until it succeeds or `shutdown` is cancelled (`None`).
    async fn relink(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<(Arc<Link>, tokio::sync::mpsc::Receiver<Order>)> {
        let id = &self.opts.agent_id;
        let patience = self.opts.heartbeat_interval * 40;
        let mut backoff =
            callq_broker::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let pause = backoff.next_delay();
            warn!(agent = %id, "lost the broker connection; linking up again in {pause:?}");
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(pause) => {}
            }
            match Link::connect(self.broker.clone(), id, agent_queue(id), patience).await {
                Ok(linked) => {
                    info!(agent = %id, "linked up with the coordinator again");
                    return Some(linked);
                }
                Err(e) => warn!(agent = %id, "linking up: {e}"),
            }
        }
    }

    /// The services this agent may start workers of.
    fn can_start(&self) -> Vec<String> {
        let mut can_start: BTreeSet<String> = self.opts.services.iter().cloned().collect();
        if can_start.is_empty() {
            can_start.extend(self.opts.workers.iter().flat_map(|w| w.services.clone()));
        }
        can_start.into_iter().collect()
    }

    /// Adds a slot and starts its first worker.
    fn add(&self, node: &mut Node, name: String, spec: WorkerSpec, restart: bool) {
        let i = node.next_slot;
        node.next_slot += 1;
        let mut slot = Slot {
            name,
            spec,
            restart,
            generation: 0,
            crashes_in_a_row: 0,
        };
        self.start(&mut slot, i, Duration::ZERO, &node.stop, &mut node.running);
        node.slots.insert(i, slot);
    }

    /// Starts a standby on the coordinator's order, within the agent's
    /// bound on standbys.
    fn start_standby(&self, node: &mut Node, services: Vec<String>) {
        let id = &self.opts.agent_id;
        let unknown: Vec<&String> = services
            .iter()
            .filter(|s| !node.can_start.contains(s))
            .collect();
        if !unknown.is_empty() {
            warn!(agent = %id, ?unknown, "asked for a standby of services this agent does not run");
            return;
        }
        let standbys = node.slots.values().filter(|s| !s.restart).count();
        if standbys >= MAX_STANDBYS {
            warn!(agent = %id, standbys, "asked for one more standby than this agent keeps ({MAX_STANDBYS}); not starting it");
            return;
        }
        info!(agent = %id, ?services, "starting a standby on the coordinator's request");
        self.stats.standbys_started.fetch_add(1, Ordering::Relaxed);
        crate::metrics::count(crate::metrics::AGENT_STANDBYS);
        let name = format!("{id}.s{}", node.next_slot + 1);
        let spec = WorkerSpec {
            services,
            standby: true,
            count: 1,
            capacity: capacity(),
        };
        self.add(node, name, spec, false);
    }

    /// A slot's worker ended: restart a configured worker that crashed (with
    /// backoff); forget a slot whose worker is not restarted.
    fn ended(&self, node: &mut Node, (i, ended, ran): Exit) {
        let id = &self.opts.agent_id;
        let Some(slot) = node.slots.get_mut(&i) else {
            return;
        };
        match ended {
            Ok(()) => {
                info!(agent = %id, worker = slot.name, "worker left");
                slot.crashes_in_a_row = 0;
            }
            Err(why) if slot.restart => {
                if ran >= STABLE_RUN {
                    slot.crashes_in_a_row = 0;
                }
                slot.crashes_in_a_row += 1;
                let exp = slot.crashes_in_a_row.saturating_sub(1).min(10);
                let delay =
                    (self.opts.restart_backoff * 2u32.pow(exp)).min(Duration::from_secs(60));
                warn!(agent = %id, worker = slot.name, "worker crashed ({why}); restarting in {delay:?}");
                self.stats.restarted.fetch_add(1, Ordering::Relaxed);
                crate::metrics::count(crate::metrics::AGENT_RESTARTS);
                self.start(slot, i, delay, &node.stop, &mut node.running);
                return;
            }
            Err(why) => {
                warn!(agent = %id, worker = slot.name, "standby crashed ({why}); the coordinator asks again where it needs one");
            }
        }
        node.slots.remove(&i);
    }

    /// Stops every worker and waits for them to drain, within the drain
    /// timeout.
    async fn drain(&self, mut node: Node) {
        let id = &self.opts.agent_id;
        info!(agent = %id, workers = node.running.len(), "node agent stopping: draining its workers");
        node.stop.cancel();
        let drained = async { while node.running.join_next().await.is_some() {} };
        if tokio::time::timeout(self.opts.drain_timeout, drained)
            .await
            .is_err()
        {
            warn!(agent = %id, "workers did not drain in time: killing them");
            node.running.shutdown().await;
        }
    }

    /// Starts a slot's next generation after `delay`. Each generation gets a
    /// new worker id, so the coordinator never mistakes a restarted worker
    /// for the one that crashed.
    fn start(
        &self,
        slot: &mut Slot,
        i: usize,
        delay: Duration,
        stop: &CancellationToken,
        running: &mut JoinSet<Exit>,
    ) {
        slot.generation += 1;
        let worker_id = format!("{}.{}", slot.name, slot.generation);
        let launcher = self.launcher.clone();
        let spec = slot.spec.clone();
        let stop = stop.clone();
        let stats = self.stats.clone();
        running.spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return (i, Ok(()), Duration::ZERO),
                }
            }
            stats.launched.fetch_add(1, Ordering::Relaxed);
            crate::metrics::count(crate::metrics::AGENT_STARTS);
            info!(worker = worker_id, services = ?spec.services, standby = spec.standby, "starting a worker");
            let started = tokio::time::Instant::now();
            let ended = launcher.launch(&worker_id, &spec, stop).await;
            (i, ended, started.elapsed())
        });
        self.stats
            .running
            .store(running.len() as u64, Ordering::Relaxed);
        crate::metrics::agent_running(running.len());
    }
}
