//! Seed section "Basic Submit": submit one task, get its result.
//!
//! Run against a cluster: `cargo run --example basic_submit`
//! (scheduler and `flotilla-worker` processes on `FLOTILLA_NAMESPACE`).

use flotilla_examples::add;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let future = client.submit(add, (1, 2));
    let result = future.result()?;
    println!("add(1, 2) = {result}");
    anyhow::ensure!(result == 3, "expected 3, got {result}");
    Ok(())
}
