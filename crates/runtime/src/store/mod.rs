//! The task-life store: the one module that knows the Redis keys and
//! scripts a task's life touches — results (`r:`), holders (`h:`), specs
//! (`s:`), lost-start records (`a:`), `custody` and client `leases` — and
//! speaks of them in the domain's words: take a hold, release it, store a
//! result or an error, finalize a large value, roll back a refused store,
//! write/read/forget a spec, record/forget a lost start, renew or lapse
//! custody, renew or drop a client lease, read results.
//!
//! A result lives exactly while its holders set is non-empty: a release
//! that empties the set deletes the result in the same step, and a result
//! nobody holds is deleted as soon as it is stored.
//!
//! # Large values
//!
//! Stored bytes of [`CHUNKED_MIN`] or more go to Redis in chunks
//! ([`Store::write_chunks`], the layout is in `chunks.rs`): the chunks
//! first, a few per round trip, then a small manifest stored as the result
//! with [`Batch::store_result`] or [`Batch::scatter`], as any result.
//! [`Store::store_large`] and [`Store::scatter_large`] do both. Readers
//! need not know: [`Store::read_results`] gives back the reassembled
//! bytes, [`Store::result_tags`] and holds report [`flotilla_proto::TAG_OK`].
//! Whatever deletes a result deletes its chunks.
//!
//! # Backends
//!
//! [`Store::redis`] runs every operation on Redis with the scripts of
//! `refs.rs` and `custody.rs` (byte for byte the ones the
//! processes ran before the store existed); [`Store::memory`] runs the same
//! operations on in-process maps, for unit tests of the callers' logic. One
//! contract suite (`store/tests.rs`) runs against both, so the fake is
//! proven faithful. The backend is an enum rather than a trait object: the
//! set of backends is closed, a [`Batch`] must build the backend's own
//! pipeline as it goes (no boxing per operation), and async methods on an
//! enum need no `async_trait` indirection.
//!
//! # Round trips
//!
//! Each method of [`Store`] is one round trip unless its docs say
//! otherwise. Callers that write many things at once build a [`Batch`]
//! ([`Store::batch`]): one pipeline, one round trip, one [`Reply`] per
//! operation.
//!
//! # Example
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use flotilla_runtime::store::{Held, Reply, Store, Stored};
//! let store = Store::memory();
//! let mut batch = store.batch();
//! batch.hold("add-1", "client-a");
//! batch.store_result("add-1", b"3\x00");
//! let replies = batch.exec().await.unwrap();
//! assert_eq!(replies, [Reply::Held(Held::Missing), Reply::Stored(Stored::Kept)]);
//! let freed = store.release(&[("add-1".into(), "client-a".into())]).await.unwrap();
//! assert_eq!(freed, ["add-1"]);
//! assert_eq!(store.read_results(&["add-1".into()]).await.unwrap(), [None]);
//! # });
//! ```

mod chunks;
mod memory;
#[cfg(test)]
mod tests;

use crate::refs;
use crate::Redis;
use chunks::Manifest;
use flotilla_proto::{Names, StoredOk, TAG_OK};
use redis::{RedisResult, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use chunks::{CHUNKED_MIN, CHUNKS_PER_TRIP, CHUNK_SIZE, TAG_CHUNKED};

/// How many times a chunked write is tried when a release deleted its
/// chunks under it (see [`Store::store_large`]).
const CHUNKED_TRIES: usize = 3;

pub use crate::refs::{
    dataset_holder, queue_holder, task_holder, variable_holder, FIRE_AND_FORGET, LARGE_RESULT,
};

/// How a lost-start record outlives its task's last start (a day).
pub const START_RECORD_EXPIRY_S: u64 = 24 * 3600;

/// What a hold found under the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The hold is taken; no result is stored yet.
    Missing,
    /// The hold is taken; a result is stored, with this tag byte
    /// ([`flotilla_proto::TAG_OK`] or [`flotilla_proto::TAG_ERR`]).
    Stored(u8),
    /// No hold was taken: the witness of [`Batch::hold_if_held`] no longer
    /// held the key, or [`Batch::hold_until_done`] found a result stored.
    NotTaken,
}

/// What became of a stored result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored and kept: someone holds it.
    Kept,
    /// Stored, then deleted at once: its last holder was `fire_and_forget`.
    Dropped,
    /// Not kept: nobody held the key.
    Unwanted,
}

/// The reply to one operation of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An operation with nothing to tell (a delete, a plain write).
    Done,
    /// A hold: what it found.
    Held(Held),
    /// A release: whether it freed the result (no holder is left).
    Released {
        /// The key has no holder left; its result is gone.
        freed: bool,
    },
    /// A store of a result or an error.
    Stored(Stored),
    /// Whether a spec exists ([`Batch::spec_exists`]).
    Exists(bool),
}

/// The task-life store (see the [module docs](self)). Cheap to clone: clones
/// share the connection (or the memory).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Redis { redis: Redis, names: Names },
    Memory(Arc<Mutex<memory::Memory>>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Redis { names, .. } => f
                .debug_struct("Store")
                .field("backend", &"redis")
                .field("names", names)
                .finish(),
            Backend::Memory(_) => f.debug_struct("Store").field("backend", &"memory").finish(),
        }
    }
}

impl Store {
    /// The store of namespace `names` on Redis.
    pub fn redis(redis: Redis, names: Names) -> Store {
        Store {
            backend: Backend::Redis { redis, names },
        }
    }

    /// An empty in-memory store with the same semantics, for tests.
    pub fn memory() -> Store {
        Store {
            backend: Backend::Memory(Arc::default()),
        }
    }

    /// An in-memory store that, like a Redis over its `maxmemory`, refuses
    /// the writes that may grow it (stores, holds, spec writes: every
    /// script not flagged `allow-oom`) once results and specs take more
    /// than `max_bytes`. Deletes and releases always run.
    pub fn memory_limited(max_bytes: usize) -> Store {
        let store = Store::memory();
        if let Backend::Memory(memory) = &store.backend {
            memory::lock(memory).max_bytes = Some(max_bytes);
        }
        store
    }

    /// Publishes `bytes` on the namespace's Redis channel `channel` (one
    /// `PUBLISH`, fire and forget: nobody may listen). The in-memory store
    /// has no listeners.
    pub async fn publish(&self, channel: &str, bytes: &[u8]) -> RedisResult<()> {
        match &self.backend {
            Backend::Redis { redis, .. } => {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(bytes)
                    .query_async(&mut redis.clone())
                    .await?;
                Ok(())
            }
            Backend::Memory(_) => Ok(()),
        }
    }

    /// Loads the scripts into Redis, so that the first pipelines of
    /// `EVALSHA`s do not meet `NOSCRIPT` (processes do at start).
    pub async fn preload(&self) -> RedisResult<()> {
        match &self.backend {
            Backend::Redis { redis, .. } => refs::load_all(&mut redis.clone()).await,
            Backend::Memory(_) => Ok(()),
        }
    }

    /// An empty batch of operations, run in one round trip by
    /// [`Batch::exec`] or [`Batch::exec_each`].
    pub fn batch(&self) -> Batch {
        let pending = match &self.backend {
            Backend::Redis { .. } => Pending::Redis(redis::pipe()),
            Backend::Memory(_) => Pending::Memory(Vec::new()),
        };
        Batch {
            store: self.clone(),
            pending,
            shapes: Vec::new(),
        }
    }

    fn on_redis(&self) -> Option<(Redis, &Names)> {
        match &self.backend {
            Backend::Redis { redis, names } => Some((redis.clone(), names)),
            Backend::Memory(_) => None,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, memory::Memory> {
        match &self.backend {
            Backend::Memory(memory) => memory::lock(memory),
            Backend::Redis { .. } => unreachable!("state() is only called on the memory backend"),
        }
    }

    // ---- holds -------------------------------------------------------

    /// Drops holds `(key, holder)`; returns the keys left without holders
    /// (their results are gone).
    pub async fn release(&self, holds: &[(String, String)]) -> RedisResult<Vec<String>> {
        let mut batch = self.batch();
        for (key, holder) in holds {
            batch.release(key, holder);
        }
        let replies = batch.exec().await?;
        Ok(holds
            .iter()
            .zip(replies)
            .filter(|(_, reply)| *reply == Reply::Released { freed: true })
            .map(|((key, _), _)| key.clone())
            .collect())
    }

    /// Whether each of `keys` has a holder (an actor's key, say).
    pub async fn held(&self, keys: &[String]) -> RedisResult<Vec<bool>> {
        let Some((redis, names)) = self.on_redis() else {
            let memory = self.state();
            return Ok(keys.iter().map(|key| memory.is_held(key)).collect());
        };
        let commands: Vec<redis::Cmd> = keys
            .iter()
            .map(|key| redis::Cmd::exists(names.holders_key(key)))
            .collect();
        redis.query_each(&commands).await
    }

    /// A walk over every holders set of the namespace, page by page (see
    /// [`Holders::next_page`]); on a Redis Cluster, over every master.
    pub fn holders(&self) -> Holders<'_> {
        Holders {
            store: self,
            scan: self
                .on_redis()
                .map(|(redis, names)| redis.scan(names.holders_pattern())),
            done: false,
        }
    }

    // ---- results -----------------------------------------------------

    /// The stored results (value or error, as encoded) of `keys`. A value
    /// stored in chunks comes back whole, reassembled into one buffer: one
    /// more round trip per [`CHUNKS_PER_TRIP`] chunks; it reads as `None`
    /// when a chunk is gone (the value was released meanwhile).
    pub async fn read_results(&self, keys: &[String]) -> RedisResult<Vec<Option<Vec<u8>>>> {
        let Some((mut redis, names)) = self.on_redis() else {
            let memory = self.state();
            return Ok(keys.iter().map(|key| memory.read_result(key)).collect());
        };
        let mut results = self
            .read_strings(keys, Names::result_key, |memory| &memory.results)
            .await?;
        for (key, result) in keys.iter().zip(results.iter_mut()) {
            let Some(manifest) = result.as_deref().and_then(Manifest::decode) else {
                continue;
            };
            *result = chunks::read_redis(&mut redis, names, key, &manifest).await?;
        }
        Ok(results)
    }

    /// Writes the stored bytes `pieces` (concatenated: value, seal, tag, as
    /// [`StoredOk::pieces`] gives them, so nothing is copied first) as the
    /// chunks of `key`, [`CHUNKS_PER_TRIP`] per round trip, and returns the
    /// manifest to store as the result with [`Batch::store_result`] or
    /// [`Batch::scatter`]. Those refuse it (error code `INCOMPLETE`) when a
    /// release deleted chunks meanwhile: write them again. Chunks nobody
    /// finalizes are deleted with the key's result by whatever deletes it.
    pub async fn write_chunks(&self, key: &str, pieces: &[&[u8]]) -> RedisResult<Vec<u8>> {
        let Some((mut redis, names)) = self.on_redis() else {
            return Ok(self.state().write_chunks(key, pieces).encode());
        };
        Ok(chunks::write_redis(&mut redis, names, key, pieces)
            .await?
            .encode())
    }

    /// Hands a value a worker kept (see [`flotilla_proto::Location`]) over
    /// to Redis: writes its stored bytes `pieces` (in chunks from
    /// [`CHUNKED_MIN`] bytes on), then replaces the location `record` with
    /// them, only if `record` is still `key`'s result (a release or a new
    /// result meanwhile wins, and the chunks written are deleted). Returns
    /// whether the value was handed over. Round trips as
    /// [`Store::store_large`].
    pub async fn hand_over(&self, key: &str, record: &[u8], pieces: &[&[u8]]) -> RedisResult<bool> {
        let total: usize = pieces.iter().map(|piece| piece.len()).sum();
        again_if_incomplete(|| async {
            let (stored, count) = if total >= CHUNKED_MIN {
                let manifest = self.write_chunks(key, pieces).await?;
                let count = Manifest::decode(&manifest).map_or(0, |m| m.count);
                (manifest, count)
            } else {
                (pieces.concat(), 0)
            };
            let Some((mut redis, names)) = self.on_redis() else {
                return self.state().hand_over(key, record, &stored);
            };
            let mut pipe = redis::pipe();
            let count = count.to_string();
            refs::add_for(
                &mut pipe,
                names,
                &refs::HAND_OVER,
                key,
                &[record, &stored, count.as_bytes()],
            );
            refs::run_each(&mut redis, &pipe)
                .await?
                .pop()
                .unwrap_or(Ok(Value::Int(0)))
                .map(|value| matches!(value, Value::Int(1)))
        })
        .await
    }

    /// Stores a task's result `value` of any size as [`Batch::store_result`]
    /// does (kept only while someone holds the key): in chunks from
    /// [`CHUNKED_MIN`] bytes on (one round trip per [`CHUNKS_PER_TRIP`]
    /// chunks, then one), else as [`Batch::store_large_result`] (one).
    pub async fn store_large(&self, key: &str, value: StoredOk<'_>) -> RedisResult<Stored> {
        let pieces = value.pieces();
        if pieces.iter().map(|piece| piece.len()).sum::<usize>() < CHUNKED_MIN {
            let mut batch = self.batch();
            batch.store_large_result(key, value);
            return stored_of(batch.exec().await?);
        }
        self.chunked(key, &pieces, |batch, manifest| {
            batch.store_result(key, manifest);
        })
        .await
        .and_then(stored_of)
    }

    /// Stores scattered `pieces` (concatenated: the stored bytes) of any
    /// size under `key` and takes `holder`'s hold, as [`Batch::scatter`]
    /// does: in chunks from [`CHUNKED_MIN`] bytes on (one round trip per
    /// [`CHUNKS_PER_TRIP`] chunks, then one), else in one round trip.
    pub async fn scatter_large(
        &self,
        key: &str,
        holder: &str,
        pieces: &[&[u8]],
    ) -> RedisResult<()> {
        if pieces.iter().map(|piece| piece.len()).sum::<usize>() < CHUNKED_MIN {
            let mut batch = self.batch();
            batch.scatter(key, holder, &pieces.concat());
            return batch.exec().await.map(drop);
        }
        self.chunked(key, pieces, |batch, manifest| {
            batch.scatter(key, holder, manifest);
        })
        .await
        .map(drop)
    }

    /// Writes the chunks of `pieces`, then runs the batch `finalize` makes
    /// with the manifest; again (up to [`CHUNKED_TRIES`] times) when a
    /// release deleted chunks in between.
    async fn chunked(
        &self,
        key: &str,
        pieces: &[&[u8]],
        finalize: impl Fn(&mut Batch, &[u8]),
    ) -> RedisResult<Vec<Reply>> {
        again_if_incomplete(|| async {
            let manifest = self.write_chunks(key, pieces).await?;
            let mut batch = self.batch();
            finalize(&mut batch, &manifest);
            batch.exec().await
        })
        .await
    }

    /// The tag byte of the stored result of each of `keys` (its last byte:
    /// [`flotilla_proto::TAG_OK`] or [`flotilla_proto::TAG_ERR`]), without
    /// reading the value.
    pub async fn result_tags(&self, keys: &[String]) -> RedisResult<Vec<Option<u8>>> {
        let Some((redis, names)) = self.on_redis() else {
            let memory = self.state();
            return Ok(keys.iter().map(|key| memory.tag(key)).collect());
        };
        // A manifest's tag says the value is in chunks: a success.
        let commands: Vec<redis::Cmd> = keys
            .iter()
            .map(|key| redis::Cmd::getrange(names.result_key(key), -1, -1))
            .collect();
        let tags: Vec<Vec<u8>> = redis.query_each(&commands).await?;
        Ok(tags
            .into_iter()
            .map(|tag| tag.last().copied().map(reported_tag))
            .collect())
    }

    /// Stores errors `(key, encoded error)` the caller decided itself, each
    /// only while someone holds its key.
    pub async fn store_errors(&self, errors: &[(String, Vec<u8>)]) -> RedisResult<()> {
        let mut batch = self.batch();
        for (key, stored) in errors {
            batch.store_result(key, stored);
        }
        batch.exec().await.map(drop)
    }

    // ---- specs -------------------------------------------------------

    /// The stored specs of `keys`.
    pub async fn read_specs(&self, keys: &[String]) -> RedisResult<Vec<Option<Vec<u8>>>> {
        self.read_strings(keys, Names::spec_key, |memory| &memory.specs)
            .await
    }

    /// The string each of `keys` names (`redis_key`), in one `MGET`; on the
    /// memory backend, from the map `table` picks.
    async fn read_strings(
        &self,
        keys: &[String],
        redis_key: fn(&Names, &str) -> String,
        table: fn(&memory::Memory) -> &HashMap<String, Vec<u8>>,
    ) -> RedisResult<Vec<Option<Vec<u8>>>> {
        let Some((mut redis, names)) = self.on_redis() else {
            let memory = self.state();
            let table = table(&memory);
            return Ok(keys.iter().map(|key| table.get(key).cloned()).collect());
        };
        let redis_keys: Vec<String> = keys.iter().map(|key| redis_key(names, key)).collect();
        redis::cmd("MGET")
            .arg(redis_keys)
            .query_async(&mut redis)
            .await
    }

    /// Whether a spec is stored for each of `keys`.
    pub async fn specs_exist(&self, keys: &[String]) -> RedisResult<Vec<bool>> {
        let mut batch = self.batch();
        for key in keys {
            batch.spec_exists(key);
        }
        let replies = batch.exec().await?;
        Ok(replies
            .into_iter()
            .map(|reply| reply == Reply::Exists(true))
            .collect())
    }

    /// Forgets the specs of `keys` (tasks done, or dropped).
    pub async fn forget_specs(&self, keys: &[String]) -> RedisResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let Some((mut redis, names)) = self.on_redis() else {
            let mut memory = self.state();
            for key in keys {
                memory.specs.remove(key);
            }
            return Ok(());
        };
        let redis_keys: Vec<String> = keys.iter().map(|key| names.spec_key(key)).collect();
        redis::cmd("UNLINK")
            .arg(redis_keys)
            .query_async(&mut redis)
            .await
    }

    /// A walk over every stored spec of the namespace, page by page (see
    /// [`Specs::next_page`]); on a Redis Cluster, over every master.
    pub fn specs(&self) -> Specs<'_> {
        Specs {
            store: self,
            scan: self
                .on_redis()
                .map(|(redis, names)| redis.scan(names.spec_pattern())),
            done: false,
        }
    }

    // ---- lost starts -------------------------------------------------

    /// A redelivered task's start record: how many of its starts did not
    /// complete, and the worker of the last one.
    pub async fn start_record(&self, key: &str) -> RedisResult<(Option<u32>, Option<String>)> {
        let Some((mut redis, names)) = self.on_redis() else {
            return Ok(self.state().start_record(key));
        };
        redis::cmd("HMGET")
            .arg(names.lost_key(key))
            .arg("n")
            .arg("w")
            .query_async(&mut redis)
            .await
    }

    /// Records a start of `key` by `worker` unless `allowed` starts already
    /// failed to complete; the record expires [`START_RECORD_EXPIRY_S`]
    /// after its last start. Returns whether the start was recorded, the
    /// count before it, and the last worker.
    pub async fn record_start(
        &self,
        key: &str,
        allowed: u32,
        worker: &str,
    ) -> RedisResult<(bool, u32, String)> {
        let Some((mut redis, names)) = self.on_redis() else {
            return self.state().record_start(key, allowed, worker);
        };
        let (started, before, last): (u8, u32, String) = RECORD_START
            .key(names.lost_key(key))
            .arg(allowed)
            .arg(worker)
            .arg(START_RECORD_EXPIRY_S)
            .invoke_async(&mut redis)
            .await?;
        Ok((started == 1, before, last))
    }

    /// Seconds left before `key`'s start record expires (`None` when there
    /// is none), as Redis' `TTL` tells.
    pub async fn start_record_ttl(&self, key: &str) -> RedisResult<Option<u64>> {
        let Some((mut redis, names)) = self.on_redis() else {
            return Ok(self.state().start_record_ttl(key));
        };
        let ttl: i64 = redis::cmd("TTL")
            .arg(names.lost_key(key))
            .query_async(&mut redis)
            .await?;
        Ok(u64::try_from(ttl).ok())
    }

    // ---- custody -----------------------------------------------------

    /// Puts `keys` in custody, or renews their leases, until the store's
    /// clock plus `lease`.
    pub async fn renew_custody(&self, keys: &[String], lease: Duration) -> RedisResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let Some((mut redis, names)) = self.on_redis() else {
            return self.state().renew_custody(keys, lease);
        };
        let mut invocation = crate::custody::RENEW.key(names.custody_key());
        invocation.arg(lease.as_millis() as u64);
        for key in keys {
            invocation.arg(key);
        }
        invocation.invoke_async::<i64>(&mut redis).await.map(drop)
    }

    /// Takes (removes and returns) up to 1000 keys whose custody lapsed.
    pub async fn lapsed_custody(&self) -> RedisResult<Vec<String>> {
        let Some((mut redis, names)) = self.on_redis() else {
            return Ok(self.state().lapsed_custody());
        };
        crate::custody::LAPSED
            .key(names.custody_key())
            .invoke_async(&mut redis)
            .await
    }

    // ---- client leases -----------------------------------------------

    /// Sets client `client`'s lease to expire at `expiry_ms` (milliseconds
    /// since the epoch by the client's clock); whether the lease was absent
    /// (a first lease, or one that vanished: see the scheduler's reaper).
    pub async fn renew_lease(&self, client: &str, expiry_ms: u64) -> RedisResult<bool> {
        let Some((mut redis, names)) = self.on_redis() else {
            return self.state().renew_lease(client, expiry_ms);
        };
        let added: u32 = redis::cmd("ZADD")
            .arg(names.leases_key())
            .arg(expiry_ms)
            .arg(client)
            .query_async(&mut redis)
            .await?;
        Ok(added == 1)
    }

    /// Up to `limit` clients whose lease expired at `now_ms`.
    pub async fn lapsed_leases(&self, now_ms: u64, limit: usize) -> RedisResult<Vec<String>> {
        let Some((mut redis, names)) = self.on_redis() else {
            return Ok(self.state().lapsed_leases(now_ms, limit));
        };
        redis::cmd("ZRANGEBYSCORE")
            .arg(names.leases_key())
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut redis)
            .await
    }

    /// Whether each of `clients` has a lease.
    pub async fn have_leases(&self, clients: &[&str]) -> RedisResult<Vec<bool>> {
        let Some((mut redis, names)) = self.on_redis() else {
            let memory = self.state();
            return Ok(clients
                .iter()
                .map(|c| memory.leases.contains_key(*c))
                .collect());
        };
        let mut pipe = redis::pipe();
        for client in clients {
            pipe.cmd("ZSCORE").arg(names.leases_key()).arg(*client);
        }
        let scores: Vec<Option<f64>> = pipe.query_async(&mut redis).await?;
        Ok(scores.into_iter().map(|score| score.is_some()).collect())
    }

    /// Ends client `client`'s lease.
    pub async fn drop_lease(&self, client: &str) -> RedisResult<()> {
        let Some((mut redis, names)) = self.on_redis() else {
            self.state().leases.remove(client);
            return Ok(());
        };
        redis::cmd("ZREM")
            .arg(names.leases_key())
            .arg(client)
            .query_async(&mut redis)
            .await
    }
}

/// `KEYS`: the task's start record. `ARGV`: allowed failures, worker,
/// expiry in seconds. Records a start unless `n` already reached the
/// limit. Returns `{started (1 or 0), n before this start, last worker}`.
static RECORD_START: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
          if n >= tonumber(ARGV[1]) then
            return {0, n, redis.call('HGET', KEYS[1], 'w') or ''}
          end
          redis.call('HSET', KEYS[1], 'n', n + 1, 'w', ARGV[2])
          redis.call('EXPIRE', KEYS[1], ARGV[3])
          return {1, n, ARGV[2]}",
    )
});

/// How to read the replies of one operation of a batch.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// Commands whose replies tell nothing.
    Done(usize),
    /// `HOLD` or `HOLD_IF_HELD`.
    Hold,
    /// `HOLD_UNTIL_DONE`.
    HoldUntilDone,
    /// `RELEASE`.
    Release,
    /// `STORE` or `FINALIZE` (the last command).
    Store { commands: usize },
    /// `EXISTS`.
    Exists,
}

impl Shape {
    fn commands(self) -> usize {
        match self {
            Shape::Done(n) | Shape::Store { commands: n } => n,
            Shape::Hold | Shape::HoldUntilDone | Shape::Release | Shape::Exists => 1,
        }
    }

    fn decode(self, last: &Value) -> RedisResult<Reply> {
        let number =
            || -> RedisResult<i64> { redis::from_redis_value_ref(last).map_err(Into::into) };
        Ok(match self {
            Shape::Done(_) => Reply::Done,
            Shape::HoldUntilDone => Reply::Held(match number()? {
                1 => Held::Missing,
                _ => Held::NotTaken,
            }),
            Shape::Hold => Reply::Held(match number()? {
                -1 => Held::Missing,
                -2 => Held::NotTaken,
                tag => Held::Stored(reported_tag(u8::try_from(tag).unwrap_or(u8::MAX))),
            }),
            Shape::Release => Reply::Released {
                freed: number()? == 1,
            },
            Shape::Store { .. } => Reply::Stored(match number()? {
                1 => Stored::Kept,
                0 => Stored::Dropped,
                _ => Stored::Unwanted,
            }),
            Shape::Exists => Reply::Exists(number()? == 1),
        })
    }
}

enum Pending {
    Redis(redis::Pipeline),
    Memory(Vec<memory::Op>),
}

/// Operations on the store gathered to run in one round trip (see
/// [`Store::batch`]). Each method adds one operation; the replies come back
/// in the same order, one per operation.
pub struct Batch {
    store: Store,
    pending: Pending,
    shapes: Vec<Shape>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("operations", &self.shapes.len())
            .finish()
    }
}

impl Batch {
    /// The number of operations added so far.
    pub fn len(&self) -> usize {
        self.shapes.len()
    }

    /// Whether no operation was added.
    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty()
    }

    /// Adds one operation: `redis` adds its commands to the pipeline, `op`
    /// makes the memory backend's (called only on that backend, so that a
    /// large value is not copied for Redis).
    fn push(
        &mut self,
        shape: Shape,
        op: impl FnOnce() -> memory::Op,
        redis: impl FnOnce(&mut redis::Pipeline, &Names),
    ) -> &mut Self {
        match (&mut self.pending, &self.store.backend) {
            (Pending::Redis(pipe), Backend::Redis { names, .. }) => redis(pipe, names),
            (Pending::Memory(ops), _) => ops.push(op()),
            (Pending::Redis(_), Backend::Memory(_)) => {
                unreachable!("a batch is made by its own store")
            }
        }
        self.shapes.push(shape);
        self
    }

    /// Takes `holder`'s hold on `key`: [`Reply::Held`] with what is stored.
    pub fn hold(&mut self, key: &str, holder: &str) -> &mut Self {
        self.push(
            Shape::Hold,
            || memory::Op::Hold {
                key: key.to_owned(),
                holder: holder.to_owned(),
                witness: None,
            },
            |pipe, names| refs::add_for(pipe, names, &refs::HOLD, key, &[holder.as_bytes()]),
        )
    }

    /// Takes `holder`'s hold on `key` only while `witness` still holds it
    /// (so a stored result is certainly still there): [`Held::NotTaken`]
    /// when the witness is gone.
    pub fn hold_if_held(&mut self, key: &str, holder: &str, witness: &str) -> &mut Self {
        self.push(
            Shape::Hold,
            || memory::Op::Hold {
                key: key.to_owned(),
                holder: holder.to_owned(),
                witness: Some(witness.to_owned()),
            },
            |pipe, names| {
                let args: [&[u8]; 2] = [holder.as_bytes(), witness.as_bytes()];
                refs::add_for(pipe, names, &refs::HOLD_IF_HELD, key, &args);
            },
        )
    }

    /// Takes `holder`'s hold on `key` only while no result is stored (the
    /// hold of `fire_and_forget`, which ends when the task's result is
    /// stored): [`Held::Missing`] when taken, [`Held::NotTaken`] when a
    /// result is already there.
    pub fn hold_until_done(&mut self, key: &str, holder: &str) -> &mut Self {
        self.push(
            Shape::HoldUntilDone,
            || memory::Op::HoldUntilDone {
                key: key.to_owned(),
                holder: holder.to_owned(),
            },
            |pipe, names| {
                refs::add_for(
                    pipe,
                    names,
                    &refs::HOLD_UNTIL_DONE,
                    key,
                    &[holder.as_bytes()],
                );
            },
        )
    }

    /// Drops `holder`'s hold on `key`: [`Reply::Released`], freed when it
    /// was the last (the result is deleted with it). Runs even when Redis
    /// is over its `maxmemory` (it only frees memory).
    pub fn release(&mut self, key: &str, holder: &str) -> &mut Self {
        self.push(
            Shape::Release,
            || memory::Op::Release {
                key: key.to_owned(),
                holder: holder.to_owned(),
            },
            |pipe, names| refs::add_for(pipe, names, &refs::RELEASE, key, &[holder.as_bytes()]),
        )
    }

    /// Stores `stored` (an encoded value or error, or the manifest of
    /// chunks [`Store::write_chunks`] wrote) as `key`'s result if anyone
    /// holds the key, then ends a `fire_and_forget` hold: [`Reply::Stored`].
    /// Chunks nobody wants are deleted; a manifest whose chunks a release
    /// deleted meanwhile is refused (error code `INCOMPLETE`).
    pub fn store_result(&mut self, key: &str, stored: &[u8]) -> &mut Self {
        self.push(
            Shape::Store { commands: 1 },
            || memory::Op::Store {
                key: key.to_owned(),
                stored: stored.to_vec(),
            },
            |pipe, names| match Manifest::decode(stored) {
                Some(manifest) => {
                    let count = manifest.count.to_string();
                    let args: [&[u8]; 2] = [stored, count.as_bytes()];
                    refs::add_for(pipe, names, &refs::STORE_CHUNKED, key, &args);
                }
                None => refs::add_for(pipe, names, &refs::STORE, key, &[stored]),
            },
        )
    }

    /// Stores a large value (from [`LARGE_RESULT`] bytes on) written
    /// straight into the command, without a copy, then finalizes it as
    /// [`Batch::store_result`] does: [`Reply::Stored`]. Two commands (the
    /// value is not copied through Lua); a release racing in between
    /// deletes the result itself, so nothing leaks. The finalizing step is
    /// refused when the value took Redis over its `maxmemory`.
    pub fn store_large_result(&mut self, key: &str, value: StoredOk<'_>) -> &mut Self {
        let value = &value;
        self.push(
            Shape::Store { commands: 2 },
            || memory::Op::StoreLarge {
                key: key.to_owned(),
                stored: value.pieces().concat(),
            },
            |pipe, names| {
                let keys = [
                    names.holders_key(key),
                    names.result_key(key),
                    names.chunks_key(key),
                ];
                pipe.set(&keys[1], crate::seal::StoredOkArg(value.clone()));
                refs::add(pipe, &refs::FINALIZE, [&keys[0], &keys[1], &keys[2]], &[]);
            },
        )
    }

    /// Stores `stored` (or a manifest of chunks, as in
    /// [`Batch::store_result`]) as `key`'s result and takes `holder`'s hold
    /// in one step (scattered data and actor call results): a concurrent
    /// release by another holder can never delete it.
    pub fn scatter(&mut self, key: &str, holder: &str, stored: &[u8]) -> &mut Self {
        self.push(
            Shape::Done(1),
            || memory::Op::Scatter {
                key: key.to_owned(),
                holder: holder.to_owned(),
                stored: stored.to_vec(),
            },
            |pipe, names| match Manifest::decode(stored) {
                Some(manifest) => {
                    let count = manifest.count.to_string();
                    let args: [&[u8]; 3] = [holder.as_bytes(), stored, count.as_bytes()];
                    refs::add_for(pipe, names, &refs::SCATTER_CHUNKED, key, &args);
                }
                None => refs::add_for(
                    pipe,
                    names,
                    &refs::SCATTER,
                    key,
                    &[holder.as_bytes(), stored],
                ),
            },
        )
    }

    /// Rolls back a result Redis refused to finish storing: deletes
    /// whatever part of it was written, and the task's spec (the task is
    /// done: it is not run again). Deletes run even over `maxmemory`.
    pub fn roll_back(&mut self, key: &str) -> &mut Self {
        self.push(
            Shape::Done(2),
            || memory::Op::RollBack(key.to_owned()),
            |pipe, names| {
                pipe.del(&[names.result_key(key), names.chunks_key(key)])
                    .del(names.spec_key(key));
            },
        )
    }

    /// Writes `key`'s spec (encoded), for a restarted scheduler to take up.
    pub fn write_spec(&mut self, key: &str, spec: &[u8]) -> &mut Self {
        self.push(
            Shape::Done(1),
            || memory::Op::WriteSpec {
                key: key.to_owned(),
                spec: spec.to_vec(),
            },
            |pipe, names| {
                pipe.set(names.spec_key(key), spec);
            },
        )
    }

    /// Forgets `key`'s spec (the task is done for good, or dropped).
    pub fn forget_spec(&mut self, key: &str) -> &mut Self {
        self.push(
            Shape::Done(1),
            || memory::Op::ForgetSpec(key.to_owned()),
            |pipe, names| {
                pipe.del(names.spec_key(key));
            },
        )
    }

    /// Whether `key`'s spec is stored: [`Reply::Exists`].
    pub fn spec_exists(&mut self, key: &str) -> &mut Self {
        self.push(
            Shape::Exists,
            || memory::Op::SpecExists(key.to_owned()),
            |pipe, names| {
                pipe.exists(names.spec_key(key));
            },
        )
    }

    /// Forgets `key`'s lost-start record: it completed, its worker did not
    /// die under it.
    pub fn forget_start(&mut self, key: &str) -> &mut Self {
        self.push(
            Shape::Done(1),
            || memory::Op::ForgetStart(key.to_owned()),
            |pipe, names| {
                pipe.del(names.lost_key(key));
            },
        )
    }

    /// Takes `keys` out of custody (they completed).
    pub fn leave_custody(&mut self, keys: &[String]) -> &mut Self {
        self.push(
            Shape::Done(1),
            || memory::Op::LeaveCustody(keys.to_vec()),
            |pipe, names| {
                pipe.zrem(names.custody_key(), keys);
            },
        )
    }

    /// Runs the batch in one round trip (again, when called again: every
    /// operation is idempotent but the stores); `Err` when Redis could not be
    /// reached or refused any operation (the others ran).
    pub async fn exec(&self) -> RedisResult<Vec<Reply>> {
        let mut replies = Vec::with_capacity(self.shapes.len());
        for reply in self.exec_each().await? {
            replies.push(reply?);
        }
        Ok(replies)
    }

    /// Runs the batch in one round trip and gives each operation its own
    /// reply: one Redis refuses (over `maxmemory`, say) is an `Err` in its
    /// place while the others run. `Err` as a whole only when Redis could
    /// not be reached.
    pub async fn exec_each(&self) -> RedisResult<Vec<RedisResult<Reply>>> {
        if self.shapes.is_empty() {
            return Ok(Vec::new());
        }
        match &self.pending {
            Pending::Memory(ops) => {
                let mut memory = self.store.state();
                Ok(ops.iter().map(|op| memory.apply(op.clone())).collect())
            }
            Pending::Redis(pipe) => {
                let Backend::Redis { redis, .. } = &self.store.backend else {
                    unreachable!("a Redis pipeline belongs to a Redis store")
                };
                let replies = refs::run_each(&mut redis.clone(), pipe).await?;
                let mut replies = replies.into_iter();
                let mut out = Vec::with_capacity(self.shapes.len());
                for &shape in &self.shapes {
                    out.push(decode(shape, &mut replies));
                }
                Ok(out)
            }
        }
    }
}

/// The tag a stored result reports: a manifest's ([`TAG_CHUNKED`]) is a
/// success.
fn reported_tag(tag: u8) -> u8 {
    if tag == TAG_CHUNKED {
        TAG_OK
    } else {
        tag
    }
}

/// Whether `error` is the refusal of a manifest whose chunks were deleted
/// while they were written.
fn is_incomplete(error: &redis::RedisError) -> bool {
    error.code() == Some(refs::INCOMPLETE) || error.to_string().contains(refs::INCOMPLETE)
}

/// Runs `write` (chunks, then what finalizes them) again, up to
/// [`CHUNKED_TRIES`] times in all, while it is refused `INCOMPLETE`: a
/// release deleted chunks between the two.
async fn again_if_incomplete<T, F, Fut>(mut write: F) -> RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = RedisResult<T>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match write().await {
            Err(error) if is_incomplete(&error) && tries < CHUNKED_TRIES => continue,
            outcome => return outcome,
        }
    }
}

/// The one reply of a batch of one store.
fn stored_of(replies: Vec<Reply>) -> RedisResult<Stored> {
    match replies.as_slice() {
        [Reply::Stored(stored)] => Ok(*stored),
        other => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "unexpected reply to a store",
            format!("{other:?}"),
        ))),
    }
}

/// A walk over a namespace's holders sets ([`Store::holders`]).
pub struct Holders<'a> {
    store: &'a Store,
    /// `None` in memory: everything comes in one page.
    scan: Option<crate::redis_conn::Scan>,
    done: bool,
}

impl Holders<'_> {
    /// The next page of task keys with their holders (maybe empty); `None`
    /// when the walk is done. A key may come twice (see
    /// [`crate::redis_conn::Scan`]). Two round trips.
    pub async fn next_page(&mut self) -> RedisResult<Option<Vec<(String, Vec<String>)>>> {
        if self.done {
            return Ok(None);
        }
        let (Some(scan), Some((redis, _))) = (self.scan.as_mut(), self.store.on_redis()) else {
            self.done = true;
            return Ok(Some(self.store.state().all_holders()));
        };
        let Some(sets) = scan.next_page().await? else {
            self.done = true;
            return Ok(None);
        };
        if sets.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let commands: Vec<redis::Cmd> = sets.iter().map(redis::Cmd::smembers).collect();
        let members: Vec<Vec<String>> = redis.query_each(&commands).await?;
        Ok(Some(
            sets.iter()
                .zip(members)
                .filter_map(|(set, members)| {
                    Some((Names::key_of_holders(set)?.to_owned(), members))
                })
                .collect(),
        ))
    }
}

/// A walk over a namespace's stored specs ([`Store::specs`]).
pub struct Specs<'a> {
    store: &'a Store,
    /// `None` in memory: everything comes in one page.
    scan: Option<crate::redis_conn::Scan>,
    done: bool,
}

impl Specs<'_> {
    /// The next page of task keys with their specs (`None` when deleted
    /// meanwhile; maybe empty); `None` when the walk is done. A key may
    /// come twice (see [`crate::redis_conn::Scan`]). Two round trips.
    pub async fn next_page(&mut self) -> RedisResult<Option<Vec<(String, Option<Vec<u8>>)>>> {
        if self.done {
            return Ok(None);
        }
        let (Some(scan), Some((mut redis, _))) = (self.scan.as_mut(), self.store.on_redis()) else {
            self.done = true;
            let memory = self.store.state();
            let specs = memory
                .specs
                .iter()
                .map(|(key, spec)| (key.clone(), Some(spec.clone())))
                .collect();
            return Ok(Some(specs));
        };
        let Some(spec_keys) = scan.next_page().await? else {
            self.done = true;
            return Ok(None);
        };
        if spec_keys.is_empty() {
            return Ok(Some(Vec::new()));
        }
        // One MGET: a cluster connection splits it per slot.
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&spec_keys)
            .query_async(&mut redis)
            .await?;
        Ok(Some(
            spec_keys
                .iter()
                .zip(values)
                .filter_map(|(spec_key, value)| {
                    Some((Names::key_of_holders(spec_key)?.to_owned(), value))
                })
                .collect(),
        ))
    }
}

/// Reads one operation's replies: the first refusal among its commands, or
/// what its last command answered.
fn decode(
    shape: Shape,
    replies: &mut impl Iterator<Item = RedisResult<Value>>,
) -> RedisResult<Reply> {
    let mut first_error = None;
    let mut last = Value::Nil;
    for _ in 0..shape.commands() {
        match replies.next().unwrap_or(Ok(Value::Nil)) {
            Ok(value) => last = value,
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => shape.decode(&last),
    }
}
