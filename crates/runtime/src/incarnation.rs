//! Detecting that Redis lost its data.
//!
//! `<ns>:incarnation` holds a random marker. A process starting sets it
//! when it is absent, and the scheduler whenever it is gone; every process
//! remembers the one it saw and looks again from time to time. Redis restarted without persistence, a `FLUSHALL`, or a failover
//! to a replica that missed the marker show as a marker that is gone (and
//! set anew by the scheduler) or changed: the state written before is
//! gone, and waiting for it would hang. Clients then fail their pending
//! futures with a data-loss error; the scheduler logs it and settles its
//! processing tasks against what Redis still holds.

use crate::Redis;
use flotilla_proto::Names;
use redis::Script;
use std::sync::LazyLock;

static OBSERVE: LazyLock<Script> = LazyLock::new(|| {
    // `allow-oom`: a tiny key that must be kept even when Redis is full.
    Script::new(
        r"#!lua flags=allow-oom
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
",
    )
});

/// The namespace's marker, set to a fresh random one if absent.
pub async fn observe(redis: &mut Redis, names: &Names) -> redis::RedisResult<String> {
    OBSERVE
        .key(names.incarnation_key())
        .arg(flotilla_proto::new_id())
        .invoke_async(redis)
        .await
}

/// Remembers the marker a process saw and tells when it changes.
///
/// Every process sets the marker when it starts and finds none; after
/// that, the scheduler *keeps* it (sets it again when gone) while clients
/// only read it, so a client that outlives its namespace's purge leaves no
/// key behind.
#[derive(Debug, Clone)]
pub struct Incarnation {
    seen: Option<String>,
    keeps: bool,
}

impl Incarnation {
    /// Reads the marker, setting it when absent (so that a process started
    /// before the scheduler knows it too); with `keeps`, later looks set it
    /// again when it is gone.
    pub async fn start(redis: &mut Redis, names: &Names, keeps: bool) -> redis::RedisResult<Self> {
        Ok(Incarnation {
            seen: Some(observe(redis, names).await?),
            keeps,
        })
    }

    async fn read(&self, redis: &mut Redis, names: &Names) -> redis::RedisResult<Option<String>> {
        if self.keeps {
            observe(redis, names).await.map(Some)
        } else {
            redis::cmd("GET")
                .arg(names.incarnation_key())
                .query_async(redis)
                .await
        }
    }

    /// Looks again: `Ok(true)` when a marker seen before is gone or
    /// changed (Redis lost its data since); what is seen now is remembered.
    pub async fn lost(&mut self, redis: &mut Redis, names: &Names) -> redis::RedisResult<bool> {
        let now = self.read(redis, names).await?;
        let lost = self.seen.is_some() && now != self.seen;
        self.seen = now;
        Ok(lost)
    }
}

/// Refuses a Redis whose `maxmemory-policy` evicts keys unless `allow`
/// (see `Config::allow_eviction`), as Sidekiq does: an evicted spec or
/// result is lost work. A Redis that does not let `CONFIG GET` run (a
/// managed service) is taken as it is, with a warning.
pub async fn check_eviction(
    redis: &mut Redis,
    allow: bool,
) -> Result<(), flotilla_proto::ConfigError> {
    // Every master of a cluster: one that evicts loses its share of keys.
    let replies = redis
        .on_masters(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
        .await;
    let policy = replies.and_then(|replies| {
        let mut policies = Vec::new();
        for (node, reply) in replies {
            let (_, policy): (String, String) = redis::from_redis_value(reply)?;
            policies.push(match node {
                Some(node) if policy != "noeviction" => format!("{policy} (on {node})"),
                _ => policy,
            });
        }
        Ok((
            String::new(),
            policies
                .into_iter()
                .find(|policy| policy != "noeviction")
                .unwrap_or_else(|| "noeviction".to_owned()),
        ))
    });
    match policy {
        Ok((_, policy)) if policy != "noeviction" => {
            if allow {
                tracing::warn!(
                    policy,
                    "Redis evicts keys (FLOTILLA_ALLOW_EVICTION is set): evicted specs and results fail their futures with lost data"
                );
                Ok(())
            } else {
                Err(flotilla_proto::ConfigError::Evicting { policy })
            }
        }
        Ok(_) => Ok(()),
        Err(error) => {
            tracing::warn!(%error, "could not read Redis' maxmemory-policy; make sure it is noeviction");
            Ok(())
        }
    }
}
