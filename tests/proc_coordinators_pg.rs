//! Coordinators on several hosts: two `callq coordinator` processes share
//! a ledger in PostgreSQL (`CALLQ_POSTGRES`, default
//! `postgres://postgres@127.0.0.1/test`) on a real RabbitMQ; one leads under
//! a lease, the other stands by. `scripts/services` makes sure both
//! services run; without them the tests fail, never skip.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use callq_broker::{Message, worker_queue};
use callq_node::{CallOptions, Client, ClientOptions};
use callq_schemas::Outcome;
use callq_schemas::protocol::{Answer, AnswerBody};
use support::{Proc, Vhost, load};

fn postgres() -> String {
    std::env::var("CALLQ_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1/test".to_owned())
}

/// A coordinator of the vhost's cluster, its ledger in PostgreSQL, with a
/// lease of `lease_ms`; its `/readyz` on the port returned.
fn coordinator(name: &str, vhost: &Vhost, dir: &std::path::Path, lease_ms: &str) -> (Proc, u16) {
    let pg = postgres();
    let http = support::free_port();
    let addr = format!("127.0.0.1:{http}");
    let proc = Proc::spawn_env(
        name,
        &["coordinator"],
        &vhost.url,
        dir,
        &[
            ("CALLQ_COORDINATOR__POSTGRES", pg.as_str()),
            ("CALLQ_COORDINATOR__CLUSTER", vhost.name.as_str()),
            ("CALLQ_COORDINATOR__LEASE_MS", lease_ms),
            ("CALLQ_HTTP", addr.as_str()),
        ],
    );
    (proc, http)
}

/// Two coordinators, two workers, 2,000 calls in flight; the leader killed
/// with SIGKILL mid-load (and a worker too, so that the new leader has the
/// old one's decisions to honour): the other takes over, and no call is
/// lost, doubled or wrongly fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_coordinator_takes_over_when_the_leader_is_killed() {
    let vhost = Vhost::create("pgcoord");
    let dir = support::temp_dir("pgcoord");
    let (mut first, first_http) = coordinator("coordinator-1", &vhost, &dir, "1000");
    support::wait_ready_as(first_http, "leading", Duration::from_secs(30)).await;
    let (mut second, second_http) = coordinator("coordinator-2", &vhost, &dir, "1000");
    support::wait_ready_as(second_http, "standing by", Duration::from_secs(30)).await;
    let (procs, broker, client) = support::two_workers(&vhost, &dir).await;
    let load = support::load_in_background(load(&dir, 2_000, 1), &client, &broker, procs).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    first.kill9();
    let killed = Instant::now();
    eprintln!("kill -9 coordinator-1");
    support::wait_ready_as(second_http, "leading", Duration::from_secs(30)).await;
    eprintln!(
        "coordinator-2 leads {:.0} ms after the kill (lease 1,000 ms)",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    support::served_on(load, 2_000, &client).await;
    assert!(second.running(), "{}", second.log());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The leader paused with SIGSTOP past its lease: the other coordinator
/// takes the lease; resumed, the old leader's first write (renewing a lease
/// of an epoch that is gone) is refused, and it stands by. The cluster
/// serves on under the new leader, with the session data the old one wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_when_it_wakes() {
    let vhost = Vhost::create("pgfence");
    let dir = support::temp_dir("pgfence");
    let (first, first_http) = coordinator("coordinator-1", &vhost, &dir, "1000");
    support::wait_ready_as(first_http, "leading", Duration::from_secs(30)).await;
    let (_second, second_http) = coordinator("coordinator-2", &vhost, &dir, "1000");
    support::wait_ready_as(second_http, "standing by", Duration::from_secs(30)).await;
    let worker = Proc::spawn(
        "w1",
        &[
            "worker",
            "--services",
            "echo,mail,counter",
            "--worker-id",
            "w1",
        ],
        &vhost.url,
        &dir,
    );
    let broker = support::amqp(&vhost.url).await;
    let client = Client::connect(broker, ClientOptions::default())
        .await
        .unwrap();
    let add = |n: i64| {
        let client = client.clone();
        async move {
            let reply = client
                .call(
                    "counter",
                    "add",
                    serde_json::json!({ "n": n }),
                    CallOptions {
                        session_id: Some("pg-session".into()),
                        timeout: Some(Duration::from_secs(60)),
                        ..CallOptions::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
            reply.result.unwrap()["value"].as_i64().unwrap()
        }
    };
    for _ in 0..3 {
        add(5).await;
    }
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &first.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    eprintln!("kill -STOP coordinator-1");
    support::wait_ready_as(second_http, "leading", Duration::from_secs(30)).await;
    signal("-CONT");
    eprintln!("kill -CONT coordinator-1");
    support::wait_ready_as(first_http, "standing by", Duration::from_secs(30)).await;
    assert!(
        first.log().contains("superseded"),
        "the old leader's write was refused for its epoch:\n{}",
        first.log()
    );
    // The session the old leader wrote, read and written by the new one.
    assert_eq!(add(1).await, 16);
    let reply = client
        .call(
            "mail",
            "send",
            serde_json::json!({
                "outbox": dir.join("fence.outbox").display().to_string(),
                "to": "a@b",
                "subject": "after the fence"
            }),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.outcome,
        Outcome::Ok,
        "a traced call, granted by the new leader: {reply:?}"
    );
    // An order stamped with an epoch below the new leader's, as the old
    // leader's would be: the worker drops it and serves on.
    let stale = Answer {
        epoch: Some(1),
        ..Answer::new(AnswerBody::Drain {})
    };
    let broker = support::amqp(&vhost.url).await;
    broker
        .publish(&worker_queue("w1"), Message::new(stale.to_bytes()))
        .await
        .unwrap();
    support::wait_log(
        &worker,
        "order of a coordinator that no longer leads dropped",
        Duration::from_secs(30),
    );
    assert_eq!(add(1).await, 17, "the worker drained on a stale order");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A leader stopped with SIGTERM gives its lease up as it exits: the
/// standby leads at its next try (a quarter of the lease), not once the
/// 10 s lease has run out, as after a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_over_at_once() {
    let vhost = Vhost::create("pghandover");
    let dir = support::temp_dir("pghandover");
    let (mut first, first_http) = coordinator("coordinator-1", &vhost, &dir, "10000");
    support::wait_ready_as(first_http, "leading", Duration::from_secs(30)).await;
    let (_second, second_http) = coordinator("coordinator-2", &vhost, &dir, "10000");
    support::wait_ready_as(second_http, "standing by", Duration::from_secs(30)).await;
    first.terminate();
    let stopped = Instant::now();
    let status = first.wait_exit(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{}", first.log());
    assert!(first.log().contains("lease given up"), "{}", first.log());
    support::wait_ready_as(second_http, "leading", Duration::from_secs(30)).await;
    let took = stopped.elapsed();
    eprintln!("coordinator-2 leads {took:?} after SIGTERM to the leader (lease 10 s)");
    assert!(
        took < Duration::from_secs(6),
        "the standby waited out the lease: {took:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
