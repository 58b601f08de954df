//! The JSON API: `/api/status`, `/api/workers`, `/api/tasks` and
//! `/api/errors` read; the
//! operator commands `/api/cancel` and `/api/retry` write, and need the
//! bearer token (`auth`).
//!
//! Each route takes its arguments from the query string, checks them
//! (a `400` with `{"error": ...}` names what is wrong), then reads the
//! endpoint's state or sends the scheduler a message.

use super::metrics::{error_json, task_json, HISTORY};
use super::{error, json_response, Shared};
use crate::server::TaskQuery;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use flotilla_proto::ToScheduler;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::info;

/// How long a task listing may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The query string's pairs, in order (a name may repeat).
type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The first value of `name`; `Err` with a `400` for a broken query string.
fn param<'a>(params: &'a Params, name: &str) -> Result<Option<&'a str>, Response> {
    match params {
        Ok(Query(pairs)) => Ok(pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())),
        Err(_) => Err(error(StatusCode::BAD_REQUEST, "bad query")),
    }
}

/// `GET /api/status[?history=N]`: counts, workers, queues, Redis memory,
/// erred tasks; the last `N` one-second samples.
pub(super) async fn status(State(shared): State<Arc<Shared>>, params: Params) -> Response {
    shared.watch();
    let history = match param(&params, "history").map(|h| h.map(str::parse::<usize>)) {
        Err(refused) => return refused,
        Ok(None) => 0,
        Ok(Some(Ok(n))) => n.min(HISTORY),
        Ok(Some(Err(_))) => {
            return error(StatusCode::BAD_REQUEST, "history must be a whole number")
        }
    };
    let snapshot = shared.snapshot();
    let status = shared
        .monitor()
        .status_json(&snapshot, history, Instant::now());
    json_response(StatusCode::OK, &status)
}

/// `GET /api/workers`: the workers.
pub(super) async fn workers(State(shared): State<Arc<Shared>>) -> Response {
    shared.watch();
    let snapshot = shared.snapshot();
    let now = Instant::now();
    let workers: Vec<Value> = {
        let monitor = shared.monitor();
        snapshot
            .workers
            .iter()
            .map(|w| monitor.worker_json(w, now, false))
            .collect()
    };
    json_response(StatusCode::OK, &Value::Array(workers))
}

/// `GET /api/errors`: the last task errors the scheduler saw, newest
/// first (see [`crate::failures`]).
pub(super) async fn errors(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.snapshot();
    let errors: Vec<Value> = snapshot
        .recent_errors
        .iter()
        .rev()
        .map(|record| error_json(record))
        .collect();
    json_response(StatusCode::OK, &Value::Array(errors))
}

/// `GET /api/tasks[?state=S][&limit=N]`: tasks in the scheduler's table,
/// asked of the scheduler itself.
pub(super) async fn tasks(State(shared): State<Arc<Shared>>, params: Params) -> Response {
    let state = match param(&params, "state") {
        Err(refused) => return refused,
        Ok(None | Some("") | Some("all")) => None,
        Ok(Some("error" | "erred")) => Some("erred".to_owned()),
        Ok(Some(state @ ("waiting" | "ready" | "processing" | "finished"))) => {
            Some(state.to_owned())
        }
        Ok(Some(other)) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "unknown state {other:?}: use waiting, ready, processing, finished or erred"
                ),
            )
        }
    };
    let limit = match param(&params, "limit").map(|l| l.map(str::parse::<usize>)) {
        Err(refused) => return refused,
        Ok(None) => 100,
        Ok(Some(Ok(limit))) => limit.min(100_000),
        Ok(Some(Err(_))) => return error(StatusCode::BAD_REQUEST, "limit must be a whole number"),
    };
    let (reply, answer) = oneshot::channel();
    let query = TaskQuery {
        state,
        limit,
        reply,
    };
    if shared.queries.send(query).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler is not running",
        );
    }
    match tokio::time::timeout(QUERY_TIMEOUT, answer).await {
        Ok(Ok(tasks)) => json_response(
            StatusCode::OK,
            &Value::Array(tasks.iter().map(task_json).collect()),
        ),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler did not answer in time",
        ),
    }
}

/// `POST /api/cancel?key=K[&key=K2..]`: cancels tasks (and their
/// dependents), running ones included.
pub(super) async fn cancel(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    params: Params,
    _body: Bytes,
) -> Response {
    command(&shared, &headers, &params, Verb::Cancel)
}

/// `POST /api/retry?key=K[&key=K2..]`: runs erred tasks again.
pub(super) async fn retry(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    params: Params,
    _body: Bytes,
) -> Response {
    command(&shared, &headers, &params, Verb::Retry)
}

/// An operator command.
#[derive(Debug, Clone, Copy)]
enum Verb {
    Cancel,
    Retry,
}

fn command(shared: &Shared, headers: &HeaderMap, params: &Params, verb: Verb) -> Response {
    // A page on another site must not be able to cancel tasks through the
    // operator's browser.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if host != Some(authority) {
            return error(StatusCode::FORBIDDEN, "cross-origin request refused");
        }
    }
    if let Err(refused) = super::auth::check_token(&shared.access, headers) {
        return refused;
    }
    let Ok(Query(pairs)) = params else {
        return error(StatusCode::BAD_REQUEST, "bad query");
    };
    let keys: Vec<String> = pairs
        .iter()
        .filter(|(name, key)| name == "key" && !key.is_empty())
        .map(|(_, key)| key.clone())
        .collect();
    if keys.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "name the tasks: ?key=K (repeatable)",
        );
    }
    let (message, verb) = match verb {
        Verb::Cancel => (
            ToScheduler::Cancel {
                keys: keys.clone(),
                force: true,
            },
            "cancel",
        ),
        Verb::Retry => (ToScheduler::Retry { keys: keys.clone() }, "retry"),
    };
    if shared.control.send(message).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler is not running",
        );
    }
    info!(?keys, verb, "operator command");
    json_response(
        StatusCode::ACCEPTED,
        &json!({ "requested": verb, "keys": keys }),
    )
}
