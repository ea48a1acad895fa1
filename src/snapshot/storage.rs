//! Where snapshot directories live and how they are made and removed.
//!
//! Each snapshot owns `<base>/snapshots/<id>/` holding `fs` (the overlay upper
//! or the layer's content) and, for active snapshots, `work`. On btrfs the
//! active snapshot's directory is one subvolume, so upper and work share it
//! (overlay copy-up fails with EXDEV otherwise) and the next issue's seamless
//! commit can snapshot it in O(1). `base` is the root itself, or the root's
//! loop-mounted btrfs pool. This module decides nothing about snapshot
//! semantics; it never reads the metadata store.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{BackendChoice, PoolSize};
use crate::error::{io_err, Classify, ErrorKind, IoError};
use crate::host::sys::{FsType, SysError, SystemOps};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("storage backend btrfs needs the root {root} on btrfs, but it is not; use backend \"pool\" or \"auto\"")]
    NotBtrfs { root: String },
    #[error("btrfs pool {image}: {reason}")]
    Pool { image: String, reason: String },
}

impl Classify for StorageError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

/// What serves the writable layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// The root is on btrfs: one subvolume per active snapshot.
    Btrfs,
    /// The root is not btrfs: a btrfs image under the root, loop-mounted.
    BtrfsPool,
    /// Plain directories: correct, but a seamless commit must copy.
    Directory,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Btrfs => "btrfs",
            StorageKind::BtrfsPool => "btrfs-pool",
            StorageKind::Directory => "directory",
        }
    }

    fn uses_subvolumes(self) -> bool {
        !matches!(self, StorageKind::Directory)
    }
}

/// Whether a snapshot directory needs an overlay work directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    Active,
    View,
}

/// The pool image's file name under the root, and its mount point.
pub const POOL_IMAGE: &str = "pool.img";
pub const POOL_MOUNT: &str = "pool";
const SNAPSHOTS: &str = "snapshots";
/// Read-only captures of writable layers, beside `snapshots` on the same
/// btrfs filesystem (a snapshot cannot cross filesystems).
const CAPTURES: &str = "captures";
const GIB: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct Storage {
    kind: StorageKind,
    snapshots: PathBuf,
    captures: PathBuf,
    /// Private scratch space of background jobs (commit layers are built
    /// here unless a request names its own directory).
    scratch: PathBuf,
    sys: Arc<dyn SystemOps>,
}

/// Scratch space of background jobs, under the root (not the pool: a
/// layer being built must not eat the space of writable layers).
const SCRATCH: &str = "commit-work";

/// Creates `path` with `mode` if missing and enforces the mode if present.
fn ensure_dir(path: &Path, mode: u32) -> Result<(), StorageError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))?;
    Ok(())
}

impl Storage {
    /// Chooses and prepares the storage under `root` (creating it 0700).
    pub fn open(
        root: &Path,
        choice: BackendChoice,
        pool_size: PoolSize,
        sys: Arc<dyn SystemOps>,
    ) -> Result<Storage, StorageError> {
        ensure_dir(root, 0o700)?;
        let root_is_btrfs = sys.fs_type(root)? == FsType::Btrfs;
        let kind = match choice {
            BackendChoice::Directory => StorageKind::Directory,
            BackendChoice::Btrfs if root_is_btrfs => StorageKind::Btrfs,
            BackendChoice::Btrfs => {
                return Err(StorageError::NotBtrfs {
                    root: root.display().to_string(),
                })
            }
            BackendChoice::Auto if root_is_btrfs => StorageKind::Btrfs,
            BackendChoice::Auto | BackendChoice::Pool => StorageKind::BtrfsPool,
        };
        let base = if kind == StorageKind::BtrfsPool {
            open_pool(root, pool_size, sys.as_ref())?
        } else {
            root.to_path_buf()
        };
        let snapshots = base.join(SNAPSHOTS);
        ensure_dir(&snapshots, 0o700)?;
        let captures = base.join(CAPTURES);
        ensure_dir(&captures, 0o700)?;
        let scratch = root.join(SCRATCH);
        ensure_dir(&scratch, 0o700)?;
        Ok(Storage {
            kind,
            snapshots,
            captures,
            scratch,
            sys,
        })
    }

    pub fn kind(&self) -> StorageKind {
        self.kind
    }

    /// The directory holding every snapshot directory.
    pub fn snapshots_dir(&self) -> &Path {
        &self.snapshots
    }

    /// Where read-only captures of writable layers are kept.
    pub fn captures_dir(&self) -> &Path {
        &self.captures
    }

    /// The daemon's private scratch directory (0700, beneath the root).
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Whether a writable layer can be captured in O(1) (a btrfs snapshot).
    pub fn supports_capture(&self) -> bool {
        self.kind.uses_subvolumes()
    }

    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    pub fn upper_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Creates the directory of snapshot `id`; `owner` is given to `fs` so a
    /// child layer starts with its parent's root ownership, as containerd does.
    pub fn create_snapshot_dir(&self, id: u64, kind: DirKind, owner: Option<(u32, u32)>) -> Result<(), StorageError> {
        let dir = self.snapshot_dir(id);
        if fs::symlink_metadata(&dir).is_ok() {
            // Left by a crashed transaction that never referenced it.
            self.remove_snapshot_dir_path(&dir)?;
        }
        if kind == DirKind::Active && self.kind.uses_subvolumes() {
            self.sys.create_subvolume(&dir)?;
        } else {
            fs::create_dir(&dir).map_err(io_err("create directory", &dir))?;
        }
        let made = (|| {
            let upper = dir.join("fs");
            DirBuilder::new()
                .mode(0o755)
                .create(&upper)
                .map_err(io_err("create directory", &upper))?;
            // The root of a new container is 0755 whatever our umask is.
            fs::set_permissions(&upper, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &upper))?;
            if kind == DirKind::Active {
                let work = dir.join("work");
                DirBuilder::new()
                    .mode(0o711)
                    .create(&work)
                    .map_err(io_err("create directory", &work))?;
            }
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(&upper, Some(uid), Some(gid)).map_err(io_err("chown", &upper))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = self.remove_snapshot_dir_path(&dir);
            return Err(e);
        }
        Ok(())
    }

    pub fn remove_snapshot_dir(&self, id: u64) -> Result<(), StorageError> {
        self.remove_snapshot_dir_path(&self.snapshot_dir(id))
    }

    fn remove_snapshot_dir_path(&self, dir: &Path) -> Result<(), StorageError> {
        if self.kind.uses_subvolumes() {
            match self.sys.delete_subvolume(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_not_subvolume() => {}
                Err(e) => return Err(e.into()),
            }
        }
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", dir)(e).into()),
        }
    }

    /// Entries under the snapshots directory that are not a snapshot id in
    /// `referenced`: leftovers of crashes or removals, safe to delete.
    pub fn unreferenced_dirs(&self, referenced: &BTreeSet<u64>) -> Result<Vec<PathBuf>, StorageError> {
        let mut orphans = Vec::new();
        for entry in fs::read_dir(&self.snapshots).map_err(io_err("read directory", &self.snapshots))? {
            let entry = entry.map_err(io_err("read directory", &self.snapshots))?;
            let name = entry.file_name();
            let known = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| referenced.contains(&id));
            if !known {
                orphans.push(entry.path());
            }
        }
        Ok(orphans)
    }

    /// Every entry of the captures directory.
    pub fn captures_on_disk(&self) -> Result<Vec<PathBuf>, StorageError> {
        let mut all = Vec::new();
        for entry in fs::read_dir(&self.captures).map_err(io_err("read directory", &self.captures))? {
            all.push(entry.map_err(io_err("read directory", &self.captures))?.path());
        }
        Ok(all)
    }

    /// Deletes a path returned by [`Storage::unreferenced_dirs`].
    pub fn remove_orphan(&self, path: &Path) -> Result<(), StorageError> {
        self.remove_snapshot_dir_path(path)
    }
}

/// Mounts (creating on first use) the btrfs pool at `<root>/pool`.
fn open_pool(root: &Path, size: PoolSize, sys: &dyn SystemOps) -> Result<PathBuf, StorageError> {
    let mount = root.join(POOL_MOUNT);
    let image = root.join(POOL_IMAGE);
    ensure_dir(&mount, 0o700)?;
    if sys.is_mountpoint(&mount)? {
        if sys.fs_type(&mount)? != FsType::Btrfs {
            return Err(StorageError::Pool {
                image: image.display().to_string(),
                reason: format!("{} is a mount point but not btrfs", mount.display()),
            });
        }
        return Ok(mount);
    }
    if fs::symlink_metadata(&image).is_err() {
        let bytes = match size {
            PoolSize::Bytes(b) => b,
            // Half the free space, whole GiB, at least 1 GiB: sparse, so this
            // reserves nothing until written.
            PoolSize::Auto => ((sys.free_bytes(root)? / 2) / GIB).max(1) * GIB,
        };
        let partial = root.join(format!("{POOL_IMAGE}.new"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(io_err("create", &partial))?;
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", &partial))?;
        file.set_len(bytes).map_err(io_err("size", &partial))?;
        drop(file);
        sys.mkfs_btrfs(&partial, "seamless-pool")?;
        // Only a fully formatted image gets the final name, so a crash here
        // leaves a `.new` file that the next start formats again.
        fs::rename(&partial, &image).map_err(io_err("rename", &partial))?;
    }
    sys.mount_btrfs_image(&image, &mount)?;
    Ok(mount)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::sys::RecordingSystem;

    #[test]
    fn btrfs_root_gives_subvolume_per_active_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = Arc::new(RecordingSystem::btrfs());
        let storage = Storage::open(tmp.path(), BackendChoice::Auto, PoolSize::Auto, sys.clone()).unwrap();
        assert_eq!(storage.kind(), StorageKind::Btrfs);
        storage.create_snapshot_dir(1, DirKind::Active, None).unwrap();
        storage.create_snapshot_dir(2, DirKind::View, None).unwrap();
        let dir1 = tmp.path().join("snapshots/1");
        assert_eq!(sys.calls(), vec![format!("subvolume create {}", dir1.display())]);
        assert!(storage.upper_dir(1).is_dir() && storage.work_dir(1).is_dir());
        assert!(storage.upper_dir(2).is_dir() && !storage.work_dir(2).exists());
        storage.remove_snapshot_dir(1).unwrap();
        assert_eq!(
            sys.calls().last().unwrap(),
            &format!("subvolume delete {}", dir1.display())
        );
        assert!(!dir1.exists());
    }

    #[test]
    fn plain_root_provisions_and_mounts_a_pool_once() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = Arc::new(RecordingSystem::plain());
        let storage = Storage::open(tmp.path(), BackendChoice::Auto, PoolSize::Auto, sys.clone()).unwrap();
        assert_eq!(storage.kind(), StorageKind::BtrfsPool);
        let image = tmp.path().join("pool.img");
        let mount = tmp.path().join("pool");
        // Half of the fake's 10 GiB free space.
        assert_eq!(fs::metadata(&image).unwrap().len(), 5 << 30);
        assert_eq!(fs::metadata(&image).unwrap().permissions().mode() & 0o777, 0o600);
        let calls = sys.calls();
        assert_eq!(
            calls,
            vec![
                format!(
                    "mkfs.btrfs -L seamless-pool {}.new ({} bytes)",
                    image.display(),
                    5u64 << 30
                ),
                format!("mount {} {}", image.display(), mount.display()),
            ]
        );
        assert_eq!(storage.snapshots_dir(), mount.join("snapshots"));
        // Already mounted: reused, not formatted again.
        let again = Storage::open(tmp.path(), BackendChoice::Pool, PoolSize::Bytes(1 << 30), sys.clone()).unwrap();
        assert_eq!(again.kind(), StorageKind::BtrfsPool);
        assert_eq!(sys.calls().len(), 2);
    }

    #[test]
    fn btrfs_backend_refuses_other_filesystems() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Storage::open(
            tmp.path(),
            BackendChoice::Btrfs,
            PoolSize::Auto,
            Arc::new(RecordingSystem::plain()),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("not on btrfs") || err.to_string().contains("is not"),
            "{err}"
        );
    }

    #[test]
    fn directory_backend_and_orphans() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = Arc::new(RecordingSystem::btrfs());
        let storage = Storage::open(tmp.path(), BackendChoice::Directory, PoolSize::Auto, sys.clone()).unwrap();
        assert_eq!(storage.kind(), StorageKind::Directory);
        storage.create_snapshot_dir(7, DirKind::Active, None).unwrap();
        storage.create_snapshot_dir(8, DirKind::Active, None).unwrap();
        fs::create_dir(storage.snapshots_dir().join("new-123")).unwrap();
        assert!(sys.calls().is_empty(), "directory backend made subvolumes");
        let referenced: BTreeSet<u64> = [7].into_iter().collect();
        let mut orphans = storage.unreferenced_dirs(&referenced).unwrap();
        orphans.sort();
        assert_eq!(
            orphans,
            vec![storage.snapshot_dir(8), storage.snapshots_dir().join("new-123")]
        );
        for o in &orphans {
            storage.remove_orphan(o).unwrap();
        }
        assert!(storage.snapshot_dir(7).exists() && !storage.snapshot_dir(8).exists());
        let mode = fs::metadata(storage.snapshots_dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
