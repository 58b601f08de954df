//! Test support, not product API (feature `testing`, which the tests crate
//! enables; always built for this crate's own tests).
//!
//! [`RedisCluster`] is a Redis Cluster of our own: six `redis-server` child
//! processes (three masters, three replicas) on fresh ports of their own,
//! each with its own data directory under one scratch directory, built
//! with `redis-cli --cluster create`. It is driven synchronously with
//! `redis-cli` (so it needs no cluster support of the `redis` crate), can
//! kill a node and wait for its replica to take over, and leaves nothing
//! behind when dropped: no process, no directory.
//!
//! It needs `redis-server` and `redis-cli` 7 or later on the `PATH`
//! (Debian packages `redis-server` and `redis-tools`; `--cluster-port` is
//! new in 7.0). See docs/redis-cluster.md §5.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any one wait may take before the harness gives up and panics.
const LIMIT: Duration = Duration::from_secs(30);
/// How often a wait asks again.
const POLL: Duration = Duration::from_millis(50);
/// Nodes per cluster: three masters, each with one replica.
const NODES: usize = 6;
/// Whole-cluster attempts when a node cannot start (a port taken by
/// someone else between choosing it and the node binding it).
const ATTEMPTS: usize = 3;

/// A local Redis Cluster for tests: three masters and three replicas, each
/// a `redis-server` child process with its own client port, cluster bus
/// port (`--cluster-port`, chosen too: an ephemeral port + 10000 can exceed
/// 65535) and data directory (`nodes.conf`, an append-only file synced
/// every second, its log).
///
/// The nodes run with `--cluster-node-timeout 2000`, so a killed master's
/// replica takes over in about 4 s, and `--repl-diskless-sync-delay 0`, so
/// replicas sync at once. Every node is addressed by its client port.
///
/// Dropping it kills every node (SIGKILL), waits for them and deletes the
/// scratch directory. A test process that is itself killed leaves them
/// running, as it does a `PrivateRedis`.
pub struct RedisCluster {
    /// The scratch directory that holds every node's directory.
    dir: PathBuf,
    nodes: Vec<Node>,
}

/// One `redis-server` of the cluster.
struct Node {
    port: u16,
    bus_port: u16,
    dir: PathBuf,
    /// `None` while killed.
    child: Option<Child>,
    /// Set by [`RedisCluster::kill`].
    killed: Option<Killed>,
}

/// When a node was killed, and which slots it served then.
struct Killed {
    at: Instant,
    slots: Vec<(u16, u16)>,
}

/// A node as a `CLUSTER NODES` line describes it.
#[derive(Debug, Clone, PartialEq)]
struct NodeLine {
    port: u16,
    flags: Vec<String>,
    /// Slot ranges, inclusive (a master's; empty for a replica).
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn is_master(&self) -> bool {
        self.has_flag("master")
    }

    /// Flagged as failing (`fail`) or possibly failing (`fail?`).
    fn is_failing(&self) -> bool {
        self.has_flag("fail") || self.has_flag("fail?")
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(first, last)| first <= slot && slot <= last)
    }
}

impl RedisCluster {
    /// [`RedisCluster::start`] from async code (on a blocking thread), and
    /// a connection to it through its `redis+cluster://` URL.
    pub async fn start_connected() -> (RedisCluster, crate::Redis) {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("the cluster starts");
        let redis = crate::transport::connect_redis(&cluster.url())
            .await
            .expect("a connection to the cluster");
        (cluster, redis)
    }

    /// Starts the six nodes, creates the cluster and returns once it is
    /// ready: every node says `cluster_state:ok`, the nodes agree on who
    /// serves which slots, and each of the three replicas has its link to
    /// its master up (so a master killed at once has a synced replica).
    ///
    /// A node that exits at once (one of its ports taken) makes it start a
    /// whole new cluster on fresh ports, up to three times.
    ///
    /// # Panics
    ///
    /// When `redis-server` or `redis-cli` is missing, when three attempts
    /// failed, or when a step takes longer than 30 s.
    pub fn start() -> RedisCluster {
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "a local Redis Cluster did not start, {ATTEMPTS} times:\n{}",
            failures.join("\n---\n")
        );
    }

    /// One attempt: the ready cluster, or why a node did not start. A
    /// partly started cluster is dropped (killed and deleted) on the way
    /// out, also when a wait panics.
    fn try_start() -> Result<RedisCluster, String> {
        let ports = free_ports(2 * NODES);
        let dir = std::env::temp_dir().join(format!(
            "flotilla-redis-cluster-{}",
            &flotilla_proto::new_id()[..12]
        ));
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
        };
        for pair in ports.chunks(2) {
            let node_dir = cluster.dir.join(pair[0].to_string());
            std::fs::create_dir_all(&node_dir).expect("a scratch directory for a Redis node");
            let mut node = Node {
                port: pair[0],
                bus_port: pair[1],
                dir: node_dir,
                child: None,
                killed: None,
            };
            node.spawn();
            cluster.nodes.push(node);
        }
        for node in &mut cluster.nodes {
            node.wait_serving()?;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs (Debian package redis-tools)");
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed ({}):\n{}{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                cluster.logs()
            ));
        }
        cluster.wait_until("the new Redis Cluster is ready", |cluster| {
            let masters = cluster.settled()?;
            match masters {
                3 => Ok(()),
                n => Err(format!("{n} masters serve slots, not 3")),
            }
        });
        Ok(cluster)
    }

    /// Its URL: `redis+cluster://` with the current masters as seeds, e.g.
    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/0`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .masters()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+cluster://{}/0", seeds.join(","))
    }

    /// The client ports of all six nodes, in the order they were started
    /// (killed ones included).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    /// The client ports of the masters that serve slots now, as a live
    /// node sees them (`CLUSTER NODES`), in slot order; a node killed here
    /// is left out, even before its failover.
    pub fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<NodeLine> = self
            .view(self.live_port())
            .into_iter()
            .filter(|line| {
                line.is_master()
                    && !line.is_failing()
                    && !line.slots.is_empty()
                    && self.is_live(line.port)
            })
            .collect();
        masters.sort_by_key(|line| line.slots.iter().map(|&(first, _)| first).min());
        masters.into_iter().map(|line| line.port).collect()
    }

    /// The client port of the master that owns `key`'s slot
    /// (`CLUSTER KEYSLOT`), as a live node sees it: after [`kill`], the
    /// killed master until its replica has taken over.
    ///
    /// [`kill`]: RedisCluster::kill
    pub fn master_of(&self, key: &str) -> u16 {
        let port = self.live_port();
        let reply = self.cli(port, &["CLUSTER", "KEYSLOT", key]);
        let slot: u16 = reply
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key} answered {reply:?}"));
        self.view(port)
            .into_iter()
            .find(|line| line.is_master() && line.owns(slot))
            .unwrap_or_else(|| panic!("no master owns slot {slot} (of key {key})"))
            .port
    }

    /// The node's role from `ROLE`: `master` or `slave`.
    ///
    /// # Panics
    ///
    /// When the node is down.
    pub fn role(&self, port: u16) -> String {
        self.node(port);
        try_role(port).unwrap_or_else(|error| panic!("{error}"))
    }

    /// Runs `redis-cli -e -c -p <port> args...` (redirections followed, an
    /// error reply an error) and returns what it printed.
    ///
    /// # Panics
    ///
    /// When the command fails: the node is down or answered an error.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        self.node(port);
        try_cli(port, args).unwrap_or_else(|error| panic!("{error}"))
    }

    /// Kills the node with SIGKILL and waits for it to exit. What it served
    /// then is remembered for [`wait_for_failover`] and [`restart`].
    ///
    /// [`wait_for_failover`]: RedisCluster::wait_for_failover
    /// [`restart`]: RedisCluster::restart
    ///
    /// # Panics
    ///
    /// When `port` is not a running node of this cluster.
    pub fn kill(&mut self, port: u16) {
        let slots = self
            .view(self.live_port())
            .into_iter()
            .find(|line| line.port == port)
            .map(|line| line.slots)
            .unwrap_or_default();
        let node = self.node_mut(port);
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("Redis node {port} is not running"));
        let _ = child.kill();
        let _ = child.wait();
        node.killed = Some(Killed {
            at: Instant::now(),
            slots,
        });
    }

    /// Waits until the slots the node killed by [`kill`] served are served
    /// by another, live master and every live node says `cluster_state:ok`
    /// (and the nodes agree on the slots, and every live replica's link is
    /// up). Returns the time since the kill.
    ///
    /// [`kill`]: RedisCluster::kill
    ///
    /// # Panics
    ///
    /// When the node was not killed here, or after 30 s.
    pub fn wait_for_failover(&self, killed_port: u16) -> Duration {
        let killed = self
            .node(killed_port)
            .killed
            .as_ref()
            .unwrap_or_else(|| panic!("Redis node {killed_port} was not killed"));
        let what = format!("the failover of Redis node {killed_port}");
        self.wait_until(&what, |cluster| {
            cluster.settled()?;
            // `settled` found every slot served by a live node, in every
            // live node's view; the killed node's slots included.
            let view = try_view(cluster.live_port())?;
            for &(first, _) in &killed.slots {
                match view
                    .iter()
                    .find(|line| line.is_master() && line.owns(first))
                {
                    Some(line) if line.port != killed_port => {}
                    _ => return Err(format!("slot {first} is not served by another node")),
                }
            }
            Ok(())
        });
        killed.at.elapsed()
    }

    /// Starts the killed node again, with the same arguments, ports and
    /// `nodes.conf`, and waits until it has rejoined: the nodes agree on
    /// the slots and every live node says `cluster_state:ok`; and, when
    /// another node took over its slots, until it is a replica with its
    /// link to its master up.
    ///
    /// # Panics
    ///
    /// When the node is running, does not start (its port taken
    /// meanwhile), or has not rejoined after 30 s.
    pub fn restart(&mut self, port: u16) {
        let node = self.node_mut(port);
        assert!(node.child.is_none(), "Redis node {port} is running");
        let served = node.killed.take().map(|killed| killed.slots);
        node.spawn();
        if let Err(error) = node.wait_serving() {
            panic!("restarting it: {error}");
        }
        let what = format!("the restarted Redis node {port} rejoining");
        self.wait_until(&what, |cluster| {
            cluster.settled()?;
            let view = try_view(cluster.live_port())?;
            let taken_over = served.as_ref().is_some_and(|slots| {
                slots.iter().any(|&(first, _)| {
                    view.iter()
                        .any(|line| line.port != port && line.is_master() && line.owns(first))
                })
            });
            let role = try_role(port)?;
            if taken_over && role != "slave" {
                return Err(format!("it is a {role}, not yet a replica"));
            }
            Ok(())
        });
    }

    /// Whether the cluster has settled, asked of every live node: each says
    /// `cluster_state:ok`, knows the six nodes (none in a handshake), flags
    /// no live node as failing, and sees the same live masters serve the
    /// same slots; each live replica's link to its master is up. The number
    /// of masters serving slots, or what is not so yet.
    fn settled(&self) -> Result<usize, String> {
        let mut agreed: Option<(u16, Vec<Owned>)> = None;
        for node in self.nodes.iter().filter(|node| node.child.is_some()) {
            let port = node.port;
            let info = try_cli(port, &["CLUSTER", "INFO"])?;
            if !info.lines().any(|line| line.trim() == "cluster_state:ok") {
                return Err(format!("node {port} does not say cluster_state:ok"));
            }
            let view = try_view(port)?;
            if view.len() != NODES
                || view
                    .iter()
                    .any(|line| line.has_flag("handshake") || line.has_flag("noaddr"))
            {
                return Err(format!("node {port} does not know the six nodes: {view:?}"));
            }
            if let Some(line) = view
                .iter()
                .find(|line| line.is_failing() && self.is_live(line.port))
            {
                return Err(format!("node {port} flags live node {}", line.port));
            }
            let owners = slot_owners(&view);
            if let Some(range) = owners.iter().find(|range| !self.is_live(range.owner)) {
                return Err(format!(
                    "node {port} sees slots {}-{} on killed node {}",
                    range.first, range.last, range.owner
                ));
            }
            match &agreed {
                None => agreed = Some((port, owners)),
                Some((other, theirs)) if *theirs != owners => {
                    return Err(format!(
                        "nodes {other} and {port} disagree on the slots: {theirs:?} vs {owners:?}"
                    ));
                }
                Some(_) => {}
            }
            let me = view
                .iter()
                .find(|line| line.has_flag("myself"))
                .ok_or_else(|| format!("node {port} does not list itself"))?;
            if me.has_flag("slave") {
                let replication = try_cli(port, &["INFO", "replication"])?;
                if !replication
                    .lines()
                    .any(|line| line.trim() == "master_link_status:up")
                {
                    return Err(format!("replica {port}'s link to its master is not up"));
                }
            }
        }
        let (_, owners) = agreed.ok_or("no node is running")?;
        let mut masters: Vec<u16> = owners.iter().map(|range| range.owner).collect();
        masters.sort_unstable();
        masters.dedup();
        Ok(masters.len())
    }

    /// Asks `check` every 50 ms until it is content.
    ///
    /// # Panics
    ///
    /// After 30 s, naming `what` and what `check` said last.
    fn wait_until(&self, what: &str, check: impl Fn(&Self) -> Result<(), String>) {
        let started = Instant::now();
        loop {
            let Err(why) = check(self) else {
                return;
            };
            assert!(
                started.elapsed() < LIMIT,
                "{what} did not happen within {LIMIT:?}: {why}\n{}",
                self.logs()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The cluster as the node at `port` sees it (`CLUSTER NODES`).
    fn view(&self, port: u16) -> Vec<NodeLine> {
        self.node(port);
        try_view(port).unwrap_or_else(|error| panic!("{error}"))
    }

    /// A node that runs.
    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|node| node.child.is_some())
            .map(|node| node.port)
            .expect("a Redis node of the cluster runs")
    }

    fn is_live(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|node| node.port == port && node.child.is_some())
    }

    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|node| node.port == port)
            .unwrap_or_else(|| panic!("port {port} is no node of this Redis Cluster"))
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .unwrap_or_else(|| panic!("port {port} is no node of this Redis Cluster"))
    }

    /// The last lines of every node's log.
    fn logs(&self) -> String {
        self.nodes.iter().map(Node::log_tail).collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // FLOTILLA_KEEP_CLUSTER=1 keeps the nodes' data and logs, to read
        // after a failed run.
        if std::env::var_os("FLOTILLA_KEEP_CLUSTER").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Node {
    /// Starts its `redis-server` (not daemonized: a child of ours).
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--cluster-enabled", "yes", "--cluster-port"])
            .arg(self.bus_port.to_string())
            .arg("--cluster-config-file")
            .arg(self.dir.join("nodes.conf"))
            .args(["--cluster-node-timeout", "2000"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian package redis-server)");
        self.child = Some(child);
    }

    /// Waits until our own server answers on its port: `INFO server` there
    /// names our child's process id (a listener of someone else's on a
    /// port we chose does not). The server only answers once both its
    /// ports are bound. An error when it exited (a port taken).
    fn wait_serving(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let child = self.child.as_mut().expect("a started node");
        let pid = format!("process_id:{}", child.id());
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let _ = self.child.take();
                return Err(format!(
                    "redis-server on ports {} and {} exited at once ({status})\n{}",
                    self.port,
                    self.bus_port,
                    self.log_tail()
                ));
            }
            if try_cli(self.port, &["INFO", "server"])
                .is_ok_and(|info| info.lines().any(|line| line.trim() == pid))
            {
                return Ok(());
            }
            assert!(
                started.elapsed() < LIMIT,
                "redis-server did not answer on port {} within {LIMIT:?}\n{}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The last lines of its log.
    fn log_tail(&self) -> String {
        let path = self.dir.join("redis.log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("{}:\n{tail}\n", path.display())
    }
}

/// `count` distinct TCP ports nobody listens on right now: all held at
/// once while chosen, so none is chosen twice.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local address").port())
        .collect()
}

/// Runs `redis-cli -e -c -p <port> args...`: what it printed, or why not.
fn try_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let output = Command::new("redis-cli")
        .args(["-e", "-c", "-p"])
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs (Debian package redis-tools)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "redis-cli -p {port} {args:?} failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The cluster as the node at `port` sees it (`CLUSTER NODES`).
fn try_view(port: u16) -> Result<Vec<NodeLine>, String> {
    Ok(parse_nodes(&try_cli(port, &["CLUSTER", "NODES"])?))
}

/// The node's role from `ROLE`: `master` or `slave`.
fn try_role(port: u16) -> Result<String, String> {
    let reply = try_cli(port, &["ROLE"])?;
    Ok(reply.lines().next().unwrap_or_default().trim().to_owned())
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus-port[,hostname]> <flags>
/// <master> <ping-sent> <pong-recv> <epoch> <link-state> <slot>...`, where
/// a slot is `n`, `first-last` or a migration in brackets (skipped).
fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let address = fields[1].split(['@', ',']).next()?;
            let port = address.rsplit(':').next()?.parse().ok()?;
            let flags = fields[2].split(',').map(str::to_owned).collect();
            let slots = fields[8..]
                .iter()
                .filter(|slot| !slot.starts_with('['))
                .filter_map(|slot| match slot.split_once('-') {
                    Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
                    None => {
                        let slot = slot.parse().ok()?;
                        Some((slot, slot))
                    }
                })
                .collect();
            Some(NodeLine { port, flags, slots })
        })
        .collect()
}

/// A range of slots (inclusive) and the master that serves it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Owned {
    owner: u16,
    first: u16,
    last: u16,
}

/// Who serves which slots in a view: the masters' ranges, in slot order.
fn slot_owners(view: &[NodeLine]) -> Vec<Owned> {
    let mut owners: Vec<Owned> = view
        .iter()
        .filter(|line| line.is_master())
        .flat_map(|line| {
            line.slots.iter().map(move |&(first, last)| Owned {
                owner: line.port,
                first,
                last,
            })
        })
        .collect();
    owners.sort_by_key(|range| range.first);
    owners
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn redis_cluster_nodes_lines_are_parsed() {
        let text = "\
07c3 127.0.0.1:30004@31004,host,shard-id=x slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed]
6ec2 127.0.0.1:30005@31005 master,fail - 1426238316232 1426238315431 5 connected
";
        let view = parse_nodes(text);
        assert_eq!(view.len(), 4);
        assert_eq!(view[0].port, 30004);
        assert!(view[0].has_flag("slave") && view[0].slots.is_empty());
        assert_eq!(view[2].slots, vec![(0, 5460)]);
        assert!(view[2].has_flag("myself") && view[2].owns(5460) && !view[2].owns(5461));
        assert!(view[3].is_failing());
        assert_eq!(
            slot_owners(&view),
            vec![
                Owned {
                    owner: 30001,
                    first: 0,
                    last: 5460
                },
                Owned {
                    owner: 30002,
                    first: 5461,
                    last: 10922
                }
            ]
        );
    }

    /// One key in each master's slots.
    fn a_key_per_master(cluster: &RedisCluster) -> Vec<(String, u16)> {
        let mut keys: Vec<(String, u16)> = Vec::new();
        for i in 0..1000 {
            let key = format!("key-{i}");
            let master = cluster.master_of(&key);
            if !keys.iter().any(|&(_, seen)| seen == master) {
                keys.push((key, master));
            }
            if keys.len() == 3 {
                return keys;
            }
        }
        panic!("no key found for every master: {keys:?}");
    }

    #[test]
    fn redis_cluster_starts_fails_over_restarts_and_leaves_nothing_behind() {
        let started = Instant::now();
        let mut cluster = RedisCluster::start();
        println!("redis cluster: started in {:?}", started.elapsed());

        let ports = cluster.ports();
        assert_eq!(ports.len(), 6);
        for &port in &ports {
            let info = cluster.cli(port, &["CLUSTER", "INFO"]);
            assert!(info.contains("cluster_state:ok"), "{port}: {info}");
        }
        let masters = cluster.masters();
        assert_eq!(masters.len(), 3, "{masters:?}");
        let url = cluster.url();
        for port in &masters {
            assert!(url.contains(&format!("127.0.0.1:{port}")), "{url}");
        }
        assert!(url.starts_with("redis+cluster://") && url.ends_with("/0"));

        // A key in each master's slots, written through one node and read
        // through another (redirected), and replicated.
        let keys = a_key_per_master(&cluster);
        for (key, master) in &keys {
            assert!(masters.contains(master));
            let value = format!("value of {key}");
            // WAIT waits for the writes of its own connection: a WAIT from
            // another connection (another redis-cli) returns at once, and a
            // master killed right after took the value with it (2 runs in 5
            // on a loaded machine).
            let mut connection = redis::Client::open(format!("redis://127.0.0.1:{master}/0"))
                .and_then(|client| client.get_connection())
                .expect("the key's master answers");
            let () = redis::cmd("SET")
                .arg(key)
                .arg(&value)
                .query(&mut connection)
                .expect("SET on the key's master");
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(1000)
                .query(&mut connection)
                .expect("WAIT");
            assert_eq!(acked, 1, "the replica has {key}");
            assert_eq!(cluster.cli(ports[5], &["GET", key]).trim(), value);
        }

        // Kill the master of the first key: its replica takes over, with
        // the key.
        let (key, victim) = keys[0].clone();
        cluster.kill(victim);
        let took = cluster.wait_for_failover(victim);
        println!("redis cluster: master {victim} failed over in {took:?}");
        let successor = cluster.master_of(&key);
        assert_ne!(successor, victim);
        assert_eq!(cluster.role(successor), "master");
        let masters = cluster.masters();
        assert_eq!(masters.len(), 3, "{masters:?}");
        assert!(!masters.contains(&victim) && masters.contains(&successor));
        let seeds: Vec<String> = masters.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        assert_eq!(
            cluster.url(),
            format!("redis+cluster://{}/0", seeds.join(","))
        );
        for (key, _) in &keys {
            let value = format!("value of {key}");
            assert_eq!(cluster.cli(successor, &["GET", key]).trim(), value);
        }

        // Restarted, it rejoins as a replica.
        let restarted = Instant::now();
        cluster.restart(victim);
        println!(
            "redis cluster: {victim} rejoined as a replica in {:?}",
            restarted.elapsed()
        );
        assert_eq!(cluster.role(victim), "slave");
        assert_eq!(cluster.master_of(&key), successor);
        let value = format!("value of {key}");
        assert_eq!(cluster.cli(victim, &["GET", &key]).trim(), value);

        // Dropped: no process, no port, no directory left.
        let dir = cluster.dir.clone();
        let pids: Vec<u32> = cluster
            .nodes
            .iter()
            .map(|node| node.child.as_ref().expect("every node runs").id())
            .collect();
        assert!(dir.exists());
        let stopping = Instant::now();
        drop(cluster);
        println!("redis cluster: stopped in {:?}", stopping.elapsed());
        assert!(!dir.exists(), "{} is left behind", dir.display());
        for pid in pids {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "redis-server {pid} is left behind"
            );
        }
        for port in ports {
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "something still listens on {port}"
            );
        }
    }
}
