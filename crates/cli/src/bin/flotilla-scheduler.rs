//! `flotilla-scheduler`: tracks submitted tasks and their dependencies and
//! hands ready tasks to the workers; serves a dashboard, Prometheus metrics
//! and a status API over HTTP. Its subcommands (`status`, `workers`,
//! `tasks`, `cancel`, `retry`) ask a running scheduler through that API;
//! `purge` deletes a namespace.

use clap::{Args, Parser, Subcommand};
use flotilla_runtime::cli::{self, ConnectionArgs, LogArgs};
use flotilla_scheduler::{http, Hooks};
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing::Instrument;

/// The scheduler's command line: the scheduler's own flags, or a command.
#[derive(Debug, Parser)]
#[command(
    name = "flotilla-scheduler",
    version,
    about = "Flotilla's scheduler: tracks tasks and their dependencies and hands ready tasks to workers",
    after_help = cli::ENVIRONMENT_HELP,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    /// HOST:PORT of the dashboard, /metrics and the status API; `off` for none [default: 127.0.0.1:8787]
    #[arg(long, value_name = "ADDR", env = "FLOTILLA_HTTP_ADDR")]
    http_addr: Option<String>,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Who may use the scheduler's HTTP endpoint.
#[derive(Debug, Args)]
struct AccessArgs {
    /// Token the write API (POST /api/cancel, /api/retry) requires as `Authorization: Bearer` (prefer the variable: flags show in `ps`) [default: the one in --http-token-file, else a new random one written there]
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FLOTILLA_HTTP_TOKEN",
        hide_env_values = true
    )]
    http_token: Option<String>,
    /// File holding the write token, mode 0600 [default: $XDG_RUNTIME_DIR or the temporary directory, flotilla-<namespace>.http-token]
    #[arg(long, value_name = "PATH", env = "FLOTILLA_HTTP_TOKEN_FILE")]
    http_token_file: Option<PathBuf>,
    /// More Host names the endpoint answers (comma-separated NAME or NAME:PORT; `*` for any) besides its bound address, localhost, 127.0.0.1 and [::1]
    #[arg(
        long,
        value_name = "HOST,...",
        env = "FLOTILLA_HTTP_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    http_allowed_hosts: Vec<String>,
}

/// The write commands' credentials: the token, or the file of the namespace
/// that holds it.
#[derive(Debug, Args)]
struct TokenArgs {
    /// The scheduler's write token [default: read from --http-token-file]
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FLOTILLA_HTTP_TOKEN",
        hide_env_values = true
    )]
    http_token: Option<String>,
    /// File holding the scheduler's write token [default: $XDG_RUNTIME_DIR or the temporary directory, flotilla-<namespace>.http-token]
    #[arg(long, value_name = "PATH", env = "FLOTILLA_HTTP_TOKEN_FILE")]
    http_token_file: Option<PathBuf>,
    /// The scheduler's namespace, which names its token file [default: flotilla]
    #[arg(long, value_name = "NAME", env = "FLOTILLA_NAMESPACE")]
    namespace: Option<String>,
}

impl TokenArgs {
    /// The token: the flag (or variable), else the token file's.
    fn token(&self) -> Result<String, String> {
        if let Some(token) = given(&self.http_token) {
            return Ok(token.trim().to_owned());
        }
        let path = token_path(&self.http_token_file, &self.namespace);
        http::read_token(&path).map_err(|e| {
            format!(
                "no write token: cannot read {} ({e}); give the scheduler's with --http-token or FLOTILLA_HTTP_TOKEN \
                 (or --namespace/--http-token-file when it runs with other ones)",
                path.display()
            )
        })
    }
}

/// An empty value counts as unset (a compose file's `${VAR:-}`).
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.trim().is_empty())
}

/// `--http-token-file`, else the namespace's default token file.
fn token_path(file: &Option<PathBuf>, namespace: &Option<String>) -> PathBuf {
    match file.as_ref().filter(|f| !f.as_os_str().is_empty()) {
        Some(file) => file.clone(),
        None => http::token_file(given(namespace).unwrap_or("flotilla").trim()),
    }
}

/// The commands: all but `purge` ask the scheduler serving at --http-addr.
#[derive(Debug, Subcommand)]
enum Command {
    /// A running scheduler's tasks by state, workers, queues and Redis memory
    Status {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// A running scheduler's live workers: slots, running tasks, throughput, last seen
    Workers {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Tasks in a running scheduler's table
    Tasks {
        #[command(flatten)]
        api: ApiArgs,
        /// Only tasks in this state: waiting, ready, processing, finished or erred
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
        /// At most N tasks, 1 to 100000 [default: 100]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: Option<u32>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Cancels tasks and their dependents (running ones are stopped on their workers)
    Cancel {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        token: TokenArgs,
        /// The tasks' keys
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Runs erred tasks (and their erred inputs) again
    Retry {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        token: TokenArgs,
        /// The tasks' keys
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Deletes a namespace: its shared queues, exchanges and every Redis key (results, references, datasets, primitives)
    ///
    /// Refuses while a scheduler or workers consume the namespace's queues, unless --force.
    #[command(after_help = cli::ENVIRONMENT_HELP)]
    Purge {
        #[command(flatten)]
        connection: ConnectionArgs,
        /// Really delete (without it, only say what would go)
        #[arg(long)]
        yes: bool,
        /// Even while processes consume the namespace's queues
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        log: LogArgs,
    },
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Status { .. } => "status",
            Command::Workers { .. } => "workers",
            Command::Tasks { .. } => "tasks",
            Command::Cancel { .. } => "cancel",
            Command::Retry { .. } => "retry",
            Command::Purge { .. } => "purge",
        }
    }
}

/// `--http-addr` of the commands: where to find the scheduler.
#[derive(Debug, Args)]
struct ApiArgs {
    /// HOST:PORT where the scheduler serves HTTP [default: 127.0.0.1:8787]
    #[arg(long, value_name = "ADDR", env = "FLOTILLA_HTTP_ADDR")]
    http_addr: Option<String>,
}

impl ApiArgs {
    fn api(&self) -> Result<Api, String> {
        Api::new(self.http_addr.as_deref().unwrap_or(http::DEFAULT_ADDR))
    }
}

/// `--json` of the commands that print tables.
#[derive(Debug, Args)]
struct JsonArg {
    /// Print the API's JSON instead of a table
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(command) => {
            let name = command.name();
            match command_main(command) {
                Ok(code) => code,
                Err(message) => {
                    eprintln!("flotilla-scheduler {name}: {message}");
                    ExitCode::FAILURE
                }
            }
        }
        None => scheduler_main(cli.connection, cli.http_addr, cli.access, cli.log),
    }
}

/// Runs the scheduler (and its HTTP endpoint) until SIGTERM or Ctrl-C.
fn scheduler_main(
    connection: ConnectionArgs,
    http_addr: Option<String>,
    access: AccessArgs,
    log: LogArgs,
) -> ExitCode {
    log.init();
    let config = match connection.config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flotilla-scheduler: {error}");
            return ExitCode::from(2);
        }
    };
    cli::warn_default_credentials(&config.amqp_url);
    // An address the operator chose must work; the default may be taken
    // (another scheduler on this machine), which costs only the dashboard.
    let (http_addr, explicit) = match http_addr {
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
            // The token file this process wrote, removed when it ends.
            let mut token_file = OwnTokenFile(None);
            if let Some(addr) = &http_addr {
                let Some((access, created)) = access_rules(&access, &config.namespace) else {
                    return ExitCode::from(2);
                };
                token_file.0 = created.map(|path| (path, access.token().to_owned()));
                match http::bind_with(addr, &config, access).await {
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

/// A token file this process wrote, with its token: removed on drop unless
/// it holds another token by then.
struct OwnTokenFile(Option<(PathBuf, String)>);

impl Drop for OwnTokenFile {
    fn drop(&mut self) {
        if let Some((path, token)) = &self.0 {
            if http::read_token(path).is_ok_and(|t| t == *token) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The endpoint's access rules: the token given, else the token file's (a
/// new one written there when it holds none, returned too); `None` after
/// logging why there is none.
fn access_rules(args: &AccessArgs, namespace: &str) -> Option<(http::Access, Option<PathBuf>)> {
    let mut created = None;
    let token = match given(&args.http_token) {
        Some(token) if token.trim().len() < http::MIN_TOKEN_LEN => {
            tracing::error!(
                "--http-token must have at least {} characters",
                http::MIN_TOKEN_LEN
            );
            return None;
        }
        Some(token) => token.to_owned(),
        None => {
            let path = token_path(&args.http_token_file, &Some(namespace.to_owned()));
            match http::load_or_create_token(&path) {
                Ok((token, new)) => {
                    if new {
                        created = Some(path.clone());
                    }
                    // The path only: the token itself never goes to the log.
                    tracing::info!(
                        token_file = %path.display(),
                        "the write API (cancel, retry) needs the token in this file"
                    );
                    token
                }
                Err(error) => {
                    tracing::error!(
                        %error,
                        token_file = %path.display(),
                        "cannot keep the HTTP write token there; choose another file with --http-token-file or give one with FLOTILLA_HTTP_TOKEN"
                    );
                    return None;
                }
            }
        }
    };
    Some((
        http::Access::new(&token).allow_hosts(&args.http_allowed_hosts),
        created,
    ))
}

fn command_main(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Status { api, json } => {
            let status = api.api()?.get("/api/status")?;
            if json.json {
                println!("{}", pretty(&status));
            } else {
                print!("{}", format_status(&status));
            }
        }
        Command::Workers { api, json } => {
            let status = api.api()?.get("/api/status")?;
            if json.json {
                println!("{}", pretty(&status["workers"]));
            } else {
                print!("{}", format_workers(&status));
            }
        }
        Command::Tasks {
            api,
            state,
            limit,
            json,
        } => {
            let api = api.api()?;
            let mut path = "/api/tasks?".to_owned();
            if let Some(state) = state {
                path.push_str(&format!("state={}&", percent_encode(&state)));
            }
            if let Some(limit) = limit {
                path.push_str(&format!("limit={limit}"));
            }
            let tasks = api.get(&path)?;
            if json.json {
                println!("{}", pretty(&tasks));
            } else {
                print!("{}", format_tasks(&tasks));
            }
        }
        Command::Cancel { api, token, keys } => change("cancel", &api, &token, &keys)?,
        Command::Retry { api, token, keys } => change("retry", &api, &token, &keys)?,
        Command::Purge {
            connection,
            yes,
            force,
            log,
        } => {
            log.init();
            return purge(&connection, yes, force);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cancel` or `retry` of `keys`.
fn change(command: &str, api: &ApiArgs, token: &TokenArgs, keys: &[String]) -> Result<(), String> {
    let mut api = api.api()?;
    if keys.is_empty() {
        return Err("name at least one task key".to_owned());
    }
    api.token = Some(token.token()?);
    let query: Vec<String> = keys
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
        keys.len(),
        keys.join(" ")
    );
    println!(
        "(keys the scheduler does not know are ignored; check with `flotilla-scheduler tasks`)"
    );
    Ok(())
}

/// A running scheduler's HTTP API, over plain blocking sockets.
struct Api {
    addr: String,
    /// Sent as `Authorization: Bearer` with `POST`s.
    token: Option<String>,
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
            token: None,
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
            let mut post = agent.post(&url).header("Accept", "application/json");
            if let Some(token) = &self.token {
                post = post.header("Authorization", format!("Bearer {token}"));
            }
            post.send_empty()
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
fn purge(connection: &ConnectionArgs, yes: bool, force: bool) -> Result<ExitCode, String> {
    use flotilla_runtime::transport;
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;

    let config = connection.config()?;
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
            let mut count = 0;
            let mut pages = redis.scan(names.redis_pattern());
            while let Some(page) = pages.next_page().await.map_err(|e| format!("Redis: {e}"))? {
                count += page.len();
            }
            count
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
        let result = if !consumers.is_empty() && !force {
            eprintln!(
                "flotilla-scheduler purge: refusing: the namespace is in use: {}.\nStop its scheduler and workers first (or pass --force).",
                consumers.join(", ")
            );
            Ok(ExitCode::FAILURE)
        } else if !yes {
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
    line("role", role(status));
    line("broker", broker(&status["broker"]));
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

/// Whether RabbitMQ blocks publishers: `ok`, or `BLOCKED` with the
/// reason, for how long, and whether the worker timeout is held.
fn broker(broker: &Value) -> String {
    if broker["blocked"].as_bool() == Some(true) {
        format!(
            "BLOCKED for {} ({}): a resource alarm; submissions, results and heartbeats wait, workers are not timed out",
            seconds(broker["blocked_s"].as_f64().unwrap_or(0.0)),
            broker["reason"].as_str().unwrap_or("no reason given"),
        )
    } else if broker.is_null() {
        "unknown".to_owned()
    } else {
        let mut text = "ok".to_owned();
        if let Some(last) = broker["last_block_s"].as_f64() {
            text.push_str(&format!(
                " (blocked {} time(s) since start, the last for {})",
                int(&broker["blocks"]),
                seconds(last)
            ));
        }
        if broker["worker_timeout_held"].as_bool() == Some(true) {
            text.push_str("; worker timeout held a little longer");
        }
        text
    }
}

/// The scheduler's role: `active`, `starting`, or `standby` with the leader.
fn role(status: &Value) -> String {
    let role = status["role"].as_str().unwrap_or("?");
    match status["leader"].as_str() {
        Some(leader) if role == "standby" => {
            format!("standby (the active scheduler is {leader}; this one takes over if it goes)")
        }
        _ if role == "standby" => "standby (waiting for the leader lease)".to_owned(),
        _ => role.to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_listed_and_checked() {
        Cli::command().debug_assert();
        let help = Cli::try_parse_from(["flotilla-scheduler", "--help"])
            .unwrap_err()
            .to_string();
        for needle in [
            "--http-token <TOKEN>",
            "FLOTILLA_HTTP_TOKEN",
            "--http-token-file <PATH>",
            "--http-allowed-hosts <HOST,...>",
            "FLOTILLA_HTTP_ALLOWED_HOSTS",
        ] {
            assert!(help.contains(needle), "{needle} in {help}");
        }
        let cli = Cli::try_parse_from([
            "flotilla-scheduler",
            "--http-allowed-hosts",
            "scheduler,localhost:8788",
        ])
        .unwrap();
        assert_eq!(
            cli.access.http_allowed_hosts,
            ["scheduler", "localhost:8788"]
        );
        for wrong in [
            &["flotilla-scheduler", "tasks", "--limit", "0"][..],
            &[
                "flotilla-scheduler",
                "tasks",
                "--limit",
                "2305843009213693952",
            ],
            &["flotilla-scheduler", "tasks", "--limit", "-1"],
        ] {
            let error = Cli::try_parse_from(wrong).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{wrong:?}");
        }
        let cancel =
            Cli::try_parse_from(["flotilla-scheduler", "cancel", "--http-token", "t0k", "a"])
                .unwrap();
        let Some(Command::Cancel { token, keys, .. }) = cancel.command else {
            panic!("cancel");
        };
        assert_eq!(token.token().unwrap(), "t0k");
        assert_eq!(keys, ["a"]);
    }

    #[test]
    fn the_token_file_is_the_namespaces() {
        let path = token_path(&None, &Some("ns-1".to_owned()));
        assert_eq!(path, http::token_file("ns-1"));
        assert_eq!(token_path(&None, &None), http::token_file("flotilla"));
        let chosen = PathBuf::from("/some/where");
        assert_eq!(token_path(&Some(chosen.clone()), &None), chosen);
        let missing = TokenArgs {
            http_token: Some(" ".to_owned()),
            http_token_file: Some(PathBuf::from("/nonexistent/flotilla-token")),
            namespace: None,
        };
        assert!(missing.token().unwrap_err().contains("--http-token"));
    }

    #[test]
    fn the_status_names_the_role() {
        let standby = serde_json::json!({"role": "standby", "leader": "abc123"});
        assert!(format_status(&standby).contains("standby (the active scheduler is abc123"));
        let active = serde_json::json!({"role": "active", "leader": null});
        assert!(format_status(&active).contains("role         active"));
    }

    #[test]
    fn the_status_says_when_the_broker_blocks() {
        let blocked = serde_json::json!({"broker": {
            "blocked": true, "reason": "low on memory", "blocked_s": 12.5, "blocks": 1,
            "last_block_s": null, "worker_timeout_held": true,
        }});
        let text = format_status(&blocked);
        assert!(
            text.contains("broker       BLOCKED for 12.5s (low on memory)"),
            "{text}"
        );
        let after = serde_json::json!({"broker": {
            "blocked": false, "reason": null, "blocked_s": 0.0, "blocks": 2,
            "last_block_s": 31.0, "worker_timeout_held": false,
        }});
        let text = format_status(&after);
        assert!(
            text.contains("broker       ok (blocked 2 time(s) since start, the last for 31.0s)"),
            "{text}"
        );
        assert!(format_status(&serde_json::json!({})).contains("broker       unknown"));
    }
}
