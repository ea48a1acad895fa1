//! The connection to containerd-seamless-grpc over its unix socket.

use std::path::Path;

use seamless_snapshotter::client::{self, ClientError};
use seamless_snapshotter::proto::control_client::ControlClient;
use tonic::transport::Channel;

use crate::CliError;

/// Connects eagerly, so a missing socket or a refused connection is reported
/// here, naming the socket, rather than on the first call.
pub async fn connect(socket: &Path) -> Result<ControlClient<Channel>, CliError> {
    tracing::debug!(socket = %socket.display(), "connecting to the daemon");
    match client::connect(socket).await {
        Ok(channel) => Ok(ControlClient::new(channel)),
        Err(ClientError::Unreachable { message, .. }) => Err(CliError::Unreachable {
            socket: socket.to_path_buf(),
            reason: message,
        }),
        Err(other) => Err(CliError::Unreachable {
            socket: socket.to_path_buf(),
            reason: other.to_string(),
        }),
    }
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
