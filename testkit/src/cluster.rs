//! A whole cluster in one process on the embedded broker: a coordinator,
//! workers and standbys that can be started, killed and drained. The demo,
//! the fault tests and the benchmarks drive it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::faults::{self, Faults};
use anyhow::Context as _;
use callq_broker::{Broker, QueueSpec};
use callq_broker_embedded::{EmbeddedBroker, EmbeddedTap};
use callq_coordinator::{Coordinator, CoordinatorOptions, Ledger, Store};
use callq_node::{
    Admin, Client, ClientOptions, Service, Worker, WorkerOptions, WorkerStats, services,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How the cluster runs.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Heartbeat interval of workers and the coordinator's failure detector.
    pub heartbeat_interval: Duration,
    /// Intervals of silence after which a worker is dead.
    pub dead_after: u32,
    /// Calls each worker runs at once.
    pub capacity: u16,
    /// Standbys the coordinator keeps per reserved service.
    pub standby_per_service: BTreeMap<String, u32>,
    /// How long a session may go unused before it expires.
    pub session_idle: Duration,
    /// Per service, keyed calls its workers run at once per key.
    pub max_running_per_key: BTreeMap<String, u32>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        let defaults = CoordinatorOptions::default();
        Self {
            heartbeat_interval: defaults.heartbeat_interval,
            dead_after: defaults.dead_after,
            capacity: 64,
            standby_per_service: BTreeMap::new(),
            session_idle: defaults.session_idle,
            max_running_per_key: BTreeMap::new(),
        }
    }
}

/// A worker of the cluster.
struct Running {
    task: JoinHandle<Result<(), callq_node::Error>>,
    stop: CancellationToken,
}

/// An in-process cluster on the embedded broker.
pub struct LocalCluster {
    /// The broker every part shares.
    pub broker: Arc<dyn Broker>,
    embedded: EmbeddedBroker,
    opts: ClusterOptions,
    shutdown: CancellationToken,
    coordinator: Option<JoinHandle<Result<(), callq_coordinator::Error>>>,
    workers: HashMap<String, Running>,
    /// Stats of every worker ever started, killed ones included.
    all_stats: BTreeMap<String, Arc<WorkerStats>>,
}

impl LocalCluster {
    /// A cluster with a coordinator over `store` and no workers yet.
    pub async fn start<S: Store + 'static>(opts: ClusterOptions, store: S) -> anyhow::Result<Self> {
        let embedded = EmbeddedBroker::new();
        let broker: Arc<dyn Broker> = Arc::new(embedded.clone());
        // Declared before anything runs, so that requests sent before the
        // coordinator's task starts wait in the queue.
        broker.declare(&QueueSpec::coordinator()).await?;
        let mut cluster = Self {
            broker,
            embedded,
            opts,
            shutdown: CancellationToken::new(),
            coordinator: None,
            workers: HashMap::new(),
            all_stats: BTreeMap::new(),
        };
        cluster.start_coordinator(store)?;
        Ok(cluster)
    }

    /// Starts a coordinator over `store` (after [`LocalCluster::kill_coordinator`]).
    pub fn start_coordinator<S: Store + 'static>(&mut self, store: S) -> anyhow::Result<()> {
        let coordinator = Coordinator::new(
            CoordinatorOptions {
                heartbeat_interval: self.opts.heartbeat_interval,
                dead_after: self.opts.dead_after,
                standby_per_service: self.opts.standby_per_service.clone(),
                session_idle: self.opts.session_idle,
                ..CoordinatorOptions::default()
            },
            self.broker.clone(),
            Ledger::open(store).context("opening the call ledger")?,
        );
        self.coordinator = Some(tokio::spawn(coordinator.run(self.shutdown.child_token())));
        Ok(())
    }

    /// Kills the coordinator on the spot (its store stays as it was) and
    /// waits until its task is gone, so that its store is closed.
    pub async fn kill_coordinator(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.abort();
            let _ = c.await;
        }
    }

    /// The options of a worker of this cluster.
    pub fn worker_options(&self, id: &str, standby: bool) -> WorkerOptions {
        WorkerOptions {
            worker_id: id.to_owned(),
            capacity: self.opts.capacity,
            standby,
            heartbeat_interval: self.opts.heartbeat_interval,
            max_running_per_key: self.opts.max_running_per_key.clone(),
            drain_timeout: Duration::from_secs(30),
            ..WorkerOptions::default()
        }
    }

    /// Starts a worker of the built-in `services`; it declares its queues
    /// before this returns.
    pub async fn spawn_worker(
        &mut self,
        id: &str,
        services: &[&str],
        standby: bool,
    ) -> anyhow::Result<()> {
        let services = services
            .iter()
            .map(|name| {
                services::by_name(name).with_context(|| format!("no built-in service `{name}`"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.spawn_with(id, services, standby).await
    }

    /// Starts a worker of the given services (a test's or a benchmark's own).
    pub async fn spawn_with(
        &mut self,
        id: &str,
        services: Vec<Service>,
        standby: bool,
    ) -> anyhow::Result<()> {
        let worker = Worker::new(self.worker_options(id, standby), self.broker.clone());
        self.spawn_built(id, services, worker).await
    }

    /// Starts a worker of the given services that crashes where `plan` says
    /// (fault-injection tests, see [`crate::faults`]).
    pub async fn spawn_faulty(
        &mut self,
        id: &str,
        services: Vec<Service>,
        plan: Arc<dyn Faults>,
    ) -> anyhow::Result<()> {
        let mut worker = Worker::new(self.worker_options(id, false), self.broker.clone());
        for service in services {
            worker = worker.service(service);
        }
        worker.declare().await?;
        let stop = self.shutdown.child_token();
        self.all_stats.insert(id.to_owned(), worker.stats());
        let run = faults::run_until_crash(worker, plan, stop.clone());
        let task = tokio::spawn(async move {
            match run.await {
                faults::Ended::Ran(ended) => ended,
                // Dead as a killed process is: nothing more to report.
                faults::Ended::Crashed => Ok(()),
            }
        });
        self.workers.insert(id.to_owned(), Running { task, stop });
        Ok(())
    }

    async fn spawn_built(
        &mut self,
        id: &str,
        services: Vec<Service>,
        mut worker: Worker,
    ) -> anyhow::Result<()> {
        for service in services {
            worker = worker.service(service);
        }
        worker.declare().await?;
        let stop = self.shutdown.child_token();
        self.all_stats.insert(id.to_owned(), worker.stats());
        let task = tokio::spawn(worker.run(stop.clone()));
        self.workers.insert(id.to_owned(), Running { task, stop });
        Ok(())
    }

    /// Kills a worker on the spot: its calls stop where they are, its
    /// heartbeats stop, the broker returns its deliveries. `false` if no
    /// such worker runs.
    pub fn kill(&mut self, id: &str) -> bool {
        match self.workers.remove(id) {
            Some(w) => {
                w.task.abort();
                true
            }
            None => false,
        }
    }

    /// Asks a worker to drain and waits until it has left.
    pub async fn stop_worker(&mut self, id: &str) -> anyhow::Result<()> {
        if let Some(w) = self.workers.remove(id) {
            w.stop.cancel();
            w.task.await??;
        }
        Ok(())
    }

    /// Workers running now.
    pub fn worker_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.workers.keys().cloned().collect();
        ids.sort_unstable();
        ids
    }

    /// The counters of a worker, running or not.
    pub fn stats(&self, id: &str) -> Option<Arc<WorkerStats>> {
        self.all_stats.get(id).cloned()
    }

    /// The counters of every worker ever started.
    pub fn all_stats(&self) -> &BTreeMap<String, Arc<WorkerStats>> {
        &self.all_stats
    }

    /// A tap on everything published in the cluster (for `capture`).
    pub fn tap(&self, bound: usize) -> EmbeddedTap {
        self.embedded.tap(bound)
    }

    /// A client of the cluster.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.broker.clone(), ClientOptions::default()).await?)
    }

    /// An operator's handle.
    pub async fn admin(&self) -> anyhow::Result<Admin> {
        Ok(Admin::connect(self.broker.clone(), Duration::from_secs(10)).await?)
    }

    /// Stops everything: workers drain, the coordinator stops.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let ids = self.worker_ids();
        for id in ids {
            self.stop_worker(&id).await?;
        }
        self.shutdown.cancel();
        if let Some(c) = self.coordinator.take() {
            c.await??;
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for w in self.workers.values() {
            w.task.abort();
        }
        if let Some(c) = &self.coordinator {
            c.abort();
        }
    }
}
