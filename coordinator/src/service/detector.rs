//! The failure detector: a worker silent for `dead_after` heartbeat
//! intervals is dead. Silence is judged only while the coordinator keeps up
//! with its queues (a coordinator behind on them would take its own backlog
//! for dead workers). A dead worker's calls are revoked in the ledger; once
//! that is durable, standbys are promoted and the effects published.

use std::time::Duration;

use callq_broker::{Broker, COORDINATOR_QUEUE, HEARTBEAT_QUEUE};
use tokio::time::Instant;
use tracing::{error, warn};

use super::Coordinator;
use super::options::CoordinatorOptions;
use super::registry::{Registry, WorkerEntry};
use crate::{InFlight, Store};

/// Who died, and whether silence can be judged now.
#[derive(Debug, Default)]
pub(super) struct Detector {
    /// Workers declared dead so far.
    deaths: u64,
    /// Since when the request queue has had a backlog, if it has.
    behind_since: Option<Instant>,
}

impl Detector {
    /// Workers declared dead so far.
    pub(super) fn deaths(&self) -> u64 {
        self.deaths
    }

    /// Whether the request and heartbeat queues hold less than one batch
    /// each: what waits in them is then about as recent as what was just
    /// read. A backlog that lasts is warned of once per `dead_after`
    /// intervals.
    pub(super) async fn caught_up(
        &mut self,
        broker: &dyn Broker,
        opts: &CoordinatorOptions,
    ) -> bool {
        let mut backlog = 0;
        for queue in [COORDINATOR_QUEUE, HEARTBEAT_QUEUE] {
            match broker.depth(queue).await {
                Ok(depth) => backlog = backlog.max(depth.ready),
                Err(e) => {
                    warn!("reading the depth of `{queue}`: {e}; deaths are not judged this tick");
                    return false;
                }
            }
        }
        if backlog < u64::from(opts.batch_max) {
            self.behind_since = None;
            return true;
        }
        let since = *self.behind_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= opts.silence() {
            warn!(
                ready = backlog,
                "the coordinator is behind on its requests: deaths are not judged until it catches up"
            );
            self.behind_since = Some(Instant::now());
        }
        false
    }

    /// The workers silent for longer than `silence` at `now`.
    fn silent(registry: &Registry, now: Instant, silence: Duration) -> Vec<String> {
        registry
            .workers()
            .filter(|(_, w)| now.duration_since(w.last_seen) > silence)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl<S: Store> Coordinator<S> {
    /// Declares silent workers dead and revokes their calls; once that is
    /// durable, promotes standbys for them and publishes the re-issues and
    /// `fatal` answers. A failed commit leaves them registered, to be
    /// declared dead again at the next tick.
    pub(super) async fn detect_deaths(&mut self) {
        let silence = self.opts.silence();
        let dead = Detector::silent(&self.registry, Instant::now(), silence);
        if dead.is_empty() {
            return;
        }
        let lost = self.declare_dead(dead, silence);
        match self.ledger.commit() {
            Ok(effects) => {
                self.promote_standbys(&lost).await;
                self.carry_out(effects).await;
            }
            Err(e) => {
                error!("committing dead workers' calls failed: {e}");
                for (id, w) in lost {
                    self.registry.restore_worker(id, w);
                }
            }
        }
    }

    /// Takes dead workers off the registry and the session readers, and
    /// revokes their calls in the ledger (not yet durable). Returns them.
    fn declare_dead(&mut self, dead: Vec<String>, silence: Duration) -> Vec<(String, WorkerEntry)> {
        let mut lost = Vec::new();
        for id in dead {
            let Some(w) = self.registry.remove_worker(&id) else {
                continue;
            };
            warn!(worker = id, services = ?w.services, in_flight = w.in_flight.len(), "worker dead: no heartbeat for {silence:?}");
            self.detector.deaths += 1;
            self.notices.forget_reader(&id);
            let calls: Vec<InFlight> = w.in_flight.values().cloned().collect();
            if let Err(e) = self.ledger.worker_lost(&id, &calls) {
                error!(worker = id, "revoking a dead worker's calls: {e}");
            }
            lost.push((id, w));
        }
        lost
    }
}
