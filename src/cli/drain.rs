//! `callq drain WORKER`: the worker stops taking calls, finishes those it
//! runs and leaves.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use callq_node::Admin;

use super::broker::connect;
use super::config::Settings;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The worker's id, as `callq status` shows it.
    worker: String,
}

/// Asks the coordinator to drain the worker; exits 1 if it knows none by
/// that id.
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let worker = args.worker;
    if drain(&Settings::load(config)?, &worker).await? {
        println!("{worker}: draining");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: the coordinator knows no worker `{worker}` (see `callq status`)");
        Ok(ExitCode::from(1))
    }
}

/// `callq drain WORKER`: whether the coordinator knew the worker.
async fn drain(settings: &Settings, worker: &str) -> anyhow::Result<bool> {
    let broker = connect(settings, "drain").await?;
    let admin = Admin::connect(broker, settings.patience()).await?;
    admin
        .drain(worker)
        .await
        .context("asking the coordinator (is one running, and does it hold the same cluster key as this command: CALLQ_CLUSTER_KEY_FILE?)")
}
