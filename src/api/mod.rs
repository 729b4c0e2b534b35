//! The REST facade: the original runner's endpoints (`/start`, `/progress`, `/output`, `/kill`),
//! the resource API (`/runs`), ops endpoints and the OpenAPI document, over any `Backend`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::backend::Backend;
use crate::metrics::Metrics;
use auth::BearerScheme;

mod auth;
mod error;
mod ops;
mod results;
mod runs;
mod schedules;
mod seed;
mod ui;

pub use error::{ApiError, ErrorBody};
pub use schedules::{ScheduleInfo, Schedules};

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub metrics: Metrics,
    pub token: Option<Arc<str>>,
    /// NotebookSchedules (kubernetes backend only; None answers 501).
    pub schedules: Option<Schedules>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "notebook-operator",
        description = "Run a Jupyter notebook on demand, one run at a time: the original notebook runner's API \
                       (`/start`, `/progress`, `/output`, `/kill`) plus a resource API over runs."
    ),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
    tags(
        (name = "seed", description = "Compatible with the original FastAPI + Celery notebook runner"),
        (name = "runs", description = "Runs as resources"),
        (name = "schedules", description = "NotebookSchedules (kubernetes backend only)"),
        (name = "ops", description = "Health and metrics")
    )
)]
struct ApiDoc;

/// The routes and the OpenAPI document built from the same handlers, so they cannot drift.
fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(seed::start))
        .routes(routes!(seed::progress))
        .routes(routes!(seed::output))
        .routes(routes!(seed::kill))
        .routes(routes!(seed::ping))
        .routes(routes!(runs::create_run, runs::list_runs))
        .routes(routes!(runs::get_run, runs::delete_run))
        .routes(routes!(runs::run_logs))
        .routes(routes!(results::run_notebook))
        .routes(routes!(results::run_report))
        .routes(routes!(runs::cancel_run))
        .routes(routes!(schedules::list_schedules))
        .routes(routes!(schedules::get_schedule))
        .routes(routes!(schedules::run_schedule))
        .routes(routes!(schedules::suspend_schedule))
        .routes(routes!(schedules::resume_schedule))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .split_for_parts();
    unique_operation_ids(&mut doc);
    (router, doc)
}

/// `method(get, post)` gives both operations the handler's name; an operation id must be unique
/// in the document, so each of the pair becomes `<name>_get` and `<name>_post`.
fn unique_operation_ids(doc: &mut utoipa::openapi::OpenApi) {
    for item in doc.paths.paths.values_mut() {
        let (Some(get), Some(post)) = (item.get.as_mut(), item.post.as_mut()) else { continue };
        if let (Some(g), Some(p)) = (get.operation_id.as_mut(), post.operation_id.as_mut())
            && g == p
        {
            p.push_str("_post");
            g.push_str("_get");
        }
    }
}

/// The OpenAPI 3.1 document served at `/openapi.json`: it asks for the bearer token only when
/// the server has one, and lists the schedules only where they are served (the kubernetes
/// backend; the local backend answers 501 there).
pub fn openapi(token: bool, schedules: bool) -> utoipa::openapi::OpenApi {
    let mut doc = routes().1;
    if !schedules {
        doc.paths.paths.retain(|path, _| !path.starts_with("/schedules"));
        if let Some(tags) = doc.tags.as_mut() {
            tags.retain(|t| t.name != "schedules");
        }
    }
    if !token {
        doc.security = None;
        if let Some(components) = doc.components.as_mut() {
            components.security_schemes.remove(auth::BEARER);
        }
    }
    doc
}

pub fn router(state: AppState) -> Router {
    let (api, _) = routes();
    let doc = openapi(state.token.is_some(), state.schedules.is_some());
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", doc))
        .merge(ui::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_request))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Counts every answer (401s included) by route template and status class.
async fn count_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // `Router::layer` wraps each route, so the matched template is known here; bounded labels.
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let resp = next.run(req).await;
    state.metrics.http_request(route.as_deref().unwrap_or("unmatched"), resp.status().as_u16());
    resp
}

/// Serves the facade until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "serving the REST API");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
