//! Tasks that kill their worker: counting the starts of redelivered tasks,
//! and giving up on a task after too many worker losses.
//!
//! A worker that dies leaves its unacknowledged deliveries to RabbitMQ,
//! which hands them to another worker marked `redelivered`. A task that
//! aborts its process every time would go round forever, taking a worker
//! down at each turn. Dask counts every task that was *queued* on a dead
//! worker as suspicious (dask/distributed#5234), so innocent tasks that
//! merely waited there err too; here only tasks that had *started* count.
//!
//! The first delivery costs nothing extra: nothing is recorded. A
//! redelivered task records its start in Redis (`<ns>:a:{key}`, a hash of
//! `n`, starts not yet completed, and `w`, the worker it last started on)
//! just before it runs, and its completion deletes the record in the same
//! pipeline that stores its result. A task whose record already shows
//! `allowed_failures` lost starts is not run again: it errs
//! [`ErrorKind::WorkerLost`], naming the task and the last worker, and its
//! dependents err with it. With the default of 3 a task that kills its
//! worker every time errs on its 4th worker death (the unrecorded first run
//! plus 3 recorded ones), as with Dask's `allowed-failures = 3`.
//!
//! Tasks that merely waited in a dead worker's prefetch come back
//! redelivered too, start once, complete and delete their record: they
//! never err. A task that was running next to a crashing one is charged
//! the loss as well, but only once: a task with a recorded loss runs alone
//! on its worker (it takes every slot), so from then on only its own crashes
//! count. (So a bystander is charged at most one loss per crashing task:
//! with `allowed_failures` of 1 one crashing neighbour can make it err, with
//! the default of 3 it takes three different ones. `allowed_failures` below 1
//! is taken as 1.)

use flotilla_proto::{ErrorKind, TaskError};
use flotilla_runtime::store::Store;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// What a redelivered task may do.
pub(crate) enum Admission {
    /// Run it: its start is recorded. `isolation` holds the worker's other
    /// slots while a task with a recorded loss runs, so that no other task
    /// is charged if it kills the worker again.
    Run {
        permit: OwnedSemaphorePermit,
        isolation: Option<OwnedSemaphorePermit>,
    },
    /// Its worker died under it too often: report this error instead.
    Lost(TaskError),
    /// The worker is stopping (its slots are closed).
    Closed,
    /// Its delivery was given back (shed) before it started: it does not
    /// run here, and nothing is recorded.
    GivenBack,
}

/// The start records of one worker's redelivered tasks.
pub(crate) struct Ledger {
    store: Store,
    /// Recorded as the last worker: name and id.
    worker: String,
    allowed_failures: u32,
    nthreads: u32,
}

impl Ledger {
    pub(crate) fn new(
        store: Store,
        worker: String,
        allowed_failures: u32,
        nthreads: usize,
    ) -> Self {
        Ledger {
            store,
            worker,
            // With 0, a redelivered task that merely waited in a dead
            // worker's prefetch would err: first runs are not recorded, so
            // one recorded loss is the least that can be told apart.
            allowed_failures: allowed_failures.max(1),
            nthreads: u32::try_from(nthreads.max(1)).unwrap_or(u32::MAX),
        }
    }

    /// Takes a slot for a redelivered task and records its start, or tells
    /// that the task lost its worker too often. Redis failures let the task
    /// run unrecorded (its completion is stored through Redis anyway).
    /// `begin` is asked, once the task has its slot (or before it errs),
    /// whether it still may start here: a delivery given back meanwhile
    /// (see [`crate::bundle::WorkerCore::shed`]) records no start, since
    /// that would count as a loss on its next worker.
    pub(crate) async fn admit(
        &self,
        slots: &Arc<Semaphore>,
        key: &str,
        task: &str,
        begin: impl FnOnce() -> bool,
    ) -> Admission {
        let (losses, last) = self.store.start_record(key).await.unwrap_or_else(|error| {
            warn!(%error, %key, "could not read a redelivered task's start record");
            (None, None)
        });
        let losses = losses.unwrap_or(0);
        if losses >= self.allowed_failures {
            if !begin() {
                return Admission::GivenBack;
            }
            return Admission::Lost(self.error(key, task, losses, last.as_deref()));
        }
        let (permit, isolation) = if losses > 0 {
            let Ok(mut all) = slots.clone().acquire_many_owned(self.nthreads).await else {
                return Admission::Closed;
            };
            let Some(permit) = all.split(1) else {
                return Admission::Closed;
            };
            (permit, Some(all))
        } else {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return Admission::Closed;
            };
            (permit, None)
        };
        if !begin() {
            return Admission::GivenBack;
        }
        let recorded = self
            .store
            .record_start(key, self.allowed_failures, &self.worker)
            .await;
        match recorded {
            Ok((false, losses, last)) => {
                Admission::Lost(self.error(key, task, losses, Some(&last)))
            }
            Ok(_) => Admission::Run { permit, isolation },
            Err(error) => {
                warn!(%error, %key, "could not record a redelivered task's start; running it unrecorded");
                Admission::Run { permit, isolation }
            }
        }
    }

    fn error(&self, key: &str, task: &str, losses: u32, last: Option<&str>) -> TaskError {
        lost_error(key, task, losses, last, self.allowed_failures)
    }
}

/// The error of a task whose worker died under it `recorded` times after
/// its first run, the last time on `last`.
pub(crate) fn lost_error(
    key: &str,
    task: &str,
    recorded: u32,
    last: Option<&str>,
    allowed_failures: u32,
) -> TaskError {
    let last = last.filter(|w| !w.is_empty()).unwrap_or("unknown");
    TaskError::new(
        ErrorKind::WorkerLost,
        "flotilla::WorkerLost",
        format!(
            "task `{key}` (`{task}`) lost its worker {} times, the last on worker {last}; \
             it is not run again (FLOTILLA_ALLOWED_FAILURES={allowed_failures}). \
             It likely crashes its process (abort, out of memory, stack overflow)",
            recorded.saturating_add(1),
        ),
    )
    .at(key, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{new_id, Config};
    use flotilla_runtime::transport;

    #[test]
    fn the_error_names_the_task_the_losses_and_the_worker() {
        let error = lost_error("crash-1", "demo::crash", 3, Some("host-7 (ab12)"), 3);
        assert_eq!(error.kind(), ErrorKind::WorkerLost);
        assert_eq!((error.key(), error.task()), ("crash-1", "demo::crash"));
        for part in [
            "`crash-1`",
            "`demo::crash`",
            "4 times",
            "host-7 (ab12)",
            "=3",
        ] {
            assert!(
                error.message().contains(part),
                "{part} in {}",
                error.message()
            );
        }
        assert!(lost_error("k", "t", 0, None, 1)
            .message()
            .contains("worker unknown"));
    }

    /// The ledger's decisions, on any store.
    async fn starts_are_counted_until_the_limit_and_isolate_the_suspect(store: Store) {
        let ledger = Ledger::new(store.clone(), "w1".into(), 2, 2);
        let slots = Arc::new(Semaphore::new(2));

        // First recorded start: an ordinary slot.
        let Admission::Run { permit, isolation } = ledger.admit(&slots, "k", "t", || true).await
        else {
            panic!("the first redelivery runs");
        };
        assert!(isolation.is_none());
        assert_eq!(slots.available_permits(), 1);
        drop(permit);

        // A recorded loss: the task runs alone.
        let Admission::Run { permit, isolation } = ledger.admit(&slots, "k", "t", || true).await
        else {
            panic!("the second redelivery runs");
        };
        assert!(isolation.is_some());
        assert_eq!(slots.available_permits(), 0);
        drop((permit, isolation));

        // Two recorded losses with 2 allowed: lost.
        match ledger.admit(&slots, "k", "t", || true).await {
            Admission::Lost(error) => {
                assert_eq!(error.kind(), ErrorKind::WorkerLost);
                assert!(error.message().contains("3 times") && error.message().contains("w1"));
            }
            _ => panic!("a task over the limit must not run"),
        }
        assert_eq!(slots.available_permits(), 2);

        // A completion deletes the record: the next redelivery starts afresh.
        let ttl = store.start_record_ttl("k").await.unwrap().unwrap();
        assert!(ttl > 0 && ttl <= flotilla_runtime::store::START_RECORD_EXPIRY_S);
        let mut completion = store.batch();
        completion.forget_start("k");
        completion.exec().await.unwrap();
        let Admission::Run { isolation, .. } = ledger.admit(&slots, "k", "t", || true).await else {
            panic!("a completed task runs again when redelivered");
        };
        assert!(isolation.is_none());
        drop(isolation);

        // Given back before it started: nothing recorded, the slot free.
        let mut completion = store.batch();
        completion.forget_start("k");
        completion.exec().await.unwrap();
        let slots = Arc::new(Semaphore::new(1));
        assert!(matches!(
            ledger.admit(&slots, "k", "t", || false).await,
            Admission::GivenBack
        ));
        assert_eq!(slots.available_permits(), 1);
        assert!(
            store.start_record_ttl("k").await.unwrap().is_none(),
            "a task given back records no start"
        );
    }

    #[tokio::test]
    async fn the_ledger_on_the_memory_store() {
        starts_are_counted_until_the_limit_and_isolate_the_suspect(Store::memory()).await;
    }

    /// Against the real Redis, in a namespace of its own.
    #[tokio::test]
    async fn the_ledger_on_redis() {
        let config = Config::from_env().expect("FLOTILLA_* environment");
        let names = flotilla_proto::Names::new(&format!("t-lost-{}", &new_id()[..12]));
        let mut redis = transport::connect_redis(&config.redis_url).await.unwrap();
        let store = Store::redis(redis.clone(), names.clone());
        let outcome = tokio::spawn(starts_are_counted_until_the_limit_and_isolate_the_suspect(
            store,
        ))
        .await;
        transport::delete_redis_keys(&mut redis, &names)
            .await
            .unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic.into_panic());
        }
    }
}
