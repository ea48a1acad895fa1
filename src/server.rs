//! The daemon's server: binds the unix socket safely and serves every gRPC
//! service on it (and the Control API on the TLS listener of `remote`, when
//! configured) until `shutdown` resolves, then drains in-flight requests.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_snapshots::api::snapshots::v1::snapshots_server::SnapshotsServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::codegen::InterceptedService;
use tracing::info;

use crate::commit::CommitService;
use crate::grpc::control::ControlService;
use crate::grpc::snapshots::SnapshotsService;
use crate::proto::control_server::ControlServer;
use crate::remote::RemoteListener;
use crate::snapshotter::Snapshotter;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {path}: {source}")]
    Socket { path: String, source: std::io::Error },
    #[error("socket {path} is in use by a running server; stop it first")]
    InUse { path: String },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("serving gRPC over TCP: {0}")]
    Remote(String),
}

/// Binds `path` as a 0660 unix socket, replacing a stale socket but never a
/// live one or a non-socket file.
pub fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let err = |source| ServerError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse {
                    path: path.display().to_string(),
                });
            }
            std::fs::remove_file(path).map_err(err)?;
            info!(socket = %path.display(), "removed stale socket");
        }
        Ok(_) => {
            return Err(ServerError::NotASocket {
                path: path.display().to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Serves until `shutdown` completes; in-flight requests finish first. The
/// unix socket serves containerd's Snapshots and the Control API; `remote`,
/// when configured, serves the Control API alone, over TLS with its token.
pub async fn run(
    listener: UnixListener,
    remote: Option<RemoteListener>,
    snapshotter: Arc<Snapshotter>,
    commits: Arc<CommitService>,
    root: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    // One service behind both listeners: it owns the checkpoint scheduler.
    let control = Arc::new(ControlService::new(snapshotter.clone(), commits, root));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let remote_served = remote.map(|remote| {
        let service = InterceptedService::new(ControlServer::from_arc(control.clone()), remote.token_check());
        let mut stopped = stopped.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(remote.into_incoming(), async move {
                    let _ = stopped.wait_for(|stopped| *stopped).await;
                }),
        )
    });
    let local = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(snapshotter)))
        .add_service(ControlServer::from_arc(control))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = stop.send(true);
    if let Some(served) = remote_served {
        match served.await {
            Ok(result) => result?,
            Err(e) => return Err(ServerError::Remote(e.to_string())),
        }
    }
    local?;
    Ok(())
}
