//! How a failed task is retried: after what delay, and on which errors.
//!
//! A [`RetryPolicy`] travels in its task's [`TaskSpec`](crate::TaskSpec)
//! beside the retry count ([`TaskSpec::retries`](crate::TaskSpec::retries)).
//! The worker that ran the task decides whether a failure is retried (a
//! retry left, and the error one the policy retries on); the scheduler
//! then holds the task for [`RetryPolicy::delay`] before it is ready again.
//!
//! ```
//! use flotilla_proto::{ErrorKind, RetryOn, RetryPolicy, TaskError};
//! use std::time::Duration;
//!
//! let policy = RetryPolicy {
//!     delay_ms: 100,
//!     backoff: 2.0,
//!     max_delay_ms: 300,
//!     on: vec![RetryOn::Kind(ErrorKind::Panic), RetryOn::from("io::Error")],
//!     ..RetryPolicy::default()
//! };
//! // 100 ms, 200 ms, then capped at 300 ms.
//! assert_eq!(policy.delay(0, "k"), Duration::from_millis(100));
//! assert_eq!(policy.delay(1, "k"), Duration::from_millis(200));
//! assert_eq!(policy.delay(2, "k"), Duration::from_millis(300));
//! // Retried on an I/O error, not on another error of the task's own.
//! let io = TaskError::new(ErrorKind::User, "std::io::error::Error", "refused");
//! let other = TaskError::new(ErrorKind::User, "my_app::BadInput", "no");
//! assert!(policy.retries_on(&io));
//! assert!(!policy.retries_on(&other));
//! ```

use crate::{ErrorKind, TaskError};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// When and on which errors a failed task is run again (the number of
/// runs is [`TaskSpec::retries`](crate::TaskSpec::retries)).
///
/// The default retries at once, on any error a retry can mend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// The wait before the first retry, in milliseconds (0: at once).
    pub delay_ms: u64,
    /// Each retry waits this many times longer than the one before
    /// (exponential backoff). 1 (the default) keeps the delay constant;
    /// a factor under 1, or not a finite number, counts as 1.
    pub backoff: f64,
    /// The longest wait, in milliseconds, however many retries came before
    /// (0: no cap).
    pub max_delay_ms: u64,
    /// Spreads the delays of tasks that failed together: each wait is drawn
    /// between half its delay and its full delay (so a task waits at least
    /// half as long as without jitter), from the task's key and attempt.
    pub jitter: bool,
    /// The errors a retry is for; empty (the default) retries on any error
    /// a retry can mend. A failure that matches none of them fails the task
    /// at once, retries left or not.
    pub on: Vec<RetryOn>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            delay_ms: 0,
            backoff: 1.0,
            max_delay_ms: 0,
            jitter: false,
            on: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// How long the task `key` waits before its retry number `retry + 1`
    /// (`retry` 0 is the first retry): `delay_ms × backoff^retry`, capped
    /// at `max_delay_ms`, then jittered.
    pub fn delay(&self, retry: u32, key: &str) -> Duration {
        if self.delay_ms == 0 {
            return Duration::ZERO;
        }
        let factor = if self.backoff.is_finite() && self.backoff > 1.0 {
            self.backoff
        } else {
            1.0
        };
        let cap = if self.max_delay_ms == 0 {
            u64::MAX
        } else {
            self.max_delay_ms
        };
        // A float to the power of a large count is infinite, never a
        // panic; the cap and the conversion bound it.
        let nominal = (self.delay_ms as f64 * factor.powi(retry.min(i32::MAX as u32) as i32))
            .min(cap as f64)
            .min(u64::MAX as f64) as u64;
        let nominal = nominal.min(cap);
        if !self.jitter {
            return Duration::from_millis(nominal);
        }
        // Between half and all of it: the fraction comes from the key and
        // the attempt, so tasks that failed together spread out, and a
        // scheduler taking over computes the same wait.
        let fraction = spread(key, retry) as f64 / u64::MAX as f64;
        let half = nominal / 2;
        Duration::from_millis(half + ((nominal - half) as f64 * fraction) as u64)
    }

    /// Whether a failure with `error` is one to retry: [`RetryPolicy::on`]
    /// is empty or one of its entries matches.
    pub fn retries_on(&self, error: &TaskError) -> bool {
        self.on.is_empty() || self.on.iter().any(|on| on.matches(error))
    }
}

/// FNV-1a of the key and the attempt: stable across processes and
/// versions, unlike the standard library's hasher.
fn spread(key: &str, retry: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes().chain(retry.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// One kind of failure a [`RetryPolicy`] retries on.
///
/// ```
/// use flotilla_proto::{ErrorKind, RetryOn, TaskError};
///
/// let io = TaskError::new(ErrorKind::User, "std::io::error::Error", "refused");
/// assert!(RetryOn::from("io::Error").matches(&io));
/// assert!(RetryOn::from("std::io::error::Error").matches(&io));
/// assert!(RetryOn::type_of::<std::io::Error>().matches(&io));
/// assert!(RetryOn::Kind(ErrorKind::User).matches(&io));
/// assert!(!RetryOn::from(ErrorKind::Panic).matches(&io));
/// assert!(!RetryOn::from("fmt::Error").matches(&io));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RetryOn {
    /// Every error of this kind ([`ErrorKind::Panic`],
    /// [`ErrorKind::TimedOut`], [`ErrorKind::User`], ...).
    Kind(ErrorKind),
    /// An error whose [`TaskError::type_name`] is this path, in full
    /// (`"std::io::error::Error"`) or in part: the pattern's `::`-separated
    /// segments appear in the type's path in order, the last one last, so
    /// `"io::Error"` matches `std::io::error::Error` and `"MyError"`
    /// matches `my_app::MyError`.
    Type(String),
}

impl RetryOn {
    /// The errors of type `E`, by its full path
    /// (`std::any::type_name::<E>()`).
    pub fn type_of<E: ?Sized>() -> Self {
        RetryOn::Type(std::any::type_name::<E>().to_owned())
    }

    /// Whether `error` is of this kind or type.
    pub fn matches(&self, error: &TaskError) -> bool {
        match self {
            RetryOn::Kind(kind) => error.kind() == *kind,
            RetryOn::Type(pattern) => type_matches(pattern, error.type_name()),
        }
    }
}

fn type_matches(pattern: &str, type_name: &str) -> bool {
    if pattern == type_name {
        return true;
    }
    let mut wanted: Vec<&str> = pattern.split("::").collect();
    let mut path: Vec<&str> = type_name.split("::").collect();
    // The last segments must be the same: `io::Error` is not `io::ErrorKind`.
    match (wanted.pop(), path.pop()) {
        (Some(last), Some(name)) if !last.is_empty() && last == name => {}
        _ => return false,
    }
    let mut path = path.into_iter();
    wanted
        .into_iter()
        .all(|segment| path.any(|part| part == segment))
}

impl From<ErrorKind> for RetryOn {
    fn from(kind: ErrorKind) -> Self {
        RetryOn::Kind(kind)
    }
}

impl From<&str> for RetryOn {
    fn from(type_name: &str) -> Self {
        RetryOn::Type(type_name.to_owned())
    }
}

impl From<String> for RetryOn {
    fn from(type_name: String) -> Self {
        RetryOn::Type(type_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn delays_grow_by_the_factor_up_to_the_cap() {
        let policy = RetryPolicy {
            delay_ms: 50,
            backoff: 3.0,
            max_delay_ms: 1000,
            ..RetryPolicy::default()
        };
        let delays: Vec<_> = (0..5).map(|retry| policy.delay(retry, "k")).collect();
        assert_eq!(delays, [ms(50), ms(150), ms(450), ms(1000), ms(1000)]);
        // Far past any float: still the cap.
        assert_eq!(policy.delay(u32::MAX, "k"), ms(1000));
        let uncapped = RetryPolicy {
            max_delay_ms: 0,
            ..policy
        };
        assert_eq!(uncapped.delay(4, "k"), ms(50 * 81));
        assert!(uncapped.delay(u32::MAX, "k") >= ms(u64::MAX / 2));
    }

    #[test]
    fn a_factor_under_one_keeps_the_delay_constant() {
        for backoff in [0.0, 0.5, 1.0, f64::NAN, f64::NEG_INFINITY] {
            let policy = RetryPolicy {
                delay_ms: 20,
                backoff,
                ..RetryPolicy::default()
            };
            assert_eq!(policy.delay(3, "k"), ms(20), "{backoff}");
        }
        assert_eq!(RetryPolicy::default().delay(3, "k"), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay_and_spreads() {
        let policy = RetryPolicy {
            delay_ms: 1000,
            jitter: true,
            ..RetryPolicy::default()
        };
        let delays: Vec<_> = (0..200)
            .map(|n| policy.delay(0, &format!("task-{n}")))
            .collect();
        assert!(delays.iter().all(|d| (ms(500)..=ms(1000)).contains(d)));
        let low = delays.iter().filter(|d| **d < ms(750)).count();
        assert!((40..160).contains(&low), "{low} of 200 in the lower half");
        // The same key and attempt wait the same on any scheduler.
        assert_eq!(policy.delay(2, "a"), policy.delay(2, "a"));
    }

    #[test]
    fn type_patterns_match_by_path_segments() {
        let matches = |pattern, name| type_matches(pattern, name);
        assert!(matches("io::Error", "std::io::error::Error"));
        assert!(matches("Error", "std::io::error::Error"));
        assert!(matches("std::io::Error", "std::io::error::Error"));
        assert!(!matches("io::Error", "std::io::error::ErrorKind"));
        assert!(!matches("fmt::Error", "std::io::error::Error"));
        assert!(!matches("error::io::Error", "std::io::error::Error"));
        assert!(!matches("", "std::io::error::Error"));
        assert!(matches("alloc::string::String", "alloc::string::String"));
    }

    #[test]
    fn an_empty_filter_retries_on_anything() {
        let error = TaskError::new(ErrorKind::TimedOut, "flotilla::TimedOut", "late");
        assert!(RetryPolicy::default().retries_on(&error));
        let panics_only = RetryPolicy {
            on: vec![ErrorKind::Panic.into()],
            ..RetryPolicy::default()
        };
        assert!(!panics_only.retries_on(&error));
        let timeouts_too = RetryPolicy {
            on: vec![ErrorKind::Panic.into(), ErrorKind::TimedOut.into()],
            ..RetryPolicy::default()
        };
        assert!(timeouts_too.retries_on(&error));
    }
}
