//! The delayed-call scenario every broker runs: a worker of `echo` and
//! `mail` with a capacity of 2, a client and an operator's handle.
//!
//! Two delayed calls (a mail 4 s out, an echo 5 s out) and one to cancel
//! while it waits are published; a ready call published after them is
//! answered first, while the worker holds no slot for the waiting ones.
//! Each delayed call runs no earlier than its `not_before` and within a
//! bound after it (as attempt 2: the coordinator re-issued it); the
//! cancelled one ends `cancelled` at once (before the mail due with it)
//! and sends nothing.

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

/// How late after its `not_before` a delayed call may run, at most, on a
/// busy machine (the coordinator publishes due calls every tick).
const LATE: Duration = Duration::from_secs(20);

fn start(
    client: &Client,
    (service, method): (&str, &str),
    args: Value,
    delay: Option<Duration>,
) -> (Uuid, JoinHandle<(Reply, Instant)>) {
    let id = Uuid::now_v7();
    let client = client.clone();
    let (service, method) = (service.to_owned(), method.to_owned());
    let waiting = tokio::spawn(async move {
        let opts = CallOptions {
            call_id: Some(id),
            delay,
            timeout: Some(Duration::from_secs(60)),
            ..CallOptions::default()
        };
        let reply = client.call(&service, &method, args, opts).await.unwrap();
        (reply, Instant::now())
    });
    (id, waiting)
}

async fn outcome(waiting: JoinHandle<(Reply, Instant)>, what: &str) -> (Reply, Instant) {
    super::joined(waiting, Duration::from_secs(90), what).await
}

/// Runs the scenario; `dir` holds the mail outbox.
pub async fn scenario(client: &Client, admin: &Admin, dir: &Path) {
    let outbox = dir.join("delayed.outbox");
    let mail = |to: &str| json!({ "outbox": outbox, "to": to });
    let published = Instant::now();
    let (mailer, mailing) = start(
        client,
        ("mail", "send"),
        mail("delayed"),
        Some(Duration::from_secs(4)),
    );
    let (_, echoing) = start(
        client,
        ("echo", "echo"),
        json!({ "late": true }),
        Some(Duration::from_secs(5)),
    );
    let (doomed, cancelling) = start(
        client,
        ("mail", "send"),
        mail("cancelled"),
        Some(Duration::from_secs(4)),
    );
    let (_, ready) = start(client, ("echo", "echo"), json!({ "ready": true }), None);
    let (r, ready_at) = outcome(ready, "the ready call").await;
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert!(
        std::fs::read_to_string(&outbox)
            .unwrap_or_default()
            .is_empty(),
        "a delayed mail ran before the ready call was answered"
    );
    // The waiting calls hold no slot: they wait with the coordinator, whose
    // status counts them.
    wait_status(
        admin,
        "three calls held, every slot free",
        Duration::from_secs(10),
        |s| s.workers.len() == 1 && s.workers[0].free == CAPACITY && s.delayed_calls == 3,
    )
    .await;
    assert_eq!(
        admin.cancel(doomed).await.unwrap(),
        CancelDecision::Cancelled
    );

    let (r, mailed_at) = outcome(mailing, "the delayed mail").await;
    assert_eq!((r.outcome, r.attempt), (Outcome::Ok, 2), "{r:?}");
    let waited = mailed_at - published;
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(4) + LATE,
        "the mail delayed by 4 s was answered after {waited:?}"
    );
    assert!(mailed_at > ready_at);
    let (r, echoed_at) = outcome(echoing, "the delayed echo").await;
    assert_eq!(r.result, Some(json!({ "late": true })), "{r:?}");
    let waited = echoed_at - published;
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(5) + LATE,
        "the echo delayed by 5 s was answered after {waited:?}"
    );
    let (r, cancelled_at) = outcome(cancelling, "the cancelled delayed mail").await;
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    assert!(
        cancelled_at < mailed_at,
        "the cancelled call is answered at once, not when it comes due"
    );
    let sent = std::fs::read_to_string(&outbox).unwrap();
    let lines: Vec<&str> = sent.lines().collect();
    assert_eq!(lines.len(), 1, "{sent}");
    assert!(lines[0].starts_with(&mailer.to_string()), "{sent}");
    wait_status(
        admin,
        "no call held any more",
        Duration::from_secs(10),
        |s| s.delayed_calls == 0,
    )
    .await;
}
