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

/// The tasks awaited by others of their delivery, by key.
#[derive(Default)]
pub(crate) struct Handoffs {
    awaited: Mutex<HashMap<String, Awaited>>,
}

impl Handoffs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Awaited>> {
        self.awaited.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A task of the delivery being accepted waits for `key`, of the same
    /// delivery: what it will learn.
    pub(crate) fn expect(&self, key: &str) -> watch::Receiver<Handoff> {
        let mut awaited = self.lock();
        match awaited.get(key) {
            Some(entry) => entry.tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(Handoff::Pending);
                awaited.insert(
                    key.to_owned(),
                    Awaited {
                        tx,
                        until_stored: false,
                    },
                );
                rx
            }
        }
    }

    fn send(&self, key: &str, handoff: Handoff) {
        if let Some(entry) = self.lock().remove(key) {
            entry.tx.send_replace(handoff);
        }
    }

    /// The awaited task `key` ended with `outcome` (with `retrying`, a
    /// failure to be run again: its waiters go their own way).
    pub(crate) fn ended(&self, key: &str, outcome: &TaskOutcome, retrying: bool) {
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
    pub(crate) fn gone(&self, key: &str) {
        let mut awaited = self.lock();
        if awaited.get(key).is_some_and(|entry| !entry.until_stored) {
            if let Some(entry) = awaited.remove(key) {
                entry.tx.send_replace(Handoff::Gone);
            }
        }
    }

    /// The batch holding these tasks' outcomes was stored and announced
    /// (`ok`), or not: the waiters for a large value read it, or leave.
    pub(crate) fn stored<'a>(&self, keys: impl Iterator<Item = &'a str>, ok: bool) {
        let mut awaited = self.lock();
        if awaited.is_empty() {
            return;
        }
        for key in keys {
            if awaited.get(key).is_some_and(|entry| entry.until_stored) {
                if let Some(entry) = awaited.remove(key) {
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
    key: String,
}

impl Awaiting {
    /// The guard of awaited task `key`.
    pub(crate) fn new(handoffs: Arc<Handoffs>, key: String) -> Self {
        Awaiting { handoffs, key }
    }

    /// The task ended with `outcome`.
    pub(crate) fn ended(&self, outcome: &TaskOutcome, retrying: bool) {
        self.handoffs.ended(&self.key, outcome, retrying);
    }

    /// The task leaves unrun with the task it waited for, whose delivery
    /// goes back to the queue: its own waiters leave too.
    pub(crate) fn dropped(&self) {
        self.handoffs.send(&self.key, Handoff::Dropped);
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        self.handoffs.gone(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Encoded, ErrorKind};

    fn now(rx: &watch::Receiver<Handoff>) -> Handoff {
        rx.borrow().clone()
    }

    #[test]
    fn a_small_value_is_copied_to_every_waiter_and_its_entry_goes() {
        let handoffs = Handoffs::default();
        let (a, b) = (handoffs.expect("p"), handoffs.expect("p"));
        assert!(matches!(now(&a), Handoff::Pending));
        handoffs.ended("p", &Ok(Encoded::from_vec(vec![1, 2])), false);
        for rx in [a, b] {
            assert!(matches!(now(&rx), Handoff::Value(v) if v.as_ref() == [1, 2]));
        }
        assert!(handoffs.lock().is_empty());
        // Ending again (a duplicate key) finds nobody: nothing happens.
        handoffs.ended("p", &Ok(Encoded::from_vec(vec![3])), false);
        handoffs.gone("p");
    }

    #[test]
    fn an_error_fails_the_waiter_and_a_retried_one_lets_it_go() {
        let handoffs = Handoffs::default();
        let error = TaskError::new(ErrorKind::User, "E", "boom");
        let rx = handoffs.expect("p");
        handoffs.ended("p", &Err(error.clone()), false);
        assert!(matches!(now(&rx), Handoff::Failed(e) if e == error));
        let rx = handoffs.expect("q");
        handoffs.ended("q", &Err(error), true);
        assert!(matches!(now(&rx), Handoff::Gone));
    }

    #[test]
    fn a_large_value_is_handed_over_once_stored_or_dropped_with_its_batch() {
        let handoffs = Arc::new(Handoffs::default());
        let large = Ok(Encoded::from_vec(vec![0; COPY_LIMIT + 1]));
        let (p, q) = (handoffs.expect("p"), handoffs.expect("q"));
        for key in ["p", "q"] {
            let guard = Awaiting::new(handoffs.clone(), key.to_owned());
            guard.ended(&large, false);
            // The task's run is over: its guard goes, the value is not
            // stored yet, so the waiter still waits.
            drop(guard);
        }
        assert!(matches!(now(&p), Handoff::Pending));
        handoffs.stored(["p", "other"].into_iter(), true);
        handoffs.stored(["q"].into_iter(), false);
        assert!(matches!(now(&p), Handoff::Stored));
        assert!(matches!(now(&q), Handoff::Dropped));
        assert!(handoffs.lock().is_empty());
    }

    #[tokio::test]
    async fn a_task_that_ends_without_an_outcome_lets_its_waiters_go() {
        let handoffs = Arc::new(Handoffs::default());
        let rx = handoffs.expect("p");
        let waiter = tokio::spawn(wait(rx));
        drop(Awaiting::new(handoffs.clone(), "p".to_owned()));
        assert!(matches!(waiter.await.unwrap(), Handoff::Gone));
        let rx = handoffs.expect("q");
        handoffs.close();
        assert!(matches!(wait(rx).await, Handoff::Dropped));
    }
}
