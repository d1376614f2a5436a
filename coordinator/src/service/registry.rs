//! The registry: the workers and node agents the coordinator knows of, as
//! their heartbeats report them, and the states it ordered them into.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use callq_schemas::Uuid;
use callq_schemas::protocol::{AnswerBody, InFlightCall, WorkerState, WorkerStatus};
use tokio::time::Instant;
use tracing::info;

use crate::InFlight;

/// A worker as the registry knows it.
#[derive(Debug)]
pub(super) struct WorkerEntry {
    pub(super) state: WorkerState,
    pub(super) services: Vec<String>,
    pub(super) capacity: u32,
    pub(super) free: u32,
    /// Where its answers and orders go.
    pub(super) queue: String,
    pub(super) last_seen: Instant,
    pub(super) in_flight: HashMap<Uuid, InFlight>,
    /// Per service, the partitions of its call queue the worker owns, where
    /// the broker partitions.
    pub(super) partitions: BTreeMap<String, Vec<u32>>,
    /// Per service, the calls it ran to an answer, as it last reported.
    pub(super) finished: BTreeMap<String, u64>,
}

/// A node agent as the registry knows it.
#[derive(Debug)]
pub(super) struct AgentEntry {
    pub(super) services: Vec<String>,
    pub(super) workers: u32,
    pub(super) queue: String,
    pub(super) last_seen: Instant,
}

/// What a worker's heartbeat reports.
pub(super) struct Beat {
    pub(super) services: Vec<String>,
    pub(super) state: WorkerState,
    pub(super) capacity: u32,
    pub(super) free: u32,
    pub(super) in_flight: Vec<InFlightCall>,
    pub(super) partitions: BTreeMap<String, Vec<u32>>,
    pub(super) finished: BTreeMap<String, u64>,
}

/// The workers and node agents of the cluster.
#[derive(Debug, Default)]
pub(super) struct Registry {
    workers: HashMap<String, WorkerEntry>,
    agents: HashMap<String, AgentEntry>,
}

impl WorkerEntry {
    /// A worker first heard of now.
    fn new(state: WorkerState, capacity: u32, free: u32, queue: String) -> Self {
        Self {
            state,
            services: Vec::new(),
            capacity,
            free,
            queue,
            last_seen: Instant::now(),
            in_flight: HashMap::new(),
            partitions: BTreeMap::new(),
            finished: BTreeMap::new(),
        }
    }

    /// The order to repeat when the worker reports `reported` while the
    /// coordinator ordered it otherwise: a promotion or drain the
    /// coordinator ordered stands until the worker's own heartbeats catch
    /// up with it (the order may have been lost).
    fn standing_order(&self, reported: WorkerState) -> Option<AnswerBody> {
        match (self.state, reported) {
            (WorkerState::Active, WorkerState::Standby) => Some(AnswerBody::Promote {}),
            (WorkerState::Draining, WorkerState::Active | WorkerState::Standby) => {
                Some(AnswerBody::Drain {})
            }
            _ => None,
        }
    }

    /// The calls in flight are those the heartbeat reports; a body sent in
    /// an earlier heartbeat is kept.
    fn report_in_flight(&mut self, reported: Vec<InFlightCall>) {
        let mut now = HashMap::with_capacity(reported.len());
        for call in reported {
            let id = call.lease.call_id;
            let known_body = self.in_flight.remove(&id).and_then(|f| f.body);
            let body = call.body.map(String::into_bytes).or(known_body);
            now.insert(
                id,
                InFlight {
                    lease: call.lease,
                    service: call.service,
                    reply_to: call.reply_to,
                    body,
                },
            );
        }
        self.in_flight = now;
    }
}

impl Registry {
    /// The services the registered workers serve, each once.
    pub(super) fn services(&self) -> std::collections::BTreeSet<String> {
        self.workers
            .values()
            .flat_map(|w| w.services.iter().cloned())
            .collect()
    }

    /// Whether the worker is registered.
    pub(super) fn has_worker(&self, id: &str) -> bool {
        self.workers.contains_key(id)
    }

    /// Takes in a worker's heartbeat, registering the worker if it is new.
    /// Returns the order to repeat to it, if it has not obeyed one yet.
    pub(super) fn beat(&mut self, worker: String, queue: String, beat: Beat) -> Option<AnswerBody> {
        let entry = self.workers.entry(worker).or_insert_with(|| {
            WorkerEntry::new(beat.state, beat.capacity, beat.free, queue.clone())
        });
        let order = entry.standing_order(beat.state);
        if order.is_none() {
            entry.state = beat.state;
        }
        // Its own services only: a heartbeat names no more than those.
        entry.finished = beat
            .finished
            .into_iter()
            .filter(|(service, _)| beat.services.contains(service))
            .collect();
        entry.services = beat.services;
        entry.capacity = beat.capacity;
        entry.free = beat.free;
        entry.partitions = beat.partitions;
        entry.queue = queue;
        entry.last_seen = Instant::now();
        entry.report_in_flight(beat.in_flight);
        order
    }

    /// Takes in a node agent's heartbeat, registering the agent if it is new.
    pub(super) fn agent_beat(
        &mut self,
        agent: String,
        queue: String,
        services: Vec<String>,
        workers: u32,
    ) {
        let now = Instant::now();
        self.agents
            .entry(agent)
            .and_modify(|a| {
                a.services.clone_from(&services);
                a.workers = workers;
                a.queue.clone_from(&queue);
                a.last_seen = now;
            })
            .or_insert_with_key(|agent| {
                info!(agent, ?services, "node agent joined");
                AgentEntry {
                    services: services.clone(),
                    workers,
                    queue: queue.clone(),
                    last_seen: now,
                }
            });
    }

    /// A worker's call ended: it is no longer in flight there.
    pub(super) fn landed(&mut self, worker: &str, call_id: Uuid) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.in_flight.remove(&call_id);
        }
    }

    /// Takes a worker off the registry (it left or died).
    pub(super) fn remove_worker(&mut self, id: &str) -> Option<WorkerEntry> {
        self.workers.remove(id)
    }

    /// Puts back a worker taken off (its death could not be committed).
    pub(super) fn restore_worker(&mut self, id: String, entry: WorkerEntry) {
        self.workers.insert(id, entry);
    }

    /// Takes a node agent off the registry; whether it was there.
    pub(super) fn remove_agent(&mut self, id: &str) -> bool {
        self.agents.remove(id).is_some()
    }

    /// Forgets node agents silent for longer than `silence`.
    /// The coordinator was away (it lost the broker) and heard nobody: it
    /// counts every worker and agent as heard from now, so that each has a
    /// full silence to be heard again before it is judged dead.
    pub(super) fn heard_all_now(&mut self) {
        let now = Instant::now();
        for w in self.workers.values_mut() {
            w.last_seen = now;
        }
        for a in self.agents.values_mut() {
            a.last_seen = now;
        }
    }

    pub(super) fn forget_silent_agents(&mut self, now: Instant, silence: Duration) {
        self.agents
            .retain(|_, a| now.duration_since(a.last_seen) <= silence);
    }

    /// Marks a worker draining; the queue to send it the order, if it is
    /// registered.
    pub(super) fn drain(&mut self, id: &str) -> Option<String> {
        let w = self.workers.get_mut(id)?;
        w.state = WorkerState::Draining;
        Some(w.queue.clone())
    }

    /// The workers, by id.
    pub(super) fn workers(&self) -> impl Iterator<Item = (&String, &WorkerEntry)> {
        self.workers.iter()
    }

    /// Where a worker's answers and notices go, if it is registered.
    pub(super) fn queue_of(&self, id: &str) -> Option<&str> {
        self.workers.get(id).map(|w| w.queue.as_str())
    }

    /// The standby that serves `service`, the first by id, if there is one.
    pub(super) fn standby_for(&mut self, service: &str) -> Option<(&String, &mut WorkerEntry)> {
        self.workers
            .iter_mut()
            .filter(|(_, w)| {
                w.state == WorkerState::Standby && w.services.iter().any(|s| s == service)
            })
            .min_by(|(a, _), (b, _)| a.cmp(b))
    }

    /// Standbys that serve `service`.
    pub(super) fn standbys_of(&self, service: &str) -> usize {
        self.workers
            .values()
            .filter(|w| w.state == WorkerState::Standby && w.services.iter().any(|s| s == service))
            .count()
    }

    /// The node agent that offers `service` and runs the fewest workers
    /// (the first by id among equals), if there is one.
    pub(super) fn agent_for(&mut self, service: &str) -> Option<(&String, &mut AgentEntry)> {
        self.agents
            .iter_mut()
            .filter(|(_, a)| a.services.iter().any(|s| s == service))
            .min_by_key(|(id, a)| (a.workers, (*id).clone()))
    }

    /// The workers as `status` shows them, by id.
    pub(super) fn worker_statuses(&self) -> Vec<WorkerStatus> {
        let now = Instant::now();
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerStatus {
                worker_id: id.clone(),
                state: w.state,
                services: w.services.clone(),
                capacity: w.capacity,
                free: w.free,
                last_seen_ms: u64::try_from(now.duration_since(w.last_seen).as_millis())
                    .unwrap_or(u64::MAX),
                finished: w.finished.clone(),
            })
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        workers
    }

    /// The node agents' ids, sorted.
    pub(super) fn agent_ids(&self) -> Vec<String> {
        let mut agents: Vec<String> = self.agents.keys().cloned().collect();
        agents.sort_unstable();
        agents
    }

    /// Where the broker partitions: a partition of `service`'s queue that a
    /// live active worker owns, so that a re-issued copy does not wait for
    /// the broker to move the dead worker's partitions. Spread by call id
    /// over the workers with room (all of them when none has).
    pub(super) fn live_partition(&self, service: &str, call_id: Uuid) -> Option<(&str, u32)> {
        let owners: Vec<(&String, &WorkerEntry, &Vec<u32>)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state == WorkerState::Active)
            .filter_map(|(id, w)| {
                w.partitions
                    .get(service)
                    .filter(|p| !p.is_empty())
                    .map(|p| (id, w, p))
            })
            .collect();
        let with_room: Vec<_> = owners.iter().filter(|(_, w, _)| w.free > 0).collect();
        let mut pool: Vec<_> = if with_room.is_empty() {
            owners.iter().collect()
        } else {
            with_room
        };
        if pool.is_empty() {
            return None;
        }
        // A stable order, so that the call id alone picks.
        pool.sort_by(|a, b| a.0.cmp(b.0));
        let spread = call_id.as_u128();
        let (id, _, partitions) = pool[(spread % pool.len() as u128) as usize];
        let p = partitions[((spread >> 64) % partitions.len() as u128) as usize];
        Some((id.as_str(), p))
    }
}
