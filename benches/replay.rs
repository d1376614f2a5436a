//! Replay throughput into handlers: a capture file of 100,000 `echo.echo`
//! calls (with their replies) replayed through the built-in echo service
//! on the embedded broker (`callq_testkit::replay::replay_into`), every reply
//! compared with the captured one.
//!
//! `cargo bench --bench replay` (add `-- --calls N` to change the size).
#![allow(missing_docs)]

mod support;

use std::collections::BTreeMap;
use std::time::Instant;

use callq_node::capture::{Body, Origin, Record, Writer};
use callq_node::replay::ReplayOptions;
use callq_node::services;
use callq_schemas::{Call, Reply};
use callq_testkit::replay::replay_into;
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(100_000)?;
    let mut w = Writer::new(Vec::new(), "embedded", "echo")?;
    for i in 0..calls {
        let mut call = Call::new(
            "echo",
            "echo",
            json!({ "i": i, "text": "some captured text" }),
        );
        call.reply_to = Some("callq.reply.shop".into());
        w.write(&Record::Call {
            origin: Origin::default(),
            at_ms: i as u64,
            attempt: 1,
            headers: BTreeMap::new(),
            body: Body::of(&call.to_bytes()),
        })?;
        let reply = Reply::ok(call.call_id, 1, call.args.clone());
        w.write(&Record::Reply {
            origin: Origin::default(),
            at_ms: i as u64,
            body: Body::of(&reply.to_bytes()),
        })?;
    }
    let file = w.finish()?;
    println!(
        "capture file: {calls} calls and {calls} replies, {:.1} MiB",
        file.len() as f64 / (1024.0 * 1024.0)
    );
    let runtime = support::runtime()?;
    for run in 1..=3 {
        let started = Instant::now();
        let report = runtime.block_on(replay_into(
            vec![services::echo()],
            file.as_slice(),
            ReplayOptions {
                capacity: 256,
                ..ReplayOptions::default()
            },
        ))?;
        let took = started.elapsed().as_secs_f64();
        let failures = report.failures();
        anyhow::ensure!(
            failures.is_empty() && report.calls.len() == calls,
            "the replay did not give the captured replies: {} failures",
            failures.len()
        );
        println!(
            "run {run}: {calls} calls replayed and compared in {took:.2} s: {:.0} calls/s",
            calls as f64 / took
        );
    }
    Ok(())
}
