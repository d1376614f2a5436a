//! The RabbitMQ adapter of callq, on `lapin` with `deadpool-lapin`.
//!
//! How the contract of `callq-broker` maps onto AMQP 0-9-1 and RabbitMQ:
//!
//! | contract | RabbitMQ |
//! |---|---|
//! | a queue | a **quorum queue** (`x-queue-type: quorum`), durable; a [`QueueSpec::transient`] queue is a classic, non-durable queue |
//! | [`QueueSpec::expires`] | `x-expires` |
//! | [`QueueSpec::max_length`] | `x-max-length` with `x-overflow: reject-publish`: a publish beyond it is nacked, which [`Broker::publish`] reports as [`Error::QueueFull`] |
//! | [`QueueSpec::delivery_limit`] | `x-delivery-limit` |
//! | [`QueueSpec::dead_letter`] | a quorum queue of that name, fed through the default exchange (`x-dead-letter-routing-key`) with `x-dead-letter-strategy: at-least-once` |
//! | [`QueueSpec::limit_dead_letter`] | a quorum queue of that name, declared first; it takes the `x-dead-letter-routing-key` instead, so the broker's own dead-lettering (past `x-delivery-limit`) goes there while a consumer's [`Disposition::DeadLetter`] goes to the dead-letter queue |
//! | [`QueueSpec::single_active_consumer`] | `x-single-active-consumer: true` |
//! | a call queue (`callq.call.<service>`) | also bound to the topic exchange [`CALLS_EXCHANGE`] with the service as binding key, so that clients may publish calls without any right on the default exchange (docs/SECURITY.md); a high band's queue (`callq.high.<service>`) alike to [`HIGH_CALLS_EXCHANGE`] |
//! | publish | into a call queue: its band's exchange ([`CALLS_EXCHANGE`] or [`HIGH_CALLS_EXCHANGE`]), routing key = the service; into any other queue: the default exchange, routing key = queue name; `user_id` = the connection's user (RabbitMQ checks it, so a consumer knows who published: [`Delivery::publisher`]); persistent (transient into a [`QueueSpec::transient`] queue: nothing to write to disk), `mandatory` (an unroutable message is a [`Error::NoSuchQueue`]); one shared channel in confirm mode, so that concurrent publishes pipeline their confirms |
//! | consume | a channel per consumer, `basic.qos` = prefetch, manual acks; dropping the consumer closes its channel, which returns its unacked deliveries |
//! | [`Delivery::redelivered`], [`Delivery::delivery_count`] | the `redelivered` flag and the quorum queue's `x-delivery-count` header |
//! | [`Disposition::Ack`], [`Disposition::Requeue`] | `basic.ack`, `basic.nack` with requeue (counts towards the delivery limit) |
//! | [`Disposition::Release`] | a confirmed copy in the same queue with the message's own headers and [`RELEASED_HEADER`] = its delivery count (which the count of its deliveries adds to), then `basic.ack`: the copy starts the quorum queue's count afresh and goes to the back |
//! | [`Disposition::DeadLetter`] | a confirmed copy in the dead-letter queue carrying [`DEAD_REASON_HEADER`], then `basic.ack`; a message the broker dead-letters itself gets the header from its `x-first-death-reason` (`delivery_limit`, `rejected`, ...) |
//! | [`Broker::depth`] | ready: the `message_count` of a passive declare; unsettled: the deliveries held by this process's consumers (AMQP does not report the others) |
//!
//! Every wait on the network is bounded by [`Options::timeout`] (and a
//! publish confirm by [`Options::confirm_timeout`]). Connections are pooled
//! by `deadpool-lapin`: a connection that dropped is replaced on the next
//! operation, while the consumers opened on it end (their
//! [`Consumer::next`] returns `None`), so that a worker notices, stops and
//! registers again.
//!
//! # A cluster of nodes
//!
//! A RabbitMQ cluster is one broker reached through any of its nodes; its
//! URL names them all, in either of two forms (they may be mixed):
//!
//! - hosts separated by commas in one URL, sharing its credentials, virtual
//!   host and query:
//!   `amqp://user:password@host1:5672,host2:5672,host3:5672/vhost?heartbeat=5`
//!   (a host without a port takes the scheme's: 5672, or 5671 for `amqps`);
//! - whole URLs separated by commas:
//!   `amqp://user:password@host1:5672/vhost,amqp://user:password@host2:5672/vhost`.
//!
//! Every node must name the same user and virtual host. Each connection
//! starts at a node picked at random, so that the processes of a cluster
//! spread over its nodes, and keeps to the node that answered last. When
//! that node does not answer (or the connection drops: the pool replaces it
//! on the next operation), the next node of the list is tried, and so on
//! around it. One attempt on one node waits at most its share of
//! [`Options::timeout`] (or the URL's `connection_timeout`); a round in
//! which no node answered makes the next round wait first, with a jittered
//! backoff from 100 ms up to 2 s.
//!
//! Queues are quorum queues, which RabbitMQ replicates to three nodes (its
//! `quorum_cluster_size`; every node of a cluster of three), so a call
//! queue, a reply queue and `callq.coordinator` live on while a majority of
//! their nodes does; the nodes left elect a new leader for each queue the
//! lost node led (0.2–0.5 s after a `kill -9` in
//! `tests/proc_rabbit_cluster.rs`). A publish channel that gets a nack, or no
//! confirm within [`CONFIRM_STALL`], is replaced: RabbitMQ may leave a
//! channel whose first publish to a queue raced that election nacking the
//! queue for good. The control queues ([`QueueSpec::transient`]) are
//! classic queues on the node of the connection that declared them and go
//! with that node; their parties declare them again when they reconnect.
#![forbid(unsafe_code)]

mod tap;
pub use tap::{AmqpTap, TRACE_EXCHANGE};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callq_broker::{
    Band, Broker, Bytes, Consumer, DEAD_REASON_HEADER, Delivery, Disposition, Error, Headers,
    Message, QueueDepth, QueueSpec, RELEASED_HEADER, call_queue_band,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Acker, BasicProperties, Channel, Confirmation, ExchangeKind};
use tracing::{debug, warn};

use crate::connect::{Connector, Pool, RECONNECT_CAP, random_index};

mod connect;

/// The URL used when none is configured: a RabbitMQ on this machine.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The AMQP heartbeat asked for when the URL does not name one, in seconds.
/// It bounds how long a hung (not dead) peer holds its leases and its place
/// as single active consumer: about three heartbeats.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 5;

/// The largest AMQP frame asked for when the URL does not name one, in
/// bytes; larger messages travel in several frames.
pub const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Publishes awaiting their confirm at once, per broker handle.
pub const MAX_UNCONFIRMED: usize = 512;

/// A publish whose confirm has not come within this time (or within
/// [`Options::confirm_timeout`], when shorter) retires the shared publish
/// channel: it is closed, which fails the publishes awaiting their confirm
/// on it ([`Error::NotConfirmed`]: their callers publish again), and later
/// publishes go out on a new channel. A nack retires it too, closed once
/// the publishes on it are settled. Why: a RabbitMQ channel whose first
/// publish to a quorum queue raced the election of the queue's new leader
/// (the node of the old one was just lost) nacks every publish to that
/// queue for as long as it lives, or holds their confirms for tens of
/// seconds first; a new channel reaches the new leader at once.
pub const CONFIRM_STALL: Duration = Duration::from_secs(5);

/// The youngest publish channel a nack or a stalled confirm retires, so
/// that a queue that is merely full (its nacks are [`Error::QueueFull`])
/// costs at most four new channels a second.
const RETIRE_MIN_AGE: Duration = Duration::from_millis(250);

/// The shared publish channel, and what retiring it needs.
struct Publisher {
    channel: Channel,
    opened: Instant,
    /// Publishes awaiting their confirm on it.
    pending: AtomicUsize,
    /// Woken when `pending` drops to zero.
    idle: tokio::sync::Notify,
}

/// One publish awaiting its confirm on a [`Publisher`], however it ends.
struct Pending(Arc<Publisher>);

impl Pending {
    fn new(publisher: &Arc<Publisher>) -> Self {
        publisher.pending.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(publisher))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Publisher {
    /// Waits until no publish awaits its confirm on it.
    async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// The exchange calls are published to, with the service as routing key:
/// a topic exchange, so that RabbitMQ's topic permissions can limit the
/// services a client may call. Every call queue is bound to it.
pub const CALLS_EXCHANGE: &str = "callq.calls";

/// The exchange of the high band's calls (priority 5 and up), alike with
/// the service as routing key; every high-band queue is bound to it.
pub const HIGH_CALLS_EXCHANGE: &str = "callq.calls.high";

/// The exchange calls of `band` are published to.
pub fn calls_exchange(band: Band) -> &'static str {
    match band {
        Band::Normal => CALLS_EXCHANGE,
        Band::High => HIGH_CALLS_EXCHANGE,
    }
}

/// How the adapter connects.
#[derive(Debug, Clone)]
pub struct Options {
    /// `amqp://user:password@host:port/vhost[?heartbeat=N]`; a cluster's
    /// nodes as `amqp://user:password@host1:port1,host2:port2,host3:port3/vhost`
    /// (or whole URLs separated by commas), between which connections fail
    /// over (see "A cluster of nodes" in the crate's docs).
    pub url: String,
    /// The connection name RabbitMQ shows (`rabbitmqctl list_connections`).
    pub name: String,
    /// Every wait on the broker but a publish confirm.
    pub timeout: Duration,
    /// How long a publish waits for its confirm.
    pub confirm_timeout: Duration,
    /// Connections kept at most, for publishing and for consuming each.
    /// Channels share them; one of each is enough for a worker, and each
    /// costs memory (see [`DEFAULT_FRAME_MAX`]).
    pub pool_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            name: "callq".into(),
            timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(30),
            pool_size: 1,
        }
    }
}

/// A RabbitMQ broker: cheap to clone and share.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// Connections of consumers, declares and depth reads.
    pool: Pool,
    /// Connections of the publish channel.
    publish_pool: Pool,
    /// Bounds the publishes awaiting their confirm.
    in_flight: tokio::sync::Semaphore,
    opts: Options,
    /// Where the broker is, without the credentials: for messages.
    place: String,
    /// The user the connection logs in as, stamped as `user_id` on every
    /// publish (none when the URL names no user).
    user: Option<ShortString>,
    /// The channel in confirm mode every publish shares.
    publisher: tokio::sync::Mutex<Option<Arc<Publisher>>>,
    /// The channel for declares and depth; replaced after a channel error.
    admin: tokio::sync::Mutex<Option<Channel>>,
    /// The specs this process declared: the maximum length a nack means and
    /// where a dead letter goes.
    specs: Mutex<HashMap<String, QueueSpec>>,
    /// The leases of this process's consumers, by queue.
    leases: Mutex<HashMap<String, Vec<Weak<Lease>>>>,
}

/// A consumer's hold on its deliveries.
#[derive(Default)]
struct Lease {
    /// True once the consumer is dropped or its channel ended.
    gone: AtomicBool,
    /// Deliveries received and not settled.
    held: AtomicU64,
}

impl Lease {
    fn release_one(&self) {
        let _ = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("at", &self.inner.place)
            .finish_non_exhaustive()
    }
}

impl AmqpBroker {
    /// Connects to the RabbitMQ at `url` with default [`Options`].
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(Options {
            url: url.into(),
            ..Options::default()
        })
        .await
    }

    /// Connects with the given options; fails when the broker cannot be
    /// reached within [`Options::timeout`].
    pub async fn connect_with(opts: Options) -> Result<Self, Error> {
        let (nodes, per_node) = connect::nodes(
            &opts.url,
            DEFAULT_HEARTBEAT_SECS,
            DEFAULT_FRAME_MAX,
            opts.timeout,
        )?;
        let first = &nodes[0].uri;
        let place = format!(
            "{}/{}",
            nodes
                .iter()
                .map(|n| n.place.as_str())
                .collect::<Vec<_>>()
                .join(","),
            first.vhost
        );
        let user = Some(first.authority.userinfo.username.as_str())
            .filter(|u| !u.is_empty() && u.len() <= MAX_QUEUE_NAME)
            .map(ShortString::from);
        // A connection may try every node once, after a backoff pause.
        let budget = opts.timeout + RECONNECT_CAP;
        let config = deadpool::managed::PoolConfig {
            max_size: opts.pool_size.max(1),
            timeouts: deadpool::managed::Timeouts {
                wait: Some(budget),
                create: Some(budget),
                recycle: Some(opts.timeout),
            },
            ..deadpool::managed::PoolConfig::default()
        };
        // Publishes get connections of their own: RabbitMQ throttles a
        // publishing connection (flow control) by no longer reading from it,
        // which would hold up the acks of consumers sharing it.
        let make_pool = |role: &str| {
            let connector = Connector::new(
                nodes.clone(),
                format!("{} ({role})", opts.name),
                per_node,
                random_index(nodes.len()),
            );
            Pool::builder(connector)
                .config(config)
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .map_err(|e| Error::Refused(format!("RabbitMQ connection pool: {e}")))
        };
        let pool = make_pool("consume")?;
        let publish_pool = make_pool("publish")?;
        let broker = Self {
            inner: Arc::new(Inner {
                pool,
                publish_pool,
                in_flight: tokio::sync::Semaphore::new(MAX_UNCONFIRMED),
                place,
                user,
                opts,
                publisher: tokio::sync::Mutex::default(),
                admin: tokio::sync::Mutex::default(),
                specs: Mutex::default(),
                leases: Mutex::default(),
            }),
        };
        // Fail now, with a clear message, if the broker is not there.
        broker.inner.channel().await?;
        Ok(broker)
    }

    /// Where the broker is (host, port, virtual host; no credentials).
    pub fn place(&self) -> &str {
        &self.inner.place
    }
}

/// The reply code of the AMQP error behind a lapin error, if any.
fn amqp_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

const NOT_FOUND: u16 = 404;
const ACCESS_REFUSED: u16 = 403;
const RESOURCE_LOCKED: u16 = 405;
const PRECONDITION_FAILED: u16 = 406;

impl Inner {
    async fn within<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<Result<T, lapin::Error>, Error> {
        tokio::time::timeout(self.opts.timeout, f)
            .await
            .map_err(|_| {
                warn!(at = %self.place, "RabbitMQ did not answer {what} within {:?}", self.opts.timeout);
                Error::Timeout(self.opts.timeout)
            })
    }

    fn connection_error(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Connection(format!("{what} on RabbitMQ at {}: {e}", self.place))
    }

    /// A new channel on a pooled connection.
    async fn channel(&self) -> Result<Channel, Error> {
        self.channel_of(&self.pool).await
    }

    /// A new channel on a connection of `pool`.
    async fn channel_of(&self, pool: &Pool) -> Result<Channel, Error> {
        let budget = self.opts.timeout + RECONNECT_CAP;
        let conn = tokio::time::timeout(budget, pool.get())
            .await
            .map_err(|_| Error::Timeout(budget))?
            .map_err(|e| self.connection_error("connecting", e))?;
        self.within("channel.open", conn.create_channel())
            .await?
            .map_err(|e| self.connection_error("opening a channel", e))
    }

    /// The shared channel of declares and depth reads, or a new one. One
    /// task opens it while the others wait.
    async fn admin(&self) -> Result<Channel, Error> {
        let mut slot = tokio::time::timeout(self.opts.timeout, self.admin.lock())
            .await
            .map_err(|_| Error::Timeout(self.opts.timeout))?;
        if let Some(ch) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let ch = self.channel().await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// The shared publish channel, in confirm mode, or a new one. One task
    /// opens it while the others wait: a burst of publishes on a fresh
    /// broker shares one channel instead of opening one each.
    async fn publisher(&self) -> Result<Arc<Publisher>, Error> {
        let mut slot = tokio::time::timeout(self.opts.timeout, self.publisher.lock())
            .await
            .map_err(|_| Error::Timeout(self.opts.timeout))?;
        if let Some(p) = slot.as_ref()
            && p.channel.status().connected()
        {
            return Ok(Arc::clone(p));
        }
        let ch = self.channel_of(&self.publish_pool).await?;
        self.within(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?
        .map_err(|e| self.connection_error("confirm.select", e))?;
        let publisher = Arc::new(Publisher {
            channel: ch,
            opened: Instant::now(),
            pending: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        });
        *slot = Some(Arc::clone(&publisher));
        Ok(publisher)
    }

    /// Takes `publisher` out of use for new publishes when it is still the
    /// shared publish channel and at least [`RETIRE_MIN_AGE`] old, and
    /// closes it: `now`, or once the publishes awaiting their confirm on
    /// it are settled (at most [`Options::confirm_timeout`] later). See
    /// [`CONFIRM_STALL`].
    async fn retire(&self, publisher: &Arc<Publisher>, why: &str, now: bool) {
        let Ok(mut slot) = tokio::time::timeout(self.opts.timeout, self.publisher.lock()).await
        else {
            return;
        };
        let current = slot
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, publisher) && p.opened.elapsed() >= RETIRE_MIN_AGE);
        if !current {
            return;
        }
        *slot = None;
        drop(slot);
        warn!(at = %self.place, "publishing on a new channel: {why}");
        let (old, wait, timeout) = (
            Arc::clone(publisher),
            self.opts.confirm_timeout,
            self.opts.timeout,
        );
        tokio::spawn(async move {
            if !now {
                let _ = tokio::time::timeout(wait, old.settled()).await;
            }
            if old.channel.status().connected() {
                let close = old
                    .channel
                    .close(200, ShortString::from("publish channel retired"));
                if let Ok(Err(e)) = tokio::time::timeout(timeout, close).await {
                    debug!("closing a retired publish channel: {e}");
                }
            }
        });
    }

    fn spec(&self, queue: &str) -> Option<QueueSpec> {
        lock(&self.specs).get(queue).cloned()
    }

    async fn declare_one(&self, spec: &QueueSpec) -> Result<(), Error> {
        let ch = self.admin().await?;
        let options = QueueDeclareOptions {
            durable: !spec.transient,
            ..QueueDeclareOptions::default()
        };
        match self
            .within(
                "queue.declare",
                ch.queue_declare(queue_name(&spec.name)?, options, arguments(spec)),
            )
            .await?
        {
            Ok(_) => match call_queue_band(&spec.name) {
                Some((service, band)) => self.bind_calls(&ch, &spec.name, service, band).await,
                None => Ok(()),
            },
            Err(e) => Err(match amqp_code(&e) {
                Some(PRECONDITION_FAILED) => Error::Refused(format!(
                    "queue `{}` exists with other settings than callq declares ({e}); \
                     delete it or declare it alike",
                    spec.name
                )),
                Some(ACCESS_REFUSED) => {
                    Error::Refused(format!("declaring queue `{}`: {e}", spec.name))
                }
                _ => self.connection_error(&format!("declaring queue `{}`", spec.name), e),
            }),
        }
    }

    /// Declares the exchange of a call queue's band ([`CALLS_EXCHANGE`] or
    /// [`HIGH_CALLS_EXCHANGE`]) and binds the queue to it.
    async fn bind_calls(
        &self,
        ch: &Channel,
        queue: &str,
        service: &str,
        band: Band,
    ) -> Result<(), Error> {
        let exchange = calls_exchange(band);
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let declared = self
            .within(
                "exchange.declare",
                ch.exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    options,
                    FieldTable::default(),
                ),
            )
            .await?;
        let bound = match declared {
            Ok(()) => {
                self.within(
                    "queue.bind",
                    ch.queue_bind(
                        queue_name(queue)?,
                        exchange.into(),
                        queue_name(service)?,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await?
            }
            Err(e) => Err(e),
        };
        bound.map_err(|e| match amqp_code(&e) {
            Some(PRECONDITION_FAILED | ACCESS_REFUSED) => Error::Refused(format!(
                "binding queue `{queue}` to the exchange `{exchange}` (a topic exchange \
                 callq declares): {e}"
            )),
            _ => self.connection_error(&format!("binding queue `{queue}`"), e),
        })
    }

    /// A channel with the prefetch set, consuming `queue`.
    async fn open_consumer(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<(Channel, lapin::Consumer), Error> {
        let ch = self.channel().await?;
        self.within(
            "basic.qos",
            ch.basic_qos(prefetch, BasicQosOptions { global: false }),
        )
        .await?
        .map_err(|e| self.connection_error("basic.qos", e))?;
        let consumed = self
            .within(
                "basic.consume",
                ch.basic_consume(
                    queue_name(queue)?,
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        match consumed {
            Ok(stream) => Ok((ch, stream)),
            Err(e) => Err(match amqp_code(&e) {
                Some(NOT_FOUND) => Error::NoSuchQueue(queue.into()),
                Some(ACCESS_REFUSED | RESOURCE_LOCKED) => {
                    Error::Refused(format!("consuming `{queue}`: {e}"))
                }
                _ => self.connection_error(&format!("consuming `{queue}`"), e),
            }),
        }
    }

    /// Publishes and waits for the confirm.
    async fn publish_props(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), Error> {
        // Publishes awaiting their confirm are bounded: past that, a burst
        // waits here instead of piling up in the client library.
        let _slot = tokio::time::timeout(self.opts.confirm_timeout, self.in_flight.acquire())
            .await
            .map_err(|_| Error::NotConfirmed("too many publishes awaiting confirms".into()))?
            .map_err(|_| Error::Closed)?;
        let (exchange, routing_key) = match call_queue_band(queue) {
            Some((service, band)) => (calls_exchange(band), service),
            None => ("", queue),
        };
        let routing_key = queue_name(routing_key)?;
        // RabbitMQ refuses a `user_id` other than the connection's user, so
        // a copy of another's message (a release) carries ours.
        let props = match &self.user {
            Some(user) => props.with_user_id(user.clone()),
            None => props,
        };
        let publisher = self.publisher().await?;
        let _pending = Pending::new(&publisher);
        let ch = &publisher.channel;
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let confirm = match self
            .within(
                "basic.publish",
                ch.basic_publish(exchange.into(), routing_key, options, body, props),
            )
            .await
        {
            Ok(Ok(confirm)) => confirm,
            Ok(Err(e)) if amqp_code(&e) == Some(NOT_FOUND) => {
                return Err(Error::NoSuchQueue(queue.into()));
            }
            Ok(Err(e)) => return Err(Error::NotConfirmed(format!("publishing: {e}"))),
            Err(_) => return Err(Error::NotConfirmed("the publish timed out".into())),
        };
        let stall = CONFIRM_STALL.min(self.opts.confirm_timeout);
        let mut confirm = confirm;
        let confirmed = match tokio::time::timeout(stall, &mut confirm).await {
            Ok(confirmed) => Ok(confirmed),
            Err(_) => {
                let why = format!("no confirm within {stall:?}");
                self.retire(&publisher, &why, true).await;
                tokio::time::timeout(self.opts.confirm_timeout.saturating_sub(stall), confirm).await
            }
        };
        if matches!(confirmed, Ok(Ok(Confirmation::Nack(_)))) {
            let why = format!("a nack for `{queue}`");
            self.retire(&publisher, &why, false).await;
        }
        match confirmed {
            Err(_) => Err(Error::NotConfirmed(format!(
                "no confirm within {:?}",
                self.opts.confirm_timeout
            ))),
            // No exchange of the calls yet: no call queue of the band was ever
            // declared.
            Ok(Err(e)) if amqp_code(&e) == Some(NOT_FOUND) => Err(Error::NoSuchQueue(queue.into())),
            Ok(Err(e)) => Err(Error::NotConfirmed(e.to_string())),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(Error::NoSuchQueue(queue.into())),
            Ok(Ok(Confirmation::Nack(_))) => {
                Err(match self.spec(queue).and_then(|s| s.max_length) {
                    Some(max) => Error::QueueFull {
                        queue: queue.into(),
                        max,
                    },
                    None => Error::NotConfirmed(format!(
                        "RabbitMQ refused to store the message in `{queue}` (nack): \
                     the queue may be full"
                    )),
                })
            }
            Ok(Ok(Confirmation::NotRequested)) => Err(Error::NotConfirmed(
                "the channel is not in confirm mode".into(),
            )),
        }
    }
}

/// The longest queue name AMQP 0-9-1 carries (a short string).
const MAX_QUEUE_NAME: usize = 255;

/// A queue name as the protocol carries it. A longer name can name no
/// queue: it is refused here, since the client library would panic on it.
fn queue_name(name: &str) -> Result<ShortString, Error> {
    if name.len() > MAX_QUEUE_NAME {
        return Err(Error::NoSuchQueue(format!(
            "{}... ({} bytes: a queue name has at most {MAX_QUEUE_NAME})",
            name.chars().take(64).collect::<String>(),
            name.len()
        )));
    }
    Ok(name.into())
}

/// The queue arguments a spec maps to.
fn arguments(spec: &QueueSpec) -> FieldTable {
    let mut args = FieldTable::default();
    let mut set = |k: &str, v: AMQPValue| {
        args.insert(k.into(), v);
    };
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    if !spec.transient {
        set("x-queue-type", text("quorum"));
    }
    if let Some(expires) = spec.expires {
        let ms = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
        set("x-expires", AMQPValue::LongLongInt(ms));
    }
    if let Some(max) = spec.max_length {
        // A quorum queue refuses publishes once it holds more than its
        // limit, so it holds one more than `x-max-length`.
        let limit = if spec.transient {
            max
        } else {
            max.saturating_sub(1)
        };
        set(
            "x-max-length",
            AMQPValue::LongLongInt(i64::try_from(limit).unwrap_or(i64::MAX)),
        );
    }
    if spec.max_length.is_some() || (spec.dead_letter.is_some() && !spec.transient) {
        // Refuse instead of dropping; at-least-once dead-lettering needs it.
        set("x-overflow", text("reject-publish"));
    }
    if let Some(limit) = spec.delivery_limit {
        set("x-delivery-limit", AMQPValue::LongLongInt(i64::from(limit)));
    }
    // What the broker dead-letters itself has passed the delivery limit.
    if let Some(dead) = spec.past_limit_queue() {
        set("x-dead-letter-exchange", text(""));
        set("x-dead-letter-routing-key", text(dead));
        if !spec.transient {
            set("x-dead-letter-strategy", text("at-least-once"));
        }
    }
    if spec.single_active_consumer {
        set("x-single-active-consumer", AMQPValue::Boolean(true));
    }
    args
}

/// A contract message's AMQP properties.
fn properties(headers: &Headers) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(
            k.as_str().into(),
            AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
        );
    }
    // AMQP timestamps are whole seconds; RabbitMQ keeps none of its own.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_timestamp(now)
        .with_headers(table)
}

/// A header's value as text, for the values a string can stand for.
fn text_of(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// Whether RabbitMQ set this header itself (delivery count, death
/// history), so that a copy of the message must not carry it.
fn is_broker_header(key: &str) -> bool {
    key == "x-delivery-count"
        || key == "x-death"
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
}

/// The contract's view of a delivery's headers and delivery count.
fn delivery_headers(props: &BasicProperties, redelivered: bool) -> (Headers, u32) {
    let mut headers = Headers::new();
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            if let Some(text) = text_of(v) {
                headers.insert(k.as_str().to_owned(), text);
            }
        }
    }
    let released: Option<u32> = headers.get(RELEASED_HEADER).and_then(|n| n.parse().ok());
    let count = headers
        .get("x-delivery-count")
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(u32::from(redelivered && released.is_none()))
        .saturating_add(released.unwrap_or(0));
    if !headers.contains_key(DEAD_REASON_HEADER)
        && let Some(reason) = headers.get("x-first-death-reason").cloned()
    {
        headers.insert(DEAD_REASON_HEADER.into(), reason);
    }
    (headers, count)
}

#[async_trait]
impl Broker for AmqpBroker {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), Error> {
        if let Some(dead_spec) = spec.dead_letter_spec()? {
            self.inner.declare_one(&dead_spec).await?;
            lock(&self.inner.specs)
                .entry(dead_spec.name.clone())
                .or_insert(dead_spec);
        }
        if let Some(past_spec) = spec.limit_dead_letter_spec()? {
            self.inner.declare_one(&past_spec).await?;
            lock(&self.inner.specs).insert(past_spec.name.clone(), past_spec);
        }
        self.inner.declare_one(spec).await?;
        lock(&self.inner.specs).insert(spec.name.clone(), spec.clone());
        Ok(())
    }

    async fn publish(&self, queue: &str, message: Message) -> Result<(), Error> {
        let mut props = properties(&message.headers);
        if self.inner.spec(queue).is_some_and(|s| s.transient) {
            // Kept in memory only: nothing for the broker to write.
            props = props.with_delivery_mode(1);
        }
        self.inner.publish_props(queue, &message.body, props).await
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>, Error> {
        if prefetch == 0 {
            return Err(Error::Refused(
                "a consumer needs a prefetch of at least 1".into(),
            ));
        }
        let inner = &self.inner;
        // A quorum queue another connection declared a moment ago may not
        // run yet: its consume fails with INTERNAL_ERROR. Such failures are
        // retried briefly, each on a new channel (the failed one is closed).
        let mut backoff = Duration::from_millis(25);
        let (ch, stream) = loop {
            match inner.open_consumer(queue, prefetch).await {
                Ok(opened) => break opened,
                Err(Error::Connection(e)) if backoff < Duration::from_secs(2) => {
                    debug!(queue, "consume failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => return Err(e),
            }
        };
        let lease = Arc::new(Lease::default());
        {
            let mut leases = lock(&inner.leases);
            let list = leases.entry(queue.to_owned()).or_default();
            list.retain(|l| l.strong_count() > 0);
            list.push(Arc::downgrade(&lease));
        }
        let spec = inner.spec(queue);
        let limit = spec.as_ref().and_then(|s| s.delivery_limit);
        let past_limit = spec
            .as_ref()
            .and_then(|s| s.past_limit_queue().map(str::to_owned));
        let dead = spec.and_then(|s| s.dead_letter);
        Ok(Box::new(AmqpConsumer {
            inner: Arc::clone(inner),
            channel: ch,
            stream,
            lease,
            queue: queue.to_owned(),
            dead,
            past_limit,
            limit,
            ended: false,
        }))
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        let inner = &self.inner;
        let declared = self.passive(queue, "reading the depth").await?;
        let unsettled = lock(&inner.leases).get(queue).map_or(0, |list| {
            list.iter()
                .filter_map(Weak::upgrade)
                .filter(|l| !l.gone.load(Ordering::Acquire))
                .map(|l| l.held.load(Ordering::Acquire))
                .sum()
        });
        Ok(QueueDepth {
            ready: u64::from(declared.message_count()),
            unsettled,
        })
    }

    async fn consumers(&self, queue: &str) -> Result<Option<u64>, Error> {
        match self.passive(queue, "counting the consumers").await {
            Ok(declared) => Ok(Some(u64::from(declared.consumer_count()))),
            Err(Error::NoSuchQueue(_)) => Ok(Some(0)),
            Err(e) => Err(e),
        }
    }
}

impl AmqpBroker {
    /// The queue as a passive `queue.declare` reports it: its ready count
    /// and its consumers. `doing` says what for, in errors.
    async fn passive(&self, queue: &str, doing: &str) -> Result<lapin::Queue, Error> {
        let inner = &self.inner;
        let ch = inner.admin().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        inner
            .within(
                "queue.declare (passive)",
                ch.queue_declare(queue_name(queue)?, options, FieldTable::default()),
            )
            .await?
            .map_err(|e| match amqp_code(&e) {
                Some(NOT_FOUND) => Error::NoSuchQueue(queue.into()),
                _ => inner.connection_error(&format!("{doing} of `{queue}`"), e),
            })
    }
}

struct AmqpConsumer {
    inner: Arc<Inner>,
    channel: Channel,
    stream: lapin::Consumer,
    lease: Arc<Lease>,
    queue: String,
    dead: Option<String>,
    /// Where a message past the delivery limit goes.
    past_limit: Option<String>,
    /// The queue's delivery limit, which the adapter enforces itself on
    /// released copies (the quorum queue counts their deliveries afresh).
    limit: Option<u32>,
    ended: bool,
}

impl AmqpConsumer {
    fn end(&mut self) {
        self.ended = true;
        self.lease.gone.store(true, Ordering::Release);
        self.lease.held.store(0, Ordering::Release);
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        if self.ended {
            return None;
        }
        loop {
            let d = match self.stream.next().await {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    warn!(queue = %self.queue, at = %self.inner.place, "consumer ended: {e}");
                    self.end();
                    return None;
                }
                None => {
                    debug!(queue = %self.queue, "consumer cancelled");
                    self.end();
                    return None;
                }
            };
            self.lease.held.fetch_add(1, Ordering::AcqRel);
            let (headers, count) = delivery_headers(&d.properties, d.redelivered);
            let body = Bytes::from(d.data);
            let publisher = d.properties.user_id().as_ref().map(|u| u.to_string());
            let settle = Box::new(AmqpSettle {
                inner: Arc::clone(&self.inner),
                acker: d.acker,
                lease: Arc::clone(&self.lease),
                queue: self.queue.clone(),
                count,
                released: headers.contains_key(RELEASED_HEADER),
                limit: self.limit,
                dead: self.dead.clone(),
                past_limit: self.past_limit.clone(),
                body: body.clone(),
                properties: d.properties,
            });
            let released = settle.released;
            if released && self.limit.is_some_and(|limit| count > limit) {
                // Past the limit by the count it carried: moved on here
                // (a requeue of it is), in a task of its own so that `next`
                // stays cancel-safe.
                debug!(queue = %self.queue, count, "released copy past the delivery limit: dead-lettering");
                tokio::spawn(callq_broker::Settle::settle(settle, Disposition::Requeue));
                continue;
            }
            return Some(Ok(Delivery::new(
                body,
                headers,
                d.redelivered || released,
                count,
                self.queue.clone(),
                settle,
            )
            .with_publisher(publisher)));
        }
    }

    async fn close(mut self: Box<Self>) {
        self.end();
        if self.channel.status().connected() {
            let close = self
                .channel
                .close(200, ShortString::from("consumer closed"));
            match tokio::time::timeout(self.inner.opts.timeout, close).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(queue = %self.queue, "closing a consumer's channel: {e}"),
                Err(_) => warn!(queue = %self.queue, "closing a consumer's channel timed out"),
            }
        }
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        self.end();
        // Closing the channel returns its unacked deliveries to the queue.
        let channel = self.channel.clone();
        let timeout = self.inner.opts.timeout;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if channel.status().connected() {
                    let close = channel.close(200, ShortString::from("consumer dropped"));
                    if let Ok(Err(e)) = tokio::time::timeout(timeout, close).await {
                        debug!("closing a consumer's channel: {e}");
                    }
                }
            });
        }
    }
}

struct AmqpSettle {
    inner: Arc<Inner>,
    acker: Acker,
    lease: Arc<Lease>,
    /// The queue it came from, where a released copy goes.
    queue: String,
    /// Its delivery count, which a released copy carries on.
    count: u32,
    /// Whether it is a released copy, and the queue's delivery limit.
    released: bool,
    limit: Option<u32>,
    dead: Option<String>,
    past_limit: Option<String>,
    body: Bytes,
    properties: BasicProperties,
}

impl AmqpSettle {
    /// Maps an acker's outcome: `false` or an error means the channel, and
    /// with it the lease, is gone.
    fn outcome(&self, sent: Result<bool, lapin::Error>) -> Result<(), Error> {
        match sent {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::LeaseLost),
            Err(e) => {
                debug!("settling a delivery: {e}");
                Err(Error::LeaseLost)
            }
        }
    }

    /// A released copy: the message's own headers (not the broker's), and
    /// its delivery count in [`RELEASED_HEADER`].
    fn released_properties(&self) -> BasicProperties {
        let mut table = FieldTable::default();
        if let Some(headers) = self.properties.headers() {
            for (k, v) in headers.inner() {
                if !is_broker_header(k.as_str()) {
                    table.insert(k.clone(), v.clone());
                }
            }
        }
        table.insert(
            RELEASED_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.count.to_string().into_bytes())),
        );
        self.properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(table)
    }

    /// A copy of the message for the dead-letter queue, with the reason:
    /// the message's own headers, not the broker's nor the count a released
    /// copy carried (the queue it goes to counts its deliveries afresh).
    fn dead_letter_properties(&self, reason: &str) -> BasicProperties {
        let mut table = FieldTable::default();
        if let Some(headers) = self.properties.headers() {
            for (k, v) in headers.inner() {
                if !is_broker_header(k.as_str()) && k.as_str() != RELEASED_HEADER {
                    table.insert(k.clone(), v.clone());
                }
            }
        }
        table.insert(
            DEAD_REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason.as_bytes().to_vec())),
        );
        self.properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(table)
    }
}

#[async_trait]
impl callq_broker::Settle for AmqpSettle {
    async fn settle(self: Box<Self>, disposition: Disposition) -> Result<(), Error> {
        if self.lease.gone.load(Ordering::Acquire) {
            return Err(Error::LeaseLost);
        }
        let timeout = self.inner.opts.timeout;
        // A settle that does not go out in time is as good as lost: the
        // channel is stuck, and its deliveries return when it closes.
        async fn bounded(
            timeout: Duration,
            f: impl Future<Output = Result<bool, lapin::Error>>,
        ) -> Result<bool, lapin::Error> {
            tokio::time::timeout(timeout, f).await.unwrap_or(Ok(false))
        }
        // A released copy's deliveries are counted afresh by the quorum
        // queue: the adapter applies the limit to the count it carries.
        let (disposition, to) = match disposition {
            Disposition::Requeue
                if self.released && self.limit.is_some_and(|limit| self.count >= limit) =>
            {
                let reason = "delivery_limit".into();
                (Disposition::DeadLetter { reason }, &self.past_limit)
            }
            other => (other, &self.dead),
        };
        let sent = match disposition {
            Disposition::Ack => bounded(timeout, self.acker.ack(BasicAckOptions::default())).await,
            Disposition::Requeue => {
                let requeue = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                bounded(timeout, self.acker.nack(requeue)).await
            }
            Disposition::Release => {
                let props = self.released_properties();
                if let Err(e) = self
                    .inner
                    .publish_props(&self.queue, &self.body, props)
                    .await
                {
                    // Not copied: the delivery stays held and returns when
                    // its channel closes; the caller learns of it.
                    self.lease.release_one();
                    return Err(e);
                }
                bounded(timeout, self.acker.ack(BasicAckOptions::default())).await
            }
            Disposition::DeadLetter { reason } => match to {
                Some(dead) => {
                    let props = self.dead_letter_properties(&reason);
                    if let Err(e) = self.inner.publish_props(dead, &self.body, props).await {
                        // Keep the message: it comes back and is settled again.
                        let requeue = BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        };
                        let _ = bounded(timeout, self.acker.nack(requeue)).await;
                        self.lease.release_one();
                        return Err(e);
                    }
                    bounded(timeout, self.acker.ack(BasicAckOptions::default())).await
                }
                // Declared elsewhere: the broker's own dead-lettering, if any.
                None => {
                    bounded(
                        timeout,
                        self.acker.reject(BasicRejectOptions { requeue: false }),
                    )
                    .await
                }
            },
        };
        self.lease.release_one();
        self.outcome(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_queues_are_quorum_queues_with_limits() {
        let args = arguments(&QueueSpec::calls("echo"));
        let get = |k: &str| args.inner().get(k).and_then(text_of);
        assert_eq!(get("x-queue-type").as_deref(), Some("quorum"));
        assert_eq!(get("x-overflow").as_deref(), Some("reject-publish"));
        assert_eq!(get("x-delivery-limit").as_deref(), Some("5"));
        assert_eq!(
            get("x-dead-letter-routing-key").as_deref(),
            Some("callq.lost.echo")
        );
        let Ok(Some(lost)) = QueueSpec::calls("echo").limit_dead_letter_spec() else {
            panic!("a call queue has a queue for calls past the limit");
        };
        let lost = arguments(&lost);
        let get_lost = |k: &str| lost.inner().get(k).and_then(text_of);
        assert_eq!(get_lost("x-queue-type").as_deref(), Some("quorum"));
        assert_eq!(get_lost("x-delivery-limit"), None);
        assert_eq!(
            get_lost("x-dead-letter-routing-key").as_deref(),
            Some("callq.dead.echo")
        );
        assert_eq!(
            get("x-dead-letter-strategy").as_deref(),
            Some("at-least-once")
        );
        let control = arguments(&QueueSpec::control("callq.worker.w1"));
        assert!(control.inner().get("x-queue-type").is_none());
        assert!(control.inner().get("x-expires").is_some());
        let replies = arguments(&QueueSpec::replies("c1"));
        assert_eq!(
            replies
                .inner()
                .get("x-expires")
                .and_then(text_of)
                .as_deref(),
            Some("3600000")
        );
        assert!(
            arguments(&QueueSpec::calls("echo"))
                .inner()
                .get("x-expires")
                .is_none()
        );
        let coordinator = arguments(&QueueSpec::coordinator());
        assert_eq!(
            coordinator
                .inner()
                .get("x-single-active-consumer")
                .and_then(text_of)
                .as_deref(),
            Some("true")
        );
        // Heartbeats: a classic queue (no Raft log, no fsync), one consumer.
        let beats = arguments(&QueueSpec::heartbeats());
        assert!(beats.inner().get("x-queue-type").is_none());
        assert_eq!(
            beats
                .inner()
                .get("x-single-active-consumer")
                .and_then(text_of)
                .as_deref(),
            Some("true")
        );
    }

    #[test]
    fn delivery_count_and_dead_reason_come_from_broker_headers() {
        let mut table = FieldTable::default();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        table.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString(LongString::from(b"delivery_limit".to_vec())),
        );
        table.insert("callq-attempt".into(), AMQPValue::LongInt(3));
        let props = BasicProperties::default().with_headers(table);
        let (headers, count) = delivery_headers(&props, true);
        assert_eq!(count, 2);
        assert_eq!(
            headers.get(DEAD_REASON_HEADER).map(String::as_str),
            Some("delivery_limit")
        );
        assert_eq!(headers.get("callq-attempt").map(String::as_str), Some("3"));
        let (_, first) = delivery_headers(&BasicProperties::default(), false);
        assert_eq!(first, 0);
        let (_, classic) = delivery_headers(&BasicProperties::default(), true);
        assert_eq!(classic, 1);
    }
}
