//! Task slots, giving them back while a task waits (Dask's
//! `secede`/`rejoin`, done automatically), and the delivery window that
//! follows them.
//!
//! A task holds one of its worker's slots while it runs. When it waits on
//! other futures — a task that submits tasks and gathers them — it lends the
//! slot back, so that the tasks it waits for can run even on a worker with a
//! single slot, and takes a slot again when the wait ends. A recursive
//! divide-and-conquer therefore never deadlocks the cluster.
//!
//! The worker holds about as many task deliveries as it has slots to run
//! them ([`Window`]): a task queued behind a busy slot would be a hostage
//! (head-of-line blocking), since no other worker can take it. A task that
//! lends its slot keeps its delivery, so the window grows by one while it
//! waits, and shrinks again when it takes a slot back; a task in custody
//! (its delivery acknowledged early) still runs in a slot but holds no
//! delivery, so it shrinks the window.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

tokio::task_local! {
    static CURRENT: Arc<Slot>;
}

/// The number of task deliveries a worker should hold, kept up to date as
/// tasks lend their slots and go into custody; the runtime applies each
/// change as the consuming channel's prefetch (`basic.qos`).
#[derive(Debug)]
pub(crate) struct Window {
    slots: usize,
    /// (tasks that lent their slot, tasks in custody)
    held: watch::Sender<(usize, usize)>,
}

impl Window {
    /// A window for a worker of `slots` slots.
    pub(crate) fn new(slots: usize) -> Arc<Self> {
        Arc::new(Window {
            slots,
            held: watch::Sender::new((0, 0)),
        })
    }

    /// Deliveries to hold now.
    pub(crate) fn prefetch(&self) -> u16 {
        let (lent, custody) = *self.held.borrow();
        prefetch_for(self.slots, lent, custody)
    }

    /// Wakes on every change of [`Window::prefetch`].
    pub(crate) fn subscribe(&self) -> watch::Receiver<(usize, usize)> {
        self.held.subscribe()
    }

    fn lent(&self) {
        self.held.send_modify(|(lent, _)| *lent += 1);
    }

    fn rejoined(&self) {
        self.held
            .send_modify(|(lent, _)| *lent = lent.saturating_sub(1));
    }

    /// `tasks` are in custody now.
    pub(crate) fn set_custody(&self, tasks: usize) {
        self.held.send_if_modified(|(_, custody)| {
            let changed = *custody != tasks;
            *custody = tasks;
            changed
        });
    }
}

/// The prefetch of a worker of `slots` slots, `lent` of them lent by
/// waiting tasks (which keep their deliveries) and `custody` taken by tasks
/// whose deliveries were acknowledged early: one delivery per slot a
/// delivered task can use. Never 0, which AMQP reads as "unlimited".
pub(crate) fn prefetch_for(slots: usize, lent: usize, custody: usize) -> u16 {
    let wanted = slots.saturating_add(lent).saturating_sub(custody).max(1);
    u16::try_from(wanted).unwrap_or(u16::MAX)
}

/// The slot a running task occupies.
pub(crate) struct Slot {
    semaphore: Arc<Semaphore>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    waits: AtomicUsize,
    window: Arc<Window>,
}

/// A slot lent while its task waits; taken back by [`Lent::rejoin`], or
/// when dropped (the waiting task was stopped), only counted back.
struct Lent<'a> {
    slot: &'a Slot,
    rejoined: bool,
}

impl Lent<'_> {
    async fn rejoin(mut self) {
        self.rejoined = true;
        if self.slot.waits.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.slot.window.rejoined();
            if let Ok(permit) = self.slot.semaphore.clone().acquire_owned().await {
                *self.slot.permit.lock().unwrap_or_else(|p| p.into_inner()) = Some(permit);
            }
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if !self.rejoined && self.slot.waits.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.slot.window.rejoined();
        }
    }
}

impl Slot {
    pub(crate) fn new(
        semaphore: Arc<Semaphore>,
        permit: OwnedSemaphorePermit,
        window: Arc<Window>,
    ) -> Arc<Self> {
        Arc::new(Slot {
            semaphore,
            permit: Mutex::new(Some(permit)),
            waits: AtomicUsize::new(0),
            window,
        })
    }

    fn secede(&self) -> Lent<'_> {
        if self.waits.fetch_add(1, Ordering::AcqRel) == 0 {
            self.window.lent();
            drop(self.permit.lock().unwrap_or_else(|p| p.into_inner()).take());
        }
        Lent {
            slot: self,
            rejoined: false,
        }
    }

    /// Gives the slot back for good (the task ended).
    pub(crate) fn release(&self) {
        drop(self.permit.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Runs an async task as the occupant of this slot.
    pub(crate) async fn scope<F: Future>(self: Arc<Self>, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// Runs a synchronous task as the occupant of this slot.
    pub(crate) fn sync_scope<R>(self: Arc<Self>, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }
}

/// Awaits `future`; inside a running task, the task's slot is lent back to
/// its worker meanwhile. Outside a task it is a plain `.await`.
pub async fn seceded<F: Future>(future: F) -> F::Output {
    match CURRENT.try_with(Arc::clone) {
        Err(_) => future.await,
        Ok(slot) => {
            let lent = slot.secede();
            let output = future.await;
            lent.rejoin().await;
            output
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_task_lends_its_slot() {
        let semaphore = Arc::new(Semaphore::new(1));
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let window = Window::new(1);
        let slot = Slot::new(semaphore.clone(), permit, window.clone());
        let inner = semaphore.clone();
        let inner_window = window.clone();
        slot.clone()
            .scope(async move {
                assert_eq!(inner.available_permits(), 0);
                assert_eq!(inner_window.prefetch(), 1);
                let (free_while_waiting, prefetch_while_waiting) =
                    seceded(async { (inner.available_permits(), inner_window.prefetch()) }).await;
                assert_eq!(free_while_waiting, 1);
                assert_eq!(
                    prefetch_while_waiting, 2,
                    "the waiting task keeps its delivery: one more may come"
                );
                assert_eq!(inner.available_permits(), 0, "the slot is taken back");
                assert_eq!(inner_window.prefetch(), 1);
            })
            .await;
        slot.release();
        assert_eq!(semaphore.available_permits(), 1);
        assert_eq!(
            seceded(async { 7 }).await,
            7,
            "outside a task it is a plain await"
        );
    }

    #[tokio::test]
    async fn nested_waits_lend_once_and_a_stopped_wait_gives_the_window_back() {
        let semaphore = Arc::new(Semaphore::new(2));
        let window = Window::new(2);
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let slot = Slot::new(semaphore.clone(), permit, window.clone());
        let inner_window = window.clone();
        slot.clone()
            .scope(async move {
                let nested =
                    seceded(async { seceded(async { inner_window.prefetch() }).await }).await;
                assert_eq!(nested, 3, "one slot lent, however deep the wait");
                // A wait that never ends, stopped (its task cancelled).
                let stopped = tokio::time::timeout(
                    std::time::Duration::from_millis(10),
                    seceded(std::future::pending::<()>()),
                )
                .await;
                assert!(stopped.is_err());
                assert_eq!(inner_window.prefetch(), 2, "counted back when dropped");
            })
            .await;
        slot.release();
    }

    #[test]
    fn the_window_is_one_delivery_per_usable_slot_never_unlimited() {
        assert_eq!(prefetch_for(1, 0, 0), 1);
        assert_eq!(prefetch_for(4, 0, 0), 4);
        assert_eq!(prefetch_for(4, 3, 0), 7, "waiting parents keep theirs");
        assert_eq!(
            prefetch_for(4, 0, 2),
            2,
            "custody holds slots, not deliveries"
        );
        assert_eq!(prefetch_for(1, 0, 5), 1, "0 would mean unlimited");
        assert_eq!(prefetch_for(usize::MAX, 1, 0), u16::MAX);
        let window = Window::new(3);
        window.set_custody(1);
        assert_eq!(window.prefetch(), 2);
        let changes = window.subscribe();
        window.set_custody(1);
        assert!(!changes.has_changed().unwrap(), "no change, no wake-up");
        window.set_custody(0);
        assert!(changes.has_changed().unwrap());
        assert_eq!(window.prefetch(), 3);
    }
}
