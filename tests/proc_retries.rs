//! Retries of a handler's retryable errors on every broker: the scenario
//! of `support::retries` against a coordinator and a worker process on
//! RabbitMQ and on Kafka, and in-process on the embedded broker.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::sync::atomic::Ordering::Relaxed;

use support::retries::{CAPACITY, scenario};
use support::{SmallCluster, Vhost};

async fn on_processes(url: &str, broker: std::sync::Arc<dyn callq_broker::Broker>, tag: &str) {
    let dir = support::temp_dir(tag);
    let mut cluster = SmallCluster::start(url, broker, &dir, &["rw1"], CAPACITY).await;
    scenario(&cluster.client, &cluster.admin).await;
    cluster.logs_of_live_workers();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_on_rabbitmq() {
    let vhost = Vhost::create("retries");
    on_processes(
        &vhost.url,
        support::amqp(&vhost.url).await,
        "retries-rabbit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_on_kafka() {
    let url = support::kafka_url("kretries", 1);
    on_processes(&url, support::kafka(&url).await, "retries-kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_on_the_embedded_broker() {
    let (cluster, admin, client) = support::small_local_cluster(&["rw1"], CAPACITY).await;
    scenario(&client, &admin).await;
    // Retried: two of the third, two of the failing, one of the told call.
    let stats = cluster.stats("rw1").unwrap();
    assert_eq!(stats.retried.load(Relaxed), 5);
    cluster.shutdown().await.unwrap();
}
