//! `GET /`: the live dashboard, one self-contained page (`dashboard.html`)
//! that polls `/api/status` once a second. It loads nothing from elsewhere:
//! the machines it runs on may have no internet access.

use super::Shared;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use std::sync::Arc;

/// The page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// `GET /` (and `/index.html`): the page; looking at it starts the event tap.
pub(super) async fn page(State(shared): State<Arc<Shared>>) -> Response {
    shared.watch();
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        Html(DASHBOARD),
    )
        .into_response()
}
