//! What the binaries share: their connection and logging flags (with
//! `clap`, each with its environment variable), logging, and shutdown
//! signals.

use clap::{Args, ValueEnum};
use flotilla_proto::Config;

/// The settings only the environment gives (no flag), for the binaries'
/// `--help` (`after_help`).
pub const ENVIRONMENT_HELP: &str = "\
Environment only (every process of a namespace):
  FLOTILLA_QUEUE_TYPE        classic or quorum: how the namespace's shared queues are declared (quorum on a RabbitMQ cluster) [default: classic]
  FLOTILLA_SECRET            sign and check every message and result with this shared secret [default: unset]
  FLOTILLA_MAX_PAYLOAD       largest payload inside a message (actor call arguments, primitive value, result), in bytes; task arguments and scattered values are not capped [default: 67108864]
  FLOTILLA_LONG_TASK_MS      a delivery held this long is acknowledged, its tasks kept in custody [default: 300000]
  FLOTILLA_ALLOWED_FAILURES  lost starts a task may have before it errs WorkerLost [default: 3]
  FLOTILLA_REPLAY_WINDOW_MS  how long a signed message is remembered against replays [default: 300000]
  FLOTILLA_CLIENT_LEASE_MS   how long a client's holds outlive its last sign of life [default: 30000]
  RUST_LOG                   log filter, e.g. RUST_LOG=flotilla=debug [default: info,lapin=warn]
  NO_COLOR                   no colours in the log (there are none unless stderr is a terminal)";

/// Flags every binary takes: where the cluster lives. Each falls back to
/// its environment variable, then to [`Config`]'s default.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectionArgs {
    /// RabbitMQ URL, credentials and TLS (amqps://) included, or the URLs of a cluster's nodes separated by commas (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
    #[arg(
        help = "RabbitMQ URL, credentials and TLS (amqps://) included; a cluster's nodes: several, separated by commas [default: amqp://guest:guest@127.0.0.1:5672/%2f]",
        long,
        value_name = "URL",
        env = "FLOTILLA_AMQP_URL",
        hide_env_values = true
    )]
    pub amqp_url: Option<String>,
    /// Redis URL: redis:// or rediss:// for one server, redis+cluster://h1:p1,h2:p2 for a Redis Cluster (default `redis://127.0.0.1:6379/0`).
    #[arg(
        help = "Redis URL: redis:// or rediss:// for one server, redis+cluster://h1:p1,h2:p2 for a Redis Cluster [default: redis://127.0.0.1:6379/0]",
        long,
        value_name = "URL",
        env = "FLOTILLA_REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Prefix of every queue and key, isolating one cluster from another (default `flotilla`).
    #[arg(
        help = "Prefix of every queue and key, isolating one cluster from another [default: flotilla]",
        long,
        value_name = "NAME",
        env = "FLOTILLA_NAMESPACE"
    )]
    pub namespace: Option<String>,
}

impl ConnectionArgs {
    /// The connection settings: flags over environment over defaults
    /// ([`Config::from_env`] for everything the flags do not give), checked
    /// with [`Config::validate`].
    pub fn config(&self) -> Result<Config, String> {
        let mut config = Config::from_env().map_err(|e| e.to_string())?;
        // An empty value counts as unset, as it does in `Config::from_env`.
        let given = |value: &Option<String>| value.clone().filter(|v| !v.trim().is_empty());
        if let Some(url) = given(&self.amqp_url) {
            config.amqp_url = url;
        }
        if let Some(url) = given(&self.redis_url) {
            config.redis_url = url;
        }
        if let Some(ns) = given(&self.namespace) {
            config.namespace = ns;
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// How log lines are written: `Text`, human-readable lines, or `Json`, one
/// JSON object per line (`timestamp`, `level`, `fields`, `target` and
/// `spans`, root first).
// The variants have no doc comments: clap would list them as the flag's
// long help, making every `--help` the long one.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// The format the environment asks for: `FLOTILLA_LOG_FORMAT` (`text` or
    /// `json`), else `json` when the older `FLOTILLA_LOG_JSON` is set (to
    /// anything but `0` or `false`), else text.
    pub fn from_env() -> LogFormat {
        if let Some(format) = std::env::var("FLOTILLA_LOG_FORMAT")
            .ok()
            .and_then(|v| LogFormat::from_str(v.trim(), true).ok())
        {
            return format;
        }
        let json = std::env::var("FLOTILLA_LOG_JSON").is_ok_and(|v| {
            let v = v.trim();
            !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")
        });
        if json {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
}

/// The logging flag of the binaries that log.
#[derive(Debug, Clone, Default, Args)]
pub struct LogArgs {
    /// Log lines as text or as one JSON object each (default `text`).
    #[arg(
        help = "Log lines as text or as one JSON object each [default: text]",
        long,
        value_name = "FORMAT",
        value_enum,
        env = "FLOTILLA_LOG_FORMAT"
    )]
    pub log_format: Option<LogFormat>,
}

impl LogArgs {
    /// Starts logging (see [`init_logging_as`]) in the format asked for,
    /// else the one of [`LogFormat::from_env`].
    pub fn init(&self) {
        init_logging_as(self.log_format.unwrap_or_else(LogFormat::from_env));
    }
}

/// Logs to stderr with `tracing` in the format of [`LogFormat::from_env`]
/// (see [`init_logging_as`]).
pub fn init_logging() {
    init_logging_as(LogFormat::from_env());
}

/// Logs to stderr with `tracing`, filtered by `RUST_LOG` (default `info`),
/// in `format`. Colours only when stderr is a terminal and `NO_COLOR` is
/// unset: a log redirected to a file or a pipe carries no ANSI escape
/// codes. Does nothing when a global subscriber is already set.
pub fn init_logging_as(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
    let _ = tracing::subscriber::set_global_default(subscriber(
        format,
        filter,
        std::io::stderr,
        colour_logs(),
    ));
}

/// The subscriber of [`init_logging_as`], writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().with_current_span(false).finish()),
    }
}

/// Whether log lines may carry colours: stderr is a terminal and
/// `NO_COLOR` (<https://no-color.org>) is unset or empty.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Warns loudly when a URL points away from this machine with the broker's
/// default credentials.
pub fn warn_default_credentials(url: &str) {
    let remote = !["@127.", "@localhost", "@[::1]", "//127.", "//localhost"]
        .iter()
        .any(|p| url.contains(p));
    if remote && url.contains("guest:guest@") {
        tracing::warn!(url, "connecting to a non-loopback broker with the default guest credentials: set real credentials");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Parser)]
    #[command(name = "p", version)]
    struct Cli {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn flags_parse_in_both_forms() {
        let cli = Cli::try_parse_from(["p", "--namespace", "ns", "--redis-url=redis://x"]).unwrap();
        assert_eq!(cli.connection.namespace.as_deref(), Some("ns"));
        assert_eq!(cli.connection.redis_url.as_deref(), Some("redis://x"));
        assert_eq!(cli.connection.config().unwrap().namespace, "ns");
        let cli = Cli::try_parse_from(["p", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log.log_format, Some(LogFormat::Json));
    }

    #[test]
    fn help_version_and_mistakes_are_reported() {
        let help = Cli::try_parse_from(["p", "--help"]).unwrap_err();
        assert_eq!(help.exit_code(), 0);
        let text = help.to_string();
        for needle in [
            "--amqp-url <URL>",
            "FLOTILLA_NAMESPACE",
            "FLOTILLA_LOG_FORMAT",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        assert_eq!(
            Cli::try_parse_from(["p", "--version"])
                .unwrap_err()
                .exit_code(),
            0
        );
        for wrong in [
            &["p", "--nope", "1"][..],
            &["p", "--namespace"],
            &["p", "stray"],
            &["p", "--log-format", "xml"],
        ] {
            assert_eq!(
                Cli::try_parse_from(wrong).unwrap_err().exit_code(),
                2,
                "{wrong:?}"
            );
        }
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_logs_are_one_object_per_line_with_their_spans() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(
            LogFormat::Json,
            tracing_subscriber::EnvFilter::new("info"),
            move || writer.clone(),
            false,
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("scheduler", namespace = %"ns-1");
            let _entered = span.enter();
            tracing::warn!(worker = "w\"1", slots = 4, ok = true, "said \"hi\"\n");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["level"], "WARN", "{text}");
        assert!(line["timestamp"].is_string(), "{text}");
        assert_eq!(line["fields"]["message"], "said \"hi\"\n", "{text}");
        assert_eq!(line["fields"]["worker"], "w\"1", "{text}");
        assert_eq!(line["fields"]["slots"], 4, "{text}");
        assert_eq!(line["fields"]["ok"], true, "{text}");
        assert_eq!(line["spans"][0]["name"], "scheduler", "{text}");
        assert_eq!(line["spans"][0]["namespace"], "ns-1", "{text}");
    }
}
