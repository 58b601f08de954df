//! Unit tests of the core: every transition goes through [`Harness`], which
//! checks [`Core::check_invariants`] after it, and every effect goes to
//! [`Strict`], which fails the test on any effect the test did not consume.

use super::*;

mod random;

/// One call the core made on its [`Comm`].
#[derive(Debug, Clone, PartialEq)]
enum Effect {
    Sent(Option<String>, Vec<RunTask>),
    Notified(String, Event),
    Stored(String, TaskError),
    Lookup(String),
    Released(String, Vec<String>),
    Abandoned(String, Vec<String>),
    CancelRunning(Vec<String>),
    SpecForgotten(String),
}

/// A strict [`Comm`]: it records every effect, the test takes the ones it
/// expects (`take_*`, in the order they happened, per kind), and dropping
/// it with effects left over fails the test.
#[derive(Default)]
struct Strict {
    effects: Vec<Effect>,
}

impl Comm for Strict {
    fn send_tasks(&mut self, worker: Option<&str>, tasks: Vec<RunTask>) {
        assert!(!tasks.is_empty(), "an empty bundle was sent");
        self.effects
            .push(Effect::Sent(worker.map(str::to_owned), tasks));
    }
    fn notify(&mut self, client: &str, event: Event) {
        self.effects
            .push(Effect::Notified(client.to_owned(), event));
    }
    fn store_error(&mut self, key: &str, error: &TaskError) {
        self.effects
            .push(Effect::Stored(key.to_owned(), error.clone()));
    }
    fn lookup(&mut self, key: &str) {
        self.effects.push(Effect::Lookup(key.to_owned()));
    }
    fn release_inputs(&mut self, key: &str, deps: &[String]) {
        self.effects
            .push(Effect::Released(key.to_owned(), deps.to_vec()));
    }
    fn release_abandoned_inputs(&mut self, key: &str, deps: &[String]) {
        self.effects
            .push(Effect::Abandoned(key.to_owned(), deps.to_vec()));
    }
    fn cancel_running(&mut self, keys: &[String]) {
        self.effects.push(Effect::CancelRunning(keys.to_vec()));
    }
    fn forget_spec(&mut self, key: &str) {
        self.effects.push(Effect::SpecForgotten(key.to_owned()));
    }
}

impl Drop for Strict {
    fn drop(&mut self) {
        if !std::thread::panicking() && !self.effects.is_empty() {
            panic!(
                "effects the test did not expect: {:#?}",
                std::mem::take(&mut self.effects)
            );
        }
    }
}

impl Strict {
    /// Takes the effects `pick` selects, in order, leaving the others.
    fn take<T>(&mut self, mut pick: impl FnMut(&Effect) -> Option<T>) -> Vec<T> {
        let mut taken = Vec::new();
        self.effects.retain(|e| match pick(e) {
            Some(t) => {
                taken.push(t);
                false
            }
            None => true,
        });
        taken
    }

    fn take_bundles(&mut self) -> Vec<(Option<String>, Vec<RunTask>)> {
        self.take(|e| match e {
            Effect::Sent(target, tasks) => Some((target.clone(), tasks.clone())),
            _ => None,
        })
    }

    fn take_runs(&mut self) -> Vec<RunTask> {
        self.take_bundles()
            .into_iter()
            .flat_map(|(_, b)| b)
            .collect()
    }

    fn take_sent_keys(&mut self) -> Vec<String> {
        self.take_runs().into_iter().map(|r| r.spec.key).collect()
    }

    fn take_sent_to(&mut self) -> Vec<(Option<String>, String)> {
        self.take_bundles()
            .into_iter()
            .flat_map(|(target, bundle)| {
                bundle
                    .into_iter()
                    .map(move |r| (target.clone(), r.spec.key))
            })
            .collect()
    }

    fn take_notified(&mut self) -> Vec<(String, Event)> {
        self.take(|e| match e {
            Effect::Notified(c, ev) => Some((c.clone(), ev.clone())),
            _ => None,
        })
    }

    fn take_stored(&mut self) -> Vec<String> {
        self.take(|e| match e {
            Effect::Stored(k, _) => Some(k.clone()),
            _ => None,
        })
    }

    fn take_lookups(&mut self) -> Vec<String> {
        self.take(|e| match e {
            Effect::Lookup(k) => Some(k.clone()),
            _ => None,
        })
    }

    fn take_released(&mut self) -> Vec<(String, Vec<String>)> {
        self.take(|e| match e {
            Effect::Released(k, d) => Some((k.clone(), d.clone())),
            _ => None,
        })
    }

    fn take_abandoned(&mut self) -> Vec<(String, Vec<String>)> {
        self.take(|e| match e {
            Effect::Abandoned(k, d) => Some((k.clone(), d.clone())),
            _ => None,
        })
    }

    fn take_cancelled(&mut self) -> Vec<String> {
        self.take(|e| match e {
            Effect::CancelRunning(keys) => Some(keys.clone()),
            _ => None,
        })
        .concat()
    }

    fn take_specs_forgotten(&mut self) -> Vec<String> {
        self.take(|e| match e {
            Effect::SpecForgotten(k) => Some(k.clone()),
            _ => None,
        })
    }

    /// Asserts the core did nothing visible since the last take.
    fn expect_none(&self) {
        assert!(
            self.effects.is_empty(),
            "unexpected effects: {:#?}",
            self.effects
        );
    }
}

/// The core and its strict [`Comm`]: every transition is forwarded to the
/// core, then the core's invariants are checked.
struct Harness {
    core: Core,
    comm: Strict,
    /// Prints every transition (for replaying a failing seed).
    trace: bool,
}

impl Harness {
    /// A core that knows task name `t` as a long one (each of its tasks
    /// is sent alone, at once): the tests that are not about bundling
    /// see every ready task go out. Other names start unknown.
    fn new() -> Self {
        let mut core = Core::new();
        core.durations.learn("t", Duration::from_secs(1));
        Harness {
            core,
            comm: Strict::default(),
            trace: std::env::var_os("CORE_TRACE").is_some(),
        }
    }

    fn with_worker(slots: u32) -> Self {
        let mut h = Harness::new();
        h.worker_seen(worker("w1", slots, &[]), Instant::now());
        h
    }

    #[track_caller]
    fn check(&self) {
        if let Err(broken) = self.core.check_invariants() {
            panic!("invariant broken: {broken}\n{:#?}", self.core);
        }
    }

    #[track_caller]
    fn recover(&mut self, specs: Vec<TaskSpec>) -> usize {
        if self.trace {
            let specs: Vec<_> = specs.iter().map(|s| (&s.key, &s.deps)).collect();
            eprintln!("recover {specs:?}");
        }
        let n = self.core.recover(specs, &mut self.comm);
        self.check();
        n
    }
    #[track_caller]
    fn submit(&mut self, specs: Vec<TaskSpec>) {
        if self.trace {
            let specs: Vec<_> = specs.iter().map(|s| (&s.key, &s.client, &s.deps)).collect();
            eprintln!("submit {specs:?}");
        }
        self.core.submit(specs, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn dispatch(&mut self) {
        if self.trace {
            eprintln!("dispatch");
        }
        self.core.dispatch(&mut self.comm);
        self.check();
    }
    #[track_caller]
    fn finished(&mut self, key: &str, inline: Option<Vec<u8>>, size: u64) {
        if self.trace {
            eprintln!("finished {:?} {:?} {:?}", key, inline, size);
        }
        self.core.finished(key, inline, size, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn finished_in(&mut self, key: &str, inline: Option<Vec<u8>>, size: u64, run: Duration) {
        if self.trace {
            eprintln!("finished_in {:?} {:?} {:?} {:?}", key, inline, size, run);
        }
        self.core
            .finished_in(key, inline, size, run, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn erred(&mut self, key: &str, error: TaskError, retrying: bool) {
        if self.trace {
            eprintln!("erred {:?} {:?} {:?}", key, error, retrying);
        }
        self.core.erred(key, error, retrying, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn lookup_answered(&mut self, key: &str, found: Lookup) {
        if self.trace {
            eprintln!("lookup_answered {:?} {:?}", key, found);
        }
        self.core.lookup_answered(key, found, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn abandon(&mut self, keys: &[String]) {
        if self.trace {
            eprintln!("abandon {:?}", keys);
        }
        self.core.abandon(keys, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn forget(&mut self, keys: &[String]) {
        if self.trace {
            eprintln!("forget {:?}", keys);
        }
        self.core.forget(keys, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn watch(&mut self, client: &str, keys: &[String]) {
        if self.trace {
            eprintln!("watch {:?} {:?}", client, keys);
        }
        self.core.watch(client, keys, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn cancel(&mut self, keys: &[String], force: bool) {
        if self.trace {
            eprintln!("cancel {:?} {:?}", keys, force);
        }
        self.core.cancel(keys, force, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn retry(&mut self, keys: &[String]) {
        if self.trace {
            eprintln!("retry {:?}", keys);
        }
        self.core.retry(keys, &mut self.comm);
        self.check();
    }
    #[track_caller]
    fn worker_seen(&mut self, info: WorkerInfo, now: Instant) {
        if self.trace {
            eprintln!("worker_seen {:?} {:?}", info, now);
        }
        self.core.worker_seen(info, now);
        self.check();
    }
    #[track_caller]
    fn requeue(&mut self, keys: &[String]) {
        if self.trace {
            eprintln!("requeue {:?}", keys);
        }
        self.core.requeue(keys);
        self.check();
    }
    #[track_caller]
    fn worker_gone(&mut self, id: &str) {
        if self.trace {
            eprintln!("worker_gone {:?}", id);
        }
        self.core.worker_gone(id);
        self.check();
    }
    #[track_caller]
    fn wake(&mut self, now_ms: u64) {
        if self.trace {
            eprintln!("wake {:?}", now_ms);
        }
        self.core.wake(now_ms);
        self.check();
    }
    #[track_caller]
    fn tick(&mut self) {
        if self.trace {
            eprintln!("tick");
        }
        self.core.tick(&mut self.comm);
        self.check();
    }
    #[track_caller]
    fn expire_workers(&mut self, now: Instant) {
        if self.trace {
            eprintln!("expire_workers {:?}", now);
        }
        self.core.expire_workers(now);
        self.check();
    }
}

fn spec(key: &str, deps: &[&str]) -> TaskSpec {
    TaskSpec::new(
        key.into(),
        "t".into(),
        1,
        vec![],
        deps.iter().map(|d| d.to_string()).collect(),
        "c".into(),
    )
}

fn worker(id: &str, slots: u32, resources: &[(&str, u64)]) -> WorkerInfo {
    WorkerInfo {
        id: id.into(),
        name: format!("name-{id}"),
        slots,
        tasks: vec![("t".into(), 1), ("fresh".into(), 1)],
        resources: resources.iter().map(|(n, a)| (n.to_string(), *a)).collect(),
        rss_bytes: None,
        cpu_ms: None,
    }
}

/// A spec of task name `name`.
fn named(key: &str, name: &str) -> TaskSpec {
    let mut spec = spec(key, &[]);
    spec.task = name.into();
    spec
}

fn keys(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// The keys and error kinds of `Erred` events, per client.
fn erred_events(events: &[(String, Event)]) -> Vec<(String, String, ErrorKind)> {
    events
        .iter()
        .map(|(client, event)| match event {
            Event::Erred { key, error, .. } => (client.clone(), key.clone(), error.kind()),
            other => panic!("expected an error event, got {other:?}"),
        })
        .collect()
}

#[test]
fn chain_runs_in_order_and_leaves_nothing() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("a", &[]), spec("b", &["a"]), spec("c", &["b"])]);
    h.comm.expect_none();
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    h.finished("a", Some(vec![7]), 0);
    h.comm.expect_none();
    h.dispatch();
    let runs = h.comm.take_runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].spec.key, "b");
    assert_eq!(
        runs[0].inline,
        vec![("a".to_string(), ByteBuf::from(vec![7]))]
    );
    h.finished("b", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["c"]);
    h.finished("c", None, 0);
    h.comm.expect_none();
    assert!(h.core.is_empty());
    assert_eq!(h.core.counts().finished, 3);
}

#[test]
fn a_late_submission_of_a_recovered_task_that_already_ran_does_not_run_it_again() {
    let mut h = Harness::with_worker(1);
    assert_eq!(h.recover(vec![spec("a", &[]), spec("b", &["a"])]), 2);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    h.finished("a", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
    h.finished("b", None, 0);
    assert!(h.core.is_empty());
    // The submissions that were still queued when the scheduler
    // restarted arrive now: nothing runs again.
    h.submit(vec![spec("a", &[]), spec("b", &["a"])]);
    h.dispatch();
    assert_eq!(
        h.comm.take_lookups(),
        ["a", "b"],
        "their client hears from Redis"
    );
    h.comm.expect_none();
    h.lookup_answered("a", Lookup::Finished);
    h.lookup_answered("b", Lookup::Finished);
    assert_eq!(
        h.comm.take_notified(),
        [
            (
                "c".to_string(),
                Event::Finished {
                    key: "a".into(),
                    inline: None,
                    size: 0,
                    run_us: 0
                }
            ),
            (
                "c".to_string(),
                Event::Finished {
                    key: "b".into(),
                    inline: None,
                    size: 0,
                    run_us: 0
                }
            ),
        ]
    );
    assert!(h.core.is_empty());
    // A later, genuine resubmission of the same key runs.
    h.submit(vec![spec("a", &[])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
}

#[test]
fn a_task_whose_custody_lapsed_is_handed_out_again_once() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("long", &[]), spec("after", &["long"])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["long"]);
    // Its worker died after acknowledging it: it runs again.
    h.requeue(&keys(&["long", "unknown"]));
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["long"]);
    h.finished("long", None, 0);
    // A stale lapse of a finished task changes nothing.
    h.requeue(&keys(&["long"]));
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["after"]);
    h.finished("after", None, 0);
    h.comm.expect_none();
    assert!(h.core.is_empty());
}

#[test]
fn diamond_waits_for_both_inputs() {
    let mut h = Harness::with_worker(4);
    h.submit(vec![
        spec("a", &[]),
        spec("b", &["a"]),
        spec("c", &["a"]),
        spec("d", &["b", "c"]),
    ]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    h.finished("a", None, 0);
    h.dispatch();
    let mut sent = h.comm.take_sent_keys();
    sent.sort();
    assert_eq!(sent, ["b", "c"]);
    h.finished("b", None, 0);
    h.dispatch();
    h.comm.expect_none();
    h.finished("c", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["d"]);
    h.finished("d", None, 0);
    h.comm.expect_none();
    assert!(h.core.is_empty());
}

#[test]
fn errors_reach_every_dependent() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("a", &[]), spec("b", &["a"]), spec("c", &["b"])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    let error = TaskError::new(ErrorKind::User, "E", "boom").at("a", "t");
    h.erred("a", error.clone(), false);
    let mut stored = h.comm.take_stored();
    stored.sort();
    assert_eq!(stored, ["b", "c"], "the worker stored `a`'s error itself");
    let mut told: Vec<String> = h
        .comm
        .take_notified()
        .into_iter()
        .map(|(client, event)| {
            assert_eq!(client, "c");
            match event {
                Event::Erred { key, error: e, .. } => {
                    assert_eq!(e, error);
                    key
                }
                other => panic!("{other:?}"),
            }
        })
        .collect();
    told.sort();
    assert_eq!(told, ["b", "c"], "the worker told `a`'s client itself");
    // Erred tasks stay (for retry) until their holders let go.
    assert_eq!(h.core.len(), 3);
    h.forget(&keys(&["c", "b", "a"]));
    assert!(h.core.is_empty());
    assert_eq!(
        h.comm.take_released(),
        [
            ("c".to_string(), keys(&["b"])),
            ("b".to_string(), keys(&["a"]))
        ],
        "b and c release their inputs"
    );
    assert_eq!(h.comm.take_specs_forgotten(), ["c", "b", "a"]);
}

#[test]
fn unknown_inputs_are_looked_up() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("b", &["old"]), spec("c", &["gone"])]);
    assert_eq!(h.comm.take_lookups(), ["old", "gone"]);
    h.dispatch();
    h.comm.expect_none();
    h.lookup_answered("old", Lookup::Finished);
    h.lookup_answered("gone", Lookup::Missing);
    h.comm.expect_none(); // a missing input gets a grace period first
    for _ in 0..ORPHAN_TICKS {
        h.tick();
    }
    assert_eq!(h.comm.take_lookups(), ["gone"], "its last lookup");
    h.lookup_answered("gone", Lookup::Missing);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
    assert_eq!(h.comm.take_stored(), ["c"]);
    assert_eq!(
        erred_events(&h.comm.take_notified()),
        [(
            "c".to_string(),
            "c".to_string(),
            ErrorKind::MissingDependency
        )]
    );
    h.finished("b", None, 0);
    h.forget(&keys(&["c"]));
    assert_eq!(h.comm.take_specs_forgotten(), ["c"]);
    assert_eq!(h.comm.take_released(), [("c".to_string(), keys(&["gone"]))]);
    assert!(h.core.is_empty());
}

#[test]
fn unknown_task_and_signature_mismatch_fail_fast() {
    let mut h = Harness::with_worker(1);
    let mut unknown = spec("u", &[]);
    unknown.task = "nope".into();
    let mut mismatch = spec("m", &[]);
    mismatch.fingerprint = 2;
    h.submit(vec![unknown, mismatch]);
    h.dispatch();
    assert_eq!(h.comm.take_stored(), ["u", "m"]);
    assert_eq!(
        erred_events(&h.comm.take_notified()),
        [
            ("c".to_string(), "u".to_string(), ErrorKind::UnknownTask),
            (
                "c".to_string(),
                "m".to_string(),
                ErrorKind::SignatureMismatch
            )
        ]
    );
    h.comm.expect_none();
}

#[test]
fn no_workers_means_tasks_wait() {
    let mut h = Harness::new();
    h.submit(vec![spec("a", &[])]);
    h.dispatch();
    h.comm.expect_none();
    h.worker_seen(worker("w", 1, &[]), Instant::now());
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    h.expire_workers(Instant::now() + WORKER_TIMEOUT * 2);
    assert_eq!(h.core.counts().workers, 0);
    h.comm.expect_none();
}

#[test]
fn priority_and_window_are_respected() {
    let mut h = Harness::with_worker(1);
    let specs: Vec<_> = (0..IN_FLIGHT_PER_SLOT + 10)
        .map(|i| {
            let mut s = spec(&format!("t{i}"), &[]);
            s.priority = if i == IN_FLIGHT_PER_SLOT + 9 { 10 } else { 0 };
            s
        })
        .collect();
    h.submit(specs);
    h.dispatch();
    let bundles = h.comm.take_bundles();
    assert_eq!(
        bundles[0].1[0].spec.key,
        format!("t{}", IN_FLIGHT_PER_SLOT + 9)
    );
    assert!(bundles
        .iter()
        .all(|(target, b)| target.is_none() && b.len() <= MAX_BUNDLE));
    let sent: Vec<String> = bundles
        .into_iter()
        .flat_map(|(_, b)| b)
        .map(|r| r.spec.key)
        .collect();
    assert_eq!(sent.len(), IN_FLIGHT_PER_SLOT);
    assert_eq!(h.core.counts().ready, 10);
    h.finished(&sent[0], None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys().len(), 1);
}

#[test]
fn duplicate_completions_are_ignored() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("a", &[]), spec("a", &[])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    h.finished("a", None, 0);
    h.finished("a", None, 0);
    h.comm.expect_none();
    assert_eq!(h.core.counts().finished, 1);
    assert!(h.core.is_empty());
    assert_eq!(h.core.counts().processing, 0);
}

#[test]
fn forgetting_pending_tasks_cancels_them_and_releases_inputs() {
    let mut h = Harness::new();
    h.submit(vec![spec("a", &[]), spec("b", &["a"])]);
    h.forget(&keys(&["b"]));
    assert_eq!(h.comm.take_released(), [("b".to_string(), keys(&["a"]))]);
    assert_eq!(h.comm.take_specs_forgotten(), ["b"]);
    h.forget(&keys(&["a"]));
    assert_eq!(h.comm.take_specs_forgotten(), ["a"]);
    assert!(h.core.is_empty());
    assert_eq!(h.core.counts().cancelled, 2);
    h.worker_seen(worker("w", 1, &[]), Instant::now());
    h.dispatch();
    h.comm.expect_none(); // forgotten tasks never run
}

#[test]
fn a_departed_clients_work_is_cancelled_running_or_not() {
    // `a` and `b` are sent to the worker (processing), `c` waits for `b`.
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("a", &[]), spec("b", &[]), spec("c", &["b"])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), vec!["a", "b"]);
    assert_eq!(h.core.counts().processing, 2);
    // The client's lease lapsed: `a` and `c` lost their last holder
    // (`b` is still held by `c`).
    h.abandon(&keys(&["a", "c"]));
    assert_eq!(
        h.comm.take_cancelled(),
        vec!["a"],
        "the running task is stopped"
    );
    assert_eq!(
        h.comm.take_abandoned(),
        vec![("c".to_string(), vec!["b".to_string()])],
        "the waiting task's inputs are released as abandoned too"
    );
    assert_eq!(h.comm.take_specs_forgotten(), vec!["a", "c"]);
    h.comm.expect_none(); // nothing released as plain inputs
    assert_eq!(h.core.counts().cancelled, 2);
    assert_eq!(h.core.counts().processing, 1);
    // Then its input, once released.
    h.abandon(&keys(&["b"]));
    assert_eq!(h.comm.take_cancelled(), vec!["b"]);
    assert_eq!(h.comm.take_specs_forgotten(), vec!["b"]);
    assert!(h.core.is_empty());
    assert_eq!(h.core.counts().processing, 0);
    assert_eq!(h.core.counts().cancelled, 3);
    // Late reports of the stopped tasks are ignored.
    h.finished("a", None, 0);
    h.erred("b", cancelled_error("b", "t"), false);
    assert!(h.core.is_empty());
    h.comm.expect_none(); // nobody is left to tell
                          // A finished key that nobody holds any more is not "cancelled".
    h.submit(vec![spec("e", &[])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["e"]);
    h.finished("e", None, 0);
    h.abandon(&keys(&["e"]));
    h.comm.expect_none();
    assert_eq!(h.core.counts().cancelled, 3);
}

#[test]
fn a_running_task_that_is_forgotten_leaves_when_it_reports() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("a", &[])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    h.forget(&keys(&["a"]));
    h.comm.expect_none();
    assert_eq!(h.core.len(), 1);
    h.finished("a", None, 0);
    h.comm.expect_none();
    assert!(h.core.is_empty());
    assert_eq!(h.core.counts().processing, 0);
}

#[test]
fn watchers_hear_about_pending_done_and_unknown_keys() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("a", &[])]);
    h.watch("other", &keys(&["a", "elsewhere"]));
    assert_eq!(h.comm.take_lookups(), ["elsewhere"]);
    // Another client submitting the same key becomes a watcher too.
    let mut again = spec("a", &[]);
    again.client = "third".into();
    h.submit(vec![again]);
    h.dispatch();
    assert_eq!(
        h.comm.take_sent_keys(),
        ["a"],
        "one run serves every client"
    );
    h.finished("a", Some(vec![1]), 1);
    let finished = Event::Finished {
        key: "a".into(),
        inline: Some(vec![1]),
        size: 1,
        run_us: 0,
    };
    assert_eq!(
        h.comm.take_notified(),
        [
            ("other".to_string(), finished.clone()),
            ("third".to_string(), finished)
        ]
    );
    h.lookup_answered("elsewhere", Lookup::Missing);
    h.comm.expect_none();
    for _ in 0..ORPHAN_TICKS {
        h.tick();
    }
    assert_eq!(h.comm.take_lookups(), ["elsewhere"]);
    h.lookup_answered("elsewhere", Lookup::Missing);
    assert_eq!(
        erred_events(&h.comm.take_notified()),
        [(
            "other".to_string(),
            "elsewhere".to_string(),
            ErrorKind::MissingDependency
        )]
    );
}

#[test]
fn cancel_fails_pending_tasks_and_dependents_and_stops_running_ones() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![
        spec("run", &[]),
        spec("a", &["run"]),
        spec("b", &["a"]),
    ]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["run"]);
    h.cancel(&keys(&["run"]), true);
    assert_eq!(h.comm.take_cancelled(), ["run"]);
    assert_eq!(h.comm.take_stored(), ["run", "a", "b"]);
    assert_eq!(
        erred_events(&h.comm.take_notified()),
        [
            ("c".to_string(), "run".to_string(), ErrorKind::Cancelled),
            ("c".to_string(), "a".to_string(), ErrorKind::Cancelled),
            ("c".to_string(), "b".to_string(), ErrorKind::Cancelled),
        ]
    );
    assert_eq!(h.core.counts().cancelled, 3);
    assert_eq!(h.core.counts().processing, 0);
    h.finished("run", None, 0); // the worker reports late: ignored
    h.comm.expect_none();
    assert_eq!(h.core.counts().finished, 0);
}

#[test]
fn retries_rerun_before_failing_and_retry_reruns_failed_tasks() {
    let mut h = Harness::with_worker(1);
    let mut flaky = spec("f", &[]);
    flaky.retries = 1;
    h.submit(vec![flaky, spec("d", &["f"])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["f"]);
    let error = TaskError::new(ErrorKind::User, "E", "boom");
    h.erred("f", error.clone(), true);
    h.comm.expect_none();
    h.dispatch();
    let again = h.comm.take_runs();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].spec.key.as_str(), again[0].attempt), ("f", 1));
    h.erred("f", error.clone(), false);
    assert_eq!(h.core.counts().erred, 2, "f and its dependent d");
    assert_eq!(h.comm.take_stored(), ["d"]);
    assert_eq!(
        erred_events(&h.comm.take_notified()),
        [("c".to_string(), "d".to_string(), ErrorKind::User)]
    );
    h.retry(&keys(&["d"]));
    h.comm.expect_none();
    h.dispatch();
    assert_eq!(
        h.comm.take_sent_keys(),
        ["f"],
        "retrying d reruns its failed input first"
    );
    h.finished("f", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["d"]);
}

/// A task retried after `delay_ms`, doubling, on a core whose clock reads
/// `now`.
fn delayed(key: &str, retries: u32, delay_ms: u64) -> TaskSpec {
    let mut spec = spec(key, &[]);
    spec.retries = retries;
    spec.retry = flotilla_proto::RetryPolicy {
        delay_ms,
        backoff: 2.0,
        max_delay_ms: 3 * delay_ms,
        ..flotilla_proto::RetryPolicy::default()
    };
    spec
}

#[test]
fn a_delayed_retry_waits_for_its_time_then_runs() {
    let mut h = Harness::with_worker(1);
    let now = 1_000_000;
    h.wake(now);
    h.submit(vec![delayed("f", 3, 100)]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["f"]);
    let error = TaskError::new(ErrorKind::User, "E", "boom");
    h.erred("f", error.clone(), true);
    assert_eq!(h.core.next_due(), Some(now + 100));
    h.dispatch();
    h.comm.expect_none();
    h.wake(now + 99);
    h.dispatch();
    h.comm.expect_none();
    h.wake(now + 100);
    h.dispatch();
    let again = h.comm.take_runs();
    assert_eq!((again[0].spec.key.as_str(), again[0].attempt), ("f", 1));
    // The second retry waits twice as long, from its failure.
    h.wake(now + 150);
    h.erred("f", error.clone(), true);
    h.wake(now + 150 + 199);
    h.dispatch();
    h.comm.expect_none();
    h.wake(now + 150 + 200);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["f"]);
    // The third waits 400 ms, capped at 300.
    h.erred("f", error.clone(), true);
    assert_eq!(h.core.next_due(), Some(now + 350 + 300));
    h.wake(now + 650);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["f"]);
    h.finished("f", None, 0);
    assert!(h.core.is_empty());
}

#[test]
fn a_task_cancelled_while_it_waits_to_retry_stays_cancelled() {
    let mut h = Harness::with_worker(1);
    h.wake(5_000);
    h.submit(vec![delayed("f", 1, 1_000), spec("d", &["f"])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["f"]);
    h.erred("f", TaskError::new(ErrorKind::User, "E", "boom"), true);
    h.cancel(&keys(&["f"]), false);
    assert_eq!(h.comm.take_stored(), ["f", "d"]);
    assert_eq!(erred_events(&h.comm.take_notified()).len(), 2);
    h.comm.take_released();
    h.comm.take_specs_forgotten();
    h.wake(10_000);
    h.dispatch();
    h.comm.expect_none();
}

#[test]
fn a_task_does_not_start_before_its_time_even_with_its_inputs_done() {
    let mut h = Harness::with_worker(2);
    let now = 2_000_000;
    h.wake(now);
    let mut later = spec("later", &["a"]);
    later.start_at_ms = now + 1_000;
    let mut past = spec("past", &[]);
    past.start_at_ms = now - 1;
    h.submit(vec![spec("a", &[]), later, past]);
    h.dispatch();
    // A start time in the past is no wait at all.
    let mut sent = h.comm.take_sent_keys();
    sent.sort();
    assert_eq!(sent, ["a", "past"]);
    h.finished("past", None, 0);
    h.finished("a", None, 0);
    h.dispatch();
    h.comm.expect_none();
    assert_eq!(h.core.next_due(), Some(now + 1_000));
    h.wake(now + 999);
    h.dispatch();
    h.comm.expect_none();
    h.wake(now + 1_000);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["later"]);
}

#[test]
fn inputs_still_gate_a_task_whose_time_came() {
    let mut h = Harness::with_worker(1);
    h.wake(1_000);
    let mut later = spec("later", &["a"]);
    later.start_at_ms = 1_500;
    h.submit(vec![spec("a", &[]), later]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    h.wake(2_000);
    h.dispatch();
    h.comm.expect_none();
    h.finished("a", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["later"]);
}

#[test]
fn a_dependent_with_a_start_time_is_not_chained_behind_its_input() {
    let mut h = chaining();
    h.wake(1_000);
    let mut dependent = short("b", &["a"]);
    dependent.start_at_ms = 60_000;
    // Without a start time, `d` would follow `c` in its delivery.
    h.submit(vec![
        short("a", &[]),
        dependent,
        short("c", &[]),
        short("d", &["c"]),
    ]);
    h.dispatch();
    let mut sent: Vec<Vec<String>> = h
        .comm
        .take_bundles()
        .into_iter()
        .map(|(_, tasks)| tasks.into_iter().map(|r| r.spec.key).collect())
        .collect();
    sent.sort();
    assert_eq!(sent, [vec!["a"], vec!["c", "d"]], "b is not in a's chain");
    for key in ["a", "c", "d"] {
        h.finished_in(key, None, 0, Duration::from_micros(50));
    }
    h.dispatch();
    h.comm.expect_none();
    h.wake(60_000);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
}

#[test]
fn a_recovered_task_keeps_its_start_time_and_a_pending_retry_runs() {
    let mut h = Harness::with_worker(2);
    h.wake(10_000);
    let mut timed = spec("timed", &[]);
    timed.start_at_ms = 12_000;
    // It was waiting out a retry delay on the scheduler that went away:
    // its spec carries the policy, not the wait.
    let retrying = delayed("retrying", 2, 5_000);
    assert_eq!(h.recover(vec![timed, retrying]), 2);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["retrying"]);
    h.erred(
        "retrying",
        TaskError::new(ErrorKind::Panic, "panic", "boom"),
        true,
    );
    assert_eq!(
        h.core.next_due(),
        Some(12_000),
        "its start time comes first"
    );
    h.wake(12_000);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["timed"]);
    h.wake(15_000);
    h.dispatch();
    assert_eq!(
        h.comm.take_sent_keys(),
        ["retrying"],
        "the policy came with the spec"
    );
}

#[test]
fn a_failure_reported_without_retrying_fails_at_once_with_retries_left() {
    // The worker judges the policy's filter: an error outside it is
    // reported as not retrying, and nothing waits.
    let mut h = Harness::with_worker(1);
    h.wake(1_000);
    h.submit(vec![delayed("f", 3, 100)]);
    h.dispatch();
    h.comm.take_sent_keys();
    h.erred(
        "f",
        TaskError::new(ErrorKind::User, "E", "not retried"),
        false,
    );
    assert_eq!(h.core.next_due(), None);
    assert_eq!(h.core.counts().erred, 1);
    h.comm.expect_none();
}

#[test]
fn placement_follows_workers_and_resources() {
    let mut h = Harness::new();
    h.worker_seen(worker("cpu", 1, &[]), Instant::now());
    h.worker_seen(worker("gpu", 1, &[("GPU", 1)]), Instant::now());
    let mut pinned = spec("pinned", &[]);
    pinned.workers = vec!["name-cpu".into()];
    let mut needs_gpu = spec("gpu-task", &[]);
    needs_gpu.resources = vec![("GPU".into(), 1)];
    let mut needs_two = spec("two-gpus", &[]);
    needs_two.resources = vec![("GPU".into(), 2)];
    let mut elsewhere = spec("elsewhere", &[]);
    elsewhere.workers = vec!["gone".into()];
    elsewhere.allow_other_workers = true;
    h.submit(vec![
        pinned,
        needs_gpu,
        needs_two,
        elsewhere,
        spec("free", &[]),
    ]);
    h.dispatch();
    let mut placed = h.comm.take_sent_to();
    placed.sort();
    assert_eq!(
        placed,
        [
            (None, "elsewhere".to_string()),
            (None, "free".to_string()),
            (Some("cpu".to_string()), "pinned".to_string()),
            (Some("gpu".to_string()), "gpu-task".to_string()),
        ]
    );
    assert_eq!(h.core.counts().parked, 1, "no worker has two GPUs yet");
    h.worker_seen(worker("big", 1, &[("GPU", 2)]), Instant::now());
    h.dispatch();
    assert_eq!(
        h.comm.take_sent_to(),
        [(Some("big".to_string()), "two-gpus".to_string())]
    );
    // A pinned task whose worker dies is sent again.
    h.worker_gone("big");
    h.dispatch();
    h.comm.expect_none();
    assert_eq!(h.core.counts().parked, 1);
}

#[test]
fn a_watch_that_overtakes_the_submission_waits_for_it() {
    let mut h = Harness::with_worker(1);
    h.watch("other", &keys(&["late", "never"]));
    assert_eq!(h.comm.take_lookups(), ["late", "never"]);
    h.lookup_answered("late", Lookup::Missing);
    h.lookup_answered("never", Lookup::Missing);
    h.comm.expect_none(); // not lost yet: the submission may be on its way
    h.submit(vec![spec("late", &[])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["late"]);
    h.finished("late", None, 0);
    assert_eq!(
        h.comm.take_notified(),
        [(
            "other".to_string(),
            Event::Finished {
                key: "late".into(),
                inline: None,
                size: 0,
                run_us: 0
            }
        )]
    );
    for _ in 0..ORPHAN_TICKS {
        h.tick();
    }
    assert_eq!(h.comm.take_lookups(), ["never"], "its last lookup");
    h.lookup_answered("never", Lookup::Missing);
    assert_eq!(
        erred_events(&h.comm.take_notified()),
        [(
            "other".to_string(),
            "never".to_string(),
            ErrorKind::MissingDependency
        )]
    );
}

#[test]
fn a_dependent_whose_input_arrives_late_waits_for_it() {
    let mut h = Harness::with_worker(1);
    let mut dependent = spec("d", &["late"]);
    dependent.client = "b".into();
    h.submit(vec![dependent]);
    assert_eq!(h.comm.take_lookups(), ["late"]);
    h.lookup_answered("late", Lookup::Missing);
    // The input's submission, from another client, arrives now.
    let mut input = spec("late", &[]);
    input.client = "a".into();
    h.submit(vec![input]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["late"]);
    h.finished("late", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["d"]);
    h.comm.expect_none(); // no notification, no stored error
}

#[test]
fn the_strict_comm_fails_on_effects_nobody_expected() {
    let outcome = std::panic::catch_unwind(|| {
        let mut h = Harness::with_worker(1);
        h.submit(vec![spec("a", &[])]);
        h.dispatch(); // sends `a`, which this test never takes
    });
    assert!(outcome.is_err());
}

#[test]
fn a_cancelled_waiting_task_that_is_retried_still_waits_for_every_input() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("t", &[]), spec("u", &[]), spec("d", &["t", "u"])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["t", "u"]);
    h.cancel(&keys(&["d"]), false);
    assert_eq!(h.comm.take_stored(), ["d"]);
    assert_eq!(h.comm.take_notified().len(), 1);
    // Its inputs still list the cancelled run: the retried one must not be
    // listed twice, or `t` would count for both inputs.
    h.retry(&keys(&["d"]));
    h.finished("t", None, 0);
    h.dispatch();
    h.comm.expect_none(); // `d` still waits for `u`
    h.finished("u", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["d"]);
}

#[test]
fn a_submission_that_overtakes_its_lookups_answer_serves_the_dependents() {
    let mut h = Harness::with_worker(1);
    let mut dependent = spec("d", &["late"]);
    dependent.client = "b".into();
    h.submit(vec![dependent]);
    assert_eq!(h.comm.take_lookups(), ["late"]);
    // The input's submission arrives before Redis answers.
    let mut input = spec("late", &[]);
    input.client = "a".into();
    h.submit(vec![input]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["late"]);
    // Redis had nothing yet: `d` must not be failed (after the grace) for
    // an input that runs, nor a later `Finished` answer replace the entry.
    h.lookup_answered("late", Lookup::Missing);
    for _ in 0..ORPHAN_TICKS {
        h.tick();
    }
    h.finished("late", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["d"]);
    h.comm.expect_none();
}

#[test]
fn a_lookup_answer_for_a_cancelled_dependent_holds_nothing() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("d", &["old"])]);
    assert_eq!(h.comm.take_lookups(), ["old"]);
    h.cancel(&keys(&["d"]), false);
    assert_eq!(h.comm.take_stored(), ["d"]);
    assert_eq!(h.comm.take_notified().len(), 1);
    h.lookup_answered("old", Lookup::Finished);
    h.forget(&keys(&["d"]));
    assert_eq!(h.comm.take_specs_forgotten(), ["d"]);
    assert_eq!(h.comm.take_released(), [("d".to_string(), keys(&["old"]))]);
    assert!(h.core.is_empty(), "`old` is held by nobody");
}

#[test]
fn an_earlier_runs_report_for_a_retried_ready_task_lets_go_of_its_inputs() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![
        spec("a", &[]),
        spec("x", &[]),
        spec("b", &["a"]),
        spec("c", &["a", "x"]),
    ]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a", "x"]);
    h.finished("a", Some(vec![1]), 1);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
    h.cancel(&keys(&["b"]), false);
    assert_eq!(h.comm.take_stored(), ["b"]);
    assert_eq!(h.comm.take_notified().len(), 1);
    h.retry(&keys(&["b"])); // ready again, holding `a` again
                            // The cancelled run was not stopped and reports: `b` is done, and its
                            // hold on `a` goes (only `c` holds it now).
    h.finished("b", None, 0);
    assert_eq!(h.core.tasks["a"].holders, 1);
    h.finished("x", None, 0);
    h.dispatch();
    let runs = h.comm.take_runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].spec.key, "c");
    assert_eq!(runs[0].inline, [("a".to_string(), ByteBuf::from(vec![1]))]);
    h.finished("c", None, 0);
    assert!(h.core.is_empty());
}

#[test]
fn an_earlier_runs_retrying_report_does_not_start_a_waiting_task() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("a", &[]), spec("b", &["a"])]);
    h.dispatch();
    h.finished("a", None, 0);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a", "b"]);
    h.cancel(&keys(&["b"]), false);
    assert_eq!(h.comm.take_stored(), ["b"]);
    assert_eq!(h.comm.take_notified().len(), 1);
    h.retry(&keys(&["b"]));
    assert_eq!(h.comm.take_lookups(), ["a"], "`a` left the table");
    // The cancelled run fails and will be retried: `b` still waits.
    h.erred("b", TaskError::new(ErrorKind::User, "E", "boom"), true);
    h.dispatch();
    h.comm.expect_none();
    h.lookup_answered("a", Lookup::Finished);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
}

#[test]
fn an_unknown_name_sends_one_probe_per_slot_and_holds_the_rest_until_one_finishes() {
    let mut h = Harness::with_worker(2);
    h.submit((0..40).map(|i| named(&format!("f{i}"), "fresh")).collect());
    h.dispatch();
    let probes = h.comm.take_bundles();
    assert_eq!(probes.len(), 2, "one probe per slot");
    assert!(probes.iter().all(|(_, tasks)| tasks.len() == 1), "alone");
    assert_eq!(h.core.counts().ready, 38, "held tasks still count as ready");
    h.dispatch();
    h.comm.expect_none();
    // A probe that fails teaches nothing: one more probe goes out.
    let first = probes[0].1[0].spec.key.clone();
    h.erred(&first, TaskError::new(ErrorKind::User, "E", "boom"), false);
    h.comm.take_notified();
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys().len(), 1);
    // A probe that finishes in 100 µs: the rest go out, bundled.
    let second = probes[1].1[0].spec.key.clone();
    h.finished_in(&second, None, 0, Duration::from_micros(100));
    h.dispatch();
    let bundles = h.comm.take_bundles();
    let sent: usize = bundles.iter().map(|(_, tasks)| tasks.len()).sum();
    assert_eq!(sent, 37);
    assert!(
        bundles.len() < 37,
        "short tasks share deliveries: {bundles:?}"
    );
    assert_eq!(h.core.counts().ready, 0);
}

#[test]
fn short_tasks_are_bundled_up_to_the_budget_and_long_ones_go_alone() {
    let mut h = Harness::with_worker(1);
    h.core.durations.learn("fresh", BUNDLE_BUDGET / 10);
    h.submit((0..100).map(|i| named(&format!("s{i}"), "fresh")).collect());
    h.submit((0..3).map(|i| spec(&format!("l{i}"), &[])).collect());
    h.dispatch();
    let bundles = h.comm.take_bundles();
    let (long, short): (Vec<_>, Vec<_>) = bundles
        .iter()
        .partition(|(_, tasks)| tasks[0].spec.task == "t");
    assert_eq!(long.len(), 3);
    assert!(
        long.iter().all(|(_, tasks)| tasks.len() == 1),
        "long ones alone"
    );
    assert!(
        short
            .iter()
            .all(|(_, tasks)| tasks.len() <= 10
                && tasks.iter().all(|task| task.spec.task == "fresh")),
        "at most the budget's worth per delivery: {short:?}"
    );
    assert_eq!(
        short.iter().map(|(_, tasks)| tasks.len()).sum::<usize>(),
        100
    );
    assert!(short.len() >= 10);
}

#[test]
fn durations_follow_a_name_that_changes_pace() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![named("a", "fresh"), named("b", "fresh")]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    h.finished_in("a", None, 0, Duration::from_micros(200));
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
    assert_eq!(
        h.core.durations.mean("fresh"),
        Some(Duration::from_micros(200))
    );
    h.finished_in("b", None, 0, Duration::from_millis(400));
    assert_eq!(
        h.core.durations.mean("fresh"),
        Some(Duration::from_micros(200_100))
    );
    // Now too long to bundle: each goes alone.
    h.submit((0..4).map(|i| named(&format!("c{i}"), "fresh")).collect());
    h.dispatch();
    let bundles = h.comm.take_bundles();
    assert_eq!(bundles.len(), 4);
    // A zero duration (a worker that does not measure) teaches nothing,
    // and neither does a duplicate report.
    h.finished_in("c0", None, 0, Duration::ZERO);
    h.finished_in("c0", None, 0, Duration::from_secs(9));
    assert_eq!(
        h.core.durations.mean("fresh"),
        Some(Duration::from_micros(200_100))
    );
    h.comm.expect_none();
}

#[test]
fn a_probe_that_does_not_finish_holds_its_name_back_one_tick_at_most() {
    // A recursive task: the probe waits on children of its own name, which
    // must not wait for it.
    let mut h = Harness::with_worker(1);
    h.submit(vec![named("parent", "fresh")]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["parent"]);
    h.submit(vec![named("child-0", "fresh"), named("child-1", "fresh")]);
    h.dispatch();
    h.comm.expect_none();
    h.tick();
    h.dispatch();
    let bundles = h.comm.take_bundles();
    assert_eq!(bundles.len(), 2, "released, one per delivery: {bundles:?}");
    // Stalled names are not held again until one of their tasks finishes.
    h.submit(vec![named("child-2", "fresh")]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["child-2"]);
    h.finished_in("child-0", None, 0, Duration::from_micros(100));
    h.submit(
        (0..3)
            .map(|i| named(&format!("next-{i}"), "fresh"))
            .collect(),
    );
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys().len(), 3, "known now: sent at once");
}

#[test]
fn a_task_sent_twice_lets_go_of_its_inputs_once() {
    // `b` and `c` both hold `a`; `b` is sent twice (a retrying failure,
    // then a lapsed custody): `a` must stay for `c`, with its inline result.
    let mut h = Harness::with_worker(1);
    h.submit(vec![
        spec("a", &[]),
        spec("x", &[]),
        spec("b", &["a"]),
        spec("c", &["a", "x"]),
    ]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a", "x"]);
    h.finished("a", Some(vec![1]), 1);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
    h.erred("b", TaskError::new(ErrorKind::User, "E", "boom"), true);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
    h.requeue(&keys(&["b"]));
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"]);
    assert_eq!(h.core.tasks["a"].holders, 1, "only `c` holds `a`");
    // A duplicate report of the first run changes nothing either.
    h.finished("b", None, 0);
    h.finished("b", None, 0);
    h.finished("x", None, 0);
    h.dispatch();
    let runs = h.comm.take_runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].spec.key, "c");
    assert_eq!(runs[0].inline, [("a".to_string(), ByteBuf::from(vec![1]))]);
    h.finished("c", None, 0);
    assert!(h.core.is_empty());
}

#[test]
fn parked_tasks_that_leave_are_not_counted_parked() {
    let mut h = Harness::with_worker(1);
    let parked = |key: &str| {
        let mut spec = spec(key, &[]);
        spec.resources = vec![("GPU".into(), 1)];
        spec
    };
    h.submit(vec![parked("p1"), parked("p2"), parked("p3")]);
    h.dispatch();
    h.comm.expect_none();
    assert_eq!(h.core.counts().parked, 3);
    h.cancel(&keys(&["p1"]), false);
    assert_eq!(h.comm.take_stored(), ["p1"]);
    h.forget(&keys(&["p2"]));
    assert_eq!(h.comm.take_specs_forgotten(), ["p2"]);
    h.comm.take_notified();
    let counts = h.core.counts();
    assert_eq!((counts.parked, counts.ready), (1, 0), "{counts:?}");
    // Cancelled, retried and parked again: still one entry.
    h.retry(&keys(&["p1"]));
    h.dispatch();
    h.comm.expect_none();
    let counts = h.core.counts();
    assert_eq!((counts.parked, counts.ready), (2, 0), "{counts:?}");
    assert!(h.core.parked.len() <= 2, "stale parked entries kept");
}

/// A spec of the short task name `fresh` (taught to the core) waiting for
/// `deps`.
fn short(key: &str, deps: &[&str]) -> TaskSpec {
    let mut spec = spec(key, deps);
    spec.task = "fresh".into();
    spec
}

/// A harness whose core knows `fresh` as a short name (it chains).
fn chaining() -> Harness {
    let mut h = Harness::with_worker(2);
    h.core.durations.learn("fresh", Duration::from_micros(100));
    h
}

#[test]
fn a_chain_of_short_tasks_goes_in_one_delivery_and_each_link_reports() {
    let mut h = chaining();
    h.submit(vec![
        short("a", &[]),
        short("b", &["a"]),
        short("c", &["b"]),
        short("d", &["c"]),
    ]);
    h.dispatch();
    let bundles = h.comm.take_bundles();
    assert_eq!(bundles.len(), 1, "{bundles:?}");
    let keys: Vec<&str> = bundles[0].1.iter().map(|r| r.spec.key.as_str()).collect();
    assert_eq!(
        keys,
        ["a", "b", "c", "d"],
        "the chain follows its head, in order"
    );
    assert_eq!(h.core.counts().processing, 4);
    assert_eq!(h.core.counts().waiting, 0);
    for key in ["a", "b", "c", "d"] {
        h.finished_in(key, Some(vec![1]), 1, Duration::from_micros(50));
        h.dispatch();
        h.comm.expect_none();
    }
    assert!(h.core.is_empty());
    assert_eq!(h.core.counts().finished, 4);
}

#[test]
fn a_chain_stops_where_a_link_waits_for_more_or_is_not_alone() {
    let mut h = chaining();
    let mut pinned = short("p", &["x"]);
    pinned.workers = vec!["w1".into()];
    let mut flaky = short("f", &[]);
    flaky.retries = 1;
    h.submit(vec![
        // b waits for a and z: a's chain is empty.
        short("a", &[]),
        short("y", &[]),
        short("z", &["y"]),
        short("b", &["a", "z"]),
        // x has two waiting dependents: none follows it.
        short("x", &[]),
        short("x1", &["x"]),
        pinned,
        // f may run again: its dependent waits for its last run.
        flaky,
        short("g", &["f"]),
        // s's dependent is long (`t`): it goes alone, later.
        short("s", &[]),
        spec("l", &["s"]),
    ]);
    h.dispatch();
    let mut sent: Vec<Vec<String>> = h
        .comm
        .take_bundles()
        .into_iter()
        .map(|(_, tasks)| tasks.into_iter().map(|r| r.spec.key).collect())
        .collect();
    sent.sort();
    // z waits for y alone: it follows y; b, waiting for z and a, does not.
    assert_eq!(
        sent,
        [
            keys(&["a"]),
            keys(&["f"]),
            keys(&["s"]),
            keys(&["x"]),
            keys(&["y", "z"])
        ]
    );
    assert_eq!(h.core.counts().waiting, 5);
}

#[test]
fn a_failed_head_fails_its_chain_and_a_lapsed_custody_makes_it_wait_again() {
    let mut h = chaining();
    h.submit(vec![
        short("a", &[]),
        short("b", &["a"]),
        short("c", &["b"]),
    ]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a", "b", "c"]);
    // The worker died with the delivery: it is handed out again, whole.
    h.requeue(&keys(&["b", "a", "c"]));
    assert_eq!(h.core.counts().waiting, 2);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a", "b", "c"]);
    // The head fails: its chain fails with its error, as when waiting.
    let error = TaskError::new(ErrorKind::User, "E", "boom").at("a", "fresh");
    h.erred("a", error.clone(), false);
    let mut stored = h.comm.take_stored();
    stored.sort();
    assert_eq!(stored, ["b", "c"]);
    assert_eq!(
        erred_events(&h.comm.take_notified()),
        [
            ("c".to_string(), "b".to_string(), ErrorKind::User),
            ("c".to_string(), "c".to_string(), ErrorKind::User)
        ]
    );
    // A late report of a failed link changes nothing.
    h.finished("c", None, 0);
    h.comm.expect_none();
    h.forget(&keys(&["a", "b", "c"]));
    h.comm.take_released();
    h.comm.take_specs_forgotten();
    assert!(h.core.is_empty());
}

#[test]
fn a_forgotten_link_failed_by_its_head_leaves_the_table() {
    let mut h = chaining();
    h.submit(vec![short("a", &[]), short("b", &["a"])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a", "b"]);
    // b's last holder lets go while it is in a's delivery.
    h.forget(&keys(&["b"]));
    h.comm.expect_none();
    let error = TaskError::new(ErrorKind::User, "E", "boom").at("a", "fresh");
    h.erred("a", error, false);
    assert_eq!(h.comm.take_stored(), ["b"]);
    h.comm.take_notified();
    assert_eq!(h.comm.take_specs_forgotten(), ["b"]);
    assert_eq!(h.comm.take_released(), [("b".to_string(), keys(&["a"]))]);
    h.forget(&keys(&["a"]));
    h.comm.take_specs_forgotten();
    assert!(h.core.is_empty());
}

#[test]
fn a_task_its_client_sent_is_processing_at_once_and_reports_as_any() {
    let mut h = Harness::with_worker(1);
    h.core.submit_sent(
        vec![spec("a", &[]), spec("b", &["a"])],
        &keys(&["a"]),
        &mut h.comm,
    );
    h.check();
    assert_eq!(h.core.counts().processing, 1);
    assert_eq!(h.core.counts().sent_by_clients, 1);
    h.dispatch();
    h.comm.expect_none();
    h.finished("a", Some(vec![5]), 1);
    h.dispatch();
    let runs = h.comm.take_runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].spec.key, "b");
    h.finished("b", None, 0);
    assert!(h.core.is_empty());
}

#[test]
fn a_report_that_overtakes_its_submission_settles_the_task_when_it_comes() {
    let mut h = Harness::with_worker(1);
    // The worker's events and the client's submission take different
    // queues: the report may come first.
    h.finished_in("a", Some(vec![5]), 1, Duration::from_micros(30));
    let error = TaskError::new(ErrorKind::User, "E", "boom").at("e", "t");
    h.erred("e", error, false);
    h.comm.expect_none();
    h.core.submit_sent(
        vec![
            spec("a", &[]),
            spec("b", &["a"]),
            spec("e", &[]),
            spec("f", &["e"]),
        ],
        &keys(&["a", "e"]),
        &mut h.comm,
    );
    h.check();
    // f fails with e's error, as a waiting dependent does.
    assert_eq!(h.comm.take_stored(), ["f"]);
    assert_eq!(
        erred_events(&h.comm.take_notified()),
        [("c".to_string(), "f".to_string(), ErrorKind::User)]
    );
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["b"], "a finished: b runs");
    h.finished("b", None, 0);
    h.forget(&keys(&["e", "f"]));
    h.comm.take_released();
    h.comm.take_specs_forgotten();
    assert!(h.core.is_empty());
    assert_eq!(h.core.counts().processing, 0);
}

#[test]
fn reports_of_unknown_keys_are_kept_a_while_only() {
    let mut h = Harness::with_worker(1);
    h.finished_in("gone", None, 0, Duration::from_micros(30));
    assert_eq!(h.core.early.len(), 1);
    for _ in 0..EARLY_TICKS {
        h.core.tick(&mut h.comm);
    }
    h.comm.expect_none();
    assert!(h.core.early.is_empty());
    // A submission coming later still runs (it was never sent twice).
    h.core
        .submit_sent(vec![spec("gone", &[])], &keys(&["gone"]), &mut h.comm);
    assert_eq!(h.core.counts().processing, 1);
    h.finished("gone", None, 0);
    assert!(h.core.is_empty());
}

#[test]
fn a_retry_that_overtakes_the_failure_runs_the_task_again_once_it_comes() {
    let mut h = Harness::with_worker(1);
    h.submit(vec![spec("a", &[])]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"]);
    // The client heard of the failure first and asked for a retry.
    h.retry(&keys(&["a"]));
    h.comm.expect_none();
    let error = TaskError::new(ErrorKind::User, "E", "boom").at("a", "t");
    h.erred("a", error, false);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a"], "run again");
    h.finished("a", None, 0);
    assert!(h.core.is_empty());
}

#[test]
fn the_tally_counts_each_ending_once_by_task_name_and_outcome() {
    use crate::tally::Outcome;
    let mut h = Harness::new();
    let mut info = worker("w", 4, &[]);
    info.tasks = ["app::ok", "app::bad", "app::flaky", "app::idle"]
        .map(|name| (name.to_owned(), 1))
        .to_vec();
    h.worker_seen(info, Instant::now());
    h.submit(vec![
        named("ok", "app::ok"),
        named("bad", "app::bad"),
        TaskSpec {
            deps: keys(&["bad"]),
            ..named("after-bad", "app::ok")
        },
        named("lost", "app::flaky"),
        named("idle", "app::idle"),
    ]);
    h.dispatch();
    let mut sent = h.comm.take_sent_keys();
    sent.sort();
    assert_eq!(sent, ["bad", "idle", "lost", "ok"]);
    h.finished_in("ok", None, 0, Duration::from_micros(300));
    h.finished_in("ok", None, 0, Duration::from_secs(1)); // a duplicate: not counted
    h.erred(
        "bad",
        TaskError::new(ErrorKind::User, "E", "boom").at("bad", "app::bad"),
        false,
    );
    h.erred(
        "lost",
        TaskError::new(ErrorKind::WorkerLost, "W", "gone").at("lost", "app::flaky"),
        false,
    );
    h.cancel(&keys(&["idle"]), true);
    h.comm.take_stored();
    h.comm.take_notified();
    h.comm.take_cancelled();
    let tally = h.core.tally();
    let count = |name: &str, outcome| tally.get(name).map_or(0, |t| t.outcome(outcome));
    assert_eq!(count("app::ok", Outcome::Finished), 1);
    assert_eq!(tally.get("app::ok").unwrap().duration().count(), 1);
    assert!((tally.get("app::ok").unwrap().duration().sum() - 0.0003).abs() < 1e-12);
    assert_eq!(count("app::bad", Outcome::Erred), 1);
    assert_eq!(
        count("app::ok", Outcome::Erred),
        1,
        "the failed input's dependent"
    );
    assert_eq!(count("app::flaky", Outcome::Lost), 1);
    assert_eq!(count("app::idle", Outcome::Cancelled), 1);
    let ended: u64 = tally
        .iter()
        .flat_map(|(_, t)| Outcome::ALL.map(|o| t.outcome(o)))
        .sum();
    let counts = h.core.counts();
    assert_eq!(ended, counts.finished + counts.erred + counts.cancelled);
    h.comm.expect_none();
}

#[test]
fn a_heartbeats_memory_and_cpu_show_in_the_worker_status() {
    let mut h = Harness::with_worker(1);
    let now = Instant::now();
    assert_eq!(h.core.workers(now)[0].rss_bytes, None);
    let mut beat = worker("w1", 1, &[]);
    beat.rss_bytes = Some(40 << 20);
    beat.cpu_ms = Some(1_500);
    h.worker_seen(beat.clone(), now);
    let status = &h.core.workers(now)[0];
    assert_eq!(
        (status.rss_bytes, status.cpu_ms),
        (Some(40 << 20), Some(1_500))
    );
    // The next heartbeat's figures replace them; an older worker's say nothing.
    beat.cpu_ms = Some(1_700);
    h.worker_seen(beat, now);
    assert_eq!(h.core.workers(now)[0].cpu_ms, Some(1_700));
    h.worker_seen(worker("w1", 1, &[]), now);
    assert_eq!(h.core.workers(now)[0].cpu_ms, None);
    h.comm.expect_none();
}

#[test]
fn errors_are_kept_where_they_start_not_for_each_dependent() {
    let mut h = Harness::with_worker(2);
    h.submit(vec![
        spec("a", &[]),
        spec("b", &["a"]),
        spec("c", &["b"]),
        spec("r", &[]),
    ]);
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["a", "r"]);
    let boom = TaskError::new(ErrorKind::User, "E", "boom")
        .at("a", "t")
        .with_traceback("x".repeat(10_000));
    h.erred("a", boom.clone(), false);
    h.erred("a", boom, false); // a duplicate report: not kept twice
    h.erred(
        "r",
        TaskError::new(ErrorKind::Panic, "panic", "first run").at("r", "t"),
        true,
    );
    h.dispatch();
    assert_eq!(h.comm.take_sent_keys(), ["r"], "r runs again");
    h.cancel(&keys(&["r"]), true); // a cancellation: not an error to keep
                                   // A task no worker provides fails in the scheduler: kept.
    h.submit(vec![named("u", "nobody::provides")]);
    h.dispatch();
    h.comm.take_stored();
    h.comm.take_notified();
    h.comm.take_cancelled();
    let kept: Vec<(String, String, bool)> = h
        .core
        .recent_errors()
        .iter()
        .map(|e| (e.key.clone(), e.message.clone(), e.retrying))
        .collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert_eq!(kept[0], ("a".into(), "boom".into(), false));
    assert_eq!(kept[1], ("r".into(), "first run".into(), true));
    assert_eq!(kept[2].0, "u");
    let first = h.core.recent_errors().iter().next().unwrap();
    assert_eq!((first.task.as_str(), first.traceback.len()), ("t", 4096));
    assert!(first.truncated);
    h.comm.expect_none();
}
