//! Procedural macros for Flotilla.
//!
//! Users never depend on this crate directly: the `flotilla` crate re-exports
//! [`macro@task`] as `#[flotilla::task]`, and the code the macro generates
//! refers only to `::flotilla::__private`, the runtime's side of the contract.
//!
//! A task function becomes a unit struct of the same name (the *handle*) that
//! implements `flotilla::__private::Task`, and a registration submitted to
//! `inventory` so that any worker linking the crate can run it by name.
//! [`macro@actor`] does the same for the constructors and methods of an
//! actor type, and generates its typed proxies.

mod actor;
mod fingerprint;
mod task;

use proc_macro::TokenStream;

/// Turns a free function into a Flotilla task.
///
/// ```ignore
/// use flotilla::TaskContext;
///
/// /// Adds two numbers on whichever worker picks the task up.
/// #[flotilla::task]
/// pub fn add(x: i64, y: i64) -> i64 {
///     x + y
/// }
///
/// #[flotilla::task(name = "net.fetch")]
/// async fn fetch(ctx: TaskContext, url: String) -> Result<Vec<u8>, FetchError> {
///     // ...
/// }
///
/// let sum = client.submit(add, (1, 2)); // on the cluster
/// assert_eq!(add::call(1, 2), 3); // in this process
/// ```
///
/// # What it generates
///
/// - A unit struct with the function's name and visibility (the task handle),
///   carrying the function's doc comments. Pass it to `client.submit`.
/// - `name::call(..)`: the original function, unchanged, for local calls.
///   Inside the body the bare name refers to the handle, so a recursive call is
///   written `name::call(..)`.
/// - An implementation of `flotilla::__private::Task`: the arguments are the
///   tuple of the parameter types, the output is the return type (`()` when
///   there is none, the `Ok` type when it returns a `Result`).
/// - A registration that lets workers decode the arguments, run the function
///   and encode its output.
///
/// # Signature rules
///
/// - The first parameter may be a `TaskContext`, taken by value; it is not one
///   of the task's arguments. It cannot appear anywhere else.
/// - The function cannot be generic, a method (`self`), variadic or `unsafe`,
///   and cannot use `impl Trait` in its parameters or return type.
/// - Arguments arrive as bytes from another process, so their types must be
///   owned: `String`, not `&str`.
/// - Parameters may be patterns: `(a, b): (i32, i32)` and `mut x: i64` work.
/// - A return type whose last path segment is `Result` (`Result<T, E>`,
///   `std::io::Result<T>`, `anyhow::Result<T>`) makes a fallible task: `Err`
///   values come back to the client as task errors.
///
/// # Arguments
///
/// - `name = "..."`: the name workers register the task under. Defaults to the
///   function's module path and name, e.g. `my_crate::jobs::add`.
/// - `timeout = "30s"`: the task's default time limit (`"500ms"`, `"30s"`,
///   `"5m"`, `"1h"`, or a sum such as `"1m30s"`), checked at compile time. A
///   submission's `.timeout(..)` overrides it. Past it, an async task is
///   stopped and a synchronous one abandoned; either errs `TimedOut` (see
///   "Time limits" in `docs/operations.md`).
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    task::expand(attr.into(), item.into()).into()
}

/// Turns a type's inherent `impl` block into an actor: a stateful object
/// that lives on one worker and serves method calls one at a time.
///
/// ```ignore
/// pub struct Counter { count: i64 }
///
/// #[flotilla::actor]
/// impl Counter {
///     pub fn new() -> Self { Counter { count: 0 } }
///     pub fn increment(&mut self) -> i64 { self.count += 1; self.count }
///     pub async fn get_count(&self) -> i64 { self.count }
///     pub fn add(&mut self, n: i64) -> Result<i64, String> { .. }
/// }
///
/// let counter = client.submit_actor(Counter::new, ()).await?; // CounterProxy
/// let first: flotilla::ActorFuture<i64> = counter.increment();
/// assert_eq!(counter.get_count().await?, 1);
/// ```
///
/// # What it generates
///
/// - The `impl` block, unchanged.
/// - `impl flotilla::__private::Actor for Counter`, dispatching calls by
///   method name.
/// - For every constructor (an associated function without `self` that
///   returns `Self` or the type), a registration that lets workers build
///   the actor: pass the function to `client.submit_actor(Counter::new, args)`.
/// - `CounterProxy` (async) and `CounterBlockingProxy` (for
///   `flotilla::blocking`): one method per `&self`/`&mut self` method, with
///   the same arguments and visibility, returning a future of its output.
///
/// # Rules
///
/// - Methods take `&self` or `&mut self`, may be `async`, and return `T`,
///   `()` or `Result<T, E>` (an `Err` fails the call, as for tasks).
/// - Arguments are owned types (they travel as bytes); no generics, no
///   `impl Trait`. The type must be `Send` (and `Sync` for `async` methods
///   that take `&self`).
/// - The type may not be generic; the attribute takes no arguments.
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    actor::expand(attr.into(), item.into()).into()
}
