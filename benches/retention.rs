//! Retention benchmark: does the ledger's redb store level off once decided
//! calls are forgotten after their retention, instead of growing with the
//! number of calls?
//!
//! Each call is a traced call on the fast path, driven through a `Ledger`
//! over a `RedbStore` (in a temp dir) with the requests a worker sends for
//! it and the ledger calls the coordinator makes for them
//! (coordinator/src/service/requests.rs):
//!
//! 1. `trace` (copy 1, attempt 1, with the body's digest): `same_body`,
//!    `trace` (the call gets its record, open), `same_body` (the record
//!    keeps the digest);
//! 2. once that grant is durable, `complete` with the reply: the record is
//!    written decided, and dated by the store's clock.
//!
//! The requests are group-committed as the coordinator does, `BATCH` per
//! `commit()`: `IN_FLIGHT` calls in flight, so each batch holds the traces
//! of `IN_FLIGHT` new calls and the completions of the `IN_FLIGHT` traced
//! in the batch before (a completion can only follow its grant's commit).
//! No call is redelivered, so no `resume` is asked.
//!
//! Two runs, each on a store of its own, in one process:
//!
//! - the control: `--control N` calls (200,000 by default) with nothing
//!   forgotten, the size the store grows to without retention;
//! - the retention run: `--calls N` calls (1,000,000 by default) with a
//!   retention of `--retention-ms N` (5,000 by default), and every
//!   `--sweep-ms N` (1,000 by default) the coordinator's sweep of decided
//!   calls: `Ledger::forget_decided` in batches of `SWEEP_MAX`, at most
//!   `FORGET_BATCHES` a sweep, stopping at the first batch that is not full
//!   (coordinator/src/service/sweep.rs; the coordinator sweeps every
//!   quarter of `session_idle`, at most a minute apart).
//!
//! `--rate N` paces the calls at N a second at most (0, the default: as
//! fast as the store takes them).
//!
//! Every `REPORT_EVERY` calls each run prints the calls so far, the
//! elapsed time, the rate (overall and since the last line), the records
//! in the store, how many of them are past the retention and not yet
//! deleted ("overdue"), and the store file's size. The records are counted
//! from the public API: open ones by `Ledger::open_calls` (after a commit
//! memory holds exactly the store's open calls), decided ones as the
//! completions committed less the records `forget_decided` reported
//! deleted (each first decided write dates one record; nothing else
//! deletes one); overdue ones as the completions committed more than the
//! retention ago (by this process's wall clock, which is the store's) less
//! those deleted. At the end each run compares its size at the end with
//! its size half-way: it levelled off if it grew less than `LEVEL` percent
//! over the second half.
//!
//! `cargo bench --bench retention` (add `-- --calls N --retention-ms N
//! --control N --sweep-ms N --rate N`).
#![allow(missing_docs)]

mod support;

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use callq_coordinator::{Ledger, RedbStore, Store};
use callq_schemas::protocol::{CompleteDecision, Lease, TraceDecision};
use callq_schemas::{Reply, Uuid};
use serde_json::json;

/// Calls in flight: each commit holds this many traces and as many
/// completions, `BATCH` requests (the coordinator's `batch_max`).
const IN_FLIGHT: usize = 128;
const BATCH: usize = 2 * IN_FLIGHT;
/// The coordinator's sweep: records deleted per transaction, transactions
/// per sweep at most.
const SWEEP_MAX: usize = 1_000;
const FORGET_BATCHES: usize = 10;
/// A line every this many calls.
const REPORT_EVERY: usize = 50_000;

const SERVICE: &str = "mail";
const REPLY_TO: Option<&str> = Some("callq.reply.bench-client");
const WORKER: &str = "bench-w1";
const TRACE: &str = "mail.sent";

const MIB: f64 = 1024.0 * 1024.0;
/// Growth over the second half, in percent, below which a run's size
/// counts as levelled off.
const LEVEL: f64 = 10.0;

/// Now, in milliseconds since the Unix epoch: the coordinator's clock (and
/// the redb store's, which dates decisions).
fn wall_ms() -> anyhow::Result<i64> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?;
    Ok(i64::try_from(since.as_millis())?)
}

/// A stand-in for the SHA-256 (64 hex digits) a worker reports of the
/// call's body: the same size in the record.
fn digest(call_id: Uuid) -> String {
    let n = call_id.as_u128();
    format!("{n:032x}{:032x}", n.rotate_left(64))
}

/// The sweep of decided calls, as the coordinator runs it.
#[derive(Default)]
struct Sweeps {
    count: usize,
    forgotten: usize,
    took: Duration,
    longest: Duration,
}

impl Sweeps {
    fn sweep(&mut self, ledger: &mut Ledger<RedbStore>) -> anyhow::Result<()> {
        let started = Instant::now();
        let now = wall_ms()?;
        for _ in 0..FORGET_BATCHES {
            let n = ledger.forget_decided(now, SWEEP_MAX)?;
            self.forgotten += n;
            if n < SWEEP_MAX {
                break;
            }
        }
        // The sweep commits what else it changed (here, nothing).
        ledger.commit()?;
        let took = started.elapsed();
        self.count += 1;
        self.took += took;
        self.longest = self.longest.max(took);
        Ok(())
    }
}

/// What a run measured.
struct Run {
    calls: usize,
    elapsed: Duration,
    half_bytes: u64,
    end_bytes: u64,
    peak_bytes: u64,
    decided: usize,
    sweeps: Sweeps,
}

impl Run {
    fn second_half_growth(&self) -> f64 {
        (self.end_bytes as f64 / self.half_bytes.max(1) as f64 - 1.0) * 100.0
    }

    fn levelled(&self) -> &'static str {
        if self.second_half_growth() < LEVEL {
            "levelled off"
        } else {
            "did NOT level off"
        }
    }
}

/// One traced call's `trace` request, as the coordinator applies it.
fn trace(ledger: &mut Ledger<RedbStore>, lease: Lease, now: i64) -> anyhow::Result<()> {
    let digest = digest(lease.call_id);
    ensure!(ledger.same_body(lease.call_id, Some(&digest))?);
    let decision = ledger.trace(lease, 1, WORKER, TRACE, SERVICE, REPLY_TO, None, now)?;
    ensure!(
        decision == TraceDecision::Granted,
        "trace of {}: {decision:?}",
        lease.call_id
    );
    ensure!(ledger.same_body(lease.call_id, Some(&digest))?);
    Ok(())
}

/// Its `complete`, once the grant is durable.
fn complete(
    ledger: &mut Ledger<RedbStore>,
    lease: Lease,
    n: usize,
    now: i64,
) -> anyhow::Result<()> {
    let reply = Reply::ok(lease.call_id, 1, json!({ "sent": true, "n": n }));
    let decision = ledger.complete(lease, 1, Some(reply), None, now)?;
    ensure!(
        decision == CompleteDecision::Accepted,
        "completion of {}: {decision:?}",
        lease.call_id
    );
    Ok(())
}

/// How a run goes: calls, retention (none: nothing is forgotten), the
/// sweep's period, the most calls a second (0: no pacing).
struct Plan {
    calls: usize,
    retention: Option<Duration>,
    sweep_every: Duration,
    rate: usize,
}

/// Decided records past the retention, not deleted yet: the completions
/// committed before the cut, less the records deleted.
struct Overdue {
    /// Per commit: its wall time and the completions committed by then.
    commits: VecDeque<(i64, usize)>,
    before_cut: usize,
}

impl Overdue {
    fn committed(&mut self, at_ms: i64, done: usize) {
        self.commits.push_back((at_ms, done));
    }

    fn at(&mut self, now_ms: i64, retention: Duration, forgotten: usize) -> usize {
        let cut = now_ms - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        while let Some(&(at, done)) = self.commits.front() {
            if at >= cut {
                break;
            }
            self.before_cut = done;
            self.commits.pop_front();
        }
        self.before_cut.saturating_sub(forgotten)
    }
}

/// Runs `plan` on a new store at `path`.
fn run(label: &str, path: &Path, plan: &Plan) -> anyhow::Result<Run> {
    let Plan {
        calls,
        retention,
        sweep_every,
        rate,
    } = *plan;
    let store = RedbStore::open(path).context("opening the store")?;
    let mut ledger = Ledger::open(store)?;
    if let Some(retention) = retention {
        ledger.set_retention(retention);
    }
    let size = |ledger: &Ledger<RedbStore>| {
        ledger
            .store()
            .size_bytes()
            .context("the redb store reports its size")
    };
    println!("{label}:");
    println!(
        "  {:>9} {:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9}",
        "calls", "s", "calls/s", "last/s", "open", "decided", "overdue", "MiB"
    );
    let mut overdue = Overdue {
        commits: VecDeque::new(),
        before_cut: 0,
    };
    let mut sweeps = Sweeps::default();
    let started = Instant::now();
    let mut swept = Instant::now();
    let mut last = (0, Instant::now());
    let mut traced: Vec<Lease> = Vec::with_capacity(IN_FLIGHT);
    let mut next = 0;
    let mut done = 0;
    let mut half_bytes = None;
    let mut peak_bytes = 0;
    while done < calls {
        if rate > 0 {
            let due = Duration::from_secs_f64(next as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let now = wall_ms()?;
        // The completions of the calls whose grants the last commit made
        // durable, then the traces of new calls.
        for lease in traced.drain(..) {
            complete(&mut ledger, lease, done, now)?;
            done += 1;
        }
        let wave = IN_FLIGHT.min(calls - next);
        for _ in 0..wave {
            let lease = Lease {
                call_id: Uuid::now_v7(),
                copy: 1,
                token: Uuid::now_v7(),
            };
            trace(&mut ledger, lease, now)?;
            traced.push(lease);
        }
        next += wave;
        ensure!(
            ledger.commit()?.is_empty(),
            "a traced call completed by its holder has no effect"
        );
        overdue.committed(wall_ms()?, done);
        if retention.is_some() && swept.elapsed() >= sweep_every {
            swept = Instant::now();
            sweeps.sweep(&mut ledger)?;
        }
        let bytes = size(&ledger)?;
        peak_bytes = peak_bytes.max(bytes);
        if half_bytes.is_none() && done >= calls / 2 {
            half_bytes = Some(bytes);
        }
        // A line each time the count passes a multiple of REPORT_EVERY
        // (batches of IN_FLIGHT do not land on them), and at the end.
        if done / REPORT_EVERY > last.0 / REPORT_EVERY || done == calls {
            let secs = started.elapsed().as_secs_f64();
            let recent = (done - last.0) as f64 / last.1.elapsed().as_secs_f64();
            let late = match retention {
                Some(r) => overdue.at(wall_ms()?, r, sweeps.forgotten).to_string(),
                None => "-".to_owned(),
            };
            println!(
                "  {done:>9} {secs:>8.1} {:>9.0} {recent:>9.0} {:>6} {:>9} {late:>9} {:>9.1}",
                done as f64 / secs,
                ledger.open_calls(),
                done - sweeps.forgotten,
                bytes as f64 / MIB,
            );
            last = (done, Instant::now());
        }
    }
    Ok(Run {
        calls,
        elapsed: started.elapsed(),
        half_bytes: half_bytes.context("the run reached its half")?,
        end_bytes: size(&ledger)?,
        peak_bytes,
        decided: done - sweeps.forgotten,
        sweeps,
    })
}

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(1_000_000)?;
    let retention =
        Duration::from_millis(u64::try_from(support::usize_arg("--retention-ms", 5_000)?)?);
    let control_calls = support::usize_arg("--control", 200_000)?;
    let sweep_every =
        Duration::from_millis(u64::try_from(support::usize_arg("--sweep-ms", 1_000)?)?);
    let rate = support::usize_arg("--rate", 0)?;
    ensure!(calls >= 2 && control_calls >= 2, "at least 2 calls a run");
    let dir = std::env::temp_dir().join(format!("callq-bench-retention-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "retention benchmark: traced calls (trace, then complete) through a Ledger over a \
         RedbStore, {BATCH} requests per commit ({IN_FLIGHT} calls in flight); \
         MiB = the redb file"
    );
    let paced = match rate {
        0 => "unpaced".to_owned(),
        n => format!("at most {n} calls/s"),
    };
    let control = run(
        &format!("control: {control_calls} calls, {paced}, nothing forgotten"),
        &dir.join("control.redb"),
        &Plan {
            calls: control_calls,
            retention: None,
            sweep_every,
            rate,
        },
    )?;
    let capacity = (FORGET_BATCHES * SWEEP_MAX) as f64 / sweep_every.as_secs_f64().max(1e-3);
    let kept = run(
        &format!(
            "retention {} ms: {calls} calls, {paced}, a sweep every {} ms (up to \
             {FORGET_BATCHES} batches of {SWEEP_MAX}: at most {capacity:.0} records/s)",
            retention.as_millis(),
            sweep_every.as_millis()
        ),
        &dir.join("retention.redb"),
        &Plan {
            calls,
            retention: Some(retention),
            sweep_every,
            rate,
        },
    )?;
    std::fs::remove_dir_all(&dir)?;
    println!("summary:");
    for (name, r) in [("control", &control), ("retention", &kept)] {
        println!(
            "  {name:9}: {} calls in {:.1} s ({:.0} calls/s); size {:.1} MiB at {} calls, \
             {:.1} MiB at the end (peak {:.1} MiB): grew {:.1}% over the second half, \
             {}; {} decided records kept, {} forgotten",
            r.calls,
            r.elapsed.as_secs_f64(),
            r.calls as f64 / r.elapsed.as_secs_f64(),
            r.half_bytes as f64 / MIB,
            r.calls / 2,
            r.end_bytes as f64 / MIB,
            r.peak_bytes as f64 / MIB,
            r.second_half_growth(),
            r.levelled(),
            r.decided,
            r.sweeps.forgotten,
        );
    }
    let s = &kept.sweeps;
    let kept_rate = kept.calls as f64 / kept.elapsed.as_secs_f64();
    println!(
        "  the sweep deletes at most {capacity:.0} records/s, the run decided {kept_rate:.0} \
         calls/s: {}",
        if kept_rate <= capacity {
            "it can keep up"
        } else {
            "it cannot keep up, decided records pile up past the retention"
        }
    );
    println!(
        "  sweeps   : {} of them, {:.1} ms each on average, longest {:.1} ms ({:.1}% of the run)",
        s.count,
        s.took.as_secs_f64() * 1000.0 / s.count.max(1) as f64,
        s.longest.as_secs_f64() * 1000.0,
        s.took.as_secs_f64() * 100.0 / kept.elapsed.as_secs_f64()
    );
    let per_call = control.end_bytes as f64 / control.calls as f64;
    println!(
        "  without forgetting, the control's file came to {per_call:.0} bytes a call (redb \
         grows its file in steps): {:.1} MiB for {calls} calls at that rate (extrapolated); \
         with retention the file ends at {:.1} MiB",
        per_call * calls as f64 / MIB,
        kept.end_bytes as f64 / MIB,
    );
    Ok(())
}
