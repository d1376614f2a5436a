//! `callq capture` on a Kafka-protocol broker while `callq coordinator` and
//! `callq worker` processes serve: a live capture holds every call and reply
//! with its partition, offset and timestamp and takes nothing from the
//! workers; captures of a past range (from the beginning, an offset, a time
//! span) read the same records again and end by themselves. The calls carry
//! session ids, and each session's calls share a partition.
//!
//! Needs the broker that `CALLQ_KAFKA_URL` names (`scripts/test` starts
//! one); never skips.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::path::Path;
use std::time::Duration;

use callq_broker::call_queue;
use callq_broker_kafka::{KafkaBroker, TapFrom, TapRange};
use callq_node::capture::{Reader, Record};
use callq_node::replay::ReplayOptions;
use callq_node::{Admin, CallOptions, Client, ClientOptions, services};
use callq_schemas::Outcome;
use callq_schemas::protocol::WorkerState;
use callq_testkit::capture::{CaptureArgs, capture};
use callq_testkit::replay::replay_into;
use serde_json::json;
use support::{Proc, count, kafka, wait_status};

const CALLS: usize = 30;
const PARTITIONS: usize = 3;
const SESSIONS: usize = 10;

/// The calls of a capture file: (call id, partition, offset, timestamp,
/// session).
type Captured = (String, u32, i64, i64, String);

fn calls_in(file: &[u8]) -> (Vec<Captured>, usize) {
    let reader = Reader::new(file).unwrap();
    assert_eq!(reader.header.broker, "kafka");
    let (mut calls, mut replies) = (Vec::new(), 0);
    for record in reader {
        match record.unwrap() {
            Record::Call { body, origin, .. } => {
                let body = body.json().unwrap();
                calls.push((
                    body["call_id"].as_str().unwrap().to_owned(),
                    origin.partition.unwrap(),
                    origin.offset.unwrap(),
                    origin.ts_ms.unwrap(),
                    body["session_id"].as_str().unwrap_or_default().to_owned(),
                ));
            }
            Record::Reply { origin, .. } => {
                assert!(origin.ts_ms.is_some() && origin.offset.is_some());
                replies += 1;
            }
        }
    }
    calls.sort();
    (calls, replies)
}

/// `callq capture --service echo --out FILE ARGS..`, which must end by
/// itself; the file's contents.
fn capture_cli(url: &str, dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    let file = dir.join(format!("{name}.jsonl"));
    let mut argv = vec![
        "capture",
        "--service",
        "echo",
        "--out",
        file.to_str().unwrap(),
    ];
    argv.extend_from_slice(args);
    let mut proc = Proc::spawn(name, &argv, url, dir);
    let status = proc.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "{name}: {status:?}\n{}",
        proc.log()
    );
    std::fs::read(&file).unwrap()
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_capture_holds_every_call_and_reads_past_ranges_again() {
    let url = support::kafka_url("capture", PARTITIONS);
    let dir = support::temp_dir("capture-kafka");
    let _coordinator = Proc::spawn("coordinator", &["coordinator"], &url, &dir);
    let _worker = support::worker("w1", &url, &dir, false);
    let broker = kafka(&url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "1 active worker", Duration::from_secs(60), |s| {
        count(s, WorkerState::Active) == 1
    })
    .await;

    // A live capture, from the end of the topic, while the worker serves:
    // the tap `callq capture` opens, on a connection of its own.
    let tapped = KafkaBroker::connect(&url).await.unwrap();
    let live_range = TapRange {
        from: TapFrom::End,
        until_ms: None,
    };
    let mut tap = tapped
        .tap(&call_queue("echo"), live_range, 100_000)
        .await
        .unwrap();
    let live = tokio::spawn(async move {
        let _connection = tapped;
        let args = CaptureArgs {
            service: "echo".into(),
            count: Some(CALLS),
            duration: Some(Duration::from_secs(60)),
            redact: Vec::new(),
            reply_grace: Duration::from_secs(10),
        };
        let mut out = Vec::new();
        let stats = capture(&mut tap, "kafka", &args, &mut out).await.unwrap();
        (stats, out)
    });
    let client = Client::connect(broker, ClientOptions::default())
        .await
        .unwrap();
    // One call at a time: tansu under-reports a partition's end after a
    // batched produce, and the range captures below read up to that end.
    for i in 0..CALLS {
        let opts = CallOptions {
            session_id: Some(format!("sess-{}", i % SESSIONS)),
            ..CallOptions::default()
        };
        let reply = client
            .call("echo", "echo", json!({ "i": i }), opts)
            .await
            .unwrap();
        assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    }
    let (stats, file) = tokio::time::timeout(Duration::from_secs(60), live)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stats.calls, stats.replies), (CALLS, CALLS));
    let (calls, replies) = calls_in(&file);
    assert_eq!((calls.len(), replies), (CALLS, CALLS));
    let partitions: std::collections::BTreeSet<u32> = calls.iter().map(|c| c.1).collect();
    assert!(
        partitions.len() > 1,
        "calls spread over partitions: {partitions:?}"
    );
    // Session affinity: a session's calls share a partition (the client
    // keys them by session id), so they meet at one worker.
    let mut by_session: std::collections::BTreeMap<&str, std::collections::BTreeSet<u32>> =
        std::collections::BTreeMap::new();
    for c in &calls {
        by_session.entry(c.4.as_str()).or_default().insert(c.1);
    }
    assert_eq!(by_session.len(), SESSIONS);
    for (session, parts) in &by_session {
        assert_eq!(parts.len(), 1, "session {session} on partitions {parts:?}");
    }
    replay_into(
        vec![services::echo()],
        file.as_slice(),
        ReplayOptions::default(),
    )
    .await
    .unwrap()
    .assert_same();

    // The same records again, from the beginning; the capture ends once the
    // topic is read and every call answered.
    let again = capture_cli(&url, &dir, "beginning", &["--from", "beginning"]);
    assert_eq!(calls_in(&again), (calls.clone(), CALLS));

    // From an offset, in every partition.
    let tail = capture_cli(&url, &dir, "offset", &["--from", "offset:4"]);
    let expected: Vec<_> = calls.iter().filter(|c| c.2 >= 4).cloned().collect();
    assert!(!expected.is_empty() && expected.len() < CALLS);
    assert_eq!(calls_in(&tail).0, expected);

    // A span of time.
    let mut times: Vec<i64> = calls.iter().map(|c| c.3).collect();
    times.sort_unstable();
    let (from, until) = (times[CALLS / 3], times[2 * CALLS / 3]);
    let span = capture_cli(
        &url,
        &dir,
        "span",
        &["--from", &rfc3339(from), "--until", &rfc3339(until)],
    );
    let expected: Vec<_> = calls
        .iter()
        .filter(|c| c.3 >= from && c.3 <= until)
        .cloned()
        .collect();
    assert_eq!(calls_in(&span).0, expected);

    // A bad range is refused before anything is read.
    let mut bad = Proc::spawn(
        "bad-range",
        &["capture", "--service", "echo", "--from", "yesterday"],
        &url,
        &dir,
    );
    let status = bad.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    assert!(bad.log().contains("RFC 3339"), "{}", bad.log());
}
