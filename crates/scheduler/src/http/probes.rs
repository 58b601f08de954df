//! The loops that keep the endpoint's picture fresh: each scheduler
//! snapshot becomes a history sample, and every [`PROBE_EVERY`] the queue
//! depths (passive declares) and Redis `INFO memory` are read over the
//! endpoint's own connections.

use super::metrics::{QueueDepth, RedisMemory};
use super::Shared;
use flotilla_runtime::transport::{self, name};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often queue depths and Redis memory are read.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Limit on one broker or Redis round trip of the probes and the tap.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads `used_memory`, `used_memory_peak`, `used_memory_rss` and
/// `maxmemory` from the text of `INFO memory`.
fn parse_redis_memory(info: &str) -> Option<RedisMemory> {
    let mut memory = RedisMemory::default();
    let mut found = false;
    for line in info.lines() {
        let Some((field, value)) = line.trim().split_once(':') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        match field {
            "used_memory" => {
                memory.used = value;
                found = true;
            }
            "used_memory_peak" => memory.peak = value,
            "used_memory_rss" => memory.rss = value,
            "maxmemory" => memory.maxmemory = value,
            _ => {}
        }
    }
    found.then_some(memory)
}

/// Turns each scheduler snapshot into a history sample.
pub(super) async fn sample_loop(shared: Arc<Shared>) {
    let mut status = shared.status.clone();
    while status.changed().await.is_ok() {
        let snapshot = status.borrow_and_update().clone();
        shared.monitor().on_snapshot(&snapshot, Instant::now());
    }
}

/// Copies each change of the scheduler's broker watch into the monitor.
pub(super) async fn broker_loop(shared: Arc<Shared>) {
    let mut broker = shared.broker.clone();
    loop {
        let status = broker.borrow_and_update().clone();
        shared.monitor().broker = status;
        if broker.changed().await.is_err() {
            return;
        }
    }
}

/// Reads queue depths and Redis memory every [`PROBE_EVERY`].
pub(super) async fn probe_loop(shared: Arc<Shared>) {
    let mut amqp: Option<(lapin::Connection, lapin::Channel)> = None;
    let mut redis: Option<flotilla_runtime::Redis> = None;
    let mut missing = HashMap::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.monitor().last_snapshot.is_none() {
            // The scheduler has not declared its queues yet.
            continue;
        }
        let mut queues = vec![
            shared.names.tasks_queue(),
            shared.names.scheduler_queue(),
            shared.names.scheduler_events_queue(),
            shared.names.dead_letter_queue(),
        ];
        queues.extend(
            shared
                .snapshot()
                .workers
                .iter()
                .map(|w| shared.names.worker_queue(&w.id)),
        );
        let mut errors = Vec::new();
        let depths = match probe_queues(&shared, &mut amqp, &queues, &mut missing).await {
            Ok(depths) => depths,
            Err(error) => {
                errors.push(format!("RabbitMQ: {error}"));
                Vec::new()
            }
        };
        let memory = match probe_redis(&shared, &mut redis).await {
            Ok(memory) => memory,
            Err(error) => {
                errors.push(format!("Redis: {error}"));
                None
            }
        };
        let mut monitor = shared.monitor();
        monitor.queues = depths;
        monitor.redis = memory;
        monitor.probe_error = (!errors.is_empty()).then(|| errors.join("; "));
    }
}

/// How long a queue found missing is not asked for again (each miss costs a
/// channel, and lapin logs it as an error).
const MISSING_RECHECK: Duration = Duration::from_secs(60);

async fn probe_queues(
    shared: &Shared,
    amqp: &mut Option<(lapin::Connection, lapin::Channel)>,
    queues: &[String],
    missing: &mut HashMap<String, Instant>,
) -> Result<Vec<QueueDepth>, String> {
    if amqp
        .as_ref()
        .is_some_and(|(connection, _)| !connection.status().connected())
    {
        *amqp = None;
    }
    if amqp.is_none() {
        let label = format!("flotilla-scheduler-http ({})", shared.names.namespace());
        let connection = within(transport::connect_amqp(&shared.amqp_url, &label)).await?;
        let channel = within(connection.create_channel()).await?;
        *amqp = Some((connection, channel));
    }
    let Some((connection, channel)) = amqp.as_mut() else {
        return Err("no connection".to_owned());
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut depths = Vec::with_capacity(queues.len());
    missing.retain(|_, since| since.elapsed() < MISSING_RECHECK);
    for queue in queues {
        if missing.contains_key(queue) {
            depths.push(QueueDepth {
                name: queue.clone(),
                messages: None,
                consumers: None,
            });
            continue;
        }
        if !channel.status().connected() {
            // A passive declare of a missing queue closes the channel.
            *channel = within(connection.create_channel()).await?;
        }
        let declared =
            within(channel.queue_declare(name(queue), passive, FieldTable::default())).await;
        depths.push(QueueDepth {
            name: queue.clone(),
            messages: declared.as_ref().ok().map(|q| q.message_count()),
            consumers: declared.as_ref().ok().map(|q| q.consumer_count()),
        });
        if declared.is_err() {
            if !connection.status().connected() {
                return Err("connection lost".to_owned());
            }
            missing.insert(queue.clone(), Instant::now());
        }
    }
    Ok(depths)
}

async fn probe_redis(
    shared: &Shared,
    redis: &mut Option<flotilla_runtime::Redis>,
) -> Result<Option<RedisMemory>, String> {
    if redis.is_none() {
        *redis = Some(within(transport::connect_redis(&shared.redis_url)).await?);
    }
    let Some(connection) = redis.as_mut() else {
        return Err("no connection".to_owned());
    };
    // On a cluster, every master answers; the fullest one is shown (the
    // first to refuse writes).
    let replies = within(connection.on_masters(redis::cmd("INFO").arg("memory"))).await?;
    let mut fullest: Option<RedisMemory> = None;
    for (_, reply) in replies {
        let info: String = redis::from_redis_value(reply).map_err(|e| e.to_string())?;
        if let Some(memory) = parse_redis_memory(&info) {
            if fullest.as_ref().is_none_or(|f| fill(&memory) > fill(f)) {
                fullest = Some(memory);
            }
        }
    }
    Ok(fullest)
}

/// How full a Redis is, to compare masters: the share of its `maxmemory`
/// in use, or (with no limit) what it uses, as a tiny fraction.
fn fill(memory: &RedisMemory) -> f64 {
    if memory.maxmemory > 0 {
        memory.used as f64 / memory.maxmemory as f64
    } else {
        memory.used as f64 * 1e-18
    }
}

/// Awaits `future` for at most [`IO_TIMEOUT`].
pub(super) async fn within<T, E: std::fmt::Display>(
    future: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(IO_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {IO_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_info_is_read() {
        let info = "# Memory\r\nused_memory:1024\r\nused_memory_human:1.00K\r\nused_memory_peak:2048\r\nused_memory_rss:4096\r\nmaxmemory:0\r\n";
        assert_eq!(
            parse_redis_memory(info),
            Some(RedisMemory {
                used: 1024,
                peak: 2048,
                rss: 4096,
                maxmemory: 0
            })
        );
        assert_eq!(parse_redis_memory("# Memory\r\n"), None);
    }
}
