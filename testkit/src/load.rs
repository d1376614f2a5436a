//! A load generator: many calls in flight through one client, with latency
//! percentiles and a progress line.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use callq_node::{CallOptions, Client};
use callq_schemas::Outcome;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::Value;

/// What load to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The service to call.
    pub service: String,
    /// The method.
    pub method: String,
    /// The arguments of every call.
    pub args: Value,
    /// How many calls in all.
    pub calls: usize,
    /// How many in flight at once.
    pub concurrency: usize,
    /// Each call's timeout.
    pub timeout: Duration,
    /// Print a progress line to stderr while it runs.
    pub progress: bool,
}

/// What happened.
#[derive(Debug)]
pub struct LoadReport {
    /// Wall time from the first publish to the last outcome.
    pub elapsed: Duration,
    /// Calls per final outcome.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Calls the client could not publish or whose reply queue was lost.
    pub failed: u64,
    /// Round-trip latency of every call, in microseconds.
    pub latency: Histogram<u64>,
}

impl LoadReport {
    /// Calls completed per second.
    pub fn rate(&self) -> f64 {
        self.latency.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency percentile, in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Calls that ended in this outcome.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(outcome.as_str()).copied().unwrap_or(0)
    }

    /// One line: rate and percentiles.
    pub fn summary(&self) -> String {
        format!(
            "{} calls in {:.2} s: {:.0} calls/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.latency.len(),
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.percentile_ms(0.50),
            self.percentile_ms(0.99),
            self.latency.max() as f64 / 1000.0
        )
    }
}

/// Sends the load through `client` and waits for every outcome.
pub async fn run(client: &Client, spec: &LoadSpec) -> LoadReport {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let progress = spec.progress.then(|| {
        let done = done.clone();
        let total = spec.calls;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64().max(1e-9);
                eprint!(
                    "\r  {n:>8} / {total} calls, {:>8.0} calls/s",
                    n as f64 / secs
                );
                let _ = std::io::stderr().flush();
            }
        })
    });

    let opts = CallOptions {
        timeout: Some(spec.timeout),
        ..CallOptions::default()
    };
    let mut results = futures::stream::iter(0..spec.calls)
        .map(|_| {
            let opts = opts.clone();
            let done = &done;
            async move {
                let t = Instant::now();
                let r = client
                    .call(&spec.service, &spec.method, spec.args.clone(), opts)
                    .await;
                done.fetch_add(1, Ordering::Relaxed);
                (r, t.elapsed())
            }
        })
        .buffer_unordered(spec.concurrency.max(1));

    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid");
    let mut outcomes = BTreeMap::new();
    let mut failed = 0;
    while let Some((r, took)) = results.next().await {
        match r {
            Ok(reply) => {
                *outcomes.entry(reply.outcome.as_str()).or_insert(0) += 1;
                latency
                    .saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
            }
            Err(_) => failed += 1,
        }
    }
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
        let n = done.load(Ordering::Relaxed);
        eprintln!(
            "\r  {n:>8} / {} calls, {:>8.0} calls/s",
            spec.calls,
            n as f64 / elapsed.as_secs_f64().max(1e-9)
        );
    }
    LoadReport {
        elapsed,
        outcomes,
        failed,
        latency,
    }
}
