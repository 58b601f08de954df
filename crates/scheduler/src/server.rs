//! The scheduler process: RabbitMQ and Redis around the [`Core`].
//!
//! Submissions and worker announcements arrive on `<ns>.scheduler`,
//! completion events on `<ns>.scheduler.events`. The loop takes whatever has
//! arrived, feeds it all to the core, then publishes the resulting bundles
//! and acknowledges the input in one go, so the cost per message shrinks as
//! load grows.

use crate::admission::{self, Admission, Route};
use crate::core::{Checked, Comm, Core, Counts, Lookup, TaskStatus, WorkerStatus};
use crate::leader::{self, Attempt, Leadership};
use flotilla_proto::{
    Codec, Config, Event, EventBatch, Names, Purpose, ReplayGuard, RunTask, StoredResult,
    TaskError, ToScheduler, ToWorker,
};
use flotilla_runtime::store::{task_holder, Store};
use flotilla_runtime::supervise::{AbortOnDropHandle, Attempts, Stop};
use flotilla_runtime::transport::{self, name};
use flotilla_runtime::Redis;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Deliveries each consumer may hold unacknowledged.
const PREFETCH: u16 = 4096;
/// Most inputs handled before the core dispatches and output is flushed.
const MAX_BATCH: usize = 4096;
/// How often the reaper also releases holds of client ids that have no
/// lease (see `reap`).
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often processing tasks are checked against Redis: a task
/// processing at two checks in a row is looked up (see [`Core::checked`]).
const RECHECK_EVERY: Duration = Duration::from_secs(5);

/// Why the scheduler stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(#[from] flotilla_proto::ConfigError),
    /// RabbitMQ failed.
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    /// Redis failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A consumer or the connection closed under the scheduler.
    #[error("RabbitMQ closed the scheduler's {0}")]
    Closed(&'static str),
    /// This scheduler lost the leader lease (see [`crate::leader`]).
    #[error("lost the leader lease: {0}")]
    Deposed(String),
    /// The broker refused a publish, again after retries.
    #[error("RabbitMQ refused a publish of the scheduler {0} times")]
    Refused(u32),
}

enum Input {
    Submission(lapin::message::Delivery),
    Events(lapin::message::Delivery),
    Looked(String, Lookup),
    /// Keys that lost their last holder (after a release the scheduler made).
    Unreferenced(Vec<String>),
    /// Keys that lost their last holder because the clients holding them
    /// are gone (their lease lapsed), or as inputs of such keys' tasks.
    Abandoned(Vec<String>),
    /// Tasks whose custody lapsed: their worker died after acknowledging
    /// their delivery early (see [`flotilla_runtime::custody`]).
    CustodyLapsed(Vec<String>),
    /// Specs read back from Redis for a stale signed submission.
    Stored(Vec<flotilla_proto::TaskSpec>),
    Closed(&'static str),
    /// The leader lease was lost (to this holder, or by running out).
    Deposed(String),
    /// Publishes of a flush stayed refused by the broker.
    Refused(u32),
    /// What Redis holds for tasks processing for a while.
    Checked(Vec<(String, Checked)>),
}

/// Whether this scheduler is the namespace's active one (see
/// [`crate::leader`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Connecting; not yet known.
    #[default]
    Starting,
    /// Another scheduler holds the leader lease; this one takes over when
    /// it lapses.
    Standby,
    /// Holds the leader lease and schedules.
    Active,
}

impl Role {
    /// `starting`, `standby` or `active`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Standby => "standby",
            Role::Active => "active",
        }
    }
}

/// What the scheduler looks like, published once a second for status pages
/// (see [`Hooks::status`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The namespace.
    pub namespace: String,
    /// When it was taken.
    pub at: std::time::SystemTime,
    /// Seconds since the scheduler started.
    pub uptime_s: f64,
    /// Task counters.
    pub counts: Counts,
    /// Live workers.
    pub workers: Vec<WorkerStatus>,
    /// Tasks in the erred state (up to 100).
    pub erred: Vec<TaskStatus>,
    /// Tasks the scheduler holds in memory.
    pub tasks_in_memory: usize,
    /// Active or standby.
    pub role: Role,
    /// The leader lease's holder as last seen (`<id>|<epoch>`).
    pub leader: Option<String>,
    /// Tasks that ended since the scheduler started, by task name and
    /// outcome, with their run times.
    pub tally: crate::tally::Tally,
    /// The last task errors seen, oldest first (see [`crate::failures`]).
    pub recent_errors: crate::failures::RecentErrors,
}

impl Snapshot {
    /// An empty snapshot of `namespace` in `role`.
    pub fn empty(namespace: &str, role: Role) -> Self {
        Snapshot {
            namespace: namespace.to_owned(),
            at: std::time::SystemTime::now(),
            uptime_s: 0.0,
            counts: Counts::default(),
            workers: Vec::new(),
            erred: Vec::new(),
            tasks_in_memory: 0,
            role,
            leader: None,
            tally: Default::default(),
            recent_errors: Default::default(),
        }
    }
}

/// Ways into a running scheduler for status pages and operator commands.
#[derive(Debug, Default)]
pub struct Hooks {
    /// Receives a [`Snapshot`] every second.
    pub status: Option<tokio::sync::watch::Sender<std::sync::Arc<Snapshot>>>,
    /// Messages injected as if they came from the scheduler queue (for
    /// instance `ToScheduler::Cancel` from an operator).
    pub control: Option<mpsc::UnboundedReceiver<ToScheduler>>,
    /// Answers task listings: `(state filter, limit, reply)`.
    pub queries: Option<mpsc::UnboundedReceiver<TaskQuery>>,
    /// Receives every change of the broker's blocked state (see
    /// [`crate::broker`]), as it happens.
    pub broker: Option<tokio::sync::watch::Sender<crate::broker::BrokerStatus>>,
}

/// A request for the tasks in the table (see [`Hooks::queries`]).
#[derive(Debug)]
pub struct TaskQuery {
    /// Only tasks in this state (`waiting`, `ready`, `processing`, `finished`, `erred`).
    pub state: Option<String>,
    /// At most this many.
    pub limit: usize,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Vec<TaskStatus>>,
}

/// A scheduler running inside this process (see [`SchedulerHandle::spawn`]).
#[derive(Debug)]
pub struct SchedulerHandle {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), SchedulerError>>,
}

/// How long [`SchedulerHandle::shutdown`] waits for the scheduler to stop.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);

impl SchedulerHandle {
    /// Starts a scheduler for `config` on the current tokio runtime and
    /// returns once it consumes its queues.
    pub async fn spawn(config: Config) -> Result<Self, SchedulerError> {
        let (stop, stopped) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(supervise(
            config,
            async move {
                let _ = stopped.await;
            },
            Some(ready_tx),
            Hooks::default(),
        ));
        match ready_rx.await {
            Ok(()) => Ok(SchedulerHandle {
                stop: Some(stop),
                task,
            }),
            Err(_) => match task.await {
                Ok(Err(e)) => Err(e),
                _ => Err(SchedulerError::Closed("start-up")),
            },
        }
    }

    /// Stops the scheduler and waits for it to close its connections, at
    /// most [`SHUTDOWN_TIMEOUT`]; a scheduler still busy then is aborted
    /// (nothing is lost: its pending tasks stay in Redis for the next one).
    pub async fn shutdown(mut self) -> Result<(), SchedulerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, &mut self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Ok(()),
            Err(_) => {
                warn!(timeout = ?SHUTDOWN_TIMEOUT, "the scheduler did not stop in time; aborting it");
                self.task.abort();
                Ok(())
            }
        }
    }
}

/// Runs a scheduler until `shutdown` completes or a connection fails.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), SchedulerError> {
    supervise(config, shutdown, None, Hooks::default()).await
}

/// Like [`run`], with [`Hooks`] for status pages and operator commands.
pub async fn run_with_hooks(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    hooks: Hooks,
) -> Result<(), SchedulerError> {
    supervise(config, shutdown, None, hooks).await
}

/// Runs the scheduler until `shutdown`, starting afresh whenever RabbitMQ
/// or Redis is lost after it was first up: each attempt reconnects (with
/// growing pauses), re-declares the topology and takes up every pending
/// task from Redis, as a restarted scheduler process would. A failure
/// before the first start-up is returned at once.
async fn supervise(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    mut ready: Option<oneshot::Sender<()>>,
    mut hooks: Hooks,
) -> Result<(), SchedulerError> {
    config.validate()?;
    let stop = Stop::new(shutdown);
    let started = Instant::now();
    let mut attempts = Attempts::default();
    let id = flotilla_proto::new_id();
    loop {
        let mut up = false;
        let life = Life {
            config: &config,
            id: &id,
            stop: &stop,
            started,
        };
        let result = run_inner(&life, &mut ready, &mut hooks, &mut up).await;
        if let Err(SchedulerError::Deposed(holder)) = &result {
            warn!(holder, "this scheduler lost the leader lease: standing by");
            continue;
        }
        let what = "reconnecting, then taking up the pending tasks from Redis";
        if let Some(done) = attempts.settle(result, up, &stop, what).await {
            return done;
        }
    }
}

/// What stays the same across a scheduler's connected lives.
struct Life<'a> {
    config: &'a Config,
    /// This scheduler's id in the leader lease.
    id: &'a str,
    stop: &'a Stop,
    started: Instant,
}

/// One connected life of the scheduler; `up` is set once it consumes.
async fn run_inner(
    life: &Life<'_>,
    ready: &mut Option<oneshot::Sender<()>>,
    hooks: &mut Hooks,
    up: &mut bool,
) -> Result<(), SchedulerError> {
    let config = life.config;
    let names = config.names();
    let connection = transport::connect_amqp(
        &config.amqp_url,
        &format!("flotilla-scheduler {}", names.namespace()),
    )
    .await?;
    let result = serve(life, ready, hooks, up, &connection).await;
    transport::close(&connection, "scheduler stopping").await;
    result
}

/// Declares, consumes and runs the scheduler's loop on `connection`.
async fn serve(
    life: &Life<'_>,
    ready: &mut Option<oneshot::Sender<()>>,
    hooks: &mut Hooks,
    up: &mut bool,
    connection: &lapin::Connection,
) -> Result<(), SchedulerError> {
    let Life {
        config,
        id,
        stop,
        started,
    } = *life;
    let names = config.names();
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    transport::declare_topology(&publish, &names, config.queue_type).await?;
    let broker = hooks
        .broker
        .get_or_insert_with(|| tokio::sync::watch::channel(Default::default()).0)
        .clone();
    let _broker_watch =
        AbortOnDropHandle::new(crate::broker::watch(connection, config, broker.clone()));
    let mut redis = transport::connect_redis(&config.redis_url).await?;
    flotilla_runtime::incarnation::check_eviction(&mut redis, config.allow_eviction).await?;
    // Clients and workers with another secret then fail at once, clearly.
    flotilla_runtime::seal::publish_fingerprint(&mut redis, &names, &Codec::new(config)).await?;
    let (inputs, mut input_rx) = mpsc::unbounded_channel();
    // Only the holder of the leader lease consumes; another waits here,
    // connected (a hot standby).
    let Some((leadership, holder)) = stand_by(&mut redis, &names, id, stop, hooks).await? else {
        return Ok(());
    };
    info!(
        epoch = leadership.epoch,
        "holding the leader lease: this scheduler is the active one"
    );
    let keeper = tokio::spawn({
        let redis = redis.clone();
        let names = names.clone();
        let id = id.to_owned();
        let leadership = leadership.clone();
        let inputs = inputs.clone();
        async move {
            let lost = leader::keep(redis, names, id, leadership).await;
            let _ = inputs.send(Input::Deposed(lost));
        }
    });
    let _keeper = AbortOnDropHandle::new(keeper);

    let submissions = connection.create_channel().await?;
    let events = connection.create_channel().await?;
    for (channel, queue, wrap) in [
        (
            &submissions,
            names.scheduler_queue(),
            Input::Submission as fn(_) -> Input,
        ),
        (
            &events,
            names.scheduler_events_queue(),
            Input::Events as fn(_) -> Input,
        ),
    ] {
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                name(&queue),
                name("scheduler"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let inputs = inputs.clone();
        tokio::spawn(async move {
            while let Some(delivery) = transport::next_delivery(&mut consumer).await {
                match delivery {
                    Ok(delivery) => {
                        if inputs.send(wrap(delivery)).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        warn!(%error, queue, "consumer failed");
                        break;
                    }
                }
            }
            let _ = inputs.send(Input::Closed("consumer"));
        });
    }

    let incarnation =
        flotilla_runtime::incarnation::Incarnation::start(&mut redis, &names, true).await?;
    let (settler, settlements) = mpsc::unbounded_channel();
    let _settler = AbortOnDropHandle::new(tokio::spawn(settle(
        settlements,
        publish.clone(),
        submissions.clone(),
        events.clone(),
        inputs.clone(),
    )));
    let mut scheduler = Scheduler {
        core: Core::new(),
        out: Outbox::default(),
        names: names.clone(),
        publisher: publish.clone(),
        settler,
        store: Store::redis(redis.clone(), names.clone()),
        redis,
        inputs: inputs.clone(),
        max_payload: config.max_payload,
        codec: Codec::new(config),
        guard: ReplayGuard::new(),
        events_guard: ReplayGuard::new(),
        reaper: None,
        orphans_swept: None,
        orphan_grace: config.client_lease(),
        custodian: None,
        leadership: leadership.clone(),
        id: id.to_owned(),
        rechecked: (HashSet::new(), Instant::now()),
        checker: None,
        incarnation: Arc::new(tokio::sync::Mutex::new(incarnation)),
        admission: Admission::new(config.scheduler_max_tasks, 0),
        taking_up: false,
    };
    // A restarted scheduler takes up every task still pending: clients store
    // each spec in Redis with its submission, workers delete it once done.
    let specs = recover_specs(&scheduler.store, &scheduler.codec).await?;
    debug!(found = specs.len(), "stored task specs");
    if !specs.is_empty() {
        // Start times in the specs are judged by the clock.
        scheduler.core.wake(wall_ms());
        let count = scheduler.core.recover(specs, &mut scheduler.out);
        info!(count, "took up pending tasks from a previous scheduler");
        scheduler.flush(Acks::default()).await?;
    }
    // Messages a previous scheduler parked (see `crate::admission`).
    let parked = admission::backlog_len(&mut scheduler.redis, &scheduler.names).await?;
    if parked > 0 {
        info!(
            parked,
            "messages parked in the backlog by a previous scheduler"
        );
    }
    scheduler.admission = Admission::new(config.scheduler_max_tasks, parked);
    scheduler.take_up().await?;
    // Up only now: a client that starts submitting once the scheduler is
    // ready cannot race the recovery above.
    info!(namespace = scheduler.names.namespace(), "scheduler started");
    *up = true;
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let shutdown = stop.clone().wait();
    tokio::pin!(shutdown);
    let result = loop {
        // Tasks held for a start time or a retry delay (`Core::wake`): the
        // loop wakes when the earliest is due.
        let due = scheduler.core.next_due();
        let timer = async {
            match due {
                Some(due) => {
                    tokio::time::sleep(Duration::from_millis(due.saturating_sub(wall_ms()))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = timer => {
                scheduler.core.wake(wall_ms());
                scheduler.core.dispatch(&mut scheduler.out);
                scheduler.flush(Acks::default()).await?;
            }
            _ = tick.tick() => {
                scheduler.core.wake(wall_ms());
                // Heartbeats cannot arrive while the broker blocks them.
                if !broker.borrow().holds_worker_timeout(Instant::now()) {
                    scheduler.core.expire_workers(Instant::now());
                }
                scheduler.core.tick(&mut scheduler.out);
                if let Some(status) = &hooks.status {
                    let core = &scheduler.core;
                    let _ = status.send(std::sync::Arc::new(Snapshot {
                        namespace: scheduler.names.namespace().to_owned(),
                        at: std::time::SystemTime::now(),
                        uptime_s: started.elapsed().as_secs_f64(),
                        counts: core.counts(),
                        workers: core.workers(Instant::now()),
                        erred: core.tasks(Some("erred"), 100),
                        tasks_in_memory: core.len(),
                        role: Role::Active,
                        leader: Some(holder.clone()),
                        tally: core.tally().clone(),
                        recent_errors: core.recent_errors().clone(),
                    }));
                }
                scheduler.reap_clients();
                scheduler.sweep_custody();
                scheduler.recheck();
                scheduler.core.dispatch(&mut scheduler.out);
                scheduler.flush(Acks::default()).await?;
                scheduler.take_up().await?;
            }
            Some(message) = next_control(&mut hooks.control) => {
                scheduler.core.wake(wall_ms());
                scheduler.apply(message);
                scheduler.core.dispatch(&mut scheduler.out);
                scheduler.flush(Acks::default()).await?;
            }
            Some(query) = next_control(&mut hooks.queries) => {
                let tasks = scheduler.core.tasks(query.state.as_deref(), query.limit);
                let _ = query.reply.send(tasks);
            }
            input = input_rx.recv() => {
                let Some(input) = input else { break Ok(()) };
                scheduler.core.wake(wall_ms());
                let mut acks = Acks::default();
                if let Err(stop) = scheduler.handle(input, &mut acks).await {
                    break Err(stop);
                }
                let mut handled = 1;
                while handled < MAX_BATCH {
                    let Ok(input) = input_rx.try_recv() else { break };
                    scheduler.handle(input, &mut acks).await?;
                    handled += 1;
                }
                scheduler.core.dispatch(&mut scheduler.out);
                scheduler.flush(acks).await?;
                scheduler.take_up().await?;
            }
        }
    };
    let counts = scheduler.core.counts();
    info!(?counts, "scheduler stopping");
    if let Some(reaper) = scheduler.reaper.take() {
        reaper.abort();
    }
    if result.is_ok() {
        // A graceful stop: a standby takes over at once.
        leader::resign(&mut scheduler.redis, &scheduler.names, id).await;
    }
    result
}

/// Waits, connected, until this scheduler holds the leader lease; `None`
/// when asked to stop first. While another holds it, says so in the log
/// (once per holder) and in the status snapshot.
async fn stand_by(
    redis: &mut Redis,
    names: &Names,
    id: &str,
    stop: &Stop,
    hooks: &Hooks,
) -> Result<Option<(Leadership, String)>, SchedulerError> {
    let mut seen: Option<String> = None;
    loop {
        let sent = Instant::now();
        match leader::attempt(redis, names, id, 0).await? {
            Attempt::Held(epoch) => {
                return Ok(Some((
                    Leadership::new(epoch, sent),
                    format!("{id}|{epoch}"),
                )));
            }
            Attempt::Taken(holder) => {
                let holder_id = holder.split('|').next().unwrap_or_default().to_owned();
                if seen.as_deref() != Some(holder_id.as_str()) {
                    info!(
                        namespace = names.namespace(),
                        active = %holder,
                        "standby: another scheduler is active on this namespace; taking over when its lease lapses"
                    );
                    seen = Some(holder_id);
                }
                if let Some(status) = &hooks.status {
                    let mut snapshot = Snapshot::empty(names.namespace(), Role::Standby);
                    snapshot.leader = Some(holder);
                    let _ = status.send(std::sync::Arc::new(snapshot));
                }
                if !stop.pause(leader::POLL).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// How often a publish the broker refuses is tried before the scheduler
/// starts afresh (taking up every pending task from Redis).
const PUBLISH_ATTEMPTS: u32 = 4;

/// What to do with the inputs of one batch once its publishes are
/// confirmed: acknowledgements (the highest tag per channel, with
/// `multiple`) and rejections, in order.
#[derive(Default)]
struct Acks {
    submissions: Option<u64>,
    events: Option<u64>,
    steps: Vec<Step>,
}

enum Step {
    AckSubmissions(u64),
    AckEvents(u64),
    Reject(lapin::Acker),
}

impl Acks {
    /// Dead-letters a delivery after acknowledging what came before it on
    /// its channel, so that no later multiple-ack can cover it.
    fn reject(&mut self, delivery: &lapin::message::Delivery, events: bool) {
        let pending = if events {
            self.events.take().map(Step::AckEvents)
        } else {
            self.submissions.take().map(Step::AckSubmissions)
        };
        self.steps.extend(pending);
        self.steps.push(Step::Reject(delivery.acker.clone()));
    }

    fn is_empty(&self) -> bool {
        self.submissions.is_none() && self.events.is_none() && self.steps.is_empty()
    }

    async fn send(self, submissions: &Channel, events: &Channel) -> lapin::Result<()> {
        let multiple = BasicAckOptions { multiple: true };
        let last = [
            self.submissions.map(Step::AckSubmissions),
            self.events.map(Step::AckEvents),
        ];
        for step in self.steps.into_iter().chain(last.into_iter().flatten()) {
            match step {
                Step::AckSubmissions(tag) => submissions.basic_ack(tag, multiple).await?,
                Step::AckEvents(tag) => events.basic_ack(tag, multiple).await?,
                Step::Reject(acker) => {
                    acker.reject(BasicRejectOptions { requeue: false }).await?;
                }
            }
        }
        Ok(())
    }
}

/// A publish awaiting its confirm, with what it takes to publish it again.
struct Sent {
    confirm: lapin::PublisherConfirm,
    exchange: String,
    routing_key: String,
    bytes: Vec<u8>,
    persistent: bool,
}

/// One flush's publishes and the acknowledgements that wait for them.
type Settlement = (Vec<Sent>, Acks);

/// Settles flushes in order: waits for each publish's confirm, publishes a
/// refused one again (a few times, with pauses), then sends the batch's
/// acknowledgements. So an input is acknowledged only once what it caused
/// is safely with the broker; a publish that stays refused ends this life
/// of the scheduler (its inputs are delivered again, and the next life takes
/// the pending tasks up from Redis).
async fn settle(
    mut batches: mpsc::UnboundedReceiver<Settlement>,
    publish: Channel,
    submissions: Channel,
    events: Channel,
    inputs: mpsc::UnboundedSender<Input>,
) {
    while let Some((sent, acks)) = batches.recv().await {
        for sent in sent {
            if let Err(attempts) = confirmed(&publish, sent).await {
                let _ = inputs.send(Input::Refused(attempts));
                return;
            }
        }
        if let Err(error) = acks.send(&submissions, &events).await {
            warn!(%error, "acknowledging the scheduler's input failed");
            let _ = inputs.send(Input::Closed("acknowledgements"));
            return;
        }
    }
}

/// Publishes `bytes` with publisher confirms on, persistent or transient.
async fn publish_raw(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    bytes: &[u8],
    persistent: bool,
) -> lapin::Result<lapin::PublisherConfirm> {
    let properties = if persistent {
        transport::persistent()
    } else {
        transport::transient()
    };
    channel
        .basic_publish(
            name(exchange),
            name(routing_key),
            BasicPublishOptions::default(),
            bytes,
            properties,
        )
        .await
}

/// Waits for `sent`'s confirm; publishes it again while the broker refuses
/// it, up to [`PUBLISH_ATTEMPTS`] times in all.
async fn confirmed(publish: &Channel, sent: Sent) -> Result<(), u32> {
    let Sent {
        mut confirm,
        exchange,
        routing_key,
        bytes,
        persistent,
    } = sent;
    let mut backoff = flotilla_runtime::supervise::Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(2),
    );
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match confirm.await {
            Ok(confirmation) if !confirmation.is_nack() => return Ok(()),
            Ok(_) => warn!(
                attempt,
                exchange, routing_key, "the broker refused a scheduler publish"
            ),
            Err(error) => {
                warn!(%error, "scheduler publish not confirmed");
                return Err(attempt);
            }
        }
        if attempt == PUBLISH_ATTEMPTS {
            break;
        }
        tokio::time::sleep(backoff.next_pause()).await;
        confirm = publish_raw(publish, &exchange, &routing_key, &bytes, persistent)
            .await
            .map_err(|_| attempt)?;
    }
    Err(PUBLISH_ATTEMPTS)
}

/// What the core asked for since the last flush.
#[derive(Default)]
struct Outbox {
    bundles: Vec<(Option<String>, Vec<RunTask>)>,
    notify: HashMap<String, Vec<Event>>,
    errors: Vec<(String, TaskError)>,
    lookups: Vec<String>,
    releases: Vec<(String, String)>,
    abandoned_releases: Vec<(String, String)>,
    cancels: Vec<String>,
    specs_done: Vec<String>,
}

impl Comm for Outbox {
    fn send_tasks(&mut self, worker: Option<&str>, tasks: Vec<RunTask>) {
        self.bundles.push((worker.map(str::to_owned), tasks));
    }
    fn notify(&mut self, client: &str, event: Event) {
        self.notify
            .entry(client.to_owned())
            .or_default()
            .push(event);
    }
    fn store_error(&mut self, key: &str, error: &TaskError) {
        self.errors.push((key.to_owned(), error.clone()));
    }
    fn lookup(&mut self, key: &str) {
        self.lookups.push(key.to_owned());
    }
    fn release_inputs(&mut self, key: &str, deps: &[String]) {
        let holder = task_holder(key);
        self.releases
            .extend(deps.iter().map(|dep| (dep.clone(), holder.clone())));
    }
    fn release_abandoned_inputs(&mut self, key: &str, deps: &[String]) {
        let holder = task_holder(key);
        self.abandoned_releases
            .extend(deps.iter().map(|dep| (dep.clone(), holder.clone())));
    }
    fn cancel_running(&mut self, keys: &[String]) {
        self.cancels.extend(keys.iter().cloned());
    }
    fn forget_spec(&mut self, key: &str) {
        self.specs_done.push(key.to_owned());
    }
}

struct Scheduler {
    core: Core,
    out: Outbox,
    names: Names,
    publisher: Channel,
    /// Where flushes go to be confirmed and acknowledged (see [`settle`]).
    settler: mpsc::UnboundedSender<Settlement>,
    /// The task-life keys (results, holders, specs, custody, leases).
    store: Store,
    /// The scheduler's own keys (leadership, backlog, incarnation).
    redis: Redis,
    inputs: mpsc::UnboundedSender<Input>,
    max_payload: usize,
    /// Signs what the scheduler sends and checks what it reads.
    codec: Codec,
    /// The signed messages taken from the scheduler queue.
    guard: ReplayGuard,
    /// The signed event batches taken from the scheduler's events queue.
    events_guard: ReplayGuard,
    reaper: Option<JoinHandle<()>>,
    /// When the reaper last looked for holds of clients without a lease.
    orphans_swept: Option<Instant>,
    /// How long a client found without a lease is given to renew it
    /// before its holds are released (see [`reap`]): one client lease.
    orphan_grace: Duration,
    custodian: Option<JoinHandle<()>>,
    /// The leader lease this scheduler acts under, as `id`.
    leadership: Leadership,
    id: String,
    /// Tasks processing at the last check, and when it was.
    rechecked: (HashSet<String>, Instant),
    checker: Option<JoinHandle<()>>,
    /// Redis' incarnation marker as last seen.
    incarnation: Arc<tokio::sync::Mutex<flotilla_runtime::incarnation::Incarnation>>,
    /// Whether the core may take more tasks, and what waits in the backlog
    /// (see [`crate::admission`]).
    admission: Admission,
    /// A take-up of the backlog is under way (it goes on up to the bound).
    taking_up: bool,
}

impl Scheduler {
    async fn handle(&mut self, input: Input, acks: &mut Acks) -> Result<(), SchedulerError> {
        match input {
            Input::Submission(delivery) => {
                let tag = delivery.delivery_tag;
                let opened = self.codec.open_aged::<ToScheduler>(
                    Purpose::ToScheduler,
                    &delivery.data,
                    delivery.redelivered,
                    &self.guard,
                    self.max_payload + (1 << 20),
                );
                let opened = match opened {
                    // Signed and older than the replay window: a replay, or
                    // a submission that waited for a scheduler that was down
                    // or far behind. The specs in Redis decide: a task whose
                    // spec is stored is pending and taken up from it; one
                    // whose spec is gone is done and not run again.
                    Ok((ToScheduler::Submit { tasks, .. }, Some(stale))) => {
                        warn!(%stale, tasks = tasks.len(), "stale submission: taking up its tasks from their stored specs");
                        acks.submissions = Some(tag);
                        self.take_up_stored(tasks.into_iter().map(|t| t.key).collect());
                        return Ok(());
                    }
                    // Harmless whatever its age: more events for a client.
                    Ok((message @ ToScheduler::Watch { .. }, Some(_))) => Ok(message),
                    Ok((_, Some(stale))) => Err(stale.into()),
                    Ok((message, None)) => Ok(message),
                    Err(error) => Err(error),
                };
                match opened {
                    Ok(message) => {
                        acks.submissions = Some(tag);
                        self.offer(message, &delivery.data).await?;
                    }
                    Err(error) => {
                        self.dead_letter(&delivery, "scheduler", &error.to_string());
                        acks.reject(&delivery, false);
                    }
                }
            }
            Input::Events(delivery) => {
                return self.handle_events(delivery, acks).await;
            }
            Input::Looked(key, found) => self.core.lookup_answered(&key, found, &mut self.out),
            Input::Unreferenced(keys) => self.core.forget(&keys, &mut self.out),
            Input::Abandoned(keys) => self.core.abandon(&keys, &mut self.out),
            Input::Stored(specs) => self.core.submit(specs, &mut self.out),
            Input::CustodyLapsed(keys) => {
                warn!(
                    tasks = keys.len(),
                    "the worker holding long tasks in custody is gone; running them again"
                );
                self.core.requeue(&keys);
            }
            Input::Closed(what) => return Err(SchedulerError::Closed(what)),
            Input::Deposed(why) => return Err(SchedulerError::Deposed(why)),
            Input::Checked(found) => {
                for (key, found) in found {
                    self.core.checked(&key, found, &mut self.out);
                }
            }
            Input::Refused(times) => return Err(SchedulerError::Refused(times)),
        }
        Ok(())
    }

    /// Reads the stored specs of `keys` in the background and submits
    /// those still there (tasks not done).
    fn take_up_stored(&self, keys: Vec<String>) {
        let store = self.store.clone();
        let codec = self.codec.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let read = transport::retry_while_unreachable("reading stored specs", || {
                store.read_specs(&keys)
            });
            let values: Vec<Option<Vec<u8>>> = match read.await {
                Ok(values) => values,
                Err(error) => {
                    warn!(%error, "reading stored specs failed; a restart takes them up");
                    return;
                }
            };
            let specs: Vec<flotilla_proto::TaskSpec> = values
                .into_iter()
                .flatten()
                .filter_map(|bytes| codec.decode(Purpose::Spec, &bytes, usize::MAX).ok())
                .collect();
            debug!(
                asked = keys.len(),
                pending = specs.len(),
                "stored specs of a stale submission"
            );
            let _ = inputs.send(Input::Stored(specs));
        });
    }

    /// Unfinished tasks in the core (waiting, ready, processing); counted
    /// only when the table is at least that large.
    fn unfinished(&self) -> usize {
        let len = self.core.len();
        if len < self.admission.bound() {
            return len;
        }
        self.core.unfinished()
    }

    /// Applies a message of the scheduler queue, or parks it in the
    /// backlog when the core is full or something is parked before it (see
    /// [`crate::admission`]); it is acknowledged once Redis has it.
    async fn offer(&mut self, message: ToScheduler, bytes: &[u8]) -> Result<(), SchedulerError> {
        let unfinished = if self.admission.parked() == 0 {
            self.unfinished()
        } else {
            0
        };
        let core = &self.core;
        match self
            .admission
            .route(&message, unfinished, |key| core.holds(key))
        {
            Route::Apply => self.apply(message),
            Route::Park => {
                if self.admission.parked() == 0 {
                    info!(
                        unfinished,
                        bound = self.admission.bound(),
                        "the scheduler holds as many tasks as it may: parking submissions in the backlog"
                    );
                }
                admission::park(&mut self.redis, &self.names, bytes).await?;
                self.admission.note_parked();
            }
        }
        Ok(())
    }

    /// Takes parked messages up from the backlog while the core has room
    /// (see [`Admission::take_up`]), a chunk at a time: each chunk is
    /// applied, what it caused is published, and only then is it trimmed
    /// from the backlog (a scheduler that dies meanwhile applies it again;
    /// submissions of known keys, releases and cancellations are
    /// idempotent).
    async fn take_up(&mut self) -> Result<(), SchedulerError> {
        loop {
            let unfinished = self.unfinished();
            let count = self.admission.take_up(unfinished, self.taking_up);
            if count == 0 {
                // At the bound (or nothing parked): the next take-up waits
                // for the low-water mark.
                if unfinished >= self.admission.bound() || self.admission.parked() == 0 {
                    self.taking_up = false;
                }
                return Ok(());
            }
            if !self.taking_up {
                info!(
                    unfinished,
                    parked = self.admission.parked(),
                    "taking up the backlog"
                );
            }
            self.taking_up = true;
            let messages = admission::read_backlog(&mut self.redis, &self.names, count).await?;
            if messages.is_empty() {
                // Emptied meanwhile (the namespace was purged).
                self.admission.note_taken_up(usize::MAX);
                self.taking_up = false;
                return Ok(());
            }
            let taken = messages.len();
            for bytes in messages {
                let decoded = self.codec.decode::<ToScheduler>(
                    Purpose::ToScheduler,
                    &bytes,
                    self.max_payload + (1 << 20),
                );
                match decoded {
                    Ok(message) => self.apply(message),
                    Err(error) => warn!(%error, "undecodable message in the backlog dropped"),
                }
            }
            self.core.dispatch(&mut self.out);
            self.flush(Acks::default()).await?;
            admission::trim_backlog(&mut self.redis, &self.names, taken).await?;
            self.admission.note_taken_up(taken);
            if self.admission.parked() == 0 {
                info!("backlog taken up: admitting submissions as they come");
                self.taking_up = false;
                return Ok(());
            }
        }
    }

    /// Applies one message of the scheduler queue.
    fn apply(&mut self, message: ToScheduler) {
        match message {
            ToScheduler::Submit { tasks, sent } => {
                debug!(count = tasks.len(), sent = sent.len(), "submitted");
                self.core.submit_sent(tasks, &sent, &mut self.out);
            }
            ToScheduler::Worker(info) => self.core.worker_seen(info, Instant::now()),
            ToScheduler::WorkerGone { worker } => self.core.worker_gone(&worker),
            ToScheduler::Forget { keys } => self.core.forget(&keys, &mut self.out),
            ToScheduler::Watch { client, keys } => self.core.watch(&client, &keys, &mut self.out),
            ToScheduler::Cancel { keys, force } => self.core.cancel(&keys, force, &mut self.out),
            ToScheduler::Retry { keys } => self.core.retry(&keys, &mut self.out),
            other => warn!(?other, "unexpected message on the scheduler queue"),
        }
    }

    /// Applies a batch of completion events.
    async fn handle_events(
        &mut self,
        delivery: lapin::message::Delivery,
        acks: &mut Acks,
    ) -> Result<(), SchedulerError> {
        let opened = self.codec.open::<EventBatch>(
            Purpose::Events,
            &delivery.data,
            delivery.redelivered,
            &self.events_guard,
            self.max_payload + (1 << 20),
        );
        match opened {
            Ok(batch) => {
                acks.events = Some(delivery.delivery_tag);
                for event in batch.events {
                    match event {
                        Event::Finished {
                            key,
                            inline,
                            size,
                            run_us,
                        } => self.core.finished_in(
                            &key,
                            inline,
                            size,
                            Duration::from_micros(run_us),
                            &mut self.out,
                        ),
                        Event::Erred {
                            key,
                            error,
                            retrying,
                        } => self.core.erred(&key, error, retrying, &mut self.out),
                        Event::Started { .. } => {}
                        other => warn!(?other, "unexpected event"),
                    }
                }
            }
            Err(error) => {
                self.dead_letter(&delivery, "scheduler.events", &error.to_string());
                acks.reject(&delivery, true);
            }
        }
        Ok(())
    }

    /// Logs a message that is dead-lettered (by [`Acks::reject`]).
    fn dead_letter(&self, delivery: &lapin::message::Delivery, queue: &str, reason: &str) {
        warn!(
            queue,
            reason,
            bytes = delivery.data.len(),
            "undecodable message dead-lettered"
        );
    }

    /// Writes and publishes what the core asked for; `acks` go out once the
    /// publishes are confirmed (see [`settle`]).
    async fn flush(&mut self, acks: Acks) -> Result<(), SchedulerError> {
        // Nothing is written or published without a valid lease. One that
        // ran out by this scheduler's clock (it was paused, or too busy to
        // renew it) is renewed first; a scheduler whose lease was taken
        // meanwhile steps down instead.
        if !self.leadership.valid() {
            leader::renew(&mut self.redis, &self.names, &self.id, &self.leadership)
                .await
                .map_err(SchedulerError::Deposed)?;
            if !self.leadership.valid() {
                return Err(SchedulerError::Deposed(
                    "the lease ran out by this scheduler's clock and Redis did not answer".into(),
                ));
            }
        }
        let out = std::mem::take(&mut self.out);
        self.store.forget_specs(&out.specs_done).await?;
        if !out.errors.is_empty() {
            let errors: Vec<(String, Vec<u8>)> = out
                .errors
                .iter()
                .map(|(key, error)| (key.clone(), self.codec.result_err(key, error)))
                .collect();
            self.store.store_errors(&errors).await?;
        }
        for (releases, wrap) in [
            (out.releases, Input::Unreferenced as fn(_) -> Input),
            (out.abandoned_releases, Input::Abandoned as fn(_) -> Input),
        ] {
            if releases.is_empty() {
                continue;
            }
            let store = self.store.clone();
            let inputs = self.inputs.clone();
            tokio::spawn(async move {
                match store.release(&releases).await {
                    Ok(keys) if !keys.is_empty() => {
                        let _ = inputs.send(wrap(keys));
                    }
                    Ok(_) => {}
                    Err(error) => warn!(%error, "releasing inputs failed"),
                }
            });
        }
        let mut sent = Vec::new();
        for (worker, bundle) in out.bundles {
            let bytes = self.codec.encode(
                Purpose::ToWorker,
                &ToWorker::Run {
                    tasks: bundle,
                    epoch: self.leadership.epoch,
                },
            );
            let queue = match &worker {
                Some(id) => self.names.worker_queue(id),
                None => self.names.tasks_queue(),
            };
            sent.push(self.publish(String::new(), queue, bytes, true).await?);
        }
        for (client, events) in out.notify {
            let bytes = self.codec.encode(
                Purpose::Events,
                &EventBatch {
                    worker: String::new(),
                    events,
                },
            );
            let exchange = self.names.events_exchange();
            let route = Names::scheduler_event_route(&client);
            sent.push(self.publish(exchange, route, bytes, false).await?);
        }
        if !out.cancels.is_empty() {
            let bytes = self
                .codec
                .encode(Purpose::ToWorker, &ToWorker::Cancel { keys: out.cancels });
            let exchange = self.names.control_exchange();
            sent.push(self.publish(exchange, String::new(), bytes, false).await?);
        }
        if !sent.is_empty() || !acks.is_empty() {
            // The settler is gone only when this life is ending.
            let _ = self.settler.send((sent, acks));
        }
        for key in out.lookups {
            let store = self.store.clone();
            let inputs = self.inputs.clone();
            let codec = self.codec.clone();
            tokio::spawn(async move {
                let found = lookup(&store, &codec, &key).await;
                let _ = inputs.send(Input::Looked(key, found));
            });
        }
        Ok(())
    }

    /// Publishes one message with a confirm to wait for (see [`settle`]).
    async fn publish(
        &self,
        exchange: String,
        routing_key: String,
        bytes: Vec<u8>,
        persistent: bool,
    ) -> Result<Sent, SchedulerError> {
        let confirm =
            publish_raw(&self.publisher, &exchange, &routing_key, &bytes, persistent).await?;
        Ok(Sent {
            confirm,
            exchange,
            routing_key,
            bytes,
            persistent,
        })
    }

    /// Every [`RECHECK_EVERY`], checks in the background the tasks
    /// processing now and at the last check against Redis (their spec and
    /// result), and whether Redis lost its data (see
    /// [`flotilla_runtime::incarnation`]).
    fn recheck(&mut self) {
        if self.rechecked.1.elapsed() < RECHECK_EVERY
            || self
                .checker
                .as_ref()
                .is_some_and(|task| !task.is_finished())
        {
            return;
        }
        let now: HashSet<String> = self.core.processing().into_iter().collect();
        let keys: Vec<String> = now.intersection(&self.rechecked.0).cloned().collect();
        self.rechecked = (now, Instant::now());
        let mut redis = self.redis.clone();
        let names = self.names.clone();
        let codec = self.codec.clone();
        let inputs = self.inputs.clone();
        let incarnation = self.incarnation.clone();
        let store = self.store.clone();
        self.checker = Some(tokio::spawn(async move {
            let lost = incarnation.lock().await.lost(&mut redis).await;
            match lost {
                Ok(true) => tracing::error!(
                    namespace = names.namespace(),
                    "Redis lost its data (the namespace's incarnation marker is gone): tasks whose spec and result are gone fail with a data-loss error"
                ),
                Ok(false) => {}
                Err(error) => warn!(%error, "checking Redis' incarnation marker failed"),
            }
            if keys.is_empty() {
                return;
            }
            match check_processing(&store, &codec, &keys).await {
                Ok(found) => {
                    let _ = inputs.send(Input::Checked(found));
                }
                Err(error) => warn!(%error, "checking processing tasks against Redis failed"),
            }
        }));
    }

    /// Takes back, in the background, tasks whose custody lapsed.
    fn sweep_custody(&mut self) {
        if self
            .custodian
            .as_ref()
            .is_some_and(|task| !task.is_finished())
        {
            return;
        }
        let store = self.store.clone();
        let inputs = self.inputs.clone();
        self.custodian = Some(tokio::spawn(async move {
            match store.lapsed_custody().await {
                Ok(keys) if !keys.is_empty() => {
                    let _ = inputs.send(Input::CustodyLapsed(keys));
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "checking tasks in custody failed"),
            }
        }));
    }

    /// Releases what clients whose lease lapsed still held (a client that
    /// died or lost its connection for longer than its lease), and cancels
    /// their pending work that nothing else holds ([`Core::abandon`]).
    /// Every [`ORPHAN_SWEEP_EVERY`] it also releases holds of client ids
    /// that have no lease at all (a client that closed or was reaped, whose
    /// hold arrived late), so that no such hold outlives its client.
    fn reap_clients(&mut self) {
        if self.reaper.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let orphans = self
            .orphans_swept
            .is_none_or(|at| at.elapsed() >= ORPHAN_SWEEP_EVERY);
        if orphans {
            self.orphans_swept = Some(Instant::now());
        }
        let store = self.store.clone();
        let inputs = self.inputs.clone();
        let grace = self.orphan_grace;
        self.reaper = Some(tokio::spawn(async move {
            match reap(&store, orphans, grace).await {
                Ok(keys) if !keys.is_empty() => {
                    let _ = inputs.send(Input::Abandoned(keys));
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "releasing the holds of lapsed clients failed"),
            }
        }));
    }
}

/// What Redis holds for each of `keys`: spec and result (see [`Checked`]).
async fn check_processing(
    store: &Store,
    codec: &Codec,
    keys: &[String],
) -> redis::RedisResult<Vec<(String, Checked)>> {
    let mut found = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(500) {
        // Specs first: a worker stores the result before it deletes the
        // spec, so a task that finishes between the two reads shows as
        // pending or finished, never as lost.
        let specs = store.specs_exist(chunk).await?;
        let tags = store.result_tags(chunk).await?;
        for ((key, spec), tag) in chunk.iter().zip(specs).zip(tags) {
            let checked = match tag {
                None if spec => Checked::Pending,
                None => Checked::Lost,
                Some(flotilla_proto::TAG_OK) => Checked::Finished,
                Some(_) => match lookup(store, codec, key).await {
                    Lookup::Erred(error) => Checked::Erred(error),
                    Lookup::Finished => Checked::Finished,
                    Lookup::Missing if spec => Checked::Pending,
                    Lookup::Missing => Checked::Lost,
                },
            };
            found.push((key.clone(), checked));
        }
    }
    Ok(found)
}

/// Whether a holder id is a client's (32 lowercase hex digits, see
/// [`flotilla_proto::new_id`]) rather than `t:…`, `ff`, `ds:…` and the like.
fn is_client_id(holder: &str) -> bool {
    holder.len() == 32
        && holder
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Releases every hold of clients whose lease lapsed, and with `orphans`
/// (or when some lease lapsed) every hold of a client id without a lease (a
/// client takes its lease before its first hold and gives it up only after
/// its last release, so such a hold is left over). Clients keep no list of
/// what they hold (that would cost two Redis writes per task), so this
/// scans the namespace's holders sets: rare work, done when a client died or
/// stayed away longer than its lease, and once every
/// [`ORPHAN_SWEEP_EVERY`].
///
/// A client found without a lease is given `grace` (one client lease) to
/// renew it before its holds go: a lease can vanish from a live
/// client, when the Redis master holding the leases loses the client's
/// first write in a failover (replication is asynchronous), and the
/// client's next renewal brings it back. Releasing its holds at once would
/// cancel its pending work (found by `chaos redis-master-failover`).
async fn reap(store: &Store, orphans: bool, grace: Duration) -> redis::RedisResult<Vec<String>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let lapsed = store.lapsed_leases(now, 50).await?;
    if lapsed.is_empty() && !orphans {
        return Ok(Vec::new());
    }
    // Scanning anyway: look for lease-less holders too.
    let lapsed_ids: HashSet<&str> = lapsed.iter().map(String::as_str).collect();
    let mut unreferenced = Vec::new();
    // Holds of clients without a lease when first seen.
    let mut leaseless: Vec<(String, String)> = Vec::new();
    let mut pages = store.holders();
    while let Some(sets) = pages.next_page().await? {
        let mut holds: Vec<(String, String)> = Vec::new();
        let mut suspects: Vec<(String, String)> = Vec::new();
        for (key, members) in sets {
            for member in members {
                if !is_client_id(&member) {
                    continue;
                }
                if lapsed_ids.contains(member.as_str()) {
                    holds.push((key.clone(), member));
                } else {
                    suspects.push((key.clone(), member));
                }
            }
        }
        leaseless.extend(without_lease(store, suspects).await?);
        // A hold seen twice (a walk over a cluster during a failover) is
        // released once and then found gone.
        for chunk in holds.chunks(1000) {
            unreferenced.extend(store.release(chunk).await?);
        }
    }
    for client in &lapsed {
        info!(client, "client lease lapsed: released what it held");
        store.drop_lease(client).await?;
    }
    if !leaseless.is_empty() {
        tokio::time::sleep(grace).await;
        // Asked again after the grace: a live client has renewed by now.
        let gone = without_lease(store, leaseless).await?;
        for chunk in gone.chunks(1000) {
            unreferenced.extend(store.release(chunk).await?);
        }
        if !gone.is_empty() {
            warn!(
                holds = gone.len(),
                "released holds of clients without a lease (left over after they closed or lapsed)"
            );
        }
    }
    Ok(unreferenced)
}

/// The holds of `holds` whose client has no lease.
async fn without_lease(
    store: &Store,
    holds: Vec<(String, String)>,
) -> redis::RedisResult<Vec<(String, String)>> {
    if holds.is_empty() {
        return Ok(holds);
    }
    let ids: Vec<&str> = holds
        .iter()
        .map(|(_, id)| id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let leased = store.have_leases(&ids).await?;
    let gone: HashSet<String> = ids
        .into_iter()
        .zip(leased)
        .filter(|(_, leased)| !leased)
        .map(|(id, _)| id.to_owned())
        .collect();
    Ok(holds
        .into_iter()
        .filter(|(_, id)| gone.contains(id))
        .collect())
}

async fn lookup(store: &Store, codec: &Codec, key: &str) -> Lookup {
    // A restarting Redis is waited for: taking its silence for a missing
    // input would fail the dependents.
    let keys = [key.to_owned()];
    let first =
        transport::retry_while_unreachable("looking up a result", || store.result_tags(&keys))
            .await;
    match first.as_deref() {
        Ok([None]) => Lookup::Missing,
        Ok([Some(flotilla_proto::TAG_OK)]) => Lookup::Finished,
        Ok(_) => {
            let whole = store.read_results(&keys).await;
            match whole.map(|mut values| values.pop().flatten()) {
                Ok(Some(bytes)) => match codec.open_result(key, bytes) {
                    Ok(StoredResult::Err(error)) => Lookup::Erred(error),
                    Ok(StoredResult::Ok(_) | StoredResult::Kept(_)) => Lookup::Finished,
                    Err(error) => {
                        warn!(%error, key, "stored result refused");
                        Lookup::Missing
                    }
                },
                _ => Lookup::Missing,
            }
        }
        Err(error) => {
            warn!(%error, key, "lookup failed");
            Lookup::Missing
        }
    }
}

/// The next message of an optional hook channel; pending forever without one.
async fn next_control<T>(channel: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match channel {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Every task spec stored in the namespace (tasks not yet done).
async fn recover_specs(
    store: &Store,
    codec: &Codec,
) -> redis::RedisResult<Vec<flotilla_proto::TaskSpec>> {
    let mut specs = Vec::new();
    // A walk over a cluster may bring a key twice (a failover meanwhile).
    let mut seen = HashSet::new();
    let mut pages = store.specs();
    while let Some(found) = pages.next_page().await? {
        for (key, value) in found {
            if !seen.insert(key.clone()) {
                continue;
            }
            let spec = value.map(|bytes| {
                codec.decode::<flotilla_proto::TaskSpec>(Purpose::Spec, &bytes, usize::MAX)
            });
            match spec {
                Some(Ok(spec)) => {
                    // A task with a stored result (an error kept for
                    // `retry`) has run: it is not taken up again.
                    let tags = store.result_tags(std::slice::from_ref(&spec.key)).await?;
                    if tags == [None] {
                        specs.push(spec);
                    }
                }
                Some(Err(error)) => warn!(%error, key, "unreadable stored task spec ignored"),
                None => {}
            }
        }
    }
    Ok(specs)
}

/// The wall clock in milliseconds since the Unix epoch: the time task
/// specs carry ([`TaskSpec::start_at_ms`](flotilla_proto::TaskSpec)).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{new_id, Config, TaskSpec};

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    /// A lapsed client's holds go (freeing what only it held), with its
    /// lease; a live client's and a task's stay; a client id with no lease
    /// at all loses its holds only on an orphan sweep.
    #[tokio::test]
    async fn reaping_releases_lapsed_and_leaseless_clients_only() {
        let store = Store::memory();
        let (lapsed, live, leaseless) = (new_id(), new_id(), new_id());
        store.renew_lease(&lapsed, now_ms() - 1).await.unwrap();
        store.renew_lease(&live, now_ms() + 60_000).await.unwrap();
        let mut setup = store.batch();
        setup
            .scatter("only-lapsed", &lapsed, b"v\0")
            .scatter("shared", &lapsed, b"v\0")
            .hold("shared", &live)
            .scatter("task-held", &lapsed, b"v\0")
            .hold("task-held", &task_holder("dependent"))
            .scatter("orphan", &leaseless, b"v\0");
        setup.exec().await.unwrap();

        let grace = Duration::from_millis(10);
        let mut freed = reap(&store, false, grace).await.unwrap();
        freed.sort();
        // A lapsed lease makes the sweep look for lease-less holders too.
        assert_eq!(freed, ["only-lapsed", "orphan"]);
        assert_eq!(
            store.have_leases(&[&lapsed, &live]).await.unwrap(),
            [false, true]
        );
        let keys: Vec<String> = ["shared", "task-held", "only-lapsed", "orphan"]
            .map(String::from)
            .to_vec();
        assert_eq!(store.held(&keys).await.unwrap(), [true, true, false, false]);
        let results = store.read_results(&keys).await.unwrap();
        assert!(results[0].is_some() && results[1].is_some());
        assert!(results[2].is_none() && results[3].is_none());

        // Nothing lapsed, no orphan sweep: nothing to do.
        let mut later = store.batch();
        later.scatter("later", &new_id(), b"v\0");
        later.exec().await.unwrap();
        assert!(reap(&store, false, grace).await.unwrap().is_empty());
        assert_eq!(reap(&store, true, grace).await.unwrap(), ["later"]);
    }

    /// A live client whose lease vanished (its first write lost in a Redis
    /// failover) and comes back within the grace keeps its holds; one
    /// still without a lease after it loses them.
    #[tokio::test]
    async fn a_lease_back_within_the_grace_keeps_its_holds() {
        let store = Store::memory();
        let (back, gone) = (new_id(), new_id());
        let mut setup = store.batch();
        setup
            .scatter("kept", &back, b"v\0")
            .scatter("left-over", &gone, b"v\0");
        setup.exec().await.unwrap();
        let grace = Duration::from_secs(1);
        let sweep = tokio::spawn({
            let store = store.clone();
            async move { reap(&store, true, grace).await.unwrap() }
        });
        // Well within the grace, the live client renews.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!sweep.is_finished(), "nothing is released before the grace");
        store.renew_lease(&back, now_ms() + 30_000).await.unwrap();
        assert_eq!(sweep.await.unwrap(), ["left-over"]);
        let keys = vec!["kept".to_owned(), "left-over".to_owned()];
        assert_eq!(store.held(&keys).await.unwrap(), [true, false]);
    }

    /// A restarted scheduler takes up the specs of tasks with no result
    /// (an erred task keeps its spec for `retry`, but has run).
    #[tokio::test]
    async fn recovery_takes_up_specs_without_a_result() {
        let store = Store::memory();
        let codec = Codec::new(&Config::default());
        let spec = |key: &str| {
            TaskSpec::new(
                key.into(),
                "t".into(),
                1,
                Vec::new(),
                Vec::new(),
                "c".into(),
            )
        };
        let mut setup = store.batch();
        for key in ["pending", "erred"] {
            setup.write_spec(key, &codec.encode(Purpose::Spec, &spec(key)));
        }
        setup
            .write_spec("garbage", b"not a spec")
            .hold("erred", "client")
            .store_result("erred", &[0x90, flotilla_proto::TAG_ERR]);
        setup.exec().await.unwrap();
        let specs = recover_specs(&store, &codec).await.unwrap();
        assert_eq!(specs, [spec("pending")]);
    }
}
