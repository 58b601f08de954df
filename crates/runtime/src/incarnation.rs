//! Detecting that Redis lost its data.
//!
//! `<ns>:incarnation` holds a random marker (on a Redis Cluster, one per
//! bucket of slots, so that each master holds one). A process starting sets it
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
    observe_key(redis, &names.incarnation_key()).await
}

/// The marker under `key`, set to a fresh random one if absent.
async fn observe_key(redis: &mut Redis, key: &str) -> redis::RedisResult<String> {
    OBSERVE
        .key(key)
        .arg(flotilla_proto::new_id())
        .invoke_async(redis)
        .await
}

/// The markers under `keys`, each set to a fresh random one if absent, all
/// at once (on a cluster they are on different masters).
async fn observe_all(redis: &Redis, keys: &[String]) -> redis::RedisResult<Vec<Option<String>>> {
    futures_util::future::join_all(keys.iter().map(|key| {
        let mut redis = redis.clone();
        async move { observe_key(&mut redis, key).await.map(Some) }
    }))
    .await
    .into_iter()
    .collect()
}

/// How many markers a Redis Cluster gets: one in each 1,024-slot bucket,
/// so that every master owning at least 2,048 contiguous slots (any
/// master of a cluster of up to 8) holds one, and a master that lost its
/// data is noticed whichever it is.
const CLUSTER_MARKERS: u16 = 16;

/// The hash tags of the cluster's markers: `i<b>-<n>`, the first `n` whose
/// slot falls in bucket `b`.
static CLUSTER_TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let width = 16_384 / CLUSTER_MARKERS;
    (0..CLUSTER_MARKERS)
        .map(|bucket| {
            (0u32..)
                .map(|n| format!("i{bucket}-{n}"))
                .find(|tag| crate::redis_conn::slot_of(tag.as_bytes()) / width == bucket)
                .expect("every bucket is hit")
        })
        .collect()
});

/// The marker keys: `<ns>:incarnation` on one server; on a cluster, one
/// per bucket of slots, `<ns>:incarnation:{i<b>-<n>}`.
fn marker_keys(redis: &Redis, names: &Names) -> Vec<String> {
    if redis.is_cluster() {
        CLUSTER_TAGS
            .iter()
            .map(|tag| format!("{}:{{{tag}}}", names.incarnation_key()))
            .collect()
    } else {
        vec![names.incarnation_key()]
    }
}

/// Remembers the markers a process saw and tells when one changes.
///
/// Every process sets the markers when it starts and finds none; after
/// that, the scheduler *keeps* them (sets them again when gone) while
/// clients only read them, so a client that outlives its namespace's purge
/// leaves no key behind.
#[derive(Debug, Clone)]
pub struct Incarnation {
    keys: Vec<String>,
    seen: Vec<Option<String>>,
    keeps: bool,
}

impl Incarnation {
    /// Reads the markers, setting those absent (so that a process started
    /// before the scheduler knows them too); with `keeps`, later looks set
    /// them again when they are gone.
    pub async fn start(redis: &mut Redis, names: &Names, keeps: bool) -> redis::RedisResult<Self> {
        let keys = marker_keys(redis, names);
        let seen = observe_all(redis, &keys).await?;
        Ok(Incarnation { keys, seen, keeps })
    }

    async fn read(&self, redis: &mut Redis) -> redis::RedisResult<Vec<Option<String>>> {
        if self.keeps {
            observe_all(redis, &self.keys).await
        } else {
            let gets: Vec<redis::Cmd> = self.keys.iter().map(redis::Cmd::get).collect();
            redis.query_each(&gets).await
        }
    }

    /// Looks again: `Ok(true)` when a marker seen before is gone or
    /// changed (Redis, or one master of a cluster, lost its data since);
    /// what is seen now is remembered.
    pub async fn lost(&mut self, redis: &mut Redis) -> redis::RedisResult<bool> {
        let now = self.read(redis).await?;
        let mut lost = false;
        for ((key, seen), now) in self.keys.iter().zip(&self.seen).zip(&now) {
            if seen.is_some() && now != seen {
                tracing::warn!(key, ?seen, ?now, "Redis' incarnation marker changed");
                lost = true;
            }
        }
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
    // The first policy that evicts, named with its master on a cluster.
    let evicting = replies.and_then(|replies| {
        for (node, reply) in replies {
            let (_, policy): (String, String) = redis::from_redis_value(reply)?;
            if policy != "noeviction" {
                return Ok(Some(match node {
                    Some(node) => format!("{policy} (on {node})"),
                    None => policy,
                }));
            }
        }
        Ok(None)
    });
    match evicting {
        Ok(Some(policy)) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_markers_fall_one_in_each_bucket_of_slots() {
        let buckets: Vec<u16> = CLUSTER_TAGS
            .iter()
            .map(|tag| crate::redis_conn::slot_of(tag.as_bytes()) / 1024)
            .collect();
        assert_eq!(buckets, (0..16).collect::<Vec<u16>>());
    }

    /// On a Redis Cluster, a master that loses its data (here a FLUSHALL
    /// of one master) is noticed, whichever master it is.
    #[tokio::test]
    async fn a_redis_cluster_master_that_lost_its_data_is_noticed() {
        let (cluster, mut redis) = crate::testing::RedisCluster::start_connected().await;
        let names = Names::new(&format!("t-incarnation-{}", flotilla_proto::new_id()));
        let mut scheduler = Incarnation::start(&mut redis, &names, true).await.unwrap();
        let mut client = Incarnation::start(&mut redis, &names, false).await.unwrap();
        assert_eq!(client.keys.len(), 16);
        assert!(!client.lost(&mut redis).await.unwrap());
        let masters = redis.masters().await.unwrap();
        let victim = masters.last().unwrap();
        let _: () = redis
            .on_node(Some(victim), &redis::cmd("FLUSHALL"))
            .await
            .unwrap();
        assert!(scheduler.lost(&mut redis).await.unwrap());
        assert!(client.lost(&mut redis).await.unwrap());
        // The scheduler set the lost markers anew: nothing more is lost.
        assert!(!client.lost(&mut redis).await.unwrap());
        crate::transport::delete_redis_keys(&mut redis, &names)
            .await
            .unwrap();
        drop(cluster);
    }
}
