//! What the container tests share: commands that must succeed, the Python
//! packages they read YAML and schemas with, images, containers and compose
//! projects removed when dropped.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The Python packages of `tests/kube_validate.py`, pinned.
pub const PYTHON_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "cloudcoil==0.6.0",
    "cloudcoil-models-keda==2.16.1.0",
];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`; panics, naming `what` to install, when it cannot start.
pub fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} ({e}): {what} must be installed"))
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn ok(cmd: &mut Command, what: &str) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd, what);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// --- Python tools --------------------------------------------------------

pub fn python() -> String {
    std::env::var("CALLQ_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A lock held while its directory exists (a directory's creation is
/// atomic): tests running at once install the packages once. A lock left
/// by a run that died is taken after five minutes.
pub struct DirLock(PathBuf);

impl DirLock {
    fn take(path: PathBuf) -> Self {
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            match std::fs::create_dir(&path) {
                Ok(()) => return Self(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(300));
                    if stale || Instant::now() > until {
                        let _ = std::fs::remove_dir(&path);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot create the lock {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The directory holding `PYTHON_PACKAGES` for `python()`, installed with
/// `pip install --target` when an import fails: nothing goes into the
/// interpreter's own site-packages, so Debian's externally managed Python
/// needs no `--break-system-packages`.
pub fn python_packages() -> PathBuf {
    let py = python();
    let tag = ok(
        Command::new(&py).args(["-c", "import sys; print(sys.implementation.cache_tag)"]),
        "Python 3 (CALLQ_PYTHON, default python3)",
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "kube-validate-{}-{}",
        tag.trim(),
        PYTHON_PACKAGES.join("+").replace(['=', '.'], "")
    ));
    let importable = || {
        Command::new(&py)
            .env("PYTHONPATH", &dir)
            .args([
                "-c",
                "import kubernetes_validate, cloudcoil.models.keda.v1alpha1, jsonschema, yaml",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if importable() {
        return dir;
    }
    let _lock = DirLock::take(dir.with_extension("lock"));
    if !importable() {
        let started = Instant::now();
        ok(
            Command::new(&py)
                .env("PIP_ROOT_USER_ACTION", "ignore")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--upgrade",
                    "--target",
                ])
                .arg(&dir)
                .args(PYTHON_PACKAGES),
            "pip for that Python (Debian: python3-pip)",
        );
        eprintln!(
            "installed {} into {} in {:.1} s",
            PYTHON_PACKAGES.join(" "),
            dir.display(),
            started.elapsed().as_secs_f64()
        );
        assert!(
            importable(),
            "the packages were installed into {} but do not import",
            dir.display()
        );
    }
    dir
}

/// An image, removed when dropped (also when the test fails).
pub struct Image(pub String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "--force", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A container, removed when dropped.
pub struct Container(pub String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "--force", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub fn docker(args: &[&str]) -> String {
    ok(Command::new("docker").args(args), "Docker")
}

/// A compose project, taken down (containers, networks, volumes) when
/// dropped; its logs are printed then, for a failed test.
pub struct Project {
    pub name: String,
    pub file: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Project {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    pub fn run(&self, args: &[&str]) -> String {
        ok(&mut self.command(args), "docker-compose")
    }

    /// The logs of `services` (all when empty).
    pub fn logs(&self, services: &[&str]) -> String {
        let mut args = vec!["logs", "--no-color"];
        args.extend_from_slice(services);
        text(&run(&mut self.command(&args), "docker-compose"))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs(&[]));
        }
        let _ = self
            .command(&["down", "--volumes", "--remove-orphans", "--timeout", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(self.file.parent().unwrap());
    }
}
