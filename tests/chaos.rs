//! Faults injected into real processes (spawned `flotilla-scheduler` and
//! `flotilla-worker` binaries, the real RabbitMQ and Redis): every future
//! must still resolve, with the right value. Each scenario prints
//! `chaos <scenario>: faults=N tasks=N lost=0 unresolved=0 max_resolve_s=X`.
//!
//! `FLOTILLA_CHAOS_SCALE` multiplies the workload for a longer run.

mod common;

use common::services::{PrivateRabbit, PrivateRedis};
use flotilla::prelude::*;
use flotilla::Config;
use flotilla_examples::{add, counted_sleep, inc, slow_identity, total};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn scale() -> i64 {
    std::env::var("FLOTILLA_CHAOS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn spawn(binary: &str, config: &Config, args: &[&str]) -> Child {
    let path = common::target_binary(binary);
    assert!(
        path.exists(),
        "{} is built (cargo build --bins)",
        path.display()
    );
    Command::new(path)
        .args(args)
        .env("FLOTILLA_AMQP_URL", &config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &config.redis_url)
        .env("FLOTILLA_NAMESPACE", &config.namespace)
        .env("FLOTILLA_LONG_TASK_MS", config.long_task_ms.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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
    slow: Vec<Future<i64>>,
    chains: Vec<Future<i64>>,
    sums: Vec<Future<i64>>,
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
            _ => lost += 1,
        }
        slowest = slowest.max(started.elapsed().as_secs_f64());
    }
    for (c, f) in workload.chains.iter().enumerate() {
        match f.result_timeout(left()).await {
            Ok(v) if v == salt + c as i64 + 50 => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            _ => lost += 1,
        }
    }
    for (s, f) in workload.sums.iter().enumerate() {
        let expected: i64 = (s as i64 * 5..s as i64 * 5 + 5)
            .map(|c| salt + c + 50)
            .sum();
        match f.result_timeout(left()).await {
            Ok(v) if v == expected => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            _ => lost += 1,
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
}

impl Processes {
    async fn start(prefix: &str) -> Processes {
        Self::start_with(common::fresh_config(prefix)).await
    }

    async fn start_with(config: Config) -> Processes {
        let scheduler = scheduler(&config);
        let workers = vec![worker(&config), worker(&config)];
        let client = Client::connect(config.clone()).await.unwrap();
        let warm = client.submit(inc, (0,));
        assert_eq!(
            warm.result_timeout(Duration::from_secs(30)).await.unwrap(),
            1
        );
        Processes {
            config,
            scheduler,
            workers,
            client,
        }
    }

    /// Checks the workload, prints the scenario's line, stops everything.
    async fn finish(
        mut self,
        scenario: &str,
        faults: usize,
        workload: Workload,
        salt: i64,
        started: Instant,
    ) {
        let (lost, unresolved, slowest) = check(&workload, salt, started).await;
        println!(
            "chaos {scenario}: faults={faults} tasks={} lost={lost} unresolved={unresolved} max_resolve_s={slowest:.2}",
            workload.tasks
        );
        drop(workload);
        let _ = self.client.close().await;
        self.workers.push(self.scheduler);
        stop(&mut self.workers);
        let _ = flotilla::purge(&self.config).await;
        assert_eq!((lost, unresolved), (0, 0));
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

#[tokio::test]
async fn chaos_broker_restarted_mid_workload() {
    // A RabbitMQ node of this test's own: the shared one is never touched.
    let rabbit = tokio::task::spawn_blocking(PrivateRabbit::start)
        .await
        .unwrap();
    let mut config = common::fresh_config("chaos-broker");
    config.amqp_url = rabbit.url();
    let cluster = Processes::start_with(config).await;
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
}

#[tokio::test]
async fn chaos_redis_killed_and_restarted_mid_workload() {
    // A redis-server of this test's own, with its append-only file synced
    // on every write: the shared one is never touched.
    let mut redis = tokio::task::spawn_blocking(PrivateRedis::start)
        .await
        .unwrap();
    let mut config = common::fresh_config("chaos-redis");
    config.redis_url = redis.url();
    let cluster = Processes::start_with(config).await;
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
    // A broker that enforces a 2 s consumer timeout, checked every 200 ms.
    let rabbit = tokio::task::spawn_blocking(|| {
        PrivateRabbit::start_with(
            "consumer_timeout = 2000\n",
            "[{rabbit, [{channel_tick_interval, 200}]}].",
        )
    })
    .await
    .unwrap();
    let mut config = common::fresh_config("chaos-long");
    config.amqp_url = rabbit.url();

    // The broker really enforces it: a delivery held unacknowledged past
    // the timeout closes the consumer's channel.
    let connection = flotilla_proto::transport::connect_amqp(&config.amqp_url, "probe")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let probe = channel
        .queue_declare(
            flotilla_proto::transport::name(""),
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
            flotilla_proto::transport::name(""),
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
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !channel.status().connected(),
        "the broker closes a channel holding a delivery past consumer_timeout"
    );
    let _ = connection
        .close(200, flotilla_proto::transport::name("probed"))
        .await;

    // Tasks of 6 s on workers that take long deliveries into custody
    // after 500 ms: each starts exactly once.
    config.long_task_ms = 500;
    let mut cluster = Processes::start_with(config.clone()).await;
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
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    kill(&mut cluster.workers[0]);
    cluster.workers[0] = worker(&config);
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
        .finish("custody-kill", 1, short, 5_000_000, started)
        .await;
    drop(rabbit);
}
