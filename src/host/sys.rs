//! The only module that issues mount(2), ioctl(2) and other privileged
//! syscalls. Everything above it goes through [`SystemOps`], so storage logic is
//! unit-tested with [`RecordingSystem`] and privileged tests use [`RealSystem`].

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{io_err, Classify, ErrorKind, IoError};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{op} {path}: {errno}")]
    Errno {
        op: &'static str,
        path: String,
        errno: nix::errno::Errno,
    },
    #[error("{command} failed: {output}")]
    Command { command: String, output: String },
    #[error("name {name:?} cannot be a btrfs subvolume name")]
    BadName { name: String },
    /// The kernel refused a mount; `kernel_log` holds what the filesystem
    /// said through the mount context (often the only useful detail).
    #[error("mount {fs_type} at {target}: {errno}{}", if kernel_log.is_empty() { String::new() } else { format!(" ({kernel_log})") })]
    Mount {
        fs_type: &'static str,
        target: String,
        errno: nix::errno::Errno,
        kernel_log: String,
    },
}

impl Classify for SysError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

impl SysError {
    /// True when the path was not a btrfs subvolume (so a plain removal is due).
    pub fn is_not_subvolume(&self) -> bool {
        matches!(
            self,
            SysError::Errno {
                errno: nix::errno::Errno::ENOTTY
                    | nix::errno::Errno::EINVAL
                    | nix::errno::Errno::EPERM
                    | nix::errno::Errno::EXDEV,
                ..
            }
        )
    }
}

/// The freezer of one cgroup, by hierarchy version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Freezer {
    /// cgroup v1: the cgroup's directory in the freezer hierarchy.
    V1(PathBuf),
    /// cgroup v2: the cgroup's directory in the unified hierarchy.
    V2(PathBuf),
}

impl Freezer {
    pub fn dir(&self) -> &Path {
        match self {
            Freezer::V1(p) | Freezer::V2(p) => p,
        }
    }
}

/// Filesystem types the storage layer distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Btrfs,
    Other(i64),
}

pub trait SystemOps: Send + Sync + std::fmt::Debug {
    fn fs_type(&self, path: &Path) -> Result<FsType, SysError>;
    /// Free bytes available to root on the filesystem holding `path`.
    fn free_bytes(&self, path: &Path) -> Result<u64, SysError>;
    /// Size in bytes of the filesystem holding `path`.
    fn total_bytes(&self, path: &Path) -> Result<u64, SysError>;
    fn is_mountpoint(&self, path: &Path) -> Result<bool, SysError>;
    fn create_subvolume(&self, path: &Path) -> Result<(), SysError>;
    fn delete_subvolume(&self, path: &Path) -> Result<(), SysError>;
    /// Takes a read-only snapshot of subvolume `source` at `dest` (same filesystem).
    fn snapshot_readonly(&self, source: &Path, dest: &Path) -> Result<(), SysError>;
    /// Copies directory `source` to the new path `dest`, keeping owners,
    /// modes, times, hard links, devices and extended attributes.
    fn copy_tree(&self, source: &Path, dest: &Path) -> Result<(), SysError>;
    /// Flushes the filesystem holding `path` to disk (syncfs(2)).
    fn syncfs(&self, path: &Path) -> Result<(), SysError>;
    /// Asks the kernel to freeze every task of `cgroup` and returns once all
    /// are frozen, or fails at `deadline` (the caller then thaws).
    fn freeze_cgroup(&self, cgroup: &Freezer, deadline: Instant) -> Result<(), SysError>;
    /// Thaws `cgroup`; thawing a cgroup that is not frozen is fine.
    fn thaw_cgroup(&self, cgroup: &Freezer) -> Result<(), SysError>;
    /// Sends SIGKILL to every process of the cgroup (and of the cgroups
    /// below it); returns how many were signalled. A frozen process dies
    /// once thawed, before it runs another instruction of its own.
    fn kill_cgroup(&self, cgroup: &Freezer) -> Result<usize, SysError>;
    /// Formats `image` (a regular file) as btrfs.
    fn mkfs_btrfs(&self, image: &Path, label: &str) -> Result<(), SysError>;
    /// Attaches `image` to a free loop device (detached automatically on the
    /// last unmount) and mounts it as btrfs at `target`.
    fn mount_btrfs_image(&self, image: &Path, target: &Path) -> Result<(), SysError>;
    /// Mounts the erofs image in the regular file `source` read-only at
    /// `target`, with `devices` (regular files too) as its extra devices in
    /// the order of its device table.
    fn mount_erofs(&self, source: &Path, devices: &[PathBuf], target: &Path) -> Result<(), SysError>;
    /// Mounts a read-only FUSE filesystem of type `fuse.<subtype>` at
    /// `target` (an existing directory), open to every user, its requests
    /// at most `max_read` bytes of data, and returns the connection's
    /// `/dev/fuse` descriptor (non-blocking): whoever holds a copy of it
    /// keeps the connection, and so the mount, alive.
    fn mount_fuse(&self, target: &Path, subtype: &str, max_read: usize) -> Result<OwnedFd, SysError>;
    /// Unmounts `target`; when it is busy, detaches it lazily, so the
    /// filesystem goes once its last user lets go.
    fn unmount(&self, target: &Path) -> Result<(), SysError>;
    /// The mount points strictly under `dir` whose filesystem is FUSE, as
    /// this process's mount table lists them.
    fn fuse_mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, SysError>;
}

/// `SysError::Io` keeps its own fields because callers outside `host`
/// match on `SysError::Io { source, .. }`; it is built from the crate's
/// [`IoError`] so that `.map_err(io_err(op, path))?` works here as anywhere.
impl From<IoError> for SysError {
    fn from(IoError { op, path, source }: IoError) -> SysError {
        SysError::Io { op, path, source }
    }
}

fn errno_err(op: &'static str, path: &Path) -> impl FnOnce(nix::errno::Errno) -> SysError {
    let path = path.display().to_string();
    move |errno| SysError::Errno { op, path, errno }
}

/// The kernel.
#[derive(Debug, Default)]
pub struct RealSystem;

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;

/// `struct btrfs_ioctl_vol_args` from linux/btrfs.h.
#[repr(C)]
struct BtrfsVolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

nix::ioctl_write_ptr!(btrfs_subvol_create, BTRFS_IOCTL_MAGIC, 14, BtrfsVolArgs);
nix::ioctl_write_ptr!(btrfs_snap_destroy, BTRFS_IOCTL_MAGIC, 15, BtrfsVolArgs);

const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;

/// `struct btrfs_ioctl_vol_args_v2` from linux/btrfs.h (4096 bytes).
#[repr(C)]
struct BtrfsVolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

nix::ioctl_write_ptr!(btrfs_snap_create_v2, BTRFS_IOCTL_MAGIC, 23, BtrfsVolArgsV2);

/// Waits between freezer state reads: short at first, so a cgroup that
/// freezes in microseconds is seen at once, never more than 500 µs apart
/// (runc and CRIU poll in 10-100 ms steps, which alone breaks a 10 ms pause).
fn freeze_poll_delay(attempt: u32) -> Duration {
    Duration::from_micros((20u64 << attempt.min(5)).min(500))
}

/// Loop device ioctls from linux/loop.h.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` from linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// Splits `path` into its parent directory (opened) and a subvolume name.
fn open_parent(path: &Path) -> Result<(File, BtrfsVolArgs), SysError> {
    let name = path.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    if name.is_empty() || name.len() > BTRFS_PATH_NAME_MAX || name.contains(&0) {
        return Err(SysError::BadName {
            name: path.display().to_string(),
        });
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let dir = File::open(parent).map_err(io_err("open", parent))?;
    let mut args = BtrfsVolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    };
    args.name[..name.len()].copy_from_slice(name);
    Ok((dir, args))
}

impl SystemOps for RealSystem {
    fn fs_type(&self, path: &Path) -> Result<FsType, SysError> {
        let st = nix::sys::statfs::statfs(path).map_err(errno_err("statfs", path))?;
        if st.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC {
            Ok(FsType::Btrfs)
        } else {
            Ok(FsType::Other(st.filesystem_type().0 as i64))
        }
    }

    fn free_bytes(&self, path: &Path) -> Result<u64, SysError> {
        let st = nix::sys::statvfs::statvfs(path).map_err(errno_err("statvfs", path))?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    fn total_bytes(&self, path: &Path) -> Result<u64, SysError> {
        let st = nix::sys::statvfs::statvfs(path).map_err(errno_err("statvfs", path))?;
        Ok(st.blocks() as u64 * st.fragment_size() as u64)
    }

    fn is_mountpoint(&self, path: &Path) -> Result<bool, SysError> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", path)(e).into()),
        };
        let parent = path.join("..");
        let parent_meta = std::fs::symlink_metadata(&parent).map_err(io_err("stat", &parent))?;
        Ok(meta.dev() != parent_meta.dev() || meta.ino() == parent_meta.ino())
    }

    fn create_subvolume(&self, path: &Path) -> Result<(), SysError> {
        let (dir, args) = open_parent(path)?;
        // SAFETY: `args` is a fully initialised btrfs_ioctl_vol_args with a
        // NUL-terminated name, and `dir` is an open directory descriptor.
        unsafe { btrfs_subvol_create(dir.as_raw_fd(), &args) }.map_err(errno_err("create btrfs subvolume", path))?;
        Ok(())
    }

    fn delete_subvolume(&self, path: &Path) -> Result<(), SysError> {
        let (dir, args) = open_parent(path)?;
        // SAFETY: as in create_subvolume; the kernel only reads `args`.
        unsafe { btrfs_snap_destroy(dir.as_raw_fd(), &args) }.map_err(errno_err("delete btrfs subvolume", path))?;
        Ok(())
    }

    fn snapshot_readonly(&self, source: &Path, dest: &Path) -> Result<(), SysError> {
        let (dir, v1) = open_parent(dest)?;
        let name = &v1.name[..v1.name.iter().position(|b| *b == 0).unwrap_or(0)];
        if name.len() > BTRFS_SUBVOL_NAME_MAX {
            return Err(SysError::BadName {
                name: dest.display().to_string(),
            });
        }
        let src = File::open(source).map_err(io_err("open", source))?;
        let mut args = BtrfsVolArgsV2 {
            fd: src.as_raw_fd() as i64,
            transid: 0,
            flags: BTRFS_SUBVOL_RDONLY,
            unused: [0; 4],
            name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
        };
        args.name[..name.len()].copy_from_slice(name);
        // SAFETY: `args` is a fully initialised btrfs_ioctl_vol_args_v2 with
        // a NUL-terminated name; `dir` and `src` stay open across the call.
        unsafe { btrfs_snap_create_v2(dir.as_raw_fd(), &args) }
            .map_err(errno_err("snapshot btrfs subvolume to", dest))?;
        Ok(())
    }

    fn copy_tree(&self, source: &Path, dest: &Path) -> Result<(), SysError> {
        // GNU cp -a keeps everything a layer needs (xattrs included, as
        // root); no crate does all of it.
        let output = Command::new("cp")
            .arg("-a")
            .arg("--no-target-directory")
            .arg(source)
            .arg(dest)
            .output()
            .map_err(io_err("run cp -a for", source))?;
        if !output.status.success() {
            return Err(SysError::Command {
                command: format!("cp -a {} {}", source.display(), dest.display()),
                output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    fn syncfs(&self, path: &Path) -> Result<(), SysError> {
        let f = File::open(path).map_err(io_err("open", path))?;
        nix::unistd::syncfs(f.as_raw_fd()).map_err(errno_err("syncfs", path))
    }

    fn freeze_cgroup(&self, cgroup: &Freezer, deadline: Instant) -> Result<(), SysError> {
        let (control, value, state_file) = match cgroup {
            Freezer::V1(dir) => (dir.join("freezer.state"), "FROZEN", dir.join("freezer.state")),
            Freezer::V2(dir) => (dir.join("cgroup.freeze"), "1", dir.join("cgroup.events")),
        };
        std::fs::write(&control, value).map_err(io_err("write", &control))?;
        let mut attempt = 0;
        loop {
            let state = std::fs::read_to_string(&state_file).map_err(io_err("read", &state_file))?;
            let frozen = match cgroup {
                Freezer::V1(_) => state.trim() == "FROZEN",
                Freezer::V2(_) => state.lines().any(|l| l.trim() == "frozen 1"),
            };
            if frozen {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SysError::Errno {
                    op: "wait for frozen cgroup",
                    path: cgroup.dir().display().to_string(),
                    errno: nix::errno::Errno::ETIMEDOUT,
                });
            }
            std::thread::sleep(freeze_poll_delay(attempt));
            attempt += 1;
        }
    }

    fn thaw_cgroup(&self, cgroup: &Freezer) -> Result<(), SysError> {
        let (control, value) = match cgroup {
            Freezer::V1(dir) => (dir.join("freezer.state"), "THAWED"),
            Freezer::V2(dir) => (dir.join("cgroup.freeze"), "0"),
        };
        Ok(std::fs::write(&control, value).map_err(io_err("write", &control))?)
    }

    fn kill_cgroup(&self, cgroup: &Freezer) -> Result<usize, SysError> {
        let mut killed = 0;
        let mut pending = vec![cgroup.dir().to_path_buf()];
        while let Some(dir) = pending.pop() {
            let procs = dir.join("cgroup.procs");
            let text = std::fs::read_to_string(&procs).map_err(io_err("read", &procs))?;
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL) {
                    Ok(()) => killed += 1,
                    // Gone since the list was read.
                    Err(nix::errno::Errno::ESRCH) => {}
                    Err(errno) => {
                        return Err(SysError::Errno {
                            op: "kill a process of",
                            path: dir.display().to_string(),
                            errno,
                        })
                    }
                }
            }
            for entry in std::fs::read_dir(&dir).map_err(io_err("read", &dir))?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
        Ok(killed)
    }

    fn mkfs_btrfs(&self, image: &Path, label: &str) -> Result<(), SysError> {
        let output = Command::new("mkfs.btrfs")
            .args(["-q", "-f", "-L", label, "-m", "single", "-d", "single"])
            .arg(image)
            .output()
            .map_err(io_err("run mkfs.btrfs for", image))?;
        if !output.status.success() {
            return Err(SysError::Command {
                command: format!("mkfs.btrfs {}", image.display()),
                output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    fn mount_btrfs_image(&self, image: &Path, target: &Path) -> Result<(), SysError> {
        // The loop fd stays open until the mount holds the device: with
        // autoclear the device is released on its last close.
        let (device, _loop_file) = attach_loop(image)?;
        nix::mount::mount(
            Some(device.as_path()),
            target,
            Some("btrfs"),
            nix::mount::MsFlags::MS_NOATIME,
            None::<&str>,
        )
        .map_err(errno_err("mount btrfs pool at", target))?;
        Ok(())
    }

    fn mount_erofs(&self, source: &Path, devices: &[PathBuf], target: &Path) -> Result<(), SysError> {
        // mount(2) takes only a block device as erofs source and mount(8) of
        // util-linux 2.38 mishandles `device=<file>`; the new mount API hands
        // the kernel the paths as they are, and erofs opens regular files
        // itself (file-backed mounts).
        let failed = |errno: nix::errno::Errno, context: Option<&OwnedFd>| SysError::Mount {
            fs_type: "erofs",
            target: target.display().to_string(),
            errno,
            kernel_log: context.map(read_fs_context_log).unwrap_or_default(),
        };
        let fs_name = c"erofs";
        // SAFETY: fsopen reads the NUL-terminated name and returns a new
        // descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_fsopen, fs_name.as_ptr(), FSOPEN_CLOEXEC) };
        if fd < 0 {
            return Err(failed(nix::errno::Errno::last(), None));
        }
        // SAFETY: `fd` was just returned by fsopen and nothing else owns it.
        let context = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut settings = vec![("source", source)];
        settings.extend(devices.iter().map(|d| ("device", d.as_path())));
        for (key, path) in settings {
            let value = path_cstring(path)?;
            let key = CString::new(key).expect("option names hold no NUL");
            // SAFETY: key and value are NUL-terminated strings that outlive
            // the call; the context descriptor is open.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_fsconfig,
                    context.as_raw_fd(),
                    FSCONFIG_SET_STRING,
                    key.as_ptr(),
                    value.as_ptr(),
                    0,
                )
            };
            if rc < 0 {
                return Err(failed(nix::errno::Errno::last(), Some(&context)));
            }
        }
        // SAFETY: FSCONFIG_CMD_CREATE takes no key or value.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                context.as_raw_fd(),
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_void>(),
                0,
            )
        };
        if rc < 0 {
            return Err(failed(nix::errno::Errno::last(), Some(&context)));
        }
        // SAFETY: fsmount takes the created context and plain flags and
        // returns a new descriptor or -1.
        let mnt = unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                context.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                MOUNT_ATTR_RDONLY,
            )
        };
        if mnt < 0 {
            return Err(failed(nix::errno::Errno::last(), Some(&context)));
        }
        // SAFETY: `mnt` was just returned by fsmount and nothing else owns it.
        let mnt = unsafe { OwnedFd::from_raw_fd(mnt as i32) };
        let target_c = path_cstring(target)?;
        let empty = c"";
        // SAFETY: both paths are NUL-terminated and outlive the call; `mnt`
        // is the detached mount to attach at `target`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mnt.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                target_c.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if rc < 0 {
            return Err(failed(nix::errno::Errno::last(), None));
        }
        Ok(())
    }

    fn mount_fuse(&self, target: &Path, subtype: &str, max_read: usize) -> Result<OwnedFd, SysError> {
        use std::os::unix::fs::OpenOptionsExt;
        let device = Path::new("/dev/fuse");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(device)
            .map_err(io_err("open", device))?;
        let fd = OwnedFd::from(file);
        let root_mode = std::fs::metadata(target).map_err(io_err("stat", target))?.mode() & libc::S_IFMT;
        // default_permissions: the kernel checks modes itself, as for any
        // filesystem; allow_other: containers run as any user.
        let options = format!(
            "fd={},rootmode={root_mode:o},user_id=0,group_id=0,max_read={max_read},default_permissions,allow_other",
            fd.as_raw_fd()
        );
        let flags = nix::mount::MsFlags::MS_RDONLY
            | nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOATIME;
        nix::mount::mount(
            Some("seamless-rafs"),
            target,
            Some(format!("fuse.{subtype}").as_str()),
            flags,
            Some(options.as_str()),
        )
        .map_err(|errno| SysError::Mount {
            fs_type: "fuse",
            target: target.display().to_string(),
            errno,
            kernel_log: String::new(),
        })?;
        Ok(fd)
    }

    fn unmount(&self, target: &Path) -> Result<(), SysError> {
        match nix::mount::umount2(target, nix::mount::MntFlags::empty()) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
                .map_err(errno_err("unmount (lazily)", target)),
            Err(errno) => Err(errno_err("unmount", target)(errno)),
        }
    }

    fn fuse_mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, SysError> {
        let table = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(table).map_err(io_err("read", table))?;
        Ok(fuse_mounts_in(&text, dir))
    }
}

/// The FUSE mount points strictly under `dir` in mountinfo `text`.
fn fuse_mounts_in(text: &str, dir: &Path) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let point = unescape_mountinfo(line.split(' ').nth(4)?);
            let fs_type = line.split(" - ").nth(1)?.split(' ').next()?;
            let fuse = fs_type == "fuse" || fs_type.starts_with("fuse.");
            (fuse && point.starts_with(dir) && point != dir).then_some(point)
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Constants of the new mount API from linux/mount.h.
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn path_cstring(path: &Path) -> Result<CString, SysError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SysError::Errno {
        op: "pass to the kernel",
        path: path.display().to_string(),
        errno: nix::errno::Errno::EINVAL,
    })
}

/// The messages a filesystem logged on a mount context ("e erofs: ..."),
/// joined; each read(2) returns one until none is left.
fn read_fs_context_log(context: &OwnedFd) -> String {
    let mut messages = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(context.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        messages.push(String::from_utf8_lossy(&buf[..n as usize]).trim().to_string());
    }
    messages.join("; ")
}

/// Binds `image` to a free loop device with autoclear set, so the device is
/// released when its last user (mount or open fd) goes away.
fn attach_loop(image: &Path) -> Result<(PathBuf, File), SysError> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io_err("open", image))?;
    let control_path = Path::new("/dev/loop-control");
    let control = File::open(control_path).map_err(io_err("open", control_path))?;
    // Another process may take the free device between GET_FREE and SET_FD.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(errno_err("find a free loop device for", image)(
                nix::errno::Errno::last(),
            ));
        }
        let device = PathBuf::from(format!("/dev/loop{number}"));
        let loop_file = match OpenOptions::new().read(true).write(true).open(&device) {
            Ok(f) => f,
            Err(e) => return Err(io_err("open", &device)(e).into()),
        };
        // SAFETY: LOOP_SET_FD takes the backing file descriptor by value.
        let rc = unsafe { libc::ioctl(loop_file.as_raw_fd(), LOOP_SET_FD, backing.as_raw_fd()) };
        if rc < 0 {
            let errno = nix::errno::Errno::last();
            if errno == nix::errno::Errno::EBUSY {
                continue;
            }
            return Err(errno_err("attach loop device", &device)(errno));
        }
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let name = image.as_os_str().as_bytes();
        let len = name.len().min(63);
        info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: `info` is a fully initialised loop_info64 the kernel reads.
        let rc = unsafe { libc::ioctl(loop_file.as_raw_fd(), LOOP_SET_STATUS64, &info as *const LoopInfo64) };
        if rc < 0 {
            let errno = nix::errno::Errno::last();
            // SAFETY: LOOP_CLR_FD (0x4C01) takes no argument; undoes SET_FD.
            unsafe { libc::ioctl(loop_file.as_raw_fd(), 0x4C01) };
            return Err(errno_err("configure loop device", &device)(errno));
        }
        return Ok((device, loop_file));
    }
    Err(errno_err("find a free loop device for", image)(
        nix::errno::Errno::EBUSY,
    ))
}

/// Records every call and acts on a plain directory tree, so storage logic can
/// be tested without root: subvolumes become directories.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freeze_polling_starts_fine_and_stays_under_half_a_millisecond() {
        assert_eq!(freeze_poll_delay(0), Duration::from_micros(20));
        assert_eq!(freeze_poll_delay(1), Duration::from_micros(40));
        assert!((0..100).all(|a| freeze_poll_delay(a) <= Duration::from_micros(500)));
    }

    #[test]
    fn fake_records_erofs_mounts_as_mount_would_and_forgets_unmounted_ones() {
        let fake = RecordingSystem::plain();
        let target = Path::new("/root/nydus/mnt/7");
        fake.mount_erofs(
            Path::new("/boot/image.boot"),
            &[PathBuf::from("/cache/a"), PathBuf::from("/cache/b")],
            target,
        )
        .unwrap();
        assert!(fake.is_mountpoint(target).unwrap());
        assert!(!fake.is_mountpoint(Path::new("/root/nydus/mnt")).unwrap());
        fake.unmount(target).unwrap();
        assert!(!fake.is_mountpoint(target).unwrap());
        fake.mount_erofs(Path::new("/boot/image.boot"), &[], target).unwrap();
        assert!(fake.is_mountpoint(target).unwrap(), "mounted again");
        assert_eq!(
            fake.calls(),
            vec![
                "mount -t erofs -o ro,device=/cache/a,device=/cache/b /boot/image.boot /root/nydus/mnt/7",
                "umount /root/nydus/mnt/7",
                "mount -t erofs -o ro /boot/image.boot /root/nydus/mnt/7",
            ]
        );
        // A path under an erofs mount is not in the btrfs pool.
        assert_eq!(fake.fs_type(&target.join("x")).unwrap(), FsType::Other(0xEF53));
    }

    #[test]
    fn mount_errors_name_the_target_and_what_the_filesystem_said() {
        let err = SysError::Mount {
            fs_type: "erofs",
            target: "/mnt/x".into(),
            errno: nix::errno::Errno::EINVAL,
            kernel_log: "e erofs: invalid device".into(),
        };
        assert_eq!(
            err.to_string(),
            "mount erofs at /mnt/x: EINVAL: Invalid argument (e erofs: invalid device)"
        );
        let err = SysError::Mount {
            fs_type: "erofs",
            target: "/mnt/x".into(),
            errno: nix::errno::Errno::ENOENT,
            kernel_log: String::new(),
        };
        assert_eq!(
            err.to_string(),
            "mount erofs at /mnt/x: ENOENT: No such file or directory"
        );
    }

    #[test]
    fn fuse_mounts_are_read_from_mountinfo() {
        let text = "\
36 25 0:32 / /var/lib/x/nydus/mnt/7 rw,nosuid,nodev,noatime - fuse.rafs seamless-rafs ro,user_id=0\n\
37 25 0:33 / /var/lib/x/nydus/mnt/8 ro - erofs /var/lib/x/boot ro\n\
38 25 0:34 / /var/lib/x/nydus/mnt/with\\040space rw - fuse rafs rw\n\
39 25 0:35 / /var/lib/x/nydus/mnt rw - fuse.rafs x rw\n\
40 25 0:36 / /elsewhere/mnt/9 rw - fuse.sshfs x rw\n";
        assert_eq!(
            fuse_mounts_in(text, Path::new("/var/lib/x/nydus/mnt")),
            vec![
                PathBuf::from("/var/lib/x/nydus/mnt/7"),
                PathBuf::from("/var/lib/x/nydus/mnt/with space")
            ]
        );
    }

    #[test]
    fn ioctl_argument_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<BtrfsVolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<BtrfsVolArgsV2>(), 4096);
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
    }
}

#[derive(Debug, Default)]
pub struct RecordingSystem {
    pub calls: Mutex<Vec<String>>,
    /// A call whose record starts with this fails with EIO (after being recorded).
    pub fail_on: Mutex<Option<String>>,
    /// How long `snapshot_readonly` blocks before acting, as a stuck ioctl would.
    pub snapshot_delay: Mutex<Option<Duration>>,
    pub btrfs: bool,
    pub free: u64,
    /// What `fuse_mounts_under` finds: FUSE mounts a previous run left.
    pub fuse_mounts: Mutex<Vec<PathBuf>>,
}

impl RecordingSystem {
    pub fn btrfs() -> Self {
        RecordingSystem {
            btrfs: true,
            free: 10 << 30,
            ..Default::default()
        }
    }

    pub fn plain() -> Self {
        RecordingSystem {
            btrfs: false,
            free: 10 << 30,
            ..Default::default()
        }
    }

    fn record(&self, call: String) {
        self.calls.lock().expect("calls lock poisoned").push(call);
    }

    /// Records `call` and fails it if it matches `fail_on`.
    fn record_fallible(&self, call: String) -> Result<(), SysError> {
        let fail = self
            .fail_on
            .lock()
            .expect("fail_on lock poisoned")
            .as_ref()
            .is_some_and(|prefix| call.starts_with(prefix.as_str()));
        self.record(call.clone());
        if fail {
            return Err(SysError::Errno {
                op: "fake failure of",
                path: call,
                errno: nix::errno::Errno::EIO,
            });
        }
        Ok(())
    }

    pub fn fail_calls_starting_with(&self, prefix: &str) {
        *self.fail_on.lock().expect("fail_on lock poisoned") = Some(prefix.to_string());
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("calls lock poisoned").clone()
    }
}

impl SystemOps for RecordingSystem {
    fn fs_type(&self, path: &Path) -> Result<FsType, SysError> {
        let in_pool = self.calls().iter().any(|c| {
            c.strip_prefix("mount ")
                .and_then(|rest| rest.split(' ').nth(1))
                .is_some_and(|target| path.starts_with(target))
        });
        Ok(if self.btrfs || in_pool {
            FsType::Btrfs
        } else {
            FsType::Other(0xEF53)
        })
    }

    fn free_bytes(&self, _path: &Path) -> Result<u64, SysError> {
        Ok(self.free)
    }

    /// As large as what is free: the fake's filesystem is empty.
    fn total_bytes(&self, _path: &Path) -> Result<u64, SysError> {
        Ok(self.free)
    }

    fn is_mountpoint(&self, path: &Path) -> Result<bool, SysError> {
        // The latest mount or unmount of `path` decides.
        let at = format!(" {}", path.display());
        let unmount = format!("umount {}", path.display());
        let mounted = self
            .calls()
            .iter()
            .rev()
            .find_map(|c| {
                if c == &unmount {
                    Some(false)
                } else if c.starts_with("mount ") && c.ends_with(&at) {
                    Some(true)
                } else {
                    None
                }
            })
            .unwrap_or(false);
        Ok(mounted)
    }

    fn create_subvolume(&self, path: &Path) -> Result<(), SysError> {
        self.record(format!("subvolume create {}", path.display()));
        Ok(std::fs::create_dir(path).map_err(io_err("mkdir", path))?)
    }

    fn delete_subvolume(&self, path: &Path) -> Result<(), SysError> {
        self.record(format!("subvolume delete {}", path.display()));
        Ok(std::fs::remove_dir_all(path).map_err(io_err("remove", path))?)
    }

    fn snapshot_readonly(&self, source: &Path, dest: &Path) -> Result<(), SysError> {
        let delay = *self.snapshot_delay.lock().expect("snapshot_delay lock poisoned");
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        self.record_fallible(format!("snapshot readonly {} {}", source.display(), dest.display()))?;
        Ok(std::fs::create_dir(dest).map_err(io_err("mkdir", dest))?)
    }

    fn copy_tree(&self, source: &Path, dest: &Path) -> Result<(), SysError> {
        self.record_fallible(format!("copy {} {}", source.display(), dest.display()))?;
        Ok(std::fs::create_dir_all(dest).map_err(io_err("mkdir", dest))?)
    }

    fn syncfs(&self, path: &Path) -> Result<(), SysError> {
        self.record_fallible(format!("syncfs {}", path.display()))
    }

    fn freeze_cgroup(&self, cgroup: &Freezer, _deadline: Instant) -> Result<(), SysError> {
        self.record_fallible(format!("freeze {}", cgroup.dir().display()))
    }

    fn thaw_cgroup(&self, cgroup: &Freezer) -> Result<(), SysError> {
        self.record_fallible(format!("thaw {}", cgroup.dir().display()))
    }

    fn kill_cgroup(&self, cgroup: &Freezer) -> Result<usize, SysError> {
        self.record_fallible(format!("kill {}", cgroup.dir().display()))?;
        Ok(1)
    }

    fn mkfs_btrfs(&self, image: &Path, label: &str) -> Result<(), SysError> {
        let size = std::fs::metadata(image).map_err(io_err("stat", image))?.len();
        self.record(format!("mkfs.btrfs -L {label} {} ({size} bytes)", image.display()));
        Ok(())
    }

    fn mount_btrfs_image(&self, image: &Path, target: &Path) -> Result<(), SysError> {
        self.record(format!("mount {} {}", image.display(), target.display()));
        Ok(())
    }

    /// Recorded as the mount(8) command line it amounts to.
    fn mount_erofs(&self, source: &Path, devices: &[PathBuf], target: &Path) -> Result<(), SysError> {
        let mut options = vec!["ro".to_string()];
        options.extend(devices.iter().map(|d| format!("device={}", d.display())));
        self.record_fallible(format!(
            "mount -t erofs -o {} {} {}",
            options.join(","),
            source.display(),
            target.display()
        ))
    }

    /// Recorded as the mount(8) command line it amounts to; the descriptor
    /// is `/dev/null`'s.
    fn mount_fuse(&self, target: &Path, subtype: &str, max_read: usize) -> Result<OwnedFd, SysError> {
        self.record_fallible(format!(
            "mount -t fuse.{subtype} -o ro,max_read={max_read},allow_other seamless-rafs {}",
            target.display()
        ))?;
        self.fuse_mounts
            .lock()
            .expect("fuse_mounts lock poisoned")
            .push(target.to_path_buf());
        let null = Path::new("/dev/null");
        Ok(OwnedFd::from(std::fs::File::open(null).map_err(io_err("open", null))?))
    }

    fn unmount(&self, target: &Path) -> Result<(), SysError> {
        self.fuse_mounts
            .lock()
            .expect("fuse_mounts lock poisoned")
            .retain(|m| m != target);
        self.record_fallible(format!("umount {}", target.display()))
    }

    fn fuse_mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, SysError> {
        let mounts = self.fuse_mounts.lock().expect("fuse_mounts lock poisoned");
        Ok(mounts
            .iter()
            .filter(|m| m.starts_with(dir) && *m != dir)
            .cloned()
            .collect())
    }
}
