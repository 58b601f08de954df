//! The client: submits tasks, tracks their futures, fetches results.

use crate::args::{ArgWriter, IntoArgs};
use crate::future::{read_stored, FutureState};
use crate::{Error, Future, Result};
use flotilla_proto::transport::{self, name};
use flotilla_proto::{
    decode, encode, Config, Event, EventBatch, Names, Task, TaskSpec, ToScheduler,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

/// Largest batch of submissions in one message, in bytes of arguments.
const MAX_SUBMIT_BYTES: usize = 8 << 20;
/// Most keys read from Redis in one `MGET`.
const FETCH_CHUNK: usize = 1024;

/// A connection to a Flotilla cluster: submit tasks, get futures.
///
/// Cheap to clone; clones share connections and futures. The background
/// work (batching submissions, receiving completion events) runs on the
/// tokio runtime that connected it.
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
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .field("namespace", &self.inner.names.namespace())
            .finish_non_exhaustive()
    }
}

pub(crate) struct ClientInner {
    pub(crate) id: String,
    pub(crate) config: Config,
    pub(crate) names: Names,
    redis: ConnectionManager,
    connection: Connection,
    futures: Mutex<HashMap<String, Weak<FutureState>>>,
    submissions: mpsc::UnboundedSender<TaskSpec>,
    background: Mutex<Vec<JoinHandle<()>>>,
    #[allow(dead_code)] // used by the coordination primitives
    pool: tokio::sync::OnceCell<deadpool_redis::Pool>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        for task in self
            .background
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default()
        {
            task.abort();
        }
    }
}

impl ClientInner {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<FutureState>>> {
        self.futures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called when the last handle of `key` is gone.
    pub(crate) fn forget(&self, key: &str) {
        let mut table = self.table();
        if table.get(key).is_some_and(|weak| weak.strong_count() == 0) {
            table.remove(key);
        }
    }

    fn state(&self, key: &str) -> Option<Arc<FutureState>> {
        self.table().get(key).and_then(Weak::upgrade)
    }

    /// Reads stored results, in order, a chunk of keys per round trip.
    pub(crate) async fn fetch(&self, keys: &[&str]) -> Result<Vec<Result<Arc<Vec<u8>>>>> {
        let mut out = Vec::with_capacity(keys.len());
        let mut redis = self.redis.clone();
        for chunk in keys.chunks(FETCH_CHUNK) {
            let redis_keys: Vec<String> = chunk.iter().map(|k| self.names.result_key(k)).collect();
            let values: Vec<Option<Vec<u8>>> = if redis_keys.len() == 1 {
                vec![
                    redis::cmd("GET")
                        .arg(&redis_keys[0])
                        .query_async(&mut redis)
                        .await?,
                ]
            } else {
                redis::cmd("MGET")
                    .arg(&redis_keys)
                    .query_async(&mut redis)
                    .await?
            };
            for (key, value) in chunk.iter().zip(values) {
                out.push(read_stored(key, value));
            }
        }
        Ok(out)
    }

    fn apply(&self, event: Event) {
        let Some(state) = self.state(event.key()) else {
            return;
        };
        match event {
            Event::Finished { inline, .. } => state.set_finished(inline),
            Event::Erred { error, .. } => state.set_failed(Error::Task(error)),
            Event::Started { .. } => state.set_running(),
            _ => {}
        }
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
    /// function with the same arguments is one task).
    pub fn pure(mut self, pure: bool) -> Self {
        self.pure = pure;
        self
    }

    /// Submits the task; returns its future at once.
    pub fn submit(self) -> Future<K::Output> {
        self.client
            .submit_spec(self.task, self.args, self.key, self.pure, self.priority)
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
        let connection = transport::connect_amqp(
            &config.amqp_url,
            &format!("flotilla-client {id} ({})", names.namespace()),
        )
        .await?;
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        transport::declare_topology(&publish, &names).await?;
        let queue = names.client_queue(&id);
        transport::declare_private_queue(
            &publish,
            &names,
            &queue,
            Some(&Names::client_binding(&id)),
        )
        .await?;
        let redis = transport::connect_redis(&config.redis_url).await?;
        let consume = connection.create_channel().await?;
        consume.basic_qos(1024, BasicQosOptions::default()).await?;
        let consumer = consume
            .basic_consume(
                name(&queue),
                name(&id),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let (submissions, submission_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(ClientInner {
            id,
            config,
            names,
            redis,
            connection,
            futures: Mutex::new(HashMap::new()),
            submissions,
            background: Mutex::new(Vec::new()),
            pool: tokio::sync::OnceCell::new(),
        });
        let submitter = tokio::spawn(submit_loop(
            submission_rx,
            publish,
            inner.names.clone(),
            inner.config.max_payload,
        ));
        let listener = tokio::spawn(event_loop(
            consumer,
            Arc::downgrade(&inner),
            inner.config.max_payload,
        ));
        inner
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([submitter, listener]);
        Ok(Client { inner })
    }

    /// This client's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The shared, multiplexed Redis connection (never use blocking
    /// commands on it: they would stall every other command behind them).
    #[allow(dead_code)] // used by the coordination primitives
    pub(crate) fn redis(&self) -> ConnectionManager {
        self.inner.redis.clone()
    }

    /// A pooled Redis connection of its own, for blocking commands
    /// (`BLPOP`, `BLMOVE`, ...), pub/sub and transactions.
    #[allow(dead_code)] // used by the coordination primitives
    pub(crate) async fn dedicated_redis(&self) -> Result<deadpool_redis::Connection> {
        let pool = self
            .inner
            .pool
            .get_or_try_init(|| async {
                deadpool_redis::Config::from_url(self.inner.config.redis_url.clone())
                    .builder()
                    .map(|b| {
                        b.max_size(64)
                            .runtime(deadpool_redis::Runtime::Tokio1)
                            .build()
                    })
                    .map_err(|e| Error::Config(format!("Redis pool: {e}")))?
                    .map_err(|e| Error::Config(format!("Redis pool: {e}")))
            })
            .await?;
        pool.get()
            .await
            .map_err(|e| Error::Config(format!("Redis pool: {e}")))
    }

    /// The queue and key names of the client's namespace.
    #[allow(dead_code)] // used by the coordination primitives
    pub(crate) fn names(&self) -> &Names {
        &self.inner.names
    }

    /// The configuration it connected with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Submits `task` with `args` (a tuple; a future may stand wherever the
    /// task takes a value) and returns its future at once. Submissions are
    /// batched and sent in the background.
    ///
    /// Problems found before sending (arguments over the payload limit, an
    /// argument that cannot be encoded) come back as an already-failed future.
    pub fn submit<K: Task, A: IntoArgs<K::Args>>(&self, task: K, args: A) -> Future<K::Output> {
        self.submit_spec(task, args, None, true, 0)
    }

    /// Like [`Client::submit`], with options:
    /// `client.submit_with(add, (1, 2)).priority(5).key("x").submit()`.
    pub fn submit_with<K: Task, A: IntoArgs<K::Args>>(&self, task: K, args: A) -> Submit<'_, K, A> {
        Submit {
            client: self,
            task,
            args,
            key: None,
            pure: true,
            priority: 0,
        }
    }

    /// Submits `task` once per argument tuple; futures come back in order.
    pub fn map<K: Task, A: IntoArgs<K::Args>>(
        &self,
        task: K,
        args: impl IntoIterator<Item = A>,
    ) -> Vec<Future<K::Output>> {
        args.into_iter().map(|a| self.submit(task, a)).collect()
    }

    fn submit_spec<K: Task, A: IntoArgs<K::Args>>(
        &self,
        _task: K,
        args: A,
        key: Option<String>,
        pure: bool,
        priority: i32,
    ) -> Future<K::Output> {
        let mut writer = ArgWriter::default();
        let encoded = args
            .into_args(&mut writer)
            .and_then(|args| {
                rmp_serde::to_vec_named(&args).map_err(|e| Error::Encode {
                    what: format!("the arguments of `{}`", K::NAME),
                    message: e.to_string(),
                })
            })
            .and_then(|bytes| {
                if bytes.len() > self.inner.config.max_payload {
                    Err(Error::PayloadTooLarge {
                        what: format!("the arguments of `{}`", K::NAME),
                        size: bytes.len(),
                        limit: self.inner.config.max_payload,
                    })
                } else {
                    Ok(bytes)
                }
            });
        let short = K::NAME.rsplit("::").next().unwrap_or(K::NAME);
        let key = key.unwrap_or_else(|| match (&encoded, pure) {
            (Ok(bytes), true) => {
                format!("{short}-{}", content_hash(K::NAME, K::FINGERPRINT, bytes))
            }
            _ => format!("{short}-{}", flotilla_proto::new_id()),
        });
        let (state, fresh) = self.register(&key);
        let future = Future::from_state(state.clone(), self.inner.clone());
        match encoded {
            Err(error) => state.set_failed(error),
            Ok(bytes) if fresh => {
                let spec = TaskSpec {
                    key,
                    task: K::NAME.to_owned(),
                    fingerprint: K::FINGERPRINT,
                    args: bytes,
                    deps: writer.deps,
                    priority,
                    client: self.inner.id.clone(),
                };
                if self.inner.submissions.send(spec).is_err() {
                    state.set_failed(Error::Closed);
                }
            }
            Ok(_) => {} // this client already has the key: the new handle shares it
        }
        future
    }

    /// The shared state of `key`, and whether it is new.
    fn register(&self, key: &str) -> (Arc<FutureState>, bool) {
        let mut table = self.inner.table();
        if let Some(state) = table.get(key).and_then(Weak::upgrade) {
            return (state, false);
        }
        let state = Arc::new(FutureState::new(
            key.to_owned(),
            Arc::downgrade(&self.inner),
        ));
        table.insert(key.to_owned(), Arc::downgrade(&state));
        (state, true)
    }

    /// Waits for every future and returns their values in order, reading
    /// what did not arrive inline from Redis a batch of keys per round trip.
    /// The first failed future's error is returned (Dask's `errors="raise"`).
    pub async fn gather<T: DeserializeOwned>(&self, futures: &[Future<T>]) -> Result<Vec<T>> {
        for future in futures {
            future.wait().await;
        }
        let mut values: Vec<Option<Arc<Vec<u8>>>> = Vec::with_capacity(futures.len());
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

    /// Closes the connections. Futures of this client stop updating.
    pub async fn close(self) -> Result<()> {
        self.inner
            .connection
            .close(200, name("client closing"))
            .await?;
        Ok(())
    }
}

/// A deterministic key suffix from the task's name, signature and arguments
/// (FNV-1a, 128 bits).
fn content_hash(name: &str, fingerprint: u64, args: &[u8]) -> String {
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

/// Sends submissions in batches: whatever has accumulated while the last
/// batch was being published goes out as one message.
async fn submit_loop(
    mut rx: mpsc::UnboundedReceiver<TaskSpec>,
    publish: Channel,
    names: Names,
    max_payload: usize,
) {
    let queue = names.scheduler_queue();
    let mut pending = Vec::new();
    let mut confirms = std::collections::VecDeque::new();
    while rx.recv_many(&mut pending, 10_000).await > 0 {
        let mut start = 0;
        while start < pending.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < pending.len()
                && (end == start
                    || bytes + pending[end].args.len() <= MAX_SUBMIT_BYTES.max(max_payload))
            {
                bytes += pending[end].args.len();
                end += 1;
            }
            let message = encode(&ToScheduler::Submit {
                tasks: pending[start..end].to_vec(),
            });
            match publish
                .basic_publish(
                    name(""),
                    name(&queue),
                    BasicPublishOptions::default(),
                    &message,
                    transport::persistent(),
                )
                .await
            {
                Ok(confirm) => confirms.push_back(confirm),
                Err(error) => warn!(%error, "publishing submissions failed"),
            }
            start = end;
        }
        pending.clear();
        // Keep a bounded number of confirmations outstanding.
        while confirms.len() > 64 {
            if let Some(confirm) = confirms.pop_front() {
                if !matches!(confirm.await, Ok(c) if c.is_ack()) {
                    warn!("the broker did not confirm a batch of submissions");
                }
            }
        }
    }
}

/// Applies completion events to this client's futures.
async fn event_loop(mut consumer: lapin::Consumer, client: Weak<ClientInner>, max_payload: usize) {
    while let Some(delivery) = transport::next_delivery(&mut consumer).await {
        let Ok(delivery) = delivery else { break };
        match decode::<EventBatch>(&delivery.data, max_payload + (1 << 20)) {
            Ok(batch) => {
                let Some(client) = client.upgrade() else {
                    break;
                };
                for event in batch.events {
                    client.apply(event);
                }
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
            Err(error) => {
                warn!(%error, "undecodable event dead-lettered");
                let _ = delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::content_hash;

    #[test]
    fn content_hashes_are_stable_and_distinct() {
        let a = content_hash("m::add", 1, &[1, 2]);
        assert_eq!(a, content_hash("m::add", 1, &[1, 2]));
        assert_ne!(a, content_hash("m::add", 2, &[1, 2]));
        assert_ne!(a, content_hash("m::add", 1, &[2, 1]));
        assert_eq!(a.len(), 32);
    }
}
