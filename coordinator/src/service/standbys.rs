//! Standbys: promoting one for each reserved service a dead worker served,
//! and asking node agents for new ones where a reserved service has fewer
//! than it should.

use std::collections::BTreeMap;
use std::time::Duration;

use callq_schemas::protocol::{Answer, AnswerBody, WorkerState};
use tokio::time::Instant;
use tracing::{info, warn};

use super::registry::{Registry, WorkerEntry};
use super::{Coordinator, Outbox};
use crate::Store;

/// Heartbeat intervals an agent is given to bring up a standby it was asked
/// for before the coordinator asks again.
const STANDBY_PATIENCE: u32 = 40;

/// A standby the coordinator asked an agent for and has not seen yet.
#[derive(Debug)]
struct Asked {
    service: String,
    until: Instant,
}

/// The standbys asked for and the promotions made.
#[derive(Debug, Default)]
pub(super) struct Standbys {
    asked: Vec<Asked>,
    promotions: u64,
}

impl Standbys {
    /// Standbys promoted so far.
    pub(super) fn promotions(&self) -> u64 {
        self.promotions
    }

    /// A new standby joined: it answers one request made to an agent.
    pub(super) fn arrived(&mut self, services: &[String]) {
        for s in services {
            if let Some(i) = self.asked.iter().position(|a| &a.service == s) {
                self.asked.swap_remove(i);
            }
        }
    }

    /// Promotes standbys for the reserved services of a dead worker: one
    /// standby covers every service it serves. Queues the orders in `out`.
    fn promote_for(
        &mut self,
        dead: &WorkerEntry,
        registry: &mut Registry,
        reserved: &BTreeMap<String, u32>,
        out: &mut Outbox,
    ) {
        if dead.state != WorkerState::Active {
            return;
        }
        let mut covered: Vec<&String> = Vec::new();
        for service in &dead.services {
            if !reserved.contains_key(service) || covered.contains(&service) {
                continue;
            }
            let Some((id, w)) = registry.standby_for(service) else {
                warn!(
                    service,
                    "no standby to promote: the service runs on its remaining workers"
                );
                continue;
            };
            info!(worker = id, service, "promoting a standby");
            w.state = WorkerState::Active;
            self.promotions += 1;
            crate::metrics::count(crate::metrics::PROMOTIONS);
            covered.extend(dead.services.iter().filter(|s| w.services.contains(s)));
            out.push((w.queue.clone(), Answer::new(AnswerBody::Promote {})));
        }
    }

    /// Asks node agents for the standbys that reserved services lack,
    /// counting those already asked for; returns the orders to send.
    fn ask_agents(
        &mut self,
        registry: &mut Registry,
        reserved: &BTreeMap<String, u32>,
        now: Instant,
        patience: Duration,
    ) -> Outbox {
        let mut orders = Vec::new();
        for (service, &wanted) in reserved {
            let have = registry.standbys_of(service)
                + self.asked.iter().filter(|a| &a.service == service).count();
            for _ in have..usize::try_from(wanted).unwrap_or(0) {
                let Some((id, a)) = registry.agent_for(service) else {
                    break;
                };
                info!(agent = id, service, "asking for a standby");
                a.workers += 1;
                orders.push((
                    a.queue.clone(),
                    Answer::new(AnswerBody::StartStandby {
                        services: vec![service.clone()],
                    }),
                ));
                self.asked.push(Asked {
                    service: service.clone(),
                    until: now + patience,
                });
            }
        }
        orders
    }
}

impl<S: Store> Coordinator<S> {
    /// Promotes standbys for workers just declared dead and sends them the
    /// order.
    pub(super) async fn promote_standbys(&mut self, lost: &[(String, WorkerEntry)]) {
        let mut orders = Vec::new();
        for (_, w) in lost {
            self.standbys.promote_for(
                w,
                &mut self.registry,
                &self.opts.standby_per_service,
                &mut orders,
            );
        }
        self.tell(orders).await;
    }

    /// Asks node agents for standbys where a reserved service has fewer
    /// than it should (silent agents are forgotten first, and an agent is
    /// given time to bring up what it was asked for).
    pub(super) async fn restore_standbys(&mut self) {
        let now = Instant::now();
        let silence = self.opts.silence();
        self.registry.forget_silent_agents(now, silence);
        self.standbys.asked.retain(|a| a.until > now);
        // Workers an agent starts on its own need time to register first.
        if now.duration_since(self.clock.started()) <= silence {
            return;
        }
        let patience = self.opts.heartbeat_interval * STANDBY_PATIENCE;
        let orders = self.standbys.ask_agents(
            &mut self.registry,
            &self.opts.standby_per_service,
            now,
            patience,
        );
        self.tell(orders).await;
    }
}
