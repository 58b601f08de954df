//! The scheduler's state machine. It does no I/O: every input is a method
//! call, every output goes through the [`Comm`] trait, so the whole
//! scheduling logic is unit-tested in microseconds without a broker.
//!
//! A task is *waiting* while some input is unfinished, *ready* once every
//! input finished (held here in a priority queue, not in the broker, so that
//! priorities and cancellation act before delivery), *processing* once sent
//! to the workers, then *finished* or *erred*. A finished task leaves the
//! table as soon as no waiting dependent needs its inline result; an erred
//! one stays (with its spec, for `retry`) until its last holder lets go
//! ([`Core::forget`]).
//!
//! A task with a start time ([`TaskSpec::start_at_ms`]), or one waiting
//! out its retry delay ([`RetryPolicy::delay`]), stays *waiting* with no
//! input missing: it sits in the core's timer until [`Core::wake`] finds
//! its time come. The timer holds wall-clock milliseconds, the time the
//! spec carries, so a scheduler that takes a task up from its stored spec
//! honours its start time; a retry delay lives only here, and a task
//! taken up while waiting one simply runs.
//!
//! [`RetryPolicy::delay`]: flotilla_proto::RetryPolicy::delay

use flotilla_proto::{ErrorKind, Event, RunTask, TaskError, TaskSpec, WorkerInfo};
use serde_bytes::ByteBuf;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::failures::RecentErrors;
use crate::tally::{Outcome, Tally};

/// Results up to this size ride inside task messages to dependents.
pub const INLINE_LIMIT: usize = 16 * 1024;
/// Ready tasks kept in flight per worker slot (deliveries in the broker or
/// running); the rest wait here, where priorities and cancellation act.
pub const IN_FLIGHT_PER_SLOT: usize = 256;
/// Most tasks bundled into one delivery.
pub const MAX_BUNDLE: usize = 128;
/// Most expected run time of one bundle: only tasks known to be shorter are
/// bundled, and a task of unknown or longer duration travels alone. A
/// worker takes a delivery only when it has a slot free for it, so the
/// cost of a bundle is its last task waiting up to this long behind its
/// siblings; the gain is one delivery round trip (acknowledgement, then
/// the broker's next delivery: a few ms, ~10 ms on a loaded machine) saved
/// per task bundled.
pub const BUNDLE_BUDGET: Duration = Duration::from_millis(100);
/// Most dependents sent along with a task as its chain (see
/// [`Core::dispatch`]): a chain longer than this goes in several deliveries.
pub const MAX_CHAIN: usize = MAX_BUNDLE;
/// A worker that has not announced itself for this long is presumed gone.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the core asks its surroundings to do.
pub trait Comm {
    /// Publish a bundle of ready tasks: to one worker's own queue, or to the
    /// shared queue (`None`).
    fn send_tasks(&mut self, worker: Option<&str>, tasks: Vec<RunTask>);
    /// Tell `client` about an event the scheduler decided or forwards.
    fn notify(&mut self, client: &str, event: Event);
    /// Store an error as `key`'s result (if anyone still holds the key).
    fn store_error(&mut self, key: &str, error: &TaskError);
    /// Find out whether `key` has a stored result; answer with
    /// [`Core::lookup_answered`].
    fn lookup(&mut self, key: &str);
    /// Drop the holds task `key` has on its inputs; inputs left without
    /// holders come back through [`Core::forget`].
    fn release_inputs(&mut self, key: &str, deps: &[String]);
    /// Like [`Comm::release_inputs`], for a task cancelled because its
    /// clients are gone: inputs left without holders come back through
    /// [`Core::abandon`] (they are the departed clients' work too).
    fn release_abandoned_inputs(&mut self, key: &str, deps: &[String]) {
        self.release_inputs(key, deps);
    }
    /// Ask the workers to stop these running tasks.
    fn cancel_running(&mut self, keys: &[String]);
    /// The task left for good: delete its stored spec.
    fn forget_spec(&mut self, key: &str);
}

/// What Redis holds for a processing task (see [`Core::checked`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    /// Its spec is stored and no result: it is still to be done.
    Pending,
    /// A value is stored.
    Finished,
    /// An error is stored.
    Erred(TaskError),
    /// Neither its spec nor a result is stored.
    Lost,
}

/// What a lookup of an unknown key found in Redis.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A stored value.
    Finished,
    /// A stored error.
    Erred(TaskError),
    /// Nothing is stored under the key.
    Missing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Ready,
    Processing,
    Finished,
    Erred,
}

#[derive(Debug)]
struct TaskEntry {
    /// Kept while the task may still run: waiting, ready, processing, erred.
    spec: Option<TaskSpec>,
    state: State,
    /// Sent to a worker and not yet reported back.
    in_flight: bool,
    /// Its last holder let go while it ran: drop it when it reports.
    forgotten: bool,
    /// Inputs not finished yet.
    missing: u32,
    /// Tasks waiting for this one.
    dependents: Vec<String>,
    /// Dependents not yet sent to workers: while any remain, a finished task
    /// stays in the table, with its result when small.
    holders: u32,
    /// Its holds on its inputs are gone (it was sent, or failed, or an
    /// earlier run reported): a second run or report must not release them
    /// again, which would take another dependent's hold.
    released: bool,
    inline: Option<Vec<u8>>,
    seq: u64,
    attempt: u32,
    /// Clients besides the submitter that want its events.
    watchers: Vec<String>,
    /// The worker it was pinned to, if any.
    worker: Option<String>,
    /// Boxed: most entries never fail, and an inline error would double
    /// every entry's size.
    error: Option<Box<TaskError>>,
    /// Its client asked to retry it before its failure reached the
    /// scheduler (the client heard first): it runs again once it does.
    retry_asked: bool,
    /// Wall-clock milliseconds before which its next run does not start:
    /// the end of the delay after a retrying failure (0: none).
    retry_at_ms: u64,
}

impl TaskEntry {
    fn new(spec: Option<TaskSpec>, state: State, seq: u64) -> Self {
        TaskEntry {
            spec,
            state,
            in_flight: false,
            forgotten: false,
            missing: 0,
            dependents: Vec::new(),
            holders: 0,
            released: false,
            inline: None,
            seq,
            attempt: 0,
            watchers: Vec::new(),
            worker: None,
            error: None,
            retry_asked: false,
            retry_at_ms: 0,
        }
    }

    /// Wall-clock milliseconds before which it does not start: its start
    /// time or the end of its retry delay, whichever is later.
    fn not_before_ms(&self) -> u64 {
        let start_at = self.spec.as_ref().map_or(0, |s| s.start_at_ms);
        start_at.max(self.retry_at_ms)
    }

    fn clients(&self) -> impl Iterator<Item = &str> {
        self.spec
            .as_ref()
            .map(|s| s.client.as_str())
            .into_iter()
            .chain(self.watchers.iter().map(String::as_str))
    }
}

#[derive(Debug)]
struct Worker {
    name: String,
    slots: u32,
    tasks: HashSet<(String, u64)>,
    resources: HashMap<String, u64>,
    last_seen: Instant,
    /// Resident memory and CPU time as of its last heartbeat.
    rss_bytes: Option<u64>,
    cpu_ms: Option<u64>,
}

/// Where a ready task goes.
enum Placement {
    Shared,
    Worker(String),
    Park,
}

#[derive(Debug, Default)]
struct Waiters {
    dependents: Vec<String>,
    watchers: Vec<String>,
}

/// A worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Unique id (names its own queue).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Tasks it runs at once.
    pub slots: u32,
    /// Abstract resources it offers.
    pub resources: Vec<(String, u64)>,
    /// Registered tasks it provides.
    pub tasks: usize,
    /// Milliseconds since it last announced itself.
    pub last_seen_ms: u64,
    /// Tasks pinned to it and running there.
    pub pinned_running: usize,
    /// Its resident memory in bytes, as of its last heartbeat (`None`: it
    /// does not say).
    pub rss_bytes: Option<u64>,
    /// The CPU time its process used so far (user and system), in
    /// milliseconds, as of its last heartbeat.
    pub cpu_ms: Option<u64>,
}

/// A task in the table, for status pages and the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStatus {
    /// Key.
    pub key: String,
    /// Registered name.
    pub task: String,
    /// `waiting`, `ready`, `processing`, `finished` or `erred`.
    pub state: &'static str,
    /// The error message, when erred.
    pub error: Option<String>,
}

/// Counters for status pages and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tasks waiting for inputs.
    pub waiting: usize,
    /// Tasks ready and held by the scheduler.
    pub ready: usize,
    /// Tasks sent to workers and not finished.
    pub processing: usize,
    /// Tasks that cannot be placed yet (no worker matches).
    pub parked: usize,
    /// Tasks submitted since start.
    pub submitted: u64,
    /// Tasks finished since start.
    pub finished: u64,
    /// Tasks erred since start (including dependents of erred tasks).
    pub erred: u64,
    /// Tasks cancelled since start (explicitly, or dropped before running).
    pub cancelled: u64,
    /// Tasks sent since start in the chain of the input they waited for
    /// (see [`Core::dispatch`]).
    pub chained: u64,
    /// Tasks their clients sent to the workers themselves since start (see
    /// [`Core::submit_sent`]).
    pub sent_by_clients: u64,
    /// Live workers.
    pub workers: usize,
    /// Their slots.
    pub slots: u32,
}

/// The scheduler's state.
#[derive(Debug, Default)]
pub struct Core {
    tasks: HashMap<String, TaskEntry>,
    ready: BinaryHeap<(i32, Reverse<u64>, String)>,
    /// Ready tasks no live worker matches; a task leaves when it does.
    parked: HashSet<String>,
    lookups: HashMap<String, Waiters>,
    workers: HashMap<String, Worker>,
    provided: HashMap<String, HashSet<u64>>,
    slots: u32,
    in_flight: usize,
    seq: u64,
    counts: Counts,
    next_worker: usize,
    /// Watchers of keys that neither the table nor Redis knew: the
    /// submission may still be on its way from another client, so they wait
    /// a few ticks before hearing the key is lost.
    orphans: HashMap<String, (Waiters, u64)>,
    /// Keys looked up a second time for orphaned watchers.
    final_lookups: HashSet<String>,
    /// Keys taken up from stored specs after a restart, with the tick they
    /// were: their submissions may still arrive (redelivered, queued, or
    /// re-sent by a reconnected client) after they ran and were forgotten.
    recovered: HashMap<String, u64>,
    ticks: u64,
    /// What is known of each task name's run time (see [`Durations`]).
    durations: Durations,
    /// Reports of keys the table did not know, kept [`EARLY_TICKS`]: a task
    /// its client sent to the workers itself may report before its
    /// submission comes (see [`Core::submit_sent`]).
    early: HashMap<String, (Early, u64)>,
    /// Tasks that left the table by name and outcome, and their run times
    /// (for `/metrics`).
    tally: Tally,
    /// The last task errors seen (for `/api/errors`).
    recent_errors: RecentErrors,
    /// The wall clock as last told ([`Core::wake`]), in milliseconds since
    /// the Unix epoch.
    now_ms: u64,
    /// Tasks waiting for their time, earliest first: `(due, key)`. Entries
    /// may be stale (the task was cancelled, or made ready by another way);
    /// they are skipped when popped.
    timer: BinaryHeap<Reverse<(u64, String)>>,
}

/// Each task name's mean run time, learnt from completions (Dask's
/// per-prefix `duration_average`), and the first runs of names not yet
/// known.
///
/// A name nobody has seen finish is run by at most one probe per slot:
/// its other ready tasks are held here until a probe finishes and tells
/// how long the name takes (or, if the probes fail, one more probe goes
/// per probe that landed). Without this, the whole in-flight window of a
/// new name would go out one task per delivery before the first result
/// showed the tasks could have been bundled. Holding lasts one tick at
/// most: a name whose probes have not finished by then is slow, or its
/// probes wait on tasks of their own name (a recursive task, whose
/// children would otherwise wait for their parent forever), and its tasks
/// go out one per delivery, unheld, until one finishes.
#[derive(Debug, Default)]
struct Durations {
    /// Mean run time per task name, in microseconds.
    mean_us: HashMap<String, u64>,
    /// Probes sent per unknown name (stale keys are dropped when counted).
    probes: HashMap<String, Vec<String>>,
    /// Ready tasks held back per unknown name, in the order they came off
    /// the ready queue.
    held: HashMap<String, std::collections::VecDeque<String>>,
    /// Unknown names whose probes outlasted a tick: not held any more.
    stalled: HashSet<String>,
}

impl Durations {
    /// The mean run time of `name`, if any of its tasks finished.
    fn mean(&self, name: &str) -> Option<Duration> {
        self.mean_us.get(name).map(|&us| Duration::from_micros(us))
    }

    /// A task of `name` ran for `run`: the mean moves halfway towards it,
    /// as Dask's does, so it follows a name whose tasks change pace.
    fn learn(&mut self, name: &str, run: Duration) {
        let us = u64::try_from(run.as_micros()).unwrap_or(u64::MAX);
        match self.mean_us.get_mut(name) {
            Some(mean) => *mean = *mean / 2 + us / 2,
            None => {
                self.mean_us.insert(name.to_owned(), us);
                self.probes.remove(name);
                self.stalled.remove(name);
            }
        }
    }
}
/// Ticks (seconds) an orphaned watcher waits for the key's submission.
const ORPHAN_TICKS: u64 = 3;
/// Ticks (seconds) a recovered key's late submission is recognised.
const RECOVERED_TICKS: u64 = 600;
/// How many ticks a report of an unknown key is kept, and how many such
/// reports at most (see [`Core::submit_sent`]).
const EARLY_TICKS: u64 = 30;
const EARLY_MAX: usize = 10_000;

/// A report of a key the table did not know when it came.
#[derive(Debug)]
enum Early {
    Finished { size: u64, run: Duration },
    Erred(TaskError),
}

/// The `task` label of a task whose spec the scheduler does not hold.
const UNNAMED: &str = "unknown";

/// The registered name of `task`'s function, as far as the table knows.
fn task_name(task: &TaskEntry) -> &str {
    task.spec
        .as_ref()
        .map_or(UNNAMED, |spec| spec.task.as_str())
}

fn cancelled_error(key: &str, task: &str) -> TaskError {
    TaskError::new(
        ErrorKind::Cancelled,
        "flotilla::Cancelled",
        format!("`{key}` was cancelled"),
    )
    .at(key, task)
}

impl Core {
    /// An empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tasks that ended so far, by task name and outcome, with their
    /// measured run times.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// The last task errors the scheduler learnt of (see
    /// [`crate::failures`]).
    pub fn recent_errors(&self) -> &RecentErrors {
        &self.recent_errors
    }

    /// Counts `key` (still in the table) as ended with `outcome` under its
    /// task's name.
    fn tally_outcome(&mut self, key: &str, outcome: Outcome) {
        let name = self.tasks.get(key).map_or(UNNAMED, task_name);
        self.tally.count(name, outcome);
    }

    /// Current counters.
    pub fn counts(&self) -> Counts {
        let mut counts = self.counts;
        counts.ready = self
            .tasks
            .values()
            .filter(|t| t.state == State::Ready)
            .count()
            .saturating_sub(self.parked.len());
        counts.parked = self.parked.len();
        counts.processing = self.in_flight;
        counts.waiting = self
            .tasks
            .values()
            .filter(|t| t.state == State::Waiting)
            .count();
        counts.workers = self.workers.len();
        counts.slots = self.slots;
        counts
    }

    /// The live workers.
    pub fn workers(&self, now: Instant) -> Vec<WorkerStatus> {
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerStatus {
                id: id.clone(),
                name: w.name.clone(),
                slots: w.slots,
                resources: w.resources.iter().map(|(n, a)| (n.clone(), *a)).collect(),
                tasks: w.tasks.len(),
                last_seen_ms: now.saturating_duration_since(w.last_seen).as_millis() as u64,
                pinned_running: self
                    .tasks
                    .values()
                    .filter(|t| t.in_flight && t.worker.as_deref() == Some(id.as_str()))
                    .count(),
                rss_bytes: w.rss_bytes,
                cpu_ms: w.cpu_ms,
            })
            .collect();
        workers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        workers
    }

    /// Up to `limit` tasks, optionally only those in `state` (`waiting`,
    /// `ready`, `processing`, `finished`, `erred`).
    pub fn tasks(&self, state: Option<&str>, limit: usize) -> Vec<TaskStatus> {
        let name = |state: State| match state {
            State::Waiting => "waiting",
            State::Ready => "ready",
            State::Processing => "processing",
            State::Finished => "finished",
            State::Erred => "erred",
        };
        let mut tasks: Vec<TaskStatus> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                state.is_none_or(|wanted| {
                    wanted == name(t.state) || (wanted == "error" && t.state == State::Erred)
                })
            })
            .take(limit)
            .map(|(key, t)| TaskStatus {
                key: key.clone(),
                task: t.spec.as_ref().map(|s| s.task.clone()).unwrap_or_default(),
                state: name(t.state),
                error: t.error.as_ref().map(|e| e.to_string()),
            })
            .collect();
        tasks.sort_by(|a, b| a.key.cmp(&b.key));
        tasks
    }

    /// Number of tasks the scheduler holds in memory.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Tasks not done yet: waiting, ready (parked included) or processing.
    /// Counted over the table (see `crate::admission` for when).
    pub fn unfinished(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| matches!(t.state, State::Waiting | State::Ready | State::Processing))
            .count()
    }

    /// Whether the scheduler holds task `key` (in any state).
    pub fn holds(&self, key: &str) -> bool {
        self.tasks.contains_key(key)
    }

    /// Whether the scheduler holds no task.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Takes up tasks found stored after a restart, inputs before the tasks
    /// that need them (specs come back from Redis in no particular order).
    pub fn recover(&mut self, specs: Vec<TaskSpec>, comm: &mut impl Comm) -> usize {
        let mut pending: HashMap<String, TaskSpec> =
            specs.into_iter().map(|s| (s.key.clone(), s)).collect();
        let count = pending.len();
        while !pending.is_empty() {
            let ready: Vec<String> = pending
                .values()
                .filter(|s| s.deps.iter().all(|d| !pending.contains_key(d)))
                .map(|s| s.key.clone())
                .collect();
            let batch: Vec<String> = if ready.is_empty() {
                pending.keys().cloned().collect() // cannot happen for a DAG; take the rest
            } else {
                ready
            };
            let specs: Vec<TaskSpec> = batch.iter().filter_map(|k| pending.remove(k)).collect();
            let keys: Vec<String> = specs.iter().map(|s| s.key.clone()).collect();
            self.submit(specs, comm);
            let tick = self.ticks;
            self.recovered
                .extend(keys.into_iter().map(|key| (key, tick)));
        }
        count
    }

    /// Records submitted tasks, in submission order.
    pub fn submit(&mut self, specs: Vec<TaskSpec>, comm: &mut impl Comm) {
        self.submit_sent(specs, &[], comm);
    }

    /// Records submitted tasks, in submission order, of which those named in
    /// `sent` were published to the shared task queue by their client
    /// itself (a task with no input, no placement, priority or retries: it
    /// saves the hop through the scheduler). Such a task is processing at
    /// once, and counts in flight, as if this scheduler had sent it; one
    /// that reported before its submission came (the two take different
    /// queues) is settled as it reported. Any other outcome (a known key, a
    /// task that must wait or fail) is as for [`Core::submit`]: a second
    /// run of a task is harmless.
    pub fn submit_sent(&mut self, specs: Vec<TaskSpec>, sent: &[String], comm: &mut impl Comm) {
        let mut admitted_sent = Vec::new();
        for spec in specs {
            if !self.recovered.is_empty()
                && self.recovered.remove(&spec.key).is_some()
                && !self.tasks.contains_key(&spec.key)
            {
                // The late submission of a task taken up from its stored
                // spec, which already ran and was forgotten: running it
                // again could overwrite its result, or fail on inputs
                // released since. Its client hears how it ended instead.
                let client = spec.client;
                self.watch(&client, std::slice::from_ref(&spec.key), comm);
                continue;
            }
            if let Some(existing) = self.tasks.get_mut(&spec.key) {
                // The same key again (a pure task submitted twice): one run
                // serves every client that asked.
                if existing
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.client == spec.client)
                {
                    continue;
                }
                let client = spec.client;
                self.watch(&client, std::slice::from_ref(&spec.key), comm);
                continue;
            }
            self.counts.submitted += 1;
            if sent.contains(&spec.key) {
                admitted_sent.push(spec.key.clone());
            }
            self.admit(spec, 0, comm);
        }
        // Once all are in: a dependent submitted with its input waits for
        // it, even if the input's early report settles it now.
        for key in admitted_sent {
            self.sent_by_client(&key, comm);
        }
    }

    /// A ready task its client published to the task queue itself is
    /// processing (its stale ready-queue entry is skipped when popped).
    fn sent_by_client(&mut self, key: &str, comm: &mut impl Comm) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        if task.state != State::Ready || task.spec.as_ref().is_none_or(|s| !s.deps.is_empty()) {
            return;
        }
        task.state = State::Processing;
        task.in_flight = true;
        task.released = true;
        self.in_flight += 1;
        self.counts.sent_by_clients += 1;
        match self.early.remove(key) {
            Some((Early::Finished { size, run }, _)) => {
                self.finished_in(key, None, size, run, comm);
            }
            Some((Early::Erred(error), _)) => self.erred(key, error, false, comm),
            None => {}
        }
    }

    /// Keeps the report of a key the table does not know, for a while.
    fn remember_early(&mut self, key: &str, report: Early) {
        if self.early.len() < EARLY_MAX {
            self.early.insert(key.to_owned(), (report, self.ticks));
        }
    }

    /// Enters a task in the table and links it to its inputs.
    fn admit(&mut self, spec: TaskSpec, attempt: u32, comm: &mut impl Comm) {
        self.seq += 1;
        let key = spec.key.clone();
        let mut missing = 0;
        let mut failed = None;
        for dep in &spec.deps {
            match self.tasks.get_mut(dep) {
                Some(input) => match input.state {
                    State::Finished => input.holders += 1,
                    State::Erred => {
                        failed.get_or_insert_with(|| input.error.as_deref().cloned());
                        input.dependents.push(key.clone());
                    }
                    // The list may name an earlier run of this key already
                    // (cancelled or failed while waiting, now retried or
                    // submitted again): lists are deduplicated where they
                    // are consumed, so its input counts once.
                    _ => {
                        input.dependents.push(key.clone());
                        input.holders += 1;
                        missing += 1;
                    }
                },
                None => {
                    let waiters = self.lookups.entry(dep.clone()).or_default();
                    if waiters.dependents.is_empty() && waiters.watchers.is_empty() {
                        comm.lookup(dep);
                    }
                    waiters.dependents.push(key.clone());
                    missing += 1;
                }
            }
        }
        let mut entry = TaskEntry::new(Some(spec), State::Waiting, self.seq);
        entry.missing = missing;
        entry.attempt = attempt;
        // Those waiting for the key while it was unknown: after a lookup
        // found nothing, or while one is still on its way (its answer will
        // then find nobody waiting). Only dependents still waiting hold it.
        let mut waiters = self
            .orphans
            .remove(&key)
            .map(|(waiters, _)| waiters)
            .unwrap_or_default();
        if let Some(mut pending) = self.lookups.remove(&key) {
            self.final_lookups.remove(&key);
            waiters.watchers.append(&mut pending.watchers);
            waiters.dependents.append(&mut pending.dependents);
        }
        for watcher in waiters.watchers {
            if !entry.watchers.contains(&watcher) {
                entry.watchers.push(watcher);
            }
        }
        entry.dependents = self.waiting_dependents(waiters.dependents);
        entry.holders = entry.dependents.len() as u32;
        self.tasks.insert(key.clone(), entry);
        if let Some(error) = failed {
            let error = error.unwrap_or_else(|| cancelled_error(&key, ""));
            self.fail(&key, error, comm);
        } else if missing == 0 {
            self.make_ready(&key);
        }
    }

    /// Makes a task with no input missing ready, or, before its time, holds
    /// it in the timer, waiting.
    fn make_ready(&mut self, key: &str) {
        if let Some(task) = self.tasks.get_mut(key) {
            let due = task.not_before_ms();
            if due > self.now_ms {
                task.state = State::Waiting;
                self.timer.push(Reverse((due, key.to_owned())));
                return;
            }
            task.state = State::Ready;
            let priority = task.spec.as_ref().map_or(0, |s| s.priority);
            self.ready
                .push((priority, Reverse(task.seq), key.to_owned()));
        }
    }

    /// A lookup of an unknown key came back.
    pub fn lookup_answered(&mut self, key: &str, found: Lookup, comm: &mut impl Comm) {
        let Some(mut waiters) = self.lookups.remove(key) else {
            return;
        };
        waiters.dependents = self.waiting_dependents(std::mem::take(&mut waiters.dependents));
        let last_chance = self.final_lookups.remove(key);
        if found == Lookup::Missing
            && !last_chance
            && !(waiters.watchers.is_empty() && waiters.dependents.is_empty())
        {
            // Not stored, not known: its submission may still be on its way
            // from another client (or an actor's result about to be
            // stored). Everyone waiting gets a few ticks' grace.
            let ticks = self.ticks;
            let orphans = self
                .orphans
                .entry(key.to_owned())
                .or_insert_with(|| (Waiters::default(), ticks));
            orphans.0.watchers.append(&mut waiters.watchers);
            orphans.0.dependents.append(&mut waiters.dependents);
            return;
        }
        for client in &waiters.watchers {
            let event = match &found {
                Lookup::Finished => Event::Finished {
                    key: key.to_owned(),
                    inline: None,
                    size: 0,
                    run_us: 0,
                },
                Lookup::Erred(error) => Event::Erred {
                    key: key.to_owned(),
                    error: error.clone(),
                    retrying: false,
                },
                Lookup::Missing => Event::Erred {
                    key: key.to_owned(),
                    error: TaskError::new(
                        ErrorKind::MissingDependency,
                        "flotilla::Lost",
                        format!("no task and no stored result under `{key}`"),
                    )
                    .at(key, ""),
                    retrying: false,
                },
            };
            comm.notify(client, event);
        }
        match found {
            Lookup::Finished => {
                if waiters.dependents.is_empty() {
                    return;
                }
                let mut entry = TaskEntry::new(None, State::Finished, 0);
                entry.holders = waiters.dependents.len() as u32;
                self.tasks.insert(key.to_owned(), entry);
                for waiter in waiters.dependents {
                    self.input_finished(&waiter);
                }
            }
            Lookup::Erred(error) => {
                for waiter in waiters.dependents {
                    self.fail(&waiter, error.clone(), comm);
                }
            }
            Lookup::Missing => {
                for waiter in waiters.dependents {
                    let error = TaskError::new(
                        ErrorKind::MissingDependency,
                        "flotilla::MissingDependency",
                        format!("input `{key}` has no stored result: it was released or never submitted"),
                    )
                    .at(&waiter, self.task_name(&waiter));
                    self.fail(&waiter, error, comm);
                }
            }
        }
    }

    /// The tasks of `dependents` still waiting, once each: a task
    /// cancelled meanwhile would hold a finished input forever (or, run
    /// again since, be failed by an old lookup), and one listed twice (an
    /// earlier run and the current one) would count its input twice.
    fn waiting_dependents(&self, mut dependents: Vec<String>) -> Vec<String> {
        dependents.retain(|key| {
            self.tasks
                .get(key)
                .is_some_and(|t| t.state == State::Waiting)
        });
        dependents.sort_unstable();
        dependents.dedup();
        dependents
    }

    fn task_name(&self, key: &str) -> &str {
        self.tasks
            .get(key)
            .and_then(|t| t.spec.as_ref())
            .map_or("", |s| s.task.as_str())
    }

    fn input_finished(&mut self, key: &str) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        if task.state != State::Waiting {
            return;
        }
        task.missing = task.missing.saturating_sub(1);
        if task.missing == 0 {
            self.make_ready(key);
        }
    }

    /// A task came back from the workers: it no longer counts in flight.
    /// Returns whether the scheduler knows it.
    fn land(&mut self, key: &str) -> bool {
        let Some(task) = self.tasks.get_mut(key) else {
            return false;
        };
        if task.in_flight {
            task.in_flight = false;
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        true
    }

    /// A worker finished `key` after running it for `run`: like
    /// [`Core::finished`], and the task's name learns its duration (which
    /// decides how its later tasks are bundled, see [`Core::dispatch`]). A
    /// zero `run` is a worker that does not measure: nothing is learnt.
    pub fn finished_in(
        &mut self,
        key: &str,
        inline: Option<Vec<u8>>,
        size: u64,
        run: Duration,
        comm: &mut impl Comm,
    ) {
        if !self.tasks.contains_key(key) {
            // Without its inline value (up to 16 KiB a report, 10,000
            // reports): whoever needs it reads it from Redis.
            drop(inline);
            self.remember_early(key, Early::Finished { size, run });
            return;
        }
        if !run.is_zero() {
            let name = self
                .tasks
                .get(key)
                .filter(|t| t.state == State::Processing)
                .and_then(|t| t.spec.as_ref())
                .map(|spec| spec.task.clone());
            if let Some(name) = name {
                self.durations.learn(&name, run);
                self.tally.observe(&name, run);
            }
        }
        self.finished(key, inline, size, comm);
    }

    /// A worker finished `key`; `inline` holds its result when small.
    pub fn finished(
        &mut self,
        key: &str,
        inline: Option<Vec<u8>>,
        size: u64,
        comm: &mut impl Comm,
    ) {
        if !self.land(key) {
            return;
        }
        let Some(task) = self.tasks.get(key) else {
            return;
        };
        if matches!(task.state, State::Finished | State::Erred) {
            return; // a duplicate completion (at-least-once delivery), or cancelled meanwhile
        }
        if matches!(task.state, State::Waiting | State::Ready) {
            // An earlier run reports (its custody lapsed, or the task was
            // retried meanwhile): the holds a start would release go now.
            self.unhold_inputs_of(key);
        }
        self.parked.remove(key);
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        self.counts.finished += 1;
        self.tally.count(task_name(task), Outcome::Finished);
        task.state = State::Finished;
        task.spec = None;
        for watcher in std::mem::take(&mut task.watchers) {
            comm.notify(
                &watcher,
                Event::Finished {
                    key: key.to_owned(),
                    inline: inline.clone(),
                    size,
                    run_us: 0,
                },
            );
        }
        let mut dependents = std::mem::take(&mut task.dependents);
        // Once each: an earlier run of a dependent may be listed too.
        dependents.sort_unstable();
        dependents.dedup();
        if task.holders == 0 || task.forgotten {
            self.tasks.remove(key);
        } else {
            task.inline = inline.filter(|bytes| bytes.len() <= INLINE_LIMIT);
        }
        for dependent in dependents {
            self.input_finished(&dependent);
        }
    }

    /// A worker reports that `key` failed. With `retrying` it runs again;
    /// otherwise its dependents fail with the same error (the worker already
    /// told the submitting client).
    pub fn erred(&mut self, key: &str, error: TaskError, retrying: bool, comm: &mut impl Comm) {
        if !self.land(key) {
            if !retrying {
                self.remember_early(key, Early::Erred(error));
            }
            return;
        }
        let Some(task) = self.tasks.get(key) else {
            return;
        };
        if matches!(task.state, State::Finished | State::Erred) {
            return;
        }
        if matches!(task.state, State::Waiting | State::Ready) {
            // An earlier run reports (its custody lapsed, or the task was
            // retried meanwhile). Running again is what it waits for
            // already; failing for good releases the holds a start would.
            if retrying {
                return;
            }
            self.unhold_inputs_of(key);
            self.parked.remove(key);
        }
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        self.recent_errors.record(
            key,
            task_name(task),
            &error,
            retrying,
            std::time::SystemTime::now(),
        );
        if retrying && task.spec.is_some() && !task.forgotten {
            task.attempt += 1;
            let delay = task.spec.as_ref().map_or(Duration::ZERO, |spec| {
                spec.retry.delay(task.attempt - 1, key)
            });
            if !delay.is_zero() {
                let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                task.retry_at_ms = self.now_ms.saturating_add(delay_ms);
            }
            self.run_again(key);
            return;
        }
        self.counts.erred += 1;
        self.tally.count(task_name(task), Outcome::of_error(&error));
        task.state = State::Erred;
        task.error = Some(Box::new(error.clone()));
        for watcher in task.watchers.clone() {
            comm.notify(
                &watcher,
                Event::Erred {
                    key: key.to_owned(),
                    error: error.clone(),
                    retrying: false,
                },
            );
        }
        let forgotten = task.forgotten;
        let retry_asked = std::mem::take(&mut task.retry_asked);
        let dependents = std::mem::take(&mut task.dependents);
        for dependent in dependents {
            self.fail(&dependent, error.clone(), comm);
        }
        if forgotten {
            self.drop_task(key, false, comm);
        } else if retry_asked {
            self.retry(&[key.to_owned()], comm);
        }
    }

    /// Fails a task the scheduler holds, and its dependents, with `error`:
    /// stores the error and tells each interested client.
    fn fail(&mut self, key: &str, error: TaskError, comm: &mut impl Comm) {
        let mut stack = vec![key.to_owned()];
        // Processing tasks whose last holder let go (a chained dependent,
        // see `chain_after`): nobody will forget them again.
        let mut forgotten = Vec::new();
        while let Some(key) = stack.pop() {
            let Some(task) = self.tasks.get_mut(&key) else {
                continue;
            };
            if matches!(task.state, State::Finished | State::Erred) {
                continue;
            }
            if task.in_flight {
                task.in_flight = false;
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            if error.kind() == ErrorKind::Cancelled {
                self.counts.cancelled += 1;
            } else {
                self.counts.erred += 1;
            }
            self.tally.count(task_name(task), Outcome::of_error(&error));
            // A failure the scheduler decided (its dependents share it).
            if error.key() == key && error.kind() != ErrorKind::Cancelled {
                self.recent_errors.record(
                    &key,
                    task_name(task),
                    &error,
                    false,
                    std::time::SystemTime::now(),
                );
            }
            let was_waiting = matches!(task.state, State::Waiting | State::Ready)
                && !std::mem::replace(&mut task.released, true);
            task.state = State::Erred;
            task.error = Some(Box::new(error.clone()));
            comm.store_error(&key, &error);
            for client in task.clients() {
                comm.notify(
                    client,
                    Event::Erred {
                        key: key.clone(),
                        error: error.clone(),
                        retrying: false,
                    },
                );
            }
            stack.extend(std::mem::take(&mut task.dependents));
            if task.forgotten {
                forgotten.push(key.clone());
            }
            self.parked.remove(&key);
            if was_waiting {
                let deps = task
                    .spec
                    .as_ref()
                    .map(|s| s.deps.clone())
                    .unwrap_or_default();
                self.unhold_local(&deps);
            }
        }
        for key in forgotten {
            self.drop_task(&key, false, comm);
        }
    }

    /// Drops the holds `key`'s spec has on its inputs (what its start
    /// releases), for a report of an earlier run of a task waiting again.
    /// Once only: a task whose holds went already ([`TaskEntry::released`])
    /// releases nothing.
    fn unhold_inputs_of(&mut self, key: &str) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        if std::mem::replace(&mut task.released, true) {
            return;
        }
        let deps = task
            .spec
            .as_ref()
            .map(|spec| spec.deps.clone())
            .unwrap_or_default();
        self.unhold_local(&deps);
    }

    fn unhold_local(&mut self, deps: &[String]) {
        for dep in deps {
            if let Some(input) = self.tasks.get_mut(dep) {
                input.holders = input.holders.saturating_sub(1);
                if input.holders == 0 && input.state == State::Finished {
                    self.tasks.remove(dep);
                }
            }
        }
    }

    /// Removes a task for good, releasing its holds on its inputs (as
    /// abandoned work, with `abandoned`).
    fn drop_task(&mut self, key: &str, abandoned: bool, comm: &mut impl Comm) {
        if let Some(task) = self.tasks.remove(key) {
            self.parked.remove(key);
            if task.in_flight {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            if let Some(spec) = task.spec {
                comm.forget_spec(key);
                if matches!(task.state, State::Waiting | State::Ready) && !task.released {
                    self.unhold_local(&spec.deps);
                }
                let held: Vec<String> = spec.held_keys().cloned().collect();
                if !held.is_empty() {
                    if abandoned {
                        comm.release_abandoned_inputs(key, &held);
                    } else {
                        comm.release_inputs(key, &held);
                    }
                }
            }
        }
    }

    /// These keys lost their last holder because the clients that held them
    /// are gone (their lease lapsed): the departed clients' pending work
    /// that nothing else holds (no other client, dependent,
    /// `fire_and_forget` or dataset) is cancelled, like Dask cancels a
    /// departed client's tasks. Waiting and ready tasks leave at once;
    /// processing ones leave too and their workers are told to stop them
    /// (as [`Core::cancel`] with `force`), which also keeps a worker from
    /// starting one still queued. Their inputs left without holders follow.
    pub fn abandon(&mut self, keys: &[String], comm: &mut impl Comm) {
        let mut running = Vec::new();
        for key in keys {
            let Some(task) = self.tasks.get(key) else {
                continue;
            };
            match task.state {
                State::Waiting | State::Ready => {
                    self.counts.cancelled += 1;
                    self.tally_outcome(key, Outcome::Cancelled);
                }
                State::Processing => {
                    self.counts.cancelled += 1;
                    self.tally_outcome(key, Outcome::Cancelled);
                    running.push(key.clone());
                }
                State::Erred => {}
                State::Finished => continue,
            }
            self.drop_task(key, true, comm);
        }
        if !running.is_empty() {
            comm.cancel_running(&running);
        }
    }

    /// These keys lost their last holder: tasks that haven't run are
    /// cancelled (and release their inputs, which may cascade), running ones
    /// are dropped when they report, erred ones are forgotten.
    pub fn forget(&mut self, keys: &[String], comm: &mut impl Comm) {
        for key in keys {
            let Some(task) = self.tasks.get_mut(key) else {
                continue;
            };
            match task.state {
                State::Waiting | State::Ready => {
                    self.counts.cancelled += 1;
                    self.tally_outcome(key, Outcome::Cancelled);
                    self.drop_task(key, false, comm);
                }
                State::Processing => task.forgotten = true,
                State::Erred => self.drop_task(key, false, comm),
                State::Finished => {}
            }
        }
    }

    /// `client` wants events for `keys`, which it did not submit.
    pub fn watch(&mut self, client: &str, keys: &[String], comm: &mut impl Comm) {
        for key in keys {
            match self.tasks.get_mut(key) {
                Some(task) => match task.state {
                    State::Finished => comm.notify(
                        client,
                        Event::Finished {
                            key: key.clone(),
                            inline: task.inline.clone(),
                            size: 0,
                            run_us: 0,
                        },
                    ),
                    State::Erred => comm.notify(
                        client,
                        Event::Erred {
                            key: key.clone(),
                            error: task
                                .error
                                .as_deref()
                                .cloned()
                                .unwrap_or_else(|| cancelled_error(key, "")),
                            retrying: false,
                        },
                    ),
                    _ => {
                        if !task.watchers.iter().any(|w| w == client) {
                            task.watchers.push(client.to_owned());
                        }
                    }
                },
                None => {
                    let waiters = self.lookups.entry(key.clone()).or_default();
                    if waiters.dependents.is_empty() && waiters.watchers.is_empty() {
                        comm.lookup(key);
                    }
                    waiters.watchers.push(client.to_owned());
                }
            }
        }
    }

    /// Cancels tasks and their dependents; with `force`, running ones are
    /// stopped on their workers too.
    pub fn cancel(&mut self, keys: &[String], force: bool, comm: &mut impl Comm) {
        let mut running = Vec::new();
        for key in keys {
            let Some(task) = self.tasks.get(key) else {
                continue;
            };
            if task.state == State::Processing {
                running.push(key.clone());
            }
            let error = cancelled_error(key, self.task_name(key));
            self.fail(key, error, comm);
        }
        if force && !running.is_empty() {
            comm.cancel_running(&running);
        }
    }

    /// Runs failed tasks again, after their failed inputs. A task still
    /// processing here (its client heard of its failure before this
    /// scheduler did) runs again once its failure comes.
    pub fn retry(&mut self, keys: &[String], comm: &mut impl Comm) {
        for key in keys {
            let Some(task) = self.tasks.get_mut(key) else {
                continue;
            };
            if task.state == State::Processing {
                task.retry_asked = true;
                continue;
            }
            if task.state != State::Erred || task.spec.is_none() {
                continue;
            }
            let deps = task
                .spec
                .as_ref()
                .map(|s| s.deps.clone())
                .unwrap_or_default();
            let erred_inputs: Vec<String> = deps
                .into_iter()
                .filter(|d| self.tasks.get(d).is_some_and(|t| t.state == State::Erred))
                .collect();
            self.retry(&erred_inputs, comm);
            let Some(task) = self.tasks.remove(key) else {
                continue;
            };
            let watchers = task.watchers;
            if let Some(spec) = task.spec {
                self.admit(spec, 0, comm);
                if let Some(entry) = self.tasks.get_mut(key) {
                    entry.watchers = watchers;
                    entry.dependents.extend(task.dependents);
                }
            }
        }
    }

    /// A worker announced itself.
    pub fn worker_seen(&mut self, info: WorkerInfo, now: Instant) {
        let entry = Worker {
            name: info.name,
            slots: info.slots.max(1),
            tasks: info.tasks.into_iter().collect(),
            resources: info.resources.into_iter().collect(),
            last_seen: now,
            rss_bytes: info.rss_bytes,
            cpu_ms: info.cpu_ms,
        };
        let changed = match self.workers.get(&info.id) {
            Some(old) => {
                old.slots != entry.slots
                    || old.tasks != entry.tasks
                    || old.resources != entry.resources
            }
            None => true,
        };
        self.workers.insert(info.id, entry);
        if changed {
            self.workers_changed(&[]);
        }
    }

    /// Tasks handed out whose worker is known to be gone without
    /// finishing them (their custody lapsed): they are ready again. Tasks
    /// that completed meanwhile, or that this scheduler does not know, are
    /// left alone.
    ///
    /// A task sent in the chain of an input that has not finished waits
    /// for it again instead (`run_again`).
    pub fn requeue(&mut self, keys: &[String]) {
        for key in keys {
            if self
                .tasks
                .get(key)
                .is_some_and(|task| task.state == State::Processing)
            {
                self.land(key);
                self.run_again(key);
            }
        }
    }

    /// Makes a task that is to run again ready, or waiting when it was
    /// sent in the chain of an input that has not finished (see
    /// [`Core::chain_after`]): an input counts while it will still tell
    /// the task it finished.
    fn run_again(&mut self, key: &str) {
        let Some(task) = self.tasks.get(key) else {
            return;
        };
        let unfinished = task.spec.as_ref().map_or(0, |spec| {
            spec.deps
                .iter()
                .filter(|dep| {
                    self.tasks.get(*dep).is_some_and(|input| {
                        matches!(
                            input.state,
                            State::Waiting | State::Ready | State::Processing
                        ) && input.dependents.iter().any(|d| d == key)
                    })
                })
                .count()
        });
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        task.missing = unfinished as u32;
        if unfinished == 0 {
            self.make_ready(key);
        } else {
            task.state = State::Waiting;
        }
    }

    /// The tasks handed out to workers and not reported back yet, for
    /// checking against the store ([`Core::checked`]).
    pub fn processing(&self) -> Vec<String> {
        self.tasks
            .iter()
            .filter(|(_, task)| task.state == State::Processing && task.in_flight)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// What Redis holds for a task that has been processing a while (see
    /// [`Checked`]). A task whose result is stored is settled as its result
    /// says, and its clients are told (its worker may have died after
    /// storing it and before reporting it); one with neither spec nor result
    /// is lost with Redis' data and fails with a `flotilla::DataLost`
    /// error, never left processing. Tasks no longer processing are left
    /// alone.
    pub fn checked(&mut self, key: &str, found: Checked, comm: &mut impl Comm) {
        let Some(task) = self.tasks.get(key) else {
            return;
        };
        if task.state != State::Processing {
            return;
        }
        match found {
            Checked::Pending => {}
            Checked::Finished => {
                if let Some(spec) = &task.spec {
                    comm.notify(
                        &spec.client,
                        Event::Finished {
                            key: key.to_owned(),
                            inline: None,
                            size: 0,
                            run_us: 0,
                        },
                    );
                }
                self.finished(key, None, 0, comm);
            }
            Checked::Erred(error) => {
                if let Some(spec) = &task.spec {
                    comm.notify(
                        &spec.client,
                        Event::Erred {
                            key: key.to_owned(),
                            error: error.clone(),
                            retrying: false,
                        },
                    );
                }
                self.erred(key, error, false, comm);
            }
            Checked::Lost => {
                let task_name = task.spec.as_ref().map_or("", |s| s.task.as_str());
                let error = TaskError::new(
                    ErrorKind::MissingDependency,
                    flotilla_proto::DATA_LOST,
                    "Redis lost the task's spec and result while it was processing \
                     (a restart without persistence, eviction or a failover)",
                )
                .at(key, task_name);
                self.fail(key, error, comm);
            }
        }
    }

    /// A worker left.
    pub fn worker_gone(&mut self, id: &str) {
        if self.workers.remove(id).is_some() {
            self.workers_changed(&[id.to_owned()]);
        }
    }

    /// Tells the core the wall clock (milliseconds since the Unix epoch):
    /// tasks whose start time or retry delay is over by then become ready.
    /// Call it before handing the core its inputs, and when
    /// [`Core::next_due`] comes; a start time is judged by the clock as
    /// last told.
    pub fn wake(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        while let Some(Reverse((due, _))) = self.timer.peek() {
            if *due > now_ms {
                break;
            }
            let Some(Reverse((_, key))) = self.timer.pop() else {
                break;
            };
            // Still waiting for its time (not cancelled, failed or made
            // ready since): ready now, or held again if its time moved.
            if self
                .tasks
                .get(&key)
                .is_some_and(|t| t.state == State::Waiting && t.missing == 0)
            {
                self.make_ready(&key);
            }
        }
    }

    /// When the earliest task held for its time is due, in wall-clock
    /// milliseconds (the entry may be stale: [`Core::wake`] then finds
    /// nothing to do).
    pub fn next_due(&self) -> Option<u64> {
        self.timer.peek().map(|Reverse((due, _))| *due)
    }

    /// Once a second: gives orphaned watchers and dependents their last lookup.
    pub fn tick(&mut self, comm: &mut impl Comm) {
        self.ticks += 1;
        if !self.early.is_empty() {
            let now = self.ticks;
            self.early
                .retain(|_, (_, since)| now.saturating_sub(*since) < EARLY_TICKS);
        }
        // Names still held a tick after their probes went out are slow (or
        // their probes wait on them): the next dispatch sends them all.
        let stalled: Vec<String> = self.durations.held.keys().cloned().collect();
        self.durations.stalled.extend(stalled);
        if !self.recovered.is_empty() {
            let now = self.ticks;
            self.recovered
                .retain(|_, since| now.saturating_sub(*since) < RECOVERED_TICKS);
        }
        let due: Vec<String> = self
            .orphans
            .iter()
            .filter(|(_, (_, since))| self.ticks.saturating_sub(*since) >= ORPHAN_TICKS)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            if let Some((orphans, _)) = self.orphans.remove(&key) {
                let waiters = self.lookups.entry(key.clone()).or_default();
                if waiters.dependents.is_empty() && waiters.watchers.is_empty() {
                    comm.lookup(&key);
                }
                for watcher in orphans.watchers {
                    if !waiters.watchers.contains(&watcher) {
                        waiters.watchers.push(watcher);
                    }
                }
                waiters.dependents.extend(orphans.dependents);
                self.final_lookups.insert(key);
            }
        }
    }

    /// Forgets workers not seen for [`WORKER_TIMEOUT`].
    pub fn expire_workers(&mut self, now: Instant) {
        let gone: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_seen) >= WORKER_TIMEOUT)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.workers.remove(id);
        }
        if !gone.is_empty() {
            self.workers_changed(&gone);
        }
    }

    fn workers_changed(&mut self, gone: &[String]) {
        self.slots = self.workers.values().map(|w| w.slots).sum();
        self.provided.clear();
        for worker in self.workers.values() {
            for (name, fingerprint) in &worker.tasks {
                self.provided
                    .entry(name.clone())
                    .or_default()
                    .insert(*fingerprint);
            }
        }
        // Tasks pinned to a worker that left go back to the ready queue.
        let lost: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.in_flight && t.worker.as_ref().is_some_and(|w| gone.contains(w)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in lost {
            self.land(&key);
            if let Some(task) = self.tasks.get_mut(&key) {
                task.worker = None;
            }
            self.make_ready(&key);
        }
        // Parked tasks get another chance.
        for key in std::mem::take(&mut self.parked) {
            if self
                .tasks
                .get(&key)
                .is_some_and(|t| t.state == State::Ready)
            {
                let seq = self.tasks[&key].seq;
                let priority = self.tasks[&key].spec.as_ref().map_or(0, |s| s.priority);
                self.ready.push((priority, Reverse(seq), key));
            }
        }
    }

    /// Sends ready tasks to workers, highest priority first, as long as the
    /// in-flight window allows. Tasks known to be short are bundled, many
    /// per delivery, up to [`BUNDLE_BUDGET`] of expected run time (and
    /// fewer when few are ready); a task of unknown or longer duration is
    /// sent alone, so that a worker never holds short work behind a long
    /// task. Of a name not yet known, one probe per slot goes out first,
    /// its other tasks held back until a probe finishes or a tick passes.
    ///
    /// A task goes with its *chain*: its one waiting dependent when that
    /// waits for it alone, then that one's, and so on (up to [`MAX_CHAIN`]
    /// known-short tasks, within [`BUNDLE_BUDGET`]; see
    /// `chain_after`). They travel in its delivery, and the worker
    /// runs each as soon as the one before it ends, handing it the result
    /// in memory: a link costs no event to the scheduler and no dispatch
    /// back through the broker.
    pub fn dispatch(&mut self, comm: &mut impl Comm) {
        if self.slots == 0 {
            return; // nobody to run anything yet: tasks wait, as in Dask
        }
        self.release_held();
        let window = self.slots as usize * IN_FLIGHT_PER_SLOT;
        let bundle_size = (self.ready.len() / (2 * self.slots as usize)).clamp(1, MAX_BUNDLE);
        let probes_per_name = self.slots as usize;
        // Per target: the bundle being filled and its expected run time.
        let mut bundles: HashMap<Option<String>, (Vec<RunTask>, Duration)> = HashMap::new();
        while self.in_flight < window {
            let Some((_, _, key)) = self.ready.pop() else {
                break;
            };
            let Some(name) = self
                .tasks
                .get(&key)
                .filter(|t| t.state == State::Ready)
                .and_then(|t| t.spec.as_ref())
                .map(|spec| spec.task.clone())
            else {
                continue; // a stale queue entry
            };
            let expected = self.durations.mean(&name);
            if expected.is_none()
                && !self.durations.stalled.contains(&name)
                && self.probes_out(&name) >= probes_per_name
            {
                self.durations.held.entry(name).or_default().push_back(key);
                continue;
            }
            let Some(run) = self.start(&key, comm) else {
                continue;
            };
            let target = self.tasks.get(&key).and_then(|t| t.worker.clone());
            let (chain, chain_time) = self.chain_after(&key, comm);
            let expected = match expected {
                Some(expected) if expected <= BUNDLE_BUDGET => expected,
                Some(_) => {
                    comm.send_tasks(target.as_deref(), with_chain(run, chain));
                    continue;
                }
                None => {
                    self.durations.probes.entry(name).or_default().push(key);
                    comm.send_tasks(target.as_deref(), with_chain(run, chain));
                    continue;
                }
            };
            let expected = expected + chain_time;
            let (bundle, budget_used) = bundles.entry(target.clone()).or_default();
            if !bundle.is_empty() && *budget_used + expected > BUNDLE_BUDGET {
                comm.send_tasks(target.as_deref(), std::mem::take(bundle));
                *budget_used = Duration::ZERO;
            }
            bundle.push(run);
            bundle.extend(chain);
            *budget_used += expected;
            if bundle.len() >= bundle_size {
                comm.send_tasks(target.as_deref(), std::mem::take(bundle));
                *budget_used = Duration::ZERO;
            }
        }
        for (target, (tasks, _)) in bundles {
            if !tasks.is_empty() {
                comm.send_tasks(target.as_deref(), tasks);
            }
        }
    }

    /// Starts the chain that follows `head`, which was just started: each
    /// link is the one waiting dependent of the link before, waiting for it
    /// alone ([`Core::chained_dependent`]). Returns the links, in order,
    /// and their expected run time. A link is processing from now on, its
    /// one missing input still counted: it is in the same delivery as that
    /// input, whose worker runs it next (or fails it with that input's
    /// error, as [`Core::fail`] would); if the delivery comes back
    /// unfinished, [`Core::requeue`] makes it wait again.
    fn chain_after(&mut self, head: &str, comm: &mut impl Comm) -> (Vec<RunTask>, Duration) {
        let mut chain = Vec::new();
        let mut time = Duration::ZERO;
        let mut last = head.to_owned();
        while chain.len() < MAX_CHAIN {
            let Some((next, expected)) = self.chained_dependent(&last) else {
                break;
            };
            if time + expected > BUNDLE_BUDGET {
                break;
            }
            if let Some(task) = self.tasks.get_mut(&next) {
                task.state = State::Ready; // what `start` takes; never queued
            }
            let Some(run) = self.start(&next, comm) else {
                break; // failed: no worker provides it
            };
            chain.push(run);
            self.counts.chained += 1;
            time += expected;
            last = next;
        }
        (chain, time)
    }

    /// The dependent that may follow `key` in its delivery, with its
    /// expected run time: `key` has exactly one waiting dependent, which
    /// waits for nothing else, goes to the shared queue like `key`, and is
    /// known to be short; and `key` is not retried on failure (its
    /// dependent could not wait for the next run). A dependent no worker
    /// provides is left to [`Core::start`] to fail.
    fn chained_dependent(&self, key: &str) -> Option<(String, Duration)> {
        let task = self.tasks.get(key)?;
        let spec = task.spec.as_ref()?;
        if task.state != State::Processing
            || task.worker.is_some()
            || task.forgotten
            || spec.retries > 0
        {
            return None;
        }
        let mut waiting = task.dependents.iter().filter(|d| {
            self.tasks
                .get(*d)
                .is_some_and(|t| t.state == State::Waiting)
        });
        let first = waiting.next()?;
        if waiting.any(|other| other != first) {
            return None;
        }
        let dependent = self.tasks.get(first)?;
        let dependent_spec = dependent.spec.as_ref()?;
        if dependent.missing != 1
            || dependent.not_before_ms() > self.now_ms
            || !dependent_spec.workers.is_empty()
            || !dependent_spec.resources.is_empty()
        {
            return None;
        }
        let expected = self.durations.mean(&dependent_spec.task)?;
        (expected <= BUNDLE_BUDGET).then(|| (first.clone(), expected))
    }

    /// Probes of the unknown name `name` still in flight (the ones that
    /// landed are dropped from the list).
    fn probes_out(&mut self, name: &str) -> usize {
        let Some(probes) = self.durations.probes.get_mut(name) else {
            return 0;
        };
        let tasks = &self.tasks;
        probes.retain(|key| tasks.get(key).is_some_and(|t| t.in_flight));
        probes.len()
    }

    /// Puts held tasks back into the ready queue: all of a name now known,
    /// and of a name still unknown as many as probes may go out.
    fn release_held(&mut self) {
        if self.durations.held.is_empty() {
            return;
        }
        let names: Vec<String> = self.durations.held.keys().cloned().collect();
        for name in names {
            let room = if self.durations.mean_us.contains_key(&name)
                || self.durations.stalled.contains(&name)
            {
                usize::MAX
            } else {
                (self.slots as usize).saturating_sub(self.probes_out(&name))
            };
            let Some(held) = self.durations.held.get_mut(&name) else {
                continue;
            };
            let take = room.min(held.len());
            let released: Vec<String> = held.drain(..take).collect();
            if held.is_empty() {
                self.durations.held.remove(&name);
            }
            for key in released {
                if let Some(task) = self.tasks.get(&key).filter(|t| t.state == State::Ready) {
                    let priority = task.spec.as_ref().map_or(0, |s| s.priority);
                    self.ready.push((priority, Reverse(task.seq), key));
                }
            }
        }
    }

    fn place(&mut self, spec: &TaskSpec) -> Placement {
        if spec.workers.is_empty() && spec.resources.is_empty() {
            return Placement::Shared;
        }
        let fits = |w: &Worker| {
            spec.resources
                .iter()
                .all(|(name, amount)| w.resources.get(name).is_some_and(|have| have >= amount))
        };
        let mut candidates: Vec<&String> = self
            .workers
            .iter()
            .filter(|(id, w)| {
                (spec.workers.is_empty() || spec.workers.iter().any(|x| x == *id || *x == w.name))
                    && fits(w)
            })
            .map(|(id, _)| id)
            .collect();
        if candidates.is_empty() && spec.allow_other_workers && !spec.workers.is_empty() {
            candidates = self
                .workers
                .iter()
                .filter(|(_, w)| fits(w))
                .map(|(id, _)| id)
                .collect();
            if candidates.is_empty() {
                return Placement::Park;
            }
            if spec.resources.is_empty() {
                return Placement::Shared;
            }
        }
        if candidates.is_empty() {
            return Placement::Park;
        }
        candidates.sort();
        self.next_worker = self.next_worker.wrapping_add(1);
        Placement::Worker(candidates[self.next_worker % candidates.len()].clone())
    }

    /// Takes a ready task out for sending, or fails it when no worker can
    /// run it, or parks it when no live worker matches its placement.
    fn start(&mut self, key: &str, comm: &mut impl Comm) -> Option<RunTask> {
        let task = self.tasks.get(key)?;
        if task.state != State::Ready {
            return None;
        }
        let spec = task.spec.clone()?;
        if let Some(error) = self.check_provided(&spec) {
            self.fail(key, error, comm);
            return None;
        }
        let target = match self.place(&spec) {
            Placement::Park => {
                self.parked.insert(key.to_owned());
                return None;
            }
            Placement::Shared => None,
            Placement::Worker(id) => Some(id),
        };
        let task = self.tasks.get_mut(key)?;
        task.state = State::Processing;
        task.in_flight = true;
        task.worker = target;
        let attempt = task.attempt;
        // A second run (retried, or its custody lapsed) released them already.
        let release = !std::mem::replace(&mut task.released, true);
        self.in_flight += 1;
        let mut inline = Vec::new();
        for dep in &spec.deps {
            if let Some(input) = self.tasks.get_mut(dep) {
                if let Some(bytes) = &input.inline {
                    inline.push((dep.clone(), ByteBuf::from(bytes.clone())));
                }
                if release {
                    input.holders = input.holders.saturating_sub(1);
                    if input.holders == 0 && input.state == State::Finished {
                        self.tasks.remove(dep);
                    }
                }
            }
        }
        Some(RunTask {
            spec,
            inline,
            attempt,
        })
    }

    fn check_provided(&self, spec: &TaskSpec) -> Option<TaskError> {
        let error = match self.provided.get(&spec.task) {
            None => TaskError::new(
                ErrorKind::UnknownTask,
                "flotilla::UnknownTask",
                format!(
                    "no worker provides task `{}` (workers alive: {})",
                    spec.task,
                    self.workers.len()
                ),
            ),
            Some(fingerprints) if !fingerprints.contains(&spec.fingerprint) => TaskError::new(
                ErrorKind::SignatureMismatch,
                "flotilla::SignatureMismatch",
                format!(
                    "workers provide task `{}` with another signature (fingerprint {:#x}, client has {:#x}): \
                     rebuild the client and workers from the same task code",
                    spec.task,
                    fingerprints.iter().next().copied().unwrap_or_default(),
                    spec.fingerprint
                ),
            ),
            Some(_) => return None,
        };
        Some(error.at(&spec.key, &spec.task))
    }
}

/// A task's delivery: the task, then its chain.
fn with_chain(run: RunTask, chain: Vec<RunTask>) -> Vec<RunTask> {
    let mut tasks = Vec::with_capacity(1 + chain.len());
    tasks.push(run);
    tasks.extend(chain);
    tasks
}

#[cfg(test)]
impl Core {
    /// Checks the structural invariants every transition must keep, and
    /// says which one broke. Test-only: it walks the whole table.
    ///
    /// - The in-flight counter counts exactly the tasks marked in flight,
    ///   and a task is in flight exactly while it is processing; a task
    ///   pinned to a worker while in flight names a live worker.
    /// - Finished entries carry no spec, error, dependents or watchers, and
    ///   stay only while some waiting or ready dependent holds them; erred
    ///   entries keep their spec and error; the others have a spec and no
    ///   error. A spec's key is its entry's key.
    /// - A waiting task's `missing` counts exactly its inputs that will
    ///   still tell it they finished: inputs in the table that list it
    ///   among their dependents (an erred input never does), and unknown
    ///   inputs whose pending lookup (or orphan record) lists it. A key in
    ///   the table is never looked up for a dependent. (Lists may name a
    ///   dependent twice, an earlier run and the current one: they are
    ///   deduplicated where consumed.)
    /// - A waiting task with no missing input waits for its time: a start
    ///   time or retry delay after the clock, with its entry in the timer.
    /// - A ready task has no missing input and is in the ready queue or
    ///   parked (stale queue and held entries are allowed: they are
    ///   skipped when popped); every parked key is a ready task.
    /// - A task's holders never exceed its waiting or ready dependents
    ///   that have not released their holds (a task sent again, after a
    ///   retrying failure or a lapsed custody, released them already).
    /// - Slots and provided tasks match the live workers; keys looked up a
    ///   last time are being looked up.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let flying = self.tasks.values().filter(|t| t.in_flight).count();
        if flying != self.in_flight {
            return Err(format!(
                "in_flight counter is {} but {flying} tasks are in flight",
                self.in_flight
            ));
        }
        let queued: HashSet<&str> = self.ready.iter().map(|(_, _, k)| k.as_str()).collect();
        let parked: HashSet<&str> = self
            .parked
            .iter()
            .chain(self.durations.held.values().flatten())
            .map(String::as_str)
            .collect();
        if let Some(key) = self.parked.iter().find(|k| {
            self.tasks
                .get(k.as_str())
                .is_none_or(|t| t.state != State::Ready)
        }) {
            return Err(format!("`{key}` is parked but not a ready task"));
        }
        // Per input, how many waiting or ready tasks still hold it.
        let mut wanted: HashMap<&str, u32> = HashMap::new();
        for t in self.tasks.values() {
            if matches!(t.state, State::Waiting | State::Ready) && !t.released {
                for dep in t.spec.iter().flat_map(|s| s.deps.iter()) {
                    *wanted.entry(dep.as_str()).or_default() += 1;
                }
            }
        }
        let count = |list: &[String], key: &str| list.iter().filter(|k| *k == key).count() as u32;
        for (key, t) in &self.tasks {
            let err = |what: String| Err(format!("task `{key}` ({:?}): {what}", t.state));
            if (t.state == State::Processing) != t.in_flight {
                return err(format!("in_flight is {}", t.in_flight));
            }
            if t.in_flight {
                if let Some(w) = &t.worker {
                    if !self.workers.contains_key(w) {
                        return err(format!("in flight on worker `{w}`, which is gone"));
                    }
                }
            }
            if let Some(spec) = &t.spec {
                if spec.key != *key {
                    return err(format!("its spec has key `{}`", spec.key));
                }
            }
            let holders_allowed = wanted.get(key.as_str()).copied().unwrap_or(0);
            if t.holders > holders_allowed {
                return err(format!(
                    "{} holders but only {holders_allowed} waiting or ready dependents holding it",
                    t.holders
                ));
            }
            match t.state {
                State::Finished => {
                    if t.spec.is_some() || t.error.is_some() {
                        return err("finished with a spec or an error".into());
                    }
                    if !t.dependents.is_empty() || !t.watchers.is_empty() {
                        return err("finished with dependents or watchers left".into());
                    }
                    if t.holders == 0 {
                        return err("finished and held by nothing, yet still in the table".into());
                    }
                }
                State::Erred => {
                    if t.spec.is_none() || t.error.is_none() {
                        return err("erred without its spec or its error".into());
                    }
                }
                State::Waiting | State::Ready | State::Processing => {
                    if t.spec.is_none() || t.error.is_some() {
                        return err("pending without a spec, or with an error".into());
                    }
                }
            }
            if t.state == State::Ready {
                if t.missing != 0 {
                    return err(format!("ready with {} missing inputs", t.missing));
                }
                if !queued.contains(key.as_str()) && !parked.contains(key.as_str()) {
                    return err("ready but neither queued nor parked".into());
                }
            }
            if t.state == State::Waiting && t.missing == 0 {
                let due = t.not_before_ms();
                if due <= self.now_ms {
                    return err(format!(
                        "waiting for nothing: its time ({due}) is not after now ({})",
                        self.now_ms
                    ));
                }
                if !self
                    .timer
                    .iter()
                    .any(|Reverse((d, k))| *d == due && k == key)
                {
                    return err(format!("waiting for its time ({due}) but not in the timer"));
                }
            }
            if t.state == State::Waiting {
                let mut missing = 0;
                for dep in t.spec.iter().flat_map(|s| s.deps.iter()) {
                    let pending = |w: Option<&Waiters>| w.map_or(0, |w| count(&w.dependents, key));
                    let looked_up = pending(self.lookups.get(dep))
                        + pending(self.orphans.get(dep).map(|(w, _)| w));
                    let Some(input) = self.tasks.get(dep) else {
                        // Unknown and looked up for it: missing. Unknown
                        // and not looked up: it finished and left.
                        missing += looked_up.min(1);
                        continue;
                    };
                    if looked_up != 0 {
                        return err(format!(
                            "its input `{dep}` is in the table, yet looked up for it"
                        ));
                    }
                    // An input may list it twice (an earlier run too),
                    // or not at all: the input finished, left, and was
                    // submitted again, after it counted that run.
                    let listed = count(&input.dependents, key).min(1);
                    if listed == 1 && input.state == State::Erred {
                        return err(format!("its erred input `{dep}` lists it"));
                    }
                    missing += listed;
                }
                if missing != t.missing {
                    return err(format!(
                        "missing is {} but {missing} inputs are unfinished",
                        t.missing
                    ));
                }
            }
        }
        let slots: u32 = self.workers.values().map(|w| w.slots).sum();
        if slots != self.slots {
            return Err(format!("slots is {} but workers have {slots}", self.slots));
        }
        let mut provided: HashMap<String, HashSet<u64>> = HashMap::new();
        for w in self.workers.values() {
            for (name, fingerprint) in &w.tasks {
                provided
                    .entry(name.clone())
                    .or_default()
                    .insert(*fingerprint);
            }
        }
        if provided != self.provided {
            return Err(format!(
                "provided is {:?} but workers provide {provided:?}",
                self.provided
            ));
        }
        if let Some(key) = self
            .final_lookups
            .iter()
            .find(|k| !self.lookups.contains_key(*k))
        {
            return Err(format!("`{key}` has a last lookup but no lookup pending"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
