//! Cancellation on every broker: the scenario of `support::cancellation`
//! against a coordinator and a worker process on RabbitMQ and on Kafka,
//! and in-process on the embedded broker; and `callq cancel` with `callq
//! call --call-id` from the command line, with their exit codes.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::path::Path;
use std::time::Duration;

use callq_node::{Admin, Client, ClientOptions};
use callq_schemas::protocol::WorkerState;
use callq_testkit::{ClusterOptions, LocalCluster};
use support::cancellation::{CAPACITY, scenario};
use support::{Proc, Vhost, count, wait_status};

/// A worker process of `echo` and `mail` with the scenario's capacity.
fn small_worker(url: &str, dir: &Path) -> Proc {
    let capacity = CAPACITY.to_string();
    let args = [
        "worker",
        "--services",
        "echo,mail",
        "--worker-id",
        "cw1",
        "--capacity",
        &capacity,
    ];
    Proc::spawn("cw1", &args, url, dir)
}

async fn on_processes(url: &str, broker: std::sync::Arc<dyn callq_broker::Broker>, dir: &Path) {
    let coordinator = Proc::spawn("coordinator", &["coordinator"], url, dir);
    let mut worker = small_worker(url, dir);
    let admin = Admin::connect(broker.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    wait_status(&admin, "the worker", Duration::from_secs(60), |s| {
        count(s, WorkerState::Active) == 1
    })
    .await;
    let client = Client::connect(broker, ClientOptions::default())
        .await
        .unwrap();
    scenario(&client, &admin, dir).await;
    assert!(worker.running(), "the worker died:\n{}", worker.log());
    let log = worker.log();
    assert!(
        log.contains("attempt revoked"),
        "the cancelled mail's trace was not refused:\n{log}"
    );
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_cancelled_on_rabbitmq() {
    let vhost = Vhost::create("cancel");
    let dir = support::temp_dir("cancel-rabbit");
    on_processes(&vhost.url, support::amqp(&vhost.url).await, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_cancelled_on_kafka() {
    let url = support::kafka_url("kcancel", 1);
    let dir = support::temp_dir("cancel-kafka");
    on_processes(&url, support::kafka(&url).await, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_cancelled_on_the_embedded_broker() {
    let dir = support::temp_dir("cancel-embedded");
    let opts = ClusterOptions {
        capacity: u16::try_from(CAPACITY).unwrap(),
        ..ClusterOptions::default()
    };
    let mut cluster = LocalCluster::start(opts, callq_coordinator::MemoryStore::default())
        .await
        .unwrap();
    cluster
        .spawn_worker("cw1", &["echo", "mail"], false)
        .await
        .unwrap();
    let admin = cluster.admin().await.unwrap();
    let client = cluster.client().await.unwrap();
    scenario(&client, &admin, &dir).await;
    let stats = cluster.stats("cw1").unwrap();
    let revoked = stats.revoked.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(revoked, 1, "the cancelled mail's trace was refused");
    let skipped = stats.cancelled.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(skipped, 1, "the queued call was answered without running");
    cluster.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `callq` with `args` on `url`.
fn callq(url: &str, args: &[&str]) -> std::process::Child {
    std::process::Command::new(support::callq_bin())
        .args(args)
        .env("CALLQ_BROKER", url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(child: std::process::Child) -> (Option<i32>, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `callq call --call-id` then `callq cancel` of that id: the call exits 5
/// (`cancelled`) and the cancel 0; a cancel of a call that finished with a
/// trace exits 3; a malformed command line exits 64 and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_cancels_a_call() {
    let vhost = Vhost::create("cli-cancel");
    let dir = support::temp_dir("cli-cancel");
    let _coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let _worker = small_worker(&vhost.url, &dir);
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker, Duration::from_secs(30))
        .await
        .unwrap();
    wait_status(&admin, "the worker", Duration::from_secs(60), |s| {
        count(s, WorkerState::Active) == 1
    })
    .await;
    let id = callq_schemas::Uuid::now_v7().to_string();
    let sleeping = callq(
        &vhost.url,
        &[
            "call",
            "echo",
            "sleep",
            r#"{"ms": 50000}"#,
            "--call-id",
            &id,
            "--timeout-ms",
            "90000",
        ],
    );
    wait_status(&admin, "the sleep running", Duration::from_secs(30), |s| {
        s.workers.first().is_some_and(|w| w.free < w.capacity)
    })
    .await;
    let (code, out, err) = finished(callq(&vhost.url, &["cancel", &id]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.trim(), r#"{"decision":"cancelled"}"#);
    let (code, out, err) = finished(sleeping);
    assert_eq!(code, Some(5), "{out}{err}");
    let reply: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(reply["outcome"], "cancelled", "{reply}");
    assert_eq!(reply["call_id"], id.as_str(), "{reply}");
    assert!(err.contains(&format!("call {id}")), "the id is said: {err}");

    let (code, out, err) = finished(callq(&vhost.url, &["cancel", &id]));
    assert_eq!(
        code,
        Some(0),
        "a cancelled call stays cancelled: {out}{err}"
    );
    // A call that left a trace has a record the coordinator decides from
    // (a traceless call finished on the fast path has none: its cancel is
    // recorded, and the outcome its client got stands).
    let ok = callq_schemas::Uuid::now_v7().to_string();
    let mail = serde_json::json!({ "outbox": dir.join("cli.outbox"), "to": "a@b" }).to_string();
    let (code, out, err) = finished(callq(
        &vhost.url,
        &["call", "mail", "send", &mail, "--call-id", &ok],
    ));
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = finished(callq(&vhost.url, &["cancel", &ok]));
    assert_eq!(code, Some(3), "a finished call: {out}{err}");
    assert_eq!(out.trim(), r#"{"decision":"finished","outcome":"ok"}"#);

    for usage in [
        &["call", "echo", "echo", "{not json"][..],
        &["call", "echo", "echo", "{}", "--no-such-flag"],
        &["cancel", "not-a-uuid"],
        &["cancel"],
    ] {
        let (code, out, err) = finished(callq(&vhost.url, usage));
        assert_eq!(code, Some(64), "{usage:?}: {out}{err}");
        assert!(err.contains("error"), "{usage:?} says what is wrong: {err}");
    }
    let depth = support::amqp(&vhost.url)
        .await
        .depth(&callq_broker::call_queue("echo"))
        .await
        .unwrap();
    assert_eq!(depth.ready, 0, "a malformed call was sent");
    let _ = std::fs::remove_dir_all(&dir);
}
