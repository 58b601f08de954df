//! A RabbitMQ memory alarm in the middle of a workload (scenario
//! `broker-alarm`): the broker blocks every publisher for ~30 s. The
//! scheduler says so (`/api/status`, the dashboard's banner), keeps its
//! two workers although their heartbeats cannot arrive, and once the alarm
//! clears every future resolves, the ones submitted during the alarm
//! included. Executions are counted in Redis (`counted_sleep`), so
//! `duplicated=` is the number of task runs beyond one per task.

use super::*;
use serde_json::Value;

/// How long the alarm holds.
const ALARM: Duration = Duration::from_secs(30);
/// How long the workers are watched after the alarm: past the scheduler's
/// hold of the worker timeout (`flotilla_scheduler::broker::HOLD_AFTER`,
/// 20 s), when a worker the alarm made look silent would be dropped.
const AFTER: Duration = Duration::from_secs(25);

/// `/api/status` of the scheduler at `addr`.
async fn status(addr: &str) -> Option<Value> {
    serde_json::from_str(&http_get(addr, "/api/status").await?).ok()
}

/// Polls `/api/status` until `want` holds for it; the status that did, or
/// `None` after `limit`.
async fn wait_status(addr: &str, limit: Duration, want: impl Fn(&Value) -> bool) -> Option<Value> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = status(addr).await.filter(|s| want(s)) {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// How many times `counted_sleep` started under `counter`.
async fn starts(config: &Config, counter: &str) -> u64 {
    let client = redis::Client::open(config.redis_url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(format!("{}:test:{counter}", config.namespace))
        .query_async::<Option<u64>>(&mut redis)
        .await
        .unwrap()
        .unwrap_or(0)
}

#[tokio::test]
async fn chaos_broker_alarm_is_shown_and_survived() {
    let rabbit = tokio::task::spawn_blocking(PrivateRabbit::start)
        .await
        .unwrap();
    let mut config = support::fresh_config("chaos-alarm");
    config.amqp_url = rabbit.url();
    let addr = format!("127.0.0.1:{}", free_port());
    let logs = std::env::var_os("CHAOS_LOG_DIR").map(std::path::PathBuf::from);
    let cluster = Processes::start_with(config, Some(&addr), logs.as_deref()).await;
    let config = cluster.config.clone();
    wait_status(&addr, Duration::from_secs(30), |s| {
        s["counts"]["workers"] == 2
    })
    .await
    .expect("the scheduler sees both workers");
    let counter = "alarm";
    let n = 80 * scale() as u64;
    // Distinct arguments: equal pure submissions would share one task.
    let submit = |range: std::ops::Range<u64>| -> Vec<TaskFuture<u64>> {
        range
            .map(|i| {
                cluster
                    .client
                    .submit(counted_sleep, (counter.to_owned(), 400 + i))
            })
            .collect()
    };
    let started = Instant::now();
    let mut futures = submit(0..n / 2);
    cluster.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The alarm: any memory use is above a 1-byte watermark.
    let rabbit = Arc::new(rabbit);
    let raise = rabbit.clone();
    tokio::task::spawn_blocking(move || {
        raise.ctl(&["set_vm_memory_high_watermark", "absolute", "1"])
    })
    .await
    .unwrap();
    let raised = Instant::now();
    let blocked = wait_status(&addr, Duration::from_secs(15), |s| {
        s["broker_blocked"] == true
    })
    .await;
    let seen_after = raised.elapsed().as_secs_f64();
    // Submitted while publishers are blocked: these must resolve too.
    futures.extend(submit(n / 2..n));
    // When `flush` returns for them: it must return (here, or once the
    // alarm clears), with no error.
    let flushing = tokio::spawn({
        let client = cluster.client.clone();
        async move {
            let flushed = client.flush().await;
            (flushed, Instant::now())
        }
    });
    let page = http_get(&addr, "/").await.unwrap_or_default();
    // Through the alarm, the workers stay (their heartbeats are held up,
    // they are not gone).
    let mut min_workers = u64::MAX;
    let mut during = None;
    while raised.elapsed() < ALARM {
        if let Some(status) = status(&addr).await {
            min_workers = min_workers.min(status["counts"]["workers"].as_u64().unwrap_or(0));
            during = Some(status);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let clear = rabbit.clone();
    tokio::task::spawn_blocking(move || clear.ctl(&["set_vm_memory_high_watermark", "0.4"]))
        .await
        .unwrap();
    let unblocked = Instant::now();
    let cleared = wait_status(&addr, Duration::from_secs(30), |s| {
        s["broker_blocked"] == false && s["broker"]["last_block_s"].is_number()
    })
    .await;
    let blocked_s = cleared
        .as_ref()
        .and_then(|s| s["broker"]["last_block_s"].as_f64())
        .unwrap_or(0.0);

    let (flushed, flushed_at) = tokio::time::timeout(Duration::from_secs(60), flushing)
        .await
        .expect("flush returns once the alarm cleared")
        .unwrap();
    // Negative: it returned during the alarm.
    let flush_s = if flushed_at >= unblocked {
        (flushed_at - unblocked).as_secs_f64()
    } else {
        -(unblocked - flushed_at).as_secs_f64()
    };
    let (mut lost, mut unresolved, mut slowest) = (0, 0, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(120);
    for future in &futures {
        let left = deadline.saturating_duration_since(Instant::now());
        match future
            .result_timeout(left.max(Duration::from_millis(1)))
            .await
        {
            Ok(count) if count >= 1 => {}
            Err(Error::Timeout { .. }) => unresolved += 1,
            _ => lost += 1,
        }
        slowest = slowest.max(started.elapsed().as_secs_f64());
    }
    // Past the hold after the alarm, the workers are still there.
    while unblocked.elapsed() < AFTER {
        if let Some(status) = status(&addr).await {
            min_workers = min_workers.min(status["counts"]["workers"].as_u64().unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let runs = starts(&config, counter).await;
    let duplicated = runs.saturating_sub(n);
    drop(futures);
    cluster.close().await;
    println!(
        "chaos broker-alarm: faults=1 tasks={n} lost={lost} duplicated={duplicated} unresolved={unresolved} max_resolve_s={slowest:.2} blocked_s={blocked_s:.1} seen_blocked_after_s={seen_after:.1} min_workers={min_workers} runs={runs} flush_after_unblock_s={flush_s:.1}"
    );
    let blocked = blocked.expect("/api/status says broker_blocked during the alarm");
    assert!(
        blocked["broker"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("memory")),
        "the broker's reason is given: {}",
        blocked["broker"]
    );
    let during = during.expect("the status answered during the alarm");
    assert_eq!(
        during["broker_blocked"], true,
        "still blocked late in the alarm"
    );
    assert_eq!(during["broker"]["worker_timeout_held"], true);
    assert!(
        page.contains("id=\"broker-banner\""),
        "the dashboard has the banner"
    );
    assert!(
        cleared.is_some(),
        "/api/status says unblocked after the alarm"
    );
    flushed.expect("a flush during the alarm succeeds");
    assert!(
        blocked_s >= ALARM.as_secs_f64() - 10.0,
        "the block lasted about as long as the alarm: {blocked_s} s"
    );
    assert_eq!(
        min_workers, 2,
        "no worker was declared lost because of the alarm"
    );
    assert_eq!((lost, unresolved), (0, 0));
    drop(rabbit);
}
