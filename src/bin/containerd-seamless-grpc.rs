//! containerd-seamless-grpc: the snapshotter daemon containerd reaches as the
//! proxy plugin `seamless`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use seamless_snapshotter::api::remote::RemoteListener;
use seamless_snapshotter::api::rest::{self, RestApi};
use seamless_snapshotter::api::{server, telemetry};
use seamless_snapshotter::capture::{self, CaptureService, HOLD_MARGIN};
use seamless_snapshotter::checkpoint::{CheckpointService, CheckpointSettings};
use seamless_snapshotter::commit::nydus_image::BaseCache;
use seamless_snapshotter::commit::CommitService;
use seamless_snapshotter::config::Config;
use seamless_snapshotter::host::sys::RealSystem;
use seamless_snapshotter::nydus::serving::{self, supervisor::ProcessFuse};
use seamless_snapshotter::oci::registry::RegistryOptions;
use seamless_snapshotter::snapshot::snapshotter::Snapshotter;
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
    #[command(subcommand)]
    internal: Option<Internal>,
}

/// What the daemon runs of its own binary; not for people.
#[derive(Debug, clap::Subcommand)]
enum Internal {
    /// A serving process of one RAFS mount over FUSE (started by the daemon,
    /// with the connection on descriptor 3).
    #[command(name = "serve-rafs", hide = true)]
    ServeRafs {
        /// Where its control socket goes (`<root>/nydus/servers`).
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init(&args.log_level) {
        eprintln!("containerd-seamless-grpc: {e}");
        return ExitCode::from(2);
    }
    if let Some(Internal::ServeRafs { dir }) = &args.internal {
        return match serving::server::run_on_inherited_link(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("serving RAFS: {e}");
                ExitCode::FAILURE
            }
        };
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
    // First of all, before anything that may fail: a killed daemon may have
    // left a container frozen, and a bad config must not keep it so.
    capture::thaw_left_frozen(&args.root, &RealSystem);
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
    // Before any socket exists: whoever sees the socket may stop the daemon
    // at once, and that SIGTERM must drain it, not kill it.
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let root = args.root.clone();
    let workers = config.commit.background_workers;
    let max_queued = config.commit.max_queued;
    let base_cache_bytes = config.nydus_base_cache_bytes()?;
    let rest_config = config.rest.clone();
    let remote_config = config.remote.clone();
    // Secrets are checked before anything is opened or bound.
    let token = rest::read_token_file(&rest_config)?;
    let registry = RegistryOptions::from_config(&config.registry);
    let (snapshotter, config) = tokio::task::spawn_blocking(move || {
        // Serving processes of this binary (whatever its path now) serve
        // RAFS over FUSE; those a previous run left are taken over first.
        let sys: Arc<RealSystem> = Arc::new(RealSystem);
        let opened = ProcessFuse::open(Path::new("/proc/self/exe"), &root.join("nydus"), sys.clone())
            .context("taking over RAFS serving processes")
            .and_then(|fuse| {
                Snapshotter::open_with_fuse(&root, &config, sys, Arc::new(fuse))
                    .with_context(|| format!("opening snapshotter at {}", root.display()))
            });
        (opened, config)
    })
    .await?;
    let snapshotter = Arc::new(snapshotter?);
    let checkpoint_settings = CheckpointSettings::load(&args.root, &config)?;
    // A container held frozen across a memory dump is thawed by a watchdog
    // once the dump is past its own timeout.
    let capture = Arc::new(
        CaptureService::new(snapshotter.clone(), &args.root, args.containerd_address.clone())
            .with_hold_limit(checkpoint_settings.criu.timeout + HOLD_MARGIN),
    );
    let commits = Arc::new(
        CommitService::new(
            capture.clone(),
            workers,
            Some(BaseCache {
                dir: args.root.join("nydus-base"),
                limit_bytes: base_cache_bytes,
            }),
        )
        .context("opening commit jobs")?
        .with_registry(registry)
        .with_max_queued(max_queued),
    );
    // Finishes what a killed daemon journaled before anything is served.
    let checkpoints = {
        let (capture, root) = (capture.clone(), args.root.clone());
        Arc::new(
            tokio::task::spawn_blocking(move || CheckpointService::new(capture, checkpoint_settings, &root)).await?,
        )
    };
    tokio::spawn(checkpoints.clone().sweep_restore_leases());
    let listener = server::bind_socket(&args.address)?;
    let rest_socket = if rest_config.socket.is_empty() {
        args.address.with_file_name("rest.sock")
    } else {
        PathBuf::from(&rest_config.socket)
    };
    let rest_listener = Arc::new(server::bind_socket(&rest_socket)?);
    let remote = match remote_config.address.as_str() {
        "" => None,
        address => {
            let remote = RemoteListener::bind(&remote_config).await?;
            info!(address, tls_cert = %remote_config.tls_cert, "Control API also on TCP: TLS, bearer token required");
            Some(remote)
        }
    };
    info!(
        socket = %args.address.display(),
        rest = %rest_socket.display(),
        root = %args.root.display(),
        containerd = %args.containerd_address.display(),
        storage = snapshotter.storage_kind().as_str(),
        version = env!("CARGO_PKG_VERSION"),
        "serving"
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = int.recv() => info!("SIGINT: draining"),
        }
        let _ = stop.send(true);
    });
    let when_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };
    // The unix socket needs no token: its 0660 mode is the access control.
    let unix_api = Arc::new(RestApi::new(
        commits.clone(),
        rest_config.namespace(),
        &rest_config.connections,
        None,
    ));
    tokio::spawn(rest::serve(
        unix_api,
        rest_config.connections.clone(),
        move || {
            let l = rest_listener.clone();
            async move { l.accept().await.map(|(s, _)| (s, None)) }
        },
        when_stopped(stopped.clone()),
    ));
    if !rest_config.tcp_address.is_empty() {
        let tcp = Arc::new(
            tokio::net::TcpListener::bind(&rest_config.tcp_address)
                .await
                .with_context(|| format!("binding rest.tcp_address {}", rest_config.tcp_address))?,
        );
        info!(address = %rest_config.tcp_address, "REST API also on TCP, bearer token required");
        let tcp_api = Arc::new(RestApi::new(
            commits.clone(),
            rest_config.namespace(),
            &rest_config.connections,
            token,
        ));
        tokio::spawn(rest::serve(
            tcp_api,
            rest_config.connections.clone(),
            move || {
                let l = tcp.clone();
                async move { l.accept().await.map(|(s, peer)| (s, Some(peer.ip()))) }
            },
            when_stopped(stopped.clone()),
        ));
    }
    let served = server::run(
        listener,
        remote,
        snapshotter,
        commits,
        checkpoints,
        args.root.clone(),
        when_stopped(stopped),
    )
    .await;
    let _ = std::fs::remove_file(&rest_socket);
    let _ = std::fs::remove_file(&args.address);
    served?;
    info!("stopped");
    Ok(())
}
