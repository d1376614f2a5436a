//! Kafka benchmark: callq's `echo.echo` beside raw `rdkafka` on the same
//! broker, measured in one run.
//!
//! 1. Raw broker with rdkafka alone, on one-partition topics: idempotent
//!    producers (`enable.idempotence`, `acks=all`, `linger.ms=1` as the
//!    adapter's) whose every delivery report is awaited, and consumers with
//!    manual commits (`enable.auto.commit=false`; the offset after each
//!    finished record is committed, asynchronously, at most every 20 ms, the
//!    adapter's `COMMIT_INTERVAL`). A request/reply round trip with one in
//!    flight; one-way pipelined throughput (`PIPELINE` delivery reports
//!    outstanding); and, like for like with callq, request/reply with
//!    `PIPELINE` (256) in flight. The responder produces each reply, waits
//!    for its delivery report and only then commits the request (the order
//!    a callq worker keeps).
//! 2. callq on the same broker: a coordinator, one worker (capacity
//!    `PIPELINE`) and a client in this process, each with its own
//!    `KafkaBroker`: `echo.echo` with one call in flight, then with
//!    `PIPELINE` in flight; then the same load on a worker without its
//!    coordinator link, to show what the link costs.
//! 3. The ratios against the design's targets, the CPU per message of this
//!    process and of the broker in each pipelined run, the raw produce to
//!    delivery report time (twice in every round trip), and the CPU that the
//!    raw clients and the callq parties use, with the broker, while idle
//!    (their consumers' fetches, heartbeats and commits).
//!
//! The broker is the one `CALLQ_KAFKA_URL` names; `scripts/kafka` starts
//! tansu 0.6 (a Kafka-compatible broker) and sets it:
//! `source scripts/kafka && cargo bench --bench kafka` (add `-- --calls N`
//! to change the pipelined size).
//!
//! Every run has topics and consumer groups of its own: the URL gets
//! `topic_prefix=bench-<uuid>.` and `group_prefix=bench-<uuid>.` (the raw
//! side names its topics and groups with the same prefix), `partitions=1`,
//! `session_timeout_ms=2000` and `fetch_wait_ms=10`. tansu 0.6 holds every
//! fetch for its full `fetch.wait.max.ms` even when records arrive, so a
//! delivery waits up to that long; the raw consumers get the same
//! `fetch.wait.max.ms=10` as the adapter's, for a fair baseline. The topics
//! are left behind (tansu's memory storage forgets them when it stops).
#![allow(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use callq::load::{self, LoadReport, LoadSpec};
use callq_broker::{Broker, QueueSpec};
use callq_broker_kafka::{KafkaBroker, Options};
use callq_coordinator::{Coordinator, CoordinatorOptions, Ledger, MemoryStore};
use callq_node::{Client, ClientOptions, Worker, WorkerOptions, services};
use callq_schemas::{Call, Outcome};
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
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

/// The bound of every wait on the broker: a delivery report
/// (`message.timeout.ms`), a record, a topic's creation.
const WAIT: Duration = Duration::from_secs(30);
/// How often the raw consumers commit, at most: the adapter's
/// `COMMIT_INTERVAL`.
const COMMIT_INTERVAL: Duration = callq_broker_kafka::COMMIT_INTERVAL;
/// `fetch.wait.max.ms` of every consumer, raw and callq's (`fetch_wait_ms`).
const FETCH_WAIT_MS: u64 = 10;
/// The group session of every consumer (`session_timeout_ms`): tansu
/// accepts less than Kafka's 6 s minimum.
const SESSION_TIMEOUT_MS: u64 = 2_000;

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
// The run's broker: its URL, its prefix, the broker process.

struct Run {
    /// `CALLQ_KAFKA_URL` with this run's settings.
    url: String,
    /// `bench-<uuid>.`: the topics and groups of this run start with it.
    prefix: String,
    opts: Options,
}

impl Run {
    fn from_env() -> anyhow::Result<Self> {
        let base = std::env::var("CALLQ_KAFKA_URL").map_err(|_| {
            anyhow!(
                "CALLQ_KAFKA_URL is not set: run `source scripts/kafka` first \
                 (it starts tansu on 127.0.0.1:9092 if nothing answers there)"
            )
        })?;
        let prefix = format!("bench-{}.", uuid::Uuid::now_v7().simple());
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!(
            "{base}{sep}topic_prefix={prefix}&group_prefix={prefix}&partitions=1\
             &fetch_wait_ms={FETCH_WAIT_MS}&session_timeout_ms={SESSION_TIMEOUT_MS}"
        );
        let opts = Options::from_url(&url)
            .with_context(|| format!("CALLQ_KAFKA_URL={base} is not a Kafka URL"))?;
        Ok(Self { url, prefix, opts })
    }

    /// The URL of one callq party: its own client id.
    fn party_url(&self, role: &str) -> String {
        format!("{}&client_id=callq-bench-{role}", self.url)
    }

    /// Settings every raw client shares: the URL's servers and its extra
    /// librdkafka settings.
    fn client(&self, id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.opts.bootstrap)
            .set("client.id", format!("raw-bench-{id}"))
            .set("allow.auto.create.topics", "false");
        for (k, v) in &self.opts.librdkafka {
            config.set(k, v);
        }
        config
    }

    fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
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

/// The broker's process, found by its command name (`tansu`): the one whose
/// command line names the URL's port, else the only one.
fn broker_pid(bootstrap: &str) -> Option<String> {
    static PID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PID.get_or_init(|| {
        let port = bootstrap.split(',').next()?.rsplit_once(':')?.1.to_owned();
        let tansus: Vec<(String, String)> = std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_str()?.parse::<u32>().ok()?.to_string();
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                (comm.trim() == "tansu").then_some(())?;
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
            })
            .collect();
        let on_port = format!(":{port}");
        match tansus.iter().find(|(_, cmd)| cmd.contains(&on_port)) {
            Some((pid, _)) => Some(pid.clone()),
            None if tansus.len() == 1 => Some(tansus[0].0.clone()),
            None => None,
        }
    })
    .clone()
}

/// CPU used by this process (requester and responder, or client, worker
/// and coordinator) and by the broker.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    bench: f64,
    broker: f64,
}

impl Cpu {
    fn now(bootstrap: &str) -> Self {
        Self {
            bench: cpu_seconds("self").unwrap_or(f64::NAN),
            broker: broker_pid(bootstrap)
                .and_then(|pid| cpu_seconds(&pid))
                .unwrap_or(f64::NAN),
        }
    }

    /// CPU in percent of one core since `start`, `elapsed` ago.
    fn percent_since(start: Self, bootstrap: &str, elapsed: Duration) -> Self {
        let now = Self::now(bootstrap);
        let s = elapsed.as_secs_f64() / 100.0;
        Self {
            bench: (now.bench - start.bench) / s,
            broker: (now.broker - start.broker) / s,
        }
    }

    /// CPU microseconds per message since `start`.
    fn per_message_since(start: Self, bootstrap: &str, messages: usize) -> Self {
        let now = Self::now(bootstrap);
        let n = messages as f64 / 1e6;
        Self {
            bench: (now.bench - start.bench) / n,
            broker: (now.broker - start.broker) / n,
        }
    }
}

/// How long the idle measurements last.
const IDLE: Duration = Duration::from_secs(3);

/// The CPU used while nothing is sent, in percent of one core: what the
/// consumers' fetches (each held `fetch.wait.max.ms` by tansu), heartbeats
/// and commits cost by themselves.
async fn idle_cpu(bootstrap: &str) -> Cpu {
    let (start, t) = (Cpu::now(bootstrap), Instant::now());
    tokio::time::sleep(IDLE).await;
    Cpu::percent_since(start, bootstrap, t.elapsed())
}

/// A pipelined run: its rate, its latency if measured per call, and its
/// CPU per message.
struct Piped {
    rate: f64,
    latency: Option<Histogram<u64>>,
    cpu: Cpu,
}

// ---------------------------------------------------------------------------
// 1. The raw broker with rdkafka alone.

/// Creates one-partition topics and waits until the metadata shows them.
async fn create_topics(run: &Run, names: &[&str]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        run.client("admin").create().context("Kafka admin client")?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(-1)))
        .collect();
    let admin_opts = AdminOptions::new()
        .request_timeout(Some(WAIT))
        .operation_timeout(Some(WAIT));
    let created = tokio::time::timeout(WAIT, admin.create_topics(&topics, &admin_opts))
        .await
        .map_err(|_| anyhow!("Kafka did not create the raw topics within {WAIT:?}"))?
        .context("creating the raw topics")?;
    for result in created {
        if let Err((topic, code)) = result {
            bail!("creating topic {topic}: {code}");
        }
    }
    let names = names.iter().map(|n| (*n).to_owned()).collect();
    wait_for_topics(admin, names, Instant::now() + WAIT).await
}

/// Waits until the metadata shows every topic of `names`.
async fn wait_for_topics(
    admin: AdminClient<DefaultClientContext>,
    names: Vec<String>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let admin = Arc::new(admin);
    loop {
        let (a, n) = (admin.clone(), names.clone());
        let found = tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || {
                a.inner().fetch_metadata(None, WAIT).map(|md| {
                    n.iter().all(|n| {
                        md.topics().iter().any(|t| {
                            t.name() == n && t.error().is_none() && !t.partitions().is_empty()
                        })
                    })
                })
            }),
        )
        .await
        .map_err(|_| anyhow!("no metadata from Kafka within {WAIT:?}"))??
        .context("reading the cluster's metadata")?;
        if found {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the raw topics did not show in the metadata within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An idempotent producer, `acks=all`, lingering 1 ms as the adapter's.
fn producer(run: &Run, id: &str) -> anyhow::Result<FutureProducer> {
    run.client(id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", WAIT.as_millis().to_string())
        .create()
        .with_context(|| format!("the raw {id} producer"))
}

/// A consumer of `topic` in a group of its own, with manual commits and
/// `fetch.wait.max.ms` as short as the adapter's.
fn consumer(run: &Run, id: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = run
        .client(id)
        .set("group.id", run.topic(&format!("raw.{id}")))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS.to_string())
        .set(
            "heartbeat.interval.ms",
            (SESSION_TIMEOUT_MS / 4).to_string(),
        )
        .set("fetch.wait.max.ms", FETCH_WAIT_MS.to_string())
        .set("enable.partition.eof", "false")
        .create()
        .with_context(|| format!("the raw {id} consumer"))?;
    consumer
        .subscribe(&[topic])
        .with_context(|| format!("subscribing to {topic}"))?;
    Ok(consumer)
}

/// The next record, within `WAIT`.
async fn next<'a>(consumer: &'a StreamConsumer, what: &str) -> anyhow::Result<BorrowedMessage<'a>> {
    tokio::time::timeout(WAIT, consumer.recv())
        .await
        .map_err(|_| anyhow!("no {what} within {WAIT:?}"))?
        .with_context(|| format!("receiving a {what}"))
}

/// Waits for a delivery report, within `WAIT` and a margin.
async fn delivered(report: DeliveryFuture) -> anyhow::Result<()> {
    match tokio::time::timeout(WAIT + Duration::from_secs(1), report).await {
        Err(_) => bail!("no delivery report within {WAIT:?}"),
        Ok(Err(_)) => bail!("the producer was dropped"),
        Ok(Ok(Err((e, _)))) => bail!("not stored: {e}"),
        Ok(Ok(Ok(_))) => Ok(()),
    }
}

/// Produces `body` to `topic` with `key` (the correlation id) and returns
/// the delivery report to wait for.
fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    body: &[u8],
) -> anyhow::Result<DeliveryFuture> {
    producer
        .send_result(FutureRecord::to(topic).key(key).payload(body))
        .map_err(|(e, _)| anyhow!("producing to {topic}: {e}"))
}

/// Manual commits of one consumer of a one-partition topic: the offset
/// after the last finished record, sent asynchronously at most every
/// `COMMIT_INTERVAL` (and at the end).
struct Commits {
    topic: String,
    pending: Option<i64>,
    last: Option<Instant>,
}

impl Commits {
    fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            pending: None,
            last: None,
        }
    }

    /// Record `offset` is finished.
    fn finished(&mut self, consumer: &StreamConsumer, offset: i64) -> anyhow::Result<()> {
        self.pending = Some(offset + 1);
        if self.last.is_none_or(|at| at.elapsed() >= COMMIT_INTERVAL) {
            self.send(consumer, CommitMode::Async)?;
        }
        Ok(())
    }

    fn send(&mut self, consumer: &StreamConsumer, mode: CommitMode) -> anyhow::Result<()> {
        if let Some(next) = self.pending.take() {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.topic, 0, Offset::Offset(next))?;
            consumer
                .commit(&tpl, mode)
                .with_context(|| format!("committing {} at {next}", self.topic))?;
            self.last = Some(Instant::now());
        }
        Ok(())
    }
}

/// Closes a consumer (leaving its group) off the runtime, waiting for it no
/// longer than `WAIT`.
async fn close(consumer: StreamConsumer) {
    let closing = tokio::task::spawn_blocking(move || drop(consumer));
    if tokio::time::timeout(WAIT, closing).await.is_err() {
        eprintln!("a raw consumer did not leave its group within {WAIT:?}");
    }
}

/// The responder: for each request, produces a copy with the same key to
/// `replies`; once its delivery report is in, the request counts as
/// finished and is committed (the order a callq worker keeps). Requests
/// are not held back by earlier replies' reports: a second task waits for
/// the reports, in order (one partition: they come in order).
fn responder(
    run: &Run,
    requests: &str,
    replies: &str,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let consumer = Arc::new(consumer(run, "responder", requests)?);
    let producer = producer(run, "responder")?;
    let replies = replies.to_owned();
    let requests = requests.to_owned();
    let (tx, mut rx) = mpsc::unbounded_channel::<(i64, DeliveryFuture)>();
    let reader = {
        let consumer = consumer.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    () = stop.cancelled() => break,
                    m = consumer.recv() => m.context("the responder's consumer")?,
                };
                let key = m.key().unwrap_or_default();
                let report = send(&producer, &replies, key, m.payload().unwrap_or_default())?;
                if tx.send((m.offset(), report)).is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    Ok(tokio::spawn(async move {
        let mut commits = Commits::new(&requests);
        let settled = async {
            while let Some((offset, report)) = rx.recv().await {
                delivered(report).await.context("a raw reply")?;
                commits.finished(&consumer, offset)?;
            }
            anyhow::Ok(())
        };
        let settled = settled.await;
        stop.cancel();
        reader.await??;
        settled?;
        commits.send(&consumer, CommitMode::Async)?;
        if let Ok(consumer) = Arc::try_unwrap(consumer) {
            close(consumer).await;
        }
        Ok(())
    }))
}

struct Raw {
    body_bytes: usize,
    serial: Histogram<u64>,
    /// From produce to delivery report, within the serial round trips.
    serial_report: Histogram<u64>,
    idle: Cpu,
    serial_rate: f64,
    one_way: Piped,
    request_reply: Piped,
}

async fn raw(run: &Run, calls: usize) -> anyhow::Result<Raw> {
    let bootstrap = run.opts.bootstrap.as_str();
    let body = envelope();
    let (requests, replies, one_way_topic) = (
        run.topic("raw.requests"),
        run.topic("raw.replies"),
        run.topic("raw.one-way"),
    );
    create_topics(run, &[&requests, &replies, &one_way_topic]).await?;
    let stop = CancellationToken::new();
    let responding = responder(run, &requests, &replies, stop.clone())?;
    let producer = Arc::new(producer(run, "requester")?);
    let reply_consumer = consumer(run, "requester", &replies)?;
    let mut reply_commits = Commits::new(&replies);

    // (a) Request/reply, one in flight: produce the request and wait for
    // its delivery report, then take the reply. Its commit goes out
    // asynchronously, beside the next request.
    let mut serial = histogram();
    let mut serial_report = histogram();
    let mut busy = Duration::ZERO;
    for i in 0..WARM_UP + SERIAL {
        let key = i.to_string();
        let t = Instant::now();
        delivered(send(&producer, &requests, key.as_bytes(), &body)?)
            .await
            .context("a raw request")?;
        let reported = t.elapsed();
        let m = next(&reply_consumer, "raw reply").await?;
        let took = t.elapsed();
        ensure!(
            m.key() == Some(key.as_bytes()),
            "a raw reply out of turn: key {:?}, expected {key}",
            m.key().map(String::from_utf8_lossy)
        );
        reply_commits.finished(&reply_consumer, m.offset())?;
        if i >= WARM_UP {
            record(&mut serial, took);
            record(&mut serial_report, reported);
            busy += took;
        }
    }
    let serial_rate = SERIAL as f64 / busy.as_secs_f64();
    reply_commits.send(&reply_consumer, CommitMode::Async)?;
    let idle = idle_cpu(bootstrap).await;

    // (b) One way, pipelined: delivery reports outstanding up to the
    // window; a consumer in a group of its own commits as it goes.
    let one_way = {
        let incoming = consumer(run, "one-way", &one_way_topic)?;
        // Joined and assigned before the clock starts: one record through.
        delivered(send(&producer, &one_way_topic, b"join", &body)?).await?;
        let m = next(&incoming, "one-way record").await?;
        let mut commits = Commits::new(&one_way_topic);
        commits.finished(&incoming, m.offset())?;
        drop(m);
        let (start, cpu) = (Instant::now(), Cpu::now(bootstrap));
        let consumed = tokio::spawn(async move {
            for _ in 0..calls {
                let m = next(&incoming, "one-way record").await?;
                commits.finished(&incoming, m.offset())?;
            }
            commits.send(&incoming, CommitMode::Async)?;
            close(incoming).await;
            anyhow::Ok(())
        });
        let window = Arc::new(Semaphore::new(PIPELINE));
        let mut reports = Vec::with_capacity(calls);
        for _ in 0..calls {
            let permit = tokio::time::timeout(WAIT, window.clone().acquire_owned())
                .await
                .map_err(|_| anyhow!("no delivery report within {WAIT:?}"))??;
            let report = send(&producer, &one_way_topic, b"", &body)?;
            reports.push(tokio::spawn(async move {
                let r = delivered(report).await;
                drop(permit);
                r
            }));
        }
        for r in reports {
            r.await?.context("a one-way record")?;
        }
        consumed.await??;
        Piped {
            rate: calls as f64 / start.elapsed().as_secs_f64(),
            latency: None,
            cpu: Cpu::per_message_since(cpu, bootstrap, calls),
        }
    };

    // (c) Request/reply with PIPELINE in flight: like for like with callq.
    // Each request carries its sequence number as key, which the responder
    // copies to the reply: the latency is exact per request.
    let request_reply = {
        let window = Arc::new(Semaphore::new(PIPELINE));
        let sent_at = Arc::new(Mutex::new(Vec::with_capacity(calls)));
        let failed = Arc::new(AtomicU64::new(0));
        let (start, cpu) = (Instant::now(), Cpu::now(bootstrap));
        let publisher = {
            let (producer, requests, window, body, sent_at, failed) = (
                producer.clone(),
                requests.clone(),
                window.clone(),
                body.clone(),
                sent_at.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                for seq in 0..calls {
                    tokio::time::timeout(WAIT, window.acquire())
                        .await
                        .map_err(|_| anyhow!("no raw reply within {WAIT:?}"))??
                        .forget();
                    sent_at
                        .lock()
                        .map_err(|_| anyhow!("poisoned"))?
                        .push(Instant::now());
                    let report = send(&producer, &requests, seq.to_string().as_bytes(), &body)?;
                    let failed = failed.clone();
                    tokio::spawn(async move {
                        if let Err(e) = delivered(report).await {
                            eprintln!("a raw request: {e:#}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                anyhow::Ok(())
            })
        };
        let mut latency = histogram();
        for _ in 0..calls {
            let m = next(&reply_consumer, "raw reply").await?;
            let seq: usize = std::str::from_utf8(m.key().context("a reply without key")?)?
                .parse()
                .context("a reply's key")?;
            let t = sent_at
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .get(seq)
                .copied()
                .context("a reply to a request not sent")?;
            record(&mut latency, t.elapsed());
            reply_commits.finished(&reply_consumer, m.offset())?;
            window.add_permits(1);
        }
        let rate = calls as f64 / start.elapsed().as_secs_f64();
        let cpu = Cpu::per_message_since(cpu, bootstrap, calls);
        publisher.await??;
        ensure!(
            failed.load(Ordering::Relaxed) == 0,
            "raw requests not stored"
        );
        Piped {
            rate,
            latency: Some(latency),
            cpu,
        }
    };
    reply_commits.send(&reply_consumer, CommitMode::Async)?;
    close(reply_consumer).await;
    stop.cancel();
    tokio::time::timeout(WAIT * 2, responding)
        .await
        .map_err(|_| anyhow!("the raw responder did not stop within {:?}", WAIT * 2))??
        .context("the raw responder")?;
    Ok(Raw {
        body_bytes: body.len(),
        serial,
        serial_report,
        idle,
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

async fn kafka(run: &Run, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let url = run.party_url(role);
    Ok(Arc::new(KafkaBroker::connect(&url).await.with_context(
        || format!("connecting the {role} to Kafka ({url})"),
    )?))
}

/// Runs the pipelined load and measures its CPU.
async fn piped(client: &Client, bootstrap: &str, calls: usize) -> anyhow::Result<Piped> {
    let cpu = Cpu::now(bootstrap);
    let report = run_load(client, &spec(calls, PIPELINE)).await?;
    Ok(Piped {
        rate: report.rate(),
        cpu: Cpu::per_message_since(cpu, bootstrap, calls),
        latency: Some(report.latency),
    })
}

struct Callq {
    idle: Cpu,
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

/// Waits for a task the shutdown token ends, no longer than `WAIT`.
async fn stopped<T>(what: &str, task: JoinHandle<Result<(), T>>) -> anyhow::Result<()>
where
    anyhow::Error: From<T>,
{
    tokio::time::timeout(WAIT, task)
        .await
        .map_err(|_| anyhow!("the {what} did not stop within {WAIT:?}"))??
        .map_err(anyhow::Error::from)
        .with_context(|| format!("the {what}"))
}

async fn callq_in_process(run: &Run, calls: usize) -> anyhow::Result<Callq> {
    let bootstrap = run.opts.bootstrap.as_str();
    let shutdown = CancellationToken::new();
    let coordinator_broker = kafka(run, "coordinator").await?;
    coordinator_broker
        .declare(&QueueSpec::coordinator())
        .await?;
    let coordinator = Coordinator::new(
        CoordinatorOptions::default(),
        coordinator_broker,
        Ledger::open(MemoryStore::default())?,
    );
    let coordinator = tokio::spawn(coordinator.run(shutdown.clone()));
    let worker = bench_worker("bench-in-process", true, kafka(run, "worker").await?)?;
    worker.declare().await?;
    let stop_worker = shutdown.child_token();
    let worker = tokio::spawn(worker.run(stop_worker.clone()));
    let client = Client::connect(kafka(run, "client").await?, ClientOptions::default()).await?;

    run_load(&client, &spec(WARM_UP, 1)).await?;
    let idle = idle_cpu(bootstrap).await;
    let serial = run_load(&client, &spec(SERIAL, 1)).await?;
    let pipelined = piped(&client, bootstrap, calls).await?;

    // The same load on a worker without the coordinator link (no
    // heartbeats, no flight reports, no completions): what the link costs.
    // The new worker joins the call topic's group as the old one leaves.
    stop_worker.cancel();
    stopped("worker", worker).await?;
    let worker = bench_worker("bench-uncoordinated", false, kafka(run, "worker-2").await?)?;
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    run_load(&client, &spec(WARM_UP, PIPELINE)).await?;
    let uncoordinated = piped(&client, bootstrap, calls).await?;

    shutdown.cancel();
    stopped("uncoordinated worker", worker).await?;
    stopped("coordinator", coordinator).await?;
    Ok(Callq {
        idle,
        serial,
        pipelined,
        uncoordinated,
    })
}

// ---------------------------------------------------------------------------

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// One line of the table: percentiles, mean, the share of round trips
/// over 30 ms, the rate, and for the pipelined runs the CPU per message of
/// this process and of the broker.
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
    let run = Run::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let figures = runtime.block_on(async {
        let raw = raw(&run, calls).await.context("the raw baseline")?;
        let callq = callq_in_process(&run, calls)
            .await
            .context("callq in process")?;
        anyhow::Ok((raw, callq))
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let (raw, callq) = figures?;

    let broker = match broker_pid(&run.opts.bootstrap) {
        Some(pid) => format!("tansu pid {pid}"),
        None => "broker process not found: its CPU shows as NaN".into(),
    };
    println!(
        "Kafka {} ({broker}), topics {}*, one partition, idempotent producers (acks=all), \
         manual commits, fetch.wait.max.ms={FETCH_WAIT_MS}; {}-byte call body; \
         {WARM_UP} warm-up + {SERIAL} round trips one at a time, \
         {calls} messages/calls pipelined with {PIPELINE} in flight",
        run.opts.bootstrap, run.prefix, raw.body_bytes
    );
    println!(
        "{:<46} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8}",
        "", "p50 ms", "p99 ms", "mean ms", ">30 ms", "per s", "bench us", "broker us"
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
        &format!("raw one-way produce+consume, {PIPELINE} reports"),
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
        "(bench us, broker us: CPU microseconds per message or call of this process and of the broker)"
    );
    println!(
        "raw produce -> delivery report, 1 in flight: p50 {:.3} ms, p99 {:.3} ms (twice in each round trip)",
        ms(&raw.serial_report, 0.5),
        ms(&raw.serial_report, 0.99)
    );
    println!(
        "idle for {IDLE:?}, CPU in % of a core: raw requester and responder {:.1}% + broker {:.1}%; \
         callq coordinator, worker and client {:.1}% + broker {:.1}%",
        raw.idle.bench, raw.idle.broker, callq.idle.bench, callq.idle.broker
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
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
