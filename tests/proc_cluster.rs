//! The cluster as separate processes on a real RabbitMQ: `callq
//! coordinator`, `callq worker` and `callq agent` processes, killed with
//! SIGKILL mid-load.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use callq_node::{Admin, Client, ClientOptions};
use callq_schemas::protocol::{ClusterStatus, WorkerState};
use support::{Proc, Vhost, Workers, count, load, wait_status};

/// Standbys for both built-in services, as the tests' coordinators keep.
const STANDBYS: [(&str, &str); 2] = [
    ("CALLQ_COORDINATOR__STANDBY_PER_SERVICE__ECHO", "1"),
    ("CALLQ_COORDINATOR__STANDBY_PER_SERVICE__MAIL", "1"),
];

/// A coordinator, three workers and a standby; 5,000 calls of `echo.sleep`
/// and `mail.send` in flight; two workers killed with SIGKILL mid-load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_killed_mid_load_lose_no_call() {
    let vhost = Vhost::create("kill");
    let dir = support::temp_dir("kill");
    let mut coordinator =
        Proc::spawn_env("coordinator", &["coordinator"], &vhost.url, &dir, &STANDBYS);
    let mut procs = HashMap::new();
    for id in ["w1", "w2", "w3"] {
        procs.insert(id.to_owned(), support::worker(id, &vhost.url, &dir, false));
    }
    procs.insert(
        "s1".to_owned(),
        support::worker("s1", &vhost.url, &dir, true),
    );
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(
        &admin,
        "3 active workers and a standby",
        Duration::from_secs(30),
        |s| count(s, WorkerState::Active) == 3 && count(s, WorkerState::Standby) == 1,
    )
    .await;

    let client = Client::connect(broker.clone(), ClientOptions::default())
        .await
        .unwrap();
    let spec = load(&dir, 5_000, 2);
    // The fleet asks which worker is busiest on a connection of its own,
    // not behind the client's burst of publishes.
    let mut fleet = Workers {
        procs,
        admin: Admin::connect(support::amqp(&vhost.url).await, Duration::from_secs(10))
            .await
            .unwrap(),
        spare: &["s1"],
    };
    let (report, _) = support::survive(&spec, &client, &admin, &mut fleet).await;
    assert!(report.promotions >= 1, "the standby was not promoted");
    let status = admin.status().await.unwrap();
    assert!(
        status
            .workers
            .iter()
            .any(|w| w.worker_id == "s1" && w.state == WorkerState::Active),
        "the standby s1 serves now: {status:#?}"
    );
    assert!(coordinator.running(), "{}", coordinator.log());
    for proc in fleet.procs.values_mut() {
        assert!(proc.running(), "{} died:\n{}", proc.name, proc.log());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The coordinator process killed with SIGKILL mid-load and a new one
/// started on the same store: no decision is lost and the cluster serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_and_restarted_on_its_store_loses_nothing() {
    let vhost = Vhost::create("coord");
    let dir = support::temp_dir("coord");
    let mut first = Proc::spawn("coordinator-1", &["coordinator"], &vhost.url, &dir);
    let (procs, broker, client) = support::two_workers(&vhost, &dir).await;

    // The load runs while the coordinator is killed and a new one starts; a
    // worker is killed too, so that the new coordinator has decisions of
    // the old one to honour (traces granted, calls completed).
    let load = support::load_in_background(load(&dir, 2_000, 1), &client, &broker, procs).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    first.kill9();
    eprintln!("kill -9 coordinator-1");
    let mut second = Proc::spawn("coordinator-2", &["coordinator"], &vhost.url, &dir);
    support::served_on(load, 2_000, &client).await;
    assert!(second.running(), "{}", second.log());
    assert!(
        second.log().contains("call ledger opened"),
        "the second coordinator opened the first one's store:\n{}",
        second.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pid of the process whose command line holds `needle`.
fn pid_of(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some(pid)
        })
}

/// `callq agent` runs worker processes, restarts one killed with SIGKILL,
/// and keeps the standby the coordinator wants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_restarts_a_killed_worker_process() {
    let vhost = Vhost::create("agent");
    let dir = support::temp_dir("agent");
    let _coordinator =
        Proc::spawn_env("coordinator", &["coordinator"], &vhost.url, &dir, &STANDBYS);
    let agent_id = format!("agent-{}", vhost.name);
    let http = support::free_port();
    let http_addr = format!("127.0.0.1:{http}");
    let mut agent = Proc::spawn_env(
        "agent",
        &[
            "agent",
            "--agent-id",
            &agent_id,
            "--services",
            "echo,mail",
            "--count",
            "2",
        ],
        &vhost.url,
        &dir,
        &[("CALLQ_HTTP", http_addr.as_str())],
    );
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    // The agent's two workers, and the standbys the coordinator asked the
    // agent for (one per service).
    let standbys_cover = |s: &ClusterStatus| {
        ["echo", "mail"].iter().all(|service| {
            s.workers
                .iter()
                .any(|w| w.state == WorkerState::Standby && w.services.iter().any(|x| x == service))
        })
    };
    let status = wait_status(
        &admin,
        "the agent's 2 workers and a standby per service",
        Duration::from_secs(30),
        |s| count(s, WorkerState::Active) >= 2 && standbys_cover(s) && s.agents.contains(&agent_id),
    )
    .await;
    let victim = status
        .workers
        .iter()
        .find(|w| w.state == WorkerState::Active)
        .unwrap()
        .worker_id
        .clone();
    let pid = pid_of(&format!("--worker-id {victim} ")).expect("the worker's process");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    eprintln!("kill -9 {victim} (pid {pid})");
    // The agent restarts it under the next incarnation of its id; the
    // coordinator promotes standbys for its services and asks for new ones.
    let stem = victim.rsplit_once('.').unwrap().0.to_owned();
    let status = wait_status(
        &admin,
        "the killed worker restarted, standbys promoted and replaced",
        Duration::from_secs(30),
        |s| {
            !s.workers.iter().any(|w| w.worker_id == victim)
                && s.workers.iter().any(|w| {
                    w.worker_id.starts_with(&format!("{stem}.")) && w.state == WorkerState::Active
                })
                && s.promotions >= 1
                && standbys_cover(s)
        },
    )
    .await;
    eprintln!("{status:#?}");
    let client = Client::connect(broker, ClientOptions::default())
        .await
        .unwrap();
    let reply = client
        .call(
            "echo",
            "echo",
            serde_json::json!({"via": "agent"}),
            callq_node::CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(reply.outcome, callq_schemas::Outcome::Ok, "{reply:?}");
    // The agent's /metrics: the restart, and its workers and standbys
    // running (its workers serve no HTTP of their own).
    let (code, metrics) = support::http_get(http, "/metrics").expect("the agent's /metrics");
    assert_eq!(code, 200, "{metrics}");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}:\n{metrics}"))
    };
    assert_eq!(value("callq_agent_worker_restarts_total"), 1.0, "{metrics}");
    assert!(value("callq_agent_workers_running") >= 2.0, "{metrics}");
    assert!(
        value("callq_agent_workers_started_total") >= 3.0,
        "{metrics}"
    );
    // An agent killed with SIGKILL leaves no worker behind: each sees its
    // stdin pipe close, drains and exits.
    let workers = format!("--worker-id {agent_id}.");
    assert!(pid_of(&workers).is_some(), "the agent's workers run");
    agent.kill9();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while let Some(pid) = pid_of(&workers) {
        assert!(
            std::time::Instant::now() < until,
            "worker process {pid} outlived its agent by 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `callq agent` stopped with SIGTERM while nothing is in flight: its
/// workers drain at once and exit, and so does the agent, in well under
/// the drain timeout (before, each worker's blocked read of its agent's
/// pipe held it until the agent killed it 30 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_stops_at_once_when_nothing_is_in_flight() {
    let vhost = Vhost::create("agentstop");
    let dir = support::temp_dir("agentstop");
    let _coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let agent_id = format!("agent-{}", vhost.name);
    let args = [
        "agent",
        "--agent-id",
        &agent_id,
        "--services",
        "echo",
        "--count",
        "2",
    ];
    let mut agent = Proc::spawn("agent", &args, &vhost.url, &dir);
    let admin = Admin::connect(support::amqp(&vhost.url).await, Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(
        &admin,
        "the agent's 2 workers",
        Duration::from_secs(30),
        |s| count(s, WorkerState::Active) >= 2 && s.agents.contains(&agent_id),
    )
    .await;
    let needle = format!("--worker-id {agent_id}.");
    assert!(pid_of(&needle).is_some(), "the agent's workers run");
    let stopped = std::time::Instant::now();
    agent.terminate();
    let status = agent.wait_exit(Duration::from_secs(20));
    let took = stopped.elapsed();
    eprintln!("the agent stopped {took:?} after SIGTERM: {status:?}");
    assert!(status.is_some_and(|s| s.success()), "{}", agent.log());
    assert!(
        took < Duration::from_secs(5),
        "the agent took {took:?} to stop with nothing in flight:\n{}",
        agent.log()
    );
    assert!(pid_of(&needle).is_none(), "a worker outlived its agent");
}

/// What `callq` says when no one can act: a call to a queue no worker
/// consumes says so at once, and ends `expired` (exit 3) with a hint that
/// no worker serves the service, and a
/// broker URL where nothing listens fails with a hint to start the broker
/// or point `CALLQ_BROKER` at it.
#[test]
fn the_cli_says_what_to_do_when_nobody_answers() {
    let vhost = Vhost::create("hints");
    let out = std::process::Command::new(support::callq_bin())
        .args(["call", "ghost", "x", "--timeout-ms", "1500"])
        .env("CALLQ_BROKER", &vhost.url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("no worker consumes `callq.call.ghost` now"),
        "said at once: {err}"
    );
    assert!(
        err.contains("no worker took the call") && err.contains("`ghost`"),
        "{err}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(support::callq_bin())
        .args(["status"])
        .env(
            "CALLQ_BROKER",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("nothing listens there") && err.contains("CALLQ_BROKER"),
        "{err}"
    );
}
