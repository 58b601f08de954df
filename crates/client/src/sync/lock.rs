//! [`Lock`]: a named mutual-exclusion lock shared by every client and task
//! of the cluster (Dask's `Lock`), with a lease and fencing tokens.
//!
//! Holding the lock means holding a *lease* on it in Redis: the holder
//! renews it in the background (every third of the lease), so a live holder
//! keeps it for as long as it likes, while the lock of a holder that died
//! frees itself when the lease runs out (10 s unless set with
//! [`Lock::with_lease`]) — no deadlock, no operator needed. Each grant
//! carries a *fencing token*, strictly greater than every earlier grant's:
//! pass it along with writes to a store that can reject stale tokens, and
//! even a holder that was paused past its lease cannot do harm.
//!
//! Waiting for the lock does not poll: a waiter sleeps until the holder
//! releases it (which wakes it) or until the holder's lease would expire.
//! Locks are not reentrant, and not fair (whichever waiter asks first after
//! a release gets it).
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! async fn critical_section(ctx: TaskContext, lock: String) -> flotilla::Result<u64> {
//!     let lock = Lock::new(&ctx.client().await?, &lock);
//!     let guard = lock.lock().await?;   // only one task at a time past here
//!     let token = guard.fencing_token();
//!     // ... update the shared resource, passing `token` along ...
//!     guard.release().await?;           // or just drop the guard
//!     Ok(token)
//! }
//!
//! # async fn demo() -> flotilla::Result<()> {
//! let client = Client::from_env().await?;
//! let lock = Lock::new(&client, "resource");
//! if lock.acquire_timeout(Duration::from_secs(1)).await? {
//!     println!("holding it, token {:?}", lock.fencing_token());
//!     lock.release().await?;
//! }
//! # Ok(()) }
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

/// Takes the lock if it is free, with a new fencing token; otherwise
/// registers the waiter (if any) and returns the holder's remaining lease.
/// The lock's value is `<owner>:<fence>`. An owner that finds the lock
/// already its own (the reply to an earlier attempt was lost) keeps it.
/// KEYS: lock, fence, waiters. ARGV: owner, lease ms, waiter id, waiter ttl.
/// Returns {1, fence} or {0, pttl}.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
local current = redis.call('GET', KEYS[1])
local mine = ARGV[1] .. ':'
if not current then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], mine .. fence, 'PX', ARGV[2])
  if ARGV[3] ~= '' then redis.call('ZREM', KEYS[3], ARGV[3]) end
  return {1, fence}
end
if string.sub(current, 1, #mine) == mine then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(string.sub(current, #mine + 1))}
end
register(KEYS[3], ARGV[3], ARGV[4])
return {0, redis.call('PTTL', KEYS[1])}
"#
    ))
});

/// Extends the lease if the lock is still the owner's.
/// KEYS: lock. ARGV: owner, lease ms. Returns 1 or 0.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local current = redis.call('GET', KEYS[1])
local mine = ARGV[1] .. ':'
if current and string.sub(current, 1, #mine) == mine then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Frees the lock if it is the owner's, and wakes the waiters.
/// KEYS: lock, waiters. ARGV: owner, wake-up prefix. Returns 1 or 0.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
local current = redis.call('GET', KEYS[1])
local mine = ARGV[1] .. ':'
if current and string.sub(current, 1, #mine) == mine then
  redis.call('DEL', KEYS[1])
  notify_all(KEYS[2], ARGV[2])
  return 1
end
return 0
"#
    ))
});

/// Removes the lock and its fencing counter, and wakes the waiters.
/// KEYS: lock, fence, waiters. ARGV: wake-up prefix. Returns 1 if someone
/// held the lock, else 0.
static DELETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        waiters_lua!(),
        r#"
local held = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
notify_all(KEYS[3], ARGV[1])
return held
"#
    ))
});

/// A named, cluster-wide lock; see the [module docs](self).
///
/// A handle holds at most one grant at a time; handles (and so holders) are
/// cheap: make one per task, or per concurrent user within a process.
/// Dropping a handle that holds the lock releases it in the background.
pub struct Lock {
    client: Client,
    name: String,
    keys: Keys,
    lease: Duration,
    grant: Mutex<Option<Grant>>,
}

/// The lock as held by a handle.
struct Grant {
    owner: String,
    fence: u64,
    lost: LostFlag,
    renewal: JoinHandle<()>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock")
            .field("name", &self.name)
            .field("lease", &self.lease)
            .field("fencing_token", &self.fencing_token())
            .finish()
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let grant = self.grant.get_mut().map(Option::take).unwrap_or_default();
        if let Some(grant) = grant {
            self.release_in_background(grant);
        }
    }
}

/// Releases the lock when dropped (in the background; call
/// [`LockGuard::release`] to see errors). Made by [`Lock::lock`].
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a> {
    lock: &'a Lock,
    owner: String,
    fence: u64,
}

impl std::fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("lock", &self.lock.name)
            .field("fencing_token", &self.fence)
            .finish()
    }
}

impl LockGuard<'_> {
    /// The fencing token of this grant.
    pub fn fencing_token(&self) -> u64 {
        self.fence
    }

    /// Whether the lease is still held (not known to be lost).
    pub fn is_held(&self) -> bool {
        self.lock.holds(&self.owner)
    }

    /// Releases the lock now. Fails with [`SyncError::LeaseExpired`] (as
    /// [`Error::Sync`](crate::Error::Sync)) if the lease had run out.
    pub async fn release(mut self) -> Result<()> {
        // Dropping the guard afterwards finds nothing left to release.
        let owner = std::mem::take(&mut self.owner);
        self.lock.release_grant(Some(&owner)).await
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if let Some(grant) = self.lock.take_grant(Some(&self.owner)) {
            self.lock.release_in_background(grant);
        }
    }
}

impl Lock {
    /// The lock called `name` in the client's namespace, with the default
    /// lease ([`DEFAULT_LEASE`], 10 s).
    pub fn new(client: &Client, name: &str) -> Lock {
        Lock {
            client: client.clone(),
            name: name.to_owned(),
            keys: Keys::new(client, "lock", name),
            lease: DEFAULT_LEASE,
            grant: Mutex::new(None),
        }
    }

    /// Sets the lease (at least 30 ms): how long the lock outlives a holder
    /// that stopped renewing it. Holders renew every third of it. Every
    /// handle of a lock may use its own.
    pub fn with_lease(mut self, lease: Duration) -> Lock {
        self.lease = lease.max(MIN_LEASE);
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn what(&self) -> String {
        format!("lock `{}`", self.name)
    }

    /// Waits for as long as it takes, then holds the lock (until
    /// [`Lock::release`] or the handle is dropped).
    pub async fn acquire(&self) -> Result<()> {
        self.acquire_until(None, true).await.map(|_| ())
    }

    /// Waits up to `timeout` for the lock; `true` when this handle holds it
    /// (Dask's `acquire(timeout=...)`).
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        Ok(self
            .acquire_until(deadline_in(timeout), true)
            .await?
            .is_some())
    }

    /// Takes the lock if it is free, without waiting; `true` when this
    /// handle holds it.
    pub async fn try_acquire(&self) -> Result<bool> {
        Ok(self.acquire_until(None, false).await?.is_some())
    }

    /// Releases the lock this handle holds. Fails with
    /// [`SyncError::NotHeld`] if it holds none, and with
    /// [`SyncError::LeaseExpired`] if its lease had run out (both as
    /// [`Error::Sync`](crate::Error::Sync)).
    pub async fn release(&self) -> Result<()> {
        self.release_grant(None).await
    }

    /// Waits for as long as it takes, then holds the lock until the guard
    /// is dropped or released.
    pub async fn lock(&self) -> Result<LockGuard<'_>> {
        let owner = self.acquire_until(None, true).await?;
        Ok(self.guard(owner))
    }

    /// Waits up to `timeout` for the lock; `None` if it stayed taken.
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<Option<LockGuard<'_>>> {
        let owner = self.acquire_until(deadline_in(timeout), true).await?;
        Ok(owner.map(|owner| self.guard(Some(owner))))
    }

    /// Takes the lock if it is free, without waiting.
    pub async fn try_lock(&self) -> Result<Option<LockGuard<'_>>> {
        let owner = self.acquire_until(None, false).await?;
        Ok(owner.map(|owner| self.guard(Some(owner))))
    }

    /// Whether anyone holds the lock.
    pub async fn locked(&self) -> Result<bool> {
        Ok(redis::cmd("EXISTS")
            .arg(self.keys.part("owner"))
            .query_async(&mut self.client.redis())
            .await?)
    }

    /// Deletes the lock from Redis: the lock itself and its fencing
    /// counter, so that a name no longer used leaves no key behind.
    ///
    /// - A holder, if any, loses the lock at once: its next renewal finds
    ///   the lease gone (its `is_held` turns `false`), and its `release`
    ///   fails with [`SyncError::LeaseExpired`]. This handle's own grant,
    ///   if it holds one, simply ends.
    /// - Waiters are woken; they find the lock free and one of them takes
    ///   it (which creates it again).
    /// - Fencing tokens start again from 1: delete a lock only when nothing
    ///   still compares its tokens against earlier ones.
    ///
    /// Returns whether someone held the lock.
    pub async fn delete(&self) -> Result<bool> {
        if let Some(grant) = self.take_grant(None) {
            grant.renewal.abort();
        }
        let held: i64 = DELETE
            .key(self.keys.part("owner"))
            .key(self.keys.part("fence"))
            .key(self.keys.waiters())
            .arg(self.keys.wake_prefix())
            .invoke_async(&mut self.client.redis())
            .await?;
        Ok(held == 1)
    }

    /// Whether this handle holds the lock (as far as it knows: `false`
    /// once a renewal found the lease lost).
    pub fn is_held(&self) -> bool {
        self.state().as_ref().is_some_and(|grant| !grant.lost.get())
    }

    /// The fencing token of the grant this handle holds: strictly greater
    /// than that of every earlier grant of this lock.
    pub fn fencing_token(&self) -> Option<u64> {
        self.state().as_ref().map(|grant| grant.fence)
    }

    fn state(&self) -> MutexGuard<'_, Option<Grant>> {
        self.grant.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn holds(&self, owner: &str) -> bool {
        self.state()
            .as_ref()
            .is_some_and(|grant| grant.owner == owner && !grant.lost.get())
    }

    fn guard(&self, owner: Option<String>) -> LockGuard<'_> {
        let owner = owner.unwrap_or_default();
        let fence = self
            .state()
            .as_ref()
            .filter(|grant| grant.owner == owner)
            .map_or(0, |grant| grant.fence);
        LockGuard {
            lock: self,
            owner,
            fence,
        }
    }

    /// Takes the grant out of the handle (only `owner`'s, when given).
    fn take_grant(&self, owner: Option<&str>) -> Option<Grant> {
        let mut state = self.state();
        match (state.as_ref(), owner) {
            (Some(grant), Some(owner)) if grant.owner != owner => None,
            _ => state.take(),
        }
    }

    fn release_script(&self, owner: &str) -> redis::ScriptInvocation<'static> {
        let mut invocation = RELEASE.prepare_invoke();
        invocation
            .key(self.keys.part("owner"))
            .key(self.keys.waiters())
            .arg(owner)
            .arg(self.keys.wake_prefix());
        invocation
    }

    async fn release_grant(&self, owner: Option<&str>) -> Result<()> {
        let Some(grant) = self.take_grant(owner) else {
            return Err(SyncError::NotHeld {
                what: "lock",
                name: self.name.clone(),
            }
            .into());
        };
        grant.renewal.abort();
        let released: i64 = self
            .release_script(&grant.owner)
            .invoke_async(&mut self.client.redis())
            .await?;
        if released == 1 && !grant.lost.get() {
            Ok(())
        } else {
            Err(SyncError::LeaseExpired {
                what: "lock",
                name: self.name.clone(),
            }
            .into())
        }
    }

    fn release_in_background(&self, grant: Grant) {
        grant.renewal.abort();
        spawn_script(
            &grant.runtime,
            &self.client,
            self.release_script(&grant.owner),
        );
    }

    /// Tries (`wait`: until the deadline) to take the lock; the grant's
    /// owner id when this handle got it.
    async fn acquire_until(&self, deadline: Option<Instant>, wait: bool) -> Result<Option<String>> {
        if self.state().is_some() {
            return Err(SyncError::AlreadyHeld {
                name: self.name.clone(),
            }
            .into());
        }
        let owner = flotilla_proto::new_id();
        let mut waiter = Waiter::new(&self.client, &self.keys);
        // If this future is dropped while an attempt is in flight, the
        // attempt may have taken the lock: give it back.
        let mut in_flight = InFlight {
            lock: self,
            owner: &owner,
            armed: true,
        };
        let lease_ms = self.lease.as_millis() as u64;
        let mut connection: Option<Dedicated> = None;
        let mut backoff = Backoff::default();
        loop {
            let step: Result<Option<u64>> = async {
                let (taken, value): (i64, i64) = ACQUIRE
                    .key(self.keys.part("owner"))
                    .key(self.keys.part("fence"))
                    .key(self.keys.waiters())
                    .arg(&owner)
                    .arg(lease_ms)
                    .arg(if wait { waiter.id.as_str() } else { "" })
                    .arg(REGISTRATION_TTL.as_millis() as u64)
                    .invoke_async(&mut self.client.redis())
                    .await?;
                if taken == 1 {
                    return Ok(Some(value as u64));
                }
                if !wait {
                    return Ok(None);
                }
                waiter.registered = true;
                // Sleep at most until the holder's lease would run out.
                let cap = match value {
                    ttl if ttl > 0 => MAX_SLICE.min(Duration::from_millis(ttl as u64 + 1)),
                    -1 => MAX_SLICE, // no expiry: not one of ours, but don't spin
                    _ => Duration::from_millis(1), // just freed: try again
                };
                let Some(pause) = slice(deadline, cap) else {
                    return Ok(None);
                };
                let dedicated = match connection.as_mut() {
                    Some(dedicated) => dedicated,
                    None => match Dedicated::get(&self.client, deadline).await? {
                        Some(dedicated) => connection.insert(dedicated),
                        None => return Ok(None),
                    },
                };
                waiter.sleep(dedicated, pause).await?;
                Ok(None)
            }
            .await;
            match step {
                Ok(Some(fence)) => {
                    in_flight.armed = false;
                    self.install(owner.clone(), fence);
                    return Ok(Some(owner.clone()));
                }
                Ok(None) if !wait || expired(deadline) => {
                    in_flight.armed = false;
                    return Ok(None);
                }
                Ok(None) => backoff.reset(),
                Err(error) if transient(&error) => {
                    connection = None;
                    if !backoff.pause(deadline).await {
                        // The last attempt's reply may have been lost with
                        // the lock taken: `in_flight` gives it back.
                        return Ok(None);
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Records the grant and starts renewing its lease.
    fn install(&self, owner: String, fence: u64) {
        let lost = LostFlag::default();
        let renewal = spawn_renewal(
            &self.client,
            &RENEW,
            self.keys.part("owner"),
            owner.clone(),
            self.lease,
            lost.clone(),
            self.what(),
        );
        let previous = self.state().replace(Grant {
            owner,
            fence,
            lost,
            renewal,
            runtime: tokio::runtime::Handle::current(),
        });
        if let Some(previous) = previous {
            // Only a grant whose lease was lost can still be here (Redis
            // grants the lock once at a time); forget it.
            previous.renewal.abort();
        }
    }
}

/// Gives back a grant that an abandoned attempt may have obtained.
struct InFlight<'a> {
    lock: &'a Lock,
    owner: &'a str,
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
                &self.lock.client,
                self.lock.release_script(self.owner),
            );
        }
    }
}

pub(crate) mod blocking {
    use crate::sync::Blocker;
    use crate::Result;
    use std::time::Duration;

    /// The blocking flavour of [`crate::sync::Lock`].
    ///
    /// ```no_run
    /// let client = flotilla::blocking::Client::from_env()?;
    /// let lock = flotilla::sync::blocking::Lock::new(&client, "resource");
    /// {
    ///     let guard = lock.lock()?;
    ///     println!("fencing token {}", guard.fencing_token());
    /// } // released here
    /// # Ok::<(), flotilla::Error>(())
    /// ```
    #[derive(Debug)]
    pub struct Lock {
        inner: crate::sync::Lock,
        blocker: Blocker,
    }

    /// Releases the lock when dropped; made by [`Lock::lock`].
    #[derive(Debug)]
    #[must_use = "the lock is released as soon as the guard is dropped"]
    pub struct LockGuard<'a> {
        inner: Option<crate::sync::LockGuard<'a>>,
        blocker: &'a Blocker,
    }

    impl LockGuard<'_> {
        /// The fencing token of this grant.
        pub fn fencing_token(&self) -> u64 {
            self.inner.as_ref().map_or(0, |g| g.fencing_token())
        }

        /// Whether the lease is still held (not known to be lost).
        pub fn is_held(&self) -> bool {
            self.inner.as_ref().is_some_and(|g| g.is_held())
        }

        /// See [`crate::sync::LockGuard::release`].
        pub fn release(mut self) -> Result<()> {
            match self.inner.take() {
                Some(guard) => self.blocker.block_on(guard.release()),
                None => Ok(()),
            }
        }
    }

    impl Lock {
        /// The lock called `name` in the client's namespace (10 s lease).
        pub fn new(client: &crate::blocking::Client, name: &str) -> Lock {
            Lock {
                inner: crate::sync::Lock::new(client.as_async(), name),
                blocker: Blocker::from_client(client),
            }
        }

        /// Wraps an async lock; its operations block on `runtime`
        /// (e.g. `tokio::runtime::Handle::current()` in a synchronous task).
        pub fn from_async(inner: crate::sync::Lock, runtime: tokio::runtime::Handle) -> Lock {
            Lock {
                inner,
                blocker: Blocker::from_handle(runtime),
            }
        }

        /// See [`crate::sync::Lock::with_lease`].
        pub fn with_lease(mut self, lease: Duration) -> Lock {
            self.inner = self.inner.with_lease(lease);
            self
        }

        /// The async lock underneath.
        pub fn as_async(&self) -> &crate::sync::Lock {
            &self.inner
        }

        /// Its name.
        pub fn name(&self) -> &str {
            self.inner.name()
        }

        /// See [`crate::sync::Lock::acquire`].
        pub fn acquire(&self) -> Result<()> {
            self.blocker.block_on(self.inner.acquire())
        }

        /// See [`crate::sync::Lock::acquire_timeout`].
        pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
            self.blocker.block_on(self.inner.acquire_timeout(timeout))
        }

        /// See [`crate::sync::Lock::try_acquire`].
        pub fn try_acquire(&self) -> Result<bool> {
            self.blocker.block_on(self.inner.try_acquire())
        }

        /// See [`crate::sync::Lock::release`].
        pub fn release(&self) -> Result<()> {
            self.blocker.block_on(self.inner.release())
        }

        /// See [`crate::sync::Lock::lock`].
        pub fn lock(&self) -> Result<LockGuard<'_>> {
            let guard = self.blocker.block_on(self.inner.lock())?;
            Ok(LockGuard {
                inner: Some(guard),
                blocker: &self.blocker,
            })
        }

        /// See [`crate::sync::Lock::lock_timeout`].
        pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<LockGuard<'_>>> {
            let guard = self.blocker.block_on(self.inner.lock_timeout(timeout))?;
            Ok(guard.map(|guard| LockGuard {
                inner: Some(guard),
                blocker: &self.blocker,
            }))
        }

        /// See [`crate::sync::Lock::try_lock`].
        pub fn try_lock(&self) -> Result<Option<LockGuard<'_>>> {
            let guard = self.blocker.block_on(self.inner.try_lock())?;
            Ok(guard.map(|guard| LockGuard {
                inner: Some(guard),
                blocker: &self.blocker,
            }))
        }

        /// See [`crate::sync::Lock::locked`].
        pub fn locked(&self) -> Result<bool> {
            self.blocker.block_on(self.inner.locked())
        }

        /// See [`crate::sync::Lock::is_held`].
        pub fn is_held(&self) -> bool {
            self.inner.is_held()
        }

        /// See [`crate::sync::Lock::delete`].
        pub fn delete(&self) -> Result<bool> {
            self.blocker.block_on(self.inner.delete())
        }

        /// See [`crate::sync::Lock::fencing_token`].
        pub fn fencing_token(&self) -> Option<u64> {
            self.inner.fencing_token()
        }
    }
}
