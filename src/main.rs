//! `callq`: the command line.

use std::process::ExitCode;

use clap::Parser as _;

mod cli;

fn main() -> anyhow::Result<ExitCode> {
    let cli = cli::Cli::parse();
    cli.init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(cli.run())
}
