//! Tasks that submit tasks: a task taking a [`TaskContext`] reaches the
//! cluster through [`TaskContextExt::client`].
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[flotilla::task]
//! async fn fan_out(ctx: TaskContext, n: i64) -> flotilla::Result<i64> {
//!     let client = ctx.client().await?;
//!     let parts = client.map(double, (0..n).map(|i| (i,)));
//!     Ok(client.gather(&parts).await?.iter().sum())
//! }
//!
//! #[flotilla::task]
//! fn double(x: i64) -> i64 { 2 * x }
//! ```

use crate::client::Client;
use crate::error::Result;
use flotilla_proto::Config;
use flotilla_task::TaskContext;
use flotilla_worker::ContextExtension;
use std::any::Any;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// One client per worker, connected on first use by any of its tasks.
struct WorkerClient {
    config: Config,
    client: OnceCell<Client>,
}

fn make_worker_client(config: &Config) -> Arc<dyn Any + Send + Sync> {
    Arc::new(WorkerClient {
        config: config.clone(),
        client: OnceCell::new(),
    })
}

inventory::submit! {
    ContextExtension::new(make_worker_client)
}

/// What the `flotilla` client adds to a task's [`TaskContext`].
pub trait TaskContextExt {
    /// A client of the cluster running the task, for submitting, mapping,
    /// gathering and waiting from inside it (Dask's `get_client()`). When
    /// the task runs in a trace, the tasks it submits carry the same trace
    /// id, with a new span id (see [`Client::with_traceparent`]).
    fn client(&self) -> impl std::future::Future<Output = Result<Client>> + Send;
}

impl TaskContextExt for TaskContext {
    async fn client(&self) -> Result<Client> {
        let client = match self
            .extension()
            .and_then(|extension| extension.downcast_ref::<WorkerClient>())
        {
            Some(worker) => worker
                .client
                .get_or_try_init(|| Client::connect(worker.config.clone()))
                .await
                .cloned(),
            None => Client::connect(self.config().clone()).await,
        }?;
        // Tasks it submits stay in the task's trace, under a span of its own.
        Ok(match self.traceparent() {
            Some(parent) => client.with_traceparent(parent.child()),
            None => client,
        })
    }
}
