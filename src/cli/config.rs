//! The settings of the commands that run on a real broker (`callq
//! coordinator`, `worker`, `agent`, `call`, `status`, `drain`, `capture`,
//! `replay`), from a file and `CALLQ_*` environment variables.
//!
//! Every setting has a default, so that on one machine with RabbitMQ on its
//! standard port nothing needs configuring. A file (`--config callq.toml`)
//! overrides the defaults, and the environment overrides the file:
//! `CALLQ_BROKER` is `broker`, `CALLQ_WORKER__CAPACITY` is
//! `worker.capacity`, `CALLQ_COORDINATOR__STANDBY_PER_SERVICE__ECHO` is
//! `coordinator.standby_per_service.echo` (two underscores between levels).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use callq_coordinator::CoordinatorOptions;
use callq_node::{AgentOptions, ClientOptions, WorkerOptions};
use serde::{Deserialize, Serialize};

use super::broker;

/// Every setting of every command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Settings {
    /// Where the broker is: `amqp://user:password@host:port/vhost`.
    pub(crate) broker: String,
    /// A file holding the cluster key (at least 32 bytes) that signs the
    /// control path: coordinators, workers, agents and operators of one
    /// cluster share it; clients need none. Unset: control messages are
    /// not authenticated.
    pub(crate) cluster_key_file: Option<PathBuf>,
    /// Where `coordinator`, `worker` and `agent` serve `GET /healthz` and
    /// `GET /readyz` (`host:port`, e.g. `0.0.0.0:9464`). Unset: nowhere.
    pub(crate) http: Option<String>,
    /// How long an operator command (`status`, `drain`) waits for the
    /// coordinator, in milliseconds.
    pub(crate) patience_ms: u64,
    /// The coordinator.
    pub(crate) coordinator: CoordinatorSettings,
    /// Workers (`callq worker`, and the workers an agent starts).
    pub(crate) worker: WorkerOptions,
    /// The node agent.
    pub(crate) agent: AgentOptions,
    /// `callq call`.
    pub(crate) client: ClientOptions,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            broker: broker::DEFAULT_URL.into(),
            cluster_key_file: None,
            http: None,
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
pub(crate) struct CoordinatorSettings {
    /// The ledger file (redb). A second coordinator on the same file waits
    /// until the first is gone, then takes over.
    pub(crate) store: PathBuf,
    /// Keep the ledger in PostgreSQL instead (`postgres://...`), for
    /// coordinators on several hosts: one leads under a lease, the others
    /// stand by and take over when it lapses.
    pub(crate) postgres: Option<String>,
    /// The cluster's name in PostgreSQL: coordinators of one cluster share
    /// it; clusters sharing a database keep apart by it.
    pub(crate) cluster: String,
    /// How long a leader's lease runs without renewal (milliseconds): a
    /// standby takes over within this (plus a poll) after the leader dies.
    pub(crate) lease_ms: u64,
    /// Heartbeats, failure detection, standbys.
    #[serde(flatten)]
    pub(crate) options: CoordinatorOptions,
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
    pub(crate) fn load(file: Option<&Path>) -> anyhow::Result<Self> {
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
                    .try_parsing(true)
                    // Lists set from the environment: comma-separated.
                    .list_separator(",")
                    .with_list_parse_key("worker.trusted_publishers"),
            )
            .build()
            .context("reading the configuration")?;
        built
            .try_deserialize()
            .context("the configuration does not fit (see docs/OPERATIONS.md for the settings)")
    }

    pub(crate) fn patience(&self) -> Duration {
        Duration::from_millis(self.patience_ms)
    }
}
