//! Calls published and every reply recorded, for the fault tests: a
//! recorder that outlives broker restarts, and the check of how the calls
//! ended against the contract.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callq_broker::{Broker, Disposition, Message, QueueSpec, call_queue, reply_queue};
use callq_schemas::{Call, Limits, Outcome, Reply, decode_reply};
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;

/// Publishes calls with confirms, retrying through broker outages, and
/// records every reply that reaches its reply queue, reading it again
/// after each loss of the connection.
pub struct Recorder {
    pub broker: Arc<dyn Broker>,
    reply_to: String,
    replies: Arc<Mutex<HashMap<Uuid, Vec<Reply>>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Recorder {
    pub async fn start(broker: Arc<dyn Broker>) -> Self {
        for service in ["echo", "mail"] {
            broker.declare(&QueueSpec::calls(service)).await.unwrap();
        }
        Self::for_client(broker, &format!("recorder-{}", Uuid::now_v7().simple())).await
    }

    /// A recorder on the reply queue `callq.reply.<id>` that declares no
    /// call queue (a client of the least-privilege set-up may not).
    pub async fn for_client(broker: Arc<dyn Broker>, id: &str) -> Self {
        broker.declare(&QueueSpec::replies(id)).await.unwrap();
        let replies: Arc<Mutex<HashMap<Uuid, Vec<Reply>>>> = Arc::default();
        let reader = tokio::spawn(read_replies(
            broker.clone(),
            reply_queue(id),
            replies.clone(),
        ));
        Self {
            broker,
            reply_to: reply_queue(id),
            replies,
            reader,
        }
    }

    /// Publishes `call` (its `reply_to` set here) until the broker
    /// confirms it.
    pub async fn publish(&self, mut call: Call) -> Uuid {
        call.reply_to = Some(self.reply_to.clone());
        let message = Message::new(call.to_bytes()).key(call.call_id.to_string());
        callq_broker::publish_within(
            self.broker.as_ref(),
            &call_queue(&call.service),
            &message,
            Duration::from_secs(90),
        )
        .await
        .unwrap_or_else(|e| panic!("call {} not confirmed within 90 s: {e}", call.call_id));
        call.call_id
    }

    /// The queue the recorder's calls name as their `reply_to`.
    pub fn reply_to(&self) -> &str {
        &self.reply_to
    }

    pub fn replies(&self) -> HashMap<Uuid, Vec<Reply>> {
        self.replies.lock().unwrap().clone()
    }

    /// Waits until every call of `ids` has a reply; panics naming the
    /// unanswered ones after `timeout`.
    pub async fn wait_answered(&self, ids: &[Uuid], timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            let missing: Vec<Uuid> = {
                let replies = self.replies.lock().unwrap();
                ids.iter()
                    .filter(|id| !replies.contains_key(id))
                    .copied()
                    .collect()
            };
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < until,
                "{} of {} calls got no reply within {timeout:?}, e.g. {:?}",
                missing.len(),
                ids.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One call, published after a fault: how long its first reply took.
    pub async fn call_after(&self, call: Call, timeout: Duration) -> (Reply, Duration) {
        let started = Instant::now();
        let id = self.publish(call).await;
        self.wait_answered(&[id], timeout).await;
        let reply = self.replies()[&id][0].clone();
        (reply, started.elapsed())
    }
}

async fn read_replies(
    broker: Arc<dyn Broker>,
    queue: String,
    replies: Arc<Mutex<HashMap<Uuid, Vec<Reply>>>>,
) {
    loop {
        if let Ok(mut consumer) = broker.consume(&queue, 256).await {
            while let Some(item) = consumer.next().await {
                let Ok(delivery) = item else { continue };
                if let Ok(reply) = decode_reply(&delivery.body, &Limits::default()) {
                    replies
                        .lock()
                        .unwrap()
                        .entry(reply.call_id)
                        .or_default()
                        .push(reply);
                }
                let _ = delivery.settle(Disposition::Ack).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn echo_sleep(ms: u64) -> Call {
    Call::new("echo", "sleep", json!({ "ms": ms }))
}

pub fn mail(outbox: &Path, before_ms: u64) -> Call {
    Call::new(
        "mail",
        "send",
        json!({
            "outbox": outbox.to_str().unwrap(),
            "to": "someone@example.com",
            "subject": "hello",
            "before_ms": before_ms,
        }),
    )
}

/// How the calls ended, checked against the contract: each has replies of
/// one outcome only, a mail line at most once (exactly once for an `ok`
/// mail), `fatal` only for a mail that lists `mail.sent`.
#[derive(Debug, Default)]
pub struct Ended {
    pub by_outcome: BTreeMap<String, usize>,
    pub duplicates: usize,
    pub fatal_mails: usize,
    /// The highest attempt number any reply carried.
    pub highest_attempt: u32,
}

pub fn check(
    replies: &HashMap<Uuid, Vec<Reply>>,
    echo: &[Uuid],
    mails: &[Uuid],
    outbox: &Path,
) -> Ended {
    let lines = mail_lines(outbox);
    let mut ended = Ended::default();
    for (id, is_mail) in echo
        .iter()
        .map(|id| (id, false))
        .chain(mails.iter().map(|id| (id, true)))
    {
        let got = replies
            .get(id)
            .unwrap_or_else(|| panic!("call {id} got no reply"));
        let first = &got[0];
        for r in got {
            assert_eq!(
                r.outcome, first.outcome,
                "call {id} got contradicting replies: {got:?}"
            );
        }
        ended.duplicates += got.len() - 1;
        ended.highest_attempt = got
            .iter()
            .fold(ended.highest_attempt, |m, r| m.max(r.attempt));
        *ended
            .by_outcome
            .entry(format!("{:?}", first.outcome))
            .or_default() += 1;
        let sent = lines.get(id).copied().unwrap_or(0);
        assert!(sent <= 1, "mail {id} was sent {sent} times");
        match first.outcome {
            Outcome::Ok if is_mail => assert_eq!(sent, 1, "mail {id} answered ok, not sent"),
            Outcome::Ok => {}
            Outcome::Fatal => {
                assert!(is_mail, "traceless call {id} ended fatal: {first:?}");
                let traces = &first.error.as_ref().unwrap().traces;
                assert!(
                    traces.iter().any(|t| t == "mail.sent"),
                    "fatal without a granted trace: {first:?}"
                );
                ended.fatal_mails += 1;
            }
            other => panic!("call {id} ended {other:?}: {first:?}"),
        }
    }
    ended
}

pub fn mail_lines(outbox: &Path) -> HashMap<Uuid, usize> {
    let text = std::fs::read_to_string(outbox).unwrap_or_default();
    let mut lines = HashMap::new();
    for line in text.lines() {
        let id: Uuid = line.split('\t').next().unwrap().parse().unwrap();
        *lines.entry(id).or_default() += 1;
    }
    lines
}

/// Publishes `calls` one after another, `gap` apart, in the background;
/// the ids of the confirmed ones, in order.
pub fn publish_in_background(
    recorder: &Arc<Recorder>,
    calls: Vec<Call>,
    gap: Duration,
) -> tokio::task::JoinHandle<Vec<Uuid>> {
    let recorder = recorder.clone();
    tokio::spawn(async move {
        let mut ids = Vec::with_capacity(calls.len());
        for call in calls {
            ids.push(recorder.publish(call).await);
            tokio::time::sleep(gap).await;
        }
        ids
    })
}

/// `n` calls, one in four a `mail.send` (to `outbox`, 20 ms before its
/// trace) and the rest `echo.sleep` of 50 ms.
pub fn mixed(outbox: &Path, n: usize) -> Vec<Call> {
    (0..n)
        .map(|i| {
            if i % 4 == 0 {
                mail(outbox, 20)
            } else {
                echo_sleep(50)
            }
        })
        .collect()
}

/// Sorts the ids of a [`mixed`] load, in publish order, into `echo` and
/// `mails`.
pub fn sort_mixed(ids: Vec<Uuid>, echo: &mut Vec<Uuid>, mails: &mut Vec<Uuid>) {
    for (i, id) in ids.into_iter().enumerate() {
        if i % 4 == 0 {
            mails.push(id);
        } else {
            echo.push(id);
        }
    }
}

/// After a fault that ended at `back`: a new call answered `ok` within
/// `within` of it (up to 90 s for the call itself), with the figures
/// printed under `what`.
pub async fn serves_again(recorder: &Recorder, what: &str, back: Instant, within: Duration) {
    let (reply, took) = recorder
        .call_after(echo_sleep(0), Duration::from_secs(90))
        .await;
    assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    let serving = back.elapsed();
    eprintln!(
        "{what}: a new call answered {:.1} s after the broker was back (itself {:.2} s)",
        serving.as_secs_f64(),
        took.as_secs_f64()
    );
    assert!(
        serving < within,
        "the cluster took {serving:?} to serve again"
    );
}
