//! Cancellation on every broker: the scenario of `support::cancellation`
//! against a coordinator and a worker process on RabbitMQ and on Kafka,
//! and in-process on the embedded broker; and `callq cancel` with `callq
//! call --call-id` from the command line, with their exit codes.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use support::cancellation::{CAPACITY, scenario};
use support::{SmallCluster, Vhost, wait_status};

async fn on_processes(url: &str, broker: std::sync::Arc<dyn callq_broker::Broker>, tag: &str) {
    let dir = support::temp_dir(tag);
    let mut cluster = SmallCluster::start(url, broker, &dir, &["cw1"], CAPACITY).await;
    scenario(&cluster.client, &cluster.admin, &dir).await;
    let logs = cluster.logs_of_live_workers();
    assert!(
        logs[0].contains("attempt revoked"),
        "the cancelled mail's trace was not refused:\n{}",
        logs[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_cancelled_on_rabbitmq() {
    let vhost = Vhost::create("cancel");
    on_processes(&vhost.url, support::amqp(&vhost.url).await, "cancel-rabbit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_cancelled_on_kafka() {
    let url = support::kafka_url("kcancel", 1);
    on_processes(&url, support::kafka(&url).await, "cancel-kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_cancelled_on_the_embedded_broker() {
    let dir = support::temp_dir("cancel-embedded");
    let (cluster, admin, client) = support::small_local_cluster(&["cw1"], CAPACITY).await;
    scenario(&client, &admin, &dir).await;
    let stats = cluster.stats("cw1").unwrap();
    assert_eq!(
        stats.revoked.load(Relaxed),
        1,
        "the cancelled mail's trace was refused"
    );
    let skipped = stats.cancelled.load(Relaxed);
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
/// trace exits 3; `--delay`, `--max-attempts` and `--idempotency-key` act;
/// a malformed command line exits 64 and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_cancels_a_call() {
    let vhost = Vhost::create("cli-cancel");
    let dir = support::temp_dir("cli-cancel");
    let broker = support::amqp(&vhost.url).await;
    let cluster = SmallCluster::start(&vhost.url, broker, &dir, &["cw1"], CAPACITY).await;
    let admin = &cluster.admin;
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
    wait_status(admin, "the sleep running", Duration::from_secs(30), |s| {
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

    // The other call options from the command line: a delayed call runs
    // as attempt 2 (its release), a retried one ends at its third attempt,
    // a keyed one's duplicate gets the first's outcome.
    let reply = |out: &str| serde_json::from_str::<serde_json::Value>(out.trim()).unwrap();
    let (code, out, err) = finished(callq(
        &vhost.url,
        &["call", "echo", "echo", r#"{"later": 1}"#, "--delay", "1s"],
    ));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        (
            reply(&out)["attempt"].as_u64(),
            reply(&out)["result"]["later"].as_u64()
        ),
        (Some(2), Some(1))
    );
    let retried = [
        "call",
        "echo",
        "flaky",
        r#"{"ok_at": 3}"#,
        "--max-attempts",
        "3",
        "--backoff-ms",
        "50",
    ];
    let (code, out, err) = finished(callq(&vhost.url, &retried));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(reply(&out)["result"]["attempt"], 3, "{out}");
    let (code, out, err) = finished(callq(
        &vhost.url,
        &["call", "echo", "flaky", r#"{"ok_at": 3}"#],
    ));
    assert_eq!(code, Some(1), "no policy, no retry: {out}{err}");
    let key = format!("cli-{id}");
    let keyed = |n: u32| {
        let args = format!(r#"{{"n": {n}}}"#);
        let (code, out, err) = finished(callq(
            &vhost.url,
            &["call", "echo", "echo", &args, "--idempotency-key", &key],
        ));
        assert_eq!(code, Some(0), "{out}{err}");
        reply(&out)["result"]["n"].as_u64()
    };
    assert_eq!(
        (keyed(1), keyed(2)),
        (Some(1), Some(1)),
        "the second gets the first's"
    );

    for usage in [
        &["call", "echo", "echo", "{}", "--delay", "soon"][..],
        &["call", "echo", "echo", "{not json"],
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
