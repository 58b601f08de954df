//! Expansions of `#[flotilla::task]` that must compile and run against the
//! real runtime, one module per case.
//!
//! They are plain tests rather than trybuild `pass` cases: with only
//! compile-fail cases, trybuild type-checks its project (`cargo check`)
//! instead of building the whole dependency tree a second time.

// The cases check how `pub` tasks expand; here they sit in private modules.
#![allow(unreachable_pub)]

#[path = "pass/async_task_with_context.rs"]
mod async_task_with_context;
#[path = "pass/fallible_task.rs"]
mod fallible_task;
#[path = "pass/invocation.rs"]
mod invocation;
#[path = "pass/patterns_and_visibility.rs"]
mod patterns_and_visibility;
#[path = "pass/sync_task.rs"]
mod sync_task;
