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

/// A commit error: its commit code travels typed in the status details (an
/// `ErrorDetail`, read back by [`error_code`]) and, for people, leads the
/// message, so clients can tell CONTAINER_NOT_FOUND from INVALID_PARAMETER
/// whatever the gRPC code.
pub fn commit_status(err: crate::commit::CommitError) -> tonic::Status {
    use crate::commit::CommitCode as C;
    use prost::Message as _;
    use tonic::Code;
    let code = err.code();
    let message = format!("{}: {err}", code.as_str());
    let grpc = match (code, err.kind()) {
        (_, ErrorKind::Unavailable) => Code::Unavailable,
        (C::InvalidParameter, _) => Code::InvalidArgument,
        (C::ContainerNotFound, _) => Code::NotFound,
        (C::PermissionDenied, _) => Code::PermissionDenied,
        (C::ContainerNotRunning, _) => Code::FailedPrecondition,
        (C::SnapshotInProgress, _) => Code::AlreadyExists,
        (C::PauseTimeout, _) => Code::DeadlineExceeded,
        _ => {
            tracing::error!(error = %message, "commit failed");
            Code::Internal
        }
    };
    let detail = crate::proto::ErrorDetail {
        code: code.as_str().to_string(),
    };
    tonic::Status::with_details(grpc, message, detail.encode_to_vec().into())
}

/// The error code a status carries in its details, if it carries one.
pub fn error_code(status: &tonic::Status) -> Option<String> {
    use prost::Message as _;
    let detail = crate::proto::ErrorDetail::decode(status.details()).ok()?;
    (!detail.code.is_empty()).then_some(detail.code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::CommitError;

    #[test]
    fn commit_errors_carry_their_code_typed_in_the_details() {
        let status = commit_status(CommitError::from(crate::capture::CaptureError::InProgress {
            container: "c1".into(),
        }));
        assert_eq!(status.code(), tonic::Code::AlreadyExists);
        assert_eq!(error_code(&status).as_deref(), Some("SNAPSHOT_IN_PROGRESS"));
        assert_eq!(
            status.message(),
            "SNAPSHOT_IN_PROGRESS: a commit of container c1 is already in progress"
        );
        let bad = commit_status(CommitError::InvalidParameter("target is empty".into()));
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert_eq!(error_code(&bad).as_deref(), Some("INVALID_PARAMETER"));
        // A status without details has no code, whatever its message says.
        assert_eq!(error_code(&tonic::Status::internal("PERMISSION_DENIED: x")), None);
    }
}
