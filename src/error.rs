//! The error classes every module maps its errors onto. The gRPC layer turns a
//! class into a `tonic::Status` code in one place (`grpc::status`); nothing else
//! in the library knows about gRPC.

/// What kind of failure an error is, as containerd's `errdefs` classifies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    Unavailable,
    Internal,
}

/// Implemented by every module's error enum.
pub trait Classify {
    fn kind(&self) -> ErrorKind;
}
