//! Connection settings, from the environment or given explicitly.

use crate::validate_namespace;

/// RabbitMQ URL used when none is configured.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Redis URL used when none is configured.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// Namespace used when none is configured.
pub const DEFAULT_NAMESPACE: &str = "flotilla";
/// Largest message payload accepted, in bytes (64 MiB): the arguments
/// travelling inside a task's message, an actor call's arguments, a
/// primitive's value, a worker's result. Task arguments and scattered
/// values are not capped: larger ones go through Redis in chunks.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 << 20;
/// How long a silent client keeps its references (30 s); see
/// [`Config::client_lease_ms`].
pub const DEFAULT_CLIENT_LEASE_MS: u64 = 30_000;
/// The shortest client lease (1 s): a smaller
/// [`Config::client_lease_ms`] is raised to it.
pub const MIN_CLIENT_LEASE_MS: u64 = 1_000;
/// How long a task runs before its worker acknowledges its delivery early
/// and keeps it by a lease in Redis instead (5 min: well inside RabbitMQ's
/// default 30-minute consumer timeout).
pub const DEFAULT_LONG_TASK_MS: u64 = 300_000;
/// Worker losses a started task is allowed before it errs `WorkerLost` (3,
/// as Dask's `allowed-failures`: the task errs on the 4th loss).
pub const DEFAULT_ALLOWED_FAILURES: u32 = 3;
/// How long a consumer remembers the signed messages it took, and how old a
/// signed message may be when first delivered (5 min).
pub const DEFAULT_REPLAY_WINDOW_MS: u64 = 300_000;
/// Default bound on a client's pending tasks ([`Config::max_pending`]).
pub const DEFAULT_MAX_PENDING: usize = 100_000;
/// Default bound on the unfinished tasks the scheduler holds in memory
/// ([`Config::scheduler_max_tasks`]).
pub const DEFAULT_SCHEDULER_MAX_TASKS: usize = 100_000;
/// Default shared-memory directory ([`Config::shm_dir`]).
pub const DEFAULT_SHM_DIR: &str = "/dev/shm";

/// The URLs of a RabbitMQ URL list: `url` split at its commas, each
/// trimmed, empty ones left out. (A comma inside a password must be
/// percent-encoded, `%2C`, as URLs require anyway.)
pub fn amqp_urls(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// Where a namespace's Redis is ([`Config::redis_target`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`redis://…` or `rediss://…`), the default.
    Single(String),
    /// A Redis Cluster, reached through these seed nodes, each a
    /// `redis://` or `rediss://` URL. Written `redis+cluster://h1:p1,h2:p2`
    /// (`rediss+cluster://` over TLS; credentials, if any, before the
    /// first host), or as a comma list of full URLs.
    Cluster(Vec<String>),
}

/// Reads a Redis URL ([`Config::redis_url`]): one server, or a cluster's
/// seed nodes (see [`RedisTarget`]). A cluster URL must name at least one
/// host and no database but 0 (a Redis Cluster has only database 0). The
/// errors never show a password.
pub fn redis_target(url: &str) -> Result<RedisTarget, ConfigError> {
    let url = url.trim();
    let refuse = |why: &'static str| ConfigError::RedisUrl { why };
    let cluster_scheme = [
        ("redis+cluster://", "redis"),
        ("rediss+cluster://", "rediss"),
    ]
    .into_iter()
    .find_map(|(prefix, scheme)| {
        (url.len() >= prefix.len() && url[..prefix.len()].eq_ignore_ascii_case(prefix))
            .then(|| (scheme, &url[prefix.len()..]))
    });
    let seeds = if let Some((scheme, rest)) = cluster_scheme {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        hosts
            .split(',')
            .map(str::trim)
            .filter(|host| !host.is_empty())
            .map(|host| format!("{scheme}://{userinfo}{host}{tail}"))
            .collect::<Vec<_>>()
    } else if url.contains(',') {
        amqp_urls(url).into_iter().map(str::to_owned).collect()
    } else {
        return Ok(RedisTarget::Single(url.to_owned()));
    };
    if seeds.is_empty() {
        return Err(refuse("a Redis Cluster URL must name at least one node"));
    }
    for seed in &seeds {
        let lower = seed.to_ascii_lowercase();
        if !(lower.starts_with("redis://") || lower.starts_with("rediss://")) {
            return Err(refuse(
                "a Redis Cluster's nodes are redis:// or rediss:// URLs",
            ));
        }
        let after = &seed[seed.find("://").map_or(0, |i| i + 3)..];
        let database = after
            .find('/')
            .map(|slash| &after[slash + 1..])
            .map(|path| path.split('?').next().unwrap_or_default())
            .unwrap_or_default();
        if !(database.is_empty() || database == "0") {
            return Err(refuse(
                "a Redis Cluster has only database 0: leave the database out or write /0",
            ));
        }
    }
    Ok(RedisTarget::Cluster(seeds))
}

/// The shared secret with which messages and results are signed
/// (`FLOTILLA_SECRET`). Its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(std::sync::Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: &str) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The namespace has characters that don't fit queue names or keys.
    #[error("invalid namespace {0:?}: use 1 to 64 characters from A-Z a-z 0-9 - _")]
    Namespace(String),
    /// This process's `FLOTILLA_SECRET` is not the one the namespace's
    /// scheduler signs with (see `flotilla_runtime::seal::check_fingerprint`).
    #[error("FLOTILLA_SECRET does not match the namespace's scheduler: it signs {theirs}, this process {ours}; give every process of the namespace the same secret")]
    Secret {
        /// What the scheduler signs with.
        theirs: String,
        /// What this process signs with.
        ours: String,
    },
    /// A numeric setting is outside the range it can work in.
    #[error("{name} = {value} cannot work: {why} (allowed: {min} to {max})")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// What was given.
        value: u64,
        /// The smallest value allowed.
        min: u64,
        /// The largest value allowed.
        max: u64,
        /// What goes wrong outside the range.
        why: &'static str,
    },
    /// Redis evicts keys (its `maxmemory-policy`), and
    /// `FLOTILLA_ALLOW_EVICTION` is not set.
    #[error("Redis' maxmemory-policy is {policy}: it evicts keys, and with them task specs and results (futures would fail with lost data). Set `maxmemory-policy noeviction` (recommended), or FLOTILLA_ALLOW_EVICTION=1 to accept it")]
    Evicting {
        /// The policy Redis reported.
        policy: String,
    },
    /// `FLOTILLA_QUEUE_TYPE` is neither `classic` nor `quorum`.
    #[error("invalid value {value:?} for FLOTILLA_QUEUE_TYPE: expected `classic` or `quorum`")]
    QueueType {
        /// What was given.
        value: String,
    },
    /// `FLOTILLA_AMQP_URL` lists no URL.
    #[error("FLOTILLA_AMQP_URL (--amqp-url) lists no URL")]
    NoAmqpUrl,
    /// `FLOTILLA_REDIS_URL` cannot name a Redis (see [`redis_target`]).
    #[error("FLOTILLA_REDIS_URL (--redis-url) cannot be used: {why}")]
    RedisUrl {
        /// What is wrong with it.
        why: &'static str,
    },
    /// A numeric setting did not parse.
    #[error("invalid value {value:?} for {name}: expected a whole number")]
    Number {
        /// The setting.
        name: &'static str,
        /// What was given.
        value: String,
    },
}

/// How a namespace's shared, durable queues are declared on RabbitMQ
/// (`FLOTILLA_QUEUE_TYPE`): the task queue, the scheduler's two queues and
/// the dead-letter queue. A process's own queue (which expires after its
/// owner) and an actor host's exclusive queue stay classic whatever this
/// says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Classic queues (the default): on one node of a cluster, not
    /// replicated.
    #[default]
    Classic,
    /// Quorum queues (`x-queue-type: quorum`): replicated over the cluster's
    /// nodes by Raft, and the documented choice for a RabbitMQ cluster; a
    /// queue survives the loss of a minority of its nodes. Workers then ask
    /// for a per-consumer prefetch, since quorum queues refuse a
    /// channel-wide one (see `docs/operations.md`, "Run it on a cluster").
    Quorum,
}

impl QueueType {
    /// The value of `x-queue-type`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            _ => Err(ConfigError::QueueType {
                value: value.to_owned(),
            }),
        }
    }
}

/// Where a Flotilla cluster lives: its broker, its Redis and its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// RabbitMQ URL (`amqp://` or `amqps://`, credentials included), or
    /// several separated by commas: the nodes of a RabbitMQ cluster, tried
    /// in turn when connecting and reconnecting (see
    /// [`Config::amqp_urls`]).
    pub amqp_url: String,
    /// How the namespace's shared queues are declared
    /// (`FLOTILLA_QUEUE_TYPE`: `classic`, the default, or `quorum`). Every
    /// process of the namespace needs the same: RabbitMQ refuses to declare
    /// a queue again with another type.
    pub queue_type: QueueType,
    /// Redis URL: `redis://` or `rediss://` for one server, or a Redis
    /// Cluster's seed nodes, `redis+cluster://h1:p1,h2:p2` (see
    /// [`RedisTarget`]).
    pub redis_url: String,
    /// Prefix of every queue and key name.
    pub namespace: String,
    /// Largest payload inside a message, in bytes (`FLOTILLA_MAX_PAYLOAD`,
    /// default [`DEFAULT_MAX_PAYLOAD`]): the task arguments sent inline, an
    /// actor call's arguments, a primitive's value, a worker's result.
    /// Scattered values and task arguments of any size are accepted all the
    /// same: a client scatters an argument that does not fit (or is over
    /// 1 MiB) and passes a reference, and values of 4 MiB and more are
    /// stored in Redis in chunks.
    pub max_payload: usize,
    /// The client lease (`FLOTILLA_CLIENT_LEASE_MS`, milliseconds; default
    /// [`DEFAULT_CLIENT_LEASE_MS`], 30 s, at least [`MIN_CLIENT_LEASE_MS`],
    /// 1 s): how long a client's holds on results outlive its last sign of
    /// life.
    ///
    /// Read by the client when it connects (each client may have its own;
    /// the scheduler and workers ignore it): the client records its expiry
    /// in `<ns>:leases` and renews it every quarter of the lease. Once it
    /// lapses (the client died, or was cut off for longer), the scheduler,
    /// which checks every second, drops every hold of that client and
    /// deletes the results nobody else holds; a client that reconnects
    /// within the lease keeps them. See `docs/operations.md`, "Client
    /// leases".
    pub client_lease_ms: u64,
    /// A task running longer than this (milliseconds) is acknowledged to
    /// the broker and kept in custody by a lease in Redis instead, so that
    /// RabbitMQ's consumer timeout never closes the worker's channel (which
    /// would hand the task to another worker while it still runs here).
    /// Keep it below the broker's `consumer_timeout`.
    pub long_task_ms: u64,
    /// Worker losses a task that had started is allowed: a task whose
    /// worker died under it more often errs `WorkerLost` instead of running
    /// again (Dask's `allowed-failures`; with 3 it errs on the 4th loss).
    /// Workers take at least 1.
    pub allowed_failures: u32,
    /// The shared secret: when set, every message and stored result is
    /// signed with it, and anything unsigned or signed otherwise is refused
    /// (see [`crate::seal`]). Every process of the namespace needs the same.
    pub secret: Option<Secret>,
    /// The replay window of signed messages, in milliseconds (see
    /// [`crate::seal`]). Processes' clocks must agree well within it.
    pub replay_window_ms: u64,
    /// Accept a Redis whose `maxmemory-policy` evicts keys
    /// (`FLOTILLA_ALLOW_EVICTION=1`; default: refused at start). Evicted
    /// specs and results then surface as data-loss errors on the futures
    /// that needed them, never as hangs; `noeviction` is the setting that
    /// loses nothing.
    pub allow_eviction: bool,
    /// Tasks one client may have pending (`FLOTILLA_MAX_PENDING`; default
    /// [`DEFAULT_MAX_PENDING`]): submitted, and neither finished nor
    /// released. Past it `submit` holds further submissions back in the
    /// client's outbox, `submit_async` waits for room, the blocking client
    /// blocks and `try_submit` errs (see `docs/operations.md`,
    /// "Backpressure"). Read by each client when it connects.
    pub max_pending: usize,
    /// Unfinished tasks (waiting, ready, processing) the scheduler admits
    /// into memory (`FLOTILLA_SCHEDULER_MAX_TASKS`; default
    /// [`DEFAULT_SCHEDULER_MAX_TASKS`]). Past it the scheduler parks what
    /// arrives on its queue in a Redis list, in order, and takes it up again
    /// once it holds fewer than three quarters of the bound. Read by the
    /// scheduler.
    pub scheduler_max_tasks: usize,
    /// The shared-memory directory (`FLOTILLA_SHM_DIR`; default
    /// `/dev/shm`; `off` for none). Workers write large results into files
    /// there, and readers on the same host (clients, other workers) map
    /// them instead of fetching their bytes; see ARCHITECTURE.md, "The
    /// data plane".
    pub shm_dir: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            queue_type: QueueType::Classic,
            redis_url: DEFAULT_REDIS_URL.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            client_lease_ms: DEFAULT_CLIENT_LEASE_MS,
            long_task_ms: DEFAULT_LONG_TASK_MS,
            allowed_failures: DEFAULT_ALLOWED_FAILURES,
            secret: None,
            replay_window_ms: DEFAULT_REPLAY_WINDOW_MS,
            allow_eviction: false,
            max_pending: DEFAULT_MAX_PENDING,
            scheduler_max_tasks: DEFAULT_SCHEDULER_MAX_TASKS,
            shm_dir: Some(DEFAULT_SHM_DIR.into()),
        }
    }
}

impl Config {
    /// Reads `FLOTILLA_AMQP_URL`, `FLOTILLA_QUEUE_TYPE`, `FLOTILLA_REDIS_URL`,
    /// `FLOTILLA_NAMESPACE`,
    /// `FLOTILLA_MAX_PAYLOAD`, `FLOTILLA_CLIENT_LEASE_MS`,
    /// `FLOTILLA_LONG_TASK_MS`, `FLOTILLA_ALLOWED_FAILURES`, `FLOTILLA_SECRET`,
    /// `FLOTILLA_REPLAY_WINDOW_MS`, `FLOTILLA_ALLOW_EVICTION`,
    /// `FLOTILLA_MAX_PENDING`, `FLOTILLA_SCHEDULER_MAX_TASKS` and
    /// `FLOTILLA_SHM_DIR`, with the
    /// defaults for what is unset.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        let set = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(url) = set("FLOTILLA_AMQP_URL") {
            config.amqp_url = url;
        }
        if let Some(url) = set("FLOTILLA_REDIS_URL") {
            config.redis_url = url;
        }
        if let Some(kind) = set("FLOTILLA_QUEUE_TYPE") {
            config.queue_type = kind.parse()?;
        }
        if let Some(ns) = set("FLOTILLA_NAMESPACE") {
            config.namespace = ns;
        }
        if let Some(limit) = set("FLOTILLA_MAX_PAYLOAD") {
            config.max_payload = limit.trim().parse().map_err(|_| ConfigError::Number {
                name: "FLOTILLA_MAX_PAYLOAD",
                value: limit.clone(),
            })?;
        }
        if let Some(lease) = set("FLOTILLA_CLIENT_LEASE_MS") {
            config.client_lease_ms = lease.trim().parse().map_err(|_| ConfigError::Number {
                name: "FLOTILLA_CLIENT_LEASE_MS",
                value: lease.clone(),
            })?;
        }
        if let Some(long) = set("FLOTILLA_LONG_TASK_MS") {
            config.long_task_ms = long.trim().parse().map_err(|_| ConfigError::Number {
                name: "FLOTILLA_LONG_TASK_MS",
                value: long.clone(),
            })?;
        }
        if let Some(failures) = set("FLOTILLA_ALLOWED_FAILURES") {
            config.allowed_failures = failures.trim().parse().map_err(|_| ConfigError::Number {
                name: "FLOTILLA_ALLOWED_FAILURES",
                value: failures.clone(),
            })?;
        }
        if let Some(allow) = set("FLOTILLA_ALLOW_EVICTION") {
            config.allow_eviction = matches!(
                allow.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            );
        }
        if let Some(dir) = lookup("FLOTILLA_SHM_DIR") {
            let dir = dir.trim();
            config.shm_dir = match dir.to_ascii_lowercase().as_str() {
                "" | "off" | "none" | "0" | "false" => None,
                _ => Some(dir.into()),
            };
        }
        if let Some(secret) = lookup("FLOTILLA_SECRET").filter(|s| !s.is_empty()) {
            config.secret = Some(Secret::new(&secret));
        }
        if let Some(window) = set("FLOTILLA_REPLAY_WINDOW_MS") {
            config.replay_window_ms = window.trim().parse().map_err(|_| ConfigError::Number {
                name: "FLOTILLA_REPLAY_WINDOW_MS",
                value: window.clone(),
            })?;
        }
        for (name, field) in [
            ("FLOTILLA_MAX_PENDING", &mut config.max_pending),
            (
                "FLOTILLA_SCHEDULER_MAX_TASKS",
                &mut config.scheduler_max_tasks,
            ),
        ] {
            if let Some(bound) = set(name) {
                *field = bound.trim().parse().map_err(|_| ConfigError::Number {
                    name,
                    value: bound.clone(),
                })?;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The RabbitMQ URLs of [`Config::amqp_url`], in the order given: one
    /// for a single broker, one per node of a cluster.
    pub fn amqp_urls(&self) -> Vec<&str> {
        amqp_urls(&self.amqp_url)
    }

    /// Where Redis is: [`Config::redis_url`] read by [`redis_target`].
    pub fn redis_target(&self) -> Result<RedisTarget, ConfigError> {
        redis_target(&self.redis_url)
    }

    /// Checks the settings that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_namespace(&self.namespace)?;
        if self.amqp_urls().is_empty() {
            return Err(ConfigError::NoAmqpUrl);
        }
        self.redis_target()?;
        let checks: [(&'static str, u64, u64, u64, &'static str); 6] = [
            (
                "FLOTILLA_REPLAY_WINDOW_MS",
                self.replay_window_ms,
                1_000,
                7 * 24 * 3_600_000,
                "every signed message would be refused as stale, and nothing would run",
            ),
            (
                "FLOTILLA_LONG_TASK_MS",
                self.long_task_ms,
                100,
                1_800_000,
                "a delivery must be taken into custody well before RabbitMQ's consumer timeout (30 min by default) closes the channel",
            ),
            (
                "FLOTILLA_CLIENT_LEASE_MS",
                self.client_lease_ms,
                0,
                24 * 3_600_000,
                "a dead client's holds and pending work would outlive it by more than a day",
            ),
            (
                "FLOTILLA_MAX_PAYLOAD",
                self.max_payload as u64,
                1_024,
                u32::MAX as u64,
                "no message could carry a task",
            ),
            (
                "FLOTILLA_MAX_PENDING",
                self.max_pending as u64,
                1,
                100_000_000,
                "a client could submit nothing (0), or hold more pending tasks than a scheduler can track",
            ),
            (
                "FLOTILLA_SCHEDULER_MAX_TASKS",
                self.scheduler_max_tasks as u64,
                100,
                100_000_000,
                "the scheduler would admit too few tasks to keep its workers busy, or hold more than it can track",
            ),
        ];
        for (name, value, min, max, why) in checks {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::OutOfRange {
                    name,
                    value,
                    min,
                    max,
                    why,
                });
            }
        }
        Ok(())
    }

    /// How long a task in custody (see [`Config::long_task_ms`]) outlives
    /// its worker's last renewal before the scheduler runs it again.
    pub fn custody_lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.long_task_ms.clamp(1_000, 30_000))
    }

    /// The client lease as used: [`Config::client_lease_ms`], at least
    /// [`MIN_CLIENT_LEASE_MS`].
    pub fn client_lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.client_lease_ms.max(MIN_CLIENT_LEASE_MS))
    }

    /// The queue and key names of this configuration's namespace.
    pub fn names(&self) -> crate::Names {
        crate::Names::new(&self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_is_a_list_of_urls_and_its_queues_may_be_quorum() {
        let config = Config::from_lookup(|name| match name {
            "FLOTILLA_AMQP_URL" => Some(" amqp://a:5672/%2f ,amqp://b:5672/%2f,".into()),
            "FLOTILLA_QUEUE_TYPE" => Some("Quorum".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            config.amqp_urls(),
            ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]
        );
        assert_eq!(config.queue_type, QueueType::Quorum);
        assert_eq!(Config::default().queue_type, QueueType::Classic);
        let wrong = Config::from_lookup(|n| (n == "FLOTILLA_QUEUE_TYPE").then(|| "stream".into()));
        assert!(wrong
            .unwrap_err()
            .to_string()
            .contains("`classic` or `quorum`"));
        let empty = Config::from_lookup(|n| (n == "FLOTILLA_AMQP_URL").then(|| ",".into()));
        assert!(matches!(empty, Err(ConfigError::NoAmqpUrl)));
    }

    #[test]
    fn a_redis_url_names_one_server_or_a_clusters_seed_nodes() {
        let target = |url: &str| redis_target(url).map_err(|e| e.to_string());
        assert_eq!(
            target("redis://127.0.0.1:6379/0"),
            Ok(RedisTarget::Single("redis://127.0.0.1:6379/0".into()))
        );
        assert_eq!(
            target("redis+cluster://u:p%2C@h1:7000, h2:7001,[::1]:7002/0"),
            Ok(RedisTarget::Cluster(vec![
                "redis://u:p%2C@h1:7000/0".into(),
                "redis://u:p%2C@h2:7001/0".into(),
                "redis://u:p%2C@[::1]:7002/0".into(),
            ]))
        );
        assert_eq!(
            target("REDISS+CLUSTER://h1:7000,h2:7000?protocol=resp2"),
            Ok(RedisTarget::Cluster(vec![
                "rediss://h1:7000?protocol=resp2".into(),
                "rediss://h2:7000?protocol=resp2".into(),
            ]))
        );
        assert_eq!(
            target("redis://a:1,rediss://b:2/0"),
            Ok(RedisTarget::Cluster(vec![
                "redis://a:1".into(),
                "rediss://b:2/0".into()
            ]))
        );
        let refused = target("redis+cluster://secret@,/0").unwrap_err();
        assert!(refused.contains("at least one node"), "{refused}");
        assert!(!refused.contains("secret"));
        let refused = target("redis+cluster://h1:7000/3").unwrap_err();
        assert!(refused.contains("only database 0"), "{refused}");
        let refused = target("redis://a:1,amqp://b:2").unwrap_err();
        assert!(refused.contains("redis:// or rediss://"), "{refused}");
        let config = Config::from_lookup(|n| {
            (n == "FLOTILLA_REDIS_URL").then(|| "redis+cluster:///0".into())
        });
        assert!(matches!(config, Err(ConfigError::RedisUrl { .. })));
    }

    #[test]
    fn defaults_apply_when_unset() {
        let config = Config::from_lookup(|_| None).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    }

    #[test]
    fn backpressure_bounds_are_read_and_checked() {
        let config = Config::from_lookup(|name| match name {
            "FLOTILLA_MAX_PENDING" => Some("7".into()),
            "FLOTILLA_SCHEDULER_MAX_TASKS" => Some("500".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!((config.max_pending, config.scheduler_max_tasks), (7, 500));
        for (name, value) in [
            ("FLOTILLA_MAX_PENDING", "0"),
            ("FLOTILLA_SCHEDULER_MAX_TASKS", "99"),
        ] {
            let error = Config::from_lookup(|n| (n == name).then(|| value.to_owned())).unwrap_err();
            assert!(
                matches!(error, ConfigError::OutOfRange { name: n, .. } if n == name),
                "{error}"
            );
        }
        let error = Config::from_lookup(|n| (n == "FLOTILLA_MAX_PENDING").then(|| "lots".into()))
            .unwrap_err();
        assert!(matches!(error, ConfigError::Number { .. }), "{error}");
    }

    #[test]
    fn the_shared_memory_directory_is_read_or_turned_off() {
        let at = |value: &str| {
            Config::from_lookup(|n| (n == "FLOTILLA_SHM_DIR").then(|| value.to_owned()))
                .unwrap()
                .shm_dir
        };
        assert_eq!(Config::default().shm_dir, Some("/dev/shm".into()));
        assert_eq!(at(" /run/shm "), Some("/run/shm".into()));
        for off in ["off", "OFF", "none", "", "0"] {
            assert_eq!(at(off), None, "{off:?}");
        }
    }

    #[test]
    fn environment_overrides() {
        let config = Config::from_lookup(|name| match name {
            "FLOTILLA_NAMESPACE" => Some("ns1".into()),
            "FLOTILLA_MAX_PAYLOAD" => Some("1024".into()),
            "FLOTILLA_ALLOWED_FAILURES" => Some("1".into()),
            "FLOTILLA_SECRET" => Some(" shh ".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.secret, Some(Secret::new(" shh ")));
        assert!(
            !format!("{config:?}").contains("shh"),
            "the secret never shows"
        );
        assert_eq!(
            (
                config.namespace.as_str(),
                config.max_payload,
                config.allowed_failures
            ),
            ("ns1", 1024, 1)
        );
        assert_eq!(Config::default().allowed_failures, 3);
        let short = Config {
            client_lease_ms: 10,
            ..Config::default()
        };
        assert_eq!(short.client_lease(), std::time::Duration::from_secs(1));
        assert_eq!(
            Config::default().client_lease(),
            std::time::Duration::from_secs(30)
        );
        assert!(
            Config::from_lookup(|n| (n == "FLOTILLA_NAMESPACE").then(|| "a.b".into())).is_err()
        );
        assert!(
            Config::from_lookup(|n| (n == "FLOTILLA_MAX_PAYLOAD").then(|| "lots".into())).is_err()
        );
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_the_setting_named() {
        let zero_window = Config {
            replay_window_ms: 0,
            ..Config::default()
        };
        let error = zero_window.validate().unwrap_err().to_string();
        assert!(
            error.starts_with("FLOTILLA_REPLAY_WINDOW_MS = 0 cannot work"),
            "{error}"
        );
        let lookup = |name: &str| (name == "FLOTILLA_LONG_TASK_MS").then(|| "3600000".to_owned());
        let error = Config::from_lookup(lookup).unwrap_err().to_string();
        assert!(error.contains("FLOTILLA_LONG_TASK_MS = 3600000"), "{error}");
        assert!(Config::default().validate().is_ok());
    }
}
