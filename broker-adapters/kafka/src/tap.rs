//! A tap on a queue's topic, for `callq capture`: a consumer in a group of
//! its own (`<group prefix>capture-<uuid>`) that is assigned the topic's
//! partitions by hand and never commits, so the workers' group, its
//! offsets and its rebalances never see it. It reads from the end (what is
//! published from now on), the beginning, an offset or a time; a range that
//! starts in the past ends where the log ended when the tap opened (or at a
//! time), and says so with [`TapEvent::RangeEnd`]. The topics a capture
//! follows (the reply queues its calls name) are read from a time on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use callq_broker::{Bytes, Error, Headers, Tap, TapEvent, Tapped};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{KafkaBroker, visible_headers};

/// Where a tap starts reading the watched queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapFrom {
    /// What is published from now on (a live capture).
    End,
    /// The oldest record the topic keeps.
    Beginning,
    /// This offset in every partition (clamped to what the topic keeps).
    Offset(i64),
    /// The first record at or after this time, in milliseconds since the
    /// Unix epoch.
    Time(i64),
}

/// A tap's range over the watched queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapRange {
    /// Where it starts.
    pub from: TapFrom,
    /// Where a range that starts in the past stops, besides the end of the
    /// log when the tap opened: the first record after this time.
    pub until_ms: Option<i64>,
}

/// How long the tap's thread waits for a record before it looks at its
/// commands again.
const POLL: Duration = Duration::from_millis(100);

/// A topic to follow: its name, the queue it stands for, and from when.
type Follow = (String, String, Option<i64>);

/// Copies of what is published to a queue's topic, and to followed topics.
pub struct KafkaTap {
    rx: mpsc::Receiver<Result<TapEvent, Error>>,
    follow: std::sync::mpsc::SyncSender<Follow>,
    followed: HashSet<String>,
    prefix: String,
    stop: Arc<AtomicBool>,
}

impl Drop for KafkaTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

#[async_trait]
impl Tap for KafkaTap {
    async fn next(&mut self) -> Option<Result<TapEvent, Error>> {
        self.rx.recv().await
    }

    fn follow(&mut self, queue: &str, since_ms: Option<i64>) {
        if self.followed.len() >= MAX_FOLLOWED || !self.followed.insert(queue.to_owned()) {
            return;
        }
        let topic = format!("{}{queue}", self.prefix);
        if self
            .follow
            .try_send((topic, queue.to_owned(), since_ms))
            .is_err()
        {
            warn!(
                queue,
                "the tap cannot follow another topic now; its copies are missed"
            );
        }
    }
}

/// Tries to follow a topic before the tap gives up on it.
const FOLLOW_TRIES: u32 = 10;

/// Topics one tap follows at most (reply queues are one per client).
const MAX_FOLLOWED: usize = 1024;

impl KafkaBroker {
    /// Opens a tap on `queue` over `range`, at most `bound` copies waiting.
    pub async fn tap(&self, queue: &str, range: TapRange, bound: usize) -> Result<KafkaTap, Error> {
        let topic = self.topic(queue);
        let partitions = self.inner.partition_count(&topic).await?;
        let opts = &self.inner.opts;
        let mut config = opts.client_config();
        config
            .set(
                "group.id",
                format!(
                    "{}capture-{}-{}",
                    opts.group_prefix,
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos())
                ),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100");
        opts.apply_extra(&mut config);
        let consumer: BaseConsumer = config
            .create()
            .map_err(|e| Error::Refused(format!("Kafka consumer settings: {e}")))?;
        let consumer = Arc::new(consumer);
        let timeout = opts.timeout;
        let (watched, probe) = (topic.clone(), Arc::clone(&consumer));
        // Where each partition starts, and where a range ends.
        let (starts, ends) = self
            .inner
            .blocking("finding the tap's offsets", move || {
                let fail = |e: rdkafka::error::KafkaError| {
                    Error::Connection(format!("reading the offsets of `{watched}`: {e}"))
                };
                let mut starts = TopicPartitionList::new();
                let mut ends = HashMap::new();
                let times = match range.from {
                    TapFrom::Time(ms) => {
                        let mut tpl = TopicPartitionList::new();
                        for p in 0..partitions {
                            tpl.add_partition_offset(&watched, p, Offset::Offset(ms))
                                .map_err(fail)?;
                        }
                        Some(probe.offsets_for_times(tpl, timeout).map_err(fail)?)
                    }
                    _ => None,
                };
                for p in 0..partitions {
                    let (low, high) = probe.fetch_watermarks(&watched, p, timeout).map_err(fail)?;
                    let start = match range.from {
                        TapFrom::End => high,
                        TapFrom::Beginning => low,
                        TapFrom::Offset(n) => n.clamp(low, high),
                        TapFrom::Time(_) => match times
                            .as_ref()
                            .and_then(|t| t.find_partition(&watched, p))
                            .map(|e| e.offset())
                        {
                            Some(Offset::Offset(o)) => o,
                            _ => high,
                        },
                    };
                    starts
                        .add_partition_offset(&watched, p, Offset::Offset(start))
                        .map_err(fail)?;
                    if range.from != TapFrom::End && start < high {
                        ends.insert(p, high);
                    }
                }
                Ok((starts, ends))
            })
            .await?;
        consumer
            .assign(&starts)
            .map_err(|e| Error::Connection(format!("assigning `{topic}` to the tap: {e}")))?;
        let (tx, rx) = mpsc::channel(bound.max(1));
        let (follow, follows) = std::sync::mpsc::sync_channel(64);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = Reader {
            consumer,
            watched: topic,
            queue: queue.to_owned(),
            bounded: range.from != TapFrom::End,
            until_ms: range.until_ms,
            ends,
            queues: HashMap::new(),
            tx,
            follows,
            stop: Arc::clone(&stop),
            timeout,
        };
        std::thread::Builder::new()
            .name("callq-kafka-tap".into())
            .spawn(move || reader.run())
            .map_err(|e| Error::Connection(format!("starting the tap's thread: {e}")))?;
        Ok(KafkaTap {
            rx,
            follow,
            followed: HashSet::new(),
            prefix: self.inner.opts.topic_prefix.clone(),
            stop,
        })
    }
}

/// The tap's thread.
struct Reader {
    consumer: Arc<BaseConsumer>,
    watched: String,
    queue: String,
    bounded: bool,
    until_ms: Option<i64>,
    /// Partitions of the watched topic still to read, and their end.
    ends: HashMap<i32, i64>,
    /// The queue each followed topic stands for.
    queues: HashMap<String, String>,
    tx: mpsc::Sender<Result<TapEvent, Error>>,
    follows: std::sync::mpsc::Receiver<Follow>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
}

impl Reader {
    fn run(mut self) {
        let mut range_ended = false;
        let mut retries: Vec<(std::time::Instant, u32, Follow)> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            while let Ok(follow) = self.follows.try_recv() {
                retries.push((std::time::Instant::now(), 0, follow));
            }
            // New topics to follow, and those that failed (a metadata read
            // that timed out), again a second later, up to 10 times.
            let now = std::time::Instant::now();
            let (due, later): (Vec<_>, Vec<_>) =
                retries.drain(..).partition(|(at, _, _)| *at <= now);
            retries = later;
            for (_, tries, (topic, queue, since)) in due {
                match self.follow(&topic, since) {
                    Ok(()) => {
                        self.queues.insert(topic, queue);
                    }
                    Err(e) if tries < FOLLOW_TRIES => {
                        debug!(queue, "the tap cannot follow `{topic}` yet: {e}");
                        retries.push((
                            now + Duration::from_secs(1),
                            tries + 1,
                            (topic, queue, since),
                        ));
                    }
                    Err(e) => warn!(queue, "the tap gives up following `{topic}`: {e}"),
                }
            }
            if self.bounded && !range_ended && self.ends.is_empty() {
                range_ended = true;
                if self.tx.blocking_send(Ok(TapEvent::RangeEnd)).is_err() {
                    return;
                }
            }
            let Some(polled) = self.consumer.poll(POLL) else {
                continue;
            };
            let m = match polled {
                Ok(m) => m,
                Err(e) => {
                    debug!(queue = %self.queue, "tap: {e}");
                    continue;
                }
            };
            let timestamp_ms = m.timestamp().to_millis();
            let queue = if m.topic() == self.watched {
                if self.bounded {
                    let Some(&end) = self.ends.get(&m.partition()) else {
                        continue;
                    };
                    let past = self
                        .until_ms
                        .is_some_and(|u| timestamp_ms.is_some_and(|t| t > u));
                    if m.offset() + 1 >= end || past {
                        self.ends.remove(&m.partition());
                    }
                    if m.offset() >= end || past {
                        continue;
                    }
                }
                self.queue.clone()
            } else if let Some(q) = self.queues.get(m.topic()) {
                q.clone()
            } else {
                continue;
            };
            let mut headers = Headers::new();
            if let Some(hs) = m.headers() {
                for h in hs.iter() {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    headers.insert(h.key.to_owned(), value.into_owned());
                }
            }
            let copy = Tapped {
                queue,
                headers: visible_headers(&headers),
                body: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                timestamp_ms,
                partition: u32::try_from(m.partition()).ok(),
                offset: Some(m.offset()),
            };
            if self.tx.blocking_send(Ok(TapEvent::Message(copy))).is_err() {
                return;
            }
        }
    }

    /// Adds `topic`'s partitions to the assignment, from `since_ms` on (or
    /// from the beginning).
    fn follow(&self, topic: &str, since_ms: Option<i64>) -> Result<(), String> {
        let md = self
            .consumer
            .fetch_metadata(Some(topic), self.timeout)
            .map_err(|e| e.to_string())?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err("no such topic".into());
        }
        let mut tpl = TopicPartitionList::new();
        for p in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
            let at = since_ms.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(topic, p, at)
                .map_err(|e| e.to_string())?;
        }
        if since_ms.is_some() {
            tpl = self
                .consumer
                .offsets_for_times(tpl, self.timeout)
                .map_err(|e| e.to_string())?;
        }
        self.consumer
            .incremental_assign(&tpl)
            .map_err(|e| e.to_string())
    }
}
