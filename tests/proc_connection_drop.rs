//! A worker process whose broker connections drop (closed by RabbitMQ, the
//! process itself alive) stops, reconnects, registers again as a new
//! incarnation, and the calls it held are answered once each.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::process::Command;
use std::time::Duration;

use callq_node::{Admin, CallOptions, Client, ClientOptions};
use callq_schemas::Outcome;
use callq_schemas::protocol::WorkerState;
use support::{Proc, Vhost, wait_status};

/// Closes every connection of `vhost` whose client calls itself `name`;
/// how many were closed.
fn close_connections(vhost: &str, name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "-p",
            vhost,
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(name)) {
        let conn = line.split('\t').next().unwrap();
        let status = Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                conn,
                "connection dropped by the test",
            ])
            .status()
            .expect("rabbitmqctl");
        assert!(status.success(), "closing {conn}");
        closed += 1;
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_connection_drops_reconnects_and_loses_no_call() {
    let vhost = Vhost::create("drop");
    let dir = support::temp_dir("drop");
    let mut coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let mut worker = Proc::spawn(
        "w1",
        &["worker", "--services", "echo", "--worker-id", "w1"],
        &vhost.url,
        &dir,
    );
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "w1 active", Duration::from_secs(30), |s| {
        s.workers
            .iter()
            .any(|w| w.worker_id == "w1" && w.state == WorkerState::Active)
    })
    .await;
    let client = Client::connect(broker.clone(), ClientOptions::default())
        .await
        .unwrap();

    // 300 calls of 200 ms each: most are queued or running when the
    // connections drop.
    let calls: Vec<_> = (0..300)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call(
                        "echo",
                        "sleep",
                        serde_json::json!({"ms": 200}),
                        CallOptions {
                            timeout: Some(Duration::from_secs(60)),
                            ..CallOptions::default()
                        },
                    )
                    .await
            })
        })
        .collect();
    wait_status(&admin, "w1 busy", Duration::from_secs(10), |s| {
        s.workers
            .iter()
            .any(|w| w.worker_id == "w1" && w.free < w.capacity)
    })
    .await;
    let closed = close_connections(&vhost.name, "callq worker w1");
    assert!(closed >= 1, "no connection of w1 found to close");
    eprintln!("closed {closed} connections of w1");

    let mut outcomes = std::collections::BTreeMap::new();
    for call in calls {
        let reply = call.await.unwrap().unwrap();
        *outcomes.entry(reply.outcome.as_str()).or_insert(0) += 1;
    }
    eprintln!("outcomes: {outcomes:?}");
    assert_eq!(
        outcomes.get("ok"),
        Some(&300),
        "every call ok: {outcomes:?}"
    );

    // The same process serves on as a new incarnation of w1.
    let status = wait_status(
        &admin,
        "w1 registered again",
        Duration::from_secs(30),
        |s| {
            s.workers
                .iter()
                .any(|w| w.worker_id.starts_with("w1.") && w.state == WorkerState::Active)
        },
    )
    .await;
    eprintln!(
        "workers: {:?}",
        status
            .workers
            .iter()
            .map(|w| (&w.worker_id, w.state))
            .collect::<Vec<_>>()
    );
    assert!(
        worker.running(),
        "the worker process died:\n{}",
        worker.log()
    );
    assert!(coordinator.running(), "{}", coordinator.log());
    let reply = client
        .call(
            "echo",
            "echo",
            serde_json::json!({"after": "drop"}),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
