//! The scheduler's state machine. It does no I/O: every input is a method
//! call, every output goes through the [`Comm`] trait, so the whole
//! scheduling logic is unit-tested in microseconds without a broker.
//!
//! A task is *waiting* while some input is unfinished, *ready* once every
//! input finished (held here in a priority queue, not in the broker, so that
//! priorities act before delivery), *processing* once sent to the workers,
//! and leaves the table when it finished (or erred) and none of its
//! dependents still needs it.

use flotilla_proto::{ErrorKind, Event, RunTask, TaskError, TaskSpec, WorkerInfo};
use serde_bytes::ByteBuf;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// Results up to this size ride inside task messages to dependents.
pub const INLINE_LIMIT: usize = 16 * 1024;
/// Ready tasks kept in flight per worker slot (deliveries in the broker or
/// running); the rest wait here, where priorities and cancellation act.
pub const IN_FLIGHT_PER_SLOT: usize = 256;
/// Most tasks bundled into one delivery.
pub const MAX_BUNDLE: usize = 128;
/// A worker that has not announced itself for this long is presumed gone.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the core asks its surroundings to do.
pub trait Comm {
    /// Publish a bundle of ready tasks to the workers.
    fn send_tasks(&mut self, tasks: Vec<RunTask>);
    /// Tell `client` about an event the scheduler decided (an input erred,
    /// no worker provides the task).
    fn notify(&mut self, client: &str, event: Event);
    /// Store an error as `key`'s result.
    fn store_error(&mut self, key: &str, error: &TaskError);
    /// Find out whether `key` has a stored result; answer with
    /// [`Core::lookup_answered`].
    fn lookup(&mut self, key: &str);
}

/// What a lookup of an unknown input found in Redis.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The input has a stored value.
    Finished,
    /// The input has a stored error.
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
}

#[derive(Debug)]
struct TaskEntry {
    spec: Option<TaskSpec>,
    state: State,
    /// Inputs not finished yet.
    missing: u32,
    /// Tasks waiting for this one.
    dependents: Vec<String>,
    /// Dependents not yet sent to workers: while any remain, a finished task
    /// stays in the table, with its result when small.
    holders: u32,
    inline: Option<Vec<u8>>,
    seq: u64,
}

impl TaskEntry {
    fn placeholder(state: State) -> Self {
        TaskEntry {
            spec: None,
            state,
            missing: 0,
            dependents: Vec::new(),
            holders: 0,
            inline: None,
            seq: 0,
        }
    }
}

#[derive(Debug)]
struct Worker {
    slots: u32,
    tasks: HashSet<(String, u64)>,
    last_seen: Instant,
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
    /// Tasks submitted since start.
    pub submitted: u64,
    /// Tasks finished since start.
    pub finished: u64,
    /// Tasks erred since start (including dependents of erred tasks).
    pub erred: u64,
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
    /// Unknown inputs being looked up, with the tasks waiting on them.
    lookups: HashMap<String, Vec<String>>,
    workers: HashMap<String, Worker>,
    provided: HashMap<String, HashSet<u64>>,
    slots: u32,
    in_flight: usize,
    seq: u64,
    counts: Counts,
}

impl Core {
    /// An empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Current counters.
    pub fn counts(&self) -> Counts {
        let mut counts = self.counts;
        counts.ready = self.ready.len();
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

    /// Number of tasks the scheduler holds in memory.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the scheduler holds no task.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Records submitted tasks, in submission order.
    pub fn submit(&mut self, specs: Vec<TaskSpec>, comm: &mut impl Comm) {
        for spec in specs {
            self.submit_one(spec, comm);
        }
    }

    fn submit_one(&mut self, spec: TaskSpec, comm: &mut impl Comm) {
        if self.tasks.contains_key(&spec.key) {
            // The same key again (a pure task submitted twice): one run serves both.
            return;
        }
        self.counts.submitted += 1;
        self.seq += 1;
        let key = spec.key.clone();
        let mut missing = 0;
        for dep in &spec.deps {
            match self.tasks.get_mut(dep) {
                Some(input) if input.state == State::Finished => input.holders += 1,
                Some(input) => {
                    input.dependents.push(key.clone());
                    input.holders += 1;
                    missing += 1;
                }
                None => {
                    let waiters = self.lookups.entry(dep.clone()).or_default();
                    if waiters.is_empty() {
                        comm.lookup(dep);
                    }
                    waiters.push(key.clone());
                    missing += 1;
                }
            }
        }
        let entry = TaskEntry {
            spec: Some(spec),
            state: State::Waiting,
            missing,
            dependents: Vec::new(),
            holders: 0,
            inline: None,
            seq: self.seq,
        };
        self.tasks.insert(key.clone(), entry);
        if missing == 0 {
            self.make_ready(&key);
        }
    }

    fn make_ready(&mut self, key: &str) {
        if let Some(task) = self.tasks.get_mut(key) {
            task.state = State::Ready;
            let priority = task.spec.as_ref().map_or(0, |s| s.priority);
            self.ready
                .push((priority, Reverse(task.seq), key.to_owned()));
        }
    }

    /// An unknown input's lookup came back.
    pub fn lookup_answered(&mut self, key: &str, found: Lookup, comm: &mut impl Comm) {
        let Some(mut waiters) = self.lookups.remove(key) else {
            return;
        };
        waiters.retain(|waiter| self.tasks.contains_key(waiter));
        match found {
            Lookup::Finished => {
                let mut entry = TaskEntry::placeholder(State::Finished);
                entry.holders = waiters.len() as u32;
                self.tasks.insert(key.to_owned(), entry);
                for waiter in waiters {
                    self.input_finished(&waiter);
                }
            }
            Lookup::Erred(error) => {
                for waiter in waiters {
                    self.fail(&waiter, error.clone(), comm);
                }
            }
            Lookup::Missing => {
                let error = TaskError::new(
                    ErrorKind::MissingDependency,
                    "flotilla::MissingDependency",
                    format!(
                        "input `{key}` has no stored result: it was released or never submitted"
                    ),
                );
                for waiter in waiters {
                    let error = error.clone().at(&waiter, self.task_name(&waiter));
                    self.fail(&waiter, error, comm);
                }
            }
        }
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

    /// A worker finished `key`; `inline` holds its result when small.
    pub fn finished(&mut self, key: &str, inline: Option<Vec<u8>>) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        if task.state == State::Finished {
            return; // a duplicate completion (at-least-once delivery)
        }
        if task.state == State::Processing {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        self.counts.finished += 1;
        task.state = State::Finished;
        task.spec = None;
        let dependents = std::mem::take(&mut task.dependents);
        if task.holders == 0 {
            self.tasks.remove(key);
        } else {
            task.inline = inline.filter(|bytes| bytes.len() <= INLINE_LIMIT);
        }
        for dependent in dependents {
            self.input_finished(&dependent);
        }
    }

    /// A worker reports that `key` failed; its dependents fail with the same
    /// error. The worker already told the submitting client.
    pub fn erred(&mut self, key: &str, error: TaskError, comm: &mut impl Comm) {
        let Some(task) = self.tasks.remove(key) else {
            return;
        };
        if task.state == State::Processing {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        self.counts.erred += 1;
        for dependent in task.dependents {
            self.fail(&dependent, error.clone(), comm);
        }
    }

    /// Fails a task the scheduler holds, and its dependents, with `error`:
    /// stores the error and tells each submitting client.
    fn fail(&mut self, key: &str, error: TaskError, comm: &mut impl Comm) {
        let mut stack = vec![key.to_owned()];
        while let Some(key) = stack.pop() {
            let Some(task) = self.tasks.remove(&key) else {
                continue;
            };
            if task.state == State::Processing {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            self.counts.erred += 1;
            if let Some(spec) = &task.spec {
                self.release_inputs(spec);
                comm.store_error(&key, &error);
                comm.notify(
                    &spec.client,
                    Event::Erred {
                        key: key.clone(),
                        error: error.clone(),
                    },
                );
            }
            stack.extend(task.dependents);
        }
    }

    /// The task no longer needs its inputs: finished inputs that nobody
    /// else waits for leave the table.
    fn release_inputs(&mut self, spec: &TaskSpec) {
        for dep in &spec.deps {
            if let Some(input) = self.tasks.get_mut(dep) {
                input.holders = input.holders.saturating_sub(1);
                if input.holders == 0 && input.state == State::Finished {
                    self.tasks.remove(dep);
                }
            }
        }
    }

    /// A worker announced itself.
    pub fn worker_seen(&mut self, info: WorkerInfo, now: Instant) {
        let entry = Worker {
            slots: info.slots.max(1),
            tasks: info.tasks.into_iter().collect(),
            last_seen: now,
        };
        let changed = match self.workers.get(&info.id) {
            Some(old) => old.slots != entry.slots || old.tasks != entry.tasks,
            None => true,
        };
        self.workers.insert(info.id, entry);
        if changed {
            self.rebuild_catalog();
        }
    }

    /// A worker left.
    pub fn worker_gone(&mut self, id: &str) {
        if self.workers.remove(id).is_some() {
            self.rebuild_catalog();
        }
    }

    /// Forgets workers not seen for [`WORKER_TIMEOUT`].
    pub fn expire_workers(&mut self, now: Instant) {
        let before = self.workers.len();
        self.workers
            .retain(|_, w| now.saturating_duration_since(w.last_seen) < WORKER_TIMEOUT);
        if self.workers.len() != before {
            self.rebuild_catalog();
        }
    }

    fn rebuild_catalog(&mut self) {
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
    }

    /// Sends ready tasks to workers, highest priority first, as long as the
    /// in-flight window allows; bundles many small tasks per delivery when
    /// many are ready and sends them one by one when few are.
    pub fn dispatch(&mut self, comm: &mut impl Comm) {
        if self.slots == 0 {
            return; // nobody to run anything yet: tasks wait, as in Dask
        }
        let window = self.slots as usize * IN_FLIGHT_PER_SLOT;
        while self.in_flight < window && !self.ready.is_empty() {
            let room = window - self.in_flight;
            let spread = (self.ready.len() / (2 * self.slots as usize)).clamp(1, MAX_BUNDLE);
            let bundle_size = spread.min(room);
            let mut bundle = Vec::with_capacity(bundle_size);
            while bundle.len() < bundle_size {
                let Some((_, _, key)) = self.ready.pop() else {
                    break;
                };
                if let Some(run) = self.start(&key, comm) {
                    bundle.push(run);
                }
            }
            if !bundle.is_empty() {
                self.in_flight += bundle.len();
                comm.send_tasks(bundle);
            }
        }
    }

    /// Takes a ready task out for sending, or fails it when no worker can run it.
    fn start(&mut self, key: &str, comm: &mut impl Comm) -> Option<RunTask> {
        let task = self.tasks.get_mut(key)?;
        if task.state != State::Ready {
            return None;
        }
        let spec = task.spec.take()?;
        if let Some(error) = self.check_provided(&spec) {
            let task = self.tasks.get_mut(key)?;
            task.spec = Some(spec);
            self.fail(key, error.at(key, ""), comm);
            return None;
        }
        let task = self.tasks.get_mut(key)?;
        task.state = State::Processing;
        let mut inline = Vec::new();
        for dep in &spec.deps {
            if let Some(input) = self.tasks.get_mut(dep) {
                if let Some(bytes) = &input.inline {
                    inline.push((dep.clone(), ByteBuf::from(bytes.clone())));
                }
                input.holders = input.holders.saturating_sub(1);
                if input.holders == 0 && input.state == State::Finished {
                    self.tasks.remove(dep);
                }
            }
        }
        Some(RunTask { spec, inline })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        sent: Vec<Vec<RunTask>>,
        notified: Vec<(String, Event)>,
        stored: Vec<String>,
        lookups: Vec<String>,
    }

    impl Comm for Recorder {
        fn send_tasks(&mut self, tasks: Vec<RunTask>) {
            self.sent.push(tasks);
        }
        fn notify(&mut self, client: &str, event: Event) {
            self.notified.push((client.to_owned(), event));
        }
        fn store_error(&mut self, key: &str, _: &TaskError) {
            self.stored.push(key.to_owned());
        }
        fn lookup(&mut self, key: &str) {
            self.lookups.push(key.to_owned());
        }
    }

    impl Recorder {
        fn sent_keys(&mut self) -> Vec<String> {
            self.sent
                .drain(..)
                .flatten()
                .map(|run| run.spec.key)
                .collect()
        }
    }

    fn spec(key: &str, deps: &[&str]) -> TaskSpec {
        TaskSpec {
            key: key.into(),
            task: "t".into(),
            fingerprint: 1,
            args: vec![],
            deps: deps.iter().map(|d| d.to_string()).collect(),
            priority: 0,
            client: "c".into(),
        }
    }

    fn with_worker(slots: u32) -> Core {
        let mut core = Core::new();
        core.worker_seen(
            WorkerInfo {
                id: "w1".into(),
                name: "w1".into(),
                slots,
                tasks: vec![("t".into(), 1)],
            },
            Instant::now(),
        );
        core
    }

    #[test]
    fn chain_runs_in_order_and_leaves_nothing() {
        let mut core = with_worker(1);
        let mut comm = Recorder::default();
        core.submit(
            vec![spec("a", &[]), spec("b", &["a"]), spec("c", &["b"])],
            &mut comm,
        );
        core.dispatch(&mut comm);
        assert_eq!(comm.sent_keys(), ["a"]);
        core.finished("a", Some(vec![7]));
        core.dispatch(&mut comm);
        let run = comm.sent.pop().unwrap().pop().unwrap();
        assert_eq!(run.spec.key, "b");
        assert_eq!(run.inline, vec![("a".to_string(), ByteBuf::from(vec![7]))]);
        core.finished("b", None);
        core.dispatch(&mut comm);
        assert_eq!(comm.sent_keys(), ["c"]);
        core.finished("c", None);
        assert!(core.is_empty());
        assert_eq!(core.counts().finished, 3);
    }

    #[test]
    fn diamond_waits_for_both_inputs() {
        let mut core = with_worker(4);
        let mut comm = Recorder::default();
        core.submit(
            vec![
                spec("a", &[]),
                spec("b", &["a"]),
                spec("c", &["a"]),
                spec("d", &["b", "c"]),
            ],
            &mut comm,
        );
        core.dispatch(&mut comm);
        assert_eq!(comm.sent_keys(), ["a"]);
        core.finished("a", None);
        core.dispatch(&mut comm);
        let mut keys = comm.sent_keys();
        keys.sort();
        assert_eq!(keys, ["b", "c"]);
        core.finished("b", None);
        core.dispatch(&mut comm);
        assert!(comm.sent_keys().is_empty());
        core.finished("c", None);
        core.dispatch(&mut comm);
        assert_eq!(comm.sent_keys(), ["d"]);
        core.finished("d", None);
        assert!(core.is_empty());
    }

    #[test]
    fn errors_reach_every_dependent() {
        let mut core = with_worker(1);
        let mut comm = Recorder::default();
        core.submit(
            vec![spec("a", &[]), spec("b", &["a"]), spec("c", &["b"])],
            &mut comm,
        );
        core.dispatch(&mut comm);
        let error = TaskError::new(ErrorKind::User, "E", "boom").at("a", "t");
        core.erred("a", error.clone(), &mut comm);
        let mut stored = comm.stored.clone();
        stored.sort();
        assert_eq!(stored, ["b", "c"]);
        for (client, event) in &comm.notified {
            assert_eq!(client, "c");
            match event {
                Event::Erred { error: e, .. } => assert_eq!(e, &error),
                other => panic!("{other:?}"),
            }
        }
        assert!(core.is_empty());
    }

    #[test]
    fn unknown_inputs_are_looked_up() {
        let mut core = with_worker(1);
        let mut comm = Recorder::default();
        core.submit(vec![spec("b", &["old"]), spec("c", &["gone"])], &mut comm);
        assert_eq!(comm.lookups, ["old", "gone"]);
        core.dispatch(&mut comm);
        assert!(comm.sent.is_empty());
        core.lookup_answered("old", Lookup::Finished, &mut comm);
        core.lookup_answered("gone", Lookup::Missing, &mut comm);
        core.dispatch(&mut comm);
        assert_eq!(comm.sent_keys(), ["b"]);
        assert_eq!(comm.stored, ["c"]);
        match &comm.notified[0].1 {
            Event::Erred { error, .. } => assert_eq!(error.kind, ErrorKind::MissingDependency),
            other => panic!("{other:?}"),
        }
        core.finished("b", None);
        assert!(core.is_empty());
    }

    #[test]
    fn unknown_task_and_signature_mismatch_fail_fast() {
        let mut core = with_worker(1);
        let mut comm = Recorder::default();
        let mut unknown = spec("u", &[]);
        unknown.task = "nope".into();
        let mut mismatch = spec("m", &[]);
        mismatch.fingerprint = 2;
        core.submit(vec![unknown, mismatch], &mut comm);
        core.dispatch(&mut comm);
        assert!(comm.sent.is_empty());
        let kinds: Vec<_> = comm
            .notified
            .iter()
            .map(|(_, e)| match e {
                Event::Erred { error, .. } => error.kind,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [ErrorKind::UnknownTask, ErrorKind::SignatureMismatch]
        );
    }

    #[test]
    fn no_workers_means_tasks_wait() {
        let mut core = Core::new();
        let mut comm = Recorder::default();
        core.submit(vec![spec("a", &[])], &mut comm);
        core.dispatch(&mut comm);
        assert!(comm.sent.is_empty() && comm.notified.is_empty());
        core.worker_seen(
            WorkerInfo {
                id: "w".into(),
                name: "w".into(),
                slots: 1,
                tasks: vec![("t".into(), 1)],
            },
            Instant::now(),
        );
        core.dispatch(&mut comm);
        assert_eq!(comm.sent_keys(), ["a"]);
        core.expire_workers(Instant::now() + WORKER_TIMEOUT * 2);
        assert_eq!(core.counts().workers, 0);
    }

    #[test]
    fn priority_and_window_are_respected() {
        let mut core = with_worker(1);
        let mut comm = Recorder::default();
        let specs: Vec<_> = (0..IN_FLIGHT_PER_SLOT + 10)
            .map(|i| {
                let mut s = spec(&format!("t{i}"), &[]);
                s.priority = if i == IN_FLIGHT_PER_SLOT + 9 { 10 } else { 0 };
                s
            })
            .collect();
        core.submit(specs, &mut comm);
        core.dispatch(&mut comm);
        let first = comm.sent[0][0].spec.key.clone();
        assert_eq!(first, format!("t{}", IN_FLIGHT_PER_SLOT + 9));
        assert!(comm.sent.iter().all(|b| b.len() <= MAX_BUNDLE));
        let sent = comm.sent_keys();
        assert_eq!(sent.len(), IN_FLIGHT_PER_SLOT);
        assert_eq!(core.counts().ready, 10);
        core.finished(&sent[0], None);
        core.dispatch(&mut comm);
        assert_eq!(comm.sent_keys().len(), 1);
    }

    #[test]
    fn duplicate_completions_are_ignored() {
        let mut core = with_worker(1);
        let mut comm = Recorder::default();
        core.submit(vec![spec("a", &[]), spec("a", &[])], &mut comm);
        core.dispatch(&mut comm);
        assert_eq!(comm.sent_keys(), ["a"]);
        core.finished("a", None);
        core.finished("a", None);
        assert_eq!(core.counts().finished, 1);
        assert_eq!(core.counts().processing, 0);
    }
}
