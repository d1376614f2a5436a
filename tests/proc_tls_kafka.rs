//! Kafka over TLS, with processes: a coordinator, a worker and `callq call`
//! through `kafkas://` to a tansu that only TLS reaches. tansu takes no TLS:
//! `scripts/kafka` puts stunnel in front of a tansu of its own, taking TLS
//! with the test CA's certificate for `localhost` on `CALLQ_KAFKA_TLS_PORT`
//! and handing each connection on to that tansu, which advertises the TLS
//! port in its metadata, so that a client's every connection goes through
//! the proxy. stunnel logs each connection it accepts and its handshake
//! (`CALLQ_KAFKA_TLS_URL`, `CALLQ_KAFKA_TLS_CA`, `CALLQ_KAFKA_TLS_LOG`).
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct TlsKafka {
    /// `kafkas://localhost:<port>`.
    base: String,
    port: u16,
    ca: String,
    log: PathBuf,
    /// The client certificate and its key, as URL settings.
    client: String,
}

impl TlsKafka {
    fn get() -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run scripts/test, or `source scripts/kafka`")
            })
        };
        let port = var("CALLQ_KAFKA_TLS_PORT");
        Self {
            base: var("CALLQ_KAFKA_TLS_URL"),
            port: port
                .parse()
                .unwrap_or_else(|_| panic!("CALLQ_KAFKA_TLS_PORT={port} is not a port")),
            ca: var("CALLQ_KAFKA_TLS_CA"),
            log: PathBuf::from(var("CALLQ_KAFKA_TLS_LOG")),
            client: format!(
                "ssl.certificate.location={}&ssl.key.location={}",
                var("CALLQ_KAFKA_TLS_CLIENT_CERT"),
                var("CALLQ_KAFKA_TLS_CLIENT_KEY")
            ),
        }
    }

    /// `base` with the test's own topics and groups (`tag`), the short
    /// sessions and fetch waits of the other Kafka tests, and the client
    /// certificate.
    fn url(&self, base: &str, tag: &str) -> String {
        format!("{}&{}", Self::anonymous_url(base, tag), self.client)
    }

    /// [`TlsKafka::url`] without the client certificate.
    fn anonymous_url(base: &str, tag: &str) -> String {
        format!(
            "{base}?session_timeout_ms=2000&fetch_wait_ms=10\
             &topic_prefix={tag}.&group_prefix={tag}."
        )
    }

    /// What stunnel logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| panic!("stunnel's log {}: {e}", self.log.display()))
    }
}

/// The port of an address of /proc/net/tcp (`0100007F:2385`).
fn port_of(address: &str) -> u16 {
    u16::from_str_radix(address.rsplit(':').next().unwrap(), 16).unwrap()
}

/// The established TCP connections of process `pid`: (local port, remote
/// port) of each, from its sockets in /proc.
fn tcp_connections(pid: u32) -> Vec<(u16, u16)> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let mut connections = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local address, remote address, state (01: established), ..., inode
            if f.len() > 9 && f[3] == "01" && inodes.contains(f[9]) {
                connections.push((port_of(f[1]), port_of(f[2])));
            }
        }
    }
    connections
}

/// Whether stunnel's log shows the connection from local port `port`
/// accepted and its TLS handshake done (the last connection from that port:
/// stunnel numbers its connections, `LOG5[12]: ... accepted connection from
/// 127.0.0.1:40112`, then `LOG6[12]: TLS accepted: new session negotiated`).
fn tls_accepted(log: &str, port: u16) -> bool {
    let lines: Vec<&str> = log.lines().collect();
    let suffix = format!(":{port}");
    let Some(at) = lines
        .iter()
        .rposition(|l| l.contains("accepted connection from ") && l.ends_with(&suffix))
    else {
        return false;
    };
    let Some(id) = lines[at]
        .split_once("LOG")
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(level_id, _)| level_id.split_once('['))
        .map(|(_, id)| id.to_owned())
    else {
        return false;
    };
    let handshake = format!("[{id}]: TLS accepted");
    lines[at..].iter().any(|l| l.contains(&handshake))
}

/// A coordinator and a worker reach tansu through `kafkas://` only, and
/// `callq call` gets its answer through it: every TCP connection the two
/// processes hold goes to the TLS port, and stunnel logged a TLS handshake
/// for each; each shows the client certificate the proxy requires. A plain
/// `kafka://` connection to the TLS port, a TLS one to a host name the
/// certificate does not name, and one without a client certificate fail
/// with errors that say what to do, in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_goes_through_kafkas_and_plain_or_misnamed_connections_are_refused() {
    let kafka = TlsKafka::get();
    let tag = format!("tls-{}", uuid::Uuid::now_v7().simple());
    let url = kafka.url(&kafka.base, &tag);
    let dir = support::temp_dir("tls-kafka");
    let (mut coordinator, mut worker) =
        support::serve_over_tls(&url, &kafka.ca, &dir, Duration::from_secs(90)).await;

    // Every connection of the coordinator and the worker is one stunnel
    // accepted on the TLS port and finished a TLS handshake on. (One just
    // opened may not be in the log yet: the log is read again for a while.)
    for proc in [&coordinator, &worker] {
        let connections = tcp_connections(proc.pid());
        eprintln!(
            "{}: TCP connections (local, remote port): {connections:?}",
            proc.name
        );
        assert!(
            !connections.is_empty(),
            "{} holds no TCP connection",
            proc.name
        );
        assert!(
            connections.iter().all(|&(_, remote)| remote == kafka.port),
            "{} has a connection to another port than the TLS proxy's {}: {connections:?}",
            proc.name,
            kafka.port
        );
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let log = kafka.log();
            let missing: Vec<u16> = connections
                .iter()
                .map(|&(local, _)| local)
                .filter(|&local| !tls_accepted(&log, local))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < until,
                "stunnel logged no TLS handshake for the connections of {} from ports \
                 {missing:?}:\n{log}",
                proc.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let plain_url = kafka.url(&kafka.base.replacen("kafkas://", "kafka://", 1), &tag);
    refused(
        &plain_url,
        &kafka.ca,
        "plain kafka:// to the TLS port",
        &["use kafkas://"],
    );
    let misnamed_url = kafka.url(&format!("kafkas://127.0.0.1:{}", kafka.port), &tag);
    refused(
        &misnamed_url,
        &kafka.ca,
        "kafkas:// to 127.0.0.1, which the certificate does not name",
        &["certificate verify failed", "must name the host"],
    );
    // No client certificate: the proxy refuses the handshake.
    refused(
        &TlsKafka::anonymous_url(&kafka.base, &tag),
        &kafka.ca,
        "kafkas:// without a client certificate",
        &["ssl.certificate.location"],
    );

    assert!(coordinator.running(), "{}", coordinator.log());
    assert!(worker.running(), "{}", worker.log());
}

/// A call through `url` fails within a minute, and its error says every
/// one of `says`.
fn refused(url: &str, ca: &str, what: &str, says: &[&str]) {
    let asked = Instant::now();
    let out = support::tls_call(url, ca);
    let took = asked.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: the call was answered");
    for needle in says {
        assert!(err.contains(needle), "{what}: no `{needle}` in {err}");
    }
    assert!(
        took < Duration::from_secs(60),
        "{what}: refused after {took:?}"
    );
    eprintln!("{what}: refused after {took:?}: {err}");
}
