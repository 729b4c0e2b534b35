//! Runs as resources: create, list (newest first, paginated), get, logs, notebook, cancel, delete.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::{OptionalJson, QueryParams};
use super::seed::{StartBody, start_run, text_stream};
use super::{ApiError, AppState, ErrorBody};
use crate::backend::{BackendError, RunInfo, RunPage};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size (1 to 500, default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// The `continue` token of the previous page.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    pub continue_token: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Stream until the run ends.
    #[serde(default)]
    pub follow: bool,
}

/// Start a run (policy Forbid: 409 while another run holds the lock).
#[utoipa::path(
    post,
    path = "/runs",
    tag = "runs",
    request_body(content = Option<StartBody>, content_type = "application/json"),
    responses(
        (status = 201, description = "the run was admitted", body = RunInfo),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "another run holds the lock", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 422, description = "invalid body", body = ErrorBody),
        (status = 503, description = "no controller answered", body = ErrorBody)
    )
)]
pub async fn create_run(
    State(state): State<AppState>,
    body: OptionalJson<StartBody>,
) -> Result<Response, ApiError> {
    let parameters = body.0.unwrap_or_default().parameters;
    match start_run(&state, parameters).await {
        Ok(run) => Ok((StatusCode::CREATED, Json(run)).into_response()),
        Err(e @ BackendError::AlreadyRunning(_)) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// History, newest first.
#[utoipa::path(
    get,
    path = "/runs",
    tag = "runs",
    params(ListQuery),
    responses(
        (status = 200, description = "one page of runs", body = RunPage),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 422, description = "invalid query: `limit` outside 1 to 500, or an unknown `continue` token", body = ErrorBody)
    )
)]
pub async fn list_runs(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<RunPage>, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid query: limit must be 1 to 500"));
    }
    Ok(Json(state.backend.list(limit, q.continue_token.as_deref()).await?))
}

#[utoipa::path(
    get,
    path = "/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    responses(
        (status = 200, description = "the run", body = RunInfo),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown run", body = ErrorBody)
    )
)]
pub async fn get_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunInfo>, ApiError> {
    Ok(Json(state.backend.get(&id).await?))
}

/// What the notebook printed (cell stream output).
#[utoipa::path(
    get,
    path = "/runs/{id}/logs",
    tag = "runs",
    params(("id" = String, Path, description = "run id"), LogsQuery),
    responses(
        (status = 200, description = "the log", body = String, content_type = "text/plain"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown run", body = ErrorBody),
        (status = 422, description = "invalid query", body = ErrorBody)
    )
)]
pub async fn run_logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LogsQuery>,
) -> Result<Response, ApiError> {
    let stream = state.backend.logs(&id, q.follow).await?;
    Ok(text_stream(Body::from_stream(stream)))
}

// `/runs/{id}/notebook` is in results.rs (streamed from the results store).

/// Cancel a run; a finished run is left as it is.
#[utoipa::path(
    post,
    path = "/runs/{id}/cancel",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    responses(
        (status = 200, description = "the run, once the cancel is recorded", body = RunInfo),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown run", body = ErrorBody)
    )
)]
pub async fn cancel_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunInfo>, ApiError> {
    Ok(Json(state.backend.cancel(&id).await?))
}

/// Delete a finished run and what it kept.
#[utoipa::path(
    delete,
    path = "/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown run", body = ErrorBody),
        (status = 409, description = "the run is still active", body = ErrorBody)
    )
)]
pub async fn delete_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.backend.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
