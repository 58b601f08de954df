//! Operating Flotilla: the scheduler binary's HTTP endpoint (Prometheus
//! metrics, the status API, operator commands, the dashboard page in
//! headless Chromium), its CLI subcommands, SIGTERM, and the Docker Compose
//! file checked against the binaries it starts.
//!
//! The scheduler and workers run as the real binaries (`flotilla-scheduler`
//! is built by `scripts/test.sh`, or `cargo build -p flotilla-scheduler`),
//! in a fresh namespace that is purged afterwards.

mod support;

use flotilla::{Client, Config, Error, ErrorKind};
use flotilla_examples::{inc, might_fail, slow_identity};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::process::Spawned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------
// A cluster of real processes.

type Process = Spawned;

fn binary(name: &str) -> PathBuf {
    let path = support::target_binary(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (scripts/test.sh does; or `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// Starts a binary against `config`, collecting its stderr (without colours).
fn spawn(config: &Config, name: &str, program: &str, args: &[&str]) -> Process {
    support::process::spawn(name, &binary(program), args, config)
}

/// A scheduler binary with its HTTP endpoint on a free port, and workers.
struct Ops {
    config: Config,
    addr: String,
    /// The HTTP write token, from the file the scheduler logged.
    token: String,
    token_file: PathBuf,
    scheduler: Process,
    workers: Vec<Process>,
}

impl Ops {
    async fn start(prefix: &str, workers: &[&str]) -> Ops {
        let config = support::fresh_config(prefix);
        let scheduler = spawn(
            &config,
            "scheduler",
            "flotilla-scheduler",
            &["--http-addr", "127.0.0.1:0"],
        );
        // The scheduler logs the address it serves: `url=http://127.0.0.1:PORT/`.
        let started = Instant::now();
        let addr = loop {
            let found = scheduler.log().lines().find_map(|line| {
                let at = line.find("url=http://")? + "url=http://".len();
                Some(line[at..].split('/').next()?.to_owned())
            });
            if let Some(addr) = found {
                break addr;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the scheduler never said where it serves HTTP; its log:\n{}",
                scheduler.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Without --http-token, it writes one to a file and logs where.
        let token_file = scheduler
            .log()
            .lines()
            .find_map(|line| {
                let at = line.find("token_file=")? + "token_file=".len();
                Some(PathBuf::from(line[at..].split_whitespace().next()?))
            })
            .unwrap_or_else(|| panic!("the scheduler names its token file:\n{}", scheduler.log()));
        assert!(
            token_file.ends_with(format!("flotilla-{}.http-token", config.namespace)),
            "{}",
            token_file.display()
        );
        let token = std::fs::read_to_string(&token_file)
            .expect("the token file")
            .trim()
            .to_owned();
        assert!(token.len() >= 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "only its owner may read the token");
        }
        assert!(
            !scheduler.log().contains(&token),
            "the token is never logged"
        );
        let workers = workers
            .iter()
            .map(|name| {
                spawn(
                    &config,
                    name,
                    "flotilla-worker",
                    &["--name", name, "--nthreads", "2"],
                )
            })
            .collect();
        let ops = Ops {
            config,
            addr,
            token,
            token_file,
            scheduler,
            workers,
        };
        ops.wait_for(Duration::from_secs(30), "every worker registered", |s| {
            s["scheduler"].str() == Some("running")
                && s["workers"].items().len() == ops.workers.len()
        })
        .await;
        ops
    }

    async fn get(&self, path: &str) -> (u16, String) {
        get(&self.addr, path).await
    }

    async fn status(&self) -> Json {
        let (code, body) = self.get("/api/status").await;
        assert_eq!(code, 200, "{body}");
        parse_json(&body)
    }

    async fn metrics(&self) -> Metrics {
        let (code, body) = self.get("/metrics").await;
        assert_eq!(code, 200, "{body}");
        Metrics::parse(&body)
    }

    /// Polls `/api/status` until `ready` holds.
    async fn wait_for(&self, limit: Duration, what: &str, ready: impl Fn(&Json) -> bool) -> Json {
        let started = Instant::now();
        loop {
            let status = self.status().await;
            if ready(&status) {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "after {limit:?}, not yet: {what}; status: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `flotilla-scheduler ARGS` (a subcommand) against this cluster.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(binary("flotilla-scheduler"))
            .args(args)
            .env("FLOTILLA_HTTP_ADDR", &self.addr)
            .env("FLOTILLA_AMQP_URL", &self.config.amqp_url)
            .env("FLOTILLA_REDIS_URL", &self.config.redis_url)
            .env("FLOTILLA_NAMESPACE", &self.config.namespace)
            .env_remove("FLOTILLA_HTTP_TOKEN")
            .env_remove("FLOTILLA_HTTP_TOKEN_FILE")
            .env("NO_COLOR", "1")
            .output()
            .expect("run flotilla-scheduler");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        // The processes go first: a scheduler still running would declare
        // its queues and keys again after the purge.
        self.workers.clear();
        self.scheduler.kill();
        let _ = std::fs::remove_file(&self.token_file);
        let config = self.config.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            let _ = runtime.block_on(flotilla::purge(&config));
        })
        .join();
    }
}

/// GETs `path` from the endpoint at `addr` with a real HTTP client;
/// returns the status code and the body.
async fn get(addr: &str, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        let mut answer = agent
            .get(&url)
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = answer.status().as_u16();
        let body = answer.body_mut().read_to_string().expect("a UTF-8 body");
        (status, body)
    })
    .await
    .expect("the GET")
}

/// Sends raw request bytes (for requests no proper client would send);
/// returns the status code and the body.
async fn http(addr: &str, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 20 s")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.contains("Connection: close") && head.contains("Content-Length:"),
        "{head}"
    );
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (code, body.to_owned())
}

// ---------------------------------------------------------------------------
// Prometheus text format, strictly.

/// Samples by metric name and labels (without `namespace`).
#[derive(Debug)]
struct Metrics {
    samples: HashMap<String, f64>,
}

impl Metrics {
    /// Parses the text format, checking that every sample belongs to a
    /// family declared with `# HELP` and `# TYPE`.
    fn parse(text: &str) -> Metrics {
        let mut families: HashMap<String, String> = HashMap::new();
        let mut helped = Vec::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(!help.is_empty(), "{line}");
                helped.push(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
                families.insert(name.to_owned(), kind.to_owned());
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
                let (series, value) = line.rsplit_once(' ').expect("series value");
                let value: f64 = match value {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("value of {line}")),
                };
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => {
                        (name, labels.strip_suffix('}').expect("closing brace"))
                    }
                    None => (series, ""),
                };
                assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "metric name {name}"
                );
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| families.get(*f).map(String::as_str) == Some("histogram"))
                    })
                    .unwrap_or(name);
                assert!(
                    families.contains_key(family) && helped.iter().any(|h| h == family),
                    "{name} has no # HELP / # TYPE"
                );
                let mut kept = Vec::new();
                for label in split_labels(labels) {
                    let (key, quoted) = label.split_once('=').expect("label=value");
                    assert!(
                        quoted.starts_with('"') && quoted.ends_with('"'),
                        "label {label}"
                    );
                    if key != "namespace" {
                        kept.push(label);
                    }
                }
                samples.insert(format!("{name}{{{}}}", kept.join(",")), value);
            }
        }
        Metrics { samples }
    }

    fn get(&self, series: &str) -> f64 {
        let key = if series.contains('{') {
            series.to_owned()
        } else {
            format!("{series}{{}}")
        };
        *self
            .samples
            .get(&key)
            .unwrap_or_else(|| panic!("no sample {key} in {:?}", self.samples.keys()))
    }
}

fn split_labels(labels: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in labels.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

// ---------------------------------------------------------------------------
// JSON answers, read with serde_json.

type Json = serde_json::Value;

/// Parses a JSON answer; panics (with the text) when it is not JSON.
fn parse_json(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Short readers for assertions: `None` / empty when the value is of
/// another kind (or missing: indexing gives `null`).
trait JsonExt {
    fn num(&self) -> Option<f64>;
    fn str(&self) -> Option<&str>;
    fn items(&self) -> &[Json];
}

impl JsonExt for Json {
    fn num(&self) -> Option<f64> {
        self.as_f64()
    }

    fn str(&self) -> Option<&str> {
        self.as_str()
    }

    fn items(&self) -> &[Json] {
        self.as_array().map_or(&[], Vec::as_slice)
    }
}

// ---------------------------------------------------------------------------
// Chains (issue 16): a dependent that waits for one input alone goes in
// that input's delivery, and its worker runs it next.

#[tokio::test]
async fn a_chain_runs_link_after_link_in_its_heads_delivery_and_a_failure_ends_it() {
    let ops = Ops::start("ops-chain", &["chain-alpha", "chain-beta"]).await;
    let client = Client::connect(ops.config.clone()).await.expect("client");
    // The scheduler chains only names it knows to be short.
    assert_eq!(client.submit(inc, (1,)).await.unwrap(), 2);
    assert_eq!(client.submit(might_fail, (3,)).await.unwrap(), 9);
    // The counts are a snapshot taken once a second: read them a tick after.
    let chained = || async {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        ops.metrics().await.get("flotilla_tasks_chained_total")
    };
    let before = chained().await;

    let links = 1_000;
    let mut current = client.submit(inc, (0,));
    for _ in 1..links {
        current = client.submit(inc, (&current,));
    }
    assert_eq!(
        current
            .result_timeout(Duration::from_secs(120))
            .await
            .unwrap(),
        links
    );
    let after = chained().await;
    // Every link but the heads of deliveries (one per 128 at most, plus
    // the links submitted after their input had been sent).
    assert!(
        after - before >= (links / 2) as f64,
        "{} of {links} links were chained",
        after - before
    );

    // A link that fails fails every link after it, with its error, as
    // when they wait at the scheduler.
    // (Its head waits for a slow task, so that the whole chain is
    // submitted before its head is sent.)
    let slow = client.submit(slow_identity, (-11, 300));
    let head = client.submit(inc, (&slow,));
    let failing = client.submit(might_fail, (&head,));
    let mut rest = vec![client.submit(inc, (&failing,))];
    for _ in 0..5 {
        let next = client.submit(inc, (rest.last().unwrap(),));
        rest.push(next);
    }
    assert_eq!(
        head.result_timeout(Duration::from_secs(30)).await.unwrap(),
        -10
    );
    let error = failing
        .result_timeout(Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("Negative value"), "{error}");
    for link in &rest {
        let error = link
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("Negative value"), "{error}");
    }
    let failing_chain = chained().await - after;
    assert!(
        failing_chain >= 7.0,
        "the failing chain went in one delivery: {failing_chain} chained"
    );
    // The worker's logs show no task failing for a missing input.
    for worker in &ops.workers {
        assert!(
            !worker.log().contains("MissingDependency"),
            "{}",
            worker.log()
        );
    }
}

// A lone task with no input goes from its client straight to the task
// queue, and the scheduler counts it as sent (issue 16, item 1).
/// The worker's health file, for Kubernetes' exec probe: written after each
/// heartbeat, so `flotilla-worker --check-health` passes while the worker
/// runs; once the worker is gone the file ages and the check fails,
/// saying why.
#[tokio::test]
async fn the_worker_health_file_follows_its_heartbeats_and_the_check_reads_it() {
    let dir = std::env::temp_dir().join(format!(
        "flotilla-health-{}",
        &flotilla_proto::new_id()[..12]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("worker.health");
    let path = file.to_str().unwrap().to_owned();
    let check = |max_age: &str| {
        std::process::Command::new(binary("flotilla-worker"))
            .args(["--health-file", &path, "--check-health", max_age])
            .output()
            .unwrap()
    };
    let mut p =
        support::process::Processes::start("health-file", &[&["--health-file", &path]]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check("10s").status.success() {
        assert!(Instant::now() < deadline, "no heartbeat noted in 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = std::fs::metadata(&file).unwrap().modified().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = std::fs::metadata(&file).unwrap().modified().unwrap();
    assert!(later > first, "the file is written again at each heartbeat");

    p.kill_workers();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let stale = check("2s");
    let said = String::from_utf8_lossy(&stale.stdout).to_string()
        + &String::from_utf8_lossy(&stale.stderr);
    assert_eq!(stale.status.code(), Some(1), "{said}");
    assert!(said.contains("last heartbeat"), "{said}");
    p.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_lone_task_goes_straight_to_the_workers_and_the_scheduler_keeps_count() {
    let ops = Ops::start("ops-direct", &["direct-alpha", "direct-beta"]).await;
    let client = Client::connect(ops.config.clone()).await.expect("client");
    let metric = |name: &'static str| {
        let ops = &ops;
        async move {
            // The counts are a snapshot taken once a second.
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            ops.metrics().await.get(name)
        }
    };
    let before = metric("flotilla_tasks_sent_by_clients_total").await;
    for i in 0..50 {
        assert_eq!(client.submit(inc, (i,)).await.unwrap(), i + 1);
    }
    let sent = metric("flotilla_tasks_sent_by_clients_total").await - before;
    assert_eq!(sent, 50.0, "every lone task went straight to the workers");

    // A map goes through the scheduler (which bundles it); a task with
    // an input, retries or a priority too.
    let many: Vec<_> = client.map(inc, (0..2_000).map(|i| (i,)));
    let results = client.gather(&many).await.unwrap();
    assert_eq!(results.len(), 2_000);
    let dependent = client.submit(inc, (&many[0],));
    assert_eq!(dependent.await.unwrap(), 2);
    let retried = client.submit_with(inc, (1,)).retries(2).submit();
    assert_eq!(retried.await.unwrap(), 2);
    let failing = client.submit(might_fail, (-1,));
    assert!(failing.await.is_err());
    let after = metric("flotilla_tasks_sent_by_clients_total").await - before;
    assert!(
        after < 50.0 + 100.0,
        "{after}: the map went through the scheduler"
    );

    // Nothing stays processing at the scheduler: every direct task's report
    // found its submission (or the other way round).
    let status = ops
        .wait_for(Duration::from_secs(10), "nothing processing", |s| {
            s["counts"]["processing"].num() == Some(0.0)
        })
        .await;
    assert!(
        status["counts"]["finished"].num().unwrap() >= 2_050.0,
        "{status:?}"
    );
}

// ---------------------------------------------------------------------------
// The HTTP endpoint and the CLI.

#[tokio::test]
async fn metrics_status_api_and_cli_follow_a_workload() {
    let ops = Ops::start("ops-http", &["ops-alpha", "ops-beta"]).await;
    let client = Client::connect(ops.config.clone()).await.expect("client");

    // The status API: the scheduler, its workers, queues and Redis.
    let tasks_queue = format!("{}.tasks", ops.config.namespace);
    let status = ops
        .wait_for(Duration::from_secs(15), "queues and Redis probed", |s| {
            s["redis"]["used_memory"].num().is_some()
                && s["queues"].items().iter().any(|q| {
                    q["name"].str() == Some(tasks_queue.as_str())
                        && q["consumers"].num() == Some(2.0)
                })
        })
        .await;
    assert_eq!(
        status["namespace"].str(),
        Some(ops.config.namespace.as_str())
    );
    assert_eq!(status["counts"]["workers"].num(), Some(2.0));
    assert_eq!(status["counts"]["slots"].num(), Some(4.0));
    let mut names: Vec<&str> = status["workers"]
        .items()
        .iter()
        .filter_map(|w| w["name"].str())
        .collect();
    names.sort();
    assert_eq!(names, ["ops-alpha", "ops-beta"]);
    let tasks_queue = format!("{}.tasks", ops.config.namespace);
    let queue = status["queues"]
        .items()
        .iter()
        .find(|q| q["name"].str() == Some(tasks_queue.as_str()))
        .expect("the shared task queue is probed");
    assert_eq!(
        queue["consumers"].num(),
        Some(2.0),
        "both workers consume it"
    );
    assert!(status["redis"]["used_memory"].num().unwrap() > 0.0);

    // Watching turned the event tap on; wait for it, so the run-time
    // histogram and per-worker counts see the whole workload.
    ops.wait_for(Duration::from_secs(15), "the event tap is on", |s| {
        s["monitor"]["active"] == Json::Bool(true)
    })
    .await;
    let before = ops.metrics().await;
    assert_eq!(before.get("flotilla_workers"), 2.0);
    assert_eq!(before.get("flotilla_worker_slots"), 4.0);
    assert_eq!(before.get("flotilla_monitor_active"), 1.0);
    assert!(before.get("flotilla_redis_used_memory_bytes") > 0.0);
    assert!(
        before.get(&format!(
            "flotilla_queue_messages{{queue=\"{tasks_queue}\"}}"
        )) >= 0.0
    );
    let finished_before = before.get("flotilla_tasks_finished_total");

    // 80 tasks of 150 ms on 4 slots (three seconds or more) and a burst of
    // quick ones: the counters move while they run.
    let quick: Vec<_> = (0..200).map(|i| client.submit(inc, (i,))).collect();
    let slow: Vec<_> = (0..80)
        .map(|i| client.submit(slow_identity, (i, 150)))
        .collect();
    let started = Instant::now();
    let mut seen = vec![finished_before];
    while slow.iter().any(|f| !f.done()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "workload stalled"
        );
        let metrics = ops.metrics().await;
        let finished = metrics.get("flotilla_tasks_finished_total");
        assert!(finished >= *seen.last().unwrap(), "a counter went down");
        if finished > *seen.last().unwrap() {
            seen.push(finished);
        }
        let running = metrics.get("flotilla_tasks{state=\"processing\"}")
            + metrics.get("flotilla_tasks{state=\"ready\"}")
            + metrics.get("flotilla_tasks{state=\"waiting\"}");
        assert!(running <= 280.0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        seen.len() >= 3,
        "finished_total moved while the workload ran: {seen:?}"
    );
    for (i, future) in quick.into_iter().enumerate() {
        assert_eq!(future.await.unwrap(), i as i64 + 1);
    }
    for future in slow {
        future.await.unwrap();
    }
    let started = Instant::now();
    let after = loop {
        let metrics = ops.metrics().await;
        if metrics.get("flotilla_tasks_finished_total") >= finished_before + 280.0
            && metrics.get("flotilla_task_seconds_count") >= 280.0
        {
            break metrics;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the counters caught up: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(after.get("flotilla_tasks_submitted_total") >= 280.0);
    // The slow tasks reported Started, so they are above the first bucket.
    let first = after.get("flotilla_task_seconds_bucket{le=\"0.05\"}");
    let total = after.get("flotilla_task_seconds_bucket{le=\"+Inf\"}");
    assert_eq!(total, after.get("flotilla_task_seconds_count"));
    assert!(
        total - first >= 80.0,
        "80 runs of 150 ms are above 50 ms: {first} of {total} in the first bucket"
    );
    assert!(after.get("flotilla_task_seconds_sum") >= 80.0 * 0.15);
    // Per task name, counted by the scheduler itself (tap or no tap), from
    // the run times the workers measured: 80 runs of 150 ms have a real
    // sum, and the quick ones resolve below 50 ms.
    let per_task = |series: &str, task: &str, more: &str| {
        after.get(&format!(
            "{series}{{task=\"flotilla_examples::{task}\"{more}}}"
        ))
    };
    assert!(per_task("flotilla_tasks_total", "inc", ",outcome=\"finished\"") >= 200.0);
    assert!(
        per_task(
            "flotilla_tasks_total",
            "slow_identity",
            ",outcome=\"finished\""
        ) >= 80.0
    );
    assert_eq!(
        per_task("flotilla_tasks_total", "inc", ",outcome=\"erred\""),
        0.0
    );
    let slow_runs = per_task("flotilla_task_duration_seconds_count", "slow_identity", "");
    assert!(slow_runs >= 80.0, "{slow_runs}");
    let slow_sum = per_task("flotilla_task_duration_seconds_sum", "slow_identity", "");
    assert!(
        (0.15 * slow_runs..0.5 * slow_runs).contains(&slow_sum),
        "measured, not made up: {slow_sum} s over {slow_runs} runs"
    );
    assert_eq!(
        per_task(
            "flotilla_task_duration_seconds_bucket",
            "slow_identity",
            ",le=\"0.1\""
        ),
        0.0
    );
    let quick_runs = per_task("flotilla_task_duration_seconds_count", "inc", "");
    assert!(
        per_task(
            "flotilla_task_duration_seconds_bucket",
            "inc",
            ",le=\"0.01\""
        ) >= 0.9 * quick_runs,
        "an increment takes well under 10 ms"
    );
    let per_worker: f64 = ["ops-alpha", "ops-beta"]
        .iter()
        .map(|name| {
            let id = status["workers"]
                .items()
                .iter()
                .find(|w| w["name"].str() == Some(name))
                .and_then(|w| w["id"].str())
                .unwrap();
            after.get(&format!(
                "flotilla_worker_tasks_total{{worker=\"{name}\",id=\"{id}\",outcome=\"finished\"}}"
            ))
        })
        .sum();
    assert!(
        per_worker >= 280.0,
        "per-worker counts add up: {per_worker}"
    );

    // The CLI reads the same API.
    let (ok, out, err) = ops.cli(&["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&ops.config.namespace) && out.contains("2 live, 4 slots"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("role") && l.ends_with(" active")),
        "the status names the role: {out}"
    );
    let (ok, out, err) = ops.cli(&["workers"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("ops-alpha") && out.contains("ops-beta"),
        "{out}"
    );
    let (ok, out, _) = ops.cli(&["workers", "--json"]);
    assert!(ok && parse_json(&out).items().len() == 2, "{out}");
    // Their heartbeats carry their memory and CPU time, in the API and the
    // metrics: the workers ran 280 tasks, some CPU time is counted.
    let (code, body) = ops.get("/api/workers").await;
    assert_eq!(code, 200);
    let workers = parse_json(&body);
    let metrics = ops.metrics().await;
    for worker in workers.items() {
        let rss = worker["rss_bytes"].num().expect("rss_bytes");
        let cpu = worker["cpu_seconds"].num().expect("cpu_seconds");
        assert!((1e6..1e10).contains(&rss), "{worker:?}");
        assert!(cpu > 0.0, "{worker:?}");
        let labels = format!(
            "{{worker=\"{}\",id=\"{}\"}}",
            worker["name"].str().unwrap(),
            worker["id"].str().unwrap()
        );
        assert!(metrics.get(&format!("flotilla_worker_rss_bytes{labels}")) > 1e6);
        assert!(metrics.get(&format!("flotilla_worker_cpu_seconds_total{labels}")) > 0.0);
    }

    // Erred tasks are listed, with their error.
    let failing = client.submit(might_fail, (-1,));
    assert!(failing.result().await.is_err());
    let key = failing.key().to_owned();
    // The client may hear of the failure (from the worker) before the
    // scheduler does.
    let started = Instant::now();
    loop {
        let (ok, out, err) = ops.cli(&["tasks", "--state", "erred"]);
        assert!(ok, "{err}");
        if out.contains(&key) {
            assert!(out.contains("Negative value"), "{out}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key} listed as erred: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = ops.get("/api/tasks?state=error&limit=5").await;
    assert_eq!(code, 200);
    assert!(parse_json(&body)
        .items()
        .iter()
        .any(|t| t["key"].str() == Some(key.as_str()) && t["state"].str() == Some("erred")));
    // Counted by name once the next snapshot (each second) shows it.
    let erred = "flotilla_tasks_total{task=\"flotilla_examples::might_fail\",outcome=\"erred\"}";
    let started = Instant::now();
    while !ops.metrics().await.samples.contains_key(erred) {
        assert!(started.elapsed() < Duration::from_secs(5), "{erred} shown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ops.metrics().await.get(erred), 1.0);
    let (ok, out, err) = ops.cli(&["retry", &key]);
    assert!(ok && out.contains("retry requested"), "{out}{err}");

    // A failure stays in /api/errors after its future dropped and the
    // scheduler forgot the task.
    let gone = client.submit(might_fail, (-7,));
    assert!(gone.result().await.is_err());
    let gone_key = gone.key().to_owned();
    drop(gone);
    let started = Instant::now();
    let listed = loop {
        let (_, erred) = ops.get("/api/tasks?state=erred").await;
        let (code, errors) = ops.get("/api/errors").await;
        assert_eq!(code, 200);
        let errors = parse_json(&errors);
        let listed = errors
            .items()
            .iter()
            .find(|e| e["key"].str() == Some(gone_key.as_str()))
            .cloned();
        if let Some(listed) = listed.filter(|_| !erred.contains(&gone_key)) {
            break listed;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{gone_key} forgotten, and kept in /api/errors: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(listed["task"].str(), Some("flotilla_examples::might_fail"));
    assert_eq!(listed["kind"].str(), Some("User"));
    assert!(listed["message"].str().unwrap().contains("Negative value"));
    assert!(listed["at_ms"].num().unwrap() > 1.7e12);

    // Cancelling a running task from the CLI reaches the client.
    let long = client.submit(slow_identity, (7, 60_000));
    let long_key = long.key().to_owned();
    let started = Instant::now();
    loop {
        let (ok, out, err) = ops.cli(&["tasks", "--state", "processing"]);
        assert!(ok, "{err}");
        if out.contains(&long_key) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, out, err) = ops.cli(&["cancel", &long_key]);
    assert!(ok && out.contains("cancellation requested"), "{out}{err}");
    match long.result_timeout(Duration::from_secs(15)).await {
        Err(Error::Cancelled(_)) => {}
        Err(Error::Task(e)) if e.kind() == ErrorKind::Cancelled => {}
        other => panic!("cancelled from the CLI: {other:?}"),
    }
    ops.wait_for(Duration::from_secs(5), "the cancellation counted", |s| {
        s["counts"]["cancelled"].num() >= Some(1.0)
    })
    .await;

    // While the scheduler runs, purge refuses.
    let (ok, _, err) = ops.cli(&["purge", "--yes"]);
    assert!(!ok && err.contains("in use"), "{err}");

    client.close().await.expect("client closes");
    let mut ops = ops;
    for worker in &mut ops.workers {
        assert!(worker.terminate().success(), "worker stops on SIGTERM");
    }
    assert!(
        ops.scheduler.terminate().success(),
        "scheduler stops on SIGTERM"
    );
    // A graceful stop logs no error of the AMQP library (it used to log
    // "invalid channel state: Closing" for channels dropped as it stopped).
    for process in ops.workers.iter().chain([&ops.scheduler]) {
        let log = process.log();
        assert!(
            !log.lines()
                .any(|l| l.contains("ERROR") && l.contains("lapin")),
            "{log}"
        );
    }
    let (ok, out, err) = ops.cli(&["status"]);
    assert!(
        !ok && out.is_empty() && err.contains("no scheduler answers"),
        "{err}"
    );
    let (ok, out, err) = ops.cli(&["purge"]);
    assert!(!ok && out.contains("rerun with --yes"), "{out}{err}");
    let (ok, out, err) = ops.cli(&["purge", "--yes"]);
    assert!(ok && out.contains("deleted"), "{out}{err}");
    let mut redis = redis::Client::open(ops.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (_, left): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(ops.config.names().redis_pattern())
        .arg("COUNT")
        .arg(100_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(left.is_empty(), "purge left {left:?}");
}

#[tokio::test]
async fn the_http_server_answers_mistakes_plainly() {
    let ops = Ops::start("ops-errors", &[]).await;
    let addr = ops.addr.clone();
    let token = ops.token.clone();
    let request = |line: &str| format!("{line}\r\nHost: {addr}\r\n\r\n");
    let authorized =
        |line: &str| format!("{line}\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
    for (raw, code) in [
        (request("GET /nope HTTP/1.1"), 404),
        (request("POST /metrics HTTP/1.1"), 405),
        (request("GET /api/cancel?key=x HTTP/1.1"), 405),
        (authorized("POST /api/cancel HTTP/1.1"), 400),
        (request("GET /api/tasks?state=lost HTTP/1.1"), 400),
        (request("GET /api/tasks?limit=many HTTP/1.1"), 400),
        (request("GET /api/status?history=x HTTP/1.1"), 400),
        ("NOT HTTP\r\n\r\n".to_owned(), 400),
        (request("get / HTTP/1.1"), 400),
        (
            format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "x".repeat(20_000)),
            431,
        ),
        (
            format!(
                "POST /api/cancel?key=x HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://evil.example\r\n\r\n"
            ),
            403,
        ),
        (
            format!(
                "POST /api/cancel?key=nothing HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 3\r\n\r\nabc"
            ),
            202,
        ),
        (request("GET /api/tasks?state=waiting&limit=3 HTTP/1.1"), 200),
        (request("GET /api/workers HTTP/1.1"), 200),
        (request("GET /api/status?history=5 HTTP/1.1"), 200),
    ] {
        let (got, body) = http(&addr, &raw).await;
        assert_eq!(got, code, "{raw:.60}: {body}");
        // hyper refuses what is not HTTP before any route sees it, without a body.
        if (400..500).contains(&got) && got != 431 && !raw.starts_with("NOT HTTP") {
            assert!(parse_json(&body)["error"].str().is_some(), "{body}");
        }
    }
    let (code, body) = http(&addr, &request("HEAD / HTTP/1.1")).await;
    assert!(code == 200 && body.is_empty(), "HEAD has no body");

    // Writes need the token, and every request a Host of this server.
    let port = addr.rsplit(':').next().unwrap();
    let cancel = |host: &str, authorization: Option<&str>| {
        let authorization = authorization
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        format!("POST /api/cancel?key=guarded HTTP/1.1\r\nHost: {host}\r\n{authorization}\r\n")
    };
    let good = format!("Bearer {token}");
    let wrong = format!("Bearer {}x", &token[1..]);
    for (raw, code) in [
        (cancel(&addr, None), 401),
        (cancel(&addr, Some(&wrong)), 401),
        (cancel(&addr, Some(&format!("Basic {token}"))), 401),
        (cancel(&format!("evil.example:{port}"), Some(&good)), 421),
        (cancel("localhost", Some(&good)), 421),
        (
            format!("GET /api/status HTTP/1.1\r\nHost: rebound.example:{port}\r\n\r\n"),
            421,
        ),
        (cancel(&format!("localhost:{port}"), Some(&good)), 202),
        (cancel(&addr, Some(&good)), 202),
    ] {
        let (got, body) = http(&addr, &raw).await;
        assert_eq!(got, code, "{raw}: {body}");
        assert!(
            parse_json(&body)["error"].str().is_some() || got == 202,
            "{body}"
        );
    }
    // The scheduler's log is read by a thread: give its last lines a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ops.scheduler.log().matches("operator command").count() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = ops.scheduler.log();
    assert_eq!(
        log.matches("operator command").count(),
        3,
        "only the authorized commands reached the scheduler:\n{log}"
    );
    assert!(!log.contains(&token), "the token is never logged");

    let (code, body) = http(&addr, &request("HEAD / HTTP/1.1")).await;
    assert!(code == 200 && body.is_empty(), "HEAD has no body");
    let (code, body) = ops.get("/").await;
    assert!(code == 200 && body.contains("<canvas id=\"throughput\""));
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "the dashboard loads nothing from elsewhere"
    );

    // A slow client does not hold the server: others are served meanwhile.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET / HT").await.unwrap();
    assert_eq!(ops.get("/api/workers").await.0, 200);
    drop(idle);

    // An address that is taken is an error when asked for explicitly.
    let output = Command::new(binary("flotilla-scheduler"))
        .args(["--http-addr", &addr, "--namespace", &ops.config.namespace])
        .env("FLOTILLA_AMQP_URL", &ops.config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &ops.config.redis_url)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot serve HTTP"));

    // Out-of-range numbers are usage errors (exit 2), not panics.
    for (program, args) in [
        (
            "flotilla-worker",
            &["--nthreads", "2305843009213693952"][..],
        ),
        ("flotilla-worker", &["--nthreads", "0"]),
        ("flotilla-worker", &["--prefetch", "70000"]),
        ("flotilla-scheduler", &["tasks", "--limit", "0"]),
    ] {
        let output = Command::new(binary(program))
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{program} {args:?}: {stderr}"
        );
        assert!(
            stderr.contains("error:") && !stderr.contains("panicked"),
            "{program} {args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_http_server_refuses_smuggling_and_outlasts_idle_connections() {
    let ops = Ops::start("ops-hardening", &[]).await;
    let addr = ops.addr.clone();
    // Requests whose body length two servers could read differently.
    let post = |headers: &str, body: &str| {
        format!("POST /api/cancel?key=smuggled HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n{body}")
    };
    for raw in [
        post("Content-Length: 3\r\nContent-Length: 5\r\n", "abcde"),
        post("Content-Length: 3, 5\r\n", "abcde"),
        post("Content-Length: +3\r\n", "abc"),
        post("Transfer-Encoding: xchunked\r\n", "3\r\nabc\r\n0\r\n\r\n"),
        post("Transfer-Encoding : chunked\r\n", "3\r\nabc\r\n0\r\n\r\n"),
        post(
            "Transfer-Encoding: chunked, identity\r\n",
            "3\r\nabc\r\n0\r\n\r\n",
        ),
        post("Transfer-Encoding:\x0bchunked\r\n", "3\r\nabc\r\n0\r\n\r\n"),
    ] {
        let (code, body) = http(&addr, &raw).await;
        assert_eq!(code, 400, "{raw:?} was not refused: {body}");
    }
    assert!(
        !ops.scheduler.log().contains("smuggled"),
        "no refused request reached the scheduler"
    );

    // Idle and half-sent connections do not starve a status request.
    let mut idle = Vec::new();
    for n in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if n % 2 == 0 {
            stream
                .write_all(b"GET /api/status HTTP/1.1\r\nHo")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    let started = Instant::now();
    let (code, _) = ops.get("/api/status").await;
    assert_eq!(code, 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a status request took {:?} beside 200 idle connections",
        started.elapsed()
    );
    drop(idle);
}

// ---------------------------------------------------------------------------
// The dashboard in a real browser.

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium on `url` with `extra` flags; returns its stdout.
fn chromium(url: &str, extra: &[&str]) -> String {
    let profile =
        std::env::temp_dir().join(format!("flotilla-chromium-{}", flotilla_proto::new_id()));
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&profile);
    reader.join().unwrap()
}

/// The number in the element with `id`, in a dumped DOM.
fn number_by_id(dom: &str, id: &str) -> Option<u64> {
    let at = dom.find(&format!("id=\"{id}\">"))? + id.len() + 6;
    let text: String = dom[at..]
        .chars()
        .take_while(|c| *c != '<')
        .filter(|c| c.is_ascii_digit())
        .collect();
    text.parse().ok()
}

#[tokio::test]
async fn the_dashboard_shows_workers_and_moving_numbers_in_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard test needs a real browser \
         (Debian: apt-get install -y chromium; .ci/run and scripts/test.sh install it)"
    );
    let ops = Ops::start("ops-dash", &["dash-alpha", "dash-beta", "dash-gamma"]).await;
    let client = Client::connect(ops.config.clone()).await.expect("client");
    let url = format!("http://{}/", ops.addr);

    // A steady mixed workload: quick tasks, tasks of a few hundred ms that
    // show as running, and a few failures that stay listed while held.
    let stop = Arc::new(AtomicBool::new(false));
    let workload = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut round = 0i64;
            while !stop.load(Ordering::Relaxed) {
                // Fresh arguments (so fresh keys) every round.
                let quick: Vec<_> = (0..150)
                    .map(|i| client.submit(inc, (round * 1000 + i,)))
                    .collect();
                let slow: Vec<_> = (0..6)
                    .map(|i| client.submit(slow_identity, (round * 1000 + i, 250 + 100 * i as u64)))
                    .collect();
                if round % 4 == 0 && failures.len() < 6 {
                    failures.push(client.submit(might_fail, (-round - 1,)));
                }
                for f in quick {
                    f.await.unwrap();
                }
                for f in slow {
                    f.await.unwrap();
                }
                round += 1;
            }
            failures
        })
    };

    tokio::time::sleep(Duration::from_secs(4)).await;
    let first = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&url, &["--dump-dom"])
    })
    .await
    .unwrap();
    for name in ["dash-alpha", "dash-beta", "dash-gamma"] {
        assert!(
            first.contains(&format!("<span class=\"worker-name\">{name}</span>")),
            "the page lists worker {name}:\n{first}"
        );
    }
    assert!(first.contains(&ops.config.namespace));
    let state = first
        .split("id=\"state\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next());
    assert_eq!(state, Some("live"), "the page says live");
    let role = first
        .split("id=\"role\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next());
    assert_eq!(role, Some("active"), "the page shows the scheduler's role");
    // The broker is fine: its "broker blocked" banner is there, hidden
    // (tests/chaos/alarm.rs checks the status it shows during an alarm).
    let banner = first
        .split("id=\"broker-banner\"")
        .nth(1)
        .and_then(|rest| rest.split('>').next());
    assert!(
        banner.is_some_and(|attributes| attributes.contains("hidden")),
        "the broker banner is hidden: {banner:?}"
    );
    assert_eq!(number_by_id(&first, "count-workers"), Some(3));
    assert_eq!(number_by_id(&first, "count-slots"), Some(6));
    let finished_first = number_by_id(&first, "count-finished").expect("finished count");
    assert!(finished_first > 0, "tasks finished before the first look");

    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&url, &["--dump-dom"])
    })
    .await
    .unwrap();
    let finished_second = number_by_id(&second, "count-finished").expect("finished count");
    assert!(
        finished_second > finished_first,
        "the numbers move: {finished_first} then {finished_second} (workload ended: {})",
        workload.is_finished()
    );
    assert!(
        second.contains("class=\"num worker-finished\">")
            && !second.contains("class=\"num worker-finished\">–<"),
        "per-worker counts are shown"
    );
    // The workload's failures in the recent-errors panel.
    let recent = second.matches("<tr class=\"recent-error\">").count();
    assert!(
        recent >= 1
            && second
                .split("<span class=\"error-message\">")
                .skip(1)
                .any(|rest| rest.starts_with("Negative value")),
        "recent errors are listed: {recent}"
    );
    // Each worker's memory and CPU, from its heartbeats.
    let cells = |class: &str| -> Vec<String> {
        second
            .split(&format!("class=\"num {class}\""))
            .skip(1)
            .map(|rest| {
                rest.split_once('>')
                    .unwrap()
                    .1
                    .split('<')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let memory = cells("worker-rss");
    assert_eq!(memory.len(), 3, "{second}");
    assert!(memory.iter().all(|m| m.ends_with(" MiB")), "{memory:?}");
    let cpu = cells("worker-cpu");
    // The CPU time so far ("0.3 s"; the share of a core shows once the
    // page saw two heartbeats, after its first poll).
    assert!(
        cpu.len() == 3
            && cpu.iter().all(|c| {
                let seconds = c.rsplit(' ').nth(1).and_then(|s| s.parse::<f64>().ok());
                c.ends_with(" s") && seconds.is_some_and(|s| s > 0.0)
            }),
        "the CPU time of each worker: {cpu:?}"
    );

    // A screenshot while the workload runs: into the build directory, or
    // into docs/ with FLOTILLA_UPDATE_SCREENSHOT=1.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let shot = if std::env::var_os("FLOTILLA_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the repository root")
            .join("docs/dashboard.png")
    } else {
        support::target_binary("ops-dashboard.png")
    };
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let url = url.clone();
        let arg = format!("--screenshot={}", shot.display());
        move || chromium(&url, &[&arg, "--window-size=1280,900", "--hide-scrollbars"])
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a real screenshot"
    );

    stop.store(true, Ordering::Relaxed);
    let failures = workload.await.unwrap();
    assert!(!failures.is_empty());
    drop(failures);
    drop(client);
}

// ---------------------------------------------------------------------------
// docker-compose.yml, checked against the binaries.

type Yaml = serde_yaml::Value;

/// Parses YAML (anchors and aliases resolved).
fn parse_yaml(text: &str) -> Yaml {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}): {text}"))
}

/// Short readers for assertions, as for JSON.
trait YamlExt {
    fn str(&self) -> Option<&str>;
    /// The string items of a sequence.
    fn items(&self) -> Vec<&str>;
    /// The string keys of a mapping.
    fn keys(&self) -> Vec<&str>;
}

impl YamlExt for Yaml {
    fn str(&self) -> Option<&str> {
        self.as_str()
    }

    fn items(&self) -> Vec<&str> {
        self.as_sequence()
            .map(|items| items.iter().filter_map(Yaml::as_str).collect())
            .unwrap_or_default()
    }

    fn keys(&self) -> Vec<&str> {
        self.as_mapping()
            .map(|map| map.keys().filter_map(Yaml::as_str).collect())
            .unwrap_or_default()
    }
}

/// `--flag` names in a command line.
fn flags_of(command: &[&str]) -> Vec<String> {
    command
        .iter()
        .filter_map(|arg| arg.strip_prefix("--"))
        .map(|flag| flag.split('=').next().unwrap().to_owned())
        .collect()
}

fn value_of<'a>(command: &[&'a str], flag: &str) -> Option<&'a str> {
    let at = command.iter().position(|a| *a == flag)?;
    command.get(at + 1).copied()
}

#[test]
fn the_compose_file_matches_the_binaries() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root");
    let compose = parse_yaml(&std::fs::read_to_string(root.join("docker-compose.yml")).unwrap());
    let services = &compose["services"];
    for service in [
        "rabbitmq",
        "redis",
        "scheduler",
        "scheduler-standby",
        "worker",
        "example",
    ] {
        assert!(
            services.keys().contains(&service),
            "service {service} in {:?}",
            services.keys()
        );
    }

    // The services: management UI, AOF, health checks.
    let rabbitmq = &services["rabbitmq"];
    assert!(rabbitmq["image"].str().unwrap().contains("management"));
    let ports = rabbitmq["ports"].items();
    assert!(
        ports.contains(&"127.0.0.1:5672:5672") && ports.contains(&"127.0.0.1:15672:15672"),
        "{ports:?}"
    );
    // Every published port is on loopback only.
    for (name, service) in services.as_mapping().unwrap() {
        for port in service["ports"].items() {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name:?} publishes {port} beyond loopback"
            );
        }
    }
    assert!(!rabbitmq["healthcheck"]["test"].items().is_empty());
    let volumes = rabbitmq["volumes"].items();
    for file in ["rabbitmq.conf", "enabled_plugins", "definitions.json"] {
        assert!(
            volumes
                .iter()
                .any(|v| v.starts_with(&format!("./broker-config/{file}:"))),
            "{file} is mounted: {volumes:?}"
        );
        assert!(
            root.join("broker-config").join(file).exists(),
            "{file} exists"
        );
    }
    let redis = &services["redis"];
    assert!(redis["ports"].items().contains(&"127.0.0.1:6379:6379"));
    assert!(!redis["healthcheck"]["test"].items().is_empty());
    let redis_command = redis["command"].items();
    assert_eq!(value_of(&redis_command, "--appendonly"), Some("yes"));
    let required = |value: Option<&str>, variable: &str| {
        let value = value.unwrap_or_default();
        assert!(
            value.contains(&format!("${{{variable}:?")),
            "{variable} is required: {value}"
        );
    };
    required(
        value_of(&redis_command, "--requirepass"),
        "FLOTILLA_REDIS_PASSWORD",
    );

    // Least privilege in RabbitMQ: one user without tags, limited to the
    // namespace's names (and direct reply-to); no guest, no administrator.
    let definitions: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("broker-config/definitions.json")).unwrap(),
    )
    .expect("definitions.json is JSON");
    let users = definitions["users"].as_array().unwrap();
    assert!(
        users
            .iter()
            .all(|u| u["name"] != "guest" && u["tags"].as_array().is_some_and(|t| t.is_empty())),
        "{users:?}"
    );
    for permission in definitions["permissions"].as_array().unwrap() {
        for kind in ["configure", "write", "read"] {
            let regex = permission[kind].as_str().unwrap();
            assert!(
                (regex.starts_with("^flotilla[.]") || regex.starts_with("^(flotilla[.]"))
                    && regex.ends_with('$'),
                "{kind} is anchored and limited to the namespace: {regex}"
            );
        }
    }
    let conf = std::fs::read_to_string(root.join("broker-config/rabbitmq.conf")).unwrap();
    assert!(
        !conf.contains("loopback_users.guest = false"),
        "guest is not let in from the network"
    );

    // RabbitMQ's own metrics are on, and published (on loopback).
    let plugins = std::fs::read_to_string(root.join("broker-config/enabled_plugins")).unwrap();
    assert!(
        plugins.contains("rabbitmq_prometheus") && plugins.contains("rabbitmq_management"),
        "enabled_plugins: {plugins}"
    );
    assert!(conf.contains("prometheus.tcp.port = 15692"));
    assert!(rabbitmq["ports"].items().contains(&"127.0.0.1:15692:15692"));
    // The dead-letter queue is bounded by a policy (which, unlike queue
    // arguments, applies to an existing queue), dropping its oldest.
    let policies = definitions["policies"].as_array().unwrap();
    let bounds: Vec<_> = policies
        .iter()
        .filter(|p| p["pattern"] == "^flotilla\\.dead-letter$")
        .collect();
    assert_eq!(
        bounds.len(),
        1,
        "one policy for the dead-letter queue: {policies:?}"
    );
    let bound = &bounds[0]["definition"];
    assert_eq!(bound["overflow"], "drop-head");
    assert!(
        bound["max-length"].as_u64().is_some_and(|n| n > 0),
        "{bound}"
    );

    // Our services wait for healthy brokers and agree on where they are.
    let mut namespaces = Vec::new();
    for name in ["scheduler", "scheduler-standby", "worker", "example"] {
        let service = &services[name];
        required(
            service["environment"]["FLOTILLA_SECRET"].str(),
            "FLOTILLA_SECRET",
        );
        let depends = &service["depends_on"];
        if name != "example" {
            for broker in ["rabbitmq", "redis"] {
                assert_eq!(
                    depends[broker]["condition"].str(),
                    Some("service_healthy"),
                    "{name} waits for a healthy {broker}"
                );
            }
        }
        let command = service["command"].items();
        let environment = &service["environment"];
        let namespace = value_of(&command, "--namespace")
            .or(environment["FLOTILLA_NAMESPACE"].str())
            .unwrap_or("flotilla");
        namespaces.push(namespace.to_owned());
        let amqp = value_of(&command, "--amqp-url")
            .or(environment["FLOTILLA_AMQP_URL"].str())
            .unwrap_or_else(|| panic!("{name} names its broker"));
        assert!(amqp.contains("@rabbitmq:5672/"), "{name}: {amqp}");
        let user = amqp
            .split("//")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .unwrap();
        let definitions =
            std::fs::read_to_string(root.join("broker-config/definitions.json")).unwrap();
        assert!(
            definitions.contains(&format!("\"{user}\"")),
            "user {user} is defined in broker-config/definitions.json"
        );
        let redis_url = value_of(&command, "--redis-url")
            .or(environment["FLOTILLA_REDIS_URL"].str())
            .unwrap_or_else(|| panic!("{name} names its Redis"));
        assert!(
            redis_url.starts_with("redis://:${FLOTILLA_REDIS_PASSWORD:?")
                && redis_url.contains("}@redis:6379"),
            "{name} gives Redis its password: {redis_url}"
        );
    }
    assert!(
        namespaces.windows(2).all(|w| w[0] == w[1]),
        "{namespaces:?}"
    );

    // The schedulers serve HTTP on the published ports (on loopback), and
    // answer the Host names they are reached by; workers scale.
    let mut port = "";
    for (name, published) in [("scheduler", None), ("scheduler-standby", Some("8788"))] {
        let scheduler = &services[name];
        let command = scheduler["command"].items();
        let http = value_of(&command, "--http-addr").expect("the scheduler serves HTTP");
        assert!(
            http.starts_with("0.0.0.0:"),
            "reachable from outside the container: {http}"
        );
        port = http.rsplit(':').next().unwrap();
        let outside = published.unwrap_or(port);
        assert!(
            scheduler["ports"]
                .items()
                .contains(&format!("127.0.0.1:{outside}:{port}").as_str()),
            "{name}: port {port} is published as {outside} on loopback"
        );
        if outside != port {
            let hosts = value_of(&command, "--http-allowed-hosts").unwrap_or_default();
            assert!(
                hosts
                    .split(',')
                    .any(|h| h == format!("localhost:{outside}")),
                "{name} answers Host localhost:{outside}: {hosts}"
            );
        }
    }
    let worker = &services["worker"];
    assert_eq!(
        worker["ports"],
        Yaml::Null,
        "workers publish no port (--scale)"
    );
    assert_eq!(
        worker["container_name"],
        Yaml::Null,
        "workers have no fixed name"
    );

    // Every command line is one the binaries accept.
    for name in ["scheduler", "scheduler-standby", "worker"] {
        let command = services[name]["command"].items();
        let program = command[0];
        let help = Command::new(binary(program))
            .arg("--help")
            .output()
            .unwrap();
        assert!(help.status.success());
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in flags_of(&command[1..]) {
            assert!(
                help.contains(&format!("--{flag} ")),
                "{program} --help lists --{flag}:\n{help}"
            );
        }
        // Flags are parsed up to --help: unknown flags or missing values fail.
        let accepted = Command::new(binary(program))
            .args(&command[1..])
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            accepted.status.success(),
            "{program} accepts {:?}: {}",
            &command[1..],
            String::from_utf8_lossy(&accepted.stderr)
        );
    }
    let example = services["example"]["command"].items();
    assert!(
        root.join("examples")
            .join(format!("{}.rs", example[0]))
            .exists(),
        "the example service runs an example program: {example:?}"
    );

    // The images hold what the services run: each service is built from
    // the Dockerfile at a stage of it (its `build.target`, else the last
    // one). The default image holds the two binaries and no example; the
    // example service's image adds the example programs.
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let stages = dockerfile_stages(&dockerfile);
    let image_of = |name: &str| {
        let build = &services[name]["build"];
        let (context, target) = match build.str() {
            Some(context) => (context, None),
            None => (
                build["context"].str().unwrap_or_default(),
                build["target"].str(),
            ),
        };
        assert_eq!(context, ".", "{name} is built from the Dockerfile");
        let stage = match target {
            Some(target) => stages
                .iter()
                .find(|stage| stage.name == target)
                .unwrap_or_else(|| panic!("{name}: the Dockerfile has a stage {target}")),
            None => stages.last().expect("the Dockerfile has stages"),
        };
        stage.image(&stages)
    };
    let stage_named = |name: &str| {
        stages
            .iter()
            .find(|stage| stage.name == name)
            .unwrap_or_else(|| panic!("the Dockerfile has a stage {name}"))
    };
    let build = stage_named("build").image(&stages);
    for binary in ["flotilla-scheduler", "flotilla-worker"] {
        assert!(
            build.contains(&format!("--bin {binary}")),
            "the build stage builds {binary}"
        );
    }
    for name in ["scheduler", "scheduler-standby", "worker"] {
        let image = image_of(name);
        assert!(
            image.contains("COPY --from=build /out/bin/"),
            "{name}'s image holds the binaries:\n{image}"
        );
        assert!(
            !image.contains("/out/examples"),
            "{name}'s image holds no example program:\n{image}"
        );
    }
    let image = image_of("example");
    assert!(
        image.contains("COPY --from=build /out/bin/"),
        "the example service's image holds the binaries:\n{image}"
    );
    let examples = stages
        .iter()
        .find(|stage| image.contains(&format!("COPY --from={} /out/examples/", stage.name)))
        .unwrap_or_else(|| {
            panic!("the example service's image copies the example programs:\n{image}")
        });
    assert!(
        examples.image(&stages).contains("--examples"),
        "the stage {} builds the example programs",
        examples.name
    );
    assert!(
        dockerfile.contains(&format!("EXPOSE {port}")),
        "the Dockerfile exposes {port}"
    );
}

/// One stage of a Dockerfile.
struct Stage {
    /// `FROM ... AS name` (empty when unnamed).
    name: String,
    /// The image or stage it starts from.
    from: String,
    /// Its instructions, `FROM` included, without comments.
    body: String,
}

impl Stage {
    /// The instructions of this stage and of the stages it starts from.
    fn image(&self, stages: &[Stage]) -> String {
        match stages.iter().find(|stage| stage.name == self.from) {
            Some(parent) => parent.image(stages) + &self.body,
            None => self.body.clone(),
        }
    }
}

/// The stages of a Dockerfile, in order.
fn dockerfile_stages(dockerfile: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for line in dockerfile.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(from) = line.strip_prefix("FROM ") {
            let words: Vec<&str> = from.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                _ => String::new(),
            };
            stages.push(Stage {
                name,
                from: words.first().copied().unwrap_or_default().to_owned(),
                body: String::new(),
            });
        }
        if let Some(stage) = stages.last_mut() {
            stage.body.push_str(line);
            stage.body.push('\n');
        }
    }
    stages
}
