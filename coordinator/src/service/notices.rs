//! Session notices: which workers read each session since it last changed,
//! and the `session_changed` notices they get when it changes again.
//!
//! The notices are hints that save a worker's next read the data; a worker
//! checks the session's version with every call anyway.

use std::collections::{HashMap, HashSet};

use callq_schemas::protocol::{Answer, AnswerBody};

use super::Outbox;
use super::registry::Registry;
use crate::Effect;

/// Sessions whose readers are tracked, at most; past that the tracking
/// starts afresh (workers validate their cache on every call anyway).
const SESSIONS_TRACKED: usize = 100_000;

/// The workers that read each session since it last changed.
#[derive(Debug, Default)]
pub(super) struct Notices {
    readers: HashMap<String, HashSet<String>>,
}

impl Notices {
    /// `worker` read the session: it hears of its next change.
    pub(super) fn read(&mut self, session_id: String, worker: &str) {
        if self.readers.len() >= SESSIONS_TRACKED {
            self.readers.clear();
        }
        self.readers
            .entry(session_id)
            .or_default()
            .insert(worker.to_owned());
    }

    /// A worker that left or died caches no session any more.
    pub(super) fn forget_reader(&mut self, worker: &str) {
        self.readers.retain(|_, readers| {
            readers.remove(worker);
            !readers.is_empty()
        });
    }

    /// Takes the session changes out of `effects`: each changed session's
    /// readers (those still registered) get a notice, and are forgotten
    /// until they read it again. Returns the notices to send.
    pub(super) fn take_changes(
        &mut self,
        effects: &mut Vec<Effect>,
        registry: &Registry,
    ) -> Outbox {
        let mut notices = Vec::new();
        effects.retain(|e| {
            let Effect::SessionChanged {
                session_id,
                version,
            } = e
            else {
                return true;
            };
            for reader in self.readers.remove(session_id).unwrap_or_default() {
                if let Some(queue) = registry.queue_of(&reader) {
                    let body = AnswerBody::SessionChanged {
                        session_id: session_id.clone(),
                        version: *version,
                    };
                    notices.push((queue.to_owned(), Answer::new(body)));
                }
            }
            false
        });
        notices
    }
}
