//! The call ledger: who may run, trace and complete each call.

use std::collections::{HashMap, HashSet};

use callq_schemas::protocol::{
    CancelDecision, CompleteDecision, Lease, ResumeDecision, SessionState, SessionWrite,
    TraceDecision, retryable,
};
use callq_schemas::{Outcome, Reply, Uuid, codes};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::{Delayed, Error, Store};

/// Who holds the current attempt of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The worker.
    pub worker: String,
    /// The delivery it holds the attempt through.
    pub lease: Lease,
}

/// Where a call stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CallState {
    /// Not decided yet.
    Open,
    /// Completed; the reply, where the completion carried one.
    Done {
        /// The recorded reply.
        reply: Option<Reply>,
    },
    /// An attempt that left traces was lost; the client was answered with
    /// this `fatal` reply.
    Failed {
        /// The `fatal` reply.
        reply: Reply,
    },
}

/// What the ledger knows of one call. A call gets a record only when it
/// leaves the fast path: a trace, a resume, its worker's death, or a
/// completion that writes a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The service, for re-issues and logs.
    pub service: String,
    /// Where the client waits, for a `fatal` answer.
    pub reply_to: Option<String>,
    /// The current attempt; every lower attempt is revoked.
    pub attempt: u32,
    /// Who holds the current attempt; `None` until a copy claims it.
    pub holder: Option<Holder>,
    /// Traces granted to the current attempt. An attempt with traces is
    /// never followed by another, losing it fails the call, unless all of
    /// them are transactions whose outbox admits one commit per call
    /// ([`EXACT_TRACE`](callq_schemas::protocol::EXACT_TRACE)).
    pub traces: Vec<String>,
    /// The decision.
    pub state: CallState,
    /// Leases that held an attempt and lost it, most recent last (at most
    /// 16): a late request of one of them (a retry whose
    /// first answer was slow) is told `superseded` instead of being taken
    /// for a new delivery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<Uuid>,
    /// The SHA-256 (hex) of the call's body, as the first `resume` or
    /// `trace` that carried one reported it: a copy with another body is
    /// refused ([`Ledger::same_body`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The record of an idempotency key ([`key_id`]) names the call that
    /// holds the key, and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_holder: Option<KeyHolder>,
    /// Later calls with this call's idempotency key, waiting for its
    /// outcome (at most [`FOLLOWERS_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub followers: Vec<Follower>,
}

/// The call that holds an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHolder {
    /// The first call with the key.
    pub call_id: Uuid,
    /// The key is held until this instant (ms since the Unix epoch); a
    /// call with the key after it runs and holds the key anew.
    pub until_ms: i64,
}

/// A call that waits for the outcome of an earlier call with its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Follower {
    /// The waiting call.
    pub call_id: Uuid,
    /// Where its client waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// Calls that wait on one call's outcome, at most; one more is answered
/// `error` (`idempotency_busy`).
pub const FOLLOWERS_KEPT: usize = 1024;

/// The ledger id of an idempotency key of a service: a name-based UUID
/// (version 8, from SHA-256), so that the key's record lives, and is
/// forgotten, like a call's.
pub fn key_id(service: &str, key: &str) -> Uuid {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"callq.idempotency_key\0");
    h.update(service.as_bytes());
    h.update(b"\0");
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionLife {
    /// Live.
    Open,
    /// Idle past its expiry; its data is gone.
    Expired,
    /// Closed by a call; its data is gone.
    Closed,
}

/// A session's data, versioned, in the coordinator's store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// One more with each committed write.
    pub version: u64,
    /// The data.
    #[serde(default)]
    pub data: Map<String, Value>,
    /// Where it is in its life.
    pub life: SessionLife,
    /// Its last use, in milliseconds since the Unix epoch. Reads move it in
    /// memory and write it only when the stored value is a quarter of the
    /// expiry old, so that reads cost no write.
    pub used_ms: i64,
}

impl SessionRecord {
    /// Live, and last used before `before_ms`.
    pub fn idle_since(&self, before_ms: i64) -> bool {
        self.life == SessionLife::Open && self.used_ms < before_ms
    }

    /// Ended (expired or closed), and last used before `before_ms`.
    pub fn ended_before(&self, before_ms: i64) -> bool {
        self.life != SessionLife::Open && self.used_ms < before_ms
    }

    fn new(now_ms: i64) -> Self {
        Self {
            version: 0,
            data: Map::new(),
            life: SessionLife::Open,
            used_ms: now_ms,
        }
    }
}

/// Sessions the ledger keeps in memory at most (the store has them all).
const SESSIONS_CACHED: usize = 100_000;

/// Lost leases a record remembers.
const LOST_LEASES_KEPT: usize = 16;

impl CallRecord {
    /// Whether `lease` holds the call's current attempt, `attempt`.
    fn holds(&self, lease: Lease, attempt: u32) -> bool {
        self.attempt == attempt
            && self
                .holder
                .as_ref()
                .is_some_and(|h| h.lease.token == lease.token)
    }

    /// The holder loses the current attempt: its lease is remembered.
    fn unhold(&mut self) {
        if let Some(h) = self.holder.take() {
            if self.lost.len() >= LOST_LEASES_KEPT {
                self.lost.remove(0);
            }
            self.lost.push(h.lease.token);
        }
    }

    /// An undecided call whose current attempt `holder` holds.
    fn open(
        service: &str,
        reply_to: Option<&str>,
        attempt: u32,
        holder: Holder,
        traces: Vec<String>,
    ) -> Self {
        Self {
            service: service.to_owned(),
            reply_to: reply_to.map(str::to_owned),
            attempt,
            holder: Some(holder),
            traces,
            state: CallState::Open,
            lost: Vec::new(),
            digest: None,
            key_holder: None,
            followers: Vec::new(),
        }
    }

    /// A record decided at once, holding `reply` and no holder.
    fn decided(call_id: Uuid, service: &str, reply: Option<Reply>) -> Self {
        let mut record = Self::open(service, None, 1, placeholder(call_id), Vec::new());
        record.holder = None;
        record.state = CallState::Done { reply };
        record
    }

    /// The reply the call was decided with, if it is decided with one.
    fn decided_reply(&self) -> Option<&Reply> {
        match &self.state {
            CallState::Done { reply } => reply.as_ref(),
            CallState::Failed { reply } => Some(reply),
            CallState::Open => None,
        }
    }
}

/// A holder that stands for none, for records made without a delivery.
fn placeholder(call_id: Uuid) -> Holder {
    Holder {
        worker: String::new(),
        lease: Lease {
            call_id,
            copy: 1,
            token: Uuid::nil(),
        },
    }
}

/// The re-issue of a delayed call that is due, as its attempt.
fn reissue(d: Delayed) -> Effect {
    Effect::Reissue {
        call_id: d.call_id,
        service: d.service,
        attempt: d.attempt,
        body: d.body.into_bytes(),
    }
}

/// `reply`, as the answer to another call (one with the same idempotency
/// key).
fn readdressed(reply: &Reply, call_id: Uuid) -> Reply {
    Reply {
        call_id,
        ..reply.clone()
    }
}

/// A call in flight on a worker, as its heartbeats report it.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    /// The delivery.
    pub lease: Lease,
    /// The service.
    pub service: String,
    /// Where the client waits.
    pub reply_to: Option<String>,
    /// The call's body, so that it can be re-issued without waiting for the
    /// broker to redeliver it.
    pub body: Option<Vec<u8>>,
}

/// What the coordinator must do once a batch is durable.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish the call again as a new copy with this attempt header.
    Reissue {
        /// The call.
        call_id: Uuid,
        /// The service whose queue gets it.
        service: String,
        /// The attempt header of the new copy.
        attempt: u32,
        /// The call's body.
        body: Vec<u8>,
    },
    /// Answer the client: the call failed after leaving traces.
    AnswerFatal {
        /// The client's reply queue.
        reply_to: String,
        /// The `fatal` reply.
        reply: Reply,
    },
    /// Answer a call that followed another with its idempotency key.
    Answer {
        /// The client's reply queue.
        reply_to: String,
        /// The first call's outcome, addressed to the follower.
        reply: Reply,
    },
    /// Tell the workers that cache a session that it changed.
    SessionChanged {
        /// The session.
        session_id: String,
        /// Its version now.
        version: u64,
    },
}

/// The call ledger over a durable [`Store`].
///
/// Operations decide at once in memory; nothing they decide may be
/// announced before [`Ledger::commit`] returns `Ok`. A failed commit rolls
/// the memory back to what is durable.
pub struct Ledger<S: Store> {
    store: S,
    /// Records of undecided calls, plus every record changed since the last
    /// commit.
    open: HashMap<Uuid, CallRecord>,
    dirty: HashSet<Uuid>,
    effects: Vec<Effect>,
    sessions: HashMap<String, SessionRecord>,
    dirty_sessions: HashSet<String>,
    /// How long a decided call's record is kept.
    retention_ms: i64,
    /// Sessions kept in memory at most, between commits
    /// ([`SESSIONS_CACHED`]).
    sessions_cached: usize,
    /// Of each session in memory, the last use the store holds: a read
    /// writes its use only when that is a quarter of the expiry old.
    stored_used: HashMap<String, i64>,
    session_idle_ms: i64,
    session_forget_ms: i64,
    /// How long the first call with an idempotency key holds it.
    idempotency_window_ms: i64,
    /// Calls to hold until they are due, written with the next commit.
    deferred: Vec<Delayed>,
}

impl<S: Store> Ledger<S> {
    /// Opens the ledger, reading the undecided calls back from the store.
    pub fn open(store: S) -> Result<Self, Error> {
        let open = store.open_calls()?.into_iter().collect::<HashMap<_, _>>();
        info!(open_calls = open.len(), "call ledger opened");
        Ok(Self {
            store,
            open,
            dirty: HashSet::new(),
            effects: Vec::new(),
            sessions: HashMap::new(),
            dirty_sessions: HashSet::new(),
            retention_ms: 7 * 24 * 3600 * 1000,
            sessions_cached: SESSIONS_CACHED,
            stored_used: HashMap::new(),
            session_idle_ms: 30 * 60 * 1000,
            session_forget_ms: 7 * 24 * 3600 * 1000,
            idempotency_window_ms: 24 * 3600 * 1000,
            deferred: Vec::new(),
        })
    }

    /// Sessions idle this long expire (30 minutes unless set).
    pub fn set_session_idle(&mut self, idle: std::time::Duration) {
        self.session_idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX).max(1);
    }

    /// How long a decided call's record is kept (7 days unless set).
    pub fn set_retention(&mut self, retention: std::time::Duration) {
        self.retention_ms = i64::try_from(retention.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
    }

    /// Deletes from the store up to `max` records of calls decided longer
    /// than the retention before `now_ms`; returns how many. A copy of such
    /// a call that arrives later finds no record and runs as a new call.
    pub fn forget_decided(&mut self, now_ms: i64, max: usize) -> Result<usize, Error> {
        self.store
            .forget_decided(now_ms.saturating_sub(self.retention_ms), max)
    }

    /// How long the first call with an idempotency key holds it (24 hours
    /// unless set): a later call with the key, within it, gets the first's
    /// outcome instead of running. Records are forgotten after the
    /// retention, so the window is at most the retention in effect.
    pub fn set_idempotency_window(&mut self, window: std::time::Duration) {
        self.idempotency_window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
    }

    /// Ended sessions are forgotten this long after their last use (7 days
    /// unless set); until then a call on one is told it ended.
    pub fn set_session_forget(&mut self, after: std::time::Duration) {
        self.session_forget_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX).max(1);
    }

    /// The session, loaded into memory.
    fn load_session(&mut self, id: &str) -> Result<Option<&mut SessionRecord>, Error> {
        if !self.sessions.contains_key(id)
            && let Some(r) = self.store.get_session(id)?
        {
            self.trim_sessions(self.sessions_cached.saturating_sub(1));
            self.stored_used.insert(id.to_owned(), r.used_ms);
            self.sessions.insert(id.to_owned(), r);
        }
        Ok(self.sessions.get_mut(id))
    }

    /// Forgets clean sessions (the store has them) until at most `keep`
    /// are in memory. Dirty ones stay until their commit: between commits
    /// the cache may hold one batch's worth more than its bound.
    fn trim_sessions(&mut self, keep: usize) {
        if self.sessions.len() <= keep {
            return;
        }
        let excess = self.sessions.len() - keep;
        let clean: Vec<String> = self
            .sessions
            .keys()
            .filter(|k| !self.dirty_sessions.contains(*k))
            .take(excess)
            .cloned()
            .collect();
        for k in clean {
            self.sessions.remove(&k);
            self.stored_used.remove(&k);
        }
    }

    /// A session as a worker reads it at `now_ms`: its data when the worker
    /// does not `have` its version. A session idle past its expiry expires
    /// here.
    pub fn session(
        &mut self,
        id: &str,
        have: Option<u64>,
        now_ms: i64,
    ) -> Result<SessionState, Error> {
        let idle = self.session_idle_ms;
        let unknown = SessionState::Open {
            version: 0,
            data: (have != Some(0)).then(Map::new),
        };
        if self.load_session(id)?.is_none() {
            return Ok(unknown);
        }
        let stored = self.stored_used.get(id).copied().unwrap_or(i64::MIN);
        let Some(rec) = self.sessions.get_mut(id) else {
            return Ok(unknown);
        };
        let state = match rec.life {
            SessionLife::Expired => SessionState::Expired,
            SessionLife::Closed => SessionState::Closed,
            SessionLife::Open if now_ms - rec.used_ms > idle => {
                rec.life = SessionLife::Expired;
                rec.data.clear();
                self.dirty_sessions.insert(id.to_owned());
                return Ok(SessionState::Expired);
            }
            SessionLife::Open => {
                // Measured from the use the store holds, not the last read
                // in memory: reads closer together than a quarter of the
                // expiry still reach the store.
                let persist = now_ms.saturating_sub(stored) > idle / 4;
                rec.used_ms = now_ms;
                let state = SessionState::Open {
                    version: rec.version,
                    data: (have != Some(rec.version)).then(|| rec.data.clone()),
                };
                if persist {
                    self.dirty_sessions.insert(id.to_owned());
                }
                state
            }
        };
        Ok(state)
    }

    /// Forgets ended sessions last used longer ago than the retention at
    /// `now_ms` (at most `max`); returns how many.
    pub fn forget_sessions(&mut self, now_ms: i64, max: usize) -> Result<usize, Error> {
        let before = now_ms.saturating_sub(self.session_forget_ms);
        let ids: Vec<String> = self
            .store
            .ended_sessions(before, max)?
            .into_iter()
            .filter(|id| !self.dirty_sessions.contains(id))
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        self.store.forget_sessions(&ids)?;
        for id in &ids {
            self.sessions.remove(id);
        }
        Ok(ids.len())
    }

    /// Expires sessions idle past the expiry at `now_ms` (at most `max` of
    /// them): their data is dropped with the next commit. Returns how many.
    pub fn sweep_sessions(&mut self, now_ms: i64, max: usize) -> Result<usize, Error> {
        let before = now_ms.saturating_sub(self.session_idle_ms);
        let mut expired = 0;
        for (id, stored) in self.store.idle_sessions(before, max)? {
            // Memory knows of uses the store has not heard of yet.
            let rec = match self.sessions.entry(id.clone()) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(new) => {
                    self.stored_used.insert(id.clone(), stored.used_ms);
                    new.insert(stored)
                }
            };
            if rec.idle_since(before) {
                rec.life = SessionLife::Expired;
                rec.data.clear();
                self.dirty_sessions.insert(id);
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Whether `write` can commit at `now_ms`: `Err((code, reason))` if not.
    fn session_check(
        &mut self,
        write: &SessionWrite,
        now_ms: i64,
    ) -> Result<Result<(), (String, String)>, Error> {
        let idle = self.session_idle_ms;
        let id = write.session_id.as_str();
        let (life, version, used) = match self.load_session(id)? {
            Some(r) => (r.life, r.version, r.used_ms),
            None => (SessionLife::Open, 0, now_ms),
        };
        let refused = |code: &str, reason: String| Ok(Err((code.to_owned(), reason)));
        match life {
            SessionLife::Expired => {
                refused(codes::SESSION_EXPIRED, format!("session `{id}` expired"))
            }
            SessionLife::Closed => {
                refused(codes::SESSION_CLOSED, format!("session `{id}` was closed"))
            }
            SessionLife::Open if now_ms - used > idle => {
                self.session(id, None, now_ms)?;
                refused(codes::SESSION_EXPIRED, format!("session `{id}` expired"))
            }
            SessionLife::Open if version != write.base => refused(
                codes::SESSION_CONFLICT,
                format!(
                    "session `{id}` is at version {version}; the attempt read version {}",
                    write.base
                ),
            ),
            SessionLife::Open => Ok(Ok(())),
        }
    }

    /// Applies a checked write.
    fn session_apply(&mut self, write: &SessionWrite, now_ms: i64) {
        let id = write.session_id.clone();
        let rec = self
            .sessions
            .entry(id.clone())
            .or_insert_with(|| SessionRecord::new(now_ms));
        for (k, v) in &write.set {
            if v.is_null() {
                rec.data.remove(k);
            } else {
                rec.data.insert(k.clone(), v.clone());
            }
        }
        rec.version += 1;
        rec.used_ms = now_ms;
        if write.close {
            rec.life = SessionLife::Closed;
            rec.data.clear();
        }
        self.effects.push(Effect::SessionChanged {
            session_id: id.clone(),
            version: rec.version,
        });
        self.dirty_sessions.insert(id);
    }

    /// The store, for tests and status.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The record of a call, if it has one.
    pub fn record(&self, call_id: Uuid) -> Result<Option<CallRecord>, Error> {
        match self.open.get(&call_id) {
            Some(r) => Ok(Some(r.clone())),
            None => self.store.get(call_id),
        }
    }

    /// The record, loaded into memory for a change.
    fn load(&mut self, call_id: Uuid) -> Result<Option<&mut CallRecord>, Error> {
        if !self.open.contains_key(&call_id)
            && let Some(r) = self.store.get(call_id)?
        {
            self.open.insert(call_id, r);
        }
        Ok(self.open.get_mut(&call_id))
    }

    fn put(&mut self, call_id: Uuid, record: CallRecord) {
        self.open.insert(call_id, record);
        self.dirty.insert(call_id);
    }

    /// Whether a copy of `call_id` whose body has `digest` may go on:
    /// `false` when the call's record holds another body's digest. A record
    /// without one keeps this one; a copy that reports none, or a call
    /// without a record (on the fast path), passes.
    pub fn same_body(&mut self, call_id: Uuid, digest: Option<&str>) -> Result<bool, Error> {
        let Some(digest) = digest else {
            return Ok(true);
        };
        let Some(rec) = self.load(call_id)? else {
            return Ok(true);
        };
        if let Some(kept) = &rec.digest {
            return Ok(kept == digest);
        }
        rec.digest = Some(digest.to_owned());
        self.dirty.insert(call_id);
        Ok(true)
    }

    /// A worker received a redelivery, or a copy with an attempt above 1,
    /// and asks whether to run it.
    pub fn resume(
        &mut self,
        lease: Lease,
        worker: &str,
        service: &str,
        reply_to: Option<&str>,
    ) -> Result<ResumeDecision, Error> {
        let call_id = lease.call_id;
        let holder = Holder {
            worker: worker.to_owned(),
            lease,
        };
        let Some(rec) = self.load(call_id)? else {
            // No record: no earlier attempt left a trace (a trace creates
            // the record). Revoke the delivered copy's attempt, run the next.
            let attempt = lease.copy.saturating_add(1);
            self.put(
                call_id,
                CallRecord::open(service, reply_to, attempt, holder, Vec::new()),
            );
            return Ok(ResumeDecision::Run { attempt });
        };
        let decision = match (&rec.state, &rec.holder) {
            (CallState::Done { reply }, _) => {
                return Ok(ResumeDecision::Done {
                    reply: reply.clone(),
                });
            }
            (CallState::Failed { reply }, _) => {
                return Ok(ResumeDecision::Fatal {
                    reply: reply.clone(),
                });
            }
            (CallState::Open, None) => {
                rec.holder = Some(holder);
                ResumeDecision::Run {
                    attempt: rec.attempt,
                }
            }
            (CallState::Open, _) if rec.lost.contains(&lease.token) => {
                // A late retry of a lease that has since lost the call.
                return Ok(ResumeDecision::Superseded {
                    attempt: rec.attempt,
                });
            }
            (CallState::Open, Some(h)) if h.lease.token == lease.token => {
                // The same delivery asking again (its first answer was lost).
                return Ok(ResumeDecision::Run {
                    attempt: rec.attempt,
                });
            }
            (CallState::Open, Some(h)) if h.lease.copy == lease.copy => {
                // A new delivery of the copy the holder held: the broker says
                // the holder's lease is gone.
                let lost = h.worker.clone();
                if retryable(&rec.traces) {
                    rec.attempt = rec.attempt.saturating_add(1);
                    rec.unhold();
                    rec.traces.clear();
                    rec.holder = Some(holder);
                    ResumeDecision::Run {
                        attempt: rec.attempt,
                    }
                } else {
                    let how = format!("the delivery worker `{lost}` held went back to its queue");
                    let reply = fail(call_id, rec, &how);
                    ResumeDecision::Fatal { reply }
                }
            }
            (CallState::Open, Some(_)) => {
                // Another copy holds the current attempt.
                return Ok(ResumeDecision::Superseded {
                    attempt: rec.attempt,
                });
            }
        };
        self.dirty.insert(call_id);
        self.queue_fatal_answer(call_id);
        Ok(decision)
    }

    /// The first delivery of a call with an idempotency key asks whether
    /// it runs. A call the ledger knows already is taken as a redelivery
    /// ([`Ledger::resume`]). Otherwise, where another call holds the key
    /// (within the window, and its record is still kept): decided, this
    /// call is answered with its outcome (`done`); still open, this call
    /// follows it (`follow`) and is answered when it is decided, each
    /// without running. Else this call takes the key and runs as attempt
    /// `lease.copy`; its record makes its completion carry the reply.
    #[allow(clippy::too_many_arguments)]
    pub fn claim(
        &mut self,
        lease: Lease,
        worker: &str,
        service: &str,
        key: &str,
        reply_to: Option<&str>,
        now_ms: i64,
    ) -> Result<ResumeDecision, Error> {
        let call_id = lease.call_id;
        if self.load(call_id)?.is_some() {
            return self.resume(lease, worker, service, reply_to);
        }
        let kid = key_id(service, key);
        let first = self.load(kid)?.and_then(|k| {
            k.key_holder
                .as_ref()
                .filter(|h| h.until_ms > now_ms && h.call_id != call_id)
                .map(|h| h.call_id)
        });
        if let Some(first) = first
            && let Some(decision) = self.follow(first, call_id, service, reply_to)?
        {
            return Ok(decision);
        }
        let holder = Holder {
            worker: worker.to_owned(),
            lease,
        };
        let record = CallRecord::open(service, reply_to, lease.copy, holder, Vec::new());
        self.put(call_id, record);
        let mut keyed = CallRecord::decided(kid, service, None);
        keyed.key_holder = Some(KeyHolder {
            call_id,
            until_ms: now_ms.saturating_add(self.idempotency_window_ms),
        });
        self.put(kid, keyed);
        Ok(ResumeDecision::Run {
            attempt: lease.copy,
        })
    }

    /// `call_id` comes after `first` with the same key: the answer, or
    /// `None` when `first` is forgotten (or decided without a reply) and
    /// `call_id` takes the key instead.
    fn follow(
        &mut self,
        first: Uuid,
        call_id: Uuid,
        service: &str,
        reply_to: Option<&str>,
    ) -> Result<Option<ResumeDecision>, Error> {
        let Some(rec) = self.load(first)? else {
            return Ok(None);
        };
        if let Some(reply) = rec.decided_reply() {
            let reply = Some(readdressed(reply, call_id));
            return Ok(Some(ResumeDecision::Done { reply }));
        }
        if !matches!(rec.state, CallState::Open) {
            return Ok(None);
        }
        let decision = if rec.followers.len() >= FOLLOWERS_KEPT {
            let msg = format!(
                "{FOLLOWERS_KEPT} calls already wait for call {first}, which holds this \
                 idempotency key: try again once it is decided"
            );
            let reply = Reply::error(call_id, 1, codes::IDEMPOTENCY_BUSY, msg);
            ResumeDecision::Done { reply: Some(reply) }
        } else {
            rec.followers.push(Follower {
                call_id,
                reply_to: reply_to.map(str::to_owned),
            });
            ResumeDecision::Follow { first }
        };
        self.dirty.insert(first);
        // The follower's own record: a redelivery of it runs nothing, and it
        // is decided with the first's outcome.
        let reply = match &decision {
            ResumeDecision::Done { reply } => reply.clone(),
            _ => None,
        };
        self.put(call_id, CallRecord::decided(call_id, service, reply));
        Ok(Some(decision))
    }

    /// Before a commit: each decided call with followers answers them with
    /// its outcome (an effect once durable), and their records hold it.
    fn settle_followers(&mut self) -> Result<(), Error> {
        let ready: Vec<Uuid> = self
            .dirty
            .iter()
            .copied()
            .filter(|id| {
                self.open
                    .get(id)
                    .is_some_and(|r| !r.followers.is_empty() && !matches!(r.state, CallState::Open))
            })
            .collect();
        for id in ready {
            let Some(rec) = self.open.get_mut(&id) else {
                continue;
            };
            let followers = std::mem::take(&mut rec.followers);
            let outcome = rec.decided_reply().cloned();
            for f in followers {
                let reply = match &outcome {
                    Some(r) => readdressed(r, f.call_id),
                    None => Reply::error(
                        f.call_id,
                        1,
                        codes::IDEMPOTENCY_BUSY,
                        format!("call {id}, which held this idempotency key, recorded no reply"),
                    ),
                };
                if let Some(to) = &f.reply_to {
                    self.effects.push(Effect::Answer {
                        reply_to: to.clone(),
                        reply: reply.clone(),
                    });
                }
                if let Some(own) = self.load(f.call_id)? {
                    own.state = CallState::Done { reply: Some(reply) };
                    self.dirty.insert(f.call_id);
                }
            }
        }
        Ok(())
    }

    /// A worker received a call before its `not_before`: it is held until
    /// it is due, durably with the next commit.
    pub fn defer(&mut self, call: Delayed) {
        self.deferred.push(call);
    }

    /// Calls held until now, at most `max`, are published again: each as a
    /// re-issue (attempt 2) under an open record, so that a copy published
    /// twice (the coordinator died before it let go of the call) runs
    /// once; a call decided meanwhile (cancelled while it waited) is
    /// answered with its reply instead. Returns the calls to let go of
    /// once the effects are out.
    pub fn release_due(&mut self, now_ms: i64, max: usize) -> Result<Vec<Uuid>, Error> {
        let due = self.store.due_delayed(now_ms, max)?;
        let mut released = Vec::with_capacity(due.len());
        for d in due {
            released.push(d.call_id);
            self.release_held(d)?;
        }
        Ok(released)
    }

    /// A call held for a place of its concurrency key is published (like a
    /// delayed call that came due), unless it is no longer held or was
    /// decided meanwhile. Returns whether a copy of it was published.
    pub fn release_parked(&mut self, call_id: Uuid) -> Result<bool, Error> {
        match self.store.get_delayed(call_id)? {
            Some(d) => self.release_held(d),
            None => Ok(false),
        }
    }

    /// Holds a call until a place of its concurrency key is free: where
    /// the delivery holds the call's current attempt (a copy that asked
    /// `resume`), the hold is void, so that the copy published when a
    /// place is free runs it.
    pub fn park(&mut self, lease: Lease, call: Delayed) -> Result<(), Error> {
        self.unclaim(lease)?;
        self.deferred.push(call);
        Ok(())
    }

    /// Publishes a held call as a re-issue under an open record; a call
    /// decided meanwhile is answered with its reply instead. Returns
    /// whether a copy was published.
    fn release_held(&mut self, d: Delayed) -> Result<bool, Error> {
        let peeked = callq_schemas::peek(d.body.as_bytes(), d.body.len().saturating_add(1));
        let reply_to = peeked.reply_to;
        let call_id = d.call_id;
        let known = self.load(call_id)?.map(|rec| {
            let open = matches!(rec.state, CallState::Open);
            (open, rec.holder.is_some(), rec.decided_reply().cloned())
        });
        match known {
            None => {
                let holder = placeholder(call_id);
                let mut record = CallRecord::open(
                    &d.service,
                    reply_to.as_deref(),
                    d.attempt,
                    holder,
                    Vec::new(),
                );
                record.holder = None;
                self.put(call_id, record);
                self.effects.push(reissue(d));
                Ok(true)
            }
            // Published before and not claimed yet: again (the first
            // copy may be lost); a copy that claimed it runs it.
            Some((true, false, _)) => {
                self.effects.push(reissue(d));
                Ok(true)
            }
            Some((true, true, _)) => Ok(false),
            Some((false, _, reply)) => {
                if let (Some(reply), Some(to)) = (reply, reply_to) {
                    self.effects.push(Effect::Answer {
                        reply_to: to,
                        reply,
                    });
                }
                Ok(false)
            }
        }
    }

    /// `attempt` ended with a retryable error and the call's policy runs
    /// it again at `call.due_ms`: where the attempt is the current one (a
    /// first delivery on the fast path is) and its traces allow another
    /// run, it is revoked and the call held, durably with the next commit,
    /// to be published as the next attempt. `false`: the error stands.
    pub fn retry(&mut self, lease: Lease, attempt: u32, mut call: Delayed) -> Result<bool, Error> {
        let call_id = lease.call_id;
        let next = attempt.saturating_add(1);
        call.attempt = next;
        let reply_to =
            callq_schemas::peek(call.body.as_bytes(), call.body.len().saturating_add(1)).reply_to;
        match self.load(call_id)? {
            None if attempt == 1 && lease.copy == 1 => {
                let mut record = CallRecord::open(
                    &call.service,
                    reply_to.as_deref(),
                    next,
                    placeholder(call_id),
                    Vec::new(),
                );
                record.holder = None;
                self.put(call_id, record);
            }
            None => return Ok(false),
            Some(rec) => {
                let holds = rec.holds(lease, attempt);
                if !matches!(rec.state, CallState::Open) || !holds || !retryable(&rec.traces) {
                    return Ok(false);
                }
                rec.attempt = next;
                rec.unhold();
                rec.traces.clear();
                self.dirty.insert(call_id);
            }
        }
        self.deferred.push(call);
        Ok(true)
    }

    /// Lets go of delayed calls that were published.
    pub fn forget_delayed(&mut self, call_ids: &[Uuid]) -> Result<(), Error> {
        self.store.forget_delayed(call_ids)
    }

    /// A worker gave up on `attempt` (the coordinator did not answer it in
    /// time) and returns the delivery: of the attempt's traces only those
    /// whose grants the worker received (`kept`) stand, and the attempt is
    /// revoked. Left with traces that forbid another run, the call fails
    /// (an effect may have happened); otherwise the next copy's `resume`
    /// runs it. Returns whether the attempt was the current one.
    pub fn abandon(
        &mut self,
        lease: Lease,
        attempt: u32,
        worker: &str,
        kept: &[String],
    ) -> Result<bool, Error> {
        let call_id = lease.call_id;
        let Some(rec) = self.load(call_id)? else {
            return Ok(false);
        };
        let holds = rec.holds(lease, attempt);
        if !matches!(rec.state, CallState::Open) || !holds {
            return Ok(false);
        }
        rec.traces.retain(|t| kept.contains(t));
        if retryable(&rec.traces) {
            rec.attempt = rec.attempt.saturating_add(1);
            rec.unhold();
            rec.traces.clear();
        } else {
            let how = format!("worker `{worker}` gave up waiting for the coordinator");
            fail(call_id, rec, &how);
        }
        self.dirty.insert(call_id);
        self.queue_fatal_answer(call_id);
        Ok(true)
    }

    /// A worker heard no answer to its `resume` for this delivery and
    /// returns it unrun: if the delivery holds the current attempt, the
    /// hold is void (the lease is remembered as lost) but the attempt is
    /// not revoked, since it never ran; the next copy's `resume` runs it.
    /// An attempt with traces was used and is not unclaimed. Returns
    /// whether the delivery held the current attempt.
    pub fn unclaim(&mut self, lease: Lease) -> Result<bool, Error> {
        let call_id = lease.call_id;
        let Some(rec) = self.load(call_id)? else {
            return Ok(false);
        };
        let holds = rec
            .holder
            .as_ref()
            .is_some_and(|h| h.lease.token == lease.token);
        if !matches!(rec.state, CallState::Open) || !holds || !rec.traces.is_empty() {
            return Ok(false);
        }
        rec.unhold();
        self.dirty.insert(call_id);
        Ok(true)
    }

    /// A worker asks to leave a trace of `kind` from `attempt`; a session
    /// write commits with the grant, or neither happens.
    #[allow(clippy::too_many_arguments)]
    pub fn trace(
        &mut self,
        lease: Lease,
        attempt: u32,
        worker: &str,
        kind: &str,
        service: &str,
        reply_to: Option<&str>,
        session: Option<&SessionWrite>,
        now_ms: i64,
    ) -> Result<TraceDecision, Error> {
        let call_id = lease.call_id;
        let grant = match self.load(call_id)? {
            None if attempt == 1 && lease.copy == 1 => None,
            None => {
                return Ok(refused(format!(
                    "attempt {attempt} of call {call_id} was never issued: resume first"
                )));
            }
            Some(rec) => {
                let holds = rec.holds(lease, attempt);
                match rec.state {
                    CallState::Open if holds => Some(()),
                    CallState::Open => {
                        return Ok(TraceDecision::Refused {
                            reason: not_current(rec, lease, attempt),
                            superseded: held_elsewhere(rec, lease),
                            reply: None,
                        });
                    }
                    CallState::Done { ref reply } => {
                        return Ok(TraceDecision::Refused {
                            reason: "the call is already decided".into(),
                            superseded: true,
                            reply: reply.clone(),
                        });
                    }
                    _ => {
                        return Ok(TraceDecision::Refused {
                            reason: "the call is already decided".into(),
                            superseded: true,
                            reply: None,
                        });
                    }
                }
            }
        };
        if let Some(write) = session {
            if let Err((code, reason)) = self.session_check(write, now_ms)? {
                return Ok(TraceDecision::SessionRefused { code, reason });
            }
            self.session_apply(write, now_ms);
        }
        match grant {
            None => {
                // The fast path's first trace: the call gets its record now.
                self.put(
                    call_id,
                    CallRecord::open(
                        service,
                        reply_to,
                        attempt,
                        Holder {
                            worker: worker.to_owned(),
                            lease,
                        },
                        vec![kind.to_owned()],
                    ),
                );
            }
            Some(()) => {
                if let Some(rec) = self.open.get_mut(&call_id)
                    && !rec.traces.iter().any(|t| t == kind)
                {
                    // Kinds, each once: a worker asking again after a lost
                    // answer must not list the same effect twice.
                    rec.traces.push(kind.to_owned());
                    self.dirty.insert(call_id);
                }
            }
        }
        Ok(TraceDecision::Granted)
    }

    /// A worker reports that `attempt` completed with `reply` (synchronously
    /// when it has traces or session writes, batched otherwise). A session
    /// write commits with the completion, or neither does.
    pub fn complete(
        &mut self,
        lease: Lease,
        attempt: u32,
        reply: Option<Reply>,
        session: Option<&SessionWrite>,
        now_ms: i64,
    ) -> Result<CompleteDecision, Error> {
        let call_id = lease.call_id;
        let known = self.load(call_id)?.is_some();
        if !known {
            let Some(write) = session else {
                // A fast-path call that never left the fast path: nothing to record.
                return Ok(CompleteDecision::Accepted);
            };
            if attempt != 1 || lease.copy != 1 {
                return Ok(CompleteDecision::Refused {
                    reason: format!("attempt {attempt} of call {call_id} was never issued"),
                    superseded: false,
                    reply: None,
                });
            }
            if let Err((code, reason)) = self.session_check(write, now_ms)? {
                return Ok(CompleteDecision::SessionRefused { code, reason });
            }
            // The call gets its record, decided, so that a later copy is
            // answered from it rather than run (and counted) again.
            let mut record = CallRecord::open(
                "",
                None,
                attempt,
                Holder {
                    worker: String::new(),
                    lease,
                },
                Vec::new(),
            );
            record.state = CallState::Done { reply };
            record.holder = None;
            self.put(call_id, record);
            self.session_apply(write, now_ms);
            return Ok(CompleteDecision::Accepted);
        }
        let Some(rec) = self.open.get(&call_id) else {
            return Ok(CompleteDecision::Accepted);
        };
        let holds = rec.holds(lease, attempt);
        match &rec.state {
            CallState::Open if holds => {
                if let Some(write) = session {
                    if let Err((code, reason)) = self.session_check(write, now_ms)? {
                        return Ok(CompleteDecision::SessionRefused { code, reason });
                    }
                    self.session_apply(write, now_ms);
                }
                if let Some(rec) = self.open.get_mut(&call_id) {
                    rec.state = CallState::Done { reply };
                }
                self.dirty.insert(call_id);
                Ok(CompleteDecision::Accepted)
            }
            CallState::Done { .. } if holds => Ok(CompleteDecision::Accepted),
            CallState::Failed { reply } => Ok(CompleteDecision::Fatal {
                reply: reply.clone(),
            }),
            CallState::Done { reply } => Ok(CompleteDecision::Refused {
                reason: "another attempt completed the call".into(),
                superseded: true,
                reply: reply.clone(),
            }),
            CallState::Open => Ok(CompleteDecision::Refused {
                reason: not_current(rec, lease, attempt),
                superseded: held_elsewhere(rec, lease),
                reply: None,
            }),
        }
    }

    /// An operator cancels a call. One without traces is decided
    /// `cancelled` at once: its record (made now for a call on the fast
    /// path, or still queued) answers every later copy, trace and
    /// completion with the `cancelled` reply, so nothing of it runs or
    /// commits from now on. One whose current attempt holds a trace grant
    /// (an exact one too: its transaction may have committed) is refused;
    /// a decided call keeps its outcome.
    pub fn cancel(&mut self, call_id: Uuid) -> Result<CancelDecision, Error> {
        let Some(rec) = self.load(call_id)? else {
            let reply = Reply::cancelled(call_id, 1);
            // A delayed call waiting here is answered now rather than when
            // it comes due (it is answered again then: the client drops
            // the duplicate).
            if let Some(d) = self.store.get_delayed(call_id)?
                && let Some(to) =
                    callq_schemas::peek(d.body.as_bytes(), d.body.len().saturating_add(1)).reply_to
            {
                self.effects.push(Effect::Answer {
                    reply_to: to,
                    reply: reply.clone(),
                });
            }
            self.put(call_id, CallRecord::decided(call_id, "", Some(reply)));
            info!(%call_id, "call cancelled before any worker reported it");
            return Ok(CancelDecision::Cancelled);
        };
        let decision = match &rec.state {
            CallState::Done { reply } => match reply.as_ref().map(|r| r.outcome) {
                Some(Outcome::Cancelled) => CancelDecision::Cancelled,
                outcome => CancelDecision::Finished { outcome },
            },
            CallState::Failed { .. } => CancelDecision::Finished {
                outcome: Some(Outcome::Fatal),
            },
            CallState::Open if !rec.traces.is_empty() => CancelDecision::Refused {
                traces: rec.traces.clone(),
            },
            CallState::Open => {
                rec.unhold();
                rec.state = CallState::Done {
                    reply: Some(Reply::cancelled(call_id, rec.attempt)),
                };
                self.dirty.insert(call_id);
                info!(%call_id, "call cancelled");
                CancelDecision::Cancelled
            }
        };
        Ok(decision)
    }

    /// A worker is dead. Each call it held is revoked: a traceless one (or
    /// one whose traces are all exact transactions) is re-issued as the next
    /// attempt (where its body is known; otherwise the broker's redelivery
    /// claims the next attempt), a traced one fails and its client is
    /// answered `fatal`.
    pub fn worker_lost(&mut self, worker: &str, in_flight: &[InFlight]) -> Result<(), Error> {
        let mut bodies: HashMap<Uuid, &InFlight> = HashMap::new();
        for f in in_flight {
            let call_id = f.lease.call_id;
            bodies.insert(call_id, f);
            if self.load(call_id)?.is_none() {
                // A fast-path call with no trace: give it a record held by the
                // dead worker, so the loop below revokes it like the others.
                self.put(
                    call_id,
                    CallRecord::open(
                        &f.service,
                        f.reply_to.as_deref(),
                        f.lease.copy,
                        Holder {
                            worker: worker.to_owned(),
                            lease: f.lease,
                        },
                        Vec::new(),
                    ),
                );
            }
        }
        let held: Vec<Uuid> = self
            .open
            .iter()
            .filter(|(_, r)| {
                matches!(r.state, CallState::Open)
                    && r.holder.as_ref().is_some_and(|h| h.worker == worker)
            })
            .map(|(id, _)| *id)
            .collect();
        for call_id in held {
            let Some(rec) = self.open.get_mut(&call_id) else {
                continue;
            };
            if retryable(&rec.traces) {
                rec.attempt = rec.attempt.saturating_add(1);
                rec.unhold();
                rec.traces.clear();
                match bodies.get(&call_id).and_then(|f| f.body.clone()) {
                    Some(body) => self.effects.push(Effect::Reissue {
                        call_id,
                        service: rec.service.clone(),
                        attempt: rec.attempt,
                        body,
                    }),
                    None => {
                        warn!(%call_id, worker, "no body known: the broker's redelivery will run the next attempt")
                    }
                }
            } else {
                fail(call_id, rec, &format!("worker `{worker}` was lost"));
            }
            self.dirty.insert(call_id);
            self.queue_fatal_answer(call_id);
        }
        Ok(())
    }

    fn queue_fatal_answer(&mut self, call_id: Uuid) {
        if let Some(CallRecord {
            state: CallState::Failed { reply },
            reply_to: Some(to),
            ..
        }) = self.open.get(&call_id)
            && !self
                .effects
                .iter()
                .any(|e| matches!(e, Effect::AnswerFatal { reply: r, .. } if r.call_id == call_id))
        {
            self.effects.push(Effect::AnswerFatal {
                reply_to: to.clone(),
                reply: reply.clone(),
            });
        }
    }

    /// Makes every change since the last commit durable in one transaction,
    /// then returns the effects to carry out. On error nothing is durable,
    /// the memory is rolled back, and no decision may be announced.
    pub fn commit(&mut self) -> Result<Vec<Effect>, Error> {
        self.settle_followers()?;
        if !self.deferred.is_empty() {
            // Held before the batch: a call held twice (its worker asks
            // again after this batch failed) is replaced.
            let deferred = std::mem::take(&mut self.deferred);
            if let Err(e) = self.store.put_delayed(&deferred) {
                let ids: Vec<Uuid> = self.dirty.drain().collect();
                let session_ids: Vec<String> = self.dirty_sessions.drain().collect();
                self.roll_back(&ids, &session_ids)?;
                return Err(e);
            }
        }
        if self.dirty.is_empty() && self.dirty_sessions.is_empty() {
            return Ok(std::mem::take(&mut self.effects));
        }
        let ids: Vec<Uuid> = self.dirty.drain().collect();
        let session_ids: Vec<String> = self.dirty_sessions.drain().collect();
        let batch: Vec<(Uuid, &CallRecord)> = ids
            .iter()
            .filter_map(|id| self.open.get(id).map(|r| (*id, r)))
            .collect();
        let sessions: Vec<(&str, &SessionRecord)> = session_ids
            .iter()
            .filter_map(|id| self.sessions.get(id).map(|r| (id.as_str(), r)))
            .collect();
        if let Err(e) = self.store.put_all(&batch, &sessions) {
            self.roll_back(&ids, &session_ids)?;
            return Err(e);
        }
        for id in &session_ids {
            if let Some(r) = self.sessions.get(id) {
                self.stored_used.insert(id.clone(), r.used_ms);
            }
        }
        // The sessions a sweep or a batch brought in beyond the bound go
        // back to the store's keeping.
        self.trim_sessions(self.sessions_cached);
        // Decided calls leave memory; the store answers for them.
        for id in &ids {
            if self
                .open
                .get(id)
                .is_some_and(|r| !matches!(r.state, CallState::Open))
            {
                self.open.remove(id);
            }
        }
        Ok(std::mem::take(&mut self.effects))
    }

    /// A commit failed: the memory of the batch's records and sessions
    /// goes back to what is durable, and nothing decided is announced.
    fn roll_back(&mut self, ids: &[Uuid], session_ids: &[String]) -> Result<(), Error> {
        self.effects.clear();
        self.deferred.clear();
        for id in ids {
            self.open.remove(id);
        }
        for id in session_ids {
            // Read back from the store when next asked.
            self.sessions.remove(id);
            self.stored_used.remove(id);
        }
        for (id, r) in self.store.open_calls()? {
            if ids.contains(&id) {
                self.open.insert(id, r);
            }
        }
        Ok(())
    }

    /// Keeps the store's write lease, where it has one.
    pub fn renew(&mut self) -> Result<(), Error> {
        self.store.renew()
    }

    /// Gives the store's write lease up, where it has one.
    pub fn release(&mut self) {
        self.store.release();
    }

    /// Calls not yet decided.
    pub fn open_calls(&self) -> usize {
        self.open
            .values()
            .filter(|r| matches!(r.state, CallState::Open))
            .count()
    }
}

fn refused(reason: String) -> TraceDecision {
    TraceDecision::Refused {
        reason,
        superseded: false,
        reply: None,
    }
}

/// Why `lease`'s `attempt` is not the call's current one, for logs.
fn not_current(rec: &CallRecord, lease: Lease, attempt: u32) -> String {
    if held_elsewhere(rec, lease) {
        format!(
            "another delivery of the call holds attempt {} (this one ran attempt {attempt})",
            rec.attempt
        )
    } else {
        format!(
            "attempt {attempt} was revoked; the current attempt is {}",
            rec.attempt
        )
    }
}

/// Whether another delivery than `lease`'s holds the call's current
/// attempt: that delivery carries the call on, so `lease`'s is a spare.
fn held_elsewhere(rec: &CallRecord, lease: Lease) -> bool {
    rec.holder
        .as_ref()
        .is_some_and(|h| h.lease.token != lease.token)
}

/// Fails a call whose traced attempt was lost (`how`, for the client);
/// returns the `fatal` reply.
fn fail(call_id: Uuid, rec: &mut CallRecord, how: &str) -> Reply {
    let reply = Reply::fatal(
        call_id,
        rec.attempt,
        format!(
            "{how} after attempt {} left traces ({}); the call's outcome is unknown and it will not be retried",
            rec.attempt,
            rec.traces.join(", ")
        ),
        rec.traces.clone(),
    );
    rec.state = CallState::Failed {
        reply: reply.clone(),
    };
    rec.holder = None;
    reply
}

#[cfg(test)]
mod tests;
