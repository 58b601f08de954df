//! A client program: submits the project's tasks to the cluster named by
//! `FLOTILLA_AMQP_URL`, `FLOTILLA_REDIS_URL` and `FLOTILLA_NAMESPACE` (and
//! `FLOTILLA_SECRET` when the cluster signs its messages), and checks what
//! comes back.

use flotilla::prelude::*;
use my_tasks::{add, greet, might_fail, summarize, worker_of, Summary};

#[tokio::main]
async fn main() -> flotilla::Result<()> {
    let client = Client::from_env().await?;

    // A future is returned at once; passing it to another task makes that
    // task wait for it in the cluster.
    let a = client.submit(add, (1, 2));
    let b = client.submit(add, (&a, 10));
    let c = client.submit(add, (b, 100)).await?;
    assert_eq!(c, 113);

    // Many tasks at once, their results gathered by another task.
    let doubles = client.map(add, (0..100).map(|i| (i, i)));
    let summary = client.submit(summarize, (doubles,)).await?;
    assert_eq!(
        summary,
        Summary {
            count: 100,
            total: 9900
        }
    );

    // A task's error comes back as a value.
    match client.submit(might_fail, (-5,)).await {
        Err(Error::Task(e)) => assert_eq!(e.message(), "Negative value"),
        other => panic!("expected the task's error, got {other:?}"),
    }
    assert_eq!(client.submit(might_fail, (5,)).await?, 25);

    // The worker's shared state fills `greet`'s `State<Settings>`.
    let greeting = client.submit(greet, ("Ada".to_string(),)).await?;
    assert_eq!(greeting, "Hello, Ada!");

    let ran_on = client.map(worker_of, (0..8).map(|i| (200 + i,)));
    let mut workers = client.gather(&ran_on).await?;
    workers.sort();
    workers.dedup();
    eprintln!(
        "my-client: add chain = {c}, summary = {summary:?}, workers used = {}",
        workers.len()
    );
    Ok(())
}
