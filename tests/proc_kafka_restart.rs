//! A Kafka-protocol broker restarted under load, with processes. The broker
//! is one of this test's own: tansu on S3 storage served by a separate
//! process (moto's S3 server), so that what tansu wrote before the restart
//! is there after it, as with a Kafka broker that keeps its log. tansu is
//! killed (`kill -9`) while calls of `echo.sleep` and `mail.send` run,
//! and started again on the same storage: every confirmed call ends in
//! exactly one outcome, no mail is sent twice, a call is `fatal` only where
//! a trace of it was granted, and the cluster serves new calls after each
//! restart without any of its processes being restarted. A call the broker
//! acknowledged and then no longer holds (tansu on S3 lost one after a
//! `kill -9`; this test stops it cleanly) cannot be answered by anyone: the
//! test reads the topics from their beginning to tell such a loss from
//! callq's, warns of the first and fails on the second.
//!
//! Needs `CALLQ_TANSU` and `CALLQ_S3_SERVER` (`scripts/kafka` provides both;
//! `scripts/test` sources it). Without them the test fails; it never skips.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use callq_node::Admin;
use callq_schemas::Outcome;
use callq_schemas::protocol::WorkerState;
use support::outcomes::{
    Recorder, check, mail, mixed, publish_in_background, serves_again, sort_mixed,
};
use support::{Proc, count, free_port, kafka, wait_status};
use tokio::time::Instant;
use uuid::Uuid;

/// Calls per phase: tansu on an S3 store serves far fewer calls a second
/// than on memory (each fetch lists the store's objects).
const CALLS: usize = 40;

/// Restarts of the broker. One: each takes tansu on its S3 store tens of
/// seconds to serve at speed again.
const RESTARTS: usize = 1;

/// Heartbeats once a second, a worker dead after 5 s of silence: tansu on
/// an S3 store answers in tens of milliseconds where it answers in
/// microseconds on memory, and every heartbeat is an object in the store
/// that each later fetch lists.
const SLOW_BROKER: [(&str, &str); 3] = [
    ("CALLQ_COORDINATOR__HEARTBEAT_INTERVAL", "1000"),
    ("CALLQ_COORDINATOR__DEAD_AFTER", "5"),
    ("CALLQ_WORKER__HEARTBEAT_INTERVAL", "1000"),
];

/// The bucket tansu keeps its log in.
const BUCKET: &str = "tansu";

/// A process this test started, killed when the test ends.
struct Owned {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Owned {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self { name, child, log }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then up to 30 s for the process to exit (`kill -9` after).
    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within 30 s of SIGTERM: killed", self.name);
        self.kill9();
    }

    /// Waits until 127.0.0.1:`port` takes connections; panics with the log
    /// when the process exits first or 30 s pass.
    fn wait_port(&mut self, port: u16) {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.log());
            }
            assert!(
                std::time::Instant::now() < until,
                "{} does not listen on {port} after 30 s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// tansu on a port of its own, keeping its log in an S3 bucket of a store
/// that outlives it.
struct DurableKafka {
    dir: PathBuf,
    port: u16,
    s3_port: u16,
    tansu: Owned,
    _store: Owned,
}

impl DurableKafka {
    fn start(dir: &Path) -> Self {
        let tool = |var: &str| {
            std::env::var(var).unwrap_or_else(|_| {
                panic!("{var} is not set: run `source scripts/kafka` (scripts/test does)")
            })
        };
        let s3_port = free_port();
        let mut store = Owned::spawn(
            "the S3 store",
            Command::new(tool("CALLQ_S3_SERVER")).args([
                "-H",
                "127.0.0.1",
                "-p",
                &s3_port.to_string(),
            ]),
            dir.join("s3.log"),
        );
        store.wait_port(s3_port);
        create_bucket(s3_port);
        let port = free_port();
        let tansu = Self::tansu(dir, port, s3_port, 0);
        Self {
            dir: dir.to_owned(),
            port,
            s3_port,
            tansu,
            _store: store,
        }
    }

    fn tansu(dir: &Path, port: u16, s3_port: u16, life: usize) -> Owned {
        let listener = format!("tcp://127.0.0.1:{port}");
        let mut tansu = Owned::spawn(
            "tansu",
            Command::new(std::env::var("CALLQ_TANSU").unwrap())
                .args(["broker", "--listener-url", &listener])
                .args(["--advertised-listener-url", &listener])
                .args(["--storage-engine", &format!("s3://{BUCKET}/")])
                .env("AWS_ENDPOINT", format!("http://127.0.0.1:{s3_port}"))
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_ACCESS_KEY_ID", "callq-test")
                .env("AWS_SECRET_ACCESS_KEY", "callq-test")
                .env("AWS_DEFAULT_REGION", "us-east-1"),
            dir.join(format!("tansu-{life}.log")),
        );
        tansu.wait_port(port);
        tansu
    }

    /// tansu stopped (SIGTERM), `down` of nothing listening, and tansu
    /// again on the same port and storage.
    fn restart(&mut self, down: Duration, life: usize) {
        self.tansu.stop();
        std::thread::sleep(down);
        self.tansu = Self::tansu(&self.dir, self.port, self.s3_port, life);
    }

    fn url(&self) -> String {
        format!(
            "kafka://127.0.0.1:{}?partitions=1&session_timeout_ms=6000&fetch_wait_ms=500",
            self.port
        )
    }
}

/// `PUT /<bucket>` on the S3 store: creates the bucket.
fn create_bucket(port: u16) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the S3 store did not create the bucket: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_broker_restart_mid_load_ends_every_confirmed_call_once_and_the_cluster_serves_on()
{
    let dir = support::temp_dir("krestart");
    let mut broker = DurableKafka::start(&dir);
    let url = broker.url();
    eprintln!("broker {url}, logs in {}", dir.display());
    let mut coordinator =
        Proc::spawn_env("coordinator", &["coordinator"], &url, &dir, &SLOW_BROKER);
    let mut workers: Vec<Proc> = ["kr1", "kr2"]
        .into_iter()
        .map(|id| {
            let args = ["worker", "--services", "echo,mail", "--worker-id", id];
            Proc::spawn_env(id, &args, &url, &dir, &SLOW_BROKER)
        })
        .collect();
    let admin = Admin::connect(kafka(&url).await, Duration::from_secs(30))
        .await
        .unwrap();
    wait_status(&admin, "2 active workers", Duration::from_secs(90), |s| {
        count(s, WorkerState::Active) == 2
    })
    .await;
    drop(admin);

    let recorder = Arc::new(Recorder::start(kafka(&url).await).await);
    let outbox = dir.join("mail.outbox");
    let (mut echo, mut mails) = (Vec::new(), Vec::new());
    for life in 1..=RESTARTS {
        let calls = mixed(&outbox, CALLS);
        // Published over some 4 s: the restart comes while calls are being
        // published, queued and run.
        let load = publish_in_background(&recorder, calls, Duration::from_millis(100));
        let started = Instant::now();
        // The restart hits work in progress: calls answered, some running.
        let until = Instant::now() + Duration::from_secs(90);
        while recorder.replies().len() < (life - 1) * (CALLS + 1) + CALLS / 5 {
            assert!(Instant::now() < until, "no load before restart {life}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let answered = recorder.replies().len();
        eprintln!(
            "restart {life}: {answered} calls answered {:.1} s into the load",
            started.elapsed().as_secs_f64()
        );
        broker.restart(Duration::from_secs(2), life);
        let back = Instant::now();
        eprintln!("restart {life}: tansu stopped and started again");
        let ids = load.await.unwrap();
        serves_again(
            &recorder,
            &format!("restart {life}"),
            back,
            Duration::from_secs(60),
        )
        .await;
        sort_mixed(ids, &mut echo, &mut mails);
    }
    let (reply, _) = recorder
        .call_after(mail(&outbox, 0), Duration::from_secs(90))
        .await;
    assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    mails.push(reply.call_id);
    let all: Vec<Uuid> = echo.iter().chain(&mails).copied().collect();
    let missing = unanswered(&recorder, &all, Duration::from_secs(90)).await;
    if !missing.is_empty() {
        // Which side lost them: the broker (the call is not in its log any
        // more), or callq (the broker kept it and no answer came)?
        let kafka = callq_broker_kafka::KafkaBroker::connect(&url)
            .await
            .unwrap();
        let mut kept = in_log(&kafka, "callq.call.echo").await;
        kept.extend(in_log(&kafka, "callq.call.mail").await);
        let answered = in_log(&kafka, recorder.reply_to()).await;
        let (on_broker, gone): (Vec<Uuid>, Vec<Uuid>) =
            missing.iter().partition(|id| kept.contains(id));
        assert!(
            on_broker.is_empty(),
            "{} of {} confirmed calls got no reply within 90 s though the broker's log \
             holds them: {on_broker:?} (of which answered in the reply topic: {:?}); \
             not in the log any more: {gone:?}",
            missing.len(),
            all.len(),
            on_broker
                .iter()
                .filter(|id| answered.contains(id))
                .collect::<Vec<_>>()
        );
        // tansu acknowledged these and lost them: callq cannot answer a
        // call its broker no longer has (docs/RELIABILITY.md, "What a
        // broker keeps is what callq keeps").
        eprintln!(
            "WARNING: the broker lost {} acknowledged calls across its restart \
             (not in its log any more): {gone:?}",
            gone.len()
        );
        echo.retain(|id| !gone.contains(id));
        mails.retain(|id| !gone.contains(id));
    }
    let ended = check(&recorder.replies(), &echo, &mails, &outbox);
    eprintln!("after {RESTARTS} Kafka broker restart(s): {ended:?}");
    assert!(coordinator.running(), "{}", coordinator.log());
    for w in &mut workers {
        assert!(w.running(), "{} exited:\n{}", w.name, w.log());
    }
}

/// The calls of `ids` still without a reply after `timeout`.
async fn unanswered(recorder: &Recorder, ids: &[Uuid], timeout: Duration) -> Vec<Uuid> {
    let until = Instant::now() + timeout;
    loop {
        let replies = recorder.replies();
        let missing: Vec<Uuid> = ids
            .iter()
            .filter(|id| !replies.contains_key(id))
            .copied()
            .collect();
        if missing.is_empty() || Instant::now() >= until {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `call_id`s of the messages a queue's topic holds now, read from its
/// beginning by a tap (which takes nothing from the queue's consumers).
async fn in_log(kafka: &callq_broker_kafka::KafkaBroker, queue: &str) -> HashSet<Uuid> {
    use callq_broker::{Tap as _, TapEvent};
    let range = callq_broker_kafka::TapRange {
        from: callq_broker_kafka::TapFrom::Beginning,
        until_ms: None,
    };
    let mut tap = kafka.tap(queue, range, 1024).await.unwrap();
    let mut ids = HashSet::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), tap.next()).await {
            Ok(Some(Ok(TapEvent::Message(m)))) => {
                let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or_default();
                if let Some(id) = body["call_id"].as_str().and_then(|s| s.parse().ok()) {
                    ids.insert(id);
                }
            }
            Ok(Some(Ok(TapEvent::RangeEnd)) | None) => return ids,
            Ok(Some(Err(e))) => panic!("reading {queue} from its beginning: {e}"),
            Err(_) => panic!("reading {queue} from its beginning: nothing within 30 s"),
        }
    }
}
