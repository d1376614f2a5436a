//! The coordinators' database restarted under load, with processes: the
//! coordinator keeps its ledger in a PostgreSQL cluster of the tests' own
//! (`CALLQ_FAULTS_POSTGRES`, `CALLQ_FAULTS_PG_CLUSTER`: `scripts/services`
//! creates and starts it), which the test stops and starts again; the
//! PostgreSQL other tests share is never touched.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use callq_node::Admin;
use callq_schemas::protocol::WorkerState;
use callq_schemas::{Call, Outcome};
use support::outcomes::{Recorder, check, echo_sleep, mail, publish_in_background};
use support::{Proc, Vhost, count, wait_status};

/// `pg_ctlcluster <version> <name> <action>` on the tests' own cluster.
fn pg_ctl(action: &str) {
    let cluster = std::env::var("CALLQ_FAULTS_PG_CLUSTER")
        .expect("CALLQ_FAULTS_PG_CLUSTER is not set: run scripts/test, or source scripts/services");
    let (version, name) = cluster.split_once('/').unwrap();
    let mut args = vec![version, name, action];
    if action == "stop" {
        // As a crash or a failover would: connections cut, no checkpoint.
        args.extend(["-m", "immediate"]);
    }
    let out = Command::new("pg_ctlcluster").args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "pg_ctlcluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the tests' cluster again if a test stopped it and then failed
/// before starting it: the next test finds it up.
struct StartsOnDrop;

impl Drop for StartsOnDrop {
    fn drop(&mut self) {
        // Best effort, without panicking again: `start` on a running
        // cluster merely fails.
        if let Ok(cluster) = std::env::var("CALLQ_FAULTS_PG_CLUSTER")
            && let Some((version, name)) = cluster.split_once('/')
        {
            let _ = Command::new("pg_ctlcluster")
                .args([version, name, "start"])
                .output();
        }
    }
}

/// PostgreSQL stopped (immediate: connections cut) for 3 s and started
/// again under a load of `echo.sleep` and `mail.send`, with traced calls in
/// flight: the coordinator loses its lease and stands by while it cannot
/// reach the database, leads again once it can, and every call ends `ok`
/// exactly once, each mail sent once; the coordinator and the workers run
/// on, and a traced call after it ends `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_load_ends_every_call_once() {
    let pg = std::env::var("CALLQ_FAULTS_POSTGRES")
        .expect("CALLQ_FAULTS_POSTGRES is not set: run scripts/test, or source scripts/services");
    let vhost = Vhost::create("pgrestart");
    let dir = support::temp_dir("pgrestart");
    eprintln!("process logs in {}", dir.display());
    let mut coordinator = Proc::spawn_env(
        "coordinator",
        &["coordinator"],
        &vhost.url,
        &dir,
        &[
            ("CALLQ_COORDINATOR__POSTGRES", pg.as_str()),
            ("CALLQ_COORDINATOR__CLUSTER", vhost.name.as_str()),
            ("CALLQ_COORDINATOR__LEASE_MS", "1000"),
        ],
    );
    let patience = [("CALLQ_WORKER__COORDINATOR_PATIENCE", "1500")];
    let mut workers: Vec<Proc> = ["p1", "p2", "p3"]
        .iter()
        .map(|id| {
            let args = ["worker", "--services", "echo,mail", "--worker-id", id];
            Proc::spawn_env(id, &args, &vhost.url, &dir, &patience)
        })
        .collect();
    let admin = Admin::connect(support::amqp(&vhost.url).await, Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "3 active workers", Duration::from_secs(60), |s| {
        count(s, WorkerState::Active) == 3
    })
    .await;
    let recorder = Arc::new(Recorder::start(support::amqp(&vhost.url).await).await);
    let outbox = dir.join("mail.outbox");
    let calls: Vec<Call> = (0..400)
        .map(|i| {
            if i % 2 == 0 {
                mail(&outbox, 30)
            } else {
                echo_sleep(30)
            }
        })
        .collect();
    let load = publish_in_background(&recorder, calls, Duration::from_millis(5));
    while recorder.replies().len() < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = wait_status(&admin, "a status", Duration::from_secs(30), |_| true).await;
    let running: u32 = status.workers.iter().map(|w| w.capacity - w.free).sum();
    assert!(running > 0, "no call in flight at the stop: {status:?}");
    let _restart = StartsOnDrop;
    pg_ctl("stop");
    let answered = recorder.replies().len();
    eprintln!("PostgreSQL stopped with {running} calls running, {answered} answered");
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg_ctl("start");
    let ids = load.await.unwrap();
    recorder.wait_answered(&ids, Duration::from_secs(120)).await;
    let mails: Vec<_> = ids.iter().step_by(2).copied().collect();
    let echoes: Vec<_> = ids.iter().skip(1).step_by(2).copied().collect();
    let ended = check(&recorder.replies(), &echoes, &mails, &outbox);
    eprintln!("PostgreSQL restarted mid-load: {ended:?}");
    assert_eq!(ended.by_outcome.get("Ok"), Some(&ids.len()), "{ended:?}");
    let log = coordinator.log();
    assert!(
        log.contains("lost the lead") && log.contains("epoch=2"),
        "the coordinator did not stand by while the database was gone and lead again:\n{log}"
    );
    let (reply, took) = recorder
        .call_after(mail(&outbox, 0), Duration::from_secs(60))
        .await;
    eprintln!(
        "a traced call after the restart: {:?} in {took:?}",
        reply.outcome
    );
    assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    assert!(coordinator.running(), "{}", coordinator.log());
    for w in &mut workers {
        assert!(w.running(), "{} exited:\n{}", w.name, w.log());
    }
}

/// The coordinators' store over TLS: with `sslmode=require` the
/// coordinator reaches PostgreSQL (the tests' own cluster, serving a
/// certificate of the test CA for `localhost`) over TLS, checks the
/// certificate against `SSL_CERT_FILE`, and leads; PostgreSQL reports its
/// connection as TLS. So does the `bank` example service's pool, with the
/// same URL settings. Without the CA the coordinator refuses the server and
/// never leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_reaches_postgres_over_tls() {
    let pg = std::env::var("CALLQ_FAULTS_POSTGRES")
        .expect("CALLQ_FAULTS_POSTGRES is not set: run scripts/test, or source scripts/services");
    let ca = std::env::var("CALLQ_TLS_CA")
        .expect("CALLQ_TLS_CA is not set: run scripts/test, or source scripts/services");
    let vhost = Vhost::create("pgtls");
    let dir = support::temp_dir("pgtls");
    let app = format!("callq-tls-{}", uuid::Uuid::now_v7().simple());
    let url = format!(
        "{}?sslmode=require&application_name={app}",
        pg.replace("127.0.0.1", "localhost")
    );
    let coordinator = |name: &str, ca: &str, http: u16| {
        let addr = format!("127.0.0.1:{http}");
        Proc::spawn_env(
            name,
            &["coordinator"],
            &vhost.url,
            &dir,
            &[
                ("CALLQ_COORDINATOR__POSTGRES", url.as_str()),
                ("CALLQ_COORDINATOR__CLUSTER", vhost.name.as_str()),
                ("SSL_CERT_FILE", ca),
                ("CALLQ_HTTP", addr.as_str()),
            ],
        )
    };
    let http = support::free_port();
    let mut leader = coordinator("coordinator", &ca, http);
    support::wait_ready_as(http, "leading", Duration::from_secs(60)).await;
    assert_tls(&pg, &app, "the coordinator's");

    // The bank service's pool: a worker whose CALLQ_POSTGRES asks for TLS.
    let bank_app = format!("{app}-bank");
    let bank_url = url.replace(&app, &bank_app);
    let args = ["worker", "--services", "bank", "--worker-id", "bank-tls"];
    let env = [
        ("CALLQ_POSTGRES", bank_url.as_str()),
        ("SSL_CERT_FILE", ca.as_str()),
    ];
    let mut bank = Proc::spawn_env("bank-tls", &args, &vhost.url, &dir, &env);
    let account = format!("tls-{}", uuid::Uuid::now_v7().simple());
    let out = Command::new(support::callq_bin())
        .args(["call", "bank", "open", "--timeout-ms", "60000"])
        .arg(format!(r#"{{"account": "{account}", "cents": 100}}"#))
        .env("CALLQ_BROKER", &vhost.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bank.open over TLS: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        bank.log()
    );
    assert_tls(&pg, &bank_app, "the bank pool's");
    assert!(bank.running(), "{}", bank.log());
    assert!(leader.running(), "{}", leader.log());
    drop(bank);
    drop(leader);

    // The system's CAs do not include the test CA.
    let untrusting = coordinator(
        "untrusting",
        "/etc/ssl/certs/ca-certificates.crt",
        support::free_port(),
    );
    support::wait_log(
        &untrusting,
        "invalid peer certificate",
        Duration::from_secs(60),
    );
    assert!(!untrusting.log().contains("coordinator leading"));
}

/// Asserts that PostgreSQL reports the connections of `app` (there are
/// some) as TLS.
fn assert_tls(pg: &str, app: &str, whose: &str) {
    let query = format!(
        "select s.ssl, s.version from pg_stat_ssl s join pg_stat_activity a using (pid) \
         where a.application_name = '{app}'"
    );
    let out = Command::new("psql")
        .args([pg, "-Atc", &query])
        .output()
        .unwrap();
    let rows = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eprintln!("{whose} connections in pg_stat_ssl: {rows:?}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !rows.is_empty() && rows.lines().all(|l| l.starts_with("t|TLS")),
        "{whose} connection is not TLS: {rows:?}"
    );
}
