//! The example services the `callq` binary ships, so that a cluster can be
//! run, tested and benchmarked as it comes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{HandlerError, Service};

/// The longest `echo.sleep` accepts, so that a call cannot hold a worker
/// slot for ever.
pub const MAX_SLEEP_MS: u64 = 60_000;

/// `echo`: `echo` returns its arguments (traceless); `sleep` waits `ms`
/// milliseconds and returns `{"slept_ms": ms}` (traceless), or stops at
/// once when the call is cancelled; `flaky` fails with the retryable error
/// `try_again` while its attempt is below `{"ok_at": n}` (with
/// `"retry_after_ms"`, asking for its next attempt that long after), then
/// returns `{"attempt": n}`: a call with a `retry` policy shows its
/// retries with it; `span` waits `ms` like `sleep` and returns when it ran,
/// `{"started_us": .., "ended_us": .., "pid": ..}` (wall-clock
/// microseconds since the Unix epoch, and the worker's process id): calls
/// with a `concurrency_key` show with it which of them ran at once.
pub fn echo() -> Service {
    Service::new("echo")
        .method("echo", |_ctx, args| async move { Ok(args) })
        .method("span", |_ctx, args: Value| async move {
            let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(0);
            if ms > MAX_SLEEP_MS {
                return Err(HandlerError::invalid_args(format!(
                    "ms = {ms} is above the limit of {MAX_SLEEP_MS}"
                )));
            }
            let started_us = wall_us();
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!({
                "started_us": started_us,
                "ended_us": wall_us(),
                "pid": std::process::id(),
            }))
        })
        .method("flaky", |ctx, args: Value| async move {
            let ok_at = args.get("ok_at").and_then(Value::as_u64).unwrap_or(1);
            let attempt = u64::from(ctx.attempt());
            if attempt >= ok_at {
                return Ok(json!({ "attempt": attempt }));
            }
            let e = HandlerError::retryable(
                "try_again",
                format!("attempt {attempt} fails; attempt {ok_at} will not"),
            );
            Err(match args.get("retry_after_ms").and_then(Value::as_u64) {
                Some(ms) => e.retry_after(Duration::from_millis(ms.min(MAX_SLEEP_MS))),
                None => e,
            })
        })
        .method("sleep", |ctx, args: Value| async move {
            let ms = args.get("ms").and_then(Value::as_u64).ok_or_else(|| {
                HandlerError::invalid_args("sleep needs {\"ms\": <milliseconds>}")
            })?;
            if ms > MAX_SLEEP_MS {
                return Err(HandlerError::invalid_args(format!(
                    "ms = {ms} is above the limit of {MAX_SLEEP_MS}"
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!({ "slept_ms": ms })),
                () = ctx.cancelled() => Err(HandlerError::new(
                    callq_schemas::codes::CANCELLED,
                    "cancelled while sleeping",
                )),
            }
        })
}

/// Now, in microseconds since the Unix epoch.
fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The trace `mail.send` declares before its effect.
pub const MAIL_SENT: &str = "mail.sent";

/// The ending an outbox file of `mail.send` must have, so that a call can
/// only ever append to files meant for it.
pub const OUTBOX_SUFFIX: &str = ".outbox";

/// `mail`: `send` "sends" a mail by appending one line to an outbox file,
/// after declaring the trace `mail.sent`.
///
/// Arguments: `{"outbox": "/abs/path/x.outbox", "to": "a@b", "subject": "..",
/// "before_ms": 0, "after_ms": 0}`. The line is `<call_id>\t<to>\t<subject>`.
/// `before_ms` waits before the trace and `after_ms` after the line is
/// written, so that tests and the demo can kill a worker on either side of
/// the trace: killed before it, the call is retried transparently; killed
/// after it, the call ends `fatal` and the line is there once.
pub fn mail() -> Service {
    Service::new("mail").method("send", |ctx, args: Value| async move {
        let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_owned);
        let ms = |k: &str| args.get(k).and_then(Value::as_u64).unwrap_or(0);
        let outbox = text("outbox").ok_or_else(|| {
            HandlerError::invalid_args("send needs {\"outbox\": \"/path/file.outbox\", \"to\": ..}")
        })?;
        let path = std::path::PathBuf::from(&outbox);
        if !path.is_absolute() || !outbox.ends_with(OUTBOX_SUFFIX) {
            return Err(HandlerError::invalid_args(format!(
                "outbox must be an absolute path ending in `{OUTBOX_SUFFIX}`, not `{outbox}`"
            )));
        }
        let to = text("to").ok_or_else(|| HandlerError::invalid_args("send needs \"to\""))?;
        let subject = text("subject").unwrap_or_default();
        let (before, after) = (ms("before_ms"), ms("after_ms"));
        if before.max(after) > MAX_SLEEP_MS {
            return Err(HandlerError::invalid_args(format!(
                "before_ms and after_ms must not exceed {MAX_SLEEP_MS}"
            )));
        }
        if [&to, &subject].iter().any(|t| t.contains(['\n', '\t'])) {
            return Err(HandlerError::invalid_args(
                "to and subject must not contain tabs or line breaks",
            ));
        }
        tokio::time::sleep(Duration::from_millis(before)).await;
        ctx.trace(MAIL_SENT).await?;
        let line = format!("{}\t{to}\t{subject}\n", ctx.call_id());
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(line.as_bytes()))
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(HandlerError::new(
                    "outbox_unwritable",
                    format!("cannot append to `{outbox}`: {e}"),
                ));
            }
            Err(e) => return Err(HandlerError::new("outbox_unwritable", e.to_string())),
        }
        tokio::time::sleep(Duration::from_millis(after)).await;
        Ok(json!({ "sent": true, "to": to }))
    })
}

/// `chaos`, for fault tests and drills, never for production: `echo`
/// answers its arguments; `crash` aborts the whole worker process after
/// `{"after_ms": n}` (at most the sleep limit), as a call that crashes its
/// worker every time (a poison call) does. A worker serves it only when
/// `--services` names it.
pub fn chaos() -> Service {
    Service::new("chaos")
        .method("echo", |_ctx, args| async move { Ok(args) })
        .method("crash", |_ctx, args: Value| async move {
            let ms = args.get("after_ms").and_then(Value::as_u64).unwrap_or(0);
            if ms > MAX_SLEEP_MS {
                return Err(HandlerError::invalid_args(format!(
                    "after_ms = {ms} is above the limit of {MAX_SLEEP_MS}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            tracing::error!("chaos.crash: aborting the worker process, as asked");
            std::process::abort()
        })
}

/// `counter`: a counter kept in the call's session data. `add` adds
/// `{"n": <integer>}` and returns `{"value": <the new value>}`; `get` returns
/// `{"value": ..}` (0 for a new session); `close` closes the session.
pub fn counter() -> Service {
    let value = |s: &crate::Session| s.get("value").and_then(|v| v.as_i64()).unwrap_or(0);
    Service::new("counter")
        .method("add", move |ctx, args: Value| async move {
            let n = args
                .get("n")
                .and_then(Value::as_i64)
                .ok_or_else(|| HandlerError::invalid_args("add needs {\"n\": <integer>}"))?;
            let session = ctx.session().await?;
            let sum = value(&session)
                .checked_add(n)
                .ok_or_else(|| HandlerError::invalid_args("the counter would overflow"))?;
            session.set("value", json!(sum));
            Ok(json!({ "value": sum }))
        })
        .method("get", move |ctx, _args: Value| async move {
            let session = ctx.session().await?;
            Ok(json!({ "value": value(&session), "version": session.version() }))
        })
        .method("close", |ctx, _args: Value| async move {
            ctx.session().await?.close();
            Ok(json!({ "closed": true }))
        })
}

/// The names of the built-in services, for `--services`.
pub const BUILT_IN: &[&str] = &["echo", "mail", "bank", "chaos", "counter"];

/// A built-in service by name.
pub fn by_name(name: &str) -> Option<Service> {
    match name {
        "echo" => Some(echo()),
        "mail" => Some(mail()),
        "bank" => Some(crate::bank::bank_from_env()),
        "chaos" => Some(chaos()),
        "counter" => Some(counter()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Ctx;

    #[tokio::test(start_paused = true)]
    async fn echo_and_sleep() {
        let s = echo();
        let r = s
            .invoke("echo", Ctx::for_test("echo", "echo"), json!({"a": [1]}))
            .unwrap()
            .await;
        assert_eq!(r.unwrap(), json!({"a": [1]}));
        let start = tokio::time::Instant::now();
        let r = s
            .invoke("sleep", Ctx::for_test("echo", "sleep"), json!({"ms": 1500}))
            .unwrap()
            .await;
        assert_eq!(r.unwrap(), json!({"slept_ms": 1500}));
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
        let e = s
            .invoke("sleep", Ctx::for_test("echo", "sleep"), json!({}))
            .unwrap()
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_args");
        let e = s
            .invoke(
                "sleep",
                Ctx::for_test("echo", "sleep"),
                json!({"ms": MAX_SLEEP_MS + 1}),
            )
            .unwrap()
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_args");
        assert!(
            s.invoke("nope", Ctx::for_test("echo", "nope"), json!({}))
                .is_none()
        );
        assert!(by_name("echo").is_some() && by_name("x").is_none());
    }

    #[tokio::test]
    async fn mail_appends_one_line_per_call_and_checks_its_args() {
        let dir = std::env::temp_dir().join(format!("callq-mail-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let outbox = dir.join("t.outbox");
        let s = mail();
        let ctx = Ctx::for_test("mail", "send");
        let id = ctx.call_id();
        let args = json!({"outbox": outbox, "to": "a@example.com", "subject": "hi"});
        let r = s.invoke("send", ctx, args).unwrap().await.unwrap();
        assert_eq!(r, json!({"sent": true, "to": "a@example.com"}));
        let text = std::fs::read_to_string(&outbox).unwrap();
        assert_eq!(text, format!("{id}\ta@example.com\thi\n"));
        for bad in [
            json!({"to": "a"}),
            json!({"outbox": "relative.outbox", "to": "a"}),
            json!({"outbox": dir.join("x.txt"), "to": "a"}),
            json!({"outbox": outbox, "to": "a\nb"}),
            json!({"outbox": outbox}),
            json!({"outbox": outbox, "to": "a", "after_ms": MAX_SLEEP_MS + 1}),
        ] {
            let e = s
                .invoke("send", Ctx::for_test("mail", "send"), bad.clone())
                .unwrap()
                .await
                .unwrap_err();
            assert_eq!(e.code, "invalid_args", "{bad}");
        }
        assert_eq!(std::fs::read_to_string(&outbox).unwrap().lines().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
