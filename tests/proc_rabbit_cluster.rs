//! Broker node loss: a coordinator and three workers on a three-node
//! RabbitMQ cluster of the tests' own (`scripts/rabbitmq-cluster`, which
//! scripts/services starts), every process and the client given all three
//! nodes in one URL. Under a steady load of `echo.sleep` and `mail.send`,
//! the node leading `callq.call.echo` is killed with SIGKILL, then started
//! again; then the node leading `callq.coordinator` is killed and started
//! again.
//!
//! Calls are published and their replies read by a recorder of the test's
//! own (it publishes with confirms and retries, and reads its reply queue
//! again after each loss of its connection), so that every reply any
//! process ever sent is counted.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{COORDINATOR_QUEUE, call_queue};
use callq_node::Admin;
use callq_schemas::Outcome;
use support::cluster::{ClusterVhost, RabbitCluster, Revive, SteadyLoad};
use support::outcomes::{Recorder, check, echo_sleep, mail};
use support::{Proc, free_port, wait_ready_as};
use tokio::time::Instant;
use uuid::Uuid;

/// The workers, each with its `/readyz` port.
const WORKERS: [&str; 3] = ["w1", "w2", "w3"];

/// What the test saw at one kill.
#[derive(Debug)]
struct Kill {
    /// The queue whose leader was killed, and the node.
    queue: String,
    node: String,
    /// When the node's VM was gone.
    at: Instant,
    /// Calls confirmed before the kill, and how many of them had no reply
    /// yet (in flight).
    confirmed: usize,
    in_flight: usize,
    /// The calls answered before the kill.
    answered: HashSet<Uuid>,
    /// Calls the workers ran at the kill, as the coordinator last saw them.
    running: Option<u32>,
    /// From the kill to the reply of a new `echo` call, then of a new
    /// `mail.send`.
    serving_again: Duration,
    /// From the kill until the coordinator and every worker said ready.
    all_ready: Duration,
    /// The new calls made after the kill.
    probes: Vec<Uuid>,
}

/// The calls the workers are running, as the coordinator reports them; none
/// when it does not answer within 10 s.
async fn running(url: &str) -> Option<u32> {
    let admin = Admin::connect(support::amqp(url).await, Duration::from_secs(10))
        .await
        .ok()?;
    let status = admin.status().await.ok()?;
    Some(status.workers.iter().map(|w| w.capacity - w.free).sum())
}

/// Waits until the coordinator leads and every worker is active again.
async fn all_ready(coordinator: u16, workers: &[u16]) {
    let minute = Duration::from_secs(60);
    wait_ready_as(coordinator, "leading", minute).await;
    for port in workers {
        wait_ready_as(*port, "active", minute).await;
    }
}

/// The node leading `callq.call.echo` killed mid-load, started again, then
/// the node leading `callq.coordinator` killed mid-load, started again:
/// every call the client got a publish confirm for ends with exactly one
/// outcome (`ok`, or `fatal` only for a mail whose `mail.sent` was
/// granted), no mail is sent twice, the cluster serves on through the
/// other nodes, and every call published after a kill ends `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_node_loses_no_confirmed_call_and_the_cluster_serves_on() {
    let started = Instant::now();
    let cluster = RabbitCluster::get();
    let _revive = Revive;
    let vhost = ClusterVhost::create(&cluster, "nodeloss");
    let dir = support::temp_dir("nodeloss");

    let coordinator_http = free_port();
    let coordinator_addr = format!("127.0.0.1:{coordinator_http}");
    let mut coordinator = Proc::spawn_env(
        "coordinator",
        &["coordinator"],
        &vhost.url,
        &dir,
        &[("CALLQ_HTTP", coordinator_addr.as_str())],
    );
    wait_ready_as(coordinator_http, "leading", Duration::from_secs(60)).await;
    let mut workers = Vec::new();
    let mut worker_http = Vec::new();
    for id in WORKERS {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let args = ["worker", "--services", "echo,mail", "--worker-id", id];
        workers.push(Proc::spawn_env(
            id,
            &args,
            &vhost.url,
            &dir,
            &[("CALLQ_HTTP", addr.as_str())],
        ));
        worker_http.push(port);
    }
    all_ready(coordinator_http, &worker_http).await;
    let recorder = Arc::new(Recorder::start(support::amqp(&vhost.url).await).await);

    // Every quorum queue has a member on each of the three nodes.
    let members = cluster.quorum_members(&vhost.name);
    for queue in [
        call_queue("echo"),
        call_queue("mail"),
        COORDINATOR_QUEUE.into(),
    ] {
        assert!(
            members.iter().any(|(name, _)| *name == queue),
            "{queue} is not a quorum queue: {members:?}"
        );
    }
    for (queue, on) in &members {
        assert_eq!(on.len(), 3, "{queue} is replicated to {on:?} only");
    }
    eprintln!(
        "{} quorum queues, each on all three nodes; cluster up {:.1} s after the start",
        members.len(),
        started.elapsed().as_secs_f64()
    );

    let outbox = dir.join("mail.outbox");
    let load = SteadyLoad::start(&recorder, &outbox, Duration::from_millis(8), 150);
    let mut kills = Vec::new();
    for queue in [call_queue("echo"), COORDINATOR_QUEUE.to_owned()] {
        // Mid-load: calls answered since the last phase, more in flight.
        let answered = recorder.replies().len();
        let until = Instant::now() + Duration::from_secs(60);
        while recorder.replies().len() < answered + 150 {
            assert!(
                Instant::now() < until,
                "no load before killing {queue}'s leader"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let node = cluster.leader(&queue, &vhost.name);
        let running = running(&vhost.url).await;
        let sent = load.sent();
        let replies = recorder.replies();
        let in_flight = sent.iter().filter(|s| !replies.contains_key(&s.id)).count();
        // The script returns once the VM is gone: what is published from
        // then on is published after the kill.
        cluster.kill(&node);
        let at = Instant::now();
        eprintln!(
            "killed {node}, leader of {queue}: {} calls confirmed, {in_flight} of them in flight, \
             {running:?} running on workers",
            sent.len()
        );

        // The cluster serves on through the other nodes.
        let (reply, _) = recorder
            .call_after(echo_sleep(0), Duration::from_secs(60))
            .await;
        assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
        let mut probes = vec![reply.call_id];
        let (reply, _) = recorder
            .call_after(mail(&outbox, 0), Duration::from_secs(60))
            .await;
        assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
        probes.push(reply.call_id);
        let serving_again = at.elapsed();
        all_ready(coordinator_http, &worker_http).await;
        let all_ready = at.elapsed();
        eprintln!(
            "without {node}: a new echo and a new mail answered ok {:.2} s after the kill, \
             every process ready {:.2} s after it",
            serving_again.as_secs_f64(),
            all_ready.as_secs_f64()
        );
        let restarting = Instant::now();
        cluster.restart(&node);
        eprintln!(
            "{node} back in the cluster in {:.1} s",
            restarting.elapsed().as_secs_f64()
        );
        kills.push(Kill {
            queue,
            node,
            at,
            confirmed: sent.len(),
            in_flight,
            answered: replies.keys().copied().collect(),
            running,
            serving_again,
            all_ready,
            probes,
        });
    }

    let sent = load.stop().await;
    let (mut echo, mut mails) = (Vec::new(), Vec::new());
    for s in &sent {
        if s.mail {
            mails.push(s.id);
        } else {
            echo.push(s.id);
        }
    }
    for kill in &kills {
        echo.push(kill.probes[0]);
        mails.push(kill.probes[1]);
    }
    let all: Vec<Uuid> = echo.iter().chain(&mails).copied().collect();
    recorder.wait_answered(&all, Duration::from_secs(120)).await;
    let replies = recorder.replies();
    let ended = check(&replies, &echo, &mails, &outbox);
    // The calls published after a kill, but for those the next kill found
    // unanswered (it may take a worker with them: `fatal` is then right for
    // a mail whose trace was granted).
    for (k, kill) in kills.iter().enumerate() {
        let next = kills.get(k + 1);
        let after: Vec<&Uuid> = sent
            .iter()
            .filter(|s| s.began >= kill.at)
            .filter(|s| next.is_none_or(|n| n.answered.contains(&s.id)))
            .map(|s| &s.id)
            .chain(&kill.probes)
            .collect();
        for id in &after {
            let reply = &replies[*id][0];
            assert_eq!(
                reply.outcome,
                Outcome::Ok,
                "a call published after killing {} ended {reply:?}",
                kill.node
            );
        }
        eprintln!(
            "kill of {} (leader of {}): {} confirmed before it, {} in flight, {:?} running; \
             serving again after {:.2} s, all ready after {:.2} s; {} calls published after it \
             (and answered before the next kill, if any), all ok",
            kill.node,
            kill.queue,
            kill.confirmed,
            kill.in_flight,
            kill.running,
            kill.serving_again.as_secs_f64(),
            kill.all_ready.as_secs_f64(),
            after.len()
        );
    }
    eprintln!(
        "{} calls ({} echo, {} mail): {ended:?}; {:.1} s in all",
        all.len(),
        echo.len(),
        mails.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        coordinator.running(),
        "the coordinator exited:\n{}",
        coordinator.log()
    );
    for w in &mut workers {
        assert!(w.running(), "{} exited:\n{}", w.name, w.log());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
