//! Connecting to RabbitMQ and Redis, and declaring a namespace's topology.
//!
//! Every process declares what it uses (declarations are idempotent), so
//! any of them may start first.

use flotilla_proto::Names;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use std::pin::Pin;

/// How long a client's or worker's own queue outlives its owner's
/// connection, so that a process that reconnects in time finds its messages.
pub const PRIVATE_QUEUE_EXPIRY_MS: i64 = 60_000;

/// Opens a RabbitMQ connection named `name` (shown in the management UI).
pub async fn connect_amqp(url: &str, name: &str) -> lapin::Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    // A broker that is still booting may accept the TCP connection and
    // never finish the handshake: give up and let the caller retry.
    match tokio::time::timeout(AMQP_CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(connected) => connected,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("RabbitMQ did not complete the connection within {AMQP_CONNECT_TIMEOUT:?}"),
        )
        .into()),
    }
}

/// How long opening a RabbitMQ connection may take.
pub const AMQP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a Redis reply may take before the connection counts as broken.
pub const REDIS_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens a Redis connection that reconnects by itself.
///
/// `TCP_NODELAY` is on: the connection is multiplexed, and with Nagle's
/// algorithm a small request written while an earlier reply is outstanding
/// would wait for that reply's acknowledgement before leaving.
pub async fn connect_redis(url: &str) -> redis::RedisResult<redis::aio::ConnectionManager> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    let client = redis::Client::open(info.set_tcp_settings(tcp))?;
    // The default 500 ms reply timeout is far too short: a pipeline of
    // 10,000 submissions, or a 100 MB result, takes longer on a busy Redis,
    // and a caller that sees a timeout cannot know the commands still ran
    // (a client's outbox would drop submissions whose specs and holds are
    // already stored, and its futures would wait forever).
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
        .set_response_timeout(Some(REDIS_REPLY_TIMEOUT));
    redis::aio::ConnectionManager::new_with_config(client, config).await
}

fn short(s: &str) -> ShortString {
    ShortString::from(s.to_owned())
}

/// Queue arguments shared by the namespace's queues: rejected messages go
/// to the namespace's dead-letter exchange.
pub fn queue_arguments(names: &Names) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        short("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from(names.dead_letter_exchange())),
    );
    args
}

/// Arguments of a process's own queue: dead-lettering, and expiry a while
/// after its owner is gone.
pub fn private_queue_arguments(names: &Names) -> FieldTable {
    let mut args = queue_arguments(names);
    args.insert(
        short("x-expires"),
        AMQPValue::LongLongInt(PRIVATE_QUEUE_EXPIRY_MS),
    );
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short(name), options, args)
        .await
        .map(drop)
}

/// Declares the exchanges and shared queues of a namespace: the events
/// exchange, the dead-letter exchange and queue, the shared task queue, and
/// the scheduler's two queues.
pub async fn declare_topology(channel: &Channel, names: &Names) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short(&names.dead_letter_exchange()),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            short(&names.control_exchange()),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            short(&names.events_exchange()),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    declare_queue(channel, &names.dead_letter_queue(), FieldTable::default()).await?;
    channel
        .queue_bind(
            short(&names.dead_letter_queue()),
            short(&names.dead_letter_exchange()),
            short(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for queue in [
        names.tasks_queue(),
        names.scheduler_queue(),
        names.scheduler_events_queue(),
    ] {
        declare_queue(channel, &queue, queue_arguments(names)).await?;
    }
    channel
        .queue_bind(
            short(&names.scheduler_events_queue()),
            short(&names.events_exchange()),
            short(Names::SCHEDULER_BINDING),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declares a process's own queue (`names.client_queue(..)` or
/// `names.worker_queue(..)`), optionally bound to an exchange
/// (`(exchange, binding key)`).
pub async fn declare_private_queue(
    channel: &Channel,
    names: &Names,
    queue: &str,
    binding: Option<(&str, &str)>,
) -> lapin::Result<()> {
    declare_queue(channel, queue, private_queue_arguments(names)).await?;
    if let Some((exchange, key)) = binding {
        channel
            .queue_bind(
                short(queue),
                short(exchange),
                short(key),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Deletes a namespace's shared queues and exchanges and every Redis key
/// under it. Private queues of live processes are left to expire.
pub async fn purge_namespace(
    channel: &Channel,
    redis: &mut redis::aio::ConnectionManager,
    names: &Names,
) -> Result<(), PurgeError> {
    for queue in [
        names.tasks_queue(),
        names.scheduler_queue(),
        names.scheduler_events_queue(),
        names.dead_letter_queue(),
    ] {
        channel
            .queue_delete(short(&queue), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [
        names.events_exchange(),
        names.dead_letter_exchange(),
        names.control_exchange(),
    ] {
        channel
            .exchange_delete(short(&exchange), ExchangeDeleteOptions::default())
            .await?;
    }
    delete_redis_keys(redis, names).await?;
    Ok(())
}

/// Deletes every Redis key of the namespace.
pub async fn delete_redis_keys(
    redis: &mut redis::aio::ConnectionManager,
    names: &Names,
) -> redis::RedisResult<u64> {
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(names.redis_pattern())
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            deleted += redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<u64>(redis)
                .await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Why purging a namespace failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PurgeError {
    /// RabbitMQ refused or failed.
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    /// Redis refused or failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Properties of a message that must survive a broker restart.
pub fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Whether a Redis error means the connection (not the command) failed:
/// worth retrying once Redis is back.
pub fn is_connection_error(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading | redis::ServerErrorKind::TryAgain
            )
        )
}

/// How long a Redis that stopped answering is waited for before a read
/// fails (30 s): long enough for a restart, short enough that a dead Redis
/// becomes a clear error rather than a hang.
pub const REDIS_OUTAGE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `query` again, with growing pauses, while it fails because the
/// connection to Redis is lost (a restarting Redis; the connection manager
/// reconnects), for up to [`REDIS_OUTAGE`]; `what` names it in the log.
/// Any other outcome is returned as it is.
pub async fn retry_while_unreachable<T, F, Fut>(what: &str, mut query: F) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let deadline = tokio::time::Instant::now() + REDIS_OUTAGE;
    let mut backoff = crate::supervise::Backoff::default();
    loop {
        match query().await {
            Err(error) if is_connection_error(&error) && tokio::time::Instant::now() < deadline => {
                let pause = backoff.next_pause();
                tracing::warn!(%error, ?pause, what, "Redis is unreachable; retrying");
                tokio::time::sleep(pause).await;
            }
            outcome => return outcome,
        }
    }
}

/// Properties of a message that need not survive a broker restart
/// (events: state is re-read from Redis after a restart).
pub fn transient() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(1)
}

/// The next delivery of a consumer; `None` once it is cancelled or closed.
pub async fn next_delivery(
    consumer: &mut Consumer,
) -> Option<lapin::Result<lapin::message::Delivery>> {
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut *consumer), cx)).await
}

/// `ShortString` from a `&str`, for lapin's name parameters.
pub fn name(s: &str) -> ShortString {
    short(s)
}
