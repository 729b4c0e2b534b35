//! The original runner's endpoints, kept compatible: same paths, `task_id`, `{id, status, date}`
//! with Celery's status words, `{"detail": ...}` errors and the same texts.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{OptionalJson, QueryParams};
use super::{ApiError, AppState, ErrorBody};
use crate::backend::{BackendError, RunInfo};
use crate::crd::{Progress, Reason, RunPhase};
use crate::metrics::StartOutcome;

/// A run in the original's shape, plus where it is.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeedTask {
    pub id: String,
    /// PENDING, STARTED, SUCCESS, FAILURE or REVOKED.
    #[schema(example = "SUCCESS")]
    pub status: &'static str,
    /// When the run finished (RFC 3339), null until then.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub date: Option<jiff::Timestamp>,
    pub phase: RunPhase,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub progress: Option<Progress>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<jiff::Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<jiff::Timestamp>,
}

impl From<RunInfo> for SeedTask {
    fn from(run: RunInfo) -> Self {
        Self {
            id: run.id,
            status: run.phase.seed_status(),
            date: run.finished_at,
            phase: run.phase,
            reason: run.reason,
            message: run.message,
            progress: run.progress,
            started_at: run.started_at,
            finished_at: run.finished_at,
        }
    }
}

/// Optional body of `/start`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// Injected papermill-style after the cell tagged `parameters`.
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    /// The run; default the current or last one.
    pub task_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OutputQuery {
    /// The run; default the current or last one.
    pub task_id: Option<String>,
    /// Answer the executed notebook (ipynb JSON) instead of a summary.
    #[serde(default)]
    pub full: bool,
    /// Stream the live log until the run ends.
    #[serde(default)]
    pub follow: bool,
}

/// The run named by `task_id`, or the current or last one.
async fn task(state: &AppState, task_id: Option<&str>) -> Result<RunInfo, ApiError> {
    match task_id {
        Some(id) => state.backend.get(id).await.map_err(seed_error),
        None => state.backend.latest().await?.ok_or_else(|| ApiError::bad_request("The task never ran.")),
    }
}

/// As the original answered: an unknown task is a 400 `Could not find task <id>` on the seed
/// endpoints (the resource API answers 404).
fn seed_error(e: BackendError) -> ApiError {
    match e {
        BackendError::NotFound(_) => ApiError::bad_request(e.to_string()),
        e => e.into(),
    }
}

/// Starts a run and counts the outcome (`/start` and `POST /runs`).
pub(super) async fn start_run(
    state: &AppState,
    parameters: Option<Map<String, Value>>,
) -> Result<RunInfo, BackendError> {
    let result = state.backend.start(parameters).await;
    state.metrics.api_start(match &result {
        Ok(_) => StartOutcome::Admitted,
        Err(BackendError::AlreadyRunning(_)) => StartOutcome::Refused,
        Err(_) => StartOutcome::Failed,
    });
    result
}

/// Trigger the execution of the notebook. Fails if an execution is already in progress.
#[utoipa::path(
    method(get, post),
    path = "/start",
    tag = "seed",
    request_body(content = Option<StartBody>, description = "optional parameters", content_type = "application/json"),
    responses(
        (status = 200, description = "the run was admitted", body = SeedTask),
        (status = 400, description = "`Another task is already running: <id>`", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 422, description = "invalid body", body = ErrorBody),
        (status = 503, description = "no controller answered", body = ErrorBody)
    )
)]
pub async fn start(
    State(state): State<AppState>,
    body: OptionalJson<StartBody>,
) -> Result<Json<SeedTask>, ApiError> {
    let parameters = body.0.unwrap_or_default().parameters;
    let run = start_run(&state, parameters).await?;
    Ok(Json(run.into()))
}

/// Get the status of the current task. Use the task_id parameter to query a specific task.
#[utoipa::path(
    get,
    path = "/progress",
    tag = "seed",
    params(TaskQuery),
    responses(
        (status = 200, description = "the run", body = SeedTask),
        (status = 400, description = "unknown task_id (`Could not find task <id>`), or no run ever ran", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 422, description = "invalid query", body = ErrorBody)
    )
)]
pub async fn progress(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<TaskQuery>,
) -> Result<Json<SeedTask>, ApiError> {
    Ok(Json(task(&state, q.task_id.as_deref()).await?.into()))
}

/// The outcome of a finished run: the traceback of a failure, a line for a success, or with
/// `full=true` the executed notebook; `follow=true` streams the live log instead.
#[utoipa::path(
    get,
    path = "/output",
    tag = "seed",
    params(OutputQuery),
    responses(
        (status = 200, description = "the output (text), the executed notebook with `full=true`, or the live log with `follow=true`", content(
            (String = "text/plain"),
            (Object = "application/x-ipynb+json")
        )),
        (status = 400, description = "unknown task_id (`Could not find task <id>`), the run has not finished, or no run ever ran", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no executed notebook, or no log to follow", body = ErrorBody),
        (status = 422, description = "invalid query", body = ErrorBody)
    )
)]
pub async fn output(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<OutputQuery>,
) -> Result<Response, ApiError> {
    let run = task(&state, q.task_id.as_deref()).await?;
    if q.follow {
        let stream = state.backend.logs(&run.id, true).await?;
        return Ok(text_stream(Body::from_stream(stream)));
    }
    if !run.phase.is_terminal() {
        return Err(ApiError::bad_request(format!(
            "Only tasks success/failure has output. Task {} is in state {}.",
            run.id,
            run.phase.seed_status()
        )));
    }
    if q.full {
        let missing = format!("Task {} has no executed notebook ({}).", run.id, run.phase.as_str());
        return super::results::notebook_response(&state, &run.id, missing).await;
    }
    Ok(text(output_text(&run)))
}

/// The text `/output` answers for a finished run.
pub fn output_text(run: &RunInfo) -> String {
    match run.phase {
        RunPhase::Succeeded => format!("✅ Task {} finished with success.\n", run.id),
        RunPhase::Cancelled => {
            format!("⛔ Task {} was revoked: {}\n", run.id, run.message.as_deref().unwrap_or("cancelled"))
        }
        _ => {
            let detail = run
                .error
                .as_ref()
                .and_then(|e| e.traceback.clone())
                .filter(|t| !t.trim().is_empty())
                .unwrap_or_else(|| {
                    let reason = run.reason.map(Reason::as_str).unwrap_or("Failed");
                    format!("{reason}: {}", run.message.as_deref().unwrap_or("the run failed"))
                });
            let detail = crate::progress::strip_ansi(&detail);
            format!("❗❗Task {} finished with failure ❗❗\n\n{}\n", run.id, detail.trim_end())
        }
    }
}

/// Kill the current task (or the one named by task_id). A finished run is left as it is.
#[utoipa::path(
    method(get, post),
    path = "/kill",
    tag = "seed",
    params(TaskQuery),
    responses(
        (status = 200, description = "the run, once the cancel is recorded", body = SeedTask),
        (status = 400, description = "unknown task_id (`Could not find task <id>`), or no run ever ran", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 422, description = "invalid query", body = ErrorBody)
    )
)]
pub async fn kill(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<TaskQuery>,
) -> Result<Json<SeedTask>, ApiError> {
    let run = task(&state, q.task_id.as_deref()).await?;
    Ok(Json(state.backend.cancel(&run.id).await.map_err(seed_error)?.into()))
}

/// Liveness, as the original answered it.
#[utoipa::path(get, path = "/ping", tag = "seed", security(()), responses(
    (status = 200, description = "alive", body = String, content_type = "application/json", example = json!("I am alive"))
))]
pub async fn ping() -> Json<&'static str> {
    Json("I am alive")
}

pub fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

pub fn text_stream(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], body)
        .into_response()
}
