//! Bad input never hangs or crashes anything: undecodable messages on every
//! queue are dead-lettered and the cluster carries on.

mod support;

use flotilla_examples::add;
use lapin::options::BasicPublishOptions;
use std::time::{Duration, Instant};
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

/// A 300 MB actor call argument or primitive value is refused as soon as
/// its encoding passes the limit, with a message that says so
/// grammatically. (Task arguments and scattered values have no limit: they
/// travel through Redis in chunks, see tests/large_values.rs.)
#[tokio::test]
async fn oversized_values_are_refused_as_soon_as_they_pass_the_limit() {
    use flotilla::prelude::*;
    use flotilla::ActorProxy;
    flotilla_examples::link();
    let mut config = support::fresh_config("too-big");
    // A small limit keeps the test quick in debug builds; the path is the
    // same whatever the limit (encoding all 337 MB takes seconds).
    config.max_payload = 4 << 20;
    let t = TestCluster::start_with(config, 1, 1).await;
    // 300 MB of values that take 9 bytes each in MessagePack.
    let big: Vec<i64> = vec![i64::MAX; 300 << 17];

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
    drop(counter);
    t.stop().await;
}

// ---------------------------------------------------------------- connecting

/// `host:port` of a URL (`scheme://[user:pass@]host:port/...`).
fn address_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.rsplit('@').next().unwrap_or(authority).to_owned()
}

/// Runs `binary` (the scheduler or the worker) on `config` until it exits;
/// its status, its log and how long it ran. Killed, and the test failed,
/// after `limit`.
fn run_binary(
    binary: &str,
    config: &flotilla::Config,
    limit: Duration,
) -> (bool, String, Duration) {
    use std::io::Read;
    let started = Instant::now();
    let mut child = std::process::Command::new(support::target_binary(binary))
        .env("FLOTILLA_AMQP_URL", &config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &config.redis_url)
        .env("FLOTILLA_NAMESPACE", &config.namespace)
        .env("FLOTILLA_HTTP_ADDR", "off")
        .env("RUST_LOG", "info,lapin=off")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{binary} still ran after {limit:?}; its log:\n{}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    (status.success(), reader.join().unwrap_or_default(), elapsed)
}

/// How soon a refused or wrong port must be reported by a client.
const CONNECTION_ERROR_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test]
async fn a_refused_redis_port_is_reported_at_once_by_client_scheduler_and_worker() {
    let good = support::fresh_config("refused");
    let mut config = good.clone();
    let port = support::services::free_port();
    config.redis_url = format!("redis://127.0.0.1:{port}/0");
    let expected = format!("nothing listens at 127.0.0.1:{port}");

    let started = Instant::now();
    let error = flotilla::Client::connect(config.clone()).await.unwrap_err();
    let elapsed = started.elapsed();
    println!("client: {error} after {elapsed:?}");
    assert!(error.to_string().contains(&expected), "{error}");
    assert!(
        elapsed < CONNECTION_ERROR_WITHIN,
        "a refused Redis port took {elapsed:?} to report"
    );

    for binary in ["flotilla-scheduler", "flotilla-worker"] {
        let (success, log, elapsed) = run_binary(binary, &config, Duration::from_secs(30));
        println!("{binary}: exited after {elapsed:?}:\n{log}");
        assert!(!success, "{binary} fails without its Redis");
        assert!(log.contains(&expected), "{binary} says why:\n{log}");
        // Process start and the RabbitMQ connection included.
        assert!(
            elapsed < Duration::from_secs(5),
            "{binary} took {elapsed:?}"
        );
        assert!(
            !log.contains("\x1b["),
            "no colour codes in a piped log:\n{log:?}"
        );
    }
    flotilla::purge(&good).await.unwrap();
}

#[tokio::test]
async fn a_redis_url_at_rabbitmqs_port_says_so() {
    let good = support::fresh_config("redis-at-amqp");
    let mut config = good.clone();
    let rabbit = address_of(&good.amqp_url);
    config.redis_url = format!("redis://{rabbit}/0");
    let started = Instant::now();
    let error = flotilla::Client::connect(config).await.unwrap_err();
    let elapsed = started.elapsed();
    let message = error.to_string();
    println!("{message} after {elapsed:?}");
    let port = rabbit.rsplit(':').next().unwrap();
    assert!(
        message.contains(&format!("{rabbit} answered, but it is not a Redis server"))
            && message.contains(&format!(
                "is FLOTILLA_REDIS_URL (--redis-url) pointing at RabbitMQ's port {port}?"
            )),
        "{message}"
    );
    assert!(!message.contains("Parse error"), "{message}");
    assert!(elapsed < CONNECTION_ERROR_WITHIN, "took {elapsed:?}");
    flotilla::purge(&good).await.unwrap();
}

#[tokio::test]
async fn an_amqp_url_at_redis_port_says_so() {
    let good = support::fresh_config("amqp-at-redis");
    let mut config = good.clone();
    let redis = address_of(&good.redis_url);
    config.amqp_url = format!("amqp://guest:guest@{redis}/%2f");
    let started = Instant::now();
    let error = flotilla::Client::connect(config).await.unwrap_err();
    let elapsed = started.elapsed();
    let message = error.to_string();
    println!("{message} after {elapsed:?}");
    let port = redis.rsplit(':').next().unwrap();
    assert!(
        message.contains(&format!("{redis} answered, but it is not RabbitMQ"))
            && message.contains(&format!(
                "is FLOTILLA_AMQP_URL (--amqp-url) pointing at Redis's port {port}?"
            )),
        "{message}"
    );
    // Redis never answers an AMQP handshake: without asking it, this took
    // the whole 10 s connection timeout.
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}

/// A process whose `FLOTILLA_QUEUE_TYPE` differs from the namespace's
/// queues (classic ones meeting quorum queues) cannot declare them: it says
/// so, naming the argument, and stops, rather than retrying.
#[tokio::test]
async fn a_process_with_another_queue_type_than_its_namespace_says_so() {
    let mut quorum = support::fresh_config("queue-type");
    quorum.queue_type = flotilla_proto::QueueType::Quorum;
    let connection = flotilla_runtime::transport::connect_amqp(&quorum.amqp_url, "queue type test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    flotilla_runtime::transport::declare_topology(&channel, &quorum.names(), quorum.queue_type)
        .await
        .unwrap();
    let mut classic = quorum.clone();
    classic.queue_type = flotilla_proto::QueueType::Classic;

    let started = Instant::now();
    let error = flotilla::Client::connect(classic.clone())
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    println!("client: {error} after {elapsed:?}");
    assert!(
        error.to_string().contains("x-queue-type") && error.to_string().contains("needs the same"),
        "{error}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    for binary in ["flotilla-scheduler", "flotilla-worker"] {
        let (success, log, elapsed) = run_binary(binary, &classic, Duration::from_secs(30));
        println!("{binary}: exited after {elapsed:?}:\n{log}");
        assert!(!success, "{binary} stops");
        assert!(
            log.contains("FLOTILLA_QUEUE_TYPE: every process of a namespace needs the same"),
            "{binary} says why:\n{log}"
        );
    }
    flotilla::purge(&quorum).await.unwrap();
    flotilla_runtime::transport::close(&connection, "done").await;
}

// ---------------------------------------------------------------- logs

/// A scheduler logging to a pipe (a file, a log collector) writes no ANSI
/// colour codes.
#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    let config = support::fresh_config("no-ansi");
    let mut child = std::process::Command::new(support::target_binary("flotilla-scheduler"))
        .env("FLOTILLA_AMQP_URL", &config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &config.redis_url)
        .env("FLOTILLA_NAMESPACE", &config.namespace)
        .env("FLOTILLA_HTTP_ADDR", "off")
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("FLOTILLA_LOG_JSON")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start flotilla-scheduler");
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log.iter().any(|l: &String| l.contains("scheduler started")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => break,
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    log.extend(received.try_iter());
    assert!(
        log.iter()
            .any(|l| l.contains("INFO") && l.contains("scheduler started")),
        "the scheduler logged its start: {log:#?}"
    );
    let coloured: Vec<&String> = log.iter().filter(|l| l.contains('\x1b')).collect();
    assert!(
        coloured.is_empty(),
        "ANSI escape codes in a piped log: {coloured:#?}"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(flotilla::purge(&config)).unwrap();
}
