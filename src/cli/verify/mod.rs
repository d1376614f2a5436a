//! `callq verify`: the call contract checked on a real broker under
//! faults. For each seed it starts a coordinator and workers of its own
//! (with fault hooks), drives a seeded mix of calls, applies the seed's
//! faults while they run, then checks every call and every effect.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use callq_node::Admin;
use callq_schemas::protocol::WorkerState;
use callq_schemas::{Call, Outcome, Uuid};
use serde_json::json;
use tokio::time::Instant;

use super::broker::connect;
use super::config::Settings;
use super::hooks::Broken;

mod check;
mod faults;
mod fleet;
mod load;
mod rng;

use check::{Kind, Observed, Verdict};
use faults::{Fault, Timing};
use fleet::{Fleet, Setup};
use load::{Mix, Names, Recorder};
use rng::Rng;

const ABOUT: &str = "\
Checks callq's promise on a real broker under faults. For each seed it
starts a coordinator (on a store in --dir) and --workers workers of its own,
from this binary, with fault hooks; drives a seeded mix of calls (echo.sleep,
mail.send into a file, bank.transfer between accounts in PostgreSQL,
counter.add on sessions); applies the seed's faults while the calls run;
then checks every call:

  one outcome   every call the broker confirmed ends in exactly one outcome
                (several replies only if they agree); none is lost
  no doubles    no mail line twice; one callq_outbox row per ok transfer and
                none for another; every balance equals its opening balance
                plus the transfers that committed, and their sum is unchanged;
                each counter equals the sum of its acknowledged adds
  fatal         only for a call whose lost attempt was granted a non-exact
                trace (mail.sent); each such call is named
  outcomes      echo ok; mail ok or fatal; transfer ok, fatal never, or
                insufficient_funds; add ok or session_conflict; any call
                delivery_limit (its deliveries used up by the faults), and
                then nothing of it shows

Faults (--faults), each at a time the seed picks, each reporting how many
calls were in flight when it hit:

  kill-worker       kill -9 of a worker; a new one starts (as an agent would)
  stop-worker       SIGSTOP of a worker for --pause-ms, then SIGCONT
  kill-coordinator  kill -9 of the coordinator, started again on its store
  stop-coordinator  SIGSTOP of the coordinator for --pause-ms, then SIGCONT
  crash             a worker dies at a point of a call, in turn: before the
                    handler, after a trace grant, after the handler's commit
                    before the ack, after the ack
  broker-restart    runs --broker-restart (e.g. a node's stop_app; start_app)
  partition         a worker in a network namespace (root; its broker URL is
                    --partition-broker) cut off for --partition-ms, then let
                    back

It prints each seed's verdict, its figures and the command that replays it,
and exits 0 when every seed passed, 1 when one failed. The broker, the
database and every other setting come from the configuration, as for the
other commands (CALLQ_BROKER, CALLQ_POSTGRES, CALLQ_*). Point it at a virtual
host of its own: it publishes to callq.call.echo, .mail, .bank and .counter.";

#[derive(clap::Args)]
#[command(long_about = ABOUT)]
pub(crate) struct Args {
    /// The seeds, comma-separated: each a whole run with its own calls and
    /// faults; a failed seed replays with `--seeds N` and the same options.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    seeds: Vec<u64>,
    /// Calls per seed.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Calls published per second (0: as fast as --concurrency allows).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Calls in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The services mixed, comma-separated: echo, mail, bank (needs
    /// PostgreSQL), counter.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "echo,mail,bank,counter"
    )]
    mix: Vec<Mix>,
    /// The faults, comma-separated (see above), or `none`. Default: every
    /// fault the other options make possible.
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<String>>,
    /// Faults per seed (default: one of each kind, and three more crashes,
    /// so that each seed crashes a worker at each of the four points).
    #[arg(long)]
    fault_count: Option<usize>,
    /// Workers started (besides the one in a namespace for `partition`).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// How long stop-worker and stop-coordinator pause a process.
    #[arg(long, default_value_t = 3000)]
    pause_ms: u64,
    /// How long a partition lasts: past dead_after and the broker's
    /// heartbeat timeout (a short `heartbeat=` in --partition-broker).
    #[arg(long, default_value_t = 6000)]
    partition_ms: u64,
    /// A shell command that restarts the broker (enables broker-restart).
    #[arg(long)]
    broker_restart: Option<String>,
    /// The broker URL of the worker in a network namespace, `{host}` for
    /// the host's address as the namespace sees it (enables partition).
    #[arg(long)]
    partition_broker: Option<String>,
    /// How long to wait for the last outcomes after the last call was
    /// published, in seconds.
    #[arg(long, default_value_t = 180)]
    settle_secs: u64,
    /// Where the seeds' stores, outboxes and process logs go (default: a
    /// new directory under the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Start workers broken on purpose, to see verify fail: `ack-early`
    /// acks each call before answering it, `run-twice` runs each mail twice.
    #[arg(long, value_enum)]
    broken: Option<Broken>,
}

/// Accounts and sessions of a seed, and each account's opening balance.
const ACCOUNTS: usize = 8;
const SESSIONS: usize = 8;
const OPENING: i64 = 1_000;

/// Runs every seed; exits 1 when one failed.
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config)?;
    let kinds = kinds(&args)?;
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("callq-verify-{}", Uuid::now_v7().simple())),
    };
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    // The processes run in the seeds' directories: paths must not be
    // relative to this one.
    let base =
        std::path::absolute(&base).with_context(|| format!("cannot resolve {}", base.display()))?;
    let names: Vec<String> = kinds.iter().map(|k| k.name()).collect();
    println!(
        "callq verify: {} seed(s) x {} calls, faults: {}; files in {}",
        args.seeds.len(),
        args.calls,
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        },
        base.display()
    );
    let mut total = Verdict::default();
    let (mut failed, mut faults_applied) = (Vec::new(), 0);
    for &seed in &args.seeds {
        let run = Seed {
            seed,
            args: &args,
            kinds: &kinds,
            settings: &settings,
            config,
            dir: base.join(format!("seed-{seed}")),
        };
        let (verdict, applied) = run.run().await.with_context(|| format!("seed {seed}"))?;
        faults_applied += applied;
        total.calls += verdict.calls;
        total.lost += verdict.lost;
        total.doubled += verdict.doubled;
        total.fatal_without_trace += verdict.fatal_without_trace;
        if !verdict.passed() {
            failed.push(seed);
        }
    }
    println!(
        "verify: seeds {}, failed {}, calls {}, faults {faults_applied}, lost {}, doubled {}, fatal without a granted trace {}",
        args.seeds.len(),
        failed.len(),
        total.calls,
        total.lost,
        total.doubled,
        total.fatal_without_trace
    );
    if failed.is_empty() {
        println!("PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        let list: Vec<String> = failed.iter().map(u64::to_string).collect();
        println!("FAIL: seeds {}", list.join(","));
        Ok(ExitCode::from(1))
    }
}

/// The faults to apply: those named, or every one the options allow.
fn kinds(args: &Args) -> anyhow::Result<Vec<Fault>> {
    use clap::ValueEnum as _;
    let named = match &args.faults {
        None => Fault::value_variants()
            .iter()
            .copied()
            .filter(|f| match f {
                Fault::BrokerRestart => args.broker_restart.is_some(),
                Fault::Partition => args.partition_broker.is_some(),
                _ => true,
            })
            .collect(),
        Some(list) if list.iter().any(|f| f == "none") => Vec::new(),
        Some(list) => list
            .iter()
            .map(|f| Fault::from_str(f, true).map_err(|e| anyhow::anyhow!("--faults: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    if named.contains(&Fault::BrokerRestart) && args.broker_restart.is_none() {
        anyhow::bail!(
            "the fault broker-restart needs --broker-restart CMD, the command that restarts the broker"
        );
    }
    if named.contains(&Fault::Partition) && args.partition_broker.is_none() {
        anyhow::bail!(
            "the fault partition needs --partition-broker URL, the broker as a worker in a network namespace reaches it (`{{host}}` for the host's address)"
        );
    }
    anyhow::ensure!(args.calls > 0, "--calls must be at least 1");
    anyhow::ensure!(!args.mix.is_empty(), "--mix names no service");
    Ok(named)
}

/// One seed's run.
struct Seed<'a> {
    seed: u64,
    args: &'a Args,
    kinds: &'a [Fault],
    settings: &'a Settings,
    config: Option<&'a Path>,
    dir: PathBuf,
}

/// A fault as it was applied: the calls in flight when it hit.
struct Applied {
    in_flight: usize,
}

impl Seed<'_> {
    async fn run(&self) -> anyhow::Result<(Verdict, usize)> {
        let args = self.args;
        std::fs::create_dir_all(&self.dir)?;
        let tag = format!(
            "verify-{}-{}",
            self.seed,
            &Uuid::now_v7().simple().to_string()[20..]
        );
        let mut mix = args.mix.clone();
        mix.sort_unstable();
        mix.dedup();
        let services: Vec<&str> = mix.iter().map(|m| m.service()).collect();
        let mut fleet = Fleet::new(Setup {
            dir: self.dir.clone(),
            config: self.config.map(Path::to_path_buf),
            tag: tag.clone(),
            services: services.join(","),
            broken: args.broken,
        });
        let broker = connect(self.settings, "verify").await?;
        let recorder = std::sync::Arc::new(
            Recorder::start(broker.clone(), &services, args.concurrency).await?,
        );
        fleet.start_coordinator()?;
        for _ in 0..args.workers {
            fleet.start_worker(None)?;
        }
        if self.kinds.contains(&Fault::Partition) {
            let ns = callq_testkit::netns::Netns::create(&format!("v{}", self.seed))?;
            let url = args
                .partition_broker
                .as_deref()
                .unwrap_or_default()
                .replace("{host}", &ns.host_addr().to_string());
            fleet.start_worker(Some((ns, &url)))?;
        }
        let admin = Admin::connect(broker.clone(), self.settings.patience()).await?;
        ready(&admin, fleet.workers.len(), &mut fleet).await?;
        let names = Names {
            tag,
            outbox: self.dir.join("mail.outbox").to_string_lossy().into_owned(),
            accounts: ACCOUNTS,
            sessions: SESSIONS,
        };
        if mix.contains(&Mix::Bank) {
            open_accounts(&recorder, &names).await?;
        }
        let mut rng = Rng::new(self.seed);
        let planned = load::plan(&mut rng, &mix, args.calls, &names);
        let crashes = if self.kinds.contains(&Fault::Crash) {
            3
        } else {
            0
        };
        let count = args.fault_count.unwrap_or(self.kinds.len() + crashes);
        let schedule = faults::schedule(&mut rng, self.kinds, count);
        println!(
            "seed {}: {} calls, {} faults",
            self.seed,
            args.calls,
            schedule.len()
        );
        let timing = Timing {
            pause: Duration::from_millis(args.pause_ms),
            partition: Duration::from_millis(args.partition_ms),
            broker_restart: args.broker_restart.clone(),
        };
        let start = Instant::now();
        let calls = args.calls;
        let hits = async {
            let mut applied = Vec::new();
            for p in &schedule {
                while (recorder.published.load(Ordering::Relaxed) as f64) < p.after * calls as f64 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // A fault that hits an idle cluster shows nothing: it waits
                // (a little) for calls in flight.
                let busy = Instant::now() + Duration::from_secs(5);
                let mut in_flight = recorder.in_flight();
                while in_flight == 0 && Instant::now() < busy {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    in_flight = recorder.in_flight();
                }
                let at = start.elapsed();
                let what = faults::apply(&mut fleet, p, &timing).await?;
                println!(
                    "  {:>6.1} s  {:<16} {in_flight:>4} calls in flight: {what}",
                    at.as_secs_f64(),
                    p.fault.name()
                );
                applied.push(Applied { in_flight });
            }
            Ok::<_, anyhow::Error>(applied)
        };
        // The load runs on a task of its own: a fault that blocks (a
        // process's kill, a namespace's cut) never holds a publish up.
        let load = tokio::spawn({
            let (recorder, rate) = (recorder.clone(), args.rate);
            load::drive(recorder, planned, rate)
        });
        let progress = tokio::spawn({
            let (recorder, seed) = (recorder.clone(), self.seed);
            async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                every.tick().await;
                loop {
                    every.tick().await;
                    eprintln!(
                        "  seed {seed}: {:.0} s, {} of {calls} calls published, {} in flight",
                        start.elapsed().as_secs_f64(),
                        recorder.published.load(Ordering::Relaxed),
                        recorder.in_flight()
                    );
                }
            }
        });
        let applied = hits.await;
        let sent = load.await.context("the load's task failed")?;
        progress.abort();
        let applied = applied?;
        let published = start.elapsed();
        settle(&recorder, &sent, Duration::from_secs(args.settle_secs)).await;
        let ended = start.elapsed();
        let seen = self.observe(&recorder, sent, &names, &mix).await?;
        fleet.shutdown();
        let verdict = check::judge(&seen);
        self.print(&verdict, &applied, published, ended);
        Ok((verdict, applied.len()))
    }

    /// What the run left: replies, mail lines, balances, outbox rows,
    /// counters.
    async fn observe(
        &self,
        recorder: &Recorder,
        sent: Vec<check::Sent>,
        names: &Names,
        mix: &[Mix],
    ) -> anyhow::Result<Observed> {
        let mut seen = Observed {
            mail_lines: load::mail_lines(Path::new(&names.outbox)),
            opening: OPENING,
            ..Observed::default()
        };
        if mix.contains(&Mix::Bank) {
            let transfers: Vec<Uuid> = sent
                .iter()
                .filter(|s| matches!(s.kind, Kind::Bank { .. }))
                .map(|s| s.call_id)
                .collect();
            let (balances, rows) = bank_state(names, &transfers).await?;
            seen.balances = balances;
            seen.outbox_rows = rows;
        }
        if mix.contains(&Mix::Counter) {
            for s in 0..names.sessions {
                let mut call = Call::new("counter", "get", json!({}));
                call.session_id = Some(names.session(s));
                let reply = recorder.call(call, Duration::from_secs(60)).await?;
                let value = reply
                    .result
                    .as_ref()
                    .and_then(|r| r.get("value"))
                    .and_then(serde_json::Value::as_i64)
                    .with_context(|| format!("counter.get answered {reply:?}"))?;
                seen.counters.push(value);
            }
        }
        seen.replies = recorder.replies();
        seen.sent = sent;
        Ok(seen)
    }

    fn print(&self, v: &Verdict, applied: &[Applied], published: Duration, ended: Duration) {
        let outcomes: Vec<String> = v
            .by_outcome
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        println!(
            "seed {}: {} calls published in {:.1} s, all ended in {:.1} s; outcomes: {}",
            self.seed,
            v.calls,
            published.as_secs_f64(),
            ended.as_secs_f64(),
            outcomes.join(", ")
        );
        let least = applied.iter().map(|a| a.in_flight).min().unwrap_or(0);
        println!(
            "  faults applied {} (fewest calls in flight at a hit: {least}); retried {}; duplicate replies {}; unconfirmed publishes {}; out of deliveries {}",
            applied.len(),
            v.retried,
            v.duplicate_replies,
            v.unconfirmed,
            v.delivery_limit
        );
        println!(
            "  lost {}, doubled {}, fatal without a granted trace {}, fatal for a granted trace {}",
            v.lost,
            v.doubled,
            v.fatal_without_trace,
            v.fatal_with_trace.len()
        );
        for (id, traces) in v.fatal_with_trace.iter().take(10) {
            println!(
                "    fatal {id}: its lost attempt held {}",
                traces.join(", ")
            );
        }
        if v.passed() {
            println!("seed {}: PASS", self.seed);
            return;
        }
        for violation in v.violations.iter().take(20) {
            println!("  VIOLATION: {violation}");
        }
        if v.violations.len() > 20 {
            println!("  ... and {} more", v.violations.len() - 20);
        }
        println!(
            "seed {}: FAIL (replay: callq verify --seeds {} with the same options; logs in {})",
            self.seed,
            self.seed,
            self.dir.display()
        );
    }
}

/// Waits until the coordinator counts `workers` active workers.
async fn ready(admin: &Admin, workers: usize, fleet: &mut Fleet) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let gone = fleet.reap();
        anyhow::ensure!(
            gone.is_empty(),
            "worker(s) {gone:?} exited at start: see their logs"
        );
        anyhow::ensure!(
            fleet.coordinator_runs(),
            "the coordinator exited at start: see its log, coordinator.log"
        );
        if let Ok(status) = admin.status().await {
            let active = status
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Active)
                .count();
            if active >= workers {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the cluster did not have {workers} active workers within 60 s: see the logs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens the seed's accounts.
async fn open_accounts(recorder: &Recorder, names: &Names) -> anyhow::Result<()> {
    for i in 0..names.accounts {
        let args = json!({ "account": names.account(i), "cents": OPENING });
        let reply = recorder
            .call(Call::new("bank", "open", args), Duration::from_secs(60))
            .await?;
        anyhow::ensure!(
            reply.outcome == Outcome::Ok,
            "bank.open answered {}: {:?} (is PostgreSQL up, CALLQ_POSTGRES right?)",
            reply.outcome,
            reply.error
        );
    }
    Ok(())
}

/// Waits until every call has an outcome, or `within` passed.
async fn settle(recorder: &Recorder, sent: &[check::Sent], within: Duration) {
    let until = Instant::now() + within;
    while Instant::now() < until {
        let unanswered = sent
            .iter()
            .filter(|s| recorder.reply(s.call_id).is_none())
            .count();
        if unanswered == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long verify waits for PostgreSQL: a connection, each query.
const PG_QUERY: Duration = Duration::from_secs(30);

/// The balances of the seed's accounts and the outbox rows of its
/// transfers, read from PostgreSQL.
async fn bank_state(
    names: &Names,
    transfers: &[Uuid],
) -> anyhow::Result<(Vec<i64>, std::collections::HashMap<Uuid, usize>)> {
    let url =
        std::env::var("CALLQ_POSTGRES").unwrap_or_else(|_| callq_node::pg::DEFAULT_URL.to_owned());
    let pool = callq_node::pg::pool(&url, 1)
        .map_err(|e| anyhow::anyhow!("CALLQ_POSTGRES: {}", e.message))?;
    let client = tokio::time::timeout(PG_QUERY, pool.get())
        .await
        .context("no PostgreSQL connection within 30 s")?
        .context("connecting to PostgreSQL")?;
    let ids: Vec<String> = (0..names.accounts).map(|i| names.account(i)).collect();
    let rows = tokio::time::timeout(
        PG_QUERY,
        client.query(
            "select id, cents from bank_accounts where id = any($1)",
            &[&ids],
        ),
    )
    .await
    .context("PostgreSQL did not answer the balances query within 30 s")?
    .context("reading the balances")?;
    let balances = ids
        .iter()
        .map(|id| {
            rows.iter()
                .find(|r| r.get::<_, String>(0) == *id)
                .map_or(0, |r| r.get::<_, i64>(1))
        })
        .collect();
    let ids = transfers.to_vec();
    let rows = tokio::time::timeout(
        PG_QUERY,
        client.query(
            "select call_id, count(*) from callq_outbox where call_id = any($1) group by call_id",
            &[&ids],
        ),
    )
    .await
    .context("PostgreSQL did not answer the callq_outbox query within 30 s")?
    .context("reading callq_outbox")?;
    let outbox = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, Uuid>(0),
                usize::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            )
        })
        .collect();
    Ok((balances, outbox))
}
