//! Defensive decoding: limits first, then parsing, then validation.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::{Call, Reply, VERSION};

/// Limits checked on every body *before* it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Limits {
    /// The largest body accepted, in bytes.
    pub max_bytes: usize,
    /// The deepest nesting of objects and arrays accepted.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
            max_depth: 64,
        }
    }
}

/// Why a body could not be decoded. Each becomes a `bad_request` reply and a
/// dead letter; none is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body is larger than [`Limits::max_bytes`].
    #[error("body of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The body nests deeper than [`Limits::max_depth`].
    #[error("body nests deeper than the limit of {max} levels")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// The body is not (valid UTF-8) JSON.
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// The body names a wire contract version this build does not speak.
    #[error("unknown wire contract version v={0} (this worker speaks v=1)")]
    UnknownVersion(String),
    /// The body is JSON but not a valid envelope (missing or mistyped field).
    #[error("invalid envelope: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// A short, stable name of the kind of error (for metrics and logs).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::TooDeep { .. } => "too_deep",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::UnknownVersion(_) => "unknown_version",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// Decodes a call envelope: size limit, depth limit, parse, version, fields.
pub fn decode_call(body: &[u8], limits: &Limits) -> Result<Call, DecodeError> {
    let call: Call = decode(body, limits)?;
    if call.service.is_empty() || !call.service.chars().all(valid_name_char) {
        return Err(DecodeError::Invalid(format!(
            "service `{}` must be non-empty and use only letters, digits, `_`, `-` and `.`",
            call.service
        )));
    }
    if call.method.is_empty() {
        return Err(DecodeError::Invalid("method must be non-empty".into()));
    }
    if call.call_id.is_nil() {
        return Err(DecodeError::Invalid(
            "call_id must not be the nil UUID".into(),
        ));
    }
    for (field, value, max) in [
        ("service", Some(&call.service), MAX_SERVICE_CHARS),
        ("method", Some(&call.method), MAX_FIELD_CHARS),
        ("session_id", call.session_id.as_ref(), MAX_FIELD_CHARS),
        (
            "idempotency_key",
            call.idempotency_key.as_ref(),
            MAX_FIELD_CHARS,
        ),
        (
            "concurrency_key",
            call.concurrency_key.as_ref(),
            MAX_FIELD_CHARS,
        ),
        ("traceparent", call.traceparent.as_ref(), MAX_FIELD_CHARS),
    ] {
        if let Some(v) = value
            && v.chars().count() > max
        {
            return Err(DecodeError::Invalid(format!(
                "{field} is {} characters long; the limit is {max}",
                v.chars().count()
            )));
        }
    }
    if let Some(p) = call.priority
        && p > MAX_PRIORITY
    {
        return Err(DecodeError::Invalid(format!(
            "priority is {p}; it must be from 0 to {MAX_PRIORITY}"
        )));
    }
    if let Some(to) = &call.reply_to {
        check_reply_to(to).map_err(DecodeError::Invalid)?;
    }
    Ok(call)
}

/// The highest `priority` accepted.
pub const MAX_PRIORITY: u8 = 9;

/// The longest `service` accepted, in characters (ASCII only): its queue
/// names (`callq.call.<service>`, `callq.dead.<service>`) must fit the 249
/// characters of a Kafka topic name (RabbitMQ allows 255 bytes).
pub const MAX_SERVICE_CHARS: usize = 238;

/// The longest `method`, `session_id`, `idempotency_key` or `traceparent`
/// accepted, in characters (as JSON Schema's `maxLength` counts).
pub const MAX_FIELD_CHARS: usize = 255;

/// The longest `reply_to` accepted, in bytes: a RabbitMQ queue name's limit
/// (a Kafka topic's is 249, which the broker checks).
pub const MAX_REPLY_TO_BYTES: usize = 255;

/// Checks that `reply_to` can name a reply queue: 1 to 255 bytes of
/// printable ASCII without spaces (server-named and direct reply-to queues
/// of RabbitMQ fit), and not one of callq's own
/// queues (any name under `callq.` but `callq.reply.`), so that a call
/// cannot make a worker publish into the control path, a call queue or a
/// dead-letter queue. Returns why not.
pub fn check_reply_to(to: &str) -> Result<(), String> {
    if to.is_empty() || to.len() > MAX_REPLY_TO_BYTES {
        return Err(format!(
            "reply_to must be 1 to {MAX_REPLY_TO_BYTES} bytes long (it is {})",
            to.len()
        ));
    }
    if !to.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("reply_to may use only printable ASCII, without spaces".into());
    }
    if to.starts_with("callq.") && !to.starts_with("callq.reply.") {
        return Err(format!(
            "reply_to `{to}` names one of callq's own queues; replies go to `callq.reply.<client>` or a queue outside `callq.`"
        ));
    }
    Ok(())
}

/// Decodes a reply envelope: the same limits as [`decode_call`], then the
/// rules of the reply schema (attempt from 1, `result` with `ok`, `error`
/// with every other outcome).
pub fn decode_reply(body: &[u8], limits: &Limits) -> Result<Reply, DecodeError> {
    let reply: Reply = decode(body, limits)?;
    if reply.attempt == 0 {
        return Err(DecodeError::Invalid("attempt must be at least 1".into()));
    }
    match (reply.outcome, &reply.result, &reply.error) {
        (crate::Outcome::Ok, None, _) => {
            Err(DecodeError::Invalid("an `ok` reply needs `result`".into()))
        }
        (o, _, None) if o != crate::Outcome::Ok => Err(DecodeError::Invalid(format!(
            "an `{o}` reply needs `error`"
        ))),
        _ => Ok(reply),
    }
}

fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn decode<T: DeserializeOwned + Versioned>(body: &[u8], limits: &Limits) -> Result<T, DecodeError> {
    if body.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            max: limits.max_bytes,
        });
    }
    check_depth(body, limits.max_depth)?;
    // serde would also take a struct's fields by position from an array.
    if body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[')
    {
        return Err(DecodeError::Invalid(
            "an envelope must be a JSON object, not an array".into(),
        ));
    }
    match serde_json::from_slice::<T>(body) {
        Ok(v) if v.version() == VERSION => Ok(v),
        Ok(v) => Err(DecodeError::UnknownVersion(v.version().to_string())),
        Err(e) => Err(classify(body, e)),
    }
}

/// Turns a serde error into ours; a data error on a body that names another
/// version is reported as the version, the real cause.
fn classify(body: &[u8], e: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    let data = match e.classify() {
        Category::Data => true,
        // serde_json reports some type errors in valid JSON (a number where
        // an enum's name goes) as syntax errors (a fuzz finding).
        Category::Syntax => serde_json::from_slice::<serde_json::Value>(body).is_ok(),
        Category::Eof | Category::Io => false,
    };
    if !data {
        return DecodeError::NotJson(e.to_string());
    }
    match peek(body, body.len()).v {
        Some(v) if v != VERSION.to_string() => DecodeError::UnknownVersion(v),
        _ => DecodeError::Invalid(e.to_string()),
    }
}

trait Versioned {
    fn version(&self) -> u32;
}
impl Versioned for Call {
    fn version(&self) -> u32 {
        self.v
    }
}
impl Versioned for Reply {
    fn version(&self) -> u32 {
        self.v
    }
}

/// Checks the nesting depth of a JSON text without parsing it: one pass, no
/// recursion, no allocation.
fn check_depth(body: &[u8], max: usize) -> Result<(), DecodeError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Err(DecodeError::TooDeep { max });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// What [`peek`] could read from a body that may not decode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peek {
    /// The top-level `reply_to`, if it is a string that passes
    /// [`check_reply_to`] (a reply goes nowhere else).
    pub reply_to: Option<String>,
    /// The top-level `call_id`, if it is a UUID string.
    pub call_id: Option<Uuid>,
    /// The top-level `v`, as written (a number or a string).
    pub v: Option<String>,
    /// The top-level `priority`, if it is one (0 to [`MAX_PRIORITY`]).
    pub priority: Option<u8>,
}

/// Reads the top-level `reply_to`, `call_id` and `v` of a JSON object
/// without building it: one pass over at most `max_scan` bytes, no
/// recursion, so a body that is too deep or too large for [`decode_call`]
/// can still be answered. Returns what it found before the body stopped
/// making sense.
pub fn peek(body: &[u8], max_scan: usize) -> Peek {
    let mut out = Peek::default();
    let body = &body[..body.len().min(max_scan)];
    let mut s = Scanner { b: body, i: 0 };
    s.ws();
    if !s.eat(b'{') {
        return out;
    }
    loop {
        s.ws();
        let key_start = s.i;
        let Some(key) = s.string() else { return out };
        // A key written with escapes (`"reply\u005fto"`) is the same key.
        let unescaped;
        let key = if key.contains(&b'\\') {
            unescaped = serde_json::from_slice::<String>(&body[key_start..s.i]).unwrap_or_default();
            unescaped.as_bytes()
        } else {
            key
        };
        s.ws();
        if !s.eat(b':') {
            return out;
        }
        s.ws();
        let start = s.i;
        if !s.skip_value() {
            return out;
        }
        let raw = &body[start..s.i];
        match key {
            b"reply_to" => {
                out.reply_to = serde_json::from_slice::<String>(raw)
                    .ok()
                    .filter(|to| check_reply_to(to).is_ok());
            }
            b"call_id" => out.call_id = serde_json::from_slice::<Uuid>(raw).ok(),
            b"v" => out.v = Some(String::from_utf8_lossy(raw).into_owned()),
            b"priority" => {
                out.priority = serde_json::from_slice::<u8>(raw)
                    .ok()
                    .filter(|p| *p <= MAX_PRIORITY);
            }
            _ => {}
        }
        s.ws();
        if !s.eat(b',') {
            return out;
        }
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// A string's raw contents (between the quotes, escapes left as they are).
    fn string(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.i;
        let mut escaped = false;
        while let Some(c) = self.peek() {
            self.i += 1;
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                return Some(&self.b[start..self.i - 1]);
            }
        }
        None
    }

    /// Skips one value of any depth, iteratively. False if the body ends.
    fn skip_value(&mut self) -> bool {
        match self.peek() {
            Some(b'"') => self.string().is_some(),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                while let Some(c) = self.peek() {
                    match c {
                        b'"' => {
                            if self.string().is_none() {
                                return false;
                            }
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return true;
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
                false
            }
            Some(_) => {
                let start = self.i;
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.i += 1;
                }
                self.i > start
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits::default()
    }

    fn good() -> serde_json::Value {
        json!({"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "service": "bank",
               "method": "transfer", "args": {"cents": 5}, "reply_to": "callq.reply.shop-1"})
    }

    #[test]
    fn decodes_the_design_example() {
        let body = br#"{"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f",
 "service": "bank", "method": "transfer", "args": {"from": "a", "to": "b", "cents": 500},
 "reply_to": "callq.reply.shop-1", "session_id": "s-42",
 "deadline": "2026-11-22T12:00:05Z", "idempotency_key": "order-981",
 "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#;
        let call = decode_call(body, &limits()).unwrap();
        assert_eq!(call.service, "bank");
        assert_eq!(call.session_id.as_deref(), Some("s-42"));
        assert_eq!(call.deadline.unwrap().unix_timestamp(), 1_795_348_805);
        let again = decode_call(&call.to_bytes(), &limits()).unwrap();
        assert_eq!(again, call);
    }

    #[test]
    fn every_bad_body_has_its_own_error() {
        let l = Limits {
            max_bytes: 1000,
            max_depth: 8,
        };
        assert_eq!(decode_call(b"not json", &l).unwrap_err().kind(), "not_json");
        assert_eq!(
            decode_call(&vec![b' '; 2000], &l).unwrap_err(),
            DecodeError::TooLarge {
                size: 2000,
                max: 1000
            }
        );
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(
            decode_call(deep.as_bytes(), &l).unwrap_err(),
            DecodeError::TooDeep { max: 8 }
        );
        let array = serde_json::to_vec(&json!([
            1,
            "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f",
            "bank",
            "t",
            {}
        ]))
        .unwrap();
        assert_eq!(decode_call(&array, &l).unwrap_err().kind(), "invalid");
        let mut braced = good();
        braced["call_id"] = json!("{0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f}");
        assert_eq!(
            decode_call(&serde_json::to_vec(&braced).unwrap(), &l)
                .unwrap_err()
                .kind(),
            "invalid"
        );
        let mut v99 = good();
        v99["v"] = json!(99);
        v99.as_object_mut().unwrap().remove("method");
        assert_eq!(
            decode_call(&serde_json::to_vec(&v99).unwrap(), &l).unwrap_err(),
            DecodeError::UnknownVersion("99".into())
        );
        let mut v2 = good();
        v2["v"] = json!(2);
        assert_eq!(
            decode_call(&serde_json::to_vec(&v2).unwrap(), &l).unwrap_err(),
            DecodeError::UnknownVersion("2".into())
        );
        let mut missing = good();
        missing.as_object_mut().unwrap().remove("service");
        let e = decode_call(&serde_json::to_vec(&missing).unwrap(), &l).unwrap_err();
        assert!(
            matches!(&e, DecodeError::Invalid(m) if m.contains("service")),
            "{e}"
        );
        let mut mistyped = good();
        mistyped["call_id"] = json!(42);
        assert_eq!(
            decode_call(&serde_json::to_vec(&mistyped).unwrap(), &l)
                .unwrap_err()
                .kind(),
            "invalid"
        );
        let mut bad_name = good();
        bad_name["service"] = json!("a/b");
        assert_eq!(
            decode_call(&serde_json::to_vec(&bad_name).unwrap(), &l)
                .unwrap_err()
                .kind(),
            "invalid"
        );
        assert_eq!(
            decode_call(&[0xff, 0xfe], &l).unwrap_err().kind(),
            "not_json"
        );
    }

    #[test]
    fn depth_counts_brackets_inside_strings_as_text() {
        let l = Limits {
            max_bytes: 10_000,
            max_depth: 3,
        };
        let mut call = good();
        call["args"] = json!({"text": "[[[[[[[[{{{{{{ \" [[[["});
        assert!(decode_call(&serde_json::to_vec(&call).unwrap(), &l).is_ok());
        call["args"] = json!({"a": {"b": {"c": 1}}});
        assert_eq!(
            decode_call(&serde_json::to_vec(&call).unwrap(), &l).unwrap_err(),
            DecodeError::TooDeep { max: 3 }
        );
    }

    #[test]
    fn peek_reads_reply_to_from_bodies_that_do_not_decode() {
        let deep = format!(
            r#"{{"args": {}1{}, "reply_to": "callq.reply.x", "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "v": 99}}"#,
            "[".repeat(1000),
            "]".repeat(1000)
        );
        let p = peek(deep.as_bytes(), usize::MAX);
        assert_eq!(p.reply_to.as_deref(), Some("callq.reply.x"));
        assert_eq!(
            p.call_id.unwrap().to_string(),
            "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f"
        );
        assert_eq!(p.v.as_deref(), Some("99"));
        let escaped = br#"{"a": "x\"y", "reply_to": "q\u002e1"}"#;
        assert_eq!(peek(escaped, usize::MAX).reply_to.as_deref(), Some("q.1"));
        assert_eq!(peek(b"garbage", usize::MAX), Peek::default());
        // Keys written with escapes are the same keys (a fuzz finding).
        let p = peek(br#"{"reply\u005fto": "q", "\u0076": 2}"#, usize::MAX);
        assert_eq!(
            (p.reply_to.as_deref(), p.v.as_deref()),
            (Some("q"), Some("2"))
        );
        assert_eq!(peek(br#"{"reply_to": 5}"#, usize::MAX).reply_to, None);
        // Nested reply_to keys are not the envelope's.
        assert_eq!(
            peek(br#"{"args": {"reply_to": "no"}}"#, usize::MAX).reply_to,
            None
        );
        // Truncated bodies give what came before the cut.
        assert_eq!(
            peek(br#"{"reply_to": "r", "args": [1, 2"#, usize::MAX)
                .reply_to
                .as_deref(),
            Some("r")
        );
    }

    #[test]
    fn hostile_reply_to_and_overlong_fields_are_refused_with_the_reason() {
        let refused = |field: &str, value: serde_json::Value| {
            let mut call = good();
            call[field] = value;
            match decode_call(&serde_json::to_vec(&call).unwrap(), &limits()) {
                Err(DecodeError::Invalid(m)) => m,
                other => panic!("{field}: {other:?}"),
            }
        };
        for to in [
            String::new(),
            "q".repeat(256),
            "q".repeat(10_000),
            "callq.coordinator".into(),
            "callq.heartbeats".into(),
            "callq.worker.w1".into(),
            "callq.call.bank".into(),
            "callq.dead.bank".into(),
            "reply queue".into(),
            "r\u{e9}ponse".into(),
        ] {
            let m = refused("reply_to", json!(to));
            assert!(m.contains("reply_to"), "{to}: {m}");
            let body = serde_json::to_vec(&json!({"reply_to": to})).unwrap();
            assert_eq!(peek(&body, usize::MAX).reply_to, None, "{to}");
        }
        for to in [
            "callq.reply.shop-1",
            "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxNjE0NTM0NzIAAAAMAAAAAAAAAAA=",
            &"q".repeat(255),
        ] {
            let mut call = good();
            call["reply_to"] = json!(to);
            assert!(
                decode_call(&serde_json::to_vec(&call).unwrap(), &limits()).is_ok(),
                "{to}"
            );
        }
        let m = refused("service", json!("s".repeat(MAX_SERVICE_CHARS + 1)));
        assert!(m.contains("service is 239 characters"), "{m}");
        for field in ["method", "session_id", "idempotency_key", "traceparent"] {
            let m = refused(field, json!("x".repeat(MAX_FIELD_CHARS + 1)));
            assert!(m.starts_with(field), "{m}");
        }
    }

    #[test]
    fn replies_round_trip() {
        let id = Uuid::now_v7();
        for r in [
            Reply::ok(id, 1, json!({"balance": 1200})),
            Reply::ok(id, 1, serde_json::Value::Null),
            Reply::error(id, 1, "insufficient_funds", "a has 300"),
            Reply::fatal(id, 2, "lost", vec!["mail.sent".into()]),
            Reply::expired(id, 1),
            Reply::bad_request(None, "not json"),
        ] {
            assert_eq!(decode_reply(&r.to_bytes(), &limits()).unwrap(), r);
        }
        for bad in [
            json!({"v": 1, "call_id": id, "attempt": 0, "outcome": "ok", "result": 1}),
            json!({"v": 1, "call_id": id, "attempt": 1, "outcome": "ok"}),
            json!({"v": 1, "call_id": id, "attempt": 1, "outcome": "fatal"}),
            // serde_json calls this a syntax error; it is JSON (a fuzz finding).
            json!({"v": 1, "call_id": id, "attempt": 1, "outcome": 1}),
        ] {
            assert_eq!(
                decode_reply(&serde_json::to_vec(&bad).unwrap(), &limits())
                    .unwrap_err()
                    .kind(),
                "invalid",
                "{bad}"
            );
        }
    }
}
