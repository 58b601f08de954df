//! Example tasks that coordinate through Flotilla's distributed primitives
//! (the seed's Queue, Lock, Event and Variable examples).
//!
//! Python captures the `Queue()` or `Lock()` object in the closure it ships;
//! here a task takes the primitive's *name* and opens its own handle on it
//! with the worker's client.

use flotilla::prelude::*;

/// Puts `0..n` on the queue `queue` — the seed's `producer`.
#[flotilla::task]
pub async fn producer(ctx: TaskContext, queue: String, n: i64) -> flotilla::Result<()> {
    let queue = Queue::new(&ctx.client().await?, &queue);
    for i in 0..n {
        queue.put(&i).await?;
    }
    Ok(())
}

/// Takes `n` items from the queue `queue`, waiting for each — the seed's
/// `consumer`.
#[flotilla::task]
pub async fn consumer(ctx: TaskContext, queue: String, n: usize) -> flotilla::Result<Vec<i64>> {
    let queue = Queue::new(&ctx.client().await?, &queue);
    let mut results = Vec::with_capacity(n);
    for _ in 0..n {
        results.push(queue.get().await?);
    }
    Ok(results)
}

/// Takes items from the queue `queue`, up to `batch` at a time, until it
/// meets a `None` (the end marker, of which it puts back any extra it took);
/// returns the items in the order taken.
#[flotilla::task]
pub async fn drain(ctx: TaskContext, queue: String, batch: usize) -> flotilla::Result<Vec<u64>> {
    let queue: Queue<Option<u64>> = Queue::new(&ctx.client().await?, &queue);
    let mut items = Vec::new();
    loop {
        let mut ends = 0;
        for item in queue.get_batch(batch).await? {
            match item {
                Some(item) => items.push(item),
                None => ends += 1,
            }
        }
        if ends > 0 {
            for _ in 1..ends {
                queue.put(&None).await?;
            }
            return Ok(items);
        }
    }
}

/// One read-modify-write of the counter `counter` (a `Variable<u64>`)
/// under the lock `lock` — the seed's `critical_section`, whose
/// `shared_resource.update()` is the increment. Returns the value written
/// and the grant's fencing token. `call` only tells calls apart: identical
/// calls would be one task (Dask's `pure=True`).
#[flotilla::task]
pub async fn critical_section(
    ctx: TaskContext,
    lock: String,
    counter: String,
    call: u32,
) -> flotilla::Result<(u64, u64)> {
    let _ = call;
    let client = ctx.client().await?;
    let lock = Lock::new(&client, &lock);
    let counter = Variable::new(&client, &counter);
    let guard = lock.lock().await?; // only one task at a time past here
    let value = increment(&counter).await?;
    let token = guard.fencing_token();
    guard.release().await?;
    Ok((value, token))
}

/// `times` read-modify-write increments of the counter `counter`, each
/// under the lock `lock` (lease `lease_ms`). Returns the worker it ran on,
/// and each value written with the fencing token it was written under.
#[flotilla::task]
pub async fn locked_increments(
    ctx: TaskContext,
    lock: String,
    counter: String,
    times: u32,
    lease_ms: u64,
) -> flotilla::Result<(String, Vec<(u64, u64)>)> {
    let client = ctx.client().await?;
    let lock = Lock::new(&client, &lock).with_lease(Duration::from_millis(lease_ms));
    let counter = Variable::new(&client, &counter);
    let mut written = Vec::with_capacity(times as usize);
    for _ in 0..times {
        let guard = lock.lock().await?;
        let value = increment(&counter).await?;
        written.push((value, guard.fencing_token()));
        guard.release().await?;
    }
    Ok((ctx.worker_id().to_owned(), written))
}

/// `times` read-modify-write increments of the counter `counter` with no
/// lock: concurrent runs lose updates (the contrast to
/// [`locked_increments`]).
#[flotilla::task]
pub async fn unlocked_increments(
    ctx: TaskContext,
    counter: String,
    times: u32,
) -> flotilla::Result<()> {
    let counter = Variable::new(&ctx.client().await?, &counter);
    for _ in 0..times {
        increment(&counter).await?;
    }
    Ok(())
}

/// Reads the counter, yields (so that racing tasks interleave), writes it
/// plus one; returns the value written.
async fn increment(counter: &Variable<u64>) -> flotilla::Result<u64> {
    let value = counter.try_get().await?.unwrap_or(0) + 1;
    tokio::task::yield_now().await;
    counter.set(&value).await?;
    Ok(value)
}

/// Waits until the event `event` is set — the seed's `waiter`.
#[flotilla::task]
pub async fn waiter(ctx: TaskContext, event: String) -> flotilla::Result<String> {
    Event::new(&ctx.client().await?, &event).wait().await?;
    Ok("Event occurred".to_owned())
}

/// Sleeps `millis`, then sets the event `event` — the seed's `setter`.
#[flotilla::task]
pub async fn setter(ctx: TaskContext, event: String, millis: u64) -> flotilla::Result<()> {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    Event::new(&ctx.client().await?, &event).set().await
}

/// Returns the value of the variable `var`, waiting until it is set — the
/// seed's `reader`.
#[flotilla::task]
pub async fn reader(ctx: TaskContext, var: String) -> flotilla::Result<i64> {
    Variable::new(&ctx.client().await?, &var).get().await
}

/// A queue item that carries several futures at once (Dask allows a single
/// future per item).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct FutureBatch {
    /// Tells batches apart.
    pub id: u64,
    /// Futures of the batch's parts.
    pub parts: Vec<TaskFuture<i64>>,
    /// A future of their total.
    pub total: TaskFuture<i64>,
}

/// Takes `n` futures off the queue `queue` and returns their values, as
/// `(key, value)`: the futures arrive as futures of the task's own client.
#[flotilla::task]
pub async fn take_futures(
    ctx: TaskContext,
    queue: String,
    n: usize,
) -> flotilla::Result<Vec<(String, i64)>> {
    let queue: Queue<TaskFuture<i64>> = Queue::new(&ctx.client().await?, &queue);
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let future = queue.get().await?;
        values.push((future.key().to_owned(), future.await?));
    }
    Ok(values)
}

/// Takes `n` [`FutureBatch`]es off the queue `queue`; returns each batch's
/// id, its parts' values and its total.
#[flotilla::task]
pub async fn take_batches(
    ctx: TaskContext,
    queue: String,
    n: usize,
) -> flotilla::Result<Vec<(u64, Vec<i64>, i64)>> {
    let client = ctx.client().await?;
    let queue: Queue<FutureBatch> = Queue::new(&client, &queue);
    let mut batches = Vec::with_capacity(n);
    for _ in 0..n {
        let batch = queue.get().await?;
        let parts = client.gather(&batch.parts).await?;
        batches.push((batch.id, parts, batch.total.await?));
    }
    Ok(batches)
}

/// Awaits the future held by the variable `var` (a `Variable<TaskFuture<i64>>`).
#[flotilla::task]
pub async fn await_variable(ctx: TaskContext, var: String) -> flotilla::Result<i64> {
    let var: Variable<TaskFuture<i64>> = Variable::new(&ctx.client().await?, &var);
    var.get().await?.await
}

/// `x * x`, after `millis` milliseconds.
#[flotilla::task]
pub async fn slow_square(x: i64, millis: u64) -> i64 {
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
    x * x
}

/// The sum of `xs`.
#[flotilla::task]
pub fn sum(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// Submits `slow_square(i)` for `i` in `from..from + n` and puts each
/// future on the queue `queue`; returns their keys. The task's own handles
/// go when it ends: the queue holds the results from then on.
#[flotilla::task]
pub async fn put_squares(
    ctx: TaskContext,
    queue: String,
    from: i64,
    n: i64,
) -> flotilla::Result<Vec<String>> {
    let client = ctx.client().await?;
    let queue: Queue<TaskFuture<i64>> = Queue::new(&client, &queue);
    let futures = client.map(slow_square, (from..from + n).map(|i| (i, 10_u64)));
    queue.put_all(&futures).await?;
    Ok(futures.iter().map(|f| f.key().to_owned()).collect())
}
