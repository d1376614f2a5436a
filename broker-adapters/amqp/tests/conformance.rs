//! The broker conformance suite against a real RabbitMQ server.
//!
//! The broker is the one `CALLQ_AMQP_URL` names, or RabbitMQ on this machine
//! (`scripts/test` makes sure it runs). A broker that cannot be reached fails
//! every test: nothing here skips.

fn url() -> String {
    std::env::var("CALLQ_AMQP_URL").unwrap_or_else(|_| callq_broker_amqp::DEFAULT_URL.into())
}

callq_conformance::conformance_suite!(
    broker = callq_broker_amqp::AmqpBroker::connect(&url())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at {}: {e}", url())),
    flavor = "multi_thread",
    worker_threads = 2,
);
