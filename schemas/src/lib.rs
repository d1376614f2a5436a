//! The callq wire contract, version 1.
//!
//! Services in any language publish calls without our client, so the
//! envelopes here are public: [`Call`] and [`Reply`] are the serde types, and
//! `schemas/json/*.schema.json` are the JSON Schema files that say the same
//! for everyone else. Bodies are UTF-8 JSON.
//!
//! Decoding is defensive: [`decode_call`] checks the size and the JSON depth
//! limits of [`Limits`] *before* parsing and returns a typed [`DecodeError`]
//! for every bad body. [`peek`] reads `reply_to` and `call_id` from a body
//! that cannot be decoded (too deep, too large, missing fields) without
//! building it, so that the sender still gets a `bad_request` reply.
#![forbid(unsafe_code)]

mod decode;
mod envelope;
pub mod protocol;

pub mod millis {
    //! Durations as whole milliseconds in configuration files and
    //! `CALLQ_*` variables: `#[serde(with = "callq_schemas::millis")]`.
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes a duration as whole milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Reads whole milliseconds as a duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

pub use decode::{
    DecodeError, Limits, MAX_FIELD_CHARS, MAX_PRIORITY, MAX_REPLY_TO_BYTES, MAX_SERVICE_CHARS,
    Peek, check_reply_to, decode_call, decode_reply, peek,
};
pub use envelope::{Call, ErrorBody, Outcome, Reply, RetryPolicy};
pub use uuid::Uuid;

/// The version of the wire contract these types speak.
pub const VERSION: u32 = 1;

/// Error codes callq itself puts in `error.code`. Handlers choose their own.
pub mod codes {
    /// The call could not be read (not JSON, too large, too deep, unknown
    /// version, missing or mistyped fields).
    pub const BAD_REQUEST: &str = "bad_request";
    /// The handler panicked; the panic message is in `error.message`.
    pub const HANDLER_PANICKED: &str = "handler_panicked";
    /// The service has no handler for the method.
    pub const UNKNOWN_METHOD: &str = "unknown_method";
    /// The worker that received the call does not serve the service it names.
    pub const UNKNOWN_SERVICE: &str = "unknown_service";
    /// The deadline passed before the call ran (`expired` outcome).
    pub const DEADLINE_PASSED: &str = "deadline_passed";
    /// The caller cancelled the call before it left a trace (`cancelled`
    /// outcome).
    pub const CANCELLED: &str = "cancelled";
    /// Too many calls already wait for the call that holds this call's
    /// idempotency key.
    pub const IDEMPOTENCY_BUSY: &str = "idempotency_busy";
    /// The call has a `not_before` in the future and reached a worker that
    /// runs without a coordinator, which holds delayed calls.
    pub const NOT_BEFORE_UNSUPPORTED: &str = "not_before_unsupported";
    /// The worker died after the call left traces (`fatal` outcome).
    pub const WORKER_LOST_AFTER_TRACES: &str = "worker_lost_after_traces";
    /// The call was delivered more often than the delivery limit allows
    /// (it crashed workers repeatedly) and went to the dead-letter queue.
    pub const DELIVERY_LIMIT: &str = "delivery_limit";
    /// The coordinator refused (or did not answer) a trace: the attempt was
    /// revoked, and the handler must leave nothing.
    pub const TRACE_REFUSED: &str = "trace_refused";
    /// The call's session expired (idle too long): its data is gone.
    pub const SESSION_EXPIRED: &str = "session_expired";
    /// The call's session was closed: its data is gone.
    pub const SESSION_CLOSED: &str = "session_closed";
    /// Another call changed the session since this one read it, too often
    /// for it to be run again.
    pub const SESSION_CONFLICT: &str = "session_conflict";
    /// The call used session data but names no `session_id`, or the worker
    /// has no coordinator to keep sessions.
    pub const NO_SESSION: &str = "no_session";
}
