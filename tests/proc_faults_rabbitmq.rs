//! The promise when the infrastructure fails, with processes on a RabbitMQ
//! node of the tests' own (`scripts/rabbitmq-node`, which scripts/services
//! starts): the broker restarted under load, the coordinator away for longer
//! than the workers' patience, the coordinator away while a worker dies, a
//! call whose every delivery died with its worker, and a worker paused past
//! the AMQP heartbeat.
//!
//! Calls are published and their replies read by a recorder of the test's
//! own that outlives broker restarts (it publishes with confirms and
//! retries, and reads its reply queue again after each loss), so that every
//! reply any process ever sent is counted.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{call_queue, dead_queue, lost_queue};
use callq_node::Admin;
use callq_schemas::protocol::{ClusterStatus, WorkerState};
use callq_schemas::{Call, Outcome, codes};
use support::fault_node::FaultVhost;
use support::outcomes::{
    Recorder, check, echo_sleep, mail, mixed, publish_in_background, serves_again, sort_mixed,
};
use support::{Proc, free_port, http_get, wait_status};
use tokio::time::Instant;
use uuid::Uuid;

/// Worker settings for these tests: a short patience with the coordinator,
/// so that outages longer than it take seconds, not minutes.
const PATIENCE: [(&str, &str); 1] = [("CALLQ_WORKER__COORDINATOR_PATIENCE", "1500")];

struct Cluster {
    dir: PathBuf,
    url: String,
    coordinator: Proc,
    workers: HashMap<String, Proc>,
    admin: Admin,
}

impl Cluster {
    async fn start(vhost: &FaultVhost, tag: &str, workers: &[&str]) -> Self {
        let dir = support::temp_dir(tag);
        let coordinator = coordinator(&vhost.url, &dir);
        let mut procs = HashMap::new();
        for id in workers {
            let args = ["worker", "--services", "echo,mail", "--worker-id", id];
            procs.insert(
                (*id).to_owned(),
                Proc::spawn_env(id, &args, &vhost.url, &dir, &PATIENCE),
            );
        }
        let admin = Admin::connect(support::amqp(&vhost.url).await, Duration::from_secs(10))
            .await
            .unwrap();
        let n = workers.len();
        wait_status(
            &admin,
            "every worker active",
            Duration::from_secs(60),
            |s| support::count(s, WorkerState::Active) == n,
        )
        .await;
        Self {
            dir,
            url: vhost.url.clone(),
            coordinator,
            workers: procs,
            admin,
        }
    }

    fn outbox(&self) -> PathBuf {
        self.dir.join("mail.outbox")
    }

    /// Every process the test started still runs.
    fn all_alive(&mut self) {
        assert!(
            self.coordinator.running(),
            "the coordinator exited:\n{}",
            self.coordinator.log()
        );
        for w in self.workers.values_mut() {
            assert!(w.running(), "{} exited:\n{}", w.name, w.log());
        }
    }

    /// The coordinator's status, asked on a connection of its own (the
    /// cluster's admin link does not outlive a broker restart).
    async fn status(&self) -> ClusterStatus {
        let admin = Admin::connect(support::amqp(&self.url).await, Duration::from_secs(10))
            .await
            .unwrap();
        wait_status(&admin, "a status", Duration::from_secs(60), |_| true).await
    }
}

fn coordinator(url: &str, dir: &Path) -> Proc {
    Proc::spawn("coordinator", &["coordinator"], url, dir)
}

/// RabbitMQ is stopped and started under a load of `echo.sleep` and
/// `mail.send`: first the application in its node (`stop_app`, `start_app`),
/// then the whole node process. Every confirmed call ends with exactly one
/// outcome, no mail is sent twice, `fatal` only where `mail.sent` was
/// granted; the coordinator and the workers serve again on their own
/// within seconds of the broker's return, and a traced call after it ends
/// `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_load_ends_every_call_once_and_the_cluster_serves_on() {
    let vhost = FaultVhost::create("restart", "");
    let mut cluster = Cluster::start(&vhost, "restart", &["w1", "w2", "w3"]).await;
    let recorder = Arc::new(Recorder::start(support::amqp(&vhost.url).await).await);
    let outbox = cluster.outbox();
    let (mut echo, mut mails) = (Vec::new(), Vec::new());
    for (phase, (stop, start)) in [("stop_app", "start_app"), ("stop", "start")]
        .into_iter()
        .enumerate()
    {
        let calls = mixed(&outbox, 300);
        let load = publish_in_background(&recorder, calls, Duration::from_millis(5));
        // The fault hits work in progress: calls published, some answered,
        // some running.
        let until = Instant::now() + Duration::from_secs(60);
        while recorder.replies().len() < 100 * (phase * 3 + 1) {
            assert!(Instant::now() < until, "no load before the restart");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = cluster.status().await;
        let running: u32 = status.workers.iter().map(|w| w.capacity - w.free).sum();
        eprintln!("phase {stop}/{start}: {running} calls running at the restart");
        vhost.node.script(stop);
        tokio::time::sleep(Duration::from_secs(3)).await;
        vhost.node.script(start);
        let back = Instant::now();
        let ids = load.await.unwrap();
        // Serving again: a new call answered soon after the broker's return.
        serves_again(
            &recorder,
            &format!("phase {stop}/{start}"),
            back,
            Duration::from_secs(30),
        )
        .await;
        sort_mixed(ids, &mut echo, &mut mails);
    }
    // A traced call after it all ends ok.
    let (reply, _) = recorder
        .call_after(mail(&outbox, 0), Duration::from_secs(60))
        .await;
    assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    mails.push(reply.call_id);
    let all: Vec<Uuid> = echo.iter().chain(&mails).copied().collect();
    recorder.wait_answered(&all, Duration::from_secs(120)).await;
    let ended = check(&recorder.replies(), &echo, &mails, &outbox);
    eprintln!("after two broker restarts: {ended:?}");
    cluster.all_alive();
}

/// The coordinator is killed while workers wait for its trace grants, and
/// stays away for three times the workers' patience. No worker is lost, so
/// no call may end `fatal`: the trace requests the workers gave up on are
/// dropped as stale when a coordinator reads them (the counter shows it),
/// the workers return those calls without using up their delivery limit,
/// and every call ends `ok` once a coordinator is back, its mail sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_away_past_the_workers_patience_makes_no_call_fatal() {
    let vhost = FaultVhost::create("away", "");
    let mut cluster = Cluster::start(&vhost, "away", &["w1", "w2", "w3"]).await;
    let recorder = Arc::new(Recorder::start(support::amqp(&vhost.url).await).await);
    let outbox = cluster.outbox();
    let calls: Vec<Call> = (0..600).map(|_| mail(&outbox, 30)).collect();
    let load = publish_in_background(&recorder, calls, Duration::from_millis(3));
    while recorder.replies().len() < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = cluster.status().await;
    let running: u32 = status.workers.iter().map(|w| w.capacity - w.free).sum();
    assert!(
        running > 0,
        "no traced call in flight at the kill: {status:?}"
    );
    cluster.coordinator.kill9();
    let answered_at_kill = recorder.replies().len();
    eprintln!(
        "coordinator killed with {running} traced calls running, {answered_at_kill} answered"
    );
    tokio::time::sleep(Duration::from_millis(4500)).await;
    cluster.coordinator = coordinator(&cluster.url, &cluster.dir);
    let ids = load.await.unwrap();
    recorder.wait_answered(&ids, Duration::from_secs(120)).await;
    let ended = check(&recorder.replies(), &[], &ids, &outbox);
    eprintln!("coordinator away 4.5 s: {ended:?}");
    assert_eq!(ended.fatal_mails, 0, "no worker was lost: {ended:?}");
    assert_eq!(ended.by_outcome.get("Ok"), Some(&ids.len()));
    let status = cluster.status().await;
    eprintln!("stale requests dropped: {}", status.stale_dropped);
    assert!(
        status.stale_dropped > 0,
        "no stale request was dropped: the outage proved nothing"
    );
    cluster.all_alive();
}

/// The coordinator is away while a worker is killed with calls in flight,
/// longer than the delivery limit times the workers' patience: the killed
/// worker's calls wait for the coordinator on the other workers without
/// using up their delivery limit; none reaches the dead-letter queue, and
/// every one is answered `ok` once a coordinator is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_away_while_a_worker_dies_dead_letters_no_call() {
    let vhost = FaultVhost::create("away-kill", "");
    let mut cluster = Cluster::start(&vhost, "away-kill", &["w1", "w2", "w3"]).await;
    let recorder = Arc::new(Recorder::start(support::amqp(&vhost.url).await).await);
    let calls: Vec<Call> = (0..400).map(|_| echo_sleep(200)).collect();
    let load = publish_in_background(&recorder, calls, Duration::from_millis(3));
    while recorder.replies().len() < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = cluster.status().await;
    let busiest = status
        .workers
        .iter()
        .max_by_key(|w| w.capacity - w.free)
        .unwrap();
    let in_flight = busiest.capacity - busiest.free;
    assert!(in_flight > 0, "no call in flight on any worker: {status:?}");
    let victim = busiest.worker_id.clone();
    cluster.coordinator.kill9();
    cluster.workers.get_mut(&victim).unwrap().kill9();
    cluster.workers.remove(&victim);
    eprintln!("coordinator and {victim} killed, {in_flight} calls in flight on {victim}");
    // Delivery limit (5) x patience (1.5 s) = 7.5 s; away for 10 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.coordinator = coordinator(&cluster.url, &cluster.dir);
    let ids = load.await.unwrap();
    recorder.wait_answered(&ids, Duration::from_secs(120)).await;
    let ended = check(&recorder.replies(), &ids, &[], &cluster.outbox());
    eprintln!("coordinator away 10 s with {victim} killed: {ended:?}");
    assert_eq!(ended.by_outcome.get("Ok"), Some(&ids.len()), "{ended:?}");
    let dead = recorder.broker.depth(&dead_queue("echo")).await.unwrap();
    assert_eq!(dead.ready, 0, "calls reached the dead-letter queue");
    cluster.all_alive();
}

/// A call whose every delivery dies with its worker, the last one while
/// its worker waits for an absent coordinator: RabbitMQ moves it past its
/// `x-delivery-limit` by itself, with nobody having judged it. It goes to
/// `callq.lost.echo`, not silently to the dead-letter queue; once a
/// coordinator and a worker are back, its client gets an `error`
/// (`delivery_limit`) and the call lands in `callq.dead.echo`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_last_delivery_dies_with_its_worker_is_answered() {
    let vhost = FaultVhost::create("lost", "");
    let dir = support::temp_dir("lost");
    let recorder = Recorder::start(support::amqp(&vhost.url).await).await;
    let depth = |queue: String| {
        let broker = recorder.broker.clone();
        async move { broker.depth(&queue).await.unwrap().ready }
    };
    // No coordinator: a redelivery waits for `resume` (60 s of patience),
    // the first delivery sleeps in its handler; either way its worker
    // holds it until it is killed.
    let patient = [("CALLQ_WORKER__COORDINATOR_PATIENCE", "60000")];
    let id = recorder.publish(echo_sleep(60_000)).await;
    let limit = callq_broker::DEFAULT_DELIVERY_LIMIT;
    for n in 0..=limit {
        let name = format!("w{n}");
        let args = ["worker", "--services", "echo", "--worker-id", &name];
        let mut worker = Proc::spawn_env(&name, &args, &vhost.url, &dir, &patient);
        let until = Instant::now() + Duration::from_secs(60);
        while depth(call_queue("echo")).await > 0 {
            assert!(Instant::now() < until, "{name} never took the call");
            assert!(worker.running(), "{name} exited:\n{}", worker.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worker.kill9();
        // Back in its queue, or past the limit in the lost queue.
        let until = Instant::now() + Duration::from_secs(30);
        while depth(call_queue("echo")).await + depth(lost_queue("echo")).await == 0 {
            assert!(
                Instant::now() < until,
                "the call did not come back after {name}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(depth(call_queue("echo")).await, 0);
    assert_eq!(
        depth(lost_queue("echo")).await,
        1,
        "the broker did not move the call past its limit"
    );
    assert_eq!(depth(dead_queue("echo")).await, 0);
    assert!(recorder.replies().is_empty(), "{:?}", recorder.replies());

    let _coordinator = coordinator(&vhost.url, &dir);
    let args = ["worker", "--services", "echo", "--worker-id", "answerer"];
    let _worker = Proc::spawn("answerer", &args, &vhost.url, &dir);
    recorder.wait_answered(&[id], Duration::from_secs(60)).await;
    let replies = recorder.replies()[&id].clone();
    eprintln!("the lost call's replies: {replies:?}");
    for reply in &replies {
        assert_eq!(reply.outcome, Outcome::Error, "{reply:?}");
        let error = reply.error.as_ref().unwrap();
        assert_eq!(error.code, codes::DELIVERY_LIMIT, "{reply:?}");
    }
    let until = Instant::now() + Duration::from_secs(30);
    while depth(dead_queue("echo")).await == 0 {
        assert!(
            Instant::now() < until,
            "the call never reached the dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth(lost_queue("echo")).await, 0);
}

/// A worker stopped with SIGSTOP past the AMQP heartbeat (2 s here) loses
/// its connection; once it wakes it gives up what it waited for at once
/// and serves again on a new connection within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_the_heartbeat_reconnects_soon_after_waking() {
    let vhost = FaultVhost::create("pause", "?heartbeat=2");
    let mut cluster = Cluster::start(&vhost, "pause", &["w1", "w2"]).await;
    let recorder = Arc::new(Recorder::start(support::amqp(&vhost.url).await).await);
    let calls: Vec<Call> = (0..200).map(|_| echo_sleep(100)).collect();
    let load = publish_in_background(&recorder, calls, Duration::from_millis(10));
    while recorder.replies().len() < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = cluster.workers["w1"].pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Past two missed heartbeats of 2 s: the broker closes its connection.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = cluster.status().await;
    let incarnations = |s: &ClusterStatus| {
        s.workers
            .iter()
            .filter(|w| w.worker_id.starts_with("w1.") && w.state == WorkerState::Active)
            .count()
    };
    let known = incarnations(&before);
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let woke = Instant::now();
    wait_status(
        &cluster.admin,
        "w1 registered again on a new connection",
        Duration::from_secs(30),
        |s| incarnations(s) > known,
    )
    .await;
    let took = woke.elapsed();
    eprintln!("w1 served again {:.2} s after waking", took.as_secs_f64());
    assert!(
        took < Duration::from_secs(2),
        "w1 took {took:?} after waking to serve again"
    );
    let ids = load.await.unwrap();
    recorder.wait_answered(&ids, Duration::from_secs(120)).await;
    check(&recorder.replies(), &ids, &[], &cluster.outbox());
    cluster.all_alive();
}

/// Waits until `GET path` answers `status`; the body.
async fn wait_http(port: u16, path: &str, status: u16, timeout: Duration) -> String {
    let until = Instant::now() + timeout;
    loop {
        let got = http_get(port, path);
        if let Some((code, body)) = &got
            && *code == status
        {
            return body.clone();
        }
        assert!(
            Instant::now() < until,
            "GET {path} on port {port} did not answer {status} within {timeout:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/healthz` and `/readyz` of a coordinator and a worker (`CALLQ_HTTP`):
/// ready once they serve, 503 while their broker is stopped, ready again
/// once it is back without outside help; alive throughout. A standby says
/// so, and says `active` once the coordinator promotes it; ordered to drain
/// (`callq drain`) while a call runs, it turns 503 `draining` at once,
/// finishes the call and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_probes_follow_the_broker() {
    let vhost = FaultVhost::create("health", "");
    let dir = support::temp_dir("health");
    let (pc, pw, ps) = (free_port(), free_port(), free_port());
    let (ac, aw, asb) = (
        format!("127.0.0.1:{pc}"),
        format!("127.0.0.1:{pw}"),
        format!("127.0.0.1:{ps}"),
    );
    let mut coordinator = Proc::spawn_env(
        "coordinator",
        &["coordinator"],
        &vhost.url,
        &dir,
        &[
            ("CALLQ_HTTP", ac.as_str()),
            ("CALLQ_COORDINATOR__STANDBY_PER_SERVICE__ECHO", "1"),
        ],
    );
    let standby_args = [
        "worker",
        "--services",
        "echo",
        "--worker-id",
        "hs1",
        "--standby",
    ];
    let mut standby = Proc::spawn_env(
        "hs1",
        &standby_args,
        &vhost.url,
        &dir,
        &[("CALLQ_HTTP", asb.as_str())],
    );
    let args = ["worker", "--services", "echo", "--worker-id", "hw1"];
    let mut worker = Proc::spawn_env(
        "hw1",
        &args,
        &vhost.url,
        &dir,
        &[("CALLQ_HTTP", aw.as_str())],
    );
    let minute = Duration::from_secs(60);
    assert_eq!(wait_http(pc, "/readyz", 200, minute).await, "leading");
    assert_eq!(wait_http(pw, "/readyz", 200, minute).await, "active");
    assert_eq!(wait_http(ps, "/readyz", 200, minute).await, "standby");
    for port in [pc, pw] {
        assert_eq!(http_get(port, "/healthz"), Some((200, "alive".into())));
        assert_eq!(http_get(port, "/nothing").map(|(code, _)| code), Some(404));
    }

    vhost.node.script("stop_app");
    let down = Instant::now();
    let why_c = wait_http(pc, "/readyz", 503, Duration::from_secs(30)).await;
    let why_w = wait_http(pw, "/readyz", 503, Duration::from_secs(30)).await;
    eprintln!(
        "unready {:?} after the broker stopped: {why_c:?}, {why_w:?}",
        down.elapsed()
    );
    for port in [pc, pw] {
        assert_eq!(http_get(port, "/healthz"), Some((200, "alive".into())));
    }
    vhost.node.script("start_app");
    let up = Instant::now();
    assert_eq!(wait_http(pc, "/readyz", 200, minute).await, "leading");
    assert_eq!(wait_http(pw, "/readyz", 200, minute).await, "active");
    eprintln!("ready again {:?} after the broker was back", up.elapsed());
    assert!(coordinator.running(), "{}", coordinator.log());
    assert!(worker.running(), "{}", worker.log());

    // The active worker dies: the coordinator promotes the standby.
    worker.kill9();
    let until = Instant::now() + minute;
    while http_get(ps, "/readyz") != Some((200, "active".into())) {
        assert!(
            Instant::now() < until,
            "the standby was not promoted:\n{}",
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(standby.running(), "{}", standby.log());

    // An ordered drain while a 3 s call runs: unready at once, the call
    // answered, the process gone with 0.
    let recorder = Recorder::start(support::amqp(&vhost.url).await).await;
    let running = recorder.publish(echo_sleep(3_000)).await;
    let admin_env = [("CALLQ_BROKER", vhost.url.as_str())];
    // The worker's id as registered (a worker that registers again after
    // losing its broker takes a suffix), once it runs the call.
    let until = Instant::now() + minute;
    let id = loop {
        let report = Command::new(support::callq_bin())
            .args(["status", "--json"])
            .envs(admin_env)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&report.stdout);
        let busy = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|r| {
                r["cluster"]["workers"].as_array()?.iter().find_map(|w| {
                    let id = w["worker_id"].as_str()?;
                    (id.starts_with("hs1") && w["free"].as_u64() < w["capacity"].as_u64())
                        .then(|| id.to_owned())
                })
            });
        if let Some(id) = busy {
            break id;
        }
        assert!(Instant::now() < until, "the call never ran on hs1: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drained = Command::new(support::callq_bin())
        .args(["drain", &id])
        .envs(admin_env)
        .output()
        .unwrap();
    assert!(drained.status.success(), "{drained:?}");
    let ordered = Instant::now();
    let why = wait_http(ps, "/readyz", 503, Duration::from_secs(10)).await;
    eprintln!(
        "unready {:?} after the drain order: {why:?}",
        ordered.elapsed()
    );
    assert_eq!(why, "draining");
    recorder.wait_answered(&[running], minute).await;
    assert_eq!(recorder.replies()[&running][0].outcome, Outcome::Ok);
    let exit = standby.wait_exit(minute).expect("the drained worker exits");
    assert!(exit.success(), "{exit:?}\n{}", standby.log());
}
