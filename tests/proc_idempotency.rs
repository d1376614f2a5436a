//! Idempotency keys on every broker: the scenario of
//! `support::idempotency` against a coordinator and two worker processes
//! on RabbitMQ and on Kafka, and in-process on the embedded broker. Where
//! the broker hands the second call to the other worker (RabbitMQ and the
//! embedded broker: the first worker has no room), the test checks that
//! the other worker took it and ran nothing. On Kafka the call's partition
//! decides which worker gets it; the outcome is checked either way.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use support::idempotency::{CAPACITY, scenario};
use support::{SmallCluster, Vhost};

/// Runs the scenario on processes; returns the second call's id and the
/// two workers' logs.
async fn on_processes(
    url: &str,
    broker: std::sync::Arc<dyn callq_broker::Broker>,
    dir: &Path,
) -> (callq_schemas::Uuid, Vec<String>) {
    let mut cluster = SmallCluster::start(url, broker, dir, &["iw1", "iw2"], CAPACITY).await;
    let second = scenario(&cluster.client, &cluster.admin, dir, || {}).await;
    (second, cluster.logs_of_live_workers())
}

/// The log lines of a worker that followed `call` rather than run it.
fn followed(log: &str, call: callq_schemas::Uuid) -> bool {
    log.lines()
        .any(|l| l.contains("follows the call") && l.contains(&call.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_key_runs_nothing_on_rabbitmq() {
    let vhost = Vhost::create("idem");
    let dir = support::temp_dir("idem-rabbit");
    let (second, logs) = on_processes(&vhost.url, support::amqp(&vhost.url).await, &dir).await;
    let by: Vec<bool> = logs.iter().map(|l| followed(l, second)).collect();
    assert_eq!(
        by.iter().filter(|f| **f).count(),
        1,
        "one worker followed the second call: {by:?}"
    );
    // A worker follows only while the first call is open, and the one
    // that ran it had no room for another (capacity 1, prefetch 1): the
    // follower is the other worker.
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_key_runs_nothing_on_kafka() {
    let url = support::kafka_url("kidem", 2);
    let dir = support::temp_dir("idem-kafka");
    let (second, logs) = on_processes(&url, support::kafka(&url).await, &dir).await;
    eprintln!(
        "the second call was followed by worker {:?}",
        logs.iter().position(|l| followed(l, second))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_key_runs_nothing_on_the_embedded_broker() {
    let dir = support::temp_dir("idem-embedded");
    let (cluster, admin, client) = support::small_local_cluster(&["iw1", "iw2"], CAPACITY).await;
    let stats = [cluster.stats("iw1").unwrap(), cluster.stats("iw2").unwrap()];
    scenario(&client, &admin, &dir, || {
        // One worker ran the first call; the other took the second, ran
        // nothing, and acked it to follow the first.
        let ran: Vec<u64> = stats.iter().map(|s| s.ok.load(Relaxed)).collect();
        let dropped: Vec<u64> = stats.iter().map(|s| s.dropped.load(Relaxed)).collect();
        let mut sorted = ran.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1], "ran {ran:?}");
        let runner = ran.iter().position(|n| *n == 1).unwrap();
        assert_eq!(
            dropped[1 - runner],
            1,
            "the other worker followed: {dropped:?}"
        );
        assert_eq!(dropped[runner], 0, "{dropped:?}");
    })
    .await;
    cluster.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
