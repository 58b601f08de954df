//! Task errors: what the client sees when a task fails.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The [`TaskError::type_name`] of a task that Redis lost with its data (a
/// restart without persistence, eviction, a failover that missed writes):
/// its spec and result are gone. Clients report it as data loss.
pub const DATA_LOST: &str = "flotilla::DataLost";

/// The [`TaskError::type_name`] of a task whose input was a large value
/// kept by a worker that could not give it (gone, or unreachable): the
/// value is lost with that worker (see ARCHITECTURE.md §8).
pub const VALUE_LOST: &str = "flotilla::ValueLost";

/// What kind of failure a [`TaskError`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The task's function returned `Err`.
    User,
    /// The task's function panicked.
    Panic,
    /// No worker provides a task of this name.
    UnknownTask,
    /// A worker provides the task, but with another signature: the client and
    /// worker were built from different versions of the task.
    SignatureMismatch,
    /// The arguments could not be decoded into the task's parameter types.
    BadArguments,
    /// An input's result is no longer available (released or never stored).
    MissingDependency,
    /// The result was larger than the configured payload limit.
    ResultTooLarge,
    /// The task killed or lost its worker too many times.
    WorkerLost,
    /// The task was cancelled.
    Cancelled,
    /// The task's result could not be stored (Redis refused it, e.g. over
    /// its `maxmemory`, again after retries); the message has Redis' reason.
    /// The task is not run again.
    StoreFailed,
    /// The task ran past its time limit (`Submit::timeout` or
    /// `#[flotilla::task(timeout = "...")]`) and was stopped, or, for a
    /// synchronous task that cannot be stopped, abandoned: its result, if it
    /// ever comes, is discarded.
    TimedOut,
    /// Anything else that went wrong around the task (storage, protocol).
    Internal,
}

/// A task's failure, as stored in Redis and delivered to clients.
///
/// Dependents of an erred task err with the same `TaskError` (its
/// [`key`](TaskError::key) names the task that failed first). Every part is
/// read through a method: [`kind`](TaskError::kind), [`key`](TaskError::key),
/// [`task`](TaskError::task), [`type_name`](TaskError::type_name),
/// [`message`](TaskError::message), [`traceback`](TaskError::traceback),
/// [`payload`](TaskError::payload) (or [`downcast`](TaskError::downcast)).
///
/// Its parts live behind one box, so that a `TaskError` (and a `Result`
/// carrying one) stays one pointer wide: users' functions returning
/// `flotilla::Result` pass `clippy::result_large_err`. The wire form is the
/// parts' (`serde(transparent)`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskError(Box<Parts>);

/// What a [`TaskError`] holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Parts {
    kind: ErrorKind,
    key: String,
    task: String,
    type_name: String,
    message: String,
    traceback: String,
    #[serde(default, with = "serde_bytes")]
    payload: Option<Vec<u8>>,
}

impl TaskError {
    /// A new error of `kind` with a message; the caller fills in where it
    /// happened ([`TaskError::at`]) and the traceback as known.
    pub fn new(kind: ErrorKind, type_name: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError(Box::new(Parts {
            kind,
            key: String::new(),
            task: String::new(),
            type_name: type_name.into(),
            message: message.into(),
            traceback: String::new(),
            payload: None,
        }))
    }

    /// Sets where the error happened, if not set already.
    pub fn at(mut self, key: &str, task: &str) -> Self {
        if self.0.key.is_empty() {
            self.0.key = key.to_owned();
        }
        if self.0.task.is_empty() {
            self.0.task = task.to_owned();
        }
        self
    }

    /// Replaces the traceback.
    pub fn with_traceback(mut self, traceback: impl Into<String>) -> Self {
        self.0.traceback = traceback.into();
        self
    }

    /// Attaches the error value itself, MessagePack-encoded (see
    /// [`TaskError::downcast`]).
    pub fn with_payload(mut self, payload: Option<Vec<u8>>) -> Self {
        self.0.payload = payload;
        self
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "task `{}` ({}) failed: {}: {}",
            self.0.key, self.0.task, self.0.type_name, self.0.message
        )
    }
}

impl std::error::Error for TaskError {}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError")
            .field("kind", &self.0.kind)
            .field("key", &self.0.key)
            .field("task", &self.0.task)
            .field("type_name", &self.0.type_name)
            .field("message", &self.0.message)
            .field("traceback", &self.0.traceback)
            .field("payload", &self.0.payload)
            .finish()
    }
}

impl TaskError {
    /// The error's message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Rust type name of the error value (`"alloc::string::String"`,
    /// `"std::io::error::Error"`, `"panic"` for panics).
    pub fn type_name(&self) -> &str {
        &self.0.type_name
    }

    /// Where it happened: the task, worker, the error's source chain or the
    /// panic's location and backtrace.
    pub fn traceback(&self) -> &str {
        &self.0.traceback
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// Key of the task where the error happened (for a dependent of an
    /// erred task: the task that failed first).
    pub fn key(&self) -> &str {
        &self.0.key
    }

    /// Registered name of the task where the error happened
    /// (`"my_crate::add"`).
    pub fn task(&self) -> &str {
        &self.0.task
    }

    /// The error value itself, MessagePack-encoded, when its type is
    /// serde-serializable; [`TaskError::downcast`] decodes it.
    pub fn payload(&self) -> Option<&[u8]> {
        self.0.payload.as_deref()
    }

    /// Recovers the task's error value as `E`, when the task returned a
    /// serde-serializable error of that type.
    pub fn downcast<E: serde::de::DeserializeOwned>(&self) -> Option<E> {
        let payload = self.0.payload.as_ref()?;
        if !self.0.type_name.ends_with(short_type_name::<E>()) {
            return None;
        }
        rmp_serde::from_slice(payload).ok()
    }
}

fn short_type_name<E>() -> &'static str {
    let full = std::any::type_name::<E>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_is_read_through_a_method_and_survives_the_wire() {
        let error = TaskError::new(ErrorKind::User, "my::Error", "bad")
            .with_traceback("here")
            .with_payload(Some(vec![1, 2]))
            .at("add-1", "my::add")
            .at("other", "ignored");
        assert_eq!(
            (
                error.kind(),
                error.key(),
                error.task(),
                error.type_name(),
                error.message(),
                error.traceback(),
                error.payload(),
            ),
            (
                ErrorKind::User,
                "add-1",
                "my::add",
                "my::Error",
                "bad",
                "here",
                Some(&[1u8, 2][..]),
            )
        );
        let bytes = rmp_serde::to_vec_named(&error).unwrap();
        let back: TaskError = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, error);
        assert_eq!(
            error.to_string(),
            "task `add-1` (my::add) failed: my::Error: bad"
        );
    }
}
