//! The Kafka adapter of callq, on `rdkafka` (librdkafka).
//!
//! Kafka is a log, not a queue: it has no per-message acknowledgement, no
//! requeue, no delivery count and no maximum length. The adapter supplies
//! them on top of a topic per queue and a consumer group per queue, and keeps
//! the contract's guarantees (see the table) with the deviations listed under
//! *Limits*.
//!
//! | contract | Kafka |
//! |---|---|
//! | a queue | a topic of the same name (`callq.call.<service>`, ...), created by [`Broker::declare`] when missing with [`Options::partitions`] partitions (one for a [`QueueSpec::single_active_consumer`] queue) and [`Options::replication`] |
//! | [`QueueSpec::max_length`] | enforced by the publishing process (Kafka has none): it counts the backlog, high watermark minus the group's committed offset, summed over partitions, and refuses a publish that would pass the maximum with [`Error::QueueFull`], after a fresh read of the backlog. The backlog includes unsettled deliveries and finished ones not yet committed, which is stricter than guarantee 6. See *Limits* |
//! | [`QueueSpec::delivery_limit`] | counted by the adapter: a delivery whose count passes the limit is not handed out but published to the limit topic ([`QueueSpec::limit_dead_letter`]) or else the dead-letter topic with reason `delivery_limit`; a [`Disposition::Requeue`] that would pass it goes there at once |
//! | [`QueueSpec::dead_letter`] | a topic of that name, declared along with the queue; a dead letter is a confirmed copy there carrying [`DEAD_REASON_HEADER`] |
//! | [`QueueSpec::limit_dead_letter`] | a topic of that name, declared along with the queue, before it |
//! | [`QueueSpec::single_active_consumer`] | a one-partition topic: one member of the group holds it, the others wait and one takes over in the rebalance when it leaves |
//! | [`QueueSpec::transient`] | stored like any topic (stricter than the contract asks) |
//! | [`QueueSpec::expires`] | the topic's `retention.ms`: messages older than that are deleted whether consumed or not; the topic itself stays (Kafka has no idle-topic deletion) |
//! | [`Message::key`] | the record key: Kafka's partitioner keeps one key on one partition, in order |
//! | [`Message::partition`] | the record's partition, chosen instead of the key's (callq's coordinator re-issues a dead worker's call into a live worker's partition) |
//! | [`Consumer::assignment`] | the partitions the consumer holds, updated by its rebalance callbacks |
//! | queue names | topic names, after [`Options::topic_prefix`] (none by default) |
//! | publish | an idempotent producer (`enable.idempotence`, `acks=all`) shared by the broker handle; [`Broker::publish`] returns once the delivery report says the record is stored (the contract's confirm), bounded by [`Options::confirm_timeout`] (`message.timeout.ms`), with at most [`Options::max_in_flight`] publishes awaiting their report |
//! | consume | a consumer group per queue (id: [`Options::group_prefix`] + queue name), `enable.auto.commit=false` and `enable.auto.offset.store=false`, served by a thread per consumer. Deliveries of one partition are handed out concurrently up to the prefetch, and the adapter commits, per partition, the lowest unfinished offset (see `src/track.rs`): a slow delivery holds the commit back and never loses a later one |
//! | prefetch | the thread reads records from a queue per partition (split off the consumer's queue) only while the consumer holds fewer than its prefetch; librdkafka fetches ahead into those queues at most `queued.min.messages` (= the prefetch) per partition and `queued.max.messages.kbytes` (1 MiB) in all |
//! | rebalance | on revocation the adapter stops handing out deliveries of the revoked partitions, waits up to [`Options::revoke_wait`] for those in hand, commits what finished, and lets go; settling one of them later fails with [`Error::LeaseLost`], and whatever was not committed is delivered again to the next owner |
//! | [`Consumer::close`], drop | the consumer commits what finished and leaves the group (`LeaveGroup`), so the next member takes over at once; its unsettled deliveries are read again by the next owner. A later [`Broker::consume`] of the same queue in this process waits for such a leave |
//! | [`Delivery::redelivered`](callq_broker::Delivery::redelivered), [`Delivery::delivery_count`](callq_broker::Delivery::delivery_count) | the count: the record's `callq-delivery-count` header (set by a requeue) plus how often this process handed out that record (topic, partition, offset) before, shared by all consumers of one [`KafkaBroker`] and bounded ([`Options::seen_capacity`]). The flag: a count above 0, or a record that was in the partition when this consumer took it from an earlier owner (below the partition's end then; a partition with no committed offset had no owner, since each owner commits on first taking one) |
//! | [`Disposition::Ack`] | marks the offset finished; the commit follows within [`COMMIT_INTERVAL`] |
//! | [`Disposition::Requeue`] | publishes a copy to the same topic (same key, same headers) with `callq-delivery-count` one higher, then marks the original finished: the copy goes to the back of the partition |
//! | [`Disposition::Release`] | the same copy with the count unchanged and the `callq-released` header, which sets `redelivered` on its delivery |
//! | [`Disposition::DeadLetter`] | publishes a copy to the dead-letter topic with [`DEAD_REASON_HEADER`], then marks the original finished; without a dead-letter queue the message is dropped |
//! | a failed requeue or dead-letter publish | the delivery returns to the consumer, which hands it out again (count one higher); [`Delivery::settle`](callq_broker::Delivery::settle) returns the error |
//! | [`Broker::depth`] | ready: the backlog (see `max_length`) less the unsettled deliveries; unsettled: deliveries held by this process's consumers of the queue (Kafka knows nothing of the others) |
//! | [`Error::NoSuchQueue`] | a topic this process neither declared nor finds in the cluster's metadata; the producer never asks the broker to create topics (`allow.auto.create.topics=false`) |
//!
//! # Limits
//!
//! - **Delivery counts across processes.** A record read again by another
//!   process (after a crash, or a rebalance to a consumer elsewhere) carries
//!   only the count of its `callq-delivery-count` header: its count may be
//!   too low, and the delivery limit then counts from there. It does come
//!   with `redelivered` set (as does every record that waited in a
//!   partition taken from an earlier owner, delivered or not). callq keeps
//!   the cross-process attempt count in the coordinator's ledger, and its
//!   workers apply the delivery limit to it. Within one process (one
//!   [`KafkaBroker`]) counts are exact until more than
//!   [`Options::seen_capacity`] records are in play.
//! - **`max_length` across processes.** Each publishing process enforces the
//!   bound with its own count; a read older than [`BOUND_READ_AGE`] is renewed,
//!   so several publishers may together pass the bound by what they publish
//!   in that time. A process that did not declare the queue (a worker
//!   publishing to a client's reply topic) does not know its bound and does
//!   not enforce it.
//! - **Ordering.** Guarantee 5 (FIFO for a single consumer) holds per
//!   partition: for a queue of one partition (the default), or per key.
//!   A requeued message goes to the back of its partition.
//! - **Parallelism.** A partition is held by one member of the group: a
//!   queue is consumed by at most [`Options::partitions`] consumers at once.
//! - **Rebalances.** Kafka's classic (eager) rebalance stops every member of
//!   the group while it runs; a consumer that joins or leaves makes the
//!   others pause briefly.
//! - **Connection loss.** librdkafka reconnects by itself, so a consumer
//!   does not end ([`Consumer::next`] does not return `None`) when the
//!   connection drops. Its partitions stay its own until the group session
//!   expires ([`Options::session_timeout`]); then they are revoked as lost,
//!   settling their deliveries fails with [`Error::LeaseLost`], and the next
//!   owner gets them again.
//! - **A delivery dropped without settling** holds its partition's commit
//!   and a place of the prefetch until its consumer ends, as an unacked
//!   AMQP delivery does.
//!
//! Every wait on the network is bounded by [`Options::timeout`], and a
//! publish by [`Options::confirm_timeout`]; the consumer's thread commits on
//! revocation and on leaving synchronously, where [`Consumer::close`] waits
//! for it no longer than [`Options::timeout`].
//!
//! # TLS
//!
//! `kafkas://host:port[,host:port...]` ([`Options::tls`]) speaks TLS to
//! every broker (librdkafka's `security.protocol=ssl`, with the system's
//! OpenSSL): each broker's certificate must name the host the client
//! reached it by (`ssl.endpoint.identification.algorithm=https`), the
//! bootstrap servers' and those the cluster's metadata advertises alike,
//! and chain to a CA of the PEM file that the variable `SSL_CERT_FILE`
//! names, or else of the system's store (`ssl.ca.location=probe`:
//! librdkafka looks for the usual bundles, such as Debian's
//! `/etc/ssl/certs/ca-certificates.crt`). A client certificate is two
//! librdkafka settings in the URL: `ssl.certificate.location` and
//! `ssl.key.location` (PEM files); any `ssl.*` setting in the URL wins over
//! the adapter's. When no broker answers, [`KafkaBroker::connect`] fails
//! after [`Options::timeout`] with librdkafka's last complaint about the
//! brokers: a certificate the client does not trust or that names another
//! host, "SSL handshake failed: ... certificate verify failed"; a plain
//! `kafka://` connection that the broker closes before it answers the
//! first request (as a port that takes only TLS does), the hint to use
//! `kafkas://`.
//!
//! # Brokers
//!
//! Tested against tansu 0.6 (`scripts/kafka` starts it), which has bugs a
//! real Kafka does not (`tests/tansu.rs` shows them): it holds every fetch
//! for its full `fetch.wait.max.ms` even when records arrive, which adds up
//! to [`Options::fetch_wait`] to each delivery (the tests use 10 ms), and
//! its high watermark counts a batch of records as one record, so that
//! [`Broker::depth`] and the `max_length` count under-report a queue that
//! received batched (concurrent) publishes. It also drops the metadata of
//! offset commits, which the adapter does not use.
#![forbid(unsafe_code)]

mod consumer;
mod tap;
mod track;

pub use tap::{KafkaTap, TapFrom, TapRange};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callq_broker::{
    Broker, Consumer, DEAD_REASON_HEADER, Disposition, Error, Headers, Message, QueueDepth,
    QueueSpec,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::consumer::Shared;
use crate::track::{Admit, Bound, Seen};

/// The URL used when none is configured: a Kafka broker on this machine.
pub const DEFAULT_URL: &str = "kafka://127.0.0.1:9092";

/// The variable naming the PEM file of the CAs a `kafkas://` connection
/// trusts instead of the system's (as OpenSSL and rustls read it).
pub const CA_FILE_VAR: &str = "SSL_CERT_FILE";

/// The header in which a requeued copy carries its delivery count.
pub const DELIVERY_COUNT_HEADER: &str = "callq-delivery-count";

/// How often a consumer sends the commits of settled deliveries, at most.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(20);

/// How old a read of a bounded queue's backlog may be before a publish reads
/// it again (see [`QueueSpec::max_length`] in the crate docs).
pub const BOUND_READ_AGE: Duration = Duration::from_secs(1);

/// Consumer groups whose committed offsets a broker handle keeps a client
/// open for (for [`Broker::depth`] and `max_length`); past that the oldest
/// is closed.
const PROBES: usize = 8;

/// How the adapter connects and what it creates.
#[derive(Debug, Clone)]
pub struct Options {
    /// The bootstrap servers: `host:port[,host:port...]`.
    pub bootstrap: String,
    /// Partitions of a topic the adapter creates (a single active consumer
    /// queue always gets one). More partitions let more consumers share a
    /// queue, at the cost of ordering across keys (see *Limits*).
    pub partitions: i32,
    /// Replication factor of a topic the adapter creates; `None`: the
    /// cluster's default.
    pub replication: Option<i32>,
    /// The consumer group of a queue is this prefix and the queue's name.
    pub group_prefix: String,
    /// The topic of a queue is this prefix and the queue's name: clusters
    /// sharing one Kafka stay apart, as RabbitMQ virtual hosts keep them
    /// (empty by default: the wire contract's names). Deliveries name the
    /// topic.
    pub topic_prefix: String,
    /// The client id the brokers see.
    pub client_id: String,
    /// Every wait on the broker but a publish.
    pub timeout: Duration,
    /// How long a publish waits for its delivery report
    /// (`message.timeout.ms`).
    pub confirm_timeout: Duration,
    /// The consumer group session timeout: how long a consumer that stopped
    /// heartbeating (a crashed process) keeps its partitions. Kafka refuses
    /// less than its `group.min.session.timeout.ms` (6 s by default).
    pub session_timeout: Duration,
    /// How long a rebalance waits for the deliveries in hand of a revoked
    /// partition to be settled before it lets the partition go.
    pub revoke_wait: Duration,
    /// How long the broker may hold a fetch that finds no records
    /// (`fetch.wait.max.ms`). Kafka answers as soon as records arrive, so
    /// this costs no latency there; a broker that holds every fetch for
    /// this long (tansu 0.6) delays each delivery by up to this much.
    pub fetch_wait: Duration,
    /// Publishes awaiting their delivery report at once, per broker handle.
    pub max_in_flight: usize,
    /// Records whose hand-outs this process counts at most (see
    /// [`Delivery::delivery_count`](callq_broker::Delivery::delivery_count) in the crate docs).
    pub seen_capacity: usize,
    /// TLS to every broker (`kafkas://`; see *TLS* in the crate docs):
    /// `security.protocol=ssl`, the brokers' certificates checked against
    /// their host names and the CAs of `SSL_CERT_FILE` or the system.
    pub tls: bool,
    /// Further librdkafka settings for every client (security, tuning),
    /// applied last.
    pub librdkafka: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bootstrap: "127.0.0.1:9092".into(),
            partitions: 1,
            replication: None,
            group_prefix: String::new(),
            topic_prefix: String::new(),
            client_id: "callq".into(),
            timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            revoke_wait: Duration::from_secs(3),
            fetch_wait: Duration::from_millis(100),
            max_in_flight: 512,
            seen_capacity: 100_000,
            tls: false,
            librdkafka: Vec::new(),
        }
    }
}

impl Options {
    /// Options from a URL: `kafka://host:port[,host:port...][?key=value&...]`
    /// (the `kafka://` may be left out), or `kafkas://...` for TLS (see
    /// [`Options::tls`]). Keys: `partitions`, `replication`,
    /// `group_prefix`, `topic_prefix`, `client_id`, `session_timeout_ms`, `revoke_wait_ms`,
    /// `fetch_wait_ms`, `timeout_ms`, `confirm_timeout_ms`; any other key containing a dot is
    /// passed to librdkafka as it is (`ssl.key.location=/etc/callq/client.key`).
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let (tls, rest) = match url.strip_prefix("kafkas://") {
            Some(rest) => (true, rest),
            None => (false, url.strip_prefix("kafka://").unwrap_or(url)),
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() || hosts.contains('@') || hosts.contains('/') {
            return Err(Error::Refused(format!(
                "not a Kafka URL: `{url}` (expected kafka://host:port[,host:port...], or \
                 kafkas://host:port[,host:port...] for TLS)"
            )));
        }
        let mut opts = Options {
            bootstrap: hosts.to_owned(),
            tls,
            ..Options::default()
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = || Error::Refused(format!("bad value in the Kafka URL: `{pair}`"));
            let ms = |v: &str| {
                v.parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| bad())
            };
            match key {
                "partitions" => {
                    opts.partitions = value.parse().ok().filter(|n| *n >= 1).ok_or_else(bad)?
                }
                "replication" => opts.replication = Some(value.parse().map_err(|_| bad())?),
                "group_prefix" => opts.group_prefix = value.to_owned(),
                "topic_prefix" => opts.topic_prefix = value.to_owned(),
                "client_id" => opts.client_id = value.to_owned(),
                "session_timeout_ms" => opts.session_timeout = ms(value)?,
                "revoke_wait_ms" => opts.revoke_wait = ms(value)?,
                "fetch_wait_ms" => opts.fetch_wait = ms(value)?,
                "timeout_ms" => opts.timeout = ms(value)?,
                "confirm_timeout_ms" => opts.confirm_timeout = ms(value)?,
                k if k.contains('.') => opts.librdkafka.push((k.to_owned(), value.to_owned())),
                _ => {
                    return Err(Error::Refused(format!(
                        "unknown setting `{key}` in the Kafka URL"
                    )));
                }
            }
        }
        Ok(opts)
    }

    /// Settings every client of the adapter shares.
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", &self.client_id)
            .set("socket.timeout.ms", millis(self.timeout).to_string())
            .set("allow.auto.create.topics", "false")
            .set("reconnect.backoff.max.ms", "1000");
        if self.tls {
            config
                .set("security.protocol", "ssl")
                .set("ssl.endpoint.identification.algorithm", "https")
                .set(
                    "ssl.ca.location",
                    ca_file().unwrap_or_else(|| "probe".to_owned()),
                );
        }
        config
    }

    /// For TLS: fails, saying why, when the CA file that `SSL_CERT_FILE`
    /// names (and no `ssl.ca.*` setting of the URL replaces) cannot be read.
    fn check_ca_file(&self) -> Result<(), Error> {
        if !self.tls
            || self
                .librdkafka
                .iter()
                .any(|(k, _)| k.starts_with("ssl.ca."))
        {
            return Ok(());
        }
        let Some(value) = std::env::var_os(CA_FILE_VAR).filter(|v| !v.is_empty()) else {
            return Ok(());
        };
        let path = value.to_str().ok_or_else(|| {
            Error::Refused(format!(
                "{CA_FILE_VAR} is not valid UTF-8: librdkafka takes the CA file's name as text"
            ))
        })?;
        std::fs::File::open(path).map(drop).map_err(|e| {
            Error::Refused(format!(
                "{CA_FILE_VAR}={path} names the CAs a kafkas:// connection trusts, but the file \
                 cannot be read: {e}"
            ))
        })
    }

    fn apply_extra(&self, config: &mut ClientConfig) {
        for (k, v) in &self.librdkafka {
            config.set(k, v);
        }
    }
}

/// The PEM file of the CAs to trust that `SSL_CERT_FILE` names, if any.
fn ca_file() -> Option<String> {
    std::env::var(CA_FILE_VAR).ok().filter(|v| !v.is_empty())
}

/// The producer's callbacks: librdkafka's last complaint about the brokers
/// (a closed connection, a refused TLS handshake), for the error when none
/// answers. Its log lines are debug events.
#[derive(Clone, Default)]
pub(crate) struct Watch {
    last: Arc<Mutex<Option<String>>>,
}

impl ClientContext for Watch {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, line: &str) {
        debug!("librdkafka producer {fac}: {line}");
        // A broker connection that failed: a disconnect is logged (at
        // info), not reported as an error.
        if fac == "FAIL" {
            *lock(&self.last) = Some(line.to_owned());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        debug!("Kafka producer: {error}: {reason}");
        // "1/1 brokers are down" follows the reason it repeats.
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *lock(&self.last) = Some(reason.to_owned());
        }
    }
}

impl Watch {
    /// The last complaint, if any.
    fn last(&self) -> Option<String> {
        lock(&self.last).clone()
    }
}

/// The instant `d` from now, or a year from now where `d` is longer.
pub(crate) fn deadline_in(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A Kafka broker: cheap to clone and share.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("bootstrap", &self.inner.opts.bootstrap)
            .finish_non_exhaustive()
    }
}

/// A bounded queue's admission, and the lock its backlog reads take.
type BoundSlot = (Bound, Arc<tokio::sync::Mutex<()>>);

pub(crate) struct Inner {
    pub(crate) opts: Options,
    producer: FutureProducer<Watch>,
    admin: AdminClient<DefaultClientContext>,
    /// Bounds the publishes awaiting their delivery report.
    in_flight: tokio::sync::Semaphore,
    /// The specs this process declared.
    specs: Mutex<HashMap<String, QueueSpec>>,
    /// Partition counts of the topics known to exist.
    partitions: Mutex<HashMap<String, i32>>,
    /// Admission of publishes to bounded queues, with the lock that makes
    /// one task read the backlog while the others wait for its result.
    bounds: Mutex<HashMap<String, BoundSlot>>,
    /// How often this process handed out each record.
    pub(crate) seen: Mutex<Seen>,
    /// Clients that read a group's committed offsets, by group id.
    probes: Mutex<Vec<(String, Arc<BaseConsumer>)>>,
    /// This process's consumers, by queue.
    consumers: Mutex<HashMap<String, Vec<Arc<Shared>>>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl KafkaBroker {
    /// Connects to the Kafka cluster at `url` (see [`Options::from_url`]).
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(Options::from_url(url)?).await
    }

    /// Connects with the given options; fails when no broker answers within
    /// [`Options::timeout`].
    pub async fn connect_with(opts: Options) -> Result<Self, Error> {
        if opts.partitions < 1 {
            return Err(Error::Refused(
                "a topic needs at least one partition".into(),
            ));
        }
        opts.check_ca_file()?;
        let mut config = opts.client_config();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                millis(opts.confirm_timeout).to_string(),
            )
            .set("linger.ms", "1")
            .set(
                // Room for the adapter's own requeues and dead letters,
                // which the in-flight bound does not hold back.
                "queue.buffering.max.messages",
                opts.max_in_flight.max(1).saturating_mul(2).to_string(),
            );
        opts.apply_extra(&mut config);
        // Connection failures are logged at info: let them reach the Watch.
        config.set_log_level(RDKafkaLogLevel::Info);
        let watch = Watch::default();
        let producer: FutureProducer<Watch> = config
            .create_with_context(watch.clone())
            .map_err(|e| Error::Refused(format!("Kafka producer settings: {e}")))?;
        let mut config = opts.client_config();
        opts.apply_extra(&mut config);
        let admin: AdminClient<DefaultClientContext> = config
            .create()
            .map_err(|e| Error::Refused(format!("Kafka admin client settings: {e}")))?;
        let inner = Arc::new(Inner {
            in_flight: tokio::sync::Semaphore::new(
                opts.max_in_flight
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            ),
            seen: Mutex::new(Seen::new(opts.seen_capacity)),
            opts,
            producer,
            admin,
            specs: Mutex::default(),
            partitions: Mutex::default(),
            bounds: Mutex::default(),
            probes: Mutex::default(),
            consumers: Mutex::default(),
        });
        // Fail now, with a clear message, if no broker is there.
        let producer = inner.producer.clone();
        let timeout = inner.opts.timeout;
        let bootstrap = inner.opts.bootstrap.clone();
        let tls = inner.opts.tls;
        let scheme = if tls { "kafkas" } else { "kafka" };
        inner
            .blocking("reading the cluster's metadata", move || {
                producer
                    .client()
                    .fetch_metadata(None, timeout)
                    .map(|_| ())
                    .map_err(|e| {
                        let why = format!("Kafka metadata from {scheme}://{bootstrap}: {e}");
                        Error::Connection(match watch.last() {
                            // A plain connection closed before the broker
                            // answered its first request: a TLS port's way.
                            Some(last) if !tls && last.contains("APIVERSION_QUERY") => format!(
                                "{why}; the brokers' last error: {last} (a broker that takes \
                                 only TLS there needs kafkas://)"
                            ),
                            Some(last) => format!("{why}; the brokers' last error: {last}"),
                            None => why,
                        })
                    })
            })
            .await?;
        Ok(Self { inner })
    }

    /// The bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.inner.opts.bootstrap
    }
}

/// A delivery report as the producer's future yields it.
type Report = Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

/// What a delivery report (or its absence within `wait`) means for a
/// publish.
fn reported(queue: &str, wait: Duration, report: Option<Report>) -> Result<(), Error> {
    match report {
        None => Err(Error::NotConfirmed(format!(
            "no delivery report within {wait:?}"
        ))),
        Some(Err(_)) => Err(Error::NotConfirmed("the producer was shut down".into())),
        Some(Ok(Ok(_))) => Ok(()),
        Some(Ok(Err((e, _)))) => Err(produce_error(queue, &e)),
    }
}

/// Runs `future` on this thread until it completes, for at most `limit`.
fn block_on<F: std::future::Future>(future: F, limit: Duration) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    let deadline = deadline_in(limit);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Some(output);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// Whether `name` can be a Kafka topic.
fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What a produce error means for the contract.
fn produce_error(queue: &str, e: &KafkaError) -> Error {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => {
            Error::NoSuchQueue(queue.into())
        }
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge) => {
            Error::Refused(format!(
                "the message is too large for topic `{queue}` ({e}): it was not stored"
            ))
        }
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidTopic
            | C::InvalidRecord,
        ) => Error::Refused(format!("publishing to `{queue}`: {e}")),
        Some(C::MessageTimedOut) => {
            Error::NotConfirmed(format!("no delivery report in time ({e})"))
        }
        _ => Error::NotConfirmed(e.to_string()),
    }
}

/// A record of `body` for `queue`, with its key and headers.
fn record<'a>(
    queue: &'a str,
    key: Option<&'a [u8]>,
    partition: Option<u32>,
    body: &'a [u8],
    headers: &Headers,
) -> FutureRecord<'a, [u8], [u8]> {
    let mut record = FutureRecord::<[u8], [u8]>::to(queue)
        .payload(body)
        .headers(kafka_headers(headers));
    if let Some(key) = key {
        record = record.key(key);
    }
    match partition.and_then(|p| i32::try_from(p).ok()) {
        Some(p) => record.partition(p),
        None => record,
    }
}

/// Headers as librdkafka takes them.
fn kafka_headers(headers: &Headers) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        },
    )
}

impl Inner {
    /// Runs a blocking librdkafka call off the runtime, bounded by the
    /// timeout (the call itself is bounded by it too).
    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let limit = self.opts.timeout.saturating_add(Duration::from_secs(1));
        match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(Error::Connection(format!("{what}: {e}"))),
            Err(_) => {
                warn!(bootstrap = %self.opts.bootstrap, "Kafka did not answer {what} within {limit:?}");
                Err(Error::Timeout(self.opts.timeout))
            }
        }
    }

    pub(crate) fn spec(&self, queue: &str) -> Option<QueueSpec> {
        lock(&self.specs).get(queue).cloned()
    }

    /// The partition count of `topic`, from the cache or the cluster's
    /// metadata; `NoSuchQueue` when the cluster does not have it.
    async fn partition_count(&self, topic: &str) -> Result<i32, Error> {
        if let Some(n) = lock(&self.partitions).get(topic) {
            return Ok(*n);
        }
        if !valid_topic(topic) {
            // No topic has such a name, and librdkafka's metadata request
            // for one panics in the client: refuse before asking.
            return Err(Error::NoSuchQueue(format!(
                "{}... (not a Kafka topic name: at most 249 of a-z, A-Z, 0-9, `.`, `_`, `-`)",
                topic.chars().take(64).collect::<String>()
            )));
        }
        let n = self.metadata_partitions(topic).await?;
        match n {
            Some(n) => {
                lock(&self.partitions).insert(topic.to_owned(), n);
                Ok(n)
            }
            None => Err(Error::NoSuchQueue(topic.to_owned())),
        }
    }

    /// The partition count of `topic` in the cluster's metadata; `None` when
    /// it has no such topic.
    async fn metadata_partitions(&self, topic: &str) -> Result<Option<i32>, Error> {
        let producer = self.producer.clone();
        let timeout = self.opts.timeout;
        let name = topic.to_owned();
        self.blocking("reading topic metadata", move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&name), timeout)
                .map_err(|e| Error::Connection(format!("Kafka metadata of `{name}`: {e}")))?;
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == name)
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)))
        })
        .await
    }

    async fn declare_one(&self, spec: &QueueSpec) -> Result<(), Error> {
        let name = spec.name.as_str();
        if !valid_topic(name) {
            return Err(Error::Refused(format!(
                "`{name}` cannot be a Kafka topic: use at most 249 of a-z, A-Z, 0-9, `.`, `_`, `-`"
            )));
        }
        let partitions = if spec.single_active_consumer {
            1
        } else {
            self.opts.partitions
        };
        let retention = spec.expires.map(|e| millis(e).max(1).to_string());
        let mut topic = NewTopic::new(
            name,
            partitions,
            TopicReplication::Fixed(self.opts.replication.unwrap_or(-1)),
        );
        if let Some(ms) = &retention {
            topic = topic.set("retention.ms", ms);
        }
        let admin_opts = AdminOptions::new()
            .request_timeout(Some(self.opts.timeout))
            .operation_timeout(Some(self.opts.timeout));
        let created = tokio::time::timeout(
            self.opts.timeout.saturating_add(Duration::from_secs(1)),
            self.admin.create_topics([&topic], &admin_opts),
        )
        .await
        .map_err(|_| Error::Timeout(self.opts.timeout))?
        .map_err(|e| Error::Connection(format!("creating topic `{name}`: {e}")))?;
        for result in created {
            match result {
                Ok(_) => debug!(topic = name, partitions, "topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    use RDKafkaErrorCode as C;
                    return Err(match code {
                        C::InvalidTopic
                        | C::InvalidPartitions
                        | C::InvalidReplicationFactor
                        | C::InvalidConfig
                        | C::PolicyViolation
                        | C::TopicAuthorizationFailed
                        | C::ClusterAuthorizationFailed
                        | C::InvalidRequest => {
                            Error::Refused(format!("creating topic `{name}`: {code}"))
                        }
                        _ => Error::Connection(format!("creating topic `{name}`: {code}")),
                    });
                }
            }
        }
        // Creation is asynchronous in Kafka: wait until the metadata shows
        // the topic, so that a publish or consume right after finds it.
        let deadline = deadline_in(self.opts.timeout);
        let mut pause = Duration::from_millis(10);
        let count = loop {
            if let Some(n) = self.metadata_partitions(name).await? {
                break n;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(self.opts.timeout));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        };
        if spec.single_active_consumer && count != 1 {
            return Err(Error::Refused(format!(
                "topic `{name}` has {count} partitions: a single active consumer queue needs one; \
                 delete it or declare it alike"
            )));
        }
        lock(&self.partitions).insert(name.to_owned(), count);
        Ok(())
    }

    /// Whether `queue` exists: declared here, or in the cluster's metadata.
    async fn ensure_exists(&self, queue: &str) -> Result<(), Error> {
        if lock(&self.specs).contains_key(queue) {
            return Ok(());
        }
        self.partition_count(queue).await.map(|_| ())
    }

    /// Publishes and waits for the delivery report. `bounded`: apply the
    /// queue's maximum length (the adapter's own requeues and dead letters
    /// do not: their message is counted already).
    pub(crate) async fn send(
        &self,
        queue: &str,
        key: Option<&[u8]>,
        partition: Option<u32>,
        body: &[u8],
        headers: &Headers,
        bounded: bool,
    ) -> Result<(), Error> {
        let bound = if bounded {
            self.admit(queue).await?
        } else {
            None
        };
        let result = self.produce(queue, key, partition, body, headers).await;
        if let Some(queue) = bound
            && let Some((b, _)) = lock(&self.bounds).get_mut(&queue)
        {
            b.done(result.is_ok());
        }
        result
    }

    async fn produce(
        &self,
        queue: &str,
        key: Option<&[u8]>,
        partition: Option<u32>,
        body: &[u8],
        headers: &Headers,
    ) -> Result<(), Error> {
        let wait = self.opts.confirm_timeout;
        let _slot = tokio::time::timeout(wait, self.in_flight.acquire())
            .await
            .map_err(|_| {
                Error::NotConfirmed("too many publishes awaiting delivery reports".into())
            })?
            .map_err(|_| Error::Closed)?;
        let record = record(queue, key, partition, body, headers);
        let report = match self.producer.send_result(record) {
            Ok(report) => report,
            Err((e, _)) => return Err(produce_error(queue, &e)),
        };
        // librdkafka reports within message.timeout.ms; the margin covers
        // the report's own way back.
        let limit = wait.saturating_add(Duration::from_secs(1));
        reported(queue, wait, tokio::time::timeout(limit, report).await.ok())
    }

    /// Publishes from a thread outside the runtime (a consumer's) and blocks
    /// until the delivery report, bounded by the confirm timeout. Unbounded
    /// by `max_length`, like every publish of the adapter's own.
    pub(crate) fn send_blocking(
        &self,
        queue: &str,
        key: Option<&[u8]>,
        body: &[u8],
        headers: &Headers,
    ) -> Result<(), Error> {
        let record = record(queue, key, None, body, headers);
        let report = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| produce_error(queue, &e))?;
        let wait = self.opts.confirm_timeout;
        let limit = wait.saturating_add(Duration::from_secs(1));
        reported(queue, wait, block_on(report, limit))
    }

    /// Admits a publish to `queue` under its maximum length; returns the
    /// queue to report the outcome to, `None` when it is unbounded.
    async fn admit(&self, queue: &str) -> Result<Option<String>, Error> {
        let Some(max) = self.spec(queue).and_then(|s| s.max_length) else {
            return Ok(None);
        };
        let started = Instant::now();
        let reading = {
            let mut bounds = lock(&self.bounds);
            let (b, reading) = bounds.entry(queue.to_owned()).or_insert_with(|| {
                (
                    Bound::new(max as u64),
                    Arc::new(tokio::sync::Mutex::new(())),
                )
            });
            b.max = max as u64;
            match b.admit(started, BOUND_READ_AGE) {
                Admit::Yes => return Ok(Some(queue.to_owned())),
                Admit::YesRefresh => None,
                Admit::Read => Some(Arc::clone(reading)),
            }
        };
        let Some(reading) = reading else {
            // Far from the bound: this publisher renews the stale read, the
            // others go on meanwhile.
            let backlog = self.backlog(queue).await;
            if let Some((b, _)) = lock(&self.bounds).get_mut(queue) {
                match backlog {
                    Ok(n) => b.read(n, Instant::now()),
                    Err(e) => {
                        debug!(queue, "renewing the backlog count: {e}");
                        b.refresh_failed();
                    }
                }
            }
            return Ok(Some(queue.to_owned()));
        };
        let _reading = tokio::time::timeout(self.opts.timeout, reading.lock())
            .await
            .map_err(|_| Error::Timeout(self.opts.timeout))?;
        let reused = lock(&self.bounds)
            .get(queue)
            .is_some_and(|(b, _)| b.read_since(started));
        if !reused {
            let backlog = self.backlog(queue).await?;
            if let Some((b, _)) = lock(&self.bounds).get_mut(queue) {
                b.read(backlog, Instant::now());
            }
        }
        let admitted = lock(&self.bounds)
            .get_mut(queue)
            .is_some_and(|(b, _)| b.admit_after_read());
        if admitted {
            Ok(Some(queue.to_owned()))
        } else {
            Err(Error::QueueFull {
                queue: queue.to_owned(),
                max,
            })
        }
    }

    /// The client that reads the committed offsets of `group`.
    fn probe(&self, group: &str) -> Result<Arc<BaseConsumer>, Error> {
        let mut probes = lock(&self.probes);
        if let Some((_, probe)) = probes.iter().find(|(g, _)| g == group) {
            return Ok(Arc::clone(probe));
        }
        let mut config = self.opts.client_config();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        self.opts.apply_extra(&mut config);
        let probe: Arc<BaseConsumer> = Arc::new(
            config
                .create()
                .map_err(|e| Error::Refused(format!("Kafka consumer settings: {e}")))?,
        );
        if probes.len() >= PROBES {
            probes.remove(0);
        }
        probes.push((group.to_owned(), Arc::clone(&probe)));
        Ok(probe)
    }

    pub(crate) fn group(&self, queue: &str) -> String {
        format!("{}{queue}", self.opts.group_prefix)
    }

    /// The backlog of `queue`: high watermark minus the group's committed
    /// offset (or the low watermark where it has none), summed over
    /// partitions.
    async fn backlog(&self, queue: &str) -> Result<u64, Error> {
        let partitions = self.partition_count(queue).await?;
        let probe = self.probe(&self.group(queue))?;
        let timeout = self.opts.timeout;
        let topic = queue.to_owned();
        self.blocking("reading offsets", move || {
            let fail = |e: KafkaError| -> Error {
                match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                        Error::NoSuchQueue(topic.clone())
                    }
                    _ => Error::Connection(format!("reading the offsets of `{topic}`: {e}")),
                }
            };
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&topic, p);
            }
            let committed = probe.committed_offsets(tpl, timeout).map_err(fail)?;
            let mut backlog = 0u64;
            for p in 0..partitions {
                let (low, high) = probe.fetch_watermarks(&topic, p, timeout).map_err(fail)?;
                let from = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(c)) => c.max(low),
                    _ => low,
                };
                backlog += u64::try_from(high.saturating_sub(from)).unwrap_or(0);
            }
            Ok(backlog)
        })
        .await
    }

    /// Consumers of `queue` in this process that are still in the group.
    fn consumers_of(&self, queue: &str) -> Vec<Arc<Shared>> {
        let mut consumers = lock(&self.consumers);
        let list = consumers.entry(queue.to_owned()).or_default();
        list.retain(|c| !c.has_left());
        list.clone()
    }
}

impl KafkaBroker {
    /// The topic of a queue.
    fn topic(&self, queue: &str) -> String {
        format!("{}{queue}", self.inner.opts.topic_prefix)
    }

    /// A queue's spec with topic names.
    fn topic_spec(&self, spec: &QueueSpec) -> QueueSpec {
        let mut spec = spec.clone();
        spec.name = self.topic(&spec.name);
        spec.dead_letter = spec.dead_letter.map(|d| self.topic(&d));
        spec.limit_dead_letter = spec.limit_dead_letter.map(|d| self.topic(&d));
        spec
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), Error> {
        let inner = &self.inner;
        let spec = &self.topic_spec(spec);
        if let Some(dead_spec) = spec.dead_letter_spec()? {
            inner.declare_one(&dead_spec).await?;
            lock(&inner.specs)
                .entry(dead_spec.name.clone())
                .or_insert(dead_spec);
        }
        if let Some(past_spec) = spec.limit_dead_letter_spec()? {
            inner.declare_one(&past_spec).await?;
            lock(&inner.specs).insert(past_spec.name.clone(), past_spec);
        }
        inner.declare_one(spec).await?;
        lock(&inner.specs).insert(spec.name.clone(), spec.clone());
        Ok(())
    }

    async fn publish(&self, queue: &str, message: Message) -> Result<(), Error> {
        let inner = &self.inner;
        let queue = &self.topic(queue);
        inner.ensure_exists(queue).await?;
        let key = message.key.as_deref().map(str::as_bytes);
        inner
            .send(
                queue,
                key,
                message.partition,
                &message.body,
                &message.headers,
                true,
            )
            .await
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>, Error> {
        if prefetch == 0 {
            return Err(Error::Refused(
                "a consumer needs a prefetch of at least 1".into(),
            ));
        }
        let inner = &self.inner;
        let queue = &self.topic(queue);
        inner.ensure_exists(queue).await?;
        // A consumer of this queue that was dropped a moment ago may still
        // be leaving the group: joining now would make this one wait for the
        // rebalance its leave starts. Wait for it to be gone.
        for old in inner.consumers_of(queue) {
            if old.is_stopping()
                && tokio::time::timeout(inner.opts.timeout, old.left())
                    .await
                    .is_err()
            {
                warn!(queue, "a closed consumer did not leave its group in time");
            }
        }
        let consumer = consumer::open(Arc::clone(inner), queue, prefetch)?;
        let mut consumers = lock(&inner.consumers);
        consumers.retain(|_, list| {
            list.retain(|c| !c.has_left());
            !list.is_empty()
        });
        consumers
            .entry(queue.to_owned())
            .or_default()
            .push(consumer.shared());
        Ok(Box::new(consumer))
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        let inner = &self.inner;
        let queue = &self.topic(queue);
        inner.ensure_exists(queue).await?;
        let backlog = inner.backlog(queue).await?;
        let unsettled: u64 = inner
            .consumers_of(queue)
            .iter()
            .map(|c| c.unsettled() as u64)
            .sum();
        Ok(QueueDepth {
            ready: backlog.saturating_sub(unsettled),
            unsettled,
        })
    }

    async fn partitions(&self, queue: &str) -> Result<Option<u32>, Error> {
        let topic = self.topic(queue);
        self.inner.ensure_exists(&topic).await?;
        let n = self.inner.partition_count(&topic).await?;
        Ok(Some(u32::try_from(n).unwrap_or(0)))
    }
}

/// The headers a delivery shows: the record's, less the adapter's own.
fn visible_headers(raw: &Headers) -> Headers {
    raw.iter()
        .filter(|(k, _)| k.as_str() != DELIVERY_COUNT_HEADER)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The headers of a dead letter: the message's (not the count a released
/// copy carried: the queue it goes to counts afresh), with the reason.
fn dead_letter_headers(visible: &Headers, reason: &str) -> Headers {
    let mut headers = visible.clone();
    headers.remove(callq_broker::RELEASED_HEADER);
    headers.insert(DEAD_REASON_HEADER.into(), reason.into());
    headers
}

/// The delivery count a record's headers carry.
fn header_count(raw: &Headers) -> u32 {
    raw.get(DELIVERY_COUNT_HEADER)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What settling means for one delivery, decided before the broker is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Mark finished.
    Finish,
    /// Publish a copy with this delivery count to the same topic, then
    /// mark finished; `true`: as a released copy (flagged redelivered).
    Republish(u32, bool),
    /// Publish to this dead-letter topic with this reason, then mark
    /// finished.
    DeadLetter(String, String),
}

/// The one place where a disposition maps onto Kafka.
fn fate(disposition: Disposition, count: u32, spec: Option<&QueueSpec>) -> Fate {
    let limit = spec.and_then(|s| s.delivery_limit);
    let dead_letter = |to: Option<&str>, reason: String| match to {
        Some(dead) => Fate::DeadLetter(dead.to_owned(), reason),
        // No dead-letter queue: a dead letter is dropped.
        None => Fate::Finish,
    };
    let dead = spec.and_then(|s| s.dead_letter.as_deref());
    let past = spec.and_then(QueueSpec::past_limit_queue);
    match disposition {
        Disposition::Ack => Fate::Finish,
        Disposition::Requeue => match limit {
            // The redelivery would be delivery `count + 1`, past the limit.
            Some(limit) if count >= limit => dead_letter(past, "delivery_limit".into()),
            _ => Fate::Republish(count.saturating_add(1), false),
        },
        Disposition::Release => Fate::Republish(count, true),
        Disposition::DeadLetter { reason } => dead_letter(dead, reason),
    }
}

/// Whether a delivery with this count is past the queue's limit: it goes to
/// the dead-letter queue instead of the consumer.
fn past_limit(count: u32, spec: Option<&QueueSpec>) -> bool {
    spec.and_then(|s| s.delivery_limit)
        .is_some_and(|limit| count > limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_bootstrap_servers_and_settings() {
        let o = Options::from_url("kafka://127.0.0.1:9092").expect("plain");
        assert_eq!(o.bootstrap, "127.0.0.1:9092");
        assert_eq!(o.partitions, 1);
        let o = Options::from_url(
            "kafka://a:1,b:2/?partitions=3&session_timeout_ms=2000&security.protocol=SSL",
        )
        .expect("with settings");
        assert_eq!(o.bootstrap, "a:1,b:2");
        assert_eq!(o.partitions, 3);
        assert_eq!(o.session_timeout, Duration::from_secs(2));
        assert_eq!(
            o.librdkafka,
            vec![("security.protocol".to_string(), "SSL".to_string())]
        );
        assert_eq!(Options::from_url("h:1").expect("bare").bootstrap, "h:1");
        assert!(Options::from_url("kafka://").is_err());
        assert!(Options::from_url("kafka://h:1?partitions=0").is_err());
        assert!(Options::from_url("kafka://h:1?nonsense=1").is_err());
        assert!(Options::from_url("kafka://user:pw@h:1").is_err());
    }

    #[test]
    fn kafkas_urls_speak_tls_and_check_the_host_name() {
        let plain = Options::from_url("kafka://h:1").expect("plain");
        assert!(!plain.tls);
        assert_eq!(plain.client_config().get("security.protocol"), None);
        let o = Options::from_url("kafkas://a:1,b:2?ssl.key.location=/k&partitions=2")
            .expect("with TLS");
        assert!(o.tls);
        assert_eq!(o.bootstrap, "a:1,b:2");
        assert_eq!(o.partitions, 2);
        let config = o.client_config();
        assert_eq!(config.get("security.protocol"), Some("ssl"));
        assert_eq!(
            config.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        let ca = ca_file().unwrap_or_else(|| "probe".to_owned());
        assert_eq!(config.get("ssl.ca.location"), Some(ca.as_str()));
        assert_eq!(
            o.librdkafka,
            vec![("ssl.key.location".to_string(), "/k".to_string())]
        );
        assert!(Options::from_url("kafkas://").is_err());
        assert!(Options::from_url("kafkas://u@h:1").is_err());
    }

    #[test]
    fn queue_names_must_be_topic_names() {
        assert!(valid_topic("callq.call.bank"));
        assert!(valid_topic("callq.reply.shop-1_a"));
        assert!(!valid_topic("callq.reply.a:b"));
        assert!(!valid_topic(""));
        assert!(!valid_topic(".."));
        assert!(!valid_topic(&"x".repeat(250)));
    }

    #[test]
    fn dispositions_map_onto_publishes() {
        let spec = QueueSpec::plain("q")
            .delivery_limit(2)
            .dead_letter("q.dead");
        assert_eq!(fate(Disposition::Ack, 0, Some(&spec)), Fate::Finish);
        assert_eq!(
            fate(Disposition::Requeue, 0, Some(&spec)),
            Fate::Republish(1, false)
        );
        assert_eq!(
            fate(Disposition::Requeue, 1, Some(&spec)),
            Fate::Republish(2, false)
        );
        assert_eq!(
            fate(Disposition::Requeue, 2, Some(&spec)),
            Fate::DeadLetter("q.dead".into(), "delivery_limit".into()),
            "a third redelivery would pass the limit of 2"
        );
        assert_eq!(
            fate(
                Disposition::DeadLetter {
                    reason: "bad".into()
                },
                0,
                Some(&spec)
            ),
            Fate::DeadLetter("q.dead".into(), "bad".into())
        );
        let plain = QueueSpec::plain("p");
        assert_eq!(
            fate(Disposition::Requeue, 99, Some(&plain)),
            Fate::Republish(100, false)
        );
        assert_eq!(
            fate(
                Disposition::DeadLetter { reason: "x".into() },
                0,
                Some(&plain)
            ),
            Fate::Finish,
            "no dead-letter queue: dropped"
        );
        assert_eq!(
            fate(Disposition::Requeue, 0, None),
            Fate::Republish(1, false)
        );
        assert_eq!(
            fate(Disposition::Release, 3, None),
            Fate::Republish(3, true)
        );
        assert!(!past_limit(2, Some(&spec)));
        assert!(past_limit(3, Some(&spec)));
        assert!(!past_limit(1000, Some(&plain)));
    }

    #[test]
    fn the_adapters_count_header_is_kept_out_of_sight() {
        let raw = Headers::from([
            (DELIVERY_COUNT_HEADER.to_string(), "3".to_string()),
            ("callq-attempt".to_string(), "2".to_string()),
        ]);
        assert_eq!(header_count(&raw), 3);
        assert_eq!(header_count(&Headers::new()), 0);
        let visible = visible_headers(&raw);
        assert!(!visible.contains_key(DELIVERY_COUNT_HEADER));
        assert_eq!(visible.get("callq-attempt").map(String::as_str), Some("2"));
        let dead = dead_letter_headers(&visible, "why");
        assert_eq!(
            dead.get(DEAD_REASON_HEADER).map(String::as_str),
            Some("why")
        );
    }
}
