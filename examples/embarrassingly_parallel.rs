//! Seed pattern "Embarrassingly Parallel Tasks": map an independent
//! computation over 1,000 items and gather the results.
//!
//! `cargo run --example embarrassingly_parallel` against a running cluster.

use flotilla_examples::seed_tasks::{expensive_computation, process_item};

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;

    // Process many items in parallel.
    let items = 0..1000_i64;
    let futures = client.map(process_item, items.clone().map(|item| (item,)));

    // Gather all results.
    let results = client.gather(&futures)?;
    let (longest, steps) = results
        .iter()
        .enumerate()
        .max_by_key(|&(_, steps)| steps)
        .map(|(item, &steps)| (item, steps))
        .unwrap_or_default();
    println!(
        "processed {} items; longest Collatz chain: {longest} with {steps} steps",
        results.len()
    );
    let expected: Vec<i64> = items.map(expensive_computation::call).collect();
    anyhow::ensure!(
        results == expected,
        "results differ from the local computation"
    );
    anyhow::ensure!(
        longest == 871 && steps == 178,
        "871 has the longest chain below 1000"
    );
    Ok(())
}
