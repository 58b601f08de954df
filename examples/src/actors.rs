//! The seed's "Actors" example: a counter that lives on one worker.
//!
//! ```no_run
//! use flotilla_examples::actors::Counter;
//!
//! # async fn demo(client: flotilla::Client) -> flotilla::Result<()> {
//! let counter = client.submit_actor(Counter::new, ()).await?;
//! let _first = counter.increment();
//! let _second = counter.increment();
//! assert_eq!(counter.get_count().await?, 2);
//! # Ok(()) }
//! ```

use std::time::Duration;

/// A counter; Dask's `Counter` actor.
#[derive(Debug, Default)]
pub struct Counter {
    count: i64,
    /// Every value `record` was called with, in call order.
    log: Vec<i64>,
}

#[flotilla::actor]
impl Counter {
    /// A counter at zero.
    pub fn new() -> Self {
        Counter::default()
    }

    /// A counter starting at `start`.
    pub fn starting_at(start: i64) -> Self {
        Counter {
            count: start,
            log: Vec::new(),
        }
    }

    /// Adds one; returns the new count.
    pub fn increment(&mut self) -> i64 {
        self.count += 1;
        self.count
    }

    /// The current count (an async method).
    pub async fn get_count(&self) -> i64 {
        self.count
    }

    /// Adds `n`, refusing negative numbers.
    pub fn add(&mut self, n: i64) -> Result<i64, String> {
        if n < 0 {
            return Err(format!("cannot add {n}: negative"));
        }
        self.count += n;
        Ok(self.count)
    }

    /// Sleeps `millis` (without blocking the worker), then records `value`;
    /// for checking that calls run one at a time, in order.
    pub async fn record_after(&mut self, value: i64, millis: u64) {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        self.log.push(value);
    }

    /// The values recorded so far.
    pub fn recorded(&self) -> Vec<i64> {
        self.log.clone()
    }

    /// Panics with `message`.
    pub fn explode(&self, message: String) -> i64 {
        panic!("{message}")
    }
}
