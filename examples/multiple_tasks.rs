//! Seed section "Multiple Tasks": submit independent tasks, gather them.
//!
//! `cargo run --example multiple_tasks` against a running cluster.

use flotilla_examples::add;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let futures: Vec<_> = (0..10).map(|i| client.submit(add, (i, i))).collect();
    let results = client.gather(&futures)?;
    println!("results = {results:?}");
    let expected: Vec<i64> = (0..10).map(|i| i + i).collect();
    anyhow::ensure!(results == expected, "expected {expected:?}");
    Ok(())
}
