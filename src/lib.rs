//! seamless-snapshotter: a containerd proxy snapshotter on overlayfs whose
//! writable layers live on btrfs, so that a running container can be committed
//! with a pause of milliseconds.
//!
//! Layers, bottom up: `sys` (the only syscalls), `storage` (snapshot
//! directories), `store` (metadata), `snapshotter` (containerd's rules),
//! `grpc` (wire adapters), `server` (socket and serving).

pub mod capture;
pub mod cgroup;
pub mod chain;
pub mod checkpoint;
pub mod client;
pub mod commit;
pub mod config;
pub mod connections;
pub mod containerd;
pub mod content;
pub mod credentials;
pub mod criu;
pub mod error;
pub mod filter;
pub mod grpc;
pub mod layer;
pub mod metrics;
pub mod model;
pub mod nydus;
pub mod nydus_image;
pub mod private_file;
pub mod rafs_fuse;
pub mod rafs_mount;
pub mod registry;
pub mod remote;
pub mod rest;
pub mod server;
pub mod snapshotter;
pub mod stats;
pub mod storage;
pub mod store;
pub mod sys;
pub mod telemetry;

/// Generated code of proto/seamless/v1/control.proto.
pub mod proto {
    #![allow(clippy::derive_partial_eq_without_eq, missing_docs)]
    tonic::include_proto!("seamless.v1");
}
