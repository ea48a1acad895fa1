//! The daemon's server: binds the unix socket safely and serves every gRPC
//! service on it until `shutdown` resolves, then drains in-flight requests.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_snapshots::api::snapshots::v1::snapshots_server::SnapshotsServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::info;

use crate::commit::CommitService;
use crate::grpc::control::ControlService;
use crate::grpc::snapshots::SnapshotsService;
use crate::proto::control_server::ControlServer;
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

/// Serves until `shutdown` completes; in-flight requests finish first.
pub async fn run(
    listener: UnixListener,
    snapshotter: Arc<Snapshotter>,
    commits: Arc<CommitService>,
    root: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(snapshotter.clone())))
        .add_service(ControlServer::new(ControlService::new(snapshotter, commits, root)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
