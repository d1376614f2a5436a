//! A burst of publishes ten times the adapter's bound on unconfirmed
//! publishes, into a call queue a consumer drains at the same time: every
//! publish is confirmed and every message delivered once.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{Broker, Disposition, Message, QueueSpec};
use callq_broker_amqp::AmqpBroker;
use futures::StreamExt;

fn url() -> String {
    std::env::var("CALLQ_AMQP_URL").unwrap_or_else(|_| callq_broker_amqp::DEFAULT_URL.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_publishes_is_confirmed_and_delivered_once() {
    let broker = Arc::new(AmqpBroker::connect(&url()).await.unwrap());
    let spec = QueueSpec::calls(&format!("burst-{}", uuid_like()));
    let queue = spec.name.clone();
    broker.declare(&spec).await.unwrap();
    let n: usize = 5_000;
    let mut consumer = broker.consume(&queue, 256).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut seen = HashSet::new();
        while seen.len() < n {
            let d = consumer.next().await.unwrap().unwrap();
            assert!(seen.insert(d.body.clone()), "delivered twice: {d:?}");
            d.settle(Disposition::Ack).await.unwrap();
        }
        seen.len()
    });
    let failed: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let (broker, queue) = (broker.clone(), queue.clone());
            async move { broker.publish(&queue, Message::new(i.to_string())).await }
        })
        .buffer_unordered(n)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    assert!(
        failed.is_empty(),
        "{} publishes failed, first: {:?}",
        failed.len(),
        failed[0]
    );
    let delivered = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("every message delivered within 30 s")
        .unwrap();
    assert_eq!(delivered, n);
}

/// A name no earlier run used.
fn uuid_like() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}-{}", std::process::id(), t.as_nanos())
}
