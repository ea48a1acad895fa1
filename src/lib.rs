//! seamless-snapshotter: a containerd proxy snapshotter on overlayfs whose
//! writable layers live on btrfs, so that a running container can be committed
//! with a pause of milliseconds.
//!
//! The crate is layered; each layer is a folder whose module doc says what it
//! owns and what it must not know, and a layer imports only the layers below
//! it (`.ci/layering` fails the build otherwise). Bottom up:
//!
//! - [`error`], [`config`], [`time`], [`units`], [`namespace`]: the shared
//!   vocabulary of failure classes, the daemon's configuration as plain
//!   data, RFC 3339 times, sizes and durations as people write them, and
//!   containerd's namespace rule;
//! - [`host`]: syscalls, cgroups, runc, CRIU, containerd's API and
//!   Docker's engine API;
//! - [`oci`]: registries, credentials, image content and OCI layer tars;
//! - [`nydus`]: RAFS builds and running Nydus images;
//! - [`snapshot`]: containerd's snapshotter on btrfs and its metadata store;
//! - [`capture`]: freezing a container around an O(1) snapshot;
//! - [`docker`]: Docker Engine containers checkpointed with their processes
//!   and writable layer into a directory, and restored through the engine;
//! - [`commit`] and [`checkpoint`], side by side: seamless commits, and the
//!   checkpoint catalogue with its restore;
//! - [`api`]: gRPC, REST, the TCP listener, the server and the client.
//!
//! ARCHITECTURE.md at the top of the repository walks through the main flows.

pub mod api;
pub mod capture;
pub mod checkpoint;
pub mod commit;
pub mod config;
pub mod docker;
pub mod error;
pub mod host;
pub mod namespace;
pub mod nydus;
pub mod oci;
pub mod snapshot;
pub mod time;
pub mod units;

/// Generated code of proto/seamless/v1/control.proto.
pub mod proto {
    #![allow(clippy::derive_partial_eq_without_eq, missing_docs)]
    tonic::include_proto!("seamless.v1");
}
