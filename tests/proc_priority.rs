//! Priorities on every broker: under a backlog of ten times a worker's
//! capacity, calls of the high band published last end before most of the
//! backlog published before them; on RabbitMQ and Kafka against a
//! coordinator and a worker process, in-process on the embedded broker;
//! and the command line's `--priority`.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::time::Duration;

use callq_node::{CallOptions, Client};
use callq_schemas::{Outcome, Reply};
use serde_json::json;
use support::{SmallCluster, Vhost};
use tokio::task::JoinHandle;

/// The worker's capacity.
const CAPACITY: u32 = 4;
/// Calls without a priority published first: ten times the capacity.
const BACKLOG: usize = 10 * CAPACITY as usize;
/// Calls of priority 9 published once the backlog is being served.
const URGENT: usize = 10;
/// How long each call runs.
const RUN_MS: u64 = 40;

fn spawn_call(client: &Client, priority: Option<u8>) -> JoinHandle<Reply> {
    let client = client.clone();
    tokio::spawn(async move {
        let opts = CallOptions {
            priority,
            timeout: Some(Duration::from_secs(120)),
            ..CallOptions::default()
        };
        client
            .call("echo", "span", json!({ "ms": RUN_MS }), opts)
            .await
            .unwrap()
    })
}

/// When a call ended, as its handler recorded it.
async fn ended_us(waiting: JoinHandle<Reply>) -> u64 {
    let reply = support::joined(waiting, Duration::from_secs(180), "a call").await;
    assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    reply.result.as_ref().unwrap()["ended_us"].as_u64().unwrap()
}

/// The scenario: one call of each band first, so that both consumers of
/// the worker are known to be serving (a Kafka consumer is assigned its
/// partitions a moment after it joins); then the backlog; once its first
/// call is answered, the urgent calls. Returns how many backlog calls ended
/// after the last urgent one.
async fn scenario(client: &Client) -> usize {
    for priority in [None, Some(9)] {
        ended_us(spawn_call(client, priority)).await;
    }
    let mut backlog: Vec<JoinHandle<Reply>> =
        (0..BACKLOG).map(|_| spawn_call(client, None)).collect();
    // The first answer: the worker is busy and the rest wait in the queue.
    let answered = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if let Some(i) = backlog.iter().position(JoinHandle::is_finished) {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("no call of the backlog was answered within 120 s");
    let first = backlog.swap_remove(answered);
    let urgent: Vec<JoinHandle<Reply>> = (0..URGENT).map(|_| spawn_call(client, Some(9))).collect();
    let mut backlog_ends = vec![ended_us(first).await];
    for w in backlog {
        backlog_ends.push(ended_us(w).await);
    }
    let mut last_urgent = 0;
    for w in urgent {
        last_urgent = last_urgent.max(ended_us(w).await);
    }
    let after = backlog_ends.iter().filter(|e| **e > last_urgent).count();
    eprintln!("{after} of {BACKLOG} backlog calls ended after the last of {URGENT} urgent calls");
    after
}

/// Served in publish order, the urgent calls would end after the whole
/// backlog (0). Taken first, they end before all but the calls the worker
/// had already started or taken: at least half the backlog is left.
fn assert_served_first(after: usize) {
    assert!(
        after >= BACKLOG / 2,
        "only {after} of {BACKLOG} backlog calls ended after the last urgent call: the high \
         band was not served first"
    );
}

/// The scenario against a coordinator and a worker process; with `cli`,
/// then `--priority` on the command line.
async fn on_processes(
    url: &str,
    broker: std::sync::Arc<dyn callq_broker::Broker>,
    tag: &str,
    cli: bool,
) {
    let dir = support::temp_dir(tag);
    let mut cluster = SmallCluster::start(url, broker, &dir, &["pw1"], CAPACITY).await;
    assert_served_first(scenario(&cluster.client).await);
    if cli {
        the_command_line_sets_the_priority(url);
    }
    cluster.logs_of_live_workers();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_calls_overtake_a_backlog_on_rabbitmq() {
    let vhost = Vhost::create("prio");
    on_processes(
        &vhost.url,
        support::amqp(&vhost.url).await,
        "prio-rabbit",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_calls_overtake_a_backlog_on_kafka() {
    let url = support::kafka_url("kprio", 1);
    on_processes(&url, support::kafka(&url).await, "prio-kafka", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_calls_overtake_a_backlog_on_the_embedded_broker() {
    let opts = callq_testkit::ClusterOptions {
        capacity: u16::try_from(CAPACITY).unwrap(),
        ..callq_testkit::ClusterOptions::default()
    };
    let mut cluster =
        callq_testkit::LocalCluster::start(opts, callq_coordinator::MemoryStore::default())
            .await
            .unwrap();
    cluster.spawn_worker("pw1", &["echo"], false).await.unwrap();
    let client = cluster.client().await.unwrap();
    assert_served_first(scenario(&client).await);
    // The client refuses a priority out of range, and sends nothing.
    let refused = client
        .call(
            "echo",
            "echo",
            json!(1),
            CallOptions {
                priority: Some(10),
                ..CallOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("0 to 9"), "{refused}");
    cluster.shutdown().await.unwrap();
}

/// `callq call --priority 9` is answered; `--priority 10` is refused before
/// anything is sent.
fn the_command_line_sets_the_priority(url: &str) {
    let call = |priority: &str| {
        std::process::Command::new(support::callq_bin())
            .args(["call", "--priority", priority, "echo", "echo", "7"])
            .env("CALLQ_BROKER", url)
            .output()
            .unwrap()
    };
    let out = call("9");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(reply["result"], json!(7), "{reply}");
    let out = call("10");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--priority"), "{stderr}");
}
