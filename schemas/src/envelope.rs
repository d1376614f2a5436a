//! The call and reply envelopes.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{VERSION, codes};

/// One request, as published to `callq.call.<service>`.
///
/// Unknown fields are ignored, so a newer minor revision of a publisher does
/// not break older workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// Wire contract version: always 1.
    pub v: u32,
    /// The call's identity, a UUID v7 (time-ordered), in its hyphenated form
    /// (the form replies carry). Replies, retries and deduplication key on it.
    #[serde(deserialize_with = "hyphenated_uuid")]
    pub call_id: Uuid,
    /// The service (one call queue per service).
    pub service: String,
    /// The method of the service.
    pub method: String,
    /// The arguments: any JSON value.
    pub args: Value,
    /// Where the reply goes; no reply is sent without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// The client's session, whose data lives in the session data service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// After this instant the call is answered `expired` instead of run.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub deadline: Option<OffsetDateTime>,
    /// The call runs no earlier than this instant: a worker that receives
    /// it before hands it to the coordinator, which holds it (durably, no
    /// worker slot held) and publishes it again when it is due.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub not_before: Option<OffsetDateTime>,
    /// How the handler's retryable errors are retried; absent: they are
    /// not (the error is the outcome).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// The publisher's own key for the request, carried to handlers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Calls of one service with the same key run one at a time (or as
    /// many at once as the service's `max_running_per_key` allows), across
    /// workers; a call without one is not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// 0 to 9, higher first under backlog: from 5 up the call is
    /// published to its service's high band, which workers serve before
    /// the call queue (absent: the call queue, as 0 to 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// W3C trace context of the publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Call {
    /// A new call with a fresh UUID v7 id and no options.
    pub fn new(service: impl Into<String>, method: impl Into<String>, args: Value) -> Self {
        Self {
            v: VERSION,
            call_id: Uuid::now_v7(),
            service: service.into(),
            method: method.into(),
            args,
            reply_to: None,
            session_id: None,
            deadline: None,
            not_before: None,
            retry: None,
            idempotency_key: None,
            concurrency_key: None,
            priority: None,
            traceparent: None,
        }
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether the call must wait at `now`: its `not_before` is later.
    pub fn is_early_at(&self, now: OffsetDateTime) -> bool {
        self.not_before.is_some_and(|t| t > now)
    }

    /// Whether the deadline has passed at `now`.
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

/// How a call's handler's retryable errors are retried: up to
/// `max_attempts` attempts in all, the next one after an exponential
/// backoff with jitter (from `backoff_ms`, doubling, at most
/// `max_backoff_ms`), or exactly when the handler said (its `retry_after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 1 retries nothing.
    pub max_attempts: u32,
    /// The backoff before the first retry, in milliseconds (1,000 when
    /// absent); each next one doubles.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// The longest backoff, in milliseconds (60,000 when absent).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_backoff_ms() -> u64 {
    1_000
}

fn default_max_backoff_ms() -> u64 {
    60_000
}

impl RetryPolicy {
    /// The backoff after failed attempt `attempt` (1 for the first), with
    /// `jitter` in `[0, 1]`: between half and all of
    /// `backoff_ms * 2^(attempt - 1)`, at most `max_backoff_ms`.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> std::time::Duration {
        let doubled = self
            .backoff_ms
            .saturating_mul(1_u64 << attempt.saturating_sub(1).min(40));
        let full = doubled.min(self.max_backoff_ms);
        let half = full / 2;
        let ms = half + ((full - half) as f64 * jitter.clamp(0.0, 1.0)) as u64;
        std::time::Duration::from_millis(ms)
    }
}

/// The final outcome of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The handler returned a result.
    Ok,
    /// The handler's own, deterministic error (or `bad_request`).
    Error,
    /// The call left traces and its worker was lost: its outcome is unknown.
    Fatal,
    /// The deadline passed before the call ran.
    Expired,
    /// The caller cancelled the call before it left a trace.
    Cancelled,
}

impl Outcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Fatal => "fatal",
            Outcome::Expired => "expired",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error part of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code.
    pub code: String,
    /// What happened, for a person.
    pub message: String,
    /// For `fatal`: the traces the lost attempt had left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traces: Vec<String>,
}

/// One reply per final outcome, published to the call's `reply_to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Wire contract version: always 1.
    pub v: u32,
    /// The call this answers; the nil UUID when the call's id was unreadable.
    pub call_id: Uuid,
    /// The attempt that produced the outcome.
    pub attempt: u32,
    /// The outcome.
    pub outcome: Outcome,
    /// The handler's result, for `ok` (JSON `null` is a result too).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub result: Option<Value>,
    /// The error, for every other outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Reply {
    fn new(call_id: Uuid, attempt: u32, outcome: Outcome) -> Self {
        Self {
            v: VERSION,
            call_id,
            attempt,
            outcome,
            result: None,
            error: None,
        }
    }

    fn with_error(mut self, code: &str, message: impl Into<String>) -> Self {
        self.error = Some(ErrorBody {
            code: code.to_owned(),
            message: message.into(),
            traces: Vec::new(),
        });
        self
    }

    /// An `ok` reply.
    pub fn ok(call_id: Uuid, attempt: u32, result: Value) -> Self {
        let mut r = Self::new(call_id, attempt, Outcome::Ok);
        r.result = Some(result);
        r
    }

    /// An `error` reply with the handler's code and message.
    pub fn error(call_id: Uuid, attempt: u32, code: &str, message: impl Into<String>) -> Self {
        Self::new(call_id, attempt, Outcome::Error).with_error(code, message)
    }

    /// A `bad_request` error reply for a call that could not be read; the
    /// nil UUID stands for an unreadable call id.
    pub fn bad_request(call_id: Option<Uuid>, message: impl Into<String>) -> Self {
        Self::error(call_id.unwrap_or_default(), 1, codes::BAD_REQUEST, message)
    }

    /// A `fatal` reply listing the traces the lost attempt had left.
    pub fn fatal(
        call_id: Uuid,
        attempt: u32,
        message: impl Into<String>,
        traces: Vec<String>,
    ) -> Self {
        let mut r = Self::new(call_id, attempt, Outcome::Fatal)
            .with_error(codes::WORKER_LOST_AFTER_TRACES, message);
        if let Some(e) = r.error.as_mut() {
            e.traces = traces;
        }
        r
    }

    /// An `expired` reply: the deadline passed before the call ran.
    pub fn expired(call_id: Uuid, attempt: u32) -> Self {
        Self::new(call_id, attempt, Outcome::Expired).with_error(
            codes::DEADLINE_PASSED,
            "the deadline passed before the call ran",
        )
    }

    /// A `cancelled` reply: the caller cancelled the call before it left a
    /// trace; it ran no further.
    pub fn cancelled(call_id: Uuid, attempt: u32) -> Self {
        Self::new(call_id, attempt, Outcome::Cancelled).with_error(
            codes::CANCELLED,
            "the call was cancelled before it left a trace",
        )
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The error code, if any.
    pub fn code(&self) -> Option<&str> {
        self.error.as_ref().map(|e| e.code.as_str())
    }
}

/// A present field is `Some`, even when it is JSON `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A UUID in its 36-character hyphenated form only, so that a publisher can
/// match the replies' `call_id` by string.
fn hyphenated_uuid<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
    use serde::de::Error;
    let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
    if s.len() != 36 {
        return Err(D::Error::custom(format!(
            "call_id `{s}` must be a UUID in the hyphenated form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
        )));
    }
    Uuid::parse_str(&s).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_half_and_all_of_it_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            backoff_ms: 100,
            max_backoff_ms: 1_000,
        };
        let ms = |attempt, jitter| p.backoff(attempt, jitter).as_millis();
        assert_eq!((ms(1, 0.0), ms(1, 1.0)), (50, 100));
        assert_eq!((ms(2, 0.0), ms(2, 1.0)), (100, 200));
        assert_eq!((ms(3, 0.5), ms(4, 1.0)), (300, 800));
        assert_eq!((ms(5, 0.0), ms(5, 1.0)), (500, 1_000), "capped");
        assert_eq!(ms(u32::MAX, 1.0), 1_000, "no overflow");
        assert_eq!(ms(2, 7.0), 200, "jitter clamped");
    }
}
