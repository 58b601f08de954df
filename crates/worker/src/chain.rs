//! Chains: a task sent in the same delivery as the input it waits for (the
//! scheduler's `Core::chain_after`) starts here as soon as that input ends,
//! and takes its value from memory rather than from Redis. A link of a
//! chain thus costs neither an event to the scheduler nor a dispatch back
//! through the broker; the scheduler still hears of every task's end from
//! the usual events.
//!
//! The task that others wait for hands its outcome over through
//! [`Handoffs`]:
//! - a value of up to [`COPY_LIMIT`] bytes is copied to its waiters at
//!   once;
//! - a larger value is handed over once its batch is stored (the waiters
//!   read it as any input: from the worker's kept values or shared memory,
//!   without a copy here);
//! - an error fails its waiters with the same error, as the scheduler
//!   would fail a waiting dependent;
//! - a task that ends without an outcome here (its delivery given back, the
//!   worker retiring or stopping) lets its waiters go their own way, which
//!   ends the same way for them;
//! - a batch that could not be stored takes its delivery back to the
//!   queue: the waiters, and theirs, leave without running or reporting,
//!   and the whole delivery runs again.
//!
//! A waiter that ends (failed with its input's error, or run) hands its own
//! outcome to the next link the same way.
//!
//! Hand-offs are kept by delivery and task: the same tasks may arrive again
//! in another delivery while the first is still winding down (given back to
//! the queue and redelivered to this worker, or sent again after a lapsed
//! custody), and a link of the second must never hear of the end of its
//! input in the first (a task given back there would send the link off to
//! read a value never stored).

use crate::bundle::BundleId;
use crate::registry::TaskOutcome;
use bytes::Bytes;
use flotilla_proto::TaskError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Values up to this size are copied to the tasks waiting for them.
pub(crate) const COPY_LIMIT: usize = 1024 * 1024;

/// What a task waiting for another of its delivery learns.
#[derive(Debug, Clone)]
pub(crate) enum Handoff {
    /// Not ended yet.
    Pending,
    /// Its value (encoded, as stored).
    Value(Bytes),
    /// It failed: the waiter fails with the same error.
    Failed(TaskError),
    /// Its value is stored: the waiter reads it as any input.
    Stored,
    /// It ended without an outcome here: the waiter goes on by itself
    /// (and finds its delivery given back, or the worker retiring).
    Gone,
    /// Its outcome was not stored and its delivery goes back to the
    /// queue: the waiter leaves without running or reporting.
    Dropped,
}

/// One awaited task: its waiters' channel, and whether its value is
/// handed over only once stored.
struct Awaited {
    tx: watch::Sender<Handoff>,
    until_stored: bool,
}

/// An awaited task: its delivery and its key.
type Id = (BundleId, String);

/// The tasks awaited by others of their delivery, by delivery and key.
#[derive(Default)]
pub(crate) struct Handoffs {
    awaited: Mutex<HashMap<Id, Awaited>>,
}

impl Handoffs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Awaited>> {
        self.awaited.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A task of `bundle`, the delivery being accepted, waits for `key`,
    /// of the same delivery: what it will learn.
    pub(crate) fn expect(&self, bundle: BundleId, key: &str) -> watch::Receiver<Handoff> {
        let mut awaited = self.lock();
        let id = (bundle, key.to_owned());
        match awaited.get(&id) {
            Some(entry) => entry.tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(Handoff::Pending);
                awaited.insert(
                    id,
                    Awaited {
                        tx,
                        until_stored: false,
                    },
                );
                rx
            }
        }
    }

    fn send(&self, id: &Id, handoff: Handoff) {
        if let Some(entry) = self.lock().remove(id) {
            entry.tx.send_replace(handoff);
        }
    }

    /// The awaited task `id` ended with `outcome` (with `retrying`, a
    /// failure to be run again: its waiters go their own way).
    fn ended(&self, key: &Id, outcome: &TaskOutcome, retrying: bool) {
        match outcome {
            _ if retrying => self.send(key, Handoff::Gone),
            Err(error) => self.send(key, Handoff::Failed(error.clone())),
            Ok(value) if value.len() <= COPY_LIMIT => {
                self.send(key, Handoff::Value(Bytes::copy_from_slice(value)));
            }
            Ok(_) => {
                if let Some(entry) = self.lock().get_mut(key) {
                    entry.until_stored = true;
                }
            }
        }
    }

    /// The awaited task `key` ends without an outcome here (unless it gave
    /// one already): its waiters go their own way.
    fn gone(&self, key: &Id) {
        let mut awaited = self.lock();
        if awaited.get(key).is_some_and(|entry| !entry.until_stored) {
            if let Some(entry) = awaited.remove(key) {
                entry.tx.send_replace(Handoff::Gone);
            }
        }
    }

    /// The batch holding these tasks' outcomes (delivery and key) was
    /// stored and announced (`ok`), or not: the waiters for a large value
    /// read it, or leave.
    pub(crate) fn stored<'a>(&self, keys: impl Iterator<Item = (BundleId, &'a str)>, ok: bool) {
        let mut awaited = self.lock();
        if awaited.is_empty() {
            return;
        }
        for (bundle, key) in keys {
            let id = (bundle, key.to_owned());
            if awaited.get(&id).is_some_and(|entry| entry.until_stored) {
                if let Some(entry) = awaited.remove(&id) {
                    entry.tx.send_replace(if ok {
                        Handoff::Stored
                    } else {
                        Handoff::Dropped
                    });
                }
            }
        }
    }

    /// The worker's connected life ends: every waiter leaves (the
    /// deliveries are the broker's again).
    pub(crate) fn close(&self) {
        for (_, entry) in self.lock().drain() {
            entry.tx.send_replace(Handoff::Dropped);
        }
    }
}

/// Waits until the awaited task hands something over.
pub(crate) async fn wait(mut rx: watch::Receiver<Handoff>) -> Handoff {
    match rx
        .wait_for(|handoff| !matches!(handoff, Handoff::Pending))
        .await
    {
        Ok(handoff) => handoff.clone(),
        // Its entry went without a word: as if it ended by itself.
        Err(_) => Handoff::Gone,
    }
}

/// Tells the waiters of an awaited task that it is gone when dropped (on
/// every way out of the task's run); harmless once it handed over its
/// outcome.
pub(crate) struct Awaiting {
    handoffs: Arc<Handoffs>,
    id: Id,
}

impl Awaiting {
    /// The guard of awaited task `key` of delivery `bundle`.
    pub(crate) fn new(handoffs: Arc<Handoffs>, bundle: BundleId, key: String) -> Self {
        Awaiting {
            handoffs,
            id: (bundle, key),
        }
    }

    /// The task ended with `outcome`.
    pub(crate) fn ended(&self, outcome: &TaskOutcome, retrying: bool) {
        self.handoffs.ended(&self.id, outcome, retrying);
    }

    /// The task leaves unrun with the task it waited for, whose delivery
    /// goes back to the queue: its own waiters leave too.
    pub(crate) fn dropped(&self) {
        self.handoffs.send(&self.id, Handoff::Dropped);
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        self.handoffs.gone(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Encoded, ErrorKind};

    fn now(rx: &watch::Receiver<Handoff>) -> Handoff {
        rx.borrow().clone()
    }

    fn id(key: &str) -> Id {
        (BundleId::of(0), key.to_owned())
    }

    #[test]
    fn a_small_value_is_copied_to_every_waiter_and_its_entry_goes() {
        let handoffs = Handoffs::default();
        let b = BundleId::of(0);
        let (x, y) = (handoffs.expect(b, "p"), handoffs.expect(b, "p"));
        assert!(matches!(now(&x), Handoff::Pending));
        handoffs.ended(&id("p"), &Ok(Encoded::from_vec(vec![1, 2])), false);
        for rx in [x, y] {
            assert!(matches!(now(&rx), Handoff::Value(v) if v.as_ref() == [1, 2]));
        }
        assert!(handoffs.lock().is_empty());
        // Ending again (a duplicate key) finds nobody: nothing happens.
        handoffs.ended(&id("p"), &Ok(Encoded::from_vec(vec![3])), false);
        handoffs.gone(&id("p"));
    }

    #[test]
    fn an_error_fails_the_waiter_and_a_retried_one_lets_it_go() {
        let handoffs = Handoffs::default();
        let b = BundleId::of(0);
        let error = TaskError::new(ErrorKind::User, "E", "boom");
        let rx = handoffs.expect(b, "p");
        handoffs.ended(&id("p"), &Err(error.clone()), false);
        assert!(matches!(now(&rx), Handoff::Failed(e) if e == error));
        let rx = handoffs.expect(b, "q");
        handoffs.ended(&id("q"), &Err(error), true);
        assert!(matches!(now(&rx), Handoff::Gone));
    }

    #[test]
    fn a_large_value_is_handed_over_once_stored_or_dropped_with_its_batch() {
        let handoffs = Arc::new(Handoffs::default());
        let b = BundleId::of(0);
        let large = Ok(Encoded::from_vec(vec![0; COPY_LIMIT + 1]));
        let (p, q) = (handoffs.expect(b, "p"), handoffs.expect(b, "q"));
        for key in ["p", "q"] {
            let guard = Awaiting::new(handoffs.clone(), b, key.to_owned());
            guard.ended(&large, false);
            // The task's run is over: its guard goes, the value is not
            // stored yet, so the waiter still waits.
            drop(guard);
        }
        assert!(matches!(now(&p), Handoff::Pending));
        // The same key of another delivery is not this one.
        handoffs.stored([(BundleId::of(1), "p")].into_iter(), false);
        assert!(matches!(now(&p), Handoff::Pending));
        handoffs.stored([(b, "p"), (b, "other")].into_iter(), true);
        handoffs.stored([(b, "q")].into_iter(), false);
        assert!(matches!(now(&p), Handoff::Stored));
        assert!(matches!(now(&q), Handoff::Dropped));
        assert!(handoffs.lock().is_empty());
    }

    #[tokio::test]
    async fn a_task_that_ends_without_an_outcome_lets_its_waiters_go() {
        let handoffs = Arc::new(Handoffs::default());
        let b = BundleId::of(0);
        let rx = handoffs.expect(b, "p");
        let waiter = tokio::spawn(wait(rx));
        drop(Awaiting::new(handoffs.clone(), b, "p".to_owned()));
        assert!(matches!(waiter.await.unwrap(), Handoff::Gone));
        let rx = handoffs.expect(b, "q");
        handoffs.close();
        assert!(matches!(wait(rx).await, Handoff::Dropped));
    }

    #[test]
    fn a_second_delivery_of_the_same_tasks_never_hears_the_first() {
        // Delivery 0 is given back; before its tasks have wound down, the
        // same chain arrives again as delivery 1 on this worker.
        let handoffs = Arc::new(Handoffs::default());
        let (first, second) = (BundleId::of(0), BundleId::of(1));
        let old = handoffs.expect(first, "p");
        let new = handoffs.expect(second, "p");
        // The first delivery's `p` leaves unrun: only its own waiter goes
        // its way; the second's still waits for its own `p`.
        drop(Awaiting::new(handoffs.clone(), first, "p".to_owned()));
        assert!(matches!(now(&old), Handoff::Gone));
        assert!(matches!(now(&new), Handoff::Pending));
        let guard = Awaiting::new(handoffs.clone(), second, "p".to_owned());
        guard.ended(&Ok(Encoded::from_vec(vec![7])), false);
        assert!(matches!(now(&new), Handoff::Value(v) if v.as_ref() == [7]));
    }
}
