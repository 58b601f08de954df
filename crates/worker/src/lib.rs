//! Flotilla's worker runtime.
//!
//! A worker consumes bundles of ready tasks from RabbitMQ, loads their inputs
//! from Redis (or inline from the message), runs the registered function,
//! stores the result in Redis, publishes a completion event, and only then
//! acknowledges the delivery.
//!
//! A user's worker binary depends only on `flotilla` (the package
//! `flotilla-rs`, which re-exports this crate's [`main`] as
//! `flotilla::worker::main`) and on the crates that define their tasks, and
//! names those crates:
//!
//! ```ignore
//! // my-worker/src/main.rs: serves every task and actor of `my_tasks`.
//! flotilla::worker_main!(my_tasks);
//! ```
//!
//! Naming them is what links them (see [`linked`]): a binary whose code
//! never names its task crate gets none of its tasks. [`main`] and
//! [`main_serving`] check what is linked before they connect, and refuse to
//! start a worker that would serve nothing of the user's.
//!
//! # Layout
//!
//! - [`registry`](mod@registry): the task functions registered in this binary, by name
//!   (from `flotilla-task`, which holds what the macros expand to).
//! - [`actors`]: actor constructors and the actors a worker hosts.
//! - [`linked`]: which crates' tasks are linked in; the start-up check.
//! - [`run`] and [`WorkerOptions`]: the worker's main loop, for embedding
//!   (`flotilla::LocalCluster` runs workers in-process with it).
//! - [`health`]: the health file a process supervisor's probe checks
//!   (`--health-file`, `--check-health`).
//! - `usage`: the process's resident memory and CPU time, read from
//!   `/proc/self` for each heartbeat.

pub mod actors;
mod args;
mod bundle;
mod cache;
mod chain;
pub mod health;
mod kept;
pub mod linked;
mod lost;
mod panic;
mod runtime;
mod slot;
mod usage;

// The module and its `registry()` function.
pub use bundle::INLINE_RESULT_LIMIT;
pub use flotilla_task::registry;
pub use flotilla_task::{
    decode_args, decode_arguments, encode_output, Actor, ActorRegistration, Arguments, DynActor,
    Invocation, MissingState, State, TaskContext, TaskOutcome, TaskRegistration, WorkerState,
};
pub use kept::{DataOptions, KEEP_MIN};
pub use linked::LinkError;
pub use runtime::{
    run, ContextExtension, WorkerError, WorkerHandle, WorkerOptions, HEARTBEAT, SHED_AFTER,
};
pub use slot::seceded;

use clap::Parser;
use flotilla_runtime::cli::{self, ConnectionArgs, LogArgs};

/// The worker binary's command line.
#[derive(Debug, Parser)]
#[command(
    name = "flotilla-worker",
    version,
    about = "A Flotilla worker: runs the tasks compiled into this binary",
    after_help = cli::ENVIRONMENT_HELP
)]
struct Args {
    #[command(flatten)]
    connection: ConnectionArgs,
    /// Tasks run at once, 1 to 1024 [default: number of CPUs]
    #[arg(long, value_name = "N", env = "FLOTILLA_NTHREADS", value_parser = nthreads)]
    nthreads: Option<usize>,
    /// Name shown in logs and the dashboard [default: host-pid]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Abstract resources this worker offers, e.g. GPU=1,MEMORY=64
    #[arg(long, value_name = "NAME=N,...", env = "FLOTILLA_RESOURCES", value_parser = resources)]
    resources: Option<Resources>,
    /// Take no new work while resident memory is above this (e.g. 4G, 512M)
    #[arg(long, value_name = "BYTES", env = "FLOTILLA_MEMORY_LIMIT", value_parser = parse_bytes)]
    memory_limit: Option<u64>,
    /// Task deliveries held unacknowledged, fixed, 1 to 65535 [default: 64 per slot, at least 256]
    #[arg(long, value_name = "N", env = "FLOTILLA_PREFETCH", value_parser = prefetch)]
    prefetch: Option<usize>,
    /// Always hold just one task delivery per free slot, following the slots (costs small tasks' throughput)
    #[arg(long, env = "FLOTILLA_PREFETCH_PER_SLOT", conflicts_with = "prefetch")]
    prefetch_per_slot: bool,
    /// When every slot has run the same task this long, hold one delivery per slot and give back the others for other workers, e.g. 1s, 500ms; 0 or off: never [default: 1s]
    #[arg(long, value_name = "DURATION", env = "FLOTILLA_SHED_AFTER", value_parser = shed_after)]
    shed_after: Option<Shed>,
    /// AMQP heartbeat in seconds, 0 to 3600 (0: the broker's); a stopped worker's deliveries return after about twice this [default: 10]
    #[arg(long, value_name = "SECONDS", env = "FLOTILLA_AMQP_HEARTBEAT", value_parser = heartbeat)]
    heartbeat: Option<usize>,
    /// When a synchronous task runs past its hard time limit, its thread cannot be stopped: the worker reports it TimedOut, drains (running tasks finish, unstarted ones go back to the queue), then restarts itself in place (same PID, arguments and environment) or exits with status 75 for a supervisor to restart it
    #[arg(long, value_name = "ACTION", env = "FLOTILLA_ON_STUCK", value_enum, default_value_t = OnStuck::Restart)]
    on_stuck: OnStuck,
    /// Where this worker serves the large results it keeps to readers (clients, other workers), host:port; 0.0.0.0:PORT when they run on other hosts; off: keep none, write every result to Redis
    #[arg(
        long,
        value_name = "ADDR",
        env = "FLOTILLA_DATA_ADDR",
        default_value = "127.0.0.1:0"
    )]
    data_addr: String,
    /// The address readers are told to fetch kept results from [default: the bound address; when bound to all interfaces, this host's name and the bound port]
    #[arg(long, value_name = "HOST:PORT", env = "FLOTILLA_DATA_ADVERTISE")]
    data_advertise: Option<String>,
    /// Results at least this large are kept by the worker that made them and served over its data connection rather than written to Redis, e.g. 1M, 512K
    #[arg(long, value_name = "BYTES", env = "FLOTILLA_KEEP_MIN", value_parser = parse_bytes, default_value = "1M")]
    keep_min: u64,
    /// At most this many bytes of kept results stay in the worker's memory; beyond it the oldest are spilled to Redis, e.g. 2G [default: no bound]
    #[arg(long, value_name = "BYTES", env = "FLOTILLA_DATA_MEMORY", value_parser = parse_bytes)]
    data_memory: Option<u64>,
    /// Write this file after every heartbeat it published (and before each reconnection attempt), for a liveness probe to check its age with --check-health
    #[arg(long, value_name = "PATH", env = "FLOTILLA_HEALTH_FILE")]
    health_file: Option<std::path::PathBuf>,
    /// Do not run: exit 0 if the --health-file was written within MAX_AGE (e.g. 60s), else print why and exit 1 (a liveness probe's command)
    #[arg(long, value_name = "MAX_AGE", value_parser = max_age, requires = "health_file")]
    check_health: Option<std::time::Duration>,
    #[command(flatten)]
    log: LogArgs,
}

/// What a worker process does once it has retired because a synchronous
/// task ran past its time limit (`--on-stuck`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnStuck {
    /// Re-execute this binary with the same arguments and environment (same PID; the stuck thread is gone)
    Restart,
    /// Exit with status 75, for a supervisor or container runtime to restart the worker
    Exit,
}

/// The exit status of a worker that retired because a synchronous task ran
/// past its time limit, with `--on-stuck exit` (or when re-executing
/// itself failed): 75, `EX_TEMPFAIL` of `sysexits.h` ("try again later").
/// Supervisors should restart the worker on it.
pub const RETIRED_EXIT_CODE: i32 = 75;

/// `--resources`, parsed (a newtype, so that clap takes it as one value).
#[derive(Debug, Clone)]
struct Resources(Vec<(String, u64)>);

fn resources(text: &str) -> Result<Resources, String> {
    parse_resources(text).map(Resources)
}

/// Most tasks a worker runs at once (`--nthreads`).
const MAX_NTHREADS: usize = 1024;

fn whole_number_in(text: &str, min: usize, max: usize) -> Result<usize, String> {
    let number: u128 = text
        .trim()
        .parse()
        .map_err(|_| format!("expects a whole number, got {text:?}"))?;
    usize::try_from(number)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("{number} is not in {min}..={max}"))
}

fn nthreads(text: &str) -> Result<usize, String> {
    whole_number_in(text, 1, MAX_NTHREADS)
}

fn prefetch(text: &str) -> Result<usize, String> {
    whole_number_in(text, 1, usize::from(u16::MAX))
}

/// `--shed-after`, parsed: `None` for never (a newtype, so that clap
/// takes it as one value).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shed(Option<std::time::Duration>);

fn shed_after(text: &str) -> Result<Shed, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") || text == "0" {
        return Ok(Shed(None));
    }
    let after = humantime::parse_duration(text)
        .map_err(|error| format!("expects a duration like 1s or 500ms, or off: {error}"))?;
    Ok(Shed(Some(after).filter(|after| !after.is_zero())))
}

fn max_age(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|error| format!("expects a duration like 60s or 2m: {error}"))
}

fn heartbeat(text: &str) -> Result<usize, String> {
    whole_number_in(text, 0, 3600)
}

/// The whole worker program: parses flags and environment, logs with
/// `tracing`, runs until SIGTERM or Ctrl-C, and exits non-zero on failure.
/// Every task registered in the binary is served.
///
/// When a synchronous task runs past its hard time limit, its thread cannot
/// be stopped: the worker reports the task `TimedOut`, retires (see
/// [`WorkerOptions::retire_when_stuck`]) and then, by default, re-executes
/// its own binary with the same arguments and environment (same PID, a new
/// worker id); with `--on-stuck exit` it exits with [`RETIRED_EXIT_CODE`]
/// for a supervisor to restart it.
///
/// Prefer `flotilla::worker_main!(my_tasks)`, which links the named task
/// crates and checks each of them. Called alone, `main` serves whatever the
/// binary's code happens to link, and refuses to start (logging an error
/// that says how to fix it, exit status 2) when that is none of the user's
/// tasks: a task crate that the binary's code never names is not linked.
pub fn main() {
    main_serving(&[])
}

/// Like [`main`], and checks at start that each crate of `task_crates`
/// (crate names as written in Rust code) contributes at least one task or
/// actor to this binary; exits with status 2 and an error naming the
/// crate otherwise. `flotilla::worker_main!(my_tasks)` calls it after
/// linking `my_tasks`.
pub fn main_serving(task_crates: &[&str]) {
    main_serving_with(task_crates, || async { WorkerState::new() })
}

/// Like [`main_serving`], and lends its tasks the [`WorkerState`] that
/// `init` builds: once, on the worker's tokio runtime (so a connection pool
/// may spawn its own tasks), after the flags are read and logging is set
/// up, before the worker connects. Tasks read it with a `State<T>`
/// parameter or `TaskContext::state`. `flotilla::worker_main!(my_tasks;
/// state = my_tasks::init)` calls it with one value.
///
/// ```no_run
/// use flotilla_worker::WorkerState;
///
/// struct Pool { size: usize }
/// struct Greeting(String);
///
/// fn main() {
///     flotilla_worker::main_serving_with(&[], || async {
///         WorkerState::new()
///             .with(Pool { size: 8 })
///             .with(Greeting("hello".into()))
///     });
/// }
/// ```
pub fn main_serving_with<F, Fut>(task_crates: &[&str], init: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = WorkerState>,
{
    let args = Args::parse();
    if let (Some(max_age), Some(path)) = (args.check_health, &args.health_file) {
        // A probe: says how the worker that writes the file is, and exits.
        match health::check(path, max_age) {
            Ok(age) => {
                println!("healthy: last heartbeat {:.1} s ago", age.as_secs_f64());
                std::process::exit(0)
            }
            Err(why) => {
                eprintln!("unhealthy: {why}");
                std::process::exit(1)
            }
        }
    }
    args.log.init();
    match linked::check(task_crates) {
        Ok(crates) => tracing::info!(task_crates = ?crates, "tasks and actors linked in, by crate"),
        Err(error) => {
            tracing::error!("{error}");
            std::process::exit(2)
        }
    }
    let config = args.connection.config().unwrap_or_else(|message| {
        eprintln!("flotilla-worker: {message}");
        std::process::exit(2)
    });
    cli::warn_default_credentials(&config.amqp_url);
    let mut options = WorkerOptions::new(config);
    if let Some(n) = args.nthreads {
        options.nthreads = n.max(1);
    }
    if let Some(n) = args.prefetch {
        options.prefetch = Some(u16::try_from(n.max(1)).unwrap_or(u16::MAX));
    }
    options.prefetch_per_slot = args.prefetch_per_slot;
    if let Some(Shed(after)) = args.shed_after {
        options.shed_after = after;
    }
    if let Some(seconds) = args.heartbeat {
        options.heartbeat = Some(u16::try_from(seconds).unwrap_or(u16::MAX));
    }
    if let Some(Resources(resources)) = args.resources {
        options.resources = resources;
    }
    if let Some(limit) = args.memory_limit {
        options.memory_limit = Some(limit);
    }
    if let Some(name) = args.name {
        options.name = Some(name);
    }
    options.data = (!args.data_addr.trim().eq_ignore_ascii_case("off")).then(|| DataOptions {
        listen: args.data_addr.trim().to_owned(),
        advertise: args.data_advertise,
        keep_min: usize::try_from(args.keep_min).unwrap_or(usize::MAX),
        memory: args
            .data_memory
            .map(|bytes| usize::try_from(bytes).unwrap_or(usize::MAX)),
    });
    options.health_file = args.health_file;
    // A process can be replaced, so a stuck thread need not haunt it.
    options.retire_when_stuck = true;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        let state = init().await;
        if !state.is_empty() {
            tracing::info!(types = ?state.type_names(), "worker state built");
        }
        options.state = std::sync::Arc::new(state);
        run(options, cli::shutdown_signal()).await
    });
    // The worker has drained; a thread abandoned past its time limit may
    // still run, and must not hold the exit (dropping the runtime would
    // wait for it).
    runtime.shutdown_background();
    match result {
        Ok(()) => {}
        Err(WorkerError::Retired { task }) => retire(&task, args.on_stuck),
        Err(error) => {
            tracing::error!(%error, "worker failed");
            std::process::exit(1);
        }
    }
}

/// Replaces a worker process that retired because `task`'s thread is stuck:
/// re-executes the binary in place (`OnStuck::Restart`), or exits with
/// [`RETIRED_EXIT_CODE`]. Never returns.
fn retire(task: &str, on_stuck: OnStuck) -> ! {
    if on_stuck == OnStuck::Restart {
        let error = reexec();
        tracing::error!(
            %error,
            %task,
            code = RETIRED_EXIT_CODE,
            "worker retired (a synchronous task ran past its time limit) but could not re-execute \
             itself: exiting for a supervisor to restart it"
        );
    } else {
        tracing::warn!(
            %task,
            code = RETIRED_EXIT_CODE,
            "worker retired (a synchronous task ran past its time limit and its thread cannot be \
             stopped): exiting (--on-stuck exit) for a supervisor to restart it"
        );
    }
    std::process::exit(RETIRED_EXIT_CODE)
}

/// Re-executes this binary with the same arguments and environment; the
/// process keeps its PID and loses every thread. Returns only on failure.
#[cfg(unix)]
fn reexec() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(error) => return error,
    };
    let mut arguments = std::env::args_os();
    let mut command = std::process::Command::new(&program);
    if let Some(arg0) = arguments.next() {
        command.arg0(arg0);
    }
    command.args(arguments);
    tracing::warn!(
        program = %program.display(),
        pid = std::process::id(),
        "worker retired (a synchronous task ran past its time limit and its thread cannot be \
         stopped): re-executing itself, same PID"
    );
    command.exec()
}

/// Re-executing in place needs Unix; elsewhere the worker exits instead.
#[cfg(not(unix))]
fn reexec() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "re-executing a process in place needs Unix",
    )
}

/// Parses `GPU=1,MEMORY=64` into resource amounts.
pub fn parse_resources(text: &str) -> Result<Vec<(String, u64)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (name, amount) = part
                .split_once('=')
                .ok_or_else(|| format!("--resources expects NAME=N, got {part:?}"))?;
            let amount = amount
                .trim()
                .parse()
                .map_err(|_| format!("--resources: {amount:?} is not a whole number"))?;
            Ok((name.trim().to_owned(), amount))
        })
        .collect()
}

/// Parses `4G`, `512M`, `64K` or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("expects a size like 4G or 512M, got {text:?}"))?;
    let scale = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown unit in {text:?} (expects a size like 4G or 512M)"
            ))
        }
    };
    Ok(number.saturating_mul(scale))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn flags_and_their_variables_are_listed() {
        super::Args::command().debug_assert();
        let help = super::Args::try_parse_from(["flotilla-worker", "--help"]).unwrap_err();
        assert_eq!(help.exit_code(), 0);
        let help = help.to_string();
        for needle in [
            "--nthreads <N>",
            "FLOTILLA_NTHREADS",
            "--prefetch <N>",
            "FLOTILLA_PREFETCH",
            "--heartbeat <SECONDS>",
            "--shed-after <DURATION>",
            "FLOTILLA_SHED_AFTER",
            "FLOTILLA_AMQP_HEARTBEAT",
            "FLOTILLA_RESOURCES",
            "FLOTILLA_MEMORY_LIMIT",
            "FLOTILLA_AMQP_URL",
            "FLOTILLA_LOG_FORMAT",
            "FLOTILLA_SECRET",
            "--data-addr <ADDR>",
            "FLOTILLA_DATA_ADDR",
            "FLOTILLA_DATA_ADVERTISE",
            "FLOTILLA_KEEP_MIN",
            "FLOTILLA_DATA_MEMORY",
            "--on-stuck <ACTION>",
            "FLOTILLA_ON_STUCK",
            "--health-file <PATH>",
            "FLOTILLA_HEALTH_FILE",
            "--check-health <MAX_AGE>",
            "restart: Re-execute",
            "exit:    Exit with status 75",
        ] {
            assert!(help.contains(needle), "{needle} in {help}");
        }
        let version = super::Args::try_parse_from(["flotilla-worker", "--version"]).unwrap_err();
        assert_eq!(version.exit_code(), 0);
    }

    #[test]
    fn values_are_parsed_and_checked() {
        let args = super::Args::try_parse_from([
            "flotilla-worker",
            "--nthreads",
            " 3 ",
            "--memory-limit=4G",
            "--resources",
            "GPU=1",
            "--prefetch",
            "10",
            "--heartbeat",
            "5",
            "--shed-after",
            "1500ms",
        ])
        .unwrap();
        assert_eq!(args.heartbeat, Some(5));
        assert_eq!(
            args.shed_after,
            Some(super::Shed(Some(std::time::Duration::from_millis(1500))))
        );
        for never in ["0", "off", "OFF", "0s"] {
            let args = super::Args::try_parse_from(["w", "--shed-after", never]).unwrap();
            assert_eq!(args.shed_after, Some(super::Shed(None)), "{never}");
        }
        assert_eq!(args.nthreads, Some(3));
        assert_eq!(args.memory_limit, Some(4 << 30));
        assert_eq!(args.resources.unwrap().0, vec![("GPU".to_string(), 1)]);
        assert_eq!(args.prefetch, Some(10));
        assert_eq!(args.on_stuck, super::OnStuck::Restart);
        let exit = super::Args::try_parse_from(["w", "--on-stuck", "exit"]).unwrap();
        assert_eq!(exit.on_stuck, super::OnStuck::Exit);
        let widest =
            super::Args::try_parse_from(["w", "--nthreads", "1024", "--prefetch", "65535"])
                .unwrap();
        assert_eq!(
            (widest.nthreads, widest.prefetch),
            (Some(1024), Some(65535))
        );
        let error = super::Args::try_parse_from(["w", "--nthreads", "2305843009213693952"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("1..=1024"), "{error}");
        for wrong in [
            &["flotilla-worker", "--nthreads", "many"][..],
            &["flotilla-worker", "--nthreads", "2305843009213693952"],
            &[
                "flotilla-worker",
                "--nthreads",
                "99999999999999999999999999999999999999999",
            ],
            &["flotilla-worker", "--nthreads", "0"],
            &["flotilla-worker", "--nthreads", "1025"],
            &["flotilla-worker", "--nthreads", "-1"],
            &["flotilla-worker", "--prefetch", "0"],
            &["flotilla-worker", "--prefetch", "65536"],
            &["flotilla-worker", "--heartbeat", "3601"],
            &["flotilla-worker", "--heartbeat", "-1"],
            &["flotilla-worker", "--shed-after", "soon"],
            &["flotilla-worker", "--shed-after", "5"],
            &[
                "flotilla-worker",
                "--memory-limit",
                "99999999999999999999999",
            ],
            &["flotilla-worker", "--memory-limit", "lots"],
            &["flotilla-worker", "--resources", "GPU"],
            &["flotilla-worker", "--on-stuck", "hang"],
            &["flotilla-worker", "--nope"],
        ] {
            let error = super::Args::try_parse_from(wrong).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{wrong:?}");
        }
    }

    #[test]
    fn the_health_probe_needs_the_file_and_an_age() {
        let args =
            super::Args::try_parse_from(["w", "--health-file", "/tmp/h", "--check-health", "90s"])
                .unwrap();
        assert_eq!(
            args.health_file.as_deref(),
            Some(std::path::Path::new("/tmp/h"))
        );
        assert_eq!(args.check_health, Some(std::time::Duration::from_secs(90)));
        let worker = super::Args::try_parse_from(["w", "--health-file", "/tmp/h"]).unwrap();
        assert_eq!(worker.check_health, None, "writing the file is not probing");
        for wrong in [
            &["w", "--check-health", "60s"][..],
            &["w", "--health-file", "/tmp/h", "--check-health", "soon"],
        ] {
            let error = super::Args::try_parse_from(wrong).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{wrong:?}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_bytes("4G").unwrap(), 4 << 30);
        assert_eq!(super::parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(super::parse_bytes("1000").unwrap(), 1000);
        assert!(super::parse_bytes("lots").is_err());
        assert!(super::parse_bytes("5X").is_err());
    }

    #[test]
    fn resources_parse() {
        assert_eq!(
            super::parse_resources("GPU=1, MEMORY=64").unwrap(),
            vec![("GPU".to_string(), 1), ("MEMORY".to_string(), 64)]
        );
        assert!(super::parse_resources("GPU").is_err());
        assert!(super::parse_resources("GPU=x").is_err());
    }
}
