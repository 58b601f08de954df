//! A process that takes a lock and holds it until it is killed — for
//! trying out (and testing) what happens to a lock whose holder dies.
//!
//! `cargo run --example lock_holder -- <lock name> [lease in ms]`
//!
//! Prints `acquired <lock> token=<fencing token>` once it holds the lock,
//! then keeps renewing the lease until the process ends. Kill it with
//! SIGKILL and another holder gets the lock when the lease runs out.

use std::io::Write;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "resource".to_owned());
    let lease: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let client = flotilla::blocking::Client::from_env()?;
    let lock = flotilla::sync::blocking::Lock::new(&client, &name)
        .with_lease(Duration::from_millis(lease));
    lock.acquire()?;
    let token = lock.fencing_token().unwrap_or_default();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "acquired {name} token={token}")?;
    stdout.flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
