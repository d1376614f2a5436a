//! `callq cancel CALL_ID`: cancels a call through the coordinator.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use callq_node::Admin;
use callq_schemas::protocol::CancelDecision;

use super::broker::connect;
use super::config::Settings;
use super::exit;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The call's id (its `call_id`, a UUID).
    call_id: callq_schemas::Uuid,
}

/// Asks the coordinator to cancel the call and prints its decision as
/// JSON on stdout, a sentence on stderr. Exits 0 when the call is
/// cancelled, 1 when it left a trace and cannot be, 3 when it had finished
/// already, 4 when the coordinator could not be asked.
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let call_id = args.call_id;
    let decision = match cancel(&Settings::load(config)?, call_id).await {
        Ok(decision) => decision,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(exit::NO_ANSWER));
        }
    };
    println!("{}", serde_json::to_string(&decision)?);
    let (code, said) = match &decision {
        CancelDecision::Cancelled => (
            0,
            "cancelled: no copy of it runs from now on, and its client is answered `cancelled` \
             (unless its attempt had already finished without traces: that outcome stands)"
                .to_owned(),
        ),
        CancelDecision::Refused { traces } => (
            1,
            format!(
                "not cancelled: the call already left traces ({}), so an effect may be \
                 visible; it runs to its end",
                traces.join(", ")
            ),
        ),
        CancelDecision::Finished { outcome } => (
            3,
            match outcome {
                Some(o) => format!("not cancelled: the call already finished `{o}`"),
                None => "not cancelled: the call already finished".to_owned(),
            },
        ),
    };
    eprintln!("{call_id}: {said}");
    Ok(ExitCode::from(code))
}

async fn cancel(
    settings: &Settings,
    call_id: callq_schemas::Uuid,
) -> anyhow::Result<CancelDecision> {
    let broker = connect(settings, "cancel").await?;
    let admin = Admin::connect(broker, settings.patience()).await?;
    admin.cancel(call_id).await.context(
        "asking the coordinator (is one running, and does it hold the same cluster key as this \
         command: CALLQ_CLUSTER_KEY_FILE?)",
    )
}
