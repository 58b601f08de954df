//! `flotilla-scheduler`: tracks submitted tasks and their dependencies and
//! hands ready tasks to the workers; serves a dashboard, Prometheus metrics
//! and a status API over HTTP. Its subcommands (`status`, `workers`,
//! `tasks`, `cancel`, `retry`) ask a running scheduler through that API;
//! `purge` deletes a namespace.

use flotilla_runtime::cli::{self, Flag};
use flotilla_scheduler::{http, Hooks};
use serde_json::Value;
use std::process::ExitCode;
use std::time::Duration;
use tracing::Instrument;

const ABOUT: &str =
    "Flotilla's scheduler: tracks tasks and their dependencies and hands ready tasks to workers";

const HTTP_FLAG: Flag = Flag {
    name: "http-addr",
    value: "ADDR",
    help: "HOST:PORT of the dashboard, /metrics and the status API; `off` for none [env FLOTILLA_HTTP_ADDR; default 127.0.0.1:8787]",
};

/// `--http-addr` of the subcommands: where to find the scheduler.
const API_FLAG: Flag = Flag {
    name: "http-addr",
    value: "ADDR",
    help:
        "HOST:PORT where the scheduler serves HTTP [env FLOTILLA_HTTP_ADDR; default 127.0.0.1:8787]",
};

const COMMANDS_HELP: &str = "
Commands (ask the scheduler serving at --http-addr, default 127.0.0.1:8787):
  status [--json]                          tasks by state, workers, queues, Redis memory
  workers [--json]                         live workers: slots, running tasks, throughput, last seen
  tasks [--state S] [--limit N] [--json]   tasks in the scheduler (S: waiting, ready, processing, finished, erred)
  cancel KEY...                            cancel tasks and their dependents, running ones included
  retry KEY...                             run erred tasks again
  purge [--yes] [--force]                  delete the namespace's queues, exchanges and Redis keys
                                           (takes the connection flags; refuses while a scheduler or
                                           workers consume the namespace's queues, unless --force)
Run `flotilla-scheduler COMMAND --help` for a command's flags.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(command @ ("status" | "workers" | "tasks" | "cancel" | "retry" | "purge")) => {
            match command_main(command, &args[1..]) {
                Ok(code) => code,
                Err(message) => {
                    eprintln!("flotilla-scheduler {command}: {message}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => scheduler_main(args),
    }
}

/// Runs the scheduler (and its HTTP endpoint) until SIGTERM or Ctrl-C.
fn scheduler_main(args: Vec<String>) -> ExitCode {
    let flags: Vec<Flag> = cli::CONNECTION_FLAGS
        .iter()
        .copied()
        .chain([HTTP_FLAG])
        .collect();
    let parsed = match cli::parse("flotilla-scheduler", ABOUT, &flags, args) {
        Ok(parsed) => parsed,
        Err((0, text)) => {
            print!("{text}{COMMANDS_HELP}");
            return ExitCode::SUCCESS;
        }
        Err((code, text)) => {
            eprintln!("{text}");
            return ExitCode::from(code as u8);
        }
    };
    cli::init_logging();
    let config = match parsed.config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flotilla-scheduler: {error}");
            return ExitCode::from(2);
        }
    };
    cli::warn_default_credentials(&config.amqp_url);
    // An address the operator chose must work; the default may be taken
    // (another scheduler on this machine), which costs only the dashboard.
    let (http_addr, explicit) = match parsed
        .get("http-addr")
        .map(str::to_owned)
        .or_else(|| std::env::var("FLOTILLA_HTTP_ADDR").ok())
    {
        Some(addr) => (addr, true),
        None => (http::DEFAULT_ADDR.to_owned(), false),
    };
    let http_addr = Some(http_addr.trim().to_owned())
        .filter(|a| !a.is_empty() && !a.eq_ignore_ascii_case("off"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let span = tracing::info_span!("scheduler", namespace = %config.namespace);
    runtime.block_on(
        async move {
            let mut hooks = Hooks::default();
            let mut endpoint = None;
            if let Some(addr) = &http_addr {
                match http::bind(addr, &config).await {
                    Ok((server, server_hooks)) => {
                        tracing::info!(
                            url = %format!("http://{}/", server.local_addr()),
                            "serving the dashboard, /metrics and the status API"
                        );
                        hooks = server_hooks;
                        endpoint = Some(tokio::spawn(server.serve()));
                    }
                    Err(error) if explicit => {
                        tracing::error!(%error, addr, "cannot serve HTTP at --http-addr");
                        return ExitCode::from(2);
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        addr,
                        "cannot serve HTTP at the default address; running without the dashboard (choose one with --http-addr)"
                    ),
                }
            }
            let result =
                flotilla_scheduler::run_with_hooks(config, cli::shutdown_signal(), hooks).await;
            if let Some(endpoint) = endpoint {
                endpoint.abort();
            }
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "scheduler failed");
                    ExitCode::FAILURE
                }
            }
        }
        .instrument(span),
    )
}

/// Flags and arguments of a subcommand.
struct CommandLine {
    parsed: cli::Parsed,
    /// `--json`, `--yes`, `--force`.
    switches: Vec<&'static str>,
    /// Arguments that are not flags (task keys).
    positional: Vec<String>,
}

impl CommandLine {
    fn has(&self, switch: &str) -> bool {
        self.switches.contains(&switch)
    }
}

/// Splits switches and positional arguments from the flags (which all take
/// a value), then parses the flags.
fn parse_command(
    command: &str,
    about: &str,
    flags: &[Flag],
    switches: &[(&'static str, &'static str)],
    usage: &str,
    args: &[String],
) -> Result<CommandLine, ExitCode> {
    let program = format!("flotilla-scheduler {command}");
    let mut found = Vec::new();
    let mut positional = Vec::new();
    let mut rest = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if let Some(&(switch, _)) = switches
            .iter()
            .find(|(s, _)| arg.strip_prefix("--") == Some(s))
        {
            found.push(switch);
        } else if arg == "--help" || arg == "-h" {
            rest.push(arg.clone());
        } else if arg.starts_with("--") {
            rest.push(arg.clone());
            if !arg.contains('=') {
                rest.extend(args.next().cloned());
            }
        } else {
            positional.push(arg.clone());
        }
    }
    match cli::parse(&program, about, flags, rest) {
        Ok(parsed) => Ok(CommandLine {
            parsed,
            switches: found,
            positional,
        }),
        Err((0, text)) => {
            let text = text.replace(
                &format!("Usage: {program} [OPTIONS]"),
                &format!("Usage: {program} {usage}"),
            );
            let (options, logging) = text.split_once("\n\nLogging").unwrap_or((&text, ""));
            println!("{options}");
            for (switch, help) in switches {
                println!("  {:<26} {help}", format!("--{switch}"));
            }
            if command == "purge" {
                print!("\nLogging{logging}");
            }
            Err(ExitCode::SUCCESS)
        }
        Err((code, text)) => {
            eprintln!("{text}");
            Err(ExitCode::from(code as u8))
        }
    }
}

fn command_main(command: &str, args: &[String]) -> Result<ExitCode, String> {
    const JSON: (&str, &str) = ("json", "print the API's JSON instead of a table");
    let http_flags = [API_FLAG];
    let task_flags = [
        API_FLAG,
        Flag {
            name: "state",
            value: "STATE",
            help: "only tasks in this state: waiting, ready, processing, finished or erred",
        },
        Flag {
            name: "limit",
            value: "N",
            help: "at most N tasks [default 100]",
        },
    ];
    let purge_flags = cli::CONNECTION_FLAGS;
    let (about, flags, switches, usage): (&str, &[Flag], Vec<_>, &str) = match command {
        "status" => (
            "a running scheduler's tasks by state, workers, queues and Redis memory",
            &http_flags,
            vec![JSON],
            "[OPTIONS]",
        ),
        "workers" => (
            "a running scheduler's live workers",
            &http_flags,
            vec![JSON],
            "[OPTIONS]",
        ),
        "tasks" => (
            "tasks in a running scheduler's table",
            &task_flags,
            vec![JSON],
            "[OPTIONS]",
        ),
        "cancel" => (
            "cancels tasks and their dependents (running ones are stopped on their workers)",
            &http_flags,
            vec![],
            "[OPTIONS] KEY...",
        ),
        "retry" => (
            "runs erred tasks (and their erred inputs) again",
            &http_flags,
            vec![],
            "[OPTIONS] KEY...",
        ),
        _ => (
            "deletes a namespace: its shared queues, exchanges and every Redis key (results, references, datasets, primitives)",
            &purge_flags,
            vec![
                ("yes", "really delete (without it, only say what would go)"),
                ("force", "even while processes consume the namespace's queues"),
            ],
            "[OPTIONS] --yes",
        ),
    };
    let line = match parse_command(command, about, flags, &switches, usage, args) {
        Ok(line) => line,
        Err(code) => return Ok(code),
    };
    if command == "purge" {
        return purge(&line);
    }
    if !matches!(command, "cancel" | "retry") && !line.positional.is_empty() {
        return Err(format!("unexpected argument {:?}", line.positional[0]));
    }
    let addr = line
        .parsed
        .get("http-addr")
        .map(str::to_owned)
        .or_else(|| std::env::var("FLOTILLA_HTTP_ADDR").ok())
        .unwrap_or_else(|| http::DEFAULT_ADDR.to_owned());
    let api = Api::new(&addr)?;
    match command {
        "status" => {
            let status = api.get("/api/status")?;
            if line.has("json") {
                println!("{}", pretty(&status));
            } else {
                print!("{}", format_status(&status));
            }
        }
        "workers" => {
            let status = api.get("/api/status")?;
            if line.has("json") {
                println!("{}", pretty(&status["workers"]));
            } else {
                print!("{}", format_workers(&status));
            }
        }
        "tasks" => {
            let mut path = "/api/tasks?".to_owned();
            if let Some(state) = line.parsed.get("state") {
                path.push_str(&format!("state={}&", percent_encode(state)));
            }
            if let Some(limit) = line.parsed.get("limit") {
                path.push_str(&format!("limit={}", percent_encode(limit)));
            }
            let tasks = api.get(&path)?;
            if line.has("json") {
                println!("{}", pretty(&tasks));
            } else {
                print!("{}", format_tasks(&tasks));
            }
        }
        _ => {
            if line.positional.is_empty() {
                return Err("name at least one task key".to_owned());
            }
            let query: Vec<String> = line
                .positional
                .iter()
                .map(|key| format!("key={}", percent_encode(key)))
                .collect();
            api.post(&format!("/api/{command}?{}", query.join("&")))?;
            let verb = if command == "cancel" {
                "cancellation"
            } else {
                "retry"
            };
            println!(
                "{verb} requested for {} task(s): {}",
                line.positional.len(),
                line.positional.join(" ")
            );
            println!("(keys the scheduler does not know are ignored; check with `flotilla-scheduler tasks`)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A running scheduler's HTTP API, over plain blocking sockets.
struct Api {
    addr: String,
}

impl Api {
    fn new(addr: &str) -> Result<Api, String> {
        let addr = addr
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/');
        if addr.is_empty() || addr.eq_ignore_ascii_case("off") {
            return Err("give the scheduler's address with --http-addr HOST:PORT".to_owned());
        }
        Ok(Api {
            addr: addr.to_owned(),
        })
    }

    fn get(&self, path: &str) -> Result<Value, String> {
        self.call("GET", path)
    }

    fn post(&self, path: &str) -> Result<Value, String> {
        self.call("POST", path)
    }

    fn call(&self, method: &str, path: &str) -> Result<Value, String> {
        let unreachable = |error: &dyn std::fmt::Display| {
            format!(
                "no scheduler answers at {} ({error}); is it running, and serving HTTP there (--http-addr)?",
                self.addr
            )
        };
        // Refusals carry their reason as JSON: read them like answers.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(20)))
            .user_agent("flotilla-scheduler")
            .build()
            .into();
        let url = format!("http://{}{path}", self.addr);
        let answer = if method == "POST" {
            agent
                .post(&url)
                .header("Accept", "application/json")
                .send_empty()
        } else {
            agent.get(&url).header("Accept", "application/json").call()
        };
        let mut answer = answer.map_err(|e| unreachable(&e))?;
        let status = answer.status().as_u16();
        let body = answer
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("reading the answer of {}: {e}", self.addr))?;
        let value: Value = serde_json::from_str(&body).map_err(|e| {
            format!(
                "{} answered {status} without JSON ({e}); is that a Flotilla scheduler?",
                self.addr
            )
        })?;
        if status >= 400 {
            let error = value["error"].as_str().unwrap_or("no reason given");
            return Err(format!("the scheduler refused ({status}): {error}"));
        }
        Ok(value)
    }
}

/// Deletes a namespace (see `flotilla::purge`), after checking that nobody
/// uses it.
fn purge(line: &CommandLine) -> Result<ExitCode, String> {
    use flotilla_runtime::transport;
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;

    cli::init_logging();
    let config = line.parsed.config()?;
    let names = config.names();
    let ns = names.namespace().to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let connection = transport::connect_amqp(&config.amqp_url, &format!("flotilla purge {ns}"))
            .await
            .map_err(|e| format!("RabbitMQ: {e}"))?;
        let mut redis = transport::connect_redis(&config.redis_url)
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let mut consumers = Vec::new();
        for queue in [names.scheduler_queue(), names.tasks_queue()] {
            // A missing queue closes the channel: one channel per probe.
            let channel = connection.create_channel().await.map_err(|e| format!("RabbitMQ: {e}"))?;
            if let Ok(declared) = channel
                .queue_declare(transport::name(&queue), passive, FieldTable::default())
                .await
            {
                if declared.consumer_count() > 0 {
                    consumers.push(format!("{queue} ({} consumers)", declared.consumer_count()));
                }
                let _ = channel.close(200, transport::name("probed")).await;
            }
        }
        let keys: usize = {
            let mut cursor: u64 = 0;
            let mut count = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(names.redis_pattern())
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut redis)
                    .await
                    .map_err(|e| format!("Redis: {e}"))?;
                count += batch.len();
                if next == 0 {
                    break count;
                }
                cursor = next;
            }
        };
        let what = format!(
            "namespace {ns}: queues {}, {}, {}, {}; exchanges {}, {}, {}; {keys} Redis keys ({})",
            names.tasks_queue(),
            names.scheduler_queue(),
            names.scheduler_events_queue(),
            names.dead_letter_queue(),
            names.events_exchange(),
            names.dead_letter_exchange(),
            names.control_exchange(),
            names.redis_pattern(),
        );
        let result = if !consumers.is_empty() && !line.has("force") {
            eprintln!(
                "flotilla-scheduler purge: refusing: the namespace is in use: {}.\nStop its scheduler and workers first (or pass --force).",
                consumers.join(", ")
            );
            Ok(ExitCode::FAILURE)
        } else if !line.has("yes") {
            println!("would delete {what}\nrerun with --yes to delete them");
            Ok(ExitCode::FAILURE)
        } else {
            let channel = connection.create_channel().await.map_err(|e| format!("RabbitMQ: {e}"))?;
            transport::purge_namespace(&channel, &mut redis, &names)
                .await
                .map_err(|e| e.to_string())?;
            let _ = channel.close(200, transport::name("purged")).await;
            println!("deleted {what}");
            Ok(ExitCode::SUCCESS)
        };
        transport::close(&connection, "purged").await;
        result
    })
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// Escapes everything but unreserved characters, for query strings.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn int(value: &Value) -> String {
    match value.as_u64() {
        Some(n) => {
            let digits = n.to_string();
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        None => "-".to_owned(),
    }
}

fn bytes(value: &Value) -> String {
    let Some(mut amount) = value.as_f64() else {
        return "-".to_owned();
    };
    let mut unit = 0;
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    while amount >= 1024.0 && unit < units.len() - 1 {
        amount /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{amount} B")
    } else {
        format!("{amount:.1} {}", units[unit])
    }
}

fn seconds(value: f64) -> String {
    if value < 60.0 {
        format!("{value:.1}s")
    } else if value < 3600.0 {
        format!("{}m{:02}s", (value / 60.0) as u64, (value % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (value / 3600.0) as u64,
            ((value % 3600.0) / 60.0) as u64
        )
    }
}

fn format_status(status: &Value) -> String {
    let counts = &status["counts"];
    let mut out = String::new();
    let mut line = |label: &str, text: String| out.push_str(&format!("{label:<12} {text}\n"));
    line(
        "namespace",
        format!(
            "{} (scheduler {}, up {})",
            status["namespace"].as_str().unwrap_or("?"),
            status["scheduler"].as_str().unwrap_or("?"),
            seconds(status["uptime_s"].as_f64().unwrap_or(0.0))
        ),
    );
    line(
        "tasks",
        format!(
            "{} waiting, {} ready, {} processing, {} parked ({} in memory)",
            int(&counts["waiting"]),
            int(&counts["ready"]),
            int(&counts["processing"]),
            int(&counts["parked"]),
            int(&status["tasks_in_memory"])
        ),
    );
    line(
        "since start",
        format!(
            "{} submitted, {} finished, {} erred, {} cancelled",
            int(&counts["submitted"]),
            int(&counts["finished"]),
            int(&counts["erred"]),
            int(&counts["cancelled"])
        ),
    );
    line(
        "workers",
        format!(
            "{} live, {} slots",
            int(&counts["workers"]),
            int(&counts["slots"])
        ),
    );
    let queues: Vec<String> = status["queues"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|q| {
            format!(
                "{} {} msgs/{} consumers",
                q["name"].as_str().unwrap_or("?"),
                int(&q["messages"]),
                int(&q["consumers"])
            )
        })
        .collect();
    line(
        "queues",
        if queues.is_empty() {
            "not read yet".to_owned()
        } else {
            queues.join("\n             ")
        },
    );
    let redis = &status["redis"];
    line(
        "redis",
        if redis.is_null() {
            "not read yet".to_owned()
        } else {
            format!(
                "{} used (peak {}, limit {})",
                bytes(&redis["used_memory"]),
                bytes(&redis["used_memory_peak"]),
                match redis["maxmemory"].as_u64() {
                    Some(0) | None => "none".to_owned(),
                    Some(_) => bytes(&redis["maxmemory"]),
                }
            )
        },
    );
    if let Some(error) = status["probe_error"].as_str() {
        line("probe error", error.to_owned());
    }
    if counts["erred"].as_u64().unwrap_or(0) > 0 {
        line(
            "erred",
            format!(
                "{} since start (list: flotilla-scheduler tasks --state erred)",
                int(&counts["erred"])
            ),
        );
    }
    out
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut write_row = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push('\n');
    };
    write_row(header.to_vec());
    for row in rows {
        write_row(row.iter().map(String::as_str).collect());
    }
    out
}

fn format_workers(status: &Value) -> String {
    let workers = status["workers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if workers.is_empty() {
        return "no live workers\n".to_owned();
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let running = match w["running"].as_array().and_then(|r| r.first()) {
                Some(first) => format!(
                    "{} ({} {})",
                    int(&w["running_count"]),
                    first["key"].as_str().unwrap_or("?"),
                    seconds(first["seconds"].as_f64().unwrap_or(0.0))
                ),
                None => "0".to_owned(),
            };
            let resources: Vec<String> = w["resources"]
                .as_object()
                .map(|r| r.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            vec![
                w["name"].as_str().unwrap_or("?").to_owned(),
                w["id"].as_str().unwrap_or("?").chars().take(8).collect(),
                int(&w["slots"]),
                running,
                w["rate"]
                    .as_f64()
                    .map_or("-".to_owned(), |r| format!("{r:.1}")),
                int(&w["finished"]),
                int(&w["erred"]),
                seconds(w["last_seen_ms"].as_f64().unwrap_or(0.0) / 1000.0),
                if resources.is_empty() {
                    "-".to_owned()
                } else {
                    resources.join(",")
                },
            ]
        })
        .collect();
    let mut out = table(
        &[
            "NAME",
            "ID",
            "SLOTS",
            "RUNNING (>50ms)",
            "TASKS/S",
            "FINISHED",
            "ERRED",
            "LAST SEEN",
            "RESOURCES",
        ],
        &rows,
    );
    if !status["monitor"]["active"].as_bool().unwrap_or(false) {
        out.push_str("(per-worker counts start once the scheduler taps worker events: run again in a few seconds)\n");
    }
    out
}

fn format_tasks(tasks: &Value) -> String {
    let tasks = tasks.as_array().map(Vec::as_slice).unwrap_or_default();
    if tasks.is_empty() {
        return "no tasks\n".to_owned();
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t["key"].as_str().unwrap_or("?").to_owned(),
                t["state"].as_str().unwrap_or("?").to_owned(),
                t["task"].as_str().unwrap_or("?").to_owned(),
                t["error"].as_str().unwrap_or("").replace('\n', " | "),
            ]
        })
        .collect();
    table(&["KEY", "STATE", "TASK", "ERROR"], &rows)
}
