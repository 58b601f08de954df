//! The example tasks of Flotilla's seed examples, shared by the example
//! programs (which submit them) and the demo `flotilla-worker` binary
//! (which registers and runs them).

use flotilla::{TaskContext, TaskContextExt};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `x + y` — the seed's `add`.
#[flotilla::task]
pub fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// `x + y` on unsigned numbers.
#[flotilla::task]
pub fn add_u64(x: u64, y: u64) -> u64 {
    x + y
}

/// `x + 1`, the benchmarks' no-op.
#[flotilla::task]
pub fn inc(x: i64) -> i64 {
    x + 1
}

/// `x²` — the seed's `square`.
#[flotilla::task]
pub fn square(x: i64) -> i64 {
    x * x
}

/// Fails for negative input — the seed's `might_fail`.
#[flotilla::task]
pub fn might_fail(x: i64) -> Result<i64, String> {
    if x < 0 {
        Err("Negative value".to_owned())
    } else {
        Ok(x * x)
    }
}

/// Sum of a list (futures of a list arrive as values).
#[flotilla::task]
pub fn total(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// Sleeps, then returns `x`: a task that takes a while.
#[flotilla::task]
pub async fn slow_identity(x: i64, millis: u64) -> i64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    x
}

/// Aborts its worker process, every time: a task that kills its worker
/// (the chaos suite's `WorkerLost` scenario). After
/// `FLOTILLA_ALLOWED_FAILURES` + 1 worker deaths its future errs
/// `WorkerLost`. Never submit it to a worker inside your own process.
#[flotilla::task]
pub fn crash_worker(tag: String) -> i64 {
    eprintln!("crash_worker({tag}): aborting the worker process");
    std::process::abort()
}

/// Panics with `message`.
#[flotilla::task]
pub fn explode(message: String) -> i64 {
    panic!("{message}")
}

/// A typed error that survives the trip back to the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ValidationError {
    /// The input was below the minimum.
    TooSmall {
        /// The input.
        value: i64,
        /// The minimum.
        min: i64,
    },
}

impl std::fmt::Display for ValidationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValidationError::TooSmall { value, min } => {
                write!(f, "{value} is below the minimum {min}")
            }
        }
    }
}

/// Checks that `x >= min`, failing with a serializable error.
#[flotilla::task]
pub fn validate(x: i64, min: i64) -> Result<i64, ValidationError> {
    if x < min {
        Err(ValidationError::TooSmall { value: x, min })
    } else {
        Ok(x)
    }
}

/// Returns the key and worker it ran under.
#[flotilla::task]
pub fn whoami(ctx: TaskContext) -> (String, String) {
    (ctx.key().to_owned(), ctx.worker_id().to_owned())
}

/// Returns `len` bytes (for payload and transfer tests).
#[flotilla::task]
pub fn make_bytes(len: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![7u8; len])
}

/// Length of a byte buffer.
#[flotilla::task]
pub fn byte_len(data: serde_bytes::ByteBuf) -> usize {
    data.len()
}

/// `len` pseudo-random bytes from `seed`, as a plain `Vec<u8>` (which travels
/// as MessagePack `bin`, without `serde_bytes`).
#[flotilla::task]
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap, and not compressible or all alike.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// `len` bytes as a [`flotilla::Bytes`], each byte its index's low 8 bits
/// xor `seed` (cheap to make and to check at gigabyte sizes).
#[flotilla::task]
pub fn pattern(len: usize, seed: u8) -> flotilla::Bytes {
    flotilla::Bytes::from(pattern_local(len, seed))
}

/// [`pattern`] without a cluster (built from copies of one 256-byte block,
/// so that a gigabyte is quick to make even unoptimized).
pub fn pattern_local(len: usize, seed: u8) -> Vec<u8> {
    let block = pattern_block(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let take = (len - out.len()).min(block.len());
        out.extend_from_slice(&block[..take]);
    }
    out
}

fn pattern_block(seed: u8) -> [u8; 256] {
    std::array::from_fn(|i| (i as u8) ^ seed)
}

/// The length of a [`flotilla::Bytes`] and whether it is [`pattern`]'s.
#[flotilla::task]
pub fn check_pattern(data: flotilla::Bytes, seed: u8) -> (usize, bool) {
    (data.len(), is_pattern(&data, seed))
}

/// Whether `data` is [`pattern`]'s bytes for `seed`.
pub fn is_pattern(data: &[u8], seed: u8) -> bool {
    let block = pattern_block(seed);
    data.chunks(256).all(|chunk| chunk == &block[..chunk.len()])
}

/// The FNV-1a hash of a plain `Vec<u8>`, to check bytes end to end.
#[flotilla::task]
pub fn fnv1a(data: Vec<u8>) -> u64 {
    fnv1a_local(&data)
}

/// [`fnv1a`] without a cluster, for comparing.
pub fn fnv1a_local(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `len` pseudo-random bytes from `seed`, made at close to memory speed:
/// the payload of the data-plane benchmarks (`flotilla-bench --only data`).
/// Unlike [`noise`] (one byte per step of one generator), four independent
/// xorshift64 generators fill 32 bytes per step, so making 100 MB costs
/// about as much as one copy of it and the benchmark measures moving the
/// bytes. Not compressible; a different `seed` gives other bytes (and a
/// new task key).
#[flotilla::task]
pub fn random_bytes(len: usize, seed: u64) -> flotilla::Bytes {
    fn step(lanes: &mut [u64; 4]) -> [u8; 32] {
        let mut block = [0u8; 32];
        for (state, word) in lanes.iter_mut().zip(block.chunks_exact_mut(8)) {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        block
    }
    let mut lanes = [1u64, 2, 3, 4].map(|lane| {
        (seed ^ lane.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1
    });
    let mut data = vec![0u8; len];
    let mut blocks = data.chunks_exact_mut(32);
    for block in &mut blocks {
        block.copy_from_slice(&step(&mut lanes));
    }
    let tail = blocks.into_remainder();
    let tail_len = tail.len();
    tail.copy_from_slice(&step(&mut lanes)[..tail_len]);
    flotilla::Bytes::from(data)
}

static BLOBS: std::sync::Mutex<Option<(usize, flotilla::Bytes)>> = std::sync::Mutex::new(None);

/// `len` random bytes kept by this process: the first call makes them
/// ([`random_bytes`]), later calls return the same buffer without a copy.
/// `nonce` only makes calls distinct (tasks are keyed by their arguments).
/// The payload of the data-plane benchmark rows, as the Dask and Ray
/// benchmarks' `blob`: they measure moving bytes, not making them. One
/// length is kept at a time; [`drop_blob`] forgets it.
#[flotilla::task]
pub fn blob(len: usize, nonce: u64) -> flotilla::Bytes {
    let _ = nonce;
    let mut kept = BLOBS.lock().unwrap_or_else(|p| p.into_inner());
    match &*kept {
        Some((kept_len, data)) if *kept_len == len => data.clone(),
        _ => {
            *kept = None; // the old one goes before the new one is made
            let data = random_bytes::call(len, len as u64);
            *kept = Some((len, data.clone()));
            data
        }
    }
}

/// Makes this process keep the [`blob`] of `len` bytes, and returns its
/// length (the bytes stay here: the benchmarks warm their workers with it).
/// `nonce` only makes calls distinct.
#[flotilla::task]
pub fn warm_blob(len: usize, nonce: u64) -> usize {
    blob::call(len, nonce).len()
}

/// Forgets the bytes [`blob`] keeps in this process; whether it kept any.
/// `nonce` only makes calls distinct.
#[flotilla::task]
pub fn drop_blob(nonce: u64) -> bool {
    let _ = nonce;
    BLOBS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .is_some()
}

/// The length of a [`flotilla::Bytes`]: reads a large input without copying
/// it (the argument shares the buffer the worker holds the input in).
#[flotilla::task]
pub fn bytes_len(data: flotilla::Bytes) -> usize {
    data.len()
}

static RUNS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn note_run(tag: &str) -> u64 {
    let mut runs = RUNS.lock().unwrap_or_else(|p| p.into_inner());
    runs.push(tag.to_owned());
    runs.iter().filter(|t| *t == tag).count() as u64
}

/// How many times tasks ran with `tag` in this process (for tests with
/// in-process workers).
pub fn runs_of(tag: &str) -> u64 {
    RUNS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|t| *t == tag)
        .count() as u64
}

/// The tags of the tasks that ran in this process, in the order they ran.
pub fn run_log() -> Vec<String> {
    RUNS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Notes that it ran under `tag` and returns how many times it did.
#[flotilla::task]
pub fn count_run(tag: String) -> u64 {
    note_run(&tag)
}

/// Notes that it ran under `tag` after `input` was ready; returns `input`.
#[flotilla::task]
pub fn count_run_after(tag: String, input: i64) -> i64 {
    note_run(&tag);
    input
}

/// Fails the first `failures` times it runs under `tag`, then succeeds.
#[flotilla::task]
pub fn flaky(tag: String, failures: u64) -> Result<u64, String> {
    let run = note_run(&tag);
    if run <= failures {
        Err(format!("failure {run} of {failures}"))
    } else {
        Ok(run)
    }
}

/// Spins until cancelled (checking `ctx.is_cancelled()`) or `millis` pass;
/// returns whether it saw the cancellation.
#[flotilla::task]
pub fn spin_until_cancelled(ctx: TaskContext, tag: String, millis: u64) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_millis(millis);
    while std::time::Instant::now() < deadline {
        if ctx.is_cancelled() {
            note_run(&format!("{tag}:cancelled"));
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    note_run(&format!("{tag}:completed"));
    false
}

/// Sleeps `millis`, then notes `tag`; an async task that can be aborted.
#[flotilla::task]
pub async fn sleep_then_note(tag: String, millis: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    note_run(&tag)
}

/// Counts a start under `counter` in Redis (`<namespace>:test:<counter>`),
/// sleeps `millis`, and returns the count at its start: how often tasks
/// under `counter` started, across processes (for tests of long tasks).
#[flotilla::task]
pub async fn counted_sleep(ctx: TaskContext, counter: String, millis: u64) -> Result<u64, String> {
    let config = ctx.config();
    let client = redis::Client::open(config.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let starts: u64 = redis::cmd("INCR")
        .arg(format!("{}:test:{counter}", config.namespace))
        .query_async(&mut redis)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(millis)).await;
    Ok(starts)
}

/// [`counted_sleep`]'s synchronous twin: counts a start under `counter`,
/// then sleeps `millis` on its blocking thread, which a time limit cannot
/// stop (for tests of workers that retire when such a thread is stuck).
#[flotilla::task]
pub fn counted_blocking_sleep(
    ctx: TaskContext,
    counter: String,
    millis: u64,
) -> Result<u64, String> {
    let config = ctx.config();
    let client = redis::Client::open(config.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut redis = client.get_connection().map_err(|e| e.to_string())?;
    let starts: u64 = redis::cmd("INCR")
        .arg(format!("{}:test:{counter}", config.namespace))
        .query(&mut redis)
        .map_err(|e| e.to_string())?;
    drop(redis);
    std::thread::sleep(Duration::from_millis(millis));
    Ok(starts)
}

/// The seed's "Dynamic Task Submission": split the data, recurse on the
/// cluster, combine. Each level waits on the next one's futures, giving its
/// slot back meanwhile, so any depth runs on any number of slots.
#[flotilla::task]
pub async fn recursive_compute(
    ctx: TaskContext,
    data: Vec<i64>,
    depth: u32,
) -> flotilla::Result<i64> {
    if depth == 0 || data.len() < 2 {
        return Ok(data.iter().sum());
    }
    let client = ctx.client().await?;
    let (left, right) = data.split_at(data.len() / 2);
    let left = client.submit(recursive_compute, (left.to_vec(), depth - 1));
    let right = client.submit(recursive_compute, (right.to_vec(), depth - 1));
    Ok(left.await? + right.await?)
}

/// Maps `double` over `0..n` from inside a task and sums the results.
#[flotilla::task]
pub async fn fan_out(ctx: TaskContext, n: i64) -> flotilla::Result<i64> {
    let client = ctx.client().await?;
    let parts = client.map(double, (0..n).map(|i| (i,)));
    Ok(client.gather(&parts).await?.iter().sum())
}

/// Receives a future by reference and awaits it inside the task.
#[flotilla::task]
pub async fn await_reference(
    ctx: TaskContext,
    input: flotilla::FutureRef<i64>,
) -> flotilla::Result<i64> {
    let client = ctx.client().await?;
    Ok(input.resolve(&client).await? + 1)
}

/// `2x`.
#[flotilla::task]
pub fn double(x: i64) -> i64 {
    2 * x
}

/// Sleeps `millis` and returns it; limited to 1 s unless the submission
/// says otherwise (`submit_with(..).timeout(..)`).
#[flotilla::task(timeout = "1s")]
pub async fn limited_sleep(millis: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    millis
}

/// Sleeps `millis` on its blocking thread (a synchronous task, which a time
/// limit cannot stop) and returns it.
#[flotilla::task]
pub fn blocking_sleep(millis: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    millis
}

/// The milliseconds left until the task's deadline as it starts (`None`
/// without a time limit).
#[flotilla::task(timeout = "1m")]
pub fn time_left(ctx: TaskContext) -> Option<u64> {
    ctx.time_left()
        .map(|left| u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
}

/// Sums `1..=n` slowly, one number every `step_ms`, and stops early with a
/// partial sum when less than `margin_ms` of its time limit is left: how a
/// task winds down on its own before the hard limit.
#[flotilla::task]
pub async fn patient_sum(ctx: TaskContext, n: u64, step_ms: u64, margin_ms: u64) -> (u64, bool) {
    let mut sum = 0;
    for i in 1..=n {
        if ctx
            .time_left()
            .is_some_and(|left| left < Duration::from_millis(margin_ms))
        {
            return (sum, false);
        }
        tokio::time::sleep(Duration::from_millis(step_ms)).await;
        sum += i;
    }
    (sum, true)
}

/// Makes sure this crate, and so its task registrations, is linked into a
/// binary that otherwise names none of its items (such as a test that only
/// starts in-process workers).
pub fn link() {}

pub mod actors;
pub mod coordination;
pub mod features;
pub mod large_values;

/// Tasks of the seed's lifecycle examples (scatter, fire-and-forget, sweeps, pipelines, iteration).
pub mod seed_tasks;

#[cfg(test)]
mod tests {
    use super::{blob, drop_blob, random_bytes, warm_blob};

    #[test]
    fn random_bytes_has_the_length_asked_for() {
        for len in [0, 1, 7, 31, 32, 33, 1000, 4097] {
            assert_eq!(random_bytes::call(len, 9).len(), len, "len {len}");
        }
    }

    #[test]
    fn blob_keeps_one_buffer_per_process_until_dropped() {
        assert_eq!(warm_blob::call(5000, 0), 5000);
        let first = blob::call(5000, 1);
        let again = blob::call(5000, 2);
        assert_eq!(first.len(), 5000);
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "the kept buffer, not a copy"
        );
        assert!(drop_blob::call(0));
        assert!(!drop_blob::call(1));
        let remade = blob::call(5000, 3);
        assert_eq!(remade, first, "the same bytes, made again");
        assert!(drop_blob::call(2));
    }

    #[test]
    fn random_bytes_looks_random() {
        let data = random_bytes::call(1 << 20, 1);
        // Every byte value about equally often: 4,096 expected, σ ≈ 64.
        let mut counts = [0usize; 256];
        for &byte in data.iter() {
            counts[usize::from(byte)] += 1;
        }
        for (value, &count) in counts.iter().enumerate() {
            assert!(
                (3_700..4_500).contains(&count),
                "byte {value}: {count} times"
            );
        }
        // No short period (the four generators differ), and the seed matters.
        assert_ne!(data[..32], data[32..64]);
        assert_ne!(data[..8], data[8..16]);
        assert_ne!(data[..4096], random_bytes::call(4096, 2)[..]);
        assert_eq!(data[..4096], random_bytes::call(4096, 1)[..]);
    }
}
