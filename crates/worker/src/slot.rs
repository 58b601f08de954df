//! Task slots, and giving them back while a task waits (Dask's
//! `secede`/`rejoin`, done automatically).
//!
//! A task holds one of its worker's slots while it runs. When it waits on
//! other futures — a task that submits tasks and gathers them — it lends the
//! slot back, so that the tasks it waits for can run even on a worker with a
//! single slot, and takes a slot again when the wait ends. A recursive
//! divide-and-conquer therefore never deadlocks the cluster.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

tokio::task_local! {
    static CURRENT: Arc<Slot>;
}

/// The slot a running task occupies.
pub(crate) struct Slot {
    semaphore: Arc<Semaphore>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    waits: AtomicUsize,
}

impl Slot {
    pub(crate) fn new(semaphore: Arc<Semaphore>, permit: OwnedSemaphorePermit) -> Arc<Self> {
        Arc::new(Slot {
            semaphore,
            permit: Mutex::new(Some(permit)),
            waits: AtomicUsize::new(0),
        })
    }

    fn secede(&self) {
        if self.waits.fetch_add(1, Ordering::AcqRel) == 0 {
            drop(self.permit.lock().unwrap_or_else(|p| p.into_inner()).take());
        }
    }

    async fn rejoin(&self) {
        if self.waits.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(permit) = self.semaphore.clone().acquire_owned().await {
                *self.permit.lock().unwrap_or_else(|p| p.into_inner()) = Some(permit);
            }
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
            slot.secede();
            let output = future.await;
            slot.rejoin().await;
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
        let slot = Slot::new(semaphore.clone(), permit);
        let inner = semaphore.clone();
        slot.clone()
            .scope(async move {
                assert_eq!(inner.available_permits(), 0);
                let free_while_waiting = seceded(async { inner.available_permits() }).await;
                assert_eq!(free_while_waiting, 1);
                assert_eq!(inner.available_permits(), 0, "the slot is taken back");
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
}
