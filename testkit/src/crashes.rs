//! Replay of a capture file into handlers with crashes injected: the calls
//! run on an in-process cluster (coordinator, workers, embedded broker) and
//! the worker running a call is killed at a chosen point of it. The report
//! shows that each call still ended exactly once, with the outcome the
//! contract promises: `ok` after a transparent retry when the lost attempt
//! left no trace (or only exact ones), `fatal` naming the traces when it
//! left some.
//!
//! ```ignore
//! let file = BufReader::new(File::open("staging.jsonl")?);
//! let report = replay_with_crashes(vec![my_service()], file,
//!     CrashOptions { mode: CrashMode::Random { seed: 7 }, ..CrashOptions::default() }).await?;
//! report.assert_exactly_once();
//! ```
//!
//! Which call crashes where depends on the mode and the call's id only, so
//! the same file and seed give the same run. Each call crashes at most
//! once, and each worker runs one call at a time, so that a crash reaches
//! the chosen call alone. This lives here rather than in `callq-node`
//! because it runs the coordinator.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::faults::{CrashPoint, CrashSite, Faults};
use anyhow::Context as _;
use callq_broker::{Disposition, Message, QueueSpec};
use callq_coordinator::MemoryStore;
use callq_node::Service;
use callq_node::capture::LineError;
use callq_node::replay::{Capture, Verdict, describe, prepare};
use callq_schemas::{Uuid, protocol};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::cluster::{ClusterOptions, LocalCluster};

/// Where the calls crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every call that asks for a trace: its worker dies before the request.
    BeforeTrace,
    /// Every call that is granted a trace: its worker dies right after.
    AfterTrace,
    /// Every call: its worker dies once the handler returned, before the
    /// outcome is sent.
    BeforeReply,
    /// Each call draws, from the seed and its id, one of: no crash, or one
    /// of the three points above.
    Random {
        /// The seed.
        seed: u64,
    },
}

impl CrashMode {
    /// The point where `call` crashes, if it does.
    pub fn point_for(self, call: Uuid) -> Option<CrashPoint> {
        match self {
            CrashMode::BeforeTrace => Some(CrashPoint::BeforeTrace),
            CrashMode::AfterTrace => Some(CrashPoint::AfterTrace),
            CrashMode::BeforeReply => Some(CrashPoint::BeforeReply),
            CrashMode::Random { seed } => {
                let (hi, lo) = call.as_u64_pair();
                match splitmix64(seed ^ splitmix64(hi ^ splitmix64(lo))) % 4 {
                    1 => Some(CrashPoint::BeforeTrace),
                    2 => Some(CrashPoint::AfterTrace),
                    3 => Some(CrashPoint::BeforeReply),
                    _ => None,
                }
            }
        }
    }
}

impl std::fmt::Display for CrashMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CrashMode::BeforeTrace => f.write_str("--kill-before-trace"),
            CrashMode::AfterTrace => f.write_str("--kill-after-trace"),
            CrashMode::BeforeReply => f.write_str("--kill-before-reply"),
            CrashMode::Random { seed } => write!(f, "--kill-random {seed}"),
        }
    }
}

/// A well-mixed 64-bit hash step (SplitMix64), stable across releases.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How the replay runs.
#[derive(Debug, Clone)]
pub struct CrashOptions {
    /// Where calls crash.
    pub mode: CrashMode,
    /// Workers running at once (each runs one call at a time); a killed
    /// worker is replaced.
    pub workers: usize,
    /// JSON pointers into a reply that are not compared.
    pub ignore: Vec<String>,
    /// Skip lines that cannot be read instead of failing on the first.
    pub skip_bad: bool,
    /// How long the replay waits for every call to end.
    pub timeout: Duration,
    /// Heartbeat interval of the cluster; a killed worker is found dead
    /// after four silent intervals.
    pub heartbeat_interval: Duration,
}

impl Default for CrashOptions {
    fn default() -> Self {
        Self {
            mode: CrashMode::Random { seed: 0 },
            workers: 4,
            ignore: Vec::new(),
            skip_bad: false,
            timeout: Duration::from_secs(120),
            heartbeat_interval: Duration::from_millis(50),
        }
    }
}

/// A crash that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// Where.
    pub point: CrashPoint,
    /// In which attempt.
    pub attempt: u32,
    /// The trace asked for or just granted there.
    pub trace: Option<String>,
    /// The traces the lost attempt had been granted.
    pub granted: Vec<String>,
}

impl Injected {
    /// Whether the contract answers the call `fatal`: the lost attempt
    /// left a trace that is not exact.
    pub fn fatal(&self) -> bool {
        !protocol::retryable(&self.granted)
    }
}

/// How one captured call fared.
#[derive(Debug, Clone)]
pub struct CrashedCall {
    /// The line of the capture file.
    pub line: usize,
    /// The call, where the envelope names one.
    pub call_id: Option<Uuid>,
    /// Its service and method.
    pub what: String,
    /// Why it was not run, if it was not.
    pub not_replayable: Option<String>,
    /// The crash its worker suffered, if one did.
    pub crash: Option<Injected>,
    /// Every final reply received for it: one, or the same outcome again
    /// (which the client drops).
    pub outcomes: Vec<Value>,
    /// The first reply compared with the captured one, where the contract
    /// expects the handler's own outcome (not after a `fatal`).
    pub verdict: Option<Verdict>,
}

impl CrashedCall {
    fn outcome(&self) -> Option<&str> {
        self.outcomes.first()?.get("outcome")?.as_str()
    }

    /// The distinct outcomes of its replies, in order of arrival.
    fn kinds(&self) -> Vec<&str> {
        let mut kinds = Vec::new();
        for o in &self.outcomes {
            let kind = o.get("outcome").and_then(Value::as_str).unwrap_or("?");
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds
    }

    fn head(&self) -> String {
        format!(
            "line {} (call {}, {})",
            self.line,
            self.call_id.map_or("?".into(), |id| id.to_string()),
            self.what
        )
    }

    /// What breaks the contract in how this call ended.
    fn violation(&self) -> Option<String> {
        if self.not_replayable.is_some() {
            return None;
        }
        let head = self.head();
        // The client takes the first final reply and drops the later ones
        // (a decided call's reply is published again when its delivery
        // comes back, in case the first was lost): those must agree.
        let Some(first) = self.outcomes.first() else {
            return Some(format!("{head}: no outcome"));
        };
        let kinds = self.kinds();
        if kinds.len() > 1 {
            return Some(format!(
                "{head}: ended in {} different outcomes: {}",
                kinds.len(),
                self.outcomes
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let outcome = self.outcome().unwrap_or("?");
        let attempt = first.get("attempt").and_then(Value::as_u64).unwrap_or(0);
        match &self.crash {
            Some(c) if c.fatal() => {
                let listed: Vec<&str> = first
                    .pointer("/error/traces")
                    .and_then(Value::as_array)
                    .map(|t| t.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if outcome != "fatal" {
                    Some(format!(
                        "{head}: killed {} having left {:?}, it ended `{outcome}`, not `fatal`",
                        c.point, c.granted
                    ))
                } else {
                    c.granted
                        .iter()
                        .find(|t| !listed.contains(&t.as_str()))
                        .map(|missing| {
                            format!("{head}: the `fatal` reply does not list the trace `{missing}`")
                        })
                }
            }
            Some(c) if outcome == "fatal" || attempt <= u64::from(c.attempt) => Some(format!(
                "{head}: killed {} in attempt {} having left {:?}, it ended `{outcome}` in attempt {attempt} instead of being retried",
                c.point, c.attempt, c.granted
            )),
            None if outcome == "fatal" => Some(format!("{head}: ended `fatal` without a crash")),
            _ => None,
        }
    }

    /// How the call's reply differs from the captured one, if it does.
    fn difference(&self) -> Option<String> {
        match self.verdict.as_ref()? {
            // Counted among the violations.
            Verdict::NoReply => None,
            verdict => describe(&self.head(), verdict),
        }
    }
}

/// What a replay with crashes found. A call "ends exactly once" when all
/// its replies carry the same outcome: the client takes the first and drops
/// repeats, as the contract says.
#[derive(Debug, Clone)]
pub struct CrashReport {
    /// The mode it ran in.
    pub mode: CrashMode,
    /// Every captured call, in file order.
    pub calls: Vec<CrashedCall>,
    /// Lines skipped (with `skip_bad`).
    pub skipped: Vec<LineError>,
    /// Workers killed.
    pub kills: usize,
}

impl CrashReport {
    /// Calls that did not end exactly once with the outcome the contract
    /// promises after their crash (or lack of one), described.
    pub fn violations(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(CrashedCall::violation)
            .collect()
    }

    /// Calls whose reply differs from the captured one, described.
    pub fn differences(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(CrashedCall::difference)
            .collect()
    }

    /// Panics with every violation and difference, if there is one.
    pub fn assert_exactly_once(&self) {
        let failures: Vec<String> = self
            .violations()
            .into_iter()
            .chain(self.differences())
            .collect();
        assert!(
            failures.is_empty(),
            "{} of {} calls replayed with {} failed:\n{}",
            failures.len(),
            self.calls.len(),
            self.mode,
            failures.join("\n")
        );
    }

    /// What each call went through and how it ended, line by line: two
    /// runs with the same file and mode give the same.
    pub fn fingerprint(&self) -> Vec<String> {
        self.calls
            .iter()
            .map(|c| {
                let crash = c.crash.as_ref().map_or("-".into(), |i| {
                    format!("{}@{}{:?}", i.point, i.attempt, i.granted)
                });
                let outcome = match &c.not_replayable {
                    Some(_) => "not replayable".to_owned(),
                    None => c.kinds().join("+"),
                };
                format!("{} {crash} {outcome}", c.line)
            })
            .collect()
    }

    /// Counts for a person: crashes by point, outcomes by kind.
    pub fn summary(&self) -> String {
        let mut crashes: BTreeMap<CrashPoint, usize> = BTreeMap::new();
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        let mut retried = 0;
        let mut repeats = 0;
        for c in &self.calls {
            repeats += c.outcomes.len().saturating_sub(1);
            if let Some(i) = &c.crash {
                *crashes.entry(i.point).or_default() += 1;
                if !i.fatal() && c.outcome().is_some() {
                    retried += 1;
                }
            }
            if c.not_replayable.is_some() {
                *outcomes.entry("not replayable".into()).or_default() += 1;
            } else {
                *outcomes
                    .entry(c.outcome().unwrap_or("none").to_owned())
                    .or_default() += 1;
            }
        }
        let list = |m: Vec<String>| {
            if m.is_empty() {
                "none".to_owned()
            } else {
                m.join(", ")
            }
        };
        let violations = self.violations().len();
        let differences = self.differences().len();
        format!(
            "{} calls replayed with {}: {} workers killed ({}); outcomes: {}; {} retried transparently after their crash; {} repeated replies (dropped by the client); {}; {}",
            self.calls.len(),
            self.mode,
            self.kills,
            list(crashes.iter().map(|(p, n)| format!("{n} {p}")).collect()),
            list(outcomes.iter().map(|(o, n)| format!("{n} {o}")).collect()),
            retried,
            repeats,
            if violations == 0 {
                "every call ended exactly once, as the contract says".to_owned()
            } else {
                format!("{violations} calls broke the contract")
            },
            if differences == 0 {
                "every compared reply is the captured one".to_owned()
            } else {
                format!("{differences} replies differ from the captured ones")
            }
        )
    }
}

/// The plan every worker of the replay shares: each call crashes at most
/// once, at the point its mode draws.
struct Plan {
    mode: CrashMode,
    worker: String,
    injected: Arc<Mutex<HashMap<Uuid, Injected>>>,
    crashed: mpsc::Sender<String>,
}

impl Faults for Plan {
    fn crash(&self, site: &CrashSite<'_>) -> bool {
        if self.mode.point_for(site.call_id) != Some(site.point) {
            return false;
        }
        let Ok(mut injected) = self.injected.lock() else {
            return false;
        };
        if injected.contains_key(&site.call_id) {
            return false;
        }
        injected.insert(
            site.call_id,
            Injected {
                point: site.point,
                attempt: site.attempt,
                trace: site.trace.map(str::to_owned),
                granted: site.granted.to_vec(),
            },
        );
        // One message per worker, each crashing once: the channel has room.
        let _ = self.crashed.try_send(self.worker.clone());
        true
    }
}

/// Replays the calls of a capture file through `services` on an in-process
/// cluster, killing workers where `opts.mode` says.
pub async fn replay_with_crashes(
    services: Vec<Service>,
    input: impl BufRead,
    opts: CrashOptions,
) -> anyhow::Result<CrashReport> {
    anyhow::ensure!(opts.workers > 0, "a replay needs at least one worker");
    let capture = Capture::read(input, opts.skip_bad).context("reading the capture file")?;
    let dead_after = 4;
    let mut cluster = LocalCluster::start(
        ClusterOptions {
            heartbeat_interval: opts.heartbeat_interval,
            dead_after,
            capacity: 1,
            ..ClusterOptions::default()
        },
        MemoryStore::default(),
    )
    .await?;
    let broker = cluster.broker.clone();
    let spec = QueueSpec::replies(&format!("replay-{}", Uuid::now_v7().simple()));
    broker.declare(&spec).await?;
    let replies = spec.name;

    let injected: Arc<Mutex<HashMap<Uuid, Injected>>> = Arc::default();
    let (crashed, mut crashes) = mpsc::channel(opts.workers + 1);
    let mut started = 0usize;
    let mut spawn = async |cluster: &mut LocalCluster| -> anyhow::Result<()> {
        started += 1;
        let worker = format!("replay-{started}");
        let plan = Arc::new(Plan {
            mode: opts.mode,
            worker: worker.clone(),
            injected: injected.clone(),
            crashed: crashed.clone(),
        });
        cluster.spawn_faulty(&worker, services.clone(), plan).await
    };
    for _ in 0..opts.workers {
        spawn(&mut cluster).await?;
    }
    let declared: HashSet<String> = services.iter().map(|s| s.name().to_owned()).collect();

    let mut calls = Vec::with_capacity(capture.calls.len());
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    for (line, body) in &capture.calls {
        let (call_id, what, call) = prepare(body, &declared, &replies);
        let not_replayable = match call {
            Ok(call) if index.contains_key(&call.call_id) => Some(format!(
                "call {} appears twice in the capture; it is replayed once",
                call.call_id
            )),
            Ok(call) => {
                broker
                    .publish(
                        &callq_broker::call_queue_for(&call.service, call.priority),
                        Message::new(call.to_bytes()).key(call.call_id.to_string()),
                    )
                    .await?;
                index.insert(call.call_id, calls.len());
                None
            }
            Err(why) => Some(why),
        };
        calls.push(CrashedCall {
            line: *line,
            call_id,
            what,
            not_replayable,
            crash: None,
            outcomes: Vec::new(),
            verdict: None,
        });
    }

    // Replies until every call has one, then for a quiet spell in which a
    // second outcome, if the cluster produced one, would show.
    let mut consumer = broker.consume(&replies, 256).await?;
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let quiet = opts.heartbeat_interval * dead_after * 3;
    let mut open = index.len();
    let mut kills = 0;
    loop {
        let until = if open == 0 {
            (tokio::time::Instant::now() + quiet).min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            Some(worker) = crashes.recv() => {
                cluster.kill(&worker);
                kills += 1;
                spawn(&mut cluster).await?;
            }
            next = tokio::time::timeout_at(until, consumer.next()) => {
                let Ok(Some(Ok(delivery))) = next else { break };
                let reply: Option<Value> = serde_json::from_slice(&delivery.body).ok();
                let _ = delivery.settle(Disposition::Ack).await;
                let Some(reply) = reply else { continue };
                let Some(&i) = reply
                    .get("call_id")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<Uuid>().ok())
                    .and_then(|id| index.get(&id))
                else {
                    continue;
                };
                if calls[i].outcomes.is_empty() {
                    open -= 1;
                }
                calls[i].outcomes.push(reply);
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), cluster.shutdown()).await;

    let injected = injected.lock().map(|i| i.clone()).unwrap_or_default();
    for call in &mut calls {
        call.crash = call.call_id.and_then(|id| injected.get(&id).cloned());
        let expects_handler = !call.crash.as_ref().is_some_and(Injected::fatal);
        if call.not_replayable.is_none()
            && expects_handler
            && let Some(first) = call.outcomes.first()
        {
            call.verdict = Some(capture.verdict(first.clone(), &opts.ignore));
        }
    }
    Ok(CrashReport {
        mode: opts.mode,
        calls,
        skipped: capture.skipped,
        kills,
    })
}
