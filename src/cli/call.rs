//! `callq call SERVICE METHOD [ARGS]`: one call, its reply printed as
//! JSON.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use callq_node::{CallOptions, Client};
use callq_schemas::Outcome;

use super::broker::connect;
use super::config::Settings;
use super::exit;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The service, e.g. `echo`.
    service: String,
    /// The method, e.g. `echo`.
    method: String,
    /// The arguments, a JSON value.
    #[arg(default_value = "{}")]
    args: String,
    /// Milliseconds to wait for the outcome (the call's deadline).
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// The session the call runs in (its `session_id`): a service that
    /// keeps session data, such as `counter`, reads and writes that
    /// session's.
    #[arg(long, value_name = "ID")]
    session: Option<String>,
    /// The publisher's own key for the request (its `idempotency_key`),
    /// carried to the handler (`Ctx::idempotency_key`).
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Calls of the service with the same key (its `concurrency_key`) run
    /// at most the workers' `max_running_per_key.<service>` at once, across
    /// the cluster; without that setting the key limits nothing.
    #[arg(long, value_name = "KEY")]
    concurrency_key: Option<String>,
    /// 0 to 9, higher first under backlog (its `priority`): from 5 up the
    /// call goes to the service's high band, which workers serve before
    /// the others.
    #[arg(long, value_name = "0-9", value_parser = clap::value_parser!(u8).range(0..=9))]
    priority: Option<u8>,
    /// The call's id (a UUID; a fresh UUID v7 by default), for example to
    /// cancel it from elsewhere with `callq cancel`. The id is printed on
    /// stderr when the call is published.
    #[arg(long, value_name = "UUID")]
    call_id: Option<callq_schemas::Uuid>,
    /// Run the call no earlier than this from now (its `not_before`), such
    /// as `30s`, `500ms`, `2m` or `1h`; the call is confirmed at once and
    /// `--timeout-ms` counts from when it is due.
    #[arg(long, value_name = "DURATION", value_parser = parse_delay)]
    delay: Option<Duration>,
    /// Attempts in all for the handler's retryable errors (its `retry`
    /// policy; 1, the default, retries nothing). At most the queue's
    /// delivery limit (5).
    #[arg(long, value_name = "N")]
    max_attempts: Option<u32>,
    /// The backoff before the first retry, doubling with each next one
    /// (with jitter: between half and all of it).
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    backoff_ms: u64,
    /// The longest backoff.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    max_backoff_ms: u64,
}

/// A duration as `--delay` takes it: a whole number and a unit, `ms`, `s`,
/// `m` or `h`.
fn parse_delay(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| {
        format!("`{text}` is not a duration: a whole number and a unit, such as 30s")
    })?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`: use ms, s, m or h (such as 30s)"
            ));
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// Exits with the call's outcome ([`exit::of`]): 0 ok, 1 error, 2 fatal,
/// 3 expired, 5 cancelled; 4 no reply at all, 64 arguments that are not
/// JSON (nothing is sent).
pub(crate) async fn run(a: Args, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&a.args) {
        eprintln!(
            "error: the arguments are not JSON ({e}): {}\nnothing was sent; quote them for \
             the shell, e.g. '{{\"ms\": 100}}'",
            a.args
        );
        return Ok(ExitCode::from(exit::USAGE));
    }
    let call_id = a.call_id.unwrap_or_else(callq_schemas::Uuid::now_v7);
    let options = CallOptions {
        timeout: Some(Duration::from_millis(a.timeout_ms)),
        session_id: a.session,
        idempotency_key: a.idempotency_key,
        concurrency_key: a.concurrency_key,
        priority: a.priority,
        call_id: Some(call_id),
        delay: a.delay,
        retry: a
            .max_attempts
            .map(|max_attempts| callq_schemas::RetryPolicy {
                max_attempts,
                backoff_ms: a.backoff_ms,
                max_backoff_ms: a.max_backoff_ms,
            }),
        ..CallOptions::default()
    };
    match call(
        &Settings::load(config)?,
        &a.service,
        &a.method,
        &a.args,
        options,
    )
    .await
    {
        Ok(code) => Ok(ExitCode::from(code)),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(exit::NO_ANSWER))
        }
    }
}

/// `callq call`: one call, its reply printed as JSON on stdout. Returns the
/// process exit code of its outcome.
async fn call(
    settings: &Settings,
    service: &str,
    method: &str,
    args: &str,
    options: CallOptions,
) -> anyhow::Result<u8> {
    let timeout = options.timeout.unwrap_or_else(|| Duration::from_secs(30))
        + options.delay.unwrap_or_default();
    let args: serde_json::Value = serde_json::from_str(args)
        .with_context(|| format!("the arguments are not JSON: {args}"))?;
    let broker = connect(settings, "client").await?;
    let client = Client::connect(broker.clone(), settings.client.clone()).await?;
    let queue = callq_broker::call_queue_for(service, options.priority);
    // Said at once, not after the timeout; the call still waits, for a
    // worker that is starting alongside (an agent's) to take it.
    if let Ok(Ok(Some(0))) = tokio::time::timeout(timeout, broker.consumers(&queue)).await {
        eprintln!(
            "no worker consumes `{queue}` now: the call waits there until a worker serving \
             `{service}` starts or {} ms pass (`callq status` lists the workers)",
            timeout.as_millis()
        );
    }
    if let Some(id) = options.call_id {
        eprintln!("call {id}: {service}.{method} published");
    }
    let reply = client.call(service, method, args, options).await?;
    println!("{}", serde_json::to_string(&reply)?);
    if reply.outcome == Outcome::Expired {
        // Still waiting in its queue: nobody took it.
        if let Ok(Ok(depth)) = tokio::time::timeout(timeout, broker.depth(&queue)).await
            && depth.ready > 0
        {
            eprintln!(
                "no worker took the call: {} call(s) wait in `{queue}`; is a worker serving \
                 `{service}` running on this broker? (`callq status` lists the workers)",
                depth.ready
            );
        }
    }
    Ok(exit::of(reply.outcome))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn delays_read_as_a_number_and_a_unit() {
        assert_eq!(parse_delay("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_delay("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_delay("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_delay("1h").unwrap(), Duration::from_secs(3600));
        for bad in [
            "",
            "s",
            "30",
            "30 days",
            "-1s",
            "1.5s",
            "99999999999999999999h",
        ] {
            assert!(parse_delay(bad).is_err(), "{bad}");
        }
    }
}
