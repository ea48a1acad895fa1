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
use nix::sys::stat::{Mode, SFlag};
use tracing::{info, instrument, warn};

use super::catalogue::{Catalogue, Checkpoint};
use super::process::{self, ContainerRecord};
use super::remap::{self, Remap};
use super::tree::{Entry, EntryKind, Tree};
use super::trust::{Admitted, RecordTrust};
use super::{visible, CheckpointError, CheckpointService, StorageSpec};
use crate::containerd::Containerd;
use crate::error::ErrorKind;

/// Blobs fetched at once unless the request says otherwise.
pub const DEFAULT_PARALLEL: usize = 3;
const MAX_PARALLEL: usize = 64;
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

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
fn validate_container_id(id: &str) -> Result<(), CheckpointError> {
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
        crate::containerd::validate_namespace(&request.namespace)
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
        let containerd = Containerd::connect(self.commits.containerd_address()).await?;
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
                trust: self.commits.snapshotter().record_trust().clone(),
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
                            let errors = crate::criu::log_errors(log);
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
                crate::containerd::ContainerdError::Missing { .. } => CheckpointError::Restore {
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
        if record.snapshotter != crate::commit::SNAPSHOTTER_NAME {
            return Err(CheckpointError::Restore {
                step: "filesystem",
                reason: format!(
                    "the container was on snapshotter {}, not {}: only containers of this snapshotter are restored",
                    record.snapshotter,
                    crate::commit::SNAPSHOTTER_NAME
                ),
                log: String::new(),
                kind: ErrorKind::FailedPrecondition,
            });
        }
        let snapshotter = self.commits.snapshotter().clone();
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
                let settings = snapshotter.criu_settings();
                Some(
                    crate::criu::restore_options(
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

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
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
/// layer) by `remaps`.
fn remap_hosts_file(upper: &Path, remaps: &[Remap]) -> Result<(), CheckpointError> {
    if remaps.is_empty() {
        return Ok(());
    }
    let hosts = upper.join("etc/hosts");
    let is_file = fs::symlink_metadata(&hosts).is_ok_and(|m| m.file_type().is_file());
    if !is_file {
        return Ok(());
    }
    let text = fs::read_to_string(&hosts).map_err(CheckpointError::from_io(&hosts))?;
    let (rewritten, moved) = remap::rewrite_hosts(&text, remaps);
    if moved > 0 {
        fs::write(&hosts, rewritten).map_err(CheckpointError::from_io(&hosts))?;
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
}

type Content<'a> = dyn FnMut(&str, &mut fs::File) -> Result<u64, CheckpointError> + 'a;

fn write_tree(tree: &Tree, upper: &Path, content: &mut Content<'_>) -> Result<(), CheckpointError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |e: std::io::Error| CheckpointError::Task(format!("{op} {path}: {e}"))
    };
    let nix_err = |op: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |e: nix::Error| CheckpointError::Task(format!("{op} {path}: {e}"))
    };
    for (rel, entry) in tree {
        if rel.split('/').any(|p| p == ".." || p == ".") || rel.starts_with('/') {
            return Err(CheckpointError::Invalid(format!(
                "checkpoint path {rel:?} is not a plain relative path"
            )));
        }
        let path = if rel.is_empty() {
            upper.to_path_buf()
        } else {
            upper.join(rel)
        };
        match entry.kind {
            EntryKind::Dir => {
                if !rel.is_empty() {
                    match fs::create_dir(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                        Err(e) => return Err(io("create directory", &path)(e)),
                    }
                }
                if entry.opaque {
                    xattr::set(&path, OPAQUE_XATTR, b"y").map_err(io("mark opaque", &path))?;
                }
            }
            EntryKind::File => {
                if let Some(first) = &entry.hardlink {
                    fs::hard_link(upper.join(first), &path).map_err(io("link", &path))?;
                    continue;
                }
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io("create", &path))?;
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
            }
            EntryKind::Symlink => {
                let target = entry
                    .target
                    .as_deref()
                    .ok_or_else(|| CheckpointError::Invalid(format!("{rel}: a symlink without target")))?;
                std::os::unix::fs::symlink(target, &path).map_err(io("create symlink", &path))?;
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
                nix::sys::stat::mknod(&path, kind, Mode::from_bits_truncate(0o600), rdev as nix::libc::dev_t)
                    .map_err(nix_err("create node", &path))?;
            }
        }
        set_metadata(&path, entry).map_err(|e| CheckpointError::Task(format!("{rel}: {e}")))?;
    }
    // Directory times last: writing their entries changed them.
    for (rel, entry) in tree.iter().rev().filter(|(_, e)| e.kind == EntryKind::Dir) {
        let path = if rel.is_empty() {
            upper.to_path_buf()
        } else {
            upper.join(rel)
        };
        set_times(&path, entry).map_err(|e| CheckpointError::Task(format!("{rel}: {e}")))?;
    }
    Ok(())
}

fn set_metadata(path: &Path, entry: &Entry) -> Result<(), String> {
    use nix::fcntl::AtFlags;
    use nix::unistd::{fchownat, Gid, Uid};
    if entry.kind == EntryKind::Whiteout {
        return Ok(());
    }
    fchownat(
        None,
        path,
        Some(Uid::from_raw(entry.uid)),
        Some(Gid::from_raw(entry.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| format!("chown: {e}"))?;
    for (name, value) in &entry.xattrs {
        let bytes = super::tree::unhex(value).ok_or_else(|| format!("xattr {name}: value is not hex"))?;
        xattr::set(path, name, &bytes).map_err(|e| format!("set xattr {name}: {e}"))?;
    }
    if entry.kind != EntryKind::Symlink {
        // After chown, which clears setuid and setgid.
        fs::set_permissions(path, fs::Permissions::from_mode(entry.mode & 0o7777))
            .map_err(|e| format!("chmod: {e}"))?;
    }
    if entry.kind != EntryKind::Dir {
        set_times(path, entry)?;
    }
    Ok(())
}

fn set_times(path: &Path, entry: &Entry) -> Result<(), String> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(
        entry.mtime_ns.div_euclid(1_000_000_000),
        entry.mtime_ns.rem_euclid(1_000_000_000),
    );
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|e| format!("set times: {e}"))
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
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn entry(kind: EntryKind, mode: u32) -> Entry {
        Entry {
            kind,
            mode,
            uid: 1000,
            gid: 100,
            mtime_ns: 1_600_000_000_123_456_789,
            ctime_ns: 0,
            size: 0,
            digest: None,
            hardlink: None,
            target: None,
            rdev: 0,
            opaque: false,
            xattrs: BTreeMap::new(),
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
        conf.digest = Some("d1".into());
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
        let mut served = Vec::new();
        write_tree(&tree, &upper, &mut |digest, out| {
            use std::io::Write;
            served.push(digest.to_string());
            out.write_all(b"hello").unwrap();
            Ok(5)
        })
        .unwrap();
        assert_eq!(served, vec!["d1"]);
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

        let mut bad = Tree::new();
        bad.insert("../escape".into(), entry(EntryKind::Dir, 0o755));
        let other = tmp.path().join("other");
        fs::create_dir(&other).unwrap();
        assert!(write_tree(&bad, &other, &mut |_, _| Ok(0)).is_err());
        assert!(!tmp.path().join("escape").exists());

        let mut short = Tree::new();
        let mut file = entry(EntryKind::File, 0o644);
        file.digest = Some("d2".into());
        file.size = 10;
        short.insert("f".into(), file);
        let err = write_tree(&short, &other, &mut |_, _| Ok(3)).unwrap_err();
        assert!(err.to_string().contains("3 bytes"), "{err}");
    }
}
