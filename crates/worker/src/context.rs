//! What a running task knows about itself.

use flotilla_proto::Config;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Passed to a task that takes one as its first parameter: its key, its
/// worker, whether it was cancelled, and the cluster's configuration.
#[derive(Clone, Debug)]
pub struct TaskContext {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    key: String,
    task: String,
    worker_id: String,
    config: Config,
    cancelled: AtomicBool,
    extension: Option<Arc<dyn Any + Send + Sync>>,
}

impl TaskContext {
    /// A context for running task `task` under `key` on `worker_id`.
    pub fn new(key: &str, task: &str, worker_id: &str, config: Config) -> Self {
        Self::with_extension(key, task, worker_id, config, None)
    }

    /// Like [`TaskContext::new`], with a value that libraries layered on the
    /// worker (the `flotilla` client) attach for their own use.
    pub fn with_extension(
        key: &str,
        task: &str,
        worker_id: &str,
        config: Config,
        extension: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Self {
        TaskContext {
            inner: Arc::new(Inner {
                key: key.to_owned(),
                task: task.to_owned(),
                worker_id: worker_id.to_owned(),
                config,
                cancelled: AtomicBool::new(false),
                extension,
            }),
        }
    }

    /// The running task's key.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The running task's registered name.
    pub fn task_name(&self) -> &str {
        &self.inner.task
    }

    /// Id of the worker running the task.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The cluster's configuration (broker, Redis, namespace).
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Whether the task was cancelled; a long synchronous task should check
    /// this now and then and return early.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Relaxed)
    }

    /// Marks the task cancelled.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Relaxed);
    }

    /// The extension attached by [`TaskContext::with_extension`].
    pub fn extension(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.inner.extension.as_ref()
    }
}
