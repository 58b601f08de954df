//! The worker-event tap: while someone watches (a request for `/`,
//! `/api/status`, `/api/workers` or `/metrics` in the last five minutes), a
//! private queue `<ns>.monitor.<id>` bound to `<ns>.events` the way the
//! scheduler's own queue is. Its events give each worker's throughput, the
//! tasks it is running and the run-time histogram. With nobody watching
//! there is no tap, so an unwatched scheduler does not pay for a second
//! copy of the events.

use super::probes::{within, IO_TIMEOUT};
use super::Shared;
use flotilla_proto::{EventBatch, Names};
use flotilla_runtime::transport::{self, name};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info, warn};

/// Taps the worker events while someone watches.
pub(super) async fn tap_loop(shared: Arc<Shared>) {
    loop {
        while !shared.is_watched() {
            shared.wake_tap.notified().await;
        }
        let stopped = tap(&shared).await;
        let failed = stopped.is_err();
        if let Err(error) = &stopped {
            warn!(%error, "event tap for the dashboard failed; retrying in 5 s");
        }
        shared.monitor().tap_stopped(stopped.err());
        if failed {
            tokio::time::sleep(IO_TIMEOUT).await;
        }
    }
}

/// One run of the event tap: until nobody watched for [`WATCH_WINDOW`](super::WATCH_WINDOW)
/// (`Ok`) or the broker failed (`Err`).
async fn tap(shared: &Shared) -> Result<(), String> {
    let names = &shared.names;
    let label = format!("flotilla-scheduler-monitor ({})", names.namespace());
    let connection = within(transport::connect_amqp(&shared.amqp_url, &label)).await?;
    let result = async {
        let channel = within(connection.create_channel()).await?;
        // The events exchange may not exist yet if the scheduler is starting.
        within(transport::declare_topology(&channel, names, shared.queue_type)).await?;
        let queue = format!(
            "{}.monitor.{}",
            names.namespace(),
            &flotilla_proto::new_id()[..12]
        );
        // Exclusive and auto-deleted: gone with the tap. No length limit and
        // no TTL, so nothing is ever dead-lettered from it; the consumer
        // takes messages without acknowledgements as they come.
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        within(channel.queue_declare(name(&queue), options, FieldTable::default())).await?;
        within(channel.queue_bind(
            name(&queue),
            name(&names.events_exchange()),
            name(Names::SCHEDULER_BINDING),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        let mut consumer = within(channel.basic_consume(
            name(&queue),
            name("monitor"),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ))
        .await?;
        {
            let mut monitor = shared.monitor();
            monitor.tap.active = true;
            monitor.tap.since = Some(SystemTime::now());
            monitor.tap.error = None;
        }
        info!(queue, "dashboard watching: tapping worker events");
        let mut check = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                delivery = transport::next_delivery(&mut consumer) => match delivery {
                    Some(Ok(delivery)) => {
                        let batch = shared.codec.decode::<EventBatch>(
                            flotilla_proto::Purpose::Events,
                            &delivery.data,
                            shared.max_payload + (1 << 20),
                        );
                        match batch {
                            Ok(batch) => shared.monitor().on_events(batch, Instant::now()),
                            Err(error) => debug!(%error, "undecodable event batch ignored by the tap"),
                        }
                    }
                    Some(Err(error)) => return Err(error.to_string()),
                    None => return Err("the broker cancelled the tap".to_owned()),
                },
                _ = check.tick() => {
                    if !shared.is_watched() {
                        info!("nobody watching: event tap stopped");
                        let _ = channel.close(200, name("nobody watching")).await;
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    transport::close(&connection, "nobody watching").await;
    result
}
