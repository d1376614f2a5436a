//! `callq replay FILE --to URL`: publishes the calls of a capture file to a
//! broker again (`callq_testkit::replay::replay_onto`). `callq replay FILE
//! --into SERVICES [--kill-..]`: runs them through built-in services in
//! this process instead and compares the replies, with crashes injected if
//! asked.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use callq_node::replay::{ReplayOptions, Verdict};
use callq_node::{Service, services};
use callq_testkit::crashes::{CrashMode, CrashOptions, replay_with_crashes};
use callq_testkit::replay::{ReplayArgs, replay_into, replay_onto};

use super::broker;
use super::config::Settings;

#[derive(clap::Args)]
pub(crate) struct Args {
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
}

/// Replays onto a broker, or into built-in services (exit code 1 when a
/// call did not pass).
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    if args.into.is_empty() {
        onto(args, config).await
    } else {
        into(args).await
    }
}

/// `--to`: publishes every call, confirmed.
async fn onto(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let speed = &args.speed;
    let speed: f64 = speed
        .trim()
        .trim_end_matches('x')
        .parse()
        .map_err(|_| anyhow::anyhow!("--speed takes a factor such as 2x, not `{speed}`"))?;
    let mut settings = Settings::load(config)?;
    if let Some(to) = args.to {
        settings.broker = to;
    }
    let input = open(&args.file)?;
    let broker = broker::connect(&settings, "replay").await?;
    let replay = ReplayArgs {
        rate: args.rate,
        speed,
        new_ids: args.new_ids,
        skip_bad: args.skip_bad,
    };
    let stats = replay_onto(input, broker, &replay).await?;
    println!(
        "{} calls published, {} bad lines skipped",
        stats.published,
        stats.skipped.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `--into`: runs the calls here, prints a line per failure and a summary.
async fn into(args: Args) -> anyhow::Result<ExitCode> {
    let mode = match (
        args.kill_before_trace,
        args.kill_after_trace,
        args.kill_before_reply,
        args.kill_random,
    ) {
        (true, ..) => Some(CrashMode::BeforeTrace),
        (_, true, ..) => Some(CrashMode::AfterTrace),
        (_, _, true, _) => Some(CrashMode::BeforeReply),
        (.., Some(seed)) => Some(CrashMode::Random { seed }),
        _ => None,
    };
    let input = open(&args.file)?;
    let services = built_in(&args.into)?;
    let (text, passed) = match mode {
        Some(mode) => with_crashes(services, input, mode, &args).await?,
        None => compared(services, input, &args).await?,
    };
    print!("{text}");
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn open(file: &Path) -> anyhow::Result<BufReader<File>> {
    let input = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    Ok(BufReader::new(input))
}

/// The built-in services of these names.
fn built_in(names: &[String]) -> anyhow::Result<Vec<Service>> {
    names
        .iter()
        .map(|name| {
            services::by_name(name).with_context(|| {
                format!(
                    "no built-in service `{name}` (built in: {})",
                    services::BUILT_IN.join(", ")
                )
            })
        })
        .collect()
}

/// Runs the calls on an in-process cluster whose workers are killed where
/// `mode` says; the report, and whether every call passed.
async fn with_crashes(
    services: Vec<Service>,
    input: impl BufRead,
    mode: CrashMode,
    args: &Args,
) -> anyhow::Result<(String, bool)> {
    let report = replay_with_crashes(
        services,
        input,
        CrashOptions {
            mode,
            workers: args.workers,
            ignore: args.ignore.clone(),
            skip_bad: args.skip_bad,
            ..CrashOptions::default()
        },
    )
    .await?;
    let failures: Vec<String> = report
        .violations()
        .into_iter()
        .chain(report.differences())
        .collect();
    let mut out = String::new();
    for e in &report.skipped {
        out.push_str(&format!("skipped {e}\n"));
    }
    for f in &failures {
        out.push_str(&format!("{f}\n"));
    }
    out.push_str(&format!("{}\n", report.summary()));
    Ok((out, failures.is_empty()))
}

/// Runs the calls through `services` and compares each reply with the
/// captured one; the report, and whether every call passed.
async fn compared(
    services: Vec<Service>,
    input: impl BufRead,
    args: &Args,
) -> anyhow::Result<(String, bool)> {
    let report = replay_into(
        services,
        input,
        ReplayOptions {
            ignore: args.ignore.clone(),
            skip_bad: args.skip_bad,
            ..ReplayOptions::default()
        },
    )
    .await?;
    let mut out = String::new();
    for e in &report.skipped {
        out.push_str(&format!("skipped {e}\n"));
    }
    let failures = report.failures();
    for f in &failures {
        out.push_str(&format!("{f}\n"));
    }
    let same = report
        .calls
        .iter()
        .filter(|c| c.verdict == Verdict::Same)
        .count();
    out.push_str(&format!(
        "{} calls replayed: {same} gave the captured reply, {} did not\n",
        report.calls.len(),
        failures.len()
    ));
    Ok((out, failures.is_empty()))
}
