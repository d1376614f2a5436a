//! The processes of a cluster on a real broker: `callq coordinator`,
//! `worker`, `agent`, `call`, `status` and `drain`, configured by a file and
//! `CALLQ_*` environment variables.
//!
//! Every setting has a default, so that on one machine with RabbitMQ on its
//! standard port nothing needs configuring. A file (`--config callq.toml`)
//! overrides the defaults, and the environment overrides the file:
//! `CALLQ_BROKER` is `broker`, `CALLQ_WORKER__CAPACITY` is
//! `worker.capacity`, `CALLQ_COORDINATOR__STANDBY_PER_SERVICE__ECHO` is
//! `coordinator.standby_per_service.echo` (two underscores between levels).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use callq_broker::{Broker, call_queue};
use callq_broker_amqp::AmqpBroker;
use callq_coordinator::{Coordinator, CoordinatorOptions, Ledger, PgStore, RedbStore};
use callq_node::{
    Admin, Agent, AgentOptions, CallOptions, Client, ClientOptions, Processes, Worker,
    WorkerOptions, WorkerSpec, services,
};
use callq_schemas::Outcome;
use callq_schemas::protocol::{ClusterStatus, WorkerState};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Every setting of every command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where the broker is: `amqp://user:password@host:port/vhost`.
    pub broker: String,
    /// How long an operator command (`status`, `drain`) waits for the
    /// coordinator, in milliseconds.
    pub patience_ms: u64,
    /// The coordinator.
    pub coordinator: CoordinatorSettings,
    /// Workers (`callq worker`, and the workers an agent starts).
    pub worker: WorkerOptions,
    /// The node agent.
    pub agent: AgentOptions,
    /// `callq call`.
    pub client: ClientOptions,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            broker: callq_broker_amqp::DEFAULT_URL.into(),
            patience_ms: 5_000,
            coordinator: CoordinatorSettings::default(),
            worker: WorkerOptions::default(),
            agent: AgentOptions::default(),
            client: ClientOptions::default(),
        }
    }
}

/// The coordinator's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorSettings {
    /// The ledger file (redb). A second coordinator on the same file waits
    /// until the first is gone, then takes over.
    pub store: PathBuf,
    /// Keep the ledger in PostgreSQL instead (`postgres://...`), for
    /// coordinators on several hosts: one leads under a lease, the others
    /// stand by and take over when it lapses.
    pub postgres: Option<String>,
    /// The cluster's name in PostgreSQL: coordinators of one cluster share
    /// it; clusters sharing a database keep apart by it.
    pub cluster: String,
    /// How long a leader's lease runs without renewal (milliseconds): a
    /// standby takes over within this (plus a poll) after the leader dies.
    pub lease_ms: u64,
    /// Heartbeats, failure detection, standbys.
    #[serde(flatten)]
    pub options: CoordinatorOptions,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            store: PathBuf::from("callq-ledger.redb"),
            postgres: None,
            cluster: "callq".into(),
            lease_ms: 2_000,
            options: CoordinatorOptions::default(),
        }
    }
}

impl Settings {
    /// The defaults, overridden by `file` (if given) and then by `CALLQ_*`
    /// variables.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "the configuration file {} does not exist",
                file.display()
            );
            builder = builder.add_source(config::File::from(file));
        }
        let built = builder
            .add_source(
                config::Environment::with_prefix("CALLQ")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .context("reading the configuration")?;
        built
            .try_deserialize()
            .context("the configuration does not fit (see docs/OPERATIONS.md for the settings)")
    }

    fn patience(&self) -> Duration {
        Duration::from_millis(self.patience_ms)
    }
}

/// Connects to the configured broker; `role` names the connection.
pub async fn connect(settings: &Settings, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let url = settings.broker.trim();
    if url == "embedded" {
        bail!(
            "the embedded broker lives inside one process: run `callq demo`, or set \
             CALLQ_BROKER=amqp://user:password@host:5672/%2f for a cluster of processes"
        );
    }
    if url.starts_with("kafka://") {
        let mut opts = callq_broker_kafka::Options::from_url(url)
            .with_context(|| format!("reading the Kafka URL `{url}`"))?;
        if opts.client_id == callq_broker_kafka::Options::default().client_id {
            opts.client_id = format!("callq-{}", role.replace(' ', "-"));
        }
        let broker = callq_broker_kafka::KafkaBroker::connect_with(opts)
            .await
            .with_context(|| format!("connecting the {role} to the broker"))?;
        info!(role, at = url, "connected to Kafka");
        return Ok(Arc::new(broker));
    }
    if !url.starts_with("amqp://") {
        bail!(
            "unsupported broker `{url}`: callq speaks amqp:// (RabbitMQ; TLS is not supported yet) \
             and kafka://host:port (Kafka)"
        );
    }
    let opts = callq_broker_amqp::Options {
        url: url.to_owned(),
        name: format!("callq {role}"),
        ..callq_broker_amqp::Options::default()
    };
    let broker = AmqpBroker::connect_with(opts)
        .await
        .with_context(|| format!("connecting the {role} to the broker"))?;
    info!(role, at = %broker.place(), "connected to RabbitMQ");
    Ok(Arc::new(broker))
}

/// Cancelled on SIGTERM or Ctrl-C: the process drains and exits.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot watch SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    cancel.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => info!("interrupted: stopping"),
        }
        cancel.cancel();
    });
    token
}

/// Cancels `shutdown` when stdin reaches its end: the agent that started
/// this worker is gone.
pub fn stop_when_stdin_closes(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        warn!("the node agent that started this worker is gone: draining");
        shutdown.cancel();
    });
}

/// `callq coordinator`: waits for the store, then serves until stopped. On
/// RabbitMQ the request queue has a single active consumer, so a second
/// coordinator stands by until the first is gone.
pub async fn coordinator(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(url) = &settings.coordinator.postgres {
        return coordinator_on_postgres(settings, url, shutdown).await;
    }
    let path = &settings.coordinator.store;
    let mut waiting = false;
    let store = loop {
        match RedbStore::open(path) {
            Ok(store) => break store,
            Err(callq_coordinator::Error::StoreInUse(_)) => {
                if !waiting {
                    info!(store = %path.display(), "another coordinator holds the store: standing by");
                    waiting = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            Err(e) => return Err(e).context("opening the coordinator's store"),
        }
    };
    let ledger = Ledger::open(store).context("reading the call ledger")?;
    let broker = connect(settings, "coordinator").await?;
    info!(store = %path.display(), open_calls = ledger.open_calls(), "coordinator serving");
    Coordinator::new(settings.coordinator.options.clone(), broker, ledger)
        .run(shutdown)
        .await
        .context("the coordinator stopped")
}

/// `callq coordinator` with its ledger in PostgreSQL: stands by until it
/// takes the cluster's lease, leads until it loses it (then stands by
/// again), until stopped.
async fn coordinator_on_postgres(
    settings: &Settings,
    url: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let c = &settings.coordinator;
    let lease = Duration::from_millis(c.lease_ms.max(100));
    let holder = format!(
        "{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
        std::process::id()
    );
    let poll = lease / 4;
    loop {
        let mut waiting = false;
        let store = loop {
            match PgStore::acquire(url, &c.cluster, &holder, lease).await {
                Ok(Some(store)) => break store,
                Ok(None) if !waiting => {
                    info!(cluster = %c.cluster, "another coordinator leads: standing by");
                    waiting = true;
                }
                Ok(None) => {}
                Err(e) => warn!(cluster = %c.cluster, "taking the lease: {e}"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(poll) => {}
            }
        };
        let epoch = store.epoch();
        let ledger = Ledger::open(store).context("reading the call ledger")?;
        let broker = connect(settings, "coordinator").await?;
        info!(cluster = %c.cluster, epoch, open_calls = ledger.open_calls(), "coordinator leading");
        match Coordinator::new(c.options.clone(), broker, ledger)
            .run(shutdown.clone())
            .await
        {
            Ok(()) => return Ok(()),
            Err(e @ callq_coordinator::Error::Fenced(_)) => {
                warn!(cluster = %c.cluster, epoch, "lost the lead: {e}; standing by");
            }
            Err(e) => return Err(e).context("the coordinator stopped"),
        }
    }
}

/// What `callq worker` runs.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// Built-in services.
    pub services: Vec<String>,
    /// The worker's id (generated when `None`).
    pub worker_id: Option<String>,
    /// Calls at once (the configured capacity when `None`).
    pub capacity: Option<u16>,
    /// Start as a standby.
    pub standby: bool,
}

/// `callq worker`: serves the built-in services. When its broker
/// connection drops it stops taking calls, reconnects with backoff and
/// registers again under a new incarnation of its id (`ID.1`, `ID.2`, ...);
/// the calls it held return to their queues and `resume` arbitrates them.
pub async fn worker(
    settings: &Settings,
    args: WorkerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut opts = settings.worker.clone();
    if let Some(id) = args.worker_id {
        opts.worker_id = id;
    }
    if let Some(capacity) = args.capacity {
        opts.capacity = capacity;
    }
    opts.standby = args.standby;
    let found: Vec<_> = args
        .services
        .iter()
        .map(|name| {
            services::by_name(name).with_context(|| {
                format!(
                    "no built-in service `{name}`: the built-in services are {}",
                    services::BUILT_IN.join(", ")
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        !found.is_empty(),
        "name the services to serve: --services echo,mail"
    );
    let base = opts.worker_id.clone();
    let (mut incarnation, mut backoff) = (0u32, Duration::from_millis(100));
    loop {
        let id = if incarnation == 0 {
            base.clone()
        } else {
            format!("{base}.{incarnation}")
        };
        let ended = match connect(settings, &format!("worker {id}")).await {
            Ok(broker) => {
                let mut worker = Worker::new(
                    WorkerOptions {
                        worker_id: id.clone(),
                        ..opts.clone()
                    },
                    broker,
                );
                for service in &found {
                    worker = worker.service(service.clone());
                }
                let started = tokio::time::Instant::now();
                let ended = worker.run(shutdown.clone()).await;
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(100);
                }
                match ended {
                    Ok(()) => return Ok(()),
                    Err(callq_node::Error::Config(e)) => bail!("worker {id}: {e}"),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => format!("{e:#}"),
        };
        if shutdown.is_cancelled() {
            return Ok(());
        }
        incarnation += 1;
        warn!(worker = %id, "{ended}; reconnecting in {backoff:?}");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// What `callq agent` runs besides its configuration.
#[derive(Debug, Clone, Default)]
pub struct AgentArgs {
    /// Active workers of these services (added to the configured ones).
    pub services: Vec<String>,
    /// How many active workers of `services`.
    pub count: u32,
    /// How many standbys of `services` to start at once.
    pub standbys: u32,
    /// The agent's id.
    pub agent_id: Option<String>,
    /// The arguments its worker processes get before `worker`
    /// (`--config FILE`).
    pub worker_args: Vec<String>,
}

/// `callq agent`: starts this node's workers as processes of this binary,
/// restarts them when they die, starts standbys when the coordinator asks.
pub async fn agent(
    settings: &Settings,
    args: AgentArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut opts = settings.agent.clone();
    if let Some(id) = args.agent_id {
        opts.agent_id = id;
    }
    let capacity = settings.worker.capacity;
    if !args.services.is_empty() {
        for (count, standby) in [(args.count, false), (args.standbys, true)] {
            if count > 0 {
                opts.workers.push(WorkerSpec {
                    services: args.services.clone(),
                    standby,
                    count,
                    capacity,
                });
            }
        }
    }
    anyhow::ensure!(
        !opts.workers.is_empty() || !opts.services.is_empty(),
        "the agent has nothing to run: give --services echo,mail [--count N] [--standbys M], \
         or [[agent.workers]] in the configuration file"
    );
    let program = std::env::current_exe().context("finding the callq binary")?;
    let broker = connect(settings, &format!("agent {}", opts.agent_id)).await?;
    info!(agent = %opts.agent_id, workers = opts.workers.len(), "agent running");
    Agent::new(
        opts,
        broker,
        Arc::new(Processes::new(program, args.worker_args)),
    )
    .run(shutdown)
    .await
    .context("the agent stopped")
}

/// `callq call`: one call, its reply printed as JSON on stdout. Returns the
/// process exit code: 0 ok, 1 error, 2 fatal, 3 expired.
pub async fn call(
    settings: &Settings,
    service: &str,
    method: &str,
    args: &str,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let args: serde_json::Value = serde_json::from_str(args)
        .with_context(|| format!("the arguments are not JSON: {args}"))?;
    let broker = connect(settings, "client").await?;
    let client = Client::connect(broker, settings.client.clone()).await?;
    let reply = client
        .call(
            service,
            method,
            args,
            CallOptions {
                timeout: Some(timeout),
                ..CallOptions::default()
            },
        )
        .await?;
    println!("{}", serde_json::to_string(&reply)?);
    Ok(match reply.outcome {
        Outcome::Ok => 0,
        Outcome::Error => 1,
        Outcome::Fatal => 2,
        Outcome::Expired => 3,
    })
}

/// The cluster and the depth of its call queues, as `callq status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// What the coordinator knows.
    pub cluster: ClusterStatus,
    /// The broker's kind: `amqp`, `kafka` or `embedded`.
    #[serde(default)]
    pub broker: String,
    /// Per service queue, the calls not yet taken: on RabbitMQ those ready
    /// for a consumer; on Kafka the consumer group's lag (calls past the
    /// group's committed offsets: waiting, or taken and not yet finished).
    pub queues: BTreeMap<String, u64>,
}

/// `callq status`.
pub async fn status(settings: &Settings) -> anyhow::Result<StatusReport> {
    let broker = connect(settings, "status").await?;
    let admin = Admin::connect(broker.clone(), settings.patience()).await?;
    let cluster = admin
        .status()
        .await
        .context("asking the coordinator (is one running?)")?;
    let mut services: Vec<&str> = cluster
        .workers
        .iter()
        .flat_map(|w| w.services.iter().map(String::as_str))
        .chain(cluster.standby_per_service.keys().map(String::as_str))
        .collect();
    services.sort_unstable();
    services.dedup();
    let mut queues = BTreeMap::new();
    for service in services {
        let queue = call_queue(service);
        match broker.depth(&queue).await {
            Ok(depth) => {
                queues.insert(queue, depth.ready);
            }
            Err(e) => warn!(%queue, "reading the depth: {e}"),
        }
    }
    Ok(StatusReport {
        cluster,
        broker: broker.kind().to_owned(),
        queues,
    })
}

/// The status as a table for people.
pub fn render_status(report: &StatusReport) -> String {
    use std::fmt::Write as _;
    let c = &report.cluster;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workers {}  agents {}  open calls {}  deaths {}  promotions {}",
        c.workers.len(),
        c.agents.len(),
        c.open_calls,
        c.deaths,
        c.promotions
    );
    let _ = writeln!(
        out,
        "\n{:<40} {:<9} {:>9} {:>8}  SERVICES",
        "WORKER", "STATE", "LOAD", "SEEN"
    );
    for w in &c.workers {
        let _ = writeln!(
            out,
            "{:<40} {:<9} {:>9} {:>6}ms  {}",
            w.worker_id,
            w.state.as_str(),
            format!("{}/{}", w.capacity.saturating_sub(w.free), w.capacity),
            w.last_seen_ms,
            w.services.join(",")
        );
    }
    if !c.standby_per_service.is_empty() {
        let _ = writeln!(out, "\n{:<24} {:>8} {:>8}", "SERVICE", "STANDBYS", "WANTED");
        for (service, wanted) in &c.standby_per_service {
            let have = c
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Standby && w.services.contains(service))
                .count();
            let _ = writeln!(out, "{service:<24} {have:>8} {wanted:>8}");
        }
    }
    // Kafka keeps no ready count: what waits is the consumer group's lag.
    let depth = if report.broker == "kafka" {
        "LAG"
    } else {
        "READY"
    };
    let _ = writeln!(out, "\n{:<32} {depth:>8}", "QUEUE");
    for (queue, ready) in &report.queues {
        let _ = writeln!(out, "{queue:<32} {ready:>8}");
    }
    if !c.agents.is_empty() {
        let _ = writeln!(out, "\nagents: {}", c.agents.join(", "));
    }
    out
}

/// `callq drain WORKER`: whether the coordinator knew the worker.
pub async fn drain(settings: &Settings, worker: &str) -> anyhow::Result<bool> {
    let broker = connect(settings, "drain").await?;
    let admin = Admin::connect(broker, settings.patience()).await?;
    admin
        .drain(worker)
        .await
        .context("asking the coordinator (is one running?)")
}
