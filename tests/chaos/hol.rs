//! No head-of-line blocking, no hostage tasks: a worker whose every slot is
//! stuck on a long task holds one task delivery per slot and gives back
//! the others, so short tasks never queue behind a long one on a busy
//! worker while another sits idle (`head-of-line`, default options); and a
//! worker that stops answering loses its connection to missed AMQP
//! heartbeats, so the few deliveries it held go back to the queue within a
//! bounded time (`worker-sigstop-60s`). Also the broker behaviour the
//! worker's prefetch relies on, checked against the real RabbitMQ.

use super::*;
use lapin::options::{BasicQosOptions, QueueDeleteOptions};

/// How many deliveries `consumer` has received within `settle`.
async fn received_within(consumer: &mut lapin::Consumer, settle: Duration) -> usize {
    let mut received = 0;
    while let Ok(Some(delivery)) = tokio::time::timeout(settle, transport::next_delivery(consumer))
        .await
        .map(|next| next.map(Result::unwrap))
    {
        drop(delivery); // kept unacknowledged: it counts against the prefetch
        received += 1;
    }
    received
}

/// The worker follows its free slots by changing its channel's prefetch
/// while its consumer exists: RabbitMQ applies a changed channel-wide
/// (`global`) `basic.qos` to the channel's existing consumers at once,
/// while a per-consumer one only reaches consumers started after it.
#[tokio::test]
async fn the_broker_applies_a_changed_channel_prefetch_to_an_existing_consumer() {
    let config = support::fresh_config("qos-probe");
    let connection = transport::connect_amqp(&config.amqp_url, "qos probe")
        .await
        .unwrap();
    let mut outcome = Vec::new();
    for global in [true, false] {
        let channel = connection.create_channel().await.unwrap();
        let queue = format!("{}.qos-probe-{global}", config.namespace);
        channel
            .queue_declare(
                transport::name(&queue),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        for _ in 0..10 {
            channel
                .basic_publish(
                    transport::name(""),
                    transport::name(&queue),
                    BasicPublishOptions::default(),
                    b"m",
                    Default::default(),
                )
                .await
                .unwrap();
        }
        channel
            .basic_qos(1, BasicQosOptions { global })
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                transport::name(&queue),
                transport::name(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let settle = Duration::from_millis(500);
        let first = received_within(&mut consumer, settle).await;
        channel
            .basic_qos(3, BasicQosOptions { global })
            .await
            .unwrap();
        let after_raise = received_within(&mut consumer, settle).await;
        outcome.push((global, first, after_raise));
        let _ = channel
            .queue_delete(transport::name(&queue), QueueDeleteOptions::default())
            .await;
        let _ = channel.close(200, transport::name("probed")).await;
    }
    println!("qos probe (global, first, after raising to 3): {outcome:?}");
    assert_eq!(
        outcome,
        [(true, 1, 2), (false, 1, 0)],
        "a channel-wide prefetch change reaches the existing consumer; a per-consumer one does not"
    );
    let _ = connection.close(200, transport::name("probed")).await;
}

/// A scheduler and two single-slot workers with default options, logging
/// what they give back to `logs`, and a client of them.
async fn single_slot_cluster(config: &Config, logs: &[std::path::PathBuf]) -> (Vec<Child>, Client) {
    let mut children = vec![scheduler(config)];
    for log in logs {
        children.push(spawn_filtered(
            "flotilla-worker",
            config,
            &["--nthreads", "1"],
            Some(log),
            Some("warn,flotilla_worker::runtime=info"),
        ));
    }
    let client = Client::connect(config.clone()).await.unwrap();
    let warm = client.submit(inc, (0,));
    assert_eq!(
        warm.result_timeout(Duration::from_secs(30)).await.unwrap(),
        1
    );
    (children, client)
}

/// Deliveries the workers logging to `logs` gave back to the queue (their
/// `deliveries=N` of each "given back" line).
fn given_back(logs: &[std::path::PathBuf]) -> usize {
    logs.iter()
        .filter_map(|log| std::fs::read_to_string(log).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|line| line.contains("given back to the queue"))
                .filter_map(|line| {
                    let (_, after) = line.split_once("deliveries=")?;
                    after.split_whitespace().next()?.parse::<usize>().ok()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// How many times each counter was started, summed, minus one per counter
/// that ran: the real re-executions.
async fn reruns(config: &Config, counters: &[String]) -> u64 {
    let mut reruns = 0;
    for counter in counters {
        reruns += starts(config, counter).await.saturating_sub(1);
    }
    reruns
}

#[tokio::test]
async fn chaos_head_of_line() {
    const SHORT: usize = 400;
    const SHORT_MS: u64 = 20;
    let config = support::fresh_config("chaos-hol");
    let logs: Vec<_> = (0..2)
        .map(|i| std::env::temp_dir().join(format!("{}-worker-{i}.log", config.namespace)))
        .collect();
    let (mut children, client) = single_slot_cluster(&config, &logs).await;
    // One 45 s task first; once it runs, 400 short ones.
    let long = client.submit(counted_sleep, ("hol-long".to_owned(), 45_000));
    let deadline = Instant::now() + Duration::from_secs(30);
    while starts(&config, "hol-long").await == 0 {
        assert!(Instant::now() < deadline, "the long task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Sleeps and nothing else: the figure compares the transport's
    // overhead and any waiting against the work itself.
    let tap = EventTap::start(&config).await;
    let started = Instant::now();
    let short: Vec<_> = (0..SHORT as i64)
        .map(|i| client.submit(slow_identity, (i, SHORT_MS)))
        .collect();
    let (mut lost, mut unresolved) = (0, 0);
    for (i, future) in short.iter().enumerate() {
        match future.result_timeout(Duration::from_secs(120)).await {
            Ok(value) if value == i as i64 => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            _ => lost += 1,
        }
    }
    let short_s = started.elapsed().as_secs_f64();
    // Every short task's work, spread over the one slot left free.
    let ideal_s = (SHORT as u64 * SHORT_MS) as f64 / 1000.0;
    // The long task has made its point: cancelled, it resolves at once.
    long.cancel();
    match long.result_timeout(Duration::from_secs(30)).await {
        Err(Error::Timeout { .. }) => unresolved += 1,
        Err(Error::Cancelled(_)) => {}
        Err(Error::Task(error)) if error.kind() == ErrorKind::Cancelled => {}
        // Done before the cancel: the short batch waited 45 s behind it,
        // which the bound below reports (after the processes stopped).
        Ok(_) => {}
        other => panic!("the cancelled long task resolved as {other:?}"),
    }
    let max_resolve_s = started.elapsed().as_secs_f64();
    // Completions reported twice (none expected: nothing failed).
    let duplicated = tap.duplicated();
    tap.stop().await;
    let _ = client.close().await;
    stop(&mut children);
    let shed = given_back(&logs);
    for log in &logs {
        let _ = std::fs::remove_file(log);
    }
    println!(
        "chaos head-of-line: faults=1 tasks={} lost={lost} duplicated={duplicated} unresolved={unresolved} max_resolve_s={max_resolve_s:.2} short_s={short_s:.2} ideal_s={ideal_s:.2} shed={shed}",
        SHORT + 1
    );
    let _ = flotilla::purge(&config).await;
    assert_eq!((lost, unresolved), (0, 0));
    assert!(
        short_s <= 1.5 * ideal_s,
        "the short batch took {short_s:.2} s, over 1.5 × the ideal {ideal_s:.2} s: it waited behind the long task"
    );
}

#[tokio::test]
async fn chaos_worker_sigstop_60s() {
    const TASKS: usize = 100;
    const TASK_MS: u64 = 400;
    const STOPPED: Duration = Duration::from_secs(60);
    let cluster = Processes::start("chaos-sigstop").await;
    let config = cluster.config.clone();
    let counters: Vec<String> = (0..TASKS).map(|i| format!("sigstop-{i}")).collect();
    let started = Instant::now();
    let job: Vec<_> = counters
        .iter()
        .map(|counter| {
            cluster
                .client
                .submit(counted_sleep, (counter.clone(), TASK_MS))
        })
        .collect();
    // Early in the job, once both workers run tasks, one stops answering.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = cluster.workers[0].id().to_string();
    let signal = |name: &str| {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(&stopped)
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    };
    signal("STOP");
    let stopped_at = Instant::now();
    let (mut lost, mut unresolved) = (0, 0);
    for future in &job {
        match future.result_timeout(Duration::from_secs(120)).await {
            Ok(starts) if starts >= 1 => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            _ => lost += 1,
        }
    }
    let job_s = started.elapsed().as_secs_f64();
    // The other worker alone (2 slots) runs the whole job in this much;
    // the stopped worker's running tasks come back after at most two
    // missed heartbeats (10 s each); then a margin.
    let alone_s = (TASKS as u64 * TASK_MS) as f64 / 1000.0 / 2.0;
    let bound_s = alone_s + 2.0 * f64::from(transport::WORKER_HEARTBEAT_SECS) + 10.0;
    // The stopped worker resumes: its connection is gone; it must not
    // store what it ran, and it serves again under a new connection.
    tokio::time::sleep(STOPPED.saturating_sub(stopped_at.elapsed())).await;
    signal("CONT");
    let after: Vec<_> = (0..8)
        .map(|i| cluster.client.submit(inc, (1_000 + i,)))
        .collect();
    for (i, future) in after.iter().enumerate() {
        match future.result_timeout(Duration::from_secs(60)).await {
            Ok(value) if value == 1_001 + i as i64 => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            _ => lost += 1,
        }
    }
    let duplicated = reruns(&config, &counters).await;
    let max_resolve_s = started.elapsed().as_secs_f64();
    let reported_twice = cluster.close().await;
    println!(
        "chaos worker-sigstop-60s: faults=1 tasks={} lost={lost} duplicated={duplicated} unresolved={unresolved} max_resolve_s={max_resolve_s:.2} job_s={job_s:.2} bound_s={bound_s:.0} reported_twice={reported_twice}",
        TASKS + after.len()
    );
    assert_eq!((lost, unresolved), (0, 0));
    assert!(
        job_s <= bound_s,
        "the job took {job_s:.2} s, over {bound_s:.0} s: the stopped worker's deliveries were held hostage"
    );
    // At least once: what the stopped worker had started and not yet
    // acknowledged runs again elsewhere (its running tasks, and finished
    // ones whose completion it had not sent). Before the heartbeat and the
    // resume guard, 196 of 200 ran twice; measured since: 4–9, and 14 once
    // on a machine at load 9.
    assert!(
        duplicated <= 20,
        "only what the stopped worker had started runs twice, not {duplicated}"
    );
}
