#![allow(clippy::unwrap_used, missing_docs)]
//! The coordinator protocol's JSON Schema files, `json/request.v1.schema.json`
//! and `json/answer.v1.schema.json`, against the serde types of
//! `callq_schemas::protocol` they describe.
//!
//! Both schemas reference the reply envelope by its `$id`,
//! `urn:callq:schema:reply:v1`, and the validators here find it in a registry
//! (offline). A relative `"$ref": "reply.v1.schema.json"` cannot work: the
//! schemas' own ids are URNs, against which RFC 3986 resolves no relative
//! path.
//!
//! The schema and serde must agree on every body, except for the exceptions
//! listed in [`exceptions`], each with its reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use callq_schemas::protocol::{
    Answer, AnswerBody, CancelDecision, ClusterStatus, CompleteDecision, Completion, InFlightCall,
    KeyedCall, Lease, Request, RequestBody, ResumeDecision, SESSION_FLUSH, SessionState,
    SessionWrite, TraceDecision, WorkerState, WorkerStatus,
};
use callq_schemas::{Call, Reply, Uuid};
use jsonschema::{Registry, Resource, Validator};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const REQUEST: &str = "request.v1.schema.json";
const ANSWER: &str = "answer.v1.schema.json";
const REPLY: &str = "reply.v1.schema.json";
const REPLY_ID: &str = "urn:callq:schema:reply:v1";
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn schema(name: &str) -> Value {
    let path = manifest_path(&format!("json/{name}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A validator of `name` that resolves the reply schema from a registry and
/// never fetches anything; `formats`: whether `format` is asserted (as a
/// strict validator does) or only an annotation (the 2020-12 default).
fn validator(name: &str, formats: bool) -> Validator {
    let registry = Registry::new()
        .add(REPLY_ID, Resource::from_contents(schema(REPLY)))
        .unwrap()
        .prepare()
        .unwrap();
    jsonschema::options()
        .offline()
        .with_registry(&registry)
        .should_validate_formats(formats)
        .build(&schema(name))
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"))
}

/// Every error, as "`/pointer`: message".
fn errors(v: &Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("`{}`: {e}", e.instance_path()))
        .collect()
}

/// The two schema files and the Rust types they describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Request,
    Answer,
}

impl Side {
    fn file(self) -> &'static str {
        match self {
            Side::Request => REQUEST,
            Side::Answer => ANSWER,
        }
    }

    /// The fields outside the flattened body, and its tag.
    fn common(self) -> &'static [&'static str] {
        match self {
            Side::Request => &["v", "worker_id", "reply_to", "type"],
            Side::Answer => &["v", "type"],
        }
    }

    /// Whether serde reads `body` as the Rust type.
    fn serde(self, body: &Value) -> Result<(), String> {
        let r = match self {
            Side::Request => serde_json::from_value::<Request>(body.clone()).map(drop),
            Side::Answer => serde_json::from_value::<Answer>(body.clone()).map(drop),
        };
        r.map_err(|e| e.to_string())
    }

    /// Both validators, strict and annotating.
    fn validators(self) -> [Validator; 2] {
        [validator(self.file(), true), validator(self.file(), false)]
    }
}

/// The variants serde knows, read from its "unknown variant" error, so that a
/// variant added to a Rust type shows up here without editing this file.
fn serde_variants<T: DeserializeOwned + std::fmt::Debug>(probe: Value) -> Vec<String> {
    let err = serde_json::from_value::<T>(probe).unwrap_err().to_string();
    let (_, expected) = err
        .split_once("expected")
        .unwrap_or_else(|| panic!("not an unknown-variant error: {err}"));
    let names: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!names.is_empty(), "{err}");
    names
}

fn tagged_variants<T: DeserializeOwned + std::fmt::Debug>(tag: &str) -> Vec<String> {
    serde_variants::<T>(json!({ tag: "\u{1}no such variant" }))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

// ------------------------------------------------------------ samples ----

fn uuid(n: u16) -> Uuid {
    Uuid::from_u128(0x0193_c1e2_7c00_7000_8000_0000_0000_0000 | u128::from(n))
}

fn lease(n: u16) -> Lease {
    Lease {
        call_id: uuid(1),
        copy: u32::from(n),
        token: uuid(100 + n),
    }
}

fn ok_reply() -> Reply {
    Reply::ok(uuid(1), 2, json!({"balance": 1200}))
}

fn fatal_reply() -> Reply {
    Reply::fatal(uuid(1), 1, "lost", vec!["mail.sent".into()])
}

/// A JSON object, for session data.
fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn call_text() -> String {
    let mut call = Call::new("bank", "transfer", json!({"cents": 500}));
    call.reply_to = Some("callq.reply.shop-1".into());
    String::from_utf8(call.to_bytes()).unwrap()
}

/// Every variant of `RequestBody`, each with every option set and, where it
/// has options, again with none.
fn request_bodies() -> Vec<RequestBody> {
    let full_in_flight = InFlightCall {
        lease: lease(1),
        service: "bank".into(),
        reply_to: Some("callq.reply.shop-1".into()),
        body: Some(call_text()),
        key: Some("account-17".into()),
    };
    let bare_in_flight = InFlightCall {
        lease: lease(2),
        service: "mail".into(),
        reply_to: None,
        body: None,
        key: None,
    };
    vec![
        RequestBody::Heartbeat {
            services: vec!["bank".into(), "mail".into()],
            state: WorkerState::Active,
            capacity: 8,
            free: 6,
            in_flight: vec![full_in_flight, bare_in_flight],
            partitions: [("bank".to_owned(), vec![0, 2]), ("mail".to_owned(), vec![])]
                .into_iter()
                .collect(),
            finished: [("bank".to_owned(), 12), ("mail".to_owned(), u64::MAX)]
                .into_iter()
                .collect(),
        },
        RequestBody::Heartbeat {
            services: Vec::new(),
            state: WorkerState::Standby,
            capacity: 0,
            free: 0,
            in_flight: Vec::new(),
            partitions: Default::default(),
            finished: Default::default(),
        },
        RequestBody::Heartbeat {
            services: vec!["bank".into()],
            state: WorkerState::Draining,
            capacity: u32::MAX,
            free: u32::MAX,
            in_flight: Vec::new(),
            partitions: Default::default(),
            finished: Default::default(),
        },
        RequestBody::Resume {
            req_id: uuid(2),
            lease: lease(1),
            service: "bank".into(),
            call_reply_to: Some("callq.reply.shop-1".into()),
            digest: Some("9f".repeat(32)),
        },
        RequestBody::Resume {
            req_id: uuid(3),
            lease: lease(2),
            service: "bank".into(),
            call_reply_to: None,
            digest: None,
        },
        RequestBody::Claim {
            req_id: uuid(3),
            lease: lease(2),
            service: "bank".into(),
            key: "order-981".into(),
            call_reply_to: Some("callq.reply.shop-1".into()),
            digest: Some("9f".repeat(32)),
        },
        RequestBody::Claim {
            req_id: uuid(3),
            lease: lease(2),
            service: "bank".into(),
            key: String::new(),
            call_reply_to: None,
            digest: None,
        },
        RequestBody::Defer {
            req_id: uuid(3),
            call_id: uuid(12),
            service: "mail".into(),
            due_ms: 1_796_000_000_000,
            body: call_text(),
        },
        RequestBody::Admit {
            req_id: uuid(3),
            calls: vec![KeyedCall {
                lease: lease(2),
                attempt: 1,
                service: "bank".into(),
                key: "account-17".into(),
                limit: 1,
                body: call_text(),
            }],
            vacate: vec![uuid(12)],
        },
        RequestBody::Admit {
            req_id: uuid(3),
            calls: Vec::new(),
            vacate: Vec::new(),
        },
        RequestBody::Vacate {
            calls: vec![uuid(12), uuid(13)],
        },
        RequestBody::Vacate { calls: Vec::new() },
        RequestBody::Retry {
            req_id: uuid(3),
            lease: lease(2),
            attempt: 2,
            service: "mail".into(),
            call_reply_to: Some("callq.reply.shop-1".into()),
            due_ms: 1_796_000_000_000,
            body: call_text(),
        },
        RequestBody::Retry {
            req_id: uuid(3),
            lease: lease(2),
            attempt: 1,
            service: "mail".into(),
            call_reply_to: None,
            due_ms: 0,
            body: String::new(),
        },
        RequestBody::Trace {
            req_id: uuid(4),
            lease: lease(1),
            attempt: 2,
            kind: SESSION_FLUSH.into(),
            service: "bank".into(),
            call_reply_to: Some("callq.reply.shop-1".into()),
            session: Some(SessionWrite {
                session_id: "cart-42".into(),
                base: 6,
                set: object(json!({"items": [1, 2], "coupon": null})),
                close: true,
            }),
            digest: Some("9f".repeat(32)),
        },
        RequestBody::Trace {
            req_id: uuid(13),
            lease: lease(1),
            attempt: 2,
            kind: "mail.sent".into(),
            service: "bank".into(),
            call_reply_to: Some("callq.reply.shop-1".into()),
            session: None,
            digest: None,
        },
        RequestBody::Trace {
            req_id: uuid(5),
            lease: lease(1),
            attempt: 1,
            kind: "db.commit".into(),
            service: "bank".into(),
            call_reply_to: None,
            session: None,
            digest: None,
        },
        RequestBody::Trace {
            req_id: uuid(14),
            lease: lease(2),
            attempt: 1,
            kind: SESSION_FLUSH.into(),
            service: "bank".into(),
            call_reply_to: None,
            session: Some(SessionWrite {
                session_id: "cart-43".into(),
                base: 0,
                set: serde_json::Map::new(),
                close: false,
            }),
            digest: None,
        },
        RequestBody::Complete {
            req_id: uuid(6),
            lease: lease(1),
            attempt: 2,
            reply: Some(ok_reply()),
            session: Some(SessionWrite {
                session_id: "cart-42".into(),
                base: 6,
                set: object(json!({"items": [1, 2], "coupon": null, "total": {"cents": 500}})),
                close: true,
            }),
        },
        RequestBody::Complete {
            req_id: uuid(7),
            lease: lease(1),
            attempt: 2,
            reply: None,
            session: None,
        },
        RequestBody::Complete {
            req_id: uuid(10),
            lease: lease(2),
            attempt: 1,
            reply: None,
            session: Some(SessionWrite {
                session_id: "cart-43".into(),
                base: 0,
                set: serde_json::Map::new(),
                close: false,
            }),
        },
        RequestBody::Session {
            req_id: uuid(11),
            session_id: "cart-42".into(),
            have: Some(6),
        },
        RequestBody::Session {
            req_id: uuid(12),
            session_id: "cart-43".into(),
            have: None,
        },
        RequestBody::Abandon {
            lease: lease(2),
            attempt: 2,
            kept: vec!["mail.sent".into()],
        },
        RequestBody::Abandon {
            lease: lease(3),
            attempt: 1,
            kept: Vec::new(),
        },
        RequestBody::Unclaim { lease: lease(4) },
        RequestBody::Completed {
            calls: vec![
                Completion {
                    lease: lease(1),
                    attempt: 2,
                    reply: Some(Reply::error(uuid(1), 2, "insufficient_funds", "no")),
                },
                Completion {
                    lease: lease(3),
                    attempt: 3,
                    reply: None,
                },
            ],
        },
        RequestBody::Completed { calls: Vec::new() },
        RequestBody::Leave {},
        RequestBody::AgentHeartbeat {
            services: vec!["bank".into()],
            workers: 3,
        },
        RequestBody::Drain {
            req_id: uuid(8),
            worker: "w-1".into(),
        },
        RequestBody::Status { req_id: uuid(9) },
        RequestBody::Cancel {
            req_id: uuid(10),
            call_id: uuid(11),
        },
    ]
}

/// Every variant of `AnswerBody`, and within them every variant of each
/// decision and of the session state, with and without their options.
fn answer_bodies() -> Vec<AnswerBody> {
    let resume = |decision| AnswerBody::Resume {
        req_id: uuid(2),
        decision,
    };
    let trace = |decision| AnswerBody::Trace {
        req_id: uuid(4),
        decision,
    };
    let complete = |decision| AnswerBody::Complete {
        req_id: uuid(6),
        decision,
    };
    let session = |state| AnswerBody::Session {
        req_id: uuid(11),
        state,
    };
    let status = ClusterStatus {
        workers: vec![
            WorkerStatus {
                worker_id: "w-1".into(),
                state: WorkerState::Active,
                services: vec!["bank".into()],
                capacity: 8,
                free: 7,
                last_seen_ms: 120,
                finished: [("bank".to_owned(), 41)].into_iter().collect(),
            },
            WorkerStatus {
                worker_id: "w-2".into(),
                state: WorkerState::Draining,
                services: Vec::new(),
                capacity: 0,
                free: 0,
                last_seen_ms: u64::MAX,
                finished: Default::default(),
            },
        ],
        agents: vec!["node-1".into()],
        standby_per_service: BTreeMap::from([("bank".into(), 1), ("mail".into(), 0)]),
        open_calls: 3,
        deaths: 1,
        promotions: u64::MAX,
        stale_dropped: 4,
        unauthenticated_dropped: 2,
        delayed_calls: 3,
    };
    vec![
        resume(ResumeDecision::Run { attempt: 2 }),
        resume(ResumeDecision::Done {
            reply: Some(ok_reply()),
        }),
        resume(ResumeDecision::Done { reply: None }),
        resume(ResumeDecision::Fatal {
            reply: fatal_reply(),
        }),
        resume(ResumeDecision::Superseded { attempt: 3 }),
        resume(ResumeDecision::Refused {
            reason: "call 0193c1e2 was published again with another body".into(),
        }),
        resume(ResumeDecision::Follow { first: uuid(12) }),
        trace(TraceDecision::Granted),
        trace(TraceDecision::Refused {
            reason: "attempt 2 was revoked".into(),
            superseded: false,
            reply: None,
        }),
        trace(TraceDecision::Refused {
            reason: "attempt 2 was revoked; the current attempt is 3".into(),
            superseded: true,
            reply: None,
        }),
        trace(TraceDecision::Refused {
            reason: "the call is already decided".into(),
            superseded: true,
            reply: Some(ok_reply()),
        }),
        trace(TraceDecision::SessionRefused {
            code: "session_expired".into(),
            reason: "session cart-42 expired".into(),
        }),
        complete(CompleteDecision::Accepted),
        complete(CompleteDecision::Fatal {
            reply: fatal_reply(),
        }),
        complete(CompleteDecision::Refused {
            reason: "not the current attempt".into(),
            superseded: true,
            reply: None,
        }),
        complete(CompleteDecision::Refused {
            reason: "another attempt completed the call".into(),
            superseded: true,
            reply: Some(fatal_reply()),
        }),
        complete(CompleteDecision::Refused {
            reason: "attempt 2 of the call was never issued".into(),
            superseded: false,
            reply: None,
        }),
        complete(CompleteDecision::SessionRefused {
            code: "session_conflict".into(),
            reason: "session cart-42 is at version 7, not 6".into(),
        }),
        session(SessionState::Open {
            version: 7,
            data: Some(object(json!({"items": [1, 2, 3], "note": null}))),
        }),
        session(SessionState::Open {
            version: 0,
            data: Some(serde_json::Map::new()),
        }),
        session(SessionState::Open {
            version: u64::MAX,
            data: None,
        }),
        session(SessionState::Expired),
        session(SessionState::Closed),
        AnswerBody::SessionChanged {
            session_id: "cart-42".into(),
            version: 7,
        },
        AnswerBody::Promote {},
        AnswerBody::Drain {},
        AnswerBody::Draining {
            req_id: uuid(8),
            found: true,
        },
        AnswerBody::Draining {
            req_id: uuid(8),
            found: false,
        },
        AnswerBody::StartStandby {
            services: vec!["bank".into(), "mail".into()],
        },
        AnswerBody::Status {
            req_id: uuid(9),
            status,
        },
        AnswerBody::Status {
            req_id: uuid(9),
            status: ClusterStatus::default(),
        },
        AnswerBody::Deferred { req_id: uuid(10) },
        AnswerBody::Admission {
            req_id: uuid(10),
            admitted: vec![uuid(12)],
        },
        AnswerBody::Admission {
            req_id: uuid(10),
            admitted: Vec::new(),
        },
        AnswerBody::Retrying {
            req_id: uuid(10),
            retrying: true,
        },
        AnswerBody::Cancel {
            req_id: uuid(10),
            decision: CancelDecision::Cancelled,
        },
        AnswerBody::Cancel {
            req_id: uuid(10),
            decision: CancelDecision::Finished {
                outcome: Some(callq_schemas::Outcome::Ok),
            },
        },
        AnswerBody::Cancel {
            req_id: uuid(10),
            decision: CancelDecision::Finished { outcome: None },
        },
        AnswerBody::Cancel {
            req_id: uuid(10),
            decision: CancelDecision::Refused {
                traces: vec!["mail.sent".into()],
            },
        },
        AnswerBody::Cancelled {
            call_ids: vec![uuid(11), uuid(12)],
        },
    ]
}

fn requests() -> Vec<Value> {
    request_bodies()
        .into_iter()
        .map(|body| {
            serde_json::to_value(Request {
                v: 1,
                worker_id: "w-1".into(),
                reply_to: "callq.worker.w-1".into(),
                expires_ms: Some(1_796_000_000_000),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                body,
            })
            .unwrap()
        })
        .collect()
}

fn answers() -> Vec<Value> {
    answer_bodies()
        .into_iter()
        .map(|body| {
            let answer = Answer {
                epoch: Some(3),
                ..Answer::new(body)
            };
            serde_json::to_value(answer).unwrap()
        })
        .collect()
}

fn samples(side: Side) -> Vec<Value> {
    match side {
        Side::Request => requests(),
        Side::Answer => answers(),
    }
}

/// The first sample of `side` whose `type` is `tag` (the one with every
/// option set).
fn sample(side: Side, tag: &str) -> Value {
    samples(side)
        .into_iter()
        .find(|s| s["type"] == tag)
        .unwrap_or_else(|| panic!("no {side:?} sample of type {tag}"))
}

/// An object inside a sample body, and the schema `$defs` entry that
/// describes its fields.
struct Site {
    side: Side,
    body: Value,
    /// JSON pointer of the object in `body` ("" for the body itself).
    at: String,
    def: String,
}

/// Every object of every sample that a `$defs` entry describes: the
/// variant's own fields (at the root, beside the common ones), decisions,
/// session states, session writes, leases, calls in flight, completions, the
/// cluster status and its workers.
fn sites() -> Vec<Site> {
    let mut sites = Vec::new();
    for side in [Side::Request, Side::Answer] {
        for body in samples(side) {
            let tag = body["type"].as_str().unwrap().to_owned();
            let mut add = |at: String, def: String| {
                sites.push(Site {
                    side,
                    body: body.clone(),
                    at,
                    def,
                });
            };
            add(String::new(), tag.clone());
            if body.get("lease").is_some() {
                add("/lease".into(), "lease".into());
            }
            if let Some(decision) = body.get("decision") {
                let name = decision["decision"].as_str().unwrap();
                add("/decision".into(), format!("{tag}_decision.{name}"));
            }
            // A session's state (a heartbeat's `state` is a string).
            if let Some(state) = body.get("state").filter(|s| s.is_object()) {
                let name = state["state"].as_str().unwrap();
                add("/state".into(), format!("session_state.{name}"));
            }
            if body.get("session").is_some() {
                add("/session".into(), "session_write".into());
            }
            for (i, _) in body["in_flight"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                add(format!("/in_flight/{i}"), "in_flight_call".into());
                add(format!("/in_flight/{i}/lease"), "lease".into());
            }
            // `completed` lists completions; `admit`, keyed calls;
            // `vacate`, call ids.
            let listed = match tag.as_str() {
                "completed" => Some("completion"),
                "admit" => Some("keyed_call"),
                _ => None,
            };
            if let Some(def) = listed {
                for (i, _) in body["calls"].as_array().into_iter().flatten().enumerate() {
                    add(format!("/calls/{i}"), def.into());
                    add(format!("/calls/{i}/lease"), "lease".into());
                }
            }
            if body.get("status").is_some() {
                add("/status".into(), "cluster_status".into());
                let workers = body["status"]["workers"].as_array().unwrap();
                for i in 0..workers.len() {
                    add(format!("/status/workers/{i}"), "worker_status".into());
                }
            }
        }
    }
    sites
}

impl Site {
    fn object(&self) -> &serde_json::Map<String, Value> {
        self.body.pointer(&self.at).unwrap().as_object().unwrap()
    }

    /// The fields the `$defs` entry describes: the object's keys but the
    /// common ones (at the root) and the tag of a decision or session state.
    fn fields(&self) -> Vec<(String, &Value)> {
        let skip: &[&str] = match self.at.as_str() {
            "" => self.side.common(),
            "/decision" => &["decision"],
            "/state" => &["state"],
            _ => &[],
        };
        // `expires_ms` and `traceparent` may stand on any request, `epoch`
        // on any answer: the root schema names them.
        let root_optional: &[&str] = match (self.side, self.at.as_str()) {
            (Side::Request, "") => &["expires_ms", "traceparent"],
            (Side::Answer, "") => &["epoch"],
            _ => &[],
        };
        self.object()
            .iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()) && !root_optional.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v))
            .collect()
    }
}

// ---------------------------------------------------------- edit helpers ----

/// `body` with the value at `pointer` replaced (or added), or removed when
/// `value` is `None`.
fn edit(body: &Value, pointer: &str, value: Option<Value>) -> Value {
    let mut body = body.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let obj = body
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no `{parent}` to edit"))
        .as_object_mut()
        .unwrap();
    match value {
        Some(v) => {
            obj.insert(key.into(), v);
        }
        None => {
            assert!(obj.remove(key).is_some(), "no `{pointer}` to remove");
        }
    }
    body
}

fn set(side: Side, tag: &str, pointer: &str, value: Value) -> Value {
    edit(&sample(side, tag), pointer, Some(value))
}

fn unset(side: Side, tag: &str, pointer: &str) -> Value {
    edit(&sample(side, tag), pointer, None)
}

// ---------------------------------------------------------------- (a) ----

/// Calls `f` on every subschema under `properties`, `additionalProperties`,
/// `items` and `$defs`, with a path for messages.
fn walk(path: &str, s: &Value, f: &mut impl FnMut(&str, &str, &Value)) {
    for (key, prop) in s["properties"].as_object().into_iter().flatten() {
        f(path, key, prop);
        walk(&format!("{path}/properties/{key}"), prop, f);
    }
    for key in ["items", "additionalProperties"] {
        if s[key].is_object() {
            walk(&format!("{path}/{key}"), &s[key], f);
        }
    }
    for (key, def) in s["$defs"].as_object().into_iter().flatten() {
        walk(&format!("{path}/$defs/{key}"), def, f);
    }
}

/// Every `$ref` in `s`.
fn refs(s: &Value, out: &mut Vec<String>) {
    match s {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref" {
                    out.push(v.as_str().unwrap().to_owned());
                } else {
                    refs(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn protocol_schema_files_are_valid_json_schema_2020_12() {
    for side in [Side::Request, Side::Answer] {
        let name = side.file();
        let s = schema(name);
        assert_eq!(s["$schema"], DRAFT_2020_12, "{name}");
        assert_eq!(
            s["$id"],
            format!("urn:callq:schema:{}:v1", name.split('.').next().unwrap()),
            "{name}"
        );
        if let Err(e) = jsonschema::draft202012::meta::validate(&s) {
            panic!(
                "{name} is not a valid draft 2020-12 schema: {e} at `{}`",
                e.instance_path()
            );
        }
        // Compiles, with every pattern and reference, in both format modes.
        let validators = side.validators();

        // The only reference outside the file is the reply schema, by its $id,
        // and it is needed: without it in the registry, the schema does not
        // compile offline.
        let mut all = Vec::new();
        refs(&s, &mut all);
        let external: BTreeSet<&str> = all
            .iter()
            .map(String::as_str)
            .filter(|r| !r.starts_with('#'))
            .collect();
        assert_eq!(external, BTreeSet::from([REPLY_ID]), "{name}");
        assert!(
            jsonschema::options().offline().build(&s).is_err(),
            "{name} compiles without the reply schema"
        );

        // The schema's examples are valid under it, and are what the Rust
        // types write.
        let examples = s["examples"].as_array().unwrap();
        assert!(examples.len() >= 3, "{name} has too few examples");
        for (i, example) in examples.iter().enumerate() {
            for v in &validators {
                let errs = errors(v, example);
                assert!(errs.is_empty(), "{name} examples[{i}]: {errs:#?}");
            }
            let round_trip = match side {
                Side::Request => serde_json::from_value::<Request>(example.clone())
                    .map(|r| serde_json::to_value(r).unwrap()),
                Side::Answer => serde_json::from_value::<Answer>(example.clone())
                    .map(|a| serde_json::to_value(a).unwrap()),
            }
            .unwrap_or_else(|e| panic!("{name} examples[{i}] does not deserialize: {e}"));
            assert_eq!(&round_trip, example, "{name} examples[{i}]");
        }

        // Every property and every definition is documented.
        walk("", &s, &mut |path, key, prop| {
            assert!(
                prop["description"].is_string(),
                "{name}: `{path}/properties/{key}` has no description"
            );
        });
        for (key, def) in s["$defs"].as_object().unwrap() {
            assert!(
                def["description"].is_string(),
                "{name}: `$defs/{key}` has no description"
            );
        }
        // Each `type` selects its `$defs` entry.
        let tags = strings(&s["properties"]["type"]["enum"]);
        let branches = s["allOf"].as_array().unwrap();
        assert_eq!(branches.len(), tags.len(), "{name}");
        for (tag, branch) in tags.iter().zip(branches) {
            assert_eq!(branch["if"]["properties"]["type"]["const"], *tag, "{name}");
            assert_eq!(branch["then"]["$ref"], format!("#/$defs/{tag}"), "{name}");
        }
    }

    // The definitions both files carry are the same.
    let (request, answer) = (schema(REQUEST), schema(ANSWER));
    for def in ["worker_state", "uuid", "u32", "u64"] {
        assert_eq!(request["$defs"][def], answer["$defs"][def], "$defs/{def}");
    }
    // The UUID pattern is the reply schema's.
    assert_eq!(
        request["$defs"]["uuid"]["pattern"],
        schema(REPLY)["properties"]["call_id"]["pattern"]
    );
}

// ---------------------------------------------------------------- (b) ----

#[test]
fn every_variant_of_the_serde_types_validates() {
    for side in [Side::Request, Side::Answer] {
        let validators = side.validators();
        for body in samples(side) {
            for v in &validators {
                let errs = errors(v, &body);
                assert!(
                    errs.is_empty(),
                    "{side:?} {} should validate, but: {errs:#?}\n{body:#}",
                    body["type"]
                );
            }
            side.serde(&body).unwrap();
        }
    }

    // Every variant is sampled: the tags of the samples are the variants
    // serde knows, in order.
    let tags_of = |bodies: &[Value], key: &str| {
        let mut tags: Vec<String> = Vec::new();
        for b in bodies {
            let t = b[key].as_str().unwrap().to_owned();
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        tags
    };
    assert_eq!(
        tags_of(&requests(), "type"),
        tagged_variants::<RequestBody>("type")
    );
    assert_eq!(
        tags_of(&answers(), "type"),
        tagged_variants::<AnswerBody>("type")
    );
    let decisions = |answer_type: &str| {
        let d: Vec<Value> = answers()
            .into_iter()
            .filter(|a| a["type"] == answer_type)
            .map(|a| a["decision"].clone())
            .collect();
        tags_of(&d, "decision")
    };
    assert_eq!(
        decisions("resume"),
        tagged_variants::<ResumeDecision>("decision")
    );
    assert_eq!(
        decisions("trace"),
        tagged_variants::<TraceDecision>("decision")
    );
    assert_eq!(
        decisions("complete"),
        tagged_variants::<CompleteDecision>("decision")
    );
    assert_eq!(
        decisions("cancel"),
        tagged_variants::<CancelDecision>("decision")
    );
    let session_states: Vec<Value> = answers()
        .into_iter()
        .filter(|a| a["type"] == "session")
        .map(|a| a["state"].clone())
        .collect();
    assert_eq!(
        tags_of(&session_states, "state"),
        tagged_variants::<SessionState>("state")
    );
    let states: BTreeSet<String> = requests()
        .iter()
        .filter_map(|r| r["state"].as_str().map(str::to_owned))
        .collect();
    let all_states: BTreeSet<String> = serde_variants::<WorkerState>(json!("\u{1}"))
        .into_iter()
        .collect();
    assert_eq!(states, all_states);
}

// ---------------------------------------------------------------- (d) ----

/// Fields the types always write but serde reads as a default when they are
/// absent, by side, `$defs` entry and field: the schema leaves them optional,
/// as serde does (and says in their description that they are always
/// written). `missing_fields_agree_with_serde` checks that both accept a body
/// without them.
const ALWAYS_WRITTEN_BUT_OPTIONAL: &[(Side, &str, &str)] = &[
    // `#[serde(default)]` without `skip_serializing_if`.
    (Side::Request, "session_write", "set"),
];

/// Per side and `$defs` entry: the fields written anywhere, and the fields
/// written (not null) everywhere.
type FieldsSeen = BTreeMap<(Side, String), (BTreeSet<String>, Option<BTreeSet<String>>)>;

/// The schemas name exactly the fields and variants the serde types write, so
/// adding a field or a variant without describing it fails here.
#[test]
fn the_schemas_name_every_field_and_variant_of_the_serde_types() {
    let request = schema(REQUEST);
    let answer = schema(ANSWER);
    let of = |side: Side| match side {
        Side::Request => &request,
        Side::Answer => &answer,
    };

    // The variant tags.
    assert_eq!(
        strings(&request["properties"]["type"]["enum"]),
        tagged_variants::<RequestBody>("type")
    );
    assert_eq!(
        strings(&answer["properties"]["type"]["enum"]),
        tagged_variants::<AnswerBody>("type")
    );
    // The internally tagged enums inside answers: a `$defs` entry that
    // dispatches on the tag to one `$defs` entry per variant.
    let tagged_defs = [
        (
            "resume_decision",
            "decision",
            tagged_variants::<ResumeDecision>("decision"),
        ),
        (
            "trace_decision",
            "decision",
            tagged_variants::<TraceDecision>("decision"),
        ),
        (
            "complete_decision",
            "decision",
            tagged_variants::<CompleteDecision>("decision"),
        ),
        (
            "session_state",
            "state",
            tagged_variants::<SessionState>("state"),
        ),
        (
            "cancel_decision",
            "decision",
            tagged_variants::<CancelDecision>("decision"),
        ),
    ];
    for (def, tag, variants) in &tagged_defs {
        let d = &answer["$defs"][def];
        assert_eq!(&strings(&d["properties"][tag]["enum"]), variants, "{def}");
        assert_eq!(strings(&d["required"]), [*tag], "{def}");
        let branches = d["allOf"].as_array().unwrap();
        assert_eq!(branches.len(), variants.len(), "{def}");
        for (name, branch) in variants.iter().zip(branches) {
            assert_eq!(branch["if"]["properties"][tag]["const"], *name);
            assert_eq!(branch["then"]["$ref"], format!("#/$defs/{def}.{name}"));
        }
    }
    let states = serde_variants::<WorkerState>(json!("\u{1}"));
    assert_eq!(strings(&request["$defs"]["worker_state"]["enum"]), states);

    // The common fields, all required.
    for side in [Side::Request, Side::Answer] {
        let s = of(side);
        let common: BTreeSet<String> = side.common().iter().map(|&k| k.to_owned()).collect();
        // Optional fields every request, or every answer, may carry.
        let mut named = keys(&s["properties"]);
        if side == Side::Request {
            for optional in ["expires_ms", "traceparent"] {
                assert!(
                    named.remove(optional),
                    "the request schema names {optional}"
                );
            }
        } else {
            assert!(named.remove("epoch"), "the answer schema names epoch");
        }
        assert_eq!(named, common, "{side:?}");
        let required: BTreeSet<String> = strings(&s["required"]).into_iter().collect();
        assert_eq!(required, common, "{side:?}");
    }

    // Per `$defs` entry: the fields written anywhere are its properties, and
    // the fields written (not null) everywhere are its required ones.
    let mut seen = FieldsSeen::new();
    for site in sites() {
        let fields = site.fields();
        let written: BTreeSet<String> = fields.iter().map(|(k, _)| k.clone()).collect();
        let present: BTreeSet<String> = fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| k.clone())
            .collect();
        let entry = seen
            .entry((site.side, site.def.clone()))
            .or_insert_with(|| (BTreeSet::new(), None));
        entry.0.extend(written);
        entry.1 = Some(match entry.1.take() {
            None => present,
            Some(r) => r.intersection(&present).cloned().collect(),
        });
    }
    for &(side, def, field) in ALWAYS_WRITTEN_BUT_OPTIONAL {
        let always = seen
            .get_mut(&(side, def.to_owned()))
            .and_then(|e| e.1.as_mut());
        let always = always.unwrap_or_else(|| panic!("{side:?}: no sample of `$defs/{def}`"));
        assert!(
            always.remove(field),
            "{side:?} `$defs/{def}`: `{field}` is not always written"
        );
    }
    for ((side, def), (written, always)) in &seen {
        let d = &of(*side)["$defs"][def];
        assert!(d.is_object(), "{side:?}: no `$defs/{def}`");
        assert_eq!(&keys(&d["properties"]), written, "{side:?} `$defs/{def}`");
        let required: BTreeSet<String> = d
            .get("required")
            .map(|r| strings(r).into_iter().collect())
            .unwrap_or_default();
        assert_eq!(
            Some(&required),
            always.as_ref(),
            "{side:?} `$defs/{def}`: required"
        );
    }
    // And every `$defs` entry with fields was seen.
    for side in [Side::Request, Side::Answer] {
        for (def, d) in of(side)["$defs"].as_object().unwrap() {
            let dispatch = tagged_defs.iter().any(|(t, _, _)| t == def);
            let has_fields = d.get("properties").is_some() && !dispatch;
            assert!(
                !has_fields || seen.contains_key(&(side, def.clone())),
                "{side:?}: `$defs/{def}` describes no sample"
            );
        }
    }
}

// ---------------------------------------------------------------- (c) ----

/// Asserts that both validators and serde reject each body.
fn assert_all_rejected(side: Side, cases: Vec<(String, Value)>) {
    let validators = side.validators();
    let mut wrong = Vec::new();
    for (what, body) in cases {
        for (mode, v) in ["strict", "annotating"].iter().zip(&validators) {
            if v.is_valid(&body) {
                wrong.push(format!("{what}: the schema ({mode}) accepts it\n  {body}"));
            }
        }
        if side.serde(&body).is_ok() {
            wrong.push(format!("{what}: serde accepts it\n  {body}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{side:?}: {} bad bodies accepted:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn bad_requests_are_rejected_by_the_schema_and_by_serde() {
    use Side::Request as R;
    let hb = "heartbeat";
    let mut cases: Vec<(&str, Value)> = vec![
        ("missing v", unset(R, hb, "/v")),
        ("missing worker_id", unset(R, hb, "/worker_id")),
        ("missing reply_to", unset(R, hb, "/reply_to")),
        ("missing type", unset(R, hb, "/type")),
        ("unknown type", set(R, hb, "/type", json!("shutdown"))),
        ("type in CamelCase", set(R, hb, "/type", json!("Heartbeat"))),
        ("type null", set(R, hb, "/type", Value::Null)),
        ("v: \"1\"", set(R, hb, "/v", json!("1"))),
        ("v: -1", set(R, hb, "/v", json!(-1))),
        ("v: null", set(R, hb, "/v", Value::Null)),
        ("worker_id: 5", set(R, hb, "/worker_id", json!(5))),
        ("reply_to: null", set(R, hb, "/reply_to", Value::Null)),
        ("capacity: -1", set(R, hb, "/capacity", json!(-1))),
        ("free: -1", set(R, hb, "/free", json!(-1))),
        ("capacity: \"8\"", set(R, hb, "/capacity", json!("8"))),
        ("capacity: 1.5", set(R, hb, "/capacity", json!(1.5))),
        (
            "capacity: above u32",
            set(R, hb, "/capacity", json!(4_294_967_296_u64)),
        ),
        ("state: unknown", set(R, hb, "/state", json!("sleeping"))),
        ("state: uppercase", set(R, hb, "/state", json!("Active"))),
        ("services: a string", set(R, hb, "/services", json!("bank"))),
        ("services: numbers", set(R, hb, "/services", json!([1]))),
        ("in_flight: an object", set(R, hb, "/in_flight", json!({}))),
        (
            "in_flight lease copy: -1",
            set(R, hb, "/in_flight/0/lease/copy", json!(-1)),
        ),
        (
            "in_flight lease token: not a UUID",
            set(R, hb, "/in_flight/0/lease/token", json!("token-1")),
        ),
        (
            "in_flight body: an object",
            set(R, hb, "/in_flight/0/body", json!({"v": 1})),
        ),
        (
            "resume req_id: not a UUID",
            set(R, "resume", "/req_id", json!("order-981")),
        ),
        ("resume req_id: 42", set(R, "resume", "/req_id", json!(42))),
        (
            "resume req_id: one digit short",
            set(
                R,
                "resume",
                "/req_id",
                json!("193c1e2-7c00-7000-8000-000000000002"),
            ),
        ),
        (
            "resume req_id: a non-hex digit",
            set(
                R,
                "resume",
                "/req_id",
                json!("0193c1e2-7c00-7000-8000-00000000000g"),
            ),
        ),
        (
            "resume lease: a string",
            set(R, "resume", "/lease", json!("l-1")),
        ),
        (
            "resume lease copy: -1",
            set(R, "resume", "/lease/copy", json!(-1)),
        ),
        (
            "resume lease call_id: not a UUID",
            set(R, "resume", "/lease/call_id", json!("call-1")),
        ),
        (
            "resume call_reply_to: 5",
            set(R, "resume", "/call_reply_to", json!(5)),
        ),
        ("trace attempt: -1", set(R, "trace", "/attempt", json!(-1))),
        ("trace kind: 1", set(R, "trace", "/kind", json!(1))),
        (
            "trace session: a string",
            set(R, "trace", "/session", json!("cart-42")),
        ),
        (
            "trace session: an array",
            set(R, "trace", "/session", json!([])),
        ),
        (
            "trace session session_id: null",
            set(R, "trace", "/session/session_id", Value::Null),
        ),
        (
            "trace session base: -1",
            set(R, "trace", "/session/base", json!(-1)),
        ),
        (
            "trace session base: above u64",
            set(R, "trace", "/session/base", json!(2e19)),
        ),
        (
            "trace session set: a string",
            set(R, "trace", "/session/set", json!("items=3")),
        ),
        (
            "trace session close: 1",
            set(R, "trace", "/session/close", json!(1)),
        ),
        (
            "complete attempt: -1",
            set(R, "complete", "/attempt", json!(-1)),
        ),
        (
            "complete reply: a string",
            set(R, "complete", "/reply", json!("ok")),
        ),
        (
            "complete reply without outcome",
            unset(R, "complete", "/reply/outcome"),
        ),
        (
            "complete reply with outcome maybe",
            set(R, "complete", "/reply/outcome", json!("maybe")),
        ),
        (
            "complete reply attempt: -1",
            set(R, "complete", "/reply/attempt", json!(-1)),
        ),
        (
            "complete session: a string",
            set(R, "complete", "/session", json!("cart-42")),
        ),
        (
            "complete session session_id: 5",
            set(R, "complete", "/session/session_id", json!(5)),
        ),
        (
            "complete session base: -1",
            set(R, "complete", "/session/base", json!(-1)),
        ),
        (
            "complete session base: \"6\"",
            set(R, "complete", "/session/base", json!("6")),
        ),
        (
            "complete session set: an array",
            set(R, "complete", "/session/set", json!([["items", 3]])),
        ),
        (
            "complete session set: null",
            set(R, "complete", "/session/set", Value::Null),
        ),
        (
            "complete session close: null",
            set(R, "complete", "/session/close", Value::Null),
        ),
        (
            "complete session close: \"yes\"",
            set(R, "complete", "/session/close", json!("yes")),
        ),
        (
            "session req_id: not a UUID",
            set(R, "session", "/req_id", json!("s-1")),
        ),
        (
            "session session_id: null",
            set(R, "session", "/session_id", Value::Null),
        ),
        (
            "session session_id: 42",
            set(R, "session", "/session_id", json!(42)),
        ),
        ("session have: -1", set(R, "session", "/have", json!(-1))),
        ("session have: 1.5", set(R, "session", "/have", json!(1.5))),
        (
            "session have: \"6\"",
            set(R, "session", "/have", json!("6")),
        ),
        (
            "session have: above u64",
            set(R, "session", "/have", json!(2e19)),
        ),
        (
            "completed calls: an object",
            set(R, "completed", "/calls", json!({})),
        ),
        (
            "completed attempt: -1",
            set(R, "completed", "/calls/0/attempt", json!(-1)),
        ),
        (
            "completed reply: an array",
            set(R, "completed", "/calls/0/reply", json!([])),
        ),
        (
            "agent workers: -1",
            set(R, "agent_heartbeat", "/workers", json!(-1)),
        ),
        (
            "agent services: null",
            set(R, "agent_heartbeat", "/services", Value::Null),
        ),
        (
            "drain worker: null",
            set(R, "drain", "/worker", Value::Null),
        ),
        (
            "drain req_id: not a UUID",
            set(R, "drain", "/req_id", json!("x")),
        ),
        (
            "status req_id: null",
            set(R, "status", "/req_id", Value::Null),
        ),
        ("an array", json!([1, "w-1", "callq.worker.w-1", "leave"])),
        ("null", Value::Null),
    ];
    // A variant's fields under another variant's type.
    cases.push((
        "leave with no fields but type status",
        set(R, "leave", "/type", json!("status")),
    ));
    assert_all_rejected(
        R,
        cases.into_iter().map(|(w, b)| (w.to_owned(), b)).collect(),
    );
}

#[test]
fn bad_answers_are_rejected_by_the_schema_and_by_serde() {
    use Side::Answer as A;
    let cases: Vec<(&str, Value)> = vec![
        ("missing v", unset(A, "promote", "/v")),
        ("missing type", unset(A, "promote", "/type")),
        (
            "unknown type",
            set(A, "promote", "/type", json!("shutdown")),
        ),
        ("v: -1", set(A, "promote", "/v", json!(-1))),
        ("v: \"1\"", set(A, "promote", "/v", json!("1"))),
        (
            "req_id: not a UUID",
            set(A, "resume", "/req_id", json!("r-1")),
        ),
        ("req_id: 42", set(A, "resume", "/req_id", json!(42))),
        (
            "decision: a string",
            set(A, "resume", "/decision", json!("run")),
        ),
        (
            "decision without its tag",
            unset(A, "resume", "/decision/decision"),
        ),
        (
            "unknown resume decision",
            set(A, "resume", "/decision/decision", json!("maybe")),
        ),
        (
            "run attempt: -1",
            set(A, "resume", "/decision/attempt", json!(-1)),
        ),
        (
            "run attempt: above u32",
            set(A, "resume", "/decision/attempt", json!(4_294_967_296_u64)),
        ),
        (
            "run attempt: \"2\"",
            set(A, "resume", "/decision/attempt", json!("2")),
        ),
        (
            "done reply: a number",
            set(
                A,
                "resume",
                "/decision",
                json!({"decision": "done", "reply": 5}),
            ),
        ),
        (
            "done reply: not a reply",
            set(
                A,
                "resume",
                "/decision",
                json!({"decision": "done", "reply": {}}),
            ),
        ),
        (
            "fatal reply: null",
            set(
                A,
                "resume",
                "/decision",
                json!({"decision": "fatal", "reply": null}),
            ),
        ),
        (
            "superseded attempt: -1",
            set(
                A,
                "resume",
                "/decision",
                json!({"decision": "superseded", "attempt": -1}),
            ),
        ),
        (
            "a trace decision in a resume answer",
            set(A, "resume", "/decision", json!({"decision": "granted"})),
        ),
        (
            "a resume decision in a complete answer",
            set(
                A,
                "complete",
                "/decision",
                json!({"decision": "done", "reply": null}),
            ),
        ),
        (
            "trace decision in CamelCase",
            set(A, "trace", "/decision/decision", json!("Granted")),
        ),
        (
            "refused reason: 5",
            set(
                A,
                "trace",
                "/decision",
                json!({"decision": "refused", "reason": 5}),
            ),
        ),
        (
            "trace session_refused code: 5",
            set(
                A,
                "trace",
                "/decision",
                json!({"decision": "session_refused", "code": 5, "reason": "x"}),
            ),
        ),
        (
            "trace session_refused without code",
            set(
                A,
                "trace",
                "/decision",
                json!({"decision": "session_refused", "reason": "x"}),
            ),
        ),
        (
            "trace session_refused reason: null",
            set(
                A,
                "trace",
                "/decision",
                json!({"decision": "session_refused", "code": "session_closed", "reason": null}),
            ),
        ),
        (
            "a complete decision in a trace answer",
            set(A, "trace", "/decision", json!({"decision": "accepted"})),
        ),
        (
            "complete fatal reply: outcome maybe",
            set(
                A,
                "complete",
                "/decision",
                json!({"decision": "fatal", "reply": {"v": 1, "call_id": uuid(1), "attempt": 1, "outcome": "maybe"}}),
            ),
        ),
        (
            "session_refused code: null",
            set(
                A,
                "complete",
                "/decision",
                json!({"decision": "session_refused", "code": null, "reason": "x"}),
            ),
        ),
        (
            "session_refused without reason",
            set(
                A,
                "complete",
                "/decision",
                json!({"decision": "session_refused", "code": "session_closed"}),
            ),
        ),
        (
            "session state: a string",
            set(A, "session", "/state", json!("open")),
        ),
        (
            "session state without its tag",
            unset(A, "session", "/state/state"),
        ),
        (
            "unknown session state",
            set(A, "session", "/state/state", json!("lost")),
        ),
        (
            "session state in CamelCase",
            set(A, "session", "/state/state", json!("Open")),
        ),
        (
            "a complete decision as a session state",
            set(A, "session", "/state", json!({"decision": "accepted"})),
        ),
        (
            "open version: -1",
            set(A, "session", "/state/version", json!(-1)),
        ),
        (
            "open version: \"7\"",
            set(A, "session", "/state/version", json!("7")),
        ),
        (
            "open data: an array",
            set(A, "session", "/state/data", json!([1])),
        ),
        (
            "open data: a string",
            set(A, "session", "/state/data", json!("{}")),
        ),
        (
            "session_changed version: -1",
            set(A, "session_changed", "/version", json!(-1)),
        ),
        (
            "session_changed version: null",
            set(A, "session_changed", "/version", Value::Null),
        ),
        (
            "session_changed session_id: 5",
            set(A, "session_changed", "/session_id", json!(5)),
        ),
        (
            "draining found: \"yes\"",
            set(A, "draining", "/found", json!("yes")),
        ),
        ("draining found: 1", set(A, "draining", "/found", json!(1))),
        (
            "start_standby services: numbers",
            set(A, "start_standby", "/services", json!([1])),
        ),
        ("status: a string", set(A, "status", "/status", json!("ok"))),
        (
            "status open_calls: -1",
            set(A, "status", "/status/open_calls", json!(-1)),
        ),
        (
            "status deaths: -1",
            set(A, "status", "/status/deaths", json!(-1)),
        ),
        (
            "status agents: numbers",
            set(A, "status", "/status/agents", json!([1])),
        ),
        (
            "status standby_per_service: an array",
            set(A, "status", "/status/standby_per_service", json!([])),
        ),
        (
            "status standby_per_service entry: -1",
            set(A, "status", "/status/standby_per_service/bank", json!(-1)),
        ),
        (
            "status standby_per_service entry: a string",
            set(A, "status", "/status/standby_per_service/bank", json!("1")),
        ),
        (
            "worker capacity: -1",
            set(A, "status", "/status/workers/0/capacity", json!(-1)),
        ),
        (
            "worker last_seen_ms: -1",
            set(A, "status", "/status/workers/0/last_seen_ms", json!(-1)),
        ),
        (
            "worker state: unknown",
            set(A, "status", "/status/workers/0/state", json!("asleep")),
        ),
        ("an array", json!([1, "promote"])),
        ("a string", json!("promote")),
    ];
    assert_all_rejected(
        A,
        cases.into_iter().map(|(w, b)| (w.to_owned(), b)).collect(),
    );
}

/// For every field of every variant and nested struct: without a required
/// field, the schema and serde both reject the body; without an optional
/// one, both accept it.
#[test]
fn missing_fields_agree_with_serde() {
    let request = schema(REQUEST);
    let answer = schema(ANSWER);
    let validators = [Side::Request.validators(), Side::Answer.validators()];
    let mut wrong = Vec::new();
    let mut checked = 0;
    for site in sites() {
        let (s, vs) = match site.side {
            Side::Request => (&request, &validators[0]),
            Side::Answer => (&answer, &validators[1]),
        };
        let required: Vec<String> = s["$defs"][&site.def]
            .get("required")
            .map(strings)
            .unwrap_or_default();
        for (key, _) in site.fields() {
            let body = edit(&site.body, &format!("{}/{key}", site.at), None);
            let expect = !required.contains(&key);
            let schema_ok = vs.iter().map(|v| v.is_valid(&body)).collect::<Vec<_>>();
            let serde = site.side.serde(&body);
            if schema_ok != [expect, expect] || serde.is_ok() != expect {
                wrong.push(format!(
                    "{:?} `{}` without `{}{}/{key}`: expected both to {}, schema: {schema_ok:?}, serde: {serde:?}",
                    site.side,
                    site.body["type"],
                    site.def,
                    site.at,
                    if expect { "accept" } else { "reject" }
                ));
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} removals");
    assert!(
        wrong.is_empty(),
        "{} disagreement(s):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Odd bodies that both the schema and serde accept.
#[test]
fn odd_but_valid_bodies_are_accepted_by_both() {
    use Side::{Answer as A, Request as R};
    let upper = uuid(2).to_string().to_uppercase();
    let cases = [
        (
            R,
            "an unknown field",
            set(R, "heartbeat", "/priority", json!({"x": 1})),
        ),
        (
            R,
            "an unknown field in a lease",
            set(R, "resume", "/lease/extra", json!(1)),
        ),
        (
            R,
            "an unknown field in a call in flight",
            set(R, "heartbeat", "/in_flight/0/extra", json!(1)),
        ),
        (
            R,
            "req_id in uppercase",
            set(R, "resume", "/req_id", json!(upper)),
        ),
        (
            R,
            "req_id the nil UUID",
            set(R, "status", "/req_id", json!(Uuid::nil())),
        ),
        (
            R,
            "leave with an unknown field",
            set(R, "leave", "/why", json!("bye")),
        ),
        (
            R,
            "capacity u32::MAX",
            set(R, "heartbeat", "/capacity", json!(u32::MAX)),
        ),
        (
            R,
            "a session write with close: false",
            set(R, "complete", "/session/close", json!(false)),
        ),
        (
            R,
            "a session write with an unknown field",
            set(R, "complete", "/session/extra", json!(1)),
        ),
        (
            R,
            "a trace's session write without set",
            unset(R, "trace", "/session/set"),
        ),
        (
            R,
            "a trace's session write with an unknown field",
            set(R, "trace", "/session/extra", json!(1)),
        ),
        (
            R,
            "have u64::MAX",
            set(R, "session", "/have", json!(u64::MAX)),
        ),
        (
            A,
            "done without reply",
            set(A, "resume", "/decision", json!({"decision": "done"})),
        ),
        (
            A,
            "granted with an unknown field",
            set(
                A,
                "trace",
                "/decision",
                json!({"decision": "granted", "x": 1}),
            ),
        ),
        (
            A,
            "expired with an unknown field",
            set(A, "session", "/state", json!({"state": "expired", "x": 1})),
        ),
        (
            A,
            "open data with values of every JSON type",
            set(
                A,
                "session",
                "/state/data",
                json!({"a": null, "b": true, "c": 1.5, "d": "x", "e": [], "f": {}}),
            ),
        ),
        (
            A,
            "an unknown field in a worker status",
            set(A, "status", "/status/workers/0/extra", json!(1)),
        ),
        (
            A,
            "promote with an unknown field",
            set(A, "promote", "/extra", json!(1)),
        ),
    ];
    let validators = [Side::Request.validators(), Side::Answer.validators()];
    for (side, what, body) in cases {
        let vs = &validators[usize::from(side == Side::Answer)];
        for v in vs {
            let errs = errors(v, &body);
            assert!(errs.is_empty(), "{side:?} {what}: {errs:#?}\n{body}");
        }
        side.serde(&body)
            .unwrap_or_else(|e| panic!("{side:?} {what}: serde rejects it: {e}"));
    }
}

/// A body on which the schema and serde knowingly disagree.
struct Exception {
    side: Side,
    name: String,
    body: Value,
    schema_accepts: bool,
    serde_accepts: bool,
    why: &'static str,
}

/// The documented disagreements between the schemas and the serde types.
/// Each is asserted as it stands, so that a change on either side shows up
/// here and the list stays true.
fn exceptions() -> Vec<Exception> {
    use Side::{Answer as A, Request as R};
    let id = uuid(2);
    let mut list = vec![
        Exception {
            side: R,
            name: "v: 2".into(),
            body: set(R, "heartbeat", "/v", json!(2)),
            schema_accepts: false,
            serde_accepts: true,
            why: "`Request::v` is any u32 to serde; the coordinator refuses v != 1 after \
                  parsing (`decode_request`).",
        },
        Exception {
            side: A,
            name: "v: 2".into(),
            body: set(A, "promote", "/v", json!(2)),
            schema_accepts: false,
            serde_accepts: true,
            why: "`Answer::v` is any u32 to serde.",
        },
        Exception {
            side: R,
            name: "capacity: 8.0".into(),
            body: set(R, "heartbeat", "/capacity", json!(8.0)),
            schema_accepts: true,
            serde_accepts: false,
            why: "JSON Schema compares numbers by value, so 8.0 is an integer; serde reads a \
                  u32 only from an integer literal.",
        },
        Exception {
            side: A,
            name: "run attempt: 2.0".into(),
            body: set(A, "resume", "/decision/attempt", json!(2.0)),
            schema_accepts: true,
            serde_accepts: false,
            why: "as for capacity: 8.0.",
        },
    ];
    for (form, text) in [
        ("simple", id.simple().to_string()),
        ("braced", id.braced().to_string()),
        ("URN", id.urn().to_string()),
    ] {
        list.push(Exception {
            side: R,
            name: format!("req_id in {form} form"),
            body: set(R, "status", "/req_id", json!(text)),
            schema_accepts: false,
            serde_accepts: true,
            why: "the uuid crate parses every form of a UUID; the schema (like the reply \
                  schema) asks for the hyphenated form the types write.",
        });
    }
    for (tag, pointer) in [
        ("resume", "/call_reply_to"),
        ("trace", "/call_reply_to"),
        ("complete", "/reply"),
        ("heartbeat", "/in_flight/0/reply_to"),
        ("heartbeat", "/in_flight/0/body"),
        ("completed", "/calls/0/reply"),
        ("complete", "/session"),
        ("trace", "/session"),
        ("session", "/have"),
    ] {
        list.push(Exception {
            side: R,
            name: format!("{tag} {pointer}: null"),
            body: set(R, tag, pointer, Value::Null),
            schema_accepts: false,
            serde_accepts: true,
            why: "serde reads null for an Option field as absent; the types omit the field \
                  instead, and the schema says so.",
        });
    }
    list.push(Exception {
        side: A,
        name: "session /state/data: null".into(),
        body: set(A, "session", "/state/data", Value::Null),
        schema_accepts: false,
        serde_accepts: true,
        why: "as for the null Option fields of requests.",
    });
    list
}

#[test]
fn documented_disagreements_still_hold() {
    let validators = [Side::Request.validators(), Side::Answer.validators()];
    let mut wrong = Vec::new();
    for e in exceptions() {
        let vs = &validators[usize::from(e.side == Side::Answer)];
        let schema = vs.iter().map(|v| v.is_valid(&e.body)).collect::<Vec<_>>();
        let serde = e.side.serde(&e.body);
        if schema != [e.schema_accepts, e.schema_accepts] || serde.is_ok() != e.serde_accepts {
            wrong.push(format!(
                "{:?} exception `{}` no longer holds (schema accepts: {schema:?}, serde: {serde:?}); \
                 it was: {}\n  {}",
                e.side, e.name, e.why, e.body
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} change(s):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
