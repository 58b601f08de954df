//! End to end: task time limits (`Submit::timeout`, `#[flotilla::task(timeout
//! = "...")]`, `ctx.deadline()`), each test in its own namespace.

mod support;

use flotilla::prelude::*;
use flotilla::ErrorKind;
use flotilla_examples::{
    add, blocking_sleep, counted_blocking_sleep, counted_sleep, limited_sleep, patient_sum,
    slow_identity, time_left, whoami,
};
use flotilla_proto::{Codec, StoredResult};
use std::time::Instant;
use support::process::Processes;
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

/// Waits until every worker process that retired has re-executed and
/// started again (a SIGTERM in the instant of a re-execution, before the new
/// image handles signals, would kill it), then stops everything.
async fn stop_settled(mut p: Processes) {
    for worker in &mut p.workers {
        let deadline = Instant::now() + Duration::from_secs(60);
        while worker.is_running() && !restarted_after_every_retirement(&worker.log()) {
            assert!(
                Instant::now() < deadline,
                "{} never settled:\n{}",
                worker.name,
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    p.stop().await;
}

/// Whether a worker process's `log` shows every retirement it began
/// followed by a re-execution and a new start.
fn restarted_after_every_retirement(log: &str) -> bool {
    let retiring = log.matches("retiring this worker").count();
    let reexecuted = log.matches("re-executing itself").count();
    retiring == reexecuted && started_ids(log).len() == 1 + reexecuted
}

/// The ids a worker process logged as it started, in order (one per life).
fn started_ids(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("worker started"))
        .filter_map(|line| {
            let (_, rest) = line.split_once("worker=")?;
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_worker_process_retires_after_a_stuck_sync_task_and_restarts_in_place() {
    let mut p = Processes::start("retire-restart", &[&["--nthreads", "2"]]).await;
    let pid = p.workers[0].pid();
    let (_, first_id) = p.client.submit(whoami, ()).await.unwrap();
    assert_eq!(started_ids(&p.workers[0].log()), vec![first_id.clone()]);

    // A task running when the worker retires finishes normally.
    let running = p.client.submit(slow_identity, (7, 3_000));
    let limit = Duration::from_secs(1);
    let start = Instant::now();
    let stuck = p
        .client
        .submit_with(blocking_sleep, (3_600_000,))
        .timeout(limit)
        .submit();
    let error = timed_out(&stuck).await;
    assert!(error.message().contains("abandoned"), "{}", error.message());
    assert!(
        start.elapsed() < limit + SLACK,
        "resolved after {:?}",
        start.elapsed()
    );
    assert_eq!(
        running
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
        7,
        "{}",
        p.logs()
    );

    // The process re-executed itself: same PID, a new life with a new id.
    let worker = &mut p.workers[0];
    worker.wait_for_log("re-executing itself", Duration::from_secs(30));
    assert!(
        worker.log().contains(&format!("pid={pid}")),
        "{}",
        worker.log()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while started_ids(&worker.log()).len() < 2 {
        assert!(worker.is_running(), "the worker exited:\n{}", worker.log());
        assert!(
            Instant::now() < deadline,
            "no second start:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(worker.is_running(), "{}", worker.log());
    assert_eq!(worker.pid(), pid);
    let ids = started_ids(&worker.log());
    assert_eq!(ids.len(), 2, "{}", worker.log());
    assert_eq!(ids[0], first_id);
    assert_ne!(ids[1], first_id);
    assert!(
        worker.log().contains("retiring this worker"),
        "{}",
        worker.log()
    );

    // The new life runs the next task.
    let (_, second_id) = p
        .client
        .submit(whoami, ())
        .result_timeout(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(second_id, ids[1]);
    assert_eq!(p.client.submit(add, (2, 3)).await.unwrap(), 5);
    // Still TimedOut, for good.
    assert_eq!(timed_out(&stuck).await.kind(), ErrorKind::TimedOut);
    drop((stuck, running));
    stop_settled(p).await;
}

#[tokio::test]
async fn with_on_stuck_exit_a_worker_process_exits_75_and_its_unstarted_task_runs_elsewhere() {
    let mut p =
        // Shedding off: with its default (1 s, the task's limit) the worker
        // may give the queued delivery back as it retires, and this test
        // counts what retirement itself leaves unstarted.
        Processes::start(
            "retire-exit",
            &[&["--nthreads", "1", "--on-stuck", "exit", "--shed-after", "off"]],
        )
        .await;
    let limit = Duration::from_secs(1);
    let stuck = p
        .client
        .submit_with(blocking_sleep, (3_600_000,))
        .timeout(limit)
        .submit();
    // Waits for the one slot, behind the stuck task: never started there.
    let queued = p.client.submit(whoami, ());
    let error = timed_out(&stuck).await;
    assert!(error.message().contains("abandoned"), "{}", error.message());
    let worker = &mut p.workers[0];
    let status = worker.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(75), "{status}\n{}", worker.log());
    let log = worker.log();
    assert!(log.contains("--on-stuck exit"), "{log}");
    assert!(log.contains("worker stopped"), "drained: {log}");
    // The queued task was delivered to this worker, which left it
    // unstarted (`unstarted=1`), unless the scheduler, seeing the worker's
    // one slot busy for long, held it back first (`unstarted=0`: it comes
    // late on a loaded machine). Either way it runs elsewhere (below).
    let left_unstarted = log.contains("unstarted=1");
    assert!(left_unstarted || log.contains("unstarted=0"), "{log}");
    let first = started_ids(&log);
    assert_eq!(first.len(), 1, "{log}");

    // The task it had not started runs on the next worker. (Known race,
    // left for a fix in the worker: the slot the abandoned task frees can
    // go to the queued task before retirement stops new starts; then it
    // runs on the retiring worker itself, which drains it.)
    let next = started_ids(&p.add_worker(&["--nthreads", "1"]).log())[0].clone();
    let (_, ran_on) = queued
        .result_timeout(Duration::from_secs(30))
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", p.logs()));
    if left_unstarted {
        assert_eq!(ran_on, next);
    } else {
        assert!(
            ran_on == next || ran_on == first[0],
            "{ran_on}\n{}",
            p.logs()
        );
    }
    assert_eq!(timed_out(&stuck).await.kind(), ErrorKind::TimedOut);
    drop((stuck, queued));
    stop_settled(p).await;
}

#[tokio::test]
async fn a_sigterm_during_a_retirement_stops_the_worker_without_waiting_for_the_stuck_thread() {
    let mut p = Processes::start("retire-term", &[&["--nthreads", "2"]]).await;
    // Keeps the retiring worker draining for a while.
    let running = p.client.submit(slow_identity, (7, 6_000));
    let stuck = p
        .client
        .submit_with(blocking_sleep, (3_600_000,))
        .timeout(Duration::from_secs(1))
        .submit();
    timed_out(&stuck).await;
    let worker = &mut p.workers[0];
    worker.wait_for_log("retiring this worker", Duration::from_secs(30));
    let status = worker.terminate();
    let log = worker.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(!log.contains("re-executing itself"), "the stop wins: {log}");
    // The drain went on to its end: the running task's result is stored.
    assert_eq!(
        running
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
        7
    );
    drop((stuck, running));
    stop_settled(p).await;
}

/// The issue's `task-timeout` chaos scenario, on worker processes: a
/// quarter of the tasks are async and never return (stopped at their
/// limit), a quarter are synchronous and never return (abandoned at their
/// limit, their worker retiring and re-executing itself), half return in
/// 200 ms. Every task resolves (the short ones Ok, the others TimedOut),
/// none runs twice.
#[tokio::test]
async fn chaos_task_timeout() {
    let workers: &[&[&str]] = &[&["--nthreads", "3"], &["--nthreads", "3"]];
    let mut p = Processes::start("limit-chaos", workers).await;
    let limit = Duration::from_secs(2);
    let n = 20;
    let start = Instant::now();
    let never = 3_600_000;
    let futures: Vec<_> = (0..n)
        .map(|i| {
            let counter = format!("tt-{i}");
            let client = &p.client;
            match i % 4 {
                0 => client
                    .submit_with(counted_sleep, (counter, never))
                    .timeout(limit)
                    .submit(),
                2 => client
                    .submit_with(counted_blocking_sleep, (counter, never))
                    .timeout(limit)
                    .submit(),
                _ => client
                    .submit_with(counted_sleep, (counter, 200))
                    .timeout(limit)
                    .submit(),
            }
        })
        .collect();
    let mut faults = 0;
    let mut lost = 0;
    let mut unresolved = 0;
    let mut slowest = Duration::ZERO;
    for (i, future) in futures.iter().enumerate() {
        match future.result_timeout(Duration::from_secs(90)).await {
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
    let mut redis = redis(&p.config).await;
    let mut duplicated = 0;
    for i in 0..n {
        let starts: u64 = redis::cmd("GET")
            .arg(format!("{}:test:tt-{i}", p.config.namespace))
            .query_async(&mut redis)
            .await
            .unwrap();
        if starts > 1 {
            duplicated += 1;
        }
    }
    // Each retirement ends with a re-execution, logged once.
    let retired: usize = p
        .workers
        .iter()
        .map(|worker| worker.log().matches("re-executing itself").count())
        .sum();
    println!(
        "chaos task-timeout: faults={faults} tasks={n} lost={lost} duplicated={duplicated} unresolved={unresolved} retired={retired} max_resolve_s={:.2}",
        slowest.as_secs_f64()
    );
    assert_eq!(
        (faults, lost, duplicated, unresolved),
        (n / 2, 0, 0, 0),
        "{}",
        p.logs()
    );
    // At least one worker ran a stuck synchronous task; at most one
    // retirement per such task.
    assert!(
        (1..=n / 4).contains(&retired),
        "retired={retired}\n{}",
        p.logs()
    );
    // Never hangs: stuck tasks may wait for a slot behind others (one
    // limit each), and tasks left unstarted by a retiring worker for its
    // restart.
    assert!(
        slowest < 6 * limit + SLACK,
        "slowest resolved after {slowest:?}"
    );
    // The workers are alive, each in its latest life, and stop cleanly.
    for worker in &mut p.workers {
        assert!(
            worker.is_running(),
            "{} exited:\n{}",
            worker.name,
            worker.log()
        );
    }
    drop(futures);
    stop_settled(p).await;
}
