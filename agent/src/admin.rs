//! The admin HTTP endpoint, on loopback by default: `/healthz`, `/readyz`, `/secrets`,
//! `/proxies`, `/trust`, `/metrics`, `POST /rotate` and `POST /ca/rotate`; and the optional status endpoint, which serves
//! only `/healthz`, `/readyz` and `/metrics` so that it can listen where kubelet and
//! Prometheus reach it without letting them force rotations or list the proxies.
//!
//! Neither reads anything but the secret manager's status; neither returns key material.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sds::SdsService;
use crate::secrets::SecretManager;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The secret manager.
    pub manager: Arc<SecretManager>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The SDS service, for its connected proxies.
    pub sds: SdsService,
}

/// The admin routes: the status routes, plus `/secrets`, `/proxies` and `POST /rotate`.
pub fn router(state: AdminState) -> Router {
    status_routes()
        .route("/secrets", get(secrets))
        .route("/proxies", get(proxies))
        .route("/trust", get(trust))
        .route("/rotate", post(rotate))
        .route("/ca/rotate", post(ca_rotate))
        .with_state(state)
}

/// The status routes alone: `/healthz`, `/readyz` and `/metrics`.
pub fn status_router(state: AdminState) -> Router {
    status_routes().with_state(state)
}

fn status_routes() -> Router<AdminState> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Serves `routes` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    routes: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.manager.is_ready() {
        (StatusCode::OK, Json(serde_json::json!({ "ready": true })))
    } else {
        let h = s.manager.health();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "health": h })),
        )
    }
}

async fn secrets(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.manager.status())
}

async fn proxies(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.sds.proxies())
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    s.manager.refresh_expiry_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn trust(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.manager.trust_status())
}

/// Begins a staged root rotation (`sds-agent ca rotate`): 202 with the new root's serial, or
/// 409 with why not (a CA that announces its own roots, a rotation already running).
async fn ca_rotate(State(s): State<AdminState>) -> impl IntoResponse {
    match s.manager.begin_root_rotation() {
        Ok(serial) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "new_root": serial })),
        ),
        Err(reason) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({ "error": reason })),
        ),
    }
}

async fn rotate(State(s): State<AdminState>) -> impl IntoResponse {
    s.manager.rotate_now();
    (StatusCode::ACCEPTED, "rotation requested\n")
}
