//! `LocalCluster`: a scheduler and workers inside this process, for tests
//! and quick starts — only RabbitMQ and Redis need to run. The workers
//! serve every task linked into this program.
//!
//! `cargo run --example local_cluster` (brokers from `FLOTILLA_AMQP_URL`
//! and `FLOTILLA_REDIS_URL`; a namespace of its own, deleted at the end).

use flotilla::prelude::*;
use flotilla_examples::{add, total};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder()
        .namespace(format!("example-local-{}", std::process::id()))
        .workers(2)
        .nthreads(2)
        .purge_on_shutdown(true) // delete the namespace's queues and keys
        .start()
        .await?;
    let client = cluster.client().await?;
    let parts = client.map(add, (0..100).map(|i| (i, 1)));
    let sum = client.submit(total, (parts,)).await?;
    println!(
        "sum of 1..=100 on a local cluster of {} workers = {sum}",
        cluster.worker_ids().len()
    );
    anyhow::ensure!(sum == 5050, "expected 5050");
    drop(client);
    cluster.shutdown().await?;
    Ok(())
}
