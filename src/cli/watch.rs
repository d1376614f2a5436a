//! `callq status --watch`: the status table redrawn in place, topped by
//! the calls per second of each service (from the counts the workers'
//! heartbeats carry) and its queue.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use tokio::time::Instant;

use super::config::Settings;
use super::status::{StatusReport, open, render_status, report, row, table};

/// Moves the cursor home and clears the screen: each frame replaces the
/// last one instead of scrolling.
const REDRAW: &str = "\x1b[H\x1b[2J";

/// Redraws every `every` until Ctrl-C or `frames` frames.
pub(crate) async fn run(
    settings: &Settings,
    every: Duration,
    frames: Option<u64>,
) -> anyhow::Result<()> {
    let (broker, admin) = open(settings).await?;
    let mut last: Option<(Instant, StatusReport)> = None;
    let mut shown = 0u64;
    loop {
        let at = Instant::now();
        let frame = match report(&broker, &admin).await {
            Ok(now) => {
                let per_service = match &last {
                    Some((then, before)) => rates(before, &now, at - *then),
                    None => BTreeMap::new(),
                };
                let frame = render_watch(&now, &per_service, every);
                last = Some((at, now));
                frame
            }
            // The coordinator or the broker had a bad moment: say so, and
            // try again at the next frame.
            Err(e) => format!("callq status: {e:#}\n"),
        };
        let mut out = std::io::stdout().lock();
        write!(out, "{REDRAW}{frame}")?;
        out.flush()?;
        drop(out);
        shown += 1;
        if frames.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep_until(at + every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Per service, the calls finished per second between two reports: the
/// growth of the counts of the workers present in both (a worker that
/// restarted starts again from 0 and adds nothing until its next frame).
pub(crate) fn rates(
    before: &StatusReport,
    now: &StatusReport,
    elapsed: Duration,
) -> BTreeMap<String, f64> {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let earlier: BTreeMap<&str, &BTreeMap<String, u64>> = before
        .cluster
        .workers
        .iter()
        .map(|w| (w.worker_id.as_str(), &w.finished))
        .collect();
    let mut per_service: BTreeMap<String, f64> = BTreeMap::new();
    for w in &now.cluster.workers {
        for service in &w.services {
            let grew = match earlier.get(w.worker_id.as_str()) {
                Some(was) => w
                    .finished
                    .get(service)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(was.get(service).copied().unwrap_or(0)),
                None => 0,
            };
            *per_service.entry(service.clone()).or_default() += grew as f64 / secs;
        }
    }
    per_service
}

/// One frame: the services with their rates and queues, then the status.
fn render_watch(
    now: &StatusReport,
    per_service: &BTreeMap<String, f64>,
    every: Duration,
) -> String {
    let mut services: BTreeMap<&str, (usize, Option<f64>)> = BTreeMap::new();
    for w in &now.cluster.workers {
        for s in &w.services {
            services.entry(s).or_insert((0, None)).0 += 1;
        }
    }
    for (s, rate) in per_service {
        services.entry(s).or_insert((0, None)).1 = Some(*rate);
    }
    let mut rows = vec![row(&["SERVICE", "CALLS/S", "WORKERS", "QUEUED"])];
    rows.extend(services.iter().map(|(service, (workers, rate))| {
        let high = now
            .queues
            .get(&callq_broker::high_queue(service))
            .copied()
            .unwrap_or(0);
        let queued = now
            .queues
            .get(&callq_broker::call_queue(service))
            .map_or_else(|| "-".to_owned(), |n| (n + high).to_string());
        vec![
            (*service).to_owned(),
            rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}")),
            workers.to_string(),
            queued,
        ]
    }));
    format!(
        "callq status, every {:.1} s (Ctrl-C to stop)\n\n{}\n{}",
        every.as_secs_f64(),
        table(&rows, &[false, true, true, true]),
        render_status(now)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use callq_schemas::protocol::{ClusterStatus, WorkerState, WorkerStatus};

    use super::*;

    fn report(workers: &[(&str, &[(&str, u64)])]) -> StatusReport {
        StatusReport {
            cluster: ClusterStatus {
                workers: workers
                    .iter()
                    .map(|(id, finished)| WorkerStatus {
                        worker_id: (*id).to_owned(),
                        state: WorkerState::Active,
                        services: vec!["echo".into(), "mail".into()],
                        capacity: 8,
                        free: 8,
                        last_seen_ms: 0,
                        finished: finished
                            .iter()
                            .map(|(s, n)| ((*s).to_owned(), *n))
                            .collect(),
                    })
                    .collect(),
                ..ClusterStatus::default()
            },
            broker: "amqp".into(),
            queues: BTreeMap::from([("callq.call.echo".to_owned(), 5)]),
            partitions: BTreeMap::new(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn rates_come_from_the_workers_present_in_both_frames() {
        let before = report(&[
            ("w1", &[("echo", 100)]),
            ("w2", &[("echo", 50), ("mail", 7)]),
        ]);
        // w2 restarted as w3 (its count starts again), w1 ran 40 more.
        let now = report(&[("w1", &[("echo", 140)]), ("w3", &[("echo", 3)])]);
        let r = rates(&before, &now, Duration::from_secs(2));
        assert_eq!(r["echo"], 20.0);
        assert_eq!(r["mail"], 0.0);
        let frame = render_watch(&now, &r, Duration::from_secs(2));
        assert!(frame.contains("every 2.0 s"), "{frame}");
        let echo = frame.lines().find(|l| l.starts_with("echo ")).unwrap();
        assert_eq!(
            echo.split_whitespace().collect::<Vec<_>>(),
            ["echo", "20.0", "2", "5"],
            "{frame}"
        );
        assert!(
            frame.contains("WORKER"),
            "the status table follows: {frame}"
        );
        // The calls of the high band wait for the service too.
        let mut now = now;
        now.queues.insert("callq.high.echo".to_owned(), 3);
        let frame = render_watch(&now, &r, Duration::from_secs(2));
        let echo = frame.lines().find(|l| l.starts_with("echo ")).unwrap();
        assert_eq!(echo.split_whitespace().last(), Some("8"), "{frame}");
    }
}
