//! Flotilla's wire protocol and shared vocabulary.
//!
//! Everything that crosses a process boundary is defined here: the task
//! specification a client submits, the messages each party consumes
//! ([`ToScheduler`], [`ToWorker`], [`EventBatch`]), task errors, the
//! versioned MessagePack codec, the names of queues and Redis keys inside a
//! namespace ([`Names`]), and configuration from the environment
//! ([`Config`]).
//!
//! User payloads (task arguments and results) stay opaque byte strings, so
//! the scheduler never decodes them.
//!
//! This crate is the contract only: it depends on none of tokio, lapin or
//! redis. The I/O around it (connections, scripts, reconnection) is
//! `flotilla-runtime`.

mod buffer;
mod codec;
mod config;
mod error;
mod fuzz;
mod messages;
mod names;
mod retry;
pub mod seal;
mod task;
pub mod trace;

pub use buffer::{
    decode_sharing, set_large_alloc, Bytes, Encoded, LargeAlloc, LargeBuffer, MEASURED_MIN,
    SHARE_MIN,
};
pub use codec::{decode, encode, DecodeError, WIRE_VERSION};
pub use config::{
    amqp_urls, redis_target, Config, ConfigError, QueueType, RedisTarget, Secret,
    DEFAULT_ALLOWED_FAILURES, DEFAULT_AMQP_URL, DEFAULT_CLIENT_LEASE_MS, DEFAULT_LONG_TASK_MS,
    DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PENDING, DEFAULT_NAMESPACE, DEFAULT_REDIS_URL,
    DEFAULT_REPLAY_WINDOW_MS, DEFAULT_SCHEDULER_MAX_TASKS, DEFAULT_SHM_DIR, MIN_CLIENT_LEASE_MS,
};
pub use error::{ErrorKind, TaskError, DATA_LOST, VALUE_LOST};
pub use messages::{
    Arg, Event, EventBatch, Location, RunTask, StoredOk, StoredResult, TaskSpec, ToScheduler,
    ToWorker, WorkerInfo, TAG_ERR, TAG_KEPT, TAG_OK,
};
// Actors (see `flotilla::actor`).
pub use messages::{ActorCall, ActorInfo, ActorReply};
pub use names::{new_id, validate_namespace, Names};
pub use retry::{RetryOn, RetryPolicy};
pub use seal::{Codec, Purpose, ReplayGuard, SealError};
pub use task::{value_to_vec, value_to_vec_within, write_value, ResultOutput, Task};
pub use trace::{TraceParent, TraceParentError};
