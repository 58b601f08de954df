//! The basics against a RabbitMQ cluster: a private 3-node cluster (private
//! node names, ports and data directories, joined with `rabbitmqctl
//! join_cluster`, see `support::services::RabbitCluster`), the namespace's
//! shared queues declared as quorum queues, and every process given the
//! three nodes' URLs. Futures (a diamond, a map gathered, an error and its
//! dependents, as_completed), lifecycle (cancel, retry) and the
//! coordination primitives behave as on one node. Its chaos (the node that
//! leads the task queue stopped mid-workload) is in the chaos suite,
//! `rabbitmq-node-down`.
//!
//! And the basics against a Redis Cluster (3 masters, 3 replicas, on
//! private ports, see `flotilla_runtime::testing::RedisCluster`): the
//! scheduler, the workers and the client given its `redis+cluster://` URL.

mod support;

use flotilla::prelude::*;
use flotilla::ErrorKind;
use flotilla_examples::coordination::{consumer, critical_section, producer, setter, waiter};
use flotilla_examples::{add, add_u64, inc, might_fail, sleep_then_note, total};
use flotilla_proto::QueueType;
use support::services::{RabbitCluster, RedisCluster};
use support::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn futures_lifecycle_and_primitives_work_on_a_three_node_cluster_with_quorum_queues() {
    flotilla_examples::link();
    let rabbit = tokio::task::spawn_blocking(|| RabbitCluster::start(3))
        .await
        .unwrap();
    let mut config = support::fresh_config("rabbit-cluster");
    config.amqp_url = rabbit.url();
    config.queue_type = QueueType::Quorum;
    let names = config.names();
    let t = TestCluster::start_with(config, 2, 2).await;
    let kinds = tokio::task::block_in_place(|| {
        [names.tasks_queue(), names.scheduler_queue()].map(|queue| rabbit.queue_leader(&queue, 1))
    });
    for (kind, leader) in kinds {
        assert_eq!(kind, "quorum");
        assert!(leader.is_some(), "a quorum queue has a leader");
    }
    futures_and_lifecycle(&t.client, &names).await;
    primitives(&t.client, "cluster").await;
    t.stop().await;
    drop(rabbit);
}

/// Futures, lifecycle and the primitives on a Redis Cluster: every task's
/// keys, the namespace's singletons and the batches that touch them spread
/// over three masters; a primitive's blocking waits go to its slot's master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn futures_lifecycle_and_primitives_work_on_a_redis_cluster() {
    flotilla_examples::link();
    let redis = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let mut config = support::fresh_config("redis-cluster");
    config.redis_url = redis.url();
    let names = config.names();
    let t = TestCluster::start_with(config.clone(), 2, 2).await;
    let c = &t.client;
    futures_and_lifecycle(c, &names).await;
    primitives(c, "rc").await;
    // Waits that time out, on the primitive's master.
    let permits = Semaphore::new(c, "rc-one", 1);
    permits.acquire().await.unwrap();
    assert!(!permits
        .acquire_timeout(Duration::from_millis(300))
        .await
        .unwrap());
    permits.release().await.unwrap();
    let empty: Queue<i64> = Queue::new(c, "rc-empty");
    let waited = std::time::Instant::now();
    assert!(matches!(
        empty.get_timeout(Duration::from_millis(300)).await,
        Err(Error::Timeout { .. })
    ));
    assert!(waited.elapsed() >= Duration::from_millis(300));
    empty.delete().await.unwrap();
    // Released futures (all dropped by now) free their keys on every
    // master.
    support::wait_until_freed(&config, Duration::from_secs(30)).await;
    t.stop().await;
    drop(redis);
}

/// A diamond, a map gathered, an error and its dependent, as_completed; a
/// cancelled task and its dependent; a retried failure.
async fn futures_and_lifecycle(c: &Client, names: &flotilla_proto::Names) {
    let a = c.submit(inc, (1,));
    let (b, d) = (c.submit(inc, (&a,)), c.submit(add, (&a, 10)));
    let top = c.submit(add, (&b, &d));
    assert_eq!(
        top.result_timeout(Duration::from_secs(30)).await.unwrap(),
        15
    );
    let many = c.map(inc, (0..500_i64).map(|i| (i,)));
    let values = c.gather(&many).await.unwrap();
    assert_eq!(values, (1..=500).collect::<Vec<i64>>());
    let sum = c.submit(total, (values,));
    assert_eq!(sum.await.unwrap(), (1..=500).sum::<i64>());
    let failed = c.submit(might_fail, (-1,));
    let after = c.submit(inc, (&failed,));
    match after.result_timeout(Duration::from_secs(30)).await {
        Err(Error::Task(error)) => assert_eq!(error.kind(), ErrorKind::User),
        other => panic!("a dependent of a failed task fails with its error: {other:?}"),
    }
    let mut seen = Vec::new();
    let mut completed =
        flotilla::as_completed(c.map(inc, (0..20_i64).map(|i| (i,)))).with_results();
    while let Some((_, value)) = completed.next().await {
        seen.push(value.unwrap());
    }
    seen.sort();
    assert_eq!(seen, (1..=20).collect::<Vec<i64>>());

    let sleeping = c.submit(
        sleep_then_note,
        (format!("{}-sleeper", names.namespace()), 20_000),
    );
    let child = c.submit(add_u64, (&sleeping, 1));
    sleeping.cancel();
    assert!(matches!(sleeping.result().await, Err(Error::Cancelled(_))));
    match child.result_timeout(Duration::from_secs(30)).await {
        Err(Error::Task(error)) => assert_eq!(error.kind(), ErrorKind::Cancelled),
        other => panic!("a dependent of a cancelled task is cancelled: {other:?}"),
    }
    let flaky = c.submit(might_fail, (-2,));
    assert!(flaky.result_timeout(Duration::from_secs(30)).await.is_err());
    flaky.retry();
    assert!(matches!(
        flaky.result_timeout(Duration::from_secs(30)).await,
        Err(Error::Task(_))
    ));
}

/// The primitives (named `<prefix>-…`), used from tasks and from the
/// client: a Queue between tasks, Lock critical sections with a Variable,
/// an Event, a Semaphore.
async fn primitives(c: &Client, prefix: &str) {
    let queue: Queue<i64> = Queue::new(c, &format!("{prefix}-queue"));
    let _producer = c.submit(producer, (queue.name(), 10));
    let consumed = c.submit(consumer, (queue.name(), 10_usize));
    assert_eq!(
        consumed
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
        (0..10).collect::<Vec<i64>>()
    );
    let (lock, counter) = (format!("{prefix}-lock"), format!("{prefix}-counter"));
    let sections = c.map(
        critical_section,
        (0..10_u32).map(|call| (lock.clone(), counter.clone(), call)),
    );
    c.gather(&sections).await.unwrap();
    let count: Variable<u64> = Variable::new(c, &counter);
    assert_eq!(count.get().await.unwrap(), 10);
    let event = format!("{prefix}-event");
    let woken = c.submit(waiter, (event.clone(),));
    let _set = c.submit(setter, (event, 200_u64));
    assert_eq!(
        woken.result_timeout(Duration::from_secs(30)).await.unwrap(),
        "Event occurred"
    );
    let permits = Semaphore::new(c, &format!("{prefix}-semaphore"), 2);
    permits.acquire().await.unwrap();
    permits.release().await.unwrap();
    queue.delete().await.unwrap();
}
