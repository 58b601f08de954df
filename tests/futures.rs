//! End to end: the seed's core future sections against real RabbitMQ and
//! Redis, each test in its own namespace.

mod support;

use flotilla::prelude::*;
use flotilla::{ErrorKind, Task};
use flotilla_examples::{
    add, byte_len, explode, inc, make_bytes, might_fail, slow_identity, square, total, validate,
    whoami, ValidationError,
};
use std::collections::HashSet;
use support::TestCluster;

#[tokio::test]
async fn basic_submit() {
    let t = TestCluster::start("basic", 1).await;
    let future = t.client.submit(add, (1, 2));
    assert_eq!(future.result().await.unwrap(), 3);
    assert_eq!(future.status(), Status::Finished);
    assert!(future.done());
    t.stop().await;
}

#[tokio::test]
async fn multiple_tasks_gather_in_order() {
    let t = TestCluster::start("multi", 2).await;
    let futures: Vec<_> = (0..10).map(|i| t.client.submit(add, (i, i))).collect();
    let results = t.client.gather(&futures).await.unwrap();
    assert_eq!(results, (0..10).map(|i| i * 2).collect::<Vec<i64>>());
    t.stop().await;
}

#[tokio::test]
async fn map_over_inputs() {
    let t = TestCluster::start("map", 2).await;
    let futures = t.client.map(square, (0..100).map(|i| (i,)));
    let results = t.client.gather(&futures).await.unwrap();
    assert_eq!(results, (0..100).map(|i| i * i).collect::<Vec<i64>>());
    t.stop().await;
}

#[tokio::test]
async fn check_status_moves_from_pending_to_finished() {
    let t = TestCluster::start("status", 1).await;
    let future = t.client.submit(slow_identity, (5, 600));
    assert!(!future.done());
    assert!(matches!(future.status(), Status::Pending | Status::Running));
    let mut saw_running = false;
    for _ in 0..100 {
        if future.status() == Status::Running {
            saw_running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        saw_running,
        "a task running for 600 ms is reported as running"
    );
    assert!(future.exception().is_none());
    assert_eq!(
        future
            .result_timeout(Duration::from_secs(10))
            .await
            .unwrap(),
        5
    );
    assert_eq!(future.status(), Status::Finished);
    t.stop().await;
}

#[tokio::test]
async fn result_timeout_returns_timeout_and_the_task_goes_on() {
    let t = TestCluster::start("timeout", 1).await;
    let future = t.client.submit(slow_identity, (9, 500));
    match future.result_timeout(Duration::from_millis(50)).await {
        Err(Error::Timeout { key, .. }) => assert_eq!(key, future.key()),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(future.await.unwrap(), 9);
    t.stop().await;
}

#[tokio::test]
async fn error_handling_carries_type_message_and_traceback() {
    let t = TestCluster::start("errors", 1).await;
    let future = t.client.submit(might_fail, (-5,));
    match future.result().await {
        Err(Error::Task(e)) => {
            assert_eq!(e.message(), "Negative value");
            assert_eq!(e.type_name(), "alloc::string::String");
            assert_eq!(e.kind(), ErrorKind::User);
            assert!(e.traceback().contains("might_fail"), "{}", e.traceback());
        }
        other => panic!("expected a task error, got {other:?}"),
    }
    assert_eq!(future.status(), Status::Error);
    assert!(future.exception().is_some());
    assert!(future.traceback().unwrap().contains("might_fail"));
    assert_eq!(t.client.submit(might_fail, (4,)).await.unwrap(), 16);
    t.stop().await;
}

#[tokio::test]
async fn a_serializable_error_is_recovered_typed() {
    let t = TestCluster::start("typed", 1).await;
    let error = t.client.submit(validate, (3, 10)).await.unwrap_err();
    let task_error = error.task_error().expect("a task error");
    assert_eq!(task_error.message(), "3 is below the minimum 10");
    assert_eq!(
        task_error.downcast::<ValidationError>(),
        Some(ValidationError::TooSmall { value: 3, min: 10 })
    );
    t.stop().await;
}

#[tokio::test]
async fn panics_become_errors_with_a_location() {
    let t = TestCluster::start("panic", 1).await;
    let error = t
        .client
        .submit(explode, ("kaboom".to_string(),))
        .await
        .unwrap_err();
    let task_error = error.task_error().expect("a task error");
    assert_eq!(task_error.kind(), ErrorKind::Panic);
    assert_eq!(task_error.message(), "kaboom");
    assert!(
        task_error.traceback().contains("src/lib.rs"),
        "{}",
        task_error.traceback()
    );
    // The worker survives its task's panic.
    assert_eq!(t.client.submit(add, (2, 2)).await.unwrap(), 4);
    t.stop().await;
}

#[tokio::test]
async fn automatic_dependency_tracking() {
    let t = TestCluster::start("deps", 2).await;
    let future1 = t.client.submit(add, (1, 2));
    let future2 = t.client.submit(add, (&future1, 10));
    let future3 = t.client.submit(add, (future2, 100));
    assert_eq!(future3.await.unwrap(), 113);
    t.stop().await;
}

#[tokio::test]
async fn complex_dependencies_and_lists_of_futures() {
    let t = TestCluster::start("diamond", 2).await;
    let a = t.client.submit(square, (3,));
    let b = t.client.submit(inc, (4,));
    let c = t.client.submit(add, (&a, &b));
    let d = t.client.submit(add, (&c, &a));
    assert_eq!(d.await.unwrap(), 9 + 5 + 9);
    let parts = t.client.map(add, (0..50).map(|i| (i, i)));
    let sum = t.client.submit(total, (parts,));
    assert_eq!(sum.await.unwrap(), (0..50).map(|i| 2 * i).sum::<i64>());
    // A dependency submitted after its input already finished.
    let done = t.client.submit(inc, (1,));
    assert_eq!(done.result().await.unwrap(), 2);
    assert_eq!(t.client.submit(inc, (&done,)).await.unwrap(), 3);
    t.stop().await;
}

#[tokio::test]
async fn an_erred_input_errs_its_dependents_with_the_same_error() {
    let t = TestCluster::start("errdeps", 1).await;
    let bad = t.client.submit(might_fail, (-1,));
    let child = t.client.submit(add, (&bad, 1));
    let grandchild = t.client.submit(inc, (&child,));
    let original = bad.result().await.unwrap_err();
    for dependent in [
        child.result().await.unwrap_err(),
        grandchild.result().await.unwrap_err(),
    ] {
        let (a, b) = (
            original.task_error().unwrap(),
            dependent.task_error().unwrap(),
        );
        assert_eq!(a, b, "dependents carry the original error");
        assert_eq!(b.key(), bad.key());
    }
    // Submitted after the input already failed: same error.
    let late = t.client.submit(inc, (&bad,));
    assert_eq!(
        late.result()
            .await
            .unwrap_err()
            .task_error()
            .unwrap()
            .message(),
        "Negative value"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_ten_thousand_link_chain() {
    let t = TestCluster::start("chain", 2).await;
    let mut current = t.client.submit(inc, (0,));
    for _ in 1..10_000 {
        current = t.client.submit(inc, (&current,));
    }
    assert_eq!(
        current
            .result_timeout(Duration::from_secs(300))
            .await
            .unwrap(),
        10_000
    );
    t.stop().await;
}

#[derive(Clone, Copy)]
struct NotProvided;

impl Task for NotProvided {
    type Args = (i64,);
    type Output = i64;
    const NAME: &'static str = "nowhere::not_provided";
    const FINGERPRINT: u64 = 1;
}

#[derive(Clone, Copy)]
struct AddFromAnotherBuild;

impl Task for AddFromAnotherBuild {
    type Args = (String,);
    type Output = i64;
    const NAME: &'static str = <add as Task>::NAME;
    const FINGERPRINT: u64 = <add as Task>::FINGERPRINT ^ 0xdead_beef;
}

#[tokio::test]
async fn an_unknown_task_fails_clearly() {
    let t = TestCluster::start("unknown", 1).await;
    let error = t
        .client
        .submit(NotProvided, (1,))
        .result_timeout(Duration::from_secs(20))
        .await
        .unwrap_err();
    let task_error = error.task_error().expect("a task error, not a hang");
    assert_eq!(task_error.kind(), ErrorKind::UnknownTask);
    assert!(
        task_error.message().contains("nowhere::not_provided"),
        "{}",
        task_error.message()
    );
    t.stop().await;
}

#[tokio::test]
async fn a_signature_mismatch_fails_clearly() {
    let t = TestCluster::start("mismatch", 1).await;
    let error = t
        .client
        .submit(AddFromAnotherBuild, ("1".to_string(),))
        .result_timeout(Duration::from_secs(20))
        .await
        .unwrap_err();
    let task_error = error.task_error().expect("a task error, not a hang");
    assert_eq!(task_error.kind(), ErrorKind::SignatureMismatch);
    assert!(
        task_error.message().contains("signature"),
        "{}",
        task_error.message()
    );
    t.stop().await;
}

#[tokio::test]
async fn values_over_the_message_limit_travel_by_reference() {
    let mut config = support::fresh_config("payload");
    config.max_payload = 4096;
    let t = TestCluster::start_with(config, 1, 1).await;
    // An argument over the limit is not refused: the client scatters it
    // and the message carries a reference (see tests/large_values.rs).
    let big = serde_bytes::ByteBuf::from(vec![1u8; 10_000]);
    assert_eq!(t.client.submit(byte_len, (big,)).await.unwrap(), 10_000);
    // Nor is a result: a large one never travels in a message.
    let over_the_limit = t.client.submit(make_bytes, (10_000,)).await.unwrap();
    assert_eq!(over_the_limit.len(), 10_000);
    assert_eq!(
        t.client
            .submit(byte_len, (serde_bytes::ByteBuf::from(vec![1u8; 100]),))
            .await
            .unwrap(),
        100
    );
    t.stop().await;
}

#[tokio::test]
async fn several_workers_share_the_work() {
    let t = TestCluster::start("share", 2).await;
    let futures: Vec<_> = (0..16)
        .map(|i| {
            t.client
                .submit_with(whoami, ())
                .key(format!("who-{i}"))
                .submit()
        })
        .collect();
    let answers = t.client.gather(&futures).await.unwrap();
    let workers: HashSet<_> = answers.iter().map(|(_, worker)| worker.clone()).collect();
    assert!(answers
        .iter()
        .enumerate()
        .all(|(i, (key, _))| key == &format!("who-{i}")));
    let expected: HashSet<_> = t
        .cluster
        .as_ref()
        .unwrap()
        .worker_ids()
        .into_iter()
        .collect();
    assert!(workers.is_subset(&expected));
    let slow: Vec<_> = (0..8)
        .map(|i| t.client.submit(slow_identity, (i, 300)))
        .collect();
    let started = std::time::Instant::now();
    t.client.gather(&slow).await.unwrap();
    // 8 × 300 ms on two single-slot workers takes ~1.2 s; one worker alone would need 2.4 s.
    assert!(
        started.elapsed() < Duration::from_millis(2300),
        "work was not shared: {:?}",
        started.elapsed()
    );
    t.stop().await;
}

#[tokio::test]
async fn the_same_pure_task_is_one_task_and_impure_ones_are_not() {
    let t = TestCluster::start("pure", 1).await;
    let a = t.client.submit(add, (20, 22));
    let b = t.client.submit(add, (20, 22));
    assert_eq!(a.key(), b.key());
    let c = t.client.submit_with(add, (20, 22)).pure(false).submit();
    assert_ne!(a.key(), c.key());
    assert!(a.key().starts_with("add-"));
    assert_eq!(
        (a.await.unwrap(), b.await.unwrap(), c.await.unwrap()),
        (42, 42, 42)
    );
    t.stop().await;
}

#[tokio::test]
async fn a_worker_over_its_memory_limit_hands_work_to_the_others() {
    let t = TestCluster::start("memlimit", 0).await;
    let mut full = flotilla_worker::WorkerOptions::new(t.config.clone());
    full.nthreads = 1;
    full.memory_limit = Some(1); // always over
    let full = flotilla_worker::WorkerHandle::spawn(full).await.unwrap();
    let mut roomy = flotilla_worker::WorkerOptions::new(t.config.clone());
    roomy.nthreads = 1;
    let roomy = flotilla_worker::WorkerHandle::spawn(roomy).await.unwrap();
    let futures: Vec<_> = (0..20)
        .map(|i| {
            t.client
                .submit_with(whoami, ())
                .key(format!("mem-{i}"))
                .submit()
        })
        .collect();
    let answers = t.client.gather(&futures).await.unwrap();
    assert!(
        answers.iter().all(|(_, worker)| worker == roomy.id()),
        "the full worker ran nothing"
    );
    full.shutdown().await.unwrap();
    roomy.shutdown().await.unwrap();
    t.stop().await;
}

/// Completion events also come through Redis (issue 16, item 3): with its
/// queue unbound from the broker's events, a client still hears of its
/// tasks, from the copy the worker publishes on its Redis channel.
#[tokio::test]
async fn completions_reach_the_client_through_redis_without_the_broker() {
    let t = TestCluster::start("fast-events", 1).await;
    assert_eq!(t.client.submit(inc, (1,)).await.unwrap(), 2);
    let names = t.config.names();
    let connection = flotilla_runtime::transport::connect_amqp(&t.config.amqp_url, "test unbind")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_unbind(
            lapin::types::ShortString::from(names.client_queue(t.client.id())),
            lapin::types::ShortString::from(names.events_exchange()),
            lapin::types::ShortString::from(flotilla_proto::Names::client_binding(t.client.id())),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    // (Tasks not run before: a stored result is announced by the
    // scheduler, through the broker only.)
    for i in 100..120 {
        let value = t
            .client
            .submit(inc, (i,))
            .result_timeout(Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(value, i + 1);
    }
    t.stop().await;
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn a_flaky_task_is_retried_after_its_growing_delays() {
    use flotilla_examples::features::fail_first;
    let t = TestCluster::start("retry-delay", 1).await;
    let began = std::time::Instant::now();
    // Fails twice: waits 300 ms, then 600 ms, then succeeds.
    let attempt = t
        .client
        .submit_with(fail_first, ("delayed".to_string(), 2))
        .retries(3)
        .retry_delay(Duration::from_millis(300))
        .backoff(2.0)
        .max_retry_delay(Duration::from_secs(5))
        .submit()
        .result()
        .await
        .unwrap();
    let elapsed = began.elapsed();
    assert_eq!(attempt, 3);
    assert!(
        elapsed >= Duration::from_millis(900),
        "two retries waited 300 + 600 ms, yet it took {elapsed:?}"
    );
    t.stop().await;
}

#[tokio::test]
async fn only_the_errors_in_retry_on_are_retried() {
    use flotilla_examples::features::fail_first;
    let t = TestCluster::start("retry-on", 1).await;
    // The task fails with a `String`: not a panic, so not retried.
    let panics_only = t
        .client
        .submit_with(fail_first, ("panics-only".to_string(), 1))
        .retries(3)
        .retry_on([ErrorKind::Panic])
        .submit();
    match panics_only.result().await {
        Err(Error::Task(error)) => {
            assert_eq!(error.kind(), ErrorKind::User);
            assert!(error.message().contains("attempt 1 failed"), "{error}");
        }
        other => panic!("expected the first attempt's error, got {other:?}"),
    }
    // By its type's name, in part: retried, and the second attempt succeeds.
    let strings = t
        .client
        .submit_with(fail_first, ("strings".to_string(), 1))
        .retries(3)
        .retry_on([flotilla::RetryOn::from("string::String")])
        .submit();
    assert_eq!(strings.result().await.unwrap(), 2);
    t.stop().await;
}

#[tokio::test]
async fn a_task_submitted_with_after_does_not_start_before_its_time() {
    use flotilla_examples::features::started_at;
    let t = TestCluster::start("after", 1).await;
    // Alone and with no input, it would otherwise go straight to the
    // workers without the scheduler.
    let submitted = wall_ms();
    let later = t
        .client
        .submit_with(started_at, ("later".to_string(),))
        .after(Duration::from_secs(1))
        .submit();
    let started = later.result().await.unwrap();
    assert!(
        started >= submitted + 1000,
        "started {} ms after its submission",
        started as i64 - submitted as i64
    );
    // A time in the past is no wait; the inputs still gate it.
    let input = t.client.submit(slow_identity, (1, 200));
    let past = std::time::SystemTime::now() - Duration::from_secs(60);
    let dependent = t.client.submit_with(add, (&input, 1)).at(past).submit();
    assert_eq!(dependent.result().await.unwrap(), 2);
    t.stop().await;
}

#[tokio::test]
async fn one_trace_id_follows_a_task_from_the_client_into_its_nested_tasks() {
    use flotilla::TraceParent;
    use flotilla_examples::features::{nested_trace_of, trace_of};

    let t = TestCluster::start("trace", 1).await;
    let client_span: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        .parse()
        .unwrap();
    let traced = t.client.with_traceparent(client_span);
    let [own, nested] = traced.submit(nested_trace_of, ()).await.unwrap();
    let trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned());
    // The task runs in the client's trace, under the client's span.
    assert_eq!(own, (trace_id.clone(), Some("00f067aa0ba902b7".to_owned())));
    // The task it submitted is in the same trace, under a span of its own.
    assert_eq!(nested.0, trace_id);
    let nested_parent = nested.1.expect("the nested task has a parent span");
    assert_eq!(nested_parent.len(), 16);
    assert_ne!(nested_parent, "00f067aa0ba902b7");

    // Through the scheduler too (a task with retries does not go straight
    // to the workers).
    let scheduled = traced
        .submit_with(trace_of, ())
        .key("scheduled")
        .retries(1)
        .submit()
        .await
        .unwrap();
    assert_eq!(
        scheduled,
        (trace_id.clone(), Some("00f067aa0ba902b7".to_owned()))
    );

    // Outside a trace, a task carries none.
    let untraced = t
        .client
        .submit_with(trace_of, ())
        .key("untraced")
        .submit()
        .await
        .unwrap();
    assert_eq!(untraced, (None, None));
    t.stop().await;
}
