//! The example tasks of Flotilla's seed examples, shared by the example
//! programs (which submit them) and the demo `flotilla-worker` binary
//! (which registers and runs them).

use flotilla::TaskContext;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `x + y` — the seed's `add`.
#[flotilla::task]
pub fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// `x + 1`, the benchmarks' no-op.
#[flotilla::task]
pub fn inc(x: i64) -> i64 {
    x + 1
}

/// `x²` — the seed's `square`.
#[flotilla::task]
pub fn square(x: i64) -> i64 {
    x * x
}

/// Fails for negative input — the seed's `might_fail`.
#[flotilla::task]
pub fn might_fail(x: i64) -> Result<i64, String> {
    if x < 0 {
        Err("Negative value".to_owned())
    } else {
        Ok(x * x)
    }
}

/// Sum of a list (futures of a list arrive as values).
#[flotilla::task]
pub fn total(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// Sleeps, then returns `x`: a task that takes a while.
#[flotilla::task]
pub async fn slow_identity(x: i64, millis: u64) -> i64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    x
}

/// Panics with `message`.
#[flotilla::task]
pub fn explode(message: String) -> i64 {
    panic!("{message}")
}

/// A typed error that survives the trip back to the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ValidationError {
    /// The input was below the minimum.
    TooSmall {
        /// The input.
        value: i64,
        /// The minimum.
        min: i64,
    },
}

impl std::fmt::Display for ValidationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValidationError::TooSmall { value, min } => {
                write!(f, "{value} is below the minimum {min}")
            }
        }
    }
}

/// Checks that `x >= min`, failing with a serializable error.
#[flotilla::task]
pub fn validate(x: i64, min: i64) -> Result<i64, ValidationError> {
    if x < min {
        Err(ValidationError::TooSmall { value: x, min })
    } else {
        Ok(x)
    }
}

/// Returns the key and worker it ran under.
#[flotilla::task]
pub fn whoami(ctx: TaskContext) -> (String, String) {
    (ctx.key().to_owned(), ctx.worker_id().to_owned())
}

/// Returns `len` bytes (for payload and transfer tests).
#[flotilla::task]
pub fn make_bytes(len: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![7u8; len])
}

/// Length of a byte buffer.
#[flotilla::task]
pub fn byte_len(data: serde_bytes::ByteBuf) -> usize {
    data.len()
}

/// Makes sure this crate, and so its task registrations, is linked into a
/// binary that otherwise names none of its items (such as a test that only
/// starts in-process workers).
pub fn link() {}

/// Runs the demo worker: every task above, served by `flotilla_worker`.
pub fn worker_main() {
    flotilla_worker::main()
}

pub mod coordination;

/// Tasks of the seed's lifecycle examples (scatter, fire-and-forget, sweeps, pipelines, iteration).
pub mod seed_tasks;
