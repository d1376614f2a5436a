//! The Python client package (`clients/python`, `callq_client`) against
//! real `callq coordinator` and `callq worker` processes, on RabbitMQ and
//! on Kafka, through the package's own tests (pytest):
//!
//! 1. its unit tests (envelopes checked against `schemas/json`, replies,
//!    dedupe, errors, URLs), which need no broker;
//! 2. per broker, with a coordinator and one worker: every outcome the
//!    cluster gives (`ok`, a handler's `error`, `bad_request` for a body
//!    that breaks the contract, `expired` from the worker and from the
//!    client's deadline), `call`, `call_async` and `submit`;
//! 3. on RabbitMQ, the broker closes the client's connection with 2,000
//!    calls in flight (`rabbitmqctl close_connection`): the client
//!    connects again and every call ends `ok`, once;
//! 4. `fatal`: the test kills the worker (SIGKILL) after a `mail.send` left
//!    its trace; the reply carries the trace;
//! 5. two fresh workers, 2,000 calls in flight, one worker killed
//!    (SIGKILL) mid-load: every call gets exactly one outcome, `ok` or
//!    `fatal` (its figures are written to a JSON report checked here).
//!
//! The Python is `CALLQ_PYCLIENT_PYTHON`, the venv `scripts/python-client`
//! makes (scripts/test sources it); the tests run the package's sources
//! from this tree (`PYTHONPATH`), with the libraries of that venv. Without
//! it, RabbitMQ (`scripts/services`) or Kafka (`CALLQ_KAFKA_URL`,
//! `scripts/kafka`) the tests fail; they never skip.
//!
//! An ignored test is the benchmark of docs/BENCHMARKS.md ("Python client
//! beside the Rust client"): `cargo test --profile bench --test
//! proc_python_client -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callq_node::{Admin, Client, ClientOptions};
use callq_schemas::protocol::WorkerState;
use serde_json::Value;
use support::{Proc, Vhost, amqp, kafka, kafka_url, temp_dir, wait_status};

/// Calls in flight when a worker is killed.
const CALLS: usize = 2000;

/// The interpreter of the package's venv; the test fails without it.
fn python() -> String {
    let python = std::env::var("CALLQ_PYCLIENT_PYTHON").unwrap_or_default();
    assert!(
        !python.is_empty(),
        "CALLQ_PYCLIENT_PYTHON is not set: run `source scripts/python-client` (scripts/test does), \
         which makes the venv .tools/pyclient with the Python client and its test tools"
    );
    assert!(
        Path::new(&python).is_file(),
        "CALLQ_PYCLIENT_PYTHON={python} does not exist: run `source scripts/python-client` again"
    );
    python
}

/// `clients/python`.
fn package() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python")
}

/// Runs `python args..` in `clients/python` with the package's sources on
/// the path and `env`; its output, once it exited, within `timeout` (a run
/// still going then is killed, and the test fails).
fn run_python(args: &[&str], env: &[(&'static str, String)], timeout: Duration) -> Output {
    let python = python();
    let child = Command::new(&python)
        .args(args)
        .current_dir(package())
        .env("PYTHONPATH", package().join("src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // Ours, by its id; then what it printed, for the message.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let printed = match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(out)) => format!(
                    "--- stdout ---\n{}\n--- stderr ---\n{}",
                    tail(&String::from_utf8_lossy(&out.stdout), 40),
                    tail(&String::from_utf8_lossy(&out.stderr), 60)
                ),
                _ => String::new(),
            };
            panic!("`{python} {args:?}` (pid {pid}) did not finish within {timeout:?}\n{printed}");
        }
    }
}

/// Runs the package's tests `selection` (pytest arguments); fails the test,
/// with pytest's output and the processes' logs, unless they all pass.
async fn pytest(
    what: &str,
    selection: &[&str],
    env: &[(&'static str, String)],
    timeout: Duration,
    procs: &[&Proc],
) {
    let mut args = vec!["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"];
    args.extend_from_slice(selection);
    let started = Instant::now();
    let owned: Vec<(&'static str, String)> = env.to_vec();
    let args_owned: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args_owned.iter().map(String::as_str).collect();
        run_python(&args, &owned, timeout)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let logs: Vec<String> = procs
            .iter()
            .map(|p| {
                format!(
                    "--- {} log (last 40 lines) ---\n{}",
                    p.name,
                    tail(&p.log(), 40)
                )
            })
            .collect();
        panic!(
            "{what}: pytest failed ({}) after {:?}:\n{stdout}\n{stderr}\n{}",
            out.status,
            started.elapsed(),
            logs.join("\n")
        );
    }
    println!(
        "{what}: {} ({:?})",
        stdout.lines().last().unwrap_or_default(),
        started.elapsed()
    );
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A `callq worker` of `echo` and `mail`, running one `echo` call per
/// `concurrency_key` at a time.
fn worker(id: &str, url: &str, dir: &Path, capacity: Option<usize>) -> Proc {
    let mut args = vec!["worker", "--services", "echo,mail", "--worker-id", id];
    let capacity = capacity.map(|c| c.to_string());
    if let Some(c) = &capacity {
        args.extend(["--capacity", c.as_str()]);
    }
    let env = [("CALLQ_WORKER__MAX_RUNNING_PER_KEY__ECHO", "1")];
    Proc::spawn_env(id, &args, url, dir, &env)
}

/// Waits until the coordinator sees every one of `ids` active; fails with
/// the logs when a process exits first.
async fn wait_active(admin: &Admin, ids: &[&str], procs: &mut [&mut Proc]) {
    let what = format!("workers {ids:?} active");
    let ready = wait_status(admin, &what, Duration::from_secs(90), |s| {
        ids.iter().all(|id| {
            s.workers
                .iter()
                .any(|w| w.worker_id == *id && w.state == WorkerState::Active)
        })
    });
    tokio::select! {
        _ = ready => {}
        name = first_exit(procs) => panic!("`callq {name}` exited while {what} was awaited"),
    }
}

async fn first_exit(procs: &mut [&mut Proc]) -> String {
    loop {
        for p in procs.iter_mut() {
            if !p.running() {
                return format!("{}:\n{}", p.name, p.log());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that the test killed `proc` with SIGKILL.
fn killed(proc: &mut Proc) {
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{} still runs: the test did not kill it", proc.name));
    assert_eq!(
        status.signal(),
        Some(9),
        "{} ended otherwise than by SIGKILL ({status})\n{}",
        proc.name,
        proc.log()
    );
}

/// Everything the package's tests do on one cluster: `url` is its broker,
/// `admin` reads its status.
async fn exercise(label: &str, url: &str, admin_broker: Arc<dyn callq_broker::Broker>) {
    let started = Instant::now();
    let dir = temp_dir(&format!("pyclient-{label}"));
    eprintln!("{label}: broker {url}, process logs in {}", dir.display());
    let mut coordinator = Proc::spawn("coordinator", &["coordinator"], url, &dir);
    let mut w1 = worker("py1", url, &dir, None);
    let admin = Admin::connect(admin_broker, Duration::from_secs(30))
        .await
        .unwrap();
    wait_active(&admin, &["py1"], &mut [&mut coordinator, &mut w1]).await;
    let base = vec![
        ("CALLQ_PYCLIENT_URL", url.to_owned()),
        ("CALLQ_PYCLIENT_OUTBOX_DIR", dir.display().to_string()),
        // `callq cancel`, for the `cancelled` outcome.
        (
            "CALLQ_PYCLIENT_CALLQ",
            support::callq_bin().display().to_string(),
        ),
    ];

    // Every outcome, every way of calling.
    pytest(
        &format!("{label}: outcomes"),
        &["tests/test_cluster.py"],
        &base,
        Duration::from_secs(150),
        &[&coordinator, &w1],
    )
    .await;

    // RabbitMQ: the broker closes the client's connection mid-load.
    if label == "rabbitmq" {
        pytest(
            "rabbitmq: the connection closed mid-load",
            &["tests/test_cluster_reconnect.py", "-s"],
            &base,
            Duration::from_secs(150),
            &[&coordinator, &w1],
        )
        .await;
    }

    // fatal: the worker killed after the trace.
    let mut env = base.clone();
    env.push(("CALLQ_PYCLIENT_KILL_PID", w1.pid().to_string()));
    pytest(
        &format!("{label}: fatal"),
        &["tests/test_cluster_kills.py", "-k", "fatal"],
        &env,
        Duration::from_secs(120),
        &[&coordinator, &w1],
    )
    .await;
    killed(&mut w1);

    // 2,000 calls in flight, a worker killed mid-load.
    let mut w2 = worker("py2", url, &dir, None);
    let mut w3 = worker("py3", url, &dir, None);
    wait_active(
        &admin,
        &["py2", "py3"],
        &mut [&mut coordinator, &mut w2, &mut w3],
    )
    .await;
    let report_path = dir.join("load-report.json");
    let mut env = base.clone();
    env.extend([
        ("CALLQ_PYCLIENT_KILL_PID", w2.pid().to_string()),
        ("CALLQ_PYCLIENT_REPORT", report_path.display().to_string()),
        ("CALLQ_PYCLIENT_CALLS", CALLS.to_string()),
    ]);
    pytest(
        &format!("{label}: a worker killed mid-load"),
        &["tests/test_cluster_kills.py", "-k", "load", "-s"],
        &env,
        Duration::from_secs(220),
        &[&coordinator, &w2, &w3],
    )
    .await;
    killed(&mut w2);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap())
        .unwrap_or_else(|e| panic!("the load's report is not JSON: {e}"));
    println!("{label}: load report {report}");
    assert_eq!(report["calls"], CALLS, "{report}");
    assert_eq!(
        report["distinct_call_ids"], CALLS,
        "one outcome per call: {report}"
    );
    assert_eq!(report["delivered"], CALLS, "{report}");
    let ok = report["outcomes"]["ok"].as_u64().unwrap_or(0);
    let fatal = report["outcomes"]["fatal"].as_u64().unwrap_or(0);
    assert_eq!(
        ok + fatal,
        CALLS as u64,
        "outcomes other than ok and fatal: {report}"
    );
    assert!(
        report["in_flight_at_kill"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["killed_pid"], w2.pid(), "{report}");

    // The coordinator saw both workers die; the rest of the cluster lives.
    wait_status(&admin, "two deaths seen", Duration::from_secs(30), |s| {
        s.deaths >= 2
    })
    .await;
    assert!(w3.running(), "py3 died:\n{}", w3.log());
    assert!(coordinator.running(), "{}", coordinator.log());
    println!("{label}: all done in {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_python_clients_unit_tests_pass() {
    let started = Instant::now();
    let out = run_python(
        &[
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not broker",
        ],
        &[],
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python client's unit tests failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "{} ({:?})",
        stdout.lines().last().unwrap_or_default(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_on_rabbitmq() {
    python();
    let vhost = Vhost::create("pyclient");
    let broker = amqp(&vhost.url).await;
    exercise("rabbitmq", &vhost.url, broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_on_kafka() {
    python();
    let url = kafka_url("pyc", 4);
    let broker = kafka(&url).await;
    exercise("kafka", &url, broker).await;
}

// ---------------------------------------------------------------------------
// The benchmark (ignored: run on purpose, with optimizations).

/// Calls in flight in the benchmark, for both clients.
const BENCH_IN_FLIGHT: usize = 256;

/// The Python client's share of the Rust client's calls/s the benchmark
/// asks for.
const BENCH_TARGET: f64 = 0.5;

/// One client's run: calls/s and latency p50 and p99, in ms.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    p50: f64,
    p99: f64,
}

async fn rust_run(client: &Client, calls: usize) -> Run {
    let spec = callq_testkit::load::LoadSpec {
        service: "echo".into(),
        method: "echo".into(),
        args: serde_json::json!({"n": 1}),
        calls,
        concurrency: BENCH_IN_FLIGHT,
        timeout: Duration::from_secs(120),
        progress: false,
    };
    let report = callq_testkit::load::run(client, &spec).await;
    assert_eq!(report.failed, 0, "{}", report.summary());
    assert_eq!(
        report.count(callq_schemas::Outcome::Ok),
        calls as u64,
        "{}",
        report.summary()
    );
    Run {
        rate: report.rate(),
        p50: report.percentile_ms(0.5),
        p99: report.percentile_ms(0.99),
    }
}

async fn python_run(url: &str, calls: usize, api: &str) -> Run {
    let args = [
        "bench/bench.py".to_owned(),
        "--api".to_owned(),
        api.to_owned(),
        "--calls".to_owned(),
        calls.to_string(),
        "--in-flight".to_owned(),
        BENCH_IN_FLIGHT.to_string(),
        "--json".to_owned(),
    ];
    let env = [("CALLQ_BROKER", url.to_owned())];
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_python(&args, &env, Duration::from_secs(300))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap();
    let v: Value = serde_json::from_str(line).unwrap();
    Run {
        rate: v["rate"].as_f64().unwrap(),
        p50: v["p50_ms"].as_f64().unwrap(),
        p99: v["p99_ms"].as_f64().unwrap(),
    }
}

fn median(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A coordinator and one worker of capacity [`BENCH_IN_FLIGHT`] on `url`;
/// then rounds of the Rust client's load and the Python client's
/// (`AsyncClient.call_async`), one after the other on the same cluster;
/// prints both and the ratio, then one run of the Python `Client.submit`.
async fn bench_on(label: &str, url: &str, broker: Arc<dyn callq_broker::Broker>, calls: usize) {
    let dir = temp_dir(&format!("pyclient-bench-{label}"));
    let mut coordinator = Proc::spawn("coordinator", &["coordinator"], url, &dir);
    let mut w = worker("bench1", url, &dir, Some(BENCH_IN_FLIGHT));
    let admin = Admin::connect(broker.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    wait_active(&admin, &["bench1"], &mut [&mut coordinator, &mut w]).await;
    let client = Client::connect(
        broker,
        ClientOptions {
            declare_call_queues: false,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    // Warm both up: connections, queues, the worker's first calls.
    rust_run(&client, 1000).await;
    python_run(url, 1000, "async").await;
    let rounds = 3;
    let (mut rust, mut py) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let r = rust_run(&client, calls).await;
        println!(
            "{label} round {round}: Rust   client {:>7.0} calls/s, p50 {:>6.2} ms, p99 {:>6.2} ms",
            r.rate, r.p50, r.p99
        );
        let p = python_run(url, calls, "async").await;
        println!(
            "{label} round {round}: Python client {:>7.0} calls/s, p50 {:>6.2} ms, p99 {:>6.2} ms",
            p.rate, p.p50, p.p99
        );
        rust.push(r);
        py.push(p);
    }
    let (rr, pr) = (median(&rust, |r| r.rate), median(&py, |r| r.rate));
    let ratio = pr / rr;
    println!(
        "{label}: {calls} calls of echo.echo, {BENCH_IN_FLIGHT} in flight, one worker (capacity \
         {BENCH_IN_FLIGHT}), medians of {rounds} rounds"
    );
    println!(
        "{label}:   Rust client   {rr:>7.0} calls/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        median(&rust, |r| r.p50),
        median(&rust, |r| r.p99)
    );
    println!(
        "{label}:   Python client {pr:>7.0} calls/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        median(&py, |r| r.p50),
        median(&py, |r| r.p99)
    );
    println!(
        "{label}:   Python / Rust calls/s = {ratio:.2}x (target >= {BENCH_TARGET}x): {}",
        if ratio >= BENCH_TARGET {
            "PASS"
        } else {
            "MISS"
        }
    );
    // The blocking client's submit() from one thread, for comparison.
    let s = python_run(url, calls, "submit").await;
    println!(
        "{label}:   Python client, Client.submit from a thread: {:.0} calls/s, p50 {:.2} ms, \
         p99 {:.2} ms",
        s.rate, s.p50, s.p99
    );
    assert!(w.running(), "{}", w.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo test --profile bench --test proc_python_client -- --ignored --nocapture"]
async fn bench_python_client_beside_rust_client() {
    python();
    let calls: usize = std::env::var("CALLQ_PYCLIENT_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let vhost = Vhost::create("pyclient-bench");
    let broker = amqp(&vhost.url).await;
    bench_on("rabbitmq", &vhost.url, broker, calls).await;
    let url = kafka_url("pycb", 1);
    let broker = kafka(&url).await;
    bench_on("kafka", &url, broker, calls).await;
}
