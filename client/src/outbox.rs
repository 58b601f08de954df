//! Everything a client tells the cluster goes through one ordered outbox:
//! submissions, holds and releases of references, watches, cancellations.
//!
//! Each batch runs as one Redis pipeline (reference-count scripts, in
//! program order) followed by one message per kind to the scheduler. The
//! order matters: a task's holds on its inputs are taken before a later
//! release of those inputs can run, so data a pending task needs is never
//! freed under it.

use flotilla_proto::refs;
use flotilla_proto::transport::{self, name};
use flotilla_proto::{encode, Names, TaskSpec, ToScheduler};
use lapin::options::BasicPublishOptions;
use lapin::Channel;
use lapin::PublisherConfirm;
use redis::aio::ConnectionManager;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Largest batch of submissions in one message, in bytes of arguments.
const MAX_SUBMIT_BYTES: usize = 8 << 20;
/// Most operations handled in one batch.
const MAX_BATCH: usize = 10_000;

/// One thing the client tells the cluster.
pub(crate) enum Op {
    /// Run this task (the client holds its key).
    Submit(TaskSpec),
    /// Hold a key submitted elsewhere, and hear when it completes.
    Hold(String),
    /// The client's last handle of a key is gone.
    Release(String),
    /// Keep the task alive until it ran, without keeping its result.
    FireAndForget(String),
    /// Keys that lost their last holder through another path.
    Forget(Vec<String>),
    /// Cancel tasks (and stop them if running, with `force`).
    Cancel(Vec<String>, bool),
    /// Run failed tasks again.
    Retry(Vec<String>),
    /// Answer once everything before has been sent.
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Outbox {
    pub(crate) client: String,
    pub(crate) names: Names,
    pub(crate) redis: ConnectionManager,
    pub(crate) publish: Channel,
    pub(crate) max_payload: usize,
}

/// What one batch sends to the scheduler, in the order the operations were
/// made: a release followed by a submission of the same key must reach the
/// scheduler in that order, or the fresh task would be forgotten.
#[derive(Default)]
struct Batch {
    messages: Vec<ToScheduler>,
    submit_bytes: usize,
    flushed: Vec<oneshot::Sender<()>>,
}

impl Batch {
    /// Appends to the last message when it is of the same kind.
    fn push(&mut self, message: ToScheduler, limit: usize) {
        match (self.messages.last_mut(), message) {
            (Some(ToScheduler::Submit { tasks }), ToScheduler::Submit { tasks: more })
                if self.submit_bytes + more.iter().map(|t| t.args.len()).sum::<usize>()
                    <= limit =>
            {
                self.submit_bytes += more.iter().map(|t| t.args.len()).sum::<usize>();
                tasks.extend(more);
            }
            (Some(ToScheduler::Watch { keys, .. }), ToScheduler::Watch { keys: more, .. })
            | (Some(ToScheduler::Forget { keys }), ToScheduler::Forget { keys: more })
            | (Some(ToScheduler::Retry { keys }), ToScheduler::Retry { keys: more }) => {
                keys.extend(more)
            }
            (_, message) => {
                self.submit_bytes = match &message {
                    ToScheduler::Submit { tasks } => tasks.iter().map(|t| t.args.len()).sum(),
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
    Flush(oneshot::Sender<()>),
}

impl Outbox {
    /// Runs until every sender is gone and everything queued is sent.
    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut ops = Vec::new();
        let mut confirms: VecDeque<PublisherConfirm> = VecDeque::new();
        while rx.recv_many(&mut ops, MAX_BATCH).await > 0 {
            let batch = match self.hold_and_release(std::mem::take(&mut ops)).await {
                Ok(batch) => batch,
                Err(error) => {
                    warn!(%error, "reference updates failed; submissions in this batch are lost");
                    continue;
                }
            };
            self.send(batch, &mut confirms).await;
            while confirms.len() > 64 {
                if let Some(confirm) = confirms.pop_front() {
                    if !matches!(confirm.await, Ok(c) if c.is_ack()) {
                        warn!("the broker did not confirm a message to the scheduler");
                    }
                }
            }
        }
        for confirm in confirms {
            let _ = confirm.await;
        }
        // Nothing is held any more: give up the lease.
        let _ = redis::cmd("ZREM")
            .arg(self.names.leases_key())
            .arg(&self.client)
            .query_async::<()>(&mut self.redis)
            .await;
    }

    fn script(&self, pipe: &mut redis::Pipeline, script: &redis::Script, key: &str, holder: &str) {
        refs::add_for(pipe, &self.names, script, key, &[holder.as_bytes()]);
    }

    async fn hold_and_release(&mut self, ops: Vec<Op>) -> redis::RedisResult<Batch> {
        let mut pipe = redis::pipe();
        let mut replies = 0;
        let mut steps = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Submit(spec) => {
                    // The spec goes to Redis with the task's first hold, so a
                    // scheduler that restarts finds every pending task.
                    pipe.set(self.names.spec_key(&spec.key), encode(&spec))
                        .ignore();
                    self.script(&mut pipe, &refs::HOLD, &spec.key, &self.client);
                    let holder = refs::task_holder(&spec.key);
                    for key in spec.held_keys() {
                        self.script(&mut pipe, &refs::HOLD, key, &holder);
                    }
                    let holds = 1 + spec.held_keys().count();
                    steps.push(Step::Submit(spec, replies));
                    replies += holds;
                }
                Op::Hold(key) => {
                    self.script(&mut pipe, &refs::HOLD, &key, &self.client);
                    replies += 1;
                    steps.push(Step::Hold(key));
                }
                Op::Release(key) => {
                    self.script(&mut pipe, &refs::RELEASE, &key, &self.client);
                    steps.push(Step::Release(key, replies));
                    replies += 1;
                }
                Op::FireAndForget(key) => {
                    self.script(
                        &mut pipe,
                        &refs::HOLD_UNTIL_DONE,
                        &key,
                        refs::FIRE_AND_FORGET,
                    );
                    replies += 1;
                }
                Op::Forget(keys) => steps.push(Step::Message(ToScheduler::Forget { keys })),
                Op::Cancel(keys, force) => {
                    steps.push(Step::Message(ToScheduler::Cancel { keys, force }))
                }
                Op::Retry(keys) => steps.push(Step::Message(ToScheduler::Retry { keys })),
                Op::Flush(done) => steps.push(Step::Flush(done)),
            }
        }
        let values: Vec<i64> = if replies == 0 {
            Vec::new()
        } else {
            refs::run(&mut self.redis, &pipe).await?
        };
        let limit = MAX_SUBMIT_BYTES.max(self.max_payload);
        let mut batch = Batch::default();
        let mut not_run = Vec::new();
        for step in steps {
            match step {
                // A stored result under the key means the same pure task
                // already ran: don't run it again, just hear about it.
                Step::Submit(spec, reply) if values.get(reply).is_some_and(|tag| *tag >= 0) => {
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
                    batch.push(ToScheduler::Submit { tasks: vec![spec] }, limit)
                }
                Step::Hold(key) => batch.push(
                    ToScheduler::Watch {
                        client: self.client.clone(),
                        keys: vec![key],
                    },
                    limit,
                ),
                Step::Release(key, reply) if values.get(reply) == Some(&1) => {
                    batch.push(ToScheduler::Forget { keys: vec![key] }, limit)
                }
                Step::Release(..) => {}
                Step::Message(message) => batch.push(message, limit),
                Step::Flush(done) => batch.flushed.push(done),
            }
        }
        if !not_run.is_empty() {
            // Tasks that won't run don't need their inputs.
            let mut pipe = redis::pipe();
            let mut released = Vec::new();
            for spec in &not_run {
                pipe.del(self.names.spec_key(&spec.key)).ignore();
                let holder = refs::task_holder(&spec.key);
                for key in spec.held_keys() {
                    self.script(&mut pipe, &refs::RELEASE, key, &holder);
                    released.push(key.clone());
                }
            }
            if released.is_empty() {
                pipe.query_async::<()>(&mut self.redis).await?;
            } else {
                let freed: Vec<i64> = refs::run(&mut self.redis, &pipe).await?;
                let keys: Vec<String> = released
                    .into_iter()
                    .zip(freed)
                    .filter(|(_, freed)| *freed == 1)
                    .map(|(key, _)| key)
                    .collect();
                if !keys.is_empty() {
                    batch.push(ToScheduler::Forget { keys }, limit);
                }
            }
        }
        Ok(batch)
    }

    async fn send(&mut self, batch: Batch, confirms: &mut VecDeque<PublisherConfirm>) {
        let queue = self.names.scheduler_queue();
        for message in batch.messages {
            match self
                .publish
                .basic_publish(
                    name(""),
                    name(&queue),
                    BasicPublishOptions::default(),
                    &encode(&message),
                    transport::persistent(),
                )
                .await
            {
                Ok(confirm) => confirms.push_back(confirm),
                Err(error) => warn!(%error, "publishing to the scheduler failed"),
            }
        }
        for done in batch.flushed {
            let _ = done.send(());
        }
    }
}

/// Keeps the client's lease alive: while it is renewed, the client's holds
/// survive even a broken connection; once it lapses, the scheduler releases
/// them.
pub(crate) async fn renew_lease(
    mut redis: ConnectionManager,
    names: Names,
    client: String,
    lease: Duration,
) {
    let mut tick = tokio::time::interval(lease / 4);
    loop {
        tick.tick().await;
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(lease)
            .as_millis() as u64;
        if let Err(error) = redis::cmd("ZADD")
            .arg(names.leases_key())
            .arg(expiry)
            .arg(&client)
            .query_async::<()>(&mut redis)
            .await
        {
            warn!(%error, "renewing the client's lease failed");
        }
    }
}
