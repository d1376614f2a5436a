//! Replay of a capture file into handlers on the embedded broker.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use callq_broker_embedded::EmbeddedBroker;
use callq_node::capture::{Body, Origin, Record, Writer};
use callq_node::replay::{ReplayError, ReplayOptions, ReplayReport, Verdict, replay_on};
use callq_node::{Service, services};
use callq_schemas::{Call, Reply};
use serde_json::{Value, json};

const CALLS: usize = 50;

/// Replays `file` through `services` on an embedded broker of its own.
async fn replay_into(
    services: Vec<Service>,
    file: &[u8],
    opts: ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    replay_on(Arc::new(EmbeddedBroker::new()), services, file, opts).await
}

/// A capture of `echo.echo` traffic as the built-in echo answered it, with
/// a bad line in the middle and a truncated one at the end.
fn capture() -> (Vec<u8>, Vec<Call>) {
    let mut w = Writer::new(Vec::new(), "embedded", "echo").unwrap();
    let mut calls = Vec::new();
    for i in 0..CALLS {
        let mut call = Call::new("echo", "echo", json!({ "i": i, "tags": ["a", i] }));
        call.reply_to = Some("callq.reply.shop".into());
        // Long past at replay time: the replay drops it.
        call.deadline = Some(time::OffsetDateTime::UNIX_EPOCH);
        w.write(&Record::Call {
            origin: Origin::default(),
            at_ms: i as u64,
            attempt: 1,
            headers: BTreeMap::new(),
            body: Body::of(&call.to_bytes()),
        })
        .unwrap();
        let reply = Reply::ok(call.call_id, 1, call.args.clone());
        w.write(&Record::Reply {
            origin: Origin::default(),
            at_ms: i as u64 + 1,
            body: Body::of(&reply.to_bytes()),
        })
        .unwrap();
        calls.push(call);
    }
    let mut file = w.finish().unwrap();
    // Line 2 + 2 * CALLS: a record that is not a call; then a truncated one.
    file.extend_from_slice(
        b"{\"type\": \"heartbeat\", \"at_ms\": 1}\n{\"type\": \"call\", \"at_ms\": 3, \"bo",
    );
    (file, calls)
}

#[tokio::test]
async fn a_bad_line_is_named_and_skip_bad_replays_the_rest() {
    let (file, _) = capture();
    let err = replay_into(
        vec![services::echo()],
        file.as_slice(),
        ReplayOptions::default(),
    )
    .await
    .unwrap_err();
    let ReplayError::Line(e) = err else {
        panic!("{err}")
    };
    assert_eq!(e.line, 2 + 2 * CALLS, "{e}");
    assert!(e.reason.contains("not a call or reply"), "{e}");

    let report = replay_into(
        vec![services::echo()],
        file.as_slice(),
        ReplayOptions {
            skip_bad: true,
            ..ReplayOptions::default()
        },
    )
    .await
    .unwrap();
    let lines: Vec<usize> = report.skipped.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2 + 2 * CALLS, 3 + 2 * CALLS]);
    assert!(
        report.skipped[1].reason.contains("truncated"),
        "{:?}",
        report.skipped
    );
    assert_eq!(report.calls.len(), CALLS);
    report.assert_same();
    assert!(report.calls.iter().all(|c| c.verdict == Verdict::Same));
}

/// An `echo` whose output changed: it tags its answer.
fn changed_echo() -> Service {
    Service::new("echo").method("echo", |_ctx, args: Value| async move {
        let mut out = args;
        out["tags"][1] = json!("changed");
        Ok(out)
    })
}

#[tokio::test]
async fn a_changed_handler_fails_the_replay_naming_the_call_and_the_difference() {
    let (file, calls) = capture();
    let opts = ReplayOptions {
        skip_bad: true,
        ..ReplayOptions::default()
    };
    let report = replay_into(vec![changed_echo()], file.as_slice(), opts.clone())
        .await
        .unwrap();
    let failures = report.failures();
    assert_eq!(failures.len(), CALLS, "{failures:#?}");
    let first = &failures[0];
    assert!(
        first.contains(&calls[0].call_id.to_string())
            && first.contains("line 2")
            && first.contains("at /result/tags/1: captured 0, replayed \"changed\""),
        "{first}"
    );
    let panicked = std::panic::catch_unwind(|| report.assert_same());
    assert!(panicked.is_err(), "assert_same must fail");

    // The field named as ignored is not compared.
    let report = replay_into(
        vec![changed_echo()],
        file.as_slice(),
        ReplayOptions {
            ignore: vec!["/result/tags/1".into()],
            ..opts
        },
    )
    .await
    .unwrap();
    report.assert_same();
}
