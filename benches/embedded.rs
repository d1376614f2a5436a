//! Embedded-broker benchmark: callq's `echo.echo` beside the raw broker's
//! request/reply, measured in the same run.
//!
//! `cargo bench --bench embedded` (add `-- --calls N` to change the size).
#![allow(missing_docs)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use callq_broker::{Broker, Disposition, Message, QueueSpec};
use callq_broker_embedded::EmbeddedBroker;
use callq_node::{Client, ClientOptions, Worker, WorkerOptions, services};
use callq_testkit::load::{self, LoadSpec};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WORKERS: usize = 3;
const CAPACITY: u16 = 64;
const PIPELINE: usize = 256;

struct Figures {
    p50_ms: f64,
    p99_ms: f64,
    rate: f64,
}

/// The raw broker: a responder copies each request to the reply queue and
/// acks it; the requester waits for the reply. No envelope, no handler.
async fn raw(calls: usize) -> (Figures, Figures) {
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new());
    broker
        .declare(&QueueSpec::calls("raw"))
        .await
        .expect("declare");
    broker
        .declare(&QueueSpec::replies("raw"))
        .await
        .expect("declare");
    for _ in 0..WORKERS {
        let broker = broker.clone();
        let mut consumer = broker
            .consume("callq.call.raw", CAPACITY)
            .await
            .expect("consume");
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let broker = broker.clone();
                tokio::spawn(async move {
                    broker
                        .publish("callq.reply.raw", Message::new(d.body.clone()))
                        .await
                        .expect("reply");
                    d.settle(Disposition::Ack).await.expect("ack");
                });
            }
        });
    }
    let mut replies = broker
        .consume("callq.reply.raw", 1024)
        .await
        .expect("consume");
    let body = serde_json::to_vec(&json!({"hello": "callq", "n": 42})).expect("json");

    let mut latency = support::histogram();
    for _ in 0..calls / 10 {
        let t = Instant::now();
        broker
            .publish("callq.call.raw", Message::new(body.clone()))
            .await
            .expect("publish");
        let d = replies.next().await.expect("open").expect("reply");
        d.settle(Disposition::Ack).await.expect("ack");
        support::record(&mut latency, t.elapsed());
    }
    let serial = Figures {
        p50_ms: support::ms(&latency, 0.5),
        p99_ms: support::ms(&latency, 0.99),
        rate: latency.len() as f64 / (latency.mean() * latency.len() as f64 / 1e6),
    };

    let start = Instant::now();
    let window = Arc::new(tokio::sync::Semaphore::new(PIPELINE));
    let publisher = {
        let (broker, window, body) = (broker.clone(), window.clone(), body.clone());
        tokio::spawn(async move {
            for _ in 0..calls {
                window.acquire().await.expect("open").forget();
                broker
                    .publish("callq.call.raw", Message::new(body.clone()))
                    .await
                    .expect("publish");
            }
        })
    };
    for _ in 0..calls {
        let d = replies.next().await.expect("open").expect("reply");
        d.settle(Disposition::Ack).await.expect("ack");
        window.add_permits(1);
    }
    publisher.await.expect("publisher");
    let pipelined = Figures {
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        rate: calls as f64 / start.elapsed().as_secs_f64(),
    };
    (serial, pipelined)
}

/// callq: workers with the echo service, one client.
async fn callq(calls: usize) -> (Figures, Figures) {
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new());
    let shutdown = CancellationToken::new();
    for i in 0..WORKERS {
        let w = Worker::new(
            WorkerOptions {
                worker_id: format!("w{i}"),
                capacity: CAPACITY,
                ..WorkerOptions::default()
            },
            broker.clone(),
        )
        .service(services::echo());
        w.declare().await.expect("declare");
        tokio::spawn(w.run(shutdown.clone()));
    }
    let client = Client::connect(broker, ClientOptions::default())
        .await
        .expect("client");
    let spec = |calls, concurrency| LoadSpec {
        service: "echo".into(),
        method: "echo".into(),
        args: json!({"hello": "callq", "n": 42}),
        calls,
        concurrency,
        timeout: Duration::from_secs(30),
        progress: false,
    };
    let serial = load::run(&client, &spec(calls / 10, 1)).await;
    let pipelined = load::run(&client, &spec(calls, PIPELINE)).await;
    shutdown.cancel();
    let figures = |r: &load::LoadReport| Figures {
        p50_ms: r.percentile_ms(0.5),
        p99_ms: r.percentile_ms(0.99),
        rate: r.rate(),
    };
    (figures(&serial), figures(&pipelined))
}

fn main() {
    let calls = std::env::args()
        .skip_while(|a| a != "--calls")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(50_000usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Warm up both paths once.
        raw(2_000).await;
        callq(2_000).await;
        let (raw_serial, raw_pipe) = raw(calls).await;
        let (cq_serial, cq_pipe) = callq(calls).await;
        println!("embedded broker, {WORKERS} consumers x prefetch {CAPACITY}; {} calls one at a time, {calls} with {PIPELINE} in flight", calls / 10);
        println!("{:<32} {:>10} {:>10} {:>14}", "", "p50 ms", "p99 ms", "calls/s");
        println!("{:<32} {:>10.3} {:>10.3} {:>14.0}", "raw request/reply, 1 in flight", raw_serial.p50_ms, raw_serial.p99_ms, raw_serial.rate);
        println!("{:<32} {:>10.3} {:>10.3} {:>14.0}", "callq echo.echo, 1 in flight", cq_serial.p50_ms, cq_serial.p99_ms, cq_serial.rate);
        println!("{:<32} {:>10} {:>10} {:>14.0}", format!("raw, {PIPELINE} in flight"), "-", "-", raw_pipe.rate);
        println!("{:<32} {:>10.3} {:>10.3} {:>14.0}", format!("callq, {PIPELINE} in flight"), cq_pipe.p50_ms, cq_pipe.p99_ms, cq_pipe.rate);
        println!(
            "ratios callq/raw: round-trip p50 {:.2}x, throughput {:.2}x",
            cq_serial.p50_ms / raw_serial.p50_ms,
            cq_pipe.rate / raw_pipe.rate
        );
    });
}
