//! RabbitMQ benchmark: callq's `echo.echo` beside raw `lapin` on the same
//! broker, measured in one run, and the resident memory of a worker process.
//!
//! 1. Raw broker with lapin alone, on quorum queues, persistent messages,
//!    publisher confirms and manual acks: a request/reply round trip with
//!    one in flight; one-way pipelined throughput (many confirms
//!    outstanding); and, like for like with callq, request/reply with
//!    `PIPELINE` (256) in flight.
//! 2. callq on the same broker: a coordinator, one worker (capacity
//!    `PIPELINE`) and a client in this process, each with its own
//!    connection: `echo.echo` with one call in flight, then with
//!    `PIPELINE` in flight; then the same load on a worker without its
//!    coordinator link, to show what the link costs.
//! 3. The ratios against the design's targets, and the CPU per message of
//!    this process and of RabbitMQ in each pipelined run.
//! 4. The resident memory (`VmRSS`) of a real `callq worker` process, idle
//!    and under load, beside a `callq coordinator` process.
//!
//! Everything runs in a virtual host of its own, deleted at the end.
//! Needs RabbitMQ at 127.0.0.1:5672 (guest/guest), `rabbitmqctl`, and the
//! release binary: `cargo build --release --bin callq && cargo bench --bench amqp`
//! (add `-- --calls N` to change the pipelined size).
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use callq::load::{self, LoadReport, LoadSpec};
use callq_broker::{Broker, QueueSpec};
use callq_broker_amqp::AmqpBroker;
use callq_coordinator::{Coordinator, CoordinatorOptions, Ledger, MemoryStore};
use callq_node::{Admin, Client, ClientOptions, Worker, WorkerOptions, services};
use callq_schemas::{Call, Outcome};
use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Calls (or messages) in flight in the pipelined runs, and the worker's
/// capacity.
const PIPELINE: usize = 256;
/// Round trips one at a time, after `WARM_UP` unmeasured ones.
const SERIAL: usize = 2_000;
const WARM_UP: usize = 200;
/// Pipelined calls or messages, unless `--calls N`.
const CALLS: usize = 20_000;
/// The design's targets.
const P50_TARGET: f64 = 1.15;
const THROUGHPUT_TARGET: f64 = 0.8;
const IDLE_RSS_TARGET_MIB: f64 = 20.0;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

fn record(h: &mut Histogram<u64>, took: Duration) {
    h.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// The arguments of every call: the call envelope comes to about 300 bytes.
fn args() -> Value {
    json!({"hello": "callq", "n": 42, "pad": "x".repeat(80)})
}

/// A callq call envelope as the client publishes it, used as the raw
/// baseline's body so that both carry the same bytes.
fn envelope() -> Vec<u8> {
    let mut call = Call::new("echo", "echo", args());
    call.reply_to = Some(format!(
        "callq.reply.client-{}",
        uuid::Uuid::now_v7().simple()
    ));
    call.deadline = Some(time::OffsetDateTime::now_utc());
    call.to_bytes()
}

// ---------------------------------------------------------------------------
// The virtual host and the processes, removed however the run ends.

struct Vhost {
    name: String,
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
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

impl Vhost {
    fn create() -> anyhow::Result<Self> {
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
    fn connections(&self, name: &str) -> anyhow::Result<usize> {
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

    fn url(&self) -> String {
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

/// A child process, killed and reaped when dropped.
struct Process {
    child: Child,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn still_running(&mut self, what: &str, log: &Path) -> anyhow::Result<()> {
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
/// (`target/release/deps/amqp-*`).
fn callq_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .context("the bench executable has no target directory")?;
    Ok(release.join("callq"))
}

fn spawn(bin: &Path, args: &[&str], dir: &Path, url: &str, log: &Path) -> anyhow::Result<Process> {
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("creating the log {}", log.display()))?;
    let child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("CALLQ_BROKER", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {} {}", bin.display(), args.join(" ")))?;
    Ok(Process { child })
}

/// The number on a line of `/proc/<pid>/status` (`VmRSS`, `Threads`, ...).
fn proc_status(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .parse()?)
}

/// A `VmRSS` or `VmHWM` line of `/proc/<pid>/status` (in kB), in MiB.
fn proc_status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    Ok(proc_status(pid, field)? / 1024.0)
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system, all threads) a process used so far.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: field 3 (state) onwards;
    // utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// RabbitMQ's Erlang VM, found by its command name.
fn broker_pid() -> Option<String> {
    static PID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PID.get_or_init(|| {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?.to_string();
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(pid)
        })
    })
    .clone()
}

/// CPU used by this process (requester and responder, or client, worker
/// and coordinator) and by RabbitMQ.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    bench: f64,
    broker: f64,
}

impl Cpu {
    fn now() -> Self {
        Self {
            bench: cpu_seconds("self").unwrap_or(f64::NAN),
            broker: broker_pid()
                .and_then(|pid| cpu_seconds(&pid))
                .unwrap_or(f64::NAN),
        }
    }

    /// CPU microseconds per message since `start`.
    fn per_message_since(start: Self, messages: usize) -> Self {
        let now = Self::now();
        let n = messages as f64 / 1e6;
        Self {
            bench: (now.bench - start.bench) / n,
            broker: (now.broker - start.broker) / n,
        }
    }
}

/// A pipelined run: its rate, its latency if measured per call, and its
/// CPU per message.
struct Piped {
    rate: f64,
    latency: Option<Histogram<u64>>,
    cpu: Cpu,
}

// ---------------------------------------------------------------------------
// 1. The raw broker with lapin alone.

async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .with_context(|| format!("connecting to {url}"))
}

async fn quorum_queue(ch: &Channel, name: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(name.into(), options, args)
        .await
        .with_context(|| format!("declaring the quorum queue {name}"))?;
    Ok(())
}

async fn confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

async fn consumer(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<lapin::Consumer> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// The properties of every raw message: persistent, and a correlation id
/// (a sequence number) when the run tracks each request.
fn properties(seq: Option<usize>) -> BasicProperties {
    let props = BasicProperties::default().with_delivery_mode(2);
    match seq {
        Some(n) => props.with_correlation_id(n.to_string().into()),
        None => props,
    }
}

/// The same publish the callq adapter makes: default exchange, mandatory,
/// persistent; returns the confirm to wait for.
async fn publish(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> anyhow::Result<lapin::PublisherConfirm> {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    Ok(ch
        .basic_publish("".into(), queue.into(), options, body, props)
        .await?)
}

async fn confirmed(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("publish not confirmed: {other:?}"),
    }
}

/// The responder: for each request, publishes a copy to `replies` and
/// waits for its confirm, then acks the request (the order a callq worker
/// keeps), one task per delivery.
async fn responder(url: &str, requests: &str, replies: &str) -> anyhow::Result<()> {
    let conn = connect(url, "raw responder").await?;
    let publisher = confirm_channel(&conn).await?;
    let mut incoming = consumer(&conn, requests, u16::try_from(PIPELINE)?).await?;
    let replies = Arc::<str>::from(replies);
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(d)) = incoming.next().await {
            let (publisher, replies) = (publisher.clone(), replies.clone());
            tokio::spawn(async move {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_correlation_id(d.properties.correlation_id().clone().unwrap_or_default());
                let sent = match publish(&publisher, &replies, &d.data, props).await {
                    Ok(confirm) => confirmed(confirm).await,
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(()) => {
                        if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                            eprintln!("raw responder: ack failed: {e}");
                        }
                    }
                    Err(e) => eprintln!("raw responder: reply not confirmed: {e:#}"),
                }
            });
        }
    });
    Ok(())
}

struct Raw {
    body_bytes: usize,
    serial: Histogram<u64>,
    serial_rate: f64,
    one_way: Piped,
    request_reply: Piped,
}

async fn raw(url: &str, calls: usize) -> anyhow::Result<Raw> {
    let body = envelope();
    let conn = connect(url, "raw requester").await?;
    let ch = confirm_channel(&conn).await?;
    for q in [
        "bench.raw.requests",
        "bench.raw.replies",
        "bench.raw.one-way",
    ] {
        quorum_queue(&ch, q).await?;
    }
    responder(url, "bench.raw.requests", "bench.raw.replies").await?;
    let mut replies = consumer(&conn, "bench.raw.replies", u16::try_from(PIPELINE)?).await?;

    // (a) Request/reply, one in flight. The reply's ack goes out beside the
    // next request, not before it, as callq's client does (its reply
    // reader acks while the caller goes on). Without TCP_NODELAY (lapin's
    // runtime layer before async-rs 0.8.13), awaiting the ack first made
    // the next publish a second small write that Nagle held until the
    // broker's delayed TCP ack: about 40 ms a round trip.
    let mut serial = histogram();
    let mut busy = Duration::ZERO;
    let mut acks = Vec::with_capacity(WARM_UP + SERIAL);
    for i in 0..WARM_UP + SERIAL {
        let t = Instant::now();
        confirmed(publish(&ch, "bench.raw.requests", &body, properties(None)).await?).await?;
        let d = replies.next().await.context("reply consumer ended")??;
        let took = t.elapsed();
        acks.push(tokio::spawn(async move {
            d.acker.ack(BasicAckOptions::default()).await
        }));
        if i >= WARM_UP {
            record(&mut serial, took);
            busy += took;
        }
    }
    for ack in acks {
        ack.await??;
    }
    let serial_rate = SERIAL as f64 / busy.as_secs_f64();

    // (b) One way, pipelined: confirms outstanding up to the window, a
    // consumer on its own connection acks as it goes.
    let one_way = {
        let consumer_conn = connect(url, "raw one-way consumer").await?;
        let mut incoming = consumer(
            &consumer_conn,
            "bench.raw.one-way",
            u16::try_from(PIPELINE)?,
        )
        .await?;
        let (start, cpu) = (Instant::now(), Cpu::now());
        let consumed = tokio::spawn(async move {
            for _ in 0..calls {
                let d = incoming.next().await.context("consumer ended")??;
                d.acker.ack(BasicAckOptions::default()).await?;
            }
            let _ = consumer_conn.close(200, "done".into()).await;
            anyhow::Ok(())
        });
        let window = Arc::new(Semaphore::new(PIPELINE));
        let mut confirms = Vec::with_capacity(calls);
        for _ in 0..calls {
            let permit = window.clone().acquire_owned().await?;
            let confirm = publish(&ch, "bench.raw.one-way", &body, properties(None)).await?;
            confirms.push(tokio::spawn(async move {
                let r = confirmed(confirm).await;
                drop(permit);
                r
            }));
        }
        for c in confirms {
            c.await??;
        }
        consumed.await??;
        Piped {
            rate: calls as f64 / start.elapsed().as_secs_f64(),
            latency: None,
            cpu: Cpu::per_message_since(cpu, calls),
        }
    };

    // (c) Request/reply with PIPELINE in flight: like for like with callq.
    // Each request carries its sequence number as correlation id, which the
    // responder copies to the reply: the latency is exact per request.
    let request_reply = {
        let window = Arc::new(Semaphore::new(PIPELINE));
        let sent_at = Arc::new(std::sync::Mutex::new(Vec::with_capacity(calls)));
        let failed = Arc::new(AtomicU64::new(0));
        let (start, cpu) = (Instant::now(), Cpu::now());
        let publisher = {
            let (ch, window, body, sent_at, failed) = (
                ch.clone(),
                window.clone(),
                body.clone(),
                sent_at.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                for seq in 0..calls {
                    window.acquire().await?.forget();
                    sent_at
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(Instant::now());
                    let confirm =
                        publish(&ch, "bench.raw.requests", &body, properties(Some(seq))).await?;
                    let failed = failed.clone();
                    tokio::spawn(async move {
                        if confirmed(confirm).await.is_err() {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                anyhow::Ok(())
            })
        };
        let mut latency = histogram();
        for _ in 0..calls {
            let d = replies.next().await.context("reply consumer ended")??;
            let seq: usize = d
                .properties
                .correlation_id()
                .as_ref()
                .context("a reply without correlation id")?
                .as_str()
                .parse()?;
            let t = sent_at
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .get(seq)
                .copied()
                .context("a reply to a request not sent")?;
            record(&mut latency, t.elapsed());
            d.acker.ack(BasicAckOptions::default()).await?;
            window.add_permits(1);
        }
        let rate = calls as f64 / start.elapsed().as_secs_f64();
        let cpu = Cpu::per_message_since(cpu, calls);
        publisher.await??;
        ensure!(
            failed.load(Ordering::Relaxed) == 0,
            "raw publishes not confirmed"
        );
        Piped {
            rate,
            latency: Some(latency),
            cpu,
        }
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(Raw {
        body_bytes: body.len(),
        serial,
        serial_rate,
        one_way,
        request_reply,
    })
}

// ---------------------------------------------------------------------------
// 2. callq on the same broker.

fn spec(calls: usize, concurrency: usize) -> LoadSpec {
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
async fn run_load(client: &Client, spec: &LoadSpec) -> anyhow::Result<LoadReport> {
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

async fn amqp(url: &str, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let opts = callq_broker_amqp::Options {
        url: url.to_owned(),
        name: format!("callq bench {role}"),
        ..callq_broker_amqp::Options::default()
    };
    Ok(Arc::new(AmqpBroker::connect_with(opts).await?))
}

/// Runs the pipelined load and measures its CPU.
async fn piped(client: &Client, calls: usize) -> anyhow::Result<Piped> {
    let cpu = Cpu::now();
    let report = run_load(client, &spec(calls, PIPELINE)).await?;
    Ok(Piped {
        rate: report.rate(),
        cpu: Cpu::per_message_since(cpu, calls),
        latency: Some(report.latency),
    })
}

struct Callq {
    serial: LoadReport,
    pipelined: Piped,
    /// The same load on a worker without its coordinator link.
    uncoordinated: Piped,
}

fn bench_worker(id: &str, coordinated: bool, broker: Arc<dyn Broker>) -> anyhow::Result<Worker> {
    Ok(Worker::new(
        WorkerOptions {
            worker_id: id.into(),
            capacity: u16::try_from(PIPELINE)?,
            coordinated,
            ..WorkerOptions::default()
        },
        broker,
    )
    .service(services::echo()))
}

async fn callq_in_process(url: &str, calls: usize) -> anyhow::Result<Callq> {
    let shutdown = CancellationToken::new();
    let coordinator_broker = amqp(url, "coordinator").await?;
    coordinator_broker
        .declare(&QueueSpec::coordinator())
        .await?;
    let coordinator = Coordinator::new(
        CoordinatorOptions::default(),
        coordinator_broker,
        Ledger::open(MemoryStore::default())?,
    );
    let coordinator = tokio::spawn(coordinator.run(shutdown.clone()));
    let worker = bench_worker("bench-in-process", true, amqp(url, "worker").await?)?;
    worker.declare().await?;
    let stop_worker = shutdown.child_token();
    let worker = tokio::spawn(worker.run(stop_worker.clone()));
    let client = Client::connect(amqp(url, "client").await?, ClientOptions::default()).await?;

    run_load(&client, &spec(WARM_UP, 1)).await?;
    let serial = run_load(&client, &spec(SERIAL, 1)).await?;
    let pipelined = piped(&client, calls).await?;

    // The same load on a worker without the coordinator link (no
    // heartbeats, no flight reports, no completions): what the link costs.
    stop_worker.cancel();
    worker.await??;
    let worker = bench_worker("bench-uncoordinated", false, amqp(url, "worker").await?)?;
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    run_load(&client, &spec(WARM_UP, PIPELINE)).await?;
    let uncoordinated = piped(&client, calls).await?;

    shutdown.cancel();
    worker.await??;
    coordinator.await??;
    Ok(Callq {
        serial,
        pipelined,
        uncoordinated,
    })
}

// ---------------------------------------------------------------------------
// 4. A worker process's resident memory.

struct Rss {
    idle_mib: f64,
    idle_threads: f64,
    idle_connections: usize,
    load_connections: usize,
    load_max_mib: f64,
    peak_mib: f64,
    load: LoadReport,
}

async fn worker_rss(bin: &Path, vhost: &Vhost, calls: usize) -> anyhow::Result<Rss> {
    let url = &vhost.url();
    let dir = std::env::temp_dir().join(format!("callq-bench-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    let (coordinator_log, worker_log) = (dir.join("coordinator.log"), dir.join("worker.log"));
    let mut coordinator = spawn(bin, &["coordinator"], &dir, url, &coordinator_log)?;
    let capacity = PIPELINE.to_string();
    let mut worker = spawn(
        bin,
        &[
            "worker",
            "--services",
            "echo",
            "--worker-id",
            "bench-rss",
            "--capacity",
            &capacity,
        ],
        &dir,
        url,
        &worker_log,
    )?;

    // Registered: the coordinator lists it.
    let admin = Admin::connect(amqp(url, "admin").await?, Duration::from_secs(5)).await?;
    let registered = Instant::now();
    loop {
        coordinator.still_running("coordinator", &coordinator_log)?;
        worker.still_running("worker", &worker_log)?;
        if let Ok(status) = admin.status().await
            && status.workers.iter().any(|w| w.worker_id == "bench-rss")
        {
            break;
        }
        ensure!(
            registered.elapsed() < Duration::from_secs(20),
            "the worker process did not register within 20 s; logs in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = worker.pid();
    let idle_mib = proc_status_mib(pid, "VmRSS")?;
    let idle_threads = proc_status(pid, "Threads")?;
    // The adapter names its connections `callq <role> (consume)` and
    // `callq <role> (publish)`; each costs the
    // worker a lapin I/O thread and its buffers.
    let idle_connections = vhost.connections("callq worker bench-rss")?;

    let client = Client::connect(amqp(url, "rss client").await?, ClientOptions::default()).await?;
    let done = CancellationToken::new();
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut max: f64 = 0.0;
            while !done.is_cancelled() {
                if let Ok(mib) = proc_status_mib(pid, "VmRSS") {
                    max = max.max(mib);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            max
        })
    };
    let load = run_load(&client, &spec(calls, PIPELINE)).await;
    done.cancel();
    let load_max_mib = sampler.await?;
    let load = load?;
    let peak_mib = proc_status_mib(pid, "VmHWM")?;
    let load_connections = vhost.connections("callq worker bench-rss")?;
    worker.still_running("worker", &worker_log)?;
    drop(worker);
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Rss {
        idle_mib,
        idle_threads,
        idle_connections,
        load_connections,
        load_max_mib,
        peak_mib,
        load,
    })
}

// ---------------------------------------------------------------------------

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// One line of the table: percentiles, mean, the share of round trips
/// over 30 ms (where a stall of about 40 ms shows), the rate, and for the
/// pipelined runs the CPU per message of this process and of RabbitMQ.
fn row(label: &str, latency: Option<&Histogram<u64>>, rate: f64, cpu: Option<Cpu>) {
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

fn piped_row(label: &str, p: &Piped) {
    row(label, p.latency.as_ref(), p.rate, Some(p.cpu));
}

fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args()
        .skip_while(|a| a != "--calls")
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(CALLS);
    let bin = callq_binary()?;
    if !bin.is_file() {
        eprintln!(
            "{} is missing: run `cargo build --release --bin callq` first, then \
             `cargo bench --bench amqp`",
            bin.display()
        );
        std::process::exit(2);
    }
    let vhost = Vhost::create()?;
    let url = vhost.url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let figures = runtime.block_on(async {
        let raw = raw(&url, calls).await.context("the raw baseline")?;
        let callq = callq_in_process(&url, calls)
            .await
            .context("callq in process")?;
        let rss = worker_rss(&bin, &vhost, calls)
            .await
            .context("the worker process")?;
        anyhow::Ok((raw, callq, rss))
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(vhost);
    let (raw, callq, rss) = figures?;

    println!(
        "RabbitMQ 127.0.0.1:5672, quorum queues, persistent, publisher confirms, manual acks; \
         {}-byte call body; {WARM_UP} warm-up + {SERIAL} round trips one at a time, \
         {calls} messages/calls pipelined with {PIPELINE} in flight",
        raw.body_bytes
    );
    println!(
        "{:<46} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8}",
        "", "p50 ms", "p99 ms", "mean ms", ">30 ms", "per s", "bench us", "rabbit us"
    );
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
    piped_row(
        &format!("raw one-way publish+consume, {PIPELINE} confirms"),
        &raw.one_way,
    );
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
        "(bench us, rabbit us: CPU microseconds per message or call of this process and of RabbitMQ)"
    );
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
        "ratio callq calls/s / raw request/reply/s (like for like): {like:.2}x (target >= {THROUGHPUT_TARGET}) {}",
        verdict(like >= THROUGHPUT_TARGET)
    );
    println!(
        "worker process RSS: idle {:.1} MiB (target <= {IDLE_RSS_TARGET_MIB} MiB) {}; \
         under load max {:.1} MiB (VmHWM {:.1} MiB) while it served {:.0} calls/s",
        rss.idle_mib,
        verdict(rss.idle_mib <= IDLE_RSS_TARGET_MIB),
        rss.load_max_mib,
        rss.peak_mib,
        rss.load.rate()
    );
    println!(
        "worker process: {} threads idle; AMQP connections {} idle, {} after the load",
        rss.idle_threads, rss.idle_connections, rss.load_connections
    );
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
