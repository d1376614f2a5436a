//! Crashes on purpose, for fault-injection tests: a [`Faults`] plan given to
//! a [`Worker`](crate::Worker) is asked at each crash point of each call
//! whether the worker dies there. If it says yes, the worker stops on the
//! spot, as if its process were killed: every call it runs stops at its
//! next await point, its heartbeats stop, nothing more is sent (no reply,
//! no completion, no ack) and the broker returns its deliveries. The
//! worker's `run` returns [`Error::Crashed`](crate::Error::Crashed).

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Where in a call a worker can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashPoint {
    /// The handler asks for a trace; the request is not sent.
    BeforeTrace,
    /// The coordinator granted the trace; the handler's effect never happens.
    AfterTrace,
    /// The handler returned; its outcome is not sent.
    BeforeReply,
}

impl CrashPoint {
    /// The name used in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            CrashPoint::BeforeTrace => "before_trace",
            CrashPoint::AfterTrace => "after_trace",
            CrashPoint::BeforeReply => "before_reply",
        }
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call at a crash point.
#[derive(Debug, Clone, Copy)]
pub struct CrashSite<'a> {
    /// The point.
    pub point: CrashPoint,
    /// The call.
    pub call_id: Uuid,
    /// Its attempt.
    pub attempt: u32,
    /// The trace asked for or just granted (`BeforeTrace`, `AfterTrace`).
    pub trace: Option<&'a str>,
    /// Traces granted to this attempt so far (the one just granted included).
    pub granted: &'a [String],
}

/// Decides where a worker crashes.
pub trait Faults: Send + Sync {
    /// Whether the worker dies at `site`. Called once per call and point
    /// reached (`BeforeTrace` and `AfterTrace` once per trace asked).
    fn crash(&self, site: &CrashSite<'_>) -> bool;
}

/// A worker's plan and the switch that kills it.
#[derive(Clone)]
pub(crate) struct Crash {
    plan: Arc<dyn Faults>,
    pub(crate) switch: CancellationToken,
}

impl fmt::Debug for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crash")
            .field("crashed", &self.switch.is_cancelled())
            .finish()
    }
}

impl Crash {
    pub(crate) fn new(plan: Arc<dyn Faults>) -> Self {
        Self {
            plan,
            switch: CancellationToken::new(),
        }
    }

    /// Asks the plan; if the worker dies here, flips the switch and never
    /// returns (the worker's task drops this future with everything else).
    pub(crate) async fn at(&self, site: CrashSite<'_>) {
        if self.switch.is_cancelled() || self.plan.crash(&site) {
            self.switch.cancel();
            std::future::pending::<()>().await;
        }
    }
}
