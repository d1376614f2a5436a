//! A client in another language uses the cluster on Kafka through the wire
//! contract alone: `tests/kafka_client.py` (Python, confluent-kafka)
//! produces calls straight to the topic `callq.call.echo`, one of them
//! without a `method`, and reads the replies from a topic of its own, while
//! real `callq coordinator` and `callq worker` processes serve them over the
//! Kafka adapter.
//!
//! Needs the Kafka-protocol broker that `CALLQ_KAFKA_URL` names
//! (`scripts/kafka` starts tansu) and Python with confluent-kafka
//! (`CALLQ_PYTHON`; `scripts/services` installs python3-confluent-kafka).
//! Without them the test fails; it never skips.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use callq_node::Admin;
use callq_schemas::protocol::WorkerState;
use serde_json::Value;
use support::{Proc, temp_dir, wait_status};

const CALLS: usize = 30;

/// The broker URL of this test's cluster: the one `CALLQ_KAFKA_URL` names,
/// with short group sessions (tansu accepts them) and consumer groups of
/// its own.
fn cluster_url() -> String {
    let base = std::env::var("CALLQ_KAFKA_URL")
        .expect("CALLQ_KAFKA_URL is not set: run `source scripts/kafka` (scripts/test does)");
    let sep = if base.contains('?') { '&' } else { '?' };
    let run = uuid::Uuid::now_v7().simple();
    format!("{base}{sep}session_timeout_ms=2000&fetch_wait_ms=10&group_prefix=kpy-{run}.")
}

/// `host:port[,...]` of a `kafka://` URL.
fn bootstrap(url: &str) -> String {
    let rest = url.strip_prefix("kafka://").unwrap_or(url);
    rest.split('?').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_calls_the_cluster_on_kafka_by_the_wire_contract() {
    let url = cluster_url();
    let dir = temp_dir("kafka-py");
    eprintln!("broker {url}, process logs in {}", dir.display());
    let mut coordinator = Proc::spawn("coordinator", &["coordinator"], &url, &dir);
    let mut worker = Proc::spawn(
        "kw1",
        &["worker", "--services", "echo", "--worker-id", "kw1"],
        &url,
        &dir,
    );
    let broker = callq_broker_kafka::KafkaBroker::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("Kafka at {url}: {e}"));
    let admin = Admin::connect(Arc::new(broker), Duration::from_secs(30))
        .await
        .unwrap();
    wait_status(&admin, "kw1 active", Duration::from_secs(60), |s| {
        s.workers
            .iter()
            .any(|w| w.worker_id == "kw1" && w.state == WorkerState::Active)
    })
    .await;

    let python = std::env::var("CALLQ_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kafka_client.py");
    let child = Command::new(&python)
        .arg(script)
        .arg(bootstrap(&url))
        .args(["--calls", &CALLS.to_string(), "--timeout", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let pid = child.id();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .unwrap_or_else(|_| {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("the Python client (pid {pid}) did not finish within 120 s")
    })
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client failed ({}):\n{stderr}\n--- worker ---\n{}\n--- coordinator ---\n{}",
        out.status,
        worker.log(),
        coordinator.log()
    );
    eprintln!("python: {stdout}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["ok"], CALLS, "{summary}");
    assert_eq!(summary["bad_request"], 1, "{summary}");
    assert!(worker.running(), "the worker died:\n{}", worker.log());
    assert!(coordinator.running(), "{}", coordinator.log());
    let _ = std::fs::remove_dir_all(&dir);
}
