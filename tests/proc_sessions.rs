//! Session data with `callq coordinator` and `callq worker` processes on a
//! real RabbitMQ: 1,000 `counter.add` calls on 10 sessions over 3 workers,
//! two of them killed with SIGKILL mid-load and replaced; every counter
//! ends equal to the sum of its successful calls, each counted once.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use callq_node::{Admin, CallOptions, Client, ClientOptions};
use callq_schemas::Outcome;
use callq_schemas::protocol::WorkerState;
use futures::StreamExt;
use serde_json::json;
use support::{Proc, Vhost, count, wait_status};

const CALLS: i64 = 1_000;
const SESSIONS: i64 = 10;

fn counter_worker(id: &str, url: &str, dir: &std::path::Path) -> Proc {
    Proc::spawn(
        id,
        &["worker", "--services", "counter", "--worker-id", id],
        url,
        dir,
    )
}

fn on(session: &str) -> CallOptions {
    CallOptions {
        session_id: Some(session.into()),
        timeout: Some(Duration::from_secs(90)),
        ..CallOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_count_each_call_once_through_two_worker_kills() {
    let vhost = Vhost::create("sessions");
    let dir = support::temp_dir("sessions");
    let mut coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let mut procs: HashMap<String, Proc> = ["w1", "w2", "w3"]
        .iter()
        .map(|id| ((*id).to_owned(), counter_worker(id, &vhost.url, &dir)))
        .collect();
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(support::amqp(&vhost.url).await, Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "3 active workers", Duration::from_secs(30), |s| {
        count(s, WorkerState::Active) == 3
    })
    .await;
    let client = Client::connect(broker, ClientOptions::default())
        .await
        .unwrap();

    let (done_tx, mut done) = tokio::sync::mpsc::channel(CALLS as usize);
    let load = {
        let client = client.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..CALLS)
                .map(|i| {
                    let client = client.clone();
                    let done_tx = done_tx.clone();
                    async move {
                        let session = format!("s{}", i % SESSIONS);
                        let n = i % 7 + 1;
                        let reply = client
                            .call("counter", "add", json!({ "n": n }), on(&session))
                            .await
                            .unwrap();
                        let _ = done_tx.send(()).await;
                        (session, n, reply)
                    }
                })
                .buffer_unordered(48)
                .collect::<Vec<_>>()
                .await
        })
    };
    let mut answered = 0;
    let mut killed = Vec::new();
    while done.recv().await.is_some() {
        answered += 1;
        if answered == 300 || answered == 600 {
            // The busiest worker, by the coordinator's account.
            let status = admin.status().await.unwrap();
            let victim = status
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Active && procs.contains_key(&w.worker_id))
                .max_by_key(|w| w.capacity - w.free)
                .map(|w| w.worker_id.clone())
                .unwrap();
            let mut proc = procs.remove(&victim).unwrap();
            eprintln!("kill -9 {victim} (pid {})", proc.pid());
            proc.kill9();
            killed.push(victim);
            let id = format!("r{answered}");
            procs.insert(id.clone(), counter_worker(&id, &vhost.url, &dir));
        }
        if answered == CALLS {
            break;
        }
    }
    let replies = tokio::time::timeout(Duration::from_secs(120), load)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(killed.len(), 2);

    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    let mut values: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for (session, n, reply) in &replies {
        *outcomes.entry(reply.outcome.as_str()).or_default() += 1;
        if reply.outcome == Outcome::Ok {
            *sums.entry(session.clone()).or_default() += n;
            values
                .entry(session.clone())
                .or_default()
                .push(reply.result.as_ref().unwrap()["value"].as_i64().unwrap());
        }
    }
    eprintln!("outcomes: {outcomes:?}");
    // Calls on a killed worker left no session trace: all are retried.
    assert_eq!(outcomes.get("ok"), Some(&(CALLS as usize)), "{outcomes:?}");
    for (session, sum) in &sums {
        let reply = client
            .call("counter", "get", json!({}), on(session))
            .await
            .unwrap();
        assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
        assert_eq!(
            reply.result.unwrap()["value"].as_i64().unwrap(),
            *sum,
            "session {session}"
        );
        let mut seen = values[session].clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len() as i64,
            CALLS / SESSIONS,
            "session {session}: a value twice"
        );
    }
    // The load may end before the second death is judged (a second of
    // silence): the broker redelivers a killed worker's calls at once.
    wait_status(
        &admin,
        "both kills seen dead",
        Duration::from_secs(30),
        |s| s.deaths >= 2,
    )
    .await;
    assert!(coordinator.running(), "{}", coordinator.log());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `callq call --session ID` runs the call in that session: two adds on one
/// session from the command line sum, another session starts from 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_calls_in_a_session() {
    let vhost = Vhost::create("cli-session");
    let dir = support::temp_dir("cli-session");
    let _coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let _worker = counter_worker("cs1", &vhost.url, &dir);
    let call = |session: &str, n: i64| {
        let out = std::process::Command::new(support::callq_bin())
            .args(["call", "counter", "add", &json!({ "n": n }).to_string()])
            .args(["--session", session, "--timeout-ms", "60000"])
            .env("CALLQ_BROKER", &vhost.url)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        reply["result"]["value"].as_i64().unwrap()
    };
    assert_eq!(call("cli-a", 2), 2);
    assert_eq!(call("cli-a", 3), 5, "the second add sees the first's write");
    assert_eq!(call("cli-b", 7), 7, "another session starts from 0");
}
