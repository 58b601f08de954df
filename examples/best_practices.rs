//! Seed section "Best Practices", the five in order: pre-scatter large data,
//! gather in bulk, manage memory with references, handle errors, and
//! process results progressively with `as_completed`.
//!
//! `cargo run --example best_practices` against a running cluster.

use flotilla::Error;
use flotilla_examples::might_fail;
use flotilla_examples::seed_tasks::{expensive_computation, process, process_item, use_result};
use serde_bytes::ByteBuf;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;

    // 1. Pre-scatter large data: upload once, use many times.
    let big_dataset = ByteBuf::from(
        (0..256 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let large_data = client.scatter(&big_dataset)?;
    let futures: Vec<_> = (0..100)
        .map(|i| client.submit(process, (&large_data, i)))
        .collect();
    println!(
        "1. pre-scattered {} bytes once, submitted {} tasks on it",
        big_dataset.len(),
        futures.len()
    );

    // 2. Use gather for bulk retrieval (rather than one result() per future).
    let results = client.gather(&futures)?;
    let expected: Vec<u64> = (0..100)
        .map(|i| process::call(big_dataset.clone(), i))
        .collect();
    println!("2. gathered {} results in one call", results.len());
    anyhow::ensure!(results == expected, "wrong histogram");

    // 3. Manage memory with references: keep important futures, use them
    // several times, drop them when done.
    let important = client.submit(expensive_computation, (97,));
    let f1 = client.submit(use_result, (&important,));
    let f2 = client.submit(use_result, (&important,));
    // The same function on the same input is the same task, run once.
    let (r1, r2) = (f1.result()?, f2.result()?);
    println!(
        "3. use_result twice on expensive_computation(97): {r1}, {r2} (one task: {})",
        f1.key() == f2.key()
    );
    anyhow::ensure!(r1 == 236 && r2 == 236, "expected 2 × 118 twice");
    drop(important); // clean up when done: the cluster may delete the data

    // 4. Handle errors appropriately: a failed task is yielded like any
    // other, its error comes out of result().
    let inputs = -3..7_i64;
    let futures = client.map(might_fail, inputs.map(|x| (x,)));
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for future in client.as_completed(futures) {
        match future.result() {
            Ok(value) => results.push(value),
            Err(Error::Task(e)) => errors.push(e),
            Err(other) => return Err(other.into()),
        }
    }
    results.sort_unstable();
    println!(
        "4. might_fail over -3..7: {} results {results:?}, {} errors ({:?})",
        results.len(),
        errors.len(),
        errors.first().map(|e| e.message())
    );
    anyhow::ensure!(
        results == [0, 1, 4, 9, 16, 25, 36] && errors.len() == 3,
        "expected 7 results and 3 errors"
    );
    anyhow::ensure!(
        errors.iter().all(|e| e.message() == "Negative value"),
        "every error is might_fail's"
    );

    // 5. Use as_completed for progressive processing.
    let items = 1..=100_i64;
    let futures = client.map(process_item, items.clone().map(|item| (item,)));
    let mut handled = 0;
    let mut total_steps = 0;
    for future in client.as_completed(futures) {
        total_steps += future.result()?; // handle_result
        handled += 1;
    }
    let expected: i64 = items.map(expensive_computation::call).sum();
    println!("5. handled {handled} results as they arrived: {total_steps} Collatz steps in all");
    anyhow::ensure!(
        handled == 100 && total_steps == expected,
        "expected {expected}"
    );
    Ok(())
}
