//! A worker partitioned from the broker but alive: it runs in a network
//! namespace of its own (testkit's `Netns`), linked to the host by a veth
//! pair, and reaches the tests' own RabbitMQ node (`scripts/rabbitmq-node`,
//! which listens on every host address) at the host's end of it, as a user
//! of this test's own. A coordinator and a second worker run on the host.
//!
//! The namespace's link is cut twice under a load of `echo.sleep` and
//! `mail.send` (each mail waits before its trace and holds it as long
//! after, so that the worker always holds mails of both kinds): first for
//! longer than the coordinator's `dead_after` but less than the AMQP
//! heartbeat, so that the worker's connections outlive the cut and its
//! late trace requests and completions reach the coordinator, which
//! refuses them; then for longer than the heartbeat too, so that the
//! broker closes them and the worker comes back on new ones. Every call
//! ends in one outcome, `fatal` only for mails that list `mail.sent`, no
//! mail is sent twice, and the worker serves on alone.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callq_node::Admin;
use callq_schemas::protocol::WorkerState;
use callq_schemas::{Call, Outcome};
use callq_testkit::netns::Netns;
use support::fault_node::FaultVhost;
use support::outcomes::{Recorder, check, echo_sleep, mail};
use support::{Proc, free_port, wait_status};
use tokio::time::Instant;
use uuid::Uuid;

/// The AMQP heartbeat of the partitioned worker's connections, in seconds:
/// lapin gives a connection up after 2 heartbeats without a byte read,
/// RabbitMQ after 2 to 3. The short cut must end well before that, with
/// TCP's backed-off retransmission after it (up to about as long again).
const HEARTBEAT: u64 = 5;

/// How long a mail waits before its trace and holds it after, and the
/// pause between rounds of the load (an `echo.sleep` and two mails).
const HOLD_MS: u64 = 1500;
const GAP: Duration = Duration::from_millis(80);

/// Where the partitioned worker serves `/metrics`, inside its namespace.
const NS_HTTP_PORT: u16 = 9464;

/// The broker's connections of `vhost`'s own user (the namespace's).
fn user_connections(vhost: &FaultVhost) -> usize {
    let user = vhost.user().expect("the namespace's user");
    let listed = tokio::task::block_in_place(|| {
        vhost
            .node
            .ctl(&["list_connections", "--no-table-headers", "user"])
    });
    listed.lines().filter(|l| l.trim() == user).count()
}

/// `GET /metrics` at `addr`; `None` while nothing answers there.
fn scrape(addr: SocketAddr) -> Option<String> {
    support::http_get_at(addr, "/metrics").map(|(_, body)| body)
}

/// The series of `name` whose labels contain `label` (`""`: all), summed.
fn metric(addr: SocketAddr, name: &str, label: &str) -> Option<f64> {
    let body = scrape(addr)?;
    Some(
        body.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']) && rest.contains(label))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Polls `probe` every 100 ms until it gives a value; panics naming
/// `what` after `timeout`.
async fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < until, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Aborts the load if the test fails, before its virtual host goes.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A mail that waits `HOLD_MS` before its trace and holds it as long
/// after: of a worker's mails, those younger than `HOLD_MS` wait for
/// their trace and the older ones hold it, whichever mails the broker
/// hands it.
fn mail_held(outbox: &Path) -> Call {
    let mut call = mail(outbox, HOLD_MS);
    call.args["after_ms"] = HOLD_MS.into();
    call
}

/// The load: rounds of an `echo.sleep` and two mails, `GAP` apart, until
/// `stop`; the ids of echoes and mails.
fn load(
    recorder: Arc<Recorder>,
    outbox: PathBuf,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<Uuid>, Vec<Uuid>)> {
    tokio::spawn(async move {
        let (mut echo, mut mails) = (Vec::new(), Vec::new());
        while !stop.load(Ordering::Relaxed) {
            echo.push(recorder.publish(echo_sleep(200)).await);
            for _ in 0..2 {
                mails.push(recorder.publish(mail_held(&outbox)).await);
            }
            tokio::time::sleep(GAP).await;
        }
        (echo, mails)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_is_replaced_refused_and_serves_again_after_the_cut() {
    let started = Instant::now();
    let ns = Netns::create("partition").unwrap_or_else(|e| {
        panic!("cannot make the partitioned worker's network namespace: {e:#}")
    });
    let mut vhost = FaultVhost::create("partition", &format!("?heartbeat={HEARTBEAT}"));
    let dir = support::temp_dir("partition");
    let outbox = dir.join("mail.outbox");
    let host_url = vhost.url.clone();
    let coord: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let w2: SocketAddr = (ns.ns_addr(), NS_HTTP_PORT).into();
    let (coord_http, w2_http) = (coord.to_string(), w2.to_string());
    let counter = |name: &str| metric(coord, name, "").unwrap_or(0.0);
    let of_w2 = |name: &str, label: &str| metric(w2, name, label);

    let mut coordinator = Proc::spawn_env(
        "coordinator",
        &["coordinator"],
        &host_url,
        &dir,
        &[("CALLQ_HTTP", coord_http.as_str())],
    );
    let worker_args = |id: &'static str| ["worker", "--services", "echo,mail", "--worker-id", id];
    let mut w1 = Proc::spawn("w1", &worker_args("w1"), &host_url, &dir);
    let mut w2_proc = Proc::spawn_from(
        ns.command(support::callq_bin()),
        "w2",
        &worker_args("w2"),
        &vhost.url_at(&ns.host_addr().to_string()),
        &dir,
        &[("CALLQ_HTTP", w2_http.as_str())],
    );
    let admin = Admin::connect(support::amqp(&host_url).await, Duration::from_secs(10))
        .await
        .unwrap();
    let active = |s: &callq_schemas::protocol::ClusterStatus, prefix: &str| {
        s.workers
            .iter()
            .any(|w| w.worker_id.starts_with(prefix) && w.state == WorkerState::Active)
    };
    wait_status(
        &admin,
        "w1 and w2 (in the namespace) active",
        Duration::from_secs(60),
        |s| active(s, "w1") && active(s, "w2"),
    )
    .await;
    eprintln!(
        "cluster up {:.1} s after the start; w2 in {} at {}",
        started.elapsed().as_secs_f64(),
        ns.name(),
        ns.ns_addr()
    );

    let recorder = Arc::new(Recorder::start(support::amqp(&host_url).await).await);
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = load(recorder.clone(), outbox.clone(), stop.clone());
    let _abort = AbortOnDrop(publisher.abort_handle());
    // w2 busy with mails of both kinds: some holding a granted trace,
    // some still waiting to ask for it.
    let loaded = Instant::now();
    wait_for(
        "w2 running calls with traces granted",
        Duration::from_secs(30),
        || {
            let granted = of_w2("callq_trace_requests_total", "decision=\"granted\"")?;
            let running = of_w2("callq_calls_in_flight", "")?;
            (granted >= 5.0 && running >= 6.0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(HOLD_MS).saturating_sub(loaded.elapsed())).await;

    // 1. Cut past `dead_after` (1 s), short of the heartbeat: w2 is
    // declared dead and its calls re-issued, or answered `fatal` where it
    // holds a trace; its connections live on.
    let (deaths, reissues, fatal) = (
        counter("callq_worker_deaths_total"),
        counter("callq_reissues_total"),
        counter("callq_fatal_total"),
    );
    let in_flight = of_w2("callq_calls_in_flight", "").unwrap_or_default();
    ns.cut().unwrap();
    let cut_at = Instant::now();
    wait_for(
        "w2 declared dead and its calls re-issued (the short cut must end long before the heartbeat)",
        Duration::from_secs(HEARTBEAT - 1),
        || {
            (counter("callq_worker_deaths_total") > deaths && counter("callq_reissues_total") > reissues)
                .then_some(())
        },
    )
    .await;
    ns.restore().unwrap();
    let short = cut_at.elapsed();
    let revoked = wait_for(
        "w2's late requests refused after the short cut",
        Duration::from_secs(30),
        || of_w2("callq_attempts_revoked_total", "").filter(|n| *n > 0.0),
    )
    .await;
    let reconnects = of_w2("callq_broker_reconnects_total", "").unwrap();
    eprintln!(
        "short cut {:.1} s with {in_flight} calls on w2: {} re-issued, {} answered fatal; then {revoked} attempts revoked on w2, {reconnects} reconnects",
        short.as_secs_f64(),
        counter("callq_reissues_total") - reissues,
        counter("callq_fatal_total") - fatal
    );
    assert_eq!(
        reconnects,
        0.0,
        "w2's connections did not outlive the short cut:\n{}",
        w2_proc.log()
    );
    wait_status(
        &admin,
        "w2 back on its old connection",
        Duration::from_secs(30),
        |s| {
            s.workers
                .iter()
                .any(|w| w.worker_id == "w2" && w.state == WorkerState::Active)
        },
    )
    .await;
    wait_for("w2 running calls again", Duration::from_secs(30), || {
        of_w2("callq_calls_in_flight", "").filter(|n| *n >= 2.0)
    })
    .await;

    // 2. Cut past the AMQP heartbeat: the broker closes w2's connections,
    // and w2 comes back on new ones, as a new incarnation (`w2.1`).
    let (deaths, reissues_long) = (
        counter("callq_worker_deaths_total"),
        counter("callq_reissues_total"),
    );
    ns.cut().unwrap();
    let cut_at = Instant::now();
    wait_for("w2 declared dead again", Duration::from_secs(10), || {
        (counter("callq_worker_deaths_total") > deaths).then_some(())
    })
    .await;
    wait_for(
        "the broker closing w2's connections (past the heartbeat)",
        Duration::from_secs(4 * HEARTBEAT),
        || (user_connections(&vhost) == 0).then_some(()),
    )
    .await;
    ns.restore().unwrap();
    let long = cut_at.elapsed();
    let restored = Instant::now();
    wait_status(
        &admin,
        "w2 registered again on new connections",
        Duration::from_secs(30),
        |s| active(s, "w2."),
    )
    .await;
    let back = restored.elapsed();
    let reconnects = of_w2("callq_broker_reconnects_total", "").unwrap_or_default();
    assert!(
        reconnects >= 1.0,
        "w2 never reconnected:\n{}",
        w2_proc.log()
    );
    let ran = of_w2("callq_calls_total", "").unwrap();
    wait_for("w2 taking calls again", Duration::from_secs(30), || {
        of_w2("callq_calls_total", "").filter(|n| *n > ran)
    })
    .await;
    eprintln!(
        "long cut {:.1} s: {} more re-issued; w2 back as a new incarnation {:.1} s after the restore ({reconnects} reconnect attempts)",
        long.as_secs_f64(),
        counter("callq_reissues_total") - reissues_long,
        back.as_secs_f64()
    );

    stop.store(true, Ordering::Relaxed);
    let (echo, mut mails) = publisher.await.unwrap();
    let all: Vec<Uuid> = echo.iter().chain(&mails).copied().collect();
    recorder.wait_answered(&all, Duration::from_secs(60)).await;

    // 3. w1 gone: w2 alone answers new calls.
    w1.kill9();
    let served = of_w2("callq_calls_total", "").unwrap();
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(recorder.publish(echo_sleep(0)).await);
        after.push(recorder.publish(mail(&outbox, 0)).await);
    }
    recorder
        .wait_answered(&after, Duration::from_secs(30))
        .await;
    let replies = recorder.replies();
    for id in &after {
        assert_eq!(replies[id][0].outcome, Outcome::Ok, "{:?}", replies[id]);
    }
    let by_w2 = of_w2("callq_calls_total", "").unwrap() - served;
    assert!(
        by_w2 >= after.len() as f64,
        "w2 ran {by_w2} of the {} calls after w1 died",
        after.len()
    );
    mails.extend(after.iter().skip(1).step_by(2).copied());
    let echo: Vec<Uuid> = echo
        .into_iter()
        .chain(after.iter().step_by(2).copied())
        .collect();

    let ended = check(&recorder.replies(), &echo, &mails, &outbox);
    let refused = of_w2("callq_trace_requests_total", "decision=\"refused\"").unwrap();
    let revoked = of_w2("callq_attempts_revoked_total", "").unwrap();
    let stale = counter("callq_stale_requests_dropped_total");
    let reissued = counter("callq_reissues_total");
    eprintln!(
        "{} calls: {:?}, duplicate replies {}, fatal mails {} (coordinator: {} fatal, {reissued} re-issued, {stale} stale requests dropped); w2: {refused} traces refused, {revoked} attempts revoked; whole test {:.1} s",
        echo.len() + mails.len(),
        ended.by_outcome,
        ended.duplicates,
        ended.fatal_mails,
        counter("callq_fatal_total"),
        started.elapsed().as_secs_f64()
    );
    assert!(
        ended.fatal_mails > 0,
        "no mail held a granted trace on w2 when it was declared dead: {ended:?}"
    );
    assert!(
        refused > 0.0,
        "no trace request of a call waiting on w2 was refused"
    );
    assert!(reissued > reissues, "the re-issues counter did not rise");
    assert!(
        coordinator.running(),
        "the coordinator exited:\n{}",
        coordinator.log()
    );
    assert!(w2_proc.running(), "w2 exited:\n{}", w2_proc.log());
}
