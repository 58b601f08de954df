//! The data path for large values made by workers (issue 15): a result of
//! at least 1 MiB stays in the worker that made it, Redis holds only its
//! signed location, and readers (the client, other workers) fetch it over
//! the worker's data connection. Values of any size; a value whose worker
//! is gone is a clear `ValueLost` error, never a hang.

mod support;

use flotilla::Error;
use flotilla_examples::{
    check_pattern, fnv1a, fnv1a_local, is_pattern, noise, pattern, pattern_local, random_bytes,
};
use std::time::{Duration, Instant};
use support::process::Processes;
use support::TestCluster;

async fn redis(config: &flotilla::Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn stored_len(config: &flotilla::Config, key: &str) -> usize {
    redis::cmd("STRLEN")
        .arg(config.names().result_key(key))
        .query_async(&mut redis(config).await)
        .await
        .unwrap()
}

/// A 50 MB plain `Vec<u8>`: kept by its worker (Redis holds a record of a
/// few dozen bytes), fetched by the client byte-exact, used as an input
/// (from the same or the other worker), and freed with its futures.
#[tokio::test]
async fn a_50_mb_vec_result_is_kept_by_its_worker_and_fetched_directly() {
    let t = TestCluster::start("keep50", 2).await;
    let len = 50_000_000;
    let want = fnv1a_local(&noise::call(len, 7));

    let made = t.client.submit(noise, (len, 7));
    let data: Vec<u8> = made.result().await.expect("a 50 MB Vec<u8> result");
    assert_eq!((data.len(), fnv1a_local(&data)), (len, want));
    let record = stored_len(&t.config, made.key()).await;
    assert!(
        record < 512,
        "Redis holds {record} bytes for a kept 50 MB value"
    );
    // As an input, twice: each worker reads it (from itself or the other).
    let hashes: Vec<u64> = t
        .client
        .gather(&[
            t.client.submit(fnv1a, (&made,)),
            t.client.submit(fnv1a, (&made,)),
        ])
        .await
        .unwrap();
    assert_eq!(hashes, [want, want]);
    drop(made);
    drop(data);
    support::wait_until_freed(&t.config, Duration::from_secs(30)).await;
    t.stop().await;
}

/// A 1 GB `flotilla::Bytes` result reaches the client and another task.
#[tokio::test]
async fn a_1_gb_bytes_result_works_end_to_end() {
    let t = TestCluster::start("keep1g", 2).await;
    let len = 1 << 30;
    let made = t.client.submit(pattern, (len, 3u8));
    let value: flotilla::Bytes = made.result().await.expect("a 1 GB result");
    assert_eq!(value.len(), len);
    assert!(is_pattern(&value, 3), "the bytes arrived intact");
    drop(value);
    let checked = t.client.submit(check_pattern, (&made, 3u8));
    assert_eq!(checked.result().await.unwrap(), (len, true));
    assert!(stored_len(&t.config, made.key()).await < 512);
    drop(made);
    drop(checked);
    support::wait_until_freed(&t.config, Duration::from_secs(30)).await;
    t.stop().await;
}

/// With `FLOTILLA_SECRET` set, the record and the kept value are signed
/// for their key and the fetch request is sealed: a kept value reads back
/// as with Redis.
#[tokio::test]
async fn kept_values_are_signed_when_a_secret_is_set() {
    let mut config = support::fresh_config("keepsig");
    config.secret = Some(flotilla::Secret::new("kept-values-secret"));
    let t = TestCluster::start_with(config, 2, 1).await;
    let len = 3 << 20;
    let made = t.client.submit(pattern, (len, 5u8));
    let value: flotilla::Bytes = made.result().await.unwrap();
    assert!(value.len() == len && is_pattern(&value, 5));
    assert!(stored_len(&t.config, made.key()).await < 512);
    let checked = t.client.submit(check_pattern, (&made, 5u8));
    assert_eq!(checked.result().await.unwrap(), (len, true));
    drop((made, checked));
    t.stop().await;
}

/// With `--data-addr off` a worker keeps nothing: a large result goes to
/// Redis (in chunks: Redis holds a small manifest), and reads back whole.
#[tokio::test]
async fn a_worker_without_a_data_connection_writes_large_results_to_redis() {
    let p = Processes::start("keepoff", &[&["--data-addr", "off"]]).await;
    let len = 9 << 20;
    let made = p.client.submit(pattern, (len, 9u8));
    let value: flotilla::Bytes = made.result().await.unwrap();
    assert_eq!(value.as_ref(), pattern_local(len, 9).as_slice());
    assert!(stored_len(&p.config, made.key()).await < 512, "a manifest");
    let chunks: usize = redis::cmd("HLEN")
        .arg(p.config.names().chunks_key(made.key()))
        .query_async(&mut redis(&p.config).await)
        .await
        .unwrap();
    assert_eq!(chunks, 3);
    drop(made);
    p.stop().await;
}

/// With `--data-memory`, a worker keeps at most that many bytes of results:
/// the oldest beyond it are spilled to Redis (the value replaces the
/// location record), and every value still reads back byte-exact.
#[tokio::test]
async fn a_worker_over_its_data_memory_spills_its_oldest_values_to_redis() {
    let p = Processes::start("spill", &[&["--data-memory", "7M"]]).await;
    let len = 3 << 20;
    let mut made = Vec::new();
    for seed in 1..=4u8 {
        let future = p.client.submit(pattern, (len, seed));
        future.wait().await;
        made.push(future);
    }
    // 12 MiB kept, 7 MiB allowed: the two oldest go, within a few sweeps.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut lens = Vec::new();
        for future in &made {
            lens.push(stored_len(&p.config, future.key()).await);
        }
        let spilled = lens.iter().filter(|&&n| n >= len).count();
        if lens[0] >= len && lens[1] >= len && spilled == 2 {
            assert!(
                lens[2] < 512 && lens[3] < 512,
                "the newest stay kept: {lens:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not spilled: stored lengths {lens:?}\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (seed, future) in (1..=4u8).zip(&made) {
        let value: flotilla::Bytes = future.result().await.unwrap();
        assert_eq!(value.len(), len);
        assert!(is_pattern(&value, seed), "value {seed}");
    }
    drop(made);
    p.stop().await;
}

/// A worker stopped gracefully (SIGTERM, a scale-down) first hands the
/// values it keeps over to Redis: they outlive it.
#[tokio::test]
async fn a_gracefully_stopped_worker_hands_its_kept_values_to_redis() {
    let mut p = Processes::start("keepgo", &[&[]]).await;
    let small = 2 << 20;
    let large = 9 << 20;
    let made: Vec<_> = [small, large]
        .into_iter()
        .map(|len| p.client.submit(pattern, (len, 4u8)))
        .collect();
    for future in &made {
        future.wait().await;
        assert!(stored_len(&p.config, future.key()).await < 512, "kept");
    }
    let status = p.workers[0].terminate();
    assert!(status.success(), "{}", p.workers[0].log());
    assert!(
        p.workers[0]
            .log()
            .contains("kept values handed over to Redis"),
        "{}",
        p.workers[0].log()
    );
    for (future, len) in made.iter().zip([small, large]) {
        let value: flotilla::Bytes = future.result().await.expect("handed over");
        assert!(value.len() == len && is_pattern(&value, 4));
    }
    drop(made);
    p.stop().await;
}

/// The worker keeping a value is killed: reading it is a clear
/// `ValueLost` error naming the worker, at once, and a task taking it as
/// an input fails with a `flotilla::ValueLost` error instead of hanging.
#[tokio::test]
async fn a_value_whose_worker_died_is_a_clear_error_not_a_hang() {
    let mut p = Processes::start("keeplost", &[&[]]).await;
    let made = p.client.submit(pattern, (4usize << 20, 1u8));
    made.wait().await;
    assert_eq!(made.status(), flotilla::Status::Finished);
    // The delivery is acknowledged just after the event: killed before
    // that, the broker would hand the task to the next worker, which would
    // run it again and keep a new copy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.kill_workers();
    let started = Instant::now();
    match made.result().await {
        Err(Error::ValueLost { key, worker, .. }) => {
            assert_eq!(key, made.key());
            assert!(!worker.is_empty());
        }
        other => panic!("expected ValueLost, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    p.add_worker(&[]);
    let dependent = p.client.submit(check_pattern, (&made, 1u8));
    let error = tokio::time::timeout(Duration::from_secs(60), dependent.result())
        .await
        .expect("the dependent resolves")
        .expect_err("its input is lost");
    let task = error.task_error().expect("a task error");
    assert_eq!(task.type_name(), "flotilla::ValueLost", "{error}");
    assert!(task.message().contains(made.key()), "{error}");
    drop(made);
    p.stop().await;
}

/// The path of the file mapping of this process that holds `addr`, if it
/// lies in one (`/proc/self/maps`).
fn mapped_file(addr: *const u8) -> Option<String> {
    let addr = addr as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let (start, end) = (
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        );
        let path = fields.nth(4)?;
        (start <= addr && addr < end && path.starts_with('/')).then(|| path.to_owned())
    })
}

/// On one host a large result is not sent but mapped: the client's `Bytes`
/// is a mapping of the file the worker process encoded it into, under the
/// shared-memory directory (`FLOTILLA_SHM_DIR`, a private one here). The
/// file goes when the value is freed, and the worker's directory when it
/// stops. A client with shared memory off is sent the bytes.
#[tokio::test]
async fn a_large_result_on_the_same_host_is_mapped_from_shared_memory() {
    let root = std::env::temp_dir().join(format!("flotilla-shm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let mut config = support::fresh_config("shm");
    config.shm_dir = Some(root.clone());
    let p = Processes::start_with(config, &[&[]]).await;
    let len = 20 << 20;

    let made = p.client.submit(random_bytes, (len, 5u64));
    let value: flotilla::Bytes = made.result().await.expect("a 20 MiB result");
    assert!(value == random_bytes::call(len, 5), "byte-exact");
    let file = mapped_file(value.as_ptr()).expect("the result is a file mapping");
    assert!(
        file.starts_with(root.to_str().unwrap()) && file.contains("/flotilla-"),
        "mapped from {file}"
    );
    assert!(std::path::Path::new(&file).exists());
    // Freed: the worker drops it and the file goes (the mapping stays
    // readable while this Bytes lives).
    drop(made);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&file).exists() {
        assert!(Instant::now() < deadline, "{file} outlived its value");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(value == random_bytes::call(len, 5), "still readable");
    drop(value);

    // Shared memory off for this reader: the bytes, in its own memory.
    let mut off = p.config.clone();
    off.shm_dir = None;
    let sent_to = flotilla::Client::connect(off).await.unwrap();
    let value: flotilla::Bytes = sent_to.submit(random_bytes, (len, 6u64)).await.unwrap();
    assert!(value == random_bytes::call(len, 6), "byte-exact");
    assert_eq!(mapped_file(value.as_ptr()), None, "sent, not mapped");
    drop(value);
    sent_to.close().await.unwrap();

    p.stop().await;
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir(&root).unwrap();
}
