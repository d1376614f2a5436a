//! `callq`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use callq::commands::{self, Settings};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "callq",
    version,
    about = "A worker cluster driven by a message bus"
)]
struct Cli {
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
    /// Runs a coordinator: the registry, the failure detector and the call
    /// ledger. A second one on the same store stands by until the first is
    /// gone.
    Coordinator {},
    /// Runs a worker process serving built-in services (echo, mail).
    Worker {
        /// The services to serve, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        services: Vec<String>,
        /// The worker's id (default: generated).
        #[arg(long)]
        worker_id: Option<String>,
        /// Calls run at once (default: the configured `worker.capacity`).
        #[arg(long)]
        capacity: Option<u16>,
        /// Start as a standby: consume nothing until promoted.
        #[arg(long)]
        standby: bool,
        /// Drain and exit when stdin closes (how a node agent starts its
        /// workers, so that they do not outlive it).
        #[arg(long, hide = true)]
        supervised: bool,
    },
    /// Runs a node agent that starts worker processes, restarts them when
    /// they die, and starts standbys when the coordinator asks.
    Agent {
        /// Services of the workers to keep running, comma-separated.
        #[arg(long, value_delimiter = ',')]
        services: Vec<String>,
        /// Active workers of those services.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Standby workers of those services.
        #[arg(long, default_value_t = 0)]
        standbys: u32,
        /// The agent's id (default: the configured `agent.agent_id`).
        #[arg(long)]
        agent_id: Option<String>,
    },
    /// Publishes one call, waits, prints the reply as JSON and exits with
    /// its outcome: 0 ok, 1 error, 2 fatal, 3 expired (4: no reply at all).
    Call {
        /// The service, e.g. `echo`.
        service: String,
        /// The method, e.g. `echo`.
        method: String,
        /// The arguments, a JSON value.
        #[arg(default_value = "{}")]
        args: String,
        /// Milliseconds to wait for the outcome (the call's deadline).
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Shows the cluster: workers with state and load, standbys, agents,
    /// and the depth of the call queues (on Kafka, each consumer group's lag).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drains one worker: it stops taking calls, finishes those it runs and
    /// leaves.
    Drain {
        /// The worker's id, as `callq status` shows it.
        worker: String,
    },
    /// Writes the calls published to a service's queue, and the replies to
    /// them, into a capture file (docs/REPLAY.md), without taking them from
    /// the workers. RabbitMQ only: needs the firehose tracer on
    /// (`rabbitmqctl trace_on -p VHOST`).
    Capture {
        /// The service whose queue is captured.
        #[arg(long)]
        service: String,
        /// The capture file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stop once this many calls and their replies are captured.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many milliseconds.
        #[arg(long)]
        duration_ms: Option<u64>,
        /// A JSON pointer to replace by "[redacted]" in every body that has
        /// it (repeat for more): `--redact /args/card`.
        #[arg(long)]
        redact: Vec<String>,
        /// On Kafka, where to start reading the service's topic: `end` (the
        /// default: what is published from now on), `beginning`,
        /// `offset:N` (in every partition) or an RFC 3339 time. A start in
        /// the past reads up to where the topic ended when the capture
        /// began, then waits for the replies.
        #[arg(long)]
        from: Option<String>,
        /// On Kafka, with --from: stop at the first call after this RFC 3339
        /// time.
        #[arg(long, requires = "from")]
        until: Option<String>,
    },
    /// Publishes the calls of a capture file (docs/REPLAY.md) to a broker
    /// again, each confirmed, keeping their captured timing or at a rate.
    Replay {
        /// The capture file.
        file: PathBuf,
        /// The broker URL to publish to (default: the configured broker).
        #[arg(long)]
        to: Option<String>,
        /// Calls per second, instead of the captured timing.
        #[arg(long)]
        rate: Option<f64>,
        /// The captured timing this many times faster: `2x`, `0.5x`.
        #[arg(long, default_value = "1x")]
        speed: String,
        /// Give every call a fresh id, so that the cluster does not take it
        /// for the captured one.
        #[arg(long)]
        new_ids: bool,
        /// Skip lines that cannot be read (each is reported) instead of
        /// stopping at the first.
        #[arg(long)]
        skip_bad: bool,
        /// Instead of publishing, run the calls through these built-in
        /// services in this process and compare each reply with the
        /// captured one: `--into echo,mail`.
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["to", "rate", "new_ids"])]
        into: Vec<String>,
        /// With --into: kill the worker of every call that asks for a
        /// trace, before the request (the call is retried transparently).
        #[arg(long, requires = "into", conflicts_with_all = ["kill_after_trace", "kill_before_reply", "kill_random"])]
        kill_before_trace: bool,
        /// With --into: kill the worker of every call granted a trace,
        /// right after the grant (the call ends `fatal`).
        #[arg(long, requires = "into", conflicts_with_all = ["kill_before_reply", "kill_random"])]
        kill_after_trace: bool,
        /// With --into: kill the worker of every call once its handler
        /// returned, before the outcome is sent.
        #[arg(long, requires = "into", conflicts_with = "kill_random")]
        kill_before_reply: bool,
        /// With --into: each call draws from SEED and its id whether and
        /// where its worker dies; the same seed gives the same run.
        #[arg(long, value_name = "SEED", requires = "into")]
        kill_random: Option<u64>,
        /// With a --kill option: workers running at once (each runs one
        /// call at a time).
        #[arg(long, requires = "into", default_value_t = 4)]
        workers: usize,
        /// With --into: a JSON pointer into the reply left out of the
        /// comparison (repeat for more): `--ignore /result/at`.
        #[arg(long, requires = "into")]
        ignore: Vec<String>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // The demo kills a worker on purpose: its warnings are the story the
    // demo prints itself, so it logs errors only unless asked otherwise.
    let default_filter = match cli.command {
        Command::Demo { .. } => "error",
        Command::Coordinator {} | Command::Worker { .. } | Command::Agent { .. } => "info",
        Command::Call { .. }
        | Command::Status { .. }
        | Command::Drain { .. }
        | Command::Replay { .. }
        | Command::Capture { .. } => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CALLQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(async {
        let settings = || Settings::load(cli.config.as_deref());
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
                let opts = callq_testkit::demo::DemoOptions {
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
                let report = callq_testkit::demo::run(&opts).await?;
                let violations = report.violations();
                anyhow::ensure!(
                    violations.is_empty(),
                    "the call contract was broken {} times: see above",
                    violations.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Coordinator {} => {
                commands::coordinator(&settings()?, commands::shutdown_on_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Worker {
                services,
                worker_id,
                capacity,
                standby,
                supervised,
            } => {
                let args = commands::WorkerArgs {
                    services,
                    worker_id,
                    capacity,
                    standby,
                };
                let shutdown = commands::shutdown_on_signal();
                if supervised {
                    commands::stop_when_stdin_closes(shutdown.clone());
                }
                commands::worker(&settings()?, args, shutdown).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Agent {
                services,
                count,
                standbys,
                agent_id,
            } => {
                let args = commands::AgentArgs {
                    services,
                    count,
                    standbys,
                    agent_id,
                    worker_args: cli
                        .config
                        .iter()
                        .flat_map(|c| ["--config".to_string(), c.display().to_string()])
                        .collect(),
                };
                commands::agent(&settings()?, args, commands::shutdown_on_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Call {
                service,
                method,
                args,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms);
                match commands::call(&settings()?, &service, &method, &args, timeout).await {
                    Ok(code) => Ok(ExitCode::from(code)),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        Ok(ExitCode::from(4))
                    }
                }
            }
            Command::Status { json } => {
                let report = commands::status(&settings()?).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", commands::render_status(&report));
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Capture {
                service,
                out,
                count,
                duration_ms,
                redact,
                from,
                until,
            } => {
                let range = callq::capture::parse_range(from.as_deref(), until.as_deref())?;
                let bounded = range.is_some_and(|r| r.from != callq_broker_kafka::TapFrom::End);
                anyhow::ensure!(
                    count.is_some() || duration_ms.is_some() || bounded,
                    "say when to stop: --count N, --duration-ms MS, or (on Kafka) a --from in the past"
                );
                let settings = settings()?;
                let mut tap =
                    callq::capture::open_tap(&settings.broker, &service, range).await?;
                let kind = settings.broker.split("://").next().unwrap_or("?").to_owned();
                let args = callq_testkit::capture::CaptureArgs {
                    service,
                    count,
                    duration: duration_ms.map(Duration::from_millis),
                    redact,
                    reply_grace: Duration::from_secs(10),
                };
                if kind.starts_with("amqp") {
                    eprintln!(
                        "capturing (the firehose tracer must be on: rabbitmqctl trace_on -p VHOST)"
                    );
                } else {
                    eprintln!("capturing");
                }
                let stats = match &out {
                    Some(path) => {
                        let file = std::fs::File::create(path)
                            .with_context(|| format!("creating {}", path.display()))?;
                        callq_testkit::capture::capture(
                            tap.as_mut(),
                            &kind,
                            &args,
                            std::io::BufWriter::new(file),
                        )
                        .await?
                    }
                    None => {
                        callq_testkit::capture::capture(
                            tap.as_mut(),
                            &kind,
                            &args,
                            std::io::stdout().lock(),
                        )
                        .await?
                    }
                };
                eprintln!(
                    "captured {} calls and {} replies",
                    stats.calls, stats.replies
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Replay {
                file,
                to,
                rate,
                speed,
                new_ids,
                skip_bad,
                into,
                kill_before_trace,
                kill_after_trace,
                kill_before_reply,
                kill_random,
                workers,
                ignore,
            } => {
                if !into.is_empty() {
                    use callq_testkit::crashes::CrashMode;
                    let mode = match (
                        kill_before_trace,
                        kill_after_trace,
                        kill_before_reply,
                        kill_random,
                    ) {
                        (true, ..) => Some(CrashMode::BeforeTrace),
                        (_, true, ..) => Some(CrashMode::AfterTrace),
                        (_, _, true, _) => Some(CrashMode::BeforeReply),
                        (.., Some(seed)) => Some(CrashMode::Random { seed }),
                        _ => None,
                    };
                    let input = std::fs::File::open(&file)
                        .with_context(|| format!("opening {}", file.display()))?;
                    let into = callq::replay::IntoArgs {
                        services: into,
                        mode,
                        workers,
                        ignore,
                        skip_bad,
                    };
                    let (text, passed) =
                        callq::replay::into_services(std::io::BufReader::new(input), &into).await?;
                    print!("{text}");
                    return Ok(if passed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    });
                }
                let speed: f64 = speed.trim().trim_end_matches('x').parse().map_err(|_| {
                    anyhow::anyhow!("--speed takes a factor such as 2x, not `{speed}`")
                })?;
                let mut settings = settings()?;
                if let Some(to) = to {
                    settings.broker = to;
                }
                let input = std::fs::File::open(&file)
                    .with_context(|| format!("opening {}", file.display()))?;
                let broker = commands::connect(&settings, "replay").await?;
                let args = callq_testkit::replay::ReplayArgs {
                    rate,
                    speed,
                    new_ids,
                    skip_bad,
                };
                let stats =
                    callq_testkit::replay::replay_onto(std::io::BufReader::new(input), broker, &args)
                        .await?;
                println!(
                    "{} calls published, {} bad lines skipped",
                    stats.published,
                    stats.skipped.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Drain { worker } => {
                if commands::drain(&settings()?, &worker).await? {
                    println!("{worker}: draining");
                    Ok(ExitCode::SUCCESS)
                } else {
                    eprintln!(
                        "error: the coordinator knows no worker `{worker}` (see `callq status`)"
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
    })?;
    Ok(code)
}
