//! Seed section "Advanced Coordination", Queues: a `producer` task puts
//! ten numbers on a queue, a `consumer` task takes them.
//!
//! Run against a cluster: `cargo run --example queue_example`
//! (scheduler and `flotilla-worker` processes on `FLOTILLA_NAMESPACE`;
//! the two tasks need two task slots, since the consumer waits while the
//! producer runs).

use flotilla_examples::coordination::{consumer, producer};

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    // Dask's `Queue()` gets a fresh name; tasks open the queue by name.
    let queue: flotilla::sync::blocking::Queue<i64> =
        flotilla::sync::blocking::Queue::new(&client, &format!("numbers-{}", std::process::id()));

    // Unlike Dask's `client.submit(producer)`, the producer's future is kept:
    // a task whose last handle is dropped before it starts is cancelled.
    let _producer = client.submit(producer, (queue.name(), 10));
    let result_future = client.submit(consumer, (queue.name(), 10_usize));
    let results = result_future.result()?;
    println!("results = {results:?}");
    queue.delete()?;
    anyhow::ensure!(
        results == (0..10).collect::<Vec<i64>>(),
        "expected 0..10 in order, got {results:?}"
    );
    Ok(())
}
