//! Child processes of a test (schedulers, workers, user programs): started
//! against a cluster's configuration, their stderr collected without
//! colours, and stopped when dropped, so that a failing test leaves no
//! process behind.

use flotilla::Config;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running child process and the lines it has written to stderr.
pub struct Spawned {
    pub name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

/// Starts `program` with `args`, pointed at `config`'s brokers and namespace
/// through the environment (`FLOTILLA_*`), logging at `info` without colours.
pub fn spawn(name: &str, program: &Path, args: &[&str], config: &Config) -> Spawned {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("FLOTILLA_AMQP_URL", &config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &config.redis_url)
        .env("FLOTILLA_NAMESPACE", &config.namespace)
        .env_remove("FLOTILLA_HTTP_ADDR")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info,lapin=warn");
    match &config.secret {
        Some(secret) => command.env("FLOTILLA_SECRET", secret.expose()),
        None => command.env_remove("FLOTILLA_SECRET"),
    };
    match &config.shm_dir {
        Some(dir) => command.env("FLOTILLA_SHM_DIR", dir),
        None => command.env("FLOTILLA_SHM_DIR", "off"),
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(strip_ansi(&line));
        }
    });
    Spawned {
        name: name.to_owned(),
        child,
        log,
    }
}

impl Spawned {
    /// Everything written to stderr so far, one line each.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a line of stderr contains `needle`; panics with the log
    /// after `limit`, or at once if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, limit: Duration) {
        let started = Instant::now();
        loop {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100)); // the last lines
                panic!(
                    "{} exited ({status}) before logging {needle:?}; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                started.elapsed() < limit,
                "{} did not log {needle:?} within {limit:?}; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit on its own; panics (and kills it)
    /// after `limit`. Returns its status once its stderr is read.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100)); // the last lines
                return status;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "{} still ran after {limit:?}; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to 15 s for the process to stop.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(Duration::from_secs(15))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `line` without ANSI escape sequences (colours).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `flotilla-scheduler` process, `flotilla-worker` processes and a client
/// on a fresh namespace, for what only processes show (a worker retiring,
/// killed or stopped with SIGTERM). Processes are killed and the namespace
/// purged when dropped, also when the test fails.
pub struct Processes {
    pub config: Config,
    pub scheduler: Option<Spawned>,
    pub workers: Vec<Spawned>,
    pub client: flotilla::Client,
}

impl Processes {
    /// Starts the scheduler, a client and one worker per entry of
    /// `workers` (its arguments).
    pub async fn start(prefix: &str, workers: &[&[&str]]) -> Processes {
        Self::start_with(super::fresh_config(prefix), workers).await
    }

    /// [`Processes::start`] on `config` (a fresh namespace's).
    pub async fn start_with(config: Config, workers: &[&[&str]]) -> Processes {
        let mut scheduler = spawn(
            "scheduler",
            &super::target_binary("flotilla-scheduler"),
            &["--http-addr", "off"],
            &config,
        );
        scheduler.wait_for_log("scheduler started", Duration::from_secs(30));
        let client = flotilla::Client::connect(config.clone())
            .await
            .expect("client connects");
        let mut processes = Processes {
            config,
            scheduler: Some(scheduler),
            workers: Vec::new(),
            client,
        };
        for args in workers {
            processes.add_worker(args);
        }
        processes
    }

    /// Starts one more worker process with `args`, and waits until it consumes.
    pub fn add_worker(&mut self, args: &[&str]) -> &mut Spawned {
        let name = format!("worker-{}", self.workers.len());
        let mut worker = spawn(
            &name,
            &super::target_binary("flotilla-worker"),
            args,
            &self.config,
        );
        worker.wait_for_log("worker started", Duration::from_secs(30));
        self.workers.push(worker);
        self.workers.last_mut().unwrap()
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        self.scheduler
            .iter()
            .chain(&self.workers)
            .map(|process| format!("--- {}:\n{}", process.name, process.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILLs every worker, as a crash would.
    pub fn kill_workers(&mut self) {
        self.workers.clear();
    }

    /// Closes the client, stops the processes (SIGTERM: each worker still
    /// running must exit 0) and purges the namespace.
    pub async fn stop(mut self) {
        self.client.clone().close().await.unwrap();
        for worker in &mut self.workers {
            if worker.is_running() {
                let status = worker.terminate();
                assert!(
                    status.success(),
                    "{}: {status}\n{}",
                    worker.name,
                    worker.log()
                );
            }
        }
        if let Some(mut scheduler) = self.scheduler.take() {
            scheduler.terminate();
        }
        self.workers.clear();
        flotilla::purge(&self.config).await.unwrap();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        if self.scheduler.is_some() {
            // The test failed before stop(): kill everything, then purge.
            self.workers.clear();
            self.scheduler = None;
            let config = self.config.clone();
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().expect("runtime");
                let _ = runtime.block_on(flotilla::purge(&config));
            })
            .join();
        }
    }
}
