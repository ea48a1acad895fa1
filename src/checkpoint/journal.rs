//! The journal of a checkpoint whose dump stops its container
//! (`--leave-running=false --tcp-established`: CRIU itself kills the
//! processes, since a container held and killed later would close its
//! connections). From CRIU's kill until the checkpoint is in the catalogue,
//! the dump's images in `<root>/checkpoint-work` are the only copy of the
//! processes; a daemon killed then would lose both the container and its
//! checkpoint. So before the dump starts, everything needed to store it
//! without the original request is written to
//! `<root>/checkpoint-work/pending-<id>.json`, and the filesystem capture is
//! pinned (a `<capture>.journal-pin` file beside it) so that the start-up
//! sweep of captures keeps it. The next start stores a dump that finished
//! and discards one that did not (see `CheckpointService::new`).
//!
//! Owns the journal's format, its atomic writing, and the pins; knows
//! nothing of CRIU or of storing. The storage's secrets (S3 secret key,
//! encryption key) are sealed with the daemon's [`SecretsKey`], never
//! written in clear.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::catalogue::{NewCheckpoint, ProcessState};
use super::process::DumpPlan;
use super::schedule::{SavedStorage, SecretsKey};
use super::StorageSpec;

/// TEST ONLY: the environment variable naming a [`Failpoint`] at which the
/// daemon aborts, so that integration tests can kill it at an exact step of
/// a checkpoint. Never set it on a real node.
pub const FAILPOINT_ENV: &str = "SEAMLESS_FAILPOINT";

/// TEST ONLY: the steps [`FAILPOINT_ENV`] can stop the daemon at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The journal is written, the dump not started.
    BeforeDump,
    /// The dump finished (CRIU has stopped the container), nothing of it
    /// is stored.
    AfterDump,
}

impl Failpoint {
    fn name(self) -> &'static str {
        match self {
            Failpoint::BeforeDump => "before-dump",
            Failpoint::AfterDump => "after-dump",
        }
    }
}

/// TEST ONLY: the exit status of a daemon stopped at a [`Failpoint`].
pub const FAILPOINT_EXIT: i32 = 86;

/// TEST ONLY: ends the process at once, as a kill would (no destructor, no
/// cleanup, no core dump), with [`FAILPOINT_EXIT`], when [`FAILPOINT_ENV`]
/// names `point`.
pub fn failpoint(point: Failpoint) {
    if std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == point.name()) {
        tracing::error!(
            failpoint = point.name(),
            "test failpoint reached: the daemon exits at once"
        );
        // SAFETY: _exit takes no pointer and never returns; skipping every
        // destructor and handler is the point.
        unsafe { libc::_exit(FAILPOINT_EXIT) }
    }
}

const JOURNAL_PREFIX: &str = "pending-";
const JOURNAL_SUFFIX: &str = ".json";
/// Beside a capture in the captures directory: the capture is a pending
/// checkpoint's.
/// Under the daemon's root: journals that could not be acted on, kept for
/// an operator.
pub const DAMAGED_DIR: &str = "checkpoint-journals-damaged";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{op} checkpoint journal {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("checkpoint journal {path}: {reason}")]
    Damaged { path: String, reason: String },
    #[error("checkpoint journal {path}: the storage's secrets: {reason}")]
    Secrets { path: String, reason: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.display().to_string();
    move |source| JournalError::Io { op, path, source }
}

/// A checkpoint whose dump may have stopped its container, and all that
/// storing it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingCheckpoint {
    pub version: u32,
    /// The checkpoint's id in its catalogue.
    pub id: String,
    /// Where it is stored; its secrets only sealed.
    pub storage: SavedStorage,
    /// What the catalogue is to store, but for the process state the dump
    /// makes; its fields stand at the top level of the file.
    #[serde(flatten)]
    pub checkpoint: NewCheckpoint,
    /// The filesystem capture (its `fs` is the upper stored).
    pub capture: PathBuf,
    /// The CRIU scratch directory of the dump.
    pub work: PathBuf,
    /// The dump's options and what of it is stored already.
    pub dump: DumpPlan,
}

impl PendingCheckpoint {
    /// The journal of checkpoint `id` about to be dumped into `work`. The
    /// process state of `new` is left out: the dump makes it.
    pub fn new(
        id: &str,
        storage: &StorageSpec,
        new: &NewCheckpoint,
        capture: &Path,
        work: &Path,
        dump: DumpPlan,
    ) -> PendingCheckpoint {
        PendingCheckpoint {
            version: VERSION,
            id: id.to_string(),
            storage: SavedStorage::from(storage),
            checkpoint: NewCheckpoint {
                process: None,
                ..new.clone()
            },
            capture: capture.to_path_buf(),
            work: work.to_path_buf(),
            dump,
        }
    }

    /// What the catalogue stores for it, with the dump's `process` state.
    pub fn new_checkpoint(&self, process: ProcessState) -> NewCheckpoint {
        NewCheckpoint {
            process: Some(process),
            ..self.checkpoint.clone()
        }
    }

    /// The storage it goes to, its secrets opened with `key`.
    pub fn storage_spec(&self, key: &SecretsKey) -> Result<StorageSpec, JournalError> {
        let mut storage = self.storage.clone();
        key.open(&self.seal_id(), &mut storage)
            .map_err(|e| JournalError::Secrets {
                path: self.id.clone(),
                reason: e.to_string(),
            })?;
        Ok(StorageSpec::from(&storage))
    }

    /// What the sealed secrets are bound to: a journal's cannot be moved
    /// into another's, or into a schedule.
    fn seal_id(&self) -> String {
        format!("{JOURNAL_PREFIX}{}", self.id)
    }

    /// The journal's file in `dir`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{JOURNAL_PREFIX}{}{JOURNAL_SUFFIX}", self.id))
    }

    /// Pins the capture, then writes the journal into `dir` atomically
    /// (a 0600 temporary file, synced, renamed, the directory synced), its
    /// storage secrets sealed with `key`. Returns the journal's path.
    pub fn write(&self, dir: &Path, key: &SecretsKey) -> Result<PathBuf, JournalError> {
        let path = self.path_in(dir);
        let mut sealed = self.clone();
        key.seal(&self.seal_id(), &mut sealed.storage)
            .map_err(|e| JournalError::Secrets {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let bytes = serde_json::to_vec_pretty(&sealed).map_err(|e| JournalError::Damaged {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // The pin first: a journal never names a capture the sweep may take.
        write_synced(&crate::capture::pin_path(&self.capture), b"")?;
        let temp = dir.join(format!(".{JOURNAL_PREFIX}{}.tmp", self.id));
        write_synced(&temp, &bytes)?;
        std::fs::rename(&temp, &path).map_err(io_err("rename into place", &path))?;
        sync_dir(dir)?;
        Ok(path)
    }

    /// Reads the journal at `path` (its secrets still sealed). A journal
    /// naming a capture or a scratch directory other than where the daemon
    /// puts them (`captures`, `work_dir`) is damaged: nothing outside those
    /// is ever removed on a journal's word.
    pub fn read(path: &Path, work_dir: &Path) -> Result<PendingCheckpoint, JournalError> {
        let damaged = |reason: String| JournalError::Damaged {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(io_err("read", path))?;
        let journal: PendingCheckpoint = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        if journal.version != VERSION {
            return Err(damaged(format!("version {}, not {VERSION}", journal.version)));
        }
        super::catalogue::validate_id(&journal.id).map_err(|e| damaged(e.to_string()))?;
        if journal.path_in(work_dir) != path {
            return Err(damaged(format!(
                "holds checkpoint {}, not the one its name says",
                journal.id
            )));
        }
        let in_work = journal.work.parent() == Some(work_dir)
            && journal
                .work
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("criu-"));
        if !in_work {
            return Err(damaged(format!(
                "its CRIU scratch directory {} is not one of {}",
                journal.work.display(),
                work_dir.display()
            )));
        }
        if journal.capture.file_name().is_none() || journal.capture.parent().is_none() {
            return Err(damaged(format!(
                "its capture {} is not a capture",
                journal.capture.display()
            )));
        }
        Ok(journal)
    }
}

/// The journal files in `dir`.
pub fn journal_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(JOURNAL_PREFIX) && n.ends_with(JOURNAL_SUFFIX))
        })
        .collect();
    found.sort();
    found
}

/// Moves `path` (a journal, or a scratch directory it names) into
/// `<root>/checkpoint-journals-damaged`, under a name of its own; returns
/// where it went.
pub fn move_aside(root: &Path, path: &Path) -> Result<PathBuf, JournalError> {
    let dir = root.join(DAMAGED_DIR);
    std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target = dir.join(format!("{name}.{stamp}"));
    std::fs::rename(path, &target).map_err(io_err("move aside", path))?;
    Ok(target)
}

/// Writes `bytes` to a new 0600 file at `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    file.write_all(bytes).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("sync", path))
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::super::catalogue::Compression;
    use super::*;

    fn pending(tmp: &Path) -> (PendingCheckpoint, StorageSpec) {
        let spec = StorageSpec {
            backend: "s3".into(),
            path: String::new(),
            s3: super::super::s3::S3Config {
                bucket: "bucket".into(),
                region: "eu-1".into(),
                endpoint: "http://127.0.0.1:9000".into(),
                access_key: "AKID".into(),
                secret_key: "s3-secret-do-not-leak".into(),
                prefix: String::new(),
            },
            encryption_key: "ab".repeat(32),
        };
        let new = NewCheckpoint {
            namespace: "ns1".into(),
            container: "web".into(),
            image: "docker.io/library/busybox:latest".into(),
            labels: [("golden".to_string(), String::new())].into_iter().collect(),
            parent: Some("cp-20261201-120000".into()),
            compression: Compression::Zstd,
            pause: Duration::from_micros(1500),
            process: None,
            container_key: Some("blobs/sha256/aa.zst".into()),
            engine: String::new(),
        };
        let dump = DumpPlan {
            images: vec!["blobs/sha256/bb.chunks".into()],
            pre_dump: false,
            pre_dump_pages_written: 0,
            stored_bytes: 0,
            tcp_established: true,
            file_locks: false,
            leave_running: false,
            memory_bytes: 4096,
            process_identity: "7:100".into(),
            criu_version: "4.1".into(),
            compression: Compression::Zstd,
            consume_images: false,
        };
        let work = tmp.join("checkpoint-work");
        std::fs::create_dir_all(&work).unwrap();
        let captures = tmp.join("captures");
        std::fs::create_dir_all(&captures).unwrap();
        let journal = PendingCheckpoint::new(
            "cp-20261201-120100",
            &spec,
            &new,
            &captures.join("checkpoint-1-1"),
            &work.join("criu-cp-20261201-120100-1"),
            dump,
        );
        (journal, spec)
    }

    #[test]
    fn journals_round_trip_with_their_secrets_sealed() {
        let tmp = tempfile::tempdir().unwrap();
        let (journal, spec) = pending(tmp.path());
        let work = tmp.path().join("checkpoint-work");
        let key = SecretsKey::open_or_create(tmp.path()).unwrap();
        let path = journal.write(&work, &key).unwrap();
        assert_eq!(path, work.join("pending-cp-20261201-120100.json"));
        assert_eq!(journal_files(&work), vec![path.clone()]);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // No temporary file is left, and no secret is in the file in clear.
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1);
        let text = std::fs::read_to_string(&path).unwrap();
        for secret in ["s3-secret-do-not-leak", spec.encryption_key.as_str()] {
            assert!(!text.contains(secret), "a secret is in clear in {text}");
        }
        assert!(text.contains("AKID") && text.contains("sealed_secrets"), "{text}");

        let read = PendingCheckpoint::read(&path, &work).unwrap();
        assert_eq!(read.storage_spec(&key).unwrap(), spec);
        let mut without_secrets = journal.clone();
        without_secrets.storage.secret_key.clear();
        without_secrets.storage.encryption_key.clear();
        without_secrets.storage.sealed_secrets = read.storage.sealed_secrets.clone();
        assert_eq!(read, without_secrets);
        let process = ProcessState::default();
        let new = read.new_checkpoint(process.clone());
        assert_eq!(new.pause, Duration::from_micros(1500));
        assert_eq!(new.container_key.as_deref(), Some("blobs/sha256/aa.zst"));
        assert_eq!(new.parent.as_deref(), Some("cp-20261201-120000"));
        assert_eq!(new.process, Some(process));

        // Under another daemon's key the secrets do not open.
        let other = tempfile::tempdir().unwrap();
        let err = read
            .storage_spec(&SecretsKey::open_or_create(other.path()).unwrap())
            .unwrap_err();
        assert!(matches!(err, JournalError::Secrets { .. }), "{err}");
    }

    #[test]
    fn the_capture_is_pinned_until_unpinned() {
        let tmp = tempfile::tempdir().unwrap();
        let (journal, _) = pending(tmp.path());
        let key = SecretsKey::open_or_create(tmp.path()).unwrap();
        journal.write(&tmp.path().join("checkpoint-work"), &key).unwrap();
        let captures = tmp.path().join("captures");
        std::fs::create_dir(&journal.capture).unwrap();
        std::fs::create_dir(captures.join("checkpoint-9-9")).unwrap();
        let pin = crate::capture::pin_path(&journal.capture);
        assert!(pin.exists(), "the journal pins its capture");
        crate::capture::unpin(&journal.capture).unwrap();
        crate::capture::unpin(&journal.capture).unwrap();
        assert!(!pin.exists());
    }

    #[test]
    fn damaged_journals_are_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("checkpoint-work");
        let (journal, _) = pending(tmp.path());
        let key = SecretsKey::open_or_create(tmp.path()).unwrap();
        let path = journal.write(&work, &key).unwrap();

        let mut outside = journal.clone();
        outside.work = PathBuf::from("/etc");
        std::fs::write(&path, serde_json::to_vec(&outside).unwrap()).unwrap();
        let err = PendingCheckpoint::read(&path, &work).unwrap_err().to_string();
        assert!(
            err.contains("/etc") && err.contains("pending-cp-20261201-120100.json"),
            "{err}"
        );

        std::fs::write(&path, b"{\"version\": 1, \"id\": ").unwrap();
        let err = PendingCheckpoint::read(&path, &work).unwrap_err();
        assert!(matches!(err, JournalError::Damaged { .. }), "{err}");
        let aside = move_aside(tmp.path(), &path).unwrap();
        assert!(!path.exists());
        assert!(aside.starts_with(tmp.path().join(DAMAGED_DIR)));
        assert_eq!(std::fs::read(&aside).unwrap(), b"{\"version\": 1, \"id\": ");
    }

    /// A journal as the daemon wrote it before the new checkpoint's fields
    /// were one part: the same file, field for field, reads and writes.
    #[test]
    fn a_journal_of_the_earlier_shape_reads_and_writes_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let (journal, _) = pending(tmp.path());
        let work = tmp.path().join("checkpoint-work");
        let old = format!(
            r#"{{
  "version": 1,
  "id": "cp-20261201-120100",
  "storage": {{
    "backend": "s3",
    "path": "",
    "bucket": "bucket",
    "region": "eu-1",
    "endpoint": "http://127.0.0.1:9000",
    "access_key": "AKID"
  }},
  "namespace": "ns1",
  "container": "web",
  "image": "docker.io/library/busybox:latest",
  "labels": {{
    "golden": ""
  }},
  "parent": "cp-20261201-120000",
  "compression": "zstd",
  "pause_ns": 1500000,
  "container_key": "blobs/sha256/aa.zst",
  "capture": "{capture}",
  "work": "{work}",
  "dump": {{
    "images": [
      "blobs/sha256/bb.chunks"
    ],
    "pre_dump": false,
    "pre_dump_pages_written": 0,
    "stored_bytes": 0,
    "tcp_established": true,
    "file_locks": false,
    "leave_running": false,
    "memory_bytes": 4096,
    "process_identity": "7:100",
    "criu_version": "4.1",
    "compression": "zstd",
    "consume_images": false
  }}
}}"#,
            capture = journal.capture.display(),
            work = journal.work.display(),
        );
        let path = journal.path_in(&work);
        std::fs::write(&path, &old).unwrap();
        let read = PendingCheckpoint::read(&path, &work).unwrap();
        let mut without_secrets = journal.clone();
        without_secrets.storage.secret_key.clear();
        without_secrets.storage.encryption_key.clear();
        assert_eq!(read, without_secrets);
        assert_eq!(read.checkpoint.pause, Duration::from_micros(1500));
        assert_eq!(serde_json::to_string_pretty(&read).unwrap(), old);

        // Unknown fields are still refused, at the top level too.
        let extra = old.replacen("\"version\": 1,", "\"version\": 1, \"surprise\": 2,", 1);
        std::fs::write(&path, extra).unwrap();
        let err = PendingCheckpoint::read(&path, &work).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
    }
}
