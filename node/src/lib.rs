//! The callq node: the worker runtime, the client and the example services.
//!
//! - [`Worker`] pulls calls of its services from the broker with a prefetch
//!   equal to its capacity, runs each through its handler with a [`Ctx`],
//!   publishes the reply with confirm and only then acknowledges the
//!   delivery. Bad input never brings it down.
//! - [`Client`] publishes calls with confirm and awaits the first final
//!   outcome of each on its own reply queue; many calls may be in flight.
//! - [`services`] holds the example services the `callq` binary ships.
//!
//! Everything here depends on the broker contract (`callq-broker`) only.
#![forbid(unsafe_code)]
#![warn(clippy::too_many_lines)]

mod admin;
mod agent;
pub mod bank;
pub mod capture;
mod client;
mod handler;
mod link;
pub mod metrics;
pub mod pg;
pub mod probe;
pub mod replay;
pub mod services;
mod session;
mod worker;

pub use admin::Admin;
pub use agent::{Agent, AgentOptions, AgentStats, InProcess, Launcher, Processes, WorkerSpec};
pub use client::{CallOptions, Client, ClientOptions};
pub use handler::{Ctx, HandlerError, HandlerFuture, Service};
pub use session::Session;
pub use worker::{Worker, WorkerOptions, WorkerStats};

/// What can go wrong in the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] callq_broker::Error),
    /// The client's reply consumer ended: replies can no longer be received.
    #[error(
        "the client's reply queue consumer ended; calls in flight were not answered and may still run: reconnect and call again with the same call ids"
    )]
    Disconnected,
    /// The same call id is already waiting for its outcome on this client.
    #[error(
        "call {0} is already in flight on this client: wait for its outcome instead of sending it again"
    )]
    AlreadyPending(uuid::Uuid),
    /// The broker did not answer in time.
    #[error("the broker did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The coordinator answered something that does not fit the question.
    #[error("unexpected answer from the coordinator: {0}")]
    Protocol(String),
    /// The configuration is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The call breaks a bound of the wire contract; nothing was sent.
    #[error("invalid call: {0}; nothing was sent")]
    InvalidCall(String),
}
