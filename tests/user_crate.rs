//! A user's project, built as the README says, outside this workspace: a
//! task library crate, a worker binary crate that names it
//! (`flotilla::worker_main!(my_tasks)`), and a client program, each
//! depending on `flotilla-rs` alone (plus `serde` and `tokio`). The test starts
//! this workspace's `flotilla-scheduler` and two of the user's workers in a
//! fresh namespace and runs the user's tasks from the user's client.
//!
//! It also builds the recipe that used to serve nothing
//! (`fn main() { flotilla::worker::main() }` beside a task crate it never
//! names) and a worker naming a crate without tasks, and checks that both
//! refuse to start with an error that says how to fix them.
//!
//! The user's project is generated into `target/user-project` with a path
//! dependency on this workspace's `crates/client/`, this workspace's `Cargo.lock`
//! (built `--offline`) and this workspace's target directory, so that only
//! the Flotilla crates and the user's are compiled, and only on the first
//! run.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::process::{spawn, Spawned};

const TASKS_LIB: &str = r#"//! The user's tasks.
use serde::{Deserialize, Serialize};

#[flotilla::task]
pub fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[flotilla::task]
pub fn might_fail(x: i64) -> Result<i64, String> {
    if x < 0 { Err("Negative value".into()) } else { Ok(x * x) }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub total: i64,
}

#[flotilla::task]
pub async fn summarize(xs: Vec<i64>) -> Summary {
    tokio::task::yield_now().await;
    Summary { count: xs.len(), total: xs.iter().sum() }
}

/// Which worker ran it, after a pause, so that a batch spreads over workers.
#[flotilla::task]
pub async fn worker_of(ctx: flotilla::TaskContext, millis: u64) -> String {
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
    ctx.worker_id().to_owned()
}
"#;

const WORKER_MAIN: &str = "flotilla::worker_main!(my_tasks);\n";

/// The recipe the README used to give: the task crate is a dependency, but
/// nothing names it, so it is not linked.
const OLD_WORKER_MAIN: &str = "fn main() {\n    flotilla::worker::main()\n}\n";

/// Names a crate that defines no task.
const WRONG_WORKER_MAIN: &str = "flotilla::worker_main!(my_tasks, serde);\n";

const CLIENT_MAIN: &str = r#"use flotilla::prelude::*;
use my_tasks::{add, might_fail, summarize, worker_of, Summary};

#[tokio::main]
async fn main() -> flotilla::Result<()> {
    let client = Client::from_env().await?;
    let a = client.submit(add, (1, 2));
    let b = client.submit(add, (&a, 10));
    let c = client.submit(add, (b, 100)).await?;
    assert_eq!(c, 113);

    let doubles = client.map(add, (0..100).map(|i| (i, i)));
    let summary = client.submit(summarize, (doubles,)).await?;
    assert_eq!(summary, Summary { count: 100, total: 9900 });

    match client.submit(might_fail, (-5,)).await {
        Err(Error::Task(e)) => assert_eq!(e.message(), "Negative value"),
        other => panic!("expected the task's error, got {other:?}"),
    }
    assert_eq!(client.submit(might_fail, (5,)).await?, 25);

    let ran_on = client.map(worker_of, (0..8).map(|i| (200 + i,)));
    let mut workers = client.gather(&ran_on).await?;
    workers.sort();
    workers.dedup();
    eprintln!("user client: add chain = {c}, summary = {summary:?}, workers used = {}", workers.len());
    Ok(())
}
"#;

#[tokio::test]
async fn a_users_own_crates_build_and_run_on_their_own_workers() {
    let project = UserProject::generate();
    project.build();

    // The recipe that used to serve nothing now refuses to start.
    let config = support::fresh_config("user-crate");
    let mut old = spawn(
        "old-recipe worker",
        &project.binary("old-worker"),
        &[],
        &config,
    );
    let status = old.wait_exit(Duration::from_secs(30));
    let log = old.log();
    assert_eq!(status.code(), Some(2), "old recipe: {status}; log:\n{log}");
    assert!(
        log.contains("ERROR") && log.contains("holds none of your tasks"),
        "old recipe: {log}"
    );
    assert!(log.contains("flotilla::worker_main!(my_tasks);"), "{log}");

    let mut wrong = spawn(
        "wrong worker",
        &project.binary("wrong-worker"),
        &[],
        &config,
    );
    let status = wrong.wait_exit(Duration::from_secs(30));
    let log = wrong.log();
    assert_eq!(status.code(), Some(2), "wrong crate: {status}; log:\n{log}");
    assert!(
        log.contains("`serde` is named as a task crate")
            && log.contains("tasks are linked from: my_tasks"),
        "wrong crate: {log}"
    );

    // The README's recipe: the project's scheduler, two of the user's workers.
    let _cleanup = Purge(config.clone());
    let mut scheduler = spawn(
        "scheduler",
        &support::target_binary("flotilla-scheduler"),
        &["--http-addr", "off"],
        &config,
    );
    scheduler.wait_for_log("scheduler started", Duration::from_secs(30));
    let mut workers: Vec<Spawned> = (1..=2)
        .map(|n| {
            let name = format!("user-worker-{n}");
            spawn(
                &name,
                &project.binary("my-worker"),
                &["--nthreads", "2", "--name", &name],
                &config,
            )
        })
        .collect();
    for worker in &mut workers {
        worker.wait_for_log("worker started", Duration::from_secs(30));
        let log = worker.log();
        assert!(log.contains(r#"{"my_tasks": 4}"#), "{}: {log}", worker.name);
        assert!(!log.contains("ERROR"), "{}: {log}", worker.name);
    }

    // The client checks its results itself (a failed check panics) and
    // reports on stderr.
    let mut client = spawn("user client", &project.binary("my-client"), &[], &config);
    let status = client.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "the user's client failed ({status}):\n{}\nscheduler:\n{}\nworkers:\n{}\n{}",
        client.log(),
        scheduler.log(),
        workers[0].log(),
        workers[1].log()
    );
    assert!(
        client.log().contains("user client: add chain = 113"),
        "{}",
        client.log()
    );

    for worker in &mut workers {
        assert!(
            worker.is_running(),
            "{} died:\n{}",
            worker.name,
            worker.log()
        );
        let status = worker.terminate();
        assert!(
            status.success(),
            "{}: {status}\n{}",
            worker.name,
            worker.log()
        );
    }
    scheduler.terminate();
}

/// Deletes the namespace when the test ends, passed or failed.
struct Purge(flotilla::Config);

impl Drop for Purge {
    fn drop(&mut self) {
        let config = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            let _ = runtime.block_on(flotilla::purge(&config));
        })
        .join();
    }
}

/// The user's project, generated into `<target dir>/user-project` (kept
/// after the test, for a look at what was built).
struct UserProject {
    dir: PathBuf,
    target_dir: PathBuf,
    release: bool,
}

impl UserProject {
    fn generate() -> UserProject {
        // This test binary is target/<profile>/deps/user_crate-*.
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let release = profile_dir.ends_with("release");
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| profile_dir.parent().expect("target dir").to_owned());
        // A fixed place in the target directory: Cargo identifies path
        // crates by their path from the workspace root, so the same place
        // lets a second run reuse the first one's build.
        let dir = target_dir.join("user-project");
        let _ = std::fs::remove_dir_all(&dir);
        write_files(&dir);
        UserProject {
            dir,
            target_dir,
            release,
        }
    }

    /// `cargo build --offline` of the user's project, into the workspace's
    /// target directory.
    fn build(&self) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        // What `cargo test` tells this test about its own package would
        // reach build scripts that watch it (ring's watches
        // CARGO_MANIFEST_DIR), making Cargo rebuild them on every run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&&*name)
            {
                command.env_remove(&*name);
            }
        }
        command
            .args(["build", "--offline", "--bins"])
            .current_dir(&self.dir)
            .env("CARGO_TARGET_DIR", &self.target_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        if self.release {
            command.arg("--release");
        }
        let started = Instant::now();
        let output = command.output().expect("cargo runs");
        assert!(
            output.status.success(),
            "the user's project did not build ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let compiled: Vec<&str> = std::str::from_utf8(&output.stderr)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Compiling "))
            .collect();
        eprintln!(
            "built the user's project in {:?}, compiling {compiled:?}",
            started.elapsed()
        );
    }

    fn binary(&self, name: &str) -> PathBuf {
        let profile = if self.release { "release" } else { "debug" };
        let path = self.target_dir.join(profile).join(name);
        assert!(path.exists(), "{} was built", path.display());
        path
    }
}

/// The `[profile.dev...]` sections of this workspace's manifest.
fn dev_profile(workspace: &Path) -> String {
    let manifest = std::fs::read_to_string(workspace.join("Cargo.toml")).expect("Cargo.toml");
    let mut sections = String::new();
    let mut inside = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            inside = line.starts_with("[profile.dev");
        }
        if inside {
            sections.push_str(line);
            sections.push('\n');
        }
    }
    assert!(
        sections.contains("[profile.dev]"),
        "the workspace has a dev profile"
    );
    sections
}

/// Writes the user's project into `dir`, with a path dependency on this
/// workspace's `flotilla` and this workspace's lock file.
fn write_files(dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root");
    let flotilla = workspace.join("crates/client");
    let flotilla = flotilla.to_str().expect("UTF-8 workspace path");
    let dependency = format!("flotilla-rs = {{ path = {flotilla:?} }}");
    let serde = r#"serde = { version = "1", features = ["derive"] }"#;
    let tokio = r#"tokio = { version = "1", features = ["macros", "rt-multi-thread"] }"#;
    let manifest = |name: &str, deps: &[&str]| {
        format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
                 [dependencies]\n{}\n",
                deps.join("\n")
            )
    };
    let tasks = r#"my-tasks = { path = "../my-tasks" }"#;
    let files = [
            (
                "Cargo.toml",
                format!(
                    "[workspace]\nmembers = [\"my-tasks\", \"my-worker\", \"my-client\", \"broken-workers\"]\nresolver = \"2\"\n\n{}",
                    // This workspace's dev profile, so the shared target
                    // directory's dependencies are reused, not rebuilt.
                    dev_profile(workspace)
                ),
            ),
            ("my-tasks/Cargo.toml", manifest("my-tasks", &[&dependency, serde, tokio])),
            ("my-tasks/src/lib.rs", TASKS_LIB.to_owned()),
            ("my-worker/Cargo.toml", manifest("my-worker", &[&dependency, tasks])),
            ("my-worker/src/main.rs", WORKER_MAIN.to_owned()),
            (
                "my-client/Cargo.toml",
                manifest("my-client", &[&dependency, tasks, tokio]),
            ),
            ("my-client/src/main.rs", CLIENT_MAIN.to_owned()),
            (
                "broken-workers/Cargo.toml",
                manifest("broken-workers", &[&dependency, tasks, serde]),
            ),
            ("broken-workers/src/bin/old-worker.rs", OLD_WORKER_MAIN.to_owned()),
            ("broken-workers/src/bin/wrong-worker.rs", WRONG_WORKER_MAIN.to_owned()),
        ];
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).expect("project directory");
        std::fs::write(&path, text).expect("project file");
    }
    // The workspace's lock file pins every dependency to a version that
    // is already downloaded and built.
    std::fs::copy(workspace.join("Cargo.lock"), dir.join("Cargo.lock")).expect("Cargo.lock");
}
