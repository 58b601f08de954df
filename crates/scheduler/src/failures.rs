//! The last task errors the scheduler saw, kept after their futures drop.
//!
//! An erred task leaves the scheduler's table once its last holder lets go,
//! and its error with it. [`RecentErrors`] keeps the last [`KEPT`] of them
//! apart, each with its traceback cut to [`TRACEBACK_LIMIT`] bytes, for
//! `GET /api/errors` and the dashboard: a failure stays visible after the
//! client that submitted the task has moved on.
//!
//! The core records an error where it first learns of it: a worker's report
//! (a retried run's error included, marked `retrying`), or a failure the
//! scheduler decides itself (an unknown task, a task that lost its workers
//! too many times). The dependents that fail with the same error, and
//! cancellations, are not recorded: they would push the causes out.
//!
//! ```
//! use flotilla_proto::{ErrorKind, TaskError};
//! use flotilla_scheduler::failures::RecentErrors;
//! use std::time::SystemTime;
//!
//! let mut recent = RecentErrors::default();
//! let error = TaskError::new(ErrorKind::User, "String", "no such file");
//! recent.record("load-1", "app::load", &error, false, SystemTime::now());
//! assert_eq!(recent.iter().next().unwrap().message, "no such file");
//! assert_eq!(recent.seen(), 1);
//! ```

use flotilla_proto::{ErrorKind, TaskError};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

/// Errors kept.
pub const KEPT: usize = 100;
/// Bytes of a traceback kept (at a character boundary); the rest is cut.
pub const TRACEBACK_LIMIT: usize = 4 * 1024;

/// One task error, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRecord {
    /// When the scheduler learnt of it.
    pub at: SystemTime,
    /// The task's key.
    pub key: String,
    /// The task's registered name.
    pub task: String,
    /// What kind of failure it was.
    pub kind: ErrorKind,
    /// The error's type (`std::io::Error`, `panic`...).
    pub type_name: String,
    /// The error's message.
    pub message: String,
    /// Its traceback, cut to [`TRACEBACK_LIMIT`] bytes.
    pub traceback: String,
    /// Whether [`traceback`](Self::traceback) was cut.
    pub truncated: bool,
    /// The task runs again (it had retries left).
    pub retrying: bool,
}

/// The last [`KEPT`] errors, oldest first (see the [module](self)
/// documentation). Records are shared, so a copy of the list for a status
/// snapshot costs [`KEPT`] reference counts, not the tracebacks.
#[derive(Debug, Clone, Default)]
pub struct RecentErrors {
    records: VecDeque<Arc<ErrorRecord>>,
    seen: u64,
}

impl RecentErrors {
    /// Keeps `error` of task `key` (of function `task`), forgetting the
    /// oldest record if [`KEPT`] are kept already.
    pub fn record(
        &mut self,
        key: &str,
        task: &str,
        error: &TaskError,
        retrying: bool,
        at: SystemTime,
    ) {
        let full = error.traceback();
        let mut cut = full.len().min(TRACEBACK_LIMIT);
        while !full.is_char_boundary(cut) {
            cut -= 1;
        }
        if self.records.len() == KEPT {
            self.records.pop_front();
        }
        self.records.push_back(Arc::new(ErrorRecord {
            at,
            key: key.to_owned(),
            task: task.to_owned(),
            kind: error.kind(),
            type_name: error.type_name().to_owned(),
            message: error.message().to_owned(),
            traceback: full[..cut].to_owned(),
            truncated: cut < full.len(),
            retrying,
        }));
        self.seen += 1;
    }

    /// The records, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Arc<ErrorRecord>> {
        self.records.iter()
    }

    /// How many errors were recorded since the scheduler started (kept or
    /// not): a reader polls the list only when this moves.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_hundred_are_kept_with_their_tracebacks_cut() {
        let mut recent = RecentErrors::default();
        let now = SystemTime::now();
        for i in 0..KEPT + 5 {
            let error = TaskError::new(ErrorKind::User, "E", format!("failure {i}"));
            recent.record(&format!("k{i}"), "app::t", &error, i % 2 == 0, now);
        }
        assert_eq!(recent.iter().count(), KEPT);
        assert_eq!(recent.seen(), (KEPT + 5) as u64);
        assert_eq!(recent.iter().next().unwrap().key, "k5", "the oldest went");
        let last = recent.iter().next_back().unwrap();
        assert_eq!(last.message, format!("failure {}", KEPT + 4));
        assert!(last.retrying);
        assert_eq!(last.kind, ErrorKind::User);

        // A long traceback of multi-byte characters: cut at a boundary.
        let long = "é".repeat(TRACEBACK_LIMIT);
        let error = TaskError::new(ErrorKind::Panic, "panic", "boom").with_traceback(long.as_str());
        recent.record("p", "app::p", &error, false, now);
        let kept = recent.iter().next_back().unwrap();
        assert!(kept.truncated);
        assert_eq!(kept.traceback.len(), TRACEBACK_LIMIT);
        assert!(long.starts_with(&kept.traceback));
        assert_eq!(kept.type_name, "panic");
        let short = TaskError::new(ErrorKind::Panic, "panic", "boom").with_traceback("at f");
        recent.record("q", "app::p", &short, false, now);
        let kept = recent.iter().next_back().unwrap();
        assert!(!kept.truncated);
        assert_eq!(kept.traceback, "at f");
    }
}
