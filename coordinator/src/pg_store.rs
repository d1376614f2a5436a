//! The ledger's store on PostgreSQL, for coordinators on several hosts.
//!
//! Coordinators of one cluster share three tables (created when missing,
//! [`PG_MIGRATION`]): `callq_leader`, one row per cluster holding the leader's
//! lease (epoch, holder, expiry), `callq_calls`, the call records, and
//! `callq_sessions`, the sessions. A coordinator becomes leader by taking an
//! expired lease, which raises the epoch ([`PgStore::acquire`]); it keeps
//! the lease by renewing it ([`Store::renew`]) well before it expires. Every
//! write of calls and sessions ([`Store::put_all`]) runs in a transaction
//! that first extends the lease *for its own epoch*: once another
//! coordinator has taken the lease, the old leader's writes change nothing
//! and fail with [`Error::Fenced`], however long it was paused. (Forgetting
//! ended sessions is not fenced: it deletes only their tombstones.) The
//! open calls are read back from `callq_calls` when a coordinator takes
//! over; sessions are read as they are used or swept.
//!
//! The ledger's store is synchronous (one group commit per batch, on the
//! coordinator's one task): this store blocks its runtime thread for each
//! round trip, which needs tokio's multi-threaded runtime.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::runtime::Handle;
use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};
use uuid::Uuid;

use crate::{CallRecord, CallState, Delayed, Error, SessionRecord, Store};

/// The tables, created when missing.
pub const PG_MIGRATION: &str = "
create table if not exists callq_leader (
    cluster text primary key,
    epoch bigint not null,
    holder text not null,
    expires_at timestamptz not null
);
create table if not exists callq_calls (
    cluster text not null,
    call_id uuid not null,
    open boolean not null,
    record jsonb not null,
    epoch bigint not null,
    primary key (cluster, call_id)
);
create index if not exists callq_calls_open on callq_calls (cluster) where open;
-- When a call was first written decided, for its deletion after the
-- retention (records decided before the column existed are dated by the
-- leader's sweep: PgStore::forget_decided).
alter table callq_calls add column if not exists decided_at timestamptz;
create index if not exists callq_calls_decided on callq_calls (cluster, decided_at) where not open;
create table if not exists callq_sessions (
    cluster text not null,
    session_id text not null,
    record jsonb not null,
    primary key (cluster, session_id)
);
-- Calls held until they are due (their not_before).
create table if not exists callq_delayed (
    cluster text not null,
    call_id uuid not null,
    due_ms bigint not null,
    service text not null,
    body text not null,
    primary key (cluster, call_id)
);
create index if not exists callq_delayed_due on callq_delayed (cluster, due_ms);
alter table callq_delayed add column if not exists attempt integer not null default 2;
";

/// The databases (by URL) this process has migrated: a process talks to
/// one or a few.
static MIGRATED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long one round trip to PostgreSQL may take.
const ROUND_TRIP: Duration = Duration::from_secs(5);

fn pg_err(e: impl std::fmt::Display) -> Error {
    Error::Store(format!("PostgreSQL: {e}"))
}

/// The call ledger's records in PostgreSQL, written under a leader lease.
pub struct PgStore {
    client: Client,
    handle: Handle,
    cluster: String,
    holder: String,
    epoch: i64,
    lease: Duration,
    /// When the lease was last extended (the start of that round trip).
    renewed: Instant,
}

/// Connects to `url` with a bounded wait; the connection runs on a task.
/// With `sslmode=require` in the URL the connection is TLS, the server's
/// certificate checked against its host name and the CAs of the system
/// (or of the file `SSL_CERT_FILE` names); otherwise it is plain.
async fn connect(url: &str) -> Result<Client, Error> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| pg_err(format!("reading the URL: {e}")))?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        start(&config, tls_connector()?).await
    } else {
        start(&config, NoTls).await
    }
}

async fn start<T>(config: &tokio_postgres::Config, tls: T) -> Result<Client, Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = tokio::time::timeout(ROUND_TRIP, config.connect(tls))
        .await
        .map_err(|_| pg_err(format!("no connection within {ROUND_TRIP:?}")))?
        .map_err(|e| {
            // Its causes say why (a refused certificate, say).
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text = format!("{text}: {c}");
                cause = c.source();
            }
            pg_err(text)
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!("the coordinator's PostgreSQL connection ended: {e}");
        }
    });
    Ok(client)
}

/// TLS to PostgreSQL: rustls with the CAs of the system, or of the file
/// `SSL_CERT_FILE` names.
fn tls_connector() -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(pg_err(format!(
            "sslmode=require, but no CA certificate was found ({:?}): set SSL_CERT_FILE to the CA's PEM file",
            found.errors
        )));
    }
    // The crate's one provider (ring: the only one its features enable).
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

async fn bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(ROUND_TRIP, f)
        .await
        .map_err(|_| pg_err(format!("{what}: no answer within {ROUND_TRIP:?}")))?
        .map_err(|e| pg_err(format!("{what}: {e}")))
}

impl PgStore {
    /// Tries to become the leader of `cluster`: takes the lease if no
    /// coordinator holds it or its holder let it expire, raising the epoch.
    /// `None` while another coordinator's lease runs.
    pub async fn acquire(
        url: &str,
        cluster: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<Self>, Error> {
        let client = connect(url).await?;
        // Once per database and process: a standby tries the lease every
        // quarter lease, and `alter table` locks the calls table while the
        // leader writes to it.
        if !lock(&MIGRATED).contains(url) {
            bounded("creating the tables", client.batch_execute(PG_MIGRATION))
                .await
                .or_else(|e| {
                    // Coordinators starting at once race to create the tables.
                    if e.to_string().contains("duplicate key")
                        || e.to_string().contains("already exists")
                    {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            lock(&MIGRATED).insert(url.to_owned());
        }
        let renewed = Instant::now();
        let ms = lease.as_secs_f64() * 1000.0;
        let row = bounded(
            "taking the lease",
            client.query_opt(
                "insert into callq_leader (cluster, epoch, holder, expires_at) \
                 values ($1, 1, $2, now() + $3::float8 * interval '1 millisecond') \
                 on conflict (cluster) do update \
                 set epoch = callq_leader.epoch + 1, holder = excluded.holder, \
                     expires_at = excluded.expires_at \
                 where callq_leader.expires_at < now() \
                 returning epoch",
                &[&cluster, &holder, &ms],
            ),
        )
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let epoch: i64 = row.get(0);
        info!(cluster, holder, epoch, "took the coordinator lease");
        Ok(Some(Self {
            client,
            handle: Handle::current(),
            cluster: cluster.to_owned(),
            holder: holder.to_owned(),
            epoch,
            lease,
            renewed,
        }))
    }

    /// The epoch of this leadership.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Runs `f` to completion from synchronous code on the runtime.
    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.handle.block_on(f))
    }

    /// Held calls matching `filter` (over `$1` the cluster and `$2`
    /// `bound`), at most `max`.
    fn held_where(
        &self,
        what: &'static str,
        filter: &str,
        bound: i64,
        max: usize,
    ) -> Result<Vec<Delayed>, Error> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let sql = format!(
            "select call_id, due_ms, service, body, attempt from callq_delayed \
             where cluster = $1 and {filter} limit $3"
        );
        let rows = self.block(bounded(
            what,
            self.client.query(&sql, &[&self.cluster, &bound, &limit]),
        ))?;
        Ok(rows
            .into_iter()
            .map(|r| Delayed {
                call_id: r.get(0),
                due_ms: r.get(1),
                service: r.get(2),
                body: r.get(3),
                attempt: u32::try_from(r.get::<_, i32>(4)).unwrap_or(2),
            })
            .collect())
    }

    fn fenced(&self) -> Error {
        Error::Fenced(format!(
            "coordinator `{}` lost the lease of cluster `{}` (its epoch {} is superseded)",
            self.holder, self.cluster, self.epoch
        ))
    }
}

/// Extends the lease of `epoch` (in a transaction, or alone); `false` when
/// another coordinator holds the lease now.
async fn extend(
    client: &impl tokio_postgres::GenericClient,
    cluster: &str,
    epoch: i64,
    lease: Duration,
) -> Result<bool, Error> {
    let ms = lease.as_secs_f64() * 1000.0;
    let n = bounded(
        "extending the lease",
        client.execute(
            "update callq_leader set expires_at = now() + $3::float8 * interval '1 millisecond' \
             where cluster = $1 and epoch = $2",
            &[&cluster, &epoch, &ms],
        ),
    )
    .await?;
    Ok(n == 1)
}

impl Store for PgStore {
    fn epoch(&self) -> Option<u64> {
        u64::try_from(self.epoch).ok()
    }

    fn release(&mut self) {
        let released = self.block(bounded(
            "giving the lease up",
            self.client.execute(
                "update callq_leader set expires_at = now() - interval '1 millisecond' \
                 where cluster = $1 and epoch = $2",
                &[&self.cluster, &self.epoch],
            ),
        ));
        match released {
            Ok(_) => info!(cluster = %self.cluster, epoch = self.epoch, "lease given up"),
            Err(e) => warn!("giving the lease up: {e}; a standby takes over when it runs out"),
        }
    }

    fn get(&self, call_id: Uuid) -> Result<Option<CallRecord>, Error> {
        let row = self.block(bounded(
            "reading a call",
            self.client.query_opt(
                "select record from callq_calls where cluster = $1 and call_id = $2",
                &[&self.cluster, &call_id],
            ),
        ))?;
        row.map(|r| {
            serde_json::from_value::<CallRecord>(r.get(0))
                .map_err(|e| Error::Corrupt(e.to_string()))
        })
        .transpose()
    }

    fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>, Error> {
        let row = self.block(bounded(
            "reading a session",
            self.client.query_opt(
                "select record from callq_sessions where cluster = $1 and session_id = $2",
                &[&self.cluster, &session_id],
            ),
        ))?;
        row.map(|r| {
            serde_json::from_value::<SessionRecord>(r.get(0))
                .map_err(|e| Error::Corrupt(e.to_string()))
        })
        .transpose()
    }

    fn idle_sessions(
        &self,
        before_ms: i64,
        max: usize,
    ) -> Result<Vec<(String, SessionRecord)>, Error> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = self.block(bounded(
            "reading idle sessions",
            self.client.query(
                "select session_id, record from callq_sessions \
                 where cluster = $1 and record->>'life' = 'open' \
                 and (record->>'used_ms')::bigint < $2 limit $3",
                &[&self.cluster, &before_ms, &limit],
            ),
        ))?;
        rows.into_iter()
            .map(|r| {
                let id: String = r.get(0);
                serde_json::from_value::<SessionRecord>(r.get(1))
                    .map(|rec| (id, rec))
                    .map_err(|e| Error::Corrupt(e.to_string()))
            })
            .collect()
    }

    fn ended_sessions(&self, before_ms: i64, max: usize) -> Result<Vec<String>, Error> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = self.block(bounded(
            "reading ended sessions",
            self.client.query(
                "select session_id from callq_sessions \
                 where cluster = $1 and record->>'life' <> 'open' \
                 and (record->>'used_ms')::bigint < $2 limit $3",
                &[&self.cluster, &before_ms, &limit],
            ),
        ))?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    fn put_delayed(&mut self, calls: &[Delayed]) -> Result<(), Error> {
        let ids: Vec<Uuid> = calls.iter().map(|d| d.call_id).collect();
        let due: Vec<i64> = calls.iter().map(|d| d.due_ms).collect();
        let services: Vec<&str> = calls.iter().map(|d| d.service.as_str()).collect();
        let bodies: Vec<&str> = calls.iter().map(|d| d.body.as_str()).collect();
        let attempts: Vec<i32> = calls
            .iter()
            .map(|d| i32::try_from(d.attempt).unwrap_or(i32::MAX))
            .collect();
        self.block(bounded(
            "holding delayed calls",
            self.client.execute(
                "insert into callq_delayed (cluster, call_id, due_ms, service, body, attempt) \
                 select $1, * from unnest($2::uuid[], $3::bigint[], $4::text[], $5::text[], \
                 $6::integer[]) \
                 on conflict (cluster, call_id) do update \
                 set due_ms = excluded.due_ms, service = excluded.service, body = excluded.body, \
                 attempt = excluded.attempt",
                &[&self.cluster, &ids, &due, &services, &bodies, &attempts],
            ),
        ))?;
        Ok(())
    }

    fn due_delayed(&self, before_ms: i64, max: usize) -> Result<Vec<Delayed>, Error> {
        self.held_where(
            "reading due delayed calls",
            "due_ms < $2 order by due_ms, call_id",
            before_ms,
            max,
        )
    }

    fn parked_delayed(&self, max: usize) -> Result<Vec<Delayed>, Error> {
        self.held_where(
            "reading calls waiting for a place of their key",
            "due_ms >= $2",
            crate::store::PARKED,
            max,
        )
    }

    fn get_delayed(&self, call_id: Uuid) -> Result<Option<Delayed>, Error> {
        let row = self.block(bounded(
            "reading a delayed call",
            self.client.query_opt(
                "select due_ms, service, body, attempt from callq_delayed \
                 where cluster = $1 and call_id = $2",
                &[&self.cluster, &call_id],
            ),
        ))?;
        Ok(row.map(|r| Delayed {
            call_id,
            due_ms: r.get(0),
            service: r.get(1),
            body: r.get(2),
            attempt: u32::try_from(r.get::<_, i32>(3)).unwrap_or(2),
        }))
    }

    fn forget_delayed(&mut self, call_ids: &[Uuid]) -> Result<(), Error> {
        self.block(bounded(
            "forgetting published delayed calls",
            self.client.execute(
                "delete from callq_delayed where cluster = $1 and call_id = any($2)",
                &[&self.cluster, &call_ids],
            ),
        ))?;
        Ok(())
    }

    fn delayed_count(&self) -> Result<u64, Error> {
        let row = self.block(bounded(
            "counting delayed calls",
            self.client.query_one(
                "select count(*) from callq_delayed where cluster = $1",
                &[&self.cluster],
            ),
        ))?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    fn forget_sessions(&mut self, ids: &[String]) -> Result<(), Error> {
        // Only tombstones go, whoever leads: nothing live is at stake.
        self.block(bounded(
            "forgetting ended sessions",
            self.client.execute(
                "delete from callq_sessions where cluster = $1 \
                 and session_id = any($2) and record->>'life' <> 'open'",
                &[&self.cluster, &ids],
            ),
        ))?;
        Ok(())
    }

    fn put_all(
        &mut self,
        records: &[(Uuid, &CallRecord)],
        sessions: &[(&str, &SessionRecord)],
    ) -> Result<(), Error> {
        let session_ids: Vec<&str> = sessions.iter().map(|(id, _)| *id).collect();
        let session_bodies = sessions
            .iter()
            .map(|(_, s)| serde_json::to_value(s).map_err(pg_err))
            .collect::<Result<Vec<Value>, Error>>()?;
        let mut ids = Vec::with_capacity(records.len());
        let mut open = Vec::with_capacity(records.len());
        let mut bodies = Vec::with_capacity(records.len());
        for (id, r) in records {
            ids.push(*id);
            open.push(matches!(r.state, CallState::Open));
            bodies.push(serde_json::to_value(r).map_err(pg_err)?);
        }
        let started = Instant::now();
        let handle = self.handle.clone();
        let (cluster, epoch, lease) = (self.cluster.as_str(), self.epoch, self.lease);
        let client = &mut self.client;
        let written = tokio::task::block_in_place(|| {
            handle.block_on(async {
                let tx = bounded("beginning", client.transaction()).await?;
                // The fence: the lease row of this epoch, locked for the
                // transaction. A newer leader's epoch makes it vanish.
                if !extend(&tx, cluster, epoch, lease).await? {
                    return Ok(false);
                }
                bounded(
                    "writing calls",
                    tx.execute(
                        "insert into callq_calls (cluster, call_id, open, record, epoch, decided_at) \
                         select $1::text, u.id, u.o, u.r, $5::bigint, \
                         case when u.o then null else now() end \
                         from unnest($2::uuid[], $3::bool[], $4::jsonb[]) as u(id, o, r) \
                         on conflict (cluster, call_id) do update \
                         set open = excluded.open, record = excluded.record, epoch = excluded.epoch, \
                         decided_at = case when excluded.open then null \
                         else coalesce(callq_calls.decided_at, now()) end",
                        &[&cluster, &ids, &open, &bodies, &epoch],
                    ),
                )
                .await?;
                if !session_ids.is_empty() {
                    bounded(
                        "writing sessions",
                        tx.execute(
                            "insert into callq_sessions (cluster, session_id, record) \
                             select $1::text, u.id, u.r \
                             from unnest($2::text[], $3::jsonb[]) as u(id, r) \
                             on conflict (cluster, session_id) do update set record = excluded.record",
                            &[&cluster, &session_ids, &session_bodies],
                        ),
                    )
                    .await?;
                }
                bounded("committing", tx.commit()).await?;
                Ok::<_, Error>(true)
            })
        })?;
        if !written {
            return Err(self.fenced());
        }
        self.renewed = started;
        Ok(())
    }

    fn forget_decided(&mut self, before_ms: i64, max: usize) -> Result<usize, Error> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        // Records decided before the column existed count from now: a batch
        // of them is dated each time (none are left after the first sweeps).
        self.block(bounded(
            "dating decided calls",
            self.client.execute(
                "update callq_calls set decided_at = now() where cluster = $1 and call_id in \
                 (select call_id from callq_calls where cluster = $1 and not open \
                 and decided_at is null limit $2)",
                &[&self.cluster, &limit],
            ),
        ))?;
        let deleted = self.block(bounded(
            "forgetting decided calls",
            self.client.execute(
                "delete from callq_calls where cluster = $1 and call_id in \
                 (select call_id from callq_calls where cluster = $1 and not open \
                 and decided_at < to_timestamp($2::bigint / 1000.0) limit $3)",
                &[&self.cluster, &before_ms, &limit],
            ),
        ))?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    fn open_calls(&self) -> Result<Vec<(Uuid, CallRecord)>, Error> {
        let rows = self.block(bounded(
            "reading the open calls",
            self.client.query(
                "select call_id, record from callq_calls where cluster = $1 and open",
                &[&self.cluster],
            ),
        ))?;
        rows.into_iter()
            .map(|r| {
                let id: Uuid = r.get(0);
                let record: Value = r.get(1);
                serde_json::from_value::<CallRecord>(record)
                    .map(|rec| (id, rec))
                    .map_err(|e| Error::Corrupt(e.to_string()))
            })
            .collect()
    }

    fn renew(&mut self) -> Result<(), Error> {
        if self.renewed.elapsed() < self.lease / 4 {
            return Ok(());
        }
        let started = Instant::now();
        match self.block(extend(&self.client, &self.cluster, self.epoch, self.lease)) {
            Ok(true) => {
                self.renewed = started;
                Ok(())
            }
            Ok(false) => Err(self.fenced()),
            // Unreachable for longer than the lease: another coordinator
            // may hold it now; stop acting as leader.
            Err(e) if self.renewed.elapsed() >= self.lease => Err(Error::Fenced(format!(
                "the lease could not be renewed within {:?}: {e}",
                self.lease
            ))),
            Err(e) => {
                warn!("renewing the coordinator lease: {e}; trying again");
                Ok(())
            }
        }
    }
}
