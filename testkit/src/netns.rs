//! A process partitioned from the host but alive: a Linux network namespace
//! of its own, linked to the host by a veth pair whose traffic a test can
//! cut and restore.
//!
//! ```text
//!   host                                namespace callq-<tag>-p<pid>-<seq>
//!   cqh<N>  10.231.N.1/30  <-- veth -->  cqn<N>  10.231.N.2/30, default via .1
//! ```
//!
//! [`Netns::cut`] drops every packet in and out of the namespace's end of
//! the veth (`iptables -j DROP` inside the namespace): nothing is refused
//! or reset (no RST, no ICMP) and the addresses, routes and neighbour
//! entries stay, so the TCP connections on both sides stay established and
//! merely retransmit, as across a real partition; each side learns of the
//! loss only from its own timeouts (AMQP heartbeats, TCP retries).
//! [`Netns::restore`] deletes the rules: a connection neither side gave up
//! on carries on at TCP's next retransmission, which backs off (up to about
//! as long again as the cut lasted).
//!
//! Needs root, iproute2 (`ip`) and iptables (Debian packages `iproute2`,
//! `iptables`; scripts/services installs iptables). Every command is killed
//! after [`COMMAND_TIMEOUT`]. The slot `N` (1-254) is claimed by creating
//! the veth `cqh<N>`, which fails while any namespace, live or left over,
//! holds it; the namespaces of processes that died (a test killed mid-run)
//! are deleted, and what still runs in them killed, when the next one is
//! created.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

/// How long one `ip` or `iptables` command may take before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

const PREFIX: &str = "callq-";
const NEEDS: &str = "Netns needs root, iproute2 (`ip`) and iptables (scripts/services installs it)";

/// A network namespace linked to the host; deleted when dropped, with its
/// veth pair and whatever still runs in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// The claimed slot `N` (0 until claimed).
    slot: u8,
    cut: AtomicBool,
}

impl Netns {
    /// Creates the namespace `callq-<tag>-p<pid>-<seq>` (`tag`: letters,
    /// digits, `_`), its veth pair on a free slot, the addresses, the links
    /// up (`lo` too) and a default route in it via the host's end.
    pub fn create(tag: &str) -> anyhow::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("Netns tag `{tag}`: letters, digits and _ only");
        }
        run(&["iptables", "--version"])?;
        delete_stale()?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{tag}-p{}-{seq}", std::process::id());
        let _ = run(&["ip", "netns", "delete", &name]);
        run(&["ip", "netns", "add", &name])?;
        // From here on, dropping it deletes the namespace.
        let mut ns = Self {
            name,
            slot: 0,
            cut: AtomicBool::new(false),
        };
        let used = run(&["ip", "-4", "-o", "addr", "show"])?;
        // Spread over the slots, so that concurrent creators rarely race.
        let start = (std::process::id() as usize % 254 + seq as usize * 37) % 254;
        for slot in (0..254).map(|i| ((start + i) % 254 + 1) as u8) {
            let (host, peer) = (host_if(slot), ns_if(slot));
            if used.contains(&format!(" 10.231.{slot}.")) {
                continue;
            }
            match run(&["ip", "link", "add", &host, "type", "veth"]
                .into_iter()
                .chain(["peer", "name", &peer, "netns", &ns.name])
                .collect::<Vec<_>>())
            {
                Ok(_) => {
                    ns.slot = slot;
                    break;
                }
                Err(e) if e.to_string().contains("exists") => {}
                Err(e) => return Err(e),
            }
        }
        anyhow::ensure!(
            ns.slot != 0,
            "no free slot 10.231.N.0/30 (N = 1-254) for a Netns"
        );
        let (host, peer, n) = (host_if(ns.slot), ns_if(ns.slot), ns.name.clone());
        let (host_cidr, ns_cidr) = (
            format!("{}/30", ns.host_addr()),
            format!("{}/30", ns.ns_addr()),
        );
        let gateway = ns.host_addr().to_string();
        for args in [
            &["ip", "addr", "add", &host_cidr, "dev", &host][..],
            &["ip", "link", "set", &host, "up"],
            &["ip", "-n", &n, "addr", "add", &ns_cidr, "dev", &peer],
            &["ip", "-n", &n, "link", "set", &peer, "up"],
            &["ip", "-n", &n, "link", "set", "lo", "up"],
            &["ip", "-n", &n, "route", "add", "default", "via", &gateway],
        ] {
            run(args)?;
        }
        Ok(ns)
    }

    /// The namespace's name (`ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address a process in the namespace reaches the host at.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.slot, 1)
    }

    /// The namespace's own address, at which the host reaches it.
    pub fn ns_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.slot, 2)
    }

    /// `ip netns exec <name> <program>`, to which the caller adds the
    /// arguments, environment and stdio. `ip` execs the program (no fork):
    /// the child's id, and killing it, are the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Drops every packet both ways between the namespace and the host;
    /// the sockets on either side stay open. A no-op while cut.
    pub fn cut(&self) -> anyhow::Result<()> {
        if self.cut.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let done = self
            .rule("-I", "INPUT", "-i")
            .and_then(|()| self.rule("-I", "OUTPUT", "-o"));
        if done.is_err() {
            self.cut.store(false, Ordering::Release);
            let _ = self.rule("-D", "INPUT", "-i");
        }
        done.context("cutting the namespace off")
    }

    /// Lets the packets through again. A no-op unless cut.
    pub fn restore(&self) -> anyhow::Result<()> {
        if !self.cut.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let input = self.rule("-D", "INPUT", "-i");
        self.rule("-D", "OUTPUT", "-o")
            .and(input)
            .context("restoring the namespace's link")
    }

    /// `iptables <action> <chain> <-i|-o> cqn<N> -j DROP` in the namespace.
    fn rule(&self, action: &str, chain: &str, dir: &str) -> anyhow::Result<()> {
        let peer = ns_if(self.slot);
        let exec = ["ip", "netns", "exec", &self.name, "iptables", "-w", "5"];
        run(&[&exec[..], &[action, chain, dir, &peer, "-j", "DROP"]].concat()).map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_inside(&self.name);
        // Deleting one end deletes the pair at once; the namespace's
        // deletion would, a little later.
        let _ = run(&["ip", "link", "delete", &host_if(self.slot)]);
        let _ = run(&["ip", "netns", "delete", &self.name]);
    }
}

fn host_if(slot: u8) -> String {
    format!("cqh{slot}")
}

fn ns_if(slot: u8) -> String {
    format!("cqn{slot}")
}

/// The pid that made a namespace of this module's name, if it is one.
fn owner(name: &str) -> Option<u32> {
    let (rest, seq) = name.strip_prefix(PREFIX)?.rsplit_once('-')?;
    seq.parse::<u32>().ok()?;
    rest.rsplit_once("-p")?.1.parse().ok()
}

/// Deletes the namespaces whose creator died, killing what runs in them.
fn delete_stale() -> anyhow::Result<()> {
    let listed = run(&["ip", "netns", "list"])?;
    for name in listed.lines().filter_map(|l| l.split_whitespace().next()) {
        if owner(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            kill_inside(name);
            let _ = run(&["ip", "netns", "delete", name]);
        }
    }
    Ok(())
}

/// `kill -9` every process in the namespace `name`.
fn kill_inside(name: &str) {
    for pid in run(&["ip", "netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
    {
        let _ = run(&["kill", "-9", pid]);
    }
}

/// Runs `args` (program first), killed after [`COMMAND_TIMEOUT`]: its
/// standard output, or an error saying what failed and what it needs. (The
/// output of these commands is small: it waits in the pipe until they
/// exit.)
fn run(args: &[&str]) -> anyhow::Result<String> {
    let shown = args.join(" ");
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow!("cannot run `{shown}` ({e}): {NEEDS}"))?;
    let until = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {COMMAND_TIMEOUT:?}; {NEEDS}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        bail!("`{shown}` failed ({}): {}; {NEEDS}", out.status, why.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn interface_names_fit_and_owners_parse() {
        assert!(host_if(254).len() <= 15 && ns_if(254).len() <= 15);
        assert_eq!(owner("callq-partition-p4242-0"), Some(4242));
        assert_eq!(owner("callq-a_b-p7-12"), Some(7));
        for other in [
            "callq-x-4242-0",
            "other-p1-0",
            "callq-x-p1-y",
            "callq-x-p-0",
        ] {
            assert_eq!(owner(other), None, "{other}");
        }
    }

    #[test]
    fn failures_say_what_is_needed() {
        let e = run(&["callq-no-such-program"]).unwrap_err().to_string();
        assert!(
            e.contains("No such file") && e.contains("scripts/services"),
            "{e}"
        );
        let e = run(&["sh", "-c", "echo oops >&2; exit 3"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("oops") && e.contains("root"), "{e}");
        assert_eq!(run(&["echo", "hi"]).unwrap(), "hi\n");
        let e = Netns::create("no spaces").unwrap_err().to_string();
        assert!(e.contains("letters, digits"), "{e}");
    }
}
