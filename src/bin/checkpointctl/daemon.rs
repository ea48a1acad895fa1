//! The connection to containerd-seamless-grpc over its unix socket.

use std::path::Path;
use std::time::Duration;

use seamless_snapshotter::proto::control_client::ControlClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::CliError;

/// A daemon that accepts but never answers must not hang the command.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects eagerly, so a missing socket or a refused connection is reported
/// here, naming the socket, rather than on the first call.
pub async fn connect(socket: &Path) -> Result<ControlClient<Channel>, CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        socket: socket.to_path_buf(),
        reason,
    };
    // The URI is required by tonic and ignored by the connector below.
    let endpoint = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT);
    let path = socket.to_path_buf();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| UnixStream::connect(path.clone())))
        .await
        .map_err(|e| unreachable(root_cause(&e)))?;
    Ok(ControlClient::new(channel))
}

/// tonic's transport error says only "transport error"; the reason (no such
/// file, connection refused, timed out) is at the bottom of the chain.
fn root_cause(err: &tonic::transport::Error) -> String {
    let mut cause: &dyn std::error::Error = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let err = connect(&socket).await.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, CliError::Unreachable { .. }), "{err:?}");
        assert!(message.contains(&socket.display().to_string()), "{message}");
        assert!(message.contains("No such file or directory"), "{message}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let err = connect(&socket).await.unwrap_err();
        assert!(err.to_string().contains("Connection refused"), "{err}");
    }
}
