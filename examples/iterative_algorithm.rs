//! Seed pattern "Iterative Algorithm": scatter an initial state, then submit
//! one update per iteration — each depending on the last — and stop as soon
//! as a convergence check says so. Here: Newton's method for the square
//! roots of 1..=100, all at once.
//!
//! `cargo run --example iterative_algorithm` against a running cluster.

use flotilla_examples::seed_tasks::{check_convergence, update_function};

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let initial_state = vec![1.0_f64; 100];
    let num_iterations = 50;

    // Initialize.
    let mut state = client.scatter(&initial_state)?;

    // Iterate.
    let mut iterations = 0;
    let mut converged_at = None;
    for iteration in 0..num_iterations {
        // Compute the update from the current state (the new future
        // replaces the old, whose data may then be deleted).
        state = client.submit(update_function, (&state,));
        iterations = iteration + 1;

        // Check convergence.
        let converged = client.submit(check_convergence, (&state,));
        if converged.result()? {
            converged_at = Some(iterations);
            break;
        }
    }

    // Get the final state.
    let final_state = state.result()?;
    println!(
        "converged after {iterations} iterations: sqrt(2) ~ {:.12}, sqrt(100) ~ {:.12}",
        final_state[1], final_state[99]
    );
    anyhow::ensure!(
        converged_at.is_some(),
        "no convergence in {num_iterations} iterations"
    );
    for (i, x) in final_state.iter().enumerate() {
        let exact = ((i + 1) as f64).sqrt();
        anyhow::ensure!((x - exact).abs() < 1e-9, "sqrt({}) came out {x}", i + 1);
    }
    Ok(())
}
