//! Chaos across the nodes of a RabbitMQ cluster (`rabbitmq-node-down`): the
//! namespace's queues are quorum queues on a private 3-node cluster, every
//! process is given the three nodes' URLs, and the node that leads the task
//! queue is stopped mid-workload. The queue fails over to a new leader on
//! the two nodes left, the processes connected to the stopped node
//! reconnect to another, and every future resolves with its value.
//!
//! And across the nodes of a Redis Cluster (`redis-master-failover`): the
//! master that holds the leader lease (and a third of the task keys) is
//! killed mid-workload; its replica takes over; nothing hangs, and a write
//! the dead master acknowledged but had not replicated surfaces as a clear
//! loss error.

use super::state::{outcomes, Outcomes};
use super::*;
use support::services::{RabbitCluster, RedisCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_the_node_leading_the_task_queue_stops_and_the_quorum_queue_fails_over() {
    let booting = Instant::now();
    let cluster = RabbitCluster::start(3);
    eprintln!(
        "a 3-node RabbitMQ cluster booted in {:.1} s",
        booting.elapsed().as_secs_f64()
    );
    let mut config = support::fresh_config("chaos-rabbit-node");
    config.amqp_url = cluster.url();
    config.queue_type = flotilla_proto::QueueType::Quorum;
    let names = config.names();
    let processes = Processes::start_with(config, None, None).await;

    let (kind, leader) = cluster.queue_leader(&names.tasks_queue(), 0);
    assert_eq!(kind, "quorum", "the task queue is a quorum queue");
    let leader = leader.expect("the task queue has a leader among the nodes");
    for queue in [
        names.scheduler_queue(),
        names.scheduler_events_queue(),
        names.dead_letter_queue(),
    ] {
        assert_eq!(
            cluster.queue_leader(&queue, 0).0,
            "quorum",
            "{queue} is a quorum queue"
        );
    }

    let started = Instant::now();
    let salt = 7_000_000;
    let workload = submit_workload(&processes.client, salt);
    // Mid-workload: the slow tasks take 20 ms each on four slots.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let down = &cluster.nodes[leader];
    tokio::task::block_in_place(|| down.ctl(&["stop_app"]));
    let survivor = (leader + 1) % cluster.nodes.len();
    // The two nodes left elect a new leader of the task queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, now) =
            tokio::task::block_in_place(|| cluster.queue_leader(&names.tasks_queue(), survivor));
        if now.is_some_and(|now| now != leader) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the task queue has no new leader after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    processes
        .finish("rabbitmq-node-down", 1, workload, salt, started)
        .await;
    drop(cluster);
}

/// The master holding the leader lease (and a third of the keys) is
/// SIGKILLed 300 ms into the workload; its replica takes over within a few
/// seconds and the killed node comes back as a replica. Every future
/// resolves: with its value, or with a clear loss error for a write the
/// dead master acknowledged but had not replicated (and its dependents).
/// `CHAOS_LOGS=<dir>` keeps the processes' logs, `FLOTILLA_KEEP_CLUSTER=1`
/// the nodes' data and logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_master_failover_mid_workload() {
    if std::env::var_os("RUST_LOG").is_some() {
        flotilla_runtime::cli::init_logging();
    }
    let mut redis = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let mut config = support::fresh_config("chaos-redis-failover");
    config.redis_url = redis.url();
    let names = config.names();
    // CHAOS_LOGS=<dir> keeps the processes' logs there.
    let logs = std::env::var_os("CHAOS_LOGS").map(std::path::PathBuf::from);
    let processes = Processes::start_with(config, None, logs.as_deref()).await;

    let started = Instant::now();
    let salt = 9_000_000;
    let workload = submit_workload(&processes.client, salt);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The worst master to lose: the leader lease's, with a third of the
    // task keys.
    let victim = redis.master_of(&names.leader_key());
    let failover = tokio::task::block_in_place(|| {
        redis.kill(victim);
        let failover = redis.wait_for_failover(victim);
        // Back as a replica, so that the cluster is whole again.
        redis.restart(victim);
        failover
    });

    let mut out = outcomes(&workload.slow, |i| salt + i as i64, started).await;
    let chains = outcomes(&workload.chains, |c| salt + c as i64 + 50, started).await;
    let sums = outcomes(
        &workload.sums,
        |s| {
            (s as i64 * 5..s as i64 * 5 + 5)
                .map(|c| salt + c + 50)
                .sum::<i64>()
        },
        started,
    )
    .await;
    for other in [chains, sums] {
        out = Outcomes {
            wrong: out.wrong + other.wrong,
            lost: out.lost + other.lost,
            unresolved: out.unresolved + other.unresolved,
            slowest: out.slowest.max(other.slowest),
            examples: [out.examples, other.examples].concat(),
            losses: [out.losses, other.losses].concat(),
        };
    }
    let tasks = workload.tasks;
    drop(workload);
    let duplicated = processes.close().await;
    if !out.examples.is_empty() {
        eprintln!("outcomes: {:?}", out.examples);
    }
    if !out.losses.is_empty() {
        eprintln!("losses (first of each kind of future): {:?}", out.losses);
    }
    println!(
        "chaos redis-master-failover: faults=1 tasks={tasks} lost={} duplicated={duplicated} unresolved={} max_resolve_s={:.2} failover_s={:.2}",
        out.lost,
        out.unresolved,
        out.slowest,
        failover.as_secs_f64()
    );
    drop(redis);
    // Replication is asynchronous: a write the dead master acknowledged
    // but had not passed on is gone, and its future ends with a clear loss
    // error (`lost`, reported). None hangs, and none gets a wrong value or
    // another error.
    assert_eq!((out.wrong, out.unresolved), (0, 0), "{:?}", out.examples);
}
