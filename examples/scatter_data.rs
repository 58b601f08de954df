//! Seed sections "Scatter Data" and "Efficient Gathering": upload a 1 MiB
//! buffer to the cluster once, have 100 tasks read it, and collect their
//! results with one `gather` rather than one `result()` at a time.
//!
//! `cargo run --example scatter_data` against a running cluster.

use flotilla_examples::seed_tasks::process;
use serde_bytes::ByteBuf;
use std::time::Instant;

/// 1 MiB of pseudo-random bytes (a fixed linear congruential sequence).
fn big_data() -> ByteBuf {
    let mut state: u32 = 12345;
    let bytes: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (state >> 16) as u8
        })
        .collect();
    ByteBuf::from(bytes)
}

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let big_data = big_data();

    // Upload data to the cluster once; the future stands for it.
    let large_dataset = client.scatter(&big_data)?;
    println!(
        "scattered {} bytes as {}",
        big_data.len(),
        large_dataset.key()
    );

    // Use the scattered data in many tasks: each task's message carries the
    // key, not the megabyte.
    let futures: Vec<_> = (0..100)
        .map(|i| client.submit(process, (&large_dataset, i)))
        .collect();

    // Better: gather all at once.
    let started = Instant::now();
    let results = client.gather(&futures)?;
    let gathered_in = started.elapsed();
    // Worse: one result at a time (here the values are already in, so it
    // costs little; with results still being computed it waits in turn).
    let started = Instant::now();
    let sequential = futures
        .iter()
        .map(|f| f.result())
        .collect::<Result<Vec<u64>, _>>()?;
    let sequential_in = started.elapsed();
    println!("gather: {gathered_in:?}, one by one: {sequential_in:?}");

    let expected: Vec<u64> = (0..100)
        .map(|i| process::call(big_data.clone(), i))
        .collect();
    println!(
        "gathered {} results, histogram of bytes 0..100 sums to {}",
        results.len(),
        results.iter().sum::<u64>()
    );
    anyhow::ensure!(
        results == expected,
        "the cluster's histogram differs from the local one"
    );
    anyhow::ensure!(
        sequential == results,
        "one-by-one results differ from gather's"
    );
    Ok(())
}
