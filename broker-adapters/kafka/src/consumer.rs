//! A consumer: one Kafka group member, served by a thread of its own.
//!
//! The thread owns the librdkafka consumer. It serves the consumer's event
//! queue (which runs the rebalance callbacks), reads records from one queue
//! per partition (split off the consumer's queue when the partition is
//! assigned) only while the consumer has room below its prefetch, and sends
//! the commits. librdkafka fetches ahead into those partition queues no more
//! than `queued.min.messages` (set to the prefetch) and
//! `queued.max.messages.kbytes`. The async side ([`KafkaConsumer::next`],
//! [`KafkaSettle`]) hands records out and settles them; both sides meet in
//! [`Shared`], under one lock, and the async side wakes the thread through
//! [`Kick`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callq_broker::{Assignment, Bytes, Consumer, Delivery, Disposition, Error, Headers, QueueSpec};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::track::{RecordId, Track};
use crate::{
    COMMIT_INTERVAL, Fate, Inner, dead_letter_headers, deadline_in, fate, header_count, lock,
    millis, past_limit, visible_headers,
};

/// How long the thread sleeps when nothing wakes it: it serves the
/// consumer's events at least this often.
const IDLE: Duration = Duration::from_millis(100);

/// How long an assignment waits for each of the broker's answers on a
/// partition it takes.
const END_WAIT: Duration = Duration::from_secs(5);

/// The partitions held, as the application sees them.
fn held(state: &State) -> Vec<u32> {
    state
        .parts
        .keys()
        .filter_map(|p| u32::try_from(*p).ok())
        .collect()
}

/// How long a record whose dead-lettering failed waits before it is tried
/// again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// One record read from Kafka.
#[derive(Debug)]
pub(crate) struct Record {
    partition: i32,
    offset: i64,
    /// The assignment it was read under.
    epoch: u64,
    /// Already in the partition when it was assigned: the last owner may
    /// have received it.
    maybe_seen: bool,
    key: Option<Vec<u8>>,
    body: Bytes,
    /// Every header, the adapter's own included.
    headers: Headers,
}

/// A partition this consumer holds.
#[derive(Debug)]
struct Part {
    epoch: u64,
    /// Records below this offset may have been delivered to the partition's
    /// last owner.
    fresh_from: i64,
    track: Track,
    /// Deliveries handed to the application and not settled, with their
    /// delivery count.
    in_hand: HashMap<i64, (Arc<Record>, u32)>,
    /// Records the adapter is dead-lettering itself (delivery limit).
    busy: usize,
    /// Revocation under way: nothing more is handed out.
    revoking: bool,
}

#[derive(Debug, Default)]
struct State {
    parts: HashMap<i32, Part>,
    /// Read and not yet handed out, in partition order.
    ready: VecDeque<Arc<Record>>,
    /// Closed or dropped: every lease is gone, nothing more is handed out.
    closed: bool,
    /// A fatal error for [`Consumer::next`] to report, once.
    failed: Option<Error>,
    next_epoch: u64,
}

impl State {
    fn held(&self) -> usize {
        self.parts.values().map(|p| p.in_hand.len()).sum()
    }

    /// Records in the consumer's hands or on their way: reading stops at
    /// the prefetch.
    fn in_hand(&self) -> usize {
        self.ready.len()
            + self
                .parts
                .values()
                .map(|p| p.in_hand.len() + p.busy)
                .sum::<usize>()
    }

    /// The partition, if the lease of `epoch` on it still holds.
    fn owned(&mut self, partition: i32, epoch: u64) -> Option<&mut Part> {
        if self.closed {
            return None;
        }
        self.parts.get_mut(&partition).filter(|p| p.epoch == epoch)
    }
}

/// Wakes the consumer's thread.
#[derive(Debug, Default)]
struct Kick {
    kicked: Mutex<bool>,
    cv: Condvar,
}

impl Kick {
    fn kick(&self) {
        *lock(&self.kicked) = true;
        self.cv.notify_one();
    }

    /// Sleeps until kicked or for `timeout`.
    fn wait(&self, timeout: Duration) {
        let kicked = lock(&self.kicked);
        let mut kicked = if *kicked {
            kicked
        } else {
            self.cv
                .wait_timeout(kicked, timeout)
                .map(|(k, _)| k)
                .unwrap_or_else(|e| e.into_inner().0)
        };
        *kicked = false;
    }
}

/// What the consumer's thread and its async side share.
pub(crate) struct Shared {
    queue: String,
    prefetch: usize,
    revoke_wait: Duration,
    state: Mutex<State>,
    /// Signalled when a delivery is settled (a revocation waits on it).
    settled: Condvar,
    /// Wakes [`KafkaConsumer::next`].
    wake: tokio::sync::Notify,
    /// Wakes the thread.
    kick: Arc<Kick>,
    /// Asks the thread to leave the group.
    stop: AtomicBool,
    /// True once the thread has left the group.
    left: tokio::sync::watch::Sender<bool>,
    /// The partitions held, for the application.
    assignment: Assignment,
}

impl Shared {
    pub(crate) fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(crate) fn has_left(&self) -> bool {
        *self.left.borrow()
    }

    /// Resolves once the consumer has left its group.
    pub(crate) async fn left(&self) {
        let mut rx = self.left.subscribe();
        let _ = rx.wait_for(|left| *left).await;
    }

    /// Deliveries held by the application.
    pub(crate) fn unsettled(&self) -> usize {
        let state = lock(&self.state);
        if state.closed { 0 } else { state.held() }
    }

    /// Ends every lease and asks the thread to leave the group.
    fn end(&self) {
        {
            let mut state = lock(&self.state);
            state.closed = true;
            state.ready.clear();
        }
        self.assignment.set(Vec::new());
        self.stop.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Something changed: wake the application's `next`, a revocation
    /// waiting for settles, and the thread.
    fn wake_all(&self) {
        self.settled.notify_all();
        self.wake.notify_one();
        self.kick.kick();
    }

    fn has_room(&self) -> bool {
        let state = lock(&self.state);
        !state.closed && state.in_hand() < self.prefetch
    }

    /// A record the thread read: queued for hand-out, unless its partition
    /// is not (or no longer) ours or it was read before.
    fn offer(&self, message: &BorrowedMessage<'_>) {
        let (partition, offset) = (message.partition(), message.offset());
        {
            let mut state = lock(&self.state);
            if state.closed {
                return;
            }
            let Some(part) = state.parts.get_mut(&partition) else {
                debug!(queue = %self.queue, partition, offset, "a record of a partition not held: skipped");
                return;
            };
            if part.revoking || !part.track.hand_out(offset) {
                return;
            }
            let epoch = part.epoch;
            let maybe_seen = offset < part.fresh_from;
            let mut headers = Headers::new();
            if let Some(hs) = message.headers() {
                for h in hs.iter() {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    headers.insert(h.key.to_owned(), value.into_owned());
                }
            }
            state.ready.push_back(Arc::new(Record {
                partition,
                offset,
                epoch,
                maybe_seen,
                key: message.key().map(<[u8]>::to_vec),
                body: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
                headers,
            }));
        }
        self.wake.notify_one();
    }

    /// Whether a held partition's commit point moved.
    fn commits_due(&self) -> bool {
        lock(&self.state)
            .parts
            .values()
            .any(|p| p.track.to_commit().is_some())
    }

    /// The commits due (of `only` these partitions, if given), recorded as
    /// sent.
    fn take_commits(&self, only: Option<&[i32]>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let mut state = lock(&self.state);
        for (p, part) in &mut state.parts {
            if only.is_some_and(|only| !only.contains(p)) {
                continue;
            }
            if let Some(offset) = part.track.to_commit() {
                part.track.committed(offset);
                if let Err(e) = tpl.add_partition_offset(&self.queue, *p, Offset::Offset(offset)) {
                    warn!(queue = %self.queue, "cannot name offset {offset} of partition {p}: {e}");
                }
            }
        }
        tpl
    }

    fn commit_failed(&self, offsets: &TopicPartitionList) {
        let mut state = lock(&self.state);
        for e in offsets.elements() {
            if let (Some(part), Offset::Offset(o)) =
                (state.parts.get_mut(&e.partition()), e.offset())
            {
                part.track.commit_failed(o);
            }
        }
    }

    /// Takes newly assigned partitions, with their ends at assignment.
    fn assign(&self, partitions: &[(i32, i64)]) {
        let mut state = lock(&self.state);
        for &(p, fresh_from) in partitions {
            state.next_epoch += 1;
            let epoch = state.next_epoch;
            state.parts.insert(
                p,
                Part {
                    epoch,
                    fresh_from,
                    track: Track::default(),
                    in_hand: HashMap::new(),
                    busy: 0,
                    revoking: false,
                },
            );
        }
        self.assignment.set(held(&state));
        info!(queue = %self.queue, ?partitions, "partitions assigned (partition, fresh from)");
    }

    /// Revocation, on the thread: stop handing out, wait (bounded) for the
    /// deliveries in hand, dead-letter those that may not be delivered
    /// again, commit what finished, let go.
    fn revoke(
        &self,
        inner: &Inner,
        consumer: &BaseConsumer<Context>,
        partitions: &[i32],
        lost: bool,
    ) {
        let queue = self.queue.as_str();
        let mut state = lock(&self.state);
        state.ready.retain(|r| !partitions.contains(&r.partition));
        for p in partitions {
            if let Some(part) = state.parts.get_mut(p) {
                part.revoking = true;
            }
        }
        let wait = if state.closed || lost {
            Duration::ZERO
        } else {
            self.revoke_wait
        };
        let deadline = deadline_in(wait);
        loop {
            let in_hand: usize = partitions
                .iter()
                .filter_map(|p| state.parts.get(p))
                .map(|p| p.in_hand.len() + p.busy)
                .sum();
            let now = Instant::now();
            if in_hand == 0 || now >= deadline || state.closed {
                break;
            }
            state = self
                .settled
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        drop(state);
        if !lost {
            self.dead_letter_lost(inner, Some(partitions));
            let tpl = self.take_commits(Some(partitions));
            if tpl.count() > 0
                && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
            {
                warn!(
                    queue,
                    "commit on revocation failed: {e}; the next owner gets those deliveries again"
                );
            }
        }
        let mut state = lock(&self.state);
        let mut unsettled = 0;
        for p in partitions {
            if let Some(part) = state.parts.remove(p) {
                unsettled += part.in_hand.len();
            }
        }
        self.assignment.set(held(&state));
        drop(state);
        info!(
            queue,
            ?partitions,
            lost,
            unsettled,
            "partitions revoked; unsettled deliveries go to the next owner"
        );
        self.wake_all();
    }

    /// The lease of the deliveries still in hand is lost: those whose next
    /// delivery would pass the queue's delivery limit go to the dead-letter
    /// queue now (as RabbitMQ does when a consumer goes), so that they are
    /// not delivered again. Blocking: runs on the thread.
    fn dead_letter_lost(&self, inner: &Inner, only: Option<&[i32]>) {
        let Some(spec) = inner.spec(&self.queue) else {
            return;
        };
        let Some(limit) = spec.delivery_limit else {
            return;
        };
        let doomed: Vec<Arc<Record>> = {
            let state = lock(&self.state);
            state
                .parts
                .iter()
                .filter(|(p, _)| only.is_none_or(|only| only.contains(p)))
                .flat_map(|(_, part)| part.in_hand.values())
                .filter(|(_, count)| *count >= limit)
                .map(|(record, _)| Arc::clone(record))
                .collect()
        };
        for record in doomed {
            let sent = match spec.past_limit_queue() {
                Some(dead) => {
                    let headers =
                        dead_letter_headers(&visible_headers(&record.headers), "delivery_limit");
                    inner.send_blocking(dead, record.key.as_deref(), &record.body, &headers)
                }
                None => Ok(()),
            };
            match sent {
                Ok(()) => {
                    let mut state = lock(&self.state);
                    if let Some(part) = state.parts.get_mut(&record.partition)
                        && part.epoch == record.epoch
                    {
                        part.in_hand.remove(&record.offset);
                        part.track.finish(record.offset);
                    }
                    drop(state);
                    lock(&inner.seen).forget(&id(&self.queue, &record));
                    debug!(queue = %self.queue, offset = record.offset, "lost past its delivery limit: dead-lettered");
                }
                Err(e) => warn!(
                    queue = %self.queue,
                    "dead-lettering a lost delivery past its limit failed: {e}; the next owner gets it"
                ),
            }
        }
    }
}

/// The librdkafka consumer's callbacks; they run on the consumer's thread.
pub(crate) struct Context {
    shared: Arc<Shared>,
    inner: Arc<Inner>,
    /// The consumer itself, to split partition queues off it.
    consumer: OnceLock<Weak<BaseConsumer<Context>>>,
    /// The queue of each assigned partition.
    queues: Mutex<HashMap<i32, PartitionQueue<Context>>>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(&self.shared.queue, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(queue = %self.shared.queue, "Kafka consumer: {error}: {reason}");
    }
}

/// A librdkafka log line, as a tracing event.
pub(crate) fn log_line(queue: &str, level: RDKafkaLogLevel, fac: &str, line: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => warn!(queue, "librdkafka {fac}: {line}"),
        RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
            info!(queue, "librdkafka {fac}: {line}")
        }
        _ => debug!(queue, "librdkafka {fac}: {line}"),
    }
}

impl Context {
    /// Where a newly assigned partition's surely fresh records begin.
    ///
    /// Every owner commits an offset when it first gets a partition that has
    /// none, before it hands out a record. So a partition without a
    /// committed offset was never held: none of its records was delivered.
    /// One with a committed offset may have had records past it delivered to
    /// its last owner, which stopped reading before this assignment: those
    /// below the partition's end now. Unknown (the broker did not answer),
    /// every record counts as possibly delivered: that costs a `resume`
    /// each, never a missing redelivery flag.
    fn fresh_from(&self, consumer: &BaseConsumer<Self>, partition: i32) -> i64 {
        let queue = self.shared.queue.as_str();
        let wait = self.inner.opts.timeout.min(END_WAIT);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(queue, partition);
        let committed = match consumer.committed_offsets(tpl, wait) {
            Ok(c) => c.find_partition(queue, partition).map(|e| e.offset()),
            Err(e) => {
                warn!(
                    queue,
                    partition,
                    "reading the committed offset of an assigned partition: {e}; its records all count as possibly delivered before"
                );
                return i64::MAX;
            }
        };
        let (low, high) = match consumer.fetch_watermarks(queue, partition, wait) {
            Ok(w) => w,
            Err(e) => {
                warn!(
                    queue,
                    partition,
                    "reading the end of an assigned partition: {e}; its records all count as possibly delivered before"
                );
                return i64::MAX;
            }
        };
        if matches!(committed, Some(Offset::Offset(_))) {
            return high;
        }
        // Never held: say so to the next owner before reading anything.
        let mut first = TopicPartitionList::new();
        let marked = first
            .add_partition_offset(queue, partition, Offset::Offset(low))
            .map_err(|e| e.to_string())
            .and_then(|()| {
                consumer
                    .commit(&first, CommitMode::Sync)
                    .map_err(|e| e.to_string())
            });
        match marked {
            Ok(()) => low,
            Err(e) => {
                warn!(
                    queue,
                    partition,
                    "marking a partition as held: {e}; its records all count as possibly delivered before"
                );
                i64::MAX
            }
        }
    }

    /// Splits the queues of newly assigned partitions off the consumer's
    /// queue (before librdkafka starts fetching them), each waking the
    /// thread when records arrive.
    fn split(&self, partitions: &[i32]) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut queues = lock(&self.queues);
        for p in partitions {
            match consumer.split_partition_queue(&self.shared.queue, *p) {
                Some(mut q) => {
                    let kick = Arc::clone(&self.shared.kick);
                    q.set_nonempty_callback(move || kick.kick());
                    queues.insert(*p, q);
                }
                None => {
                    warn!(queue = %self.shared.queue, partition = p, "cannot split the partition's queue")
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions = |tpl: &TopicPartitionList| -> Vec<i32> {
            tpl.elements()
                .iter()
                .filter(|e| e.topic() == self.shared.queue)
                .map(|e| e.partition())
                .collect()
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = partitions(tpl);
                let ends: Vec<(i32, i64)> = partitions
                    .iter()
                    .map(|&p| (p, self.fresh_from(consumer, p)))
                    .collect();
                self.shared.assign(&ends);
                self.split(&partitions);
            }
            Rebalance::Revoke(tpl) => {
                let partitions = partitions(tpl);
                self.shared.revoke(
                    &self.inner,
                    consumer,
                    &partitions,
                    consumer.assignment_lost(),
                );
                let mut queues = lock(&self.queues);
                for p in &partitions {
                    queues.remove(p);
                }
            }
            Rebalance::Error(e) => warn!(queue = %self.shared.queue, "rebalance failed: {e}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            debug!(queue = %self.shared.queue, "commit failed: {e}; sending it again");
            self.shared.commit_failed(offsets);
        }
    }

    fn main_queue_min_poll_interval(&self) -> rdkafka::util::Timeout {
        rdkafka::util::Timeout::After(IDLE)
    }
}

/// Opens a consumer of `queue` and starts its thread.
pub(crate) fn open(inner: Arc<Inner>, queue: &str, prefetch: u16) -> Result<KafkaConsumer, Error> {
    let opts = &inner.opts;
    let prefetch = usize::from(prefetch);
    let (left, _) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        queue: queue.to_owned(),
        prefetch,
        revoke_wait: opts.revoke_wait,
        state: Mutex::default(),
        settled: Condvar::new(),
        wake: tokio::sync::Notify::new(),
        kick: Arc::default(),
        stop: AtomicBool::new(false),
        left,
        assignment: Assignment::default(),
    });
    let session = millis(opts.session_timeout).max(1);
    let mut config = opts.client_config();
    config
        .set("group.id", inner.group(queue))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session.to_string())
        .set("heartbeat.interval.ms", (session / 4).max(1).to_string())
        // librdkafka fetches ahead into each partition's queue; keep that
        // near the prefetch.
        .set("queued.min.messages", prefetch.clamp(1, 1000).to_string())
        .set("queued.max.messages.kbytes", "1024")
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.wait.max.ms", millis(opts.fetch_wait).to_string())
        .set("enable.partition.eof", "false");
    opts.apply_extra(&mut config);
    let mut consumer: BaseConsumer<Context> = config
        .create_with_context(Context {
            shared: Arc::clone(&shared),
            inner: Arc::clone(&inner),
            consumer: OnceLock::new(),
            queues: Mutex::default(),
        })
        .map_err(|e| Error::Refused(format!("Kafka consumer settings: {e}")))?;
    let kick = Arc::clone(&shared.kick);
    consumer.set_nonempty_callback(move || kick.kick());
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    consumer
        .subscribe(&[queue])
        .map_err(|e| Error::Connection(format!("subscribing to `{queue}`: {e}")))?;
    let thread_shared = Arc::clone(&shared);
    let thread_inner = Arc::clone(&inner);
    std::thread::Builder::new()
        .name("callq-kafka-consumer".into())
        .spawn(move || run(consumer, &thread_shared, &thread_inner))
        .map_err(|e| Error::Connection(format!("starting the consumer thread: {e}")))?;
    Ok(KafkaConsumer {
        inner,
        shared,
        queue: queue.to_owned(),
    })
}

/// The consumer's thread: serves events, reads while there is room, sends
/// commits; when asked to stop, commits what finished and leaves the group.
fn run(consumer: Arc<BaseConsumer<Context>>, shared: &Shared, inner: &Inner) {
    let queue = shared.queue.clone();
    let mut last_commit: Option<Instant> = None;
    while !shared.is_stopping() {
        // Events: rebalances (their callbacks run here), commit results,
        // errors, and any record fetched before its partition's queue was
        // split off. A poll that served a rebalance or commit result also
        // returns `None`, so only a second `None` in a row means empty.
        let mut empty = 0;
        while empty < 2 {
            match consumer.poll(Duration::ZERO) {
                Some(event) => {
                    empty = 0;
                    if !handle(&queue, shared, event) {
                        return leave(consumer, shared, inner);
                    }
                }
                None => empty += 1,
            }
        }
        // Records, while there is room, a partition at a time in turn.
        {
            let queues = lock(&consumer.context().queues);
            let mut more = true;
            while more && shared.has_room() {
                more = false;
                for q in queues.values() {
                    if !shared.has_room() {
                        break;
                    }
                    if let Some(event) = q.poll(Duration::ZERO) {
                        more = true;
                        if !handle(&queue, shared, event) {
                            drop(queues);
                            return leave(consumer, shared, inner);
                        }
                    }
                }
            }
        }
        // Commits, at most every COMMIT_INTERVAL.
        let mut sleep = IDLE;
        if shared.commits_due() {
            let since = last_commit.map_or(COMMIT_INTERVAL, |at| at.elapsed());
            if since >= COMMIT_INTERVAL {
                let tpl = shared.take_commits(None);
                if tpl.count() > 0
                    && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
                {
                    debug!(queue, "commit not sent: {e}");
                    shared.commit_failed(&tpl);
                }
                last_commit = Some(Instant::now());
            } else {
                sleep = COMMIT_INTERVAL - since;
            }
        }
        shared.kick.wait(sleep);
    }
    leave(consumer, shared, inner);
}

/// Handles one polled event; `false` when the consumer failed for good.
fn handle(queue: &str, shared: &Shared, event: KafkaResult<BorrowedMessage<'_>>) -> bool {
    match event {
        Ok(message) => shared.offer(&message),
        Err(KafkaError::PartitionEOF(_)) => {}
        Err(KafkaError::MessageConsumptionFatal(code)) => {
            warn!(queue, "the consumer failed for good: {code}");
            lock(&shared.state).failed = Some(Error::Connection(format!(
                "Kafka consumer of `{queue}` failed: {code}"
            )));
            shared.wake_all();
            return false;
        }
        Err(e) => debug!(queue, "consume: {e}"),
    }
    true
}

/// Commits what finished (the unsettled deliveries are lost and go to the
/// next owner, those past their delivery limit to the dead-letter queue),
/// then leaves the group: dropping the consumer runs the revocation and
/// sends LeaveGroup.
fn leave(consumer: Arc<BaseConsumer<Context>>, shared: &Shared, inner: &Inner) {
    {
        let mut state = lock(&shared.state);
        state.closed = true;
        state.ready.clear();
    }
    shared.dead_letter_lost(inner, None);
    let tpl = shared.take_commits(None);
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
    {
        warn!(queue = %shared.queue, "final commit failed: {e}; the next owner gets those deliveries again");
    }
    // The partition queues hold the consumer: let them go first.
    lock(&consumer.context().queues).clear();
    drop(consumer);
    shared.left.send_replace(true);
    shared.wake_all();
    debug!(queue = %shared.queue, "consumer left its group");
}

/// A consumer of one queue.
pub(crate) struct KafkaConsumer {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    queue: String,
}

impl KafkaConsumer {
    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Dead-letters a record past the delivery limit in the background; the
    /// record counts as busy until then.
    fn dead_letter_past_limit(&self, record: Arc<Record>, spec: Option<QueueSpec>) {
        let inner = Arc::clone(&self.inner);
        let shared = Arc::clone(&self.shared);
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let past = spec.as_ref().and_then(QueueSpec::past_limit_queue);
            let sent = match past {
                Some(dead) => send_dead(&inner, dead, &record, "delivery_limit").await,
                None => Ok(()),
            };
            if let Err(e) = &sent {
                warn!(
                    queue,
                    "dead-lettering a message past its delivery limit failed: {e}; trying again"
                );
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            let mut state = lock(&shared.state);
            if let Some(part) = state.owned(record.partition, record.epoch) {
                part.busy = part.busy.saturating_sub(1);
                if sent.is_ok() {
                    part.track.finish(record.offset);
                    drop(state);
                    lock(&inner.seen).forget(&id(&queue, &record));
                } else if !part.revoking {
                    state.ready.push_front(record);
                }
            }
            shared.wake_all();
        });
    }
}

/// Publishes a confirmed copy of `record` to the dead-letter topic `dead`,
/// with the reason.
async fn send_dead(inner: &Inner, dead: &str, record: &Record, reason: &str) -> Result<(), Error> {
    let headers = dead_letter_headers(&visible_headers(&record.headers), reason);
    inner
        .send(
            dead,
            record.key.as_deref(),
            None,
            &record.body,
            &headers,
            false,
        )
        .await
}

fn id(queue: &str, record: &Record) -> RecordId {
    (queue.to_owned(), record.partition, record.offset)
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        loop {
            let woken = self.shared.wake.notified();
            let spec = self.inner.spec(&self.queue);
            let handed = {
                let mut state = lock(&self.shared.state);
                if let Some(e) = state.failed.take() {
                    state.closed = true;
                    return Some(Err(e));
                }
                if state.closed {
                    return None;
                }
                if state.held() < self.shared.prefetch
                    && let Some(record) = state.ready.pop_front()
                {
                    let before = lock(&self.inner.seen).bump(&id(&self.queue, &record));
                    let count = header_count(&record.headers).saturating_add(before);
                    let past = past_limit(count, spec.as_ref());
                    match state.owned(record.partition, record.epoch) {
                        Some(part) if past => {
                            part.busy += 1;
                            Some((record, count, true))
                        }
                        Some(part) => {
                            part.in_hand
                                .insert(record.offset, (Arc::clone(&record), count));
                            Some((record, count, false))
                        }
                        None => None,
                    }
                } else {
                    None
                }
            };
            match handed {
                Some((record, _, true)) => {
                    debug!(queue = %self.queue, offset = record.offset, "past the delivery limit: dead-lettering");
                    self.dead_letter_past_limit(record, spec);
                }
                Some((record, count, false)) => {
                    let settle = KafkaSettle {
                        inner: Arc::clone(&self.inner),
                        shared: Arc::clone(&self.shared),
                        record: Arc::clone(&record),
                        count,
                        spec,
                    };
                    // Room below the prefetch may have opened for the thread.
                    self.shared.kick.kick();
                    return Some(Ok(Delivery::new(
                        record.body.clone(),
                        visible_headers(&record.headers),
                        count > 0
                            || record.maybe_seen
                            || record.headers.contains_key(callq_broker::RELEASED_HEADER),
                        count,
                        self.queue.clone(),
                        Box::new(settle),
                    )));
                }
                None => woken.await,
            }
        }
    }

    fn assignment(&self) -> Option<Assignment> {
        Some(self.shared.assignment.clone())
    }

    async fn close(self: Box<Self>) {
        self.shared.end();
        let timeout = self.inner.opts.timeout;
        if tokio::time::timeout(timeout, self.shared.left())
            .await
            .is_err()
        {
            warn!(queue = %self.queue, "the consumer did not leave its group within {timeout:?}");
        }
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.shared.end();
    }
}

/// A delivery's lease and what settling it needs.
struct KafkaSettle {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    record: Arc<Record>,
    count: u32,
    spec: Option<QueueSpec>,
}

impl KafkaSettle {
    fn holds_lease(&self) -> bool {
        lock(&self.shared.state)
            .owned(self.record.partition, self.record.epoch)
            .is_some_and(|p| p.in_hand.contains_key(&self.record.offset))
    }

    /// Marks the record finished; `LeaseLost` if the lease went meanwhile.
    fn finish(&self) -> Result<(), Error> {
        let mut state = lock(&self.shared.state);
        let Some(part) = state.owned(self.record.partition, self.record.epoch) else {
            return Err(Error::LeaseLost);
        };
        if part.in_hand.remove(&self.record.offset).is_none() {
            return Err(Error::LeaseLost);
        }
        part.track.finish(self.record.offset);
        drop(state);
        lock(&self.inner.seen).forget(&id(&self.shared.queue, &self.record));
        self.shared.wake_all();
        Ok(())
    }

    /// The publish for a requeue or dead letter failed: the record returns
    /// to the consumer, to be handed out again.
    fn give_back(&self) {
        let mut state = lock(&self.shared.state);
        if let Some(part) = state.owned(self.record.partition, self.record.epoch)
            && part.in_hand.remove(&self.record.offset).is_some()
            && !part.revoking
        {
            state.ready.push_front(Arc::clone(&self.record));
        }
        drop(state);
        self.shared.wake_all();
    }
}

#[async_trait]
impl callq_broker::Settle for KafkaSettle {
    async fn settle(self: Box<Self>, disposition: Disposition) -> Result<(), Error> {
        if !self.holds_lease() {
            return Err(Error::LeaseLost);
        }
        let record = &self.record;
        let visible = visible_headers(&record.headers);
        let sent = match fate(disposition, self.count, self.spec.as_ref()) {
            Fate::Finish => Ok(()),
            Fate::Republish(count, released) => {
                let mut headers = visible;
                headers.insert(crate::DELIVERY_COUNT_HEADER.into(), count.to_string());
                if released {
                    headers.insert(callq_broker::RELEASED_HEADER.into(), count.to_string());
                }
                self.inner
                    .send(
                        &self.shared.queue,
                        record.key.as_deref(),
                        // Its own partition, which this consumer owns.
                        u32::try_from(record.partition).ok(),
                        &record.body,
                        &headers,
                        false,
                    )
                    .await
            }
            Fate::DeadLetter(dead, reason) => send_dead(&self.inner, &dead, record, &reason).await,
        };
        match sent {
            Ok(()) => self.finish(),
            Err(e) => {
                self.give_back();
                Err(e)
            }
        }
    }
}
