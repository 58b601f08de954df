//! Expansions of `#[flotilla::task]` that must compile and run against the
//! real runtime, one module per case.
//!
//! They are plain tests of the client crate rather than trybuild `pass`
//! cases, so that trybuild (`crates/macros/tests/ui.rs`) only type-checks a
//! small project instead of building the client's dependency tree a second
//! time in its own target directory.

// The cases check how `pub` tasks expand; here they sit in private modules.
#![allow(unreachable_pub)]

#[path = "macros/async_task_with_context.rs"]
mod async_task_with_context;
#[path = "macros/fallible_task.rs"]
mod fallible_task;
#[path = "macros/invocation.rs"]
mod invocation;
#[path = "macros/patterns_and_visibility.rs"]
mod patterns_and_visibility;
#[path = "macros/sync_task.rs"]
mod sync_task;
#[path = "macros/worker_main.rs"]
mod worker_main;
