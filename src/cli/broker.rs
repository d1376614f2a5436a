//! From a broker URL to its adapter: `amqp://` is RabbitMQ (the `amqp`
//! feature), `kafka://` is Kafka (the `kafka` feature); `amqps://` and
//! `kafkas://` are the same over TLS. A URL whose adapter this callq was
//! built without is refused, naming the feature.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};

use anyhow::Context as _;
use anyhow::bail;
#[cfg(any(feature = "amqp", feature = "kafka"))]
use callq_broker::TapEvent;
#[cfg(feature = "kafka")]
use callq_broker::call_queue;
use callq_broker::{Broker, Tap};
#[cfg(feature = "amqp")]
use callq_broker_amqp::AmqpBroker;
#[cfg(feature = "kafka")]
use callq_broker_kafka::{KafkaBroker, TapFrom};
use callq_broker_signed::{ClusterKey, Signed};
#[cfg(any(feature = "amqp", feature = "kafka"))]
use tracing::info;

use super::config::Settings;

/// A range of a Kafka topic to capture.
#[cfg(feature = "kafka")]
pub(crate) use callq_broker_kafka::TapRange;

/// A range of a Kafka topic to capture: none without Kafka.
#[cfg(not(feature = "kafka"))]
pub(crate) enum TapRange {}

/// The URL used when none is configured: a RabbitMQ on this machine.
#[cfg(feature = "amqp")]
pub(crate) const DEFAULT_URL: &str = callq_broker_amqp::DEFAULT_URL;
/// The URL used when none is configured: a RabbitMQ on this machine.
#[cfg(not(feature = "amqp"))]
pub(crate) const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Why a `kafka://` or `kafkas://` URL is refused by a callq built without
/// Kafka.
#[cfg(not(feature = "kafka"))]
pub(crate) const WITHOUT_KAFKA: &str =
    "this callq was built without Kafka support: rebuild with --features kafka";

/// Why an `amqp://` URL is refused by a callq built without RabbitMQ.
#[cfg(not(feature = "amqp"))]
const WITHOUT_AMQP: &str =
    "this callq was built without RabbitMQ (AMQP) support: rebuild with --features amqp";

/// Copies bounded in the tap's queue.
#[cfg(any(feature = "amqp", feature = "kafka"))]
const TAP_BOUND: usize = 100_000;

/// Control messages this process dropped because the cluster key did not
/// sign them (the coordinator reports it in its status).
pub(crate) static UNAUTHENTICATED: LazyLock<Arc<AtomicU64>> = LazyLock::new(Arc::default);

/// Connects to the configured broker; `role` names the connection. With a
/// cluster key, the control path is signed and checked
/// (`callq_broker_signed`).
pub(crate) async fn connect(settings: &Settings, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let key = match &settings.cluster_key_file {
        Some(path) => Some(
            ClusterKey::from_file(path)
                .context("the cluster key (cluster_key_file, CALLQ_CLUSTER_KEY_FILE)")?,
        ),
        None => None,
    };
    let broker = connect_plain(settings, role).await?;
    let serves = ["coordinator", "worker", "agent"];
    if key.is_none() && serves.iter().any(|r| role.starts_with(r)) {
        tracing::warn!(
            role,
            "control messages are not authenticated: any client that can publish to callq.coordinator \
             could forge them; set CALLQ_CLUSTER_KEY_FILE (docs/SECURITY.md)"
        );
    }
    Ok(match key {
        Some(key) => Arc::new(Signed::new(broker, key).counting(UNAUTHENTICATED.clone())),
        None => broker,
    })
}

async fn connect_plain(settings: &Settings, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let url = settings.broker.trim();
    if url == "embedded" {
        bail!(
            "the embedded broker lives inside one process: run `callq demo`, or set \
             CALLQ_BROKER=amqp://user:password@host:5672/%2f for a cluster of processes"
        );
    }
    if is_kafka(url) {
        return connect_kafka(url, role).await;
    }
    if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
        bail!(
            "unsupported broker `{url}`: callq speaks amqp:// and amqps:// (RabbitMQ, amqps over \
             TLS) and kafka://host:port and kafkas://host:port (Kafka, kafkas over TLS)"
        );
    }
    connect_amqp(url, role).await.map_err(|e| {
        if cfg!(not(feature = "amqp")) {
            // Refused for the missing feature: that says all.
            e
        } else if format!("{e:#}").contains("Connection refused") {
            e.context(
                "nothing listens there: start RabbitMQ, or point CALLQ_BROKER (or `broker` in the \
                 configuration file) at it, e.g. amqp://user:password@host:5672/%2f",
            )
        } else if url.starts_with("amqp://") {
            e.context(
                "if the broker only takes TLS on that port, use amqps:// (the CA in SSL_CERT_FILE \
                 when it is not a system one)",
            )
        } else {
            e.context(
                "over TLS: the broker's certificate must name the URL's host and chain to a CA \
                 the system trusts, the file SSL_CERT_FILE names or the URL's cacertfile=; a \
                 broker that asks for a client certificate needs certfile=...&keyfile=... in \
                 the URL",
            )
        }
    })
}

/// Whether `url` names a Kafka cluster (plain or over TLS).
fn is_kafka(url: &str) -> bool {
    url.starts_with("kafka://") || url.starts_with("kafkas://")
}

#[cfg(feature = "kafka")]
async fn connect_kafka(url: &str, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let mut opts = callq_broker_kafka::Options::from_url(url)
        .with_context(|| format!("reading the Kafka URL `{url}`"))?;
    if opts.client_id == callq_broker_kafka::Options::default().client_id {
        opts.client_id = format!("callq-{}", role.replace(' ', "-"));
    }
    let tls = opts.tls;
    let broker = KafkaBroker::connect_with(opts).await.map_err(|e| {
        // No broker answered: say what to check (a refused setting says it).
        let unanswered = matches!(
            e,
            callq_broker::Error::Connection(_) | callq_broker::Error::Timeout(_)
        );
        // librdkafka's "SSL handshake failed: ... certificate verify failed"
        // or "... certificate verify failed (after 1ms in state
        // SSL_HANDSHAKE)" (the wording depends on when it fails), or "...
        // alert certificate required" from a broker that wants a client
        // certificate.
        let text = e.to_string().to_ascii_lowercase();
        let handshake = ["ssl handshake", "ssl_handshake", "certificate"]
            .iter()
            .any(|needle| text.contains(needle));
        let hint = match (unanswered, tls) {
            (true, false) => Some(
                "if the brokers only take TLS on that port, use kafkas:// (the CA in \
                 SSL_CERT_FILE when it is not a system one)",
            ),
            (true, true) if handshake => Some(
                "over TLS: each broker's certificate must name the host it is reached by (the \
                 URL's, and those the cluster advertises) and chain to a CA the system trusts \
                 or the file SSL_CERT_FILE names; brokers that ask for a client certificate \
                 need ssl.certificate.location=...&ssl.key.location=... in the URL",
            ),
            _ => None,
        };
        let e = anyhow::Error::new(e).context(format!("connecting the {role} to the broker"));
        match hint {
            Some(hint) => e.context(hint),
            None => e,
        }
    })?;
    info!(role, at = url, "connected to Kafka");
    Ok(Arc::new(broker))
}

#[cfg(not(feature = "kafka"))]
async fn connect_kafka(_url: &str, _role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    bail!(WITHOUT_KAFKA)
}

#[cfg(feature = "amqp")]
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
    } else if is_kafka(broker_url) {
        kafka_tap(broker_url, service, range).await
    } else {
        anyhow::bail!(
            "capture reads RabbitMQ (amqp://, amqps://) or Kafka (kafka://, kafkas://), not `{broker_url}`; \
             an embedded broker is tapped in its own process (EmbeddedBroker::tap)"
        )
    }
}

#[cfg(not(feature = "amqp"))]
async fn connect_amqp(_url: &str, _role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    bail!(WITHOUT_AMQP)
}

#[cfg(feature = "amqp")]
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

#[cfg(not(feature = "amqp"))]
async fn amqp_tap(_broker_url: &str) -> anyhow::Result<Box<dyn Tap>> {
    bail!(WITHOUT_AMQP)
}

#[cfg(feature = "kafka")]
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

#[cfg(not(feature = "kafka"))]
async fn kafka_tap(
    _broker_url: &str,
    _service: &str,
    _range: Option<TapRange>,
) -> anyhow::Result<Box<dyn Tap>> {
    bail!(WITHOUT_KAFKA)
}

/// A tap and the broker connection it lives on.
#[cfg(any(feature = "amqp", feature = "kafka"))]
struct Holding<T, B>(T, B);

#[cfg(any(feature = "amqp", feature = "kafka"))]
#[async_trait::async_trait]
impl<T: Tap, B: Send> Tap for Holding<T, B> {
    async fn next(&mut self) -> Option<Result<TapEvent, callq_broker::Error>> {
        self.0.next().await
    }
    fn follow(&mut self, queue: &str, since_ms: Option<i64>) {
        self.0.follow(queue, since_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why connecting to `url` fails at once.
    async fn refused(url: &str) -> String {
        let settings = Settings {
            broker: url.into(),
            ..Settings::default()
        };
        match connect(&settings, "test").await {
            Ok(_) => panic!("{url}: connected"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[tokio::test]
    async fn the_embedded_broker_and_unknown_schemes_are_refused() {
        assert!(refused("embedded").await.contains("callq demo"));
        assert!(
            refused("mqtt://h:1883")
                .await
                .starts_with("unsupported broker")
        );
    }

    #[cfg(feature = "kafka")]
    #[tokio::test]
    async fn kafkas_urls_go_to_the_kafka_adapter() {
        let why = refused("kafkas://user@h:1").await;
        assert!(why.starts_with("reading the Kafka URL"), "{why}");
        assert!(why.contains("kafkas://host:port"), "{why}");
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn the_default_url_is_the_one_a_build_without_rabbitmq_shows() {
        assert_eq!(DEFAULT_URL, "amqp://guest:guest@127.0.0.1:5672/%2f");
    }

    #[cfg(not(feature = "kafka"))]
    #[tokio::test]
    async fn without_kafka_a_kafka_url_names_the_feature() {
        assert_eq!(refused("kafka://127.0.0.1:9092").await, WITHOUT_KAFKA);
        assert_eq!(refused("kafkas://localhost:9093").await, WITHOUT_KAFKA);
        let Err(e) = open_tap("kafka://127.0.0.1:9092", "echo", None).await else {
            panic!("a tap without Kafka");
        };
        assert_eq!(e.to_string(), WITHOUT_KAFKA);
    }

    #[cfg(not(feature = "amqp"))]
    #[tokio::test]
    async fn without_amqp_an_amqp_url_names_the_feature() {
        assert_eq!(refused(DEFAULT_URL).await, WITHOUT_AMQP);
    }
}
