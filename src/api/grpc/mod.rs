//! gRPC surfaces of the daemon. Handlers only unwrap the request, delegate to
//! the domain on the blocking pool, and wrap the answer. One conversion
//! module per API: `convert` for containerd's snapshots API,
//! `control_convert` for our Control API's requests.

pub mod control;
pub mod control_convert;
pub mod convert;
pub mod remote;
pub mod snapshots;
pub mod status;
