//! The ledger driven by random schedules of what workers and the broker do
//! to one call (deliveries and redeliveries, `resume`, traces, completions,
//! worker deaths, the coordinator restarting on its store), checked against
//! invariants kept by this test's own bookkeeping, not the ledger's:
//!
//! - one decision per call: at most one completion accepted, never both an
//!   accepted completion and a `fatal` answer;
//! - no trace granted after the call is decided, nor to a delivery whose
//!   worker the coordinator declared dead;
//! - `fatal` only for a call one of whose attempts was granted a trace;
//! - a re-issued copy carries an attempt above every one issued before.
//!
//! Every request is committed before its answer counts (as the coordinator
//! answers only after its group commit), and effects come only from a
//! commit.
#![allow(clippy::unwrap_used, missing_docs)]

use callq_coordinator::{Effect, InFlight, Ledger, RedbStore};
use callq_schemas::Reply;
use callq_schemas::protocol::{CompleteDecision, Lease, ResumeDecision, TraceDecision};
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

const WORKERS: u8 = 3;

#[derive(Debug, Clone)]
enum Op {
    /// A worker takes the next copy waiting in the queue.
    Deliver(u8),
    /// The n-th delivery held asks for the trace `mail.sent`.
    Trace(usize),
    /// The n-th delivery held completes.
    Complete(usize),
    /// The coordinator declares a worker dead, though it may live on (cut
    /// off, paused) and speak later.
    Kill(u8),
    /// A worker's connection closes: the broker returns what it held.
    Disconnect(u8),
    /// The coordinator restarts on its store.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..WORKERS).prop_map(Op::Deliver),
        3 => (0usize..4).prop_map(Op::Trace),
        3 => (0usize..4).prop_map(Op::Complete),
        2 => (0..WORKERS).prop_map(Op::Kill),
        2 => (0..WORKERS).prop_map(Op::Disconnect),
        1 => Just(Op::Restart),
    ]
}

/// A delivery a worker holds, and what it runs as.
#[derive(Debug, Clone)]
struct Held {
    worker: u8,
    lease: Lease,
    attempt: u32,
}

/// What the test knows, independently of the ledger.
struct World {
    dir: std::path::PathBuf,
    ledger: Ledger<RedbStore>,
    call_id: Uuid,
    /// Copies waiting in the queue: (attempt header, delivered before).
    queue: Vec<(u32, bool)>,
    held: Vec<Held>,
    /// Leases of deliveries whose worker was declared dead.
    dead: Vec<Uuid>,
    /// The attempt whose completion was accepted.
    accepted: Option<u32>,
    fatal: bool,
    granted: bool,
    highest_issued: u32,
}

impl World {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("callq-model-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ledger = Ledger::open(RedbStore::open(dir.join("l.redb")).unwrap()).unwrap();
        Self {
            dir,
            ledger,
            call_id: Uuid::now_v7(),
            queue: vec![(1, false)],
            held: Vec::new(),
            dead: Vec::new(),
            accepted: None,
            fatal: false,
            granted: false,
            highest_issued: 1,
        }
    }

    fn decided(&self) -> bool {
        self.accepted.is_some() || self.fatal
    }

    /// Commits; checks and applies the effects.
    fn commit(&mut self) -> Result<(), TestCaseError> {
        for effect in self.ledger.commit().unwrap() {
            match effect {
                Effect::Reissue { attempt, .. } => {
                    prop_assert!(
                        attempt > self.highest_issued,
                        "re-issued as attempt {attempt}, not above {}",
                        self.highest_issued
                    );
                    self.highest_issued = attempt;
                    self.queue.push((attempt, false));
                }
                Effect::AnswerFatal { reply, .. } => {
                    prop_assert!(self.granted, "fatal without a granted trace: {reply:?}");
                    prop_assert!(
                        self.accepted.is_none(),
                        "fatal after an accepted completion"
                    );
                    self.fatal = true;
                }
                Effect::SessionChanged { .. } | Effect::Answer { .. } => {}
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Deliver(worker) => self.deliver(worker)?,
            Op::Trace(n) if n < self.held.len() => self.trace(n)?,
            Op::Complete(n) if n < self.held.len() => self.complete(n)?,
            Op::Kill(worker) => self.kill(worker),
            Op::Disconnect(worker) => {
                let (gone, kept): (Vec<Held>, Vec<Held>) =
                    self.held.drain(..).partition(|h| h.worker == worker);
                self.held = kept;
                self.queue.extend(gone.iter().map(|h| (h.lease.copy, true)));
            }
            Op::Restart => {
                self.ledger.commit().unwrap();
                let path = self.dir.join("l.redb");
                let fresh = Ledger::open(RedbStore::open(self.dir.join("other.redb")).unwrap());
                // The old ledger lets go of its file before the new one
                // opens it.
                drop(std::mem::replace(&mut self.ledger, fresh.unwrap()));
                self.ledger = Ledger::open(RedbStore::open(path).unwrap()).unwrap();
            }
            Op::Trace(_) | Op::Complete(_) => {}
        }
        self.commit()
    }

    fn deliver(&mut self, worker: u8) -> Result<(), TestCaseError> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let (copy, redelivered) = self.queue.remove(0);
        let lease = Lease {
            call_id: self.call_id,
            copy,
            token: Uuid::now_v7(),
        };
        // The first delivery of the first copy runs on the fast path.
        if copy == 1 && !redelivered {
            self.held.push(Held {
                worker,
                lease,
                attempt: 1,
            });
            return Ok(());
        }
        let decision = self
            .ledger
            .resume(lease, &worker.to_string(), "mail", Some("callq.reply.c"))
            .unwrap();
        self.commit()?;
        match decision {
            ResumeDecision::Run { attempt } => {
                prop_assert!(!self.decided(), "a decided call runs again as {attempt}");
                self.highest_issued = self.highest_issued.max(attempt);
                self.held.push(Held {
                    worker,
                    lease,
                    attempt,
                });
            }
            ResumeDecision::Done { .. } => prop_assert!(
                self.accepted.is_some(),
                "done, but no completion was accepted"
            ),
            ResumeDecision::Fatal { .. } => {
                prop_assert!(self.fatal, "fatal, but none was answered")
            }
            ResumeDecision::Superseded { .. }
            | ResumeDecision::Refused { .. }
            | ResumeDecision::Follow { .. } => {}
        }
        Ok(())
    }

    fn trace(&mut self, n: usize) -> Result<(), TestCaseError> {
        let h = self.held[n].clone();
        let decision = self
            .ledger
            .trace(
                h.lease,
                h.attempt,
                &h.worker.to_string(),
                "mail.sent",
                "mail",
                Some("callq.reply.c"),
                None,
                0,
            )
            .unwrap();
        self.commit()?;
        match decision {
            TraceDecision::Granted => {
                prop_assert!(!self.decided(), "a trace granted to a decided call");
                prop_assert!(
                    !self.dead.contains(&h.lease.token),
                    "a trace granted to a dead worker's delivery"
                );
                self.granted = true;
            }
            // The handler aborts: a spare delivery is acked, a lone one
            // goes back to the queue.
            TraceDecision::Refused { superseded, .. } => self.drop_held(n, !superseded),
            TraceDecision::SessionRefused { .. } => {}
        }
        Ok(())
    }

    fn complete(&mut self, n: usize) -> Result<(), TestCaseError> {
        let h = self.held[n].clone();
        let reply = Reply::ok(self.call_id, h.attempt, json!({"sent": true}));
        let decision = self
            .ledger
            .complete(h.lease, h.attempt, Some(reply), None, 0)
            .unwrap();
        self.commit()?;
        match decision {
            CompleteDecision::Accepted => {
                // A fast-path call that never left a record completes
                // without the ledger: only a recorded call is decided here.
                if self.ledger.record(self.call_id).unwrap().is_some() {
                    prop_assert!(!self.fatal, "accepted after fatal");
                    if let Some(first) = self.accepted {
                        prop_assert_eq!(first, h.attempt, "two attempts accepted");
                    }
                    self.accepted = Some(h.attempt);
                }
                self.drop_held(n, false);
            }
            CompleteDecision::Fatal { .. } => {
                prop_assert!(self.fatal, "told fatal, but none was answered");
                self.drop_held(n, false);
            }
            CompleteDecision::Refused { superseded, .. } => self.drop_held(n, !superseded),
            CompleteDecision::SessionRefused { .. } => {}
        }
        Ok(())
    }

    /// The coordinator declares `worker` dead, with the deliveries its
    /// heartbeats reported; the worker keeps them (it may be alive).
    fn kill(&mut self, worker: u8) {
        let lost: Vec<Held> = self
            .held
            .iter()
            .filter(|h| h.worker == worker && !self.dead.contains(&h.lease.token))
            .cloned()
            .collect();
        if lost.is_empty() {
            return;
        }
        let in_flight: Vec<InFlight> = lost
            .iter()
            .map(|h| InFlight {
                lease: h.lease,
                service: "mail".into(),
                reply_to: Some("callq.reply.c".into()),
                body: Some(b"{}".to_vec()),
            })
            .collect();
        self.ledger
            .worker_lost(&worker.to_string(), &in_flight)
            .unwrap();
        self.dead.extend(lost.iter().map(|h| h.lease.token));
    }

    /// The n-th delivery ends; `back`: it returns to the queue.
    fn drop_held(&mut self, n: usize, back: bool) {
        let h = self.held.remove(n);
        if back {
            self.queue.push((h.lease.copy, true));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_ledger_keeps_its_invariants_under_any_schedule(ops in prop::collection::vec(op(), 1..40)) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op)?;
        }
    }
}
