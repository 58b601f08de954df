//! Seed section "Dynamic Task Submission": a task that splits its data,
//! submits itself on each half from inside the cluster, and combines the
//! results — depth 5, on any number of worker slots.
//!
//! `cargo run --example dynamic_submission` against a running cluster.

use flotilla_examples::recursive_compute;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let initial_data: Vec<i64> = (1..=1_000).collect();
    let result_future = client.submit(recursive_compute, (initial_data.clone(), 5));
    let result = result_future.result()?;
    println!("recursive_compute(1..=1000, depth 5) = {result}");
    anyhow::ensure!(result == initial_data.iter().sum::<i64>(), "wrong sum");
    Ok(())
}
