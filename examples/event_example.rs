//! Seed section "Advanced Coordination", Events: a `waiter` task blocks
//! until a `setter` task sets the event.
//!
//! Run against a cluster: `cargo run --example event_example`
//! (scheduler and `flotilla-worker` processes on `FLOTILLA_NAMESPACE`;
//! the two tasks need two task slots). The seed's setter sleeps 5 s; this
//! one sleeps 1 s.

use flotilla_examples::coordination::{setter, waiter};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let event =
        flotilla::sync::blocking::Event::new(&client, &format!("go-{}", std::process::id()));

    let started = Instant::now();
    let wait_future = client.submit(waiter, (event.name(),));
    let _set_future = client.submit(setter, (event.name(), 1000_u64));
    let result = wait_future.result()?; // waits for setter to complete
    println!("{result} after {:.1?}", started.elapsed());
    anyhow::ensure!(result == "Event occurred", "unexpected {result:?}");
    anyhow::ensure!(event.is_set()?, "the event should be set");
    anyhow::ensure!(
        started.elapsed() >= Duration::from_secs(1),
        "the waiter returned before the setter ran"
    );
    event.clear()?;
    Ok(())
}
