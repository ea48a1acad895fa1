//! The one place errors become `tonic::Status`. containerd's proxy client maps
//! these codes back to its `errdefs` (NotFound, AlreadyExists, ...).

use crate::error::{Classify, ErrorKind};

pub fn to_status<E: Classify + std::fmt::Display>(err: E) -> tonic::Status {
    let message = err.to_string();
    match err.kind() {
        ErrorKind::NotFound => tonic::Status::not_found(message),
        ErrorKind::AlreadyExists => tonic::Status::already_exists(message),
        ErrorKind::InvalidArgument => tonic::Status::invalid_argument(message),
        ErrorKind::FailedPrecondition => tonic::Status::failed_precondition(message),
        ErrorKind::Unavailable => tonic::Status::unavailable(message),
        ErrorKind::Internal => {
            tracing::error!(error = %message, "internal error");
            tonic::Status::internal(message)
        }
    }
}

/// A blocking task that panicked or was cancelled.
pub fn join_status(err: tokio::task::JoinError) -> tonic::Status {
    tracing::error!(error = %err, "request task failed");
    tonic::Status::internal(format!("request task failed: {err}"))
}

/// A commit error: its commit code leads the message, so clients can tell
/// CONTAINER_NOT_FOUND from INVALID_PARAMETER whatever the gRPC code.
pub fn commit_status(err: crate::commit::CommitError) -> tonic::Status {
    let code = err.code();
    let message = format!("{}: {err}", code.as_str());
    use crate::commit::CommitCode as C;
    match (code, err.kind()) {
        (_, ErrorKind::Unavailable) => tonic::Status::unavailable(message),
        (C::InvalidParameter, _) => tonic::Status::invalid_argument(message),
        (C::ContainerNotFound, _) => tonic::Status::not_found(message),
        (C::PermissionDenied, _) => tonic::Status::permission_denied(message),
        (C::ContainerNotRunning, _) => tonic::Status::failed_precondition(message),
        (C::SnapshotInProgress, _) => tonic::Status::already_exists(message),
        (C::PauseTimeout, _) => tonic::Status::deadline_exceeded(message),
        _ => {
            tracing::error!(error = %message, "commit failed");
            tonic::Status::internal(message)
        }
    }
}
