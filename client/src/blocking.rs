//! A synchronous client for plain `fn main` scripts, in the style of
//! `reqwest::blocking`: it runs its own tokio runtime on background threads.
//! Don't use it inside async code; use [`crate::Client`] there.
//!
//! ```no_run
//! #[flotilla::task]
//! fn add(x: i64, y: i64) -> i64 { x + y }
//!
//! fn main() -> flotilla::Result<()> {
//!     let client = flotilla::blocking::Client::from_env()?;
//!     let future = client.submit(add, (1, 2));
//!     println!("{}", future.result()?); // 3
//!     Ok(())
//! }
//! ```

use crate::args::{ArgWriter, IntoArg, IntoArgs};
use crate::{Error, Result, Status, Task};
use flotilla_proto::{Arg, Config};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

/// A blocking client; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Client {
    inner: crate::Client,
    runtime: Arc<tokio::runtime::Runtime>,
}

/// A blocking handle on a task's result.
pub struct Future<T> {
    inner: crate::Future<T>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl<T> Clone for Future<T> {
    fn clone(&self) -> Self {
        Future {
            inner: self.inner.clone(),
            runtime: self.runtime.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Future<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flotilla-client")
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start the client's runtime: {e}")))
}

impl Client {
    /// Connects with the `FLOTILLA_*` environment variables.
    pub fn from_env() -> Result<Client> {
        Client::connect(Config::from_env()?)
    }

    /// Connects to the cluster `config` describes.
    pub fn connect(config: Config) -> Result<Client> {
        let runtime = Arc::new(runtime()?);
        let inner = runtime.block_on(crate::Client::connect(config))?;
        Ok(Client { inner, runtime })
    }

    /// The async client underneath.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// The runtime its operations block on.
    pub(crate) fn runtime(&self) -> &Arc<tokio::runtime::Runtime> {
        &self.runtime
    }

    fn wrap<T>(&self, inner: crate::Future<T>) -> Future<T> {
        Future {
            inner,
            runtime: self.runtime.clone(),
        }
    }

    /// Submits a task; see [`crate::Client::submit`].
    pub fn submit<K: Task, A: IntoArgs<K::Args>>(&self, task: K, args: A) -> Future<K::Output> {
        let _guard = self.runtime.enter();
        self.wrap(self.inner.submit(task, args))
    }

    /// Submits a task once per argument tuple; see [`crate::Client::map`].
    pub fn map<K: Task, A: IntoArgs<K::Args>>(
        &self,
        task: K,
        args: impl IntoIterator<Item = A>,
    ) -> Vec<Future<K::Output>> {
        let _guard = self.runtime.enter();
        args.into_iter().map(|a| self.submit(task, a)).collect()
    }

    /// Waits for all futures and returns their values in order; see
    /// [`crate::Client::gather`].
    pub fn gather<T: DeserializeOwned>(&self, futures: &[Future<T>]) -> Result<Vec<T>> {
        let inner: Vec<crate::Future<T>> = futures.iter().map(|f| f.inner.clone()).collect();
        self.runtime.block_on(self.inner.gather(&inner))
    }
}

impl<T> Future<T> {
    /// The task's key.
    pub fn key(&self) -> &str {
        self.inner.key()
    }

    /// Where the task stands.
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// Whether the task is done.
    pub fn done(&self) -> bool {
        self.inner.done()
    }

    /// The error, if the task failed.
    pub fn exception(&self) -> Option<Error> {
        self.inner.exception()
    }

    /// The remote traceback, if the task failed.
    pub fn traceback(&self) -> Option<String> {
        self.inner.traceback()
    }

    /// The async future underneath.
    pub fn as_async(&self) -> &crate::Future<T> {
        &self.inner
    }
}

impl<T: DeserializeOwned> Future<T> {
    /// Blocks until the task is done; returns its value or error.
    pub fn result(&self) -> Result<T> {
        self.runtime.block_on(self.inner.result())
    }

    /// Like [`Future::result`], giving up after `timeout`.
    pub fn result_timeout(&self, timeout: Duration) -> Result<T> {
        self.runtime.block_on(self.inner.result_timeout(timeout))
    }
}

impl<T> IntoArg<T> for Future<T> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg> {
        self.inner.into_arg(writer)
    }
}

impl<T> IntoArg<T> for &Future<T> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg> {
        (&self.inner).into_arg(writer)
    }
}

impl<T> IntoArg<Vec<T>> for Vec<Future<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg> {
        self.into_iter()
            .map(|f| f.inner)
            .collect::<Vec<_>>()
            .into_arg(writer)
    }
}

impl<T> IntoArg<Vec<T>> for &Vec<Future<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg> {
        self.iter()
            .map(|f| &f.inner)
            .collect::<Vec<_>>()
            .into_arg(writer)
    }
}
