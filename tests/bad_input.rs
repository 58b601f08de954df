//! Bad input never hangs or crashes anything: undecodable messages on every
//! queue are dead-lettered and the cluster carries on.

mod common;

use common::TestCluster;
use flotilla_examples::{add, total};
use lapin::options::BasicPublishOptions;
use std::time::{Duration, Instant};

#[tokio::test]
async fn undecodable_messages_on_every_queue_are_dead_lettered() {
    let t = TestCluster::start("garbage", 1).await;
    let names = t.config.names();
    let connection = flotilla_proto::transport::connect_amqp(&t.config.amqp_url, "test garbage")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queues = [
        names.tasks_queue(),
        names.scheduler_queue(),
        names.scheduler_events_queue(),
        names.client_queue(t.client.id()),
    ];
    let garbage: [&[u8]; 4] = [
        b"\x01\xc1 not msgpack",
        b"",
        b"\x07 wrong version",
        // Valid MessagePack of the wrong message type for every queue.
        &[1, 0x81, 0xa4, b'N', b'o', b'p', b'e', 0xc0],
    ];
    for queue in &queues {
        for bytes in garbage {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    bytes,
                    Default::default(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    let expected = (queues.len() * garbage.len()) as u32;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut count = 0;
    while std::time::Instant::now() < deadline {
        count = common::queue_depth(&channel, &names.dead_letter_queue()).await;
        if count >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count, expected,
        "every bad message is dead-lettered, none executed or lost"
    );
    // Everyone survived.
    let sum = t.client.submit(add, (40, 2));
    assert_eq!(
        sum.result_timeout(Duration::from_secs(20)).await.unwrap(),
        42
    );
    let _ = connection.close(200, "done".into()).await;
    t.stop().await;
}

// ---------------------------------------------------------------- oversized values

/// Checks that `outcome` is a payload-limit refusal of `what`, arriving
/// within `bound` of `started` (encoding stops at the limit rather than
/// going through the whole value).
fn assert_refused_quickly<T: std::fmt::Debug>(
    outcome: Result<T, flotilla::Error>,
    what: &str,
    started: Instant,
) {
    let elapsed = started.elapsed();
    println!("{what}: refused after {elapsed:?}: {outcome:?}");
    match outcome {
        Err(error @ flotilla::Error::PayloadTooLarge { .. }) => {
            let message = error.to_string();
            assert!(
                message.starts_with(what)
                    && message
                        .contains("larger than the 4 MiB payload limit (FLOTILLA_MAX_PAYLOAD)"),
                "{message}"
            );
        }
        other => panic!("{what}: expected PayloadTooLarge, got {other:?}"),
    }
    // Encoding all of it took 10 s and more; 4 MiB of it takes milliseconds.
    assert!(
        elapsed < REFUSED_WITHIN,
        "{what}: refused after {elapsed:?}, not within {REFUSED_WITHIN:?}"
    );
}

/// How soon an oversized value must be refused.
const REFUSED_WITHIN: Duration = Duration::from_secs(2);

/// A 300 MB argument, scattered value, actor call argument or primitive
/// value is refused as soon as its encoding passes the limit, with a
/// message that says so grammatically.
#[tokio::test]
async fn oversized_values_are_refused_as_soon_as_they_pass_the_limit() {
    use flotilla::prelude::*;
    use flotilla::ActorProxy;
    flotilla_examples::link();
    let mut config = common::fresh_config("too-big");
    // A small limit keeps the test quick in debug builds; the path is the
    // same whatever the limit (encoding all 337 MB takes seconds).
    config.max_payload = 4 << 20;
    let t = TestCluster::start_with(config, 1, 1).await;
    // 300 MB of values that take 9 bytes each in MessagePack.
    let big: Vec<i64> = vec![i64::MAX; 300 << 17];

    let started = Instant::now();
    let scattered = t.client.scatter(&big).await;
    assert_refused_quickly(
        scattered.map(drop),
        "the scattered alloc::vec::Vec<i64> is",
        started,
    );

    let started = Instant::now();
    let variable: Variable<Vec<i64>> = Variable::new(&t.client, "big");
    assert_refused_quickly(
        variable.set(&big).await,
        "a value for variable `big` is",
        started,
    );
    let queue: Queue<Vec<i64>> = Queue::new(&t.client, "big");
    let started = Instant::now();
    assert_refused_quickly(queue.put(&big).await, "a value for queue `big` is", started);

    let counter = t
        .client
        .submit_actor(flotilla_examples::actors::Counter::new, ())
        .await
        .unwrap();
    let started = Instant::now();
    let call = counter.handle().call::<i64, _>("add", &(&big,));
    assert_refused_quickly(
        call.await,
        "the arguments of `flotilla_examples::actors::Counter::add` are",
        started,
    );

    let started = Instant::now();
    let refused = t.client.submit(total, (big,));
    assert_refused_quickly(
        refused.await,
        "the arguments of `flotilla_examples::total` are",
        started,
    );
    drop(counter);
    t.stop().await;
}
