//! Privileged checks of the syscall layer against the real kernel: the
//! loop-mounted btrfs pool, subvolumes, read-only snapshots of a layer that is
//! still being written, and freezing a real process's cgroup. Root only: the
//! tests fail (never skip) without it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seamless_snapshotter::config::{BackendChoice, PoolSize};
use seamless_snapshotter::host::cgroup;
use seamless_snapshotter::host::sys::{Freezer, RealSystem, SystemOps};
use seamless_snapshotter::snapshot::storage::{DirKind, Storage, StorageKind};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (loop devices, btrfs, cgroups): run them as root, as .ci/test does"
    );
}

/// Unmounts the pool when the test ends, pass or fail.
struct PoolGuard<'a>(&'a Path);

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0.join("pool"), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn pool_subvolumes_and_readonly_snapshots() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let sys: Arc<dyn SystemOps> = Arc::new(RealSystem);
    let storage = Storage::open(&root, BackendChoice::Pool, PoolSize::Bytes(1 << 30), sys.clone()).unwrap();
    let _guard = PoolGuard(&root);
    assert_eq!(storage.kind(), StorageKind::BtrfsPool);
    assert_eq!(
        sys.fs_type(storage.snapshots_dir()).unwrap(),
        seamless_snapshotter::host::sys::FsType::Btrfs
    );

    storage.create_snapshot_dir(1, DirKind::Active, None).unwrap();
    let upper = storage.upper_dir(1);
    std::fs::write(upper.join("before"), b"captured").unwrap();
    sys.syncfs(&upper).unwrap();
    let capture = storage.snapshots_dir().join("capture-1");
    sys.snapshot_readonly(&storage.snapshot_dir(1), &capture).unwrap();
    // The live layer goes on; the snapshot keeps the old state and is read-only.
    std::fs::write(upper.join("after"), b"live").unwrap();
    assert_eq!(std::fs::read(capture.join("fs/before")).unwrap(), b"captured");
    assert!(!capture.join("fs/after").exists());
    let err = std::fs::write(capture.join("fs/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // Reopening finds the pool mounted and reuses it.
    let again = Storage::open(&root, BackendChoice::Auto, PoolSize::Auto, sys.clone()).unwrap();
    assert_eq!(again.kind(), StorageKind::BtrfsPool);
    assert_eq!(std::fs::read(again.upper_dir(1).join("after")).unwrap(), b"live");

    sys.delete_subvolume(&capture).unwrap();
    storage.remove_snapshot_dir(1).unwrap();
    assert!(!storage.snapshot_dir(1).exists() && !capture.exists());
}

/// A process in a cgroup of its own, killed and removed on drop.
struct CgroupProcess {
    child: std::process::Child,
    freezer: Freezer,
}

impl Drop for CgroupProcess {
    fn drop(&mut self) {
        let _ = RealSystem.thaw_cgroup(&self.freezer);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(self.freezer.dir());
    }
}

fn process_in_new_cgroup(name: &str) -> CgroupProcess {
    let child = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = child.id();
    let parent = cgroup::freezer_of(std::process::id()).expect("this machine has a freezer");
    let dir = match &parent {
        Freezer::V1(_) => Path::new("/sys/fs/cgroup/freezer").join(name),
        Freezer::V2(p) => p.join(name),
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
    let freezer = cgroup::freezer_of(pid).unwrap();
    assert_eq!(freezer.dir(), dir, "the process's freezer is the cgroup we made");
    CgroupProcess { child, freezer }
}

fn task_state(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("State:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn freezing_a_real_cgroup_and_thawing_it() {
    require_root();
    let p = process_in_new_cgroup(&format!("seamless-test-{}", std::process::id()));
    let start = Instant::now();
    RealSystem
        .freeze_cgroup(&p.freezer, Instant::now() + Duration::from_secs(5))
        .unwrap();
    let frozen_after = start.elapsed();
    let state_file = match &p.freezer {
        Freezer::V1(d) => d.join("freezer.state"),
        Freezer::V2(d) => d.join("cgroup.events"),
    };
    let state = std::fs::read_to_string(&state_file).unwrap();
    assert!(state.contains("FROZEN") || state.contains("frozen 1"), "{state}");
    RealSystem.thaw_cgroup(&p.freezer).unwrap();
    let state = std::fs::read_to_string(&state_file).unwrap();
    assert!(state.contains("THAWED") || state.contains("frozen 0"), "{state}");
    assert!(
        !task_state(p.child.id()).contains("stopped"),
        "{}",
        task_state(p.child.id())
    );
    eprintln!("froze a one-process cgroup in {frozen_after:?}");
}

#[test]
fn copy_tree_keeps_what_a_layer_needs() {
    require_root();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"data").unwrap();
    std::os::unix::fs::chown(src.join("d/f"), Some(1000), Some(1001)).unwrap();
    std::fs::hard_link(src.join("d/f"), src.join("hard")).unwrap();
    std::os::unix::fs::symlink("d/f", src.join("link")).unwrap();
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    // An overlay whiteout: a 0/0 character device.
    nix::sys::stat::mknod(
        &src.join("wh"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o000),
        0,
    )
    .unwrap();
    xattr::set(src.join("d"), "trusted.overlay.opaque", b"y").unwrap();
    xattr::set(src.join("d/f"), "user.note", b"kept").unwrap();

    let dest = tmp.path().join("dest");
    RealSystem.copy_tree(&src, &dest).unwrap();
    let f = std::fs::metadata(dest.join("d/f")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.nlink()), (1000, 1001, 2));
    assert_eq!(f.ino(), std::fs::metadata(dest.join("hard")).unwrap().ino());
    assert_eq!(std::fs::read_link(dest.join("link")).unwrap(), Path::new("d/f"));
    assert!(std::fs::symlink_metadata(dest.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let wh = std::fs::symlink_metadata(dest.join("wh")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(
        xattr::get(dest.join("d"), "trusted.overlay.opaque").unwrap().as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr::get(dest.join("d/f"), "user.note").unwrap().as_deref(),
        Some(&b"kept"[..])
    );
}

/// A daemon killed while a container was frozen left a marker; the next
/// start thaws the container before it reads its config, so even a start
/// that fails on a bad config leaves no container frozen.
#[test]
fn a_restart_with_a_bad_config_still_thaws_what_a_killed_daemon_left_frozen() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let p = process_in_new_cgroup(&format!("seamless-restart-{}", std::process::id()));
    RealSystem
        .freeze_cgroup(&p.freezer, Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert!(frozen(&p.freezer), "the test froze the container");
    // What the capture writes before it freezes (capture::FrozenMarkers).
    std::fs::create_dir_all(root.join("frozen")).unwrap();
    std::fs::write(
        root.join("frozen/capture-1.json"),
        serde_json::to_vec(&p.freezer).unwrap(),
    )
    .unwrap();
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, "version = 2\n[no_such_section]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_containerd-seamless-grpc"))
        .arg("--root")
        .arg(&root)
        .arg("--address")
        .arg(tmp.path().join("s.sock"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the bad config is refused: {stderr}");
    assert!(stderr.contains("bad.toml"), "the error names the config: {stderr}");
    assert!(
        !frozen(&p.freezer),
        "the container was thawed although the config was bad"
    );
    assert!(
        !root.join("frozen/capture-1.json").exists(),
        "the marker is gone once thawed"
    );
}

fn frozen(freezer: &Freezer) -> bool {
    let state = match freezer {
        Freezer::V1(d) => std::fs::read_to_string(d.join("freezer.state")).unwrap(),
        Freezer::V2(d) => std::fs::read_to_string(d.join("cgroup.events")).unwrap(),
    };
    state.contains("FROZEN") || state.contains("frozen 1")
}
