//! Container logs: CRI-format files (`<time> <stream> <F|P> <text>`) written
//! from the process's pipes, served over HTTPS at
//! `/containerLogs/{namespace}/{pod}/{container}` for the API server's
//! `pods/log` (query: follow, tailLines, limitBytes, sinceSeconds, sinceTime,
//! timestamps, previous, stream).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::super::certs::ServingIdentity;
use super::lock;

/// CRI splits longer lines into partial entries.
const MAX_LINE: u64 = 16 * 1024;

#[derive(Clone, Copy, Default)]
struct Progress {
    written: u64,
    closed: bool,
}

/// The log of one run of one container.
pub struct LogFile {
    path: PathBuf,
    file: Mutex<fs::File>,
    progress: watch::Sender<Progress>,
}

impl LogFile {
    fn create(path: PathBuf) -> io::Result<Arc<Self>> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let file = fs::File::create(&path)?;
        Ok(Arc::new(Self { path, file: Mutex::new(file), progress: watch::Sender::new(Progress::default()) }))
    }

    fn append(&self, stream: &str, text: &[u8], complete: bool) {
        let tag = if complete { "F" } else { "P" };
        let mut entry = format!("{} {stream} {tag} ", Timestamp::now()).into_bytes();
        entry.extend_from_slice(text);
        entry.push(b'\n');
        let mut file = lock(&self.file);
        if file.write_all(&entry).is_ok() {
            self.progress.send_modify(|p| p.written += entry.len() as u64);
        }
    }

    /// No more output: followers stop once they have read everything.
    pub fn close(&self) {
        self.progress.send_modify(|p| p.closed = true);
    }

    /// The last `lines` lines, at most `max_bytes` (termination message fallback).
    pub fn tail(&self, lines: usize, max_bytes: usize) -> String {
        let (entries, _) = read_entries(&self.path, 0).unwrap_or_default();
        let text: Vec<u8> =
            entries[entries.len().saturating_sub(lines)..].iter().flat_map(|e| e.render(false)).collect();
        let start = text.len().saturating_sub(max_bytes);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }
}

/// Copies a pipe into the log, line by line.
pub async fn pump(pipe: impl AsyncRead + Unpin, stream: &'static str, log: Arc<LogFile>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        log.append(stream, &line, complete);
    }
}

#[derive(Clone, Hash, PartialEq, Eq)]
struct ContainerKey {
    namespace: String,
    pod: String,
    container: String,
}

#[derive(Default)]
struct ContainerLogs {
    runs: Vec<Arc<LogFile>>,
    waiting: Option<String>,
}

/// Log files by container, shared between pod workers and the HTTPS server.
#[derive(Clone, Default)]
pub struct LogRegistry {
    containers: Arc<Mutex<HashMap<ContainerKey, ContainerLogs>>>,
}

impl LogRegistry {
    /// Starts the log of a new run of a container.
    pub fn new_run(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        path: PathBuf,
    ) -> io::Result<Arc<LogFile>> {
        let log = LogFile::create(path)?;
        let mut containers = lock(&self.containers);
        let entry = containers.entry(key(namespace, pod, container)).or_default();
        entry.runs.push(log.clone());
        entry.waiting = None;
        Ok(log)
    }

    /// Records why a container has no log yet (answered with 400, like the kubelet).
    pub fn set_waiting(&self, namespace: &str, pod: &str, container: &str, reason: &str) {
        lock(&self.containers).entry(key(namespace, pod, container)).or_default().waiting =
            Some(reason.to_string());
    }

    pub fn remove_pod(&self, namespace: &str, pod: &str) {
        lock(&self.containers).retain(|k, _| k.namespace != namespace || k.pod != pod);
    }

    fn find(&self, key: &ContainerKey, previous: bool) -> Result<Arc<LogFile>, (StatusCode, String)> {
        let containers = lock(&self.containers);
        let Some(logs) = containers.get(key) else {
            return Err((
                StatusCode::NOT_FOUND,
                format!("pod {}/{} or container {} not found", key.namespace, key.pod, key.container),
            ));
        };
        let run = if previous { logs.runs.len().checked_sub(2) } else { logs.runs.len().checked_sub(1) };
        match run.and_then(|i| logs.runs.get(i)) {
            Some(log) => Ok(log.clone()),
            None if previous => Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "previous terminated container \"{}\" in pod \"{}\" not found",
                    key.container, key.pod
                ),
            )),
            None => Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "container \"{}\" in pod \"{}\" is waiting to start: {}",
                    key.container,
                    key.pod,
                    logs.waiting.as_deref().unwrap_or("ContainerCreating")
                ),
            )),
        }
    }
}

fn key(namespace: &str, pod: &str, container: &str) -> ContainerKey {
    ContainerKey { namespace: namespace.into(), pod: pod.into(), container: container.into() }
}

struct Entry {
    time: Option<Timestamp>,
    stream: String,
    complete: bool,
    text: Vec<u8>,
}

impl Entry {
    fn parse(line: &[u8]) -> Option<Entry> {
        let mut parts = line.splitn(4, |b| *b == b' ');
        let time = std::str::from_utf8(parts.next()?).ok()?;
        let stream = std::str::from_utf8(parts.next()?).ok()?.to_string();
        let tag = parts.next()?;
        let text = parts.next().unwrap_or_default().to_vec();
        Some(Entry { time: time.parse().ok(), stream, complete: tag == b"F", text })
    }

    fn render(&self, timestamps: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 40);
        if let Some(time) = self.time.filter(|_| timestamps) {
            out.extend_from_slice(format!("{time} ").as_bytes());
        }
        out.extend_from_slice(&self.text);
        if self.complete {
            out.push(b'\n');
        }
        out
    }
}

/// Complete entries from `offset` on, and the offset after the last one.
fn read_entries(path: &Path, offset: u64) -> io::Result<(Vec<Entry>, u64)> {
    let mut file = fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut raw = Vec::new();
    file.read_to_end(&mut raw)?;
    let end = raw.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let entries =
        raw[..end].split(|b| *b == b'\n').filter(|l| !l.is_empty()).filter_map(Entry::parse).collect();
    Ok((entries, offset + end as u64))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    follow: Option<String>,
    tail_lines: Option<i64>,
    limit_bytes: Option<i64>,
    since_seconds: Option<i64>,
    since_time: Option<String>,
    timestamps: Option<String>,
    previous: Option<String>,
    stream: Option<String>,
}

fn flag(value: &Option<String>) -> bool {
    matches!(value.as_deref(), Some("true" | "1" | "True"))
}

async fn container_logs(
    State(registry): State<LogRegistry>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(query): Query<LogQuery>,
) -> Response {
    let log = match registry.find(&key(&namespace, &pod, &container), flag(&query.previous)) {
        Ok(log) => log,
        Err(error) => return error.into_response(),
    };
    let follow = flag(&query.follow);
    let timestamps = flag(&query.timestamps);
    let since = match (query.since_seconds, query.since_time.as_deref()) {
        (Some(seconds), _) => Timestamp::now().checked_sub(SignedDuration::from_secs(seconds)).ok(),
        (None, Some(time)) => time.parse::<Timestamp>().ok(),
        (None, None) => None,
    };
    let stream_filter = match query.stream.as_deref() {
        Some("Stdout") => Some("stdout"),
        Some("Stderr") => Some("stderr"),
        _ => None,
    };
    let tail = query.tail_lines.map(|n| n.max(0) as usize);
    let mut remaining = query.limit_bytes.map_or(u64::MAX, |n| n.max(0) as u64);

    let keep = move |e: &Entry| {
        stream_filter.is_none_or(|s| e.stream == s)
            && since.is_none_or(|since| e.time.is_none_or(|t| t >= since))
    };
    let body = async_stream::stream! {
        let mut progress = log.progress.subscribe();
        let mut offset = 0;
        let mut first = true;
        loop {
            let seen = *progress.borrow_and_update();
            let (mut entries, next) = match read_entries(&log.path, offset) {
                Ok(read) => read,
                Err(e) => { yield Err(e); return; }
            };
            offset = next;
            entries.retain(|e| keep(e));
            if first {
                if let Some(tail) = tail {
                    entries.drain(..entries.len().saturating_sub(tail));
                }
                first = false;
            }
            for entry in entries {
                if remaining == 0 {
                    return;
                }
                let mut chunk = entry.render(timestamps);
                chunk.truncate(remaining.min(chunk.len() as u64) as usize);
                remaining -= chunk.len() as u64;
                yield Ok::<_, io::Error>(Bytes::from(chunk));
            }
            if !follow || (seen.closed && offset >= seen.written) {
                return;
            }
            if offset >= seen.written && progress.changed().await.is_err() {
                return;
            }
        }
    };
    Body::from_stream(body).into_response()
}

/// Serves `/containerLogs` and `/healthz` over TLS on `listener`.
pub fn serve(
    listener: TcpListener,
    identity: &ServingIdentity,
    registry: LogRegistry,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(identity.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone())),
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let listener = TlsListener { tcp: listener, acceptor: TlsAcceptor::from(Arc::new(config)) };
    let router = Router::new()
        .route("/containerLogs/{namespace}/{pod}/{container}", get(container_logs))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(registry);
    Ok(async move {
        let _ = axum::serve(listener, router).await;
    })
}

struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}
