//! Seed section "Check Status": `done()` and `status()` while a task runs,
//! and a non-blocking check before reading the result.
//!
//! `cargo run --example check_status` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::slow_identity;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let future = client.submit(slow_identity, (42, 1000));
    println!("done: {}  status: {}", future.done(), future.status());
    anyhow::ensure!(!future.done(), "a 1-second task cannot be done yet");

    // Non-blocking check.
    if future.done() {
        println!("result: {}", future.result().await?);
    } else {
        println!("Still computing...");
    }
    let result = future.result_timeout(Duration::from_secs(30)).await?;
    println!(
        "done: {}  status: {}  result: {result}",
        future.done(),
        future.status()
    );
    anyhow::ensure!(
        result == 42 && future.status() == Status::Finished,
        "wrong outcome"
    );
    Ok(())
}
