//! One active scheduler per namespace: a leader lease in Redis with a
//! fencing epoch.
//!
//! `<ns>:leader` holds `<scheduler id>|<epoch>` with a time to live of
//! [`LEASE`]. The scheduler that sets it is *active*: it consumes the
//! scheduler queues and publishes bundles stamped with its epoch. It renews
//! the lease every [`RENEW_EVERY`]; any other scheduler started on the
//! namespace is a *standby*: it connects, declares the topology, then polls
//! the lease every [`POLL`] and takes over once it lapses (the active one
//! died, was stopped, or lost Redis for longer than the lease).
//!
//! **Fencing.** Each acquisition gets a new epoch, `max(last + 1, now in
//! ms)` read from Redis' clock, so epochs grow even after Redis lost its
//! data. Workers remember the highest epoch they have seen and drop bundles
//! of a lower one (a deposed scheduler that was paused and woke up). An
//! active scheduler checks, before each flush, that its lease is still
//! valid by its own monotonic clock (the last successful renewal plus
//! [`LEASE`] minus [`MARGIN`]), and steps down when it is not, before the
//! lease can have lapsed in Redis: so two schedulers never both act on the
//! namespace, even across a network partition from Redis.

use flotilla_proto::Names;
use flotilla_runtime::Redis;
use redis::Script;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How long a lease lives in Redis without renewal.
pub const LEASE: Duration = Duration::from_millis(2_500);
/// How often the active scheduler renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_millis(500);
/// How often a standby looks at the lease.
pub const POLL: Duration = Duration::from_millis(250);
/// How long before the lease would lapse in Redis the active scheduler
/// stops acting on its own (its clock and Redis' may drift a little).
pub const MARGIN: Duration = Duration::from_millis(750);

/// Takes or renews the lease: `{epoch, holder}`, with `epoch` 0 when
/// another scheduler holds it. `ARGV[3]` is the epoch the caller held (0:
/// none): a lease of its own that lapsed with nobody taking it since is
/// resumed with the same epoch.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    // `allow-oom`: a tiny key that must be kept even when Redis is full.
    Script::new(
        r"#!lua flags=allow-oom
local held = redis.call('GET', KEYS[1])
if held then
  local sep = string.find(held, '|', 1, true)
  if sep and string.sub(held, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {tonumber(string.sub(held, sep + 1)), held}
  end
  return {0, held}
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if tonumber(ARGV[3]) > 0 and last == tonumber(ARGV[3]) then
  -- Our own lease lapsed (this scheduler was too busy to renew it) and
  -- nobody took it since: every taking bumps the epoch. Resume it.
  local value = ARGV[1] .. '|' .. ARGV[3]
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  return {last, value}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = string.format('%.0f', math.max(last + 1, now))
redis.call('SET', KEYS[2], epoch)
local value = ARGV[1] .. '|' .. epoch
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {tonumber(epoch), value}
",
    )
});

/// Gives the lease up if this scheduler holds it.
static RESIGN: LazyLock<Script> = LazyLock::new(|| {
    // `allow-oom`: a tiny key that must be kept even when Redis is full.
    Script::new(
        r"#!lua flags=allow-oom
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// What one attempt on the lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This scheduler holds the lease with this epoch.
    Held(u64),
    /// Another scheduler holds it (`<id>|<epoch>`).
    Taken(String),
}

/// Takes the lease for `id`, or renews it if `id` holds it already (with
/// `held`, the epoch it held: see the `ACQUIRE` script).
pub async fn attempt(
    redis: &mut Redis,
    names: &Names,
    id: &str,
    held: u64,
) -> redis::RedisResult<Attempt> {
    let (epoch, holder): (u64, String) = ACQUIRE
        .key(names.leader_key())
        .key(names.epoch_key())
        .arg(id)
        .arg(LEASE.as_millis() as u64)
        .arg(held)
        .invoke_async(redis)
        .await?;
    Ok(if epoch == 0 {
        Attempt::Taken(holder)
    } else {
        Attempt::Held(epoch)
    })
}

/// Gives the lease up (on a graceful stop), so a standby takes over at once.
pub async fn resign(redis: &mut Redis, names: &Names, id: &str) {
    let resigned: redis::RedisResult<i64> = RESIGN
        .key(names.leader_key())
        .arg(id)
        .invoke_async(redis)
        .await;
    if let Err(error) = resigned {
        tracing::warn!(%error, "could not give the leader lease up; a standby takes over when it lapses");
    }
}

/// The active scheduler's lease as its own clock sees it.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// The fencing epoch.
    pub epoch: u64,
    valid_until: Arc<Mutex<Instant>>,
}

impl Leadership {
    /// A lease taken at `taken` (when the acquiring call was sent).
    pub fn new(epoch: u64, taken: Instant) -> Self {
        Leadership {
            epoch,
            valid_until: Arc::new(Mutex::new(taken + LEASE - MARGIN)),
        }
    }

    /// Records a renewal sent at `sent`.
    pub fn renewed(&self, sent: Instant) {
        let mut until = self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        *until = (*until).max(sent + LEASE - MARGIN);
    }

    /// Whether this scheduler may still act as the active one.
    pub fn valid(&self) -> bool {
        Instant::now() < *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Renews the lease once: `Ok(())` while it is still this scheduler's,
/// `Err(why)` once it is lost (another scheduler took it, or it lapsed and
/// a new epoch had to be taken, so another may have acted in between).
/// Redis failing to answer is not a loss by itself: [`Leadership::valid`]
/// runs out then.
pub async fn renew(
    redis: &mut Redis,
    names: &Names,
    id: &str,
    leadership: &Leadership,
) -> Result<(), String> {
    let sent = Instant::now();
    let renewal =
        tokio::time::timeout(RENEW_EVERY, attempt(redis, names, id, leadership.epoch)).await;
    match renewal {
        Ok(Ok(Attempt::Held(epoch))) if epoch == leadership.epoch => {
            leadership.renewed(sent);
            Ok(())
        }
        Ok(Ok(Attempt::Held(epoch))) => Err(format!("it lapsed; {id}|{epoch} is a new lease")),
        Ok(Ok(Attempt::Taken(holder))) => Err(format!("now held by {holder}")),
        Ok(Err(error)) => {
            tracing::warn!(%error, "renewing the leader lease failed");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("renewing the leader lease timed out");
            Ok(())
        }
    }
}

/// Renews the lease every [`RENEW_EVERY`] until it is lost; returns why.
pub async fn keep(mut redis: Redis, names: Names, id: String, leadership: Leadership) -> String {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(lost) = renew(&mut redis, &names, &id, &leadership).await {
            return lost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leadership_lapses_by_the_local_clock_unless_renewed() {
        let long_ago = Instant::now() - LEASE;
        let leadership = Leadership::new(7, long_ago);
        assert!(!leadership.valid());
        leadership.renewed(Instant::now());
        assert!(leadership.valid());
        // A late answer to an older renewal never shortens it.
        leadership.renewed(long_ago);
        assert!(leadership.valid());
    }

    /// On a Redis Cluster the lease and its epoch are in one slot: one
    /// script takes the lease and bumps the epoch, renews it, and tells a
    /// second scheduler who holds it.
    #[tokio::test]
    async fn the_leader_lease_is_taken_renewed_and_refused_on_a_redis_cluster() {
        let (cluster, mut redis) = flotilla_runtime::testing::RedisCluster::start_connected().await;
        let names = Names::new("t-leader");
        let Attempt::Held(epoch) = attempt(&mut redis, &names, "a", 0).await.unwrap() else {
            panic!("the first scheduler takes the lease");
        };
        assert!(matches!(
            attempt(&mut redis, &names, "a", epoch).await.unwrap(),
            Attempt::Held(e) if e == epoch
        ));
        let taken = attempt(&mut redis, &names, "b", 0).await.unwrap();
        assert!(matches!(&taken, Attempt::Taken(holder) if *holder == format!("a|{epoch}")));
        resign(&mut redis, &names, "a").await;
        let Attempt::Held(next) = attempt(&mut redis, &names, "b", 0).await.unwrap() else {
            panic!("the second scheduler takes the lease given up");
        };
        assert!(next > epoch, "epochs only grow: {next} after {epoch}");
        drop(cluster);
    }
}
