//! The one place errors become `tonic::Status`. containerd's proxy client maps
//! these codes back to its `errdefs` (NotFound, AlreadyExists, ...).

use crate::error::{Classify, ErrorKind};

pub fn to_status<E: Classify + std::fmt::Display>(err: E) -> tonic::Status {
    let message = err.to_string();
    let kind = err.kind();
    if kind == ErrorKind::Internal {
        tracing::error!(error = %message, "internal error");
    }
    tonic::Status::new(crate::api::codes::kind_grpc(kind), message)
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
    use prost::Message as _;
    use tonic::Code;
    let code = err.code();
    let message = format!("{}: {err}", code.as_str());
    // A failure that may pass (containerd briefly away) is retried by
    // clients whatever its commit code.
    let grpc = match err.kind() {
        ErrorKind::Unavailable => Code::Unavailable,
        _ => crate::api::codes::commit_surface(code).grpc,
    };
    if grpc == Code::Internal {
        tracing::error!(error = %message, "commit failed");
    }
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
