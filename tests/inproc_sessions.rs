//! Session data on an in-process cluster: written with the call's
//! completion or not at all, read through any worker at its newest version,
//! counted once through worker kills, and gone once expired or closed.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callq_coordinator::MemoryStore;
use callq_node::{CallOptions, Client, HandlerError, Service, services};
use callq_schemas::{Call, Outcome, Reply, Uuid};
use callq_testkit::faults::{CrashPoint, CrashSite, Faults};
use callq_testkit::{ClusterOptions, LocalCluster};
use serde_json::{Value, json};

fn on(session: &str) -> CallOptions {
    CallOptions {
        session_id: Some(session.into()),
        timeout: Some(Duration::from_secs(60)),
        ..CallOptions::default()
    }
}

async fn add(client: &Client, session: &str, n: i64) -> Reply {
    client
        .call("counter", "add", json!({ "n": n }), on(session))
        .await
        .unwrap()
}

async fn value(client: &Client, service: &str, session: &str) -> Reply {
    client
        .call(service, "get", json!({}), on(session))
        .await
        .unwrap()
}

fn ok_value(reply: &Reply) -> i64 {
    assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    reply.result.as_ref().unwrap()["value"].as_i64().unwrap()
}

async fn cluster(workers: &[&str]) -> LocalCluster {
    let mut cluster = LocalCluster::start(
        ClusterOptions {
            capacity: 16,
            session_idle: Duration::from_secs(5),
            ..ClusterOptions::default()
        },
        MemoryStore::default(),
    )
    .await
    .unwrap();
    for w in workers {
        cluster.spawn_worker(w, &["counter"], false).await.unwrap();
    }
    cluster
}

/// Crashes the worker once, when the named call is about to send its reply
/// (its session write made, not committed).
struct CrashBeforeReply {
    call: Mutex<Option<Uuid>>,
    fired: AtomicBool,
}

impl Faults for CrashBeforeReply {
    fn crash(&self, site: &CrashSite<'_>) -> bool {
        site.point == CrashPoint::BeforeReply
            && *self.call.lock().unwrap() == Some(site.call_id)
            && !self.fired.swap(true, Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn a_worker_killed_after_writing_before_completing_leaves_the_old_value() {
    let mut cluster = cluster(&[]).await;
    let plan = Arc::new(CrashBeforeReply {
        call: Mutex::new(None),
        fired: AtomicBool::new(false),
    });
    cluster
        .spawn_faulty("w1", vec![services::counter()], plan.clone())
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    assert_eq!(ok_value(&add(&client, "s1", 5).await), 5);

    // The next add crashes its worker between its write and its completion.
    let mut call = Call::new("counter", "add", json!({ "n": 7 }));
    call.session_id = Some("s1".into());
    *plan.call.lock().unwrap() = Some(call.call_id);
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { client.send(call, Duration::from_secs(60)).await.unwrap() })
    };
    // Once the crash happened, a healthy worker takes over.
    while !plan.fired.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.kill("w1");
    cluster
        .spawn_worker("w2", &["counter"], false)
        .await
        .unwrap();
    let reply = pending.await.unwrap();
    // The retry read 5, not 12: the lost attempt left nothing.
    assert_eq!(ok_value(&reply), 12, "{reply:?}");
    assert!(reply.attempt > 1, "{reply:?}");
    let now = value(&client, "counter", "s1").await;
    assert_eq!(ok_value(&now), 12);
    assert_eq!(now.result.unwrap()["version"], json!(2));
}

#[tokio::test(start_paused = true)]
async fn a_thousand_adds_on_ten_sessions_over_three_workers_with_two_kills_count_once() {
    let mut cluster = cluster(&["w1", "w2", "w3"]).await;
    let client = cluster.client().await.unwrap();
    let calls: Vec<(String, i64)> = (0..1_000)
        .map(|i: i64| (format!("s{}", i % 10), i % 7 + 1))
        .collect();
    let (done_tx, mut done) = tokio::sync::mpsc::channel(1_000);
    let load = {
        let client = client.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(calls)
                .map(|(session, n)| {
                    let client = client.clone();
                    let done_tx = done_tx.clone();
                    async move {
                        let reply = add(&client, &session, n).await;
                        let _ = done_tx.send(()).await;
                        (session, n, reply)
                    }
                })
                .buffer_unordered(48)
                .collect::<Vec<_>>()
                .await
        })
    };
    // Kill a worker after 300 answers and another after 600; each is
    // replaced.
    let mut answered = 0;
    let mut kills = Vec::new();
    while done.recv().await.is_some() {
        answered += 1;
        if answered == 300 || answered == 600 {
            let victim = cluster.worker_ids()[0].clone();
            assert!(cluster.kill(&victim));
            cluster
                .spawn_worker(&format!("r{answered}"), &["counter"], false)
                .await
                .unwrap();
            kills.push(victim);
        }
        if answered == 1_000 {
            break;
        }
    }
    let replies = load.await.unwrap();
    assert_eq!(kills.len(), 2);
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (session, n, reply) in &replies {
        assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
        *expected.entry(session.clone()).or_default() += n;
        seen.entry(session.clone())
            .or_default()
            .push(ok_value(reply));
    }
    for (session, sum) in &expected {
        let now = value(&client, "counter", session).await;
        assert_eq!(ok_value(&now), *sum, "session {session}");
        // Every call saw its own version: no two share a value.
        let mut values = seen[session].clone();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), 100, "session {session}");
    }
    let revoked: u64 = cluster
        .all_stats()
        .values()
        .map(|s| s.resumed.load(Ordering::Relaxed))
        .sum();
    assert!(revoked > 0, "the kills took calls in flight with them");
}

/// A counter service under another name: one worker serves each name, so
/// a test chooses which worker serves a call.
fn counter_named(name: &str) -> Service {
    Service::new(name)
        .method("add", |ctx, args: Value| async move {
            let session = ctx.session().await?;
            let n = args["n"]
                .as_i64()
                .ok_or_else(|| HandlerError::invalid_args("n"))?;
            let v = session.get("value").and_then(|v| v.as_i64()).unwrap_or(0) + n;
            session.set("value", json!(v));
            Ok(json!({ "value": v }))
        })
        .method("get", |ctx, _args: Value| async move {
            let session = ctx.session().await?;
            let v = session.get("value").and_then(|v| v.as_i64()).unwrap_or(0);
            Ok(json!({ "value": v, "version": session.version() }))
        })
}

#[tokio::test(start_paused = true)]
async fn a_session_written_through_one_worker_is_read_at_its_new_version_through_another() {
    let mut cluster = cluster(&[]).await;
    cluster
        .spawn_with("w-a", vec![counter_named("ca")], false)
        .await
        .unwrap();
    cluster
        .spawn_with("w-b", vec![counter_named("cb")], false)
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    let call = |service: &'static str, method: &'static str, n: i64| {
        let client = client.clone();
        async move {
            client
                .call(service, method, json!({ "n": n }), on("shared"))
                .await
                .unwrap()
        }
    };
    assert_eq!(ok_value(&call("ca", "add", 1).await), 1); // w-a caches version 1
    assert_eq!(ok_value(&call("cb", "add", 10).await), 11); // w-b writes version 2
    let read = call("ca", "get", 0).await; // w-a must not serve version 1
    assert_eq!(ok_value(&read), 11);
    assert_eq!(read.result.unwrap()["version"], json!(2));
    assert_eq!(ok_value(&call("ca", "add", 100).await), 111);
    assert_eq!(ok_value(&call("cb", "get", 0).await), 111);
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_expires_and_a_closed_one_is_gone() {
    let cluster = cluster(&["w1"]).await;
    let client = cluster.client().await.unwrap();
    assert_eq!(ok_value(&add(&client, "idle", 1).await), 1);
    assert_eq!(ok_value(&add(&client, "idle", 1).await), 2);
    // Used within the idle time, it lives on.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(ok_value(&add(&client, "idle", 1).await), 3);
    tokio::time::sleep(Duration::from_secs(6)).await;
    for _ in 0..2 {
        let reply = add(&client, "idle", 1).await;
        assert_eq!(reply.outcome, Outcome::Error, "{reply:?}");
        let error = reply.error.unwrap();
        assert_eq!(error.code, "session_expired");
        assert!(
            error.message.contains("session `idle` expired"),
            "{}",
            error.message
        );
    }

    assert_eq!(ok_value(&add(&client, "brief", 4).await), 4);
    let closed = client
        .call("counter", "close", json!({}), on("brief"))
        .await
        .unwrap();
    assert_eq!(closed.outcome, Outcome::Ok, "{closed:?}");
    let reply = value(&client, "counter", "brief").await;
    assert_eq!(reply.error.unwrap().code, "session_closed");

    // A call without a session gets a clear error too.
    let reply = client
        .call("counter", "add", json!({ "n": 1 }), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(reply.error.unwrap().code, "no_session");
}

/// Crashes its worker right after a flush is granted.
struct CrashAfterFlush;

impl Faults for CrashAfterFlush {
    fn crash(&self, site: &CrashSite<'_>) -> bool {
        site.point == CrashPoint::AfterTrace && site.trace == Some("session.flush")
    }
}

#[tokio::test(start_paused = true)]
async fn a_flushed_write_is_seen_before_its_call_ends_and_losing_the_call_then_is_fatal() {
    let release = Arc::new(tokio::sync::Notify::new());
    let hold = |name: &str, release: Arc<tokio::sync::Notify>| {
        Service::new(name).method("hold", move |ctx, args: Value| {
            let release = release.clone();
            async move {
                let session = ctx.session().await?;
                session.set("held", args["n"].clone());
                session.flush().await?;
                release.notified().await;
                session.set("done", json!(true));
                Ok(json!({ "held": args["n"] }))
            }
        })
    };
    let peek = Service::new("peek").method("peek", |ctx, _args: Value| async move {
        let session = ctx.session().await?;
        Ok(json!({ "held": session.get("held"), "done": session.get("done"), "version": session.version() }))
    });
    let mut cluster = cluster(&[]).await;
    cluster
        .spawn_with("w-hold", vec![hold("cart", release.clone())], false)
        .await
        .unwrap();
    cluster
        .spawn_with("w-peek", vec![peek], false)
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    let holding = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call("cart", "hold", json!({ "n": 3 }), on("c1"))
                .await
                .unwrap()
        })
    };
    let peek = |session: &'static str| {
        let client = client.clone();
        async move {
            let reply = client
                .call("peek", "peek", json!({}), on(session))
                .await
                .unwrap();
            assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
            reply.result.unwrap()
        }
    };
    // The flushed write shows while the call still runs.
    let mut seen = peek("c1").await;
    while seen["held"] != json!(3) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        seen = peek("c1").await;
    }
    assert_eq!(
        (seen["done"].clone(), seen["version"].clone()),
        (Value::Null, json!(1))
    );
    release.notify_one();
    assert_eq!(holding.await.unwrap().outcome, Outcome::Ok);
    let after = peek("c1").await;
    assert_eq!(
        (after["done"].clone(), after["version"].clone()),
        (json!(true), json!(2))
    );

    // A worker lost after its flush: the call is fatal, the flushed data stays.
    cluster
        .spawn_faulty(
            "w-crash",
            vec![hold("cart2", release.clone())],
            Arc::new(CrashAfterFlush),
        )
        .await
        .unwrap();
    let reply = client
        .call("cart2", "hold", json!({ "n": 9 }), on("c2"))
        .await
        .unwrap();
    assert_eq!(reply.outcome, Outcome::Fatal, "{reply:?}");
    assert_eq!(
        reply.error.unwrap().traces,
        vec!["session.flush".to_owned()]
    );
    assert_eq!(peek("c2").await["held"], json!(9));
}

#[tokio::test(start_paused = true)]
async fn a_session_read_the_coordinator_does_not_answer_is_retried_not_failed() {
    let dir = std::env::temp_dir().join(format!("callq-sessions-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = || callq_coordinator::RedbStore::open(dir.join("ledger.redb")).unwrap();
    let mut cluster = LocalCluster::start(ClusterOptions::default(), store())
        .await
        .unwrap();
    cluster
        .spawn_worker("w1", &["counter"], false)
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    assert_eq!(ok_value(&add(&client, "s", 5).await), 5);

    // The coordinator is gone while the next call reads its session.
    cluster.kill_coordinator().await;
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { add(&client, "s", 1).await })
    };
    // Past the worker's patience (10 s) with the coordinator: the attempt
    // stops and its call goes back to the queue.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(
        !pending.is_finished(),
        "the call was answered without its session"
    );
    cluster.start_coordinator(store()).unwrap();
    let reply = pending.await.unwrap();
    assert_eq!(ok_value(&reply), 6, "{reply:?}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
