//! containerd's snapshotter: snapshot directories on btrfs (or a
//! loop-mounted pool) in [`storage`], their metadata in a redb database with
//! one transaction per operation in [`store`], containerd's snapshotter rules
//! in [`snapshotter`], containerd's filter language in [`filter`], and the
//! wire-neutral types in [`model`].
//!
//! Knows nothing of gRPC, commits or checkpoints. Freezing containers is
//! [`crate::capture`]'s; this layer only makes the O(1) read-only snapshot
//! of an active snapshot's upper directory.

pub mod filter;
pub mod model;
pub mod snapshotter;
pub mod storage;
pub mod store;
