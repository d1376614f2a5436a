//! `callq demo`: an in-process cluster on the embedded broker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use callq_broker::Broker;
use callq_broker_embedded::EmbeddedBroker;
use callq_node::{Client, ClientOptions, Worker, WorkerOptions, WorkerStats, services};
use callq_schemas::Outcome;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::load::{self, LoadReport, LoadSpec};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Worker count.
    pub workers: usize,
    /// Calls each worker runs at once.
    pub capacity: u16,
    /// Calls in all.
    pub calls: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Print a progress line.
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            workers: 3,
            capacity: 64,
            calls: 10_000,
            concurrency: 256,
            progress: true,
        }
    }
}

/// What the demo saw.
#[derive(Debug)]
pub struct DemoReport {
    /// The load's figures.
    pub load: LoadReport,
    /// Calls each worker answered, by worker id.
    pub per_worker: Vec<(String, u64)>,
}

impl DemoReport {
    /// Whether every call ended `ok`.
    pub fn all_ok(&self) -> bool {
        self.load.failed == 0 && self.load.count(Outcome::Ok) == self.load.latency.len()
    }
}

/// Runs the demo and prints what happened to stdout.
pub async fn run(opts: &DemoOptions) -> anyhow::Result<DemoReport> {
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new());
    let shutdown = CancellationToken::new();
    let mut workers = JoinSet::new();
    let mut stats: Vec<(String, Arc<WorkerStats>)> = Vec::new();
    for i in 1..=opts.workers {
        let worker = Worker::new(
            WorkerOptions {
                worker_id: format!("worker-{i}"),
                capacity: opts.capacity,
                drain_timeout: Duration::from_secs(10),
                coordinated: false,
                ..WorkerOptions::default()
            },
            broker.clone(),
        )
        .service(services::echo());
        worker.declare().await?;
        stats.push((worker.id().to_owned(), worker.stats()));
        workers.spawn(worker.run(shutdown.clone()));
    }
    println!(
        "callq demo: {} workers (capacity {} each) on the embedded broker; {} calls of echo.echo, {} in flight",
        opts.workers, opts.capacity, opts.calls, opts.concurrency
    );

    let client = Client::connect(broker.clone(), ClientOptions::default()).await?;
    let spec = LoadSpec {
        service: "echo".into(),
        method: "echo".into(),
        args: json!({"hello": "callq", "n": 42}),
        calls: opts.calls,
        concurrency: opts.concurrency,
        timeout: Duration::from_secs(30),
        progress: opts.progress,
    };
    let report = load::run(&client, &spec).await;

    shutdown.cancel();
    while let Some(ended) = workers.join_next().await {
        ended??;
    }
    let per_worker = stats
        .iter()
        .map(|(id, s)| (id.clone(), s.ok.load(Ordering::Relaxed)))
        .collect::<Vec<_>>();

    println!("{}", report.summary());
    let outcomes = report
        .outcomes
        .iter()
        .map(|(o, n)| format!("{o} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("outcomes: {outcomes}; not published: {}", report.failed);
    for (id, n) in &per_worker {
        println!("  {id}: {n} calls");
    }
    Ok(DemoReport {
        load: report,
        per_worker,
    })
}
