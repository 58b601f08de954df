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

#[doc(hidden)]
pub use crate::actor::BlockingRuntime;
use crate::args::{ArgWriter, IntoArg, IntoArgs};
use crate::error::{Error, Result};
use crate::state::Status;
use flotilla_proto::Task;
use flotilla_proto::{Arg, Config};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// A blocking client; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Client {
    inner: crate::client::Client,
    runtime: Arc<tokio::runtime::Runtime>,
    _flush: Arc<FlushOnDrop>,
}

/// When the last handle of a blocking client goes (a script ending), sends
/// what is still queued — the releases of the futures dropped just before —
/// before the runtime stops, so that nothing stays held until the lease lapses.
#[derive(Debug)]
struct FlushOnDrop {
    client: crate::client::Client,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.runtime.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), client.finish()).await
        });
    }
}

/// The old name of [`TaskFuture`].
#[deprecated(since = "0.1.0", note = "renamed `TaskFuture`")]
pub type Future<T> = TaskFuture<T>;

/// A blocking handle on a task's result.
#[must_use = "dropping the last handle on a task that has not started cancels it; keep the future, or pass it to `fire_and_forget`"]
pub struct TaskFuture<T> {
    inner: crate::future::TaskFuture<T>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl<T> Clone for TaskFuture<T> {
    fn clone(&self) -> Self {
        TaskFuture {
            inner: self.inner.clone(),
            runtime: self.runtime.clone(),
        }
    }
}

impl<T> std::fmt::Debug for TaskFuture<T> {
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
        let inner = runtime.block_on(crate::client::Client::connect(config))?;
        let flush = Arc::new(FlushOnDrop {
            client: inner.clone(),
            runtime: runtime.clone(),
        });
        Ok(Client {
            inner,
            runtime,
            _flush: flush,
        })
    }

    /// A handle on the same client whose submissions run in the trace
    /// `traceparent`; see [`crate::Client::with_traceparent`].
    pub fn with_traceparent(&self, traceparent: crate::TraceParent) -> Client {
        Client {
            inner: self.inner.with_traceparent(traceparent),
            runtime: self.runtime.clone(),
            _flush: self._flush.clone(),
        }
    }

    /// The async client underneath.
    pub fn as_async(&self) -> &crate::client::Client {
        &self.inner
    }

    /// The runtime its operations block on.
    pub(crate) fn runtime(&self) -> &Arc<tokio::runtime::Runtime> {
        &self.runtime
    }

    fn wrap<T>(&self, inner: crate::future::TaskFuture<T>) -> TaskFuture<T> {
        TaskFuture {
            inner,
            runtime: self.runtime.clone(),
        }
    }

    /// Submits a task; see [`crate::Client::submit`]. Blocks while this
    /// client has `FLOTILLA_MAX_PENDING` tasks pending (submitted, neither
    /// finished nor released), until one finishes or is dropped; see
    /// [`Submit::try_submit`] to be refused instead.
    pub fn submit<K: Task, A: IntoArgs<K::Args>>(&self, task: K, args: A) -> TaskFuture<K::Output> {
        self.submit_with(task, args).submit()
    }

    /// Submits a task once per argument tuple; see [`crate::Client::map`].
    /// Each submission blocks as [`Client::submit`] does: past the bound
    /// on pending tasks, this returns once the tasks beyond it could be
    /// sent (earlier ones finished), so it never deadlocks while workers
    /// run the tasks.
    pub fn map<K: Task, A: IntoArgs<K::Args>>(
        &self,
        task: K,
        args: impl IntoIterator<Item = A>,
    ) -> Vec<TaskFuture<K::Output>> {
        args.into_iter().map(|a| self.submit(task, a)).collect()
    }

    /// Like [`Client::submit`], with options; see
    /// [`crate::Client::submit_with`].
    pub fn submit_with<K: Task, A: IntoArgs<K::Args>>(&self, task: K, args: A) -> Submit<'_, K, A> {
        Submit {
            client: self,
            inner: self.inner.submit_with(task, args),
        }
    }

    /// Stores a value in the cluster; see [`crate::Client::scatter`].
    pub fn scatter<T: Serialize>(&self, value: &T) -> Result<TaskFuture<T>> {
        let inner = self.runtime.block_on(self.inner.scatter(value))?;
        Ok(self.wrap(inner))
    }

    /// Scatters every value; see [`crate::Client::scatter_many`].
    pub fn scatter_many<T: Serialize>(
        &self,
        values: impl IntoIterator<Item = T>,
    ) -> Result<Vec<TaskFuture<T>>> {
        let inner = self.runtime.block_on(self.inner.scatter_many(values))?;
        Ok(inner.into_iter().map(|f| self.wrap(f)).collect())
    }

    /// A future for a key submitted anywhere; see [`crate::Client::get_future`].
    pub fn get_future<T>(&self, key: &str) -> TaskFuture<T> {
        let _guard = self.runtime.enter();
        self.wrap(self.inner.get_future(key))
    }

    /// Cancels tasks; see [`crate::Client::cancel`].
    pub fn cancel<T>(&self, futures: &[TaskFuture<T>], force: bool) {
        let _guard = self.runtime.enter();
        let inner: Vec<crate::future::TaskFuture<T>> =
            futures.iter().map(|f| f.inner.clone()).collect();
        self.inner.cancel(&inner, force);
    }

    /// Runs failed tasks again; see [`crate::Client::retry`].
    pub fn retry<T>(&self, futures: &[TaskFuture<T>]) {
        let _guard = self.runtime.enter();
        let inner: Vec<crate::future::TaskFuture<T>> =
            futures.iter().map(|f| f.inner.clone()).collect();
        self.inner.retry(&inner);
    }

    /// Publishes futures under a name; see [`crate::Client::publish_dataset`].
    pub fn publish_dataset<T>(&self, name: &str, futures: &[TaskFuture<T>]) -> Result<()> {
        let inner: Vec<crate::future::TaskFuture<T>> =
            futures.iter().map(|f| f.inner.clone()).collect();
        self.runtime
            .block_on(self.inner.publish_dataset(name, &inner))
    }

    /// The futures of a published dataset.
    pub fn get_dataset<T>(&self, name: &str) -> Result<Vec<TaskFuture<T>>> {
        let inner = self.runtime.block_on(self.inner.get_dataset(name))?;
        Ok(inner.into_iter().map(|f| self.wrap(f)).collect())
    }

    /// Names of the published datasets.
    pub fn list_datasets(&self) -> Result<Vec<String>> {
        self.runtime.block_on(self.inner.list_datasets())
    }

    /// Removes a published dataset.
    pub fn unpublish_dataset(&self, name: &str) -> Result<()> {
        self.runtime.block_on(self.inner.unpublish_dataset(name))
    }

    /// Futures in the order they complete, as a blocking iterator.
    pub fn as_completed<T>(
        &self,
        futures: impl IntoIterator<Item = TaskFuture<T>>,
    ) -> AsCompleted<T> {
        let _guard = self.runtime.enter();
        AsCompleted {
            inner: crate::as_completed::as_completed(futures.into_iter().map(|f| f.inner)),
            runtime: self.runtime.clone(),
        }
    }

    /// Waits for futures; see [`crate::wait`].
    pub fn wait<T>(
        &self,
        futures: &[TaskFuture<T>],
        return_when: crate::as_completed::ReturnWhen,
        timeout: Option<Duration>,
    ) -> Result<DoneAndNotDone<T>> {
        let inner: Vec<crate::future::TaskFuture<T>> =
            futures.iter().map(|f| f.inner.clone()).collect();
        let (done, not_done) =
            self.runtime
                .block_on(crate::as_completed::wait(&inner, return_when, timeout))?;
        Ok((
            done.into_iter().map(|f| self.wrap(f)).collect(),
            not_done.into_iter().map(|f| self.wrap(f)).collect(),
        ))
    }

    /// Shows a progress bar until every future is done.
    pub fn progress<T>(&self, futures: &[TaskFuture<T>]) {
        let inner: Vec<crate::future::TaskFuture<T>> =
            futures.iter().map(|f| f.inner.clone()).collect();
        self.runtime.block_on(crate::as_completed::progress(&inner));
    }

    /// Waits for all futures and returns their values in order; see
    /// [`crate::Client::gather`].
    pub fn gather<T: DeserializeOwned>(&self, futures: &[TaskFuture<T>]) -> Result<Vec<T>> {
        let inner: Vec<crate::future::TaskFuture<T>> =
            futures.iter().map(|f| f.inner.clone()).collect();
        self.runtime.block_on(self.inner.gather(&inner))
    }
}

/// What [`Client::wait`] returns: `(done, not_done)`.
pub type DoneAndNotDone<T> = (Vec<TaskFuture<T>>, Vec<TaskFuture<T>>);

/// Options for one submission; see [`Client::submit_with`].
#[must_use = "a submission is sent by calling .submit()"]
pub struct Submit<'c, K: Task, A> {
    client: &'c Client,
    inner: crate::client::Submit<'c, K, A>,
}

impl<K: Task, A: IntoArgs<K::Args>> Submit<'_, K, A> {
    /// Higher runs first among ready tasks.
    pub fn priority(self, priority: i32) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.priority(priority),
        }
    }

    /// Gives the task this key.
    pub fn key(self, key: impl Into<String>) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.key(key),
        }
    }

    /// `false` gives the task a fresh random key.
    pub fn pure(self, pure: bool) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.pure(pure),
        }
    }

    /// Runs the task again up to `retries` times if it fails.
    pub fn retries(self, retries: u32) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.retries(retries),
        }
    }

    /// Waits this long before the first retry; see
    /// [`crate::Submit::retry_delay`].
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// #[flotilla::task]
    /// fn fetch(url: String) -> Result<usize, std::io::Error> {
    ///     Ok(url.len())
    /// }
    ///
    /// # fn demo(client: &flotilla::blocking::Client) -> flotilla::Result<()> {
    /// let length = client
    ///     .submit_with(fetch, ("https://example.com".to_string(),))
    ///     .retries(3)
    ///     .retry_delay(Duration::from_millis(500))
    ///     .backoff(2.0)
    ///     .max_retry_delay(Duration::from_secs(2))
    ///     .retry_on(["io::Error"])
    ///     .submit()
    ///     .result()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn retry_delay(self, delay: Duration) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.retry_delay(delay),
        }
    }

    /// Each retry waits `factor` times longer than the one before; see
    /// [`crate::Submit::backoff`].
    pub fn backoff(self, factor: f64) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.backoff(factor),
        }
    }

    /// Caps the wait between tries; see [`crate::Submit::max_retry_delay`].
    pub fn max_retry_delay(self, max: Duration) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.max_retry_delay(max),
        }
    }

    /// Spreads the retries of tasks that failed together; see
    /// [`crate::Submit::retry_jitter`].
    pub fn retry_jitter(self, jitter: bool) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.retry_jitter(jitter),
        }
    }

    /// Retries only on these error kinds and types; see
    /// [`crate::Submit::retry_on`].
    pub fn retry_on<E: Into<crate::RetryOn>>(self, errors: impl IntoIterator<Item = E>) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.retry_on(errors),
        }
    }

    /// Does not start the task before `time`; see [`crate::Submit::at`].
    ///
    /// ```no_run
    /// # use std::time::{Duration, SystemTime};
    /// # #[flotilla::task]
    /// # fn report(day: u32) -> u32 { day }
    /// # fn demo(client: &flotilla::blocking::Client) {
    /// let future = client
    ///     .submit_with(report, (7,))
    ///     .at(SystemTime::now() + Duration::from_secs(3600))
    ///     .submit();
    /// # }
    /// ```
    pub fn at(self, time: std::time::SystemTime) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.at(time),
        }
    }

    /// Does not start the task before `delay` from now; see
    /// [`crate::Submit::after`].
    pub fn after(self, delay: Duration) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.after(delay),
        }
    }

    /// Runs the task only on these workers.
    pub fn workers<S: Into<String>>(self, workers: impl IntoIterator<Item = S>) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.workers(workers),
        }
    }

    /// With `workers`: run elsewhere when none of them is alive.
    pub fn allow_other_workers(self, allow: bool) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.allow_other_workers(allow),
        }
    }

    /// Abstract resources the task needs.
    pub fn resources<S: Into<String>>(self, resources: impl IntoIterator<Item = (S, u64)>) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.resources(resources),
        }
    }

    /// A time limit for the task's run (see [`crate::Submit::timeout`]):
    /// past it the task fails with
    /// [`ErrorKind::TimedOut`](crate::ErrorKind::TimedOut).
    pub fn timeout(self, limit: std::time::Duration) -> Self {
        Submit {
            client: self.client,
            inner: self.inner.timeout(limit),
        }
    }

    /// Submits the task, blocking while this client has
    /// `FLOTILLA_MAX_PENDING` tasks pending (see
    /// [`crate::Submit::submit_async`]).
    pub fn submit(self) -> TaskFuture<K::Output> {
        let inner = self.inner;
        let future = self.client.runtime.block_on(
            // It yields the task's future, itself awaitable for the result.
            #[allow(clippy::async_yields_async)]
            async move {
                inner.submit_async().await
            },
        );
        self.client.wrap(future)
    }

    /// Submits the task if this client has room for it now, else returns
    /// [`crate::Error::TooManyPending`] (see [`crate::Submit::try_submit`]).
    pub fn try_submit(self) -> Result<TaskFuture<K::Output>> {
        let _guard = self.client.runtime.enter();
        let future = self.inner.try_submit()?;
        Ok(self.client.wrap(future))
    }
}

/// Futures in completion order, as a blocking iterator.
pub struct AsCompleted<T> {
    inner: crate::as_completed::AsCompleted<T>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl<T> std::fmt::Debug for AsCompleted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl<T> AsCompleted<T> {
    /// Adds a future to wait for.
    pub fn add(&mut self, future: TaskFuture<T>) {
        self.inner.add(future.inner);
    }

    /// Futures not yet yielded.
    pub fn count(&self) -> usize {
        self.inner.count()
    }

    /// Whether every future has been yielded.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Every future completed by now, without waiting.
    pub fn next_batch(&mut self) -> Vec<TaskFuture<T>> {
        let runtime = self.runtime.clone();
        self.inner
            .next_batch()
            .into_iter()
            .map(|inner| TaskFuture {
                inner,
                runtime: runtime.clone(),
            })
            .collect()
    }
}

impl<T> Iterator for AsCompleted<T> {
    type Item = TaskFuture<T>;

    fn next(&mut self) -> Option<TaskFuture<T>> {
        let inner = self.runtime.block_on(self.inner.next())?;
        Some(TaskFuture {
            inner,
            runtime: self.runtime.clone(),
        })
    }
}

/// Marks a future to run even when no handle is left; see
/// [`crate::fire_and_forget`].
pub fn fire_and_forget<T>(future: &TaskFuture<T>) {
    crate::client::fire_and_forget(&future.inner);
}

impl<T> TaskFuture<T> {
    /// Cancels the task (stopping it if it runs).
    pub fn cancel(&self) {
        let _guard = self.runtime.enter();
        self.inner.cancel();
    }

    /// Runs the task again if it failed.
    pub fn retry(&self) {
        let _guard = self.runtime.enter();
        self.inner.retry();
    }

    /// Blocks until the task is done, without reading its value.
    pub fn wait(&self) {
        self.runtime.block_on(self.inner.wait());
    }

    /// Calls `callback` once the task is done.
    pub fn add_done_callback(&self, callback: impl FnOnce(TaskFuture<T>) + Send + 'static)
    where
        T: 'static,
    {
        let _guard = self.runtime.enter();
        let runtime = self.runtime.clone();
        self.inner
            .add_done_callback(move |inner| callback(TaskFuture { inner, runtime }));
    }

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
    pub fn as_async(&self) -> &crate::future::TaskFuture<T> {
        &self.inner
    }
}

impl<T: DeserializeOwned> TaskFuture<T> {
    /// Blocks until the task is done; returns its value or error.
    pub fn result(&self) -> Result<T> {
        self.runtime.block_on(self.inner.result())
    }

    /// Like [`TaskFuture::result`], giving up after `timeout`.
    pub fn result_timeout(&self, timeout: Duration) -> Result<T> {
        self.runtime.block_on(self.inner.result_timeout(timeout))
    }
}

impl<T> IntoArg<T> for TaskFuture<T> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg> {
        IntoArg::<T>::into_arg(self.inner, writer)
    }
}

impl<T> IntoArg<T> for &TaskFuture<T> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg> {
        IntoArg::<T>::into_arg(&self.inner, writer)
    }
}

impl<T> IntoArg<Vec<T>> for Vec<TaskFuture<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg> {
        let futures: Vec<crate::future::TaskFuture<T>> =
            self.into_iter().map(|f| f.inner).collect();
        IntoArg::<Vec<T>>::into_arg(futures, writer)
    }
}

impl<T> IntoArg<Vec<T>> for &Vec<TaskFuture<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg> {
        let futures: Vec<&crate::future::TaskFuture<T>> = self.iter().map(|f| &f.inner).collect();
        IntoArg::<Vec<T>>::into_arg(futures, writer)
    }
}

/// Serializes like [`crate::TaskFuture`]: only into a
/// [`Variable`](crate::sync::blocking::Variable) or a
/// [`Queue`](crate::sync::blocking::Queue), which hold its result.
impl<T> Serialize for TaskFuture<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.inner.serialize(serializer)
    }
}

/// Deserializes only out of a [`Variable`](crate::sync::blocking::Variable)
/// or a [`Queue`](crate::sync::blocking::Queue) made from a blocking client
/// (in a synchronous task, read a [`crate::TaskFuture`] instead).
impl<'de, T> serde::Deserialize<'de> for TaskFuture<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let inner = crate::future::TaskFuture::<T>::deserialize(deserializer)?;
        let runtime = crate::capture::resolve_runtime().ok_or_else(|| {
            <D::Error as serde::de::Error>::custom(format!(
                "blocking future `{}` can only be read through a blocking Variable or Queue made \
                 from a blocking client; read a flotilla::TaskFuture instead",
                inner.key()
            ))
        })?;
        Ok(TaskFuture { inner, runtime })
    }
}

// --- actors ---

/// Defined with [`ActorProxy`](crate::ActorProxy), which names it; making an
/// actor call's future blocking is done here.
impl BlockingRuntime {
    /// Makes an actor call's future blocking.
    pub fn wrap<T>(&self, inner: crate::future::TaskFuture<T>) -> TaskFuture<T> {
        TaskFuture {
            inner,
            runtime: self.0.clone(),
        }
    }
}

impl Client {
    /// Creates an actor and returns its blocking proxy
    /// (`CounterBlockingProxy`); see [`crate::Client::submit_actor`].
    pub fn submit_actor<C, Args>(
        &self,
        constructor: C,
        args: Args,
    ) -> Result<<<C::Actor as flotilla_task::Actor>::Proxy as crate::actor::ActorProxy>::Blocking>
    where
        C: crate::actor::Constructor<Args>,
        Args: Serialize,
        <C::Actor as flotilla_task::Actor>::Proxy: crate::actor::ActorProxy,
    {
        let proxy = self
            .runtime
            .block_on(self.inner.submit_actor(constructor, args))?;
        Ok(crate::actor::ActorProxy::into_blocking(
            proxy,
            BlockingRuntime(self.runtime.clone()),
        ))
    }
}
// --- end actors ---
