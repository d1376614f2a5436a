//! PostgreSQL benchmark: callq's `bank.transfer` beside the same
//! transaction run straight on a connection pool, measured in one run.
//!
//! 1. Direct: the SQL of `bank.transfer` on a deadpool-postgres pool, no
//!    callq and no outbox: lock both rows in id order (`select id, cents
//!    from bank_accounts where id = any($1) order by id for update`), check
//!    them, two updates, commit. One transfer at a time, then `IN_FLIGHT`
//!    at once.
//! 2. callq: `bank.transfer` through a coordinator (ledger in memory), one
//!    worker (capacity `IN_FLIGHT`, serving `callq_node::bank::bank` on a
//!    pool of the same size as the direct one) and a client in this
//!    process, each with its own connection to RabbitMQ, in a virtual host
//!    of its own. Each call runs `Ctx::transaction`: it reads the outbox
//!    for an earlier commit, asks the coordinator for the `pg.tx` trace,
//!    then runs the same statements and writes its outbox row in the same
//!    transaction. One call at a time, then `IN_FLIGHT` in flight.
//! 3. What the parts cost, added one at a time, one call in flight on the
//!    same cluster: `echo.echo` (the broker round trip); a handler running
//!    the direct transaction (no trace, no outbox); the same after asking
//!    for the `pg.tx` trace (no outbox); `bank.transfer` adds the outbox.
//!    The four run in turn for each pair, so that the machine's other load
//!    meets them alike; `bank.transfer`'s row is the one of the ratios.
//! 4. The ratios of callq to direct (p50 and calls/s, per mode), and the CPU
//!    per transfer of this process and of RabbitMQ in the pipelined runs.
//!
//! Each side has `ACCOUNTS` accounts of its own (ids `bench-<uuid>-d-<i>`
//! and `bench-<uuid>-c-<i>`), and both make the same transfers of 1 cent
//! between random distinct pairs (a fixed seed). At the end the bench checks
//! that each side's money is all there and that every callq transfer left
//! exactly one outbox row, then deletes the accounts and the outbox rows.
//!
//! Needs the PostgreSQL `CALLQ_POSTGRES` names (default
//! `postgres://postgres@127.0.0.1/test`), RabbitMQ at 127.0.0.1:5672
//! (guest/guest) and `rabbitmqctl`: `cargo bench --bench bank` (add
//! `-- --calls N` to change the pipelined size, `--pool N` the pools' size).
#![allow(missing_docs)]

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use callq_node::bank::{self, ACCOUNTS_DDL};
use callq_node::pg::{self, Pool};
use callq_node::{CallOptions, Client, Ctx, HandlerError, Service, services};
use callq_schemas::Outcome;
use futures::StreamExt;
use serde_json::{Value, json};
use support::{Cpu, InProcess, Piped, Vhost, amqp, histogram, rabbitmq_pid, record, row, within};

/// Accounts on each side: with `IN_FLIGHT` transfers at once between
/// random pairs, few of them wait for another's row locks.
const ACCOUNTS: usize = 1_000;
/// Each account's opening balance: far more than its transfers take out.
const OPENING: i64 = 1_000_000;
/// What each transfer moves.
const CENTS: i64 = 1;
/// Transfers in flight in the pipelined runs, and the worker's capacity:
/// a worker's default capacity, so that callq runs as `callq worker` does;
/// the direct side keeps as many in flight. With pools of `POOL`, the rest
/// wait for a connection, on both sides alike.
const IN_FLIGHT: usize = 64;
/// Connections of each side's pool, unless `--pool N`: the bank service's
/// own pool size when `callq worker --services bank` runs it.
const POOL: usize = 16;
/// Transfers one at a time, after `WARM_UP` unmeasured ones.
const SERIAL: usize = 1_000;
const WARM_UP: usize = 100;
/// Unmeasured transfers with `IN_FLIGHT` at once before the pipelined run,
/// so that every pooled connection is open.
const WARM_UP_PIPELINED: usize = 4 * IN_FLIGHT;
/// Pipelined transfers, unless `--calls N`.
const CALLS: usize = 5_000;
/// The bound of every transfer, direct or through callq (the call's
/// timeout).
const WAIT: Duration = Duration::from_secs(30);
/// The seed of the transfers' pairs: both sides make the same transfers.
const SEED: u64 = 0x00ca_11ba_4b00;

// ---------------------------------------------------------------------------
// The transfers: random distinct pairs of accounts.

/// SplitMix64: a small, good enough generator with a fixed seed.
struct Pairs(u64);

impl Pairs {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % n as u64).unwrap_or(0)
    }

    /// `n` pairs of distinct account numbers.
    fn take(&mut self, n: usize) -> Vec<(usize, usize)> {
        (0..n)
            .map(|_| {
                let from = self.below(ACCOUNTS);
                let to = (from + 1 + self.below(ACCOUNTS - 1)) % ACCOUNTS;
                (from, to)
            })
            .collect()
    }
}

/// The transfers of one side, the same on both: warm-up, one at a time,
/// warm-up with `IN_FLIGHT` at once, pipelined.
struct Plan {
    warm_up: Vec<(usize, usize)>,
    serial: Vec<(usize, usize)>,
    warm_up_pipelined: Vec<(usize, usize)>,
    pipelined: Vec<(usize, usize)>,
}

impl Plan {
    fn new(calls: usize) -> Self {
        let mut pairs = Pairs(SEED);
        Self {
            warm_up: pairs.take(WARM_UP),
            serial: pairs.take(SERIAL),
            warm_up_pipelined: pairs.take(WARM_UP_PIPELINED),
            pipelined: pairs.take(calls),
        }
    }

    fn transfers(&self) -> usize {
        self.warm_up.len() + self.serial.len() + self.warm_up_pipelined.len() + self.pipelined.len()
    }
}

/// What one side measured.
struct Side {
    serial: Piped,
    pipelined: Piped,
}

/// callq's runs: `bank.transfer` and its parts (`PARTS`, the last being
/// `bank.transfer` itself) one call at a time, then `bank.transfer` with
/// `IN_FLIGHT` in flight.
struct Callq {
    serial: Vec<Piped>,
    pipelined: Piped,
}

/// Runs `transfer` over `pairs`, `in_flight` at once, each within `WAIT`:
/// the latency of each, the rate, and the CPU per transfer of this process
/// and of RabbitMQ.
async fn drive<F, Fut>(
    pairs: &[(usize, usize)],
    in_flight: usize,
    transfer: F,
) -> anyhow::Result<Piped>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (start, cpu) = (Instant::now(), Cpu::now(rabbitmq_pid()));
    let mut done = futures::stream::iter(pairs.iter().copied())
        .map(|(from, to)| {
            let transferred = transfer(from, to);
            async move {
                let t = Instant::now();
                tokio::time::timeout(WAIT, transferred)
                    .await
                    .map_err(|_| anyhow!("a transfer took over {WAIT:?}"))??;
                anyhow::Ok(t.elapsed())
            }
        })
        .buffer_unordered(in_flight);
    let mut latency = histogram();
    while let Some(took) = done.next().await {
        record(&mut latency, took?);
    }
    Ok(Piped {
        rate: pairs.len() as f64 / start.elapsed().as_secs_f64(),
        latency: Some(latency),
        cpu: Cpu::per_message_since(cpu, rabbitmq_pid(), pairs.len()),
    })
}

/// Runs the plan with `transfer`: the warm-ups unmeasured.
async fn side<F, Fut>(plan: &Plan, transfer: F) -> anyhow::Result<Side>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    drive(&plan.warm_up, 1, &transfer).await?;
    let serial = drive(&plan.serial, 1, &transfer).await?;
    drive(&plan.warm_up_pipelined, IN_FLIGHT, &transfer).await?;
    let pipelined = drive(&plan.pipelined, IN_FLIGHT, &transfer).await?;
    Ok(Side { serial, pipelined })
}

// ---------------------------------------------------------------------------
// The accounts.

/// This run's accounts: `<prefix>d-<i>` for the direct side and
/// `<prefix>c-<i>` for callq's.
struct Accounts {
    prefix: String,
}

impl Accounts {
    fn ids(&self, side: &str) -> Vec<String> {
        (0..ACCOUNTS)
            .map(|i| format!("{}{side}-{i}", self.prefix))
            .collect()
    }

    /// The `like` pattern of one side's ids.
    fn like(&self, side: &str) -> String {
        format!("{}{side}-%", self.prefix)
    }

    /// Creates the tables if missing and both sides' accounts.
    async fn open(db: &Pool) -> anyhow::Result<Self> {
        let prefix = format!("bench-{}-", uuid::Uuid::now_v7().simple());
        let client = db.get().await.context("connecting to PostgreSQL")?;
        pg::create_if_missing(&**client, ACCOUNTS_DDL).await?;
        pg::create_if_missing(&**client, pg::OUTBOX_DDL).await?;
        // Both sides in one statement: all or nothing.
        client
            .execute(
                "insert into bank_accounts (id, cents) \
                 select $1::text || side || '-' || g::text, $2::bigint \
                 from unnest(array['d', 'c']) side, generate_series(0, $3::bigint - 1) g",
                &[&prefix, &OPENING, &i64::try_from(ACCOUNTS)?],
            )
            .await?;
        Ok(Self { prefix })
    }

    /// Each side's money is all there; callq's transfers left `transfers`
    /// outbox rows, the direct ones none.
    async fn check(&self, db: &Pool, transfers: usize) -> anyhow::Result<()> {
        let client = db.get().await?;
        let expected = OPENING * i64::try_from(ACCOUNTS)?;
        for side in ["d", "c"] {
            let row = client
                .query_one(
                    "select count(*), coalesce(sum(cents), 0)::bigint from bank_accounts \
                     where id like $1",
                    &[&self.like(side)],
                )
                .await?;
            let (count, sum): (i64, i64) = (row.get(0), row.get(1));
            ensure!(
                count == i64::try_from(ACCOUNTS)? && sum == expected,
                "side {side}: {count} accounts holding {sum} cents, not {ACCOUNTS} holding {expected}"
            );
        }
        for (side, rows) in [("d", 0), ("c", transfers)] {
            let row = client
                .query_one(
                    "select count(*) from callq_outbox where reply->>'from' like $1",
                    &[&self.like(side)],
                )
                .await?;
            let found: i64 = row.get(0);
            ensure!(
                found == i64::try_from(rows)?,
                "side {side}: {found} outbox rows, not {rows}"
            );
        }
        Ok(())
    }

    /// Deletes the accounts and the outbox rows of this run.
    async fn close(&self, db: &Pool) -> anyhow::Result<()> {
        let client = db.get().await?;
        let all = format!("{}%", self.prefix);
        client
            .execute(
                "delete from callq_outbox where reply->>'from' like $1",
                &[&all],
            )
            .await?;
        client
            .execute("delete from bank_accounts where id like $1", &[&all])
            .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// 1. Direct: the transaction of `bank.transfer` on the pool.

async fn direct_transfer(pool: &Pool, from: &str, to: &str) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "select id, cents from bank_accounts where id = any($1) order by id for update",
            &[&vec![from.to_owned(), to.to_owned()]],
        )
        .await?;
    let balance = |id: &str| {
        rows.iter()
            .find(|r| r.get::<_, String>(0) == id)
            .map(|r| r.get::<_, i64>(1))
    };
    let (Some(have), Some(_)) = (balance(from), balance(to)) else {
        bail!("no account {from} or {to}");
    };
    ensure!(have >= CENTS, "account {from} holds {have} cents");
    tx.execute(
        "update bank_accounts set cents = cents - $2 where id = $1",
        &[&from, &CENTS],
    )
    .await?;
    tx.execute(
        "update bank_accounts set cents = cents + $2 where id = $1",
        &[&to, &CENTS],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn direct(
    url: &str,
    pool_size: usize,
    accounts: &Accounts,
    plan: &Plan,
) -> anyhow::Result<Side> {
    let pool = pg::pool(url, pool_size)?;
    let ids = accounts.ids("d");
    let ids = ids.as_slice();
    let pool_ref = &pool;
    let side = side(plan, move |from, to| {
        direct_transfer(pool_ref, &ids[from], &ids[to])
    })
    .await;
    pool.close();
    side
}

// ---------------------------------------------------------------------------
// 2. callq: `bank.transfer` through a cluster in this process.

/// `<service>.<method>` with the arguments of a transfer of `CENTS` from
/// `from` to `to`.
async fn callq_transfer(
    client: &Client,
    (service, method): (&str, &str),
    from: &str,
    to: &str,
) -> anyhow::Result<()> {
    let opts = CallOptions {
        timeout: Some(WAIT),
        ..CallOptions::default()
    };
    let reply = client
        .call(
            service,
            method,
            json!({"from": from, "to": to, "cents": CENTS}),
            opts,
        )
        .await?;
    ensure!(
        reply.outcome == Outcome::Ok,
        "{service}.{method} {from} -> {to}: {} {:?}",
        reply.outcome.as_str(),
        reply.error
    );
    Ok(())
}

/// A service whose `transfer` runs the direct transaction on `pool` in a
/// handler, without `ctx.transaction` and so without the outbox; with
/// `trace`, it first asks the coordinator for the `pg.tx` trace, as
/// `ctx.transaction` does. The parts of `bank.transfer`, one added at a time.
fn part(name: &str, pool: Pool, trace: bool) -> Service {
    Service::new(name).method("transfer", move |ctx: Ctx, args: Value| {
        let pool = pool.clone();
        async move {
            let account = |key: &str| {
                args.get(key)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| HandlerError::invalid_args(format!("no \"{key}\"")))
            };
            let (from, to) = (account("from")?, account("to")?);
            if trace {
                ctx.trace(pg::PG_TX).await?;
            }
            direct_transfer(&pool, &from, &to)
                .await
                .map_err(|e| HandlerError::new("transfer_failed", format!("{e:#}")))?;
            Ok(json!({ "from": from, "to": to, "cents": CENTS }))
        }
    })
}

/// What is measured one call at a time on the cluster, each with the
/// arguments of a transfer, parts added one by one: `echo.echo` (the
/// broker round trip, no SQL); a handler running the direct transaction
/// (no trace, no outbox); the same after asking for the `pg.tx` trace; and
/// `bank.transfer`, which adds the outbox.
const PARTS: [(&str, &str); 4] = [
    ("echo", "echo"),
    ("plain", "transfer"),
    ("traced", "transfer"),
    ("bank", "transfer"),
];

async fn callq(
    url: &str,
    pool_size: usize,
    vhost: &Vhost,
    accounts: &Accounts,
    plan: &Plan,
) -> anyhow::Result<Callq> {
    let broker = vhost.url();
    // The parts run one call at a time: a small pool of their own.
    let parts = pg::pool(url, 2)?;
    let cluster = InProcess::start(
        async |role: &str| amqp(&broker, role).await,
        support::worker_options("bench-bank", IN_FLIGHT, true)?,
        [
            bank::bank(pg::pool(url, pool_size)?),
            services::echo(),
            part("plain", parts.clone(), false),
            part("traced", parts, true),
        ],
    )
    .await?;
    let measured = async {
        let ids = accounts.ids("c");
        let ids = ids.as_slice();
        let client = &cluster.client;
        let call =
            |part, from: usize, to: usize| callq_transfer(client, part, &ids[from], &ids[to]);
        // One at a time, the parts in turn for each pair: whatever the
        // machine's other load does meets them all alike.
        for &(from, to) in &plan.warm_up {
            for part in PARTS {
                call(part, from, to).await?;
            }
        }
        let mut latency: Vec<_> = PARTS.iter().map(|_| histogram()).collect();
        let mut busy = [Duration::ZERO; PARTS.len()];
        for &(from, to) in &plan.serial {
            for (i, part) in PARTS.into_iter().enumerate() {
                let t = Instant::now();
                call(part, from, to).await?;
                let took = t.elapsed();
                record(&mut latency[i], took);
                busy[i] += took;
            }
        }
        let serial = latency
            .into_iter()
            .zip(busy)
            .map(|(h, busy)| Piped {
                rate: plan.serial.len() as f64 / busy.as_secs_f64(),
                latency: Some(h),
                cpu: Cpu::default(),
            })
            .collect();
        let bank = |from, to| call(("bank", "transfer"), from, to);
        drive(&plan.warm_up_pipelined, IN_FLIGHT, bank).await?;
        let pipelined = drive(&plan.pipelined, IN_FLIGHT, bank).await?;
        anyhow::Ok(Callq { serial, pipelined })
    }
    .await;
    cluster.stop("worker").await?;
    measured
}

// ---------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let calls = support::calls_arg(CALLS)?;
    let pool_size = support::usize_arg("--pool", POOL)?;
    let url = std::env::var("CALLQ_POSTGRES").unwrap_or_else(|_| pg::DEFAULT_URL.to_owned());
    let plan = Plan::new(calls);
    let vhost = Vhost::create()?;
    let runtime = support::runtime()?;
    let started = Instant::now();
    let figures = runtime.block_on(async {
        let db = pg::pool(&url, 2)?;
        let accounts = within("opening the accounts", Accounts::open(&db)).await?;
        let measured = async {
            let direct = direct(&url, pool_size, &accounts, &plan)
                .await
                .context("the direct transactions")?;
            let callq = callq(&url, pool_size, &vhost, &accounts, &plan)
                .await
                .context("callq in process")?;
            let checked = accounts.check(&db, plan.transfers());
            within("checking the accounts and the outbox", checked).await?;
            anyhow::Ok((direct, callq))
        }
        .await;
        let closed = within("deleting the accounts and outbox rows", accounts.close(&db)).await;
        let measured = measured?;
        closed?;
        anyhow::Ok(measured)
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(vhost);
    let (direct, callq) = figures?;

    println!(
        "PostgreSQL {url} and RabbitMQ 127.0.0.1:5672 (quorum queues); {ACCOUNTS} accounts a side, \
         transfers of {CENTS} cent between random distinct pairs (the same on both sides); \
         pools of {pool_size} connections; {WARM_UP} warm-up + {SERIAL} transfers one at a time, \
         {WARM_UP_PIPELINED} warm-up + {calls} with {IN_FLIGHT} in flight"
    );
    support::header("rabbit us");
    let serial = |label: &str, p: &Piped| row(label, p.latency.as_ref(), p.rate, None);
    let [echo, plain, traced, bank] = &callq.serial[..] else {
        bail!("{} serial runs", callq.serial.len());
    };
    serial(
        "direct transaction on the pool, 1 at a time",
        &direct.serial,
    );
    serial("callq bank.transfer, 1 in flight", bank);
    serial("callq echo.echo, 1 in flight", echo);
    serial("callq handler with the SQL, 1 in flight", plain);
    serial("callq pg.tx trace + the SQL, 1 in flight", traced);
    support::piped_row(
        &format!("direct transaction on the pool, {IN_FLIGHT} at once"),
        &direct.pipelined,
    );
    support::piped_row(
        &format!("callq bank.transfer, {IN_FLIGHT} in flight"),
        &callq.pipelined,
    );
    println!(
        "(bench us, rabbit us: CPU microseconds per transfer of this process and of RabbitMQ)"
    );
    let p50 = |p: &Piped| p.latency.as_ref().map_or(f64::NAN, |h| support::ms(h, 0.5));
    let pipelined = format!("{IN_FLIGHT} in flight");
    for (mode, d, c) in [
        ("1 in flight", &direct.serial, bank),
        (pipelined.as_str(), &direct.pipelined, &callq.pipelined),
    ] {
        println!(
            "ratio callq p50 / direct p50, {mode}: {:.2}x",
            p50(c) / p50(d)
        );
        println!(
            "ratio callq calls/s / direct transfers/s, {mode}: {:.2}x",
            c.rate / d.rate
        );
    }
    let (sql, echo, plain, traced, bank) = (
        p50(&direct.serial),
        p50(echo),
        p50(plain),
        p50(traced),
        p50(bank),
    );
    println!(
        "p50 one at a time, parts added one by one: echo.echo {echo:.2} ms (the broker round \
         trip); + the transaction in the handler {:+.2} ms ({sql:.2} ms direct); + the pg.tx \
         trace (grant and synchronous completion) {:+.2} ms; + the outbox (pre-check select \
         and insert) {:+.2} ms = bank.transfer {bank:.2} ms",
        plain - echo,
        traced - plain,
        bank - traced
    );
    // The target: the direct transaction plus one broker round trip (this
    // bench's `echo.echo`, a whole callq call, stands for it), x1.15.
    let bound = (sql + echo) * 1.15;
    support::target_row(
        "bank.transfer (exact pg.tx) p50, 1 in flight",
        &format!("p50 {bank:.2} ms"),
        &format!("direct {sql:.2} ms + echo.echo {echo:.2} ms"),
        bank / (sql + echo),
        "<= 1.15x",
        bank <= bound,
    );
    let rate = callq.pipelined.rate / direct.pipelined.rate;
    support::target_row(
        &format!("bank.transfer calls/s, {IN_FLIGHT} in flight"),
        &format!("{:.0} calls/s", callq.pipelined.rate),
        &format!("direct {:.0} transfers/s", direct.pipelined.rate),
        rate,
        ">= 0.8x",
        rate >= 0.8,
    );
    println!(
        "checked: both sides' money all there; {} outbox rows for the {} callq transfers, \
         none for the direct ones; accounts and outbox rows deleted",
        plan.transfers(),
        plan.transfers()
    );
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
