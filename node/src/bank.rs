//! `bank`: an example service whose transfers are exact PostgreSQL
//! transactions made through [`Ctx::transaction`], on the table
//! `bank_accounts(id text primary key, cents bigint)` of the database
//! `CALLQ_POSTGRES` names (default [`pg::DEFAULT_URL`]).
//!
//! - `open {"account": "a", "cents": 100}` creates an account with a
//!   balance (`account_exists` if it exists);
//! - `transfer {"from": "a", "to": "b", "cents": 5}` moves cents between two
//!   accounts in one exact transaction (`insufficient_funds`,
//!   `no_such_account` and `invalid_args` are deterministic errors);
//! - `balance {"account": "a"}` reads a balance (traceless).

use std::sync::Arc;

use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::pg::{self, create_if_missing};
use crate::{Ctx, HandlerError, Service};

/// The accounts table, created when missing.
pub const ACCOUNTS_DDL: &str = "create table if not exists bank_accounts (
    id text primary key,
    cents bigint not null check (cents >= 0)
)";

/// Connections a bank worker holds at most.
const POOL_SIZE: usize = 16;

struct Bank {
    pool: Pool,
    ready: OnceCell<()>,
}

impl Bank {
    /// The pool, once the tables exist (and the outbox's retention sweep
    /// runs).
    async fn pool(&self) -> Result<&Pool, HandlerError> {
        self.ready
            .get_or_try_init(|| async {
                let client = self.pool.get().await.map_err(|e| {
                    HandlerError::new(
                        "postgres_unavailable",
                        format!("no PostgreSQL connection: {e}"),
                    )
                })?;
                create_if_missing(&**client, ACCOUNTS_DDL).await?;
                create_if_missing(&**client, pg::OUTBOX_DDL).await?;
                drop(pg::sweep_outbox(
                    self.pool.clone(),
                    pg::outbox_retention_from_env(),
                ));
                Ok::<_, HandlerError>(())
            })
            .await?;
        Ok(&self.pool)
    }
}

fn text<'a>(args: &'a Value, key: &str) -> Result<&'a str, HandlerError> {
    args.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| HandlerError::invalid_args(format!("\"{key}\" must be a non-empty string")))
}

fn cents(args: &Value) -> Result<i64, HandlerError> {
    args.get("cents")
        .and_then(Value::as_i64)
        .filter(|c| *c >= 0)
        .ok_or_else(|| HandlerError::invalid_args("\"cents\" must be a whole number, 0 or more"))
}

/// The bank service on `pool`.
pub fn bank(pool: Pool) -> Service {
    let bank = Arc::new(Bank {
        pool,
        ready: OnceCell::new(),
    });
    let (b1, b2, b3) = (bank.clone(), bank.clone(), bank);
    Service::new("bank")
        .method("open", move |ctx: Ctx, args: Value| {
            open(b1.clone(), ctx, args)
        })
        .method("transfer", move |ctx: Ctx, args: Value| {
            transfer(b2.clone(), ctx, args)
        })
        .method("balance", move |_ctx: Ctx, args: Value| {
            balance(b3.clone(), args)
        })
}

/// `bank.open`: a new account with a balance.
async fn open(bank: Arc<Bank>, ctx: Ctx, args: Value) -> Result<Value, HandlerError> {
    let account = text(&args, "account")?.to_owned();
    let cents = cents(&args)?;
    let pool = bank.pool().await?;
    ctx.transaction(pool, |tx| {
        Box::pin(async move {
            let made = tx
                .execute(
                    "insert into bank_accounts (id, cents) values ($1, $2) \
                     on conflict (id) do nothing",
                    &[&account, &cents],
                )
                .await?;
            if made == 0 {
                return Err(HandlerError::new(
                    "account_exists",
                    format!("account `{account}` exists"),
                ));
            }
            Ok(json!({ "account": account, "cents": cents }))
        })
    })
    .await
}

/// `bank.transfer`: moves cents between two accounts, exactly once.
async fn transfer(bank: Arc<Bank>, ctx: Ctx, args: Value) -> Result<Value, HandlerError> {
    let from = text(&args, "from")?.to_owned();
    let to = text(&args, "to")?.to_owned();
    let cents = cents(&args)?;
    if from == to {
        return Err(HandlerError::invalid_args(
            "\"from\" and \"to\" must differ",
        ));
    }
    let pool = bank.pool().await?;
    ctx.transaction(pool, |tx| {
        Box::pin(async move {
            // Both rows locked in one order: concurrent transfers never
            // deadlock.
            let rows = tx
                .query(
                    "select id, cents from bank_accounts where id = any($1) \
                     order by id for update",
                    &[&vec![from.clone(), to.clone()]],
                )
                .await?;
            let balance = |id: &str| {
                rows.iter()
                    .find(|r| r.get::<_, String>(0) == id)
                    .map(|r| r.get::<_, i64>(1))
            };
            let missing = [&from, &to].into_iter().find(|id| balance(id).is_none());
            if let Some(id) = missing {
                return Err(HandlerError::new(
                    "no_such_account",
                    format!("no account `{id}`"),
                ));
            }
            let have = balance(&from).unwrap_or_default();
            if have < cents {
                return Err(HandlerError::new(
                    "insufficient_funds",
                    format!("account `{from}` holds {have} cents, not {cents}"),
                ));
            }
            tx.execute(
                "update bank_accounts set cents = cents - $2 where id = $1",
                &[&from, &cents],
            )
            .await?;
            tx.execute(
                "update bank_accounts set cents = cents + $2 where id = $1",
                &[&to, &cents],
            )
            .await?;
            Ok(json!({ "from": from, "to": to, "cents": cents }))
        })
    })
    .await
}

/// `bank.balance`: an account's balance, read outside any transaction.
async fn balance(bank: Arc<Bank>, args: Value) -> Result<Value, HandlerError> {
    let account = text(&args, "account")?.to_owned();
    let pool = bank.pool().await?;
    let client = pool.get().await.map_err(|e| {
        HandlerError::new(
            "postgres_unavailable",
            format!("no PostgreSQL connection: {e}"),
        )
    })?;
    let row = client
        .query_opt("select cents from bank_accounts where id = $1", &[&account])
        .await?;
    match row {
        Some(r) => Ok(json!({ "account": account, "cents": r.get::<_, i64>(0) })),
        None => Err(HandlerError::new(
            "no_such_account",
            format!("no account `{account}`"),
        )),
    }
}

/// The bank service on the database `CALLQ_POSTGRES` names. A URL it cannot
/// read makes every call answer `postgres_config`.
pub fn bank_from_env() -> Service {
    let url = std::env::var("CALLQ_POSTGRES").unwrap_or_else(|_| pg::DEFAULT_URL.to_owned());
    match pg::pool(&url, POOL_SIZE) {
        Ok(pool) => bank(pool),
        Err(e) => {
            tracing::error!("bank: CALLQ_POSTGRES: {}", e.message);
            let failing = move |_ctx: Ctx, _args: Value| {
                let e = e.clone();
                async move { Err::<Value, _>(e) }
            };
            Service::new("bank")
                .method("open", failing.clone())
                .method("transfer", failing.clone())
                .method("balance", failing)
        }
    }
}
