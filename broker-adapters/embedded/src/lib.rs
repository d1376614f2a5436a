//! The embedded broker of callq: bounded in-process queues with the
//! semantics of RabbitMQ quorum queues.
//!
//! [`EmbeddedBroker`] implements [`callq_broker::Broker`] for one process:
//! `callq demo`, the in-process cluster tests and single-machine setups. It
//! gives the seven guarantees of the contract (pinned by the
//! `callq-conformance` suite, see `tests/conformance.rs`) and behaves like a
//! RabbitMQ quorum queue declared with `x-max-length`,
//! `x-overflow: reject-publish`, `x-delivery-limit` and a dead-letter queue:
//!
//! | | embedded |
//! |---|---|
//! | confirm | [`Broker::publish`] returns `Ok` once the message is stored |
//! | queue length | ready and unsettled messages count; a publish beyond [`QueueSpec::max_length`] fails with [`Error::QueueFull`] |
//! | undeclared queue | [`Error::NoSuchQueue`] on publish, consume and depth |
//! | prefetch | a consumer holds at most `prefetch` unsettled deliveries; nothing is buffered on the consumer's side |
//! | redelivery | on consumer drop and on [`Disposition::Requeue`]: back to the head of the queue, in delivery order, `redelivered` set, count + 1 |
//! | release | [`Disposition::Release`]: to the back of the queue, with the `callq-released` header (so `redelivered` is set), count unchanged |
//! | delivery limit | a message whose count would exceed the limit moves with reason `delivery_limit` to the limit queue ([`QueueSpec::limit_dead_letter`], declared first) or else the dead-letter queue (the 2nd, 3rd, 4th deliveries under `x-delivery-limit: 3` carry counts 1, 2, 3) |
//! | dead-letter queue | declared along with its queue, with the same maximum length; when full it drops its oldest ready message (RabbitMQ's `drop-head`) |
//! | lost lease | settling a delivery of a dropped consumer fails with [`Error::LeaseLost`] and changes nothing |
//!
//! # Where the contract leaves the choice
//!
//! - A queue declared without a maximum length gets
//!   [`Options::default_max_length`]: every embedded queue is bounded.
//! - Declaring an existing queue with another spec keeps the first spec and
//!   logs a warning (RabbitMQ would refuse with `PRECONDITION_FAILED`; the
//!   contract has no error for it).
//! - A prefetch of 0 holds one delivery (AMQP reads 0 as unlimited, which
//!   is unbounded).
//! - A dead letter arrives as a first delivery (count 0) with its headers
//!   and [`DEAD_REASON_HEADER`]. When the dead-letter queue is full of
//!   unsettled messages only, nothing can be dropped from its head, so the
//!   dead letter itself is dropped with a warning. A queue named as its own
//!   dead-letter queue drops its dead letters with a warning.
//! - Dropping a [`Delivery`] without settling keeps its lease until its
//!   consumer is dropped, as on AMQP.
//! - A consumer never ends: [`Consumer::next`] never gives `None`, and there
//!   is no shutdown ([`Error::Closed`] is never returned).
//!
//! # Costs
//!
//! Every queue has its own lock; the broker-wide map of queues is only
//! written by [`Broker::declare`]. Publish, deliver and settle are O(1)
//! (returning a dropped consumer's deliveries is O(k log k) in their number,
//! at most its prefetch). No lock is held across an `.await`; consumers wait
//! on [`tokio::sync::Notify`], never by polling.
//!
//! Queues, consumers and leases share their state through `Arc`s, so dropping
//! the [`EmbeddedBroker`] handle while consumers or deliveries live is fine:
//! they keep working on the queues they hold.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use async_trait::async_trait;
use callq_broker::{
    Broker, Bytes, Consumer, DEAD_REASON_HEADER, Delivery, Disposition, Error, Headers, Message,
    QueueDepth, QueueSpec, Settle, Tap, TapEvent, Tapped,
};
use tokio::sync::{Notify, mpsc};

/// Messages a queue declared without [`QueueSpec::max_length`] holds at most,
/// unless [`Options::default_max_length`] says otherwise.
pub const DEFAULT_MAX_LENGTH: usize = 1_000_000;

/// The reason a message past its queue's delivery limit is dead-lettered
/// with, in [`DEAD_REASON_HEADER`] (RabbitMQ's `x-death` reason).
pub const DELIVERY_LIMIT_REASON: &str = "delivery_limit";

/// Options of an [`EmbeddedBroker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The maximum length of a queue declared without one: every embedded
    /// queue is bounded.
    pub default_max_length: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            default_max_length: DEFAULT_MAX_LENGTH,
        }
    }
}

/// The embedded broker: in-process queues. Cheap to clone; clones share the
/// queues.
#[derive(Clone, Default)]
pub struct EmbeddedBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues = self
            .inner
            .queues
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("EmbeddedBroker")
            .field("options", &self.inner.options)
            .field("queues", &queues)
            .finish()
    }
}

#[derive(Default)]
struct Inner {
    options: Options,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Open taps, each a bounded queue of copies; `tapped` says whether
    /// there is one, so that a publish without taps does not lock.
    taps: Mutex<Vec<mpsc::Sender<Tapped>>>,
    tapped: AtomicBool,
    /// Copies taps missed, for a warning now and then.
    missed: std::sync::atomic::AtomicU64,
}

/// Copies of every message published to an [`EmbeddedBroker`], taken as it
/// is stored, for `callq capture`.
pub struct EmbeddedTap {
    rx: mpsc::Receiver<Tapped>,
}

#[async_trait]
impl Tap for EmbeddedTap {
    async fn next(&mut self) -> Option<Result<TapEvent, Error>> {
        self.rx.recv().await.map(|t| Ok(TapEvent::Message(t)))
    }
}

impl EmbeddedBroker {
    /// A broker with no queues and the default [`Options`].
    pub fn new() -> Self {
        Self::with_options(Options::default())
    }

    /// A broker with no queues.
    pub fn with_options(options: Options) -> Self {
        Self {
            inner: Arc::new(Inner {
                options,
                ..Inner::default()
            }),
        }
    }

    /// Opens a tap: a copy of every message published from now on, at most
    /// `bound` waiting. When the tap falls that far behind, it misses
    /// copies; the queues and their consumers never notice.
    pub fn tap(&self, bound: usize) -> EmbeddedTap {
        let (tx, rx) = mpsc::channel(bound.max(1));
        self.inner
            .taps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        self.inner.tapped.store(true, Ordering::Release);
        EmbeddedTap { rx }
    }

    fn copy_to_taps(&self, queue: &str, message: &Message) {
        let mut taps = self
            .inner
            .taps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_millis()).ok());
        taps.retain(|tap| {
            let copy = Tapped {
                queue: queue.to_owned(),
                headers: message.headers.clone(),
                body: message.body.clone(),
                timestamp_ms,
                partition: None,
                offset: None,
            };
            match tap.try_send(copy) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let missed = self.inner.missed.fetch_add(1, Ordering::Relaxed);
                    if missed.is_multiple_of(1000) {
                        tracing::warn!(
                            queue,
                            missed = missed + 1,
                            "a tap is full: its capture misses copies"
                        );
                    }
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if taps.is_empty() {
            self.inner.tapped.store(false, Ordering::Release);
        }
    }

    fn queue(&self, name: &str) -> Result<Arc<Queue>, Error> {
        self.inner
            .queues
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NoSuchQueue(name.to_owned()))
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), Error> {
        // The queue past the limit first: it is looked up below.
        let past_limit = match spec.limit_dead_letter_spec()? {
            Some(past) => {
                self.declare(&past).await?;
                Some(self.queue(&past.name)?)
            }
            None => None,
        };
        let max_length = spec
            .max_length
            .unwrap_or(self.inner.options.default_max_length);
        let mut queues = self
            .inner
            .queues
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = queues.get(&spec.name) {
            if existing.spec != *spec {
                tracing::warn!(
                    queue = %spec.name,
                    declared = ?existing.spec,
                    requested = ?spec,
                    "queue already declared with another spec: keeping the first"
                );
            }
            return Ok(());
        }
        let dead = match &spec.dead_letter {
            None => None,
            Some(name) if *name == spec.name => {
                tracing::warn!(
                    queue = %spec.name,
                    "a queue cannot be its own dead-letter queue: its dead letters will be dropped"
                );
                None
            }
            Some(name) => Some(Arc::clone(queues.entry(name.clone()).or_insert_with(
                || {
                    let dead_spec = QueueSpec {
                        max_length: Some(max_length),
                        ..QueueSpec::plain(name.clone())
                    };
                    Arc::new(Queue::new(dead_spec, max_length, None, None))
                },
            ))),
        };
        let past_limit = past_limit.or_else(|| dead.clone());
        queues.insert(
            spec.name.clone(),
            Arc::new(Queue::new(spec.clone(), max_length, dead, past_limit)),
        );
        Ok(())
    }

    async fn publish(&self, queue: &str, message: Message) -> Result<(), Error> {
        if !self.inner.tapped.load(Ordering::Acquire) {
            return self.queue(queue)?.publish(message);
        }
        let copy = message.clone();
        self.queue(queue)?.publish(message)?;
        self.copy_to_taps(queue, &copy);
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>, Error> {
        Ok(Box::new(Queue::consumer(&self.queue(queue)?, prefetch)))
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        Ok(self.queue(queue)?.depth())
    }

    async fn consumers(&self, queue: &str) -> Result<Option<u64>, Error> {
        Ok(Some(match self.queue(queue) {
            Ok(q) => q.lock().consumers.len() as u64,
            Err(Error::NoSuchQueue(_)) => 0,
            Err(e) => return Err(e),
        }))
    }
}

/// One queue: its messages, its consumers' leases, and the notifications
/// that wake its consumers.
struct Queue {
    spec: QueueSpec,
    max_length: usize,
    /// Where dead letters go; `None`: they are dropped.
    dead: Option<Arc<Queue>>,
    /// Where messages past the delivery limit go: the limit queue, else
    /// `dead`.
    past_limit: Option<Arc<Queue>>,
    state: Mutex<State>,
    /// Woken once per message that becomes ready; only consumers with room
    /// under their prefetch wait on it.
    ready: Notify,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Stored>,
    /// Unsettled deliveries over all consumers.
    unsettled: usize,
    /// Live consumers by id, each with its unsettled deliveries by tag.
    consumers: HashMap<u64, Leases>,
    next_consumer: u64,
    next_tag: u64,
}

#[derive(Default)]
struct Leases {
    held: HashMap<u64, Stored>,
}

/// A message in a queue.
struct Stored {
    body: Bytes,
    headers: Headers,
    /// Deliveries before the next one.
    delivery_count: u32,
}

/// What to do with a message that leaves a consumer without an `Ack`.
enum Returned {
    /// It went back to the head of the queue.
    Ready,
    /// It is past the delivery limit: move it on (outside the lock).
    PastLimit(Stored),
    /// A consumer dead-lettered it: move it on (outside the lock).
    Dead(Stored),
}

impl Queue {
    fn new(
        spec: QueueSpec,
        max_length: usize,
        dead: Option<Arc<Queue>>,
        past_limit: Option<Arc<Queue>>,
    ) -> Self {
        Self {
            spec,
            max_length,
            dead,
            past_limit,
            state: Mutex::default(),
            ready: Notify::new(),
        }
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    /// Never poisoned in practice: no code panics while holding it. Should
    /// it be, the state is still consistent (every update is a few field
    /// writes without panicking calls in between), so carry on.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, message: Message) -> Result<(), Error> {
        {
            let mut state = self.lock();
            if state.ready.len() + state.unsettled >= self.max_length {
                return Err(Error::QueueFull {
                    queue: self.name().to_owned(),
                    max: self.max_length,
                });
            }
            state.ready.push_back(Stored {
                body: message.body,
                headers: message.headers,
                delivery_count: 0,
            });
        }
        self.ready.notify_one();
        Ok(())
    }

    fn depth(&self) -> QueueDepth {
        let state = self.lock();
        QueueDepth {
            ready: state.ready.len() as u64,
            unsettled: state.unsettled as u64,
        }
    }

    fn consumer(queue: &Arc<Queue>, prefetch: u16) -> EmbeddedConsumer {
        let id = {
            let mut state = queue.lock();
            let id = state.next_consumer;
            state.next_consumer += 1;
            state.consumers.insert(id, Leases::default());
            id
        };
        EmbeddedConsumer {
            queue: Arc::clone(queue),
            id,
            // A prefetch of 0 would deliver nothing (AMQP reads it as
            // "unlimited", which is unbounded): hold at most one.
            prefetch: usize::from(prefetch.max(1)),
            room: Arc::new(Notify::new()),
        }
    }

    /// Takes a message out of `message`'s lease, counting the delivery, and
    /// returns it to the head of the ready list, or hands it back for the
    /// dead-letter queue when it is past the delivery limit. The caller holds
    /// the lock and wakes a consumer for each `Returned::Ready`.
    fn give_back(&self, state: &mut State, mut message: Stored) -> Returned {
        state.unsettled -= 1;
        message.delivery_count = message.delivery_count.saturating_add(1);
        match self.spec.delivery_limit {
            Some(limit) if message.delivery_count > limit => {
                message.headers.insert(
                    DEAD_REASON_HEADER.to_owned(),
                    DELIVERY_LIMIT_REASON.to_owned(),
                );
                Returned::PastLimit(message)
            }
            _ => {
                state.ready.push_front(message);
                Returned::Ready
            }
        }
    }

    /// Moves a message on to the queue it goes to past the limit (`past`)
    /// or as a dead letter. Call without holding this queue's lock (queues
    /// may dead-letter into each other).
    fn dead_letter(&self, message: Stored, past: bool) {
        let reason = message
            .headers
            .get(DEAD_REASON_HEADER)
            .map(String::as_str)
            .unwrap_or_default();
        let to = if past { &self.past_limit } else { &self.dead };
        let Some(dead) = to else {
            tracing::warn!(
                queue = %self.name(),
                reason,
                "dead letter dropped: the queue has no dead-letter queue"
            );
            return;
        };
        {
            let mut state = dead.lock();
            if state.ready.len() + state.unsettled >= dead.max_length {
                if state.ready.pop_front().is_some() {
                    tracing::warn!(
                        queue = %dead.name(),
                        max = dead.max_length,
                        "dead-letter queue full: dropped its oldest message"
                    );
                } else {
                    tracing::warn!(
                        queue = %dead.name(),
                        from = %self.name(),
                        reason,
                        max = dead.max_length,
                        "dead-letter queue full of unsettled messages: dead letter dropped"
                    );
                    return;
                }
            }
            let mut headers = message.headers;
            // A new message there: counted afresh, not a released copy.
            headers.remove(callq_broker::RELEASED_HEADER);
            state.ready.push_back(Stored {
                delivery_count: 0,
                headers,
                ..message
            });
        }
        dead.ready.notify_one();
    }

    /// Applies a disposition to a lease: the one place where the embedded
    /// broker maps a [`Disposition`].
    fn settle(&self, consumer: u64, tag: u64, disposition: Disposition) -> Result<(), Error> {
        let returned = {
            let mut state = self.lock();
            let mut message = state
                .consumers
                .get_mut(&consumer)
                .and_then(|leases| leases.held.remove(&tag))
                .ok_or(Error::LeaseLost)?;
            match disposition {
                Disposition::Ack => {
                    state.unsettled -= 1;
                    return Ok(());
                }
                Disposition::Requeue => self.give_back(&mut state, message),
                Disposition::Release => {
                    state.unsettled -= 1;
                    message.headers.insert(
                        callq_broker::RELEASED_HEADER.to_owned(),
                        message.delivery_count.to_string(),
                    );
                    state.ready.push_back(message);
                    Returned::Ready
                }
                Disposition::DeadLetter { reason } => {
                    state.unsettled -= 1;
                    message
                        .headers
                        .insert(DEAD_REASON_HEADER.to_owned(), reason);
                    Returned::Dead(message)
                }
            }
        };
        match returned {
            Returned::Ready => self.ready.notify_one(),
            Returned::PastLimit(message) => self.dead_letter(message, true),
            Returned::Dead(message) => self.dead_letter(message, false),
        }
        Ok(())
    }

    /// Ends a consumer's leases: its unsettled deliveries return to the head
    /// of the queue in the order they were delivered.
    fn close(&self, consumer: u64) {
        let mut dead = Vec::new();
        let mut returned = 0;
        {
            let mut state = self.lock();
            let Some(leases) = state.consumers.remove(&consumer) else {
                return;
            };
            let mut held: Vec<_> = leases.held.into_iter().collect();
            held.sort_unstable_by_key(|(tag, _)| *tag);
            // Last delivered first, so that the first delivered ends at the head.
            for (_, message) in held.into_iter().rev() {
                match self.give_back(&mut state, message) {
                    Returned::Ready => returned += 1,
                    Returned::PastLimit(message) | Returned::Dead(message) => dead.push(message),
                }
            }
        }
        for _ in 0..returned {
            self.ready.notify_one();
        }
        // Dead letters in delivery order.
        for message in dead.into_iter().rev() {
            self.dead_letter(message, true);
        }
    }
}

/// A consumer of an embedded queue. Dropping it returns its unsettled
/// deliveries to the head of the queue. It never ends: [`Consumer::next`]
/// never gives `None`.
struct EmbeddedConsumer {
    queue: Arc<Queue>,
    id: u64,
    prefetch: usize,
    /// Woken when one of this consumer's deliveries is settled.
    room: Arc<Notify>,
}

/// Why a consumer cannot take a message now.
enum Wait {
    /// It holds `prefetch` unsettled deliveries.
    Room,
    /// No message is ready.
    Ready,
}

impl EmbeddedConsumer {
    /// Takes the next ready message if the prefetch allows; never waits.
    fn try_next(&self) -> Result<Delivery, Wait> {
        let mut state = self.queue.lock();
        let State {
            ready,
            unsettled,
            consumers,
            next_tag,
            ..
        } = &mut *state;
        let Some(leases) = consumers.get_mut(&self.id) else {
            // Unreachable: the consumer leaves the map only when dropped.
            return Err(Wait::Ready);
        };
        if leases.held.len() >= self.prefetch {
            return Err(Wait::Room);
        }
        let message = ready.pop_front().ok_or(Wait::Ready)?;
        let tag = *next_tag;
        *next_tag += 1;
        *unsettled += 1;
        let delivery = Delivery::new(
            message.body.clone(),
            message.headers.clone(),
            message.delivery_count > 0
                || message.headers.contains_key(callq_broker::RELEASED_HEADER),
            message.delivery_count,
            self.queue.name().to_owned(),
            Box::new(Lease {
                queue: Arc::clone(&self.queue),
                consumer: self.id,
                tag,
                room: Arc::clone(&self.room),
            }),
        );
        leases.held.insert(tag, message);
        let more = !ready.is_empty();
        drop(state);
        if more {
            // Pass the baton: another waiting consumer may take the next one.
            self.queue.ready.notify_one();
        }
        Ok(delivery)
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        loop {
            match self.try_next() {
                Ok(delivery) => return Some(Ok(delivery)),
                // Only this consumer's settles make room; one that happens
                // before the wait leaves a permit, so nothing is missed.
                Err(Wait::Room) => {
                    self.room.notified().await;
                    continue;
                }
                Err(Wait::Ready) => {}
            }
            // Consumers share `ready`, and a wake-up sent while nobody waits
            // leaves one permit however many were sent: register before
            // looking again, so that a publish in between wakes this one.
            // Only a consumer with room registers, so none swallows a
            // wake-up that another could use; one cancelled after being
            // woken passes the wake-up on (tokio's `Notified` does on drop).
            let mut ready = pin!(self.queue.ready.notified());
            ready.as_mut().enable();
            match self.try_next() {
                Ok(delivery) => return Some(Ok(delivery)),
                Err(Wait::Ready) => ready.await,
                // Room only grows while we wait; try again.
                Err(Wait::Room) => {}
            }
        }
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        self.queue.close(self.id);
    }
}

/// The lease of one delivery.
struct Lease {
    queue: Arc<Queue>,
    consumer: u64,
    tag: u64,
    room: Arc<Notify>,
}

#[async_trait]
impl Settle for Lease {
    async fn settle(self: Box<Self>, disposition: Disposition) -> Result<(), Error> {
        self.queue.settle(self.consumer, self.tag, disposition)?;
        self.room.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;
    use tokio::time::timeout;

    fn msg(body: &'static str) -> Message {
        Message::new(body)
    }

    async fn next(consumer: &mut Box<dyn Consumer>) -> Delivery {
        timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("a delivery within 5 s")
            .expect("consumer open")
            .expect("delivery")
    }

    async fn quiet(consumer: &mut Box<dyn Consumer>) {
        assert!(
            timeout(Duration::from_millis(100), consumer.next())
                .await
                .is_err(),
            "expected no delivery"
        );
    }

    async fn depth(broker: &EmbeddedBroker, queue: &str) -> (u64, u64) {
        let d = broker.depth(queue).await.unwrap();
        (d.ready, d.unsettled)
    }

    #[tokio::test(start_paused = true)]
    async fn declare_is_idempotent_and_declares_the_dead_letter_queue() {
        let b = EmbeddedBroker::new();
        let spec = QueueSpec::plain("q").max_length(7).dead_letter("dlq");
        b.declare(&spec).await.unwrap();
        b.publish("q", msg("a")).await.unwrap();
        b.declare(&spec).await.unwrap();
        assert_eq!(depth(&b, "q").await, (1, 0), "redeclare keeps messages");
        assert_eq!(depth(&b, "dlq").await, (0, 0));
        for _ in 0..7 {
            b.publish("dlq", msg("d")).await.unwrap();
        }
        assert!(matches!(
            b.publish("dlq", msg("d")).await,
            Err(Error::QueueFull { max: 7, .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn undeclared_queue_everywhere() {
        let b = EmbeddedBroker::new();
        assert_eq!(
            b.publish("nope", msg("a")).await,
            Err(Error::NoSuchQueue("nope".into()))
        );
        assert_eq!(
            b.depth("nope").await,
            Err(Error::NoSuchQueue("nope".into()))
        );
        assert!(matches!(
            b.consume("nope", 1).await,
            Err(Error::NoSuchQueue(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn queues_without_max_length_take_the_default() {
        let b = EmbeddedBroker::with_options(Options {
            default_max_length: 2,
        });
        b.declare(&QueueSpec::plain("q")).await.unwrap();
        b.publish("q", msg("a")).await.unwrap();
        b.publish("q", msg("b")).await.unwrap();
        assert_eq!(
            b.publish("q", msg("c")).await,
            Err(Error::QueueFull {
                queue: "q".into(),
                max: 2
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unsettled_messages_count_towards_max_length() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q").max_length(2))
            .await
            .unwrap();
        b.publish("q", msg("a")).await.unwrap();
        b.publish("q", msg("b")).await.unwrap();
        let mut c = b.consume("q", 2).await.unwrap();
        let d = next(&mut c).await;
        assert_eq!(depth(&b, "q").await, (1, 1));
        assert!(b.publish("q", msg("c")).await.is_err());
        d.settle(Disposition::Ack).await.unwrap();
        b.publish("q", msg("c")).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_consumer_returns_to_the_head_in_order() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q")).await.unwrap();
        for body in ["a", "b", "c", "d"] {
            b.publish("q", msg(body)).await.unwrap();
        }
        let mut c = b.consume("q", 2).await.unwrap();
        let a = next(&mut c).await;
        let bb = next(&mut c).await;
        assert_eq!((&a.body[..], &bb.body[..]), (&b"a"[..], &b"b"[..]));
        drop(c);
        let mut c = b.consume("q", 10).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            let d = next(&mut c).await;
            got.push((
                String::from_utf8(d.body.to_vec()).unwrap(),
                d.redelivered,
                d.delivery_count,
            ));
        }
        assert_eq!(
            got,
            [
                ("a".into(), true, 1),
                ("b".into(), true, 1),
                ("c".into(), false, 0),
                ("d".into(), false, 0)
            ]
        );
        // The old deliveries' leases are gone.
        assert_eq!(a.settle(Disposition::Ack).await, Err(Error::LeaseLost));
        assert_eq!(bb.settle(Disposition::Requeue).await, Err(Error::LeaseLost));
        assert_eq!(depth(&b, "q").await, (0, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn requeue_goes_to_the_head() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q")).await.unwrap();
        b.publish("q", msg("a")).await.unwrap();
        b.publish("q", msg("b")).await.unwrap();
        let mut c = b.consume("q", 1).await.unwrap();
        next(&mut c)
            .await
            .settle(Disposition::Requeue)
            .await
            .unwrap();
        let d = next(&mut c).await;
        assert_eq!(&d.body[..], b"a");
        assert!(d.redelivered);
        assert_eq!(d.delivery_count, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn delivery_limit_counts_like_rabbitmq() {
        // x-delivery-limit: 3 → four deliveries, counts 0..=3, then dead.
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q").delivery_limit(3).dead_letter("dlq"))
            .await
            .unwrap();
        b.publish("q", msg("a").header("k", "v")).await.unwrap();
        let mut counts = Vec::new();
        for _ in 0..4 {
            let mut c = b.consume("q", 1).await.unwrap();
            counts.push(next(&mut c).await.delivery_count);
        }
        assert_eq!(counts, [0, 1, 2, 3]);
        assert_eq!(depth(&b, "q").await, (0, 0));
        let mut dead = b.consume("dlq", 1).await.unwrap();
        let d = next(&mut dead).await;
        assert_eq!(d.headers.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            d.headers.get(DEAD_REASON_HEADER).map(String::as_str),
            Some(DELIVERY_LIMIT_REASON)
        );
        assert_eq!((d.redelivered, d.delivery_count), (false, 0));
        assert_eq!(d.queue, "dlq");
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_limit_without_dead_letter_queue_is_dropped() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q").delivery_limit(0))
            .await
            .unwrap();
        b.publish("q", msg("a")).await.unwrap();
        let mut c = b.consume("q", 1).await.unwrap();
        next(&mut c)
            .await
            .settle(Disposition::Requeue)
            .await
            .unwrap();
        assert_eq!(depth(&b, "q").await, (0, 0));
        quiet(&mut c).await;
        let d = {
            b.publish("q", msg("b")).await.unwrap();
            next(&mut c).await
        };
        d.settle(Disposition::DeadLetter { reason: "x".into() })
            .await
            .unwrap();
        assert_eq!(depth(&b, "q").await, (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn full_dead_letter_queue_drops_its_oldest() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q").max_length(2).dead_letter("dlq"))
            .await
            .unwrap();
        let mut c = b.consume("q", 1).await.unwrap();
        for body in ["a", "b", "c"] {
            b.publish("q", msg(body)).await.unwrap();
            next(&mut c)
                .await
                .settle(Disposition::DeadLetter {
                    reason: "bad".into(),
                })
                .await
                .unwrap();
        }
        assert_eq!(depth(&b, "dlq").await, (2, 0));
        let mut dead = b.consume("dlq", 2).await.unwrap();
        assert_eq!(&next(&mut dead).await.body[..], b"b");
        assert_eq!(&next(&mut dead).await.body[..], b"c");
    }

    #[tokio::test(start_paused = true)]
    async fn dead_letter_queue_full_of_unsettled_drops_the_dead_letter() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q").max_length(1).dead_letter("dlq"))
            .await
            .unwrap();
        b.publish("dlq", msg("held")).await.unwrap();
        let mut dead = b.consume("dlq", 1).await.unwrap();
        let held = next(&mut dead).await;
        b.publish("q", msg("a")).await.unwrap();
        let mut c = b.consume("q", 1).await.unwrap();
        next(&mut c)
            .await
            .settle(Disposition::DeadLetter { reason: "x".into() })
            .await
            .unwrap();
        assert_eq!(depth(&b, "dlq").await, (0, 1));
        held.settle(Disposition::Ack).await.unwrap();
        quiet(&mut dead).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_is_not_its_own_dead_letter_queue() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q").delivery_limit(0).dead_letter("q"))
            .await
            .unwrap();
        b.publish("q", msg("a")).await.unwrap();
        let mut c = b.consume("q", 1).await.unwrap();
        next(&mut c)
            .await
            .settle(Disposition::Requeue)
            .await
            .unwrap();
        assert_eq!(depth(&b, "q").await, (0, 0));
    }

    /// Publishers, consumers that requeue, ack and get dropped, on threads:
    /// every message is acked exactly once and the counters add up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn threads_lose_nothing() {
        const PUBLISHERS: usize = 4;
        const EACH: usize = 2_000;
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q").max_length(100))
            .await
            .unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut publishers = Vec::new();
        for p in 0..PUBLISHERS {
            let b = b.clone();
            publishers.push(tokio::spawn(async move {
                for i in 0..EACH {
                    let body = format!("{p}-{i}");
                    while let Err(e) = b.publish("q", Message::new(body.clone())).await {
                        assert!(matches!(e, Error::QueueFull { .. }), "{e}");
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        let mut consumers = Vec::new();
        for c in 0..4u64 {
            let b = b.clone();
            let acked = Arc::clone(&acked);
            let done = Arc::clone(&done);
            consumers.push(tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    // Each consumer lives for 50 deliveries, then is dropped
                    // with whatever it still holds.
                    let mut consumer = b.consume("q", 8).await.unwrap();
                    let mut held = Vec::new();
                    for _ in 0..50 {
                        let Ok(Some(Ok(d))) =
                            timeout(Duration::from_millis(50), consumer.next()).await
                        else {
                            if done.load(std::sync::atomic::Ordering::SeqCst) {
                                return;
                            }
                            continue;
                        };
                        n += 1;
                        held.push(d);
                        if held.len() == 8 || n.is_multiple_of(3) {
                            let d = held.remove(0);
                            if (n + c).is_multiple_of(5) {
                                d.settle(Disposition::Requeue).await.unwrap();
                            } else {
                                let body = d.body.clone();
                                d.settle(Disposition::Ack).await.unwrap();
                                acked.lock().unwrap().push(body);
                            }
                        }
                    }
                }
            }));
        }
        for p in publishers {
            p.await.unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in consumers {
            c.await.unwrap();
        }
        // What the consumers left behind (dropped while holding) is still there.
        let mut consumer = b.consume("q", 8).await.unwrap();
        while let Ok(Some(Ok(d))) = timeout(Duration::from_millis(100), consumer.next()).await {
            let body = d.body.clone();
            d.settle(Disposition::Ack).await.unwrap();
            acked.lock().unwrap().push(body);
        }
        let mut acked = std::mem::take(&mut *acked.lock().unwrap());
        acked.sort();
        let before = acked.len();
        acked.dedup();
        assert_eq!(before, acked.len(), "acked twice");
        assert_eq!(acked.len(), PUBLISHERS * EACH, "lost messages");
        assert_eq!(depth(&b, "q").await, (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn consumers_share_a_queue_and_none_is_starved_of_wakeups() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q")).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let mut c = b.consume("q", 1).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let d = c.next().await.unwrap().unwrap();
                let body = d.body.clone();
                d.settle(Disposition::Ack).await.unwrap();
                body
            }));
        }
        tokio::task::yield_now().await; // all four wait
        for body in ["a", "b", "c", "d"] {
            b.publish("q", msg(body)).await.unwrap();
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(timeout(Duration::from_secs(5), t).await.unwrap().unwrap());
        }
        got.sort();
        assert_eq!(got, ["a", "b", "c", "d"]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_next_loses_nothing() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q")).await.unwrap();
        let mut c1 = b.consume("q", 1).await.unwrap();
        let mut c2 = b.consume("q", 1).await.unwrap();
        let mut first = Box::pin(c1.next());
        assert!(futures_poll(first.as_mut()).is_none(), "c1 waits first");
        let waiter = tokio::spawn(async move {
            let d = c2.next().await.unwrap().unwrap();
            (c2, d)
        });
        tokio::task::yield_now().await; // c2 waits too
        // The publish wakes c1, which is cancelled before it runs: the
        // wake-up must pass on to c2.
        b.publish("q", msg("a")).await.unwrap();
        drop(first);
        let (_c2, d) = timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&d.body[..], b"a");
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_at_prefetch_does_not_swallow_wakeups() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q")).await.unwrap();
        let mut full = b.consume("q", 1).await.unwrap();
        // Waiting first consumes the publish's wake-up: no permit is left over.
        let mut first = Box::pin(full.next());
        assert!(futures_poll(first.as_mut()).is_none());
        b.publish("q", msg("a")).await.unwrap();
        let _held = first.await.unwrap().unwrap();
        let mut idle = b.consume("q", 1).await.unwrap();
        // `full` waits for room first, `idle` for a message second.
        let mut full_next = Box::pin(full.next());
        assert!(futures_poll(full_next.as_mut()).is_none());
        let mut idle_next = Box::pin(idle.next());
        assert!(futures_poll(idle_next.as_mut()).is_none());
        b.publish("q", msg("b")).await.unwrap();
        assert!(futures_poll(full_next.as_mut()).is_none());
        let d = timeout(Duration::from_secs(5), idle_next)
            .await
            .expect("the consumer with room gets the message")
            .unwrap()
            .unwrap();
        assert_eq!(&d.body[..], b"b");
    }

    /// Polls a future once.
    fn futures_poll<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = f;
        match std::pin::Pin::new(&mut f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn prefetch_zero_holds_one() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q")).await.unwrap();
        b.publish("q", msg("a")).await.unwrap();
        b.publish("q", msg("b")).await.unwrap();
        let mut c = b.consume("q", 0).await.unwrap();
        let d = next(&mut c).await;
        quiet(&mut c).await;
        d.settle(Disposition::Ack).await.unwrap();
        next(&mut c).await;
    }

    #[tokio::test(start_paused = true)]
    async fn consumers_outlive_the_broker_handle() {
        let b = EmbeddedBroker::new();
        b.declare(&QueueSpec::plain("q")).await.unwrap();
        b.publish("q", msg("a")).await.unwrap();
        let mut c = b.consume("q", 1).await.unwrap();
        drop(b);
        let d = next(&mut c).await;
        d.settle(Disposition::Ack).await.unwrap();
        quiet(&mut c).await;
    }
}
