//! The scheduler's HTTP endpoint: Prometheus metrics, a JSON status API,
//! operator commands and a live dashboard page.
//!
//! [`bind`] opens the listener and hands back the [`Hooks`] to pass to
//! [`run_with_hooks`](crate::run_with_hooks); [`HttpServer::serve`] answers
//! requests until its task is aborted (or its future dropped).
//!
//! ```no_run
//! # async fn demo(config: flotilla_proto::Config) -> Result<(), Box<dyn std::error::Error>> {
//! let (server, hooks) = flotilla_scheduler::http::bind("127.0.0.1:8787", &config).await?;
//! println!("dashboard on http://{}/", server.local_addr());
//! let http = tokio::spawn(server.serve());
//! flotilla_scheduler::run_with_hooks(config, std::future::pending(), hooks).await?;
//! http.abort();
//! # Ok(()) }
//! ```
//!
//! | route | what |
//! | ----- | ---- |
//! | `GET /` | the live dashboard (one self-contained page, polls `/api/status`) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /health` | liveness: `200` whenever the server answers |
//! | `GET /ready` | readiness: `200` while connected to RabbitMQ and Redis (active or standby), `503` otherwise |
//! | `GET /api/status[?history=N]` | counts, workers, queues, Redis memory, erred tasks, whether the broker blocks publishers (`broker_blocked`); the last `N` one-second samples |
//! | `GET /api/workers` | the workers, with the memory and CPU time of their last heartbeat |
//! | `GET /api/tasks[?state=S][&limit=N]` | tasks in the scheduler's table (`S`: `waiting`, `ready`, `processing`, `finished`, `erred`) |
//! | `GET /api/errors` | the last 100 task errors the scheduler saw, newest first, with their tracebacks (cut to 4 KiB), kept after their futures drop |
//! | `POST /api/cancel?key=K[&key=K2..]` | cancels tasks (and their dependents), running ones included |
//! | `POST /api/retry?key=K[&key=K2..]` | runs erred tasks again |
//!
//! The two `POST` routes need `Authorization: Bearer <token>` (`401`
//! without it), and every route answers only requests whose `Host` is
//! allowed (`421` otherwise; see [`Access`]). [`bind`] makes up a random
//! token; [`bind_with`] takes the token and the extra allowed hosts.
//!
//! What the endpoint knows comes from four places:
//!
//! - the scheduler's [`Snapshot`], once a second: task counts, workers,
//!   erred tasks;
//! - the scheduler's broker watch ([`crate::broker`]), as it changes:
//!   whether RabbitMQ blocks publishers (`broker_blocked`), which stays
//!   current even while the scheduler's loop waits on a blocked publish;
//! - probes every two seconds, over the endpoint's own connections: queue
//!   depths (passive declares) and Redis `INFO memory`;
//! - while someone watches (a request for `/`, `/api/status`,
//!   `/api/workers` or `/metrics` in the last five minutes), a tap on the
//!   worker events: a private queue `<ns>.monitor.<id>` bound to
//!   `<ns>.events` the way the scheduler's own queue is. It gives each
//!   worker's throughput, the tasks it has been running for more than 50 ms,
//!   and the task run-time histogram. With nobody watching there is no tap,
//!   so an unwatched scheduler does not pay for a second copy of the events.
//!
//! # Layout
//!
//! - this module: the router, [`bind`] and [`HttpServer::serve`]: hyper's
//!   HTTP/1.1 server (one request per connection, `Connection: close`),
//!   request heads up to 16 KiB that must arrive within ten seconds, at most
//!   512 connections and 64 requests in flight (more get `503`), ten seconds
//!   to answer (then `408`);
//! - `auth`: the write token and the `Host` allow-list ([`Access`]), and
//!   the token file of `flotilla-scheduler` ([`token_file`]);
//! - `api`: the JSON routes (`/api/status`, `/api/workers`, `/api/tasks`,
//!   `/api/errors`)
//!   and the operator commands (`/api/cancel`, `/api/retry`);
//! - `metrics`: what the endpoint has seen (history, worker activity, the
//!   run-time histogram), as JSON and as Prometheus text (`/metrics`);
//! - `probes`: the loops that read snapshots, queue depths and Redis memory;
//! - `tap`: the worker-event tap that runs while someone watches;
//! - `dashboard`: the page at `/` (`dashboard.html`);
//! - `health`: `/health` and `/ready`, for process supervisors (Kubernetes'
//!   probes), and why a standby is ready.

mod api;
mod auth;
mod dashboard;
mod health;
mod metrics;
mod probes;
mod tap;

pub use auth::{load_or_create_token, random_token, read_token, token_file, Access, MIN_TOKEN_LEN};

use crate::server::{Hooks, Snapshot, TaskQuery};
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use flotilla_proto::{Config, Names, ToScheduler};
use flotilla_runtime::supervise::AbortOnDropHandle;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::Monitor;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tower::util::BoxCloneService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::{debug, warn};

/// Where `flotilla-scheduler` serves HTTP unless told otherwise (loopback
/// only; the port is Dask's dashboard port).
pub const DEFAULT_ADDR: &str = "127.0.0.1:8787";

/// Largest request head (request line and headers) accepted; hyper answers
/// `431` to a larger one.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body read (and ignored): the API takes its arguments
/// from the query string.
const MAX_BODY: usize = 64 * 1024;
/// Time a client has to send its request head; a connection that is still
/// silent (or half-way) then is closed, so idle connections cannot starve
/// others.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request may take to be answered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection may stay open at all (a client that never reads its
/// answer included).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;
/// Requests answered at once; more are refused with `503`.
const MAX_IN_FLIGHT: usize = 64;
/// How long after the last watching request the event tap stays on.
const WATCH_WINDOW: Duration = Duration::from_secs(300);

/// An HTTP endpoint bound to its address, ready to [`serve`](Self::serve).
pub struct HttpServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HttpServer {
    // Not derived: the shared state holds the broker URLs, credentials included.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.listener.local_addr().ok())
            .field("namespace", &self.shared.names.namespace())
            .finish_non_exhaustive()
    }
}

/// Binds `addr` for the scheduler of `config` and returns the server with
/// the [`Hooks`] to pass to [`run_with_hooks`](crate::run_with_hooks). The
/// write routes take a random token nobody is told ([`Access::random`]):
/// use [`bind_with`] to choose it.
pub async fn bind(addr: &str, config: &Config) -> std::io::Result<(HttpServer, Hooks)> {
    bind_with(addr, config, Access::random()).await
}

/// [`bind`] with these access rules: the write token and the extra allowed
/// `Host` names.
pub async fn bind_with(
    addr: &str,
    config: &Config,
    access: Access,
) -> std::io::Result<(HttpServer, Hooks)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (shared, hooks) = Shared::new(config, access, bound);
    Ok((
        HttpServer {
            listener,
            shared: Arc::new(shared),
        },
        hooks,
    ))
}

impl HttpServer {
    /// The address the server listens on (with the actual port when bound
    /// to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Answers requests, forever; abort the task (or drop the future) to
    /// stop. Also runs the probes and, while someone watches, the event tap.
    pub async fn serve(self) {
        let shared = self.shared;
        let _background = [
            tokio::spawn(probes::sample_loop(shared.clone())),
            tokio::spawn(probes::broker_loop(shared.clone())),
            tokio::spawn(probes::probe_loop(shared.clone())),
            tokio::spawn(tap::tap_loop(shared.clone())),
        ]
        .map(AbortOnDropHandle::new);
        let service = service(shared);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .keep_alive(false)
            .title_case_headers(true)
            .max_buf_size(MAX_HEAD);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let service = service.clone();
                    let answer = hyper::service::service_fn(move |request| {
                        answer(service.clone(), request, peer)
                    });
                    let connection = http.serve_connection(TokioIo::new(stream), answer);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
                        drop(permit);
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    warn!(%error, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The routes with their layers, as one service for every connection.
type Service = BoxCloneService<Request<hyper::body::Incoming>, Response, Infallible>;

/// The router behind the limits every request passes: at most
/// [`MAX_IN_FLIGHT`] at once (more get `503`), [`REQUEST_TIMEOUT`] to
/// answer (then `408`), and headers that keep browsers and caches out of
/// trouble.
fn service(shared: Arc<Shared>) -> Service {
    ServiceBuilder::new()
        .layer(SetResponseHeaderLayer::overriding(
            header::CONNECTION,
            HeaderValue::from_static("close"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(HandleErrorLayer::new(|_: BoxError| async {
            error(StatusCode::SERVICE_UNAVAILABLE, "too many requests at once")
        }))
        .load_shed()
        .concurrency_limit(MAX_IN_FLIGHT)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .service(router(shared))
        .boxed_clone()
}

/// Every route, with and without a trailing slash.
fn router(shared: Arc<Shared>) -> Router {
    let read = |route: MethodRouter<Arc<Shared>>| {
        route.fallback(|| async { method_not_allowed("GET, HEAD") })
    };
    let write =
        |route: MethodRouter<Arc<Shared>>| route.fallback(|| async { method_not_allowed("POST") });
    let routes = [
        ("/", read(get(dashboard::page))),
        ("/index.html", read(get(dashboard::page))),
        ("/metrics", read(get(metrics::prometheus))),
        ("/health", read(get(health::health))),
        ("/ready", read(get(health::ready))),
        ("/api/status", read(get(api::status))),
        ("/api/workers", read(get(api::workers))),
        ("/api/tasks", read(get(api::tasks))),
        ("/api/errors", read(get(api::errors))),
        ("/api/cancel", write(post(api::cancel))),
        ("/api/retry", write(post(api::retry))),
    ];
    let mut router = Router::new();
    for (path, route) in routes {
        if path != "/" {
            router = router.route(&format!("{path}/"), route.clone());
        }
        router = router.route(path, route);
    }
    router
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such page; try /, /metrics or /api/status",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            auth::check_host,
        ))
        .with_state(shared)
}

/// Answers one request on a connection.
async fn answer(
    service: Service,
    request: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Result<Response, Infallible> {
    // hyper takes any token as a method; the API knows only the standard ones.
    if !request
        .method()
        .as_str()
        .bytes()
        .all(|b| b.is_ascii_uppercase())
    {
        return Ok(error(StatusCode::BAD_REQUEST, "bad method"));
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = service.oneshot(request).await?;
    debug!(%peer, %method, path, status = response.status().as_u16(), "HTTP");
    Ok(response)
}

/// A JSON answer (with a final newline, for people reading it with curl).
pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

/// A JSON error: `{"error": message}`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({ "error": message }))
}

/// `405` naming the methods the route takes.
fn method_not_allowed(allow: &'static str) -> Response {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed; use {allow}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// State shared by the routes and the background loops.
struct Shared {
    names: Names,
    /// The write token and the allowed hosts.
    access: Access,
    /// The address the listener is bound to (the allowed hosts' port).
    bound: SocketAddr,
    amqp_url: String,
    /// How the namespace's shared queues are declared.
    queue_type: flotilla_proto::QueueType,
    redis_url: String,
    max_payload: usize,
    /// Checks the signatures of tapped events.
    codec: flotilla_proto::Codec,
    status: watch::Receiver<Arc<Snapshot>>,
    /// The scheduler's broker watch (see [`crate::broker`]).
    broker: watch::Receiver<crate::broker::BrokerStatus>,
    control: mpsc::UnboundedSender<ToScheduler>,
    queries: mpsc::UnboundedSender<TaskQuery>,
    monitor: Mutex<Monitor>,
    /// When the last watching request came.
    watched: Mutex<Option<Instant>>,
    wake_tap: Notify,
}

impl Shared {
    fn new(config: &Config, access: Access, bound: SocketAddr) -> (Shared, Hooks) {
        let names = config.names();
        let (status_tx, status) = watch::channel(Arc::new(Snapshot::empty(
            names.namespace(),
            crate::server::Role::Starting,
        )));
        let (control, control_rx) = mpsc::unbounded_channel();
        let (queries, queries_rx) = mpsc::unbounded_channel();
        let (broker_tx, broker) = watch::channel(Default::default());
        let shared = Shared {
            names,
            access,
            bound,
            amqp_url: config.amqp_url.clone(),
            queue_type: config.queue_type,
            redis_url: config.redis_url.clone(),
            max_payload: config.max_payload,
            codec: flotilla_proto::Codec::new(config),
            status,
            broker,
            control,
            queries,
            monitor: Mutex::new(Monitor::default()),
            watched: Mutex::new(None),
            wake_tap: Notify::new(),
        };
        let hooks = Hooks {
            status: Some(status_tx),
            control: Some(control_rx),
            queries: Some(queries_rx),
            broker: Some(broker_tx),
        };
        (shared, hooks)
    }

    fn monitor(&self) -> MutexGuard<'_, Monitor> {
        self.monitor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a request that looks at live data: the event tap starts (or
    /// stays on).
    fn watch(&self) {
        *self.watched.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if !self.monitor().tap.active {
            self.wake_tap.notify_one();
        }
    }

    fn is_watched(&self) -> bool {
        self.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < WATCH_WINDOW)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.status.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::TaskStatus;
    use axum::body::to_bytes;

    const TOKEN: &str = "test-token-0123456789";

    fn shared() -> (Arc<Shared>, Hooks) {
        let access = Access::new(TOKEN).allow_hosts(["x"]);
        let (shared, hooks) = Shared::new(&Config::default(), access, ([127, 0, 0, 1], 1).into());
        (Arc::new(shared), hooks)
    }

    async fn send(shared: &Arc<Shared>, request: axum::http::request::Builder) -> Response {
        router(shared.clone())
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    /// A request with `Host: x:1` and, for `POST`, the token.
    async fn call(shared: &Arc<Shared>, method: &str, uri: &str, origin: Option<&str>) -> Response {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "x:1");
        if let Some(origin) = origin {
            request = request.header(header::ORIGIN, origin);
        }
        if method == "POST" {
            request = request.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        }
        send(shared, request).await
    }

    #[tokio::test]
    async fn writes_need_the_token_and_every_route_an_allowed_host() {
        let (shared, mut hooks) = shared();
        let control = hooks.control.as_mut().unwrap();
        let post = |host: &str| {
            Request::builder()
                .method("POST")
                .uri("/api/cancel?key=a")
                .header(header::HOST, host)
        };
        let refused = send(&shared, post("x:1")).await;
        assert_eq!(refused.status(), 401);
        assert!(refused.headers().contains_key(header::WWW_AUTHENTICATE));
        let body = to_bytes(refused.into_body(), MAX_BODY).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("token"));
        let wrong = post("x:1").header(header::AUTHORIZATION, "Bearer test-token-012345678");
        assert_eq!(send(&shared, wrong).await.status(), 401);
        assert!(control.try_recv().is_err(), "refused commands go nowhere");

        let good = format!("Bearer {TOKEN}");
        let foreign = post("evil.example:1").header(header::AUTHORIZATION, &good);
        assert_eq!(send(&shared, foreign).await.status(), 421);
        let no_host = Request::builder().method("GET").uri("/api/status");
        assert_eq!(send(&shared, no_host).await.status(), 421);
        for path in ["/", "/api/status", "/metrics", "/nope"] {
            let read = Request::builder()
                .uri(path)
                .header(header::HOST, "attacker.example:1");
            assert_eq!(send(&shared, read).await.status(), 421, "{path}");
        }
        let local = Request::builder()
            .uri("/api/status")
            .header(header::HOST, "localhost:1");
        assert_eq!(send(&shared, local).await.status(), 200);
        assert!(control.try_recv().is_err());

        let accepted = post("127.0.0.1:1").header(header::AUTHORIZATION, &good);
        assert_eq!(send(&shared, accepted).await.status(), 202);
        assert!(control.try_recv().is_ok());
    }

    #[tokio::test]
    async fn health_answers_and_ready_follows_the_scheduler_snapshots() {
        use crate::server::Role;
        let (shared, hooks) = shared();
        let body = |r: Response| async move {
            serde_json::from_slice::<Value>(&to_bytes(r.into_body(), MAX_BODY).await.unwrap())
                .unwrap()
        };
        let health = call(&shared, "GET", "/health", None).await;
        assert_eq!(health.status(), 200);
        assert_eq!(body(health).await["status"], "ok");
        let starting = call(&shared, "GET", "/ready", None).await;
        assert_eq!(starting.status(), 503, "no snapshot yet: not connected");
        assert_eq!(body(starting).await["role"], "starting");

        // A standby's snapshot, as `stand_by` publishes it and the sample
        // loop records it: connected, so ready, and says which it is.
        let mut snapshot = Snapshot::empty("flotilla", Role::Standby);
        snapshot.leader = Some("abc|7".into());
        let snapshot = Arc::new(snapshot);
        hooks
            .status
            .as_ref()
            .unwrap()
            .send(snapshot.clone())
            .unwrap();
        shared.monitor().on_snapshot(&snapshot, Instant::now());
        let standby = call(&shared, "GET", "/ready/", None).await;
        assert_eq!(standby.status(), 200);
        let standby = body(standby).await;
        assert_eq!(standby["role"], "standby");
        assert_eq!(standby["leader"], "abc|7");

        // Silent for longer than FRESH: reconnecting, not ready; /health
        // still answers.
        shared.monitor().last_snapshot = Instant::now().checked_sub(health::FRESH * 2);
        assert_eq!(call(&shared, "GET", "/ready", None).await.status(), 503);
        assert_eq!(call(&shared, "GET", "/health", None).await.status(), 200);
        assert_eq!(call(&shared, "POST", "/ready", None).await.status(), 405);
        let foreign = Request::builder()
            .uri("/health")
            .header(header::HOST, "attacker.example:1");
        assert_eq!(send(&shared, foreign).await.status(), 421);
        assert!(
            !shared.is_watched(),
            "probes every few seconds must not keep the event tap on"
        );
    }

    #[tokio::test]
    async fn recent_errors_are_listed_newest_first_and_counted_in_the_status() {
        use flotilla_proto::{ErrorKind, TaskError};
        let (shared, hooks) = shared();
        let json = |r: Response| async move {
            assert_eq!(r.status(), 200);
            serde_json::from_slice::<Value>(&to_bytes(r.into_body(), MAX_BODY).await.unwrap())
                .unwrap()
        };
        assert_eq!(
            json(call(&shared, "GET", "/api/errors", None).await).await,
            json!([])
        );
        let mut snapshot = Snapshot::empty("flotilla", crate::server::Role::Active);
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let first = TaskError::new(ErrorKind::User, "String", "no such file");
        snapshot
            .recent_errors
            .record("load-1", "app::load", &first, true, at);
        let second = TaskError::new(ErrorKind::Panic, "panic", "boom").with_traceback("at app::f");
        snapshot
            .recent_errors
            .record("f-2", "app::f", &second, false, at);
        hooks
            .status
            .as_ref()
            .unwrap()
            .send(Arc::new(snapshot))
            .unwrap();
        let errors = json(call(&shared, "GET", "/api/errors/", None).await).await;
        assert_eq!(errors.as_array().unwrap().len(), 2);
        assert_eq!(
            errors[0],
            json!({
                "at_ms": 1_700_000_000_123u64, "key": "f-2", "task": "app::f", "kind": "Panic",
                "type": "panic", "message": "boom", "traceback": "at app::f",
                "truncated": false, "retrying": false,
            })
        );
        assert_eq!(errors[1]["key"], "load-1");
        assert_eq!(errors[1]["retrying"], true);
        let status = json(call(&shared, "GET", "/api/status", None).await).await;
        assert_eq!(status["errors_seen"], 2);
    }

    #[tokio::test]
    async fn routes_answer_and_commands_reach_the_scheduler() {
        let (shared, mut hooks) = shared();
        let status = |r: Response| r.status().as_u16();
        assert_eq!(status(call(&shared, "GET", "/nope", None).await), 404);
        let refused = call(&shared, "DELETE", "/", None).await;
        assert_eq!(refused.status(), 405);
        assert_eq!(refused.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(status(call(&shared, "GET", "/api/retry", None).await), 405);
        assert_eq!(status(call(&shared, "GET", "/", None).await), 200);
        assert_eq!(status(call(&shared, "GET", "/metrics/", None).await), 200);
        assert!(shared.is_watched(), "looking at the page starts the tap");

        let cancel = call(
            &shared,
            "POST",
            "/api/cancel?key=a&key=b",
            Some("http://x:1"),
        )
        .await;
        assert_eq!(cancel.status(), 202);
        let control = hooks.control.as_mut().unwrap();
        assert_eq!(
            control.try_recv().unwrap(),
            ToScheduler::Cancel {
                keys: vec!["a".into(), "b".into()],
                force: true
            }
        );
        let retry = call(&shared, "POST", "/api/retry?key=c", None).await;
        assert_eq!(retry.status(), 202);
        assert_eq!(
            control.try_recv().unwrap(),
            ToScheduler::Retry {
                keys: vec!["c".into()]
            }
        );
        let forged = call(&shared, "POST", "/api/cancel?key=a", Some("http://evil")).await;
        assert_eq!(forged.status(), 403);
        assert!(control.try_recv().is_err());

        let mut queries = hooks.queries.take().unwrap();
        let answer = tokio::spawn(async move {
            let query = queries.recv().await.unwrap();
            assert_eq!(query.state.as_deref(), Some("erred"));
            assert_eq!(query.limit, 7);
            let _ = query.reply.send(vec![TaskStatus {
                key: "k".into(),
                task: "t".into(),
                state: "erred",
                error: None,
            }]);
        });
        let tasks = call(&shared, "GET", "/api/tasks?state=error&limit=7", None).await;
        assert_eq!(tasks.status(), 200);
        let body: Value =
            serde_json::from_slice(&to_bytes(tasks.into_body(), MAX_BODY).await.unwrap()).unwrap();
        assert_eq!(body[0]["key"], "k");
        answer.await.unwrap();
        drop(hooks);
        let gone = call(&shared, "GET", "/api/tasks", None).await;
        assert_eq!(gone.status(), 503, "the scheduler stopped");
    }
}
