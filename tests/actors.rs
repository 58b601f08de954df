//! Tasks that submit tasks (and, with actors, stateful services on workers).

mod common;

use common::TestCluster;
use flotilla::prelude::*;
use flotilla_examples::{fan_out, recursive_compute};

#[tokio::test]
async fn dynamic_task_submission_runs_depth_five_on_two_single_slot_workers() {
    // 63 tasks, 31 of which wait on their children: without lending their
    // slots back this deadlocks on two slots.
    let t = TestCluster::start("dynamic", 2).await;
    let data: Vec<i64> = (1..=1000).collect();
    let result = t
        .client
        .submit(recursive_compute, (data.clone(), 5))
        .result_timeout(Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(result, data.iter().sum::<i64>());
    t.stop().await;
}

#[tokio::test]
async fn a_task_maps_and_gathers_through_its_context() {
    let t = TestCluster::start("fanout", 1).await;
    let sum = t
        .client
        .submit(fan_out, (100,))
        .result_timeout(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(sum, (0..100).map(|i| 2 * i).sum::<i64>());
    t.stop().await;
}
