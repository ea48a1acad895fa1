//! Restoring a checkpoint as a new container of containerd: the
//! checkpoint's tree written into a new snapshot of the image, the
//! container created from the recorded spec, and, for a checkpoint with
//! process state, its processes restored by CRIU through containerd's runc
//! shim (task create with runc's `criu_image_path`). Each step is undone
//! when a later one fails, and the error names the step.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use containerd_client::services::v1::CreateTaskRequest;
use nix::sys::stat::SFlag;
use tracing::{info, instrument, warn};

use super::beneath::{At, Beneath, BeneathError};
use super::catalogue::{Catalogue, Checkpoint};
use super::process::{self, ContainerRecord};
use super::remap::{self, Remap};
use super::tree::{self, Entry, EntryKind, Tree, TreePath};
use super::trust::{Admitted, RecordTrust};
use super::{visible, CheckpointError, CheckpointService, StorageSpec};
use crate::error::ErrorKind;
use crate::host::containerd::Containerd;
use crate::oci::overlay::OPAQUE_XATTR;

/// Blobs fetched at once unless the request says otherwise.
pub const DEFAULT_PARALLEL: usize = 3;
const MAX_PARALLEL: usize = 64;

#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub storage: StorageSpec,
    pub namespace: String,
    pub id: String,
    /// The new container's id; None: `<original>-restored`.
    pub name: Option<String>,
    pub resume: bool,
    pub parallel: usize,
    pub validate: bool,
    /// Addresses to move (`--network-remap`).
    pub network_remap: Vec<Remap>,
    /// Apply a container record no trusted key sealed as it is
    /// (`--trust-record`), instead of refusing what it may not have.
    pub trust_record: bool,
    /// The criu binary the caller names, run only as
    /// [`super::criu_choice`] allows; None: the daemon's own.
    pub criu_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Restored {
    pub container: String,
    pub pid: u32,
    pub status: String,
    pub process_restored: bool,
    pub checks: Vec<RestoreCheck>,
    pub duration: Duration,
    /// Where CRIU's restore.log was kept.
    pub restore_log: Option<PathBuf>,
    pub blobs_fetched: u64,
}

/// containerd's rule for container ids.
pub(super) fn validate_container_id(id: &str) -> Result<(), CheckpointError> {
    let valid = !id.is_empty()
        && id.len() <= 76
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(CheckpointError::Invalid(format!(
            "container name {id:?}: letters, digits and _ . - (starting with a letter or digit), at most 76"
        )))
    }
}

fn failed(step: &'static str, kind: ErrorKind) -> impl FnOnce(CheckpointError) -> CheckpointError {
    move |e| match e {
        already @ CheckpointError::Restore { .. } => already,
        other => {
            let kind = match crate::error::Classify::kind(&other) {
                ErrorKind::Internal => kind,
                k => k,
            };
            CheckpointError::Restore {
                step,
                reason: other.to_string(),
                log: String::new(),
                kind,
            }
        }
    }
}

/// What was created so far, undone in reverse on failure.
#[derive(Default)]
struct Made {
    lease: Option<String>,
    snapshot: Option<(String, String)>,
    container: Option<String>,
    task: bool,
    /// A network namespace whose addresses were moved, and how.
    renumbered: Option<(PathBuf, Vec<Remap>)>,
}

impl CheckpointService {
    #[instrument(skip_all, fields(namespace = %request.namespace, id = %request.id))]
    pub async fn restore(&self, request: RestoreRequest) -> Result<Restored, CheckpointError> {
        let started = Instant::now();
        crate::host::containerd::validate_namespace(&request.namespace)
            .map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        if request.parallel == 0 || request.parallel > MAX_PARALLEL {
            return Err(CheckpointError::Invalid(format!(
                "parallel must be 1 to {MAX_PARALLEL}, got {}",
                request.parallel
            )));
        }
        let catalogue = self.catalogue(&request.storage)?;
        let checkpoint = {
            let (catalogue, namespace, id) = (catalogue.clone(), request.namespace.clone(), request.id.clone());
            tokio::task::spawn_blocking(move || visible(&catalogue, &namespace, &id))
                .await
                .map_err(|e| CheckpointError::Task(e.to_string()))??
        };
        if checkpoint.engine == super::catalogue::ENGINE_DOCKER {
            return self.restore_docker(&request, catalogue, checkpoint).await;
        }
        // A criu binary the daemon will not run is refused before anything
        // is created (and checked again where it is used); a checkpoint
        // without process state runs no CRIU, as create ignores it then.
        if checkpoint.process.is_some() {
            self.settings.criu_for(request.criu_path.as_deref())?;
        }
        let Some(record_key) = checkpoint.container_key.clone() else {
            return Err(CheckpointError::Invalid(format!(
                "checkpoint {} holds no container record (it was made by an older version or imported from an \
                 archive): it cannot be restored as a container",
                checkpoint.id
            )));
        };
        let name = request
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-restored", checkpoint.container));
        validate_container_id(&name)?;
        let containerd = Containerd::connect(self.capture.containerd_address()).await?;
        if containerd.container_exists(&request.namespace, &name).await? {
            return Err(CheckpointError::Restore {
                step: "name",
                reason: format!(
                    "container {name} already exists in namespace {}; choose another with --name",
                    request.namespace
                ),
                log: String::new(),
                kind: ErrorKind::AlreadyExists,
            });
        }
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let work = self.root.join("restore-work").join(format!("{name}-{stamp}"));
        let fetch_started = Instant::now();
        let fetched = {
            let (catalogue, checkpoint, work, parallel, validate, remaps) = (
                catalogue.clone(),
                checkpoint.clone(),
                work.clone(),
                request.parallel,
                request.validate,
                request.network_remap.clone(),
            );
            let admission = Admission {
                trust: self.settings.trust.clone(),
                namespace: request.namespace.clone(),
                apply_untrusted: request.trust_record,
            };
            tokio::task::spawn_blocking(move || {
                fetch(
                    &catalogue,
                    &checkpoint,
                    &record_key,
                    &work,
                    parallel,
                    validate,
                    &remaps,
                    &admission,
                )
            })
            .await
            .map_err(|e| CheckpointError::Task(e.to_string()))?
        };
        let fetched = match fetched {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&work);
                return Err(failed("fetch", ErrorKind::FailedPrecondition)(e));
            }
        };
        let fetch_time = fetch_started.elapsed();
        let mut made = Made::default();
        let result = self
            .create_restored(
                &containerd,
                &catalogue,
                &request,
                &checkpoint,
                &name,
                &work,
                &fetched,
                &mut made,
            )
            .await;
        let log = self.keep_restore_log(&work, &name, stamp);
        let (pid, status) = match result {
            Ok(done) => done,
            Err(e) => {
                undo(&containerd, &request.namespace, &name, made).await;
                let _ = fs::remove_dir_all(&work);
                return Err(match (e, &log) {
                    (CheckpointError::Restore { step, reason, kind, .. }, Some(log)) => CheckpointError::Restore {
                        step,
                        reason,
                        log: {
                            let errors = crate::host::criu::log_errors(log);
                            let said = if errors.is_empty() {
                                String::new()
                            } else {
                                format!("; CRIU says: {}", errors.join(" | "))
                            };
                            format!("{said}; CRIU's log is kept at {}", log.display())
                        },
                        kind,
                    },
                    (e, _) => e,
                });
            }
        };
        if let Err(e) = fs::remove_dir_all(&work) {
            warn!(work = %work.display(), error = %e, "restore scratch directory left");
        }
        let checks = if request.validate {
            validate(&containerd, &request.namespace, &name, request.resume, fetched.process).await
        } else {
            Vec::new()
        };
        let restored = Restored {
            container: name,
            pid,
            status,
            process_restored: fetched.process,
            checks,
            duration: started.elapsed(),
            restore_log: log,
            blobs_fetched: fetched.blobs,
        };
        info!(
            container = restored.container,
            pid = restored.pid,
            status = restored.status,
            process = restored.process_restored,
            seconds = restored.duration.as_secs_f64(),
            fetch_seconds = fetch_time.as_secs_f64(),
            "checkpoint restored"
        );
        Ok(restored)
    }

    /// Creates the snapshot, writes the tree, creates the container and its
    /// task; returns the task's pid and status.
    #[allow(clippy::too_many_arguments)]
    async fn create_restored(
        &self,
        containerd: &Containerd,
        catalogue: &Catalogue,
        request: &RestoreRequest,
        checkpoint: &Checkpoint,
        name: &str,
        work: &Path,
        fetched: &Fetched,
        made: &mut Made,
    ) -> Result<(u32, String), CheckpointError> {
        let ns = request.namespace.as_str();
        let record = &fetched.record;
        let lease = format!("seamless-restore-{name}-{}", std::process::id());
        containerd
            .create_lease(ns, &lease)
            .await
            .map_err(|e| failed("lease", ErrorKind::Internal)(e.into()))?;
        made.lease = Some(lease.clone());
        containerd
            .prepare_snapshot(ns, &lease, &record.snapshotter, name, &record.snapshot_parent)
            .await
            .map_err(|e| match e {
                crate::host::containerd::ContainerdError::Missing { .. } => CheckpointError::Restore {
                    step: "snapshot",
                    reason: format!(
                        "the layers of image {} are not on snapshotter {} here (snapshot {} is missing): pull the \
                         image first",
                        record.image, record.snapshotter, record.snapshot_parent
                    ),
                    log: String::new(),
                    kind: ErrorKind::FailedPrecondition,
                },
                other => failed("snapshot", ErrorKind::Internal)(other.into()),
            })?;
        made.snapshot = Some((record.snapshotter.clone(), name.to_string()));
        if record.snapshotter != crate::snapshot::snapshotter::SNAPSHOTTER_NAME {
            return Err(CheckpointError::Restore {
                step: "filesystem",
                reason: format!(
                    "the container was on snapshotter {}, not {}: only containers of this snapshotter are restored",
                    record.snapshotter,
                    crate::snapshot::snapshotter::SNAPSHOTTER_NAME
                ),
                log: String::new(),
                kind: ErrorKind::FailedPrecondition,
            });
        }
        let snapshotter = self.capture.snapshotter().clone();
        let (_, snapshot_id) = snapshotter
            .container_snapshot(ns, name)
            .map_err(|e| failed("filesystem", ErrorKind::Internal)(CheckpointError::Task(e.to_string())))?;
        let upper = snapshotter.upper_dir(snapshot_id);
        {
            let (catalogue, checkpoint) = (catalogue.clone(), checkpoint.clone());
            let remaps = request.network_remap.clone();
            tokio::task::spawn_blocking(move || {
                write_checkpoint_tree(&catalogue, &checkpoint, &upper)?;
                remap_hosts_file(&upper, &remaps)
            })
            .await
            .map_err(|e| CheckpointError::Task(e.to_string()))?
            .map_err(failed("filesystem", ErrorKind::Internal))?;
        }
        let criu_config = match &fetched.criu_config {
            Some(text) => {
                let path = work.join("criu.conf");
                write_private(&path, text.as_bytes()).map_err(failed("container", ErrorKind::Internal))?;
                Some(path)
            }
            None => None,
        };
        let container = record
            .to_container(name, &checkpoint.id, criu_config.as_deref())
            .map_err(|e| failed("container", ErrorKind::FailedPrecondition)(e.into()))?;
        containerd
            .create_container(ns, container)
            .await
            .map_err(|e| failed("container", ErrorKind::Internal)(e.into()))?;
        made.container = Some(name.to_string());
        if !fetched.process && !request.resume {
            // The filesystem alone, not started: a container without task,
            // which `ctr tasks start` or `nerdctl start` starts.
            if let Some(lease) = made.lease.take() {
                if let Err(e) = containerd.delete_lease(ns, &lease).await {
                    warn!(lease, error = %e, "restore lease left to expire");
                }
            }
            return Ok((0, "created".into()));
        }
        if let (Some(netns), false) = (&fetched.netns, request.network_remap.is_empty()) {
            let (path, remaps) = (netns.clone(), request.network_remap.clone());
            let moved = tokio::task::spawn_blocking(move || remap::renumber_netns(&path, &remaps))
                .await
                .map_err(|e| CheckpointError::Task(e.to_string()))?
                .map_err(network_failure)?;
            made.renumbered = Some((netns.clone(), request.network_remap.clone()));
            for m in &moved {
                info!(device = m.device, from = %m.from, to = %m.to, netns = %netns.display(), "address remapped");
            }
        }
        let mounts = containerd
            .snapshot_mounts(ns, &record.snapshotter, name)
            .await
            .map_err(|e| failed("task", ErrorKind::Internal)(e.into()))?;
        let options = match &fetched.images {
            Some(images) => {
                let criu_work = work.join("criu");
                fs::create_dir_all(&criu_work)
                    .map_err(|e| failed("task", ErrorKind::Internal)(CheckpointError::Task(e.to_string())))?;
                let settings = self
                    .settings
                    .criu_for(request.criu_path.as_deref())
                    .map_err(failed("task", ErrorKind::FailedPrecondition))?;
                Some(
                    crate::host::criu::restore_options(
                        record.runtime_options().as_ref(),
                        images,
                        &criu_work,
                        settings.criu.as_deref(),
                    )
                    .map_err(|reason| {
                        failed("task", ErrorKind::FailedPrecondition)(CheckpointError::Invalid(reason))
                    })?,
                )
            }
            None => None,
        };
        containerd
            .create_task(
                ns,
                CreateTaskRequest {
                    container_id: name.to_string(),
                    rootfs: mounts,
                    options,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| failed("task", ErrorKind::Internal)(e.into()))?;
        made.task = true;
        let step = if fetched.process { "restore processes" } else { "start" };
        // A checkpoint's processes are restored when the task starts; left
        // paused unless resumed.
        let mut pid = containerd
            .start_task(ns, name)
            .await
            .map_err(|e| failed(step, ErrorKind::Internal)(e.into()))?;
        // A dump of a container held frozen (--pre-freeze) restores
        // frozen, as CRIU found it.
        let frozen = containerd
            .task(ns, name)
            .await
            .map_err(|e| failed("status", ErrorKind::Internal)(e.into()))?
            .is_some_and(|t| t.status == "paused");
        if request.resume && frozen {
            containerd
                .resume_task(ns, name)
                .await
                .map_err(|e| failed("resume", ErrorKind::Internal)(e.into()))?;
        } else if !request.resume && !frozen {
            containerd
                .pause_task(ns, name)
                .await
                .map_err(|e| failed("pause", ErrorKind::Internal)(e.into()))?;
        }
        if let Some(lease) = made.lease.take() {
            if let Err(e) = containerd.delete_lease(ns, &lease).await {
                warn!(lease, error = %e, "restore lease left to expire");
            }
        }
        let status = containerd
            .task(ns, name)
            .await
            .map_err(|e| failed("status", ErrorKind::Internal)(e.into()))?
            .map(|t| {
                pid = if pid == 0 { t.pid } else { pid };
                t.status
            })
            .unwrap_or_else(|| "unknown".into());
        Ok((pid, status))
    }

    /// Copies CRIU's restore.log out of the scratch directory, which goes.
    fn keep_restore_log(&self, work: &Path, name: &str, stamp: u128) -> Option<PathBuf> {
        let log = work.join("criu").join("restore.log");
        let text = fs::read(&log).ok()?;
        let dir = self.root.join("restore-logs");
        let kept = dir.join(format!("{name}-{stamp}.restore.log"));
        let written = fs::create_dir_all(&dir)
            .map_err(CheckpointError::from_io(&dir))
            .and_then(|()| write_private(&kept, &text));
        match written {
            Ok(()) => Some(kept),
            Err(e) => {
                warn!(error = %e, "cannot keep restore.log");
                None
            }
        }
    }
}

impl CheckpointError {
    fn from_io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
        move |e| CheckpointError::Task(format!("{}: {e}", path.display()))
    }
}

pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(CheckpointError::from_io(path))?;
    file.write_all(bytes).map_err(CheckpointError::from_io(path))
}

/// Undoes what a failed restore made, newest first.
async fn undo(containerd: &Containerd, ns: &str, name: &str, made: Made) {
    if made.task {
        if let Err(e) = containerd.remove_task(ns, name).await {
            warn!(container = name, error = %e, "cannot remove the task of a failed restore");
        }
    }
    if made.container.is_some() {
        if let Err(e) = containerd.delete_container(ns, name).await {
            warn!(container = name, error = %e, "cannot remove the container of a failed restore");
        }
    }
    if let Some((snapshotter, key)) = made.snapshot {
        if let Err(e) = containerd.remove_snapshot(ns, &snapshotter, &key).await {
            warn!(snapshot = key, error = %e, "cannot remove the snapshot of a failed restore");
        }
    }
    if let Some(lease) = made.lease {
        let _ = containerd.delete_lease(ns, &lease).await;
    }
    if let Some((netns, remaps)) = made.renumbered {
        let back: Vec<Remap> = remaps.iter().map(Remap::reversed).collect();
        let undone = tokio::task::spawn_blocking(move || remap::renumber_netns(&netns, &back)).await;
        if !matches!(undone, Ok(Ok(_))) {
            warn!(
                container = name,
                "cannot move the network namespace's addresses back after a failed restore"
            );
        }
    }
}

/// Moves the addresses of the container's own /etc/hosts (in its writable
/// layer) by `remaps`. Only a regular file reached through directories is
/// rewritten: through a symlink (of `etc` or of `hosts`) the name is some
/// other file, perhaps the host's, and is left alone.
fn remap_hosts_file(upper: &Path, remaps: &[Remap]) -> Result<(), CheckpointError> {
    if remaps.is_empty() {
        return Ok(());
    }
    let beneath = Beneath::open(upper).map_err(beneath_failure)?;
    let hosts = TreePath::new("etc/hosts").map_err(|e| CheckpointError::Task(e.to_string()))?;
    let at = match beneath.at(&hosts) {
        Ok(at) => at,
        Err(BeneathError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(refused @ BeneathError::Refused { .. }) => {
            warn!(error = %refused, "/etc/hosts not remapped");
            return Ok(());
        }
        Err(e) => return Err(beneath_failure(e)),
    };
    let Some(bytes) = at.read_regular().map_err(beneath_failure)? else {
        return Ok(());
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| CheckpointError::Task(format!("{}/etc/hosts is not UTF-8", upper.display())))?;
    let (rewritten, moved) = remap::rewrite_hosts(&text, remaps);
    if moved > 0 {
        at.rewrite_regular(rewritten.as_bytes()).map_err(beneath_failure)?;
        info!(entries = moved, "/etc/hosts entries remapped");
    }
    Ok(())
}

/// What a restore takes from storage before it creates anything.
struct Fetched {
    record: ContainerRecord,
    /// The CRIU image directory to restore from (its parents linked).
    images: Option<PathBuf>,
    process: bool,
    criu_config: Option<String>,
    blobs: u64,
    /// The network namespace the container joined by path.
    netns: Option<PathBuf>,
}

/// How a fetched container record is admitted (see `trust`).
struct Admission {
    trust: std::sync::Arc<RecordTrust>,
    namespace: String,
    apply_untrusted: bool,
}

#[allow(clippy::too_many_arguments)]
fn fetch(
    catalogue: &Catalogue,
    checkpoint: &Checkpoint,
    record_key: &str,
    work: &Path,
    parallel: usize,
    validate: bool,
    remaps: &[Remap],
    admission: &Admission,
) -> Result<Fetched, CheckpointError> {
    let record_path = fetch_record(catalogue, checkpoint, record_key, work, validate)?;
    let mut record: ContainerRecord =
        serde_json::from_slice(&fs::read(&record_path).map_err(CheckpointError::from_io(&record_path))?)
            .map_err(|e| CheckpointError::Invalid(format!("container record of {}: {e}", checkpoint.id)))?;
    // Before anything reads the record (the network namespace below) or
    // anything is created from it.
    let admitted = admission
        .trust
        .admit(&mut record, &admission.namespace, admission.apply_untrusted)
        .map_err(|e| CheckpointError::Restore {
            step: "record",
            reason: format!("checkpoint {}: {e}", checkpoint.id),
            log: String::new(),
            kind: ErrorKind::FailedPrecondition,
        })?;
    match admitted {
        Admitted::Sealed { key_id } => info!(key_id, "container record sealed by a trusted key"),
        Admitted::Rebuilt { why } => {
            info!(
                why,
                "container record not trusted: restored as an ordinary container of its image"
            )
        }
        Admitted::ForcedByRequest { why } => warn!(
            why,
            checkpoint = checkpoint.id,
            "container record not trusted, applied as recorded because the restore request said --trust-record"
        ),
    }
    let mut blobs = 1;
    let (images, criu_config) = match &checkpoint.process {
        Some(state) => {
            let dirs = process::unpack_images(catalogue, &state.images, &work.join("images"), parallel)?;
            blobs += dirs.len() as u64;
            (dirs.last().cloned(), process::restore_criu_config(state))
        }
        None => (None, None),
    };
    let netns = network_namespace_path(&record)?;
    if !remaps.is_empty() {
        if let Some(images) = &images {
            if netns.is_none() {
                return Err(network_failure(
                    "the container had a network namespace of its own, which CRIU restores as it was dumped: only a \
                     container that joined a network namespace by path (CNI, CRI, ctr run --with-ns) can be remapped"
                        .into(),
                ));
            }
            let moved = remap::rewrite_images(images, remaps).map_err(network_failure)?;
            info!(sockets = moved, "socket addresses remapped in the CRIU images");
        }
    }
    Ok(Fetched {
        record,
        process: images.is_some(),
        images,
        criu_config,
        blobs,
        netns,
    })
}

/// Makes the private scratch directory `work`, verifies every object of
/// `checkpoint` when asked, and fetches its container record (checked
/// against its digest) into `work/record.json`, whose path it returns.
pub(super) fn fetch_record(
    catalogue: &Catalogue,
    checkpoint: &Checkpoint,
    record_key: &str,
    work: &Path,
    validate: bool,
) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(work).map_err(CheckpointError::from_io(work))?;
    fs::set_permissions(work, fs::Permissions::from_mode(0o700)).map_err(CheckpointError::from_io(work))?;
    if validate {
        let (checked, failures) = catalogue.verify(checkpoint)?;
        if !failures.is_empty() {
            return Err(CheckpointError::Invalid(format!(
                "{} of {checked} objects of checkpoint {} do not match their digests: {}",
                failures.len(),
                checkpoint.id,
                failures.join("; ")
            )));
        }
    }
    let record_path = work.join("record.json");
    catalogue.fetch_verified(record_key, &record_path)?;
    Ok(record_path)
}

fn network_failure(reason: String) -> CheckpointError {
    CheckpointError::Restore {
        step: "network",
        reason,
        log: String::new(),
        kind: ErrorKind::FailedPrecondition,
    }
}

/// The network namespace the container joined by path, if it did.
fn network_namespace_path(record: &ContainerRecord) -> Result<Option<PathBuf>, CheckpointError> {
    let namespaces = record.spec["linux"]["namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let Some(path) = namespaces
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    if !path.starts_with('/') || path.split('/').any(|p| p == "..") {
        return Err(CheckpointError::Invalid(format!(
            "the container's network namespace {path:?} is not an absolute path"
        )));
    }
    Ok(Some(PathBuf::from(path)))
}

/// Writes the whole tree of `checkpoint` into the empty upper directory
/// `upper`, as the container's writable layer was: whiteouts as overlay
/// whiteouts, opaque directories marked, owners, modes, times and extended
/// attributes restored; every file's content checked against its digest.
pub fn write_checkpoint_tree(
    catalogue: &Catalogue,
    checkpoint: &Checkpoint,
    upper: &Path,
) -> Result<(), CheckpointError> {
    let (tree, keys) = catalogue.restore_plan(checkpoint)?;
    write_tree(&tree, upper, &mut |digest, out| {
        let key = keys
            .get(digest)
            .ok_or_else(|| CheckpointError::Invalid(format!("no stored content for sha256:{digest}")))?;
        Ok(catalogue.copy_verified(key, digest, out)?)
    })
    .map_err(|e| match e {
        CheckpointError::Invalid(reason) => CheckpointError::Invalid(format!("checkpoint {}: {reason}", checkpoint.id)),
        other => other,
    })
}

type Content<'a> = dyn FnMut(&str, &mut fs::File) -> Result<u64, CheckpointError> + 'a;

/// A write beneath the upper directory that failed: refused (a symlink on
/// the way, a path leaving the root) or an I/O error.
fn beneath_failure(e: BeneathError) -> CheckpointError {
    match e {
        refused @ BeneathError::Refused { .. } => CheckpointError::Invalid(refused.to_string()),
        other => CheckpointError::Task(other.to_string()),
    }
}

/// Writes `tree` into the empty directory `upper`. The tree is checked
/// whole first ([`tree::validate_tree`]: plain paths, directories as
/// ancestors, hard links to earlier files of the tree), so a refused tree
/// writes nothing; then every entry is made through [`Beneath`], which
/// cannot leave `upper` whatever the tree or a racer does. Entries go in
/// [`tree::walk_order`]: directories before what they hold, the first path
/// of an inode before its hard links.
fn write_tree(tree: &Tree, upper: &Path, content: &mut Content<'_>) -> Result<(), CheckpointError> {
    tree::validate_tree(tree)
        .map_err(|e| CheckpointError::Invalid(format!("its tree is refused, nothing was written: {e}")))?;
    let beneath = Beneath::open(upper).map_err(beneath_failure)?;
    let path_of =
        |rel: &str| TreePath::new(rel).map_err(|e| CheckpointError::Invalid(format!("its tree is refused: {e}")));
    let entries = tree::in_walk_order(tree);
    for (rel, entry) in &entries {
        let at = beneath.at(&path_of(rel.as_str())?).map_err(beneath_failure)?;
        match entry.kind {
            EntryKind::Dir => {
                at.create_dir(0o700).map_err(beneath_failure)?;
                if entry.opaque {
                    at.set_xattr(OPAQUE_XATTR, b"y").map_err(beneath_failure)?;
                }
            }
            EntryKind::File => {
                if let Some(first) = &entry.hardlink {
                    let first = beneath.at(&path_of(first)?).map_err(beneath_failure)?;
                    at.hard_link_to(&first).map_err(beneath_failure)?;
                    continue;
                }
                let mut file = at.create_file(0o600).map_err(beneath_failure)?;
                if let Some(digest) = &entry.digest {
                    let written = content(digest, &mut file)?;
                    if written != entry.size {
                        return Err(CheckpointError::Invalid(format!(
                            "{rel}: stored content has {written} bytes, the tree says {}",
                            entry.size
                        )));
                    }
                } else if entry.size != 0 {
                    return Err(CheckpointError::Invalid(format!(
                        "{rel}: a non-empty file without content digest"
                    )));
                }
                set_metadata(Written::File(&file, rel.as_str()), entry)?;
                continue;
            }
            EntryKind::Symlink => {
                let target = entry
                    .target
                    .as_deref()
                    .ok_or_else(|| CheckpointError::Invalid(format!("{rel}: a symlink without target")))?;
                at.symlink(target).map_err(beneath_failure)?;
            }
            EntryKind::Fifo | EntryKind::Char | EntryKind::Block | EntryKind::Socket | EntryKind::Whiteout => {
                let (kind, rdev) = match entry.kind {
                    EntryKind::Fifo => (SFlag::S_IFIFO, 0),
                    EntryKind::Char => (SFlag::S_IFCHR, entry.rdev),
                    EntryKind::Block => (SFlag::S_IFBLK, entry.rdev),
                    EntryKind::Socket => (SFlag::S_IFSOCK, 0),
                    // overlayfs's whiteout: a 0:0 character device.
                    _ => (SFlag::S_IFCHR, 0),
                };
                at.make_node(kind, 0o600, rdev).map_err(beneath_failure)?;
            }
        }
        set_metadata(Written::Named(&at), entry)?;
    }
    // Directory times last: writing their entries changed them.
    for (rel, entry) in entries.iter().rev().filter(|(_, e)| e.kind == EntryKind::Dir) {
        let at = beneath.at(&path_of(rel.as_str())?).map_err(beneath_failure)?;
        at.set_times(entry.mtime_ns).map_err(beneath_failure)?;
    }
    Ok(())
}

/// An entry just made: a regular file through its own descriptor (no
/// lookup at all, the common case made cheap), anything else through its
/// name beneath the root.
enum Written<'a> {
    /// The file and its path in the tree (for messages).
    File(&'a fs::File, &'a str),
    Named(&'a At<'a>),
}

/// Owner, extended attributes, mode and (but for directories, done last)
/// times of the entry just made; each on the entry itself, never through a
/// symlink.
fn set_metadata(written: Written<'_>, entry: &Entry) -> Result<(), CheckpointError> {
    use nix::sys::stat::{fchmod, futimens, Mode};
    use nix::sys::time::TimeSpec;
    use nix::unistd::{fchown, Gid, Uid};
    use std::os::fd::AsRawFd;
    use xattr::FileExt;
    if entry.kind == EntryKind::Whiteout {
        return Ok(());
    }
    let at = match written {
        Written::Named(at) => at,
        Written::File(file, rel) => {
            let failed = |op: &str, e: &dyn std::fmt::Display| CheckpointError::Task(format!("{rel}: {op}: {e}"));
            let fd = file.as_raw_fd();
            fchown(fd, Some(Uid::from_raw(entry.uid)), Some(Gid::from_raw(entry.gid)))
                .map_err(|e| failed("chown", &e))?;
            for (name, value) in &entry.xattrs {
                let bytes = crate::oci::digest::unhex(value)
                    .ok_or_else(|| CheckpointError::Invalid(format!("{rel}: xattr {name}: value is not hex")))?;
                file.set_xattr(name, &bytes)
                    .map_err(|e| failed(&format!("set xattr {name}"), &e))?;
            }
            // After chown, which clears setuid and setgid.
            fchmod(fd, Mode::from_bits_truncate(entry.mode & 0o7777)).map_err(|e| failed("chmod", &e))?;
            let t = TimeSpec::new(
                entry.mtime_ns.div_euclid(1_000_000_000),
                entry.mtime_ns.rem_euclid(1_000_000_000),
            );
            return futimens(fd, &t, &t).map_err(|e| failed("set times", &e));
        }
    };
    at.set_owner(entry.uid, entry.gid).map_err(beneath_failure)?;
    for (name, value) in &entry.xattrs {
        let bytes = crate::oci::digest::unhex(value)
            .ok_or_else(|| CheckpointError::Invalid(format!("xattr {name}: value is not hex")))?;
        at.set_xattr(name, &bytes).map_err(beneath_failure)?;
    }
    if entry.kind != EntryKind::Symlink {
        // After chown, which clears setuid and setgid.
        at.set_mode(entry.mode & 0o7777).map_err(beneath_failure)?;
    }
    if entry.kind != EntryKind::Dir {
        at.set_times(entry.mtime_ns).map_err(beneath_failure)?;
    }
    Ok(())
}

/// The checks a user would otherwise make by hand after a restore.
async fn validate(containerd: &Containerd, ns: &str, name: &str, resume: bool, process: bool) -> Vec<RestoreCheck> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        checks.push(RestoreCheck {
            name: name.to_string(),
            ok,
            detail,
        })
    };
    let expected = if resume {
        "running"
    } else if process {
        "paused"
    } else {
        "created"
    };
    match containerd.task(ns, name).await {
        Ok(Some(task)) => {
            check(
                "status",
                task.status == expected,
                format!("task is {} (expected {expected})", task.status),
            );
            check("api", true, "containerd answers for the task".into());
            let alive = task.pid > 0 && Path::new(&format!("/proc/{}", task.pid)).exists();
            check(
                "process",
                alive,
                if alive {
                    format!("init process {} is alive", task.pid)
                } else {
                    format!("init process {} is not alive", task.pid)
                },
            );
        }
        Ok(None) if expected == "created" => check(
            "status",
            true,
            "the container is created without a task (start it with ctr tasks start)".into(),
        ),
        Ok(None) => check("status", false, "the container has no task".into()),
        Err(e) => check("api", false, e.to_string()),
    }
    match containerd.container(ns, name).await {
        Ok(c) => {
            let log = c
                .labels
                .get("nerdctl/log-uri")
                .or_else(|| c.labels.get("io.containerd.log-uri"));
            match log {
                Some(uri) => {
                    let path = uri.strip_prefix("file://").unwrap_or(uri);
                    let readable = fs::File::open(path).is_ok();
                    check(
                        "logs",
                        readable,
                        if readable {
                            format!("log {path} is readable")
                        } else {
                            format!("log {path} cannot be read")
                        },
                    );
                }
                None => check(
                    "logs",
                    true,
                    "the container has no log file (its output is not kept by containerd)".into(),
                ),
            }
        }
        Err(e) => check("logs", false, e.to_string()),
    }
    if expected == "created" {
        check("stats", true, "not started: no process to measure yet".into());
        return checks;
    }
    match containerd.task_metrics(ns, name).await {
        Ok(n) if n > 0 => check("stats", true, "containerd reports the task's cgroup metrics".into()),
        Ok(_) => check("stats", false, "containerd reports no metrics for the task".into()),
        Err(e) => check("stats", false, e.to_string()),
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    const D1: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    const D2: &str = "486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7";

    fn entry(kind: EntryKind, mode: u32) -> Entry {
        Entry {
            uid: 1000,
            gid: 100,
            mtime_ns: 1_600_000_000_123_456_789,
            ..Entry::bare(kind, mode)
        }
    }

    #[test]
    fn names_follow_containerd() {
        for ok in ["web", "web-restored", "a.b_c-1"] {
            validate_container_id(ok).unwrap();
        }
        for bad in ["", "-a", "a/b", "a b", &"a".repeat(77)] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trees_are_written_back_as_the_upper_directory_was() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test writes owners and device nodes: run it as root");
        }
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir(&upper).unwrap();
        let mut tree = Tree::new();
        tree.insert(String::new(), entry(EntryKind::Dir, 0o755));
        let mut etc = entry(EntryKind::Dir, 0o750);
        etc.opaque = true;
        tree.insert("etc".into(), etc);
        let mut conf = entry(EntryKind::File, 0o4640);
        conf.digest = Some(D1.into());
        conf.size = 5;
        conf.xattrs.insert("user.origin".into(), "6869".into());
        tree.insert("etc/app.conf".into(), conf);
        let mut link = entry(EntryKind::File, 0o4640);
        link.hardlink = Some("etc/app.conf".into());
        tree.insert("etc/app.link".into(), link);
        let mut sym = entry(EntryKind::Symlink, 0o777);
        sym.target = Some("app.conf".into());
        tree.insert("etc/current".into(), sym);
        tree.insert("etc/pipe".into(), entry(EntryKind::Fifo, 0o600));
        tree.insert("gone".into(), entry(EntryKind::Whiteout, 0));
        // A hard link whose first path sorts after it by name but comes
        // first in the walk that captured it ("a" before "a-link").
        tree.insert("a".into(), entry(EntryKind::Dir, 0o755));
        let mut first = entry(EntryKind::File, 0o644);
        first.digest = Some(D1.into());
        first.size = 5;
        tree.insert("a/x".into(), first);
        let mut early = entry(EntryKind::File, 0o644);
        early.hardlink = Some("a/x".into());
        tree.insert("a-link".into(), early);
        let mut served = Vec::new();
        write_tree(&tree, &upper, &mut |digest, out| {
            use std::io::Write;
            served.push(digest.to_string());
            out.write_all(b"hello").unwrap();
            Ok(5)
        })
        .unwrap();
        assert_eq!(served, vec![D1, D1]);
        let conf = fs::metadata(upper.join("etc/app.conf")).unwrap();
        assert_eq!(conf.mode() & 0o7777, 0o4640);
        assert_eq!((conf.uid(), conf.gid()), (1000, 100));
        assert_eq!(conf.mtime(), 1_600_000_000);
        assert_eq!(conf.mtime_nsec(), 123_456_789);
        assert_eq!(conf.nlink(), 2);
        assert_eq!(fs::read(upper.join("etc/app.link")).unwrap(), b"hello");
        assert_eq!(
            xattr::get(upper.join("etc/app.conf"), "user.origin").unwrap().unwrap(),
            b"hi"
        );
        assert_eq!(xattr::get(upper.join("etc"), OPAQUE_XATTR).unwrap().unwrap(), b"y");
        let etc = fs::metadata(upper.join("etc")).unwrap();
        assert_eq!(
            etc.mtime_nsec(),
            123_456_789,
            "directory times are set after their entries"
        );
        assert_eq!(fs::read_link(upper.join("etc/current")).unwrap(), Path::new("app.conf"));
        assert!(fs::metadata(upper.join("etc/pipe")).unwrap().file_type().is_fifo());
        let gone = fs::symlink_metadata(upper.join("gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), 0);
        assert_eq!(
            fs::metadata(upper.join("a-link")).unwrap().ino(),
            fs::metadata(upper.join("a/x")).unwrap().ino()
        );

        let mut bad = Tree::new();
        bad.insert("../escape".into(), entry(EntryKind::Dir, 0o755));
        let other = tmp.path().join("other");
        fs::create_dir(&other).unwrap();
        assert!(write_tree(&bad, &other, &mut |_, _| Ok(0)).is_err());
        assert!(!tmp.path().join("escape").exists());

        let mut short = Tree::new();
        short.insert(String::new(), entry(EntryKind::Dir, 0o755));
        let mut file = entry(EntryKind::File, 0o644);
        file.digest = Some(D2.into());
        file.size = 10;
        short.insert("f".into(), file);
        let err = write_tree(&short, &other, &mut |_, _| Ok(3)).unwrap_err();
        assert!(err.to_string().contains("3 bytes"), "{err}");
    }

    /// Files and directories under `dir`, as paths relative to it.
    fn listing(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            for child in fs::read_dir(&d).unwrap() {
                let child = child.unwrap();
                let path = child.path();
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
                if child.file_type().unwrap().is_dir() {
                    pending.push(path);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn hostile_trees_are_refused_and_write_nothing_anywhere() {
        let tmp = tempfile::tempdir().unwrap();
        // What the hostile trees point at: it must stay as it is.
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("passwd"), b"root:x:0:0").unwrap();
        let outside_text = outside.display().to_string();
        let root = || entry(EntryKind::Dir, 0o755);
        let symlink = |target: &str| Entry {
            target: Some(target.into()),
            ..entry(EntryKind::Symlink, 0o777)
        };
        let file = || Entry {
            digest: Some(D1.into()),
            size: 5,
            ..entry(EntryKind::File, 0o4755)
        };
        let link = |to: &str| Entry {
            hardlink: Some(to.into()),
            ..file()
        };
        // What the case is, its entries, what the refusal must say.
        type Case<'a> = (&'a str, Vec<(&'a str, Entry)>, &'a str);
        let cases: Vec<Case> = vec![
            (
                "a file beneath a symlink out",
                vec![("", root()), ("x", symlink(&outside_text)), ("x/f", file())],
                "/x/f refused: its ancestor /x is a symlink",
            ),
            (
                "a directory beneath a symlink to /",
                vec![
                    ("", root()),
                    ("slash", symlink("/")),
                    ("slash/tmp", entry(EntryKind::Dir, 0o777)),
                ],
                "/slash/tmp refused: its ancestor /slash is a symlink",
            ),
            (
                "a relative symlink up, then a node beneath",
                vec![
                    ("", root()),
                    ("up", symlink("../outside")),
                    ("up/node", entry(EntryKind::Fifo, 0o666)),
                ],
                "/up/node refused: its ancestor /up is a symlink",
            ),
            (
                "a hard link to a host file",
                vec![("", root()), ("l", link("../outside/passwd"))],
                "/l refused: hard link to \"../outside/passwd\": the target is not a plain relative path",
            ),
            (
                "a hard link to an absolute path",
                vec![("", root()), ("l", link("/etc/passwd"))],
                "/l refused: hard link to \"/etc/passwd\"",
            ),
            (
                "a hard link through a symlink",
                vec![("", root()), ("o", symlink(&outside_text)), ("p", link("o/passwd"))],
                "hard link to \"o/passwd\": the target is not in the tree",
            ),
            (
                "a hard link to a later entry",
                vec![("", root()), ("a", link("b")), ("b", file())],
                "/a refused: hard link to \"b\": the target does not come before the link",
            ),
            (
                "a hard link to a symlink",
                vec![("", root()), ("a", symlink("/etc/shadow")), ("b", link("a"))],
                "the target is a symlink, not a regular file",
            ),
            ("a .. path", vec![("", root()), ("../escape", file())], "\"../escape\""),
            ("an absolute path", vec![("", root()), ("/abs", file())], "\"/abs\""),
            (
                "a file beneath a file",
                vec![("", root()), ("f", file()), ("f/g", file())],
                "its ancestor /f is a regular file",
            ),
        ];
        for (n, (what, entries, expected)) in cases.into_iter().enumerate() {
            let upper = tmp.path().join(format!("upper{n}"));
            fs::create_dir(&upper).unwrap();
            let tree: Tree = entries.into_iter().map(|(p, e)| (p.to_string(), e)).collect();
            let mut served = 0;
            let err = write_tree(&tree, &upper, &mut |_, out| {
                use std::io::Write;
                served += 1;
                out.write_all(b"hello").unwrap();
                Ok(5)
            })
            .unwrap_err();
            assert!(matches!(err, CheckpointError::Invalid(_)), "{what}: {err}");
            assert!(
                err.to_string().contains(expected),
                "{what}: {err} does not say {expected:?}"
            );
            assert_eq!(served, 0, "{what}: no content was read");
            assert!(listing(&upper).is_empty(), "{what}: {:?} written", listing(&upper));
            assert_eq!(listing(&outside), vec!["passwd"], "{what}");
            assert_eq!(fs::read(outside.join("passwd")).unwrap(), b"root:x:0:0", "{what}");
        }
        assert_eq!(
            listing(tmp.path()).iter().filter(|p| !p.starts_with("upper")).count(),
            2
        );
    }

    #[test]
    fn hosts_are_remapped_only_as_a_plain_file_of_the_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let remaps = [Remap::parse("10.1.0.0/16:10.2.0.0/16").unwrap()];
        let upper = tmp.path().join("plain");
        fs::create_dir_all(upper.join("etc")).unwrap();
        fs::write(upper.join("etc/hosts"), "10.1.0.5 web\n").unwrap();
        remap_hosts_file(&upper, &remaps).unwrap();
        assert_eq!(fs::read_to_string(upper.join("etc/hosts")).unwrap(), "10.2.0.5 web\n");

        // etc -> a host directory, hosts -> a host file: both left alone.
        let host_etc = tmp.path().join("host-etc");
        fs::create_dir(&host_etc).unwrap();
        fs::write(host_etc.join("hosts"), "10.1.0.5 host\n").unwrap();
        let linked_dir = tmp.path().join("linked-dir");
        fs::create_dir(&linked_dir).unwrap();
        std::os::unix::fs::symlink(&host_etc, linked_dir.join("etc")).unwrap();
        remap_hosts_file(&linked_dir, &remaps).unwrap();
        let linked_file = tmp.path().join("linked-file");
        fs::create_dir_all(linked_file.join("etc")).unwrap();
        std::os::unix::fs::symlink(host_etc.join("hosts"), linked_file.join("etc/hosts")).unwrap();
        remap_hosts_file(&linked_file, &remaps).unwrap();
        assert_eq!(fs::read_to_string(host_etc.join("hosts")).unwrap(), "10.1.0.5 host\n");
    }
}
