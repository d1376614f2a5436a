//! A tap on every message published in the broker's virtual host, through
//! RabbitMQ's firehose tracer, for `callq capture`: it takes nothing away
//! from any queue's consumers.
//!
//! The tracer must be on for the virtual host (`rabbitmqctl trace_on -p
//! VHOST`); it then copies every published message to the exchange
//! `amq.rabbitmq.trace`, with routing key `publish.<exchange>` and the
//! original's exchange, routing keys and properties in its headers. The
//! tap binds a queue of its own to it: exclusive (it goes with the tap),
//! bounded (`x-max-length`: when the tap falls that far behind, the oldest
//! copies are dropped and the capture misses them, never the workers).

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::mpsc;

use crate::{AmqpBroker, text_of};
use async_trait::async_trait;
use callq_broker::{Bytes, Error, Headers, Tap, TapEvent, Tapped};

/// The exchange RabbitMQ's firehose tracer publishes to.
pub const TRACE_EXCHANGE: &str = "amq.rabbitmq.trace";

/// Copies of published messages, in publish order per publisher.
pub struct AmqpTap {
    rx: mpsc::Receiver<Tapped>,
    _task: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl Tap for AmqpTap {
    async fn next(&mut self) -> Option<Result<TapEvent, Error>> {
        match self.rx.recv().await {
            Some(t) => Some(Ok(TapEvent::Message(t))),
            None => Some(Err(Error::Closed)),
        }
    }
}

fn table_text(table: &FieldTable, key: &str) -> Option<String> {
    table.inner().get(key).and_then(text_of)
}

impl AmqpBroker {
    /// Opens a tap of at most `bound` copies waiting, on the firehose
    /// tracer of this broker's virtual host.
    pub async fn tap(&self, bound: usize) -> Result<AmqpTap, Error> {
        let inner = &self.inner;
        let ch = inner.channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::try_from(bound).unwrap_or(i64::MAX)),
        );
        let declared = inner
            .within(
                "queue.declare",
                ch.queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                ),
            )
            .await?
            .map_err(|e| inner.connection_error("declaring the tap's queue", e))?;
        let queue = declared.name().clone();
        inner
            .within(
                "queue.bind",
                ch.queue_bind(
                    queue.clone(),
                    TRACE_EXCHANGE.into(),
                    "publish.#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?
            .map_err(|e| inner.connection_error("binding the tap to the tracer", e))?;
        inner
            .within(
                "basic.qos",
                ch.basic_qos(256, BasicQosOptions { global: false }),
            )
            .await?
            .map_err(|e| inner.connection_error("basic.qos", e))?;
        let mut consumer = inner
            .within(
                "basic.consume",
                ch.basic_consume(
                    queue,
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?
            .map_err(|e| inner.connection_error("consuming the tap", e))?;
        let (tx, rx) = mpsc::channel(bound.max(1));
        let task = tokio::spawn(async move {
            let _channel = ch;
            while let Some(Ok(delivery)) = consumer.next().await {
                let empty = FieldTable::default();
                let trace = delivery.properties.headers().as_ref().unwrap_or(&empty);
                let exchange = table_text(trace, "exchange_name").unwrap_or_default();
                let routing_key = match trace.inner().get("routing_keys") {
                    Some(AMQPValue::FieldArray(keys)) => keys
                        .as_slice()
                        .first()
                        .and_then(text_of)
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                let mut headers = Headers::new();
                if let Some(AMQPValue::FieldTable(props)) = trace.inner().get("properties")
                    && let Some(AMQPValue::FieldTable(h)) = props.inner().get("headers")
                {
                    for (k, v) in h.inner() {
                        if let Some(text) = text_of(v) {
                            headers.insert(k.as_str().to_owned(), text);
                        }
                    }
                }
                // Messages to the default exchange go to the queue their
                // routing key names, calls to their service's call queue;
                // others are named `exchange/key`.
                let queue = if exchange.is_empty() {
                    routing_key
                } else if exchange == crate::CALLS_EXCHANGE {
                    callq_broker::call_queue(&routing_key)
                } else if exchange == crate::HIGH_CALLS_EXCHANGE {
                    callq_broker::high_queue(&routing_key)
                } else {
                    format!("{exchange}/{routing_key}")
                };
                let timestamp_ms = match trace.inner().get("properties") {
                    Some(AMQPValue::FieldTable(props)) => match props.inner().get("timestamp") {
                        // The tracer writes it as a plain integer.
                        Some(AMQPValue::Timestamp(secs)) => i64::try_from(*secs).ok(),
                        Some(AMQPValue::LongInt(secs)) => Some(i64::from(*secs)),
                        Some(AMQPValue::LongUInt(secs)) => Some(i64::from(*secs)),
                        Some(AMQPValue::LongLongInt(secs)) => Some(*secs),
                        _ => None,
                    }
                    .map(|secs| secs.saturating_mul(1000)),
                    _ => None,
                };
                let tapped = Tapped {
                    queue,
                    headers,
                    body: Bytes::from(delivery.data.clone()),
                    timestamp_ms,
                    partition: None,
                    offset: None,
                };
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                if tx.send(tapped).await.is_err() {
                    return;
                }
            }
        });
        Ok(AmqpTap { rx, _task: task })
    }
}
