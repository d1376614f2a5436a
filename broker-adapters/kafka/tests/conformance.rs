//! The broker conformance suite against a real Kafka-protocol broker.
//!
//! The broker is the one `CALLQ_KAFKA_URL` names (`source scripts/kafka`
//! starts tansu on 127.0.0.1:9092 and sets it). Unset, or a broker that
//! cannot be reached, fails every test: nothing here skips.
//!
//! Unless the URL says otherwise, the consumer group session timeout is 2 s
//! (tansu accepts it; a real Kafka refuses less than its
//! `group.min.session.timeout.ms`, 6 s by default: name
//! `session_timeout_ms=6000` in the URL there): rebalances, which take a
//! fraction of it per phase, then fit the suite's waits.
//!
//! Unless the URL says otherwise, fetches wait at most 10 ms for records:
//! tansu 0.6 holds every fetch for its full `fetch.wait.max.ms` even when
//! records arrive meanwhile (see `tests/tansu.rs`), so the adapter's default
//! of 100 ms would add up to that to every delivery, and the suite's 500
//! one-by-one deliveries would take a minute. Kafka answers a fetch as soon
//! as records arrive and needs no such setting.

use std::time::Duration;

use callq_broker_kafka::{KafkaBroker, Options};

fn options() -> Options {
    let url = std::env::var("CALLQ_KAFKA_URL").unwrap_or_else(|_| {
        panic!(
            "CALLQ_KAFKA_URL is not set: run `source scripts/kafka` first \
             (it starts tansu and sets it), or point it at a Kafka cluster"
        )
    });
    let mut opts = Options::from_url(&url).unwrap_or_else(|e| panic!("CALLQ_KAFKA_URL={url}: {e}"));
    if !url.contains("session_timeout_ms") {
        opts.session_timeout = Duration::from_secs(2);
    }
    if !url.contains("fetch_wait_ms") {
        opts.fetch_wait = Duration::from_millis(10);
    }
    opts
}

callq_conformance::conformance_suite!(
    broker = {
        let opts = options();
        let at = opts.bootstrap.clone();
        KafkaBroker::connect_with(opts)
            .await
            .unwrap_or_else(|e| panic!("Kafka at {at}: {e}"))
    },
    flavor = "multi_thread",
    worker_threads = 2,
);
