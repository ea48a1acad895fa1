//! Seamless commit: captures a running container's writable layer with a
//! pause of milliseconds, then builds an image from the capture and pushes it
//! in the background. Owns the commit rules (what a valid request is, one
//! commit at a time per container) and the job lifecycle; every state change
//! is persisted, and a restarted daemon ends interrupted jobs as failed with
//! their reason. Knows nothing of gRPC: errors carry the commit error codes.
//!
//! Jobs, chains ([`chain`]) and their metrics ([`metrics`]) are this
//! layer's; a job's run from capture to pushed image is `job`, the image's
//! layers and config `image` (shared by the OCI assembly and the Nydus one
//! in [`nydus_image`]).

pub mod chain;
mod image;
mod job;
pub mod metrics;
pub mod nydus_image;
mod queue;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{error, info, instrument, warn};

use crate::capture::{CaptureError, CaptureService, CapturedContainer};
use crate::error::{Classify, ErrorKind};
use crate::host::containerd::{validate_namespace, ContainerdError};
use crate::oci::content::ContentStore;
use crate::oci::credentials::{RegistryCredentials, RequestAuth};
use crate::oci::layer::{build_layer_parts, BuildContext, Compression, LayerBlob, PathFilter};
use crate::oci::registry::{LayerData, LayerSource, PulledManifest, RegistryClient, RegistryError, RegistryOptions};
use crate::snapshot::snapshotter::{SnapshotError, Snapshotter};
use crate::snapshot::store::{RecordKind, Records};
use crate::time::rfc3339;
use chain::{Chain, ChainOrigin, CommitLayer, Plan};
pub use image::{derive_config, BuiltLayer};
#[cfg(test)]
use job::{create_job_dir, local_base};
use nydus_image::{Assembled, Reused};

/// The error codes of seamless commit, shared by the CLI and the APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommitCode {
    InvalidParameter,
    ContainerNotFound,
    PermissionDenied,
    ContainerNotRunning,
    SnapshotInProgress,
    /// No commit job has the snapshot id asked for.
    SnapshotNotFound,
    PauseTimeout,
    AtomicSwitchFailed,
    BackgroundProcessingFailed,
    InternalError,
}

impl CommitCode {
    pub fn as_str(self) -> &'static str {
        match self {
            CommitCode::InvalidParameter => "INVALID_PARAMETER",
            CommitCode::ContainerNotFound => "CONTAINER_NOT_FOUND",
            CommitCode::PermissionDenied => "PERMISSION_DENIED",
            CommitCode::ContainerNotRunning => "CONTAINER_NOT_RUNNING",
            CommitCode::SnapshotInProgress => "SNAPSHOT_IN_PROGRESS",
            CommitCode::SnapshotNotFound => "SNAPSHOT_NOT_FOUND",
            CommitCode::PauseTimeout => "PAUSE_TIMEOUT",
            CommitCode::AtomicSwitchFailed => "ATOMIC_SWITCH_FAILED",
            CommitCode::BackgroundProcessingFailed => "BACKGROUND_PROCESSING_FAILED",
            CommitCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{0}")]
    InvalidParameter(String),
    #[error("no snapshot {id}: no commit job has this id")]
    JobNotFound { id: String },
    #[error(
        "{queued} commits of container {container} are already waiting for its earlier ones to build and push \
         (commit.max_queued); try again when one has ended"
    )]
    QueueFull { container: String, queued: usize },
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Capture(Box<CaptureError>),
    #[error("commit job store: {0}")]
    Store(#[from] crate::snapshot::store::StoreError),
    #[error("background task failed: {0}")]
    Task(String),
}

impl CommitError {
    /// The commit error code this error reports as.
    pub fn code(&self) -> CommitCode {
        match self {
            CommitError::InvalidParameter(_) => CommitCode::InvalidParameter,
            CommitError::JobNotFound { .. } => CommitCode::SnapshotNotFound,
            CommitError::QueueFull { .. } => CommitCode::SnapshotInProgress,
            CommitError::Containerd(e) => containerd_code(e),
            CommitError::Capture(e) => match e.as_ref() {
                CaptureError::WrongSnapshotter { .. } => CommitCode::InvalidParameter,
                CaptureError::InProgress { .. } => CommitCode::SnapshotInProgress,
                CaptureError::Containerd(e) => containerd_code(e),
                CaptureError::Snapshotter(SnapshotError::ContainerSnapshotNotFound { .. }) => {
                    CommitCode::ContainerNotFound
                }
                CaptureError::Cgroup(_) => CommitCode::ContainerNotRunning,
                CaptureError::PauseTimeout { .. } => CommitCode::PauseTimeout,
                CaptureError::Snapshotter(_) | CaptureError::Task(_) => CommitCode::InternalError,
                CaptureError::Sync { .. }
                | CaptureError::Snapshot { .. }
                | CaptureError::Thaw { .. }
                | CaptureError::Marker { .. }
                | CaptureError::Kill { .. } => CommitCode::AtomicSwitchFailed,
            },
            CommitError::Snapshot(SnapshotError::ContainerSnapshotNotFound { .. }) => CommitCode::ContainerNotFound,
            CommitError::Snapshot(_) | CommitError::Store(_) | CommitError::Task(_) => CommitCode::InternalError,
        }
    }
}

impl From<CaptureError> for CommitError {
    fn from(e: CaptureError) -> CommitError {
        CommitError::Capture(Box::new(e))
    }
}

fn containerd_code(e: &ContainerdError) -> CommitCode {
    match e {
        ContainerdError::NotFound { .. } => CommitCode::ContainerNotFound,
        ContainerdError::NotRunning { .. } => CommitCode::ContainerNotRunning,
        ContainerdError::BadNamespace { .. } | ContainerdError::Ambiguous { .. } => CommitCode::InvalidParameter,
        _ => CommitCode::InternalError,
    }
}

impl Classify for CommitError {
    fn kind(&self) -> ErrorKind {
        match self {
            CommitError::JobNotFound { .. } => ErrorKind::NotFound,
            CommitError::Containerd(e) => e.kind(),
            CommitError::Snapshot(e) => e.kind(),
            CommitError::Capture(e) => e.kind(),
            _ => match self.code() {
                CommitCode::InvalidParameter => ErrorKind::InvalidArgument,
                CommitCode::ContainerNotFound => ErrorKind::NotFound,
                CommitCode::ContainerNotRunning => ErrorKind::FailedPrecondition,
                CommitCode::SnapshotInProgress => ErrorKind::AlreadyExists,
                CommitCode::SnapshotNotFound => ErrorKind::NotFound,
                CommitCode::PauseTimeout => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            },
        }
    }
}

/// Image formats a commit can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Oci,
    Nydus,
}

/// A commit request, as the CLI and the APIs give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOptions {
    pub namespace: String,
    pub container: String,
    pub target: String,
    pub format: Format,
    pub work_dir: PathBuf,
    pub fs_version: u32,
    pub compressor: String,
    pub target_insecure: bool,
    pub source_insecure: bool,
    pub with_paths: Vec<PathBuf>,
    pub without_paths: Vec<PathBuf>,
    pub maximum_times: u32,
    /// Credentials the request gave for the target's registry: used for
    /// this job only, never persisted with it (nor shown by `Debug`).
    #[serde(skip)]
    pub target_creds: Option<RegistryCredentials>,
    /// The same for the source image's registry.
    #[serde(skip)]
    pub source_creds: Option<RegistryCredentials>,
}

impl Default for CommitOptions {
    /// The defaults of every API, written once: checkpointctl's flags, the
    /// REST body's missing fields, the gRPC request's zero values and the
    /// embedding client start from these.
    fn default() -> CommitOptions {
        CommitOptions {
            namespace: "default".into(),
            container: String::new(),
            target: String::new(),
            format: Format::Nydus,
            // Empty: the daemon's private scratch directory.
            work_dir: PathBuf::new(),
            fs_version: 6,
            compressor: "lz4_block".into(),
            target_insecure: false,
            source_insecure: false,
            with_paths: Vec::new(),
            without_paths: Vec::new(),
            maximum_times: 10,
            target_creds: None,
            source_creds: None,
        }
    }
}

impl CommitOptions {
    /// A commit of `container` to `target` with every other option its
    /// default.
    pub fn new(container: impl Into<String>, target: impl Into<String>) -> CommitOptions {
        CommitOptions {
            container: container.into(),
            target: target.into(),
            ..CommitOptions::default()
        }
    }
}

impl Format {
    /// Every format's name, as the wire and the CLI spell it.
    pub const NAMES: [&'static str; 2] = ["nydus", "oci"];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Oci => "oci",
            Format::Nydus => "nydus",
        }
    }

    /// The format named `name` (one of [`Format::NAMES`]).
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "oci" => Some(Format::Oci),
            "nydus" => Some(Format::Nydus),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl CommitOptions {
    /// Parses the wire form of a format name.
    pub fn parse_format(text: &str) -> Result<Format, CommitError> {
        match text {
            "" => Ok(CommitOptions::default().format),
            other => Format::parse(other).ok_or_else(|| {
                CommitError::InvalidParameter(format!("format {other:?} is not one of {}", Format::NAMES.join(", ")))
            }),
        }
    }

    /// Checks everything that does not need containerd.
    pub fn validate(&self) -> Result<(), CommitError> {
        let bad = |m: String| Err(CommitError::InvalidParameter(m));
        validate_namespace(&self.namespace)?;
        if self.container.is_empty() {
            return bad("container must not be empty".into());
        }
        if oci_client::Reference::try_from(self.target.as_str()).is_err() || self.target.contains('@') {
            return bad(format!(
                "target {:?} is not an image reference such as registry/repo:tag",
                self.target
            ));
        }
        if !matches!(self.compressor.as_str(), "none" | "lz4_block" | "zstd") {
            return bad(format!(
                "compressor {:?} is not one of none, lz4_block, zstd",
                self.compressor
            ));
        }
        if !matches!(self.fs_version, 5 | 6) {
            return bad(format!("fs-version {} is not 5 or 6", self.fs_version));
        }
        if !self.work_dir.as_os_str().is_empty() {
            check_work_dir(&self.work_dir, false)?;
        }
        if self.maximum_times == 0 {
            return bad("maximum-times must be at least 1".into());
        }
        self.filter()
            .validate()
            .map_err(|e| CommitError::InvalidParameter(e.to_string()))?;
        Ok(())
    }

    /// The directory a job builds in: the request's, or the daemon's
    /// private scratch directory when it names none.
    fn work_root<'a>(&'a self, scratch: &'a Path) -> &'a Path {
        if self.work_dir.as_os_str().is_empty() {
            scratch
        } else {
            &self.work_dir
        }
    }

    fn filter(&self) -> PathFilter {
        PathFilter {
            with_paths: self.with_paths.clone(),
            without_paths: self.without_paths.clone(),
        }
    }

    /// What a chain's layers were made as: layers of another format do not
    /// stack.
    fn image_format(&self) -> String {
        match self.format {
            Format::Oci => "oci".into(),
            Format::Nydus => format!("nydus-v{}-{}", self.fs_version, self.compressor),
        }
    }

    fn rafs_options(&self) -> Result<crate::nydus::RafsOptions, String> {
        Ok(crate::nydus::RafsOptions {
            fs_version: self.fs_version,
            compressor: crate::nydus::Compressor::parse(&self.compressor).map_err(|e| e.to_string())?,
        })
    }

    /// OCI layers take gzip where Nydus would take lz4 blocks.
    fn oci_compression(&self) -> Compression {
        match self.compressor.as_str() {
            "none" => Compression::None,
            "zstd" => Compression::Zstd,
            _ => Compression::Gzip,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Processing,
    Completed,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Processing => "processing",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }
}

impl std::str::FromStr for JobState {
    type Err = String;

    fn from_str(text: &str) -> Result<JobState, String> {
        [
            JobState::Pending,
            JobState::Processing,
            JobState::Completed,
            JobState::Failed,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
        .ok_or_else(|| format!("state {text:?} is not one of pending, processing, completed, failed"))
    }
}

/// A commit job as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub snapshot_id: String,
    pub container: String,
    pub namespace: String,
    pub source_image: String,
    pub options: CommitOptions,
    pub snapshot_key: String,
    pub capture: PathBuf,
    pub new_upper: PathBuf,
    pub pause: Duration,
    /// The commit call's own time, from the request to the started job
    /// (resolving the container, flushing, the pause).
    #[serde(default)]
    pub total: Duration,
    pub state: JobState,
    pub progress: f64,
    pub stage: String,
    pub started: SystemTime,
    pub ended: Option<SystemTime>,
    pub error_code: Option<CommitCode>,
    pub error: Option<String>,
    /// What kind of failure a failed job met, when known: a network one
    /// (a registry that could not be reached or timed out) shows as such
    /// to the CLI (exit 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<FailureCause>,
    pub manifest_digest: Option<String>,
    /// How the new layers were made: "full", "incremental" or "merged"
    /// (empty until the job has decided).
    #[serde(default)]
    pub layer_plan: String,
    /// Commit layers above the image's own in the pushed image.
    #[serde(default)]
    pub commit_layers: u32,
}

/// The kind of failure a job met, beside its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureCause {
    /// A registry could not be reached, or timed out.
    Network,
}

impl FailureCause {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCause::Network => "network",
        }
    }
}

/// Jobs of one container accepted while earlier ones run, unless told
/// otherwise.
const DEFAULT_MAX_QUEUED: usize = 32;

/// The credentials a job's request gave, by registry.
fn request_auth(job: &Job) -> RequestAuth {
    RequestAuth::default()
        .with(&job.options.target, job.options.target_creds.as_ref())
        .with(&job.source_image, job.options.source_creds.as_ref())
}

/// Why a background job failed, and the code it reports: a registry that
/// refused the credentials is PERMISSION_DENIED (the CLI exits 4), anything
/// else BACKGROUND_PROCESSING_FAILED.
#[derive(Debug)]
struct JobFailure {
    code: CommitCode,
    cause: Option<FailureCause>,
    message: String,
}

impl From<String> for JobFailure {
    fn from(message: String) -> JobFailure {
        JobFailure {
            code: CommitCode::BackgroundProcessingFailed,
            cause: None,
            message,
        }
    }
}

impl From<RegistryError> for JobFailure {
    fn from(e: RegistryError) -> JobFailure {
        JobFailure {
            code: if e.is_permission() {
                CommitCode::PermissionDenied
            } else {
                CommitCode::BackgroundProcessingFailed
            },
            cause: e.is_network().then_some(FailureCause::Network),
            message: e.to_string(),
        }
    }
}

/// What a started commit reports at once.
#[derive(Debug, Clone)]
pub struct Started {
    pub snapshot_id: String,
    pub pause: Duration,
    /// The commit call's own time (see [`Job::total`]).
    pub total: Duration,
    pub old_upper: PathBuf,
    pub new_upper: PathBuf,
}

#[derive(Debug)]
pub struct CommitService {
    /// Takes the captures commits build from; holds a container's slot
    /// until its job ends.
    capture: Arc<CaptureService>,
    snapshotter: Arc<Snapshotter>,
    /// Commit jobs, by snapshot id.
    jobs: Records<Job>,
    /// Commit chains, by "<namespace>/<container>".
    chains: Records<Chain>,
    /// How jobs reach registries: `[registry]`'s host configuration.
    registry: RegistryOptions,
    /// Bounds the background jobs that run at once.
    workers: tokio::sync::Semaphore,
    /// Where OCI base layers converted to Nydus are kept for later commits.
    nydus_cache: Option<nydus_image::BaseCache>,
    /// The jobs of each container, run one after another.
    queues: queue::Queues,
    /// Woken whenever a job ends.
    ended: tokio::sync::Notify,
}

/// A work directory a request names is where root writes the layers it
/// builds: it must be an absolute directory that no other user can write
/// to or swap (a symlink, or a directory writable by group or others,
/// would let them read or plant what the daemon builds), or a root-owned
/// sticky one such as /tmp, in which each job makes a private directory
/// under a random name. A
/// missing one is created 0700 with `create` (its parent must exist);
/// without, only its parent must exist.
fn check_work_dir(dir: &Path, create: bool) -> Result<(), CommitError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let bad = |reason: String| CommitError::InvalidParameter(format!("work-dir {}: {reason}", dir.display()));
    if !dir.is_absolute() {
        return Err(bad("is not an absolute path".into()));
    }
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {
            return match dir.parent().map(std::fs::metadata) {
                Some(Ok(parent)) if parent.is_dir() => Ok(()),
                _ => Err(bad("does not exist, nor does its parent directory".into())),
            };
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|e| bad(format!("cannot be created: {e}")))?;
            std::fs::symlink_metadata(dir).map_err(|e| bad(e.to_string()))?
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    if meta.file_type().is_symlink() {
        return Err(bad("is a symbolic link; name the directory itself".into()));
    }
    if !meta.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    // A shared sticky directory (/tmp, the reference's default) is taken:
    // each job builds in a private directory with a random name made
    // inside it (see `job::create_job_dir`).
    if meta.mode() & 0o022 != 0 && !(job::is_shared_sticky(&meta) && meta.uid() == 0) {
        return Err(bad(format!(
            "may be written by other users (mode {:04o}) and is not a root-owned sticky directory such as \
             /tmp; use a directory only root can write, or leave work-dir out to use the daemon's private one",
            meta.mode() & 0o7777
        )));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(bad(format!("is owned by uid {}, not by the daemon's user", meta.uid())));
    }
    Ok(())
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

impl CommitService {
    /// Creates the service and ends jobs a previous run left unfinished.
    pub fn new(
        capture: Arc<CaptureService>,
        background_workers: u32,
        nydus_cache: Option<nydus_image::BaseCache>,
    ) -> Result<CommitService, CommitError> {
        let store = capture.snapshotter().record_store();
        let service = CommitService {
            snapshotter: capture.snapshotter().clone(),
            jobs: Records::new(store.clone(), RecordKind::Jobs),
            chains: Records::new(store, RecordKind::Chains),
            registry: RegistryOptions::default(),
            capture,
            workers: tokio::sync::Semaphore::new(background_workers.max(1) as usize),
            nydus_cache,
            queues: queue::Queues::new(DEFAULT_MAX_QUEUED),
            ended: tokio::sync::Notify::new(),
        };
        for (id, job) in service.jobs.list()? {
            let Ok(mut job) = job else {
                warn!(job = id, "unreadable commit job record left as is");
                continue;
            };
            if matches!(job.state, JobState::Pending | JobState::Processing) {
                job.state = JobState::Failed;
                job.error_code = Some(CommitCode::BackgroundProcessingFailed);
                job.error = Some(format!("the daemon stopped while the job was {}", job.stage));
                job.ended = Some(SystemTime::now());
                let _ = service.snapshotter.remove_capture(&job.capture);
                service.save(&job)?;
                warn!(job = id, "commit job interrupted by a restart marked failed");
            }
        }
        service.prune_chains()?;
        // No job runs yet, so every capture but the chains' heads is garbage
        // (a daemon killed between a capture and persisting its job, or
        // between a push and recording its chain, leaves one).
        let heads: HashSet<PathBuf> = service.chains()?.into_iter().map(|(_, c)| c.head).collect();
        // A pinned capture (a checkpoint journaled before its dump) stays
        // until its owner stores or discards it.
        service.capture.sweep(&heads)?;
        Ok(service)
    }

    /// At most `max_queued` jobs per container are accepted while earlier
    /// ones still run (`[commit] max_queued`); without, 32.
    pub fn with_max_queued(mut self, max_queued: u32) -> CommitService {
        self.queues = queue::Queues::new(max_queued.max(1) as usize);
        self
    }

    /// Jobs reach registries as `registry` says (hosts, mirrors, CAs,
    /// credentials); without, as [`RegistryOptions::default`].
    pub fn with_registry(mut self, registry: RegistryOptions) -> CommitService {
        self.registry = registry;
        self
    }

    fn save(&self, job: &Job) -> Result<(), CommitError> {
        Ok(self.jobs.put(&job.snapshot_id, job)?)
    }

    /// Every recorded chain, by "<namespace>/<container>".
    fn chains(&self) -> Result<Vec<(String, Chain)>, CommitError> {
        Ok(self
            .chains
            .list()?
            .into_iter()
            .filter_map(|(key, chain)| match chain {
                Ok(chain) => Some((key, chain)),
                Err(e) => {
                    warn!(chain = key, error = %e, "unreadable commit chain record ignored");
                    None
                }
            })
            .collect())
    }

    fn chain(&self, key: &str) -> Option<Chain> {
        self.chains.get(key).ok()?
    }

    /// Drops the chains of containers whose snapshot is gone, with their
    /// captures.
    fn prune_chains(&self) -> Result<(), CommitError> {
        for (key, chain) in self.chains()? {
            if self.snapshotter.has_snapshot(&chain.origin.snapshot_key) {
                continue;
            }
            info!(chain = key, "container snapshot removed: dropping its commit chain");
            self.chains.remove(&key)?;
            if let Err(e) = self.snapshotter.remove_capture(&chain.head) {
                warn!(capture = %chain.head.display(), error = %e, "cannot remove capture");
            }
        }
        Ok(())
    }

    /// Records `chain` as the container's and removes the capture the one it
    /// replaces kept. Until the record is written the old chain stays valid:
    /// its layers plus a change since its head still make the right image.
    fn advance_chain(&self, key: &str, chain: &Chain) -> Result<(), CommitError> {
        let old = self.chain(key);
        self.chains.put(key, chain)?;
        if let Some(old) = old.filter(|old| old.head != chain.head) {
            if let Err(e) = self.snapshotter.remove_capture(&old.head) {
                warn!(capture = %old.head.display(), error = %e, "cannot remove capture");
            }
        }
        Ok(())
    }

    pub fn job(&self, snapshot_id: &str) -> Result<Job, CommitError> {
        self.jobs
            .get(snapshot_id)?
            .ok_or_else(|| CommitError::JobNotFound { id: snapshot_id.into() })
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Result<Vec<Job>, CommitError> {
        let mut jobs: Vec<Job> = self.jobs.list()?.into_iter().filter_map(|(_, job)| job.ok()).collect();
        jobs.sort_by_key(|j| j.started);
        Ok(jobs)
    }

    /// Captures the container and starts its background job. A container
    /// whose earlier commits still build or push is captured all the same:
    /// its job waits for theirs and builds on the last one's capture, in
    /// order, up to `max_queued` jobs per container.
    #[instrument(skip_all, fields(namespace = %options.namespace, container = %options.container, target = %options.target))]
    pub async fn commit(self: &Arc<Self>, options: CommitOptions) -> Result<Started, CommitError> {
        let began = std::time::Instant::now();
        options.validate()?;
        let container = self.capture.resolve(&options.namespace, &options.container).await?;
        let queue_key = chain_key(&options.namespace, &container.id);
        // A place in the container's queue before it is paused: a full
        // queue refuses without touching the container.
        let place = self.queues.reserve(&queue_key, &container.id)?;
        let now = SystemTime::now();
        let snapshot_id = format!("snapshot-{}", unix_nanos(now));
        let CapturedContainer {
            container,
            snapshot_key,
            snapshot_id: id,
            captured,
            slot,
            ..
        } = self
            .capture
            .capture_resolved(&options.namespace, container, &snapshot_id, false)
            .await?;
        let total = began.elapsed();
        let job = Job {
            snapshot_id: snapshot_id.clone(),
            container: container.id.clone(),
            namespace: options.namespace.clone(),
            source_image: container.image.clone(),
            snapshot_key,
            capture: captured.snapshot.clone(),
            new_upper: self.snapshotter.upper_dir(id),
            pause: captured.pause,
            total,
            state: JobState::Pending,
            progress: 0.0,
            stage: "queued".into(),
            started: now,
            ended: None,
            error_code: None,
            error: None,
            cause: None,
            manifest_digest: None,
            layer_plan: String::new(),
            commit_layers: 0,
            options,
        };
        if let Err(e) = self.save(&job) {
            let _ = self.snapshotter.remove_capture(&job.capture);
            return Err(e);
        }
        // Taken while the slot is held, so jobs run in the order of their
        // captures; then the next capture may come.
        let mut turn = place.enter(&snapshot_id);
        drop(slot);
        let started = Started {
            snapshot_id,
            pause: captured.pause,
            total,
            old_upper: captured.snapshot.join("fs"),
            new_upper: job.new_upper.clone(),
        };
        let service = self.clone();
        tokio::spawn(async move {
            let mut job = job;
            if let Some(before) = turn.before() {
                job.stage = format!("waiting for {before} of the same container");
                if let Err(e) = service.save(&job) {
                    warn!(job = job.snapshot_id, error = %e, "cannot persist job progress");
                }
            }
            turn.wait().await;
            service.run_job(job).await;
            drop(turn);
            service.ended.notify_waiters();
        });
        Ok(started)
    }

    /// The job `snapshot_id` once it has ended (completed or failed), or
    /// as it stands after `timeout`.
    pub async fn wait_job(&self, snapshot_id: &str, timeout: Duration) -> Result<Job, CommitError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the state is read, so an end in between
            // still wakes this waiter.
            let ended = self.ended.notified();
            let job = self.job(snapshot_id)?;
            if matches!(job.state, JobState::Completed | JobState::Failed) {
                return Ok(job);
            }
            // The record is the truth; the notification only saves polling.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            if tokio::time::timeout_at(wake, ended).await.is_err() && tokio::time::Instant::now() >= deadline {
                return self.job(snapshot_id);
            }
        }
    }

    pub fn snapshotter(&self) -> &Arc<Snapshotter> {
        &self.snapshotter
    }

    pub fn capture_service(&self) -> &Arc<CaptureService> {
        &self.capture
    }
}

/// The key of a container's chain record.
fn chain_key(namespace: &str, container: &str) -> String {
    format!("{namespace}/{container}")
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;

    fn options(work: &Path) -> CommitOptions {
        CommitOptions {
            namespace: "default".into(),
            container: "c1".into(),
            target: "127.0.0.1:5000/app:committed".into(),
            format: Format::Oci,
            work_dir: work.to_path_buf(),
            fs_version: 6,
            compressor: "lz4_block".into(),
            target_insecure: true,
            source_insecure: true,
            with_paths: vec![],
            without_paths: vec![],
            maximum_times: 10,
            target_creds: None,
            source_creds: None,
        }
    }

    #[test]
    fn validation_names_the_bad_parameter() {
        let tmp = tempfile::tempdir().unwrap();
        options(tmp.path()).validate().unwrap();
        let check = |f: &dyn Fn(&mut CommitOptions), needle: &str| {
            let mut o = options(tmp.path());
            f(&mut o);
            let e = o.validate().unwrap_err();
            assert_eq!(e.code(), CommitCode::InvalidParameter, "{e}");
            assert!(e.to_string().contains(needle), "{e} should mention {needle}");
        };
        check(&|o| o.target = "UPPER/Case:tag".into(), "target");
        check(&|o| o.target = "reg/app@sha256:00".into(), "target");
        check(&|o| o.compressor = "lzma".into(), "compressor");
        check(&|o| o.fs_version = 4, "fs-version");
        check(&|o| o.work_dir = "relative".into(), "work-dir");
        check(&|o| o.maximum_times = 0, "maximum-times");
        check(&|o| o.with_paths = vec!["etc".into()], "etc");
        check(&|o| o.namespace = "bad ns".into(), "namespace");
        check(&|o| o.work_dir = "/tmp/../tmp/no/such".into(), "nor does its parent");
        assert!(CommitOptions::parse_format("docker").is_err());
        assert_eq!(CommitOptions::parse_format("").unwrap(), Format::Nydus);
    }

    #[test]
    fn a_work_dir_others_could_swap_or_read_is_refused() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let with = |dir: PathBuf| CommitOptions {
            work_dir: dir,
            ..options(tmp.path())
        };
        // None named: the daemon's private scratch directory.
        with(PathBuf::new()).validate().unwrap();
        assert_eq!(
            with(PathBuf::new()).work_root(Path::new("/root/s")),
            Path::new("/root/s")
        );

        let missing = tmp.path().join("new");
        with(missing.clone()).validate().unwrap();
        assert!(!missing.exists(), "validating creates nothing");
        let e = with(tmp.path().join("no/such")).validate().unwrap_err().to_string();
        assert!(e.contains("nor does its parent"), "{e}");
        check_work_dir(&missing, true).unwrap();
        assert_eq!(fs::metadata(&missing).unwrap().mode() & 0o777, 0o700, "created private");

        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = with(open).validate().unwrap_err().to_string();
        assert!(e.contains("may be written by other users (mode 0777)"), "{e}");

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&missing, &link).unwrap();
        let e = with(link).validate().unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");

        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        let e = with(file).validate().unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");

        let job = create_job_dir(&missing, "job-1").unwrap();
        assert_eq!(job.to_path_buf(), missing.join("job-1"));
        assert_eq!(fs::metadata(&*job).unwrap().mode() & 0o777, 0o700);
        fs::write(job.join("left-over"), b"x").unwrap();
        std::mem::forget(job);
        let again = create_job_dir(&missing, "job-1").unwrap();
        assert!(!again.join("left-over").exists(), "a previous run's files are gone");
        let path = again.to_path_buf();
        drop(again);
        assert!(!path.exists(), "a job's directory goes with it");

        // A root-owned sticky directory such as /tmp (the reference's
        // default) is taken: each job gets a private directory with a
        // random name, so a name planted in advance is never used.
        let sticky = tmp.path().join("sticky");
        fs::create_dir(&sticky).unwrap();
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        with(sticky.clone()).validate().unwrap();
        with(PathBuf::from("/tmp")).validate().unwrap();
        let planted = sticky.join("snapshot-7");
        fs::create_dir(&planted).unwrap();
        let job = create_job_dir(&sticky, "snapshot-7").unwrap();
        assert_ne!(job.to_path_buf(), planted);
        assert!(
            job.starts_with(&sticky)
                && job
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("seamless-snapshot-7-")
        );
        assert_eq!(fs::metadata(&*job).unwrap().mode() & 0o7777, 0o700);
        assert!(planted.exists(), "what others made is left alone");
    }

    fn commit_layer(n: u64, created: SystemTime) -> CommitLayer {
        CommitLayer {
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            digest: format!("sha256:{n:064x}"),
            diff_id: format!("sha256:{:064x}", n + 100),
            size: 1,
            pushed_to: "r/out:1".into(),
            insecure: false,
            created_by: format!("seamless-commit snapshot-{n}"),
            created,
        }
    }

    #[test]
    fn config_gains_the_layers_and_their_history_entries() {
        let base = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[{"created_by":"base"}]}"#;
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let later = t + Duration::from_secs(60);
        let layers = [commit_layer(1, t), commit_layer(2, later)];
        let out = derive_config(base, &layers).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["rootfs"]["diff_ids"],
            serde_json::json!(["sha256:aa", layers[0].diff_id, layers[1].diff_id])
        );
        assert_eq!(v["history"].as_array().unwrap().len(), 3);
        assert_eq!(v["history"][1]["created_by"], "seamless-commit snapshot-1");
        assert_eq!(v["history"][2]["created"], rfc3339(later));
        assert_eq!(v["config"]["Cmd"][0], "/bin/sh");
        assert_eq!(v["created"], rfc3339(later));
        assert!(derive_config(b"[]", &layers).is_err());
        assert!(derive_config(br#"{"rootfs":{}}"#, &layers).is_err());
    }

    /// A snapshotter on a recording btrfs in `dir`, and the capture service
    /// over it that would reach containerd at `dir/socket`.
    fn capture_service(dir: &Path, socket: &str) -> (Arc<Snapshotter>, Arc<CaptureService>) {
        use crate::host::sys::RecordingSystem;
        let snapshotter = Arc::new(
            Snapshotter::open(
                dir,
                &crate::config::Config::default(),
                Arc::new(RecordingSystem::btrfs()),
            )
            .unwrap(),
        );
        let capture = Arc::new(CaptureService::new(snapshotter.clone(), dir, dir.join(socket)));
        (snapshotter, capture)
    }

    #[test]
    fn start_fails_interrupted_jobs_and_removes_their_captures() {
        use crate::host::sys::Freezer;
        let tmp = tempfile::tempdir().unwrap();
        let (snapshotter, capture) = capture_service(tmp.path(), "c.sock");
        let (_, id) = {
            snapshotter
                .prepare(
                    crate::snapshot::snapshotter::KeyStyle::Prefixed,
                    "ns/1/c",
                    "",
                    Default::default(),
                )
                .unwrap();
            snapshotter.container_snapshot("ns", "c").unwrap()
        };
        let take = |name: &str| {
            capture
                .capture_snapshot(id, name, &Freezer::V1("/cg".into()), false)
                .unwrap()
                .0
        };
        let captured = take("snapshot-1");
        let stray = take("snapshot-2");
        let job = Job {
            snapshot_id: "snapshot-1".into(),
            container: "c".into(),
            namespace: "ns".into(),
            source_image: "r/a:1".into(),
            options: options(tmp.path()),
            snapshot_key: "ns/1/c".into(),
            capture: captured.snapshot.clone(),
            new_upper: snapshotter.upper_dir(id),
            pause: Duration::from_millis(2),
            total: Duration::from_millis(9),
            state: JobState::Processing,
            progress: 0.5,
            stage: "building the layer".into(),
            started: SystemTime::now(),
            ended: None,
            error_code: None,
            error: None,
            cause: None,
            manifest_digest: None,
            layer_plan: String::new(),
            commit_layers: 0,
        };
        Records::new(snapshotter.record_store(), RecordKind::Jobs)
            .put("snapshot-1", &job)
            .unwrap();
        // A chain of the live container keeps its head; one of a removed
        // container is dropped with its capture.
        let head = take("snapshot-0");
        let gone_head = take("snapshot-00");
        let chain_of = |key: &str, head: &Path| Chain {
            origin: ChainOrigin {
                snapshot_key: key.into(),
                source_image: "r/a:1".into(),
                with_paths: vec![],
                without_paths: vec![],
                image_format: "oci".into(),
            },
            head: head.to_path_buf(),
            layers: vec![commit_layer(1, SystemTime::now())],
            bootstrap: None,
        };
        for (name, chain) in [
            ("ns/c", chain_of("ns/1/c", &head.snapshot)),
            ("ns/gone", chain_of("ns/9/gone", &gone_head.snapshot)),
        ] {
            Records::new(snapshotter.record_store(), RecordKind::Chains)
                .put(name, &chain)
                .unwrap();
        }
        let service = CommitService::new(capture.clone(), 1, None).unwrap();
        assert!(head.snapshot.exists(), "the live chain's head is kept");
        assert!(!gone_head.snapshot.exists(), "the removed container's head is removed");
        assert_eq!(
            service
                .chains()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>(),
            vec!["ns/c".to_string()]
        );
        let after = service.job("snapshot-1").unwrap();
        assert_eq!(after.state, JobState::Failed);
        assert_eq!(after.error_code, Some(CommitCode::BackgroundProcessingFailed));
        assert!(after.error.unwrap().contains("building the layer"));
        assert!(
            !captured.snapshot.exists() && !stray.snapshot.exists(),
            "captures removed"
        );
        assert_eq!(service.jobs().unwrap().len(), 1);
    }

    #[test]
    fn without_containerd_the_base_comes_from_the_registry() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, capture) = capture_service(tmp.path(), "no-containerd.sock");
        let service = CommitService::new(capture, 1, None).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = service.content_store("ns").await;
            assert!(store.is_none(), "no store where containerd does not answer");
            assert!(local_base(store.as_ref(), "localhost/app:1").await.is_none());
        });
    }

    #[test]
    fn codes_classify() {
        let e = CommitError::from(CaptureError::InProgress { container: "c".into() });
        assert_eq!(e.code(), CommitCode::SnapshotInProgress);
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        let e = CommitError::Containerd(ContainerdError::NotFound {
            namespace: "n".into(),
            query: "q".into(),
        });
        assert_eq!(e.code(), CommitCode::ContainerNotFound);
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(CommitCode::PauseTimeout.as_str(), "PAUSE_TIMEOUT");
    }
}
