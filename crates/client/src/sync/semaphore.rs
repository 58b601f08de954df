//! [`Semaphore`]: at most `max_leases` holders at a time, cluster-wide
//! (Dask's `Semaphore`) — to cap how many tasks use a database, an API or
//! a licence at once.
//!
//! Each acquisition is a *lease* in Redis (a sorted set of lease ids by
//! expiry time) that its holder renews in the background, every third of
//! the lease. A holder that dies stops renewing; its lease expires (10 s
//! unless set with [`Semaphore::with_lease`]) and the slot frees itself.
//! Waiters sleep until a release wakes them or until the earliest lease
//! would expire; they never poll.
//!
//! Every handle of one semaphore must agree on `max_leases`: the first
//! acquisition records it, and a handle with another maximum gets an error
//! (as in Dask).
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! async fn query(ctx: TaskContext, sql: String) -> flotilla::Result<usize> {
//!     let database = Semaphore::new(&ctx.client().await?, "database", 4);
//!     let _permit = database.permit().await?; // at most 4 tasks in here
//!     Ok(sql.len())                           // ... run the query ...
//! }
//! ```

use super::{
    deadline_in, expired, slice, spawn_renewal, spawn_script, transient, waiters_lua, Backoff,
    Dedicated, Keys, LostFlag, SyncError, Waiter, DEFAULT_LEASE, MAX_SLICE, MIN_LEASE,
    REGISTRATION_TTL,
};
use crate::{Client, Result};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Drops expired leases, then adds one if there is room; otherwise
/// registers the waiter (if any). A lease id already present (the reply to
/// an earlier attempt was lost) is kept.
/// KEYS: leases, max, waiters. ARGV: lease id, lease ms, max_leases,
/// waiter id, waiter ttl. Returns {1, 0}; {0, ms until the earliest lease
/// expires}; or {-1, the recorded max_leases} when it differs.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
local recorded = redis.call('GET', KEYS[2])
if recorded and recorded ~= ARGV[3] then return {-1, tonumber(recorded)} end
if not recorded then redis.call('SET', KEYS[2], ARGV[3]) end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1])
   or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  if ARGV[4] ~= '' then redis.call('ZREM', KEYS[3], ARGV[4]) end
  return {1, 0}
end
register(KEYS[3], ARGV[4], ARGV[5])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(tonumber(first[2]) - now, 1)}
"#
    ))
});

/// Extends a lease that still exists. KEYS: leases. ARGV: lease id, lease
/// ms. Returns 1 or 0.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"#
    ))
});

/// Ends a lease and wakes the waiters. KEYS: leases, waiters. ARGV: lease
/// id, wake-up prefix. Returns 1, or 0 if the lease was gone.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  notify_all(KEYS[2], ARGV[2])
  return 1
end
return 0
"#
    ))
});

/// Counts the live leases. KEYS: leases.
static IN_USE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())
return redis.call('ZCARD', KEYS[1])
"#
    ))
});

/// Removes the leases and the recorded maximum, and wakes the waiters.
/// KEYS: leases, max, waiters. ARGV: wake-up prefix. Returns how many
/// live leases there were.
static DELETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())
local held = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
notify_all(KEYS[3], ARGV[1])
return held
"#
    ))
});

/// A named, cluster-wide counting semaphore; see the [module docs](self).
///
/// A handle may hold several leases; dropping it releases them in the
/// background.
pub struct Semaphore {
    client: Client,
    name: String,
    keys: Keys,
    max_leases: u64,
    lease: Duration,
    leases: Mutex<Vec<Lease>>,
}

/// One lease held by a handle.
struct Lease {
    id: String,
    lost: LostFlag,
    renewal: JoinHandle<()>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.name)
            .field("max_leases", &self.max_leases)
            .field("lease", &self.lease)
            .field("held", &self.held())
            .finish()
    }
}

impl Drop for Semaphore {
    fn drop(&mut self) {
        let leases = self
            .leases
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for lease in leases {
            self.release_in_background(lease);
        }
    }
}

/// A lease that is released when dropped (in the background; call
/// [`SemaphorePermit::release`] to see errors). Made by
/// [`Semaphore::permit`].
#[must_use = "the lease is released as soon as the permit is dropped"]
pub struct SemaphorePermit<'a> {
    semaphore: &'a Semaphore,
    id: String,
}

impl std::fmt::Debug for SemaphorePermit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemaphorePermit")
            .field("semaphore", &self.semaphore.name)
            .finish()
    }
}

impl SemaphorePermit<'_> {
    /// Whether the lease is still held (not known to be lost).
    pub fn is_held(&self) -> bool {
        self.semaphore
            .state()
            .iter()
            .any(|lease| lease.id == self.id && !lease.lost.get())
    }

    /// Releases the lease now. Fails with [`SyncError::LeaseExpired`] (as
    /// [`Error::Sync`](crate::Error::Sync)) if it had run out.
    pub async fn release(mut self) -> Result<()> {
        // Dropping the permit afterwards finds nothing left to release.
        let id = std::mem::take(&mut self.id);
        self.semaphore.release_lease(Some(&id)).await
    }
}

impl Drop for SemaphorePermit<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.semaphore.take_lease(Some(&self.id)) {
            self.semaphore.release_in_background(lease);
        }
    }
}

impl Semaphore {
    /// The semaphore called `name` in the client's namespace, allowing
    /// `max_leases` holders at once (at least 1), with the default lease
    /// ([`DEFAULT_LEASE`], 10 s).
    pub fn new(client: &Client, name: &str, max_leases: u64) -> Semaphore {
        Semaphore {
            client: client.clone(),
            name: name.to_owned(),
            keys: Keys::new(client, "semaphore", name),
            max_leases: max_leases.max(1),
            lease: DEFAULT_LEASE,
            leases: Mutex::new(Vec::new()),
        }
    }

    /// Sets the lease (at least 30 ms): how long a slot outlives a holder
    /// that stopped renewing it.
    pub fn with_lease(mut self, lease: Duration) -> Semaphore {
        self.lease = lease.max(MIN_LEASE);
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many holders it allows at once.
    pub fn max_leases(&self) -> u64 {
        self.max_leases
    }

    /// Its lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Waits for as long as it takes, then holds a lease (until
    /// [`Semaphore::release`] or the handle is dropped).
    pub async fn acquire(&self) -> Result<()> {
        self.acquire_until(None, true).await.map(|_| ())
    }

    /// Waits up to `timeout` for a lease; `true` when this handle got one.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        Ok(self
            .acquire_until(deadline_in(timeout), true)
            .await?
            .is_some())
    }

    /// Takes a lease if one is free, without waiting.
    pub async fn try_acquire(&self) -> Result<bool> {
        Ok(self.acquire_until(None, false).await?.is_some())
    }

    /// Releases the oldest lease this handle holds. Fails with
    /// [`SyncError::NotHeld`] if it holds none, and with
    /// [`SyncError::LeaseExpired`] if the lease had run out (both as
    /// [`Error::Sync`](crate::Error::Sync)).
    pub async fn release(&self) -> Result<()> {
        self.release_lease(None).await
    }

    /// Waits for as long as it takes for a lease, released when the permit
    /// is dropped.
    pub async fn permit(&self) -> Result<SemaphorePermit<'_>> {
        let id = self.acquire_until(None, true).await?;
        Ok(SemaphorePermit {
            semaphore: self,
            id: id.unwrap_or_default(),
        })
    }

    /// Waits up to `timeout` for a lease; `None` if none came free.
    pub async fn permit_timeout(&self, timeout: Duration) -> Result<Option<SemaphorePermit<'_>>> {
        let id = self.acquire_until(deadline_in(timeout), true).await?;
        Ok(id.map(|id| SemaphorePermit {
            semaphore: self,
            id,
        }))
    }

    /// Takes a lease if one is free, without waiting.
    pub async fn try_permit(&self) -> Result<Option<SemaphorePermit<'_>>> {
        let id = self.acquire_until(None, false).await?;
        Ok(id.map(|id| SemaphorePermit {
            semaphore: self,
            id,
        }))
    }

    /// How many leases this handle holds.
    pub fn held(&self) -> usize {
        self.state().len()
    }

    /// How many leases are held now, by anyone (Dask's `get_value`).
    pub async fn in_use(&self) -> Result<usize> {
        Ok(IN_USE
            .key(self.keys.part("leases"))
            .invoke_async(&mut self.client.redis())
            .await?)
    }

    /// Deletes the semaphore from Redis: its leases and its recorded
    /// `max_leases`, so that a name no longer used leaves no key behind.
    ///
    /// - Every holder loses its lease at once: its next renewal finds the
    ///   lease gone (its `is_held` turns `false`), and its `release` fails
    ///   with [`SyncError::LeaseExpired`]. This handle's own leases simply
    ///   end.
    /// - Waiters are woken; they find every slot free and take them (which
    ///   creates the semaphore again, with the `max_leases` of whoever
    ///   acquires first: deleting is also how to change the maximum).
    ///
    /// Returns how many leases were held.
    pub async fn delete(&self) -> Result<usize> {
        for lease in std::mem::take(&mut *self.state()) {
            lease.renewal.abort();
        }
        Ok(DELETE
            .key(self.keys.part("leases"))
            .key(self.keys.part("max"))
            .key(self.keys.waiters())
            .arg(self.keys.wake_prefix())
            .invoke_async(&mut self.client.redis())
            .await?)
    }

    fn what(&self) -> String {
        format!("semaphore `{}`", self.name)
    }

    fn state(&self) -> MutexGuard<'_, Vec<Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a lease out of the handle: `id`'s, or the oldest.
    fn take_lease(&self, id: Option<&str>) -> Option<Lease> {
        let mut leases = self.state();
        let index = match id {
            Some(id) => leases.iter().position(|lease| lease.id == id)?,
            None if leases.is_empty() => return None,
            None => 0,
        };
        Some(leases.remove(index))
    }

    fn release_script(&self, id: &str) -> redis::ScriptInvocation<'static> {
        let mut invocation = RELEASE.prepare_invoke();
        invocation
            .key(self.keys.part("leases"))
            .key(self.keys.waiters())
            .arg(id)
            .arg(self.keys.wake_prefix());
        invocation
    }

    async fn release_lease(&self, id: Option<&str>) -> Result<()> {
        let Some(lease) = self.take_lease(id) else {
            return Err(SyncError::NotHeld {
                what: "semaphore",
                name: self.name.clone(),
            }
            .into());
        };
        lease.renewal.abort();
        let released: i64 = self
            .release_script(&lease.id)
            .invoke_async(&mut self.client.redis())
            .await?;
        if released == 1 && !lease.lost.get() {
            Ok(())
        } else {
            Err(SyncError::LeaseExpired {
                what: "semaphore",
                name: self.name.clone(),
            }
            .into())
        }
    }

    fn release_in_background(&self, lease: Lease) {
        lease.renewal.abort();
        spawn_script(&lease.runtime, &self.client, self.release_script(&lease.id));
    }

    /// Tries (`wait`: until the deadline) to get a lease; its id when this
    /// handle got one.
    async fn acquire_until(&self, deadline: Option<Instant>, wait: bool) -> Result<Option<String>> {
        let id = flotilla_proto::new_id();
        let mut waiter = Waiter::new(&self.client, &self.keys);
        // If this future is dropped while an attempt is in flight, the
        // attempt may have got a lease: give it back.
        let mut in_flight = InFlight {
            semaphore: self,
            id: &id,
            armed: true,
        };
        let lease_ms = self.lease.as_millis() as u64;
        let mut connection: Option<Dedicated> = None;
        let mut backoff = Backoff::default();
        loop {
            let step: Result<bool> = async {
                let (outcome, value): (i64, i64) = ACQUIRE
                    .key(self.keys.part("leases"))
                    .key(self.keys.part("max"))
                    .key(self.keys.waiters())
                    .arg(&id)
                    .arg(lease_ms)
                    .arg(self.max_leases)
                    .arg(if wait { waiter.id.as_str() } else { "" })
                    .arg(REGISTRATION_TTL.as_millis() as u64)
                    .invoke_async(&mut self.client.redis())
                    .await?;
                match outcome {
                    1 => return Ok(true),
                    -1 => {
                        return Err(SyncError::InconsistentMaxLeases {
                            name: self.name.clone(),
                            existing: value as u64,
                            requested: self.max_leases,
                        }
                        .into())
                    }
                    _ if !wait => return Ok(false),
                    _ => {}
                }
                waiter.registered = true;
                // Sleep at most until the earliest lease would run out.
                let cap = MAX_SLICE.min(Duration::from_millis(value.max(1) as u64 + 1));
                let Some(pause) = slice(deadline, cap) else {
                    return Ok(false);
                };
                let dedicated = match connection.as_mut() {
                    Some(dedicated) => dedicated,
                    None => match Dedicated::get(&self.client, deadline).await? {
                        Some(dedicated) => connection.insert(dedicated),
                        None => return Ok(false),
                    },
                };
                waiter.sleep(dedicated, pause).await?;
                Ok(false)
            }
            .await;
            match step {
                Ok(true) => {
                    in_flight.armed = false;
                    self.install(id.clone());
                    return Ok(Some(id.clone()));
                }
                Ok(false) if !wait || expired(deadline) => {
                    in_flight.armed = false;
                    return Ok(None);
                }
                Ok(false) => backoff.reset(),
                Err(error) if transient(&error) => {
                    connection = None;
                    if !backoff.pause(deadline).await {
                        return Ok(None);
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Records the lease and starts renewing it.
    fn install(&self, id: String) {
        let lost = LostFlag::default();
        let renewal = spawn_renewal(
            &self.client,
            &RENEW,
            self.keys.part("leases"),
            id.clone(),
            self.lease,
            lost.clone(),
            self.what(),
        );
        self.state().push(Lease {
            id,
            lost,
            renewal,
            runtime: tokio::runtime::Handle::current(),
        });
    }
}

/// Gives back a lease that an abandoned attempt may have obtained.
struct InFlight<'a> {
    semaphore: &'a Semaphore,
    id: &'a str,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            spawn_script(
                &runtime,
                &self.semaphore.client,
                self.semaphore.release_script(self.id),
            );
        }
    }
}

pub(crate) mod blocking {
    use crate::sync::Blocker;
    use crate::Result;
    use std::time::Duration;

    /// The blocking flavour of [`crate::sync::Semaphore`].
    ///
    /// ```no_run
    /// let client = flotilla::blocking::Client::from_env()?;
    /// let database = flotilla::sync::blocking::Semaphore::new(&client, "database", 4);
    /// {
    ///     let _permit = database.permit()?;
    ///     // ... at most 4 holders in here ...
    /// }
    /// # Ok::<(), flotilla::Error>(())
    /// ```
    #[derive(Debug)]
    pub struct Semaphore {
        inner: crate::sync::Semaphore,
        blocker: Blocker,
    }

    /// A lease released when dropped; made by [`Semaphore::permit`].
    #[derive(Debug)]
    #[must_use = "the lease is released as soon as the permit is dropped"]
    pub struct SemaphorePermit<'a> {
        inner: Option<crate::sync::SemaphorePermit<'a>>,
        blocker: &'a Blocker,
    }

    impl SemaphorePermit<'_> {
        /// Whether the lease is still held (not known to be lost).
        pub fn is_held(&self) -> bool {
            self.inner.as_ref().is_some_and(|p| p.is_held())
        }

        /// See [`crate::sync::SemaphorePermit::release`].
        pub fn release(mut self) -> Result<()> {
            match self.inner.take() {
                Some(permit) => self.blocker.block_on(permit.release()),
                None => Ok(()),
            }
        }
    }

    impl Semaphore {
        /// The semaphore called `name` in the client's namespace, allowing
        /// `max_leases` holders at once (10 s lease).
        pub fn new(client: &crate::blocking::Client, name: &str, max_leases: u64) -> Semaphore {
            Semaphore {
                inner: crate::sync::Semaphore::new(client.as_async(), name, max_leases),
                blocker: Blocker::from_client(client),
            }
        }

        /// Wraps an async semaphore; its operations block on `runtime`
        /// (e.g. `tokio::runtime::Handle::current()` in a synchronous task).
        pub fn from_async(
            inner: crate::sync::Semaphore,
            runtime: tokio::runtime::Handle,
        ) -> Semaphore {
            Semaphore {
                inner,
                blocker: Blocker::from_handle(runtime),
            }
        }

        /// See [`crate::sync::Semaphore::with_lease`].
        pub fn with_lease(mut self, lease: Duration) -> Semaphore {
            self.inner = self.inner.with_lease(lease);
            self
        }

        /// The async semaphore underneath.
        pub fn as_async(&self) -> &crate::sync::Semaphore {
            &self.inner
        }

        /// Its name.
        pub fn name(&self) -> &str {
            self.inner.name()
        }

        /// How many holders it allows at once.
        pub fn max_leases(&self) -> u64 {
            self.inner.max_leases()
        }

        /// See [`crate::sync::Semaphore::acquire`].
        pub fn acquire(&self) -> Result<()> {
            self.blocker.block_on(self.inner.acquire())
        }

        /// See [`crate::sync::Semaphore::acquire_timeout`].
        pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
            self.blocker.block_on(self.inner.acquire_timeout(timeout))
        }

        /// See [`crate::sync::Semaphore::try_acquire`].
        pub fn try_acquire(&self) -> Result<bool> {
            self.blocker.block_on(self.inner.try_acquire())
        }

        /// See [`crate::sync::Semaphore::release`].
        pub fn release(&self) -> Result<()> {
            self.blocker.block_on(self.inner.release())
        }

        /// See [`crate::sync::Semaphore::permit`].
        pub fn permit(&self) -> Result<SemaphorePermit<'_>> {
            let permit = self.blocker.block_on(self.inner.permit())?;
            Ok(SemaphorePermit {
                inner: Some(permit),
                blocker: &self.blocker,
            })
        }

        /// See [`crate::sync::Semaphore::permit_timeout`].
        pub fn permit_timeout(&self, timeout: Duration) -> Result<Option<SemaphorePermit<'_>>> {
            let permit = self.blocker.block_on(self.inner.permit_timeout(timeout))?;
            Ok(permit.map(|permit| SemaphorePermit {
                inner: Some(permit),
                blocker: &self.blocker,
            }))
        }

        /// See [`crate::sync::Semaphore::held`].
        pub fn held(&self) -> usize {
            self.inner.held()
        }

        /// See [`crate::sync::Semaphore::in_use`].
        pub fn in_use(&self) -> Result<usize> {
            self.blocker.block_on(self.inner.in_use())
        }

        /// See [`crate::sync::Semaphore::delete`].
        pub fn delete(&self) -> Result<usize> {
            self.blocker.block_on(self.inner.delete())
        }
    }
}
