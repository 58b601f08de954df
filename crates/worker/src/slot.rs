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
//!
//! By default the worker holds a generous window instead, for small tasks'
//! throughput, and sheds (see ARCHITECTURE.md §7): the window also knows
//! since when each slot has been occupied, and a worker whose every slot
//! has held the same task for a while ([`Window::stuck`]) narrows its
//! prefetch to the one above and gives back the deliveries it has not
//! started.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

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
    /// Since when each occupied slot has held its task, by [`Slot`].
    occupants: Mutex<HashMap<u64, Instant>>,
    /// Names each [`Slot`] for `occupants`.
    next_slot: AtomicU64,
    /// Told whenever a slot frees: a shedding worker widens its window
    /// again at once.
    freed: Notify,
    /// Counts the rounds of deliveries given back: the tasks of a bundle
    /// waiting for a slot look whether theirs was one of them.
    given_back: watch::Sender<u64>,
}

impl Window {
    /// A window for a worker of `slots` slots.
    pub(crate) fn new(slots: usize) -> Arc<Self> {
        Arc::new(Window {
            slots,
            held: watch::Sender::new((0, 0)),
            occupants: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(0),
            freed: Notify::new(),
            given_back: watch::Sender::new(0),
        })
    }

    /// Whether the worker is stuck: none of its `free` slot permits is left
    /// and every task in a slot has held it for `after` or longer, so
    /// deliveries it holds unstarted would wait at least as long.
    pub(crate) fn stuck(&self, free: usize, after: Duration) -> bool {
        let occupants = self.occupants.lock().unwrap_or_else(|p| p.into_inner());
        stuck(free, occupants.values().copied(), Instant::now(), after)
    }

    /// Resolves once a slot frees (or freed since the last call).
    pub(crate) async fn freed(&self) {
        self.freed.notified().await;
    }

    /// Deliveries were given back: tasks waiting for a slot look whether
    /// theirs is one.
    pub(crate) fn gave_back(&self) {
        self.given_back.send_modify(|round| *round += 1);
    }

    /// Wakes on every [`Window::gave_back`].
    pub(crate) fn given_back(&self) -> watch::Receiver<u64> {
        self.given_back.subscribe()
    }

    fn occupy(&self, slot: u64) {
        self.occupants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot, Instant::now());
    }

    fn vacate(&self, slot: u64) {
        let was = self
            .occupants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&slot);
        if was.is_some() {
            self.freed.notify_one();
        }
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

/// Whether a worker is stuck, with `free` slot permits left and its
/// occupied slots taken at `occupied_since`: no slot is free and each has
/// held its task for `after` or longer at `now`. A worker with no task in
/// a slot is not stuck (its permits are taken by a task about to start, or
/// held for one that runs alone: see [`crate::lost`]).
pub(crate) fn stuck(
    free: usize,
    occupied_since: impl IntoIterator<Item = Instant>,
    now: Instant,
    after: Duration,
) -> bool {
    let mut occupied = occupied_since.into_iter().peekable();
    free == 0
        && occupied.peek().is_some()
        && occupied.all(|since| now.saturating_duration_since(since) >= after)
}

/// The slot a running task occupies.
pub(crate) struct Slot {
    /// Names the slot in its window's occupants.
    id: u64,
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
                self.slot.window.occupy(self.slot.id);
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
        let id = window.next_slot.fetch_add(1, Ordering::Relaxed);
        window.occupy(id);
        Arc::new(Slot {
            id,
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
            self.window.vacate(self.id);
        }
        Lent {
            slot: self,
            rejoined: false,
        }
    }

    /// Gives the slot back for good (the task ended).
    pub(crate) fn release(&self) {
        drop(self.permit.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.window.vacate(self.id);
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

    #[test]
    fn stuck_means_no_free_slot_and_every_occupant_old() {
        let now = Instant::now();
        let bound = Duration::from_secs(1);
        let old = now - Duration::from_secs(5);
        let young = now - Duration::from_millis(10);
        assert!(stuck(0, [old, old], now, bound));
        assert!(stuck(0, [old, now - bound], now, bound), "at the bound");
        assert!(
            !stuck(0, [old, young], now, bound),
            "a young task frees soon"
        );
        assert!(!stuck(1, [old], now, bound), "a free slot takes deliveries");
        assert!(
            !stuck(0, [], now, bound),
            "permits taken, no task yet: one is about to start"
        );
    }

    #[tokio::test]
    async fn a_window_knows_when_its_slots_are_stuck_and_when_one_frees() {
        let semaphore = Arc::new(Semaphore::new(1));
        let window = Window::new(1);
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let slot = Slot::new(semaphore.clone(), permit, window.clone());
        let free = || semaphore.available_permits();
        assert!(window.stuck(free(), Duration::ZERO));
        assert!(!window.stuck(free(), Duration::from_secs(60)), "too young");
        let inner_window = window.clone();
        let inner = semaphore.clone();
        slot.clone()
            .scope(async move {
                let lent_stuck = seceded(async {
                    inner_window.stuck(inner.available_permits(), Duration::ZERO)
                })
                .await;
                assert!(!lent_stuck, "a lent slot is free");
                assert!(inner_window.stuck(inner.available_permits(), Duration::ZERO));
            })
            .await;
        slot.release();
        assert!(!window.stuck(free(), Duration::ZERO));
        tokio::time::timeout(Duration::from_secs(1), window.freed())
            .await
            .expect("a freed slot is told");
    }
}
