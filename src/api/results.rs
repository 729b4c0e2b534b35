//! What the results store keeps of a run, streamed to the client (DESIGN.md section 12): the
//! executed notebook of any size and the HTML report. With the `configmap` store the notebook
//! comes from the run's output ConfigMap, as before.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState, ErrorBody};
use crate::backend::Stored;
use crate::results::ResultObject;

/// A stored object as the response body, chunk by chunk.
fn stream(object: crate::results::StoredObject, content_type: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, content_type.to_string()), (header::CONTENT_LENGTH, object.size.to_string())],
        Body::from_stream(object.body),
    )
        .into_response()
}

/// The executed notebook of a run: from the s3 store (streamed), else from the backend; `missing`
/// is the 404 text when there is none.
pub async fn notebook_response(state: &AppState, id: &str, missing: String) -> Result<Response, ApiError> {
    match state.backend.stored(id, ResultObject::Notebook).await? {
        Stored::Object(object) => Ok(stream(object, ResultObject::Notebook.content_type())),
        Stored::Missing(why) => Err(ApiError::new(StatusCode::NOT_FOUND, why)),
        Stored::NoStore => match state.backend.notebook(id).await? {
            Some(nb) => Ok(([(header::CONTENT_TYPE, "application/x-ipynb+json")], nb).into_response()),
            None => Err(ApiError::new(StatusCode::NOT_FOUND, missing)),
        },
    }
}

/// The executed notebook (partial for a failed or cancelled run; while running, as saved after
/// the last cell with the s3 store).
#[utoipa::path(
    get,
    path = "/runs/{id}/notebook",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    responses(
        (status = 200, description = "ipynb JSON, streamed", body = Object, content_type = "application/x-ipynb+json"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown run, or no notebook (yet); the detail says why", body = ErrorBody),
        (status = 503, description = "the results store could not be reached", body = ErrorBody)
    )
)]
pub async fn run_notebook(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    notebook_response(&state, &id, format!("Run {id} has no executed notebook yet.")).await
}

/// The HTML report of a finished run (rendered by nbconvert in the run's image; s3 store only).
#[utoipa::path(
    get,
    path = "/runs/{id}/report",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    responses(
        (status = 200, description = "the executed notebook as HTML, streamed", body = String, content_type = "text/html"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "unknown run, or no report; the detail says why", body = ErrorBody),
        (status = 503, description = "the results store could not be reached", body = ErrorBody)
    )
)]
pub async fn run_report(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match state.backend.stored(&id, ResultObject::Report).await? {
        Stored::Object(object) => Ok(stream(object, ResultObject::Report.content_type())),
        Stored::Missing(why) => Err(ApiError::new(StatusCode::NOT_FOUND, why)),
        Stored::NoStore => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "Run {id} has no HTML report: reports are kept by the s3 results store (--results-store s3), \
                 which this server does not use."
            ),
        )),
    }
}
