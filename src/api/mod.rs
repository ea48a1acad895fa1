//! The daemon's surfaces: gRPC adapters ([`grpc`]: containerd's snapshots
//! API, our Control API, the remote allow-list, errors as gRPC statuses),
//! the one table of how a failure shows as gRPC code, HTTP status and CLI
//! exit status ([`codes`]), the REST API ([`rest`]), the TCP listener and its bounds
//! ([`connections`], [`remote`]), the server that binds them ([`server`]),
//! the embedding client ([`client`]) and logging ([`telemetry`]).
//!
//! Adapters convert wire requests into domain requests and back; no domain
//! rule lives here.

pub mod client;
pub mod codes;
pub mod connections;
pub mod grpc;
pub mod remote;
pub mod rest;
pub mod server;
pub mod telemetry;
