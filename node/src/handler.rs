//! Handlers, their context and their errors.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::probe::{Point, Probed, Site};

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;

type HandlerFn = Arc<dyn Fn(Ctx, Value) -> HandlerFuture + Send + Sync>;

/// A handler's own error: it becomes an `error` reply with this code and
/// message. A deterministic one (the default) is not retried; a
/// [`HandlerError::retryable`] one is, where the call's `retry` policy
/// allows, as a new attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// A stable, machine-readable code, such as `insufficient_funds`.
    pub code: String,
    /// What happened, for a person.
    pub message: String,
    /// `Some` for an error worth another attempt: when, if the handler
    /// knows (like HTTP `Retry-After`); otherwise the policy's backoff.
    pub retry: Option<Retry>,
}

/// A retryable error's wish for its next attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retry {
    /// Run the next attempt this long from now (not earlier, not later),
    /// instead of after the policy's backoff.
    pub after: Option<std::time::Duration>,
}

impl HandlerError {
    /// A handler error with a code and a message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retry: None,
        }
    }

    /// A transient error (a dependency down, a rate limit): the call's
    /// `retry` policy may run it again, as a new attempt; without a policy,
    /// or past its attempts, it is the outcome like any error.
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            retry: Some(Retry::default()),
            ..Self::new(code, message)
        }
    }

    /// A retryable error whose next attempt runs `after` from now (such as
    /// a service's `Retry-After`).
    #[must_use]
    pub fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry = Some(Retry { after: Some(after) });
        self
    }

    /// The arguments do not fit the method (`invalid_args`).
    pub fn invalid_args(message: impl Into<String>) -> Self {
        Self::new("invalid_args", message)
    }
}

/// What a handler knows about the call it runs.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub(crate) call_id: Uuid,
    pub(crate) attempt: u32,
    pub(crate) service: Arc<str>,
    pub(crate) method: String,
    pub(crate) session_id: Option<String>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) deadline: Option<OffsetDateTime>,
    pub(crate) traceparent: Option<String>,
    /// The attempt's standing with the coordinator; `None` in tests.
    pub(crate) standing: Option<Arc<crate::link::Attempt>>,
    /// The worker's probe, if it has one.
    pub(crate) probe: Option<Probed>,
    /// The call's session, when it names one and a coordinator keeps it.
    pub(crate) session: Option<Arc<crate::session::CallSession>>,
}

impl Ctx {
    /// The call's id.
    pub fn call_id(&self) -> Uuid {
        self.call_id
    }
    /// The attempt number (the fencing epoch of this execution).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The service.
    pub fn service(&self) -> &str {
        &self.service
    }
    /// The method.
    pub fn method(&self) -> &str {
        &self.method
    }
    /// The client's session, if the call names one.
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }
    /// The publisher's idempotency key, if any.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
    /// The call's deadline, if any.
    pub fn deadline(&self) -> Option<OffsetDateTime> {
        self.deadline
    }
    /// The publisher's W3C trace context, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// Whether the caller cancelled the call (`callq cancel`,
    /// [`crate::Admin::cancel`]) while this attempt runs. The worker then
    /// drops whatever the handler returns and answers `cancelled`, and the
    /// coordinator refuses the attempt's next trace; a handler that checks
    /// this (or awaits [`Ctx::cancelled`]) stops early.
    pub fn is_cancelled(&self) -> bool {
        self.standing
            .as_ref()
            .is_some_and(|s| s.cancel.is_cancelled())
    }

    /// Resolves once the caller cancels the call; never in a context made
    /// by [`Ctx::for_test`] or on a worker without a coordinator. Select on
    /// it beside long waits:
    /// `tokio::select! { () = ctx.cancelled() => ..., r = work => ... }`.
    pub async fn cancelled(&self) {
        match &self.standing {
            Some(s) => s.cancel.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Asks the coordinator for a grant to leave a trace of `kind` (such as
    /// `mail.sent`), durably, before the effect becomes visible. Call it
    /// right before the effect and propagate its error with `?`:
    ///
    /// - granted: the effect may happen; if this worker is lost from now on,
    ///   the call ends `fatal` with this trace listed rather than run again;
    /// - refused (`trace_refused`): this attempt was revoked (another worker
    ///   runs the call, or it is decided): leave nothing and return. The
    ///   worker drops whatever the handler returns after a refusal.
    ///
    /// In a context made by [`Ctx::for_test`] every trace is granted.
    pub async fn trace(&self, kind: &str) -> Result<(), HandlerError> {
        let Some(standing) = &self.standing else {
            return Ok(());
        };
        self.pass(Point::BeforeTrace, Some(kind)).await;
        standing.trace(kind).await?;
        self.pass(Point::AfterTrace, Some(kind)).await;
        Ok(())
    }

    /// Tells the worker's probe (if any) that the call is at `point`.
    pub(crate) async fn pass(&self, point: Point, trace: Option<&str>) {
        if let (Some(probe), Some(standing)) = (&self.probe, &self.standing) {
            let granted = standing.traces();
            let site = Site {
                point,
                call_id: self.call_id,
                attempt: self.attempt,
                trace,
                granted: &granted,
            };
            Probed::pass(Some(probe), site).await;
        }
    }

    /// A context for calling a handler directly, in tests.
    pub fn for_test(service: &str, method: &str) -> Self {
        Self {
            call_id: Uuid::now_v7(),
            attempt: 1,
            service: service.into(),
            method: method.into(),
            session_id: None,
            idempotency_key: None,
            deadline: None,
            traceparent: None,
            standing: None,
            probe: None,
            session: None,
        }
    }
}

/// A named set of handlers, one per method. Each service has its own call
/// queue, `callq.call.<name>`.
#[derive(Clone)]
pub struct Service {
    name: Arc<str>,
    methods: HashMap<String, HandlerFn>,
}

impl Service {
    /// A service with no methods yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            methods: HashMap::new(),
        }
    }

    /// Registers a handler for a method.
    #[must_use]
    pub fn method<F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Ctx, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        let f: HandlerFn = Arc::new(move |ctx, args| Box::pin(handler(ctx, args)));
        self.methods.insert(name.to_owned(), f);
        self
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The names of its methods, sorted.
    pub fn methods(&self) -> Vec<&str> {
        let mut m: Vec<&str> = self.methods.keys().map(String::as_str).collect();
        m.sort_unstable();
        m
    }

    pub(crate) fn name_arc(&self) -> Arc<str> {
        self.name.clone()
    }

    /// Starts the handler of `method`, if the service has one.
    pub fn invoke(&self, method: &str, ctx: Ctx, args: Value) -> Option<HandlerFuture> {
        self.methods.get(method).map(|h| h(ctx, args))
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("methods", &self.methods())
            .finish()
    }
}
