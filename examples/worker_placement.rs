//! Placement: `submit_with(..).workers([..])` runs a task only on the named
//! workers (ids or `--name`s); `.resources([("GPU", 1)])` only on workers
//! that offer the resource (`flotilla-worker --resources GPU=1`), while
//! enough of it is free.
//!
//! Starts its own `LocalCluster` (a namespace of its own, on the brokers of
//! `FLOTILLA_AMQP_URL` and `FLOTILLA_REDIS_URL`) with two plain workers and
//! one that offers a GPU: `cargo run --example worker_placement`.

use flotilla::prelude::*;
use flotilla_examples::whoami;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cluster = LocalCluster::builder()
        .namespace(format!("example-placement-{}", std::process::id()))
        .workers(2)
        .purge_on_shutdown(true)
        .start()
        .await?;
    let gpu_worker = cluster.add_worker_with_resources(&[("GPU", 1)]).await?;
    let client = cluster.client().await?;

    // Pinned to one worker.
    let chosen = cluster.worker_ids()[0].clone();
    let pinned: Vec<_> = (0..6)
        .map(|i| {
            client
                .submit_with(whoami, ())
                .key(format!("pinned-{i}"))
                .workers([chosen.clone()])
                .submit()
        })
        .collect();
    let ran_on: Vec<String> = client
        .gather(&pinned)
        .await?
        .into_iter()
        .map(|(_, w)| w)
        .collect();
    println!("6 tasks pinned to {chosen}: ran on {ran_on:?}");
    anyhow::ensure!(
        ran_on.iter().all(|w| *w == chosen),
        "pinned tasks ran elsewhere"
    );

    // Needing a GPU: only the worker that offers one runs them.
    let on_gpu: Vec<_> = (0..4)
        .map(|i| {
            client
                .submit_with(whoami, ())
                .key(format!("gpu-{i}"))
                .resources([("GPU", 1)])
                .submit()
        })
        .collect();
    let ran_on: Vec<String> = client
        .gather(&on_gpu)
        .await?
        .into_iter()
        .map(|(_, w)| w)
        .collect();
    println!(
        "4 tasks needing a GPU ran on the GPU worker: {}",
        ran_on.iter().all(|w| *w == gpu_worker)
    );
    anyhow::ensure!(
        ran_on.iter().all(|w| *w == gpu_worker),
        "GPU tasks ran elsewhere"
    );

    drop(client);
    cluster.shutdown().await?;
    Ok(())
}
