//! A call's spans across processes (OpenTelemetry), joined by the W3C
//! `traceparent` a call envelope and a coordinator request carry.
//!
//! Off until a process installs an exporter and calls [`enable`]: then
//! nothing here allocates or reads a clock, and a call goes out with the
//! `traceparent` its caller gave, if any. The span names and attributes
//! follow the OpenTelemetry messaging conventions where one fits
//! (`messaging.system`, `messaging.destination.name`,
//! `messaging.message.id`); the rest are `callq.*`.

use std::cell::Cell;
use std::sync::OnceLock;

use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue, global};

pub use opentelemetry::Context as TraceContext;
pub use opentelemetry::KeyValue as Attribute;
pub use opentelemetry::context::FutureExt;
pub use opentelemetry::trace::SpanKind as Kind;
pub use opentelemetry::trace::{SpanId, TraceId};

static TRACER: OnceLock<global::BoxedTracer> = OnceLock::new();

thread_local! {
    /// The ids of the span being started on this thread, where they are
    /// chosen rather than drawn (see [`start_as`]).
    static CHOSEN: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// The trace id chosen for the span being started on this thread, if one
/// is: the process's id generator hands it out instead of a random one.
pub fn chosen_trace_id() -> Option<TraceId> {
    CHOSEN.get().map(|(trace, _)| trace)
}

/// The span id chosen for the span being started on this thread, if one
/// is.
pub fn chosen_span_id() -> Option<SpanId> {
    CHOSEN.get().map(|(_, span)| span)
}

/// The ids of a call's `send` span, from its call id: its trace id is the
/// call id (where the caller gave no trace to join), and its span id is
/// derived from it, so that the envelope a call id is published with is
/// the same bytes each time it is published (the coordinator refuses a
/// call id published again with another body).
pub fn call_ids(call_id: u128) -> (TraceId, SpanId) {
    // Both halves of the id, so that ids of one millisecond differ.
    let folded = (call_id as u64) ^ ((call_id >> 64) as u64).rotate_left(17);
    (TraceId::from(call_id), SpanId::from(folded.max(1)))
}

/// Turns spans on, with the tracer provider installed globally (the
/// process calls this once, after installing it).
pub fn enable() {
    TRACER.get_or_init(|| global::tracer("callq"));
}

/// Whether spans are on in this process.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// `messaging.system` for an adapter's [`kind`](crate::Broker::kind).
pub fn system(kind: &str) -> &'static str {
    match kind {
        "amqp" => "rabbitmq",
        "kafka" => "kafka",
        _ => "callq",
    }
}

/// The context a W3C `traceparent` names, as the parent of spans started
/// in this process; the empty context when it is absent or unreadable.
pub fn remote(traceparent: Option<&str>) -> Context {
    match traceparent.and_then(parse) {
        Some(span) => Context::new().with_remote_span_context(span),
        None => Context::new(),
    }
}

fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let cx = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags & 1),
        true,
        TraceState::NONE,
    );
    cx.is_valid().then_some(cx)
}

/// The W3C `traceparent` of the span `cx` holds, if it holds a valid one.
pub fn traceparent(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        // Written digit by digit: every traced call makes one.
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        hex(&mut out, &sc.trace_id().to_bytes());
        out.push('-');
        hex(&mut out, &sc.span_id().to_bytes());
        out.push('-');
        hex(&mut out, &[sc.trace_flags().to_u8()]);
        out
    })
}

/// Appends `bytes` in lowercase hex.
fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// The `traceparent` of the current context's span; `None` when spans are
/// off or no span is current.
pub fn current_traceparent() -> Option<String> {
    if enabled() {
        Context::map_current(traceparent)
    } else {
        None
    }
}

/// Starts a span under `parent` and returns the context holding it; `None`
/// when spans are off. The span ends with [`end`] (or when the last
/// context holding it is dropped).
pub fn start(
    name: String,
    kind: SpanKind,
    parent: &Context,
    attributes: Vec<KeyValue>,
) -> Option<Context> {
    let tracer = TRACER.get()?;
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    Some(parent.with_span(span))
}

/// Starts a span as [`start`] does, with the ids `ids` instead of random
/// ones (the trace id only where `parent` holds no span), where the
/// process's id generator honours [`chosen_trace_id`] and
/// [`chosen_span_id`].
pub fn start_as(
    ids: (TraceId, SpanId),
    name: String,
    kind: SpanKind,
    parent: &Context,
    attributes: Vec<KeyValue>,
) -> Option<Context> {
    CHOSEN.set(Some(ids));
    let started = start(name, kind, parent, attributes);
    CHOSEN.set(None);
    started
}

/// Adds an attribute to the span `cx` holds.
pub fn set(cx: Option<&Context>, attribute: KeyValue) {
    if let Some(cx) = cx {
        cx.span().set_attribute(attribute);
    }
}

/// Adds an attribute to the span of the current context (a no-op when
/// spans are off or no span is current).
pub fn set_current(attribute: impl FnOnce() -> KeyValue) {
    if enabled() {
        Context::map_current(|cx| cx.span().set_attribute(attribute()));
    }
}

/// Ends the span `cx` holds, marked as an error with `error` where there
/// is one.
pub fn end(cx: Option<Context>, error: Option<String>) {
    if let Some(cx) = cx {
        let span = cx.span();
        if let Some(error) = error {
            span.set_status(Status::error(error));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_written() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote(Some(tp));
        assert_eq!(traceparent(&cx).as_deref(), Some(tp));
        assert!(cx.span().span_context().is_remote());
    }

    #[test]
    fn an_unreadable_traceparent_is_no_parent() {
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(traceparent(&remote(Some(bad))), None, "{bad}");
        }
        assert_eq!(traceparent(&remote(None)), None);
    }

    #[test]
    fn spans_are_off_until_enabled() {
        assert!(start("x".into(), SpanKind::Internal, &Context::new(), vec![]).is_none());
    }
}
