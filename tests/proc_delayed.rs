//! Delayed calls (`not_before`) on every broker: the scenario of
//! `support::delayed` against a coordinator and a worker process on
//! RabbitMQ and on Kafka, and in-process on the embedded broker.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::sync::atomic::Ordering::Relaxed;

use support::delayed::{CAPACITY, scenario};
use support::{SmallCluster, Vhost};

async fn on_processes(url: &str, broker: std::sync::Arc<dyn callq_broker::Broker>, tag: &str) {
    let dir = support::temp_dir(tag);
    let mut cluster = SmallCluster::start(url, broker, &dir, &["dw1"], CAPACITY).await;
    scenario(&cluster.client, &cluster.admin, &dir).await;
    cluster.logs_of_live_workers();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_calls_run_on_time_on_rabbitmq() {
    let vhost = Vhost::create("delayed");
    on_processes(
        &vhost.url,
        support::amqp(&vhost.url).await,
        "delayed-rabbit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_calls_run_on_time_on_kafka() {
    let url = support::kafka_url("kdelayed", 1);
    on_processes(&url, support::kafka(&url).await, "delayed-kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_calls_run_on_time_on_the_embedded_broker() {
    let dir = support::temp_dir("delayed-embedded");
    let (cluster, admin, client) = support::small_local_cluster(&["dw1"], CAPACITY).await;
    scenario(&client, &admin, &dir).await;
    let stats = cluster.stats("dw1").unwrap();
    assert_eq!(stats.deferred.load(Relaxed), 3, "three calls came early");
    cluster.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
