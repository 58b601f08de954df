//! Seed section "Map Over Inputs": one task per input, gathered in order.
//!
//! `cargo run --example map_over_inputs` against a running cluster.

use flotilla_examples::square;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let futures = client.map(square, (0..100).map(|x| (x,)));
    let results = client.gather(&futures)?;
    println!(
        "squares of 0..100: first {:?}, last {:?}",
        &results[..5],
        results.last()
    );
    let expected: Vec<i64> = (0..100).map(|x| x * x).collect();
    anyhow::ensure!(results == expected, "wrong squares");
    Ok(())
}
