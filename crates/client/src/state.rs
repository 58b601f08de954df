//! The state all handles of one key share in one client: where the task
//! stands ([`Status`]), its outcome once done, the hooks waiting for it,
//! and the room it takes while pending (see [`crate::room`]).
//!
//! A [`FutureState`] is updated by the client's completion events and read
//! by every handle ([`crate::TaskFuture`]); when the last reference to it
//! goes, it tells its [`Owner`] (the client's table of futures) so that the
//! key is released.

use crate::error::{Error, Result};
use std::fmt;
use std::sync::{Mutex, Weak};
use tokio::sync::Notify;

/// What a future's state belongs to: the client whose table of futures
/// lists it ([`crate::inner::ClientInner`]).
pub(crate) trait Owner: Send + Sync {
    /// The last reference to the state of `key` is gone: release the
    /// client's reference to it.
    fn forget(&self, key: &str);
}

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
    /// It failed (see [`TaskFuture::exception`](crate::TaskFuture::exception)).
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
    Finished(Option<bytes::Bytes>),
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
    /// The client whose table lists this state (dangling for a future
    /// that failed before it was submitted).
    owner: Weak<dyn Owner>,
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
    pub(crate) fn new(key: String, owner: Weak<dyn Owner>) -> Self {
        FutureState {
            key,
            outcome: Mutex::new(Outcome::Pending),
            notify: Notify::new(),
            hooks: Mutex::new(Vec::new()),
            owner,
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
            *outcome = Outcome::Finished(inline.map(bytes::Bytes::from));
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
    pub(crate) fn done_outcome(&self) -> Option<Result<Option<bytes::Bytes>>> {
        match &*self.lock() {
            Outcome::Finished(inline) => Some(Ok(inline.clone())),
            Outcome::Failed(error) => Some(Err(error.clone())),
            Outcome::Pending | Outcome::Running => None,
        }
    }

    /// The error of a future that failed before it was ever submitted (its
    /// arguments could not be sent): there is no task behind its key.
    pub(crate) fn never_submitted(&self) -> Option<Error> {
        if self.owner.upgrade().is_some() {
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
        if let Some(owner) = self.owner.upgrade() {
            owner.forget(&self.key);
        }
    }
}
