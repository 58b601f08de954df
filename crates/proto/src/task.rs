//! The typed description of a registered task, implemented by `#[flotilla::task]`.

use serde::{de::DeserializeOwned, Serialize};

/// A task that workers can run: the zero-sized handle `#[flotilla::task]`
/// generates for a function implements this trait.
///
/// The client uses `Args` and `Output` to check submissions at compile time;
/// `NAME` and `FINGERPRINT` travel on the wire so that a worker built from
/// another version of the task refuses it with a clear error.
pub trait Task: Copy + Send + Sync + 'static {
    /// The task's parameters as a tuple (`(i64, i64)`; `()` for none).
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// What the task returns on success.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// The stable name the task is registered under.
    const NAME: &'static str;
    /// A hash of the task's parameter and return types.
    const FINGERPRINT: u64;
}

/// The success type of a `Result`-returning task function.
pub trait ResultOutput {
    /// `T` in `Result<T, E>`.
    type Ok;
}

impl<T, E> ResultOutput for Result<T, E> {
    type Ok = T;
}
