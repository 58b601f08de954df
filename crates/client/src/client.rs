//! The client: submits tasks, tracks their futures, fetches results, and
//! holds references to what it still wants.

use crate::args::{ArgWriter, IntoArgs};
use crate::error::{Error, Result};
use crate::future::{FutureRef, TaskFuture};
use crate::inner::ClientInner;
use crate::link::{listen, open_link};
use crate::outbox::{renew_lease, Op, Outbox, Table};
use crate::room::Room;
use crate::state::FutureState;
use flotilla_proto::{
    Codec, Config, Names, ReplayGuard, RetryOn, RetryPolicy, Task, TaskSpec, TraceParent,
};
use flotilla_runtime::store::{dataset_holder, Store};
use flotilla_runtime::transport;
use flotilla_runtime::Redis;
use serde::{de::DeserializeOwned, Serialize};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Scattered values up to this size stay in the client's memory too.
const INLINE_SCATTER: usize = 16 * 1024;

/// A connection to a Flotilla cluster: submit tasks, get futures.
///
/// Cheap to clone; clones share connections and futures. The background
/// work (batching submissions and reference updates, receiving completion
/// events, renewing the lease) runs on the tokio runtime that connected it.
///
/// **Lease.** A client renews a lease in Redis (`client_lease_ms`,
/// `FLOTILLA_CLIENT_LEASE_MS`, default 30 s, at least 1 s). While it lasts
/// the client's holds survive even a broken connection. When it lapses (the
/// process died, or stayed away longer than the lease), the scheduler
/// releases everything the client held, and its pending tasks that nothing
/// else holds (no other client's future, no pending dependent, no
/// `fire_and_forget`, no dataset) are cancelled, running ones stopped as by
/// [`Client::cancel`] with `force` — Dask cancels a departed client's work
/// alike. [`Client::close`] releases everything at once instead.
///
/// **Releases.** Dropping the last handle on a key releases it after a
/// short grace (50 ms, or at the next [`Client::flush`]); asking for the key
/// again meanwhile ([`Client::get_future`], the same pure submission, the
/// same hashed scatter) keeps the result.
///
/// ```no_run
/// use flotilla::prelude::*;
///
/// #[flotilla::task]
/// fn add(x: i64, y: i64) -> i64 { x + y }
///
/// # async fn demo() -> flotilla::Result<()> {
/// let client = Client::from_env().await?;
/// let a = client.submit(add, (1, 2));
/// let b = client.submit(add, (&a, 10));
/// assert_eq!(b.await?, 13);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
    /// The trace this handle's submissions carry (see
    /// [`Client::with_traceparent`]).
    pub(crate) trace: Option<TraceParent>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .field("namespace", &self.inner.names.namespace())
            .finish_non_exhaustive()
    }
}

/// Options for one submission; see [`Client::submit_with`].
#[must_use = "a submission is sent by calling .submit()"]
pub struct Submit<'c, K: Task, A> {
    client: &'c Client,
    task: K,
    args: A,
    key: Option<String>,
    pure: bool,
    priority: i32,
    retries: u32,
    workers: Vec<String>,
    allow_other_workers: bool,
    resources: Vec<(String, u64)>,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    start_at: Option<SystemTime>,
}

impl<'c, K: Task, A: IntoArgs<K::Args>> Submit<'c, K, A> {
    /// Higher runs first among ready tasks (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Gives the task this key instead of one derived from its arguments.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// `false` gives the task a fresh random key, so that submitting the same
    /// function and arguments again runs it again (default `true`: the same
    /// function with the same arguments is one task, run once).
    pub fn pure(mut self, pure: bool) -> Self {
        self.pure = pure;
        self
    }

    /// Runs the task again up to `retries` times if it fails: at once, or
    /// after [`retry_delay`](Self::retry_delay), and only on the errors of
    /// [`retry_on`](Self::retry_on) if given. A failure that a retry cannot
    /// mend (cancelled, unknown task, signature mismatch, worker lost too
    /// often) is never retried.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// With [`retries`](Self::retries): waits this long before the first
    /// retry (default: none). The scheduler holds the failed task, not the
    /// broker or a worker; a scheduler that takes over while it waits runs
    /// it at once.
    ///
    /// ```no_run
    /// # use flotilla::prelude::*;
    /// # use std::time::Duration;
    /// #[flotilla::task]
    /// async fn fetch(url: String) -> Result<usize, std::io::Error> {
    ///     Ok(url.len())
    /// }
    ///
    /// # async fn demo(client: &Client) -> flotilla::Result<()> {
    /// // Waits 1 s, 2 s, 4 s, then 5 s between tries; only I/O errors
    /// // are tried again.
    /// let length = client
    ///     .submit_with(fetch, ("https://example.com".to_string(),))
    ///     .retries(4)
    ///     .retry_delay(Duration::from_secs(1))
    ///     .backoff(2.0)
    ///     .max_retry_delay(Duration::from_secs(5))
    ///     .retry_on(["io::Error"])
    ///     .submit()
    ///     .result()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry.delay_ms = millis_up(delay);
        self
    }

    /// With [`retry_delay`](Self::retry_delay): each retry waits `factor`
    /// times longer than the one before (exponential backoff; default 1,
    /// a constant delay), up to [`max_retry_delay`](Self::max_retry_delay).
    pub fn backoff(mut self, factor: f64) -> Self {
        self.retry.backoff = factor;
        self
    }

    /// Caps the wait between tries, however many came before (default: no
    /// cap).
    pub fn max_retry_delay(mut self, max: Duration) -> Self {
        self.retry.max_delay_ms = millis_up(max).max(1);
        self
    }

    /// Spreads the retries of tasks that failed together (Celery's
    /// `retry_jitter`): each wait is drawn between half its delay and its
    /// full delay (default `false`: the delay exactly).
    pub fn retry_jitter(mut self, jitter: bool) -> Self {
        self.retry.jitter = jitter;
        self
    }

    /// Retries only on these errors: [`ErrorKind`](crate::ErrorKind)s
    /// (`ErrorKind::Panic`, `ErrorKind::TimedOut`, ...) and error types, by
    /// path in full or in part (`"io::Error"` matches
    /// `std::io::error::Error`; see [`RetryOn`]). A failure that matches
    /// none fails the task at once, retries left or not. Without it, every
    /// failure a retry can mend is retried.
    ///
    /// ```no_run
    /// # use flotilla::prelude::*;
    /// # use flotilla::{ErrorKind, RetryOn};
    /// # #[flotilla::task]
    /// # async fn fetch(url: String) -> Result<usize, std::io::Error> { Ok(url.len()) }
    /// # fn demo(client: &Client) {
    /// let future = client
    ///     .submit_with(fetch, ("https://example.com".to_string(),))
    ///     .retries(3)
    ///     .retry_on([
    ///         RetryOn::from(ErrorKind::Panic),
    ///         RetryOn::type_of::<std::io::Error>(),
    ///     ])
    ///     .submit();
    /// # }
    /// ```
    pub fn retry_on<E: Into<RetryOn>>(mut self, errors: impl IntoIterator<Item = E>) -> Self {
        self.retry.on = errors.into_iter().map(Into::into).collect();
        self
    }

    /// Does not start the task before `time` (Celery's `eta`); its inputs
    /// still have to finish first. A time in the past starts it as soon as
    /// it is ready. The time travels in the task's spec as wall-clock
    /// milliseconds, so a scheduler that takes over honours it; clocks of
    /// the client and scheduler machines should agree.
    ///
    /// ```no_run
    /// # use flotilla::prelude::*;
    /// # use std::time::{Duration, SystemTime};
    /// # #[flotilla::task]
    /// # async fn report(day: u32) -> u32 { day }
    /// # fn demo(client: &Client) {
    /// let tonight = SystemTime::now() + Duration::from_secs(6 * 3600);
    /// let future = client.submit_with(report, (7,)).at(tonight).submit();
    /// # }
    /// ```
    pub fn at(mut self, time: SystemTime) -> Self {
        self.start_at = Some(time);
        self
    }

    /// Does not start the task before `delay` from now (Celery's
    /// `countdown`): [`at`](Self::at) now plus `delay`.
    ///
    /// ```no_run
    /// # use flotilla::prelude::*;
    /// # use std::time::Duration;
    /// # #[flotilla::task]
    /// # async fn remind(who: String) -> String { who }
    /// # fn demo(client: &Client) {
    /// let future = client
    ///     .submit_with(remind, ("ada".to_string(),))
    ///     .after(Duration::from_secs(30))
    ///     .submit();
    /// # }
    /// ```
    pub fn after(self, delay: Duration) -> Self {
        let time = SystemTime::now()
            .checked_add(delay)
            .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_millis(u64::MAX));
        self.at(time)
    }

    /// Limits how long the task may run, overriding the task's own default
    /// (`#[flotilla::task(timeout = "30s")]`); `Duration::ZERO` runs it
    /// without a limit even if the task has a default.
    ///
    /// The clock starts when the worker calls the function. The task sees
    /// its deadline as `ctx.deadline()` / `ctx.time_left()`. At the limit an
    /// async task is stopped (its future is dropped), and the future errs
    /// with [`ErrorKind::TimedOut`](crate::ErrorKind::TimedOut). A
    /// synchronous task cannot be stopped: it errs `TimedOut` at the limit
    /// all the same, `ctx.is_cancelled()` turns true, and whatever it
    /// returns later is discarded. With [`retries`](Self::retries), a
    /// timed-out task is retried like any failed one. Limits are kept to
    /// the millisecond.
    ///
    /// ```no_run
    /// # use flotilla::prelude::*;
    /// # use std::time::Duration;
    /// #[flotilla::task]
    /// async fn fetch(url: String) -> usize {
    ///     url.len()
    /// }
    ///
    /// # async fn demo(client: &Client) -> flotilla::Result<()> {
    /// let future = client
    ///     .submit_with(fetch, ("https://example.com".to_string(),))
    ///     .timeout(Duration::from_secs(30))
    ///     .submit();
    /// match future.result().await {
    ///     Ok(length) => println!("{length} bytes"),
    ///     Err(error) => println!("failed or timed out: {error}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Runs the task only on these workers (ids or `--name`s); it waits
    /// while none of them is alive, unless [`Submit::allow_other_workers`].
    pub fn workers<S: Into<String>>(mut self, workers: impl IntoIterator<Item = S>) -> Self {
        self.workers = workers.into_iter().map(Into::into).collect();
        self
    }

    /// With [`Submit::workers`]: run elsewhere when none of them is alive.
    pub fn allow_other_workers(mut self, allow: bool) -> Self {
        self.allow_other_workers = allow;
        self
    }

    /// Abstract resources the task needs (`[("GPU", 1)]`): it runs only on
    /// workers that offer them (`--resources GPU=1`), while enough are free.
    pub fn resources<S: Into<String>>(
        mut self,
        resources: impl IntoIterator<Item = (S, u64)>,
    ) -> Self {
        self.resources = resources.into_iter().map(|(n, a)| (n.into(), a)).collect();
        self
    }

    /// Submits the task; returns its future at once. Past this client's
    /// bound on pending tasks (`FLOTILLA_MAX_PENDING`) the submission waits
    /// in the client's ordered outbox, and goes out as earlier tasks finish
    /// (see [`Submit::submit_async`] to wait here instead).
    pub fn submit(self) -> TaskFuture<K::Output> {
        match self.start(Mode::Queue) {
            Ok((future, _)) => future,
            Err(_) => unreachable!("only try_submit is refused for room"),
        }
    }

    /// Submits the task once this client has room for it: waits while it
    /// has `FLOTILLA_MAX_PENDING` tasks pending (submitted, neither
    /// finished nor released), so that a producer submitting in a loop
    /// keeps at most that many tasks in the cluster.
    ///
    /// Problems found before sending come back as an already-failed
    /// future, as with [`Submit::submit`].
    pub fn submit_async(self) -> impl std::future::Future<Output = TaskFuture<K::Output>> + Send {
        let started = self.start(Mode::Wait);
        // It yields the task's future, itself awaitable for the result.
        #[allow(clippy::async_yields_async)]
        async move {
            match started {
                Ok((future, Some(admitted))) => {
                    // Closed only when the client is going away.
                    let _ = admitted.await;
                    future
                }
                Ok((future, None)) => future,
                Err(_) => unreachable!("only try_submit is refused for room"),
            }
        }
    }

    /// Submits the task if this client has room for it now; with
    /// `FLOTILLA_MAX_PENDING` tasks pending (or submissions already
    /// waiting for room) it returns [`Error::TooManyPending`] instead,
    /// and nothing is sent. A key this client already has a future for
    /// takes no room: its handle comes back.
    pub fn try_submit(self) -> Result<TaskFuture<K::Output>> {
        self.start(Mode::Try).map(|(future, _)| future)
    }

    fn start(self, mode: Mode) -> Result<(TaskFuture<K::Output>, Option<Admitted>)> {
        let client = self.client;
        if self.allow_other_workers && self.workers.is_empty() {
            return Ok((
                client.failed(
                    self.key.as_deref().unwrap_or(K::NAME),
                    Error::Config(
                        "allow_other_workers only makes sense together with workers([..])".into(),
                    ),
                ),
                None,
            ));
        }
        let options = SubmitOptions {
            key: self.key,
            pure: self.pure,
            priority: self.priority,
            retries: self.retries,
            retry: self.retry,
            start_at_ms: self.start_at.map_or(0, |time| {
                // Before the epoch is long past: no wait. Rounded up, so
                // the task never starts before the time asked.
                time.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, millis_up)
                    .max(1)
            }),
            workers: self.workers,
            allow_other_workers: self.allow_other_workers,
            resources: self.resources,
            timeout_ms: self.timeout.map_or(0, |limit| {
                if limit.is_zero() {
                    TaskSpec::NO_TIME_LIMIT
                } else {
                    // Rounded up, so that a limit under a millisecond is
                    // still one; one too long to count is none.
                    u64::try_from(limit.as_nanos().div_ceil(1_000_000))
                        .unwrap_or(TaskSpec::NO_TIME_LIMIT)
                }
            }),
        };
        client.submit_spec(self.task, self.args, options, mode)
    }
}

/// How a submission meets this client's bound on pending tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Past it, queue in the outbox (`submit`).
    Queue,
    /// Past it, queue and let the caller wait (`submit_async`).
    Wait,
    /// Past it, refuse (`try_submit`).
    Try,
}

/// Told once a submission queued for room has it.
type Admitted = tokio::sync::oneshot::Receiver<()>;

/// `duration` in milliseconds, rounded up (too long to count: the most).
fn millis_up(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[derive(Default)]
struct SubmitOptions {
    key: Option<String>,
    pure: bool,
    priority: i32,
    retries: u32,
    retry: RetryPolicy,
    /// As in [`TaskSpec::start_at_ms`].
    start_at_ms: u64,
    workers: Vec<String>,
    allow_other_workers: bool,
    resources: Vec<(String, u64)>,
    /// As in [`TaskSpec::timeout_ms`].
    timeout_ms: u64,
}

/// Options for [`Client::scatter_with`].
#[derive(Debug, Clone, Copy)]
pub struct ScatterOptions {
    /// Key the data by its content (default `true`): scattering equal data
    /// twice stores it once. `false` gives every scatter a fresh key.
    pub hash: bool,
}

impl Default for ScatterOptions {
    fn default() -> Self {
        ScatterOptions { hash: true }
    }
}

impl Client {
    /// Connects with `FLOTILLA_AMQP_URL`, `FLOTILLA_REDIS_URL` and
    /// `FLOTILLA_NAMESPACE` (defaults: local RabbitMQ and Redis, namespace
    /// `flotilla`).
    pub async fn from_env() -> Result<Client> {
        Client::connect(Config::from_env()?).await
    }

    /// Connects to the cluster `config` describes.
    pub async fn connect(config: Config) -> Result<Client> {
        config.validate()?;
        let names = config.names();
        let id = flotilla_proto::new_id();
        let (connection, publish, consumer) = open_link(&config, &names, &id).await?;
        let redis = transport::connect_redis(&config.redis_url).await?;
        let codec = Codec::new(&config);
        flotilla_runtime::seal::check_fingerprint(&mut redis.clone(), &names, &codec).await?;
        let incarnation =
            flotilla_runtime::incarnation::Incarnation::start(&mut redis.clone(), &names, false)
                .await?;
        // FLOTILLA_CLIENT_LEASE_MS (30 s, at least 1 s): the scheduler
        // releases this client's holds once it lapses unrenewed.
        let lease = config.client_lease();
        // Take the lease before holding anything.
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(lease)
            .as_millis() as u64;
        let store = Store::redis(redis.clone(), names.clone());
        store.renew_lease(&id, expiry).await?;
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let (channels, publish) = tokio::sync::watch::channel(publish);
        let config_max_pending = config.max_pending;
        let inner = Arc::new(ClientInner {
            id: id.clone(),
            reader: flotilla_runtime::values::Reader::with_options(
                codec.clone(),
                flotilla_runtime::data::DataClientOptions::for_config(&config),
            ),
            codec,
            events_guard: ReplayGuard::new(),
            fast_events_guard: ReplayGuard::new(),
            config,
            names: names.clone(),
            redis: redis.clone(),
            store: store.clone(),
            connection: Mutex::new(Arc::new(connection)),
            channels,
            closing: std::sync::atomic::AtomicBool::new(false),
            futures: Table::default(),
            ops,
            background: Mutex::new(Vec::new()),
            pool: tokio::sync::OnceCell::new(),
            node_pools: std::sync::Mutex::default(),
            room: Arc::new(Room::new(config_max_pending)),
        });
        let outbox = Outbox {
            client: id.clone(),
            names: names.clone(),
            store,
            publish,
            max_payload: inner.config.max_payload,
            codec: inner.codec.clone(),
            unconfirmed: std::collections::VecDeque::new(),
            table: inner.futures.clone(),
            deferred: std::collections::VecDeque::new(),
            room: inner.room.clone(),
        };
        tokio::spawn(outbox.run(ops_rx));
        let listener = tokio::spawn(listen(consumer, Arc::downgrade(&inner)));
        let fast_events = tokio::spawn(crate::pubsub::follow(
            Arc::downgrade(&inner),
            inner.config.redis_url.clone(),
            names.client_events_channel(&id),
        ));
        let lost = Arc::downgrade(&inner);
        let on_data_lost = move || {
            if let Some(inner) = lost.upgrade() {
                inner.data_lost();
            }
        };
        let leader = Arc::downgrade(&inner);
        let resync = move || {
            if let Some(inner) = leader.upgrade() {
                tokio::spawn(async move { inner.resync().await });
            }
        };
        let lease_task = tokio::spawn(renew_lease(
            redis,
            names,
            id,
            lease,
            incarnation,
            on_data_lost,
            resync,
        ));
        inner
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([listener, fast_events, lease_task]);
        Ok(Client { inner, trace: None })
    }

    /// This client's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The configuration it connected with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The shared, multiplexed Redis connection (never use blocking
    /// commands on it: they would stall every other command behind them).
    pub(crate) fn redis(&self) -> Redis {
        self.inner.redis.clone()
    }

    /// A pooled Redis connection of its own, for blocking commands
    /// (`BLPOP`, `BLMOVE`, ...), pub/sub and transactions.
    ///
    /// On a Redis Cluster it is a plain connection to the master that
    /// serves `key`'s slot now, from that master's own pool, and comes with
    /// that master's address (where its `CLIENT UNBLOCK` must go).
    pub(crate) async fn dedicated_redis(
        &self,
        key: &str,
    ) -> Result<(
        deadpool_redis::Connection,
        Option<flotilla_runtime::redis_conn::Node>,
    )> {
        let pool_error = |e: &dyn std::fmt::Display| Error::Config(format!("Redis pool: {e}"));
        let build = |config: deadpool_redis::Config| {
            config
                .builder()
                .map(|b| {
                    b.max_size(64)
                        .runtime(deadpool_redis::Runtime::Tokio1)
                        .build()
                })
                .map_err(|e| pool_error(&e))?
                .map_err(|e| pool_error(&e))
        };
        let redis = self.redis();
        let Some(node) = redis.master_of(key).await? else {
            let pool = self
                .inner
                .pool
                .get_or_try_init(|| async {
                    build(deadpool_redis::Config::from_url(
                        self.inner.config.redis_url.clone(),
                    ))
                })
                .await?;
            let connection = pool.get().await.map_err(|e| pool_error(&e))?;
            return Ok((connection, None));
        };
        let existing = self
            .inner
            .node_pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned();
        let pool = match existing {
            Some(pool) => pool,
            None => {
                // The first seed's credentials and TLS, the master's address.
                let Ok(flotilla_proto::RedisTarget::Cluster(seeds)) =
                    self.inner.config.redis_target()
                else {
                    return Err(pool_error(&"a cluster connection without a cluster URL"));
                };
                let info = redis::IntoConnectionInfo::into_connection_info(seeds[0].as_str())?;
                let addr = match info.addr().clone() {
                    redis::ConnectionAddr::TcpTls {
                        insecure,
                        tls_params,
                        ..
                    } => redis::ConnectionAddr::TcpTls {
                        host: node.host.clone(),
                        port: node.port,
                        insecure,
                        tls_params,
                    },
                    _ => redis::ConnectionAddr::Tcp(node.host.clone(), node.port),
                };
                let pool = build(deadpool_redis::Config::from_connection_info(
                    info.set_addr(addr),
                ))?;
                self.inner
                    .node_pools
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(node.clone())
                    .or_insert(pool)
                    .clone()
            }
        };
        let connection = pool.get().await.map_err(|e| pool_error(&e))?;
        Ok((connection, Some(node)))
    }

    /// The queue and key names of the client's namespace.
    pub(crate) fn names(&self) -> &Names {
        &self.inner.names
    }

    /// Submits `task` with `args` (a tuple; a future may stand wherever the
    /// task takes a value) and returns its future at once. Submissions are
    /// batched and sent in the background.
    ///
    /// The key is derived from the task and its arguments (Dask's `pure`):
    /// submitting the same call again returns a handle on the same task and
    /// runs nothing new, while its result is still held by anyone.
    ///
    /// Problems found before sending (an argument that cannot be encoded)
    /// come back as an already-failed future. Arguments of any size are
    /// accepted: one whose encoding is over [`crate::INLINE_ARG_MAX`] (1 MiB)
    /// is scattered by the client and passed by reference.
    ///
    /// Past this client's bound on pending tasks (`FLOTILLA_MAX_PENDING`,
    /// [`Config::max_pending`]) the submission waits in the client's
    /// ordered outbox and goes out as earlier tasks finish; the future is
    /// returned at once all the same. To wait for room before going on, or
    /// to be refused, use [`Submit::submit_async`] or [`Submit::try_submit`]
    /// through [`Client::submit_with`].
    pub fn submit<K: Task, A: IntoArgs<K::Args>>(&self, task: K, args: A) -> TaskFuture<K::Output> {
        self.submit_with(task, args).submit()
    }

    /// A handle on the same client whose submissions run in the trace
    /// `traceparent` (W3C trace context): each task it submits carries it,
    /// the worker records its trace id and span id (as `trace_id` and
    /// `parent_span_id`) on the task's span, the task sees it in
    /// [`TaskContext::traceparent`](crate::TaskContext::traceparent), and
    /// the tasks it submits through
    /// [`TaskContextExt::client`](crate::TaskContextExt::client) carry the
    /// same trace id. Pass the trace and span id of the caller's own span
    /// (from OpenTelemetry, or an incoming request's `traceparent` header).
    /// Without it, tasks carry no trace.
    ///
    /// ```no_run
    /// # use flotilla::{Client, TraceParent};
    /// # async fn demo(client: Client) -> flotilla::Result<()> {
    /// let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ///     .parse()
    ///     .expect("a valid traceparent");
    /// let traced = client.with_traceparent(parent);
    /// # Ok(()) }
    /// ```
    pub fn with_traceparent(&self, traceparent: TraceParent) -> Client {
        Client {
            inner: self.inner.clone(),
            trace: Some(traceparent),
        }
    }

    /// The trace this handle's submissions carry, if any (see
    /// [`Client::with_traceparent`]).
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.trace
    }

    /// Like [`Client::submit`], with options:
    /// `client.submit_with(add, (1, 2)).priority(5).retries(2).key("x").submit()`.
    pub fn submit_with<K: Task, A: IntoArgs<K::Args>>(&self, task: K, args: A) -> Submit<'_, K, A> {
        Submit {
            client: self,
            task,
            args,
            key: None,
            pure: true,
            priority: 0,
            retries: 0,
            workers: Vec::new(),
            allow_other_workers: false,
            resources: Vec::new(),
            timeout: None,
            retry: RetryPolicy::default(),
            start_at: None,
        }
    }

    /// Submits `task` once per argument tuple; futures come back in order.
    /// Never waits, however many: past the bound on pending tasks the
    /// rest wait in the outbox, in order, and go out as earlier ones
    /// finish (see [`Client::submit`]).
    pub fn map<K: Task, A: IntoArgs<K::Args>>(
        &self,
        task: K,
        args: impl IntoIterator<Item = A>,
    ) -> Vec<TaskFuture<K::Output>> {
        args.into_iter().map(|a| self.submit(task, a)).collect()
    }

    fn failed<T>(&self, key: &str, error: Error) -> TaskFuture<T> {
        // Owned by no client: nothing was submitted, nothing to release.
        let state = Arc::new(FutureState::new(key.to_owned(), Weak::<ClientInner>::new()));
        state.set_failed(error);
        TaskFuture::from_state(state, self.inner.clone())
    }

    fn submit_spec<K: Task, A: IntoArgs<K::Args>>(
        &self,
        _task: K,
        args: A,
        options: SubmitOptions,
        mode: Mode,
    ) -> Result<(TaskFuture<K::Output>, Option<Admitted>)> {
        let what = || format!("the arguments of `{}`", K::NAME);
        let limit = self.inner.config.max_payload;
        let mut writer = ArgWriter::within(limit, what());
        let encoded = args
            .into_args(&mut writer)
            .and_then(|args| crate::args::encode_within(&args, limit, what));
        let short = K::NAME.rsplit("::").next().unwrap_or(K::NAME);
        if let Some(key) = &options.key {
            if let Err(error) = check_key(key) {
                return Ok((self.failed(key, error), None));
            }
        }
        let key = options
            .key
            .unwrap_or_else(|| match (&encoded, options.pure) {
                (Ok(bytes), true) => {
                    format!("{short}-{}", content_hash(K::NAME, K::FINGERPRINT, bytes))
                }
                _ => format!("{short}-{}", flotilla_proto::new_id()),
            });
        let bytes = match encoded {
            Ok(bytes) => bytes,
            Err(error) => return Ok((self.failed(&key, error), None)),
        };
        // The line is held from the admission decision until the
        // submission is queued (see `crate::room`).
        let room = self.inner.room.clone();
        let mut line = room.lock();
        let mut permit = room.take_now(&line);
        if mode == Mode::Try && permit.is_none() && self.inner.state(&key).is_none() {
            return Err(Error::TooManyPending {
                pending: room.pending(&line),
                limit: room.limit(),
            });
        }
        // Arguments too large for the message are scattered first, in the
        // outbox's order (before the submission that holds them): each is a
        // future of this client, kept alive until the submission is queued,
        // exactly like a scattered future passed as an argument. Under the
        // line, so that a concurrent submission of the same argument, which
        // finds its key registered and uploads nothing, is queued after it.
        for (upload, value) in std::mem::take(&mut writer.uploads) {
            let (state, fresh) = self.inner.register(&upload);
            if fresh {
                state.set_finished(None);
                self.inner.send(Op::Upload(upload, value));
            }
            writer.keep(state);
        }
        let (state, fresh) = self.inner.register(&key);
        let future = TaskFuture::from_state(state.clone(), self.inner.clone());
        let mut admitted = None;
        if fresh {
            let mut spec = TaskSpec::new(
                key,
                K::NAME.to_owned(),
                K::FINGERPRINT,
                bytes,
                std::mem::take(&mut writer.deps),
                self.inner.id.clone(),
            );
            spec.holds = std::mem::take(&mut writer.holds);
            spec.priority = options.priority;
            spec.retries = options.retries;
            spec.retry = options.retry;
            spec.start_at_ms = options.start_at_ms;
            spec.traceparent = self.trace.map(|trace| trace.to_string());
            spec.workers = options.workers;
            spec.allow_other_workers = options.allow_other_workers;
            spec.resources = options.resources;
            spec.timeout_ms = options.timeout_ms;
            let waiting = match permit.take() {
                Some(permit) => {
                    state.hold_room(permit);
                    None
                }
                None => {
                    let (waiting, told) = room.queue(&mut line, &state);
                    admitted = (mode == Mode::Wait).then_some(told);
                    Some(waiting)
                }
            };
            self.inner.send(Op::Submit(Box::new(spec), waiting));
        }
        // A key this client already had takes no more room.
        drop(permit);
        drop(line);
        // The inputs' handles stay alive until the submission is queued, so
        // their release can never overtake it.
        drop(writer);
        Ok((future, admitted))
    }

    /// Waits for every future and returns their values in order, reading
    /// what did not arrive inline from Redis a batch of keys per round trip.
    /// The first failed future's error is returned (Dask's `errors="raise"`).
    pub async fn gather<T: DeserializeOwned>(&self, futures: &[TaskFuture<T>]) -> Result<Vec<T>> {
        for future in futures {
            future.wait().await;
        }
        let mut values: Vec<Option<bytes::Bytes>> = Vec::with_capacity(futures.len());
        let mut missing = Vec::new();
        for (index, future) in futures.iter().enumerate() {
            match future.state.done_outcome() {
                Some(Ok(Some(bytes))) => values.push(Some(bytes)),
                Some(Ok(None)) => {
                    values.push(None);
                    missing.push(index);
                }
                Some(Err(error)) => return Err(error),
                None => return Err(Error::Lost(future.key().to_owned())),
            }
        }
        let keys: Vec<&str> = missing.iter().map(|&i| futures[i].key()).collect();
        for (index, fetched) in missing.into_iter().zip(self.inner.fetch(&keys).await?) {
            values[index] = Some(fetched?);
        }
        futures
            .iter()
            .zip(values)
            .map(|(future, bytes)| {
                let bytes = bytes.ok_or_else(|| Error::Lost(future.key().to_owned()))?;
                crate::future::decode_value(future.key(), &bytes)
            })
            .collect()
    }

    /// Stores `value` in the cluster and returns a finished future of it, to
    /// pass to many tasks without sending it again (keyed by content).
    ///
    /// A value of any size: from 4 MiB on
    /// ([`flotilla_runtime::store::CHUNKED_MIN`]) it goes to Redis in 4 MiB
    /// chunks, a few per round trip, and readers get it back whole.
    pub async fn scatter<T: Serialize>(&self, value: &T) -> Result<TaskFuture<T>> {
        self.scatter_with(value, ScatterOptions::default()).await
    }

    /// Like [`Client::scatter`], with options.
    pub async fn scatter_with<T: Serialize>(
        &self,
        value: &T,
        options: ScatterOptions,
    ) -> Result<TaskFuture<T>> {
        let bytes = crate::args::encode(value, || {
            format!("the scattered {}", std::any::type_name::<T>())
        })?;
        let type_name = std::any::type_name::<T>();
        let short = type_name
            .split('<')
            .next()
            .unwrap_or(type_name)
            .rsplit("::")
            .next()
            .unwrap_or("data");
        let key = if options.hash {
            format!("{short}-{}", content_hash("scatter", 0, &bytes))
        } else {
            format!("{short}-{}", flotilla_proto::new_id())
        };
        let (state, fresh) = self.inner.register(&key);
        if fresh {
            // A release of this key already on its way to Redis must land
            // before the new hold, or it would delete the new data.
            self.inner.barrier().await?;
        }
        let sealed = self.inner.codec.result_ok_arg(&key, &bytes);
        self.inner
            .store
            .scatter_large(&key, &self.inner.id, &sealed.pieces())
            .await?;
        state.set_finished((bytes.len() <= INLINE_SCATTER).then_some(bytes));
        Ok(TaskFuture::from_state(state, self.inner.clone()))
    }

    /// Scatters every value; futures come back in order.
    pub async fn scatter_many<T: Serialize>(
        &self,
        values: impl IntoIterator<Item = T>,
    ) -> Result<Vec<TaskFuture<T>>> {
        let mut futures = Vec::new();
        for value in values {
            futures.push(self.scatter(&value).await?);
        }
        Ok(futures)
    }

    /// A future for `key`, submitted by any client (or scattered, or
    /// published), which this client now also holds and waits on. If no task
    /// and no result exist under the key, the future ends in
    /// [`Error::Lost`].
    pub fn get_future<T>(&self, key: &str) -> TaskFuture<T> {
        if let Err(error) = check_key(key) {
            return self.failed(key, error);
        }
        let (state, fresh) = self.inner.register(key);
        if fresh {
            self.inner.send(Op::Hold(key.to_owned()));
        }
        TaskFuture::from_state(state, self.inner.clone())
    }

    /// Cancels the tasks (and their dependents); with `force`, running ones
    /// are stopped too: an async task is aborted, a synchronous one sees
    /// `ctx.is_cancelled()`.
    pub fn cancel<T>(&self, futures: &[TaskFuture<T>], force: bool) {
        crate::future::cancel(&self.inner, futures, force)
    }

    /// Runs failed tasks again (and their failed inputs).
    pub fn retry<T>(&self, futures: &[TaskFuture<T>]) {
        crate::future::retry(&self.inner, futures)
    }

    /// Publishes `futures` under `name`, so that any client can fetch them
    /// with [`Client::get_dataset`]; their results stay stored until
    /// [`Client::unpublish_dataset`]. Fails if the name is taken.
    pub async fn publish_dataset<T>(&self, name: &str, futures: &[TaskFuture<T>]) -> Result<()> {
        let keys: Vec<String> = futures.iter().map(|f| f.key().to_owned()).collect();
        self.flush().await?;
        let mut redis = self.redis();
        let created: bool = redis::cmd("HSETNX")
            .arg(self.inner.names.datasets_key())
            .arg(name)
            .arg(rmp_serde::to_vec(&keys).unwrap_or_default())
            .query_async(&mut redis)
            .await?;
        if !created {
            return Err(Error::Config(format!(
                "a dataset named {name:?} is already published"
            )));
        }
        let holder = dataset_holder(name);
        let mut holds = self.inner.store.batch();
        for key in &keys {
            holds.hold(key, &holder);
        }
        holds.exec().await?;
        Ok(())
    }

    /// The futures published under `name`.
    pub async fn get_dataset<T>(&self, name: &str) -> Result<Vec<TaskFuture<T>>> {
        let bytes: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.inner.names.datasets_key())
            .arg(name)
            .query_async(&mut self.redis())
            .await?;
        let bytes = bytes
            .ok_or_else(|| Error::Config(format!("no dataset named {name:?} is published")))?;
        let keys: Vec<String> = rmp_serde::from_slice(&bytes).map_err(|e| Error::Decode {
            key: name.to_owned(),
            type_name: "dataset",
            message: e.to_string(),
        })?;
        Ok(keys.iter().map(|key| self.get_future(key)).collect())
    }

    /// Names of the published datasets.
    pub async fn list_datasets(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = redis::cmd("HKEYS")
            .arg(self.inner.names.datasets_key())
            .query_async(&mut self.redis())
            .await?;
        names.sort();
        Ok(names)
    }

    /// Removes a published dataset; its results are freed once nothing else
    /// holds them.
    pub async fn unpublish_dataset(&self, name: &str) -> Result<()> {
        let mut redis = self.redis();
        let bytes: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.inner.names.datasets_key())
            .arg(name)
            .query_async(&mut redis)
            .await?;
        let Some(bytes) = bytes else {
            return Err(Error::Config(format!(
                "no dataset named {name:?} is published"
            )));
        };
        let keys: Vec<String> = rmp_serde::from_slice(&bytes).unwrap_or_default();
        redis::cmd("HDEL")
            .arg(self.inner.names.datasets_key())
            .arg(name)
            .query_async::<()>(&mut redis)
            .await?;
        let holder = dataset_holder(name);
        let holds: Vec<(String, String)> =
            keys.into_iter().map(|key| (key, holder.clone())).collect();
        let forgotten = self.inner.store.release(&holds).await?;
        if !forgotten.is_empty() {
            self.inner.send(Op::Forget(forgotten));
        }
        Ok(())
    }

    /// Waits until everything submitted or released so far has reached
    /// Redis and the broker. Fails with [`Error::Redis`] when Redis kept
    /// failing or refusing (over its `maxmemory`) the reference updates of
    /// something submitted for 20 s: those submissions' futures fail with
    /// the same error.
    pub async fn flush(&self) -> Result<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.inner.send(Op::Flush(done));
        wait.await.map_err(|_| Error::Closed)?
    }

    /// Sends what is queued; gives up the lease when nothing is held any more.
    pub(crate) async fn finish(&self) {
        let _ = self.flush().await;
        if self.inner.table().is_empty() {
            let _ = self.inner.store.drop_lease(&self.inner.id).await;
        }
    }

    /// Releases everything this client holds and closes its connections.
    /// Other handles of the client stop working.
    pub async fn close(self) -> Result<()> {
        let keys: Vec<String> = self.inner.table().drain().map(|(k, _)| k).collect();
        for key in keys {
            self.inner.send(Op::Release(key));
        }
        let _ = self.flush().await;
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // No more lease renewals or events: handles still alive elsewhere
        // must not bring the lease back.
        for task in self
            .inner
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
        let _ = self.inner.store.drop_lease(&self.inner.id).await;
        let connection = self
            .inner
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Already closing (its channels went with the aborted tasks) is
        // closed enough.
        transport::close(&connection, "client closing").await;
        Ok(())
    }
}

impl<T> FutureRef<T> {
    /// A future of the referenced task, held by `client`.
    pub fn resolve(&self, client: &Client) -> TaskFuture<T> {
        client.get_future(self.key())
    }
}

/// Marks `future` so that it runs even when no handle on it is left; its
/// result is not kept (Dask's `fire_and_forget`).
pub fn fire_and_forget<T>(future: &TaskFuture<T>) {
    future
        .client
        .send(Op::FireAndForget(future.key().to_owned()));
}

/// Keys become Redis hash tags and queue routing: no braces, no blanks.
fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.len() > 512
        || key
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace())
    {
        return Err(Error::Config(format!(
            "invalid key {key:?}: use 1 to 512 characters without braces or blanks"
        )));
    }
    Ok(())
}

/// Arguments from this size on are hashed with SHA-256 rather than FNV-1a.
const LARGE_CONTENT: usize = 64 << 10;

/// A deterministic key suffix from the task's name, signature and arguments
/// (FNV-1a, 128 bits; for [`LARGE_CONTENT`] bytes and more, the first 128
/// bits of SHA-256: a large scattered value is hashed at memory speed, and
/// two values of a key can never be told apart by chance).
pub(crate) fn content_hash(name: &str, fingerprint: u64, args: &[u8]) -> String {
    if args.len() >= LARGE_CONTENT {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(name.as_bytes());
        context.update(&[0]);
        context.update(&fingerprint.to_le_bytes());
        context.update(args);
        let digest = context.finish();
        return digest.as_ref()[..16]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
    }
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for byte in name
        .bytes()
        .chain(fingerprint.to_le_bytes())
        .chain(args.iter().copied())
    {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    format!("{hash:032x}")
}

#[cfg(test)]
mod tests {
    use super::{check_key, content_hash};

    #[test]
    fn content_hashes_are_stable_and_distinct() {
        let a = content_hash("m::add", 1, &[1, 2]);
        assert_eq!(a, content_hash("m::add", 1, &[1, 2]));
        assert_ne!(a, content_hash("m::add", 2, &[1, 2]));
        assert_ne!(a, content_hash("m::add", 1, &[2, 1]));
        assert_eq!(a.len(), 32);
        let large = vec![5u8; super::LARGE_CONTENT];
        let b = content_hash("scatter", 0, &large);
        assert_eq!(b.len(), 32);
        assert_eq!(b, content_hash("scatter", 0, &large));
        assert_ne!(b, content_hash("scatter", 1, &large));
        let mut changed = large.clone();
        changed[super::LARGE_CONTENT - 1] = 6;
        assert_ne!(b, content_hash("scatter", 0, &changed));
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("add-1").is_ok());
        for bad in ["", "a b", "a{b", "x}"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }
}
