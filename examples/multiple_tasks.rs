//! Seed section "Multiple Tasks": submit independent tasks, gather them.
//!
//! `cargo run --example multiple_tasks` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::add;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let futures: Vec<_> = (0..10).map(|i| client.submit(add, (i, i))).collect();
    let results = client.gather(&futures).await?; // one Redis round trip
    println!("results = {results:?}");
    let expected: Vec<i64> = (0..10).map(|i| i + i).collect();
    anyhow::ensure!(results == expected, "expected {expected:?}");
    Ok(())
}
