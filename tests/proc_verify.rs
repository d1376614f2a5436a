//! `callq verify` against processes on RabbitMQ: three seeds of 2,000
//! calls each under every fault that applies on one machine (kill -9 and
//! SIGSTOP of a worker and of the coordinator, crashes at the four points
//! of a call, a broker restart, a worker cut off the network in a
//! namespace), on the tests' own RabbitMQ node (`scripts/rabbitmq-node`),
//! which the broker restart stops and starts. And verify failing against
//! workers broken on purpose.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::path::Path;
use std::process::Command;

use support::fault_node::FaultVhost;

/// Runs `callq verify args..` on `broker`; its exit code and what it
/// printed.
fn verify(broker: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(support::callq_bin())
        .arg("verify")
        .args(args)
        .env("CALLQ_BROKER", broker)
        .env("CALLQ_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{text}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// The number after `label` in the summary line.
fn figure(summary: &str, label: &str) -> u64 {
    let at = summary
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in `{summary}`"));
    summary[at + label.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn verify_keeps_the_promise_through_every_fault_on_rabbitmq() {
    let mut vhost = FaultVhost::create("verify", "?heartbeat=2");
    let partition = vhost.url_at("{host}");
    let node = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-node");
    let restart = format!("{0} stop_app && {0} start_app", node.to_str().unwrap());
    let dir = support::temp_dir("verify");
    let (code, out) = verify(
        &vhost.url,
        &[
            "--seeds",
            "1,2,3",
            "--calls",
            "2000",
            "--rate",
            "50",
            "--broker-restart",
            &restart,
            "--partition-broker",
            &partition,
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "verify failed:\n{out}");
    let summary = out.lines().find(|l| l.starts_with("verify: ")).unwrap();
    assert_eq!(figure(summary, "seeds"), 3);
    assert_eq!(figure(summary, "failed"), 0);
    assert_eq!(figure(summary, "calls"), 6000);
    assert_eq!(figure(summary, "lost"), 0);
    assert_eq!(figure(summary, "doubled"), 0);
    assert_eq!(figure(summary, "fatal without a granted trace"), 0);
    // Every fault hit calls in flight; every kind and crash point was hit.
    let hits: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("calls in flight:"))
        .collect();
    assert_eq!(hits.len() as u64, figure(summary, "faults"));
    assert_eq!(hits.len(), 3 * 10, "{hits:#?}");
    for hit in &hits {
        let n: u64 = hit
            .split("calls in flight")
            .next()
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 0, "a fault hit an idle cluster: {hit}");
    }
    for kind in [
        "kill-worker",
        "stop-worker",
        "kill-coordinator",
        "stop-coordinator",
        "crash",
        "broker-restart",
        "partition",
    ] {
        assert!(
            hits.iter()
                .any(|h| h.split_whitespace().nth(2) == Some(kind)),
            "no {kind} fault applied: {hits:#?}"
        );
    }
    for point in ["before_handler", "after_trace", "before_reply", "after_ack"] {
        assert!(
            hits.iter()
                .any(|h| h.contains(&format!("crashed at {point}"))),
            "no worker crashed at {point}: {hits:#?}"
        );
    }
}

#[test]
fn verify_fails_against_workers_broken_on_purpose() {
    let vhost = support::Vhost::create("verify-broken");
    let dir = support::temp_dir("verify-broken");
    let common = [
        "--seeds",
        "7",
        "--calls",
        "600",
        "--rate",
        "80",
        "--faults",
        "kill-worker,crash",
        "--mix",
        "echo,mail",
        // Lost calls never end: a short wait for them.
        "--settle-secs",
        "15",
        "--dir",
        dir.to_str().unwrap(),
    ];
    // A worker that acks before it answers loses the calls it held when
    // it dies.
    let (code, out) = verify(
        &vhost.url,
        &[&common[..], &["--broken", "ack-early"]].concat(),
    );
    assert_eq!(
        code,
        Some(1),
        "verify passed a worker that acks early:\n{out}"
    );
    assert!(out.contains("got no outcome: lost"), "{out}");
    let summary = out.lines().find(|l| l.starts_with("verify: ")).unwrap();
    assert!(figure(summary, "lost") > 0, "{summary}");
    assert!(out.contains("FAIL: seeds 7"), "{out}");
    // A worker that runs a mail twice sends it twice.
    let (code, out) = verify(
        &vhost.url,
        &[&common[..], &["--broken", "run-twice"]].concat(),
    );
    assert_eq!(
        code,
        Some(1),
        "verify passed a worker that runs mails twice:\n{out}"
    );
    assert!(out.contains("was sent 2 times"), "{out}");
    let summary = out.lines().find(|l| l.starts_with("verify: ")).unwrap();
    assert!(figure(summary, "doubled") > 0, "{summary}");
}
