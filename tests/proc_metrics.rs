//! `/metrics` of a coordinator and two workers on RabbitMQ (`CALLQ_HTTP`),
//! scraped around a known load: the counters match what the test's client
//! saw in its replies, Prometheus's own parser (Python's
//! `prometheus_client`) reads every scrape, labels stay bounded, and a
//! worker killed is one death on the coordinator.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use callq_node::{Admin, CallOptions, Client, ClientOptions};
use callq_schemas::Outcome;
use callq_schemas::protocol::WorkerState;
use futures::future::join_all;
use serde_json::json;
use support::{Proc, Vhost, count, free_port, http_get, wait_status};
use tokio::time::Instant;

/// `/metrics` of the process on `port`, read by Prometheus's Python parser:
/// each sample as `name{label="value",...}` (labels sorted) and its value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (code, body) = http_get(port, "/metrics").expect("nothing answers /metrics");
    assert_eq!(code, 200, "{body}");
    let python = std::env::var("CALLQ_PYTHON").unwrap_or_else(|_| "python3".into());
    let parse = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families as parse\n\
        for family in parse(sys.stdin.read()):\n\
        \x20   for s in family.samples:\n\
        \x20       labels = ','.join(f'{k}=\"{v}\"' for k, v in sorted(s.labels.items()))\n\
        \x20       print(f'{s.name}{{{labels}}} {s.value!r}')\n";
    let mut child = std::process::Command::new(python)
        .args(["-c", parse])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (scripts/services installs it)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Prometheus's parser refused the scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include every one of
/// `labels` (`key="value"`).
fn sum(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")))
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

/// Sends `n` calls of `service.method` at once; the replies' outcomes.
/// (`mail.send` writes to `outbox.outbox` in the test's directory.)
async fn calls(client: &Client, service: &str, method: &str, n: usize) -> Vec<Outcome> {
    let outbox = support::temp_dir("metrics-mail").join("mail.outbox");
    let outbox = outbox.to_str().unwrap();
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(60)),
        ..CallOptions::default()
    };
    join_all((0..n).map(|i| {
        let opts = opts.clone();
        async move {
            let args = json!({ "i": i, "to": format!("m{i}@example.com"), "outbox": outbox });
            client
                .call(service, method, args, opts)
                .await
                .unwrap()
                .outcome
        }
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_clients_saw() {
    let vhost = Vhost::create("metrics");
    let dir = support::temp_dir("metrics");
    let (pc, p1, p2) = (free_port(), free_port(), free_port());
    let http = |port: u16| format!("127.0.0.1:{port}");
    let (hc, h1, h2) = (http(pc), http(p1), http(p2));
    let _coordinator = Proc::spawn_env(
        "coordinator",
        &["coordinator"],
        &vhost.url,
        &dir,
        &[("CALLQ_HTTP", hc.as_str())],
    );
    let worker = |id: &str, addr: &str| {
        let args = ["worker", "--services", "echo,mail", "--worker-id", id];
        Proc::spawn_env(id, &args, &vhost.url, &dir, &[("CALLQ_HTTP", addr)])
    };
    let mut w1 = worker("w1", &h1);
    let mut w2 = worker("w2", &h2);
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "2 active workers", Duration::from_secs(60), |s| {
        count(s, WorkerState::Active) == 2
    })
    .await;
    let client = Client::connect(broker.clone(), ClientOptions::default())
        .await
        .unwrap();

    // The load: echo and mail calls answered ok, and calls of a method
    // no service has, answered error.
    let mut seen: Vec<Outcome> = Vec::new();
    seen.extend(calls(&client, "echo", "echo", 80).await);
    seen.extend(calls(&client, "mail", "send", 20).await);
    seen.extend(calls(&client, "echo", "no-such-method", 10).await);
    let ok = seen.iter().filter(|o| **o == Outcome::Ok).count() as f64;
    let error = seen.iter().filter(|o| **o == Outcome::Error).count() as f64;
    assert_eq!((ok, error), (100.0, 10.0), "{seen:?}");

    let (s1, s2) = (scrape(p1), scrape(p2));
    let both = |name: &str, labels: &[&str]| sum(&s1, name, labels) + sum(&s2, name, labels);
    assert_eq!(
        both("callq_calls_total", &[r#"outcome="ok""#]),
        ok,
        "{s1:#?}\n{s2:#?}"
    );
    assert_eq!(both("callq_calls_total", &[r#"outcome="error""#]), error);
    assert_eq!(
        both(
            "callq_calls_total",
            &[r#"service="mail""#, r#"method="send""#]
        ),
        20.0
    );
    // The caller's method name is no label.
    assert_eq!(
        both("callq_calls_total", &[r#"method="unknown""#]),
        error,
        "{s1:#?}"
    );
    assert!(
        s1.keys()
            .chain(s2.keys())
            .all(|k| !k.contains("no-such-method"))
    );
    assert_eq!(
        both("messaging_process_duration_seconds_count", &[]),
        ok + error
    );
    assert_eq!(both("callq_calls_started_total", &[]), ok + error);
    // The load per service and the free slots, with each heartbeat.
    for service in ["echo", "mail"] {
        let series = format!(r#"callq_service_calls_in_flight{{service="{service}"}}"#);
        assert!(
            s1.contains_key(&series) && s2.contains_key(&series),
            "{s1:#?}"
        );
    }
    assert!(both("callq_worker_free_slots", &[]) > 0.0, "{s1:#?}");
    // Each mail left one trace, granted, and completed with the
    // coordinator before its reply; every reply was confirmed.
    assert_eq!(
        both("callq_trace_requests_total", &[r#"decision="granted""#]),
        20.0
    );
    assert_eq!(
        both("callq_trace_requests_total", &[r#"decision="refused""#]),
        0.0
    );
    assert_eq!(
        both(
            "callq_coordinator_request_duration_seconds_count",
            &[r#"request="complete""#]
        ),
        20.0
    );
    assert_eq!(
        both("callq_reply_publish_duration_seconds_count", &[]),
        ok + error
    );
    assert_eq!(both("callq_broker_reconnects_total", &[]), 0.0);
    assert_eq!(both("callq_session_conflicts_total", &[]), 0.0);
    // A call is settled (acked) just after its reply went out.
    let until = Instant::now() + Duration::from_secs(10);
    while sum(&scrape(p1), "callq_calls_in_flight", &[])
        + sum(&scrape(p2), "callq_calls_in_flight", &[])
        != 0.0
    {
        assert!(
            Instant::now() < until,
            "calls still in flight after their replies"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Ten times the calls, the same series: no label grows with the load.
    let series = (s1.len(), s2.len());
    let more = calls(&client, "echo", "echo", 800).await;
    assert!(more.iter().all(|o| *o == Outcome::Ok));
    let (t1, t2) = (scrape(p1), scrape(p2));
    assert_eq!((t1.len(), t2.len()), series, "{t1:#?}\n{t2:#?}");
    assert_eq!(
        sum(&t1, "callq_calls_total", &[r#"outcome="ok""#])
            + sum(&t2, "callq_calls_total", &[r#"outcome="ok""#]),
        ok + 800.0
    );

    // The coordinator leads, has heard heartbeats, and counts a killed
    // worker as one death.
    let sc = scrape(pc);
    assert_eq!(sum(&sc, "callq_coordinator_leader", &[]), 1.0, "{sc:#?}");
    // Sampled once a second: two active workers, a store of some size.
    let until = Instant::now() + Duration::from_secs(10);
    while sum(&scrape(pc), "callq_workers", &[r#"state="active""#]) != 2.0 {
        assert!(Instant::now() < until, "{:#?}", scrape(pc));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sc = scrape(pc);
    assert_eq!(sum(&sc, "callq_workers", &[r#"state="standby""#]), 0.0);
    assert!(sum(&sc, "callq_store_bytes", &[]) > 0.0, "{sc:#?}");
    assert!(sc.keys().any(|k| k.starts_with("callq_ledger_open_calls")));
    for state in ["running", "waiting"] {
        let keyed = format!(r#"state="{state}""#);
        let shown = sc
            .keys()
            .any(|k| k.starts_with("callq_keyed_calls{") && k.contains(&keyed));
        assert!(shown, "no callq_keyed_calls {keyed}: {sc:#?}");
        assert_eq!(sum(&sc, "callq_keyed_calls", &[&keyed]), 0.0, "{sc:#?}");
    }
    assert!(sum(&sc, "callq_heartbeats_total", &[]) > 0.0, "{sc:#?}");
    assert_eq!(sum(&sc, "callq_worker_deaths_total", &[]), 0.0);
    w2.kill9();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let sc = scrape(pc);
        if sum(&sc, "callq_worker_deaths_total", &[]) == 1.0 {
            break;
        }
        assert!(Instant::now() < until, "no death counted: {sc:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(w1.running(), "{}", w1.log());

    // Every metric the dashboard and the alert rules use is in these
    // scrapes (before its first event too: counters start at 0).
    let sc = scrape(pc);
    let scraped: std::collections::BTreeSet<String> = [&sc, &t1, &t2]
        .into_iter()
        .flat_map(|s| s.keys())
        .map(|k| family(k.split('{').next().unwrap()))
        .collect();
    for file in [
        "deploy/prometheus/callq-alerts.yaml",
        "deploy/grafana/callq-dashboard.json",
    ] {
        let text = std::fs::read_to_string(support::containers::root().join(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() >= 6, "{file}: {used:?}");
        let missing: Vec<_> = used.iter().filter(|m| !scraped.contains(*m)).collect();
        assert!(
            missing.is_empty(),
            "{file} uses {missing:?}, not in any scrape: {scraped:?}"
        );
    }
}

/// A sample's metric family: its name without a histogram's suffix.
fn family(sample: &str) -> String {
    ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| sample.strip_suffix(s))
        .unwrap_or(sample)
        .to_owned()
}

/// The metric names (`callq_...`, `messaging_...`) a file mentions.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["callq_", "messaging_"] {
        for (at, _) in text.match_indices(prefix) {
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let end = text[at..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .map_or(text.len(), |n| at + n);
            names.insert(family(&text[at..end]));
        }
    }
    names
}

/// The alert rules pass `promtool check rules`, and their unit tests
/// (`callq-alerts.test.yaml`: each alert fires where it should and only
/// there) pass `promtool test rules`.
#[test]
fn the_alert_rules_fire_where_they_should() {
    let dir = support::containers::root().join("deploy/prometheus");
    for args in [
        ["check", "rules", "callq-alerts.yaml"],
        ["test", "rules", "callq-alerts.test.yaml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian's prometheus package; scripts/services installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A coordinator and a worker of `echo` (`id`, with `env`) on `vhost`,
/// the worker active, and a client.
async fn one_worker(vhost: &Vhost, id: &str, env: &[(&str, &str)]) -> (Proc, Proc, Client) {
    let dir = support::temp_dir(id);
    let coordinator = Proc::spawn("coordinator", &["coordinator"], &vhost.url, &dir);
    let args = ["worker", "--services", "echo", "--worker-id", id];
    let worker = Proc::spawn_env(id, &args, &vhost.url, &dir, env);
    let broker = support::amqp(&vhost.url).await;
    let admin = Admin::connect(broker.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    wait_status(&admin, "the worker active", Duration::from_secs(60), |s| {
        count(s, WorkerState::Active) == 1
    })
    .await;
    let client = Client::connect(broker, ClientOptions::default())
        .await
        .unwrap();
    (coordinator, worker, client)
}

/// `CALLQ_LOG_FORMAT=json`: every line a worker logs is one JSON object,
/// and the lines about a call carry its `call_id` (with the worker, the
/// service and the method).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_name_the_call() {
    let vhost = Vhost::create("jsonlogs");
    let env = [
        ("CALLQ_LOG_FORMAT", "json"),
        ("CALLQ_LOG", "info,callq_node=debug"),
    ];
    let (_coordinator, worker, client) = one_worker(&vhost, "j1", &env).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let reply = client
            .call("echo", "echo", json!({ "i": i }), CallOptions::default())
            .await
            .unwrap();
        assert_eq!(reply.outcome, Outcome::Ok);
        ids.push(reply.call_id.to_string());
    }
    let log = worker.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().all(|l| l["level"].is_string()
            && l["message"].is_string()
            && l["timestamp"].is_string()),
        "{log}"
    );
    for id in &ids {
        let received = lines
            .iter()
            .find(|l| l["message"] == "call received" && l["call_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no line names call {id}:\n{log}"));
        assert_eq!(received["worker"], "j1", "{received}");
        assert_eq!(received["service"], "echo", "{received}");
        assert_eq!(received["method"], "echo", "{received}");
    }
}

/// `callq status --watch` redraws in place (each frame starts by clearing
/// the screen) and shows the calls per second of a service under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_redraws_with_the_rate_of_each_service() {
    let vhost = Vhost::create("watch");
    let (_coordinator, _worker, client) = one_worker(&vhost, "watch1", &[]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = calls(&client, "echo", "echo", 20).await;
                assert!(batch.iter().all(|o| *o == Outcome::Ok));
                n += 20;
            }
            n
        })
    };
    let out = tokio::process::Command::new(support::callq_bin())
        .args(["status", "--watch", "--interval-ms", "700", "--frames", "4"])
        .env("CALLQ_BROKER", &vhost.url)
        .output()
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let done = load.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames: Vec<&str> = text.split("\x1b[H\x1b[2J").skip(1).collect();
    assert_eq!(frames.len(), 4, "{text}");
    let last = frames[3];
    let echo = last
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("no echo line: {last}"));
    let rate: f64 = echo.split_whitespace().nth(1).unwrap().parse().unwrap();
    eprintln!("{last}\n{done} calls made");
    assert!(rate > 0.0, "{last}");
    assert!(last.contains("WORKER") && last.contains("watch1"), "{last}");
}
