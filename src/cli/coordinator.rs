//! `callq coordinator`: the registry, the failure detector and the call
//! ledger, its store in redb (one host) or PostgreSQL (coordinators on
//! several hosts, one leading under a lease).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use callq_coordinator::{Coordinator, Ledger, PgStore, RedbStore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::broker::connect;
use super::config::Settings;
use super::health::{self, Health, unready_on};
use super::shutdown::shutdown_on_signal;

/// Serves until a signal stops it.
pub(crate) async fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config)?;
    let health = Health::new();
    let probes = CancellationToken::new();
    health::serve(settings.http.as_deref(), health.clone(), probes.clone()).await?;
    callq_coordinator::metrics::describe();
    health::describe_reconnects();
    let shutdown = shutdown_on_signal();
    unready_on(&shutdown, &health);
    let served = coordinator(&settings, shutdown, &health).await;
    probes.cancel();
    served?;
    Ok(ExitCode::SUCCESS)
}

/// `callq coordinator`: waits for the store, then serves until stopped. On
/// RabbitMQ the request queue has a single active consumer, so a second
/// coordinator stands by until the first is gone.
async fn coordinator(
    settings: &Settings,
    shutdown: CancellationToken,
    health: &Arc<Health>,
) -> anyhow::Result<()> {
    if let Some(url) = &settings.coordinator.postgres {
        return coordinator_on_postgres(settings, url, shutdown, health).await;
    }
    let path = &settings.coordinator.store;
    let mut waiting = false;
    let store = loop {
        match RedbStore::open(path) {
            Ok(store) => break store,
            Err(callq_coordinator::Error::StoreInUse(_)) => {
                if !waiting {
                    info!(store = %path.display(), "another coordinator holds the store: standing by");
                    health.ready("standing by");
                    waiting = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            Err(e) => return Err(e).context("opening the coordinator's store"),
        }
    };
    let ledger = Ledger::open(store).context("reading the call ledger")?;
    health.unready("leading, connecting to the broker");
    let Some(broker) = connect_patiently(settings, &shutdown).await else {
        return Ok(());
    };
    info!(store = %path.display(), open_calls = ledger.open_calls(), "coordinator serving");
    health.ready("leading");
    Coordinator::new(settings.coordinator.options.clone(), broker, ledger)
        .counting_unauthenticated(super::broker::UNAUTHENTICATED.clone())
        .signalling_serving(health.serving())
        .run(shutdown)
        .await
        .context("the coordinator stopped")
}

/// `callq coordinator` with its ledger in PostgreSQL: stands by until it
/// takes the cluster's lease, leads until it loses it (then stands by
/// again), until stopped.
async fn coordinator_on_postgres(
    settings: &Settings,
    url: &str,
    shutdown: CancellationToken,
    health: &Arc<Health>,
) -> anyhow::Result<()> {
    let c = &settings.coordinator;
    let lease = Duration::from_millis(c.lease_ms.max(100));
    let holder = format!(
        "{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
        std::process::id()
    );
    let poll = lease / 4;
    loop {
        let mut waiting = false;
        let store = loop {
            match PgStore::acquire(url, &c.cluster, &holder, lease).await {
                Ok(Some(store)) => break store,
                Ok(None) if !waiting => {
                    info!(cluster = %c.cluster, "another coordinator leads: standing by");
                    health.ready("standing by");
                    waiting = true;
                }
                Ok(None) => health.ready("standing by"),
                Err(e) => {
                    warn!(cluster = %c.cluster, "taking the lease: {e}");
                    health.unready(format!("without the store: {e}"));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(poll) => {}
            }
        };
        let epoch = store.epoch();
        let ledger = Ledger::open(store).context("reading the call ledger")?;
        health.unready("leading, connecting to the broker");
        let Some(broker) = connect_patiently(settings, &shutdown).await else {
            return Ok(());
        };
        info!(cluster = %c.cluster, epoch, open_calls = ledger.open_calls(), "coordinator leading");
        health.ready("leading");
        match Coordinator::new(c.options.clone(), broker, ledger)
            .counting_unauthenticated(super::broker::UNAUTHENTICATED.clone())
            .signalling_serving(health.serving())
            .run(shutdown.clone())
            .await
        {
            Ok(()) => return Ok(()),
            Err(e @ callq_coordinator::Error::Fenced(_)) => {
                warn!(cluster = %c.cluster, epoch, "lost the lead: {e}; standing by");
                health.unready("lost the lead: taking the lease again");
            }
            Err(e) => return Err(e).context("the coordinator stopped"),
        }
    }
}

/// Connects to the broker, trying again with backoff (100 ms up to 5 s)
/// while it cannot be reached, until `shutdown` (`None`).
async fn connect_patiently(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Option<std::sync::Arc<dyn callq_broker::Broker>> {
    let mut backoff =
        callq_broker::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match connect(settings, "coordinator").await {
            Ok(broker) => return Some(broker),
            Err(e) => {
                health::reconnecting();
                let pause = backoff.next_delay();
                warn!("{e:#}; trying again in {pause:?}");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}
