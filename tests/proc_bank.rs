//! Exact transactions under faults: `callq worker` processes serving
//! `bank.transfer` on a real RabbitMQ and a real PostgreSQL, killed with
//! SIGKILL while 2,000 transfers are in flight. Needs RabbitMQ
//! (`rabbitmqctl`) and the PostgreSQL `CALLQ_POSTGRES` names (default
//! `postgres://postgres@127.0.0.1/test`); `scripts/services` makes sure
//! both run. Without them the test fails; it never skips.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use callq_node::pg;
use callq_node::{Admin, CallOptions, Client, ClientOptions};
use callq_schemas::protocol::WorkerState;
use callq_schemas::{Outcome, Uuid};
use callq_testkit::chaos::Fleet;
use futures::StreamExt;
use serde_json::json;
use support::{Proc, Vhost, Workers, count, wait_status};

const ACCOUNTS: usize = 50;
const OPENING: i64 = 10_000;
const TRANSFERS: usize = 2_000;
const KILLS: usize = 3;

fn bank_worker(id: &str, vhost: &Vhost, dir: &std::path::Path) -> Proc {
    Proc::spawn(
        id,
        &["worker", "--services", "bank", "--worker-id", id],
        &vhost.url,
        dir,
    )
}

/// Three workers, 2,000 transfers between 50 accounts all in flight, three
/// workers killed with SIGKILL (each replaced): the money is all there,
/// every call committed exactly once, every client got one outcome, and no
/// call ended `fatal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_stay_exact_while_workers_are_killed() {
    let url = std::env::var("CALLQ_POSTGRES").unwrap_or_else(|_| pg::DEFAULT_URL.to_owned());
    let db = pg::pool(&url, 4).unwrap();
    let vhost = Vhost::create("bank");
    let dir = support::temp_dir("bank");
    let mut coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let mut procs = HashMap::new();
    for id in ["b1", "b2", "b3"] {
        procs.insert(id.to_owned(), bank_worker(id, &vhost, &dir));
    }
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "3 active workers", Duration::from_secs(30), |s| {
        count(s, WorkerState::Active) == 3
    })
    .await;
    let client = Client::connect(broker.clone(), ClientOptions::default())
        .await
        .unwrap();
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(120)),
        ..CallOptions::default()
    };

    let run = Uuid::now_v7().simple().to_string();
    let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("t{run}-{i}")).collect();
    for a in &accounts {
        let r = client
            .call(
                "bank",
                "open",
                json!({ "account": a, "cents": OPENING }),
                opts.clone(),
            )
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    }

    // The transfers, all in flight at once, while a killer takes down the
    // busiest worker every 500 ms and starts a replacement.
    let transfers = {
        let (client, accounts, opts) = (client.clone(), accounts.clone(), opts.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..TRANSFERS)
                .map(|i| {
                    let (client, opts) = (client.clone(), opts.clone());
                    let from = accounts[i % ACCOUNTS].clone();
                    let to = accounts[(i * 7 + 1 + i / ACCOUNTS) % ACCOUNTS].clone();
                    let to = if to == from {
                        accounts[(i + 1) % ACCOUNTS].clone()
                    } else {
                        to
                    };
                    let cents = 1 + (i % 9) as i64;
                    async move {
                        client
                            .call(
                                "bank",
                                "transfer",
                                json!({ "from": from, "to": to, "cents": cents }),
                                opts,
                            )
                            .await
                    }
                })
                .buffer_unordered(TRANSFERS)
                .collect::<Vec<_>>()
                .await
        })
    };
    let mut fleet = Workers {
        procs,
        admin: Admin::connect(support::amqp(&vhost.url).await, Duration::from_secs(10))
            .await
            .unwrap(),
        spare: &[],
    };
    let mut killed = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    while killed.len() < KILLS && !transfers.is_finished() {
        tick.tick().await;
        if let Some(id) = fleet.kill_busiest().await.unwrap() {
            let next = format!("b{}", 4 + killed.len());
            fleet
                .procs
                .insert(next.clone(), bank_worker(&next, &vhost, &dir));
            killed.push(id);
        }
    }
    let replies = transfers.await.unwrap();

    let mut outcomes = BTreeMap::new();
    let mut ids = Vec::new();
    for r in &replies {
        let r = r.as_ref().unwrap();
        *outcomes.entry(format!("{:?}", r.outcome)).or_insert(0) += 1;
        ids.push(r.call_id);
    }
    eprintln!("killed {killed:?}; outcomes {outcomes:?}");
    assert_eq!(killed.len(), KILLS, "the load ended before {KILLS} kills");
    assert_eq!(
        outcomes.get("Ok"),
        Some(&TRANSFERS),
        "every transfer ended ok, none fatal: {outcomes:?}"
    );
    let c = db.get().await.unwrap();
    let sum: i64 = c
        .query_one(
            "select sum(cents)::bigint from bank_accounts where id = any($1)",
            &[&accounts],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, OPENING * ACCOUNTS as i64, "money was made or lost");
    let (rows, distinct, retried): (i64, i64, i64) = {
        let row = c
            .query_one(
                "select count(*), count(distinct call_id), count(*) filter (where attempt > 1) \
                 from callq_outbox where call_id = any($1)",
                &[&ids],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        (rows, distinct),
        (TRANSFERS as i64, TRANSFERS as i64),
        "one outbox row per call"
    );
    eprintln!("{retried} transfers committed by a later attempt than their first");
    assert!(
        retried > 0,
        "no transfer was on a killed worker: the kills proved nothing"
    );
    assert!(coordinator.running(), "{}", coordinator.log());
    for proc in fleet.procs.values_mut() {
        assert!(proc.running(), "{} died:\n{}", proc.name, proc.log());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
