//! Per-key concurrency limits on every broker: the scenario of
//! `support::keys` against a coordinator and three worker processes on
//! RabbitMQ and on Kafka, and in-process on the embedded broker.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use support::keys::{CAPACITY, KEYS, check, publish, scenario};
use support::{Proc, SmallCluster, Vhost};

const WORKERS: [&str; 3] = ["kw1", "kw2", "kw3"];

/// Calls of different keys that must have run at once, at least.
const MANY: usize = 4;

async fn on_processes(url: &str, broker: std::sync::Arc<dyn callq_broker::Broker>, tag: &str) {
    let dir = support::temp_dir(tag);
    let env = [("CALLQ_WORKER__MAX_RUNNING_PER_KEY__ECHO", "1")];
    let mut cluster = SmallCluster::start_env(url, broker, &dir, (&WORKERS, CAPACITY), &env).await;
    let (most, pids) = scenario(&cluster.client).await;
    assert!(
        (MANY..=KEYS).contains(&most),
        "{most} calls ran at once at most: expected between {MANY} and {KEYS}"
    );
    assert_eq!(pids.len(), WORKERS.len(), "the calls ran in {pids:?}");
    the_command_line_sets_the_key(url);
    cluster.logs_of_live_workers();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two `callq call --concurrency-key` of one key at once: both exit 0, and
/// one ran after the other.
fn the_command_line_sets_the_key(url: &str) {
    let call = || {
        std::process::Command::new(support::callq_bin())
            .args(["call", "--concurrency-key", "cli-account"])
            .args(["echo", "span", r#"{"ms": 300}"#])
            .env("CALLQ_BROKER", url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (call(), call());
    let span = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
        let result = &reply["result"];
        (
            result["started_us"].as_u64().unwrap(),
            result["ended_us"].as_u64().unwrap(),
        )
    };
    let (a, b) = (span(first), span(second));
    assert!(
        a.1 <= b.0 || b.1 <= a.0,
        "the two calls of one key overlapped: {a:?} {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_never_overlap_per_key_on_rabbitmq() {
    let vhost = Vhost::create("keys");
    on_processes(&vhost.url, support::amqp(&vhost.url).await, "keys-rabbit").await;
}

/// Waits until `n` of `calls` calls are answered.
async fn wait_answered(answered: &AtomicUsize, n: usize, calls: usize) {
    let clock = tokio::time::Instant::now();
    while answered.load(Relaxed) < n {
        assert!(
            clock.elapsed() < Duration::from_secs(120),
            "{} of {calls} calls answered in 120 s, waiting for {n}",
            answered.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The coordinator is killed while most keyed calls wait for their keys
/// (held in its store) and some run; a new one, on the same store, learns
/// the running ones from the workers' heartbeats and the waiting ones from
/// the store; then a worker is killed with keyed calls: every call still
/// ends `ok` once, no two of a key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_survive_a_dead_coordinator_and_worker_on_rabbitmq() {
    let vhost = Vhost::create("keys-away");
    let dir = support::temp_dir("keys-away");
    let env = [("CALLQ_WORKER__MAX_RUNNING_PER_KEY__ECHO", "1")];
    let broker = support::amqp(&vhost.url).await;
    let mut cluster =
        SmallCluster::start_env(&vhost.url, broker, &dir, (&WORKERS, CAPACITY), &env).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let (calls, keys) = (400, 4);
    let waiting = publish(&cluster.client, (calls, keys, 20), &answered);
    wait_answered(&answered, 40, calls).await;
    cluster.coordinator.kill9();
    let at_kill = answered.load(Relaxed);
    // Away long enough for the workers' requests to go unanswered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.coordinator = Proc::spawn("coordinator-2", &["coordinator"], &vhost.url, &dir);
    // Then a worker dies with keyed calls: its places are freed when the
    // coordinator declares it dead, and its calls run elsewhere.
    wait_answered(&answered, at_kill + 40, calls).await;
    let mut victim = cluster.workers.pop().unwrap();
    victim.kill9();
    let (most, _) = check(waiting).await;
    eprintln!(
        "coordinator killed with {at_kill} of {calls} calls answered, then {}; {most} ran at once",
        victim.name
    );
    let log = cluster.coordinator.log();
    assert!(
        log.contains("read from the store"),
        "the new coordinator did not read the waiting calls back:\n{log}"
    );
    assert!(most >= 2, "calls of different keys never ran at once");
    cluster.logs_of_live_workers();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_never_overlap_per_key_on_kafka() {
    let url = support::kafka_url("kkeys", WORKERS.len());
    on_processes(&url, support::kafka(&url).await, "keys-kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_never_overlap_per_key_on_the_embedded_broker() {
    let opts = callq_testkit::ClusterOptions {
        capacity: u16::try_from(CAPACITY).unwrap(),
        max_running_per_key: [("echo".to_owned(), 1)].into(),
        ..callq_testkit::ClusterOptions::default()
    };
    let mut cluster =
        callq_testkit::LocalCluster::start(opts, callq_coordinator::MemoryStore::default())
            .await
            .unwrap();
    for id in WORKERS {
        cluster.spawn_worker(id, &["echo"], false).await.unwrap();
    }
    let client = cluster.client().await.unwrap();
    let (most, _) = scenario(&client).await;
    assert!(
        (MANY..=KEYS).contains(&most),
        "{most} calls ran at once at most: expected between {MANY} and {KEYS}"
    );
    let waited: u64 = WORKERS
        .iter()
        .map(|id| cluster.stats(id).unwrap().waited.load(Relaxed))
        .sum();
    assert!(waited > 0, "no call waited for a place of its key");
    cluster.shutdown().await.unwrap();
}
