//! Crashes on purpose, for fault-injection tests: a [`Faults`] plan decides
//! at each point of each call ([`CrashPoint`]) whether the worker dies
//! there. A worker that dies stops on the spot, as if its process were
//! killed: every call it runs stops at its next await point, its heartbeats
//! stop, nothing more is sent (no reply, no completion, no ack) and the
//! broker returns its deliveries.
//!
//! The worker runtime knows nothing of crashes: the plan reaches it as a
//! [`Probe`] ([`Crash`]), which never lets a call past the point where the
//! worker dies, and [`run_until_crash`] drops the worker's future there.

use std::fmt;
use std::sync::Arc;

use callq_node::Worker;
use callq_node::probe::{Passage, Probe};
pub use callq_node::probe::{Point as CrashPoint, Site as CrashSite};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Decides where a worker crashes.
pub trait Faults: Send + Sync {
    /// Whether the worker dies at `site`. Asked once per call and point
    /// reached (`BeforeTrace` and `AfterTrace` once per trace asked).
    fn crash(&self, site: &CrashSite<'_>) -> bool;
}

/// A worker's plan as the probe it runs with, and the switch that kills it.
#[derive(Clone)]
pub struct Crash {
    plan: Arc<dyn Faults>,
    switch: CancellationToken,
}

impl fmt::Debug for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crash")
            .field("crashed", &self.switch.is_cancelled())
            .finish()
    }
}

impl Crash {
    /// The probe for `plan`.
    pub fn new(plan: Arc<dyn Faults>) -> Self {
        Self {
            plan,
            switch: CancellationToken::new(),
        }
    }

    /// Whether the worker has died.
    pub fn crashed(&self) -> bool {
        self.switch.is_cancelled()
    }
}

impl Probe for Crash {
    fn at<'a>(&'a self, site: CrashSite<'a>) -> Passage<'a> {
        Box::pin(async move {
            if self.switch.is_cancelled() || self.plan.crash(&site) {
                self.switch.cancel();
                // Never returns: the worker's future is dropped with this
                // call in it.
                std::future::pending::<()>().await;
            }
        })
    }
}

/// How a worker run with a plan ended.
#[derive(Debug)]
pub enum Ended {
    /// It ran until shutdown (or failed on its own).
    Ran(Result<(), callq_node::Error>),
    /// Its plan killed it.
    Crashed,
}

/// Runs `worker` with `plan` until shutdown or until the plan kills it.
pub async fn run_until_crash(
    worker: Worker,
    plan: Arc<dyn Faults>,
    shutdown: CancellationToken,
) -> Ended {
    let crash = Crash::new(plan);
    let switch = crash.switch.clone();
    let id = worker.id().to_owned();
    let worker = worker.probe(Arc::new(crash));
    tokio::select! {
        biased;
        () = switch.cancelled() => {
            warn!(worker = %id, "worker crashed by its fault plan");
            Ended::Crashed
        }
        ended = worker.run(shutdown) => Ended::Ran(ended),
    }
}
