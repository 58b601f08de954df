//! The scheduler's HTTP endpoint: Prometheus metrics, a JSON status API,
//! operator commands and a live dashboard page.
//!
//! [`bind`] opens the listener and hands back the [`Hooks`] to pass to
//! [`run_with_hooks`](crate::run_with_hooks); [`HttpServer::serve`] answers
//! requests until its task is aborted (or its future dropped).
//!
//! ```no_run
//! # async fn demo(config: flotilla_proto::Config) -> Result<(), Box<dyn std::error::Error>> {
//! let (server, hooks) = flotilla_scheduler::http::bind("127.0.0.1:8787", &config).await?;
//! println!("dashboard on http://{}/", server.local_addr());
//! let http = tokio::spawn(server.serve());
//! flotilla_scheduler::run_with_hooks(config, std::future::pending(), hooks).await?;
//! http.abort();
//! # Ok(()) }
//! ```
//!
//! | route | what |
//! | ----- | ---- |
//! | `GET /` | the live dashboard (one self-contained page, polls `/api/status`) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /api/status[?history=N]` | counts, workers, queues, Redis memory, erred tasks; the last `N` one-second samples |
//! | `GET /api/workers` | the workers |
//! | `GET /api/tasks[?state=S][&limit=N]` | tasks in the scheduler's table (`S`: `waiting`, `ready`, `processing`, `finished`, `erred`) |
//! | `POST /api/cancel?key=K[&key=K2..]` | cancels tasks (and their dependents), running ones included |
//! | `POST /api/retry?key=K[&key=K2..]` | runs erred tasks again |
//!
//! What the endpoint knows comes from three places:
//!
//! - the scheduler's [`Snapshot`], once a second: task counts, workers,
//!   erred tasks;
//! - probes every two seconds, over the endpoint's own connections: queue
//!   depths (passive declares) and Redis `INFO memory`;
//! - while someone watches (a request for `/`, `/api/status`,
//!   `/api/workers` or `/metrics` in the last five minutes), a tap on the
//!   worker events: a private queue `<ns>.monitor.<id>` bound to
//!   `<ns>.events` the way the scheduler's own queue is. It gives each
//!   worker's throughput, the tasks it has been running for more than 50 ms,
//!   and the task run-time histogram. With nobody watching there is no tap,
//!   so an unwatched scheduler does not pay for a second copy of the events.
//!
//! The server is deliberately small: HTTP/1.1, one request per connection
//! (`Connection: close`), request heads up to 16 KiB, at most 64
//! connections at once, ten seconds to send a request.

use crate::core::{Counts, TaskStatus, WorkerStatus};
use crate::server::{Hooks, Snapshot, TaskQuery};
use flotilla_proto::{Config, Event, EventBatch, Names, ToScheduler};
use flotilla_runtime::transport::{self, name};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Where `flotilla-scheduler` serves HTTP unless told otherwise (loopback
/// only; the port is Dask's dashboard port).
pub const DEFAULT_ADDR: &str = "127.0.0.1:8787";

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body read (and ignored): the API takes its arguments
/// from the query string.
const MAX_BODY: usize = 64 * 1024;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// One-second samples kept for the charts (ten minutes).
const HISTORY: usize = 600;
/// Per-worker one-second task counts kept for the task stream.
const STREAM: usize = 120;
/// Seconds over which a worker's throughput is averaged.
const RATE_WINDOW: usize = 10;
/// How long after the last watching request the event tap stays on.
const WATCH_WINDOW: Duration = Duration::from_secs(300);
/// How often queue depths and Redis memory are read.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Limit on one broker or Redis round trip of the probes and the tap.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a task listing may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
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

/// An HTTP endpoint bound to its address, ready to [`serve`](Self::serve).
pub struct HttpServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HttpServer {
    // Not derived: the shared state holds the broker URLs, credentials included.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.listener.local_addr().ok())
            .field("namespace", &self.shared.names.namespace())
            .finish_non_exhaustive()
    }
}

/// Binds `addr` for the scheduler of `config` and returns the server with
/// the [`Hooks`] to pass to [`run_with_hooks`](crate::run_with_hooks).
pub async fn bind(addr: &str, config: &Config) -> std::io::Result<(HttpServer, Hooks)> {
    let listener = TcpListener::bind(addr).await?;
    let (shared, hooks) = Shared::new(config);
    Ok((
        HttpServer {
            listener,
            shared: Arc::new(shared),
        },
        hooks,
    ))
}

impl HttpServer {
    /// The address the server listens on (with the actual port when bound
    /// to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Answers requests, forever; abort the task (or drop the future) to
    /// stop. Also runs the probes and, while someone watches, the event tap.
    pub async fn serve(self) {
        let shared = self.shared;
        let _background = AbortOnDrop(vec![
            tokio::spawn(sample_loop(shared.clone())),
            tokio::spawn(probe_loop(shared.clone())),
            tokio::spawn(tap_loop(shared.clone())),
        ]);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        handle_connection(&shared, stream, peer).await;
                        drop(permit);
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    warn!(%error, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// State shared by the connections and the background loops.
struct Shared {
    names: Names,
    amqp_url: String,
    redis_url: String,
    max_payload: usize,
    /// Checks the signatures of tapped events.
    codec: flotilla_proto::Codec,
    status: watch::Receiver<Arc<Snapshot>>,
    control: mpsc::UnboundedSender<ToScheduler>,
    queries: mpsc::UnboundedSender<TaskQuery>,
    monitor: Mutex<Monitor>,
    /// When the last watching request came.
    watched: Mutex<Option<Instant>>,
    wake_tap: Notify,
}

impl Shared {
    fn new(config: &Config) -> (Shared, Hooks) {
        let names = config.names();
        let (status_tx, status) = watch::channel(Arc::new(Snapshot {
            namespace: names.namespace().to_owned(),
            at: SystemTime::now(),
            uptime_s: 0.0,
            counts: Counts::default(),
            workers: Vec::new(),
            erred: Vec::new(),
            tasks_in_memory: 0,
        }));
        let (control, control_rx) = mpsc::unbounded_channel();
        let (queries, queries_rx) = mpsc::unbounded_channel();
        let shared = Shared {
            names,
            amqp_url: config.amqp_url.clone(),
            redis_url: config.redis_url.clone(),
            max_payload: config.max_payload,
            codec: flotilla_proto::Codec::new(config),
            status,
            control,
            queries,
            monitor: Mutex::new(Monitor::default()),
            watched: Mutex::new(None),
            wake_tap: Notify::new(),
        };
        let hooks = Hooks {
            status: Some(status_tx),
            control: Some(control_rx),
            queries: Some(queries_rx),
        };
        (shared, hooks)
    }

    fn monitor(&self) -> MutexGuard<'_, Monitor> {
        self.monitor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a request that looks at live data: the event tap starts (or
    /// stays on).
    fn watch(&self) {
        *self.watched.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if !self.monitor().tap.active {
            self.wake_tap.notify_one();
        }
    }

    fn is_watched(&self) -> bool {
        self.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < WATCH_WINDOW)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.status.borrow().clone()
    }
}

// ---------------------------------------------------------------------------
// What the endpoint has seen: pure state, updated by the loops below.

/// One second of the scheduler's counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: u64,
    counts: Counts,
    tasks_in_memory: usize,
    redis_used: Option<u64>,
}

/// A worker as seen through its events.
#[derive(Debug, Default)]
struct Activity {
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

/// A Prometheus-style histogram with fixed buckets.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Observations per bucket of [`RUNTIME_BUCKETS`], then above the last.
    buckets: [u64; RUNTIME_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        let bucket = RUNTIME_BUCKETS
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(RUNTIME_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
struct TapState {
    active: bool,
    since: Option<SystemTime>,
    error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct QueueDepth {
    name: String,
    /// `None` when the queue does not exist (or could not be read).
    messages: Option<u32>,
    consumers: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RedisMemory {
    used: u64,
    peak: u64,
    rss: u64,
    maxmemory: u64,
}

#[derive(Debug, Default)]
struct Monitor {
    history: VecDeque<Sample>,
    last_snapshot: Option<Instant>,
    workers: HashMap<String, Activity>,
    runtime: Histogram,
    tap: TapState,
    queues: Vec<QueueDepth>,
    redis: Option<RedisMemory>,
    probe_error: Option<String>,
}

impl Monitor {
    /// Records a snapshot: a history sample, and a task-stream column per
    /// worker seen through events.
    fn on_snapshot(&mut self, snapshot: &Snapshot, now: Instant) {
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
    fn on_events(&mut self, batch: EventBatch, now: Instant) {
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
            runtime.observe(run_time(activity.running.remove(&key), now));
        }
    }

    /// The tap stopped: what it knew about running tasks goes stale.
    fn tap_stopped(&mut self, error: Option<String>) {
        self.tap.active = false;
        self.tap.since = None;
        self.tap.error = error;
        for activity in self.workers.values_mut() {
            activity.running.clear();
        }
    }

    fn worker_json(&self, worker: &WorkerStatus, now: Instant, stream: bool) -> Value {
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

    fn status_json(&self, snapshot: &Snapshot, history: usize, now: Instant) -> Value {
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
            "workers": snapshot.workers.iter()
                .map(|w| self.worker_json(w, now, history > 0))
                .collect::<Vec<_>>(),
            "erred": snapshot.erred.iter().take(ERRED_LISTED).map(task_json).collect::<Vec<_>>(),
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
    fn metrics(&self, snapshot: &Snapshot) -> String {
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
            "Run time of tasks on workers, from worker events (counted while the event tap is on). \
             Runs shorter than 50 ms send no Started event: they land in the first bucket and add 0.025 s to the sum.",
        );
        let mut cumulative = 0;
        for (bound, count) in RUNTIME_BUCKETS.iter().zip(self.runtime.buckets) {
            cumulative += count;
            out.sample(
                "flotilla_task_seconds_bucket",
                &[("le", &bound.to_string())],
                cumulative,
            );
        }
        out.sample(
            "flotilla_task_seconds_bucket",
            &[("le", "+Inf")],
            self.runtime.count,
        );
        out.sample("flotilla_task_seconds_sum", &[], self.runtime.sum);
        out.sample("flotilla_task_seconds_count", &[], self.runtime.count);
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
        out.family(
            "flotilla_scheduler_uptime_seconds",
            "gauge",
            "Seconds since the scheduler started.",
        );
        out.sample("flotilla_scheduler_uptime_seconds", &[], snapshot.uptime_s);
        out.text
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
        "workers": counts.workers,
        "slots": counts.slots,
    })
}

fn task_json(task: &TaskStatus) -> Value {
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
struct Prometheus {
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

// ---------------------------------------------------------------------------
// Background loops.

/// Turns each scheduler snapshot into a history sample.
async fn sample_loop(shared: Arc<Shared>) {
    let mut status = shared.status.clone();
    while status.changed().await.is_ok() {
        let snapshot = status.borrow_and_update().clone();
        shared.monitor().on_snapshot(&snapshot, Instant::now());
    }
}

/// Reads queue depths and Redis memory every [`PROBE_EVERY`].
async fn probe_loop(shared: Arc<Shared>) {
    let mut amqp: Option<(lapin::Connection, lapin::Channel)> = None;
    let mut redis: Option<redis::aio::ConnectionManager> = None;
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
    redis: &mut Option<redis::aio::ConnectionManager>,
) -> Result<Option<RedisMemory>, String> {
    if redis.is_none() {
        *redis = Some(within(transport::connect_redis(&shared.redis_url)).await?);
    }
    let Some(connection) = redis.as_mut() else {
        return Err("no connection".to_owned());
    };
    let info: String = within(redis::cmd("INFO").arg("memory").query_async(connection)).await?;
    Ok(parse_redis_memory(&info))
}

/// Awaits `future` for at most [`IO_TIMEOUT`].
async fn within<T, E: std::fmt::Display>(
    future: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(IO_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {IO_TIMEOUT:?}")),
    }
}

/// Taps the worker events while someone watches.
async fn tap_loop(shared: Arc<Shared>) {
    loop {
        while !shared.is_watched() {
            shared.wake_tap.notified().await;
        }
        let stopped = tap(&shared).await;
        let failed = stopped.is_err();
        if let Err(error) = &stopped {
            warn!(%error, "event tap for the dashboard failed; retrying in 5 s");
        }
        shared.monitor().tap_stopped(stopped.err());
        if failed {
            tokio::time::sleep(IO_TIMEOUT).await;
        }
    }
}

/// One run of the event tap: until nobody watched for [`WATCH_WINDOW`]
/// (`Ok`) or the broker failed (`Err`).
async fn tap(shared: &Shared) -> Result<(), String> {
    let names = &shared.names;
    let label = format!("flotilla-scheduler-monitor ({})", names.namespace());
    let connection = within(transport::connect_amqp(&shared.amqp_url, &label)).await?;
    let result = async {
        let channel = within(connection.create_channel()).await?;
        // The events exchange may not exist yet if the scheduler is starting.
        within(transport::declare_topology(&channel, names)).await?;
        let queue = format!(
            "{}.monitor.{}",
            names.namespace(),
            &flotilla_proto::new_id()[..12]
        );
        // Exclusive and auto-deleted: gone with the tap. No length limit and
        // no TTL, so nothing is ever dead-lettered from it; the consumer
        // takes messages without acknowledgements as they come.
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        within(channel.queue_declare(name(&queue), options, FieldTable::default())).await?;
        within(channel.queue_bind(
            name(&queue),
            name(&names.events_exchange()),
            name(Names::SCHEDULER_BINDING),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        let mut consumer = within(channel.basic_consume(
            name(&queue),
            name("monitor"),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ))
        .await?;
        {
            let mut monitor = shared.monitor();
            monitor.tap.active = true;
            monitor.tap.since = Some(SystemTime::now());
            monitor.tap.error = None;
        }
        info!(queue, "dashboard watching: tapping worker events");
        let mut check = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                delivery = transport::next_delivery(&mut consumer) => match delivery {
                    Some(Ok(delivery)) => {
                        let batch = shared.codec.decode::<EventBatch>(
                            flotilla_proto::Purpose::Events,
                            &delivery.data,
                            shared.max_payload + (1 << 20),
                        );
                        match batch {
                            Ok(batch) => shared.monitor().on_events(batch, Instant::now()),
                            Err(error) => debug!(%error, "undecodable event batch ignored by the tap"),
                        }
                    }
                    Some(Err(error)) => return Err(error.to_string()),
                    None => return Err("the broker cancelled the tap".to_owned()),
                },
                _ = check.tick() => {
                    if !shared.is_watched() {
                        info!("nobody watching: event tap stopped");
                        let _ = channel.close(200, name("nobody watching")).await;
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    let _ = connection.close(200, name("nobody watching")).await;
    result
}

// ---------------------------------------------------------------------------
// HTTP.

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    host: Option<String>,
    origin: Option<String>,
    content_length: usize,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn params<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.query
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The head is larger than [`MAX_HEAD`].
    TooLarge,
    /// The request line or a header is not HTTP/1.x.
    Malformed(&'static str),
}

/// Parses a request head (without the blank line that ends it).
fn parse_head(head: &[u8]) -> Result<Request, HeadError> {
    if head.len() > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let text = std::str::from_utf8(head).map_err(|_| HeadError::Malformed("not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed("bad request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HeadError::Malformed("bad method"));
    }
    if !version.starts_with("HTTP/1.") {
        return Err(HeadError::Malformed("not HTTP/1.x"));
    }
    // Absolute form (`http://host/path`) as proxies send it.
    let target = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |at| &rest[at..]),
        None => target,
    };
    if !target.starts_with('/') {
        return Err(HeadError::Malformed("bad request target"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method: method.to_owned(),
        path: percent_decode(path).ok_or(HeadError::Malformed("bad path"))?,
        query: parse_query(query).ok_or(HeadError::Malformed("bad query"))?,
        host: None,
        origin: None,
        content_length: 0,
    };
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (field, value) = line
            .split_once(':')
            .ok_or(HeadError::Malformed("bad header"))?;
        let value = value.trim();
        if field.eq_ignore_ascii_case("host") {
            request.host = Some(value.to_owned());
        } else if field.eq_ignore_ascii_case("origin") {
            request.origin = Some(value.to_owned());
        } else if field.eq_ignore_ascii_case("content-length") {
            request.content_length = value
                .parse()
                .map_err(|_| HeadError::Malformed("bad content-length"))?;
        } else if field.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::Malformed("request bodies must have a length"));
        }
    }
    Ok(request)
}

/// `a=1&b=x%20y` into pairs; `+` is a space.
fn parse_query(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            Some((
                percent_decode(&name.replace('+', " "))?,
                percent_decode(&value.replace('+', " "))?,
            ))
        })
        .collect()
}

/// Decodes `%XX` escapes; `None` for a broken escape or invalid UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An HTTP response.
#[derive(Debug)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    allow: Option<&'static str>,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
            allow: None,
        }
    }

    fn json(status: u16, value: &Value) -> Self {
        let mut body = serde_json::to_vec(value).unwrap_or_default();
        body.push(b'\n');
        Self::new(status, "application/json", body)
    }

    fn error(status: u16, message: &str) -> Self {
        Self::json(status, &json!({ "error": message }))
    }

    fn method_not_allowed(allow: &'static str) -> Self {
        let mut response = Self::error(405, &format!("method not allowed; use {allow}"));
        response.allow = Some(allow);
        response
    }

    /// The bytes on the wire; `head_only` for `HEAD` requests.
    fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
        );
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

enum ReadError {
    TooLarge,
    Closed,
}

/// Reads until the blank line that ends a request head; returns the head
/// without it.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, ReadError> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream
            .read(&mut chunk)
            .await
            .map_err(|_| ReadError::Closed)?;
        if read == 0 {
            return Err(ReadError::Closed);
        }
        buffer.extend_from_slice(&chunk[..read]);
        for end in [&b"\r\n\r\n"[..], b"\n\n"] {
            if let Some(at) = find(&buffer, end) {
                buffer.truncate(at);
                return Ok(buffer);
            }
        }
        if buffer.len() > MAX_HEAD {
            return Err(ReadError::TooLarge);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What arrived on a connection.
enum Incoming {
    Request(Request),
    /// A request answered without being routed (malformed, too large, too slow).
    Refused(Response),
}

/// Reads a request head; `None` when the client went away.
async fn receive(stream: &mut TcpStream) -> Option<Incoming> {
    let refused = |status, why| Some(Incoming::Refused(Response::error(status, why)));
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(stream)).await {
        Err(_) => return refused(408, "request not received in time"),
        Ok(Err(ReadError::Closed)) => return None,
        Ok(Err(ReadError::TooLarge)) => return refused(431, "request head too large"),
        Ok(Ok(head)) => head,
    };
    match parse_head(&head) {
        Err(HeadError::TooLarge) => refused(431, "request head too large"),
        Err(HeadError::Malformed(why)) => refused(400, why),
        Ok(request) if request.content_length > MAX_BODY => refused(413, "request body too large"),
        Ok(request) => Some(Incoming::Request(request)),
    }
}

async fn handle_connection(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let Some(incoming) = receive(&mut stream).await else {
        return;
    };
    let (response, head_only) = match incoming {
        Incoming::Request(request) => {
            let response = route(shared, &request).await;
            debug!(%peer, method = request.method, path = request.path, status = response.status, "HTTP");
            (response, request.method == "HEAD")
        }
        Incoming::Refused(response) => (response, false),
    };
    let bytes = response.encode(head_only);
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await?;
        // Drain what the client still sends (a body, which the API never
        // needs, or the rest of a head that was too large) until it closes:
        // closing a socket with unread input resets the connection, and the
        // client may lose the answer.
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < MAX_BODY {
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(read)) => drained += read,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Answers one request.
async fn route(shared: &Shared, request: &Request) -> Response {
    let read = matches!(request.method.as_str(), "GET" | "HEAD");
    let path = request.path.trim_end_matches('/');
    match path {
        "" | "/index.html" | "/metrics" | "/api/status" | "/api/workers" | "/api/tasks"
            if !read =>
        {
            Response::method_not_allowed("GET, HEAD")
        }
        "/api/cancel" | "/api/retry" if request.method != "POST" => {
            Response::method_not_allowed("POST")
        }
        "" | "/index.html" => {
            shared.watch();
            Response::new(200, "text/html; charset=utf-8", DASHBOARD)
        }
        "/metrics" => {
            shared.watch();
            let snapshot = shared.snapshot();
            let text = shared.monitor().metrics(&snapshot);
            Response::new(200, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        "/api/status" => {
            shared.watch();
            let history = match request.param("history").map(str::parse::<usize>) {
                None => 0,
                Some(Ok(n)) => n.min(HISTORY),
                Some(Err(_)) => return Response::error(400, "history must be a whole number"),
            };
            let snapshot = shared.snapshot();
            let status = shared
                .monitor()
                .status_json(&snapshot, history, Instant::now());
            Response::json(200, &status)
        }
        "/api/workers" => {
            shared.watch();
            let snapshot = shared.snapshot();
            let now = Instant::now();
            let monitor = shared.monitor();
            let workers: Vec<Value> = snapshot
                .workers
                .iter()
                .map(|w| monitor.worker_json(w, now, false))
                .collect();
            Response::json(200, &Value::Array(workers))
        }
        "/api/tasks" => tasks(shared, request).await,
        "/api/cancel" | "/api/retry" => command(shared, request, path),
        _ => Response::error(404, "no such page; try /, /metrics or /api/status"),
    }
}

async fn tasks(shared: &Shared, request: &Request) -> Response {
    let state = match request.param("state") {
        None | Some("") | Some("all") => None,
        Some("error" | "erred") => Some("erred".to_owned()),
        Some(state @ ("waiting" | "ready" | "processing" | "finished")) => Some(state.to_owned()),
        Some(other) => {
            return Response::error(
                400,
                &format!(
                    "unknown state {other:?}: use waiting, ready, processing, finished or erred"
                ),
            )
        }
    };
    let limit = match request.param("limit").map(str::parse::<usize>) {
        None => 100,
        Some(Ok(limit)) => limit.min(100_000),
        Some(Err(_)) => return Response::error(400, "limit must be a whole number"),
    };
    let (reply, answer) = oneshot::channel();
    let query = TaskQuery {
        state,
        limit,
        reply,
    };
    if shared.queries.send(query).is_err() {
        return Response::error(503, "the scheduler is not running");
    }
    match tokio::time::timeout(QUERY_TIMEOUT, answer).await {
        Ok(Ok(tasks)) => Response::json(200, &Value::Array(tasks.iter().map(task_json).collect())),
        _ => Response::error(503, "the scheduler did not answer in time"),
    }
}

fn command(shared: &Shared, request: &Request, path: &str) -> Response {
    // A page on another site must not be able to cancel tasks through the
    // operator's browser.
    if let Some(origin) = &request.origin {
        let authority = origin.split_once("://").map_or(origin.as_str(), |(_, a)| a);
        if request.host.as_deref() != Some(authority) {
            return Response::error(403, "cross-origin request refused");
        }
    }
    let keys: Vec<String> = request
        .params("key")
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Response::error(400, "name the tasks: ?key=K (repeatable)");
    }
    let (message, verb) = if path == "/api/cancel" {
        (
            ToScheduler::Cancel {
                keys: keys.clone(),
                force: true,
            },
            "cancel",
        )
    } else {
        (ToScheduler::Retry { keys: keys.clone() }, "retry")
    };
    if shared.control.send(message).is_err() {
        return Response::error(503, "the scheduler is not running");
    }
    info!(?keys, verb, "operator command");
    Response::json(202, &json!({ "requested": verb, "keys": keys }))
}

/// The dashboard: one self-contained page (no external resources; the
/// machines it runs on may have no internet access).
const DASHBOARD: &str = r###"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Flotilla dashboard</title>
<style>
:root {
  --bg: #f4f6f9; --card: #fff; --ink: #1b2130; --muted: #687086; --line: #e2e6ee;
  --waiting: #a3acbd; --ready: #f0a92e; --processing: #3b7cf0; --parked: #9b5de5;
  --finished: #1f9d63; --erred: #e0474c; --cancelled: #7d8596; --submitted: #3b7cf0;
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  background: var(--bg); color: var(--ink); }
header { display: flex; align-items: center; gap: 14px; padding: 10px 20px; background: #141a26; color: #eef1f7; }
header h1 { margin: 0; font-size: 17px; font-weight: 650; letter-spacing: .01em; }
header .ns { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #263044; padding: 2px 8px; border-radius: 4px; }
header .grow { flex: 1; }
header .muted { color: #a7b0c3; }
.pill { padding: 2px 10px; border-radius: 999px; font-size: 12px; font-weight: 600; background: #3a4358; }
.pill.ok { background: #1f7a4f; } .pill.warn { background: #a06d12; } .pill.bad { background: #a8323a; }
main { padding: 16px 20px 24px; display: grid; grid-template-columns: repeat(12, minmax(0, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; min-width: 0; }
.card h2 { margin: 0 0 8px; font-size: 13px; font-weight: 650; text-transform: uppercase; letter-spacing: .05em; color: #3b4357; }
.card h2 small { text-transform: none; letter-spacing: 0; font-weight: 400; color: var(--muted); margin-left: 6px; }
.s12 { grid-column: span 12; } .s8 { grid-column: span 8; } .s4 { grid-column: span 4; } .s6 { grid-column: span 6; }
@media (max-width: 900px) { .s8, .s4, .s6 { grid-column: span 12; } }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(86px, 1fr)); gap: 8px; }
.stat { padding: 4px 8px; border-left: 3px solid var(--c, var(--line)); min-width: 0; }
.stat .v { font-size: 20px; font-weight: 650; font-variant-numeric: tabular-nums; white-space: nowrap; }
.stat .l { white-space: nowrap; font-size: 11px; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
.bar { display: flex; height: 16px; border-radius: 4px; overflow: hidden; background: #eef0f4; }
.bar div { height: 100%; transition: width .4s; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin-top: 6px; font-size: 12px; color: var(--muted); }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 5px; background: var(--c); vertical-align: -1px; }
canvas { display: block; width: 100%; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { font-size: 11px; font-weight: 600; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
td.num, th.num { text-align: right; }
td.mono, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
td.wrap { white-space: normal; word-break: break-word; }
.muted { color: var(--muted); }
.note { font-size: 12px; color: var(--muted); margin: 6px 0 0; }
.dot { display: inline-block; width: 8px; height: 8px; border-radius: 50%; margin-right: 6px; background: var(--finished); }
.dot.late { background: var(--ready); } .dot.gone { background: var(--erred); }
.tablewrap { overflow-x: auto; }
</style>
</head>
<body>
<header>
  <h1>Flotilla</h1>
  <span class="ns" id="namespace">…</span>
  <span class="muted" id="uptime"></span>
  <span class="grow"></span>
  <span class="muted" id="updated"></span>
  <span class="pill" id="state">connecting…</span>
</header>
<main>
  <section class="card s12">
    <div class="stats">
      <div class="stat" style="--c: var(--waiting)"><div class="v" id="count-waiting">–</div><div class="l">Waiting</div></div>
      <div class="stat" style="--c: var(--ready)"><div class="v" id="count-ready">–</div><div class="l">Ready</div></div>
      <div class="stat" style="--c: var(--processing)"><div class="v" id="count-processing">–</div><div class="l">Processing</div></div>
      <div class="stat" style="--c: var(--parked)"><div class="v" id="count-parked">–</div><div class="l">Parked</div></div>
      <div class="stat" style="--c: var(--submitted)"><div class="v" id="count-submitted">–</div><div class="l">Submitted</div></div>
      <div class="stat" style="--c: var(--finished)"><div class="v" id="count-finished">–</div><div class="l">Finished</div></div>
      <div class="stat" style="--c: var(--erred)"><div class="v" id="count-erred">–</div><div class="l">Erred</div></div>
      <div class="stat" style="--c: var(--cancelled)"><div class="v" id="count-cancelled">–</div><div class="l">Cancelled</div></div>
      <div class="stat" style="--c: var(--finished)"><div class="v" id="rate-finished">–</div><div class="l">Finished / s</div></div>
      <div class="stat" style="--c: #2b3245"><div class="v" id="count-workers">–</div><div class="l">Workers</div></div>
      <div class="stat" style="--c: #2b3245"><div class="v" id="count-slots">–</div><div class="l">Slots</div></div>
      <div class="stat" style="--c: #c2410c"><div class="v" id="redis-used">–</div><div class="l">Redis used</div></div>
    </div>
    <h2 style="margin-top: 12px">Tasks by state <small id="in-memory"></small></h2>
    <div class="bar" id="state-bar"></div>
    <div class="legend" id="state-legend"></div>
  </section>

  <section class="card s8">
    <h2>Throughput <small id="throughput-span">tasks per second</small></h2>
    <canvas id="throughput" data-height="180"></canvas>
    <div class="legend">
      <span style="--c: var(--submitted)">submitted</span>
      <span style="--c: var(--finished)">finished</span>
      <span style="--c: var(--erred)">erred</span>
      <span style="--c: var(--waiting)">in flight (waiting + ready + processing, right axis)</span>
    </div>
  </section>

  <section class="card s4">
    <h2>Redis memory <small>used_memory, whole server</small></h2>
    <div id="redis-text" class="muted">–</div>
    <canvas id="memory" data-height="138"></canvas>
  </section>

  <section class="card s12">
    <h2>Task stream <small>tasks each worker ended per second (darker: more; red: the share that erred)</small></h2>
    <canvas id="stream" data-height="60"></canvas>
    <p class="note" id="stream-note"></p>
  </section>

  <section class="card s12">
    <h2>Workers <small id="workers-note"></small></h2>
    <div class="tablewrap"><table id="workers">
      <thead><tr><th>Worker</th><th class="num">Slots</th><th>Running now (&gt; 50 ms)</th><th class="num">Tasks / s</th>
        <th class="num">Finished</th><th class="num">Erred</th><th>Last seen</th><th>Resources</th><th>Id</th></tr></thead>
      <tbody></tbody>
    </table></div>
  </section>

  <section class="card s6">
    <h2>Queues <small>RabbitMQ</small></h2>
    <table id="queues"><thead><tr><th>Queue</th><th class="num">Messages</th><th class="num">Consumers</th></tr></thead><tbody></tbody></table>
    <p class="note" id="probe-error"></p>
  </section>

  <section class="card s6">
    <h2>Erred tasks <small id="erred-note"></small></h2>
    <div class="tablewrap"><table id="erred"><thead><tr><th>Key</th><th>Task</th><th>Error</th></tr></thead><tbody></tbody></table></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const STATES = ["waiting", "ready", "processing", "parked"];
const KEEP = 300;
let samples = [];
let lastOk = 0;

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function int(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }
function num(n, digits) {
  if (n == null) return "–";
  return n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(digits == null ? 1 : digits);
}
function bytes(b) {
  if (b == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return (i === 0 ? b : b.toFixed(b >= 100 ? 0 : 1)) + " " + units[i];
}
function duration(s) {
  if (s == null) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + Math.floor(s % 60) + "s";
  const h = Math.floor(m / 60);
  return h < 48 ? h + "h " + (m % 60) + "m" : Math.floor(h / 24) + "d " + (h % 24) + "h";
}

function ago(s) {
  s = Math.round(s);
  return s >= 60 && s % 60 === 0 ? s / 60 + "m" : s + "s";
}

function setState(text, kind) {
  const pill = $("state");
  pill.textContent = text;
  pill.className = "pill " + kind;
}

/// A canvas sized for the device's pixels; returns [context, width, height] in CSS pixels.
function surface(canvas, height) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  canvas.style.height = height + "px";
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  g.font = "11px system-ui, sans-serif";
  return [g, width, height];
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  // Steps whose quarters are round too (the axes have four intervals).
  for (const step of [1, 2, 4, 8, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

/// Line chart over time. series: [{values: [[t, v]...], color, axis: "left"|"right", fill}]
function lineChart(canvas, series, opts) {
  const [g, w, h] = surface(canvas, Number(canvas.dataset.height));
  const pad = { l: opts.left || 48, r: opts.right ? 48 : 10, t: 8, b: 20 };
  const now = opts.now, span = opts.span;
  const x = (t) => pad.l + (w - pad.l - pad.r) * (1 - (now - t) / span);
  // Round ticks in the axis's unit (opts.unit: 1 MiB for memory).
  const unit = opts.unit || 1;
  const maxOf = (axis) => unit * niceMax(Math.max(0, ...series.filter((s) => s.axis === axis)
    .flatMap((s) => s.values.map((p) => p[1] / unit))));
  const maxL = maxOf("left"), maxR = opts.right ? maxOf("right") : 1;
  const yL = (v) => h - pad.b - (h - pad.t - pad.b) * (v / maxL);
  const yR = (v) => h - pad.b - (h - pad.t - pad.b) * (v / maxR);
  g.strokeStyle = css("--line"); g.fillStyle = css("--muted"); g.lineWidth = 1;
  g.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = Math.round(pad.t + (h - pad.t - pad.b) * i / 4) + 0.5;
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke();
    g.textAlign = "right"; g.fillText(opts.format(maxL * (4 - i) / 4), pad.l - 6, y);
    if (opts.right) { g.textAlign = "left"; g.fillText(int(Math.round(maxR * (4 - i) / 4)), w - pad.r + 6, y); }
  }
  g.textAlign = "center"; g.textBaseline = "alphabetic";
  const step = span / 5;
  for (let i = 0; i <= 5; i++) {
    const label = i === 5 ? "now" : "-" + ago((5 - i) * step / 1000);
    g.fillText(label, x(now - (5 - i) * step), h - 5);
  }
  for (const s of series) {
    const pts = s.values.filter((p) => now - p[0] <= span);
    if (pts.length < 2) continue;
    const y = s.axis === "right" ? yR : yL;
    g.beginPath();
    pts.forEach((p, i) => (i ? g.lineTo(x(p[0]), y(p[1])) : g.moveTo(x(p[0]), y(p[1]))));
    if (s.fill) {
      g.lineTo(x(pts[pts.length - 1][0]), y(0)); g.lineTo(x(pts[0][0]), y(0)); g.closePath();
      g.fillStyle = s.fill; g.fill();
    } else {
      g.strokeStyle = s.color; g.lineWidth = 1.8; g.lineJoin = "round"; g.stroke();
    }
  }
}

/// Rates of one counter over `window` samples: [[t, per second]...].
function rates(field, window) {
  const out = [];
  const w = window || 1;
  for (let i = w; i < samples.length; i++) {
    const a = samples[i - w], b = samples[i];
    const dt = (b.at_ms - a.at_ms) / 1000;
    if (dt > 0 && b[field] >= a[field]) out.push([b.at_ms, (b[field] - a[field]) / dt]);
  }
  return out;
}

/// The charts' time span: what has been seen, between one and five minutes.
function span() {
  if (!samples.length) return 60000;
  const seen = samples[samples.length - 1].at_ms - samples[0].at_ms;
  return Math.min(KEEP * 1000, Math.max(60000, Math.ceil(seen / 60000) * 60000));
}

function drawThroughput() {
  if (!samples.length) return;
  const now = samples[samples.length - 1].at_ms;
  lineChart($("throughput"), [
    { values: samples.map((s) => [s.at_ms, s.waiting + s.ready + s.processing]), axis: "right", fill: "rgba(163,172,189,.25)" },
    { values: rates("submitted", 3), color: css("--submitted"), axis: "left" },
    { values: rates("finished", 3), color: css("--finished"), axis: "left" },
    { values: rates("erred", 3), color: css("--erred"), axis: "left" },
  ], { now, span: span(), right: true, format: (v) => num(v, v < 10 ? 1 : 0) });
  $("throughput-span").textContent = "tasks per second (3 s average), last " + ago(span() / 1000).replace("m", " min");
}

function drawMemory() {
  if (!samples.length) return;
  const now = samples[samples.length - 1].at_ms;
  const values = samples.filter((s) => s.redis_used != null).map((s) => [s.at_ms, s.redis_used]);
  lineChart($("memory"), [
    { values, axis: "left", fill: "rgba(194,65,12,.15)" },
    { values, color: "#c2410c", axis: "left" },
  ], { now, span: span(), right: false, format: bytes, unit: 1048576, left: 64 });
}

function drawStream(workers, tapActive) {
  const canvas = $("stream");
  const rows = workers.slice().sort((a, b) => a.name.localeCompare(b.name));
  const rowH = 18, top = 4, labelW = 150, columns = Math.min(120, span() / 1000);
  const [g, w, h] = surface(canvas, Math.max(40, top + rows.length * (rowH + 3) + 18));
  const cellW = (w - labelW - 8) / columns;
  let max = 1;
  for (const r of rows) for (const c of r.stream || []) max = Math.max(max, c[0] + c[1]);
  g.textBaseline = "middle";
  rows.forEach((r, i) => {
    const y = top + i * (rowH + 3);
    g.fillStyle = css("--ink"); g.textAlign = "right";
    const label = r.name.length > 22 ? r.name.slice(0, 21) + "…" : r.name;
    g.fillText(label, labelW - 8, y + rowH / 2);
    g.fillStyle = "#f0f2f6"; g.fillRect(labelW, y, w - labelW - 8, rowH);
    const stream = (r.stream || []).slice(-columns);
    const offset = columns - stream.length;
    stream.forEach((c, j) => {
      const total = c[0] + c[1];
      if (!total) return;
      const x0 = labelW + (offset + j) * cellW, cw = Math.max(1, cellW - 1);
      const alpha = 0.3 + 0.7 * total / max;
      // Errors take their share of the cell's height (at least 2 px).
      const red = c[1] ? Math.max(2, Math.round(rowH * c[1] / total)) : 0;
      g.fillStyle = "rgba(31,157,99," + alpha + ")";
      g.fillRect(x0, y + red, cw, rowH - red);
      if (red) { g.fillStyle = "rgba(224,71,76," + Math.max(alpha, 0.8) + ")"; g.fillRect(x0, y, cw, red); }
    });
  });
  g.fillStyle = css("--muted"); g.textAlign = "center"; g.textBaseline = "alphabetic";
  for (let i = 0; i <= 4; i++) {
    const x = labelW + (w - labelW - 8) * i / 4;
    g.fillText(i === 4 ? "now" : "-" + ago(columns * (4 - i) / 4), Math.min(Math.max(x, labelW + 12), w - 20), h - 4);
  }
  $("stream-note").textContent = !rows.length ? "No workers." :
    tapActive ? "Busiest second so far: " + max + " tasks." : "Starting the event tap…";
}

function renderWorkers(status) {
  const tbody = $("workers").tBodies[0];
  const rows = status.workers.slice().sort((a, b) => a.name.localeCompare(b.name));
  tbody.innerHTML = rows.map((w) => {
    const seen = w.last_seen_ms / 1000;
    const dot = seen < 6 ? "" : seen < 20 ? " late" : " gone";
    const running = w.running_count
      ? w.running_count + " · <span class=\"mono\">" + esc(w.running[0].key) + "</span> (" + duration(w.running[0].seconds) + ")"
      : "<span class=\"muted\">–</span>";
    const resources = Object.entries(w.resources).map(([k, v]) => esc(k) + "=" + v).join(", ") || "<span class=\"muted\">–</span>";
    return "<tr class=\"worker\"><td><span class=\"dot" + dot + "\"></span><span class=\"worker-name\">" + esc(w.name) + "</span></td>" +
      "<td class=\"num\">" + w.slots + "</td><td>" + running + "</td>" +
      "<td class=\"num worker-rate\">" + num(w.rate, 1) + "</td>" +
      "<td class=\"num worker-finished\">" + int(w.finished) + "</td><td class=\"num\">" + int(w.erred) + "</td>" +
      "<td>" + duration(seen) + " ago</td><td>" + resources + "</td>" +
      "<td class=\"mono muted\" title=\"" + esc(w.id) + "\">" + esc(w.id.slice(0, 8)) + "</td></tr>";
  }).join("") || "<tr><td colspan=\"9\" class=\"muted\">No worker has announced itself yet.</td></tr>";
  $("workers-note").textContent = rows.length + " live · " + status.counts.slots + " slots" +
    (status.monitor.active ? "" : " · per-worker numbers start with the event tap");
}

function render(status) {
  const c = status.counts;
  $("namespace").textContent = status.namespace;
  document.title = "Flotilla · " + status.namespace;
  $("uptime").textContent = "up " + duration(status.uptime_s);
  for (const k of ["waiting", "ready", "processing", "parked", "submitted", "finished", "erred", "cancelled", "workers", "slots"]) {
    $("count-" + k).textContent = int(c[k]);
  }
  const recent = rates("finished").slice(-5);
  $("rate-finished").textContent = recent.length ? num(recent.reduce((a, p) => a + p[1], 0) / recent.length, 1) : "–";
  $("redis-used").textContent = status.redis ? bytes(status.redis.used_memory) : "–";
  $("redis-text").innerHTML = status.redis
    ? "used <b>" + bytes(status.redis.used_memory) + "</b> · peak " + bytes(status.redis.used_memory_peak) +
      " · rss " + bytes(status.redis.used_memory_rss) + " · limit " + (status.redis.maxmemory ? bytes(status.redis.maxmemory) : "none")
    : "not available";

  const total = STATES.reduce((a, s) => a + c[s], 0);
  $("state-bar").innerHTML = STATES.map((s) => total && c[s]
    ? "<div style=\"width:" + (100 * c[s] / total) + "%;background:var(--" + s + ")\" title=\"" + s + ": " + c[s] + "\"></div>" : "").join("");
  $("state-legend").innerHTML = STATES.map((s) => "<span style=\"--c: var(--" + s + ")\">" + s + " " + int(c[s]) + "</span>").join("") +
    "<span style=\"--c: var(--finished)\">finished " + int(c.finished) + "</span>" +
    "<span style=\"--c: var(--erred)\">erred " + int(c.erred) + "</span>" +
    "<span style=\"--c: var(--cancelled)\">cancelled " + int(c.cancelled) + "</span>";
  $("in-memory").textContent = int(status.tasks_in_memory) + " in the scheduler's memory";

  renderWorkers(status);
  $("queues").tBodies[0].innerHTML = status.queues.map((q) =>
    "<tr><td class=\"mono\">" + esc(q.name) + "</td><td class=\"num\">" + int(q.messages) + "</td><td class=\"num\">" + int(q.consumers) + "</td></tr>"
  ).join("") || "<tr><td colspan=\"3\" class=\"muted\">Not read yet.</td></tr>";
  $("probe-error").textContent = status.probe_error || "";
  $("erred").tBodies[0].innerHTML = status.erred.map((t) =>
    "<tr><td class=\"mono\">" + esc(t.key) + "</td><td class=\"mono\">" + esc(t.task) + "</td><td class=\"wrap\">" + esc(t.error || "") + "</td></tr>"
  ).join("") || "<tr><td colspan=\"3\" class=\"muted\">None.</td></tr>";
  $("erred-note").textContent = c.erred ? int(c.erred) + " since start" : "";

  drawThroughput();
  drawMemory();
  drawStream(status.workers, status.monitor.active);
  if (status.scheduler === "running") setState("live", "ok");
  else if (status.scheduler === "starting") setState("starting", "warn");
  else setState("scheduler not reporting", "bad");
  $("updated").textContent = new Date(status.at_ms).toLocaleTimeString();
}

function merge(history) {
  const last = samples.length ? samples[samples.length - 1].at_ms : 0;
  for (const s of history || []) if (s.at_ms > last) samples.push(s);
  if (samples.length > KEEP + 1) samples = samples.slice(samples.length - KEEP - 1);
}

async function poll() {
  const gap = lastOk ? Math.ceil((Date.now() - lastOk) / 1000) + 2 : KEEP + 1;
  try {
    const response = await fetch("api/status?history=" + Math.min(KEEP + 1, gap), { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const status = await response.json();
    lastOk = Date.now();
    merge(status.history);
    render(status);
  } catch (error) {
    setState("unreachable", "bad");
    $("updated").textContent = String(error.message || error);
  } finally {
    setTimeout(poll, 1000);
  }
}
window.addEventListener("resize", () => { drawThroughput(); drawMemory(); });
poll();
</script>
</body>
</html>
"###;

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{ErrorKind, TaskError};

    fn head(text: &str) -> Result<Request, HeadError> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn request_heads_parse() {
        let request = head(
            "GET /api/tasks?state=erred&limit=5&key=a%2Fb+c HTTP/1.1\r\nHost: h:1\r\nOrigin: http://h:1\r\nContent-Length: 3",
        )
        .unwrap();
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/api/tasks");
        assert_eq!(request.param("state"), Some("erred"));
        assert_eq!(request.param("key"), Some("a/b c"));
        assert_eq!(request.host.as_deref(), Some("h:1"));
        assert_eq!(request.origin.as_deref(), Some("http://h:1"));
        assert_eq!(request.content_length, 3);
        assert_eq!(
            head("GET http://proxy:80/metrics HTTP/1.0").unwrap().path,
            "/metrics"
        );
        assert_eq!(head("GET http://proxy HTTP/1.1").unwrap().path, "/");
        let cancel = head("POST /api/cancel?key=a&key=b&key= HTTP/1.1").unwrap();
        assert_eq!(cancel.params("key").collect::<Vec<_>>(), ["a", "b", ""]);
    }

    #[test]
    fn broken_request_heads_are_refused() {
        for bad in [
            "",
            "GET /",
            "GET / HTTP/1.1 extra",
            "get / HTTP/1.1",
            "GET / HTTP/2",
            "GET nothing HTTP/1.1",
            "GET /%zz HTTP/1.1",
            "GET /?a=%4 HTTP/1.1",
            "GET /%ff HTTP/1.1",
            "GET / HTTP/1.1\r\nno colon",
            "GET / HTTP/1.1\r\nContent-Length: lots",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked",
        ] {
            assert!(matches!(head(bad), Err(HeadError::Malformed(_))), "{bad:?}");
        }
        let big = format!("GET / HTTP/1.1\r\nX: {}", "x".repeat(MAX_HEAD));
        assert_eq!(head(&big), Err(HeadError::TooLarge));
    }

    #[test]
    fn responses_close_and_say_their_length() {
        let response = Response::method_not_allowed("POST");
        let text = String::from_utf8(response.encode(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Connection: close\r\n") && text.contains("Allow: POST\r\n"));
        let body = text.split_once("\r\n\r\n").unwrap().1;
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        let head_only = String::from_utf8(response.encode(true)).unwrap();
        assert!(head_only.ends_with("\r\n\r\n"));
    }

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
                })
                .collect(),
            erred: vec![TaskStatus {
                key: "bad".into(),
                task: "t".into(),
                state: "erred",
                error: Some("boom".into()),
            }],
            tasks_in_memory: 4,
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
        }
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

    fn request(line: &str) -> Request {
        head(line).unwrap()
    }

    #[tokio::test]
    async fn routes_answer_and_commands_reach_the_scheduler() {
        let (shared, mut hooks) = Shared::new(&Config::default());
        let status = |r: &Response| r.status;
        assert_eq!(
            status(&route(&shared, &request("GET /nope HTTP/1.1")).await),
            404
        );
        assert_eq!(
            status(&route(&shared, &request("DELETE / HTTP/1.1")).await),
            405
        );
        assert_eq!(
            status(&route(&shared, &request("GET /api/retry HTTP/1.1")).await),
            405
        );
        assert_eq!(
            status(&route(&shared, &request("GET / HTTP/1.1")).await),
            200
        );
        assert_eq!(
            status(&route(&shared, &request("GET /metrics/ HTTP/1.1")).await),
            200
        );
        assert!(shared.is_watched(), "looking at the page starts the tap");

        let cancel = route(
            &shared,
            &request("POST /api/cancel?key=a&key=b HTTP/1.1\r\nHost: x:1\r\nOrigin: http://x:1"),
        )
        .await;
        assert_eq!(cancel.status, 202);
        let control = hooks.control.as_mut().unwrap();
        assert_eq!(
            control.try_recv().unwrap(),
            ToScheduler::Cancel {
                keys: vec!["a".into(), "b".into()],
                force: true
            }
        );
        let retry = route(&shared, &request("POST /api/retry?key=c HTTP/1.1")).await;
        assert_eq!(retry.status, 202);
        assert_eq!(
            control.try_recv().unwrap(),
            ToScheduler::Retry {
                keys: vec!["c".into()]
            }
        );
        let forged = route(
            &shared,
            &request("POST /api/cancel?key=a HTTP/1.1\r\nHost: x:1\r\nOrigin: http://evil"),
        )
        .await;
        assert_eq!(forged.status, 403);
        assert!(control.try_recv().is_err());

        let mut queries = hooks.queries.take().unwrap();
        let answer = tokio::spawn(async move {
            let query = queries.recv().await.unwrap();
            assert_eq!(query.state.as_deref(), Some("erred"));
            assert_eq!(query.limit, 7);
            let _ = query.reply.send(vec![TaskStatus {
                key: "k".into(),
                task: "t".into(),
                state: "erred",
                error: None,
            }]);
        });
        let tasks = route(
            &shared,
            &request("GET /api/tasks?state=error&limit=7 HTTP/1.1"),
        )
        .await;
        assert_eq!(tasks.status, 200);
        let body: Value = serde_json::from_slice(&tasks.body).unwrap();
        assert_eq!(body[0]["key"], "k");
        answer.await.unwrap();
        drop(hooks);
        let gone = route(&shared, &request("GET /api/tasks HTTP/1.1")).await;
        assert_eq!(gone.status, 503, "the scheduler stopped");
    }
}
