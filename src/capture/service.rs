//! The capture service: the one way a running container's writable layer is
//! captured, whoever asks (a seamless commit, a checkpoint). It resolves the
//! container through containerd, takes the container's slot (one capture at
//! a time per container), finds its snapshot and cgroup, and has
//! [`super::capture_upper`] freeze, snapshot in O(1) and thaw it under the
//! watchdog. Crash recovery: [`thaw_left_frozen`] thaws what a killed daemon
//! left frozen, and [`CaptureService::sweep`] removes captures nobody keeps.
//! Knows nothing of what the capture is for (images, checkpoints).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use super::{
    capture_upper, capture_upper_and_hold, CaptureError, CaptureMethod, CaptureTarget, Captured, FrozenHold,
    FrozenMarkers,
};
use crate::host::containerd::{ContainerInfo, Containerd};
use crate::host::sys::{Freezer, SystemOps};
use crate::snapshot::snapshotter::{Snapshotter, SNAPSHOTTER_NAME};

/// How long a container may stay frozen before the watchdog thaws it.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Markers of containers being frozen, under the daemon's root.
const FROZEN_DIR: &str = "frozen";
/// How long a container held frozen past its capture may stay so (a memory
/// dump runs meanwhile) unless told otherwise; a watchdog thaws it then.
const DEFAULT_HOLD_LIMIT: Duration = Duration::from_secs(600);
/// How far past a memory dump's own timeout a hold may last: the daemon's
/// hold limit is the dump timeout plus this.
pub const HOLD_MARGIN: Duration = Duration::from_secs(60);
/// Suffix of the file that keeps a capture past a restart for its user.
const PIN_SUFFIX: &str = ".journal-pin";

/// Thaws every container a killed daemon with this root left frozen;
/// returns how many. Needs nothing but the root, so that it can run before
/// anything that may fail (a bad config must not keep a container frozen).
pub fn thaw_left_frozen(root: &Path, sys: &dyn SystemOps) -> usize {
    let thawed = FrozenMarkers::new(root.join(FROZEN_DIR)).thaw_all(sys);
    if thawed > 0 {
        warn!(thawed, "thawed containers left frozen by a previous run");
    }
    thawed
}

/// The pin file of `capture`: while it exists the start-up sweep keeps the
/// capture (a checkpoint journaled before its dump needs it after a restart).
pub fn pin_path(capture: &Path) -> PathBuf {
    let mut name = capture.as_os_str().to_os_string();
    name.push(PIN_SUFFIX);
    PathBuf::from(name)
}

/// Removes the pin of `capture`; an absent one is fine.
pub fn unpin(capture: &Path) -> Result<(), crate::error::IoError> {
    let pin = pin_path(capture);
    match std::fs::remove_file(&pin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(crate::error::io_err("remove", &pin)(e)),
        _ => Ok(()),
    }
}

/// A container captured by [`CaptureService::capture`].
#[derive(Debug)]
pub struct CapturedContainer {
    pub container: ContainerInfo,
    /// The container's snapshot key and the snapshotter's id for it.
    pub snapshot_key: String,
    pub snapshot_id: u64,
    pub captured: Captured,
    /// Keeps other captures of the container out until dropped.
    pub slot: SlotGuard,
    /// The container, still frozen, when asked to be held.
    pub hold: Option<FrozenHold>,
}

/// A container's capture slot: taken by a capture, freed when dropped (a
/// commit frees it once its job is recorded; a checkpoint keeps it until
/// its dump is stored).
#[derive(Debug)]
pub struct SlotGuard {
    service: Arc<CaptureService>,
    slot: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.service.in_progress.lock() {
            set.remove(&self.slot);
        }
    }
}

#[derive(Debug)]
pub struct CaptureService {
    snapshotter: Arc<Snapshotter>,
    sys: Arc<dyn SystemOps>,
    markers: FrozenMarkers,
    containerd_address: PathBuf,
    hold_limit: Duration,
    /// "<namespace>/<container id>" of containers whose slot is taken.
    in_progress: Mutex<HashSet<String>>,
}

impl CaptureService {
    /// The capture service of the snapshotter whose root is `root`, finding
    /// containers through containerd at `containerd_address`. Thaws what a
    /// killed daemon with this root left frozen first.
    pub fn new(snapshotter: Arc<Snapshotter>, root: &Path, containerd_address: PathBuf) -> CaptureService {
        let sys = snapshotter.system().clone();
        thaw_left_frozen(root, sys.as_ref());
        CaptureService {
            snapshotter,
            sys,
            markers: FrozenMarkers::new(root.join(FROZEN_DIR)),
            containerd_address,
            hold_limit: DEFAULT_HOLD_LIMIT,
            in_progress: Mutex::new(HashSet::new()),
        }
    }

    /// How long a container may be held frozen after its capture before a
    /// watchdog thaws it (a memory dump's own timeout plus a margin).
    pub fn with_hold_limit(mut self, hold_limit: Duration) -> CaptureService {
        self.hold_limit = hold_limit;
        self
    }

    pub fn snapshotter(&self) -> &Arc<Snapshotter> {
        &self.snapshotter
    }

    pub fn containerd_address(&self) -> &Path {
        &self.containerd_address
    }

    /// Container `container` (id, name or unique prefix of either) of
    /// `namespace`, as containerd knows it.
    pub async fn resolve(&self, namespace: &str, container: &str) -> Result<ContainerInfo, CaptureError> {
        let containerd = Containerd::connect(&self.containerd_address).await?;
        Ok(containerd.resolve(namespace, container).await?)
    }

    /// Resolves container `container` (id, name or unique prefix) of
    /// `namespace` and captures its writable layer as `capture_name`,
    /// pausing it for milliseconds; with `hold`, the container stays frozen
    /// after the capture until [`CapturedContainer::hold`] is thawed or
    /// dropped. One capture at a time per container: the slot is held until
    /// the result's `slot` is dropped.
    pub async fn capture(
        self: &Arc<Self>,
        namespace: &str,
        container: &str,
        capture_name: &str,
        hold: bool,
    ) -> Result<CapturedContainer, CaptureError> {
        let container = self.resolve(namespace, container).await?;
        self.capture_resolved(namespace, container, capture_name, hold).await
    }

    /// [`CaptureService::capture`] of a container already resolved.
    pub async fn capture_resolved(
        self: &Arc<Self>,
        namespace: &str,
        container: ContainerInfo,
        capture_name: &str,
        hold: bool,
    ) -> Result<CapturedContainer, CaptureError> {
        if container.snapshotter != SNAPSHOTTER_NAME {
            return Err(CaptureError::WrongSnapshotter {
                namespace: container.namespace,
                container: container.id,
                snapshotter: container.snapshotter,
            });
        }
        let (snapshot_key, id) = self
            .snapshotter
            .container_snapshot(namespace, &container.snapshot_key)?;
        let slot = format!("{namespace}/{}", container.id);
        if !self.in_progress.lock().expect("in-progress lock").insert(slot.clone()) {
            return Err(CaptureError::InProgress {
                container: container.id,
            });
        }
        let slot = SlotGuard {
            service: self.clone(),
            slot,
        };
        let freezer = crate::host::cgroup::freezer_of(container.pid)?;
        let service = self.clone();
        let name = capture_name.to_string();
        let (captured, hold) = tokio::task::spawn_blocking(move || service.capture_snapshot(id, &name, &freezer, hold))
            .await
            .map_err(|e| CaptureError::Task(e.to_string()))??;
        Ok(CapturedContainer {
            container,
            snapshot_key,
            snapshot_id: id,
            captured,
            slot,
            hold,
        })
    }

    /// Captures active snapshot `id` as `name` under the captures
    /// directory, freezing `freezer` only around the snapshot (and after it
    /// too with `hold`). For a container already resolved; blocking.
    pub fn capture_snapshot(
        &self,
        id: u64,
        name: &str,
        freezer: &Freezer,
        hold: bool,
    ) -> Result<(Captured, Option<FrozenHold>), CaptureError> {
        let site = self.snapshotter.capture_site(id, name)?;
        let method = if site.snapshots {
            CaptureMethod::Snapshot
        } else {
            CaptureMethod::Copy
        };
        let target = CaptureTarget {
            name,
            subvolume: &site.subvolume,
            upper: super::SNAPSHOT_UPPER,
            dest: &site.dest,
            freezer,
            pause_timeout: PAUSE_TIMEOUT,
            method,
        };
        if hold {
            let (captured, hold) = capture_upper_and_hold(&self.sys, &self.markers, &target, self.hold_limit)?;
            return Ok((captured, Some(hold)));
        }
        let captured = capture_upper(&self.sys, &self.markers, &target)?;
        if method == CaptureMethod::Copy {
            warn!(
                pause_ms = captured.pause.as_secs_f64() * 1000.0,
                "storage is plain directories: the whole writable layer was copied while the container was frozen, \
                 so the pause grows with its size; a btrfs root or the btrfs pool captures in O(1)"
            );
        }
        Ok((captured, None))
    }

    /// Captures the writable layer of a container this snapshotter does not
    /// serve (a Docker container's overlay2 layer `layer`, whose upper is
    /// named `upper`): copied into `dest/fs` while frozen, and kept frozen
    /// (for a memory dump that must match) until the hold is released, with
    /// the same watchdog and markers as every capture.
    pub fn capture_foreign_and_hold(
        &self,
        name: &str,
        layer: &Path,
        upper: &str,
        dest: &Path,
        freezer: &Freezer,
    ) -> Result<(Captured, FrozenHold), CaptureError> {
        let target = CaptureTarget {
            name,
            subvolume: layer,
            upper,
            dest,
            freezer,
            pause_timeout: PAUSE_TIMEOUT,
            method: CaptureMethod::Copy,
        };
        capture_upper_and_hold(&self.sys, &self.markers, &target, self.hold_limit)
    }

    /// A hold on a container that something else may freeze (CRIU's dump):
    /// thawed when released or dropped, and by a restarted daemon if this
    /// one dies first.
    pub fn thaw_on_release(&self, name: &str, freezer: &Freezer) -> Result<FrozenHold, CaptureError> {
        self.markers.thaw_on_release(&self.sys, name, freezer)
    }

    /// Deletes a capture; a missing one is fine.
    pub fn remove(&self, capture: &Path) {
        if !capture.exists() {
            return;
        }
        if let Err(e) = self.snapshotter.remove_capture(capture) {
            warn!(capture = %capture.display(), error = %e, "capture left for the next start");
        }
    }

    /// Unpins and deletes a capture.
    pub fn release(&self, capture: &Path) {
        if let Err(e) = unpin(capture) {
            warn!(capture = %capture.display(), error = %e, "cannot unpin a capture");
        }
        self.remove(capture);
    }

    /// At start, before any capture is taken: removes every capture that is
    /// neither pinned nor in `keep` (a daemon killed between a capture and
    /// recording who uses it leaves one).
    pub fn sweep(&self, keep: &HashSet<PathBuf>) -> Result<(), CaptureError> {
        let entries = self.snapshotter.captures()?;
        let pinned: HashSet<PathBuf> = entries.iter().filter_map(|e| pinned_by(e)).collect();
        for capture in &entries {
            if !keep.contains(capture) && !pinned.contains(capture) && pinned_by(capture).is_none() {
                warn!(capture = %capture.display(), "removing a capture no running job uses");
                let _ = self.snapshotter.remove_capture(capture);
            }
        }
        Ok(())
    }

    /// The captures pinned (see [`pin_path`]), whether or not they exist.
    pub fn pinned(&self) -> Result<Vec<PathBuf>, CaptureError> {
        Ok(self
            .snapshotter
            .captures()?
            .iter()
            .filter_map(|e| pinned_by(e))
            .collect())
    }
}

/// The capture `entry` pins, if it is a pin.
fn pinned_by(entry: &Path) -> Option<PathBuf> {
    entry
        .to_str()
        .and_then(|p| p.strip_suffix(PIN_SUFFIX))
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendChoice, Config};
    use crate::error::{Classify, ErrorKind};
    use crate::host::sys::RecordingSystem;
    use crate::snapshot::snapshotter::KeyStyle;

    fn service(config: &Config, fake: &Arc<RecordingSystem>) -> (tempfile::TempDir, CaptureService, u64) {
        let tmp = tempfile::tempdir().unwrap();
        let s = Arc::new(Snapshotter::open(tmp.path(), config, fake.clone()).unwrap());
        s.prepare(KeyStyle::Prefixed, "ns/1/c", "", Default::default()).unwrap();
        let (_, id) = s.container_snapshot("ns", "c").unwrap();
        let service = CaptureService::new(s, tmp.path(), tmp.path().join("no-containerd.sock"));
        (tmp, service, id)
    }

    #[test]
    fn a_capture_flushes_then_freezes_only_around_the_snapshot() {
        let fake = Arc::new(RecordingSystem::btrfs());
        let (tmp, service, id) = service(&Config::default(), &fake);
        let freezer = Freezer::V1("/sys/fs/cgroup/freezer/ns/c".into());
        let (captured, hold) = service.capture_snapshot(id, "snapshot-ns-1", &freezer, false).unwrap();
        assert!(hold.is_none());
        assert_eq!(captured.snapshot, tmp.path().join("captures/snapshot-ns-1"));
        let calls = fake.calls();
        let tail: Vec<&str> = calls.iter().rev().take(4).rev().map(String::as_str).collect();
        let subvol = service.snapshotter().capture_site(id, "x").unwrap().subvolume;
        assert_eq!(
            tail,
            vec![
                format!("syncfs {}", subvol.display()).as_str(),
                "freeze /sys/fs/cgroup/freezer/ns/c",
                format!("snapshot readonly {} {}", subvol.display(), captured.snapshot.display()).as_str(),
                "thaw /sys/fs/cgroup/freezer/ns/c",
            ]
        );
        let e = service.capture_snapshot(id, "../escape", &freezer, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn directory_storage_copies_the_upper_while_frozen() {
        let mut config = Config::default();
        config.storage.backend = BackendChoice::Directory;
        let fake = Arc::new(RecordingSystem::plain());
        let (_tmp, service, id) = service(&config, &fake);
        let (captured, _) = service
            .capture_snapshot(id, "x", &Freezer::V2("/cg".into()), false)
            .unwrap();
        let calls = fake.calls();
        let tail: Vec<&str> = calls.iter().rev().take(3).rev().map(String::as_str).collect();
        let copy = format!(
            "copy {} {}",
            service.snapshotter().upper_dir(id).display(),
            captured.snapshot.join("fs").display()
        );
        assert_eq!(tail, vec!["freeze /cg", copy.as_str(), "thaw /cg"]);
        assert!(!calls.iter().any(|c| c.starts_with("snapshot readonly")));
    }

    #[test]
    fn a_held_capture_thaws_when_the_hold_is_dropped() {
        let fake = Arc::new(RecordingSystem::btrfs());
        let (_tmp, service, id) = service(&Config::default(), &fake);
        let (_, hold) = service
            .capture_snapshot(id, "held", &Freezer::V1("/cg/held".into()), true)
            .unwrap();
        let last = fake.calls().last().cloned().unwrap_or_default();
        assert!(
            last.starts_with("snapshot readonly"),
            "held frozen after the snapshot: {last}"
        );
        drop(hold);
        assert_eq!(fake.calls().last().map(String::as_str), Some("thaw /cg/held"));
    }

    #[test]
    fn a_new_service_thaws_what_a_killed_daemon_left_frozen() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("frozen")).unwrap();
        std::fs::write(
            tmp.path().join("frozen/snapshot-x.json"),
            serde_json::to_vec(&Freezer::V1("/cg/left-frozen".into())).unwrap(),
        )
        .unwrap();
        let fake = Arc::new(RecordingSystem::btrfs());
        let s = Arc::new(Snapshotter::open(tmp.path(), &Config::default(), fake.clone()).unwrap());
        assert!(!fake.calls().iter().any(|c| c == "thaw /cg/left-frozen"));
        let _service = CaptureService::new(s, tmp.path(), tmp.path().join("c.sock"));
        assert!(fake.calls().iter().any(|c| c == "thaw /cg/left-frozen"));
        assert_eq!(std::fs::read_dir(tmp.path().join("frozen")).unwrap().count(), 0);
    }

    #[test]
    fn the_sweep_keeps_what_is_kept_or_pinned() {
        let fake = Arc::new(RecordingSystem::btrfs());
        let (_tmp, service, id) = service(&Config::default(), &fake);
        let freezer = Freezer::V1("/cg".into());
        let capture = |name: &str| service.capture_snapshot(id, name, &freezer, false).unwrap().0.snapshot;
        let (kept, pinned, stray) = (capture("kept"), capture("pinned"), capture("stray"));
        std::fs::write(pin_path(&pinned), b"").unwrap();
        service.sweep(&[kept.clone()].into_iter().collect()).unwrap();
        assert!(kept.exists() && pinned.exists() && !stray.exists());
        assert_eq!(service.pinned().unwrap(), vec![pinned.clone()]);
        service.release(&pinned);
        unpin(&pinned).unwrap();
        assert!(!pinned.exists() && !pin_path(&pinned).exists());
        assert!(service.pinned().unwrap().is_empty());
    }
}
