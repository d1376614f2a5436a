//! `callq demo` as a user runs it: the binary, its figures, its exit code.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

#[test]
fn the_demo_serves_every_call_and_prints_its_figures() {
    let out = Command::new(env!("CARGO_BIN_EXE_callq"))
        .args(["demo", "--calls", "3000", "--concurrency", "128", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("outcomes: ok 3000; not published: 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("calls/s") && stdout.contains("p50") && stdout.contains("p99"),
        "{stdout}"
    );
    // Three workers, and every one of them served.
    let served: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("worker-"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(served.len(), 3, "{stdout}");
    assert_eq!(served.iter().sum::<u64>(), 3000);
    assert!(served.iter().all(|n| *n > 0), "{stdout}");
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
