//! Tasks used by the seed's lifecycle examples: scattered data, side effects,
//! parameter sweeps, pipelines and iterative algorithms.
//!
//! Every task is deterministic, so an example can check a result the
//! cluster computed against the same function called in its own process
//! (`process::call(..)`, which `#[flotilla::task]` keeps for local calls).

use flotilla::TaskContext;
use serde_bytes::ByteBuf;

/// How many bytes of `data` equal `i` (mod 256): one bin of a histogram of
/// a large shared buffer — the seed's `process(large_dataset, i)`.
#[flotilla::task]
pub fn process(data: ByteBuf, i: u32) -> u64 {
    let value = (i % 256) as u8;
    data.iter().filter(|&&b| b == value).count() as u64
}

/// Number of Collatz steps from `x` down to 1 (0 for `x <= 1`): a small,
/// uneven amount of CPU work — the seed's `expensive_computation`.
#[flotilla::task]
pub fn expensive_computation(x: i64) -> i64 {
    let mut n = x;
    let mut steps = 0;
    while n > 1 {
        n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
        steps += 1;
    }
    steps
}

/// One independent item of an embarrassingly parallel job — the seed's
/// `process_item`, which runs `expensive_computation` on it.
#[flotilla::task]
pub fn process_item(item: i64) -> i64 {
    expensive_computation::call(item)
}

/// A damped oscillator `x'' = -k x - c x'` integrated with explicit Euler
/// from `x = amplitude`, for 200 steps of `dt = 0.01`; returns the energy
/// left. `k = 1 + p1`, `c = p2 / 10`, `amplitude = 1 + p3 / 10` — the seed's
/// `run_simulation(param1, param2, param3)`.
#[flotilla::task]
pub fn run_simulation(p1: u32, p2: u32, p3: u32) -> f64 {
    let k = 1.0 + f64::from(p1);
    let c = f64::from(p2) / 10.0;
    let (mut x, mut v) = (1.0 + f64::from(p3) / 10.0, 0.0);
    let dt = 0.01;
    for _ in 0..200 {
        let a = -k * x - c * v;
        x += v * dt;
        v += a * dt;
    }
    0.5 * (v * v + k * x * x)
}

/// "Loads" the file `part-<n>.csv`: the 100 numbers `100 n .. 100 n + 100`
/// (the number is the one in the name). Fails for a name without a number —
/// the seed's `load_data(file)`.
#[flotilla::task]
pub fn load_data(file: String) -> Result<Vec<i64>, String> {
    let digits: String = file.chars().filter(char::is_ascii_digit).collect();
    let part: i64 = digits
        .parse()
        .map_err(|_| format!("no part number in the file name {file:?}"))?;
    Ok((100 * part..100 * part + 100).collect())
}

/// Sum of squares of a loaded part — the pipeline's `process` stage.
#[flotilla::task]
pub fn process_stage(xs: Vec<i64>) -> i64 {
    xs.iter().map(|x| x * x).sum()
}

/// Sum of the processed parts — the seed's `aggregate`.
#[flotilla::task]
pub fn aggregate(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// One Newton step towards the square roots of `1, 2, ..., n`:
/// `state[i]` estimates `sqrt(i + 1)` — the seed's `update_function`.
#[flotilla::task]
pub fn update_function(state: Vec<f64>) -> Vec<f64> {
    state
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let target = (i + 1) as f64;
            0.5 * (x + target / x)
        })
        .collect()
}

/// Whether every `state[i]` squares to `i + 1` within a relative `1e-12` —
/// the seed's `check_convergence`.
#[flotilla::task]
pub fn check_convergence(state: Vec<f64>) -> bool {
    state.iter().enumerate().all(|(i, &x)| {
        let target = (i + 1) as f64;
        (x * x - target).abs() <= 1e-12 * target
    })
}

/// Appends `data` to the Redis list `<namespace>:demo:log`, the "database"
/// of the seed's fire-and-forget `log_to_database`: a side effect whose
/// result nobody reads.
#[flotilla::task]
pub async fn log_to_database(ctx: TaskContext, data: String) -> Result<(), redis::RedisError> {
    let key = demo_log_key(&ctx.config().namespace);
    let client = redis::Client::open(ctx.config().redis_url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    redis::cmd("RPUSH")
        .arg(&key)
        .arg(data)
        .query_async::<()>(&mut connection)
        .await
}

/// The Redis list [`log_to_database`] appends to in `namespace` (removed with
/// the namespace's other keys by `flotilla::purge`).
pub fn demo_log_key(namespace: &str) -> String {
    format!("{namespace}:demo:log")
}

/// Doubles a result that several tasks share — the seed's `use_result`.
#[flotilla::task]
pub fn use_result(x: i64) -> i64 {
    2 * x
}

/// First consumer of a kept result: `x + 1` — the seed's `process1`.
#[flotilla::task]
pub fn process1(x: i64) -> i64 {
    x + 1
}

/// Second consumer of a kept result: `x * 10` — the seed's `process2`.
#[flotilla::task]
pub fn process2(x: i64) -> i64 {
    x * 10
}
