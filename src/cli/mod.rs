//! The binary as a client (DESIGN.md section 14): `run`, `start`, `list`, `get`, `logs`,
//! `cancel` and `notebook`, against the cluster (kubeconfig resolved as kubectl does) or, with
//! `--server URL`, against a facade. Both sides are a `Backend`: the cluster's is the facade's own
//! kubernetes backend, a facade's is `RemoteBackend` over its REST API.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use notebook_operator::backend::kubernetes::{KubeBackend, KubeConfig, NotebookRef};
use notebook_operator::backend::remote::RemoteBackend;
use notebook_operator::backend::{Backend, RunInfo};
use notebook_operator::crd::{Reason, RunPhase};
use notebook_operator::progress::exit_code;
use serde_json::{Map, Value};

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Run a notebook in the cluster: a NotebookRun with the notebook inline; waits for the end
    /// and exits with the runner's code (0, 1 cell error, 2 invalid input, 3 timeout, 4 kernel
    /// died, 143 cancelled).
    Run(RunArgs),
    /// Start a facade's notebook (`--server URL`) through its seed API, then as `run`.
    Start(StartArgs),
    /// Runs, newest first.
    List(TargetArgs),
    /// One run, as JSON.
    Get(IdArgs),
    /// What a run's notebook printed.
    Logs(LogsArgs),
    /// Cancel a run (a finished run is left as it is).
    Cancel(IdArgs),
    /// The executed notebook (ipynb JSON) on stdout.
    Notebook(IdArgs),
}

/// Where the runs are: the cluster of the current kubeconfig context, or a facade.
#[derive(Args)]
pub struct TargetArgs {
    /// A facade's base URL (`http://host:8000`); without it, the cluster.
    #[arg(long, env = "NOTEBOOK_OPERATOR_SERVER")]
    server: Option<String>,
    /// The facade's bearer token.
    #[arg(long, env = "NOTEBOOK_OPERATOR_TOKEN", hide_env_values = true, requires = "server")]
    token: Option<String>,
    /// Namespace in the cluster (default: the kubeconfig context's).
    #[arg(short = 'n', long, conflicts_with = "server")]
    namespace: Option<String>,
    /// Lock (Lease name) of the runs in the cluster.
    #[arg(long, default_value = notebook_operator::crd::DEFAULT_LOCK, conflicts_with = "server")]
    lock: String,
}

#[derive(Args)]
pub struct FollowArgs {
    /// Parameter injected after the cell tagged `parameters` (value parsed as JSON, else a string).
    #[arg(short = 'p', long = "parameter", value_name = "KEY=VALUE", value_parser = parse_parameter)]
    parameters: Vec<(String, Value)>,
    /// Stream what the notebook prints while it runs.
    #[arg(short = 'f', long)]
    follow: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// The notebook (.ipynb) to run.
    notebook: PathBuf,
    /// Image of the run (default: the controller's --default-image).
    #[arg(long)]
    image: Option<String>,
    /// How long to wait for the controller to admit the run.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    admit_timeout: Duration,
    #[command(flatten)]
    follow: FollowArgs,
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Lock (Lease name) of the run.
    #[arg(long, default_value = notebook_operator::crd::DEFAULT_LOCK)]
    lock: String,
}

#[derive(Args)]
pub struct StartArgs {
    /// The facade's base URL (`http://host:8000`).
    #[arg(long, env = "NOTEBOOK_OPERATOR_SERVER")]
    server: String,
    /// The facade's bearer token.
    #[arg(long, env = "NOTEBOOK_OPERATOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    follow: FollowArgs,
}

#[derive(Args)]
pub struct IdArgs {
    /// The run's id.
    id: String,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
pub struct LogsArgs {
    /// The run's id.
    id: String,
    /// Stream until the run ends.
    #[arg(short = 'f', long)]
    follow: bool,
    #[command(flatten)]
    target: TargetArgs,
}

fn parse_parameter(s: &str) -> Result<(String, Value), String> {
    let (key, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

fn parameters(follow: &FollowArgs) -> Option<Map<String, Value>> {
    (!follow.parameters.is_empty()).then(|| follow.parameters.iter().cloned().collect())
}

/// Runs a client command; the process exits with the code it answers.
pub async fn main(command: ClientCommand) -> anyhow::Result<i32> {
    match command {
        ClientCommand::Run(args) => {
            let text = std::fs::read_to_string(&args.notebook)
                .with_context(|| format!("reading {}", args.notebook.display()))?;
            let client = kube::Client::try_default().await.context("no usable kubeconfig")?;
            let config = KubeConfig {
                namespace: args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string()),
                notebook: NotebookRef::Inline(text),
                image: args.image.clone(),
                lock: args.lock.clone(),
                admit_timeout: args.admit_timeout,
                cancel_timeout: Duration::from_secs(60),
                results: Default::default(),
            };
            let backend = cluster(client, config).await?;
            let run = backend.start(parameters(&args.follow)).await?;
            watch(backend, run, args.follow.follow).await
        }
        ClientCommand::Start(args) => {
            let backend: Arc<dyn Backend> = Arc::new(RemoteBackend::new(&args.server, args.token)?);
            let run = backend.start(parameters(&args.follow)).await?;
            watch(backend, run, args.follow.follow).await
        }
        ClientCommand::List(target) => {
            let backend = target.backend().await?;
            let page = backend.list(500, None).await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:<38} {:<10} {:<18} {:>9}  CREATED", "ID", "PHASE", "REASON", "PROGRESS")?;
            for run in page.items {
                let progress = run.progress.as_ref().map(|p| p.display.clone()).unwrap_or_default();
                let reason = run.reason.map(Reason::as_str).unwrap_or_default();
                writeln!(
                    out,
                    "{:<38} {:<10} {:<18} {:>9}  {}",
                    run.id,
                    run.phase.as_str(),
                    reason,
                    progress,
                    run.created_at
                )?;
            }
            Ok(0)
        }
        ClientCommand::Get(args) => {
            let run = args.target.backend().await?.get(&args.id).await?;
            println!("{}", serde_json::to_string_pretty(&run)?);
            Ok(0)
        }
        ClientCommand::Logs(args) => {
            let backend = args.target.backend().await?;
            let mut stream = backend.logs(&args.id, args.follow).await?;
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?)?;
                out.flush()?;
            }
            Ok(0)
        }
        ClientCommand::Cancel(args) => {
            let run = args.target.backend().await?.cancel(&args.id).await?;
            println!("{} {}", run.id, run.phase.as_str());
            Ok(0)
        }
        ClientCommand::Notebook(args) => {
            let backend = args.target.backend().await?;
            let nb = backend
                .notebook(&args.id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("run {} has no executed notebook yet", args.id))?;
            std::io::stdout().lock().write_all(&nb)?;
            Ok(0)
        }
    }
}

impl TargetArgs {
    async fn backend(&self) -> anyhow::Result<Arc<dyn Backend>> {
        if let Some(server) = &self.server {
            return Ok(Arc::new(RemoteBackend::new(server, self.token.clone())?));
        }
        let client = kube::Client::try_default().await.context("no usable kubeconfig")?;
        let config = KubeConfig {
            namespace: self.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string()),
            // Reads only: the notebook is never used.
            notebook: NotebookRef::Inline(String::new()),
            image: None,
            lock: self.lock.clone(),
            admit_timeout: Duration::from_secs(30),
            cancel_timeout: Duration::from_secs(60),
            results: Default::default(),
        };
        cluster(client, config).await
    }
}

/// The kubernetes backend for this process, once its cache holds the namespace's runs.
async fn cluster(client: kube::Client, config: KubeConfig) -> anyhow::Result<Arc<dyn Backend>> {
    let backend = KubeBackend::new(client, config, std::future::pending());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !backend.ready() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the cluster's NotebookRuns could not be listed in 30s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Arc::new(backend))
}

/// The runner's exit code for a finished run.
pub fn exit_code_of(run: &RunInfo) -> i32 {
    match (run.phase, run.reason) {
        (RunPhase::Succeeded, _) => exit_code::SUCCESS,
        (RunPhase::Cancelled, _) => exit_code::CANCELLED,
        (_, Some(Reason::InvalidNotebook | Reason::NotebookNotFound)) => exit_code::INVALID_INPUT,
        (_, Some(Reason::CellTimeout | Reason::DeadlineExceeded)) => exit_code::CELL_TIMEOUT,
        (_, Some(Reason::KernelDied | Reason::OomKilled)) => exit_code::KERNEL_DIED,
        _ => exit_code::CELL_ERROR,
    }
}

/// Follows a run to its end: a progress bar with the current cell on stderr, the notebook's
/// output on stdout with `follow`, the traceback of a failure; Ctrl-C asks whether to cancel.
async fn watch(backend: Arc<dyn Backend>, run: RunInfo, follow: bool) -> anyhow::Result<i32> {
    let id = run.id.clone();
    // Registered before anything is printed (a signal future would register only once polled):
    // a Ctrl-C from here on asks, never kills.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    eprintln!("run {id} {}", run.phase.as_str());
    // A spinner until the runner has counted the cells, then a bar.
    let spinner = ProgressStyle::with_template("{spinner} {prefix} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let cells = ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} cells {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::new(0).with_style(spinner);
    let mut counted = false;
    bar.set_prefix(id.clone());
    bar.enable_steady_tick(Duration::from_millis(200));

    let printer = follow.then(|| {
        let (backend, id, bar) = (Arc::clone(&backend), id.clone(), bar.clone());
        tokio::spawn(async move {
            let mut stream = match backend.logs(&id, true).await {
                Ok(stream) => stream,
                Err(e) => {
                    bar.suspend(|| eprintln!("no log to follow: {e}"));
                    return;
                }
            };
            while let Some(Ok(chunk)) = stream.next().await {
                bar.suspend(|| {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&chunk).and_then(|()| out.flush());
                });
            }
        })
    });

    let run = loop {
        let run = tokio::select! {
            run = backend.get(&id) => run?,
            _ = interrupt.recv() => {
                let answer = bar.suspend(ask_cancel(&id));
                if answer {
                    backend.cancel(&id).await?;
                    continue;
                }
                bar.abandon();
                eprintln!("run {id} goes on; follow it with `notebook-operator logs -f {id}`");
                return Ok(130);
            }
        };
        if let Some(p) = run.progress.as_ref().filter(|p| p.cells_total > 0) {
            if !counted {
                bar.set_style(cells.clone());
                counted = true;
            }
            bar.set_length(u64::from(p.cells_total));
            bar.set_position(u64::from(p.cells_completed));
            match (p.current_cell, run.phase) {
                (Some(cell), RunPhase::Running) => bar.set_message(format!("(cell {cell} running)")),
                _ => bar.set_message(run.phase.as_str()),
            }
        } else {
            bar.set_message(run.phase.as_str());
        }
        if run.phase.is_terminal() {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(printer) = printer {
        // The log ends with the run; bounded in case the stream outlives it.
        let _ = tokio::time::timeout(Duration::from_secs(30), printer).await;
    }
    bar.finish_with_message(run.phase.as_str());
    let code = exit_code_of(&run);
    let reason = run.reason.map(Reason::as_str).unwrap_or_default();
    let message = run.message.as_deref().unwrap_or_default();
    eprintln!("run {id} {} {reason}: {message}", run.phase.as_str());
    let traceback = run.error.as_ref().and_then(|e| e.traceback.as_deref()).filter(|t| !t.trim().is_empty());
    if let Some(tb) = traceback.filter(|_| code != exit_code::SUCCESS && code != exit_code::CANCELLED) {
        let cell =
            run.error.as_ref().and_then(|e| e.cell).map(|c| format!(" in cell {c}")).unwrap_or_default();
        eprintln!("traceback{cell}:\n{}", notebook_operator::progress::strip_ansi(tb).trim_end());
    }
    Ok(code)
}

/// Asks on the terminal whether to cancel; no answer (stdin closed) is no.
fn ask_cancel(id: &str) -> impl FnOnce() -> bool + '_ {
    move || {
        eprint!("\ncancel run {id}? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).is_ok_and(|_| matches!(line.trim(), "y" | "Y" | "yes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(phase: RunPhase, reason: Reason) -> RunInfo {
        serde_json::from_value(serde_json::json!({
            "id": "r", "phase": phase, "reason": reason, "createdAt": "2026-01-01T00:00:00Z",
            "startedAt": null, "finishedAt": null
        }))
        .unwrap()
    }

    #[test]
    fn exit_codes_are_the_runners() {
        for (phase, reason, code) in [
            (RunPhase::Succeeded, Reason::Succeeded, 0),
            (RunPhase::Failed, Reason::CellError, 1),
            (RunPhase::Failed, Reason::InvalidNotebook, 2),
            (RunPhase::Failed, Reason::NotebookNotFound, 2),
            (RunPhase::Failed, Reason::CellTimeout, 3),
            (RunPhase::Failed, Reason::KernelDied, 4),
            (RunPhase::Failed, Reason::OomKilled, 4),
            (RunPhase::Cancelled, Reason::Cancelled, 143),
            (RunPhase::Failed, Reason::PodFailed, 1),
        ] {
            assert_eq!(exit_code_of(&finished(phase, reason)), code, "{phase:?} {reason:?}");
        }
    }

    #[test]
    fn parameters_are_json_else_strings() {
        assert_eq!(parse_parameter("n=2").unwrap(), ("n".into(), serde_json::json!(2)));
        assert_eq!(parse_parameter("s=abc").unwrap(), ("s".into(), serde_json::json!("abc")));
        assert_eq!(parse_parameter("e=").unwrap(), ("e".into(), serde_json::json!("")));
        assert!(parse_parameter("novalue").is_err());
    }
}
