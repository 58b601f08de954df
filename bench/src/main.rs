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
//! ```

use anyhow::{bail, Context, Result};
use flotilla::{Client, Config, TaskFuture};
use flotilla_examples::{add, byte_len, inc, make_bytes, slow_identity};
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
                     --only PREFIX  run only workloads whose key starts with PREFIX\n\
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
/// this process: MB/s of the pair, the floor under `gather_10mb_mb_per_s`.
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kib * 1024)
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

/// Scatters 10 MB, has 50 tasks take its length, gathers: seconds.
async fn scatter_and_use(client: &Client, bytes: usize) -> Result<f64> {
    let started = Instant::now();
    let data = client
        .scatter(&serde_bytes::ByteBuf::from(vec![1u8; bytes]))
        .await?;
    let lengths: Vec<_> = (0..50)
        .map(|i| {
            client
                .submit_with(byte_len, (&data,))
                .key(format!("len-{bytes}-{i}"))
                .submit()
        })
        .collect();
    let results = client.gather(&lengths).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if results.iter().any(|&n| n != bytes) {
        bail!("wrong lengths");
    }
    Ok(elapsed)
}

async fn big_result(client: &Client, bytes: usize, salt: usize) -> Result<f64> {
    let started = Instant::now();
    let data = client.submit(make_bytes, (bytes + salt,)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if data.len() != bytes + salt {
        bail!("wrong size");
    }
    Ok((bytes as f64 / 1e6) / elapsed)
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

struct Row {
    key: &'static str,
    value: Option<f64>,
    unit: &'static str,
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
        let body: Vec<String> = rows
            .iter()
            .map(|r| match r.value {
                Some(v) => format!("\"{}\": {:.4}", r.key, v),
                None => format!("\"{}\": null", r.key),
            })
            .collect();
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
    let warm = client.submit(byte_len, (serde_bytes::ByteBuf::from(vec![0u8; 10]),));
    warm.result_timeout(Duration::from_secs(60))
        .await
        .context("cluster did not start")?;
    let _ = client
        .gather(&client.map(inc, (0..2000).map(|i| (i,))))
        .await?;

    let wanted = |key: &str| options.only.as_deref().is_none_or(|p| key.starts_with(p));
    let repeats = options.repeats.max(1);
    let mut rows = Vec::new();
    let mut report = |row: Row| {
        match row.value {
            Some(v) => eprintln!("{:<36} {:>14.3} {}", row.key, v, row.unit),
            None => eprintln!("{:<36} {:>14} {}", row.key, "—", row.unit),
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
        report(Row {
            key,
            value: Some(median(samples)),
            unit: "tasks/s",
        });
    }
    if wanted("chain_ms_per_task") {
        let mut samples = Vec::new();
        for _ in 0..repeats {
            samples.push(chain(&client, 500).await?);
        }
        report(Row {
            key: "chain_ms_per_task",
            value: Some(median(samples)),
            unit: "ms/task",
        });
    }
    if wanted("roundtrip") {
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            let samples = roundtrips(&client, 500).await?;
            p50s.push(percentile(&samples, 50.0));
            p99s.push(percentile(&samples, 99.0));
        }
        report(Row {
            key: "roundtrip_p50_ms",
            value: Some(median(p50s)),
            unit: "ms",
        });
        report(Row {
            key: "roundtrip_p99_ms",
            value: Some(median(p99s)),
            unit: "ms",
        });
    }
    if wanted("actor") {
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            let samples = actor_roundtrips(&client, 1000).await?;
            p50s.push(percentile(&samples, 50.0));
            p99s.push(percentile(&samples, 99.0));
        }
        report(Row {
            key: "actor_p50_ms",
            value: Some(median(p50s)),
            unit: "ms (1,000 sequential increment() calls)",
        });
        report(Row {
            key: "actor_p99_ms",
            value: Some(median(p99s)),
            unit: "ms (1,000 sequential increment() calls)",
        });
    }
    if wanted("floor") {
        let (mut redis, mut amqp) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            redis.push(percentile(&redis_floor(config, 1000).await?, 50.0));
            amqp.push(percentile(&amqp_floor(config, 1000).await?, 50.0));
        }
        report(Row {
            key: "floor_redis_rtt_p50_ms",
            value: Some(median(redis)),
            unit: "ms (1,000 sequential PINGs: the transport's floor)",
        });
        let mut transfers = Vec::new();
        for _ in 0..repeats {
            transfers.push(redis_10mb_floor(config, 10_000_000).await?);
        }
        report(Row {
            key: "floor_redis_10mb_mb_per_s",
            value: Some(median(transfers)),
            unit: "MB/s (SET then GET of 10 MB: the transport's floor)",
        });
        for (key, bytes) in [
            ("floor_data_10mb_mb_per_s", 10_000_000),
            ("floor_data_100mb_mb_per_s", 100_000_000),
        ] {
            let mut samples = Vec::new();
            for _ in 0..repeats {
                samples.push(data_floor(bytes, 5).await?);
            }
            report(Row {
                key,
                value: Some(median(samples)),
                unit: "MB/s (fetch of a kept value on the data connection, in-process loopback: its floor)",
            });
        }
        report(Row {
            key: "floor_amqp_hop_p50_ms",
            value: Some(median(amqp)),
            unit: "ms (1,000 sequential publish→deliver: the transport's floor)",
        });
    }
    if wanted("scatter") {
        let mut samples = Vec::new();
        for run in 0..repeats {
            samples.push(scatter_and_use(&client, 10_000_000 + run).await?);
        }
        report(Row {
            key: "scatter_10mb_50_tasks_s",
            value: Some(median(samples)),
            unit: "s",
        });
    }
    if wanted("gather_10mb") {
        let mut samples = Vec::new();
        for run in 0..repeats {
            samples.push(big_result(&client, 10_000_000, run).await?);
        }
        report(Row {
            key: "gather_10mb_mb_per_s",
            value: Some(median(samples)),
            unit: "MB/s",
        });
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
        report(Row {
            key: "backlog_tasks",
            value: Some(count as f64),
            unit: "tasks pending (waiting on one long task)",
        });
        report(Row {
            key: "backlog_scheduler_peak_rss_mb",
            value: Some(peak as f64 / 1e6),
            unit: "MB (VmHWM of the scheduler process)",
        });
        report(Row {
            key: "backlog_redis_used_memory_mb",
            value: Some(used as f64 / 1e6),
            unit: "MB (Redis INFO used_memory, whole server)",
        });
        report(Row {
            key: "backlog_parked_messages",
            value: Some(parked as f64),
            unit: "submission messages parked in Redis",
        });
    }
    if wanted("scheduler_bytes") {
        let count = if options.full { 1_000_000 } else { 200_000 };
        let per_task = pending_memory(&client, cluster, count).await?;
        report(Row {
            key: "scheduler_bytes_per_pending_task",
            value: Some(per_task),
            unit: "bytes",
        });
    }
    Ok(rows)
}
