//! What the benches share: latency histograms and the result table, the
//! `--calls N` argument, the `echo.echo` load, the CPU time of this process
//! and of the broker read from `/proc`, a RabbitMQ virtual host of their
//! own, and a callq cluster (coordinator, one worker, client) in this
//! process. Each bench includes it with `mod support;` and uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use callq_broker::{Broker, QueueSpec};
use callq_coordinator::{Coordinator, CoordinatorOptions, Ledger, MemoryStore};
use callq_node::{Client, ClientOptions, Service, Worker, WorkerOptions, services};
use callq_schemas::{Call, Outcome};
use callq_testkit::load::{self, LoadReport, LoadSpec};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------
// Latency, the arguments, the verdicts.

/// A latency histogram in microseconds, up to a minute.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// Records `took` in microseconds (at least 1; a minute and more saturates).
pub(crate) fn record(h: &mut Histogram<u64>, took: Duration) {
    h.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
}

/// A percentile of a histogram in microseconds, in milliseconds.
pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub(crate) fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// One measured path against its target, as a line `scripts/bench` gathers
/// into its table: tab-separated after the word `target`, with the path,
/// what was measured, the baseline measured in the same run, the ratio,
/// the target and the verdict.
pub(crate) fn target_row(
    path: &str,
    measured: &str,
    baseline: &str,
    ratio: f64,
    target: &str,
    pass: bool,
) {
    println!(
        "target\t{path}\t{measured}\t{baseline}\t{ratio:.2}x\t{target}\t{}",
        verdict(pass)
    );
}

/// The design's targets for callq on a broker against the raw broker.
pub(crate) const P50_TARGET: f64 = 1.15;
pub(crate) const THROUGHPUT_TARGET: f64 = 0.8;
/// Throughput against raw request/reply, like for like (a call is two
/// messages): at least this much in every run.
pub(crate) const LIKE_FOR_LIKE_TARGET: f64 = 0.85;

/// The three ratios of callq against the raw broker, each with its target
/// and verdict: round-trip p50, calls/s against one-way messages/s, and
/// calls/s against raw request/reply/s.
pub(crate) fn echo_ratios(raw: &RawEcho, callq: &CallqEcho) {
    let p50 = callq.serial.percentile_ms(0.5) / ms(&raw.serial, 0.5);
    let one_way = callq.pipelined.rate / raw.one_way.rate;
    let like = callq.pipelined.rate / raw.request_reply.rate;
    println!(
        "ratio callq/raw round-trip p50: {p50:.2}x (target <= {P50_TARGET}) {}",
        verdict(p50 <= P50_TARGET)
    );
    println!(
        "ratio callq calls/s / raw one-way msgs/s: {one_way:.2}x (target >= {THROUGHPUT_TARGET}) {}",
        verdict(one_way >= THROUGHPUT_TARGET)
    );
    println!(
        "ratio callq calls/s / raw request/reply/s (like for like): {like:.2}x (target >= {LIKE_FOR_LIKE_TARGET}) {}",
        verdict(like >= LIKE_FOR_LIKE_TARGET)
    );
}

/// The target rows of an `echo.echo` bench on `broker`: round-trip p50 and
/// like-for-like throughput against the raw broker.
pub(crate) fn echo_targets(broker: &str, raw: &RawEcho, callq: &CallqEcho) {
    let (c50, r50) = (callq.serial.percentile_ms(0.5), ms(&raw.serial, 0.5));
    target_row(
        &format!("{broker} echo.echo p50, 1 in flight"),
        &format!(
            "p50 {c50:.3} ms, p99 {:.3} ms",
            callq.serial.percentile_ms(0.99)
        ),
        &format!("raw request/reply p50 {r50:.3} ms"),
        c50 / r50,
        &format!("<= {P50_TARGET}x"),
        c50 / r50 <= P50_TARGET,
    );
    let like = callq.pipelined.rate / raw.request_reply.rate;
    target_row(
        &format!("{broker} echo.echo calls/s, pipelined"),
        &format!("{:.0} calls/s", callq.pipelined.rate),
        &format!("raw request/reply {:.0}/s", raw.request_reply.rate),
        like,
        &format!(">= {LIKE_FOR_LIKE_TARGET}x"),
        like >= LIKE_FOR_LIKE_TARGET,
    );
}

/// A multi-threaded runtime with its clock and I/O.
pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// The number after `--calls` on the command line, else `default`.
pub(crate) fn calls_arg(default: usize) -> anyhow::Result<usize> {
    usize_arg("--calls", default)
}

/// The number after `flag` on the command line, else `default`.
pub(crate) fn usize_arg(flag: &str, default: usize) -> anyhow::Result<usize> {
    Ok(std::env::args()
        .skip_while(|a| a != flag)
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .with_context(|| format!("{flag} takes a whole number"))?
        .unwrap_or(default))
}

// ---------------------------------------------------------------------------
// The `echo.echo` load, callq beside the raw broker.

/// Calls (or messages) in flight in the pipelined runs, and the worker's
/// capacity.
pub(crate) const PIPELINE: usize = 256;
/// Round trips one at a time, after `WARM_UP` unmeasured ones.
pub(crate) const SERIAL: usize = 2_000;
pub(crate) const WARM_UP: usize = 200;
/// Pipelined calls or messages, unless `--calls N`.
pub(crate) const CALLS: usize = 20_000;

/// The arguments of every call: the call envelope comes to about 300 bytes.
pub(crate) fn args() -> Value {
    json!({"hello": "callq", "n": 42, "pad": "x".repeat(80)})
}

/// A callq call envelope as the client publishes it, used as the raw
/// baseline's body so that both carry the same bytes.
pub(crate) fn envelope() -> Vec<u8> {
    let mut call = Call::new("echo", "echo", args());
    call.reply_to = Some(format!(
        "callq.reply.client-{}",
        uuid::Uuid::now_v7().simple()
    ));
    call.deadline = Some(time::OffsetDateTime::now_utc());
    call.to_bytes()
}

/// `calls` `echo.echo` calls with `concurrency` in flight.
pub(crate) fn spec(calls: usize, concurrency: usize) -> LoadSpec {
    LoadSpec {
        service: "echo".into(),
        method: "echo".into(),
        args: args(),
        calls,
        concurrency,
        timeout: Duration::from_secs(60),
        progress: false,
    }
}

/// Runs the load and insists every call came back `ok`.
pub(crate) async fn run_load(client: &Client, spec: &LoadSpec) -> anyhow::Result<LoadReport> {
    let report = load::run(client, spec).await;
    let ok = report.count(Outcome::Ok);
    ensure!(
        ok == spec.calls as u64 && report.failed == 0,
        "{} of {} calls ok, {} failed: {:?}",
        ok,
        spec.calls,
        report.failed,
        report.outcomes
    );
    Ok(report)
}

// ---------------------------------------------------------------------------
// CPU time from /proc.

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system, all threads) a process used so far.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: field 3 (state) onwards;
    // utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// The processes whose command name is `comm`: each pid with its command
/// line (arguments joined by spaces).
pub(crate) fn processes_named(comm: &str) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?.to_string();
            let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (name.trim() == comm).then_some(())?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .collect()
}

/// CPU used by this process (requester and responder, or client, worker
/// and coordinator) and by the broker, whose pid is given (`NaN` without).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) bench: f64,
    pub(crate) broker: f64,
}

impl Cpu {
    pub(crate) fn now(broker: Option<&str>) -> Self {
        Self {
            bench: cpu_seconds("self").unwrap_or(f64::NAN),
            broker: broker.and_then(cpu_seconds).unwrap_or(f64::NAN),
        }
    }

    /// CPU in percent of one core since `start`, `elapsed` ago.
    pub(crate) fn percent_since(start: Self, broker: Option<&str>, elapsed: Duration) -> Self {
        let now = Self::now(broker);
        let s = elapsed.as_secs_f64() / 100.0;
        Self {
            bench: (now.bench - start.bench) / s,
            broker: (now.broker - start.broker) / s,
        }
    }

    /// CPU microseconds per message since `start`.
    pub(crate) fn per_message_since(start: Self, broker: Option<&str>, messages: usize) -> Self {
        let now = Self::now(broker);
        let n = messages as f64 / 1e6;
        Self {
            bench: (now.bench - start.bench) / n,
            broker: (now.broker - start.broker) / n,
        }
    }
}

/// A pipelined run: its rate, its latency if measured per call, and its
/// CPU per message.
pub(crate) struct Piped {
    pub(crate) rate: f64,
    pub(crate) latency: Option<Histogram<u64>>,
    pub(crate) cpu: Cpu,
}

/// Runs `spec` and measures its CPU per call, `broker` being the broker's
/// pid.
pub(crate) async fn piped(
    client: &Client,
    spec: &LoadSpec,
    broker: Option<&str>,
) -> anyhow::Result<Piped> {
    let cpu = Cpu::now(broker);
    let report = run_load(client, spec).await?;
    Ok(Piped {
        rate: report.rate(),
        cpu: Cpu::per_message_since(cpu, broker, spec.calls),
        latency: Some(report.latency),
    })
}

/// The raw request/reply run with `PIPELINE` in flight: each request is
/// sent with its sequence number, which the responder copies to the reply,
/// so the latency is exact per request. `publisher` sends them; the
/// reader calls `took` for each reply, and `release` once it is done with
/// it.
#[derive(Clone)]
pub(crate) struct InFlight {
    window: Arc<Semaphore>,
    sent_at: Arc<Mutex<Vec<Instant>>>,
    failed: Arc<AtomicU64>,
    start: Instant,
    cpu: Cpu,
}

/// How long the publisher waits for room in the window: for a reply.
const REPLY_WAIT: Duration = Duration::from_secs(30);

impl InFlight {
    /// The clock and the CPU count start now; `broker` is the broker's pid.
    pub(crate) fn start(calls: usize, broker: Option<&str>) -> Self {
        Self {
            window: Arc::new(Semaphore::new(PIPELINE)),
            sent_at: Arc::new(Mutex::new(Vec::with_capacity(calls))),
            failed: Arc::new(AtomicU64::new(0)),
            start: Instant::now(),
            cpu: Cpu::now(broker),
        }
    }

    /// Waits (30 s at most) until fewer than `PIPELINE` requests are out,
    /// and takes the next request's send time.
    async fn admit(&self) -> anyhow::Result<()> {
        tokio::time::timeout(REPLY_WAIT, self.window.acquire())
            .await
            .map_err(|_| anyhow!("no raw reply within {REPLY_WAIT:?}"))??
            .forget();
        self.sent_at
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push(Instant::now());
        Ok(())
    }

    /// The publisher: `calls` requests, each sent as `send(seq)` once the
    /// window has room; `send` returns once the request is out, with what
    /// tells whether the broker took it (a confirm, a delivery report),
    /// which is awaited aside: a request not taken is printed and counted.
    pub(crate) fn publisher<S, Sent, Taken>(
        &self,
        calls: usize,
        mut send: S,
    ) -> JoinHandle<anyhow::Result<()>>
    where
        S: FnMut(usize) -> Sent + Send + 'static,
        Sent: Future<Output = anyhow::Result<Taken>> + Send,
        Taken: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let in_flight = self.clone();
        tokio::spawn(async move {
            for seq in 0..calls {
                in_flight.admit().await?;
                let taken = send(seq).await?;
                let failed = in_flight.failed.clone();
                tokio::spawn(async move {
                    if let Err(e) = taken.await {
                        eprintln!("a raw request: {e:#}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            anyhow::Ok(())
        })
    }

    /// The round trip of request `seq`, whose reply just came.
    pub(crate) fn took(&self, seq: usize) -> anyhow::Result<Duration> {
        let sent = self
            .sent_at
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .get(seq)
            .copied()
            .context("a reply to a request not sent")?;
        Ok(sent.elapsed())
    }

    /// Room for one more request.
    pub(crate) fn release(&self) {
        self.window.add_permits(1);
    }

    /// After the last reply: the rate and CPU per call of the run, once the
    /// publisher ended and every request was taken (else `not_taken`).
    pub(crate) async fn finish(
        self,
        calls: usize,
        broker: Option<&str>,
        latency: Histogram<u64>,
        publisher: JoinHandle<anyhow::Result<()>>,
        not_taken: &str,
    ) -> anyhow::Result<Piped> {
        let rate = calls as f64 / self.start.elapsed().as_secs_f64();
        let cpu = Cpu::per_message_since(self.cpu, broker, calls);
        publisher.await??;
        ensure!(self.failed.load(Ordering::Relaxed) == 0, "{not_taken}");
        Ok(Piped {
            rate,
            latency: Some(latency),
            cpu,
        })
    }
}

// ---------------------------------------------------------------------------
// The result table.

/// The table's header; `broker` names the broker's CPU column.
pub(crate) fn header(broker: &str) {
    println!(
        "{:<46} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8}",
        "", "p50 ms", "p99 ms", "mean ms", ">30 ms", "per s", "bench us", broker
    );
}

/// One line of the table: percentiles, mean, the share of round trips
/// over 30 ms (where a stall of about 40 ms shows), the rate, and for the
/// pipelined runs the CPU per message of this process and of the broker.
pub(crate) fn row(label: &str, latency: Option<&Histogram<u64>>, rate: f64, cpu: Option<Cpu>) {
    let latency = match latency {
        Some(h) => format!(
            "{:>8.3} {:>8.3} {:>8.3} {:>6.1}%",
            ms(h, 0.5),
            ms(h, 0.99),
            h.mean() / 1000.0,
            100.0 * (1.0 - h.quantile_below(30_000))
        ),
        None => format!("{:>8} {:>8} {:>8} {:>7}", "-", "-", "-", "-"),
    };
    let cpu = match cpu {
        Some(c) => format!("{:>8.0} {:>8.0}", c.bench, c.broker),
        None => format!("{:>8} {:>8}", "-", "-"),
    };
    println!("{label:<46} {latency} {rate:>8.0} {cpu}");
}

pub(crate) fn piped_row(label: &str, p: &Piped) {
    row(label, p.latency.as_ref(), p.rate, Some(p.cpu));
}

/// The raw broker's runs beside callq's: request/reply with one in
/// flight, one-way pipelined, request/reply with `PIPELINE` in flight.
pub(crate) struct RawEcho {
    pub(crate) serial: Histogram<u64>,
    pub(crate) serial_rate: f64,
    pub(crate) one_way: Piped,
    pub(crate) request_reply: Piped,
}

/// callq's `echo.echo` runs: one in flight, `PIPELINE` in flight, and the
/// same on a worker without its coordinator link.
pub(crate) struct CallqEcho {
    pub(crate) serial: LoadReport,
    pub(crate) pipelined: Piped,
    pub(crate) uncoordinated: Piped,
}

/// The table of the raw broker beside callq: `column` heads the broker's
/// CPU column, `broker` names it in the legend, `one_way` labels the raw
/// one-way row.
pub(crate) fn echo_table(
    column: &str,
    broker: &str,
    one_way: &str,
    raw: &RawEcho,
    callq: &CallqEcho,
) {
    header(column);
    row(
        "raw request/reply, 1 in flight",
        Some(&raw.serial),
        raw.serial_rate,
        None,
    );
    row(
        "callq echo.echo, 1 in flight",
        Some(&callq.serial.latency),
        callq.serial.rate(),
        None,
    );
    piped_row(one_way, &raw.one_way);
    piped_row(
        &format!("raw request/reply, {PIPELINE} in flight"),
        &raw.request_reply,
    );
    piped_row(
        &format!("callq echo.echo, {PIPELINE} in flight"),
        &callq.pipelined,
    );
    piped_row(
        &format!("callq, worker without coordinator, {PIPELINE}"),
        &callq.uncoordinated,
    );
    println!(
        "(bench us, {column}: CPU microseconds per message or call of this process and of {broker})"
    );
}

/// callq's `echo.echo` in this process (`InProcess`, a worker of capacity
/// `PIPELINE`, `connect(role)` opening each party's broker connection):
/// `WARM_UP` calls, then `after_warm_up`, then `SERIAL` calls one at a
/// time and `calls` with `PIPELINE` in flight; then the same pipelined load
/// on a second worker without its coordinator link (its connection opened
/// as `second_worker`), to show what the link costs. `broker` is the
/// broker's pid, for its CPU.
pub(crate) async fn callq_echo<T>(
    connect: impl AsyncFn(&str) -> anyhow::Result<Arc<dyn Broker>>,
    second_worker: &str,
    broker: Option<&str>,
    calls: usize,
    after_warm_up: impl AsyncFnOnce() -> T,
) -> anyhow::Result<(CallqEcho, T)> {
    let mut cluster = InProcess::start(
        &connect,
        worker_options("bench-in-process", PIPELINE, true)?,
        [services::echo()],
    )
    .await?;
    let client = cluster.client.clone();

    run_load(&client, &spec(WARM_UP, 1)).await?;
    let between = after_warm_up().await;
    let serial = run_load(&client, &spec(SERIAL, 1)).await?;
    let pipelined = piped(&client, &spec(calls, PIPELINE), broker).await?;

    // The same load on a worker without the coordinator link (no
    // heartbeats, no flight reports, no completions): what the link costs.
    cluster.stop_worker().await?;
    cluster.start_worker(
        connect(second_worker).await?,
        worker_options("bench-uncoordinated", PIPELINE, false)?,
        services::echo(),
    );
    run_load(&client, &spec(WARM_UP, PIPELINE)).await?;
    let uncoordinated = piped(&client, &spec(calls, PIPELINE), broker).await?;

    cluster.stop("uncoordinated worker").await?;
    let echo = CallqEcho {
        serial,
        pipelined,
        uncoordinated,
    };
    Ok((echo, between))
}

// ---------------------------------------------------------------------------
// RabbitMQ: a virtual host of the run's own.

pub(crate) fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .context("running rabbitmqctl (is RabbitMQ installed here?)")?;
    ensure!(
        out.status.success(),
        "rabbitmqctl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `callq-bench-<uuid>` on the RabbitMQ at 127.0.0.1:5672, all permissions
/// for guest, deleted when dropped.
pub(crate) struct Vhost {
    pub(crate) name: String,
}

impl Vhost {
    pub(crate) fn create() -> anyhow::Result<Self> {
        let name = format!("callq-bench-{}", uuid::Uuid::now_v7().simple());
        rabbitmqctl(&["add_vhost", &name])?;
        let vhost = Self { name };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])?;
        Ok(vhost)
    }

    /// The connections to this virtual host whose name starts with `name`
    /// (the adapter names them `<name> (consume)` and `<name> (publish)`).
    pub(crate) fn connections(&self, name: &str) -> anyhow::Result<usize> {
        let listed = rabbitmqctl(&[
            "list_connections",
            "--no-table-headers",
            "vhost",
            "client_properties",
        ])?;
        let vhost = format!("{}\t", self.name);
        let named = format!("{{\"connection_name\",\"{name}");
        Ok(listed
            .lines()
            .filter(|l| l.starts_with(&vhost) && l.contains(&named))
            .count())
    }

    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("could not delete the virtual host {}: {e:#}", self.name);
        }
    }
}

/// RabbitMQ's Erlang VM, found by its command name.
pub(crate) fn rabbitmq_pid() -> Option<&'static str> {
    static PID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PID.get_or_init(|| {
        processes_named("beam.smp")
            .into_iter()
            .next()
            .map(|(pid, _)| pid)
    })
    .as_deref()
}

/// A connection of the callq party `role` to RabbitMQ at `url`.
pub(crate) async fn amqp(url: &str, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let opts = callq_broker_amqp::Options {
        url: url.to_owned(),
        name: format!("callq bench {role}"),
        ..callq_broker_amqp::Options::default()
    };
    Ok(Arc::new(
        callq_broker_amqp::AmqpBroker::connect_with(opts).await?,
    ))
}

// ---------------------------------------------------------------------------
// A callq cluster in this process.

/// How long a step may take: a party of the cluster connecting, declaring
/// its queues or stopping, a statement setting up a bench.
pub(crate) const STEP_WAIT: Duration = Duration::from_secs(30);

/// Runs `step`, no longer than 30 s.
pub(crate) async fn within<T, E>(
    what: &str,
    step: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T>
where
    anyhow::Error: From<E>,
{
    tokio::time::timeout(STEP_WAIT, step)
        .await
        .map_err(|_| anyhow!("{what}: no answer within {STEP_WAIT:?}"))?
        .map_err(anyhow::Error::from)
        .with_context(|| what.to_owned())
}

/// Waits for a task the shutdown token ends, no longer than 30 s.
pub(crate) async fn stopped<T>(what: &str, task: JoinHandle<Result<(), T>>) -> anyhow::Result<()>
where
    anyhow::Error: From<T>,
{
    tokio::time::timeout(STEP_WAIT, task)
        .await
        .map_err(|_| anyhow!("the {what} did not stop within {STEP_WAIT:?}"))??
        .map_err(anyhow::Error::from)
        .with_context(|| format!("the {what}"))
}

/// The options of a worker with this id and capacity, with or without its
/// coordinator link.
pub(crate) fn worker_options(
    id: &str,
    capacity: usize,
    coordinated: bool,
) -> anyhow::Result<WorkerOptions> {
    Ok(WorkerOptions {
        worker_id: id.into(),
        capacity: u16::try_from(capacity)?,
        coordinated,
        ..WorkerOptions::default()
    })
}

/// A coordinator (its ledger in memory), one worker and a client in this
/// process, each on a broker connection of its own.
pub(crate) struct InProcess {
    shutdown: CancellationToken,
    coordinator: JoinHandle<Result<(), callq_coordinator::Error>>,
    /// The worker's own stop, and its task.
    worker: (CancellationToken, JoinHandle<Result<(), callq_node::Error>>),
    pub(crate) client: Client,
}

impl InProcess {
    /// Starts the coordinator, then the worker (`opts`, serving
    /// `services`), then the client; `connect(role)` opens each one's broker
    /// connection (roles `coordinator`, `worker`, `client`). Each step
    /// within 30 s.
    pub(crate) async fn start(
        connect: impl AsyncFn(&str) -> anyhow::Result<Arc<dyn Broker>>,
        opts: WorkerOptions,
        services: impl IntoIterator<Item = Service>,
    ) -> anyhow::Result<Self> {
        Self::start_on(connect, opts, services, MemoryStore::default()).await
    }

    /// As [`InProcess::start`], the coordinator's ledger on `store`.
    pub(crate) async fn start_on<S: callq_coordinator::Store + 'static>(
        connect: impl AsyncFn(&str) -> anyhow::Result<Arc<dyn Broker>>,
        opts: WorkerOptions,
        services: impl IntoIterator<Item = Service>,
        store: S,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let coordinator_broker =
            within("the coordinator's connection", connect("coordinator")).await?;
        within(
            "declaring the coordinator's queue",
            coordinator_broker.declare(&QueueSpec::coordinator()),
        )
        .await?;
        let coordinator = Coordinator::new(
            CoordinatorOptions::default(),
            coordinator_broker,
            Ledger::open(store)?,
        );
        let coordinator = tokio::spawn(coordinator.run(shutdown.clone()));
        let worker_broker = within("the worker's connection", connect("worker")).await?;
        let worker = services
            .into_iter()
            .fold(Worker::new(opts, worker_broker), Worker::service);
        within("declaring the worker's queues", worker.declare()).await?;
        let stop_worker = shutdown.child_token();
        let worker = (stop_worker.clone(), tokio::spawn(worker.run(stop_worker)));
        let client_broker = within("the client's connection", connect("client")).await?;
        let client = within(
            "the client",
            Client::connect(client_broker, ClientOptions::default()),
        )
        .await?;
        Ok(Self {
            shutdown,
            coordinator,
            worker,
            client,
        })
    }

    /// Stops the worker (within 30 s).
    pub(crate) async fn stop_worker(&mut self) -> anyhow::Result<()> {
        let (stop, worker) = std::mem::replace(
            &mut self.worker,
            (CancellationToken::new(), tokio::spawn(async { Ok(()) })),
        );
        stop.cancel();
        stopped("worker", worker).await
    }

    /// Starts another worker (`opts`, serving `service`) on `broker`, on
    /// the queues the first one declared, in place of the stopped one.
    pub(crate) fn start_worker(
        &mut self,
        broker: Arc<dyn Broker>,
        opts: WorkerOptions,
        service: Service,
    ) {
        let stop = self.shutdown.child_token();
        let worker = Worker::new(opts, broker).service(service);
        self.worker = (stop.clone(), tokio::spawn(worker.run(stop)));
    }

    /// Stops the worker and the coordinator.
    pub(crate) async fn stop(self, worker: &str) -> anyhow::Result<()> {
        self.shutdown.cancel();
        stopped(worker, self.worker.1).await?;
        stopped("coordinator", self.coordinator).await
    }
}

// ---------------------------------------------------------------------------
// The processes, removed however the run ends.

/// A child process, killed and reaped when dropped.
pub(crate) struct Process {
    child: Child,
}

impl Process {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn still_running(&mut self, what: &str, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the {what} process exited ({status}); its log is {}",
                log.display()
            );
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/release/callq`, next to this bench's executable
/// (`target/release/deps/<bench>-*`).
pub(crate) fn callq_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .context("the bench executable has no target directory")?;
    Ok(release.join("callq"))
}

/// Starts `bin args..` in `dir` on the broker `url` with more environment
/// variables `env`, its stderr to `log`.
pub(crate) fn spawn(
    bin: &Path,
    args: &[&str],
    dir: &Path,
    url: &str,
    log: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Process> {
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("creating the log {}", log.display()))?;
    let child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("CALLQ_BROKER", url)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {} {}", bin.display(), args.join(" ")))?;
    Ok(Process { child })
}

/// A `callq coordinator` and a `callq worker` (`echo`, capacity
/// `PIPELINE`) process in `dir`, logging there; killed when dropped.
pub(crate) struct Pair {
    pub(crate) coordinator: Process,
    pub(crate) worker: Process,
    dir: PathBuf,
}

impl Pair {
    /// Starts both with the environment `env` and waits until the
    /// coordinator lists the worker `worker_id`.
    pub(crate) async fn start(
        bin: &Path,
        url: &str,
        dir: &Path,
        worker_id: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = dir.join("coordinator.log");
        let coordinator = spawn(bin, &["coordinator"], dir, url, &log, env)?;
        let capacity = PIPELINE.to_string();
        let args = [
            "worker",
            "--services",
            "echo",
            "--worker-id",
            worker_id,
            "--capacity",
            &capacity,
        ];
        let worker = spawn(bin, &args, dir, url, &dir.join("worker.log"), env)?;
        let mut pair = Self {
            coordinator,
            worker,
            dir: dir.to_owned(),
        };
        let admin =
            callq_node::Admin::connect(amqp(url, "admin").await?, Duration::from_secs(5)).await?;
        let registered = Instant::now();
        loop {
            pair.still_running()?;
            if let Ok(status) = admin.status().await
                && status.workers.iter().any(|w| w.worker_id == worker_id)
            {
                return Ok(pair);
            }
            ensure!(
                registered.elapsed() < Duration::from_secs(20),
                "the worker process did not register within 20 s; logs in {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An error naming the log of a process that exited.
    pub(crate) fn still_running(&mut self) -> anyhow::Result<()> {
        let coordinator_log = self.dir.join("coordinator.log");
        self.coordinator
            .still_running("coordinator", &coordinator_log)?;
        self.worker
            .still_running("worker", &self.dir.join("worker.log"))
    }
}
