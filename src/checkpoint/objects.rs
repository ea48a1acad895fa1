//! Where checkpoint data lives: a flat namespace of objects named by
//! `/`-separated keys (`blobs/sha256/<hex>`, `checkpoints/<id>.json`).
//! Every write is atomic: an object is either absent or whole. Owns the
//! storage layout on disk (local, and NFS mounts) and nothing of what the
//! objects mean.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{io_err, IoError};

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("object {key} not found in {store}")]
    NotFound { store: String, key: String },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(
        "object {key} in {store} is larger than {limit} bytes, more than any document the catalogue writes: refused"
    )]
    TooLarge { store: String, key: String, limit: u64 },
}

/// The most [`ObjectStore::get`] reads: it is for documents (indexes,
/// deltas, records), which stay far below; content is streamed with
/// [`ObjectStore::open`]. Storage someone else can write must not make the
/// daemon read an object of any size into memory.
pub const MAX_DOCUMENT: u64 = 1 << 30;

/// Reads `reader` (object `key` of `store`) whole, refusing past `limit`
/// bytes ([`MAX_DOCUMENT`] for `get`).
pub(crate) fn read_document(
    mut reader: impl Read,
    store: &dyn ObjectStore,
    key: &str,
    limit: u64,
) -> Result<Vec<u8>, ObjectError> {
    let mut bytes = Vec::new();
    (&mut reader)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| IoError {
            op: "read",
            path: format!("{} in {}", key, store.describe()),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(ObjectError::TooLarge {
            store: store.describe(),
            key: key.to_string(),
            limit,
        });
    }
    Ok(bytes)
}

impl ObjectError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ObjectError::NotFound { .. })
    }
}

/// Storage of checkpoint objects. Calls block: callers on a runtime use
/// `spawn_blocking`.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Where the store is, for messages (never a secret).
    fn describe(&self) -> String;
    /// Writes `data` as `key`, replacing it atomically.
    fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectError>;
    /// Writes the file at `path` as `key`, atomically.
    fn put_file(&self, key: &str, path: &Path) -> Result<(), ObjectError>;
    /// Object `key` whole, for documents: at most [`MAX_DOCUMENT`] bytes.
    fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError>;
    /// A reader of object `key`.
    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, ObjectError>;
    /// The object's size, or None when it does not exist.
    fn size(&self, key: &str) -> Result<Option<u64>, ObjectError>;
    /// Deletes `key`; deleting a missing object is fine.
    fn delete(&self, key: &str) -> Result<(), ObjectError>;
    /// Keys under `prefix` (a `/`-terminated folder), with their sizes.
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ObjectError>;
    /// A batch of puts that become durable and visible together at
    /// `commit`, each still whole or absent: where a durable write costs a
    /// disk flush (files), a batch of thousands of chunks costs two.
    fn batch(&self) -> Box<dyn PutBatch + '_>;
}

/// Puts made visible together by `commit`; dropping the batch uncommitted
/// discards them. `put` may be called from several threads at once.
pub trait PutBatch: Send + Sync {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectError>;
    fn commit(self: Box<Self>) -> Result<(), ObjectError>;
}

/// A batch whose every put is an ordinary, immediately durable put: for
/// stores where each write is durable anyway (S3).
pub struct ImmediateBatch<'a>(pub &'a dyn ObjectStore);

impl PutBatch for ImmediateBatch<'_> {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectError> {
        self.0.put(key, data)
    }

    fn commit(self: Box<Self>) -> Result<(), ObjectError> {
        Ok(())
    }
}

/// Keys are relative paths of plain components: no `..`, no empty or
/// hidden parts, so that a key never leaves the store's directory.
pub fn validate_key(key: &str) -> Result<(), ObjectError> {
    let invalid = |reason| ObjectError::InvalidKey {
        key: key.chars().take(200).collect(),
        reason,
    };
    if key.is_empty() || key.len() > 512 {
        return Err(invalid("empty or longer than 512 bytes"));
    }
    for part in key.split('/') {
        if part.is_empty() || part.starts_with('.') {
            return Err(invalid("has an empty or hidden component"));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+'))
        {
            return Err(invalid("has characters other than letters, digits and -_.:+"));
        }
    }
    Ok(())
}

/// Objects as files under a directory: the daemon's own disk ("local") or
/// a mounted NFS export ("nfs"). Files are 0600 and directories 0700. A
/// write goes to a uniquely named temporary file in the object's directory,
/// is flushed, and renamed over the object; rename within a directory is
/// atomic on local filesystems and on NFS alike, and no lock or O_EXCL is
/// relied on. Temporaries a crash leaves start with `.tmp-` and are never
/// listed.
#[derive(Debug)]
pub struct DirStore {
    root: PathBuf,
    kind: &'static str,
    counter: AtomicU64,
}

impl DirStore {
    /// Opens (creating 0700) the store at `root`; `kind` names it in
    /// messages ("local" or "nfs").
    pub fn open(root: &Path, kind: &'static str) -> Result<DirStore, ObjectError> {
        create_private_dir(root)?;
        Ok(DirStore {
            root: root.to_path_buf(),
            kind,
            counter: AtomicU64::new(0),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf, ObjectError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn temporary(&self, dir: &Path) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        dir.join(format!(".tmp-{}-{n}", std::process::id()))
    }

    /// Writes object `key` into a new temporary beside it with `fill`, not
    /// flushed; returns the temporary, the object's path and the open file.
    /// A failed fill leaves nothing.
    fn write_temporary(
        &self,
        key: &str,
        fill: impl FnOnce(&mut File, &Path) -> Result<(), ObjectError>,
    ) -> Result<(PathBuf, PathBuf, File), ObjectError> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        create_private_dir(&dir)?;
        let tmp = self.temporary(&dir);
        let filled = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ObjectError::from(io_err("create", &tmp)(e)))
            .and_then(|mut file| fill(&mut file, &tmp).map(|()| file));
        match filled {
            Ok(file) => Ok((tmp, path, file)),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_with(
        &self,
        key: &str,
        fill: impl FnOnce(&mut File, &Path) -> Result<(), ObjectError>,
    ) -> Result<(), ObjectError> {
        let (tmp, path, file) = self.write_temporary(key, fill)?;
        let dir = path.parent().unwrap_or(&self.root);
        let result = (|| {
            file.sync_all().map_err(io_err("sync", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
            // The rename itself reaches the disk with the directory.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", dir))?;
            Ok::<(), ObjectError>(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn not_found(&self, key: &str) -> ObjectError {
        ObjectError::NotFound {
            store: self.describe(),
            key: key.to_string(),
        }
    }

    /// Flushes everything written to the store's filesystem (one call,
    /// whatever the number of files).
    fn sync_filesystem(&self) -> Result<(), ObjectError> {
        let root = File::open(&self.root).map_err(io_err("open", &self.root))?;
        nix::unistd::syncfs(root.as_raw_fd())
            .map_err(|errno| io_err("sync the filesystem of", &self.root)(std::io::Error::from(errno)).into())
    }
}

/// DirStore's batch: each put writes a temporary file without flushing it;
/// `commit` flushes the filesystem once, renames every temporary over its
/// object, and flushes once more for the renames. A crash before the first
/// flush leaves only temporaries, never an object with missing data.
struct DirBatch<'a> {
    store: &'a DirStore,
    /// (temporary, object) of each put.
    pending: std::sync::Mutex<Vec<(PathBuf, PathBuf)>>,
}

impl DirBatch<'_> {
    fn take_pending(&self) -> Vec<(PathBuf, PathBuf)> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl PutBatch for DirBatch<'_> {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectError> {
        let (tmp, path, _) = self.store.write_temporary(key, |file, tmp| {
            Ok(file.write_all(data).map_err(io_err("write", tmp))?)
        })?;
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((tmp, path));
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), ObjectError> {
        let pending = self.take_pending();
        if pending.is_empty() {
            return Ok(());
        }
        let result = (|| {
            self.store.sync_filesystem()?;
            for (tmp, path) in &pending {
                fs::rename(tmp, path).map_err(io_err("rename", tmp))?;
            }
            self.store.sync_filesystem()
        })();
        if result.is_err() {
            for (tmp, _) in &pending {
                let _ = fs::remove_file(tmp);
            }
        }
        result
    }
}

impl Drop for DirBatch<'_> {
    fn drop(&mut self) {
        for (tmp, _) in self.take_pending() {
            let _ = fs::remove_file(tmp);
        }
    }
}

impl ObjectStore for DirStore {
    fn describe(&self) -> String {
        format!("{} storage {}", self.kind, self.root.display())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectError> {
        self.write_with(key, |file, tmp| {
            Ok(file.write_all(data).map_err(io_err("write", tmp))?)
        })
    }

    fn put_file(&self, key: &str, source: &Path) -> Result<(), ObjectError> {
        self.write_with(key, |file, tmp| {
            let mut input = File::open(source).map_err(io_err("open", source))?;
            std::io::copy(&mut input, file).map_err(io_err("write", tmp))?;
            Ok(())
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        read_document(self.open(key)?, self, key, MAX_DOCUMENT)
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, ObjectError> {
        let path = self.path(key)?;
        match File::open(&path) {
            Ok(file) => Ok(Box::new(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(self.not_found(key)),
            Err(e) => Err(io_err("open", &path)(e).into()),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>, ObjectError> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e).into()),
        }
    }

    fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e).into()),
        }
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(DirBatch {
            store: self,
            pending: Default::default(),
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ObjectError> {
        let folder = prefix.trim_end_matches('/');
        let dir = self.path(folder)?;
        let mut out = Vec::new();
        let mut pending = vec![(dir, folder.to_string())];
        while let Some((dir, key)) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read directory", &dir)(e).into()),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("read directory", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let meta = entry.metadata().map_err(io_err("stat", &entry.path()))?;
                let child = format!("{key}/{name}");
                if meta.is_dir() {
                    pending.push((entry.path(), child));
                } else {
                    out.push((child, meta.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

fn create_private_dir(path: &Path) -> Result<(), ObjectError> {
    Ok(DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err("create directory", path))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_read_whole_only_up_to_the_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(tmp.path(), "local").unwrap();
        let endless = std::io::repeat(b'x');
        let e = read_document(endless, &store, "checkpoints/index.json", 1024).unwrap_err();
        assert!(
            matches!(e, ObjectError::TooLarge { limit: 1024, .. }) && e.to_string().contains("checkpoints/index.json"),
            "{e}"
        );
        let exact = read_document(&[7u8; 1024][..], &store, "k", 1024).unwrap();
        assert_eq!(exact.len(), 1024);
        store.put("checkpoints/cp-1.json", b"{}").unwrap();
        assert_eq!(store.get("checkpoints/cp-1.json").unwrap(), b"{}");
        assert!(store.get("checkpoints/missing.json").unwrap_err().is_not_found());
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn objects_are_written_whole_private_and_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(&tmp.path().join("store"), "local").unwrap();
        store.put("blobs/sha256/ab", b"hello").unwrap();
        store.put("checkpoints/cp-1.json", b"{}").unwrap();
        assert_eq!(store.get("blobs/sha256/ab").unwrap(), b"hello");
        let mut text = String::new();
        store
            .open("blobs/sha256/ab")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "hello");
        assert_eq!(store.size("blobs/sha256/ab").unwrap(), Some(5));
        assert_eq!(store.size("blobs/sha256/cd").unwrap(), None);
        let file = tmp.path().join("store/blobs/sha256/ab");
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let dir = tmp.path().join("store/blobs/sha256");
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);

        // A temporary a crash left is not an object.
        fs::write(dir.join(".tmp-1-0"), b"half").unwrap();
        assert_eq!(store.list("blobs/").unwrap(), vec![("blobs/sha256/ab".to_string(), 5)]);
        assert!(store.list("missing/").unwrap().is_empty());

        let source = tmp.path().join("source");
        fs::write(&source, b"from a file").unwrap();
        store.put_file("blobs/sha256/ab", &source).unwrap();
        assert_eq!(store.get("blobs/sha256/ab").unwrap(), b"from a file");

        store.delete("blobs/sha256/ab").unwrap();
        store.delete("blobs/sha256/ab").unwrap();
        let err = store.get("blobs/sha256/ab").unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("local storage"), "{err}");
    }

    #[test]
    fn a_batch_shows_its_objects_only_once_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(&tmp.path().join("store"), "local").unwrap();
        let files_under = |dir: &str| -> usize {
            fs::read_dir(tmp.path().join("store").join(dir))
                .map(|entries| entries.count())
                .unwrap_or(0)
        };
        let batch = store.batch();
        std::thread::scope(|scope| {
            for n in 0..4 {
                let batch = &batch;
                scope.spawn(move || {
                    batch
                        .put(&format!("chunks/sha256/c{n}"), format!("chunk {n}").as_bytes())
                        .unwrap()
                });
            }
        });
        assert!(batch.put("../escape", b"x").is_err());
        assert!(
            store.list("chunks/").unwrap().is_empty(),
            "nothing visible before commit"
        );
        assert_eq!(store.size("chunks/sha256/c0").unwrap(), None);
        batch.commit().unwrap();
        assert_eq!(store.list("chunks/").unwrap().len(), 4);
        assert_eq!(store.get("chunks/sha256/c3").unwrap(), b"chunk 3");
        assert_eq!(files_under("chunks/sha256"), 4, "no temporaries left");
        let mode = fs::metadata(tmp.path().join("store/chunks/sha256/c2"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A batch dropped uncommitted leaves nothing behind.
        let batch = store.batch();
        batch.put("chunks/sha256/d0", b"dropped").unwrap();
        drop(batch);
        assert_eq!(store.size("chunks/sha256/d0").unwrap(), None);
        assert_eq!(files_under("chunks/sha256"), 4);
    }

    #[test]
    fn keys_cannot_leave_the_store() {
        for key in [
            "",
            "../x",
            "a/../../x",
            "/abs",
            "a//b",
            ".hidden",
            "a/.tmp-1",
            "a b",
            "a\nb",
        ] {
            assert!(validate_key(key).is_err(), "{key:?}");
        }
        for key in ["blobs/sha256/0a1b", "checkpoints/cp-20261201-101010-2.json", "a:b+c"] {
            validate_key(key).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(tmp.path(), "nfs").unwrap();
        assert!(matches!(
            store.put("../escape", b"x"),
            Err(ObjectError::InvalidKey { .. })
        ));
        assert!(!tmp.path().parent().unwrap().join("escape").exists());
    }
}
