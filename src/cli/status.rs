//! `callq status`: the cluster as the coordinator knows it, and the depth
//! of its call queues.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use callq_broker::call_queue;
use callq_node::Admin;
use callq_schemas::protocol::{ClusterStatus, WorkerState};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::broker::connect;
use super::config::Settings;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Prints the status, as JSON or as a table.
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let report = status(&Settings::load(config)?).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_status(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// The cluster and the depth of its call queues, as `callq status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StatusReport {
    /// What the coordinator knows.
    pub(crate) cluster: ClusterStatus,
    /// The broker's kind: `amqp`, `kafka` or `embedded`.
    #[serde(default)]
    pub(crate) broker: String,
    /// Per service queue, the calls not yet taken: on RabbitMQ those ready
    /// for a consumer; on Kafka the consumer group's lag (calls past the
    /// group's committed offsets: waiting, or taken and not yet finished).
    pub(crate) queues: BTreeMap<String, u64>,
}

/// `callq status`.
async fn status(settings: &Settings) -> anyhow::Result<StatusReport> {
    let broker = connect(settings, "status").await?;
    let admin = Admin::connect(broker.clone(), settings.patience()).await?;
    let cluster = admin
        .status()
        .await
        .context("asking the coordinator (is one running, and does it hold the same cluster key as this command: CALLQ_CLUSTER_KEY_FILE?)")?;
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
fn render_status(report: &StatusReport) -> String {
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
