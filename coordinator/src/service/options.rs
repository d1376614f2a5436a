//! How the coordinator runs.

use std::collections::BTreeMap;
use std::time::Duration;

use callq_schemas::Limits;
use serde::{Deserialize, Serialize};

/// How the coordinator runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorOptions {
    /// How often workers heartbeat; the coordinator ticks as often.
    #[serde(with = "callq_schemas::millis")]
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals of silence after which a worker is dead.
    pub dead_after: u32,
    /// Requests applied in one group commit, at most.
    pub batch_max: u16,
    /// Limits on request bodies (a heartbeat carries call bodies).
    pub limits: Limits,
    /// Standby workers to keep per reserved service; services not named
    /// here have none.
    pub standby_per_service: BTreeMap<String, u32>,
    /// How long a session may go unused before it expires.
    #[serde(with = "callq_schemas::millis")]
    pub session_idle: Duration,
    /// How long an ended (expired or closed) session is remembered, so that
    /// calls on it are told so, before it is forgotten.
    #[serde(with = "callq_schemas::millis")]
    pub session_forget: Duration,
    /// How long a decided call's record is kept after its decision. A copy
    /// of the call that arrives later finds no record and runs again, so
    /// this must outlast the longest a copy can wait in a queue.
    #[serde(with = "callq_schemas::millis")]
    pub retention: Duration,
    /// How long the first call with an idempotency key holds it: a later
    /// call of the same service with the same key, within it, gets the
    /// first's outcome instead of running. At most the retention in effect
    /// (the first's record is forgotten after it).
    #[serde(with = "callq_schemas::millis")]
    pub idempotency_window: Duration,
    /// How far the clocks of workers' hosts may run ahead of the
    /// coordinator's. A request whose sender gives up (`expires_ms`) within
    /// this margin of now is dropped as stale: the coordinator never
    /// grants a request after its sender stopped waiting, as long as the
    /// clocks agree this well.
    #[serde(with = "callq_schemas::millis")]
    pub clock_skew: Duration,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(250),
            dead_after: 4,
            batch_max: 256,
            standby_per_service: BTreeMap::new(),
            session_idle: Duration::from_secs(30 * 60),
            session_forget: Duration::from_secs(7 * 24 * 3600),
            retention: Duration::from_secs(7 * 24 * 3600),
            idempotency_window: Duration::from_secs(24 * 3600),
            clock_skew: Duration::from_millis(500),
            limits: Limits {
                max_bytes: 64 * 1024 * 1024,
                max_depth: 128,
            },
        }
    }
}

impl CoordinatorOptions {
    /// The silence after which a worker (or a node agent) counts as gone.
    pub(super) fn silence(&self) -> Duration {
        self.heartbeat_interval * self.dead_after
    }

    /// Requests in one batch, at most.
    pub(super) fn batch(&self) -> usize {
        usize::from(self.batch_max)
    }
}
