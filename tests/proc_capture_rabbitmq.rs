//! `callq capture` on a real RabbitMQ while `callq coordinator` and `callq
//! worker` processes serve: the capture holds every call and reply, takes
//! nothing from the workers, redacts what it is told to, and replays into
//! the handlers with the captured replies.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::time::Duration;

use callq_node::replay::ReplayOptions;
use callq_node::{Admin, CallOptions, Client, ClientOptions, services};
use callq_schemas::Outcome;
use callq_schemas::protocol::WorkerState;
use callq_testkit::replay::replay_into;
use serde_json::json;
use support::{Proc, Vhost, count, wait_status};

const CALLS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_holds_every_call_and_reply_and_replays_the_same() {
    let vhost = Vhost::create("capture");
    support::rabbitmqctl(&["trace_on", "-p", &vhost.name]);
    let dir = support::temp_dir("capture");
    let _coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let _worker = support::worker("w1", &vhost.url, &dir, false);
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "1 active worker", Duration::from_secs(30), |s| {
        count(s, WorkerState::Active) == 1
    })
    .await;
    let file = dir.join("echo.capture.jsonl");
    let mut capture = Proc::spawn(
        "capture",
        &[
            "capture",
            "--service",
            "echo",
            "--out",
            file.to_str().unwrap(),
            "--count",
            &CALLS.to_string(),
            "--redact",
            "/args/card",
            "--redact",
            "/result/card",
        ],
        &vhost.url,
        &dir,
    );
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !capture.log().contains("capturing") {
        assert!(std::time::Instant::now() < until, "{}", capture.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    let client = Client::connect(broker, ClientOptions::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let calls = (0..CALLS).map(|i| {
        let client = client.clone();
        async move {
            client
                .call(
                    "echo",
                    "echo",
                    json!({ "i": i, "card": "4111 1111 1111 1111" }),
                    CallOptions {
                        timeout: Some(Duration::from_secs(30)),
                        ..CallOptions::default()
                    },
                )
                .await
        }
    });
    let replies = futures::future::join_all(calls).await;
    let took = started.elapsed();
    for r in &replies {
        let r = r.as_ref().unwrap();
        assert_eq!(r.outcome, Outcome::Ok, "the workers got every call: {r:?}");
    }
    assert!(
        took < Duration::from_secs(10),
        "the capture held the calls up: {took:?}"
    );
    let status = capture.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "capture: {status:?}\n{}",
        capture.log()
    );
    assert!(
        capture
            .log()
            .contains(&format!("captured {CALLS} calls and {CALLS} replies")),
        "{}",
        capture.log()
    );
    let text = std::fs::read_to_string(&file).unwrap();
    // The whole number: four digits alone also turn up, now and then, in
    // the ids and times the records carry.
    assert!(
        !text.contains("4111 1111 1111 1111"),
        "the card number was not redacted"
    );
    assert_eq!(text.lines().count(), 1 + 2 * CALLS);
    // Each record has the publish time the message carried, to the second.
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    for record in callq_node::capture::Reader::new(text.as_bytes()).unwrap() {
        let (callq_node::capture::Record::Call { origin, .. }
        | callq_node::capture::Record::Reply { origin, .. }) = record.unwrap();
        let ts = origin.ts_ms.expect("a timestamp");
        assert!(
            (now_ms - 120_000..=now_ms + 1000).contains(&ts),
            "{ts} vs {now_ms}"
        );
    }

    let report = replay_into(
        vec![services::echo()],
        text.as_bytes(),
        ReplayOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.calls.len(), CALLS);
    report.assert_same();
    let _ = std::fs::remove_dir_all(&dir);
}
