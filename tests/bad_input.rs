//! Bad input never hangs or crashes anything: undecodable messages on every
//! queue are dead-lettered and the cluster carries on.

mod support;

use flotilla_examples::add;
use lapin::options::BasicPublishOptions;
use std::time::Duration;
use support::TestCluster;

#[tokio::test]
async fn undecodable_messages_on_every_queue_are_dead_lettered() {
    let t = TestCluster::start("garbage", 1).await;
    let names = t.config.names();
    let connection = flotilla_runtime::transport::connect_amqp(&t.config.amqp_url, "test garbage")
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
        count = support::queue_depth(&channel, &names.dead_letter_queue()).await;
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
