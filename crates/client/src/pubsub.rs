//! A faster copy of the completion events (issue 16, item 3): a worker
//! publishes each small batch of events for a client on the client's Redis
//! channel (`Names::client_events_channel`) as well as through the broker,
//! and Redis delivers it a RabbitMQ hop sooner.
//!
//! The broker's copy (`link.rs`) stays the one that counts: it is
//! confirmed, acknowledged, and sent again after a reconnection; a copy
//! lost here (no subscription yet, Redis restarting) costs only the time
//! the broker's takes. Only `Finished` events are taken from this copy: a
//! finished future never changes again, so whichever copy comes first
//! settles it and the other changes nothing (a failed one may be reset by
//! `Client::retry`, and must not be failed again by a late second copy).
//! This path has its own replay guard: the two copies carry the same nonce.

use crate::inner::ClientInner;
use flotilla_proto::{Event, EventBatch, Purpose};
use flotilla_runtime::supervise::Backoff;
use futures_core::Stream;
use std::pin::Pin;
use std::sync::Weak;
use std::time::Duration;
use tracing::debug;

/// How long connecting and subscribing may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a quiet subscription checks that its client is still there.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Follows the client's channel for as long as the client lives,
/// subscribing again after a failure (paced like the other reconnections).
///
/// On a Redis Cluster it subscribes on one node, the next seed node at each
/// attempt: a message published on any node reaches the subscribers of
/// every node (classic pub/sub crosses the cluster bus).
pub(crate) async fn follow(client: Weak<ClientInner>, url: String, channel: String) {
    let urls = match flotilla_proto::redis_target(&url) {
        Ok(flotilla_proto::RedisTarget::Cluster(seeds)) => seeds,
        _ => vec![url],
    };
    let mut backoff = Backoff::default();
    let mut attempt = 0;
    while client.strong_count() > 0 {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        match subscribe(url, &channel).await {
            Ok(mut pubsub) => {
                backoff = Backoff::default();
                let mut messages = pubsub.on_message();
                loop {
                    let next = std::future::poll_fn(|cx| Pin::new(&mut messages).poll_next(cx));
                    let message = match tokio::time::timeout(CHECK_EVERY, next).await {
                        Ok(Some(message)) => message,
                        // The connection ended: subscribe again.
                        Ok(None) => break,
                        Err(_) if client.strong_count() == 0 => return,
                        Err(_) => continue,
                    };
                    let Some(client) = client.upgrade() else {
                        return;
                    };
                    apply(&client, message.get_payload_bytes());
                }
            }
            Err(error) => debug!(%error, "subscribing to the completion channel failed"),
        }
        tokio::time::sleep(backoff.next_pause()).await;
    }
}

async fn subscribe(url: &str, channel: &str) -> redis::RedisResult<redis::aio::PubSub> {
    let subscribed = async {
        let mut pubsub = redis::Client::open(url)?.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    };
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribed).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "subscribing timed out",
        ))),
    }
}

/// Applies a batch that opens; anything else is dropped (the broker's copy
/// is checked, and dead-lettered if need be, by the link).
fn apply(client: &ClientInner, bytes: &[u8]) {
    match client.codec.open::<EventBatch>(
        Purpose::Events,
        bytes,
        false,
        &client.fast_events_guard,
        client.config.max_payload + (1 << 20),
    ) {
        Ok(batch) => {
            // Only results: a failure comes once, through the broker. A
            // second copy of it could fail a future again after
            // `Client::retry` reset it.
            for event in batch.events {
                if matches!(event, Event::Finished { .. }) {
                    client.apply(event);
                }
            }
        }
        Err(error) => debug!(%error, "a completion batch from Redis did not open"),
    }
}
