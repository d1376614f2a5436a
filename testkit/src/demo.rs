//! `callq demo`: the whole story on one machine. A coordinator (its ledger
//! in redb), workers and a standby on the embedded broker serve a load of
//! `echo.sleep` and `mail.send` calls; mid-load a worker is killed; the demo
//! prints how every call ended, what was retried transparently, what ended
//! `fatal` and why, and the failover pause the clients felt.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use callq_coordinator::RedbStore;

use crate::chaos::{self, ChaosReport, ChaosSpec};
use crate::cluster::ClusterOptions;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Active workers.
    pub workers: usize,
    /// Standby workers.
    pub standbys: usize,
    /// Calls each worker runs at once.
    pub capacity: u16,
    /// Calls in all.
    pub calls: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// How long each call works.
    pub work: Duration,
    /// When the worker is killed, after the load starts.
    pub kill_at: Duration,
    /// Where the coordinator's ledger and the mail outbox go; a fresh
    /// temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// Print a progress line.
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            workers: 3,
            standbys: 1,
            capacity: 64,
            calls: 5_000,
            concurrency: 128,
            work: Duration::from_millis(50),
            kill_at: Duration::from_millis(800),
            dir: None,
            progress: true,
        }
    }
}

/// Runs the demo and prints what happened to stdout.
pub async fn run(opts: &DemoOptions) -> anyhow::Result<ChaosReport> {
    let (dir, temporary) = match &opts.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("callq-demo-{}", uuid::Uuid::now_v7().simple())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = RedbStore::open(dir.join("ledger.redb"))?;
    let reserved: BTreeMap<String, u32> = [("echo".to_owned(), 1), ("mail".to_owned(), 1)]
        .into_iter()
        .collect();
    let spec = ChaosSpec {
        cluster: ClusterOptions {
            capacity: opts.capacity,
            standby_per_service: if opts.standbys > 0 {
                reserved
            } else {
                BTreeMap::new()
            },
            ..ClusterOptions::default()
        },
        workers: opts.workers,
        standbys: opts.standbys,
        calls: opts.calls,
        concurrency: opts.concurrency,
        mail_every: 4,
        work: opts.work,
        kill_every: opts.kill_at,
        max_kills: 1,
        replace_killed: false,
        timeout: Duration::from_secs(60),
        outbox: dir.join("mail.outbox"),
        progress: opts.progress,
    };
    println!(
        "callq demo: a coordinator (ledger in {}), {} workers and {} standby on the embedded broker",
        dir.display(),
        opts.workers,
        opts.standbys
    );
    println!(
        "  {} calls, {} in flight: every 4th is mail.send (declares the trace mail.sent, then appends to {}), the rest echo.sleep {} ms; the busiest worker is killed at {:.1} s",
        opts.calls,
        opts.concurrency,
        spec.outbox.display(),
        opts.work.as_millis(),
        opts.kill_at.as_secs_f64()
    );
    let report = chaos::run(&spec, store).await?;
    report.print();
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}
