//! The cost of the coordinator's slow paths beside the fast path, measured
//! in one run on the embedded broker with the coordinator's ledger in redb:
//!
//! - fast path: a first delivery of a traceless call (no coordinator round
//!   trip);
//! - one trace: the handler asks `ctx.trace` once, so the call also
//!   completes synchronously (two durable round trips);
//! - resume: a copy with an attempt above 1 (as after a redelivery or a
//!   re-issue) asks `resume` before it runs (one durable round trip).
//!
//! One call in flight at a time, so each figure is a round trip.
//! `cargo bench --bench slow_paths` (add `-- --calls N` to change the size).
#![allow(missing_docs)]

mod support;

use std::time::Instant;

use callq_broker::{
    ATTEMPT_HEADER, Broker, Disposition, Message, QueueSpec, call_queue, reply_queue,
};
use callq_coordinator::RedbStore;
use callq_node::Service;
use callq_schemas::{Call, Limits, Outcome, decode_reply};
use callq_testkit::{ClusterOptions, LocalCluster};
use hdrhistogram::Histogram;
use serde_json::json;

#[derive(Clone, Copy)]
enum Path {
    Fast,
    Trace,
    Resume,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Self::Fast => "fast path (no trace)",
            Self::Trace => "one trace + synchronous complete",
            Self::Resume => "resume, then run",
        }
    }
}

fn bench_service() -> Service {
    Service::new("bench")
        .method("plain", |_ctx, args| async move { Ok(args) })
        .method("traced", |ctx, args| async move {
            ctx.trace("bench.effect").await?;
            Ok(args)
        })
}

async fn measure(broker: &dyn Broker, path: Path, calls: usize) -> Histogram<u64> {
    let client = format!("bench-{}", uuid::Uuid::now_v7().simple());
    broker
        .declare(&QueueSpec::replies(&client))
        .await
        .expect("declare");
    let replies = reply_queue(&client);
    let mut consumer = broker.consume(&replies, 16).await.expect("consume");
    let mut h = support::histogram();
    for _ in 0..calls {
        let method = if matches!(path, Path::Trace) {
            "traced"
        } else {
            "plain"
        };
        let mut call = Call::new("bench", method, json!({"n": 1}));
        call.reply_to = Some(replies.clone());
        let mut message = Message::new(call.to_bytes());
        if matches!(path, Path::Resume) {
            message = message.header(ATTEMPT_HEADER, "2");
        }
        let t = Instant::now();
        broker
            .publish(&call_queue("bench"), message)
            .await
            .expect("publish");
        let d = consumer
            .next()
            .await
            .expect("reply")
            .expect("reply delivery");
        support::record(&mut h, t.elapsed());
        let reply = decode_reply(&d.body, &Limits::default()).expect("reply decodes");
        assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
        d.settle(Disposition::Ack).await.expect("ack");
    }
    h
}

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(2_000)?;
    let runtime = support::runtime()?;
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("callq-bench-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir)?;
        let store = RedbStore::open(dir.join("ledger.redb"))?;
        let mut cluster = LocalCluster::start(ClusterOptions::default(), store).await?;
        cluster
            .spawn_with("bench-1", vec![bench_service()], false)
            .await?;
        let broker = cluster.broker.clone();
        // Warm up every path, then measure each.
        for path in [Path::Fast, Path::Trace, Path::Resume] {
            measure(broker.as_ref(), path, calls / 10 + 1).await;
        }
        println!("slow paths, embedded broker, ledger in redb, {calls} calls each, one in flight:");
        let mut fast_p50 = 0.0;
        for path in [Path::Fast, Path::Trace, Path::Resume] {
            let h = measure(broker.as_ref(), path, calls).await;
            let p50 = support::ms(&h, 0.5);
            if matches!(path, Path::Fast) {
                fast_p50 = p50;
            }
            println!(
                "  {:<34} p50 {:>7.3} ms  p99 {:>7.3} ms  mean {:>7.3} ms  ({:.1}x the fast path's p50)",
                path.name(),
                p50,
                support::ms(&h, 0.99),
                h.mean() / 1000.0,
                p50 / fast_p50.max(1e-9)
            );
        }
        cluster.shutdown().await?;
        std::fs::remove_dir_all(&dir)?;
        anyhow::Ok(())
    })
}
