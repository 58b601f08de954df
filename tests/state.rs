//! Shared per-worker state: values a worker builds once and lends to its
//! tasks (`State<T>` parameters and `TaskContext::state`).

mod support;

use flotilla::{MissingState, State, TaskContext, WorkerState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use support::TestCluster;

/// A counter every task of the worker adds to.
pub struct Hits(AtomicU64);

/// Something built once, read by tasks.
pub struct Model {
    name: String,
}

/// A type no worker of the test is given.
pub struct Unprovided;

/// Counts a call on the worker's shared counter; returns the count after it.
/// (`call` makes each submission's key its own.)
#[flotilla::task]
fn hit(hits: State<Hits>, _call: u64) -> u64 {
    hits.0.fetch_add(1, Ordering::SeqCst) + 1
}

/// Reads the worker's model through the context, among real arguments.
#[flotilla::task]
async fn model_name(ctx: TaskContext, prefix: String) -> Result<String, MissingState> {
    let model = ctx.state::<Model>()?;
    Ok(format!("{prefix}{}", model.name))
}

/// Asks for state the worker lacks.
#[flotilla::task]
fn needs_unprovided(_missing: State<Unprovided>, x: i64) -> i64 {
    x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_share_the_workers_state_and_missing_state_fails_clearly() {
    // State parameters are not arguments: the clients' view is unchanged.
    let _: <hit as flotilla::Task>::Args = (0_u64,);
    let _: <needs_unprovided as flotilla::Task>::Args = (1_i64,);

    let hits = Arc::new(Hits(AtomicU64::new(0)));
    let mut state = WorkerState::new().with(Model {
        name: "small".into(),
    });
    state.insert_arc(hits.clone());
    let config = support::fresh_config("state");
    let cluster = flotilla::LocalCluster::builder()
        .config(config.clone())
        .workers(2)
        .nthreads(2)
        .state(state)
        .purge_on_shutdown(true)
        .start()
        .await
        .expect("local cluster starts");
    let client = cluster.client().await.expect("client connects");
    let test = TestCluster {
        cluster: Some(cluster),
        client: client.clone(),
        config,
    };

    // Every call, on either worker, counts on the one shared counter: the
    // counts returned are 1..=20, each once.
    let futures: Vec<_> = (0..20_u64)
        .map(|call| client.submit(hit, (call,)))
        .collect();
    let mut counts = client.gather(&futures).await.unwrap();
    counts.sort_unstable();
    assert_eq!(counts, (1..=20).collect::<Vec<u64>>());
    assert_eq!(hits.0.load(Ordering::SeqCst), 20);

    let name = client.submit(model_name, ("model: ".to_string(),));
    assert_eq!(name.result().await.unwrap(), "model: small");

    // Missing state fails the task at once, with an error naming the type.
    let missing = client.submit(needs_unprovided, (7,));
    let error = match tokio::time::timeout(std::time::Duration::from_secs(30), missing.result())
        .await
        .expect("a task lacking state fails, it does not hang")
    {
        Err(flotilla::Error::Task(error)) => error,
        other => panic!("expected a task error, got {other:?}"),
    };
    assert_eq!(error.type_name(), flotilla::MISSING_STATE, "{error}");
    assert!(
        error
            .message()
            .contains("no state of type `state::Unprovided`"),
        "{error}"
    );
    assert!(error.message().contains("state::Model"), "{error}");

    test.stop().await;
}
