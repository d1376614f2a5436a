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
/// Calls cancelled by an operator's `cancel`.
pub const CANCELLED: &str = "callq_cancelled_total";
/// Worker heartbeats read.
pub const HEARTBEATS: &str = "callq_heartbeats_total";
/// Requests dropped because their sender had given up on them.
pub const STALE_DROPPED: &str = "callq_stale_requests_dropped_total";

/// How long the ledger's group commits took (the store's write included).
pub const COMMIT_DURATION: &str = "callq_ledger_commit_duration_seconds";
/// Requests per group commit.
pub const BATCH_SIZE: &str = "callq_ledger_batch_size";
/// Calls waiting in a service's call queue (RabbitMQ: ready; Kafka: the
/// consumer lag), read once a heartbeat interval.
pub const QUEUE_DEPTH: &str = "callq_queue_depth";
/// Registered workers by state (`active`, `standby`, `draining`).
pub const WORKERS: &str = "callq_workers";
/// Call records the ledger holds open (not decided).
pub const OPEN_CALLS: &str = "callq_ledger_open_calls";
/// Calls the coordinator holds until they are due.
pub const DELAYED_CALLS: &str = "callq_delayed_calls";
/// Calls with a concurrency key, by `state`: `running` (holding a place of
/// their key) or `waiting` (held for a place).
pub const KEYED_CALLS: &str = "callq_keyed_calls";
/// The size of the coordinator's store file (the embedded store only).
pub const STORE_BYTES: &str = "callq_store_bytes";

/// Describes the coordinator's metrics to the recorder and starts its
/// counters at 0, so that a scrape shows them before their first event
/// (and `increase()` sees that event).
pub fn describe() {
    for (name, help) in [
        (DEATHS, "Workers declared dead."),
        (PROMOTIONS, "Standbys promoted."),
        (
            REISSUES,
            "Calls of dead workers published again as their next attempt.",
        ),
        (FATAL, "Calls answered fatal."),
        (CANCELLED, "Calls cancelled by an operator's cancel."),
        (HEARTBEATS, "Worker heartbeats read."),
        (
            STALE_DROPPED,
            "Requests dropped because their sender had given up on them.",
        ),
    ] {
        metrics::describe_counter!(name, help);
        metrics::counter!(name).absolute(0);
    }
    metrics::describe_histogram!(
        COMMIT_DURATION,
        metrics::Unit::Seconds,
        "Group commits of the ledger."
    );
    metrics::describe_histogram!(BATCH_SIZE, "Requests per group commit.");
    metrics::describe_gauge!(QUEUE_DEPTH, "Calls waiting in a service's call queue.");
    metrics::describe_gauge!(WORKERS, "Registered workers by state.");
    for state in STATES {
        metrics::gauge!(WORKERS, "state" => state).set(0.0);
    }
    metrics::describe_gauge!(OPEN_CALLS, "Call records the ledger holds open.");
    metrics::describe_gauge!(
        DELAYED_CALLS,
        "Calls held until they are due (not_before, or a retry's next attempt)."
    );
    metrics::describe_gauge!(
        KEYED_CALLS,
        "Calls with a concurrency key: running (holding a place of their key) or waiting for one."
    );
    keyed(0, 0);
    metrics::describe_gauge!(STORE_BYTES, metrics::Unit::Bytes, "The store file's size.");
}

const STATES: [&str; 3] = ["active", "standby", "draining"];

/// The registry's workers by state, the ledger's open records, and the
/// store's size where it has one.
pub(crate) fn cluster(
    states: &[&str],
    open_calls: usize,
    delayed: Option<u64>,
    store_bytes: Option<u64>,
) {
    for state in STATES {
        let n = states.iter().filter(|s| **s == state).count();
        metrics::gauge!(WORKERS, "state" => state).set(n as f64);
    }
    metrics::gauge!(OPEN_CALLS).set(open_calls as f64);
    if let Some(n) = delayed {
        metrics::gauge!(DELAYED_CALLS).set(n as f64);
    }
    if let Some(bytes) = store_bytes {
        metrics::gauge!(STORE_BYTES).set(bytes as f64);
    }
}

/// Keyed calls holding a place, and waiting for one.
pub(crate) fn keyed(running: usize, waiting: usize) {
    metrics::gauge!(KEYED_CALLS, "state" => "running").set(running as f64);
    metrics::gauge!(KEYED_CALLS, "state" => "waiting").set(waiting as f64);
}

pub(crate) fn count(name: &'static str) {
    metrics::counter!(name).increment(1);
}

/// One group commit of `batch` requests that took `took`.
pub(crate) fn committed(batch: usize, took: std::time::Duration) {
    metrics::histogram!(COMMIT_DURATION).record(took.as_secs_f64());
    metrics::histogram!(BATCH_SIZE).record(batch as f64);
}

/// The depth of `service`'s call queue.
pub(crate) fn queue_depth(service: &str, ready: u64) {
    metrics::gauge!(QUEUE_DEPTH, "service" => service.to_owned()).set(ready as f64);
}
