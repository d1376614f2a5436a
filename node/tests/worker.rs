//! The worker runtime and the client on the embedded broker, with tokio's
//! paused clock: every branch of a call's path through one worker.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use callq_broker::{
    ATTEMPT_HEADER, Broker, Consumer, DEAD_REASON_HEADER, Delivery, Disposition,
    Error as BrokerError, Message, QueueDepth, QueueSpec, call_queue, dead_queue, lost_queue,
};
use callq_broker_embedded::EmbeddedBroker;
use callq_node::{
    CallOptions, Client, ClientOptions, HandlerError, Service, Worker, WorkerOptions, services,
};
use callq_schemas::{Call, Limits, Outcome, Reply, codes, decode_reply};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn opts(id: &str, capacity: u16) -> WorkerOptions {
    WorkerOptions {
        worker_id: id.into(),
        capacity,
        coordinated: false,
        ..WorkerOptions::default()
    }
}

/// A service whose methods exercise every branch.
fn test_service(runs: Arc<AtomicU32>) -> Service {
    Service::new("t")
        .method("ok", |_ctx, args| async move { Ok(args) })
        .method("fail", |_ctx, _| async move { Err(HandlerError::new("insufficient_funds", "a has 300, needs 500")) })
        .method("panic", |_ctx, _| async move {
            if true {
                panic!("boom");
            }
            Ok(Value::Null)
        })
        .method("panic_early", |_ctx, _| {
            // Panics in the closure itself, before any future exists.
            if true {
                panic!("early boom");
            }
            async move { Ok(Value::Null) }
        })
        .method("count", move |_ctx, _| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(json!("counted"))
            }
        })
        .method("hang", |_ctx, _| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Value::Null)
        })
        .method("ctx", |ctx, _| async move {
            Ok(json!({"attempt": ctx.attempt(), "session": ctx.session_id(), "call_id": ctx.call_id().to_string()}))
        })
}

struct Cluster {
    broker: Arc<dyn Broker>,
    shutdown: CancellationToken,
    runs: Arc<AtomicU32>,
}

impl Cluster {
    fn new() -> Self {
        Self::on(Arc::new(EmbeddedBroker::new()))
    }

    fn on(broker: Arc<dyn Broker>) -> Self {
        Self {
            broker,
            shutdown: CancellationToken::new(),
            runs: Arc::default(),
        }
    }

    async fn worker(
        &self,
        id: &str,
        capacity: u16,
    ) -> (
        JoinHandle<Result<(), callq_node::Error>>,
        Arc<callq_node::WorkerStats>,
    ) {
        self.worker_with(opts(id, capacity)).await
    }

    async fn worker_with(
        &self,
        o: WorkerOptions,
    ) -> (
        JoinHandle<Result<(), callq_node::Error>>,
        Arc<callq_node::WorkerStats>,
    ) {
        let w = Worker::new(o, self.broker.clone())
            .service(test_service(self.runs.clone()))
            .service(services::echo());
        w.declare().await.unwrap();
        let stats = w.stats();
        (tokio::spawn(w.run(self.shutdown.clone())), stats)
    }

    async fn client(&self) -> Client {
        Client::connect(self.broker.clone(), ClientOptions::default())
            .await
            .unwrap()
    }

    /// A reply queue read by hand, for calls published raw.
    async fn raw_replies(&self, name: &str) -> Box<dyn Consumer> {
        self.broker.declare(&QueueSpec::plain(name)).await.unwrap();
        self.broker.consume(name, 100).await.unwrap()
    }
}

async fn call(client: &Client, service: &str, method: &str, args: Value) -> Reply {
    client
        .call(service, method, args, CallOptions::default())
        .await
        .unwrap()
}

async fn next(consumer: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("a delivery within 60 s")
        .expect("consumer open")
        .expect("delivery")
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition not reached within 10 s");
}

#[tokio::test(start_paused = true)]
async fn each_outcome_reaches_the_client() {
    let c = Cluster::new();
    let _w = c.worker("w1", 8).await;
    let client = c.client().await;

    let r = call(&client, "t", "ok", json!({"x": [1, 2]})).await;
    assert_eq!(
        (r.outcome, r.result.clone()),
        (Outcome::Ok, Some(json!({"x": [1, 2]})))
    );
    assert_eq!(r.attempt, 1);

    let r = call(&client, "t", "fail", json!({})).await;
    assert_eq!(r.outcome, Outcome::Error);
    assert_eq!(r.code(), Some("insufficient_funds"));

    let r = call(&client, "t", "nope", json!({})).await;
    assert_eq!(r.code(), Some(codes::UNKNOWN_METHOD));
    assert!(
        r.error.unwrap().message.contains("ok"),
        "names the methods it has"
    );

    let r = client
        .call(
            "t",
            "ctx",
            json!({}),
            CallOptions {
                session_id: Some("s-1".into()),
                ..CallOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.result.unwrap()["session"], json!("s-1"));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_an_error_and_the_worker_serves_on() {
    let c = Cluster::new();
    let (w, stats) = c.worker("w1", 4).await;
    let client = c.client().await;
    for _ in 0..3 {
        let r = call(&client, "t", "panic", json!({})).await;
        assert_eq!(r.outcome, Outcome::Error);
        assert_eq!(r.code(), Some(codes::HANDLER_PANICKED));
        assert!(r.error.unwrap().message.contains("boom"));
    }
    assert_eq!(
        call(&client, "t", "ok", json!(1)).await.outcome,
        Outcome::Ok
    );
    assert_eq!(stats.panicked.load(Ordering::Relaxed), 3);
    assert!(!w.is_finished());
    // Panics are answered, not requeued: the queue is empty.
    assert_eq!(
        c.broker.depth(&call_queue("t")).await.unwrap(),
        QueueDepth::default()
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_past_its_deadline_is_answered_expired_without_running() {
    let c = Cluster::new();
    let _w = c.worker("w1", 4).await;
    let mut replies = c.raw_replies("callq.reply.raw").await;
    let mut call = Call::new("t", "count", json!({}));
    call.reply_to = Some("callq.reply.raw".into());
    call.deadline = Some(time::OffsetDateTime::now_utc() - time::Duration::seconds(1));
    c.broker
        .publish(&call_queue("t"), Message::new(call.to_bytes()))
        .await
        .unwrap();
    let d = next(&mut replies).await;
    let r = decode_reply(&d.body, &Limits::default()).unwrap();
    assert_eq!((r.call_id, r.outcome), (call.call_id, Outcome::Expired));
    assert_eq!(r.code(), Some(codes::DEADLINE_PASSED));
    assert_eq!(c.runs.load(Ordering::SeqCst), 0, "the handler did not run");
}

#[tokio::test(start_paused = true)]
async fn the_client_times_out_as_expired() {
    let c = Cluster::new();
    let client = c.client().await;
    let start = tokio::time::Instant::now();
    // No worker serves `nobody`.
    let r = client
        .call(
            "nobody",
            "x",
            json!({}),
            CallOptions {
                timeout: Some(Duration::from_secs(5)),
                ..CallOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Expired);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    // The call was published (the client declared the queue): it waits there.
    assert_eq!(
        c.broker.depth(&call_queue("nobody")).await.unwrap().ready,
        1
    );
}

#[tokio::test(start_paused = true)]
async fn the_client_takes_the_first_outcome_and_drops_duplicates() {
    let c = Cluster::new();
    let client = c.client().await;
    // Stand in for a worker: answer every call twice, the first answer first.
    let mut calls = {
        c.broker.declare(&QueueSpec::calls("dup")).await.unwrap();
        c.broker.consume(&call_queue("dup"), 10).await.unwrap()
    };
    let broker = c.broker.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = calls.next().await {
            let call = callq_schemas::decode_call(&d.body, &Limits::default()).unwrap();
            let to = call.reply_to.clone().unwrap();
            for (i, outcome) in [json!("first"), json!("second")].into_iter().enumerate() {
                let r = Reply::ok(call.call_id, u32::try_from(i).unwrap() + 1, outcome);
                broker
                    .publish(&to, Message::new(r.to_bytes()))
                    .await
                    .unwrap();
            }
            d.settle(Disposition::Ack).await.unwrap();
        }
    });
    for _ in 0..5 {
        let r = call(&client, "dup", "x", json!({})).await;
        assert_eq!(r.result, Some(json!("first")));
    }
    // Every duplicate was consumed and dropped, none is left behind.
    wait_until(|| true).await;
    let reply_q = client.reply_queue().to_owned();
    let broker = c.broker.clone();
    for _ in 0..100 {
        if broker.depth(&reply_q).await.unwrap() == QueueDepth::default() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("duplicates were left on the reply queue");
}

#[tokio::test(start_paused = true)]
async fn many_calls_in_flight_on_one_client_over_several_workers() {
    let c = Cluster::new();
    let (_a, sa) = c.worker("a", 16).await;
    let (_b, sb) = c.worker("b", 16).await;
    let client = c.client().await;
    let calls = (0..500).map(|i| {
        let client = client.clone();
        async move { (i, call(&client, "echo", "echo", json!({"i": i})).await) }
    });
    let replies = futures::future::join_all(calls).await;
    for (i, r) in replies {
        assert_eq!(
            r.result,
            Some(json!({"i": i})),
            "each call gets its own reply"
        );
    }
    let (a, b) = (sa.ok.load(Ordering::Relaxed), sb.ok.load(Ordering::Relaxed));
    assert_eq!(a + b, 500);
    assert!(a > 0 && b > 0, "both workers served ({a}, {b})");
}

#[tokio::test(start_paused = true)]
async fn prefetch_equals_capacity() {
    let c = Cluster::new();
    let (_w, stats) = c.worker("w1", 3).await;
    let client = c.client().await;
    let sleeps: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { call(&client, "echo", "sleep", json!({"ms": 1000})).await })
        })
        .collect();
    wait_until(|| stats.in_flight.load(Ordering::Relaxed) == 3).await;
    let depth = c.broker.depth(&call_queue("echo")).await.unwrap();
    assert_eq!(
        depth,
        QueueDepth {
            ready: 7,
            unsettled: 3
        }
    );
    for s in sleeps {
        assert_eq!(s.await.unwrap().outcome, Outcome::Ok);
    }
    assert_eq!(stats.ok.load(Ordering::Relaxed), 10);
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_answered_dead_lettered_and_the_worker_serves_on() {
    let c = Cluster::new();
    let (w, stats) = c.worker("w1", 4).await;
    let client = c.client().await;
    let mut replies = c.raw_replies("callq.reply.bad").await;
    c.broker
        .declare(&QueueSpec::plain(dead_queue("echo")))
        .await
        .unwrap();
    let mut dead = c.broker.consume(&dead_queue("echo"), 100).await.unwrap();
    // callq's own queues exist, so that a reply misrouted into one would
    // land there and be seen.
    let own = ["callq.coordinator", "callq.heartbeats", "callq.worker.w1"];
    for queue in own {
        c.broker.declare(&QueueSpec::plain(queue)).await.unwrap();
    }
    let limits = Limits::default();
    let id = "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f";
    let good = |extra: Value| {
        let mut v = json!({"v": 1, "call_id": id, "service": "echo", "method": "echo", "args": {}, "reply_to": "callq.reply.bad"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let mut missing_service = good(json!({}));
    missing_service.as_object_mut().unwrap().remove("service");
    let huge = good(json!({"args": {"pad": "x".repeat(limits.max_bytes * 2)}}));
    let deep = format!(
        r#"{{"v": 1, "call_id": "{id}", "reply_to": "callq.reply.bad", "service": "echo", "method": "echo", "args": {}0{}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let mut cases: Vec<(String, Vec<u8>, bool)> =
        vec![("not_json".into(), b"this is { not json".to_vec(), false)];
    // A reply_to that names no queue a reply may go to: dead-lettered with
    // no reply (none is published anywhere), the slot freed.
    for to in [
        String::new(),
        "r".repeat(256),
        "r".repeat(10_000),
        "callq.coordinator".into(),
        "callq.heartbeats".into(),
        "callq.worker.w1".into(),
        "callq.call.echo".into(),
        "callq.dead.echo".into(),
    ] {
        let name = format!("reply_to `{}`", to.chars().take(32).collect::<String>());
        let body = serde_json::to_vec(&good(json!({ "reply_to": to }))).unwrap();
        cases.push((name, body, false));
    }
    let answerable: Vec<(&str, Vec<u8>)> = vec![
        (
            "service of 10 KB",
            serde_json::to_vec(&good(json!({"service": "s".repeat(10_000)}))).unwrap(),
        ),
        ("too_large", serde_json::to_vec(&huge).unwrap()),
        ("too_deep", deep.into_bytes()),
        (
            "unknown_version",
            serde_json::to_vec(&good(json!({"v": 99}))).unwrap(),
        ),
        ("invalid", serde_json::to_vec(&missing_service).unwrap()),
    ];
    for (name, body) in answerable {
        cases.push((name.into(), body, true));
    }
    let good_body = serde_json::to_vec(&good(json!({}))).unwrap();
    let mut cases: Vec<(String, Message, bool)> = cases
        .into_iter()
        .map(|(kind, body, answerable)| (kind, Message::new(body), answerable))
        .collect();
    // An attempt header that is no attempt number: answered and
    // dead-lettered, never run.
    for (kind, attempt) in [
        ("attempt 4294967295", "4294967295"),
        ("attempt 0", "0"),
        ("attempt not a number", "two"),
    ] {
        let m = Message::new(good_body.clone()).header(ATTEMPT_HEADER, attempt);
        cases.push((kind.into(), m, true));
    }
    let runs = cases.len();
    for (kind, message, answerable) in cases {
        let body = message.body.to_vec();
        c.broker
            .publish(&call_queue("echo"), message)
            .await
            .unwrap();
        if answerable {
            let d = next(&mut replies).await;
            let r = decode_reply(&d.body, &limits).unwrap();
            d.settle(Disposition::Ack).await.unwrap();
            assert_eq!(r.outcome, Outcome::Error, "{kind}");
            assert_eq!(r.code(), Some(codes::BAD_REQUEST), "{kind}");
            assert_eq!(
                r.call_id.to_string(),
                id,
                "{kind}: the reply names the call"
            );
        }
        let d = next(&mut dead).await;
        assert_eq!(
            d.body.as_ref(),
            body.as_slice(),
            "{kind}: dead-lettered as it came"
        );
        assert!(
            d.headers[DEAD_REASON_HEADER].starts_with("bad_request"),
            "{kind}"
        );
        d.settle(Disposition::Ack).await.unwrap();
        // The worker is up and serves the next good call.
        assert_eq!(
            call(&client, "echo", "echo", json!(kind)).await.result,
            Some(json!(kind))
        );
    }
    assert_eq!(stats.bad_request.load(Ordering::Relaxed), runs as u64);
    assert!(!w.is_finished());
    assert_eq!(
        c.broker.depth("callq.reply.bad").await.unwrap(),
        QueueDepth::default(),
        "the unanswerable ones got no reply"
    );
    // Nothing went into callq's own queues.
    for queue in own {
        assert_eq!(
            c.broker.depth(queue).await.unwrap(),
            QueueDepth::default(),
            "{queue}"
        );
    }
    assert_eq!(
        c.broker.depth(&call_queue("echo")).await.unwrap(),
        QueueDepth::default()
    );
}

#[tokio::test(start_paused = true)]
async fn with_reply_owners_a_call_no_broker_vouched_for_is_dead_lettered_unanswered() {
    // The embedded broker vouches for no publisher: with reply_owners on,
    // a call that names a reply queue is refused, one that names none runs.
    let c = Cluster::new();
    let (w, stats) = c
        .worker_with(WorkerOptions {
            reply_owners: true,
            trusted_publishers: vec!["callq-cluster".into()],
            ..opts("w1", 4)
        })
        .await;
    let mut replies = c.raw_replies("callq.reply.alice").await;
    c.broker
        .declare(&QueueSpec::plain(dead_queue("echo")))
        .await
        .unwrap();
    let mut dead = c.broker.consume(&dead_queue("echo"), 10).await.unwrap();
    let mut refused = Call::new("echo", "echo", json!({"n": 1}));
    refused.reply_to = Some("callq.reply.alice".into());
    c.broker
        .publish(&call_queue("echo"), Message::new(refused.to_bytes()))
        .await
        .unwrap();
    let d = next(&mut dead).await;
    assert!(
        d.headers[DEAD_REASON_HEADER].starts_with("reply_not_owned"),
        "{:?}",
        d.headers
    );
    assert!(
        d.headers[DEAD_REASON_HEADER].contains("user_id"),
        "{:?}",
        d.headers
    );
    d.settle(Disposition::Ack).await.unwrap();
    // A bad body is not answered either: its reply_to is not vouched for.
    c.broker
        .publish(
            &call_queue("echo"),
            Message::new(r#"{"v": 1, "reply_to": "callq.reply.alice", "call_id": 7}"#),
        )
        .await
        .unwrap();
    let d = next(&mut dead).await;
    assert!(d.headers[DEAD_REASON_HEADER].starts_with("bad_request"));
    d.settle(Disposition::Ack).await.unwrap();
    // Fire and forget (no reply_to) runs.
    let runs = c.runs.load(Ordering::Relaxed);
    let quiet = Call::new("t", "count", json!({}));
    c.broker
        .publish(&call_queue("t"), Message::new(quiet.to_bytes()))
        .await
        .unwrap();
    wait_until(|| c.runs.load(Ordering::Relaxed) > runs).await;
    assert_eq!(stats.bad_request.load(Ordering::Relaxed), 2);
    let nothing = tokio::time::timeout(Duration::from_secs(5), replies.next()).await;
    assert!(nothing.is_err(), "a refused call was answered: {nothing:?}");
    assert!(!w.is_finished());
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_finishes_calls_in_flight() {
    let c = Cluster::new();
    let (w, stats) = c.worker("w1", 8).await;
    let client = c.client().await;
    let sleeps: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { call(&client, "echo", "sleep", json!({"ms": 2000})).await })
        })
        .collect();
    wait_until(|| stats.in_flight.load(Ordering::Relaxed) == 5).await;
    c.shutdown.cancel();
    w.await.unwrap().unwrap();
    for s in sleeps {
        assert_eq!(s.await.unwrap().outcome, Outcome::Ok);
    }
    assert_eq!(
        c.broker.depth(&call_queue("echo")).await.unwrap(),
        QueueDepth::default(),
        "nothing requeued"
    );
}

#[tokio::test(start_paused = true)]
async fn a_killed_worker_s_calls_are_redelivered_and_answered_once() {
    let c = Cluster::new();
    let (doomed, stats) = c.worker("doomed", 8).await;
    let client = c.client().await;
    let pending: Vec<_> = (0..8)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(
                async move { call(&client, "echo", "sleep", json!({"ms": 1000 + i})).await },
            )
        })
        .collect();
    wait_until(|| stats.in_flight.load(Ordering::Relaxed) == 8).await;
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());
    let (_w2, s2) = c.worker("survivor", 8).await;
    for p in pending {
        let r = p.await.unwrap();
        assert_eq!(r.outcome, Outcome::Ok);
    }
    assert_eq!(
        stats.ok.load(Ordering::Relaxed),
        0,
        "the killed worker answered nothing"
    );
    assert_eq!(s2.ok.load(Ordering::Relaxed), 8);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_keeps_killing_workers_is_dead_lettered_with_a_reply() {
    let c = Cluster::new();
    let client = c.client().await;
    let poison = {
        let client = client.clone();
        tokio::spawn(async move { call(&client, "t", "hang", json!({})).await })
    };
    // The call hangs its worker; the worker is killed; a new one takes it.
    let limit = QueueSpec::calls("t").delivery_limit.unwrap();
    for _ in 0..limit {
        let (w, stats) = c.worker("victim", 1).await;
        wait_until(|| stats.in_flight.load(Ordering::Relaxed) == 1).await;
        w.abort();
        let _ = w.await;
    }
    let (_w, stats) = c.worker("last", 1).await;
    let r = poison.await.unwrap();
    assert_eq!(r.outcome, Outcome::Error);
    assert_eq!(r.code(), Some(codes::DELIVERY_LIMIT));
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    let dead = c.broker.depth(&dead_queue("t")).await.unwrap();
    assert_eq!(dead.ready, 1);
    assert_eq!(
        c.broker.depth(&call_queue("t")).await.unwrap(),
        QueueDepth::default()
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_last_delivery_is_lost_unjudged_is_answered_from_the_lost_queue() {
    let c = Cluster::new();
    let client = c.client().await;
    let poison = {
        let client = client.clone();
        tokio::spawn(async move { call(&client, "t", "hang", json!({})).await })
    };
    let limit = QueueSpec::calls("t").delivery_limit.unwrap();
    for _ in 0..limit {
        let (w, stats) = c.worker("victim", 1).await;
        wait_until(|| stats.in_flight.load(Ordering::Relaxed) == 1).await;
        w.abort();
        let _ = w.await;
    }
    // The last allowed delivery is lost before anyone judged it (as with a
    // worker killed while it waits for the coordinator).
    let mut taker = c.broker.consume(&call_queue("t"), 1).await.unwrap();
    let last = taker.next().await.unwrap().unwrap();
    assert_eq!(last.delivery_count, limit);
    drop(last);
    drop(taker);
    let lost = c.broker.depth(&lost_queue("t")).await.unwrap();
    assert_eq!(lost.ready, 1, "the call did not move past its limit");
    assert_eq!(c.broker.depth(&dead_queue("t")).await.unwrap().ready, 0);

    let (_w, stats) = c.worker("answerer", 1).await;
    let r = poison.await.unwrap();
    assert_eq!(r.outcome, Outcome::Error);
    assert_eq!(r.code(), Some(codes::DELIVERY_LIMIT));
    assert!(r.error.unwrap().message.contains("lost"));
    wait_until(|| stats.dead_lettered.load(Ordering::Relaxed) == 1).await;
    assert_eq!(c.broker.depth(&dead_queue("t")).await.unwrap().ready, 1);
    assert_eq!(
        c.broker.depth(&lost_queue("t")).await.unwrap(),
        QueueDepth::default()
    );
}

/// A broker whose reply publishes are never confirmed.
struct UnconfirmedReplies(EmbeddedBroker);

#[async_trait]
impl Broker for UnconfirmedReplies {
    fn kind(&self) -> &'static str {
        "test"
    }
    async fn declare(&self, spec: &QueueSpec) -> Result<(), BrokerError> {
        self.0.declare(spec).await
    }
    async fn publish(&self, queue: &str, message: Message) -> Result<(), BrokerError> {
        if queue.starts_with("callq.reply.") {
            return Err(BrokerError::NotConfirmed("test: no confirm".into()));
        }
        self.0.publish(queue, message).await
    }
    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>, BrokerError> {
        self.0.consume(queue, prefetch).await
    }
    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        self.0.depth(queue).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_is_never_acked_before_its_reply_is_confirmed() {
    let c = Cluster::on(Arc::new(UnconfirmedReplies(EmbeddedBroker::new())));
    let (_w, stats) = c
        .worker_with(WorkerOptions {
            reply_retry: Duration::from_millis(100),
            ..opts("w1", 1)
        })
        .await;
    c.broker
        .declare(&QueueSpec::plain("callq.reply.x"))
        .await
        .unwrap();
    let mut call = Call::new("t", "count", json!({}));
    call.reply_to = Some("callq.reply.x".into());
    c.broker
        .publish(&call_queue("t"), Message::new(call.to_bytes()))
        .await
        .unwrap();
    wait_until(|| c.runs.load(Ordering::SeqCst) >= 2).await;
    // It ran, its reply was refused, and it went back to the queue instead of
    // being acked: the call is still there to be answered.
    assert!(stats.reply_failed.load(Ordering::Relaxed) >= 1);
    assert_eq!(
        stats.ok.load(Ordering::Relaxed),
        u64::from(c.runs.load(Ordering::SeqCst))
    );
    let depth = c.broker.depth(&call_queue("t")).await.unwrap();
    assert_eq!(depth.ready + depth.unsettled, 1, "the call was not acked");
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_panics_before_its_future_exists_is_answered_too() {
    let c = Cluster::new();
    // Capacity 1: a lost slot or an unsettled delivery would wedge the worker.
    let (w, stats) = c.worker("w1", 1).await;
    let client = c.client().await;
    for _ in 0..3 {
        let r = call(&client, "t", "panic_early", json!({})).await;
        assert_eq!(r.code(), Some(codes::HANDLER_PANICKED));
        assert!(r.error.unwrap().message.contains("early boom"));
    }
    assert_eq!(
        call(&client, "t", "ok", json!(7)).await.result,
        Some(json!(7))
    );
    assert_eq!(stats.panicked.load(Ordering::Relaxed), 3);
    assert!(!w.is_finished());
    assert_eq!(
        c.broker.depth(&call_queue("t")).await.unwrap(),
        QueueDepth::default()
    );
}

#[tokio::test(start_paused = true)]
async fn the_same_call_sent_twice_at_once_is_refused_not_lost() {
    let c = Cluster::new();
    let client = c.client().await;
    let call = Call::new("t", "ok", json!("once"));
    let first = {
        let (client, call) = (client.clone(), call.clone());
        tokio::spawn(async move { client.send(call, Duration::from_secs(10)).await })
    };
    tokio::task::yield_now().await;
    let second = client.send(call.clone(), Duration::from_secs(10)).await;
    assert!(
        matches!(second, Err(callq_node::Error::AlreadyPending(id)) if id == call.call_id),
        "{second:?}"
    );
    // The first send is unharmed and gets its outcome once a worker runs it.
    let _w = c.worker("w1", 1).await;
    let r = first.await.unwrap().unwrap();
    assert_eq!(r.result, Some(json!("once")));
}
