//! The retry scenario every broker runs: a worker of `echo` and `mail`
//! with a capacity of 2, and a client. `echo.flaky` fails with a
//! retryable error until a given attempt.
//!
//! Retried with backoff, a call ends `ok` at its third attempt no sooner
//! than the policy's shortest backoffs allow; one that keeps failing ends
//! `error` at its last attempt; a handler's `retry_after` is honoured, and
//! while the call waits for it the worker holds no slot and serves others;
//! without a policy the error is the outcome at once.

use std::time::Duration;

use callq_node::{Admin, CallOptions, Client};
use callq_schemas::{Outcome, Reply, RetryPolicy};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::wait_status;

/// The capacity the scenario's worker must have.
pub const CAPACITY: u32 = 2;

/// How long a retry may come after it is due, at most, on a busy machine.
const LATE: Duration = Duration::from_secs(20);

fn start(
    client: &Client,
    args: Value,
    retry: Option<RetryPolicy>,
) -> JoinHandle<(Reply, Duration)> {
    let client = client.clone();
    tokio::spawn(async move {
        let opts = CallOptions {
            retry,
            timeout: Some(Duration::from_secs(60)),
            ..CallOptions::default()
        };
        let clock = Instant::now();
        let reply = client.call("echo", "flaky", args, opts).await.unwrap();
        (reply, clock.elapsed())
    })
}

async fn outcome(waiting: JoinHandle<(Reply, Duration)>, what: &str) -> (Reply, Duration) {
    super::joined(waiting, Duration::from_secs(90), what).await
}

fn policy(max_attempts: u32, backoff_ms: u64) -> Option<RetryPolicy> {
    Some(RetryPolicy {
        max_attempts,
        backoff_ms,
        max_backoff_ms: 60_000,
    })
}

/// Runs the scenario.
pub async fn scenario(client: &Client, admin: &Admin) {
    // Backoffs of at least 200 and 400 ms (half of 400 and 800).
    let third = start(client, json!({ "ok_at": 3 }), policy(5, 400));
    let failing = start(client, json!({ "ok_at": 99 }), policy(3, 100));
    let once = start(client, json!({ "ok_at": 2 }), None);
    let told = start(
        client,
        json!({ "ok_at": 2, "retry_after_ms": 3_000 }),
        policy(2, 10),
    );

    let (r, _) = outcome(once, "the call without a policy").await;
    assert_eq!(
        (r.outcome, r.attempt, r.code()),
        (Outcome::Error, 1, Some("try_again")),
        "{r:?}"
    );
    // While the told call waits, the worker holds no slot and serves.
    let echo = client
        .call(
            "echo",
            "echo",
            json!({ "meanwhile": true }),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(echo.outcome, Outcome::Ok);
    wait_status(
        admin,
        "every slot free while a retry waits",
        Duration::from_secs(10),
        |s| s.workers.len() == 1 && s.workers[0].free == CAPACITY,
    )
    .await;
    assert!(
        !told.is_finished(),
        "the told call came back before its retry_after"
    );

    let (r, took) = outcome(third, "the call that succeeds at its third attempt").await;
    assert_eq!((r.outcome, r.attempt), (Outcome::Ok, 3), "{r:?}");
    assert_eq!(r.result, Some(json!({ "attempt": 3 })));
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1_200) + LATE,
        "two backoffs of at least 200 and 400 ms took {took:?}"
    );
    let (r, _) = outcome(failing, "the call that keeps failing").await;
    assert_eq!(
        (r.outcome, r.attempt, r.code()),
        (Outcome::Error, 3, Some("try_again")),
        "{r:?}"
    );
    let (r, took) = outcome(told, "the call told to retry after 3 s").await;
    assert_eq!((r.outcome, r.attempt), (Outcome::Ok, 2), "{r:?}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(3) + LATE,
        "retry_after 3 s, the policy's 10 ms backoff ignored: took {took:?}"
    );
}
