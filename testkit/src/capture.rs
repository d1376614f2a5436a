//! Capture: writes the calls published to a service's queue and the
//! replies to them into a capture file, from any [`Tap`]: RabbitMQ's
//! firehose tracer (`callq_broker_amqp::AmqpTap`), a Kafka consumer group of
//! its own over an offset or time range (`callq_broker_kafka::KafkaTap`), or
//! an embedded broker's tap ([`callq_broker_embedded::EmbeddedTap`], which
//! [`crate::LocalCluster::tap`] opens). `callq capture` runs it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use callq_broker::{ATTEMPT_HEADER, Tap, TapEvent, call_queue};
use callq_node::capture::{Body, Origin, Record, Writer};
use serde_json::Value;
use tokio::time::Instant;

/// What to capture, and for how long.
#[derive(Debug, Clone, Default)]
pub struct CaptureArgs {
    /// The service whose queue is captured.
    pub service: String,
    /// Stop once this many calls, and the replies to them, are captured
    /// (replies are awaited up to `reply_grace` after the last call).
    pub count: Option<usize>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// JSON pointers replaced by `"[redacted]"` in every body that has them.
    pub redact: Vec<String>,
    /// How long replies are awaited once `count` calls are in.
    pub reply_grace: Duration,
}

/// What a capture wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Calls written.
    pub calls: usize,
    /// Replies written.
    pub replies: usize,
}

fn redacted(mut body: Body, redact: &[String]) -> Body {
    if let Body::Body(v) = &mut body {
        for pointer in redact {
            if let Some(field) = v.pointer_mut(pointer) {
                *field = Value::String("[redacted]".into());
            }
        }
    }
    body
}

/// Replies kept while their call has not been read yet, at most.
const EARLY_REPLIES: usize = 10_000;

/// How far before a call its reply queue is read from: replies come after
/// their call, and publishers' clocks drift.
const REPLY_SLACK_MS: i64 = 60_000;

/// Captures from `tap` into `out` until the count or the duration is
/// reached, or a range tap's range is read and its calls are answered;
/// `broker` names the broker in the file's header.
pub async fn capture(
    tap: &mut dyn Tap,
    broker: &str,
    args: &CaptureArgs,
    out: impl Write,
) -> anyhow::Result<CaptureStats> {
    let mut file = Writer::new(out, broker, &args.service)?;
    let queue = call_queue(&args.service);
    // The high band's calls too, where the tap sees them (a tap of a
    // RabbitMQ or embedded broker sees every queue; a Kafka tap reads the
    // call topic only).
    let high = callq_broker::high_queue(&args.service);
    let started = Instant::now();
    let end = args.duration.map(|d| started + d);
    let mut stats = CaptureStats::default();
    let mut calls: HashSet<String> = HashSet::new();
    let mut answered: HashSet<String> = HashSet::new();
    let mut grace_until: Option<Instant> = None;
    let mut range_read = false;
    // Replies read before their call: a log broker reads the reply queue
    // and the call queue apart, so a reply may come first.
    let mut early: HashMap<String, Record> = HashMap::new();
    let mut early_order: VecDeque<String> = VecDeque::new();
    loop {
        let stop = match (end, grace_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let enough = args.count.is_some_and(|n| stats.calls >= n) || range_read;
        if enough && calls.iter().all(|id| answered.contains(id)) {
            break;
        }
        let next = match stop {
            Some(at) => match tokio::time::timeout_at(at, tap.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => tap.next().await,
        };
        let t = match next {
            Some(Ok(TapEvent::Message(t))) => t,
            Some(Ok(TapEvent::RangeEnd)) => {
                range_read = true;
                grace_until.get_or_insert(Instant::now() + args.reply_grace);
                continue;
            }
            Some(Err(e)) => return Err(e).context("the tap's connection to the broker ended"),
            None => anyhow::bail!("the tap closed"),
        };
        let at_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let origin = Origin {
            ts_ms: t.timestamp_ms,
            partition: t.partition,
            offset: t.offset,
        };
        let json: Option<Value> = serde_json::from_slice(&t.body).ok();
        let id = json
            .as_ref()
            .and_then(|v| v.get("call_id")?.as_str())
            .map(str::to_owned);
        if t.queue == queue || t.queue == high {
            if enough {
                continue;
            }
            let attempt = t
                .headers
                .get(ATTEMPT_HEADER)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1);
            if let Some(id) = &id {
                calls.insert(id.clone());
            }
            if let Some(reply_to) = json.as_ref().and_then(|v| v.get("reply_to")?.as_str()) {
                tap.follow(
                    reply_to,
                    t.timestamp_ms.map(|ts| ts.saturating_sub(REPLY_SLACK_MS)),
                );
            }
            let headers: BTreeMap<String, String> = t.headers.into_iter().collect();
            file.write(&Record::Call {
                origin,
                at_ms,
                attempt,
                headers,
                body: redacted(Body::of(&t.body), &args.redact),
            })?;
            stats.calls += 1;
            if let Some(id) = id
                && let Some(reply) = early.remove(&id)
            {
                answered.insert(id);
                file.write(&reply)?;
                stats.replies += 1;
            }
            if args.count.is_some_and(|n| stats.calls >= n) {
                grace_until = Some(Instant::now() + args.reply_grace);
            }
        } else if let Some(id) = id
            && json.as_ref().is_some_and(|v| v.get("outcome").is_some())
        {
            let reply = Record::Reply {
                origin,
                at_ms,
                body: redacted(Body::of(&t.body), &args.redact),
            };
            if calls.contains(&id) {
                // A decided call's reply may come again; the first is the
                // one the client took.
                if answered.insert(id) {
                    file.write(&reply)?;
                    stats.replies += 1;
                }
            } else if !early.contains_key(&id) {
                if early_order.len() >= EARLY_REPLIES
                    && let Some(old) = early_order.pop_front()
                {
                    early.remove(&old);
                }
                early_order.push_back(id.clone());
                early.insert(id, reply);
            }
        }
    }
    file.finish()?;
    Ok(stats)
}
