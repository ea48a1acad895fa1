//! The one table of how a failure shows on each surface: the gRPC code of
//! the Control API, the HTTP status of the REST API and `checkpointctl`'s
//! exit status. `grpc::status` builds statuses from it, `rest` its
//! responses, and the CLI its exit codes; none of them maps on its own.
//!
//! Exit statuses: 0 ok, 1 general, 2 bad arguments, 3 container not found,
//! 4 permission, 5 network.

use tonic::Code;

use crate::commit::CommitCode;
use crate::error::ErrorKind;

/// How one commit error code shows: gRPC code, HTTP status, and the CLI's
/// exit status when the code has one of its own (else the gRPC code's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Surface {
    pub grpc: Code,
    pub http: u16,
    pub exit: Option<u8>,
}

/// Every commit code, for readers that parse one back from its name.
pub const COMMIT_CODES: [CommitCode; 10] = [
    CommitCode::InvalidParameter,
    CommitCode::ContainerNotFound,
    CommitCode::PermissionDenied,
    CommitCode::ContainerNotRunning,
    CommitCode::SnapshotInProgress,
    CommitCode::SnapshotNotFound,
    CommitCode::PauseTimeout,
    CommitCode::AtomicSwitchFailed,
    CommitCode::BackgroundProcessingFailed,
    CommitCode::InternalError,
];

/// The surfaces of commit error code `code`.
pub fn commit_surface(code: CommitCode) -> Surface {
    let (grpc, http, exit) = match code {
        CommitCode::InvalidParameter => (Code::InvalidArgument, 400, Some(2)),
        CommitCode::ContainerNotFound => (Code::NotFound, 404, Some(3)),
        CommitCode::PermissionDenied => (Code::PermissionDenied, 403, Some(4)),
        // 400, as the seamless-commit reference has it.
        CommitCode::ContainerNotRunning => (Code::FailedPrecondition, 400, None),
        CommitCode::SnapshotInProgress => (Code::AlreadyExists, 409, None),
        // Exit 3 is for a container; an unknown job is a general failure.
        CommitCode::SnapshotNotFound => (Code::NotFound, 404, Some(1)),
        CommitCode::PauseTimeout => (Code::DeadlineExceeded, 500, None),
        CommitCode::AtomicSwitchFailed | CommitCode::BackgroundProcessingFailed | CommitCode::InternalError => {
            (Code::Internal, 500, None)
        }
    };
    Surface { grpc, http, exit }
}

/// The commit code named `name` (as `CommitCode::as_str` spells it).
pub fn parse_commit_code(name: &str) -> Option<CommitCode> {
    COMMIT_CODES.into_iter().find(|c| c.as_str() == name)
}

/// The gRPC code of an error of class `kind` that carries no commit code.
pub fn kind_grpc(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The CLI's exit status for a failed call: the typed commit code's own,
/// if the status carried one that has one, else the gRPC code's.
pub fn exit_status(typed: Option<&str>, grpc: Code) -> u8 {
    typed
        .and_then(parse_commit_code)
        .and_then(|code| commit_surface(code).exit)
        .unwrap_or(match grpc {
            Code::InvalidArgument => 2,
            Code::NotFound => 3,
            // A node that refused the token.
            Code::PermissionDenied | Code::Unauthenticated => 4,
            Code::Unavailable => 5,
            _ => 1,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_surfaces_and_parses_back() {
        for code in COMMIT_CODES {
            assert_eq!(parse_commit_code(code.as_str()), Some(code));
            let surface = commit_surface(code);
            assert!((400..600).contains(&surface.http), "{code:?}");
            assert_ne!(surface.grpc, Code::Ok, "{code:?}");
        }
        assert_eq!(parse_commit_code("NO_SUCH_CODE"), None);
    }

    #[test]
    fn exit_statuses_follow_the_typed_code_then_the_grpc_code() {
        assert_eq!(exit_status(Some("INVALID_PARAMETER"), Code::Internal), 2);
        assert_eq!(exit_status(Some("CONTAINER_NOT_FOUND"), Code::Internal), 3);
        assert_eq!(exit_status(Some("PERMISSION_DENIED"), Code::Internal), 4);
        // Codes without an exit of their own fall back to the gRPC code.
        assert_eq!(exit_status(Some("PAUSE_TIMEOUT"), Code::Unavailable), 5);
        assert_eq!(exit_status(Some("SNAPSHOT_IN_PROGRESS"), Code::AlreadyExists), 1);
        assert_eq!(exit_status(Some("SNAPSHOT_NOT_FOUND"), Code::NotFound), 1);
        assert_eq!(exit_status(Some("PAUSE_TIMEOUT"), Code::DeadlineExceeded), 1);
        assert_eq!(exit_status(None, Code::NotFound), 3);
        assert_eq!(exit_status(None, Code::Unauthenticated), 4);
        assert_eq!(exit_status(Some("BOGUS"), Code::InvalidArgument), 2);
        assert_eq!(exit_status(None, Code::Unknown), 1);
    }
}
