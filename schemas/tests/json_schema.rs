#![allow(clippy::unwrap_used, missing_docs)]
//! The public JSON Schema files in `schemas/json/` against everything else
//! that states the wire contract: DESIGN.md's examples, the serde types, the
//! decoder the workers run, and the examples in `schemas/README.md`.
//!
//! The schema and [`decode_call`] must agree on every body, except for the
//! exceptions listed in [`call_exceptions`], each with its reason. Limits
//! (size, depth) are the decoder's alone and have their own test.

use std::path::{Path, PathBuf};

use callq_schemas::{Call, DecodeError, Limits, Reply, Uuid, decode_call, decode_reply};
use jsonschema::Validator;
use serde_json::{Map, Value, json};
use time::macros::datetime;

const CALL: &str = "call.v1.schema.json";
const REPLY: &str = "reply.v1.schema.json";
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";
/// The call id of DESIGN.md's example.
const ID: &str = "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f";
const NIL: &str = "00000000-0000-0000-0000-000000000000";

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn schema(name: &str) -> Value {
    let path = manifest_path(&format!("json/{name}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A validator that asserts `format` too, as a strict validator does.
fn strict(name: &str) -> Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema(name))
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"))
}

/// A validator that treats `format` as an annotation only: the 2020-12
/// default, and what many validators in other languages do.
fn annotating(name: &str) -> Validator {
    jsonschema::options()
        .should_validate_formats(false)
        .build(&schema(name))
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"))
}

/// Every error, as "`/pointer`: message".
fn errors(v: &Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("`{}`: {e}", e.instance_path()))
        .collect()
}

#[track_caller]
fn assert_valid(v: &Validator, what: &str, instance: &Value) {
    let errs = errors(v, instance);
    assert!(
        errs.is_empty(),
        "{what} should validate, but: {errs:#?}\n{instance:#}"
    );
}

/// Asserts that `instance` is rejected with an error that mentions `needle`
/// (a JSON pointer in backquotes, or a word of the message).
#[track_caller]
fn assert_rejected(v: &Validator, what: &str, instance: &Value, needle: &str) {
    let errs = errors(v, instance);
    assert!(!errs.is_empty(), "{what} should be rejected:\n{instance:#}");
    assert!(
        errs.iter().any(|e| e.contains(needle)),
        "{what} was rejected, but not for `{needle}`: {errs:#?}"
    );
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

// ---------------------------------------------------------------- (a) ----

#[test]
fn schema_files_are_valid_json_schema_2020_12() {
    for name in [CALL, REPLY] {
        let s = schema(name);
        assert_eq!(s["$schema"], DRAFT_2020_12, "{name}");
        if let Err(e) = jsonschema::draft202012::meta::validate(&s) {
            panic!(
                "{name} is not a valid draft 2020-12 schema: {e} at `{}`",
                e.instance_path()
            );
        }
        // Compiles, with every pattern, in both format modes.
        let (strict, annotating) = (strict(name), annotating(name));
        // The schema's own examples are valid under it.
        let examples = s["examples"].as_array().unwrap();
        assert!(!examples.is_empty(), "{name} has no examples");
        for (i, example) in examples.iter().enumerate() {
            assert_valid(&strict, &format!("{name} examples[{i}]"), example);
            assert_valid(&annotating, &format!("{name} examples[{i}]"), example);
        }
        // Every property is documented for publishers.
        for (key, prop) in s["properties"].as_object().unwrap() {
            assert!(
                prop["description"].is_string(),
                "{name}: `{key}` has no description"
            );
        }
    }
}

#[test]
fn the_call_schema_documents_what_travels_outside_the_body() {
    let s = schema(CALL);
    let description = s["description"].as_str().unwrap();
    for needle in [
        "callq-attempt",
        "callq.call.<service>",
        "callq.dead.<service>",
        "1 MiB",
        "64 levels",
        "BEFORE parsing",
        "configure",
    ] {
        assert!(
            description.contains(needle),
            "the call schema's description does not mention `{needle}`"
        );
    }
    assert!(
        s["properties"]["call_id"]["description"]
            .as_str()
            .unwrap()
            .contains("version 7")
    );
}

// ---------------------------------------------------------------- (b) ----

// Copied verbatim from DESIGN.md, "Wire contract (version 1)".
const DESIGN_CALL: &str = r#"{"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f",
 "service": "bank", "method": "transfer", "args": {"from": "a", "to": "b", "cents": 500},
 "reply_to": "callq.reply.shop-1", "session_id": "s-42",
 "deadline": "2026-11-22T12:00:05Z", "idempotency_key": "order-981",
 "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#;
const DESIGN_REPLIES: [&str; 3] = [
    r#"{"v": 1, "call_id": "...", "attempt": 2, "outcome": "ok", "result": {"balance": 1200}}"#,
    r#"{"v": 1, "call_id": "...", "attempt": 1, "outcome": "error",
 "error": {"code": "insufficient_funds", "message": "account a has 300, needs 500"}}"#,
    r#"{"v": 1, "call_id": "...", "attempt": 1, "outcome": "fatal",
 "error": {"code": "worker_lost_after_traces", "message": "...", "traces": ["mail.sent"]}}"#,
];

#[test]
fn design_examples_validate() {
    let call = parse(DESIGN_CALL);
    assert_valid(&strict(CALL), "DESIGN.md's call", &call);
    assert_valid(&annotating(CALL), "DESIGN.md's call", &call);
    decode_call(DESIGN_CALL.as_bytes(), &Limits::default()).unwrap();

    let (strict, annotating) = (strict(REPLY), annotating(REPLY));
    for (i, text) in DESIGN_REPLIES.iter().enumerate() {
        // DESIGN.md elides the call id as "...", which is not a UUID: that
        // must be the only thing wrong with the examples.
        let verbatim = parse(text);
        let errs = errors(&strict, &verbatim);
        assert!(
            !errs.is_empty() && errs.iter().all(|e| e.starts_with("`/call_id`")),
            "DESIGN.md reply {i}: {errs:#?}"
        );

        let reply = parse(&text.replace(r#""call_id": "...""#, &format!(r#""call_id": "{ID}""#)));
        assert_valid(&strict, &format!("DESIGN.md reply {i}"), &reply);
        assert_valid(&annotating, &format!("DESIGN.md reply {i}"), &reply);
        decode_reply(&serde_json::to_vec(&reply).unwrap(), &Limits::default()).unwrap();
    }
}

// ---------------------------------------------------------------- (c) ----

/// A call with every optional field set, the deadline with a fraction and a
/// non-UTC offset.
fn full_call() -> Call {
    let mut call = Call::new(
        "bank.eu-1_x",
        "transfer",
        json!({"from": "a", "to": "b", "cents": 500}),
    );
    call.reply_to = Some("callq.reply.shop-1".into());
    call.session_id = Some("s-42".into());
    call.deadline = Some(datetime!(2026-11-22 12:00:05.25 +05:30));
    call.not_before = Some(datetime!(2026-11-22 12:00:01 UTC));
    call.retry = Some(callq_schemas::RetryPolicy {
        max_attempts: 3,
        backoff_ms: 200,
        max_backoff_ms: 5_000,
    });
    call.idempotency_key = Some("order-981".into());
    call.concurrency_key = Some("account-17".into());
    call.priority = Some(7);
    call.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    call
}

fn replies() -> Vec<(&'static str, Reply)> {
    let id = Uuid::now_v7();
    vec![
        ("ok", Reply::ok(id, 2, json!({"balance": 1200}))),
        ("ok with a null result", Reply::ok(id, 1, Value::Null)),
        (
            "error",
            Reply::error(id, 1, "insufficient_funds", "account a has 300, needs 500"),
        ),
        (
            "fatal with traces",
            Reply::fatal(id, 3, "lost", vec!["mail.sent".into(), "db.commit".into()]),
        ),
        (
            "fatal without traces",
            Reply::fatal(id, 1, "lost", Vec::new()),
        ),
        ("expired", Reply::expired(id, 1)),
        (
            "bad_request, id unreadable",
            Reply::bad_request(None, "body is not JSON"),
        ),
        (
            "bad_request, id read",
            Reply::bad_request(Some(id), "unknown version"),
        ),
    ]
}

#[test]
fn bodies_of_the_serde_types_validate() {
    let calls = [
        ("Call::new", Call::new("echo", "echo", json!(null))),
        ("a call with every option", full_call()),
        (
            "a call with a UTC deadline",
            Call {
                deadline: Some(datetime!(2026-11-22 12:00:05 UTC)),
                ..full_call()
            },
        ),
    ];
    let (strict_call, annotating_call) = (strict(CALL), annotating(CALL));
    for (what, call) in calls {
        let body: Value = serde_json::from_slice(&call.to_bytes()).unwrap();
        assert_valid(&strict_call, what, &body);
        assert_valid(&annotating_call, what, &body);
    }
    let body: Value = serde_json::from_slice(&full_call().to_bytes()).unwrap();
    assert_eq!(
        body.as_object().unwrap().len(),
        14,
        "every optional field is on the wire: {body:#}"
    );

    let (strict_reply, annotating_reply) = (strict(REPLY), annotating(REPLY));
    for (what, reply) in replies() {
        let body: Value = serde_json::from_slice(&reply.to_bytes()).unwrap();
        assert_valid(&strict_reply, what, &body);
        assert_valid(&annotating_reply, what, &body);
    }
}

/// The schemas name exactly the fields the serde types write, so adding a
/// field to `Call` or `Reply` without publishing it fails here.
#[test]
fn the_schemas_name_every_field_of_the_serde_types() {
    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }
    let call: Value = serde_json::from_slice(&full_call().to_bytes()).unwrap();
    assert_eq!(keys(&schema(CALL)["properties"]), keys(&call));

    let reply = schema(REPLY);
    let (_, fatal) = replies()
        .into_iter()
        .find(|(w, _)| *w == "fatal with traces")
        .unwrap();
    let fatal: Value = serde_json::from_slice(&fatal.to_bytes()).unwrap();
    let mut written = keys(&fatal);
    written.push("result".into());
    written.sort();
    assert_eq!(keys(&reply["properties"]), written);
    assert_eq!(
        keys(&reply["properties"]["error"]["properties"]),
        keys(&fatal["error"])
    );
    let outcomes: Vec<&str> = reply["properties"]["outcome"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["ok", "error", "fatal", "expired", "cancelled"]);
}

// ---------------------------------------------------------------- (d) ----

fn good_call() -> Value {
    parse(DESIGN_CALL)
}

fn good_reply(outcome: &str) -> Value {
    let mut r = json!({"v": 1, "call_id": ID, "attempt": 1, "outcome": outcome});
    if outcome == "ok" {
        r["result"] = json!({"balance": 1200});
    } else {
        r["error"] = json!({"code": "c", "message": "m"});
    }
    r
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

#[test]
fn bad_calls_are_rejected() {
    for validator in [strict(CALL), annotating(CALL)] {
        for field in ["v", "call_id", "service", "method", "args"] {
            let body = without(good_call(), field);
            assert_rejected(
                &validator,
                &format!("a call without `{field}`"),
                &body,
                &format!("\"{field}\" is a required property"),
            );
        }
        let cases = [
            ("v: 2", with(good_call(), "v", json!(2)), "`/v`"),
            ("v: \"1\"", with(good_call(), "v", json!("1")), "`/v`"),
            (
                "call_id: 42",
                with(good_call(), "call_id", json!(42)),
                "`/call_id`",
            ),
            (
                "call_id: not a UUID",
                with(good_call(), "call_id", json!("order-981")),
                "`/call_id`",
            ),
            (
                "call_id: the nil UUID",
                with(good_call(), "call_id", json!(NIL)),
                "`/call_id`",
            ),
            (
                "service: \"\"",
                with(good_call(), "service", json!("")),
                "`/service`",
            ),
            (
                "service: \"a/b\"",
                with(good_call(), "service", json!("a/b")),
                "`/service`",
            ),
            (
                "service: with a newline",
                with(good_call(), "service", json!("bank\n")),
                "`/service`",
            ),
            (
                "method: \"\"",
                with(good_call(), "method", json!("")),
                "`/method`",
            ),
            (
                "reply_to: 5",
                with(good_call(), "reply_to", json!(5)),
                "`/reply_to`",
            ),
            (
                "deadline: no offset",
                with(good_call(), "deadline", json!("2026-11-22T12:00:05")),
                "`/deadline`",
            ),
            (
                "deadline: Unix time",
                with(good_call(), "deadline", json!(1_795_348_805)),
                "`/deadline`",
            ),
            (
                "traceparent: garbage",
                with(good_call(), "traceparent", json!("garbage")),
                "`/traceparent`",
            ),
            (
                "traceparent: version ff",
                with(
                    good_call(),
                    "traceparent",
                    json!("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                ),
                "`/traceparent`",
            ),
            (
                "traceparent: zero trace id",
                with(
                    good_call(),
                    "traceparent",
                    json!("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
                ),
                "`/traceparent`",
            ),
            (
                "traceparent: zero parent id",
                with(
                    good_call(),
                    "traceparent",
                    json!("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
                ),
                "`/traceparent`",
            ),
            (
                "traceparent: v00 with a suffix",
                with(
                    good_call(),
                    "traceparent",
                    json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"),
                ),
                "`/traceparent`",
            ),
            (
                "traceparent: uppercase",
                with(
                    good_call(),
                    "traceparent",
                    json!("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"),
                ),
                "`/traceparent`",
            ),
            (
                "an array",
                json!([1, ID, "bank", "transfer", {}]),
                "\"object\"",
            ),
            ("null", Value::Null, "\"object\""),
        ];
        for (what, body, needle) in cases {
            assert_rejected(&validator, what, &body, needle);
        }
    }
    // A later W3C version may append fields; that is valid.
    let later = with(
        good_call(),
        "traceparent",
        json!("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next"),
    );
    assert_valid(&strict(CALL), "a traceparent of a later version", &later);
}

#[test]
fn bad_replies_are_rejected() {
    for validator in [strict(REPLY), annotating(REPLY)] {
        for field in ["v", "call_id", "attempt", "outcome"] {
            let body = without(good_reply("ok"), field);
            assert_rejected(
                &validator,
                &format!("a reply without `{field}`"),
                &body,
                &format!("\"{field}\" is a required property"),
            );
        }
        for outcome in ["error", "fatal", "expired"] {
            let body = without(good_reply(outcome), "error");
            assert_rejected(
                &validator,
                &format!("outcome {outcome} without `error`"),
                &body,
                "\"error\" is a required property",
            );
        }
        let cases = [
            (
                "outcome \"maybe\"",
                with(good_reply("ok"), "outcome", json!("maybe")),
                "`/outcome`",
            ),
            (
                "outcome \"OK\"",
                with(good_reply("ok"), "outcome", json!("OK")),
                "`/outcome`",
            ),
            (
                "ok without a result",
                without(good_reply("ok"), "result"),
                "\"result\" is a required property",
            ),
            ("v: 2", with(good_reply("ok"), "v", json!(2)), "`/v`"),
            (
                "call_id: 42",
                with(good_reply("ok"), "call_id", json!(42)),
                "`/call_id`",
            ),
            (
                "attempt: 0",
                with(good_reply("ok"), "attempt", json!(0)),
                "`/attempt`",
            ),
            (
                "attempt: 1.5",
                with(good_reply("ok"), "attempt", json!(1.5)),
                "`/attempt`",
            ),
            (
                "attempt: above u32",
                with(good_reply("ok"), "attempt", json!(4_294_967_296_u64)),
                "`/attempt`",
            ),
            (
                "error without a code",
                with(good_reply("error"), "error", json!({"message": "m"})),
                "\"code\" is a required property",
            ),
            (
                "error without a message",
                with(good_reply("error"), "error", json!({"code": "c"})),
                "\"message\" is a required property",
            ),
            (
                "error as a string",
                with(good_reply("error"), "error", json!("c")),
                "`/error`",
            ),
            (
                "traces not strings",
                with(
                    good_reply("fatal"),
                    "error",
                    json!({"code": "c", "message": "m", "traces": [1]}),
                ),
                "`/error/traces/0`",
            ),
        ];
        for (what, body, needle) in cases {
            assert_rejected(&validator, what, &body, needle);
        }
    }
}

// ---------------------------------------------------------------- (e) ----

/// DESIGN.md's call with `edit` applied, as bytes.
fn edited(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut call = good_call();
    edit(call.as_object_mut().unwrap());
    serde_json::to_string(&call).unwrap()
}

fn set(key: &'static str, value: Value) -> impl FnOnce(&mut Map<String, Value>) {
    move |m| {
        m.insert(key.into(), value);
    }
}

fn unset(key: &'static str) -> impl FnOnce(&mut Map<String, Value>) {
    move |m| {
        m.remove(key);
    }
}

/// Call bodies on which the schema and the decoder agree: (name, body,
/// whether both accept it).
fn agreed_calls() -> Vec<(&'static str, Vec<u8>, bool)> {
    let cases: Vec<(&'static str, String, bool)> = vec![
        // Accepted by both.
        ("DESIGN.md's example", DESIGN_CALL.into(), true),
        ("only the required fields", r#"{"v":1,"call_id":"0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f","service":"echo","method":"echo","args":1}"#.into(), true),
        ("args null", edited(set("args", Value::Null)), true),
        ("args an array", edited(set("args", json!([1, "two", [3]]))), true),
        ("args with brackets and a reply_to inside strings", edited(set("args", json!({"t": "[[{{\"", "reply_to": "x"}))), true),
        ("an unknown field (forward compatibility)", edited(set("urgency", json!({"level": 3}))), true),
        ("priority 0", edited(set("priority", json!(0))), true),
        ("priority 9", edited(set("priority", json!(9))), true),
        ("call_id in uppercase", edited(set("call_id", json!(ID.to_uppercase()))), true),
        ("call_id a UUID v4 (must be v7, not checked)", edited(set("call_id", json!("9b2f3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"))), true),
        ("call_id the max UUID", edited(set("call_id", json!("ffffffff-ffff-ffff-ffff-ffffffffffff"))), true),
        ("service with `.`, `-`, `_` and digits", edited(set("service", json!("Bank.eu-1_x"))), true),
        ("method with spaces and non-ASCII", edited(set("method", json!("перевод денег"))), true),
        ("deadline with a fraction and an offset", edited(set("deadline", json!("2026-11-22T12:00:05.123456789+05:30"))), true),
        ("deadline in lowercase t and z", edited(set("deadline", json!("2026-11-22t12:00:05z"))), true),
        ("deadline with offset -00:00", edited(set("deadline", json!("2026-11-22T12:00:05-00:00"))), true),
        ("deadline on a leap second", edited(set("deadline", json!("2016-12-31T23:59:60Z"))), true),
        ("reply_to a RabbitMQ server-named queue", edited(set("reply_to", json!("amq.gen-JzTY20BRgKO-HjmUJj0wLg"))), true),
        ("reply_to RabbitMQ's direct reply-to", edited(set("reply_to", json!("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxNjE0NTM0NzIAAAAMAAAAAAAAAAA="))), true),
        ("reply_to of 255 characters", edited(set("reply_to", json!("r".repeat(255)))), true),
        ("service of 238 characters", edited(set("service", json!("s".repeat(238)))), true),
        ("method of 255 non-ASCII characters", edited(set("method", json!("п".repeat(255)))), true),
        // Rejected by both.
        ("not JSON", "call bank.transfer".into(), false),
        ("truncated JSON", DESIGN_CALL[..40].into(), false),
        ("a lone surrogate escape", edited(set("session_id", json!("X"))).replace(r#""X""#, r#""\ud800""#), false),
        ("a JSON string", r#""0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f""#.into(), false),
        ("missing v", edited(unset("v")), false),
        ("missing call_id", edited(unset("call_id")), false),
        ("missing service", edited(unset("service")), false),
        ("missing method", edited(unset("method")), false),
        ("missing args", edited(unset("args")), false),
        ("v: 2", edited(set("v", json!(2))), false),
        ("v: 0", edited(set("v", json!(0))), false),
        ("v: -1", edited(set("v", json!(-1))), false),
        ("v: \"1\"", edited(set("v", json!("1"))), false),
        ("v: null", edited(set("v", Value::Null)), false),
        ("call_id: 42", edited(set("call_id", json!(42))), false),
        ("call_id: not a UUID", edited(set("call_id", json!("order-981"))), false),
        ("call_id: one digit short", edited(set("call_id", json!(&ID[1..]))), false),
        ("call_id: the nil UUID", edited(set("call_id", json!(NIL))), false),
        ("service: \"\"", edited(set("service", json!(""))), false),
        ("service: \"a/b\"", edited(set("service", json!("a/b"))), false),
        ("service: with a trailing newline", edited(set("service", json!("bank\n"))), false),
        ("service: non-ASCII letters", edited(set("service", json!("bänk"))), false),
        ("service: a number", edited(set("service", json!(7))), false),
        ("method: \"\"", edited(set("method", json!(""))), false),
        ("method: null", edited(set("method", Value::Null)), false),
        ("reply_to: a number", edited(set("reply_to", json!(5))), false),
        ("reply_to empty", edited(set("reply_to", json!(""))), false),
        ("reply_to of 256 characters", edited(set("reply_to", json!("r".repeat(256)))), false),
        ("reply_to of 10,000 characters", edited(set("reply_to", json!("r".repeat(10_000)))), false),
        ("reply_to with a space", edited(set("reply_to", json!("reply queue"))), false),
        ("reply_to non-ASCII", edited(set("reply_to", json!("réponse"))), false),
        ("reply_to the coordinator's queue", edited(set("reply_to", json!("callq.coordinator"))), false),
        ("reply_to the heartbeat queue", edited(set("reply_to", json!("callq.heartbeats"))), false),
        ("reply_to a worker's order queue", edited(set("reply_to", json!("callq.worker.w1"))), false),
        ("reply_to a call queue", edited(set("reply_to", json!("callq.call.bank"))), false),
        ("reply_to a dead-letter queue", edited(set("reply_to", json!("callq.dead.bank"))), false),
        ("reply_to a high band's queue", edited(set("reply_to", json!("callq.high.bank"))), false),
        ("priority 10", edited(set("priority", json!(10))), false),
        ("priority -1", edited(set("priority", json!(-1))), false),
        ("priority 2.5", edited(set("priority", json!(2.5))), false),
        ("priority \"9\"", edited(set("priority", json!("9"))), false),
        ("service of 239 characters", edited(set("service", json!("s".repeat(239)))), false),
        ("method of 256 characters", edited(set("method", json!("m".repeat(256)))), false),
        ("session_id of 256 characters", edited(set("session_id", json!("s".repeat(256)))), false),
        ("idempotency_key of 256 characters", edited(set("idempotency_key", json!("k".repeat(256)))), false),
        ("traceparent of 256 characters", edited(set("traceparent", json!(format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-{}", "x".repeat(200))))), false),
        ("session_id: an array", edited(set("session_id", json!(["s-42"]))), false),
        ("idempotency_key: an object", edited(set("idempotency_key", json!({"k": 1}))), false),
        ("traceparent: a number", edited(set("traceparent", json!(1))), false),
        ("deadline: no offset", edited(set("deadline", json!("2026-11-22T12:00:05"))), false),
        ("deadline: February 30", edited(set("deadline", json!("2026-02-30T12:00:05Z"))), false),
        ("deadline: hour 24", edited(set("deadline", json!("2026-11-22T24:00:00Z"))), false),
        ("deadline: prose", edited(set("deadline", json!("tomorrow"))), false),
        ("deadline: Unix time", edited(set("deadline", json!(1_795_348_805))), false),
    ];
    let mut cases: Vec<(&'static str, Vec<u8>, bool)> = cases
        .into_iter()
        .map(|(n, b, a)| (n, b.into_bytes(), a))
        .collect();
    cases.push((
        "the whole call as a JSON array",
        format!(r#"[1, "{ID}", "bank", "transfer", {{}}, "callq.reply.shop-1"]"#).into_bytes(),
        false,
    ));
    for (name, id) in [
        ("call_id in simple form (no hyphens)", ID.replace('-', "")),
        ("call_id in braced form", format!("{{{ID}}}")),
        ("call_id in URN form", format!("urn:uuid:{ID}")),
    ] {
        cases.push((name, edited(set("call_id", json!(id))).into_bytes(), false));
    }
    let mut not_utf8 = DESIGN_CALL.as_bytes().to_vec();
    let at = DESIGN_CALL.find("s-42").unwrap();
    not_utf8[at] = 0xff;
    cases.push(("invalid UTF-8 in a string", not_utf8, false));
    cases
}

/// A body on which the schema and the decoder knowingly disagree.
struct Exception {
    name: String,
    body: String,
    schema_accepts: bool,
    decoder_accepts: bool,
    why: &'static str,
}

/// The documented disagreements between the call schema and `decode_call`.
/// Each is asserted as it stands, so that a change on either side shows up
/// here and the list stays true.
fn call_exceptions() -> Vec<Exception> {
    let mut list = vec![
        Exception {
            name: "a duplicate key".into(),
            body: DESIGN_CALL.replacen(r#""v": 1,"#, r#""v": 1, "v": 1,"#, 1),
            schema_accepts: true,
            decoder_accepts: false,
            why: "a schema sees the parsed value, in which the last duplicate wins; the decoder \
                  rejects duplicate fields (RFC 8259: names SHOULD be unique).",
        },
        Exception {
            name: "v: 1.0".into(),
            body: edited(set("v", json!(1.0))),
            schema_accepts: true,
            decoder_accepts: false,
            why: "JSON Schema compares numbers by value, so 1.0 is the integer 1; the decoder \
                  reads `v` as an unsigned integer and reports version \"1.0\" as unknown. \
                  The schema's description says to write `1`.",
        },
        Exception {
            name: "deadline with a space instead of T".into(),
            body: edited(set("deadline", json!("2026-11-22 12:00:05Z"))),
            schema_accepts: false,
            decoder_accepts: true,
            why: "the `time` crate's RFC 3339 parser accepts the space RFC 3339 §5.6 allows \
                  by agreement; `format: date-time` (and the schema's pattern) require T.",
        },
        Exception {
            name: "traceparent not in W3C form".into(),
            body: edited(set("traceparent", json!("not-a-traceparent"))),
            schema_accepts: false,
            decoder_accepts: true,
            why: "the decoder hands traceparent to the handler unchecked (W3C tells receivers \
                  to ignore an invalid one, not to refuse the request); publishers must still \
                  send a valid one.",
        },
    ];
    for key in [
        "reply_to",
        "session_id",
        "deadline",
        "idempotency_key",
        "traceparent",
    ] {
        list.push(Exception {
            name: format!("{key}: null"),
            body: edited(set(key, Value::Null)),
            schema_accepts: false,
            decoder_accepts: true,
            why: "serde reads null for an Option field as absent; the schema says a string and \
                  publishers are told to omit unused fields.",
        });
    }
    list
}

fn schema_accepts(v: &Validator, body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|value| v.is_valid(&value))
}

fn decoder_verdict(body: &[u8]) -> Result<(), DecodeError> {
    decode_call(body, &Limits::default()).map(drop)
}

#[test]
fn the_schema_and_decode_call_agree() {
    let validator = strict(CALL);
    let mut wrong = Vec::new();
    let corpus = agreed_calls();
    assert!(corpus.len() >= 20);
    for (name, body, accept) in &corpus {
        let schema = schema_accepts(&validator, body);
        let decoder = decoder_verdict(body);
        if schema != *accept || decoder.is_ok() != *accept {
            let verdict = if *accept { "accept" } else { "reject" };
            let body = String::from_utf8_lossy(body);
            wrong.push(format!("{name}: expected both to {verdict}, schema accepts: {schema}, decoder: {decoder:?}\n  {body}"));
        }
    }
    for e in call_exceptions() {
        let schema = schema_accepts(&validator, e.body.as_bytes());
        let decoder = decoder_verdict(e.body.as_bytes());
        if schema != e.schema_accepts || decoder.is_ok() != e.decoder_accepts {
            wrong.push(format!(
                "documented exception `{}` no longer holds (schema accepts: {schema}, decoder: {decoder:?}); \
                 if they now agree, move it to agreed_calls. It was: {}\n  {}",
                e.name, e.why, e.body
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} disagreement(s):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Validators that do not assert `format` still reject malformed ids and
/// deadlines, through the schema's patterns. Only calendar checks (February
/// 30, hour 24) need `format` asserted.
#[test]
fn patterns_hold_where_format_is_only_an_annotation() {
    let strict = strict(CALL);
    let annotating = annotating(CALL);
    let calendar_only = ["deadline: February 30", "deadline: hour 24"];
    for (name, body, accept) in agreed_calls() {
        let Ok(value) = serde_json::from_slice::<Value>(&body) else {
            continue;
        };
        let expected = accept || calendar_only.contains(&name);
        assert_eq!(
            annotating.is_valid(&value),
            expected,
            "{name} without format assertion\n  {value}"
        );
        assert_eq!(strict.is_valid(&value), accept, "{name}\n  {value}");
    }
    for e in call_exceptions() {
        let Ok(value) = serde_json::from_str::<Value>(&e.body) else {
            continue;
        };
        assert_eq!(
            annotating.is_valid(&value),
            e.schema_accepts,
            "{} without format assertion",
            e.name
        );
    }
}

/// Reply bodies: `decode_reply` checks only the version and the types, so it
/// takes replies the schema refuses. Our replies come from the constructors,
/// which always fill what the schema requires (see
/// `bodies_of_the_serde_types_validate`).
#[test]
fn the_reply_schema_and_decode_reply() {
    let validator = strict(REPLY);
    let agreed = [
        ("ok", good_reply("ok"), true),
        ("error", good_reply("error"), true),
        ("fatal", good_reply("fatal"), true),
        ("expired", good_reply("expired"), true),
        (
            "ok with a null result",
            with(good_reply("ok"), "result", Value::Null),
            true,
        ),
        (
            "the nil call_id",
            with(good_reply("error"), "call_id", json!(NIL)),
            true,
        ),
        (
            "an unknown field",
            with(good_reply("ok"), "shard", json!(3)),
            true,
        ),
        (
            "outcome \"maybe\"",
            with(good_reply("ok"), "outcome", json!("maybe")),
            false,
        ),
        ("v: 2", with(good_reply("ok"), "v", json!(2)), false),
        (
            "call_id: 42",
            with(good_reply("ok"), "call_id", json!(42)),
            false,
        ),
        (
            "missing attempt",
            without(good_reply("ok"), "attempt"),
            false,
        ),
        (
            "error without a code",
            with(good_reply("error"), "error", json!({"message": "m"})),
            false,
        ),
    ];
    for (name, body, accept) in agreed {
        let bytes = serde_json::to_vec(&body).unwrap();
        assert_eq!(validator.is_valid(&body), accept, "schema on {name}");
        assert_eq!(
            decode_reply(&bytes, &Limits::default()).is_ok(),
            accept,
            "decode_reply on {name}"
        );
    }
    // The decoder enforces the schema's outcome rules too.
    let refused = [
        (
            "outcome error without `error`",
            without(good_reply("error"), "error"),
        ),
        (
            "outcome fatal without `error`",
            without(good_reply("fatal"), "error"),
        ),
        (
            "outcome expired without `error`",
            without(good_reply("expired"), "error"),
        ),
        (
            "outcome ok without `result`",
            without(good_reply("ok"), "result"),
        ),
        ("attempt 0", with(good_reply("ok"), "attempt", json!(0))),
    ];
    for (name, body) in refused {
        let bytes = serde_json::to_vec(&body).unwrap();
        assert!(!validator.is_valid(&body), "schema on {name}");
        assert!(
            decode_reply(&bytes, &Limits::default()).is_err(),
            "decode_reply on {name}"
        );
    }
}

/// Size and depth are limits of the decoder, checked before parsing; the
/// schema cannot state them, and does not.
#[test]
fn limits_belong_to_the_decoder_not_the_schema() {
    let validator = strict(CALL);
    let defaults = Limits::default();
    assert_eq!(
        (defaults.max_bytes, defaults.max_depth),
        (1024 * 1024, 64),
        "the schema's description states these defaults"
    );

    // 64 levels counting the envelope pass, 65 do not.
    for (levels, ok) in [(64, true), (65, false)] {
        let args = format!("{}{}", "[".repeat(levels - 1), "]".repeat(levels - 1));
        let body = DESIGN_CALL.replace(r#"{"from": "a", "to": "b", "cents": 500}"#, &args);
        assert!(
            schema_accepts(&validator, body.as_bytes()),
            "schema on {levels} levels"
        );
        let decoded = decode_call(body.as_bytes(), &defaults);
        assert_eq!(
            decoded.is_ok(),
            ok,
            "decoder on {levels} levels: {decoded:?}"
        );
        if !ok {
            assert_eq!(decoded.unwrap_err(), DecodeError::TooDeep { max: 64 });
        }
    }
    let big = edited(set("args", json!("x".repeat(defaults.max_bytes))));
    assert!(schema_accepts(&validator, big.as_bytes()));
    assert_eq!(
        decode_call(big.as_bytes(), &defaults).unwrap_err().kind(),
        "too_large"
    );
    // Configurable: the same body passes a larger limit.
    let larger = Limits {
        max_bytes: 2 * defaults.max_bytes,
        ..defaults
    };
    decode_call(big.as_bytes(), &larger).unwrap();
}

// ---------------------------------------------------------- README.md ----

/// The JSON examples in `schemas/README.md` are valid and decodable.
#[test]
fn readme_examples_validate() {
    let path = manifest_path("README.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let blocks: Vec<&str> = text
        .split("```json\n")
        .skip(1)
        .map(|rest| rest.split("\n```").next().unwrap())
        .collect();
    assert!(
        blocks.len() >= 3,
        "README.md has {} JSON examples",
        blocks.len()
    );
    let (call_v, reply_v) = (strict(CALL), strict(REPLY));
    for block in blocks {
        let value = parse(block);
        if value.get("outcome").is_some() {
            assert_valid(&reply_v, "a README reply", &value);
            decode_reply(block.as_bytes(), &Limits::default()).unwrap();
        } else {
            assert_valid(&call_v, "a README call", &value);
            decode_call(block.as_bytes(), &Limits::default()).unwrap();
        }
    }
}
