//! The command line: its arguments, its logging, and a module per command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod broker;
mod call;
mod cancel;
mod capture;
mod config;
mod coordinator;
mod demo;
mod drain;
pub(crate) mod exit;
mod health;
mod hooks;
mod replay;
mod shutdown;
mod status;
mod telemetry;
mod verify;
mod watch;
mod worker;

#[derive(Parser)]
#[command(
    name = "callq",
    version,
    about = "A worker cluster driven by a message bus"
)]
pub(crate) struct Cli {
    /// A configuration file (TOML); `CALLQ_*` variables override it.
    #[arg(long, global = true, env = "CALLQ_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs an in-process cluster on the embedded broker under load and
    /// prints what happened and the figures.
    Demo(demo::Args),
    /// Runs a coordinator: the registry, the failure detector and the call
    /// ledger. A second one on the same store stands by until the first is
    /// gone.
    Coordinator {},
    /// Runs a worker process serving built-in services (echo, mail).
    Worker(worker::Args),
    /// Runs a node agent that starts worker processes, restarts them when
    /// they die, and starts standbys when the coordinator asks.
    Agent(agent::Args),
    /// Publishes one call, waits, prints the reply as JSON and exits with
    /// its outcome: 0 ok, 1 error, 2 fatal, 3 expired, 5 cancelled (4: no
    /// reply at all; 64: a wrong command line, nothing sent).
    Call(call::Args),
    /// Shows the cluster: workers with state and load, standbys, agents,
    /// and the depth of the call queues (on Kafka, each consumer group's lag).
    Status(status::Args),
    /// Drains one worker: it stops taking calls, finishes those it runs and
    /// leaves.
    Drain(drain::Args),
    /// Cancels a call: one not started never runs, one that runs is revoked
    /// at its next trace, and its client is answered `cancelled`; a call
    /// that left a trace is not cancelled. Exits 0 cancelled, 1 refused
    /// (it left traces), 3 finished already, 4 no answer.
    Cancel(cancel::Args),
    /// Writes the calls published to a service's queue, and the replies to
    /// them, into a capture file (docs/REPLAY.md), without taking them from
    /// the workers. RabbitMQ only: needs the firehose tracer on
    /// (`rabbitmqctl trace_on -p VHOST`).
    Capture(capture::Args),
    /// Publishes the calls of a capture file (docs/REPLAY.md) to a broker
    /// again, each confirmed, keeping their captured timing or at a rate.
    Replay(replay::Args),
    /// Checks the call contract on a real broker under faults: starts a
    /// cluster of its own, drives a seeded mix of calls, kills, pauses,
    /// crashes, restarts and cuts off its processes, then checks every
    /// call and effect and prints a verdict per seed.
    Verify(verify::Args),
}

impl Cli {
    /// Logs to stderr, filtered by `CALLQ_LOG` or else by the command's
    /// default: lines for a person, or with `CALLQ_LOG_FORMAT=json` one
    /// JSON object per line (`timestamp`, `level`, `target`, `message` and
    /// the event's fields, such as `call_id` and `worker`).
    pub(crate) fn init_logging(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_env("CALLQ_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(self.default_filter()));
        let format = std::env::var("CALLQ_LOG_FORMAT").unwrap_or_default();
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match format.trim().to_ascii_lowercase().as_str() {
            "json" => builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .init(),
            other => {
                builder
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .init();
                if !other.is_empty() && other != "text" {
                    tracing::warn!(
                        "CALLQ_LOG_FORMAT={other} is not a log format: `json` or `text`; logging text"
                    );
                }
            }
        }
    }

    fn default_filter(&self) -> &'static str {
        // The demo kills a worker on purpose: its warnings are the story the
        // demo prints itself, so it logs errors only unless asked otherwise.
        match self.command {
            Command::Demo(_) => "error",
            Command::Coordinator {} | Command::Worker(_) | Command::Agent(_) => "info",
            Command::Call(_)
            | Command::Status(_)
            | Command::Drain(_)
            | Command::Cancel(_)
            | Command::Replay(_)
            | Command::Verify(_)
            | Command::Capture(_) => "warn",
        }
    }

    /// Runs the command; its outcome is the process's exit code. With
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` set, its spans are exported (the last
    /// ones before it exits).
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let traces = telemetry::install(self.service_name())?;
        let ran = self.run_command().await;
        traces.finish().await;
        ran
    }

    /// The process's name in its spans, unless `OTEL_SERVICE_NAME` names it.
    fn service_name(&self) -> &'static str {
        match self.command {
            Command::Coordinator {} => "callq-coordinator",
            Command::Worker(_) => "callq-worker",
            Command::Agent(_) => "callq-agent",
            Command::Demo(_) => "callq-demo",
            Command::Call(_) | Command::Replay(_) => "callq-client",
            Command::Status(_)
            | Command::Drain(_)
            | Command::Cancel(_)
            | Command::Capture(_)
            | Command::Verify(_) => "callq",
        }
    }

    async fn run_command(self) -> anyhow::Result<ExitCode> {
        let config = self.config.as_deref();
        match self.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Coordinator {} => coordinator::run(config).await,
            Command::Worker(args) => worker::run(args, config).await,
            Command::Agent(args) => agent::run(args, config).await,
            Command::Call(args) => call::run(args, config).await,
            Command::Status(args) => status::run(args, config).await,
            Command::Drain(args) => drain::run(args, config).await,
            Command::Cancel(args) => cancel::run(args, config).await,
            Command::Capture(args) => capture::run(args, config).await,
            Command::Replay(args) => replay::run(args, config).await,
            Command::Verify(args) => verify::run(args, config).await,
        }
    }
}
