//! Seed section "Actors": a counter that lives on one worker; method calls
//! go straight to it and run one at a time.
//!
//! Run against a cluster: `cargo run --example actors`
//! (scheduler and `flotilla-worker` processes on `FLOTILLA_NAMESPACE`).

use flotilla_examples::actors::Counter;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;

    // Create actor on worker
    let counter = client.submit_actor(Counter::new, ())?;

    // Call methods
    let future1 = counter.increment();
    let future2 = counter.increment();
    let result = counter.get_count().result()?;
    println!("count = {result}");
    anyhow::ensure!(result == 2, "expected 2, got {result}");
    println!(
        "increments returned {} and {}",
        future1.result()?,
        future2.result()?
    );
    Ok(())
}
