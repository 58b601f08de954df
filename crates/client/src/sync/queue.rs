//! [`Queue`]: a named first-in first-out queue shared by every client and
//! task of the cluster (Dask's `Queue`), a Redis list.
//!
//! `put` appends; `get` takes the oldest item, waiting for one if the queue
//! is empty (forever, or up to a timeout); `get_batch` takes up to `n`
//! items at once, waiting only for the first. Each item goes to exactly one
//! getter.
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! async fn producer(ctx: TaskContext, queue: String) -> flotilla::Result<()> {
//!     let queue = Queue::new(&ctx.client().await?, &queue);
//!     for i in 0..10_i64 {
//!         queue.put(&i).await?;
//!     }
//!     Ok(())
//! }
//!
//! #[flotilla::task]
//! async fn consumer(ctx: TaskContext, queue: String) -> flotilla::Result<Vec<i64>> {
//!     let queue = Queue::new(&ctx.client().await?, &queue);
//!     let mut results = Vec::new();
//!     for _ in 0..10 {
//!         results.push(queue.get().await?);
//!     }
//!     Ok(results)
//! }
//!
//! # async fn demo() -> flotilla::Result<()> {
//! let client = Client::from_env().await?;
//! let _producer = client.submit(producer, ("numbers",)); // kept until done
//! let results = client.submit(consumer, ("numbers",)).await?;
//! assert_eq!(results, (0..10).collect::<Vec<i64>>());
//! # Ok(()) }
//! ```
//!
//! # Futures in items
//!
//! An item may be a [`TaskFuture`](crate::TaskFuture) or any serde structure
//! containing futures (a `Vec<TaskFuture<T>>`, a struct with future fields...;
//! Dask allows one future per item). The queue holds their results from
//! `put` on; `get` hands each one to its caller as a future of the caller's
//! client — its own hold is taken before the item's is dropped — and
//! `delete` releases what the queue still holds.
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! fn square(x: i64) -> i64 { x * x }
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Job {
//!     name: String,
//!     inputs: Vec<TaskFuture<i64>>,
//! }
//!
//! # async fn demo(client: Client, elsewhere: Client) -> flotilla::Result<()> {
//! let jobs: Queue<Job> = Queue::new(&client, "jobs");
//! let inputs = client.map(square, (1..=3).map(|i| (i,)));
//! jobs.put(&Job { name: "squares".into(), inputs }).await?; // held by the queue
//! // In another client, or a task:
//! let job = Queue::<Job>::new(&elsewhere, "jobs").get().await?;
//! assert_eq!(elsewhere.gather(&job.inputs).await?, vec![1, 4, 9]);
//! # Ok(()) }
//! ```
//!
//! # Cancellation
//!
//! Waiting moves the first item that arrives (`BLMOVE`) from the queue into
//! a list belonging to this handle, and takes it from there in a second,
//! immediate step. So a `get` that is cancelled or loses its connection
//! while it waits loses nothing: the item is handed out by this handle's
//! next `get`, or put back at the head of the queue when the handle is
//! dropped. The second step (taking the item, and the hold on its futures)
//! runs as a task of its own: a `get` cancelled during it has the item put
//! back at the head of the queue. (Only a process that dies between the two
//! steps takes that one item with it, as it would have if it had returned;
//! the results of its futures then stay stored until the namespace is
//! purged.)

use super::held::{self, header_lua, Encoded, Refs};
use super::{deadline_in, slice, timed_out, Keys, Retry, Waited, MAX_SLICE};
use crate::client::Client;
use crate::error::Result;
use flotilla_runtime::store::queue_holder;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// Most items sent in one `RPUSH`.
const PUT_CHUNK: usize = 1000;

/// Takes up to ARGV[1] items: first those this handle moved aside while
/// waiting, then from the queue. KEYS: taken, items.
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local max = tonumber(ARGV[1])
local out = redis.call('LPOP', KEYS[1], max) or {}
if #out < max then
  local more = redis.call('LPOP', KEYS[2], max - #out)
  if more then
    for _, item in ipairs(more) do table.insert(out, item) end
  end
end
return out
"#,
    )
});

/// Puts a handle's moved-aside items back at the head of the queue, in
/// order, and forgets the handle. KEYS: taken, items, takers. ARGV: id.
static GIVE_BACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') do n = n + 1 end
redis.call('SREM', KEYS[3], ARGV[1])
return n
"#,
    )
});

/// Deletes the queue with every item, also those moved aside by handles;
/// returns how many there were, and the headers of those that held
/// futures (looked for only if any item ever did). KEYS: items, takers,
/// held marker. ARGV: prefix of the handles' lists.
static DELETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        header_lua!(),
        r#"
local scan = redis.call('EXISTS', KEYS[3]) == 1
local headers = {}
local function take(list)
  local n = redis.call('LLEN', list)
  if scan and n > 0 then
    for _, item in ipairs(redis.call('LRANGE', list, 0, -1)) do
      local h = header(item)
      if h then table.insert(headers, h) end
    end
  end
  redis.call('DEL', list)
  return n
end
local n = take(KEYS[1])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  n = n + take(ARGV[1] .. id)
end
redis.call('DEL', KEYS[2], KEYS[3])
return {n, headers}
"#
    ))
});

/// A named, cluster-wide FIFO queue; see the [module docs](self).
///
/// Cheap to clone; clones share one handle (and its moved-aside items).
pub struct Queue<T> {
    inner: Arc<Inner>,
    /// The blocking client's runtime, for the blocking futures read.
    runtime: Option<Arc<tokio::runtime::Runtime>>,
    _item: PhantomData<fn() -> T>,
}

struct Inner {
    client: Client,
    name: String,
    keys: Keys,
    /// This handle's id among the queue's takers.
    id: String,
    /// Set (with the runtime to clean up on) once this handle has moved
    /// items aside.
    taker: OnceLock<tokio::runtime::Handle>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            inner: self.inner.clone(),
            runtime: self.runtime.clone(),
            _item: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl Inner {
    fn items(&self) -> String {
        self.keys.part("items")
    }

    fn takers(&self) -> String {
        self.keys.part("takers")
    }

    fn taken(&self) -> String {
        format!("{}{}", self.keys.part("taken:"), self.id)
    }

    /// Exists once any item held futures: `delete` then looks for them.
    fn held(&self) -> String {
        self.keys.part("held")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(runtime) = self.taker.get() else {
            return;
        };
        let mut invocation = GIVE_BACK.prepare_invoke();
        invocation
            .key(self.taken())
            .key(self.items())
            .key(self.takers())
            .arg(&self.id);
        super::spawn_script(runtime, &self.client, invocation);
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// The queue called `name` in the client's namespace.
    pub fn new(client: &Client, name: &str) -> Queue<T> {
        Queue {
            inner: Arc::new(Inner {
                client: client.clone(),
                name: name.to_owned(),
                keys: Keys::new(client, "queue", name),
                id: flotilla_proto::new_id(),
                taker: OnceLock::new(),
            }),
            runtime: None,
            _item: PhantomData,
        }
    }

    pub(crate) fn with_runtime(mut self, runtime: Option<Arc<tokio::runtime::Runtime>>) -> Self {
        self.runtime = runtime;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn what(&self) -> String {
        format!("queue `{}`", self.inner.name)
    }

    /// Appends an item. Futures in it are held by the queue until a `get`
    /// hands them to its caller (or the queue is deleted).
    pub async fn put(&self, item: &T) -> Result<()> {
        self.put_all(std::iter::once(item)).await
    }

    /// Appends items in order, many per round trip.
    ///
    /// Once a chunk of items is encoded, it is stored by a task of its own:
    /// a `put` that is cancelled never leaves a hold behind.
    pub async fn put_all<'a>(&self, items: impl IntoIterator<Item = &'a T>) -> Result<()>
    where
        T: 'a,
    {
        let what = self.what();
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut encoded: Vec<Encoded> = Vec::with_capacity(PUT_CHUNK);
            for item in items.by_ref().take(PUT_CHUNK) {
                encoded.push(held::encode(&self.inner.client, &what, item)?);
            }
            let (client, name) = (self.inner.client.clone(), self.inner.name.clone());
            let (list, marker) = (self.inner.items(), self.inner.held());
            held::detached(push(client, name, list, marker, encoded)).await?;
        }
        Ok(())
    }

    /// Takes the oldest item, waiting for as long as it takes.
    pub async fn get(&self) -> Result<T> {
        let mut items = self.take(1, None).await?;
        // Without a deadline the wait only ends with an item or an error.
        items
            .pop()
            .ok_or_else(|| timed_out(self.what(), Duration::MAX))
    }

    /// Takes the oldest item, waiting up to `timeout` for one;
    /// [`Error::Timeout`](crate::Error::Timeout) after that.
    pub async fn get_timeout(&self, timeout: Duration) -> Result<T> {
        let mut items = self.take(1, deadline_in(timeout)).await?;
        items.pop().ok_or_else(|| timed_out(self.what(), timeout))
    }

    /// Takes the oldest item if there is one, at once.
    pub async fn try_get(&self) -> Result<Option<T>> {
        Ok(self.take_now(1).await?.pop())
    }

    /// Takes up to `max` items (at least one), waiting for as long as it
    /// takes for the first; the rest are those already queued behind it.
    pub async fn get_batch(&self, max: usize) -> Result<Vec<T>> {
        let items = self.take(max.max(1), None).await?;
        if items.is_empty() {
            return Err(timed_out(self.what(), Duration::MAX));
        }
        Ok(items)
    }

    /// Like [`Queue::get_batch`], waiting up to `timeout` for the first
    /// item; [`Error::Timeout`](crate::Error::Timeout) after that.
    pub async fn get_batch_timeout(&self, max: usize, timeout: Duration) -> Result<Vec<T>> {
        let items = self.take(max.max(1), deadline_in(timeout)).await?;
        if items.is_empty() {
            return Err(timed_out(self.what(), timeout));
        }
        Ok(items)
    }

    /// How many items are queued (not counting items that handles have
    /// moved aside while their `get` was being cancelled).
    pub async fn qsize(&self) -> Result<usize> {
        Ok(redis::cmd("LLEN")
            .arg(self.inner.items())
            .query_async(&mut self.inner.client.redis())
            .await?)
    }

    /// Deletes the queue from Redis with every item in it (releasing the
    /// futures they held), also the items a `get` elsewhere was taking at
    /// that moment, so that a name no longer used leaves no key behind.
    /// Waiting `get`s keep waiting (and stay registered) for the next
    /// `put`, as later ones do. Returns how many items there were.
    pub async fn delete(&self) -> Result<usize> {
        let (client, what) = (self.inner.client.clone(), self.what());
        let (items, takers, marker) = (self.inner.items(), self.inner.takers(), self.inner.held());
        let taken_prefix = self.inner.keys.part("taken:");
        held::detached(async move {
            let (count, headers): (usize, Vec<Vec<u8>>) = DELETE
                .key(items)
                .key(takers)
                .key(marker)
                .arg(taken_prefix)
                .invoke_async(&mut client.redis())
                .await?;
            let headers: Vec<Refs> = headers
                .iter()
                .filter_map(|h| held::parse(&what, h).ok().and_then(|(refs, _)| refs))
                .collect();
            let headers: Vec<&Refs> = headers.iter().collect();
            held::release_all(&client, &headers).await?;
            Ok(count)
        })
        .await
    }

    /// Up to `max` items available now.
    ///
    /// Taking them (and their futures) runs as a task of its own: if this
    /// `get` is cancelled meanwhile, the items go back to the head of the
    /// queue rather than being lost.
    async fn take_now(&self, max: usize) -> Result<Vec<T>> {
        let client = self.inner.client.clone();
        let (taken, items) = (self.inner.taken(), self.inner.items());
        let give_back = held::GiveBack {
            items: items.clone(),
            marker: self.inner.held(),
        };
        let what = self.what();
        let (deliver, delivered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = async {
                let raw: Vec<Vec<u8>> = TAKE
                    .key(taken)
                    .key(items)
                    .arg(max)
                    .invoke_async(&mut client.redis())
                    .await?;
                held::Taken::take_over(&client, &what, raw).await
            }
            .await;
            if let Err(Ok(taken)) = deliver.send(result) {
                let count = taken.items.len();
                if let Err(error) = taken.put_back(&client, &give_back).await {
                    tracing::warn!(%error, count, "items of a cancelled queue get are lost");
                }
            }
        });
        let taken = delivered.await.map_err(|_| crate::error::Error::Closed)??;
        taken.decode(&self.inner.client, &self.what(), self.runtime.clone())
    }

    /// Up to `max` items, waiting until the deadline for the first; empty
    /// when the deadline passed.
    async fn take(&self, max: usize, deadline: Option<Instant>) -> Result<Vec<T>> {
        let mut retry = Retry::new(deadline, true);
        loop {
            let attempt: Result<Option<Vec<T>>> = async {
                let items = self.take_now(max).await?;
                if !items.is_empty() {
                    return Ok(Some(items));
                }
                let Some(wait) = slice(deadline, MAX_SLICE) else {
                    return Ok(None);
                };
                self.register_taker().await?;
                let Some(dedicated) = retry
                    .connection(&self.inner.client, &self.inner.items())
                    .await?
                else {
                    return Ok(None);
                };
                // The item moved aside is taken by the next `take_now`.
                // Inside a task, the slot is lent meanwhile, so that a
                // producer queued behind this consumer still runs.
                let _moved: Option<Vec<u8>> = flotilla_worker::seceded(
                    dedicated.blocking(
                        redis::cmd("BLMOVE")
                            .arg(self.inner.items())
                            .arg(self.inner.taken())
                            .arg("LEFT")
                            .arg("RIGHT")
                            .arg(super::seconds(wait)),
                        wait,
                    ),
                )
                .await?;
                Ok(None)
            }
            .await;
            match retry.after(attempt).await? {
                Some(Waited::Done(items)) => return Ok(items),
                // One last look: an item may have been moved aside just as
                // the wait ran out.
                Some(Waited::GaveUp) => return Ok(self.take_now(max).await.unwrap_or_default()),
                Some(Waited::Unreachable) => return Ok(Vec::new()),
                None => {}
            }
        }
    }

    /// Records this handle among the queue's takers, once, before it first
    /// moves an item aside (so that `delete` finds its list).
    async fn register_taker(&self) -> Result<()> {
        if self.inner.taker.get().is_some() {
            return Ok(());
        }
        let _: i64 = redis::cmd("SADD")
            .arg(self.inner.takers())
            .arg(&self.inner.id)
            .query_async(&mut self.inner.client.redis())
            .await?;
        let _ = self.inner.taker.set(tokio::runtime::Handle::current());
        Ok(())
    }
}

/// Appends encoded items to the list of queue `name`, each item with
/// futures held by a holder of its own.
async fn push(
    client: Client,
    name: String,
    list: String,
    marker: String,
    encoded: Vec<Encoded>,
) -> Result<()> {
    let headers: Vec<Option<Refs>> = encoded
        .iter()
        .map(|e| {
            e.holds()
                .then(|| e.refs(queue_holder(&name, &flotilla_proto::new_id())))
        })
        .collect();
    let held: Vec<(&Encoded, &Refs)> = encoded
        .iter()
        .zip(&headers)
        .filter_map(|(e, h)| h.as_ref().map(|h| (e, h)))
        .collect();
    let mut pipe = redis::pipe();
    if !held.is_empty() {
        held::hold(&client, &held).await?;
        // Before the items, so that a `delete` that sees them sees it.
        pipe.cmd("SET").arg(&marker).arg(1).ignore();
    }
    let stored: Vec<Vec<u8>> = encoded
        .iter()
        .zip(&headers)
        .map(|(e, h)| e.stored(h.as_ref()))
        .collect();
    pipe.cmd("RPUSH").arg(&list).arg(&stored).ignore();
    let pushed: redis::RedisResult<()> = pipe.query_async(&mut client.redis()).await;
    if let Err(error) = pushed {
        let headers: Vec<&Refs> = headers.iter().flatten().collect();
        let _ = held::release_all(&client, &headers).await;
        return Err(error.into());
    }
    Ok(())
}
