//! What a worker counts, through the `metrics` facade: the binary installs
//! a Prometheus recorder and serves it on `/metrics`; without a recorder
//! (the library in tests) every count is a no-op. Labels are bounded: the
//! services a worker serves, the methods they define (any other is
//! `unknown`), outcomes and dead-letter codes from fixed sets. Names are
//! listed in docs/OPERATIONS.md.
//!
//! The series every call counts are looked up in the recorder once, at
//! their first use, and their handles kept: the recorder must be installed
//! before the worker runs.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::handler::{HandlerError, Service};

/// Handler runs by service, method and outcome (`ok`, `error`, `panicked`).
pub const CALLS: &str = "callq_calls_total";
/// How long handlers ran, by service (OpenTelemetry's
/// `messaging.process.duration`).
pub const PROCESS_DURATION: &str = "messaging_process_duration_seconds";
/// Deliveries being handled now.
pub const IN_FLIGHT: &str = "callq_calls_in_flight";
/// Deliveries dead-lettered, by the code their reason starts with.
pub const DEAD_LETTERS: &str = "callq_dead_letters_total";
/// Deliveries that asked the coordinator `resume`, by its answer (`run`,
/// `done`, `fatal`, `superseded`, `refused`, `released`).
pub const RESUMES: &str = "callq_resumes_total";

/// Handler runs started, by service.
pub const STARTED: &str = "callq_calls_started_total";
/// Deliveries being handled now, by service (sampled with each heartbeat).
pub const SERVICE_IN_FLIGHT: &str = "callq_service_calls_in_flight";
/// Calls the worker could take now (its capacity is shared by its
/// services; sampled with each heartbeat).
pub const FREE_SLOTS: &str = "callq_worker_free_slots";
/// Trace requests by the coordinator's answer (`granted`, `refused`,
/// `session_refused`, `unanswered`).
pub const TRACES: &str = "callq_trace_requests_total";
/// How long the coordinator took to answer, by request (`resume`, `trace`,
/// `complete`, `session`), from the first send to the answer.
pub const COORDINATOR_ROUND_TRIP: &str = "callq_coordinator_request_duration_seconds";
/// How long a reply took to publish and be confirmed by the broker.
pub const REPLY_PUBLISH: &str = "callq_reply_publish_duration_seconds";
/// Session writes refused because another call changed the session first.
pub const SESSION_CONFLICTS: &str = "callq_session_conflicts_total";
/// Handler runs again on fresher session data after such a conflict.
pub const SESSION_RERUNS: &str = "callq_session_reruns_total";

/// Workers an agent started, restarts included.
pub const AGENT_STARTS: &str = "callq_agent_workers_started_total";
/// Crashed workers an agent restarted.
pub const AGENT_RESTARTS: &str = "callq_agent_worker_restarts_total";
/// Standbys an agent started because the coordinator asked.
pub const AGENT_STANDBYS: &str = "callq_agent_standbys_started_total";
/// Workers an agent runs now.
pub const AGENT_RUNNING: &str = "callq_agent_workers_running";

/// The codes a dead letter's reason starts with, started at 0.
const DEAD_LETTER_CODES: [&str; 5] = [
    "bad_request",
    "delivery_limit",
    "body_mismatch",
    "reply_not_owned",
    "unknown_service",
];

/// Describes a worker's metrics to the recorder and starts its counters
/// without labels, and the dead letters of each known code, at 0, so that
/// a scrape shows them before their first event.
pub fn describe_worker() {
    metrics::describe_counter!(CALLS, "Handler runs by service, method and outcome.");
    metrics::describe_histogram!(
        PROCESS_DURATION,
        metrics::Unit::Seconds,
        "How long handlers ran."
    );
    metrics::describe_gauge!(IN_FLIGHT, "Deliveries being handled now.");
    metrics::gauge!(IN_FLIGHT).set(0.0);
    metrics::describe_counter!(DEAD_LETTERS, "Deliveries dead-lettered, by reason code.");
    for code in DEAD_LETTER_CODES {
        metrics::counter!(DEAD_LETTERS, "reason" => code).absolute(0);
    }
    metrics::describe_counter!(REVOKED, "Attempts whose result the coordinator refused.");
    metrics::counter!(REVOKED).absolute(0);
    metrics::describe_counter!(RESUMES, "resume requests by answer.");
    for answer in ["run", "done", "fatal", "superseded", "refused", "released"] {
        metrics::counter!(RESUMES, "answer" => answer).absolute(0);
    }
    metrics::describe_counter!(STARTED, "Handler runs started, by service.");
    metrics::describe_gauge!(
        SERVICE_IN_FLIGHT,
        "Deliveries being handled now, by service."
    );
    metrics::describe_gauge!(FREE_SLOTS, "Calls the worker could take now.");
    metrics::describe_counter!(TRACES, "Trace requests by the coordinator's answer.");
    for decision in ["granted", "refused", "session_refused", "unanswered"] {
        metrics::counter!(TRACES, "decision" => decision).absolute(0);
    }
    metrics::describe_histogram!(
        COORDINATOR_ROUND_TRIP,
        metrics::Unit::Seconds,
        "How long the coordinator took to answer, by request."
    );
    for request in ["resume", "trace", "complete", "session"] {
        // Registered before their first sample: the series are there from
        // the first scrape, and their number never grows with the load.
        let _ = metrics::histogram!(COORDINATOR_ROUND_TRIP, "request" => request);
    }
    metrics::describe_histogram!(
        REPLY_PUBLISH,
        metrics::Unit::Seconds,
        "How long a reply took to publish and be confirmed."
    );
    metrics::describe_counter!(SESSION_CONFLICTS, "Session writes refused as conflicts.");
    metrics::describe_counter!(
        SESSION_RERUNS,
        "Handler runs again after a session conflict."
    );
    for name in [SESSION_CONFLICTS, SESSION_RERUNS] {
        metrics::counter!(name).absolute(0);
    }
}

/// Starts the per-service series of a worker's services at 0.
pub fn describe_services<'a>(services: impl IntoIterator<Item = &'a str>) {
    for service in services {
        metrics::counter!(STARTED, "service" => service.to_owned()).absolute(0);
        metrics::gauge!(SERVICE_IN_FLIGHT, "service" => service.to_owned()).set(0.0);
    }
}

/// Describes an agent's metrics and starts them at 0.
pub fn describe_agent() {
    for (name, help) in [
        (AGENT_STARTS, "Worker processes started, restarts included."),
        (AGENT_RESTARTS, "Crashed workers restarted."),
        (
            AGENT_STANDBYS,
            "Standbys started because the coordinator asked.",
        ),
    ] {
        metrics::describe_counter!(name, help);
        metrics::counter!(name).absolute(0);
    }
    metrics::describe_gauge!(AGENT_RUNNING, "Worker processes running now.");
    metrics::gauge!(AGENT_RUNNING).set(0.0);
}

/// Counts one more of `name`.
pub(crate) fn count(name: &'static str) {
    metrics::counter!(name).increment(1);
}

/// The workers an agent runs now.
pub(crate) fn agent_running(n: usize) {
    metrics::gauge!(AGENT_RUNNING).set(n as f64);
}

/// Counts one handler run.
pub(crate) fn handled<E>(
    service: &Service,
    method: &str,
    outcome: &Result<Option<Result<serde_json::Value, HandlerError>>, E>,
    took: Duration,
) {
    let (method, outcome) = match outcome {
        Err(_) => (method, "panicked"),
        // No such method: a caller picks the name, so it is not a label.
        Ok(None) => ("unknown", "error"),
        Ok(Some(Ok(_))) => (method, "ok"),
        Ok(Some(Err(_))) => (method, "error"),
    };
    let name = service.name();
    let series = series(name);
    let at = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
    let known = series
        .calls
        .read()
        .ok()
        .and_then(|m| m.get(method).cloned());
    let counters = known.unwrap_or_else(|| {
        let made = Arc::default();
        match series.calls.write() {
            Ok(mut m) => m.entry(method.to_owned()).or_insert(made).clone(),
            Err(_) => made,
        }
    });
    counters[at]
        .get_or_init(|| metrics::counter!(CALLS, "service" => name.to_owned(), "method" => method.to_owned(), "outcome" => outcome))
        .increment(1);
    series
        .duration
        .get_or_init(|| metrics::histogram!(PROCESS_DURATION, "service" => name.to_owned()))
        .record(took.as_secs_f64());
}

/// The outcomes of [`CALLS`].
const OUTCOMES: [&str; 3] = ["ok", "error", "panicked"];

/// The handles of one service's series.
#[derive(Default)]
struct Series {
    started: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    /// [`CALLS`] by method, then by outcome (as in [`OUTCOMES`]).
    calls: RwLock<HashMap<String, Arc<[OnceLock<Counter>; 3]>>>,
}

/// The handles of `service`'s series.
fn series(service: &str) -> Arc<Series> {
    static SERVICES: OnceLock<RwLock<HashMap<String, Arc<Series>>>> = OnceLock::new();
    let services = SERVICES.get_or_init(RwLock::default);
    if let Some(known) = services.read().ok().and_then(|m| m.get(service).cloned()) {
        return known;
    }
    let made = Arc::default();
    match services.write() {
        Ok(mut m) => m.entry(service.to_owned()).or_insert(made).clone(),
        Err(_) => made,
    }
}

/// A handler run starts.
pub(crate) fn started(service: &Service) {
    let name = service.name();
    series(name)
        .started
        .get_or_init(|| metrics::counter!(STARTED, "service" => name.to_owned()))
        .increment(1);
}

/// The calls in flight per service and the free slots, as a heartbeat
/// reports them.
pub(crate) fn load<'a>(busy: impl IntoIterator<Item = (&'a str, usize)>, free: u32) {
    for (service, n) in busy {
        metrics::gauge!(SERVICE_IN_FLIGHT, "service" => service.to_owned()).set(n as f64);
    }
    metrics::gauge!(FREE_SLOTS).set(f64::from(free));
}

/// Counts a trace request by its answer.
pub(crate) fn traced(decision: &'static str) {
    metrics::counter!(TRACES, "decision" => decision).increment(1);
}

/// Records a coordinator round trip.
pub(crate) fn coordinator_round_trip(kind: &'static str, took: Duration) {
    metrics::histogram!(COORDINATOR_ROUND_TRIP, "request" => kind).record(took.as_secs_f64());
}

/// Records a reply's publish.
pub(crate) fn reply_published(took: Duration) {
    static HANDLE: OnceLock<Histogram> = OnceLock::new();
    HANDLE
        .get_or_init(|| metrics::histogram!(REPLY_PUBLISH))
        .record(took.as_secs_f64());
}

/// A delivery is being handled (`+1`) or was settled (`-1`).
pub(crate) fn in_flight(delta: f64) {
    static HANDLE: OnceLock<Gauge> = OnceLock::new();
    HANDLE
        .get_or_init(|| metrics::gauge!(IN_FLIGHT))
        .increment(delta);
}

/// Counts a dead letter by the code its reason starts with (`bad_request:
/// ...` is `bad_request`); a reason without one is `other`.
pub(crate) fn dead_lettered(reason: &str) {
    metrics::counter!(DEAD_LETTERS, "reason" => reason_code(reason)).increment(1);
}

/// Attempts whose result was dropped because the coordinator refused it
/// (the call was re-issued, decided, or carried by another delivery).
pub const REVOKED: &str = "callq_attempts_revoked_total";

/// Counts a `resume` by its answer.
pub(crate) fn resumed(answer: &'static str) {
    metrics::counter!(RESUMES, "answer" => answer).increment(1);
}

fn reason_code(reason: &str) -> String {
    let code = reason.split(':').next().unwrap_or_default().trim();
    let bounded = !code.is_empty()
        && code.len() <= 40
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if bounded { code } else { "other" }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::reason_code;

    #[test]
    fn dead_letter_labels_are_codes() {
        assert_eq!(reason_code("bad_request: not JSON"), "bad_request");
        assert_eq!(reason_code("delivery_limit"), "delivery_limit");
        assert_eq!(reason_code("Anything a caller wrote: x"), "other");
        assert_eq!(reason_code(&"a".repeat(41)), "other");
        assert_eq!(reason_code(""), "other");
    }
}
