//! Session benchmark: `counter.add` (a session read checked against the
//! coordinator, then a write committed with the completion) beside
//! `echo.echo`, on one in-process cluster with the default store (redb),
//! measured in the same run.
//!
//! `cargo bench --bench session` (add `-- --calls N` to change the size of
//! the concurrent runs).
#![allow(missing_docs)]

mod support;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use callq_coordinator::{MemoryStore, RedbStore};
use callq_node::{CallOptions, Client};
use callq_schemas::Outcome;
use callq_testkit::{ClusterOptions, LocalCluster};
use futures::StreamExt;
use serde_json::json;
use support::{SERIAL, WARM_UP, histogram, ms, record};

/// Sessions the concurrent run spreads its calls over, and calls in flight.
const SESSIONS: usize = 64;
const IN_FLIGHT: usize = 64;

async fn one(client: &Client, service: &str, i: usize) -> anyhow::Result<Duration> {
    let (method, args, session) = match service {
        "counter" => ("add", json!({ "n": 1 }), Some(format!("s{}", i % SESSIONS))),
        _ => ("echo", json!({ "n": 1 }), None),
    };
    let started = Instant::now();
    let reply = client
        .call(
            service,
            method,
            args,
            CallOptions {
                session_id: session,
                timeout: Some(Duration::from_secs(60)),
                ..CallOptions::default()
            },
        )
        .await?;
    anyhow::ensure!(reply.outcome == Outcome::Ok, "{reply:?}");
    Ok(started.elapsed())
}

/// Round trips one at a time (on one session, so the cache stays warm),
/// then `calls` with `IN_FLIGHT` in flight over `SESSIONS` sessions.
async fn measure(client: &Client, service: &str, calls: usize) -> anyhow::Result<(f64, f64)> {
    for _ in 0..WARM_UP {
        one(client, service, 0).await?;
    }
    let mut serial = histogram();
    for _ in 0..SERIAL {
        record(&mut serial, one(client, service, 0).await?);
    }
    let started = Instant::now();
    let mut pipelined = histogram();
    let mut runs = futures::stream::iter(0..calls)
        .map(|i| one(client, service, i))
        .buffer_unordered(IN_FLIGHT);
    while let Some(took) = runs.next().await {
        record(&mut pipelined, took?);
    }
    let rate = calls as f64 / started.elapsed().as_secs_f64();
    println!(
        "{service:8} one at a time: p50 {:.3} ms, p99 {:.3} ms | {IN_FLIGHT} in flight: {rate:.0} calls/s, p50 {:.2} ms",
        ms(&serial, 0.5),
        ms(&serial, 0.99),
        ms(&pipelined, 0.5)
    );
    Ok((ms(&serial, 0.5), rate))
}

/// A session call on a warm cache against `echo.echo`, round-trip p50.
const SESSION_TARGET: f64 = 3.0;

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(10_000)?;
    let dir = std::env::temp_dir().join(format!("callq-bench-session-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let runtime = support::runtime()?;
    runtime.block_on(async {
        let store = RedbStore::open(dir.join("ledger.redb")).context("opening the store")?;
        let mut cluster = LocalCluster::start(ClusterOptions::default(), store).await?;
        cluster
            .spawn_worker("w1", &["echo", "counter"], false)
            .await?;
        let client = cluster.client().await?;
        let (echo_p50, echo_rate) = measure(&client, "echo", calls).await?;
        let (counter_p50, counter_rate) = measure(&client, "counter", calls).await?;
        println!(
            "ratio counter.add/echo.echo round-trip p50: {:.2}x; calls/s: {:.2}x",
            counter_p50 / echo_p50,
            counter_rate / echo_rate
        );
        let ratio = counter_p50 / echo_p50;
        support::target_row(
            "counter.add (session, warm cache) p50, embedded broker",
            &format!("p50 {counter_p50:.3} ms"),
            &format!("echo.echo p50 {echo_p50:.3} ms"),
            ratio,
            &format!("<= {SESSION_TARGET}x"),
            ratio <= SESSION_TARGET,
        );
        cluster.shutdown().await?;
        // The same on a store in memory: the protocol's part without the
        // store's fsync.
        let mut cluster =
            LocalCluster::start(ClusterOptions::default(), MemoryStore::default()).await?;
        cluster.spawn_worker("w1", &["counter"], false).await?;
        let client = cluster.client().await?;
        println!("(memory store, no fsync)");
        let (p50, rate) = measure(&client, "counter", calls).await?;
        println!(
            "ratio counter.add (memory store)/echo.echo round-trip p50: {:.2}x; calls/s: {:.2}x",
            p50 / echo_p50,
            rate / echo_rate
        );
        cluster.shutdown().await
    })?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
