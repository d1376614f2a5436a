//! The example services the `callq` binary ships, so that a cluster can be
//! run, tested and benchmarked as it comes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{HandlerError, Service};

/// The longest `echo.sleep` accepts, so that a call cannot hold a worker
/// slot for ever.
pub const MAX_SLEEP_MS: u64 = 60_000;

/// `echo`: `echo` returns its arguments (traceless); `sleep` waits `ms`
/// milliseconds and returns `{"slept_ms": ms}` (traceless).
pub fn echo() -> Service {
    Service::new("echo")
        .method("echo", |_ctx, args| async move { Ok(args) })
        .method("sleep", |_ctx, args: Value| async move {
            let ms = args.get("ms").and_then(Value::as_u64).ok_or_else(|| {
                HandlerError::invalid_args("sleep needs {\"ms\": <milliseconds>}")
            })?;
            if ms > MAX_SLEEP_MS {
                return Err(HandlerError::invalid_args(format!(
                    "ms = {ms} is above the limit of {MAX_SLEEP_MS}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!({ "slept_ms": ms }))
        })
}

/// The names of the built-in services, for `--services`.
pub const BUILT_IN: &[&str] = &["echo"];

/// A built-in service by name.
pub fn by_name(name: &str) -> Option<Service> {
    match name {
        "echo" => Some(echo()),
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
}
