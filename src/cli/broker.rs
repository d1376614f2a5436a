//! From a broker URL to its adapter: `amqp://` is RabbitMQ, `kafka://` is
//! Kafka.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use callq_broker::{Broker, Tap, TapEvent, call_queue};
use callq_broker_amqp::AmqpBroker;
use callq_broker_kafka::{KafkaBroker, TapFrom};
use tracing::info;

use super::config::Settings;

pub(crate) use callq_broker_kafka::TapRange;

/// The URL used when none is configured: a RabbitMQ on this machine.
pub(crate) const DEFAULT_URL: &str = callq_broker_amqp::DEFAULT_URL;

/// Copies bounded in the tap's queue.
const TAP_BOUND: usize = 100_000;

/// Connects to the configured broker; `role` names the connection.
pub(crate) async fn connect(settings: &Settings, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let url = settings.broker.trim();
    if url == "embedded" {
        bail!(
            "the embedded broker lives inside one process: run `callq demo`, or set \
             CALLQ_BROKER=amqp://user:password@host:5672/%2f for a cluster of processes"
        );
    }
    if url.starts_with("kafka://") {
        return connect_kafka(url, role).await;
    }
    if !url.starts_with("amqp://") {
        bail!(
            "unsupported broker `{url}`: callq speaks amqp:// (RabbitMQ; TLS is not supported yet) \
             and kafka://host:port (Kafka)"
        );
    }
    connect_amqp(url, role).await
}

async fn connect_kafka(url: &str, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let mut opts = callq_broker_kafka::Options::from_url(url)
        .with_context(|| format!("reading the Kafka URL `{url}`"))?;
    if opts.client_id == callq_broker_kafka::Options::default().client_id {
        opts.client_id = format!("callq-{}", role.replace(' ', "-"));
    }
    let broker = KafkaBroker::connect_with(opts)
        .await
        .with_context(|| format!("connecting the {role} to the broker"))?;
    info!(role, at = url, "connected to Kafka");
    Ok(Arc::new(broker))
}

async fn connect_amqp(url: &str, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let opts = callq_broker_amqp::Options {
        url: url.to_owned(),
        name: format!("callq {role}"),
        ..callq_broker_amqp::Options::default()
    };
    let broker = AmqpBroker::connect_with(opts)
        .await
        .with_context(|| format!("connecting the {role} to the broker"))?;
    info!(role, at = %broker.place(), "connected to RabbitMQ");
    Ok(Arc::new(broker))
}

/// Opens the tap `broker_url` offers: RabbitMQ's firehose tracer, or a
/// Kafka consumer group of its own over `range`. (An embedded broker is
/// tapped in its own process.)
pub(crate) async fn open_tap(
    broker_url: &str,
    service: &str,
    range: Option<TapRange>,
) -> anyhow::Result<Box<dyn Tap>> {
    if broker_url.starts_with("amqp://") || broker_url.starts_with("amqps://") {
        anyhow::ensure!(
            range.is_none(),
            "--from and --until read a range of a Kafka topic; RabbitMQ's queues keep no history to read"
        );
        amqp_tap(broker_url).await
    } else if broker_url.starts_with("kafka://") {
        kafka_tap(broker_url, service, range).await
    } else {
        anyhow::bail!(
            "capture reads RabbitMQ (amqp://) or Kafka (kafka://), not `{broker_url}`; \
             an embedded broker is tapped in its own process (EmbeddedBroker::tap)"
        )
    }
}

async fn amqp_tap(broker_url: &str) -> anyhow::Result<Box<dyn Tap>> {
    let broker = AmqpBroker::connect(broker_url)
        .await
        .context("connecting to RabbitMQ")?;
    let tap = broker
        .tap(TAP_BOUND)
        .await
        .context("opening a tap on RabbitMQ's firehose tracer")?;
    // The tap holds its own channel; the connection lives as long.
    Ok(Box::new(Holding(tap, broker)))
}

async fn kafka_tap(
    broker_url: &str,
    service: &str,
    range: Option<TapRange>,
) -> anyhow::Result<Box<dyn Tap>> {
    let broker = KafkaBroker::connect(broker_url)
        .await
        .context("connecting to Kafka")?;
    let range = range.unwrap_or(TapRange {
        from: TapFrom::End,
        until_ms: None,
    });
    let tap = broker
        .tap(&call_queue(service), range, TAP_BOUND)
        .await
        .with_context(|| format!("opening a tap on the topic of {}", call_queue(service)))?;
    Ok(Box::new(Holding(tap, broker)))
}

/// A tap and the broker connection it lives on.
struct Holding<T, B>(T, B);

#[async_trait::async_trait]
impl<T: Tap, B: Send> Tap for Holding<T, B> {
    async fn next(&mut self) -> Option<Result<TapEvent, callq_broker::Error>> {
        self.0.next().await
    }
    fn follow(&mut self, queue: &str, since_ms: Option<i64>) {
        self.0.follow(queue, since_ms);
    }
}
