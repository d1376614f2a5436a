//! Replay of a capture file: [`replay_onto`] publishes its calls to a
//! broker again, with confirms, keeping their relative timing (or a speed
//! factor), or at a set rate (`callq replay FILE --to URL`); [`replay_into`]
//! runs them through handlers on an embedded broker of its own and compares
//! the replies (`callq replay FILE --into SERVICES`).

use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use callq_broker::{ATTEMPT_HEADER, Broker, Message};
use callq_broker_embedded::EmbeddedBroker;
use callq_node::Service;
use callq_node::capture::{Body, Reader, Record};
use callq_node::replay::{ReplayError, ReplayOptions, ReplayReport, replay_on};
use callq_schemas::{Call, Uuid};
use tokio::time::Instant;

/// How the calls are replayed.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayArgs {
    /// Calls per second, instead of the captured timing.
    pub rate: Option<f64>,
    /// Replay the captured timing this many times faster (1: as captured).
    pub speed: f64,
    /// Give each call a fresh id, so that it is not taken for the original.
    pub new_ids: bool,
    /// Skip lines that cannot be read instead of stopping at the first.
    pub skip_bad: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Calls published and confirmed.
    pub published: usize,
    /// Lines skipped, each with why.
    pub skipped: Vec<String>,
    /// The ids of the calls published, in order.
    pub call_ids: Vec<Uuid>,
}

/// Publishes every call record of `input` to `broker`.
pub async fn replay_onto(
    input: impl BufRead,
    broker: Arc<dyn Broker>,
    args: &ReplayArgs,
) -> anyhow::Result<ReplayStats> {
    anyhow::ensure!(
        args.speed > 0.0 && args.speed.is_finite(),
        "--speed must be a positive number"
    );
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate > 0.0 && rate.is_finite(),
            "--rate must be a positive number"
        );
    }
    let mut reader = Reader::new(input).context("reading the capture file")?;
    let mut stats = ReplayStats::default();
    let started = Instant::now();
    let mut declared = std::collections::HashSet::new();
    while let Some(record) = reader.next() {
        let line = reader.line();
        let record = match record {
            Ok(r) => r,
            Err(e) if args.skip_bad => {
                eprintln!("skipping {e}");
                stats.skipped.push(e.to_string());
                continue;
            }
            Err(e) => {
                return Err(e).context("reading the capture file (--skip-bad skips such lines)");
            }
        };
        let Record::Call {
            at_ms,
            attempt,
            headers,
            body,
            ..
        } = record
        else {
            continue;
        };
        let mut call: Call = match body.json().map(|v| serde_json::from_value(v.clone())) {
            Some(Ok(call)) => call,
            _ if args.skip_bad => {
                let why = format!("line {line}: not a call envelope; skipped");
                eprintln!("{why}");
                stats.skipped.push(why);
                continue;
            }
            _ => anyhow::bail!("line {line}: not a call envelope (--skip-bad skips such lines)"),
        };
        if args.new_ids {
            call.call_id = Uuid::now_v7();
        }
        // When to publish: at the set rate, or at the captured time.
        let due = match args.rate {
            Some(rate) => Duration::from_secs_f64(stats.published as f64 / rate),
            None => Duration::from_secs_f64(at_ms as f64 / 1000.0 / args.speed),
        };
        tokio::time::sleep_until(started + due).await;
        let queue = callq_broker::call_queue_for(&call.service, call.priority);
        if declared.insert(queue.clone()) {
            for spec in callq_broker::QueueSpec::call_bands(&call.service) {
                broker
                    .declare(&spec)
                    .await
                    .with_context(|| format!("declaring {}", spec.name))?;
            }
        }
        let mut message = Message::new(if args.new_ids {
            call.to_bytes()
        } else {
            // The captured bytes, exactly.
            Body::to_bytes(&body)
        })
        .key(
            call.session_id
                .clone()
                .unwrap_or_else(|| call.call_id.to_string()),
        );
        for (k, v) in headers {
            // A call with a new id is a first attempt.
            if !(args.new_ids && k == ATTEMPT_HEADER) {
                message = message.header(k, v);
            }
        }
        if attempt > 1 && !args.new_ids {
            message = message.header(ATTEMPT_HEADER, attempt.to_string());
        }
        tokio::time::timeout(Duration::from_secs(30), broker.publish(&queue, message))
            .await
            .map_err(|_| anyhow::anyhow!("line {line}: the broker did not confirm within 30 s"))?
            .with_context(|| format!("line {line}: publishing to {queue}"))?;
        stats.published += 1;
        stats.call_ids.push(call.call_id);
    }
    Ok(stats)
}

/// Replays the calls of a capture file through `services` on an embedded
/// broker of its own and compares each new reply with the captured one
/// (see [`callq_node::replay`]).
///
/// ```ignore
/// let report = replay_into(vec![my_service()], BufReader::new(File::open("echo.jsonl")?),
///     ReplayOptions { ignore: vec!["/result/at".into()], ..ReplayOptions::default() }).await?;
/// report.assert_same();
/// ```
pub async fn replay_into(
    services: Vec<Service>,
    input: impl BufRead,
    opts: ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    replay_on(Arc::new(EmbeddedBroker::new()), services, input, opts).await
}
