//! Ready calls' throughput on RabbitMQ with 100,000 delayed calls pending
//! against none: a coordinator (on redb, as shipped), one worker and a
//! client in this process, on a store that holds the delayed calls (due in
//! an hour) or none, alternated. Then the rate at which the worker hands
//! delayed calls over to the coordinator.
//!
//! `cargo bench --bench delayed [-- --calls N --delayed M]`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use callq_broker::{Broker, Message, QueueSpec, call_queue};
use callq_coordinator::RedbStore;
use callq_node::services;
use callq_schemas::Call;
use support::{InProcess, Vhost, amqp, run_load, spec, within, worker_options};

/// Ready calls per measurement.
const CALLS: usize = 20_000;
/// Delayed calls pending during the second measurement.
const DELAYED: usize = 100_000;
/// Calls in flight at once.
const CONCURRENCY: usize = 256;
/// The worker's capacity.
const CAPACITY: usize = 64;

/// Publishes `n` calls due in an hour, with confirms pipelined.
async fn publish_delayed(broker: &Arc<dyn Broker>, n: usize) -> anyhow::Result<()> {
    let queue = call_queue("echo");
    within(
        "declaring the call queue",
        broker.declare(&QueueSpec::calls("echo")),
    )
    .await?;
    let due = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let mut sent = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        let mut call = Call::new("echo", "echo", support::args());
        call.not_before = Some(due);
        call.deadline = Some(due + Duration::from_secs(60));
        let b = broker.clone();
        let q = queue.clone();
        sent.push(async move { b.publish(&q, Message::new(call.to_bytes())).await });
        if sent.len() >= 1_024 {
            use futures::StreamExt as _;
            if let Some(r) = sent.next().await {
                r?;
            }
        }
    }
    use futures::StreamExt as _;
    while let Some(r) = sent.next().await {
        r?;
    }
    Ok(())
}

/// Waits until the call queue holds no ready call: every delayed call was
/// handed to the coordinator, but for the worker's capacity in flight.
async fn handed_over(broker: &Arc<dyn Broker>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let queue = call_queue("echo");
    loop {
        let depth = within("reading the queue depth", broker.depth(&queue)).await?;
        if depth.ready == 0 {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1_200),
            "{} calls still in the queue after 20 minutes",
            depth.ready
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Holds `n` calls due in an hour in the store at `path`, as the
/// coordinator would after the workers handed them over.
fn fill(path: &std::path::Path, n: usize) -> anyhow::Result<()> {
    use callq_coordinator::{Delayed, Store as _};
    let mut store = RedbStore::open(path)?;
    let due = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let due_ms = i64::try_from(due.unix_timestamp_nanos() / 1_000_000)?;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let mut call = Call::new("echo", "echo", support::args());
        call.not_before = Some(due);
        batch.push(Delayed {
            call_id: call.call_id,
            due_ms: due_ms + i64::try_from(i % 1_000)?,
            service: "echo".into(),
            body: String::from_utf8(call.to_bytes())?,
            attempt: 2,
        });
        if batch.len() == batch.capacity() {
            store.put_delayed(&batch)?;
            batch.clear();
        }
    }
    store.put_delayed(&batch)?;
    ensure!(
        store.delayed_count()? == n as u64,
        "the store holds another count"
    );
    Ok(())
}

/// A coordinator on the store at `path`, a worker of `echo` and a client.
async fn start(url: &str, path: &std::path::Path) -> anyhow::Result<InProcess> {
    let connect = async |role: &str| amqp(url, role).await;
    InProcess::start_on(
        connect,
        worker_options("bench-delayed", CAPACITY, true)?,
        [services::echo()],
        RedbStore::open(path)?,
    )
    .await
}

/// One measurement: a coordinator on the store at `path`, a worker, a
/// client; `calls` ready calls after a warm-up. Calls/s.
async fn ready_rate(url: &str, path: &std::path::Path, calls: usize) -> anyhow::Result<f64> {
    let cluster = start(url, path).await?;
    run_load(&cluster.client, &spec(2_000, CONCURRENCY))
        .await
        .context("the warm-up")?;
    let report = run_load(&cluster.client, &spec(calls, CONCURRENCY)).await?;
    cluster.stop("worker").await?;
    Ok(report.rate())
}

/// The hand-over path: `n` calls published due in an hour, each taken by
/// the worker and handed to the coordinator. Calls/s, publishing included.
async fn hand_over_rate(url: &str, path: &std::path::Path, n: usize) -> anyhow::Result<f64> {
    let cluster = start(url, path).await?;
    let publisher = amqp(url, "publisher").await?;
    let clock = Instant::now();
    publish_delayed(&publisher, n).await?;
    handed_over(&publisher).await?;
    let rate = n as f64 / clock.elapsed().as_secs_f64();
    cluster.stop("worker").await?;
    Ok(rate)
}

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(CALLS)?;
    let delayed = support::usize_arg("--delayed", DELAYED)?;
    let vhost = Vhost::create()?;
    let url = vhost.url();
    let dir = std::env::temp_dir().join(format!("callq-bench-delayed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (empty, full) = (dir.join("none.redb"), dir.join("pending.redb"));
    let clock = Instant::now();
    fill(&full, delayed)?;
    let filled = clock.elapsed();
    let runtime = support::runtime()?;
    let figures = runtime.block_on(async {
        // Alternated, best of two each: the broker's own state (its quorum
        // logs growing with every run) weighs on both alike.
        let (mut none, mut pending) = (0.0_f64, 0.0_f64);
        for _ in 0..2 {
            none = none.max(
                ready_rate(&url, &empty, calls)
                    .await
                    .context("none delayed")?,
            );
            pending = pending.max(
                ready_rate(&url, &full, calls)
                    .await
                    .context("delayed ones pending")?,
            );
        }
        let handed = hand_over_rate(&url, &dir.join("handed.redb"), delayed / 10)
            .await
            .context("handing delayed calls over")?;
        anyhow::Ok((none, pending, handed))
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(vhost);
    let _ = std::fs::remove_dir_all(&dir);
    let (none, pending, handed) = figures?;
    println!(
        "RabbitMQ 127.0.0.1:5672, quorum queues; a coordinator on redb, one worker of \
         capacity {CAPACITY}, {CONCURRENCY} calls in flight; {calls} ready echo.echo calls per \
         run, best of two runs, alternated"
    );
    println!(
        "{delayed} delayed calls held in the coordinator's store (written in {:.1} s)",
        filled.as_secs_f64()
    );
    let ratio = pending / none;
    println!(
        "ready calls/s: none delayed {none:.0}, {delayed} delayed pending {pending:.0} \
         ({ratio:.2}x)"
    );
    println!(
        "handing delayed calls over (published, taken by the worker, held by the \
         coordinator): {handed:.0} calls/s over {}",
        delayed / 10
    );
    support::target_row(
        "RabbitMQ, ready calls with delayed ones pending",
        &format!("{pending:.0} calls/s"),
        &format!("{none:.0} calls/s with none"),
        ratio,
        ">= 0.90x",
        ratio >= 0.9,
    );
    Ok(())
}
