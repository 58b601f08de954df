//! Keeping a long-running process (scheduler, worker) connected: a shared
//! stop signal, and the pauses between attempts to reconnect after RabbitMQ
//! or Redis went away.
//!
//! A process runs its connected life as one attempt. When an attempt ends
//! with a lost connection, the process waits (with growing pauses) and
//! starts a fresh attempt, which re-declares its topology, re-subscribes
//! and re-reads its state from Redis rather than trusting anything heard
//! before the loss.
//!
//! ```
//! use flotilla_runtime::supervise::{Backoff, Stop};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let stop = Stop::new(tokio::time::sleep(Duration::from_millis(10)));
//! let mut backoff = Backoff::default();
//! let mut attempts = 0;
//! while !stop.requested() {
//!     attempts += 1; // connect and serve until the connection drops...
//!     if !stop.pause(backoff.next_pause()).await {
//!         break; // stopped while pausing
//!     }
//! }
//! assert!(attempts >= 1);
//! # }
//! ```

use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

/// A spawned task's handle that aborts the task when dropped (tokio-util's):
/// a background task that lives exactly as long as its owner.
pub use tokio_util::task::AbortOnDropHandle;

/// First pause before reconnecting.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// A stop request shared by every attempt of a process: set once, seen by
/// all clones.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// A stop signal raised when `shutdown` completes (it is polled on a
    /// task of its own, on the current tokio runtime).
    pub fn new(shutdown: impl Future<Output = ()> + Send + 'static) -> Stop {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown => { let _ = tx.send(true); }
                // Every receiver is gone: nobody is left to stop.
                () = tx.closed() => {}
            }
        });
        Stop(rx)
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once a stop is requested.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }

    /// Sleeps for `pause`; `false` if a stop was requested first.
    pub async fn pause(&self, pause: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(pause) => !self.requested(),
            () = self.clone().wait() => false,
        }
    }
}

/// Pauses between attempts: doubling from a first pause up to a longest
/// one, each drawn at random from its upper half ("equal jitter", with
/// `backon`), so that processes that lost the same broker at the same
/// moment do not all come back in lock-step.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    longest: Duration,
    pauses: backon::ExponentialBackoff,
}

impl Default for Backoff {
    /// Reconnection pauses: about 100 ms, doubling up to about 5 s.
    fn default() -> Self {
        Backoff::new(FIRST_PAUSE, LONGEST_PAUSE)
    }
}

impl Backoff {
    /// Pauses of at most `first`, doubling up to at most `longest`; each is
    /// at least half its bound.
    pub fn new(first: Duration, longest: Duration) -> Self {
        Backoff {
            first,
            longest,
            pauses: Self::pauses(first, longest),
        }
    }

    fn pauses(first: Duration, longest: Duration) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        // backon adds a random part of up to the delay itself: half-bounds
        // give pauses between half the bound and the bound.
        backon::ExponentialBuilder::default()
            .with_min_delay(first / 2)
            .with_max_delay(longest / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        self.pauses.next().unwrap_or(self.longest).min(self.longest)
    }

    /// Starts again from the shortest pause (after an attempt that got
    /// connected).
    pub fn reset(&mut self) {
        self.pauses = Self::pauses(self.first, self.longest);
    }
}

/// The attempts of a supervised process: decides, after each, whether to
/// start another.
///
/// A failure before the process was ever up is returned at once (bad
/// settings, nothing to connect to); a failure after it had been up is a
/// lost connection, retried after a pause, unless a stop was requested.
#[derive(Debug, Default)]
pub struct Attempts {
    backoff: Backoff,
    ever_up: bool,
}

impl Attempts {
    /// Settles an attempt that ended with `result`; `up` says whether it
    /// got connected. `None`: start another attempt (after the pause, which
    /// has passed); `Some`: the process is done, with this outcome.
    pub async fn settle<E: std::fmt::Display>(
        &mut self,
        result: Result<(), E>,
        up: bool,
        stop: &Stop,
        what: &str,
    ) -> Option<Result<(), E>> {
        self.ever_up |= up;
        match result {
            Ok(()) => Some(Ok(())),
            Err(error) if self.ever_up && !stop.requested() => {
                if up {
                    self.backoff.reset();
                }
                let pause = self.backoff.next_pause();
                tracing::warn!(%error, ?pause, "lost RabbitMQ or Redis: {what}");
                if stop.pause(pause).await {
                    None
                } else {
                    Some(Ok(()))
                }
            }
            Err(error) => Some(Err(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_longest_with_jitter_and_reset() {
        let bounds: [u128; 8] = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut backoff = Backoff::default();
            for bound in bounds {
                let pause = backoff.next_pause().as_millis();
                assert!(
                    bound / 2 <= pause && pause <= bound,
                    "{pause} ms outside [{}, {bound}] ms",
                    bound / 2
                );
                seen.insert(pause);
            }
            backoff.reset();
            assert!(backoff.next_pause() <= FIRST_PAUSE);
        }
        // Jittered: fifty processes do not all pause alike.
        assert!(seen.len() > bounds.len(), "{seen:?}");
    }

    #[tokio::test]
    async fn attempts_retry_only_after_being_up_and_until_stopped() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Stop::new(async move {
            let _ = rx.await;
        });
        let mut attempts = Attempts::default();
        let never_up = attempts.settle(Err("refused"), false, &stop, "test").await;
        assert_eq!(never_up, Some(Err("refused")));
        assert_eq!(
            attempts.settle(Err("lost"), true, &stop, "test").await,
            None
        );
        assert_eq!(
            attempts.settle(Err("lost"), false, &stop, "test").await,
            None
        );
        tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let stopped = attempts.settle(Err("lost"), false, &stop, "test").await;
        assert_eq!(stopped, Some(Err("lost")));
        assert_eq!(
            attempts.settle::<&str>(Ok(()), true, &stop, "test").await,
            Some(Ok(()))
        );
    }

    #[tokio::test]
    async fn a_stop_interrupts_a_pause_and_is_seen_by_clones() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Stop::new(async move {
            let _ = rx.await;
        });
        let clone = stop.clone();
        assert!(!clone.requested());
        let pausing = tokio::spawn(async move { stop.pause(Duration::from_secs(60)).await });
        tx.send(()).unwrap();
        assert!(!pausing.await.unwrap());
        clone.clone().wait().await;
        assert!(clone.requested());
    }
}
