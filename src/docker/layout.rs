//! The reference's storage layout, `<dir>/<container>/<name>/`, holding
//! `container.json`, CRIU's images and `dump.log` flat, `restore.log` once
//! restored, and ours besides: `rootfs-diff/` (the writable layer) and
//! `SHA256SUMS` (every file's digest, in `sha256sum`'s format).
//!
//! Memory dumps hold secrets: every directory is 0700 and every file 0600,
//! owned by root. A base directory that is a symlink, or that anyone but
//! its owner may write, is refused, for writing and for reading alike: a
//! checkpoint others could have changed is not restored.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::DockerCheckpointError;
use crate::error::io_err;

/// The container's record: the engine's inspect answer.
pub const RECORD: &str = "container.json";
/// The copy of the container's writable layer.
pub const ROOTFS_DIFF: &str = "rootfs-diff";
/// Digests of every regular file, written last.
pub const SUMS: &str = "SHA256SUMS";
pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";

/// Files of ours in a checkpoint directory: everything else is CRIU's and
/// goes to the engine on restore.
const OURS: [&str; 5] = [RECORD, ROOTFS_DIFF, SUMS, DUMP_LOG, RESTORE_LOG];

/// One checkpoint's directory.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    path: PathBuf,
}

fn layout_err(path: &Path, reason: impl Into<String>) -> DockerCheckpointError {
    DockerCheckpointError::Layout {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Refuses `path` unless it is a real directory (not a symlink) owned by
/// root (or by whoever runs us) that no one else may write.
fn check_private_dir(path: &Path) -> Result<(), DockerCheckpointError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if meta.file_type().is_symlink() {
        return Err(layout_err(path, "is a symlink: name the real directory"));
    }
    if !meta.is_dir() {
        return Err(layout_err(path, "is not a directory"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(layout_err(path, format!("is owned by uid {}, not by root", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(layout_err(
            path,
            format!(
                "is writable by others (mode {:o}): checkpoints hold memory dumps; use a directory only root can write",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Makes `path` a new 0700 directory, or checks the one there.
fn ensure_private_dir(path: &Path) -> Result<(), DockerCheckpointError> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_private_dir(path),
        Err(e) => Err(io_err("create", path)(e).into()),
    }
}

impl CheckpointDir {
    /// Creates `<dir>/<container>/<name>/` for a new checkpoint; `dir` is
    /// created (0700) when missing, and a checkpoint of that name must not
    /// exist. `container` and `name` are single path components.
    pub fn create(dir: &Path, container: &str, name: &str) -> Result<CheckpointDir, DockerCheckpointError> {
        check_component(container)?;
        check_component(name)?;
        if !dir.is_absolute() {
            return Err(layout_err(dir, "must be an absolute path"));
        }
        match fs::symlink_metadata(dir) {
            Ok(_) => check_private_dir(dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(dir)
                    .map_err(io_err("create", dir))?;
                check_private_dir(dir)?;
            }
            Err(e) => return Err(io_err("inspect", dir)(e).into()),
        }
        let of_container = dir.join(container);
        ensure_private_dir(&of_container)?;
        let path = of_container.join(name);
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => Ok(CheckpointDir { path }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                check_private_dir(&path)?;
                if fs::symlink_metadata(path.join(SUMS)).is_ok() {
                    return Err(DockerCheckpointError::Exists {
                        container: container.into(),
                        name: name.into(),
                        path: path.display().to_string(),
                    });
                }
                // Never sealed: what a failed or killed checkpoint left.
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io_err("create", &path))?;
                Ok(CheckpointDir { path })
            }
            Err(e) => Err(io_err("create", &path)(e).into()),
        }
    }

    /// The existing checkpoint `<dir>/<container>/<name>/`, each level
    /// checked as [`CheckpointDir::create`] leaves it.
    pub fn open(dir: &Path, container: &str, name: &str) -> Result<CheckpointDir, DockerCheckpointError> {
        check_component(container)?;
        check_component(name)?;
        let path = dir.join(container).join(name);
        if fs::symlink_metadata(&path).is_err() {
            return Err(DockerCheckpointError::NoCheckpoint {
                container: container.into(),
                name: name.into(),
                path: path.display().to_string(),
            });
        }
        for level in [dir.to_path_buf(), dir.join(container), path.clone()] {
            check_private_dir(&level)?;
        }
        Ok(CheckpointDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes the new file `name` (0600).
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), DockerCheckpointError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.join(name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err("create", &path))?;
        file.write_all(bytes).map_err(io_err("write", &path))?;
        Ok(())
    }

    /// Makes every file CRIU left 0600 (the top level only: `rootfs-diff`
    /// keeps the container's own modes, its root's included, behind this
    /// directory's 0700).
    pub fn make_private(&self) -> Result<(), DockerCheckpointError> {
        for entry in fs::read_dir(&self.path).map_err(io_err("list", &self.path))? {
            let entry = entry.map_err(io_err("list", &self.path))?;
            if entry.file_name() == ROOTFS_DIFF {
                continue;
            }
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
            let mode = if meta.is_dir() {
                0o700
            } else if meta.is_file() {
                0o600
            } else {
                return Err(layout_err(&path, "is neither a file nor a directory"));
            };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &path))?;
        }
        Ok(())
    }

    /// CRIU's files, which the engine restores from: every top-level
    /// regular file but ours.
    pub fn criu_files(&self) -> Result<Vec<String>, DockerCheckpointError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_err("list", &self.path))? {
            let entry = entry.map_err(io_err("list", &self.path))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if OURS.contains(&name.as_str()) {
                continue;
            }
            let meta = fs::symlink_metadata(entry.path()).map_err(io_err("inspect", &entry.path()))?;
            if !meta.is_file() || check_component(&name).is_err() {
                return Err(DockerCheckpointError::Damaged {
                    path: self.path.display().to_string(),
                    reason: format!("unexpected entry {name:?}: CRIU writes plain files only"),
                });
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    /// Writes `SHA256SUMS` over every regular file (CRIU's, ours and the
    /// writable layer's), in parallel over `threads`.
    pub fn seal(&self, threads: usize) -> Result<(), DockerCheckpointError> {
        let files = self.regular_files()?;
        let digests = digest_all(&self.path, &files, threads)?;
        let mut text = String::new();
        for (name, digest) in files.iter().zip(digests) {
            text.push_str(&format!("{digest}  {name}\n"));
        }
        self.write_file(SUMS, text.as_bytes())
    }

    /// Checks every file against `SHA256SUMS`: none missing, none changed,
    /// none added.
    pub fn check_sums(&self, threads: usize) -> Result<(), DockerCheckpointError> {
        let damaged = |reason: String| DockerCheckpointError::Damaged {
            path: self.path.display().to_string(),
            reason,
        };
        let sums = fs::read_to_string(self.join(SUMS)).map_err(|e| {
            damaged(format!(
                "{SUMS}: {e} (a checkpoint written by docker-checkpoint has one)"
            ))
        })?;
        let mut expected = std::collections::BTreeMap::new();
        for line in sums.lines() {
            let (digest, name) = line
                .split_once("  ")
                .filter(|(d, _)| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| damaged(format!("{SUMS}: malformed line {line:?}")))?;
            expected.insert(name.to_string(), digest.to_ascii_lowercase());
        }
        let files = self.regular_files()?;
        let listed: Vec<String> = files.iter().filter(|f| f.as_str() != SUMS).cloned().collect();
        for name in &listed {
            if !expected.contains_key(name) && name != RESTORE_LOG {
                return Err(damaged(format!("{name} is not listed in {SUMS}")));
            }
        }
        let checked: Vec<String> = expected.keys().cloned().collect();
        for name in &checked {
            if !listed.contains(name) {
                return Err(damaged(format!("{name} is missing")));
            }
        }
        let digests = digest_all(&self.path, &checked, threads)?;
        for (name, digest) in checked.iter().zip(digests) {
            if expected[name] != digest {
                return Err(damaged(format!("{name} does not match its digest in {SUMS}")));
            }
        }
        Ok(())
    }

    /// Every regular file under the directory, relative, sorted;
    /// `restore.log` (written after the seal) is left out.
    fn regular_files(&self) -> Result<Vec<String>, DockerCheckpointError> {
        let mut out = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = self.path.join(&rel);
            for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
                let entry = entry.map_err(io_err("list", &dir))?;
                let child = rel.join(entry.file_name());
                let meta = fs::symlink_metadata(entry.path()).map_err(io_err("inspect", &entry.path()))?;
                if meta.is_dir() {
                    stack.push(child);
                } else if meta.is_file() {
                    let name = child.to_str().ok_or_else(|| DockerCheckpointError::Damaged {
                        path: self.path.display().to_string(),
                        reason: format!("{} is not UTF-8", child.display()),
                    })?;
                    if name != RESTORE_LOG && !name.contains('\n') {
                        out.push(name.to_string());
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The SHA-256 (hex) of each of `files` under `root`, `threads` at a time.
fn digest_all(root: &Path, files: &[String], threads: usize) -> Result<Vec<String>, DockerCheckpointError> {
    let threads = threads.clamp(1, 16);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<String, DockerCheckpointError>>>> =
        files.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(name) = files.get(i) else { break };
                let digest = digest_file(&root.join(name));
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(digest);
                }
            });
        }
    });
    results
        .into_iter()
        .zip(files)
        .map(|(slot, name)| {
            slot.into_inner().ok().flatten().unwrap_or_else(|| {
                Err(DockerCheckpointError::Damaged {
                    path: name.clone(),
                    reason: "its digest could not be taken".into(),
                })
            })
        })
        .collect()
}

fn digest_file(path: &Path) -> Result<String, DockerCheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(crate::oci::digest::hex(&hasher.finalize()))
}

/// A single path component: not empty, not `.` or `..`, no `/` or NUL.
fn check_component(name: &str) -> Result<(), DockerCheckpointError> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0']);
    if ok {
        Ok(())
    } else {
        Err(layout_err(Path::new(name), "is not a single path component"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoints");
        (tmp, dir)
    }

    #[test]
    fn a_new_checkpoint_is_private_and_never_replaces_one() {
        let (_tmp, dir) = base();
        let cp = CheckpointDir::create(&dir, "testapp", "checkpoint1").unwrap();
        for level in [dir.clone(), dir.join("testapp"), cp.path().to_path_buf()] {
            assert_eq!(fs::metadata(&level).unwrap().mode() & 0o777, 0o700, "{level:?}");
        }
        cp.write_file("core-1.img", b"core").unwrap();
        cp.make_private().unwrap();
        assert_eq!(fs::metadata(cp.join("core-1.img")).unwrap().mode() & 0o777, 0o600);
        // Not sealed yet (a failed checkpoint): replaced.
        let again = CheckpointDir::create(&dir, "testapp", "checkpoint1").unwrap();
        assert!(!again.join("core-1.img").exists());
        again.seal(1).unwrap();
        assert!(matches!(
            CheckpointDir::create(&dir, "testapp", "checkpoint1"),
            Err(DockerCheckpointError::Exists { .. })
        ));
        assert!(CheckpointDir::create(&dir, "testapp", "../x").is_err());
        assert!(CheckpointDir::create(Path::new("relative"), "a", "b").is_err());
    }

    #[test]
    fn a_symlinked_or_shared_base_directory_is_refused() {
        let (tmp, dir) = base();
        fs::create_dir(&dir).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = CheckpointDir::create(&link, "c", "n").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let err = CheckpointDir::create(&dir, "c", "n").unwrap_err();
        assert!(err.to_string().contains("writable by others"), "{err}");
        assert!(matches!(
            CheckpointDir::open(&dir, "c", "n"),
            Err(DockerCheckpointError::NoCheckpoint { .. })
        ));
    }

    #[test]
    fn sums_catch_a_changed_a_missing_and_an_added_file() {
        let (_tmp, dir) = base();
        let cp = CheckpointDir::create(&dir, "c", "n").unwrap();
        cp.write_file("pages-1.img", &[7u8; 5000]).unwrap();
        cp.write_file(RECORD, b"{}").unwrap();
        fs::create_dir_all(cp.join(ROOTFS_DIFF).join("tmp")).unwrap();
        fs::write(cp.join(ROOTFS_DIFF).join("tmp/data"), b"x").unwrap();
        cp.seal(2).unwrap();
        cp.check_sums(2).unwrap();
        assert_eq!(cp.criu_files().unwrap(), ["pages-1.img"]);
        // restore.log comes after the seal and is not checked.
        cp.write_file(RESTORE_LOG, b"log").unwrap();
        cp.check_sums(2).unwrap();

        fs::write(cp.join("pages-1.img"), [8u8; 5000]).unwrap();
        let err = cp.check_sums(2).unwrap_err();
        assert!(err.to_string().contains("pages-1.img does not match"), "{err}");
        fs::write(cp.join("pages-1.img"), [7u8; 5000]).unwrap();
        fs::write(cp.join(ROOTFS_DIFF).join("tmp/extra"), b"y").unwrap();
        let err = cp.check_sums(2).unwrap_err();
        assert!(err.to_string().contains("rootfs-diff/tmp/extra is not listed"), "{err}");
        fs::remove_file(cp.join(ROOTFS_DIFF).join("tmp/extra")).unwrap();
        fs::remove_file(cp.join(ROOTFS_DIFF).join("tmp/data")).unwrap();
        let err = cp.check_sums(2).unwrap_err();
        assert!(err.to_string().contains("rootfs-diff/tmp/data is missing"), "{err}");
    }
}
