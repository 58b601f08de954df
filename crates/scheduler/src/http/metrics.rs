//! What the endpoint has seen, and `GET /metrics`.
//!
//! [`Monitor`] is pure state: the probes and the tap feed it (snapshots,
//! event batches, queue depths, Redis memory), and it renders itself as the
//! JSON of `/api/status` and as the Prometheus text exposition. It does no
//! I/O, so its tests run without a broker.

use super::Shared;
use crate::broker::BrokerStatus;
use crate::core::{Counts, TaskStatus, WorkerStatus};
use crate::failures::ErrorRecord;
use crate::server::Snapshot;
use crate::tally::{Histogram, Outcome, Tally, MAX_NAMES, OTHER};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use flotilla_proto::{Event, EventBatch};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One-second samples kept for the charts (ten minutes).
pub(super) const HISTORY: usize = 600;
/// Per-worker one-second task counts kept for the task stream.
const STREAM: usize = 120;
/// Seconds over which a worker's throughput is averaged.
const RATE_WINDOW: usize = 10;
/// After this long a worker reports a running task with `Event::Started`
/// (the worker runtime's `STARTED_AFTER`).
const STARTED_AFTER_S: f64 = 0.05;
/// Upper bounds of the `flotilla_task_seconds` buckets.
const RUNTIME_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];
/// Running tasks remembered per worker (a bound in case `Finished` events
/// are missed).
const MAX_RUNNING_PER_WORKER: usize = 10_000;
/// Erred tasks listed in `/api/status`.
const ERRED_LISTED: usize = 20;
/// Running tasks listed per worker.
const RUNNING_LISTED: usize = 5;

/// `GET /metrics`: the Prometheus text format; looking starts the event tap.
pub(super) async fn prometheus(State(shared): State<Arc<Shared>>) -> Response {
    shared.watch();
    let snapshot = shared.snapshot();
    let text = shared.monitor().metrics(&snapshot);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// One second of the scheduler's counters.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    at_ms: u64,
    counts: Counts,
    tasks_in_memory: usize,
    redis_used: Option<u64>,
}

/// A worker as seen through its events.
#[derive(Debug, Default)]
pub(super) struct Activity {
    finished: u64,
    erred: u64,
    /// Tasks that reported `Started` and have not ended: key, when seen.
    running: HashMap<String, Instant>,
    /// Tasks ended per second, oldest first: (finished, erred).
    stream: VecDeque<(u32, u32)>,
    counted: (u64, u64),
    last_event: Option<Instant>,
}

impl Activity {
    /// Tasks per second over the last [`RATE_WINDOW`] seconds.
    fn rate(&self) -> f64 {
        let seconds = self.stream.len().clamp(1, RATE_WINDOW);
        let ended: u32 = self
            .stream
            .iter()
            .rev()
            .take(RATE_WINDOW)
            .map(|(finished, erred)| finished + erred)
            .sum();
        f64::from(ended) / seconds as f64
    }
}

#[derive(Debug, Default)]
pub(super) struct TapState {
    pub(super) active: bool,
    pub(super) since: Option<SystemTime>,
    pub(super) error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct QueueDepth {
    pub(super) name: String,
    /// `None` when the queue does not exist (or could not be read).
    pub(super) messages: Option<u32>,
    pub(super) consumers: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RedisMemory {
    pub(super) used: u64,
    pub(super) peak: u64,
    pub(super) rss: u64,
    pub(super) maxmemory: u64,
}

/// The event-fed run times of `flotilla_task_seconds`, over
/// [`RUNTIME_BUCKETS`].
#[derive(Debug, Clone)]
pub(super) struct EventRunTimes(Histogram);

impl Default for EventRunTimes {
    fn default() -> Self {
        EventRunTimes(Histogram::new(&RUNTIME_BUCKETS))
    }
}

impl std::ops::Deref for EventRunTimes {
    type Target = Histogram;
    fn deref(&self) -> &Histogram {
        &self.0
    }
}

impl std::ops::DerefMut for EventRunTimes {
    fn deref_mut(&mut self) -> &mut Histogram {
        &mut self.0
    }
}

#[derive(Debug, Default)]
pub(super) struct Monitor {
    pub(super) history: VecDeque<Sample>,
    pub(super) last_snapshot: Option<Instant>,
    pub(super) workers: HashMap<String, Activity>,
    pub(super) runtime: EventRunTimes,
    pub(super) tap: TapState,
    pub(super) queues: Vec<QueueDepth>,
    pub(super) redis: Option<RedisMemory>,
    pub(super) probe_error: Option<String>,
    /// Whether RabbitMQ blocks publishers (from the scheduler's broker
    /// watch, as it changes).
    pub(super) broker: BrokerStatus,
}

impl Monitor {
    /// Records a snapshot: a history sample, and a task-stream column per
    /// worker seen through events.
    pub(super) fn on_snapshot(&mut self, snapshot: &Snapshot, now: Instant) {
        self.last_snapshot = Some(now);
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Sample {
            at_ms: unix_ms(snapshot.at),
            counts: snapshot.counts,
            tasks_in_memory: snapshot.tasks_in_memory,
            redis_used: self.redis.map(|r| r.used),
        });
        for activity in self.workers.values_mut() {
            let column = (
                (activity.finished - activity.counted.0) as u32,
                (activity.erred - activity.counted.1) as u32,
            );
            activity.counted = (activity.finished, activity.erred);
            if activity.stream.len() == STREAM {
                activity.stream.pop_front();
            }
            activity.stream.push_back(column);
        }
        // Forget workers that left and have been quiet for a while.
        self.workers.retain(|id, activity| {
            snapshot.workers.iter().any(|w| &w.id == id)
                || activity
                    .last_event
                    .is_some_and(|at| now.duration_since(at) < Duration::from_secs(60))
        });
    }

    /// Records a batch of worker events.
    pub(super) fn on_events(&mut self, batch: EventBatch, now: Instant) {
        if batch.worker.is_empty() {
            return;
        }
        let runtime = &mut self.runtime;
        let activity = self.workers.entry(batch.worker).or_default();
        activity.last_event = Some(now);
        for event in batch.events {
            let key = match event {
                Event::Started { key } => {
                    if activity.running.len() < MAX_RUNNING_PER_WORKER {
                        activity.running.insert(key, now);
                    }
                    continue;
                }
                Event::Finished { key, run_us, .. } if run_us > 0 => {
                    // Measured by the worker: exact.
                    activity.finished += 1;
                    activity.running.remove(&key);
                    runtime.observe(Duration::from_micros(run_us));
                    continue;
                }
                Event::Finished { key, .. } => {
                    activity.finished += 1;
                    key
                }
                Event::Erred { key, .. } => {
                    activity.erred += 1;
                    key
                }
                _ => continue,
            };
            runtime.observe_seconds(run_time(activity.running.remove(&key), now));
        }
    }

    /// The tap stopped: what it knew about running tasks goes stale.
    pub(super) fn tap_stopped(&mut self, error: Option<String>) {
        self.tap.active = false;
        self.tap.since = None;
        self.tap.error = error;
        for activity in self.workers.values_mut() {
            activity.running.clear();
        }
    }

    pub(super) fn worker_json(&self, worker: &WorkerStatus, now: Instant, stream: bool) -> Value {
        let activity = self.workers.get(&worker.id);
        let mut running: Vec<(&String, &Instant)> = activity
            .map(|a| a.running.iter().collect())
            .unwrap_or_default();
        running.sort_by_key(|(_, since)| **since);
        let resources: serde_json::Map<String, Value> = worker
            .resources
            .iter()
            .map(|(name, amount)| (name.clone(), json!(amount)))
            .collect();
        let mut value = json!({
            "id": worker.id,
            "name": worker.name,
            "slots": worker.slots,
            "resources": resources,
            "registered_tasks": worker.tasks,
            "last_seen_ms": worker.last_seen_ms,
            "pinned_running": worker.pinned_running,
            "rss_bytes": worker.rss_bytes,
            "cpu_seconds": worker.cpu_ms.map(|ms| ms as f64 / 1000.0),
            "finished": activity.map(|a| a.finished),
            "erred": activity.map(|a| a.erred),
            "rate": activity.map(|a| round3(a.rate())),
            "running_count": running.len(),
            "running": running.iter().take(RUNNING_LISTED).map(|(key, since)| json!({
                "key": key,
                "seconds": round3(STARTED_AFTER_S + now.duration_since(**since).as_secs_f64()),
            })).collect::<Vec<_>>(),
        });
        if stream {
            value["stream"] = json!(activity
                .map(|a| a.stream.iter().map(|(f, e)| [*f, *e]).collect::<Vec<_>>())
                .unwrap_or_default());
        }
        value
    }

    pub(super) fn status_json(&self, snapshot: &Snapshot, history: usize, now: Instant) -> Value {
        let counts = &snapshot.counts;
        let scheduler = match self.last_snapshot {
            None => "starting",
            Some(at) if now.duration_since(at) > Duration::from_secs(5) => "stale",
            Some(_) => "running",
        };
        let mut value = json!({
            "namespace": snapshot.namespace,
            "scheduler": scheduler,
            "at_ms": unix_ms(snapshot.at),
            "uptime_s": round3(snapshot.uptime_s),
            "counts": counts_json(counts),
            "tasks_in_memory": snapshot.tasks_in_memory,
            "role": snapshot.role.as_str(),
            "leader": snapshot.leader,
            "workers": snapshot.workers.iter()
                .map(|w| self.worker_json(w, now, history > 0))
                .collect::<Vec<_>>(),
            "erred": snapshot.erred.iter().take(ERRED_LISTED).map(task_json).collect::<Vec<_>>(),
            "errors_seen": snapshot.recent_errors.seen(),
            "queues": self.queues.iter().map(|q| json!({
                "name": q.name, "messages": q.messages, "consumers": q.consumers,
            })).collect::<Vec<_>>(),
            "redis": self.redis.map(|r| json!({
                "used_memory": r.used,
                "used_memory_peak": r.peak,
                "used_memory_rss": r.rss,
                "maxmemory": r.maxmemory,
            })),
            "probe_error": self.probe_error,
            "broker_blocked": self.broker.blocked,
            "broker": broker_json(&self.broker, now),
            "monitor": {
                "active": self.tap.active,
                "since_ms": self.tap.since.map(unix_ms),
                "error": self.tap.error,
            },
        });
        if history > 0 {
            let skip = self.history.len().saturating_sub(history);
            value["history"] = Value::Array(
                self.history
                    .iter()
                    .skip(skip)
                    .map(|s| {
                        let mut sample = counts_json(&s.counts);
                        sample["at_ms"] = json!(s.at_ms);
                        sample["tasks_in_memory"] = json!(s.tasks_in_memory);
                        sample["redis_used"] = json!(s.redis_used);
                        sample
                    })
                    .collect(),
            );
        }
        value
    }

    /// The Prometheus text exposition.
    pub(super) fn metrics(&self, snapshot: &Snapshot) -> String {
        let mut out = Prometheus::new(&snapshot.namespace);
        let counts = &snapshot.counts;
        out.family(
            "flotilla_tasks",
            "gauge",
            "Tasks in the scheduler's table by state (parked: ready, but no worker can take them).",
        );
        for (state, value) in [
            ("waiting", counts.waiting),
            ("ready", counts.ready),
            ("processing", counts.processing),
            ("parked", counts.parked),
        ] {
            out.sample("flotilla_tasks", &[("state", state)], value);
        }
        out.family(
            "flotilla_tasks_in_memory",
            "gauge",
            "Tasks the scheduler holds in memory, finished ones not yet forgotten included.",
        );
        out.sample("flotilla_tasks_in_memory", &[], snapshot.tasks_in_memory);
        for (metric, help, value) in [
            (
                "flotilla_tasks_submitted_total",
                "Tasks submitted since the scheduler started.",
                counts.submitted,
            ),
            (
                "flotilla_tasks_finished_total",
                "Tasks finished since the scheduler started.",
                counts.finished,
            ),
            (
                "flotilla_tasks_erred_total",
                "Tasks erred since the scheduler started (dependents of erred tasks included).",
                counts.erred,
            ),
            (
                "flotilla_tasks_cancelled_total",
                "Tasks cancelled since the scheduler started.",
                counts.cancelled,
            ),
            (
                "flotilla_tasks_chained_total",
                "Tasks sent since the scheduler started in the delivery of the input they waited for \
                 (a chain: the worker runs them next, without a round trip through the scheduler).",
                counts.chained,
            ),
            (
                "flotilla_tasks_sent_by_clients_total",
                "Tasks their clients published to the task queue themselves since the scheduler \
                 started (a lone task with no input: one broker hop fewer).",
                counts.sent_by_clients,
            ),
        ] {
            out.family(metric, "counter", help);
            out.sample(metric, &[], value);
        }
        out.family("flotilla_workers", "gauge", "Live workers.");
        out.sample("flotilla_workers", &[], counts.workers);
        out.family(
            "flotilla_worker_slots",
            "gauge",
            "Task slots of the live workers.",
        );
        out.sample("flotilla_worker_slots", &[], counts.slots);
        out.family(
            "flotilla_worker_last_seen_seconds",
            "gauge",
            "Seconds since each worker last announced itself.",
        );
        for worker in &snapshot.workers {
            out.sample(
                "flotilla_worker_last_seen_seconds",
                &[("worker", &worker.name), ("id", &worker.id)],
                worker.last_seen_ms as f64 / 1000.0,
            );
        }
        out.family(
            "flotilla_worker_rss_bytes",
            "gauge",
            "Resident memory of each worker's process, as of its last heartbeat (Linux workers).",
        );
        for worker in &snapshot.workers {
            if let Some(rss) = worker.rss_bytes {
                out.sample(
                    "flotilla_worker_rss_bytes",
                    &[("worker", &worker.name), ("id", &worker.id)],
                    rss,
                );
            }
        }
        out.family(
            "flotilla_worker_cpu_seconds_total",
            "counter",
            "CPU time (user and system) each worker's process used, as of its last heartbeat \
             (Linux workers).",
        );
        for worker in &snapshot.workers {
            if let Some(cpu_ms) = worker.cpu_ms {
                out.sample(
                    "flotilla_worker_cpu_seconds_total",
                    &[("worker", &worker.name), ("id", &worker.id)],
                    cpu_ms as f64 / 1000.0,
                );
            }
        }
        out.family(
            "flotilla_worker_tasks_total",
            "counter",
            "Task runs each worker ended, by outcome (counted while the event tap is on).",
        );
        for worker in &snapshot.workers {
            if let Some(activity) = self.workers.get(&worker.id) {
                let labels = |outcome| {
                    [
                        ("worker", &*worker.name),
                        ("id", &worker.id),
                        ("outcome", outcome),
                    ]
                };
                out.sample(
                    "flotilla_worker_tasks_total",
                    &labels("finished"),
                    activity.finished,
                );
                out.sample(
                    "flotilla_worker_tasks_total",
                    &labels("erred"),
                    activity.erred,
                );
            }
        }
        out.family(
            "flotilla_task_seconds",
            "histogram",
            "Run time of tasks on workers, from worker events (counted while the event tap is on): \
             as the worker measured it for a finished task; for an erred one (or an older worker's), \
             from its Started event, a run shorter than 50 ms sending none and counting 0.025 s.",
        );
        out.histogram("flotilla_task_seconds", &[], &self.runtime);
        per_task(&mut out, &snapshot.tally);
        out.family(
            "flotilla_monitor_active",
            "gauge",
            "1 while the endpoint taps worker events (someone watched in the last 5 minutes).",
        );
        out.sample("flotilla_monitor_active", &[], u8::from(self.tap.active));
        out.family(
            "flotilla_queue_messages",
            "gauge",
            "Messages ready in the namespace's RabbitMQ queues.",
        );
        for queue in &self.queues {
            if let Some(messages) = queue.messages {
                out.sample(
                    "flotilla_queue_messages",
                    &[("queue", &queue.name)],
                    messages,
                );
            }
        }
        out.family(
            "flotilla_queue_consumers",
            "gauge",
            "Consumers of the namespace's RabbitMQ queues.",
        );
        for queue in &self.queues {
            if let Some(consumers) = queue.consumers {
                out.sample(
                    "flotilla_queue_consumers",
                    &[("queue", &queue.name)],
                    consumers,
                );
            }
        }
        if let Some(redis) = self.redis {
            out.family(
                "flotilla_redis_used_memory_bytes",
                "gauge",
                "Memory Redis uses (INFO memory used_memory), for every namespace it serves.",
            );
            out.sample("flotilla_redis_used_memory_bytes", &[], redis.used);
            out.family(
                "flotilla_redis_maxmemory_bytes",
                "gauge",
                "Redis's maxmemory setting (0: no limit).",
            );
            out.sample("flotilla_redis_maxmemory_bytes", &[], redis.maxmemory);
        }
        let broker = &self.broker;
        let now = Instant::now();
        for (metric, kind, help, value) in [
            (
                "flotilla_broker_blocked",
                "gauge",
                "1 while RabbitMQ blocks publishers (a memory or disk alarm).",
                u64::from(broker.blocked) as f64,
            ),
            (
                "flotilla_broker_blocked_seconds",
                "gauge",
                "How long the current broker block has lasted (0 when not blocked).",
                round3(broker.blocked_for(now).as_secs_f64()),
            ),
            (
                "flotilla_broker_blocks_total",
                "counter",
                "Broker blocks seen since the scheduler started.",
                broker.blocks as f64,
            ),
            (
                "flotilla_worker_timeout_held",
                "gauge",
                "1 while workers' silence does not count (the broker is blocked, or was unblocked moments ago).",
                u64::from(broker.holds_worker_timeout(now)) as f64,
            ),
        ] {
            out.family(metric, kind, help);
            out.sample(metric, &[], value);
        }
        out.family(
            "flotilla_scheduler_uptime_seconds",
            "gauge",
            "Seconds since the scheduler started.",
        );
        out.sample("flotilla_scheduler_uptime_seconds", &[], snapshot.uptime_s);
        out.text
    }
}

/// The per-task families, from the scheduler's [`Tally`]: how tasks ended
/// and how long their runs took, by task name.
fn per_task(out: &mut Prometheus, tally: &Tally) {
    out.family(
        "flotilla_tasks_total",
        "counter",
        &format!(
            "Tasks that ended since the scheduler started, by task name and outcome (finished, \
             erred, cancelled, lost, timed_out); names past the first {MAX_NAMES} count as \
             task=\"{OTHER}\"."
        ),
    );
    for (task, counts) in tally.iter() {
        for outcome in Outcome::ALL {
            out.sample(
                "flotilla_tasks_total",
                &[("task", task), ("outcome", outcome.as_str())],
                counts.outcome(outcome),
            );
        }
    }
    out.family(
        "flotilla_task_duration_seconds",
        "histogram",
        "Run time of finished tasks as their workers measured it, by task name (always counted; \
         buckets from 100 µs to an hour).",
    );
    for (task, counts) in tally.iter() {
        let runs = counts.duration();
        if runs.count() == 0 {
            continue;
        }
        out.histogram("flotilla_task_duration_seconds", &[("task", task)], runs);
    }
}

/// A task's run time from what the events tell: the `Started` event comes
/// [`STARTED_AFTER_S`] into the run; a run without one was shorter, and is
/// counted at half that.
fn run_time(started: Option<Instant>, now: Instant) -> f64 {
    match started {
        Some(since) => STARTED_AFTER_S + now.duration_since(since).as_secs_f64(),
        None => STARTED_AFTER_S / 2.0,
    }
}

/// The broker's blocked state, for `/api/status`.
fn broker_json(broker: &BrokerStatus, now: Instant) -> Value {
    json!({
        "blocked": broker.blocked,
        "reason": broker.reason,
        "since_ms": broker.since.map(unix_ms),
        "blocked_s": round3(broker.blocked_for(now).as_secs_f64()),
        "blocks": broker.blocks,
        "last_block_s": broker.last_block.map(|d| round3(d.as_secs_f64())),
        "worker_timeout_held": broker.holds_worker_timeout(now),
    })
}

fn counts_json(counts: &Counts) -> Value {
    json!({
        "waiting": counts.waiting,
        "ready": counts.ready,
        "processing": counts.processing,
        "parked": counts.parked,
        "submitted": counts.submitted,
        "finished": counts.finished,
        "erred": counts.erred,
        "cancelled": counts.cancelled,
        "chained": counts.chained,
        "sent_by_clients": counts.sent_by_clients,
        "workers": counts.workers,
        "slots": counts.slots,
    })
}

/// One of the recent errors, for `/api/errors`.
pub(super) fn error_json(record: &ErrorRecord) -> Value {
    json!({
        "at_ms": unix_ms(record.at),
        "key": record.key,
        "task": record.task,
        "kind": format!("{:?}", record.kind),
        "type": record.type_name,
        "message": record.message,
        "traceback": record.traceback,
        "truncated": record.truncated,
        "retrying": record.retrying,
    })
}

pub(super) fn task_json(task: &TaskStatus) -> Value {
    json!({"key": task.key, "task": task.task, "state": task.state, "error": task.error})
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Prometheus text format, every sample labelled with the namespace.
pub(super) struct Prometheus {
    text: String,
    namespace: String,
}

impl Prometheus {
    fn new(namespace: &str) -> Self {
        Prometheus {
            text: String::with_capacity(4096),
            namespace: escape_label(namespace),
        }
    }

    fn family(&mut self, metric: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {metric} {help}");
        let _ = writeln!(self.text, "# TYPE {metric} {kind}");
    }

    /// A histogram's samples: its cumulative `_bucket`s (`le` after
    /// `labels`), `+Inf`, `_sum` and `_count`.
    fn histogram(&mut self, metric: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let bucket = format!("{metric}_bucket");
        let buckets: Vec<(String, u64)> = histogram
            .cumulative()
            .map(|(bound, cumulative)| (bound.to_string(), cumulative))
            .chain(std::iter::once(("+Inf".to_owned(), histogram.count())))
            .collect();
        for (le, cumulative) in &buckets {
            let mut all = labels.to_vec();
            all.push(("le", le));
            self.sample(&bucket, &all, cumulative);
        }
        self.sample(&format!("{metric}_sum"), labels, histogram.sum());
        self.sample(&format!("{metric}_count"), labels, histogram.count());
    }

    fn sample(&mut self, metric: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.text, "{metric}{{namespace=\"{}\"", self.namespace);
        for (label, text) in labels {
            let _ = write!(self.text, ",{label}=\"{}\"", escape_label(text));
        }
        let _ = writeln!(self.text, "}} {value}");
    }
}

/// Escapes a Prometheus label value: backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{ErrorKind, TaskError};

    fn snapshot(workers: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            namespace: "ns".into(),
            at: SystemTime::now(),
            uptime_s: 1.5,
            counts: Counts {
                processing: 2,
                submitted: 5,
                finished: 3,
                workers: workers.len(),
                slots: 2 * workers.len() as u32,
                ..Counts::default()
            },
            workers: workers
                .iter()
                .map(|(id, name)| WorkerStatus {
                    id: (*id).into(),
                    name: (*name).into(),
                    slots: 2,
                    resources: vec![("GPU".into(), 1)],
                    tasks: 3,
                    last_seen_ms: 250,
                    pinned_running: 0,
                    rss_bytes: Some(64 << 20),
                    cpu_ms: Some(2_500),
                })
                .collect(),
            erred: vec![TaskStatus {
                key: "bad".into(),
                task: "t".into(),
                state: "erred",
                error: Some("boom".into()),
            }],
            tasks_in_memory: 4,
            role: crate::server::Role::Active,
            leader: None,
            tally: Tally::default(),
            recent_errors: Default::default(),
        }
    }

    fn batch(worker: &str, events: Vec<Event>) -> EventBatch {
        EventBatch {
            worker: worker.into(),
            events,
        }
    }

    fn finished(key: &str) -> Event {
        Event::Finished {
            key: key.into(),
            inline: None,
            size: 1,
            run_us: 0,
        }
    }

    #[test]
    fn a_run_time_the_worker_measured_is_taken_as_it_is() {
        let mut monitor = Monitor::default();
        let start = Instant::now();
        let measured = |key: &str, run_us| Event::Finished {
            key: key.into(),
            inline: None,
            size: 1,
            run_us,
        };
        // A 150 ms run whose Started event was not seen, and a 200 µs one.
        monitor.on_events(
            batch("w1", vec![measured("slow", 150_000), measured("tiny", 200)]),
            start,
        );
        assert_eq!(monitor.runtime.count, 2);
        assert_eq!(monitor.runtime.buckets[0], 1, "200 µs is under 50 ms");
        assert!((monitor.runtime.sum - 0.1502).abs() < 1e-9);
        // Its Started event, seen before, is no longer running.
        monitor.on_events(batch("w1", vec![Event::Started { key: "x".into() }]), start);
        monitor.on_events(batch("w1", vec![measured("x", 3_000_000)]), start);
        let w1 = snapshot(&[("w1", "alpha")]);
        assert_eq!(
            monitor.worker_json(&w1.workers[0], start, false)["running_count"],
            0
        );
        assert!((monitor.runtime.sum - 3.1502).abs() < 1e-9);
    }

    #[test]
    fn events_give_throughput_running_tasks_and_run_times() {
        let mut monitor = Monitor::default();
        let start = Instant::now();
        let w1 = snapshot(&[("w1", "alpha")]);
        monitor.on_events(
            batch(
                "w1",
                vec![Event::Started { key: "long".into() }, finished("short")],
            ),
            start,
        );
        let status = monitor.worker_json(&w1.workers[0], start + Duration::from_secs(2), false);
        assert_eq!(status["running_count"], 1);
        assert_eq!(status["running"][0]["key"], "long");
        assert_eq!(status["running"][0]["seconds"], 2.05);
        monitor.on_events(
            batch(
                "w1",
                vec![
                    finished("long"),
                    Event::Erred {
                        key: "e".into(),
                        error: TaskError::new(ErrorKind::User, "E", "x"),
                        retrying: false,
                    },
                ],
            ),
            start + Duration::from_secs(3),
        );
        assert_eq!(monitor.runtime.count, 3);
        // Two runs under 50 ms in the first bucket, one of ~3 s in le=5.
        assert_eq!(monitor.runtime.buckets[0], 2);
        assert_eq!(monitor.runtime.buckets[6], 1);
        assert!((monitor.runtime.sum - (0.025 * 2.0 + 3.05)).abs() < 1e-9);

        monitor.on_snapshot(&w1, start + Duration::from_secs(3));
        let worker = monitor.worker_json(&w1.workers[0], start, true);
        assert_eq!(worker["finished"], 2);
        assert_eq!(worker["erred"], 1);
        assert_eq!(worker["stream"], json!([[2, 1]]));
        assert_eq!(worker["rate"], 3.0);
        assert_eq!(worker["running_count"], 0);
        monitor.on_snapshot(&w1, start + Duration::from_secs(4));
        assert_eq!(
            monitor.worker_json(&w1.workers[0], start, true)["stream"],
            json!([[2, 1], [0, 0]])
        );

        // Scheduler events (no worker) are not per-worker activity; a worker
        // gone from the snapshot and quiet is forgotten.
        monitor.on_events(batch("", vec![finished("x")]), start);
        assert_eq!(monitor.runtime.count, 3);
        monitor.on_snapshot(&snapshot(&[]), start + Duration::from_secs(120));
        assert!(monitor.workers.is_empty());
        assert_eq!(monitor.history.len(), 3);
    }

    #[test]
    fn history_is_bounded() {
        let mut monitor = Monitor::default();
        let now = Instant::now();
        for _ in 0..HISTORY + 10 {
            monitor.on_snapshot(&snapshot(&[]), now);
        }
        assert_eq!(monitor.history.len(), HISTORY);
        let status = monitor.status_json(&snapshot(&[]), 5, now);
        assert_eq!(status["history"].as_array().unwrap().len(), 5);
        assert_eq!(status["scheduler"], "running");
        assert!(monitor.status_json(&snapshot(&[]), 0, now)["history"].is_null());
    }

    #[test]
    fn status_json_has_what_the_dashboard_reads() {
        let mut monitor = Monitor::default();
        let snap = snapshot(&[("w1", "alpha")]);
        let now = Instant::now();
        assert_eq!(monitor.status_json(&snap, 0, now)["scheduler"], "starting");
        monitor.on_snapshot(&snap, now);
        monitor.redis = Some(RedisMemory {
            used: 10,
            peak: 20,
            rss: 30,
            maxmemory: 0,
        });
        let status = monitor.status_json(&snap, 10, now);
        assert_eq!(status["namespace"], "ns");
        assert_eq!(status["counts"]["processing"], 2);
        assert_eq!(status["workers"][0]["name"], "alpha");
        assert_eq!(status["workers"][0]["resources"]["GPU"], 1);
        assert_eq!(status["workers"][0]["rss_bytes"], 64 << 20);
        assert_eq!(status["workers"][0]["cpu_seconds"], 2.5);
        assert_eq!(status["erred"][0]["error"], "boom");
        assert_eq!(status["redis"]["used_memory"], 10);
        assert_eq!(status["history"][0]["finished"], 3);
        assert_eq!(status["monitor"]["active"], false);
        assert_eq!(
            monitor.status_json(&snap, 0, now + Duration::from_secs(6))["scheduler"],
            "stale"
        );
    }

    #[test]
    fn a_blocked_broker_shows_in_the_status_and_the_metrics() {
        let mut monitor = Monitor::default();
        let snap = snapshot(&[("w1", "alpha")]);
        let now = Instant::now();
        let status = monitor.status_json(&snap, 0, now);
        assert_eq!(status["broker_blocked"], false);
        assert_eq!(status["broker"]["worker_timeout_held"], false);
        assert!(monitor
            .metrics(&snap)
            .contains("flotilla_broker_blocked{namespace=\"ns\"} 0\n"));
        let since = SystemTime::now() - Duration::from_secs(3);
        monitor.broker = BrokerStatus {
            blocked: true,
            reason: Some("low on memory".into()),
            since: Some(since),
            started: Some(now - Duration::from_secs(3)),
            ended: None,
            last_block: None,
            blocks: 1,
        };
        let status = monitor.status_json(&snap, 0, now);
        assert_eq!(status["broker_blocked"], true);
        assert_eq!(status["broker"]["reason"], "low on memory");
        assert_eq!(status["broker"]["since_ms"], unix_ms(since));
        assert_eq!(status["broker"]["blocked_s"], 3.0);
        assert_eq!(status["broker"]["worker_timeout_held"], true);
        assert_eq!(status["workers"][0]["name"], "alpha");
        let text = monitor.metrics(&snap);
        for line in [
            "flotilla_broker_blocked{namespace=\"ns\"} 1\n",
            "flotilla_broker_blocks_total{namespace=\"ns\"} 1\n",
            "flotilla_worker_timeout_held{namespace=\"ns\"} 1\n",
            "# TYPE flotilla_broker_blocked_seconds gauge\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn per_task_families_come_from_the_scheduler_tally() {
        let monitor = Monitor::default();
        let mut snap = snapshot(&[]);
        snap.tally.count("app::add", Outcome::Finished);
        snap.tally.count("app::add", Outcome::Finished);
        snap.tally.count("app::add", Outcome::Lost);
        snap.tally.observe("app::add", Duration::from_micros(80));
        snap.tally.observe("app::add", Duration::from_millis(20));
        snap.tally.count("app::\"odd\"", Outcome::Cancelled);
        let text = monitor.metrics(&snap);
        for line in [
            "# TYPE flotilla_tasks_total counter",
            "flotilla_tasks_total{namespace=\"ns\",task=\"app::add\",outcome=\"finished\"} 2",
            "flotilla_tasks_total{namespace=\"ns\",task=\"app::add\",outcome=\"erred\"} 0",
            "flotilla_tasks_total{namespace=\"ns\",task=\"app::add\",outcome=\"lost\"} 1",
            "flotilla_tasks_total{namespace=\"ns\",task=\"app::\\\"odd\\\"\",outcome=\"cancelled\"} 1",
            "# TYPE flotilla_task_duration_seconds histogram",
            "flotilla_task_duration_seconds_bucket{namespace=\"ns\",task=\"app::add\",le=\"0.0001\"} 1",
            "flotilla_task_duration_seconds_bucket{namespace=\"ns\",task=\"app::add\",le=\"0.01\"} 1",
            "flotilla_task_duration_seconds_bucket{namespace=\"ns\",task=\"app::add\",le=\"0.05\"} 2",
            "flotilla_task_duration_seconds_bucket{namespace=\"ns\",task=\"app::add\",le=\"3600\"} 2",
            "flotilla_task_duration_seconds_bucket{namespace=\"ns\",task=\"app::add\",le=\"+Inf\"} 2",
            "flotilla_task_duration_seconds_sum{namespace=\"ns\",task=\"app::add\"} 0.02008",
            "flotilla_task_duration_seconds_count{namespace=\"ns\",task=\"app::add\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        assert!(
            !text.contains(
                "flotilla_task_duration_seconds_count{namespace=\"ns\",task=\"app::\\\"odd"
            ),
            "no histogram for a name with no measured run"
        );
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let mut monitor = Monitor::default();
        let snap = snapshot(&[("w1", "quote\"back\\slash")]);
        let now = Instant::now();
        monitor.on_events(batch("w1", vec![finished("a")]), now);
        monitor.queues = vec![QueueDepth {
            name: "ns.tasks".into(),
            messages: Some(7),
            consumers: Some(1),
        }];
        let text = monitor.metrics(&snap);
        for line in [
            "flotilla_tasks{namespace=\"ns\",state=\"processing\"} 2",
            "flotilla_tasks_submitted_total{namespace=\"ns\"} 5",
            "flotilla_workers{namespace=\"ns\"} 1",
            "flotilla_worker_slots{namespace=\"ns\"} 2",
            "flotilla_queue_messages{namespace=\"ns\",queue=\"ns.tasks\"} 7",
            "flotilla_task_seconds_bucket{namespace=\"ns\",le=\"0.05\"} 1",
            "flotilla_task_seconds_bucket{namespace=\"ns\",le=\"1800\"} 1",
            "flotilla_task_seconds_bucket{namespace=\"ns\",le=\"+Inf\"} 1",
            "flotilla_task_seconds_count{namespace=\"ns\"} 1",
            "flotilla_worker_tasks_total{namespace=\"ns\",worker=\"quote\\\"back\\\\slash\",id=\"w1\",outcome=\"finished\"} 1",
            "flotilla_worker_rss_bytes{namespace=\"ns\",worker=\"quote\\\"back\\\\slash\",id=\"w1\"} 67108864",
            "flotilla_worker_cpu_seconds_total{namespace=\"ns\",worker=\"quote\\\"back\\\\slash\",id=\"w1\"} 2.5",
            "# TYPE flotilla_worker_cpu_seconds_total counter",
            "# TYPE flotilla_task_seconds histogram",
            "# TYPE flotilla_tasks_finished_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        assert!(
            !text.contains("flotilla_redis_used_memory_bytes"),
            "only once read"
        );
        assert_eq!(escape_label("a\nb"), "a\\nb");
    }
}
