//! The client's RabbitMQ link: a publishing channel for the outbox, and a
//! consumer of the client's own event queue whose completion events are
//! applied to its futures ([`ClientInner::apply`]). When the link is lost
//! it is reopened, and the futures still pending are re-read from Redis.

use crate::error::{Error, Result};
use crate::inner::ClientInner;
use flotilla_proto::{Config, EventBatch, Names, Purpose};
use flotilla_runtime::transport::{self, name};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::warn;

/// How long one attempt to reopen the RabbitMQ link may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the event loop looks at its connection's state (see
/// [`event_loop`]).
const LINK_CHECK: Duration = Duration::from_secs(1);

/// How long acknowledging an event may take: on a connection that died
/// under it, lapin's acknowledgement may never complete (see
/// [`event_loop`]).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the client's RabbitMQ side: a connection, a publishing channel
/// with confirms, the namespace's topology, and a consumer of the client's
/// own event queue.
pub(crate) async fn open_link(
    config: &Config,
    names: &Names,
    id: &str,
) -> Result<(Connection, Channel, lapin::Consumer)> {
    let connection = transport::connect_amqp(
        &config.amqp_url,
        &format!("flotilla-client {id} ({})", names.namespace()),
    )
    .await?;
    // Submissions wait out a broker alarm (see `outbox`): say so once.
    flotilla_runtime::blocked::log_blocked(&connection, "client");
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    transport::declare_topology(&publish, names, config.queue_type).await?;
    let queue = names.client_queue(id);
    let exchange = names.events_exchange();
    transport::declare_private_queue(
        &publish,
        names,
        config.queue_type,
        &queue,
        Some((&exchange, &Names::client_binding(id))),
    )
    .await?;
    let consume = connection.create_channel().await?;
    consume.basic_qos(1024, BasicQosOptions::default()).await?;
    let consumer = consume
        .basic_consume(
            name(&queue),
            name(id),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, publish, consumer))
}

/// Applies completion events to this client's futures, and keeps the link
/// to RabbitMQ up: when the connection is lost (a broker restart, a network
/// cut), reconnects with growing pauses, hands the outbox the new channel
/// (it re-sends whatever the broker had not confirmed), and re-reads the
/// state of every pending future from Redis, since events published while
/// the link was down are lost.
pub(crate) async fn listen(mut consumer: lapin::Consumer, client: Weak<ClientInner>) {
    loop {
        event_loop(consumer, &client).await;
        let mut backoff = flotilla_runtime::supervise::Backoff::default();
        consumer = loop {
            let Some(inner) = client.upgrade() else {
                return;
            };
            if inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            // Bounded: a broker still booting may leave a step hanging.
            let opened = tokio::time::timeout(
                RECONNECT_TIMEOUT,
                open_link(&inner.config, &inner.names, &inner.id),
            )
            .await
            .unwrap_or_else(|_| {
                Err(Error::Config(format!(
                    "reopening the RabbitMQ link took over {RECONNECT_TIMEOUT:?}"
                )))
            });
            match opened {
                Ok((connection, publish, consumer)) => {
                    *inner.connection.lock().unwrap_or_else(|p| p.into_inner()) =
                        Arc::new(connection);
                    let _ = inner.channels.send(publish);
                    inner.resync().await;
                    tracing::info!(client = %inner.id, "reconnected to RabbitMQ");
                    break consumer;
                }
                Err(error) => {
                    let pause = backoff.next_pause();
                    warn!(%error, ?pause, "RabbitMQ is unreachable; retrying");
                    drop(inner);
                    tokio::time::sleep(pause).await;
                }
            }
        };
    }
}

/// Applies completion events to this client's futures until the consumer
/// ends, or its connection is found down.
///
/// After a broker restart (`CONNECTION_FORCED`, then a reset) the loop was
/// seen never to notice: the link was never reopened, and every future
/// still pending then waited forever. lapin does not always end a consumer
/// whose connection died, nor complete an acknowledgement sent on it. So
/// the connection's state is looked at every [`LINK_CHECK`] too, and an
/// acknowledgement that takes over [`ACK_TIMEOUT`] reopens the link.
async fn event_loop(mut consumer: lapin::Consumer, client: &Weak<ClientInner>) {
    let mut check = tokio::time::interval(LINK_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let delivery = tokio::select! {
            delivery = transport::next_delivery(&mut consumer) => delivery,
            _ = check.tick() => {
                let Some(client) = client.upgrade() else { break };
                let connection = client.connection.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // The publishing channel errs with its connection, also when
                // the connection's own state lags.
                let publishing = client.channels.borrow().status().connected();
                if connection.status().connected() && publishing {
                    continue;
                }
                warn!("the RabbitMQ connection is down but its consumer did not end: reopening the link");
                break;
            }
        };
        let Some(delivery) = delivery else { break };
        let Ok(delivery) = delivery else { break };
        let Some(client) = client.upgrade() else {
            break;
        };
        let opened = client.codec.open::<EventBatch>(
            Purpose::Events,
            &delivery.data,
            delivery.redelivered,
            &client.events_guard,
            client.config.max_payload + (1 << 20),
        );
        match opened {
            Ok(batch) => {
                for event in batch.events {
                    client.apply(event);
                }
                let acked = delivery.acker.ack(BasicAckOptions::default());
                if tokio::time::timeout(ACK_TIMEOUT, acked).await.is_err() {
                    warn!("acknowledging an event took over {ACK_TIMEOUT:?}: reopening the link");
                    break;
                }
            }
            Err(error) => {
                warn!(%error, "undecodable event dead-lettered");
                let rejected = delivery.acker.reject(BasicRejectOptions { requeue: false });
                if tokio::time::timeout(ACK_TIMEOUT, rejected).await.is_err() {
                    break;
                }
            }
        }
    }
}
