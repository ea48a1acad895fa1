//! Scratch files of the catalogue's writers (compressed blobs before
//! upload, layers and imports of archives, process images): private,
//! in the storage's work directory, deleted when dropped.

use std::path::Path;

use super::{Catalogue, CatalogueError};
use crate::error::io_err;

impl Catalogue {
    /// The scratch directory of this storage's writers, created if need be.
    pub(in crate::checkpoint) fn scratch_dir(&self) -> Result<&Path, CatalogueError> {
        std::fs::create_dir_all(&self.work).map_err(io_err("create directory", &self.work))?;
        Ok(&self.work)
    }
}

/// A private scratch file, deleted when dropped.
pub(in crate::checkpoint) struct StagedFile {
    pub path: std::path::PathBuf,
    pub file: std::fs::File,
}

impl StagedFile {
    pub(super) fn create(dir: &Path) -> std::io::Result<StagedFile> {
        StagedFile::create_named(dir, "blob")
    }

    /// A new scratch file in `dir`, named `<prefix>-<pid>-<n>`.
    pub(in crate::checkpoint) fn create_named(dir: &Path, prefix: &str) -> std::io::Result<StagedFile> {
        use std::os::unix::fs::OpenOptionsExt;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{prefix}-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        Ok(StagedFile { path, file })
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
