//! Each branch of the call lifecycle, on an in-process cluster (embedded
//! broker, real coordinator, real workers) under tokio's paused clock.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use callq_broker::{
    ATTEMPT_HEADER, Broker, COORDINATOR_QUEUE, Consumer, Delivery, Disposition, Message, QueueSpec,
    call_queue,
};
use callq_coordinator::MemoryStore;
use callq_node::CallOptions;
use callq_schemas::protocol::{
    Answer, AnswerBody, InFlightCall, Lease, Request, RequestBody, TraceDecision, WorkerState,
};
use callq_schemas::{Call, Limits, Outcome, Reply, Uuid, decode_reply};
use callq_testkit::{ClusterOptions, LocalCluster};
use serde_json::{Value, json};
use tokio::time::Instant;

const BEAT: Duration = Duration::from_millis(250);
const DEAD_AFTER: u32 = 4;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("callq-test-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn outbox(&self) -> PathBuf {
        self.0.join("mail.outbox")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The call ids in an outbox, one per mail sent.
fn sent(outbox: &Path) -> Vec<Uuid> {
    std::fs::read_to_string(outbox)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('\t').next().unwrap().parse().unwrap())
        .collect()
}

fn mail_args(outbox: &Path, before_ms: u64, after_ms: u64) -> Value {
    json!({"outbox": outbox, "to": "a@example.com", "subject": "hi",
           "before_ms": before_ms, "after_ms": after_ms})
}

/// Waits (in paused time) until `cond` holds; fails after a minute.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < give_up, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn cluster(standby: &[(&str, u32)]) -> LocalCluster {
    let opts = ClusterOptions {
        heartbeat_interval: BEAT,
        dead_after: DEAD_AFTER,
        capacity: 8,
        standby_per_service: standby
            .iter()
            .map(|(s, n)| ((*s).to_owned(), *n))
            .collect::<BTreeMap<_, _>>(),
        ..ClusterOptions::default()
    };
    LocalCluster::start(opts, MemoryStore::default())
        .await
        .unwrap()
}

fn in_flight(c: &LocalCluster, id: &str) -> u64 {
    c.stats(id).unwrap().in_flight.load(Ordering::Relaxed)
}

/// Publishes a call whose replies land on a raw queue, to count them all.
async fn raw_call(broker: &dyn Broker, call: &mut Call) -> Box<dyn Consumer> {
    let replies = format!("callq.reply.raw-{}", call.call_id.simple());
    broker.declare(&QueueSpec::plain(&replies)).await.unwrap();
    call.reply_to = Some(replies.clone());
    broker
        .declare(&QueueSpec::calls(&call.service))
        .await
        .unwrap();
    broker
        .publish(&call_queue(&call.service), Message::new(call.to_bytes()))
        .await
        .unwrap();
    broker.consume(&replies, 16).await.unwrap()
}

/// Publishes another copy of `call`, as a re-issue with this attempt.
async fn publish_copy(broker: &dyn Broker, call: &Call, attempt: u32) {
    let message = Message::new(call.to_bytes()).header(ATTEMPT_HEADER, attempt.to_string());
    broker
        .publish(&call_queue(&call.service), message)
        .await
        .unwrap();
}

/// Every reply on a raw queue until it stays quiet for `quiet`.
async fn replies(c: &mut Box<dyn Consumer>, quiet: Duration) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, c.next()).await {
        out.push(decode_reply(&d.body, &Limits::default()).unwrap());
        d.settle(Disposition::Ack).await.unwrap();
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_worker_killed_before_its_trace_is_retried_and_answered_once() {
    let dir = TempDir::new();
    let mut c = cluster(&[]).await;
    c.spawn_worker("a", &["mail"], false).await.unwrap();
    let mut call = Call::new("mail", "send", mail_args(&dir.outbox(), 2_000, 0));
    let mut replies_q = raw_call(c.broker.as_ref(), &mut call).await;
    wait_until("worker a runs the call", || in_flight(&c, "a") == 1).await;
    c.spawn_worker("b", &["mail"], false).await.unwrap();
    // Long enough for a heartbeat to report the call to the coordinator.
    tokio::time::sleep(BEAT * 2).await;
    assert!(c.kill("a"));

    // Past the death's detection, so a re-issue would have happened by now.
    let got = replies(&mut replies_q, BEAT * DEAD_AFTER * 4).await;
    assert_eq!(got.len(), 1, "one reply: {got:?}");
    assert_eq!(got[0].outcome, Outcome::Ok, "{got:?}");
    assert_eq!(got[0].attempt, 2, "the retry runs as attempt 2");
    assert_eq!(
        sent(&dir.outbox()),
        vec![call.call_id],
        "the mail went once"
    );
    let b = c.stats("b").unwrap();
    assert_eq!(b.ok.load(Ordering::Relaxed), 1);
    assert_eq!(b.resumed.load(Ordering::Relaxed), 1, "b asked resume first");
}

#[tokio::test(start_paused = true)]
async fn a_worker_killed_after_its_trace_ends_fatal_once_and_the_effect_happened_once() {
    let dir = TempDir::new();
    let mut c = cluster(&[]).await;
    c.spawn_worker("a", &["mail"], false).await.unwrap();
    let mut call = Call::new("mail", "send", mail_args(&dir.outbox(), 0, 5_000));
    let mut replies_q = raw_call(c.broker.as_ref(), &mut call).await;
    let outbox = dir.outbox();
    wait_until("the mail is sent", || sent(&outbox).len() == 1).await;
    c.spawn_worker("b", &["mail"], false).await.unwrap();
    assert!(c.kill("a"));

    // The coordinator answers `fatal`, and b, told `fatal` by `resume`,
    // publishes the same reply again (in case the coordinator's was lost):
    // the client takes the first and drops the duplicate. No `ok` ever.
    let got = replies(&mut replies_q, BEAT * DEAD_AFTER * 4).await;
    assert!(!got.is_empty() && got.len() <= 2, "{got:?}");
    assert!(got.iter().all(|r| *r == got[0]), "one outcome: {got:?}");
    let fatal = &got[0];
    assert_eq!(fatal.outcome, Outcome::Fatal);
    let error = fatal.error.as_ref().unwrap();
    assert_eq!(error.traces, vec!["mail.sent".to_owned()]);
    assert!(error.message.contains("worker `a`"), "{}", error.message);
    assert_eq!(
        sent(&outbox),
        vec![call.call_id],
        "the effect happened once"
    );
    // b received the redelivery, asked resume, and dropped it.
    let b = c.stats("b").unwrap();
    assert_eq!(b.dropped.load(Ordering::Relaxed), 1);
    assert_eq!(b.ok.load(Ordering::Relaxed), 0);

    // A later copy of the failed call is acked and dropped, not run.
    publish_copy(c.broker.as_ref(), &call, 2).await;
    let late = replies(&mut replies_q, BEAT * 4).await;
    assert!(late.iter().all(|r| r == fatal), "{late:?}");
    assert_eq!(b.dropped.load(Ordering::Relaxed), 2);
    assert_eq!(sent(&outbox).len(), 1);
}

/// A worker that took a call and then hangs: it holds the delivery, sends
/// one heartbeat, then falls silent, as a partitioned or frozen process does.
struct HungWorker {
    delivery: Option<Delivery>,
    lease: Lease,
    broker: std::sync::Arc<dyn Broker>,
    answers: Box<dyn Consumer>,
}

impl HungWorker {
    async fn take(broker: std::sync::Arc<dyn Broker>, call: &Call) -> Self {
        let mut calls = broker.consume(&call_queue("mail"), 1).await.unwrap();
        let delivery = calls.next().await.unwrap().unwrap();
        std::mem::forget(calls); // the consumer, and so the lease, stays
        let lease = Lease {
            call_id: call.call_id,
            copy: 1,
            token: Uuid::now_v7(),
        };
        broker
            .declare(&QueueSpec::control("callq.worker.hung"))
            .await
            .unwrap();
        let answers = broker.consume("callq.worker.hung", 8).await.unwrap();
        let body = String::from_utf8(delivery.body.to_vec()).unwrap();
        let w = Self {
            delivery: Some(delivery),
            lease,
            broker,
            answers,
        };
        w.send(RequestBody::Heartbeat {
            services: vec!["mail".into()],
            state: WorkerState::Active,
            capacity: 1,
            free: 0,
            partitions: Default::default(),
            finished: Default::default(),
            in_flight: vec![InFlightCall {
                lease,
                service: "mail".into(),
                reply_to: call.reply_to.clone(),
                body: Some(body),
                key: None,
            }],
        })
        .await;
        w
    }

    async fn send(&self, body: RequestBody) {
        let req = Request {
            v: 1,
            worker_id: "hung".into(),
            reply_to: "callq.worker.hung".into(),
            expires_ms: None,
            traceparent: None,
            body,
        };
        self.broker
            .publish(COORDINATOR_QUEUE, Message::new(req.to_bytes()))
            .await
            .unwrap();
    }

    /// Wakes up and asks for a trace of its (revoked) attempt 1.
    async fn late_trace(&mut self) -> TraceDecision {
        let req_id = Uuid::now_v7();
        self.send(RequestBody::Trace {
            req_id,
            lease: self.lease,
            attempt: 1,
            kind: "mail.sent".into(),
            service: "mail".into(),
            call_reply_to: None,
            session: None,
            digest: None,
        })
        .await;
        let d = self.answers.next().await.unwrap().unwrap();
        let answer: Answer = serde_json::from_slice(&d.body).unwrap();
        match answer.body {
            AnswerBody::Trace {
                req_id: r,
                decision,
            } if r == req_id => decision,
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_worker_s_call_is_reissued_runs_once_despite_the_redelivery_and_its_late_trace_is_refused()
 {
    let dir = TempDir::new();
    let c = cluster(&[]).await;
    let mut call = Call::new("mail", "send", mail_args(&dir.outbox(), 0, 0));
    let mut replies_q = raw_call(c.broker.as_ref(), &mut call).await;
    let mut hung = HungWorker::take(c.broker.clone(), &call).await;

    // The coordinator declares it dead and re-issues the call as attempt 2.
    let mut c = c;
    wait_until_depth(&c, 1).await;
    let waited = Instant::now();
    // Then the hung worker's lease ends too (its connection finally drops):
    // the broker redelivers copy 1 while copy 2 is queued. Two workers race.
    let held = hung.delivery.take().unwrap();
    held.settle(Disposition::Requeue).await.unwrap();
    c.spawn_worker("b", &["mail"], false).await.unwrap();
    c.spawn_worker("c", &["mail"], false).await.unwrap();

    let got = replies(&mut replies_q, BEAT * 8).await;
    assert!(!got.is_empty());
    assert!(got.iter().all(|r| r.outcome == Outcome::Ok), "{got:?}");
    assert_eq!(sent(&dir.outbox()), vec![call.call_id], "ran once");
    let runs: u64 = ["b", "c"]
        .iter()
        .map(|w| c.stats(w).unwrap().ok.load(Ordering::Relaxed))
        .sum();
    let dropped: u64 = ["b", "c"]
        .iter()
        .map(|w| c.stats(w).unwrap().dropped.load(Ordering::Relaxed))
        .sum();
    assert_eq!(
        (runs, dropped),
        (1, 1),
        "one copy ran, the other was dropped"
    );
    assert!(waited.elapsed() < Duration::from_secs(5));

    // The hung worker wakes and tries to leave its trace: refused.
    match hung.late_trace().await {
        TraceDecision::Refused {
            reason,
            superseded,
            reply,
        } => {
            assert!(reason.contains("decided"), "{reason}");
            assert!(
                superseded,
                "a decided call makes any other delivery a spare"
            );
            let reply = reply.expect("a decided call's recorded reply goes with the refusal");
            assert_eq!(reply.call_id, call.call_id);
            assert_eq!(reply.outcome, Outcome::Ok);
        }
        other => panic!("a revoked attempt was not refused: {other:?}"),
    }
}

/// Waits until the call queue of `mail` holds `n` ready messages.
async fn wait_until_depth(c: &LocalCluster, n: u64) {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let d = c.broker.depth(&call_queue("mail")).await.unwrap();
        if d.ready == n {
            return;
        }
        assert!(Instant::now() < give_up, "depth stayed {d:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_standby_is_promoted_within_one_dead_after_of_the_death() {
    let mut c = cluster(&[("echo", 1)]).await;
    c.spawn_worker("a", &["echo"], false).await.unwrap();
    c.spawn_worker("s", &["echo"], true).await.unwrap();
    let admin = c.admin().await.unwrap();
    let client = c.client().await.unwrap();
    let r = client
        .call("echo", "echo", json!(1), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Ok);
    tokio::time::sleep(BEAT * 2).await;
    let status = admin.status().await.unwrap();
    let state = |st: &callq_schemas::protocol::ClusterStatus, id: &str| {
        st.workers
            .iter()
            .find(|w| w.worker_id == id)
            .map(|w| w.state)
    };
    assert_eq!(state(&status, "s"), Some(WorkerState::Standby));
    assert_eq!(
        c.stats("s").unwrap().finished(),
        0,
        "a standby runs nothing"
    );

    assert!(c.kill("a"));
    let killed = Instant::now();
    let r = client
        .call("echo", "echo", json!(2), CallOptions::default())
        .await
        .unwrap();
    let pause = killed.elapsed();
    assert_eq!(r.outcome, Outcome::Ok);
    assert_eq!(c.stats("s").unwrap().ok.load(Ordering::Relaxed), 1);
    // Death is declared after `dead_after` silent intervals (counted from
    // the last heartbeat, at most one interval before the kill), and the
    // promotion goes out in the same tick.
    assert!(
        pause <= BEAT * (DEAD_AFTER + 1),
        "the standby took over after {pause:?}"
    );
    let status = admin.status().await.unwrap();
    assert_eq!(state(&status, "s"), Some(WorkerState::Active));
    assert_eq!(
        state(&status, "a"),
        None,
        "the dead worker left the registry"
    );
    assert_eq!((status.deaths, status.promotions), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn drain_finishes_every_call_and_the_worker_leaves() {
    let mut c = cluster(&[]).await;
    c.spawn_worker("a", &["echo"], false).await.unwrap();
    c.spawn_worker("b", &["echo"], false).await.unwrap();
    let admin = c.admin().await.unwrap();
    let client = c.client().await.unwrap();
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call(
                        "echo",
                        "sleep",
                        json!({"ms": 1_000}),
                        CallOptions::default(),
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    wait_until("a runs calls", || in_flight(&c, "a") > 0).await;
    tokio::time::sleep(BEAT).await;
    assert!(admin.drain("a").await.unwrap());
    assert!(!admin.drain("nobody").await.unwrap());
    let st = admin.status().await.unwrap();
    let a = st.workers.iter().find(|w| w.worker_id == "a").unwrap();
    assert_eq!(a.state, WorkerState::Draining);

    for call in calls {
        assert_eq!(call.await.unwrap().outcome, Outcome::Ok);
    }
    let a_ok = c.stats("a").unwrap().ok.load(Ordering::Relaxed);
    let b_ok = c.stats("b").unwrap().ok.load(Ordering::Relaxed);
    assert_eq!(a_ok + b_ok, 40, "every call ran once");
    assert!(a_ok > 0 && b_ok > 0);
    wait_until("a left", || in_flight(&c, "a") == 0).await;
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let st = admin.status().await.unwrap();
        if st.workers.iter().all(|w| w.worker_id != "a") {
            assert_eq!(st.deaths, 0, "a drained worker is not a dead one");
            break;
        }
        assert!(Instant::now() < give_up, "a never left: {st:?}");
        tokio::time::sleep(BEAT).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_fatal_decision_survives_a_coordinator_restart() {
    let dir = TempDir::new();
    let ledger = dir.0.join("ledger.redb");
    let opts = ClusterOptions {
        heartbeat_interval: BEAT,
        dead_after: DEAD_AFTER,
        ..ClusterOptions::default()
    };
    let mut c = LocalCluster::start(opts, callq_coordinator::RedbStore::open(&ledger).unwrap())
        .await
        .unwrap();
    c.spawn_worker("a", &["mail"], false).await.unwrap();
    let mut call = Call::new("mail", "send", mail_args(&dir.outbox(), 0, 5_000));
    let mut replies_q = raw_call(c.broker.as_ref(), &mut call).await;
    let outbox = dir.outbox();
    wait_until("the mail is sent", || sent(&outbox).len() == 1).await;
    c.spawn_worker("b", &["mail"], false).await.unwrap();
    assert!(c.kill("a"));
    let got = replies(&mut replies_q, BEAT * 4).await;
    assert!(!got.is_empty());
    assert!(got.iter().all(|r| r.outcome == Outcome::Fatal), "{got:?}");
    let fatal = got[0].clone();

    // The coordinator process dies; another opens the same ledger.
    c.kill_coordinator().await;
    c.start_coordinator(callq_coordinator::RedbStore::open(&ledger).unwrap())
        .unwrap();
    // A late copy of the call (a re-issue's duplicate, say) reaches b.
    publish_copy(c.broker.as_ref(), &call, 2).await;
    let late = replies(&mut replies_q, BEAT * 8).await;
    assert!(
        late.iter().all(|r| *r == fatal),
        "the decided call ran or answered otherwise: {late:?}"
    );
    let b = c.stats("b").unwrap();
    assert_eq!(
        b.dropped.load(Ordering::Relaxed),
        2,
        "both copies were dropped"
    );
    assert_eq!(b.ok.load(Ordering::Relaxed), 0);
    assert_eq!(sent(&outbox), vec![call.call_id], "no second mail");
}

/// A `call_id` published again with another body, as a re-issued copy
/// (attempt header 2) whose `reply_to` is the publisher's own: without the
/// digest check its `resume` would be answered from the first body's record,
/// and the recorded reply published to it. The copy is dead-lettered
/// `body_mismatch` instead, unanswered; a copy of the recorded body is
/// still answered from the record.
#[tokio::test(start_paused = true)]
async fn a_call_id_published_again_with_another_body_is_refused() {
    let dir = TempDir::new();
    let mut c = cluster(&[]).await;
    c.spawn_worker("a", &["mail"], false).await.unwrap();
    let dead = callq_broker::dead_queue("mail");
    c.broker.declare(&QueueSpec::calls("mail")).await.unwrap();
    let mut dead_q = c.broker.consume(&dead, 16).await.unwrap();
    // The genuine call, as a re-issued copy: its resume makes the record.
    let mut call = Call::new("mail", "send", mail_args(&dir.outbox(), 0, 0));
    let mut genuine = raw_call(c.broker.as_ref(), &mut call).await;
    let first = replies(&mut genuine, BEAT * 8).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].outcome, Outcome::Ok, "{first:?}");
    publish_copy(c.broker.as_ref(), &call, 2).await;
    let again = replies(&mut genuine, BEAT * 8).await;
    assert_eq!(again.len(), 1, "answered from the record: {again:?}");

    // The same id, another body, answering into the forger's own queue.
    let mut forged = call.clone();
    forged.args = json!({"outbox": dir.outbox(), "to": "mallory@example.com", "subject": "hi"});
    // Its first delivery runs on the fast path: its trace is refused (the
    // call is decided), and it is dropped unanswered.
    let mut stolen = raw_call(c.broker.as_ref(), &mut forged).await;
    let none = replies(&mut stolen, BEAT * 8).await;
    assert!(none.is_empty(), "{none:?}");
    // As a re-issued copy, it asks resume, which its digest fails.
    publish_copy(c.broker.as_ref(), &forged, 2).await;
    let d = next_delivery(&mut dead_q).await;
    assert!(
        d.headers[callq_broker::DEAD_REASON_HEADER].starts_with("body_mismatch"),
        "{:?}",
        d.headers
    );
    d.settle(Disposition::Ack).await.unwrap();
    let leaked = replies(&mut stolen, BEAT * 8).await;
    assert!(
        leaked.is_empty(),
        "the forged copy was answered: {leaked:?}"
    );
    assert_eq!(
        sent(&dir.outbox()),
        vec![call.call_id],
        "one mail, to the first recipient"
    );
    let outbox = std::fs::read_to_string(dir.outbox()).unwrap();
    assert!(!outbox.contains("mallory"), "{outbox}");
}

async fn next_delivery(c: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(60), c.next())
        .await
        .expect("a delivery within a minute")
        .unwrap()
        .unwrap()
}
