//! `callq replay FILE --into SERVICES [--kill-..]`: runs the calls of a
//! capture file through built-in services in this process and compares the
//! replies, with crashes injected if asked.

use std::io::BufRead;

use anyhow::Context as _;
use callq_node::replay::{ReplayOptions, Verdict};
use callq_node::services;
use callq_testkit::crashes::{CrashMode, CrashOptions, replay_with_crashes};
use callq_testkit::replay::replay_into;

/// `--into`: where the calls run and what is done to them.
#[derive(Debug, Clone, PartialEq)]
pub struct IntoArgs {
    /// Built-in services to run the calls through.
    pub services: Vec<String>,
    /// Where workers are killed, if they are.
    pub mode: Option<CrashMode>,
    /// Workers, with a crash mode.
    pub workers: usize,
    /// JSON pointers left out of the comparison.
    pub ignore: Vec<String>,
    /// Skip lines that cannot be read.
    pub skip_bad: bool,
}

/// Replays `input` into built-in services; returns the report, a line per
/// failure and a summary, and whether every call passed.
pub async fn into_services(input: impl BufRead, args: &IntoArgs) -> anyhow::Result<(String, bool)> {
    let services = args
        .services
        .iter()
        .map(|name| {
            services::by_name(name).with_context(|| {
                format!(
                    "no built-in service `{name}` (built in: {})",
                    services::BUILT_IN.join(", ")
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut out = String::new();
    let passed = match args.mode {
        Some(mode) => {
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
            for e in &report.skipped {
                out.push_str(&format!("skipped {e}\n"));
            }
            for f in &failures {
                out.push_str(&format!("{f}\n"));
            }
            out.push_str(&format!("{}\n", report.summary()));
            failures.is_empty()
        }
        None => {
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
            failures.is_empty()
        }
    };
    Ok((out, passed))
}
