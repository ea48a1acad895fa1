//! Checkpointing a running Docker container into its directory: frozen,
//! its writable layer copied and its processes dumped by runc while it
//! stays frozen (so the files and the memory match), then thawed (or
//! stopped, with `leave_running` false), its record written and every file
//! digested. A failure thaws the container and leaves no half checkpoint,
//! only CRIU's `dump.log` to read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::layout::{CheckpointDir, DUMP_LOG, RECORD, ROOTFS_DIFF};
use super::{DockerCheckpointError, RunningContainer};
use crate::capture::{capture_upper_and_hold, thaw_left_frozen, CaptureMethod, CaptureTarget, FrozenMarkers};
use crate::error::io_err;
use crate::host::criu::{CriuSettings, DumpRequest};
use crate::host::docker::DockerClient;
use crate::host::sys::{RealSystem, SystemOps};

/// What one checkpoint is asked for (the reference's flags).
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    pub container: String,
    pub name: String,
    pub dir: PathBuf,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub pre_dump: bool,
    /// Where markers of frozen containers are kept, so that a run killed
    /// while the container is frozen is undone by the next.
    pub state_root: PathBuf,
    /// criu for runc (`--criu`); None: runc's own lookup on PATH.
    pub criu: Option<PathBuf>,
    pub timeout: Duration,
}

/// What a checkpoint took and wrote.
#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub id: String,
    pub name: String,
    pub path: PathBuf,
    /// From the freeze to the thaw: the container's own stall.
    pub frozen: Duration,
    pub total: Duration,
    /// CRIU's images, in bytes.
    pub images_bytes: u64,
    pub rootfs_bytes: u64,
    pub leave_running: bool,
}

/// Where the frozen copy of the upper goes before it is renamed
/// [`ROOTFS_DIFF`].
const CAPTURE_DIR: &str = ".rootfs-capture";

/// Checkpoints `options.container` (a name, id or id prefix) into
/// `<dir>/<container>/<name>/`.
pub async fn checkpoint(
    engine: &DockerClient,
    options: &CheckpointOptions,
) -> Result<CheckpointReport, DockerCheckpointError> {
    let started = Instant::now();
    let settings = CriuSettings {
        criu: options.criu.clone(),
        timeout: options.timeout,
        ..CriuSettings::default()
    };
    if options.pre_dump {
        return Err(pre_dump_refusal(&settings));
    }
    let container = RunningContainer::find(engine, &options.container).await?;
    let dir = CheckpointDir::create(&options.dir, &options.container, &options.name)?;
    let settings = CriuSettings {
        runc: container.runc.clone(),
        runc_root: container.runc_root.clone(),
        ..settings
    };
    let frozen = {
        let (container, dir, options) = (container.clone(), dir.clone(), options.clone());
        tokio::task::spawn_blocking(move || freeze_copy_and_dump(&container, &dir, &settings, &options))
            .await
            .map_err(|e| DockerCheckpointError::Criu {
                action: "dump",
                message: format!("the dumping thread failed: {e}"),
            })?
    };
    let frozen = match frozen {
        Ok(frozen) => frozen,
        Err(e) => {
            discard_all_but_log(dir.path());
            return Err(e);
        }
    };
    let record = serde_json::to_vec_pretty(&container.inspect).map_err(|e| DockerCheckpointError::Record {
        path: dir.join(RECORD).display().to_string(),
        reason: e.to_string(),
    })?;
    dir.write_file(RECORD, &record)?;
    dir.make_private()?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let sealed = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || dir.seal(threads).map(|()| dir))
            .await
            .map_err(|e| DockerCheckpointError::Copy {
                what: "the checkpoint's digests".into(),
                message: e.to_string(),
            })??
    };
    let images_bytes = sealed
        .criu_files()?
        .iter()
        .filter_map(|f| std::fs::metadata(sealed.join(f)).ok())
        .map(|m| m.len())
        .sum();
    Ok(CheckpointReport {
        id: container.id,
        name: container.name,
        path: sealed.path().to_path_buf(),
        frozen,
        total: started.elapsed(),
        images_bytes,
        rootfs_bytes: tree_bytes(&sealed.join(ROOTFS_DIFF)),
        leave_running: options.leave_running,
    })
}

/// Why `-pre-dump` is refused: the kernel's reason where it has no dirty
/// page tracking (as `checkpointctl create --pre-dump` says), and the
/// engine's otherwise.
fn pre_dump_refusal(settings: &CriuSettings) -> DockerCheckpointError {
    if !settings.dirty_tracking() {
        return DockerCheckpointError::PreDump(
            "-pre-dump needs the kernel to track dirtied pages (CONFIG_MEM_SOFT_DIRTY), and this kernel does not \
             (`criu check --feature mem_dirty_track` fails): checkpoint without -pre-dump"
                .into(),
        );
    }
    DockerCheckpointError::PreDump(
        "-pre-dump writes images whose pages live in a parent directory, and Docker's engine restores from one \
         directory only: checkpoint without -pre-dump, or use `checkpointctl --engine docker create --pre-dump`"
            .into(),
    )
}

/// The frozen part: freeze, copy the upper, dump, then thaw (or stop).
/// Returns how long the container was frozen.
fn freeze_copy_and_dump(
    container: &RunningContainer,
    dir: &CheckpointDir,
    settings: &CriuSettings,
    options: &CheckpointOptions,
) -> Result<Duration, DockerCheckpointError> {
    let sys: Arc<dyn SystemOps> = Arc::new(RealSystem);
    thaw_left_frozen(&options.state_root, sys.as_ref());
    let markers = FrozenMarkers::new(options.state_root.join("frozen"));
    let freezer = crate::host::cgroup::freezer_of(container.pid)?;
    let layer = container.upper.parent().ok_or_else(|| DockerCheckpointError::Runtime {
        container: container.name.clone(),
        reason: "its upper directory has no parent".into(),
    })?;
    let capture = dir.join(CAPTURE_DIR);
    let marker_name = format!("docker-{}", &container.id[..12]);
    let target = CaptureTarget {
        name: &marker_name,
        subvolume: layer,
        upper: "diff",
        dest: &capture,
        freezer: &freezer,
        pause_timeout: crate::capture::PAUSE_TIMEOUT,
        method: CaptureMethod::Copy,
    };
    let hold_limit = options.timeout + crate::capture::HOLD_MARGIN;
    let (_, hold) = capture_upper_and_hold(&sys, &markers, &target, hold_limit)?;
    let dumped = settings.dump(&DumpRequest {
        namespace: &container.runc_namespace,
        container: &container.id,
        images: dir.path(),
        work: dir.path(),
        parent: None,
        pre_dump: false,
        // CRIU leaves the processes as they were, frozen by us: the hold
        // thaws or stops them below, and thaws them if anything fails.
        leave_running: true,
        tcp_established: options.tcp_established,
        file_locks: options.file_locks,
    });
    if let Err(e) = dumped {
        drop(hold);
        return Err(DockerCheckpointError::Criu {
            action: "dump",
            message: format!("{e}\nCRIU's log: {}", dir.join(DUMP_LOG).display()),
        });
    }
    let frozen = if options.leave_running {
        hold.thaw()?
    } else {
        let started = Instant::now();
        hold.kill_and_thaw()?;
        started.elapsed()
    };
    let captured = capture.join(crate::capture::SNAPSHOT_UPPER);
    let rootfs = dir.join(ROOTFS_DIFF);
    std::fs::rename(&captured, &rootfs).map_err(io_err("rename", &captured))?;
    std::fs::remove_dir(&capture).map_err(io_err("remove", &capture))?;
    Ok(frozen)
}

/// Empties a failed checkpoint's directory but for CRIU's log, which the
/// error names; a later checkpoint of the same name replaces it.
fn discard_all_but_log(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name() == DUMP_LOG {
            continue;
        }
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if let Err(e) = removed {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove part of a failed checkpoint");
        }
    }
}

/// Bytes of the regular files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}
