//! Backpressure: a client's bound on pending tasks (`FLOTILLA_MAX_PENDING`)
//! and the scheduler's admission control (`FLOTILLA_SCHEDULER_MAX_TASKS`),
//! against the real RabbitMQ and Redis.
//!
//! Room is held by tasks pinned to a worker that does not exist: they stay
//! pending until the test cancels or drops them, so every "still waiting"
//! below is waiting on the test's own action, never on speed.

mod support;

use flotilla::{Error, Status};
use flotilla_examples::{add, fan_out};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::TestCluster;

/// A task that stays pending until cancelled or dropped.
fn stuck(client: &flotilla::Client, x: i64) -> flotilla::TaskFuture<i64> {
    client
        .submit_with(add, (x, -1_000_000))
        .workers(["no-such-worker"])
        .submit()
}

/// How long a waiting call is given to (wrongly) go through.
const WAIT: Duration = Duration::from_millis(700);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_async_waits_past_the_bound_and_try_submit_errs() {
    let mut config = support::fresh_config("bp-async");
    config.max_pending = 2;
    let cluster = TestCluster::start_with(config, 1, 1).await;
    let client = &cluster.client;
    let first = stuck(client, 1);
    let second = stuck(client, 2);

    match client.submit_with(add, (1, 2)).try_submit() {
        Err(Error::TooManyPending { pending, limit }) => {
            assert_eq!((pending, limit), (2, 2));
            let message = Error::TooManyPending { pending, limit }.to_string();
            assert!(message.contains("FLOTILLA_MAX_PENDING = 2"), "{message}");
        }
        other => panic!(
            "expected TooManyPending, got {:?}",
            other.map(|f| f.key().to_owned())
        ),
    }
    // A key this client already has takes no room: its handle comes back.
    let again = client
        .submit_with(add, (1, -1_000_000))
        .workers(["no-such-worker"])
        .try_submit()
        .expect("the same key again takes no room");
    assert_eq!(again.key(), first.key());

    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            let future = client.submit_with(add, (20, 22)).submit_async().await;
            future.result().await
        }
    });
    tokio::time::sleep(WAIT).await;
    assert!(!waiting.is_finished(), "submit_async must wait for room");

    // Room frees: one pending task is cancelled.
    second.cancel();
    second.wait().await;
    assert_eq!(second.status(), Status::Cancelled);
    let value = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("submit_async goes on once room frees")
        .unwrap();
    assert_eq!(value.unwrap(), 42);

    // Finished tasks hold no room: one more fits next to `first`.
    let more = client
        .submit_with(add, (2, 3))
        .try_submit()
        .expect("room after a task finished");
    assert_eq!(more.result().await.unwrap(), 5);
    drop((first, again));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_holds_submissions_back_in_order_and_map_never_deadlocks() {
    let mut config = support::fresh_config("bp-queue");
    config.max_pending = 3;
    let cluster = TestCluster::start_with(config, 1, 2).await;
    let client = &cluster.client;
    let stuck_ones: Vec<_> = (0..3).map(|i| stuck(client, i)).collect();

    // Returns at once; the submission waits in the outbox.
    let held = client.submit(add, (40, 2));
    let chained = client.submit(add, (&held, 1));
    tokio::time::sleep(WAIT).await;
    assert_eq!(held.status(), Status::Pending, "held back past the bound");

    // Dropping a pending future releases it, and frees its room.
    let mut stuck_ones = stuck_ones;
    stuck_ones.pop();
    assert_eq!(held.result().await.unwrap(), 42);
    assert_eq!(chained.result().await.unwrap(), 43);

    // One call asking far more than the bound: everything runs, in turns.
    let many = client.map(add, (0..40).map(|i| (i, 1)));
    let values = client.gather(&many).await.unwrap();
    assert_eq!(values, (1..=40).collect::<Vec<i64>>());
    drop(stuck_ones);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_submissions_past_the_bound_complete() {
    let mut config = support::fresh_config("bp-nested");
    // The worker's own client (ctx.client()) has the same bound.
    config.max_pending = 3;
    let cluster = TestCluster::start_with(config, 1, 2).await;
    let sum = cluster.client.submit(fan_out, (12,));
    // Σ 2i for i < 12.
    assert_eq!(sum.result().await.unwrap(), 132);
    cluster.stop().await;
}

#[test]
fn the_blocking_client_blocks_past_the_bound() {
    let mut config = support::fresh_config("bp-blocking");
    config.max_pending = 1;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(async {
        flotilla::LocalCluster::builder()
            .config(config.clone())
            .workers(1)
            .purge_on_shutdown(true)
            .start()
            .await
            .unwrap()
    });
    let client = Arc::new(flotilla::blocking::Client::connect(config).unwrap());
    let parked = client
        .submit_with(add, (5, 5))
        .workers(["no-such-worker"])
        .submit();
    match client.submit_with(add, (1, 1)).try_submit() {
        Err(Error::TooManyPending { limit: 1, .. }) => {}
        other => panic!("expected TooManyPending, got {:?}", other.is_ok()),
    }
    let released = Arc::new(AtomicBool::new(false));
    let submitter = std::thread::spawn({
        let client = client.clone();
        let released = released.clone();
        move || {
            let future = client.submit(add, (2, 3));
            // Only room freed by the main thread lets it through.
            assert!(released.load(Ordering::SeqCst), "submitted without room");
            future.result().unwrap()
        }
    });
    std::thread::sleep(WAIT);
    assert!(!submitter.is_finished(), "the blocking submit must block");
    released.store(true, Ordering::SeqCst);
    parked.cancel();
    assert_eq!(submitter.join().unwrap(), 5);
    drop(parked);
    drop(client);
    runtime.block_on(cluster.shutdown()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_parks_past_its_bound_and_takes_the_backlog_up() {
    let mut config = support::fresh_config("bp-admission");
    config.scheduler_max_tasks = 100;
    let cluster = TestCluster::start_with(config.clone(), 2, 2).await;
    let client = &cluster.client;
    // The core fills with tasks that cannot run yet.
    let blockers: Vec<_> = (0..100).map(|i| stuck(client, i)).collect();
    client.flush().await.unwrap();
    let waiting: Vec<_> = (0..300).map(|i| client.submit(add, (i, 1000))).collect();
    let watched = client.get_future::<i64>(waiting[7].key());
    client.flush().await.unwrap();

    // Past the bound, the submissions are parked in Redis, in order.
    let mut redis = flotilla_runtime::transport::connect_redis(&config.redis_url)
        .await
        .unwrap();
    let backlog = format!("{}:backlog", config.namespace);
    let mut parked = 0u64;
    for _ in 0..300 {
        parked = redis::cmd("LLEN")
            .arg(&backlog)
            .query_async(&mut redis)
            .await
            .unwrap();
        if parked > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(parked > 0, "nothing was parked past the bound");
    tokio::time::sleep(WAIT).await;
    assert!(
        waiting.iter().all(|f| f.status() == Status::Pending),
        "a parked task ran"
    );

    // Cancelling what fills the core is not parked behind the backlog
    // (that would deadlock): the core empties and takes the backlog up.
    client.cancel(&blockers, false);
    let values = client.gather(&waiting).await.unwrap();
    assert_eq!(values, (1000..1300).collect::<Vec<i64>>());
    assert_eq!(watched.result().await.unwrap(), 1007);
    for blocker in &blockers {
        blocker.wait().await;
        assert_eq!(blocker.status(), Status::Cancelled);
    }
    let left: u64 = redis::cmd("LLEN")
        .arg(&backlog)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(left, 0, "the backlog is taken up entirely");
    println!("backpressure admission: bound=100 parked_at_least={parked} tasks=400 unresolved=0");
    cluster.stop().await;
}
