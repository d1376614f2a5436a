//! The per-key concurrency scenario every broker runs: workers of `echo`
//! with `max_running_per_key.echo = 1`, and a client that publishes
//! [`CALLS`] calls of `echo.span` over [`KEYS`] keys at once.
//!
//! From the start and end times the handler records: no two calls of one
//! key ever ran at once, while calls of different keys did; every call
//! ended `ok` exactly once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use callq_node::{CallOptions, Client};
use callq_schemas::{Outcome, Reply};
use serde_json::json;
use tokio::task::JoinHandle;

/// The calls published.
pub const CALLS: usize = 1_000;
/// The keys they are spread over.
pub const KEYS: usize = 20;
/// Each worker's capacity: together the workers could run more calls at
/// once than there are keys.
pub const CAPACITY: u32 = 8;
/// How long each call runs.
const RUN_MS: u64 = 10;

/// One call as it ran.
#[derive(Debug, Clone, Copy)]
pub struct Ran {
    pub started_us: u64,
    pub ended_us: u64,
    pub pid: u64,
}

/// Calls on their way: each ends with its key and reply.
pub type Waiting = Vec<JoinHandle<(String, Reply)>>;

/// Publishes `calls` calls of `echo.span` over `keys` keys at once, each
/// running `ms`; `answered` counts their replies as they come.
pub fn publish(
    client: &Client,
    (calls, keys, ms): (usize, usize, u64),
    answered: &Arc<AtomicUsize>,
) -> Waiting {
    (0..calls)
        .map(|i| {
            let client = client.clone();
            let answered = answered.clone();
            let key = format!("account-{}", i % keys);
            tokio::spawn(async move {
                let opts = CallOptions {
                    concurrency_key: Some(key.clone()),
                    timeout: Some(Duration::from_secs(240)),
                    ..CallOptions::default()
                };
                let reply = client
                    .call("echo", "span", json!({ "ms": ms }), opts)
                    .await
                    .unwrap();
                answered.fetch_add(1, Ordering::Relaxed);
                (key, reply)
            })
        })
        .collect()
}

/// Runs the scenario; returns how many calls ran at once at most, and the
/// processes the calls ran in.
pub async fn scenario(client: &Client) -> (usize, HashSet<u64>) {
    let waiting = publish(client, (CALLS, KEYS, RUN_MS), &Arc::default());
    check(waiting).await
}

/// Every call ends `ok` once and no two calls of one key ran at once;
/// returns how many calls ran at once at most, and the processes the calls
/// ran in.
pub async fn check(waiting: Waiting) -> (usize, HashSet<u64>) {
    let mut by_key: BTreeMap<String, Vec<Ran>> = BTreeMap::new();
    let mut answered = HashSet::new();
    for w in waiting {
        let (key, reply) = super::joined(w, Duration::from_secs(300), "a keyed call").await;
        assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
        assert!(answered.insert(reply.call_id), "answered twice: {reply:?}");
        let r = reply.result.as_ref().unwrap();
        let field = |name: &str| r[name].as_u64().unwrap_or_else(|| panic!("{name} in {r}"));
        by_key.entry(key).or_default().push(Ran {
            started_us: field("started_us"),
            ended_us: field("ended_us"),
            pid: field("pid"),
        });
    }
    for (key, runs) in &mut by_key {
        runs.sort_by_key(|r| r.started_us);
        for pair in runs.windows(2) {
            assert!(
                pair[1].started_us >= pair[0].ended_us,
                "two calls of `{key}` ran at once: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
    }
    let all: Vec<Ran> = by_key.values().flatten().copied().collect();
    let pids = all.iter().map(|r| r.pid).collect();
    (most_at_once(&all), pids)
}

/// The most calls that ran at the same moment.
fn most_at_once(runs: &[Ran]) -> usize {
    // Ends before starts at the same instant: touching runs do not overlap.
    let mut edges: Vec<(u64, i8)> = runs
        .iter()
        .flat_map(|r| [(r.started_us, 1), (r.ended_us, -1)])
        .collect();
    edges.sort_unstable();
    let (mut now, mut most) = (0_i64, 0_i64);
    for (_, step) in edges {
        now += i64::from(step);
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}
