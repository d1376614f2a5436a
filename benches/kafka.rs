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

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use callq_broker::Broker;
use callq_broker_kafka::{KafkaBroker, Options};
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use support::{
    CALLS, CallqEcho, Cpu, InFlight, PIPELINE, Piped, RawEcho, SERIAL, WARM_UP, envelope,
    histogram, ms, record,
};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// The broker's process, found by its command name (`tansu`): the one whose
/// command line names the URL's port, else the only one.
fn broker_pid(bootstrap: &str) -> Option<&'static str> {
    static PID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PID.get_or_init(|| {
        let port = bootstrap.split(',').next()?.rsplit_once(':')?.1.to_owned();
        let tansus = support::processes_named("tansu");
        let on_port = format!(":{port}");
        match tansus.iter().find(|(_, cmd)| cmd.contains(&on_port)) {
            Some((pid, _)) => Some(pid.clone()),
            None if tansus.len() == 1 => Some(tansus[0].0.clone()),
            None => None,
        }
    })
    .as_deref()
}

/// How long the idle measurements last.
const IDLE: Duration = Duration::from_secs(3);

/// The CPU used while nothing is sent, in percent of one core: what the
/// consumers' fetches (each held `fetch.wait.max.ms` by tansu), heartbeats
/// and commits cost by themselves.
async fn idle_cpu(bootstrap: &str) -> Cpu {
    let broker = broker_pid(bootstrap);
    let (start, t) = (Cpu::now(broker), Instant::now());
    tokio::time::sleep(IDLE).await;
    Cpu::percent_since(start, broker, t.elapsed())
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
    echo: RawEcho,
    /// From produce to delivery report, within the serial round trips.
    serial_report: Histogram<u64>,
    idle: Cpu,
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
        let (start, cpu) = (Instant::now(), Cpu::now(broker_pid(bootstrap)));
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
            cpu: Cpu::per_message_since(cpu, broker_pid(bootstrap), calls),
        }
    };

    // (c) Request/reply with PIPELINE in flight: like for like with callq.
    // Each request carries its sequence number as key, which the responder
    // copies to the reply: the latency is exact per request.
    let request_reply = {
        let in_flight = InFlight::start(calls, broker_pid(bootstrap));
        let publisher = {
            let (producer, requests, body) = (producer.clone(), requests.clone(), body.clone());
            in_flight.publisher(calls, move |seq| {
                let report = send(&producer, &requests, seq.to_string().as_bytes(), &body);
                async move { Ok(delivered(report?)) }
            })
        };
        let mut latency = histogram();
        for _ in 0..calls {
            let m = next(&reply_consumer, "raw reply").await?;
            let seq: usize = std::str::from_utf8(m.key().context("a reply without key")?)?
                .parse()
                .context("a reply's key")?;
            record(&mut latency, in_flight.took(seq)?);
            reply_commits.finished(&reply_consumer, m.offset())?;
            in_flight.release();
        }
        in_flight
            .finish(
                calls,
                broker_pid(bootstrap),
                latency,
                publisher,
                "raw requests not stored",
            )
            .await?
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
        echo: RawEcho {
            serial,
            serial_rate,
            one_way,
            request_reply,
        },
        serial_report,
        idle,
    })
}

// ---------------------------------------------------------------------------
// 2. callq on the same broker.

async fn kafka(run: &Run, role: &str) -> anyhow::Result<Arc<dyn Broker>> {
    let url = run.party_url(role);
    Ok(Arc::new(KafkaBroker::connect(&url).await.with_context(
        || format!("connecting the {role} to Kafka ({url})"),
    )?))
}

/// callq's runs, and the CPU its parties and the broker use while idle
/// (measured after the warm-up). The uncoordinated worker joins the call
/// topic's group as the first one leaves.
async fn callq_in_process(run: &Run, calls: usize) -> anyhow::Result<(CallqEcho, Cpu)> {
    let bootstrap = run.opts.bootstrap.as_str();
    let connect = async |role: &str| kafka(run, role).await;
    let idle = async || idle_cpu(bootstrap).await;
    support::callq_echo(connect, "worker-2", broker_pid(bootstrap), calls, idle).await
}

// ---------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(CALLS)?;
    let run = Run::from_env()?;
    let runtime = support::runtime()?;
    let started = Instant::now();
    let figures = runtime.block_on(async {
        let raw = raw(&run, calls).await.context("the raw baseline")?;
        let callq = callq_in_process(&run, calls)
            .await
            .context("callq in process")?;
        anyhow::Ok((raw, callq))
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let (raw, (callq, callq_idle)) = figures?;

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
    support::echo_table(
        "broker us",
        "the broker",
        &format!("raw one-way produce+consume, {PIPELINE} reports"),
        &raw.echo,
        &callq,
    );
    println!(
        "raw produce -> delivery report, 1 in flight: p50 {:.3} ms, p99 {:.3} ms (twice in each round trip)",
        ms(&raw.serial_report, 0.5),
        ms(&raw.serial_report, 0.99)
    );
    println!(
        "idle for {IDLE:?}, CPU in % of a core: raw requester and responder {:.1}% + broker {:.1}%; \
         callq coordinator, worker and client {:.1}% + broker {:.1}%",
        raw.idle.bench, raw.idle.broker, callq_idle.bench, callq_idle.broker
    );
    support::echo_ratios(&raw.echo, &callq);
    support::echo_targets("Kafka", &raw.echo, &callq);
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
