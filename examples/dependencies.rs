//! Seed section "Automatic Dependency Tracking": futures passed into tasks
//! make them wait for their inputs, in the cluster.
//!
//! `cargo run --example dependencies` against a running cluster.

use flotilla_examples::add;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let future1 = client.submit(add, (1, 2));
    let future2 = client.submit(add, (&future1, 10)); // depends on future1
    let future3 = client.submit(add, (&future2, 100)); // depends on future2
    let result = future3.result()?;
    println!("add(add(add(1, 2), 10), 100) = {result}");
    anyhow::ensure!(result == 113, "expected 113");
    Ok(())
}
