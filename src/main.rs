//! `callq`: the command line.

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
        /// Worker count.
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Calls each worker runs at once.
        #[arg(long, default_value_t = 64)]
        capacity: u16,
        /// Calls in all.
        #[arg(long, default_value_t = 10_000)]
        calls: usize,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CALLQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
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
                capacity,
                calls,
                concurrency,
                quiet,
            } => {
                let opts = callq::demo::DemoOptions {
                    workers,
                    capacity,
                    calls,
                    concurrency,
                    progress: !quiet,
                };
                let report = callq::demo::run(&opts).await?;
                anyhow::ensure!(
                    report.all_ok(),
                    "not every call ended ok: see the outcomes above"
                );
                Ok(())
            }
        }
    })
}
