//! What `#[flotilla::task]` and `#[flotilla::actor]` expand to.
//!
//! - [`registry`](mod@registry): the task functions compiled into this
//!   binary, by name, with their signature fingerprints; how a task's
//!   arguments are decoded and its output encoded; how a user's error
//!   becomes a [`TaskError`](flotilla_proto::TaskError).
//! - [`actor`]: the [`Actor`] trait and the registry of actor constructors.
//! - [`TaskContext`]: what a running task knows about itself.
//! - [`state`](mod@state): the values a worker shares with its tasks
//!   ([`WorkerState`], [`State<T>`]).
//!
//! The worker (`flotilla-worker`) looks tasks and actors up here and runs
//! them; the client (`flotilla`) re-exports what the macros name under
//! `flotilla::__private`. Nothing here does I/O.

pub mod actor;
mod arguments;
mod context;
pub mod registry;
pub mod state;

pub use actor::{Actor, ActorRegistration, DynActor};
pub use arguments::Arguments;
pub use context::TaskContext;
pub use registry::{
    decode_args, decode_arguments, encode_output, registry, Invocation, TaskOutcome,
    TaskRegistration,
};
pub use state::{MissingState, State, WorkerState, MISSING_STATE};

#[doc(hidden)]
pub use inventory as __inventory;
#[doc(hidden)]
pub use registry::probe as __probe;
#[doc(hidden)]
pub use registry::user_error as __private_user_error;
