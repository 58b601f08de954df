//! Backpressure: a client has room for [`Config::max_pending`] pending
//! tasks (submitted, and neither finished nor released).
//!
//! Room is a semaphore permit held by the future's shared state: it goes
//! back when the task finishes or fails, or when the last handle of the
//! future is dropped (the task is released). Permits are handed out in
//! submission order, by one ordered path: a submission takes one at once
//! when nothing is waiting before it; otherwise it queues in the outbox
//! ([`crate::outbox`]), which takes the permits in order and holds back
//! everything after a submission still waiting for room (so a release can
//! never overtake the submission it follows). A submission that took its
//! permit never sits behind one waiting for room, so the permits of
//! waiting submissions always come from tasks already sent, which finish
//! on their own: the line cannot deadlock.
//!
//! ```no_run
//! # use flotilla::prelude::*;
//! #[flotilla::task]
//! fn add(x: i64, y: i64) -> i64 { x + y }
//!
//! # async fn demo(client: &Client) -> flotilla::Result<()> {
//! // Returns at once; past the bound the submission waits in the outbox.
//! let a = client.submit(add, (1, 2));
//! // Waits here until the client has room.
//! let b = client.submit_with(add, (3, 4)).submit_async().await;
//! // Errs with `Error::TooManyPending` instead of waiting.
//! match client.submit_with(add, (5, 6)).try_submit() {
//!     Ok(c) => println!("{}", c.result().await?),
//!     Err(flotilla::Error::TooManyPending { limit, .. }) => println!("over {limit}"),
//!     Err(other) => return Err(other),
//! }
//! # let _ = (a, b);
//! # Ok(())
//! # }
//! ```
//!
//! [`Config::max_pending`]: flotilla_proto::Config::max_pending

use crate::state::FutureState;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// One client's room for pending tasks.
pub(crate) struct Room {
    limit: usize,
    permits: Arc<Semaphore>,
    /// Submissions queued in the outbox without a permit yet. Locked while a
    /// submission decides how it is admitted and is queued, so that the
    /// queue order and the order permits are taken in agree.
    line: Mutex<usize>,
}

/// A submission queued without room: the outbox takes a permit for it
/// before it sends it (and before anything queued after it).
pub(crate) struct Waiting {
    state: Weak<FutureState>,
    /// Told once the submission has its room (`submit_async` waits on it).
    admitted: Option<oneshot::Sender<()>>,
}

impl Room {
    /// Room for `limit` pending tasks.
    pub(crate) fn new(limit: usize) -> Room {
        Room {
            limit,
            permits: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            line: Mutex::new(0),
        }
    }

    /// The bound ([`flotilla_proto::Config::max_pending`]).
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Tasks pending now (permits taken), including those queued for room;
    /// `line` is the guard from [`Room::lock`].
    pub(crate) fn pending(&self, line: &MutexGuard<'_, usize>) -> usize {
        let waiting = **line;
        self.limit
            .saturating_sub(self.permits.available_permits())
            .saturating_add(waiting)
    }

    /// Holds the line: queue the submission before letting go of it.
    pub(crate) fn lock(&self) -> MutexGuard<'_, usize> {
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit at once, when no submission waits before this one and one
    /// is free. `line` is the guard from [`Room::lock`].
    pub(crate) fn take_now(&self, line: &MutexGuard<'_, usize>) -> Option<OwnedSemaphorePermit> {
        if **line > 0 {
            return None;
        }
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Queues a submission for room; returns what the outbox needs and
    /// what `submit_async` may wait on.
    pub(crate) fn queue(
        &self,
        line: &mut MutexGuard<'_, usize>,
        state: &Arc<FutureState>,
    ) -> (Waiting, oneshot::Receiver<()>) {
        **line += 1;
        let (admitted, told) = oneshot::channel();
        (
            Waiting {
                state: Arc::downgrade(state),
                admitted: Some(admitted),
            },
            told,
        )
    }

    /// For the outbox: a permit at once, if one is free.
    pub(crate) fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// For the outbox: waits for a permit.
    pub(crate) async fn take(&self) -> OwnedSemaphorePermit {
        match self.permits.clone().acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => unreachable!("the room's semaphore is never closed"),
        }
    }

    /// For the outbox: `waiting` has its `permit`; it leaves the line.
    pub(crate) fn admit(&self, mut waiting: Waiting, permit: OwnedSemaphorePermit) {
        {
            let mut line = self.lock();
            *line = line.saturating_sub(1);
        }
        // A future dropped meanwhile was released: its permit goes back now.
        if let Some(state) = waiting.state.upgrade() {
            state.hold_room(permit);
        }
        if let Some(admitted) = waiting.admitted.take() {
            let _ = admitted.send(());
        }
    }
}
