//! Replay of a capture into handlers with crashes injected: each call ends
//! exactly once with the outcome the contract promises for where its worker
//! died, effects happen at most once, and a seed makes the run repeatable.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use callq_node::capture::{Body, Origin, Record, Writer};
use callq_node::{HandlerError, Service};
use callq_schemas::{Call, Reply, Uuid, protocol};
use callq_testkit::crashes::{CrashMode, CrashOptions, CrashReport, replay_with_crashes};
use callq_testkit::faults::CrashPoint;
use serde_json::{Value, json};

const PER_METHOD: usize = 40;

/// Effects the `shop` handlers left, per call.
#[derive(Default, Clone)]
struct Effects {
    /// `pay`: a card charge after the trace `card.charged`, counted.
    charged: Arc<Mutex<HashMap<Uuid, u32>>>,
    /// `book`: a booking committed once with its result, as an outbox row
    /// under the exact trace does.
    booked: Arc<Mutex<HashMap<Uuid, Value>>>,
}

/// `shop`: `quote` is traceless, `pay` charges after a plain trace, `book`
/// commits under an exact trace and answers the committed result again.
fn shop(effects: &Effects, quote_factor: u64) -> Service {
    let charged = effects.charged.clone();
    let booked = effects.booked.clone();
    Service::new("shop")
        .method("quote", move |_ctx, args: Value| async move {
            let n = args["n"]
                .as_u64()
                .ok_or_else(|| HandlerError::invalid_args("n"))?;
            Ok(json!({ "price": n * quote_factor }))
        })
        .method("pay", move |ctx, args: Value| {
            let charged = charged.clone();
            async move {
                ctx.trace("card.charged").await?;
                *charged.lock().unwrap().entry(ctx.call_id()).or_default() += 1;
                Ok(json!({ "paid": args["n"] }))
            }
        })
        .method("book", move |ctx, args: Value| {
            let booked = booked.clone();
            async move {
                if let Some(done) = booked.lock().unwrap().get(&ctx.call_id()) {
                    return Ok(done.clone());
                }
                ctx.trace(protocol::EXACT_TRACE).await?;
                let result = json!({ "booked": args["n"] });
                Ok(booked
                    .lock()
                    .unwrap()
                    .entry(ctx.call_id())
                    .or_insert(result)
                    .clone())
            }
        })
}

/// A capture file of `calls`, each with its `ok` reply, a millisecond apart.
fn capture_of(broker: &str, service: &str, calls: Vec<(Call, Value)>) -> Vec<u8> {
    let mut w = Writer::new(Vec::new(), broker, service).unwrap();
    for (at_ms, (call, result)) in (0..).zip(calls) {
        w.write(&Record::Call {
            origin: Origin::default(),
            at_ms,
            attempt: 1,
            headers: BTreeMap::new(),
            body: Body::of(&call.to_bytes()),
        })
        .unwrap();
        w.write(&Record::Reply {
            origin: Origin::default(),
            at_ms,
            body: Body::of(&Reply::ok(call.call_id, 1, result).to_bytes()),
        })
        .unwrap();
    }
    w.finish().unwrap()
}

/// A capture of shop traffic as `shop(_, 3)` answered it: quote, pay and
/// book calls interleaved, each with its reply.
fn capture() -> Vec<u8> {
    let calls = (0..PER_METHOD as u64 * 3)
        .map(|n| {
            let (method, result) = match n % 3 {
                0 => ("quote", json!({ "price": n * 3 })),
                1 => ("pay", json!({ "paid": n })),
                _ => ("book", json!({ "booked": n })),
            };
            (Call::new("shop", method, json!({ "n": n })), result)
        })
        .collect();
    capture_of("embedded", "shop", calls)
}

async fn replay(mode: CrashMode, effects: &Effects, quote_factor: u64) -> CrashReport {
    replay_file(&capture(), mode, effects, quote_factor).await
}

async fn replay_file(
    file: &[u8],
    mode: CrashMode,
    effects: &Effects,
    quote_factor: u64,
) -> CrashReport {
    let report = replay_with_crashes(
        vec![shop(effects, quote_factor)],
        file,
        CrashOptions {
            mode,
            ..CrashOptions::default()
        },
    )
    .await
    .unwrap();
    println!("{}", report.summary());
    report
}

fn outcome(reply: &Value) -> &str {
    reply["outcome"].as_str().unwrap()
}

/// Effects agree with the outcomes: a charge at most once, and exactly
/// when the call is `ok` or was lost after its charge; a booking exactly
/// once per call.
fn check_effects(report: &CrashReport, effects: &Effects) {
    let charged = effects.charged.lock().unwrap();
    let booked = effects.booked.lock().unwrap();
    for call in &report.calls {
        let id = call.call_id.unwrap();
        let times = charged.get(&id).copied().unwrap_or(0);
        match call.what.as_str() {
            "shop.pay" => {
                let expected = match (&call.crash, outcome(&call.outcomes[0])) {
                    (_, "ok") => 1,
                    (Some(c), "fatal") if c.point == CrashPoint::BeforeReply => 1,
                    (Some(c), "fatal") if c.point == CrashPoint::AfterTrace => 0,
                    other => panic!("line {}: {other:?}", call.line),
                };
                assert_eq!(times, expected, "line {}: charged {times} times", call.line);
            }
            "shop.book" => assert!(booked.contains_key(&id), "line {}", call.line),
            _ => assert_eq!(times, 0),
        }
    }
    assert_eq!(booked.len(), PER_METHOD);
}

#[tokio::test(start_paused = true)]
async fn a_seed_crashes_calls_at_every_point_and_each_ends_exactly_once_repeatably() {
    let file = capture();
    let effects = Effects::default();
    let report = replay_file(&file, CrashMode::Random { seed: 7 }, &effects, 3).await;
    report.assert_exactly_once();
    check_effects(&report, &effects);

    // Every point was hit, on every kind of call it can reach.
    let hit = |point: CrashPoint, what: &str| {
        report
            .calls
            .iter()
            .filter(|c| c.what == what && c.crash.as_ref().is_some_and(|i| i.point == point))
            .count()
    };
    for what in ["shop.pay", "shop.book"] {
        for point in [
            CrashPoint::BeforeTrace,
            CrashPoint::AfterTrace,
            CrashPoint::BeforeReply,
        ] {
            assert!(hit(point, what) > 0, "no {what} crashed {point}");
        }
    }
    assert!(hit(CrashPoint::BeforeReply, "shop.quote") > 0);
    assert_eq!(hit(CrashPoint::BeforeTrace, "shop.quote"), 0);
    let crashed = report.calls.iter().filter(|c| c.crash.is_some()).count();
    assert_eq!(report.kills, crashed);
    // Fatal exactly where a plain trace was left; retried everywhere else.
    for call in &report.calls {
        let fatal = outcome(&call.outcomes[0]) == "fatal";
        let lost_after_charge = call.what == "shop.pay"
            && call
                .crash
                .as_ref()
                .is_some_and(|i| i.point != CrashPoint::BeforeTrace);
        assert_eq!(fatal, lost_after_charge, "line {}", call.line);
    }

    // The same seed gives the same run; another seed another one.
    let again = replay_file(&file, CrashMode::Random { seed: 7 }, &Effects::default(), 3).await;
    assert_eq!(report.fingerprint(), again.fingerprint());
    let other = replay_file(&file, CrashMode::Random { seed: 8 }, &Effects::default(), 3).await;
    other.assert_exactly_once();
    assert_ne!(report.fingerprint(), other.fingerprint());
}

#[tokio::test(start_paused = true)]
async fn killed_before_its_trace_every_call_is_retried_into_its_captured_reply() {
    let effects = Effects::default();
    let report = replay(CrashMode::BeforeTrace, &effects, 3).await;
    report.assert_exactly_once();
    check_effects(&report, &effects);
    for call in &report.calls {
        let reply = &call.outcomes[0];
        assert_eq!(outcome(reply), "ok", "line {}", call.line);
        if call.what == "shop.quote" {
            assert!(
                call.crash.is_none(),
                "a traceless call never reaches a trace"
            );
        } else {
            assert!(reply["attempt"].as_u64().unwrap() > 1, "{reply}");
        }
    }
    assert_eq!(report.kills, 2 * PER_METHOD);
}

#[tokio::test(start_paused = true)]
async fn killed_after_its_trace_a_call_is_fatal_unless_the_trace_is_exact() {
    let effects = Effects::default();
    let report = replay(CrashMode::AfterTrace, &effects, 3).await;
    report.assert_exactly_once();
    check_effects(&report, &effects);
    for call in &report.calls {
        let reply = &call.outcomes[0];
        match call.what.as_str() {
            "shop.pay" => {
                assert_eq!(outcome(reply), "fatal", "{reply}");
                assert_eq!(reply["error"]["traces"], json!(["card.charged"]));
            }
            _ => assert_eq!(outcome(reply), "ok", "{reply}"),
        }
    }
    assert!(report.summary().contains("every call ended exactly once"));
}

#[tokio::test(start_paused = true)]
async fn a_changed_handler_shows_as_a_difference_under_crashes() {
    let report = replay(CrashMode::BeforeReply, &Effects::default(), 4).await;
    assert!(report.violations().is_empty(), "{:?}", report.violations());
    let diffs = report.differences();
    // Every quote but the one of n = 0, whose price is 0 either way.
    assert_eq!(diffs.len(), PER_METHOD - 1, "{diffs:#?}");
    assert!(
        diffs[0].contains("shop.quote")
            && diffs[0].contains("at /result/price: captured 9, replayed 12"),
        "{}",
        diffs[0]
    );
    let panic = std::panic::catch_unwind(|| report.assert_exactly_once()).unwrap_err();
    let text = panic.downcast_ref::<String>().unwrap();
    assert!(
        text.contains("39 of 120 calls replayed with --kill-before-reply failed"),
        "{text}"
    );
}

/// `callq replay FILE --into echo,mail --kill-random SEED`, as a developer
/// runs it: the same seed prints the same report, every call ends once, and
/// no mail is sent twice.
#[test]
fn the_command_line_replays_with_crashes_repeatably() {
    let dir = std::env::temp_dir().join(format!("callq-crash-replay-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let outbox = dir.join("mail.outbox");
    let mails = 20;
    let calls = (0..2 * mails as u64)
        .map(|i| {
            if i % 2 == 0 {
                let args = json!({ "i": i });
                (Call::new("echo", "echo", args.clone()), args)
            } else {
                let to = format!("user{i}@example.com");
                let args = json!({ "outbox": outbox, "to": to, "subject": "hello" });
                (
                    Call::new("mail", "send", args),
                    json!({ "sent": true, "to": to }),
                )
            }
        })
        .collect();
    let file = dir.join("capture.jsonl");
    std::fs::write(&file, capture_of("amqp", "mail", calls)).unwrap();

    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_callq"))
            .arg("replay")
            .arg(&file)
            .args(["--into", "echo,mail"])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    let (code, first, stderr) = run(&["--kill-random", "11"]);
    assert_eq!(code, Some(0), "{first}\n{stderr}");
    assert!(first.contains("every call ended exactly once"), "{first}");
    // How many replies the client drops may vary with timing; the rest not.
    let stable = |s: &str| {
        s.split("; ")
            .filter(|part| !part.contains("repeated replies"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    // No mail was sent twice; every mail answered `ok` was sent, and a
    // `fatal` one at most once.
    let sent_ids = || {
        let sent = std::fs::read_to_string(&outbox).unwrap();
        std::fs::remove_file(&outbox).unwrap();
        let ids: Vec<String> = sent
            .lines()
            .map(|l| l.split('\t').next().unwrap().to_owned())
            .collect();
        let unique: std::collections::BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(unique.len(), ids.len(), "a mail was sent twice:\n{sent}");
        unique
    };
    let sent = sent_ids();
    let count = |what: &str| {
        first
            .split([',', ';', ':'])
            .find_map(|part| part.trim().strip_suffix(what)?.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    let ok_mails = count(" ok") - 20;
    let fatal = count(" fatal");
    assert!(fatal > 0 && ok_mails > 0, "{first}");
    assert_eq!(ok_mails + fatal, mails, "{first}");
    assert!(
        sent.len() >= ok_mails && sent.len() <= mails,
        "{} mails sent for {ok_mails} ok:\n{first}",
        sent.len()
    );

    let (code, second, _) = run(&["--kill-random", "11"]);
    assert_eq!(code, Some(0));
    assert_eq!(stable(&first), stable(&second));
    assert_eq!(sent, sent_ids(), "the same seed sent other mails");

    // A kill option needs --into (a usage error: 64); an unknown service
    // is named.
    let (code, _, stderr) = run(&["--kill-random", "1", "--to", "amqp://x"]);
    assert_eq!(code, Some(64), "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_callq"))
        .arg("replay")
        .arg(&file)
        .args(["--into", "shop", "--kill-after-trace"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no built-in service `shop`"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
