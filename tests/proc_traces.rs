//! Traces across a worker's death, on RabbitMQ: a coordinator, a worker
//! and `callq call` export their spans with OTLP to a receiver in this
//! test (`OTEL_EXPORTER_OTLP_ENDPOINT`). The worker running the call is
//! killed mid-call; a second worker runs it as attempt 2 (from the
//! broker's redelivery or the coordinator's re-issue, whichever comes
//! first). One trace, whose id is the call id, holds the client's
//! `send`, the second attempt's `process` (attempt 2, a child of
//! `send`), its `resume` round trip (a child of `process`) and the
//! coordinator's `resume` (a child of that).
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use callq_node::Admin;
use callq_schemas::protocol::WorkerState;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use support::{Proc, Vhost, count, wait_status};
use tokio::time::Instant;

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    kind: i32,
    trace: String,
    id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

type Received = Arc<Mutex<Vec<Got>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Any::StringValue(s)) => s.clone(),
                Some(Any::IntValue(i)) => i.to_string(),
                Some(Any::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// `POST /v1/traces`: OTLP over HTTP, protobuf.
async fn receive(State(received): State<Received>, body: axum::body::Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
    let mut got = received.lock().unwrap();
    for rs in request.resource_spans {
        let resource = text(&rs.resource.map(|r| r.attributes).unwrap_or_default());
        let service = resource
            .iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            got.push(Got {
                service: service.clone(),
                name: span.name,
                kind: span.kind,
                trace: hex(&span.trace_id),
                id: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
                attributes: text(&span.attributes),
            });
        }
    }
    ""
}

/// Starts the receiver; its address and what it received.
async fn receiver() -> (u16, Received) {
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, received)
}

/// Waits until the spans received satisfy `found`, which returns what the
/// test reads from them.
async fn wait_spans<T>(received: &Received, what: &str, found: impl Fn(&[Got]) -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let spans = received.lock().unwrap().clone();
        if let Some(t) = found(&spans) {
            return t;
        }
        assert!(
            Instant::now() < until,
            "{what}: not received; spans: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_call_across_a_worker_death() {
    let (port, received) = receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let vhost = Vhost::create("traces");
    let dir = support::temp_dir("traces");
    let _coordinator = Proc::spawn_env("coordinator", &["coordinator"], &vhost.url, &dir, &otel);
    let worker = |id: &str| {
        let args = ["worker", "--services", "echo", "--worker-id", id];
        Proc::spawn_env(id, &args, &vhost.url, &dir, &otel)
    };
    let mut w1 = worker("w1");
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "w1 active", Duration::from_secs(60), |s| {
        count(s, WorkerState::Active) == 1
    })
    .await;

    let args = [
        "call",
        "echo",
        "sleep",
        r#"{"ms": 3000}"#,
        "--timeout-ms",
        "120000",
    ];
    let mut call = Proc::spawn_env("call", &args, &vhost.url, &dir, &otel);
    wait_status(
        &admin,
        "w1 running the call",
        Duration::from_secs(30),
        |s| {
            s.workers
                .iter()
                .any(|w| w.worker_id == "w1" && w.free < w.capacity)
        },
    )
    .await;
    let _w2 = worker("w2");
    wait_status(&admin, "w2 active", Duration::from_secs(60), |s| {
        s.workers
            .iter()
            .any(|w| w.worker_id == "w2" && w.state == WorkerState::Active)
    })
    .await;
    w1.kill9();

    let exit = call.wait_exit(Duration::from_secs(120));
    assert_eq!(exit.and_then(|e| e.code()), Some(0), "{}", call.log());
    let log = call.log();
    let reply: serde_json::Value = log
        .lines()
        .find_map(|l| {
            serde_json::from_str(l)
                .ok()
                .filter(|v: &serde_json::Value| v.get("call_id").is_some())
        })
        .unwrap_or_else(|| panic!("no reply printed: {log}"));
    assert_eq!(reply["outcome"], "ok", "{reply}");
    assert_eq!(reply["attempt"], 2, "the call was re-issued: {reply}");
    let call_id = reply["call_id"].as_str().unwrap().replace('-', "");

    // The client's `send`: the trace's root, whose id is the call id.
    let send = wait_spans(&received, "the client's send span", |spans| {
        spans
            .iter()
            .find(|s| s.service == "callq-client" && s.name == "send callq.call.echo")
            .cloned()
    })
    .await;
    assert_eq!(send.trace, call_id, "{send:#?}");
    assert_eq!(send.kind, SpanKind::Producer as i32);
    assert_eq!(send.attr("messaging.system"), Some("rabbitmq"));
    assert_eq!(
        send.attr("messaging.destination.name"),
        Some("callq.call.echo")
    );
    assert_eq!(send.attr("messaging.message.id"), reply["call_id"].as_str());

    // The re-issued attempt's `process`, a child of `send`.
    let process = wait_spans(&received, "attempt 2's process span", |spans| {
        spans
            .iter()
            .find(|s| s.name == "process callq.call.echo" && s.attr("callq.attempt") == Some("2"))
            .cloned()
    })
    .await;
    assert_eq!(process.service, "callq-worker");
    assert_eq!(process.kind, SpanKind::Consumer as i32);
    assert_eq!(
        (process.trace.as_str(), process.parent.as_str()),
        (send.trace.as_str(), send.id.as_str())
    );
    assert_eq!(
        process.attr("messaging.message.id"),
        reply["call_id"].as_str()
    );
    assert_eq!(process.attr("callq.outcome"), Some("ok"));

    // Its `resume`, and the coordinator's answer to it.
    let (asked, answered) = wait_spans(&received, "the resume spans", |spans| {
        let asked = spans
            .iter()
            .find(|s| s.name == "resume" && s.parent == process.id)?;
        let answered = spans
            .iter()
            .find(|s| s.name == "resume" && s.parent == asked.id)?;
        Some((asked.clone(), answered.clone()))
    })
    .await;
    assert_eq!(asked.service, "callq-worker");
    assert_eq!(asked.kind, SpanKind::Client as i32);
    assert_eq!(asked.attr("callq.decision"), Some("run"));
    assert_eq!(answered.service, "callq-coordinator");
    assert_eq!(answered.kind, SpanKind::Server as i32);
    assert_eq!(answered.trace, call_id);
    assert_eq!(
        answered.attr("callq.decision"),
        Some("run"),
        "{answered:#?}"
    );
    assert_eq!(answered.attr("callq.worker"), Some("w2"));

    // Every span of the call is in its one trace; the killed attempt
    // exported nothing it had not ended (its `process` span never did).
    let spans = received.lock().unwrap().clone();
    let mine: Vec<_> = spans
        .iter()
        .filter(|s| s.attr("messaging.message.id") == reply["call_id"].as_str())
        .collect();
    assert!(mine.iter().all(|s| s.trace == call_id), "{mine:#?}");
    assert!(
        !spans
            .iter()
            .any(|s| s.name.starts_with("process") && s.attr("callq.attempt") == Some("1")),
        "{spans:#?}"
    );
}
