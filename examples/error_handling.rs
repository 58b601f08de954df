//! Seed section "Error Handling": a task's error comes back with its type,
//! message and traceback.
//!
//! `cargo run --example error_handling` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::might_fail;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let future = client.submit(might_fail, (-5,));
    match future.result().await {
        Err(Error::Task(e)) => {
            println!("Task failed: {} ({})", e.message(), e.type_name());
            println!("traceback:\n{}", future.traceback().unwrap_or_default());
            anyhow::ensure!(e.message() == "Negative value", "wrong message");
        }
        other => anyhow::bail!("expected a task error, got {other:?}"),
    }
    let ok = client.submit(might_fail, (5,)).await?;
    println!("might_fail(5) = {ok}");
    anyhow::ensure!(ok == 25, "expected 25");
    Ok(())
}
