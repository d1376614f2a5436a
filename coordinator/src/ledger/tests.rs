#![allow(clippy::unwrap_used)]

use super::*;
use crate::{MemoryStore, RedbStore};
use callq_schemas::Outcome;
use serde_json::json;

fn lease(call_id: Uuid, copy: u32) -> Lease {
    Lease {
        call_id,
        copy,
        token: Uuid::now_v7(),
    }
}

fn ledger() -> Ledger<MemoryStore> {
    Ledger::open(MemoryStore::default()).unwrap()
}

fn in_flight(l: Lease) -> InFlight {
    InFlight {
        lease: l,
        service: "mail".into(),
        reply_to: Some("callq.reply.c".into()),
        body: Some(b"{\"the\": \"call\"}".to_vec()),
    }
}

const SVC: &str = "mail";
const TO: Option<&str> = Some("callq.reply.c");

#[test]
fn a_dead_worker_s_traceless_call_is_reissued_and_runs_once() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1); // fast path on worker A: the ledger knows it from A's heartbeat only
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    let effects = l.commit().unwrap();
    assert_eq!(
        effects,
        vec![Effect::Reissue {
            call_id: id,
            service: SVC.into(),
            attempt: 2,
            body: b"{\"the\": \"call\"}".to_vec()
        }]
    );
    // The re-issued copy claims attempt 2; the broker's redelivery of the
    // original is superseded; A's late trace is refused.
    let b = lease(id, 2);
    assert_eq!(
        l.resume(b, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    assert_eq!(
        l.resume(lease(id, 1), "C", SVC, TO).unwrap(),
        ResumeDecision::Superseded { attempt: 2 }
    );
    assert!(matches!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Refused { .. }
    ));
    assert_eq!(
        l.trace(b, 2, "B", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    let reply = Reply::ok(id, 2, json!("sent"));
    assert_eq!(
        l.complete(b, 2, Some(reply.clone()), None, 0).unwrap(),
        CompleteDecision::Accepted
    );
    l.commit().unwrap();
    // Any later copy learns it is done and gets the reply to publish again.
    assert_eq!(
        l.resume(lease(id, 1), "D", SVC, TO).unwrap(),
        ResumeDecision::Done { reply: Some(reply) }
    );
    assert_eq!(l.open_calls(), 0);
}

#[test]
fn the_broker_s_redelivery_racing_the_reissue_runs_the_call_once() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    l.commit().unwrap();
    // This time the original's redelivery arrives first and claims attempt 2.
    let c = lease(id, 1);
    assert_eq!(
        l.resume(c, "C", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    assert_eq!(
        l.resume(lease(id, 2), "B", SVC, TO).unwrap(),
        ResumeDecision::Superseded { attempt: 2 }
    );
    // The same delivery asking again gets the same answer.
    assert_eq!(
        l.resume(c, "C", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
}

#[test]
fn a_redelivery_before_the_death_is_noticed_runs_the_next_attempt() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    // A's connection closed; the broker redelivered to B before A's
    // heartbeats stopped counting.
    let b = lease(id, 1);
    assert_eq!(
        l.resume(b, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    l.commit().unwrap();
    // Then A is declared dead with the call still in its last heartbeat:
    // B holds it now, so nothing is re-issued and nothing fails.
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    assert_eq!(l.commit().unwrap(), vec![]);
    assert!(matches!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Refused { .. }
    ));
    assert_eq!(
        l.trace(b, 2, "B", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
}

#[test]
fn a_dead_worker_s_traced_call_fails_once_and_stays_failed() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    assert_eq!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    l.commit().unwrap();
    // The worker asks again (its first answer was lost): granted, and the
    // effect is still listed once.
    assert_eq!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    l.commit().unwrap();
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    let effects = l.commit().unwrap();
    let [Effect::AnswerFatal { reply_to, reply }] = effects.as_slice() else {
        panic!("{effects:?}")
    };
    assert_eq!(reply_to, "callq.reply.c");
    assert_eq!((reply.call_id, reply.outcome), (id, Outcome::Fatal));
    assert_eq!(
        reply.error.as_ref().unwrap().traces,
        vec!["mail.sent".to_string()]
    );
    let message = &reply.error.as_ref().unwrap().message;
    assert!(
        message.starts_with("worker `A` was lost after attempt 1 left traces (mail.sent)"),
        "{message}"
    );
    // Every later copy is told fatal; the hung holder's completion too.
    assert_eq!(
        l.resume(lease(id, 1), "B", SVC, TO).unwrap(),
        ResumeDecision::Fatal {
            reply: reply.clone()
        }
    );
    assert_eq!(
        l.complete(a, 1, None, None, 0).unwrap(),
        CompleteDecision::Fatal {
            reply: reply.clone()
        }
    );
    assert!(matches!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Refused { .. }
    ));
    // Announced once: resuming the failed call queues no second answer.
    assert_eq!(l.commit().unwrap(), vec![]);
}

#[test]
fn a_redelivery_of_a_traced_copy_fails_the_call() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    assert_eq!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    l.commit().unwrap();
    // The broker redelivers A's copy: A's lease is gone, after a trace.
    let ResumeDecision::Fatal { reply } = l.resume(lease(id, 1), "B", SVC, TO).unwrap() else {
        panic!()
    };
    assert_eq!(reply.outcome, Outcome::Fatal);
    assert_eq!(
        l.commit().unwrap(),
        vec![Effect::AnswerFatal {
            reply_to: "callq.reply.c".into(),
            reply
        }]
    );
}

#[test]
fn a_hung_worker_s_late_trace_and_completion_are_refused() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    // A hangs mid-call (no trace yet) and is declared dead.
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    l.commit().unwrap();
    let b = lease(id, 2);
    assert_eq!(
        l.resume(b, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    // A wakes up.
    assert!(matches!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Refused { .. }
    ));
    assert!(matches!(
        l.complete(a, 1, None, None, 0).unwrap(),
        CompleteDecision::Refused { .. }
    ));
    // A stale lease on the current attempt number is refused too.
    let forged = Lease {
        token: Uuid::now_v7(),
        ..b
    };
    assert!(matches!(
        l.trace(forged, 2, "A", "x", SVC, TO, None, 0).unwrap(),
        TraceDecision::Refused { .. }
    ));
    assert_eq!(
        l.complete(b, 2, None, None, 0).unwrap(),
        CompleteDecision::Accepted
    );
}

#[test]
fn a_call_whose_body_is_unknown_waits_for_the_broker_s_redelivery() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let b = lease(id, 1);
    assert_eq!(
        l.resume(b, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    l.commit().unwrap();
    // B dies before any heartbeat carried the call: no body to re-issue.
    l.worker_lost("B", &[]).unwrap();
    assert_eq!(l.commit().unwrap(), vec![]);
    // The broker redelivers the original; it claims the next attempt.
    assert_eq!(
        l.resume(lease(id, 1), "C", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 3 }
    );
}

#[test]
fn first_traces_need_the_original_copy() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    assert!(matches!(
        l.trace(lease(id, 3), 3, "A", "x", SVC, TO, None, 0)
            .unwrap(),
        TraceDecision::Refused { .. }
    ));
    assert_eq!(
        l.complete(lease(id, 1), 1, None, None, 0).unwrap(),
        CompleteDecision::Accepted,
        "fast path: nothing to record"
    );
    assert_eq!(l.record(id).unwrap(), None);
}

#[test]
fn a_batch_of_decisions_is_one_transaction() {
    let mut l = ledger();
    for _ in 0..50 {
        let id = Uuid::now_v7();
        l.trace(lease(id, 1), 1, "A", "x", SVC, TO, None, 0)
            .unwrap();
    }
    l.commit().unwrap();
    assert_eq!(l.store().transactions, 1);
    assert_eq!(l.store().open_calls().unwrap().len(), 50);
    // Nothing changed: no transaction.
    l.commit().unwrap();
    assert_eq!(l.store().transactions, 1);
}

#[test]
fn a_failed_commit_announces_nothing_and_rolls_back() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap();
    l.commit().unwrap();
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    l.store.fail_next = true;
    assert!(l.commit().is_err());
    // The call is open again, as the store has it, and can be decided anew.
    assert_eq!(l.record(id).unwrap().unwrap().state, CallState::Open);
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    assert!(matches!(
        l.commit().unwrap().as_slice(),
        [Effect::AnswerFatal { .. }]
    ));
}

#[test]
fn decisions_survive_a_restart_of_the_coordinator() {
    let dir = std::env::temp_dir().join(format!("callq-ledger-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ledger.redb");
    let (failed, open, done) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (fa, oa) = (lease(failed, 1), lease(open, 1));
    let fatal = {
        let mut l = Ledger::open(RedbStore::open(&path).unwrap()).unwrap();
        l.trace(fa, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap();
        l.trace(oa, 1, "B", "mail.sent", SVC, TO, None, 0).unwrap();
        let d = lease(done, 1);
        l.trace(d, 1, "B", "pg.tx", SVC, TO, None, 0).unwrap();
        l.complete(d, 1, Some(Reply::ok(done, 1, json!(7))), None, 0)
            .unwrap();
        l.worker_lost("A", &[in_flight(fa)]).unwrap();
        let effects = l.commit().unwrap();
        let [Effect::AnswerFatal { reply, .. }] = effects.as_slice() else {
            panic!("{effects:?}")
        };
        reply.clone()
        // The ledger and its file handle are dropped here: the process "dies".
    };
    let mut l = Ledger::open(RedbStore::open(&path).unwrap()).unwrap();
    assert_eq!(
        l.open_calls(),
        1,
        "only the undecided call is read back into memory"
    );
    assert_eq!(
        l.resume(lease(failed, 1), "C", SVC, TO).unwrap(),
        ResumeDecision::Fatal { reply: fatal }
    );
    assert_eq!(
        l.resume(lease(done, 1), "C", SVC, TO).unwrap(),
        ResumeDecision::Done {
            reply: Some(Reply::ok(done, 1, json!(7)))
        }
    );
    // The open call still belongs to B: B's death fails it after the restart.
    l.worker_lost("B", &[]).unwrap();
    assert!(
        matches!(l.commit().unwrap().as_slice(), [Effect::AnswerFatal { reply, .. }] if reply.call_id == open)
    );
    drop(l);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_late_resume_retry_of_a_lease_that_lost_the_call_is_superseded() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    // A resumes copy 1 and runs attempt 2, but its answer is slow; A's
    // delivery goes to B, whose resume takes the call as attempt 3.
    let a = lease(id, 1);
    assert_eq!(
        l.resume(a, "A", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    let b = lease(id, 1);
    assert_eq!(
        l.resume(b, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 3 }
    );
    l.commit().unwrap();
    // A's retry of its resume must not take the call back from B.
    assert_eq!(
        l.resume(a, "A", SVC, TO).unwrap(),
        ResumeDecision::Superseded { attempt: 3 }
    );
    assert_eq!(
        l.trace(b, 3, "B", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    let rec = l.record(id).unwrap().unwrap();
    assert_eq!(rec.holder.unwrap().lease.token, b.token);
    assert_eq!(rec.lost, vec![a.token]);
}

#[test]
fn a_dead_worker_s_call_with_only_transaction_traces_runs_again_never_fatal() {
    use callq_schemas::protocol::EXACT_TRACE;
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    assert_eq!(
        l.trace(a, 1, "A", EXACT_TRACE, SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    l.commit().unwrap();
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    let effects = l.commit().unwrap();
    assert_eq!(
        effects,
        vec![Effect::Reissue {
            call_id: id,
            service: SVC.into(),
            attempt: 2,
            body: b"{\"the\": \"call\"}".to_vec()
        }],
        "the outbox admits one commit per call: the next attempt runs"
    );
    // The next attempt traces its own transaction; the lost one is refused.
    let b = lease(id, 2);
    assert_eq!(
        l.resume(b, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    assert_eq!(
        l.trace(b, 2, "B", EXACT_TRACE, SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    assert!(matches!(
        l.trace(a, 1, "A", EXACT_TRACE, SVC, TO, None, 0).unwrap(),
        TraceDecision::Refused { .. }
    ));
    // Its worker is lost too, and a redelivery of its copy finds the call
    // open again, not failed.
    assert_eq!(
        l.resume(lease(id, 2), "C", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 3 }
    );
}

#[test]
fn a_transaction_trace_beside_another_trace_still_fails_the_call() {
    use callq_schemas::protocol::EXACT_TRACE;
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    for kind in [EXACT_TRACE, "mail.sent"] {
        assert_eq!(
            l.trace(a, 1, "A", kind, SVC, TO, None, 0).unwrap(),
            TraceDecision::Granted
        );
    }
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    let effects = l.commit().unwrap();
    assert!(
        matches!(&effects[..], [Effect::AnswerFatal { reply, .. }] if reply.outcome == Outcome::Fatal),
        "{effects:?}"
    );
}

#[test]
fn a_session_write_commits_with_its_completion_once_and_only_on_its_version() {
    use callq_schemas::protocol::{SessionState, SessionWrite};
    let mut l = Ledger::open(MemoryStore::default()).unwrap();
    let write = |base: u64, n: i64| SessionWrite {
        session_id: "s".into(),
        base,
        set: [("value".to_owned(), json!(n))].into_iter().collect(),
        close: false,
    };
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let ok = |id| Some(Reply::ok(id, 1, json!(1)));
    assert_eq!(
        l.complete(lease(x, 1), 1, ok(x), Some(&write(0, 5)), 0)
            .unwrap(),
        CompleteDecision::Accepted
    );
    // Another call read version 0 too: refused, nothing written.
    assert!(matches!(
        l.complete(lease(y, 1), 1, ok(y), Some(&write(0, 9)), 0).unwrap(),
        CompleteDecision::SessionRefused { code, .. } if code == "session_conflict"
    ));
    l.commit().unwrap();
    let SessionState::Open { version, data } = l.session("s", None, 1).unwrap() else {
        panic!("open")
    };
    assert_eq!((version, data.unwrap()["value"].clone()), (1, json!(5)));
    // The cache at version 1 gets no data back.
    assert_eq!(
        l.session("s", Some(1), 2).unwrap(),
        SessionState::Open {
            version: 1,
            data: None
        }
    );
    // x's record says done: a later copy is answered, not run and counted.
    assert!(matches!(
        l.resume(lease(x, 2), "w2", "counter", None).unwrap(),
        ResumeDecision::Done { .. }
    ));
    // Idle past the expiry, the session is gone.
    l.set_session_idle(std::time::Duration::from_millis(10));
    assert_eq!(l.session("s", Some(1), 100).unwrap(), SessionState::Expired);
    assert!(matches!(
        l.complete(lease(y, 1), 1, ok(y), Some(&write(1, 9)), 100).unwrap(),
        CompleteDecision::SessionRefused { code, .. } if code == "session_expired"
    ));
}

#[test]
fn the_sweep_expires_idle_sessions_and_spares_those_in_use() {
    use callq_schemas::protocol::{SessionState, SessionWrite};
    let dir = std::env::temp_dir().join(format!("callq-sweep-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut l = Ledger::open(RedbStore::open(dir.join("l.redb")).unwrap()).unwrap();
    l.set_session_idle(std::time::Duration::from_millis(1_000));
    for (i, s) in ["old", "used"].into_iter().enumerate() {
        let id = Uuid::now_v7();
        let write = SessionWrite {
            session_id: s.into(),
            base: 0,
            set: [("k".to_owned(), json!(i))].into_iter().collect(),
            close: false,
        };
        l.complete(lease(id, 1), 1, None, Some(&write), 0).unwrap();
    }
    l.commit().unwrap();
    // "used" is read at 900 (in memory only); at 1,500 only "old" is idle.
    assert!(matches!(
        l.session("used", None, 900).unwrap(),
        SessionState::Open { .. }
    ));
    assert_eq!(l.sweep_sessions(1_500, 100).unwrap(), 1);
    l.commit().unwrap();
    let old = l.store().get_session("old").unwrap().unwrap();
    assert_eq!((old.life, old.data.len()), (SessionLife::Expired, 0));
    assert_eq!(
        l.session("old", None, 1_600).unwrap(),
        SessionState::Expired
    );
    assert!(matches!(
        l.session("used", Some(1), 1_600).unwrap(),
        SessionState::Open {
            version: 1,
            data: None
        }
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_grant_the_worker_never_received_is_void_once_it_abandons_the_attempt() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    // The coordinator was away: it grants the trace only after the worker
    // gave up waiting, then reads the worker's abandon.
    assert_eq!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    assert!(l.abandon(a, 1, "A", &[]).unwrap());
    assert!(l.commit().unwrap().is_empty(), "nothing to announce");
    // The released copy runs again instead of ending fatal.
    let b = lease(id, 1);
    assert_eq!(
        l.resume(b, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    // A late trace of the abandoned attempt is refused.
    assert!(matches!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Refused { .. }
    ));
    // An abandon of a lease that no longer holds changes nothing.
    assert!(!l.abandon(a, 1, "A", &[]).unwrap());
}

#[test]
fn an_abandoned_attempt_that_kept_a_grant_fails_the_call() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap();
    l.trace(a, 1, "A", "mail.queued", SVC, TO, None, 0).unwrap();
    // The first grant reached the worker (its effect may have happened),
    // the second did not.
    assert!(l.abandon(a, 1, "A", &["mail.sent".into()]).unwrap());
    let effects = l.commit().unwrap();
    let [Effect::AnswerFatal { reply, .. }] = effects.as_slice() else {
        panic!("one fatal answer expected, got {effects:?}");
    };
    assert_eq!(reply.outcome, Outcome::Fatal);
    let traces = &reply.error.as_ref().unwrap().traces;
    assert_eq!(traces, &vec!["mail.sent".to_owned()]);
    // The client is told what happened: the worker lived, it gave up.
    let message = &reply.error.as_ref().unwrap().message;
    assert!(
        message.starts_with("worker `A` gave up waiting for the coordinator after attempt 1"),
        "{message}"
    );
    assert!(matches!(
        l.resume(lease(id, 1), "B", SVC, TO).unwrap(),
        ResumeDecision::Fatal { .. }
    ));
}

#[test]
fn deliveries_returned_unrun_do_not_use_up_attempts() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    // The broker redelivers copy 1 (its first delivery may have run): the
    // redelivery runs attempt 2.
    let a = lease(id, 1);
    assert_eq!(
        l.resume(a, "A", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    // Its answer came too late: A gave the delivery back unrun, again and
    // again, each time on a new delivery of the released copy.
    let mut last = a;
    for worker in ["A", "B", "C", "A", "B", "C"] {
        assert!(l.unclaim(last).unwrap(), "the holder unclaims");
        let next = lease(id, 1);
        assert_eq!(
            l.resume(next, worker, SVC, TO).unwrap(),
            ResumeDecision::Run { attempt: 2 },
            "an attempt that never ran is not revoked"
        );
        // A late retry of the unclaimed lease is told it lost the call;
        // its late trace is refused.
        assert_eq!(
            l.resume(last, "A", SVC, TO).unwrap(),
            ResumeDecision::Superseded { attempt: 2 }
        );
        assert!(matches!(
            l.trace(last, 2, "A", "mail.sent", SVC, TO, None, 0)
                .unwrap(),
            TraceDecision::Refused { .. }
        ));
        last = next;
    }
    assert!(l.commit().unwrap().is_empty(), "nothing to announce");
    // An attempt that left a trace was used: it is not unclaimed, and a
    // lease that does not hold unclaims nothing.
    assert_eq!(
        l.trace(last, 2, "C", "mail.sent", SVC, TO, None, 0)
            .unwrap(),
        TraceDecision::Granted
    );
    assert!(!l.unclaim(last).unwrap());
    assert!(!l.unclaim(a).unwrap());
    assert!(!l.unclaim(lease(Uuid::now_v7(), 1)).unwrap());
}

#[test]
fn a_spare_delivery_is_told_to_go_away_and_only_a_lone_one_comes_back() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    // A client published the call twice (its first confirm was lost): two
    // deliveries of copy 1 claim it in turn. The second revokes the first.
    let (d1, d2) = (lease(id, 1), lease(id, 1));
    assert_eq!(
        l.resume(d1, "A", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    assert_eq!(
        l.resume(d2, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 3 }
    );
    // The first is a spare now: its trace is refused and it is acked, not
    // sent back to claim the call again (and revoke the second in turn).
    match l.trace(d1, 2, "A", "mail.sent", SVC, TO, None, 0).unwrap() {
        TraceDecision::Refused { superseded, .. } => assert!(superseded),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        l.trace(d2, 3, "B", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    let reply = Reply::ok(id, 3, json!("sent"));
    assert_eq!(
        l.complete(d2, 3, Some(reply.clone()), None, 0).unwrap(),
        CompleteDecision::Accepted
    );
    // Once the call is decided, every other delivery is a spare, and it
    // answers the recorded reply (the attempt that decided may have died
    // before its own went out).
    match l.complete(d1, 2, None, None, 0).unwrap() {
        CompleteDecision::Refused {
            superseded,
            reply: recorded,
            ..
        } => {
            assert!(superseded);
            assert_eq!(recorded.as_ref(), Some(&reply));
        }
        other => panic!("{other:?}"),
    }
    match l.trace(d1, 2, "A", "mail.sent", SVC, TO, None, 0).unwrap() {
        TraceDecision::Refused {
            superseded,
            reply: recorded,
            ..
        } => {
            assert!(superseded);
            assert_eq!(recorded, Some(reply), "a late trace answers it too");
        }
        other => panic!("{other:?}"),
    }

    // A holder revoked with no other delivery holding (its worker was lost
    // and no body is known to re-issue) sends its delivery back: the
    // redelivery runs the next attempt.
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    assert_eq!(
        l.resume(a, "A", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    l.worker_lost("A", &[]).unwrap();
    match l.trace(a, 2, "A", "mail.sent", SVC, TO, None, 0).unwrap() {
        TraceDecision::Refused { superseded, .. } => assert!(!superseded),
        other => panic!("{other:?}"),
    }
    match l.complete(a, 2, None, None, 0).unwrap() {
        CompleteDecision::Refused { superseded, .. } => assert!(!superseded),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        l.resume(lease(id, 1), "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 3 }
    );
}

/// A session that is only read, more often than a quarter of its expiry,
/// still has its use written to the store (a restarted coordinator, or one
/// that let the session out of its cache, must not expire it): the write
/// is measured from the use the store holds, not from the last read.
#[test]
fn reads_of_a_session_reach_the_store_at_least_every_quarter_expiry() {
    use callq_schemas::protocol::SessionWrite;
    let dir = std::env::temp_dir().join(format!("callq-reads-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut l = Ledger::open(RedbStore::open(dir.join("l.redb")).unwrap()).unwrap();
    l.set_session_idle(std::time::Duration::from_millis(1_000));
    let write = SessionWrite {
        session_id: "read-only".into(),
        base: 0,
        set: [("k".to_owned(), json!(1))].into_iter().collect(),
        close: false,
    };
    l.complete(lease(Uuid::now_v7(), 1), 1, None, Some(&write), 0)
        .unwrap();
    l.commit().unwrap();
    for now in (100..=3_000).step_by(100) {
        l.session("read-only", Some(1), now).unwrap();
        l.commit().unwrap();
        let stored = l.store().get_session("read-only").unwrap().unwrap();
        assert!(
            now - stored.used_ms <= 250 + 100,
            "at {now} the store's last use is {}",
            stored.used_ms
        );
    }
    // A coordinator that starts on this store does not expire it.
    drop(l);
    let mut l = Ledger::open(RedbStore::open(dir.join("l.redb")).unwrap()).unwrap();
    l.set_session_idle(std::time::Duration::from_millis(1_000));
    assert_eq!(l.sweep_sessions(3_500, 100).unwrap(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The session cache keeps its bound: sessions brought in by reads and by a
/// sweep are let go (the store keeps them) once committed.
#[test]
fn the_session_cache_keeps_its_bound_through_sweeps() {
    use callq_schemas::protocol::SessionWrite;
    let dir = std::env::temp_dir().join(format!("callq-bound-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut l = Ledger::open(RedbStore::open(dir.join("l.redb")).unwrap()).unwrap();
    l.set_session_idle(std::time::Duration::from_millis(1_000));
    l.sessions_cached = 3;
    for i in 0..10 {
        let write = SessionWrite {
            session_id: format!("s{i}"),
            base: 0,
            set: [("k".to_owned(), json!(i))].into_iter().collect(),
            close: false,
        };
        l.complete(lease(Uuid::now_v7(), 1), 1, None, Some(&write), 0)
            .unwrap();
        l.commit().unwrap();
        assert!(l.sessions.len() <= 3, "{} cached", l.sessions.len());
    }
    // Every one is idle at 2,000: the sweep expires all ten, a batch at a
    // time, and the cache is back within its bound after each commit.
    let mut expired = 0;
    while expired < 10 {
        let n = l.sweep_sessions(2_000, 4).unwrap();
        assert!(n > 0, "the sweep stalled at {expired}");
        expired += n;
        l.commit().unwrap();
        assert!(l.sessions.len() <= 3, "{} cached", l.sessions.len());
    }
    for i in 0..10 {
        let s = l.store().get_session(&format!("s{i}")).unwrap().unwrap();
        assert_eq!(s.life, SessionLife::Expired, "s{i}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A record as the stores keep it, decided (`Done`) or not.
fn stored_record(decided: bool) -> CallRecord {
    CallRecord {
        service: "mail".into(),
        reply_to: Some("callq.reply.c".into()),
        attempt: 1,
        holder: None,
        traces: vec!["mail.sent".into()],
        state: if decided {
            CallState::Done { reply: None }
        } else {
            CallState::Open
        },
        lost: Vec::new(),
        digest: None,
        key_holder: None,
        followers: Vec::new(),
    }
}

/// What the retention does on a store: a record decided before the cut is
/// deleted, one decided after it is kept, an open one is never deleted, and
/// a record is timed from its first decided write.
fn retention_on(store: &mut impl Store) {
    let wall = || {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    };
    let (old, open) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .put_all(
            &[(old, &stored_record(true)), (open, &stored_record(false))],
            &[],
        )
        .unwrap();
    // Written decided again later (a lost lease remembered): still timed
    // from the first write.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let cut = wall();
    std::thread::sleep(std::time::Duration::from_millis(20));
    store.put_all(&[(old, &stored_record(true))], &[]).unwrap();
    let recent = Uuid::now_v7();
    store
        .put_all(&[(recent, &stored_record(true))], &[])
        .unwrap();
    assert_eq!(store.forget_decided(cut, 100).unwrap(), 1);
    assert!(store.get(old).unwrap().is_none(), "decided before the cut");
    assert!(
        store.get(recent).unwrap().is_some(),
        "decided after the cut"
    );
    assert!(store.get(open).unwrap().is_some());
    // Everything decided, however recent, goes with a cut in the future;
    // the open call stays.
    assert_eq!(store.forget_decided(wall() + 60_000, 100).unwrap(), 1);
    assert!(store.get(recent).unwrap().is_none());
    assert_eq!(store.forget_decided(i64::MAX, 100).unwrap(), 0);
    assert!(
        store.get(open).unwrap().is_some(),
        "an open call is never forgotten"
    );
    assert_eq!(store.open_calls().unwrap().len(), 1);
}

#[test]
fn decided_records_past_the_retention_are_forgotten_in_memory() {
    retention_on(&mut MemoryStore::default());
}

#[test]
fn decided_records_past_the_retention_are_forgotten_in_redb() {
    let dir = std::env::temp_dir().join(format!("callq-retention-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    retention_on(&mut RedbStore::open(dir.join("l.redb")).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Through the ledger: with a retention of 1 s, a call decided now is kept
/// at now and forgotten two seconds later, a batch at a time.
#[test]
fn the_ledger_forgets_decided_calls_after_its_retention() {
    let mut l = ledger();
    l.set_retention(std::time::Duration::from_secs(1));
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let records: Vec<CallRecord> = ids.iter().map(|_| stored_record(true)).collect();
    let batch: Vec<(Uuid, &CallRecord)> = ids.iter().copied().zip(records.iter()).collect();
    l.store.put_all(&batch, &[]).unwrap();
    assert_eq!(l.forget_decided(now, 100).unwrap(), 0);
    assert_eq!(l.forget_decided(now + 2_000, 2).unwrap(), 2);
    assert_eq!(l.forget_decided(now + 2_000, 100).unwrap(), 3);
    assert!(ids.iter().all(|id| l.record(*id).unwrap().is_none()));
}

#[test]
fn a_cancelled_queued_call_answers_every_later_copy_cancelled() {
    let mut l = ledger();
    let id = Uuid::now_v7();
    assert_eq!(l.cancel(id).unwrap(), CancelDecision::Cancelled);
    l.commit().unwrap();
    // Durable: a second ask says the same, and a copy asking to run or to
    // trace (the fast path's first trace) is answered with the reply.
    assert_eq!(l.cancel(id).unwrap(), CancelDecision::Cancelled);
    let cancelled = Reply::cancelled(id, 1);
    assert_eq!(
        l.resume(lease(id, 1), "A", SVC, TO).unwrap(),
        ResumeDecision::Done {
            reply: Some(cancelled.clone())
        }
    );
    assert_eq!(
        l.trace(lease(id, 1), 1, "A", "mail.sent", SVC, TO, None, 0)
            .unwrap(),
        TraceDecision::Refused {
            reason: "the call is already decided".into(),
            superseded: true,
            reply: Some(cancelled.clone()),
        }
    );
    assert_eq!(
        l.complete(lease(id, 1), 1, Some(Reply::ok(id, 1, json!(1))), None, 0)
            .unwrap(),
        CompleteDecision::Refused {
            reason: "another attempt completed the call".into(),
            superseded: true,
            reply: Some(cancelled),
        }
    );
    assert_eq!(l.open_calls(), 0);
}

#[test]
fn a_running_call_is_cancelled_until_it_leaves_a_trace() {
    let mut l = ledger();
    // Resumed and running, no trace yet: cancelled; the holder's trace is
    // then refused with the reply to publish.
    let id = Uuid::now_v7();
    let a = lease(id, 1);
    assert_eq!(
        l.resume(a, "A", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    assert_eq!(l.cancel(id).unwrap(), CancelDecision::Cancelled);
    let TraceDecision::Refused {
        superseded, reply, ..
    } = l.trace(a, 2, "A", "mail.sent", SVC, TO, None, 0).unwrap()
    else {
        panic!("the trace of a cancelled call was granted");
    };
    assert!(superseded);
    assert_eq!(reply, Some(Reply::cancelled(id, 2)));
    // A call whose attempt holds a trace is refused, and runs on.
    let traced = Uuid::now_v7();
    let b = lease(traced, 1);
    assert_eq!(
        l.trace(b, 1, "B", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    assert_eq!(
        l.cancel(traced).unwrap(),
        CancelDecision::Refused {
            traces: vec!["mail.sent".into()]
        }
    );
    let reply = Reply::ok(traced, 1, json!("sent"));
    assert_eq!(
        l.complete(b, 1, Some(reply), None, 0).unwrap(),
        CompleteDecision::Accepted
    );
    l.commit().unwrap();
    // A decided call keeps its outcome.
    assert_eq!(
        l.cancel(traced).unwrap(),
        CancelDecision::Finished {
            outcome: Some(Outcome::Ok)
        }
    );
}

#[test]
fn a_second_call_with_an_idempotency_key_gets_the_first_s_outcome() {
    let mut l = ledger();
    let first = Uuid::now_v7();
    let a = lease(first, 1);
    assert_eq!(
        l.claim(a, "A", SVC, "order-1", TO, 0).unwrap(),
        ResumeDecision::Run { attempt: 1 }
    );
    l.commit().unwrap();
    // While the first runs, a second call follows it; a third of another
    // service, or with another key, runs.
    let second = Uuid::now_v7();
    assert_eq!(
        l.claim(
            lease(second, 1),
            "B",
            SVC,
            "order-1",
            Some("callq.reply.d"),
            10
        )
        .unwrap(),
        ResumeDecision::Follow { first }
    );
    let other = Uuid::now_v7();
    assert_eq!(
        l.claim(lease(other, 1), "B", "echo", "order-1", TO, 10)
            .unwrap(),
        ResumeDecision::Run { attempt: 1 }
    );
    assert_eq!(l.commit().unwrap(), vec![]);
    // The follower's redelivery runs nothing.
    assert_eq!(
        l.resume(lease(second, 1), "C", SVC, TO).unwrap(),
        ResumeDecision::Done { reply: None }
    );
    // The first completes (a batched completion carries the reply): the
    // follower is answered with its outcome, under its own id.
    let reply = Reply::ok(first, 1, json!({"sent": true}));
    assert_eq!(
        l.complete(a, 1, Some(reply.clone()), None, 20).unwrap(),
        CompleteDecision::Accepted
    );
    let answered = Reply {
        call_id: second,
        ..reply.clone()
    };
    assert_eq!(
        l.commit().unwrap(),
        vec![Effect::Answer {
            reply_to: "callq.reply.d".into(),
            reply: answered.clone()
        }]
    );
    assert_eq!(
        l.resume(lease(second, 1), "C", SVC, TO).unwrap(),
        ResumeDecision::Done {
            reply: Some(answered)
        }
    );
    // A later call within the window is answered at once.
    let third = Uuid::now_v7();
    assert_eq!(
        l.claim(lease(third, 1), "B", SVC, "order-1", TO, 30)
            .unwrap(),
        ResumeDecision::Done {
            reply: Some(Reply {
                call_id: third,
                ..reply
            })
        }
    );
    // Past the window the key is free again: the next call runs.
    l.set_idempotency_window(std::time::Duration::from_millis(100));
    l.commit().unwrap();
    let fourth = Uuid::now_v7();
    assert_eq!(
        l.claim(lease(fourth, 1), "B", SVC, "order-1", TO, 24 * 3_600_000)
            .unwrap(),
        ResumeDecision::Run { attempt: 1 }
    );
}

#[test]
fn followers_of_a_call_that_fails_are_answered_fatal() {
    let mut l = ledger();
    let first = Uuid::now_v7();
    let a = lease(first, 1);
    l.claim(a, "A", SVC, "k", TO, 0).unwrap();
    assert_eq!(
        l.trace(a, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap(),
        TraceDecision::Granted
    );
    let second = Uuid::now_v7();
    assert_eq!(
        l.claim(lease(second, 1), "B", SVC, "k", TO, 0).unwrap(),
        ResumeDecision::Follow { first }
    );
    l.commit().unwrap();
    l.worker_lost("A", &[in_flight(a)]).unwrap();
    let effects = l.commit().unwrap();
    let answered: Vec<&Reply> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Answer { reply, .. } => Some(reply),
            _ => None,
        })
        .collect();
    assert_eq!(answered.len(), 1, "{effects:?}");
    assert_eq!(
        (answered[0].call_id, answered[0].outcome),
        (second, Outcome::Fatal)
    );
}

/// A call of `service` as a worker hands it over early.
fn delayed(service: &str, due_ms: i64) -> Delayed {
    let mut call = callq_schemas::Call::new(service, "send", json!({}));
    call.reply_to = Some("callq.reply.c".into());
    Delayed {
        call_id: call.call_id,
        due_ms,
        service: service.into(),
        body: String::from_utf8(call.to_bytes()).unwrap(),
        attempt: 2,
    }
}

#[test]
fn delayed_calls_are_held_durably_and_published_once_due() {
    let dir = std::env::temp_dir().join(format!("callq-delayed-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ledger.redb");
    let (soon, later, doomed) = (
        delayed(SVC, 1_000),
        delayed(SVC, 5_000),
        delayed(SVC, 1_000),
    );
    {
        let mut l = Ledger::open(RedbStore::open(&path).unwrap()).unwrap();
        for d in [&soon, &later, &doomed] {
            l.defer(d.clone());
        }
        // Asked again after a lost answer: held once.
        l.defer(soon.clone());
        l.commit().unwrap();
        assert_eq!(l.store().delayed_count().unwrap(), 3);
    }
    // Durable across a restart of the coordinator.
    let mut l = Ledger::open(RedbStore::open(&path).unwrap()).unwrap();
    assert_eq!(l.release_due(999, 100).unwrap(), Vec::<Uuid>::new());
    assert_eq!(l.cancel(doomed.call_id).unwrap(), CancelDecision::Cancelled);
    // Its client is answered at once, not when it comes due.
    assert_eq!(
        l.commit().unwrap(),
        vec![Effect::Answer {
            reply_to: "callq.reply.c".into(),
            reply: Reply::cancelled(doomed.call_id, 1),
        }]
    );
    let mut released = l.release_due(1_001, 100).unwrap();
    released.sort();
    let mut expected = vec![soon.call_id, doomed.call_id];
    expected.sort();
    assert_eq!(released, expected);
    let effects = l.commit().unwrap();
    assert!(
        effects.contains(&Effect::Reissue {
            call_id: soon.call_id,
            service: SVC.into(),
            attempt: 2,
            body: soon.body.clone().into_bytes(),
        }),
        "{effects:?}"
    );
    // The call cancelled while it waited is answered again, not published.
    assert!(
        effects.contains(&Effect::Answer {
            reply_to: "callq.reply.c".into(),
            reply: Reply::cancelled(doomed.call_id, 1),
        }),
        "{effects:?}"
    );
    assert_eq!(effects.len(), 2, "{effects:?}");
    l.forget_delayed(&released).unwrap();
    assert_eq!(l.store().delayed_count().unwrap(), 1);
    // The published copy claims attempt 2; a second copy (published again
    // after a crash before the call was let go of) finds it done.
    let a = lease(soon.call_id, 2);
    assert_eq!(
        l.resume(a, "A", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    let reply = Reply::ok(soon.call_id, 2, json!("sent"));
    l.complete(a, 2, Some(reply.clone()), None, 0).unwrap();
    assert_eq!(
        l.resume(lease(soon.call_id, 2), "B", SVC, TO).unwrap(),
        ResumeDecision::Done { reply: Some(reply) }
    );
    assert_eq!(l.release_due(10_000, 100).unwrap(), vec![later.call_id]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_retry_revokes_the_attempt_and_holds_the_call_for_the_next() {
    let mut l = ledger();
    // A first delivery on the fast path: its call gets a record now.
    let d = delayed(SVC, 500);
    let a = lease(d.call_id, 1);
    assert!(l.retry(a, 1, d.clone()).unwrap());
    l.commit().unwrap();
    let mut released = l.release_due(501, 10).unwrap();
    assert_eq!(released, vec![d.call_id]);
    let effects = l.commit().unwrap();
    assert!(
        matches!(&effects[..], [Effect::Reissue { attempt: 2, .. }]),
        "{effects:?}"
    );
    l.forget_delayed(&released).unwrap();
    // The late completion of the retried attempt is refused; the next
    // attempt runs, and retries once more.
    assert!(matches!(
        l.complete(a, 1, Some(Reply::ok(d.call_id, 1, json!(1))), None, 0)
            .unwrap(),
        CompleteDecision::Refused { .. }
    ));
    let b = lease(d.call_id, 2);
    assert_eq!(
        l.resume(b, "B", SVC, TO).unwrap(),
        ResumeDecision::Run { attempt: 2 }
    );
    let again = Delayed {
        due_ms: 900,
        ..d.clone()
    };
    assert!(l.retry(b, 2, again).unwrap(), "held by b");
    assert!(!l.retry(b, 2, d.clone()).unwrap(), "no longer current");
    // A call whose attempt left a trace is not retried: the error stands.
    let traced = delayed(SVC, 500);
    let t = lease(traced.call_id, 1);
    l.trace(t, 1, "A", "mail.sent", SVC, TO, None, 0).unwrap();
    assert!(!l.retry(t, 1, traced).unwrap());
    l.commit().unwrap();
    released = l.release_due(10_000, 10).unwrap();
    assert_eq!(released, vec![d.call_id], "the second retry is held");
    let effects = l.commit().unwrap();
    assert!(
        matches!(&effects[..], [Effect::Reissue { attempt: 3, .. }]),
        "{effects:?}"
    );
}

#[test]
fn a_failed_write_of_held_calls_leaves_nothing_of_the_batch_in_memory() {
    let mut l = ledger();
    let d = delayed(SVC, 500);
    let a = lease(d.call_id, 1);
    assert!(l.retry(a, 1, d.clone()).unwrap());
    l.store.fail_next = true;
    assert!(l.commit().is_err());
    // The retry's record was not durable: it is gone from memory too, and
    // the worker's next ask (after no answer) is decided afresh.
    assert_eq!(l.record(d.call_id).unwrap(), None);
    assert_eq!(l.store().delayed_count().unwrap(), 0);
    assert!(l.retry(a, 1, d.clone()).unwrap());
    l.commit().unwrap();
    assert_eq!(l.store().delayed_count().unwrap(), 1);
    assert_eq!(l.record(d.call_id).unwrap().unwrap().attempt, 2);
}
