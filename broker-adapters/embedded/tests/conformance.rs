//! The broker conformance suite against the embedded broker.

/// On tokio's paused clock: every "nothing arrives within" check is instant.
mod paused_clock {
    callq_conformance::conformance_suite!(
        broker = callq_broker_embedded::EmbeddedBroker::new(),
        start_paused = true,
    );
}

/// On the real clock and several threads, as the suite runs against real
/// brokers: checks the suite's own timing and the broker's locking.
mod threads {
    callq_conformance::conformance_suite!(
        broker = callq_broker_embedded::EmbeddedBroker::new(),
        flavor = "multi_thread",
        worker_threads = 4,
    );
}
