//! Seed pattern "Pipeline with Dependencies": load ten files, process each
//! loaded part, aggregate the processed parts — every stage submitted at
//! once, each task starting as soon as its inputs are done.
//!
//! `cargo run --example pipeline` against a running cluster.

use flotilla_examples::seed_tasks::{aggregate, load_data, process_stage};

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let files: Vec<String> = (0..10).map(|n| format!("part-{n}.csv")).collect();

    // Stage 1: load the data.
    let load_futures: Vec<_> = files
        .iter()
        .map(|file| client.submit(load_data, (file.clone(),)))
        .collect();

    // Stage 2: process (depends on stage 1).
    let process_futures: Vec<_> = load_futures
        .iter()
        .map(|f| client.submit(process_stage, (f,)))
        .collect();

    // Stage 3: aggregate (depends on stage 2; the list of futures arrives
    // as the list of their values).
    let agg_future = client.submit(aggregate, (&process_futures,));

    // Get the final result.
    let result = agg_future.result()?;
    println!(
        "aggregate of {} files = {result} (sum of squares of 0..1000)",
        files.len()
    );
    let expected: i64 = (0..1000_i64).map(|x| x * x).sum();
    anyhow::ensure!(result == expected, "expected {expected}");
    Ok(())
}
