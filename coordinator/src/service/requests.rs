//! Requests: one function per kind of request a worker, node agent or
//! operator sends, applied to the ledger and the registry. Nothing they
//! decide is announced before the batch's group commit.

use callq_broker::telemetry::{self, Attribute, Kind, TraceContext};
use callq_schemas::protocol::{
    Answer, AnswerBody, ClusterStatus, CompleteDecision, Completion, Lease, Request, RequestBody,
    ResumeDecision, SessionState, SessionWrite, TraceDecision, WorkerState,
};
use callq_schemas::{Reply, Uuid};
use tracing::{info, warn};

use super::registry::Beat;
use super::{Coordinator, Outbox};
use crate::{Error, Store};

/// The largest capacity a worker has (`WorkerOptions::capacity` is a
/// `u16`), and the most services one worker serves.
const MAX_CAPACITY: u32 = u16::MAX as u32;
const MAX_SERVICES: usize = callq_schemas::protocol::MAX_SERVICES_PER_WORKER;

/// The coordinator's span of a `resume`, `trace` or `complete` that
/// carries the asking span's `traceparent`: a child of it, in the call's
/// trace. `None` when spans are off or the request carries none.
fn request_span(req: &Request) -> Option<TraceContext> {
    if !telemetry::enabled() {
        return None;
    }
    let (lease, attempt) = match &req.body {
        RequestBody::Resume { lease, .. } | RequestBody::Claim { lease, .. } => (lease, None),
        RequestBody::Trace { lease, attempt, .. }
        | RequestBody::Complete { lease, attempt, .. } => (lease, Some(*attempt)),
        _ => return None,
    };
    let parent = telemetry::remote(Some(req.traceparent.as_deref()?));
    let mut attributes = vec![
        Attribute::new("messaging.message.id", lease.call_id.to_string()),
        Attribute::new("callq.worker", req.worker_id.clone()),
        Attribute::new("callq.copy", i64::from(lease.copy)),
    ];
    if let Some(attempt) = attempt {
        attributes.push(Attribute::new("callq.attempt", i64::from(attempt)));
    }
    telemetry::start(
        req.body.kind().to_owned(),
        Kind::Server,
        &parent,
        attributes,
    )
}

/// Whether a heartbeat claims what a worker can hold: no more calls in
/// flight than its capacity, which a worker's settings bound; a heartbeat
/// past it (a bug, or a forgery) would make the ledger hold records that
/// never close.
fn heartbeat_in_bounds(
    services: &[String],
    capacity: u32,
    free: u32,
    in_flight: usize,
) -> Result<(), String> {
    if capacity > MAX_CAPACITY {
        return Err(format!("capacity {capacity} is above {MAX_CAPACITY}"));
    }
    if free > capacity || in_flight > capacity as usize {
        return Err(format!(
            "{in_flight} calls in flight and {free} free slots do not fit a capacity of {capacity}"
        ));
    }
    if services.len() > MAX_SERVICES {
        return Err(format!(
            "{} services, more than {MAX_SERVICES}",
            services.len()
        ));
    }
    Ok(())
}

impl<S: Store> Coordinator<S> {
    /// Applies one request; queues its answer, and any order it calls for,
    /// in `out`. Requests about the cluster's members are taken here, those
    /// about calls and sessions by [`Self::apply_call`].
    pub(super) fn apply(&mut self, req: Request, out: &mut Outbox) -> Result<(), Error> {
        let span = request_span(&req);
        let Request {
            worker_id: worker,
            reply_to: to,
            body,
            ..
        } = req;
        if matches!(body, RequestBody::Heartbeat { .. }) {
            crate::metrics::count(crate::metrics::HEARTBEATS);
        }
        let answer = match body {
            beat @ RequestBody::Heartbeat { .. } => self.heartbeat_request(worker, &to, beat, out),
            RequestBody::AgentHeartbeat { services, workers } => {
                if self.detector.heard(self.opts.silence()) {
                    self.registry.heard_all_now();
                }
                self.registry
                    .agent_beat(worker, to.clone(), services, workers);
                None
            }
            RequestBody::Leave {} => {
                self.leave(&worker);
                None
            }
            RequestBody::Drain {
                req_id,
                worker: target,
            } => {
                let found = self.drain_worker(&target, out);
                Some(AnswerBody::Draining { req_id, found })
            }
            RequestBody::Cancel { req_id, call_id } => {
                let decision = self.cancel(call_id, out)?;
                info!(%call_id, worker, decision = decision.as_str(), "cancel requested");
                Some(AnswerBody::Cancel { req_id, decision })
            }
            RequestBody::Status { req_id } => Some(AnswerBody::Status {
                req_id,
                status: self.status(),
            }),
            call => match self.apply_call(&worker, call) {
                Ok(answer) => answer,
                Err(e) => {
                    telemetry::end(span, Some(e.to_string()));
                    return Err(e);
                }
            },
        };
        if let Some(span) = span {
            if let Some(body) = &answer {
                telemetry::set(
                    Some(&span),
                    Attribute::new("callq.decision", body.decision()),
                );
            }
            // Ended once the batch's group commit is durable and its
            // answers are out.
            self.spans.push(span);
        }
        if let Some(body) = answer {
            out.push((to, Answer::new(body)));
        }
        Ok(())
    }

    /// Applies a request of a call option: the claim of an idempotency
    /// key, a call held until its `not_before`, a retry.
    fn apply_option(
        &mut self,
        worker: &str,
        body: RequestBody,
    ) -> Result<Option<AnswerBody>, Error> {
        let answer = match body {
            RequestBody::Claim {
                req_id,
                lease,
                service,
                key,
                call_reply_to,
                digest,
            } => {
                let to = call_reply_to.as_deref();
                let decision = self.claim(worker, lease, &service, &key, to, digest.as_deref())?;
                AnswerBody::Resume { req_id, decision }
            }
            RequestBody::Defer {
                req_id,
                call_id,
                service,
                due_ms,
                body,
            } => {
                self.defer(call_id, service, due_ms, body);
                AnswerBody::Deferred { req_id }
            }
            RequestBody::Admit {
                req_id,
                calls,
                vacate,
            } => {
                self.keys.vacate(worker, &vacate);
                let mut admitted = Vec::new();
                for call in calls {
                    let call_id = call.lease.call_id;
                    if self.admit(worker, call)? {
                        admitted.push(call_id);
                    }
                }
                AnswerBody::Admission { req_id, admitted }
            }
            RequestBody::Retry {
                req_id,
                lease,
                attempt,
                service,
                call_reply_to: _,
                due_ms,
                body,
            } => {
                let call = crate::Delayed {
                    call_id: lease.call_id,
                    due_ms,
                    service,
                    body,
                    attempt,
                };
                let retrying = self.ledger.retry(lease, attempt, call)?;
                if retrying {
                    self.registry.landed(worker, lease.call_id);
                }
                AnswerBody::Retrying { req_id, retrying }
            }
            _ => return Ok(None),
        };
        Ok(Some(answer))
    }

    /// A worker's heartbeat, checked against what a worker can hold; a
    /// worker that joins hears of the recent cancellations.
    fn heartbeat_request(
        &mut self,
        worker: String,
        to: &str,
        body: RequestBody,
        out: &mut Outbox,
    ) -> Option<AnswerBody> {
        let RequestBody::Heartbeat {
            services,
            state,
            capacity,
            free,
            in_flight,
            partitions,
            finished,
        } = body
        else {
            return None;
        };
        if let Err(why) = heartbeat_in_bounds(&services, capacity, free, in_flight.len()) {
            warn!(%worker, "heartbeat refused: {why}");
            return None;
        }
        if !self.registry.has_worker(&worker)
            && let Some(order) = self.cancels.for_newcomer()
        {
            out.push((to.to_owned(), order));
        }
        let keyed: Vec<(Uuid, super::keys::KeyId)> = in_flight
            .iter()
            .filter_map(|c| {
                let key = c.key.clone()?;
                Some((c.lease.call_id, (c.service.clone(), key)))
            })
            .collect();
        let now = tokio::time::Instant::now();
        self.keys
            .heard(&worker, &keyed, now, self.opts.heartbeat_interval);
        let beat = Beat {
            services,
            state,
            capacity,
            free,
            in_flight,
            partitions,
            finished,
        };
        self.heartbeat(worker, to.to_owned(), beat)
    }

    /// Applies a request about a call or a session; returns its answer, if
    /// it has one.
    fn apply_call(&mut self, worker: &str, body: RequestBody) -> Result<Option<AnswerBody>, Error> {
        let answer = match body {
            RequestBody::Resume {
                req_id,
                lease,
                service,
                call_reply_to,
                digest,
            } => {
                let digest = digest.as_deref();
                let decision =
                    self.resume(worker, lease, &service, call_reply_to.as_deref(), digest)?;
                AnswerBody::Resume { req_id, decision }
            }
            option @ (RequestBody::Claim { .. }
            | RequestBody::Defer { .. }
            | RequestBody::Admit { .. }
            | RequestBody::Retry { .. }) => return self.apply_option(worker, option),
            RequestBody::Vacate { calls } => {
                self.keys.vacate(worker, &calls);
                return Ok(None);
            }
            trace @ RequestBody::Trace { .. } => return self.trace(worker, trace),
            RequestBody::Complete {
                req_id,
                lease,
                attempt,
                reply,
                session,
            } => {
                let decision = self.complete(worker, lease, attempt, reply, session.as_ref())?;
                AnswerBody::Complete { req_id, decision }
            }
            RequestBody::Session {
                req_id,
                session_id,
                have,
            } => {
                let state = self.read_session(worker, session_id, have)?;
                AnswerBody::Session { req_id, state }
            }
            RequestBody::Completed { calls } => {
                self.completed(worker, calls)?;
                return Ok(None);
            }
            RequestBody::Abandon {
                lease,
                attempt,
                kept,
            } => {
                self.ledger.abandon(lease, attempt, worker, &kept)?;
                return Ok(None);
            }
            RequestBody::Unclaim { lease } => {
                self.ledger.unclaim(lease)?;
                return Ok(None);
            }
            // Requests about the cluster's members: `apply` takes them.
            RequestBody::Heartbeat { .. }
            | RequestBody::AgentHeartbeat { .. }
            | RequestBody::Leave {}
            | RequestBody::Drain { .. }
            | RequestBody::Cancel { .. }
            | RequestBody::Status { .. } => return Ok(None),
        };
        Ok(Some(answer))
    }

    /// A worker's heartbeat: the registry takes it in (a new standby
    /// answers a request for one). Returns the order the worker has not
    /// obeyed yet, to repeat.
    fn heartbeat(&mut self, worker: String, to: String, beat: Beat) -> Option<AnswerBody> {
        if self.detector.heard(self.opts.silence()) {
            self.registry.heard_all_now();
        }
        if !self.registry.has_worker(&worker) {
            info!(worker, services = ?beat.services, state = ?beat.state, "worker joined");
            if beat.state == WorkerState::Standby {
                self.standbys.arrived(&beat.services);
            }
        }
        self.registry.beat(worker, to, beat)
    }

    /// A worker asks whether to run a redelivered copy, or a copy above
    /// the first: the ledger arbitrates; a copy whose body differs from its
    /// call's record is refused.
    fn resume(
        &mut self,
        worker: &str,
        lease: Lease,
        service: &str,
        reply_to: Option<&str>,
        digest: Option<&str>,
    ) -> Result<ResumeDecision, Error> {
        if !self.ledger.same_body(lease.call_id, digest)? {
            let reason = other_body(worker, lease.call_id);
            return Ok(ResumeDecision::Refused { reason });
        }
        let decision = self.ledger.resume(lease, worker, service, reply_to)?;
        // The record that resume may have made keeps the digest.
        self.ledger.same_body(lease.call_id, digest)?;
        Ok(decision)
    }

    /// The first delivery of a call with an idempotency key asks whether
    /// it runs: as `resume`, a copy whose body differs from its call's
    /// record is refused.
    fn claim(
        &mut self,
        worker: &str,
        lease: Lease,
        service: &str,
        key: &str,
        reply_to: Option<&str>,
        digest: Option<&str>,
    ) -> Result<ResumeDecision, Error> {
        if !self.ledger.same_body(lease.call_id, digest)? {
            let reason = other_body(worker, lease.call_id);
            return Ok(ResumeDecision::Refused { reason });
        }
        let now = self.clock.now_ms();
        let decision = self
            .ledger
            .claim(lease, worker, service, key, reply_to, now)?;
        self.ledger.same_body(lease.call_id, digest)?;
        Ok(decision)
    }

    /// A worker asks for a grant to leave a trace; one of a copy whose body
    /// differs from its call's record is refused.
    fn trace(&mut self, worker: &str, body: RequestBody) -> Result<Option<AnswerBody>, Error> {
        let RequestBody::Trace {
            req_id,
            lease,
            attempt,
            kind,
            service,
            call_reply_to,
            session,
            digest,
        } = body
        else {
            return Ok(None);
        };
        if !self.ledger.same_body(lease.call_id, digest.as_deref())? {
            let decision = TraceDecision::Refused {
                reason: other_body(worker, lease.call_id),
                superseded: true,
                reply: None,
            };
            return Ok(Some(AnswerBody::Trace { req_id, decision }));
        }
        let now = self.clock.now_ms();
        let decision = self.ledger.trace(
            lease,
            attempt,
            worker,
            &kind,
            &service,
            call_reply_to.as_deref(),
            session.as_ref(),
            now,
        )?;
        // The record a first trace made keeps the digest.
        self.ledger.same_body(lease.call_id, digest.as_deref())?;
        Ok(Some(AnswerBody::Trace { req_id, decision }))
    }

    /// A worker completed an attempt (synchronously when it left traces or
    /// wrote its session, in a batch otherwise): the call is no longer in
    /// flight there, and the ledger decides whether the completion stands.
    fn complete(
        &mut self,
        worker: &str,
        lease: Lease,
        attempt: u32,
        reply: Option<Reply>,
        session: Option<&SessionWrite>,
    ) -> Result<CompleteDecision, Error> {
        self.registry.landed(worker, lease.call_id);
        let now = self.clock.now_ms();
        self.ledger.complete(lease, attempt, reply, session, now)
    }

    /// A worker's batch of traceless completions, sent after their replies
    /// were published: each is recorded; one the ledger does not accept
    /// (its attempt was revoked, or the call was decided otherwise) is only
    /// logged.
    fn completed(&mut self, worker: &str, calls: Vec<Completion>) -> Result<(), Error> {
        for c in calls {
            let call_id = c.lease.call_id;
            let decision = self.complete(worker, c.lease, c.attempt, c.reply, None)?;
            if !matches!(decision, CompleteDecision::Accepted) {
                info!(worker, %call_id, ?decision, "a revoked attempt completed; ignored");
            }
        }
        Ok(())
    }

    /// A worker reads a session: the worker hears of its next change.
    fn read_session(
        &mut self,
        worker: &str,
        session_id: String,
        have: Option<u64>,
    ) -> Result<SessionState, Error> {
        let now = self.clock.now_ms();
        let state = self.ledger.session(&session_id, have, now)?;
        self.notices.read(session_id, worker);
        Ok(state)
    }

    /// A worker or node agent leaves: off the registry, and a worker off
    /// the session readers (its sessions are back with the store).
    fn leave(&mut self, worker: &str) {
        if self.registry.remove_worker(worker).is_some() {
            info!(worker, "worker left");
            self.notices.forget_reader(worker);
        }
        self.keys.worker_gone(worker);
        if self.registry.remove_agent(worker) {
            info!(agent = worker, "node agent left");
        }
    }

    /// An operator asks a worker to drain: it is marked draining and
    /// ordered to (the order is repeated until its heartbeats show it
    /// obeyed). Whether the worker is registered.
    fn drain_worker(&mut self, target: &str, out: &mut Outbox) -> bool {
        let Some(queue) = self.registry.drain(target) else {
            return false;
        };
        info!(worker = target, "draining on request");
        out.push((queue, Answer::new(AnswerBody::Drain {})));
        true
    }

    /// The cluster as `status` shows it.
    fn status(&self) -> ClusterStatus {
        ClusterStatus {
            workers: self.registry.worker_statuses(),
            agents: self.registry.agent_ids(),
            standby_per_service: self.opts.standby_per_service.clone(),
            open_calls: u64::try_from(self.ledger.open_calls()).unwrap_or(u64::MAX),
            deaths: self.detector.deaths(),
            stale_dropped: self.stale_dropped,
            unauthenticated_dropped: self
                .unauthenticated
                .as_ref()
                .map_or(0, |n| n.load(std::sync::atomic::Ordering::Relaxed)),
            delayed_calls: self.ledger.store().delayed_count().unwrap_or(0),
            promotions: self.standbys.promotions(),
        }
    }
}

/// Why a copy whose body differs from its call's record is refused; logged.
fn other_body(worker: &str, call_id: Uuid) -> String {
    warn!(worker, %call_id, "a copy of a call with another body than its record's: refused");
    format!(
        "call {call_id} was published again with another body than the one recorded: \
         this copy is refused"
    )
}
