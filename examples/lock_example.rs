//! Seed section "Advanced Coordination", Locks: tasks that each update a
//! shared resource (a counter) in a `critical_section` under one lock.
//! Every update survives, and each grant's fencing token is larger than
//! the one before.
//!
//! Run against a cluster: `cargo run --example lock_example`
//! (scheduler and `flotilla-worker` processes on `FLOTILLA_NAMESPACE`).

use flotilla_examples::coordination::critical_section;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let run = std::process::id();
    let (lock, counter) = (format!("resource-{run}"), format!("counter-{run}"));

    let futures = client.map(
        critical_section,
        (0..10_u32).map(|call| (lock.as_str(), counter.as_str(), call)),
    );
    let mut updates = client.gather(&futures)?;
    updates.sort();
    let counter_value: u64 = flotilla::sync::blocking::Variable::new(&client, &counter).get()?;
    println!("counter = {counter_value} after {} updates", updates.len());
    let tokens: Vec<u64> = updates.iter().map(|&(_, token)| token).collect();
    println!("fencing tokens in update order: {tokens:?}");
    anyhow::ensure!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens must increase with every grant: {tokens:?}"
    );
    anyhow::ensure!(counter_value == updates.len() as u64, "lost updates");
    flotilla::sync::blocking::Variable::<u64>::new(&client, &counter).delete()?;
    Ok(())
}
