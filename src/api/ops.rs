//! Probes and metrics.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use super::AppState;

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "ops", security(()), responses((status = 200, description = "alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the backend can answer (cache synced, data dir loaded).
#[utoipa::path(get, path = "/readyz", tag = "ops", security(()), responses(
    (status = 200, description = "ready", body = String),
    (status = 503, description = "not ready yet", body = String)
))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.backend.ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "ops", security(()), responses(
    (status = 200, description = "metrics (OpenMetrics text)", body = String, content_type = "application/openmetrics-text")
))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
}
