//! containerd's snapshotter: snapshot directories on btrfs (or a
//! loop-mounted pool) in [`storage`], their metadata in a redb database with
//! one transaction per operation in [`store`], containerd's snapshotter rules
//! in [`snapshotter`], containerd's filter language in [`filter`], and the
//! wire-neutral types in [`model`].
//!
//! Knows nothing of gRPC, captures, commits or checkpoints. Freezing and
//! capturing containers is [`crate::capture`]'s; this layer only says where
//! the capture of an active snapshot goes and whether btrfs makes it in
//! O(1). The record tables of subsystems above live in the same database as
//! typed [`store::Records`] their owners build.

pub mod filter;
pub mod model;
pub mod snapshotter;
pub mod storage;
pub mod store;
