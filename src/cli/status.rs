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
    #[arg(long, conflicts_with = "watch")]
    json: bool,
    /// Redraw the table in place every `--interval-ms`, with the calls per
    /// second of each service, until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// How often `--watch` redraws, in milliseconds.
    #[arg(long, default_value_t = 2_000, requires = "watch")]
    interval_ms: u64,
    /// Stop `--watch` after this many frames (default: run until Ctrl-C).
    #[arg(long, requires = "watch")]
    frames: Option<u64>,
}

/// Prints the status, as JSON or as a table, once or (`--watch`) again and
/// again.
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config)?;
    if args.watch {
        let every = std::time::Duration::from_millis(args.interval_ms.max(100));
        super::watch::run(&settings, every, args.frames).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = status(&settings).await?;
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
    /// Per service queue, its topic's partitions (Kafka only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) partitions: BTreeMap<String, u32>,
    /// What an operator should fix, in words: a service with more active
    /// workers than its topic has partitions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) warnings: Vec<String>,
}

/// A warning per service whose call topic has fewer partitions than the
/// service has active workers: a consumer group gives each partition to
/// one member, so the others get no calls of the service.
pub(crate) fn partition_warnings(
    cluster: &ClusterStatus,
    partitions: &BTreeMap<String, u32>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for (queue, &have) in partitions {
        let Some(service) = queue.strip_prefix("callq.call.") else {
            continue;
        };
        let active = cluster
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Active && w.services.iter().any(|s| s == service))
            .count();
        let have_n = usize::try_from(have).unwrap_or(usize::MAX);
        if active > have_n {
            warnings.push(format!(
                "service `{service}` has {active} active workers but `{queue}` has {have} \
                 partition{}: {} of them get no calls of it. Give the topic at least {active} \
                 partitions (`?partitions={active}` in the Kafka URL for new topics; the \
                 broker's own tools for an existing one).",
                if have == 1 { "" } else { "s" },
                active - have_n
            ));
        }
    }
    warnings
}

/// `callq status`.
async fn status(settings: &Settings) -> anyhow::Result<StatusReport> {
    let (broker, admin) = open(settings).await?;
    report(&broker, &admin).await
}

/// The broker and the coordinator's admin handle a status reads through.
pub(crate) async fn open(
    settings: &Settings,
) -> anyhow::Result<(std::sync::Arc<dyn callq_broker::Broker>, Admin)> {
    let broker = connect(settings, "status").await?;
    let admin = Admin::connect(broker.clone(), settings.patience()).await?;
    Ok((broker, admin))
}

/// The status, read once through `broker` and `admin`.
pub(crate) async fn report(
    broker: &std::sync::Arc<dyn callq_broker::Broker>,
    admin: &Admin,
) -> anyhow::Result<StatusReport> {
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
    let mut partitions = BTreeMap::new();
    for service in services {
        let queue = call_queue(service);
        match broker.depth(&queue).await {
            Ok(depth) => {
                queues.insert(queue.clone(), depth.ready);
            }
            Err(e) => warn!(%queue, "reading the depth: {e}"),
        }
        // The high band, where it holds anything: most services have none.
        let high = callq_broker::high_queue(service);
        if let Ok(depth) = broker.depth(&high).await
            && depth.ready > 0
        {
            queues.insert(high, depth.ready);
        }
        match broker.partitions(&queue).await {
            Ok(Some(n)) => {
                partitions.insert(queue, n);
            }
            Ok(None) => {}
            Err(e) => warn!(%queue, "reading the partitions: {e}"),
        }
    }
    let warnings = partition_warnings(&cluster, &partitions);
    Ok(StatusReport {
        cluster,
        broker: broker.kind().to_owned(),
        queues,
        partitions,
        warnings,
    })
}

/// The status as a table for people.
pub(crate) fn render_status(report: &StatusReport) -> String {
    use std::fmt::Write as _;
    let c = &report.cluster;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workers {}  agents {}  open calls {}  delayed calls {}  deaths {}  promotions {}",
        c.workers.len(),
        c.agents.len(),
        c.open_calls,
        c.delayed_calls,
        c.deaths,
        c.promotions
    );
    let mut workers = vec![row(&["WORKER", "STATE", "LOAD", "SEEN", "SERVICES"])];
    workers.extend(c.workers.iter().map(|w| {
        vec![
            w.worker_id.clone(),
            w.state.as_str().to_owned(),
            format!("{}/{}", w.capacity.saturating_sub(w.free), w.capacity),
            format!("{}ms", w.last_seen_ms),
            w.services.join(","),
        ]
    }));
    out.push('\n');
    out.push_str(&table(&workers, &[false, false, true, true, false]));
    if !c.standby_per_service.is_empty() {
        let mut standbys = vec![row(&["SERVICE", "STANDBYS", "WANTED"])];
        standbys.extend(c.standby_per_service.iter().map(|(service, wanted)| {
            let have = c
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Standby && w.services.contains(service))
                .count();
            vec![service.clone(), have.to_string(), wanted.to_string()]
        }));
        out.push('\n');
        out.push_str(&table(&standbys, &[false, true, true]));
    }
    // Kafka keeps no ready count: what waits is the consumer group's lag.
    let depth = if report.broker == "kafka" {
        "LAG"
    } else {
        "READY"
    };
    let mut queues = if report.partitions.is_empty() {
        vec![row(&["QUEUE", depth])]
    } else {
        vec![row(&["QUEUE", depth, "PARTITIONS"])]
    };
    queues.extend(report.queues.iter().map(|(queue, ready)| {
        let mut cells = vec![queue.clone(), ready.to_string()];
        if !report.partitions.is_empty() {
            cells.push(
                report
                    .partitions
                    .get(queue)
                    .map_or_else(|| "-".to_owned(), u32::to_string),
            );
        }
        cells
    }));
    out.push('\n');
    out.push_str(&table(&queues, &[false, true, true]));
    for warning in &report.warnings {
        let _ = writeln!(out, "\nwarning: {warning}");
    }
    if !c.agents.is_empty() {
        let _ = writeln!(out, "\nagents: {}", c.agents.join(", "));
    }
    out
}

pub(crate) fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|&c| c.to_owned()).collect()
}

/// Rows as columns as wide as their widest cell, two spaces apart;
/// `right[i]` aligns column `i` to the right. The last column is not padded.
pub(crate) fn table(rows: &[Vec<String>], right: &[bool]) -> String {
    let mut widths = vec![0; right.len()];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            let last = i + 1 == r.len();
            if right.get(i).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if !last {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use callq_schemas::protocol::WorkerStatus;

    use super::*;

    /// A service's high band is listed, and rendered, where it holds calls;
    /// an empty one is left out.
    #[tokio::test]
    async fn the_high_band_is_listed_where_it_holds_calls() {
        let mut cluster = callq_testkit::LocalCluster::start(
            callq_testkit::ClusterOptions::default(),
            callq_coordinator::MemoryStore::default(),
        )
        .await
        .unwrap();
        // A standby serves `echo` and consumes nothing: the calls wait.
        cluster.spawn_worker("sb", &["echo"], true).await.unwrap();
        let admin = cluster.admin().await.unwrap();
        let broker = cluster.broker.clone();
        let high = callq_broker::high_queue("echo");
        let mut listed = None;
        for _ in 0..500 {
            let report = report(&broker, &admin).await.unwrap();
            if report.queues.contains_key(&call_queue("echo")) {
                listed = Some(report);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let empty = listed.expect("the standby's service is listed");
        assert!(!empty.queues.contains_key(&high), "{:?}", empty.queues);
        for _ in 0..3 {
            let mut call = callq_schemas::Call::new("echo", "echo", serde_json::json!(1));
            call.priority = Some(9);
            broker
                .publish(&high, callq_broker::Message::new(call.to_bytes()))
                .await
                .unwrap();
        }
        let report = report(&broker, &admin).await.unwrap();
        assert_eq!(report.queues.get(&high), Some(&3), "{:?}", report.queues);
        assert!(render_status(&report).contains("callq.high.echo"));
        cluster.shutdown().await.unwrap();
    }

    #[test]
    fn the_table_stays_aligned_with_long_worker_ids() {
        let worker = |id: &str, free| WorkerStatus {
            worker_id: id.to_owned(),
            state: WorkerState::Active,
            services: vec!["echo".to_owned(), "mail".to_owned()],
            capacity: 64,
            free,
            last_seen_ms: 12,
            finished: BTreeMap::new(),
        };
        let long = "callq-worker-7d9f8b6c5-x2k4p.cluster.example.internal-0123456789.3";
        let report = StatusReport {
            cluster: ClusterStatus {
                workers: vec![worker("w1", 64), worker(long, 0)],
                ..ClusterStatus::default()
            },
            broker: "amqp".to_owned(),
            queues: BTreeMap::from([("callq.call.echo".to_owned(), 7)]),
            partitions: BTreeMap::new(),
            warnings: Vec::new(),
        };
        let text = render_status(&report);
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("WORKER")).unwrap();
        // Every left-aligned column starts where its heading starts; the
        // right-aligned load ends where its heading ends.
        let start = |l: &str, word: &str| l.find(word).unwrap();
        let end = |l: &str, word: &str| start(l, word) + word.len();
        let head = lines[header];
        for (row, load) in [(lines[header + 1], "0/64"), (lines[header + 2], "64/64")] {
            assert_eq!(start(row, "echo,mail"), start(head, "SERVICES"), "{text}");
            assert_eq!(start(row, "active"), start(head, "STATE"), "{text}");
            assert_eq!(end(row, load), end(head, "LOAD"), "{text}");
        }
        assert!(text.contains("callq.call.echo      7"), "{text}");
    }

    #[test]
    fn more_active_workers_than_partitions_is_a_warning_naming_the_fix() {
        let worker = |id: &str, state, services: &[&str]| WorkerStatus {
            worker_id: id.to_owned(),
            state,
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            capacity: 8,
            free: 8,
            last_seen_ms: 1,
            finished: BTreeMap::new(),
        };
        let cluster = ClusterStatus {
            workers: vec![
                worker("w1", WorkerState::Active, &["echo", "mail"]),
                worker("w2", WorkerState::Active, &["echo"]),
                worker("w3", WorkerState::Active, &["echo"]),
                // Standbys take no calls: they do not count.
                worker("s1", WorkerState::Standby, &["mail"]),
            ],
            ..ClusterStatus::default()
        };
        let partitions = BTreeMap::from([
            ("callq.call.echo".to_owned(), 2),
            ("callq.call.mail".to_owned(), 1),
        ]);
        let warnings = partition_warnings(&cluster, &partitions);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let w = &warnings[0];
        assert!(w.contains("service `echo` has 3 active workers"), "{w}");
        assert!(
            w.contains("`callq.call.echo` has 2 partitions: 1 of them"),
            "{w}"
        );
        assert!(w.contains("?partitions=3"), "{w}");

        let report = StatusReport {
            cluster,
            broker: "kafka".to_owned(),
            queues: BTreeMap::from([
                ("callq.call.echo".to_owned(), 4),
                ("callq.call.mail".to_owned(), 0),
            ]),
            partitions,
            warnings,
        };
        let text = render_status(&report);
        assert!(text.contains("PARTITIONS"), "{text}");
        assert!(text.contains("warning: service `echo`"), "{text}");
        // Enough partitions: no warning.
        let enough = BTreeMap::from([("callq.call.echo".to_owned(), 3)]);
        assert!(partition_warnings(&report.cluster, &enough).is_empty());
    }
}
