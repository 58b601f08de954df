//! The lease engine under [`Lock`](super::Lock) and
//! [`Semaphore`](super::Semaphore), as tokio builds its `Mutex` on its
//! semaphore: one place that acquires (waiting, with a deadline), renews,
//! releases (now, or in the background when a guard or handle is dropped),
//! notices lost leases and deletes, over a [`Kind`]'s four Redis scripts.
//!
//! A lock is a kind whose handle holds one grant at most, with a fencing
//! token; a semaphore is a kind with a limit, whose handle may hold several
//! leases. The scripts share one calling convention:
//!
//! - acquire — KEYS: leases, companion, waiters. ARGV: lease id, lease ms,
//!   [limit,] waiter id, waiter ttl. Returns `{1, fence}` (granted),
//!   `{0, ms}` (taken: a hint of how long until a lease lapses, `-1` for no
//!   expiry) or `{-1, recorded limit}` (the limit differs).
//! - renew — KEYS: leases. ARGV: lease id, lease ms. Returns 1 or 0.
//! - release — KEYS: leases, waiters. ARGV: lease id, wake-up prefix.
//!   Returns 1, or 0 when the lease was gone.
//! - delete — KEYS: leases, companion, waiters. ARGV: wake-up prefix.
//!   Returns how many leases were live.

use super::{
    slice, spawn_renewal, spawn_script, Keys, LostFlag, Retry, SyncError, Waited, Waiter,
    MAX_SLICE, MIN_LEASE, REGISTRATION_TTL,
};
use crate::client::Client;
use crate::error::Result;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

type Script = LazyLock<redis::Script>;

/// What a lease is on: a lock or a semaphore.
pub(crate) struct Kind {
    /// "lock" or "semaphore", in errors and logs.
    pub(crate) what: &'static str,
    /// The key part that holds the leases.
    pub(crate) leases: &'static str,
    /// The key part kept beside them (a lock's fencing counter, a
    /// semaphore's recorded limit).
    pub(crate) companion: &'static str,
    pub(crate) acquire: &'static Script,
    pub(crate) renew: &'static Script,
    pub(crate) release: &'static Script,
    pub(crate) delete: &'static Script,
}

/// The leases one handle holds on one lock or semaphore.
pub(crate) struct Leases {
    client: Client,
    name: String,
    keys: Keys,
    kind: &'static Kind,
    /// A semaphore's `max_leases`; `None` for a lock (one grant a handle).
    limit: Option<u64>,
    lease: Duration,
    grants: Mutex<Vec<Grant>>,
}

/// One lease held by a handle.
struct Grant {
    id: String,
    fence: u64,
    lost: LostFlag,
    renewal: JoinHandle<()>,
    runtime: tokio::runtime::Handle,
}

impl Drop for Leases {
    fn drop(&mut self) {
        let grants = self
            .grants
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for grant in grants {
            self.release_in_background(grant);
        }
    }
}

impl Leases {
    pub(crate) fn new(
        client: &Client,
        kind: &'static Kind,
        name: &str,
        limit: Option<u64>,
    ) -> Leases {
        Leases {
            client: client.clone(),
            name: name.to_owned(),
            keys: Keys::new(client, kind.what, name),
            kind,
            limit,
            lease: super::DEFAULT_LEASE,
            grants: Mutex::new(Vec::new()),
        }
    }

    /// Sets the lease, at least [`MIN_LEASE`].
    pub(crate) fn set_lease(&mut self, lease: Duration) {
        self.lease = lease.max(MIN_LEASE);
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The key that holds the leases.
    pub(crate) fn leases_key(&self) -> String {
        self.keys.part(self.kind.leases)
    }

    fn what(&self) -> String {
        format!("{} `{}`", self.kind.what, self.name)
    }

    fn state(&self) -> MutexGuard<'_, Vec<Grant>> {
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many leases this handle holds.
    pub(crate) fn count(&self) -> usize {
        self.state().len()
    }

    /// Whether the oldest lease is held (not known to be lost).
    pub(crate) fn is_held(&self) -> bool {
        self.state().first().is_some_and(|grant| !grant.lost.get())
    }

    /// The fencing token of the oldest lease.
    pub(crate) fn fence(&self) -> Option<u64> {
        self.state().first().map(|grant| grant.fence)
    }

    /// Whether lease `id` is held (not known to be lost).
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.state()
            .iter()
            .any(|grant| grant.id == id && !grant.lost.get())
    }

    /// Tries (`wait`: until the deadline) to take a lease; its id and
    /// fencing token when this handle got one.
    pub(crate) async fn acquire(
        &self,
        deadline: Option<Instant>,
        wait: bool,
    ) -> Result<Option<(String, u64)>> {
        if self.limit.is_none() && !self.state().is_empty() {
            return Err(SyncError::AlreadyHeld {
                name: self.name.clone(),
            }
            .into());
        }
        let id = flotilla_proto::new_id();
        let mut waiter = Waiter::new(&self.client, &self.keys);
        // If this future is dropped while an attempt is in flight, the
        // attempt may have taken a lease: give it back.
        let mut in_flight = InFlight {
            leases: self,
            id: &id,
            armed: true,
        };
        let mut retry = Retry::new(deadline, wait);
        loop {
            let attempt: Result<Option<u64>> = async {
                let waiter_id = if wait { waiter.id.as_str() } else { "" };
                let pause = match self.attempt(&id, waiter_id).await? {
                    Attempt::Granted(fence) => return Ok(Some(fence)),
                    Attempt::OtherLimit(existing) => {
                        return Err(SyncError::InconsistentMaxLeases {
                            name: self.name.clone(),
                            existing,
                            requested: self.limit.unwrap_or(1),
                        }
                        .into())
                    }
                    Attempt::Taken(_) if !wait => return Ok(None),
                    Attempt::Taken(pause) => pause,
                };
                waiter.registered = true;
                let Some(pause) = slice(deadline, pause) else {
                    return Ok(None);
                };
                let Some(dedicated) = retry.connection(&self.client, &waiter.wake).await? else {
                    return Ok(None);
                };
                waiter.sleep(dedicated, pause).await?;
                Ok(None)
            }
            .await;
            match retry.after(attempt).await? {
                Some(Waited::Done(fence)) => {
                    in_flight.armed = false;
                    self.install(id.clone(), fence);
                    return Ok(Some((id.clone(), fence)));
                }
                Some(Waited::GaveUp) => {
                    in_flight.armed = false;
                    return Ok(None);
                }
                // The last attempt's reply may have been lost with the
                // lease taken: `in_flight` gives it back.
                Some(Waited::Unreachable) => return Ok(None),
                None => {}
            }
        }
    }

    /// One run of the acquire script.
    async fn attempt(&self, id: &str, waiter: &str) -> Result<Attempt> {
        let mut invocation = self.kind.acquire.prepare_invoke();
        invocation
            .key(self.leases_key())
            .key(self.keys.part(self.kind.companion))
            .key(self.keys.waiters())
            .arg(id)
            .arg(self.lease.as_millis() as u64);
        if let Some(limit) = self.limit {
            invocation.arg(limit);
        }
        invocation
            .arg(waiter)
            .arg(REGISTRATION_TTL.as_millis() as u64);
        let reply: (i64, i64) = invocation.invoke_async(&mut self.client.redis()).await?;
        Ok(Attempt::from_reply(reply))
    }

    /// Records the lease and starts renewing it.
    fn install(&self, id: String, fence: u64) {
        let lost = LostFlag::default();
        let renewal = spawn_renewal(
            &self.client,
            self.kind.renew,
            self.leases_key(),
            id.clone(),
            self.lease,
            lost.clone(),
            self.what(),
        );
        let mut grants = self.state();
        if self.limit.is_none() {
            // Only a lock grant whose lease was lost can still be here
            // (Redis grants a lock once at a time); forget it.
            for previous in grants.drain(..) {
                previous.renewal.abort();
            }
        }
        grants.push(Grant {
            id,
            fence,
            lost,
            renewal,
            runtime: tokio::runtime::Handle::current(),
        });
    }

    /// Takes a lease out of the handle: `id`'s, or the oldest.
    fn take(&self, id: Option<&str>) -> Option<Grant> {
        let mut grants = self.state();
        let index = match id {
            Some(id) => grants.iter().position(|grant| grant.id == id)?,
            None if grants.is_empty() => return None,
            None => 0,
        };
        Some(grants.remove(index))
    }

    fn release_script(&self, id: &str) -> redis::ScriptInvocation<'static> {
        let mut invocation = self.kind.release.prepare_invoke();
        invocation
            .key(self.leases_key())
            .key(self.keys.waiters())
            .arg(id)
            .arg(self.keys.wake_prefix());
        invocation
    }

    /// Releases lease `id` (or the oldest) now.
    pub(crate) async fn release(&self, id: Option<&str>) -> Result<()> {
        let (what, name) = (self.kind.what, self.name.clone());
        let Some(grant) = self.take(id) else {
            return Err(SyncError::NotHeld { what, name }.into());
        };
        grant.renewal.abort();
        let released: i64 = self
            .release_script(&grant.id)
            .invoke_async(&mut self.client.redis())
            .await?;
        if released == 1 && !grant.lost.get() {
            Ok(())
        } else {
            Err(SyncError::LeaseExpired { what, name }.into())
        }
    }

    /// Releases lease `id`, if still held, in the background.
    pub(crate) fn release_soon(&self, id: &str) {
        if let Some(grant) = self.take(Some(id)) {
            self.release_in_background(grant);
        }
    }

    fn release_in_background(&self, grant: Grant) {
        grant.renewal.abort();
        spawn_script(&grant.runtime, &self.client, self.release_script(&grant.id));
    }

    /// Deletes the leases and their companion key, waking every waiter;
    /// this handle's own leases simply end. Returns how many were live.
    pub(crate) async fn delete(&self) -> Result<i64> {
        for grant in std::mem::take(&mut *self.state()) {
            grant.renewal.abort();
        }
        Ok(self
            .kind
            .delete
            .key(self.leases_key())
            .key(self.keys.part(self.kind.companion))
            .key(self.keys.waiters())
            .arg(self.keys.wake_prefix())
            .invoke_async(&mut self.client.redis())
            .await?)
    }
}

/// What one run of the acquire script came to.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// A lease, with its fencing token (a lock's; 0 for a semaphore).
    Granted(u64),
    /// Taken: sleep at most this long, until the current (a lock's) or
    /// the earliest (a semaphore's) lease would run out.
    Taken(Duration),
    /// The semaphore is in use with this other limit.
    OtherLimit(u64),
}

impl Attempt {
    fn from_reply((outcome, value): (i64, i64)) -> Attempt {
        match (outcome, value) {
            (1, fence) => Attempt::Granted(fence as u64),
            (-1, existing) => Attempt::OtherLimit(existing as u64),
            (_, ttl) if ttl > 0 => {
                Attempt::Taken(MAX_SLICE.min(Duration::from_millis(ttl as u64 + 1)))
            }
            // No expiry: not one of ours, but don't spin.
            (_, -1) => Attempt::Taken(MAX_SLICE),
            // Just freed: try again.
            _ => Attempt::Taken(Duration::from_millis(1)),
        }
    }
}

/// One lease as held by a guard or a permit: released when dropped (in the
/// background), or now with [`Held::release`].
pub(crate) struct Held<'a> {
    pub(crate) leases: &'a Leases,
    pub(crate) id: String,
}

impl Held<'_> {
    /// Whether the lease is still held (not known to be lost).
    pub(crate) fn is_held(&self) -> bool {
        self.leases.holds(&self.id)
    }

    /// Releases the lease now.
    pub(crate) async fn release(mut self) -> Result<()> {
        // Dropping `self` afterwards finds nothing left to release.
        let id = std::mem::take(&mut self.id);
        self.leases.release(Some(&id)).await
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.leases.release_soon(&self.id);
    }
}

/// Gives back a lease that an abandoned attempt may have obtained.
struct InFlight<'a> {
    leases: &'a Leases,
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
                &self.leases.client,
                self.leases.release_script(self.id),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Attempt, MAX_SLICE};
    use std::time::Duration;

    #[test]
    fn acquire_replies_become_grants_pauses_and_limit_errors() {
        // A lock grant carries its fencing token; a semaphore's carries 0.
        assert_eq!(Attempt::from_reply((1, 42)), Attempt::Granted(42));
        assert_eq!(Attempt::from_reply((1, 0)), Attempt::Granted(0));
        assert_eq!(Attempt::from_reply((-1, 4)), Attempt::OtherLimit(4));
        // Taken: sleep until just past the lease, at most a slice.
        let pause = |ms| Attempt::Taken(Duration::from_millis(ms));
        assert_eq!(Attempt::from_reply((0, 250)), pause(251));
        assert_eq!(Attempt::from_reply((0, 1)), pause(2));
        assert_eq!(
            Attempt::from_reply((0, 3_600_000)),
            Attempt::Taken(MAX_SLICE)
        );
        // A lock key without expiry (PTTL -1), or gone already (-2).
        assert_eq!(Attempt::from_reply((0, -1)), Attempt::Taken(MAX_SLICE));
        assert_eq!(Attempt::from_reply((0, -2)), pause(1));
    }
}
