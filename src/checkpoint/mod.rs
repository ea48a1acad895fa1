//! The checkpoint catalogue: checkpoints of containers' writable layers,
//! taken with the seamless capture (a pause of milliseconds), stored
//! content-addressed on a storage backend and listed from the daemon's
//! metadata store. Owns the rules of the catalogue (ids, labels, chains,
//! prune policies) and which storage a request names; knows nothing of
//! gRPC. A checkpoint holds the filesystem and, unless asked for the
//! filesystem only, the processes' state as CRIU dumps them (through runc),
//! from which `restore` recreates the container. `create` takes one; this
//! file holds the service, its requests and the start-up recovery of what a
//! killed daemon journaled.

pub mod archive;
pub mod beneath;
pub mod catalogue;
mod create;
pub mod criu_choice;
mod docker;
pub mod filter;
pub mod journal;
pub mod objects;
pub mod process;
pub mod remap;
pub mod restore;
pub mod s3;
pub mod schedule;
pub mod sealed;
pub mod tree;
pub mod trust;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tracing::{error, info, instrument, warn};

use crate::capture::{CaptureError, CaptureService};
use crate::error::{Classify, ErrorKind};
pub use catalogue::{
    Catalogue, CatalogueError, Checkpoint, Compression, MergePlan, MergePolicy, MergeStrategy, NewCheckpoint,
    PrunePlan, PrunePolicy,
};
use filter::Filter;
use objects::{DirStore, ObjectStore};
use tree::TreeDiff;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Filter(#[from] filter::FilterError),
    #[error("{0}")]
    Invalid(String),
    #[error("storage backend {backend}: {reason}")]
    Storage { backend: String, reason: String },
    #[error("checkpoint task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    #[error(transparent)]
    Containerd(#[from] crate::host::containerd::ContainerdError),
    #[error(transparent)]
    Cgroup(#[from] crate::host::cgroup::CgroupError),
    #[error(transparent)]
    CriuChoice(#[from] criu_choice::CriuChoiceError),
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerCheckpointError),
    #[error(
        "container {container} has {used} bytes of memory ({used_mib} MiB), over the memory limit of {limit} bytes \
         ({limit_mib} MiB): nothing was dumped; raise --memory-limit or checkpoint with --fs-only"
    )]
    MemoryLimit {
        container: String,
        used: u64,
        used_mib: u64,
        limit: u64,
        limit_mib: u64,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("the archive streamed in is larger than {limit} bytes, {why}: refused, nothing was imported")]
    ArchiveTooLarge { limit: u64, why: &'static str },
    #[error("restore failed at step {step:?}: {reason}{log}")]
    Restore {
        step: &'static str,
        reason: String,
        /// Where restore.log was kept, with a leading separator, or empty.
        log: String,
        kind: ErrorKind,
    },
}

impl Classify for CheckpointError {
    fn kind(&self) -> ErrorKind {
        use archive::ArchiveError;
        match self {
            CheckpointError::Catalogue(e) | CheckpointError::Archive(ArchiveError::Catalogue(e)) => catalogue_kind(e),
            CheckpointError::Archive(e) => match e {
                ArchiveError::Path { .. } | ArchiveError::UnsafeTree { .. } => ErrorKind::InvalidArgument,
                ArchiveError::Exists { .. } | ArchiveError::Taken { .. } => ErrorKind::AlreadyExists,
                ArchiveError::Damaged { .. } | ArchiveError::Foreign { .. } | ArchiveError::Unexportable { .. } => {
                    ErrorKind::FailedPrecondition
                }
                ArchiveError::Catalogue(_) | ArchiveError::Io { .. } => ErrorKind::Internal,
            },
            CheckpointError::Filter(_) | CheckpointError::Invalid(_) => ErrorKind::InvalidArgument,
            CheckpointError::Capture(e) => e.kind(),
            CheckpointError::Storage { .. } => ErrorKind::FailedPrecondition,
            CheckpointError::Task(_) => ErrorKind::Internal,
            CheckpointError::Process(e) => match e {
                process::ProcessError::Catalogue(e) => catalogue_kind(e),
                process::ProcessError::Criu(e) => e.kind(),
                process::ProcessError::BadImages { .. } | process::ProcessError::Record(_) => {
                    ErrorKind::FailedPrecondition
                }
                process::ProcessError::Io(_) | process::ProcessError::Journal(_) => ErrorKind::Internal,
            },
            CheckpointError::Containerd(e) => e.kind(),
            CheckpointError::Cgroup(e) => e.kind(),
            CheckpointError::CriuChoice(e) => e.kind(),
            CheckpointError::Docker(e) => e.kind(),
            CheckpointError::MemoryLimit { .. }
            | CheckpointError::Unsupported(_)
            | CheckpointError::ArchiveTooLarge { .. } => ErrorKind::FailedPrecondition,
            CheckpointError::Restore { kind, .. } => *kind,
        }
    }
}

fn catalogue_kind(e: &CatalogueError) -> ErrorKind {
    match e {
        CatalogueError::NotFound { .. } => ErrorKind::NotFound,
        CatalogueError::Invalid(_) => ErrorKind::InvalidArgument,
        CatalogueError::Object(e) => match e {
            objects::ObjectError::InvalidKey { .. } => ErrorKind::InvalidArgument,
            objects::ObjectError::NotFound { .. } | objects::ObjectError::TooLarge { .. } => {
                ErrorKind::FailedPrecondition
            }
            objects::ObjectError::Io(_) => ErrorKind::Unavailable,
        },
        _ => ErrorKind::Internal,
    }
}

/// Which storage a request names. Debug leaves the secrets out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StorageSpec {
    /// "local" (default), "nfs" or "s3".
    pub backend: String,
    /// nfs: the mounted directory (absolute).
    pub path: String,
    pub s3: s3::S3Config,
    /// 64 hex characters: objects are sealed at rest with this key.
    pub encryption_key: String,
}

impl std::fmt::Debug for StorageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSpec")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("s3", &self.s3)
            .field("encrypted", &!self.encryption_key.is_empty())
            .finish()
    }
}

/// A request to checkpoint a container.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub storage: StorageSpec,
    pub namespace: String,
    pub container: String,
    pub labels: Vec<String>,
    pub parent: Option<String>,
    pub compression: String,
    /// Keep the container frozen from the capture of its disk to the end of
    /// the memory dump, so that both are of one instant (files a process
    /// holds open for writing must be the size CRIU recorded). Without
    /// it, the disk is captured first, then the processes dumped.
    pub pre_freeze: bool,
    /// Bytes; 0: no limit.
    pub memory_limit: u64,
    pub fs_only: bool,
    /// Keep the container running after the dump.
    pub leave_running: bool,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub pre_dump: bool,
    /// The criu binary the caller names, run only as [`criu_choice`]
    /// allows; None: the daemon's own (`[criu] criu_path`).
    pub criu_path: Option<String>,
    /// Whose container it is: empty or `containerd` for containerd's,
    /// `docker` for Docker Engine's.
    pub engine: String,
}

impl CreateRequest {
    /// The first option asked for that only a process dump has.
    fn process_option(&self) -> Option<&'static str> {
        [
            (self.pre_dump, "--pre-dump"),
            (self.tcp_established, "--tcp-established"),
            (self.file_locks, "--file-locks"),
            (!self.leave_running, "--leave-running=false"),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
    }
}

/// A request to write a checkpoint's chain as an OCI archive.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub storage: StorageSpec,
    pub namespace: String,
    pub id: String,
    /// Absolute path on the daemon's host; see [`archive::validate_target`].
    pub path: PathBuf,
    /// Replace a regular file already at `path`.
    pub overwrite: bool,
}

/// What `inspect` reports.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub checkpoint: Checkpoint,
    pub chain: Vec<String>,
    pub blobs: usize,
    pub diff: Option<TreeDiff>,
    pub verification: Option<(u64, Vec<String>)>,
}

/// What checkpoints take from the daemon's configuration, loaded at start
/// so that a loose key file or a bad size refuses the start.
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// Which runc and criu process-state checkpoints use.
    pub criu: crate::host::criu::CriuSettings,
    /// The keys checkpoint records are sealed with and trusted under.
    pub trust: Arc<trust::RecordTrust>,
    /// `checkpoint.max_received_archive`, in bytes: the largest archive
    /// another node may stream in.
    pub max_received_archive: u64,
    /// `[criu] allowed_paths`: the criu binaries a caller may name.
    pub allowed_criu: Vec<PathBuf>,
    /// `[docker] address`: Docker's engine, for its containers' checkpoints.
    pub docker_socket: PathBuf,
}

impl CheckpointSettings {
    /// Reads `config`'s checkpoint settings; the node's record key is
    /// created under `root` if it has none.
    pub fn load(root: &Path, config: &crate::config::Config) -> Result<CheckpointSettings, CheckpointError> {
        let trusted: Vec<PathBuf> = config.checkpoint.trusted_record_keys.iter().map(Into::into).collect();
        let trust = trust::RecordTrust::load(root, &trusted, config.checkpoint.untrusted_mounts.clone())
            .map_err(|e| CheckpointError::Invalid(format!("checkpoint record keys: {e}")))?;
        Ok(CheckpointSettings {
            criu: crate::host::criu::CriuSettings::from_config(&config.criu),
            allowed_criu: config.criu.allowed_paths.iter().map(Into::into).collect(),
            docker_socket: config.docker.address.clone().into(),
            trust: Arc::new(trust),
            max_received_archive: config
                .max_received_archive_bytes()
                .map_err(|e| CheckpointError::Invalid(e.to_string()))?,
        })
    }
}

impl CheckpointSettings {
    /// runc and criu for a request whose caller named `requested` (or
    /// nothing): the daemon's own, with the binary swapped for the named
    /// one only as [`criu_choice::caller_criu`] allows.
    pub fn criu_for(&self, requested: Option<&str>) -> Result<crate::host::criu::CriuSettings, CheckpointError> {
        let mut settings = self.criu.clone();
        if let Some(requested) = requested.filter(|r| !r.is_empty()) {
            settings.criu = Some(criu_choice::caller_criu(&self.allowed_criu, requested)?);
        }
        Ok(settings)
    }
}

pub struct CheckpointService {
    capture: Arc<CaptureService>,
    settings: CheckpointSettings,
    /// Recurring checkpoints, by schedule id (storage secrets sealed).
    schedules: crate::snapshot::store::Records<schedule::Schedule>,
    root: PathBuf,
    /// Serializes what writes or collects a storage's objects, so a prune
    /// never collects the blobs of a create under way.
    writing: tokio::sync::Mutex<()>,
    created: Mutex<u64>,
    /// Whether the kernel tracks dirtied pages for CRIU: a property of the
    /// kernel, asked of `criu check` (160 ms) once.
    dirty_tracking: tokio::sync::OnceCell<bool>,
}

impl std::fmt::Debug for CheckpointService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointService").field("root", &self.root).finish()
    }
}

/// Removes what restores a previous run left in `<root>/restore-work`: no
/// restore runs before the service exists.
fn remove_restore_work(root: &Path) {
    let dir = root.join("restore-work");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => warn!(path = %path.display(), "removed the work directory of a restore a previous run left"),
            Err(e) => warn!(path = %path.display(), error = %e, "cannot remove a restore's work directory"),
        }
    }
}

impl CheckpointService {
    /// Scratch files a previous run left in `<root>/checkpoint-work` (a
    /// daemon killed mid-create or mid-export) are deleted: no work is under
    /// way yet. Checkpoints a killed daemon journaled (see [`journal`]) are
    /// first finished: stored if their dump finished, else discarded.
    pub fn new(capture: Arc<CaptureService>, settings: CheckpointSettings, root: &Path) -> CheckpointService {
        let work = root.join("checkpoint-work");
        let mut pending = Vec::new();
        for path in journal::journal_files(&work) {
            match journal::PendingCheckpoint::read(&path, &work) {
                Ok(found) => pending.push((path, found)),
                Err(e) => {
                    let aside = journal::move_aside(root, &path);
                    error!(
                        error = %e,
                        moved_to = %aside.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                        "a checkpoint journal left by a previous run cannot be read: moved aside, its checkpoint is not stored"
                    );
                    if let Err(e) = aside {
                        warn!(error = %e, "cannot move the checkpoint journal aside");
                    }
                }
            }
        }
        let keep: std::collections::HashSet<PathBuf> = pending
            .iter()
            .flat_map(|(path, p)| [path.clone(), p.work.clone()])
            .collect();
        if let Ok(entries) = std::fs::read_dir(&work) {
            for entry in entries.flatten() {
                let path = entry.path();
                if keep.contains(&path) {
                    continue;
                }
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match removed {
                    Ok(()) => warn!(path = %path.display(), "removed a checkpoint scratch file left by a previous run"),
                    Err(e) => warn!(path = %path.display(), error = %e, "cannot remove a checkpoint scratch file"),
                }
            }
        }
        remove_restore_work(root);
        let service = CheckpointService {
            schedules: crate::snapshot::store::Records::new(
                capture.snapshotter().record_store(),
                crate::snapshot::store::RecordKind::Schedules,
            ),
            capture,
            settings,
            root: root.to_path_buf(),
            writing: tokio::sync::Mutex::new(()),
            created: Mutex::new(0),
            dirty_tracking: tokio::sync::OnceCell::new(),
        };
        // On a thread of its own: storage calls block, and the S3 client
        // must not find the caller's async runtime.
        std::thread::scope(|scope| {
            let finishing = scope.spawn(|| {
                for (path, found) in pending {
                    service.finish_journaled(&path, found);
                }
                service.remove_stale_pins();
            });
            if finishing.join().is_err() {
                error!("finishing the checkpoints a previous run journaled panicked");
            }
        });
        service
    }

    /// Deletes the containerd leases of restores a previous run left (its
    /// snapshot goes with the lease, unless a container uses it). Tries
    /// until containerd answers (it starts after the daemon) for up to ten
    /// minutes.
    pub async fn sweep_restore_leases(self: Arc<Self>) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            let swept = match crate::host::containerd::Containerd::connect(self.capture.containerd_address()).await {
                Ok(containerd) => containerd.delete_restore_leases().await,
                Err(e) => Err(e),
            };
            match swept {
                Ok(deleted) if deleted.is_empty() => return,
                Ok(deleted) => {
                    warn!(leases = ?deleted, "deleted the containerd leases of restores a previous run left");
                    return;
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    warn!(error = %e, "cannot delete the containerd leases of interrupted restores");
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_secs(5)).await,
            }
        }
    }

    /// Finishes a checkpoint a killed daemon journaled: stores it if its
    /// dump finished (the container is gone: CRIU stopped it), else
    /// discards what it left (CRIU may not have run, or was killed
    /// mid-dump: the container was thawed at start, see
    /// [`crate::capture::thaw_left_frozen`], and runs on). Then removes
    /// the journal, its scratch directory and its capture.
    fn finish_journaled(&self, path: &Path, pending: journal::PendingCheckpoint) {
        let finished = process::dump_finished(&pending.work);
        let outcome = if finished {
            self.store_journaled(&pending)
        } else {
            Ok(None)
        };
        let mut keep_work = false;
        match outcome {
            Ok(Some(checkpoint)) => info!(
                id = checkpoint.id,
                namespace = checkpoint.namespace,
                container = checkpoint.container,
                size = checkpoint.size,
                "stored the checkpoint a previous run dumped but was killed before storing"
            ),
            Ok(None) => warn!(
                id = pending.id,
                namespace = pending.checkpoint.namespace,
                container = pending.checkpoint.container,
                "discarded the checkpoint a previous run was killed in: its dump had not finished, so the container \
                 was not stopped"
            ),
            Err(e) => {
                // Its images are the only copy of the processes: kept, with
                // the journal, for an operator.
                keep_work = true;
                let journal_aside = journal::move_aside(&self.root, path);
                let work_aside = journal::move_aside(&self.root, &pending.work);
                error!(
                    id = pending.id,
                    namespace = pending.checkpoint.namespace,
                    container = pending.checkpoint.container,
                    error = %e,
                    journal = %journal_aside.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string()),
                    images = %work_aside.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string()),
                    "cannot store the checkpoint a previous run dumped: its journal and images are moved aside"
                );
            }
        }
        if !keep_work {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(journal = %path.display(), error = %e, "cannot remove a checkpoint journal");
            }
            if let Err(e) = std::fs::remove_dir_all(&pending.work) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(work = %pending.work.display(), error = %e, "cannot remove a CRIU scratch directory");
                }
            }
        }
        self.release_capture(&pending.capture);
    }

    /// Stores a journaled checkpoint whose dump finished, as `create` does;
    /// returns it (also when a daemon killed after storing it had left the
    /// journal).
    fn store_journaled(&self, pending: &journal::PendingCheckpoint) -> Result<Option<Checkpoint>, CheckpointError> {
        let key = schedule::SecretsKey::open_or_create(&self.root)?;
        let storage = pending
            .storage_spec(&key)
            .map_err(|e| CheckpointError::Task(e.to_string()))?;
        let catalogue = self.catalogue(&storage)?;
        let id = match catalogue.get(&pending.id) {
            Ok(found)
                if found.namespace == pending.checkpoint.namespace
                    && found.container == pending.checkpoint.container =>
            {
                return Ok(Some(found))
            }
            // Shared storage: another node took the id since.
            Ok(_) => catalogue.new_id(SystemTime::now())?,
            Err(CatalogueError::NotFound { .. }) => pending.id.clone(),
            Err(e) => return Err(e.into()),
        };
        let process = process::store_dump(&catalogue, &pending.work, &pending.dump)?;
        let new = pending.new_checkpoint(process);
        Ok(Some(catalogue.create(&id, &pending.capture.join("fs"), &new)?))
    }

    /// Unpins and removes a capture of this service's.
    fn release_capture(&self, capture: &Path) {
        self.capture.release(capture);
    }

    /// Pins whose journal is gone (a daemon killed between pinning and
    /// writing the journal, or a journal moved aside) release their capture.
    fn remove_stale_pins(&self) {
        let Ok(pinned) = self.capture.pinned() else {
            return;
        };
        for capture in pinned {
            warn!(capture = %capture.display(), "removing a capture pinned by no checkpoint journal");
            self.release_capture(&capture);
        }
    }

    /// The catalogue of the storage `spec` names.
    pub fn catalogue(&self, spec: &StorageSpec) -> Result<Catalogue, CheckpointError> {
        let (id, objects): (String, Arc<dyn ObjectStore>) = match spec.backend.as_str() {
            "" | "local" => (
                "local".into(),
                Arc::new(DirStore::open(&self.root.join("checkpoints"), "local").map_err(CatalogueError::from)?),
            ),
            "nfs" => {
                let path = Path::new(&spec.path);
                if spec.path.is_empty() || !path.is_absolute() || spec.path.split('/').any(|p| p == "..") {
                    return Err(CheckpointError::Invalid(format!(
                        "nfs storage needs the absolute path of the mounted export, got {:?}",
                        spec.path
                    )));
                }
                if !path.is_dir() {
                    return Err(CheckpointError::Storage {
                        backend: "nfs".into(),
                        reason: format!("{} is not a directory (is the export mounted?)", path.display()),
                    });
                }
                (
                    format!("nfs:{}", spec.path),
                    Arc::new(DirStore::open(&path.join("seamless-checkpoints"), "nfs").map_err(CatalogueError::from)?),
                )
            }
            "s3" => {
                let mut config = spec.s3.clone();
                if config.prefix.is_empty() {
                    config.prefix = "seamless-checkpoints".into();
                }
                config.validate().map_err(|reason| CheckpointError::Storage {
                    backend: "s3".into(),
                    reason,
                })?;
                (
                    format!("s3:{}/{}/{}", config.endpoint, config.bucket, config.prefix),
                    Arc::new(s3::S3Store::new(&config).map_err(CatalogueError::from)?),
                )
            }
            other => {
                return Err(CheckpointError::Invalid(format!(
                    "storage backend {other:?} is not one of local, s3, nfs"
                )))
            }
        };
        let work = self.root.join("checkpoint-work");
        let objects: Arc<dyn ObjectStore> = if spec.encryption_key.is_empty() {
            objects
        } else {
            std::fs::create_dir_all(&work).map_err(|e| CheckpointError::Storage {
                backend: spec.backend.clone(),
                reason: format!("creating {}: {e}", work.display()),
            })?;
            Arc::new(
                sealed::SealedStore::new(objects, &spec.encryption_key, &work)
                    .map_err(|e| CheckpointError::Invalid(format!("storage encryption key: {e}")))?,
            )
        };
        Ok(Catalogue::new(
            id,
            objects,
            self.capture.snapshotter().record_store(),
            &work,
        ))
    }

    pub async fn list(
        &self,
        storage: &StorageSpec,
        namespace: &str,
        container: &str,
        filter: &str,
    ) -> Result<Vec<Checkpoint>, CheckpointError> {
        let filter = if filter.trim().is_empty() {
            None
        } else {
            Some(Filter::parse(filter)?)
        };
        let catalogue = self.catalogue(storage)?;
        let (namespace, container) = (namespace.to_string(), container.to_string());
        tokio::task::spawn_blocking(move || catalogue.list(&namespace, &container, filter.as_ref()))
            .await
            .map_err(|e| CheckpointError::Task(e.to_string()))?
            .map_err(CheckpointError::from)
    }

    pub async fn inspect(
        &self,
        storage: &StorageSpec,
        namespace: &str,
        id: &str,
        diff_with: Option<&str>,
        verify: bool,
    ) -> Result<Inspection, CheckpointError> {
        let catalogue = self.catalogue(storage)?;
        let (namespace, id, other) = (namespace.to_string(), id.to_string(), diff_with.map(str::to_string));
        tokio::task::spawn_blocking(move || {
            let checkpoint = visible(&catalogue, &namespace, &id)?;
            let chain = catalogue.chain(&checkpoint)?.into_iter().map(|c| c.id).collect();
            let blobs = catalogue.blobs_needed(&checkpoint)?;
            let diff = match other {
                Some(other) => {
                    let other = visible(&catalogue, &namespace, &other)?;
                    Some(catalogue.diff(&other, &checkpoint)?)
                }
                None => None,
            };
            let verification = if verify {
                Some(catalogue.verify(&checkpoint)?)
            } else {
                None
            };
            Ok(Inspection {
                checkpoint,
                chain,
                blobs,
                diff,
                verification,
            })
        })
        .await
        .map_err(|e| CheckpointError::Task(e.to_string()))?
    }

    /// Usage samples of containers of `namespace` (see [`crate::host::stats`]).
    pub async fn container_stats(
        &self,
        namespace: &str,
        containers: &[String],
    ) -> Result<Vec<crate::host::stats::Sample>, CheckpointError> {
        crate::host::containerd::validate_namespace(namespace).map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        let containerd = crate::host::containerd::Containerd::connect(self.capture.containerd_address()).await?;
        Ok(crate::host::stats::sample(&containerd, namespace, containers).await?)
    }

    /// Lets the processes of a container restored paused run: resumes its
    /// paused task or starts a created one; a running one is left alone.
    /// Returns the task's pid, its status now and before.
    pub async fn resume_container(
        &self,
        namespace: &str,
        container: &str,
    ) -> Result<(u32, String, String), CheckpointError> {
        crate::host::containerd::validate_namespace(namespace).map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        if container.is_empty() {
            return Err(CheckpointError::Invalid("a container id is required".into()));
        }
        let containerd = crate::host::containerd::Containerd::connect(self.capture.containerd_address()).await?;
        containerd.container(namespace, container).await?;
        let Some(before) = containerd.task(namespace, container).await? else {
            return Err(CheckpointError::Unsupported(format!(
                "container {container} has no task (restored without processes); \
                 `checkpointctl restore --resume` starts one"
            )));
        };
        match before.status.as_str() {
            "paused" => containerd.resume_task(namespace, container).await?,
            "created" => drop(containerd.start_task(namespace, container).await?),
            "running" => {}
            other => {
                return Err(CheckpointError::Unsupported(format!(
                    "the task of container {container} is {other}: only a paused or created task can be resumed"
                )))
            }
        }
        let now = containerd.task(namespace, container).await?.ok_or_else(|| {
            CheckpointError::Task(format!("the task of container {container} went away while resuming"))
        })?;
        info!(namespace, container, from = %before.status, to = %now.status, pid = now.pid, "container resumed");
        Ok((now.pid, now.status, before.status))
    }

    /// CRIU's log of the dump of checkpoint `id` (empty for a filesystem-only
    /// checkpoint).
    pub async fn dump_log(&self, storage: &StorageSpec, namespace: &str, id: &str) -> Result<String, CheckpointError> {
        let catalogue = self.catalogue(storage)?;
        let (namespace, id) = (namespace.to_string(), id.to_string());
        tokio::task::spawn_blocking(move || {
            let checkpoint = visible(&catalogue, &namespace, &id)?;
            let Some(process) = checkpoint.process else {
                return Ok(String::new());
            };
            let mut text = String::new();
            std::io::Read::read_to_string(&mut catalogue.open_content(&process.dump_log_key)?, &mut text).map_err(
                |source| {
                    CatalogueError::Io(crate::error::IoError {
                        op: "read",
                        path: process.dump_log_key.clone(),
                        source,
                    })
                },
            )?;
            Ok(text)
        })
        .await
        .map_err(|e| CheckpointError::Task(e.to_string()))?
    }

    pub async fn prune(
        &self,
        storage: &StorageSpec,
        namespace: &str,
        container: &str,
        policy: PrunePolicy,
        dry_run: bool,
    ) -> Result<PrunePlan, CheckpointError> {
        if container.is_empty() {
            return Err(CheckpointError::Invalid("prune needs a container id".into()));
        }
        let catalogue = self.catalogue(storage)?;
        let _writing = self.writing.lock().await;
        let (namespace, container) = (namespace.to_string(), container.to_string());
        let plan = tokio::task::spawn_blocking(move || catalogue.prune(&namespace, &container, &policy, dry_run))
            .await
            .map_err(|e| CheckpointError::Task(e.to_string()))??;
        if !dry_run {
            info!(removed = ?plan.removed, folded = ?plan.folded, freed = plan.freed_bytes, "checkpoints pruned");
        }
        Ok(plan)
    }
}

impl CheckpointService {
    /// Writes the chain of checkpoint `id` as an OCI archive. Reads only:
    /// it does not hold up creates, and a prune or merge that removes part
    /// of the chain meanwhile makes it fail, never write a wrong archive
    /// (every blob is checked against its digest on the way).
    #[instrument(skip_all, fields(id = %request.id, path = %request.path.display()))]
    pub async fn export(&self, request: ExportRequest) -> Result<archive::Exported, CheckpointError> {
        let catalogue = self.catalogue(&request.storage)?;
        let exported = tokio::task::spawn_blocking(move || {
            let checkpoint = visible(&catalogue, &request.namespace, &request.id)?;
            archive::export(&catalogue, &checkpoint, &request.path, request.overwrite).map_err(CheckpointError::from)
        })
        .await
        .map_err(|e| CheckpointError::Task(e.to_string()))??;
        info!(
            layers = ?exported.layers,
            bytes = exported.bytes,
            reference = %exported.reference,
            "checkpoint exported"
        );
        Ok(exported)
    }

    /// The budget of an archive another node streams in: the configured
    /// maximum, and no more than half the free space of the daemon's root
    /// (the import copies it again).
    pub fn receive_budget(&self) -> Result<ReceiveBudget, CheckpointError> {
        let work = self.root.join("checkpoint-work");
        std::fs::create_dir_all(&work).map_err(|e| CheckpointError::Task(format!("{}: {e}", work.display())))?;
        // The import copies it again: no more than half the free space.
        let free = self
            .capture
            .snapshotter()
            .system()
            .free_bytes(&work)
            .map_err(|e| CheckpointError::Task(e.to_string()))?;
        let limit = self.settings.max_received_archive.min(free / 2);
        Ok(ReceiveBudget {
            limit,
            why: if limit < self.settings.max_received_archive {
                "half the free space of the daemon's root"
            } else {
                "checkpoint.max_received_archive"
            },
            taken: 0,
        })
    }

    pub fn stream_scratch(&self, what: &str) -> Result<PathBuf, CheckpointError> {
        let work = self.root.join("checkpoint-work");
        std::fs::create_dir_all(&work).map_err(|e| CheckpointError::Task(format!("{}: {e}", work.display())))?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Ok(work.join(format!("{what}-{}-{stamp}.tar", std::process::id())))
    }

    /// Recreates the chain an archive holds as checkpoints of `storage`, in
    /// `namespace`, oldest first; a writer like create, so a prune never
    /// collects the blobs of an import under way.
    #[instrument(skip_all, fields(namespace = %namespace, path = %path.display()))]
    pub async fn import(
        &self,
        storage: &StorageSpec,
        namespace: &str,
        path: &Path,
    ) -> Result<Vec<Checkpoint>, CheckpointError> {
        crate::host::containerd::validate_namespace(namespace).map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        let catalogue = self.catalogue(storage)?;
        let _writing = self.writing.lock().await;
        let (namespace, path) = (namespace.to_string(), path.to_path_buf());
        let imported = tokio::task::spawn_blocking(move || archive::import(&catalogue, &path, &namespace))
            .await
            .map_err(|e| CheckpointError::Task(e.to_string()))??;
        info!(ids = ?imported.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), "checkpoints imported");
        Ok(imported)
    }

    pub async fn merge(
        &self,
        storage: &StorageSpec,
        namespace: &str,
        container: &str,
        policy: MergePolicy,
        dry_run: bool,
    ) -> Result<MergePlan, CheckpointError> {
        if container.is_empty() {
            return Err(CheckpointError::Invalid("merge needs a container id".into()));
        }
        let catalogue = self.catalogue(storage)?;
        let _writing = self.writing.lock().await;
        let (namespace, container) = (namespace.to_string(), container.to_string());
        let plan = tokio::task::spawn_blocking(move || catalogue.merge(&namespace, &container, &policy, dry_run))
            .await
            .map_err(|e| CheckpointError::Task(e.to_string()))??;
        if !dry_run {
            info!(merged = ?plan.merged, rebased = ?plan.rebased, freed = plan.freed_bytes, "checkpoints merged");
        }
        Ok(plan)
    }
}

/// Checkpoint `id`, if it belongs to `namespace`: other namespaces' are
/// reported as not found.
fn visible(catalogue: &Catalogue, namespace: &str, id: &str) -> Result<Checkpoint, CatalogueError> {
    let checkpoint = catalogue.get(id)?;
    if checkpoint.namespace != namespace {
        return Err(CatalogueError::NotFound {
            storage: catalogue.describe(),
            id: id.to_string(),
        });
    }
    Ok(checkpoint)
}

/// Bytes an archive streamed in from another node may still take; checked
/// before each piece is written, so an endless or oversized stream never
/// fills the disk.
#[derive(Debug)]
pub struct ReceiveBudget {
    limit: u64,
    why: &'static str,
    taken: u64,
}

impl ReceiveBudget {
    /// Takes `bytes` more, or refuses naming the limit.
    pub fn take(&mut self, bytes: usize) -> Result<(), CheckpointError> {
        match self.taken.checked_add(bytes as u64) {
            Some(total) if total <= self.limit => {
                self.taken = total;
                Ok(())
            }
            _ => Err(CheckpointError::ArchiveTooLarge {
                limit: self.limit,
                why: self.why,
            }),
        }
    }
}
