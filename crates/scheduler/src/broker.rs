//! Broker alarms: whether RabbitMQ is blocking publishers, as the scheduler
//! sees it.
//!
//! During a memory or disk alarm RabbitMQ stops reading from every
//! connection that publishes, and sends it `connection.blocked` (then
//! `connection.unblocked` once the alarm clears; see
//! [`flotilla_runtime::blocked`]). Everything stalls, correctly: clients'
//! submissions, workers' results and heartbeats, the scheduler's bundles.
//! This module makes the stall visible and keeps it from being mistaken
//! for dead workers:
//!
//! - [`watch`] follows the scheduler's connection and a small probe
//!   connection of its own. The broker only blocks (and tells) a connection
//!   once it publishes during the alarm, and a scheduler with nothing to
//!   publish would never hear of it; so the probe publishes an empty,
//!   transient message every [`PROBE_EVERY`] to a routing key no queue is
//!   bound to (`<ns>.broker-probe`, dropped by the broker). The broker is
//!   blocked while either connection is. The status goes to a
//!   [`BrokerStatus`] watch channel (the status page reads it directly, so
//!   it stays current even while the scheduler's own loop waits on a
//!   blocked publish), with one warning when a block starts and one line
//!   when it ends.
//! - Workers' heartbeats cannot reach the scheduler during the alarm. The
//!   worker timeout is held while the broker is blocked and for
//!   [`HOLD_AFTER`] once it is unblocked
//!   ([`BrokerStatus::holds_worker_timeout`]), time for the heartbeats
//!   that waited to arrive, so no live worker is declared lost and no task
//!   pinned to one is sent elsewhere because of an alarm. A worker that
//!   really died meanwhile is found [`HOLD_AFTER`] after the alarm.

use crate::core::WORKER_TIMEOUT;
use flotilla_proto::{Config, Names};
use flotilla_runtime::blocked::{BlockEvent, BlockEvents};
use flotilla_runtime::supervise::AbortOnDropHandle;
use flotilla_runtime::transport::{self, name};
use lapin::options::BasicPublishOptions;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How often the probe connection publishes.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long the worker timeout stays held after the broker is unblocked:
/// two worker timeouts, so that heartbeats queued behind an alarm's
/// backlog of submissions arrive before anyone's silence counts.
pub const HOLD_AFTER: Duration = Duration::from_secs(2 * WORKER_TIMEOUT.as_secs());
/// Pause before the probe connection is opened again after a failure.
const PROBE_RETRY: Duration = Duration::from_secs(5);

/// Whether the broker blocks the scheduler's publishes (see the module
/// documentation), for status pages and the worker timeout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BrokerStatus {
    /// The broker is blocking publishers now.
    pub blocked: bool,
    /// The broker's reason for the current block (`low on memory`, `low on
    /// disk`).
    pub reason: Option<String>,
    /// When the current block started (wall clock).
    pub since: Option<SystemTime>,
    /// When the current block started.
    pub started: Option<Instant>,
    /// When the last block ended.
    pub ended: Option<Instant>,
    /// How long the last block that ended lasted.
    pub last_block: Option<Duration>,
    /// Blocks seen since the scheduler started.
    pub blocks: u64,
}

impl BrokerStatus {
    /// How long the current block has lasted (zero when not blocked).
    pub fn blocked_for(&self, now: Instant) -> Duration {
        match (self.blocked, self.started) {
            (true, Some(started)) => now.saturating_duration_since(started),
            _ => Duration::ZERO,
        }
    }

    /// Whether workers' silence must not count now: the broker is blocked,
    /// or was unblocked less than [`HOLD_AFTER`] ago.
    pub fn holds_worker_timeout(&self, now: Instant) -> bool {
        self.blocked
            || self
                .ended
                .is_some_and(|ended| now.saturating_duration_since(ended) < HOLD_AFTER)
    }

    fn start(&mut self, reason: String, now: Instant, wall: SystemTime) {
        self.blocked = true;
        self.reason = Some(reason);
        self.since = Some(wall);
        self.started = Some(now);
        self.blocks += 1;
    }

    /// Ends the current block; returns its length.
    fn end(&mut self, now: Instant) -> Duration {
        let length = self.blocked_for(now);
        self.blocked = false;
        self.reason = None;
        self.since = None;
        self.started = None;
        self.ended = Some(now);
        self.last_block = Some(length);
        length
    }
}

/// The connections whose blocks are followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The scheduler's own connection.
    Scheduler,
    /// The probe connection.
    Probe,
}

/// What a notice changed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// A block started, for this reason.
    Started(String),
    /// The block ended, after this long.
    Ended(Duration),
}

/// Turns the two connections' notices into one [`BrokerStatus`]: blocked
/// while either connection is.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    scheduler: bool,
    probe: bool,
}

impl Tracker {
    /// Applies `event` from `source` to `status`; returns what changed.
    pub(crate) fn apply(
        &mut self,
        status: &mut BrokerStatus,
        source: Source,
        event: BlockEvent,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Change> {
        let blocked = matches!(event, BlockEvent::Blocked(_));
        match source {
            Source::Scheduler => self.scheduler = blocked,
            Source::Probe => self.probe = blocked,
        }
        match event {
            BlockEvent::Blocked(reason) if !status.blocked => {
                status.start(reason.clone(), now, wall);
                Some(Change::Started(reason))
            }
            BlockEvent::Unblocked if status.blocked && !self.scheduler && !self.probe => {
                Some(Change::Ended(status.end(now)))
            }
            _ => None,
        }
    }

    /// The probe connection is gone: its block, if any, no longer counts
    /// (a new probe connection hears of the alarm again if it still holds).
    pub(crate) fn probe_lost(&mut self, status: &mut BrokerStatus, now: Instant) -> Option<Change> {
        self.probe = false;
        (status.blocked && !self.scheduler).then(|| Change::Ended(status.end(now)))
    }
}

/// Follows `connection` and a probe connection of its own (see the module
/// documentation), sending each change of the status to `status`; runs
/// until aborted. A status still blocked from the scheduler's previous
/// connected life ends first: the new connections hear of an alarm that
/// still holds within a second.
pub(crate) fn watch(
    connection: &lapin::Connection,
    config: &Config,
    status: watch::Sender<BrokerStatus>,
) -> JoinHandle<()> {
    let names = config.names();
    let amqp_url = config.amqp_url.clone();
    let mut events = BlockEvents::new(connection);
    tokio::spawn(async move {
        let (notices, mut received) = mpsc::unbounded_channel();
        let probe = AbortOnDropHandle::new(tokio::spawn(probe(amqp_url, names, notices)));
        let mut tracker = Tracker::default();
        status.send_if_modified(|status| {
            let change = status.blocked.then(|| status.end(Instant::now()));
            report(change.map(Change::Ended).as_ref());
            change.is_some()
        });
        loop {
            let (source, event) = tokio::select! {
                event = events.next() => match event {
                    Some(event) => (Source::Scheduler, Some(event)),
                    // The connection failed: the scheduler starts a new life.
                    None => break,
                },
                Some(event) = received.recv() => (Source::Probe, event),
            };
            let (now, wall) = (Instant::now(), SystemTime::now());
            status.send_if_modified(|status| {
                let change = match event {
                    Some(event) => tracker.apply(status, source, event, now, wall),
                    None => tracker.probe_lost(status, now),
                };
                report(change.as_ref());
                change.is_some()
            });
        }
        drop(probe);
        std::future::pending::<()>().await;
    })
}

/// Logs a change: a warning when a block starts, a line when it ends.
fn report(change: Option<&Change>) {
    match change {
        Some(Change::Started(reason)) => warn!(
            reason,
            "RabbitMQ is blocking publishers (a resource alarm): submissions, results and \
             heartbeats wait until it clears; the worker timeout is held meanwhile"
        ),
        Some(Change::Ended(length)) => info!(
            blocked_s = length.as_secs_f64(),
            hold_s = HOLD_AFTER.as_secs(),
            "RabbitMQ unblocked publishers: the alarm cleared"
        ),
        None => {}
    }
}

/// Publishes on a connection of its own every [`PROBE_EVERY`], so that the
/// broker blocks (and tells) it during an alarm; sends that connection's
/// notices to `notices`, and `None` when it is lost.
async fn probe(amqp_url: String, names: Names, notices: mpsc::UnboundedSender<Option<BlockEvent>>) {
    let label = format!("flotilla-scheduler {} broker probe", names.namespace());
    let routing_key = format!("{}.broker-probe", names.namespace());
    loop {
        match transport::connect_amqp(&amqp_url, &label).await {
            Ok(connection) => {
                let mut events = BlockEvents::new(&connection);
                let publishing = publish_probes(&connection, &routing_key);
                tokio::pin!(publishing);
                let why = loop {
                    tokio::select! {
                        error = &mut publishing => break error.to_string(),
                        event = events.next() => match event {
                            Some(event) => {
                                if notices.send(Some(event)).is_err() {
                                    return;
                                }
                            }
                            None => break "the connection failed".to_owned(),
                        },
                    }
                };
                warn!(
                    error = why,
                    "the scheduler's broker probe failed; opening it again"
                );
                transport::close(&connection, "broker probe failed").await;
            }
            Err(error) => warn!(%error, "opening the scheduler's broker probe failed"),
        }
        if notices.send(None).is_err() {
            return;
        }
        tokio::time::sleep(PROBE_RETRY).await;
    }
}

/// Publishes an empty transient message to `routing_key` (bound to no
/// queue) every [`PROBE_EVERY`]; returns the error that stops it.
async fn publish_probes(connection: &lapin::Connection, routing_key: &str) -> lapin::Error {
    let channel = match connection.create_channel().await {
        Ok(channel) => channel,
        Err(error) => return error,
    };
    loop {
        // Waits while the connection is blocked.
        if let Err(error) = channel
            .basic_publish(
                name(""),
                name(routing_key),
                BasicPublishOptions::default(),
                b"",
                transport::transient(),
            )
            .await
        {
            return error;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked() -> BlockEvent {
        BlockEvent::Blocked("low on memory".into())
    }

    #[test]
    fn a_block_holds_the_worker_timeout_until_the_grace_after_it_ends() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let (mut tracker, mut status) = (Tracker::default(), BrokerStatus::default());
        assert!(!status.holds_worker_timeout(t0));
        assert_eq!(
            tracker.apply(&mut status, Source::Probe, blocked(), t0, wall),
            Some(Change::Started("low on memory".into()))
        );
        assert!(status.blocked);
        assert_eq!(status.since, Some(wall));
        // However long the block lasts, silence does not count.
        let t1 = t0 + Duration::from_secs(300);
        assert!(status.holds_worker_timeout(t1));
        assert_eq!(status.blocked_for(t1), Duration::from_secs(300));
        assert_eq!(
            tracker.apply(&mut status, Source::Probe, BlockEvent::Unblocked, t1, wall),
            Some(Change::Ended(Duration::from_secs(300)))
        );
        assert!(!status.blocked);
        assert_eq!(status.blocked_for(t1), Duration::ZERO);
        assert_eq!(status.last_block, Some(Duration::from_secs(300)));
        assert!(status.holds_worker_timeout(t1 + HOLD_AFTER - Duration::from_millis(1)));
        assert!(!status.holds_worker_timeout(t1 + HOLD_AFTER));
        assert_eq!(status.blocks, 1);
    }

    #[test]
    fn blocked_while_either_connection_is() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let (mut tracker, mut status) = (Tracker::default(), BrokerStatus::default());
        tracker.apply(&mut status, Source::Probe, blocked(), t0, wall);
        // The scheduler's connection hears of the same alarm: one block.
        assert_eq!(
            tracker.apply(&mut status, Source::Scheduler, blocked(), t0, wall),
            None
        );
        assert_eq!(
            tracker.apply(&mut status, Source::Probe, BlockEvent::Unblocked, t0, wall),
            None
        );
        assert!(
            status.blocked,
            "the scheduler's connection is still blocked"
        );
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            tracker.apply(
                &mut status,
                Source::Scheduler,
                BlockEvent::Unblocked,
                t1,
                wall
            ),
            Some(Change::Ended(Duration::from_secs(2)))
        );
        assert_eq!(status.blocks, 1);
        // A stray unblock changes nothing.
        assert_eq!(
            tracker.apply(&mut status, Source::Probe, BlockEvent::Unblocked, t1, wall),
            None
        );
    }

    #[test]
    fn a_lost_probe_ends_only_its_own_block() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let (mut tracker, mut status) = (Tracker::default(), BrokerStatus::default());
        tracker.apply(&mut status, Source::Probe, blocked(), t0, wall);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            tracker.probe_lost(&mut status, t1),
            Some(Change::Ended(Duration::from_secs(1)))
        );
        assert!(status.holds_worker_timeout(t1), "the grace follows");
        tracker.apply(&mut status, Source::Scheduler, blocked(), t1, wall);
        assert_eq!(tracker.probe_lost(&mut status, t1), None);
        assert!(status.blocked);
        assert_eq!(status.blocks, 2);
    }
}
