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
//! even a holder that was paused past its lease cannot do harm. Tokens never
//! go backwards, also after the lock was deleted or Redis lost its data: a
//! new counter starts from Redis' clock (milliseconds × 1024), above every
//! token handed out before.
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

use super::lease::{Held, Kind, Leases};
use super::{deadline_in, waiters_lua};
use crate::client::Client;
use crate::error::Result;
use std::sync::LazyLock;
use std::time::Duration;

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
  local fence
  if redis.call('EXISTS', KEYS[2]) == 1 then
    fence = redis.call('INCR', KEYS[2])
  else
    -- A new counter (a new lock, one deleted, or Redis lost its data)
    -- starts from Redis' clock, above every token handed out before.
    local t = redis.call('TIME')
    fence = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) * 1024
    redis.call('SET', KEYS[2], string.format('%.0f', fence))
  end
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

/// The lease engine's view of a lock: one grant a handle, with a fencing
/// token; the fencing counter beside the owner key.
static LOCK: Kind = Kind {
    what: "lock",
    leases: "owner",
    companion: "fence",
    acquire: &ACQUIRE,
    renew: &RENEW,
    release: &RELEASE,
    delete: &DELETE,
};

/// A named, cluster-wide lock; see the [module docs](self).
///
/// A handle holds at most one grant at a time; handles (and so holders) are
/// cheap: make one per task, or per concurrent user within a process.
/// Dropping a handle that holds the lock releases it in the background.
///
/// # Cancel safety
///
/// Waiting for the lock is cancel safe: a future dropped while an attempt
/// was in flight gives back, in the background, whatever that attempt may
/// have taken, and forgets its registration as a waiter. A `release`
/// dropped before it completes leaves the lease to lapse on its own.
pub struct Lock {
    leases: Leases,
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock")
            .field("name", &self.name())
            .field("lease", &self.lease())
            .field("fencing_token", &self.fencing_token())
            .finish()
    }
}

/// Releases the lock when dropped (in the background; call
/// [`LockGuard::release`] to see errors). Made by [`Lock::lock`].
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a> {
    held: Held<'a>,
    fence: u64,
}

impl std::fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("lock", &self.held.leases.name())
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
        self.held.is_held()
    }

    /// Releases the lock now. Fails with [`SyncError::LeaseExpired`] (as
    /// [`Error::Sync`](crate::Error::Sync)) if the lease had run out.
    ///
    /// [`SyncError::LeaseExpired`]: super::SyncError::LeaseExpired
    pub async fn release(self) -> Result<()> {
        self.held.release().await
    }
}

impl Lock {
    /// The lock called `name` in the client's namespace, with the default
    /// lease ([`DEFAULT_LEASE`](super::DEFAULT_LEASE), 10 s).
    pub fn new(client: &Client, name: &str) -> Lock {
        Lock {
            leases: Leases::new(client, &LOCK, name, None),
        }
    }

    /// Sets the lease (at least 30 ms): how long the lock outlives a holder
    /// that stopped renewing it. Holders renew every third of it. Every
    /// handle of a lock may use its own.
    pub fn with_lease(mut self, lease: Duration) -> Lock {
        self.leases.set_lease(lease);
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.leases.name()
    }

    /// Its lease.
    pub fn lease(&self) -> Duration {
        self.leases.lease()
    }

    /// Waits for as long as it takes, then holds the lock (until
    /// [`Lock::release`] or the handle is dropped).
    pub async fn acquire(&self) -> Result<()> {
        self.leases.acquire(None, true).await.map(|_| ())
    }

    /// Waits up to `timeout` for the lock; `true` when this handle holds it
    /// (Dask's `acquire(timeout=...)`).
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        let deadline = deadline_in(timeout);
        Ok(self.leases.acquire(deadline, true).await?.is_some())
    }

    /// Takes the lock if it is free, without waiting; `true` when this
    /// handle holds it.
    pub async fn try_acquire(&self) -> Result<bool> {
        Ok(self.leases.acquire(None, false).await?.is_some())
    }

    /// Releases the lock this handle holds. Fails with
    /// [`SyncError::NotHeld`] if it holds none, and with
    /// [`SyncError::LeaseExpired`] if its lease had run out (both as
    /// [`Error::Sync`](crate::Error::Sync)).
    ///
    /// [`SyncError::NotHeld`]: super::SyncError::NotHeld
    /// [`SyncError::LeaseExpired`]: super::SyncError::LeaseExpired
    pub async fn release(&self) -> Result<()> {
        self.leases.release(None).await
    }

    /// Waits for as long as it takes, then holds the lock until the guard
    /// is dropped or released.
    pub async fn lock(&self) -> Result<LockGuard<'_>> {
        let grant = self.leases.acquire(None, true).await?;
        Ok(self.guard(grant.unwrap_or_default()))
    }

    /// Waits up to `timeout` for the lock; `None` if it stayed taken.
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<Option<LockGuard<'_>>> {
        let grant = self.leases.acquire(deadline_in(timeout), true).await?;
        Ok(grant.map(|grant| self.guard(grant)))
    }

    /// Takes the lock if it is free, without waiting.
    pub async fn try_lock(&self) -> Result<Option<LockGuard<'_>>> {
        let grant = self.leases.acquire(None, false).await?;
        Ok(grant.map(|grant| self.guard(grant)))
    }

    /// Whether anyone holds the lock.
    pub async fn locked(&self) -> Result<bool> {
        Ok(redis::cmd("EXISTS")
            .arg(self.leases.leases_key())
            .query_async(&mut self.leases.client().redis())
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
    ///
    /// [`SyncError::LeaseExpired`]: super::SyncError::LeaseExpired
    pub async fn delete(&self) -> Result<bool> {
        Ok(self.leases.delete().await? == 1)
    }

    /// Whether this handle holds the lock (as far as it knows: `false`
    /// once a renewal found the lease lost).
    pub fn is_held(&self) -> bool {
        self.leases.is_held()
    }

    /// The fencing token of the grant this handle holds: strictly greater
    /// than that of every earlier grant of this lock.
    pub fn fencing_token(&self) -> Option<u64> {
        self.leases.fence()
    }

    fn guard(&self, (id, fence): (String, u64)) -> LockGuard<'_> {
        LockGuard {
            held: Held {
                leases: &self.leases,
                id,
            },
            fence,
        }
    }
}
