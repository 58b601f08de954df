//! Tasks of the feature examples: retries, semaphores, priorities and
//! placement (`examples/{retries,semaphore_example,priority,worker_placement}.rs`).

use flotilla::{Semaphore, TaskContext, TaskContextExt};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Fails the first `failures` times it runs for `attempts` (counted in Redis
/// under `<namespace>:example:<attempts>`, so across worker processes), then
/// returns the number of the attempt that succeeded.
#[flotilla::task]
pub async fn fail_first(ctx: TaskContext, attempts: String, failures: u64) -> Result<u64, String> {
    let config = ctx.config();
    let client = redis::Client::open(config.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let key = format!("{}:example:{attempts}", config.namespace);
    let (attempt, _): (u64, bool) = redis::pipe()
        .atomic()
        .incr(&key, 1)
        .expire(&key, 600)
        .query_async(&mut redis)
        .await
        .map_err(|e| e.to_string())?;
    if attempt <= failures {
        Err(format!(
            "attempt {attempt} failed (the first {failures} do)"
        ))
    } else {
        Ok(attempt)
    }
}

/// Holds one of the `max_leases` permits of the semaphore `name` for
/// `millis`, and returns how many permits were taken meanwhile (never more
/// than `max_leases`).
#[flotilla::task]
pub async fn rate_limited(
    ctx: TaskContext,
    name: String,
    max_leases: u64,
    millis: u64,
) -> flotilla::Result<usize> {
    let semaphore = Semaphore::new(&ctx.client().await?, &name, max_leases);
    let permit = semaphore.permit().await?; // waits while all are taken
    tokio::time::sleep(Duration::from_millis(millis)).await;
    let in_use = semaphore.in_use().await?;
    permit.release().await?;
    Ok(in_use)
}

/// Sleeps `millis`, then returns the time (µs since the Unix epoch): when
/// it finished. `i` only tells tasks apart.
#[flotilla::task]
pub fn finished_at(i: u32, millis: u64) -> u64 {
    let _ = i;
    std::thread::sleep(Duration::from_millis(millis));
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Returns the time it started (ms since the Unix epoch); `tag` only tells
/// tasks apart. For `examples/retries.rs`' start times.
#[flotilla::task]
pub fn started_at(tag: String) -> u64 {
    let _ = tag;
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The trace the task runs in: its trace id and its submitter's span id
/// (both `None` when it was submitted outside a trace).
#[flotilla::task]
pub fn trace_of(ctx: TaskContext) -> (Option<String>, Option<String>) {
    (
        ctx.trace_id(),
        ctx.traceparent().map(|parent| parent.span_id_hex()),
    )
}

/// Its own [`trace_of`], then that of a task it submits: the second stays
/// in the same trace, under a span of this task's.
#[flotilla::task]
pub async fn nested_trace_of(
    ctx: TaskContext,
) -> flotilla::Result<[(Option<String>, Option<String>); 2]> {
    let own = (
        ctx.trace_id(),
        ctx.traceparent().map(|parent| parent.span_id_hex()),
    );
    let nested = ctx
        .client()
        .await?
        .submit_with(trace_of, ())
        .key(format!("{}-nested", ctx.key()))
        .submit()
        .await?;
    Ok([own, nested])
}
