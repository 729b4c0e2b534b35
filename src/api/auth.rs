//! Optional bearer-token auth: when a token is configured, everything but the probes,
//! `/ping`, `/metrics` and the dashboard's static assets needs `Authorization: Bearer <token>`.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::{ApiError, AppState};

/// Paths open without a token (probes and scrapers cannot carry one).
const OPEN_PATHS: [&str; 4] = ["/ping", "/healthz", "/readyz", "/metrics"];

pub async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = state.token.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    // The dashboard's assets hold no data; the page sends the token with its API calls.
    let dashboard = path == super::ui::PREFIX || path.starts_with("/ui/");
    if OPEN_PATHS.contains(&path) || dashboard {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if constant_time_eq(p.trim().as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Not authenticated: send Authorization: Bearer <token>",
            )
            .into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The name of the security scheme in the OpenAPI document.
pub const BEARER: &str = "bearer";

/// Declares the `bearer` scheme in the OpenAPI document (Swagger UI's Authorize button).
pub struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn compares_tokens_exactly() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
    }
}
