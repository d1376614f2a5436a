//! `callq demo` as a user runs it: the binary, its account of the kill, its
//! exit code.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

#[test]
fn the_demo_kills_a_worker_and_accounts_for_every_call() {
    let out = Command::new(env!("CARGO_BIN_EXE_callq"))
        .args([
            "demo",
            "--calls",
            "3000",
            "--concurrency",
            "96",
            "--kill-at-ms",
            "400",
            "--quiet",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3000 calls in"), "{stdout}");
    assert!(stdout.contains("killed worker-"), "{stdout}");
    assert!(stdout.contains("contract held"), "{stdout}");
    assert!(!stdout.contains("VIOLATION"), "{stdout}");
    assert!(stdout.contains("failover pause"), "{stdout}");
    // Throughput and round trip: the median is at least the call's own work
    // (50 ms) and the percentiles are ordered.
    let rt = stdout
        .lines()
        .find(|l| l.contains("calls/s; round trip"))
        .unwrap_or_else(|| panic!("no throughput line: {stdout}"));
    let figure = |key: &str| -> f64 {
        rt.split(key)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (p50, p99, max) = (figure("p50 "), figure("p99 "), figure("max "));
    assert!(p50 >= 50.0 && p50 <= p99 && p99 <= max, "{rt}");
    assert!(
        rt.trim_start()
            .split(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0,
        "{rt}"
    );
    assert!(stdout.contains("standbys promoted: 1"), "{stdout}");
    // Outcomes add up to the calls, and only ok and fatal occur.
    let line = stdout
        .lines()
        .find(|l| l.contains("outcomes:"))
        .unwrap()
        .split("outcomes: ")
        .nth(1)
        .unwrap();
    let mut total = 0;
    for part in line.split(", ") {
        let (outcome, n) = part.split_once(' ').unwrap();
        assert!(outcome == "ok" || outcome == "fatal", "{line}");
        total += n.parse::<u64>().unwrap();
    }
    assert_eq!(total, 3000, "{line}");
}

#[test]
fn every_command_has_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_callq"))
        .args(["demo", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--calls"));
    let out = Command::new(env!("CARGO_BIN_EXE_callq"))
        .arg("no-such-command")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand"));
}
