//! One connection type for one Redis server or a Redis Cluster
//! ([`Redis`]), opened by [`crate::transport::connect_redis`] from
//! `FLOTILLA_REDIS_URL` (see [`flotilla_proto::RedisTarget`]).
//!
//! Both kinds are multiplexed and cheap to clone, and both implement
//! [`redis::aio::ConnectionLike`], so a command or a script runs the same
//! way on either. What differs on a cluster (see `docs/redis-cluster.md`):
//! a pipeline must stay within one hash slot, a `SCAN` sees one node, and
//! the connection follows the slot map itself, retrying through a
//! failover within its budget ([`CLUSTER_RETRIES`]).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A connection to a namespace's Redis: one server, or a Redis Cluster.
#[derive(Clone)]
pub enum Redis {
    /// One server: a connection manager that reconnects by itself.
    Single(ConnectionManager),
    /// A Redis Cluster: one multiplexed connection per node, routed by the
    /// slot map, which the connection refreshes on `MOVED` and failures.
    Cluster(std::sync::Arc<ClusterLink>),
}

/// A cluster connection that is opened again when a command through it
/// runs out of time: after a failover, the redis crate's connection was
/// seen to stay stuck (every command through it waited out the whole
/// reply budget, again and again), while a new one worked at once.
pub struct ClusterLink {
    client: redis::cluster::ClusterClient,
    current: std::sync::Mutex<ClusterConnection>,
    /// Whether a replacement is being opened.
    replacing: std::sync::atomic::AtomicBool,
}

impl ClusterLink {
    /// A link over `connection`, opened by `client`.
    pub fn new(
        client: redis::cluster::ClusterClient,
        connection: ClusterConnection,
    ) -> ClusterLink {
        ClusterLink {
            client,
            current: std::sync::Mutex::new(connection),
            replacing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The connection now.
    fn connection(&self) -> ClusterConnection {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// After `outcome` of a command: a timeout replaces the connection (in
    /// the background, once at a time).
    fn after<T>(self: &std::sync::Arc<Self>, outcome: &RedisResult<T>) {
        let Err(error) = outcome else {
            return;
        };
        if !error.is_timeout()
            || self
                .replacing
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        tracing::warn!(%error, "a Redis Cluster command timed out: opening the cluster connection again");
        let link = self.clone();
        tokio::spawn(async move {
            match link.client.get_async_connection().await {
                Ok(connection) => {
                    *link.current.lock().unwrap_or_else(|p| p.into_inner()) = connection;
                }
                Err(error) => tracing::warn!(%error, "opening the cluster connection again failed"),
            }
            link.replacing
                .store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

impl Redis {
    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Redis::Cluster(_))
    }
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Redis::Single(_) => "Redis::Single",
            Redis::Cluster(_) => "Redis::Cluster",
        })
    }
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Redis::Single(redis) => redis.req_packed_command(cmd),
            Redis::Cluster(link) => {
                let link = link.clone();
                Box::pin(async move {
                    let outcome = link.connection().req_packed_command(cmd).await;
                    link.after(&outcome);
                    outcome
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Redis::Single(redis) => redis.req_packed_commands(pipeline, offset, count),
            Redis::Cluster(link) => {
                let link = link.clone();
                Box::pin(async move {
                    let outcome = link
                        .connection()
                        .req_packed_commands(pipeline, offset, count)
                        .await;
                    link.after(&outcome);
                    outcome
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Redis::Single(redis) => redis.get_db(),
            Redis::Cluster(link) => link.connection().get_db(),
        }
    }
}

/// How many times a cluster connection retries a command that met a
/// failover (`CLUSTERDOWN`, `MOVED`, a refused node), waiting between
/// [`CLUSTER_RETRY_MIN_MS`] and [`CLUSTER_RETRY_MAX_MS`], growing: about
/// 15 s in all on average, 29 s at most, which outlasts a failover (about
/// 4 s with a 2 s node timeout) within the reply budget.
pub const CLUSTER_RETRIES: u32 = 20;
/// How long one try of a cluster command may take before the connection
/// to its node counts as broken: the connection to that node is opened
/// again and the command tried again, within [`CLUSTER_REPLY_TIMEOUT`].
/// A cluster's commands are small (a batch is split by slot; a large value
/// goes in 4 MiB chunks).
pub const CLUSTER_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a cluster command may take in all, tries and redirects
/// included (a single server's is [`crate::transport::REDIS_REPLY_TIMEOUT`],
/// 60 s). Seen in the `redis-master-failover` scenario: after a failover,
/// the redis crate's cluster connection of a process sometimes stays stuck,
/// every command through it waiting out the whole budget while a new
/// connection works at once. 15 s outlasts a failover (about 4 s) and
/// stays well inside a client's lease (30 s by default); a command that
/// runs out of it is an error the callers retry, and the connection is
/// opened again ([`ClusterLink`]).
pub const CLUSTER_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// The shortest wait between two tries of a cluster command, in ms.
pub const CLUSTER_RETRY_MIN_MS: u64 = 100;
/// The longest wait between two tries of a cluster command, in ms.
pub const CLUSTER_RETRY_MAX_MS: u64 = 2_000;

/// The hash slot of `key` (Redis' `CLUSTER KEYSLOT`): CRC16 (XMODEM) of its
/// hash tag (the part between the first `{` and the next `}`, when not
/// empty) or of the whole key, modulo 16384.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % 16384
}

/// A Redis Cluster node, `host:port` as the cluster connection knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Reads `host:port` (an IPv6 host may be bracketed).
fn node_of(address: &str) -> Option<Node> {
    let (host, port) = address.rsplit_once(':')?;
    Some(Node {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port: port.parse().ok()?,
    })
}

/// How many times a walk over every master starts a node again after a
/// failover interrupted it (see [`Scan`]).
const SCAN_RESTARTS: u32 = 20;

impl Redis {
    /// Runs `cmd` on every master: one reply per master, with its node
    /// (`None` on a single server, which is its own only master).
    pub async fn on_masters(&self, cmd: &Cmd) -> RedisResult<Vec<(Option<Node>, Value)>> {
        match self {
            Redis::Single(redis) => {
                let value = cmd.query_async(&mut redis.clone()).await?;
                Ok(vec![(None, value)])
            }
            Redis::Cluster(link) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let replies = link.connection().route_command(cmd.clone(), routing).await;
                link.after(&replies);
                let replies = replies?;
                let Value::Map(replies) = replies else {
                    return Err(unexpected("a reply per master", &replies));
                };
                replies
                    .into_iter()
                    .map(|(address, value)| {
                        let address: String = redis::from_redis_value(address)?;
                        let node = node_of(&address)
                            .ok_or_else(|| unexpected("a node address", &address))?;
                        match value {
                            Value::ServerError(error) => Err(error.into()),
                            value => Ok((Some(node), value)),
                        }
                    })
                    .collect()
            }
        }
    }

    /// The masters as the connection sees them now (none on a single
    /// server: [`Redis::on_node`] with `None` is the server itself).
    pub async fn masters(&self) -> RedisResult<Vec<Node>> {
        Ok(self
            .on_masters(&redis::cmd("PING"))
            .await?
            .into_iter()
            .filter_map(|(node, _)| node)
            .collect())
    }

    /// Runs `cmd` on `node` (`None`: wherever the connection routes it, the
    /// server itself when single).
    pub async fn on_node<T: redis::FromRedisValue>(
        &self,
        node: Option<&Node>,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match (self, node) {
            (Redis::Cluster(link), Some(node)) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: node.host.clone(),
                    port: node.port,
                });
                let value = link.connection().route_command(cmd.clone(), routing).await;
                link.after(&value);
                let value = value?;
                redis::from_redis_value(value).map_err(Into::into)
            }
            _ => cmd.query_async(&mut self.clone()).await,
        }
    }

    /// The master that serves `key`'s slot now (`None` on a single
    /// server): where a blocking command on `key` must be sent.
    pub async fn master_of(&self, key: &str) -> RedisResult<Option<Node>> {
        let Redis::Cluster(link) = self else {
            return Ok(None);
        };
        let route = redis::cluster_routing::Route::new(
            slot_of(key.as_bytes()),
            redis::cluster_routing::SlotAddr::Master,
        );
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        // `laddr` is the server's own end of the connection: its address as
        // this process reaches it.
        let info = link
            .connection()
            .route_command(redis::cmd("CLIENT").arg("INFO").clone(), routing)
            .await;
        link.after(&info);
        let info = info?;
        let info: String = redis::from_redis_value(info)?;
        info.split_whitespace()
            .find_map(|field| field.strip_prefix("laddr="))
            .and_then(node_of)
            .map(Some)
            .ok_or_else(|| unexpected("CLIENT INFO with laddr", &info))
    }

    /// Every key matching `pattern`, page by page, on every master (see
    /// [`Scan`]).
    pub fn scan(&self, pattern: impl Into<String>) -> Scan {
        Scan {
            redis: self.clone(),
            pattern: pattern.into(),
            nodes: None,
            finished: Vec::new(),
            cursor: 0,
            restarts: 0,
        }
    }

    /// The replies of `commands`, each a single-key command (or keyless on
    /// a single server), in order: one pipeline on a single server; on a
    /// cluster, each sent on its own (they fall in many slots), all at
    /// once over the per-node connections.
    pub async fn query_each<T: redis::FromRedisValue>(
        &self,
        commands: &[Cmd],
    ) -> RedisResult<Vec<T>> {
        match self {
            Redis::Single(redis) => {
                let mut pipe = redis::pipe();
                for cmd in commands {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async(&mut redis.clone()).await
            }
            Redis::Cluster(_) => {
                let replies = futures_util::future::join_all(commands.iter().map(|cmd| {
                    let mut redis = self.clone();
                    async move { cmd.query_async::<T>(&mut redis).await }
                }))
                .await;
                replies.into_iter().collect()
            }
        }
    }
}

/// A walk over every key matching a pattern: `SCAN` on one server, or on
/// every master of a cluster in turn (each sees only its own keys). A
/// node that fails in the middle (a failover) is walked again from the
/// start on the masters then known, so a key may come twice: callers
/// accept duplicates. A key that moves to another node while the walk
/// runs (live resharding) may be missed.
pub struct Scan {
    redis: Redis,
    pattern: String,
    /// The nodes still to walk (the current one first); `None` until the
    /// first page, and `[None]` on a single server.
    nodes: Option<Vec<Option<Node>>>,
    finished: Vec<Node>,
    cursor: u64,
    restarts: u32,
}

impl Scan {
    /// The next page of keys (maybe empty); `None` when the walk is done.
    pub async fn next_page(&mut self) -> RedisResult<Option<Vec<String>>> {
        if self.nodes.is_none() {
            self.nodes = Some(self.to_walk().await?);
        }
        loop {
            let nodes = self.nodes.as_mut().expect("set above");
            let Some(node) = nodes.first().cloned() else {
                return Ok(None);
            };
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(self.cursor)
                .arg("MATCH")
                .arg(&self.pattern)
                .arg("COUNT")
                .arg(1000);
            match self
                .redis
                .on_node::<(u64, Vec<String>)>(node.as_ref(), &cmd)
                .await
            {
                Ok((next, keys)) => {
                    self.cursor = next;
                    if next == 0 {
                        nodes.remove(0);
                        self.finished.extend(node);
                    }
                    return Ok(Some(keys));
                }
                Err(error)
                    if node.is_some()
                        && crate::transport::is_connection_error(&error)
                        && self.restarts < SCAN_RESTARTS =>
                {
                    self.restarts += 1;
                    tracing::warn!(%error, node = %node.as_ref().expect("some"), "a Redis Cluster node failed during a scan; scanning the masters not yet done again");
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    self.cursor = 0;
                    self.nodes = Some(self.to_walk().await.unwrap_or_default());
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The nodes to walk: the masters not finished yet (the server itself
    /// on a single server).
    async fn to_walk(&self) -> RedisResult<Vec<Option<Node>>> {
        if !self.redis.is_cluster() {
            return Ok(vec![None]);
        }
        Ok(self
            .redis
            .masters()
            .await?
            .into_iter()
            .filter(|node| !self.finished.contains(node))
            .map(Some)
            .collect())
    }
}

/// A reply of an unexpected shape.
fn unexpected(what: &'static str, got: &dyn std::fmt::Debug) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        what,
        format!("{got:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisCluster;
    use crate::transport::{connect_redis, delete_redis_keys};

    #[test]
    fn slots_are_those_redis_computes() {
        // Checked with CLUSTER KEYSLOT on a Redis 7.0 cluster.
        assert_eq!(slot_of(b"ns:leader"), 13663);
        assert_eq!(slot_of(b"ns:epoch"), 6839);
        assert_eq!(slot_of(b"ns:r:{add-1}"), 12749);
        assert_eq!(slot_of(b"ns:h:{add-1}"), 12749);
        assert_eq!(slot_of(b"ns:events:c1"), 1066);
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(
            slot_of(b"a{}b"),
            crc16::State::<crc16::XMODEM>::calculate(b"a{}b") % 16384
        );
        assert_eq!(slot_of(b"ns:epoch:{ns:leader}"), slot_of(b"ns:leader"));
    }

    #[test]
    fn node_addresses_are_read() {
        assert_eq!(
            node_of("127.0.0.1:7000"),
            Some(Node {
                host: "127.0.0.1".into(),
                port: 7000
            })
        );
        assert_eq!(node_of("[::1]:7000").map(|n| n.host), Some("::1".into()));
        assert_eq!(node_of("nohost"), None);
    }

    /// On a Redis Cluster: the cluster URL connects, a plain URL to one of
    /// its nodes is refused naming the setting (and a cluster URL to a
    /// plain server), keys of every slot are written and read, a read of
    /// keys in many slots comes back in order, a walk finds the keys of
    /// every master, a command runs on every master, and the namespace is
    /// purged from all of them.
    #[tokio::test]
    async fn a_redis_cluster_connection_reads_writes_walks_and_purges_every_master() {
        let (cluster, mut redis) = RedisCluster::start_connected().await;
        assert!(redis.is_cluster());

        let plain = format!("redis://127.0.0.1:{}/0", cluster.masters()[0]);
        let refused = connect_redis(&plain).await.unwrap_err().to_string();
        assert!(
            refused.contains("is a Redis Cluster node") && refused.contains("redis+cluster://"),
            "{refused}"
        );
        let refused = connect_redis("redis+cluster://127.0.0.1:6379/0")
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("not a Redis Cluster node"), "{refused}");

        let names = flotilla_proto::Names::new(&format!("t-cluster-{}", flotilla_proto::new_id()));
        let keys: Vec<String> = (0..64)
            .map(|i| names.result_key(&format!("k{i}")))
            .collect();
        let homes: std::collections::HashSet<u16> =
            keys.iter().map(|key| cluster.master_of(key)).collect();
        assert_eq!(homes.len(), 3, "the keys span every master");
        for (i, key) in keys.iter().enumerate() {
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(i)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        // One MGET over many slots: the connection splits it and keeps the
        // order.
        let read: Vec<Option<usize>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(read, (0..64).map(Some).collect::<Vec<_>>());
        let exists: Vec<bool> = redis
            .query_each(&keys.iter().map(redis::Cmd::exists).collect::<Vec<_>>())
            .await
            .unwrap();
        assert!(exists.iter().all(|e| *e));

        let masters = redis.masters().await.unwrap();
        assert_eq!(masters.len(), 3);
        let sizes = redis.on_masters(&redis::cmd("DBSIZE")).await.unwrap();
        assert_eq!(sizes.len(), 3);
        assert!(sizes.iter().all(|(node, _)| node.is_some()));

        let mut found = Vec::new();
        let mut pages = redis.scan(names.redis_pattern());
        while let Some(page) = pages.next_page().await.unwrap() {
            found.extend(page);
        }
        found.sort();
        let mut expected = keys.clone();
        expected.sort();
        assert_eq!(found, expected, "the walk visits every master");

        assert_eq!(delete_redis_keys(&mut redis, &names).await.unwrap(), 64);
        let mut pages = redis.scan(names.redis_pattern());
        while let Some(page) = pages.next_page().await.unwrap() {
            assert!(page.is_empty(), "left after the purge: {page:?}");
        }
        drop(cluster);
    }
}
