//! Scenarios of one active scheduler with a standby, and of lost state
//! turned into answers: `two-schedulers`, `leader-kill`,
//! `redis-lost-then-scheduler-restart`, `redis-evicting-signed` and
//! `replayed-redelivery`. Each prints the suite's line; futures whose data
//! Redis truly lost count as `lost` and must resolve with a clear error,
//! never stay unresolved.

use super::*;
use flotilla_runtime::transport::name;
use lapin::options::{BasicGetOptions, BasicNackOptions};

/// A scheduler process with its HTTP API on a port of its own.
fn scheduler_at(config: &Config) -> (Child, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = spawn("flotilla-scheduler", config, &["--http-addr", &addr]);
    (child, addr)
}

/// The role (`active`, `standby`, `starting`) the scheduler at `addr`
/// reports in `/api/status`.
async fn role(addr: &str) -> Option<String> {
    let body = http_get(addr, "/api/status").await?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["role"].as_str().map(str::to_owned)
}

/// Waits until the scheduler at `addr` reports `want`; how long it took.
async fn wait_role(addr: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if role(addr).await.as_deref() == Some(want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "the scheduler at {addr} became {want} within {limit:?} (it is {:?})",
            role(addr).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a set of futures ended.
#[derive(Debug, Default)]
pub(super) struct Outcomes {
    /// A wrong value, or an error that is not a loss.
    pub(super) wrong: usize,
    /// Resolved with a clear loss error (the data is gone).
    pub(super) lost: usize,
    /// Not resolved by the deadline.
    pub(super) unresolved: usize,
    /// Seconds from the start until the last one resolved.
    pub(super) slowest: f64,
    /// The first few wrong outcomes, for the failure message.
    pub(super) examples: Vec<String>,
    /// The first few losses, for the log.
    pub(super) losses: Vec<String>,
}

/// Whether `error` says the task's data is gone.
pub(super) fn is_loss(error: &Error) -> bool {
    match error {
        Error::Lost(_) | Error::DataLost { .. } => true,
        Error::Task(error) => error.kind() == ErrorKind::MissingDependency,
        _ => false,
    }
}

/// Waits (60 s in all) for each future and sorts the outcomes.
pub(super) async fn outcomes<'a, T>(
    futures: impl IntoIterator<Item = &'a TaskFuture<T>>,
    expected: impl Fn(usize) -> T,
    started: Instant,
) -> Outcomes
where
    T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + Send + 'static,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Outcomes::default();
    for (i, future) in futures.into_iter().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match future.result_timeout(left).await {
            Ok(value) if value == expected(i) => {}
            Err(Error::Timeout { .. }) => {
                out.unresolved += 1;
                if out.examples.len() < 5 {
                    out.examples
                        .push(format!("{i}: unresolved, task {}", future.key()));
                }
            }
            Err(error) if is_loss(&error) => {
                out.lost += 1;
                if out.losses.len() < 3 {
                    out.losses.push(format!("{i}: {error}"));
                }
            }
            other => {
                out.wrong += 1;
                if out.examples.len() < 5 {
                    out.examples.push(format!("{i}: {other:?}"));
                }
            }
        }
        out.slowest = out.slowest.max(started.elapsed().as_secs_f64());
    }
    out
}

#[tokio::test]
async fn chaos_two_schedulers_started_at_once_one_stands_by() {
    let config = support::fresh_config("chaos-two");
    let (a, a_addr) = scheduler_at(&config);
    let (b, b_addr) = scheduler_at(&config);
    let mut children = vec![a, b, worker(&config), worker(&config)];
    let client = Client::connect(config.clone()).await.unwrap();
    let tap = EventTap::start(&config).await;
    let n = 10_000 * scale();
    let salt = 7_000_000;
    let started = Instant::now();
    let futures: Vec<TaskFuture<i64>> = (0..n).map(|i| client.submit(inc, (salt + i,))).collect();
    client.flush().await.unwrap();
    let out = outcomes(&futures, |i| salt + i as i64 + 1, started).await;
    let mut roles = vec![
        role(&a_addr).await.unwrap_or_default(),
        role(&b_addr).await.unwrap_or_default(),
    ];
    roles.sort();
    let duplicated = tap.duplicated();
    tap.stop().await;
    println!(
        "chaos two-schedulers: faults=1 tasks={n} lost={} duplicated={duplicated} unresolved={} max_resolve_s={:.2}",
        out.lost, out.unresolved, out.slowest
    );
    drop(futures);
    let _ = client.close().await;
    stop(&mut children);
    let _ = flotilla::purge(&config).await;
    assert_eq!(
        roles,
        ["active", "standby"],
        "exactly one scheduler is active"
    );
    assert_eq!(
        (out.wrong, out.lost, out.unresolved),
        (0, 0, 0),
        "{:?}",
        out.examples
    );
}

#[tokio::test]
async fn chaos_leader_killed_mid_workload_the_standby_takes_over() {
    let config = support::fresh_config("chaos-leader");
    let (mut active, active_addr) = scheduler_at(&config);
    wait_role(&active_addr, "active", Duration::from_secs(30)).await;
    let (standby, standby_addr) = scheduler_at(&config);
    wait_role(&standby_addr, "standby", Duration::from_secs(30)).await;
    let mut children = vec![standby, worker(&config), worker(&config)];
    let client = Client::connect(config.clone()).await.unwrap();
    let tap = EventTap::start(&config).await;
    let salt = 8_000_000;
    let started = Instant::now();
    let workload = submit_workload(&client, salt);
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(&mut active);
    let takeover = wait_role(&standby_addr, "active", Duration::from_secs(30)).await;
    let (lost, unresolved, slowest) = check(&workload, salt, started).await;
    let duplicated = tap.duplicated();
    tap.stop().await;
    println!(
        "chaos leader-kill: faults=1 tasks={} lost={lost} duplicated={duplicated} unresolved={unresolved} max_resolve_s={slowest:.2} takeover_s={:.2}",
        workload.tasks,
        takeover.as_secs_f64()
    );
    drop(workload);
    let _ = client.close().await;
    stop(&mut children);
    let _ = flotilla::purge(&config).await;
    assert_eq!((lost, unresolved), (0, 0));
}

#[tokio::test]
async fn chaos_redis_lost_its_data_then_the_scheduler_restarted() {
    // A private Redis that keeps nothing across a restart.
    let redis = tokio::task::spawn_blocking(|| PrivateRedis::start_with(&["--appendonly", "no"]))
        .await
        .unwrap();
    let mut config = support::fresh_config("chaos-redis-lost");
    config.redis_url = redis.url();
    let mut cluster = Processes::start_with(config, None, None).await;
    let salt = 9_000_000;
    let started = Instant::now();
    let workload = submit_workload(&cluster.client, salt);
    cluster.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut redis = tokio::task::spawn_blocking(move || {
        let mut redis = redis;
        redis.kill_and_restart(Duration::from_millis(300));
        redis
    })
    .await
    .unwrap();
    kill(&mut cluster.scheduler);
    cluster.scheduler = scheduler(&cluster.config);
    let futures = workload
        .slow
        .iter()
        .chain(&workload.chains)
        .chain(&workload.sums);
    let slow = workload.slow.len();
    let chains = workload.chains.len();
    let expected = |i: usize| -> i64 {
        if i < slow {
            salt + i as i64
        } else if i < slow + chains {
            salt + (i - slow) as i64 + 50
        } else {
            let s = (i - slow - chains) as i64;
            (s * 5..s * 5 + 5).map(|c| salt + c + 50).sum()
        }
    };
    let out = outcomes(futures, expected, started).await;
    let tasks = workload.tasks;
    drop(workload);
    let duplicated = cluster.close().await;
    println!(
        "chaos redis-lost-then-scheduler-restart: faults=2 tasks={tasks} lost={} duplicated={duplicated} unresolved={} max_resolve_s={:.2}",
        out.lost, out.unresolved, out.slowest
    );
    drop(tokio::task::spawn_blocking(move || {
        redis.kill_and_restart(Duration::ZERO)
    }));
    assert_eq!((out.wrong, out.unresolved), (0, 0), "{:?}", out.examples);
}

#[tokio::test]
async fn chaos_signed_cluster_on_an_evicting_redis() {
    // A private Redis far too small for the results, evicting any key.
    let redis = tokio::task::spawn_blocking(|| {
        PrivateRedis::start_with(&[
            "--appendonly",
            "no",
            "--maxmemory",
            "4mb",
            "--maxmemory-policy",
            "allkeys-lru",
        ])
    })
    .await
    .unwrap();
    let mut config = support::fresh_config("chaos-evict");
    config.redis_url = redis.url();
    config.secret = Some(Secret::new("chaos-evicting-secret"));
    // Refused at start otherwise (see `chaos_an_evicting_redis_is_refused_at_start`).
    config.allow_eviction = true;
    let cluster = Processes::start_with(config, None, None).await;
    let n = 1_650;
    let len = 8 << 10;
    let started = Instant::now();
    let futures: Vec<TaskFuture<serde_bytes::ByteBuf>> = (0..n)
        .map(|_| cluster.client.submit(flotilla_examples::make_bytes, (len,)))
        .collect();
    cluster.client.flush().await.unwrap();
    let out = outcomes(
        &futures,
        |_| serde_bytes::ByteBuf::from(vec![7u8; len]),
        started,
    )
    .await;
    println!(
        "chaos redis-evicting-signed: faults=1 tasks={n} lost={} duplicated=0 unresolved={} max_resolve_s={:.2}",
        out.lost, out.unresolved, out.slowest
    );
    drop(futures);
    cluster.close().await;
    drop(redis);
    assert_eq!((out.wrong, out.unresolved), (0, 0), "{:?}", out.examples);
}

#[tokio::test]
async fn chaos_a_replayed_bundle_requeued_to_arrive_redelivered_does_not_run_again() {
    let mut config = support::fresh_config("chaos-replay");
    config.secret = Some(Secret::new("chaos-replay-secret"));
    let names = config.names();
    let sched = scheduler(&config);
    let client = Client::connect(config.clone()).await.unwrap();
    let connection = transport::connect_amqp(&config.amqp_url, "chaos replayer")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let counter = "replayed";
    let future = client.submit(counted_sleep, (counter.to_owned(), 10u64));
    client.flush().await.unwrap();
    // The outsider's copy of the task message: the same task, signed with
    // the namespace's key (as a captured bundle is), made from the spec
    // the client stored with its submission.
    let codec = flotilla_proto::Codec::new(&config);
    let spec_bytes: Vec<u8> = {
        let redis_client = redis::Client::open(config.redis_url.as_str()).unwrap();
        let mut redis = redis_client
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("GET")
            .arg(names.spec_key(future.key()))
            .query_async(&mut redis)
            .await
            .unwrap()
    };
    let spec: TaskSpec = codec
        .decode(flotilla_proto::Purpose::Spec, &spec_bytes, usize::MAX)
        .unwrap();
    let captured = codec.encode(
        flotilla_proto::Purpose::ToWorker,
        &ToWorker::Run {
            tasks: vec![RunTask {
                spec,
                inline: Vec::new(),
                attempt: 1,
            }],
            epoch: 0,
        },
    );
    let mut first = worker(&config);
    assert_eq!(
        future
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
        1
    );
    assert_eq!(starts(&config, counter).await, 1);
    stop(std::slice::from_mut(&mut first));
    // The replay: the captured copy published again, taken by the outsider
    // and requeued, so that it reaches the next worker marked redelivered.
    let confirm = channel
        .basic_publish(
            name(""),
            name(&names.tasks_queue()),
            BasicPublishOptions::default(),
            &captured,
            transport::persistent(),
        )
        .await
        .unwrap();
    drop(confirm);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = channel
            .basic_get(name(&names.tasks_queue()), BasicGetOptions::default())
            .await
            .unwrap();
        if let Some(message) = got {
            message
                .delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "the replayed copy is queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let second = worker(&config);
    // The copy is consumed (dead-lettered as done) rather than run.
    let queue = names.tasks_queue();
    let deadline = Instant::now() + Duration::from_secs(30);
    while support::queue_depth(&channel, &queue).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the worker took the replayed copy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = starts(&config, counter).await;
    println!(
        "chaos replayed-redelivery: faults=1 tasks=1 lost=0 duplicated={} unresolved=0 max_resolve_s={:.2}",
        runs - 1,
        started.elapsed().as_secs_f64()
    );
    drop(future);
    let _ = client.close().await;
    stop(&mut [second, sched]);
    transport::close(&connection, "done").await;
    let _ = flotilla::purge(&config).await;
    assert_eq!(runs, 1, "the replayed task ran again");
}

#[tokio::test]
async fn chaos_an_evicting_redis_is_refused_at_start_unless_allowed() {
    let redis = tokio::task::spawn_blocking(|| {
        PrivateRedis::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
    })
    .await
    .unwrap();
    let mut config = support::fresh_config("chaos-evict-refused");
    config.redis_url = redis.url();
    let log = std::env::temp_dir().join(format!("{}.log", config.namespace));
    let mut worker = spawn_logged(
        "flotilla-worker",
        &config,
        &["--nthreads", "1"],
        Some(log.as_path()),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker exits");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    // The worker declared the namespace's topology before it refused.
    let _ = flotilla::purge(&config).await;
    drop(redis);
    assert!(!status.success());
    assert!(
        logged.contains("maxmemory-policy is allkeys-lru")
            && logged.contains("FLOTILLA_ALLOW_EVICTION"),
        "{logged}"
    );
}
