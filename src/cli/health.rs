//! `GET /healthz`, `GET /readyz` and `GET /metrics` of the long-running
//! processes (`coordinator`, `worker`, `agent`) on the address the setting
//! `http` names (`CALLQ_HTTP`; off unless set), for probes, load balancers
//! and Prometheus.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200
//! with what the process does (`active`, `standby`, `leading`, `standing
//! by`, `serving`) once it is connected and doing it, and 503 with the
//! reason otherwise (starting, the broker or the store unreachable,
//! draining). Every answer is a short text; nothing a request sends is read
//! beyond its request line and headers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use callq_node::WorkerStats;
use callq_schemas::protocol::WorkerState;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a process reports to its probes.
#[derive(Debug, Default)]
pub(crate) struct Health {
    state: Mutex<Readiness>,
    /// Set by a coordinator while it serves on a live broker connection:
    /// a leader that lost the broker is not ready until it has it again.
    serving: Arc<AtomicBool>,
    /// A worker's counters, whose state (active, standby, draining)
    /// answers for a worker that is ready.
    worker: Mutex<Option<Arc<WorkerStats>>>,
}

#[derive(Debug, Clone)]
enum Readiness {
    /// Doing this; for a leading coordinator, only while `serving` holds.
    Ready(&'static str),
    /// Not ready, for this reason.
    Unready(String),
}

impl Default for Readiness {
    fn default() -> Self {
        Self::Unready("starting".into())
    }
}

impl Health {
    pub(crate) fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The process does `what`, and is ready. A coordinator's `leading`
    /// and `standing by` set the gauge `callq_coordinator_leader`.
    pub(crate) fn ready(&self, what: &'static str) {
        match what {
            "leading" => leader(true),
            "standing by" => leader(false),
            _ => {}
        }
        *self.lock() = Readiness::Ready(what);
    }

    /// The process is not ready, for `why`; a coordinator that was leading
    /// no longer counts as the leader.
    pub(crate) fn unready(&self, why: impl Into<String>) {
        let mut state = self.lock();
        if matches!(*state, Readiness::Ready("leading")) {
            leader(false);
        }
        *state = Readiness::Unready(why.into());
    }

    /// Answers with the state of this worker (promoted, draining on the
    /// coordinator's order) while the process is ready.
    pub(crate) fn follow(&self, stats: Arc<WorkerStats>) {
        *self.worker.lock().unwrap_or_else(PoisonError::into_inner) = Some(stats);
    }

    /// The flag a coordinator sets while it serves on a live connection.
    pub(crate) fn serving(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.serving)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Readiness> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn answer(&self) -> (StatusCode, String) {
        match self.lock().clone() {
            Readiness::Ready("leading") if !self.serving.load(Ordering::Acquire) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "leading, but without the broker: connecting again\n".into(),
            ),
            Readiness::Ready(what) => {
                let worker = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
                match worker.as_ref().and_then(|w| w.state()) {
                    Some(WorkerState::Active) => (StatusCode::OK, "active\n".into()),
                    Some(WorkerState::Standby) => (StatusCode::OK, "standby\n".into()),
                    Some(other) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{}\n", format!("{other:?}").to_lowercase()),
                    ),
                    None => (StatusCode::OK, format!("{what}\n")),
                }
            }
            Readiness::Unready(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        }
    }
}

/// Makes `health` unready ("stopping") once `shutdown` is cancelled: a
/// process that drains or stops takes no part in a rollout's count.
pub(crate) fn unready_on(shutdown: &CancellationToken, health: &Arc<Health>) {
    let (shutdown, health) = (shutdown.clone(), Arc::clone(health));
    tokio::spawn(async move {
        shutdown.cancelled().await;
        health.unready("stopping");
    });
}

/// How long answering a probe may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the probes on `addr` until `shutdown`; `None` when no address is
/// set. Fails at once when the address cannot be bound.
pub(crate) async fn serve(
    addr: Option<&str>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(addr) = addr.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("serving /healthz, /readyz and /metrics on `{addr}` (setting http, CALLQ_HTTP)")
    })?;
    info!(at = %listener.local_addr().map_or_else(|_| addr.to_owned(), |a| a.to_string()), "serving /healthz, /readyz and /metrics");
    let metrics = install_metrics();
    let app = Router::new()
        .route("/healthz", get(|| async { "alive\n" }))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { render_metrics(metrics.as_ref()) }
            }),
        )
        .route(
            "/readyz",
            get(|State(health): State<Arc<Health>>| async move { health.answer() }),
        )
        .layer(axum::middleware::from_fn(bounded))
        .with_state(health);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            warn!("the health endpoint stopped: {e}");
        }
    });
    Ok(())
}

/// 1 while this coordinator leads, 0 while it stands by or lost what it
/// leads with.
pub(crate) const LEADER: &str = "callq_coordinator_leader";

fn leader(leads: bool) {
    metrics::gauge!(LEADER).set(if leads { 1.0 } else { 0.0 });
}

/// Times the process lost (or could not reach) the broker and connects again.
pub(crate) const RECONNECTS: &str = "callq_broker_reconnects_total";

/// Describes the reconnect counter and starts it at 0.
pub(crate) fn describe_reconnects() {
    metrics::describe_counter!(
        RECONNECTS,
        "Times the process lost (or could not reach) the broker and connects again."
    );
    metrics::counter!(RECONNECTS).absolute(0);
}

/// Counts a reconnect.
pub(crate) fn reconnecting() {
    metrics::counter!(RECONNECTS).increment(1);
}

/// The process's metrics recorder (the `metrics` facade's, installed once),
/// or `None` if another recorder was installed first.
fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &BUCKETS)
                .map_err(|e| warn!("metrics: {e}"))
                .ok()?;
            builder
                .install_recorder()
                .map_err(|e| warn!("metrics: no recorder: {e}"))
                .ok()
        })
        .clone()
}

/// Histogram buckets of durations, in seconds: 1 ms to 60 s.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
];

/// `/metrics`: Prometheus's text format.
fn render_metrics(handle: Option<&PrometheusHandle>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match handle {
        Some(h) => {
            h.run_upkeep();
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                h.render(),
            )
                .into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "no metrics recorder\n").into_response(),
    }
}

/// Bounds every request's handling: a probe is answered within
/// [`REQUEST_TIMEOUT`] or cut off.
async fn bounded(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => axum::response::IntoResponse::into_response((
            StatusCode::REQUEST_TIMEOUT,
            "timed out\n",
        )),
    }
}
