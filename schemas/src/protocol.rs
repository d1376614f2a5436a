//! The coordinator protocol's decisions: what the coordinator answers a
//! worker that asks to resume a call, to leave a trace, or to complete.
//!
//! A *copy* of a call is one broker message carrying it: the client's
//! original (attempt header absent, meaning 1) or a re-issue by the
//! coordinator (attempt header N + 1). Every broker redelivery of a copy
//! carries the same header, so the header names the copy. A *lease* is one
//! delivery of a copy to a worker, named by a token the worker draws per
//! delivery.

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
    /// answered the client with this reply. Ack and drop.
    Fatal {
        /// The `fatal` reply the client got.
        reply: Reply,
    },
    /// Another copy of the call holds the current attempt: ack and drop.
    Superseded {
        /// The current attempt.
        attempt: u32,
    },
}

/// The answer to `trace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum TraceDecision {
    /// Recorded durably: the effect may become visible.
    Granted,
    /// The attempt was revoked or the call is decided: the handler must
    /// abort and leave nothing.
    Refused {
        /// Why, for logs.
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
    /// `fatal`: do not publish; ack.
    Fatal {
        /// The `fatal` reply the client got.
        reply: Reply,
    },
    /// The attempt is not the current one: do not publish; ack.
    Refused {
        /// Why, for logs.
        reason: String,
    },
}
