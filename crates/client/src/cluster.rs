//! `LocalCluster`: a scheduler and workers inside this process, against the
//! configured RabbitMQ and Redis — Dask's `Client()` with no address.
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! fn add(x: i64, y: i64) -> i64 { x + y }
//!
//! # async fn demo() -> flotilla::Result<()> {
//! let cluster = LocalCluster::builder().workers(2).start().await?;
//! let client = cluster.client().await?;
//! assert_eq!(client.submit(add, (1, 2)).await?, 3);
//! cluster.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Its workers share this process, so they never retire: a synchronous task
//! past its hard time limit is reported `TimedOut` and its thread runs on,
//! without a slot (`WorkerOptions::retire_when_stuck` stays off; only a
//! worker process replaces itself, see `docs/operations.md`, "Time limits").

use crate::client::Client;
use crate::error::{Error, Result};
use crate::purge::purge;
use flotilla_proto::Config;
use flotilla_scheduler::SchedulerHandle;
use flotilla_worker::{WorkerHandle, WorkerOptions, WorkerState};
use std::sync::Arc;

/// Options for a [`LocalCluster`].
#[derive(Debug, Clone)]
#[must_use = "start the cluster with .start()"]
pub struct LocalClusterBuilder {
    config: Option<Config>,
    namespace: Option<String>,
    workers: usize,
    nthreads: usize,
    purge: bool,
    state: Arc<WorkerState>,
}

impl LocalClusterBuilder {
    /// Cluster settings (default: from the environment).
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// The namespace, overriding the configuration's.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// How many workers (default 2).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Tasks each worker runs at once (default 1).
    pub fn nthreads(mut self, nthreads: usize) -> Self {
        self.nthreads = nthreads.max(1);
        self
    }

    /// The state lent to the workers' tasks (a `State<T>` parameter or
    /// `TaskContext::state`; default: none). In-process, every worker of
    /// the cluster shares the same values.
    ///
    /// ```no_run
    /// # async fn demo() -> flotilla::Result<()> {
    /// use flotilla::WorkerState;
    /// use std::sync::atomic::AtomicU64;
    ///
    /// let cluster = flotilla::LocalCluster::builder()
    ///     .state(WorkerState::new().with(AtomicU64::new(0)))
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn state(mut self, state: WorkerState) -> Self {
        self.state = Arc::new(state);
        self
    }

    /// Deletes the namespace's queues and keys on shutdown (for tests and
    /// throwaway namespaces; default `false`).
    pub fn purge_on_shutdown(mut self, purge: bool) -> Self {
        self.purge = purge;
        self
    }

    /// Starts the scheduler and the workers.
    pub async fn start(self) -> Result<LocalCluster> {
        let mut config = match self.config {
            Some(config) => config,
            None => Config::from_env()?,
        };
        if let Some(namespace) = self.namespace {
            config.namespace = namespace;
        }
        config.validate()?;
        let scheduler = SchedulerHandle::spawn(config.clone())
            .await
            .map_err(|e| Error::Cluster(format!("scheduler: {e}")))?;
        let mut cluster = LocalCluster {
            config,
            scheduler: Some(scheduler),
            workers: Vec::new(),
            nthreads: self.nthreads,
            purge: self.purge,
            state: self.state,
        };
        for _ in 0..self.workers {
            cluster.add_worker().await?;
        }
        Ok(cluster)
    }
}

/// A scheduler and workers running in this process.
#[derive(Debug)]
pub struct LocalCluster {
    config: Config,
    scheduler: Option<SchedulerHandle>,
    workers: Vec<WorkerHandle>,
    nthreads: usize,
    purge: bool,
    state: Arc<WorkerState>,
}

impl LocalCluster {
    /// Options, starting from 2 single-threaded workers and the environment's
    /// configuration.
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder {
            config: None,
            namespace: None,
            workers: 2,
            nthreads: 1,
            purge: false,
            state: Arc::default(),
        }
    }

    /// The cluster's configuration (to connect other clients).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A new client of this cluster.
    pub async fn client(&self) -> Result<Client> {
        Client::connect(self.config.clone()).await
    }

    /// Starts one more worker; returns its id.
    pub async fn add_worker(&mut self) -> Result<String> {
        self.add_worker_with_resources(&[]).await
    }

    /// Starts one more worker offering abstract resources (`[("GPU", 1)]`);
    /// returns its id.
    pub async fn add_worker_with_resources(&mut self, resources: &[(&str, u64)]) -> Result<String> {
        let mut options = WorkerOptions::new(self.config.clone());
        options.resources = resources.iter().map(|(n, a)| (n.to_string(), *a)).collect();
        options.nthreads = self.nthreads;
        options.state = self.state.clone();
        options.name = Some(format!("local-{}", self.workers.len()));
        // In-process: there is no process of its own to replace.
        options.retire_when_stuck = false;
        let worker = WorkerHandle::spawn(options)
            .await
            .map_err(|e| Error::Cluster(format!("worker: {e}")))?;
        let id = worker.id().to_owned();
        self.workers.push(worker);
        Ok(id)
    }

    /// Ids of the running workers.
    pub fn worker_ids(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.id().to_owned()).collect()
    }

    /// Kills worker `id` at once, as if its process died (its running tasks
    /// are redelivered, its actors are lost); `false` if no such worker runs.
    pub fn kill_worker(&mut self, id: &str) -> bool {
        match self.workers.iter().position(|w| w.id() == id) {
            Some(index) => {
                self.workers.remove(index).kill();
                true
            }
            None => false,
        }
    }

    /// Stops the workers and the scheduler (and purges the namespace when
    /// asked to).
    pub async fn shutdown(mut self) -> Result<()> {
        for worker in self.workers.drain(..) {
            let _ = worker.shutdown().await;
        }
        if let Some(scheduler) = self.scheduler.take() {
            let _ = scheduler.shutdown().await;
        }
        if self.purge {
            purge(&self.config).await?;
        }
        Ok(())
    }
}
