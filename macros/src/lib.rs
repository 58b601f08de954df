//! Procedural macros for Flotilla.
//!
//! Users never depend on this crate directly: the `flotilla` crate re-exports
//! [`macro@task`] as `#[flotilla::task]`, and the code the macro generates
//! refers only to `::flotilla::__private`, the runtime's side of the contract.
//!
//! A task function becomes a unit struct of the same name (the *handle*) that
//! implements `flotilla::__private::Task`, and a registration submitted to
//! `inventory` so that any worker linking the crate can run it by name.

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
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    task::expand(attr.into(), item.into()).into()
}
