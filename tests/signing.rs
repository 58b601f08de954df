//! A namespace with a shared secret (`FLOTILLA_SECRET`): everything works
//! signed, and what a party with broker access but without the secret
//! sends — unsigned, forged, misdirected or replayed — is dead-lettered and
//! never runs.

mod support;

use flotilla::prelude::*;
use flotilla::Secret;
use flotilla_examples::actors::Counter;
use flotilla_examples::{add, counted_sleep, recursive_compute};
use flotilla_proto::{
    encode, Arg, Codec, Config, Event, EventBatch, Purpose, RunTask, StoredResult, Task, TaskSpec,
    ToScheduler, ToWorker,
};
use flotilla_runtime::transport;
use std::time::{Duration, Instant};
use support::{fresh_config, TestCluster};

const LIMIT: Duration = Duration::from_secs(60);

fn signed_config(prefix: &str) -> Config {
    let mut config = fresh_config(prefix);
    config.secret = Some(Secret::new(&format!("s3cret-{}", config.namespace)));
    config
}

async fn redis(config: &Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn publish(channel: &lapin::Channel, queue: &str, bytes: &[u8]) {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            Default::default(),
            bytes,
            transport::persistent(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A task that counts its starts under `counter` (see `counted_sleep`).
fn counted_spec(key: &str, counter: &str, client: &str) -> TaskSpec {
    let args = rmp_serde::to_vec_named(&vec![
        Arg::Value(rmp_serde::to_vec_named(counter).unwrap()),
        Arg::Value(rmp_serde::to_vec_named(&0u64).unwrap()),
    ])
    .unwrap();
    TaskSpec::new(
        key.to_owned(),
        <counted_sleep as Task>::NAME.to_owned(),
        <counted_sleep as Task>::FINGERPRINT,
        args,
        Vec::new(),
        client.to_owned(),
    )
}

async fn starts(config: &Config, counter: &str) -> u64 {
    redis::cmd("GET")
        .arg(format!("{}:test:{counter}", config.namespace))
        .query_async::<Option<u64>>(&mut redis(config).await)
        .await
        .unwrap()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_signed_namespace_runs_tasks_dependencies_scatter_actors_and_subtasks() {
    let t = TestCluster::start_with(signed_config("signed"), 2, 2).await;
    let a = t.client.submit(add, (1, 2));
    let b = t.client.submit(add, (&a, 10));
    let data = t.client.scatter(&vec![1i64, 2, 3]).await.unwrap();
    let total = t.client.submit(recursive_compute, (&data, 2));
    assert_eq!(b.result_timeout(LIMIT).await.unwrap(), 13);
    assert_eq!(total.result_timeout(LIMIT).await.unwrap(), 6);

    let counter = t.client.submit_actor(Counter::new, ()).await.unwrap();
    let _ = counter.increment().await.unwrap();
    assert_eq!(counter.increment().await.unwrap(), 2);

    // Results at rest carry their signature: a reader with another secret,
    // or under another key, refuses them.
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(t.config.names().result_key(a.key()))
        .query_async(&mut redis(&t.config).await)
        .await
        .unwrap();
    let codec = Codec::new(&t.config);
    assert_eq!(
        codec.open_result(a.key(), stored.clone()).unwrap(),
        StoredResult::Ok(rmp_serde::to_vec_named(&3i64).unwrap())
    );
    assert!(codec.open_result(b.key(), stored.clone()).is_err());
    let other = Codec::new(&Config {
        secret: Some(Secret::new("a guess")),
        ..t.config.clone()
    });
    assert!(other.open_result(a.key(), stored).is_err());
    drop((a, b, data, total, counter));
    t.stop().await;
}

#[tokio::test]
async fn a_client_or_worker_with_another_secret_fails_at_once() {
    let t = TestCluster::start_with(signed_config("secret-mismatch"), 1, 1).await;
    for secret in [None, Some(Secret::new("a guess"))] {
        let config = Config {
            secret,
            ..t.config.clone()
        };
        let Err(error) = Client::connect(config.clone()).await else {
            panic!("a client with another secret connected");
        };
        assert!(
            error.to_string().contains("FLOTILLA_SECRET"),
            "unclear error: {error}"
        );
        let worker =
            flotilla_worker::WorkerHandle::spawn(flotilla_worker::WorkerOptions::new(config)).await;
        assert!(
            worker.is_err(),
            "a worker with another secret must not start"
        );
    }
    t.stop().await;
}

#[tokio::test]
async fn forged_unsigned_misdirected_and_replayed_messages_never_run() {
    let t = TestCluster::start_with(signed_config("forged"), 1, 2).await;
    let config = &t.config;
    let names = config.names();
    let connection = transport::connect_amqp(&config.amqp_url, "test forger")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let ours = Codec::new(config);
    let theirs = Codec::new(&Config {
        secret: Some(Secret::new("a guess")),
        ..config.clone()
    });
    let dead_letter = names.dead_letter_queue();
    let before = support::queue_depth(&channel, &dead_letter).await;

    // A real future the forger tries to resolve with its own value.
    let slow = t
        .client
        .submit(counted_sleep, ("legit".to_owned(), 1500u64));
    let forged_spec = counted_spec("forged-1", "forged", t.client.id());
    let submit = ToScheduler::Submit {
        tasks: vec![forged_spec.clone()],
        sent: vec![],
    };
    let run = ToWorker::Run {
        epoch: 0,
        tasks: vec![RunTask {
            spec: forged_spec,
            inline: Vec::new(),
            attempt: 0,
        }],
    };
    let finished = EventBatch {
        worker: "forger".into(),
        events: vec![Event::Finished {
            key: slow.key().to_owned(),
            inline: Some(rmp_serde::to_vec_named(&999u64).unwrap()),
            size: 3,
            run_us: 0,
        }],
    };
    let forgeries: Vec<(String, Vec<u8>)> = vec![
        (names.scheduler_queue(), encode(&submit)),
        (
            names.scheduler_queue(),
            theirs.encode(Purpose::ToScheduler, &submit),
        ),
        (names.tasks_queue(), encode(&run)),
        (names.tasks_queue(), theirs.encode(Purpose::ToWorker, &run)),
        // Signed by us, but for another queue.
        (names.tasks_queue(), ours.encode(Purpose::Events, &run)),
        (names.client_queue(t.client.id()), encode(&finished)),
        (
            names.client_queue(t.client.id()),
            theirs.encode(Purpose::Events, &finished),
        ),
    ];
    for (queue, bytes) in &forgeries {
        publish(&channel, queue, bytes).await;
    }

    // A replay: a genuine task message, taken and run once, published again;
    // then a fresh copy of it (as if it reached another worker).
    let spec = counted_spec("replayed-1", "replayed", "nobody");
    redis::cmd("SET")
        .arg(names.spec_key(&spec.key))
        .arg(ours.encode(Purpose::Spec, &spec))
        .query_async::<()>(&mut redis(config).await)
        .await
        .unwrap();
    let run = ToWorker::Run {
        epoch: 0,
        tasks: vec![RunTask {
            spec: spec.clone(),
            inline: Vec::new(),
            attempt: 0,
        }],
    };
    let genuine = ours.encode(Purpose::ToWorker, &run);
    publish(&channel, &names.tasks_queue(), &genuine).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let pending: bool = redis::cmd("EXISTS")
            .arg(names.spec_key(&spec.key))
            .query_async(&mut redis(config).await)
            .await
            .unwrap();
        if !pending {
            break;
        }
        assert!(Instant::now() < deadline, "the genuine task never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish(&channel, &names.tasks_queue(), &genuine).await;
    publish(
        &channel,
        &names.tasks_queue(),
        &ours.encode(Purpose::ToWorker, &run),
    )
    .await;

    let expected = before + forgeries.len() as u32 + 2;
    let deadline = Instant::now() + LIMIT;
    let mut dead = before;
    while dead < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        dead = support::queue_depth(&channel, &dead_letter).await;
    }
    assert_eq!(dead, expected, "every forgery and replay is dead-lettered");
    assert_eq!(
        slow.result_timeout(LIMIT).await.unwrap(),
        1,
        "the real value"
    );
    assert_eq!(starts(config, "forged").await, 0, "no forgery ran");
    assert_eq!(
        starts(config, "replayed").await,
        1,
        "the replay did not run"
    );
    println!(
        "signing: {} forged/unsigned/misdirected and 2 replayed messages dead-lettered, 0 run",
        forgeries.len()
    );
    drop(slow);
    connection.close(200, "done".into()).await.unwrap();
    t.stop().await;
}
