//! Connections: the broker's nodes a URL names, the pool's manager that
//! fails over between them, and the TLS files an `amqps://` URL names.
//!
//! # Several nodes
//!
//! The forms of a URL naming several nodes, and how connections fail over
//! between them, are in the crate's docs ("A cluster of nodes"): parsed by
//! [`nodes`], tried by [`Connector`].
//!
//! # TLS files
//!
//! Besides lapin's own query settings (`heartbeat`, `frame_max`, ...), an
//! `amqps://` URL may name PEM files, with the keys RabbitMQ's URI
//! specification gives them:
//!
//! | key | file |
//! |---|---|
//! | `cacertfile` | CA certificates trusted besides the system's (and `SSL_CERT_FILE`'s) |
//! | `certfile` | the client's certificate (chain), shown to a broker that asks for one |
//! | `keyfile` | the client certificate's private key (PKCS#8, PKCS#1 or SEC1) |
//!
//! `certfile` and `keyfile` go together. The files are read once, when the
//! adapter connects, so a missing or unreadable file fails at start-up.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use callq_broker::{Backoff, Error};
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use tracing::{debug, info, warn};

/// The query keys that name TLS files.
const TLS_KEYS: [&str; 3] = ["cacertfile", "certfile", "keyfile"];

/// The first pause before a round of connection attempts that follows a
/// round in which no node answered.
pub(crate) const RECONNECT_FIRST: Duration = Duration::from_millis(100);

/// The longest such pause.
pub(crate) const RECONNECT_CAP: Duration = Duration::from_secs(2);

/// The least time one connection attempt is given on one node.
const MIN_NODE_TIMEOUT: Duration = Duration::from_millis(500);

/// A pool of connections to one broker.
pub(crate) type Pool = managed::Pool<Connector>;

/// One node of the broker, ready to connect to.
#[derive(Clone)]
pub(crate) struct Node {
    /// The URL lapin is given (TLS files taken out, defaults filled in).
    pub(crate) uri: AMQPUri,
    /// `host:port`, for messages.
    pub(crate) place: String,
    /// The TLS files its URL named.
    pub(crate) tls: OwnedTLSConfig,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("place", &self.place)
            .field("client_certificate", &self.tls.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Why no node gave a connection: each node's reason.
#[derive(Debug)]
pub(crate) struct Unreached(String);

impl std::fmt::Display for Unreached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreached {}

/// Opens the pool's connections to the broker's nodes, named `name`,
/// failing over from one node to the next.
pub(crate) struct Connector {
    nodes: Vec<Node>,
    name: String,
    /// How long one attempt on one node may take.
    per_node: Duration,
    /// The node tried first: the one that answered last.
    first: AtomicUsize,
    /// Set when the last round reached no node: the next one waits first.
    failed: AtomicBool,
    backoff: Mutex<Backoff>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.name)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector to `nodes` (at least one) starting at `first`, each
    /// attempt on a node bounded by `per_node`.
    pub(crate) fn new(nodes: Vec<Node>, name: String, per_node: Duration, first: usize) -> Self {
        let first = first % nodes.len().max(1);
        Self {
            nodes,
            name,
            per_node,
            first: AtomicUsize::new(first),
            failed: AtomicBool::new(false),
            backoff: Mutex::new(Backoff::new(RECONNECT_FIRST, RECONNECT_CAP)),
        }
    }

    /// One attempt on one node, bounded.
    async fn open(&self, node: &Node) -> Result<Connection, String> {
        let connect = lapin::ConnectionBuilder::new()
            .map_err(|e| e.to_string())?
            .with_uri(node.uri.clone())
            .with_properties(
                ConnectionProperties::default().with_connection_name(self.name.clone().into()),
            )
            .with_tls_config(node.tls.clone());
        match tokio::time::timeout(self.per_node, connect.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.per_node)),
        }
    }

    /// The pause before a round that follows a failed one, if any.
    fn pause(&self) -> Option<Duration> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        let mut backoff = self
            .backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(backoff.next_delay())
    }

    /// After a round that reached a node: the next failure starts the
    /// backoff over.
    fn reached(&self, index: usize) {
        self.first.store(index, Ordering::Release);
        if self.failed.swap(false, Ordering::AcqRel) {
            self.backoff
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .reset();
        }
    }
}

/// The indexes of `n` nodes in the order a round tries them, from `first`
/// around the list.
pub(crate) fn round(first: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (first + k) % n)
}

impl managed::Manager for Connector {
    type Type = Connection;
    type Error = Unreached;

    async fn create(&self) -> Result<Connection, Unreached> {
        if let Some(pause) = self.pause() {
            debug!(
                connection = %self.name,
                "no RabbitMQ node answered the last round: trying again in {pause:?}"
            );
            tokio::time::sleep(pause).await;
        }
        let start = self.first.load(Ordering::Acquire);
        let mut failures = Vec::new();
        for index in round(start, self.nodes.len()) {
            let node = &self.nodes[index];
            match self.open(node).await {
                Ok(conn) => {
                    if !failures.is_empty() {
                        let failed = failures.join("; ");
                        info!(
                            connection = %self.name,
                            at = %node.place,
                            "connected to RabbitMQ after {} failed: {failed}",
                            failures.len()
                        );
                    }
                    self.reached(index);
                    return Ok(conn);
                }
                Err(e) => {
                    if self.nodes.len() > 1 {
                        warn!(
                            connection = %self.name,
                            at = %node.place,
                            "RabbitMQ node not reached: {e}"
                        );
                    }
                    failures.push(if self.nodes.len() > 1 {
                        format!("{}: {e}", node.place)
                    } else {
                        e
                    });
                }
            }
        }
        self.failed.store(true, Ordering::Release);
        Err(Unreached(failures.join("; ")))
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<Unreached> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("the connection is closed"))
        }
    }
}

/// The broker's nodes `url` names (see the module's docs), each with the
/// defaults filled in where its URL names none: `heartbeat`, `frame_max`,
/// and a `connection_timeout` of `timeout` shared among the nodes.
pub(crate) fn nodes(
    url: &str,
    heartbeat: u16,
    frame_max: u32,
    timeout: Duration,
) -> Result<(Vec<Node>, Duration), Error> {
    let urls = split_nodes(url)?;
    let per_node = per_node_timeout(timeout, urls.len());
    let mut nodes = Vec::with_capacity(urls.len());
    for (node_url, host) in &urls {
        let (plain, tls) = split_tls(node_url)?;
        let mut uri: AMQPUri = plain
            .parse()
            .map_err(|e| Error::Refused(format!("not an AMQP URL ({e}): {}", redact(node_url))))?;
        if let Some(v6) = host.strip_prefix('[').and_then(|h| h.split_once(']')) {
            // An IPv6 literal: the URL parser keeps no host for it.
            uri.authority.host = v6.0.to_owned();
        }
        uri.query.heartbeat.get_or_insert(heartbeat);
        // lapin keeps buffers of 32 frames per connection: 128 KiB
        // frames (RabbitMQ's default) cost 8 MiB of a worker's memory.
        uri.query.frame_max.get_or_insert(frame_max);
        uri.query
            .connection_timeout
            .get_or_insert(u64::try_from(per_node.as_millis()).unwrap_or(u64::MAX));
        let place = if uri.authority.host.contains(':') {
            format!("[{}]:{}", uri.authority.host, uri.authority.port)
        } else {
            format!("{}:{}", uri.authority.host, uri.authority.port)
        };
        nodes.push(Node { uri, place, tls });
    }
    let first = &nodes[0].uri;
    for node in &nodes[1..] {
        if node.uri.authority.userinfo.username != first.authority.userinfo.username
            || node.uri.vhost != first.vhost
        {
            return Err(Error::Refused(format!(
                "the broker URL's nodes differ in user or virtual host ({} and {}): the nodes of \
                 one broker share both",
                nodes[0].place, node.place
            )));
        }
    }
    // The wait on one node: the URL's own, when it names one.
    let longest = nodes
        .iter()
        .filter_map(|n| n.uri.query.connection_timeout)
        .max()
        .map_or(per_node, Duration::from_millis);
    Ok((nodes, longest.max(MIN_NODE_TIMEOUT)))
}

/// The wait on one node when `nodes` share `timeout`.
pub(crate) fn per_node_timeout(timeout: Duration, nodes: usize) -> Duration {
    (timeout / u32::try_from(nodes.max(1)).unwrap_or(u32::MAX)).max(MIN_NODE_TIMEOUT)
}

/// Splits a broker URL into one URL per node, each with its host text as
/// the URL wrote it: whole URLs separated by commas, and within each,
/// hosts separated by commas.
pub(crate) fn split_nodes(url: &str) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    for one in split_urls(url.trim()) {
        let one = one.trim();
        let Some((scheme, rest)) = one.split_once("://") else {
            return Err(Error::Refused(format!(
                "not an AMQP URL: {} (expected \
                 amqp://user:password@host:port[,host:port...]/vhost)",
                redact(one)
            )));
        };
        // The authority ends at the path or the query; its user
        // information at its last `@` (RFC 3986: neither holds `/`, `?`).
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => authority.split_at(at + 1),
            None => ("", authority),
        };
        let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if hosts.len() > 1 && hosts.iter().any(|h| h.is_empty()) {
            return Err(Error::Refused(format!(
                "the broker URL {} names an empty host in its list of hosts",
                redact(one)
            )));
        }
        for host in hosts {
            out.push((
                format!("{scheme}://{userinfo}{host}{tail}"),
                host.to_owned(),
            ));
        }
    }
    Ok(out)
}

/// Whole URLs separated by commas: a comma followed by a scheme starts the
/// next one.
fn split_urls(url: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut from = 0;
    let mut search = 0;
    while let Some(comma) = url[search..].find(',').map(|i| search + i) {
        let next = url[comma + 1..].trim_start();
        if next.starts_with("amqp://") || next.starts_with("amqps://") {
            parts.push(&url[from..comma]);
            from = comma + 1;
        }
        search = comma + 1;
    }
    parts.push(&url[from..]);
    parts
}

/// The URL without its passwords, for messages.
pub(crate) fn redact(url: &str) -> String {
    let one = |url: &str| match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    };
    split_urls(url)
        .into_iter()
        .map(one)
        .collect::<Vec<_>>()
        .join(",")
}

/// An index below `n` drawn at random: the node a connector starts at.
pub(crate) fn random_index(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    usize::try_from(h.finish() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
}

/// Takes the TLS files out of `url`: the URL lapin is given, and what they
/// hold. A URL without them comes back as it is.
pub(crate) fn split_tls(url: &str) -> Result<(String, OwnedTLSConfig), Error> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), OwnedTLSConfig::default()));
    };
    let mut files = BTreeMap::new();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if TLS_KEYS.contains(&key) {
            let path = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| Error::Refused(format!("the broker URL's {key} is not UTF-8")))?;
            files.insert(key, path.into_owned());
        } else {
            kept.push(pair);
        }
    }
    if files.is_empty() {
        return Ok((url.to_owned(), OwnedTLSConfig::default()));
    }
    if !base.starts_with("amqps://") {
        return Err(Error::Refused(format!(
            "the broker URL names {} but is not amqps://: TLS files apply to amqps:// only",
            files.keys().copied().collect::<Vec<_>>().join(", ")
        )));
    }
    let read = |key: &str| -> Result<Option<Vec<u8>>, Error> {
        files
            .get(key)
            .map(|path| {
                std::fs::read(path).map_err(|e| {
                    Error::Refused(format!(
                        "reading the {key} `{path}` the broker URL names: {e}"
                    ))
                })
            })
            .transpose()
    };
    let identity = match (read("certfile")?, read("keyfile")?) {
        (Some(pem), Some(key)) => Some(OwnedIdentity::PKCS8 { pem, key }),
        (None, None) => None,
        _ => {
            return Err(Error::Refused(
                "the broker URL names only one of certfile and keyfile: a client certificate \
                 needs both"
                    .into(),
            ));
        }
    };
    let cert_chain = read("cacertfile")?
        .map(|pem| {
            String::from_utf8(pem)
                .map_err(|_| Error::Refused("the broker URL's cacertfile is not PEM".into()))
        })
        .transpose()?;
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((
        url,
        OwnedTLSConfig {
            identity,
            cert_chain,
        },
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The nodes' places and lapin URLs of `url` (5 s to share).
    fn parsed(url: &str) -> Vec<(String, String)> {
        let (nodes, _) = nodes(url, 5, 32_768, Duration::from_secs(6)).unwrap();
        nodes
            .into_iter()
            .map(|n| (n.place, n.uri.to_string()))
            .collect()
    }

    #[test]
    fn one_url_names_one_node_with_the_defaults_filled_in() {
        assert_eq!(
            parsed("amqp://guest:guest@127.0.0.1:5672/%2f"),
            [(
                "127.0.0.1:5672".to_owned(),
                "amqp://guest:guest@127.0.0.1:5672/%2F?frame_max=32768&heartbeat=5\
                 &connection_timeout=6000"
                    .to_owned()
            )]
        );
        // The URL's own settings win.
        let (nodes, per_node) = nodes(
            "amqp://u:p@h:1/v?heartbeat=2&connection_timeout=900",
            5,
            32_768,
            Duration::from_secs(6),
        )
        .unwrap();
        assert_eq!(nodes[0].uri.query.heartbeat, Some(2));
        assert_eq!(per_node, Duration::from_millis(900));
    }

    #[test]
    fn hosts_separated_by_commas_share_credentials_vhost_and_query() {
        let got = parsed("amqp://u:p%2Cw@h1:5681, h2:5682,h3/v?heartbeat=3");
        let places: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(places, ["h1:5681", "h2:5682", "h3:5672"]);
        for (place, url) in &got {
            assert_eq!(
                url,
                &format!(
                    "amqp://u:p%2Cw@{place}/v?frame_max=32768&heartbeat=3&connection_timeout=2000"
                )
            );
        }
        // The default port of amqps, and an IPv6 literal.
        let got = parsed("amqps://u:p@a,[::1]:5671/v");
        assert_eq!(got[0].0, "a:5671");
        assert_eq!(got[1].0, "[::1]:5671");
    }

    #[test]
    fn whole_urls_separated_by_commas_are_nodes_too() {
        let got = parsed("amqp://u:p@h1:5681/v?heartbeat=3,amqp://u:q@h2:5682,h3:5683/v");
        let places: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(places, ["h1:5681", "h2:5682", "h3:5683"]);
        assert!(got[0].1.contains("heartbeat=3"), "{}", got[0].1);
        assert!(
            got[1].1.starts_with("amqp://u:q@h2:5682/v?"),
            "{}",
            got[1].1
        );
        // A password with a comma is not a second URL.
        assert_eq!(parsed("amqp://u:a,b@h/v").len(), 1);
    }

    #[test]
    fn nodes_of_one_broker_share_user_and_vhost() {
        let refused = |url: &str| {
            nodes(url, 5, 32_768, Duration::from_secs(6))
                .unwrap_err()
                .to_string()
        };
        let e = refused("amqp://u:p@h1/v,amqp://w:p@h2/v");
        assert!(e.contains("user or virtual host"), "{e}");
        let e = refused("amqp://u:p@h1/v,amqp://u:p@h2/other");
        assert!(e.contains("user or virtual host"), "{e}");
        let e = refused("amqp://u:secret@h1,,h3/v");
        assert!(e.contains("empty host"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = refused("h1:5672,h2:5672");
        assert!(e.contains("not an AMQP URL"), "{e}");
    }

    #[test]
    fn a_round_tries_every_node_once_from_the_first() {
        assert_eq!(round(1, 3).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(round(0, 1).collect::<Vec<_>>(), [0]);
        // Three nodes share the timeout; no attempt gets less than 500 ms.
        assert_eq!(
            per_node_timeout(Duration::from_secs(9), 3),
            Duration::from_secs(3)
        );
        assert_eq!(
            per_node_timeout(Duration::from_secs(1), 3),
            Duration::from_millis(500)
        );
        for n in 1..5 {
            assert!(random_index(n) < n);
        }
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
        assert_eq!(
            redact("amqp://u:s1@h1/v,amqp://u:s2@h2,h3/v"),
            "amqp://u:***@h1/v,amqp://u:***@h2,h3/v"
        );
    }

    #[test]
    fn a_url_without_tls_files_is_kept_as_it_is() {
        for url in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqps://u:p@host:5671/v?heartbeat=5",
        ] {
            let (kept, tls) = split_tls(url).unwrap();
            assert_eq!(kept, url);
            assert_eq!(tls, OwnedTLSConfig::default());
        }
    }

    #[test]
    fn tls_files_are_read_and_taken_out_of_the_url() {
        let dir = std::env::temp_dir().join(format!("callq-amqp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string().replace('/', "%2F")
        };
        let (cert, key, ca) = (
            file("c.pem", "CERT"),
            file("k.pem", "KEY"),
            file("ca.pem", "CA"),
        );
        let url = format!(
            "amqps://u:p@localhost:5671/v?heartbeat=3&certfile={cert}&keyfile={key}&cacertfile={ca}"
        );
        let (kept, tls) = split_tls(&url).unwrap();
        assert_eq!(kept, "amqps://u:p@localhost:5671/v?heartbeat=3");
        assert_eq!(
            tls.identity,
            Some(OwnedIdentity::PKCS8 {
                pem: b"CERT".to_vec(),
                key: b"KEY".to_vec()
            })
        );
        assert_eq!(tls.cert_chain.as_deref(), Some("CA"));

        let only_cert = format!("amqps://u:p@localhost/v?certfile={cert}");
        let e = split_tls(&only_cert).unwrap_err().to_string();
        assert!(e.contains("needs both"), "{e}");
        let plain = format!("amqp://u:p@localhost/v?certfile={cert}&keyfile={key}");
        let e = split_tls(&plain).unwrap_err().to_string();
        assert!(e.contains("amqps:// only"), "{e}");
        let missing = "amqps://u:p@localhost/v?cacertfile=/no/such/ca.pem";
        let e = split_tls(missing).unwrap_err().to_string();
        assert!(e.contains("/no/such/ca.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
