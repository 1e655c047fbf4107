//! The admin HTTP endpoint, on loopback by default: `/healthz`, `/readyz`, `/secrets`,
//! `/proxies`, `/metrics`, and `POST /rotate`.
//!
//! It reads the secret manager's status and never returns key material.

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

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/secrets", get(secrets))
        .route("/proxies", get(proxies))
        .route("/metrics", get(metrics))
        .route("/rotate", post(rotate))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
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

async fn rotate(State(s): State<AdminState>) -> impl IntoResponse {
    s.manager.rotate_now();
    (StatusCode::ACCEPTED, "rotation requested\n")
}
