//! The client's error type.

use std::sync::Arc;
use std::time::Duration;

pub use flotilla_proto::{ErrorKind, TaskError};

/// Everything a client operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task failed remotely (or one of its inputs did): type name,
    /// message, traceback, and the error value when it was serializable.
    #[error("{0}")]
    Task(TaskError),
    /// Waiting ran out of time; the task itself goes on.
    #[error("timed out after {timeout:?} waiting for `{key}`")]
    Timeout {
        /// What was waited for.
        key: String,
        /// How long.
        timeout: Duration,
    },
    /// The task was cancelled.
    #[error("`{0}` was cancelled")]
    Cancelled(String),
    /// A value that must travel inside a message (an actor call's
    /// arguments, a primitive's value) is over the configured payload limit
    /// (`FLOTILLA_MAX_PAYLOAD`). Encoding stops as soon as the limit is
    /// passed, so this arrives after encoding `limit` bytes, however large
    /// the value. Task arguments and scattered values are never refused for
    /// their size (they go through Redis, in chunks).
    #[error("{}", payload_message(what, *limit))]
    PayloadTooLarge {
        /// What was too large, as a noun phrase: ``"the arguments of
        /// `Counter::add`"``, ``"a value for variable `x`"``.
        what: String,
        /// How many bytes it had taken when encoding stopped: more than
        /// `limit`, at most its whole size.
        size: usize,
        /// The limit, in bytes.
        limit: usize,
    },
    /// A value could not be encoded.
    #[error("could not encode {what}: {message}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// Why it failed.
        message: String,
    },
    /// A result could not be decoded into the expected type.
    #[error("could not decode the result of `{key}` as {type_name}: {message}")]
    Decode {
        /// The result's key.
        key: String,
        /// The type asked for.
        type_name: &'static str,
        /// Why it failed.
        message: String,
    },
    /// The result is no longer stored (it was released, or Redis lost it).
    #[error("the result of `{0}` is no longer stored")]
    Lost(String),
    /// Redis lost the state the task depended on: it was restarted without
    /// persistence, evicted keys, or failed over to a replica that missed
    /// writes. Its spec and result are gone, so it can neither run nor
    /// answer; `cause` says how the loss was detected.
    #[error("`{key}` is lost with Redis' data: {cause}")]
    DataLost {
        /// The task's key.
        key: String,
        /// How the loss was detected.
        cause: String,
    },
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// RabbitMQ failed.
    #[error("RabbitMQ: {0}")]
    Amqp(Arc<lapin::Error>),
    /// Redis failed.
    #[error("Redis: {0}")]
    Redis(Arc<redis::RedisError>),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// The actor is gone (its worker died, or it was dropped): the call
    /// did not run, or its answer cannot arrive. Create a new actor.
    #[error("actor `{actor}` is lost: {reason}; create a new actor to carry on")]
    ActorLost {
        /// The actor's key.
        actor: String,
        /// Why it is lost.
        reason: String,
    },
    /// A coordination primitive was misused, or its lease ran out (see
    /// [`SyncError`]).
    #[error("{0}")]
    Sync(SyncError),
    /// The client has as many tasks pending as it may
    /// ([`Config::max_pending`](crate::Config::max_pending),
    /// `FLOTILLA_MAX_PENDING`): returned by `try_submit` instead of waiting.
    /// Wait for some futures to finish (or drop them), or submit with
    /// `submit_async`, which waits for room.
    #[error("this client has {pending} tasks pending, its limit (FLOTILLA_MAX_PENDING = {limit}): wait for some to finish or drop their futures, or use submit_async(), which waits for room")]
    TooManyPending {
        /// Tasks pending (submitted, not finished nor released), counting
        /// those queued for room.
        pending: usize,
        /// The bound.
        limit: usize,
    },
    /// Starting an in-process cluster failed.
    #[error("local cluster: {0}")]
    Cluster(String),
    /// The task finished, but its large value was kept by a worker (see
    /// ARCHITECTURE.md §8) that could not give it: the worker is gone (or
    /// unreachable from here, see `FLOTILLA_DATA_ADVERTISE`), and the value
    /// with it. Submit the task again to recompute it.
    #[error("the value of `{key}` is lost: it was kept by worker {worker} at {addr}, which could not give it: {cause}")]
    ValueLost {
        /// The task's key.
        key: String,
        /// The worker that kept the value.
        worker: String,
        /// The data address it advertised.
        addr: String,
        /// Why the fetch failed.
        cause: String,
    },
}

impl Error {
    /// The remote task error, when this is one.
    pub fn task_error(&self) -> Option<&TaskError> {
        match self {
            Error::Task(error) => Some(error),
            _ => None,
        }
    }
}

impl From<lapin::Error> for Error {
    fn from(error: lapin::Error) -> Self {
        Error::Amqp(Arc::new(error))
    }
}

impl From<redis::RedisError> for Error {
    fn from(error: redis::RedisError) -> Self {
        Error::Redis(Arc::new(error))
    }
}

impl From<flotilla_proto::ConfigError> for Error {
    fn from(error: flotilla_proto::ConfigError) -> Self {
        Error::Config(error.to_string())
    }
}

impl From<TaskError> for Error {
    fn from(error: TaskError) -> Self {
        Error::Task(error)
    }
}

/// The message of [`Error::PayloadTooLarge`]: the verb agrees with `what`
/// ("the arguments of `add` are", "the scattered value is"), and the advice
/// fits (arguments can be scattered once and passed as futures).
fn payload_message(what: &str, limit: usize) -> String {
    let limit = human_bytes(limit);
    if what.starts_with("the arguments") {
        format!(
            "{what} are larger than the {limit} payload limit (FLOTILLA_MAX_PAYLOAD); \
             scatter large data once and pass its future, or raise the limit"
        )
    } else {
        format!(
            "{what} is larger than the {limit} payload limit (FLOTILLA_MAX_PAYLOAD); \
             split it, or raise the limit"
        )
    }
}

/// A byte count for people: "64 MiB", "1.5 GiB", "4096 bytes".
fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1 << 10 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Problems particular to the coordination primitives ([`crate::sync`]);
/// they reach callers as [`Error::Sync`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// `release` on a handle that holds nothing.
    #[error("{what} `{name}` is not held by this handle; acquire it before releasing it")]
    NotHeld {
        /// "lock" or "semaphore".
        what: &'static str,
        /// The primitive's name.
        name: String,
    },
    /// `acquire` on a lock handle that already holds the lock (it is not
    /// reentrant).
    #[error("lock `{name}` is already held by this handle (locks are not reentrant); release it first, or use another handle")]
    AlreadyHeld {
        /// The lock's name.
        name: String,
    },
    /// The lease ran out before the release: another holder may have had
    /// the lock or lease in the meantime (a holder stalled for longer than
    /// the lease, or Redis was unreachable).
    #[error("the lease on {what} `{name}` expired before it was released; another holder may have run concurrently (lengthen the lease?)")]
    LeaseExpired {
        /// "lock" or "semaphore".
        what: &'static str,
        /// The primitive's name.
        name: String,
    },
    /// A semaphore is already in use with another maximum.
    #[error("semaphore `{name}` exists with max_leases {existing}, not {requested}")]
    InconsistentMaxLeases {
        /// The semaphore's name.
        name: String,
        /// Its maximum in Redis.
        existing: u64,
        /// This handle's maximum.
        requested: u64,
    },
}

impl From<SyncError> for Error {
    fn from(error: SyncError) -> Self {
        Error::Sync(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_messages_are_grammatical_and_name_the_limit() {
        let error = |what: &str, limit| {
            Error::PayloadTooLarge {
                what: what.to_owned(),
                size: limit + 1,
                limit,
            }
            .to_string()
        };
        let message = error("the arguments of `add`", 64 << 20);
        assert!(
            message.starts_with("the arguments of `add` are larger than the 64 MiB payload limit (FLOTILLA_MAX_PAYLOAD)"),
            "{message}"
        );
        let message = error("the scattered alloc::vec::Vec<u8>", 4096);
        assert!(
            message.starts_with(
                "the scattered alloc::vec::Vec<u8> is larger than the 4 KiB payload limit"
            ),
            "{message}"
        );
        assert!(error("a value for variable `x`", 1000)
            .contains("is larger than the 1000 bytes payload limit"));
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
