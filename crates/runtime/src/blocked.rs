//! Blocked connections: while a resource alarm is in effect (memory above
//! `vm_memory_high_watermark`, or free disk below `disk_free_limit`),
//! RabbitMQ stops reading from every connection that publishes and tells
//! it so with `connection.blocked`; `connection.unblocked` follows once the
//! alarm clears. lapin then holds back everything the connection would
//! write (publishes, acknowledgements, heartbeats) until it is unblocked,
//! so a publish waits rather than fails.
//!
//! [`BlockEvents`] reads these notices from a connection; [`log_blocked`]
//! turns them into one warning when a block starts and one line when it
//! ends, however many messages waited meanwhile.
//!
//! lapin hands each connection event to one listener only, so a
//! connection has at most one reader of its events.

use lapin::{Connection, Event};
use std::pin::Pin;
use std::time::Instant;
use tracing::{info, warn};

/// A change of a connection's blocked state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockEvent {
    /// The broker blocked the connection, for this reason (`low on
    /// memory`, `low on disk`).
    Blocked(String),
    /// The broker unblocked it.
    Unblocked,
}

/// The blocked and unblocked notices of one connection, in order.
pub struct BlockEvents {
    events: Pin<Box<dyn futures_core::Stream<Item = Event> + Send>>,
    status: lapin::ConnectionStatus,
}

impl std::fmt::Debug for BlockEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockEvents").finish_non_exhaustive()
    }
}

impl BlockEvents {
    /// Listens to `connection` (its only event listener: see the module
    /// documentation).
    pub fn new(connection: &Connection) -> Self {
        BlockEvents {
            events: Box::pin(connection.events_listener()),
            status: connection.status().clone(),
        }
    }

    /// The next notice; `None` once the connection failed or is gone (a
    /// channel's error is no end).
    pub async fn next(&mut self) -> Option<BlockEvent> {
        loop {
            let event = std::future::poll_fn(|cx| self.events.as_mut().poll_next(cx)).await?;
            match event {
                Event::ConnectionBlocked(reason) => return Some(BlockEvent::Blocked(reason)),
                Event::ConnectionUnblocked => return Some(BlockEvent::Unblocked),
                Event::Error(_) if self.status.errored() || self.status.closed() => return None,
                _ => {}
            }
        }
    }
}

/// Logs `connection`'s blocks in the background: a warning naming `who`
/// and the broker's reason when one starts, a line with its length when it
/// ends. Ends with the connection.
pub fn log_blocked(connection: &Connection, who: &'static str) {
    let mut events = BlockEvents::new(connection);
    tokio::spawn(async move {
        let mut since: Option<Instant> = None;
        while let Some(event) = events.next().await {
            match event {
                BlockEvent::Blocked(reason) => {
                    if since.is_none() {
                        since = Some(Instant::now());
                        warn!(
                            who,
                            reason,
                            "RabbitMQ blocked this connection (a resource alarm): its publishes wait until the alarm clears"
                        );
                    }
                }
                BlockEvent::Unblocked => {
                    if let Some(since) = since.take() {
                        info!(
                            who,
                            blocked_s = since.elapsed().as_secs_f64(),
                            "RabbitMQ unblocked this connection: publishing again"
                        );
                    }
                }
            }
        }
    });
}
