//! The processes a seed runs: one coordinator on a store of the seed's own
//! and workers with fault hooks, all `callq` processes started from this
//! binary, killed, paused and restarted for real.

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use callq_node::probe::Point;
use callq_testkit::netns::Netns;
use tokio::time::Instant;

use crate::cli::hooks::Broken;

/// How the seed's processes are started.
#[derive(Debug, Clone)]
pub(super) struct Setup {
    pub(super) dir: PathBuf,
    pub(super) config: Option<PathBuf>,
    /// Worker ids start with it.
    pub(super) tag: String,
    /// `--services` of every worker.
    pub(super) services: String,
    pub(super) broken: Option<Broken>,
}

/// A worker process.
pub(super) struct Member {
    pub(super) id: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// The namespace it runs in, for partitions.
    pub(super) netns: Option<Netns>,
}

/// The seed's processes.
pub(super) struct Fleet {
    setup: Setup,
    coordinator: Option<Child>,
    pub(super) workers: Vec<Member>,
    started: usize,
}

fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the callq binary to start processes from")
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
pub(super) fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .context("cannot run kill")?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

impl Fleet {
    pub(super) fn new(setup: Setup) -> Self {
        Self {
            setup,
            coordinator: None,
            workers: Vec::new(),
            started: 0,
        }
    }

    fn command(&self, mut cmd: Command, name: &str, args: &[&str]) -> anyhow::Result<Command> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.setup.dir.join(format!("{name}.log")))
            .context("cannot open a process log")?;
        if let Some(config) = &self.setup.config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(args)
            .current_dir(&self.setup.dir)
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(cmd)
    }

    /// Starts the coordinator on the seed's store (again, after a kill).
    pub(super) fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.command(Command::new(exe()?), "coordinator", &["coordinator"])?;
        cmd.env(
            "CALLQ_COORDINATOR__STORE",
            self.setup.dir.join("ledger.redb"),
        )
        .stdin(Stdio::null());
        self.coordinator = Some(cmd.spawn().context("cannot start a coordinator")?);
        Ok(())
    }

    /// Starts a worker (in `netns`, on `broker` there, if given); its id.
    pub(super) fn start_worker(&mut self, netns: Option<(Netns, &str)>) -> anyhow::Result<String> {
        self.started += 1;
        let id = format!("{}-w{}", self.setup.tag, self.started);
        // A worker in a namespace reaches the broker at the host's address
        // only: PostgreSQL on the host's loopback is out of its reach, so it
        // serves everything but `bank`.
        let services = match &netns {
            Some(_) => self
                .setup
                .services
                .split(',')
                .filter(|s| *s != "bank")
                .collect::<Vec<_>>()
                .join(","),
            None => self.setup.services.clone(),
        };
        let mut args = vec![
            "worker",
            "--services",
            &services,
            "--worker-id",
            &id,
            "--fault-hooks",
        ];
        let broken = self
            .setup
            .broken
            .and_then(|b| clap::ValueEnum::to_possible_value(&b));
        let broken = broken.as_ref().map(|v| v.get_name());
        if let Some(b) = broken {
            args.extend(["--broken", b]);
        }
        let base = match &netns {
            Some((ns, _)) => ns.command(exe()?),
            None => Command::new(exe()?),
        };
        let mut cmd = self.command(base, &id, &args)?;
        if let Some((_, broker)) = &netns {
            cmd.env("CALLQ_BROKER", broker);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start worker {id}"))?;
        self.workers.push(Member {
            id: id.clone(),
            stdin: child.stdin.take(),
            child,
            netns: netns.map(|(ns, _)| ns),
        });
        Ok(id)
    }

    /// Forgets the workers that exited; the ids of those.
    pub(super) fn reap(&mut self) -> Vec<String> {
        let mut gone = Vec::new();
        self.workers.retain_mut(|w| match w.child.try_wait() {
            Ok(None) => true,
            _ => {
                gone.push(w.id.clone());
                false
            }
        });
        gone
    }

    /// The workers outside any namespace (those a process fault may hit).
    pub(super) fn plain(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|i| self.workers[*i].netns.is_none())
            .collect()
    }

    pub(super) fn pid(&self, i: usize) -> u32 {
        self.workers[i].child.id()
    }

    /// `kill -9` of worker `i`; its id.
    pub(super) fn kill_worker(&mut self, i: usize) -> String {
        let mut w = self.workers.remove(i);
        let _ = w.child.kill();
        let _ = w.child.wait();
        w.id
    }

    /// Arms worker `i` to crash at `point`; waits (at most `within`) until
    /// it has, and whether it did.
    pub(super) async fn crash(&mut self, i: usize, point: Point, within: Duration) -> bool {
        let w = &mut self.workers[i];
        let armed = w.stdin.as_mut().is_some_and(|s| {
            writeln!(s, "crash {point}")
                .and_then(|()| s.flush())
                .is_ok()
        });
        if !armed {
            return false;
        }
        let until = Instant::now() + within;
        while Instant::now() < until {
            if !matches!(w.child.try_wait(), Ok(None)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Whether the coordinator runs.
    pub(super) fn coordinator_runs(&mut self) -> bool {
        self.coordinator
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The coordinator's process id.
    pub(super) fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref().map(Child::id)
    }

    /// `kill -9` of the coordinator.
    pub(super) fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every process.
    pub(super) fn shutdown(&mut self) {
        for w in &mut self.workers {
            // A paused process dies of SIGKILL too.
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        self.workers.clear();
        self.kill_coordinator();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}
