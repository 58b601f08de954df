//! # Flotilla: Dask futures for Rust, on RabbitMQ and Redis
//!
//! Submit functions to a cluster and get futures back at once; tasks run as
//! soon as their inputs are ready; futures can be passed into other tasks and
//! gathered. A scheduler publishes ready tasks to RabbitMQ queues consumed by
//! horizontally scaled workers; results live in Redis.
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! fn add(x: i64, y: i64) -> i64 { x + y }
//!
//! #[flotilla::task]
//! fn total(xs: Vec<i64>) -> i64 { xs.iter().sum() }
//!
//! #[tokio::main]
//! async fn main() -> flotilla::Result<()> {
//!     let client = Client::from_env().await?;
//!     let a = client.submit(add, (1, 2));        // TaskFuture<i64>, returns at once
//!     let b = client.submit(add, (&a, 10));      // waits for `a` in the cluster
//!     let c = client.submit(add, (b, 100));
//!     assert_eq!(c.await?, 113);
//!
//!     let parts = client.map(add, (0..100).map(|i| (i, i)));
//!     let sum = client.submit(total, (parts,));  // Vec<TaskFuture<i64>> arrives as Vec<i64>
//!     println!("{}", sum.await?);
//!     Ok(())
//! }
//! ```
//!
//! Tasks are plain functions marked [`#[flotilla::task]`](task), usually in
//! a library crate of their own that both the client program and the worker
//! binary depend on; the wire carries their name and a signature
//! fingerprint. A worker binary is one line naming its task crates (see
//! [`worker_main!`]):
//!
//! ```ignore
//! // my-worker/src/main.rs; its Cargo.toml depends on `flotilla-rs` and `my_tasks`.
//! flotilla::worker_main!(my_tasks);
//! ```
//!
//! `flotilla` (the package `flotilla-rs` on crates.io) is the only Flotilla
//! crate a user depends on (plus `tokio` and `serde`): the worker runtime is
//! [`worker`], the scheduler is the `flotilla-scheduler` binary, and
//! [`LocalCluster`] runs both in-process.

// The modules' layers, bottom first; each module uses only modules of the
// layers below its own (ARCHITECTURE.md, "The client's layers"):
// error | state, purge | room | outbox | inner | capture, link | future |
// args, as_completed | client | actor, context, cluster | blocking | sync.
mod actor;
mod args;
pub mod as_completed;
pub mod blocking;
mod capture;
mod client;
#[cfg(feature = "local-cluster")]
mod cluster;
mod context;
mod error;
mod future;
mod inner;
mod link;
mod outbox;
mod pubsub;
mod purge;
mod room;
mod state;
pub mod sync;

pub use actor::{ActorFuture, ActorHandle, ActorProxy, Constructor, SubmitActor};
pub use args::{ArgWriter, IntoArg, IntoArgs, INLINE_ARG_MAX};
pub use as_completed::{
    as_completed, progress, wait, AsCompleted, DoneAndNotDone, ReturnWhen, WithResults,
};
pub use client::{fire_and_forget, Client, ScatterOptions, Submit};
#[cfg(feature = "local-cluster")]
pub use cluster::{LocalCluster, LocalClusterBuilder};
pub use context::TaskContextExt;
pub use error::{Error, ErrorKind, Result, TaskError};
pub use flotilla_macros::{actor, task};
/// A cheaply cloneable byte buffer: use it, or a plain `Vec<u8>`, for
/// binary task arguments, results and scattered data. Both travel as
/// MessagePack `bin` (one length header and the bytes), and values of any
/// size move: large ones never ride in a message (see ARCHITECTURE.md §8).
///
/// `Bytes` is the fast one for large values: a task's `Bytes` argument
/// shares the buffer the worker holds the input in (fifty tasks reading one
/// scattered 100 MB value make no copy of it), and a `Bytes` result shares
/// the buffer the client received. A `Vec<u8>` is a copy each time. It
/// converts from and to [`bytes::Bytes`] and `Vec<u8>` without copying. A
/// shared `Bytes` keeps the whole buffer alive: to keep a small part of a
/// large value for long, copy it (`Bytes::copy_from_slice`).
///
/// ```
/// #[flotilla::task]
/// fn checksum(data: flotilla::Bytes) -> u64 {
///     data.iter().map(|&b| u64::from(b)).sum()
/// }
/// # fn main() {}
/// ```
pub use flotilla_proto::Bytes;
pub use flotilla_proto::{
    Config, RetryOn, RetryPolicy, Secret, Task, TraceParent, TraceParentError,
};
pub use flotilla_task::{MissingState, State, TaskContext, WorkerState, MISSING_STATE};
pub use future::{FutureRef, TaskFuture};
pub use purge::purge;
pub use state::Status;

/// The worker side: a worker binary's `main`, and the worker loop for
/// embedding it.
///
/// A worker binary is best written with [`worker_main!`](crate::worker_main),
/// which links the task crates it names and checks each at start.
/// [`main`](worker::main) alone serves whatever the binary links, and
/// refuses to start when that is none of the user's tasks.
pub mod worker {
    pub use flotilla_worker::linked::task_crates;
    pub use flotilla_worker::{
        main, main_serving, main_serving_with, run, LinkError, WorkerError, WorkerHandle,
        WorkerOptions,
    };
}

/// A worker binary's whole `main`: names the crates that define its tasks
/// (and actors), which links them into the binary, and serves them.
///
/// ```ignore
/// // my-worker/src/main.rs; Cargo.toml: flotilla, my_tasks, other_tasks.
/// flotilla::worker_main!(my_tasks, other_tasks);
/// ```
///
/// Naming the task crates is not a formality: Rust links a dependency into
/// a binary only when the binary's code names it, and the tasks of a crate
/// that is not linked are silently absent (every submit then fails with
/// `no worker provides task …`). The macro expands to a `fn main` that
/// names each crate (`use my_tasks as _;`) and calls
/// [`worker::main_serving`], which checks at start that each named crate
/// registered at least one task or actor, and exits with an error naming
/// the crate otherwise.
///
/// The binary takes the worker's flags and environment
/// (`--namespace`, `--nthreads`, `--resources`, ...; `--help` lists them)
/// and stops cleanly on SIGTERM or Ctrl-C. Tasks written in the binary
/// crate itself are always linked: such a binary may call
/// [`worker::main`] from its own `fn main`.
///
/// # Shared state
///
/// After a `;`, `state = init` names a function `fn() -> T` whose value the
/// worker builds once at start and lends to every task that takes a
/// [`State<T>`] parameter (or calls [`TaskContext::state`]);
/// `state = async init` names an `async fn() -> T`. Either runs on the
/// worker's tokio runtime before it connects. For several values, return
/// a struct of them, or call [`worker::main_serving_with`] with a
/// [`WorkerState`] from a hand-written `main`.
///
/// ```ignore
/// // my_tasks/src/lib.rs
/// pub struct Db { pub pool: Pool }
/// pub async fn init() -> Db { Db { pool: Pool::connect("...").await } }
///
/// #[flotilla::task]
/// pub async fn lookup(db: flotilla::State<Db>, id: u64) -> String { db.pool.get(id).await }
///
/// // my-worker/src/main.rs
/// flotilla::worker_main!(my_tasks; state = async my_tasks::init);
/// ```
#[macro_export]
macro_rules! worker_main {
    () => {
        ::core::compile_error!(
            "name the crates that define your tasks: `flotilla::worker_main!(my_tasks);`"
        );
    };
    ($($task_crate:ident),+ ; state = async $init:path $(,)?) => {
        fn main() {
            $(
                #[allow(unused_imports)]
                use ::$task_crate as _;
            )+
            $crate::worker::main_serving_with(
                &[$(::core::stringify!($task_crate)),+],
                || async { $crate::WorkerState::new().with($init().await) },
            );
        }
    };
    ($($task_crate:ident),+ ; state = $init:path $(,)?) => {
        fn main() {
            $(
                #[allow(unused_imports)]
                use ::$task_crate as _;
            )+
            $crate::worker::main_serving_with(
                &[$(::core::stringify!($task_crate)),+],
                || async { $crate::WorkerState::new().with($init()) },
            );
        }
    };
    ($($task_crate:ident),+ $(,)?) => {
        fn main() {
            $(
                // Naming the crate is what links its task registrations.
                #[allow(unused_imports)]
                use ::$task_crate as _;
            )+
            $crate::worker::main_serving(&[$(::core::stringify!($task_crate)),+]);
        }
    };
}

/// The old name of [`TaskFuture`]. It shadowed `std::future::Future` (in the
/// 2024 prelude) wherever `flotilla::prelude::*` was glob-imported.
#[deprecated(
    since = "0.1.0",
    note = "renamed `TaskFuture`, so that it does not shadow `std::future::Future`"
)]
pub type Future<T> = TaskFuture<T>;
pub use sync::{Event, Lock, LockGuard, Queue, Semaphore, SemaphorePermit, Variable};

/// What most programs need: `use flotilla::prelude::*;`.
///
/// The prelude names nothing that `std`'s prelude names, so a glob import
/// leaves `Future` meaning `std::future::Future` (in the 2024 prelude), and
/// a [`TaskFuture`] is one:
///
/// ```edition2024,no_run
/// use flotilla::prelude::*;
///
/// #[flotilla::task]
/// fn add(x: i64, y: i64) -> i64 { x + y }
///
/// fn later(client: &Client) -> impl Future<Output = flotilla::Result<i64>> + use<> {
///     client.submit(add, (1, 2))
/// }
///
/// fn unpin_send_sync<F: Future + Unpin + Send + Sync>(_: &F) {}
///
/// async fn demo(client: Client) -> flotilla::Result<()> {
///     let sum = client.submit(add, (3, 4));
///     unpin_send_sync(&sum);
///     assert_eq!(later(&client).await? + sum.await?, 10);
///     Ok(())
/// }
/// ```
pub mod prelude {
    #[cfg(feature = "local-cluster")]
    pub use crate::LocalCluster;
    pub use crate::{as_completed, fire_and_forget, wait, ActorFuture, ReturnWhen};
    pub use crate::{Client, Error, Status, TaskContext, TaskContextExt, TaskFuture};
    pub use crate::{Event, Lock, Queue, Semaphore, Variable};
    pub use crate::{State, WorkerState};
    pub use std::time::Duration;
}

/// Items the `#[flotilla::task]` and `#[flotilla::actor]` expansions refer to. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::actor::BlockingRuntime;
    pub use crate::actor::{ActorHandle, ActorProxy};
    pub use flotilla_proto::TaskError;
    pub use flotilla_proto::{ResultOutput, Task};
    pub use flotilla_task::__inventory as inventory;
    pub use flotilla_task::actor::unknown_method;
    pub use flotilla_task::user_error;
    pub use flotilla_task::{
        decode_args, decode_arguments, encode_output, Arguments, Invocation, TaskContext,
        TaskRegistration,
    };
    pub use flotilla_task::{Actor, ActorRegistration, DynActor, TaskOutcome};
}
