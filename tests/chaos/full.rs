//! A full Redis (`maxmemory` reached, `noeviction`): results that cannot
//! be stored are bounded, reported failures (`StoreFailed`), never a re-run
//! loop; the ones that fit are delivered; a connected client's outbox gives
//! up and its caller gets the error. Scenarios `redis-full-one-big`,
//! `redis-full-many-small`, `redis-full-connected-client`.
//!
//! The workers write every result to Redis (`--data-addr off`): with their
//! data connection on, a large result stays in the worker that made it and
//! Redis gets only its location, so it would not fill.

use super::*;
use flotilla_examples::make_bytes;
use serde_bytes::ByteBuf;

/// Workers that write every result to Redis.
const REDIS_ONLY: &[&str] = &["--nthreads", "2", "--data-addr", "off"];

/// A private Redis with a `maxmemory` and `noeviction`.
async fn full_redis(maxmemory: &str) -> PrivateRedis {
    let maxmemory = maxmemory.to_owned();
    tokio::task::spawn_blocking(move || {
        PrivateRedis::start_with(&[
            "--appendonly",
            "no",
            "--maxmemory",
            &maxmemory,
            "--maxmemory-policy",
            "noeviction",
        ])
    })
    .await
    .unwrap()
}

/// Redis' `used_memory_dataset` (the data, without the buffers that a
/// refused 60 MB command leaves to shrink lazily) and `maxmemory`.
async fn memory(config: &Config) -> (u64, u64) {
    let client = redis::Client::open(config.redis_url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut redis)
        .await
        .unwrap();
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("used_memory_dataset"), field("maxmemory"))
}

/// Whether `result` is the `StoreFailed` error with Redis' reason.
fn store_failed<T>(result: &Result<T, Error>) -> bool {
    matches!(result, Err(Error::Task(error))
        if error.kind() == ErrorKind::StoreFailed && error.message().contains("OOM"))
}

#[tokio::test]
async fn chaos_redis_full_one_big_result_fails_store_failed_once() {
    let redis = full_redis("40mb").await;
    let mut config = support::fresh_config("chaos-full-big");
    config.redis_url = redis.url();
    let cluster = Processes::start_full(config, None, None, REDIS_ONLY).await;
    let started = Instant::now();
    let big = cluster.client.submit(make_bytes, (60_000_000usize,));
    let small = cluster.client.submit(inc, (41,));
    let outcome = big.result_timeout(Duration::from_secs(60)).await;
    let slowest = started.elapsed().as_secs_f64();
    let small = small.result_timeout(Duration::from_secs(30)).await;
    // Redis' memory figure is read until it is back within the limit, for
    // at most 10 s: on a loaded machine it once lagged the error (a value
    // still held means it never comes back, and the assertion below fails).
    let within = Instant::now() + Duration::from_secs(10);
    let (used, max) = loop {
        let (used, max) = memory(&cluster.config).await;
        if used <= max || Instant::now() >= within {
            break (used, max);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The big result's key, not a count: the start-up's warm-up result may
    // not be released yet on a loaded machine.
    let mut connection = redis::Client::open(cluster.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The refused value is gone; the StoreFailed error itself is stored at
    // its key when Redis takes it (it may or may not, depending on how soon
    // Redis frees the refused command's buffers), so a record there must be
    // an error (its last byte is the tag), and no chunk may be left.
    let names = cluster.config.names();
    let record: Option<Vec<u8>> = redis::cmd("GET")
        .arg(names.result_key(big.key()))
        .query_async(&mut connection)
        .await
        .unwrap();
    let chunks: bool = redis::cmd("EXISTS")
        .arg(names.chunks_key(big.key()))
        .query_async(&mut connection)
        .await
        .unwrap();
    let kept = chunks
        || record
            .as_ref()
            .is_some_and(|r| r.last() != Some(&flotilla_proto::TAG_ERR));
    let failed = store_failed(&outcome);
    let unresolved = usize::from(matches!(outcome, Err(Error::Timeout { .. })));
    let config = cluster.config.clone();
    drop(big);
    let duplicated = cluster.close().await;
    println!(
        "chaos redis-full-one-big: faults=1 tasks=2 lost={} duplicated={duplicated} unresolved={unresolved} max_resolve_s={slowest:.2} used_memory_dataset={used} maxmemory={max}",
        usize::from(failed)
    );
    drop((config, redis));
    assert!(failed, "the big result errs StoreFailed: {outcome:?}");
    assert_eq!(small.unwrap(), 42, "other work goes on");
    assert!(
        used <= max,
        "the refused value was rolled back: {used} > {max}"
    );
    assert!(!kept, "the big result is not stored");
    assert_eq!(duplicated, 0, "the task did not run again");
}

#[tokio::test]
async fn chaos_redis_full_many_small_results_deliver_those_that_fit() {
    let redis = full_redis("48mb").await;
    let mut config = support::fresh_config("chaos-full-many");
    config.redis_url = redis.url();
    let cluster = Processes::start_full(config, None, None, REDIS_ONLY).await;
    let n = 100;
    let len = 1 << 20;
    let started = Instant::now();
    // Lengths differ: equal pure submissions would share one result.
    let futures: Vec<TaskFuture<ByteBuf>> = (0..n)
        .map(|i| cluster.client.submit(make_bytes, (len + i,)))
        .collect();
    cluster.client.flush().await.unwrap();
    let (mut delivered, mut failed, mut unresolved, mut wrong) = (0, 0, 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut slowest: f64 = 0.0;
    for (i, future) in futures.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = future
            .result_timeout(left.max(Duration::from_millis(1)))
            .await;
        slowest = slowest.max(started.elapsed().as_secs_f64());
        match &outcome {
            Ok(bytes) if bytes.len() == len + i => delivered += 1,
            Err(Error::Timeout { .. }) => unresolved += 1,
            other if store_failed(other) => failed += 1,
            other => wrong.push(format!("{i}: {:?}", other.as_ref().map(|b| b.len()))),
        }
    }
    drop(futures);
    let duplicated = cluster.close().await;
    println!(
        "chaos redis-full-many-small: faults={failed} tasks={n} lost={failed} duplicated={duplicated} unresolved={unresolved} max_resolve_s={slowest:.2} delivered={delivered}"
    );
    drop(redis);
    assert_eq!(unresolved, 0);
    assert!(wrong.is_empty(), "{wrong:?}");
    assert!(
        delivered >= 20,
        "the results that fit are delivered: {delivered}"
    );
    assert!(failed > 0, "some did not fit");
}

#[tokio::test]
async fn chaos_redis_full_a_connected_client_gets_the_error() {
    let redis = full_redis("8mb").await;
    let mut config = support::fresh_config("chaos-full-client");
    config.redis_url = redis.url();
    let cluster = Processes::start_full(config, None, None, REDIS_ONLY).await;
    // Fill Redis with values of someone else's, then lower its limit below
    // what it holds: it stays full, whatever buffers it frees meanwhile.
    let mut admin = {
        let client = redis::Client::open(cluster.config.redis_url.as_str()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    };
    for i in 0..8 {
        let _: () = redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(vec![1u8; 256 << 10])
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1mb")
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = Instant::now();
    let futures: Vec<TaskFuture<i64>> = (0..10)
        .map(|i| cluster.client.submit(inc, (10_000 + i,)))
        .collect();
    let flushed = tokio::time::timeout(Duration::from_secs(60), cluster.client.flush()).await;
    let flush_s = started.elapsed().as_secs_f64();
    let mut failed = 0;
    let mut unresolved = 0;
    for future in &futures {
        match future.result_timeout(Duration::from_secs(10)).await {
            Err(Error::Redis(_)) => failed += 1,
            Err(Error::Timeout { .. }) => unresolved += 1,
            other => panic!("a submission Redis refused: {other:?}"),
        }
    }
    let slowest = started.elapsed().as_secs_f64();
    drop(futures);
    let _: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut admin).await;
    let duplicated = cluster.close().await;
    println!(
        "chaos redis-full-connected-client: faults=1 tasks=10 lost={failed} duplicated={duplicated} unresolved={unresolved} max_resolve_s={slowest:.2} flush_s={flush_s:.2}"
    );
    drop(redis);
    assert!(
        matches!(flushed, Ok(Err(Error::Redis(_)))),
        "flush() returns the error: {flushed:?}"
    );
    assert_eq!((failed, unresolved), (10, 0));
}
