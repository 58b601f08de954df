//! `wait`: block until the first of some futures, or all of them, are done
//! (Dask's `wait(futures, return_when=...)`), optionally with a timeout.
//!
//! `cargo run --example wait_example` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::slow_identity;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    // Three tasks of different lengths: 100 ms, 1 s and 2 s.
    let futures: Vec<_> = [(1, 100), (2, 1000), (3, 2000)]
        .into_iter()
        .map(|(x, millis)| client.submit(slow_identity, (x, millis)))
        .collect();

    // Returns as soon as one is done.
    let (done, not_done) = wait(&futures, ReturnWhen::FirstCompleted, None).await?;
    println!(
        "first completed: {} done, {} still running",
        done.len(),
        not_done.len()
    );
    anyhow::ensure!(
        !done.is_empty() && !not_done.is_empty(),
        "one of three first"
    );

    // Gives up after a timeout (the futures keep running).
    match wait(
        &futures,
        ReturnWhen::AllCompleted,
        Some(Duration::from_millis(50)),
    )
    .await
    {
        Err(Error::Timeout { .. }) => println!("not all done within 50 ms"),
        other => anyhow::bail!("expected a timeout, got {other:?}"),
    }

    // Returns once all are done.
    let (done, not_done) = wait(&futures, ReturnWhen::AllCompleted, None).await?;
    let results = client.gather(&done).await?;
    println!("all completed: {} done, results {results:?}", done.len());
    anyhow::ensure!(not_done.is_empty() && results.len() == 3, "all done");
    Ok(())
}
