//! The cluster as separate processes on a Kafka-protocol broker: `callq
//! coordinator` and `callq worker` processes, killed with SIGKILL mid-load.
//!
//! Needs the broker that `CALLQ_KAFKA_URL` names (`scripts/kafka` starts
//! tansu; `scripts/test` does). Without it the tests fail; they never skip.
//! Each test keeps its topics and consumer groups apart with prefixes of
//! its own, as the RabbitMQ tests keep theirs in a virtual host.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use callq::chaos;
use callq_node::{Admin, Client, ClientOptions};
use callq_schemas::protocol::WorkerState;
use support::{Proc, Workers, count, load, wait_status};

/// Partitions of each call topic: one per worker, so that every worker
/// owns one.
const PARTITIONS: usize = 3;

/// A broker URL of the test's own: `CALLQ_KAFKA_URL` with topics and groups
/// prefixed, `PARTITIONS` partitions per topic, and short group sessions
/// (tansu accepts them; they bound how long a killed worker's partitions
/// wait for the rebalance, which the failover must not wait for anyway).
fn cluster_url(tag: &str) -> String {
    let base = std::env::var("CALLQ_KAFKA_URL")
        .expect("CALLQ_KAFKA_URL is not set: run `source scripts/kafka` (scripts/test does)");
    let sep = if base.contains('?') { '&' } else { '?' };
    let run = uuid::Uuid::now_v7().simple();
    format!(
        "{base}{sep}partitions={PARTITIONS}&session_timeout_ms=2000&fetch_wait_ms=10\
         &topic_prefix={tag}-{run}.&group_prefix={tag}-{run}."
    )
}

async fn kafka(url: &str) -> Arc<dyn callq_broker::Broker> {
    Arc::new(
        callq_broker_kafka::KafkaBroker::connect(url)
            .await
            .unwrap_or_else(|e| panic!("Kafka at {url}: {e}")),
    )
}

/// A coordinator and three workers on Kafka; 5,000 calls of `echo.sleep`
/// and `mail.send` in flight; two workers killed with SIGKILL mid-load.
/// The dead workers' calls are answered within our own failure detection,
/// not the broker's rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_killed_mid_load_on_kafka_lose_no_call() {
    let url = cluster_url("kkill");
    let dir = support::temp_dir("kafka-kill");
    eprintln!("broker {url}, process logs in {}", dir.display());
    let mut coordinator = Proc::spawn("coordinator", &["coordinator"], &url, &dir);
    let mut procs = HashMap::new();
    for id in ["kw1", "kw2", "kw3"] {
        procs.insert(id.to_owned(), support::worker(id, &url, &dir, false));
    }
    let broker = kafka(&url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    // Every worker owns a partition of each call topic: the group has
    // settled.
    wait_status(
        &admin,
        "3 active workers, each owning partitions",
        Duration::from_secs(60),
        |s| count(s, WorkerState::Active) == 3,
    )
    .await;
    let client = Client::connect(broker.clone(), ClientOptions::default())
        .await
        .unwrap();
    // Warm up: the client's reply topic and group, and every partition.
    let warm = chaos::drive(
        &load(&dir, 30, 0),
        &client,
        &admin,
        &mut Workers {
            procs: HashMap::new(),
            admin: Admin::connect(kafka(&url).await, Duration::from_secs(30))
                .await
                .unwrap(),
            spare: &[],
        },
    )
    .await
    .unwrap();
    assert_eq!(warm.violations(), Vec::<String>::new());

    let mut spec = load(&dir, 5_000, 2);
    // Longer calls than on RabbitMQ, and kills further apart: the load
    // lasts past both kills, and the group settles between them.
    spec.work = Duration::from_millis(150);
    spec.kill_every = Duration::from_millis(1_500);
    let mut fleet = Workers {
        procs,
        admin: Admin::connect(kafka(&url).await, Duration::from_secs(30))
            .await
            .unwrap(),
        spare: &[],
    };
    let report = chaos::drive(&spec, &client, &admin, &mut fleet)
        .await
        .unwrap();
    report.print();

    assert_eq!(report.violations(), Vec::<String>::new());
    assert_eq!(report.ended.len(), 5_000, "every call ended");
    assert_eq!(report.kills.len(), 2, "two workers were killed mid-load");
    assert!(
        report.deaths >= 2,
        "the coordinator saw {} deaths",
        report.deaths
    );
    assert!(
        report.retried_ok() + report.fatal().len() > 0,
        "no call was on a killed worker: the kills proved nothing"
    );
    let pauses = report.failover_pauses();
    for (worker, pause) in &pauses {
        eprintln!(
            "failover pause after killing {worker}: {:.0} ms",
            pause.as_secs_f64() * 1000.0
        );
    }
    assert!(!pauses.is_empty(), "no reply of a call on a killed worker");
    for (worker, pause) in &pauses {
        assert!(
            *pause <= Duration::from_secs(2),
            "the failover after killing {worker} took {pause:?}: longer than our own failure \
             detection allows; it waited for the broker's rebalance"
        );
    }
    assert!(coordinator.running(), "{}", coordinator.log());
    for proc in fleet.procs.values_mut() {
        assert!(proc.running(), "{} died:\n{}", proc.name, proc.log());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
