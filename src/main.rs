//! `notebook-operator <command>`: commands, configuration and wiring; nothing else.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use notebook_operator::api::{self, AppState};
use notebook_operator::backend::kubernetes::{KubeBackend, KubeConfig, NotebookRef};
use notebook_operator::backend::local::{LocalBackend, LocalConfig};
use notebook_operator::controller::{self, ControllerConfig, Readiness};
use notebook_operator::job::JobConfig;
use notebook_operator::leader::{self, ElectionConfig, Leadership};
use notebook_operator::metrics::Metrics;
use notebook_operator::results::{ResultsArgs, ResultsStore};
use notebook_operator::telemetry::{self, LogFormat};
use tracing::info;

mod cli;

#[derive(Parser)]
#[command(
    name = "notebook-operator",
    version,
    about = "Run Jupyter notebooks on demand as Kubernetes Jobs, one at a time per lock",
    // A flag given twice takes its last value, as with most tools (defaults in a wrapper
    // script or a chart, then the caller's own).
    args_override_self = true
)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The REST API with the local backend: notebooks run as processes on this machine.
    Local(LocalArgs),
    /// The controller: reconciles NotebookRuns into Leases and Jobs; serves /healthz, /readyz, /metrics.
    Controller(ControllerArgs),
    /// The REST API with the kubernetes backend: each /start creates a NotebookRun.
    Api(KubeApiArgs),
    /// Controller and REST API in one process (one shutdown signal; if either half dies, the process exits).
    All(AllArgs),
    /// Print a CRD as YAML (NotebookRun, or NotebookSchedule with `crd schedule`).
    Crd {
        #[arg(value_enum, default_value = "run")]
        kind: CrdKind,
    },
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CrdKind {
    /// NotebookRun (crds/notebookrun.yaml).
    Run,
    /// NotebookSchedule (crds/notebookschedule.yaml).
    Schedule,
}

#[derive(Args)]
struct ControllerSettings {
    /// Image for runs that name none (needs python3 with nbclient and ipykernel).
    #[arg(
        long,
        env = "NOTEBOOK_OPERATOR_DEFAULT_IMAGE",
        default_value = "quay.io/jupyter/minimal-notebook:python-3.12"
    )]
    default_image: String,
    /// The interpreter inside the image.
    #[arg(long, env = "NOTEBOOK_OPERATOR_RUNNER_PYTHON", default_value = "python3")]
    runner_python: String,
    /// Resources of runs that name none: JSON (`{"limits":{"memory":"2Gi"}}`) or
    /// `requests.cpu=500m,limits.memory=2Gi`. A run's own `resources` replace them as a whole.
    #[arg(long, env = "NOTEBOOK_OPERATOR_DEFAULT_RESOURCES", value_parser = notebook_operator::job::parse_resources)]
    default_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// imagePullPolicy of the runner's container (default: Kubernetes' own, by the image's tag).
    #[arg(long, env = "NOTEBOOK_OPERATOR_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: Option<String>,
    /// How often a running run's progress is read from its pod log.
    #[arg(long, env = "NOTEBOOK_OPERATOR_PROGRESS_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    progress_interval: std::time::Duration,
    /// How long a cancelled run's pod gets to hand over its partial notebook.
    #[arg(long, env = "NOTEBOOK_OPERATOR_CANCEL_GRACE", default_value = "40s", value_parser = parse_duration)]
    cancel_grace: std::time::Duration,
    /// The REST facade's URL as its users reach it (e.g. https://notebooks.example.com): run-end
    /// notifications link to the run's pages there.
    #[arg(long, env = "NOTEBOOK_OPERATOR_PUBLIC_URL", value_parser = parse_public_url)]
    public_url: Option<String>,
    /// How long after a run ends its webhooks are retried (backoff from 1s doubling to 60s).
    #[arg(long, env = "NOTEBOOK_OPERATOR_NOTIFY_RETRY_FOR", default_value = "10m", value_parser = parse_duration)]
    notify_retry_for: std::time::Duration,
    /// How long one webhook attempt may take, answer included.
    #[arg(long, env = "NOTEBOOK_OPERATOR_NOTIFY_ATTEMPT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    notify_attempt_timeout: std::time::Duration,
    /// Finished runs kept per lock (namespace and spec.lock); older ones are deleted with their
    /// Job, pods and ConfigMaps. `0` keeps none, `unlimited` prunes nothing. Runs with
    /// ttlSecondsAfterFinished, and runs of a NotebookSchedule, are left to those.
    #[arg(
        long,
        env = "NOTEBOOK_OPERATOR_HISTORY_LIMIT",
        default_value = "100",
        value_parser = controller::prune::parse_history_limit
    )]
    history_limit: controller::prune::HistoryLimit,
}

impl ControllerSettings {
    fn config(self, namespace: Option<String>, results: ResultsStore) -> ControllerConfig {
        ControllerConfig {
            job: JobConfig {
                default_resources: self.default_resources,
                image_pull_policy: self.image_pull_policy,
                ..JobConfig::new(self.default_image, self.runner_python)
            },
            namespace,
            progress_interval: self.progress_interval,
            cancel_grace: self.cancel_grace,
            notify: notebook_operator::notify::NotifyConfig {
                public_url: self.public_url,
                retry_for: self.notify_retry_for,
                attempt_timeout: self.notify_attempt_timeout,
            },
            history_limit: self.history_limit,
            results,
        }
    }
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    settings: ControllerSettings,
    /// Watch one namespace (default: all namespaces).
    #[arg(long, env = "NOTEBOOK_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "NOTEBOOK_OPERATOR_CONTROLLER_LISTEN", default_value = "0.0.0.0:8081")]
    listen: String,
    #[command(flatten)]
    election: ElectionArgs,
    #[command(flatten)]
    results: ResultsArgs,
}

#[derive(Args)]
struct ElectionArgs {
    /// Elect one leader among replicas through a Lease; only the leader reconciles.
    #[arg(long, env = "NOTEBOOK_OPERATOR_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the election Lease (default: the pod's own, POD_NAMESPACE, else the client's).
    #[arg(long, env = "NOTEBOOK_OPERATOR_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the election Lease.
    #[arg(
        long,
        env = "NOTEBOOK_OPERATOR_LEADER_ELECTION_ID",
        default_value = "notebook-operator-controller"
    )]
    leader_election_id: String,
    /// How long the leader's lease lasts after its last renewal (a standby takes over after it).
    #[arg(long, env = "NOTEBOOK_OPERATOR_LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    leader_election_lease_duration: std::time::Duration,
    /// How long before expiry the leader renews; a leader that could not renew by then stops.
    #[arg(long, env = "NOTEBOOK_OPERATOR_LEADER_ELECTION_RENEW_BEFORE", default_value = "5s", value_parser = parse_duration)]
    leader_election_renew_before: std::time::Duration,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("notebook").required(true).args(["notebook_configmap", "notebook_path"])))]
struct KubeApiArgs {
    /// Namespace of the runs (default: the client's namespace, in a pod its own).
    #[arg(long, env = "NOTEBOOK_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// The notebook every /start runs, from a ConfigMap: NAME or NAME/KEY (key default notebook.ipynb).
    #[arg(long, env = "NOTEBOOK_OPERATOR_NOTEBOOK_CONFIGMAP")]
    notebook_configmap: Option<String>,
    /// The notebook every /start runs, as a path inside the image.
    #[arg(long, env = "NOTEBOOK_OPERATOR_NOTEBOOK_PATH")]
    notebook_path: Option<String>,
    /// Image of the runs (default: the controller's --default-image).
    #[arg(long, env = "NOTEBOOK_OPERATOR_IMAGE")]
    image: Option<String>,
    /// Lock (Lease name) of the runs.
    #[arg(long, env = "NOTEBOOK_OPERATOR_LOCK", default_value = notebook_operator::crd::DEFAULT_LOCK)]
    lock: String,
    /// How long /start waits for the controller to admit or reject a run (then 503).
    #[arg(long, env = "NOTEBOOK_OPERATOR_ADMIT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    admit_timeout: std::time::Duration,
    /// How long /kill waits for the run to be Cancelled before answering.
    #[arg(long, env = "NOTEBOOK_OPERATOR_CANCEL_TIMEOUT", default_value = "45s", value_parser = parse_duration)]
    cancel_timeout: std::time::Duration,
    #[command(flatten)]
    api: ApiArgs,
    /// The results store (read by the facade, written by the controller of `all`).
    #[command(flatten)]
    results: ResultsArgs,
}

impl KubeApiArgs {
    fn config(&self, client: &kube::Client, results: ResultsStore) -> KubeConfig {
        let notebook = match (&self.notebook_configmap, &self.notebook_path) {
            (Some(cm), _) => {
                let (name, key) =
                    cm.split_once('/').unwrap_or((cm, notebook_operator::crd::DEFAULT_NOTEBOOK_KEY));
                NotebookRef::ConfigMap { name: name.into(), key: key.into() }
            }
            (None, Some(path)) => NotebookRef::Path(path.clone()),
            (None, None) => unreachable!("clap requires one notebook source"),
        };
        KubeConfig {
            namespace: self.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string()),
            notebook,
            image: self.image.clone(),
            lock: self.lock.clone(),
            admit_timeout: self.admit_timeout,
            cancel_timeout: self.cancel_timeout,
            results,
        }
    }
}

#[derive(Args)]
struct AllArgs {
    #[command(flatten)]
    settings: ControllerSettings,
    #[command(flatten)]
    api: KubeApiArgs,
}

#[derive(Args)]
struct ApiArgs {
    /// Address the REST API listens on.
    #[arg(long, env = "NOTEBOOK_OPERATOR_LISTEN", default_value = "127.0.0.1:8000")]
    listen: String,
    /// Bearer token required on every endpoint but /ping, /healthz, /readyz and /metrics.
    #[arg(long, env = "NOTEBOOK_OPERATOR_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = "NOTEBOOK_OPERATOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl ApiArgs {
    fn token(&self) -> anyhow::Result<Option<Arc<str>>> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading token file {}", path.display()))?,
            ),
            (None, None) => None,
        };
        match token.map(|t| t.trim().to_string()) {
            Some(t) if t.is_empty() => anyhow::bail!("the API token is empty"),
            t => Ok(t.map(Arc::from)),
        }
    }
}

#[derive(Args)]
struct LocalArgs {
    /// The notebook every /start runs.
    #[arg(long, env = "NOTEBOOK_OPERATOR_NOTEBOOK")]
    notebook: PathBuf,
    /// Python with nbclient and ipykernel (the runner's packages).
    #[arg(long, env = "NOTEBOOK_OPERATOR_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// Where runs are kept (status, log, executed notebook); one server per data dir.
    #[arg(long, env = "NOTEBOOK_OPERATOR_DATA_DIR", default_value = ".notebook-operator")]
    data_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL when a run is killed.
    #[arg(long, env = "NOTEBOOK_OPERATOR_KILL_GRACE", default_value = "10s", value_parser = parse_duration)]
    kill_grace: std::time::Duration,
    /// Longest time one cell may run.
    #[arg(long, env = "NOTEBOOK_OPERATOR_CELL_TIMEOUT", value_parser = parse_duration)]
    cell_timeout: Option<std::time::Duration>,
    /// Kernel name (default: the notebook's kernelspec).
    #[arg(long, env = "NOTEBOOK_OPERATOR_KERNEL")]
    kernel: Option<String>,
    /// Keep one runner with its kernel started and idle ahead of /start (used once, then
    /// replaced; never shared between runs). `--warm-kernel=false` starts each run cold.
    #[arg(long, env = "NOTEBOOK_OPERATOR_WARM_KERNEL", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    warm_kernel: bool,
    #[command(flatten)]
    api: ApiArgs,
}

fn parse_public_url(s: &str) -> Result<String, String> {
    match reqwest::Url::parse(s) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(s.trim_end_matches('/').to_string()),
        _ => Err(format!("invalid URL {s:?} (example: https://notebooks.example.com)")),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    notebook_operator::crd::parse_duration(s)
        .ok_or_else(|| format!("invalid duration {s:?} (examples: 30s, 10m, 1h30m)"))
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

/// Two glibc allocator settings that keep the memory of a large list from staying with the
/// process once it is dropped (docs/benchmarks.md, B7: 43 → 36 MiB for the controller at 10,000
/// finished runs). A fixed mmap threshold: by default glibc raises it each time a large block
/// is freed, so the next pages of a list (megabytes of JSON) come from the heap and leave it
/// fragmented; fixed, they are mapped and unmapped. At most two arenas: glibc gives each thread
/// that allocates its own (up to 8 per core), and one arena's free memory is not reused by
/// another thread's. Set before any thread starts.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called once, before other threads exist.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 128 * 1024);
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Client(command) = cli.command {
        // A client's terminal shows the run, not the library's logs.
        let code = cli::main(command).await.unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            1
        });
        std::process::exit(code);
    }
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Crd { kind } => {
            match kind {
                CrdKind::Run => print!("{}", notebook_operator::crd::crd_yaml()),
                CrdKind::Schedule => print!("{}", notebook_operator::schedule::crd::crd_yaml()),
            }
            Ok(())
        }
        Command::Local(args) => run_local(args).await,
        Command::Controller(args) => run_controller(args).await,
        Command::Api(args) => run_api(args, None).await,
        Command::All(args) => run_api(args.api, Some(args.settings)).await,
        Command::Client(_) => unreachable!("handled above"),
    }
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let results = args.results.store().map_err(anyhow::Error::msg)?;
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let shutdown = Shutdown::on_signal();
    let ops = controller_ops(metrics.clone(), readiness.clone());
    let server = axum::serve(listener, ops).with_graceful_shutdown(shutdown.wait());
    let config = args.settings.config(args.namespace, results);
    let election = &args.election;
    if !election.leader_elect {
        metrics.set_leader(true);
        let leadership = Leadership::unconditional();
        let controller = controller::run(client, config, metrics, readiness, leadership, shutdown.wait());
        tokio::select! {
            () = controller => info!("controller stopped"),
            res = server => res.context("probe server")?,
        }
        return Ok(());
    }
    anyhow::ensure!(
        election.leader_election_renew_before < election.leader_election_lease_duration,
        "--leader-election-renew-before must be shorter than --leader-election-lease-duration"
    );
    let namespace = match &election.leader_election_namespace {
        Some(ns) => ns.clone(),
        None => std::env::var("POD_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_string()),
    };
    let election_config = ElectionConfig {
        namespace,
        lease_name: election.leader_election_id.clone(),
        identity: leader::default_identity(),
        lease_duration: election.leader_election_lease_duration,
        renew_before: election.leader_election_renew_before,
    };
    // A standby is healthy: ready while it waits (the leader's readiness is its cache's).
    readiness.set_ready();
    let lead = {
        let (client, metrics, readiness, shutdown) =
            (client.clone(), metrics.clone(), readiness.clone(), shutdown.clone());
        move |leadership: Leadership| {
            let (client, config, metrics, readiness) =
                (client.clone(), config.clone(), metrics.clone(), readiness.clone());
            let shutdown = shutdown.clone();
            async move { controller::run(client, config, metrics, readiness, leadership, shutdown.wait()).await }
        }
    };
    let elected = leader::run_elected(client, election_config, metrics, lead, shutdown.wait());
    tokio::select! {
        res = elected => res.context("leader election")?,
        res = server => res.context("probe server")?,
    }
    Ok(())
}

/// `api`, or with controller settings `all`: the REST facade over NotebookRuns.
async fn run_api(args: KubeApiArgs, controller_settings: Option<ControllerSettings>) -> anyhow::Result<()> {
    let results = args.results.store().map_err(anyhow::Error::msg)?;
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let token = args.api.token()?;
    let config = args.config(&client, results.clone());
    // `/metrics` shows only what this process updates: requests and starts in `api` (runs are
    // counted by the controller, on its own port); runs too in `all`, whose controller updates them.
    let metrics = if controller_settings.is_some() { Metrics::with_api() } else { Metrics::api_only() };
    let shutdown = Shutdown::on_signal();
    let listener = tokio::net::TcpListener::bind(&args.api.listen)
        .await
        .with_context(|| format!("listening on {}", args.api.listen))?;
    let addr = listener.local_addr()?;
    println!(
        "notebook-operator (kubernetes backend, namespace {}) listening on http://{addr}  —  API docs: http://{addr}/docs/",
        config.namespace
    );
    let namespace = config.namespace.clone();
    let backend = KubeBackend::new(client.clone(), config, shutdown.wait());
    let schedules = Some(api::Schedules::new(client.clone(), namespace.clone()));
    let state = AppState { backend: Arc::new(backend), metrics: metrics.clone(), token, schedules };
    let api = api::serve(listener, state, shutdown.wait());
    // Open `follow` streams may last as long as a run: graceful shutdown waits for them a while only.
    let grace = shutdown.clone();
    let api = async move {
        tokio::select! {
            res = api => res.context("REST API"),
            () = async { grace.wait().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                info!("closing the connections still open after {SHUTDOWN_GRACE:?}");
                Ok(())
            }
        }
    };
    match controller_settings {
        None => api.await?,
        Some(settings) => {
            let controller = controller::run(
                client,
                settings.config(Some(namespace), results),
                metrics,
                Readiness::default(),
                Leadership::unconditional(),
                shutdown.wait(),
            );
            // If either half dies, the process exits; after a shutdown signal both end, and that is fine.
            tokio::select! {
                () = controller => anyhow::ensure!(shutdown.requested(), "the controller stopped"),
                res = api => res?,
            }
        }
    }
    Ok(())
}

/// How long open connections get to finish after a shutdown signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The one shutdown signal (SIGTERM or Ctrl-C), fanned out to every part.
#[derive(Clone)]
struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    fn on_signal() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            telemetry::shutdown_signal().await;
            let _ = tx.send(true);
        });
        Self(rx)
    }

    fn requested(&self) -> bool {
        *self.0.borrow()
    }

    fn wait(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

/// /healthz, /readyz (run cache synced) and /metrics of the controller.
fn controller_ops(metrics: Metrics, readiness: Readiness) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "cache not synced")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render();
                async move { body }
            }),
        )
}

async fn run_local(args: LocalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.notebook.is_file(), "notebook {} not found", args.notebook.display());
    let token = args.api.token()?;
    // The local backend counts runs; the facade counts requests and starts.
    let metrics = Metrics::with_api();
    // Runs execute in their own directory: a relative interpreter path must not move with them.
    let python =
        if args.python.components().count() > 1 { std::path::absolute(&args.python)? } else { args.python };
    let config = LocalConfig {
        notebook: std::path::absolute(&args.notebook)?,
        python,
        data_dir: args.data_dir,
        kill_grace: args.kill_grace,
        cell_timeout: args.cell_timeout,
        kernel: args.kernel,
        warm_kernel: args.warm_kernel,
    };
    let backend = LocalBackend::open(config, metrics.clone()).await?;
    let listener = tokio::net::TcpListener::bind(&args.api.listen)
        .await
        .with_context(|| format!("listening on {}", args.api.listen))?;
    let addr = listener.local_addr()?;
    println!(
        "notebook-operator (local backend) listening on http://{addr}  —  API docs: http://{addr}/docs/"
    );
    let state = AppState { backend: Arc::new(backend.clone()), metrics, token, schedules: None };
    // Stop the active run first: it also ends the log streams that graceful shutdown waits for.
    let shutdown = async move {
        telemetry::shutdown_signal().await;
        backend.shutdown().await;
    };
    api::serve(listener, state, shutdown).await?;
    Ok(())
}
