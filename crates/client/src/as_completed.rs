//! `as_completed`, `wait` and `progress`: futures in the order they finish.
//!
//! ```no_run
//! use flotilla::prelude::*;
//! use flotilla::as_completed;
//!
//! #[flotilla::task]
//! fn square(x: i64) -> i64 { x * x }
//!
//! # async fn demo(client: Client) -> flotilla::Result<()> {
//! let mut done = as_completed(client.map(square, (0..10).map(|i| (i,))));
//! while let Some(future) = done.next().await {
//!     match future.result().await {
//!         Ok(value) => println!("{value}"),
//!         Err(error) => println!("failed: {error}"), // errors are yielded, not swallowed
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! An `AsCompleted` holds only the futures it has not yielded yet, so it
//! stays small however many pass through it.

use crate::error::{Error, Result};
use crate::future::TaskFuture;
use serde::de::DeserializeOwned;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Futures in completion order; see the [module docs](self).
pub struct AsCompleted<T> {
    slots: Vec<Option<TaskFuture<T>>>,
    free: Vec<usize>,
    pending: usize,
    tx: mpsc::UnboundedSender<usize>,
    rx: mpsc::UnboundedReceiver<usize>,
}

impl<T> std::fmt::Debug for AsCompleted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsCompleted")
            .field("count", &self.pending)
            .finish()
    }
}

/// Yields `futures` as they complete (finished, erred or cancelled).
pub fn as_completed<T>(futures: impl IntoIterator<Item = TaskFuture<T>>) -> AsCompleted<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut completed = AsCompleted {
        slots: Vec::new(),
        free: Vec::new(),
        pending: 0,
        tx,
        rx,
    };
    for future in futures {
        completed.add(future);
    }
    completed
}

impl<T> AsCompleted<T> {
    /// Adds a future to wait for.
    pub fn add(&mut self, future: TaskFuture<T>) {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let tx = self.tx.clone();
        future.state.on_done(Box::new(move || {
            let _ = tx.send(index);
        }));
        self.slots[index] = Some(future);
        self.pending += 1;
    }

    /// Adds several futures.
    pub fn update(&mut self, futures: impl IntoIterator<Item = TaskFuture<T>>) {
        for future in futures {
            self.add(future);
        }
    }

    /// Futures not yet yielded (running or completed).
    pub fn count(&self) -> usize {
        self.pending
    }

    /// Whether every future has been yielded.
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    fn take(&mut self, index: usize) -> Option<TaskFuture<T>> {
        let future = self.slots.get_mut(index)?.take()?;
        self.free.push(index);
        self.pending -= 1;
        Some(future)
    }

    /// The next future to complete; `None` once all have been yielded.
    pub async fn next(&mut self) -> Option<TaskFuture<T>> {
        std::future::poll_fn(|cx| self.poll_next_future(cx)).await
    }

    fn poll_next_future(&mut self, cx: &mut Context<'_>) -> Poll<Option<TaskFuture<T>>> {
        loop {
            if self.pending == 0 {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(index)) => {
                    if let Some(future) = self.take(index) {
                        return Poll::Ready(Some(future));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Every future that has completed by now, without waiting.
    pub fn next_batch(&mut self) -> Vec<TaskFuture<T>> {
        let mut batch = Vec::new();
        while let Ok(index) = self.rx.try_recv() {
            batch.extend(self.take(index));
        }
        batch
    }

    /// Waits for at least one future, then returns every one completed by
    /// now; empty once all have been yielded.
    pub async fn next_batch_wait(&mut self) -> Vec<TaskFuture<T>> {
        let Some(first) = self.next().await else {
            return Vec::new();
        };
        let mut batch = vec![first];
        batch.extend(self.next_batch());
        batch
    }

    /// Whether a completed future is waiting to be yielded.
    pub fn has_ready(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Yields each future together with its result.
    pub fn with_results(self) -> WithResults<T> {
        WithResults { inner: self }
    }
}

impl<T> futures_core::Stream for AsCompleted<T> {
    type Item = TaskFuture<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TaskFuture<T>>> {
        self.get_mut().poll_next_future(cx)
    }
}

/// [`AsCompleted::with_results`]: futures with their results.
#[derive(Debug)]
pub struct WithResults<T> {
    inner: AsCompleted<T>,
}

impl<T: DeserializeOwned> WithResults<T> {
    /// The next completed future and its result (an error is yielded too).
    pub async fn next(&mut self) -> Option<(TaskFuture<T>, Result<T>)> {
        let future = self.inner.next().await?;
        let result = future.result().await;
        Some((future, result))
    }

    /// Adds a future to wait for.
    pub fn add(&mut self, future: TaskFuture<T>) {
        self.inner.add(future);
    }

    /// Futures not yet yielded.
    pub fn count(&self) -> usize {
        self.inner.count()
    }

    /// Whether every future has been yielded.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// What [`wait`] returns: `(done, not_done)`.
pub type DoneAndNotDone<T> = (Vec<TaskFuture<T>>, Vec<TaskFuture<T>>);

/// When [`wait`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnWhen {
    /// As soon as one future is done.
    FirstCompleted,
    /// Once every future is done.
    AllCompleted,
}

/// Waits for futures; returns `(done, not_done)`. With a timeout, gives up
/// with [`Error::Timeout`] (as Dask's `wait` does).
pub async fn wait<T>(
    futures: &[TaskFuture<T>],
    return_when: ReturnWhen,
    timeout: Option<Duration>,
) -> Result<DoneAndNotDone<T>> {
    let waiting = async {
        let mut completed = as_completed(futures.iter().cloned());
        match return_when {
            ReturnWhen::FirstCompleted => {
                completed.next().await;
            }
            ReturnWhen::AllCompleted => while completed.next().await.is_some() {},
        }
    };
    if !futures.is_empty() {
        match timeout {
            Some(limit) => {
                tokio::time::timeout(limit, waiting)
                    .await
                    .map_err(|_| Error::Timeout {
                        key: format!("{} futures", futures.len()),
                        timeout: limit,
                    })?
            }
            None => waiting.await,
        }
    }
    Ok(futures.iter().cloned().partition(|f| f.done()))
}

/// Shows a progress bar on the terminal until every future is done.
pub async fn progress<T>(futures: &[TaskFuture<T>]) {
    let bar = indicatif::ProgressBar::new(futures.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:40} {pos}/{len} tasks ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut completed = as_completed(futures.iter().cloned());
    while completed.next().await.is_some() {
        bar.inc(1);
    }
    bar.finish();
}
