//! Errors as the original service answered them: a status code and `{"detail": "..."}`.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::BackendError;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub detail: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self { status, detail: detail.into() }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { detail: self.detail })).into_response()
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let status = match &e {
            BackendError::NotFound(_) | BackendError::Missing(_) => StatusCode::NOT_FOUND,
            // The original answered 400 when a run was already going.
            BackendError::AlreadyRunning(_) => StatusCode::BAD_REQUEST,
            BackendError::Conflict(_) => StatusCode::CONFLICT,
            BackendError::InvalidInput(_) => StatusCode::UNPROCESSABLE_ENTITY,
            BackendError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            BackendError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        Self::new(status, e.to_string())
    }
}

/// A JSON object body that may be absent (empty, or `null`), answering 413 past the body limit
/// and 422 for anything that is not the expected object (an array, which serde would read as the
/// struct's fields in order, and unknown fields included), whatever the content type.
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        let invalid = |e: serde_json::Error| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("invalid request body: {e}"))
        };
        match serde_json::from_slice::<serde_json::Value>(&bytes).map_err(invalid)? {
            serde_json::Value::Null => Ok(Self(None)),
            body @ serde_json::Value::Object(_) => {
                serde_json::from_value(body).map(|v| Self(Some(v))).map_err(invalid)
            }
            _ => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid request body: expected a JSON object",
            )),
        }
    }
}

/// Query parameters; a query that does not parse answers 422 with `{"detail": ...}`.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state).await.map(|q| Self(q.0)).map_err(|e| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("invalid query: {}", e.body_text()))
        })
    }
}

/// Unknown paths answer as FastAPI did: 404 `{"detail": "Not Found"}`.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not Found")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}
