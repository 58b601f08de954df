//! Who may use the endpoint: the bearer token of the write routes and the
//! `Host` allow-list of every route.
//!
//! - `POST /api/cancel` and `/api/retry` need `Authorization: Bearer
//!   <token>`, compared in constant time; anything else is `401`.
//! - Every request must name, in its `Host` header, one of the allowed
//!   hosts: the bound address, `localhost`, `127.0.0.1` and `[::1]` on the
//!   bound port, plus [`Access::allow_hosts`]. Anything else is `421`. A
//!   page on another site that rebinds its DNS name to this machine sends
//!   its own name as `Host`, so it can neither read nor write.
//!
//! [`token_file`] is where `flotilla-scheduler` keeps the token it
//! generates (and where its `cancel` and `retry` commands look for it);
//! [`load_or_create_token`] reads or writes that file.

use super::{error, Shared};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Shortest token accepted from a file or a flag (a generated one has 64
/// characters).
pub const MIN_TOKEN_LEN: usize = 16;

/// The endpoint's access rules: the write token and the extra allowed
/// hosts. Its `Debug` output leaves the token out.
#[derive(Clone)]
pub struct Access {
    token: String,
    hosts: Vec<String>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("token", &"<hidden>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl Access {
    /// Rules with this write token (leading and trailing blanks removed).
    pub fn new(token: &str) -> Access {
        Access {
            token: token.trim().to_owned(),
            hosts: Vec::new(),
        }
    }

    /// Rules with a fresh random token (see [`random_token`]).
    pub fn random() -> Access {
        Access::new(&random_token())
    }

    /// Also allows these `Host` names: `name` (on the bound port),
    /// `name:port`, `[v6]`, `[v6]:port`, or `*` for any host (which turns
    /// the check off). Empty entries are skipped; case does not matter.
    pub fn allow_hosts<I, S>(mut self, hosts: I) -> Access
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.hosts.extend(
            hosts
                .into_iter()
                .map(|h| h.as_ref().trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty()),
        );
        self
    }

    /// The write token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether `given` is the token, in time that does not depend on where
    /// they differ.
    pub fn token_matches(&self, given: &str) -> bool {
        !self.token.is_empty() && bool::from(self.token.as_bytes().ct_eq(given.as_bytes()))
    }

    /// Whether a request with `Host: host` may be served by a server bound
    /// to `bound`.
    pub fn host_allowed(&self, bound: SocketAddr, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let port = bound.port();
        let (name, given_port) = split_host(&host);
        // No port in the header means the scheme's default, 80.
        let given_port = match given_port {
            Some(p) => match p.parse::<u16>() {
                Ok(p) => p,
                Err(_) => return false,
            },
            None => 80,
        };
        let bound_name = match bound {
            SocketAddr::V4(v4) => v4.ip().to_string(),
            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
        };
        let defaults = ["localhost", "127.0.0.1", "[::1]", bound_name.as_str()];
        if given_port == port && defaults.contains(&name) {
            return true;
        }
        self.hosts.iter().any(|allowed| {
            if allowed == "*" {
                return true;
            }
            let (allowed_name, allowed_port) = split_host(allowed);
            let allowed_port = allowed_port.and_then(|p| p.parse::<u16>().ok());
            allowed_name == name && allowed_port.unwrap_or(port) == given_port
        })
    }
}

/// Splits `name:port`, `[v6]:port`, `name` or `[v6]` into name and port.
fn split_host(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        match host.find(']') {
            Some(end) => {
                let port = host[end + 1..].strip_prefix(':');
                (&host[..=end], port)
            }
            None => (host, None),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    }
}

/// A fresh random token: 64 hex digits (244 random bits, from the
/// operating system's generator).
pub fn random_token() -> String {
    format!("{}{}", flotilla_proto::new_id(), flotilla_proto::new_id())
}

/// Where `flotilla-scheduler` keeps the token of `namespace` unless told
/// otherwise: `$XDG_RUNTIME_DIR/flotilla-<namespace>.http-token`, or the
/// same name in the system's temporary directory.
pub fn token_file(namespace: &str) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("flotilla-{namespace}.http-token"))
}

/// Reads a token file: a regular file (not a link), readable by its owner
/// only, holding one token of at least [`MIN_TOKEN_LEN`] characters.
pub fn read_token(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_file() {
        return Err(Error::new(ErrorKind::InvalidData, "not a regular file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "others may read it (it must be mode 0600)",
            ));
        }
    }
    let token = std::fs::read_to_string(path)?.trim().to_owned();
    if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace()) {
        return Err(Error::new(ErrorKind::InvalidData, "holds no token"));
    }
    Ok(token)
}

/// The token in `path` if it holds a usable one ([`read_token`]); else a
/// fresh [`random_token`] written there with mode 0600 (to a new file,
/// then renamed into place). Schedulers of one namespace on one machine so
/// share their token. The flag is `true` when this call wrote the file.
pub fn load_or_create_token(path: &Path) -> std::io::Result<(String, bool)> {
    if let Ok(token) = read_token(path) {
        return Ok((token, false));
    }
    let token = random_token();
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}", flotilla_proto::new_id()));
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&temporary).and_then(|mut file| {
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()
    });
    let renamed = written.and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = renamed {
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    Ok((token, true))
}

/// Middleware of every route: refuses a request whose `Host` is not allowed.
pub(super) async fn check_host(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    match host {
        Some(host) if shared.access.host_allowed(shared.bound, host) => next.run(request).await,
        _ => error(
            StatusCode::MISDIRECTED_REQUEST,
            "this Host is not served here; add it with --http-allowed-hosts",
        ),
    }
}

/// `Err(401)` unless the request carries `Authorization: Bearer <token>`.
pub(super) fn check_token(access: &Access, headers: &HeaderMap) -> Result<(), Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            let (scheme, token) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match given {
        Some(token) if access.token_matches(token) => Ok(()),
        _ => {
            let mut refused = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send Authorization: Bearer <token> \
                 (flotilla-scheduler logs the file that holds it; set it with --http-token)",
            );
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"flotilla\""),
            );
            Err(refused)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_exactly() {
        let access = Access::new(" 0123456789abcdef0123 ");
        assert!(access.token_matches("0123456789abcdef0123"));
        assert!(!access.token_matches("0123456789abcdef012"));
        assert!(!access.token_matches("0123456789abcdef01234"));
        assert!(!access.token_matches(""));
        assert!(
            !Access::new("").token_matches(""),
            "an empty token opens nothing"
        );
        let random = Access::random();
        assert_eq!(random.token().len(), 64);
        assert_ne!(random.token(), Access::random().token());
        assert!(!format!("{random:?}").contains(random.token()));

        let mut headers = HeaderMap::new();
        assert_eq!(
            check_token(&access, &headers).unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
        for (value, ok) in [
            ("Bearer 0123456789abcdef0123", true),
            ("bearer  0123456789abcdef0123 ", true),
            ("Bearer wrong", false),
            ("Basic 0123456789abcdef0123", false),
            ("0123456789abcdef0123", false),
        ] {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(check_token(&access, &headers).is_ok(), ok, "{value}");
        }
    }

    #[test]
    fn hosts_are_checked() {
        let loopback: SocketAddr = "127.0.0.1:8787".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8787".parse().unwrap();
        let v6: SocketAddr = "[::1]:9000".parse().unwrap();
        let access = Access::random();
        for (bound, host, ok) in [
            (loopback, "127.0.0.1:8787", true),
            (loopback, "localhost:8787", true),
            (loopback, "LOCALHOST:8787", true),
            (loopback, "[::1]:8787", true),
            (loopback, "localhost:8788", false),
            (loopback, "localhost", false),
            (loopback, "evil.example:8787", false),
            (loopback, "localhost.evil.example:8787", false),
            (loopback, "127.0.0.1:x", false),
            (loopback, "", false),
            (any, "0.0.0.0:8787", true),
            (any, "scheduler:8787", false),
            (v6, "[::1]:9000", true),
            (v6, "[::1]", false),
        ] {
            assert_eq!(access.host_allowed(bound, host), ok, "{bound} {host}");
        }
        let extended =
            Access::random().allow_hosts(["Scheduler", " ", "localhost:8788", "[fe80::1]"]);
        assert!(extended.host_allowed(any, "scheduler:8787"));
        assert!(!extended.host_allowed(any, "scheduler:8788"));
        assert!(extended.host_allowed(any, "localhost:8788"));
        assert!(extended.host_allowed(any, "[fe80::1]:8787"));
        assert!(!extended.host_allowed(any, "evil:8787"));
        assert!(Access::random()
            .allow_hosts(["*"])
            .host_allowed(any, "evil:1"));
    }

    #[test]
    fn token_files_are_private_and_reused() {
        let dir =
            std::env::temp_dir().join(format!("flotilla-token-test-{}", flotilla_proto::new_id()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("flotilla-ns.http-token");
        let (first, created) = load_or_create_token(&path).unwrap();
        assert!(created);
        assert_eq!(first.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert_eq!(
                load_or_create_token(&path).unwrap(),
                (first.clone(), false),
                "reused"
            );
            assert_eq!(read_token(&path).unwrap(), first);
            // A file others may read is not trusted: replaced.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(read_token(&path).is_err());
            let (second, created) = load_or_create_token(&path).unwrap();
            assert!(created);
            assert_ne!(second, first);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "short\n").unwrap();
        assert!(read_token(&path).is_err());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary files left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(token_file("ns").ends_with("flotilla-ns.http-token"));
    }
}
