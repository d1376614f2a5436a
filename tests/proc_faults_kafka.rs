//! The coordinator's outages on a Kafka-protocol broker, with processes:
//! away for longer than the workers' patience under traced calls, and away
//! while a worker is killed. (tansu keeps its topics in memory and loses
//! them when it restarts, so the broker itself is not restarted here.)
//!
//! Needs the broker that `CALLQ_KAFKA_URL` names (`scripts/kafka` starts
//! tansu; `scripts/test` does). Without it the tests fail; they never skip.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::dead_queue;
use callq_node::Admin;
use callq_schemas::Call;
use callq_schemas::protocol::{ClusterStatus, WorkerState};
use support::outcomes::{Recorder, check, echo_sleep, mail, publish_in_background};
use support::{Proc, count, kafka, wait_status};

/// Worker settings for these tests: a short patience with the coordinator.
const PATIENCE: [(&str, &str); 1] = [("CALLQ_WORKER__COORDINATOR_PATIENCE", "1500")];

struct Cluster {
    dir: PathBuf,
    url: String,
    coordinator: Proc,
    workers: HashMap<String, Proc>,
}

impl Cluster {
    async fn start(tag: &str) -> Self {
        let url = support::kafka_url(tag, 3);
        let dir = support::temp_dir(tag);
        eprintln!("broker {url}, process logs in {}", dir.display());
        let coordinator = Proc::spawn("coordinator", &["coordinator"], &url, &dir);
        let mut workers = HashMap::new();
        for id in ["k1", "k2", "k3"] {
            let args = ["worker", "--services", "echo,mail", "--worker-id", id];
            workers.insert(
                id.to_owned(),
                Proc::spawn_env(id, &args, &url, &dir, &PATIENCE),
            );
        }
        let cluster = Self {
            dir,
            url,
            coordinator,
            workers,
        };
        let admin = cluster.admin().await;
        wait_status(&admin, "3 active workers", Duration::from_secs(90), |s| {
            count(s, WorkerState::Active) == 3
        })
        .await;
        cluster
    }

    async fn admin(&self) -> Admin {
        Admin::connect(kafka(&self.url).await, Duration::from_secs(30))
            .await
            .unwrap()
    }

    async fn status(&self) -> ClusterStatus {
        wait_status(
            &self.admin().await,
            "a status",
            Duration::from_secs(60),
            |_| true,
        )
        .await
    }

    /// Waits until `n` calls are answered: the load runs.
    async fn warm(recorder: &Recorder, n: usize) {
        let until = tokio::time::Instant::now() + Duration::from_secs(90);
        while recorder.replies().len() < n {
            assert!(
                tokio::time::Instant::now() < until,
                "fewer than {n} calls answered within 90 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn all_alive(&mut self) {
        assert!(self.coordinator.running(), "{}", self.coordinator.log());
        for w in self.workers.values_mut() {
            assert!(w.running(), "{} exited:\n{}", w.name, w.log());
        }
    }
}

/// The coordinator killed for 4.5 s (the workers' patience is 1.5 s) under
/// a load of `mail.send`, each of which asks for a trace: no call ends
/// `fatal`, every one ends `ok` with its mail sent once, and the
/// coordinator dropped the requests that went stale meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_the_coordinator_away_past_the_workers_patience_makes_no_call_fatal() {
    let mut cluster = Cluster::start("kaway").await;
    let recorder = Arc::new(Recorder::start(kafka(&cluster.url).await).await);
    let outbox = cluster.dir.join("mail.outbox");
    let calls: Vec<Call> = (0..300).map(|_| mail(&outbox, 30)).collect();
    let load = publish_in_background(&recorder, calls, Duration::from_millis(5));
    Cluster::warm(&recorder, 50).await;
    let status = cluster.status().await;
    let running: u32 = status.workers.iter().map(|w| w.capacity - w.free).sum();
    assert!(
        running > 0,
        "no traced call in flight at the kill: {status:?}"
    );
    cluster.coordinator.kill9();
    eprintln!("coordinator killed with {running} traced calls running");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    cluster.coordinator = Proc::spawn("coordinator", &["coordinator"], &cluster.url, &cluster.dir);
    let ids = load.await.unwrap();
    recorder.wait_answered(&ids, Duration::from_secs(150)).await;
    let ended = check(&recorder.replies(), &[], &ids, &outbox);
    eprintln!("coordinator away 4.5 s on Kafka: {ended:?}");
    assert_eq!(ended.fatal_mails, 0, "no worker was lost: {ended:?}");
    assert_eq!(ended.by_outcome.get("Ok"), Some(&ids.len()), "{ended:?}");
    let status = cluster.status().await;
    eprintln!("stale requests dropped: {}", status.stale_dropped);
    assert!(
        status.stale_dropped > 0,
        "no stale request was dropped: the outage proved nothing"
    );
    cluster.all_alive();
}

/// The coordinator and a busy worker killed together; the coordinator
/// stays away for 10 s (the delivery limit × the patience is 7.5 s). The
/// killed worker's calls wait for the coordinator on the workers that take
/// its partitions, without using up their delivery limit: every call ends
/// `ok`, none reaches the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_the_coordinator_away_while_a_worker_dies_dead_letters_no_call() {
    let mut cluster = Cluster::start("kawaykill").await;
    let recorder = Arc::new(Recorder::start(kafka(&cluster.url).await).await);
    let calls: Vec<Call> = (0..300).map(|_| echo_sleep(200)).collect();
    let load = publish_in_background(&recorder, calls, Duration::from_millis(5));
    Cluster::warm(&recorder, 30).await;
    let status = cluster.status().await;
    let busiest = status
        .workers
        .iter()
        .max_by_key(|w| w.capacity - w.free)
        .unwrap();
    let in_flight = busiest.capacity - busiest.free;
    assert!(in_flight > 0, "no call in flight on any worker: {status:?}");
    let victim = busiest.worker_id.clone();
    let victim_proc = victim.split('.').next().unwrap().to_owned();
    cluster.coordinator.kill9();
    cluster.workers.get_mut(&victim_proc).unwrap().kill9();
    cluster.workers.remove(&victim_proc);
    eprintln!("coordinator and {victim} killed, {in_flight} calls in flight on {victim}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.coordinator = Proc::spawn("coordinator", &["coordinator"], &cluster.url, &cluster.dir);
    let ids = load.await.unwrap();
    recorder.wait_answered(&ids, Duration::from_secs(150)).await;
    let ended = check(&recorder.replies(), &ids, &[], &cluster.dir.join("none"));
    eprintln!("coordinator away 10 s on Kafka with {victim} killed: {ended:?}");
    assert_eq!(ended.by_outcome.get("Ok"), Some(&ids.len()), "{ended:?}");
    let dead = recorder.broker.depth(&dead_queue("echo")).await.unwrap();
    assert_eq!(dead.ready, 0, "calls reached the dead-letter topic");
    cluster.all_alive();
}
