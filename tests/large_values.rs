//! Values larger than any message: scattered data and task arguments of
//! tens of megabytes to a gigabyte, with the payload limit
//! (`FLOTILLA_MAX_PAYLOAD`) set far below them, so that every byte of them
//! must travel through Redis (in chunks) rather than in a message. Each test
//! checks the bytes a task saw, then that nothing is left in Redis once the
//! futures are gone: no result, holders set, spec or chunks hash.

mod support;

use flotilla_examples::large_values::{bytes_digest, digest, vec_digest};
use std::time::{Duration, Instant};
use support::TestCluster;

/// The payload limit of these clusters: far below the values.
const SMALL_PAYLOAD: usize = 8 << 20;

/// How long freeing everything may take once the futures are gone.
const FREED_WITHIN: Duration = Duration::from_secs(30);

async fn cluster(prefix: &str) -> TestCluster {
    flotilla_examples::link();
    let mut config = support::fresh_config(prefix);
    config.max_payload = SMALL_PAYLOAD;
    TestCluster::start_with(config, 1, 1).await
}

/// `len` bytes that differ from chunk to chunk (a 1 MiB + 7 block of
/// noise, repeated, each copy marked with its index), made quickly even in
/// a debug build.
fn data(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let block: Vec<u8> = (0..(1 << 20) + 7)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut out = Vec::with_capacity(len);
    let mut copy: u32 = 0;
    while out.len() < len {
        let at = out.len();
        let take = block.len().min(len - at);
        out.extend_from_slice(&block[..take]);
        let mark = copy.to_le_bytes();
        let marked = mark.len().min(take);
        out[at..at + marked].copy_from_slice(&mark[..marked]);
        copy += 1;
    }
    out
}

/// Waits until the namespace holds no task-life key and no chunks.
async fn assert_nothing_left(t: &TestCluster) {
    t.client.flush().await.unwrap();
    let took = support::wait_until_freed(&t.config, FREED_WITHIN).await;
    let started = Instant::now();
    loop {
        let chunks = support::count_keys(&t.config, "c").await;
        if chunks == 0 {
            break;
        }
        assert!(
            started.elapsed() < FREED_WITHIN,
            "{chunks} chunks hashes left after {FREED_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("freed within {took:?}");
}

/// A 50 MB `Vec<u8>` scatters (over the payload limit), a task reads all
/// of it, the client reads it back whole, and releasing it deletes its
/// chunks.
#[tokio::test]
async fn a_50_mb_vec_scatters_and_feeds_a_task() {
    let t = cluster("large-vec").await;
    let value = data(50_000_000);
    let expected = digest(&value);
    let started = Instant::now();
    let scattered = t.client.scatter(&value).await.unwrap();
    println!("50 MB scattered in {:?}", started.elapsed());
    let seen = t.client.submit(vec_digest, (&scattered,)).await.unwrap();
    assert_eq!(seen, expected, "the task saw other bytes");
    let started = Instant::now();
    let back: Vec<u8> = scattered.result().await.unwrap();
    println!("50 MB read back in {:?}", started.elapsed());
    assert!(back == value, "the value read back differs");
    drop((back, scattered));
    assert_nothing_left(&t).await;
    t.stop().await;
}

/// A 1 GB `bytes::Bytes` (over Redis' 512 MB string limit) scatters in
/// chunks and a task reads all of it.
#[tokio::test]
async fn a_1_gb_bytes_value_scatters_and_feeds_a_task() {
    let t = cluster("large-bytes").await;
    let value = bytes::Bytes::from(data(1 << 30));
    let expected = digest(&value);
    let started = Instant::now();
    let scattered = t.client.scatter(&value).await.unwrap();
    println!("1 GiB scattered in {:?}", started.elapsed());
    drop(value);
    let started = Instant::now();
    let seen = t.client.submit(bytes_digest, (&scattered,)).await.unwrap();
    println!("1 GiB read by a task in {:?}", started.elapsed());
    assert_eq!(seen, expected, "the task saw other bytes");
    drop(scattered);
    assert_nothing_left(&t).await;
    t.stop().await;
}

/// A 100 MB argument passed by value travels by reference (the client
/// scatters it): the task runs on all of it, and once it ran nothing is
/// left. The same large argument given to two tasks is stored once.
#[tokio::test]
async fn a_100_mb_argument_is_passed_by_reference() {
    let t = cluster("large-arg").await;
    let value = data(100_000_000);
    let expected = digest(&value);
    let started = Instant::now();
    let seen = t.client.submit(vec_digest, (value,)).await.unwrap();
    assert_eq!(seen, expected, "the task saw other bytes");
    println!("100 MB argument in {:?}", started.elapsed());
    assert_nothing_left(&t).await;

    // Over INLINE_ARG_MAX, given twice: two tasks, one stored value.
    let value = data(flotilla::INLINE_ARG_MAX + 1000);
    let expected = digest(&value);
    let first = t.client.submit(vec_digest, (value.clone(),));
    let again = t
        .client
        .submit_with(vec_digest, (value,))
        .key("again")
        .submit();
    t.client.flush().await.unwrap();
    assert_eq!(first.result().await.unwrap(), expected);
    assert_eq!(again.result().await.unwrap(), expected);
    // A small argument still travels inside the message.
    let small = t
        .client
        .submit(vec_digest, (vec![1u8, 2, 3],))
        .await
        .unwrap();
    assert_eq!(small, digest(&[1, 2, 3]));
    drop((first, again));
    assert_nothing_left(&t).await;
    t.stop().await;
}
