//! Per-task-name counts: how each task ended, and how long its runs took.
//!
//! The scheduler core counts every task that leaves its table by the name
//! of its registered function and an [`Outcome`], and observes the run
//! time its worker measured into a histogram of [`DURATION_BUCKETS`]
//! (100 µs to an hour). The HTTP endpoint renders them as the Prometheus
//! families `flotilla_tasks_total{task,outcome}` and
//! `flotilla_task_duration_seconds{task}`.
//!
//! Task names come from registered functions, but a client may submit any
//! name, so the label's cardinality is bounded: the first [`MAX_NAMES`]
//! distinct names are counted under their own, and every later one under
//! [`OTHER`] (as is a task actually named `other`).
//!
//! ```
//! use flotilla_scheduler::tally::{Outcome, Tally};
//! use std::time::Duration;
//!
//! let mut tally = Tally::default();
//! tally.count("app::add", Outcome::Finished);
//! tally.observe("app::add", Duration::from_micros(250));
//! let add = tally.get("app::add").unwrap();
//! assert_eq!(add.outcome(Outcome::Finished), 1);
//! assert_eq!(add.duration().count(), 1);
//! ```

use flotilla_proto::{ErrorKind, TaskError};
use std::collections::BTreeMap;
use std::time::Duration;

/// Distinct task names counted under their own name; later ones count as
/// [`OTHER`].
pub const MAX_NAMES: usize = 500;
/// The `task` label of the names past [`MAX_NAMES`].
pub const OTHER: &str = "other";
/// Upper bounds, in seconds, of the run-time histogram's buckets: roughly
/// log-spaced (×2 to ×5) from 100 µs to an hour.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
];

/// How a task left the scheduler's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It finished and its result is stored.
    Finished,
    /// It failed (its function's error or panic, a failed input, bad
    /// arguments, an unknown task, a result too large...).
    Erred,
    /// It was cancelled, or dropped before running because nobody held it.
    Cancelled,
    /// It killed or lost its workers too many times
    /// ([`ErrorKind::WorkerLost`]).
    Lost,
    /// It ran past its time limit ([`ErrorKind::TimedOut`]).
    TimedOut,
}

impl Outcome {
    /// Every outcome, in the order they are rendered.
    pub const ALL: [Outcome; 5] = [
        Outcome::Finished,
        Outcome::Erred,
        Outcome::Cancelled,
        Outcome::Lost,
        Outcome::TimedOut,
    ];

    /// The `outcome` label: `finished`, `erred`, `cancelled`, `lost` or
    /// `timed_out`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Erred => "erred",
            Outcome::Cancelled => "cancelled",
            Outcome::Lost => "lost",
            Outcome::TimedOut => "timed_out",
        }
    }

    /// The outcome of a task that failed with `error`.
    pub fn of_error(error: &TaskError) -> Outcome {
        match error.kind() {
            ErrorKind::Cancelled => Outcome::Cancelled,
            ErrorKind::WorkerLost => Outcome::Lost,
            ErrorKind::TimedOut => Outcome::TimedOut,
            _ => Outcome::Erred,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A Prometheus-style histogram over fixed bucket bounds (seconds), with
/// the exact sum: a task name's run times over [`DURATION_BUCKETS`] (its
/// `Default`), and the `/metrics` endpoint's event-fed one over its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket of `bounds` (not cumulative), then above
    /// the last.
    pub(crate) buckets: Vec<u64>,
    pub(crate) sum: f64,
    pub(crate) count: u64,
}

/// A task name's run times (see [`DURATION_BUCKETS`]).
pub type RunTimes = Histogram;

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&DURATION_BUCKETS)
    }
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds, seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Adds one run time.
    pub fn observe(&mut self, run: Duration) {
        self.observe_seconds(run.as_secs_f64());
    }

    /// Adds one value, in seconds.
    pub fn observe_seconds(&mut self, seconds: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.bounds.len());
        self.buckets[bucket] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// Cumulative counts per bucket bound (as Prometheus' `le` buckets),
    /// without the `+Inf` one (that is [`count`](Self::count)).
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.bounds
            .iter()
            .zip(self.buckets.iter().scan(0, |total, n| {
                *total += n;
                Some(*total)
            }))
            .map(|(bound, total)| (*bound, total))
    }

    /// The sum of the observed values, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// How many values were observed.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// What is counted for one task name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskTally {
    outcomes: [u64; Outcome::ALL.len()],
    duration: RunTimes,
}

impl TaskTally {
    /// Tasks of this name that ended with `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()]
    }

    /// The run times of its tasks that finished, as their workers measured
    /// them.
    pub fn duration(&self) -> &RunTimes {
        &self.duration
    }
}

/// Counts by task name (see the [module](self) documentation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Sorted, for a stable exposition.
    names: BTreeMap<String, TaskTally>,
    other: Option<TaskTally>,
}

impl Tally {
    /// A task of `name` ended with `outcome`.
    pub fn count(&mut self, name: &str, outcome: Outcome) {
        self.entry(name).outcomes[outcome.index()] += 1;
    }

    /// A task of `name` finished after running for `run` on its worker.
    pub fn observe(&mut self, name: &str, run: Duration) {
        self.entry(name).duration.observe(run);
    }

    /// What is counted under `name` (a name folded into [`OTHER`] has
    /// nothing of its own).
    pub fn get(&self, name: &str) -> Option<&TaskTally> {
        if name == OTHER {
            return self.other.as_ref();
        }
        self.names.get(name)
    }

    /// Every task label with its counts: the names in order, then
    /// [`OTHER`] if any name was folded into it.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TaskTally)> {
        self.names
            .iter()
            .map(|(name, tally)| (name.as_str(), tally))
            .chain(self.other.iter().map(|tally| (OTHER, tally)))
    }

    /// The counts of `name`: looked up without allocating (this runs for
    /// every task that ends), inserted the first time.
    fn entry(&mut self, name: &str) -> &mut TaskTally {
        let known = self.names.contains_key(name);
        if name == OTHER || (!known && self.names.len() >= MAX_NAMES) {
            return self.other.get_or_insert_with(TaskTally::default);
        }
        if !known {
            self.names.insert(name.to_owned(), TaskTally::default());
        }
        self.names.get_mut(name).expect("inserted above")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_times_land_in_log_spaced_buckets_from_100_microseconds() {
        let mut durations = RunTimes::default();
        for us in [50, 100, 101, 2_000, 7_200_000_000] {
            durations.observe(Duration::from_micros(us));
        }
        let cumulative: Vec<(f64, u64)> = durations.cumulative().collect();
        assert_eq!(cumulative.len(), 14);
        assert_eq!(cumulative[0], (0.0001, 2), "50 and 100 µs: le=0.0001");
        assert_eq!(cumulative[1], (0.0005, 3), "101 µs");
        assert_eq!(cumulative[3], (0.005, 4), "2 ms");
        assert_eq!(cumulative[13], (3600.0, 4), "two hours only in +Inf");
        assert_eq!(durations.count(), 5);
        assert!((durations.sum() - (0.000_251 + 0.002 + 7200.0)).abs() < 1e-9);
        for pair in DURATION_BUCKETS.windows(2) {
            let ratio = pair[1] / pair[0];
            assert!((2.0..=6.0).contains(&ratio), "log-spaced: {pair:?}");
        }
    }

    #[test]
    fn outcomes_follow_the_error_kind() {
        let error = |kind| TaskError::new(kind, "E", "x");
        assert_eq!(Outcome::of_error(&error(ErrorKind::User)), Outcome::Erred);
        assert_eq!(
            Outcome::of_error(&error(ErrorKind::Cancelled)),
            Outcome::Cancelled
        );
        assert_eq!(
            Outcome::of_error(&error(ErrorKind::WorkerLost)),
            Outcome::Lost
        );
        assert_eq!(
            Outcome::of_error(&error(ErrorKind::TimedOut)),
            Outcome::TimedOut
        );
        let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            labels,
            ["finished", "erred", "cancelled", "lost", "timed_out"]
        );
    }

    #[test]
    fn names_past_the_cap_and_a_name_other_fold_into_other() {
        let mut tally = Tally::default();
        for i in 0..MAX_NAMES + 3 {
            tally.count(&format!("t{i:04}"), Outcome::Finished);
        }
        tally.count("t0000", Outcome::Erred);
        tally.observe(&format!("t{:04}", MAX_NAMES + 1), Duration::from_millis(3));
        tally.count(OTHER, Outcome::Cancelled);
        assert_eq!(tally.iter().count(), MAX_NAMES + 1);
        let first = tally.get("t0000").unwrap();
        assert_eq!(first.outcome(Outcome::Finished), 1);
        assert_eq!(first.outcome(Outcome::Erred), 1);
        assert!(tally.get(&format!("t{MAX_NAMES:04}")).is_none());
        let other = tally.get(OTHER).unwrap();
        assert_eq!(other.outcome(Outcome::Finished), 3);
        assert_eq!(other.outcome(Outcome::Cancelled), 1);
        assert_eq!(other.duration().count(), 1);
        assert_eq!(tally.iter().last().unwrap().0, OTHER);
    }
}
