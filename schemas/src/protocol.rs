//! The coordinator protocol's decisions: what the coordinator answers a
//! worker that asks to resume a call, to leave a trace, or to complete.
//!
//! A *copy* of a call is one broker message carrying it: the client's
//! original (attempt header absent, meaning 1) or a re-issue by the
//! coordinator (attempt header N + 1). Every broker redelivery of a copy
//! carries the same header, so the header names the copy. A *lease* is one
//! delivery of a copy to a worker, named by a token the worker draws per
//! delivery.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Reply;

/// One delivery of a copy of a call to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// The call.
    pub call_id: Uuid,
    /// The attempt header of the delivered copy (1 when absent).
    pub copy: u32,
    /// Drawn by the worker for this delivery: two deliveries of one copy
    /// never share a token.
    pub token: Uuid,
}

/// The answer to `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum ResumeDecision {
    /// No earlier attempt left traces: run as this attempt. Earlier attempts
    /// are revoked (their traces and completions are refused).
    Run {
        /// The attempt to run as: the fencing epoch of every trace.
        attempt: u32,
    },
    /// An earlier attempt completed: ack; publish the recorded reply again if
    /// there is one (the client drops duplicates).
    Done {
        /// The recorded reply, where the completion carried one.
        reply: Option<Reply>,
    },
    /// An earlier attempt left traces and was lost: the coordinator has
    /// answered the client with this reply. The worker publishes it again
    /// (the coordinator's copy may have been lost; the client drops
    /// duplicates), then acks.
    Fatal {
        /// The `fatal` reply the client got.
        reply: Reply,
    },
    /// Another copy of the call holds the current attempt: ack this copy,
    /// publish nothing.
    Superseded {
        /// The current attempt.
        attempt: u32,
    },
    /// This copy's body differs from the one recorded under its `call_id`
    /// (the id was published again with another body): dead-letter it,
    /// unanswered, and run nothing.
    Refused {
        /// Why, for logs and the dead letter.
        reason: String,
    },
    /// (To `claim` only.) An earlier call with the same idempotency key
    /// runs now: ack this copy and publish nothing; the coordinator answers
    /// this call with that call's outcome once it is decided.
    Follow {
        /// The call that holds the key.
        first: Uuid,
    },
}

impl ResumeDecision {
    /// The decision's name on the wire (`run`, `done`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Run { .. } => "run",
            Self::Done { .. } => "done",
            Self::Fatal { .. } => "fatal",
            Self::Superseded { .. } => "superseded",
            Self::Refused { .. } => "refused",
            Self::Follow { .. } => "follow",
        }
    }
}

/// The answer to `trace`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum TraceDecision {
    /// Recorded durably: the effect may become visible.
    Granted,
    /// The attempt was revoked or the call is decided: the handler must
    /// abort and leave nothing.
    Refused {
        /// Why, for logs.
        reason: String,
        /// Another delivery of the call holds its current attempt, or the
        /// call is decided: this delivery is a spare (a duplicate publish, a
        /// copy re-issued past it) and is acked. `false`: no delivery holds
        /// the call; this one goes back to the queue so that a redelivery
        /// runs the next attempt.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        superseded: bool,
        /// The call is decided by another attempt: its recorded reply,
        /// which this delivery publishes again before it is acked (the
        /// attempt that completed may have died before its own reply went
        /// out; the client drops duplicates).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply: Option<Reply>,
    },
    /// The session write the trace carried was not committed, and the trace
    /// not granted (`session_conflict`, `session_expired`,
    /// `session_closed`); the attempt goes on.
    SessionRefused {
        /// The error code.
        code: String,
        /// Why, for a person.
        reason: String,
    },
}

/// The answer to a synchronous `complete` (an attempt with traces).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum CompleteDecision {
    /// Recorded: publish the reply, then ack.
    Accepted,
    /// The attempt was lost before it completed and the client was answered
    /// `fatal`: publish this `fatal` reply again (not the attempt's own), then
    /// ack.
    Fatal {
        /// The `fatal` reply the client got.
        reply: Reply,
    },
    /// The attempt is not the current one: its own reply is dropped; the
    /// delivery goes back to its queue and `resume` on the redelivery
    /// settles it, or (`superseded`) is acked.
    Refused {
        /// Why, for logs.
        reason: String,
        /// Another delivery of the call holds its current attempt, or the
        /// call is decided: this delivery is a spare (a duplicate publish, a
        /// copy re-issued past it) and is acked. `false`: no delivery holds
        /// the call; this one goes back to the queue so that a redelivery
        /// runs the next attempt.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        superseded: bool,
        /// The call is decided by another attempt: its recorded reply,
        /// which this delivery publishes again before it is acked (the
        /// attempt that completed may have died before its own reply went
        /// out; the client drops duplicates).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply: Option<Reply>,
    },
    /// The session data the attempt wrote was not committed, and nothing
    /// else was: `session_conflict` (another call changed the session since
    /// it was read: run again on the new data), `session_expired` or
    /// `session_closed`.
    SessionRefused {
        /// The error code.
        code: String,
        /// Why, for a person.
        reason: String,
    },
}

/// Session data an attempt writes: keys set (JSON `null` removes one) over
/// the version it read, committed atomically or not at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionWrite {
    /// The session.
    pub session_id: String,
    /// The version the attempt read; the commit fails if it moved.
    pub base: u64,
    /// The keys written.
    #[serde(default)]
    pub set: serde_json::Map<String, serde_json::Value>,
    /// Close the session once written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close: bool,
}

/// A session as the store holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SessionState {
    /// Live; a session never written is live at version 0 with no data.
    Open {
        /// Its version: one more with each committed write.
        version: u64,
        /// Its data, left out when the asker has this version already.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Map<String, serde_json::Value>>,
    },
    /// Idle past its expiry: its data is gone.
    Expired,
    /// Closed by a call: its data is gone.
    Closed,
}

/// A worker's state in the cluster registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Consuming its services' calls.
    Active,
    /// Loaded and ready, consuming nothing until promoted.
    Standby,
    /// Finishing its calls in flight; takes no new ones.
    Draining,
}

impl WorkerState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Active => "active",
            WorkerState::Standby => "standby",
            WorkerState::Draining => "draining",
        }
    }
}

/// A call in flight, as a heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlightCall {
    /// The delivery.
    pub lease: Lease,
    /// The service.
    pub service: String,
    /// Where the client waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// The call envelope, sent once (in the first heartbeat that reports the
    /// call), so that the coordinator can re-issue it without the broker.
    /// Carried as a string holding the body's text exactly as it came, so
    /// that a re-issue is the same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The call's `concurrency_key`, where it was admitted under one: a
    /// coordinator that takes over learns the keys' running calls so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A call with a `concurrency_key` that asks for a place of its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedCall {
    /// The delivery.
    pub lease: Lease,
    /// The attempt the delivery would run as.
    pub attempt: u32,
    /// The service.
    pub service: String,
    /// The call's `concurrency_key`.
    pub key: String,
    /// Calls of one key the service runs at once, at most.
    pub limit: u32,
    /// The call's body (JSON text), as delivered.
    pub body: String,
}

/// Calls one `admit` carries at most.
pub const MAX_ADMIT_CALLS: usize = 256;

/// The trace of a PostgreSQL transaction made through the context: it
/// commits with an outbox row whose unique key admits one commit per call,
/// so an attempt that left only such traces may run again (the next
/// attempt finds the committed result, or commits in its place). Losing
/// it never fails the call.
pub const EXACT_TRACE: &str = "pg.tx";

/// The trace of a session write made visible before the call completes
/// (`Session::flush`).
pub const SESSION_FLUSH: &str = "session.flush";

/// Whether an attempt that left `traces` may be followed by another: it left
/// none, or only [`EXACT_TRACE`]s.
pub fn retryable(traces: &[String]) -> bool {
    traces.iter().all(|t| t == EXACT_TRACE)
}

/// A request from a worker to the coordinator, on `callq.coordinator`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version: 1.
    pub v: u32,
    /// The worker.
    pub worker_id: String,
    /// The worker's queue, where answers go.
    pub reply_to: String,
    /// When the sender gives up waiting for the answer, in milliseconds
    /// since the Unix epoch. A coordinator that reads the request later
    /// (it was away) drops it unanswered: nothing is granted to a request
    /// nobody waits for. Absent: the request never goes stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
    /// The W3C trace context of the worker's span that asks (`resume`,
    /// `trace`, `complete`), so that the coordinator's span joins the
    /// call's trace. Absent where the worker records no spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// What it asks.
    #[serde(flatten)]
    pub body: RequestBody,
}

/// What a worker asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RequestBody {
    /// I am alive. Needs no answer and no durability.
    Heartbeat {
        /// Its services.
        services: Vec<String>,
        /// Its state.
        state: WorkerState,
        /// Calls it runs at once, at most.
        capacity: u32,
        /// Calls it could take now.
        free: u32,
        /// Every call in flight; bodies only for calls not reported before.
        in_flight: Vec<InFlightCall>,
        /// Where the broker partitions call queues (Kafka): per service, the
        /// partitions of its queue this worker owns now. The coordinator
        /// re-issues a dead worker's calls into them.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        partitions: BTreeMap<String, Vec<u32>>,
        /// Per service, the calls its handlers ran to an answer since the
        /// worker started (for rates in `callq status --watch`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        finished: BTreeMap<String, u64>,
    },
    /// May I run this redelivered (or re-issued) copy?
    Resume {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The delivery.
        lease: Lease,
        /// The service.
        service: String,
        /// Where the client waits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call_reply_to: Option<String>,
        /// The SHA-256 of the delivered body, in lowercase hex: a copy whose
        /// body differs from the one recorded under its `call_id` is refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// May this first delivery of a call with an idempotency key run? The
    /// first call with a key (per service, within the coordinator's
    /// window) holds it and runs; a later one gets the first's outcome
    /// (`done`) or follows it (`follow`) and runs nothing. Answered by an
    /// answer of type `resume`.
    Claim {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The delivery.
        lease: Lease,
        /// The service.
        service: String,
        /// The call's `idempotency_key`.
        key: String,
        /// Where the client waits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call_reply_to: Option<String>,
        /// The SHA-256 of the delivered body, as in `resume`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// Hold this call until it is due (its `not_before`), then publish it
    /// again: the worker that received it early acks it once answered.
    Defer {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The call.
        call_id: Uuid,
        /// The service whose queue gets it when it is due.
        service: String,
        /// When it is due, in milliseconds since the Unix epoch.
        due_ms: i64,
        /// The call's body (JSON text), as delivered.
        body: String,
    },
    /// May these calls with a `concurrency_key` run now? Each one's
    /// service allows at most `limit` calls of one key to run at once,
    /// across workers. Admitted: the call holds one of the key's places
    /// until the worker says it ended (`vacate`). Not admitted: the
    /// coordinator holds the call (durably, like a delayed one) and
    /// publishes it again when a place of its key is free; the worker acks
    /// the delivery unrun. Calls that ended since the last request give
    /// their places back first (`vacate`).
    Admit {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The calls that ask.
        calls: Vec<KeyedCall>,
        /// Admitted calls that no longer run here.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vacate: Vec<Uuid>,
    },
    /// These calls, admitted under their `concurrency_key`, no longer run
    /// here: their places are free. Needs no answer.
    Vacate {
        /// The calls.
        calls: Vec<Uuid>,
    },
    /// This attempt ended with a retryable error and the call's policy
    /// retries it: revoke the attempt and hold the call until `due_ms`,
    /// then publish it as the next attempt. Refused (`retrying: false`)
    /// when the attempt is not the current one or left traces that forbid
    /// another run: the error is then the outcome.
    Retry {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The delivery.
        lease: Lease,
        /// The attempt that failed.
        attempt: u32,
        /// The service.
        service: String,
        /// Where the client waits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call_reply_to: Option<String>,
        /// When the next attempt is due, in milliseconds since the Unix
        /// epoch.
        due_ms: i64,
        /// The call's body (JSON text), as delivered.
        body: String,
    },
    /// May this attempt leave a trace of `kind`?
    Trace {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The delivery.
        lease: Lease,
        /// The attempt the handler runs as.
        attempt: u32,
        /// The trace, such as `mail.sent`.
        kind: String,
        /// The service.
        service: String,
        /// Where the client waits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call_reply_to: Option<String>,
        /// Session data committed with the grant (`session.flush`), or
        /// neither is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<SessionWrite>,
        /// The SHA-256 of the delivered body, as in `resume`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// This attempt completed with this reply.
    Complete {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The delivery.
        lease: Lease,
        /// The attempt.
        attempt: u32,
        /// The reply, recorded for later copies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply: Option<Reply>,
        /// Session data the attempt wrote, committed with the completion
        /// or not at all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<SessionWrite>,
    },
    /// What is the session's data now? (Only when it is newer than the
    /// version the worker has.)
    Session {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The session.
        session_id: String,
        /// The version the worker's cache holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        have: Option<u64>,
    },
    /// The worker gave up on this attempt without an answer from the
    /// coordinator (it returns the delivery to its queue): the attempt is
    /// revoked, and of its traces only those whose grant the worker
    /// received stand; a grant it never heard of was never used. Needs no
    /// answer.
    Abandon {
        /// The delivery.
        lease: Lease,
        /// The attempt.
        attempt: u32,
        /// The traces whose grants the attempt received.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        kept: Vec<String>,
    },
    /// The worker asked `resume` for this delivery, heard no answer in
    /// time, and returns the delivery without running it: an attempt the
    /// coordinator granted it was never used, so the next copy's `resume`
    /// runs that same attempt (a delivery returned unrun is no failure of
    /// the call and does not count towards its delivery limit). Needs no
    /// answer.
    Unclaim {
        /// The delivery.
        lease: Lease,
    },
    /// These attempts completed without traces (sent in batches, before
    /// their deliveries are acked). Needs no answer.
    Completed {
        /// The completions.
        calls: Vec<Completion>,
    },
    /// I am leaving (a drained worker or agent): forget me without failing
    /// anything.
    Leave {},
    /// A node agent is alive and can start workers of these services.
    AgentHeartbeat {
        /// The services its workers can serve.
        services: Vec<String>,
        /// Worker processes it runs now.
        workers: u32,
    },
    /// An operator asks a worker to drain and leave.
    Drain {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The worker to drain.
        worker: String,
    },
    /// An operator asks for the cluster's status.
    Status {
        /// Matches the answer to the request.
        req_id: Uuid,
    },
    /// An operator (or a client with the operator's rights) cancels a call.
    Cancel {
        /// Matches the answer to the request.
        req_id: Uuid,
        /// The call to cancel.
        call_id: Uuid,
    },
}

/// A traceless attempt that completed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The delivery.
    pub lease: Lease,
    /// The attempt it ran as.
    pub attempt: u32,
    /// The reply, sent only for attempts that asked `resume` (their call has
    /// a record that a later copy may read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
}

/// A worker as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The worker's id.
    pub worker_id: String,
    /// Its state.
    pub state: WorkerState,
    /// Its services.
    pub services: Vec<String>,
    /// Calls it runs at once, at most.
    pub capacity: u32,
    /// Calls it could take now.
    pub free: u32,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
    /// Per service, the calls its handlers ran to an answer since it
    /// started, as its last heartbeat said. Absent: none reported.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub finished: std::collections::BTreeMap<String, u64>,
}

/// The cluster as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Registered workers, sorted by id.
    pub workers: Vec<WorkerStatus>,
    /// Registered node agents, sorted.
    pub agents: Vec<String>,
    /// Standbys wanted per reserved service.
    pub standby_per_service: std::collections::BTreeMap<String, u32>,
    /// Calls with an undecided record in the ledger.
    pub open_calls: u64,
    /// Workers declared dead since the coordinator started.
    pub deaths: u64,
    /// Standbys promoted since the coordinator started.
    pub promotions: u64,
    /// Requests dropped since the coordinator started because their sender
    /// had given up on them (`expires_ms` passed).
    pub stale_dropped: u64,
    /// Control messages the coordinator's process dropped since it started
    /// because the cluster key did not sign them. Absent: 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unauthenticated_dropped: u64,
    /// Calls the coordinator holds until they are due (their `not_before`,
    /// or a retry's next attempt). Absent: 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delayed_calls: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The most services one worker serves: a heartbeat that lists more is
/// refused.
pub const MAX_SERVICES_PER_WORKER: usize = 1024;

/// An answer of the coordinator, on the worker's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// Protocol version: 1.
    pub v: u32,
    /// The leadership epoch of the coordinator that sent it (on PostgreSQL,
    /// its lease's epoch; absent for a coordinator on a file store, which
    /// leads alone). A worker drops an order whose epoch is below the
    /// highest it has seen: it comes from a coordinator that no longer
    /// leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The answer.
    #[serde(flatten)]
    pub body: AnswerBody,
}

/// What the coordinator answers or orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AnswerBody {
    /// The answer to `resume`.
    Resume {
        /// The request's id.
        req_id: Uuid,
        /// The decision.
        decision: ResumeDecision,
    },
    /// The answer to `trace`.
    Trace {
        /// The request's id.
        req_id: Uuid,
        /// The decision.
        decision: TraceDecision,
    },
    /// The answer to `complete`.
    Complete {
        /// The request's id.
        req_id: Uuid,
        /// The decision.
        decision: CompleteDecision,
    },
    /// The answer to `session`.
    Session {
        /// The request's id.
        req_id: Uuid,
        /// The session.
        state: SessionState,
    },
    /// A session's data changed: a worker that caches an older version
    /// drops it.
    SessionChanged {
        /// The session.
        session_id: String,
        /// Its version now.
        version: u64,
    },
    /// A standby worker starts consuming now.
    Promote {},
    /// The worker drains and leaves.
    Drain {},
    /// The answer to an operator's `drain`.
    Draining {
        /// The request's id.
        req_id: Uuid,
        /// Whether the worker is registered (and was told to drain).
        found: bool,
    },
    /// To a node agent: start a standby worker of these services.
    StartStandby {
        /// The services.
        services: Vec<String>,
    },
    /// The answer to `status`.
    Status {
        /// The request's id.
        req_id: Uuid,
        /// The cluster.
        status: ClusterStatus,
    },
    /// The answer to `defer`: the call is held durably until it is due.
    Deferred {
        /// The request's id.
        req_id: Uuid,
    },
    /// The answer to `admit`.
    Admission {
        /// The request's id.
        req_id: Uuid,
        /// The calls that run now; the coordinator holds the others until
        /// a place of their key is free (ack their deliveries, unrun).
        admitted: Vec<Uuid>,
    },
    /// The answer to `retry`.
    Retrying {
        /// The request's id.
        req_id: Uuid,
        /// Whether the call is held for its next attempt (the delivery is
        /// acked, unanswered); `false`: answer the error.
        retrying: bool,
    },
    /// The answer to `cancel`.
    Cancel {
        /// The request's id.
        req_id: Uuid,
        /// The decision.
        decision: CancelDecision,
    },
    /// To every worker: these calls are cancelled. A worker answers a copy
    /// it has not started `cancelled` instead of running it, and cancels
    /// the context of an attempt that runs (its next trace is refused).
    Cancelled {
        /// The cancelled calls.
        call_ids: Vec<Uuid>,
    },
}

/// The answer to `cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum CancelDecision {
    /// Recorded durably: no copy of the call runs from now on, an attempt
    /// that runs is revoked at its next trace, and the call is answered
    /// `cancelled`, unless its attempt had already finished without traces
    /// (its reply then stands).
    Cancelled,
    /// The call is decided already: it keeps its outcome.
    Finished {
        /// The call's outcome, where its record holds a reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<crate::Outcome>,
    },
    /// The call's attempt has left traces (an effect may be visible): it
    /// cannot be cancelled, and runs to its end.
    Refused {
        /// The traces it left.
        traces: Vec<String>,
    },
}

impl CancelDecision {
    /// The decision's name on the wire (`cancelled`, `finished`,
    /// `refused`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::Finished { .. } => "finished",
            Self::Refused { .. } => "refused",
        }
    }
}

impl RequestBody {
    /// The request's `type`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestBody::Heartbeat { .. } => "heartbeat",
            RequestBody::Resume { .. } => "resume",
            RequestBody::Claim { .. } => "claim",
            RequestBody::Defer { .. } => "defer",
            RequestBody::Retry { .. } => "retry",
            RequestBody::Admit { .. } => "admit",
            RequestBody::Vacate { .. } => "vacate",
            RequestBody::Trace { .. } => "trace",
            RequestBody::Complete { .. } => "complete",
            RequestBody::Session { .. } => "session",
            RequestBody::Abandon { .. } => "abandon",
            RequestBody::Unclaim { .. } => "unclaim",
            RequestBody::Completed { .. } => "completed",
            RequestBody::Leave {} => "leave",
            RequestBody::AgentHeartbeat { .. } => "agent_heartbeat",
            RequestBody::Drain { .. } => "drain",
            RequestBody::Status { .. } => "status",
            RequestBody::Cancel { .. } => "cancel",
        }
    }
}

impl AnswerBody {
    /// The decision an answer carries (`run`, `granted`, `accepted`,
    /// `refused`, ...), for spans and metrics; `answered` for answers that
    /// decide nothing.
    pub fn decision(&self) -> &'static str {
        match self {
            AnswerBody::Resume { decision, .. } => decision.as_str(),
            AnswerBody::Trace { decision, .. } => match decision {
                TraceDecision::Granted => "granted",
                TraceDecision::Refused { .. } => "refused",
                TraceDecision::SessionRefused { .. } => "session_refused",
            },
            AnswerBody::Complete { decision, .. } => match decision {
                CompleteDecision::Accepted => "accepted",
                CompleteDecision::Fatal { .. } => "fatal",
                CompleteDecision::Refused { .. } => "refused",
                CompleteDecision::SessionRefused { .. } => "session_refused",
            },
            AnswerBody::Cancel { decision, .. } => decision.as_str(),
            _ => "answered",
        }
    }
}

impl Request {
    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Answer {
    /// A version 1 answer with no epoch (the coordinator stamps its own
    /// when it publishes).
    pub fn new(body: AnswerBody) -> Self {
        Self {
            v: 1,
            epoch: None,
            body,
        }
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}
