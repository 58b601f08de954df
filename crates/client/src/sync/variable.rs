//! [`Variable`]: one named value shared by every client and task of the
//! cluster (Dask's `Variable`).
//!
//! `set` replaces the value and wakes everyone waiting in `get`; `get`
//! waits until the variable has been set (forever, or up to a timeout);
//! `delete` removes the value, so that later `get`s wait again.
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! async fn reader(ctx: TaskContext, name: String) -> flotilla::Result<i64> {
//!     Variable::new(&ctx.client().await?, &name).get().await
//! }
//!
//! # async fn demo() -> flotilla::Result<()> {
//! let client = Client::from_env().await?;
//! let var = Variable::new(&client, "my-var");
//! var.set(&42_i64).await?;
//! assert_eq!(client.submit(reader, ("my-var",)).await?, 42);
//! # Ok(()) }
//! ```
//!
//! Values are MessagePack; a `Variable<T>` reads what any `Variable<U>` of
//! the same name wrote, as long as the encodings agree.
//!
//! ## Futures in a variable
//!
//! A value may be a [`TaskFuture`](crate::TaskFuture), or contain futures anywhere
//! (a `Vec<TaskFuture<T>>`, a struct field...). While the variable holds the
//! value, the futures' results stay stored (and their tasks run), even after
//! every handle of the setter is gone; `set` or `delete` releases them.
//! `get` returns futures of the reader's own client: awaitable, passable to
//! `submit`, and released when dropped, like any other. The reader's hold is
//! taken before the variable's can go: a `get` racing with a `set` or a
//! `delete` gets a future whose result is still there (or reads the new
//! value).
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! fn square(x: i64) -> i64 { x * x }
//!
//! #[flotilla::task]
//! async fn read_latest(ctx: TaskContext) -> flotilla::Result<i64> {
//!     let latest: Variable<TaskFuture<i64>> = Variable::new(&ctx.client().await?, "latest");
//!     latest.get().await?.await // a future of the task's own client
//! }
//!
//! # async fn demo() -> flotilla::Result<()> {
//! let client = Client::from_env().await?;
//! let latest: Variable<TaskFuture<i64>> = Variable::new(&client, "latest");
//! latest.set(&client.submit(square, (7,))).await?; // our own handle is gone now
//! assert_eq!(client.submit(read_latest, ()).await?, 49);
//! latest.delete().await?;                          // the result is freed
//! # Ok(()) }
//! ```

use super::held::{self, header_lua};
use super::{deadline_in, get_or_wait, timed_out, waiters_lua, Keys};
use crate::client::Client;
use crate::error::Result;
use flotilla_runtime::store::variable_holder;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::time::Instant;

/// Replaces the value and wakes every waiter; returns the header of the
/// value replaced when it held futures. KEYS: value, waiters. ARGV: value,
/// wake-up prefix.
static SWAP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        header_lua!(),
        r#"
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
notify_all(KEYS[2], ARGV[2])
return header(old)
"#
    ))
});

/// Deletes the value; returns its header when it held futures. KEYS: value.
static DELETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        header_lua!(),
        r#"
local old = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
return header(old)
"#
    ))
});

/// A named, cluster-wide value; see the [module docs](self).
///
/// Cheap to clone; clones are the same variable.
pub struct Variable<T> {
    client: Client,
    name: String,
    keys: Keys,
    /// The blocking client's runtime, for the blocking futures read.
    runtime: Option<Arc<tokio::runtime::Runtime>>,
    _value: PhantomData<fn() -> T>,
}

impl<T> Clone for Variable<T> {
    fn clone(&self) -> Self {
        Variable {
            client: self.client.clone(),
            name: self.name.clone(),
            keys: self.keys.clone(),
            runtime: self.runtime.clone(),
            _value: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Variable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Variable")
            .field("name", &self.name)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> Variable<T> {
    /// The variable called `name` in the client's namespace.
    pub fn new(client: &Client, name: &str) -> Variable<T> {
        Variable {
            client: client.clone(),
            name: name.to_owned(),
            keys: Keys::new(client, "var", name),
            runtime: None,
            _value: PhantomData,
        }
    }

    pub(crate) fn with_runtime(mut self, runtime: Option<Arc<tokio::runtime::Runtime>>) -> Self {
        self.runtime = runtime;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn value_key(&self) -> String {
        self.keys.part("value")
    }

    fn what(&self) -> String {
        format!("variable `{}`", self.name)
    }

    /// Replaces the value and wakes every waiting `get`. Futures in the
    /// value are held by the variable from now on; those of the value it
    /// replaces are released.
    ///
    /// Once encoded, the value is stored by a task of its own: a `set` that
    /// is cancelled still completes (or fails) whole, and never leaves a
    /// hold behind.
    pub async fn set(&self, value: &T) -> Result<()> {
        let encoded = held::encode(&self.client, &self.what(), value)?;
        let (client, keys, name) = (self.client.clone(), self.keys.clone(), self.name.clone());
        held::detached(swap(client, keys, name, encoded)).await
    }

    /// The value, waiting for as long as it takes until the variable is set.
    pub async fn get(&self) -> Result<T> {
        // Without a deadline the wait only ends with a value or an error.
        self.wait(None)
            .await?
            .ok_or_else(|| timed_out(self.what(), Duration::MAX))
    }

    /// The value, waiting up to `timeout` until the variable is set;
    /// [`Error::Timeout`](crate::Error::Timeout) after that.
    pub async fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.wait(deadline_in(timeout))
            .await?
            .ok_or_else(|| timed_out(self.what(), timeout))
    }

    /// The value if the variable is set, at once.
    pub async fn try_get(&self) -> Result<Option<T>> {
        loop {
            let bytes: Option<Vec<u8>> = redis::cmd("GET")
                .arg(self.value_key())
                .query_async(&mut self.client.redis())
                .await?;
            let Some(bytes) = bytes else {
                return Ok(None);
            };
            if let Some(value) = self.read(&bytes).await? {
                return Ok(Some(value));
            }
            // Replaced while we took over its futures: read the new value.
        }
    }

    /// Deletes the variable from Redis: its value goes (releasing the
    /// futures it held), so that a name no longer used leaves no key
    /// behind. Waiting `get`s keep waiting (and stay registered) for the
    /// next `set`, as later ones do.
    pub async fn delete(&self) -> Result<()> {
        let (client, keys, name) = (self.client.clone(), self.keys.clone(), self.name.clone());
        held::detached(async move {
            let old: Option<Vec<u8>> = DELETE
                .key(keys.part("value"))
                .invoke_async(&mut client.redis())
                .await?;
            release(&client, &name, old).await
        })
        .await
    }

    async fn wait(&self, deadline: Option<Instant>) -> Result<Option<T>> {
        loop {
            let Some(bytes) =
                get_or_wait(&self.client, &self.keys, &self.value_key(), deadline, false).await?
            else {
                return Ok(None);
            };
            if let Some(value) = self.read(&bytes).await? {
                return Ok(Some(value));
            }
            // Replaced while we took over its futures: read the new value.
        }
    }

    async fn read(&self, bytes: &[u8]) -> Result<Option<T>> {
        held::read_held(&self.client, &self.what(), bytes, self.runtime.clone()).await
    }
}

/// Stores `encoded` as the value of variable `name`, held by a holder of its
/// own, and releases the value it replaces.
async fn swap(client: Client, keys: Keys, name: String, encoded: held::Encoded) -> Result<()> {
    let header = if encoded.holds() {
        let header = encoded.refs(variable_holder(&name, &flotilla_proto::new_id()));
        held::hold(&client, &[(&encoded, &header)]).await?;
        Some(header)
    } else {
        None
    };
    let replaced: redis::RedisResult<Option<Vec<u8>>> = SWAP
        .key(keys.part("value"))
        .key(keys.waiters())
        .arg(encoded.stored(header.as_ref()))
        .arg(keys.wake_prefix())
        .invoke_async(&mut client.redis())
        .await;
    match replaced {
        Ok(old) => release(&client, &name, old).await,
        Err(error) => {
            if let Some(header) = &header {
                let _ = held::release(&client, header).await;
            }
            Err(error.into())
        }
    }
}

/// Releases the futures of a value that left variable `name` (`old` is its
/// header, when it held any).
async fn release(client: &Client, name: &str, old: Option<Vec<u8>>) -> Result<()> {
    let Some(old) = old else {
        return Ok(());
    };
    if let (Some(header), _) = held::parse(&format!("variable `{name}`"), &old)? {
        held::release(client, &header).await?;
    }
    Ok(())
}
