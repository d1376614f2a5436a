//! The node agent: starts its workers, restarts a crashed one under a new
//! id, keeps the standby count the coordinator asks for, and restarts
//! crashed worker processes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use callq_coordinator::MemoryStore;
use callq_node::{
    Admin, Agent, AgentOptions, CallOptions, InProcess, Launcher, Processes, WorkerOptions,
    WorkerSpec,
};
use callq_schemas::Outcome;
use callq_schemas::protocol::{ClusterStatus, WorkerState};
use callq_testkit::{ClusterOptions, LocalCluster};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const BEAT: Duration = Duration::from_millis(250);

fn spec(services: &[&str], standby: bool) -> WorkerSpec {
    WorkerSpec {
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        standby,
        count: 1,
        capacity: 8,
    }
}

/// Polls the coordinator's status (paused time) until `cond` holds.
async fn status_until(
    admin: &Admin,
    what: &str,
    cond: impl Fn(&ClusterStatus) -> bool,
) -> ClusterStatus {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let st = admin.status().await.unwrap();
        if cond(&st) {
            return st;
        }
        assert!(
            Instant::now() < give_up,
            "timed out waiting until {what}: {st:?}"
        );
        tokio::time::sleep(BEAT / 5).await;
    }
}

fn count(st: &ClusterStatus, state: WorkerState) -> usize {
    st.workers.iter().filter(|w| w.state == state).count()
}

#[tokio::test(start_paused = true)]
async fn the_agent_restarts_a_crashed_worker_and_restores_the_standby_count() {
    let opts = ClusterOptions {
        standby_per_service: [("echo".to_owned(), 1)].into_iter().collect(),
        ..ClusterOptions::default()
    };
    let c = LocalCluster::start(opts, MemoryStore::default())
        .await
        .unwrap();
    let launcher = Arc::new(InProcess::new(c.broker.clone(), WorkerOptions::default()));
    let agent = Agent::new(
        AgentOptions {
            agent_id: "node1".into(),
            workers: vec![spec(&["echo"], false)],
            ..AgentOptions::default()
        },
        c.broker.clone(),
        launcher.clone(),
    );
    let stats = agent.stats();
    let stop = CancellationToken::new();
    let agent_task = tokio::spawn(agent.run(stop.clone()));
    let admin = c.admin().await.unwrap();

    // The configured worker registers; the coordinator, finding no standby
    // for the reserved service, asks the agent for one.
    let st = status_until(&admin, "a worker and a standby run", |st| {
        count(st, WorkerState::Active) == 1 && count(st, WorkerState::Standby) == 1
    })
    .await;
    assert_eq!(st.agents, vec!["node1".to_owned()]);
    assert_eq!(stats.standbys_started.load(Ordering::Relaxed), 1);
    let active = st
        .workers
        .iter()
        .find(|w| w.state == WorkerState::Active)
        .unwrap()
        .worker_id
        .clone();
    assert_eq!(active, "node1.w1.1");

    // The active worker crashes: the standby is promoted, the agent restarts
    // the crashed worker under a new id, and the coordinator asks for a new
    // standby.
    assert!(launcher.kill(&active));
    let st = status_until(&admin, "two active and a new standby", |st| {
        count(st, WorkerState::Active) == 2
            && count(st, WorkerState::Standby) == 1
            && st.workers.iter().all(|w| w.worker_id != active)
    })
    .await;
    assert!(
        st.workers.iter().any(|w| w.worker_id == "node1.w1.2"),
        "{st:?}"
    );
    assert_eq!((st.deaths, st.promotions), (1, 1));
    assert_eq!(stats.restarted.load(Ordering::Relaxed), 1);
    assert_eq!(stats.standbys_started.load(Ordering::Relaxed), 2);

    // The cluster serves.
    let client = c.client().await.unwrap();
    let r = client
        .call("echo", "echo", json!("hi"), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Ok);

    // Stopping the agent drains its workers; they and the agent leave.
    stop.cancel();
    agent_task.await.unwrap().unwrap();
    let st = status_until(&admin, "everyone left", |st| {
        st.workers.is_empty() && st.agents.is_empty()
    })
    .await;
    assert_eq!(st.deaths, 1, "drained workers are not dead ones");
    assert!(launcher.running().is_empty());
}

#[tokio::test]
async fn crashed_worker_processes_are_restarted_with_backoff() {
    // A "worker" program that crashes at once, as a process would on a bad
    // deployment: the agent keeps restarting it, waiting longer each time.
    let launcher: Arc<dyn Launcher> = Arc::new(Processes::new(
        "sh",
        vec!["-c".into(), "exit 3".into(), "sh".into()],
    ));
    let c = LocalCluster::start(ClusterOptions::default(), MemoryStore::default())
        .await
        .unwrap();
    let agent = Agent::new(
        AgentOptions {
            agent_id: "node2".into(),
            workers: vec![spec(&["echo"], false)],
            restart_backoff: Duration::from_millis(20),
            ..AgentOptions::default()
        },
        c.broker.clone(),
        launcher,
    );
    let stats = agent.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    let start = std::time::Instant::now();
    while stats.restarted.load(Ordering::Relaxed) < 4 {
        assert!(start.elapsed() < Duration::from_secs(20), "not restarted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 20 + 40 + 80 ms of backoff at least before the fourth restart.
    assert!(start.elapsed() >= Duration::from_millis(140));
    assert!(stats.launched.load(Ordering::Relaxed) >= 4);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_worker_process_is_stopped_gracefully_with_the_agent() {
    // A long-running "worker" that exits cleanly on SIGTERM.
    let launcher: Arc<dyn Launcher> = Arc::new(Processes::new(
        "sh",
        vec![
            "-c".into(),
            "trap 'exit 0' TERM; while :; do sleep 0.05; done".into(),
            "sh".into(),
        ],
    ));
    let c = LocalCluster::start(ClusterOptions::default(), MemoryStore::default())
        .await
        .unwrap();
    let agent = Agent::new(
        AgentOptions {
            agent_id: "node3".into(),
            workers: vec![spec(&["echo"], false)],
            drain_timeout: Duration::from_secs(10),
            ..AgentOptions::default()
        },
        c.broker.clone(),
        launcher,
    );
    let stats = agent.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.launched.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats.restarted.load(Ordering::Relaxed),
        0,
        "it did not crash"
    );
    let t = std::time::Instant::now();
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the worker drained on SIGTERM"
    );
    assert_eq!(stats.restarted.load(Ordering::Relaxed), 0);
}
