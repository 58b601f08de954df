//! `TaskFuture<T>`: a handle on a task's result that lives in the cluster.
//!
//! Handles are cheap to clone; every handle of one key in one client shares
//! one state, updated when the completion event arrives. The value itself
//! stays in Redis (small values ride along with the event) and is read when
//! asked for.

use crate::capture;
use crate::error::{Error, Result};
use crate::inner::ClientInner;
use crate::outbox::Op;
use crate::state::{FutureState, Status};
use serde::de::DeserializeOwned;
use std::fmt;
use std::future::IntoFuture;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

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
        cancel(&self.client, std::slice::from_ref(self), true)
    }

    /// Runs the task again if it failed.
    pub fn retry(&self) {
        retry(&self.client, std::slice::from_ref(self))
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
    pub(crate) async fn encoded(&self) -> Result<bytes::Bytes> {
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

/// Cancels `futures` (and their dependents) through `client`'s outbox;
/// with `force`, running ones are stopped too (see
/// [`Client::cancel`](crate::Client::cancel)).
pub(crate) fn cancel<T>(client: &ClientInner, futures: &[TaskFuture<T>], force: bool) {
    let keys: Vec<String> = futures.iter().map(|f| f.key().to_owned()).collect();
    for future in futures {
        future
            .state
            .set_failed(Error::Cancelled(future.key().to_owned()));
    }
    client.send(Op::Cancel(keys, force));
}

/// Runs the failed ones of `futures` again, through `client`'s outbox.
pub(crate) fn retry<T>(client: &ClientInner, futures: &[TaskFuture<T>]) {
    let keys: Vec<String> = futures
        .iter()
        .filter(|f| f.state.reset_if_failed())
        .map(|f| f.key().to_owned())
        .collect();
    if !keys.is_empty() {
        client.send(Op::Retry(keys));
    }
}

/// Decodes a task's value; a [`crate::Bytes`] in it shares `bytes`.
pub(crate) fn decode_value<T: DeserializeOwned>(key: &str, bytes: &bytes::Bytes) -> Result<T> {
    let decoded = flotilla_proto::decode_sharing([bytes.clone()], || rmp_serde::from_slice(bytes));
    decoded.map_err(|e| Error::Decode {
        key: key.to_owned(),
        type_name: std::any::type_name::<T>(),
        message: e.to_string(),
    })
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
        capture::record(&self.state, &self.client).map_err(serde::ser::Error::custom)?;
        serializer.serialize_newtype_struct(capture::FUTURE_TOKEN, self.key())
    }
}

/// A future deserializes only out of a [`Variable`](crate::Variable) or a
/// [`Queue`](crate::Queue), as a future of the reading client, which holds
/// it from then on like any other.
impl<'de, T> serde::Deserialize<'de> for TaskFuture<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let key = deserializer.deserialize_newtype_struct(capture::FUTURE_TOKEN, KeyVisitor)?;
        let future = capture::resolve(&key).map_err(serde::de::Error::custom)?;
        Ok(TaskFuture::from_state(future.state, future.client))
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

#[cfg(test)]
mod tests {
    use super::decode_value;

    #[test]
    fn a_bytes_result_shares_the_received_buffer_and_others_copy() {
        let value = crate::Bytes::from(vec![4u8; 1 << 20]);
        let received = bytes::Bytes::from(flotilla_proto::value_to_vec(&value).unwrap());
        let range = received.as_ptr_range();
        let shared: crate::Bytes = decode_value("k", &received).unwrap();
        assert_eq!(shared, value);
        assert!(range.contains(&shared.as_ptr()), "no copy");
        let copied: Vec<u8> = decode_value("k", &received).unwrap();
        assert_eq!(copied, value);
        let wrong = decode_value::<u64>("k", &received).unwrap_err();
        assert!(wrong.to_string().contains("k"), "{wrong}");
    }
}
