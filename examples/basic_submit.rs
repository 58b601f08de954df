//! Seed section "Basic Submit": submit one task, get its result.
//!
//! Run against a cluster: `cargo run --example basic_submit`
//! (scheduler and `flotilla-worker` processes on `FLOTILLA_NAMESPACE`).

use flotilla::prelude::*;
use flotilla_examples::add;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let future = client.submit(add, (1, 2)); // a TaskFuture<i64>, at once
    let result = future.await?; // the result, once a worker has run it
    println!("add(1, 2) = {result}");
    anyhow::ensure!(result == 3, "expected 3, got {result}");
    Ok(())
}
