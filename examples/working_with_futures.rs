//! Seed section "Working with Futures": check a future's status, look
//! without blocking, get called back when it is done, and handle a task's
//! error (with its remote traceback).
//!
//! `cargo run --example working_with_futures` against a running cluster.

use flotilla::{Error, Status};
use flotilla_examples::{might_fail, slow_identity};
use std::sync::mpsc;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;

    // Check Status. `pure(false)`: a fresh run, not a result another
    // program may still hold under the same key.
    let future = client
        .submit_with(slow_identity, (7, 1000))
        .pure(false)
        .submit();
    println!("done: {}  status: {}", future.done(), future.status());
    anyhow::ensure!(
        !future.done() && matches!(future.status(), Status::Pending | Status::Running),
        "a 1-second task cannot be done yet (status {})",
        future.status()
    );

    // Non-blocking result retrieval.
    if future.done() {
        println!("Result: {}", future.result()?);
    } else {
        println!("Still computing...");
    }

    // Or use callbacks: they run on the client's threads once the task is
    // done; this one hands the result back to the main thread.
    let (sender, receiver) = mpsc::channel();
    future.add_done_callback(move |f| {
        let result = f.result();
        if let Ok(value) = &result {
            println!("Result: {value} (from the done-callback)");
        }
        let _ = sender.send(result);
    });
    let from_callback = receiver.recv_timeout(Duration::from_secs(30))??;
    anyhow::ensure!(from_callback == 7, "the callback saw {from_callback}");
    println!("done: {}  status: {}", future.done(), future.status());
    anyhow::ensure!(
        future.done() && future.status() == Status::Finished,
        "status after the callback: {}",
        future.status()
    );

    // Error handling: the task's error comes back as `Error::Task`.
    let failing = client.submit(might_fail, (-5,));
    match failing.result() {
        Err(Error::Task(e)) => {
            println!("Task failed: {} ({})", e.message(), e.type_name());
            anyhow::ensure!(e.message() == "Negative value", "wrong message");
        }
        other => anyhow::bail!("expected a task error, got {other:?}"),
    }
    println!("status: {}", failing.status());
    anyhow::ensure!(failing.status() == Status::Error, "wrong status");
    let exception = failing.exception();
    println!("exception: {exception:?}");
    anyhow::ensure!(exception.is_some(), "a failed future has its exception");
    let traceback = failing.traceback().unwrap_or_default();
    println!("traceback:\n{traceback}");
    anyhow::ensure!(!traceback.is_empty(), "a failed future has a traceback");
    Ok(())
}
