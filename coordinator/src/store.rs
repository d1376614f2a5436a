//! Durable stores of the call ledger.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use uuid::Uuid;

use crate::{CallRecord, CallState, Error, SessionRecord};

/// Where the ledger keeps its records.
///
/// Guarantee: when [`Store::put_all`] returns `Ok`, every record of the
/// batch is durable (it survives a crash of the process and of the machine),
/// and the batch was written atomically: all or nothing.
pub trait Store: Send + Sync {
    /// One record, if the call is known.
    fn get(&self, call_id: Uuid) -> Result<Option<CallRecord>, Error>;
    /// One session, if it was ever written.
    fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>, Error>;
    /// Live sessions last used before `before_ms`, at most `max`: the
    /// candidates of the expiry sweep.
    fn idle_sessions(
        &self,
        before_ms: i64,
        max: usize,
    ) -> Result<Vec<(String, SessionRecord)>, Error>;
    /// Ended sessions (expired or closed) last used before `before_ms`, at
    /// most `max`: the tombstones the sweep forgets.
    fn ended_sessions(&self, before_ms: i64, max: usize) -> Result<Vec<String>, Error>;
    /// Deletes ended sessions for good (a live one named here stays).
    fn forget_sessions(&mut self, ids: &[String]) -> Result<(), Error>;
    /// Writes a batch of call records and sessions in one durable, atomic
    /// transaction.
    fn put_all(
        &mut self,
        records: &[(Uuid, &CallRecord)],
        sessions: &[(&str, &SessionRecord)],
    ) -> Result<(), Error>;
    /// Every record whose call is not yet decided, for a coordinator that
    /// starts (or takes over) to rebuild its memory.
    fn open_calls(&self) -> Result<Vec<(Uuid, CallRecord)>, Error>;

    /// Deletes up to `max` records of calls decided before `before_ms`
    /// (milliseconds since the Unix epoch, by the store's clock: a record's
    /// decision time is when the store first wrote it decided); returns how
    /// many. Open calls are never deleted.
    fn forget_decided(&mut self, before_ms: i64, max: usize) -> Result<usize, Error>;

    /// Holds calls until they are due, durably; a call held already is
    /// replaced (a worker that asks again after a lost answer).
    fn put_delayed(&mut self, calls: &[Delayed]) -> Result<(), Error>;
    /// Calls due before `before_ms`, the earliest first, at most `max`.
    fn due_delayed(&self, before_ms: i64, max: usize) -> Result<Vec<Delayed>, Error>;
    /// Calls held with no due time ([`PARKED`]: waiting for a place of
    /// their concurrency key), at most `max`, in no particular order.
    fn parked_delayed(&self, max: usize) -> Result<Vec<Delayed>, Error>;
    /// A held call, if it is held.
    fn get_delayed(&self, call_id: Uuid) -> Result<Option<Delayed>, Error>;
    /// Lets go of calls that were published.
    fn forget_delayed(&mut self, call_ids: &[Uuid]) -> Result<(), Error>;
    /// How many calls are held.
    fn delayed_count(&self) -> Result<u64, Error>;

    /// Keeps this coordinator's right to write, where the store grants it
    /// by a lease ([`Error::Fenced`] once it is lost). Called every tick.
    fn renew(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Gives the lease up at once, for a coordinator that stops: a standby
    /// takes over without waiting for it to run out. Best effort.
    fn release(&mut self) {}
    /// The epoch of this coordinator's leadership, where the store grants
    /// it by a lease; stamped on every answer and order, so that workers
    /// can drop the orders of a coordinator that no longer leads.
    fn epoch(&self) -> Option<u64> {
        None
    }

    /// The store's size on disk in bytes, where it is one file of its own
    /// (the embedded store); `None` otherwise.
    fn size_bytes(&self) -> Option<u64> {
        None
    }
}

/// The due time of a call held with no due time: one waiting for a place
/// of its concurrency key, published when a place is free.
pub(crate) const PARKED: i64 = i64::MAX;

/// A call held until it is due (its `not_before`), then published again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delayed {
    /// The call.
    pub call_id: Uuid,
    /// When it is due, in milliseconds since the Unix epoch.
    pub due_ms: i64,
    /// The service whose queue gets it.
    pub service: String,
    /// Its body, as delivered.
    pub body: String,
    /// The attempt it is published as: 2 for a call that came early (its
    /// first attempt never ran), the next one for a retry.
    #[serde(default = "second_attempt")]
    pub attempt: u32,
}

fn second_attempt() -> u32 {
    2
}

const CALLS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("calls");
/// Delayed calls by id, and by (due, id).
const DELAYED: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("delayed_calls");
const DELAYED_DUE: TableDefinition<'_, (u64, u128), ()> = TableDefinition::new("delayed_due");
const OPEN: TableDefinition<'_, u128, ()> = TableDefinition::new("open_calls");
const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
/// Decided calls by the time they were first written decided (ms since
/// the Unix epoch), for their deletion after the retention.
const DECIDED: TableDefinition<'_, (u64, u128), ()> = TableDefinition::new("decided_calls");

/// The due-time index key of `ms` (a time before the epoch sorts first).
impl RedbStore {
    /// Held calls whose (due, id) falls in `range`, in that order, at most
    /// `max`.
    fn held_in(
        &self,
        range: impl std::ops::RangeBounds<(u64, u128)>,
        max: usize,
    ) -> Result<Vec<Delayed>, Error> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let held = tx.open_table(DELAYED).map_err(store_err)?;
        let due = tx.open_table(DELAYED_DUE).map_err(store_err)?;
        let mut out = Vec::new();
        for entry in due.range(range).map_err(store_err)?.take(max) {
            let (key, _) = entry.map_err(store_err)?;
            if let Some(bytes) = held.get(key.value().1).map_err(store_err)? {
                out.push(
                    serde_json::from_slice(bytes.value())
                        .map_err(|e| Error::Corrupt(e.to_string()))?,
                );
            }
        }
        Ok(out)
    }
}

fn due_key(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

/// Now, in milliseconds since the Unix epoch, by this host's clock.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The embedded store (redb): one file, one write transaction per batch,
/// fsynced before it returns.
pub struct RedbStore {
    db: Database,
    path: std::path::PathBuf,
}

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

impl RedbStore {
    /// Opens the store at `path`, creating it when missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let shown = path.as_ref().display();
        let db = Database::create(path.as_ref()).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::StoreInUse(shown.to_string()),
            e => Error::Store(format!("opening {shown}: {e}")),
        })?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(CALLS).map_err(store_err)?;
        tx.open_table(OPEN).map_err(store_err)?;
        tx.open_table(SESSIONS).map_err(store_err)?;
        tx.open_table(DECIDED).map_err(store_err)?;
        tx.open_table(DELAYED).map_err(store_err)?;
        tx.open_table(DELAYED_DUE).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(Self {
            db,
            path: path.as_ref().to_owned(),
        })
    }
}

impl RedbStore {
    /// Up to `max` sessions that `keep` accepts, in key order.
    fn scan_sessions(
        &self,
        max: usize,
        keep: impl Fn(&SessionRecord) -> bool,
    ) -> Result<Vec<(String, SessionRecord)>, Error> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(SESSIONS).map_err(store_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(store_err)? {
            if out.len() >= max {
                break;
            }
            let (id, bytes) = entry.map_err(store_err)?;
            let record: SessionRecord =
                serde_json::from_slice(bytes.value()).map_err(|e| Error::Corrupt(e.to_string()))?;
            if keep(&record) {
                out.push((id.value().to_owned(), record));
            }
        }
        Ok(out)
    }
}

fn decode(bytes: &[u8]) -> Result<CallRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(e.to_string()))
}

impl Store for RedbStore {
    fn size_bytes(&self) -> Option<u64> {
        std::fs::metadata(&self.path).ok().map(|m| m.len())
    }

    fn get(&self, call_id: Uuid) -> Result<Option<CallRecord>, Error> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(CALLS).map_err(store_err)?;
        let found = table.get(call_id.as_u128()).map_err(store_err)?;
        found.map(|v| decode(v.value())).transpose()
    }

    fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>, Error> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(SESSIONS).map_err(store_err)?;
        let found = table.get(session_id).map_err(store_err)?;
        found
            .map(|v| serde_json::from_slice(v.value()).map_err(|e| Error::Corrupt(e.to_string())))
            .transpose()
    }

    fn idle_sessions(
        &self,
        before_ms: i64,
        max: usize,
    ) -> Result<Vec<(String, SessionRecord)>, Error> {
        self.scan_sessions(max, |r| r.idle_since(before_ms))
    }

    fn ended_sessions(&self, before_ms: i64, max: usize) -> Result<Vec<String>, Error> {
        let found = self.scan_sessions(max, |r| r.ended_before(before_ms))?;
        Ok(found.into_iter().map(|(id, _)| id).collect())
    }

    fn forget_sessions(&mut self, ids: &[String]) -> Result<(), Error> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(SESSIONS).map_err(store_err)?;
            for id in ids {
                let ended = match table.get(id.as_str()).map_err(store_err)? {
                    Some(bytes) => serde_json::from_slice::<SessionRecord>(bytes.value())
                        .map_err(|e| Error::Corrupt(e.to_string()))?
                        .ended_before(i64::MAX),
                    None => false,
                };
                if ended {
                    table.remove(id.as_str()).map_err(store_err)?;
                }
            }
        }
        tx.commit().map_err(store_err)
    }

    fn put_all(
        &mut self,
        records: &[(Uuid, &CallRecord)],
        sessions: &[(&str, &SessionRecord)],
    ) -> Result<(), Error> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(SESSIONS).map_err(store_err)?;
            for (id, session) in sessions {
                let bytes = serde_json::to_vec(session).map_err(store_err)?;
                table.insert(*id, bytes.as_slice()).map_err(store_err)?;
            }
            let mut calls = tx.open_table(CALLS).map_err(store_err)?;
            let mut open = tx.open_table(OPEN).map_err(store_err)?;
            let mut decided = tx.open_table(DECIDED).map_err(store_err)?;
            let now = u64::try_from(now_ms()).unwrap_or(0);
            for (id, record) in records {
                let bytes = serde_json::to_vec(record).map_err(store_err)?;
                let existed = calls
                    .insert(id.as_u128(), bytes.as_slice())
                    .map_err(store_err)?
                    .is_some();
                if matches!(record.state, CallState::Open) {
                    open.insert(id.as_u128(), ()).map_err(store_err)?;
                } else {
                    let was_open = open.remove(id.as_u128()).map_err(store_err)?.is_some();
                    // Timed from its first decided write only: a record new
                    // here, or open until now (the open table says which,
                    // without decoding the old record).
                    if !existed || was_open {
                        decided.insert((now, id.as_u128()), ()).map_err(store_err)?;
                    }
                }
            }
        }
        tx.commit().map_err(store_err)
    }

    fn forget_decided(&mut self, before_ms: i64, max: usize) -> Result<usize, Error> {
        let before = u64::try_from(before_ms).unwrap_or(0);
        let tx = self.db.begin_write().map_err(store_err)?;
        let mut forgotten = 0;
        {
            let mut decided = tx.open_table(DECIDED).map_err(store_err)?;
            let mut calls = tx.open_table(CALLS).map_err(store_err)?;
            let due: Vec<(u64, u128)> = decided
                .range(..(before, 0))
                .map_err(store_err)?
                .take(max)
                .map(|entry| entry.map(|(k, _)| k.value()).map_err(store_err))
                .collect::<Result<_, _>>()?;
            for key in due {
                decided.remove(key).map_err(store_err)?;
                let still_decided = calls
                    .get(key.1)
                    .map_err(store_err)?
                    .map(|b| decode(b.value()))
                    .transpose()?
                    .is_some_and(|r| !matches!(r.state, CallState::Open));
                if still_decided {
                    calls.remove(key.1).map_err(store_err)?;
                    forgotten += 1;
                }
            }
        }
        tx.commit().map_err(store_err)?;
        Ok(forgotten)
    }

    fn put_delayed(&mut self, calls: &[Delayed]) -> Result<(), Error> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut held = tx.open_table(DELAYED).map_err(store_err)?;
            let mut due = tx.open_table(DELAYED_DUE).map_err(store_err)?;
            for d in calls {
                let bytes = serde_json::to_vec(d).map_err(store_err)?;
                let id = d.call_id.as_u128();
                if let Some(old) = held.insert(id, bytes.as_slice()).map_err(store_err)? {
                    let old: Delayed = serde_json::from_slice(old.value())
                        .map_err(|e| Error::Corrupt(e.to_string()))?;
                    due.remove((due_key(old.due_ms), id)).map_err(store_err)?;
                }
                due.insert((due_key(d.due_ms), id), ()).map_err(store_err)?;
            }
        }
        tx.commit().map_err(store_err)
    }

    fn due_delayed(&self, before_ms: i64, max: usize) -> Result<Vec<Delayed>, Error> {
        self.held_in(..(due_key(before_ms), 0), max)
    }

    fn parked_delayed(&self, max: usize) -> Result<Vec<Delayed>, Error> {
        self.held_in((due_key(PARKED), 0).., max)
    }

    fn get_delayed(&self, call_id: Uuid) -> Result<Option<Delayed>, Error> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let held = tx.open_table(DELAYED).map_err(store_err)?;
        held.get(call_id.as_u128())
            .map_err(store_err)?
            .map(|b| serde_json::from_slice(b.value()).map_err(|e| Error::Corrupt(e.to_string())))
            .transpose()
    }

    fn forget_delayed(&mut self, call_ids: &[Uuid]) -> Result<(), Error> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut held = tx.open_table(DELAYED).map_err(store_err)?;
            let mut due = tx.open_table(DELAYED_DUE).map_err(store_err)?;
            for id in call_ids {
                if let Some(old) = held.remove(id.as_u128()).map_err(store_err)? {
                    let old: Delayed = serde_json::from_slice(old.value())
                        .map_err(|e| Error::Corrupt(e.to_string()))?;
                    due.remove((due_key(old.due_ms), id.as_u128()))
                        .map_err(store_err)?;
                }
            }
        }
        tx.commit().map_err(store_err)
    }

    fn delayed_count(&self) -> Result<u64, Error> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let held = tx.open_table(DELAYED).map_err(store_err)?;
        redb::ReadableTableMetadata::len(&held).map_err(store_err)
    }

    fn open_calls(&self) -> Result<Vec<(Uuid, CallRecord)>, Error> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let calls = tx.open_table(CALLS).map_err(store_err)?;
        let open = tx.open_table(OPEN).map_err(store_err)?;
        let mut out = Vec::new();
        for entry in open.iter().map_err(store_err)? {
            let (id, _) = entry.map_err(store_err)?;
            let id = id.value();
            if let Some(bytes) = calls.get(id).map_err(store_err)? {
                out.push((Uuid::from_u128(id), decode(bytes.value())?));
            }
        }
        Ok(out)
    }
}

/// A store in memory, for tests: durable for as long as the value lives.
/// It counts its transactions and can be told to fail the next one.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: HashMap<Uuid, CallRecord>,
    /// When each decided call was first written decided.
    decided_at: HashMap<Uuid, i64>,
    sessions: HashMap<String, SessionRecord>,
    delayed: HashMap<Uuid, Delayed>,
    /// Transactions committed so far.
    pub transactions: usize,
    /// When set, the next `put_all` or `put_delayed` fails (and the flag
    /// clears).
    pub fail_next: bool,
}

impl Store for MemoryStore {
    fn get(&self, call_id: Uuid) -> Result<Option<CallRecord>, Error> {
        Ok(self.records.get(&call_id).cloned())
    }

    fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>, Error> {
        Ok(self.sessions.get(session_id).cloned())
    }

    fn idle_sessions(
        &self,
        before_ms: i64,
        max: usize,
    ) -> Result<Vec<(String, SessionRecord)>, Error> {
        Ok(self
            .sessions
            .iter()
            .filter(|(_, r)| r.idle_since(before_ms))
            .take(max)
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect())
    }

    fn ended_sessions(&self, before_ms: i64, max: usize) -> Result<Vec<String>, Error> {
        Ok(self
            .sessions
            .iter()
            .filter(|(_, r)| r.ended_before(before_ms))
            .take(max)
            .map(|(id, _)| id.clone())
            .collect())
    }

    fn forget_sessions(&mut self, ids: &[String]) -> Result<(), Error> {
        for id in ids {
            if self
                .sessions
                .get(id)
                .is_some_and(|r| r.ended_before(i64::MAX))
            {
                self.sessions.remove(id);
            }
        }
        Ok(())
    }

    fn put_all(
        &mut self,
        records: &[(Uuid, &CallRecord)],
        sessions: &[(&str, &SessionRecord)],
    ) -> Result<(), Error> {
        if std::mem::take(&mut self.fail_next) {
            return Err(Error::Store("injected failure".into()));
        }
        for (id, r) in records {
            if !matches!(r.state, CallState::Open) {
                self.decided_at.entry(*id).or_insert_with(now_ms);
            }
            self.records.insert(*id, (*r).clone());
        }
        for (id, s) in sessions {
            self.sessions.insert((*id).to_owned(), (*s).clone());
        }
        self.transactions += 1;
        Ok(())
    }

    fn forget_decided(&mut self, before_ms: i64, max: usize) -> Result<usize, Error> {
        let due: Vec<Uuid> = self
            .decided_at
            .iter()
            .filter(|(_, at)| **at < before_ms)
            .take(max)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            self.decided_at.remove(id);
            self.records.remove(id);
        }
        Ok(due.len())
    }

    fn put_delayed(&mut self, calls: &[Delayed]) -> Result<(), Error> {
        if std::mem::take(&mut self.fail_next) {
            return Err(Error::Store("injected failure".into()));
        }
        for d in calls {
            self.delayed.insert(d.call_id, d.clone());
        }
        Ok(())
    }

    fn due_delayed(&self, before_ms: i64, max: usize) -> Result<Vec<Delayed>, Error> {
        let mut due: Vec<Delayed> = self
            .delayed
            .values()
            .filter(|d| d.due_ms < before_ms)
            .cloned()
            .collect();
        due.sort_by_key(|d| (d.due_ms, d.call_id));
        due.truncate(max);
        Ok(due)
    }

    fn parked_delayed(&self, max: usize) -> Result<Vec<Delayed>, Error> {
        Ok(self
            .delayed
            .values()
            .filter(|d| d.due_ms == PARKED)
            .take(max)
            .cloned()
            .collect())
    }

    fn get_delayed(&self, call_id: Uuid) -> Result<Option<Delayed>, Error> {
        Ok(self.delayed.get(&call_id).cloned())
    }

    fn forget_delayed(&mut self, call_ids: &[Uuid]) -> Result<(), Error> {
        for id in call_ids {
            self.delayed.remove(id);
        }
        Ok(())
    }

    fn delayed_count(&self) -> Result<u64, Error> {
        Ok(u64::try_from(self.delayed.len()).unwrap_or(u64::MAX))
    }

    fn open_calls(&self) -> Result<Vec<(Uuid, CallRecord)>, Error> {
        Ok(self
            .records
            .iter()
            .filter(|(_, r)| matches!(r.state, CallState::Open))
            .map(|(id, r)| (*id, r.clone()))
            .collect())
    }
}
