//! Everything a client tells the cluster goes through one ordered outbox:
//! submissions, holds and releases of references, watches, cancellations.
//!
//! Each batch runs as one Redis pipeline (reference-count scripts, in
//! program order) followed by one message per kind to the scheduler. The
//! order matters: a task's holds on its inputs are taken before a later
//! release of those inputs can run, so data a pending task needs is never
//! freed under it.
//!
//! A release waits [`RELEASE_GRACE`] in the outbox before it is sent (or
//! less, when the program flushes). Until then the client's table keeps the
//! key's entry, and a `get_future`, `submit` or `scatter` of the same key
//! revives it: the release is then dropped, so dropping the last handle and
//! at once asking for the key again never loses its result.
//!
//! A batch of at most [`DIRECT_MAX`] submissions, while the client has at
//! most as many tasks pending, sends the tasks that need nothing of the
//! scheduler (no input to wait for, no placement, priority, retries or
//! start time)
//! straight to the shared task queue as well, naming them in its `Submit`
//! (`sent`): a lone task then takes one broker hop fewer (issue 16). Larger
//! batches, and everything while many tasks are pending, go through the
//! scheduler, which orders and bundles them.

use crate::room::{Room, Waiting};
use crate::state::FutureState;
use flotilla_proto::{Codec, Names, Purpose, RunTask, TaskSpec, ToScheduler, ToWorker};
use flotilla_runtime::store::{
    task_holder, Batch as StoreBatch, Held, Reply, Store, FIRE_AND_FORGET,
};
use flotilla_runtime::transport::{self, name};
use flotilla_runtime::Redis;
use lapin::options::BasicPublishOptions;
use lapin::Channel;
use lapin::PublisherConfirm;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

/// Largest batch of submissions in one message, in bytes of arguments.
const MAX_SUBMIT_BYTES: usize = 8 << 20;
/// Most operations handled in one batch.
const MAX_BATCH: usize = 10_000;
/// Messages published but not yet known to be confirmed, before the outbox
/// waits for the oldest confirmation.
const MAX_UNCONFIRMED: usize = 64;
/// How long a confirmation may take before the channel is presumed broken.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Most submissions in a batch whose tasks go straight to the task queue
/// (see the module's documentation).
pub(crate) const DIRECT_MAX: usize = 8;
/// How long a release waits before it is sent, so that the key can still be
/// revived by asking for it again (see the module documentation).
pub(crate) const RELEASE_GRACE: Duration = Duration::from_millis(50);
/// How long the outbox keeps retrying reference updates Redis fails or
/// refuses (restarting, or over its `maxmemory`) before it gives up: the
/// submissions of that batch fail with the Redis error, and so does a
/// `flush` waiting for them.
pub(crate) const GIVE_UP_AFTER: Duration = Duration::from_secs(20);

/// The client's futures by key: a live state, or a dead one whose release
/// is still waiting in the outbox.
pub(crate) type Table = Arc<Mutex<HashMap<String, Weak<FutureState>>>>;

/// One thing the client tells the cluster.
pub(crate) enum Op {
    /// Run this task (the client holds its key). With `Some`, it waits for
    /// room first (see [`crate::room`]): it and everything after it.
    Submit(Box<TaskSpec>, Option<Waiting>),
    /// Scatter an argument too large for its task's message (key, encoded
    /// value; see [`crate::args::INLINE_ARG_MAX`]), held by the client,
    /// before the submissions after it go out.
    Upload(String, Vec<u8>),
    /// Hold a key submitted elsewhere, and hear when it completes.
    Hold(String),
    /// The client's last handle of a key is gone (sent after
    /// [`RELEASE_GRACE`], unless the key is asked for again meanwhile).
    Release(String),
    /// Hold a key without hearing about it (an actor call's result, which
    /// the worker stores only while someone holds it).
    HoldQuietly(String),
    /// Answer once the reference updates queued before have run in Redis
    /// (without hurrying the releases waiting out their grace).
    Barrier(oneshot::Sender<()>),
    /// Keep the task alive until it ran, without keeping its result.
    FireAndForget(String),
    /// Keys that lost their last holder through another path.
    Forget(Vec<String>),
    /// Cancel tasks (and stop them if running, with `force`).
    Cancel(Vec<String>, bool),
    /// Run failed tasks again.
    Retry(Vec<String>),
    /// Hear about these keys' completion (again, after a reconnection).
    Watch(Vec<String>),
    /// Answer once everything before has been sent, or with the error that
    /// made the outbox give up on some of it.
    Flush(oneshot::Sender<Result<(), crate::error::Error>>),
}

pub(crate) struct Outbox {
    pub(crate) client: String,
    pub(crate) names: Names,
    /// The task-life keys: holds, releases, specs, the lease.
    pub(crate) store: Store,
    /// The current publishing channel; a new one arrives after the client
    /// reconnects.
    pub(crate) publish: watch::Receiver<Channel>,
    pub(crate) max_payload: usize,
    /// Signs the specs and messages.
    pub(crate) codec: Codec,
    /// Messages published but not yet confirmed by the broker, in order,
    /// kept for re-sending on a new channel.
    pub(crate) unconfirmed: VecDeque<Unconfirmed>,
    /// The client's table of futures, checked before a release is sent.
    pub(crate) table: Table,
    /// Releases waiting out their grace, oldest first.
    pub(crate) deferred: VecDeque<(Instant, String)>,
    /// The client's room for pending tasks: submissions queued without it
    /// take it here, in order.
    pub(crate) room: Arc<Room>,
}

/// A published message and the broker's pending confirmation of it.
pub(crate) struct Unconfirmed {
    /// The queue it was published to (through the default exchange).
    queue: String,
    bytes: Vec<u8>,
    /// `None` when publishing failed outright.
    confirm: Option<PublisherConfirm>,
}

/// What one batch sends to the scheduler, in the order the operations were
/// made: a release followed by a submission of the same key must reach the
/// scheduler in that order, or the fresh task would be forgotten.
#[derive(Default)]
struct Batch {
    messages: Vec<ToScheduler>,
    /// Tasks sent straight to the task queue, after the messages.
    direct: Vec<RunTask>,
    submit_bytes: usize,
    flushed: Vec<oneshot::Sender<Result<(), crate::error::Error>>>,
    /// Why some of the batch could not be done (its flushes get it).
    failure: Option<crate::error::Error>,
}

impl Batch {
    /// Appends to the last message when it is of the same kind.
    fn push(&mut self, message: ToScheduler, limit: usize) {
        match (self.messages.last_mut(), message) {
            (
                Some(ToScheduler::Submit { tasks, sent }),
                ToScheduler::Submit {
                    tasks: more,
                    sent: more_sent,
                },
            ) if self.submit_bytes + more.iter().map(|t| t.args.len()).sum::<usize>() <= limit => {
                self.submit_bytes += more.iter().map(|t| t.args.len()).sum::<usize>();
                tasks.extend(more);
                sent.extend(more_sent);
            }
            (Some(ToScheduler::Watch { keys, .. }), ToScheduler::Watch { keys: more, .. })
            | (Some(ToScheduler::Forget { keys }), ToScheduler::Forget { keys: more })
            | (Some(ToScheduler::Retry { keys }), ToScheduler::Retry { keys: more }) => {
                keys.extend(more)
            }
            (_, message) => {
                self.submit_bytes = match &message {
                    ToScheduler::Submit { tasks, .. } => tasks.iter().map(|t| t.args.len()).sum(),
                    _ => 0,
                };
                self.messages.push(message);
            }
        }
    }
}

/// One operation of a batch, with the index of its pipeline reply.
enum Step {
    Submit(TaskSpec, usize),
    Hold(String),
    Release(String, usize),
    Message(ToScheduler),
    Flush(oneshot::Sender<Result<(), crate::error::Error>>),
}

/// Whether a key's release may go out now: no state of it lives in the
/// client any more (else it was asked for again and the hold stays).
/// Takes the dead entry out of the table.
fn still_released(table: &Table, key: &str) -> bool {
    let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
    match table.get(key) {
        Some(state) if state.strong_count() > 0 => false,
        Some(_) => {
            table.remove(key);
            true
        }
        None => true,
    }
}

impl Outbox {
    /// Runs until every sender is gone and everything queued is sent.
    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut ops = Vec::new();
        loop {
            let due = self.deferred.front().map(|(at, _)| *at + RELEASE_GRACE);
            tokio::select! {
                received = rx.recv_many(&mut ops, MAX_BATCH) => {
                    if received == 0 {
                        break;
                    }
                }
                changed = self.publish.changed() => {
                    if changed.is_ok() {
                        self.resend().await;
                    }
                    continue;
                }
                _ = sleep_until(due) => {}
            }
            let mut received = std::mem::take(&mut ops);
            loop {
                // Everything up to the first submission without room goes
                // now; that one waits for room, and the rest behind it.
                let held = self.admit(&mut received);
                let batch = self.hold_and_release(received, false).await;
                self.send(batch).await;
                while self.unconfirmed.len() > MAX_UNCONFIRMED {
                    self.settle_oldest().await;
                }
                if held.is_empty() {
                    break;
                }
                received = held;
                self.wait_for_room(&mut received).await;
            }
        }
        // Every handle is gone: the releases still waiting go out now.
        let batch = self.hold_and_release(Vec::new(), true).await;
        self.send(batch).await;
        while !self.unconfirmed.is_empty() {
            self.settle_oldest().await;
        }
        // Nothing is held any more: give up the lease.
        let _ = self.store.drop_lease(&self.client).await;
    }

    /// Gives room to the queued submissions of `ops`, in order, while it is
    /// free; returns the operations from the first that found none on
    /// (which wait for [`Outbox::wait_for_room`]).
    fn admit(&self, ops: &mut Vec<Op>) -> Vec<Op> {
        for (at, op) in ops.iter_mut().enumerate() {
            if let Op::Submit(_, waiting @ Some(_)) = op {
                let Some(permit) = self.room.try_take() else {
                    return ops.split_off(at);
                };
                if let Some(waiting) = waiting.take() {
                    self.room.admit(waiting, permit);
                }
            }
        }
        Vec::new()
    }

    /// Waits until the first operation of `ops`, a submission queued
    /// without room, has it. The submissions sent before finish on their
    /// own meanwhile (their events do not pass through here); a channel
    /// that breaks meanwhile is replaced and what it had not confirmed is
    /// sent again, so that they can.
    async fn wait_for_room(&mut self, ops: &mut [Op]) {
        let permit = loop {
            tokio::select! {
                permit = self.room.take() => break permit,
                changed = self.publish.changed() => {
                    if changed.is_ok() {
                        self.resend().await;
                    } else {
                        break self.room.take().await;
                    }
                }
            }
        };
        if let Some(Op::Submit(_, waiting)) = ops.first_mut() {
            if let Some(waiting) = waiting.take() {
                self.room.admit(waiting, permit);
            }
        }
    }

    /// Adds a deferred release of `key` to the batch, unless the key was
    /// asked for again during its grace.
    fn release_deferred(&self, writes: &mut StoreBatch, steps: &mut Vec<Step>, key: String) {
        if still_released(&self.table, &key) {
            steps.push(Step::Release(key.clone(), writes.len()));
            writes.release(&key, &self.client);
        }
    }

    /// Waits for the broker's confirmation of the oldest unconfirmed
    /// message; when it does not come (the channel broke), re-sends every
    /// unconfirmed message in order on the current channel.
    async fn settle_oldest(&mut self) {
        let Some(oldest) = self.unconfirmed.front_mut() else {
            return;
        };
        let confirmed = match oldest.confirm.take() {
            Some(confirm) => matches!(
                tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await,
                Ok(Ok(c)) if c.is_ack()
            ),
            None => false,
        };
        if confirmed {
            self.unconfirmed.pop_front();
        } else {
            warn!("the broker did not confirm a message to the scheduler; re-sending");
            // Wait for the link to come back rather than spin on a dead
            // channel; the listener reconnects and hands a new one over.
            if !self.publish.borrow().status().connected() {
                let _ = self
                    .publish
                    .wait_for(|channel| channel.status().connected())
                    .await;
            }
            self.resend().await;
        }
    }

    /// Publishes every unconfirmed message again, in order, on the current
    /// channel. The scheduler takes duplicates in its stride (submissions
    /// of a known key, watches, releases and cancellations are idempotent).
    async fn resend(&mut self) {
        let channel = self.publish.borrow_and_update().clone();
        // What the broker confirmed before the channel broke is not sent
        // again (a confirmation that already arrived is ready at once).
        let mut kept = VecDeque::with_capacity(self.unconfirmed.len());
        for mut message in self.unconfirmed.drain(..) {
            if let Some(confirm) = message.confirm.take() {
                if matches!(
                    tokio::time::timeout(Duration::ZERO, confirm).await,
                    Ok(Ok(c)) if c.is_ack()
                ) {
                    continue;
                }
            }
            kept.push_back(message);
        }
        self.unconfirmed = kept;
        for message in &mut self.unconfirmed {
            message.confirm = channel
                .basic_publish(
                    name(""),
                    name(&message.queue),
                    BasicPublishOptions::default(),
                    &message.bytes,
                    transport::persistent(),
                )
                .await
                .ok();
        }
    }

    /// Runs a reference-count pipeline, retrying while Redis fails it: a
    /// submission is not dropped because Redis restarted. (The scripts
    /// are idempotent, so a pipeline that partly ran before the connection
    /// broke can run again.) Gives up after [`GIVE_UP_AFTER`] (a Redis down
    /// for that long, or refusing writes over its `maxmemory`).
    async fn run_retrying(&mut self, writes: &StoreBatch) -> redis::RedisResult<Vec<Reply>> {
        let mut backoff = flotilla_runtime::supervise::Backoff::default();
        let started = Instant::now();
        loop {
            match writes.exec().await {
                Ok(values) => return Ok(values),
                Err(error) if started.elapsed() >= GIVE_UP_AFTER => {
                    tracing::error!(%error, after = ?GIVE_UP_AFTER, "reference updates failed; giving up on them");
                    return Err(error);
                }
                Err(error) => {
                    let pause = backoff.next_pause();
                    warn!(%error, ?pause, "reference updates failed; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Scatters the arguments of `ops` too large for their messages, before
    /// anything else of the batch runs (so before the holds of the tasks
    /// that take them): in chunks from 4 MiB on, retrying while Redis fails
    /// for up to [`GIVE_UP_AFTER`]. A release of the same key still waiting
    /// out its grace is dropped: the upload takes the client's hold again,
    /// and the key's new handle releases it in its turn (the revival of the
    /// module docs). On failure the uploads' futures fail, and the caller
    /// gives up on the batch.
    async fn upload(&mut self, ops: &mut [Op]) -> redis::RedisResult<()> {
        let mut failure = None;
        for op in ops.iter_mut() {
            let Op::Upload(key, value) = op else {
                continue;
            };
            let value = std::mem::take(value);
            self.deferred.retain(|(_, deferred)| deferred != key);
            if failure.is_some() {
                continue;
            }
            let sealed = self.codec.result_ok_arg(key, &value);
            let pieces = sealed.pieces();
            let mut backoff = flotilla_runtime::supervise::Backoff::default();
            let started = Instant::now();
            loop {
                match self.store.scatter_large(key, &self.client, &pieces).await {
                    Ok(()) => break,
                    Err(error) if started.elapsed() >= GIVE_UP_AFTER => {
                        tracing::error!(%error, key, "scattering a large argument failed; giving up");
                        self.fail(key, &crate::error::Error::from(error.clone()));
                        failure = Some(error);
                        break;
                    }
                    Err(error) => {
                        let pause = backoff.next_pause();
                        warn!(%error, ?pause, key, "scattering a large argument failed; retrying");
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Fails the future of `key` in this client, if it is still wanted.
    fn fail(&self, key: &str, error: &crate::error::Error) {
        let state = self
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .and_then(Weak::upgrade);
        if let Some(state) = state {
            state.set_failed(error.clone());
        }
    }

    /// Runs one batch's reference updates in one pipeline, in program
    /// order, and returns what to tell the scheduler. Releases are deferred
    /// (see [`RELEASE_GRACE`]); those whose grace is over go first (they
    /// were made before this batch), and with `all` or a flush in the batch
    /// every deferred release goes, after this batch's operations.
    async fn hold_and_release(&mut self, mut ops: Vec<Op>, all: bool) -> Batch {
        let uploaded = self.upload(&mut ops).await;
        let mut writes = self.store.batch();
        let mut steps = Vec::with_capacity(ops.len());
        let mut barriers = Vec::new();
        let now = Instant::now();
        while let Some((at, _)) = self.deferred.front() {
            if *at + RELEASE_GRACE > now {
                break;
            }
            let Some((_, key)) = self.deferred.pop_front() else {
                break;
            };
            self.release_deferred(&mut writes, &mut steps, key);
        }
        let flushing = all || ops.iter().any(|op| matches!(op, Op::Flush(_)));
        let mut flushes = Vec::new();
        for op in ops {
            match op {
                Op::Submit(spec, _) => {
                    // The spec goes to Redis with the task's first hold, so a
                    // scheduler that restarts finds every pending task.
                    writes.write_spec(&spec.key, &self.codec.encode(Purpose::Spec, &spec));
                    let reply = writes.len();
                    writes.hold(&spec.key, &self.client);
                    let holder = task_holder(&spec.key);
                    for key in spec.held_keys() {
                        writes.hold(key, &holder);
                    }
                    steps.push(Step::Submit(*spec, reply));
                }
                Op::Upload(..) => {}
                Op::Hold(key) => {
                    writes.hold(&key, &self.client);
                    steps.push(Step::Hold(key));
                }
                Op::Release(key) => self.deferred.push_back((now, key)),
                Op::HoldQuietly(key) => {
                    writes.hold(&key, &self.client);
                }
                Op::Barrier(done) => barriers.push(done),
                Op::FireAndForget(key) => {
                    writes.hold_until_done(&key, FIRE_AND_FORGET);
                }
                Op::Forget(keys) => steps.push(Step::Message(ToScheduler::Forget { keys })),
                Op::Cancel(keys, force) => {
                    steps.push(Step::Message(ToScheduler::Cancel { keys, force }))
                }
                Op::Retry(keys) => steps.push(Step::Message(ToScheduler::Retry { keys })),
                Op::Watch(keys) => steps.push(Step::Message(ToScheduler::Watch {
                    client: self.client.clone(),
                    keys,
                })),
                Op::Flush(done) => flushes.push(done),
            }
        }
        if flushing {
            // After this batch's holds: a release made after a hold of the
            // same key must run after it.
            for (_, key) in std::mem::take(&mut self.deferred) {
                self.release_deferred(&mut writes, &mut steps, key);
            }
        }
        steps.extend(flushes.into_iter().map(Step::Flush));
        if let Err(error) = uploaded {
            for done in barriers {
                let _ = done.send(());
            }
            return self.gave_up(steps, error).await;
        }
        let values: Vec<Reply> = if writes.is_empty() {
            Vec::new()
        } else {
            match self.run_retrying(&writes).await {
                Ok(values) => values,
                Err(error) => {
                    for done in barriers {
                        let _ = done.send(());
                    }
                    return self.gave_up(steps, error).await;
                }
            }
        };
        for done in barriers {
            let _ = done.send(());
        }
        let limit = MAX_SUBMIT_BYTES.max(self.max_payload);
        let mut batch = Batch::default();
        let mut not_run = Vec::new();
        // Only while few tasks are pending: a `map` under way goes through
        // the scheduler whole, which bundles it.
        let pending = {
            let line = self.room.lock();
            self.room.pending(&line)
        };
        let direct = pending <= DIRECT_MAX
            && steps
                .iter()
                .filter(|step| matches!(step, Step::Submit(..)))
                .count()
                <= DIRECT_MAX;
        for step in steps {
            match step {
                // A stored result under the key means the same pure task
                // already ran: don't run it again, just hear about it.
                Step::Submit(spec, reply)
                    if matches!(values.get(reply), Some(Reply::Held(Held::Stored(_)))) =>
                {
                    batch.push(
                        ToScheduler::Watch {
                            client: self.client.clone(),
                            keys: vec![spec.key.clone()],
                        },
                        limit,
                    );
                    not_run.push(spec);
                }
                Step::Submit(spec, _) => {
                    let sent = if direct && goes_direct(&spec) {
                        batch.direct.push(RunTask {
                            spec: spec.clone(),
                            inline: Vec::new(),
                            attempt: 0,
                        });
                        vec![spec.key.clone()]
                    } else {
                        Vec::new()
                    };
                    batch.push(
                        ToScheduler::Submit {
                            tasks: vec![spec],
                            sent,
                        },
                        limit,
                    )
                }
                Step::Hold(key) => batch.push(
                    ToScheduler::Watch {
                        client: self.client.clone(),
                        keys: vec![key],
                    },
                    limit,
                ),
                Step::Release(key, reply)
                    if values.get(reply) == Some(&Reply::Released { freed: true }) =>
                {
                    batch.push(ToScheduler::Forget { keys: vec![key] }, limit)
                }
                Step::Release(..) => {}
                Step::Message(message) => batch.push(message, limit),
                Step::Flush(done) => batch.flushed.push(done),
            }
        }
        if !not_run.is_empty() {
            // Tasks that won't run don't need their inputs.
            let mut writes = self.store.batch();
            let mut released = Vec::new();
            for spec in &not_run {
                writes.forget_spec(&spec.key);
                let holder = task_holder(&spec.key);
                for key in spec.held_keys() {
                    released.push((key.clone(), writes.len()));
                    writes.release(key, &holder);
                }
            }
            if released.is_empty() {
                if let Err(error) = self.run_retrying(&writes).await {
                    warn!(%error, "deleting the specs of tasks that ran already failed");
                }
            } else {
                let replies = self.run_retrying(&writes).await.unwrap_or_default();
                let keys: Vec<String> = released
                    .into_iter()
                    .filter(|(_, reply)| {
                        replies.get(*reply) == Some(&Reply::Released { freed: true })
                    })
                    .map(|(key, _)| key)
                    .collect();
                if !keys.is_empty() {
                    batch.push(ToScheduler::Forget { keys }, limit);
                }
            }
        }
        batch
    }

    /// A batch whose reference updates Redis kept failing: its submissions
    /// and holds fail with the error (the specs written are deleted, so no
    /// restarted scheduler runs them), its messages to the scheduler still
    /// go, and its flushes answer with the error.
    async fn gave_up(&mut self, steps: Vec<Step>, error: redis::RedisError) -> Batch {
        let error = crate::error::Error::from(error);
        let limit = MAX_SUBMIT_BYTES.max(self.max_payload);
        let mut batch = Batch {
            failure: Some(error.clone()),
            ..Batch::default()
        };
        let mut rollback = self.store.batch();
        for step in steps {
            match step {
                Step::Submit(spec, _) => {
                    rollback.forget_spec(&spec.key);
                    self.fail(&spec.key, &error);
                }
                Step::Hold(key) => self.fail(&key, &error),
                Step::Release(..) => {}
                Step::Message(message) => batch.push(message, limit),
                Step::Flush(done) => batch.flushed.push(done),
            }
        }
        // DEL is allowed even over maxmemory; a Redis that is down keeps no
        // spec of ours to worry about either way.
        let _ = rollback.exec_each().await;
        batch
    }

    async fn send(&mut self, batch: Batch) {
        let channel = self.publish.borrow().clone();
        // The scheduler hears of a task before any worker can report it
        // (it would keep an early report a while anyway).
        let scheduler = self.names.scheduler_queue();
        let messages = batch
            .messages
            .iter()
            .map(|message| (&scheduler, self.codec.encode(Purpose::ToScheduler, message)));
        let tasks = self.names.tasks_queue();
        let direct = batch.direct.into_iter().map(|run| {
            let bundle = ToWorker::Run {
                tasks: vec![run],
                epoch: 0,
            };
            (&tasks, self.codec.encode(Purpose::ToWorker, &bundle))
        });
        let outgoing: Vec<(&String, Vec<u8>)> = messages.chain(direct).collect();
        for (queue, bytes) in outgoing {
            let confirm = match channel
                .basic_publish(
                    name(""),
                    name(queue),
                    BasicPublishOptions::default(),
                    &bytes,
                    transport::persistent(),
                )
                .await
            {
                Ok(confirm) => Some(confirm),
                Err(error) => {
                    warn!(%error, %queue, "publishing failed; it will be re-sent");
                    None
                }
            };
            self.unconfirmed.push_back(Unconfirmed {
                queue: queue.clone(),
                bytes,
                confirm,
            });
        }
        for done in batch.flushed {
            let _ = done.send(match &batch.failure {
                Some(error) => Err(error.clone()),
                None => Ok(()),
            });
        }
    }
}

/// Whether a task may go straight to the task queue: it waits for no
/// input and needs nothing the scheduler decides (a placement, an order
/// among ready tasks, another run after a failure, a start time).
fn goes_direct(spec: &TaskSpec) -> bool {
    spec.deps.is_empty()
        && spec.workers.is_empty()
        && spec.resources.is_empty()
        && spec.priority == 0
        && spec.retries == 0
        && spec.start_at_ms == 0
}

/// Sleeps until `due`, or forever without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// Keeps the client's lease alive: while it is renewed, the client's holds
/// survive even a broken connection; once it lapses, the scheduler releases
/// them and cancels the client's pending tasks that nothing else holds. It
/// also checks Redis' incarnation marker and calls `on_data_lost` when
/// Redis lost its data, and watches the leader lease's epoch and calls
/// `resync` when another scheduler took over (or the same one took
/// the lease again after losing it): the new leader knows only the tasks
/// whose specs it found in Redis, and a spec whose write a Redis failover
/// lost would leave its future waiting for a task nobody runs. It calls
/// `resync` too when a renewal finds the lease gone (a failover lost its
/// first write): the scheduler may have taken the client for gone
/// meanwhile and dropped its pending tasks.
pub(crate) async fn renew_lease(
    mut redis: Redis,
    names: Names,
    client: String,
    lease: Duration,
    mut incarnation: flotilla_runtime::incarnation::Incarnation,
    on_data_lost: impl Fn() + Send + 'static,
    resync: impl Fn() + Send + 'static,
) {
    // Checked at least every 5 s, so a future waiting on data Redis lost
    // resolves soon after.
    let store = Store::redis(redis.clone(), names.clone());
    let mut tick = tokio::time::interval((lease / 4).min(Duration::from_secs(5)));
    let mut epoch: Option<String> = None;
    loop {
        tick.tick().await;
        match incarnation.lost(&mut redis).await {
            Ok(true) => on_data_lost(),
            Ok(false) => {}
            Err(error) => warn!(%error, "checking Redis' incarnation marker failed"),
        }
        // `<scheduler id>|<epoch>`; absent between two leaders.
        let leader: redis::RedisResult<Option<String>> = redis::cmd("GET")
            .arg(names.leader_key())
            .query_async(&mut redis)
            .await;
        if let Ok(Some(leader)) = leader {
            let now = leader.rsplit('|').next().map(str::to_owned);
            if epoch.is_some() && now.is_some() && now != epoch {
                tracing::info!(
                    leader,
                    "a scheduler took the leader lease: asking it about pending futures"
                );
                resync();
            }
            if now.is_some() {
                epoch = now;
            }
        }
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(lease)
            .as_millis() as u64;
        match store.renew_lease(&client, expiry).await {
            // Taken when the client connected: this renewal found it gone.
            Ok(true) => {
                warn!("the client's lease was gone from Redis (a failover lost it): asking the scheduler about pending futures");
                resync();
            }
            Ok(false) => {}
            Err(error) => warn!(%error, "renewing the client's lease failed"),
        }
    }
}
