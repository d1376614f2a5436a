//! The workload: a seeded mix of calls, published with confirms through
//! broker outages, and every reply recorded (all of them, not only the
//! first: a second reply with another outcome breaks the contract).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use callq_broker::{Broker, Disposition, Message, QueueSpec, call_queue, reply_queue};
use callq_schemas::{Call, Limits, Reply, Uuid, decode_reply};
use futures::StreamExt as _;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::check::{Kind, Sent};
use super::rng::Rng;

/// How long a publish may retry through a broker outage before the call
/// counts as unconfirmed.
const PUBLISH_WITHIN: Duration = Duration::from_secs(90);

/// The services a workload mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Mix {
    /// `echo.sleep`, 0-50 ms: traceless.
    Echo,
    /// `mail.send` into the run's outbox file: a non-exact trace.
    Mail,
    /// `bank.transfer` between the run's accounts: an exact trace
    /// (PostgreSQL, `CALLQ_POSTGRES`).
    Bank,
    /// `counter.add` on the run's sessions.
    Counter,
}

impl Mix {
    pub(super) fn service(self) -> &'static str {
        match self {
            Mix::Echo => "echo",
            Mix::Mail => "mail",
            Mix::Bank => "bank",
            Mix::Counter => "counter",
        }
    }
}

/// The run's names and sizes.
#[derive(Debug, Clone)]
pub(super) struct Names {
    /// Unique to the run and seed: accounts and sessions carry it.
    pub(super) tag: String,
    pub(super) outbox: String,
    pub(super) accounts: usize,
    pub(super) sessions: usize,
}

impl Names {
    pub(super) fn account(&self, i: usize) -> String {
        format!("{}-a{i}", self.tag)
    }

    pub(super) fn session(&self, i: usize) -> String {
        format!("{}-s{i}", self.tag)
    }
}

/// The calls of a seed, made up front: the same seed makes the same calls.
pub(super) fn plan(rng: &mut Rng, mix: &[Mix], calls: usize, names: &Names) -> Vec<(Call, Kind)> {
    (0..calls)
        .map(|i| {
            let pick = mix[rng.below(mix.len())];
            let (call, kind) = match pick {
                Mix::Echo => (
                    Call::new("echo", "sleep", json!({ "ms": rng.below(51) })),
                    Kind::Echo,
                ),
                Mix::Mail => (
                    Call::new(
                        "mail",
                        "send",
                        json!({
                            "outbox": names.outbox,
                            "to": format!("user{i}@verify.invalid"),
                            "subject": "verify",
                            "before_ms": rng.below(51),
                            "after_ms": rng.below(51),
                        }),
                    ),
                    Kind::Mail,
                ),
                Mix::Bank => {
                    let from = rng.below(names.accounts);
                    let to = (from + 1 + rng.below(names.accounts - 1)) % names.accounts;
                    let cents = 1 + rng.below(50) as i64;
                    let args = json!({
                        "from": names.account(from),
                        "to": names.account(to),
                        "cents": cents,
                    });
                    (
                        Call::new("bank", "transfer", args),
                        Kind::Bank { from, to, cents },
                    )
                }
                Mix::Counter => {
                    let session = rng.below(names.sessions);
                    let n = 1 + rng.below(9) as i64;
                    let mut call = Call::new("counter", "add", json!({ "n": n }));
                    call.session_id = Some(names.session(session));
                    (call, Kind::Counter { session, n })
                }
            };
            (call, kind)
        })
        .collect()
}

#[derive(Default)]
struct Book {
    replies: HashMap<Uuid, Vec<Reply>>,
    /// Calls published and not answered yet.
    outstanding: HashSet<Uuid>,
}

/// Publishes calls and records their replies, on a reply queue of its own
/// that it reads again after each loss of the connection.
pub(super) struct Recorder {
    broker: Arc<dyn Broker>,
    reply_to: String,
    book: Arc<Mutex<Book>>,
    /// Free places among the calls in flight.
    room: Arc<Semaphore>,
    reader: tokio::task::JoinHandle<()>,
    /// Calls published so far (confirmed or not).
    pub(super) published: Arc<AtomicUsize>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Recorder {
    pub(super) async fn start(
        broker: Arc<dyn Broker>,
        services: &[&str],
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        for service in services {
            broker
                .declare(&QueueSpec::calls(service))
                .await
                .with_context(|| format!("declaring {}", call_queue(service)))?;
        }
        let id = format!("verify-{}", Uuid::now_v7().simple());
        broker
            .declare(&QueueSpec::replies(&id))
            .await
            .context("declaring the reply queue")?;
        let book: Arc<Mutex<Book>> = Arc::default();
        let room = Arc::new(Semaphore::new(concurrency.max(1)));
        let reader = tokio::spawn(read(
            broker.clone(),
            reply_queue(&id),
            book.clone(),
            room.clone(),
        ));
        Ok(Self {
            broker,
            reply_to: reply_queue(&id),
            book,
            room,
            reader,
            published: Arc::default(),
        })
    }

    /// Publishes `call` once there is room among the calls in flight;
    /// whether the broker confirmed it.
    pub(super) async fn publish(&self, mut call: Call) -> bool {
        if let Ok(permit) = self.room.clone().acquire_owned().await {
            // The reader gives the place back when the reply comes.
            permit.forget();
        }
        call.reply_to = Some(self.reply_to.clone());
        let id = call.call_id;
        self.book.lock().map(|mut b| b.outstanding.insert(id)).ok();
        self.published.fetch_add(1, Ordering::Relaxed);
        let message = Message::new(call.to_bytes()).key(id.to_string());
        let queue = call_queue(&call.service);
        let sent =
            callq_broker::publish_within(self.broker.as_ref(), &queue, &message, PUBLISH_WITHIN)
                .await;
        if let Err(e) = &sent {
            tracing::warn!(call_id = %id, "a call was not confirmed within {PUBLISH_WITHIN:?}: {e}");
        }
        sent.is_ok()
    }

    /// Publishes `call` and waits for its first reply.
    pub(super) async fn call(&self, call: Call, within: Duration) -> anyhow::Result<Reply> {
        let id = call.call_id;
        let what = format!("{}.{}", call.service, call.method);
        anyhow::ensure!(
            self.publish(call).await,
            "{what}: the broker did not confirm it"
        );
        let until = Instant::now() + within;
        loop {
            if let Some(r) = self.reply(id) {
                return Ok(r);
            }
            anyhow::ensure!(Instant::now() < until, "{what}: no reply within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first reply to `id`, if any came.
    pub(super) fn reply(&self, id: Uuid) -> Option<Reply> {
        let book = self.book.lock().ok()?;
        book.replies.get(&id).and_then(|r| r.first()).cloned()
    }

    /// Calls published and not answered yet.
    pub(super) fn in_flight(&self) -> usize {
        self.book.lock().map_or(0, |b| b.outstanding.len())
    }

    /// Every reply so far.
    pub(super) fn replies(&self) -> HashMap<Uuid, Vec<Reply>> {
        self.book
            .lock()
            .map(|b| b.replies.clone())
            .unwrap_or_default()
    }
}

async fn read(
    broker: Arc<dyn Broker>,
    queue: String,
    book: Arc<Mutex<Book>>,
    room: Arc<Semaphore>,
) {
    let mut backoff =
        callq_broker::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        if let Ok(mut consumer) = broker.consume(&queue, 512).await {
            backoff.reset();
            while let Some(item) = consumer.next().await {
                let Ok(delivery) = item else { continue };
                if let Ok(reply) = decode_reply(&delivery.body, &Limits::default())
                    && let Ok(mut b) = book.lock()
                {
                    if b.outstanding.remove(&reply.call_id) {
                        room.add_permits(1);
                    }
                    b.replies.entry(reply.call_id).or_default().push(reply);
                }
                let _ = delivery.settle(Disposition::Ack).await;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Publishes the planned calls in order (at most `rate` a second, 0: as
/// fast as the room among calls in flight allows).
pub(super) async fn drive(
    recorder: Arc<Recorder>,
    planned: Vec<(Call, Kind)>,
    rate: u32,
) -> Vec<Sent> {
    let pace = (rate > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    // Publishes overlap (each waits for its confirm), in any order: one
    // whose confirm is slow (its channel died with a broker restart) holds
    // up no other. The room among calls in flight bounds them.
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let pacer = tokio::spawn(async move {
        let mut pace = pace;
        for planned in planned {
            if let Some(t) = pace.as_mut() {
                t.tick().await;
            }
            if tx.send(planned).await.is_err() {
                break;
            }
        }
    });
    let sent = tokio_stream_of(rx)
        .map(|(call, kind): (Call, Kind)| {
            let recorder = recorder.clone();
            async move {
                let call_id = call.call_id;
                let confirmed = recorder.publish(call).await;
                Sent {
                    call_id,
                    kind,
                    confirmed,
                }
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let _ = pacer.await;
    sent
}

/// The receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

/// The lines of the mail outbox file, per call.
pub(super) fn mail_lines(outbox: &Path) -> HashMap<Uuid, usize> {
    let text = std::fs::read_to_string(outbox).unwrap_or_default();
    let mut lines = HashMap::new();
    for id in text
        .lines()
        .filter_map(|l| l.split('\t').next()?.parse().ok())
    {
        *lines.entry(id).or_default() += 1;
    }
    lines
}
