//! The capture file: a queue's traffic as JSON Lines, for replay in tests.
//!
//! The first line is a header naming the format version, the broker and the
//! service: `{"callq_capture": 1, "broker": "amqp", "service": "echo"}`.
//! Every other line is one record: a call as it was published, or a reply
//! as it was sent:
//!
//! ```json
//! {"type": "call", "at_ms": 12, "attempt": 1, "headers": {}, "body": {"v": 1, "call_id": "…", "service": "echo", "method": "echo", "args": {}}}
//! {"type": "reply", "at_ms": 15, "body": {"v": 1, "call_id": "…", "attempt": 1, "outcome": "ok", "result": {}}}
//! ```
//!
//! `at_ms` is the time since the capture started; `ts_ms` the broker's
//! timestamp where it keeps one, and `partition` and `offset` where the
//! message was on Kafka (each absent when unknown); `body` is the envelope as
//! JSON, or, for a body that is not JSON (bad input is traffic too), its
//! text in `body_text`. [`Reader`] names the line of anything it cannot
//! read and can skip such lines.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The capture format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The first line of a capture file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The format version: [`FORMAT_VERSION`].
    pub callq_capture: u32,
    /// The broker captured from: `amqp`, `kafka` or `embedded`.
    pub broker: String,
    /// The service whose queue was captured.
    pub service: String,
}

/// One captured message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// A call, as published to the service's queue.
    Call {
        /// Milliseconds since the capture started.
        at_ms: u64,
        /// The attempt header of the copy (1 for the client's original).
        #[serde(default = "one")]
        attempt: u32,
        /// The message headers.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        /// The body.
        #[serde(flatten)]
        body: Body,
        /// Where and when the broker held it.
        #[serde(flatten)]
        origin: Origin,
    },
    /// A reply, as a worker sent it.
    Reply {
        /// Milliseconds since the capture started.
        at_ms: u64,
        /// The body.
        #[serde(flatten)]
        body: Body,
        /// Where and when the broker held it.
        #[serde(flatten)]
        origin: Origin,
    },
}

/// Where and when the broker held a captured message, as far as it tells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The broker's timestamp, in milliseconds since the Unix epoch: the
    /// record timestamp on Kafka, the publish time on the embedded broker,
    /// the publisher's `timestamp` property (whole seconds) on RabbitMQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<i64>,
    /// The partition, on Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// The offset in the partition, on Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

fn one() -> u32 {
    1
}

/// A captured body: JSON, or the text of one that is not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// A JSON body.
    Body(Value),
    /// A body that is not JSON, as text (invalid UTF-8 replaced).
    BodyText(String),
}

impl Body {
    /// The body of a message as it travelled.
    pub fn of(bytes: &[u8]) -> Self {
        match serde_json::from_slice(bytes) {
            Ok(v) => Body::Body(v),
            Err(_) => Body::BodyText(String::from_utf8_lossy(bytes).into_owned()),
        }
    }

    /// The bytes to publish again.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Body::Body(v) => serde_json::to_vec(v).unwrap_or_default(),
            Body::BodyText(t) => t.as_bytes().to_vec(),
        }
    }

    /// The JSON body, if it is one.
    pub fn json(&self) -> Option<&Value> {
        match self {
            Body::Body(v) => Some(v),
            Body::BodyText(_) => None,
        }
    }
}

/// A line of a capture file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    /// The line's number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Writes a capture file.
pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    /// Starts a capture file with its header.
    pub fn new(mut out: W, broker: &str, service: &str) -> std::io::Result<Self> {
        let header = Header {
            callq_capture: FORMAT_VERSION,
            broker: broker.to_owned(),
            service: service.to_owned(),
        };
        serde_json::to_writer(&mut out, &header)?;
        out.write_all(b"\n")?;
        Ok(Self { out })
    }

    /// Appends a record.
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")
    }

    /// Flushes and returns the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a capture file: its header, then its records one line at a time.
pub struct Reader<R: BufRead> {
    lines: std::io::Lines<R>,
    line: usize,
    /// The file's header.
    pub header: Header,
}

impl<R: BufRead> Reader<R> {
    /// Reads the header; fails naming line 1 when it is missing, not a
    /// header, or of an unknown format version.
    pub fn new(input: R) -> Result<Self, LineError> {
        let mut lines = input.lines();
        let bad = |reason: String| LineError { line: 1, reason };
        let first = lines
            .next()
            .ok_or_else(|| bad("empty file: no capture header".into()))?
            .map_err(|e| bad(format!("unreadable: {e}")))?;
        let value: Value = serde_json::from_str(&first)
            .map_err(|e| bad(format!("not a capture header (not JSON: {e})")))?;
        let version = value
            .get("callq_capture")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                bad("not a capture header: no \"callq_capture\" format version".into())
            })?;
        if version != u64::from(FORMAT_VERSION) {
            return Err(bad(format!(
                "capture format version {version} is unknown (this callq reads version {FORMAT_VERSION})"
            )));
        }
        let header: Header =
            serde_json::from_value(value).map_err(|e| bad(format!("not a capture header: {e}")))?;
        Ok(Self {
            lines,
            line: 1,
            header,
        })
    }
}

impl<R: BufRead> Reader<R> {
    /// The line of the record (or error) returned last.
    pub fn line(&self) -> usize {
        self.line
    }
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = Result<Record, LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let text = self.lines.next()?;
            self.line += 1;
            let line = self.line;
            let bad = |reason: String| Some(Err(LineError { line, reason }));
            let text = match text {
                Ok(t) => t,
                Err(e) => return bad(format!("unreadable: {e}")),
            };
            if text.trim().is_empty() {
                continue;
            }
            return match serde_json::from_str::<Record>(&text) {
                Ok(r) => Some(Ok(r)),
                Err(e) if e.is_eof() => bad(format!("truncated record: {e}")),
                Err(e) => match serde_json::from_str::<Value>(&text) {
                    Err(_) => bad(format!("not JSON: {e}")),
                    Ok(v) => bad(format!(
                        "not a call or reply record (type {}): {e}",
                        v.get("type").map_or("missing".into(), Value::to_string)
                    )),
                },
            };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn a_file_round_trips_and_bad_lines_are_named() {
        let mut w = Writer::new(Vec::new(), "embedded", "echo").unwrap();
        let call = Record::Call {
            origin: Origin {
                ts_ms: Some(1_700_000_000_123),
                partition: Some(2),
                offset: Some(41),
            },
            at_ms: 3,
            attempt: 1,
            headers: BTreeMap::new(),
            body: Body::Body(json!({"v": 1, "method": "echo"})),
        };
        let bad_input = Record::Call {
            origin: Origin::default(),
            at_ms: 4,
            attempt: 2,
            headers: [("x".to_owned(), "y".to_owned())].into(),
            body: Body::of(b"{not json"),
        };
        w.write(&call).unwrap();
        w.write(&bad_input).unwrap();
        let mut text = String::from_utf8(w.finish().unwrap()).unwrap();
        text.push_str(
            "{\"type\": \"gossip\", \"at_ms\": 1}\n{\"type\": \"reply\", \"at_ms\": 9, \"bo",
        );
        let r = Reader::new(text.as_bytes()).unwrap();
        assert_eq!(r.header.service, "echo");
        let all: Vec<_> = r.collect();
        assert_eq!(all[0], Ok(call));
        assert_eq!(all[1], Ok(bad_input));
        let e = all[2].clone().unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.reason.contains("not a call or reply"), "{e}");
        let e = all[3].clone().unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.reason.contains("truncated"), "{e}");
    }

    #[test]
    fn an_unknown_version_or_a_missing_header_is_refused() {
        let e = Reader::new(
            "{\"callq_capture\": 9, \"broker\": \"x\", \"service\": \"y\"}\n".as_bytes(),
        )
        .err()
        .unwrap();
        assert_eq!(e.line, 1);
        assert!(e.reason.contains("version 9 is unknown"), "{e}");
        let e = Reader::new("{\"type\": \"call\"}\n".as_bytes())
            .err()
            .unwrap();
        assert!(e.reason.contains("no \"callq_capture\""), "{e}");
        assert!(Reader::new("".as_bytes()).is_err());
    }
}
