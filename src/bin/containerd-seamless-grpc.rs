//! containerd-seamless-grpc: the snapshotter daemon containerd reaches as the
//! proxy plugin `seamless`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use seamless_snapshotter::commit::CommitService;
use seamless_snapshotter::config::Config;
use seamless_snapshotter::snapshotter::Snapshotter;
use seamless_snapshotter::sys::RealSystem;
use seamless_snapshotter::{server, telemetry};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(
    name = "containerd-seamless-grpc",
    version,
    about = "containerd proxy snapshotter with seamless commit"
)]
struct Args {
    /// Directory holding metadata and snapshots.
    #[arg(long, default_value = "/var/lib/containerd-seamless")]
    root: PathBuf,
    /// Unix socket to serve on (created 0660).
    #[arg(long, default_value = "/run/containerd-seamless/containerd-seamless-grpc.sock")]
    address: PathBuf,
    /// containerd's socket, used to resolve containers for seamless commit.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_address: PathBuf,
    /// TOML configuration file (see packaging/config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// trace, debug, info, warn or error.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init(&args.log_level) {
        eprintln!("containerd-seamless-grpc: {e}");
        return ExitCode::from(2);
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, config))
}

async fn serve(args: Args, config: Config) -> anyhow::Result<()> {
    let root = args.root.clone();
    let workers = config.commit.background_workers;
    let snapshotter = tokio::task::spawn_blocking(move || Snapshotter::open(&root, &config, Arc::new(RealSystem)))
        .await?
        .with_context(|| format!("opening snapshotter at {}", args.root.display()))?;
    let snapshotter = Arc::new(snapshotter);
    let commits = Arc::new(
        CommitService::new(snapshotter.clone(), args.containerd_address.clone(), workers)
            .context("opening commit jobs")?,
    );
    let listener = server::bind_socket(&args.address)?;
    info!(
        socket = %args.address.display(),
        root = %args.root.display(),
        containerd = %args.containerd_address.display(),
        storage = snapshotter.storage_kind().as_str(),
        version = env!("CARGO_PKG_VERSION"),
        "serving"
    );
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = int.recv() => info!("SIGINT: draining"),
        }
    };
    let served = server::run(listener, snapshotter, commits, args.root.clone(), shutdown).await;
    let _ = std::fs::remove_file(&args.address);
    served?;
    info!("stopped");
    Ok(())
}
