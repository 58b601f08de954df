//! [`Event`]: a named flag shared by every client and task of the cluster
//! (Dask's `Event`): `set`, `clear`, `is_set`, and `wait` until it is set.
//!
//! Every waiter wakes on `set` — also one whose event is cleared again
//! right after — and none of them polls: each sleeps on a wake-up list of
//! its own that `set` pushes to.
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! async fn waiter(ctx: TaskContext, event: String) -> flotilla::Result<String> {
//!     Event::new(&ctx.client().await?, &event).wait().await?;
//!     Ok("Event occurred".to_owned())
//! }
//!
//! #[flotilla::task]
//! async fn setter(ctx: TaskContext, event: String) -> flotilla::Result<()> {
//!     tokio::time::sleep(Duration::from_secs(5)).await;
//!     Event::new(&ctx.client().await?, &event).set().await
//! }
//!
//! # async fn demo() -> flotilla::Result<()> {
//! let client = Client::from_env().await?;
//! let wait_future = client.submit(waiter, ("go",));
//! let _set_future = client.submit(setter, ("go",));
//! println!("{}", wait_future.await?); // Event occurred
//! # Ok(()) }
//! ```

use super::{deadline_in, get_or_wait, set_and_notify, Keys};
use crate::client::Client;
use crate::error::Result;
use std::time::Duration;
use tokio::time::Instant;

/// A named, cluster-wide event; see the [module docs](self).
///
/// Cheap to clone; clones are the same event.
#[derive(Clone)]
pub struct Event {
    client: Client,
    name: String,
    keys: Keys,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event").field("name", &self.name).finish()
    }
}

impl Event {
    /// The event called `name` in the client's namespace.
    pub fn new(client: &Client, name: &str) -> Event {
        Event {
            client: client.clone(),
            name: name.to_owned(),
            keys: Keys::new(client, "event", name),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn flag(&self) -> String {
        self.keys.part("set")
    }

    /// Sets the event, waking every waiter.
    pub async fn set(&self) -> Result<()> {
        set_and_notify(&self.client, &self.keys, &self.flag(), b"1").await
    }

    /// Clears the event: later `wait`s wait for the next `set`.
    pub async fn clear(&self) -> Result<()> {
        let _: i64 = redis::cmd("DEL")
            .arg(self.flag())
            .query_async(&mut self.client.redis())
            .await?;
        Ok(())
    }

    /// Deletes the event from Redis, so that a name no longer used leaves
    /// no key behind. An event that is not set takes no key, so this is
    /// [`Event::clear`] under the name every primitive shares: waiters keep
    /// waiting (and stay registered) for the next `set`.
    pub async fn delete(&self) -> Result<()> {
        self.clear().await
    }

    /// Whether the event is set.
    pub async fn is_set(&self) -> Result<bool> {
        Ok(redis::cmd("EXISTS")
            .arg(self.flag())
            .query_async(&mut self.client.redis())
            .await?)
    }

    /// Waits for as long as it takes until the event is set.
    pub async fn wait(&self) -> Result<()> {
        self.wait_until(None).await.map(|_| ())
    }

    /// Waits up to `timeout` until the event is set; `false` if it was not.
    pub async fn wait_timeout(&self, timeout: Duration) -> Result<bool> {
        self.wait_until(deadline_in(timeout)).await
    }

    async fn wait_until(&self, deadline: Option<Instant>) -> Result<bool> {
        Ok(
            get_or_wait(&self.client, &self.keys, &self.flag(), deadline, true)
                .await?
                .is_some(),
        )
    }
}
