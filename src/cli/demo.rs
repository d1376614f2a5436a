//! `callq demo`: the in-process cluster of `callq_testkit::demo` under
//! load, with a worker killed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use callq_testkit::demo::{self, DemoOptions};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Active workers.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Standby workers (the coordinator promotes one when a worker dies).
    #[arg(long, default_value_t = 1)]
    standbys: usize,
    /// Calls each worker runs at once.
    #[arg(long, default_value_t = 64)]
    capacity: u16,
    /// Calls in all.
    #[arg(long, default_value_t = 5_000)]
    calls: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Milliseconds each call works.
    #[arg(long, default_value_t = 50)]
    work_ms: u64,
    /// Milliseconds after the start when the busiest worker is killed.
    #[arg(long, default_value_t = 800)]
    kill_at_ms: u64,
    /// Keep the ledger and the mail outbox in this directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

/// Runs the demo; fails if the call contract was broken.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = DemoOptions {
        workers: args.workers,
        standbys: args.standbys,
        capacity: args.capacity,
        calls: args.calls,
        concurrency: args.concurrency,
        work: Duration::from_millis(args.work_ms),
        kill_at: Duration::from_millis(args.kill_at_ms),
        dir: args.dir,
        progress: !args.quiet,
    };
    let report = demo::run(&opts).await?;
    let violations = report.violations();
    anyhow::ensure!(
        violations.is_empty(),
        "the call contract was broken {} times: see above",
        violations.len()
    );
    Ok(ExitCode::SUCCESS)
}
