//! Session data: kept by the coordinator's store, versioned, cached by
//! workers, read and written by handlers through [`Ctx::session`].
//!
//! A handler's first `ctx.session()` takes the session's lock in this worker
//! (calls of one session run one at a time here) and checks its cached
//! version with the coordinator, which sends the data only when the cache
//! is stale. Reads come from that snapshot; writes are buffered and
//! committed with the call's completion, atomically, as one versioned write.
//! A write made on a version another call has moved since is refused, and
//! the call runs again on the new data (when it left no trace that forbids
//! it). A worker lost before the completion leaves no session data behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use callq_schemas::codes;
use callq_schemas::protocol::{AnswerBody, RequestBody, SessionState, SessionWrite};
use serde_json::{Map, Value};
use tokio::sync::OwnedMutexGuard;
use tracing::warn;

use crate::link::Link;
use crate::{Ctx, HandlerError};

/// Sessions a worker caches at most.
const CACHED: usize = 10_000;

/// A session's data as a worker caches it.
#[derive(Clone)]
struct Cached {
    version: u64,
    data: Arc<Map<String, Value>>,
}

/// The worker's session cache and per-session locks.
#[derive(Default)]
pub(crate) struct SessionCache {
    entries: Mutex<HashMap<String, Cached>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl SessionCache {
    fn get(&self, id: &str) -> Option<Cached> {
        self.entries.lock().ok()?.get(id).cloned()
    }

    fn put(&self, id: &str, cached: Cached) {
        if let Ok(mut e) = self.entries.lock() {
            if e.len() >= CACHED && !e.contains_key(id) {
                // Any one: the coordinator has them all.
                if let Some(k) = e.keys().next().cloned() {
                    e.remove(&k);
                }
            }
            e.insert(id.to_owned(), cached);
        }
    }

    pub(crate) fn forget(&self, id: &str) {
        if let Ok(mut e) = self.entries.lock() {
            e.remove(id);
        }
    }

    /// The coordinator says the session is at `version` now.
    pub(crate) fn changed(&self, id: &str, version: u64) {
        if let Ok(mut e) = self.entries.lock()
            && e.get(id).is_some_and(|c| c.version < version)
        {
            e.remove(id);
        }
    }

    /// Drops every entry (a draining worker hands its sessions back).
    pub(crate) fn clear(&self) {
        if let Ok(mut e) = self.entries.lock() {
            e.clear();
        }
    }

    async fn lock(&self, id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let Ok(mut locks) = self.locks.lock() else {
                return Arc::new(tokio::sync::Mutex::new(())).lock_owned().await;
            };
            // Locks nobody holds or waits for go.
            if locks.len() >= CACHED {
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            locks.entry(id.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// What a call read and wrote of its session.
struct Loaded {
    version: u64,
    data: Arc<Map<String, Value>>,
    writes: Map<String, Value>,
    close: bool,
}

/// One call's access to its session.
pub(crate) struct CallSession {
    id: String,
    cache: Arc<SessionCache>,
    link: Arc<Link>,
    loaded: Mutex<Option<Loaded>>,
    guard: tokio::sync::Mutex<Option<OwnedMutexGuard<()>>>,
}

impl std::fmt::Debug for CallSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSession").field("id", &self.id).finish()
    }
}

fn gone(code: &str, id: &str) -> HandlerError {
    let what = if code == codes::SESSION_CLOSED {
        "was closed"
    } else {
        "expired"
    };
    HandlerError::new(code, format!("session `{id}` {what}: its data is gone"))
}

impl CallSession {
    pub(crate) fn new(id: String, cache: Arc<SessionCache>, link: Arc<Link>) -> Self {
        Self {
            id,
            cache,
            link,
            loaded: Mutex::new(None),
            guard: tokio::sync::Mutex::new(None),
        }
    }

    /// Loads the session, once per run of the handler. `Err(None)`: the
    /// coordinator did not answer.
    async fn load(&self) -> Result<(), Option<HandlerError>> {
        let mut guard = self.guard.lock().await;
        if self.loaded.lock().is_ok_and(|l| l.is_some()) {
            return Ok(());
        }
        if guard.is_none() {
            *guard = Some(self.cache.lock(&self.id).await);
        }
        let cached = self.cache.get(&self.id);
        let asked = self
            .link
            .ask(|req_id| RequestBody::Session {
                req_id,
                session_id: self.id.clone(),
                have: cached.as_ref().map(|c| c.version),
            })
            .await;
        let state = match asked {
            Ok(AnswerBody::Session { state, .. }) => state,
            Ok(other) => {
                warn!(session = %self.id, "unexpected answer to a session read: {other:?}");
                return Err(None);
            }
            Err(e) => {
                warn!(session = %self.id, "the session could not be read: {e}");
                return Err(None);
            }
        };
        let (version, data) = match state {
            SessionState::Open {
                version,
                data: Some(data),
            } => {
                let data = Arc::new(data);
                self.cache.put(
                    &self.id,
                    Cached {
                        version,
                        data: data.clone(),
                    },
                );
                (version, data)
            }
            SessionState::Open {
                version,
                data: None,
            } => match cached {
                Some(c) if c.version == version => (version, c.data),
                _ => {
                    // Moved between the question and the answer: ask again.
                    self.cache.forget(&self.id);
                    drop(guard);
                    return Box::pin(self.load()).await;
                }
            },
            SessionState::Expired => {
                self.cache.forget(&self.id);
                return Err(Some(gone(codes::SESSION_EXPIRED, &self.id)));
            }
            SessionState::Closed => {
                self.cache.forget(&self.id);
                return Err(Some(gone(codes::SESSION_CLOSED, &self.id)));
            }
        };
        if let Ok(mut l) = self.loaded.lock() {
            *l = Some(Loaded {
                version,
                data,
                writes: Map::new(),
                close: false,
            });
        }
        Ok(())
    }

    fn with<T>(&self, f: impl FnOnce(&mut Loaded) -> T) -> Option<T> {
        self.loaded.lock().ok()?.as_mut().map(f)
    }

    /// The write to commit with the completion, if the call wrote anything.
    pub(crate) fn write(&self) -> Option<SessionWrite> {
        self.with(|l| {
            (!l.writes.is_empty() || l.close).then(|| SessionWrite {
                session_id: self.id.clone(),
                base: l.version,
                set: l.writes.clone(),
                close: l.close,
            })
        })
        .flatten()
    }

    /// The write committed: the cache holds the new version.
    pub(crate) fn committed(&self, write: &SessionWrite) {
        if write.close {
            self.cache.forget(&self.id);
            return;
        }
        let data = self.with(|l| {
            let mut data = (*l.data).clone();
            for (k, v) in &write.set {
                if v.is_null() {
                    data.remove(k);
                } else {
                    data.insert(k.clone(), v.clone());
                }
            }
            data
        });
        if let Some(data) = data {
            self.cache.put(
                &self.id,
                Cached {
                    version: write.base + 1,
                    data: Arc::new(data),
                },
            );
        }
    }

    /// The write was refused: the next run reads the session afresh.
    pub(crate) fn reset(&self) {
        self.cache.forget(&self.id);
        if let Ok(mut l) = self.loaded.lock() {
            *l = None;
        }
    }
}

/// A call's session, as its handler sees it: a snapshot read at the call's
/// first `ctx.session()`, and the writes the call made since. Writes become
/// visible to other calls when the call completes.
#[derive(Debug, Clone)]
pub struct Session {
    inner: Arc<CallSession>,
    ctx: Ctx,
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The version read (the completion makes it one more, if the call
    /// writes).
    pub fn version(&self) -> u64 {
        self.inner.with(|l| l.version).unwrap_or(0)
    }

    /// A value, with this call's own writes applied.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.inner
            .with(|l| match l.writes.get(key) {
                Some(Value::Null) => None,
                Some(v) => Some(v.clone()),
                None => l.data.get(key).cloned(),
            })
            .flatten()
    }

    /// Sets a value, committed with the call's completion. A JSON `null`
    /// removes the key.
    pub fn set(&self, key: &str, value: Value) {
        self.inner.with(|l| l.writes.insert(key.to_owned(), value));
    }

    /// Removes a key, with the call's completion.
    pub fn remove(&self, key: &str) {
        self.set(key, Value::Null);
    }

    /// Closes the session with the call's completion: its data goes, and
    /// later calls on it get `session_closed`.
    pub fn close(&self) {
        self.inner.with(|l| l.close = true);
    }

    /// Commits the writes made so far now, before the call completes, so
    /// that other calls see them. This is a trace (`session.flush`): were
    /// the worker lost from here on, the call would end `fatal` instead of
    /// running again. Nothing written, nothing to do. Errors as
    /// [`Ctx::trace`], and `session_conflict` when another call moved the
    /// session since this one read it (nothing is written then).
    pub async fn flush(&self) -> Result<(), HandlerError> {
        let Some(write) = self.inner.write() else {
            return Ok(());
        };
        let Some(standing) = &self.ctx.standing else {
            return Ok(());
        };
        let kind = callq_schemas::protocol::SESSION_FLUSH;
        self.ctx
            .pass(crate::probe::Point::BeforeTrace, Some(kind))
            .await;
        standing.trace_with(kind, Some(write.clone())).await?;
        self.inner.committed(&write);
        self.inner.with(|l| {
            l.version = write.base + 1;
            let mut data = (*l.data).clone();
            for (k, v) in std::mem::take(&mut l.writes) {
                if v.is_null() {
                    data.remove(&k);
                } else {
                    data.insert(k, v);
                }
            }
            l.data = Arc::new(data);
        });
        self.ctx
            .pass(crate::probe::Point::AfterTrace, Some(kind))
            .await;
        Ok(())
    }
}

impl Ctx {
    /// The call's session data. The first call of it in a handler reads
    /// the session (from this worker's cache, once the coordinator confirmed
    /// its version) and holds the session for this call until it completes.
    ///
    /// Errors: `no_session` when the call names no `session_id` or the
    /// worker runs without a coordinator; `session_expired` or
    /// `session_closed` when the session is gone. Return them with `?`. When
    /// the coordinator does not answer, the attempt stops (as a trace that
    /// is not answered does): its call goes back to the queue and runs again.
    pub async fn session(&self) -> Result<Session, HandlerError> {
        let Some(inner) = &self.session else {
            return Err(HandlerError::new(
                codes::NO_SESSION,
                match self.session_id {
                    None => "the call names no session_id".to_owned(),
                    Some(_) => "session data needs a coordinator".to_owned(),
                },
            ));
        };
        match inner.load().await {
            Ok(()) => {}
            Err(Some(gone)) => return Err(gone),
            Err(None) => {
                return Err(match &self.standing {
                    Some(standing) => standing.unreachable(),
                    None => HandlerError::new(codes::NO_SESSION, "no coordinator answered"),
                });
            }
        }
        Ok(Session {
            inner: inner.clone(),
            ctx: self.clone(),
        })
    }
}
