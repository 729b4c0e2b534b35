//! Where a run's results are kept (DESIGN.md section 12): the executed notebook, the HTML report
//! and the full log. `configmap` keeps the notebook alone, gzip'd in `<run>-output` (cut to fit);
//! `s3` keeps all three in an S3-compatible bucket under `<prefix><namespace>/<run>/`.
//!
//! With `s3` the pod never holds credentials: the controller presigns one PUT URL per object at
//! admission (a capability for one key, for the run's lifetime) and the runner uploads with the
//! Python standard library. The facade reads the objects back as streams; deleting a run deletes
//! them. Nothing passes through the controller's memory.

pub mod events;
mod read;

pub use read::{stored, user_log};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ClientOptions, ObjectStoreExt, RetryConfig};

/// Longest validity of a presigned URL (SigV4 refuses more than 7 days).
pub const MAX_PRESIGN: Duration = Duration::from_secs(7 * 24 * 3600);
/// Added to a run's deadline: the runner uploads after its last cell, and a pod may wait to start.
const PRESIGN_MARGIN: Duration = Duration::from_secs(3600);
/// The start window a run has when it names none (`timeouts.start`, DESIGN.md section 3).
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(600);

/// The objects of one run, by their file name under `<prefix><namespace>/<run>/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResultObject {
    Notebook,
    Report,
    Log,
}

impl ResultObject {
    pub const ALL: [ResultObject; 3] = [ResultObject::Notebook, ResultObject::Report, ResultObject::Log];

    /// The name in the runner's protocol and in `status.output`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultObject::Notebook => "notebook",
            ResultObject::Report => "report",
            ResultObject::Log => "log",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == name)
    }

    pub fn file_name(self) -> &'static str {
        match self {
            ResultObject::Notebook => "notebook.ipynb",
            ResultObject::Report => "report.html",
            ResultObject::Log => "log.txt",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ResultObject::Notebook => "application/x-ipynb+json",
            ResultObject::Report => "text/html; charset=utf-8",
            ResultObject::Log => "text/plain; charset=utf-8",
        }
    }
}

/// Which store the controller and the facade use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// gzip in the ConfigMap `<run>-output` (at most about 1 MiB: outputs cut to fit).
    #[default]
    Configmap,
    /// An S3-compatible bucket: notebook, HTML report and log, never cut.
    S3,
}

/// `--results-store` and the S3 settings, shared by `controller`, `api` and `all`. Credentials
/// come from the standard `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (`AWS_SESSION_TOKEN`).
#[derive(clap::Args, Clone, Debug)]
pub struct ResultsArgs {
    /// Where executed notebooks (and with s3, HTML reports and logs) are kept.
    #[arg(long, env = "NOTEBOOK_OPERATOR_RESULTS_STORE", value_enum, default_value = "configmap")]
    pub results_store: StoreKind,
    /// S3 endpoint URL (default: AWS for the region). Must be reachable from the runs' pods too:
    /// they upload to it. Path-style requests are used with a custom endpoint.
    #[arg(long, env = "NOTEBOOK_OPERATOR_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Bucket of the results (it must exist).
    #[arg(long, env = "NOTEBOOK_OPERATOR_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Region of the bucket (the signatures are made for it).
    #[arg(long, env = "NOTEBOOK_OPERATOR_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Prepended to every object key (`<prefix><namespace>/<run>/notebook.ipynb`), e.g. `runs/`.
    #[arg(long, env = "NOTEBOOK_OPERATOR_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    /// Allow a plain-http endpoint that is not on the loopback (an in-cluster store without TLS).
    #[arg(long, env = "NOTEBOOK_OPERATOR_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
}

impl ResultsArgs {
    /// The configured store; an incomplete or invalid s3 configuration is a start-up error.
    pub fn store(&self) -> Result<ResultsStore, String> {
        match self.results_store {
            StoreKind::Configmap => Ok(ResultsStore::ConfigMap),
            StoreKind::S3 => {
                let bucket = self
                    .s3_bucket
                    .clone()
                    .filter(|b| !b.is_empty())
                    .ok_or("--results-store s3 needs --s3-bucket (NOTEBOOK_OPERATOR_S3_BUCKET)")?;
                let key = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
                let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
                if key.is_empty() || secret.is_empty() {
                    return Err("--results-store s3 needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into());
                }
                let config = S3Config {
                    endpoint: self.s3_endpoint.clone().filter(|e| !e.is_empty()),
                    bucket,
                    region: self.s3_region.clone(),
                    prefix: self.s3_prefix.clone(),
                    allow_http: self.s3_allow_http,
                    access_key_id: key,
                    secret_access_key: secret,
                    session_token: std::env::var("AWS_SESSION_TOKEN").ok().filter(|t| !t.is_empty()),
                };
                Ok(ResultsStore::S3(Arc::new(S3Store::new(&config)?)))
            }
        }
    }
}

/// The results store of a controller or facade.
#[derive(Clone, Debug, Default)]
pub enum ResultsStore {
    #[default]
    ConfigMap,
    S3(Arc<S3Store>),
}

impl ResultsStore {
    pub fn s3(&self) -> Option<&S3Store> {
        match self {
            ResultsStore::S3(s) => Some(s),
            ResultsStore::ConfigMap => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    pub allow_http: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("results store: {0}")]
pub struct StoreError(String);

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        StoreError(crate::progress::keep_tail(&e.to_string(), 512))
    }
}

/// A stored object as a stream of chunks, with its size.
pub struct StoredObject {
    pub size: u64,
    pub body: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
}

/// An S3-compatible bucket holding the results.
#[derive(Debug)]
pub struct S3Store {
    /// Short requests (HEAD, DELETE): a short timeout and one retry, so an unreachable store never
    /// holds a reconcile for long.
    ops: AmazonS3,
    /// Reads streamed to the facade's clients: no overall timeout (a large object takes its time).
    reads: AmazonS3,
    prefix: String,
    bucket: String,
}

// === impl S3Store ===

impl S3Store {
    pub fn new(config: &S3Config) -> Result<Self, String> {
        if let Some(endpoint) = &config.endpoint {
            let url = reqwest::Url::parse(endpoint)
                .map_err(|e| format!("invalid --s3-endpoint {endpoint:?}: {e}"))?;
            let host = url.host_str().unwrap_or_default();
            let loopback = host == "localhost"
                || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            match url.scheme() {
                "https" => {}
                "http" if loopback || config.allow_http => {}
                "http" => {
                    return Err(format!(
                        "--s3-endpoint {endpoint} is plain http and not on the loopback: use https, or pass \
                         --s3-allow-http to accept it"
                    ));
                }
                other => return Err(format!("--s3-endpoint {endpoint}: unsupported scheme {other}")),
            }
        }
        Path::parse(format!("{}x", config.prefix))
            .map_err(|e| format!("invalid --s3-prefix {:?}: {e}", config.prefix))?;
        let build = |options: ClientOptions, retry: RetryConfig| {
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&config.bucket)
                .with_region(&config.region)
                .with_access_key_id(&config.access_key_id)
                .with_secret_access_key(&config.secret_access_key)
                .with_client_options(options)
                .with_retry(retry);
            if let Some(token) = &config.session_token {
                b = b.with_token(token);
            }
            if let Some(endpoint) = &config.endpoint {
                // A custom endpoint (Ceph, SeaweedFS, MinIO...) is addressed path-style.
                b = b.with_endpoint(endpoint).with_virtual_hosted_style_request(false).with_allow_http(true);
            }
            b.build().map_err(|e| format!("the s3 results store: {e}"))
        };
        let quick =
            RetryConfig { max_retries: 1, retry_timeout: Duration::from_secs(10), ..Default::default() };
        let ops = build(
            ClientOptions::new()
                .with_timeout(Duration::from_secs(10))
                .with_connect_timeout(Duration::from_secs(5)),
            quick.clone(),
        )?;
        let reads = build(
            ClientOptions::new().with_timeout_disabled().with_connect_timeout(Duration::from_secs(5)),
            quick,
        )?;
        Ok(Self { ops, reads, prefix: config.prefix.clone(), bucket: config.bucket.clone() })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `<prefix><namespace>/<run>/<file>`.
    pub fn key(&self, namespace: &str, run: &str, object: ResultObject) -> String {
        object_key(&self.prefix, namespace, run, object)
    }

    /// One presigned PUT URL per object of the run, by object name (`notebook`, `report`, `log`).
    pub async fn presign_puts(
        &self,
        namespace: &str,
        run: &str,
        expires: Duration,
    ) -> Result<BTreeMap<String, String>, StoreError> {
        let mut urls = BTreeMap::new();
        for object in ResultObject::ALL {
            let path = Path::from(self.key(namespace, run, object));
            let url = self.ops.signed_url(reqwest::Method::PUT, &path, expires.min(MAX_PRESIGN)).await?;
            urls.insert(object.as_str().to_string(), url.to_string());
        }
        Ok(urls)
    }

    /// The size of an object, or None when the store has no such object.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.ops.head(&Path::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// An object as a stream, or None when the store has no such object.
    pub async fn open(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        match self.reads.get(&Path::from(key)).await {
            Ok(got) => {
                let size = got.meta.size;
                let body = got.into_stream().map_err(std::io::Error::other).boxed();
                Ok(Some(StoredObject { size, body }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object of a run (absent ones are fine).
    pub async fn delete_run(&self, namespace: &str, run: &str) -> Result<(), StoreError> {
        for object in ResultObject::ALL {
            match self.ops.delete(&Path::from(self.key(namespace, run, object))).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

pub fn object_key(prefix: &str, namespace: &str, run: &str, object: ResultObject) -> String {
    format!("{prefix}{namespace}/{run}/{}", object.file_name())
}

/// How long a run's presigned URLs stay valid: its deadline and start window plus a margin, at
/// most 7 days (a run without a deadline gets the 7 days; one that runs longer keeps only what
/// it uploaded before they expired, and its status says so).
pub fn presign_expiry(run_timeout: Option<Duration>, start_timeout: Option<Duration>) -> Duration {
    match run_timeout {
        Some(run) => (run + start_timeout.unwrap_or(DEFAULT_START_TIMEOUT) + PRESIGN_MARGIN).min(MAX_PRESIGN),
        None => MAX_PRESIGN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str) -> S3Config {
        S3Config {
            endpoint: Some(endpoint.into()),
            bucket: "b".into(),
            region: "us-east-1".into(),
            prefix: "runs/".into(),
            allow_http: false,
            access_key_id: "AKID".into(),
            secret_access_key: "secret".into(),
            session_token: None,
        }
    }

    #[test]
    fn keys_are_prefix_namespace_run_file() {
        assert_eq!(object_key("runs/", "ns", "r1", ResultObject::Notebook), "runs/ns/r1/notebook.ipynb");
        assert_eq!(object_key("", "ns", "r1", ResultObject::Report), "ns/r1/report.html");
        assert_eq!(object_key("p-", "ns", "r1", ResultObject::Log), "p-ns/r1/log.txt");
    }

    #[test]
    fn presigned_urls_last_the_run_and_at_most_seven_days() {
        let h = Duration::from_secs(3600);
        assert_eq!(presign_expiry(Some(h), None), h + Duration::from_secs(600) + PRESIGN_MARGIN);
        assert_eq!(presign_expiry(Some(h), Some(h)), 3 * h);
        assert_eq!(presign_expiry(None, None), MAX_PRESIGN);
        assert_eq!(presign_expiry(Some(MAX_PRESIGN), None), MAX_PRESIGN);
    }

    #[test]
    fn plain_http_only_on_the_loopback_unless_allowed() {
        assert!(S3Store::new(&config("http://127.0.0.1:9000")).is_ok());
        assert!(S3Store::new(&config("http://localhost:9000")).is_ok());
        assert!(S3Store::new(&config("https://s3.example.com")).is_ok());
        let err = S3Store::new(&config("http://minio.storage:9000")).unwrap_err();
        assert!(err.contains("--s3-allow-http"), "{err}");
        assert!(S3Store::new(&S3Config { allow_http: true, ..config("http://minio.storage:9000") }).is_ok());
        assert!(S3Store::new(&config("ftp://x")).is_err());
    }

    #[tokio::test]
    async fn presigned_puts_are_path_style_per_key_and_carry_no_secret() {
        let store = S3Store::new(&config("http://127.0.0.1:9000")).unwrap();
        let urls = store.presign_puts("ns", "r1", Duration::from_secs(60)).await.unwrap();
        assert_eq!(urls.len(), 3);
        let nb = &urls["notebook"];
        assert!(nb.starts_with("http://127.0.0.1:9000/b/runs/ns/r1/notebook.ipynb?"), "{nb}");
        assert!(nb.contains("X-Amz-Signature="), "{nb}");
        assert!(nb.contains("X-Amz-Expires=60"), "{nb}");
        assert!(!nb.contains("secret"), "{nb}");
        assert!(urls["log"].contains("/r1/log.txt?"));
    }
}
