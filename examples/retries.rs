//! Retries: `submit_with(..).retries(n)` runs a failing task again, up to
//! `n` more times, before its future errs; `client.retry` reruns a failed
//! future by hand.
//!
//! `cargo run --example retries` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::features::fail_first;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let id = std::process::id();

    // Fails twice, so three attempts succeed.
    let flaky = client
        .submit_with(fail_first, (format!("retried-{id}"), 2))
        .retries(2)
        .submit();
    let attempt = flaky.await?;
    println!("with 2 retries: succeeded on attempt {attempt}");
    anyhow::ensure!(attempt == 3, "expected attempt 3");

    // Without retries the first failure is the result...
    let once = client.submit(fail_first, (format!("once-{id}"), 1));
    match once.result().await {
        Err(Error::Task(e)) => println!("without retries: {}", e.message()),
        other => anyhow::bail!("expected the task's error, got {other:?}"),
    }
    // ...until it is retried by hand.
    client.retry(std::slice::from_ref(&once));
    let attempt = once.await?;
    println!("retried by hand: succeeded on attempt {attempt}");
    anyhow::ensure!(attempt == 2, "expected attempt 2");
    Ok(())
}
