//! `callq capture --service S`: which tap the configured broker offers,
//! and the range of a Kafka topic to read.

use anyhow::Context as _;
use callq_broker::{Tap, TapEvent, call_queue};
use callq_broker_amqp::AmqpBroker;
use callq_broker_kafka::{KafkaBroker, TapFrom, TapRange};

/// Copies bounded in the tap's queue.
const TAP_BOUND: usize = 100_000;

/// Reads `--from` and `--until`: `None` when neither is given.
pub fn parse_range(from: Option<&str>, until: Option<&str>) -> anyhow::Result<Option<TapRange>> {
    let time = |t: &str, what: &str| -> anyhow::Result<i64> {
        let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .with_context(|| {
                format!("{what} takes an RFC 3339 time such as 2026-11-22T10:00:00Z, not `{t}`")
            })?;
        Ok(i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
    };
    let Some(from) = from else {
        anyhow::ensure!(until.is_none(), "--until needs --from");
        return Ok(None);
    };
    let from = match from {
        "end" => TapFrom::End,
        "beginning" => TapFrom::Beginning,
        other => match other.strip_prefix("offset:") {
            Some(n) => TapFrom::Offset(
                n.parse()
                    .with_context(|| format!("--from offset:N takes a whole number, not `{n}`"))?,
            ),
            None => TapFrom::Time(time(other, "--from")?),
        },
    };
    let until_ms = until.map(|u| time(u, "--until")).transpose()?;
    anyhow::ensure!(
        until_ms.is_none() || from != TapFrom::End,
        "--until needs a --from in the past"
    );
    Ok(Some(TapRange { from, until_ms }))
}

/// Opens the tap `settings.broker` offers: RabbitMQ's firehose tracer, a
/// Kafka consumer group of its own over `range`, or (for tests and the
/// demo) an embedded broker's own tap.
pub async fn open_tap(
    broker_url: &str,
    service: &str,
    range: Option<TapRange>,
) -> anyhow::Result<Box<dyn Tap>> {
    if broker_url.starts_with("amqp://") || broker_url.starts_with("amqps://") {
        anyhow::ensure!(
            range.is_none(),
            "--from and --until read a range of a Kafka topic; RabbitMQ's queues keep no history to read"
        );
        let broker = AmqpBroker::connect(broker_url)
            .await
            .context("connecting to RabbitMQ")?;
        let tap = broker
            .tap(TAP_BOUND)
            .await
            .context("opening a tap on RabbitMQ's firehose tracer")?;
        // The tap holds its own channel; the connection lives as long.
        Ok(Box::new(Holding(tap, broker)))
    } else if broker_url.starts_with("kafka://") {
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
    } else {
        anyhow::bail!(
            "capture reads RabbitMQ (amqp://) or Kafka (kafka://), not `{broker_url}`; \
             an embedded broker is tapped in its own process (EmbeddedBroker::tap)"
        )
    }
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
