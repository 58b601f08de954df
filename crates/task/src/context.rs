//! What a running task knows about itself.

use crate::state::{MissingState, State, WorkerState};
use flotilla_proto::{Config, TraceParent};
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Passed to a task that takes one as its first parameter: its key, its
/// worker, whether it was cancelled, its deadline, the cluster's
/// configuration, and the worker's shared [`state`](Self::state).
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
    deadline: Option<Instant>,
    traceparent: Option<TraceParent>,
    state: Arc<WorkerState>,
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
                deadline: None,
                traceparent: None,
                state: Arc::default(),
            }),
        }
    }

    /// The same context, with the instant at which the task's time limit
    /// runs out (`None`: no limit).
    pub fn with_deadline(self, deadline: Option<Instant>) -> Self {
        let inner = &self.inner;
        self.rebuilt(deadline, inner.traceparent, inner.state.clone())
    }

    /// The same context, in the trace a submission carried (its W3C
    /// `traceparent`; `None`: none, or a malformed one).
    pub fn with_traceparent(self, traceparent: Option<TraceParent>) -> Self {
        let inner = &self.inner;
        self.rebuilt(inner.deadline, traceparent, inner.state.clone())
    }

    /// The same context, lending the worker's `state` to the task (see
    /// [`TaskContext::state`]).
    pub fn with_state(self, state: Arc<WorkerState>) -> Self {
        let inner = &self.inner;
        self.rebuilt(inner.deadline, inner.traceparent, state)
    }

    fn rebuilt(
        &self,
        deadline: Option<Instant>,
        traceparent: Option<TraceParent>,
        state: Arc<WorkerState>,
    ) -> Self {
        let inner = &self.inner;
        TaskContext {
            inner: Arc::new(Inner {
                key: inner.key.clone(),
                task: inner.task.clone(),
                worker_id: inner.worker_id.clone(),
                config: inner.config.clone(),
                cancelled: AtomicBool::new(inner.cancelled.load(Ordering::Relaxed)),
                extension: inner.extension.clone(),
                deadline,
                traceparent,
                state,
            }),
        }
    }

    /// The worker's shared value of type `T` (see [`WorkerState`]), or an
    /// error naming `T` when the worker was started without one; a task
    /// returning it with `?` fails with that message. A task can also take a
    /// [`State<T>`] parameter instead.
    ///
    /// ```
    /// # use flotilla_task::{MissingState, TaskContext, WorkerState};
    /// struct Pool { size: usize }
    ///
    /// fn pool_size(ctx: &TaskContext) -> Result<usize, MissingState> {
    ///     Ok(ctx.state::<Pool>()?.size)
    /// }
    /// # let state = WorkerState::new().with(Pool { size: 4 });
    /// # let ctx = TaskContext::new("k", "t", "w", Default::default()).with_state(state.into());
    /// # assert_eq!(pool_size(&ctx).unwrap(), 4);
    /// # let bare = TaskContext::new("k", "t", "w", Default::default());
    /// # assert!(pool_size(&bare).unwrap_err().to_string().contains("Pool"));
    /// ```
    pub fn state<T: Send + Sync + 'static>(&self) -> Result<State<T>, MissingState> {
        self.inner.state.require::<T>()
    }

    /// All of the worker's shared state.
    pub fn worker_state(&self) -> &WorkerState {
        &self.inner.state
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

    /// When the task's time limit runs out, if it has one (set per
    /// submission with `Submit::timeout`, or by default with
    /// `#[flotilla::task(timeout = "30s")]`). At the deadline an async task
    /// is stopped and a synchronous one abandoned (its result discarded):
    /// a task that can wind down earlier, saving partial work, should watch
    /// this.
    ///
    /// ```
    /// # use flotilla_task::TaskContext;
    /// # use std::time::{Duration, Instant};
    /// fn crunch(ctx: &TaskContext, items: &[u64]) -> u64 {
    ///     let mut sum = 0;
    ///     for item in items {
    ///         // Stop with a partial sum when less than a second is left.
    ///         if ctx.time_left().is_some_and(|left| left < Duration::from_secs(1)) {
    ///             break;
    ///         }
    ///         sum += item;
    ///     }
    ///     sum
    /// }
    /// # let ctx = TaskContext::new("k", "t", "w", flotilla_proto::Config::default())
    /// #     .with_deadline(Some(Instant::now() + Duration::from_secs(60)));
    /// # assert_eq!(crunch(&ctx, &[1, 2, 3]), 6);
    /// ```
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// The time left until [`deadline`](Self::deadline): `None` without a
    /// limit, `Some(Duration::ZERO)` once it passed.
    pub fn time_left(&self) -> Option<Duration> {
        self.inner
            .deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// The W3C trace context the task was submitted in: the trace id and
    /// the span id of the submitter (a client's span, or the task that
    /// submitted this one). `None` when the submission carried none.
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.inner.traceparent
    }

    /// The id of the trace the task runs in, as 32 lowercase hex digits
    /// (the form tracing back ends show).
    pub fn trace_id(&self) -> Option<String> {
        self.inner.traceparent.map(|parent| parent.trace_id_hex())
    }

    /// The extension attached by [`TaskContext::with_extension`].
    pub fn extension(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.inner.extension.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_is_visible_and_counts_down() {
        let ctx = TaskContext::new("k", "t", "w", Config::default());
        assert_eq!(ctx.deadline(), None);
        assert_eq!(ctx.time_left(), None);

        let deadline = Instant::now() + Duration::from_secs(60);
        let limited = ctx.with_deadline(Some(deadline));
        assert_eq!(limited.deadline(), Some(deadline));
        let left = limited.time_left().unwrap();
        assert!(left > Duration::from_secs(59) && left <= Duration::from_secs(60));
        assert_eq!(limited.key(), "k");

        let past = limited.with_deadline(Some(Instant::now() - Duration::from_secs(1)));
        assert_eq!(past.time_left(), Some(Duration::ZERO));
    }

    #[test]
    fn the_trace_survives_a_new_deadline() {
        let ctx = TaskContext::new("k", "t", "w", Config::default());
        assert_eq!(ctx.traceparent(), None);
        assert_eq!(ctx.trace_id(), None);
        let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        let traced = ctx
            .with_traceparent(Some(parent))
            .with_deadline(Some(Instant::now()));
        assert_eq!(traced.traceparent(), Some(parent));
        assert_eq!(
            traced.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let deadline = Some(Instant::now() + Duration::from_secs(5));
        let later = traced
            .with_deadline(deadline)
            .with_traceparent(Some(parent));
        assert_eq!(later.deadline(), deadline);
    }
}
