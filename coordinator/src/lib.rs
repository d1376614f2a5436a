//! The callq coordinator.
//!
//! Today this crate holds the coordinator's heart, the **call ledger**
//! ([`Ledger`]): per call, the current attempt, who holds it, the traces it
//! was granted and the final decision; and the rules that arbitrate between
//! copies of a call (the client's original, the broker's redeliveries of it,
//! the coordinator's re-issues) so that a call runs to completion once, and
//! ends `fatal` only when an attempt that left traces was lost.
//!
//! Every decision is durable before it is announced: the ledger's
//! operations change its memory and queue their effects; [`Ledger::commit`]
//! writes every changed record in one transaction of the [`Store`] (group
//! commit) and only then hands out the effects and lets the caller answer.
//!
//! [`Coordinator`] is the service around it: it consumes the workers'
//! requests from `callq.coordinator` and their heartbeats from
//! `callq.heartbeats`, applies a batch of them to the ledger, commits once,
//! and only then answers, re-issues and acks; a failure detector declares a
//! worker dead after `dead_after` heartbeat intervals of silence and revokes
//! its calls, and a standby takes its place; every tick also restores the
//! standby count and sweeps idle and ended sessions.
#![forbid(unsafe_code)]
#![warn(clippy::too_many_lines)]

mod ledger;
pub mod metrics;
mod pg_store;
mod service;
mod store;

pub use ledger::{
    CallRecord, CallState, Effect, FOLLOWERS_KEPT, Follower, Holder, InFlight, KeyHolder, Ledger,
    SessionLife, SessionRecord, key_id,
};
pub use pg_store::{PG_MIGRATION, PgStore};
pub use service::{Coordinator, CoordinatorOptions};
pub use store::{Delayed, MemoryStore, RedbStore, Store};

/// What can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed; nothing of the failed commit was announced.
    #[error(
        "the coordinator store failed: {0}; no decision of this batch was announced, workers will ask again"
    )]
    Store(String),
    /// Another coordinator has the store open.
    #[error("another coordinator holds the store {0}")]
    StoreInUse(String),
    /// Another coordinator took the lease: this one may no longer write,
    /// and nothing it decided since is announced.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] callq_broker::Error),
    /// The coordinator's request consumer ended.
    #[error("the coordinator's request consumer ended (broker connection lost)")]
    Disconnected,
    /// A stored record could not be read.
    #[error(
        "a stored call record is unreadable ({0}): the store is damaged or from a newer version"
    )]
    Corrupt(String),
}
