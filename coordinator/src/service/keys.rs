//! Per-key concurrency limits: a service whose workers set
//! `max_running_per_key` runs at most that many calls of one
//! `concurrency_key` at once, across workers. A worker asks `admit` before
//! it runs a keyed call; the coordinator counts the key's places in memory
//! (no store write for an admitted call) and holds a call that finds none
//! (durably, among the delayed calls, with no due time), publishing it when
//! a place is free. Calls without a key never ask.
//!
//! The places are rebuilt, not stored: a coordinator that takes over
//! learns the running keyed calls from the workers' heartbeats (each
//! in-flight call carries its key) and the waiting ones from its store,
//! and admits nothing until every live worker had time to report.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use callq_schemas::Uuid;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::Coordinator;
use crate::store::PARKED;
use crate::{Delayed, Error, Store};

/// A key of a service.
pub(super) type KeyId = (String, String);

/// How long a place is kept for a published waiting call before it goes to
/// the next one (the call, should it come later, asks again).
const RESERVATION_TTL: Duration = Duration::from_secs(60);

/// Waiting calls kept in memory at most; more stay in the store only and
/// are read back as the lists drain.
const WAITING_MAX: usize = 1_000_000;

/// Waiting calls read back from the store at once.
const RESCAN_MAX: usize = 10_000;

/// How often the store is read for waiting calls memory does not list
/// (ones past [`WAITING_MAX`], or ones whose release was not committed).
const RESCAN_EVERY: Duration = Duration::from_secs(30);

/// Calls given back remembered, so that a heartbeat sent before the
/// `vacate` but read after it does not take the place again.
const VACATED_KEPT: usize = 65_536;

/// Heartbeats in a row that must omit an admitted call before its place is
/// taken back (its `vacate` was lost).
const MISSED_BEATS: u8 = 2;

/// A call that holds a place of its key.
#[derive(Debug)]
struct Holder {
    call_id: Uuid,
    /// The worker that runs it; `None`: published for a waiting call, not
    /// yet come.
    worker: Option<String>,
    since: Instant,
    /// Heartbeats of its worker since `since` that did not list it.
    missed: u8,
}

/// One key's places and the calls waiting for one.
#[derive(Debug, Default)]
struct Places {
    limit: u32,
    holders: Vec<Holder>,
    waiting: VecDeque<Uuid>,
}

impl Places {
    fn has_room(&self) -> bool {
        self.holders.len() < usize::try_from(self.limit.max(1)).unwrap_or(usize::MAX)
    }
}

/// The decision on `admit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Run it: it holds a place.
    Run,
    /// Hold it until a place is free.
    Wait,
}

/// Every key with running or waiting calls.
#[derive(Debug)]
pub(super) struct KeySlots {
    keys: HashMap<KeyId, Places>,
    /// The key of every call that holds a place.
    holding: HashMap<Uuid, KeyId>,
    /// The calls each worker holds places for.
    by_worker: HashMap<String, HashSet<Uuid>>,
    /// The calls in the waiting lists.
    queued: HashSet<Uuid>,
    /// Until then, nothing is admitted: a coordinator that just took over
    /// does not know yet what runs.
    warm_until: Instant,
    /// Keys whose places may have freed, to fill.
    to_fill: HashSet<KeyId>,
    /// The calls given back most recently, oldest first.
    vacated: VecDeque<Uuid>,
    vacated_ids: HashSet<Uuid>,
    /// The store holds waiting calls memory does not list.
    rescan_at: Instant,
    overflowed: bool,
}

impl KeySlots {
    /// Admits nothing for `warm_up`.
    pub(super) fn new(now: Instant, warm_up: Duration) -> Self {
        Self {
            keys: HashMap::new(),
            holding: HashMap::new(),
            by_worker: HashMap::new(),
            queued: HashSet::new(),
            warm_until: now + warm_up,
            to_fill: HashSet::new(),
            vacated: VecDeque::new(),
            vacated_ids: HashSet::new(),
            rescan_at: now,
            overflowed: false,
        }
    }

    /// A worker asks to run `call_id` under `key`.
    pub(super) fn admit(
        &mut self,
        worker: &str,
        call_id: Uuid,
        key: KeyId,
        limit: u32,
        now: Instant,
    ) -> Admission {
        if let Some(held) = self.holding.get(&call_id).cloned() {
            // The call holds a place already (published for it, or a copy
            // of it that ran elsewhere and was lost): this copy takes it.
            if held == key {
                self.take_over(worker, call_id, &key, now);
                return Admission::Run;
            }
        }
        let warming = now < self.warm_until;
        let places = self.keys.entry(key.clone()).or_default();
        places.limit = limit.max(1);
        if !warming && places.has_room() && places.waiting.is_empty() {
            places.holders.push(Holder {
                call_id,
                worker: Some(worker.to_owned()),
                since: now,
                missed: 0,
            });
            self.holding.insert(call_id, key);
            self.by_worker
                .entry(worker.to_owned())
                .or_default()
                .insert(call_id);
            return Admission::Run;
        }
        if !self.queued.contains(&call_id) {
            if self.queued.len() < WAITING_MAX {
                places.waiting.push_back(call_id);
                self.queued.insert(call_id);
            } else {
                self.overflowed = true;
            }
        }
        if warming || places.has_room() {
            self.to_fill.insert(key);
        }
        Admission::Wait
    }

    fn take_over(&mut self, worker: &str, call_id: Uuid, key: &KeyId, now: Instant) {
        let Some(places) = self.keys.get_mut(key) else {
            return;
        };
        for h in &mut places.holders {
            if h.call_id == call_id {
                if let Some(old) = h.worker.replace(worker.to_owned())
                    && let Some(calls) = self.by_worker.get_mut(&old)
                {
                    calls.remove(&call_id);
                }
                h.since = now;
                h.missed = 0;
            }
        }
        self.by_worker
            .entry(worker.to_owned())
            .or_default()
            .insert(call_id);
    }

    /// `worker` no longer runs these calls: their places are free. A call
    /// another worker holds now (a later copy) keeps its place.
    pub(super) fn vacate(&mut self, worker: &str, calls: &[Uuid]) {
        for call_id in calls {
            let ran_here = self
                .by_worker
                .get_mut(worker)
                .is_some_and(|c| c.remove(call_id));
            if ran_here {
                self.free(*call_id);
                if self.vacated_ids.insert(*call_id) {
                    self.vacated.push_back(*call_id);
                }
                while self.vacated.len() > VACATED_KEPT {
                    if let Some(old) = self.vacated.pop_front() {
                        self.vacated_ids.remove(&old);
                    }
                }
            }
        }
    }

    /// Frees the place `call_id` holds.
    fn free(&mut self, call_id: Uuid) {
        let Some(key) = self.holding.remove(&call_id) else {
            return;
        };
        if let Some(places) = self.keys.get_mut(&key) {
            places.holders.retain(|h| h.call_id != call_id);
            if places.holders.is_empty() && places.waiting.is_empty() {
                self.keys.remove(&key);
            } else {
                self.to_fill.insert(key);
            }
        }
    }

    /// A worker is gone (dead, or left): its places are free; its calls
    /// are published again by whoever does so, and ask again.
    pub(super) fn worker_gone(&mut self, worker: &str) {
        for call_id in self.by_worker.remove(worker).unwrap_or_default() {
            self.free(call_id);
        }
    }

    /// A heartbeat of `worker` lists these keyed calls in flight: calls a
    /// coordinator that took over did not know hold places (they run), and
    /// admitted calls the worker no longer lists lose theirs after
    /// [`MISSED_BEATS`] beats (their `vacate` was lost).
    pub(super) fn heard(
        &mut self,
        worker: &str,
        listed: &[(Uuid, KeyId)],
        now: Instant,
        interval: Duration,
    ) {
        for (call_id, key) in listed {
            if self.holding.contains_key(call_id) || self.vacated_ids.contains(call_id) {
                continue;
            }
            let places = self.keys.entry(key.clone()).or_default();
            places.limit = places.limit.max(1);
            places.holders.push(Holder {
                call_id: *call_id,
                worker: Some(worker.to_owned()),
                since: now,
                missed: 0,
            });
            self.holding.insert(*call_id, key.clone());
            self.by_worker
                .entry(worker.to_owned())
                .or_default()
                .insert(*call_id);
        }
        let Some(calls) = self.by_worker.get(worker) else {
            return;
        };
        let listed: HashSet<Uuid> = listed.iter().map(|(id, _)| *id).collect();
        let mut lost = Vec::new();
        for call_id in calls {
            let Some(key) = self.holding.get(call_id) else {
                continue;
            };
            let Some(places) = self.keys.get_mut(key) else {
                continue;
            };
            for h in &mut places.holders {
                if h.call_id != *call_id {
                    continue;
                }
                if listed.contains(call_id) {
                    h.missed = 0;
                } else if now.saturating_duration_since(h.since) > interval {
                    h.missed = h.missed.saturating_add(1);
                    if h.missed >= MISSED_BEATS {
                        lost.push(*call_id);
                    }
                }
            }
        }
        if !lost.is_empty() {
            debug!(%worker, calls = lost.len(), "keyed calls no longer in flight: their places are free");
            self.vacate(worker, &lost);
        }
    }

    /// Places kept for published waiting calls that did not come in time
    /// go to the next ones.
    pub(super) fn expire(&mut self, now: Instant) {
        let mut stale = Vec::new();
        for places in self.keys.values() {
            for h in &places.holders {
                if h.worker.is_none() && now.saturating_duration_since(h.since) > RESERVATION_TTL {
                    stale.push(h.call_id);
                }
            }
        }
        for call_id in stale {
            self.free(call_id);
        }
    }

    /// The next waiting call of `key`, if the key has a free place.
    fn next_waiting(&mut self, key: &KeyId) -> Option<Uuid> {
        let places = self.keys.get_mut(key)?;
        if !places.has_room() {
            return None;
        }
        let next = places.waiting.pop_front()?;
        self.queued.remove(&next);
        Some(next)
    }

    /// Forgets a key that holds and waits for nothing.
    fn prune(&mut self, key: &KeyId) {
        if self
            .keys
            .get(key)
            .is_some_and(|p| p.holders.is_empty() && p.waiting.is_empty())
        {
            self.keys.remove(key);
        }
    }

    /// Keeps a place of `key` for `call_id`, published for it.
    fn reserve(&mut self, key: &KeyId, call_id: Uuid, now: Instant) {
        if let Some(places) = self.keys.get_mut(key) {
            places.holders.push(Holder {
                call_id,
                worker: None,
                since: now,
                missed: 0,
            });
            self.holding.insert(call_id, key.clone());
        }
    }

    /// Gives the places of calls whose release failed back, the calls to
    /// the front of their lists.
    fn unreserve(&mut self, released: &[(KeyId, Uuid)]) {
        for (key, call_id) in released.iter().rev() {
            self.free(*call_id);
            let places = self.keys.entry(key.clone()).or_default();
            places.limit = places.limit.max(1);
            if self.queued.insert(*call_id) {
                places.waiting.push_front(*call_id);
            }
            self.to_fill.insert(key.clone());
        }
    }

    /// Adds a call the store holds as waiting, unless memory lists it.
    fn adopt_waiting(&mut self, key: KeyId, call_id: Uuid) {
        if self.holding.contains_key(&call_id)
            || self.queued.contains(&call_id)
            || self.queued.len() >= WAITING_MAX
        {
            return;
        }
        let places = self.keys.entry(key.clone()).or_default();
        places.limit = places.limit.max(1);
        places.waiting.push_back(call_id);
        self.queued.insert(call_id);
        self.to_fill.insert(key);
    }

    /// Calls waiting for a place, in memory.
    pub(super) fn waiting(&self) -> usize {
        self.queued.len()
    }

    /// Calls holding a place.
    pub(super) fn running(&self) -> usize {
        self.holding.len()
    }
}

/// The key of a call held among the delayed ones, from its body.
fn key_of(d: &Delayed) -> Option<KeyId> {
    let call: callq_schemas::Call = serde_json::from_str(&d.body).ok()?;
    Some((call.service, call.concurrency_key?))
}

impl<S: Store> Coordinator<S> {
    /// `admit`: runs the call now, or holds it (durably, with the batch's
    /// commit) until a place of its key is free.
    pub(super) fn admit(
        &mut self,
        worker: &str,
        call: callq_schemas::protocol::KeyedCall,
    ) -> Result<bool, Error> {
        let now = Instant::now();
        let lease = call.lease;
        let key = (call.service.clone(), call.key);
        match self.keys.admit(worker, lease.call_id, key, call.limit, now) {
            Admission::Run => Ok(true),
            Admission::Wait => {
                self.ledger.park(
                    lease,
                    Delayed {
                        call_id: lease.call_id,
                        due_ms: PARKED,
                        service: call.service,
                        body: call.body,
                        attempt: call.attempt.max(2),
                    },
                )?;
                Ok(false)
            }
        }
    }

    /// Publishes the next waiting calls of every key with free places
    /// (after a batch, and every tick); then lets go of the published ones.
    pub(super) async fn fill_keys(&mut self) {
        let now = Instant::now();
        if now < self.keys.warm_until {
            return;
        }
        if now >= self.keys.rescan_at {
            self.rescan_parked(now);
        }
        if self.keys.to_fill.is_empty() {
            return;
        }
        let keys: Vec<KeyId> = self.keys.to_fill.drain().collect();
        let mut released = Vec::new();
        let mut published = Vec::new();
        for key in keys {
            while let Some(call_id) = self.keys.next_waiting(&key) {
                match self.ledger.release_parked(call_id) {
                    Ok(true) => {
                        self.keys.reserve(&key, call_id, now);
                        published.push((key.clone(), call_id));
                        released.push(call_id);
                    }
                    // Cancelled, or decided, meanwhile: the next one.
                    Ok(false) => released.push(call_id),
                    Err(e) => {
                        warn!("releasing a call waiting for a place of its key: {e}");
                        self.keys.unreserve(&[(key.clone(), call_id)]);
                        break;
                    }
                }
            }
            self.keys.prune(&key);
        }
        if released.is_empty() {
            return;
        }
        match self.ledger.commit() {
            Ok(effects) => self.carry_out(effects).await,
            Err(e) => {
                error!("committing the release of calls waiting for their keys failed: {e}");
                self.keys.unreserve(&published);
                return;
            }
        }
        if let Err(e) = self.ledger.forget_delayed(&released) {
            // Read back by a later rescan and published again, which their
            // records make harmless.
            warn!("letting go of published waiting calls: {e}");
        }
        if self.keys.overflowed && self.keys.queued.is_empty() {
            self.keys.rescan_at = now;
        }
    }

    /// Reads the store's waiting calls that memory does not list: all of
    /// them once a coordinator takes over, and those past the memory bound
    /// or whose release was not committed later.
    fn rescan_parked(&mut self, now: Instant) {
        self.keys.rescan_at = now + RESCAN_EVERY;
        let parked = match self.ledger.store().parked_delayed(RESCAN_MAX) {
            Ok(parked) => parked,
            Err(e) => {
                warn!("reading the calls waiting for a place of their key: {e}");
                return;
            }
        };
        let full = parked.len() >= RESCAN_MAX;
        let before = self.keys.queued.len();
        for d in parked {
            match key_of(&d) {
                Some(key) => self.keys.adopt_waiting(key, d.call_id),
                None => {
                    warn!(call_id = %d.call_id, "a held call without a concurrency key waits for none: it stays held")
                }
            }
        }
        self.keys.overflowed = full;
        let adopted = self.keys.queued.len().saturating_sub(before);
        if adopted > 0 {
            info!(
                calls = adopted,
                "calls waiting for a place of their key read from the store"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(k: &str) -> KeyId {
        ("acct".to_owned(), k.to_owned())
    }

    fn slots(now: Instant) -> KeySlots {
        KeySlots::new(now, Duration::ZERO)
    }

    /// Key `k` with limit 1: a call admitted and given back, two waiting.
    fn one_running_two_waiting(now: Instant) -> (KeySlots, [Uuid; 2]) {
        let mut s = slots(now);
        let [a, b, c] = [1_u128, 2, 3].map(Uuid::from_u128);
        s.admit("w1", a, key("k"), 1, now);
        s.admit("w1", b, key("k"), 1, now);
        s.admit("w1", c, key("k"), 1, now);
        s.vacate("w1", &[a]);
        (s, [b, c])
    }

    #[test]
    fn a_key_runs_up_to_its_limit_and_the_rest_wait_in_order() {
        let now = Instant::now();
        let mut s = slots(now);
        let [a, b, c, d] = [1_u128, 2, 3, 4].map(Uuid::from_u128);
        assert_eq!(s.admit("w1", a, key("k"), 2, now), Admission::Run);
        assert_eq!(s.admit("w2", b, key("k"), 2, now), Admission::Run);
        assert_eq!(s.admit("w1", c, key("k"), 2, now), Admission::Wait);
        assert_eq!(s.admit("w2", d, key("k"), 2, now), Admission::Wait);
        // Another key is not held up.
        assert_eq!(
            s.admit("w1", Uuid::from_u128(9), key("j"), 2, now),
            Admission::Run
        );
        assert_eq!(s.next_waiting(&key("k")), None, "no free place yet");
        s.vacate("w1", &[a]);
        assert!(s.to_fill.contains(&key("k")));
        assert_eq!(s.next_waiting(&key("k")), Some(c));
        s.reserve(&key("k"), c, now);
        assert_eq!(
            s.next_waiting(&key("k")),
            None,
            "the freed place is kept for c"
        );
        // c comes, to another worker, and takes its place.
        assert_eq!(s.admit("w3", c, key("k"), 2, now), Admission::Run);
        assert_eq!((s.running(), s.waiting()), (3, 1));
    }

    #[test]
    fn a_waiting_call_that_asks_again_waits_once() {
        let now = Instant::now();
        let mut s = slots(now);
        let [a, b] = [1_u128, 2].map(Uuid::from_u128);
        s.admit("w1", a, key("k"), 1, now);
        assert_eq!(s.admit("w1", b, key("k"), 1, now), Admission::Wait);
        assert_eq!(s.admit("w2", b, key("k"), 1, now), Admission::Wait);
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn only_the_worker_that_runs_a_call_frees_its_place() {
        let now = Instant::now();
        let mut s = slots(now);
        let a = Uuid::from_u128(1);
        s.admit("w1", a, key("k"), 1, now);
        // A later copy of the call took the place on w2.
        s.admit("w2", a, key("k"), 1, now);
        s.vacate("w1", &[a]);
        assert_eq!(s.running(), 1, "w1's late vacate freed w2's place");
        s.vacate("w2", &[a]);
        assert_eq!(s.running(), 0);
        assert!(s.keys.is_empty(), "an idle key is forgotten");
    }

    #[test]
    fn nothing_is_admitted_while_warming_up() {
        let now = Instant::now();
        let mut s = KeySlots::new(now, Duration::from_secs(1));
        let a = Uuid::from_u128(1);
        assert_eq!(s.admit("w1", a, key("k"), 1, now), Admission::Wait);
        assert!(s.to_fill.contains(&key("k")));
        let later = now + Duration::from_secs(2);
        assert_eq!(
            s.admit("w1", Uuid::from_u128(2), key("j"), 1, later),
            Admission::Run
        );
    }

    #[test]
    fn a_heartbeat_read_after_the_vacate_does_not_take_the_place_again() {
        let now = Instant::now();
        let mut s = slots(now);
        let a = Uuid::from_u128(1);
        s.admit("w1", a, key("k"), 1, now);
        s.vacate("w1", &[a]);
        s.heard("w1", &[(a, key("k"))], now, Duration::from_millis(250));
        assert_eq!(s.running(), 0);
    }

    #[test]
    fn a_dead_worker_s_places_are_freed() {
        let now = Instant::now();
        let mut s = slots(now);
        let [a, b] = [1_u128, 2].map(Uuid::from_u128);
        s.admit("w1", a, key("k"), 1, now);
        s.admit("w2", b, key("k"), 1, now);
        s.worker_gone("w1");
        assert_eq!(s.running(), 0);
        assert_eq!(s.next_waiting(&key("k")), Some(b));
    }

    #[test]
    fn heartbeats_teach_a_new_coordinator_what_runs_and_free_what_stopped() {
        let interval = Duration::from_millis(250);
        let now = Instant::now();
        let mut s = KeySlots::new(now, Duration::from_secs(1));
        let [a, b] = [1_u128, 2].map(Uuid::from_u128);
        // Taken over while w1 runs a.
        s.heard("w1", &[(a, key("k"))], now, interval);
        assert_eq!(s.running(), 1);
        let later = now + Duration::from_secs(2);
        assert_eq!(s.admit("w2", b, key("k"), 1, later), Admission::Wait);
        // a ended and its vacate was lost: two beats without it free it.
        s.heard("w1", &[], later, interval);
        assert_eq!(s.running(), 1);
        s.heard("w1", &[], later + interval, interval);
        assert_eq!(s.running(), 0);
        assert_eq!(s.next_waiting(&key("k")), Some(b));
    }

    #[test]
    fn a_kept_place_nobody_takes_goes_to_the_next_call() {
        let now = Instant::now();
        let (mut s, [b, c]) = one_running_two_waiting(now);
        assert_eq!(s.next_waiting(&key("k")), Some(b));
        s.reserve(&key("k"), b, now);
        s.expire(now + Duration::from_secs(1));
        assert_eq!(s.running(), 1, "kept within its time");
        s.expire(now + RESERVATION_TTL + Duration::from_secs(1));
        assert_eq!(s.next_waiting(&key("k")), Some(c));
    }

    #[test]
    fn a_failed_release_puts_the_calls_back_first() {
        let now = Instant::now();
        let (mut s, [b, _]) = one_running_two_waiting(now);
        let next = s.next_waiting(&key("k")).unwrap();
        s.reserve(&key("k"), next, now);
        s.unreserve(&[(key("k"), next)]);
        assert_eq!(s.next_waiting(&key("k")), Some(b));
    }
}
