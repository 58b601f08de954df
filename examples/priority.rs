//! Priority: among the ready tasks the scheduler holds, a higher `priority`
//! goes to the workers first (`submit_with(..).priority(10)`; the default
//! is 0).
//!
//! The scheduler keeps up to 256 tasks per worker slot in flight (in the
//! broker or running) and holds the rest, ordered by priority. So here,
//! with one slot busy, 300 low-priority tasks are submitted, then 5
//! high-priority ones: the highs overtake the lows still held in the
//! scheduler, though not the 256 already sent.
//!
//! Starts its own one-slot `LocalCluster` (a namespace of its own, on the
//! brokers of `FLOTILLA_AMQP_URL` and `FLOTILLA_REDIS_URL`):
//! `cargo run --example priority`.

use flotilla::prelude::*;
use flotilla_examples::{features::finished_at, slow_identity};

const LOW: u32 = 300;
const IN_FLIGHT_PER_SLOT: usize = 256;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder()
        .namespace(format!("example-priority-{}", std::process::id()))
        .workers(1)
        .nthreads(1)
        .purge_on_shutdown(true)
        .start()
        .await?;
    let client = cluster.client().await?;

    // Keep the only slot busy while the others are submitted.
    let blocker = client.submit(slow_identity, (0, 1000));
    let low: Vec<_> = (0..LOW)
        .map(|i| {
            client
                .submit_with(finished_at, (i, 0))
                .priority(-1)
                .submit()
        })
        .collect();
    let high: Vec<_> = (LOW..LOW + 5)
        .map(|i| {
            client
                .submit_with(finished_at, (i, 0))
                .priority(10)
                .submit()
        })
        .collect();
    client.flush().await?;
    let low = client.gather(&low).await?;
    let high = client.gather(&high).await?;
    blocker.await?;

    let last_high = high.iter().copied().max().unwrap_or(0);
    let overtaken = low.iter().filter(|&&finished| finished > last_high).count();
    println!(
        "{overtaken} of {LOW} low-priority tasks, still held by the scheduler, ran after the 5 high-priority ones submitted after them"
    );
    anyhow::ensure!(
        overtaken >= LOW as usize - IN_FLIGHT_PER_SLOT,
        "the high-priority tasks should overtake every low-priority one the scheduler held"
    );

    drop(client);
    cluster.shutdown().await?;
    Ok(())
}
