//! A load under faults: calls of `echo.sleep` and `mail.send` through an
//! in-process cluster while workers are killed mid-flight, with an account of
//! how every call ended. The demo and the failover tests run it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use callq_coordinator::Store;
use callq_node::services::MAIL_SENT;
use callq_schemas::{Outcome, Reply, Uuid};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use callq_node::{Admin, Client};

use crate::cluster::{ClusterOptions, LocalCluster};

/// The load and the faults.
#[derive(Debug, Clone)]
pub struct ChaosSpec {
    /// The cluster.
    pub cluster: ClusterOptions,
    /// Active workers at the start (each serves `echo` and `mail`).
    pub workers: usize,
    /// Standby workers at the start.
    pub standbys: usize,
    /// Calls in all.
    pub calls: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Every n-th call is a `mail.send` (0: none); the others `echo.sleep`.
    pub mail_every: usize,
    /// How long each call works: `echo.sleep` sleeps this long, `mail.send`
    /// waits half of it before its trace and half after.
    pub work: Duration,
    /// A worker is killed this often, the busiest first.
    pub kill_every: Duration,
    /// Kills in all, at most.
    pub max_kills: usize,
    /// Whether a killed worker is replaced at once by a new one (as a node
    /// agent restarts a crashed process).
    pub replace_killed: bool,
    /// Each call's timeout.
    pub timeout: Duration,
    /// Where `mail.send` appends its lines.
    pub outbox: PathBuf,
    /// Print a progress line to stderr.
    pub progress: bool,
}

/// A call's end, as the client saw it.
#[derive(Debug, Clone)]
pub struct Ended {
    /// The call.
    pub call_id: Uuid,
    /// Whether it was a `mail.send`.
    pub mail: bool,
    /// Its reply; `None` if it could not be published.
    pub reply: Option<Reply>,
    /// Its round trip.
    pub latency: Duration,
    /// When it ended, since the start of the load.
    pub at: Duration,
}

/// What happened.
#[derive(Debug)]
pub struct ChaosReport {
    /// Every call's end, in the order they ended.
    pub ended: Vec<Ended>,
    /// Workers killed, with the time of each kill since the start.
    pub kills: Vec<(String, Duration)>,
    /// The call ids found in the outbox, one per mail sent.
    pub mails_sent: Vec<Uuid>,
    /// Wall (or paused-clock) time of the whole load.
    pub elapsed: Duration,
    /// The expected work of one call, to tell waiting from working.
    pub work: Duration,
    /// Standbys promoted, per the coordinator.
    pub promotions: u64,
    /// Workers the coordinator declared dead.
    pub deaths: u64,
}

impl ChaosReport {
    /// Calls per final outcome.
    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for e in &self.ended {
            let key = e
                .reply
                .as_ref()
                .map_or("not published", |r| r.outcome.as_str());
            *m.entry(key).or_insert(0) += 1;
        }
        m
    }

    /// Calls answered `ok` by an attempt above 1: retried transparently.
    pub fn retried_ok(&self) -> usize {
        self.ended
            .iter()
            .filter(|e| {
                e.reply
                    .as_ref()
                    .is_some_and(|r| r.outcome == Outcome::Ok && r.attempt > 1)
            })
            .count()
    }

    /// The `fatal` replies.
    pub fn fatal(&self) -> Vec<&Reply> {
        self.ended
            .iter()
            .filter_map(|e| e.reply.as_ref())
            .filter(|r| r.outcome == Outcome::Fatal)
            .collect()
    }

    /// Per kill, the time from the kill to the next reply of a call that
    /// was on a lost worker (answered by a later attempt, or `fatal`): the
    /// pause the clients of the dead worker felt.
    pub fn failover_pauses(&self) -> Vec<(String, Duration)> {
        self.kills
            .iter()
            .filter_map(|(worker, killed)| {
                self.ended
                    .iter()
                    .filter(|e| {
                        e.at > *killed
                            && e.reply
                                .as_ref()
                                .is_some_and(|r| r.attempt > 1 || r.outcome == Outcome::Fatal)
                    })
                    .map(|e| e.at - *killed)
                    .min()
                    .map(|pause| (worker.clone(), pause))
            })
            .collect()
    }

    /// Calls ended per second of the load.
    pub fn rate(&self) -> f64 {
        self.ended.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The round trip's median, 99th percentile and maximum, in
    /// milliseconds (zeros when no call ended).
    pub fn latency_ms(&self) -> (f64, f64, f64) {
        let mut l: Vec<Duration> = self.ended.iter().map(|e| e.latency).collect();
        l.sort_unstable();
        let at = |q: f64| {
            l.get(((l.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        (at(0.50), at(0.99), at(1.0))
    }

    /// The longest a retried call waited beyond its own work: the failover
    /// pause its client felt.
    pub fn failover_pause(&self) -> Option<Duration> {
        self.ended
            .iter()
            .filter(|e| e.reply.as_ref().is_some_and(|r| r.attempt > 1))
            .map(|e| e.latency.saturating_sub(self.work))
            .max()
    }

    /// Everything that breaks the call contract; empty when it held:
    /// one final outcome per call, none lost, `fatal` only after a granted
    /// trace, each mail sent at most once, every `ok` mail sent exactly once.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut seen = HashSet::new();
        let mut sent: HashMap<Uuid, usize> = HashMap::new();
        for id in &self.mails_sent {
            *sent.entry(*id).or_insert(0) += 1;
        }
        for (id, n) in &sent {
            if *n > 1 {
                v.push(format!("mail of call {id} sent {n} times"));
            }
        }
        for e in &self.ended {
            if !seen.insert(e.call_id) {
                v.push(format!("call {} ended twice", e.call_id));
            }
            let Some(r) = &e.reply else {
                v.push(format!("call {} was not published", e.call_id));
                continue;
            };
            match r.outcome {
                Outcome::Ok if e.mail && sent.get(&e.call_id) != Some(&1) => {
                    v.push(format!(
                        "call {} is ok but its mail was not sent once",
                        e.call_id
                    ));
                }
                Outcome::Ok => {}
                Outcome::Fatal => {
                    let traces = r
                        .error
                        .as_ref()
                        .map(|x| x.traces.clone())
                        .unwrap_or_default();
                    if !e.mail || traces != [MAIL_SENT] {
                        v.push(format!(
                            "call {} ended fatal without a granted trace: {traces:?}",
                            e.call_id
                        ));
                    }
                }
                other => v.push(format!("call {} ended {other}: {:?}", e.call_id, r.error)),
            }
        }
        v
    }

    /// The report, as the demo prints it.
    pub fn print(&self) {
        let outcomes = self
            .outcomes()
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{} calls in {:.2} s; outcomes: {outcomes}",
            self.ended.len(),
            self.elapsed.as_secs_f64()
        );
        let (p50, p99, max) = self.latency_ms();
        println!(
            "  {:.0} calls/s; round trip p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (each call works {} ms)",
            self.rate(),
            self.work.as_millis()
        );
        let pauses: HashMap<_, _> = self.failover_pauses().into_iter().collect();
        for (w, at) in &self.kills {
            match pauses.get(w) {
                Some(p) => println!(
                    "  killed {w} at {:.2} s; the first reply to a call it held came {:.0} ms later (failover delay)",
                    at.as_secs_f64(),
                    p.as_secs_f64() * 1000.0
                ),
                None => println!("  killed {w} at {:.2} s", at.as_secs_f64()),
            }
        }
        println!(
            "  re-issued or redelivered and answered ok transparently: {}",
            self.retried_ok()
        );
        let fatal = self.fatal();
        println!(
            "  fatal: {} (each had declared a trace before its worker died)",
            fatal.len()
        );
        if let Some(e) = fatal.first().and_then(|r| r.error.as_ref()) {
            println!("    for example: {}", e.message);
        }
        if let Some(p) = self.failover_pause() {
            println!(
                "  failover pause: the retried call that waited longest waited {:.0} ms beyond its own work (its client's worst case)",
                p.as_secs_f64() * 1000.0
            );
        }
        println!(
            "  coordinator: workers declared dead: {}, standbys promoted: {}",
            self.deaths, self.promotions
        );
        println!(
            "  mails sent: {} lines for {} distinct calls",
            self.mails_sent.len(),
            self.mails_sent.iter().collect::<HashSet<_>>().len()
        );
        let violations = self.violations();
        if violations.is_empty() {
            println!("  contract held: one final outcome per call, none lost, no mail sent twice");
        } else {
            for v in &violations {
                println!("  VIOLATION: {v}");
            }
        }
    }
}

/// What a load under faults kills: a cluster whose workers can be killed.
pub trait Fleet {
    /// Kills the busiest worker on the spot (and replaces it, if the fleet
    /// does); the id of the worker killed, `None` if none was busy.
    fn kill_busiest(&mut self) -> impl Future<Output = anyhow::Result<Option<String>>>;
}

/// The in-process cluster as a [`Fleet`].
struct Local<'a> {
    cluster: &'a mut LocalCluster,
    replace: bool,
    next_id: usize,
}

impl Fleet for Local<'_> {
    async fn kill_busiest(&mut self) -> anyhow::Result<Option<String>> {
        let busiest = self
            .cluster
            .worker_ids()
            .into_iter()
            .filter_map(|id| {
                let n = self.cluster.stats(&id)?.in_flight.load(Ordering::Relaxed);
                (n > 0).then_some((n, id))
            })
            .max();
        let Some((_, id)) = busiest else {
            return Ok(None);
        };
        self.cluster.kill(&id);
        if self.replace {
            let new = format!("worker-{}", self.next_id);
            self.next_id += 1;
            self.cluster.spawn_worker(&new, &SERVICES, false).await?;
        }
        Ok(Some(id))
    }
}

const SERVICES: [&str; 2] = ["echo", "mail"];

/// How long the load waits for its fleet to kill a worker.
const KILL_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the load under faults on an in-process cluster and accounts for
/// every call.
pub async fn run<S: Store + 'static>(spec: &ChaosSpec, store: S) -> anyhow::Result<ChaosReport> {
    let mut cluster = LocalCluster::start(spec.cluster.clone(), store).await?;
    for i in 1..=spec.workers {
        cluster
            .spawn_worker(&format!("worker-{i}"), &SERVICES, false)
            .await?;
    }
    for i in 1..=spec.standbys {
        cluster
            .spawn_worker(&format!("standby-{i}"), &SERVICES, true)
            .await?;
    }
    let client = cluster.client().await?;
    let admin = cluster.admin().await?;
    let mut fleet = Local {
        cluster: &mut cluster,
        replace: spec.replace_killed,
        next_id: spec.workers + 1,
    };
    let report = drive(spec, &client, &admin, &mut fleet).await?;
    cluster.shutdown().await?;
    Ok(report)
}

/// Runs the load of `spec` through `client`, killing the busiest worker of
/// `fleet` every `spec.kill_every`, and accounts for every call. The
/// cluster's own fields of `spec` (`cluster`, `workers`, `standbys`,
/// `replace_killed`) are the fleet's business.
pub async fn drive(
    spec: &ChaosSpec,
    client: &Client,
    admin: &Admin,
    fleet: &mut impl Fleet,
) -> anyhow::Result<ChaosReport> {
    let half = u64::try_from(spec.work.as_millis() / 2).unwrap_or(u64::MAX);
    let work_ms = half * 2;
    let start = Instant::now();
    // Each call runs on a task of its own, and the calls are started by a
    // task of their own: a kill that takes its time (it asks the coordinator
    // which worker is busiest) never holds a call up, and a call waiting to
    // be polled never holds a publish slot that others wait for.
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::channel(spec.calls.max(1));
    let feeder = {
        let (client, outbox, timeout) = (client.clone(), spec.outbox.clone(), spec.timeout);
        let (calls, mail_every, concurrency) = (spec.calls, spec.mail_every, spec.concurrency);
        tokio::spawn(async move {
            let mut calls = futures::stream::iter(0..calls)
                .map(|i| {
                    let mail = mail_every > 0 && i % mail_every == 0;
                    let (service, method, args) = if mail {
                        let args = json!({"outbox": outbox, "to": format!("user{i}@example.com"),
                                          "subject": "hello", "before_ms": half, "after_ms": half});
                        ("mail", "send", args)
                    } else {
                        ("echo", "sleep", json!({"ms": work_ms}))
                    };
                    let client = client.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let mut call = callq_schemas::Call::new(service, method, args);
                        call.deadline = Some(time::OffsetDateTime::now_utc() + timeout);
                        let call_id = call.call_id;
                        let reply = client.send(call, timeout).await.ok();
                        Ended {
                            call_id,
                            mail,
                            reply,
                            latency: t.elapsed(),
                            at: start.elapsed(),
                        }
                    })
                })
                .buffer_unordered(concurrency.max(1));
            while let Some(e) = calls.next().await {
                if ended_tx.send(e?).await.is_err() {
                    break;
                }
            }
            Ok::<_, tokio::task::JoinError>(())
        })
    };
    let mut ended = Vec::with_capacity(spec.calls);
    let mut kills = Vec::new();
    let mut killer = tokio::time::interval_at(start + spec.kill_every, spec.kill_every);
    // A kill that took longer than the period does not make up for it.
    killer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            e = ended_rx.recv() => match e {
                Some(e) => ended.push(e),
                None => break,
            },
            _ = killer.tick(), if kills.len() < spec.max_kills => {
                let at = start.elapsed();
                // A fleet that cannot kill within a second skips this one.
                // The kill's time is taken once it is done: finding the
                // busiest worker may take a status round trip.
                match tokio::time::timeout(KILL_TIMEOUT, fleet.kill_busiest()).await {
                    Ok(Ok(Some(id))) => kills.push((id, start.elapsed())),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => tracing::warn!(
                        at_s = at.as_secs_f64(),
                        "no worker killed: the fleet did not answer within {KILL_TIMEOUT:?}"
                    ),
                }
            }
            _ = progress.tick(), if spec.progress => {
                eprint!("\r  {:>8} / {} calls, {} killed", ended.len(), spec.calls, kills.len());
                let _ = std::io::stderr().flush();
            }
        }
    }
    let elapsed = start.elapsed();
    if spec.progress {
        eprintln!(
            "\r  {:>8} / {} calls, {} killed",
            ended.len(),
            spec.calls,
            kills.len()
        );
    }
    feeder.await??;
    let status = admin.status().await?;
    let mails_sent = std::fs::read_to_string(&spec.outbox)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').next()?.parse().ok())
        .collect();
    Ok(ChaosReport {
        ended,
        kills,
        mails_sent,
        elapsed,
        work: Duration::from_millis(work_ms),
        promotions: status.promotions,
        deaths: status.deaths,
    })
}
