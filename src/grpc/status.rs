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
