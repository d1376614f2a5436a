//! Exact transactions through the context, on a real PostgreSQL (the one
//! `CALLQ_POSTGRES` names, default `postgres://postgres@127.0.0.1/test`;
//! `scripts/services` makes sure it runs). Without it the tests fail; they
//! never skip.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use callq_node::bank::bank;
use callq_node::pg::{self, Pool};
use callq_node::{Ctx, HandlerError, Service};
use serde_json::{Value, json};

fn pool() -> Pool {
    let url = std::env::var("CALLQ_POSTGRES").unwrap_or_else(|_| pg::DEFAULT_URL.to_owned());
    pg::pool(&url, 16).unwrap()
}

/// Accounts of this test run only.
fn account(tag: &str, name: &str) -> String {
    format!("{tag}-{}-{name}", uuid::Uuid::now_v7().simple())
}

async fn run(bank: &Service, ctx: &Ctx, method: &str, args: Value) -> Result<Value, HandlerError> {
    bank.invoke(method, ctx.clone(), args).unwrap().await
}

async fn balance(bank: &Service, account: &str) -> i64 {
    let got = run(
        bank,
        &Ctx::for_test("bank", "balance"),
        "balance",
        json!({ "account": account }),
    )
    .await
    .unwrap_or_else(|e| {
        panic!("balance of {account}: {e} (is PostgreSQL up? scripts/services starts it)")
    });
    got["cents"].as_i64().unwrap()
}

async fn open(bank: &Service, account: &str, cents: i64) {
    run(
        bank,
        &Ctx::for_test("bank", "open"),
        "open",
        json!({ "account": account, "cents": cents }),
    )
    .await
    .unwrap();
}

async fn outbox_rows(pool: &Pool, call_id: uuid::Uuid) -> i64 {
    let client = pool.get().await.unwrap();
    client
        .query_one(
            "select count(*) from callq_outbox where call_id = $1",
            &[&call_id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_transfer_runs_once_however_often_its_call_runs() {
    let pool = pool();
    let bank = bank(pool.clone());
    let (a, b) = (account("once", "a"), account("once", "b"));
    open(&bank, &a, 100).await;
    open(&bank, &b, 0).await;
    let ctx = Ctx::for_test("bank", "transfer");
    let args = json!({ "from": a, "to": b, "cents": 30 });
    let first = run(&bank, &ctx, "transfer", args.clone()).await.unwrap();
    assert_eq!(first, json!({ "from": a, "to": b, "cents": 30 }));
    // The same call again (a later attempt, or a redelivery): the committed
    // result, and no second transfer.
    let again = run(&bank, &ctx, "transfer", args).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(
        (balance(&bank, &a).await, balance(&bank, &b).await),
        (70, 30)
    );
    assert_eq!(outbox_rows(&pool, ctx.call_id()).await, 1);
    // The pool bounds every statement.
    let limit: String = pool
        .get()
        .await
        .unwrap()
        .query_one("show statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(limit, "30s");
}

#[tokio::test]
async fn attempts_racing_to_commit_commit_once() {
    let pool = pool();
    let bank = bank(pool.clone());
    let (a, b) = (account("race", "a"), account("race", "b"));
    open(&bank, &a, 100).await;
    open(&bank, &b, 0).await;
    for _ in 0..20 {
        let ctx = Ctx::for_test("bank", "transfer");
        let args = json!({ "from": a, "to": b, "cents": 1 });
        let (x, y) = tokio::join!(
            run(&bank, &ctx, "transfer", args.clone()),
            run(&bank, &ctx, "transfer", args.clone())
        );
        assert_eq!(x.unwrap(), y.unwrap(), "both attempts answer alike");
        assert_eq!(outbox_rows(&pool, ctx.call_id()).await, 1);
    }
    assert_eq!(
        (balance(&bank, &a).await, balance(&bank, &b).await),
        (80, 20),
        "20 calls, each run twice at once, moved 20 cents"
    );
}

#[tokio::test]
async fn insufficient_funds_is_a_deterministic_error_that_leaves_nothing() {
    let pool = pool();
    let bank = bank(pool.clone());
    let (a, b) = (account("poor", "a"), account("poor", "b"));
    open(&bank, &a, 10).await;
    open(&bank, &b, 0).await;
    let ctx = Ctx::for_test("bank", "transfer");
    let e = run(
        &bank,
        &ctx,
        "transfer",
        json!({ "from": a, "to": b, "cents": 11 }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, "insufficient_funds", "{e}");
    assert_eq!(
        (balance(&bank, &a).await, balance(&bank, &b).await),
        (10, 0)
    );
    assert_eq!(outbox_rows(&pool, ctx.call_id()).await, 0);
    for (args, code) in [
        (
            json!({ "from": a, "to": "nobody", "cents": 1 }),
            "no_such_account",
        ),
        (json!({ "from": a, "to": a, "cents": 1 }), "invalid_args"),
        (json!({ "from": a, "to": b, "cents": -1 }), "invalid_args"),
        (json!({ "from": a, "to": b }), "invalid_args"),
    ] {
        let e = run(
            &bank,
            &Ctx::for_test("bank", "transfer"),
            "transfer",
            args.clone(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, code, "{args}: {e}");
    }
    let e = run(
        &bank,
        &Ctx::for_test("bank", "open"),
        "open",
        json!({ "account": a, "cents": 5 }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, "account_exists");
}

#[tokio::test]
async fn concurrent_transfers_keep_the_sum() {
    let pool = pool();
    let bank = bank(pool.clone());
    let accounts: Vec<String> = (0..8).map(|i| account("sum", &i.to_string())).collect();
    for a in &accounts {
        open(&bank, a, 1_000).await;
    }
    let calls = (0..200).map(|i| {
        let bank = bank.clone();
        let from = accounts[i % accounts.len()].clone();
        let to = accounts[(i * 3 + 1) % accounts.len()].clone();
        async move {
            if from == to {
                return None;
            }
            let r = run(
                &bank,
                &Ctx::for_test("bank", "transfer"),
                "transfer",
                json!({ "from": from, "to": to, "cents": 7 }),
            )
            .await;
            Some(r)
        }
    });
    let results = futures::future::join_all(calls).await;
    let mut outcomes = BTreeMap::new();
    for r in results.into_iter().flatten() {
        let key = match r {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.code,
        };
        *outcomes.entry(key).or_insert(0) += 1;
    }
    assert_eq!(outcomes.keys().collect::<Vec<_>>(), ["ok"], "{outcomes:?}");
    let mut sum = 0;
    for a in &accounts {
        sum += balance(&bank, a).await;
    }
    assert_eq!(sum, 8_000, "transfers moved money, never made or lost it");
}

/// The outbox's retention: a row committed longer ago than the retention
/// is deleted, a recent one kept.
#[tokio::test]
async fn outbox_rows_past_the_retention_are_forgotten() {
    let pool = pool();
    pg::migrate(&pool).await.unwrap();
    let (old, recent) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let client = pool.get().await.unwrap();
    client
        .execute(
            "insert into callq_outbox (call_id, attempt, reply, committed_at) values \
             ($1, 1, '{}', now() - interval '8 days'), ($2, 1, '{}', now())",
            &[&old, &recent],
        )
        .await
        .unwrap();
    let week = std::time::Duration::from_secs(7 * 24 * 3600);
    let forgotten = pg::forget_outbox(&pool, week, 1_000).await.unwrap();
    assert!(forgotten >= 1, "{forgotten}");
    assert_eq!(outbox_rows(&pool, old).await, 0, "the old row stayed");
    assert_eq!(outbox_rows(&pool, recent).await, 1, "the recent row went");
    client
        .execute("delete from callq_outbox where call_id = $1", &[&recent])
        .await
        .unwrap();
}
