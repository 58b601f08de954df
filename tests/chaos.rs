//! Faults injected into real processes (spawned `flotilla-scheduler` and
//! `flotilla-worker` binaries, the real RabbitMQ and Redis): every future
//! must still resolve, with the right value. Each scenario prints
//! `chaos <scenario>: faults=N tasks=N lost=0 unresolved=0 max_resolve_s=X`
//! (`worker-lost` and `malformed` add `duplicated=N`: completions a worker
//! reported more than once for a key, as seen on the events exchange; after
//! worker deaths at-least-once delivery makes some, so `worker-lost`
//! reports the figure without asserting it).
//! One test (`redelivered_tasks_...`) fakes the dying worker in-process with
//! a raw consumer that takes a bundle and closes its connection.
//!
//! Service restarts (RabbitMQ, Redis) use private instances on ports of
//! their own, never the shared ones.
//!
//! `FLOTILLA_CHAOS_SCALE` multiplies the workload for a longer run;
//! `CHAOS_LOG` sets the spawned processes' `RUST_LOG` (default `warn`).

mod support;

#[path = "chaos/alarm.rs"]
mod alarm;
#[path = "chaos/cluster.rs"]
mod cluster;
#[path = "chaos/full.rs"]
mod full;
#[path = "chaos/hol.rs"]
mod hol;
#[path = "chaos/state.rs"]
mod state;

use flotilla::prelude::*;
use flotilla::{Config, ErrorKind, Secret};
use flotilla_examples::{add, counted_sleep, crash_worker, inc, slow_identity, total, whoami};
use flotilla_proto::{
    decode, encode, ActorCall, Arg, Event, EventBatch, Names, RunTask, StoredResult, Task,
    TaskSpec, ToScheduler, ToWorker, WIRE_VERSION,
};
use flotilla_runtime::transport;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::Confirmation;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use support::services::{PrivateRabbit, PrivateRedis};

fn scale() -> i64 {
    std::env::var("FLOTILLA_CHAOS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn spawn(binary: &str, config: &Config, args: &[&str]) -> Child {
    spawn_logged(binary, config, args, None)
}

/// Like [`spawn`], with the process's log (warnings and errors) written to
/// `log` when given.
fn spawn_logged(
    binary: &str,
    config: &Config,
    args: &[&str],
    log: Option<&std::path::Path>,
) -> Child {
    spawn_filtered(binary, config, args, log, None)
}

/// Like [`spawn_logged`], logging what `filter` (a `RUST_LOG` value) lets
/// through instead of warnings and errors.
fn spawn_filtered(
    binary: &str,
    config: &Config,
    args: &[&str],
    log: Option<&std::path::Path>,
    filter: Option<&str>,
) -> Child {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
        None => Stdio::null(),
    };
    let path = support::target_binary(binary);
    assert!(
        path.exists(),
        "{} is built (cargo build --bins)",
        path.display()
    );
    let mut command = Command::new(path);
    match &config.secret {
        Some(secret) => command.env("FLOTILLA_SECRET", secret.expose()),
        None => command.env_remove("FLOTILLA_SECRET"),
    };
    command
        .args(args)
        .env(
            "FLOTILLA_REPLAY_WINDOW_MS",
            config.replay_window_ms.to_string(),
        )
        .env("FLOTILLA_AMQP_URL", &config.amqp_url)
        .env("FLOTILLA_QUEUE_TYPE", config.queue_type.as_str())
        .env("FLOTILLA_REDIS_URL", &config.redis_url)
        .env("FLOTILLA_NAMESPACE", &config.namespace)
        .env("FLOTILLA_MAX_PAYLOAD", config.max_payload.to_string())
        .env("FLOTILLA_LONG_TASK_MS", config.long_task_ms.to_string())
        .env(
            "FLOTILLA_ALLOW_EVICTION",
            if config.allow_eviction { "1" } else { "0" },
        )
        .env(
            "FLOTILLA_ALLOWED_FAILURES",
            config.allowed_failures.to_string(),
        )
        .env(
            "RUST_LOG",
            filter.map_or_else(
                || std::env::var("CHAOS_LOG").unwrap_or_else(|_| "warn".into()),
                str::to_owned,
            ),
        )
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("process starts")
}

fn scheduler(config: &Config) -> Child {
    spawn("flotilla-scheduler", config, &["--http-addr", "off"])
}

fn worker(config: &Config) -> Child {
    spawn("flotilla-worker", config, &["--nthreads", "2"])
}

fn kill(child: &mut Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

fn stop(children: &mut [Child]) {
    for child in children.iter_mut() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    for child in children.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        kill(child);
    }
}

/// A workload of independent slow tasks, chains, and sums over the chains.
struct Workload {
    slow: Vec<TaskFuture<i64>>,
    chains: Vec<TaskFuture<i64>>,
    sums: Vec<TaskFuture<i64>>,
    tasks: usize,
}

fn submit_workload(client: &Client, salt: i64) -> Workload {
    let n = 200 * scale();
    let slow: Vec<_> = (0..n)
        .map(|i| client.submit(slow_identity, (salt + i, 20)))
        .collect();
    let mut chains = Vec::new();
    for c in 0..20 * scale() {
        let mut link = client.submit(add, (salt, c));
        for _ in 0..50 {
            link = client.submit(inc, (&link,));
        }
        chains.push(link);
    }
    let sums: Vec<_> = chains
        .chunks(5)
        .map(|c| client.submit(total, (c.to_vec(),)))
        .collect();
    let tasks = slow.len() + chains.len() * 51 + sums.len();
    Workload {
        slow,
        chains,
        sums,
        tasks,
    }
}

/// Waits for every future; returns (wrong or failed, unresolved, slowest).
async fn check(workload: &Workload, salt: i64, started: Instant) -> (usize, usize, f64) {
    let mut lost = 0;
    let mut unresolved = 0;
    let mut slowest: f64 = 0.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    for (i, f) in workload.slow.iter().enumerate() {
        match f.result_timeout(left()).await {
            Ok(v) if v == salt + i as i64 => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            other => {
                eprintln!("lost: slow task {i}: {other:?}");
                lost += 1
            }
        }
        slowest = slowest.max(started.elapsed().as_secs_f64());
    }
    for (c, f) in workload.chains.iter().enumerate() {
        match f.result_timeout(left()).await {
            Ok(v) if v == salt + c as i64 + 50 => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            other => {
                eprintln!("lost: chain {c}: {other:?}");
                lost += 1
            }
        }
    }
    for (s, f) in workload.sums.iter().enumerate() {
        let expected: i64 = (s as i64 * 5..s as i64 * 5 + 5)
            .map(|c| salt + c + 50)
            .sum();
        match f.result_timeout(left()).await {
            Ok(v) if v == expected => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            other => {
                eprintln!("lost: sum {s}: {other:?}");
                lost += 1
            }
        }
    }
    slowest = slowest.max(started.elapsed().as_secs_f64());
    (lost, unresolved, slowest)
}

/// A scheduler and two workers as processes, and a client of them.
struct Processes {
    config: Config,
    scheduler: Child,
    workers: Vec<Child>,
    client: Client,
    /// Counts re-executions for the scenario's `duplicated=` figure.
    tap: Option<EventTap>,
    /// Whether [`Processes::close`] ran (else dropping kills and purges).
    closed: bool,
}

impl Processes {
    async fn start(prefix: &str) -> Processes {
        Self::start_with(support::fresh_config(prefix), None, None).await
    }

    /// Like [`Processes::start`], with `config`, the scheduler's HTTP API
    /// served at `http_addr`, and each process's log written to a file in
    /// `logs` (`scheduler.log`, `worker-0.log`, ...).
    async fn start_with(
        config: Config,
        http_addr: Option<&str>,
        logs: Option<&std::path::Path>,
    ) -> Processes {
        Self::start_full(config, http_addr, logs, &["--nthreads", "2"]).await
    }

    /// Like [`Processes::start_with`], each worker started with `worker_args`.
    async fn start_full(
        config: Config,
        http_addr: Option<&str>,
        logs: Option<&std::path::Path>,
        worker_args: &[&str],
    ) -> Processes {
        let log = |name: &str| logs.map(|dir| dir.join(name));
        let scheduler = spawn_logged(
            "flotilla-scheduler",
            &config,
            &["--http-addr", http_addr.unwrap_or("off")],
            log("scheduler.log").as_deref(),
        );
        let workers = (0..2)
            .map(|i| {
                let name = format!("worker-{i}.log");
                spawn_logged(
                    "flotilla-worker",
                    &config,
                    worker_args,
                    log(&name).as_deref(),
                )
            })
            .collect();
        let client = Client::connect(config.clone()).await.unwrap();
        let warm = client.submit(inc, (0,));
        assert_eq!(
            warm.result_timeout(Duration::from_secs(30)).await.unwrap(),
            1
        );
        let tap = Some(EventTap::start(&config).await);
        Processes {
            config,
            scheduler,
            workers,
            client,
            tap,
            closed: false,
        }
    }

    /// Checks the workload, prints the scenario's line, stops everything.
    async fn finish(
        self,
        scenario: &str,
        faults: usize,
        workload: Workload,
        salt: i64,
        started: Instant,
    ) {
        let (lost, unresolved, slowest) = check(&workload, salt, started).await;
        let tasks = workload.tasks;
        drop(workload);
        // At-least-once: a task whose worker (or connection) went away
        // mid-run runs again; every future still resolves once.
        let duplicated = self.close().await;
        println!(
            "chaos {scenario}: faults={faults} tasks={tasks} lost={lost} duplicated={duplicated} unresolved={unresolved} max_resolve_s={slowest:.2}"
        );
        assert_eq!((lost, unresolved), (0, 0));
    }

    /// Stops the tap, the client and the processes, and purges the
    /// namespace; returns the tap's `duplicated` count.
    async fn close(mut self) -> usize {
        let duplicated = match self.tap.take() {
            Some(tap) => {
                let duplicated = tap.duplicated();
                tap.stop().await;
                duplicated
            }
            None => 0,
        };
        let _ = self.client.clone().close().await;
        stop(&mut self.workers);
        stop(std::slice::from_mut(&mut self.scheduler));
        let _ = flotilla::purge(&self.config).await;
        self.closed = true;
        duplicated
    }
}

impl Drop for Processes {
    /// A scenario that failed before [`Processes::close`] still leaves no
    /// process and no namespace behind.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        for child in self.workers.iter_mut() {
            kill(child);
        }
        kill(&mut self.scheduler);
        let config = self.config.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            let _ = runtime.block_on(flotilla::purge(&config));
        })
        .join();
    }
}

#[tokio::test]
async fn chaos_scheduler_killed_and_restarted_mid_workload() {
    let mut cluster = Processes::start("chaos-sched").await;
    let salt = 1_000_000;
    let started = Instant::now();
    let workload = submit_workload(&cluster.client, salt);
    cluster.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(&mut cluster.scheduler);
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.scheduler = scheduler(&cluster.config);
    cluster
        .finish("scheduler-restart", 1, workload, salt, started)
        .await;
}

#[tokio::test]
async fn chaos_workers_killed_and_restarted_mid_workload() {
    let mut cluster = Processes::start("chaos-workers").await;
    let salt = 2_000_000;
    let started = Instant::now();
    let workload = submit_workload(&cluster.client, salt);
    let rounds = 4;
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let victim = round % cluster.workers.len();
        kill(&mut cluster.workers[victim]);
        cluster.workers[victim] = worker(&cluster.config);
    }
    cluster
        .finish("worker-kill", rounds, workload, salt, started)
        .await;
}

/// Signed, with a 1 s replay window: the scheduler is down for 2 s while the
/// workload is submitted, so every submission is stale when it comes back.
/// It takes them up from the specs stored in Redis instead of refusing
/// them, and the workers run task messages that waited behind others.
#[tokio::test]
async fn chaos_signed_scheduler_down_longer_than_the_replay_window() {
    let mut config = support::fresh_config("chaos-signed");
    config.secret = Some(Secret::new(&format!("chaos-{}", config.namespace)));
    config.replay_window_ms = 1_000;
    let mut cluster = Processes::start_with(config, None, None).await;
    kill(&mut cluster.scheduler);
    let salt = 5_000_000;
    let started = Instant::now();
    let workload = submit_workload(&cluster.client, salt);
    cluster.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    cluster.scheduler = scheduler(&cluster.config);
    cluster
        .finish("signed-stale-submissions", 1, workload, salt, started)
        .await;
}

// --- Worker loss and hostile input ---

/// Counts the completion events workers publish, per key: a key that
/// finished more than once ran more than once. It reconnects when the
/// broker goes away, so across a broker restart it misses what was
/// published meanwhile: its count is then a lower bound.
struct EventTap {
    completions: Arc<Mutex<HashMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

/// One connected life of the tap: ends when the broker closes it.
async fn tap_once(
    config: &Config,
    counts: &Mutex<HashMap<String, u32>>,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> lapin::Result<()> {
    let names = config.names();
    let connection = transport::connect_amqp(&config.amqp_url, "chaos event tap").await?;
    let channel = connection.create_channel().await?;
    let queue = format!("{}.tap.{}", names.namespace(), flotilla_proto::new_id());
    channel
        .queue_declare(
            transport::name(&queue),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            transport::name(&queue),
            transport::name(&names.events_exchange()),
            transport::name(Names::SCHEDULER_BINDING),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            transport::name(&queue),
            transport::name("tap"),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    if let Some(ready) = ready {
        let _ = ready.send(());
    }
    while let Some(Ok(delivery)) = transport::next_delivery(&mut consumer).await {
        let Ok(batch) = decode::<EventBatch>(&delivery.data, usize::MAX) else {
            continue;
        };
        let mut counts = counts.lock().unwrap();
        for event in batch.events {
            if let Event::Finished { key, .. } | Event::Erred { key, .. } = event {
                *counts.entry(key).or_insert(0) += 1;
            }
        }
    }
    Ok(())
}

impl EventTap {
    /// Starts tapping; returns once the first connection consumes.
    async fn start(config: &Config) -> EventTap {
        let completions = Arc::new(Mutex::new(HashMap::new()));
        let counts = completions.clone();
        let config = config.clone();
        let (ready, is_ready) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready);
            loop {
                let _ = tap_once(&config, &counts, ready.take()).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        is_ready.await.expect("the event tap consumes");
        EventTap { completions, task }
    }

    /// Completions beyond the first of each key.
    fn duplicated(&self) -> usize {
        let counts = self.completions.lock().unwrap();
        counts.values().map(|&n| n as usize - 1).sum()
    }

    /// Keys with a completion whose key starts with `prefix`.
    fn completed_with_prefix(&self, prefix: &str) -> usize {
        let counts = self.completions.lock().unwrap();
        counts.keys().filter(|k| k.starts_with(prefix)).count()
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl Processes {
    /// Restarts the workers that died; returns how many had.
    fn respawn_dead_workers(&mut self) -> usize {
        let mut deaths = 0;
        for child in &mut self.workers {
            if matches!(child.try_wait(), Ok(Some(_))) {
                deaths += 1;
                *child = worker(&self.config);
            }
        }
        deaths
    }
}

/// Waits for `futures`, expecting `expected(i)` from the `i`th; returns
/// (wrong or failed, unresolved, slowest in seconds since `started`).
async fn check_values(
    futures: &[TaskFuture<i64>],
    expected: impl Fn(usize) -> i64,
    started: Instant,
) -> (usize, usize, f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut lost, mut unresolved, mut slowest) = (0, 0, 0.0f64);
    for (i, future) in futures.iter().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match future.result_timeout(left).await {
            Ok(v) if v == expected(i) => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            _ => lost += 1,
        }
        slowest = slowest.max(started.elapsed().as_secs_f64());
    }
    (lost, unresolved, slowest)
}

/// Scenario 2: a task that aborts its worker process every time errs
/// `WorkerLost` after `allowed_failures + 1` worker deaths (the first run
/// is not recorded; see `flotilla_worker`'s `lost` module), while 1,000
/// other tasks, some of them queued on the dying workers, complete.
#[tokio::test]
async fn chaos_task_that_kills_its_worker_errs_worker_lost() {
    let mut cluster = Processes::start("chaos-lost").await;
    let tap = cluster.tap.take().expect("the cluster's event tap");
    let limit = cluster.config.allowed_failures as usize;
    let salt = 3_000_000;
    let started = Instant::now();
    let client = cluster.client.clone();
    let crash = client.submit(crash_worker, ("chaos".to_owned(),));
    let after_crash = client.submit(inc, (&crash,));
    let slow: Vec<_> = (0..400)
        .map(|i| client.submit(slow_identity, (salt + i, 10)))
        .collect();
    let chains: Vec<_> = (0..20)
        .map(|c| {
            let mut link = client.submit(add, (salt, c));
            for _ in 0..29 {
                link = client.submit(inc, (&link,));
            }
            link
        })
        .collect();
    let tasks = slow.len() + chains.len() * 30;

    // The supervisor: a worker that dies is restarted, and counted.
    let mut deaths = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let outcome = loop {
        match crash.result_timeout(Duration::from_millis(50)).await {
            Err(Error::Timeout { .. }) if Instant::now() < deadline => {
                deaths += cluster.respawn_dead_workers();
            }
            other => break other,
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    deaths += cluster.respawn_dead_workers();

    let (lost_slow, unresolved_slow, slowest_slow) =
        check_values(&slow, |i| salt + i as i64, started).await;
    let (lost_chains, unresolved_chains, slowest) =
        check_values(&chains, |c| salt + c as i64 + 29, started).await;
    deaths += cluster.respawn_dead_workers();
    let (lost, unresolved) = (lost_slow + lost_chains, unresolved_slow + unresolved_chains);
    let dependent = after_crash.result_timeout(Duration::from_secs(10)).await;
    let duplicated = tap.duplicated();
    println!(
        "chaos worker-lost: faults={deaths} tasks={tasks} lost={lost} duplicated={duplicated} unresolved={unresolved} max_resolve_s={:.2}",
        slowest.max(slowest_slow)
    );
    tap.stop().await;
    let crash_key = crash.key().to_owned();
    drop((crash, after_crash, slow, chains));
    cluster.close().await;

    match outcome {
        Err(Error::Task(error)) => {
            assert_eq!(error.kind(), ErrorKind::WorkerLost, "{error}");
            assert_eq!(error.key(), crash_key);
            assert!(
                error.message().contains(&crash_key) && error.message().contains("crash_worker"),
                "the error names the task: {error}"
            );
            assert!(
                error.message().contains(&format!("{} times", limit + 1)),
                "{error}"
            );
        }
        other => panic!("the crashing task must err WorkerLost, not {other:?}"),
    }
    match dependent {
        Err(Error::Task(error)) => {
            assert_eq!(error.kind(), ErrorKind::WorkerLost);
            assert_eq!(error.key(), crash_key);
        }
        other => panic!("a dependent of the lost task errs with it, not {other:?}"),
    }
    assert_eq!(deaths, limit + 1, "worker deaths before WorkerLost");
    assert_eq!((lost, unresolved), (0, 0));
}

/// Which decoder a queue's consumer applies.
#[derive(Debug, Clone, Copy)]
enum Consumer {
    Worker,
    Scheduler,
    Events,
    Actors,
}

impl Consumer {
    /// Whether the consumer would take `bytes` as a message (with the size
    /// limit it applies).
    fn decodes(self, bytes: &[u8], max_payload: usize) -> bool {
        match self {
            Consumer::Worker => decode::<ToWorker>(bytes, max_payload * 2).is_ok(),
            Consumer::Scheduler => decode::<ToScheduler>(bytes, max_payload + (1 << 20)).is_ok(),
            Consumer::Events => decode::<EventBatch>(bytes, max_payload + (1 << 20)).is_ok(),
            Consumer::Actors => decode::<ActorCall>(bytes, max_payload * 2).is_ok(),
        }
    }

    /// A well-formed message for this consumer that would do something
    /// (run a task, report a result, call an actor) if it were accepted.
    fn forged(self, i: usize, padding: usize) -> Vec<u8> {
        let args = encode(&vec![Arg::Value(encode(&(1i64,)))]);
        let mut spec = TaskSpec::new(
            format!("forged-{i}"),
            <inc as Task>::NAME.to_owned(),
            <inc as Task>::FINGERPRINT,
            args,
            Vec::new(),
            "forged-client".to_owned(),
        );
        spec.args.extend(std::iter::repeat_n(0u8, padding));
        match self {
            Consumer::Worker => encode(&ToWorker::Run {
                epoch: 0,
                tasks: vec![RunTask {
                    spec,
                    inline: Vec::new(),
                    attempt: 0,
                }],
            }),
            Consumer::Scheduler => encode(&ToScheduler::Submit {
                tasks: vec![spec],
                sent: vec![],
            }),
            Consumer::Events => encode(&EventBatch {
                worker: "forged-worker".to_owned(),
                events: vec![Event::Finished {
                    key: spec.key,
                    inline: Some(spec.args),
                    size: 1,
                    run_us: 0,
                }],
            }),
            Consumer::Actors => encode(&ActorCall {
                actor: "forged-actor".to_owned(),
                method: "get".to_owned(),
                args: spec.args,
                call: spec.key,
                client: spec.client,
            }),
        }
    }

    /// Valid MessagePack (with the right version byte) of another type.
    fn wrong_type(self, i: usize) -> Vec<u8> {
        match self {
            Consumer::Worker | Consumer::Actors => Consumer::Events.forged(i, 0),
            Consumer::Scheduler => Consumer::Actors.forged(i, 0),
            Consumer::Events => encode(&ToWorker::Cancel {
                keys: vec![format!("forged-{i}")],
            }),
        }
    }
}

/// A small deterministic generator (xorshift), so that a failure repeats.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// The `n`th garbage message for `consumer`: random bytes, a truncated
/// valid message, valid MessagePack of the wrong type, a message over the
/// payload limit, or a valid message with a wrong version byte.
fn garbage(consumer: Consumer, n: usize, noise: &mut Noise, max_payload: usize) -> Vec<u8> {
    match n % 25 {
        4 => {
            // Over every consumer's limit (the largest is the scheduler's).
            let over = (max_payload * 2).max(max_payload + (1 << 20)) + 1024;
            consumer.forged(n, over)
        }
        k => match k % 4 {
            0 => {
                let len = 1 + noise.below(512);
                noise.bytes(len)
            }
            1 => {
                let mut valid = consumer.forged(n, 0);
                valid.truncate(1 + noise.below(valid.len() - 1));
                valid
            }
            2 => consumer.wrong_type(n),
            _ => {
                let mut valid = consumer.forged(n, 0);
                valid[0] = WIRE_VERSION.wrapping_add(1 + noise.below(250) as u8);
                valid
            }
        },
    }
}

/// A TCP port free at the moment.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET path` from the scheduler's HTTP API at `addr`.
async fn http_get(addr: &str, path: &str) -> Option<String> {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        agent
            .get(&url)
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()
    })
    .await
    .ok()
    .flatten()
}

/// The ids of the workers the scheduler at `addr` knows, once there are `n`.
async fn worker_ids(addr: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = http_get(addr, "/api/workers").await.unwrap_or_default();
        let mut ids = Vec::new();
        let mut rest = body.as_str();
        while let Some(at) = rest.find("\"id\"") {
            rest = rest[at + 4..]
                .trim_start()
                .trim_start_matches(':')
                .trim_start();
            if let Some(value) = rest.strip_prefix('"') {
                if let Some(end) = value.find('"') {
                    ids.push(value[..end].to_owned());
                }
            }
        }
        if ids.len() >= n {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler lists {n} workers: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Scenario 6: 1,000 malformed or forged messages published to every
/// queue of the namespace while a workload runs: none is executed, no
/// process crashes, the workload's results are all correct, and every one
/// of them ends up in the dead-letter queue.
#[tokio::test]
async fn chaos_malformed_messages_are_dead_lettered() {
    let mut config = support::fresh_config("chaos-garbage");
    config.max_payload = 64 << 10;
    let max_payload = config.max_payload;
    let addr = format!("127.0.0.1:{}", free_port());
    let logs = std::env::temp_dir().join(&config.namespace);
    std::fs::create_dir_all(&logs).unwrap();
    let mut cluster = Processes::start_with(config, Some(&addr), Some(&logs)).await;
    let names = cluster.config.names();
    let workers = worker_ids(&addr, cluster.workers.len()).await;
    let tap = cluster.tap.take().expect("the cluster's event tap");

    let mut targets = vec![
        (names.tasks_queue(), Consumer::Worker),
        (names.scheduler_queue(), Consumer::Scheduler),
        (names.scheduler_events_queue(), Consumer::Events),
        (names.client_queue(cluster.client.id()), Consumer::Events),
    ];
    for id in &workers {
        targets.push((names.worker_queue(id), Consumer::Worker));
        targets.push((names.actors_queue(id), Consumer::Actors));
    }

    let salt = 4_000_000;
    let started = Instant::now();
    let workload = submit_workload(&cluster.client, salt);
    cluster.client.flush().await.unwrap();

    let connection = transport::connect_amqp(&cluster.config.amqp_url, "chaos garbage")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let faults = 1000;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut confirms = Vec::with_capacity(faults);
    for i in 0..faults {
        let (queue, consumer) = &targets[i % targets.len()];
        let bytes = garbage(*consumer, i / targets.len(), &mut noise, max_payload);
        assert!(
            !consumer.decodes(&bytes, max_payload),
            "garbage #{i} for {queue} must not decode"
        );
        let confirm = channel
            .basic_publish(
                transport::name(""),
                transport::name(queue),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &bytes,
                transport::transient(),
            )
            .await
            .unwrap();
        confirms.push((queue.clone(), confirm));
    }
    for (queue, confirm) in confirms {
        match confirm.await.unwrap() {
            Confirmation::Ack(None) => {}
            other => panic!("garbage for {queue} was not delivered to it: {other:?}"),
        }
    }

    let (lost, unresolved, slowest) = check(&workload, salt, started).await;
    let dead_letter = names.dead_letter_queue();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut dead_lettered = support::queue_depth(&channel, &dead_letter).await;
    while (dead_lettered as usize) < faults && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        dead_lettered = support::queue_depth(&channel, &dead_letter).await;
    }
    // Nothing more arrives later either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    dead_lettered = support::queue_depth(&channel, &dead_letter).await;
    let executed = tap.completed_with_prefix("forged-");
    // Every message a process's consumer refused left a warning in its log
    // (the client's, in this process, go to its own subscriber).
    let logged: usize = std::fs::read_dir(&logs)
        .unwrap()
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default())
        .map(|log| log.matches("dead-lettered").count())
        .sum();
    let to_processes = (0..faults)
        .filter(|i| !targets[i % targets.len()].0.contains(".client."))
        .count();
    let duplicated = tap.duplicated();
    let mut crashed: Vec<String> = Vec::new();
    if !matches!(cluster.scheduler.try_wait(), Ok(None)) {
        crashed.push("scheduler".to_owned());
    }
    for (i, child) in cluster.workers.iter_mut().enumerate() {
        if !matches!(child.try_wait(), Ok(None)) {
            crashed.push(format!("worker {i}"));
        }
    }
    println!(
        "chaos malformed: faults={faults} tasks={} lost={lost} duplicated={duplicated} unresolved={unresolved} max_resolve_s={slowest:.2}",
        workload.tasks
    );
    println!(
        "chaos malformed: dead-lettered={dead_lettered} logged={logged}/{to_processes} executed={executed} crashed={crashed:?}"
    );
    let _ = connection.close(200, transport::name("done")).await;
    tap.stop().await;
    drop(workload);
    cluster.close().await;

    let _ = std::fs::remove_dir_all(&logs);
    assert_eq!(executed, 0, "forged messages must never run or report");
    assert_eq!(logged, to_processes, "every refused message is logged");
    assert!(crashed.is_empty(), "crashed: {crashed:?}");
    assert_eq!(
        dead_lettered as usize, faults,
        "every bad message is dead-lettered"
    );
    assert_eq!((lost, unresolved, duplicated), (0, 0, 0));
}

/// A redelivered task (its first worker died with it unacknowledged)
/// records its start; one whose record already shows `allowed_failures`
/// lost starts errs `WorkerLost` instead of running, naming the task and the
/// last worker; every completion deletes its record. In-process: the
/// "worker that died" is a raw consumer that takes the bundle and closes
/// its connection.
#[tokio::test]
async fn redelivered_tasks_that_lost_their_worker_too_often_err_worker_lost() {
    let config = support::fresh_config("worker-lost");
    let names = config.names();
    let limit = config.allowed_failures;
    let mut redis = transport::connect_redis(&config.redis_url).await.unwrap();
    // Start records as earlier runs would have left them.
    let records = [
        ("lost-never", None),
        ("lost-once", Some(1)),
        ("lost-often", Some(limit)),
    ];
    for (key, losses) in records {
        let _: () = redis::cmd("SADD")
            .arg(names.holders_key(key))
            .arg("test")
            .query_async(&mut redis)
            .await
            .unwrap();
        if let Some(losses) = losses {
            let _: () = redis::cmd("HSET")
                .arg(names.lost_key(key))
                .arg("n")
                .arg(losses)
                .arg("w")
                .arg("dead-worker-7")
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    }
    let bundle = ToWorker::Run {
        epoch: 0,
        tasks: records
            .iter()
            .map(|(key, _)| RunTask {
                spec: TaskSpec::new(
                    (*key).to_owned(),
                    <whoami as Task>::NAME.to_owned(),
                    <whoami as Task>::FINGERPRINT,
                    vec![0x90], // no arguments
                    Vec::new(),
                    "test-client".to_owned(),
                ),
                inline: Vec::new(),
                attempt: 0,
            })
            .collect(),
    };

    // A "worker" takes the bundle and dies without acknowledging it.
    let dying = transport::connect_amqp(&config.amqp_url, "test dying worker")
        .await
        .unwrap();
    let channel = dying.create_channel().await.unwrap();
    transport::declare_topology(&channel, &names, config.queue_type)
        .await
        .unwrap();
    channel
        .basic_publish(
            transport::name(""),
            transport::name(&names.tasks_queue()),
            Default::default(),
            &encode(&bundle),
            transport::persistent(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            transport::name(&names.tasks_queue()),
            transport::name("dying"),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let delivery = transport::next_delivery(&mut consumer)
        .await
        .unwrap()
        .unwrap();
    assert!(!delivery.redelivered);
    dying.close(200, transport::name("dying")).await.unwrap();

    // A real worker gets it redelivered.
    let mut options = flotilla_worker::WorkerOptions::new(config.clone());
    options.nthreads = 2;
    let worker = flotilla_worker::WorkerHandle::spawn(options).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut results = Vec::new();
    for (key, _) in records {
        let stored = loop {
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(names.result_key(key))
                .query_async(&mut redis)
                .await
                .unwrap();
            match value {
                Some(bytes) => break StoredResult::decode(bytes).unwrap(),
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => panic!("no result stored for {key}"),
            }
        };
        results.push(stored);
    }
    let mut records_left = 0;
    for (key, _) in records {
        let exists: u32 = redis::cmd("EXISTS")
            .arg(names.lost_key(key))
            .query_async(&mut redis)
            .await
            .unwrap();
        records_left += exists;
    }
    worker.shutdown().await.unwrap();
    flotilla::purge(&config).await.unwrap();

    assert!(
        matches!(results[0], StoredResult::Ok(_)),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(results[1], StoredResult::Ok(_)),
        "{:?}",
        results[1]
    );
    match &results[2] {
        StoredResult::Err(error) => {
            assert_eq!(error.kind(), ErrorKind::WorkerLost);
            assert_eq!(error.key(), "lost-often");
            for part in [
                "`lost-often`".to_owned(),
                format!("`{}`", <whoami as Task>::NAME),
                format!("{} times", limit + 1),
                "dead-worker-7".to_owned(),
            ] {
                assert!(error.message().contains(&part), "{part}: {error}");
            }
        }
        other => panic!("a task over the limit must err WorkerLost, not {other:?}"),
    }
    assert_eq!(records_left, 0, "completions delete the start records");
}

// --- Service restarts and long tasks ---

#[tokio::test]
async fn chaos_broker_restarted_mid_workload() {
    // A RabbitMQ node of this test's own: the shared one is never touched.
    let rabbit = tokio::task::spawn_blocking(PrivateRabbit::start)
        .await
        .unwrap();
    let mut config = support::fresh_config("chaos-broker");
    config.amqp_url = rabbit.url();
    let logs = std::env::temp_dir().join(format!("flotilla-chaos-{}", config.namespace));
    std::fs::create_dir_all(&logs).unwrap();
    let cluster = Processes::start_with(config, None, Some(&logs)).await;
    let salt = 3_000_000;
    let started = Instant::now();
    let workload = submit_workload(&cluster.client, salt);
    cluster.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rabbit = tokio::task::spawn_blocking(move || {
        rabbit.restart(Duration::from_millis(500));
        rabbit
    })
    .await
    .unwrap();
    cluster
        .finish("broker-restart", 1, workload, salt, started)
        .await;
    drop(rabbit);
    // The processes' logs are kept only when the scenario fails.
    let _ = std::fs::remove_dir_all(&logs);
}

#[tokio::test]
async fn chaos_redis_killed_and_restarted_mid_workload() {
    // A redis-server of this test's own, with its append-only file synced
    // on every write: the shared one is never touched.
    let mut redis = tokio::task::spawn_blocking(PrivateRedis::start)
        .await
        .unwrap();
    let mut config = support::fresh_config("chaos-redis");
    config.redis_url = redis.url();
    let cluster = Processes::start_with(config, None, None).await;
    let salt = 4_000_000;
    let started = Instant::now();
    let workload = submit_workload(&cluster.client, salt);
    cluster.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis = tokio::task::spawn_blocking(move || {
        redis.kill_and_restart(Duration::from_millis(500));
        redis
    })
    .await
    .unwrap();
    cluster
        .finish("redis-restart", 1, workload, salt, started)
        .await;
    drop(redis);
}

/// Starts counted under `counter` in the namespace.
async fn starts(config: &Config, counter: &str) -> u64 {
    let client = redis::Client::open(config.redis_url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let starts: Option<u64> = redis::cmd("GET")
        .arg(format!("{}:test:{counter}", config.namespace))
        .query_async(&mut redis)
        .await
        .unwrap();
    starts.unwrap_or(0)
}

#[tokio::test]
async fn chaos_tasks_outlast_the_broker_consumer_timeout_and_a_custodian_kill() {
    // A broker that enforces a 4 s consumer timeout, checked every 200 ms:
    // 3.5 s more than the workers' 500 ms custody delay, for a machine
    // loaded by the rest of the suite (with 2 s, a hand-off delayed 1.5 s
    // by load once let the broker take a 6 s task back).
    let rabbit = tokio::task::spawn_blocking(|| {
        PrivateRabbit::start_with(
            "consumer_timeout = 4000\n",
            "[{rabbit, [{channel_tick_interval, 200}]}].",
        )
    })
    .await
    .unwrap();
    let mut config = support::fresh_config("chaos-long");
    config.amqp_url = rabbit.url();

    // The broker really enforces it: a delivery held unacknowledged past
    // the timeout closes the consumer's channel.
    let connection = flotilla_runtime::transport::connect_amqp(&config.amqp_url, "probe")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let probe = channel
        .queue_declare(
            flotilla_runtime::transport::name(""),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            flotilla_runtime::transport::name(""),
            probe.name().clone(),
            Default::default(),
            b"held",
            Default::default(),
        )
        .await
        .unwrap();
    let _held = channel
        .basic_get(probe.name().clone(), Default::default())
        .await
        .unwrap()
        .expect("the probe message");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !channel.status().connected(),
        "the broker closes a channel holding a delivery past consumer_timeout"
    );
    let _ = connection
        .close(200, flotilla_runtime::transport::name("probed"))
        .await;

    // Tasks of 6 s on workers that take long deliveries into custody
    // after 500 ms: each starts exactly once.
    config.long_task_ms = 500;
    let mut cluster = Processes::start_with(config.clone(), None, None).await;
    let started = Instant::now();
    let long: Vec<_> = (0..4)
        .map(|i| {
            cluster
                .client
                .submit(counted_sleep, (format!("long-{i}"), 6_000))
        })
        .collect();
    let short = submit_workload(&cluster.client, 5_000_000);
    for (i, f) in long.iter().enumerate() {
        let first = f.result_timeout(Duration::from_secs(60)).await.unwrap();
        assert_eq!(first, 1, "long-{i} started once");
        assert_eq!(starts(&config, &format!("long-{i}")).await, 1);
    }
    println!(
        "chaos consumer-timeout: faults=0 tasks=4 lost=0 duplicated=0 unresolved=0 max_resolve_s={:.2}",
        started.elapsed().as_secs_f64()
    );

    // A worker killed while it holds tasks in custody: once their lease
    // lapses the scheduler hands them out again, and they complete.
    let started = Instant::now();
    let held: Vec<_> = (0..4)
        .map(|i| {
            cluster
                .client
                .submit(counted_sleep, (format!("held-{i}"), 3_000))
        })
        .collect();
    // Once every held task runs and has been taken into custody (after
    // long_task_ms), the workers holding them are killed: both, since the
    // scheduler may have bundled all four to either.
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..4 {
        while starts(&config, &format!("held-{i}")).await == 0 {
            assert!(Instant::now() < deadline, "held-{i} never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    for slot in 0..cluster.workers.len() {
        kill(&mut cluster.workers[slot]);
        cluster.workers[slot] = worker(&config);
    }
    let mut rerun = 0;
    for (i, f) in held.iter().enumerate() {
        let first = f.result_timeout(Duration::from_secs(60)).await.unwrap();
        assert!(first <= 2, "held-{i} started {first} times");
        rerun += starts(&config, &format!("held-{i}")).await - 1;
    }
    assert!(
        rerun >= 1,
        "the killed worker held some of the tasks: they ran again"
    );
    cluster
        .finish("custody-kill", 2, short, 5_000_000, started)
        .await;
    drop(rabbit);
}
