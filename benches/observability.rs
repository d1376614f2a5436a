//! What metrics and traces cost, on RabbitMQ: the pipelined `echo.echo`
//! load (`PIPELINE` in flight) through a real `callq coordinator` and
//! `callq worker` process, driven by a client process (this bench's own
//! executable, `--client`), with observability off and on, measured in
//! the same run.
//!
//! - off: no `CALLQ_HTTP` (no metrics recorder: every count is a no-op) and
//!   no `OTEL_EXPORTER_OTLP_ENDPOINT` (no span is made);
//! - on: `/metrics` served (every metric recorded) and every span exported
//!   with OTLP to a receiver in this bench (the client's `send`, the
//!   worker's `process`, the coordinator's), with a queue large enough that
//!   no span is dropped.
//!
//! Rounds alternate the order (off then on, on then off), each on fresh
//! processes; the figures are the medians. The target: on within 5% of
//! off.
//!
//! `cargo build --release --bin callq && cargo bench --bench observability`
//! (`-- --calls N`, `-- --rounds N`).
#![allow(missing_docs)]

mod support;
#[path = "../src/cli/telemetry.rs"]
#[allow(dead_code, unreachable_pub, unused_imports)]
mod telemetry;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use callq_node::{Client, ClientOptions};
use support::{CALLS, PIPELINE, Pair, Vhost, WARM_UP, amqp, callq_binary, run_load, spec};

/// The most that observability may cost, as a share of the throughput.
const OVERHEAD_TARGET: f64 = 0.05;

/// Client mode: `--client URL CALLS` runs the load and prints `RATE <calls/s>`.
async fn client(url: &str, calls: usize) -> anyhow::Result<()> {
    let traces = telemetry::install("callq-client")?;
    let client =
        Client::connect(amqp(url, "bench client").await?, ClientOptions::default()).await?;
    run_load(&client, &spec(WARM_UP, PIPELINE)).await?;
    let report = run_load(&client, &spec(calls, PIPELINE)).await?;
    println!("RATE {}", report.rate());
    traces.finish().await;
    Ok(())
}

/// Spans received: OTLP requests and bytes.
#[derive(Default)]
struct Received {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// An OTLP/HTTP receiver that counts and drops what it gets.
async fn receiver() -> anyhow::Result<(u16, Arc<Received>)> {
    let received = Arc::new(Received::default());
    let counted = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counted = counted.clone();
            async move {
                counted.requests.fetch_add(1, Ordering::Relaxed);
                counted
                    .bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((port, received))
}

/// One measured run: fresh processes with `env`, the client's calls/s.
async fn round(url: &str, calls: usize, env: &[(&str, &str)]) -> anyhow::Result<f64> {
    let bin = callq_binary()?;
    let dir = std::env::temp_dir().join(format!("callq-bench-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    let mut pair = Pair::start(&bin, url, &dir, "bench-obs", env).await?;
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .args(["--client", url, &calls.to_string()])
        .envs(env.iter().copied())
        .output()
        .await
        .context("running the client process")?;
    pair.still_running()?;
    ensure!(
        out.status.success(),
        "the client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rate = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RATE "))
        .context("the client printed no rate")?
        .trim()
        .parse()?;
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rate)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = support::runtime()?;
    if let Some(at) = args.iter().position(|a| a == "--client") {
        let url = args.get(at + 1).context("--client URL CALLS")?;
        let calls = args.get(at + 2).context("--client URL CALLS")?.parse()?;
        return runtime.block_on(client(url, calls));
    }
    let calls = support::calls_arg(CALLS)?;
    let rounds = support::usize_arg("--rounds", 3)?;
    let bin = callq_binary()?;
    ensure!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --bin callq` first",
        bin.display()
    );
    let vhost = Vhost::create()?;
    let url = vhost.url();
    let started = Instant::now();
    let figures = runtime.block_on(async {
        let (port, received) = receiver().await?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let on: [(&str, &str); 4] = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "65536"),
            ("OTEL_BSP_SCHEDULE_DELAY", "500"),
            // Any free port: the recorder is on, nobody scrapes.
            ("CALLQ_HTTP", "127.0.0.1:0"),
        ];
        let (mut off_rates, mut on_rates) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            for traced in if r % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            } {
                let env: &[(&str, &str)] = if traced { &on } else { &[] };
                let before = received.bytes.load(Ordering::Relaxed);
                let rate = round(&url, calls, env).await?;
                // What the receiver got in this round, per call (warm-up
                // calls included).
                let sent = received.bytes.load(Ordering::Relaxed) - before;
                println!(
                    "round {}: observability {}: {rate:.0} calls/s{}",
                    r + 1,
                    if traced { "on " } else { "off" },
                    if traced {
                        format!(
                            " ({} bytes of spans a call)",
                            sent / (calls + WARM_UP) as u64
                        )
                    } else {
                        String::new()
                    }
                );
                if traced {
                    &mut on_rates
                } else {
                    &mut off_rates
                }
                .push(rate);
            }
        }
        let spans = (
            received.requests.load(Ordering::Relaxed),
            received.bytes.load(Ordering::Relaxed),
        );
        anyhow::Ok((median(&mut off_rates), median(&mut on_rates), spans))
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(vhost);
    let (off, on, (requests, bytes)) = figures?;
    let cost = 1.0 - on / off;
    println!(
        "RabbitMQ 127.0.0.1:5672, echo.echo, {calls} calls with {PIPELINE} in flight, \
         coordinator + worker + client processes, median of {rounds} rounds each"
    );
    println!("observability off: {off:.0} calls/s");
    println!(
        "observability on:  {on:.0} calls/s (metrics recorded, every span exported: \
         {requests} OTLP requests, {:.1} MiB in {rounds} rounds)",
        bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "cost {:.1}% of the throughput (target <= {:.0}%) {}",
        cost * 100.0,
        OVERHEAD_TARGET * 100.0,
        support::verdict(cost <= OVERHEAD_TARGET)
    );
    support::target_row(
        "RabbitMQ echo.echo with metrics and traces on",
        &format!("{on:.0} calls/s"),
        &format!("off {off:.0} calls/s"),
        on / off,
        &format!(
            ">= {:.2}x (cost <= {:.0}%)",
            1.0 - OVERHEAD_TARGET,
            OVERHEAD_TARGET * 100.0
        ),
        cost <= OVERHEAD_TARGET,
    );
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
