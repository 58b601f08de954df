//! Admission control: the scheduler's memory stays bounded whatever the
//! backlog.
//!
//! The core holds every task it admitted until it is done. Past
//! [`Config::scheduler_max_tasks`](flotilla_proto::Config::scheduler_max_tasks)
//! unfinished tasks (waiting, ready, processing), the scheduler stops
//! admitting: what arrives on its queue is *parked*, its signed bytes
//! appended to the Redis list `<ns>:backlog`, in arrival order, and
//! acknowledged once Redis has it. The task specs are in Redis already
//! (clients store each with its submission), so a parked submission costs
//! the scheduler nothing and Redis a few more bytes. Once the core holds
//! fewer than three quarters of the bound, the backlog is taken up again
//! from its head, a chunk of messages at a time, until the bound is reached
//! again or the backlog is empty; then messages are applied as they come.
//!
//! While anything is parked, later messages are parked too, so the core
//! sees every message in the order it was sent (a watch, release or
//! cancellation never overtakes the submission it is about). Three kinds do
//! not wait:
//! - workers' heartbeats and goodbyes, which say nothing about tasks (a
//!   heartbeat stuck behind a backlog would make live workers look dead);
//! - releases (`Forget`) and cancellations of tasks the core holds, which
//!   only shrink it. A core full of tasks that cannot run (no worker
//!   provides them) is emptied by cancelling them; were that cancellation
//!   parked behind the backlog, nothing would ever drain it;
//! - watches of tasks the core holds, which only add listeners.
//!
//! The decision is [`Admission::route`], a pure function of the message,
//! the core's load and whether the core holds the keys; the Redis side is
//! [`park`], [`read_backlog`] and [`trim_backlog`].

use flotilla_proto::{Names, ToScheduler};
use flotilla_runtime::Redis;

/// Messages taken up from the backlog at a time.
pub const TAKE_UP_CHUNK: usize = 64;

/// Where a message from the scheduler queue goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Apply it to the core now.
    Apply,
    /// Append it to the backlog in Redis.
    Park,
}

/// The admission state: the bound, and how many messages are parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    high: usize,
    low: usize,
    parked: u64,
}

impl Admission {
    /// Admits up to `bound` unfinished tasks; takes the backlog up again
    /// below three quarters of it. `parked` is the backlog's length in
    /// Redis at start (a previous scheduler's).
    pub fn new(bound: usize, parked: u64) -> Admission {
        Admission {
            high: bound.max(1),
            low: (bound / 4 * 3).max(1),
            parked,
        }
    }

    /// The bound on unfinished tasks in the core.
    pub fn bound(&self) -> usize {
        self.high
    }

    /// Messages parked in Redis.
    pub fn parked(&self) -> u64 {
        self.parked
    }

    /// Where `message` goes, with `unfinished` tasks in the core;
    /// `holds(key)` says whether the core holds a key.
    pub fn route(
        &self,
        message: &ToScheduler,
        unfinished: usize,
        holds: impl Fn(&str) -> bool,
    ) -> Route {
        let all_held = |keys: &[String]| keys.iter().all(|key| holds(key));
        match message {
            ToScheduler::Worker(_) | ToScheduler::WorkerGone { .. } => Route::Apply,
            _ if self.parked == 0 && unfinished < self.high => Route::Apply,
            ToScheduler::Forget { keys }
            | ToScheduler::Cancel { keys, .. }
            | ToScheduler::Watch { keys, .. }
                if all_held(keys) =>
            {
                Route::Apply
            }
            _ => Route::Park,
        }
    }

    /// A message was appended to the backlog.
    pub fn note_parked(&mut self) {
        self.parked += 1;
    }

    /// How many messages to take up from the backlog now, with
    /// `unfinished` tasks in the core and `taking_up` whether a take-up
    /// is under way (started below the low-water mark and not yet at the
    /// bound): none while the core is at the bound, or above three
    /// quarters of it with no take-up under way.
    pub fn take_up(&self, unfinished: usize, taking_up: bool) -> usize {
        let below = if taking_up { self.high } else { self.low };
        if self.parked == 0 || unfinished >= below {
            return 0;
        }
        (self.parked as usize).min(TAKE_UP_CHUNK)
    }

    /// `count` messages were taken up (and trimmed from the backlog).
    pub fn note_taken_up(&mut self, count: usize) {
        self.parked = self.parked.saturating_sub(count as u64);
    }
}

/// The backlog's Redis key: a list of signed scheduler messages.
pub fn backlog_key(names: &Names) -> String {
    format!("{}:backlog", names.namespace())
}

/// The backlog's length.
pub async fn backlog_len(redis: &mut Redis, names: &Names) -> redis::RedisResult<u64> {
    redis::cmd("LLEN")
        .arg(backlog_key(names))
        .query_async(redis)
        .await
}

/// Appends a message, as it arrived (signed), to the backlog.
pub async fn park(redis: &mut Redis, names: &Names, bytes: &[u8]) -> redis::RedisResult<()> {
    redis::cmd("RPUSH")
        .arg(backlog_key(names))
        .arg(bytes)
        .query_async(redis)
        .await
}

/// The first `count` messages of the backlog.
pub async fn read_backlog(
    redis: &mut Redis,
    names: &Names,
    count: usize,
) -> redis::RedisResult<Vec<Vec<u8>>> {
    redis::cmd("LRANGE")
        .arg(backlog_key(names))
        .arg(0)
        .arg(count.saturating_sub(1))
        .query_async(redis)
        .await
}

/// Drops the first `count` messages of the backlog, once applied.
pub async fn trim_backlog(
    redis: &mut Redis,
    names: &Names,
    count: usize,
) -> redis::RedisResult<()> {
    redis::cmd("LTRIM")
        .arg(backlog_key(names))
        .arg(count)
        .arg(-1)
        .query_async(redis)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{TaskSpec, WorkerInfo};

    fn submit(key: &str) -> ToScheduler {
        ToScheduler::Submit {
            tasks: vec![TaskSpec::new(
                key.into(),
                "t".into(),
                0,
                Vec::new(),
                Vec::new(),
                "c".into(),
            )],
            sent: vec![],
        }
    }

    #[test]
    fn admits_below_the_bound_and_parks_at_it() {
        let admission = Admission::new(100, 0);
        assert_eq!(admission.route(&submit("a"), 99, |_| false), Route::Apply);
        assert_eq!(admission.route(&submit("a"), 100, |_| false), Route::Park);
    }

    #[test]
    fn once_parked_everything_about_unknown_keys_waits_its_turn() {
        let mut admission = Admission::new(100, 0);
        admission.note_parked();
        // Below the bound, but the backlog goes first: order is kept.
        assert_eq!(admission.route(&submit("b"), 0, |_| false), Route::Park);
        let forget = ToScheduler::Forget {
            keys: vec!["a".into(), "b".into()],
        };
        let cancel = ToScheduler::Cancel {
            keys: vec!["b".into()],
            force: false,
        };
        let watch = ToScheduler::Watch {
            client: "c".into(),
            keys: vec!["b".into()],
        };
        let retry = ToScheduler::Retry {
            keys: vec!["a".into()],
        };
        let held = |key: &str| key == "a";
        for message in [&forget, &cancel, &watch, &retry] {
            assert_eq!(
                admission.route(message, 100, held),
                Route::Park,
                "{message:?}"
            );
        }
        // About keys the core holds, releases, cancellations and watches
        // only shrink it or add listeners: they never wait.
        let all_held = |_: &str| true;
        for message in [&forget, &cancel, &watch] {
            assert_eq!(
                admission.route(message, 100, all_held),
                Route::Apply,
                "{message:?}"
            );
        }
        // A retry re-admits work: it waits.
        assert_eq!(admission.route(&retry, 100, all_held), Route::Park);
    }

    #[test]
    fn heartbeats_never_wait() {
        let mut admission = Admission::new(100, 5);
        admission.note_parked();
        let gone = ToScheduler::WorkerGone { worker: "w".into() };
        assert_eq!(admission.route(&gone, 1_000, |_| false), Route::Apply);
        let beat = ToScheduler::Worker(WorkerInfo {
            id: "w".into(),
            name: "w".into(),
            slots: 1,
            tasks: Vec::new(),
            resources: Vec::new(),
            rss_bytes: None,
            cpu_ms: None,
        });
        assert_eq!(admission.route(&beat, 1_000, |_| false), Route::Apply);
    }

    #[test]
    fn takes_up_below_the_low_water_mark_until_the_bound() {
        let mut admission = Admission::new(100, 0);
        assert_eq!(admission.take_up(0, false), 0, "nothing parked");
        for _ in 0..200 {
            admission.note_parked();
        }
        assert_eq!(admission.take_up(80, false), 0, "above the low-water mark");
        assert_eq!(admission.take_up(74, false), TAKE_UP_CHUNK);
        // Once under way, it goes on up to the bound.
        assert_eq!(admission.take_up(99, true), TAKE_UP_CHUNK);
        assert_eq!(admission.take_up(100, true), 0);
        admission.note_taken_up(190);
        assert_eq!(admission.take_up(0, false), 10);
        admission.note_taken_up(10);
        assert_eq!(admission.parked(), 0);
        assert_eq!(admission.route(&submit("z"), 99, |_| false), Route::Apply);
    }
}
