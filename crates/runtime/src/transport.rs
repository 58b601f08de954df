//! Connecting to RabbitMQ and Redis, and declaring a namespace's topology.
//!
//! Every process declares what it uses (declarations are idempotent), so
//! any of them may start first.

use crate::redis_conn::Redis;
use flotilla_proto::{Names, QueueType};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How long a client's or worker's own queue outlives its owner's
/// connection, so that a process that reconnects in time finds its messages.
pub const PRIVATE_QUEUE_EXPIRY_MS: i64 = 60_000;

/// The node of a RabbitMQ cluster's URL list that was connected to last:
/// the process's next connection (a reconnect, another of its connections)
/// tries it first, then the others in turn. Before the first, none
/// (`usize::MAX`): a process starts at the node its process id picks, so
/// that a cluster's processes spread over its nodes.
static LAST_NODE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Opens a RabbitMQ connection named `name` (shown in the management UI)
/// to the broker at `url`, or to one node of a cluster when `url` lists
/// several, separated by commas.
///
/// The nodes are tried in turn, from the one that answered last, until one
/// accepts: a node that is down refuses at once, and the next is tried. The
/// error of the last one is returned when none does.
pub async fn connect_amqp(url: &str, name: &str) -> lapin::Result<Connection> {
    let urls = flotilla_proto::amqp_urls(url);
    if urls.len() <= 1 {
        return connect_node(urls.first().copied().unwrap_or(url), name).await;
    }
    let start = match LAST_NODE.load(Ordering::Relaxed) {
        usize::MAX => std::process::id() as usize % urls.len(),
        last => last,
    };
    let mut failed = None;
    for turn in 0..urls.len() {
        let index = (start + turn) % urls.len();
        match connect_node(urls[index], name).await {
            Ok(connection) => {
                LAST_NODE.store(index, Ordering::Relaxed);
                return Ok(connection);
            }
            Err(error) => {
                tracing::warn!(node = %node_address(urls[index]), %error, "RabbitMQ node unreachable; trying the next");
                failed = Some(error);
            }
        }
    }
    Err(failed.expect("at least two nodes were tried"))
}

/// `host:port` of an AMQP URL, for logs (the URL itself may carry
/// credentials).
pub fn node_address(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// Opens a RabbitMQ connection named `name` to one broker node.
///
/// A refused port is reported at once. A server that accepts the
/// connection but does not answer the AMQP handshake within
/// [`SLOW_HANDSHAKE`] is asked what it is: a Redis (which silently waits
/// for more of what it takes for a command) is reported at once, naming the
/// likely mistake, rather than after [`AMQP_CONNECT_TIMEOUT`].
async fn connect_node(url: &str, name: &str) -> lapin::Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    let connecting = Connection::connect(url, properties);
    tokio::pin!(connecting);
    tokio::select! {
        connected = &mut connecting => return connected,
        () = tokio::time::sleep(SLOW_HANDSHAKE) => {}
    }
    let plain = url
        .parse::<lapin::uri::AMQPUri>()
        .ok()
        .filter(|uri| uri.scheme == lapin::uri::AMQPScheme::AMQP);
    if let Some(uri) = plain {
        let address = format!("{}:{}", uri.authority.host, uri.authority.port);
        let identify = identify_server(&address);
        tokio::pin!(identify);
        tokio::select! {
            connected = &mut connecting => return connected,
            peer = &mut identify => {
                if let Some(message) = wrong_server_for_amqp(&address, peer) {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, message).into());
                }
            }
        }
    }
    // A broker that is still booting may accept the TCP connection and
    // never finish the handshake: give up and let the caller retry.
    let rest = AMQP_CONNECT_TIMEOUT.saturating_sub(SLOW_HANDSHAKE);
    match tokio::time::timeout(rest, connecting).await {
        Ok(connected) => connected,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("RabbitMQ did not complete the connection within {AMQP_CONNECT_TIMEOUT:?}"),
        )
        .into()),
    }
}

/// The AMQP heartbeat (seconds) workers ask for unless told otherwise:
/// RabbitMQ closes a connection that misses two heartbeats in a row, so a
/// stopped (`SIGSTOP`ped, swapped-out, frozen) worker's unacknowledged
/// deliveries go back to the queue within about twice this, instead of
/// twice the broker's 60 s default.
pub const WORKER_HEARTBEAT_SECS: u16 = 10;

/// `url` asking for an AMQP heartbeat of `seconds` (lapin then takes the
/// lower of it and the broker's); each URL of a list. A `heartbeat` already
/// in a URL's query is kept: what an operator wrote there wins. `0` leaves
/// `url` as is (the broker's value).
pub fn with_heartbeat(url: &str, seconds: u16) -> String {
    if seconds == 0 {
        return url.to_owned();
    }
    let urls = flotilla_proto::amqp_urls(url);
    if urls.len() > 1 {
        return urls
            .iter()
            .map(|url| with_heartbeat(url, seconds))
            .collect::<Vec<_>>()
            .join(",");
    }
    let query = url.split_once('?').map_or("", |(_, query)| query);
    if query
        .split('&')
        .any(|pair| pair.split('=').next() == Some("heartbeat"))
    {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}heartbeat={seconds}")
}

/// How long opening a RabbitMQ connection may take.
pub const AMQP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long an AMQP handshake may take before the server is asked what it
/// is (a RabbitMQ answers within milliseconds).
pub const SLOW_HANDSHAKE: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a Redis reply may take before the connection counts as broken.
pub const REDIS_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long opening one Redis connection may take.
pub const REDIS_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens a Redis connection that reconnects by itself: to one server, or
/// to a Redis Cluster when `url` names one (`redis+cluster://h1:p1,h2:p2`,
/// see [`flotilla_proto::RedisTarget`]).
///
/// The first connection is tried once: a refused port, a server that is
/// not Redis or refused credentials are reported at once (a process that
/// starts without its Redis fails clearly, and one that lost it after
/// starting retries on its own schedule, see [`crate::supervise`]). Once
/// connected, the manager reconnects by itself, with growing pauses, when
/// Redis restarts. A plain URL that reaches a cluster node, or a cluster
/// URL that reaches a plain server, is refused naming the setting.
///
/// `TCP_NODELAY` is on: the connection is multiplexed, and with Nagle's
/// algorithm a small request written while an earlier reply is outstanding
/// would wait for that reply's acknowledgement before leaving.
pub async fn connect_redis(url: &str) -> redis::RedisResult<Redis> {
    let target = flotilla_proto::redis_target(url).map_err(|error| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "invalid Redis URL",
            error.to_string(),
        ))
    })?;
    match target {
        flotilla_proto::RedisTarget::Single(url) => connect_single(&url).await,
        flotilla_proto::RedisTarget::Cluster(seeds) => connect_cluster(&seeds).await,
    }
}

/// The parts of a Redis URL that the first connection needs: the client
/// with `TCP_NODELAY` on, and `host:port` and whether it is plain (not
/// TLS), when over TCP.
type Opened = (redis::Client, Option<(String, bool)>);

/// Opens a client for `url` (no connection yet).
fn open_client(url: &str) -> redis::RedisResult<Opened> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let address = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => Some((format!("{host}:{port}"), true)),
        redis::ConnectionAddr::TcpTls { host, port, .. } => Some((format!("{host}:{port}"), false)),
        _ => None,
    };
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    Ok((redis::Client::open(info.set_tcp_settings(tcp))?, address))
}

/// One plain first connection to `client`, explained if it fails; returns
/// whether the server there is a Redis Cluster node.
async fn first_contact(
    client: &redis::Client,
    address: Option<(String, bool)>,
) -> redis::RedisResult<bool> {
    let first = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_CONNECT_TIMEOUT));
    let mut connection = match client
        .get_multiplexed_async_connection_with_config(&first)
        .await
    {
        Ok(connection) => connection,
        Err(error) => return Err(explain_redis_failure(error, address).await),
    };
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut connection)
        .await?;
    Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1"))
}

/// A refusal of the URL given, naming the setting.
fn wrong_kind(message: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "wrong kind of Redis for FLOTILLA_REDIS_URL",
        message,
    ))
}

async fn connect_single(url: &str) -> redis::RedisResult<Redis> {
    let (client, address) = open_client(url)?;
    let where_ = address
        .as_ref()
        .map_or_else(|| url.to_owned(), |(a, _)| a.clone());
    // The connection manager retries its first connection for several
    // seconds; one plain attempt first reports what is wrong at once.
    if first_contact(&client, address).await? {
        return Err(wrong_kind(format!(
            "{where_} is a Redis Cluster node: set FLOTILLA_REDIS_URL (--redis-url) to \
             redis+cluster://host:port,host:port (some of its nodes)"
        )));
    }
    // The default 500 ms reply timeout is far too short: a pipeline of
    // 10,000 submissions, or a 100 MB result, takes longer on a busy Redis,
    // and a caller that sees a timeout cannot know the commands still ran
    // (a client's outbox would drop submissions whose specs and holds are
    // already stored, and its futures would wait forever).
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_REPLY_TIMEOUT));
    let manager = redis::aio::ConnectionManager::new_with_config(client, config).await?;
    Ok(Redis::Single(manager))
}

/// Connects to a Redis Cluster through its seed nodes: each is tried in
/// turn until one answers (every failure is reported if none does), and
/// it must be a cluster node. The connection then learns the slot map,
/// reads and writes masters only, and retries through a failover (see
/// [`crate::redis_conn::CLUSTER_RETRIES`]) within
/// [`crate::redis_conn::CLUSTER_REPLY_TIMEOUT`].
async fn connect_cluster(seeds: &[String]) -> redis::RedisResult<Redis> {
    let mut failures = Vec::new();
    let mut infos = Vec::new();
    let mut answered = false;
    for seed in seeds {
        let (client, address) = open_client(seed)?;
        infos.push(client.get_connection_info().clone());
        if answered {
            continue;
        }
        let where_ = address
            .as_ref()
            .map_or_else(|| seed.clone(), |(a, _)| a.clone());
        match first_contact(&client, address).await {
            Ok(true) => answered = true,
            Ok(false) => {
                return Err(wrong_kind(format!(
                    "{where_} is a single Redis server, not a Redis Cluster node: set \
                     FLOTILLA_REDIS_URL (--redis-url) to redis://host:port for one server"
                )))
            }
            Err(error) => failures.push(error.to_string()),
        }
    }
    if !answered {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "no seed node of the Redis Cluster answered: {}",
                failures.join("; ")
            ),
        )
        .into());
    }
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let client = redis::cluster::ClusterClientBuilder::new(infos)
        .connection_timeout(REDIS_CONNECT_TIMEOUT)
        .response_timeout(crate::redis_conn::CLUSTER_ATTEMPT_TIMEOUT)
        .overall_response_timeout(Some(crate::redis_conn::CLUSTER_REPLY_TIMEOUT))
        .retries(crate::redis_conn::CLUSTER_RETRIES)
        .min_retry_wait(crate::redis_conn::CLUSTER_RETRY_MIN_MS)
        .max_retry_wait(crate::redis_conn::CLUSTER_RETRY_MAX_MS)
        .tcp_settings(tcp)
        .build()?;
    let connection = client.get_async_connection().await?;
    Ok(Redis::Cluster(std::sync::Arc::new(
        crate::redis_conn::ClusterLink::new(client, connection),
    )))
}

/// Adds what is known to a failed first connection to Redis: the address
/// that refused it, or that the server there is not Redis. `address` is
/// `host:port` and whether the connection is plain (not TLS), when over TCP.
async fn explain_redis_failure(
    error: redis::RedisError,
    address: Option<(String, bool)>,
) -> redis::RedisError {
    let Some((address, plain)) = address else {
        return error;
    };
    if error.is_connection_refusal() {
        return std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "nothing listens at {address}: is Redis running there, and is FLOTILLA_REDIS_URL \
                 (--redis-url) right? ({error})"
            ),
        )
        .into();
    }
    if !plain || error.is_timeout() || matches!(error.kind(), redis::ErrorKind::Server(_)) {
        return error;
    }
    // Another kind of server answers in a way the Redis protocol cannot
    // parse, or hangs up: ask it what it is.
    let message = match identify_server(&address).await {
        Peer::Amqp => format!(
            "{address} answered, but it is not a Redis server: it speaks AMQP — is \
             FLOTILLA_REDIS_URL (--redis-url) pointing at RabbitMQ's port {}? Redis listens on \
             6379 by default",
            port_of(&address)
        ),
        Peer::Other => format!(
            "{address} answered, but it is not a Redis server — is FLOTILLA_REDIS_URL \
             (--redis-url) pointing at another service? ({})",
            error.to_string().lines().next().unwrap_or_default()
        ),
        Peer::Redis | Peer::Silent => return error,
    };
    std::io::Error::new(std::io::ErrorKind::InvalidData, message).into()
}

/// The message for an AMQP URL that reached `peer`, when that is not a
/// RabbitMQ.
fn wrong_server_for_amqp(address: &str, peer: Peer) -> Option<String> {
    match peer {
        Peer::Redis => Some(format!(
            "{address} answered, but it is not RabbitMQ: it speaks the Redis protocol — is \
             FLOTILLA_AMQP_URL (--amqp-url) pointing at Redis's port {}? RabbitMQ listens on \
             5672 by default",
            port_of(address)
        )),
        Peer::Amqp | Peer::Other | Peer::Silent => None,
    }
}

fn port_of(address: &str) -> &str {
    address.rsplit(':').next().unwrap_or(address)
}

/// What kind of server listens at an address, judged by its answer to a
/// Redis `PING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Answered in the Redis protocol (`+PONG`, or an error such as `-NOAUTH`).
    Redis,
    /// Answered with the AMQP protocol header (RabbitMQ refusing the bytes).
    Amqp,
    /// Answered something else.
    Other,
    /// Did not answer in time, or could not be reached.
    Silent,
}

/// Sends a Redis `PING` to `address` over plain TCP and judges the answer
/// (within a second).
async fn identify_server(address: &str) -> Peer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PROBE: std::time::Duration = std::time::Duration::from_secs(1);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        // In the Redis protocol's own framing: 14 bytes, so that a server
        // that waits for a whole 8-byte AMQP header before answering has it.
        stream.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
        let mut answer = [0u8; 8];
        let mut read = 0;
        while read < answer.len() {
            match stream.read(&mut answer[read..]).await? {
                0 => break,
                n => read += n,
            }
            if answer[..read].starts_with(b"+") || answer[..read].starts_with(b"-") {
                break;
            }
        }
        std::io::Result::Ok(answer[..read].to_vec())
    };
    match tokio::time::timeout(PROBE, exchange).await {
        Ok(Ok(answer)) => judge_answer(&answer),
        _ => Peer::Silent,
    }
}

fn judge_answer(answer: &[u8]) -> Peer {
    match answer.first() {
        None => Peer::Silent,
        Some(b'+' | b'-') => Peer::Redis,
        Some(_) if answer.starts_with(b"AMQP") => Peer::Amqp,
        Some(_) => Peer::Other,
    }
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

/// `args` with `x-queue-type` set to `kind`: the arguments of a shared,
/// durable queue of the namespace. Classic queues are declared without it,
/// as before, so that queues declared by earlier versions stay equivalent.
pub fn typed(mut args: FieldTable, kind: QueueType) -> FieldTable {
    if kind != QueueType::Classic {
        args.insert(
            short("x-queue-type"),
            AMQPValue::LongString(LongString::from(kind.as_str())),
        );
    }
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
        .map_err(|error| {
            // The broker's words name the argument, not the setting.
            if error
                .to_string()
                .contains("inequivalent arg 'x-queue-type'")
            {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{error} — the namespace's queues were declared with another \
                         FLOTILLA_QUEUE_TYPE: every process of a namespace needs the same \
                         (classic or quorum; docs/operations.md, \"Run it on a cluster\")"
                    ),
                )
                .into()
            } else {
                error
            }
        })
}

/// Declares the exchanges and shared queues of a namespace: the events
/// exchange, the dead-letter exchange and queue, the shared task queue, and
/// the scheduler's two queues; the queues of type `kind` (every process of
/// a namespace must give the same: RabbitMQ refuses a queue declared again
/// with another type, `PRECONDITION_FAILED`).
pub async fn declare_topology(
    channel: &Channel,
    names: &Names,
    kind: QueueType,
) -> lapin::Result<()> {
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
    declare_queue(
        channel,
        &names.dead_letter_queue(),
        typed(FieldTable::default(), kind),
    )
    .await?;
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
        declare_queue(channel, &queue, typed(queue_arguments(names), kind)).await?;
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
/// `names.worker_queue(..)`) of type `kind`, optionally bound to an
/// exchange (`(exchange, binding key)`).
///
/// Of the namespace's type too: a durable classic queue lives on one node
/// of a cluster, and while that node is down it can be declared on no
/// other (`NOT_FOUND`, its home node is down), so its owner, reconnected to
/// another node, would have no queue; a quorum queue is on every node.
/// It expires all the same a while after its owner is gone (`x-expires`,
/// which quorum queues keep).
pub async fn declare_private_queue(
    channel: &Channel,
    names: &Names,
    kind: QueueType,
    queue: &str,
    binding: Option<(&str, &str)>,
) -> lapin::Result<()> {
    declare_queue(channel, queue, typed(private_queue_arguments(names), kind)).await?;
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
    redis: &mut Redis,
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
pub async fn delete_redis_keys(redis: &mut Redis, names: &Names) -> redis::RedisResult<u64> {
    let mut deleted = 0;
    let mut pages = redis.scan(names.redis_pattern());
    while let Some(keys) = pages.next_page().await? {
        // On a cluster, the connection splits the UNLINK per slot.
        if !keys.is_empty() {
            deleted += redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<u64>(redis)
                .await?;
        }
    }
    Ok(deleted)
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
/// worth retrying once Redis is back (on a cluster: a failover under way,
/// `CLUSTERDOWN`, `MASTERDOWN`, or no connection to the slot's node yet).
pub fn is_connection_error(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::Server(
                    redis::ServerErrorKind::BusyLoading
                        | redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::MasterDown
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

/// How long closing a RabbitMQ connection may take: a broker that never
/// answers `connection.close-ok` must not keep a stopping process alive.
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long [`close`] lets the channels dropped just before it close
/// first. lapin closes a dropped channel from a task of its own, which
/// fails with "invalid channel state: Closing" and logs it as a connection
/// ERROR when the connection began closing in between: every graceful stop
/// used to log one (the consumers' channels go as the process stops).
pub const CHANNEL_SETTLE: std::time::Duration = std::time::Duration::from_millis(50);

/// Closes `connection` with `reason`, giving up after [`CLOSE_TIMEOUT`]
/// (the socket then goes with the connection). A connection already closed
/// or closing counts as closed.
pub async fn close(connection: &Connection, reason: &str) {
    tokio::time::sleep(CHANNEL_SETTLE).await;
    match tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, name(reason))).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, reason, "closing a RabbitMQ connection"),
        Err(_) => tracing::warn!(
            reason,
            timeout = ?CLOSE_TIMEOUT,
            "RabbitMQ did not confirm closing the connection; dropping it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_asked_for_unless_the_url_names_one() {
        let base = "amqp://guest:guest@127.0.0.1:5672/%2f";
        assert_eq!(with_heartbeat(base, 10), format!("{base}?heartbeat=10"));
        assert_eq!(
            with_heartbeat(&format!("{base}?frame_max=8192"), 5),
            format!("{base}?frame_max=8192&heartbeat=5")
        );
        let chosen = format!("{base}?heartbeat=30");
        assert_eq!(with_heartbeat(&chosen, 10), chosen, "the operator's wins");
        assert_eq!(with_heartbeat(base, 0), base, "0: the broker's value");
        let parsed: lapin::uri::AMQPUri = with_heartbeat(base, 7).parse().unwrap();
        assert_eq!(parsed.query.heartbeat, Some(7));
    }

    #[test]
    fn every_node_of_a_list_asks_for_the_heartbeat() {
        let list = "amqp://a:5672/%2f, amqp://b:5673/%2f?heartbeat=30,";
        assert_eq!(
            with_heartbeat(list, 10),
            "amqp://a:5672/%2f?heartbeat=10,amqp://b:5673/%2f?heartbeat=30"
        );
        assert_eq!(node_address("amqp://u:secret@h:5673/%2f"), "h:5673");
    }

    #[test]
    fn only_quorum_queues_name_their_type() {
        assert!(typed(FieldTable::default(), QueueType::Classic)
            .inner()
            .is_empty());
        let quorum = typed(FieldTable::default(), QueueType::Quorum);
        assert_eq!(
            quorum.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString(LongString::from("quorum")))
        );
    }

    #[tokio::test]
    async fn a_list_is_tried_in_turn_until_a_node_answers() {
        // A port nothing listens on, then the test's RabbitMQ.
        let dead = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap().port()
        };
        let live = std::env::var("FLOTILLA_AMQP_URL")
            .unwrap_or_else(|_| flotilla_proto::DEFAULT_AMQP_URL.to_owned());
        let list = format!("amqp://guest:guest@127.0.0.1:{dead}/%2f,{live}");
        let connection = connect_amqp(&list, "list test").await.unwrap();
        assert!(connection.status().connected());
        close(&connection, "done").await;
        let none = format!(
            "amqp://guest:guest@127.0.0.1:{dead}/%2f,amqp://guest:guest@127.0.0.1:{dead}/%2f"
        );
        assert!(connect_amqp(&none, "list test").await.is_err());
    }

    #[test]
    fn answers_to_a_ping_name_the_server() {
        assert_eq!(judge_answer(b"+PONG\r\n"), Peer::Redis);
        assert_eq!(judge_answer(b"-NOAUTH"), Peer::Redis);
        assert_eq!(judge_answer(b"AMQP\x00\x00\x09\x01"), Peer::Amqp);
        assert_eq!(judge_answer(b"HTTP/1.1"), Peer::Other);
        assert_eq!(judge_answer(b""), Peer::Silent);
        assert!(wrong_server_for_amqp("h:6379", Peer::Redis)
            .unwrap()
            .contains("pointing at Redis's port 6379"));
        assert_eq!(wrong_server_for_amqp("h:5672", Peer::Amqp), None);
    }
}
