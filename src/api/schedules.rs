//! Schedules (kubernetes backend only): list, get, run now, suspend, resume. The local backend
//! has no schedules and answers 501.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::json;

use super::{ApiError, AppState, ErrorBody};
use crate::backend::RunInfo;
use crate::backend::kubernetes::run_info;
use crate::schedule::{self, LastRun, NotebookSchedule, cron};

/// Where the facade finds schedules: the kubernetes backend's client and namespace.
#[derive(Clone)]
pub struct Schedules {
    client: Client,
    namespace: String,
}

impl Schedules {
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self { client, namespace: namespace.into() }
    }

    fn api(&self) -> Api<NotebookSchedule> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// A schedule as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleInfo {
    pub name: String,
    /// The cron expression.
    pub schedule: String,
    /// IANA time zone (UTC when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    pub suspend: bool,
    /// The lock its runs take.
    pub lock: String,
    /// False when the schedule cannot tick (`message` says why).
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Timestamp>,
    /// Names of its runs that have not finished.
    pub active: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
}

fn info(s: &NotebookSchedule) -> ScheduleInfo {
    let status = s.status.clone().unwrap_or_default();
    let ready = status.conditions.iter().find(|c| c.type_ == schedule::CONDITION_READY);
    ScheduleInfo {
        name: s.name_any(),
        schedule: s.spec.schedule.clone(),
        time_zone: s.spec.time_zone.clone(),
        suspend: s.spec.suspend,
        lock: s.spec.run_template.lock(&s.name_any()),
        // Not yet seen by the controller: nothing says it cannot tick.
        ready: ready.is_none_or(|c| c.status == "True"),
        message: ready.map(|c| c.message.clone()),
        last_schedule_time: status.last_schedule_time.map(|t| t.0),
        next_schedule_time: status.next_schedule_time.map(|t| t.0),
        last_successful_time: status.last_successful_time.map(|t| t.0),
        active: status.active.into_iter().filter_map(|r| r.name).collect(),
        last_run: status.last_run,
    }
}

/// A name that no Kubernetes object can have (a DNS-1123 subdomain) is not looked up: not found.
fn check_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.split('.').all(|part| !part.is_empty() && !part.starts_with('-') && !part.ends_with('-'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, format!("Schedule {name} not found.")))
    }
}

fn schedules(state: &AppState) -> Result<&Schedules, ApiError> {
    state.schedules.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "schedules need the kubernetes backend (`notebook-operator api`); the local backend has none",
        )
    })
}

/// The API server's answer for a person: a refusal of the request itself (a validation
/// message) is passed on; anything else says what failed, the detail goes to the log only (never
/// the facade's identity or the API server's raw error).
fn kube_error(name: &str, e: kube::Error) -> ApiError {
    match e {
        kube::Error::Api(ae) if ae.code == 404 => {
            ApiError::new(StatusCode::NOT_FOUND, format!("Schedule {name} not found."))
        }
        kube::Error::Api(ae) if matches!(ae.code, 400 | 409 | 422) => {
            ApiError::new(StatusCode::from_u16(ae.code).unwrap_or(StatusCode::CONFLICT), ae.message)
        }
        kube::Error::Api(ae) if ae.code == 503 || ae.code == 504 => {
            tracing::error!(error = %ae.message, code = ae.code, "schedules: Kubernetes API");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the Kubernetes API is unavailable")
        }
        kube::Error::Api(ae) => {
            tracing::error!(error = %ae.message, code = ae.code, "schedules: Kubernetes API refused");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the Kubernetes API refused the request (see the facade's log)",
            )
        }
        e => {
            tracing::error!(error = %e, "schedules: Kubernetes API");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the Kubernetes API is unavailable")
        }
    }
}

/// The namespace's schedules, by name.
#[utoipa::path(
    get,
    path = "/schedules",
    tag = "schedules",
    responses(
        (status = 200, description = "the schedules", body = Vec<ScheduleInfo>),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 501, description = "the local backend has no schedules", body = ErrorBody),
        (status = 503, description = "the Kubernetes API cannot be reached", body = ErrorBody)
    )
)]
pub async fn list_schedules(State(state): State<AppState>) -> Result<Json<Vec<ScheduleInfo>>, ApiError> {
    let s = schedules(&state)?;
    let list = s.api().list(&ListParams::default()).await.map_err(|e| kube_error("", e))?;
    let mut items: Vec<ScheduleInfo> = list.items.iter().map(info).collect();
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(items))
}

#[utoipa::path(
    get,
    path = "/schedules/{name}",
    tag = "schedules",
    params(("name" = String, Path, description = "schedule name")),
    responses(
        (status = 200, description = "the schedule", body = ScheduleInfo),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown schedule", body = ErrorBody),
        (status = 501, description = "the local backend has no schedules", body = ErrorBody),
        (status = 503, description = "the Kubernetes API cannot be reached", body = ErrorBody)
    )
)]
pub async fn get_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    let s = schedules(&state)?;
    check_name(&name)?;
    let schedule = s.api().get(&name).await.map_err(|e| kube_error(&name, e))?;
    Ok(Json(info(&schedule)))
}

/// Run the schedule's template now (a run it owns, named `<schedule>-manual-<unix seconds>`),
/// whether or not it is suspended. The run's lock and policy are the template's.
#[utoipa::path(
    post,
    path = "/schedules/{name}/run",
    tag = "schedules",
    params(("name" = String, Path, description = "schedule name")),
    responses(
        (status = 201, description = "the run was created; its `id` is the NotebookRun's name", body = RunInfo),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown schedule", body = ErrorBody),
        (status = 422, description = "the run was refused by the API server (its message says why)", body = ErrorBody),
        (status = 501, description = "the local backend has no schedules", body = ErrorBody),
        (status = 503, description = "the Kubernetes API cannot be reached", body = ErrorBody)
    )
)]
pub async fn run_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<RunInfo>), ApiError> {
    let s = schedules(&state)?;
    check_name(&name)?;
    let schedule = s.api().get(&name).await.map_err(|e| kube_error(&name, e))?;
    let runs: Api<crate::NotebookRun> = Api::namespaced(s.client.clone(), &s.namespace);
    let now = Timestamp::now();
    let base = cron::manual_run_name(&name, now);
    // Two manual runs in one second: the second gets a numbered name.
    for attempt in 0..5u32 {
        let run_name = if attempt == 0 { base.clone() } else { format!("{base}-{attempt}") };
        let run_name = if run_name.len() > 63 {
            format!("{}-{attempt}", base[..58].trim_end_matches(['-', '.']))
        } else {
            run_name
        };
        let run = schedule::build_run(&schedule, &run_name, None)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        match runs.create(&PostParams::default(), &run).await {
            Ok(created) => return Ok((StatusCode::CREATED, Json(run_info(&created)))),
            Err(kube::Error::Api(ae)) if ae.code == 409 => continue,
            Err(e) => return Err(kube_error(&name, e)),
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, format!("could not name a manual run of {name}: try again")))
}

async fn set_suspend(state: &AppState, name: &str, suspend: bool) -> Result<Json<ScheduleInfo>, ApiError> {
    let s = schedules(state)?;
    check_name(name)?;
    let patch = json!({"spec": {"suspend": suspend}});
    let schedule = s
        .api()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| kube_error(name, e))?;
    Ok(Json(info(&schedule)))
}

/// Stop the schedule's ticks (`spec.suspend: true`); runs already created go on.
#[utoipa::path(
    post,
    path = "/schedules/{name}/suspend",
    tag = "schedules",
    params(("name" = String, Path, description = "schedule name")),
    responses(
        (status = 200, description = "the schedule, suspended", body = ScheduleInfo),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown schedule", body = ErrorBody),
        (status = 501, description = "the local backend has no schedules", body = ErrorBody),
        (status = 503, description = "the Kubernetes API cannot be reached", body = ErrorBody)
    )
)]
pub async fn suspend_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    set_suspend(&state, &name, true).await
}

/// Start the schedule's ticks again (`spec.suspend: false`). A tick missed while suspended runs
/// once if within `startingDeadlineSeconds` (always, without a deadline), as CronJob does.
#[utoipa::path(
    post,
    path = "/schedules/{name}/resume",
    tag = "schedules",
    params(("name" = String, Path, description = "schedule name")),
    responses(
        (status = 200, description = "the schedule, resumed", body = ScheduleInfo),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown schedule", body = ErrorBody),
        (status = 501, description = "the local backend has no schedules", body = ErrorBody),
        (status = 503, description = "the Kubernetes API cannot be reached", body = ErrorBody)
    )
)]
pub async fn resume_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    set_suspend(&state, &name, false).await
}
