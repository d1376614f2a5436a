//! The idempotency-key scenario every broker runs: two workers of `echo`
//! and `mail`, capacity 1 each, a client and an operator's handle.
//!
//! A mail with a key runs (and holds its worker 3 s after sending); a
//! second call with the same key, published meanwhile, is taken by the
//! other worker where the broker hands it there (RabbitMQ, the embedded
//! broker: the first worker has no room), which runs nothing and follows
//! the first; it is answered with the first's result under its own id. A
//! third call with the key, after, is answered at once. One mail is sent.

use std::path::Path;
use std::time::Duration;

use callq_node::{Admin, CallOptions, Client};
use callq_schemas::{Outcome, Reply, Uuid};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::wait_status;

/// The capacity of each of the scenario's two workers.
pub const CAPACITY: u32 = 1;

fn start(client: &Client, key: &str, args: Value) -> (Uuid, JoinHandle<Reply>) {
    let id = Uuid::now_v7();
    let client = client.clone();
    let key = key.to_owned();
    let waiting = tokio::spawn(async move {
        let opts = CallOptions {
            call_id: Some(id),
            idempotency_key: Some(key),
            timeout: Some(Duration::from_secs(90)),
            ..CallOptions::default()
        };
        client.call("mail", "send", args, opts).await.unwrap()
    });
    (id, waiting)
}

async fn outcome(waiting: JoinHandle<Reply>, what: &str) -> Reply {
    super::joined(waiting, Duration::from_secs(60), what).await
}

/// Runs the scenario; `dir` holds the mail outbox. `after_second` looks at
/// the workers once the first two calls are answered (and before any
/// other ran). Returns the id of the second call.
pub async fn scenario(
    client: &Client,
    admin: &Admin,
    dir: &Path,
    after_second: impl FnOnce(),
) -> Uuid {
    let outbox = dir.join("keyed.outbox");
    let key = format!("order-{}", Uuid::now_v7().simple());
    let mail = |to: &str| json!({ "outbox": outbox, "to": to, "after_ms": 3_000 });
    let (first, sending) = start(client, &key, mail("first"));
    wait_status(
        admin,
        "the first call running",
        Duration::from_secs(30),
        |s| s.workers.iter().any(|w| w.free == 0),
    )
    .await;
    let (second, following) = start(client, &key, mail("second"));

    let r1 = outcome(sending, "the first call").await;
    assert_eq!(r1.outcome, Outcome::Ok, "{r1:?}");
    assert_eq!(r1.result, Some(json!({ "sent": true, "to": "first" })));
    let r2 = outcome(following, "the second call with the key").await;
    assert_eq!(
        (r2.call_id, r2.outcome, &r2.result),
        (second, Outcome::Ok, &r1.result),
        "the second call gets the first's outcome under its own id: {r2:?}"
    );
    after_second();
    let (third, after) = start(client, &key, mail("third"));
    let r3 = outcome(after, "a third call with the key").await;
    assert_eq!((r3.call_id, &r3.result), (third, &r1.result), "{r3:?}");
    // Another key runs.
    let (_, other) = start(
        client,
        &format!("{key}-b"),
        json!({ "outbox": outbox, "to": "other" }),
    );
    let r4 = outcome(other, "a call with another key").await;
    assert_eq!(r4.result, Some(json!({ "sent": true, "to": "other" })));

    let sent = std::fs::read_to_string(&outbox).unwrap();
    let lines: Vec<&str> = sent.lines().collect();
    assert_eq!(lines.len(), 2, "one mail per key: {sent}");
    assert!(lines[0].starts_with(&first.to_string()), "{sent}");
    second
}
