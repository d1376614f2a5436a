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
    /// When the coordinator last read a heartbeat from anyone.
    last_heard: Option<Instant>,
    /// Whether it said that it heard no one.
    said_deaf: bool,
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

    /// A heartbeat was read now. `true` when none had been read for longer
    /// than `silence` before: the coordinator's own intake was stalled (a
    /// consumer group rebalancing, a broker that paused it), and every
    /// worker is owed a fresh `silence` to be heard from.
    pub(super) fn heard(&mut self, silence: Duration) -> bool {
        let now = Instant::now();
        let gap = self
            .last_heard
            .replace(now)
            .is_some_and(|last| now.duration_since(last) > silence);
        self.said_deaf = false;
        gap
    }

    /// Whether the coordinator itself has heard no heartbeat from anyone
    /// for longer than `silence` while several workers are registered:
    /// all of them falling silent at once is its own intake's stall far
    /// more likely than their deaths, so none is judged until heartbeats
    /// flow again. (One lone worker's silence is judged as before.)
    fn deaf(&mut self, workers: usize, now: Instant, silence: Duration) -> bool {
        let deaf = workers >= 2
            && self
                .last_heard
                .is_some_and(|last| now.duration_since(last) > silence);
        if deaf && !self.said_deaf {
            warn!(
                workers,
                "no heartbeat from any worker for longer than {silence:?}: the coordinator's own intake looks stalled; deaths are not judged until heartbeats come again"
            );
            self.said_deaf = true;
        }
        deaf
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
        let now = Instant::now();
        let workers = self.registry.workers().count();
        if self.detector.deaf(workers, now, silence) {
            return;
        }
        let dead = Detector::silent(&self.registry, now, silence);
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
            crate::metrics::count(crate::metrics::DEATHS);
            self.notices.forget_reader(&id);
            self.keys.worker_gone(&id);
            let calls: Vec<InFlight> = w.in_flight.values().cloned().collect();
            if let Err(e) = self.ledger.worker_lost(&id, &calls) {
                error!(worker = id, "revoking a dead worker's calls: {e}");
            }
            lost.push((id, w));
        }
        lost
    }
}
