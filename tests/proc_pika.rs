//! A client in another language uses the cluster through the wire contract
//! alone: `tests/pika_client.py` (Python, pika) publishes calls straight to
//! `callq.call.echo` on RabbitMQ, with publisher confirms, and reads the
//! replies from a queue of its own, while real `callq coordinator` and
//! `callq worker` processes serve them. Its malformed calls (a missing
//! field, truncated JSON, an unknown `v`, a body that is not JSON) are
//! answered `bad_request` where a `reply_to` can be read, and all of them go
//! to `callq.dead.echo` with a `callq-dead-reason`; the worker survives them
//! and goes on serving (DESIGN.md, "Wire contract (version 1)" and "Bad
//! input").
//!
//! Needs RabbitMQ on 127.0.0.1:5672 and Python with pika (`CALLQ_PYTHON`,
//! default `/usr/bin/python3`); `scripts/services` provides both. Without
//! them the test fails; it never skips.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use callq_broker::{DEAD_REASON_HEADER, Disposition, dead_queue};
use callq_node::{Admin, CallOptions, Client, ClientOptions};
use callq_schemas::Outcome;
use callq_schemas::protocol::WorkerState;
use serde_json::{Value, json};
use support::{Proc, Vhost, amqp, temp_dir, wait_status};

/// Good calls the Python client makes.
const CALLS: usize = 50;
/// Malformed calls it makes that carry a readable `reply_to`.
const ANSWERABLE_BAD: usize = 3;
/// The worker process's id.
const WORKER: &str = "py-w1";
/// How long the Python client waits for its replies, in seconds.
const PY_REPLY_TIMEOUT_S: u64 = 30;
/// How long the Python process may run at all.
const PY_TIMEOUT: Duration = Duration::from_secs(PY_REPLY_TIMEOUT_S + 45);

fn from_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex: {hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// What the processes logged, for failure messages.
fn logs(procs: &[&Proc]) -> String {
    procs
        .iter()
        .map(|p| format!("--- {} log ---\n{}", p.name, p.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Resolves with the name of the first of `procs` to exit. A `std` child
/// gives no signal when it exits, so this looks every 100 ms; it only races
/// a bounded wait, to fail at once, with the logs, when a process dies.
async fn first_exit(procs: &mut [&mut Proc]) -> String {
    loop {
        for p in procs.iter_mut() {
            if !p.running() {
                return p.name.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the Python client against `url`; its exit status, stdout and
/// stderr. Bounded by [`PY_TIMEOUT`]: a hung client is killed and fails the
/// test.
async fn run_python_client(url: &str) -> std::process::Output {
    let python = std::env::var("CALLQ_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pika_client.py");
    let child = Command::new(&python)
        .arg(script)
        .arg(url)
        .args(["--service", "echo"])
        .args(["--calls", &CALLS.to_string()])
        .args(["--timeout", &PY_REPLY_TIMEOUT_S.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {python} ({e}): set CALLQ_PYTHON to a Python 3 with pika \
                 (scripts/services installs python3-pika)"
            )
        });
    let pid = child.id();
    let waited = tokio::time::timeout(
        PY_TIMEOUT,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match waited {
        Ok(joined) => joined.unwrap().unwrap(),
        Err(_) => {
            // Ours, by its id.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("the Python client (pid {pid}) did not finish within {PY_TIMEOUT:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_calls_the_cluster_by_the_wire_contract() {
    let started = Instant::now();
    let vhost = Vhost::create("pika");
    let dir = temp_dir("pika");
    eprintln!("vhost {}, process logs in {}", vhost.name, dir.display());

    // 1. A coordinator and one echo worker, as processes.
    let broker = amqp(&vhost.url).await;
    let mut coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let mut worker = Proc::spawn(
        "worker",
        &["worker", "--services", "echo", "--worker-id", WORKER],
        &vhost.url,
        &dir,
    );
    let admin = Admin::connect(broker.clone(), Duration::from_secs(5))
        .await
        .unwrap();
    // The worker declares `callq.call.echo` before its first heartbeat, so
    // once the coordinator sees it the queue is there to publish to.
    let active = wait_status(
        &admin,
        "worker py-w1 active for echo",
        Duration::from_secs(30),
        |st| {
            st.workers.iter().any(|w| {
                w.worker_id == WORKER
                    && w.state == WorkerState::Active
                    && w.services.iter().any(|s| s == "echo")
            })
        },
    );
    let exited = {
        let mut procs = [&mut coordinator, &mut worker];
        tokio::select! {
            _ = active => None,
            name = first_exit(&mut procs) => Some(name),
        }
    };
    if let Some(name) = exited {
        panic!(
            "`callq {name}` exited while the cluster started\n{}",
            logs(&[&coordinator, &worker])
        );
    }
    let ready_at = started.elapsed();

    // 2. The Python client: good calls, malformed calls, replies checked.
    let out = run_python_client(&vhost.url).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n{}",
        out.status,
        logs(&[&worker, &coordinator])
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("the Python client printed no summary; stderr:\n{stderr}"));
    let summary: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("the Python client's summary is not JSON ({e}): {line}"));
    println!("python client: {summary}");
    assert_eq!(summary["calls"], json!(CALLS), "{summary}");
    assert_eq!(summary["ok"], json!(CALLS), "every good call answered ok");
    assert_eq!(
        summary["bad_request"],
        json!(ANSWERABLE_BAD),
        "every malformed call with a readable reply_to answered bad_request"
    );
    let malformed = summary["malformed"].as_array().unwrap();
    assert_eq!(malformed.len(), ANSWERABLE_BAD + 1, "{summary}");
    for m in malformed {
        match m["call_id"].as_str() {
            // Answered: the reply names the malformed call's own id.
            Some(id) => assert_eq!(m["reply"]["call_id"], json!(id), "{m}"),
            None => assert!(m.get("reply").is_none(), "{m}"),
        }
    }
    let python_done_at = started.elapsed();

    // 3. Every malformed call, answerable or not, is in the dead-letter
    // queue with its reason; nothing else is (the good calls were acked).
    let mut waiting: Vec<(String, Vec<u8>)> = malformed
        .iter()
        .map(|m| {
            (
                m["kind"].as_str().unwrap().to_owned(),
                from_hex(m["hex"].as_str().unwrap()),
            )
        })
        .collect();
    let dead_name = dead_queue("echo");
    let mut dead = broker.consume(&dead_name, 10).await.unwrap();
    // The worker publishes the reply before it moves the call to the
    // dead-letter queue, so a dead letter may trail its reply a little.
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !waiting.is_empty() {
        let next = tokio::time::timeout_at(until, dead.next()).await;
        let delivery = match next {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => panic!("consuming {dead_name}: {e}"),
            Ok(None) => panic!("the consumer of {dead_name} ended"),
            Err(_) => panic!(
                "not dead-lettered within 20 s: {:?}\n{}",
                waiting.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                logs(&[&worker])
            ),
        };
        let Some(i) = waiting.iter().position(|(_, b)| *b == delivery.body[..]) else {
            panic!(
                "an unexpected message in {dead_name}: headers {:?}, body {}",
                delivery.headers,
                String::from_utf8_lossy(&delivery.body)
            );
        };
        let (kind, _) = waiting.swap_remove(i);
        let reason = delivery
            .headers
            .get(DEAD_REASON_HEADER)
            .unwrap_or_else(|| {
                panic!(
                    "dead letter `{kind}` has no {DEAD_REASON_HEADER} header: {:?}",
                    delivery.headers
                )
            })
            .clone();
        println!("dead letter `{kind}`: {DEAD_REASON_HEADER}: {reason}");
        assert!(
            reason.starts_with("bad_request"),
            "dead letter `{kind}`: reason `{reason}`"
        );
        delivery.settle(Disposition::Ack).await.unwrap();
    }
    dead.close().await;

    // 4. The worker survived the bad input and still serves.
    assert!(
        worker.running(),
        "the worker died of bad input\n{}",
        logs(&[&worker])
    );
    assert!(
        coordinator.running(),
        "the coordinator died\n{}",
        logs(&[&coordinator])
    );
    let client = Client::connect(broker.clone(), ClientOptions::default())
        .await
        .unwrap();
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(20)),
        ..CallOptions::default()
    };
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.call("echo", "echo", json!({"after": "bad input"}), opts),
    )
    .await
    .expect("the call after the bad input was not answered within 30 s")
    .unwrap();
    assert_eq!(
        reply.outcome,
        Outcome::Ok,
        "{reply:?}\n{}",
        logs(&[&worker])
    );
    assert_eq!(reply.result, Some(json!({"after": "bad input"})));
    let st = admin.status().await.unwrap();
    assert!(
        st.workers
            .iter()
            .any(|w| w.worker_id == WORKER && w.state == WorkerState::Active),
        "{st:?}"
    );
    assert_eq!(st.deaths, 0, "no worker died: {st:?}");
    assert!(worker.running(), "{}", logs(&[&worker]));

    println!(
        "cluster ready after {ready_at:?}; python client done after {python_done_at:?} \
         (its own run: {} s); all checks done after {:?}",
        summary["seconds"],
        started.elapsed()
    );
}
