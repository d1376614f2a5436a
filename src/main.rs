//! `callq`: the command line.

use std::process::ExitCode;

use clap::Parser as _;

mod cli;

fn main() -> anyhow::Result<ExitCode> {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` print to stdout and succeed; a wrong
            // command line exits with the usage code, apart from every
            // outcome a command reports.
            let _ = e.print();
            return Ok(if e.use_stderr() {
                ExitCode::from(cli::exit::USAGE)
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    cli.init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(cli.run())
}
