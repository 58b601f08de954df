//! Time limits: `#[flotilla::task(timeout = "1s")]` gives a task a default
//! limit, `submit_with(..).timeout(..)` sets or lifts it per submission, and
//! a task past its limit errs `TimedOut` (see "Time limits" in
//! `docs/operations.md`).
//!
//! `cargo run --example time_limits` against a running cluster.

use flotilla::prelude::*;
use flotilla::ErrorKind;
use flotilla_examples::{limited_sleep, patient_sum};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;

    // `limited_sleep` has `timeout = "1s"`: a 3 s sleep is stopped at 1 s.
    match client.submit(limited_sleep, (3_000,)).result().await {
        Err(Error::Task(e)) if e.kind() == ErrorKind::TimedOut => {
            println!("over the default: {}", e.message())
        }
        other => anyhow::bail!("expected TimedOut, got {other:?}"),
    }

    // A submission's limit overrides the default.
    let slept = client
        .submit_with(limited_sleep, (1_500,))
        .timeout(Duration::from_secs(5))
        .submit()
        .await?;
    println!("with a 5 s limit: slept {slept} ms");

    // A task that watches `ctx.time_left()` stops with partial work in time.
    let (sum, complete) = client
        .submit_with(patient_sum, (1_000, 20, 300))
        .timeout(Duration::from_secs(1))
        .submit()
        .await?;
    println!("wound down before the limit: partial sum {sum} (complete: {complete})");
    anyhow::ensure!(!complete, "expected a partial sum");
    Ok(())
}
