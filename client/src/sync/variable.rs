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

use super::{deadline_in, decode, encode, get_or_wait, set_and_notify, timed_out, Keys};
use crate::{Client, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use std::time::Duration;
use tokio::time::Instant;

/// A named, cluster-wide value; see the [module docs](self).
///
/// Cheap to clone; clones are the same variable.
pub struct Variable<T> {
    client: Client,
    name: String,
    keys: Keys,
    _value: PhantomData<fn() -> T>,
}

impl<T> Clone for Variable<T> {
    fn clone(&self) -> Self {
        Variable {
            client: self.client.clone(),
            name: self.name.clone(),
            keys: self.keys.clone(),
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
            _value: PhantomData,
        }
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

    /// Replaces the value and wakes every waiting `get`.
    pub async fn set(&self, value: &T) -> Result<()> {
        let bytes = encode(&self.client, &self.what(), value)?;
        set_and_notify(&self.client, &self.keys, &self.value_key(), &bytes).await
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
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.value_key())
            .query_async(&mut self.client.redis())
            .await?;
        bytes.map(|b| decode(&self.what(), &b)).transpose()
    }

    /// Removes the value; `get` waits again until the next `set`.
    pub async fn delete(&self) -> Result<()> {
        let _: i64 = redis::cmd("DEL")
            .arg(self.value_key())
            .query_async(&mut self.client.redis())
            .await?;
        Ok(())
    }

    async fn wait(&self, deadline: Option<Instant>) -> Result<Option<T>> {
        match get_or_wait(&self.client, &self.keys, &self.value_key(), deadline, false).await? {
            Some(bytes) => decode(&self.what(), &bytes).map(Some),
            None => Ok(None),
        }
    }
}

pub(crate) mod blocking {
    use crate::sync::Blocker;
    use crate::Result;
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use std::time::Duration;

    /// The blocking flavour of [`crate::sync::Variable`].
    ///
    /// ```no_run
    /// let client = flotilla::blocking::Client::from_env()?;
    /// let var = flotilla::sync::blocking::Variable::new(&client, "my-var");
    /// var.set(&42_i64)?;
    /// assert_eq!(var.get()?, 42);
    /// # Ok::<(), flotilla::Error>(())
    /// ```
    pub struct Variable<T> {
        inner: crate::sync::Variable<T>,
        blocker: Blocker,
    }

    impl<T> Clone for Variable<T> {
        fn clone(&self) -> Self {
            Variable {
                inner: self.inner.clone(),
                blocker: self.blocker.clone(),
            }
        }
    }

    impl<T> std::fmt::Debug for Variable<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.inner.fmt(f)
        }
    }

    impl<T: Serialize + DeserializeOwned> Variable<T> {
        /// The variable called `name` in the client's namespace.
        pub fn new(client: &crate::blocking::Client, name: &str) -> Variable<T> {
            Variable {
                inner: crate::sync::Variable::new(client.as_async(), name),
                blocker: Blocker::from_client(client),
            }
        }

        /// Wraps an async variable; its operations block on `runtime`
        /// (e.g. `tokio::runtime::Handle::current()` in a synchronous task).
        pub fn from_async(
            inner: crate::sync::Variable<T>,
            runtime: tokio::runtime::Handle,
        ) -> Variable<T> {
            Variable {
                inner,
                blocker: Blocker::from_handle(runtime),
            }
        }

        /// The async variable underneath.
        pub fn as_async(&self) -> &crate::sync::Variable<T> {
            &self.inner
        }

        /// Its name.
        pub fn name(&self) -> &str {
            self.inner.name()
        }

        /// See [`crate::sync::Variable::set`].
        pub fn set(&self, value: &T) -> Result<()> {
            self.blocker.block_on(self.inner.set(value))
        }

        /// See [`crate::sync::Variable::get`].
        pub fn get(&self) -> Result<T> {
            self.blocker.block_on(self.inner.get())
        }

        /// See [`crate::sync::Variable::get_timeout`].
        pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
            self.blocker.block_on(self.inner.get_timeout(timeout))
        }

        /// See [`crate::sync::Variable::try_get`].
        pub fn try_get(&self) -> Result<Option<T>> {
            self.blocker.block_on(self.inner.try_get())
        }

        /// See [`crate::sync::Variable::delete`].
        pub fn delete(&self) -> Result<()> {
            self.blocker.block_on(self.inner.delete())
        }
    }
}
