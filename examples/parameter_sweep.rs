//! Seed pattern "Parameter Sweep": submit a simulation for each of the
//! 10 × 10 × 10 = 1,000 parameter combinations and handle the results as
//! they complete, keeping the best.
//!
//! `cargo run --example parameter_sweep` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::seed_tasks::run_simulation;
use std::collections::HashMap;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;

    // Generate the parameter combinations.
    let params: Vec<(u32, u32, u32)> = (0..10)
        .flat_map(|p1| (0..10).flat_map(move |p2| (0..10).map(move |p3| (p1, p2, p3))))
        .collect();

    // Submit all combinations, remembering which key ran which parameters.
    let futures: Vec<_> = params
        .iter()
        .map(|&(p1, p2, p3)| client.submit(run_simulation, (p1, p2, p3)))
        .collect();
    let params_of: HashMap<String, (u32, u32, u32)> = futures
        .iter()
        .map(|f| f.key().to_owned())
        .zip(params.iter().copied())
        .collect();

    // Gather results as they complete.
    let mut handled = 0;
    let mut best: Option<(f64, (u32, u32, u32))> = None;
    let mut completed = as_completed(futures);
    while let Some(future) = completed.next().await {
        let result = future.result().await?;
        let (p1, p2, p3) = params_of[future.key()];
        // process_result: check it and keep the lowest remaining energy.
        let expected = run_simulation::call(p1, p2, p3);
        anyhow::ensure!(
            (result - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "run_simulation({p1}, {p2}, {p3}) = {result}, expected {expected}"
        );
        if best.is_none_or(|(energy, _)| result < energy) {
            best = Some((result, (p1, p2, p3)));
        }
        handled += 1;
    }
    let (energy, (p1, p2, p3)) = best.ok_or_else(|| anyhow::anyhow!("no results"))?;
    println!("handled {handled} simulations as they completed");
    println!("lowest energy {energy:.6} at run_simulation({p1}, {p2}, {p3})");
    anyhow::ensure!(handled == 1000, "expected 1000 results, got {handled}");
    Ok(())
}
