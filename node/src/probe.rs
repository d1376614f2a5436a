//! Points on a call's path that a watcher supplied from outside can see.
//!
//! A [`Probe`] given to a [`Worker`](crate::Worker) is told, at each
//! [`Point`] of each call, where the call stands, and the call waits for the
//! probe's answer before it goes on. Production workers have none. The test
//! harness (`callq-testkit`) supplies one that kills the worker at a chosen
//! point, by never answering and stopping the worker's task; the same seam
//! can count or time what happens.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use uuid::Uuid;

/// A point on a call's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Point {
    /// The gate passed the attempt; its handler has not started (once per
    /// attempt, before its first run).
    BeforeHandler,
    /// The handler asks for a trace; the request is not sent yet.
    BeforeTrace,
    /// The coordinator granted the trace; the handler's effect has not
    /// happened yet.
    AfterTrace,
    /// The handler returned; its outcome is not sent yet.
    BeforeReply,
    /// The call was answered and its delivery acked (`attempt` is then the
    /// delivery's copy number: the ack does not know the attempt).
    AfterAck,
}

impl Point {
    /// The name used in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Point::BeforeHandler => "before_handler",
            Point::BeforeTrace => "before_trace",
            Point::AfterTrace => "after_trace",
            Point::BeforeReply => "before_reply",
            Point::AfterAck => "after_ack",
        }
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call at a point.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    /// The point.
    pub point: Point,
    /// The call.
    pub call_id: Uuid,
    /// Its attempt.
    pub attempt: u32,
    /// The trace asked for or just granted (`BeforeTrace`, `AfterTrace`).
    pub trace: Option<&'a str>,
    /// Traces granted to this attempt so far (the one just granted included).
    pub granted: &'a [String],
}

/// The future a probe answers with; the call goes on when it completes.
pub type Passage<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Watches calls at their points. Called once per call and point reached
/// (`BeforeTrace` and `AfterTrace` once per trace asked).
pub trait Probe: Send + Sync {
    /// The call is at `site`; it waits for the returned future.
    fn at<'a>(&'a self, site: Site<'a>) -> Passage<'a>;
}

/// A worker's probe, shared by its calls.
#[derive(Clone)]
pub(crate) struct Probed(pub(crate) std::sync::Arc<dyn Probe>);

impl fmt::Debug for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Probed")
    }
}

impl Probed {
    /// Tells the probe, if any, that a call is at `site`, and waits for it.
    pub(crate) async fn pass(probe: Option<&Probed>, site: Site<'_>) {
        if let Some(p) = probe {
            p.0.at(site).await;
        }
    }
}
