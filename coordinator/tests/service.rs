//! The coordinator service through the bus, on the embedded broker with
//! tokio's paused clock: requests in, group commit, answers and effects out.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use callq_broker::{
    ATTEMPT_HEADER, Broker, COORDINATOR_QUEUE, Consumer, Delivery, Disposition, Message,
    QueueDepth, QueueSpec, call_queue, worker_queue,
};
use callq_broker_embedded::EmbeddedBroker;
use callq_coordinator::{
    CallRecord, Coordinator, CoordinatorOptions, Error, Ledger, MemoryStore, RedbStore,
    SessionLife, SessionRecord, Store,
};
use callq_schemas::protocol::{
    Answer, AnswerBody, ClusterStatus, CompleteDecision, InFlightCall, Lease, Request, RequestBody,
    ResumeDecision, SessionWrite, TraceDecision, WorkerState,
};
use callq_schemas::{Call, Limits, Outcome, Uuid, decode_reply};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const BEAT: Duration = Duration::from_millis(250);

struct Bus {
    broker: Arc<dyn Broker>,
    shutdown: CancellationToken,
}

impl Bus {
    async fn new() -> Self {
        Self::on(Arc::new(EmbeddedBroker::new())).await
    }

    async fn on(broker: Arc<dyn Broker>) -> Self {
        broker
            .declare(&QueueSpec::plain(COORDINATOR_QUEUE))
            .await
            .unwrap();
        broker.declare(&QueueSpec::calls("mail")).await.unwrap();
        Self {
            broker,
            shutdown: CancellationToken::new(),
        }
    }

    fn start<S: Store + 'static>(
        &self,
        store: S,
    ) -> tokio::task::JoinHandle<Result<(), callq_coordinator::Error>> {
        self.start_with(CoordinatorOptions::default(), store)
    }

    fn start_with<S: Store + 'static>(
        &self,
        opts: CoordinatorOptions,
        store: S,
    ) -> tokio::task::JoinHandle<Result<(), callq_coordinator::Error>> {
        let c = Coordinator::new(opts, self.broker.clone(), Ledger::open(store).unwrap());
        tokio::spawn(c.run(self.shutdown.clone()))
    }

    async fn queue(&self, name: &str) -> Box<dyn Consumer> {
        self.broker.declare(&QueueSpec::plain(name)).await.unwrap();
        self.broker.consume(name, 100).await.unwrap()
    }

    async fn send(&self, worker: &str, body: RequestBody) {
        let req = Request {
            v: 1,
            worker_id: worker.into(),
            reply_to: worker_queue(worker),
            expires_ms: None,
            traceparent: None,
            body,
        };
        self.broker
            .publish(COORDINATOR_QUEUE, Message::new(req.to_bytes()))
            .await
            .unwrap();
    }

    async fn heartbeat(&self, worker: &str, in_flight: Vec<InFlightCall>) {
        self.beat(worker, WorkerState::Active, in_flight, &[]).await;
    }

    /// A heartbeat of a worker that owns `partitions` of the mail queue.
    async fn beat(
        &self,
        worker: &str,
        state: WorkerState,
        in_flight: Vec<InFlightCall>,
        partitions: &[u32],
    ) {
        let partitions = if partitions.is_empty() {
            Default::default()
        } else {
            [("mail".to_owned(), partitions.to_vec())].into()
        };
        self.send(
            worker,
            RequestBody::Heartbeat {
                services: vec!["mail".into()],
                state,
                capacity: 8,
                free: 8,
                in_flight,
                partitions,
                finished: Default::default(),
            },
        )
        .await;
    }
}

async fn next(c: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), c.next())
        .await
        .expect("a message within 30 s")
        .unwrap()
        .unwrap()
}

async fn answer(c: &mut Box<dyn Consumer>) -> AnswerBody {
    let d = next(c).await;
    let a: Answer = serde_json::from_slice(&d.body).unwrap();
    d.settle(Disposition::Ack).await.unwrap();
    a.body
}

fn call() -> (Call, Vec<u8>) {
    let mut call = Call::new("mail", "send", json!({"to": "a@b"}));
    call.reply_to = Some("callq.reply.client".into());
    let body = call.to_bytes();
    (call, body)
}

fn lease(call: &Call, copy: u32) -> Lease {
    Lease {
        call_id: call.call_id,
        copy,
        token: Uuid::now_v7(),
    }
}

fn in_flight(call: &Call, lease: Lease, body: &[u8]) -> InFlightCall {
    InFlightCall {
        lease,
        service: "mail".into(),
        reply_to: call.reply_to.clone(),
        body: Some(String::from_utf8(body.to_vec()).unwrap()),
        key: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_worker_s_traceless_call_is_reissued_after_dead_after() {
    let bus = Bus::new().await;
    let _c = bus.start(MemoryStore::default());
    let mut calls = bus.broker.consume(&call_queue("mail"), 10).await.unwrap();
    let (call, body) = call();
    let a = lease(&call, 1);
    bus.heartbeat("A", vec![in_flight(&call, a, &body)]).await;
    let start = tokio::time::Instant::now();
    // Nothing is re-issued while the silence is shorter than 4 intervals.
    assert!(tokio::time::timeout(BEAT * 4, calls.next()).await.is_err());
    let d = next(&mut calls).await;
    let waited = start.elapsed();
    assert!(
        waited > BEAT * 4 && waited <= BEAT * 6,
        "declared dead after {waited:?}"
    );
    assert_eq!(d.body.as_ref(), body.as_slice(), "the same call");
    assert_eq!(d.headers.get(ATTEMPT_HEADER).map(String::as_str), Some("2"));
    assert_eq!(d.attempt(), Ok(2));
    // The re-issued copy claims attempt 2; the original's redelivery is superseded.
    let mut answers = bus.queue(&worker_queue("B")).await;
    let req_id = Uuid::now_v7();
    bus.send(
        "B",
        RequestBody::Resume {
            req_id,
            lease: lease(&call, 2),
            service: "mail".into(),
            call_reply_to: call.reply_to.clone(),
            digest: None,
        },
    )
    .await;
    assert_eq!(
        answer(&mut answers).await,
        AnswerBody::Resume {
            req_id,
            decision: ResumeDecision::Run { attempt: 2 }
        }
    );
    bus.send(
        "B",
        RequestBody::Resume {
            req_id,
            lease: lease(&call, 1),
            service: "mail".into(),
            call_reply_to: None,
            digest: None,
        },
    )
    .await;
    assert_eq!(
        answer(&mut answers).await,
        AnswerBody::Resume {
            req_id,
            decision: ResumeDecision::Superseded { attempt: 2 }
        }
    );
}

/// A dead worker's call of priority 9 is re-issued into its service's high
/// band, where it came from, and not into the call queue.
#[tokio::test(start_paused = true)]
async fn a_high_priority_call_is_reissued_into_the_high_band() {
    let bus = Bus::new().await;
    bus.broker
        .declare(&QueueSpec::high_calls("mail"))
        .await
        .unwrap();
    let _c = bus.start(MemoryStore::default());
    let mut normal = bus.broker.consume(&call_queue("mail"), 10).await.unwrap();
    let mut high = bus
        .broker
        .consume(&callq_broker::high_queue("mail"), 10)
        .await
        .unwrap();
    let (mut call, _) = call();
    call.priority = Some(9);
    let body = call.to_bytes();
    bus.heartbeat("A", vec![in_flight(&call, lease(&call, 1), &body)])
        .await;
    let d = next(&mut high).await;
    assert_eq!(d.body.as_ref(), body.as_slice(), "the same call");
    assert_eq!(d.attempt(), Ok(2));
    assert!(
        tokio::time::timeout(BEAT * 10, normal.next())
            .await
            .is_err(),
        "nothing re-issued into the call queue"
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_keeps_beating_is_never_declared_dead() {
    let bus = Bus::new().await;
    let _c = bus.start(MemoryStore::default());
    let mut calls = bus.broker.consume(&call_queue("mail"), 10).await.unwrap();
    let (call, body) = call();
    let a = lease(&call, 1);
    for _ in 0..40 {
        bus.heartbeat("A", vec![in_flight(&call, a, &body)]).await;
        tokio::time::sleep(BEAT).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(1), calls.next())
            .await
            .is_err(),
        "nothing re-issued"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_worker_s_traced_call_is_answered_fatal_and_stays_fatal() {
    let bus = Bus::new().await;
    let _c = bus.start(MemoryStore::default());
    let mut client = bus.queue("callq.reply.client").await;
    let mut a_answers = bus.queue(&worker_queue("A")).await;
    let (call, body) = call();
    let a = lease(&call, 1);
    bus.heartbeat("A", vec![in_flight(&call, a, &body)]).await;
    let req_id = Uuid::now_v7();
    bus.send(
        "A",
        RequestBody::Trace {
            req_id,
            lease: a,
            attempt: 1,
            kind: "mail.sent".into(),
            service: "mail".into(),
            call_reply_to: call.reply_to.clone(),
            session: None,
            digest: None,
        },
    )
    .await;
    assert_eq!(
        answer(&mut a_answers).await,
        AnswerBody::Trace {
            req_id,
            decision: TraceDecision::Granted
        }
    );
    // A goes silent: the client hears fatal, with the trace.
    let d = next(&mut client).await;
    let reply = decode_reply(&d.body, &Limits::default()).unwrap();
    assert_eq!(
        (reply.call_id, reply.outcome),
        (call.call_id, Outcome::Fatal)
    );
    assert_eq!(
        reply.error.as_ref().unwrap().traces,
        vec!["mail.sent".to_string()]
    );
    // A wakes up: its next trace is refused.
    bus.send(
        "A",
        RequestBody::Trace {
            req_id,
            lease: a,
            attempt: 1,
            kind: "mail.sent".into(),
            service: "mail".into(),
            call_reply_to: None,
            session: None,
            digest: None,
        },
    )
    .await;
    assert!(matches!(
        answer(&mut a_answers).await,
        AnswerBody::Trace {
            decision: TraceDecision::Refused { .. },
            ..
        }
    ));
}

/// The coordinator's status, asked as the operator `op`.
async fn ask_status(bus: &Bus, answers: &mut Box<dyn Consumer>) -> ClusterStatus {
    let req_id = Uuid::now_v7();
    bus.send("op", RequestBody::Status { req_id }).await;
    match answer(answers).await {
        AnswerBody::Status {
            req_id: got,
            status,
        } if got == req_id => status,
        other => panic!("not the status asked for: {other:?}"),
    }
}

/// A heartbeat that claims more calls in flight than its capacity, or a
/// capacity no worker has, is refused whole: the worker is not registered
/// and the ledger holds no record of its calls. One within bounds is taken.
#[tokio::test(start_paused = true)]
async fn a_copy_with_another_body_than_its_call_s_record_is_refused() {
    let bus = Bus::new().await;
    let _c = bus.start(MemoryStore::default());
    let mut answers = bus.queue(&worker_queue("B")).await;
    let (call, _) = call();
    let (first, other) = ("ab".repeat(32), "cd".repeat(32));
    let resume = |copy: u32, digest: &str| RequestBody::Resume {
        req_id: Uuid::now_v7(),
        lease: lease(&call, copy),
        service: "mail".into(),
        call_reply_to: call.reply_to.clone(),
        digest: Some(digest.to_owned()),
    };
    // A redelivery makes the record, which keeps its body's digest.
    bus.send("B", resume(1, &first)).await;
    let AnswerBody::Resume { decision, .. } = answer(&mut answers).await else {
        panic!("not a resume answer");
    };
    assert_eq!(decision, ResumeDecision::Run { attempt: 2 });
    // A copy of the same id with another body: refused, whatever its copy.
    for copy in [1, 2, 3] {
        bus.send("B", resume(copy, &other)).await;
        let AnswerBody::Resume { decision, .. } = answer(&mut answers).await else {
            panic!("not a resume answer");
        };
        assert!(
            matches!(&decision, ResumeDecision::Refused { reason } if reason.contains("another body")),
            "{decision:?}"
        );
    }
    // Its trace too: refused, and the delivery is a spare.
    bus.send(
        "B",
        RequestBody::Trace {
            req_id: Uuid::now_v7(),
            lease: lease(&call, 2),
            attempt: 2,
            kind: "mail.sent".into(),
            service: "mail".into(),
            call_reply_to: None,
            session: None,
            digest: Some(other.clone()),
        },
    )
    .await;
    let AnswerBody::Trace { decision, .. } = answer(&mut answers).await else {
        panic!("not a trace answer");
    };
    assert!(
        matches!(
            decision,
            TraceDecision::Refused {
                superseded: true,
                ..
            }
        ),
        "{decision:?}"
    );
    // A copy with the recorded body goes on as before.
    bus.send("B", resume(2, &first)).await;
    let AnswerBody::Resume { decision, .. } = answer(&mut answers).await else {
        panic!("not a resume answer");
    };
    assert!(
        !matches!(decision, ResumeDecision::Refused { .. }),
        "{decision:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_claiming_more_than_its_capacity_is_refused() {
    let bus = Bus::new().await;
    let _c = bus.start(MemoryStore::default());
    let mut answers = bus.queue(&worker_queue("op")).await;
    let calls: Vec<InFlightCall> = (0..9)
        .map(|_| {
            let (call, body) = call();
            in_flight(&call, lease(&call, 1), &body)
        })
        .collect();
    let beat = |capacity: u32, free: u32, in_flight: Vec<InFlightCall>| RequestBody::Heartbeat {
        services: vec!["mail".into()],
        state: WorkerState::Active,
        capacity,
        free,
        in_flight,
        partitions: Default::default(),
        finished: Default::default(),
    };
    bus.send("ghost", beat(8, 0, calls.clone())).await;
    bus.send("huge", beat(1 << 20, 1 << 20, Vec::new())).await;
    bus.send("slack", beat(8, 9, Vec::new())).await;
    let status = ask_status(&bus, &mut answers).await;
    assert!(status.workers.is_empty(), "{status:?}");
    assert_eq!(status.open_calls, 0, "{status:?}");

    bus.send("honest", beat(9, 0, calls)).await;
    let status = ask_status(&bus, &mut answers).await;
    assert_eq!(status.workers.len(), 1, "{status:?}");
    assert_eq!(status.workers[0].worker_id, "honest");
}

/// A `reply_to` a worker reported for a call (or a forged request carried)
/// that names one of callq's own queues gets no `fatal` answer: the
/// coordinator never publishes into a call queue or the control path.
#[tokio::test(start_paused = true)]
async fn a_fatal_answer_never_goes_to_one_of_callq_s_own_queues() {
    let bus = Bus::new().await;
    let _c = bus.start(MemoryStore::default());
    let mut client = bus.queue("callq.reply.client").await;
    let mut a_answers = bus.queue(&worker_queue("A")).await;
    let (mut hostile, _) = call();
    hostile.reply_to = Some(call_queue("mail"));
    let hostile_body = hostile.to_bytes();
    let (good, good_body) = call();
    let (h, g) = (lease(&hostile, 1), lease(&good, 1));
    bus.heartbeat(
        "A",
        vec![
            in_flight(&hostile, h, &hostile_body),
            in_flight(&good, g, &good_body),
        ],
    )
    .await;
    for (call, l) in [(&hostile, h), (&good, g)] {
        let req_id = Uuid::now_v7();
        bus.send(
            "A",
            RequestBody::Trace {
                req_id,
                lease: l,
                attempt: 1,
                kind: "mail.sent".into(),
                service: "mail".into(),
                call_reply_to: call.reply_to.clone(),
                session: None,
                digest: None,
            },
        )
        .await;
        assert_eq!(
            answer(&mut a_answers).await,
            AnswerBody::Trace {
                req_id,
                decision: TraceDecision::Granted
            }
        );
    }
    // A goes silent: both calls fail; only the legal reply queue hears it.
    let d = next(&mut client).await;
    let reply = decode_reply(&d.body, &Limits::default()).unwrap();
    assert_eq!(
        (reply.call_id, reply.outcome),
        (good.call_id, Outcome::Fatal)
    );
    // A request answered after that death was handled: its effects are out.
    let req_id = Uuid::now_v7();
    bus.send(
        "A",
        RequestBody::Trace {
            req_id,
            lease: h,
            attempt: 1,
            kind: "mail.sent".into(),
            service: "mail".into(),
            call_reply_to: None,
            session: None,
            digest: None,
        },
    )
    .await;
    assert!(matches!(
        answer(&mut a_answers).await,
        AnswerBody::Trace {
            decision: TraceDecision::Refused { .. },
            ..
        }
    ));
    assert_eq!(
        bus.broker.depth(&call_queue("mail")).await.unwrap(),
        QueueDepth::default(),
        "nothing was published into the call queue"
    );
}

#[tokio::test(start_paused = true)]
async fn decisions_survive_a_coordinator_restart() {
    let dir = std::env::temp_dir().join(format!("callq-coord-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ledger.redb");
    let bus = Bus::new().await;
    let first = bus.start(RedbStore::open(&path).unwrap());
    let mut client = bus.queue("callq.reply.client").await;
    let mut answers = bus.queue(&worker_queue("A")).await;
    let (call, body) = call();
    let a = lease(&call, 1);
    bus.heartbeat("A", vec![in_flight(&call, a, &body)]).await;
    let req_id = Uuid::now_v7();
    bus.send(
        "A",
        RequestBody::Trace {
            req_id,
            lease: a,
            attempt: 1,
            kind: "mail.sent".into(),
            service: "mail".into(),
            call_reply_to: call.reply_to.clone(),
            session: None,
            digest: None,
        },
    )
    .await;
    answer(&mut answers).await;
    let fatal = decode_reply(&next(&mut client).await.body, &Limits::default()).unwrap();
    // The coordinator dies (its task is dropped, as a killed process's would
    // be) and another opens the same store.
    first.abort();
    let _ = first.await;
    let _second = bus.start(RedbStore::open(&path).unwrap());
    let mut b = bus.queue(&worker_queue("B")).await;
    bus.send(
        "B",
        RequestBody::Resume {
            req_id,
            lease: lease(&call, 1),
            service: "mail".into(),
            call_reply_to: None,
            digest: None,
        },
    )
    .await;
    assert_eq!(
        answer(&mut b).await,
        AnswerBody::Resume {
            req_id,
            decision: ResumeDecision::Fatal { reply: fatal }
        }
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn unreadable_requests_are_dropped_and_the_coordinator_serves_on() {
    let bus = Bus::new().await;
    let c = bus.start(MemoryStore::default());
    for bad in [
        &b"nonsense"[..],
        br#"{"v": 9, "worker_id": "x", "reply_to": "q", "type": "leave"}"#,
        br#"{"v": 1, "type": "heartbeat"}"#,
    ] {
        bus.broker
            .publish(COORDINATOR_QUEUE, Message::new(bad.to_vec()))
            .await
            .unwrap();
    }
    let mut answers = bus.queue(&worker_queue("A")).await;
    let (call, _) = call();
    let req_id = Uuid::now_v7();
    bus.send(
        "A",
        RequestBody::Resume {
            req_id,
            lease: lease(&call, 1),
            service: "mail".into(),
            call_reply_to: None,
            digest: None,
        },
    )
    .await;
    assert_eq!(
        answer(&mut answers).await,
        AnswerBody::Resume {
            req_id,
            decision: ResumeDecision::Run { attempt: 2 }
        }
    );
    assert!(!c.is_finished());
    let depth = bus.broker.depth(COORDINATOR_QUEUE).await.unwrap();
    assert_eq!(
        depth.ready + depth.unsettled,
        0,
        "every request was settled"
    );
}

/// The embedded broker, noting the partition each publish names.
struct Partitioned {
    inner: EmbeddedBroker,
    published: Mutex<Vec<(String, Option<u32>)>>,
}

impl Partitioned {
    /// A bus on it, with a coordinator running.
    async fn bus() -> (
        Arc<Self>,
        Bus,
        tokio::task::JoinHandle<Result<(), callq_coordinator::Error>>,
    ) {
        let broker = Arc::new(Self {
            inner: EmbeddedBroker::new(),
            published: Mutex::default(),
        });
        let bus = Bus::on(broker.clone()).await;
        let coordinator = bus.start(MemoryStore::default());
        (broker, bus, coordinator)
    }
}

#[async_trait]
impl Broker for Partitioned {
    fn kind(&self) -> &'static str {
        "partitioned"
    }
    async fn declare(&self, spec: &QueueSpec) -> Result<(), callq_broker::Error> {
        self.inner.declare(spec).await
    }
    async fn publish(&self, queue: &str, message: Message) -> Result<(), callq_broker::Error> {
        self.published
            .lock()
            .unwrap()
            .push((queue.to_owned(), message.partition));
        self.inner.publish(queue, message).await
    }
    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, callq_broker::Error> {
        self.inner.consume(queue, prefetch).await
    }
    async fn depth(&self, queue: &str) -> Result<QueueDepth, callq_broker::Error> {
        self.inner.depth(queue).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_worker_s_call_is_reissued_into_a_partition_a_live_worker_owns() {
    let (broker, bus, _c) = Partitioned::bus().await;
    let mut calls = bus.broker.consume(&call_queue("mail"), 10).await.unwrap();
    let (call, body) = call();
    // A owns partition 0 and dies holding the call; B owns 1 and 2 and
    // lives on; the standby S owns none that counts.
    bus.beat(
        "A",
        WorkerState::Active,
        vec![in_flight(&call, lease(&call, 1), &body)],
        &[0],
    )
    .await;
    let bus = Arc::new(bus);
    let beating = {
        let bus = bus.clone();
        tokio::spawn(async move {
            loop {
                bus.beat("B", WorkerState::Active, Vec::new(), &[1, 2])
                    .await;
                bus.beat("S", WorkerState::Standby, Vec::new(), &[3]).await;
                tokio::time::sleep(BEAT).await;
            }
        })
    };
    let d = next(&mut calls).await;
    beating.abort();
    assert_eq!(d.attempt(), Ok(2));
    let reissues: Vec<Option<u32>> = broker
        .published
        .lock()
        .unwrap()
        .iter()
        .filter(|(q, _)| *q == call_queue("mail"))
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(reissues.len(), 1, "one re-issue: {reissues:?}");
    assert!(
        matches!(reissues[0], Some(1 | 2)),
        "the copy goes into a partition of the live active worker B, not A's 0 or the standby's 3: {reissues:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn without_partitions_a_reissue_names_none() {
    let (broker, bus, _c) = Partitioned::bus().await;
    let mut calls = bus.broker.consume(&call_queue("mail"), 10).await.unwrap();
    let (call, body) = call();
    bus.heartbeat("A", vec![in_flight(&call, lease(&call, 1), &body)])
        .await;
    let d = next(&mut calls).await;
    assert_eq!(d.attempt(), Ok(2));
    let published = broker.published.lock().unwrap().clone();
    assert!(
        published
            .iter()
            .any(|(q, p)| *q == call_queue("mail") && p.is_none()),
        "{published:?}"
    );
}

/// A memory store the test reads while the coordinator writes to it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<MemoryStore>>);

impl Shared {
    fn session(&self, id: &str) -> Option<SessionRecord> {
        self.0.lock().unwrap().get_session(id).unwrap()
    }
}

impl Store for Shared {
    fn get(&self, call_id: Uuid) -> Result<Option<CallRecord>, Error> {
        self.0.lock().unwrap().get(call_id)
    }
    fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>, Error> {
        self.0.lock().unwrap().get_session(session_id)
    }
    fn idle_sessions(
        &self,
        before_ms: i64,
        max: usize,
    ) -> Result<Vec<(String, SessionRecord)>, Error> {
        self.0.lock().unwrap().idle_sessions(before_ms, max)
    }
    fn ended_sessions(&self, before_ms: i64, max: usize) -> Result<Vec<String>, Error> {
        self.0.lock().unwrap().ended_sessions(before_ms, max)
    }
    fn forget_sessions(&mut self, ids: &[String]) -> Result<(), Error> {
        self.0.lock().unwrap().forget_sessions(ids)
    }
    fn put_all(
        &mut self,
        records: &[(Uuid, &CallRecord)],
        sessions: &[(&str, &SessionRecord)],
    ) -> Result<(), Error> {
        self.0.lock().unwrap().put_all(records, sessions)
    }
    fn open_calls(&self) -> Result<Vec<(Uuid, CallRecord)>, Error> {
        self.0.lock().unwrap().open_calls()
    }

    fn forget_decided(&mut self, before_ms: i64, max: usize) -> Result<usize, Error> {
        self.0.lock().unwrap().forget_decided(before_ms, max)
    }
    fn put_delayed(&mut self, calls: &[callq_coordinator::Delayed]) -> Result<(), Error> {
        self.0.lock().unwrap().put_delayed(calls)
    }
    fn due_delayed(
        &self,
        before_ms: i64,
        max: usize,
    ) -> Result<Vec<callq_coordinator::Delayed>, Error> {
        self.0.lock().unwrap().due_delayed(before_ms, max)
    }
    fn parked_delayed(&self, max: usize) -> Result<Vec<callq_coordinator::Delayed>, Error> {
        self.0.lock().unwrap().parked_delayed(max)
    }
    fn get_delayed(&self, call_id: Uuid) -> Result<Option<callq_coordinator::Delayed>, Error> {
        self.0.lock().unwrap().get_delayed(call_id)
    }
    fn forget_delayed(&mut self, call_ids: &[Uuid]) -> Result<(), Error> {
        self.0.lock().unwrap().forget_delayed(call_ids)
    }
    fn delayed_count(&self) -> Result<u64, Error> {
        self.0.lock().unwrap().delayed_count()
    }
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_expire_and_ended_ones_are_forgotten_while_every_worker_lives() {
    let idle = Duration::from_secs(2);
    let forget = Duration::from_secs(10);
    let bus = Arc::new(Bus::new().await);
    let store = Shared::default();
    let opts = CoordinatorOptions {
        session_idle: idle,
        session_forget: forget,
        ..CoordinatorOptions::default()
    };
    let _c = bus.start_with(opts, store.clone());
    let mut answers = bus.queue(&worker_queue("A")).await;
    // A healthy cluster: A beats throughout and nobody dies.
    let beating = {
        let bus = bus.clone();
        tokio::spawn(async move {
            loop {
                bus.heartbeat("A", Vec::new()).await;
                tokio::time::sleep(BEAT).await;
            }
        })
    };
    // Two fast-path calls write a session each; the second closes its own.
    for (session_id, close) in [("idle", false), ("closed", true)] {
        let (call, _) = call();
        let req_id = Uuid::now_v7();
        let write = SessionWrite {
            session_id: session_id.into(),
            base: 0,
            set: [("n".to_owned(), json!(1))].into_iter().collect(),
            close,
        };
        bus.send(
            "A",
            RequestBody::Complete {
                req_id,
                lease: lease(&call, 1),
                attempt: 1,
                reply: None,
                session: Some(write),
            },
        )
        .await;
        assert_eq!(
            answer(&mut answers).await,
            AnswerBody::Complete {
                req_id,
                decision: CompleteDecision::Accepted
            }
        );
    }
    assert_eq!(store.session("idle").unwrap().life, SessionLife::Open);
    assert_eq!(store.session("closed").unwrap().life, SessionLife::Closed);

    // Nobody uses "idle" again: the coordinator expires it on its own.
    tokio::time::sleep(idle + Duration::from_secs(1)).await;
    let expired = store.session("idle").expect("a tombstone stays");
    assert_eq!(
        (expired.life, expired.data.len()),
        (SessionLife::Expired, 0),
        "an idle session expires in the background, its data dropped"
    );
    assert!(store.session("closed").is_some(), "not forgotten yet");

    // Past `session_forget`, both tombstones are forgotten.
    tokio::time::sleep(forget).await;
    assert_eq!(
        store.session("closed"),
        None,
        "a closed session is forgotten after session_forget"
    );
    assert_eq!(store.session("idle"), None, "an expired one too");
    beating.abort();
}
