//! OCI images and where they live: the distribution registry client (bounded
//! reads, retries, per-endpoint TLS and mirrors from containerd-style
//! `hosts.toml`), Docker's `config.json` and credential helpers, images read
//! from containerd's content store, OCI layer tars written from overlay
//! upper directories (`layer`) through the one layer tar writer
//! (`layer_tar`, which checkpoint archives use too), and the gzip/zstd
//! encoders and decoders every layer and blob stream goes through
//! (`compress`), and pulls of images into containerd unpacked on a
//! snapshotter with the labels remote snapshotters need (`pull`).
//!
//! Knows nothing of snapshots, jobs, chains or checkpoints: callers hand in
//! directories and blobs and get back digests.

pub mod compress;
pub mod content;
pub mod credentials;
pub mod digest;
pub mod layer;
pub mod layer_tar;
pub mod overlay;
pub mod pull;
pub mod registry;
