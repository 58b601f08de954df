//! Coordination primitives shared by every client and task of a cluster:
//! [`Variable`], [`Queue`], [`Lock`], [`Event`] and [`Semaphore`].
//!
//! Each is a small Redis structure under the namespace, addressed by name:
//! two handles with the same name, in any process of the cluster (a client,
//! or a task through [`TaskContextExt::client`](crate::TaskContextExt::client)),
//! are the same primitive. Read-modify-write steps run as Lua scripts, so
//! they are atomic; all keys of one primitive share a Redis Cluster hash tag
//! (`<ns>:{lock:name}:...`).
//!
//! Waiting never polls. A waiter registers itself atomically with its check
//! of the state, then blocks on a wake-up list of its own (`BLPOP` on a
//! dedicated pooled connection, never on the client's shared one); whoever
//! changes the state pushes to every registered waiter's list in the same
//! script. A wake-up pushed while the waiter was between commands or
//! reconnecting is not lost — it stays in the list — and every wake-up and
//! every reconnection is followed by a fresh check of the state. Holders of
//! a [`Lock`] or a [`Semaphore`] lease renew it in the background; a waiter
//! sleeps at most until the current lease would expire, so a dead holder's
//! lease is taken over as soon as it lapses.
//!
//! Values travel as MessagePack (`rmp-serde`, named fields), so any
//! `Serialize + DeserializeOwned` type works — including
//! [`TaskFuture`](crate::TaskFuture)s anywhere inside a [`Variable`]'s value or a
//! [`Queue`]'s item: the primitive holds their results while it holds the
//! value, and a reader gets futures of its own client.
//!
//! Synchronous programs use the [`blocking`] flavours, built from a
//! [`crate::blocking::Client`].
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! # async fn demo() -> flotilla::Result<()> {
//! let client = Client::from_env().await?;
//! let jobs: Queue<String> = Queue::new(&client, "jobs");
//! jobs.put(&"resize cat.png".to_owned()).await?;
//! let lock = Lock::new(&client, "thumbnails");
//! {
//!     let _guard = lock.lock().await?;          // released on drop
//!     let job = jobs.get_timeout(Duration::from_secs(1)).await?;
//!     println!("{job}");
//! }
//! # Ok(()) }
//! ```

pub mod blocking;
pub mod event;
pub(crate) mod held;
mod lease;
pub mod lock;
pub mod queue;
pub mod semaphore;
pub mod variable;

pub use event::Event;
pub use lock::{Lock, LockGuard};
pub use queue::Queue;
pub use semaphore::{Semaphore, SemaphorePermit};
pub use variable::Variable;
// Defined with the client's other errors; named here, with the primitives.
pub use crate::error::SyncError;

use crate::client::Client;
use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::time::Instant;

/// The lease of a [`Lock`] or a [`Semaphore`] lease unless set otherwise:
/// how long it outlives a holder that stopped renewing it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The shortest lease accepted (holders renew every third of it).
const MIN_LEASE: Duration = Duration::from_millis(30);

/// Longest single blocking command: a waiter re-checks the state (and
/// renews its registration) at least this often, so that nothing it might
/// have missed keeps it asleep for long.
const MAX_SLICE: Duration = Duration::from_secs(30);
/// How long a waiter's registration outlives its current blocking command
/// (then it is presumed dead and dropped).
const REGISTRATION_TTL: Duration = Duration::from_secs(60);
/// Client-side allowance on top of a blocking command's own timeout before
/// the reply is given up on (the connection is then discarded).
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);
/// The response timeout pooled connections are created with (the `redis`
/// crate's default), restored after each blocking command.
const POOL_RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long to wait for a blocking command's reply after unblocking it,
/// before unblocking it again.
const UNBLOCK_RETRY: Duration = Duration::from_millis(10);
/// First pause before retrying after a lost connection; doubles up to 1 s.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// Key names of one primitive: `<ns>:{<kind>:<name>}:<part>`, all in one
/// Redis Cluster slot.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    base: String,
}

impl Keys {
    pub(crate) fn new(client: &Client, kind: &str, name: &str) -> Keys {
        Keys {
            base: format!("{}:{{{kind}:{name}}}:", client.names().namespace()),
        }
    }

    /// The key `<ns>:{<kind>:<name>}:<part>`.
    pub(crate) fn part(&self, part: &str) -> String {
        format!("{}{part}", self.base)
    }

    /// Registered waiters (a sorted set: waiter id → expiry, ms).
    pub(crate) fn waiters(&self) -> String {
        self.part("waiters")
    }

    /// Prefix of the waiters' wake-up lists (`...:wake:<waiter id>`).
    pub(crate) fn wake_prefix(&self) -> String {
        self.part("wake:")
    }
}

/// Lua that every waiting primitive's scripts share:
/// `now_ms()`, `register(waiters, id, ttl_ms)` and
/// `notify_all(waiters, wake_prefix)` (pushes to each registered waiter's
/// wake-up list and forgets them). The wake-up lists are named from the
/// waiters' ids; they share the primitive's hash tag.
macro_rules! waiters_lua {
    () => {
        r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function register(waiters, id, ttl)
  if id == nil or id == '' then return end
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', waiters, '-inf', now)
  redis.call('ZADD', waiters, now + tonumber(ttl), id)
  redis.call('PEXPIRE', waiters, ttl)
end
local function notify_all(waiters, prefix)
  local ids = redis.call('ZRANGE', waiters, 0, -1)
  for _, id in ipairs(ids) do
    local wake = prefix .. id
    redis.call('RPUSH', wake, '1')
    redis.call('PEXPIRE', wake, 60000)
  end
  redis.call('DEL', waiters)
  return #ids
end
"#
    };
}
pub(crate) use waiters_lua;

/// `GET` the state key, or register the waiter when it is missing.
/// KEYS: state, waiters. ARGV: waiter id, registration ttl (ms).
static GET_OR_REGISTER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
local value = redis.call('GET', KEYS[1])
if value then return value end
register(KEYS[2], ARGV[1], ARGV[2])
return false
"#
    ))
});

/// `SET` the state key and wake every waiter.
/// KEYS: state, waiters. ARGV: value, wake-up prefix.
static SET_AND_NOTIFY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
redis.call('SET', KEYS[1], ARGV[1])
return notify_all(KEYS[2], ARGV[2])
"#
    ))
});

/// Sets `state` to `value` and wakes everyone waiting on `keys`.
pub(crate) async fn set_and_notify(
    client: &Client,
    keys: &Keys,
    state: &str,
    value: &[u8],
) -> Result<()> {
    let _woken: i64 = SET_AND_NOTIFY
        .key(state)
        .key(keys.waiters())
        .arg(value)
        .arg(keys.wake_prefix())
        .invoke_async(&mut client.redis())
        .await?;
    Ok(())
}

/// Reads `state`, waiting until it exists (or the deadline passes: `None`).
///
/// With `wake_means_ready`, a wake-up alone ends the wait (an [`Event`]
/// that was set, even if cleared again at once) and returns an empty value.
pub(crate) async fn get_or_wait(
    client: &Client,
    keys: &Keys,
    state: &str,
    deadline: Option<Instant>,
    wake_means_ready: bool,
) -> Result<Option<Vec<u8>>> {
    let mut waiter = Waiter::new(client, keys);
    let mut retry = Retry::new(deadline, true);
    loop {
        let attempt: Result<Option<Vec<u8>>> = async {
            let value: Option<Vec<u8>> = GET_OR_REGISTER
                .key(state)
                .key(keys.waiters())
                .arg(&waiter.id)
                .arg(REGISTRATION_TTL.as_millis() as u64)
                .invoke_async(&mut client.redis())
                .await?;
            if value.is_some() {
                return Ok(value);
            }
            waiter.registered = true;
            let Some(wait) = slice(deadline, MAX_SLICE) else {
                return Ok(None);
            };
            let Some(dedicated) = retry.connection(client, &waiter.wake).await? else {
                return Ok(None);
            };
            if waiter.sleep(dedicated, wait).await? && wake_means_ready {
                return Ok(Some(Vec::new()));
            }
            Ok(None)
        }
        .await;
        match retry.after(attempt).await? {
            Some(Waited::Done(value)) => return Ok(Some(value)),
            Some(Waited::GaveUp | Waited::Unreachable) => return Ok(None),
            None => {}
        }
    }
}

/// How a wait ended.
pub(crate) enum Waited<T> {
    /// An attempt came to `T`.
    Done(T),
    /// The deadline passed (or the caller did not want to wait).
    GaveUp,
    /// The deadline passed while Redis was unreachable: the last attempt's
    /// reply may have been lost after it took effect.
    Unreachable,
}

/// The loop of every wait: after each attempt (which may sleep on
/// [`Retry::connection`]), [`Retry::after`] says whether the wait is over:
/// the attempt came to a value; or it was the only one (not `wait`); or the
/// deadline passed. After a lost connection it backs off, and the next
/// attempt gets a fresh one. Every wake-up, whole slice slept and
/// reconnection is followed by a fresh attempt.
pub(crate) struct Retry {
    deadline: Option<Instant>,
    wait: bool,
    connection: Option<Dedicated>,
    backoff: Backoff,
}

impl Retry {
    pub(crate) fn new(deadline: Option<Instant>, wait: bool) -> Retry {
        Retry {
            deadline,
            wait,
            connection: None,
            backoff: Backoff::default(),
        }
    }

    /// The dedicated connection to sleep on, for a blocking command on
    /// `key` (any key of the primitive: they share a hash slot); `None` if
    /// the deadline passes while the pool is exhausted.
    pub(crate) async fn connection(
        &mut self,
        client: &Client,
        key: &str,
    ) -> Result<Option<&mut Dedicated>> {
        if self.connection.is_none() {
            self.connection = Dedicated::get(client, self.deadline, key).await?;
        }
        Ok(self.connection.as_mut())
    }

    /// How the wait ended after `attempt`, or `None` to attempt again.
    pub(crate) async fn after<T>(
        &mut self,
        attempt: Result<Option<T>>,
    ) -> Result<Option<Waited<T>>> {
        match attempt {
            Ok(Some(value)) => Ok(Some(Waited::Done(value))),
            Ok(None) if !self.wait || expired(self.deadline) => Ok(Some(Waited::GaveUp)),
            Ok(None) => {
                self.backoff.reset();
                Ok(None)
            }
            Err(error) if transient(&error) => {
                self.connection = None;
                let again = self.backoff.pause(self.deadline).await;
                Ok((!again).then_some(Waited::Unreachable))
            }
            Err(error) => Err(error),
        }
    }
}

/// One wait on a primitive: an id, and the wake-up list named after it.
/// Dropping it (also when the waiting future is cancelled) forgets the
/// registration in the background.
pub(crate) struct Waiter {
    client: Client,
    waiters: String,
    wake: String,
    pub(crate) id: String,
    pub(crate) registered: bool,
}

impl Waiter {
    pub(crate) fn new(client: &Client, keys: &Keys) -> Waiter {
        let id = flotilla_proto::new_id();
        Waiter {
            client: client.clone(),
            waiters: keys.waiters(),
            wake: format!("{}{id}", keys.wake_prefix()),
            id,
            registered: false,
        }
    }

    /// Blocks until woken (`true`) or `wait` passes (`false`). Inside a
    /// task, the task's slot is lent to its worker meanwhile, so a consumer
    /// waiting on a queue never starves the producer it waits for.
    pub(crate) async fn sleep(&self, connection: &mut Dedicated, wait: Duration) -> Result<bool> {
        let command = redis::cmd("BLPOP")
            .arg(&self.wake)
            .arg(seconds(wait))
            .clone();
        let woken: Option<(String, String)> =
            flotilla_worker::seceded(connection.blocking(&command, wait)).await?;
        Ok(woken.is_some())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the registration expires on its own
        };
        let mut redis = self.client.redis();
        let (waiters, wake, id) = (
            std::mem::take(&mut self.waiters),
            std::mem::take(&mut self.wake),
            std::mem::take(&mut self.id),
        );
        runtime.spawn(async move {
            let _: redis::RedisResult<()> = redis::pipe()
                .cmd("ZREM")
                .arg(&waiters)
                .arg(&id)
                .ignore()
                .cmd("DEL")
                .arg(&wake)
                .ignore()
                .query_async(&mut redis)
                .await;
        });
    }
}

/// A pooled connection of our own for one blocking command at a time.
///
/// If a blocking command does not complete (an error, or the waiting future
/// dropped), the connection is taken out of the pool and closed rather than
/// handed to someone else with a command still blocked on the server.
pub(crate) struct Dedicated {
    connection: Option<deadpool_redis::Connection>,
    /// Its `CLIENT ID`, to end a blocking command on time.
    id: i64,
    /// The master it is connected to, on a Redis Cluster (where the
    /// `CLIENT UNBLOCK` of its id must go).
    node: Option<flotilla_runtime::redis_conn::Node>,
    client: Client,
    busy: bool,
}

impl Dedicated {
    /// A connection from the client's pool; `None` if the deadline passes
    /// while the pool is exhausted.
    pub(crate) async fn get(
        client: &Client,
        deadline: Option<Instant>,
        key: &str,
    ) -> Result<Option<Dedicated>> {
        let connect = async {
            let (mut connection, node) = client.dedicated_redis(key).await?;
            // Named, so that `CLIENT LIST` shows whose waits these are.
            let (id,): (i64,) = redis::pipe()
                .cmd("CLIENT")
                .arg("SETNAME")
                .arg(format!("flotilla-wait-{}", client.names().namespace()))
                .ignore()
                .cmd("CLIENT")
                .arg("ID")
                .query_async(&mut connection)
                .await?;
            Ok::<_, Error>((connection, id, node))
        };
        let (connection, id, node) = match deadline {
            None => connect.await?,
            Some(deadline) => match tokio::time::timeout_at(deadline, connect).await {
                Ok(connected) => connected?,
                Err(_) => return Ok(None),
            },
        };
        Ok(Some(Dedicated {
            connection: Some(connection),
            id,
            node,
            client: client.clone(),
            busy: false,
        }))
    }

    /// Runs a command that blocks on the server for up to `wait`, and ends
    /// it on time: Redis only checks blocking timeouts every `1/hz` seconds
    /// (100 ms by default), so when `wait` is up the command is ended from
    /// another connection (`CLIENT UNBLOCK ... TIMEOUT`) and its reply —
    /// the timeout's, or whatever it got in the meantime — read as usual.
    pub(crate) async fn blocking<T: redis::FromRedisValue>(
        &mut self,
        command: &redis::Cmd,
        wait: Duration,
    ) -> Result<T> {
        let Dedicated {
            connection,
            id,
            node,
            client,
            busy,
        } = self;
        let connection = connection
            .as_mut()
            .expect("a dedicated connection is present until dropped");
        connection.set_response_timeout(wait + RESPONSE_MARGIN);
        *busy = true;
        let until = Instant::now() + wait;
        let reply = {
            let mut query = std::pin::pin!(command.query_async::<T>(&mut **connection));
            let mut at = until;
            loop {
                tokio::select! {
                    reply = &mut query => break reply?,
                    () = tokio::time::sleep_until(at) => {
                        // Unblocking a command that has not reached the
                        // server yet does nothing: try again shortly.
                        // On a cluster, ids are per node: the unblock goes
                        // to the master this connection is on.
                        let _unblocked: i64 = client
                            .redis()
                            .on_node(
                                node.as_ref(),
                                redis::cmd("CLIENT").arg("UNBLOCK").arg(*id).arg("TIMEOUT"),
                            )
                            .await?;
                        at = Instant::now() + UNBLOCK_RETRY;
                    }
                }
            }
        };
        connection.set_response_timeout(POOL_RESPONSE_TIMEOUT);
        *busy = false;
        Ok(reply)
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        if self.busy {
            if let Some(connection) = self.connection.take() {
                drop(deadpool_redis::Connection::take(connection));
            }
        }
    }
}

/// Pauses between attempts after a lost connection: the runtime's jittered
/// backoff from [`RETRY_BACKOFF`] up to 1 s, cut short by a deadline.
pub(crate) struct Backoff(flotilla_runtime::supervise::Backoff);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(flotilla_runtime::supervise::Backoff::new(
            RETRY_BACKOFF,
            Duration::from_secs(1),
        ))
    }
}

impl Backoff {
    /// Sleeps, or returns `false` at once when the deadline would pass first.
    pub(crate) async fn pause(&mut self, deadline: Option<Instant>) -> bool {
        let until = Instant::now() + self.0.next_pause();
        match deadline {
            Some(deadline) if deadline <= until => {
                tokio::time::sleep_until(deadline).await;
                false
            }
            _ => {
                tokio::time::sleep_until(until).await;
                true
            }
        }
    }

    pub(crate) fn reset(&mut self) {
        self.0.reset();
    }
}

/// Errors after which the state is checked again on a fresh connection
/// (the shared connection reconnects by itself).
pub(crate) fn transient(error: &Error) -> bool {
    match error {
        Error::Redis(error) => {
            error.is_io_error()
                || error.is_connection_dropped()
                || error.is_connection_refusal()
                || error.is_timeout()
                // On a cluster, a wait's master that failed over or lost
                // the slot: a fresh connection goes to the new one.
                || matches!(
                    error.retry_method(),
                    redis::RetryMethod::Reconnect
                        | redis::RetryMethod::RetryImmediately
                        | redis::RetryMethod::WaitAndRetry
                        | redis::RetryMethod::MovedRedirect
                        | redis::RetryMethod::AskRedirect
                        | redis::RetryMethod::ReconnectFromInitialConnections
                )
        }
        // The pool reports a failed connect this way.
        Error::Config(message) => message.starts_with("Redis pool:"),
        _ => false,
    }
}

/// The time left until `deadline`, at most `cap`; `None` once it is (less
/// than a millisecond from) over.
pub(crate) fn slice(deadline: Option<Instant>, cap: Duration) -> Option<Duration> {
    match deadline {
        None => Some(cap),
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            (left >= Duration::from_millis(1)).then(|| left.min(cap))
        }
    }
}

/// Whether `deadline` has (all but) passed.
pub(crate) fn expired(deadline: Option<Instant>) -> bool {
    slice(deadline, MAX_SLICE).is_none()
}

/// A deadline `timeout` from now.
pub(crate) fn deadline_in(timeout: Duration) -> Option<Instant> {
    // A timeout too long to represent is no deadline at all.
    Instant::now().checked_add(timeout)
}

/// A blocking command's timeout in seconds, never 0 (which would mean
/// "forever").
fn seconds(wait: Duration) -> String {
    format!("{:.3}", wait.as_secs_f64().max(0.001))
}

/// Encodes a value stored in a primitive, within the payload limit.
pub(crate) fn encode<T: Serialize + ?Sized>(
    client: &Client,
    what: &str,
    value: &T,
) -> Result<Vec<u8>> {
    crate::args::encode_within(value, client.config().max_payload, || what.to_owned()).map_err(
        |error| match error {
            Error::PayloadTooLarge { size, limit, .. } => Error::PayloadTooLarge {
                what: format!("a value for {what}"),
                size,
                limit,
            },
            other => other,
        },
    )
}

/// Decodes a value read from a primitive.
pub(crate) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode {
        key: what.to_owned(),
        type_name: std::any::type_name::<T>(),
        message: e.to_string(),
    })
}

/// The error of a wait that ran out of time.
pub(crate) fn timed_out(what: String, timeout: Duration) -> Error {
    Error::Timeout { key: what, timeout }
}

/// A flag shared between a lease holder and its renewal task: set when the
/// lease turned out to be lost.
#[derive(Debug, Clone, Default)]
pub(crate) struct LostFlag(Arc<AtomicBool>);

impl LostFlag {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Keeps a lease alive: runs `script` (KEYS: `key`; ARGV: `token`, lease
/// in ms; returns 1 while the lease is still this holder's) every third of
/// the lease. Sets `lost` and stops when the script says the lease is gone,
/// or when Redis stayed unreachable until the lease must have run out.
pub(crate) fn spawn_renewal(
    client: &Client,
    script: &'static redis::Script,
    key: String,
    token: String,
    lease: Duration,
    lost: LostFlag,
    what: String,
) -> tokio::task::JoinHandle<()> {
    let mut redis = client.redis();
    tokio::spawn(async move {
        let interval = lease / 3;
        let retry = (lease / 20).max(Duration::from_millis(10));
        let lease_ms = lease.as_millis() as u64;
        let mut valid_until = Instant::now() + lease;
        let mut next = Instant::now() + interval;
        loop {
            tokio::time::sleep_until(next).await;
            let sent = Instant::now();
            let renewed: redis::RedisResult<i64> = script
                .key(&key)
                .arg(&token)
                .arg(lease_ms)
                .invoke_async(&mut redis)
                .await;
            match renewed {
                Ok(1) => {
                    valid_until = sent + lease;
                    next = sent + interval;
                }
                Ok(_) => {
                    lost.set();
                    tracing::warn!(%what, "lease lost: another holder may have taken over");
                    return;
                }
                Err(error) if Instant::now() >= valid_until => {
                    lost.set();
                    tracing::warn!(%what, %error, "lease ran out while Redis was unreachable");
                    return;
                }
                Err(error) => {
                    tracing::debug!(%what, %error, "lease renewal failed; retrying");
                    next = Instant::now() + retry;
                }
            }
        }
    })
}

/// Runs `script` in the background on `runtime` (best effort: cleanup that
/// is also bounded by a lease or an expiry).
pub(crate) fn spawn_script(
    runtime: &tokio::runtime::Handle,
    client: &Client,
    invocation: redis::ScriptInvocation<'static>,
) {
    let mut redis = client.redis();
    runtime.spawn(async move {
        let _: redis::RedisResult<redis::Value> = invocation.invoke_async(&mut redis).await;
    });
}
