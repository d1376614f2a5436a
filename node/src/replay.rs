//! Replay of a capture file into handlers, for regression tests against
//! real traffic: each captured call runs through the given services on a
//! broker of the caller's (an embedded one: `callq_testkit::replay::replay_into`
//! makes it), and its new reply is compared with the captured one.
//!
//! ```ignore
//! let broker = Arc::new(EmbeddedBroker::new());
//! let report = replay_on(broker, vec![my_service()], BufReader::new(File::open("echo.jsonl")?),
//!     ReplayOptions { ignore: vec!["/result/at".into()], ..ReplayOptions::default() }).await?;
//! report.assert_same();
//! ```
//!
//! Calls run as they were captured (same call id, method and arguments)
//! with their deadline dropped (a captured deadline is long past) and their
//! replies sent to the replay. A reply's `attempt` is not compared (the
//! replay runs each call once).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{Broker, Disposition, Message, QueueSpec};
use callq_schemas::{Call, Limits, Uuid, decode_call};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::capture::{Body, LineError, Reader, Record};
use crate::{Service, Worker, WorkerOptions};

/// How a replay runs and compares.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// JSON pointers into a reply that are not compared (`/result/at`).
    pub ignore: Vec<String>,
    /// Skip lines that cannot be read (each is listed in the report)
    /// instead of failing on the first.
    pub skip_bad: bool,
    /// How long the replay waits for all replies.
    pub timeout: Duration,
    /// Calls run at once.
    pub capacity: u16,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            ignore: Vec::new(),
            skip_bad: false,
            timeout: Duration::from_secs(60),
            capacity: 64,
        }
    }
}

/// One place where a replayed reply differs from the captured one.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// A JSON pointer into the reply.
    pub pointer: String,
    /// The captured value there, if any.
    pub captured: Option<Value>,
    /// The replayed value there, if any.
    pub replayed: Option<Value>,
}

/// How one captured call fared.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The reply is the captured one.
    Same,
    /// The reply differs.
    Differs(Vec<Difference>),
    /// The capture holds no reply to compare with; the new one is kept.
    Uncompared(Value),
    /// No reply came within the timeout.
    NoReply,
    /// The captured call cannot be replayed (not a call envelope).
    NotReplayable(String),
}

/// A captured call and its verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    /// The line of the capture file.
    pub line: usize,
    /// The call, where the envelope names one.
    pub call_id: Option<Uuid>,
    /// Its service and method, for the report.
    pub what: String,
    /// How it fared.
    pub verdict: Verdict,
}

/// What a replay found.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Every captured call, in file order.
    pub calls: Vec<Replayed>,
    /// Lines skipped (with `skip_bad`).
    pub skipped: Vec<LineError>,
}

impl ReplayReport {
    /// Calls whose replay did not give the captured reply, described.
    pub fn failures(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(|c| {
                let head = format!(
                    "line {} (call {}, {})",
                    c.line,
                    c.call_id.map_or("?".into(), |id| id.to_string()),
                    c.what
                );
                describe(&head, &c.verdict)
            })
            .collect()
    }

    /// Panics with every failure described, if there is one.
    pub fn assert_same(&self) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{} of {} replayed calls did not give the captured reply:\n{}",
            failures.len(),
            self.calls.len(),
            failures.join("\n")
        );
    }
}

/// What went wrong with the call `head` names, if its verdict is a
/// failure: no reply, not replayable, or each difference by JSON pointer.
pub fn describe(head: &str, verdict: &Verdict) -> Option<String> {
    match verdict {
        Verdict::Same | Verdict::Uncompared(_) => None,
        Verdict::NoReply => Some(format!("{head}: no reply")),
        Verdict::NotReplayable(why) => Some(format!("{head}: not replayable: {why}")),
        Verdict::Differs(diffs) => Some(format!(
            "{head}: the reply differs:\n{}",
            diffs
                .iter()
                .map(|d| format!(
                    "  at {}: captured {}, replayed {}",
                    if d.pointer.is_empty() {
                        "/"
                    } else {
                        &d.pointer
                    },
                    shown(d.captured.as_ref()),
                    shown(d.replayed.as_ref())
                ))
                .collect::<Vec<_>>()
                .join("\n")
        )),
    }
}

fn shown(v: Option<&Value>) -> String {
    v.map_or_else(|| "nothing".into(), Value::to_string)
}

/// Why a replay could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A line of the file is bad (and `skip_bad` is off), or the header is.
    #[error("capture file {0}")]
    Line(#[from] LineError),
    /// The embedded broker refused something (a bug).
    #[error(transparent)]
    Broker(#[from] callq_broker::Error),
}

/// Where two JSON values differ, as pointers, skipping `ignore`.
pub fn differences(captured: &Value, replayed: &Value, ignore: &[String]) -> Vec<Difference> {
    let mut out = Vec::new();
    diff_at(
        String::new(),
        Some(captured),
        Some(replayed),
        ignore,
        &mut out,
    );
    out
}

fn diff_at(
    at: String,
    a: Option<&Value>,
    b: Option<&Value>,
    ignore: &[String],
    out: &mut Vec<Difference>,
) {
    if ignore.contains(&at) {
        return;
    }
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let key = k.replace('~', "~0").replace('/', "~1");
                diff_at(format!("{at}/{key}"), x.get(k), y.get(k), ignore, out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            for i in 0..x.len().max(y.len()) {
                diff_at(format!("{at}/{i}"), x.get(i), y.get(i), ignore, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Difference {
            pointer: at,
            captured: a.cloned(),
            replayed: b.cloned(),
        }),
    }
}

/// The calls and replies of a capture file, read for a replay.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    /// The call records: their line and body, in file order.
    pub calls: Vec<(usize, Body)>,
    /// The first final reply captured for each call.
    pub replies: HashMap<Uuid, Value>,
    /// Lines skipped (with `skip_bad`).
    pub skipped: Vec<LineError>,
}

impl Capture {
    /// Reads a capture file; with `skip_bad`, a bad line is listed in
    /// `skipped` instead of ending the read.
    pub fn read(input: impl BufRead, skip_bad: bool) -> Result<Self, LineError> {
        let mut capture = Self::default();
        let mut reader = Reader::new(input)?;
        while let Some(record) = reader.next() {
            let line = reader.line();
            let record = match record {
                Ok(r) => r,
                Err(e) if skip_bad => {
                    capture.skipped.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match record {
                Record::Call { body, .. } => capture.calls.push((line, body)),
                Record::Reply { body, .. } => {
                    if let Some(v) = body.json()
                        && let Some(id) = v
                            .get("call_id")
                            .and_then(Value::as_str)
                            .and_then(|s| s.parse::<Uuid>().ok())
                    {
                        // The first final reply is the one the client took.
                        capture.replies.entry(id).or_insert_with(|| v.clone());
                    }
                }
            }
        }
        Ok(capture)
    }

    /// How a replayed reply compares with the captured one, skipping the
    /// `ignore` pointers and the attempt.
    pub fn verdict(&self, reply: Value, ignore: &[String]) -> Verdict {
        let id = reply
            .get("call_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Uuid>().ok());
        match id.and_then(|id| self.replies.get(&id)) {
            None => Verdict::Uncompared(reply),
            Some(old) => {
                let mut ignore = ignore.to_vec();
                ignore.push("/attempt".into());
                let diffs = differences(old, &reply, &ignore);
                if diffs.is_empty() {
                    Verdict::Same
                } else {
                    Verdict::Differs(diffs)
                }
            }
        }
    }
}

/// A captured call made ready to run again: its id and name, and the call
/// with its replies sent to `reply_to` and its deadline dropped; or why it
/// cannot run here.
pub fn prepare(
    body: &Body,
    declared: &HashSet<String>,
    reply_to: &str,
) -> (Option<Uuid>, String, Result<Call, String>) {
    match decode_call(&body.to_bytes(), &Limits::default()) {
        Ok(call) if declared.contains(&call.service) => {
            let what = format!("{}.{}", call.service, call.method);
            let mut call = call;
            call.reply_to = Some(reply_to.to_owned());
            call.deadline = None;
            (Some(call.call_id), what, Ok(call))
        }
        Ok(call) => (
            Some(call.call_id),
            format!("{}.{}", call.service, call.method),
            Err(format!(
                "service `{}` is not among the replayed services",
                call.service
            )),
        ),
        Err(e) => (None, "?".into(), Err(e.to_string())),
    }
}

/// Replays the calls of a capture file through `services` on `broker` and
/// compares each new reply with the captured one. The broker is the
/// replay's own: its worker serves uncoordinated, and takes whatever it
/// finds in the queues of `services`.
pub async fn replay_on(
    broker: Arc<dyn Broker>,
    services: Vec<Service>,
    input: impl BufRead,
    opts: ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let capture = Capture::read(input, opts.skip_bad)?;
    let mut report = ReplayReport {
        skipped: capture.skipped.clone(),
        ..ReplayReport::default()
    };
    let spec = QueueSpec::replies(&format!("replay-{}", Uuid::now_v7().simple()));
    broker.declare(&spec).await?;
    let replies = spec.name;
    let mut worker = Worker::new(
        WorkerOptions {
            worker_id: "replay".into(),
            capacity: opts.capacity,
            coordinated: false,
            ..WorkerOptions::default()
        },
        broker.clone(),
    );
    let mut declared = HashSet::new();
    for s in services {
        declared.insert(s.name().to_owned());
        for spec in QueueSpec::call_bands(s.name()) {
            broker.declare(&spec).await?;
        }
        worker = worker.service(s);
    }
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));

    let mut waiting: BTreeMap<Uuid, usize> = BTreeMap::new();
    for (i, (line, body)) in capture.calls.iter().enumerate() {
        let (call_id, what, call) = prepare(body, &declared, &replies);
        let verdict = match call {
            Ok(call) => {
                broker
                    .publish(
                        &callq_broker::call_queue_for(&call.service, call.priority),
                        Message::new(call.to_bytes()).key(call.call_id.to_string()),
                    )
                    .await?;
                waiting.insert(call.call_id, i);
                Verdict::NoReply
            }
            Err(why) => Verdict::NotReplayable(why),
        };
        report.calls.push(Replayed {
            line: *line,
            call_id,
            what,
            verdict,
        });
    }

    let mut consumer = broker.consume(&replies, 256).await?;
    let deadline = tokio::time::Instant::now() + opts.timeout;
    while !waiting.is_empty() {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let Ok(Some(Ok(delivery))) = next else { break };
        let reply: Option<Value> = serde_json::from_slice(&delivery.body).ok();
        let _ = delivery.settle(Disposition::Ack).await;
        let Some(reply) = reply else { continue };
        let id = reply
            .get("call_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Uuid>().ok());
        let Some(i) = id.and_then(|id| waiting.remove(&id)) else {
            continue;
        };
        report.calls[i].verdict = capture.verdict(reply, &opts.ignore);
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    Ok(report)
}
