//! deploy/compose.yaml on the Docker engine under an operator's bad day:
//! two coordinators on PostgreSQL and three worker containers of the image
//! that `scripts/image` builds from this test build serve a steady load
//! published from the host, while a worker container is killed, one is cut
//! off the network and let back, every worker is restarted one at a time,
//! the workers are scaled from 3 to 5 and back, and the leading coordinator
//! is killed. Afterwards every call has ended in exactly one outcome, no
//! mail was sent twice, and `fatal` came only where `mail.sent` had been
//! granted.
//!
//! The workers run on the project's bridge network, so that one can be cut
//! off: they reach RabbitMQ through the tests' own node (`callq-faults`,
//! `scripts/rabbitmq-node`), which listens on 127.0.0.1 and on Docker's
//! bridge address (`CALLQ_FAULTS_DOCKER_HOST`), as a user of this test's
//! own (RabbitMQ's `guest` logs in from loopback only). The coordinators
//! use the host's network, where PostgreSQL listens (127.0.0.1 only).
//! A worker is cut off by dropping every packet in its network namespace
//! (`nsenter` and `iptables`), which keeps its address, so that its
//! connection lives on and its stale attempts come back to be refused.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::containers::{Image, Project, docker, ok, python, python_packages, root};
use support::fault_node::FaultVhost;
use support::free_port;
use support::outcomes::{Recorder, check, echo_sleep, mail};
use tokio::time::Instant;

/// A virtual host and a user of this test on the fault node; deleted when
/// dropped.
struct Tenant {
    vhost: FaultVhost,
    /// From the host: guest over loopback.
    host_url: String,
    /// From a container on a bridge network: the test's user over the
    /// bridge address.
    bridge_url: String,
}

impl Tenant {
    fn create() -> Self {
        let bridge = std::env::var("CALLQ_FAULTS_DOCKER_HOST").unwrap_or_default();
        assert!(
            !bridge.is_empty(),
            "CALLQ_FAULTS_DOCKER_HOST is empty: run scripts/test (is the Docker engine running, with its default bridge docker0?)"
        );
        let mut vhost = FaultVhost::create("containers", "");
        // A heartbeat long enough that a connection outlives the cut.
        let bridge_url = format!("{}?heartbeat=15", vhost.url_at(&bridge));
        Self {
            host_url: vhost.url.clone(),
            bridge_url,
            vhost,
        }
    }
}

/// The copy of deploy/compose.yaml this test runs: coordinators in the
/// host's network with their own HTTP ports, workers on the project's
/// network with the outbox directory mounted at /outbox.
fn compose_file(dir: &Path, tenant: &Tenant, coordinator_ports: [u16; 2]) -> PathBuf {
    let file = dir.join("compose.yaml");
    let transform = r#"
import sys, yaml
src, dst, host_broker, bridge_broker, outbox, http1, http2 = sys.argv[1:8]
doc = yaml.safe_load(open(src))
for name, svc in doc["services"].items():
    if svc.get("profiles"):
        continue
    env = dict(svc.get("environment", {}))
    if name.startswith("coordinator"):
        svc["network_mode"] = "host"
        svc.pop("extra_hosts", None)
        svc.pop("hostname", None)
        port = http1 if name.endswith("1") else http2
        env.update(HOSTNAME=name, CALLQ_HTTP="127.0.0.1:" + port, CALLQ_BROKER=host_broker)
    else:
        env.update(CALLQ_BROKER=bridge_broker)
        svc["volumes"] = list(svc.get("volumes", [])) + [outbox + ":/outbox"]
    svc["environment"] = env
yaml.safe_dump(doc, open(dst, "w"), sort_keys=False)
"#;
    ok(
        Command::new(python())
            .env("PYTHONPATH", python_packages())
            .args(["-c", transform])
            .arg(root().join("deploy/compose.yaml"))
            .arg(&file)
            .args([&tenant.host_url, &tenant.bridge_url])
            .arg(dir.join("outbox"))
            .args(coordinator_ports.map(|p| p.to_string())),
        "Python 3",
    );
    file
}

/// `callq status --json` on the tenant's virtual host.
fn status(tenant: &Tenant) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_callq"))
        .args(["status", "--json"])
        .env("CALLQ_BROKER", &tenant.host_url)
        .env("CALLQ_PATIENCE_MS", "2000")
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn active_workers(tenant: &Tenant) -> Option<Vec<String>> {
    let report = status(tenant)?;
    Some(
        report["cluster"]["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["state"] == "active")
            .map(|w| w["worker_id"].as_str().unwrap_or_default().to_owned())
            .collect(),
    )
}

async fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A metric of the process serving `/metrics` at `addr` (`host:port`),
/// summed over its labels; `None` while nothing answers there.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let (host, port) = addr.rsplit_once(':')?;
    let body = get_from(host, port.parse().ok()?)?;
    Some(
        body.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// `GET /metrics` from `host:port`.
fn get_from(host: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::new(host.parse().ok()?, port);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text.split("\r\n\r\n").nth(1)?.to_owned())
}

/// The ids of the project's worker containers, oldest first.
fn worker_containers(project: &Project) -> Vec<String> {
    let ids = project.run(&["ps", "--quiet", "worker"]);
    let mut found: Vec<(String, String)> = ids
        .split_whitespace()
        .map(|id| {
            let created = docker(&["inspect", "--format", "{{.Created}}", id]);
            (created.trim().to_owned(), id.to_owned())
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, id)| id).collect()
}

fn inspect(id: &str, format: &str) -> String {
    docker(&["inspect", "--format", format, id])
        .trim()
        .to_owned()
}

/// Where a worker container serves `/metrics`: its address on the
/// project's network, port 9090.
fn metrics_address(id: &str) -> String {
    let ip = inspect(
        id,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    format!("{ip}:9090")
}

/// Drops (`-I`) or lets through again (`-D`) every packet of the
/// container's network namespace.
fn cut(id: &str, action: &str) {
    let pid = inspect(id, "{{.State.Pid}}");
    for chain in ["INPUT", "OUTPUT"] {
        ok(
            Command::new("nsenter")
                .args(["-t", &pid, "-n", "iptables", action, chain, "-j", "DROP"]),
            "nsenter (util-linux) and iptables",
        );
    }
}

/// The value of `name` once it has not changed for two seconds (the
/// re-issues of a fault just past may still be going out); panics if it
/// keeps changing for half a minute.
async fn settled(counter: &impl Fn(&str) -> f64, name: &str) -> f64 {
    let mut last = counter(name);
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = counter(name);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("{name} kept changing for 30 s");
}

/// The steady load: an `echo.sleep` and a `mail.send` every `gap`, until
/// `stop`; the ids of each kind.
fn load(
    recorder: Arc<Recorder>,
    outbox: PathBuf,
    gap: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<uuid::Uuid>, Vec<uuid::Uuid>)> {
    tokio::spawn(async move {
        let (mut echo, mut mails) = (Vec::new(), Vec::new());
        while !stop.load(Ordering::Relaxed) {
            echo.push(recorder.publish(echo_sleep(300)).await);
            mails.push(recorder.publish(mail(&outbox, 800)).await);
            tokio::time::sleep(gap).await;
        }
        (echo, mails)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_keeps_the_promise_through_kills_cuts_restarts_and_scaling() {
    let tenant = Tenant::create();
    let pg = std::env::var("CALLQ_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1/test".to_owned());
    let tag = format!("faults-{}", uuid::Uuid::now_v7().simple());
    let image = Image(format!("callq:{tag}"));
    ok(
        Command::new(root().join("scripts/image")).args([env!("CARGO_BIN_EXE_callq"), &tag]),
        "bash and Docker",
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("compose-{tag}"));
    let outbox_dir = dir.join("outbox");
    std::fs::create_dir_all(&outbox_dir).unwrap();
    // The workers run as uid 10001.
    std::fs::set_permissions(
        &outbox_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let http = [free_port(), free_port()];
    let project = Project {
        name: format!("callq-{tag}"),
        file: compose_file(&dir, &tenant, http),
        env: [
            ("CALLQ_IMAGE", image.0.as_str()),
            ("CALLQ_COORDINATOR__POSTGRES", pg.as_str()),
            ("CALLQ_COORDINATOR__CLUSTER", tenant.vhost.name.as_str()),
            ("CALLQ_SERVICES", "echo,mail"),
            ("CALLQ_WORKER__DRAIN_TIMEOUT", "15000"),
            ("CALLQ_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    };
    let started = Instant::now();
    project.run(&["up", "--detach", "--scale", "worker=3"]);
    let coordinators = [
        format!("127.0.0.1:{}", http[0]),
        format!("127.0.0.1:{}", http[1]),
    ];
    let leader = wait_for("a leading coordinator", Duration::from_secs(60), || {
        coordinators
            .iter()
            .position(|c| metric(c, "callq_coordinator_leader") == Some(1.0))
    })
    .await;
    wait_for("three active workers", Duration::from_secs(60), || {
        (active_workers(&tenant)?.len() == 3).then_some(())
    })
    .await;
    println!(
        "coordinator-{} leads; 3 workers active {:.1} s after `up`",
        leader + 1,
        started.elapsed().as_secs_f64()
    );
    let coordinator = &coordinators[leader];
    let counter = |name: &str| metric(coordinator, name).unwrap_or(0.0);

    let recorder = Arc::new(Recorder::start(support::amqp(&tenant.host_url).await).await);
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = load(
        recorder.clone(),
        PathBuf::from("/outbox/mail.outbox"),
        Duration::from_millis(40),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. docker kill: the coordinator counts a death.
    let victim = worker_containers(&project)[0].clone();
    docker(&["kill", &victim]);
    wait_for("the killed worker's death", Duration::from_secs(30), || {
        (counter("callq_worker_deaths_total") >= 1.0).then_some(())
    })
    .await;
    println!("killed {victim}: death counted");
    docker(&["rm", "--force", &victim]);
    project.run(&["up", "--detach", "--no-recreate", "--scale", "worker=3"]);

    // 2. A worker cut off for longer than the coordinator waits for its
    // heartbeats: declared dead, its calls re-issued; let back, its
    // stale attempts are refused.
    let cut_off = worker_containers(&project)[1].clone();
    let address = metrics_address(&cut_off);
    let deaths = counter("callq_worker_deaths_total");
    let reissued = counter("callq_reissues_total");
    cut(&cut_off, "-I");
    wait_for(
        "the cut-off worker's death",
        Duration::from_secs(30),
        || (counter("callq_worker_deaths_total") > deaths).then_some(()),
    )
    .await;
    wait_for(
        "the cut-off worker's calls re-issued",
        Duration::from_secs(30),
        || (counter("callq_reissues_total") > reissued).then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cut(&cut_off, "-D");
    let revoked = wait_for(
        "the cut-off worker's stale attempts refused",
        Duration::from_secs(60),
        || metric(&address, "callq_attempts_revoked_total").filter(|n| *n > 0.0),
    )
    .await;
    println!("cut off {cut_off}: {revoked} stale attempts refused after it came back");

    // 3. A rolling restart: a new worker before each old one stops (SIGTERM).
    let reissues = settled(&counter, "callq_reissues_total").await;
    let fatal = counter("callq_fatal_total");
    for old in worker_containers(&project) {
        project.run(&["up", "--detach", "--no-recreate", "--scale", "worker=4"]);
        wait_for("a fourth active worker", Duration::from_secs(60), || {
            (active_workers(&tenant)?.len() >= 4).then_some(())
        })
        .await;
        docker(&["stop", "--time", "30", &old]);
        assert_eq!(
            inspect(&old, "{{.State.ExitCode}}"),
            "0",
            "{}",
            project.logs(&["worker"])
        );
        docker(&["rm", &old]);
    }
    assert_eq!(
        counter("callq_reissues_total"),
        reissues,
        "a drain handed calls over"
    );
    assert_eq!(
        counter("callq_fatal_total"),
        fatal,
        "a drain made a call fatal"
    );
    println!("rolling restart: no re-issue, no fatal");

    // 4. Scale out to 5 (the new workers take calls within seconds), then
    // in to 3 (drained: nothing handed over).
    let before = worker_containers(&project);
    let out_at = Instant::now();
    project.run(&["up", "--detach", "--no-recreate", "--scale", "worker=5"]);
    let new: Vec<String> = worker_containers(&project)
        .iter()
        .filter(|id| !before.contains(id))
        .map(|id| metrics_address(id))
        .collect();
    assert_eq!(new.len(), 2, "{new:?}");
    wait_for(
        "the new workers taking calls",
        Duration::from_secs(60),
        || {
            new.iter()
                .all(|w| metric(w, "callq_calls_total").is_some_and(|n| n > 0.0))
                .then_some(())
        },
    )
    .await;
    println!(
        "scaled out to 5: both new workers ran calls {:.1} s after `up`",
        out_at.elapsed().as_secs_f64()
    );
    let reissues = counter("callq_reissues_total");
    project.run(&["up", "--detach", "--no-recreate", "--scale", "worker=3"]);
    wait_for("three active workers", Duration::from_secs(60), || {
        (active_workers(&tenant)?.len() == 3).then_some(())
    })
    .await;
    assert_eq!(
        counter("callq_reissues_total"),
        reissues,
        "scaling in handed calls over"
    );

    // 5. The leading coordinator killed: the other leads within its lease.
    let name = format!("coordinator-{}", leader + 1);
    let id = project.run(&["ps", "--quiet", &name]);
    let killed_at = Instant::now();
    docker(&["kill", id.trim()]);
    let other = &coordinators[1 - leader];
    wait_for(
        "the other coordinator leading",
        Duration::from_secs(30),
        || (metric(other, "callq_coordinator_leader") == Some(1.0)).then_some(()),
    )
    .await;
    let took = killed_at.elapsed();
    println!(
        "the other coordinator leads {:.1} s after the kill",
        took.as_secs_f64()
    );
    // The lease runs 2 s; the standby tries to take it every quarter lease.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, Ordering::Relaxed);
    let (echo, mails) = publisher.await.unwrap();
    let all: Vec<_> = echo.iter().chain(&mails).copied().collect();
    recorder.wait_answered(&all, Duration::from_secs(120)).await;
    let ended = check(
        &recorder.replies(),
        &echo,
        &mails,
        &outbox_dir.join("mail.outbox"),
    );
    let by_outcome: BTreeMap<_, _> = ended.by_outcome.iter().collect();
    println!(
        "{} calls: {by_outcome:?}, duplicate replies {}, fatal mails {}, highest attempt {}; whole test {:.1} s",
        all.len(),
        ended.duplicates,
        ended.fatal_mails,
        ended.highest_attempt,
        started.elapsed().as_secs_f64()
    );
    assert!(ended.by_outcome.get("Ok").is_some_and(|n| *n > 0));
    drop(project);
    drop(image);
}
