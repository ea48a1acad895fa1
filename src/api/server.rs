//! The daemon's server: binds the unix socket safely and serves every gRPC
//! service on it (and the Control API, as `grpc::remote` restricts it, on
//! the TLS listener of `remote`, when configured) until `shutdown`
//! resolves, then drains in-flight requests.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_snapshots::api::snapshots::v1::snapshots_server::SnapshotsServer;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::InterceptedService;
use tracing::info;

use crate::api::connections::AcceptBackoff;
use crate::api::grpc::control::ControlService;
use crate::api::grpc::remote::RemoteControl;
use crate::api::grpc::snapshots::SnapshotsService;
use crate::api::remote::RemoteListener;
use crate::checkpoint::CheckpointService;
use crate::commit::CommitService;
use crate::proto::control_server::ControlServer;
use crate::snapshot::snapshotter::Snapshotter;

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

/// The umask a socket is bound under: it is created 0660 (the kernel gives
/// a new socket 0777 less the umask).
const SOCKET_UMASK: u32 = 0o117;

/// Binds `path` with the socket's final mode from the start. A chmod after
/// bind would leave the socket, for an instant, with whatever mode the
/// process's umask gave it. The umask, though, is shared by all the threads
/// of the process, and setting it would race with any other thread creating
/// files; so the bind runs in a thread of its own that first unshares its
/// filesystem attributes (CLONE_FS: cwd, root and umask), and sets the umask
/// there only.
fn bind_with_private_umask(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("bind-socket".into())
        .spawn(move || {
            // SAFETY: unshare(2) with CLONE_FS touches no memory of ours; it
            // gives this thread its own copy of cwd, root and umask.
            if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                return Err(io::Error::last_os_error());
            }
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(SOCKET_UMASK));
            std::os::unix::net::UnixListener::bind(&path)
        })?
        .join()
        .map_err(|_| io::Error::other("the thread binding the socket panicked"))?
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
    let listener = bind_with_private_umask(path).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(listener).map_err(err)
}

/// The connections of a unix listener, for tonic. A failed accept (EMFILE)
/// is logged and retried after a back-off, never passed on: tonic's server
/// would stop at the first error of its incoming stream.
fn unix_incoming(listener: UnixListener) -> ReceiverStream<io::Result<UnixStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::new("grpc");
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            if let Some((stream, _)) = backoff.accepted(accepted).await {
                if tx.send(Ok(stream)).await.is_err() {
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Calls one TCP connection may have in flight.
const MAX_REMOTE_STREAMS: u32 = 16;

/// Serves until `shutdown` completes; in-flight requests finish first. The
/// unix socket serves containerd's Snapshots and the Control API; `remote`,
/// when configured, serves the Control API as `grpc::remote` restricts it,
/// over TLS with its token.
pub async fn run(
    listener: UnixListener,
    remote: Option<RemoteListener>,
    snapshotter: Arc<Snapshotter>,
    commits: Arc<CommitService>,
    checkpoints: Arc<CheckpointService>,
    root: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    // One service behind both listeners: it runs the checkpoint scheduler.
    let control = Arc::new(ControlService::new(snapshotter.clone(), commits, checkpoints, root));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let remote_served = remote.map(|remote| {
        // Callers over TCP get the restricted API, behind the token check.
        let service = InterceptedService::new(
            ControlServer::new(RemoteControl::new(control.clone())),
            remote.token_check(),
        );
        // Pings at half the idle timeout: a live client answers them, so
        // only a client that stopped reading hits the idle timeout, even
        // during a long call.
        let ping = remote.limits().idle_timeout() / 2;
        let mut stopped = stopped.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(ping))
                .http2_keepalive_timeout(Some(ping))
                .max_concurrent_streams(Some(MAX_REMOTE_STREAMS))
                .add_service(service)
                .serve_with_incoming_shutdown(remote.into_incoming(), async move {
                    let _ = stopped.wait_for(|stopped| *stopped).await;
                }),
        )
    });
    let local = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(snapshotter)))
        .add_service(ControlServer::from_arc(control))
        .serve_with_incoming_shutdown(unix_incoming(listener), shutdown)
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
