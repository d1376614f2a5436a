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

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use callq_node::{Client, ClientOptions};
use callq_testkit::load::LoadReport;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use support::{
    CALLS, CallqEcho, Cpu, InFlight, PIPELINE, Piped, RawEcho, SERIAL, Vhost, WARM_UP, amqp,
    envelope, histogram, rabbitmq_pid, record, run_load, spec,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The design's target for a worker process's resident memory.
const IDLE_RSS_TARGET_MIB: f64 = 20.0;

// ---------------------------------------------------------------------------
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
    echo: RawEcho,
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
        let (start, cpu) = (Instant::now(), Cpu::now(rabbitmq_pid()));
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
            cpu: Cpu::per_message_since(cpu, rabbitmq_pid(), calls),
        }
    };

    // (c) Request/reply with PIPELINE in flight: like for like with callq.
    // Each request carries its sequence number as correlation id, which the
    // responder copies to the reply: the latency is exact per request.
    let request_reply = {
        let in_flight = InFlight::start(calls, rabbitmq_pid());
        let publisher = {
            let (ch, body) = (ch.clone(), body.clone());
            in_flight.publisher(calls, move |seq| {
                let (ch, body) = (ch.clone(), body.clone());
                async move {
                    let confirm =
                        publish(&ch, "bench.raw.requests", &body, properties(Some(seq))).await?;
                    Ok(confirmed(confirm))
                }
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
            record(&mut latency, in_flight.took(seq)?);
            d.acker.ack(BasicAckOptions::default()).await?;
            in_flight.release();
        }
        in_flight
            .finish(
                calls,
                rabbitmq_pid(),
                latency,
                publisher,
                "raw publishes not confirmed",
            )
            .await?
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(Raw {
        body_bytes: body.len(),
        echo: RawEcho {
            serial,
            serial_rate,
            one_way,
            request_reply,
        },
    })
}

// ---------------------------------------------------------------------------
// 2. callq on the same broker.

async fn callq_in_process(url: &str, calls: usize) -> anyhow::Result<CallqEcho> {
    let connect = async |role: &str| amqp(url, role).await;
    let (echo, ()) =
        support::callq_echo(connect, "worker", rabbitmq_pid(), calls, async || ()).await?;
    Ok(echo)
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
    let mut pair = support::Pair::start(bin, url, &dir, "bench-rss", &[]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = pair.worker.pid();
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
    pair.still_running()?;
    drop(pair);
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

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(CALLS)?;
    let bin = support::callq_binary()?;
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
    let runtime = support::runtime()?;
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
    support::echo_table(
        "rabbit us",
        "RabbitMQ",
        &format!("raw one-way publish+consume, {PIPELINE} confirms"),
        &raw.echo,
        &callq,
    );
    support::echo_ratios(&raw.echo, &callq);
    support::echo_targets("RabbitMQ", &raw.echo, &callq);
    println!(
        "worker process RSS: idle {:.1} MiB (target <= {IDLE_RSS_TARGET_MIB} MiB) {}; \
         under load max {:.1} MiB (VmHWM {:.1} MiB) while it served {:.0} calls/s",
        rss.idle_mib,
        support::verdict(rss.idle_mib <= IDLE_RSS_TARGET_MIB),
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
