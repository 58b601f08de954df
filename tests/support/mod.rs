//! Test helpers: a fresh namespace per test with an in-process scheduler and
//! workers against the real RabbitMQ and Redis, purged afterwards (also when
//! the test fails).

#![allow(dead_code, unreachable_pub)]

pub mod process;
pub mod services;

use flotilla::{Client, Config, LocalCluster};
use std::path::PathBuf;

/// A namespace nobody else uses.
pub fn fresh_namespace(prefix: &str) -> String {
    let id = flotilla_proto::new_id();
    format!("t-{prefix}-{}", &id[..12])
}

/// Configuration for a fresh namespace on the shared services.
pub fn fresh_config(prefix: &str) -> Config {
    let mut config = Config::from_env().expect("FLOTILLA_* environment");
    config.namespace = fresh_namespace(prefix);
    config
}

/// A running in-process cluster and a client of it.
pub struct TestCluster {
    pub cluster: Option<LocalCluster>,
    pub client: Client,
    pub config: Config,
}

impl TestCluster {
    pub async fn start(prefix: &str, workers: usize) -> TestCluster {
        Self::start_with(fresh_config(prefix), workers, 1).await
    }

    pub async fn start_with(config: Config, workers: usize, nthreads: usize) -> TestCluster {
        // RUST_LOG=... shows the in-process scheduler's and workers' logs.
        if std::env::var_os("RUST_LOG").is_some() {
            flotilla_runtime::cli::init_logging();
        }
        let cluster = LocalCluster::builder()
            .config(config.clone())
            .workers(workers)
            .nthreads(nthreads)
            .purge_on_shutdown(true)
            .start()
            .await
            .expect("local cluster starts");
        let client = cluster.client().await.expect("client connects");
        TestCluster {
            cluster: Some(cluster),
            client,
            config,
        }
    }

    /// Closes the client, stops the cluster and deletes the namespace.
    pub async fn stop(mut self) {
        // First the client: its lease renewal would otherwise write the
        // namespace's lease set again after the purge.
        let _ = self.client.clone().close().await;
        if let Some(cluster) = self.cluster.take() {
            cluster.shutdown().await.expect("cluster shuts down");
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.cluster.is_some() {
            // The test failed before stop(): still leave nothing behind.
            let config = self.config.clone();
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().expect("runtime");
                let _ = runtime.block_on(flotilla::purge(&config));
            })
            .join();
        }
    }
}

/// Path of a binary or example built in this workspace's target directory.
pub fn target_binary(relative: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop(); // deps/
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(relative)
}

/// Number of Redis keys of the namespace matching `<ns>:<kind>:*`
/// (`r` results, `h` holders).
pub async fn count_keys(config: &Config, kind: &str) -> usize {
    // Every master of a Redis Cluster, through the product's own walk.
    let redis = flotilla_runtime::transport::connect_redis(&config.redis_url)
        .await
        .expect("redis");
    let mut pages = redis.scan(format!("{}:{kind}:*", config.namespace));
    let mut keys = std::collections::HashSet::new();
    while let Some(page) = pages.next_page().await.expect("scan") {
        keys.extend(page);
    }
    keys.len()
}

/// Waits until the namespace holds no result and no holders keys; returns
/// how long it took, or panics with what is left after `limit`.
pub async fn wait_until_freed(config: &Config, limit: std::time::Duration) -> std::time::Duration {
    let started = std::time::Instant::now();
    loop {
        let results = count_keys(config, "r").await;
        let holders = count_keys(config, "h").await;
        let specs = count_keys(config, "s").await;
        if results == 0 && holders == 0 && specs == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "after {limit:?}, {results} result keys, {holders} holders sets and {specs} task specs are left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Messages ready in `queue`, by a passive declare (the queue must exist).
pub async fn queue_depth(channel: &lapin::Channel, queue: &str) -> u32 {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .expect("the queue exists")
        .message_count()
}
