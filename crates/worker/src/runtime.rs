//! The worker process: consumes task bundles, runs them, stores results and
//! publishes completion events.
//!
//! A delivery is acknowledged only after every task in it has its result in
//! Redis and its completion event confirmed by the broker, so a worker that
//! dies mid-task gets its tasks redelivered elsewhere. Results are written
//! and events published in batches by one completion loop.

use crate::bundle::{
    admit, checked, retrying, Admit, BundleId, Completion, Effect, Fence, Queue, WorkerCore, Write,
};
use crate::chain::{Awaiting, Handoff};
use crate::kept::{DataOptions, Kept};
use crate::panic::{install_hook, run_sync, CatchUnwind};
use crate::registry::{registry, Invocation, TaskOutcome};
use crate::slot::{Slot, Window};
use crate::{Arguments, TaskContext, WorkerState};
use bytes::Bytes;
use flotilla_proto::{
    Codec, Config, ErrorKind, EventBatch, Names, Purpose, ReplayGuard, RunTask, TaskError,
    ToScheduler, ToWorker, WorkerInfo,
};
use flotilla_runtime::store::{task_holder, Batch, Store, CHUNKED_MIN, LARGE_RESULT};
use flotilla_runtime::supervise::{Attempts, Stop};
use flotilla_runtime::transport::{self, name};
use flotilla_runtime::values::{Opened, Reader};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::Acker;
use lapin::Channel;
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

/// How often a worker announces itself to the scheduler.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Bytes of large inputs a worker keeps for reuse by later tasks.
const INPUT_CACHE_BYTES: usize = 512 << 20;
/// A task still running after this long is reported as started.
const STARTED_AFTER: Duration = Duration::from_millis(50);
/// Most completions stored and published together.
const MAX_COMPLETION_BATCH: usize = 1024;
/// How long a worker remembers a key the scheduler withdrew before it ran
/// here (see `Shared::withdrawn`).
const WITHDRAWN_FOR: Duration = Duration::from_secs(600);
/// The default of [`WorkerOptions::shed_after`].
pub const SHED_AFTER: Duration = Duration::from_secs(1);
/// How often a worker looks whether its slots are stuck (see
/// [`WorkerOptions::shed_after`]), and, while they are, gives back the
/// deliveries that arrived since.
const SHED_TICK: Duration = Duration::from_millis(100);

/// A value every [`TaskContext`] of a worker carries, made once per worker by
/// a library layered on the runtime (the `flotilla` client registers one so
/// that tasks can submit tasks). Registered with `inventory::submit!`.
#[derive(Debug)]
pub struct ContextExtension {
    make: fn(&Config) -> Arc<dyn Any + Send + Sync>,
}

impl ContextExtension {
    /// An extension made by `make` from the worker's configuration.
    pub const fn new(make: fn(&Config) -> Arc<dyn Any + Send + Sync>) -> Self {
        ContextExtension { make }
    }
}

inventory::collect!(ContextExtension);

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerOptions {
    /// Where the cluster lives.
    pub config: Config,
    /// Tasks run at once (Dask's threads per worker).
    pub nthreads: usize,
    /// Human-readable name; defaults to host name and process id.
    pub name: Option<String>,
    /// Deliveries of the shared task queue held unacknowledged, fixed (no
    /// shedding then). By default `max(64 × nthreads, 256)`, for the
    /// throughput of small tasks, narrowed to one per slot while the
    /// worker sheds (see [`WorkerOptions::shed_after`]).
    pub prefetch: Option<u16>,
    /// Always hold one delivery of the shared task queue per free slot,
    /// following the slots as tasks lend them while they wait (see
    /// ARCHITECTURE.md, §7), as Celery's `worker_prefetch_multiplier = 1`.
    /// Costs small tasks' throughput: each slot waits a round trip for its
    /// next delivery. Ignored when [`WorkerOptions::prefetch`] is set.
    pub prefetch_per_slot: bool,
    /// Shed after this long (default [`SHED_AFTER`]; `None`: never): when
    /// every slot has held the same task this long, the worker narrows its
    /// window to one delivery per slot and gives back to the queue, for
    /// other workers, every delivery of the shared queue none of whose
    /// tasks started; when a slot frees it widens the window again. So no
    /// task waits here behind a long one while another worker could run
    /// it, and small tasks keep the generous window. Ignored when
    /// [`WorkerOptions::prefetch`] is set.
    pub shed_after: Option<Duration>,
    /// The AMQP heartbeat to ask the broker for, in seconds (`0`: the
    /// broker's; a `heartbeat` in the AMQP URL wins). A worker that stops
    /// answering for two heartbeats loses its connection, and the broker
    /// hands its deliveries to other workers. Defaults to
    /// [`transport::WORKER_HEARTBEAT_SECS`].
    pub heartbeat: Option<u16>,
    /// Abstract resources this worker offers (`("GPU", 1)`): tasks that
    /// need them are placed here, and run only while enough are free.
    pub resources: Vec<(String, u64)>,
    /// Resident memory (bytes) above which the worker takes no new work:
    /// deliveries go back to the queue for other workers until it drops.
    pub memory_limit: Option<u64>,
    /// Retire when a synchronous task runs past its hard time limit: its
    /// thread cannot be stopped, so once its `TimedOut` error is stored and
    /// its delivery acknowledged, the worker stops taking work, leaves the
    /// tasks it has not started to the broker (which gives them to other
    /// workers), lets its running tasks finish as a SIGTERM drain does, and
    /// [`run`] returns [`WorkerError::Retired`] for the process to be
    /// replaced. The `flotilla-worker` binary (`flotilla::worker::main`)
    /// turns it on and then re-executes itself or exits (`--on-stuck`).
    /// Off by default, and for workers inside a user's process
    /// (`LocalCluster`, [`WorkerHandle::spawn`]): there the abandoned
    /// thread runs on, without a slot, and the worker keeps working.
    pub retire_when_stuck: bool,
    /// Keep large results here and serve them over a data connection
    /// (issue 15; see [`DataOptions`]); `None`: every result goes to Redis.
    pub data: Option<DataOptions>,
    /// Write this file after every heartbeat it published and before
    /// each reconnection attempt, for a liveness probe (see
    /// [`crate::health`]); `None` (the default): no file.
    pub health_file: Option<std::path::PathBuf>,
    /// Values built once for this worker and lent to every task that asks
    /// (a `State<T>` parameter or `TaskContext::state`); shared, not
    /// copied, by the clones of these options and across reconnections.
    /// Empty by default: a task asking for state then fails with a
    /// `flotilla::MissingState` error naming the type.
    ///
    /// ```
    /// use flotilla_worker::{WorkerOptions, WorkerState};
    ///
    /// struct Greeting(&'static str);
    ///
    /// let mut options = WorkerOptions::new(Default::default());
    /// options.state = WorkerState::new().with(Greeting("hello")).into();
    /// assert_eq!(options.state.get::<Greeting>().unwrap().0, "hello");
    /// ```
    pub state: Arc<WorkerState>,
}

impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("config", &self.config)
            .field("nthreads", &self.nthreads)
            .field("name", &self.name)
            .field("prefetch", &self.prefetch)
            .field("prefetch_per_slot", &self.prefetch_per_slot)
            .field("shed_after", &self.shed_after)
            .field("heartbeat", &self.heartbeat)
            .field("resources", &self.resources)
            .field("memory_limit", &self.memory_limit)
            .field("retire_when_stuck", &self.retire_when_stuck)
            .field("data", &self.data)
            .field("health_file", &self.health_file)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl WorkerOptions {
    /// Options for `config` with one slot per CPU.
    pub fn new(config: Config) -> Self {
        WorkerOptions {
            config,
            nthreads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            name: None,
            prefetch: None,
            prefetch_per_slot: false,
            shed_after: Some(SHED_AFTER),
            heartbeat: None,
            resources: Vec::new(),
            memory_limit: None,
            retire_when_stuck: false,
            data: Some(DataOptions::default()),
            health_file: None,
            state: Arc::default(),
        }
    }
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(#[from] flotilla_proto::ConfigError),
    /// RabbitMQ failed.
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    /// Redis failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A consumer closed under the worker.
    #[error("RabbitMQ closed the worker's consumer")]
    Closed,
    /// The data connection could not listen on its address.
    #[error("data connection: cannot listen on {addr}: {source}")]
    DataListen {
        /// The address asked for ([`DataOptions::listen`]).
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The worker retired ([`WorkerOptions::retire_when_stuck`]): the
    /// synchronous task `task` ran past its hard time limit and its thread
    /// cannot be stopped. The task's `TimedOut` error is stored, the worker
    /// has drained and closed its connections; replace the process (the
    /// `flotilla-worker` binary re-executes itself or exits with status 75).
    #[error(
        "retired: the synchronous task `{task}` ran past its time limit and its thread cannot \
         be stopped; replace this worker's process"
    )]
    Retired {
        /// The key of the task whose thread is stuck.
        task: String,
    },
}

/// A worker running inside this process (for `LocalCluster` and tests).
#[derive(Debug)]
pub struct WorkerHandle {
    id: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), WorkerError>>,
}

impl WorkerHandle {
    /// Starts a worker on the current runtime; returns once it consumes.
    pub async fn spawn(options: WorkerOptions) -> Result<Self, WorkerError> {
        let (stop, stopped) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(supervise(
            options,
            async move {
                let _ = stopped.await;
            },
            Some(ready_tx),
        ));
        match ready_rx.await {
            Ok(id) => Ok(WorkerHandle {
                id,
                stop: Some(stop),
                task,
            }),
            Err(_) => match task.await {
                Ok(Err(error)) => Err(error),
                _ => Err(WorkerError::Closed),
            },
        }
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops the worker: it stops taking work, finishes what it runs, and
    /// closes its connections.
    pub async fn shutdown(mut self) -> Result<(), WorkerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap_or(Ok(()))
    }

    /// Stops the worker at once, as if its process died: running tasks are
    /// dropped unacknowledged and the broker redelivers them.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// Runs a worker until `shutdown` completes or a connection fails.
pub async fn run(
    options: WorkerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    supervise(options, shutdown, None).await
}

/// A task running on this worker, for cancellation.
struct Running {
    ctx: TaskContext,
    abort: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

/// Unregisters a running task when dropped.
struct RunningGuard<'a> {
    shared: &'a Shared,
    key: String,
    entry: Arc<Running>,
}

impl RunningGuard<'_> {
    fn set_abort(&self, handle: tokio::task::AbortHandle) {
        *self.entry.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        if self.entry.ctx.is_cancelled() {
            self.entry.cancel();
        }
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if running
            .get(&self.key)
            .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
        {
            running.remove(&self.key);
        }
    }
}

impl Running {
    fn cancel(&self) {
        self.ctx.cancel();
        if let Some(abort) = &*self.abort.lock().unwrap_or_else(|p| p.into_inner()) {
            abort.abort();
        }
    }
}

struct Shared {
    cache: crate::cache::InputCache,
    /// Outcomes handed from a task to the next of its chain (see
    /// [`crate::chain`]).
    handoffs: Arc<crate::chain::Handoffs>,
    /// Opens stored results, fetching kept values from their workers.
    reader: Reader,
    running: std::sync::Mutex<HashMap<String, Arc<Running>>>,
    /// Keys the scheduler asked to stop while they were not running here
    /// (queued in the broker, or waiting for a slot), and when: see
    /// [`Shared::withdrawn`].
    withdrawn: std::sync::Mutex<HashMap<String, Instant>>,
    resources: HashMap<String, Arc<Semaphore>>,
    id: String,
    config: Config,
    /// The task-life keys in Redis (results, specs, custody).
    store: Store,
    slots: Arc<Semaphore>,
    completions: mpsc::UnboundedSender<Completion>,
    extension: Option<Arc<dyn Any + Send + Sync>>,
    /// The values lent to tasks ([`WorkerOptions::state`]).
    state: Arc<WorkerState>,
    /// The bundles held and the tasks in custody (see [`WorkerCore`]).
    core: Arc<std::sync::Mutex<WorkerCore<Acker>>>,
    /// Start records of redelivered tasks (see [`crate::lost`]).
    ledger: crate::lost::Ledger,
    /// Signs what the worker sends and checks what it reads.
    codec: Codec,
    /// The signed messages this worker took from its queues.
    guard: ReplayGuard,
    /// The highest scheduler epoch seen on a bundle.
    fence: Fence,
    /// The task deliveries to hold (the consuming channel's prefetch).
    window: Arc<Window>,
    /// Whether to retire when a synchronous task is abandoned, and the
    /// first one that was (see [`WorkerOptions::retire_when_stuck`]).
    stuck: Stuck,
}

/// The synchronous task past its limit that makes a worker retire.
#[derive(Default)]
struct Stuck {
    /// [`WorkerOptions::retire_when_stuck`].
    retire: bool,
    /// The first abandoned task's key: set once, when retiring.
    task: std::sync::OnceLock<String>,
    /// Wakes the worker's loop (a permit is kept if it is busy).
    noticed: tokio::sync::Notify,
    /// Tasks received but left unstarted since retiring began.
    unstarted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Stuck {
    fn new(retire: bool) -> Self {
        Stuck {
            retire,
            ..Stuck::default()
        }
    }

    /// Notes that `key`'s thread is abandoned; whether this worker retires.
    fn abandoned(&self, key: &str) -> bool {
        if self.retire && self.task.set(key.to_owned()).is_ok() {
            self.noticed.notify_one();
        }
        self.retire
    }

    /// Whether the worker is retiring, so that `key`, not started yet,
    /// stays unstarted (and is counted).
    fn leaves_unstarted(&self, key: &str) -> bool {
        let retiring = self.task.get().is_some();
        if retiring {
            self.unstarted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            debug!(%key, "worker retiring: task left unstarted");
        }
        retiring
    }

    /// Completes with the stuck task's key once the worker is to retire
    /// (never, unless retiring is on).
    async fn wait(&self) -> String {
        loop {
            if let Some(task) = self.task.get() {
                return task.clone();
            }
            self.noticed.notified().await;
        }
    }
}

impl Shared {
    fn core(&self) -> std::sync::MutexGuard<'_, WorkerCore<Acker>> {
        lock(&self.core)
    }

    /// Registers a running task so that it can be cancelled.
    fn running(&self, key: &str, ctx: TaskContext) -> RunningGuard<'_> {
        let entry = Arc::new(Running {
            ctx,
            abort: std::sync::Mutex::new(None),
        });
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), entry.clone());
        RunningGuard {
            shared: self,
            key: key.to_owned(),
            entry,
        }
    }

    /// Stops running tasks: an async task is aborted, a sync one sees
    /// `ctx.is_cancelled()`. The others are noted, in case they are still
    /// on their way here (see [`Shared::withdrawn`]).
    fn cancel(&self, keys: &[String]) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut withdrawn = self.withdrawn.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        withdrawn.retain(|_, at| now.duration_since(*at) < WITHDRAWN_FOR);
        for key in keys {
            if let Some(entry) = running.get(key) {
                info!(%key, "cancelling a running task");
                entry.cancel();
            } else {
                withdrawn.insert(key.clone(), now);
            }
        }
    }

    /// Whether `key`, about to start, was withdrawn for good: the scheduler
    /// asked to stop it before it ran here, and its spec is gone from Redis
    /// (the scheduler dropped it: nothing holds it any more, as when its
    /// client died). A task merely cancelled keeps its spec for `retry` and
    /// runs as before. Costs a Redis round trip only for noted keys.
    async fn withdrawn(&self, key: &str) -> bool {
        let noted = self
            .withdrawn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .is_some();
        if !noted {
            return false;
        }
        let exists = self.store.specs_exist(&[key.to_owned()]).await;
        matches!(exists.as_deref(), Ok([false]))
    }

    /// Takes the abstract resources a task needs for as long as it runs.
    async fn acquire_resources(
        &self,
        wanted: &[(String, u64)],
    ) -> Vec<tokio::sync::OwnedSemaphorePermit> {
        let mut permits = Vec::new();
        for (name, amount) in wanted {
            if let Some(semaphore) = self.resources.get(name) {
                let amount = u32::try_from(*amount).unwrap_or(u32::MAX);
                if let Ok(permit) = semaphore.clone().acquire_many_owned(amount).await {
                    permits.push(permit);
                }
            }
        }
        permits
    }
}

fn lock<D>(core: &std::sync::Mutex<WorkerCore<D>>) -> std::sync::MutexGuard<'_, WorkerCore<D>> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

/// Carries out what the core decided about deliveries.
async fn settle(effects: Vec<Effect<Acker>>) {
    for effect in effects {
        match effect {
            Effect::Ack(acker) => {
                if let Err(error) = acker.ack(BasicAckOptions::default()).await {
                    warn!(%error, "could not acknowledge a delivery; it will be redelivered");
                }
            }
            Effect::Requeue(acker) | Effect::Shed(acker) => {
                let _ = acker.reject(BasicRejectOptions { requeue: true }).await;
            }
            Effect::Renew { keys, .. } => {
                warn!(
                    tasks = keys.len(),
                    "custody renewal asked outside a hand-off; ignored"
                );
            }
        }
    }
}

/// Acknowledges a long-held delivery now and puts its unfinished tasks in
/// custody (see [`flotilla_runtime::custody`]), unless it is already
/// settled.
async fn hand_off(shared: &Shared, bundle: BundleId) {
    let effects = shared.core().hand_off(bundle);
    for effect in effects {
        let Effect::Renew { bundle, keys } = effect else {
            settle(vec![effect]).await;
            continue;
        };
        let lease = shared.config.custody_lease();
        let renewed = match shared.store.renew_custody(&keys, lease).await {
            Ok(()) => {
                info!(
                    tasks = keys.len(),
                    "a long-held delivery is acknowledged; its tasks are kept in custody"
                );
                true
            }
            Err(error) => {
                warn!(%error, "could not take tasks into custody; keeping the delivery");
                false
            }
        };
        let (effects, in_custody) = {
            let mut core = shared.core();
            let effects = core.custody_renewed(bundle, &keys, renewed);
            (effects, core.in_custody())
        };
        shared.window.set_custody(in_custody);
        settle(effects).await;
    }
}

/// Runs the worker until `shutdown`, starting afresh (under a new id)
/// whenever RabbitMQ or Redis is lost after it was first up: tasks running
/// at the loss are stopped, since the broker hands their deliveries to
/// another consumer, and each attempt reconnects with growing pauses. A
/// failure before the first start-up is returned at once. A retirement
/// ([`WorkerOptions::retire_when_stuck`]) ends it too, unless a stop was
/// asked for meanwhile: the stop wins, and the worker just stops.
async fn supervise(
    options: WorkerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    mut ready: Option<oneshot::Sender<String>>,
) -> Result<(), WorkerError> {
    install_hook();
    options.config.validate()?;
    // The data connection lives as long as the process: kept values
    // outlive a reconnection to the broker.
    let data = match &options.data {
        Some(data) => Some(start_data(&options.config, data).await?),
        None => None,
    };
    let kept = data.as_ref().map(|(kept, _, _)| kept.clone());
    // Aborted (a `WorkerHandle::kill`, as if the process died), the data
    // connection stops with the worker.
    let _data_stops = data
        .as_ref()
        .map(|(_, shutdown, _)| shutdown.clone().drop_guard());
    let result = async {
        let stop = Stop::new(shutdown);
        let mut attempts = Attempts::default();
        let health = crate::health::HealthFile::new(options.health_file.clone());
        let mut reconnecting = false;
        loop {
            if reconnecting {
                // Trying to get back to the broker is being alive.
                health.touch();
            }
            reconnecting = true;
            let mut up = false;
            let result = run_inner(&options, &stop, &mut ready, &mut up, kept.clone()).await;
            if let Err(WorkerError::Retired { .. }) = result {
                return if stop.requested() { Ok(()) } else { result };
            }
            if let Some(done) = attempts.settle(result, up, &stop, "reconnecting").await {
                return done;
            }
        }
    }
    .await;
    if let Some((kept, shutdown, serving)) = data {
        kept.warn_if_any();
        shutdown.cancel();
        let _ = serving.await;
        drop(kept);
        // The process' shared-memory directory, once no value is left in it.
        flotilla_runtime::shm::leave();
    }
    result
}

/// Binds the worker's data connection and serves its kept values.
async fn start_data(
    config: &Config,
    options: &DataOptions,
) -> Result<
    (
        Arc<Kept>,
        flotilla_runtime::data::CancellationToken,
        JoinHandle<()>,
    ),
    WorkerError,
> {
    use flotilla_runtime::data::{CancellationToken, DataServer, DataServerOptions, Keep};
    // Large results in shared memory, for readers on this host.
    let shm = config.shm_dir.as_deref().and_then(|dir| {
        flotilla_runtime::shm::install(dir)
            .inspect_err(
                |error| warn!(%error, dir = %dir.display(), "no shared memory for large values"),
            )
            .ok()
    });
    let keep = Keep::new();
    let server = DataServer::bind(
        &options.listen,
        keep.clone(),
        Codec::new(config),
        DataServerOptions::default().shm_domain(shm.map(|shm| shm.domain().to_owned())),
    )
    .await
    .map_err(|source| WorkerError::DataListen {
        addr: options.listen.clone(),
        source,
    })?
    .with_handover(Arc::new(|stream, header| {
        Box::pin(crate::actors::accept_direct(stream, header))
    }));
    let addr = crate::kept::advertised(server.local_addr(), options.advertise.as_deref());
    info!(listen = %server.local_addr(), advertised = %addr, keep_min = options.keep_min, memory = ?options.memory, shm = ?shm.map(|shm| shm.root()), "data connection up");
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(shutdown.clone()));
    Ok((
        Arc::new(
            Kept::new(keep, addr, options.keep_min)
                .with_memory(options.memory, crate::kept::SPILL_GRACE),
        ),
        shutdown,
        serving,
    ))
}

/// One connected life of the worker; `up` is set once it consumes.
async fn run_inner(
    options: &WorkerOptions,
    stop: &Stop,
    ready: &mut Option<oneshot::Sender<String>>,
    up: &mut bool,
    kept: Option<Arc<Kept>>,
) -> Result<(), WorkerError> {
    let config = options.config.clone();
    let names = config.names();
    let id = flotilla_proto::new_id();
    let display_name = options.name.clone().unwrap_or_else(default_name);

    let amqp_url = transport::with_heartbeat(
        &config.amqp_url,
        options
            .heartbeat
            .unwrap_or(transport::WORKER_HEARTBEAT_SECS),
    );
    let connection = transport::connect_amqp(
        &amqp_url,
        &format!("flotilla-worker {display_name} ({})", names.namespace()),
    )
    .await?;
    // Heartbeats and results wait out a broker alarm: say so once.
    flotilla_runtime::blocked::log_blocked(&connection, "worker");
    let life = Life {
        id,
        name: display_name,
        kept,
    };
    let result = serve(options, stop, ready, up, &connection, life).await;
    transport::close(&connection, "worker stopping").await;
    result
}

/// Who the worker is for one connected life.
struct Life {
    /// Its id (new for each life).
    id: String,
    /// Its display name.
    name: String,
    /// The large results the process keeps (they outlive a reconnection).
    kept: Option<Arc<Kept>>,
}

/// Declares, consumes and runs the worker's loop on `connection`.
async fn serve(
    options: &WorkerOptions,
    stop: &Stop,
    ready: &mut Option<oneshot::Sender<String>>,
    up: &mut bool,
    connection: &lapin::Connection,
    life: Life,
) -> Result<(), WorkerError> {
    let Life {
        id,
        name: display_name,
        kept,
    } = life;
    let config = options.config.clone();
    let names = config.names();
    let nthreads = options.nthreads.max(1);
    // This worker's own queue (control messages, tasks pinned here) has a
    // generous window of its own: a cancel must never wait behind tasks,
    // and pinned tasks can run nowhere else anyway. The shared queue has
    // the same by default, for small tasks' throughput.
    let wide_prefetch = u16::try_from((nthreads * 64).max(256)).unwrap_or(u16::MAX);
    let own_prefetch = wide_prefetch;
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    transport::declare_topology(&publish, &names, config.queue_type).await?;
    let own_queue = names.worker_queue(&id);
    let control = names.control_exchange();
    transport::declare_private_queue(
        &publish,
        &names,
        config.queue_type,
        &own_queue,
        Some((&control, "")),
    )
    .await?;
    let mut redis = transport::connect_redis(&config.redis_url).await?;
    flotilla_runtime::incarnation::check_eviction(&mut redis, config.allow_eviction).await?;
    let store = Store::redis(redis.clone(), names.clone());
    store.preload().await?;
    flotilla_runtime::seal::check_fingerprint(&mut redis.clone(), &names, &Codec::new(&config))
        .await?;

    let (completions, completion_rx) = mpsc::unbounded_channel();
    let codec = Codec::new(&config);
    let data_options = flotilla_runtime::data::DataClientOptions::for_config(&config);
    let reader = match &kept {
        Some(kept) => Reader::with_local(
            codec.clone(),
            data_options,
            kept.addr().to_owned(),
            kept.keep().clone(),
        ),
        None => Reader::with_options(codec.clone(), data_options),
    };
    let sweeper = kept.clone().map(|kept| {
        let store = store.clone();
        tokio::spawn(async move { kept.sweep_loop(store).await })
    });
    let shared = Arc::new(Shared {
        reader,
        handoffs: Arc::default(),
        cache: crate::cache::InputCache::new(INPUT_CACHE_BYTES),
        running: std::sync::Mutex::new(HashMap::new()),
        resources: options
            .resources
            .iter()
            .map(|(name, amount)| {
                let permits = usize::try_from(*amount)
                    .unwrap_or(usize::MAX)
                    .min(Semaphore::MAX_PERMITS);
                (name.clone(), Arc::new(Semaphore::new(permits)))
            })
            .collect(),
        id: id.clone(),
        config: config.clone(),
        store: store.clone(),
        slots: Arc::new(Semaphore::new(nthreads)),
        completions,
        ledger: crate::lost::Ledger::new(
            store.clone(),
            format!("{display_name} ({id})"),
            config.allowed_failures,
            nthreads,
        ),
        extension: inventory::iter::<ContextExtension>
            .into_iter()
            .next()
            .map(|extension| (extension.make)(&config)),
        state: options.state.clone(),
        core: Arc::default(),
        withdrawn: std::sync::Mutex::default(),
        codec,
        guard: ReplayGuard::new(),
        fence: Fence::default(),
        window: Window::new(nthreads),
        stuck: Stuck::new(options.retire_when_stuck),
    });
    let lost = Arc::new(tokio::sync::Notify::new());
    let liveness = Arc::new(Liveness::new());
    let completer = tokio::spawn(complete_loop(
        completion_rx,
        store,
        publish.clone(),
        names.clone(),
        shared.codec.clone(),
        id.clone(),
        Holdings {
            handoffs: shared.handoffs.clone(),
            kept: kept.clone(),
            core: shared.core.clone(),
            window: shared.window.clone(),
            watchdog: Watchdog {
                liveness: liveness.clone(),
                lost: lost.clone(),
            },
        },
    ));
    let ticker = {
        let liveness = liveness.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LIVENESS_TICK);
            loop {
                tick.tick().await;
                liveness.tick();
            }
        })
    };
    let custodian = tokio::spawn(renew_custody(shared.clone()));

    let (rss_bytes, cpu_ms) = crate::usage::read();
    let info = WorkerInfo {
        id: id.clone(),
        name: display_name.clone(),
        slots: nthreads as u32,
        tasks: registry()
            .values()
            .map(|r| (r.name().to_owned(), r.fingerprint()))
            .collect(),
        resources: options.resources.clone(),
        rss_bytes,
        cpu_ms,
    };
    let codec = shared.codec.clone();
    announce(&publish, &names, &codec, &ToScheduler::Worker(info.clone())).await?;
    let health = crate::health::HealthFile::new(options.health_file.clone());
    health.touch();
    let heartbeat = {
        let publish = publish.clone();
        let names = names.clone();
        let codec = codec.clone();
        let mut info = info;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                (info.rss_bytes, info.cpu_ms) = crate::usage::read();
                match announce(&publish, &names, &codec, &ToScheduler::Worker(info.clone())).await {
                    Ok(()) => health.touch(),
                    Err(error) => warn!(%error, "heartbeat failed"),
                }
            }
        })
    };

    // --- actors: the host of this worker's actors (own connection and
    // exclusive actor queue), up before any creation task can arrive; it
    // stops, and the queue vanishes, when this function ends or is aborted.
    let data_addr = kept.as_ref().map(|kept| kept.addr().to_owned());
    let _actors =
        crate::actors::ActorHost::start(&config, &id, shared.store.clone(), data_addr).await?;
    // --- end actors ---
    // The shared task queue is consumed on a channel of its own, whose
    // prefetch (channel-wide: RabbitMQ applies a new value to the consumers
    // the channel has) is the wide one, narrowed to the slots while the
    // worker sheds or always with `prefetch_per_slot`, unless fixed; the
    // own queue on another channel.
    //
    // Quorum queues refuse a channel-wide prefetch, and a per-consumer one
    // applies only to consumers that start after it: on them the window is
    // the wide one, fixed (a worker stuck on long tasks still gives back
    // what it holds unstarted, but the broker may offer it here again
    // until another worker takes it).
    let consume = connection.create_channel().await?;
    let quorum = config.queue_type == flotilla_proto::QueueType::Quorum;
    let channel_wide = BasicQosOptions { global: !quorum };
    let steering = (options.prefetch.is_none() && !quorum).then(|| Steering {
        consume: consume.clone(),
        window: shared.window.clone(),
        core: shared.core.clone(),
        slots: shared.slots.clone(),
        wide: if options.prefetch_per_slot {
            None
        } else {
            Some(wide_prefetch)
        },
        shed_after: options.shed_after.filter(|after| !after.is_zero()),
    });
    consume
        .basic_qos(
            match (options.prefetch, &steering) {
                (Some(fixed), _) => fixed,
                (None, Some(steering)) => steering.wanted(false),
                (None, None) => wide_prefetch,
            },
            channel_wide,
        )
        .await?;
    let follower = steering.map(|steering| tokio::spawn(steering.run()));
    let own = connection.create_channel().await?;
    own.basic_qos(own_prefetch, BasicQosOptions::default())
        .await?;
    let (deliveries, mut delivery_rx) = mpsc::unbounded_channel();
    let mut consumers = Vec::new();
    for (channel, queue, origin) in [
        (&consume, names.tasks_queue(), Queue::Shared),
        (&own, own_queue.clone(), Queue::Own),
    ] {
        let tag = format!("{id}.{}", consumers.len());
        let mut consumer = channel
            .basic_consume(
                name(&queue),
                name(&tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push((channel.clone(), tag));
        let deliveries = deliveries.clone();
        tokio::spawn(async move {
            while let Some(delivery) = transport::next_delivery(&mut consumer).await {
                if deliveries
                    .send(delivery.map(|delivery| (origin, delivery)))
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    drop(deliveries);
    info!(worker = %id, name = %display_name, nthreads, namespace = names.namespace(), tasks = registry().len(), "worker started");
    *up = true;
    if let Some(ready) = ready.take() {
        let _ = ready.send(id.clone());
    }

    let shutdown = stop.clone().wait();
    tokio::pin!(shutdown);
    // `Ok(None)`: stopped; `Ok(Some(task))`: retiring because of `task`.
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(None),
            task = shared.stuck.wait() => {
                tracing::error!(
                    worker = %id,
                    task = %task,
                    "retiring this worker: a synchronous task ran past its time limit and its thread \
                     cannot be stopped; its TimedOut error is stored, tasks not started go back to \
                     the queue, running ones finish, then the process is replaced"
                );
                break Ok(Some(task));
            }
            () = lost.notified() => break Err(WorkerError::Closed),
            delivery = delivery_rx.recv() => match delivery {
                Some(Ok((origin, delivery))) => {
                    if let Some(limit) = options.memory_limit.filter(|&limit| resident_bytes() > limit) {
                        // Over the limit: hand the work back, and wait a little
                        // so as not to spin on redeliveries.
                        warn!(limit, resident = resident_bytes(), "over the memory limit: returning work to the queue");
                        let _ = delivery.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    } else {
                        accept(&shared, origin, delivery).await;
                    }
                }
                Some(Err(error)) => {
                    warn!(%error, "consumer failed");
                    break Err(WorkerError::Amqp(error));
                }
                None => break Err(WorkerError::Closed),
            }
        }
    };

    heartbeat.abort();
    custodian.abort();
    ticker.abort();
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    if let Some(follower) = follower {
        follower.abort();
    }
    if result.is_err() {
        // The connection is gone, and with it every unacknowledged
        // delivery: the broker hands them to other consumers, so the tasks
        // running here stop rather than run twice at once.
        let keys: Vec<String> = shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        shared.cancel(&keys);
        completer.abort();
        return result.map(drop);
    }
    // Stop taking work, let running tasks finish and be stored, then leave.
    for (channel, tag) in &consumers {
        let _ = channel.basic_cancel(name(tag), Default::default()).await;
    }
    let _ = shared.slots.acquire_many(nthreads as u32).await;
    let unstarted = shared.stuck.unstarted.clone();
    let store = shared.store.clone();
    drop(shared);
    let _ = completer.await;
    // The values kept here outlive this worker: they go to Redis.
    if let Some(kept) = &kept {
        kept.hand_over_all(&store).await;
    }
    // Only now, with every completion stored and announced: a scheduler
    // told earlier would put the tasks it saw start here back in its ready
    // queue and run them twice.
    let _ = announce(
        &publish,
        &names,
        &codec,
        &ToScheduler::WorkerGone { worker: id.clone() },
    )
    .await;
    if result.as_ref().is_ok_and(Option::is_some) {
        let unstarted = unstarted.load(std::sync::atomic::Ordering::Relaxed);
        info!(worker = %id, unstarted, "worker retired: tasks it had not started go back to the queue");
    }
    info!(worker = %id, "worker stopped");
    match result {
        Ok(Some(task)) => Err(WorkerError::Retired { task }),
        other => other.map(drop),
    }
}

/// Sets the shared queue's prefetch and sheds (see
/// [`WorkerOptions::shed_after`]): the wide window while a slot is free or
/// busy with a young task; the per-slot one of [`Window`] while every slot
/// is stuck, giving back what arrives meanwhile; or always the per-slot
/// one (`wide` is `None`, `--prefetch-per-slot`).
struct Steering {
    consume: Channel,
    window: Arc<Window>,
    core: Arc<std::sync::Mutex<WorkerCore<Acker>>>,
    slots: Arc<Semaphore>,
    wide: Option<u16>,
    shed_after: Option<Duration>,
}

impl Steering {
    /// The prefetch to hold, `stuck` or not.
    fn wanted(&self, stuck: bool) -> u16 {
        match self.wide {
            Some(wide) if !stuck => wide,
            _ => self.window.prefetch(),
        }
    }

    /// Follows the slots until the channel fails.
    async fn run(self) {
        let mut changes = self.window.subscribe();
        let mut applied = self.wanted(false);
        let mut shedding = false;
        let mut given_back = 0u64;
        let mut tick = tokio::time::interval(SHED_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stuck = self
                .shed_after
                .is_some_and(|after| self.window.stuck(self.slots.available_permits(), after));
            if stuck != shedding {
                shedding = stuck;
                if shedding {
                    debug!("every slot is busy with a long task: shedding");
                } else {
                    debug!("a slot is free: the window widens again");
                }
            }
            // Narrowed first, so that the broker stops sending before the
            // deliveries go back (it would offer them here again).
            let wanted = self.wanted(shedding);
            if wanted != applied {
                if let Err(error) = self
                    .consume
                    .basic_qos(wanted, BasicQosOptions { global: true })
                    .await
                {
                    warn!(%error, "could not change the prefetch");
                    return;
                }
                debug!(prefetch = wanted, "prefetch follows the slots");
                applied = wanted;
            }
            if shedding {
                let effects = lock(&self.core).shed();
                if !effects.is_empty() {
                    given_back += effects.len() as u64;
                    info!(
                        deliveries = effects.len(),
                        total = given_back,
                        "every slot is busy with a long task: deliveries not started are given back to the queue"
                    );
                    settle(effects).await;
                    self.window.gave_back();
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = self.window.freed(), if shedding => {}
                _ = tick.tick(), if self.shed_after.is_some() => {}
            }
        }
    }
}

/// How often [`Liveness`] ticks.
const LIVENESS_TICK: Duration = Duration::from_millis(500);
/// A pause of the process this long may have cost it its connection.
const STALL: Duration = Duration::from_secs(3);
/// How long the connection may take to prove it is alive after a stall.
const ALIVE_CHECK: Duration = Duration::from_secs(5);

/// Notices that this process did not run for a while (stopped with
/// `SIGSTOP`, a frozen VM, a swap storm). The broker may have closed its
/// connection meanwhile (missed heartbeats) and handed its deliveries to
/// other workers, which run them again: the results of runs that span
/// such a stall are stored only once the connection proved alive, so that
/// a resumed worker does not write stale duplicates before it notices the
/// loss.
#[derive(Debug)]
struct Liveness {
    origin: Instant,
    /// Milliseconds since `origin` at the last tick.
    last: std::sync::atomic::AtomicU64,
    /// A tick came late: a stall happened and was not yet cleared.
    stalled: std::sync::atomic::AtomicBool,
}

impl Liveness {
    fn new() -> Self {
        Liveness {
            origin: Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
            stalled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn tick(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        let now = self.now_ms();
        let last = self.last.swap(now, AcqRel);
        if now.saturating_sub(last) > STALL.as_millis() as u64 {
            warn!(
                paused_ms = now.saturating_sub(last),
                "this process did not run for a while: checking the connection before storing results"
            );
            self.stalled
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether a stall happened (or is happening: a tick is overdue) since
    /// the last [`Liveness::cleared`].
    fn stalled(&self) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        self.stalled.load(Acquire)
            || self.now_ms().saturating_sub(self.last.load(Acquire)) > STALL.as_millis() as u64
    }

    fn cleared(&self) {
        use std::sync::atomic::Ordering::Release;
        self.last.store(self.now_ms(), Release);
        self.stalled.store(false, Release);
    }
}

/// The bundles the worker holds and the delivery window their custody
/// shapes, as the completion loop settles them; and the watchdog that
/// keeps it from storing results after a stall cost the connection.
struct Holdings {
    core: Arc<std::sync::Mutex<WorkerCore<Acker>>>,
    /// Told when a large value a chained task waits for is stored.
    handoffs: Arc<crate::chain::Handoffs>,
    window: Arc<Window>,
    watchdog: Watchdog,
    /// The large results this worker keeps (see [`crate::kept`]).
    kept: Option<Arc<Kept>>,
}

impl Holdings {
    /// [`WorkerCore::completed`], then the window follows the tasks left
    /// in custody (which hold slots but no delivery).
    fn completed(
        &self,
        batch: &[Completion],
        released: &[String],
        stored: bool,
        published: bool,
    ) -> Vec<Effect<Acker>> {
        let (effects, in_custody) = {
            let mut core = lock(&self.core);
            let effects = core.completed(batch, released, stored, published);
            (effects, core.in_custody())
        };
        self.window.set_custody(in_custody);
        effects
    }
}

/// What the completion loop does after a stall (see [`Liveness`]).
struct Watchdog {
    liveness: Arc<Liveness>,
    /// Told when the connection turned out lost: the worker starts afresh.
    lost: Arc<tokio::sync::Notify>,
}

impl Watchdog {
    /// Whether results may be stored now: no stall happened, or the
    /// connection answered a round trip since.
    async fn connected(&self, publish: &Channel) -> bool {
        if !self.liveness.stalled() {
            return true;
        }
        let answered = publish.status().connected()
            && matches!(
                tokio::time::timeout(
                    ALIVE_CHECK,
                    publish.basic_qos(0, BasicQosOptions::default())
                )
                .await,
                Ok(Ok(()))
            );
        if answered {
            self.liveness.cleared();
        } else {
            warn!("the connection was lost during a stall: results of this batch are not stored (other workers run those tasks again)");
            self.lost.notify_one();
        }
        answered
    }
}

/// Renews the leases of the tasks in this worker's custody, three times
/// per lease, for as long as the worker is connected.
async fn renew_custody(shared: Arc<Shared>) {
    let lease = shared.config.custody_lease();
    let mut tick = tokio::time::interval(lease / 3);
    loop {
        tick.tick().await;
        let keys = shared.core().custody();
        if let Err(error) = shared.store.renew_custody(&keys, lease).await {
            warn!(%error, tasks = keys.len(), "renewing the custody of long tasks failed");
        }
    }
}

/// This process's resident memory in bytes (0 where `/proc` is missing).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Rejects `delivery` to the dead-letter exchange, logging why.
async fn dead_letter(delivery: &Delivery, reason: &(dyn std::fmt::Display + Sync)) {
    warn!(%reason, bytes = delivery.data.len(), "task message dead-lettered");
    let _ = delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await;
}

/// The tasks of a signed bundle whose spec is still stored, that is, which
/// are not done; `None` when Redis cannot tell.
async fn still_pending(shared: &Shared, tasks: Vec<RunTask>) -> Option<Vec<RunTask>> {
    let keys: Vec<String> = tasks.iter().map(|task| task.spec.key.clone()).collect();
    let exists: Vec<bool> = match shared.store.specs_exist(&keys).await {
        Ok(exists) => exists,
        Err(error) => {
            warn!(%error, "checking a task bundle against Redis failed");
            return None;
        }
    };
    let (pending, done): (Vec<_>, Vec<_>) = tasks
        .into_iter()
        .zip(exists)
        .partition(|(_, exists)| *exists);
    if !done.is_empty() {
        warn!(
            tasks = done.len(),
            first = %done[0].0.spec.key,
            "replayed or stale tasks refused: they are done"
        );
    }
    Some(pending.into_iter().map(|(task, _)| task).collect())
}

async fn announce(
    publish: &Channel,
    names: &Names,
    codec: &Codec,
    message: &ToScheduler,
) -> lapin::Result<()> {
    publish
        .basic_publish(
            name(""),
            name(&names.scheduler_queue()),
            BasicPublishOptions::default(),
            &codec.encode(Purpose::ToScheduler, message),
            transport::transient(),
        )
        .await
        .map(drop)
}

/// Takes one delivery of `queue`: decodes it (dead-lettering what doesn't
/// decode) and starts its tasks, or applies a control message.
async fn accept(shared: &Arc<Shared>, queue: Queue, delivery: Delivery) {
    let message = shared.codec.open_aged::<ToWorker>(
        Purpose::ToWorker,
        &delivery.data,
        delivery.redelivered,
        &shared.guard,
        shared.config.max_payload.saturating_mul(2),
    );
    let mut admitted = admit(message, shared.codec.is_sealed(), &shared.fence);
    if let Admit::Run { tasks, check: true } = admitted {
        admitted = checked(still_pending(shared, tasks).await);
    }
    let tasks = match admitted {
        Admit::Run { tasks, .. } => tasks,
        Admit::Cancel(keys) => {
            shared.cancel(&keys);
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            return;
        }
        // --- actors: an actor lost its last handle ---
        Admit::DropActors(keys) => {
            crate::actors::drop_actors(&shared.id, &keys);
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            return;
        }
        // --- end actors ---
        Admit::Stale(stale) => {
            warn!(error = %stale, "stale control message dropped");
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            return;
        }
        Admit::Ack => {
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            return;
        }
        Admit::DeadLetter(reason) => return dead_letter(&delivery, &reason).await,
        Admit::Requeue => {
            let _ = delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await;
            return;
        }
        Admit::Superseded { epoch, newest } => {
            warn!(epoch, newest, "bundle of a deposed scheduler dropped");
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            return;
        }
    };
    // A redelivered bundle's worker may have died under it: its tasks'
    // starts are recorded, and one that kept killing workers errs.
    let redelivered = delivery.redelivered;
    // Watched from before the bundle exists: no shed of it goes unseen.
    let rounds = shared.window.given_back();
    let (bundle, claim) = {
        let mut core = shared.core();
        let bundle = core.received(
            delivery.acker,
            tasks.iter().map(|task| task.spec.key.clone()),
            queue,
        );
        (bundle, core.claim(bundle))
    };
    {
        // Held this long (running, or waiting for a slot), the delivery is
        // acknowledged and its tasks kept in custody instead.
        // A weak reference only: a sleeping timer must not keep the worker
        // (whose shutdown waits for it) alive.
        let after = Duration::from_millis(shared.config.long_task_ms);
        let shared = Arc::downgrade(shared);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(shared) = shared.upgrade() {
                hand_off(&shared, bundle).await;
            }
        });
    }
    // Tasks that wait for another of this delivery (a chain, see
    // `crate::chain`) start when it ends; it hands them its outcome.
    let chained: Vec<Vec<(String, tokio::sync::watch::Receiver<Handoff>)>> = {
        let keys: std::collections::HashSet<&str> =
            tasks.iter().map(|task| task.spec.key.as_str()).collect();
        tasks
            .iter()
            .map(|task| {
                task.spec
                    .deps
                    .iter()
                    .filter(|dep| **dep != task.spec.key && keys.contains(dep.as_str()))
                    .map(|dep| (dep.clone(), shared.handoffs.expect(bundle, dep)))
                    .collect()
            })
            .collect()
    };
    let awaited: std::collections::HashSet<String> = chained
        .iter()
        .flatten()
        .map(|(dep, _)| dep.clone())
        .collect();
    for (task, after) in tasks.into_iter().zip(chained) {
        let shared = shared.clone();
        let mut rounds = rounds.clone();
        let claim = claim.clone();
        let awaiting = awaited
            .contains(&task.spec.key)
            .then(|| Awaiting::new(shared.handoffs.clone(), bundle, task.spec.key.clone()));
        let span = task_span(&task.spec);
        tokio::spawn(
            async move {
                let key = task.spec.key.clone();
                let client = task.spec.client.clone();
                let deps: Vec<String> = task.spec.held_keys().cloned().collect();
                let may_retry = task.attempt < task.spec.retries;
                let retry_policy = task.spec.retry.clone();
                // Reports how the task ended; the next link of its chain,
                // if any, hears it first.
                let report = |key, client, deps, outcome: TaskOutcome, retrying, recorded, run_us| {
                    if let Some(awaiting) = &awaiting {
                        awaiting.ended(&outcome, retrying);
                    }
                    let _ = shared.completions.send(Completion::Done {
                        key,
                        client,
                        deps,
                        outcome,
                        retrying,
                        recorded,
                        bundle,
                        run_us,
                        kept: None,
                    });
                };
                // Ends the task unrun, with `error`.
                let end_unrun = |key, client, deps, error, recorded| {
                    report(key, client, deps, Err(error), false, recorded, 0);
                };
                // A link of a chain waits for the input before it.
                let mut local = Vec::new();
                for (dep, handoff) in after {
                    match crate::chain::wait(handoff).await {
                        Handoff::Value(bytes) => local.push((dep, bytes)),
                        Handoff::Failed(error) => {
                            // As the scheduler fails a waiting dependent.
                            end_unrun(key, client, deps, error, redelivered);
                            return;
                        }
                        Handoff::Dropped => {
                            if let Some(awaiting) = &awaiting {
                                awaiting.dropped();
                            }
                            return;
                        }
                        Handoff::Stored | Handoff::Gone | Handoff::Pending => {}
                    }
                }
                // A retiring worker starts nothing more: the delivery goes
                // back to the queue when it closes its connection, for
                // another worker to run. (A redelivered task whose start
                // the ledger recorded runs, so as not to count as lost.)
                // Waiting for a slot, the task gives up if its bundle is
                // given back (shed) meanwhile; once it has one, it starts
                // unless that happened just before.
                let given_back = async {
                    while rounds.changed().await.is_ok() {
                        if shared.core().given_back(bundle, &key) {
                            return;
                        }
                    }
                    std::future::pending().await
                };
                // Checked again once a slot is had: retirement may have
                // begun while the task waited for it (the slot it gets may
                // be the abandoned task's).
                let begin = || !shared.stuck.leaves_unstarted(&key) && claim.begin();
                let (permit, isolation) = if redelivered {
                    if shared.stuck.leaves_unstarted(&key) {
                        return;
                    }
                    let admission = tokio::select! {
                        admission = shared.ledger.admit(&shared.slots, &key, &task.spec.task, begin) => admission,
                        () = given_back => return,
                    };
                    match admission {
                        crate::lost::Admission::Run { permit, isolation } => (permit, isolation),
                        crate::lost::Admission::Lost(error) => {
                            warn!(%error, "task lost its worker too often; not running it");
                            end_unrun(key, client, deps, error, true);
                            return;
                        }
                        crate::lost::Admission::GivenBack => {
                            shared.core().given_back(bundle, &key);
                            return;
                        }
                        crate::lost::Admission::Closed => return,
                    }
                } else {
                    let acquired = tokio::select! {
                        acquired = shared.slots.clone().acquire_owned() => acquired,
                        () = given_back => return,
                    };
                    let Ok(permit) = acquired else {
                        return;
                    };
                    if !begin() {
                        shared.core().given_back(bundle, &key);
                        return;
                    }
                    (permit, None)
                };
                if shared.withdrawn(&key).await {
                    // Dropped by the scheduler before it started: not run.
                    debug!(%key, "task withdrawn before it started; not running it");
                    drop((permit, isolation));
                    let error = TaskError::new(
                        ErrorKind::Cancelled,
                        "flotilla::Cancelled",
                        format!("`{key}` was cancelled before it started"),
                    );
                    end_unrun(key, client, deps, error, redelivered);
                    return;
                }
                let slot = Slot::new(shared.slots.clone(), permit, shared.window.clone());
                let began = Instant::now();
                let resources = shared.acquire_resources(&task.spec.resources).await;
                let run = execute(&shared, task, local, slot.clone());
                tokio::pin!(run);
                let outcome = tokio::select! {
                    biased;
                    outcome = &mut run => outcome,
                    _ = tokio::time::sleep(STARTED_AFTER) => {
                        let _ = shared.completions.send(Completion::Started { key: key.clone(), client: client.clone() });
                        run.await
                    }
                };
                drop(resources);
                slot.release();
                drop(isolation);
                let run_us = crate::bundle::run_us(began.elapsed());
                let retrying = retrying(may_retry, &retry_policy, &outcome);
                report(key, client, deps, outcome, retrying, redelivered, run_us);
            }
            .instrument(span),
        );
    }
}

/// The span a task runs in: its key and name, and the trace it was
/// submitted in (`trace_id`, `parent_span_id`), if any.
fn task_span(spec: &flotilla_proto::TaskSpec) -> tracing::Span {
    let span = tracing::info_span!(
        "task",
        key = %spec.key,
        task = %spec.task,
        trace_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    if let Some(parent) = traceparent(spec) {
        // As `Display`, so that text logs show them unquoted, as the key.
        span.record("trace_id", tracing::field::display(parent.trace_id_hex()));
        span.record(
            "parent_span_id",
            tracing::field::display(parent.span_id_hex()),
        );
    }
    span
}

/// The trace a task was submitted in; a malformed `traceparent` is
/// ignored (the task runs untraced), never a failure.
fn traceparent(spec: &flotilla_proto::TaskSpec) -> Option<flotilla_proto::TraceParent> {
    let text = spec.traceparent.as_deref()?;
    text.parse()
        .map_err(|error| debug!(key = %spec.key, %error, "ignoring the task's traceparent"))
        .ok()
}

/// Runs one task: loads its inputs, checks its name and signature, calls it.
///
/// `local` holds inputs handed over in memory by the task before it in a
/// chain (see [`crate::chain`]).
async fn execute(
    shared: &Shared,
    task: RunTask,
    local: Vec<(String, Bytes)>,
    slot: Arc<Slot>,
) -> TaskOutcome {
    let RunTask { spec, inline, .. } = task;
    let outcome = async {
        let registration = registry().get(spec.task.as_str()).ok_or_else(|| {
            TaskError::new(
                ErrorKind::UnknownTask,
                "flotilla::UnknownTask",
                format!(
                    "worker {} does not provide task `{}` (it provides {} tasks)",
                    shared.id,
                    spec.task,
                    registry().len()
                ),
            )
        })?;
        if registration.fingerprint() != spec.fingerprint {
            return Err(TaskError::new(
                ErrorKind::SignatureMismatch,
                "flotilla::SignatureMismatch",
                format!(
                    "worker {} has task `{}` with another signature (fingerprint {:#x}, client has {:#x}): \
                     rebuild the client and workers from the same task code",
                    shared.id,
                    spec.task,
                    registration.fingerprint(),
                    spec.fingerprint
                ),
            ));
        }
        let inputs = load_inputs(shared, &spec.deps, inline, local).await?;
        let args = crate::args::read(&spec.args, &inputs)?;
        let extension = shared.extension.clone();
        // The time limit starts now, when the function is called.
        let limit = registration.limit_for(spec.timeout_ms);
        // (A limit too far away to count is none.)
        let deadline = limit.and_then(|limit| Instant::now().checked_add(limit));
        let ctx = TaskContext::with_extension(&spec.key, &spec.task, &shared.id, shared.config.clone(), extension)
            .with_deadline(deadline)
            .with_traceparent(traceparent(&spec))
            .with_state(shared.state.clone());
        let running = shared.running(&spec.key, ctx.clone());
        // The arguments are decoded here, sharing the inputs' buffers where
        // they can (a `flotilla::Bytes` argument is not a copy).
        let invocation = registration.invoke_with(ctx.clone(), Arguments::parts(&args, &inputs));
        drop((args, inputs));
        let output = match invocation {
            Invocation::Ready(outcome) => outcome,
            Invocation::Sync(call) => {
                let mut handle = tokio::task::spawn_blocking(move || slot.sync_scope(|| run_sync(call)));
                match until(deadline, &mut handle).await {
                    Some(Ok(outcome)) => outcome,
                    Some(Err(error)) => Err(TaskError::new(ErrorKind::Internal, "flotilla::JoinError", error.to_string())),
                    None => Err(abandon(shared, &ctx, limit, handle)),
                }
            }
            Invocation::Async(future) => {
                let mut handle = tokio::spawn(slot.scope(CatchUnwind::new(future)));
                running.set_abort(handle.abort_handle());
                match until(deadline, &mut handle).await {
                    Some(Ok(outcome)) => outcome,
                    Some(Err(error)) if error.is_cancelled() => Err(TaskError::new(
                        ErrorKind::Cancelled,
                        "flotilla::Cancelled",
                        format!("`{}` was cancelled while running", spec.key),
                    )),
                    Some(Err(error)) => Err(TaskError::new(ErrorKind::Internal, "flotilla::JoinError", error.to_string())),
                    None => {
                        // Dropping its future stops the task where it awaits.
                        handle.abort();
                        warn!(limit = ?limit.unwrap_or_default(), "task ran past its time limit; stopped");
                        Err(timed_out(&ctx, limit, "was stopped"))
                    }
                }
            }
        };
        drop(running);
        // No cap on a result's size: a large one is kept here or written
        // to Redis in chunks, and never travels in a message.
        output
    }
    .await;
    outcome.map_err(|error| {
        let traceback = if error.traceback().is_empty() {
            format!(
                "in task `{}` ({}) on worker {}",
                spec.task, spec.key, shared.id
            )
        } else {
            format!(
                "in task `{}` ({}) on worker {}\n{}",
                spec.task,
                spec.key,
                shared.id,
                error.traceback()
            )
        };
        error.with_traceback(traceback).at(&spec.key, &spec.task)
    })
}

/// Awaits `handle` until `deadline` (forever without one); `None` when the
/// deadline passed first, leaving the handle to the caller.
async fn until<T>(
    deadline: Option<Instant>,
    handle: &mut JoinHandle<T>,
) -> Option<Result<T, tokio::task::JoinError>> {
    match deadline {
        None => Some(handle.await),
        Some(deadline) => tokio::time::timeout_at(deadline.into(), handle).await.ok(),
    }
}

/// The error of a task that ran past its time limit.
fn timed_out(ctx: &TaskContext, limit: Option<Duration>, what: &str) -> TaskError {
    TaskError::new(
        ErrorKind::TimedOut,
        "flotilla::TimedOut",
        format!(
            "`{}` ran past its time limit of {:?} and {what}",
            ctx.key(),
            limit.unwrap_or_default()
        ),
    )
}

/// Gives up on a synchronous task past its time limit. Its thread cannot be
/// stopped: it sees `ctx.is_cancelled()`, runs on without a slot, and what
/// it returns is dropped (the task's error is `TimedOut` for good; a retry,
/// if any, is a new run). Logged as an error, with how many such threads
/// this process still carries. A worker that retires when stuck starts
/// retiring (see [`WorkerOptions::retire_when_stuck`]).
fn abandon(
    shared: &Shared,
    ctx: &TaskContext,
    limit: Option<Duration>,
    handle: JoinHandle<TaskOutcome>,
) -> TaskError {
    static ABANDONED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    use std::sync::atomic::Ordering::Relaxed;
    ctx.cancel();
    let abandoned = ABANDONED.fetch_add(1, Relaxed) + 1;
    if shared.stuck.abandoned(ctx.key()) {
        tracing::error!(
            limit = ?limit.unwrap_or_default(),
            abandoned,
            "synchronous task ran past its time limit: reported TimedOut; its thread cannot be \
             stopped, so this worker retires"
        );
    } else {
        tracing::error!(
            limit = ?limit.unwrap_or_default(),
            abandoned,
            "synchronous task ran past its time limit: reported TimedOut; its thread cannot be stopped \
             and runs on, its result to be discarded (restart this worker if such threads pile up)"
        );
    }
    let key = ctx.key().to_owned();
    let since = Instant::now();
    tokio::spawn(async move {
        let _ = handle.await;
        let abandoned = ABANDONED.fetch_sub(1, Relaxed) - 1;
        warn!(%key, late_by = ?since.elapsed(), abandoned, "an abandoned task returned; its result was discarded");
    });
    timed_out(ctx, limit, "was abandoned: it runs synchronously and cannot be stopped, so whatever it returns is discarded")
}

/// The encoded results of a task's inputs: inline ones from the message,
/// the rest from Redis in one round trip.
async fn load_inputs(
    shared: &Shared,
    deps: &[String],
    inline: Vec<(String, serde_bytes::ByteBuf)>,
    local: Vec<(String, Bytes)>,
) -> Result<HashMap<String, Bytes>, TaskError> {
    let mut inputs: HashMap<String, Bytes> = inline
        .into_iter()
        .map(|(key, bytes)| (key, Bytes::from(bytes.into_vec())))
        .chain(local)
        .collect();
    let mut wanted: Vec<&String> = Vec::new();
    for dep in deps {
        if inputs.contains_key(dep) {
            continue;
        }
        match shared.cache.get(dep) {
            Some(bytes) => {
                inputs.insert(dep.clone(), bytes);
            }
            None => wanted.push(dep),
        }
    }
    if wanted.is_empty() {
        return Ok(inputs);
    }
    let keys: Vec<String> = wanted.iter().map(|k| (*k).clone()).collect();
    // A restarting Redis is waited for rather than failing the task.
    let values: Vec<Option<Vec<u8>>> =
        transport::retry_while_unreachable("reading inputs", || shared.store.read_results(&keys))
            .await
            .map_err(|error| {
                TaskError::new(
                    ErrorKind::Internal,
                    "flotilla::RedisError",
                    format!("reading inputs: {error}"),
                )
            })?;
    let opened = shared.reader.open_all(&keys, values).await;
    for (key, opened) in wanted.into_iter().zip(opened) {
        match opened {
            Opened::Ok(bytes) => {
                shared.cache.insert(key, bytes.clone());
                inputs.insert(key.clone(), bytes);
            }
            Opened::Err(error) => return Err(error),
            Opened::Refused(error) => {
                return Err(TaskError::new(
                    ErrorKind::MissingDependency,
                    "flotilla::RefusedInput",
                    format!("the stored result of input `{key}` was refused: {error}"),
                ))
            }
            Opened::Lost { location, cause } => {
                return Err(TaskError::new(
                    ErrorKind::MissingDependency,
                    flotilla_proto::VALUE_LOST,
                    format!(
                    "input `{key}` was kept by worker {} at {}, which could not give it: {cause}",
                    location.worker, location.addr
                ),
                ))
            }
            Opened::Missing => {
                return Err(TaskError::new(
                    ErrorKind::MissingDependency,
                    "flotilla::MissingDependency",
                    format!(
                        "input `{key}` has no stored result: it was released or never submitted"
                    ),
                ))
            }
        }
    }
    Ok(inputs)
}

/// Stores results and publishes completion events in batches, then
/// acknowledges the deliveries whose tasks are all complete.
async fn complete_loop(
    mut rx: mpsc::UnboundedReceiver<Completion>,
    store: Store,
    publish: Channel,
    names: Names,
    codec: Codec,
    worker: String,
    held: Holdings,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_COMPLETION_BATCH).await > 0 {
        // Large results stay here: Redis gets their location.
        let mut kept_keys = Vec::new();
        if let Some(kept) = &held.kept {
            for completion in &mut batch {
                if let Completion::Done {
                    key,
                    outcome: Ok(bytes),
                    retrying: false,
                    kept: place,
                    ..
                } = completion
                {
                    let size = std::num::NonZeroU64::new(bytes.len() as u64);
                    if let Some(record) = kept.take(&codec, &worker, key, bytes) {
                        *bytes = flotilla_proto::Encoded::from_vec(record);
                        *place = size;
                        kept_keys.push(key.clone());
                    }
                }
            }
        }
        if !held.watchdog.connected(&publish).await {
            // The deliveries are the broker's again: nothing is stored,
            // announced or acknowledged; the worker starts afresh.
            held.handoffs.close();
            return;
        }
        for completion in &batch {
            if let Completion::Done {
                key,
                outcome: Err(error),
                retrying,
                ..
            } = completion
            {
                debug!(%key, %error, retrying, "task erred");
            }
        }
        let released = lock(&held.core).released(&batch);
        let plan = crate::bundle::plan(&batch, released);
        let mut plan = plan;
        let stored = store_plan(&store, &mut plan, &codec).await;
        if let Some(kept) = &held.kept {
            kept.recorded(kept_keys);
        }
        let mut published = stored;
        if stored {
            let mut confirms = Vec::with_capacity(plan.events.len());
            for (client, events) in plan.events {
                let event_count = events.len();
                // (The client takes only results from the Redis copy.)
                let has_results = events
                    .iter()
                    .any(|event| matches!(event, flotilla_proto::Event::Finished { .. }));
                let bytes = codec.encode(
                    Purpose::Events,
                    &EventBatch {
                        worker: worker.clone(),
                        events,
                    },
                );
                if has_results
                    && event_count <= PUBSUB_EVENTS_COUNT
                    && bytes.len() <= PUBSUB_EVENTS_MAX
                {
                    // The same batch through Redis too, which the client
                    // hears a RabbitMQ hop sooner (the broker's copy stays
                    // the one that counts: it is confirmed and acknowledged).
                    let (store, channel, bytes) = (
                        store.clone(),
                        names.client_events_channel(client),
                        bytes.clone(),
                    );
                    tokio::spawn(async move {
                        if let Err(error) = store.publish(&channel, &bytes).await {
                            debug!(%error, "publishing completion events to Redis failed");
                        }
                    });
                }
                match publish
                    .basic_publish(
                        name(&names.events_exchange()),
                        name(&Names::worker_event_route(client)),
                        BasicPublishOptions::default(),
                        &bytes,
                        transport::transient(),
                    )
                    .await
                {
                    Ok(confirm) => confirms.push(confirm),
                    Err(error) => {
                        warn!(%error, "publishing completion events failed");
                        published = false;
                    }
                }
            }
            for confirm in confirms {
                if !matches!(confirm.await, Ok(c) if c.is_ack()) {
                    published = false;
                }
            }
        }
        let effects = held.completed(&batch, &plan.released, stored, published);
        held.handoffs.stored(
            batch.iter().filter_map(|completion| match completion {
                Completion::Done { bundle, key, .. } => Some((*bundle, key.as_str())),
                Completion::Started { .. } => None,
            }),
            stored && published,
        );
        settle(effects).await;
        batch.clear();
    }
}

/// Completion batches of up to this many events and bytes also go through
/// Redis pub/sub (see `complete_loop`): a few tasks waited for one by one
/// are heard sooner; a large batch (a `map` finishing) is not worth
/// opening twice.
const PUBSUB_EVENTS_COUNT: usize = 16;
const PUBSUB_EVENTS_MAX: usize = 64 * 1024;

/// How often a batch's writes are tried: a connection failure retries the
/// whole batch (then its deliveries come back), a write Redis refuses (over
/// its `maxmemory`) only that task's.
const STORE_ATTEMPTS: u32 = 5;

/// Stores a batch's writes, each task's on its own: one that Redis keeps
/// refusing (a full Redis) does not hold the others back. After
/// [`STORE_ATTEMPTS`] its partial write is rolled back (so Redis does not
/// stay above its limit), its spec deleted (it is not run again), and its
/// `Finished` event becomes an `Erred` one with a `StoreFailed` error
/// carrying Redis' message (stored too, if Redis takes it). Returns whether
/// the batch is settled: `false` when Redis could not be reached at all
/// (the deliveries then come back).
async fn store_plan(store: &Store, plan: &mut crate::bundle::Plan<'_>, codec: &Codec) -> bool {
    if plan.writes_nothing() {
        return true;
    }
    // Large results not kept here go to Redis in chunks first; the batch
    // then stores their manifests.
    let mut manifests: HashMap<usize, Vec<u8>> = HashMap::new();
    for (index, write) in plan.writes.iter().enumerate() {
        if let Write::Finished {
            key,
            bytes,
            kept: false,
            ..
        } = write
        {
            if bytes.len() + 1 >= CHUNKED_MIN {
                let sealed = codec.result_ok_arg(key, bytes);
                match store.write_chunks(key, &sealed.pieces()).await {
                    Ok(manifest) => {
                        manifests.insert(index, manifest);
                    }
                    // Written whole instead (and refused there if need be).
                    Err(error) => warn!(%key, %error, "writing a result in chunks failed"),
                }
            }
        }
    }
    let mut pending: Vec<usize> = (0..plan.writes.len()).collect();
    let mut with_released = true;
    let mut refused: HashMap<usize, String> = HashMap::new();
    for attempt in 0..STORE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        let (batch, ranges) = pipeline(store, plan, &pending, with_released, codec, &manifests);
        match batch.exec_each().await {
            Err(error) => {
                warn!(%error, attempt, "storing results failed; retrying");
                continue;
            }
            Ok(results) => {
                with_released = false;
                refused.clear();
                for (write, range) in ranges {
                    if let Some(error) = results[range].iter().find_map(|r| r.as_ref().err()) {
                        refused.insert(write, error.to_string());
                    }
                }
                if refused.is_empty() {
                    return true;
                }
                warn!(
                    refused = refused.len(),
                    attempt,
                    first = %refused.values().next().map(String::as_str).unwrap_or_default(),
                    "Redis refused to store results; retrying those"
                );
                pending = refused.keys().copied().collect();
                pending.sort_unstable();
            }
        }
    }
    if with_released {
        return false; // never reached Redis: the deliveries come back
    }
    give_up(store, plan, &refused, codec).await;
    true
}

/// Ends the tasks whose writes Redis kept refusing with a `StoreFailed`
/// error (see [`store_plan`]).
async fn give_up(
    store: &Store,
    plan: &mut crate::bundle::Plan<'_>,
    refused: &HashMap<usize, String>,
    codec: &Codec,
) {
    let mut failed: HashMap<String, TaskError> = HashMap::new();
    let mut rollback = store.batch();
    for (&write, message) in refused {
        let Write::Finished { key, .. } = plan.writes[write] else {
            // An error that could not be stored still reaches its clients
            // in the event; a start record left behind expires.
            continue;
        };
        let error = TaskError::new(
            ErrorKind::StoreFailed,
            "flotilla::StoreFailed",
            format!("the result could not be stored in Redis: {message}"),
        )
        .at(key, "");
        warn!(key, %message, "giving up storing a result: the task errs StoreFailed");
        // Deletes run even over maxmemory: a value half written goes, and
        // so does the spec (the task is done: not run again).
        rollback
            .roll_back(key)
            .store_result(key, &codec.result_err(key, &error));
        failed.insert(key.to_owned(), error);
    }
    if failed.is_empty() {
        return;
    }
    if let Err(error) = rollback.exec_each().await {
        warn!(%error, "rolling back refused results failed");
    }
    for events in plan.events.values_mut() {
        for event in events.iter_mut() {
            if let flotilla_proto::Event::Finished { key, .. } = event {
                if let Some(error) = failed.get(key.as_str()) {
                    *event = flotilla_proto::Event::Erred {
                        key: key.clone(),
                        error: error.clone(),
                        retrying: false,
                    };
                }
            }
        }
    }
}

/// The store batch that carries out the writes `only` of a batch of
/// completions (and its custody release, `with_released`), with the range
/// of replies each write gets: every operation replies, so one write's
/// refusal is told apart from another's.
fn pipeline(
    store: &Store,
    plan: &crate::bundle::Plan<'_>,
    only: &[usize],
    with_released: bool,
    codec: &Codec,
    manifests: &HashMap<usize, Vec<u8>>,
) -> (Batch, Vec<(usize, std::ops::Range<usize>)>) {
    let mut batch = store.batch();
    if with_released && !plan.released.is_empty() {
        batch.leave_custody(&plan.released);
    }
    let mut ranges = Vec::with_capacity(only.len());
    for &index in only {
        let start = batch.len();
        match plan.writes[index] {
            Write::ForgetStart(key) => {
                // The task completed: its worker did not die under it.
                batch.forget_start(key);
            }
            Write::Finished {
                key,
                bytes,
                deps,
                kept,
            } => {
                // Done for good: the spec a restarted scheduler would take
                // up again is no longer needed.
                batch.forget_spec(key);
                if kept {
                    // A signed location record (see `crate::kept`).
                    batch.store_result(key, bytes);
                } else if let Some(manifest) = manifests.get(&index) {
                    batch.store_result(key, manifest);
                } else if bytes.len() + 1 >= LARGE_RESULT {
                    // Written straight into the command: a large result is
                    // not copied once more just to add its tag.
                    batch.store_large_result(key, codec.result_ok_arg(key, bytes));
                } else {
                    batch.store_result(key, &codec.result_ok(key, bytes));
                }
                // Done for good: it no longer needs its inputs.
                let holder = task_holder(key);
                for dep in deps {
                    batch.release(dep, &holder);
                }
            }
            Write::Erred { key, error } => {
                // Its inputs stay held (for `retry`) until the scheduler
                // forgets the task.
                batch.store_result(key, &codec.result_err(key, error));
            }
        }
        ranges.push((index, start..batch.len()));
    }
    (batch, ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_runtime::store::Reply;

    /// A spec of `demo::add` under key `k`, from client `c`.
    fn demo_spec() -> flotilla_proto::TaskSpec {
        flotilla_proto::TaskSpec::new(
            "k".into(),
            "demo::add".into(),
            7,
            vec![0x90],
            vec![],
            "c".into(),
        )
    }

    #[test]
    fn a_task_s_traceparent_is_read_and_a_malformed_one_ignored() {
        let mut spec = demo_spec();
        assert_eq!(traceparent(&spec), None);
        spec.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let parent = traceparent(&spec).expect("a valid traceparent");
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id_hex(), "00f067aa0ba902b7");
        for malformed in ["", "garbage", "00-zz-00f067aa0ba902b7-01"] {
            spec.traceparent = Some(malformed.into());
            assert_eq!(traceparent(&spec), None, "{malformed:?}");
        }
    }

    /// Lines logged inside a task's span carry its trace.
    #[test]
    fn the_task_span_carries_the_trace_id_and_parent_span_id() {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let mut spec = demo_spec();
        tracing::subscriber::with_default(subscriber, || {
            task_span(&spec).in_scope(|| info!("untraced"));
            spec.traceparent =
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
            task_span(&spec).in_scope(|| info!("traced"));
        });
        let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = logged.lines().collect();
        assert_eq!(lines.len(), 2, "{logged}");
        assert!(
            lines[0].contains("untraced") && !lines[0].contains("trace_id"),
            "{logged}"
        );
        assert!(
            lines[1].contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736")
                && lines[1].contains("parent_span_id=00f067aa0ba902b7")
                && lines[1].contains("key=k"),
            "{logged}"
        );
    }

    fn finished(key: &str, bytes: &[u8]) -> flotilla_proto::Event {
        flotilla_proto::Event::Finished {
            key: key.to_owned(),
            inline: None,
            size: bytes.len() as u64,
            run_us: 1,
        }
    }

    /// On a store that fills up (as a Redis at its `maxmemory`), the result
    /// that fits is kept, and the one refused at every attempt is rolled
    /// back: its spec goes, and its client hears `StoreFailed` instead of
    /// `Finished`. The batch counts as settled (nothing comes back).
    #[tokio::test]
    async fn a_result_redis_keeps_refusing_is_rolled_back_and_errs_store_failed() {
        let store = Store::memory_limited(1000);
        let codec = Codec::new(&Config::default());
        let mut setup = store.batch();
        setup
            .hold("fits", "client")
            .hold("refused", "client")
            .hold("input", "t:fits")
            .write_spec("fits", b"spec")
            .write_spec("refused", b"spec");
        setup.exec().await.unwrap();
        let first = vec![1u8; 2000];
        let second = vec![2u8; 10];
        let deps = vec!["input".to_owned()];
        let mut plan = crate::bundle::Plan {
            writes: vec![
                Write::Finished {
                    key: "fits",
                    bytes: &first,
                    deps: &deps,
                    kept: false,
                },
                Write::Finished {
                    key: "refused",
                    bytes: &second,
                    deps: &[],
                    kept: false,
                },
            ],
            ..crate::bundle::Plan::default()
        };
        plan.events.insert(
            "client",
            vec![finished("fits", &first), finished("refused", &second)],
        );

        assert!(store_plan(&store, &mut plan, &codec).await, "settled");

        let events = &plan.events["client"];
        assert!(matches!(&events[0], flotilla_proto::Event::Finished { key, .. } if key == "fits"));
        match &events[1] {
            flotilla_proto::Event::Erred {
                key,
                error,
                retrying: false,
            } => {
                assert_eq!(key, "refused");
                assert_eq!(error.kind(), ErrorKind::StoreFailed);
                assert!(error.message().contains("OOM"), "{}", error.message());
            }
            other => panic!("expected StoreFailed, got {other:?}"),
        }
        let keys = ["fits".to_owned(), "refused".to_owned()];
        let results = store.read_results(&keys).await.unwrap();
        assert_eq!(results[0], Some(codec.result_ok("fits", &first)));
        assert_eq!(results[1], None, "the refused result is not there");
        assert_eq!(store.specs_exist(&keys).await.unwrap(), [false, false]);
        // The finished task released its input; the input is gone with it.
        assert_eq!(store.held(&["input".to_owned()]).await.unwrap(), [false]);
        // The client still holds the result that was kept.
        let mut release = store.batch();
        release.release("fits", "client");
        assert_eq!(
            release.exec().await.unwrap(),
            [Reply::Released { freed: true }]
        );
    }
}
