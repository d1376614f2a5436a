//! AMQP over TLS, with processes: a coordinator, a worker and `callq call`
//! on a RabbitMQ node of the tests' own that takes TLS only
//! (`scripts/rabbitmq-tls-node`, which scripts/services starts, with a
//! certificate authority it makes, and that takes only clients that show a
//! certificate of that CA; `CALLQ_TLS_NODE`, `CALLQ_TLS_PORT`,
//! `CALLQ_TLS_CA`, `CALLQ_TLS_CLIENT_CERT`, `CALLQ_TLS_CLIENT_KEY`).
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::time::Duration;

struct TlsNode {
    node: String,
    port: String,
    ca: String,
    /// The client certificate and its key: `certfile=...&keyfile=...`.
    client: String,
}

impl TlsNode {
    fn get() -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run scripts/test, or `scripts/rabbitmq-tls-node start` and export what `scripts/rabbitmq-tls-node env` prints")
            })
        };
        Self {
            node: var("CALLQ_TLS_NODE"),
            port: var("CALLQ_TLS_PORT"),
            ca: var("CALLQ_TLS_CA"),
            client: format!(
                "certfile={}&keyfile={}",
                var("CALLQ_TLS_CLIENT_CERT"),
                var("CALLQ_TLS_CLIENT_KEY")
            ),
        }
    }

    fn ctl(&self, args: &[&str]) -> String {
        support::rabbitmqctl(&[&["-n", self.node.as_str()], args].concat())
    }

    /// The node's URL, with the client certificate.
    fn url(&self, scheme: &str, host: &str, vhost: &str) -> String {
        format!(
            "{scheme}://guest:guest@{host}:{}/{vhost}?{}",
            self.port, self.client
        )
    }
}

/// A coordinator and a worker reach the TLS-only node through `amqps://`
/// with a client certificate, and `callq call` gets its answer through it;
/// RabbitMQ reports every connection as TLS with the client's certificate.
/// The CA may come from the URL (`cacertfile`) instead of `SSL_CERT_FILE`.
/// A plain connection to the TLS port, a TLS one to a host name the
/// certificate does not name, and one without a client certificate fail
/// with errors that say what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_goes_through_amqps_and_plain_or_misnamed_connections_are_refused() {
    let node = TlsNode::get();
    let run = std::env::var("CALLQ_TEST_RUN").unwrap_or_else(|_| "manual".into());
    let vhost = format!("callq-test-{run}-tls-{}", uuid::Uuid::now_v7().simple());
    node.ctl(&["add_vhost", &vhost]);
    node.ctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let dir = support::temp_dir("tls");
    let url = node.url("amqps", "localhost", &vhost);
    let (mut coordinator, mut worker) =
        support::serve_over_tls(&url, &node.ca, &dir, Duration::from_secs(60)).await;

    let listing = node.ctl(&[
        "list_connections",
        "vhost",
        "ssl",
        "ssl_protocol",
        "peer_cert_subject",
    ]);
    let ours: Vec<&str> = listing.lines().filter(|l| l.contains(&vhost)).collect();
    eprintln!("connections: {ours:?}");
    assert!(
        ours.len() >= 2,
        "the coordinator and the worker are not both connected: {listing}"
    );
    assert!(
        ours.iter()
            .all(|l| l.contains("true") && l.contains("tlsv1")),
        "a connection without TLS: {listing}"
    );
    assert!(
        ours.iter().all(|l| l.contains("CN=callq-test-client")),
        "a connection without the client certificate: {listing}"
    );

    // The CA named in the URL, not in SSL_CERT_FILE.
    let out = std::process::Command::new(support::callq_bin())
        .args([
            "call",
            "echo",
            "echo",
            r#"{"ca": "url"}"#,
            "--timeout-ms",
            "20000",
        ])
        .env(
            "CALLQ_BROKER",
            format!(
                "{}&cacertfile={}",
                node.url("amqps", "localhost", &vhost),
                node.ca
            ),
        )
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"url\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No client certificate: the node refuses the handshake.
    let anonymous = support::tls_call(
        &format!("amqps://guest:guest@localhost:{}/{vhost}", node.port),
        &node.ca,
    );
    let err = String::from_utf8_lossy(&anonymous.stderr);
    assert!(
        !anonymous.status.success(),
        "a connection without a client certificate was taken"
    );
    assert!(err.contains("certfile="), "{err}");

    let plain = support::tls_call(&node.url("amqp", "localhost", &vhost), &node.ca);
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !plain.status.success(),
        "a plain connection to the TLS port worked"
    );
    assert!(err.contains("use amqps://"), "{err}");

    let misnamed = support::tls_call(&node.url("amqps", "127.0.0.1", &vhost), &node.ca);
    let err = String::from_utf8_lossy(&misnamed.stderr);
    assert!(
        !misnamed.status.success(),
        "a certificate for another name was taken"
    );
    assert!(err.contains("not valid for name"), "{err}");

    assert!(coordinator.running(), "{}", coordinator.log());
    assert!(worker.running(), "{}", worker.log());
    node.ctl(&["delete_vhost", &vhost]);
}
