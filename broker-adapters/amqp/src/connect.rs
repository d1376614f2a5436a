//! Connections: the pool's manager, and the TLS files an `amqps://` URL
//! names.
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

use callq_broker::Error;
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};

/// The query keys that name TLS files.
const TLS_KEYS: [&str; 3] = ["cacertfile", "certfile", "keyfile"];

/// A pool of connections to one broker.
pub(crate) type Pool = managed::Pool<Connector>;

/// Opens the pool's connections: to `url`, named `name`, with `tls`.
pub(crate) struct Connector {
    pub(crate) url: String,
    pub(crate) name: String,
    pub(crate) tls: OwnedTLSConfig,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.name)
            .field("client_certificate", &self.tls.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl managed::Manager for Connector {
    type Type = Connection;
    type Error = lapin::Error;

    async fn create(&self) -> Result<Connection, lapin::Error> {
        lapin::ConnectionBuilder::new()?
            .with_uri_str(self.url.clone())
            .with_properties(
                ConnectionProperties::default().with_connection_name(self.name.clone().into()),
            )
            .with_tls_config(self.tls.clone())
            .connect()
            .await
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<lapin::Error> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("the connection is closed"))
        }
    }
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
