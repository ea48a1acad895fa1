//! Recurring checkpoints (`checkpointctl create --interval`): a schedule
//! per container, kept in the daemon's store so it survives restarts, and
//! the loop that takes each checkpoint when it is due, as an increment on
//! the schedule's previous one. Owns the schedules' records and timing;
//! taking a checkpoint is [`CheckpointService::create`]'s.
//!
//! A schedule holds the storage it writes to, in the daemon's metadata
//! store: the daemon must reach that storage after a restart without the
//! client. Its secrets (the S3 secret key, the encryption key) are never
//! stored in clear there: they are sealed (XChaCha20-Poly1305, the record's
//! id as associated data) under a key of the daemon's own, kept 0600 in
//! `<root>/schedule-secrets.key`, so a copy of the metadata (a backup, a
//! support bundle) gives none of them away.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chacha20poly1305::aead::{Aead, Generate, Payload};
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{CheckpointError, CheckpointService, CreateRequest, MergePolicy, StorageSpec};

/// Shortest interval a schedule may have.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// How often the loop looks for due schedules.
const TICK: Duration = Duration::from_millis(500);

/// The storage of a schedule. Serialised, the secrets are left out: they
/// travel only in `sealed_secrets` (see [`SecretsKey`]).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedStorage {
    pub backend: String,
    pub path: String,
    pub bucket: String,
    pub region: String,
    pub endpoint: String,
    pub access_key: String,
    /// Read from records written before secrets were sealed, never written.
    #[serde(default, skip_serializing)]
    pub secret_key: String,
    #[serde(default, skip_serializing)]
    pub encryption_key: String,
    /// Hex of the nonce and the sealed secrets; empty when there are none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sealed_secrets: String,
}

/// The secrets of a schedule's storage, as sealed.
#[derive(Serialize, Deserialize)]
struct Secrets {
    secret_key: String,
    encryption_key: String,
}

/// The file, under the daemon's root, of the key schedules' secrets are
/// sealed with.
const SECRETS_KEY_FILE: &str = "schedule-secrets.key";
const NONCE_LEN: usize = 24;

/// The daemon's key for sealing secrets at rest: 32 random bytes, created
/// 0600 on first use; a key file others may read is refused.
pub struct SecretsKey {
    cipher: XChaCha20Poly1305,
}

impl SecretsKey {
    pub fn open_or_create(root: &Path) -> Result<SecretsKey, CheckpointError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = root.join(SECRETS_KEY_FILE);
        let bad = |reason: String| CheckpointError::Task(format!("schedule secrets key {}: {reason}", path.display()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => {
                let key = <[u8; 32]>::try_generate().map_err(|e| bad(format!("no randomness: {e}")))?;
                file.write_all(&key).map_err(|e| bad(e.to_string()))?;
                file.sync_all().map_err(|e| bad(e.to_string()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(bad(e.to_string())),
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|e| bad(e.to_string()))?;
        crate::host::private_file::check(&meta).map_err(|e| bad(e.to_string()))?;
        let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let key = Key::try_from(bytes.as_slice()).map_err(|_| bad(format!("holds {} bytes, not 32", bytes.len())))?;
        Ok(SecretsKey {
            cipher: XChaCha20Poly1305::new(&key),
        })
    }

    /// Moves the clear secrets of `storage` into its sealed field, bound to
    /// the record `id`.
    pub(super) fn seal(&self, id: &str, storage: &mut SavedStorage) -> Result<(), CheckpointError> {
        let secrets = Secrets {
            secret_key: std::mem::take(&mut storage.secret_key),
            encryption_key: std::mem::take(&mut storage.encryption_key),
        };
        storage.sealed_secrets.clear();
        if secrets.secret_key.is_empty() && secrets.encryption_key.is_empty() {
            return Ok(());
        }
        let failed = |e: String| CheckpointError::Task(format!("sealing the secrets of schedule {id}: {e}"));
        let plain = serde_json::to_vec(&secrets).map_err(|e| failed(e.to_string()))?;
        let nonce = XNonce::try_generate().map_err(|e| failed(e.to_string()))?;
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plain,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|e| failed(e.to_string()))?;
        storage.sealed_secrets = crate::oci::digest::hex(&[nonce.as_slice(), &sealed].concat());
        Ok(())
    }

    /// Fills the secrets of `storage` from its sealed field; the record must
    /// be `id` and sealed under this key.
    pub(super) fn open(&self, id: &str, storage: &mut SavedStorage) -> Result<(), CheckpointError> {
        if storage.sealed_secrets.is_empty() {
            return Ok(());
        }
        let bad = || {
            CheckpointError::Invalid(format!(
                "the sealed secrets of schedule {id} do not open: damaged, moved from another record, or sealed under another key"
            ))
        };
        let bytes = crate::oci::digest::unhex(&storage.sealed_secrets).ok_or_else(bad)?;
        if bytes.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| bad())?;
        let plain = self
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: sealed,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| bad())?;
        let secrets: Secrets = serde_json::from_slice(&plain).map_err(|_| bad())?;
        storage.secret_key = secrets.secret_key;
        storage.encryption_key = secrets.encryption_key;
        Ok(())
    }
}

impl std::fmt::Debug for SavedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedStorage")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl From<&StorageSpec> for SavedStorage {
    fn from(spec: &StorageSpec) -> Self {
        SavedStorage {
            backend: spec.backend.clone(),
            path: spec.path.clone(),
            bucket: spec.s3.bucket.clone(),
            region: spec.s3.region.clone(),
            endpoint: spec.s3.endpoint.clone(),
            access_key: spec.s3.access_key.clone(),
            secret_key: spec.s3.secret_key.clone(),
            encryption_key: spec.encryption_key.clone(),
            sealed_secrets: String::new(),
        }
    }
}

impl From<&SavedStorage> for StorageSpec {
    fn from(saved: &SavedStorage) -> Self {
        StorageSpec {
            backend: saved.backend.clone(),
            path: saved.path.clone(),
            s3: super::s3::S3Config {
                bucket: saved.bucket.clone(),
                region: saved.region.clone(),
                endpoint: saved.endpoint.clone(),
                access_key: saved.access_key.clone(),
                secret_key: saved.secret_key.clone(),
                prefix: String::new(),
            },
            encryption_key: saved.encryption_key.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// `sched-<unix seconds>-<n>`
    pub id: String,
    pub namespace: String,
    /// The container's full id.
    pub container: String,
    pub interval_secs: u64,
    pub labels: Vec<String>,
    pub compression: String,
    pub storage: SavedStorage,
    pub created_unix: i64,
    pub last_run_unix: i64,
    /// The newest checkpoint it took: the parent of the next.
    pub last_checkpoint: Option<String>,
    /// Why the newest attempt failed, if it did; cleared by a success.
    pub last_error: Option<String>,
    pub runs: u64,
    pub failures: u64,
    /// Filesystem only; schedules of versions before process state were.
    #[serde(default = "filesystem_only")]
    pub fs_only: bool,
    /// Options of the process dumps (see [`CreateRequest`]).
    #[serde(default)]
    pub memory_limit: u64,
    #[serde(default)]
    pub tcp_established: bool,
    #[serde(default)]
    pub file_locks: bool,
    /// The criu binary the caller named, checked again at each run (see
    /// [`super::criu_choice`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_path: Option<String>,
    /// Merged after each of its checkpoints (the first included): the
    /// `automerge` of the client's config when it registered the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automerge: Option<MergePolicy>,
    /// Whose container: empty for containerd's, `docker` for Docker's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub engine: String,
}

fn filesystem_only() -> bool {
    true
}

impl Schedule {
    pub fn next_run_unix(&self) -> i64 {
        self.last_run_unix + self.interval_secs as i64
    }

    fn is_due(&self, now: i64) -> bool {
        now >= self.next_run_unix()
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64
}

impl CheckpointService {
    fn schedules(&self) -> Result<Vec<Schedule>, CheckpointError> {
        let key = SecretsKey::open_or_create(&self.root)?;
        let mut out = Vec::new();
        for (id, schedule) in self
            .schedules
            .list()
            .map_err(|e| CheckpointError::Task(e.to_string()))?
        {
            let mut schedule = match schedule {
                Ok(schedule) => schedule,
                Err(e) => {
                    warn!(schedule = id, error = %e, "unreadable schedule record left as is");
                    continue;
                }
            };
            let in_clear = !schedule.storage.secret_key.is_empty() || !schedule.storage.encryption_key.is_empty();
            match key.open(&schedule.id, &mut schedule.storage) {
                Ok(()) => {}
                Err(e) => {
                    warn!(schedule = id, error = %e, "schedule left out");
                    continue;
                }
            }
            if in_clear {
                // A record of a version that stored secrets in clear: seal
                // them now.
                self.save_schedule(&schedule)?;
                info!(schedule = id, "secrets of the schedule sealed at rest");
            }
            out.push(schedule);
        }
        out.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(out)
    }

    fn save_schedule(&self, schedule: &Schedule) -> Result<(), CheckpointError> {
        let mut sealed = schedule.clone();
        SecretsKey::open_or_create(&self.root)?.seal(&schedule.id, &mut sealed.storage)?;
        self.schedules
            .put(&schedule.id, &sealed)
            .map_err(|e| CheckpointError::Task(e.to_string()))
    }

    /// The schedules of `namespace`, oldest first.
    pub fn list_schedules(&self, namespace: &str) -> Result<Vec<Schedule>, CheckpointError> {
        Ok(self
            .schedules()?
            .into_iter()
            .filter(|s| s.namespace == namespace)
            .collect())
    }

    pub fn remove_schedule(&self, namespace: &str, id: &str) -> Result<Schedule, CheckpointError> {
        let found = self
            .schedules()?
            .into_iter()
            .find(|s| s.id == id && s.namespace == namespace)
            .ok_or_else(|| {
                CheckpointError::Catalogue(super::CatalogueError::NotFound {
                    storage: "the daemon's schedules".into(),
                    id: id.to_string(),
                })
            })?;
        self.schedules
            .remove(id)
            .map_err(|e| CheckpointError::Task(e.to_string()))?;
        info!(
            schedule = id,
            container = found.container,
            "checkpoint schedule removed"
        );
        Ok(found)
    }

    /// Takes the first checkpoint now, then registers the schedule that
    /// takes one every `interval`, each on the previous one; `automerge`,
    /// if any, merges the container's checkpoints after each.
    pub async fn schedule(
        &self,
        request: CreateRequest,
        interval: Duration,
        automerge: Option<MergePolicy>,
    ) -> Result<(Schedule, super::Checkpoint), CheckpointError> {
        if interval < MIN_INTERVAL {
            return Err(CheckpointError::Invalid(format!(
                "--interval {}s is shorter than the minimum of {}s",
                interval.as_secs_f64(),
                MIN_INTERVAL.as_secs()
            )));
        }
        if let Some(policy) = &automerge {
            // A policy the catalogue would refuse at every run is refused
            // now, before anything is taken.
            policy.check()?;
        }
        let first = self.create(request.clone()).await?;
        let now = unix(SystemTime::now());
        let n = {
            let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
            *created += 1;
            *created
        };
        let mut schedule = Schedule {
            id: format!("sched-{now}-{n}"),
            namespace: request.namespace.clone(),
            container: first.container.clone(),
            interval_secs: interval.as_secs().max(1),
            labels: request.labels.clone(),
            compression: request.compression.clone(),
            storage: SavedStorage::from(&request.storage),
            created_unix: now,
            last_run_unix: now,
            last_checkpoint: Some(first.id.clone()),
            last_error: None,
            runs: 1,
            failures: 0,
            fs_only: request.fs_only,
            memory_limit: request.memory_limit,
            tcp_established: request.tcp_established,
            file_locks: request.file_locks,
            criu_path: request.criu_path.clone(),
            automerge,
            engine: request.engine.clone(),
        };
        if let Err(e) = self.automerge(&schedule).await {
            schedule.last_error = Some(e);
        }
        self.save_schedule(&schedule)?;
        info!(
            schedule = schedule.id,
            container = schedule.container,
            interval_secs = schedule.interval_secs,
            "checkpoint schedule registered"
        );
        Ok((schedule, first))
    }

    /// Takes the checkpoint of every due schedule, one after the other.
    pub async fn run_due_schedules(&self) -> Result<usize, CheckpointError> {
        let now = unix(SystemTime::now());
        let mut ran = 0;
        for mut schedule in self.schedules()?.into_iter().filter(|s| s.is_due(now)) {
            let storage = StorageSpec::from(&schedule.storage);
            // The previous checkpoint may have been pruned or merged away:
            // then this one is whole.
            let parent = match (&schedule.last_checkpoint, self.catalogue(&storage)) {
                (Some(id), Ok(catalogue)) => {
                    let id = id.clone();
                    // Storage calls block (S3 drives its client on this thread).
                    tokio::task::spawn_blocking(move || catalogue.get(&id).ok().map(|_| id))
                        .await
                        .ok()
                        .flatten()
                }
                _ => None,
            };
            let request = CreateRequest {
                storage,
                namespace: schedule.namespace.clone(),
                container: schedule.container.clone(),
                labels: schedule.labels.clone(),
                parent,
                compression: schedule.compression.clone(),
                pre_freeze: false,
                memory_limit: schedule.memory_limit,
                fs_only: schedule.fs_only,
                leave_running: true,
                tcp_established: schedule.tcp_established,
                file_locks: schedule.file_locks,
                pre_dump: false,
                criu_path: schedule.criu_path.clone(),
                engine: schedule.engine.clone(),
            };
            schedule.last_run_unix = unix(SystemTime::now());
            match self.create(request).await {
                Ok(checkpoint) => {
                    schedule.last_checkpoint = Some(checkpoint.id);
                    schedule.last_error = self.automerge(&schedule).await.err();
                    schedule.runs += 1;
                }
                Err(e) => {
                    warn!(schedule = schedule.id, error = %e, "scheduled checkpoint failed");
                    schedule.last_error = Some(e.to_string());
                    schedule.failures += 1;
                }
            }
            // Removed meanwhile: it stays removed.
            let still_there = self.schedules()?.iter().any(|s| s.id == schedule.id);
            if still_there {
                self.save_schedule(&schedule)?;
            }
            ran += 1;
        }
        Ok(ran)
    }

    /// The schedule's automerge over its container's checkpoints, if it
    /// has one; a failure is logged and returned as the schedule's error
    /// (the checkpoint itself was taken).
    async fn automerge(&self, schedule: &Schedule) -> Result<(), String> {
        let Some(policy) = schedule.automerge.clone() else {
            return Ok(());
        };
        let storage = StorageSpec::from(&schedule.storage);
        match self
            .merge(&storage, &schedule.namespace, &schedule.container, policy, false)
            .await
        {
            Ok(plan) => {
                info!(
                    schedule = schedule.id,
                    merged = plan.merged.len(),
                    kept = plan.kept.len(),
                    freed = plan.freed_bytes,
                    "automerge after a scheduled checkpoint"
                );
                Ok(())
            }
            Err(e) => {
                warn!(schedule = schedule.id, error = %e, "automerge after a scheduled checkpoint failed");
                Err(format!("automerge: {e}"))
            }
        }
    }

    /// Runs due schedules until the runtime stops.
    pub fn start_scheduler(self: &Arc<Self>) {
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = service.upgrade() else { return };
                if let Err(e) = service.run_due_schedules().await {
                    warn!(error = %e, "cannot run checkpoint schedules");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_storage_round_trips_and_hides_secrets() {
        let spec = StorageSpec {
            backend: "s3".into(),
            path: String::new(),
            s3: super::super::s3::S3Config {
                bucket: "b".into(),
                region: "r".into(),
                endpoint: "http://127.0.0.1:9000".into(),
                access_key: "AK".into(),
                secret_key: "very-secret".into(),
                prefix: String::new(),
            },
            encryption_key: "ab".repeat(32),
        };
        let saved = SavedStorage::from(&spec);
        assert_eq!(StorageSpec::from(&saved), spec);
        let printed = format!("{saved:?}");
        assert!(
            !printed.contains("very-secret") && !printed.contains("abab"),
            "{printed}"
        );
    }

    #[test]
    fn secrets_are_sealed_at_rest_and_open_only_for_their_record_and_key() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let key = SecretsKey::open_or_create(tmp.path()).unwrap();
        let key_file = tmp.path().join(SECRETS_KEY_FILE);
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let clear = SavedStorage {
            backend: "s3".into(),
            bucket: "b".into(),
            access_key: "AK".into(),
            secret_key: "very-secret".into(),
            encryption_key: "ab".repeat(32),
            ..SavedStorage::default()
        };
        let mut sealed = clear.clone();
        key.seal("sched-1-1", &mut sealed).unwrap();
        let stored = serde_json::to_string(&sealed).unwrap();
        assert!(!stored.contains("very-secret") && !stored.contains("abab"), "{stored}");
        assert!(
            stored.contains("\"access_key\":\"AK\""),
            "what is no secret stays readable: {stored}"
        );

        let mut back: SavedStorage = serde_json::from_str(&stored).unwrap();
        assert!(back.secret_key.is_empty());
        key.open("sched-1-1", &mut back).unwrap();
        assert_eq!(
            (back.secret_key.as_str(), back.encryption_key.as_str()),
            ("very-secret", &*"ab".repeat(32))
        );

        // Copied into another record, or opened with another daemon's key.
        let mut moved: SavedStorage = serde_json::from_str(&stored).unwrap();
        let e = key.open("sched-2-1", &mut moved).unwrap_err().to_string();
        assert!(e.contains("sealed secrets of schedule sched-2-1 do not open"), "{e}");
        let other = tempfile::tempdir().unwrap();
        let mut foreign: SavedStorage = serde_json::from_str(&stored).unwrap();
        assert!(SecretsKey::open_or_create(other.path())
            .unwrap()
            .open("sched-1-1", &mut foreign)
            .is_err());
        // Damaged.
        let mut cut: SavedStorage = serde_json::from_str(&stored).unwrap();
        cut.sealed_secrets.truncate(10);
        assert!(key.open("sched-1-1", &mut cut).is_err());

        // A record of an older version, secrets in clear, still reads.
        let legacy = r#"{"backend":"s3","path":"","bucket":"b","region":"","endpoint":"","access_key":"AK","secret_key":"old","encryption_key":""}"#;
        let legacy: SavedStorage = serde_json::from_str(legacy).unwrap();
        assert_eq!(legacy.secret_key, "old");

        // A key file others may read is refused.
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretsKey::open_or_create(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("mode 0644"), "{e}");
    }

    #[test]
    fn schedules_are_due_after_their_interval() {
        let s = Schedule {
            id: "sched-1-1".into(),
            namespace: "ns".into(),
            container: "c".into(),
            interval_secs: 60,
            labels: vec![],
            compression: "zstd".into(),
            storage: SavedStorage::default(),
            created_unix: 1000,
            last_run_unix: 1000,
            last_checkpoint: None,
            last_error: None,
            runs: 1,
            failures: 0,
            fs_only: false,
            memory_limit: 0,
            tcp_established: false,
            file_locks: false,
            criu_path: None,
            automerge: None,
            engine: String::new(),
        };
        assert!(!s.is_due(1059));
        assert!(s.is_due(1060));
        assert_eq!(s.next_run_unix(), 1060);
    }
}
