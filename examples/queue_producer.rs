//! A process that puts numbers on a queue — the producer side of a
//! producer/consumer pipeline across processes.
//!
//! `cargo run --example queue_producer -- <queue name> <first> <count>`
//!
//! Puts `Some(first)`, ..., `Some(first + count - 1)` (a
//! `Queue<Option<u64>>`, where `None` would mark the end), one `put` each.

use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "numbers".to_owned());
    let first: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(0);
    let count: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let client = flotilla::blocking::Client::from_env()?;
    let queue = flotilla::sync::blocking::Queue::<Option<u64>>::new(&client, &name);
    let started = Instant::now();
    for item in first..first + count {
        queue.put(&Some(item))?;
    }
    println!("produced {count} items in {:.2?}", started.elapsed());
    Ok(())
}
