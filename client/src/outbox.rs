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

#[derive(Default)]
struct Batch {
    submit: Vec<TaskSpec>,
    watch: Vec<String>,
    forget: Vec<String>,
    cancel: Vec<(Vec<String>, bool)>,
    retry: Vec<String>,
    flushed: Vec<oneshot::Sender<()>>,
}

/// What each pipeline reply belongs to.
enum Reply {
    /// The submitted task's own hold: a stored result means it already ran.
    Submitted(usize),
    Held(String),
    Released(String),
    Ignore,
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

    async fn hold_and_release(&mut self, ops: Vec<Op>) -> redis::RedisResult<Batch> {
        let mut batch = Batch::default();
        let mut pipe = redis::pipe();
        let mut replies = Vec::new();
        let script =
            |pipe: &mut redis::Pipeline, script: &redis::Script, key: &str, holder: &str| {
                let keys = [self.names.holders_key(key), self.names.result_key(key)];
                refs::add(pipe, script, [&keys[0], &keys[1]], &[holder.as_bytes()]);
            };
        for op in ops {
            match op {
                Op::Submit(spec) => {
                    script(&mut pipe, &refs::HOLD, &spec.key, &self.client);
                    replies.push(Reply::Submitted(batch.submit.len()));
                    let holder = refs::task_holder(&spec.key);
                    for dep in &spec.deps {
                        script(&mut pipe, &refs::HOLD, dep, &holder);
                        replies.push(Reply::Ignore);
                    }
                    batch.submit.push(spec);
                }
                Op::Hold(key) => {
                    script(&mut pipe, &refs::HOLD, &key, &self.client);
                    replies.push(Reply::Held(key));
                }
                Op::Release(key) => {
                    script(&mut pipe, &refs::RELEASE, &key, &self.client);
                    replies.push(Reply::Released(key));
                }
                Op::FireAndForget(key) => {
                    script(
                        &mut pipe,
                        &refs::HOLD_UNTIL_DONE,
                        &key,
                        refs::FIRE_AND_FORGET,
                    );
                    replies.push(Reply::Ignore);
                }
                Op::Forget(keys) => batch.forget.extend(keys),
                Op::Cancel(keys, force) => batch.cancel.push((keys, force)),
                Op::Retry(keys) => batch.retry.extend(keys),
                Op::Flush(done) => batch.flushed.push(done),
            }
        }
        if replies.is_empty() {
            return Ok(batch);
        }
        let values: Vec<i64> = refs::run(&mut self.redis, &pipe).await?;
        let mut already_done = Vec::new();
        for (reply, value) in replies.into_iter().zip(values) {
            match reply {
                // The result is already stored (the same pure task ran
                // before): don't run it again, just hear about it.
                Reply::Submitted(index) if value >= 0 => already_done.push(index),
                Reply::Held(key) => batch.watch.push(key),
                Reply::Released(key) if value == 1 => batch.forget.push(key),
                _ => {}
            }
        }
        if !already_done.is_empty() {
            // It won't run, so it won't need its inputs.
            let mut pipe = redis::pipe();
            let mut released = Vec::new();
            for index in already_done.into_iter().rev() {
                let spec = batch.submit.remove(index);
                let holder = refs::task_holder(&spec.key);
                for dep in &spec.deps {
                    script(&mut pipe, &refs::RELEASE, dep, &holder);
                    released.push(dep.clone());
                }
                batch.watch.push(spec.key);
            }
            if !released.is_empty() {
                let freed: Vec<i64> = refs::run(&mut self.redis, &pipe).await?;
                batch.forget.extend(
                    released
                        .into_iter()
                        .zip(freed)
                        .filter(|(_, freed)| *freed == 1)
                        .map(|(key, _)| key),
                );
            }
        }
        Ok(batch)
    }

    async fn send(&mut self, batch: Batch, confirms: &mut VecDeque<PublisherConfirm>) {
        let mut messages = Vec::new();
        let mut start = 0;
        let specs = batch.submit;
        while start < specs.len() {
            let mut end = start;
            let mut bytes = 0;
            let limit = MAX_SUBMIT_BYTES.max(self.max_payload);
            while end < specs.len() && (end == start || bytes + specs[end].args.len() <= limit) {
                bytes += specs[end].args.len();
                end += 1;
            }
            messages.push(ToScheduler::Submit {
                tasks: specs[start..end].to_vec(),
            });
            start = end;
        }
        if !batch.watch.is_empty() {
            messages.push(ToScheduler::Watch {
                client: self.client.clone(),
                keys: batch.watch,
            });
        }
        if !batch.forget.is_empty() {
            messages.push(ToScheduler::Forget { keys: batch.forget });
        }
        for (keys, force) in batch.cancel {
            messages.push(ToScheduler::Cancel { keys, force });
        }
        if !batch.retry.is_empty() {
            messages.push(ToScheduler::Retry { keys: batch.retry });
        }
        let queue = self.names.scheduler_queue();
        for message in messages {
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
