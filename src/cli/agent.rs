//! `callq agent`: a node agent that starts this node's workers as processes
//! of this binary, restarts them when they die, and starts standbys when
//! the coordinator asks.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use callq_node::{Agent, Processes, WorkerSpec};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::broker::connect;
use super::config::Settings;
use super::health::{self, Health};
use super::shutdown::shutdown_on_signal;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Services of the workers to keep running, comma-separated.
    #[arg(long, value_delimiter = ',')]
    services: Vec<String>,
    /// Active workers of those services.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Standby workers of those services.
    #[arg(long, default_value_t = 0)]
    standbys: u32,
    /// The agent's id (default: the configured `agent.agent_id`).
    #[arg(long)]
    agent_id: Option<String>,
}

/// Runs the agent until a signal stops it; its workers get the same
/// configuration file.
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let worker_args = config
        .iter()
        .flat_map(|c| ["--config".to_string(), c.display().to_string()])
        .collect();
    let settings = Settings::load(config)?;
    let health = Health::new();
    let probes = CancellationToken::new();
    health::serve(settings.http.as_deref(), health.clone(), probes.clone()).await?;
    callq_node::metrics::describe_agent();
    let shutdown = shutdown_on_signal();
    health::unready_on(&shutdown, &health);
    let served = agent(&settings, args, worker_args, shutdown, &health).await;
    probes.cancel();
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Starts the configured workers and those of `args`; `worker_args` go
/// before `worker` on their command lines (`--config FILE`).
async fn agent(
    settings: &Settings,
    args: Args,
    worker_args: Vec<String>,
    shutdown: CancellationToken,
    health: &Arc<Health>,
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
    health.ready("serving");
    Agent::new(opts, broker, Arc::new(Processes::new(program, worker_args)))
        .run(shutdown)
        .await
        .context("the agent stopped")
}
