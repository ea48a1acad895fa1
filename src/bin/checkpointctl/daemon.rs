//! The connection to containerd-seamless-grpc: over its unix socket, or
//! over TLS with a token to the daemon of another node.

use std::path::Path;

use seamless_snapshotter::api::client::{self, ClientError, DaemonClient};

use crate::settings::{NodeAddress, NodeSettings};
use crate::CliError;

fn unreachable(address: String, err: ClientError) -> CliError {
    let reason = match err {
        ClientError::Unreachable { message, .. } => message,
        other => other.to_string(),
    };
    CliError::Unreachable { address, reason }
}

/// Connects eagerly, so a missing socket or a refused connection is reported
/// here, naming the socket, rather than on the first call.
pub async fn connect(socket: &Path) -> Result<DaemonClient, CliError> {
    tracing::debug!(socket = %socket.display(), "connecting to the daemon");
    match client::connect(socket).await {
        Ok(channel) => Ok(client::local_client(channel)),
        Err(err) => Err(unreachable(socket.display().to_string(), err)),
    }
}

/// Connects to the daemon of a node of the config file: its unix socket, or
/// its TLS address with its token on every call. Eager, like `connect`.
pub async fn connect_node(node: &NodeSettings) -> Result<DaemonClient, CliError> {
    match &node.address {
        NodeAddress::Unix(socket) => connect(socket).await,
        NodeAddress::Https(address) => {
            tracing::debug!(%address, "connecting to the node's daemon over TLS");
            client::connect_remote(&node.remote_target(address))
                .await
                .map_err(|err| unreachable(address.clone(), err))
        }
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
