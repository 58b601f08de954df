//! `Semaphore`: at most N holders at once, cluster-wide — here, tasks that
//! call a rate-limited service with two permits between them.
//!
//! `cargo run --example semaphore_example` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::features::rate_limited;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let name = format!("api-{}", std::process::id());
    let max_leases = 2;
    // Eight tasks of 100 ms, each holding one of the two permits.
    let calls = client.map(
        rate_limited,
        (0..8).map(|i| (name.clone(), max_leases, 100 + i)),
    );
    let in_use = client.gather(&calls).await?;
    let most = in_use.iter().copied().max().unwrap_or(0);
    println!("permits in use seen by the 8 tasks: {in_use:?}; at most {most} at once");
    anyhow::ensure!(most as u64 <= max_leases, "more than {max_leases} holders");

    // The client takes a permit the same way.
    let semaphore = Semaphore::new(&client, &name, max_leases);
    let permit = semaphore.permit().await?;
    println!(
        "the client holds a permit: {} in use",
        semaphore.in_use().await?
    );
    permit.release().await?;
    Ok(())
}
