//! A facade seen from outside: the `Backend` trait over the REST API of another
//! `notebook-operator` (`local`, `api` or `all`), so the command-line client drives a facade
//! exactly as it drives the cluster. Starts go through the seed API (`/start`, the facade's
//! configured notebook); everything else through `/runs`.

use futures::TryStreamExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::{Backend, BackendError, LogStream, Result, RunInfo, RunPage};

pub struct RemoteBackend {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

#[derive(Deserialize)]
struct Detail {
    detail: String,
}

#[derive(Deserialize)]
struct Page {
    items: Vec<RunInfo>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

// === impl RemoteBackend ===

impl RemoteBackend {
    /// `server` is the facade's base URL (`http://host:port`), `token` its bearer token if any.
    pub fn new(server: &str, token: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10)).build()?;
        Ok(Self { http, base: server.trim_end_matches('/').to_string(), token })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends, and turns an error answer into the `BackendError` the facade made it from.
    async fn send(&self, req: RequestBuilder, id: &str) -> Result<Response> {
        let resp = req.send().await.map_err(|e| {
            BackendError::Unavailable(format!("cannot reach {}: {}", self.base, without_url(&e)))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let detail = match resp.text().await {
            Ok(text) => serde_json::from_str::<Detail>(&text).map(|d| d.detail).unwrap_or(text),
            Err(e) => e.to_string(),
        };
        Err(match status {
            StatusCode::NOT_FOUND if detail.starts_with("Could not find task") => {
                BackendError::NotFound(id.to_string())
            }
            StatusCode::NOT_FOUND => BackendError::Missing(detail),
            StatusCode::BAD_REQUEST if detail.starts_with("Another task is already running: ") => {
                BackendError::AlreadyRunning(detail["Another task is already running: ".len()..].to_string())
            }
            StatusCode::UNAUTHORIZED => BackendError::InvalidInput(format!(
                "{} refused the request ({detail}): pass its token with --token",
                self.base
            )),
            StatusCode::CONFLICT => BackendError::Conflict(detail),
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY | StatusCode::PAYLOAD_TOO_LARGE => {
                BackendError::InvalidInput(detail)
            }
            s if s.is_server_error() => BackendError::Unavailable(detail),
            _ => BackendError::Internal(format!("{status}: {detail}")),
        })
    }

    async fn json<T: DeserializeOwned>(&self, req: RequestBuilder, id: &str) -> Result<T> {
        self.send(req, id).await?.json().await.map_err(|e| BackendError::internal(without_url(&e)))
    }
}

/// reqwest's errors name the URL, which the caller already knows.
fn without_url(e: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

fn path_segment(id: &str) -> String {
    // Run ids are DNS labels; anything else cannot name a run.
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect()
}

#[async_trait::async_trait]
impl Backend for RemoteBackend {
    async fn start(&self, parameters: Option<Map<String, Value>>) -> Result<RunInfo> {
        let body = json!({ "parameters": parameters });
        let task: Value = self.json(self.request(Method::POST, "/start").json(&body), "").await?;
        let id = task["id"].as_str().ok_or_else(|| BackendError::internal("/start answered no id"))?;
        self.get(id).await
    }

    async fn latest(&self) -> Result<Option<RunInfo>> {
        Ok(self.list(1, None).await?.items.into_iter().next())
    }

    async fn get(&self, id: &str) -> Result<RunInfo> {
        self.json(self.request(Method::GET, &format!("/runs/{}", path_segment(id))), id).await
    }

    async fn list(&self, limit: usize, continue_token: Option<&str>) -> Result<RunPage> {
        let mut req = self.request(Method::GET, "/runs").query(&[("limit", limit.to_string())]);
        if let Some(token) = continue_token {
            req = req.query(&[("continue", token)]);
        }
        let page: Page = self.json(req, "").await?;
        Ok(RunPage { items: page.items, continue_token: page.continue_token })
    }

    async fn cancel(&self, id: &str) -> Result<RunInfo> {
        self.json(self.request(Method::POST, &format!("/runs/{}/cancel", path_segment(id))), id).await
    }

    async fn notebook(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let req = self.request(Method::GET, &format!("/runs/{}/notebook", path_segment(id)));
        match self.send(req, id).await {
            Ok(resp) => {
                Ok(Some(resp.bytes().await.map_err(|e| BackendError::internal(without_url(&e)))?.to_vec()))
            }
            Err(BackendError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn logs(&self, id: &str, follow: bool) -> Result<LogStream> {
        let req = self
            .request(Method::GET, &format!("/runs/{}/logs", path_segment(id)))
            .query(&[("follow", follow)]);
        let resp = self.send(req, id).await?;
        Ok(Box::pin(resp.bytes_stream().map_err(std::io::Error::other)))
    }

    async fn delete(&self, id: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &format!("/runs/{}", path_segment(id))), id).await.map(drop)
    }

    fn ready(&self) -> bool {
        true
    }
}
