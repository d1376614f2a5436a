//! The adapter's own bookkeeping, free of any broker: what Kafka does not
//! keep for us.
//!
//! - [`Track`]: per partition, the offsets handed out and not finished, and
//!   so the offset to commit: the lowest unfinished one.
//! - [`Seen`]: how often this process has handed out each record, for
//!   [`callq_broker::Delivery::delivery_count`] (bounded in size).
//! - [`Bound`]: admission of publishes to a queue with a maximum length.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The offsets of one partition that a consumer handed out, and the offset
/// it may commit.
///
/// Offsets of a partition are handed out in increasing order (Kafka's
/// order), and finished in any order. Every offset below the lowest
/// unfinished one that was handed out is finished, and offsets Kafka never
/// returned (transaction markers, compacted records) need no handling: so
/// the commit point is the lowest unfinished offset, or one past the highest
/// handed out when none is unfinished. A slow delivery holds the commit back;
/// it never lets a later one be lost.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Track {
    /// Handed out and not finished.
    unfinished: BTreeSet<i64>,
    /// One past the highest offset handed out; `None` before the first.
    next: Option<i64>,
    /// The last commit point sent to the broker.
    committed: Option<i64>,
}

impl Track {
    /// Records that `offset` is handed out. `false` (and nothing recorded)
    /// when it is not past every offset handed out before: the client read
    /// it again (a refetch), and it is already in hand or finished.
    pub(crate) fn hand_out(&mut self, offset: i64) -> bool {
        if offset < 0 || self.next.is_some_and(|next| offset < next) {
            return false;
        }
        self.unfinished.insert(offset);
        self.next = Some(offset.saturating_add(1));
        true
    }

    /// Records that `offset` is finished (settled for good). `false` when it
    /// was not unfinished.
    pub(crate) fn finish(&mut self, offset: i64) -> bool {
        self.unfinished.remove(&offset)
    }

    /// Whether `offset` is handed out and not finished.
    #[cfg(test)]
    pub(crate) fn is_unfinished(&self, offset: i64) -> bool {
        self.unfinished.contains(&offset)
    }

    /// Offsets handed out and not finished.
    #[cfg(test)]
    pub(crate) fn unfinished(&self) -> usize {
        self.unfinished.len()
    }

    /// The offset a commit may name: the lowest unfinished one, else one
    /// past the highest handed out; `None` before anything was handed out.
    pub(crate) fn commit_point(&self) -> Option<i64> {
        self.unfinished.first().copied().or(self.next)
    }

    /// The commit point, if it moved past the last one committed.
    pub(crate) fn to_commit(&self) -> Option<i64> {
        let point = self.commit_point()?;
        match self.committed {
            Some(done) if done >= point => None,
            _ => Some(point),
        }
    }

    /// Records that a commit of `offset` was sent.
    pub(crate) fn committed(&mut self, offset: i64) {
        self.committed = Some(self.committed.map_or(offset, |c| c.max(offset)));
    }

    /// Records that the commit of `offset` failed: the next flush sends the
    /// commit point again.
    pub(crate) fn commit_failed(&mut self, offset: i64) {
        if self.committed.is_some_and(|c| c <= offset) {
            self.committed = None;
        }
    }
}

/// A record, as the delivery counts know it: topic, partition, offset.
pub(crate) type RecordId = (String, i32, i64);

/// How often this process handed out each record, bounded: past `cap`
/// records the oldest entry is forgotten (its next delivery then counts from
/// the record's own header only).
#[derive(Debug)]
pub(crate) struct Seen {
    cap: usize,
    seq: u64,
    counts: HashMap<RecordId, (u32, u64)>,
    order: BTreeMap<u64, RecordId>,
}

impl Seen {
    /// Remembers at most `cap` records (at least one).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            seq: 0,
            counts: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Counts one more hand-out of `id`; returns how often it was handed
    /// out before.
    pub(crate) fn bump(&mut self, id: &RecordId) -> u32 {
        if let Some((count, _)) = self.counts.get_mut(id) {
            let before = *count;
            *count = count.saturating_add(1);
            return before;
        }
        while self.counts.len() >= self.cap {
            match self.order.pop_first() {
                Some((_, oldest)) => {
                    self.counts.remove(&oldest);
                }
                None => break,
            }
        }
        self.seq += 1;
        self.counts.insert(id.clone(), (1, self.seq));
        self.order.insert(self.seq, id.clone());
        0
    }

    /// Forgets `id`: it was settled for good.
    pub(crate) fn forget(&mut self, id: &RecordId) {
        if let Some((_, seq)) = self.counts.remove(id) {
            self.order.remove(&seq);
        }
    }

    /// Records remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.counts.len()
    }
}

/// Admission of publishes to a queue declared with a maximum length.
///
/// Kafka has no maximum length, so the publisher counts: the backlog (high
/// watermark minus the group's committed offset, summed over partitions)
/// read from the broker, plus this process's publishes confirmed since that
/// read and those in flight. The count only over-estimates within one
/// process (commits only shrink the backlog), so a publish is admitted
/// without a read while the count is below the maximum, and refused only
/// after a fresh read says the queue is full. Reads older than the
/// refresh age are renewed, to see other processes' publishes: while the
/// count is below half the maximum, by one publisher while the others go
/// on; nearer the maximum, before anyone publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bound {
    /// The maximum length.
    pub(crate) max: u64,
    /// Backlog at the last read plus this process's confirmed publishes since.
    count: u64,
    /// Publishes admitted and not yet confirmed or failed.
    in_flight: u64,
    /// When the backlog was last read.
    read_at: Option<Instant>,
    /// A publisher is renewing a stale read while the others go on.
    refreshing: bool,
}

/// What [`Bound::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Publish: counted as in flight; report the outcome with [`Bound::done`].
    Yes,
    /// Publish (counted as in flight), and renew the stale read: record it
    /// with [`Bound::read`], or [`Bound::refresh_failed`].
    YesRefresh,
    /// Read the backlog first, then call [`Bound::admit_after_read`].
    Read,
}

impl Bound {
    /// A bound of `max` messages, not read yet.
    pub(crate) fn new(max: u64) -> Self {
        Self {
            max,
            count: 0,
            in_flight: 0,
            read_at: None,
            refreshing: false,
        }
    }

    /// Admits a publish on the counts known, or asks for a read: when none
    /// was made, when the last is older than `max_age`, or when the count
    /// says the queue is full.
    pub(crate) fn admit(&mut self, now: Instant, max_age: Duration) -> Admit {
        let fresh = self
            .read_at
            .is_some_and(|at| now.saturating_duration_since(at) <= max_age);
        let used = self.count.saturating_add(self.in_flight);
        if fresh && used < self.max {
            self.in_flight += 1;
            Admit::Yes
        } else if !fresh && self.read_at.is_some() && used < self.max / 2 {
            self.in_flight += 1;
            if std::mem::replace(&mut self.refreshing, true) {
                Admit::Yes
            } else {
                Admit::YesRefresh
            }
        } else {
            Admit::Read
        }
    }

    /// A renewal of a stale read failed: the next stale admit tries again.
    pub(crate) fn refresh_failed(&mut self) {
        self.refreshing = false;
    }

    /// Whether a read made at or after `since` is on record: concurrent
    /// publishers waiting for a read reuse the one made while they waited.
    pub(crate) fn read_since(&self, since: Instant) -> bool {
        self.read_at.is_some_and(|at| at >= since)
    }

    /// Records a backlog read at `at`.
    pub(crate) fn read(&mut self, backlog: u64, at: Instant) {
        self.count = backlog;
        self.read_at = Some(at);
        self.refreshing = false;
    }

    /// After a read: admits the publish (counted in flight), or refuses it
    /// because the queue is full.
    pub(crate) fn admit_after_read(&mut self) -> bool {
        if self.count.saturating_add(self.in_flight) < self.max {
            self.in_flight += 1;
            true
        } else {
            false
        }
    }

    /// Records the outcome of an admitted publish: `stored` when confirmed.
    /// A publish that failed may still be stored; the next read counts it.
    pub(crate) fn done(&mut self, stored: bool) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if stored {
            self.count = self.count.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_point_is_the_lowest_unfinished_offset() {
        let mut t = Track::default();
        assert_eq!(
            t.commit_point(),
            None,
            "nothing handed out: nothing to commit"
        );
        for o in 10..15 {
            assert!(t.hand_out(o));
        }
        assert_eq!(t.commit_point(), Some(10));
        // A slow delivery (10) holds the commit back while later ones finish.
        assert!(t.finish(12));
        assert!(t.finish(11));
        assert_eq!(t.commit_point(), Some(10));
        assert!(t.finish(10));
        assert_eq!(t.commit_point(), Some(13), "10..=12 finished, 13 is next");
        assert!(t.finish(14));
        assert_eq!(t.commit_point(), Some(13));
        assert!(t.finish(13));
        assert_eq!(
            t.commit_point(),
            Some(15),
            "all finished: one past the last"
        );
        assert_eq!(t.unfinished(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_committed_past() {
        let mut t = Track::default();
        // Kafka skips offsets (transaction markers, compaction).
        assert!(t.hand_out(3));
        assert!(t.hand_out(7));
        assert!(t.finish(3));
        assert_eq!(t.commit_point(), Some(7));
        assert!(t.finish(7));
        assert_eq!(t.commit_point(), Some(8));
    }

    #[test]
    fn refetched_offsets_are_not_handed_out_twice() {
        let mut t = Track::default();
        assert!(t.hand_out(0));
        assert!(t.hand_out(1));
        assert!(t.finish(0));
        assert!(!t.hand_out(0), "finished, read again");
        assert!(!t.hand_out(1), "in hand, read again");
        assert!(!t.hand_out(-1), "a negative offset is no record");
        assert!(t.is_unfinished(1));
        assert!(!t.is_unfinished(0));
        assert!(!t.finish(0), "finishing twice reports it");
        assert!(t.hand_out(2));
        assert_eq!(t.commit_point(), Some(1));
    }

    #[test]
    fn commits_are_sent_once_per_advance_and_again_after_a_failure() {
        let mut t = Track::default();
        assert_eq!(t.to_commit(), None);
        assert!(t.hand_out(0));
        assert!(t.hand_out(1));
        assert_eq!(t.to_commit(), Some(0), "the group may have no offset yet");
        t.committed(0);
        assert_eq!(t.to_commit(), None);
        assert!(t.finish(1));
        assert_eq!(t.to_commit(), None, "1 finished, 0 still holds the point");
        assert!(t.finish(0));
        assert_eq!(t.to_commit(), Some(2));
        t.committed(2);
        assert_eq!(t.to_commit(), None);
        t.commit_failed(1);
        assert_eq!(
            t.to_commit(),
            None,
            "an older commit's failure changes nothing"
        );
        t.commit_failed(2);
        assert_eq!(t.to_commit(), Some(2), "a failed commit is sent again");
        t.committed(2);
        t.committed(1);
        assert_eq!(t.to_commit(), None, "commits never go back");
    }

    #[test]
    fn seen_counts_hand_outs_and_stays_bounded() {
        let id = |o: i64| ("t".to_string(), 0, o);
        let mut seen = Seen::new(3);
        assert_eq!(seen.bump(&id(1)), 0);
        assert_eq!(seen.bump(&id(1)), 1);
        assert_eq!(seen.bump(&id(1)), 2);
        assert_eq!(seen.bump(&id(2)), 0);
        assert_eq!(seen.bump(&id(3)), 0);
        assert_eq!(seen.len(), 3);
        // A fourth record evicts the oldest entry (1).
        assert_eq!(seen.bump(&id(4)), 0);
        assert_eq!(seen.len(), 3);
        assert_eq!(seen.bump(&id(1)), 0, "evicted: counted afresh");
        seen.forget(&id(3));
        seen.forget(&id(99));
        assert_eq!(seen.bump(&id(3)), 0, "forgotten once settled");
        assert!(seen.len() <= 3);
    }

    #[test]
    fn bound_admits_on_counts_and_refuses_only_after_a_read() {
        let t0 = Instant::now();
        let age = Duration::from_secs(1);
        let mut b = Bound::new(3);
        assert_eq!(b.admit(t0, age), Admit::Read, "never read");
        b.read(1, t0);
        assert!(b.admit_after_read());
        assert_eq!(b.admit(t0, age), Admit::Yes);
        assert_eq!(b.admit(t0, age), Admit::Read, "1 stored + 2 in flight = 3");
        b.read(1, t0);
        assert!(!b.admit_after_read(), "still full after a read: refused");
        b.done(true);
        b.done(false);
        // 2 counted (1 read + 1 confirmed), none in flight.
        assert_eq!(b.admit(t0, age), Admit::Yes);
        assert_eq!(b.admit(t0, age), Admit::Read);
        // The consumer committed: a read sees a smaller backlog.
        b.read(0, t0);
        assert!(b.admit_after_read());
        // An old read is renewed even when the count has room.
        b.done(true);
        b.done(true);
        assert_eq!(b.admit(t0 + Duration::from_secs(2), age), Admit::Read);
        assert!(b.read_since(t0));
        assert!(!b.read_since(t0 + Duration::from_millis(1)));
    }

    #[test]
    fn a_stale_read_far_from_the_bound_is_renewed_by_one_publisher_only() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(2);
        let age = Duration::from_secs(1);
        let mut b = Bound::new(100);
        b.read(10, t0);
        assert_eq!(b.admit(later, age), Admit::YesRefresh, "one renews");
        assert_eq!(b.admit(later, age), Admit::Yes, "the others go on");
        b.refresh_failed();
        assert_eq!(b.admit(later, age), Admit::YesRefresh, "tried again");
        b.read(40, later);
        assert_eq!(b.admit(later, age), Admit::Yes, "fresh again");
        // 40 read + 4 in flight: still below half of 100 when stale...
        let much_later = later + Duration::from_secs(2);
        assert_eq!(b.admit(much_later, age), Admit::YesRefresh);
        b.read(60, much_later);
        // ...but at 60 + 5 in flight, a stale read blocks everyone.
        assert_eq!(
            b.admit(much_later + Duration::from_secs(2), age),
            Admit::Read
        );
    }
}
