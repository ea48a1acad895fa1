//! The host: everything this daemon asks of the machine and of the programs
//! beside it. Every syscall goes through the [`sys::SystemOps`] trait (mounts,
//! btrfs ioctls, the freezer), so that the layers above are tested against a
//! recording double. Also here: cgroup paths and usage samples, running runc
//! and CRIU bounded in time, containerd's own API (containers, tasks, leases,
//! content), Docker's engine API, and files that hold secrets.
//!
//! Knows nothing of snapshots, images, commits or checkpoints: it imports
//! nothing of this crate but [`crate::error`] and [`crate::config`].

pub mod cgroup;
pub mod containerd;
pub mod criu;
pub mod docker;
pub mod private_file;
pub mod stats;
pub mod sys;
