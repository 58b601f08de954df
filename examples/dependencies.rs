//! Seed section "Automatic Dependency Tracking": futures passed into tasks
//! make them wait for their inputs, in the cluster.
//!
//! `cargo run --example dependencies` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::add;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let future1 = client.submit(add, (1, 2));
    let future2 = client.submit(add, (&future1, 10)); // depends on future1
    let future3 = client.submit(add, (future2, 100)); // depends on future2 (moved in)
    let result = future3.await?;
    println!("add(add(add(1, 2), 10), 100) = {result}");
    anyhow::ensure!(result == 113, "expected 113");
    Ok(())
}
