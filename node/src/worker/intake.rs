//! Step 1, intake: deliveries come from three consumers per service, of
//! its call queue, of its high band (priority 5 and up, taken first) and
//! of its queue of calls past the delivery limit (whose clients are
//! answered there); each is read and registered as in flight, then taken
//! through the gate, the attempt and the finish to the one disposition
//! that settles it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use callq_broker::telemetry::{self, Attribute, FutureExt as _, Kind, TraceContext};
use callq_broker::{Delivery, Disposition, Error as BrokerError, QueueSpec};
use callq_schemas::protocol::Lease;
use callq_schemas::{Call, Reply, codes, decode_call, peek};
use futures::{Stream, StreamExt, stream};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::shared::{Flight, FlightGuard, Shared};
use super::{WorkerStats, attempt, finish, gate, retry};
use crate::probe::Point;
use crate::{Error, Service};

/// A delivery, and whether it came from a queue of calls past their
/// delivery limit.
pub(super) type Arriving = (Delivery, bool);

type Arrivals = stream::BoxStream<'static, Result<Arriving, BrokerError>>;

/// Calls past their limit a worker holds at once, per service: they are
/// rare, and each only needs an answer.
const PAST_LIMIT_PREFETCH: u16 = 4;

/// While both bands have calls ready, the high band's calls a worker takes
/// in a row before it takes one of the normal band: the high band comes
/// first, and a flood of it slows the normal band without stopping it.
pub(super) const HIGH_BAND_WEIGHT: u32 = 10;

/// The deliveries of every queue the worker consumes, merged in two tiers:
/// the high bands of all services, then their call queues and queues of
/// calls past the limit. A free slot takes from the high tier first, but
/// after [`HIGH_BAND_WEIGHT`] high calls in a row it looks at the normal
/// tier first once. Within a tier, the queues take turns.
pub(super) struct Incoming {
    high: stream::SelectAll<Arrivals>,
    normal: stream::SelectAll<Arrivals>,
    /// High calls taken since the last normal one.
    streak: u32,
    /// Whether each tier still has a stream. Each stream yields `Closed`
    /// before it ends, which is how the worker learns of it; a tier whose
    /// streams all ended is skipped from then on.
    high_open: bool,
    normal_open: bool,
}

impl Incoming {
    fn new(high: Vec<Arrivals>, normal: Vec<Arrivals>) -> Self {
        Self {
            high_open: !high.is_empty(),
            normal_open: !normal.is_empty(),
            high: stream::select_all(high),
            normal: stream::select_all(normal),
            streak: 0,
        }
    }

    fn poll_tier(
        tier: &mut stream::SelectAll<Arrivals>,
        open: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Arriving, BrokerError>>> {
        if !*open {
            return Poll::Ready(None);
        }
        match tier.poll_next_unpin(cx) {
            Poll::Ready(None) => {
                *open = false;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl Stream for Incoming {
    type Item = Result<Arriving, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let normal_first = this.streak >= HIGH_BAND_WEIGHT;
        for high in [!normal_first, normal_first] {
            let polled = if high {
                Self::poll_tier(&mut this.high, &mut this.high_open, cx)
            } else {
                Self::poll_tier(&mut this.normal, &mut this.normal_open, cx)
            };
            if let Poll::Ready(Some(item)) = polled {
                this.streak = if high {
                    this.streak.saturating_add(1)
                } else {
                    0
                };
                return Poll::Ready(Some(item));
            }
        }
        if this.high_open || this.normal_open {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }
}

/// Opens the consumers of every service: its call queue and its high band,
/// each prefetching the worker's capacity, and its queue of calls past the
/// limit.
pub(super) async fn open_consumers(shared: &Shared) -> Result<Incoming, Error> {
    let mut high = Vec::with_capacity(shared.services.len());
    let mut normal = Vec::with_capacity(2 * shared.services.len());
    for (name, (_, spec)) in &shared.services {
        let consumer = shared
            .broker
            .consume(&spec.name, shared.opts.capacity)
            .await?;
        if let (Some(a), Ok(mut assignments)) = (consumer.assignment(), shared.assignments.lock()) {
            assignments.insert(name.clone(), a);
        }
        normal.push(merged(consumer, false));
        let consumer = shared
            .broker
            .consume(&callq_broker::high_queue(name), shared.opts.capacity)
            .await?;
        high.push(merged(consumer, false));
        if let Some(lost) = &spec.limit_dead_letter {
            let prefetch = PAST_LIMIT_PREFETCH.min(shared.opts.capacity);
            let consumer = shared.broker.consume(lost, prefetch).await?;
            normal.push(merged(consumer, true));
        }
    }
    info!(worker = %shared.opts.worker_id, services = ?shared.service_names(), capacity = shared.opts.capacity, "worker serving");
    Ok(Incoming::new(high, normal))
}

/// A consumer as a stream of arrivals. One that ends yields one `Closed`
/// error, so the worker learns that a service lost its consumer instead of
/// going quiet.
fn merged(
    consumer: Box<dyn callq_broker::Consumer>,
    past_limit: bool,
) -> stream::BoxStream<'static, Result<Arriving, BrokerError>> {
    stream::unfold(Some(consumer), move |c| async move {
        let mut c = c?;
        match c.next().await {
            Some(item) => Some((item.map(|d| (d, past_limit)), Some(c))),
            None => Some((Err(BrokerError::Closed), None)),
        }
    })
    .boxed()
}

pub(super) async fn next_delivery(
    incoming: &mut Option<Incoming>,
) -> Option<Result<Arriving, BrokerError>> {
    match incoming {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Runs one delivery to its end: decides its fate, then settles it.
pub(super) async fn handle(shared: Arc<Shared>, (delivery, past_limit): Arriving) {
    shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    crate::metrics::in_flight(1.0);
    let fate = decide(&shared, &delivery, past_limit).await;
    if let Disposition::DeadLetter { reason } = &fate {
        WorkerStats::bump(&shared.stats.dead_lettered);
        crate::metrics::dead_lettered(reason);
    }
    // A probe hears of the ack: the call's id is peeked from the body,
    // which the settle consumes.
    let acked = (shared.probe.is_some() && fate == Disposition::Ack).then(|| {
        let copy = delivery.attempt().unwrap_or(0);
        (
            peek(
                &delivery.body,
                shared.opts.limits.max_bytes.saturating_mul(4),
            )
            .call_id,
            copy,
        )
    });
    match delivery.settle(fate).await {
        Err(e) => warn!(worker = %shared.opts.worker_id, "settling a delivery failed: {e}"),
        Ok(()) => {
            if let Some((Some(call_id), copy)) = acked {
                attempt::pass(&shared, Point::AfterAck, call_id, copy).await;
            }
        }
    }
    shared.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    crate::metrics::in_flight(-1.0);
}

/// The one place where a delivery's fate is decided. The reply, if any, is
/// confirmed by the broker before this returns `Ack`.
async fn decide(shared: &Shared, delivery: &Delivery, past_limit: bool) -> Disposition {
    let (call, copy, service, spec) = match read(shared, delivery).await {
        Ok(read) => read,
        Err(fate) => return fate,
    };
    let lease = Lease {
        call_id: call.call_id,
        copy,
        token: Uuid::now_v7(),
    };
    debug!(
        worker = %shared.opts.worker_id,
        call_id = %call.call_id,
        service = %call.service,
        method = %call.method,
        copy,
        redelivered = delivery.redelivered,
        "call received"
    );
    let span = process_span(shared, &call, copy, delivery.redelivered);
    let attempt = run(shared, delivery, past_limit, call, lease, service, spec);
    let fate = match &span {
        Some(cx) => attempt.with_context(cx.clone()).await,
        None => attempt.await,
    };
    let error = match &fate {
        Disposition::DeadLetter { reason } => Some(format!("dead-lettered: {reason}")),
        _ => None,
    };
    telemetry::end(span, error);
    fate
}

/// The attempt's `process` span: a child of the span the envelope's
/// `traceparent` names (the client's `send`), so that every attempt of a
/// call, re-issued ones too, joins the call's trace. `None` when spans are
/// off.
fn process_span(
    shared: &Shared,
    call: &Call,
    copy: u32,
    redelivered: bool,
) -> Option<TraceContext> {
    if !telemetry::enabled() {
        return None;
    }
    let parent = telemetry::remote(call.traceparent.as_deref());
    let queue = callq_broker::call_queue_for(&call.service, call.priority);
    let name = ["process ", &queue].concat();
    let mut id = [0; uuid::fmt::Hyphenated::LENGTH];
    // Few attributes, most of them static: every call pays for them, in
    // the span and in its export. Room for the two the attempt adds
    // (`callq.attempt`, `callq.outcome`).
    let mut attributes = Vec::with_capacity(9);
    attributes.extend([
        Attribute::new("messaging.system", telemetry::system(shared.broker.kind())),
        Attribute::new("messaging.operation.type", "process"),
        Attribute::new("messaging.destination.name", queue),
        Attribute::new(
            "messaging.message.id",
            call.call_id.hyphenated().encode_lower(&mut id).to_owned(),
        ),
        Attribute::new("callq.method", call.method.clone()),
        Attribute::new("callq.copy", i64::from(copy)),
    ]);
    if redelivered {
        attributes.push(Attribute::new("callq.redelivered", true));
    }
    telemetry::start(name, Kind::Consumer, &parent, attributes)
}

/// Passes the gate, runs the attempt and finishes it.
async fn run(
    shared: &Shared,
    delivery: &Delivery,
    past_limit: bool,
    mut call: Call,
    lease: Lease,
    service: &Service,
    spec: &QueueSpec,
) -> Disposition {
    let flight = register(shared, &call, lease, delivery);
    let passed = match gate::pass(shared, delivery, past_limit, &call, spec, lease).await {
        gate::Gate::Run(passed) => passed,
        gate::Gate::Answer(passed, reply, then) => {
            let answer = (reply, then);
            return finish::finish(shared, &call, lease, passed, &[], answer, flight).await;
        }
        gate::Gate::Settle(fate) => return fate,
    };
    telemetry::set_current(|| Attribute::new("callq.attempt", i64::from(passed.attempt)));
    // The body goes along (a shared buffer) for the digest a trace carries.
    let body = delivery.body.clone();
    match attempt::run(shared, service, &mut call, lease, passed, body).await {
        attempt::Ran::Answer {
            reply,
            traces,
            retry,
        } => {
            let wish = (retry, &delivery.body[..]);
            let step = (lease, passed);
            if let Some(fate) = retry::hand_over(shared, &call, step, &reply, &traces, wish).await {
                return fate;
            }
            let answer = (reply, Disposition::Ack);
            finish::finish(shared, &call, lease, passed, &traces, answer, flight).await
        }
        attempt::Ran::Settle(fate) => fate,
    }
}

/// Reads the body, its copy number and its service. A body or attempt
/// header that cannot be read is answered `bad_request` where the body
/// names a legal `reply_to`, and dead-lettered; so is a call of a service
/// this worker does not serve (`unknown_service`).
async fn read<'s>(
    shared: &'s Shared,
    delivery: &Delivery,
) -> Result<(Call, u32, &'s Service, &'s QueueSpec), Disposition> {
    let stats = &shared.stats;
    let limits = &shared.opts.limits;
    let read = delivery
        .attempt()
        .map_err(|e| ("attempt_header", e))
        .and_then(|copy| {
            decode_call(&delivery.body, limits)
                .map(|call| (call, copy))
                .map_err(|e| (e.kind(), e.to_string()))
        });
    let (call, copy) = match read {
        Ok(read) => read,
        Err((kind, e)) => {
            WorkerStats::bump(&stats.bad_request);
            let p = peek(&delivery.body, limits.max_bytes.saturating_mul(4));
            warn!(worker = %shared.opts.worker_id, queue = %delivery.queue, kind, call_id = ?p.call_id, "bad request: {e}");
            let answerable = p
                .reply_to
                .filter(|to| owned(shared, delivery, Some(to)).is_ok());
            if let Some(reply_to) = answerable {
                let reply = Reply::bad_request(p.call_id, e.clone());
                // The call is dead-lettered whether or not the reply goes out.
                let _ = finish::send_reply(shared, &reply_to, &reply).await;
            }
            return Err(Disposition::DeadLetter {
                reason: format!("{}: {e}", codes::BAD_REQUEST),
            });
        }
    };
    if let Err(why) = owned(shared, delivery, call.reply_to.as_deref()) {
        WorkerStats::bump(&stats.bad_request);
        warn!(worker = %shared.opts.worker_id, queue = %delivery.queue, call_id = %call.call_id, "refused: {why}");
        return Err(Disposition::DeadLetter {
            reason: format!("{REPLY_NOT_OWNED}: {why}"),
        });
    }
    let Some((service, spec)) = shared.services.get(&call.service) else {
        WorkerStats::bump(&stats.error);
        let msg = format!(
            "this worker serves no service `{}` (the call came from queue `{}`)",
            call.service, delivery.queue
        );
        let reply = Reply::error(call.call_id, copy, codes::UNKNOWN_SERVICE, msg.clone());
        return Err(
            match finish::publish_reply(shared, call.reply_to.as_deref(), &reply).await {
                Disposition::Ack => Disposition::DeadLetter { reason: msg },
                other => other,
            },
        );
    };
    Ok((call, copy, service, spec))
}

/// The dead-letter reason of a call whose `reply_to` its publisher does not
/// own.
const REPLY_NOT_OWNED: &str = "reply_not_owned";

/// With [`super::WorkerOptions::reply_owners`], whether the call may be
/// answered into `reply_to`: says why not.
fn owned(shared: &Shared, delivery: &Delivery, reply_to: Option<&str>) -> Result<(), String> {
    let opts = &shared.opts;
    let Some(reply_to) = reply_to.filter(|_| opts.reply_owners) else {
        return Ok(());
    };
    let Some(publisher) = delivery.publisher.as_deref() else {
        return Err(format!(
            "the broker vouched for no publisher (no user_id), so reply_to `{reply_to}` cannot \
             be checked: publish calls with the user_id property set to your broker user"
        ));
    };
    if opts.trusted_publishers.iter().any(|t| t == publisher)
        || callq_broker::reply_queue_of(publisher, reply_to)
    {
        return Ok(());
    }
    Err(format!(
        "reply_to `{reply_to}` is not a reply queue of the publisher `{publisher}` \
         (callq.reply.{publisher} or callq.reply.{publisher}.*)"
    ))
}

/// Registers the call as in flight, for the heartbeats to report (a
/// coordinated worker's); the guard removes it however the call ends.
fn register<'s>(
    shared: &'s Shared,
    call: &Call,
    lease: Lease,
    delivery: &Delivery,
) -> Option<FlightGuard<'s>> {
    shared.link.as_ref()?;
    if let Ok(mut f) = shared.flights.lock() {
        f.insert(
            lease.token,
            Flight {
                lease,
                service: call.service.clone(),
                reply_to: call.reply_to.clone(),
                body: Some(delivery.body.clone()),
                reported: false,
                cancel: tokio_util::sync::CancellationToken::new(),
                key: None,
            },
        );
    }
    Some(FlightGuard {
        shared,
        token: lease.token,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Nop;

    #[async_trait::async_trait]
    impl callq_broker::Settle for Nop {
        async fn settle(self: Box<Self>, _: Disposition) -> Result<(), BrokerError> {
            Ok(())
        }
    }

    fn arrivals(queue: &str, n: usize) -> Arrivals {
        let queue = queue.to_owned();
        stream::iter((0..n).map(move |_| {
            let d = Delivery::new(
                Vec::new().into(),
                callq_broker::Headers::new(),
                false,
                0,
                queue.clone(),
                Box::new(Nop),
            );
            Ok((d, false))
        }))
        .chain(stream::pending())
        .boxed()
    }

    /// While both tiers hold calls, ten high ones come before each normal
    /// one; once the high tier is empty the normal one is served at once.
    #[tokio::test]
    async fn the_high_tier_comes_first_ten_to_one() {
        let mut incoming = Incoming::new(
            vec![arrivals("callq.high.a", 15), arrivals("callq.high.b", 10)],
            vec![arrivals("callq.call.a", 5)],
        );
        let mut order = String::new();
        for _ in 0..30 {
            let (d, _) = incoming.next().await.unwrap().unwrap();
            order.push(if d.queue.starts_with("callq.high.") {
                'h'
            } else {
                'n'
            });
        }
        let high = "h".repeat(10);
        assert_eq!(order, format!("{high}n{high}n{}nnn", "h".repeat(5)));
        // Nothing more is ready: the stream waits rather than ends.
        let next = tokio::time::timeout(std::time::Duration::from_millis(20), incoming.next());
        assert!(next.await.is_err());
    }
}
