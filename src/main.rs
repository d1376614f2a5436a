//! `callq`: the command line.

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "callq",
    version,
    about = "A worker cluster driven by a message bus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs an in-process cluster on the embedded broker under load and
    /// prints what happened and the figures.
    Demo {
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
        dir: Option<std::path::PathBuf>,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo kills a worker on purpose: its warnings are the story the
    // demo prints itself, so it logs errors only unless asked otherwise.
    let default_filter = match cli.command {
        Command::Demo { .. } => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CALLQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Demo {
                workers,
                standbys,
                capacity,
                calls,
                concurrency,
                work_ms,
                kill_at_ms,
                dir,
                quiet,
            } => {
                let opts = callq::demo::DemoOptions {
                    workers,
                    standbys,
                    capacity,
                    calls,
                    concurrency,
                    work: Duration::from_millis(work_ms),
                    kill_at: Duration::from_millis(kill_at_ms),
                    dir,
                    progress: !quiet,
                };
                let report = callq::demo::run(&opts).await?;
                let violations = report.violations();
                anyhow::ensure!(
                    violations.is_empty(),
                    "the call contract was broken {} times: see above",
                    violations.len()
                );
                Ok(())
            }
        }
    })
}
