//! The project's tasks. The worker binary (`my-worker`) serves them; client
//! programs (`my-client`) submit them. Both name this crate, so both are
//! built from the same code: the wire carries each task's name and a
//! fingerprint of its signature, and a worker refuses a task it does not
//! know.

use serde::{Deserialize, Serialize};

/// A plain function: its arguments and result are any `serde` types.
#[flotilla::task]
pub fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// A task that may fail: the client gets `Error::Task` with this message.
#[flotilla::task]
pub fn might_fail(x: i64) -> Result<i64, String> {
    if x < 0 {
        Err("Negative value".into())
    } else {
        Ok(x * x)
    }
}

/// A value of the project's own type.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// How many values.
    pub count: usize,
    /// Their sum.
    pub total: i64,
}

/// An async task. Given a `Vec` of futures, it receives their values.
#[flotilla::task]
pub async fn summarize(xs: Vec<i64>) -> Summary {
    tokio::task::yield_now().await;
    Summary {
        count: xs.len(),
        total: xs.iter().sum(),
    }
}

/// Which worker ran it, after a pause, so that a batch spreads over the
/// workers. A task that takes a `TaskContext` first gets it from the worker.
#[flotilla::task]
pub async fn worker_of(ctx: flotilla::TaskContext, millis: u64) -> String {
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
    ctx.worker_id().to_owned()
}

/// What each worker builds once at start and lends to every task that asks
/// for it (a connection pool, a model, settings): `my-worker` names
/// [`init`] in `flotilla::worker_main!(my_tasks; state = my_tasks::init)`.
pub struct Settings {
    /// How [`greet`] greets.
    pub greeting: String,
}

/// Builds the worker's [`Settings`], once per worker process (an
/// `async fn` works too, with `state = async my_tasks::init`).
pub fn init() -> Settings {
    Settings {
        greeting: "Hello".to_owned(),
    }
}

/// A task reading the worker's shared state: a `State<T>` parameter is
/// filled by the worker, not sent by the client (`greet` takes one
/// argument, the name).
#[flotilla::task]
pub fn greet(settings: flotilla::State<Settings>, name: String) -> String {
    format!("{}, {name}!", settings.greeting)
}
