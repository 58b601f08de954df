//! The life cycle of task bundles on a worker, without I/O.
//!
//! A bundle is one delivery of ready tasks. [`WorkerCore`] decides what
//! becomes of it: it is acknowledged once every task in it is complete (its
//! result stored and its completion event confirmed by the broker), rejected
//! back to its queue when storing or announcing one of its tasks fails, or,
//! held too long, acknowledged early with its unfinished tasks put in
//! custody (see [`flotilla_runtime::custody`]), or, none of its tasks
//! started while every slot of the worker is stuck on a long task, given
//! back to its queue for another worker ([`WorkerCore::shed`]). [`admit`] and [`checked`]
//! decide what a delivery is (tasks to run, a control message, something to
//! dead-letter), and [`WorkerCore::plan`] what a batch of completions writes
//! to Redis and announces.
//!
//! Every input is a method call and every output a value (an [`Effect`], an
//! [`Admit`], a [`Plan`]) that the runtime carries out with RabbitMQ and
//! Redis, so these rules are unit-tested without either. The delivery handle
//! `D` is opaque here: the runtime keeps lapin's acker in it, tests a number.

use crate::registry::TaskOutcome;
use flotilla_proto::{ErrorKind, Event, RetryPolicy, RunTask, TaskError, ToWorker};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Results up to this size ride inline in completion events.
pub const INLINE_RESULT_LIMIT: usize = 16 * 1024;

/// A bundle received by this worker, named by the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BundleId(u64);

#[cfg(test)]
impl BundleId {
    /// Bundle `n`, for tests.
    pub(crate) fn of(n: u64) -> Self {
        BundleId(n)
    }
}

/// What the core asks the runtime to do about a delivery.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Effect<D> {
    /// Acknowledge the delivery: its tasks are complete, or in custody.
    Ack(D),
    /// Reject the delivery back to its queue, to be delivered again.
    Requeue(D),
    /// Give the delivery back to its queue unstarted (reject, requeue), for
    /// another worker: this one is stuck on long tasks. Its tasks do not
    /// run here.
    Shed(D),
    /// Renew the custody leases of these unfinished tasks of `bundle` (they
    /// are in the core's custody set already), then report the outcome with
    /// [`WorkerCore::custody_renewed`].
    Renew {
        /// The bundle being handed off.
        bundle: BundleId,
        /// Its unfinished tasks, sorted.
        keys: Vec<String>,
    },
}

/// What to do with a delivery, decided from its decoded message.
#[derive(Debug, PartialEq)]
pub(crate) enum Admit {
    /// Run these tasks; when `check`, only after [`checked`] kept those whose
    /// spec is still stored.
    Run {
        /// The tasks of the bundle.
        tasks: Vec<RunTask>,
        /// A signed bundle: it may be a replay.
        check: bool,
    },
    /// Stop these tasks, then acknowledge.
    Cancel(Vec<String>),
    /// Drop these actors, then acknowledge.
    DropActors(Vec<String>),
    /// Acknowledge, with nothing to do.
    Ack,
    /// Acknowledge a stale control message (why it is stale) unapplied.
    Stale(String),
    /// Reject to the dead-letter exchange, for this reason.
    DeadLetter(String),
    /// Reject back to the queue: it could not be checked now.
    Requeue,
    /// Acknowledge unrun: a bundle of a deposed scheduler (its epoch is
    /// below the newest seen).
    Superseded {
        /// The bundle's epoch.
        epoch: u64,
        /// The newest epoch seen.
        newest: u64,
    },
}

/// The highest scheduler epoch a worker has seen on a bundle (see
/// `ToWorker::Run::epoch`): bundles of a lower one come from a scheduler
/// deposed since (one paused past its leader lease), whose tasks the active
/// scheduler took up from Redis.
#[derive(Debug, Default)]
pub(crate) struct Fence(AtomicU64);

impl Fence {
    /// Records `epoch`; `Err(newest)` when a higher one was seen before
    /// (epoch 0, unfenced, always passes).
    pub(crate) fn admits(&self, epoch: u64) -> Result<(), u64> {
        let newest = self.0.fetch_max(epoch, Ordering::AcqRel);
        if epoch != 0 && epoch < newest {
            Err(newest)
        } else {
            Ok(())
        }
    }
}

/// Decides what a delivery is from its decoded message (with the reason it
/// is stale, if it is), or why it did not decode.
pub(crate) fn admit<S: Display, E: Display>(
    message: Result<(ToWorker, Option<S>), E>,
    sealed: bool,
    fence: &Fence,
) -> Admit {
    match message {
        // A stale task message may have waited behind long tasks: what it
        // holds is checked against Redis. A stale control message is
        // dropped: whatever it was about is long settled.
        Ok((ToWorker::Run { tasks, .. }, _)) if tasks.is_empty() => {
            // The scheduler never sends an empty bundle: this is forged.
            Admit::DeadLetter("empty task bundle".to_owned())
        }
        Ok((ToWorker::Run { mut tasks, epoch }, _)) => match fence.admits(epoch) {
            Err(newest) => Admit::Superseded { epoch, newest },
            // A key twice in one bundle (the scheduler never sends that)
            // runs once: a second copy would store, release its inputs and
            // announce again after the delivery was acknowledged with the
            // first (the core counts a bundle's keys as a set).
            Ok(()) if !distinct(&tasks) => {
                let mut seen = HashSet::new();
                tasks.retain(|task| seen.insert(task.spec.key.clone()));
                Admit::Run {
                    tasks,
                    check: sealed,
                }
            }
            // With signed messages, a delivery may be a replay that reached
            // another worker than the original, a captured copy requeued so
            // that it comes back redelivered, or a message that outlived
            // the replay window: only tasks whose spec is still stored (not
            // done) run. (A task done but whose worker died before
            // reporting it is settled by the scheduler, which checks its
            // long-processing tasks against Redis.)
            Ok(()) => Admit::Run {
                tasks,
                check: sealed,
            },
        },
        Ok((_, Some(stale))) => Admit::Stale(stale.to_string()),
        Ok((ToWorker::Cancel { keys }, None)) => Admit::Cancel(keys),
        Ok((ToWorker::DropActors { keys }, None)) => Admit::DropActors(keys),
        Ok((_, None)) => Admit::Ack,
        Err(error) => Admit::DeadLetter(error.to_string()),
    }
}

/// Whether no key repeats among `tasks`.
fn distinct(tasks: &[RunTask]) -> bool {
    let mut seen = HashSet::with_capacity(tasks.len());
    tasks.iter().all(|task| seen.insert(task.spec.key.as_str()))
}

/// Decides what becomes of a bundle checked against Redis: the tasks whose
/// spec is still stored, or `None` when Redis could not tell.
pub(crate) fn checked(pending: Option<Vec<RunTask>>) -> Admit {
    match pending {
        Some(tasks) if !tasks.is_empty() => Admit::Run {
            tasks,
            check: false,
        },
        Some(_) => Admit::DeadLetter("replayed or stale: its tasks are done".to_owned()),
        // Redis is unreachable: the broker hands the bundle out again.
        None => Admit::Requeue,
    }
}

/// Whether a task's failure is one the scheduler will run again: it may be
/// retried, the error is not one a retry cannot mend, and its `policy`
/// retries on it ([`RetryPolicy::on`]).
pub(crate) fn retrying(may_retry: bool, policy: &RetryPolicy, outcome: &TaskOutcome) -> bool {
    may_retry
        && matches!(outcome, Err(e) if !matches!(
            e.kind(),
            ErrorKind::Cancelled
                | ErrorKind::UnknownTask
                | ErrorKind::SignatureMismatch
                | ErrorKind::WorkerLost
        ) && policy.retries_on(e))
}

/// What a task of a bundle reports to the completion loop.
#[derive(Debug)]
pub(crate) enum Completion {
    /// It is still running after a while.
    Started {
        /// The task.
        key: String,
        /// Its client.
        client: String,
    },
    /// It ended, with `outcome`.
    Done {
        /// The task.
        key: String,
        /// Its client.
        client: String,
        /// The inputs it holds.
        deps: Vec<String>,
        /// Its result or error.
        outcome: TaskOutcome,
        /// A failure the scheduler will run again: neither stored nor
        /// reported to the client.
        retrying: bool,
        /// The task came redelivered, so its start may be recorded (see
        /// [`crate::lost`]): the record goes with its completion.
        recorded: bool,
        /// The bundle it came in.
        bundle: BundleId,
        /// How long it ran (from taking its slot to its outcome), in
        /// microseconds (see [`run_us`]): the scheduler learns its name's
        /// duration from it.
        run_us: u32,
        /// The value is kept by this worker (see [`crate::kept`]): the
        /// `Ok` bytes are its location record, and this is the value's
        /// size (never zero: a value is kept from a size on).
        kept: Option<std::num::NonZeroU64>,
    },
}

/// One write of a batch of completions to Redis.
#[derive(Debug, PartialEq)]
pub(crate) enum Write<'a> {
    /// Delete the start record of a redelivered task: its worker did not
    /// die under it.
    ForgetStart(&'a str),
    /// Delete the task's spec, store its result and release its inputs.
    Finished {
        /// The task.
        key: &'a str,
        /// Its encoded result.
        bytes: &'a [u8],
        /// The inputs it held.
        deps: &'a [String],
        /// `bytes` is a location record: the value is kept by this worker.
        kept: bool,
    },
    /// Store the task's error (its inputs stay held, for `retry`).
    Erred {
        /// The task.
        key: &'a str,
        /// Its error.
        error: &'a TaskError,
    },
}

/// What a batch of completions writes and announces.
#[derive(Debug, Default)]
pub(crate) struct Plan<'a> {
    /// Tasks in custody that leave it with their result.
    pub(crate) released: Vec<String>,
    /// The writes, in order, after the custody release.
    pub(crate) writes: Vec<Write<'a>>,
    /// The events to publish, by client.
    pub(crate) events: BTreeMap<&'a str, Vec<Event>>,
}

impl Plan<'_> {
    /// Whether nothing is to be written to Redis.
    pub(crate) fn writes_nothing(&self) -> bool {
        self.released.is_empty() && self.writes.is_empty()
    }
}

/// What `batch` writes to Redis (stored before anyone hears of it) and
/// announces to clients, `released` leaving custody first.
pub(crate) fn plan(batch: &[Completion], released: Vec<String>) -> Plan<'_> {
    let mut plan = Plan {
        released,
        ..Plan::default()
    };
    for completion in batch {
        let (key, client, deps, outcome, retrying, recorded, run_us, kept) = match completion {
            Completion::Started { key, client } => {
                plan.events
                    .entry(client.as_str())
                    .or_default()
                    .push(Event::Started { key: key.clone() });
                continue;
            }
            Completion::Done {
                key,
                client,
                deps,
                outcome,
                retrying,
                recorded,
                run_us,
                kept,
                ..
            } => (
                key, client, deps, outcome, *retrying, *recorded, *run_us, *kept,
            ),
        };
        if recorded {
            plan.writes.push(Write::ForgetStart(key));
        }
        let event = match outcome {
            Ok(bytes) => {
                plan.writes.push(Write::Finished {
                    key,
                    bytes,
                    deps,
                    kept: kept.is_some(),
                });
                Event::Finished {
                    key: key.clone(),
                    inline: (kept.is_none() && bytes.len() <= INLINE_RESULT_LIMIT)
                        .then(|| bytes.to_vec()),
                    size: kept.map_or(bytes.len() as u64, std::num::NonZeroU64::get),
                    run_us: u64::from(run_us),
                }
            }
            Err(error) => {
                if !retrying {
                    plan.writes.push(Write::Erred { key, error });
                }
                Event::Erred {
                    key: key.clone(),
                    error: error.clone(),
                    retrying,
                }
            }
        };
        plan.events.entry(client.as_str()).or_default().push(event);
    }
    plan
}

/// A run time as the `Finished` event carries it: in microseconds, at least
/// one (zero means "not measured"), at most about 71 minutes (far past
/// anything the scheduler would bundle).
pub(crate) fn run_us(run: Duration) -> u32 {
    u32::try_from(run.as_micros()).unwrap_or(u32::MAX).max(1)
}

/// The queue a bundle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queue {
    /// The shared task queue: any worker could run it.
    Shared,
    /// This worker's own queue (tasks pinned here): it can run nowhere
    /// else, so it is never shed.
    Own,
}

/// Whether a bundle's tasks may still start here, shared by the core and
/// the bundle's tasks: a task that took its slot claims the bundle without
/// the core's lock (once per task: the common path of tiny tasks), and a
/// shed, under the lock, takes only a bundle no task claimed.
#[derive(Debug, Default)]
pub(crate) struct Claim(AtomicU8);

/// No task of the bundle started.
const WAITING: u8 = 0;
/// A task of the bundle started: it is never shed.
const STARTED: u8 = 1;
/// The bundle was given back: its tasks do not run here.
const SHED: u8 = 2;

impl Claim {
    /// A task of the bundle took a slot (or is settled without running):
    /// true, and the bundle is never shed from now on; false when it was
    /// shed first, and the task must not run here (another worker has its
    /// delivery; tell the core with [`WorkerCore::given_back`]).
    pub(crate) fn begin(&self) -> bool {
        match self
            .0
            .compare_exchange(WAITING, STARTED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == STARTED,
        }
    }

    /// Sheds the bundle unless a task started: whether it did.
    fn shed(&self) -> bool {
        self.0
            .compare_exchange(WAITING, SHED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn is_shed(&self) -> bool {
        self.0.load(Ordering::Acquire) == SHED
    }
}

/// One bundle's state.
#[derive(Debug)]
struct Bundle<D> {
    /// Where it came from.
    queue: Queue,
    /// Started, shed, or neither yet.
    claim: Arc<Claim>,
    /// Until acknowledged or rejected: `None` once settled, with nothing
    /// more to tell the broker.
    delivery: Option<D>,
    /// Keys of its tasks not yet complete.
    pending: HashSet<String>,
    /// Acknowledged early (or about to be), its unfinished tasks in custody.
    handed_off: bool,
}

/// The bundles a worker holds and the tasks it keeps in custody.
#[derive(Debug)]
pub(crate) struct WorkerCore<D> {
    bundles: HashMap<BundleId, Bundle<D>>,
    next: u64,
    /// Keys of the tasks in this worker's custody.
    custody: HashSet<String>,
}

impl<D> Default for WorkerCore<D> {
    fn default() -> Self {
        WorkerCore {
            bundles: HashMap::new(),
            next: 0,
            custody: HashSet::new(),
        }
    }
}

impl<D> WorkerCore<D> {
    /// A bundle of tasks `keys` arrived in `delivery` from `queue`, to be
    /// run.
    pub(crate) fn received(
        &mut self,
        delivery: D,
        keys: impl IntoIterator<Item = String>,
        queue: Queue,
    ) -> BundleId {
        let id = BundleId(self.next);
        self.next += 1;
        self.bundles.insert(
            id,
            Bundle {
                queue,
                claim: Arc::default(),
                delivery: Some(delivery),
                pending: keys.into_iter().collect(),
                handed_off: false,
            },
        );
        id
    }

    /// The claim of `bundle`, for its tasks to [`Claim::begin`] with; a
    /// fresh one (never shed) if the core does not hold it any more.
    pub(crate) fn claim(&self, bundle: BundleId) -> Arc<Claim> {
        self.bundles
            .get(&bundle)
            .map(|state| state.claim.clone())
            .unwrap_or_default()
    }

    /// [`Claim::begin`] through the core, for tests: false (and the task
    /// forgotten) when `bundle` was shed.
    #[cfg(test)]
    fn begin(&mut self, bundle: BundleId, key: &str) -> bool {
        if self.claim(bundle).begin() {
            return true;
        }
        self.given_back(bundle, key);
        false
    }

    /// Whether task `key` of `bundle`, still waiting for a slot, was shed;
    /// it is forgotten then. Asked by the waiting tasks after each
    /// [`Self::shed`].
    pub(crate) fn given_back(&mut self, bundle: BundleId, key: &str) -> bool {
        let Some(state) = self.bundles.get_mut(&bundle) else {
            return false;
        };
        if !state.claim.is_shed() {
            return false;
        }
        state.pending.remove(key);
        self.tidy(bundle);
        true
    }

    /// Every slot of the worker is stuck on a long task: each delivery of
    /// the shared queue none of whose tasks started (and not acknowledged
    /// into custody) goes back to the queue, for another worker, in the
    /// order received. Bundles of the worker's own queue stay.
    pub(crate) fn shed(&mut self) -> Vec<Effect<D>> {
        let mut shed: Vec<(BundleId, D)> = self
            .bundles
            .iter_mut()
            .filter(|(_, state)| {
                state.queue == Queue::Shared
                    && !state.handed_off
                    && !state.pending.is_empty()
                    && state.delivery.is_some()
            })
            .filter_map(|(id, state)| {
                if !state.claim.shed() {
                    return None;
                }
                Some((*id, state.delivery.take()?))
            })
            .collect();
        shed.sort_unstable_by_key(|(id, _)| id.0);
        shed.into_iter()
            .map(|(_, delivery)| Effect::Shed(delivery))
            .collect()
    }

    /// Task `key` of `bundle` is complete (stored and announced): the
    /// delivery is acknowledged with its last task, unless handed off.
    pub(crate) fn done(&mut self, bundle: BundleId, key: &str) -> Vec<Effect<D>> {
        let mut effects = Vec::new();
        if let Some(state) = self.bundles.get_mut(&bundle) {
            state.pending.remove(key);
            if state.pending.is_empty() && !state.handed_off {
                effects.extend(state.delivery.take().map(Effect::Ack));
            }
        }
        self.tidy(bundle);
        effects
    }

    /// Task `key` of `bundle` could not be stored or announced: the
    /// delivery goes back to the queue unless it was acknowledged already
    /// (handed off, its lease taken), and the task leaves this worker's
    /// custody, so that its lease lapses and the scheduler hands it out
    /// again. Either way nothing more is told the broker.
    pub(crate) fn failed(&mut self, bundle: BundleId, key: &str) -> Vec<Effect<D>> {
        let mut effects = Vec::new();
        if let Some(state) = self.bundles.get_mut(&bundle) {
            // The delivery is settled: the key only keeps it in the table.
            state.pending.remove(key);
            if state.handed_off {
                // Renewed forever, its lease would hold the task hostage.
                self.custody.remove(key);
            }
            // Still held (a lease being taken, not yet confirmed): settled
            // now, since nothing acknowledges it later.
            effects.extend(state.delivery.take().map(Effect::Requeue));
        }
        self.tidy(bundle);
        effects
    }

    /// `bundle` has been held long enough for RabbitMQ's consumer timeout
    /// to loom: its unfinished tasks go into custody (registered first, so
    /// that a task completing meanwhile leaves custody with its result),
    /// and their leases are to be renewed before the delivery is
    /// acknowledged. Nothing, if it is settled or already handed off.
    pub(crate) fn hand_off(&mut self, bundle: BundleId) -> Vec<Effect<D>> {
        let Some(state) = self.bundles.get_mut(&bundle) else {
            return Vec::new();
        };
        if state.handed_off || state.delivery.is_none() || state.pending.is_empty() {
            return Vec::new();
        }
        state.handed_off = true;
        let mut keys: Vec<String> = state.pending.iter().cloned().collect();
        keys.sort_unstable();
        self.custody.extend(keys.iter().cloned());
        vec![Effect::Renew { bundle, keys }]
    }

    /// The custody leases of `keys`, unfinished tasks of `bundle`, were
    /// renewed (`renewed`) or could not be: the delivery is acknowledged
    /// then, or else the tasks leave custody and the bundle is held as
    /// before (acknowledged now if its tasks completed meanwhile).
    pub(crate) fn custody_renewed(
        &mut self,
        bundle: BundleId,
        keys: &[String],
        renewed: bool,
    ) -> Vec<Effect<D>> {
        let mut effects = Vec::new();
        if !renewed {
            for key in keys {
                self.custody.remove(key);
            }
        }
        if let Some(state) = self.bundles.get_mut(&bundle) {
            if renewed {
                effects.extend(state.delivery.take().map(Effect::Ack));
            } else {
                state.handed_off = false;
                if state.pending.is_empty() {
                    effects.extend(state.delivery.take().map(Effect::Ack));
                }
            }
        }
        self.tidy(bundle);
        effects
    }

    /// The tasks in custody, whose leases are to be renewed.
    pub(crate) fn custody(&self) -> Vec<String> {
        self.custody.iter().cloned().collect()
    }

    /// How many tasks are in custody: they hold no delivery any more.
    pub(crate) fn in_custody(&self) -> usize {
        self.custody.len()
    }

    /// The tasks of `batch` in custody: they leave it with their result.
    pub(crate) fn released(&self, batch: &[Completion]) -> Vec<String> {
        batch
            .iter()
            .filter_map(|completion| match completion {
                Completion::Done { key, .. } if self.custody.contains(key) => Some(key.clone()),
                _ => None,
            })
            .collect()
    }

    /// What `batch` writes to Redis (stored before anyone hears of it) and
    /// announces to clients (see [`plan`]), with the tasks it releases from
    /// custody (the completion loop takes the lock for [`Self::released`]
    /// only).
    #[cfg(test)]
    fn plan<'a>(&self, batch: &'a [Completion]) -> Plan<'a> {
        plan(batch, self.released(batch))
    }

    /// `batch`, planned with `released` leaving custody, was `stored` in
    /// Redis and its events `published` (confirmed): each task is complete
    /// then, or else failed.
    pub(crate) fn completed(
        &mut self,
        batch: &[Completion],
        released: &[String],
        stored: bool,
        published: bool,
    ) -> Vec<Effect<D>> {
        if stored {
            for key in released {
                self.custody.remove(key);
            }
        }
        let mut effects = Vec::new();
        for completion in batch {
            let Completion::Done { bundle, key, .. } = completion else {
                continue;
            };
            effects.extend(if published {
                self.done(*bundle, key)
            } else {
                self.failed(*bundle, key)
            });
        }
        effects
    }

    /// Forgets `bundle` once settled with no task pending.
    fn tidy(&mut self, bundle: BundleId) {
        if self
            .bundles
            .get(&bundle)
            .is_some_and(|state| state.delivery.is_none() && state.pending.is_empty())
        {
            self.bundles.remove(&bundle);
        }
    }

    /// Bundles held (for tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.bundles.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::Encoded;
    use flotilla_proto::TaskSpec;

    type Core = WorkerCore<u64>;

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    fn receive(core: &mut Core, tag: u64, tasks: &[&str]) -> BundleId {
        core.received(tag, keys(tasks), Queue::Shared)
    }

    fn run_task(key: &str) -> RunTask {
        RunTask {
            spec: TaskSpec::new(key.into(), "t".into(), 1, vec![], vec![], "c".into()),
            inline: vec![],
            attempt: 0,
        }
    }

    fn error(kind: ErrorKind) -> TaskError {
        TaskError::new(kind, "E", "failed")
    }

    fn done(bundle: BundleId, key: &str, outcome: Result<Vec<u8>, TaskError>) -> Completion {
        done_for(bundle, key, "c", outcome, false, false)
    }

    fn done_for(
        bundle: BundleId,
        key: &str,
        client: &str,
        outcome: Result<Vec<u8>, TaskError>,
        retrying: bool,
        recorded: bool,
    ) -> Completion {
        Completion::Done {
            key: key.into(),
            client: client.into(),
            deps: vec![format!("{key}-dep")],
            outcome: outcome.map(Encoded::from_vec),
            retrying,
            recorded,
            bundle,
            run_us: 1500,
            kept: None,
        }
    }

    /// Plans, stores (or not) and publishes (or not) one batch, as the
    /// completion loop does, returning the effects.
    fn complete(
        core: &mut Core,
        batch: &[Completion],
        stored: bool,
        published: bool,
    ) -> Vec<Effect<u64>> {
        let released = core.plan(batch).released;
        core.completed(batch, &released, stored, published)
    }

    fn custody(core: &Core) -> Vec<String> {
        let mut keys = core.custody();
        keys.sort_unstable();
        keys
    }

    // --- shedding ---

    #[test]
    fn a_stuck_worker_gives_back_only_unstarted_bundles_of_the_shared_queue() {
        let mut core = Core::default();
        let running = receive(&mut core, 1, &["long"]);
        let waiting = receive(&mut core, 2, &["a", "b"]);
        let pinned = core.received(3, keys(&["p"]), Queue::Own);
        let half = receive(&mut core, 4, &["c", "d"]);
        let custody = receive(&mut core, 5, &["e"]);
        let later = receive(&mut core, 6, &["f"]);
        assert!(core.begin(running, "long"));
        assert!(core.begin(half, "c"), "one task of a bundle started");
        assert!(matches!(
            &core.hand_off(custody)[..],
            [Effect::Renew { .. }]
        ));
        assert_eq!(core.shed(), vec![Effect::Shed(2), Effect::Shed(6)]);
        assert_eq!(core.shed(), vec![], "given back once");
        // Their tasks, woken or taking a slot later, do not run here, and
        // the bundles are forgotten with their last task.
        assert!(core.given_back(waiting, "a"));
        assert!(!core.begin(waiting, "b"));
        assert!(!core.begin(later, "f"));
        assert!(!core.given_back(pinned, "p"), "pinned tasks wait");
        assert!(
            !core.given_back(half, "d"),
            "siblings of a started task wait"
        );
        assert!(core.begin(pinned, "p") && core.begin(half, "d"));
        assert_eq!(core.held(), 4);
        // The bundles kept settle as ever.
        assert_eq!(core.done(running, "long"), vec![Effect::Ack(1)]);
        assert_eq!(core.done(pinned, "p"), vec![Effect::Ack(3)]);
        assert_eq!(core.done(half, "c"), vec![]);
        assert_eq!(core.done(half, "d"), vec![Effect::Ack(4)]);
        assert_eq!(
            core.custody_renewed(custody, &keys(&["e"]), true),
            vec![Effect::Ack(5)]
        );
        assert_eq!(core.done(custody, "e"), vec![]);
        assert_eq!(core.held(), 0, "nothing left behind");
    }

    #[test]
    fn a_shed_bundle_is_neither_acked_requeued_nor_handed_off() {
        let mut core = Core::default();
        let b = receive(&mut core, 7, &["a"]);
        assert_eq!(core.shed(), vec![Effect::Shed(7)]);
        assert_eq!(core.hand_off(b), vec![], "its delivery is gone");
        assert_eq!(core.failed(b, "a"), vec![]);
        assert_eq!(core.held(), 0);
        assert!(
            core.begin(b, "a"),
            "a forgotten bundle's task runs as before"
        );
    }

    #[test]
    fn tasks_of_a_bundle_not_shed_are_not_given_back() {
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a"]);
        assert!(!core.given_back(b, "a"));
        assert!(!core.given_back(BundleId(99), "a"));
        assert!(core.begin(b, "a"));
        assert_eq!(core.shed(), vec![]);
        assert_eq!(core.done(b, "a"), vec![Effect::Ack(1)]);
    }

    // --- acknowledgement ---

    #[test]
    fn a_bundle_is_acked_only_with_its_last_task() {
        let mut core = Core::default();
        let b = receive(&mut core, 7, &["a", "b", "c"]);
        assert_eq!(core.done(b, "a"), vec![]);
        assert_eq!(core.done(b, "c"), vec![]);
        assert_eq!(core.done(b, "b"), vec![Effect::Ack(7)]);
        assert_eq!(core.held(), 0, "a settled bundle is forgotten");
        assert_eq!(core.done(b, "b"), vec![], "acknowledged once only");
    }

    #[test]
    fn a_single_task_bundle_is_acked_when_it_completes() {
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a"]);
        assert_eq!(core.done(b, "a"), vec![Effect::Ack(1)]);
    }

    #[test]
    fn a_completion_of_a_key_not_in_the_bundle_changes_nothing() {
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a"]);
        assert_eq!(core.done(b, "x"), vec![]);
        assert_eq!(core.held(), 1);
        assert_eq!(core.done(b, "a"), vec![Effect::Ack(1)]);
    }

    #[test]
    fn bundles_are_acked_independently() {
        let mut core = Core::default();
        let b1 = receive(&mut core, 1, &["a", "b"]);
        let b2 = receive(&mut core, 2, &["c"]);
        assert_ne!(b1, b2);
        assert_eq!(core.done(b1, "a"), vec![]);
        assert_eq!(core.done(b2, "c"), vec![Effect::Ack(2)]);
        assert_eq!(core.done(b1, "b"), vec![Effect::Ack(1)]);
        assert_eq!(core.held(), 0);
    }

    #[test]
    fn a_key_duplicated_within_a_bundle_is_acked_with_its_first_completion() {
        // Keys are a set: the first copy to complete completes the key, and
        // the bundle with it. `admit` runs a repeated key once, so the
        // runtime never hands the core a second copy to run (see
        // `a_key_twice_in_a_bundle_runs_once`).
        let mut core = Core::default();
        let b = core.received(3, keys(&["a", "a", "b"]), Queue::Shared);
        assert_eq!(core.done(b, "b"), vec![]);
        assert_eq!(core.done(b, "a"), vec![Effect::Ack(3)]);
        assert_eq!(core.done(b, "a"), vec![], "the second copy adds nothing");
        assert_eq!(core.failed(b, "a"), vec![], "nor does its failure");
    }

    #[test]
    fn a_key_in_two_bundles_completes_each_by_its_own_report() {
        let mut core = Core::default();
        let b1 = receive(&mut core, 1, &["a"]);
        let b2 = receive(&mut core, 2, &["a", "b"]);
        assert_eq!(core.done(b2, "a"), vec![]);
        assert_eq!(core.held(), 2, "b1 still waits for its own copy");
        assert_eq!(core.done(b1, "a"), vec![Effect::Ack(1)]);
        assert_eq!(core.done(b2, "b"), vec![Effect::Ack(2)]);
    }

    #[test]
    fn reports_for_an_unknown_bundle_are_ignored() {
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a"]);
        assert_eq!(core.done(b, "a"), vec![Effect::Ack(1)]);
        assert_eq!(core.done(b, "a"), vec![]);
        assert_eq!(core.failed(b, "a"), vec![]);
        assert_eq!(core.hand_off(b), vec![]);
        assert_eq!(core.custody_renewed(b, &keys(&["a"]), true), vec![]);
    }

    // --- failures to store or announce ---

    #[test]
    fn a_failed_task_requeues_its_bundle_once() {
        let mut core = Core::default();
        let b = receive(&mut core, 4, &["a", "b", "c"]);
        assert_eq!(core.done(b, "a"), vec![]);
        assert_eq!(core.failed(b, "b"), vec![Effect::Requeue(4)]);
        // Settled: its other tasks complete silently.
        assert_eq!(core.failed(b, "b"), vec![]);
        assert_eq!(core.done(b, "c"), vec![]);
        assert_eq!(core.held(), 0);
    }

    #[test]
    fn an_unstored_batch_requeues_every_bundle_in_it() {
        let mut core = Core::default();
        let b1 = receive(&mut core, 1, &["a"]);
        let b2 = receive(&mut core, 2, &["b", "c"]);
        let batch = [
            done(b1, "a", Ok(b"1".to_vec())),
            done(b2, "b", Ok(b"2".to_vec())),
        ];
        assert_eq!(
            complete(&mut core, &batch, false, false),
            vec![Effect::Requeue(1), Effect::Requeue(2)]
        );
        assert_eq!(
            complete(&mut core, &[done(b2, "c", Ok(vec![]))], true, true),
            vec![]
        );
        assert_eq!(core.held(), 0);
    }

    #[test]
    fn a_stored_but_unconfirmed_batch_requeues_its_bundles() {
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a", "b"]);
        let batch = [done(b, "a", Ok(vec![])), done(b, "b", Ok(vec![]))];
        assert_eq!(
            complete(&mut core, &batch, true, false),
            vec![Effect::Requeue(1)],
            "requeued once although both tasks failed"
        );
    }

    #[test]
    fn a_published_batch_acks_the_bundles_it_completes() {
        let mut core = Core::default();
        let b1 = receive(&mut core, 1, &["a", "b"]);
        let b2 = receive(&mut core, 2, &["c"]);
        let batch = [
            Completion::Started {
                key: "b".into(),
                client: "c".into(),
            },
            done(b1, "a", Ok(vec![])),
            done(b2, "c", Err(error(ErrorKind::User))),
        ];
        assert_eq!(
            complete(&mut core, &batch, true, true),
            vec![Effect::Ack(2)]
        );
        assert_eq!(
            complete(&mut core, &[done(b1, "b", Ok(vec![]))], true, true),
            vec![Effect::Ack(1)]
        );
    }

    #[test]
    fn a_bundle_split_over_batches_acks_with_the_batch_of_its_last_task() {
        let mut core = Core::default();
        let b = receive(&mut core, 9, &["a", "b"]);
        assert_eq!(
            complete(&mut core, &[done(b, "a", Ok(vec![]))], true, true),
            vec![]
        );
        assert_eq!(
            complete(&mut core, &[done(b, "b", Ok(vec![]))], false, false),
            vec![Effect::Requeue(9)],
            "an earlier task's success does not save the delivery"
        );
    }

    // --- hand-off and custody ---

    #[test]
    fn a_long_held_bundle_hands_its_unfinished_tasks_to_custody_then_acks() {
        let mut core = Core::default();
        let b = receive(&mut core, 5, &["a", "b", "c"]);
        assert_eq!(core.done(b, "a"), vec![]);
        let renew = keys(&["b", "c"]);
        assert_eq!(
            core.hand_off(b),
            vec![Effect::Renew {
                bundle: b,
                keys: renew.clone()
            }]
        );
        assert_eq!(
            custody(&core),
            renew,
            "in custody before the lease is taken"
        );
        assert_eq!(core.hand_off(b), vec![], "handed off once");
        assert_eq!(core.custody_renewed(b, &renew, true), vec![Effect::Ack(5)]);
        // Its tasks complete later without a second acknowledgement.
        assert_eq!(core.done(b, "b"), vec![]);
        assert_eq!(core.done(b, "c"), vec![]);
        assert_eq!(core.held(), 0);
    }

    #[test]
    fn a_settled_or_finished_bundle_is_not_handed_off() {
        let mut core = Core::default();
        let acked = receive(&mut core, 1, &["a"]);
        core.done(acked, "a");
        assert_eq!(core.hand_off(acked), vec![]);
        let requeued = receive(&mut core, 2, &["b", "c"]);
        assert_eq!(core.failed(requeued, "b"), vec![Effect::Requeue(2)]);
        assert_eq!(core.hand_off(requeued), vec![]);
        assert!(custody(&core).is_empty());
    }

    #[test]
    fn a_failed_custody_lease_keeps_the_delivery_held() {
        let mut core = Core::default();
        let b = receive(&mut core, 6, &["a", "b"]);
        let all = keys(&["a", "b"]);
        assert_eq!(
            core.hand_off(b),
            vec![Effect::Renew {
                bundle: b,
                keys: all.clone()
            }]
        );
        assert_eq!(core.custody_renewed(b, &all, false), vec![]);
        assert!(custody(&core).is_empty(), "the tasks leave custody");
        // Held as before: acked with its last task, or handed off again.
        assert_eq!(core.done(b, "a"), vec![]);
        assert_eq!(
            core.hand_off(b),
            vec![Effect::Renew {
                bundle: b,
                keys: keys(&["b"])
            }]
        );
        assert_eq!(core.custody_renewed(b, &keys(&["b"]), false), vec![]);
        assert_eq!(core.done(b, "b"), vec![Effect::Ack(6)]);
    }

    #[test]
    fn tasks_completing_during_the_lease_ack_with_it() {
        let mut core = Core::default();
        let b = receive(&mut core, 8, &["a"]);
        let all = keys(&["a"]);
        core.hand_off(b);
        // Completed while the lease was being taken: not acked yet.
        assert_eq!(
            complete(&mut core, &[done(b, "a", Ok(vec![]))], true, true),
            vec![]
        );
        assert!(custody(&core).is_empty(), "it left custody with its result");
        assert_eq!(core.custody_renewed(b, &all, true), vec![Effect::Ack(8)]);
        assert_eq!(core.held(), 0);
    }

    #[test]
    fn tasks_completing_during_a_failed_lease_ack_when_it_fails() {
        let mut core = Core::default();
        let b = receive(&mut core, 8, &["a"]);
        let all = keys(&["a"]);
        core.hand_off(b);
        assert_eq!(core.done(b, "a"), vec![]);
        assert_eq!(core.custody_renewed(b, &all, false), vec![Effect::Ack(8)]);
        assert_eq!(core.held(), 0);
    }

    #[test]
    fn a_handed_off_bundle_is_not_requeued_when_a_task_fails() {
        // Custody brings the task back instead.
        let mut core = Core::default();
        let b = receive(&mut core, 2, &["a", "b"]);
        core.hand_off(b);
        assert_eq!(
            core.custody_renewed(b, &keys(&["a", "b"]), true),
            vec![Effect::Ack(2)]
        );
        assert_eq!(
            complete(&mut core, &[done(b, "a", Ok(vec![]))], false, false),
            vec![]
        );
        assert_eq!(
            custody(&core),
            keys(&["b"]),
            "unstored: out of custody, its lease lapses and the scheduler hands it out again"
        );
        assert_eq!(
            complete(&mut core, &[done(b, "b", Ok(vec![]))], true, false),
            vec![]
        );
        assert!(
            custody(&core).is_empty(),
            "stored but unannounced: out of custody all the same"
        );
    }

    #[test]
    fn a_task_failing_while_the_lease_is_taken_requeues_the_delivery_at_once() {
        // The delivery is not acknowledged yet: requeued now, since neither
        // the lease's outcome (renewed or not) nor a later task acks it.
        // (Before: dropped unsettled, held until its channel closed.)
        for renewed in [true, false] {
            let mut core = Core::default();
            let b = receive(&mut core, 3, &["a", "b"]);
            core.hand_off(b);
            assert_eq!(core.failed(b, "a"), vec![Effect::Requeue(3)]);
            assert_eq!(
                custody(&core),
                keys(&["b"]),
                "the failed task leaves custody"
            );
            assert_eq!(
                core.custody_renewed(b, &keys(&["a", "b"]), renewed),
                vec![],
                "settled once"
            );
            assert_eq!(core.held(), 1, "b still waits for task b");
            assert_eq!(core.done(b, "b"), vec![]);
            assert_eq!(core.held(), 0);
            let c = receive(&mut core, 4, &["c"]);
            core.hand_off(c);
            assert_eq!(core.failed(c, "c"), vec![Effect::Requeue(4)]);
            assert_eq!(core.custody_renewed(c, &keys(&["c"]), renewed), vec![]);
            assert_eq!(core.held(), 0);
        }
    }

    #[test]
    fn every_delivery_is_settled_once_whatever_the_lease_and_the_batch_do() {
        // Each order of a task's outcome (complete, or failed: unstored, or
        // stored but unannounced) against its bundle's hand-off (lease
        // renewed, refused, or not reported yet) settles the delivery
        // exactly once, by the time both have been reported.
        #[derive(Clone, Copy, Debug)]
        enum Outcome {
            Done,
            Unstored,
            Unannounced,
        }
        for outcome in [Outcome::Done, Outcome::Unstored, Outcome::Unannounced] {
            for renewed in [true, false] {
                for task_first in [true, false] {
                    let mut core = Core::default();
                    let b = receive(&mut core, 1, &["a"]);
                    let mut effects = core.hand_off(b);
                    assert_eq!(effects.len(), 1, "a lease to take");
                    effects.clear();
                    let finish = |core: &mut Core| {
                        let (stored, published) = match outcome {
                            Outcome::Done => (true, true),
                            Outcome::Unstored => (false, false),
                            Outcome::Unannounced => (true, false),
                        };
                        complete(core, &[done(b, "a", Ok(vec![]))], stored, published)
                    };
                    if task_first {
                        effects.extend(finish(&mut core));
                        effects.extend(core.custody_renewed(b, &keys(&["a"]), renewed));
                    } else {
                        effects.extend(core.custody_renewed(b, &keys(&["a"]), renewed));
                        effects.extend(finish(&mut core));
                    }
                    let case = format!("{outcome:?} renewed={renewed} task_first={task_first}");
                    assert_eq!(effects.len(), 1, "{case}: settled once: {effects:?}");
                    assert!(
                        matches!(effects[0], Effect::Ack(1) | Effect::Requeue(1)),
                        "{case}: {effects:?}"
                    );
                    assert_eq!(core.held(), 0, "{case}: nothing left behind");
                    assert!(custody(&core).is_empty(), "{case}: nothing renewed forever");
                }
            }
        }
    }

    #[test]
    fn only_completed_tasks_in_custody_are_released() {
        let mut core = Core::default();
        let b1 = receive(&mut core, 1, &["a", "b"]);
        core.hand_off(b1);
        let b2 = receive(&mut core, 2, &["c"]);
        let batch = [
            Completion::Started {
                key: "b".into(),
                client: "c".into(),
            },
            done(b1, "a", Ok(vec![])),
            done(b2, "c", Ok(vec![])),
        ];
        assert_eq!(core.plan(&batch).released, keys(&["a"]));
        let released = core.plan(&batch).released;
        assert_eq!(
            core.completed(&batch, &released, true, true),
            vec![Effect::Ack(2)]
        );
        assert_eq!(custody(&core), keys(&["b"]));
    }

    #[test]
    fn a_failed_lease_takes_its_keys_out_of_custody_even_if_the_bundle_is_gone() {
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a"]);
        core.hand_off(b);
        assert_eq!(core.failed(b, "a"), vec![Effect::Requeue(1)]);
        assert_eq!(core.held(), 0);
        assert_eq!(core.custody_renewed(b, &keys(&["a"]), false), vec![]);
        assert!(custody(&core).is_empty());
    }

    // --- planning a batch ---

    #[test]
    fn a_finished_task_is_stored_with_its_inputs_released_and_announced() {
        let core = Core::default();
        let b = BundleId(0);
        let big = vec![0u8; INLINE_RESULT_LIMIT + 1];
        let batch = [
            done_for(b, "a", "c1", Ok(b"small".to_vec()), false, false),
            done_for(b, "z", "c2", Ok(big.clone()), false, true),
        ];
        let plan = core.plan(&batch);
        assert!(plan.released.is_empty());
        let a_deps = keys(&["a-dep"]);
        let z_deps = keys(&["z-dep"]);
        assert_eq!(
            plan.writes,
            vec![
                Write::Finished {
                    key: "a",
                    bytes: b"small",
                    deps: &a_deps,
                    kept: false,
                },
                Write::ForgetStart("z"),
                Write::Finished {
                    key: "z",
                    bytes: &big,
                    deps: &z_deps,
                    kept: false,
                },
            ]
        );
        assert_eq!(
            plan.events.into_iter().collect::<Vec<_>>(),
            vec![
                (
                    "c1",
                    vec![Event::Finished {
                        key: "a".into(),
                        inline: Some(b"small".to_vec()),
                        size: 5,
                        run_us: 1500
                    }]
                ),
                (
                    "c2",
                    vec![Event::Finished {
                        key: "z".into(),
                        inline: None,
                        size: big.len() as u64,
                        run_us: 1500
                    }]
                ),
            ]
        );
    }

    #[test]
    fn a_run_time_is_reported_in_microseconds_never_as_zero() {
        assert_eq!(run_us(Duration::from_millis(20)), 20_000);
        assert_eq!(
            run_us(Duration::from_nanos(300)),
            1,
            "0 would read as unmeasured"
        );
        assert_eq!(run_us(Duration::from_secs(5 * 3600)), u32::MAX);
    }

    #[test]
    fn a_result_at_the_inline_limit_rides_in_its_event() {
        let core = Core::default();
        let bytes = vec![1u8; INLINE_RESULT_LIMIT];
        let batch = [done(BundleId(0), "a", Ok(bytes.clone()))];
        let events = core.plan(&batch).events;
        assert_eq!(
            events["c"],
            vec![Event::Finished {
                key: "a".into(),
                inline: Some(bytes),
                size: INLINE_RESULT_LIMIT as u64,
                run_us: 1500
            }]
        );
    }

    #[test]
    fn an_error_is_stored_unless_it_will_be_retried() {
        let core = Core::default();
        let b = BundleId(0);
        let failure = error(ErrorKind::User);
        let batch = [
            done_for(b, "a", "c", Err(failure.clone()), false, false),
            done_for(b, "r", "c", Err(failure.clone()), true, true),
        ];
        let plan = core.plan(&batch);
        assert_eq!(
            plan.writes,
            vec![
                Write::Erred {
                    key: "a",
                    error: &failure
                },
                Write::ForgetStart("r"),
            ],
            "a retried task is neither stored nor releases its inputs"
        );
        assert_eq!(
            plan.events["c"],
            vec![
                Event::Erred {
                    key: "a".into(),
                    error: failure.clone(),
                    retrying: false
                },
                Event::Erred {
                    key: "r".into(),
                    error: failure,
                    retrying: true
                },
            ]
        );
        assert!(!plan.writes_nothing());
    }

    #[test]
    fn started_tasks_and_retries_write_nothing() {
        let core = Core::default();
        let batch = [
            Completion::Started {
                key: "a".into(),
                client: "c".into(),
            },
            done_for(
                BundleId(0),
                "b",
                "c",
                Err(error(ErrorKind::User)),
                true,
                false,
            ),
        ];
        let plan = core.plan(&batch);
        assert!(plan.writes_nothing());
        assert_eq!(plan.events["c"].len(), 2);
        assert_eq!(plan.events["c"][0], Event::Started { key: "a".into() });
    }

    #[test]
    fn a_release_from_custody_is_a_write() {
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a"]);
        core.hand_off(b);
        let batch = [done_for(
            b,
            "a",
            "c",
            Err(error(ErrorKind::User)),
            true,
            false,
        )];
        let plan = core.plan(&batch);
        assert!(plan.writes.is_empty());
        assert_eq!(plan.released, keys(&["a"]));
        assert!(!plan.writes_nothing());
    }

    #[test]
    fn a_cancelled_task_is_stored_as_erred_and_completes_its_bundle() {
        // Cancelled while running, or withdrawn before it started: never
        // retried, so its error is stored and the bundle acked with it.
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a", "b"]);
        let cancelled = Err(error(ErrorKind::Cancelled));
        let retried = retrying(
            true,
            &RetryPolicy::default(),
            &cancelled.clone().map(Encoded::from_vec),
        );
        assert!(!retried);
        let failure = error(ErrorKind::Cancelled);
        let batch = [
            done_for(b, "a", "c", cancelled, retried, false),
            done(b, "b", Ok(vec![])),
        ];
        assert_eq!(
            core.plan(&batch).writes[0],
            Write::Erred {
                key: "a",
                error: &failure
            }
        );
        assert_eq!(
            complete(&mut core, &batch, true, true),
            vec![Effect::Ack(1)]
        );
    }

    #[test]
    fn a_task_that_lost_its_worker_too_often_forgets_its_start_and_errs() {
        let mut core = Core::default();
        let b = receive(&mut core, 1, &["a"]);
        let lost = error(ErrorKind::WorkerLost);
        let batch = [done_for(b, "a", "c", Err(lost.clone()), false, true)];
        assert_eq!(
            core.plan(&batch).writes,
            vec![
                Write::ForgetStart("a"),
                Write::Erred {
                    key: "a",
                    error: &lost
                }
            ]
        );
        assert_eq!(
            complete(&mut core, &batch, true, true),
            vec![Effect::Ack(1)]
        );
    }

    // --- retries ---

    #[test]
    fn only_mendable_failures_with_retries_left_are_retried() {
        assert!(retrying(
            true,
            &RetryPolicy::default(),
            &Err(error(ErrorKind::User))
        ));
        assert!(retrying(
            true,
            &RetryPolicy::default(),
            &Err(error(ErrorKind::Panic))
        ));
        assert!(retrying(
            true,
            &RetryPolicy::default(),
            &Err(error(ErrorKind::MissingDependency))
        ));
        assert!(retrying(
            true,
            &RetryPolicy::default(),
            &Err(error(ErrorKind::Internal))
        ));
        assert!(!retrying(
            false,
            &RetryPolicy::default(),
            &Err(error(ErrorKind::User))
        ));
        assert!(!retrying(
            true,
            &RetryPolicy::default(),
            &Ok(Encoded::from_vec(vec![]))
        ));
        for kind in [
            ErrorKind::Cancelled,
            ErrorKind::UnknownTask,
            ErrorKind::SignatureMismatch,
            ErrorKind::WorkerLost,
        ] {
            assert!(
                !retrying(true, &RetryPolicy::default(), &Err(error(kind))),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_failure_outside_the_policy_is_not_retried() {
        let panics = RetryPolicy {
            on: vec![ErrorKind::Panic.into(), "io::Error".into()],
            ..RetryPolicy::default()
        };
        assert!(retrying(true, &panics, &Err(error(ErrorKind::Panic))));
        assert!(!retrying(true, &panics, &Err(error(ErrorKind::User))));
        let io = TaskError::new(ErrorKind::User, "std::io::error::Error", "refused");
        assert!(retrying(true, &panics, &Err(io.clone())));
        assert!(!retrying(false, &panics, &Err(io)));
        // A filter never makes a failure a retry cannot mend retried.
        let cancels = RetryPolicy {
            on: vec![ErrorKind::Cancelled.into()],
            ..RetryPolicy::default()
        };
        assert!(!retrying(true, &cancels, &Err(error(ErrorKind::Cancelled))));
    }

    // --- admitting deliveries ---

    type Decoded = Result<(ToWorker, Option<&'static str>), &'static str>;

    #[test]
    fn a_signed_bundle_is_checked_first_delivery_or_not() {
        let run = || -> Decoded {
            Ok((
                ToWorker::Run {
                    tasks: vec![run_task("a")],
                    epoch: 0,
                },
                None,
            ))
        };
        // Redelivered or not (a captured copy can be made to come back
        // redelivered), a signed bundle is checked.
        for sealed in [true, false] {
            assert_eq!(
                admit(run(), sealed, &Fence::default()),
                Admit::Run {
                    tasks: vec![run_task("a")],
                    check: sealed
                }
            );
        }
    }

    #[test]
    fn a_key_twice_in_a_bundle_runs_once() {
        // Run twice, the second copy would store, release its inputs and
        // announce again after the first acked the delivery.
        let run = |keys: &[&str]| -> Decoded {
            Ok((
                ToWorker::Run {
                    tasks: keys.iter().map(|key| run_task(key)).collect(),
                    epoch: 0,
                },
                None,
            ))
        };
        for sealed in [true, false] {
            assert_eq!(
                admit(run(&["a", "b", "a", "c", "b"]), sealed, &Fence::default()),
                Admit::Run {
                    tasks: vec![run_task("a"), run_task("b"), run_task("c")],
                    check: sealed
                }
            );
        }
        assert_eq!(
            admit(run(&["a", "b"]), false, &Fence::default()),
            Admit::Run {
                tasks: vec![run_task("a"), run_task("b")],
                check: false
            },
            "distinct keys untouched"
        );
    }

    #[test]
    fn a_bundle_of_a_deposed_scheduler_is_acknowledged_unrun() {
        let run = |epoch| -> Decoded {
            Ok((
                ToWorker::Run {
                    tasks: vec![run_task("a")],
                    epoch,
                },
                None,
            ))
        };
        let fence = Fence::default();
        let runs = |admitted| matches!(admitted, Admit::Run { .. });
        assert!(runs(admit(run(5), false, &fence)));
        assert!(runs(admit(run(7), false, &fence)));
        assert_eq!(
            admit(run(5), false, &fence),
            Admit::Superseded {
                epoch: 5,
                newest: 7
            }
        );
        assert!(runs(admit(run(7), false, &fence)), "the same epoch again");
        assert!(runs(admit(run(0), false, &fence)), "unfenced");
    }

    #[test]
    fn a_stale_bundle_is_checked_not_dropped() {
        let stale: Decoded = Ok((
            ToWorker::Run {
                tasks: vec![run_task("a")],
                epoch: 0,
            },
            Some("too old"),
        ));
        assert_eq!(
            admit(stale, true, &Fence::default()),
            Admit::Run {
                tasks: vec![run_task("a")],
                check: true
            }
        );
    }

    #[test]
    fn an_empty_bundle_is_dead_lettered_even_when_stale() {
        for stale in [None, Some("too old")] {
            let empty: Decoded = Ok((
                ToWorker::Run {
                    tasks: vec![],
                    epoch: 0,
                },
                stale,
            ));
            assert_eq!(
                admit(empty, true, &Fence::default()),
                Admit::DeadLetter("empty task bundle".into())
            );
        }
    }

    #[test]
    fn control_messages_are_applied_unless_stale() {
        let cancel: Decoded = Ok((ToWorker::Cancel { keys: keys(&["a"]) }, None));
        assert_eq!(
            admit(cancel, true, &Fence::default()),
            Admit::Cancel(keys(&["a"]))
        );
        let drop: Decoded = Ok((ToWorker::DropActors { keys: keys(&["x"]) }, None));
        assert_eq!(
            admit(drop, false, &Fence::default()),
            Admit::DropActors(keys(&["x"]))
        );
        let stale: Decoded = Ok((ToWorker::Cancel { keys: keys(&["a"]) }, Some("too old")));
        assert_eq!(
            admit(stale, true, &Fence::default()),
            Admit::Stale("too old".into())
        );
        let stale: Decoded = Ok((ToWorker::DropActors { keys: keys(&["x"]) }, Some("old")));
        assert_eq!(
            admit(stale, true, &Fence::default()),
            Admit::Stale("old".into())
        );
    }

    #[test]
    fn what_does_not_decode_is_dead_lettered() {
        let bad: Decoded = Err("bad signature");
        assert_eq!(
            admit(bad, true, &Fence::default()),
            Admit::DeadLetter("bad signature".into())
        );
    }

    #[test]
    fn a_checked_bundle_runs_what_is_pending() {
        assert_eq!(
            checked(Some(vec![run_task("b")])),
            Admit::Run {
                tasks: vec![run_task("b")],
                check: false
            }
        );
        assert_eq!(
            checked(Some(vec![])),
            Admit::DeadLetter("replayed or stale: its tasks are done".into()),
            "a replay of finished tasks"
        );
        assert_eq!(checked(None), Admit::Requeue, "Redis could not tell");
    }
}
