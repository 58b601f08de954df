//! The state one client's handles share ([`ClientInner`]): its
//! connections, names and codec, its table of futures, and the sending end
//! of its outbox. [`crate::Client`] is the public face over it; futures
//! ([`crate::TaskFuture`]), actors and primitives hold it too.
//!
//! Completion events are applied here ([`ClientInner::apply`], fed by
//! [`crate::link`]), and results are read from Redis here
//! ([`ClientInner::fetch`]).

use crate::error::{Error, Result};
use crate::outbox::{Op, Table};
use crate::room::Room;
use crate::state::{FutureState, Owner};
use flotilla_proto::{Codec, Config, ErrorKind, Event, Names, ReplayGuard, StoredResult};
use flotilla_runtime::transport;
use flotilla_runtime::values::{Opened, Reader};
use flotilla_runtime::Redis;
use lapin::{Channel, Connection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

/// Most keys read from Redis in one `MGET`.
const FETCH_CHUNK: usize = 1024;

/// What one client's handles share (see the module documentation).
pub(crate) struct ClientInner {
    pub(crate) id: String,
    pub(crate) config: Config,
    pub(crate) names: Names,
    /// Signs what this client sends and checks what it reads.
    pub(crate) codec: Codec,
    /// Opens stored results, fetching large ones from the workers that
    /// keep them.
    pub(crate) reader: Reader,
    /// The signed event batches this client took (see `flotilla_proto::seal`).
    pub(crate) events_guard: ReplayGuard,
    /// The replay guard of the events' Redis copies (see [`crate::pubsub`]).
    pub(crate) fast_events_guard: ReplayGuard,
    pub(crate) redis: Redis,
    /// The task-life keys (results, holders, specs, the lease) on `redis`.
    pub(crate) store: flotilla_runtime::store::Store,
    /// The current RabbitMQ connection (replaced after a reconnection).
    pub(crate) connection: Mutex<Arc<Connection>>,
    /// The current publishing channel, for the outbox.
    pub(crate) channels: tokio::sync::watch::Sender<Channel>,
    /// Set by `close`: a closed connection is not reopened.
    pub(crate) closing: std::sync::atomic::AtomicBool,
    /// This client's futures by key (shared with the outbox, which checks
    /// it before sending a release).
    pub(crate) futures: Table,
    pub(crate) ops: mpsc::UnboundedSender<Op>,
    pub(crate) background: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) pool: tokio::sync::OnceCell<deadpool_redis::Pool>,
    /// On a Redis Cluster, one pool of dedicated connections per master
    /// (a blocking command must reach the master of its key's slot).
    pub(crate) node_pools: std::sync::Mutex<
        std::collections::HashMap<flotilla_runtime::redis_conn::Node, deadpool_redis::Pool>,
    >,
    /// Room for pending tasks (`FLOTILLA_MAX_PENDING`; see [`crate::room`]).
    pub(crate) room: Arc<Room>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // The outbox is left to drain the releases of the last futures and
        // then gives up the lease; the rest stops now.
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
    /// The futures of this client not yet resolved.
    fn pending(&self) -> Vec<Arc<FutureState>> {
        self.table()
            .values()
            .filter_map(Weak::upgrade)
            .filter(|state| !state.status().is_done())
            .collect()
    }

    /// Redis lost its data (see [`flotilla_runtime::incarnation`]): every
    /// future not yet resolved fails with [`Error::DataLost`], since the
    /// spec it would run from and the events it waits for are gone.
    pub(crate) fn data_lost(&self) {
        let pending = self.pending();
        if !pending.is_empty() {
            tracing::error!(
                futures = pending.len(),
                "Redis lost its data (the namespace's incarnation marker is gone): failing the futures that were pending"
            );
        }
        for state in pending {
            state.set_failed(Error::DataLost {
                key: state.key.as_str().to_owned(),
                cause: "Redis lost its data while the task was pending (its incarnation marker changed: a restart without persistence, a flush or a failover)".into(),
            });
        }
    }

    pub(crate) fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<FutureState>>> {
        self.futures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the reference updates queued so far have run in Redis
    /// (without hurrying releases still in their grace).
    pub(crate) async fn barrier(&self) -> Result<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Op::Barrier(done));
        wait.await.map_err(|_| Error::Closed)
    }

    pub(crate) fn send(&self, op: Op) {
        let _ = self.ops.send(op);
    }

    pub(crate) fn state(&self, key: &str) -> Option<Arc<FutureState>> {
        self.table().get(key).and_then(Weak::upgrade)
    }

    /// The shared state of `key` in this client, and whether it is new.
    pub(crate) fn register(self: &Arc<Self>, key: &str) -> (Arc<FutureState>, bool) {
        let mut table = self.table();
        if let Some(state) = table.get(key).and_then(Weak::upgrade) {
            return (state, false);
        }
        let owner: Weak<ClientInner> = Arc::downgrade(self);
        let state = Arc::new(FutureState::new(key.to_owned(), owner));
        table.insert(key.to_owned(), Arc::downgrade(&state));
        (state, true)
    }

    /// Reads stored results, in order, a chunk of keys per round trip.
    pub(crate) async fn fetch(&self, keys: &[&str]) -> Result<Vec<Result<bytes::Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(FETCH_CHUNK) {
            let chunk_keys: Vec<String> = chunk.iter().map(|k| (*k).to_owned()).collect();
            // A restarting Redis is waited for rather than failing the futures.
            let values: Vec<Option<Vec<u8>>> =
                transport::retry_while_unreachable("reading results", || {
                    self.store.read_results(&chunk_keys)
                })
                .await?;
            let opened = self.reader.open_all(&chunk_keys, values).await;
            for (key, opened) in chunk.iter().zip(opened) {
                out.push(read_opened(key, opened));
            }
        }
        Ok(out)
    }

    pub(crate) fn apply(&self, event: Event) {
        let Some(state) = self.state(event.key()) else {
            return;
        };
        match event {
            Event::Finished { inline, .. } => state.set_finished(inline),
            Event::Erred { retrying: true, .. } => {}
            Event::Erred { key, error, .. } => {
                let error = match error.kind() {
                    ErrorKind::Cancelled if error.key() == key => Error::Cancelled(key),
                    ErrorKind::MissingDependency
                        if error.key() == key && error.type_name() == "flotilla::Lost" =>
                    {
                        Error::Lost(key)
                    }
                    ErrorKind::MissingDependency
                        if error.key() == key && error.type_name() == flotilla_proto::DATA_LOST =>
                    {
                        Error::DataLost {
                            key,
                            cause: error.message().to_owned(),
                        }
                    }
                    _ => Error::Task(error),
                };
                state.set_failed(error);
            }
            Event::Started { .. } => state.set_running(),
            _ => {}
        }
    }

    /// After a reconnection, or when a scheduler took over: settles every
    /// pending future whose result is already in Redis (its event may have
    /// been lost with the old connection), and asks the scheduler to tell
    /// this client about the rest, whoever submitted them (one it knows
    /// nothing of and finds no result for ends `Lost`).
    pub(crate) async fn resync(&self) {
        let pending = self.pending();
        if pending.is_empty() {
            return;
        }
        let mut waiting = Vec::new();
        for chunk in pending.chunks(FETCH_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|state| state.key.clone()).collect();
            let values: Vec<Option<Vec<u8>>> = match self.store.read_results(&keys).await {
                Ok(values) => values,
                Err(error) => {
                    warn!(%error, "re-reading results after a reconnection failed");
                    vec![None; keys.len()]
                }
            };
            for (state, value) in chunk.iter().zip(values) {
                match value.map(|value| self.codec.open_result(&state.key, value)) {
                    Some(Ok(StoredResult::Ok(_) | StoredResult::Kept(_))) => {
                        state.set_finished(None)
                    }
                    Some(Ok(StoredResult::Err(error))) => self.apply(Event::Erred {
                        key: state.key.as_str().to_owned(),
                        error,
                        retrying: false,
                    }),
                    _ => waiting.push(state.key.as_str().to_owned()),
                }
            }
        }
        if !waiting.is_empty() {
            self.send(Op::Watch(waiting));
        }
    }
}

impl Owner for ClientInner {
    /// Called when the client's last handle of `key` is gone: releases the
    /// client's reference. The dead entry stays in the table until the
    /// outbox sends the release (after its grace): asking for the key again
    /// meanwhile revives it, and the release is dropped.
    fn forget(&self, key: &str) {
        let table = self.table();
        if table.get(key).is_some_and(|weak| weak.strong_count() == 0) {
            let _ = self.ops.send(Op::Release(key.to_owned()));
        }
    }
}

/// A stored result, opened: the value bytes, or its error.
fn read_opened(key: &str, opened: Opened) -> Result<bytes::Bytes> {
    match opened {
        Opened::Ok(bytes) => Ok(bytes),
        Opened::Err(error) => Err(Error::Task(error)),
        Opened::Refused(message) => Err(Error::Decode {
            key: key.to_owned(),
            type_name: "stored result",
            message,
        }),
        Opened::Missing => Err(Error::Lost(key.to_owned())),
        Opened::Lost { location, cause } => Err(Error::ValueLost {
            key: key.to_owned(),
            worker: location.worker,
            addr: location.addr,
            cause,
        }),
    }
}
