//! Per-key concurrency limits on RabbitMQ: keyed calls over many keys with
//! `max_running_per_key = 1` against the same keyed calls with no limit: a
//! coordinator, one worker and a client in this process, the two set-ups
//! alternated. The limit costs an `admit` round trip to the coordinator
//! and a batched `vacate` per call; with many keys a call seldom waits.
//!
//! `cargo bench --bench keys [-- --calls N --keys K]`.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use callq_node::{CallOptions, Client, services};
use callq_schemas::Outcome;
use futures::StreamExt as _;
use support::{InProcess, Vhost, amqp, worker_options};

/// Keyed calls per measurement.
const CALLS: usize = 20_000;
/// The keys they are spread over.
const KEYS: usize = 10_000;
/// Calls in flight at once.
const CONCURRENCY: usize = 256;
/// The worker's capacity.
const CAPACITY: usize = 64;

/// `calls` keyed `echo.echo` calls, `CONCURRENCY` in flight: calls/s.
async fn keyed_load(client: &Client, calls: usize, keys: usize) -> anyhow::Result<f64> {
    let clock = Instant::now();
    let mut ok = 0_usize;
    let mut replies = futures::stream::iter(0..calls)
        .map(|i| {
            let client = client.clone();
            async move {
                let opts = CallOptions {
                    concurrency_key: Some(format!("account-{}", i % keys)),
                    timeout: Some(Duration::from_secs(120)),
                    ..CallOptions::default()
                };
                client.call("echo", "echo", support::args(), opts).await
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(reply) = replies.next().await {
        let reply = reply?;
        ensure!(reply.outcome == Outcome::Ok, "a call failed: {reply:?}");
        ok += 1;
    }
    ensure!(ok == calls, "{ok} of {calls} calls ok");
    Ok(calls as f64 / clock.elapsed().as_secs_f64())
}

/// One measurement: a coordinator, a worker with the limit or without,
/// a client; `calls` keyed calls after a warm-up. Calls/s.
async fn rate(url: &str, limit: bool, calls: usize, keys: usize) -> anyhow::Result<f64> {
    let connect = async |role: &str| amqp(url, role).await;
    let mut opts = worker_options("bench-keys", CAPACITY, true)?;
    if limit {
        opts.max_running_per_key.insert("echo".into(), 1);
    }
    let cluster = InProcess::start(connect, opts, [services::echo()]).await?;
    keyed_load(&cluster.client, 2_000, keys)
        .await
        .context("the warm-up")?;
    let rate = keyed_load(&cluster.client, calls, keys).await?;
    cluster.stop("worker").await?;
    Ok(rate)
}

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(CALLS)?;
    let keys = support::usize_arg("--keys", KEYS)?;
    let vhost = Vhost::create()?;
    let url = vhost.url();
    let runtime = support::runtime()?;
    let figures = runtime.block_on(async {
        // Alternated, best of two each: the broker's own state (its quorum
        // logs growing with every run) weighs on both alike.
        let (mut off, mut on) = (0.0_f64, 0.0_f64);
        for _ in 0..2 {
            off = off.max(rate(&url, false, calls, keys).await.context("no limit")?);
            on = on.max(rate(&url, true, calls, keys).await.context("limit 1")?);
        }
        anyhow::Ok((off, on))
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(vhost);
    let (off, on) = figures?;
    println!(
        "RabbitMQ 127.0.0.1:5672, quorum queues; a coordinator in memory, one worker of \
         capacity {CAPACITY}, {CONCURRENCY} calls in flight; {calls} echo.echo calls over \
         {keys} concurrency keys per run, best of two runs, alternated"
    );
    let ratio = on / off;
    println!("keyed calls/s: no limit {off:.0}, max_running_per_key = 1 {on:.0} ({ratio:.2}x)");
    support::target_row(
        "RabbitMQ, keyed calls with a per-key limit",
        &format!("{on:.0} calls/s"),
        &format!("{off:.0} calls/s with none"),
        ratio,
        ">= 0.90x",
        ratio >= 0.9,
    );
    Ok(())
}
