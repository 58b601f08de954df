//! Seeded random DAGs driven through the core by a random interleaving of
//! submissions, completions, errors, retries, cancels, forgets, abandons,
//! watches, worker arrivals and losses, lapsed custody, lookups and ticks.
//! The invariants hold after every step (the [`Harness`] checks them), and
//! once the workers run everything that is left, every task has ended and
//! every client that wants a key heard how it ended.

use super::*;

/// splitmix64: small, seedable, good enough to pick test steps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len())])
        }
    }
}

const CLIENTS: [&str; 3] = ["c0", "c1", "c2"];
const WORKERS: [&str; 3] = ["w0", "w1", "w2"];

/// One task handed to the workers and not yet reported.
#[derive(Debug, Clone)]
struct Running {
    key: String,
    target: Option<String>,
    attempt: u32,
    /// The input sent before it in the same delivery (a chain): its worker
    /// runs it only once that input ended.
    after: Option<String>,
}

struct Sim {
    h: Harness,
    rng: Rng,
    /// Every task of the DAG, in submission order.
    specs: Vec<TaskSpec>,
    submitted: usize,
    /// Keys whose last holder let go (forgotten or abandoned): nobody
    /// expects to hear about them any more.
    released: HashSet<String>,
    /// (client, key): the client wants to hear how the key ended.
    wanted: Vec<(String, String)>,
    /// (client, key): the client heard from the scheduler.
    told: HashSet<(String, String)>,
    /// Keys a worker reported as ended (it tells the submitter itself).
    reported: HashSet<String>,
    /// (client, key): the client submitted a run of the key.
    submitters: HashSet<(String, String)>,
    running: Vec<Running>,
    lookups: Vec<String>,
    /// What Redis holds.
    stored: HashMap<String, Lookup>,
    workers: Vec<String>,
    now: Instant,
    /// Tasks sent in the chain of an input (see `Core::chain_after`).
    chained: usize,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let n = 4 + rng.below(24);
        let mut specs: Vec<TaskSpec> = Vec::with_capacity(n);
        for i in 0..n {
            let mut deps = Vec::new();
            if i > 0 {
                for _ in 0..rng.below(4) {
                    let dep = format!("k{}", rng.below(i));
                    if !deps.contains(&dep) {
                        deps.push(dep);
                    }
                }
            }
            let mut s = TaskSpec::new(
                format!("k{i}"),
                "t".into(),
                1,
                vec![],
                deps,
                CLIENTS[rng.below(CLIENTS.len())].into(),
            );
            s.priority = rng.below(5) as i32 - 2;
            // Half are not retried: those may head chains.
            s.retries = if rng.chance(50) {
                0
            } else {
                1 + rng.below(2) as u32
            };
            if rng.chance(45) {
                // A name whose duration the core learns as it goes.
                s.task = "fresh".into();
            } else if rng.chance(3) {
                s.task = "unknown".into();
            } else if rng.chance(3) {
                s.fingerprint = 2;
            }
            if rng.chance(20) {
                s.workers = vec![format!("name-{}", WORKERS[rng.below(WORKERS.len())])];
                s.allow_other_workers = rng.chance(50);
            }
            specs.push(s);
        }
        Sim {
            h: Harness::new(),
            rng,
            specs,
            submitted: 0,
            released: HashSet::new(),
            wanted: Vec::new(),
            told: HashSet::new(),
            reported: HashSet::new(),
            submitters: HashSet::new(),
            running: Vec::new(),
            lookups: Vec::new(),
            stored: HashMap::new(),
            workers: Vec::new(),
            now: Instant::now(),
            chained: 0,
        }
    }

    /// Takes every effect of the last step and plays its consequences.
    /// New runs and lookups are sorted: the core may emit them in hash
    /// order, and a seed must replay the same steps.
    fn absorb(&mut self) {
        let (runs, lookups) = (self.running.len(), self.lookups.len());
        for effect in std::mem::take(&mut self.h.comm.effects) {
            match effect {
                Effect::Sent(target, runs) => {
                    if let Some(w) = &target {
                        assert!(self.workers.contains(w), "sent to gone worker {w}");
                    }
                    let mut before: Vec<String> = Vec::new();
                    for run in runs {
                        let state = self.h.core.tasks.get(&run.spec.key).map(|t| t.state);
                        assert_eq!(state, Some(State::Processing), "{} sent", run.spec.key);
                        let after = run.spec.deps.iter().find(|d| before.contains(d)).cloned();
                        self.chained += usize::from(after.is_some());
                        before.push(run.spec.key.clone());
                        self.running.push(Running {
                            key: run.spec.key,
                            target: target.clone(),
                            attempt: run.attempt,
                            after,
                        });
                    }
                }
                Effect::Notified(client, event) => match event {
                    Event::Finished { key, .. } | Event::Erred { key, .. } => {
                        self.told.insert((client, key));
                    }
                    other => panic!("unexpected event {other:?}"),
                },
                Effect::Stored(key, error) => {
                    self.stored.insert(key, Lookup::Erred(error));
                }
                Effect::Lookup(key) => self.lookups.push(key),
                Effect::CancelRunning(keys) => {
                    self.running.retain(|r| !keys.contains(&r.key));
                }
                Effect::Released(..) | Effect::Abandoned(..) | Effect::SpecForgotten(_) => {}
            }
        }
        let runs = runs.min(self.running.len());
        self.running[runs..].sort_by(|a, b| (&a.key, &a.target).cmp(&(&b.key, &b.target)));
        self.lookups[lookups..].sort();
    }

    fn submit(&mut self, specs: Vec<TaskSpec>) {
        for s in &specs {
            self.wanted.push((s.client.clone(), s.key.clone()));
            if !self.h.core.tasks.contains_key(&s.key) {
                self.submitters.insert((s.client.clone(), s.key.clone()));
            }
        }
        self.h.submit(specs);
    }

    fn submitted_keys(&self) -> Vec<String> {
        self.specs[..self.submitted]
            .iter()
            .map(|s| s.key.clone())
            .filter(|k| !self.released.contains(k))
            .collect()
    }

    /// Keys whose last holder may let go: no submitted dependent that
    /// still needs them.
    fn releasable(&self) -> Vec<String> {
        self.submitted_keys()
            .into_iter()
            .filter(|key| {
                self.specs[..self.submitted].iter().all(|d| {
                    !d.deps.contains(key)
                        || self.released.contains(&d.key)
                        || self
                            .h
                            .core
                            .tasks
                            .get(&d.key)
                            .is_none_or(|t| matches!(t.state, State::Finished | State::Erred))
                })
            })
            .collect()
    }

    fn complete(&mut self, run: Running, succeed: bool) {
        if succeed {
            let inline = self.rng.chance(50).then(|| vec![1, 2, 3]);
            self.stored.insert(run.key.clone(), Lookup::Finished);
            self.reported.insert(run.key.clone());
            let run_time = match self.rng.below(4) {
                0 => Duration::ZERO,
                1 => Duration::from_micros(50),
                2 => Duration::from_millis(3),
                _ => Duration::from_millis(400),
            };
            self.h.finished_in(&run.key, inline, 3, run_time);
        } else {
            let retries = self
                .specs
                .iter()
                .find(|s| s.key == run.key)
                .map_or(0, |s| s.retries);
            let retrying = run.attempt < retries;
            let error = TaskError::new(ErrorKind::User, "E", "boom").at(&run.key, "t");
            if !retrying {
                self.stored
                    .insert(run.key.clone(), Lookup::Erred(error.clone()));
                self.reported.insert(run.key.clone());
            }
            self.h.erred(&run.key, error, retrying);
        }
    }

    fn answer(&mut self, index: usize) {
        let key = self.lookups.swap_remove(index);
        let found = self.stored.get(&key).cloned().unwrap_or(Lookup::Missing);
        self.h.lookup_answered(&key, found);
    }

    fn step(&mut self) {
        let rng = &mut self.rng;
        match rng.below(20) {
            0..=2 if self.submitted < self.specs.len() => {
                let batch = 1 + rng.below(3);
                let end = (self.submitted + batch).min(self.specs.len());
                let specs = self.specs[self.submitted..end].to_vec();
                self.submitted = end;
                self.submit(specs);
            }
            3 => {
                // Another client submits a key it shares.
                let keys = self.submitted_keys();
                if let Some(key) = self.rng.pick(&keys) {
                    let mut again = self.specs.iter().find(|s| &s.key == key).unwrap().clone();
                    again.client = CLIENTS[self.rng.below(CLIENTS.len())].into();
                    self.submit(vec![again]);
                }
            }
            4..=6 => self.h.dispatch(),
            7..=9 => {
                let i = self.rng.below(self.running.len().max(1));
                // A chained task does not end before the input it follows.
                let waits = self
                    .running
                    .get(i)
                    .and_then(|r| r.after.as_ref())
                    .is_some_and(|after| self.running.iter().any(|r| &r.key == after));
                if !self.running.is_empty() && !waits {
                    let run = self.running.swap_remove(i);
                    let succeed = self.rng.chance(75);
                    self.complete(run, succeed);
                }
            }
            10 => {
                let keys = self.submitted_keys();
                if let Some(key) = self.rng.pick(&keys).cloned() {
                    let force = self.rng.chance(50);
                    self.h.cancel(&[key], force);
                }
            }
            11 => {
                let keys = self.releasable();
                if let Some(key) = self.rng.pick(&keys).cloned() {
                    self.released.insert(key.clone());
                    if self.rng.chance(50) {
                        self.h.forget(&[key]);
                    } else {
                        self.h.abandon(&[key]);
                    }
                }
            }
            12 => {
                let id = WORKERS[self.rng.below(WORKERS.len())];
                if self.workers.iter().any(|w| w == id) && self.rng.chance(50) {
                    self.workers.retain(|w| w != id);
                    self.running.retain(|r| r.target.as_deref() != Some(id));
                    self.h.worker_gone(id);
                } else {
                    if !self.workers.iter().any(|w| w == id) {
                        self.workers.push(id.to_owned());
                    }
                    self.h
                        .worker_seen(worker(id, 1 + self.rng.below(2) as u32, &[]), self.now);
                }
            }
            13 => {
                // A worker died holding a shared-queue task: its custody lapses.
                let shared: Vec<usize> = (0..self.running.len())
                    .filter(|i| self.running[*i].target.is_none())
                    .collect();
                if let Some(&i) = self.rng.pick(&shared) {
                    let run = self.running.swap_remove(i);
                    self.h.requeue(&[run.key]);
                }
            }
            14 | 15 => {
                if !self.lookups.is_empty() {
                    let i = self.rng.below(self.lookups.len());
                    self.answer(i);
                }
            }
            16 => self.h.tick(),
            17 => {
                let erred: Vec<String> = self
                    .submitted_keys()
                    .into_iter()
                    .filter(|k| {
                        self.h
                            .core
                            .tasks
                            .get(k)
                            .is_some_and(|t| t.state == State::Erred)
                    })
                    .collect();
                if let Some(key) = self.rng.pick(&erred).cloned() {
                    self.h.retry(&[key]);
                }
            }
            18 => {
                let keys = self.submitted_keys();
                if let Some(key) = self.rng.pick(&keys).cloned() {
                    let client = CLIENTS[self.rng.below(CLIENTS.len())];
                    self.wanted.push((client.to_owned(), key.clone()));
                    self.h.watch(client, &[key]);
                }
            }
            _ => {
                // Every worker but those seen lately is presumed gone.
                if self.rng.chance(20) {
                    self.now += WORKER_TIMEOUT;
                    for id in std::mem::take(&mut self.workers) {
                        self.running
                            .retain(|r| r.target.as_deref() != Some(id.as_str()));
                    }
                    self.h.expire_workers(self.now);
                }
            }
        }
        self.absorb();
    }

    /// The workers come back and run everything that is left; lookups are
    /// answered, time passes.
    fn drain(&mut self) {
        for id in WORKERS {
            if !self.workers.iter().any(|w| w == id) {
                self.workers.push(id.to_owned());
            }
            self.h.worker_seen(worker(id, 1, &[]), self.now);
        }
        if self.submitted < self.specs.len() {
            let specs = self.specs[self.submitted..].to_vec();
            self.submitted = self.specs.len();
            self.submit(specs);
            self.absorb();
        }
        for _ in 0..100 {
            while !self.lookups.is_empty() {
                self.answer(0);
                self.absorb();
            }
            self.h.dispatch();
            self.absorb();
            for run in std::mem::take(&mut self.running) {
                self.complete(run, true);
                self.absorb();
            }
            self.h.tick();
            self.absorb();
            let core = &self.h.core;
            if self.running.is_empty()
                && self.lookups.is_empty()
                && core.orphans.is_empty()
                && core
                    .tasks
                    .values()
                    .all(|t| matches!(t.state, State::Finished | State::Erred))
            {
                break;
            }
        }
    }

    fn check_ended(&self) {
        let core = &self.h.core;
        assert_eq!(core.in_flight, 0, "in flight at the end");
        assert_eq!(core.counts().processing, 0);
        assert!(self.running.is_empty(), "still running: {:?}", self.running);
        assert!(core.lookups.is_empty(), "lookups left: {:?}", core.lookups);
        assert!(core.orphans.is_empty(), "orphans left: {:?}", core.orphans);
        for (key, t) in &core.tasks {
            assert_eq!(t.state, State::Erred, "`{key}` left in the table");
        }
        for (client, key) in &self.wanted {
            if self.released.contains(key) {
                continue;
            }
            let submitter = self.submitters.contains(&(client.clone(), key.clone()));
            assert!(
                self.told.contains(&(client.clone(), key.clone()))
                    || (submitter && self.reported.contains(key)),
                "`{client}` never heard how `{key}` ended"
            );
        }
    }
}

/// Prints the seed of a failing run.
struct Seed(u64);

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("random DAG test failed with seed {}", self.0);
        }
    }
}

fn run(seed: u64) -> (usize, Counts, usize) {
    let _seed = Seed(seed);
    let mut sim = Sim::new(seed);
    let steps = 10 * sim.specs.len();
    for _ in 0..steps {
        sim.step();
    }
    sim.drain();
    sim.check_ended();
    (steps, sim.h.core.counts(), sim.chained)
}

#[test]
fn random_dags_end_with_every_task_accounted_for() {
    let started = Instant::now();
    let seeds = match std::env::var("CORE_SEED") {
        Ok(seed) => {
            let seed = seed.parse().expect("CORE_SEED is a number");
            seed..seed + 1
        }
        Err(_) => 0..200,
    };
    let (mut steps, mut finished, mut erred, mut cancelled, mut chained) = (0, 0, 0, 0, 0);
    let all = seeds.end - seeds.start > 1;
    for seed in seeds {
        let (n, counts, links) = run(seed);
        chained += links;
        steps += n;
        finished += counts.finished;
        erred += counts.erred;
        cancelled += counts.cancelled;
    }
    eprintln!(
        "{steps} random steps ({finished} tasks finished, {erred} erred, {cancelled} cancelled, \
         {chained} sent chained) in {:?}",
        started.elapsed()
    );
    assert!(!all || chained > 0, "the seeds exercise chains");
}
