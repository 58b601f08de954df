//! What the binaries share: flag parsing, logging, and shutdown signals.
//!
//! The flags are few, so they are parsed by hand rather than pulling in an
//! argument-parsing framework.

use flotilla_proto::Config;
use std::collections::HashMap;

/// One flag a binary accepts: `--name VALUE`.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// Name without the dashes.
    pub name: &'static str,
    /// Placeholder for the value in `--help`.
    pub value: &'static str,
    /// What it does, for `--help`.
    pub help: &'static str,
}

/// Flags every binary takes: where the cluster lives.
pub const CONNECTION_FLAGS: [Flag; 3] = [
    Flag {
        name: "amqp-url",
        value: "URL",
        help: "RabbitMQ URL, credentials and TLS (amqps://) included [env FLOTILLA_AMQP_URL; default amqp://guest:guest@127.0.0.1:5672/%2f]",
    },
    Flag {
        name: "redis-url",
        value: "URL",
        help: "Redis URL (redis:// or rediss://) [env FLOTILLA_REDIS_URL; default redis://127.0.0.1:6379/0]",
    },
    Flag {
        name: "namespace",
        value: "NAME",
        help: "prefix of every queue and key, isolating one cluster from another [env FLOTILLA_NAMESPACE; default flotilla]",
    },
];

/// Parsed command line: flag values by name.
#[derive(Debug, Default, Clone)]
pub struct Parsed {
    values: HashMap<&'static str, String>,
}

impl Parsed {
    /// The value of `--name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The connection settings: flags over environment over defaults.
    pub fn config(&self) -> Result<Config, String> {
        let mut config = Config::from_env().map_err(|e| e.to_string())?;
        if let Some(url) = self.get("amqp-url") {
            config.amqp_url = url.to_owned();
        }
        if let Some(url) = self.get("redis-url") {
            config.redis_url = url.to_owned();
        }
        if let Some(ns) = self.get("namespace") {
            config.namespace = ns.to_owned();
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// Parses `args` (without the program name) against `flags`; `Err` holds
/// the text to print: the help (for `--help`) or a usage error.
pub fn parse(
    program: &str,
    about: &str,
    flags: &[Flag],
    args: impl IntoIterator<Item = String>,
) -> Result<Parsed, (i32, String)> {
    let mut parsed = Parsed::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Err((0, help(program, about, flags)));
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err((
                2,
                format!(
                    "{program}: unexpected argument {arg:?}\n\n{}",
                    help(program, about, flags)
                ),
            ));
        };
        let (flag_name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        let Some(flag) = flags.iter().find(|f| f.name == flag_name) else {
            return Err((
                2,
                format!(
                    "{program}: unknown flag --{flag_name}\n\n{}",
                    help(program, about, flags)
                ),
            ));
        };
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => {
                return Err((
                    2,
                    format!("{program}: --{flag_name} needs a value ({})", flag.value),
                ))
            }
        };
        parsed.values.insert(flag.name, value);
    }
    Ok(parsed)
}

fn help(program: &str, about: &str, flags: &[Flag]) -> String {
    let mut text = format!("{program} — {about}\n\nUsage: {program} [OPTIONS]\n\nOptions:\n");
    for flag in flags {
        let left = format!("--{} <{}>", flag.name, flag.value);
        text.push_str(&format!("  {left:<26} {}\n", flag.help));
    }
    text.push_str(&format!("  {:<26} print this help\n\nLogging: RUST_LOG (e.g. RUST_LOG=flotilla=debug); FLOTILLA_LOG_JSON=1 for one JSON object per line.\n", "-h, --help"));
    text
}

/// Parses the process's arguments, printing help or a usage error and
/// exiting when asked or when they are wrong.
pub fn parse_or_exit(program: &str, about: &str, flags: &[Flag]) -> Parsed {
    match parse(program, about, flags, std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err((0, text)) => {
            print!("{text}");
            std::process::exit(0)
        }
        Err((code, text)) => {
            eprintln!("{text}");
            std::process::exit(code)
        }
    }
}

/// Logs to stderr with `tracing`, filtered by `RUST_LOG` (default `info`);
/// as one JSON object per line when `FLOTILLA_LOG_JSON` is set (to
/// anything but `0` or `false`). Colours only when stderr is a terminal
/// and `NO_COLOR` is unset: a log redirected to a file or a pipe carries
/// no ANSI escape codes.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
    let json = std::env::var("FLOTILLA_LOG_JSON").is_ok_and(|v| {
        let v = v.trim();
        !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs());
    let _ = if json {
        builder
            .fmt_fields(json_log::JsonFields)
            .event_format(json_log::JsonLines)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// Whether log lines may carry colours: stderr is a terminal and
/// `NO_COLOR` (<https://no-color.org>) is unset or empty.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// JSON log lines without a JSON library: `{"timestamp", "level", "target",
/// "fields": {..}, "spans": [{"name", ..fields}]}`, root span first.
mod json_log {
    use std::fmt::{self, Write as _};
    use tracing::field::{Field, Visit};
    use tracing::{Event, Subscriber};
    use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
    use tracing_subscriber::fmt::{FmtContext, FormattedFields};
    use tracing_subscriber::registry::LookupSpan;

    /// Formats events as JSON objects.
    pub(super) struct JsonLines;

    /// Formats span fields as JSON members (`"name":value,..`).
    pub(super) struct JsonFields;

    /// Collects fields as JSON members.
    #[derive(Default)]
    struct Members(String);

    impl Members {
        fn member(&mut self, name: &str, value: impl fmt::Display) {
            if !self.0.is_empty() {
                self.0.push(',');
            }
            let _ = write!(self.0, "{}:{value}", Quoted(name));
        }
    }

    impl Visit for Members {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.member(field.name(), Quoted(&format!("{value:?}")));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.member(field.name(), Quoted(value));
        }
        fn record_i64(&mut self, field: &Field, value: i64) {
            self.member(field.name(), value);
        }
        fn record_u64(&mut self, field: &Field, value: u64) {
            self.member(field.name(), value);
        }
        fn record_bool(&mut self, field: &Field, value: bool) {
            self.member(field.name(), value);
        }
        fn record_f64(&mut self, field: &Field, value: f64) {
            if value.is_finite() {
                self.member(field.name(), value);
            } else {
                self.member(field.name(), Quoted(&value.to_string()));
            }
        }
    }

    /// A JSON string literal.
    struct Quoted<'a>(&'a str);

    impl fmt::Display for Quoted<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_char('"')?;
            for c in self.0.chars() {
                match c {
                    '"' => f.write_str("\\\"")?,
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                    c => f.write_char(c)?,
                }
            }
            f.write_char('"')
        }
    }

    impl<'w> FormatFields<'w> for JsonFields {
        fn format_fields<R: tracing_subscriber::field::RecordFields>(
            &self,
            mut writer: Writer<'w>,
            fields: R,
        ) -> fmt::Result {
            let mut members = Members::default();
            fields.record(&mut members);
            writer.write_str(&members.0)
        }

        fn add_fields(
            &self,
            current: &'w mut FormattedFields<Self>,
            fields: &tracing::span::Record<'_>,
        ) -> fmt::Result {
            let mut members = Members::default();
            fields.record(&mut members);
            if !current.fields.is_empty() && !members.0.is_empty() {
                current.fields.push(',');
            }
            current.fields.push_str(&members.0);
            Ok(())
        }
    }

    impl<S, N> FormatEvent<S, N> for JsonLines
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            let mut time = String::new();
            SystemTime.format_time(&mut Writer::new(&mut time))?;
            let meta = event.metadata();
            let mut fields = Members::default();
            event.record(&mut fields);
            write!(
                writer,
                "{{\"timestamp\":{},\"level\":\"{}\",\"target\":{},\"fields\":{{{}}}",
                Quoted(&time),
                meta.level(),
                Quoted(meta.target()),
                fields.0
            )?;
            if let Some(scope) = ctx.event_scope() {
                writer.write_str(",\"spans\":[")?;
                for (i, span) in scope.from_root().enumerate() {
                    if i > 0 {
                        writer.write_char(',')?;
                    }
                    write!(writer, "{{\"name\":{}", Quoted(span.name()))?;
                    let extensions = span.extensions();
                    if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                        if !fields.fields.is_empty() {
                            write!(writer, ",{}", fields.fields)?;
                        }
                    }
                    writer.write_char('}')?;
                }
                writer.write_char(']')?;
            }
            writeln!(writer, "}}")
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::sync::{Arc, Mutex};

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
        fn events_become_json_lines_with_their_spans() {
            let buffer = Buffer::default();
            let writer = buffer.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .fmt_fields(JsonFields)
                .event_format(JsonLines)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                let span = tracing::info_span!("scheduler", namespace = %"ns-1");
                let _entered = span.enter();
                let task = tracing::info_span!("task", key = "add-1", attempt = 2u64);
                task.record("attempt", 3u64);
                let _task = task.enter();
                tracing::warn!(worker = "w\"1", slots = 4, ok = true, "said \"hi\"\n");
            });
            let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(
                text.starts_with("{\"timestamp\":\"") && text.ends_with("}\n"),
                "{text}"
            );
            for part in [
                "\"level\":\"WARN\"",
                "\"fields\":{\"message\":\"said \\\"hi\\\"\\n\",\"worker\":\"w\\\"1\",\"slots\":4,\"ok\":true}",
                "\"spans\":[{\"name\":\"scheduler\",\"namespace\":\"ns-1\"},{\"name\":\"task\",\"key\":\"add-1\",\"attempt\":2,\"attempt\":3}]",
            ] {
                assert!(text.contains(part), "{part} in {text}");
            }
        }
    }
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

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_parse_in_both_forms() {
        let parsed = parse(
            "p",
            "about",
            &CONNECTION_FLAGS,
            args(&["--namespace", "ns", "--redis-url=redis://x"]),
        )
        .unwrap();
        assert_eq!(parsed.get("namespace"), Some("ns"));
        assert_eq!(parsed.get("redis-url"), Some("redis://x"));
        assert_eq!(parsed.config().unwrap().namespace, "ns");
    }

    #[test]
    fn help_and_mistakes_are_reported() {
        let (code, text) = parse("p", "about", &CONNECTION_FLAGS, args(&["--help"])).unwrap_err();
        assert_eq!(code, 0);
        assert!(text.contains("--amqp-url <URL>") && text.contains("FLOTILLA_NAMESPACE"));
        assert_eq!(
            parse("p", "a", &CONNECTION_FLAGS, args(&["--nope", "1"]))
                .unwrap_err()
                .0,
            2
        );
        assert_eq!(
            parse("p", "a", &CONNECTION_FLAGS, args(&["--namespace"]))
                .unwrap_err()
                .0,
            2
        );
        assert_eq!(
            parse("p", "a", &CONNECTION_FLAGS, args(&["stray"]))
                .unwrap_err()
                .0,
            2
        );
    }
}
