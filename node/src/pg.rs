//! Exact PostgreSQL transactions through the context (DESIGN.md, call
//! lifecycle step 5).
//!
//! [`Ctx::transaction`] runs the handler's statements in one transaction on
//! the handler's pool and writes, in the same transaction, a row of the
//! outbox table `callq_outbox` (`call_id` unique, the attempt, the
//! transaction's result as `reply`). The row is the proof of the commit:
//!
//! - a later attempt of the same call finds it and returns the committed
//!   result without running the statements again;
//! - an attempt that would commit after another one did is stopped by the
//!   unique key, rolls back, and returns the committed result instead;
//! - a commit whose answer was lost (the connection broke) is settled by
//!   reading the row back.
//!
//! So the statements take effect once, whichever attempts run. The trace
//! kind of such a transaction is [`PG_TX`].

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, NoTls};
use tracing::{info, warn};
use uuid::Uuid;

pub use deadpool_postgres::{Pool, Transaction};

use crate::{Ctx, HandlerError};

/// The trace kind of a transaction made through [`Ctx::transaction`]. A
/// worker lost after leaving only such traces does not fail its call: the
/// next attempt runs, and its transaction finds the committed result or
/// commits in its place.
pub const PG_TX: &str = callq_schemas::protocol::EXACT_TRACE;

/// The database the example services and tests use unless `CALLQ_POSTGRES`
/// names another.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1/test";

/// The outbox table, created when missing, with the index its retention
/// ([`sweep_outbox`]) deletes by.
pub const OUTBOX_DDL: &str = "create table if not exists callq_outbox (
    call_id uuid primary key,
    attempt integer not null check (attempt >= 1),
    reply jsonb not null,
    committed_at timestamptz not null default now()
);
create index if not exists callq_outbox_committed on callq_outbox (committed_at)";

/// How long an outbox row is kept unless `CALLQ_OUTBOX_RETENTION_MS` says
/// otherwise: as long as the coordinator keeps a decided call's record.
pub const OUTBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Outbox rows one transaction of the sweep deletes at most.
const OUTBOX_BATCH: i64 = 1_000;

/// How long a pool waits for a connection, to open one, or to check one.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// How long PostgreSQL lets one statement run (`statement_timeout`).
const STATEMENT_WAIT: Duration = Duration::from_secs(30);

/// A connection pool on `url` (`postgres://user[:password]@host[:port]/db`)
/// holding at most `max_size` connections, every wait bounded. Connections
/// open on first use, so this fails only on a URL it cannot read. With
/// `sslmode=require` they are TLS, the server's certificate checked against
/// its host name and the CAs of the system or of the file `SSL_CERT_FILE`
/// names.
pub fn pool(url: &str, max_size: usize) -> Result<Pool, HandlerError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| HandlerError::new("postgres_config", format!("`{url}`: {e}")))?;
    // Every wait on the server is bounded: opening a connection, each
    // statement (unless the URL sets its own options), and a connection
    // whose peer went silent (TCP keepalives).
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(POOL_WAIT);
    }
    if config.get_options().is_none() {
        config.options(format!(
            "-c statement_timeout={}",
            STATEMENT_WAIT.as_millis()
        ));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    let recycling = || ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = if config.get_ssl_mode() == SslMode::Require {
        let tls = tls_connector().map_err(|e| HandlerError::new("postgres_config", e))?;
        Manager::from_config(config, tls, recycling())
    } else {
        Manager::from_config(config, NoTls, recycling())
    };
    Pool::builder(manager)
        .config(PoolConfig {
            max_size,
            timeouts: Timeouts {
                wait: Some(POOL_WAIT),
                create: Some(POOL_WAIT),
                recycle: Some(POOL_WAIT),
            },
            ..PoolConfig::default()
        })
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| HandlerError::new("postgres_config", e.to_string()))
}

/// rustls trusting the system's CAs, or those of the file `SSL_CERT_FILE`
/// names.
fn tls_connector() -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    if roots.add_parsable_certificates(found.certs).0 == 0 {
        return Err(format!(
            "sslmode=require, but no CA certificate was found ({:?}): set SSL_CERT_FILE to the \
             CA's PEM file",
            found.errors
        ));
    }
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Deletes up to `max` outbox rows committed longer than `retention` ago
/// (by the database's clock); how many. A copy of such a call that arrives
/// later no longer finds its committed result and runs its transaction as
/// a new call, so the retention must outlast the longest a copy can wait.
pub async fn forget_outbox(
    pool: &Pool,
    retention: Duration,
    max: i64,
) -> Result<u64, HandlerError> {
    let client = pool.get().await.map_err(unavailable)?;
    client
        .execute(
            "delete from callq_outbox where call_id in (select call_id from callq_outbox \
             where committed_at < now() - make_interval(secs => $1) limit $2)",
            &[&retention.as_secs_f64(), &max],
        )
        .await
        .map_err(db_error)
}

/// Deletes the outbox rows past `retention` in the background: every 10
/// seconds, in transactions of 1,000 rows until one is not full (a task of
/// its own: handlers never wait for it, and the deletions keep up with any
/// rate of commits).
pub fn sweep_outbox(pool: Pool, retention: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            every.tick().await;
            let mut forgotten = 0;
            loop {
                match forget_outbox(&pool, retention, OUTBOX_BATCH).await {
                    Ok(n) => {
                        forgotten += n;
                        if n < OUTBOX_BATCH.unsigned_abs() {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!("forgetting old outbox rows: {}", e.message);
                        break;
                    }
                }
            }
            if forgotten > 0 {
                info!(rows = forgotten, "outbox rows past the retention forgotten");
            }
        }
    })
}

/// The outbox retention `CALLQ_OUTBOX_RETENTION_MS` names, else
/// [`OUTBOX_RETENTION`].
pub fn outbox_retention_from_env() -> Duration {
    std::env::var("CALLQ_OUTBOX_RETENTION_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(OUTBOX_RETENTION, Duration::from_millis)
}

/// Creates the outbox table when it is missing.
pub async fn migrate(pool: &Pool) -> Result<(), HandlerError> {
    let client = pool.get().await.map_err(unavailable)?;
    create_if_missing(&**client, OUTBOX_DDL).await
}

/// Runs a `create ... if not exists`; a concurrent creation by another
/// process (PostgreSQL then reports a duplicate) counts as done.
pub async fn create_if_missing(client: &impl GenericClient, ddl: &str) -> Result<(), HandlerError> {
    match client.batch_execute(ddl).await {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.code(),
                Some(&SqlState::UNIQUE_VIOLATION | &SqlState::DUPLICATE_TABLE)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(db_error(e)),
    }
}

/// The committed result of a call, with the attempt that committed it, if
/// a transaction of the call committed.
pub async fn committed(
    client: &impl GenericClient,
    call_id: Uuid,
) -> Result<Option<(u32, Value)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "select attempt, reply from callq_outbox where call_id = $1",
            &[&call_id],
        )
        .await?;
    Ok(row.map(|r| {
        let attempt: i32 = r.get(0);
        (u32::try_from(attempt).unwrap_or(0), r.get(1))
    }))
}

fn unavailable(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::new(
        "postgres_unavailable",
        format!("no PostgreSQL connection: {e}"),
    )
}

fn db_error(e: tokio_postgres::Error) -> HandlerError {
    match e.as_db_error() {
        Some(db) => HandlerError::new(
            "postgres_error",
            format!("{} ({})", db.message(), db.code().code()),
        ),
        None => unavailable(e),
    }
}

fn result_of<T: DeserializeOwned>(call_id: Uuid, reply: Value) -> Result<T, HandlerError> {
    serde_json::from_value(reply).map_err(|e| {
        HandlerError::new(
            "outbox_unreadable",
            format!("the committed result of call {call_id} does not fit this handler: {e}"),
        )
    })
}

impl From<tokio_postgres::Error> for HandlerError {
    fn from(e: tokio_postgres::Error) -> Self {
        db_error(e)
    }
}

impl Ctx {
    /// Runs `statements` in one PostgreSQL transaction on `pool`, exactly
    /// once for this call however many attempts run it, and returns their
    /// result, which becomes the call's recorded result: return it from the
    /// handler.
    ///
    /// The context asks the coordinator for the trace [`PG_TX`] first (a
    /// revoked attempt is refused and runs nothing), writes the outbox row
    /// with the result in the same transaction, and commits. If an earlier
    /// attempt already committed, the statements do not run and its result
    /// is returned. An error from the statements rolls everything back and
    /// is the handler's error.
    ///
    /// ```ignore
    /// let moved: Value = ctx.transaction(&pool, |tx| Box::pin(async move {
    ///     tx.execute("update bank_accounts set cents = cents - 5 where id = 'a'", &[]).await?;
    ///     Ok(json!({"moved": 5}))
    /// })).await?;
    /// ```
    pub async fn transaction<T, F>(&self, pool: &Pool, statements: F) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: for<'t> FnOnce(&'t Transaction<'t>) -> BoxFuture<'t, Result<T, HandlerError>> + Send,
    {
        let call_id = self.call_id;
        {
            let client = pool.get().await.map_err(unavailable)?;
            // An attempt after a committed one returns its result.
            match committed(&**client, call_id).await {
                Ok(Some((attempt, reply))) => {
                    info!(%call_id, attempt, "the call's transaction committed before: its result stands");
                    return result_of(call_id, reply);
                }
                Ok(None) => {}
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                    create_if_missing(&**client, OUTBOX_DDL).await?;
                }
                Err(e) => return Err(db_error(e)),
            }
        }
        // The grant is awaited without holding a connection of the pool.
        self.trace(PG_TX).await?;
        let mut client = pool.get().await.map_err(unavailable)?;
        let tx = client.transaction().await.map_err(db_error)?;
        let value = statements(&tx).await?;
        let reply = serde_json::to_value(&value).map_err(|e| {
            HandlerError::new(
                "result_unserializable",
                format!("the transaction's result cannot be recorded: {e}"),
            )
        })?;
        let attempt = i32::try_from(self.attempt).unwrap_or(i32::MAX);
        let written = tx
            .execute(
                "insert into callq_outbox (call_id, attempt, reply) values ($1, $2, $3) \
                 on conflict (call_id) do nothing",
                &[&call_id, &attempt, &reply],
            )
            .await
            .map_err(db_error)?;
        if written == 0 {
            // Another attempt committed while this one ran: its result
            // stands; this one leaves nothing.
            drop(tx);
            warn!(%call_id, attempt = self.attempt, "another attempt of the call committed first; this one rolls back");
            return match committed(&**client, call_id).await.map_err(db_error)? {
                Some((_, reply)) => result_of(call_id, reply),
                None => Err(HandlerError::new(
                    "outbox_lost",
                    format!("call {call_id}'s outbox row vanished"),
                )),
            };
        }
        match tx.commit().await {
            Ok(()) => Ok(value),
            Err(e) => {
                // The answer to the commit may be lost with the connection:
                // the outbox says whether it happened.
                let settled = match pool.get().await {
                    Ok(c) => committed(&**c, call_id).await.ok().flatten(),
                    Err(_) => None,
                };
                match settled {
                    Some((a, reply)) if a == self.attempt => {
                        info!(%call_id, "the commit's answer was lost, but the outbox shows it committed");
                        result_of(call_id, reply)
                    }
                    Some((_, reply)) => result_of(call_id, reply),
                    None => Err(HandlerError::new(
                        "postgres_commit_unknown",
                        format!(
                            "the commit of call {call_id}'s transaction was not confirmed ({e}) \
                             and the outbox could not be read: its row in callq_outbox tells \
                             whether it took effect"
                        ),
                    )),
                }
            }
        }
    }
}
