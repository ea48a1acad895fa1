//! Seamless capture: the O(1) read-only snapshot of a running container's
//! writable layer. The container is frozen only around the btrfs snapshot
//! ioctl; its dirty data is flushed before, while it runs. A container is
//! never left frozen: a watchdog thread thaws it when the pause runs past its
//! timeout, and a marker written before each freeze lets a restarted daemon
//! thaw whatever a killed one left frozen. [`CaptureService`] (`service.rs`)
//! is the one entry point commit and checkpoint use: it resolves the
//! container through containerd, takes its slot and finds its snapshot and
//! cgroup; the functions here freeze, snapshot and thaw the paths and the
//! freezer it found. Must not know what a capture is for: images, commit
//! jobs, checkpoints.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::error::{Classify, ErrorKind};
use crate::host::containerd::ContainerdError;
use crate::host::sys::{Freezer, SysError, SystemOps};
use crate::snapshot::snapshotter::{SnapshotError, SNAPSHOTTER_NAME};

mod service;
pub use service::{
    pin_path, thaw_left_frozen, unpin, CaptureService, CapturedContainer, SlotGuard, HOLD_MARGIN, PAUSE_TIMEOUT,
};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("flush of {path} before freezing: {source}")]
    Sync { path: String, source: SysError },
    #[error("freezing {cgroup} did not complete within {timeout:?}: {source}")]
    PauseTimeout {
        cgroup: String,
        timeout: Duration,
        source: SysError,
    },
    #[error("read-only snapshot of {source_dir} failed, container thawed: {source}")]
    Snapshot { source_dir: String, source: SysError },
    #[error("thawing {cgroup} failed; it stays recorded and is thawed again at restart: {source}")]
    Thaw { cgroup: String, source: SysError },
    #[error("frozen-container marker {path}: {source}")]
    Marker { path: String, source: std::io::Error },
    #[error("stopping the processes of {cgroup} failed; it is thawed and keeps running: {source}")]
    Kill { cgroup: String, source: SysError },
    #[error("container {container} in namespace {namespace} uses snapshotter {snapshotter:?}, not {SNAPSHOTTER_NAME}")]
    WrongSnapshotter {
        namespace: String,
        container: String,
        snapshotter: String,
    },
    #[error("a commit of container {container} is already in progress")]
    InProgress { container: String },
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Snapshotter(#[from] SnapshotError),
    #[error(transparent)]
    Cgroup(#[from] crate::host::cgroup::CgroupError),
    #[error("background task failed: {0}")]
    Task(String),
}

impl Classify for CaptureError {
    fn kind(&self) -> ErrorKind {
        match self {
            CaptureError::PauseTimeout { .. } => ErrorKind::Unavailable,
            CaptureError::WrongSnapshotter { .. } => ErrorKind::InvalidArgument,
            CaptureError::InProgress { .. } => ErrorKind::AlreadyExists,
            CaptureError::Containerd(e) => e.kind(),
            CaptureError::Snapshotter(e) => e.kind(),
            CaptureError::Cgroup(_) => ErrorKind::FailedPrecondition,
            _ => ErrorKind::Internal,
        }
    }
}

/// The upper directory's name in our snapshots' directories.
pub const SNAPSHOT_UPPER: &str = "fs";

/// How the frozen state of a writable layer is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMethod {
    /// A read-only btrfs snapshot of the subvolume: O(1).
    Snapshot,
    /// A copy of the upper directory: proportional to its size, all of it
    /// while the container is frozen. For storage without snapshots.
    Copy,
}

/// What one capture cost and produced.
#[derive(Debug, Clone)]
pub struct Captured {
    /// From the freeze request to the completed thaw.
    pub pause: Duration,
    /// The read-only snapshot (the frozen "old upper").
    pub snapshot: PathBuf,
}

/// Markers of cgroups this daemon is freezing, one JSON file each, written
/// (and synced) before the freeze and removed after the thaw.
#[derive(Debug, Clone)]
pub struct FrozenMarkers {
    dir: PathBuf,
}

impl FrozenMarkers {
    pub fn new(dir: PathBuf) -> Self {
        FrozenMarkers { dir }
    }

    /// For work that may freeze the container itself (CRIU's dump): a hold
    /// that does not freeze, but thaws `freezer` when released or dropped,
    /// and whose marker makes a restarted daemon thaw it if this one dies
    /// first. So a dump killed on its timeout, or with the daemon, cannot
    /// leave the container frozen.
    pub fn thaw_on_release(
        &self,
        sys: &Arc<dyn SystemOps>,
        name: &str,
        freezer: &Freezer,
    ) -> Result<FrozenHold, CaptureError> {
        let marker = self.record(name, freezer)?;
        Ok(FrozenHold {
            sys: sys.clone(),
            markers: self.clone(),
            marker: Some(marker),
            freezer: freezer.clone(),
            start: Instant::now(),
            watchdog: None,
        })
    }

    fn marker_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaptureError {
        let path = path.display().to_string();
        move |source| CaptureError::Marker { path, source }
    }

    fn record(&self, name: &str, freezer: &Freezer) -> Result<PathBuf, CaptureError> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir).map_err(Self::marker_err(&self.dir))?;
        let path = self.dir.join(format!("{name}.json"));
        let partial = self.dir.join(format!("{name}.json.new"));
        let mut file = std::fs::File::create(&partial).map_err(Self::marker_err(&partial))?;
        // Plain data: serialising cannot fail.
        let body = serde_json::to_vec(freezer).expect("freezer serialises");
        file.write_all(&body).map_err(Self::marker_err(&partial))?;
        file.sync_all().map_err(Self::marker_err(&partial))?;
        std::fs::rename(&partial, &path).map_err(Self::marker_err(&path))?;
        Ok(path)
    }

    fn clear(&self, marker: &Path) {
        if let Err(e) = std::fs::remove_file(marker) {
            warn!(marker = %marker.display(), error = %e, "cannot remove frozen-container marker");
        }
    }

    /// Thaws every cgroup a previous run left recorded; returns how many.
    pub fn thaw_all(&self, sys: &dyn SystemOps) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut thawed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let freezer: Option<Freezer> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            match freezer {
                Some(f) => match sys.thaw_cgroup(&f) {
                    Ok(()) => {
                        warn!(cgroup = %f.dir().display(), "thawed a container left frozen by a previous run");
                        thawed += 1;
                        let _ = std::fs::remove_file(&path);
                    }
                    // A cgroup that is gone has no tasks left to thaw.
                    Err(SysError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => warn!(cgroup = %f.dir().display(), error = %e, "cannot thaw; will retry at next start"),
                },
                None => {
                    warn!(marker = %path.display(), "unreadable frozen-container marker removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        thawed
    }
}

/// Thaws the cgroup from another thread if the pause outlives its deadline
/// (a blocked ioctl, say), unless disarmed first.
struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Watchdog {
    fn arm(sys: Arc<dyn SystemOps>, freezer: Freezer, timeout: Duration) -> Watchdog {
        let (disarm, disarmed) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || match disarmed.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!(cgroup = %freezer.dir().display(), ?timeout, "pause timeout: watchdog thaws the container");
                let _ = sys.thaw_cgroup(&freezer);
                true
            }
            _ => false,
        });
        Watchdog {
            disarm: Some(disarm),
            thread: Some(thread),
        }
    }

    /// Returns whether the watchdog had to thaw.
    fn disarm(mut self) -> bool {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
        self.thread.take().map(|t| t.join().unwrap_or(false)).unwrap_or(false)
    }
}

/// Takes the read-only copy of `subvolume` at `dest` while frozen: a btrfs
/// snapshot, or a copy of its upper where snapshots are not possible.
fn take_snapshot(sys: &Arc<dyn SystemOps>, target: &CaptureTarget<'_>) -> Result<(), SysError> {
    let (subvolume, dest) = (target.subvolume, target.dest);
    match target.method {
        CaptureMethod::Snapshot => sys.snapshot_readonly(subvolume, dest),
        CaptureMethod::Copy => std::fs::create_dir(dest)
            .map_err(|source| SysError::Io {
                op: "mkdir",
                path: dest.display().to_string(),
                source,
            })
            .and_then(|()| sys.copy_tree(&subvolume.join(target.upper), &dest.join(SNAPSHOT_UPPER))),
    }
}

/// One capture: `subvolume` (the snapshot directory holding the
/// container's upper, named `upper`, and overlayfs' `work`) is taken at
/// `dest`, which then holds the frozen upper as `dest/fs`; `freezer` is frozen only around the
/// snapshot (or the copy), at most `pause_timeout`. `name` names the marker.
#[derive(Debug, Clone, Copy)]
pub struct CaptureTarget<'a> {
    pub name: &'a str,
    pub subvolume: &'a Path,
    /// The upper's name in `subvolume`: [`SNAPSHOT_UPPER`] for ours,
    /// `diff` for a Docker overlay2 layer.
    pub upper: &'a str,
    pub dest: &'a Path,
    pub freezer: &'a Freezer,
    pub pause_timeout: Duration,
    pub method: CaptureMethod,
}

/// What both captures share: the layer flushed while the container runs,
/// the marker recorded, then the freeze and, if it froze, the snapshot.
/// `hold` is armed with a watchdog at `watchdog_limit` before the freeze
/// and thaws when dropped, so that no error path leaves the container
/// frozen.
struct FrozenCapture {
    hold: FrozenHold,
    frozen: Result<(), SysError>,
    snapshot: Result<(), SysError>,
}

fn freeze_and_snapshot(
    sys: &Arc<dyn SystemOps>,
    markers: &FrozenMarkers,
    target: &CaptureTarget<'_>,
    watchdog_limit: Duration,
) -> Result<FrozenCapture, CaptureError> {
    sys.syncfs(target.subvolume).map_err(|source| CaptureError::Sync {
        path: target.subvolume.display().to_string(),
        source,
    })?;
    let marker = markers.record(target.name, target.freezer)?;
    let watchdog = Watchdog::arm(sys.clone(), target.freezer.clone(), watchdog_limit);
    let start = Instant::now();
    let hold = FrozenHold {
        sys: sys.clone(),
        markers: markers.clone(),
        marker: Some(marker),
        freezer: target.freezer.clone(),
        start,
        watchdog: Some(watchdog),
    };
    let frozen = sys.freeze_cgroup(target.freezer, start + target.pause_timeout);
    let snapshot = match &frozen {
        Ok(()) => take_snapshot(sys, target),
        Err(_) => Ok(()),
    };
    Ok(FrozenCapture { hold, frozen, snapshot })
}

impl CaptureTarget<'_> {
    fn pause_timeout_err(&self, source: SysError) -> CaptureError {
        CaptureError::PauseTimeout {
            cgroup: self.freezer.dir().display().to_string(),
            timeout: self.pause_timeout,
            source,
        }
    }

    fn snapshot_err(&self, source: SysError) -> CaptureError {
        CaptureError::Snapshot {
            source_dir: self.subvolume.display().to_string(),
            source,
        }
    }
}

/// Captures `target`, freezing its container only around the snapshot (or
/// the copy); a watchdog thaws it if the pause runs past its timeout.
pub fn capture_upper(
    sys: &Arc<dyn SystemOps>,
    markers: &FrozenMarkers,
    target: &CaptureTarget<'_>,
) -> Result<Captured, CaptureError> {
    let FrozenCapture { hold, frozen, snapshot } = freeze_and_snapshot(sys, markers, target, target.pause_timeout)?;
    let (pause, watchdog_fired) = hold.thaw_after_capture()?;
    if let Err(source) = frozen {
        return Err(target.pause_timeout_err(source));
    }
    snapshot.map_err(|source| target.snapshot_err(source))?;
    if watchdog_fired {
        warn!(?pause, "capture completed after the watchdog thawed the container");
    }
    info!(pause_us = pause.as_micros() as u64, snapshot = %target.dest.display(), "captured writable layer");
    Ok(Captured {
        pause,
        snapshot: target.dest.to_path_buf(),
    })
}

/// A container kept frozen after its capture (for a memory dump that must
/// match the captured disk); thawed by [`FrozenHold::thaw`] or when
/// dropped. Its marker makes a restarted daemon thaw it if this one dies.
pub struct FrozenHold {
    sys: Arc<dyn SystemOps>,
    markers: FrozenMarkers,
    marker: Option<PathBuf>,
    freezer: Freezer,
    start: Instant,
    /// Thaws the container if the hold outlives its limit (a dump that
    /// hangs past its own timeout, a caller that forgets it).
    watchdog: Option<Watchdog>,
}

impl std::fmt::Debug for FrozenHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenHold").field("freezer", &self.freezer).finish()
    }
}

impl FrozenHold {
    /// Thaws the container; returns how long it was frozen.
    pub fn thaw(mut self) -> Result<Duration, CaptureError> {
        self.release()
    }

    /// Kills every process of the container, then thaws it so that they
    /// die: none runs again after the hold. For a container whose
    /// checkpoint is to stop it (`--leave-running=false`), once that
    /// checkpoint is stored.
    pub fn kill_and_thaw(mut self) -> Result<usize, CaptureError> {
        let killed = self
            .sys
            .kill_cgroup(&self.freezer)
            .map_err(|source| CaptureError::Kill {
                cgroup: self.freezer.dir().display().to_string(),
                source,
            })?;
        self.release()?;
        info!(killed, "stopped the container held frozen");
        Ok(killed)
    }

    /// Ends a plain capture: thaws, then disarms the watchdog, so that a
    /// thaw failing after the watchdog's own is no error; a thaw failing
    /// otherwise keeps the marker for the next start. Returns the pause
    /// and whether the watchdog had to thaw.
    fn thaw_after_capture(mut self) -> Result<(Duration, bool), CaptureError> {
        let watchdog = self.watchdog.take();
        // Taken so that the drop after this does nothing.
        let marker = self.marker.take();
        let thawed = self.sys.thaw_cgroup(&self.freezer);
        let pause = self.start.elapsed();
        let watchdog_fired = watchdog.is_some_and(Watchdog::disarm);
        if let Err(source) = thawed {
            if !watchdog_fired {
                return Err(CaptureError::Thaw {
                    cgroup: self.freezer.dir().display().to_string(),
                    source,
                });
            }
        }
        if let Some(marker) = marker {
            self.markers.clear(&marker);
        }
        Ok((pause, watchdog_fired))
    }

    fn release(&mut self) -> Result<Duration, CaptureError> {
        if let Some(watchdog) = self.watchdog.take() {
            if watchdog.disarm() {
                warn!(cgroup = %self.freezer.dir().display(), "the hold had outlived its limit: the watchdog thawed the container");
            }
        }
        let Some(marker) = self.marker.take() else {
            return Ok(self.start.elapsed());
        };
        let thawed = self.sys.thaw_cgroup(&self.freezer);
        let frozen = self.start.elapsed();
        thawed.map_err(|source| CaptureError::Thaw {
            cgroup: self.freezer.dir().display().to_string(),
            source,
        })?;
        self.markers.clear(&marker);
        info!(
            frozen_us = frozen.as_micros() as u64,
            "thawed the container held frozen"
        );
        Ok(frozen)
    }
}

impl Drop for FrozenHold {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            warn!(error = %e, "cannot thaw the container held frozen; a restarted daemon thaws it");
        }
    }
}

/// Like [`capture_upper`], but the container stays frozen after the
/// snapshot until the returned hold is thawed, and at most `hold_limit`:
/// a watchdog thaws it then, as the capture's own watchdog does a pause
/// past its timeout.
pub fn capture_upper_and_hold(
    sys: &Arc<dyn SystemOps>,
    markers: &FrozenMarkers,
    target: &CaptureTarget<'_>,
    hold_limit: Duration,
) -> Result<(Captured, FrozenHold), CaptureError> {
    let FrozenCapture { hold, frozen, snapshot } = freeze_and_snapshot(sys, markers, target, hold_limit)?;
    if let Err(source) = frozen {
        drop(hold);
        return Err(target.pause_timeout_err(source));
    }
    // Dropping the hold on error thaws.
    snapshot.map_err(|source| target.snapshot_err(source))?;
    let captured = Captured {
        pause: hold.start.elapsed(),
        snapshot: target.dest.to_path_buf(),
    };
    info!(snapshot = %target.dest.display(), "captured writable layer; container held frozen");
    Ok((captured, hold))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::sys::RecordingSystem;

    const SECOND: Duration = Duration::from_secs(1);
    const HOLD_LIMIT: Duration = Duration::from_secs(600);

    /// A recording btrfs, the markers in `<tmp>/frozen`, and captures of
    /// `/s/<n>` as `c<n>` into `<tmp>/cap<n>`.
    struct Fixture {
        tmp: tempfile::TempDir,
        fake: Arc<RecordingSystem>,
        sys: Arc<dyn SystemOps>,
        markers: FrozenMarkers,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let markers = FrozenMarkers::new(tmp.path().join("frozen"));
            let fake = Arc::new(RecordingSystem::btrfs());
            Fixture {
                tmp,
                sys: fake.clone(),
                fake,
                markers,
            }
        }

        fn dest(&self, n: u32) -> PathBuf {
            self.tmp
                .path()
                .join(if n == 1 { "cap".to_string() } else { format!("cap{n}") })
        }

        /// Captures `/s/<n>` as `c<n>` into [`Self::dest`], by snapshot.
        fn with_target<T>(
            &self,
            n: u32,
            freezer: &Freezer,
            pause_timeout: Duration,
            capture: impl FnOnce(&CaptureTarget<'_>) -> T,
        ) -> T {
            let (name, subvolume, dest) = (format!("c{n}"), PathBuf::from(format!("/s/{n}")), self.dest(n));
            capture(&CaptureTarget {
                name: &name,
                subvolume: &subvolume,
                upper: SNAPSHOT_UPPER,
                dest: &dest,
                freezer,
                pause_timeout,
                method: CaptureMethod::Snapshot,
            })
        }

        fn capture(&self, n: u32, freezer: &Freezer, pause_timeout: Duration) -> Result<Captured, CaptureError> {
            self.with_target(n, freezer, pause_timeout, |target| {
                capture_upper(&self.sys, &self.markers, target)
            })
        }

        fn capture_and_hold(
            &self,
            n: u32,
            freezer: &Freezer,
            hold_limit: Duration,
        ) -> Result<(Captured, FrozenHold), CaptureError> {
            self.with_target(n, freezer, SECOND, |target| {
                capture_upper_and_hold(&self.sys, &self.markers, target, hold_limit)
            })
        }

        /// How many frozen-container markers are on disk.
        fn markers_left(&self) -> usize {
            std::fs::read_dir(self.tmp.path().join("frozen")).unwrap().count()
        }
    }

    #[test]
    fn flushes_while_running_and_freezes_only_around_the_snapshot() {
        let f = Fixture::new();
        let freezer = Freezer::V1("/cg/ctr".into());
        let got = f.capture(1, &freezer, SECOND).unwrap();
        let dest = f.dest(1);
        assert_eq!(
            f.fake.calls(),
            vec![
                "syncfs /s/1".to_string(),
                "freeze /cg/ctr".to_string(),
                format!("snapshot readonly /s/1 {}", dest.display()),
                "thaw /cg/ctr".to_string(),
            ]
        );
        assert_eq!(got.snapshot, dest);
        assert!(got.pause < SECOND);
        assert_eq!(f.markers_left(), 0, "marker cleared");
    }

    #[test]
    fn a_held_capture_stays_frozen_until_thawed_or_dropped() {
        let f = Fixture::new();
        let freezer = Freezer::V1("/cg/ctr".into());
        let (got, hold) = f.capture_and_hold(1, &freezer, HOLD_LIMIT).unwrap();
        let dest = f.dest(1);
        assert_eq!(got.snapshot, dest);
        assert_eq!(
            f.fake.calls(),
            vec![
                "syncfs /s/1".to_string(),
                "freeze /cg/ctr".to_string(),
                format!("snapshot readonly /s/1 {}", dest.display()),
            ],
            "still frozen"
        );
        assert_eq!(f.markers_left(), 1, "a restarted daemon would thaw it");
        hold.thaw().unwrap();
        assert_eq!(f.fake.calls().last().unwrap(), "thaw /cg/ctr");
        assert_eq!(f.markers_left(), 0);

        // Dropped (the dump failed, say): thawed all the same, also when
        // the snapshot itself fails.
        let (_, hold) = f.capture_and_hold(2, &freezer, HOLD_LIMIT).unwrap();
        drop(hold);
        assert_eq!(f.fake.calls().last().unwrap(), "thaw /cg/ctr");
        f.fake.fail_calls_starting_with("snapshot");
        assert!(f.capture_and_hold(3, &freezer, HOLD_LIMIT).is_err());
        assert_eq!(f.fake.calls().last().unwrap(), "thaw /cg/ctr");
        assert_eq!(f.markers_left(), 0);
    }

    #[test]
    fn a_hold_past_its_limit_is_thawed_by_the_watchdog() {
        let f = Fixture::new();
        let freezer = Freezer::V1("/cg/ctr".into());
        let (_, hold) = f.capture_and_hold(1, &freezer, Duration::from_millis(50)).unwrap();
        // The holder never thaws: the watchdog must. Wait for its thaw (no
        // bound on how long: what is checked is that it comes at all).
        while !f.fake.calls().iter().any(|c| c == "thaw /cg/ctr") {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(f.markers_left(), 1, "the marker stays until released");
        hold.thaw().unwrap();
        assert_eq!(f.markers_left(), 0);
    }

    #[test]
    fn a_guard_around_a_dump_thaws_when_dropped_and_marks_until_then() {
        let f = Fixture::new();
        let freezer = Freezer::V2("/cg/dumped".into());
        let guard = f.markers.thaw_on_release(&f.sys, "dump-1", &freezer).unwrap();
        assert!(f.fake.calls().is_empty(), "the guard itself freezes nothing");
        assert_eq!(f.markers_left(), 1);
        // The daemon dies here: its successor thaws what the dump froze.
        assert_eq!(f.markers.thaw_all(&RecordingSystem::btrfs()), 1);
        let guard2 = f.markers.thaw_on_release(&f.sys, "dump-2", &freezer).unwrap();
        drop(guard);
        drop(guard2);
        assert_eq!(
            f.fake.calls(),
            vec!["thaw /cg/dumped".to_string(), "thaw /cg/dumped".to_string()]
        );
        assert_eq!(f.markers_left(), 0);
    }

    #[test]
    fn failed_snapshot_still_thaws() {
        let f = Fixture::new();
        f.fake.fail_calls_starting_with("snapshot");
        let err = f.capture(1, &Freezer::V2("/cg/ctr".into()), SECOND).unwrap_err();
        assert!(matches!(err, CaptureError::Snapshot { .. }), "{err}");
        assert_eq!(f.fake.calls().last().unwrap(), "thaw /cg/ctr");
    }

    #[test]
    fn freeze_timeout_thaws_and_reports_pause_timeout() {
        let f = Fixture::new();
        f.fake.fail_calls_starting_with("freeze");
        let err = f.capture(1, &Freezer::V1("/cg/ctr".into()), SECOND).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(!f.fake.calls().iter().any(|c| c.starts_with("snapshot")));
        assert_eq!(f.fake.calls().last().unwrap(), "thaw /cg/ctr");
    }

    #[test]
    fn failed_thaw_keeps_the_marker_for_the_next_start() {
        let f = Fixture::new();
        f.fake.fail_calls_starting_with("thaw");
        let err = f
            .capture(1, &Freezer::V1("/cg/ctr".into()), Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, CaptureError::Thaw { .. }), "{err}");
        assert_eq!(f.markers_left(), 1);
        // The next start thaws it.
        let healthy = RecordingSystem::btrfs();
        assert_eq!(f.markers.thaw_all(&healthy), 1);
        assert_eq!(healthy.calls(), vec!["thaw /cg/ctr".to_string()]);
        assert_eq!(f.markers_left(), 0);
    }

    #[test]
    fn watchdog_thaws_when_the_pause_overruns() {
        let f = Fixture::new();
        *f.fake.snapshot_delay.lock().unwrap() = Some(Duration::from_millis(300));
        f.capture(1, &Freezer::V1("/cg/ctr".into()), Duration::from_millis(50))
            .unwrap();
        let calls = f.fake.calls();
        let freeze = calls.iter().position(|c| c == "freeze /cg/ctr").unwrap();
        let snapshot = calls.iter().position(|c| c.starts_with("snapshot")).unwrap();
        let first_thaw = calls.iter().position(|c| c == "thaw /cg/ctr").unwrap();
        assert!(
            freeze < first_thaw && first_thaw < snapshot,
            "watchdog thawed during the slow snapshot: {calls:?}"
        );
    }
}
