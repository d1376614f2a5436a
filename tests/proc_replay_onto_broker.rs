//! `callq replay FILE --to URL --new-ids` republishes the calls of a capture
//! file onto a real RabbitMQ, where `callq coordinator` and `callq worker`
//! processes serve them: the replies have the captured outcomes, under new
//! call ids. A bad line stops the replay, naming it, unless `--skip-bad`.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::Duration;

use callq_broker::{Disposition, QueueSpec};
use callq_node::capture::{Body, Origin, Record, Writer};
use callq_schemas::{Call, Reply, decode_reply};
use serde_json::json;
use support::{Proc, Vhost};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_new_ids_gets_the_captured_outcomes() {
    let vhost = Vhost::create("replay");
    let dir = support::temp_dir("replay");
    let _coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let _worker = support::worker("w1", &vhost.url, &dir, false);
    let broker = support::amqp(&vhost.url).await;
    let replies = QueueSpec::replies("replay-test");
    broker.declare(&replies).await.unwrap();

    // The capture: 10 echo calls answered ok, 5 sleeps without their
    // argument answered `invalid_args`, and a line that is not a record.
    let mut w = Writer::new(Vec::new(), "amqp", "echo").unwrap();
    let mut captured = BTreeMap::new();
    let mut originals = HashSet::new();
    for i in 0..15u64 {
        let mut call = if i < 10 {
            Call::new("echo", "echo", json!({ "i": i }))
        } else {
            Call::new("echo", "sleep", json!({}))
        };
        call.reply_to = Some(replies.name.clone());
        originals.insert(call.call_id);
        w.write(&Record::Call {
            origin: Origin::default(),
            at_ms: i * 5,
            attempt: 1,
            headers: BTreeMap::new(),
            body: Body::of(&call.to_bytes()),
        })
        .unwrap();
        let reply = if i < 10 {
            Reply::ok(call.call_id, 1, call.args.clone())
        } else {
            Reply::error(call.call_id, 1, "invalid_args", "sleep needs ms")
        };
        *captured.entry(format!("{:?}", reply.outcome)).or_insert(0) += 1;
        w.write(&Record::Reply {
            origin: Origin::default(),
            at_ms: i * 5 + 1,
            body: Body::of(&reply.to_bytes()),
        })
        .unwrap();
    }
    let mut bytes = w.finish().unwrap();
    bytes.extend_from_slice(b"this is not a record\n");
    let file = dir.join("echo.capture.jsonl");
    std::fs::write(&file, &bytes).unwrap();
    let bad_line = 2 + 2 * 15;

    let replay = |extra: &[&str]| {
        Command::new(support::callq_bin())
            .arg("replay")
            .arg(&file)
            .args(["--to", &vhost.url, "--new-ids", "--rate", "500"])
            .args(extra)
            .env("CALLQ_LOG", "warn")
            .output()
            .unwrap()
    };
    let refused = replay(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a bad line stops the replay");
    assert!(
        stderr.contains(&format!("line {bad_line}")),
        "the error names the line: {stderr}"
    );
    let done = replay(&["--skip-bad"]);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        stdout.contains("15 calls published, 1 bad lines skipped"),
        "{stdout}"
    );

    // The refused run had published its 15 calls before the bad line, and
    // each run gave them fresh ids: 30 replies.
    let mut consumer = broker.consume(&replies.name, 64).await.unwrap();
    let mut outcomes = BTreeMap::new();
    let mut seen = HashSet::new();
    while seen.len() < 30 {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("30 replies within 30 s")
            .unwrap()
            .unwrap();
        let reply = decode_reply(&d.body, &Default::default()).unwrap();
        d.settle(Disposition::Ack).await.unwrap();
        assert!(
            !originals.contains(&reply.call_id),
            "a replayed call kept its captured id"
        );
        if seen.insert(reply.call_id) {
            *outcomes.entry(format!("{:?}", reply.outcome)).or_insert(0) += 1;
        }
    }
    let doubled: BTreeMap<String, i32> = captured.iter().map(|(k, v)| (k.clone(), v * 2)).collect();
    assert_eq!(outcomes, doubled, "the captured outcomes, twice over");
    let _ = std::fs::remove_dir_all(&dir);
}
