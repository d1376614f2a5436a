//! `callq capture --service S`: writes the calls published to a service's
//! queue and the replies to them into a capture file, without taking them
//! from the workers (RabbitMQ's firehose tracer, see
//! [`callq_broker_amqp::Tap`]).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use callq_broker::{ATTEMPT_HEADER, call_queue};
use callq_broker_amqp::AmqpBroker;
use callq_node::capture::{Body, Record, Writer};
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

/// Copies bounded in the tap's queue.
const TAP_BOUND: usize = 100_000;

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

/// Captures from `broker` into `out` until the count or the duration is
/// reached; `ready` is called once the tap is open.
pub async fn capture(
    broker: &AmqpBroker,
    args: &CaptureArgs,
    out: impl Write,
    ready: impl FnOnce(),
) -> anyhow::Result<CaptureStats> {
    let mut tap = broker
        .tap(TAP_BOUND)
        .await
        .context("opening a tap on RabbitMQ's firehose tracer")?;
    let mut file = Writer::new(out, "amqp", &args.service)?;
    ready();
    let queue = call_queue(&args.service);
    let started = Instant::now();
    let end = args.duration.map(|d| started + d);
    let mut stats = CaptureStats::default();
    let mut calls: HashSet<String> = HashSet::new();
    let mut answered: HashSet<String> = HashSet::new();
    let mut grace_until: Option<Instant> = None;
    loop {
        let stop = match (end, grace_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(n) = args.count
            && stats.calls >= n
            && calls.iter().all(|id| answered.contains(id))
        {
            break;
        }
        let next = match stop {
            Some(at) => match tokio::time::timeout_at(at, tap.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => tap.next().await,
        };
        let Some(t) = next else {
            anyhow::bail!("the tap's connection to RabbitMQ ended");
        };
        let at_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let id_of = |bytes: &[u8]| -> Option<String> {
            serde_json::from_slice::<Value>(bytes)
                .ok()?
                .get("call_id")?
                .as_str()
                .map(str::to_owned)
        };
        if t.exchange.is_empty() && t.routing_key == queue {
            if args.count.is_some_and(|n| stats.calls >= n) {
                continue;
            }
            let attempt = t
                .headers
                .get(ATTEMPT_HEADER)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1);
            if let Some(id) = id_of(&t.body) {
                calls.insert(id);
            }
            let headers: BTreeMap<String, String> = t.headers.into_iter().collect();
            file.write(&Record::Call {
                at_ms,
                attempt,
                headers,
                body: redacted(Body::of(&t.body), &args.redact),
            })?;
            stats.calls += 1;
            if args.count.is_some_and(|n| stats.calls >= n) {
                grace_until = Some(Instant::now() + args.reply_grace);
            }
        } else if let Some(id) = id_of(&t.body)
            && calls.contains(&id)
            && t.routing_key != queue
            && t.body.windows(9).any(|w| w == b"\"outcome\"")
        {
            answered.insert(id);
            file.write(&Record::Reply {
                at_ms,
                body: redacted(Body::of(&t.body), &args.redact),
            })?;
            stats.replies += 1;
        }
    }
    file.finish()?;
    Ok(stats)
}
