//! Tasks that submit tasks (and, with actors, stateful services on workers).

mod support;

use flotilla::prelude::*;
use flotilla_examples::{await_reference, fan_out, recursive_compute, slow_identity};
use support::TestCluster;

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
async fn a_future_passed_as_a_value_is_awaited_inside_the_task() {
    let t = TestCluster::start("futureref", 1).await;
    let slow = t.client.submit(slow_identity, (41, 400));
    let reader = t.client.submit(await_reference, (&slow,));
    // The reader starts at once (it doesn't wait for `slow`), lends its slot
    // while awaiting, and the key stays held for it even if we let go.
    drop(slow);
    assert_eq!(
        reader
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap(),
        42
    );
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

// ---------------------------------------------------------------- actors

use flotilla::{ActorProxy, ErrorKind};
use flotilla_examples::actors::Counter;
use flotilla_examples::{add, total};
use std::time::Instant;

const LIMIT: Duration = Duration::from_secs(30);

/// The seed's "Actors" example.
#[tokio::test]
async fn the_seed_counter_counts_two_increments() {
    let t = TestCluster::start("actor-seed", 2).await;
    let counter = t.client.submit_actor(Counter::new, ()).await.unwrap();
    let future1 = counter.increment();
    let future2 = counter.increment();
    let result = counter.get_count().result_timeout(LIMIT).await.unwrap();
    assert_eq!(result, 2);
    assert_eq!(future1.await.unwrap(), 1);
    assert_eq!(future2.await.unwrap(), 2);

    // Constructors take arguments.
    let other = t
        .client
        .submit_actor(Counter::starting_at, (40,))
        .await
        .unwrap();
    assert_eq!(other.increment().await.unwrap(), 41);
    assert_eq!(counter.get_count().await.unwrap(), 2, "actors are separate");
    t.stop().await;
}

#[tokio::test]
async fn calls_run_one_at_a_time_in_call_order() {
    let t = TestCluster::start("actor-order", 1).await;
    let counter = t.client.submit_actor(Counter::new, ()).await.unwrap();
    // Earlier calls sleep longer: run concurrently, they would finish
    // in reverse.
    let calls: Vec<_> = (0..10)
        .map(|i| counter.record_after(i, (10 - i as u64) * 5))
        .collect();
    let increments: Vec<_> = (0..200).map(|_| counter.increment()).collect();
    assert_eq!(
        t.client.gather(&increments).await.unwrap(),
        (1..=200).collect::<Vec<i64>>()
    );
    for call in calls {
        assert!(call.done(), "calls made earlier are answered earlier");
    }
    assert_eq!(
        counter.recorded().await.unwrap(),
        (0..10).collect::<Vec<_>>()
    );
    t.stop().await;
}

#[tokio::test]
async fn sync_async_and_failing_methods() {
    let t = TestCluster::start("actor-methods", 1).await;
    let counter = t.client.submit_actor(Counter::new, ()).await.unwrap();
    assert_eq!(counter.add(5).await.unwrap(), 5);
    let error = counter.add(-1).await.unwrap_err();
    let task_error = error.task_error().expect("a task error");
    assert_eq!(task_error.kind(), ErrorKind::User);
    assert_eq!(task_error.message(), "cannot add -1: negative");
    let panicked = counter.explode("boom".into()).await.unwrap_err();
    assert_eq!(panicked.task_error().unwrap().kind(), ErrorKind::Panic);
    assert!(panicked.to_string().contains("boom"), "{panicked}");
    // The actor survives its errors.
    assert_eq!(counter.get_count().await.unwrap(), 5);
    t.stop().await;
}

#[tokio::test]
async fn actor_futures_are_first_class_futures() {
    let t = TestCluster::start("actor-futures", 2).await;
    let counter = t.client.submit_actor(Counter::new, ()).await.unwrap();
    let calls: Vec<_> = (0..5).map(|_| counter.increment()).collect();
    assert_eq!(t.client.gather(&calls).await.unwrap(), vec![1, 2, 3, 4, 5]);

    let more: Vec<_> = (0..5).map(|_| counter.increment()).collect();
    let mut seen = Vec::new();
    let mut completed = as_completed(more.clone()).with_results();
    while let Some((_, value)) = completed.next().await {
        seen.push(value.unwrap());
    }
    seen.sort();
    assert_eq!(seen, vec![6, 7, 8, 9, 10]);
    let waited = wait(&more, ReturnWhen::AllCompleted, Some(LIMIT))
        .await
        .unwrap();
    assert_eq!(waited.0.len(), 5);

    // Into tasks, as dependencies, alone and in a list.
    let count = counter.get_count();
    let plus = t.client.submit(add, (&count, 100));
    assert_eq!(plus.result_timeout(LIMIT).await.unwrap(), 110);
    let sum = t.client.submit(total, (more,));
    assert_eq!(sum.result_timeout(LIMIT).await.unwrap(), 6 + 7 + 8 + 9 + 10);

    // Callbacks run.
    let (tx, rx) = tokio::sync::oneshot::channel();
    counter.increment().add_done_callback(move |f| {
        let _ = tx.send(f.status());
    });
    assert_eq!(rx.await.unwrap(), Status::Finished);
    t.stop().await;
}

#[tokio::test]
async fn dropping_the_last_proxy_frees_the_actor() {
    let t = TestCluster::start("actor-drop", 1).await;
    let counter = t.client.submit_actor(Counter::new, ()).await.unwrap();
    let key = counter.handle().key().to_owned();
    let worker = counter.handle().worker().to_owned();
    let copy = counter.clone();
    assert_eq!(copy.increment().await.unwrap(), 1);
    drop(counter);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        flotilla_worker::actors::hosted_actors(&worker).contains(&key),
        "a clone still holds it"
    );
    drop(copy);
    let started = Instant::now();
    while flotilla_worker::actors::hosted_actors(&worker).contains(&key) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the actor outlived its proxies"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("actor dropped {:?} after its last proxy", started.elapsed());
    support::wait_until_freed(&t.config, Duration::from_secs(10)).await;
    t.stop().await;
}

#[tokio::test]
async fn killing_the_hosting_worker_loses_the_actor_but_not_the_cluster() {
    let mut t = TestCluster::start("actor-kill", 2).await;
    let counter = t.client.submit_actor(Counter::new, ()).await.unwrap();
    assert_eq!(counter.increment().await.unwrap(), 1);
    let worker = counter.handle().worker().to_owned();
    let pending = counter.record_after(1, 60_000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(t.cluster.as_mut().unwrap().kill_worker(&worker));
    let killed = Instant::now();

    let error = pending.result_timeout(LIMIT).await.unwrap_err();
    assert!(matches!(error, Error::ActorLost { .. }), "{error}");
    println!("pending call lost {:?} after the kill", killed.elapsed());
    let later = counter.increment().result_timeout(LIMIT).await.unwrap_err();
    assert!(matches!(later, Error::ActorLost { .. }), "{later}");
    assert!(later.to_string().contains("create a new actor"), "{later}");

    let survivor = t
        .client
        .submit_actor(Counter::new, ())
        .await
        .expect("a new actor is created on the surviving worker");
    assert_ne!(survivor.handle().worker(), worker);
    assert_eq!(survivor.increment().await.unwrap(), 1);
    t.stop().await;
}

#[tokio::test]
async fn actors_can_be_placed_on_a_worker() {
    let t = TestCluster::start("actor-place", 2).await;
    let target = t.cluster.as_ref().unwrap().worker_ids()[1].clone();
    for _ in 0..3 {
        let counter = t
            .client
            .submit_actor_with(Counter::new, ())
            .workers([target.clone()])
            .submit()
            .await
            .unwrap();
        assert_eq!(counter.handle().worker(), target);
    }
    t.stop().await;
}

#[test]
fn constructors_are_named_alike_on_both_sides() {
    // The worker registers `Counter::new` under its fn item's type name and
    // the client names it the same way; it reads as its path.
    fn name_of<T>(_: T) -> &'static str {
        std::any::type_name::<T>()
    }
    assert_eq!(
        name_of(Counter::new),
        "flotilla_examples::actors::Counter::new"
    );
}

/// A client sends its calls straight to the hosting worker's data
/// connection (no broker hop either way) when the worker has one, and
/// through the broker when it has none (`--data-addr off`): the same
/// answers, in call order, either way.
#[tokio::test]
async fn calls_go_straight_to_a_worker_with_a_data_connection_else_through_the_broker() {
    use support::process::Processes;
    for (args, direct) in [(&[][..], true), (&["--data-addr", "off"][..], false)] {
        let p = Processes::start("actor-direct", &[args]).await;
        let counter = p.client.submit_actor(Counter::new, ()).await.unwrap();
        let increments: Vec<_> = (0..100).map(|_| counter.increment()).collect();
        assert_eq!(
            p.client.gather(&increments).await.unwrap(),
            (1..=100).collect::<Vec<i64>>(),
            "{args:?}"
        );
        let opened = p.workers[0]
            .log()
            .contains("a client opened a direct actor call connection");
        assert_eq!(opened, direct, "{args:?}:\n{}", p.logs());
        drop((counter, increments));
        p.stop().await;
    }
}

/// The client's connection for calls through the broker is lost (the
/// broker restarts): a call waiting for its answer then fails with a clear
/// error instead of waiting forever, and the client connects again for
/// later calls (an actor created after the restart answers them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_through_the_broker_fail_clearly_when_its_connection_is_lost_and_later_ones_connect_again(
) {
    use support::process::Processes;
    use support::services::PrivateRabbit;
    let rabbit = tokio::task::spawn_blocking(PrivateRabbit::start)
        .await
        .unwrap();
    let mut config = support::fresh_config("actor-broker-lost");
    config.amqp_url = rabbit.url();
    let p = Processes::start_with(config, &[&["--data-addr", "off"]]).await;
    let counter = p.client.submit_actor(Counter::new, ()).await.unwrap();
    assert_eq!(counter.increment().await.unwrap(), 1);
    // A call that takes 20 s, under way when the broker restarts.
    let pending = counter.record_after(1, 20_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    tokio::task::block_in_place(|| rabbit.ctl(&["stop_app"]));
    match pending.result_timeout(Duration::from_secs(15)).await {
        Err(Error::Amqp(error)) => {
            let message = error.to_string();
            assert!(message.contains("may or may not have run"), "{message}");
        }
        other => panic!("the pending call fails with the lost connection: {other:?}"),
    }
    println!(
        "the pending call failed {:?} after the broker stopped",
        started.elapsed()
    );
    tokio::task::block_in_place(|| rabbit.ctl(&["start_app"]));
    // The worker and the client reconnect; an actor created now answers.
    let fresh = tokio::time::timeout(
        Duration::from_secs(60),
        p.client.submit_actor(Counter::starting_at, (10,)),
    )
    .await
    .expect("an actor is created after the restart")
    .unwrap();
    let answered = fresh
        .increment()
        .result_timeout(Duration::from_secs(30))
        .await;
    assert_eq!(
        answered.unwrap(),
        11,
        "a call after the restart is answered"
    );
    drop((counter, fresh));
    p.stop().await;
    drop(rabbit);
}
