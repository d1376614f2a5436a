//! The ledger's PostgreSQL store on a real PostgreSQL (`CALLQ_POSTGRES`,
//! default `postgres://postgres@127.0.0.1/test`; `scripts/services` makes
//! sure it runs): the leader lease, and the fencing of an old leader.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use callq_coordinator::{CallRecord, CallState, Error, PgStore, Store};
use uuid::Uuid;

fn url() -> String {
    std::env::var("CALLQ_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1/test".to_owned())
}

fn record(attempt: u32) -> CallRecord {
    CallRecord {
        service: "mail".into(),
        reply_to: Some("callq.reply.c".into()),
        attempt,
        holder: None,
        traces: vec!["mail.sent".into()],
        state: CallState::Open,
        lost: Vec::new(),
        digest: Some("d1".into()),
        // Kept through the store like the rest (an idempotency key's
        // holder, a call waiting for this one's outcome).
        key_holder: Some(callq_coordinator::KeyHolder {
            call_id: Uuid::nil(),
            until_ms: 1_796_000_000_000,
        }),
        followers: vec![callq_coordinator::Follower {
            call_id: Uuid::nil(),
            reply_to: Some("callq.reply.c".into()),
        }],
    }
}

const LEASE: Duration = Duration::from_millis(500);

/// Waits (bounded) for `who` to take the lease once the current one runs
/// out: the expiry is the database's clock, which signals nothing.
async fn take_over(cluster: &str, who: &str) -> PgStore {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = PgStore::acquire(&url(), cluster, who, LEASE).await.unwrap() {
            return s;
        }
        assert!(Instant::now() < until, "{who} never got the lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_leader_s_writes_are_refused_once_another_took_the_lease() {
    let cluster = format!("test-{}", Uuid::now_v7().simple());
    let mut a = PgStore::acquire(&url(), &cluster, "a", LEASE)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {}: {e} (scripts/services starts it)", url()))
        .expect("the first coordinator takes the lease");
    assert!(
        PgStore::acquire(&url(), &cluster, "b", LEASE)
            .await
            .unwrap()
            .is_none(),
        "the lease is a's while it runs"
    );
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    a.put_all(&[(x, &record(1))], &[]).unwrap();

    // a stops renewing (as if paused); b takes over with a higher epoch.
    let mut b = take_over(&cluster, "b").await;
    assert_eq!(b.epoch(), a.epoch() + 1);
    assert_eq!(
        b.open_calls().unwrap(),
        vec![(x, record(1))],
        "the new leader reads the ledger back"
    );

    // a wakes up: its writes change nothing.
    let refused = a.put_all(&[(x, &record(7)), (y, &record(1))], &[]);
    assert!(matches!(refused, Err(Error::Fenced(_))), "{refused:?}");
    assert!(matches!(a.renew(), Err(Error::Fenced(_))));
    assert_eq!(
        b.get(x).unwrap(),
        Some(record(1)),
        "a's late write did not land"
    );
    assert_eq!(b.get(y).unwrap(), None);

    // b writes and keeps the lease.
    let mut done = record(2);
    done.state = CallState::Done { reply: None };
    b.put_all(&[(x, &done)], &[]).unwrap();
    b.renew().unwrap();
    assert_eq!(
        b.open_calls().unwrap(),
        vec![],
        "decided calls leave the open set"
    );
    assert_eq!(b.get(x).unwrap(), Some(done));
    assert!(
        PgStore::acquire(&url(), &cluster, "a", LEASE)
            .await
            .unwrap()
            .is_none(),
        "b's lease runs: nobody else takes it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_written_with_the_calls_and_read_back_by_the_next_leader() {
    use callq_coordinator::{SessionLife, SessionRecord};
    let cluster = format!("test-{}", Uuid::now_v7().simple());
    let mut a = take_over(&cluster, "a").await;
    let mut data = serde_json::Map::new();
    data.insert("value".into(), serde_json::json!(12));
    let session = SessionRecord {
        version: 3,
        data,
        life: SessionLife::Open,
        used_ms: 1_700_000_000_000,
    };
    let x = Uuid::now_v7();
    a.put_all(&[(x, &record(1))], &[("s1", &session)]).unwrap();
    assert_eq!(a.get_session("s1").unwrap(), Some(session.clone()));
    assert_eq!(a.get_session("s2").unwrap(), None);
    // The expiry sweep finds it once it is idle long enough, not before.
    let idle = a.idle_sessions(session.used_ms + 1, 10).unwrap();
    assert_eq!(idle, vec![("s1".to_owned(), session.clone())]);
    assert!(a.idle_sessions(session.used_ms, 10).unwrap().is_empty());
    // An ended one is found and forgotten; a live one never is.
    let ended = SessionRecord {
        life: SessionLife::Expired,
        data: serde_json::Map::new(),
        ..session.clone()
    };
    a.put_all(&[], &[("gone", &ended)]).unwrap();
    let found = a.ended_sessions(session.used_ms + 1, 10).unwrap();
    assert_eq!(found, vec!["gone".to_owned()]);
    a.forget_sessions(&["gone".to_owned(), "s1".to_owned()])
        .unwrap();
    assert_eq!(a.get_session("gone").unwrap(), None);
    assert!(a.get_session("s1").unwrap().is_some());
    drop(a);
    // The next leader (after the lease ran out) reads the same session; a
    // cluster of another name does not see it.
    let b = take_over(&cluster, "b").await;
    assert_eq!(b.get_session("s1").unwrap(), Some(session));
    let other = take_over(&format!("{cluster}-other"), "c").await;
    assert_eq!(other.get_session("s1").unwrap(), None);
}

/// The retention on PostgreSQL: a record decided before the cut is deleted
/// (timed from its first decided write, by the database's clock), one
/// decided after it is kept, an open one never goes, and another cluster's
/// records are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decided_records_past_the_retention_are_forgotten() {
    let wall = || {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    };
    let decided = |attempt| CallRecord {
        state: CallState::Done { reply: None },
        ..record(attempt)
    };
    let cluster = format!("test-{}", Uuid::now_v7().simple());
    let mut a = take_over(&cluster, "a").await;
    let mut other = take_over(&format!("{cluster}-other"), "o").await;
    let (old, open, elsewhere) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    a.put_all(&[(old, &decided(1)), (open, &record(1))], &[])
        .unwrap();
    other.put_all(&[(elsewhere, &decided(1))], &[]).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = wall();
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.put_all(&[(old, &decided(2))], &[]).unwrap();
    let recent = Uuid::now_v7();
    a.put_all(&[(recent, &decided(1))], &[]).unwrap();
    assert_eq!(a.forget_decided(cut, 100).unwrap(), 1);
    assert!(a.get(old).unwrap().is_none(), "decided before the cut");
    assert!(a.get(recent).unwrap().is_some(), "decided after the cut");
    assert_eq!(a.forget_decided(wall() + 60_000, 1).unwrap(), 1);
    assert_eq!(a.forget_decided(i64::MAX / 1000, 100).unwrap(), 0);
    assert!(
        a.get(open).unwrap().is_some(),
        "an open call is never forgotten"
    );
    assert!(
        other.get(elsewhere).unwrap().is_some(),
        "another cluster's record was deleted"
    );

    // A record decided before the column existed (no date) is dated by the
    // sweep, kept for a retention from then, and goes after it.
    let legacy = Uuid::now_v7();
    a.put_all(&[(legacy, &decided(1))], &[]).unwrap();
    let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "update callq_calls set decided_at = null where cluster = $1 and call_id = $2",
            &[&cluster, &legacy],
        )
        .await
        .unwrap();
    let before = wall();
    assert_eq!(a.forget_decided(before, 100).unwrap(), 0);
    assert!(
        a.get(legacy).unwrap().is_some(),
        "an undated record went at once"
    );
    let dated: Option<std::time::SystemTime> = client
        .query_one(
            "select decided_at from callq_calls where cluster = $1 and call_id = $2",
            &[&cluster, &legacy],
        )
        .await
        .unwrap()
        .get(0);
    assert!(dated.is_some(), "the sweep did not date the record");
    assert_eq!(a.forget_decided(wall() + 60_000, 100).unwrap(), 1);
    assert!(a.get(legacy).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_calls_are_held_until_due_and_let_go_of() {
    let cluster = format!("test-{}", Uuid::now_v7().simple());
    let mut a = take_over(&cluster, "a").await;
    let held = |due_ms: i64| callq_coordinator::Delayed {
        call_id: Uuid::now_v7(),
        due_ms,
        service: "mail".into(),
        body: r#"{"v":1}"#.into(),
        attempt: 2,
    };
    let (early, late) = (
        held(1_000),
        callq_coordinator::Delayed {
            attempt: 4,
            ..held(2_000)
        },
    );
    a.put_delayed(&[late.clone(), early.clone()]).unwrap();
    // Held again (a worker asking after a lost answer): replaced.
    let moved = callq_coordinator::Delayed {
        due_ms: 3_000,
        ..late.clone()
    };
    a.put_delayed(std::slice::from_ref(&moved)).unwrap();
    assert_eq!(a.delayed_count().unwrap(), 2);
    assert_eq!(a.due_delayed(1_000, 10).unwrap(), vec![]);
    assert_eq!(
        a.due_delayed(5_000, 10).unwrap(),
        vec![early.clone(), moved]
    );
    assert_eq!(a.due_delayed(5_000, 1).unwrap(), vec![early.clone()]);
    a.forget_delayed(&[early.call_id]).unwrap();
    assert_eq!(a.delayed_count().unwrap(), 1);
    // Another cluster's calls are its own.
    let other = take_over(&format!("{cluster}-other"), "o").await;
    assert_eq!(other.delayed_count().unwrap(), 0);
}
