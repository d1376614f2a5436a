//! Traces out of the process: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the
//! spans of calls (`send`, `process`, `resume`, `trace`, `complete`) are
//! exported with OTLP over HTTP (protobuf) in batches, by the standard
//! `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_BSP_SCHEDULE_DELAY`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! ...). Unset, no span is made at all.

use anyhow::Context as _;
use callq_broker::telemetry::{self, SpanId, TraceId};
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};

/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The installed exporter; flushed and shut down by [`Traces::finish`].
pub(crate) struct Traces(Option<SdkTracerProvider>);

/// Installs the OTLP exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
/// traces' own endpoint variable) is set, naming the process
/// `OTEL_SERVICE_NAME` or else `service`. Must run inside the runtime.
pub(crate) fn install(service: &str) -> anyhow::Result<Traces> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()));
    if !configured {
        return Ok(Traces(None));
    }
    let client = OnRuntime {
        inner: HyperClient::with_default_connector(EXPORT_TIMEOUT, None),
        runtime: tokio::runtime::Handle::current(),
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .context("OTEL_EXPORTER_OTLP_ENDPOINT: setting up the OTLP trace exporter")?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(CallIds::default())
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    telemetry::enable();
    Ok(Traces(Some(provider)))
}

impl Traces {
    /// Exports what is left and stops the exporter (off the runtime's
    /// threads: the export itself runs on them).
    pub(crate) async fn finish(self) {
        let Some(provider) = self.0 else {
            return;
        };
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!("exporting the last spans: {e}");
        }
    }
}

/// The HTTP client of the exporter, whose batches are sent from a thread
/// of its own: each request runs on the process's tokio runtime, which
/// hyper needs.
#[derive(Debug, Clone)]
struct OnRuntime {
    inner: HyperClient,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as HttpError)?
    }
}

/// Random ids, except for a span whose ids were chosen (a call's `send`
/// span takes its call id's).
#[derive(Debug, Default)]
struct CallIds(RandomIdGenerator);

impl IdGenerator for CallIds {
    fn new_trace_id(&self) -> TraceId {
        telemetry::chosen_trace_id().unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        telemetry::chosen_span_id().unwrap_or_else(|| self.0.new_span_id())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chosen_ids_win_over_random_ones() {
        let ids = CallIds::default();
        assert_ne!(ids.new_span_id(), ids.new_span_id());
        let (trace, span) = telemetry::call_ids(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(format!("{trace:032x}"), "0123456789abcdef0011223344556677");
        assert_ne!(span, SpanId::INVALID);
    }
}
