//! End to end: task time limits (`Submit::timeout`, `#[flotilla::task(timeout
//! = "...")]`, `ctx.deadline()`), each test in its own namespace.

mod support;

use flotilla::prelude::*;
use flotilla::ErrorKind;
use flotilla_examples::{
    add, blocking_sleep, counted_sleep, limited_sleep, patient_sum, slow_identity, time_left,
};
use flotilla_proto::{Codec, StoredResult};
use std::time::Instant;
use support::TestCluster;

/// How late past its limit a timed-out task may resolve.
const SLACK: Duration = Duration::from_secs(4);

/// The error of a future that must have timed out, and how long it took.
async fn timed_out<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    future: &TaskFuture<T>,
) -> flotilla::TaskError {
    match future.result_timeout(Duration::from_secs(30)).await {
        Err(Error::Task(error)) if error.kind() == ErrorKind::TimedOut => error,
        other => panic!("expected TimedOut for {}, got {other:?}", future.key()),
    }
}

async fn redis(config: &flotilla::Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Closes the client, so that no lease renewal or incarnation check of
/// its writes to the namespace after it was purged, then stops the cluster.
async fn stop(t: TestCluster) {
    t.client.clone().close().await.unwrap();
    t.stop().await;
}

#[tokio::test]
async fn an_async_task_over_its_limit_times_out_and_a_short_one_succeeds() {
    let t = TestCluster::start_with(support::fresh_config("limit-async"), 1, 4).await;
    let limit = Duration::from_secs(1);
    let start = Instant::now();
    let long = t
        .client
        .submit_with(slow_identity, (1, 600_000))
        .timeout(limit)
        .submit();
    let short = t
        .client
        .submit_with(slow_identity, (2, 100))
        .timeout(limit)
        .submit();
    assert_eq!(
        short.result_timeout(Duration::from_secs(20)).await.unwrap(),
        2
    );
    let error = timed_out(&long).await;
    let took = start.elapsed();
    assert!(took >= limit, "resolved before its limit: {took:?}");
    assert!(took < limit + SLACK, "resolved {took:?} after submission");
    assert_eq!(error.type_name(), "flotilla::TimedOut");
    assert!(
        error.message().contains("time limit of 1s") && error.message().contains("stopped"),
        "{}",
        error.message()
    );
    assert_eq!(error.key(), long.key());
    assert_eq!(long.status(), Status::Error);
    // Not retried without retries: the worker is free for the next task.
    assert_eq!(t.client.submit(add, (1, 1)).await.unwrap(), 2);
    drop((long, short));
    stop(t).await;
}

#[tokio::test]
async fn the_tasks_default_applies_and_a_submission_overrides_it() {
    let t = TestCluster::start_with(support::fresh_config("limit-default"), 1, 4).await;
    // `limited_sleep` has `timeout = "1s"`.
    let start = Instant::now();
    let over_default = t.client.submit(limited_sleep, (5_000,));
    let longer = t
        .client
        .submit_with(limited_sleep, (2_000,))
        .timeout(Duration::from_secs(10))
        .submit();
    let unlimited = t
        .client
        .submit_with(limited_sleep, (1_500,))
        .timeout(Duration::ZERO)
        .submit();
    let shorter = t
        .client
        .submit_with(limited_sleep, (800,))
        .timeout(Duration::from_millis(200))
        .submit();

    let error = timed_out(&over_default).await;
    assert!(
        error.message().contains("time limit of 1s"),
        "{}",
        error.message()
    );
    assert!(start.elapsed() < Duration::from_secs(1) + SLACK);
    let error = timed_out(&shorter).await;
    assert!(
        error.message().contains("time limit of 200ms"),
        "{}",
        error.message()
    );
    assert_eq!(
        longer
            .result_timeout(Duration::from_secs(20))
            .await
            .unwrap(),
        2_000
    );
    assert_eq!(
        unlimited
            .result_timeout(Duration::from_secs(20))
            .await
            .unwrap(),
        1_500
    );
    drop((over_default, longer, unlimited, shorter));
    stop(t).await;
}

#[tokio::test]
async fn a_sync_task_over_its_limit_times_out_and_its_late_result_is_discarded() {
    // One slot: the abandoned thread must not keep the worker from the
    // next task.
    let t = TestCluster::start_with(support::fresh_config("limit-sync"), 1, 1).await;
    let limit = Duration::from_secs(1);
    let sleep = Duration::from_millis(3_500);
    let start = Instant::now();
    let late = t
        .client
        .submit_with(blocking_sleep, (sleep.as_millis() as u64,))
        .timeout(limit)
        .submit();
    let error = timed_out(&late).await;
    let took = start.elapsed();
    assert!(took < sleep, "waited for the thread: {took:?}");
    assert!(error.message().contains("abandoned"), "{}", error.message());

    // The worker takes the next task while the thread sleeps on.
    assert_eq!(
        t.client
            .submit(add, (2, 3))
            .result_timeout(Duration::from_secs(10))
            .await
            .unwrap(),
        5
    );
    assert!(
        start.elapsed() < sleep,
        "the next task waited for the thread"
    );

    // After the thread returned, the stored result is still the error.
    tokio::time::sleep(sleep + Duration::from_secs(1) - start.elapsed().min(sleep)).await;
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(t.config.names().result_key(late.key()))
        .query_async(&mut redis(&t.config).await)
        .await
        .unwrap();
    match Codec::new(&t.config)
        .open_result(late.key(), stored)
        .unwrap()
    {
        StoredResult::Err(error) => assert_eq!(error.kind(), ErrorKind::TimedOut),
        other => panic!("the late result replaced the error: {other:?}"),
    }
    assert_eq!(late.status(), Status::Error);
    assert_eq!(timed_out(&late).await.kind(), ErrorKind::TimedOut);
    drop(late);
    stop(t).await;
}

#[tokio::test]
async fn the_task_sees_its_deadline() {
    let t = TestCluster::start_with(support::fresh_config("limit-ctx"), 1, 2).await;
    // `time_left` has `timeout = "1m"`.
    let by_default = t.client.submit(time_left, ()).await.unwrap().unwrap();
    assert!(
        (50_000..=60_000).contains(&by_default),
        "{by_default} ms left"
    );
    let shorter = t
        .client
        .submit_with(time_left, ())
        .pure(false)
        .timeout(Duration::from_secs(5))
        .submit()
        .await
        .unwrap()
        .unwrap();
    assert!((1_000..=5_000).contains(&shorter), "{shorter} ms left");
    let none = t
        .client
        .submit_with(time_left, ())
        .pure(false)
        .timeout(Duration::ZERO)
        .submit()
        .await
        .unwrap();
    assert_eq!(none, None);

    // A task that watches its deadline winds down with partial work before
    // the hard limit.
    let (sum, complete) = t
        .client
        .submit_with(patient_sum, (1_000, 50, 500))
        .timeout(Duration::from_secs(2))
        .submit()
        .result_timeout(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(!complete && sum > 0, "sum {sum}, complete {complete}");
    stop(t).await;
}

/// The issue's `task-timeout` chaos scenario: half of the tasks never
/// return; every task resolves (the others Ok, those TimedOut), none twice.
#[tokio::test]
async fn chaos_task_timeout() {
    let t = TestCluster::start_with(support::fresh_config("limit-chaos"), 2, 6).await;
    let limit = Duration::from_secs(2);
    let n = 20;
    let start = Instant::now();
    let futures: Vec<_> = (0..n)
        .map(|i| {
            let millis: u64 = if i % 2 == 0 { 3_600_000 } else { 200 };
            t.client
                .submit_with(counted_sleep, (format!("tt-{i}"), millis))
                .timeout(limit)
                .submit()
        })
        .collect();
    let mut faults = 0;
    let mut lost = 0;
    let mut unresolved = 0;
    let mut slowest = Duration::ZERO;
    for (i, future) in futures.iter().enumerate() {
        match future.result_timeout(Duration::from_secs(60)).await {
            Ok(_) if i % 2 == 1 => {}
            Err(Error::Task(error)) if error.kind() == ErrorKind::TimedOut && i % 2 == 0 => {
                faults += 1;
            }
            Err(Error::Timeout { .. }) => unresolved += 1,
            other => {
                eprintln!("task {i} resolved wrongly: {other:?}");
                lost += 1;
            }
        }
        slowest = slowest.max(start.elapsed());
    }
    let mut redis = redis(&t.config).await;
    let mut duplicated = 0;
    for i in 0..n {
        let starts: u64 = redis::cmd("GET")
            .arg(format!("{}:test:tt-{i}", t.config.namespace))
            .query_async(&mut redis)
            .await
            .unwrap();
        if starts > 1 {
            duplicated += 1;
        }
    }
    println!(
        "chaos task-timeout: faults={faults} tasks={n} lost={lost} duplicated={duplicated} unresolved={unresolved} max_resolve_s={:.2}",
        slowest.as_secs_f64()
    );
    assert_eq!((faults, lost, duplicated, unresolved), (n / 2, 0, 0, 0));
    // Twelve slots for ten stuck tasks, but the scheduler fills each
    // worker's slots in turn, so one worker may get more stuck tasks than it
    // has slots: those wait for one limit, then run into theirs.
    assert!(
        slowest < 2 * limit + SLACK,
        "slowest resolved after {slowest:?}"
    );
    drop(futures);
    stop(t).await;
}
