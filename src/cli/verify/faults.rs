//! The faults and their schedule: which fault hits when, drawn from the
//! seed, and what each did.

use std::time::Duration;

use callq_node::probe::Point;

use super::fleet::{Fleet, signal};
use super::rng::Rng;

/// A fault `callq verify` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Fault {
    /// `kill -9` of a worker; a new one is started at once (as an agent
    /// would).
    KillWorker,
    /// SIGSTOP of a worker for `--pause-ms` (past `dead_after`), then
    /// SIGCONT: its calls are re-issued meanwhile, its late traces and
    /// completions refused.
    StopWorker,
    /// `kill -9` of the coordinator, started again on its store after a
    /// moment.
    KillCoordinator,
    /// SIGSTOP of the coordinator for `--pause-ms`, then SIGCONT.
    StopCoordinator,
    /// A worker dies at a point of a call: before the handler, after a
    /// trace grant, after the handler's commit before the ack, or after the
    /// ack (the four in turn); a new one is started.
    Crash,
    /// The broker restarted by `--broker-restart`.
    BrokerRestart,
    /// A worker in a network namespace cut off for `--partition-ms` (past
    /// `dead_after` and the AMQP heartbeat), then let back. Needs root and
    /// `--partition-broker`.
    Partition,
}

impl Fault {
    pub(super) fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

/// The points a crash hits, in turn.
pub(super) const CRASH_POINTS: [Point; 4] = [
    Point::BeforeHandler,
    Point::AfterTrace,
    Point::BeforeReply,
    Point::AfterAck,
];

/// One fault of the schedule: when (the share of the calls published) and
/// what.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Planned {
    pub(super) after: f64,
    pub(super) fault: Fault,
    /// For a crash: its point.
    pub(super) point: Point,
    /// Picks the worker a fault hits.
    pub(super) pick: usize,
}

/// `count` faults: each kind given once, the rest crashes (or, without
/// crashes, the kinds again), in an order the seed picks, spread over the
/// load (between a twentieth and seven tenths of the calls, so that the
/// last ones, which may wait for a long one before them, still meet calls
/// in flight); the crashes hit
/// the four points in turn from one the seed picks.
pub(super) fn schedule(rng: &mut Rng, kinds: &[Fault], count: usize) -> Vec<Planned> {
    if kinds.is_empty() {
        return Vec::new();
    }
    let extra: Vec<Fault> = if kinds.contains(&Fault::Crash) {
        vec![Fault::Crash]
    } else {
        kinds.to_vec()
    };
    let mut order: Vec<Fault> = (0..count)
        .map(|k| kinds.get(k).copied().unwrap_or(extra[k % extra.len()]))
        .collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut point = rng.below(CRASH_POINTS.len());
    let slot = 0.65 / count as f64;
    order
        .into_iter()
        .enumerate()
        .map(|(k, fault)| {
            let after = 0.05 + slot * (k as f64 + 0.25 + 0.5 * rng.fraction());
            let p = CRASH_POINTS[point % CRASH_POINTS.len()];
            if fault == Fault::Crash {
                point += 1;
            }
            Planned {
                after,
                fault,
                point: p,
                pick: rng.below(1 << 16),
            }
        })
        .collect()
}

/// How long faults last.
#[derive(Debug, Clone)]
pub(super) struct Timing {
    pub(super) pause: Duration,
    pub(super) partition: Duration,
    pub(super) broker_restart: Option<String>,
}

/// Applies `planned`; what it did, for the report.
pub(super) async fn apply(
    fleet: &mut Fleet,
    planned: &Planned,
    timing: &Timing,
) -> anyhow::Result<String> {
    let plain = fleet.plain();
    anyhow::ensure!(
        !plain.is_empty()
            || matches!(
                planned.fault,
                Fault::BrokerRestart
                    | Fault::Partition
                    | Fault::KillCoordinator
                    | Fault::StopCoordinator
            ),
        "no worker left to hit"
    );
    let i = plain
        .get(planned.pick % plain.len().max(1))
        .copied()
        .unwrap_or(0);
    Ok(match planned.fault {
        Fault::KillWorker => {
            let id = fleet.kill_worker(i);
            let new = fleet.start_worker(None)?;
            format!("killed {id}, started {new}")
        }
        Fault::StopWorker => {
            let (id, pid) = (fleet.workers[i].id.clone(), fleet.pid(i));
            signal(pid, "STOP")?;
            tokio::time::sleep(timing.pause).await;
            signal(pid, "CONT")?;
            format!("paused {id} for {} ms", timing.pause.as_millis())
        }
        Fault::KillCoordinator => {
            fleet.kill_coordinator();
            tokio::time::sleep(Duration::from_millis(500)).await;
            fleet.start_coordinator()?;
            "killed the coordinator, started it again on its store".to_owned()
        }
        Fault::StopCoordinator => {
            let pid = fleet
                .coordinator_pid()
                .ok_or_else(|| anyhow::anyhow!("no coordinator runs"))?;
            signal(pid, "STOP")?;
            tokio::time::sleep(timing.pause).await;
            signal(pid, "CONT")?;
            format!("paused the coordinator for {} ms", timing.pause.as_millis())
        }
        Fault::Crash => {
            let id = fleet.workers[i].id.clone();
            let point = planned.point;
            let hit = fleet.crash(i, point, Duration::from_secs(20)).await;
            fleet.reap();
            let new = fleet.start_worker(None)?;
            if hit {
                format!("{id} crashed at {point}, started {new}")
            } else {
                format!("{id} armed at {point} but no call reached it within 20 s; started {new}")
            }
        }
        Fault::BrokerRestart => {
            let cmd = timing
                .broker_restart
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("broker-restart needs --broker-restart CMD"))?;
            restart_broker(cmd).await?;
            format!("restarted the broker (`{cmd}`)")
        }
        Fault::Partition => {
            let member = fleet
                .workers
                .iter()
                .find(|w| w.netns.is_some())
                .ok_or_else(|| anyhow::anyhow!("no worker in a network namespace"))?;
            let ns = member
                .netns
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no namespace"))?;
            ns.cut()?;
            tokio::time::sleep(timing.partition).await;
            ns.restore()?;
            format!(
                "cut {} off the network for {} ms",
                member.id,
                timing.partition.as_millis()
            )
        }
    })
}

/// Runs the broker's restart command, bounded.
async fn restart_broker(cmd: &str) -> anyhow::Result<()> {
    let run = tokio::task::spawn_blocking({
        let cmd = cmd.to_owned();
        move || {
            std::process::Command::new("sh")
                .args(["-c", &cmd])
                .stdin(std::process::Stdio::null())
                .output()
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .map_err(|_| anyhow::anyhow!("`{cmd}` did not end within 180 s"))???;
    anyhow::ensure!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_schedule_with_every_kind_and_crash_point() {
        let kinds = [Fault::KillWorker, Fault::Crash, Fault::StopCoordinator];
        let a = schedule(&mut Rng::new(3), &kinds, kinds.len() + 3);
        assert_eq!(a, schedule(&mut Rng::new(3), &kinds, 6));
        assert_ne!(a, schedule(&mut Rng::new(4), &kinds, 6));
        let of = |k| a.iter().filter(|p| p.fault == k).count();
        assert_eq!(
            (
                of(Fault::KillWorker),
                of(Fault::StopCoordinator),
                of(Fault::Crash)
            ),
            (1, 1, 4)
        );
        let b = schedule(&mut Rng::new(3), &[Fault::KillWorker, Fault::StopWorker], 5);
        assert_eq!(b.iter().filter(|p| p.fault == Fault::KillWorker).count(), 3);
        let points: std::collections::HashSet<_> = a
            .iter()
            .filter(|p| p.fault == Fault::Crash)
            .map(|p| p.point)
            .collect();
        assert_eq!(points.len(), 4);
        assert!(a.windows(2).all(|w| w[0].after < w[1].after));
        assert!(a.iter().all(|p| (0.05..0.7).contains(&p.after)));
    }
}
