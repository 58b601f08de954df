//! A user's project, as the README says to make one and exactly as
//! `examples/template/` ships it: a task library crate, a worker binary
//! crate that names it and lends its tasks shared state
//! (`flotilla::worker_main!(my_tasks; state = my_tasks::init)`), and a client
//! program, each depending on `flotilla-rs` alone (plus `serde` and
//! `tokio`), built outside this workspace. The test starts this
//! workspace's `flotilla-scheduler` and two of the user's workers in a fresh
//! namespace and runs the user's tasks from the user's client, which checks
//! its results itself.
//!
//! It also builds the recipe that used to serve nothing
//! (`fn main() { flotilla::worker::main() }` beside a task crate it never
//! names) and a worker naming a crate without tasks, and checks that both
//! refuse to start with an error that says how to fix them.
//!
//! The template is copied into `target/user-project` with a
//! `[patch.crates-io]` that points `flotilla-rs` at this workspace's
//! `crates/client/`, this workspace's `Cargo.lock` (built `--offline`) and
//! this workspace's target directory, so that only the Flotilla crates and
//! the user's are compiled, and only on the first run.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::process::{spawn, Spawned};

/// The recipe the README used to give: the task crate is a dependency, but
/// nothing names it, so it is not linked.
const OLD_WORKER_MAIN: &str = "fn main() {\n    flotilla::worker::main()\n}\n";

/// Names a crate that defines no task.
const WRONG_WORKER_MAIN: &str = "flotilla::worker_main!(my_tasks, serde);\n";

/// The crate of the two broken workers, added to the template's workspace.
const BROKEN_WORKERS_MANIFEST: &str = "[package]
name = \"broken-workers\"
version = \"0.1.0\"
edition = \"2021\"
publish = false

[dependencies]
flotilla-rs.workspace = true
my-tasks.workspace = true
serde.workspace = true
";

/// The template's members, which the test extends with the broken workers.
const TEMPLATE_MEMBERS: &str = r#"members = ["my-tasks", "my-worker", "my-client"]"#;

/// The template's Flotilla dependency, the published crate, which the test
/// patches to this workspace's `crates/client` (`[patch.crates-io]`).
const TEMPLATE_FLOTILLA: &str = r#"flotilla-rs = "0.1""#;

#[tokio::test]
async fn a_users_own_crates_build_and_run_on_their_own_workers() {
    let project = UserProject::generate();
    project.build();
    project.clippy();

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
        assert!(log.contains(r#"{"my_tasks": 5}"#), "{}: {log}", worker.name);
        // `worker_main!(my_tasks; state = my_tasks::init)` built the state.
        assert!(
            log.contains(r#"worker state built types=["my_tasks::Settings"]"#),
            "{}: {log}",
            worker.name
        );
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
        client.log().contains("my-client: add chain = 113"),
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

    /// `cargo <args>` in the user's project, into the workspace's target
    /// directory.
    fn cargo(&self, args: &[&str]) -> Command {
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
            .args(args)
            .current_dir(&self.dir)
            .env("CARGO_TARGET_DIR", &self.target_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        command
    }

    /// `cargo clippy -- -D warnings` of the user's project: what the
    /// macros expand to and what the API returns pass the lints a user's
    /// CI runs (`clippy::result_large_err` once failed every task).
    fn clippy(&self) {
        let output = self
            .cargo(&["clippy", "--offline", "--workspace", "--", "-D", "warnings"])
            .output()
            .expect("cargo clippy runs");
        assert!(
            output.status.success(),
            "the user's project does not pass clippy ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `cargo build --offline` of the user's project, into the workspace's
    /// target directory.
    fn build(&self) {
        let mut command = self.cargo(&["build", "--offline", "--bins"]);
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

/// Copies `examples/template/` into `dir`, with the broken workers as a
/// fourth member, `flotilla-rs` patched to this workspace's `crates/client`,
/// this workspace's dev profile and this workspace's lock file.
fn write_files(dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root");
    copy_template(&workspace.join("examples/template"), dir);

    let manifest_path = dir.join("Cargo.toml");
    let manifest = std::fs::read_to_string(&manifest_path).expect("the template's Cargo.toml");
    // What the test replaces must be there, or the test would build
    // something else than the template says.
    assert!(
        manifest.contains(TEMPLATE_MEMBERS) && manifest.contains(TEMPLATE_FLOTILLA),
        "the template's Cargo.toml lists {TEMPLATE_MEMBERS} and depends on {TEMPLATE_FLOTILLA}:\n{manifest}"
    );
    let client = workspace.join("crates/client");
    let client = client.to_str().expect("UTF-8 workspace path");
    let manifest = format!(
        "{}\n[patch.crates-io]\nflotilla-rs = {{ path = {client:?} }}\n\n{}",
        manifest.replace(
            TEMPLATE_MEMBERS,
            r#"members = ["my-tasks", "my-worker", "my-client", "broken-workers"]"#
        ),
        // This workspace's dev profile, so the shared target directory's
        // dependencies are reused, not rebuilt.
        dev_profile(workspace)
    );
    std::fs::write(&manifest_path, manifest).expect("Cargo.toml");

    let files = [
        ("broken-workers/Cargo.toml", BROKEN_WORKERS_MANIFEST),
        ("broken-workers/src/bin/old-worker.rs", OLD_WORKER_MAIN),
        ("broken-workers/src/bin/wrong-worker.rs", WRONG_WORKER_MAIN),
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

/// Copies the template's files, without what building it in place leaves
/// behind (`target/`, `Cargo.lock`).
fn copy_template(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("project directory");
    for entry in std::fs::read_dir(from).expect("examples/template") {
        let entry = entry.expect("template entry");
        let name = entry.file_name();
        if name == "target" || name == "Cargo.lock" {
            continue;
        }
        let (from, to) = (entry.path(), to.join(&name));
        if entry.file_type().expect("file type").is_dir() {
            copy_template(&from, &to);
        } else {
            std::fs::copy(&from, &to).expect("template file");
        }
    }
}
