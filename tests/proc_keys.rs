//! Per-key concurrency limits on every broker: the scenario of
//! `support::keys` against a coordinator and three worker processes on
//! RabbitMQ and on Kafka, and in-process on the embedded broker.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::sync::atomic::Ordering::Relaxed;

use support::keys::{CAPACITY, KEYS, scenario};
use support::{SmallCluster, Vhost};

const WORKERS: [&str; 3] = ["kw1", "kw2", "kw3"];

/// Calls of different keys that must have run at once, at least.
const MANY: usize = 4;

async fn on_processes(url: &str, broker: std::sync::Arc<dyn callq_broker::Broker>, tag: &str) {
    let dir = support::temp_dir(tag);
    let env = [("CALLQ_WORKER__MAX_RUNNING_PER_KEY__ECHO", "1")];
    let mut cluster = SmallCluster::start_env(url, broker, &dir, (&WORKERS, CAPACITY), &env).await;
    let (most, pids) = scenario(&cluster.client).await;
    assert!(
        (MANY..=KEYS).contains(&most),
        "{most} calls ran at once at most: expected between {MANY} and {KEYS}"
    );
    assert_eq!(pids.len(), WORKERS.len(), "the calls ran in {pids:?}");
    cluster.logs_of_live_workers();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_never_overlap_per_key_on_rabbitmq() {
    let vhost = Vhost::create("keys");
    on_processes(&vhost.url, support::amqp(&vhost.url).await, "keys-rabbit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_never_overlap_per_key_on_kafka() {
    let url = support::kafka_url("kkeys", WORKERS.len());
    on_processes(&url, support::kafka(&url).await, "keys-kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_never_overlap_per_key_on_the_embedded_broker() {
    let opts = callq_testkit::ClusterOptions {
        capacity: u16::try_from(CAPACITY).unwrap(),
        max_running_per_key: [("echo".to_owned(), 1)].into(),
        ..callq_testkit::ClusterOptions::default()
    };
    let mut cluster =
        callq_testkit::LocalCluster::start(opts, callq_coordinator::MemoryStore::default())
            .await
            .unwrap();
    for id in WORKERS {
        cluster.spawn_worker(id, &["echo"], false).await.unwrap();
    }
    let client = cluster.client().await.unwrap();
    let (most, _) = scenario(&client).await;
    assert!(
        (MANY..=KEYS).contains(&most),
        "{most} calls ran at once at most: expected between {MANY} and {KEYS}"
    );
    let waited: u64 = WORKERS
        .iter()
        .map(|id| cluster.stats(id).unwrap().waited.load(Relaxed))
        .sum();
    assert!(waited > 0, "no call waited for a place of its key");
    cluster.shutdown().await.unwrap();
}
