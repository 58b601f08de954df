//! The coordination primitives (`Variable`, `Queue`, `Lock`, `Event`,
//! `Semaphore`) against the real Redis, with tasks on real (in-process)
//! workers and helper processes: the seed's examples, mutual exclusion
//! under contention, a lock holder killed with SIGKILL, a queue of 10,000
//! items across processes, prompt timeouts, and futures held by variables
//! and queues.

mod support;

use flotilla::prelude::*;
use flotilla::sync::SyncError;
use flotilla_examples::coordination::{
    await_variable, put_squares, slow_square, sum, take_batches, take_futures, FutureBatch,
};
use flotilla_examples::coordination::{
    consumer, critical_section, drain, locked_increments, producer, reader, setter,
    unlocked_increments, waiter,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;
use support::{count_keys, fresh_config, target_binary, wait_until_freed, TestCluster};

/// How late a timed-out wait may return: a wait that misses its deadline
/// is late by its poll or lease period (seconds); a loaded 2-core machine
/// (the suite runs 4 tests at once) adds tens of milliseconds, sometimes
/// over 100.
const PROMPT: Duration = Duration::from_millis(400);

/// Checks that a wait of `timeout` that ran out took between `timeout` and
/// `timeout` + 100 ms.
fn assert_prompt(what: &str, elapsed: Duration, timeout: Duration) {
    println!(
        "timeout: {what}({timeout:?}) returned {:?} late",
        elapsed.saturating_sub(timeout)
    );
    assert!(
        elapsed + Duration::from_millis(2) >= timeout,
        "{what}: returned after {elapsed:?}, before its {timeout:?} timeout"
    );
    assert!(
        elapsed < timeout + PROMPT,
        "{what}: returned after {elapsed:?}, more than 100 ms past its {timeout:?} timeout"
    );
}

fn is_timeout(result: &Result<impl std::fmt::Debug, Error>) -> bool {
    matches!(result, Err(Error::Timeout { .. }))
}

fn is_sync_error(result: &Result<impl std::fmt::Debug, Error>, expected: &SyncError) -> bool {
    matches!(result, Err(Error::Sync(error)) if error == expected)
}

// ---------------------------------------------------------------- seed

#[tokio::test]
async fn seed_queue_example_producer_and_consumer_tasks() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-seed-queue", 2).await;
    let queue: Queue<i64> = Queue::new(&t.client, "seed-queue");
    let _producer = t.client.submit(producer, (queue.name(), 10));
    let result_future = t.client.submit(consumer, (queue.name(), 10_usize));
    let results = result_future
        .result_timeout(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(results, (0..10).collect::<Vec<i64>>());
    assert_eq!(queue.qsize().await.unwrap(), 0);
    t.stop().await;
}

/// A consumer waiting on an empty queue lends its slot: on one worker with a
/// single slot, a producer submitted after the consumer still runs.
#[tokio::test]
async fn a_waiting_queue_consumer_lends_its_slot_to_the_producer() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-queue-slot", 1).await;
    let queue: Queue<i64> = Queue::new(&t.client, "one-slot");
    let result_future = t.client.submit(consumer, (queue.name(), 10_usize));
    // The consumer is running (and waiting) before the producer is submitted.
    tokio::time::timeout(Duration::from_secs(10), async {
        while result_future.status() != flotilla::Status::Running {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the consumer starts");
    let producer_future = t.client.submit(producer, (queue.name(), 10));
    let results = result_future
        .result_timeout(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(results, (0..10).collect::<Vec<i64>>());
    producer_future.await.unwrap();
    t.stop().await;
}

#[tokio::test]
async fn seed_lock_example_critical_sections_run_one_at_a_time() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-seed-lock", 2).await;
    let futures = t.client.map(
        critical_section,
        (0..10_u32).map(|call| ("seed-lock", "seed-counter", call)),
    );
    let mut updates = t.client.gather(&futures).await.unwrap();
    updates.sort();
    let values: Vec<u64> = updates.iter().map(|u| u.0).collect();
    assert_eq!(values, (1..=10).collect::<Vec<u64>>());
    let tokens: Vec<u64> = updates.iter().map(|u| u.1).collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    let counter: Variable<u64> = Variable::new(&t.client, "seed-counter");
    assert_eq!(counter.get().await.unwrap(), 10);
    t.stop().await;
}

#[tokio::test]
async fn seed_event_example_waiter_wakes_when_setter_sets() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-seed-event", 2).await;
    let started = Instant::now();
    let wait_future = t.client.submit(waiter, ("seed-event",));
    let _set_future = t.client.submit(setter, ("seed-event", 1000_u64));
    let result = wait_future
        .result_timeout(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(result, "Event occurred");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(Event::new(&t.client, "seed-event").is_set().await.unwrap());
    t.stop().await;
}

#[tokio::test]
async fn seed_variable_example_task_reads_what_the_client_set() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-seed-var", 1).await;
    let var = Variable::new(&t.client, "my-var");
    var.set(&42_i64).await.unwrap();
    let future = t.client.submit(reader, ("my-var",));
    assert_eq!(
        future
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
        42
    );
    t.stop().await;
}

// ---------------------------------------------------------------- Variable

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    name: String,
    retries: u32,
    ratio: f64,
    tags: Vec<String>,
}

#[tokio::test]
async fn variable_get_waits_for_the_first_set_and_delete_empties_it() {
    let t = TestCluster::start("prim-var", 0).await;
    let var: Variable<Settings> = Variable::new(&t.client, "settings");
    assert_eq!(var.try_get().await.unwrap(), None);

    // Several getters wait for the first set, in other handles and a task
    // that only reads it later.
    let getters: Vec<_> = (0..4)
        .map(|_| {
            let var: Variable<Settings> = Variable::new(&t.client, "settings");
            tokio::spawn(async move {
                let result = var.get_timeout(Duration::from_secs(10)).await;
                (result, Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(getters.iter().all(|g| !g.is_finished()));
    let settings = Settings {
        name: "fast".into(),
        retries: 3,
        ratio: 0.5,
        tags: vec!["a".into(), "b".into()],
    };
    let set_at = Instant::now();
    var.set(&settings).await.unwrap();
    for getter in getters {
        let (result, at) = getter.await.unwrap();
        assert_eq!(result.unwrap(), settings);
        let delay = at.saturating_duration_since(set_at);
        assert!(
            delay < Duration::from_millis(100),
            "woken {delay:?} after set"
        );
    }

    // A set value is read at once; a new one replaces it.
    assert_eq!(var.get().await.unwrap(), settings);
    let changed = Settings {
        retries: 4,
        ..settings
    };
    var.set(&changed).await.unwrap();
    assert_eq!(var.get().await.unwrap(), changed);

    var.delete().await.unwrap();
    assert_eq!(var.try_get().await.unwrap(), None);
    let started = Instant::now();
    let result = var.get_timeout(Duration::from_millis(250)).await;
    assert!(is_timeout(&result), "{result:?}");
    assert_prompt(
        "Variable::get_timeout",
        started.elapsed(),
        Duration::from_millis(250),
    );

    // A value of the wrong type is a decode error, not garbage.
    let number: Variable<u64> = Variable::new(&t.client, "number");
    number.set(&7).await.unwrap();
    let as_settings: Variable<Settings> = Variable::new(&t.client, "number");
    assert!(matches!(as_settings.get().await, Err(Error::Decode { .. })));
    t.stop().await;
}

// ---------------------------------------------------------------- Queue

#[tokio::test]
async fn queue_is_fifo_with_batches_sizes_and_timeouts() {
    let t = TestCluster::start("prim-queue", 0).await;
    let queue: Queue<String> = Queue::new(&t.client, "words");
    assert_eq!(queue.qsize().await.unwrap(), 0);
    assert_eq!(queue.try_get().await.unwrap(), None);
    for word in ["a", "b", "c"] {
        queue.put(&word.to_owned()).await.unwrap();
    }
    let more: Vec<String> = (0..5).map(|i| format!("w{i}")).collect();
    queue.put_all(&more).await.unwrap();
    assert_eq!(queue.qsize().await.unwrap(), 8);
    assert_eq!(queue.get().await.unwrap(), "a");
    assert_eq!(queue.get_batch(2).await.unwrap(), ["b", "c"]);
    assert_eq!(
        queue.get_batch(100).await.unwrap(),
        ["w0", "w1", "w2", "w3", "w4"]
    );
    assert_eq!(queue.qsize().await.unwrap(), 0);

    for (what, timeout) in [
        ("get_timeout", Duration::from_millis(50)),
        ("get_timeout", Duration::from_millis(300)),
        ("get_batch_timeout", Duration::from_millis(200)),
    ] {
        let started = Instant::now();
        let result = if what == "get_timeout" {
            queue.get_timeout(timeout).await.map(|w| vec![w])
        } else {
            queue.get_batch_timeout(10, timeout).await
        };
        assert!(is_timeout(&result), "{result:?}");
        assert_prompt(what, started.elapsed(), timeout);
    }

    // A waiting getter gets an item put later, promptly.
    let getter = {
        let queue: Queue<String> = Queue::new(&t.client, "words");
        tokio::spawn(async move {
            let item = queue.get_timeout(Duration::from_secs(10)).await;
            (item, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let put_at = Instant::now();
    queue.put(&"late".to_owned()).await.unwrap();
    let (item, at) = getter.await.unwrap();
    assert_eq!(item.unwrap(), "late");
    assert!(at.saturating_duration_since(put_at) < Duration::from_millis(100));

    queue.put_all(&more).await.unwrap();
    assert_eq!(queue.delete().await.unwrap(), 5);
    assert_eq!(queue.qsize().await.unwrap(), 0);
    t.stop().await;
}

#[tokio::test]
async fn a_cancelled_get_loses_no_item() {
    let t = TestCluster::start("prim-queue-cancel", 0).await;
    for round in 0..5_u64 {
        let first: Queue<u64> = Queue::new(&t.client, "cancel");
        // Cancel a waiting get, then put an item while the cancelled
        // command may still be on its way out.
        let cancelled = tokio::time::timeout(Duration::from_millis(100), first.get()).await;
        assert!(cancelled.is_err());
        first.put(&round).await.unwrap();
        if round % 2 == 0 {
            // The same handle gets it, moved aside or not...
            assert_eq!(
                first.get_timeout(Duration::from_secs(2)).await.unwrap(),
                round
            );
        } else {
            // ...or, once it is dropped, anyone does.
            drop(first);
            let second: Queue<u64> = Queue::new(&t.client, "cancel");
            assert_eq!(
                second.get_timeout(Duration::from_secs(2)).await.unwrap(),
                round
            );
        }
    }
    t.stop().await;
}

/// 10,000 items from two producer processes to three consumers (two tasks
/// on two workers, and this process): each item arrives exactly once.
#[tokio::test]
async fn queue_of_10000_items_across_processes_delivers_each_exactly_once() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-queue-10k", 2).await;
    let name = "pipeline";
    let started = Instant::now();
    let tasks: Vec<_> = [64_usize, 100]
        .into_iter()
        .map(|batch| {
            t.client
                .submit_with(drain, (name, batch))
                .pure(false)
                .submit()
        })
        .collect();
    let local = {
        let queue: Queue<Option<u64>> = Queue::new(&t.client, name);
        tokio::spawn(async move {
            let mut items = Vec::new();
            loop {
                match queue.get().await.unwrap() {
                    Some(item) => items.push(item),
                    None => return items,
                }
            }
        })
    };
    let producers: Vec<Child> = [(0, 5000), (5000, 5000)]
        .into_iter()
        .map(|(first, count)| {
            example(&t, "queue_producer")
                .args([name.to_owned(), first.to_string(), count.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("queue_producer starts")
        })
        .collect();
    for child in producers {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(output.status.success(), "a producer failed");
        print!("{}", String::from_utf8_lossy(&output.stdout));
    }
    let queue: Queue<Option<u64>> = Queue::new(&t.client, name);
    for _ in 0..3 {
        queue.put(&None).await.unwrap();
    }
    let mut received: Vec<u64> = local.await.unwrap();
    let local_count = received.len();
    let mut per_task = Vec::new();
    for task in tasks {
        let items = task.result_timeout(Duration::from_secs(60)).await.unwrap();
        per_task.push(items.len());
        received.extend(items);
    }
    let elapsed = started.elapsed();
    let distinct: BTreeSet<u64> = received.iter().copied().collect();
    let duplicates = received.len() - distinct.len();
    let missing = (0..10_000).filter(|i| !distinct.contains(i)).count();
    println!(
        "queue: {} items received ({local_count} here, {per_task:?} in tasks) in {elapsed:.2?}: \
         {duplicates} duplicates, {missing} missing",
        received.len()
    );
    assert_eq!(duplicates, 0);
    assert_eq!(missing, 0);
    assert_eq!(received.len(), 10_000);
    assert!(distinct.iter().all(|&i| i < 10_000));
    assert_eq!(queue.qsize().await.unwrap(), 0);
    t.stop().await;
}

// ---------------------------------------------------------------- Lock

#[tokio::test]
async fn lock_acquire_release_try_and_guards() {
    let t = TestCluster::start("prim-lock", 0).await;
    let lease = Duration::from_millis(600);
    let first = Lock::new(&t.client, "l").with_lease(lease);
    let second = Lock::new(&t.client, "l").with_lease(lease);
    assert!(!first.locked().await.unwrap());

    assert!(first.try_acquire().await.unwrap());
    let token = first.fencing_token().unwrap();
    assert!(first.is_held() && first.locked().await.unwrap());
    assert!(!second.try_acquire().await.unwrap());
    assert!(!second.is_held() && second.fencing_token().is_none());
    let again = first.try_acquire().await;
    assert!(
        is_sync_error(&again, &SyncError::AlreadyHeld { name: "l".into() }),
        "{again:?}"
    );
    let not_held = second.release().await;
    assert!(
        is_sync_error(
            &not_held,
            &SyncError::NotHeld {
                what: "lock",
                name: "l".into()
            }
        ),
        "{not_held:?}"
    );

    // A live holder keeps the lock well past its lease: it renews it.
    let started = Instant::now();
    assert!(!second.acquire_timeout(lease * 4).await.unwrap());
    assert_prompt("Lock::acquire_timeout", started.elapsed(), lease * 4);
    assert!(first.is_held());

    // A waiter gets the lock as soon as it is released, not at lease end.
    let waiting = {
        let contender = Lock::new(&t.client, "l").with_lease(lease);
        tokio::spawn(async move {
            let got = contender
                .acquire_timeout(Duration::from_secs(10))
                .await
                .unwrap();
            let at = Instant::now();
            let token = contender.fencing_token();
            contender.release().await.unwrap();
            (got, at, token)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released_at = Instant::now();
    first.release().await.unwrap();
    assert!(!first.is_held());
    let (got, at, next_token) = waiting.await.unwrap();
    assert!(got);
    let handover = at.saturating_duration_since(released_at);
    println!("lock: released → next holder in {handover:?}");
    assert!(handover < Duration::from_millis(100), "{handover:?}");
    assert!(next_token.unwrap() > token);

    // Guards release when dropped, or explicitly.
    {
        let guard = second.lock().await.unwrap();
        assert!(guard.is_held());
        assert!(guard.fencing_token() > next_token.unwrap());
        assert!(first.try_lock().await.unwrap().is_none());
    }
    let guard = first
        .lock_timeout(Duration::from_secs(2))
        .await
        .unwrap()
        .expect("the dropped guard released the lock");
    guard.release().await.unwrap();
    assert!(!first.locked().await.unwrap());

    // Dropping a handle that holds the lock releases it too.
    let dropped = Lock::new(&t.client, "l");
    assert!(dropped.try_acquire().await.unwrap());
    drop(dropped);
    let started = Instant::now();
    assert!(first.acquire_timeout(Duration::from_secs(5)).await.unwrap());
    assert!(started.elapsed() < Duration::from_millis(100));
    first.release().await.unwrap();
    t.stop().await;
}

/// A holder whose runtime dies (so nothing renews or releases its lease):
/// the lock frees itself after the lease.
#[tokio::test]
async fn a_dead_holders_lock_frees_itself_after_the_lease() {
    let t = TestCluster::start("prim-lock-dead", 0).await;
    let lease = Duration::from_millis(800);
    let config = t.config.clone();
    let token = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let client = Client::connect(config).await.unwrap();
            let lock = Lock::new(&client, "dead").with_lease(lease);
            assert!(lock.try_acquire().await.unwrap());
            let token = lock.fencing_token().unwrap();
            std::mem::forget(lock); // never released
            token
        })
        // The runtime is dropped here: the renewal task dies with it.
    })
    .join()
    .unwrap();
    let died = Instant::now();
    let lock = Lock::new(&t.client, "dead");
    assert!(lock.acquire_timeout(Duration::from_secs(5)).await.unwrap());
    let waited = died.elapsed();
    println!("lock: dead holder's lease ({lease:?}) → taken over after {waited:?}");
    assert!(waited < lease + PROMPT, "{waited:?}");
    assert!(lock.fencing_token().unwrap() > token);
    lock.release().await.unwrap();
    t.stop().await;
}

/// 50 tasks on 3 workers (2 slots each) each do 20 read-modify-write
/// increments of one counter under a lock: not one update is lost, and
/// fencing tokens rise with every increment.
#[tokio::test]
async fn lock_makes_1000_concurrent_increments_exact() {
    flotilla_examples::link();
    let t = TestCluster::start_with(fresh_config("prim-lock-1000"), 3, 2).await;
    let started = Instant::now();
    let futures: Vec<_> = (0..50)
        .map(|_| {
            t.client
                .submit_with(
                    locked_increments,
                    ("counter-lock", "counter", 20_u32, 2000_u64),
                )
                .pure(false)
                .submit()
        })
        .collect();
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut workers = BTreeSet::new();
    for future in &futures {
        let (worker, increments) = future
            .result_timeout(Duration::from_secs(120))
            .await
            .unwrap();
        workers.insert(worker);
        written.extend(increments);
    }
    let elapsed = started.elapsed();
    let counter: Variable<u64> = Variable::new(&t.client, "counter");
    let total = counter.get().await.unwrap();
    println!(
        "lock: 50 tasks × 20 locked increments on {} workers → {total} in {elapsed:.2?} ({} lost)",
        workers.len(),
        1000 - total as i64
    );
    assert!(workers.len() >= 2, "the tasks ran on {workers:?}");
    assert_eq!(total, 1000);
    written.sort();
    let values: Vec<u64> = written.iter().map(|w| w.0).collect();
    assert_eq!(values, (1..=1000).collect::<Vec<u64>>());
    let tokens: Vec<u64> = written.iter().map(|w| w.1).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens must increase with each grant"
    );

    // The same without the lock loses updates (not asserted: racing is
    // up to the scheduler), which shows the test above can fail.
    let futures: Vec<_> = (0..50)
        .map(|_| {
            t.client
                .submit_with(unlocked_increments, ("racy-counter", 20_u32))
                .pure(false)
                .submit()
        })
        .collect();
    t.client.gather(&futures).await.unwrap();
    let racy: u64 = Variable::new(&t.client, "racy-counter")
        .get()
        .await
        .unwrap();
    println!(
        "lock: the same without the lock → {racy} ({} lost)",
        1000 - racy
    );
    assert!(racy <= 1000);
    t.stop().await;
}

/// A lock holder process killed with SIGKILL: another process gets the lock
/// when the lease runs out — never before — with a larger fencing token.
#[tokio::test]
async fn a_killed_holder_process_loses_the_lock_after_its_lease() {
    let t = TestCluster::start("prim-lock-kill", 0).await;
    let lease = Duration::from_millis(1500);
    let name = "killed";
    let holder = spawn_holder(&t, name, lease);
    let (token_a, _) = holder
        .line(Duration::from_secs(20))
        .expect("holder acquires");

    // A second process waits; the first keeps the lock for 3 leases.
    let next_holder = spawn_holder(&t, name, lease);
    assert!(
        next_holder.line(lease * 3).is_none(),
        "the waiter got the lock while its holder was alive"
    );

    let mut redis = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut first = holder.child;
    first.kill().expect("SIGKILL"); // Child::kill is SIGKILL on Unix
    let killed = Instant::now();
    first.wait().unwrap();
    let remaining: i64 = redis::cmd("PTTL")
        .arg(format!("{}:{{lock:{name}}}:owner", t.config.namespace))
        .query_async(&mut redis)
        .await
        .unwrap();
    let remaining = Duration::from_millis(remaining.max(0) as u64);
    let (token_b, acquired) = next_holder
        .line(Duration::from_secs(20))
        .expect("waiter acquires");
    let handover = acquired.saturating_duration_since(killed);
    println!(
        "lock: holder killed with {remaining:?} of its {lease:?} lease left → \
         next process acquired after {handover:?} (tokens {token_a} → {token_b})"
    );
    assert!(
        handover + Duration::from_millis(10) >= remaining,
        "acquired {handover:?} after the kill, before the lease ran out ({remaining:?})"
    );
    assert!(
        handover <= lease + Duration::from_millis(300),
        "{handover:?}"
    );
    assert!(token_b > token_a);
    let mut second = next_holder.child;
    second.kill().unwrap();
    second.wait().unwrap();
    t.stop().await;
}

/// A running `lock_holder` example and the lines it prints.
struct Holder {
    child: Child,
    lines: std::sync::mpsc::Receiver<(String, Instant)>,
}

impl Holder {
    /// The next `acquired ... token=N` line within `timeout`: the token and
    /// when the line arrived.
    fn line(&self, timeout: Duration) -> Option<(u64, Instant)> {
        let (line, at) = self.lines.recv_timeout(timeout).ok()?;
        let token = line.rsplit("token=").next()?.trim().parse().ok()?;
        Some((token, at))
    }
}

fn spawn_holder(t: &TestCluster, name: &str, lease: Duration) -> Holder {
    let mut child = example(t, "lock_holder")
        .args([name.to_owned(), lease.as_millis().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("lock_holder starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((line, Instant::now())).is_err() {
                break;
            }
        }
    });
    Holder { child, lines }
}

/// A command running an example program against the test's namespace.
fn example(t: &TestCluster, name: &str) -> Command {
    let path = target_binary(&format!("examples/{name}"));
    assert!(
        path.exists(),
        "{} is missing: build the examples first (`cargo build --examples`)",
        path.display()
    );
    let mut command = Command::new(path);
    command
        .env("FLOTILLA_AMQP_URL", &t.config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &t.config.redis_url)
        .env("FLOTILLA_NAMESPACE", &t.config.namespace);
    command
}

// ---------------------------------------------------------------- Event

#[tokio::test]
async fn every_event_waiter_wakes_on_set() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-event", 2).await;
    let event = Event::new(&t.client, "go");
    assert!(!event.is_set().await.unwrap());
    let started = Instant::now();
    assert!(!event
        .wait_timeout(Duration::from_millis(150))
        .await
        .unwrap());
    assert_prompt(
        "Event::wait_timeout",
        started.elapsed(),
        Duration::from_millis(150),
    );

    // Eight waiters here and two tasks on the workers.
    let local: Vec<_> = (0..8)
        .map(|_| {
            let event = Event::new(&t.client, "go");
            tokio::spawn(async move {
                let woken = event.wait_timeout(Duration::from_secs(20)).await.unwrap();
                (woken, Instant::now())
            })
        })
        .collect();
    let tasks: Vec<_> = (0..2)
        .map(|_| t.client.submit_with(waiter, ("go",)).pure(false).submit())
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(local.iter().all(|w| !w.is_finished()));
    assert!(tasks.iter().all(|f| !f.done()));
    let set_at = Instant::now();
    event.set().await.unwrap();
    for handle in local {
        let (woken, at) = handle.await.unwrap();
        assert!(woken);
        let delay = at.saturating_duration_since(set_at);
        assert!(
            delay < Duration::from_millis(100),
            "woken {delay:?} after set"
        );
    }
    for task in tasks {
        assert_eq!(
            task.result_timeout(Duration::from_secs(10)).await.unwrap(),
            "Event occurred"
        );
    }
    assert!(event.is_set().await.unwrap());
    assert!(event.wait_timeout(Duration::from_millis(10)).await.unwrap());

    // Waiters blocked when the event is set wake, even if it is cleared
    // again at once.
    event.clear().await.unwrap();
    assert!(!event.is_set().await.unwrap());
    let blocked: Vec<_> = (0..3)
        .map(|_| {
            let event = Event::new(&t.client, "go");
            tokio::spawn(async move { event.wait_timeout(Duration::from_secs(10)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    event.set().await.unwrap();
    event.clear().await.unwrap();
    for handle in blocked {
        assert!(handle.await.unwrap().unwrap());
    }
    let started = Instant::now();
    assert!(!event
        .wait_timeout(Duration::from_millis(200))
        .await
        .unwrap());
    assert_prompt(
        "Event::wait_timeout",
        started.elapsed(),
        Duration::from_millis(200),
    );
    t.stop().await;
}

// ---------------------------------------------------------------- Semaphore

#[tokio::test]
async fn semaphore_caps_holders_and_frees_dead_leases() {
    let t = TestCluster::start("prim-semaphore", 0).await;
    let lease = Duration::from_millis(600);
    let handles: Vec<Semaphore> = (0..3)
        .map(|_| Semaphore::new(&t.client, "db", 2).with_lease(lease))
        .collect();
    assert!(handles[0].try_acquire().await.unwrap());
    assert!(handles[1].try_acquire().await.unwrap());
    assert!(!handles[2].try_acquire().await.unwrap());
    assert_eq!(handles[0].in_use().await.unwrap(), 2);
    let not_held = handles[2].release().await;
    assert!(
        is_sync_error(
            &not_held,
            &SyncError::NotHeld {
                what: "semaphore",
                name: "db".into()
            }
        ),
        "{not_held:?}"
    );
    let other_max = Semaphore::new(&t.client, "db", 3).try_acquire().await;
    assert!(
        is_sync_error(
            &other_max,
            &SyncError::InconsistentMaxLeases {
                name: "db".into(),
                existing: 2,
                requested: 3
            }
        ),
        "{other_max:?}"
    );

    // Live holders keep their leases past the lease time.
    let started = Instant::now();
    assert!(!handles[2].acquire_timeout(lease * 3).await.unwrap());
    assert_prompt("Semaphore::acquire_timeout", started.elapsed(), lease * 3);

    // A release hands the slot to a waiter at once.
    let waiting = {
        let semaphore = Semaphore::new(&t.client, "db", 2).with_lease(lease);
        tokio::spawn(async move {
            let permit = semaphore
                .permit_timeout(Duration::from_secs(10))
                .await
                .unwrap();
            let at = Instant::now();
            assert!(permit.is_some());
            drop(permit);
            at
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released_at = Instant::now();
    handles[0].release().await.unwrap();
    let handover = waiting
        .await
        .unwrap()
        .saturating_duration_since(released_at);
    assert!(handover < Duration::from_millis(100), "{handover:?}");

    // A holder whose runtime dies: its lease frees itself.
    let config = t.config.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let client = Client::connect(config).await.unwrap();
            let semaphore = Semaphore::new(&client, "db", 2).with_lease(lease);
            // The dropped permit above may still be releasing.
            assert!(semaphore
                .acquire_timeout(Duration::from_secs(2))
                .await
                .unwrap());
            std::mem::forget(semaphore);
        })
    })
    .join()
    .unwrap();
    let died = Instant::now();
    assert_eq!(handles[2].in_use().await.unwrap(), 2);
    assert!(handles[2]
        .acquire_timeout(Duration::from_secs(5))
        .await
        .unwrap());
    let waited = died.elapsed();
    println!("semaphore: dead holder's lease ({lease:?}) → taken over after {waited:?}");
    assert!(waited < lease + PROMPT, "{waited:?}");
    handles[1].release().await.unwrap();
    handles[2].release().await.unwrap();
    assert_eq!(handles[0].in_use().await.unwrap(), 0);
    t.stop().await;
}

// ---------------------------------------------------------------- resilience

/// Waiters whose connections are killed under them reconnect, check the
/// state again and still wake up.
#[tokio::test]
async fn waiters_survive_killed_connections() {
    let t = TestCluster::start("prim-killed-conns", 0).await;
    let holder = Lock::new(&t.client, "held");
    assert!(holder.try_acquire().await.unwrap());
    let events: Vec<_> = (0..3)
        .map(|_| {
            let event = Event::new(&t.client, "e");
            tokio::spawn(async move { event.wait_timeout(Duration::from_secs(20)).await })
        })
        .collect();
    let getter = {
        let var: Variable<u32> = Variable::new(&t.client, "v");
        tokio::spawn(async move { var.get_timeout(Duration::from_secs(20)).await })
    };
    let taker = {
        let queue: Queue<u32> = Queue::new(&t.client, "q");
        tokio::spawn(async move { queue.get_timeout(Duration::from_secs(20)).await })
    };
    let contender = {
        let lock = Lock::new(&t.client, "held");
        tokio::spawn(async move {
            let got = lock.acquire_timeout(Duration::from_secs(20)).await;
            lock.release().await.unwrap();
            got
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut redis = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut redis)
        .await
        .unwrap();
    let name = format!("name=flotilla-wait-{} ", t.config.namespace);
    let blocked: Vec<&str> = clients
        .lines()
        .filter(|line| line.contains(&name) && line.contains("flags=b"))
        .filter_map(|line| line.strip_prefix("id=")?.split(' ').next())
        .collect();
    assert_eq!(blocked.len(), 6, "six waits block on their own connections");
    for id in &blocked {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    Event::new(&t.client, "e").set().await.unwrap();
    Variable::new(&t.client, "v").set(&7_u32).await.unwrap();
    Queue::new(&t.client, "q").put(&8_u32).await.unwrap();
    holder.release().await.unwrap();
    for event in events {
        assert!(event.await.unwrap().unwrap());
    }
    assert_eq!(getter.await.unwrap().unwrap(), 7);
    assert_eq!(taker.await.unwrap().unwrap(), 8);
    assert!(contender.await.unwrap().unwrap());
    t.stop().await;
}

// ---------------------------------------------------------------- blocking

#[test]
fn blocking_flavours_work_from_plain_threads() {
    use flotilla::sync::blocking;
    let config = fresh_config("prim-blocking");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(async {
        flotilla::LocalCluster::builder()
            .config(config.clone())
            .workers(0)
            .purge_on_shutdown(true)
            .start()
            .await
            .unwrap()
    });
    let client = flotilla::blocking::Client::connect(config.clone()).unwrap();

    let var = blocking::Variable::new(&client, "v");
    var.set(&"hello".to_owned()).unwrap();
    assert_eq!(var.get().unwrap(), "hello");

    let queue = blocking::Queue::new(&client, "q");
    queue.put_all(&[1_i64, 2, 3]).unwrap();
    assert_eq!(queue.get().unwrap(), 1);
    assert_eq!(queue.get_batch(5).unwrap(), [2, 3]);
    let started = Instant::now();
    assert!(is_timeout(&queue.get_timeout(Duration::from_millis(100))));
    assert_prompt(
        "blocking Queue::get_timeout",
        started.elapsed(),
        Duration::from_millis(100),
    );

    let lock = blocking::Lock::new(&client, "l").with_lease(Duration::from_millis(500));
    let other = blocking::Lock::new(&client, "l");
    {
        let guard = lock.lock().unwrap();
        assert!(guard.fencing_token() >= 1);
        assert!(!other.try_acquire().unwrap());
    }
    assert!(other.acquire_timeout(Duration::from_secs(2)).unwrap());
    other.release().unwrap();

    let event = blocking::Event::new(&client, "e");
    let blocked = {
        let event = event.clone();
        std::thread::spawn(move || event.wait_timeout(Duration::from_secs(10)).unwrap())
    };
    std::thread::sleep(Duration::from_millis(200));
    event.set().unwrap();
    assert!(blocked.join().unwrap());

    let semaphore = blocking::Semaphore::new(&client, "s", 1);
    let permit = semaphore.permit().unwrap();
    assert!(!blocking::Semaphore::new(&client, "s", 1)
        .try_acquire()
        .unwrap());
    permit.release().unwrap();
    assert_eq!(semaphore.in_use().unwrap(), 0);

    var.delete().unwrap();
    assert_eq!(queue.delete().unwrap(), 0);
    assert!(!lock.delete().unwrap());
    event.delete().unwrap();
    assert_eq!(semaphore.delete().unwrap(), 0);
    runtime.block_on(until_no_primitive_keys(&config, Duration::from_secs(5)));
    drop((var, queue, lock, other, event, semaphore, client));
    runtime.block_on(cluster.shutdown()).unwrap();
}

// ---------------------------------------------------------------- delete

/// Keys of the namespace's primitives (`<ns>:{<kind>:<name>}:...`).
async fn primitive_keys(config: &flotilla::Config) -> usize {
    count_keys(config, "{*").await
}

/// Waits until the namespace's primitives hold no key; panics with the
/// count after `limit`.
async fn until_no_primitive_keys(config: &flotilla::Config, limit: Duration) {
    let started = Instant::now();
    loop {
        let left = primitive_keys(config).await;
        if left == 0 {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{left} keys of deleted primitives are left after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn deleting_every_primitive_leaves_no_key_behind() {
    let t = TestCluster::start("prim-delete", 0).await;
    let client = &t.client;

    let variable: Variable<String> = Variable::new(client, "v");
    let getting = {
        let variable = variable.clone();
        tokio::spawn(async move { variable.get_timeout(Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    variable.set(&"x".to_owned()).await.unwrap();
    assert_eq!(getting.await.unwrap().unwrap(), "x");

    let queue: Queue<i64> = Queue::new(client, "q");
    queue.put_all(&[1, 2, 3]).await.unwrap();
    assert_eq!(queue.get().await.unwrap(), 1);

    let lock = Lock::new(client, "l");
    let other = Lock::new(client, "l");
    lock.acquire().await.unwrap();
    let waiting = tokio::spawn(async move {
        let got = other
            .acquire_timeout(Duration::from_secs(10))
            .await
            .unwrap();
        other.release().await.unwrap();
        got
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    lock.release().await.unwrap();
    assert!(waiting.await.unwrap());

    let event = Event::new(client, "e");
    let woken = {
        let event = event.clone();
        tokio::spawn(async move { event.wait_timeout(Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    event.set().await.unwrap();
    assert!(woken.await.unwrap().unwrap());

    let semaphore = Semaphore::new(client, "s", 2);
    let permit = semaphore.permit().await.unwrap();
    permit.release().await.unwrap();

    // Used and released, they still hold keys: the variable's value, the
    // queue's items, the lock's fencing counter, the event's flag and the
    // semaphore's recorded maximum.
    for kind in [
        "{var:v}",
        "{queue:q}",
        "{lock:l}",
        "{event:e}",
        "{semaphore:s}",
    ] {
        assert!(count_keys(&t.config, kind).await > 0, "{kind} holds keys");
    }
    variable.delete().await.unwrap();
    assert_eq!(queue.delete().await.unwrap(), 2);
    assert!(!lock.delete().await.unwrap(), "nobody held the lock");
    event.delete().await.unwrap();
    assert_eq!(semaphore.delete().await.unwrap(), 0);
    until_no_primitive_keys(&t.config, Duration::from_secs(5)).await;
    t.stop().await;
}

#[tokio::test]
async fn deleting_a_held_lock_or_semaphore_ends_the_leases_and_wakes_the_waiters() {
    let t = TestCluster::start("prim-delete-held", 0).await;
    let long = Duration::from_secs(60);

    let holder = Lock::new(&t.client, "held").with_lease(long);
    holder.acquire().await.unwrap();
    let first = holder.fencing_token().unwrap();
    let next = Lock::new(&t.client, "held").with_lease(long);
    let waiting = tokio::spawn(async move {
        let got = next.acquire_timeout(Duration::from_secs(20)).await.unwrap();
        (got, next)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert!(
        Lock::new(&t.client, "held").delete().await.unwrap(),
        "it was held"
    );
    let (got, next) = waiting.await.unwrap();
    assert!(got, "the next takes the deleted lock");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "woken by the delete, not by the 60 s lease: {:?}",
        started.elapsed()
    );
    assert!(
        next.fencing_token().unwrap() > first,
        "tokens never go backwards, even across a delete"
    );
    assert!(is_sync_error(
        &holder.release().await,
        &SyncError::LeaseExpired {
            what: "lock",
            name: "held".into()
        }
    ));
    // A handle deleting the lock it holds just ends its grant.
    assert!(next.delete().await.unwrap());
    assert!(!next.is_held());
    assert!(is_sync_error(
        &next.release().await,
        &SyncError::NotHeld {
            what: "lock",
            name: "held".into()
        }
    ));

    let full = Semaphore::new(&t.client, "full", 1).with_lease(long);
    full.acquire().await.unwrap();
    let next = Semaphore::new(&t.client, "full", 1).with_lease(long);
    let waiting = tokio::spawn(async move {
        let got = next.acquire_timeout(Duration::from_secs(20)).await.unwrap();
        (got, next)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(
        Semaphore::new(&t.client, "full", 1).delete().await.unwrap(),
        1
    );
    let (got, next) = waiting.await.unwrap();
    assert!(got && started.elapsed() < Duration::from_secs(5));
    assert!(is_sync_error(
        &full.release().await,
        &SyncError::LeaseExpired {
            what: "semaphore",
            name: "full".into()
        }
    ));
    assert_eq!(next.delete().await.unwrap(), 1);
    assert_eq!(next.held(), 0);
    // The recorded maximum went with it: another one may be used now.
    let wider = Semaphore::new(&t.client, "full", 3);
    assert!(wider.try_acquire().await.unwrap() && wider.try_acquire().await.unwrap());
    assert_eq!(wider.delete().await.unwrap(), 2);
    drop((holder, full, next, wider));
    until_no_primitive_keys(&t.config, Duration::from_secs(5)).await;
    t.stop().await;
}

// ---------------------------------------------------------------- futures held by primitives

/// Who holds `key` in the namespace (its holders set).
async fn holders_of(config: &flotilla::Config, key: &str) -> BTreeSet<String> {
    let names = flotilla_proto::Names::new(&config.namespace);
    redis::cmd("SMEMBERS")
        .arg(names.holders_key(key))
        .query_async(&mut redis_connection(config).await)
        .await
        .unwrap()
}

/// Whether `key`'s result is stored.
async fn is_stored(config: &flotilla::Config, key: &str) -> bool {
    let names = flotilla_proto::Names::new(&config.namespace);
    redis::cmd("EXISTS")
        .arg(names.result_key(key))
        .query_async(&mut redis_connection(config).await)
        .await
        .unwrap()
}

async fn redis_connection(config: &flotilla::Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Waits until `key`'s result is stored.
async fn until_stored(config: &flotilla::Config, key: &str) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !is_stored(config, key).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("`{key}` is stored"));
}

#[tokio::test]
async fn a_future_in_a_variable_outlives_its_setter_and_is_freed_after_delete() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-var-future", 1).await;
    let shared: Variable<TaskFuture<i64>> = Variable::new(&t.client, "latest");
    let future = t
        .client
        .submit_with(slow_square, (7, 300_u64))
        .pure(false)
        .submit();
    let key = future.key().to_owned();
    shared.set(&future).await.unwrap();
    drop(future);
    t.client.flush().await.unwrap();

    // The variable alone holds it: the task still runs, its result is kept.
    let held = holders_of(&t.config, &key).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(
        held.iter().all(|h| h.starts_with("var:latest:")),
        "{held:?}"
    );
    until_stored(&t.config, &key).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(is_stored(&t.config, &key).await);

    // Another client gets a live future of its own.
    let other = Client::connect(t.config.clone()).await.unwrap();
    let theirs: Variable<TaskFuture<i64>> = Variable::new(&other, "latest");
    let got = theirs.get_timeout(Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.key(), key);
    assert!(holders_of(&t.config, &key).await.contains(other.id()));
    assert_eq!(
        got.result_timeout(Duration::from_secs(10)).await.unwrap(),
        49
    );
    // ...passable to a task, like any future.
    let doubled = other.submit(sum, (vec![&got, &got],));
    assert_eq!(
        doubled
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
        98
    );
    // And a task reads it with its own client.
    let in_task = t.client.submit(await_variable, ("latest",));
    assert_eq!(
        in_task
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
        49
    );
    drop((got, doubled, in_task));
    other.flush().await.unwrap();
    t.client.flush().await.unwrap();
    // The readers' holds go (the task's client releases in the background);
    // the variable's stays.
    tokio::time::timeout(Duration::from_secs(10), async {
        while holders_of(&t.config, &key).await.len() > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("only the variable holds the result");
    assert!(holders_of(&t.config, &key)
        .await
        .iter()
        .all(|h| h.starts_with("var:latest:")));
    assert!(
        is_stored(&t.config, &key).await,
        "the variable still holds it"
    );

    let deleted = Instant::now();
    shared.delete().await.unwrap();
    let freed = deleted.elapsed();
    assert!(
        !is_stored(&t.config, &key).await,
        "deleting frees the result"
    );
    assert!(holders_of(&t.config, &key).await.is_empty());
    wait_until_freed(&t.config, Duration::from_secs(10)).await;
    println!(
        "variable delete -> result freed: {freed:?} (every key of the namespace: {:?})",
        deleted.elapsed()
    );
    drop(other);
    t.stop().await;
}

#[tokio::test]
async fn replacing_a_variables_future_releases_the_old_one_only_after_readers_hold_it() {
    let t = TestCluster::start("prim-var-race", 0).await;
    const ROUNDS: i64 = 300;
    let shared: Variable<TaskFuture<i64>> = Variable::new(&t.client, "race");
    let first = t
        .client
        .scatter_with(&-1_i64, flotilla::ScatterOptions { hash: false })
        .await
        .unwrap();
    shared.set(&first).await.unwrap();
    drop(first);
    let other = Client::connect(t.config.clone()).await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut getters = Vec::new();
    for _ in 0..3 {
        let theirs: Variable<TaskFuture<i64>> = Variable::new(&other, "race");
        let done = done.clone();
        getters.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let future = theirs.get().await.unwrap();
                // Never lost: the reader held it before the variable let go.
                let value = future.result_timeout(Duration::from_secs(10)).await;
                seen.push(value.unwrap_or_else(|e| panic!("{}: {e}", future.key())));
            }
            seen
        }));
    }
    let client = t.client.clone();
    let sets = tokio::spawn(async move {
        for i in 0..ROUNDS {
            let future = client
                .scatter_with(&i, flotilla::ScatterOptions { hash: false })
                .await
                .unwrap();
            shared.set(&future).await.unwrap();
            tokio::task::yield_now().await;
        }
        shared
    });
    let shared = sets.await.unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for getter in getters {
        seen.extend(getter.await.unwrap());
    }
    let distinct: BTreeSet<i64> = seen.iter().copied().collect();
    println!(
        "variable race: {} gets during {ROUNDS} sets, {} distinct values",
        seen.len(),
        distinct.len()
    );
    assert!(seen.iter().all(|v| (-1..ROUNDS).contains(v)), "{seen:?}");
    assert!(
        distinct.len() > 1,
        "the gets overlapped the sets: {distinct:?}"
    );
    // Every replaced value was released: only the current one is stored.
    other.flush().await.unwrap();
    t.client.flush().await.unwrap();
    assert_eq!(count_keys(&t.config, "r").await, 1);
    assert_eq!(
        shared.get().await.unwrap().result().await.unwrap(),
        ROUNDS - 1
    );
    shared.delete().await.unwrap();
    wait_until_freed(&t.config, Duration::from_secs(10)).await;
    drop(other);
    t.stop().await;
}

#[tokio::test]
async fn queue_items_hand_futures_and_structures_of_futures_to_exactly_one_getter() {
    flotilla_examples::link();
    let t = TestCluster::start("prim-queue-futures", 2).await;
    let a = &t.client;

    // One future per item, taken by two consumer tasks.
    let queue: Queue<TaskFuture<i64>> = Queue::new(a, "futures");
    let futures = a.map(slow_square, (0..20_i64).map(|i| (i, 20_u64)));
    let keys: BTreeSet<String> = futures.iter().map(|f| f.key().to_owned()).collect();
    queue.put_all(&futures).await.unwrap();
    drop(futures);
    a.flush().await.unwrap();
    for key in &keys {
        let held = holders_of(&t.config, key).await;
        assert!(
            held.len() == 1 && held.iter().all(|h| h.starts_with("q:futures:")),
            "{key}: {held:?}"
        );
    }
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            a.submit_with(take_futures, ("futures", 10_usize))
                .pure(false)
                .submit()
        })
        .collect();
    let taken: Vec<(String, i64)> = a.gather(&consumers).await.unwrap().concat();
    drop(consumers);
    let taken_keys: BTreeSet<String> = taken.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(taken.len(), 20);
    assert_eq!(taken_keys, keys, "each future received exactly once");
    let mut values: Vec<i64> = taken.iter().map(|(_, v)| *v).collect();
    values.sort();
    assert_eq!(values, (0..20_i64).map(|i| i * i).collect::<Vec<_>>());
    assert_eq!(queue.qsize().await.unwrap(), 0);

    // Several futures per item, in a struct: to another client and a task.
    let other = Client::connect(t.config.clone()).await.unwrap();
    let batches: Queue<FutureBatch> = Queue::new(a, "batches");
    for id in 0..6_u64 {
        let parts = a.map(slow_square, (0..3).map(|j| (id as i64 * 10 + j, 10_u64)));
        let total = a.submit(sum, (parts.clone(),));
        batches
            .put(&FutureBatch { id, parts, total })
            .await
            .unwrap();
    }
    let remote = a.submit(take_batches, ("batches", 3_usize));
    let mine: Queue<FutureBatch> = Queue::new(&other, "batches");
    let mut received: Vec<(u64, Vec<i64>, i64)> = Vec::new();
    for _ in 0..3 {
        let batch = mine.get_timeout(Duration::from_secs(30)).await.unwrap();
        // Handed over: the getter holds every future, the queue none.
        for part in batch.parts.iter().chain([&batch.total]) {
            let held = holders_of(&t.config, part.key()).await;
            assert!(
                held.contains(other.id()) && !held.iter().any(|h| h.starts_with("q:")),
                "{}: {held:?}",
                part.key()
            );
        }
        let parts = other.gather(&batch.parts).await.unwrap();
        received.push((batch.id, parts, batch.total.await.unwrap()));
    }
    received.extend(
        remote
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
    );
    drop(remote);
    received.sort();
    assert_eq!(received.len(), 6);
    for (index, (id, parts, total)) in received.iter().enumerate() {
        assert_eq!(*id, index as u64, "each batch received exactly once");
        let expected: Vec<i64> = (0..3).map(|j| (*id as i64 * 10 + j).pow(2)).collect();
        assert_eq!(parts, &expected);
        assert_eq!(*total, expected.iter().sum::<i64>());
    }

    // Put by a task (whose handles are gone once it ended), got by a client.
    let produced = a.submit(put_squares, ("futures", 50_i64, 5_i64));
    let produced_keys = produced
        .result_timeout(Duration::from_secs(30))
        .await
        .unwrap();
    drop(produced);
    let from_task: Queue<TaskFuture<i64>> = Queue::new(&other, "futures");
    let got = from_task.get_batch(5).await.unwrap();
    assert_eq!(
        got.iter().map(|f| f.key().to_owned()).collect::<Vec<_>>(),
        produced_keys
    );
    assert_eq!(
        other.gather(&got).await.unwrap(),
        (50..55_i64).map(|i| i * i).collect::<Vec<_>>()
    );
    drop(got);

    // Deleting a queue releases what it still holds.
    let left = a.map(slow_square, (100..103_i64).map(|i| (i, 0_u64)));
    a.gather(&left).await.unwrap();
    let left_keys: Vec<String> = left.iter().map(|f| f.key().to_owned()).collect();
    queue.put_all(&left).await.unwrap();
    drop(left);
    other.flush().await.unwrap();
    a.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for key in &left_keys {
        assert!(is_stored(&t.config, key).await, "the queue holds {key}");
    }
    let deleted = Instant::now();
    assert_eq!(queue.delete().await.unwrap(), 3);
    let freed = deleted.elapsed();
    for key in &left_keys {
        assert!(!is_stored(&t.config, key).await, "deleting frees {key}");
    }
    wait_until_freed(&t.config, Duration::from_secs(10)).await;
    println!(
        "queue delete -> 3 results freed: {freed:?} (every key of the namespace: {:?})",
        deleted.elapsed()
    );
    drop(other);
    t.stop().await;
}

/// A `get` cancelled at any point while it takes over an item's futures
/// loses neither the item nor its results.
#[tokio::test]
async fn a_cancelled_get_of_an_item_with_futures_loses_nothing() {
    let t = TestCluster::start("prim-queue-cancel-futures", 0).await;
    let queue: Queue<Vec<TaskFuture<i64>>> = Queue::new(&t.client, "cancelled");
    let mut item = Vec::new();
    for value in [1_i64, 2] {
        let options = flotilla::ScatterOptions { hash: false };
        item.push(t.client.scatter_with(&value, options).await.unwrap());
    }
    let keys: Vec<String> = item.iter().map(|f| f.key().to_owned()).collect();
    queue.put(&item).await.unwrap();
    drop(item);
    // Cancel at points spread over the time an uncancelled get takes.
    let started = Instant::now();
    let item = queue.get().await.unwrap();
    let typical = started.elapsed();
    queue.put(&item).await.unwrap();
    drop(item);
    let (mut cancelled, mut received) = (0, 0);
    for attempt in 0..200_u32 {
        let delay = typical * attempt / 150;
        match tokio::time::timeout(delay, queue.get()).await {
            Ok(item) => {
                let item = item.unwrap();
                assert_eq!(t.client.gather(&item).await.unwrap(), [1, 2]);
                queue.put(&item).await.unwrap();
                received += 1;
            }
            Err(_) => cancelled += 1,
        }
    }
    println!("cancelled gets: {cancelled} of 200 ({received} received; a get takes {typical:?})");
    let item = queue.get_timeout(Duration::from_secs(5)).await.unwrap();
    assert_eq!(item.iter().map(|f| f.key()).collect::<Vec<_>>(), keys);
    assert_eq!(t.client.gather(&item).await.unwrap(), [1, 2]);
    assert_eq!(queue.qsize().await.unwrap(), 0);
    assert!(queue.try_get().await.unwrap().is_none(), "exactly one item");
    drop((item, queue));
    t.client.flush().await.unwrap();
    wait_until_freed(&t.config, Duration::from_secs(10)).await;
    t.stop().await;
}

/// Futures can only be serialized into a primitive, which holds them.
#[tokio::test]
async fn a_future_serialized_elsewhere_is_an_error() {
    let t = TestCluster::start("prim-future-serde", 0).await;
    let future = t.client.scatter(&5_i64).await.unwrap();
    match flotilla::ArgWriter::default().value(&future) {
        Err(Error::Encode { message, .. }) => {
            assert!(message.contains("can only be serialized into"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    drop(future);
    t.client.flush().await.unwrap();
    wait_until_freed(&t.config, Duration::from_secs(10)).await;
    t.stop().await;
}

#[test]
fn blocking_variables_and_queues_carry_blocking_futures() {
    use flotilla::sync::blocking;
    let config = fresh_config("prim-blocking-futures");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(async {
        flotilla::LocalCluster::builder()
            .config(config.clone())
            .workers(0)
            .purge_on_shutdown(true)
            .start()
            .await
            .unwrap()
    });
    let shared = flotilla::blocking::Client::connect(config.clone()).unwrap();
    let getter = flotilla::blocking::Client::connect(config.clone()).unwrap();

    let var = blocking::Variable::new(&shared, "v");
    var.set(&shared.scatter(&7_i64).unwrap()).unwrap();
    let read: blocking::Variable<flotilla::blocking::TaskFuture<i64>> =
        blocking::Variable::new(&getter, "v");
    assert_eq!(read.get().unwrap().result().unwrap(), 7);

    let queue = blocking::Queue::new(&shared, "q");
    queue
        .put(&vec![
            shared.scatter(&1_i64).unwrap(),
            shared.scatter(&2_i64).unwrap(),
        ])
        .unwrap();
    let take: blocking::Queue<Vec<flotilla::blocking::TaskFuture<i64>>> =
        blocking::Queue::new(&getter, "q");
    let got = take.get().unwrap();
    assert_eq!(getter.gather(&got).unwrap(), [1, 2]);
    drop(got);
    var.delete().unwrap();
    drop((var, read, queue, take, shared, getter));
    runtime.block_on(async {
        wait_until_freed(&config, Duration::from_secs(10)).await;
        cluster.shutdown().await.unwrap();
    });
}
