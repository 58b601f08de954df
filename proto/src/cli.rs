//! What the binaries share: flag parsing, logging, and shutdown signals.
//!
//! The flags are few, so they are parsed by hand rather than pulling in an
//! argument-parsing framework.

use crate::Config;
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
    text.push_str(&format!("  {:<26} print this help\n\nLogging: RUST_LOG (e.g. RUST_LOG=flotilla=debug); FLOTILLA_LOG_JSON is not yet supported.\n", "-h, --help"));
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

/// Logs to stderr with `tracing`, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
