//! `TaskFuture<T>`: a handle on a task's result that lives in the cluster.
//!
//! Handles are cheap to clone; every handle of one key in one client shares
//! one state, updated when the completion event arrives. The value itself
//! stays in Redis (small values ride along with the event) and is read when
//! asked for.

use crate::client::ClientInner;
use crate::{Error, Result};
use flotilla_proto::{Codec, StoredResult};
use serde::de::DeserializeOwned;
use std::fmt;
use std::future::IntoFuture;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;

/// Where a task stands, as seen by this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Submitted, not started (or not known to have started).
    Pending,
    /// A worker is running it.
    Running,
    /// Its result is stored.
    Finished,
    /// It failed (see [`TaskFuture::exception`]).
    Error,
    /// It was cancelled.
    Cancelled,
    /// Its result was lost.
    Lost,
}

impl Status {
    /// Whether the task reached an end (finished, erred, cancelled or lost).
    pub fn is_done(self) -> bool {
        !matches!(self, Status::Pending | Status::Running)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Finished => "finished",
            Status::Error => "error",
            Status::Cancelled => "cancelled",
            Status::Lost => "lost",
        })
    }
}

#[derive(Debug)]
pub(crate) enum Outcome {
    Pending,
    Running,
    /// Finished; the encoded value when it came inline.
    Finished(Option<Arc<Vec<u8>>>),
    Failed(Error),
}

/// Called once when a future is done.
pub(crate) type DoneHook = Box<dyn FnOnce() + Send>;

/// The state all handles of one key share.
pub(crate) struct FutureState {
    pub(crate) key: String,
    outcome: Mutex<Outcome>,
    notify: Notify,
    hooks: Mutex<Vec<DoneHook>>,
    client: std::sync::Weak<ClientInner>,
    /// This client's room the task takes while pending (see
    /// [`crate::room`]): given back when it is done, or with the state.
    room: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl fmt::Debug for FutureState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FutureState")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl FutureState {
    pub(crate) fn new(key: String, client: std::sync::Weak<ClientInner>) -> Self {
        FutureState {
            key,
            outcome: Mutex::new(Outcome::Pending),
            notify: Notify::new(),
            hooks: Mutex::new(Vec::new()),
            client,
            room: Mutex::new(None),
        }
    }

    /// Keeps `permit` while the task is pending (dropped at once if it is
    /// done already).
    pub(crate) fn hold_room(&self, permit: tokio::sync::OwnedSemaphorePermit) {
        let outcome = self.lock();
        if matches!(*outcome, Outcome::Finished(_) | Outcome::Failed(_)) {
            return;
        }
        *self.room.lock().unwrap_or_else(|p| p.into_inner()) = Some(permit);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outcome> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn status(&self) -> Status {
        match &*self.lock() {
            Outcome::Pending => Status::Pending,
            Outcome::Running => Status::Running,
            Outcome::Finished(_) => Status::Finished,
            Outcome::Failed(Error::Cancelled(_)) => Status::Cancelled,
            Outcome::Failed(Error::Lost(_)) => Status::Lost,
            Outcome::Failed(_) => Status::Error,
        }
    }

    pub(crate) fn set_running(&self) {
        let mut outcome = self.lock();
        if matches!(*outcome, Outcome::Pending) {
            *outcome = Outcome::Running;
        }
    }

    pub(crate) fn set_finished(&self, inline: Option<Vec<u8>>) {
        {
            let mut outcome = self.lock();
            if matches!(*outcome, Outcome::Finished(_) | Outcome::Failed(_)) {
                return;
            }
            *outcome = Outcome::Finished(inline.map(Arc::new));
        }
        self.done();
    }

    pub(crate) fn set_failed(&self, error: Error) {
        {
            let mut outcome = self.lock();
            if matches!(*outcome, Outcome::Finished(_) | Outcome::Failed(_)) {
                return;
            }
            *outcome = Outcome::Failed(error);
        }
        self.done();
    }

    fn done(&self) {
        drop(self.room.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.notify.notify_waiters();
        let hooks = std::mem::take(&mut *self.hooks.lock().unwrap_or_else(|p| p.into_inner()));
        for hook in hooks {
            hook();
        }
    }

    /// Runs `hook` once the future is done (at once if it already is).
    pub(crate) fn on_done(&self, hook: DoneHook) {
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        if self.status().is_done() {
            drop(hooks);
            hook();
        } else {
            hooks.push(hook);
        }
    }

    /// Back to pending if it failed (for `retry`); whether it did.
    pub(crate) fn reset_if_failed(&self) -> bool {
        let mut outcome = self.lock();
        if matches!(*outcome, Outcome::Failed(_)) {
            *outcome = Outcome::Pending;
            true
        } else {
            false
        }
    }

    /// Waits until the task is done; inside a task, lends the task's slot
    /// to its worker meanwhile (see [`flotilla_worker::seceded`]).
    pub(crate) async fn wait(&self) {
        if self.status().is_done() {
            return;
        }
        flotilla_worker::seceded(self.wait_here()).await
    }

    async fn wait_here(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.status().is_done() {
                return;
            }
            notified.await;
        }
    }

    /// The outcome once done: `Ok(Some(bytes))` when the value came inline,
    /// `Ok(None)` when it must be read from Redis.
    pub(crate) fn done_outcome(&self) -> Option<Result<Option<Arc<Vec<u8>>>>> {
        match &*self.lock() {
            Outcome::Finished(inline) => Some(Ok(inline.clone())),
            Outcome::Failed(error) => Some(Err(error.clone())),
            Outcome::Pending | Outcome::Running => None,
        }
    }

    /// The error of a future that failed before it was ever submitted (its
    /// arguments could not be sent): there is no task behind its key.
    pub(crate) fn never_submitted(&self) -> Option<Error> {
        if self.client.upgrade().is_some() {
            return None;
        }
        self.error()
    }

    pub(crate) fn error(&self) -> Option<Error> {
        match &*self.lock() {
            Outcome::Failed(error) => Some(error.clone()),
            _ => None,
        }
    }
}

impl Drop for FutureState {
    fn drop(&mut self) {
        if let Some(client) = self.client.upgrade() {
            client.forget(&self.key);
        }
    }
}

/// A task's eventual result, of type `T`.
///
/// Returned at once by [`Client::submit`](crate::Client::submit); the task
/// runs in the cluster meanwhile. Await it (or call [`TaskFuture::result`]) for
/// the value; pass it (or `&future`) to another submission to make that task
/// wait for this one and receive its value.
#[must_use = "dropping the last handle on a task that has not started cancels it; keep the future, or pass it to `fire_and_forget`"]
pub struct TaskFuture<T> {
    pub(crate) state: Arc<FutureState>,
    pub(crate) client: Arc<ClientInner>,
    /// The read in progress while this handle is polled as a
    /// [`std::future::Future`]; each handle (clone) polls on its own.
    reading: Mutex<Option<Reading<T>>>,
    _type: PhantomData<fn() -> T>,
}

/// A boxed read of a task's value, kept between polls.
type Reading<T> = Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>;

impl<T> Clone for TaskFuture<T> {
    fn clone(&self) -> Self {
        TaskFuture::from_state(self.state.clone(), self.client.clone())
    }
}

impl<T> fmt::Debug for TaskFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TaskFuture<{}>({}, {})",
            std::any::type_name::<T>(),
            self.state.key,
            self.status()
        )
    }
}

impl<T> TaskFuture<T> {
    pub(crate) fn from_state(state: Arc<FutureState>, client: Arc<ClientInner>) -> Self {
        TaskFuture {
            state,
            client,
            reading: Mutex::new(None),
            _type: PhantomData,
        }
    }

    /// The task's key.
    pub fn key(&self) -> &str {
        &self.state.key
    }

    /// Where the task stands.
    pub fn status(&self) -> Status {
        self.state.status()
    }

    /// Whether the task is done (finished, erred, cancelled or lost).
    pub fn done(&self) -> bool {
        self.status().is_done()
    }

    /// The error, if the task failed; `None` while it runs or once it finished.
    pub fn exception(&self) -> Option<Error> {
        self.state.error()
    }

    /// The remote traceback, if the task failed.
    pub fn traceback(&self) -> Option<String> {
        match self.state.error()? {
            Error::Task(error) => Some(error.traceback().to_owned()),
            _ => None,
        }
    }

    /// Waits until the task is done, without reading its value.
    pub async fn wait(&self) {
        self.state.wait().await
    }

    /// Waits at most `timeout` for the task to be done; `false` on timeout.
    pub async fn wait_timeout(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.wait()).await.is_ok()
    }

    /// Cancels the task and its dependents, stopping it if it runs (see
    /// [`Client::cancel`](crate::Client::cancel)).
    pub fn cancel(&self) {
        crate::Client {
            inner: self.client.clone(),
        }
        .cancel(std::slice::from_ref(self), true)
    }

    /// Runs the task again if it failed.
    pub fn retry(&self) {
        crate::Client {
            inner: self.client.clone(),
        }
        .retry(std::slice::from_ref(self))
    }

    /// Calls `callback` with this future once it is done (finished, erred or
    /// cancelled), on the client's runtime; a panicking callback is logged.
    pub fn add_done_callback(&self, callback: impl FnOnce(TaskFuture<T>) + Send + 'static)
    where
        T: 'static,
    {
        let future = self.clone();
        let runtime = tokio::runtime::Handle::try_current().ok();
        self.state.on_done(Box::new(move || {
            let run = move || {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(future)))
                    .is_err()
                {
                    tracing::warn!("a done-callback panicked");
                }
            };
            match runtime {
                Some(runtime) => drop(runtime.spawn_blocking(run)),
                None => run(),
            }
        }));
    }
}

impl<T: DeserializeOwned> TaskFuture<T> {
    /// Waits for the task and returns its value, or its error.
    pub async fn result(&self) -> Result<T> {
        self.wait().await;
        let bytes = self.encoded().await?;
        decode_value(&self.state.key, &bytes)
    }

    /// Like [`TaskFuture::result`], giving up after `timeout` with
    /// [`Error::Timeout`] (the task itself goes on).
    pub async fn result_timeout(&self, timeout: Duration) -> Result<T> {
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(()) => self.result().await,
            Err(_) => Err(Error::Timeout {
                key: self.state.key.clone(),
                timeout,
            }),
        }
    }

    /// The encoded value of a done task.
    pub(crate) async fn encoded(&self) -> Result<Arc<Vec<u8>>> {
        match self.state.done_outcome() {
            Some(Ok(Some(bytes))) => Ok(bytes),
            Some(Ok(None)) => {
                let mut values = self.client.fetch(&[self.state.key.as_str()]).await?;
                values
                    .pop()
                    .ok_or_else(|| Error::Lost(self.state.key.clone()))?
            }
            Some(Err(error)) => Err(error),
            None => Err(Error::Lost(self.state.key.clone())),
        }
    }
}

pub(crate) fn decode_value<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode {
        key: key.to_owned(),
        type_name: std::any::type_name::<T>(),
        message: e.to_string(),
    })
}

/// Reads a stored result: the value bytes, or its error.
pub(crate) fn read_stored(
    codec: &Codec,
    key: &str,
    stored: Option<Vec<u8>>,
) -> Result<Arc<Vec<u8>>> {
    match stored.map(|stored| codec.open_result(key, stored)) {
        Some(Ok(StoredResult::Ok(bytes))) => Ok(Arc::new(bytes)),
        Some(Ok(StoredResult::Err(error))) => Err(Error::Task(error)),
        Some(Err(error)) => Err(Error::Decode {
            key: key.to_owned(),
            type_name: "stored result",
            message: error.to_string(),
        }),
        None => Err(Error::Lost(key.to_owned())),
    }
}

/// A `TaskFuture` is a plain [`std::future::Future`]: it composes with
/// `join_all`, `select!`, `FuturesUnordered` and any `impl Future`.
///
/// ```no_run
/// # use flotilla::prelude::*;
/// # #[flotilla::task] fn add(x: i64, y: i64) -> i64 { x + y }
/// # async fn demo(client: Client) -> flotilla::Result<()> {
/// use futures::stream::{FuturesUnordered, StreamExt};
///
/// let all = futures::future::join_all((0..10).map(|i| client.submit(add, (i, i)))).await;
/// assert_eq!(all.into_iter().collect::<flotilla::Result<Vec<i64>>>()?[9], 18);
///
/// let fast = client.submit(add, (1, 2));
/// tokio::select! {
///     value = fast => println!("first: {}", value?),
///     _ = tokio::time::sleep(Duration::from_secs(5)) => println!("too slow"),
/// }
///
/// let mut unordered: FuturesUnordered<_> = (0..10).map(|i| client.submit(add, (i, 1))).collect();
/// while let Some(value) = unordered.next().await {
///     println!("{}", value?);
/// }
///
/// fn doubled(client: &Client, x: i64) -> impl std::future::Future<Output = flotilla::Result<i64>> {
///     client.submit(add, (x, x))
/// }
/// assert_eq!(doubled(&client, 4).await?, 8);
/// # Ok(()) }
/// ```
impl<T: DeserializeOwned + Send + 'static> std::future::Future for TaskFuture<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        let reading = this
            .reading
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let read = reading.get_or_insert_with(|| {
            let handle = TaskFuture::<T>::from_state(this.state.clone(), this.client.clone());
            Box::pin(async move { handle.result().await })
        });
        let output = ready!(read.as_mut().poll(cx));
        *reading = None;
        Poll::Ready(output)
    }
}

impl<'a, T: DeserializeOwned + Send + 'static> IntoFuture for &'a TaskFuture<T> {
    type Output = Result<T>;
    type IntoFuture = Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.result())
    }
}

/// A future serializes as its key, but only into the value of a
/// [`Variable`](crate::Variable) or an item of a [`Queue`](crate::Queue)
/// (also inside a `Vec`, a struct...), which then hold its result; anywhere
/// else serializing it is an error, since nothing would keep the result
/// alive.
impl<T> serde::Serialize for TaskFuture<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        crate::sync::held::record(self).map_err(serde::ser::Error::custom)?;
        serializer.serialize_newtype_struct(crate::sync::held::FUTURE_TOKEN, self.key())
    }
}

/// A future deserializes only out of a [`Variable`](crate::Variable) or a
/// [`Queue`](crate::Queue), as a future of the reading client, which holds
/// it from then on like any other.
impl<'de, T> serde::Deserialize<'de> for TaskFuture<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let key =
            deserializer.deserialize_newtype_struct(crate::sync::held::FUTURE_TOKEN, KeyVisitor)?;
        crate::sync::held::resolve(&key).map_err(serde::de::Error::custom)
    }
}

/// Reads a future's key, as a newtype struct or a bare string.
struct KeyVisitor;

impl<'de> serde::de::Visitor<'de> for KeyVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a flotilla future's key")
    }

    fn visit_newtype_struct<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<String, D::Error> {
        <String as serde::Deserialize>::deserialize(deserializer)
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<String, E> {
        Ok(key.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, key: String) -> Result<String, E> {
        Ok(key)
    }
}

/// A future passed to a task as itself, not as its value: the task starts
/// at once and can await it (after [`FutureRef::resolve`]) whenever it
/// wants. The key stays held for the task until it ends, so the value
/// cannot be freed before the task picks it up (dask/distributed#2852).
///
/// ```no_run
/// use flotilla::prelude::*;
/// use flotilla::FutureRef;
///
/// #[flotilla::task]
/// async fn late_reader(ctx: TaskContext, input: FutureRef<i64>) -> flotilla::Result<i64> {
///     let client = ctx.client().await?;
///     input.resolve(&client).await
/// }
///
/// #[flotilla::task]
/// fn slow() -> i64 { 42 }
///
/// # async fn demo(client: Client) -> flotilla::Result<()> {
/// let value = client.submit(slow, ());
/// let reader = client.submit(late_reader, (&value,)); // passed by reference
/// assert_eq!(reader.await?, 42);
/// # Ok(()) }
/// ```
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(bound = "")]
pub struct FutureRef<T> {
    key: String,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for FutureRef<T> {
    fn clone(&self) -> Self {
        FutureRef {
            key: self.key.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for FutureRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FutureRef({})", self.key)
    }
}

impl<T> FutureRef<T> {
    /// The referenced task's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A future of the referenced task, held by `client`.
    pub fn resolve(&self, client: &crate::Client) -> TaskFuture<T> {
        client.get_future(&self.key)
    }
}

impl<T> TaskFuture<T> {
    /// A serializable reference to this future, to hand to a task as itself
    /// (see [`FutureRef`]).
    pub fn to_ref(&self) -> FutureRef<T> {
        FutureRef {
            key: self.state.key.clone(),
            _type: PhantomData,
        }
    }
}
