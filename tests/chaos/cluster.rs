//! Chaos across the nodes of a RabbitMQ cluster (`rabbitmq-node-down`): the
//! namespace's queues are quorum queues on a private 3-node cluster, every
//! process is given the three nodes' URLs, and the node that leads the task
//! queue is stopped mid-workload. The queue fails over to a new leader on
//! the two nodes left, the processes connected to the stopped node
//! reconnect to another, and every future resolves with its value.

use super::*;
use support::services::RabbitCluster;

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
