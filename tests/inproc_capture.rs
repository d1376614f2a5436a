//! A capture from the embedded broker's tap while an in-process cluster
//! serves: every call and reply is in the file with the broker's timestamp,
//! the workers miss nothing, and the file replays into the handlers, with
//! and without crashes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use callq_coordinator::MemoryStore;
use callq_node::capture::{Reader, Record};
use callq_node::replay::ReplayOptions;
use callq_node::{CallOptions, services};
use callq_schemas::Outcome;
use callq_testkit::capture::{CaptureArgs, capture};
use callq_testkit::crashes::{CrashMode, CrashOptions, replay_with_crashes};
use callq_testkit::replay::replay_into;
use callq_testkit::{ClusterOptions, LocalCluster};
use serde_json::json;

const CALLS: usize = 50;

#[tokio::test(start_paused = true)]
async fn an_embedded_capture_holds_every_call_and_replays_with_crashes() {
    let mut cluster = LocalCluster::start(ClusterOptions::default(), MemoryStore::default())
        .await
        .unwrap();
    cluster.spawn_worker("w1", &["echo"], false).await.unwrap();
    cluster.spawn_worker("w2", &["echo"], false).await.unwrap();
    let mut tap = cluster.tap(1_000);
    let capturing = tokio::spawn(async move {
        let args = CaptureArgs {
            service: "echo".into(),
            count: Some(CALLS),
            duration: Some(Duration::from_secs(60)),
            redact: vec!["/args/card".into(), "/result/card".into()],
            reply_grace: Duration::from_secs(10),
        };
        let mut out = Vec::new();
        let stats = capture(&mut tap, "embedded", &args, &mut out)
            .await
            .unwrap();
        (stats, out)
    });
    let client = cluster.client().await.unwrap();
    let calls = (0..CALLS).map(|i| {
        client.call(
            "echo",
            "echo",
            json!({ "i": i, "card": "4111" }),
            CallOptions::default(),
        )
    });
    for reply in futures::future::join_all(calls).await {
        assert_eq!(reply.unwrap().outcome, Outcome::Ok);
    }
    let (stats, file) = capturing.await.unwrap();
    assert_eq!((stats.calls, stats.replies), (CALLS, CALLS));
    let served: u64 = cluster
        .all_stats()
        .values()
        .map(|s| s.ok.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(
        served, CALLS as u64,
        "the capture took nothing from the workers"
    );
    cluster.shutdown().await.unwrap();

    let reader = Reader::new(file.as_slice()).unwrap();
    assert_eq!(reader.header.broker, "embedded");
    for record in reader {
        let (Record::Call { origin, body, .. } | Record::Reply { origin, body, .. }) =
            record.unwrap();
        assert!(origin.ts_ms.is_some_and(|t| t > 1_700_000_000_000));
        let body = body.json().unwrap();
        for at in ["/args/card", "/result/card"] {
            assert_ne!(body.pointer(at), Some(&json!("4111")), "{body}");
        }
    }
    replay_into(
        vec![services::echo()],
        file.as_slice(),
        ReplayOptions::default(),
    )
    .await
    .unwrap()
    .assert_same();
    let crashed = replay_with_crashes(
        vec![services::echo()],
        file.as_slice(),
        CrashOptions {
            mode: CrashMode::BeforeReply,
            ..CrashOptions::default()
        },
    )
    .await
    .unwrap();
    crashed.assert_exactly_once();
    assert_eq!(crashed.kills, CALLS);
}
