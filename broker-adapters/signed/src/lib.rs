//! callq's control path, authenticated with a cluster key.
//!
//! [`Signed`] wraps any [`Broker`]. Every message it publishes to a control
//! queue ([`is_control_queue`]: the coordinator's request and heartbeat
//! queues, a worker's, an agent's or an operator's queue of answers and
//! orders) carries [`AUTH_HEADER`]: the time it was signed and an
//! HMAC-SHA256, under the cluster key, of that time, the queue's name and
//! the body. Every message a consumer of a control queue receives is
//! checked the same way; one that is unsigned, signed with another key,
//! meant for another queue, or older than the maximum age (a replay) is
//! acked, counted and logged, never handed on. Calls and replies pass
//! untouched: clients need no key.
//!
//! So a process that can publish to the control queues (a client on a
//! broker without per-queue permissions, such as Kafka without ACLs) can
//! no longer forge a `resume`, a `trace`, a completion, a heartbeat, an
//! answer or an order. Within the maximum age a captured message can be
//! replayed by whoever can read the control queues; the broker's
//! permissions keep clients from reading them.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use callq_broker::{
    Assignment, Broker, COORDINATOR_QUEUE, Consumer, Delivery, Disposition, Error, HEARTBEAT_QUEUE,
    Message, QueueDepth, QueueSpec,
};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tracing::warn;

/// The header that carries a control message's signature:
/// `v1.<unix ms>.<hex HMAC-SHA256>`.
pub const AUTH_HEADER: &str = "callq-auth";

/// The shortest cluster key accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// How old a signed control message may be when it is read, by default.
/// Not applied to `callq.coordinator`: its requests carry their own expiry,
/// and a completion is answered however late it is read.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(900);

/// How far ahead of the reader's clock a signature may be dated.
const MAX_AHEAD_MS: u64 = 60_000;

/// What the signed text starts with, so that a signature of callq's
/// control path is never valid for anything else.
const DOMAIN: &[u8] = b"callq-control-v1";

/// Why a cluster key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Too short to resist guessing.
    #[error(
        "the cluster key has {0} bytes; it needs at least {MIN_KEY_BYTES} (make one with `head -c 48 /dev/urandom | base64`)"
    )]
    TooShort(usize),
    /// The key file could not be read.
    #[error("reading the cluster key file `{path}`: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The secret every coordinator, worker, agent and operator of a cluster
/// shares. Never printed.
#[derive(Clone)]
pub struct ClusterKey(Arc<[u8]>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A key of these bytes (at least [`MIN_KEY_BYTES`]).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, KeyError> {
        let bytes: Vec<u8> = bytes.into();
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(Self(bytes.into()))
    }

    /// The key in a file: its bytes, without the whitespace around them
    /// (a key written with `echo` ends with a newline).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(bytes.trim_ascii())
    }

    fn mac(&self, queue: &str, at_ms: u64, body: &[u8]) -> Hmac<Sha256> {
        // Any key length is valid for HMAC.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable_key(),
        };
        for part in [DOMAIN, queue.as_bytes(), at_ms.to_string().as_bytes()] {
            mac.update(part);
            mac.update(&[0]);
        }
        mac.update(body);
        mac
    }

    /// The value of [`AUTH_HEADER`] for `body` published to `queue` at
    /// `at_ms` (Unix milliseconds).
    pub fn sign(&self, queue: &str, at_ms: u64, body: &[u8]) -> String {
        let tag = self.mac(queue, at_ms, body).finalize().into_bytes();
        format!("v1.{at_ms}.{}", hex(&tag))
    }

    /// Checks a delivery from the control queue `queue` read at `now_ms`.
    pub fn verify(
        &self,
        queue: &str,
        delivery: &Delivery,
        now_ms: u64,
        max_age: Duration,
    ) -> Result<(), String> {
        let Some(value) = delivery.headers.get(AUTH_HEADER) else {
            return Err("it is not signed with the cluster key".into());
        };
        let mut parts = value.splitn(3, '.');
        let (Some("v1"), Some(at), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("its {AUTH_HEADER} header is not `v1.<ms>.<hex>`"));
        };
        let at_ms: u64 = at
            .parse()
            .map_err(|_| format!("its {AUTH_HEADER} header has no time"))?;
        let tag = unhex(tag).ok_or_else(|| format!("its {AUTH_HEADER} header has no hex tag"))?;
        self.mac(queue, at_ms, &delivery.body)
            .verify_slice(&tag)
            .map_err(|_| "its signature does not match (another key, queue or body)".to_owned())?;
        if at_ms > now_ms.saturating_add(MAX_AHEAD_MS) {
            return Err(format!(
                "it is dated {} ms ahead of this host's clock",
                at_ms - now_ms
            ));
        }
        let age = now_ms.saturating_sub(at_ms);
        // The coordinator's requests say themselves when they go stale
        // (`expires_ms`), and a completion never does: it is answered
        // however late a coordinator reads it (replaying one changes
        // nothing), so no age of the signature's limits them.
        if queue != COORDINATOR_QUEUE && u128::from(age) > max_age.as_millis() {
            return Err(format!(
                "it was signed {age} ms ago, longer than {max_age:?}: a replay"
            ));
        }
        Ok(())
    }
}

#[cold]
fn unreachable_key() -> ! {
    panic!("HMAC accepts keys of any length")
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether `queue` belongs to callq's control path: the coordinator's
/// request and heartbeat queues, and the queues of answers and orders of
/// workers (`callq.worker.`), agents (`callq.agent.`) and operators
/// (`callq.admin.`).
pub fn is_control_queue(queue: &str) -> bool {
    queue == COORDINATOR_QUEUE
        || queue == HEARTBEAT_QUEUE
        || ["callq.worker.", "callq.agent.", "callq.admin."]
            .iter()
            .any(|prefix| queue.starts_with(prefix))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A broker whose control path is signed and checked with a cluster key.
pub struct Signed {
    inner: Arc<dyn Broker>,
    key: ClusterKey,
    dropped: Arc<AtomicU64>,
    max_age: Duration,
}

impl Signed {
    /// Wraps `inner`: control messages are signed with `key`, and those
    /// received are checked against it.
    pub fn new(inner: Arc<dyn Broker>, key: ClusterKey) -> Self {
        Self {
            inner,
            key,
            dropped: Arc::default(),
            max_age: DEFAULT_MAX_AGE,
        }
    }

    /// Counts dropped control messages in `dropped` (shared with whoever
    /// reports it).
    #[must_use]
    pub fn counting(mut self, dropped: Arc<AtomicU64>) -> Self {
        self.dropped = dropped;
        self
    }

    /// Sets the maximum age of a control message ([`DEFAULT_MAX_AGE`]).
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Control messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Broker for Signed {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), Error> {
        self.inner.declare(spec).await
    }

    async fn publish(&self, queue: &str, mut message: Message) -> Result<(), Error> {
        if is_control_queue(queue) {
            let signature = self.key.sign(queue, now_ms(), &message.body);
            message.headers.insert(AUTH_HEADER.to_owned(), signature);
        }
        self.inner.publish(queue, message).await
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>, Error> {
        let consumer = self.inner.consume(queue, prefetch).await?;
        if !is_control_queue(queue) {
            return Ok(consumer);
        }
        Ok(Box::new(Checked {
            inner: consumer,
            queue: queue.to_owned(),
            key: self.key.clone(),
            dropped: Arc::clone(&self.dropped),
            max_age: self.max_age,
            logged_at: 0,
            window: None,
            lines: 0,
        }))
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        self.inner.depth(queue).await
    }

    async fn partitions(&self, queue: &str) -> Result<Option<u32>, Error> {
        self.inner.partitions(queue).await
    }

    async fn consumers(&self, queue: &str) -> Result<Option<u64>, Error> {
        self.inner.consumers(queue).await
    }
}

/// A consumer of a control queue that hands on only what the cluster key
/// signed.
struct Checked {
    inner: Box<dyn Consumer>,
    queue: String,
    key: ClusterKey,
    dropped: Arc<AtomicU64>,
    max_age: Duration,
    /// The count at the last line logged, when the window of lines began,
    /// and the lines logged in it.
    logged_at: u64,
    window: Option<Instant>,
    lines: u32,
}

/// Lines a consumer logs about dropped messages per window, at most.
const LOG_LINES: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(10);

#[async_trait]
impl Consumer for Checked {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        loop {
            let delivery = match self.inner.next().await? {
                Ok(delivery) => delivery,
                Err(e) => return Some(Err(e)),
            };
            match self
                .key
                .verify(&self.queue, &delivery, now_ms(), self.max_age)
            {
                Ok(()) => return Some(Ok(delivery)),
                Err(why) => {
                    let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    // Ten lines each ten seconds at most: a flood of
                    // forgeries does not flood the log.
                    let now = Instant::now();
                    if self.window.is_none_or(|start| now >= start + LOG_WINDOW) {
                        self.window = Some(now);
                        self.lines = 0;
                    }
                    if self.lines < LOG_LINES {
                        let since = total - self.logged_at;
                        warn!(queue = %self.queue, dropped = total, since_last_line = since, "dropped a control message: {why}");
                        self.logged_at = total;
                        self.lines += 1;
                    }
                    // Settled in a task of its own, so that `next` stays
                    // cancel-safe.
                    tokio::spawn(async move {
                        let _ = delivery.settle(Disposition::Ack).await;
                    });
                }
            }
        }
    }

    fn assignment(&self) -> Option<Assignment> {
        self.inner.assignment()
    }

    async fn close(self: Box<Self>) {
        self.inner.close().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use callq_broker::worker_queue;
    use callq_broker_embedded::EmbeddedBroker;

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::new(vec![byte; 32]).unwrap()
    }

    #[test]
    fn short_keys_are_refused_and_keys_never_print() {
        assert!(matches!(
            ClusterKey::new(b"secret".to_vec()),
            Err(KeyError::TooShort(6))
        ));
        assert_eq!(format!("{:?}", key(7)), "ClusterKey(..)");
    }

    #[test]
    fn control_queues_are_named() {
        for q in [
            COORDINATOR_QUEUE,
            HEARTBEAT_QUEUE,
            "callq.worker.w1",
            "callq.agent.a1",
            "callq.admin.x",
        ] {
            assert!(is_control_queue(q), "{q}");
        }
        for q in [
            "callq.call.echo",
            "callq.reply.c1",
            "callq.dead.echo",
            "callq.coordinatorx",
        ] {
            assert!(!is_control_queue(q), "{q}");
        }
    }

    async fn one(broker: &Signed, queue: &str, message: Message) -> Option<Delivery> {
        let raw = broker.inner.clone();
        raw.publish(queue, message).await.unwrap();
        let mut consumer = broker.consume(queue, 10).await.unwrap();
        tokio::time::timeout(Duration::from_millis(200), consumer.next())
            .await
            .ok()
            .flatten()
            .map(Result::unwrap)
    }

    #[tokio::test]
    async fn only_what_the_cluster_key_signed_for_its_queue_gets_through() {
        let raw: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new());
        let queue = worker_queue("w1");
        raw.declare(&QueueSpec::plain(&queue)).await.unwrap();
        let signed = Signed::new(raw.clone(), key(1));
        let body = b"{\"v\":1}".to_vec();
        let now = now_ms();
        let forged = [
            ("unsigned", Message::new(body.clone())),
            (
                "another key",
                Message::new(body.clone()).header(AUTH_HEADER, key(2).sign(&queue, now, &body)),
            ),
            (
                "another queue",
                Message::new(body.clone())
                    .header(AUTH_HEADER, key(1).sign("callq.worker.w2", now, &body)),
            ),
            (
                "another body",
                Message::new(b"{\"v\":2}".to_vec())
                    .header(AUTH_HEADER, key(1).sign(&queue, now, &body)),
            ),
            (
                "a replay",
                Message::new(body.clone())
                    .header(AUTH_HEADER, key(1).sign(&queue, now - 1_000_000, &body)),
            ),
            (
                "from the future",
                Message::new(body.clone())
                    .header(AUTH_HEADER, key(1).sign(&queue, now + 600_000, &body)),
            ),
            (
                "garbage",
                Message::new(body.clone()).header(AUTH_HEADER, "v1.x.zz"),
            ),
        ];
        for (n, (what, message)) in forged.into_iter().enumerate() {
            assert!(
                one(&signed, &queue, message).await.is_none(),
                "{what} got through"
            );
            assert_eq!(signed.dropped(), n as u64 + 1, "{what} was not counted");
        }
        signed
            .publish(&queue, Message::new(body.clone()))
            .await
            .unwrap();
        let mut consumer = signed.consume(&queue, 10).await.unwrap();
        let got = consumer.next().await.unwrap().unwrap();
        assert_eq!(&got.body[..], &body[..]);
        // The dropped ones were acked, not left to come back.
        assert_eq!(raw.depth(&queue).await.unwrap().ready, 0);
    }

    #[tokio::test]
    async fn a_late_request_to_the_coordinator_is_no_replay() {
        let raw: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new());
        raw.declare(&QueueSpec::plain(COORDINATOR_QUEUE))
            .await
            .unwrap();
        let signed = Signed::new(raw.clone(), key(1));
        let body = b"{}".to_vec();
        let an_hour_ago = now_ms() - 3_600_000;
        let late = Message::new(body.clone()).header(
            AUTH_HEADER,
            key(1).sign(COORDINATOR_QUEUE, an_hour_ago, &body),
        );
        assert!(one(&signed, COORDINATOR_QUEUE, late).await.is_some());
        assert_eq!(signed.dropped(), 0);
    }

    #[tokio::test]
    async fn calls_and_replies_pass_untouched() {
        let raw: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new());
        raw.declare(&QueueSpec::plain("callq.call.echo"))
            .await
            .unwrap();
        let signed = Signed::new(raw.clone(), key(1));
        signed
            .publish("callq.call.echo", Message::new("x"))
            .await
            .unwrap();
        let mut consumer = raw.consume("callq.call.echo", 1).await.unwrap();
        let got = consumer.next().await.unwrap().unwrap();
        assert!(!got.headers.contains_key(AUTH_HEADER));
        let unsigned = one(&signed, "callq.call.echo", Message::new("y")).await;
        assert!(unsigned.is_some());
        assert_eq!(signed.dropped(), 0);
    }
}
