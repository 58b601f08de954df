//! `worker_main!` with shared state, in both forms: `state = init` for a
//! `fn() -> T` and `state = async init` for an `async fn() -> T`. Each
//! expands to a `fn main` (here inside a module and never called: it would
//! parse the test's flags and serve tasks), so this case is checked by
//! compiling it: a form that stopped expanding, or an `init` of the wrong
//! shape being accepted, breaks the build of this test binary. Running
//! `state = my_tasks::init` for real is `tests/user_crate.rs`' job.

// The generated `main`s, and so the `init`s, are never called here.
#![allow(dead_code)]

/// What the workers would lend.
pub struct Settings(&'static str);

fn init() -> Settings {
    Settings("sync")
}

async fn init_async() -> Settings {
    Settings("async")
}

mod sync_state {
    flotilla::worker_main!(flotilla; state = super::init);
}

mod async_state {
    flotilla::worker_main!(flotilla; state = async super::init_async,);
}
