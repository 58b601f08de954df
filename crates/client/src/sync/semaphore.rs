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

use super::lease::{Held, Kind, Leases};
use super::{deadline_in, waiters_lua};
use crate::client::Client;
use crate::error::Result;
use std::sync::LazyLock;
use std::time::Duration;

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

/// The lease engine's view of a semaphore: a limit, several leases a
/// handle; the recorded limit beside the leases.
static SEMAPHORE: Kind = Kind {
    what: "semaphore",
    leases: "leases",
    companion: "max",
    acquire: &ACQUIRE,
    renew: &RENEW,
    release: &RELEASE,
    delete: &DELETE,
};

/// A named, cluster-wide counting semaphore; see the [module docs](self).
///
/// A handle may hold several leases; dropping it releases them in the
/// background.
///
/// # Cancel safety
///
/// Waiting for a lease is cancel safe: a future dropped while an attempt
/// was in flight gives back, in the background, whatever that attempt may
/// have taken, and forgets its registration as a waiter. A `release`
/// dropped before it completes leaves the lease to lapse on its own.
pub struct Semaphore {
    leases: Leases,
    max_leases: u64,
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.name())
            .field("max_leases", &self.max_leases)
            .field("lease", &self.lease())
            .field("held", &self.held())
            .finish()
    }
}

/// A lease that is released when dropped (in the background; call
/// [`SemaphorePermit::release`] to see errors). Made by
/// [`Semaphore::permit`].
#[must_use = "the lease is released as soon as the permit is dropped"]
pub struct SemaphorePermit<'a> {
    held: Held<'a>,
}

impl std::fmt::Debug for SemaphorePermit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemaphorePermit")
            .field("semaphore", &self.held.leases.name())
            .finish()
    }
}

impl SemaphorePermit<'_> {
    /// Whether the lease is still held (not known to be lost).
    pub fn is_held(&self) -> bool {
        self.held.is_held()
    }

    /// Releases the lease now. Fails with [`SyncError::LeaseExpired`] (as
    /// [`Error::Sync`](crate::Error::Sync)) if it had run out.
    ///
    /// [`SyncError::LeaseExpired`]: super::SyncError::LeaseExpired
    pub async fn release(self) -> Result<()> {
        self.held.release().await
    }
}

impl Semaphore {
    /// The semaphore called `name` in the client's namespace, allowing
    /// `max_leases` holders at once (at least 1), with the default lease
    /// ([`DEFAULT_LEASE`](super::DEFAULT_LEASE), 10 s).
    pub fn new(client: &Client, name: &str, max_leases: u64) -> Semaphore {
        let max_leases = max_leases.max(1);
        Semaphore {
            leases: Leases::new(client, &SEMAPHORE, name, Some(max_leases)),
            max_leases,
        }
    }

    /// Sets the lease (at least 30 ms): how long a slot outlives a holder
    /// that stopped renewing it.
    pub fn with_lease(mut self, lease: Duration) -> Semaphore {
        self.leases.set_lease(lease);
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.leases.name()
    }

    /// How many holders it allows at once.
    pub fn max_leases(&self) -> u64 {
        self.max_leases
    }

    /// Its lease.
    pub fn lease(&self) -> Duration {
        self.leases.lease()
    }

    /// Waits for as long as it takes, then holds a lease (until
    /// [`Semaphore::release`] or the handle is dropped).
    pub async fn acquire(&self) -> Result<()> {
        self.leases.acquire(None, true).await.map(|_| ())
    }

    /// Waits up to `timeout` for a lease; `true` when this handle got one.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        let deadline = deadline_in(timeout);
        Ok(self.leases.acquire(deadline, true).await?.is_some())
    }

    /// Takes a lease if one is free, without waiting.
    pub async fn try_acquire(&self) -> Result<bool> {
        Ok(self.leases.acquire(None, false).await?.is_some())
    }

    /// Releases the oldest lease this handle holds. Fails with
    /// [`SyncError::NotHeld`] if it holds none, and with
    /// [`SyncError::LeaseExpired`] if the lease had run out (both as
    /// [`Error::Sync`](crate::Error::Sync)).
    ///
    /// [`SyncError::NotHeld`]: super::SyncError::NotHeld
    /// [`SyncError::LeaseExpired`]: super::SyncError::LeaseExpired
    pub async fn release(&self) -> Result<()> {
        self.leases.release(None).await
    }

    /// Waits for as long as it takes for a lease, released when the permit
    /// is dropped.
    pub async fn permit(&self) -> Result<SemaphorePermit<'_>> {
        let grant = self.leases.acquire(None, true).await?;
        Ok(self.permit_for(grant.unwrap_or_default()))
    }

    /// Waits up to `timeout` for a lease; `None` if none came free.
    pub async fn permit_timeout(&self, timeout: Duration) -> Result<Option<SemaphorePermit<'_>>> {
        let grant = self.leases.acquire(deadline_in(timeout), true).await?;
        Ok(grant.map(|grant| self.permit_for(grant)))
    }

    /// Takes a lease if one is free, without waiting.
    pub async fn try_permit(&self) -> Result<Option<SemaphorePermit<'_>>> {
        let grant = self.leases.acquire(None, false).await?;
        Ok(grant.map(|grant| self.permit_for(grant)))
    }

    /// How many leases this handle holds.
    pub fn held(&self) -> usize {
        self.leases.count()
    }

    /// How many leases are held now, by anyone (Dask's `get_value`).
    pub async fn in_use(&self) -> Result<usize> {
        Ok(IN_USE
            .key(self.leases.leases_key())
            .invoke_async(&mut self.leases.client().redis())
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
    ///
    /// [`SyncError::LeaseExpired`]: super::SyncError::LeaseExpired
    pub async fn delete(&self) -> Result<usize> {
        Ok(self.leases.delete().await? as usize)
    }

    fn permit_for(&self, (id, _fence): (String, u64)) -> SemaphorePermit<'_> {
        SemaphorePermit {
            held: Held {
                leases: &self.leases,
                id,
            },
        }
    }
}
