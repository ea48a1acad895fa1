//! gRPC surfaces of the daemon. Handlers only unwrap the request, delegate to
//! the domain on the blocking pool, and wrap the answer.

pub mod control;
pub mod convert;
pub mod remote;
pub mod snapshots;
pub mod status;
