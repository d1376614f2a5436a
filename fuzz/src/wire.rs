//! The contracts of the wire decoders of `callq-schemas`, checked on any
//! input: the call and reply decoders, the coordinator protocol as the
//! coordinator and the workers read it, and `peek`.
//!
//! Each check panics, naming the rule broken, when a decoder breaks its
//! contract; a panic of the decoder itself fails it just the same. The fuzz
//! targets run these checks on what libFuzzer makes up, and
//! `schemas/tests/fuzz_corpus.rs` runs them on the committed corpus and
//! findings (it includes this file).

use callq_schemas::protocol::{Answer, AnswerBody, Request};
use callq_schemas::{
    Call, DecodeError, Limits, MAX_FIELD_CHARS, MAX_REPLY_TO_BYTES, MAX_SERVICE_CHARS, Outcome,
    Reply, Uuid, VERSION, check_reply_to, decode_call, decode_reply, peek as peek_body,
};
use serde_json::Value;

use crate::corpus::Target;

/// Limits a short input reaches, so that the size and depth checks run
/// on what the fuzzer makes up (the defaults are 1 MiB and 64 levels).
pub const TIGHT: Limits = Limits {
    max_bytes: 256,
    max_depth: 4,
};

/// The checks of the fuzz targets, by target name.
pub const TARGETS: [Target; 4] = [
    ("call", call),
    ("reply", reply),
    ("protocol", protocol),
    ("peek", peek),
];

/// `decode_call`: under the default and under [`TIGHT`] limits, a call
/// that decodes keeps every rule of the envelope and the limits, and
/// re-encodes to a body that decodes to the same call; `peek` reads the
/// same `call_id`, `reply_to` and `v` from the body; tighter limits only
/// refuse more; every error is the right one for the body, with a bounded
/// message.
pub fn call(data: &[u8]) {
    let loose = decode_call(data, &Limits::default());
    let tight = decode_call(data, &TIGHT);
    for (limits, decoded) in [(Limits::default(), &loose), (TIGHT, &tight)] {
        match decoded {
            Ok(call) => {
                valid_call(call);
                within(data, &limits, 1 + depth(&call.args));
                let again = decode_call(&call.to_bytes(), &unbounded(&limits));
                assert_eq!(
                    again.as_ref(),
                    Ok(call),
                    "a decoded call re-encodes to a body that decodes to it"
                );
                let p = peek_body(data, data.len());
                assert_eq!(p.call_id, Some(call.call_id), "peek reads the call_id");
                assert_eq!(p.reply_to, call.reply_to, "peek reads the reply_to");
                assert_eq!(p.v.as_deref(), Some("1"), "peek reads v");
            }
            Err(e) => sound_error(data, &limits, e),
        }
    }
    tighter_refuses_more(&loose, &tight);
}

/// `decode_reply`: as [`call`], for replies and the reply's own rules
/// (attempt from 1, `result` with `ok`, `error` with the other outcomes).
pub fn reply(data: &[u8]) {
    let loose = decode_reply(data, &Limits::default());
    let tight = decode_reply(data, &TIGHT);
    for (limits, decoded) in [(Limits::default(), &loose), (TIGHT, &tight)] {
        match decoded {
            Ok(reply) => {
                valid_reply(reply);
                let result_depth = reply.result.as_ref().map_or(0, depth);
                let error_depth = reply
                    .error
                    .as_ref()
                    .map_or(0, |e| if e.traces.is_empty() { 1 } else { 2 });
                within(data, &limits, 1 + result_depth.max(error_depth));
                let again = decode_reply(&reply.to_bytes(), &unbounded(&limits));
                assert_eq!(
                    again.as_ref(),
                    Ok(reply),
                    "a decoded reply re-encodes to a body that decodes to it"
                );
                let p = peek_body(data, data.len());
                assert_eq!(p.call_id, Some(reply.call_id), "peek reads the call_id");
                assert_eq!(p.v.as_deref(), Some("1"), "peek reads v");
            }
            Err(e) => sound_error(data, &limits, e),
        }
    }
    tighter_refuses_more(&loose, &tight);
}

/// The coordinator protocol, read as the coordinator reads a request (the
/// size limit, then serde, then `v`) and as a worker reads an answer
/// (serde, then `v`): whatever decodes re-encodes to a body that decodes
/// to the same value.
pub fn protocol(data: &[u8]) {
    if data.len() <= Limits::default().max_bytes
        && let Ok(request) = serde_json::from_slice::<Request>(data)
    {
        let _ = request.body.kind();
        let body = serde_json::to_vec(&request).expect("a decoded request serializes");
        assert_eq!(body, request.to_bytes());
        let again = serde_json::from_slice::<Request>(&body).map_err(|e| e.to_string());
        assert_eq!(
            again.as_ref(),
            Ok(&request),
            "a decoded request re-encodes to a body that decodes to it"
        );
    }
    if let Ok(answer) = serde_json::from_slice::<Answer>(data) {
        if let AnswerBody::Resume { decision, .. } = &answer.body {
            let _ = decision.as_str();
        }
        let body = serde_json::to_vec(&answer).expect("a decoded answer serializes");
        assert_eq!(body, answer.to_bytes());
        let again = serde_json::from_slice::<Answer>(&body).map_err(|e| e.to_string());
        assert_eq!(
            again.as_ref(),
            Ok(&answer),
            "a decoded answer re-encodes to a body that decodes to it"
        );
    }
}

/// `peek`: it reads only the first `max_scan` bytes; what it returns is
/// bounded (a `reply_to` that passes `check_reply_to`, a `v` no longer than
/// the body); and on a body that is a JSON object it reads what a JSON
/// parser reads: the last top-level `reply_to`, `call_id` and `v`.
pub fn peek(data: &[u8]) {
    let whole = peek_body(data, usize::MAX);
    assert_eq!(peek_body(data, data.len()), whole);
    for cut in [0, data.len() / 2, data.len().saturating_sub(1)] {
        assert_eq!(
            peek_body(data, cut),
            peek_body(&data[..cut], usize::MAX),
            "peek reads no further than max_scan ({cut})"
        );
    }
    if let Some(to) = &whole.reply_to {
        assert!(to.len() <= MAX_REPLY_TO_BYTES, "peek's reply_to is bounded");
        assert!(
            check_reply_to(to).is_ok(),
            "peek's reply_to passes the check"
        );
    }
    if let Some(v) = &whole.v {
        assert!(v.len() <= 3 * data.len(), "peek's v is text of the body");
    }
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let reply_to = object
        .get("reply_to")
        .and_then(Value::as_str)
        .filter(|to| check_reply_to(to).is_ok());
    assert_eq!(
        whole.reply_to.as_deref(),
        reply_to,
        "peek reads the reply_to a JSON parser reads"
    );
    let call_id = object
        .get("call_id")
        .and_then(|id| serde_json::from_value::<Uuid>(id.clone()).ok());
    assert_eq!(
        whole.call_id, call_id,
        "peek reads the call_id a JSON parser reads"
    );
    let v = whole
        .v
        .as_deref()
        .map(|raw| serde_json::from_str::<Value>(raw).ok());
    assert_eq!(
        v,
        object.get("v").map(|v| Some(v.clone())),
        "peek reads the v a JSON parser reads"
    );
}

/// The rules of a decoded call envelope.
fn valid_call(call: &Call) {
    assert_eq!(call.v, VERSION);
    assert!(!call.call_id.is_nil(), "call_id is not nil");
    let service_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    assert!(
        !call.service.is_empty() && call.service.chars().all(service_ok),
        "service is a name"
    );
    assert!(
        call.service.len() <= MAX_SERVICE_CHARS,
        "service is bounded"
    );
    assert!(!call.method.is_empty(), "method is not empty");
    for field in [
        Some(&call.method),
        call.session_id.as_ref(),
        call.idempotency_key.as_ref(),
        call.traceparent.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        assert!(
            field.chars().count() <= MAX_FIELD_CHARS,
            "fields are bounded"
        );
    }
    if let Some(to) = &call.reply_to {
        assert!(check_reply_to(to).is_ok(), "reply_to passes the check");
    }
}

/// The rules of a decoded reply envelope.
fn valid_reply(reply: &Reply) {
    assert_eq!(reply.v, VERSION);
    assert!(reply.attempt >= 1, "attempt counts from 1");
    if reply.outcome == Outcome::Ok {
        assert!(reply.result.is_some(), "an ok reply has a result");
    } else {
        assert!(reply.error.is_some(), "a reply other than ok has an error");
    }
}

/// A body that decoded keeps the limits it was decoded under; `depth` is
/// the nesting of the decoded envelope.
fn within(data: &[u8], limits: &Limits, depth: usize) {
    assert!(data.len() <= limits.max_bytes, "the size limit holds");
    assert!(depth <= limits.max_depth, "the depth limit holds");
}

/// `limits` without the size limit: a re-encoded body may be longer than
/// the one decoded (`1e2` is written `100.0`).
fn unbounded(limits: &Limits) -> Limits {
    Limits {
        max_bytes: usize::MAX,
        ..*limits
    }
}

/// A refusal names the right reason: too large exactly when the body is,
/// too deep exactly when valid JSON nests deeper than the limit, never
/// "not JSON" for valid JSON; its message is not empty and bounded by the
/// body's size.
fn sound_error(data: &[u8], limits: &Limits, e: &DecodeError) {
    let too_large = data.len() > limits.max_bytes;
    assert_eq!(
        matches!(e, DecodeError::TooLarge { .. }),
        too_large,
        "too large exactly when the body is: {e}"
    );
    if let DecodeError::TooLarge { size, max } = e {
        assert_eq!((*size, *max), (data.len(), limits.max_bytes));
    }
    if let DecodeError::TooDeep { max } = e {
        assert_eq!(*max, limits.max_depth);
    }
    if !too_large && let Ok(value) = serde_json::from_slice::<Value>(data) {
        assert_eq!(
            matches!(e, DecodeError::TooDeep { .. }),
            depth(&value) > limits.max_depth,
            "too deep exactly when the JSON nests deeper than the limit: {e}"
        );
        assert!(
            !matches!(e, DecodeError::NotJson(_)),
            "valid JSON is not refused as not JSON: {e}"
        );
    }
    let message = e.to_string();
    assert!(!message.is_empty());
    assert!(
        message.len() <= 4 * data.len() + 1024,
        "the message ({} bytes) is bounded by the body ({} bytes)",
        message.len(),
        data.len()
    );
    assert!(
        [
            "too_large",
            "too_deep",
            "not_json",
            "unknown_version",
            "invalid"
        ]
        .contains(&e.kind())
    );
}

/// What decodes under tighter limits decodes the same under looser ones;
/// what the tighter limits refuse for another reason than a limit, the
/// looser refuse for the same reason.
fn tighter_refuses_more<T: PartialEq + std::fmt::Debug>(
    loose: &Result<T, DecodeError>,
    tight: &Result<T, DecodeError>,
) {
    match tight {
        Ok(t) => assert_eq!(loose.as_ref().ok(), Some(t), "looser limits accept more"),
        Err(DecodeError::TooLarge { .. } | DecodeError::TooDeep { .. }) => {}
        Err(e) => assert_eq!(
            loose.as_ref().err(),
            Some(e),
            "limits change no other verdict"
        ),
    }
}

/// The nesting of a JSON value: 0 for a scalar, 1 for a flat array or
/// object. Iterative, so that it never runs out of stack.
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, above)) = stack.pop() {
        let here = above + 1;
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|item| (item, here))),
            Value::Object(map) => stack.extend(map.values().map(|item| (item, here))),
            _ => continue,
        }
        deepest = deepest.max(here);
    }
    deepest
}
