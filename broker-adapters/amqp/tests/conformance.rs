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

/// The same suite through a URL that names two nodes, the first of them
/// dead: every connection fails over to the live one (or starts there).
mod several_nodes {
    /// `CALLQ_AMQP_URL` with a node nothing listens on before its host.
    fn url() -> String {
        let url = super::url();
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.to_string())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", &url));
        let at = rest.find('@').map_or(0, |i| i + 1);
        format!("{scheme}://{}{dead},{}", &rest[..at], &rest[at..])
    }

    callq_conformance::conformance_suite!(
        broker = callq_broker_amqp::AmqpBroker::connect(&url())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ at {}: {e}", url())),
        flavor = "multi_thread",
        worker_threads = 2,
    );
}
