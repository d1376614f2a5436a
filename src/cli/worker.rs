//! `callq worker`: a worker process serving built-in services, reconnecting
//! under a new incarnation of its id when its broker connection drops.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use callq_broker::Broker;
use callq_node::{Service, Worker, WorkerOptions, services};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::broker::connect;
use super::config::Settings;
use super::health::{self, Health};
use super::hooks::{Armed, Broken, break_broker, break_services};
use super::shutdown::{shutdown_on_signal, shutdown_on_signal_supervised, stop_when_stdin_closes};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The services to serve, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    services: Vec<String>,
    /// The worker's id (default: generated).
    #[arg(long)]
    worker_id: Option<String>,
    /// Calls run at once (default: the configured `worker.capacity`).
    #[arg(long)]
    capacity: Option<u16>,
    /// Start as a standby: consume nothing until promoted.
    #[arg(long)]
    standby: bool,
    /// Drain and exit when stdin closes (how a node agent starts its
    /// workers, so that they do not outlive it).
    #[arg(long, hide = true)]
    supervised: bool,
    /// Crash where stdin says (`crash <point>`): for `callq verify`.
    #[arg(long, hide = true, conflicts_with = "supervised")]
    fault_hooks: bool,
    /// Break the contract on purpose: for `callq verify`'s own test.
    #[arg(long, hide = true, value_enum)]
    broken: Option<Broken>,
}

/// What `callq verify` gives the workers it starts (see [`super::hooks`]).
#[derive(Clone, Default)]
struct Hooks {
    crash: Option<Arc<Armed>>,
    broken: Option<Broken>,
}

/// Serves until a signal (or, supervised, the end of stdin) stops it.
pub(crate) async fn run(args: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let shutdown = if args.supervised {
        let shutdown = shutdown_on_signal_supervised();
        stop_when_stdin_closes(shutdown.clone());
        shutdown
    } else {
        shutdown_on_signal()
    };
    let settings = Settings::load(config)?;
    let health = Health::new();
    let probes = CancellationToken::new();
    // A worker an agent started leaves the address to its agent, which
    // answers for the node (its workers share the agent's settings).
    let http = settings.http.as_deref().filter(|_| !args.supervised);
    health::serve(http, health.clone(), probes.clone()).await?;
    callq_node::metrics::describe_worker();
    health::describe_reconnects();
    let served = worker(&settings, args, shutdown, &health).await;
    probes.cancel();
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Serves the built-in services. When its broker connection drops it stops
/// taking calls, reconnects with backoff and registers again under a new
/// incarnation of its id (`ID.1`, `ID.2`, ...); the calls it held return to
/// their queues and `resume` arbitrates them.
async fn worker(
    settings: &Settings,
    args: Args,
    shutdown: CancellationToken,
    health: &Arc<Health>,
) -> anyhow::Result<()> {
    let hooks = Hooks {
        crash: args.fault_hooks.then(|| {
            let armed = Arc::new(Armed::default());
            armed.listen();
            armed
        }),
        broken: args.broken,
    };
    let found = break_services(built_in(&args.services)?, hooks.broken);
    callq_node::metrics::describe_services(found.iter().map(Service::name));
    let mut opts = settings.worker.clone();
    if let Some(id) = args.worker_id {
        opts.worker_id = id;
    }
    if let Some(capacity) = args.capacity {
        opts.capacity = capacity;
    }
    opts.standby = args.standby;
    let base = opts.worker_id.clone();
    health::unready_on(&shutdown, health);
    let serving = if opts.standby { "standby" } else { "active" };
    // A new incarnation only after a run that connected: retries that never
    // reached the broker keep the id.
    let mut incarnation = 0u32;
    let mut backoff =
        callq_broker::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let id = if incarnation == 0 {
            base.clone()
        } else {
            format!("{base}.{incarnation}")
        };
        let ended = match connect(settings, &format!("worker {id}")).await {
            Ok(broker) => {
                if !shutdown.is_cancelled() {
                    health.ready(serving);
                }
                let broker = break_broker(broker, hooks.broken);
                let run = (&found[..], &hooks);
                let (ended, ran) = serve(&opts, &id, broker, run, &shutdown, health).await;
                if ran > Duration::from_secs(60) {
                    backoff.reset();
                }
                incarnation += 1;
                match ended {
                    Ok(()) => return Ok(()),
                    Err(callq_node::Error::Config(e)) => bail!("worker {id}: {e}"),
                    Err(callq_node::Error::Disconnected) => {
                        "the broker connection was lost".to_owned()
                    }
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => format!("{e:#}"),
        };
        if shutdown.is_cancelled() {
            return Ok(());
        }
        health.unready(format!("without the broker: {ended}"));
        health::reconnecting();
        let pause = backoff.next_delay();
        warn!(worker = %id, "{ended}; reconnecting in {pause:?}");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// The built-in services of these names; at least one.
fn built_in(names: &[String]) -> anyhow::Result<Vec<Service>> {
    let found: Vec<_> = names
        .iter()
        .map(|name| {
            services::by_name(name).with_context(|| {
                format!(
                    "no built-in service `{name}`: the built-in services are {}",
                    services::BUILT_IN.join(", ")
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        !found.is_empty(),
        "name the services to serve: --services echo,mail"
    );
    Ok(found)
}

/// Runs one incarnation of the worker, `id`, on `broker` until it stops:
/// how it ended, and how long it ran.
async fn serve(
    opts: &WorkerOptions,
    id: &str,
    broker: Arc<dyn Broker>,
    (services, hooks): (&[Service], &Hooks),
    shutdown: &CancellationToken,
    health: &Health,
) -> (Result<(), callq_node::Error>, Duration) {
    let mut worker = Worker::new(
        WorkerOptions {
            worker_id: id.to_owned(),
            ..opts.clone()
        },
        broker,
    );
    for service in services {
        worker = worker.service(service.clone());
    }
    if let Some(armed) = &hooks.crash {
        worker = worker.probe(armed.clone());
    }
    health.follow(worker.stats());
    let started = tokio::time::Instant::now();
    let ended = worker.run(shutdown.clone()).await;
    (ended, started.elapsed())
}
