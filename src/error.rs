//! The error classes every module maps its errors onto. The gRPC layer turns a
//! class into a `tonic::Status` code in one place (`api::grpc::status`); nothing else
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

/// A failed filesystem call: what was being done, to which path, and the
/// error the system gave. Module errors carry it as
/// `#[error(transparent)] Io(#[from] IoError)` and build it with [`io_err`].
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct IoError {
    pub op: &'static str,
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// The `map_err` argument for a filesystem call on `path`:
/// `fs::read(p).map_err(io_err("read", p))?` (the `?` turns the [`IoError`]
/// into the module's error).
pub fn io_err(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.display().to_string();
    move |source| IoError { op, path, source }
}
