//! A future's whole life: references and freeing, scatter, as_completed,
//! wait, callbacks, cancel, retry, fire-and-forget, keys, placement,
//! datasets — against real RabbitMQ and Redis.

mod support;

use flotilla::prelude::*;
use flotilla::{ErrorKind, ReturnWhen};
use flotilla_examples::{
    add, add_u64, byte_len, count_run, count_run_after, flaky, fnv1a, fnv1a_local, inc, might_fail,
    noise, run_log, runs_of, sleep_then_note, slow_identity, spin_until_cancelled, total, whoami,
};
use std::collections::HashSet;
use std::time::Instant;
use support::{wait_until_freed, TestCluster};

fn tag(name: &str) -> String {
    format!("{name}-{}", flotilla_proto::new_id())
}

#[tokio::test]
async fn ten_thousand_tasks_leave_no_keys_once_every_future_is_dropped() {
    let t = TestCluster::start("leak", 2).await;
    let client = &t.client;
    let started = Instant::now();
    {
        let data: Vec<_> = {
            let mut scattered = Vec::new();
            for i in 0..20u8 {
                scattered.push(
                    client
                        .scatter(&serde_bytes::ByteBuf::from(vec![i; 1000]))
                        .await
                        .unwrap(),
                );
            }
            scattered
        };
        let lengths: Vec<_> = (0..2_000)
            .map(|i| client.submit(byte_len, (&data[i % data.len()],)))
            .collect();
        let firsts = client.map(inc, (0..4_000i64).map(|i| (i,)));
        let seconds: Vec<_> = firsts.iter().map(|f| client.submit(inc, (f,))).collect();
        let sums: Vec<_> = seconds
            .chunks(100)
            .map(|chunk| client.submit(total, (chunk.to_vec(),)))
            .collect();
        for i in 0..1_960i64 {
            flotilla::fire_and_forget(&client.submit(add, (i, -i)));
        }
        let grand = client.submit(total, (&sums,));
        assert_eq!(grand.await.unwrap(), (2..4_002i64).sum::<i64>());
        assert_eq!(
            client.gather(&lengths).await.unwrap().iter().sum::<usize>(),
            2_000_000
        );
        // 20 + 2,000 + 4,000 + 4,000 + 40 + 1,960 + 1 tasks and scatters.
    }
    let submitted = started.elapsed();
    let freed_in = wait_until_freed(&t.config, Duration::from_secs(20)).await;
    println!("leak: 10,021 keys; workload {submitted:?}; every key freed {freed_in:?} after the last future was dropped; keys left: 0");
    t.stop().await;
}

#[tokio::test]
async fn a_killed_clients_references_are_released_when_its_lease_lapses() {
    flotilla_examples::link();
    let mut config = support::fresh_config("sigkill");
    config.client_lease_ms = 2_000;
    let t = TestCluster::start_with(config.clone(), 1, 2).await;
    let mut child = hold_and_hang(&config, 2_000).await;
    assert!(support::count_keys(&config, "r").await > 100);
    kill_hard(child.id());
    let _ = child.wait();
    let killed = Instant::now();
    let freed_in = wait_until_freed(&config, Duration::from_secs(20)).await;
    println!(
        "sigkill: results freed {:?} after the client was killed (lease 2 s)",
        killed.elapsed().min(freed_in + Duration::ZERO)
    );
    // A live client's references are untouched meanwhile.
    let kept = t.client.submit(inc, (41,));
    assert_eq!(kept.result().await.unwrap(), 42);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(
        kept.result().await.unwrap(),
        42,
        "a live client keeps its results past the lease"
    );
    t.stop().await;
}

fn kill_hard(pid: u32) {
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn hashed_scatter_races_never_free_data_that_is_still_wanted() {
    // dask/distributed#3703: two clients scatter the same content while one
    // keeps releasing it. Holds and stores are one atomic script, so the
    // other client's data is never deleted under it.
    let t = TestCluster::start("race", 2).await;
    let other = t.cluster.as_ref().unwrap().client().await.unwrap();
    let payload = serde_bytes::ByteBuf::from(vec![42u8; 4096]);
    let churn = {
        let other = other.clone();
        let payload = payload.clone();
        tokio::spawn(async move {
            for _ in 0..300 {
                let f = other.scatter(&payload).await.unwrap();
                drop(f);
                tokio::task::yield_now().await;
            }
        })
    };
    let mut lengths = Vec::new();
    for _ in 0..300 {
        let data = t.client.scatter(&payload).await.unwrap();
        lengths.push(
            t.client
                .submit_with(byte_len, (&data,))
                .pure(false)
                .submit(),
        );
    }
    churn.await.unwrap();
    let results = t
        .client
        .gather(&lengths)
        .await
        .expect("no input was freed under a task");
    assert!(results.iter().all(|&n| n == 4096));
    assert_eq!(
        t.client.scatter(&payload).await.unwrap().key(),
        other.scatter(&payload).await.unwrap().key()
    );
    t.stop().await;
}

#[tokio::test]
async fn scatter_stores_equal_data_once_and_handles_tens_of_megabytes() {
    let t = TestCluster::start("scatter", 2).await;
    let big = serde_bytes::ByteBuf::from(vec![3u8; 30 << 20]);
    let a = t.client.scatter(&big).await.unwrap();
    let b = t.client.scatter(&big).await.unwrap();
    assert_eq!(a.key(), b.key(), "hash=true: same content, same key");
    assert_eq!(a.status(), Status::Finished);
    let lengths: Vec<_> = (0..10)
        .map(|i| {
            t.client
                .submit_with(byte_len, (&a,))
                .key(format!("len-{i}"))
                .submit()
        })
        .collect();
    assert!(t
        .client
        .gather(&lengths)
        .await
        .unwrap()
        .iter()
        .all(|&n| n == 30 << 20));
    assert_eq!(
        support::count_keys(&t.config, "r").await,
        11,
        "one stored copy plus ten results"
    );
    let fresh = t
        .client
        .scatter_with(&big, flotilla::ScatterOptions { hash: false })
        .await
        .unwrap();
    assert_ne!(fresh.key(), a.key());
    let many = t.client.scatter_many([1i64, 2, 3]).await.unwrap();
    assert_eq!(t.client.gather(&many).await.unwrap(), [1, 2, 3]);
    t.stop().await;
}

/// A plain `Vec<u8>` travels as MessagePack `bin`: 20 MB are a little over
/// 20 MB encoded (an array of integers would be ~30 MB), as a result, as an
/// input and as a scattered value. The result is kept by its worker: Redis
/// holds its location, which records the encoded size.
#[tokio::test]
async fn plain_byte_vectors_of_20_mb_travel_as_bytes() {
    let t = TestCluster::start("bytes", 2).await;
    let len = 20_000_000;
    let expected = noise::call(len, 42);
    let want = fnv1a_local(&expected);

    let made = t.client.submit(noise, (len, 42));
    let data: Vec<u8> = made.result().await.expect("a 20 MB Vec<u8> result");
    assert_eq!((data.len(), fnv1a_local(&data)), (len, want));
    let mut redis = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let record: Vec<u8> = redis::cmd("GET")
        .arg(t.config.names().result_key(made.key()))
        .query_async(&mut redis)
        .await
        .unwrap();
    let stored = match flotilla_proto::StoredResult::decode(record) {
        Ok(flotilla_proto::StoredResult::Kept(location)) => location.size as usize,
        other => panic!("a location record, not {other:?}"),
    };
    assert!(
        (len..len + 1024).contains(&stored),
        "{stored} bytes encoded for a {len}-byte Vec<u8>"
    );

    // As an input by reference, then scattered from the client.
    let from_future = t.client.submit(fnv1a, (&made,));
    assert_eq!(from_future.result().await.unwrap(), want);
    let scattered = t
        .client
        .scatter(&data)
        .await
        .expect("a 20 MB Vec<u8> scatters");
    let from_scatter = t.client.submit(fnv1a, (&scattered,));
    assert_eq!(from_scatter.result().await.unwrap(), want);
    t.stop().await;
}

#[tokio::test]
async fn as_completed_yields_in_completion_order_with_errors() {
    let t = TestCluster::start("ascompleted", 2).await;
    let slow = t.client.submit(slow_identity, (1, 2000));
    let fast = t.client.submit(slow_identity, (2, 10));
    let bad = t.client.submit(might_fail, (-1,));
    let mut done = flotilla::as_completed(vec![slow.clone(), fast.clone()]);
    assert_eq!(done.count(), 2);
    let first = done.next().await.unwrap();
    assert_eq!(first.key(), fast.key());
    let second = done.next().await.unwrap();
    assert_eq!(second.key(), slow.key());
    assert!(done.next().await.is_none() && done.is_empty());

    let mut with_errors = flotilla::as_completed(vec![bad.clone()]).with_results();
    let (future, result) = with_errors.next().await.unwrap();
    assert_eq!(future.key(), bad.key());
    assert!(
        matches!(result, Err(Error::Task(_))),
        "errors are yielded, not swallowed"
    );

    // Futures can be added while iterating; batches take what is ready.
    let mut growing = flotilla::as_completed(Vec::<TaskFuture<i64>>::new());
    growing.add(t.client.submit(inc, (1,)));
    growing.add(t.client.submit(inc, (2,)));
    let mut seen = 0;
    while !growing.is_empty() {
        seen += growing.next_batch_wait().await.len();
    }
    assert_eq!(seen, 2);
    t.stop().await;
}

#[tokio::test]
async fn as_completed_copes_with_a_hundred_thousand_futures() {
    let t = TestCluster::start_with(support::fresh_config("hundredk"), 2, 2).await;
    let futures = t.client.map(inc, (0..100_000i64).map(|i| (i,)));
    let mut done = flotilla::as_completed(futures);
    let mut count = 0;
    let mut keys = HashSet::new();
    loop {
        let batch = done.next_batch_wait().await;
        if batch.is_empty() {
            break;
        }
        count += batch.len();
        keys.extend(batch.iter().map(|f| f.key().to_owned()));
        assert!(batch.iter().all(TaskFuture::done));
    }
    assert_eq!((count, keys.len()), (100_000, 100_000));
    t.stop().await;
}

#[tokio::test]
async fn wait_returns_done_and_not_done() {
    let t = TestCluster::start("wait", 2).await;
    let quick = t.client.submit(slow_identity, (1, 1));
    let slow = t.client.submit(slow_identity, (2, 1500));
    let all = vec![quick.clone(), slow.clone()];
    let (done, not_done) = flotilla::wait(&all, ReturnWhen::FirstCompleted, None)
        .await
        .unwrap();
    assert_eq!((done.len(), not_done.len()), (1, 1));
    assert_eq!(done[0].key(), quick.key());
    let timed_out = flotilla::wait(
        &all,
        ReturnWhen::AllCompleted,
        Some(Duration::from_millis(100)),
    )
    .await;
    assert!(matches!(timed_out, Err(Error::Timeout { .. })));
    let (done, not_done) = flotilla::wait(&all, ReturnWhen::AllCompleted, None)
        .await
        .unwrap();
    assert_eq!((done.len(), not_done.len()), (2, 0));
    t.stop().await;
}

#[tokio::test]
async fn done_callbacks_run_once_done() {
    let t = TestCluster::start("callback", 1).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let future = t.client.submit(add, (20, 22));
    future.add_done_callback(move |f| {
        let _ = tx.send((f.key().to_owned(), f.status()));
    });
    let (key, status) = tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((key.as_str(), status), (future.key(), Status::Finished));
    // On an already finished future the callback runs at once.
    let (tx, rx) = tokio::sync::oneshot::channel();
    future.add_done_callback(move |_| {
        let _ = tx.send(());
    });
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap();
    t.stop().await;
}

#[tokio::test]
async fn cancel_stops_pending_and_running_tasks_and_their_dependents() {
    let t = TestCluster::start_with(support::fresh_config("cancel"), 1, 2).await;
    let spin = tag("spin");
    let sleeper = tag("sleeper");
    let spinning = t
        .client
        .submit(spin_until_cancelled, (spin.clone(), 20_000));
    let sleeping = t.client.submit(sleep_then_note, (sleeper.clone(), 20_000));
    let dependent = t.client.submit(count_run_after, (tag("dep"), 1));
    let child = t.client.submit(add_u64, (&sleeping, 1));
    // Running: the worker reported it started (polled, so a loaded machine
    // only makes the test slower).
    let wait = Instant::now();
    while spinning.status() != Status::Running && wait.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(spinning.status(), Status::Running);
    let started = Instant::now();
    t.client.cancel(std::slice::from_ref(&spinning), true);
    sleeping.cancel();
    assert_eq!(spinning.status(), Status::Cancelled);
    assert!(matches!(sleeping.result().await, Err(Error::Cancelled(_))));
    match child.result_timeout(Duration::from_secs(10)).await {
        Err(Error::Task(e)) => assert_eq!(e.kind(), ErrorKind::Cancelled),
        other => panic!("a dependent of a cancelled task is cancelled: {other:?}"),
    }
    // The sync task saw its flag, the async one was aborted: neither ran on.
    while runs_of(&format!("{spin}:cancelled")) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the running sync task never saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(runs_of(&format!("{spin}:completed")), 0);
    assert_eq!(runs_of(&sleeper), 0, "the async task was aborted");
    assert_eq!(dependent.await.unwrap(), 1);
    t.stop().await;
}

#[tokio::test]
async fn a_task_whose_every_reference_is_dropped_before_it_runs_is_not_run() {
    let t = TestCluster::start("dropped", 1).await;
    let blocker = t.client.submit(slow_identity, (7, 700));
    let never = tag("never");
    let waiting = t.client.submit(count_run_after, (never.clone(), &blocker));
    drop(waiting);
    assert_eq!(blocker.await.unwrap(), 7);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        runs_of(&never),
        0,
        "dropped before it ran: cancelled, not run"
    );
    t.stop().await;
}

#[tokio::test]
async fn retries_and_retry_rerun_failed_tasks() {
    let t = TestCluster::start("retry", 1).await;
    let twice = tag("twice");
    let recovered = t
        .client
        .submit_with(flaky, (twice.clone(), 2))
        .retries(2)
        .submit();
    assert_eq!(
        recovered.await.unwrap(),
        3,
        "two failures, then success, within two retries"
    );
    let once = tag("once");
    let failed = t.client.submit(flaky, (once.clone(), 1));
    let dependent = t.client.submit(add_u64, (&failed, 1));
    assert!(failed.result().await.is_err());
    assert!(dependent.result().await.is_err());
    t.client.retry(std::slice::from_ref(&dependent));
    assert_eq!(
        dependent
            .result_timeout(Duration::from_secs(20))
            .await
            .unwrap(),
        3
    );
    t.stop().await;
}

#[tokio::test]
async fn fire_and_forget_runs_without_handles_and_keeps_no_result() {
    let t = TestCluster::start("ff", 1).await;
    let forgotten = tag("forgotten");
    let blocker = t.client.submit(slow_identity, (1, 300));
    let future = t
        .client
        .submit(count_run_after, (forgotten.clone(), &blocker));
    flotilla::fire_and_forget(&future);
    drop(future);
    drop(blocker);
    let started = Instant::now();
    while runs_of(&forgotten) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a fire-and-forget task still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until_freed(&t.config, Duration::from_secs(10)).await;
    t.stop().await;
}

#[tokio::test]
async fn pure_keys_run_once_and_explicit_keys_are_used() {
    let t = TestCluster::start("keys", 1).await;
    let once = tag("once");
    let first = t.client.submit(count_run, (once.clone(),));
    assert_eq!(first.result().await.unwrap(), 1);
    let second = t.client.submit(count_run, (once.clone(),));
    assert_eq!(second.key(), first.key());
    assert_eq!(second.await.unwrap(), 1);
    // Another client submitting the same pure task reuses the stored result.
    let other = t.cluster.as_ref().unwrap().client().await.unwrap();
    let third = other.submit(count_run, (once.clone(),));
    assert_eq!(
        third.result_timeout(Duration::from_secs(10)).await.unwrap(),
        1
    );
    assert_eq!(runs_of(&once), 1, "an existing pure key is not run again");
    let fresh = t
        .client
        .submit_with(count_run, (once.clone(),))
        .pure(false)
        .submit();
    assert_eq!(fresh.await.unwrap(), 2);
    let named = t.client.submit_with(add, (1, 1)).key("my-key").submit();
    assert_eq!(named.key(), "my-key");
    assert_eq!(named.await.unwrap(), 2);
    assert!(t
        .client
        .submit_with(add, (1, 1))
        .key("bad key")
        .submit()
        .await
        .is_err());
    t.stop().await;
}

#[tokio::test]
async fn higher_priority_runs_first() {
    let t = TestCluster::start("priority", 1).await;
    let blocker = t.client.submit(slow_identity, (0, 400));
    // The one slot is busy before the others are submitted.
    let wait = Instant::now();
    while blocker.status() != Status::Running && wait.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let low = tag("low");
    let high = tag("high");
    let lows: Vec<_> = (0..5)
        .map(|i| {
            t.client
                .submit_with(count_run_after, (low.clone(), i))
                .priority(-1)
                .submit()
        })
        .collect();
    let highs: Vec<_> = (0..5)
        .map(|i| {
            t.client
                .submit_with(count_run_after, (high.clone(), i))
                .priority(10)
                .submit()
        })
        .collect();
    blocker.await.unwrap();
    t.client.gather(&lows).await.unwrap();
    t.client.gather(&highs).await.unwrap();
    let log: Vec<String> = run_log()
        .into_iter()
        .filter(|t| *t == low || *t == high)
        .collect();
    assert_eq!(
        log.iter().position(|t| *t == low),
        Some(5),
        "every high-priority task ran first: {log:?}"
    );
    t.stop().await;
}

#[tokio::test]
async fn workers_and_resources_place_tasks() {
    let t = TestCluster::start("placement", 2).await;
    let ids = t.cluster.as_ref().unwrap().worker_ids();
    for id in &ids {
        let pinned: Vec<_> = (0..6)
            .map(|i| {
                t.client
                    .submit_with(whoami, ())
                    .key(format!("pin-{id}-{i}"))
                    .workers([id.clone()])
                    .submit()
            })
            .collect();
        for (_, worker) in t.client.gather(&pinned).await.unwrap() {
            assert_eq!(&worker, id);
        }
    }
    let nowhere = t
        .client
        .submit_with(whoami, ())
        .key("anywhere")
        .workers(["no-such-worker"])
        .allow_other_workers(true)
        .submit();
    assert!(ids.contains(&nowhere.await.unwrap().1));
    let waiting = t
        .client
        .submit_with(whoami, ())
        .key("gpu")
        .resources([("GPU", 1)])
        .submit();
    assert!(
        !waiting.wait_timeout(Duration::from_millis(500)).await,
        "no worker offers a GPU yet"
    );
    let mut t = t;
    let gpu_worker = t
        .cluster
        .as_mut()
        .unwrap()
        .add_worker_with_resources(&[("GPU", 1)])
        .await
        .unwrap();
    let (_, ran_on) = waiting
        .result_timeout(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        ran_on, gpu_worker,
        "a task needing a GPU runs where one is offered"
    );
    t.stop().await;
}

#[tokio::test]
async fn futures_travel_between_clients_and_through_datasets() {
    let t = TestCluster::start("datasets", 1).await;
    let other = t.cluster.as_ref().unwrap().client().await.unwrap();
    let a = t.client.submit(add, (2, 3));
    let b = t.client.submit(slow_identity, (9, 300));
    let seen: TaskFuture<i64> = other.get_future(b.key());
    assert_eq!(
        seen.await.unwrap(),
        9,
        "a pending future is waited on from another client"
    );
    let from_other: TaskFuture<i64> = other.get_future(a.key());
    assert_eq!(from_other.await.unwrap(), 5);
    let missing: TaskFuture<i64> = other.get_future("no-such-key");
    assert!(matches!(
        missing.result_timeout(Duration::from_secs(10)).await,
        Err(Error::Lost(_))
    ));

    t.client
        .publish_dataset("numbers", &[a.clone(), b.clone()])
        .await
        .unwrap();
    assert!(t
        .client
        .publish_dataset("numbers", std::slice::from_ref(&a))
        .await
        .is_err());
    assert_eq!(other.list_datasets().await.unwrap(), ["numbers"]);
    drop((a, b));
    let published: Vec<TaskFuture<i64>> = other.get_dataset("numbers").await.unwrap();
    assert_eq!(
        other.gather(&published).await.unwrap(),
        [5, 9],
        "a dataset keeps its results alive"
    );
    drop(published);
    other.unpublish_dataset("numbers").await.unwrap();
    assert!(other.list_datasets().await.unwrap().is_empty());
    other.close().await.unwrap();
    wait_until_freed(&t.config, Duration::from_secs(10)).await;
    t.stop().await;
}

#[tokio::test]
async fn resubmitting_a_released_pure_key_runs_it_again() {
    // A release and a new submission of the same key in one batch must reach
    // the scheduler in that order, or the new task would be forgotten.
    let t = TestCluster::start("resubmit", 1).await;
    for round in 0..8 {
        let future = t.client.submit(slow_identity, (1, 5));
        let value = future.result_timeout(Duration::from_secs(20)).await;
        assert_eq!(value.unwrap(), 1, "round {round}");
    }
    t.stop().await;
}

/// Set in the re-executed test binary that plays the client killed by
/// `a_killed_clients_pending_tasks_are_cancelled_not_run`; its value is the
/// run tag of the client's tasks.
const DOOMED_CLIENT: &str = "FLOTILLA_TEST_DOOMED_CLIENT";
/// Tasks the doomed client leaves queued.
const DOOMED_TASKS: usize = 1_000;

/// The doomed client: submits slow tasks, says so, and waits to be killed.
async fn doomed_client(tag: String) -> ! {
    let client = Client::from_env()
        .await
        .expect("the doomed client connects");
    let futures: Vec<_> = (0..DOOMED_TASKS)
        .map(|_| {
            client
                .submit_with(sleep_then_note, (tag.clone(), 100))
                .pure(false)
                .submit()
        })
        .collect();
    client.flush().await.expect("submitted");
    println!("submitted {}", futures.len());
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// A child process killed when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this test binary again as a client process (see [`DOOMED_CLIENT`])
/// running `test`, and waits until it printed a line containing `ready` (after the test harness's own words).
fn spawn_client_process(
    config: &flotilla::Config,
    test: &str,
    tag: &str,
    ready: &str,
) -> std::process::Child {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(DOOMED_CLIENT, tag)
        .env("FLOTILLA_AMQP_URL", &config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &config.redis_url)
        .env("FLOTILLA_NAMESPACE", &config.namespace)
        .env(
            "FLOTILLA_CLIENT_LEASE_MS",
            config.client_lease_ms.to_string(),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the client process starts");
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for line in std::io::BufRead::lines(stdout) {
        let line = line.expect("the client process's output");
        if line.contains(ready) {
            return child;
        }
    }
    let status = child.wait();
    panic!("the client process ended without saying {ready:?}: {status:?}");
}

#[tokio::test]
async fn a_killed_clients_pending_tasks_are_cancelled_not_run() {
    if let Ok(tag) = std::env::var(DOOMED_CLIENT) {
        // Re-executed by the test below: this process is the client.
        doomed_client(tag).await;
    }
    flotilla_examples::link();
    let mut config = support::fresh_config("doomed");
    config.client_lease_ms = 1_000;
    // Four slots: 40 of the 100 ms tasks a second.
    let t = TestCluster::start_with(config.clone(), 2, 2).await;
    let run_tag = tag("doomed");
    let child = {
        let (config, run_tag) = (config.clone(), run_tag.clone());
        tokio::task::spawn_blocking(move || {
            spawn_client_process(
                &config,
                "a_killed_clients_pending_tasks_are_cancelled_not_run",
                &run_tag,
                "submitted",
            )
        })
        .await
        .unwrap()
    };
    let child = KillOnDrop(child);
    // The tasks do run while their client lives.
    let started = Instant::now();
    while runs_of(&run_tag) < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the doomed client's tasks never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill_hard(child.0.id());
    drop(child);
    let killed = Instant::now();
    let ran_before = runs_of(&run_tag);
    let freed_in = wait_until_freed(&config, Duration::from_secs(20)).await;
    // Whatever was still running was stopped, not finished: nothing more runs.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let ran = runs_of(&run_tag) as usize;
    println!(
        "doomed: {ran_before} of {DOOMED_TASKS} tasks ran before the kill, {ran} in all; \
         keys freed {:?} after the kill (lease 1 s)",
        killed.elapsed().min(freed_in + Duration::from_secs(2))
    );
    assert!(
        ran < DOOMED_TASKS / 2,
        "{ran} of {DOOMED_TASKS} tasks of the killed client ran: its pending tasks are cancelled"
    );
    // The cluster carries on.
    assert_eq!(t.client.submit(inc, (1,)).await.unwrap(), 2);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_future_racing_the_release_of_the_last_handle_keeps_the_result() {
    let t = TestCluster::start("revive", 1).await;
    let client = &t.client;
    for round in 0..200i64 {
        // The client is the only holder of each key.
        let future = client.submit(inc, (round,));
        let key = future.key().to_owned();
        assert_eq!((&future).await.unwrap(), round + 1);
        let again: TaskFuture<i64> = if round % 2 == 0 {
            // One after the other: the release is queued first.
            drop(future);
            client.get_future(&key)
        } else {
            // At the same time, from two threads.
            let dropper = std::thread::spawn(move || drop(future));
            let again = client.get_future(&key);
            dropper.join().unwrap();
            again
        };
        assert_eq!(
            again.result_timeout(Duration::from_secs(10)).await.unwrap(),
            round + 1,
            "round {round}: the result survived"
        );
        // Scattered data alike.
        let data = client
            .scatter_with(&round, flotilla::ScatterOptions { hash: false })
            .await
            .unwrap();
        let key = data.key().to_owned();
        drop(data);
        let again: TaskFuture<i64> = client.get_future(&key);
        assert_eq!(
            again.result_timeout(Duration::from_secs(10)).await.unwrap(),
            round,
            "round {round}: the scattered data survived"
        );
    }
    wait_until_freed(&t.config, Duration::from_secs(10)).await;
    t.stop().await;
}

/// Every Redis key of the namespace (`<ns>*`), sorted.
async fn namespace_keys(config: &flotilla::Config) -> Vec<String> {
    let client = redis::Client::open(config.redis_url.as_str()).expect("redis url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", config.namespace))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await
            .expect("scan");
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys
}

#[tokio::test]
async fn actors_scatter_and_a_killed_client_leave_no_keys_behind() {
    use flotilla_examples::actors::Counter;
    flotilla_examples::link();
    let mut config = support::fresh_config("noleak");
    config.client_lease_ms = 1_000;
    let t = TestCluster::start_with(config.clone(), 2, 2).await;
    // The only key a live cluster keeps for good: the fingerprint of the
    // scheduler's signing key, which clients and workers check on connect
    // (`flotilla_runtime::seal::publish_fingerprint`). Everything else is
    // per result (`r:`, `h:`, `s:`), per live client (`leases`), per task in
    // custody or lost, or per dataset, and must be gone.
    // Namespace-wide and kept by design: the key fingerprint, the leader
    // lease (while the scheduler runs), the epoch and the incarnation marker.
    let names = config.names();
    let permanent = [
        names.seal_key(),
        names.leader_key(),
        names.epoch_key(),
        names.incarnation_key(),
    ];

    // A hold of a client id that has no lease (as a hold arriving after its
    // client closed would be): the reaper releases it too.
    {
        let redis = redis::Client::open(config.redis_url.as_str()).unwrap();
        let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
        let names = config.names();
        let key = tag("orphan");
        redis::pipe()
            .sadd(names.holders_key(&key), flotilla_proto::new_id())
            .set(names.result_key(&key), b"left over".as_slice())
            .query_async::<()>(&mut redis)
            .await
            .unwrap();
    }

    // A client killed while it holds scattered data and results.
    let killed = {
        let mut child = hold_and_hang(&config, 1_000).await;
        kill_hard(child.id());
        let _ = child.wait();
        Instant::now()
    };

    // Actors, called concurrently and one after the other, from a client
    // that closes right after; and scattered data.
    let client = t.cluster.as_ref().unwrap().client().await.unwrap();
    {
        let counter = client.submit_actor(Counter::new, ()).await.unwrap();
        let calls: Vec<_> = (0..1_000).map(|_| counter.increment()).collect();
        assert_eq!(
            client.gather(&calls).await.unwrap(),
            (1..=1_000).collect::<Vec<i64>>()
        );
        drop(calls);
        for i in 0..250 {
            assert_eq!(counter.increment().await.unwrap(), 1_001 + i);
        }
        // A call's future passed into a task, and calls left unawaited.
        let count = counter.get_count();
        assert_eq!(
            client.submit(add, (&count, 1)).await.unwrap(),
            1_251,
            "a call's result is stored like a task's"
        );
        let _unawaited: Vec<_> = (0..100).map(|_| counter.increment()).collect();
        let data = client
            .scatter_many((0..20u8).map(|i| serde_bytes::ByteBuf::from(vec![i; 1000])))
            .await
            .unwrap();
        let lengths: Vec<_> = data.iter().map(|d| client.submit(byte_len, (d,))).collect();
        assert_eq!(client.gather(&lengths).await.unwrap(), vec![1000; 20]);
    }
    client.close().await.unwrap();
    // The test's own client goes too: then nothing holds anything.
    t.client.clone().close().await.unwrap();

    let started = Instant::now();
    let left = loop {
        let left: Vec<String> = namespace_keys(&config)
            .await
            .into_iter()
            .filter(|key| !permanent.contains(key))
            .collect();
        if left.is_empty() || started.elapsed() > Duration::from_secs(20) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        left.is_empty(),
        "{} keys left 20 s after every handle and client is gone: {:?}",
        left.len(),
        &left[..left.len().min(20)]
    );
    println!(
        "no-leak: 0 keys left besides {permanent:?}, {:?} after the kill",
        killed.elapsed()
    );
    t.stop().await;
}

/// Starts the `hold_and_hang` example as a client process of `config`'s
/// namespace with a lease of `lease_ms`, and returns once it holds its data.
async fn hold_and_hang(config: &flotilla::Config, lease_ms: u64) -> std::process::Child {
    let binary = support::target_binary("examples/hold_and_hang");
    assert!(
        binary.exists(),
        "{} is built (cargo build --examples)",
        binary.display()
    );
    let mut child = std::process::Command::new(&binary)
        .env("FLOTILLA_AMQP_URL", &config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &config.redis_url)
        .env("FLOTILLA_NAMESPACE", &config.namespace)
        .env("FLOTILLA_CLIENT_LEASE_MS", lease_ms.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("client process starts");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(line.starts_with("holding"), "{line}");
    child
}
