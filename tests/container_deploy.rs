//! What `deploy/` ships, checked with the tools that read it: the image that
//! `scripts/image` builds from this test build's `callq` (Docker), the
//! compose file (`docker-compose config`), and the Kubernetes manifests
//! (the API schemas of the PyPI package `kubernetes-validate`, KEDA's
//! models from `cloudcoil-models-keda`, and their consistency, by
//! `tests/kube_validate.py`).
//!
//! Needs Docker (the engine running), `docker-compose`, and Python 3 with
//! pip (`CALLQ_PYTHON`, default `python3`): the Python packages are
//! installed by the tests themselves, with pip, into a directory of the
//! target dir. A missing tool fails the test, never skips it.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::containers::{
    Container, Image, Project, docker, ok, python, python_packages, root, run, text,
};

fn kube_validate(what: &str) -> String {
    let packages = python_packages();
    let mut cmd = Command::new(python());
    cmd.env("PYTHONPATH", &packages)
        .arg(root().join("tests/kube_validate.py"))
        .arg(what)
        .arg(root().join("deploy/kubernetes"));
    // A KEDA CRD file (config/crd/bases/keda.sh_scaledobjects.yaml of a KEDA
    // release) to check the ScaledObject against as well.
    if let Ok(crd) = std::env::var("CALLQ_KEDA_CRD") {
        cmd.arg("--keda-crd").arg(crd);
    }
    let out = ok(&mut cmd, "Python 3");
    println!("{out}");
    out
}

// --- Kubernetes ------------------------------------------------------------

/// Every core manifest against the Kubernetes API schemas (strict: an
/// unknown field fails), the ScaledObject against KEDA's models.
#[test]
fn the_kubernetes_manifests_fit_the_kubernetes_and_keda_schemas() {
    let out = kube_validate("schemas");
    for kind in [
        "ConfigMap/callq-settings",
        "Secret/callq-urls",
        "Deployment/callq-coordinator",
        "Deployment/callq-worker",
        "Service/callq-http",
        "PodDisruptionBudget/callq-coordinator",
        "PodDisruptionBudget/callq-worker",
        "ScaledObject/callq-worker",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("ok ") && l.contains(kind)),
            "{kind} was not checked:\n{out}"
        );
    }
}

/// What the schemas cannot see: selectors, references, probe ports, the
/// grace period against the drain timeout, the KEDA triggers against the
/// workers' services, non-root read-only containers with resources.
#[test]
fn the_kubernetes_manifests_agree_with_each_other() {
    let out = kube_validate("consistency");
    assert!(
        out.contains("terminationGracePeriodSeconds 45 s is above the drain timeout 30000 ms"),
        "{out}"
    );
}

// --- compose ---------------------------------------------------------------

fn compose(args: &[&str]) -> String {
    let file = root().join("deploy/compose.yaml");
    ok(
        Command::new("docker-compose")
            .arg("-f")
            .arg(&file)
            .args(args)
            // The defaults of the file, not this shell's settings.
            .env_remove("CALLQ_BROKER")
            .env_remove("CALLQ_IMAGE")
            .env_remove("CALLQ_WORKER__DRAIN_TIMEOUT"),
        "docker-compose",
    )
}

/// The number before `unit` in the first line of `block` holding `key`.
fn number_after(block: &str, key: &str) -> u64 {
    let line = block
        .lines()
        .find(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("no `{key}` in:\n{block}"));
    line[line.find(key).unwrap() + key.len()..]
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("`{line}`: {e}"))
}

#[test]
fn the_compose_file_is_valid_and_workers_get_time_to_drain() {
    compose(&["config", "-q"]);
    let env_file = root().join("deploy/with-services.env");
    let with_services = compose(&[
        "--env-file",
        env_file.to_str().unwrap(),
        "--profile",
        "with-services",
        "config",
    ]);
    for service in ["rabbitmq:", "postgres:", "coordinator-1:", "worker:"] {
        assert!(
            with_services.contains(&format!("\n  {service}")),
            "{service}:\n{with_services}"
        );
    }
    assert!(
        with_services.contains("CALLQ_BROKER: amqp://callq:callq@rabbitmq:5672/%2f"),
        "{with_services}"
    );

    let config = compose(&["config"]);
    assert_eq!(
        config.matches("profiles:\n    - with-services\n").count(),
        2,
        "RabbitMQ and PostgreSQL are in the profile with-services:\n{config}"
    );
    let worker = &config[config.find("\n  worker:").expect("a worker service")..];
    let grace_s = number_after(worker, "stop_grace_period:");
    let drain_ms = number_after(worker, "CALLQ_WORKER__DRAIN_TIMEOUT:");
    println!("worker: stop_grace_period {grace_s} s, drain timeout {drain_ms} ms");
    assert!(
        grace_s * 1000 > drain_ms,
        "stop_grace_period {grace_s} s must exceed the drain timeout {drain_ms} ms"
    );
    for needle in [
        "host.docker.internal:host-gateway",
        "restart: unless-stopped",
        "read_only: true",
        "CALLQ_COORDINATOR__POSTGRES: postgres://",
        "- worker\n    - --services",
    ] {
        assert!(config.contains(needle), "no `{needle}` in:\n{config}");
    }
}

// --- the image -------------------------------------------------------------

/// Packages this test build's `callq` with scripts/image: the image runs
/// as uid 10001, holds the binary, its libraries, passwd, group, the CA
/// bundle and a writable /var/lib/callq and nothing else (no shell), and
/// its `callq` starts.
#[test]
fn the_image_holds_callq_alone_and_runs_it_as_non_root() {
    let tag = format!("test-{}", uuid::Uuid::now_v7().simple());
    let image = Image(format!("callq:{tag}"));
    let started = Instant::now();
    let built = ok(
        Command::new(root().join("scripts/image")).args([env!("CARGO_BIN_EXE_callq"), &tag]),
        "bash and Docker",
    );
    let build_time = started.elapsed();
    let bytes: u64 = docker(&["image", "inspect", "--format", "{{.Size}}", &image.0])
        .trim()
        .parse()
        .unwrap();
    println!(
        "{built}built {} from the test build's callq in {:.1} s: {:.1} MB",
        image.0,
        build_time.as_secs_f64(),
        bytes as f64 / 1e6
    );

    let user = docker(&["image", "inspect", "--format", "{{.Config.User}}", &image.0]);
    assert_eq!(user.trim(), "10001:10001", "the image's user");
    let config = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{.Config.WorkingDir}}",
        &image.0,
    ]);
    assert_eq!(
        config.trim(),
        r#"["/usr/local/bin/callq"] ["--help"] /var/lib/callq"#
    );

    // `docker run IMAGE` prints the help: the loader and libraries are there.
    let help = docker(&["run", "--rm", "--network", "none", &image.0]);
    assert!(help.contains("Usage: callq"), "{help}");
    let help = docker(&["run", "--rm", "--network", "none", &image.0, "--help"]);
    assert!(
        help.contains("coordinator") && help.contains("worker"),
        "{help}"
    );
    let version = docker(&["run", "--rm", "--network", "none", &image.0, "--version"]);
    assert_eq!(
        version.trim(),
        format!("callq {}", env!("CARGO_PKG_VERSION"))
    );
    // `kubectl exec POD -- callq status` finds it by its name.
    let by_name = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "callq",
        &image.0,
        "--version",
    ]);
    assert_eq!(by_name, version);

    // Nothing but what scripts/image puts there (Docker adds the rest to
    // every container), no shell.
    let container = Container(format!("callq-files-{tag}"));
    docker(&["create", "--name", &container.0, &image.0]);
    let mut export = Command::new("docker")
        .args(["export", &container.0])
        .stdout(Stdio::piped())
        .spawn()
        .expect("docker export");
    let listing = Command::new("tar")
        .args(["-tv", "--numeric-owner"])
        .stdin(export.stdout.take().unwrap())
        .output()
        .expect("tar");
    assert!(export.wait().unwrap().success(), "docker export failed");
    assert!(listing.status.success(), "tar: {}", text(&listing));
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let mut files = Vec::new();
    for line in listing.lines() {
        // mode owner size date time path [-> target]
        let line = line.split(" -> ").next().unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (mode, owner, path) = (fields[0], fields[1], *fields.last().unwrap());
        if path == "var/lib/callq/" {
            assert_eq!(owner, "10001/10001", "/var/lib/callq belongs to callq");
            assert!(mode.starts_with("drwx"), "{line}");
        } else {
            assert_eq!(owner, "0/0", "owned by root: {line}");
        }
        if mode.starts_with('d') {
            continue;
        }
        let docker_made = [
            ".dockerenv",
            "etc/hostname",
            "etc/hosts",
            "etc/mtab",
            "etc/resolv.conf",
        ]
        .contains(&path)
            || path.starts_with("dev/");
        let ours = [
            "usr/local/bin/callq",
            "etc/passwd",
            "etc/group",
            "etc/ssl/certs/ca-certificates.crt",
        ]
        .contains(&path)
            || ((path.starts_with("lib/") || path.starts_with("lib64/")) && path.contains(".so"));
        assert!(docker_made || ours, "unexpected in the image: {line}");
        if ours {
            files.push(path);
        }
    }
    println!("files: {files:?}");
    assert!(
        files.iter().any(|f| f.contains("ld-linux")),
        "the dynamic loader: {files:?}"
    );
    let passwd = ok(
        Command::new("docker").args(["cp", &format!("{}:/etc/passwd", container.0), "-"]),
        "Docker",
    );
    assert!(
        passwd.contains("callq:x:10001:10001:"),
        "/etc/passwd (a tar stream):\n{passwd}"
    );
    let shell = run(
        Command::new("docker").args([
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "/bin/sh",
            &image.0,
            "-c",
            "true",
        ]),
        "Docker",
    );
    assert!(!shell.status.success(), "the image has a shell");

    // A coordinator on its default redb store (callq-ledger.redb in the
    // working directory) writes it in the image's /var/lib/callq as uid
    // 10001; it then fails to reach a broker: there is no network.
    let coordinator = Container(format!("callq-coordinator-{tag}"));
    docker(&[
        "run",
        "--detach",
        "--name",
        &coordinator.0,
        "--network",
        "none",
        "--env",
        "CALLQ_BROKER=amqp://guest:guest@127.0.0.1:5672/%2f",
        &image.0,
        "coordinator",
    ]);
    let until = Instant::now() + Duration::from_secs(30);
    let mut logs = String::new();
    while !logs.contains("call ledger opened") {
        assert!(
            Instant::now() < until,
            "the coordinator never opened its store:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(200));
        logs = text(&run(
            Command::new("docker").args(["logs", &coordinator.0]),
            "Docker",
        ));
    }
    assert!(!logs.contains("Permission denied"), "{logs}");
    drop(coordinator);
    drop(container);
    drop(image);
    println!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}

// --- the compose cluster ---------------------------------------------------

/// A RabbitMQ virtual host of this test, deleted when dropped. Its name
/// carries `CALLQ_TEST_RUN`, so that scripts/test deletes it too.
struct Vhost {
    name: String,
    url: String,
}

impl Vhost {
    fn create() -> Self {
        let run = std::env::var("CALLQ_TEST_RUN").unwrap_or_else(|_| "manual".into());
        let name = format!("callq-test-{run}-compose-{}", uuid::Uuid::now_v7().simple());
        for args in [
            vec!["-q", "add_vhost", &name],
            vec![
                "-q",
                "set_permissions",
                "-p",
                &name,
                "guest",
                ".*",
                ".*",
                ".*",
            ],
        ] {
            ok(
                Command::new("rabbitmqctl").args(&args),
                "RabbitMQ (scripts/services installs and starts it)",
            );
        }
        let url = format!("amqp://guest:guest@127.0.0.1:5672/{name}");
        Self { name, url }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `callq status --json` of the test build, on the vhost.
fn status(vhost: &Vhost) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_callq"))
        .args(["status", "--json"])
        .env("CALLQ_BROKER", &vhost.url)
        .env("CALLQ_PATIENCE_MS", "2000")
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// deploy/compose.yaml with the image built from this test build: two
/// coordinators on PostgreSQL and two workers serve a call on the host's
/// RabbitMQ, one coordinator leads and the other stands by, and
/// `docker-compose stop` drains the workers, which exit 0.
///
/// The host's RabbitMQ and PostgreSQL listen on 127.0.0.1 only, and
/// RabbitMQ's guest logs in from loopback only: the test runs a copy of the
/// compose file whose callq services are in the host's network namespace
/// (`network_mode: host`, without `extra_hosts` and `hostname`, and with
/// HOSTNAME set per service: it names a coordinator's lease holder, which
/// the two coordinators must not share, and `CALLQ_HTTP` on a port of its
/// own, since they share the host's ports: the coordinators' `/readyz`
/// says which leads), and points them at 127.0.0.1.
#[test]
fn the_compose_cluster_serves_calls_and_drains_its_workers() {
    let vhost = Vhost::create();
    let pg = std::env::var("CALLQ_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1/test".to_owned());
    let tag = format!("test-{}", uuid::Uuid::now_v7().simple());
    let image = Image(format!("callq:{tag}"));
    ok(
        Command::new(root().join("scripts/image")).args([env!("CARGO_BIN_EXE_callq"), &tag]),
        "bash and Docker",
    );

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("compose-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("compose.yaml");
    let transform = r#"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for name, svc in doc["services"].items():
    if svc.get("profiles"):
        continue
    svc["network_mode"] = "host"
    svc.pop("extra_hosts", None)
    svc.pop("hostname", None)
    http = {"coordinator-1": sys.argv[3], "coordinator-2": sys.argv[4]}.get(name, "0")
    svc["environment"] = dict(svc.get("environment", {}), HOSTNAME=name, CALLQ_HTTP="127.0.0.1:" + http)
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
"#;
    let ports = [support::free_port(), support::free_port()];
    ok(
        Command::new(python())
            .env("PYTHONPATH", python_packages())
            .args(["-c", transform])
            .arg(root().join("deploy/compose.yaml"))
            .arg(&file)
            .args(ports.map(|p| p.to_string())),
        "Python 3",
    );
    let project = Project {
        name: format!("callq-{tag}"),
        file,
        env: [
            ("CALLQ_IMAGE", image.0.as_str()),
            ("CALLQ_BROKER", vhost.url.as_str()),
            ("CALLQ_COORDINATOR__POSTGRES", pg.as_str()),
            ("CALLQ_COORDINATOR__CLUSTER", vhost.name.as_str()),
            ("CALLQ_SERVICES", "echo"),
            ("CALLQ_WORKER__DRAIN_TIMEOUT", "5000"),
            ("CALLQ_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    };
    let started = Instant::now();
    project.run(&["up", "--detach", "--scale", "worker=2"]);

    let (leader, standby) = wait_for(
        "a leading and a standing-by coordinator",
        Duration::from_secs(40),
        || {
            let role = |port| support::http_get(port, "/readyz").map(|(_, body)| body);
            match (role(ports[0])?.as_str(), role(ports[1])?.as_str()) {
                ("leading", "standing by") => Some(("coordinator-1", "coordinator-2")),
                ("standing by", "leading") => Some(("coordinator-2", "coordinator-1")),
                _ => None,
            }
        },
    );
    println!("{leader} leads, {standby} stands by");
    let workers = wait_for("two active workers", Duration::from_secs(40), || {
        let report = status(&vhost)?;
        let active: Vec<String> = report["cluster"]["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["state"] == "active")
            .map(|w| w["worker_id"].as_str().unwrap_or_default().to_owned())
            .collect();
        (active.len() == 2).then_some(active)
    });
    println!(
        "workers {workers:?} active {:.1} s after `up`",
        started.elapsed().as_secs_f64()
    );

    // A call from a container of the image (`docker-compose run` cannot
    // run a service that is in the host's network).
    let broker = format!("CALLQ_BROKER={}", vhost.url);
    let reply = docker(&[
        "run",
        "--rm",
        "--network",
        "host",
        "--env",
        &broker,
        &image.0,
        "call",
        "echo",
        "echo",
        r#"{"from": "compose"}"#,
    ]);
    assert!(
        reply.contains(r#""from""#) && reply.contains("compose"),
        "{reply}"
    );

    // SIGTERM: each worker drains, leaves and exits 0.
    project.run(&["stop", "--timeout", "30", "worker"]);
    let logs = project.logs(&["worker"]);
    assert_eq!(logs.matches("worker stopped").count(), 2, "{logs}");
    let ids = project.run(&["ps", "--quiet", "worker"]);
    for id in ids.split_whitespace() {
        let exit = docker(&["inspect", "--format", "{{.State.ExitCode}}", id]);
        assert_eq!(exit.trim(), "0", "a worker's exit code:\n{logs}");
    }
    wait_for("the workers to leave", Duration::from_secs(10), || {
        let report = status(&vhost)?;
        report["cluster"]["workers"]
            .as_array()?
            .is_empty()
            .then_some(())
    });
    println!("whole test: {:.1} s", started.elapsed().as_secs_f64());
    drop(project);
    drop(image);
}
