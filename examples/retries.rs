//! Retries: `submit_with(..).retries(n)` runs a failing task again, up to
//! `n` more times, before its future errs, at once or after a growing delay
//! (`retry_delay`, `backoff`, `max_retry_delay`), and only on the errors of
//! `retry_on` if given; `client.retry` reruns a failed future by hand.
//! Start times: `.after(duration)` / `.at(time)` hold a task until then.
//!
//! `cargo run --example retries` against a running cluster.

use flotilla::prelude::*;
use flotilla::ErrorKind;
use flotilla_examples::features::{fail_first, started_at};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let id = std::process::id();

    // Fails twice, so three attempts succeed.
    let flaky = client
        .submit_with(fail_first, (format!("retried-{id}"), 2))
        .retries(2)
        .submit();
    let attempt = flaky.await?;
    println!("with 2 retries: succeeded on attempt {attempt}");
    anyhow::ensure!(attempt == 3, "expected attempt 3");

    // Without retries the first failure is the result...
    let once = client.submit(fail_first, (format!("once-{id}"), 1));
    match once.result().await {
        Err(Error::Task(e)) => println!("without retries: {}", e.message()),
        other => anyhow::bail!("expected the task's error, got {other:?}"),
    }
    // ...until it is retried by hand.
    client.retry(std::slice::from_ref(&once));
    let attempt = once.await?;
    println!("retried by hand: succeeded on attempt {attempt}");
    anyhow::ensure!(attempt == 2, "expected attempt 2");

    // Retries that wait: 200 ms, then 400 ms (doubling, capped at 1 s).
    let began = Instant::now();
    let attempt = client
        .submit_with(fail_first, (format!("delayed-{id}"), 2))
        .retries(3)
        .retry_delay(Duration::from_millis(200))
        .backoff(2.0)
        .max_retry_delay(Duration::from_secs(1))
        .submit()
        .await?;
    println!(
        "with delays: succeeded on attempt {attempt} after {:?}",
        began.elapsed()
    );
    anyhow::ensure!(began.elapsed() >= Duration::from_millis(600));

    // Retried only on panics: this task's `String` error fails at once.
    let picky = client
        .submit_with(fail_first, (format!("picky-{id}"), 1))
        .retries(3)
        .retry_on([ErrorKind::Panic])
        .submit();
    match picky.result().await {
        Err(Error::Task(e)) => println!("not retried on its error: {}", e.message()),
        other => anyhow::bail!("expected the first attempt's error, got {other:?}"),
    }

    // Not before half a second from now.
    let asked = SystemTime::now();
    let started = client
        .submit_with(started_at, (format!("later-{id}"),))
        .after(Duration::from_millis(500))
        .submit()
        .await?;
    let waited = started.saturating_sub(asked.duration_since(UNIX_EPOCH)?.as_millis() as u64);
    println!("a task submitted with .after(500 ms) started {waited} ms later");
    anyhow::ensure!(waited >= 500, "started too early");
    Ok(())
}
