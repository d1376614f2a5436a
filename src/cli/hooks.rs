//! What `callq verify` does to the workers it starts, through two hidden
//! flags of `callq worker` that no deployment should set:
//!
//! - `--fault-hooks`: the worker reads lines `crash <point>` on its stdin
//!   and dies (aborts, as `kill -9` would leave it) the next time a call
//!   reaches that point: `before_handler`, `before_trace`, `after_trace`,
//!   `before_reply` or `after_ack`;
//! - `--broken <how>`: the worker breaks the contract on purpose, so that
//!   a test can see `callq verify` catch it: `ack-early` acks each call as
//!   it arrives, before running or answering it (a call whose worker dies
//!   is then lost); `run-twice` runs each `mail.send` twice (its effect
//!   happens twice).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use callq_broker::{Broker, Consumer, Delivery, Disposition, Error, QueueDepth, QueueSpec, Settle};
use callq_node::probe::{Passage, Point, Probe, Site};
use callq_node::{HandlerError, Service};
use tokio::io::AsyncBufReadExt as _;

/// The points a crash can be armed at, by name.
pub(crate) const POINTS: [Point; 5] = [
    Point::BeforeHandler,
    Point::BeforeTrace,
    Point::AfterTrace,
    Point::BeforeReply,
    Point::AfterAck,
];

/// The point called `name`.
pub(crate) fn point(name: &str) -> Option<Point> {
    POINTS.into_iter().find(|p| p.as_str() == name)
}

/// How a worker is broken on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Broken {
    /// Acks each call as it arrives, before it runs or is answered.
    AckEarly,
    /// Runs each `mail.send` twice.
    RunTwice,
}

/// A probe that kills the process at the point armed last.
#[derive(Debug, Default)]
pub(crate) struct Armed {
    point: Mutex<Option<Point>>,
}

impl Probe for Armed {
    fn at<'a>(&'a self, site: Site<'a>) -> Passage<'a> {
        let armed = self.point.lock().map(|p| *p).unwrap_or(None);
        if armed == Some(site.point) {
            tracing::error!(
                call_id = %site.call_id,
                attempt = site.attempt,
                "fault hook: crashing at {} as armed",
                site.point
            );
            std::process::abort();
        }
        Box::pin(std::future::ready(()))
    }
}

impl Armed {
    /// Arms the crashes that stdin asks for, until stdin closes.
    pub(crate) fn listen(self: &Arc<Self>) {
        let armed = self.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match line.trim().strip_prefix("crash ").and_then(point) {
                    Some(p) => {
                        tracing::warn!("fault hook: armed to crash at {p}");
                        if let Ok(mut slot) = armed.point.lock() {
                            *slot = Some(p);
                        }
                    }
                    None => tracing::warn!("fault hook: `{line}` is not `crash <point>`"),
                }
            }
        });
    }
}

/// `services`, broken as `how` says.
pub(crate) fn break_services(services: Vec<Service>, how: Option<Broken>) -> Vec<Service> {
    if how != Some(Broken::RunTwice) {
        return services;
    }
    services
        .into_iter()
        .map(|s| {
            if s.name() != "mail" {
                return s;
            }
            Service::new("mail").method("send", move |ctx, args| {
                let inner = s.clone();
                async move {
                    let twice = |ctx, args| {
                        inner
                            .invoke("send", ctx, args)
                            .ok_or_else(|| HandlerError::new("unknown_method", "mail has no send"))
                    };
                    twice(ctx.clone(), args.clone())?.await?;
                    twice(ctx, args)?.await
                }
            })
        })
        .collect()
}

/// `broker`, broken as `how` says.
pub(crate) fn break_broker(broker: Arc<dyn Broker>, how: Option<Broken>) -> Arc<dyn Broker> {
    match how {
        Some(Broken::AckEarly) => Arc::new(AckEarly(broker)),
        _ => broker,
    }
}

/// Acks every call as it arrives.
struct AckEarly(Arc<dyn Broker>);

#[async_trait]
impl Broker for AckEarly {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), Error> {
        self.0.declare(spec).await
    }

    async fn publish(&self, queue: &str, message: callq_broker::Message) -> Result<(), Error> {
        self.0.publish(queue, message).await
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>, Error> {
        let inner = self.0.consume(queue, prefetch).await?;
        if !queue.starts_with("callq.call.") {
            return Ok(inner);
        }
        Ok(Box::new(AckingConsumer(inner)))
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        self.0.depth(queue).await
    }

    async fn partitions(&self, queue: &str) -> Result<Option<u32>, Error> {
        self.0.partitions(queue).await
    }

    async fn consumers(&self, queue: &str) -> Result<Option<u64>, Error> {
        self.0.consumers(queue).await
    }
}

struct AckingConsumer(Box<dyn Consumer>);

#[async_trait]
impl Consumer for AckingConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        let d = match self.0.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        let (body, headers, queue) = (d.body.clone(), d.headers.clone(), d.queue.clone());
        let (redelivered, count, publisher) =
            (d.redelivered, d.delivery_count, d.publisher.clone());
        if let Err(e) = d.settle(Disposition::Ack).await {
            return Some(Err(e));
        }
        let early = Delivery::new(body, headers, redelivered, count, queue, Box::new(Settled));
        Some(Ok(early.with_publisher(publisher)))
    }

    fn assignment(&self) -> Option<callq_broker::Assignment> {
        self.0.assignment()
    }
}

/// A delivery acked already: settling it does nothing.
struct Settled;

#[async_trait]
impl Settle for Settled {
    async fn settle(self: Box<Self>, _disposition: Disposition) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_is_named_and_read_back() {
        for p in POINTS {
            assert_eq!(point(p.as_str()), Some(p));
        }
        assert_eq!(point("after_lunch"), None);
    }
}
