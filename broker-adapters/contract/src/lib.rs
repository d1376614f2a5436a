//! The broker contract of callq.
//!
//! Node (workers, clients) and coordinator speak to a message bus through
//! this crate only; the `callq` binary picks the adapter (embedded, RabbitMQ,
//! Kafka). The contract is deliberately small: declare a queue, publish with
//! confirm, consume with a bounded prefetch, settle each delivery with one
//! explicit [`Disposition`].
//!
//! # Guarantees every adapter gives
//!
//! Each guarantee below is pinned by a test of the conformance suite
//! (`callq-conformance`), which runs unchanged against every adapter.
//!
//! 1. **A confirmed publish is never lost.** When [`Broker::publish`] returns
//!    `Ok`, the message is stored by the broker and will be delivered to a
//!    consumer of its queue (or moved to the queue's dead-letter queue).
//!    When it returns `Err`, the message may or may not be stored: the caller
//!    retries with the same body (callq deduplicates by `call_id`).
//! 2. **No delivery beyond prefetch.** A consumer never holds more unsettled
//!    deliveries than the prefetch it was opened with.
//! 3. **Redelivery when a lease is lost.** A delivery that is not settled
//!    when its consumer is dropped (or its connection closes), or that is
//!    settled with [`Disposition::Requeue`], returns to its queue and is
//!    delivered again with [`Delivery::redelivered`] set and
//!    [`Delivery::delivery_count`] one higher. (Kafka: the count is exact
//!    within one process and carried by a header across a requeue. A
//!    consumer cannot know which records its partition's last owner, in
//!    another process, received: every record that was already in a
//!    partition held before when the consumer was assigned it comes with
//!    `redelivered` set. The flag may thus be set on a message never
//!    delivered, never missing on one that was; the count is not raised.
//!    callq's ledger counts attempts across processes; see
//!    [`Consumer::assignment`] for how a copy is routed past a dead
//!    consumer's partitions.)
//! 4. **Delivery limit.** A message of a queue declared with a
//!    [`QueueSpec::delivery_limit`] of `n` is delivered at most `n + 1`
//!    times; when it would be redelivered once more it moves, with
//!    [`DEAD_REASON_HEADER`] `delivery_limit`, to the queue's
//!    [`QueueSpec::limit_dead_letter`] queue where it has one, else to its
//!    dead-letter queue. (Its consumers' own [`Disposition::DeadLetter`]
//!    always goes to the dead-letter queue: only a message nobody judged
//!    takes the other way.)
//! 5. **Per-queue FIFO for a single consumer.** One consumer of a queue that
//!    settles every delivery with `Ack` receives the messages in publish
//!    order. (Kafka: per partition, so for a queue of one partition, or per
//!    [`Message::key`]; a requeued message goes to the back.)
//! 6. **Bounded memory.** A queue declared with a [`QueueSpec::max_length`]
//!    holds at most that many ready messages, plus the unsettled deliveries
//!    of its consumers, which their prefetch bounds; a publish beyond it
//!    fails with [`Error::QueueFull`] and is not stored. A consumer buffers
//!    at most its prefetch, however slow it is. (RabbitMQ counts ready
//!    messages only towards `x-max-length`; the embedded broker counts
//!    unsettled ones too, which is stricter and within this guarantee.
//!    Kafka has no maximum length: its adapter enforces the bound in the
//!    publishing process from the backlog of the queue's consumer group, so
//!    publishers in several processes may together pass it briefly, and a
//!    process that did not declare the queue does not enforce it.)
//! 7. **Settling is final.** [`Disposition::Ack`] removes the message;
//!    [`Disposition::DeadLetter`] moves it to the dead-letter queue with the
//!    reason in the [`DEAD_REASON_HEADER`] header. Settling a delivery whose
//!    lease is gone fails with [`Error::LeaseLost`] and changes nothing: the
//!    message is (or will be) redelivered.
//! 8. **Release does not count.** A delivery settled with
//!    [`Disposition::Release`] is delivered again with `redelivered` set and
//!    the same [`Delivery::delivery_count`]; releasing it any number of
//!    times never moves it to the dead-letter queue.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
pub use bytes::Bytes;

mod retry;
pub use retry::{Backoff, publish_until, publish_within};
pub mod telemetry;

/// Message headers: string keys and string values, as every broker can carry
/// them (AMQP table entries, Kafka record headers).
pub type Headers = BTreeMap<String, String>;

/// A copy of a published message, read by a tap without taking it from any
/// consumer (`callq capture`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tapped {
    /// The queue it was published to.
    pub queue: String,
    /// Its headers.
    pub headers: Headers,
    /// Its body.
    pub body: Bytes,
    /// The broker's timestamp of the message, in milliseconds since the Unix
    /// epoch, where the broker keeps one (Kafka's record timestamp).
    pub timestamp_ms: Option<i64>,
    /// Its partition, on a partitioned broker.
    pub partition: Option<u32>,
    /// Its offset in the partition, on a log broker.
    pub offset: Option<i64>,
}

/// What a tap yields.
#[derive(Debug, Clone, PartialEq)]
pub enum TapEvent {
    /// A copy of a message.
    Message(Tapped),
    /// A tap over a bounded range of a log (Kafka) has read the watched
    /// queue's range; copies of the queues it follows may still come.
    RangeEnd,
}

/// A tap: copies of what is published, in publish order per publisher.
/// Capturing through it never changes what consumers receive; a tap that
/// falls too far behind loses copies (its own queue is bounded), never
/// messages.
#[async_trait]
pub trait Tap: Send {
    /// The next copy; `None` once the tap is closed.
    async fn next(&mut self) -> Option<Result<TapEvent, Error>>;

    /// Also copy what is published to `queue` from `since_ms` on (a call
    /// names it as its `reply_to`). A tap that sees every queue anyway
    /// ignores it.
    fn follow(&mut self, queue: &str, since_ms: Option<i64>) {
        let _ = (queue, since_ms);
    }
}

/// The header that carries the attempt number of a call (absent means 1).
pub const ATTEMPT_HEADER: &str = "callq-attempt";

/// The highest attempt number [`ATTEMPT_HEADER`] may carry. Attempts are
/// bounded by delivery limits of a few; a larger number is forged.
pub const MAX_ATTEMPT: u32 = 65_535;

/// The header a dead-lettered message carries: why it was dead-lettered.
pub const DEAD_REASON_HEADER: &str = "callq-dead-reason";

/// Redeliveries a call queue allows before a message is dead-lettered.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

/// Messages a call queue holds at most, ready and unsettled together.
pub const DEFAULT_CALL_QUEUE_LENGTH: usize = 1_000_000;

/// Messages a reply queue holds at most.
pub const DEFAULT_REPLY_QUEUE_LENGTH: usize = 1_000_000;

/// How long a reply queue outlives its client: a client that comes back
/// within this time still finds its replies.
pub const REPLY_QUEUE_EXPIRES: Duration = Duration::from_secs(3600);

/// How long a control queue (a worker's, agent's or operator's) outlives
/// its consumer.
pub const CONTROL_QUEUE_EXPIRES: Duration = Duration::from_secs(300);

/// The name of the call queue (or topic) of a service.
pub fn call_queue(service: &str) -> String {
    format!("{CALL_QUEUE_PREFIX}{service}")
}

/// What every call queue's name starts with; the rest is the service.
pub const CALL_QUEUE_PREFIX: &str = "callq.call.";

/// The service whose call queue `queue` is, if it is one.
pub fn call_queue_service(queue: &str) -> Option<&str> {
    queue
        .strip_prefix(CALL_QUEUE_PREFIX)
        .filter(|service| !service.is_empty())
}

/// Priorities from this one up (to 9) are a service's high band: workers
/// take a call from it before the calls of the normal band (0 to 4, and
/// calls without a priority), as quorum queues of RabbitMQ 4 split them.
pub const HIGH_PRIORITY: u8 = 5;

/// The highest priority a call may carry.
pub const MAX_PRIORITY: u8 = 9;

/// What the queue (or topic) of a service's high band starts with; the
/// rest is the service. Unlike a suffix, no service name can make it
/// collide with another service's call queue.
pub const HIGH_QUEUE_PREFIX: &str = "callq.high.";

/// The name of the queue (or topic) of a service's high-priority calls.
pub fn high_queue(service: &str) -> String {
    format!("{HIGH_QUEUE_PREFIX}{service}")
}

/// The queue a call of `service` with `priority` is published to: the high
/// band's from [`HIGH_PRIORITY`] up, the call queue otherwise.
pub fn call_queue_for(service: &str, priority: Option<u8>) -> String {
    match priority {
        Some(p) if p >= HIGH_PRIORITY => high_queue(service),
        _ => call_queue(service),
    }
}

/// The band of a queue of calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Band {
    /// The call queue: priorities 0 to 4, and calls without one.
    Normal,
    /// The high band: priorities from [`HIGH_PRIORITY`] up.
    High,
}

/// The service and band of `queue`, if it is a call queue of either band.
pub fn call_queue_band(queue: &str) -> Option<(&str, Band)> {
    if let Some(service) = call_queue_service(queue) {
        return Some((service, Band::Normal));
    }
    queue
        .strip_prefix(HIGH_QUEUE_PREFIX)
        .filter(|service| !service.is_empty())
        .map(|service| (service, Band::High))
}

/// The name of the dead-letter queue (or topic) of a service.
pub fn dead_queue(service: &str) -> String {
    format!("callq.dead.{service}")
}

/// The name of the queue (or topic) of a service's calls that passed their
/// delivery limit with nobody having judged them: a worker answers their
/// clients there and moves them on to the [`dead_queue`].
pub fn lost_queue(service: &str) -> String {
    format!("callq.lost.{service}")
}

/// The queue of requests to the coordinator.
pub const COORDINATOR_QUEUE: &str = "callq.coordinator";

/// The queue of heartbeats to the coordinator: kept apart from
/// [`COORDINATOR_QUEUE`] because a heartbeat needs no durability (the next
/// one repeats it), so it costs the broker no disk write.
pub const HEARTBEAT_QUEUE: &str = "callq.heartbeats";

/// The queue on which a worker receives the coordinator's answers.
pub fn worker_queue(worker_id: &str) -> String {
    format!("callq.worker.{worker_id}")
}

/// The queue on which a node agent receives the coordinator's orders.
pub fn agent_queue(agent_id: &str) -> String {
    format!("callq.agent.{agent_id}")
}

/// Requests the coordinator queue holds at most.
pub const COORDINATOR_QUEUE_LENGTH: usize = 100_000;

/// Answers and orders a worker's or agent's queue holds at most.
pub const CONTROL_QUEUE_LENGTH: usize = 100_000;

/// The name of the reply queue of one of our clients.
pub fn reply_queue(client_id: &str) -> String {
    format!("callq.reply.{client_id}")
}

/// Whether the reply queue `reply_to` belongs to the broker user `user`:
/// it is `callq.reply.<user>` or starts with `callq.reply.<user>.`, the
/// names the least-privilege set-up lets that user declare and read
/// (docs/SECURITY.md).
pub fn reply_queue_of(user: &str, reply_to: &str) -> bool {
    match reply_to
        .strip_prefix("callq.reply.")
        .and_then(|rest| rest.strip_prefix(user))
    {
        Some(rest) => !user.is_empty() && (rest.is_empty() || rest.starts_with('.')),
        None => false,
    }
}

/// A message to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The body: UTF-8 JSON for every callq message.
    pub body: Bytes,
    /// Headers, such as [`ATTEMPT_HEADER`].
    pub headers: Headers,
    /// Partition key where the broker partitions (Kafka): the session id or
    /// the call id. Brokers without partitions ignore it.
    pub key: Option<String>,
    /// Where the broker partitions: the partition to publish into, instead
    /// of the one the key picks. Brokers without partitions ignore it.
    pub partition: Option<u32>,
}

impl Message {
    /// A message with a body and no headers.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Sets the partition key.
    #[must_use]
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Publishes into this partition, where the broker partitions.
    #[must_use]
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// The partitions of its queue that a consumer owns now, kept current by the
/// adapter as the broker assigns and revokes them. Cheap to clone; every
/// clone sees the same partitions.
#[derive(Debug, Clone, Default)]
pub struct Assignment(std::sync::Arc<std::sync::Mutex<Vec<u32>>>);

impl Assignment {
    /// The partitions owned now, ascending.
    pub fn get(&self) -> Vec<u32> {
        self.0.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Replaces the partitions owned; for adapters.
    pub fn set(&self, mut partitions: Vec<u32>) {
        partitions.sort_unstable();
        partitions.dedup();
        if let Ok(mut p) = self.0.lock() {
            *p = partitions;
        }
    }
}

/// How a queue is declared. Declaring is idempotent: declaring an existing
/// queue with the same spec is a no-op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// The queue's name.
    pub name: String,
    /// Messages the queue holds at most (ready and unsettled); a publish
    /// beyond it fails with [`Error::QueueFull`]. `None`: the broker's limit.
    pub max_length: Option<usize>,
    /// Redeliveries allowed before the message is dead-lettered instead.
    /// `None`: redelivered without limit.
    pub delivery_limit: Option<u32>,
    /// Where dead letters go; declared along with this queue. `None`: a dead
    /// letter is dropped.
    pub dead_letter: Option<String>,
    /// Where a message goes that passes the delivery limit (its deliveries
    /// returned unsettled, by [`Disposition::Requeue`] or with a lost
    /// consumer) rather than being settled [`Disposition::DeadLetter`] by a
    /// consumer; declared along with this queue, before it, by
    /// [`QueueSpec::limit_dead_letter_spec`]. A consumer of that queue can
    /// still act on a message nobody judged: callq answers its client.
    /// `None`: [`QueueSpec::dead_letter`].
    pub limit_dead_letter: Option<String>,
    /// Control traffic that its sender repeats when it is lost (answers,
    /// orders): the adapter may keep it in memory only, without the cost of
    /// a durable write, lose it when the broker restarts, and delete the
    /// queue once it has had no consumer for a while. Guarantees 1 and 3 hold
    /// only while the broker runs, and a redelivery may report a
    /// [`Delivery::delivery_count`] of 1 however often it was delivered.
    pub transient: bool,
    /// At most one consumer receives deliveries at a time; the others wait
    /// and one of them takes over when it goes (RabbitMQ's single active
    /// consumer). Adapters whose queues have one consumer anyway may ignore
    /// it.
    pub single_active_consumer: bool,
    /// The broker may delete the queue, with what it holds, once it has had
    /// no consumer for this long (RabbitMQ's `x-expires`): queues named after
    /// a client or worker that is gone for good. `None`: kept for ever.
    pub expires: Option<Duration>,
}

impl QueueSpec {
    /// A queue with no limits and no dead-letter queue.
    pub fn plain(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_length: None,
            delivery_limit: None,
            dead_letter: None,
            limit_dead_letter: None,
            transient: false,
            single_active_consumer: false,
            expires: None,
        }
    }

    /// The call queue of a service: bounded, with the default delivery limit
    /// and its dead-letter queue. A call that passes the limit with nobody
    /// having judged it (its last delivery lost with its worker) goes to the
    /// service's [`lost_queue`] first, where a worker answers its client and
    /// moves it on to the dead-letter queue.
    pub fn calls(service: &str) -> Self {
        let mut spec = Self::plain(call_queue(service))
            .max_length(DEFAULT_CALL_QUEUE_LENGTH)
            .delivery_limit(DEFAULT_DELIVERY_LIMIT)
            .dead_letter(dead_queue(service));
        spec.limit_dead_letter = Some(lost_queue(service));
        spec
    }

    /// The queue of a service's high band: like its call queue (the same
    /// bounds, delivery limit, dead-letter and past-limit queues), under
    /// [`high_queue`].
    pub fn high_calls(service: &str) -> Self {
        let mut spec = Self::calls(service);
        spec.name = high_queue(service);
        spec
    }

    /// Both bands of a service's calls: the call queue, then the high band.
    pub fn call_bands(service: &str) -> [Self; 2] {
        [Self::calls(service), Self::high_calls(service)]
    }

    /// The reply queue of a client; it expires an hour after its client
    /// is gone.
    pub fn replies(client_id: &str) -> Self {
        let mut spec = Self::plain(reply_queue(client_id)).max_length(DEFAULT_REPLY_QUEUE_LENGTH);
        spec.expires = Some(REPLY_QUEUE_EXPIRES);
        spec
    }

    /// The coordinator's request queue; every party declares it alike. One
    /// coordinator consumes it at a time: the leader.
    pub fn coordinator() -> Self {
        let mut spec = Self::plain(COORDINATOR_QUEUE).max_length(COORDINATOR_QUEUE_LENGTH);
        spec.single_active_consumer = true;
        spec
    }

    /// The coordinator's heartbeat queue; every party declares it alike.
    /// Transient: a heartbeat lost with a broker restart is repeated by the
    /// next one. Consumed by the leader only, like the request queue.
    pub fn heartbeats() -> Self {
        let mut spec = Self::plain(HEARTBEAT_QUEUE).max_length(COORDINATOR_QUEUE_LENGTH);
        spec.transient = true;
        spec.single_active_consumer = true;
        spec
    }

    /// A control queue: a worker's or agent's, for the coordinator's
    /// answers and orders, which are repeated when lost (transient).
    pub fn control(name: impl Into<String>) -> Self {
        let mut spec = Self::plain(name).max_length(CONTROL_QUEUE_LENGTH);
        spec.transient = true;
        spec.expires = Some(CONTROL_QUEUE_EXPIRES);
        spec
    }

    /// The spec of this queue's dead-letter queue, which adapters declare
    /// along with it: as bounded and as durable as the queue it serves.
    /// Refused when the queue would be its own dead-letter queue.
    pub fn dead_letter_spec(&self) -> Result<Option<QueueSpec>, Error> {
        let Some(dead) = &self.dead_letter else {
            return Ok(None);
        };
        if *dead == self.name {
            return Err(Error::Refused(format!(
                "queue `{dead}` cannot be its own dead-letter queue"
            )));
        }
        let mut spec = QueueSpec::plain(dead.clone());
        spec.max_length = self.max_length;
        spec.transient = self.transient;
        Ok(Some(spec))
    }

    /// The spec of the queue that takes this queue's messages past the
    /// delivery limit ([`QueueSpec::limit_dead_letter`]), which adapters
    /// declare along with it, before it: as bounded and as durable as this
    /// queue, dead-lettering into this queue's dead-letter queue, and
    /// without a delivery limit: what its consumer does runs no handler, so
    /// no message can crash it there, and a message lost there again (its
    /// consumer died for another reason) comes back until it is judged.
    /// `None` when there is none, or it is the dead-letter queue. Refused
    /// when it would be this queue itself.
    pub fn limit_dead_letter_spec(&self) -> Result<Option<QueueSpec>, Error> {
        let Some(name) = &self.limit_dead_letter else {
            return Ok(None);
        };
        if *name == self.name {
            return Err(Error::Refused(format!(
                "queue `{name}` cannot take its own messages past the delivery limit"
            )));
        }
        if self.dead_letter.as_ref() == Some(name) {
            return Ok(None);
        }
        let mut spec = QueueSpec::plain(name.clone());
        spec.max_length = self.max_length;
        spec.dead_letter = self.dead_letter.clone();
        spec.transient = self.transient;
        Ok(Some(spec))
    }

    /// Where messages past the delivery limit go: the
    /// [`QueueSpec::limit_dead_letter`] queue, else the dead-letter queue.
    pub fn past_limit_queue(&self) -> Option<&str> {
        self.limit_dead_letter
            .as_deref()
            .or(self.dead_letter.as_deref())
    }

    /// Sets the maximum length.
    #[must_use]
    pub fn max_length(mut self, n: usize) -> Self {
        self.max_length = Some(n);
        self
    }

    /// Sets the delivery limit.
    #[must_use]
    pub fn delivery_limit(mut self, n: u32) -> Self {
        self.delivery_limit = Some(n);
        self
    }

    /// Sets the dead-letter queue.
    #[must_use]
    pub fn dead_letter(mut self, queue: impl Into<String>) -> Self {
        self.dead_letter = Some(queue.into());
        self
    }
}

/// The fate of a delivery: exactly one per delivery, applied by
/// [`Delivery::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done: remove the message from the queue.
    Ack,
    /// Not done here: return it to the queue, to be redelivered (counts
    /// towards the delivery limit).
    Requeue,
    /// Never deliverable: move it to the dead-letter queue with this reason.
    DeadLetter {
        /// Why, for the operator reading the dead-letter queue.
        reason: String,
    },
    /// Not judged here, through no fault of the message (the consumer
    /// could not reach a party it needs, such as the coordinator): return it
    /// to its queue to be delivered again with `redelivered` set and its
    /// [`Delivery::delivery_count`] unchanged, so that waiting never uses up
    /// the delivery limit. It may come back behind messages published after
    /// it. (Guarantee 8.)
    Release,
}

/// The header a released message carries (see [`Disposition::Release`]):
/// its delivery count when it was released. A delivery that carries it has
/// `redelivered` set.
pub const RELEASED_HEADER: &str = "callq-released";

/// Depth of a queue, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Messages delivered and not yet settled, as far as the adapter can
    /// tell: RabbitMQ does not report them over AMQP, so its adapter counts
    /// the deliveries held by the consumers of this process only.
    pub unsettled: u64,
}

/// A broker: the only way node and coordinator reach the bus.
///
/// Implementations are cheap to share (`Arc<dyn Broker>`) and safe to use
/// from many tasks at once; publishes from concurrent tasks are pipelined.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The adapter's name: `embedded`, `amqp` or `kafka`.
    fn kind(&self) -> &'static str;

    /// Declares a queue (and its dead-letter queue). Idempotent.
    async fn declare(&self, spec: &QueueSpec) -> Result<(), Error>;

    /// Publishes a message and returns once the broker has confirmed it
    /// (guarantee 1). Fails with [`Error::NoSuchQueue`] when the queue was
    /// never declared and the broker can tell, and with [`Error::QueueFull`]
    /// when the queue is at its maximum length.
    async fn publish(&self, queue: &str, message: Message) -> Result<(), Error>;

    /// Opens a consumer on a declared queue that holds at most `prefetch`
    /// unsettled deliveries (guarantee 2). Dropping the consumer returns its
    /// unsettled deliveries to the queue (guarantee 3).
    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>, Error>;

    /// The queue's current depth.
    async fn depth(&self, queue: &str) -> Result<QueueDepth, Error>;

    /// How many consumers the queue has now, where the broker can tell
    /// (RabbitMQ, the embedded broker); `None` where it cannot (Kafka: the
    /// adapter does not inspect consumer groups). A queue that does not
    /// exist has none.
    async fn consumers(&self, queue: &str) -> Result<Option<u64>, Error> {
        let _ = queue;
        Ok(None)
    }

    /// How many partitions the queue's topic has, on a partitioned broker
    /// (Kafka: at most that many consumers of a group receive its
    /// messages); `None` where queues are not partitioned.
    async fn partitions(&self, queue: &str) -> Result<Option<u32>, Error> {
        let _ = queue;
        Ok(None)
    }
}

/// A consumer of one queue.
#[async_trait]
pub trait Consumer: Send {
    /// The next delivery. Waits while the consumer holds `prefetch`
    /// unsettled deliveries or the queue is empty. `None` means the consumer
    /// has ended (cancelled, or its connection closed) and will yield nothing
    /// more; its unsettled deliveries have returned to the queue. (Kafka's
    /// client reconnects by itself: its consumer does not end when the
    /// connection drops, and its deliveries fail with [`Error::LeaseLost`]
    /// once the group session expires.)
    ///
    /// Cancel-safe: dropping the future before it completes loses no
    /// message (callers poll it in `select!` and with `now_or_never`).
    async fn next(&mut self) -> Option<Result<Delivery, Error>>;

    /// Where the broker partitions a queue among its consumers (Kafka): the
    /// partitions this consumer owns, kept current. A message published
    /// into one of them with [`Message::partition`] reaches this consumer
    /// (while it keeps it) without waiting for the broker to move the
    /// partitions of a consumer that died. `None` where the broker does not
    /// partition.
    fn assignment(&self) -> Option<Assignment> {
        None
    }

    /// Ends the consumer like dropping it does, and returns once the broker
    /// has taken its unsettled deliveries back and will deliver it nothing
    /// more. Dropping a consumer of a networked broker ends it
    /// asynchronously: until the broker learns of it, it may still deliver
    /// messages to it (up to the prefetch), and each of those counts as a
    /// delivery when it returns. Bounded by the adapter's timeout.
    async fn close(self: Box<Self>) {}
}

/// The adapter's half of a delivery: applies its [`Disposition`].
#[async_trait]
pub trait Settle: Send + Sync {
    /// Applies the disposition. This is the one place where an adapter maps
    /// a disposition onto its broker.
    async fn settle(self: Box<Self>, disposition: Disposition) -> Result<(), Error>;
}

/// One delivery of a message to a consumer. Holding it holds the lease on
/// the message; [`Delivery::settle`] ends the lease.
pub struct Delivery {
    /// The message body.
    pub body: Bytes,
    /// The message headers.
    pub headers: Headers,
    /// Whether the message was delivered before (to any consumer).
    pub redelivered: bool,
    /// How many times the message was delivered before this delivery:
    /// 0 on the first delivery.
    pub delivery_count: u32,
    /// The queue it came from.
    pub queue: String,
    /// The publisher's identity as the broker vouches for it: RabbitMQ's
    /// `user_id` property, which the broker checks against the publishing
    /// connection's user. `None` where the broker vouches for no one (the
    /// property was not set, or Kafka and the embedded broker).
    pub publisher: Option<String>,
    settle: Box<dyn Settle>,
}

impl Delivery {
    /// Builds a delivery; for adapters.
    pub fn new(
        body: Bytes,
        headers: Headers,
        redelivered: bool,
        delivery_count: u32,
        queue: String,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            body,
            headers,
            redelivered,
            delivery_count,
            queue,
            publisher: None,
            settle,
        }
    }

    /// The same delivery with the publisher the broker vouched for.
    #[must_use]
    pub fn with_publisher(mut self, publisher: Option<String>) -> Self {
        self.publisher = publisher;
        self
    }

    /// Settles the delivery (guarantee 7).
    pub async fn settle(self, disposition: Disposition) -> Result<(), Error> {
        self.settle.settle(disposition).await
    }

    /// The attempt number the message carries in [`ATTEMPT_HEADER`]; 1 when
    /// absent. A header that is not a decimal number from 1 to
    /// [`MAX_ATTEMPT`] is an error: says why.
    pub fn attempt(&self) -> Result<u32, String> {
        let Some(v) = self.headers.get(ATTEMPT_HEADER) else {
            return Ok(1);
        };
        v.trim()
            .parse()
            .ok()
            .filter(|a| (1..=MAX_ATTEMPT).contains(a))
            .ok_or_else(|| {
                let shown: String = v.chars().take(32).collect();
                format!("header {ATTEMPT_HEADER} must be a number from 1 to {MAX_ATTEMPT}, not `{shown}`")
            })
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("len", &self.body.len())
            .field("headers", &self.headers)
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .field("publisher", &self.publisher)
            .finish_non_exhaustive()
    }
}

/// What can go wrong talking to a broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The queue was never declared.
    #[error(
        "queue `{0}` does not exist: declare it first (workers declare the queues of their services)"
    )]
    NoSuchQueue(String),
    /// The queue is at its maximum length; nothing was stored.
    #[error("queue `{queue}` is full ({max} messages): the message was not stored; retry later")]
    QueueFull {
        /// The queue.
        queue: String,
        /// Its maximum length.
        max: usize,
    },
    /// The delivery's lease is gone (its consumer or connection closed); the
    /// broker redelivers the message.
    #[error(
        "the delivery's lease is gone (its consumer or connection closed); the message will be redelivered"
    )]
    LeaseLost,
    /// The broker did not confirm a publish; it may or may not be stored.
    #[error(
        "the broker did not confirm the publish ({0}); it may or may not be stored: retry with the same body"
    )]
    NotConfirmed(String),
    /// The connection to the broker failed.
    #[error("broker connection failed: {0}")]
    Connection(String),
    /// A wait on the broker timed out.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The broker refused the operation for good (a queue declared before
    /// with other arguments, missing permissions); retrying will not help.
    #[error("the broker refused: {0}")]
    Refused(String),
    /// The broker is shut down.
    #[error("the broker is shut down")]
    Closed,
}

impl Error {
    /// Whether the same operation may succeed if retried later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::QueueFull { .. }
                | Error::NotConfirmed(_)
                | Error::Connection(_)
                | Error::Timeout(_)
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Nop;
    #[async_trait]
    impl Settle for Nop {
        async fn settle(self: Box<Self>, _: Disposition) -> Result<(), Error> {
            Ok(())
        }
    }

    fn delivery(headers: Headers) -> Delivery {
        Delivery::new(Bytes::new(), headers, false, 0, "q".into(), Box::new(Nop))
    }

    #[test]
    fn attempt_header_defaults_to_one() {
        assert_eq!(delivery(Headers::new()).attempt(), Ok(1));
        let h = |v: &str| Headers::from([(ATTEMPT_HEADER.to_string(), v.to_string())]);
        assert_eq!(delivery(h("3")).attempt(), Ok(3));
        assert_eq!(delivery(h("65535")).attempt(), Ok(MAX_ATTEMPT));
        for bad in [
            "0",
            "x",
            "-1",
            "65536",
            "4294967295",
            "99999999999999999999",
            "",
        ] {
            let e = delivery(h(bad)).attempt().unwrap_err();
            assert!(e.contains("must be a number from 1 to 65535"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_follow_the_wire_contract() {
        assert_eq!(call_queue("bank"), "callq.call.bank");
        assert_eq!(dead_queue("bank"), "callq.dead.bank");
        assert_eq!(lost_queue("bank"), "callq.lost.bank");
        assert_eq!(reply_queue("shop-1"), "callq.reply.shop-1");
        let spec = QueueSpec::calls("bank");
        assert_eq!(spec.dead_letter.as_deref(), Some("callq.dead.bank"));
        assert_eq!(spec.delivery_limit, Some(DEFAULT_DELIVERY_LIMIT));
        assert_eq!(call_queue_service("callq.call.mail.eu"), Some("mail.eu"));
        assert_eq!(call_queue_service("callq.call."), None);
        assert_eq!(call_queue_service("callq.dead.bank"), None);
        assert_eq!(call_queue_service("callq.high.bank"), None);
    }

    #[test]
    fn priorities_from_five_go_to_the_high_band() {
        assert_eq!(call_queue_for("bank", None), "callq.call.bank");
        for p in 0..HIGH_PRIORITY {
            assert_eq!(call_queue_for("bank", Some(p)), "callq.call.bank");
        }
        for p in HIGH_PRIORITY..=MAX_PRIORITY {
            assert_eq!(call_queue_for("bank", Some(p)), "callq.high.bank");
        }
        assert_eq!(
            call_queue_band("callq.high.mail.eu"),
            Some(("mail.eu", Band::High))
        );
        assert_eq!(
            call_queue_band("callq.call.mail.eu"),
            Some(("mail.eu", Band::Normal))
        );
        // A service whose name looks like a band is still its own service.
        assert_eq!(
            call_queue_band("callq.call.high.x"),
            Some(("high.x", Band::Normal))
        );
        assert_eq!(call_queue_band("callq.high."), None);
        assert_eq!(call_queue_band("callq.lost.bank"), None);
        let high = QueueSpec::high_calls("bank");
        let normal = QueueSpec::calls("bank");
        assert_eq!(high.name, "callq.high.bank");
        assert_eq!(high.dead_letter, normal.dead_letter);
        assert_eq!(high.limit_dead_letter, normal.limit_dead_letter);
        assert_eq!(high.delivery_limit, normal.delivery_limit);
        assert_eq!(high.max_length, normal.max_length);
    }

    #[test]
    fn a_reply_queue_belongs_to_the_user_its_name_starts_with() {
        assert!(reply_queue_of("alice", "callq.reply.alice"));
        assert!(reply_queue_of("alice", "callq.reply.alice.cli-7"));
        for other in [
            "callq.reply.alicex",
            "callq.reply.alice-2",
            "callq.reply.bob",
            "callq.reply.bob.alice",
            "callq.call.alice",
            "callq.reply.",
            "alice",
            "",
        ] {
            assert!(!reply_queue_of("alice", other), "{other}");
        }
        assert!(!reply_queue_of("", "callq.reply."));
        assert!(!reply_queue_of("", "callq.reply..x"));
    }
}
