//! `flotilla-bench`: measures Flotilla against the real RabbitMQ and Redis.
//!
//! It starts its own scheduler and workers as processes (the
//! `flotilla-scheduler` and `flotilla-worker` binaries next to it) in a fresh
//! namespace, runs each workload several times, prints a table of medians,
//! and with `--json` one JSON object keyed by workload. The namespace is
//! purged at the end.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/flotilla-bench --workers 2 --json
//! target/release/flotilla-bench --full          # adds the 1,000,000-task run
//! target/release/flotilla-bench --only data --json   # the data-plane rows (issue 15)
//! ```
//!
//! The data-plane rows (`data_*`) move large values: a task's 10 MB and
//! 100 MB result to the client, 10 MB and 100 MB scattered and read by 50
//! tasks, 100 MB made on one worker and used on the other, and a 1 GB result
//! with the peak RSS of the client and the workers. A row Flotilla fails
//! (today: values over `FLOTILLA_MAX_PAYLOAD`) prints `error: ...` instead of
//! a figure, is `null` in the JSON, and its message is under `"errors"`;
//! the run goes on. `bench/compare/run.sh --only data` runs the same rows on
//! Dask and Ray and prints one table of the three.

use anyhow::{bail, Context, Result};
use flotilla::{Client, Config, TaskFuture};
use flotilla_examples::{
    add, blob, bytes_len, drop_blob, inc, random_bytes, slow_identity, warm_blob,
};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Options {
    workers: usize,
    nthreads: usize,
    json: bool,
    full: bool,
    repeats: usize,
    only: Option<String>,
    /// Measure the peak RSS of fetching a value of this many bytes.
    data_rss: Option<usize>,
    /// (The child of `--data-rss`.) Keep and serve a value of this many bytes.
    data_serve: Option<usize>,
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        workers: 2,
        nthreads: 1,
        json: false,
        full: false,
        repeats: 3,
        only: None,
        data_rss: None,
        data_serve: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--workers" => options.workers = value("--workers")?.parse()?,
            "--nthreads" => options.nthreads = value("--nthreads")?.parse()?,
            "--repeats" => options.repeats = value("--repeats")?.parse()?,
            "--only" => options.only = Some(value("--only")?),
            "--json" => options.json = true,
            "--full" => options.full = true,
            "--data-rss" => options.data_rss = Some(value("--data-rss")?.parse()?),
            "--data-serve" => options.data_serve = Some(value("--data-serve")?.parse()?),
            "-h" | "--help" => {
                println!(
                    "flotilla-bench — Flotilla's benchmarks against the configured RabbitMQ and Redis\n\n\
                     Usage: flotilla-bench [--workers N] [--nthreads N] [--repeats N] [--only PREFIX] [--json] [--full]\n\n\
                     --workers N    worker processes (default 2)\n\
                     --nthreads N   task slots per worker (default 1)\n\
                     --repeats N    runs per workload; the median is reported (default 3)\n\
                     --only PREFIX  run only workloads whose key starts with PREFIX (or any of\n\
                     \x20              PREFIX,PREFIX,...)\n\
                     \x20              (--only data: the data-plane rows, with the transport floors)\n\
                     --json         print one JSON object keyed by workload\n\
                     --full         add the 1,000,000-task workloads\n\
                     --data-rss BYTES  no cluster: one process keeps a value of BYTES and\n\
                     \x20              serves it on the data connection, this one fetches it;\n\
                     \x20              prints both processes' peak RSS (VmHWM)\n\
                     --only backlog a backlog of 300,000 pending tasks (1,000,000 with --full):\n\
                     \x20              the scheduler's peak RSS and Redis' used memory\n\n\
                     Connection: FLOTILLA_AMQP_URL, FLOTILLA_REDIS_URL (a fresh namespace is used)."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(options)
}

/// The scheduler and worker processes of the benchmark's cluster.
struct Cluster {
    scheduler: Child,
    workers: Vec<Child>,
}

impl Cluster {
    fn start(config: &Config, workers: usize, nthreads: usize) -> Result<Cluster> {
        let dir = std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .context("no directory for the benchmark binary")?;
        let spawn = |binary: &str, extra: &[String]| -> Result<Child> {
            let path = dir.join(binary);
            Command::new(&path)
                .args(extra)
                .env("FLOTILLA_AMQP_URL", &config.amqp_url)
                .env("FLOTILLA_REDIS_URL", &config.redis_url)
                .env("FLOTILLA_NAMESPACE", &config.namespace)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| {
                    format!(
                        "starting {} (build the workspace's binaries first)",
                        path.display()
                    )
                })
        };
        let scheduler = spawn("flotilla-scheduler", &[])?;
        let workers = (0..workers)
            .map(|i| {
                spawn(
                    "flotilla-worker",
                    &[
                        "--nthreads".into(),
                        nthreads.to_string(),
                        "--name".into(),
                        format!("bench-{i}"),
                    ],
                )
            })
            .collect::<Result<_>>()?;
        Ok(Cluster { scheduler, workers })
    }

    fn scheduler_rss(&self) -> Result<u64> {
        self.scheduler_status("VmRSS:")
    }

    /// A memory figure of the scheduler process from `/proc/<pid>/status`
    /// (`VmRSS:`, or `VmHWM:` for its peak), in bytes.
    fn scheduler_status(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.scheduler.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .with_context(|| format!("no {field}"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("{field} value"))?
            .parse()?;
        Ok(kib * 1024)
    }

    fn stop(mut self) {
        for child in self
            .workers
            .iter_mut()
            .chain(std::iter::once(&mut self.scheduler))
        {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        for child in self
            .workers
            .iter_mut()
            .chain(std::iter::once(&mut self.scheduler))
        {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs so far, to give each run its own arguments.
static RUNS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

async fn throughput(client: &Client, count: i64) -> Result<f64> {
    // Fresh arguments each run: tasks are keyed by their arguments, and a
    // run must not meet the keys the previous run is still releasing.
    let base = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 1_000_000_000;
    let started = Instant::now();
    let futures = client.map(inc, (base..base + count).map(|i| (i,)));
    let results = client.gather(&futures).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if results.len() as i64 != count
        || results[0] != base + 1
        || results[results.len() - 1] != base + count
    {
        bail!("wrong results");
    }
    Ok(count as f64 / elapsed)
}

async fn chain(client: &Client, links: usize) -> Result<f64> {
    let base = Instant::now().elapsed().as_nanos() as i64 ^ std::process::id() as i64;
    let started = Instant::now();
    let mut current: TaskFuture<i64> = client.submit(add, (base, 0));
    for _ in 1..links {
        current = client.submit(inc, (&current,));
    }
    let value = current.await?;
    let elapsed = started.elapsed().as_secs_f64();
    if value != base + links as i64 - 1 {
        bail!("wrong chain result");
    }
    Ok(elapsed * 1000.0 / links as f64)
}

async fn roundtrips(client: &Client, count: usize) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(count);
    let salt = std::process::id() as i64 * 1_000_000;
    for i in 0..count as i64 {
        let started = Instant::now();
        let value = client.submit(add, (salt, i)).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        if value != salt + i {
            bail!("wrong roundtrip result");
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples)
}

/// Sequential `increment()` calls on one actor, each awaited before the
/// next: the round trip of a call, in milliseconds, sorted.
async fn actor_roundtrips(client: &Client, count: usize) -> Result<Vec<f64>> {
    let counter = client
        .submit_actor(flotilla_examples::actors::Counter::new, ())
        .await?;
    let mut samples = Vec::with_capacity(count);
    for i in 1..=count as i64 {
        let started = Instant::now();
        let value = counter.increment().await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        if value != i {
            bail!("wrong actor result: {value}, expected {i}");
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples)
}

/// One Redis round trip (`PING`) over the connection Flotilla's processes
/// use, sequentially: milliseconds, sorted. The floor under every step that
/// reads or writes Redis.
async fn redis_floor(config: &Config, count: usize) -> Result<Vec<f64>> {
    let mut redis = flotilla_runtime::transport::connect_redis(&config.redis_url).await?;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        redis::cmd("PING").query_async::<()>(&mut redis).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples)
}

/// 10 MB through Redis the way a large result travels: one `SET` (as a
/// worker stores it) and one `GET` (as the client fetches it), both from
/// this process: MB/s of the pair, the floor under
/// `data_result_10mb_mb_per_s` while large values go through Redis.
async fn redis_10mb_floor(config: &Config, bytes: usize) -> Result<f64> {
    let mut redis = flotilla_runtime::transport::connect_redis(&config.redis_url).await?;
    let key = format!("{}:bench-floor", config.namespace);
    let value = vec![7u8; bytes];
    let started = Instant::now();
    redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .query_async::<()>(&mut redis)
        .await?;
    let back: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut redis).await?;
    let elapsed = started.elapsed().as_secs_f64();
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut redis)
        .await?;
    if back.len() != bytes {
        bail!("wrong size back from Redis");
    }
    Ok((bytes as f64 / 1e6) / elapsed)
}

/// The data connection's floor: a `DataServer` keeping a value of `bytes`
/// and a `DataClient` in this process, over loopback; after one fetch that
/// opens the connection, the median MB/s of `fetches` fetches (each into a
/// fresh buffer, as a reader's would be).
async fn data_floor(bytes: usize, fetches: usize) -> Result<f64> {
    use flotilla_runtime::data::{CancellationToken, DataClient, DataServer, Keep};
    let keep = Keep::new();
    keep.insert("floor", vec![7u8; bytes]);
    let codec = flotilla_proto::Codec::plain();
    let server = DataServer::bind("127.0.0.1:0", keep, codec.clone(), Default::default()).await?;
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(shutdown.clone()));
    let client = DataClient::new(codec, Default::default());
    client.fetch(addr, "floor").await?;
    let mut samples = Vec::new();
    for _ in 0..fetches {
        let started = Instant::now();
        let value = client.fetch(addr, "floor").await?;
        let elapsed = started.elapsed().as_secs_f64();
        if value.len() != bytes {
            bail!("wrong size back from the data server");
        }
        drop(value);
        samples.push((bytes as f64 / 1e6) / elapsed);
    }
    shutdown.cancel();
    serving.await?;
    Ok(median(samples))
}

/// How fast `random_bytes`, the data rows' task, makes `bytes` in this
/// process (MB/s): the part of a data row that is making, not moving.
fn make_floor(bytes: usize) -> f64 {
    let started = Instant::now();
    let value = random_bytes::call(bytes, fresh_seed());
    let elapsed = started.elapsed().as_secs_f64();
    drop(std::hint::black_box(value));
    (bytes as f64 / 1e6) / elapsed
}

/// `--data-rss`: runs this program again as `--data-serve`, which keeps a
/// value of `bytes` and serves it; fetches it once and prints the time and
/// both processes' peak RSS.
async fn data_rss(bytes: usize) -> Result<()> {
    use std::io::BufRead;
    use std::io::Write;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--data-serve", &bytes.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("child stdout")?).lines();
    let addr: std::net::SocketAddr = lines.next().context("the server's address")??.parse()?;
    let client =
        flotilla_runtime::data::DataClient::new(flotilla_proto::Codec::plain(), Default::default());
    let started = Instant::now();
    let value = client.fetch(addr, "value").await?;
    let elapsed = started.elapsed().as_secs_f64();
    if value.len() != bytes || value.iter().any(|&b| b != 7) {
        bail!("the value came back different");
    }
    let fetcher = vm_hwm("self")?;
    drop(value);
    // Closing its stdin tells the server to report and stop.
    drop(child.stdin.take());
    let server: u64 = lines.next().context("the server's peak RSS")??.parse()?;
    child.wait()?;
    let row = |key: &str, value: f64, unit: &str| eprintln!("{key:<36} {value:>14.3} {unit}");
    row(
        "data_rss_fetch_mb_per_s",
        (bytes as f64 / 1e6) / elapsed,
        "MB/s (one fetch, two processes)",
    );
    row(
        "data_rss_fetcher_peak_mb",
        fetcher as f64 / 1e6,
        "MB (VmHWM of the fetching process)",
    );
    row(
        "data_rss_server_peak_mb",
        server as f64 / 1e6,
        "MB (VmHWM of the serving process)",
    );
    std::io::stdout().flush()?;
    Ok(())
}

/// `--data-serve`: keeps a value of `bytes` under `value`, prints the
/// address, serves until stdin closes, then prints its peak RSS in bytes.
async fn data_serve(bytes: usize) -> Result<()> {
    use flotilla_runtime::data::{CancellationToken, DataServer, Keep};
    let keep = Keep::new();
    keep.insert("value", vec![7u8; bytes]);
    let codec = flotilla_proto::Codec::plain();
    let server = DataServer::bind("127.0.0.1:0", keep, codec, Default::default()).await?;
    println!("{}", server.local_addr());
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(shutdown.clone()));
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
        .await??;
    shutdown.cancel();
    serving.await?;
    println!("{}", vm_hwm("self")?);
    Ok(())
}

/// The peak RSS (`VmHWM`) of process `pid` (or `self`), in bytes.
fn vm_hwm(pid: &str) -> Result<u64> {
    status_bytes(pid, "VmHWM:")
}

/// A size line of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`), in bytes.
fn status_bytes(pid: &str, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field}"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("{field} value"))?
        .parse()?;
    Ok(kib * 1024)
}

/// Waits until the RSS of every process in `pids` has stopped falling
/// (within 1 MB over half a second), for at most 10 s: values of earlier
/// rows being freed are not counted in the next row's peak.
async fn settle_rss(pids: &[String]) -> Result<()> {
    let total = || -> Result<u64> {
        pids.iter()
            .map(|pid| status_bytes(pid, "VmRSS:"))
            .sum::<Result<u64>>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before = total()?;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = total()?;
        if before.saturating_sub(now) < MB as u64 {
            break;
        }
        before = now;
    }
    Ok(())
}

/// Resets the peak RSS (`VmHWM`) of process `pid` (or `self`) to its
/// current RSS, so that the next [`vm_hwm`] covers what happens from now on.
fn reset_vm_hwm(pid: &str) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid}"))
}

/// One RabbitMQ hop as Flotilla's messages take it: a persistent message
/// published (confirms on, not awaited) on one connection to a durable
/// queue, until a consumer on another connection has it. Sequential:
/// milliseconds, sorted. A task's round trip is three such hops.
async fn amqp_floor(config: &Config, count: usize) -> Result<Vec<f64>> {
    use flotilla_runtime::transport::{self, name};
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    let sender =
        transport::connect_amqp(&config.amqp_url, "flotilla-bench floor (publish)").await?;
    let receiver =
        transport::connect_amqp(&config.amqp_url, "flotilla-bench floor (consume)").await?;
    let publish = sender.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = format!("{}.bench-floor", config.namespace);
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    publish
        .queue_declare(name(&queue), durable, FieldTable::default())
        .await?;
    let consume = receiver.create_channel().await?;
    let mut consumer = consume
        .basic_consume(
            name(&queue),
            name("floor"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut samples = Vec::with_capacity(count);
    let mut confirms = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        confirms.push(
            publish
                .basic_publish(
                    name(""),
                    name(&queue),
                    BasicPublishOptions::default(),
                    b"ping",
                    transport::persistent(),
                )
                .await?,
        );
        let delivery = transport::next_delivery(&mut consumer)
            .await
            .context("the floor consumer closed")??;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    for confirm in confirms {
        confirm.await?;
    }
    publish
        .queue_delete(name(&queue), QueueDeleteOptions::default())
        .await?;
    let _ = sender.close(200, name("done")).await;
    let _ = receiver.close(200, name("done")).await;
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples)
}

/// One decimal megabyte: the data rows' sizes and rates are in MB (10⁶ bytes).
const MB: usize = 1_000_000;

/// How long one sample of a data row may take before the row reports an
/// error instead of a figure (a 1 GB value at 10 MB/s still fits).
const DATA_SAMPLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The data-plane rows, in the order they run (`--only data` runs them all).
const DATA_KEYS: [&str; 8] = [
    "data_result_10mb_mb_per_s",
    "data_result_100mb_mb_per_s",
    "data_scatter_10mb_50_s",
    "data_scatter_100mb_50_s",
    "data_move_100mb_s",
    "data_result_1gb_s",
    "data_result_1gb_client_rss_mb",
    "data_result_1gb_worker_rss_mb",
];

/// The tasks a `data_scatter_*` row runs on the scattered value.
const SCATTER_READERS: usize = 50;

/// A seed no earlier run of any data row used: every sample is a new task
/// (tasks are keyed by their arguments) with other bytes.
fn fresh_seed() -> u64 {
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (u64::from(std::process::id()) << 32) ^ run as u64
}

/// Makes every named worker keep a [`blob`] of `bytes` before the clock
/// starts ([`warm_blob`], as the Dask and Ray benchmarks warm theirs), so
/// that no large value is moved or kept by the warming: the data rows
/// measure moving bytes, not making them.
async fn warm_blobs(client: &Client, workers: &[String], bytes: usize) -> Result<()> {
    for worker in workers {
        let len = client
            .submit_with(warm_blob, (bytes, fresh_seed()))
            .workers([worker.as_str()])
            .submit()
            .await?;
        if len != bytes {
            bail!("{worker} made {len} bytes, expected {bytes}");
        }
    }
    Ok(())
}

/// Makes every named worker forget its [`blob`] (its memory back).
async fn drop_blobs(client: &Client, workers: &[String]) -> Result<()> {
    for worker in workers {
        client
            .submit_with(drop_blob, (fresh_seed(),))
            .workers([worker.as_str()])
            .submit()
            .await?;
    }
    Ok(())
}

/// `data_result_*`: a task returns the `bytes` its worker keeps (see
/// [`warm_blobs`]) and the client gets them; seconds from submit to the
/// value in hand.
async fn data_result(client: &Client, bytes: usize) -> Result<f64> {
    let started = Instant::now();
    let value = client.submit(blob, (bytes, fresh_seed())).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if value.len() != bytes {
        bail!("the result has {} bytes, expected {bytes}", value.len());
    }
    Ok(elapsed)
}

/// `data_scatter_*`: scatters `payload` (made before the clock starts, a
/// fresh key each time as Dask's `hash=False`), runs [`SCATTER_READERS`]
/// tasks that each take it and return its length, gathers them: seconds.
async fn data_scatter(client: &Client, payload: &flotilla::Bytes) -> Result<f64> {
    let started = Instant::now();
    let data = client
        .scatter_with(payload, flotilla::ScatterOptions { hash: false })
        .await?;
    let lengths: Vec<_> = (0..SCATTER_READERS)
        .map(|_| client.submit_with(bytes_len, (&data,)).pure(false).submit())
        .collect();
    let results = client.gather(&lengths).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(wrong) = results.iter().find(|&&n| n != payload.len()) {
        bail!("a reader saw {wrong} bytes, expected {}", payload.len());
    }
    Ok(elapsed)
}

/// `data_move_*`: task A returns `bytes` kept on worker `bench-0`, task B on
/// `bench-1` takes A's value as input and returns its length: seconds from
/// A's submit to B's result, so the value crosses from one worker process to
/// the other.
async fn data_move(client: &Client, bytes: usize) -> Result<f64> {
    let started = Instant::now();
    let made = client
        .submit_with(blob, (bytes, fresh_seed()))
        .workers(["bench-0"])
        .submit();
    let length = client
        .submit_with(bytes_len, (&made,))
        .workers(["bench-1"])
        .submit()
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    if length != bytes {
        bail!("task B saw {length} bytes, expected {bytes}");
    }
    Ok(elapsed)
}

/// Peak memory of the `data_result_1gb` row, in bytes.
struct HugeResult {
    seconds: f64,
    client_peak: u64,
    worker_peak: u64,
}

/// `data_result_1gb_*`: one task on `bench-0` returns the `bytes` it keeps,
/// the client gets them. Once the workers' memory has settled (earlier
/// values freed), the peak RSS (`VmHWM`) of this process and of every worker is
/// reset just before (`/proc/<pid>/clear_refs`), so the peaks are this
/// row's; the worker figure is the largest of the workers'.
async fn data_huge_result(client: &Client, cluster: &Cluster, bytes: usize) -> Result<HugeResult> {
    let workers: Vec<String> = cluster.workers.iter().map(|w| w.id().to_string()).collect();
    settle_rss(&workers).await?;
    for pid in workers.iter().map(String::as_str).chain(["self"]) {
        reset_vm_hwm(pid)?;
    }
    let started = Instant::now();
    let value = client
        .submit_with(blob, (bytes, fresh_seed()))
        .workers(["bench-0"])
        .submit()
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    if value.len() != bytes {
        bail!("the result has {} bytes, expected {bytes}", value.len());
    }
    let client_peak = vm_hwm("self")?;
    drop(value);
    let mut worker_peak = 0;
    for pid in &workers {
        worker_peak = worker_peak.max(vm_hwm(pid)?);
    }
    Ok(HugeResult {
        seconds,
        client_peak,
        worker_peak,
    })
}

/// Runs `sample` `repeats` times, each bounded by [`DATA_SAMPLE_TIMEOUT`],
/// and returns the median; the first failure ends the row with its error.
async fn median_of<F, Fut>(repeats: usize, mut sample: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let mut samples = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        samples.push(bounded(sample()).await?);
    }
    Ok(median(samples))
}

/// `work`, or an error once [`DATA_SAMPLE_TIMEOUT`] has passed.
async fn bounded<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(DATA_SAMPLE_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| bail!("no answer within {} s", DATA_SAMPLE_TIMEOUT.as_secs()))
}

/// The data-plane rows (`--only data`): results to the client, scatter to
/// many readers, a value moved between workers and a 1 GB result, each a
/// figure or, where Flotilla fails it, the error.
async fn data_rows(
    client: &Client,
    cluster: &Cluster,
    repeats: usize,
    wanted: &dyn Fn(&str) -> bool,
    report: &mut dyn FnMut(Row),
) {
    // The worker names Cluster::start gives.
    let names: Vec<String> = (0..cluster.workers.len())
        .map(|i| format!("bench-{i}"))
        .collect();
    for (key, bytes) in [
        ("data_result_10mb_mb_per_s", 10 * MB),
        ("data_result_100mb_mb_per_s", 100 * MB),
    ] {
        if wanted(key) {
            let seconds = match bounded(warm_blobs(client, &names, bytes)).await {
                Ok(()) => median_of(repeats, || data_result(client, bytes)).await,
                Err(e) => Err(e),
            };
            report(Row::measured(
                key,
                seconds.map(|s| (bytes / MB) as f64 / s),
                "MB/s (a task returns bytes its worker keeps, the client has them; median)",
            ));
        }
    }
    for (key, bytes) in [
        ("data_scatter_10mb_50_s", 10 * MB),
        ("data_scatter_100mb_50_s", 100 * MB),
    ] {
        if wanted(key) {
            let payload = random_payload(bytes);
            let seconds = median_of(repeats, || data_scatter(client, &payload)).await;
            report(Row::measured(
                key,
                seconds,
                "s (scatter, 50 tasks take its length, gather; median)",
            ));
        }
    }
    if wanted("data_move_100mb_s") {
        let seconds = if cluster.workers.len() < 2 {
            Err(anyhow::anyhow!("needs two workers (--workers 2 or more)"))
        } else {
            match bounded(warm_blobs(client, &names[..1], 100 * MB)).await {
                Ok(()) => median_of(repeats, || data_move(client, 100 * MB)).await,
                Err(e) => Err(e),
            }
        };
        report(Row::measured(
            "data_move_100mb_s",
            seconds,
            "s (made on worker 1, the input of a task on worker 2; median)",
        ));
    }
    if DATA_KEYS
        .iter()
        .any(|key| key.starts_with("data_result_1gb") && wanted(key))
    {
        let huge = match bounded(warm_blobs(client, &names[..1], 1000 * MB)).await {
            Ok(()) => bounded(data_huge_result(client, cluster, 1000 * MB)).await,
            Err(e) => Err(e),
        };
        let (seconds, client_peak, worker_peak) = match huge {
            Ok(h) => (
                Ok(h.seconds),
                Ok(h.client_peak as f64 / MB as f64),
                Ok(h.worker_peak as f64 / MB as f64),
            ),
            Err(e) => {
                let message = one_line(&e);
                let again = || Err(anyhow::anyhow!("{message}"));
                (again(), again(), again())
            }
        };
        report(Row::measured(
            "data_result_1gb_s",
            seconds,
            "s (one run: a task returns 1 GB its worker keeps, the client has it)",
        ));
        report(Row::measured(
            "data_result_1gb_client_rss_mb",
            client_peak,
            "MB (VmHWM of the client process during that run)",
        ));
        report(Row::measured(
            "data_result_1gb_worker_rss_mb",
            worker_peak,
            "MB (largest VmHWM of the worker processes during that run)",
        ));
    }
    // The workers forget their blobs: their memory back for other rows.
    if let Err(error) = bounded(drop_blobs(client, &names)).await {
        eprintln!("the workers' blobs were not dropped: {}", one_line(&error));
    }
}

/// `bytes` random bytes (for the scatter rows, made before the clock starts).
fn random_payload(bytes: usize) -> flotilla::Bytes {
    // The task's own body is plain Rust: calling it here makes the same kind
    // of payload the tasks make.
    random_bytes::call(bytes, fresh_seed())
}

/// An error and its causes on one line, for the table and the JSON.
fn one_line(error: &anyhow::Error) -> String {
    format!("{error:#}").replace('\n', " ")
}

async fn pending_memory(client: &Client, cluster: &Cluster, count: i64) -> Result<f64> {
    let blocker = client
        .submit_with(slow_identity, (0, 3_600_000))
        .pure(false)
        .submit();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cluster.scheduler_rss()?;
    let waiting: Vec<_> = (0..count)
        .map(|i| client.submit(add, (&blocker, i)))
        .collect();
    // Wait until the scheduler's memory stops growing (all submissions taken
    // in): three readings in a row within 1% of each other, or 60 s.
    client.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = 0u64;
    let mut stable = 0;
    while stable < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = cluster.scheduler_rss()?;
        if rss.abs_diff(last) <= last / 100 {
            stable += 1;
        } else {
            stable = 0;
        }
        last = rss;
    }
    drop(waiting);
    Ok(last.saturating_sub(before) as f64 / count as f64)
}

/// Builds a backlog of `count` tasks waiting on one that runs for an hour,
/// from a client whose bound on pending tasks (`max_pending`) is raised to
/// take them all, and waits until the scheduler took every submission in
/// (admitted into memory or parked in its Redis backlog). Returns the
/// scheduler's peak RSS (VmHWM), Redis' `used_memory`, and the messages
/// parked in `<ns>:backlog`.
async fn backlog(config: &Config, cluster: &Cluster, count: i64) -> Result<(u64, u64, u64)> {
    use flotilla_runtime::transport::{self, name};
    let mut config = config.clone();
    config.max_pending = usize::try_from(count)? + 1;
    let client = Client::connect(config.clone()).await?;
    let blocker = client
        .submit_with(slow_identity, (0, 3_600_000))
        .pure(false)
        .submit();
    let started = Instant::now();
    let mut waiting = Vec::with_capacity(usize::try_from(count)?);
    for i in 0..count {
        waiting.push(client.submit(add, (&blocker, i)));
    }
    client.flush().await?;
    eprintln!(
        "backlog: {count} tasks submitted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Taken in once the scheduler queue stays empty and the backlog stops
    // growing (three readings a second apart).
    let connection = transport::connect_amqp(&config.amqp_url, "flotilla-bench backlog").await?;
    let channel = connection.create_channel().await?;
    let mut redis = transport::connect_redis(&config.redis_url).await?;
    let backlog_key = format!("{}:backlog", config.namespace);
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut stable, mut last) = (0, u64::MAX);
    let mut parked = 0u64;
    while stable < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let queued = channel
            .queue_declare(
                name(&config.names().scheduler_queue()),
                passive,
                lapin::types::FieldTable::default(),
            )
            .await?
            .message_count();
        parked = redis::cmd("LLEN")
            .arg(&backlog_key)
            .query_async(&mut redis)
            .await?;
        stable = if queued == 0 && parked == last {
            stable + 1
        } else {
            0
        };
        last = parked;
    }
    let peak = cluster.scheduler_status("VmHWM:")?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut redis)
        .await?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .context("no used_memory in INFO")?
        .trim()
        .parse()?;
    transport::close(&connection, "measured").await;
    // Releases everything and gives up the lease, so that nothing of this
    // client comes back after the namespace is purged.
    drop((waiting, blocker));
    client.close().await?;
    Ok((peak, used, parked))
}

/// One line of the table and one key of the JSON.
struct Row {
    key: &'static str,
    value: Option<f64>,
    unit: &'static str,
    /// Why there is no value: the row's error, shown instead of a figure.
    error: Option<String>,
}

impl Row {
    /// A row with a figure.
    fn new(key: &'static str, value: f64, unit: &'static str) -> Row {
        Row {
            key,
            value: Some(value),
            unit,
            error: None,
        }
    }

    /// A row whose measurement may have failed: the figure, or the error
    /// (the run goes on with the next row).
    fn measured(key: &'static str, value: Result<f64>, unit: &'static str) -> Row {
        match value {
            Ok(value) => Row::new(key, value, unit),
            Err(error) => Row {
                key,
                value: None,
                unit,
                error: Some(one_line(&error)),
            },
        }
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = parse_options()?;
    if let Some(bytes) = options.data_serve {
        return data_serve(bytes).await;
    }
    if let Some(bytes) = options.data_rss {
        return data_rss(bytes).await;
    }
    // The client library's warnings (a failed publish, a Redis error) are
    // what explains a run that stalls or slows down. lapin's own errors are
    // left out: the actor client probes queues that may not exist.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = Config::from_env()?;
    config.namespace = format!("bench-{}", run_id());
    let cluster = Cluster::start(&config, options.workers, options.nthreads)?;
    let result = run(&options, &config, &cluster).await;
    cluster.stop();
    let _ = flotilla::purge(&config).await;
    let rows = result?;
    if options.json {
        let mut body: Vec<String> = rows
            .iter()
            .map(|r| match r.value {
                Some(v) => format!("\"{}\": {:.4}", r.key, v),
                None => format!("\"{}\": null", r.key),
            })
            .collect();
        // Why a row has no value, for the tables made from this JSON.
        let errors: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                let error = r.error.as_deref()?;
                Some(format!("{}: {}", json_string(r.key), json_string(error)))
            })
            .collect();
        if !errors.is_empty() {
            body.push(format!("\"errors\": {{{}}}", errors.join(", ")));
        }
        println!("{{{}}}", body.join(", "));
    }
    Ok(())
}

/// A namespace suffix unlikely to collide with another run's.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{}-{}", std::process::id(), nanos % 1_000_000_000)
}

async fn run(options: &Options, config: &Config, cluster: &Cluster) -> Result<Vec<Row>> {
    let client = Client::connect(config.clone()).await?;
    // Warm up: the cluster is up once a task comes back.
    let warm = client.submit(bytes_len, (flotilla::Bytes::from(vec![0u8; 10]),));
    warm.result_timeout(Duration::from_secs(60))
        .await
        .context("cluster did not start")?;
    let _ = client
        .gather(&client.map(inc, (0..2000).map(|i| (i,))))
        .await?;

    // `--only` takes prefixes separated by commas.
    let wanted = |key: &str| {
        options
            .only
            .as_deref()
            .is_none_or(|only| only.split(',').any(|p| key.starts_with(p)))
    };
    let repeats = options.repeats.max(1);
    let mut rows = Vec::new();
    let mut report = |row: Row| {
        match (row.value, &row.error) {
            (Some(v), _) => eprintln!("{:<36} {:>14.3} {}", row.key, v, row.unit),
            (None, Some(error)) => eprintln!("{:<36} {:>14} error: {error}", row.key, "—"),
            (None, None) => eprintln!("{:<36} {:>14} {}", row.key, "—", row.unit),
        }
        rows.push(row);
    };
    eprintln!(
        "flotilla-bench: {} worker process(es) × {} slot(s), namespace {}",
        options.workers, options.nthreads, config.namespace
    );

    for (key, count, runs) in [
        ("throughput_10k_tasks_per_s", 10_000i64, repeats),
        ("throughput_100k_tasks_per_s", 100_000, repeats.min(2)),
        ("throughput_1m_tasks_per_s", 1_000_000, 1),
    ] {
        if !wanted(key) || (count >= 1_000_000 && !options.full) {
            continue;
        }
        let mut samples = Vec::new();
        for _ in 0..runs {
            samples.push(throughput(&client, count).await?);
        }
        report(Row::new(key, median(samples), "tasks/s"));
    }
    if wanted("chain_ms_per_task") {
        let mut samples = Vec::new();
        for _ in 0..repeats {
            samples.push(chain(&client, 500).await?);
        }
        report(Row::new("chain_ms_per_task", median(samples), "ms/task"));
    }
    if wanted("roundtrip") {
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            let samples = roundtrips(&client, 500).await?;
            p50s.push(percentile(&samples, 50.0));
            p99s.push(percentile(&samples, 99.0));
        }
        report(Row::new("roundtrip_p50_ms", median(p50s), "ms"));
        report(Row::new("roundtrip_p99_ms", median(p99s), "ms"));
    }
    if wanted("actor") {
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            let samples = actor_roundtrips(&client, 1000).await?;
            p50s.push(percentile(&samples, 50.0));
            p99s.push(percentile(&samples, 99.0));
        }
        report(Row::new(
            "actor_p50_ms",
            median(p50s),
            "ms (1,000 sequential increment() calls)",
        ));
        report(Row::new(
            "actor_p99_ms",
            median(p99s),
            "ms (1,000 sequential increment() calls)",
        ));
    }
    let data_wanted = DATA_KEYS.iter().any(|key| wanted(key));
    // The transport's floors are the yardstick of the data rows: measured in
    // the same run.
    if wanted("floor") || data_wanted {
        let (mut redis, mut amqp) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            redis.push(percentile(&redis_floor(config, 1000).await?, 50.0));
            amqp.push(percentile(&amqp_floor(config, 1000).await?, 50.0));
        }
        report(Row::new(
            "floor_redis_rtt_p50_ms",
            median(redis),
            "ms (1,000 sequential PINGs: the transport's floor)",
        ));
        let mut transfers = Vec::new();
        for _ in 0..repeats {
            transfers.push(redis_10mb_floor(config, 10_000_000).await?);
        }
        report(Row::new(
            "floor_redis_10mb_mb_per_s",
            median(transfers),
            "MB/s (SET then GET of 10 MB: the transport's floor)",
        ));
        for (key, bytes) in [
            ("floor_data_10mb_mb_per_s", 10_000_000),
            ("floor_data_100mb_mb_per_s", 100_000_000),
        ] {
            let mut samples = Vec::new();
            for _ in 0..repeats {
                samples.push(data_floor(bytes, 5).await?);
            }
            report(Row::new(key, median(samples), "MB/s (fetch of a kept value on the data connection, in-process loopback: its floor)"));
        }
        let mut makes = Vec::new();
        for _ in 0..repeats {
            makes.push(make_floor(100 * MB));
        }
        report(Row::new(
            "floor_make_100mb_mb_per_s",
            median(makes),
            "MB/s (random_bytes making 100 MB in this process: the blob each worker makes before the clock)",
        ));
        report(Row::new(
            "floor_amqp_hop_p50_ms",
            median(amqp),
            "ms (1,000 sequential publish→deliver: the transport's floor)",
        ));
    }
    if data_wanted {
        data_rows(&client, cluster, repeats, &wanted, &mut report).await;
    }
    // Only when asked for by name: it leaves the cluster with a backlog.
    if options
        .only
        .as_deref()
        .is_some_and(|p| p.starts_with("backlog"))
    {
        let count = if options.full { 1_000_000 } else { 300_000 };
        let (peak, used, parked) = backlog(config, cluster, count).await?;
        eprintln!("backlog: {count} pending tasks, {parked} messages parked in <ns>:backlog");
        report(Row::new(
            "backlog_tasks",
            count as f64,
            "tasks pending (waiting on one long task)",
        ));
        report(Row::new(
            "backlog_scheduler_peak_rss_mb",
            peak as f64 / 1e6,
            "MB (VmHWM of the scheduler process)",
        ));
        report(Row::new(
            "backlog_redis_used_memory_mb",
            used as f64 / 1e6,
            "MB (Redis INFO used_memory, whole server)",
        ));
        report(Row::new(
            "backlog_parked_messages",
            parked as f64,
            "submission messages parked in Redis",
        ));
    }
    if wanted("scheduler_bytes") {
        let count = if options.full { 1_000_000 } else { 200_000 };
        let per_task = pending_memory(&client, cluster, count).await?;
        report(Row::new(
            "scheduler_bytes_per_pending_task",
            per_task,
            "bytes",
        ));
    }
    Ok(rows)
}
