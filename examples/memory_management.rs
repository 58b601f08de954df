//! Seed section "Memory Management": a result stays stored while a future
//! of it is held; keep a reference to use it several times, and drop it
//! when done so that the cluster may delete the data.
//!
//! The example checks the result's Redis key: present while held, gone
//! (within 30 s) once the last handle is dropped.
//!
//! `cargo run --example memory_management` against a running cluster.

use flotilla_examples::seed_tasks::{expensive_computation, process1, process2};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let config = flotilla::Config::from_env()?;
    let client = flotilla::blocking::Client::connect(config.clone())?;
    let mut redis = redis::Client::open(config.redis_url.as_str())?.get_connection()?;

    // Keep a reference to prevent deletion (`pure(false)`: this run's own
    // result, not one another program holds under the same key).
    let important_result = client
        .submit_with(expensive_computation, (27,))
        .pure(false)
        .submit();

    // Use the result multiple times.
    let future1 = client.submit(process1, (&important_result,));
    let future2 = client.submit(process2, (&important_result,));
    let (r1, r2) = (future1.result()?, future2.result()?);
    let important = important_result.result()?;
    println!("important_result = {important}, process1 = {r1}, process2 = {r2}");
    anyhow::ensure!(
        important == 111 && r1 == 112 && r2 == 1110,
        "expected 111, 112 and 1110"
    );

    // Still held, so still stored: read it again.
    let stored_key = config.names().result_key(important_result.key());
    let stored: bool = redis::cmd("EXISTS").arg(&stored_key).query(&mut redis)?;
    println!("while held: stored = {stored}");
    anyhow::ensure!(stored, "a held result is stored");
    anyhow::ensure!(important_result.result()? == important, "reads again");

    // Clean up when done: dropping the last handle releases the result.
    drop(important_result);
    let started = Instant::now();
    loop {
        let stored: bool = redis::cmd("EXISTS").arg(&stored_key).query(&mut redis)?;
        if !stored {
            println!("after drop: stored = false ({:?})", started.elapsed());
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the dropped result {stored_key} is still stored after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The dependents' own results are still ours.
    anyhow::ensure!(
        future1.result()? == 112 && future2.result()? == 1110,
        "dependents kept"
    );
    Ok(())
}
