//! Seed section "Map Over Inputs": one task per input, gathered in order.
//!
//! `cargo run --example map_over_inputs` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::square;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let futures = client.map(square, (0..100).map(|x| (x,)));
    let results = client.gather(&futures).await?;
    println!(
        "squares of 0..100: first {:?}, last {:?}",
        &results[..5],
        results.last()
    );
    let expected: Vec<i64> = (0..100).map(|x| x * x).collect();
    anyhow::ensure!(results == expected, "wrong squares");
    Ok(())
}
