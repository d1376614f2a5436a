//! `callq capture --service S`: the calls published to a service's queue
//! and the replies to them, written into a capture file by
//! `callq_testkit::capture` from the tap the configured broker offers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
#[cfg(feature = "kafka")]
use callq_broker_kafka::TapFrom;
use callq_testkit::capture::{CaptureArgs, capture};

use super::broker::{self, TapRange};
use super::config::Settings;

#[derive(clap::Args)]
pub(crate) struct Args {
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
}

/// Captures until the count, the duration or the end of the range.
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let range = parse_range(args.from.as_deref(), args.until.as_deref())?;
    let bounded = range.as_ref().is_some_and(reads_past);
    anyhow::ensure!(
        args.count.is_some() || args.duration_ms.is_some() || bounded,
        "say when to stop: --count N, --duration-ms MS, or (on Kafka) a --from in the past"
    );
    let settings = Settings::load(config)?;
    let mut tap = broker::open_tap(&settings.broker, &args.service, range).await?;
    let kind = settings
        .broker
        .split("://")
        .next()
        .unwrap_or("?")
        .to_owned();
    let what = CaptureArgs {
        service: args.service,
        count: args.count,
        duration: args.duration_ms.map(Duration::from_millis),
        redact: args.redact,
        reply_grace: Duration::from_secs(10),
    };
    if kind.starts_with("amqp") {
        eprintln!("capturing (the firehose tracer must be on: rabbitmqctl trace_on -p VHOST)");
    } else {
        eprintln!("capturing");
    }
    let stats = match &args.out {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            capture(tap.as_mut(), &kind, &what, std::io::BufWriter::new(file)).await?
        }
        None => capture(tap.as_mut(), &kind, &what, std::io::stdout().lock()).await?,
    };
    eprintln!(
        "captured {} calls and {} replies",
        stats.calls, stats.replies
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether a range starts in the past (and so ends by itself).
#[cfg(feature = "kafka")]
fn reads_past(range: &TapRange) -> bool {
    range.from != TapFrom::End
}

#[cfg(not(feature = "kafka"))]
fn reads_past(range: &TapRange) -> bool {
    match *range {}
}

/// Without Kafka there is no topic to read a range of.
#[cfg(not(feature = "kafka"))]
fn parse_range(from: Option<&str>, until: Option<&str>) -> anyhow::Result<Option<TapRange>> {
    anyhow::ensure!(
        from.is_none() && until.is_none(),
        "--from and --until read a range of a Kafka topic: {}",
        broker::WITHOUT_KAFKA
    );
    Ok(None)
}

/// Reads `--from` and `--until`: `None` when neither is given.
#[cfg(feature = "kafka")]
fn parse_range(from: Option<&str>, until: Option<&str>) -> anyhow::Result<Option<TapRange>> {
    let time = |t: &str, what: &str| -> anyhow::Result<i64> {
        let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .with_context(|| {
                format!("{what} takes an RFC 3339 time such as 2026-11-22T10:00:00Z, not `{t}`")
            })?;
        Ok(i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
    };
    let Some(from) = from else {
        anyhow::ensure!(until.is_none(), "--until needs --from");
        return Ok(None);
    };
    let from = match from {
        "end" => TapFrom::End,
        "beginning" => TapFrom::Beginning,
        other => match other.strip_prefix("offset:") {
            Some(n) => TapFrom::Offset(
                n.parse()
                    .with_context(|| format!("--from offset:N takes a whole number, not `{n}`"))?,
            ),
            None => TapFrom::Time(time(other, "--from")?),
        },
    };
    let until_ms = until.map(|u| time(u, "--until")).transpose()?;
    anyhow::ensure!(
        until_ms.is_none() || from != TapFrom::End,
        "--until needs a --from in the past"
    );
    Ok(Some(TapRange { from, until_ms }))
}
