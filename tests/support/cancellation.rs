//! The cancellation scenario every broker runs: a worker of `echo` and
//! `mail` with a capacity of 2, a client and an operator's handle.
//!
//! Two calls fill the worker (an `echo.sleep` and a `mail.send` that waits
//! before its trace) and a third waits in the queue. Each is cancelled:
//! the queued one is answered `cancelled` and never runs (no mail); the
//! sleeping one stops at once; the mail's trace is refused and it ends
//! `cancelled` (no mail). Then a mail that left its trace cannot be
//! cancelled and ends `ok`, its mail sent once; a decided call keeps its
//! outcome; and every slot is free again.

use std::path::Path;
use std::time::Duration;

use callq_node::{Admin, CallOptions, Client};
use callq_schemas::protocol::CancelDecision;
use callq_schemas::{Outcome, Reply, Uuid};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::wait_status;

/// The capacity the scenario's worker must have.
pub const CAPACITY: u32 = 2;

fn start(client: &Client, service: &str, method: &str, args: Value) -> (Uuid, JoinHandle<Reply>) {
    let id = Uuid::now_v7();
    let client = client.clone();
    let (service, method) = (service.to_owned(), method.to_owned());
    let waiting = tokio::spawn(async move {
        let opts = CallOptions {
            call_id: Some(id),
            timeout: Some(Duration::from_secs(90)),
            ..CallOptions::default()
        };
        client.call(&service, &method, args, opts).await.unwrap()
    });
    (id, waiting)
}

async fn outcome(waiting: JoinHandle<Reply>, what: &str) -> Reply {
    super::joined(waiting, Duration::from_secs(60), what).await
}

fn lines(outbox: &Path) -> Vec<String> {
    std::fs::read_to_string(outbox)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs the scenario; `dir` holds the mail outbox.
pub async fn scenario(client: &Client, admin: &Admin, dir: &Path) {
    let outbox = dir.join("cancel.outbox");
    let mail = |to: &str, before_ms: u64, after_ms: u64| json!({ "outbox": outbox, "to": to, "before_ms": before_ms, "after_ms": after_ms });
    let (sleeper, sleeping) = start(client, "echo", "sleep", json!({ "ms": 50_000 }));
    // It waits 8 s before its trace: time enough to see it run and cancel it.
    let (mailer, mailing) = start(client, "mail", "send", mail("mailer", 8_000, 0));
    wait_status(admin, "both calls running", Duration::from_secs(30), |s| {
        s.workers.len() == 1 && s.workers[0].free == 0
    })
    .await;
    let (queued, waiting) = start(client, "mail", "send", mail("queued", 0, 0));

    assert_eq!(
        admin.cancel(queued).await.unwrap(),
        CancelDecision::Cancelled
    );
    assert_eq!(
        admin.cancel(mailer).await.unwrap(),
        CancelDecision::Cancelled
    );
    let cancelled_at = Instant::now();
    assert_eq!(
        admin.cancel(sleeper).await.unwrap(),
        CancelDecision::Cancelled
    );

    let r = outcome(sleeping, "the cancelled sleep").await;
    assert_eq!(
        (r.outcome, r.code()),
        (Outcome::Cancelled, Some("cancelled")),
        "{r:?}"
    );
    let stopped = cancelled_at.elapsed();
    assert!(
        stopped < Duration::from_secs(30),
        "the running sleep of 50 s ended {stopped:?} after its cancel: it did not stop"
    );
    let r = outcome(waiting, "the queued mail").await;
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    let r = outcome(mailing, "the mail cancelled before its trace").await;
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    assert_eq!(
        lines(&outbox),
        Vec::<String>::new(),
        "a cancelled mail was sent"
    );

    // A mail that left its trace: it waits 5 s after writing its line.
    let (traced, tracing) = start(client, "mail", "send", mail("traced", 0, 5_000));
    let until = Instant::now() + Duration::from_secs(30);
    while lines(&outbox).is_empty() {
        assert!(
            Instant::now() < until,
            "the traced mail wrote nothing in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        admin.cancel(traced).await.unwrap(),
        CancelDecision::Refused {
            traces: vec!["mail.sent".into()]
        }
    );
    let r = outcome(tracing, "the traced mail").await;
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    let sent = lines(&outbox);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].starts_with(&traced.to_string()), "{sent:?}");

    // Asked again: the cancelled call stays cancelled, the decided one keeps
    // its outcome.
    assert_eq!(
        admin.cancel(sleeper).await.unwrap(),
        CancelDecision::Cancelled
    );
    assert_eq!(
        admin.cancel(traced).await.unwrap(),
        CancelDecision::Finished {
            outcome: Some(Outcome::Ok)
        }
    );
    // No slot leaked, and the worker serves on.
    wait_status(admin, "every slot free", Duration::from_secs(30), |s| {
        s.workers.len() == 1 && s.workers[0].free == CAPACITY
    })
    .await;
    let (_, echo) = start(client, "echo", "echo", json!({ "after": "cancels" }));
    assert_eq!(
        outcome(echo, "a call after the cancels").await.outcome,
        Outcome::Ok
    );
}
