//! Forged control traffic against a cluster whose control path is signed
//! with a cluster key (`CALLQ_CLUSTER_KEY_FILE`, docs/SECURITY.md): the
//! attacker is a client that can publish to every queue but holds no key.
//! Each forged message is dropped and counted, no outcome changes, no
//! worker stops, the ledger does not grow and no slot leaks; on RabbitMQ
//! and on Kafka alike.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{Broker, COORDINATOR_QUEUE, HEARTBEAT_QUEUE, Message, QueueSpec, worker_queue};
use callq_broker_signed::{ClusterKey, Signed};
use callq_node::Admin;
use callq_schemas::protocol::{
    Answer, AnswerBody, ClusterStatus, InFlightCall, Lease, Request, RequestBody, WorkerState,
};
use callq_schemas::{Call, Outcome, Reply};
use serde_json::json;
use support::outcomes::{Recorder, mail};
use support::{Proc, count, wait_status};
use uuid::Uuid;

/// Writes a fresh cluster key into `dir`; its path and the key.
fn cluster_key(dir: &Path) -> (String, ClusterKey) {
    let mut bytes = [0u8; 48];
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut random, &mut bytes).unwrap();
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("cluster.key");
    std::fs::write(&path, format!("{text}\n")).unwrap();
    let key = ClusterKey::from_file(&path).unwrap();
    (path.to_str().unwrap().to_owned(), key)
}

/// A forged request to the coordinator, as a worker would send it.
fn request(worker: &str, body: RequestBody) -> Message {
    let req = Request {
        v: 1,
        worker_id: worker.into(),
        reply_to: worker_queue(worker),
        expires_ms: None,
        traceparent: None,
        body,
    };
    Message::new(serde_json::to_vec(&req).unwrap())
}

/// Sends every forged control message of the red-team run; returns how
/// many went to the coordinator's queues.
async fn attack(raw: &Arc<dyn Broker>, victim: Uuid, workers: &[String]) -> u64 {
    let lease = Lease {
        call_id: victim,
        copy: 1,
        token: Uuid::now_v7(),
    };
    let forged_ok = Reply::ok(victim, 1, json!({"forged": true}));
    let mut to_coordinator = vec![
        request(
            "w-forger",
            RequestBody::Resume {
                req_id: Uuid::now_v7(),
                lease,
                service: "mail".into(),
                call_reply_to: None,
                digest: None,
            },
        ),
        request(
            "w-forger",
            RequestBody::Complete {
                req_id: Uuid::now_v7(),
                lease,
                attempt: 1,
                reply: Some(forged_ok),
                session: None,
            },
        ),
        request(
            "w-forger",
            RequestBody::Trace {
                req_id: Uuid::now_v7(),
                lease,
                attempt: 1,
                kind: "mail.sent".into(),
                service: "mail".into(),
                call_reply_to: None,
                session: None,
                digest: None,
            },
        ),
        request(
            "w-forger",
            RequestBody::Status {
                req_id: Uuid::now_v7(),
            },
        ),
    ];
    for worker in workers {
        to_coordinator.push(request(
            "w-forger",
            RequestBody::Drain {
                req_id: Uuid::now_v7(),
                worker: worker.clone(),
            },
        ));
    }
    // A made-up worker claiming 100,000 calls in flight, and one carrying a
    // call body for the coordinator to re-issue.
    let heartbeat = |in_flight: Vec<InFlightCall>| {
        request(
            "ghost",
            RequestBody::Heartbeat {
                services: vec!["echo".into()],
                state: WorkerState::Active,
                capacity: 100_000,
                free: 0,
                in_flight,
                partitions: BTreeMap::new(),
                finished: BTreeMap::new(),
            },
        )
    };
    let flood: Vec<InFlightCall> = (0..100_000)
        .map(|_| InFlightCall {
            lease: Lease {
                call_id: Uuid::now_v7(),
                copy: 1,
                token: Uuid::now_v7(),
            },
            service: "echo".into(),
            reply_to: None,
            body: None,
            key: None,
        })
        .collect();
    let smuggled = Call::new("echo", "echo", json!({"smuggled": true}));
    let carried = vec![InFlightCall {
        lease: Lease {
            call_id: smuggled.call_id,
            copy: 1,
            token: Uuid::now_v7(),
        },
        service: "echo".into(),
        reply_to: None,
        body: Some(String::from_utf8(smuggled.to_bytes().to_vec()).unwrap()),
        key: None,
    }];
    let mut sent = to_coordinator.len() as u64;
    for m in to_coordinator {
        raw.publish(COORDINATOR_QUEUE, m).await.unwrap();
    }
    for m in [heartbeat(flood), heartbeat(carried)] {
        let size = m.body.len();
        match raw.publish(HEARTBEAT_QUEUE, m).await {
            Ok(()) => sent += 1,
            // Kafka's own bound on a record (1 MiB by default) refuses
            // the 15 MB heartbeat before any callq process sees it.
            Err(callq_broker::Error::Refused(why)) if size > 1 << 20 => {
                eprintln!("the broker refused the {size}-byte heartbeat: {why}");
            }
            Err(e) => panic!("publishing a forged heartbeat: {e}"),
        }
    }
    // Orders straight into each worker's queue.
    for worker in workers {
        for body in [AnswerBody::Drain {}, AnswerBody::Promote {}] {
            let order = Answer::new(body);
            let m = Message::new(serde_json::to_vec(&order).unwrap());
            raw.publish(&worker_queue(worker), m).await.unwrap();
        }
    }
    sent
}

/// The run on either broker: a coordinator and two workers holding the
/// key, a victim `mail.send` in flight, the attack, then the checks.
async fn red_team(url: &str, raw: Arc<dyn Broker>, dir: &Path, tag: &str) {
    let (key_file, key) = cluster_key(dir);
    let env = [
        ("CALLQ_CLUSTER_KEY_FILE", key_file.as_str()),
        ("CALLQ_WORKER__COORDINATOR_PATIENCE", "3000"),
    ];
    let mut coordinator = Proc::spawn_env("coordinator", &["coordinator"], url, dir, &env);
    let mut workers: Vec<Proc> = [format!("{tag}1"), format!("{tag}2")]
        .iter()
        .map(|id| {
            let args = ["worker", "--services", "echo,mail", "--worker-id", id];
            Proc::spawn_env(id, &args, url, dir, &env)
        })
        .collect();
    let operator: Arc<dyn Broker> = Arc::new(Signed::new(raw.clone(), key));
    let admin = Admin::connect(operator, Duration::from_secs(30))
        .await
        .unwrap();
    let active = |s: &ClusterStatus| count(s, WorkerState::Active) == 2;
    let status = wait_status(&admin, "2 active workers", Duration::from_secs(90), active).await;
    let ids: Vec<String> = status.workers.iter().map(|w| w.worker_id.clone()).collect();
    for id in &ids {
        raw.declare(&QueueSpec::control(worker_queue(id)))
            .await
            .unwrap();
    }
    let recorder = Recorder::start(raw.clone()).await;
    let outbox = dir.join("mail.outbox");
    // Warm: the reply path works before the attack.
    let (warm, _) = recorder
        .call_after(mail(&outbox, 0), Duration::from_secs(60))
        .await;
    assert_eq!(warm.outcome, Outcome::Ok, "{warm:?}");

    let victim = recorder.publish(mail(&outbox, 2_000)).await;
    let sent = attack(&raw, victim, &ids).await;
    eprintln!("{sent} forged messages sent to the coordinator, 4 orders to the workers");
    let dropped = wait_status(
        &admin,
        "every forgery dropped",
        Duration::from_secs(60),
        |s| s.unauthenticated_dropped >= sent,
    )
    .await;
    assert_eq!(
        dropped.unauthenticated_dropped, sent,
        "the coordinator dropped other messages than the forged ones"
    );

    recorder
        .wait_answered(&[victim], Duration::from_secs(60))
        .await;
    let replies = recorder.replies()[&victim].clone();
    eprintln!("the victim's replies: {replies:?}");
    for r in &replies {
        assert_eq!(
            r.outcome,
            Outcome::Ok,
            "the forgery changed the outcome: {r:?}"
        );
        assert_eq!(r.result.as_ref().unwrap()["sent"], json!(true), "{r:?}");
    }
    let mails = support::outcomes::mail_lines(&outbox);
    assert_eq!(
        mails.get(&victim),
        Some(&1),
        "the victim's mail was not sent once"
    );

    // No slot leaked, no worker stopped, no ledger growth, no ghost.
    let (after, _) = recorder
        .call_after(
            Call::new("echo", "echo", json!({"after": true})),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(after.outcome, Outcome::Ok, "{after:?}");
    let settled = wait_status(&admin, "load back to 0", Duration::from_secs(60), |s| {
        active(s) && s.workers.iter().all(|w| w.free == w.capacity) && s.open_calls == 0
    })
    .await;
    assert!(
        settled
            .workers
            .iter()
            .all(|w| !w.worker_id.starts_with("ghost")),
        "{settled:?}"
    );
    for w in &mut workers {
        assert!(w.running(), "{} exited:\n{}", w.name, w.log());
        let dropped = w.log().matches("dropped a control message").count();
        assert_eq!(
            dropped, 2,
            "{} dropped {dropped} forged orders, not 2",
            w.name
        );
    }
    assert!(coordinator.running(), "{}", coordinator.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_control_messages_are_dropped_on_rabbitmq() {
    let vhost = support::Vhost::create("forged");
    let dir = support::temp_dir("forged");
    let raw = support::amqp(&vhost.url).await;
    red_team(&vhost.url, raw, &dir, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_control_messages_are_dropped_on_kafka() {
    let url = support::kafka_url("kforged", 2);
    let dir = support::temp_dir("kforged");
    let raw = support::kafka(&url).await;
    red_team(&url, raw, &dir, "k").await;
}
