//! What the tests against a real RabbitMQ share: a virtual host of their
//! own (so that tests running at once never meet in `callq.call.echo`), and
//! `callq` processes that can be killed for real.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use callq_node::{Admin, Client, ClientOptions};
use callq_schemas::protocol::{ClusterStatus, WorkerState};
use callq_testkit::ClusterOptions;
use callq_testkit::chaos::{self, ChaosReport, ChaosSpec, Fleet};

pub mod cancellation;
pub mod cluster;
pub mod containers;
pub mod delayed;
pub mod fault_node;
pub mod idempotency;
pub mod keys;
pub mod outcomes;
pub mod retries;

/// A RabbitMQ virtual host for one test, deleted when dropped.
pub struct Vhost {
    /// Its name.
    pub name: String,
    /// `amqp://guest:guest@127.0.0.1:5672/<name>`.
    pub url: String,
}

/// Runs `rabbitmqctl -q args..`; panics with its output when it fails.
/// What it printed. (`-n NODE` first in `args` addresses another node.)
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run rabbitmqctl ({e}): RabbitMQ must be installed (scripts/test does it)"
            )
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Vhost {
    /// Creates `callq-test-<run>-<tag>-<uuid>` with all permissions for
    /// guest. `<run>` is `CALLQ_TEST_RUN` (set by scripts/test, which deletes
    /// its run's vhosts when it ends), or `manual`.
    pub fn create(tag: &str) -> Self {
        let run = std::env::var("CALLQ_TEST_RUN").unwrap_or_else(|_| "manual".into());
        let name = format!("callq-test-{run}-{tag}-{}", uuid::Uuid::now_v7().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let url = format!("amqp://guest:guest@127.0.0.1:5672/{name}");
        Self { name, url }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

/// The `callq` binary under test.
pub fn callq_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_callq"))
}

/// A fresh directory for one test's files.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("callq-{tag}-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `callq` process; killed (SIGKILL) when dropped.
pub struct Proc {
    /// What the test calls it.
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `callq args..` against `broker_url`, logging to
    /// `dir/<name>.log`, with `dir` as its working directory.
    pub fn spawn(name: &str, args: &[&str], broker_url: &str, dir: &Path) -> Self {
        Self::spawn_env(name, args, broker_url, dir, &[])
    }

    /// Like [`Proc::spawn`], with more environment variables.
    pub fn spawn_env(
        name: &str,
        args: &[&str],
        broker_url: &str,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_from(Command::new(callq_bin()), name, args, broker_url, dir, env)
    }

    /// Like [`Proc::spawn_env`], from `base` (`callq` run some other way,
    /// e.g. in a network namespace).
    pub fn spawn_from(
        mut base: Command,
        name: &str,
        args: &[&str],
        broker_url: &str,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = base
            .args(args)
            .current_dir(dir)
            .env("CALLQ_BROKER", broker_url)
            .env("CALLQ_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start callq {args:?}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: the process dies on the spot, its connections with it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the process drains and exits.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the coordinator's status every 50 ms until `pred` holds; panics
/// naming `what` after `timeout`. (Across processes the status is the
/// signal: there is nothing to await but the coordinator's view.)
pub async fn wait_status(
    admin: &callq_node::Admin,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&callq_schemas::protocol::ClusterStatus) -> bool,
) -> callq_schemas::protocol::ClusterStatus {
    let until = tokio::time::Instant::now() + timeout;
    let mut last = None;
    while tokio::time::Instant::now() < until {
        match admin.status().await {
            Ok(status) if pred(&status) => return status,
            Ok(status) => last = Some(status),
            Err(e) => eprintln!("status while waiting for {what}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {timeout:?}; last status: {last:#?}");
}

/// The RabbitMQ adapter on `url`, shared as the node crate takes it.
pub async fn amqp(url: &str) -> std::sync::Arc<dyn callq_broker::Broker> {
    std::sync::Arc::new(
        callq_broker_amqp::AmqpBroker::connect(url)
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ at {url}: {e}")),
    )
}

pub fn count(status: &ClusterStatus, state: WorkerState) -> usize {
    status.workers.iter().filter(|w| w.state == state).count()
}

/// Worker processes the test started, killed by the load's schedule.
pub struct Workers {
    pub procs: HashMap<String, Proc>,
    pub admin: Admin,
    /// Workers never killed.
    pub spare: &'static [&'static str],
}

impl Fleet for Workers {
    async fn kill_busiest(&mut self) -> anyhow::Result<Option<String>> {
        // No coordinator to ask (it is being replaced): no kill this time.
        let Ok(status) = self.admin.status().await else {
            return Ok(None);
        };
        let busiest = status
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Active && self.procs.contains_key(&w.worker_id))
            .filter(|w| !self.spare.contains(&w.worker_id.as_str()))
            .filter(|w| w.free < w.capacity)
            .max_by_key(|w| w.capacity - w.free);
        let Some(w) = busiest else {
            return Ok(None);
        };
        let mut proc = self.procs.remove(&w.worker_id).unwrap();
        eprintln!(
            "kill -9 {} (pid {}, {} calls in flight)",
            proc.name,
            proc.pid(),
            w.capacity - w.free
        );
        proc.kill9();
        Ok(Some(w.worker_id.clone()))
    }
}

/// A `callq worker` process of `echo` and `mail`.
pub fn worker(id: &str, broker_url: &str, dir: &Path, standby: bool) -> Proc {
    let mut args = vec!["worker", "--services", "echo,mail", "--worker-id", id];
    if standby {
        args.push("--standby");
    }
    Proc::spawn(id, &args, broker_url, dir)
}

/// The load of the failover tests: `echo.sleep` and every third call a
/// `mail.send`, 50 ms of work each, a kill every 700 ms.
pub fn load(dir: &Path, calls: usize, kills: usize) -> ChaosSpec {
    ChaosSpec {
        cluster: ClusterOptions::default(),
        workers: 0,
        standbys: 0,
        calls,
        concurrency: calls,
        mail_every: 3,
        work: Duration::from_millis(50),
        kill_every: Duration::from_millis(700),
        max_kills: kills,
        replace_killed: false,
        timeout: Duration::from_secs(90),
        outbox: dir.join("mail.outbox"),
        progress: false,
    }
}

/// Drives `spec` through `fleet`, prints the report, and checks what every
/// failover test checks: no violation, every call ended, `kills` workers
/// killed and seen dead, some call on a killed worker, and a failover pause
/// measured after each kill, which it prints and returns.
pub async fn survive(
    spec: &ChaosSpec,
    client: &Client,
    admin: &Admin,
    fleet: &mut Workers,
) -> (ChaosReport, Vec<(String, Duration)>) {
    let report = chaos::drive(spec, client, admin, fleet).await.unwrap();
    report.print();
    assert_eq!(report.violations(), Vec::<String>::new());
    assert_eq!(report.ended.len(), spec.calls, "every call ended");
    assert_eq!(
        report.kills.len(),
        spec.max_kills,
        "workers killed mid-load"
    );
    assert!(
        report.deaths >= spec.max_kills as u64,
        "the coordinator saw {} deaths",
        report.deaths
    );
    assert!(
        report.retried_ok() + report.fatal().len() > 0,
        "no call was on a killed worker: the kills proved nothing"
    );
    let pauses = report.failover_pauses();
    for (worker, pause) in &pauses {
        eprintln!(
            "failover pause after killing {worker}: {:.0} ms",
            pause.as_secs_f64() * 1000.0
        );
    }
    assert!(!pauses.is_empty(), "no reply of a call on a killed worker");
    (report, pauses)
}

/// Two workers of `echo` and `mail` on `vhost`, once the coordinator sees
/// them active, a broker connection and a client on it.
pub async fn two_workers(
    vhost: &Vhost,
    dir: &Path,
) -> (
    HashMap<String, Proc>,
    std::sync::Arc<dyn callq_broker::Broker>,
    Client,
) {
    let mut procs = HashMap::new();
    for id in ["w1", "w2"] {
        procs.insert(id.to_owned(), worker(id, &vhost.url, dir, false));
    }
    let broker = amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "2 active workers", Duration::from_secs(30), |s| {
        count(s, WorkerState::Active) == 2
    })
    .await;
    let client = Client::connect(broker.clone(), ClientOptions::default())
        .await
        .unwrap();
    (procs, broker, client)
}

/// Runs the load of `spec` in the background, `procs` its fleet; the load
/// and the fleet ask the coordinator on connections of their own.
pub async fn load_in_background(
    spec: ChaosSpec,
    client: &Client,
    broker: &std::sync::Arc<dyn callq_broker::Broker>,
    procs: HashMap<String, Proc>,
) -> tokio::task::JoinHandle<(anyhow::Result<ChaosReport>, Workers)> {
    let client = client.clone();
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    let mut fleet = Workers {
        procs,
        admin: Admin::connect(broker.clone(), Duration::from_secs(10))
            .await
            .unwrap(),
        spare: &[],
    };
    tokio::spawn(async move {
        let report = chaos::drive(&spec, &client, &admin, &mut fleet).await;
        (report, fleet)
    })
}

/// Awaits the background load and checks that the cluster came through:
/// no violation, every one of `calls` ended, a call made afterwards is
/// answered `ok`, and no worker of the fleet died.
pub async fn served_on(
    load: tokio::task::JoinHandle<(anyhow::Result<ChaosReport>, Workers)>,
    calls: usize,
    client: &Client,
) {
    let (report, mut fleet) = load.await.unwrap();
    let report = report.unwrap();
    report.print();
    assert_eq!(report.violations(), Vec::<String>::new());
    assert_eq!(report.ended.len(), calls, "every call ended");
    let reply = client
        .call(
            "echo",
            "echo",
            serde_json::json!({"after": "the failure"}),
            callq_node::CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(reply.outcome, callq_schemas::Outcome::Ok, "{reply:?}");
    for proc in fleet.procs.values_mut() {
        assert!(proc.running(), "{} died:\n{}", proc.name, proc.log());
    }
}

/// A Kafka broker URL of a test's own: `CALLQ_KAFKA_URL` with topics and
/// groups prefixed, `partitions` partitions per topic, and short group
/// sessions (tansu accepts them; they bound how long a killed worker's
/// partitions wait for the rebalance, which the failover must not wait for
/// anyway).
pub fn kafka_url(tag: &str, partitions: usize) -> String {
    let base = std::env::var("CALLQ_KAFKA_URL")
        .expect("CALLQ_KAFKA_URL is not set: run `source scripts/kafka` (scripts/test does)");
    let sep = if base.contains('?') { '&' } else { '?' };
    let run = uuid::Uuid::now_v7().simple();
    format!(
        "{base}{sep}partitions={partitions}&session_timeout_ms=2000&fetch_wait_ms=10\
         &topic_prefix={tag}-{run}.&group_prefix={tag}-{run}."
    )
}

/// A client's broker on the Kafka cluster at `url`.
pub async fn kafka(url: &str) -> std::sync::Arc<dyn callq_broker::Broker> {
    std::sync::Arc::new(
        callq_broker_kafka::KafkaBroker::connect(url)
            .await
            .unwrap_or_else(|e| panic!("Kafka at {url}: {e}")),
    )
}

/// `callq call echo echo {"tls": true}` on `url`, trusting the CA file `ca`.
pub fn tls_call(url: &str, ca: &str) -> std::process::Output {
    Command::new(callq_bin())
        .args([
            "call",
            "echo",
            "echo",
            r#"{"tls": true}"#,
            "--timeout-ms",
            "20000",
        ])
        .env("CALLQ_BROKER", url)
        .env("SSL_CERT_FILE", ca)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// A coordinator and a worker of `echo` on `url` over TLS (trusting `ca`),
/// and a call through them, tried until it is answered or `timeout`
/// passes; panics with their logs when it never is.
pub async fn serve_over_tls(url: &str, ca: &str, dir: &Path, timeout: Duration) -> (Proc, Proc) {
    let env = [("SSL_CERT_FILE", ca)];
    let coordinator = Proc::spawn_env("coordinator", &["coordinator"], url, dir, &env);
    let args = ["worker", "--services", "echo", "--worker-id", "tls1"];
    let worker = Proc::spawn_env("tls1", &args, url, dir, &env);
    let started = std::time::Instant::now();
    let out = loop {
        let out = tls_call(url, ca);
        if out.status.success() || started.elapsed() > timeout {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"tls\""),
        "callq call over TLS failed: {stdout}{}\ncoordinator:\n{}\nworker:\n{}",
        String::from_utf8_lossy(&out.stderr),
        coordinator.log(),
        worker.log()
    );
    (coordinator, worker)
}

/// A port nothing listens on now, below Linux's ephemeral range (32768 and
/// up): a port the kernel hands out (`bind(0)`) may be taken by the local
/// end of some other test's outgoing connection before the process the
/// port is meant for binds it. Never the same port twice in one test
/// binary.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let seed = std::process::id().wrapping_mul(7_919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < SPAN,
            "no free port left between {LOW} and {}",
            LOW + SPAN
        );
        let port = u16::try_from(LOW + (seed.wrapping_add(n.wrapping_mul(97)) % SPAN)).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `GET path` on 127.0.0.1:`port`: the status code and the body, or `None`
/// while nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// `GET path` at `addr`: the status code and the body, or `None` while
/// nothing answers.
pub fn http_get_at(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned();
    Some((status, body))
}

/// Waits (bounded) until `proc`'s log holds `needle`: for what a process
/// says only in its log (why it lost the lead, an order it dropped, a
/// certificate it refused); its state is read from `/readyz` instead
/// ([`wait_ready_as`]).
pub fn wait_log(proc: &Proc, needle: &str, timeout: Duration) {
    let until = std::time::Instant::now() + timeout;
    while !proc.log().contains(needle) {
        assert!(
            std::time::Instant::now() < until,
            "{} never logged `{needle}`:\n{}",
            proc.name,
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until `GET /readyz` on 127.0.0.1:`port` answers 200
/// with `what` (`leading`, `standing by`, `active`, ...).
pub async fn wait_ready_as(port: u16, what: &str, timeout: Duration) {
    let until = std::time::Instant::now() + timeout;
    loop {
        let got = http_get(port, "/readyz");
        if got
            .as_ref()
            .is_some_and(|(code, body)| *code == 200 && body == what)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "/readyz on port {port} did not answer 200 `{what}` within {timeout:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A coordinator and worker processes of `echo` and `mail` with a small
/// capacity, once the coordinator sees them active, with an operator's
/// handle and a client on `broker`.
pub struct SmallCluster {
    pub coordinator: Proc,
    pub workers: Vec<Proc>,
    pub admin: Admin,
    pub client: Client,
}

impl SmallCluster {
    pub async fn start(
        url: &str,
        broker: std::sync::Arc<dyn callq_broker::Broker>,
        dir: &Path,
        ids: &[&str],
        capacity: u32,
    ) -> Self {
        Self::start_env(url, broker, dir, (ids, capacity), &[]).await
    }

    /// Like [`SmallCluster::start`], the workers with more environment
    /// variables.
    pub async fn start_env(
        url: &str,
        broker: std::sync::Arc<dyn callq_broker::Broker>,
        dir: &Path,
        (ids, capacity): (&[&str], u32),
        env: &[(&str, &str)],
    ) -> Self {
        let coordinator = Proc::spawn("coordinator", &["coordinator"], url, dir);
        let capacity = capacity.to_string();
        let workers = ids
            .iter()
            .map(|id| {
                let args = [
                    "worker",
                    "--services",
                    "echo,mail",
                    "--worker-id",
                    id,
                    "--capacity",
                    &capacity,
                ];
                Proc::spawn_env(id, &args, url, dir, env)
            })
            .collect();
        let admin = Admin::connect(broker.clone(), Duration::from_secs(30))
            .await
            .unwrap();
        wait_status(&admin, "the workers", Duration::from_secs(60), |s| {
            count(s, WorkerState::Active) == ids.len()
        })
        .await;
        let client = Client::connect(broker, ClientOptions::default())
            .await
            .unwrap();
        Self {
            coordinator,
            workers,
            admin,
            client,
        }
    }

    /// Asserts that every worker still runs; their logs.
    pub fn logs_of_live_workers(&mut self) -> Vec<String> {
        self.workers
            .iter_mut()
            .map(|w| {
                assert!(w.running(), "{} died:\n{}", w.name, w.log());
                w.log()
            })
            .collect()
    }
}

/// An in-process cluster on the embedded broker with workers of `echo` and
/// `mail` of a small capacity, an operator's handle and a client.
pub async fn small_local_cluster(
    ids: &[&str],
    capacity: u32,
) -> (callq_testkit::LocalCluster, Admin, Client) {
    let opts = ClusterOptions {
        capacity: u16::try_from(capacity).unwrap(),
        ..ClusterOptions::default()
    };
    let mut cluster =
        callq_testkit::LocalCluster::start(opts, callq_coordinator::MemoryStore::default())
            .await
            .unwrap();
    for id in ids {
        cluster
            .spawn_worker(id, &["echo", "mail"], false)
            .await
            .unwrap();
    }
    let admin = cluster.admin().await.unwrap();
    let client = cluster.client().await.unwrap();
    (cluster, admin, client)
}

/// The result of a spawned call of a test, within `bound`; panics naming
/// `what` when it takes longer or failed.
pub async fn joined<T>(waiting: tokio::task::JoinHandle<T>, bound: Duration, what: &str) -> T {
    tokio::time::timeout(bound, waiting)
        .await
        .unwrap_or_else(|_| panic!("{what}: no outcome within {bound:?}"))
        .unwrap()
}
