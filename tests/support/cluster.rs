//! The three-node RabbitMQ cluster of the node-loss test
//! (`scripts/rabbitmq-cluster`, which scripts/services starts): its nodes,
//! a virtual host of one test on it, the node leading a quorum queue,
//! killing and restarting nodes, and a steady load of calls that records
//! when each was published and confirmed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callq_schemas::Call;
use tokio::time::Instant;
use uuid::Uuid;

use super::outcomes::Recorder;

/// The cluster as `scripts/rabbitmq-cluster env` describes it.
pub struct RabbitCluster {
    /// Its nodes' names, `callq-c1@<host>`, ...
    pub nodes: Vec<String>,
    /// `127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683`.
    pub hosts: String,
}

impl RabbitCluster {
    /// The cluster scripts/services started; panics saying how to start it.
    pub fn get() -> Self {
        let need = |key: &str| {
            std::env::var(key).unwrap_or_else(|_| {
                panic!(
                    "{key} is not set: run scripts/test, or `scripts/rabbitmq-cluster start` and \
                     export what `scripts/rabbitmq-cluster env` prints"
                )
            })
        };
        Self {
            nodes: need("CALLQ_CLUSTER_NODES")
                .split(',')
                .map(str::to_owned)
                .collect(),
            hosts: need("CALLQ_CLUSTER_HOSTS"),
        }
    }

    /// `scripts/rabbitmq-cluster args..`: what it printed; panics with its
    /// output when it fails.
    pub fn script(&self, args: &[&str]) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-cluster");
        let out = Command::new(script).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/rabbitmq-cluster {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `rabbitmqctl -q -n <node> args..` on the first node that answers.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut last = String::new();
        for node in &self.nodes {
            let out = Command::new("timeout")
                .args(["60", "rabbitmqctl", "-q", "-n", node])
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            last = format!(
                "{node}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("rabbitmqctl {args:?} failed on every node; last: {last}");
    }

    /// The node leading the quorum queue `queue` of `vhost`.
    pub fn leader(&self, queue: &str, vhost: &str) -> String {
        self.script(&["leader", queue, vhost])
    }

    /// `kill -9` of the node's Erlang VM.
    pub fn kill(&self, node: &str) {
        eprintln!("{}", self.script(&["kill", node]));
    }

    /// Starts the node again and waits until it serves in the cluster.
    pub fn restart(&self, node: &str) {
        self.script(&["restart", node]);
    }

    /// The quorum queues of `vhost` and the nodes each has a member on.
    pub fn quorum_members(&self, vhost: &str) -> Vec<(String, Vec<String>)> {
        let text = self.ctl(&[
            "list_queues",
            "-p",
            vhost,
            "name",
            "type",
            "members",
            "--formatter",
            "json",
        ]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("list_queues gave no JSON ({e}): {text}"));
        rows.iter()
            .filter(|q| q["type"] == "quorum")
            .map(|q| {
                let members = q["members"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(|n| n.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                (q["name"].as_str().unwrap_or_default().to_owned(), members)
            })
            .collect()
    }
}

/// Starts every node of the cluster that is down when dropped, so that a
/// failed test leaves the cluster whole for the next run.
pub struct Revive;

impl Drop for Revive {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-cluster");
        let _ = Command::new(script).arg("start").output();
    }
}

/// A virtual host of one test on the cluster, deleted when dropped.
pub struct ClusterVhost {
    /// Its name.
    pub name: String,
    /// The URL naming all three nodes.
    pub url: String,
    nodes: Vec<String>,
}

impl ClusterVhost {
    /// Creates `callq-test-<run>-<tag>-<uuid>` with all permissions for
    /// guest; its URL names every node of the cluster.
    pub fn create(cluster: &RabbitCluster, tag: &str) -> Self {
        let run = std::env::var("CALLQ_TEST_RUN").unwrap_or_else(|_| "manual".into());
        let name = format!("callq-test-{run}-{tag}-{}", Uuid::now_v7().simple());
        cluster.ctl(&["add_vhost", &name]);
        cluster.ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let url = format!("amqp://guest:guest@{}/{name}", cluster.hosts);
        Self {
            name,
            url,
            nodes: cluster.nodes.clone(),
        }
    }
}

impl Drop for ClusterVhost {
    fn drop(&mut self) {
        for node in &self.nodes {
            let deleted = Command::new("timeout")
                .args([
                    "60",
                    "rabbitmqctl",
                    "-q",
                    "-n",
                    node,
                    "delete_vhost",
                    &self.name,
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if deleted {
                return;
            }
        }
    }
}

/// A call of the steady load, once the broker confirmed it.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: Uuid,
    pub mail: bool,
    /// When its first publish began.
    pub began: Instant,
}

/// Calls published one after another, `gap` apart, until stopped: every
/// third a `mail.send` to `outbox`, the others `echo.sleep` of `sleep_ms`.
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Sent>>>,
    task: tokio::task::JoinHandle<()>,
    /// Where the mails go.
    pub outbox: PathBuf,
}

impl SteadyLoad {
    pub fn start(recorder: &Arc<Recorder>, outbox: &Path, gap: Duration, sleep_ms: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
        let task = {
            let (recorder, stop, sent) = (recorder.clone(), stop.clone(), sent.clone());
            let outbox = outbox.to_owned();
            tokio::spawn(async move {
                let mut n = 0_u64;
                while !stop.load(Ordering::Acquire) {
                    let mail = n.is_multiple_of(3);
                    let call: Call = if mail {
                        super::outcomes::mail(&outbox, 20)
                    } else {
                        super::outcomes::echo_sleep(sleep_ms)
                    };
                    let began = Instant::now();
                    let id = recorder.publish(call).await;
                    sent.lock().unwrap().push(Sent { id, mail, began });
                    n += 1;
                    tokio::time::sleep(gap).await;
                }
            })
        };
        Self {
            stop,
            sent,
            task,
            outbox: outbox.to_owned(),
        }
    }

    /// The calls confirmed so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    /// Stops publishing; every call confirmed.
    pub async fn stop(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Release);
        self.task.await.unwrap();
        self.sent.lock().unwrap().clone()
    }
}
