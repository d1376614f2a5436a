//! What the coordinator counts, through the `metrics` facade (exported on
//! `/metrics` by the binary; no-ops without a recorder). No label carries
//! an id a message chose. Names are listed in docs/OPERATIONS.md.

/// Workers declared dead.
pub const DEATHS: &str = "callq_worker_deaths_total";
/// Standbys promoted.
pub const PROMOTIONS: &str = "callq_standby_promotions_total";
/// Calls of a dead worker published again as their next attempt.
pub const REISSUES: &str = "callq_reissues_total";
/// Calls answered `fatal` (their lost attempt had left a trace).
pub const FATAL: &str = "callq_fatal_total";
/// Worker heartbeats read.
pub const HEARTBEATS: &str = "callq_heartbeats_total";
/// Requests dropped because their sender had given up on them.
pub const STALE_DROPPED: &str = "callq_stale_requests_dropped_total";

pub(crate) fn count(name: &'static str) {
    metrics::counter!(name).increment(1);
}
