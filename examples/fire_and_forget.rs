//! Seed section "Fire-and-Forget": submit a side-effect task, mark it with
//! `fire_and_forget`, drop its handle — and it still runs.
//!
//! The "database" is the Redis list `<namespace>:demo:log`; the example polls
//! it (up to 30 s) until its entry appears.
//!
//! `cargo run --example fire_and_forget` against a running cluster.

use flotilla_examples::seed_tasks::{demo_log_key, log_to_database};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() -> anyhow::Result<()> {
    let config = flotilla::Config::from_env()?;
    let client = flotilla::blocking::Client::connect(config.clone())?;

    // A fresh entry each run (so also a fresh task key).
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let data = format!("event at {nanos} ns");

    // Submit without keeping a reference.
    let future = client.submit(log_to_database, (data.clone(),));
    flotilla::blocking::fire_and_forget(&future);
    drop(future);
    println!("submitted log_to_database({data:?}), fired and forgot it");

    // Flotilla won't abandon the task although no handle is left: the entry
    // turns up in the "database".
    let key = demo_log_key(&config.namespace);
    let mut redis = redis::Client::open(config.redis_url.as_str())?.get_connection()?;
    let started = Instant::now();
    loop {
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query(&mut redis)?;
        if entries.contains(&data) {
            println!("logged after {:?}: {data:?} is in {key}", started.elapsed());
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{data:?} did not reach {key} within 30 s (the list holds {entries:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
