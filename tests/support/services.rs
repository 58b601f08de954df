//! Private RabbitMQ and Redis instances for tests that stop or kill a
//! service: each runs on ports of its own, with its own data directory
//! (and, for RabbitMQ, its own node name), so the shared services other
//! tests use are never touched. Dropping one stops it and deletes its data.
//! A Redis Cluster of our own is the runtime's test support,
//! [`RedisCluster`], re-exported here.

// Every test binary compiles the support; those that start no Redis
// Cluster do not use it.
#[allow(unused_imports)]
pub use flotilla_runtime::testing::RedisCluster;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, limit: Duration, what: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < limit,
            "{what} did not listen on port {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A scratch directory under the system's temporary directory.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "flotilla-{name}-{}",
        &flotilla_proto::new_id()[..12]
    ));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A RabbitMQ node of our own (`rabbitmq-server -detached`).
pub struct PrivateRabbit {
    pub node: String,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateRabbit {
    /// Starts a node and waits until it accepts connections.
    pub fn start() -> PrivateRabbit {
        Self::start_with("", "[].")
    }

    /// Starts a node with extra `rabbitmq.conf` lines and an
    /// `advanced.config` term. A node that does not boot (a port taken
    /// between choosing it and the node binding it, by another test's
    /// listener) is tried again on fresh ports, up to three times.
    pub fn start_with(conf: &str, advanced: &str) -> PrivateRabbit {
        Self::start_retrying(|| conf.to_owned(), advanced)
    }

    /// Like [`PrivateRabbit::start_with`], the extra configuration made by
    /// `conf` from a fresh port of its own for each attempt (a TLS
    /// listener, say); returns that port with the node.
    pub fn start_with_port(conf: impl Fn(u16) -> String, advanced: &str) -> (u16, PrivateRabbit) {
        let mut port = 0;
        let rabbit = Self::start_retrying(
            || {
                port = free_port();
                conf(port)
            },
            advanced,
        );
        (port, rabbit)
    }

    fn start_retrying(mut conf: impl FnMut() -> String, advanced: &str) -> PrivateRabbit {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let conf = conf();
            match Self::try_start(&conf, advanced) {
                Ok(rabbit) => return rabbit,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "a private RabbitMQ node did not boot, three times:\n{}",
            failures.join("\n---\n")
        );
    }

    /// One attempt: the node, or why it did not boot (with its log's tail).
    fn try_start(conf: &str, advanced: &str) -> Result<PrivateRabbit, String> {
        let port = free_port();
        let dist_port = free_port();
        let dir = scratch_dir("rabbit");
        let node = format!("flotilla-t-{port}@localhost");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\nloopback_users = none\n{conf}"),
        )
        .expect("config file");
        std::fs::write(dir.join("advanced.config"), format!("{advanced}\n"))
            .expect("advanced config");
        // rabbitmq-server drops root privileges to the `rabbitmq` user,
        // which must own the node's files.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status();
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server runs (Debian package rabbitmq-server)");
        assert!(status.success(), "rabbitmq-server -detached failed");
        let rabbit = PrivateRabbit { node, port, dir };
        // `wait` follows the pid file until the node has booted.
        let pid_file = rabbit.dir.join("pid");
        if let Err(error) = rabbit.try_ctl(&[
            "wait",
            "--timeout",
            "120",
            pid_file.to_str().expect("UTF-8 path"),
        ]) {
            return Err(format!("{error}\n{}", rabbit.log_tail()));
        }
        wait_for_port(port, Duration::from_secs(60), "the private RabbitMQ node");
        Ok(rabbit)
    }

    /// The last lines of the node's logs.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.join("log"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            out.push_str(&format!("{}:\n{tail}\n", entry.path().display()));
        }
        out
    }

    /// Its AMQP URL.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n <node> args...` on it; panics when that fails.
    pub fn ctl(&self, args: &[&str]) {
        self.ctl_output(args);
    }

    /// Runs `rabbitmqctl -n <node> args...` on it and returns what it
    /// printed; panics when that fails.
    pub fn ctl_output(&self, args: &[&str]) -> String {
        self.try_ctl(args).unwrap_or_else(|error| panic!("{error}"))
    }

    /// Runs `rabbitmqctl -n <node> args...` on it; what it printed.
    fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("rabbitmqctl runs");
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "rabbitmqctl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Stops the broker application (every connection is closed), waits
    /// `down`, and starts it again; returns once it accepts connections.
    pub fn restart(&self, down: Duration) {
        self.ctl(&["stop_app"]);
        std::thread::sleep(down);
        self.ctl(&["start_app"]);
        wait_for_port(
            self.port,
            Duration::from_secs(60),
            "the restarted RabbitMQ node",
        );
    }
}

/// A RabbitMQ cluster of our own: private nodes (see [`PrivateRabbit`]),
/// booted side by side, the others joined to the first with
/// `rabbitmqctl join_cluster`. Dropping it stops every node, side by side.
pub struct RabbitCluster {
    pub nodes: Vec<PrivateRabbit>,
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        std::thread::scope(|scope| {
            for node in nodes {
                scope.spawn(move || drop(node));
            }
        });
    }
}

impl RabbitCluster {
    /// Starts a cluster of `size` nodes; returns once every node runs in it.
    pub fn start(size: usize) -> RabbitCluster {
        let nodes: Vec<PrivateRabbit> = std::thread::scope(|scope| {
            let booting: Vec<_> = (0..size)
                .map(|_| scope.spawn(PrivateRabbit::start))
                .collect();
            booting
                .into_iter()
                .map(|node| node.join().expect("a node boots"))
                .collect()
        });
        let first = nodes[0].node.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", &first]);
            node.ctl(&["start_app"]);
            wait_for_port(node.port, Duration::from_secs(60), "a joined RabbitMQ node");
        }
        let cluster = RabbitCluster { nodes };
        let status = cluster.nodes[0].ctl_output(&["cluster_status", "--formatter", "json"]);
        for node in &cluster.nodes {
            assert!(
                status.contains(&node.node),
                "{} is in the cluster: {status}",
                node.node
            );
        }
        cluster
    }

    /// The nodes' AMQP URLs, separated by commas (`FLOTILLA_AMQP_URL`).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(PrivateRabbit::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The type of `queue` and the index of the node that leads it (for a
    /// quorum queue; a classic queue's node), asked of node `via`.
    pub fn queue_leader(&self, queue: &str, via: usize) -> (String, Option<usize>) {
        let listed = self.nodes[via].ctl_output(&[
            "list_queues",
            "name",
            "type",
            "leader",
            "--quiet",
            "--no-table-headers",
        ]);
        for line in listed.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.first() == Some(&queue) {
                let kind = fields.get(1).copied().unwrap_or_default().to_owned();
                let leader = fields
                    .get(2)
                    .and_then(|leader| self.nodes.iter().position(|n| n.node == *leader));
                return (kind, leader);
            }
        }
        panic!("queue {queue} is not listed: {listed}");
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server of our own, with an append-only file synced on every
/// write, so that a killed and restarted server has every acknowledged
/// write.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Extra `redis-server` arguments (they override the defaults).
    extra: Vec<String>,
}

impl PrivateRedis {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_with(&[])
    }

    /// Like [`PrivateRedis::start`], with extra `redis-server` arguments,
    /// e.g. `["--appendonly", "no"]` for a server that keeps nothing
    /// across a restart, or a `--maxmemory` and its policy.
    pub fn start_with(extra: &[&str]) -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        // A port taken between choosing it and the server binding it (by
        // another test's listener): the server exits; try a fresh one.
        for _ in 0..3 {
            redis.spawn();
            if redis.running() {
                return redis;
            }
            redis.port = free_port();
        }
        panic!("a private redis-server did not stay up on three ports");
    }

    /// Whether the server is still running a moment after it listened (a
    /// server that could not bind its port exits at once, while
    /// [`wait_for_port`] may have found someone else's listener).
    fn running(&mut self) -> bool {
        std::thread::sleep(Duration::from_millis(200));
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        matches!(child.try_wait(), Ok(None))
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .args(&self.extra)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian package redis-server)");
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|child| !matches!(child.try_wait(), Ok(None)));
            if exited {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the private redis-server did not listen on port {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server with SIGKILL, waits `down`, and starts it again on
    /// the same port and data; returns once it accepts connections.
    pub fn kill_and_restart(&mut self, down: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::thread::sleep(down);
        self.spawn();
        assert!(
            self.running(),
            "the private redis-server did not come back on port {}",
            self.port
        );
    }
}

impl PrivateRedis {
    /// Starts a server that speaks TLS only, with `ca`'s server
    /// certificate, and waits until it accepts connections.
    pub fn start_tls(ca: &TestCa) -> PrivateRedis {
        let port = free_port();
        let dir = scratch_dir("redis-tls");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--port", "0"])
            .arg("--tls-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(ca.dir.join("server.pem"))
            .arg("--tls-key-file")
            .arg(ca.dir.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(ca.ca_file())
            .args(["--tls-auth-clients", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian package redis-server)");
        wait_for_port(
            port,
            Duration::from_secs(30),
            "the private TLS redis-server",
        );
        PrivateRedis {
            port,
            dir,
            child: Some(child),
            extra: Vec::new(),
        }
    }

    /// Its `rediss://` URL (the certificate names `localhost`).
    pub fn tls_url(&self) -> String {
        format!("rediss://localhost:{}/0", self.port)
    }
}

/// A certificate authority of our own and a server certificate it signed
/// for `localhost` and 127.0.0.1, made with the `openssl` command.
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    /// Makes the CA and the server certificate.
    pub fn new() -> TestCa {
        let dir = scratch_dir("ca");
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .output()
                .expect("openssl runs");
            assert!(
                output.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=Flotilla test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("extensions file");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        // RabbitMQ reads them as the `rabbitmq` user.
        for file in ["ca.pem", "server.pem", "server.key"] {
            let _ = Command::new("chmod")
                .arg("644")
                .arg(dir.join(file))
                .status();
        }
        TestCa { dir }
    }

    /// The CA certificate (PEM), for `SSL_CERT_FILE`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `rabbitmq.conf` lines for a TLS listener on `port` with the server
    /// certificate.
    pub fn rabbit_conf(&self, port: u16) -> String {
        let path = |file: &str| self.dir.join(file).display().to_string();
        format!(
            "listeners.ssl.default = {port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n",
            path("ca.pem"),
            path("server.pem"),
            path("server.key"),
        )
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
