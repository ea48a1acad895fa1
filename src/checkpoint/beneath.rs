//! Writes beneath a root directory that cannot leave it, whatever the
//! paths name and whoever races them: the root is held as a file
//! descriptor, every parent directory is resolved from it with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! (the kernel refuses `..` out of the root, absolute paths and every
//! symlink, even one swapped in between two steps), and the last component
//! is made, opened and changed with the `*at` calls relative to that
//! parent, never following a symlink. Owner and times are set relative to
//! that parent with `AT_SYMLINK_NOFOLLOW`; mode and xattrs on a descriptor
//! of the entry itself (`O_PATH | O_NOFOLLOW`, reached through
//! `/proc/self/fd`), so they change the entry that was resolved, never what
//! a symlink points to.
//!
//! Restore writes checkpoint trees through it, network remap rewrites the
//! container's /etc/hosts and CRIU's files.img through it, and CRIU image
//! sets are unpacked through it. It owns no policy of what a tree may hold
//! (that is [`super::tree::validate_tree`]'s): it only guarantees where
//! the writes land.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};

use super::tree::TreePath;

/// openat2 answers EAGAIN when a concurrent rename kept it from proving a
/// lookup stayed beneath the root; retried this often, then given up.
const RESOLVE_TRIES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    #[error("{op} {path} beneath {root}: {source}")]
    Io {
        op: &'static str,
        root: String,
        path: String,
        source: io::Error,
    },
    /// The path passes through a symlink, or would leave the root: nothing
    /// was written there.
    #[error("{path} beneath {root} refused: {reason}")]
    Refused { root: String, path: String, reason: String },
}

/// A directory that writes stay beneath.
#[derive(Debug)]
pub struct Beneath {
    root: OwnedFd,
    shown: PathBuf,
}

/// A name in a directory beneath the root, the directory held open: what
/// is made or changed at a path goes through one.
#[derive(Debug)]
pub struct At<'a> {
    beneath: &'a Beneath,
    parent: OwnedFd,
    /// The last component ("." for the root itself).
    name: CString,
    path: String,
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: every caller passes a descriptor a successful open call just
    // returned, which nothing else owns or closes.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

impl Beneath {
    /// Opens the directory `root` (not itself a symlink).
    pub fn open(root: &Path) -> Result<Beneath, BeneathError> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| BeneathError::Io {
            op: "open",
            root: root.display().to_string(),
            path: "/".into(),
            source: e.into(),
        })?;
        Ok(Beneath {
            root: owned(fd),
            shown: root.to_path_buf(),
        })
    }

    pub fn root_path(&self) -> &Path {
        &self.shown
    }

    fn io(&self, op: &'static str, path: &str) -> impl FnOnce(Errno) -> BeneathError {
        let (root, path) = (self.shown.display().to_string(), format!("/{path}"));
        move |e| match e {
            // What RESOLVE_NO_SYMLINKS and RESOLVE_BENEATH answer.
            Errno::ELOOP | Errno::EXDEV => BeneathError::Refused {
                root,
                path,
                reason: format!("{op}: a component is a symlink or leads out of the root"),
            },
            Errno::ENOSYS => BeneathError::Io {
                op,
                root,
                path,
                source: io::Error::other("openat2 is missing: Linux 5.6 or later is needed"),
            },
            other => BeneathError::Io {
                op,
                root,
                path,
                source: other.into(),
            },
        }
    }

    /// `rel` (relative, checked by the caller's [`TreePath`]) opened with
    /// `flags` from the root, beneath it, through no symlink.
    fn resolve(&self, rel: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
        let text = if rel.is_empty() { "." } else { rel };
        let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(resolve_flags());
        let mut tries = 0;
        loop {
            match nix::fcntl::openat2(self.root.as_raw_fd(), text, how) {
                Ok(fd) => return Ok(owned(fd)),
                Err(Errno::EAGAIN) if tries < RESOLVE_TRIES => tries += 1,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The name `path` in its directory, the directory resolved beneath the
    /// root through no symlink (the root itself: "." in the root).
    pub fn at(&self, path: &TreePath) -> Result<At<'_>, BeneathError> {
        let (parent, name) = path.split_last().unwrap_or(("", "."));
        let parent_fd = self.resolve(parent, OFlag::O_PATH | OFlag::O_DIRECTORY).map_err(|e| {
            match self.io("open its directory", path.as_str())(e) {
                BeneathError::Refused { root, path, reason } => BeneathError::Refused {
                    root,
                    path,
                    reason: format!("{reason} (directory /{parent})"),
                },
                other => other,
            }
        })?;
        let name = CString::new(name).map_err(|_| BeneathError::Refused {
            root: self.shown.display().to_string(),
            path: path.to_string(),
            reason: "a NUL byte in the name".into(),
        })?;
        Ok(At {
            beneath: self,
            parent: parent_fd,
            name,
            path: path.as_str().to_string(),
        })
    }
}

impl At<'_> {
    fn fail(&self, op: &'static str) -> impl FnOnce(Errno) -> BeneathError {
        self.beneath.io(op, &self.path)
    }

    fn dir(&self) -> Option<std::os::fd::RawFd> {
        Some(self.parent.as_raw_fd())
    }

    /// The entry itself as an `O_PATH` descriptor, never a symlink's
    /// target.
    fn entry(&self) -> Result<(OwnedFd, FileStat), BeneathError> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(resolve_flags());
        let fd = loop {
            match nix::fcntl::openat2(self.parent.as_raw_fd(), self.name.as_c_str(), how) {
                Ok(fd) => break owned(fd),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(self.fail("open")(e)),
            }
        };
        let stat = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(self.fail("stat"))?;
        Ok((fd, stat))
    }

    /// What the kernel calls the `O_PATH` descriptor: calls that take no
    /// descriptor reach the pinned entry through it.
    fn proc_path(fd: &OwnedFd) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// A directory; one already there is kept (the root, or a directory
    /// made before).
    pub fn create_dir(&self, mode: u32) -> Result<(), BeneathError> {
        match nix::sys::stat::mkdirat(self.dir(), self.name.as_c_str(), Mode::from_bits_truncate(mode)) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => {
                let (_, stat) = self.entry()?;
                if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                    Ok(())
                } else {
                    Err(self.fail("create directory")(Errno::EEXIST))
                }
            }
            Err(e) => Err(self.fail("create directory")(e)),
        }
    }

    /// A new regular file (never one already there, nor a symlink's
    /// target), open for writing.
    pub fn create_file(&self, mode: u32) -> Result<File, BeneathError> {
        let fd = nix::fcntl::openat(
            self.dir(),
            self.name.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(self.fail("create"))?;
        Ok(File::from(owned(fd)))
    }

    pub fn symlink(&self, target: &str) -> Result<(), BeneathError> {
        nix::unistd::symlinkat(target, self.dir(), self.name.as_c_str()).map_err(self.fail("create symlink"))
    }

    /// A fifo, device or socket node (`kind` an `S_IF*` type).
    pub fn make_node(&self, kind: SFlag, mode: u32, rdev: u64) -> Result<(), BeneathError> {
        nix::sys::stat::mknodat(
            self.dir(),
            self.name.as_c_str(),
            kind,
            Mode::from_bits_truncate(mode),
            rdev as libc::dev_t,
        )
        .map_err(self.fail("create node"))
    }

    /// A hard link here to `first`, an entry beneath the same root (a
    /// symlink there is linked as itself, never followed).
    pub fn hard_link_to(&self, first: &At<'_>) -> Result<(), BeneathError> {
        nix::unistd::linkat(
            first.dir(),
            first.name.as_c_str(),
            self.dir(),
            self.name.as_c_str(),
            nix::fcntl::AtFlags::empty(),
        )
        .map_err(self.fail("link"))
    }

    /// Owner and group of the entry itself (a symlink's own).
    pub fn set_owner(&self, uid: u32, gid: u32) -> Result<(), BeneathError> {
        nix::unistd::fchownat(
            self.dir(),
            self.name.as_c_str(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(self.fail("chown"))
    }

    /// Permission bits (setuid, setgid and sticky too) of the entry, which
    /// may not be a symlink: chmod never follows one.
    pub fn set_mode(&self, mode: u32) -> Result<(), BeneathError> {
        let (fd, stat) = self.entry()?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
            return Err(BeneathError::Refused {
                root: self.beneath.shown.display().to_string(),
                path: format!("/{}", self.path),
                reason: "chmod of a symlink".into(),
            });
        }
        nix::sys::stat::fchmodat(
            None,
            &Self::proc_path(&fd),
            Mode::from_bits_truncate(mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(self.fail("chmod"))
    }

    /// An extended attribute of the entry itself (a symlink's own).
    pub fn set_xattr(&self, name: &str, value: &[u8]) -> Result<(), BeneathError> {
        let (fd, _) = self.entry()?;
        let path = CString::new(Self::proc_path(&fd).into_os_string().as_bytes())
            .map_err(|_| self.fail("set xattr")(Errno::EINVAL))?;
        let name = CString::new(name).map_err(|_| self.fail("set xattr")(Errno::EINVAL))?;
        // SAFETY: both strings are NUL-terminated and live across the
        // call; the value pointer and length describe `value`.
        let done = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        Errno::result(done).map(drop).map_err(self.fail("set xattr"))
    }

    /// Access and modification time of the entry itself.
    pub fn set_times(&self, mtime_ns: i64) -> Result<(), BeneathError> {
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        let t = TimeSpec::new(mtime_ns.div_euclid(1_000_000_000), mtime_ns.rem_euclid(1_000_000_000));
        utimensat(
            self.dir(),
            self.name.as_c_str(),
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(self.fail("set times"))
    }

    /// The entry if it is a regular file, opened again from its `O_PATH`
    /// descriptor (so a fifo or device is never opened); None when there
    /// is nothing or something else at the name.
    fn reopen_regular(&self, write: bool) -> Result<Option<File>, BeneathError> {
        let (fd, stat) = match self.entry() {
            Ok(found) => found,
            Err(BeneathError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Ok(None);
        }
        let file = std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .truncate(write)
            .open(Self::proc_path(&fd))
            .map_err(|source| self.io_error("open", source))?;
        Ok(Some(file))
    }

    fn io_error(&self, op: &'static str, source: io::Error) -> BeneathError {
        BeneathError::Io {
            op,
            root: self.beneath.shown.display().to_string(),
            path: format!("/{}", self.path),
            source,
        }
    }

    /// The content of the regular file at the name; None when the name is
    /// missing or not a regular file.
    pub fn read_regular(&self) -> Result<Option<Vec<u8>>, BeneathError> {
        let Some(mut file) = self.reopen_regular(false)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|source| self.io_error("read", source))?;
        Ok(Some(bytes))
    }

    /// Replaces the content of the regular file at the name, keeping its
    /// inode (owner, mode, links); refused if it is no regular file.
    pub fn rewrite_regular(&self, bytes: &[u8]) -> Result<(), BeneathError> {
        let Some(mut file) = self.reopen_regular(true)? else {
            return Err(BeneathError::Refused {
                root: self.beneath.shown.display().to_string(),
                path: format!("/{}", self.path),
                reason: "not a regular file".into(),
            });
        };
        file.write_all(bytes).map_err(|source| self.io_error("write", source))
    }
}

/// `name` of a flat directory as a [`TreePath`] of one component.
pub fn flat_name(name: &OsStr) -> Option<TreePath> {
    let text = name.to_str()?;
    TreePath::new(text).ok().filter(|p| !p.is_root() && !text.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn path(text: &str) -> TreePath {
        TreePath::new(text).unwrap()
    }

    fn refused(result: Result<impl std::fmt::Debug, BeneathError>) -> String {
        match result {
            Err(e @ BeneathError::Refused { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A root, and a directory beside it that nothing may reach.
    fn world() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        (tmp, root, outside)
    }

    #[test]
    fn entries_of_every_kind_are_made_beneath_the_root() {
        let (_tmp, root, _) = world();
        let b = Beneath::open(&root).unwrap();
        b.at(&TreePath::root()).unwrap().create_dir(0o755).unwrap();
        b.at(&path("d")).unwrap().create_dir(0o700).unwrap();
        b.at(&path("d")).unwrap().create_dir(0o700).unwrap();
        let mut f = b.at(&path("d/f")).unwrap().create_file(0o600).unwrap();
        f.write_all(b"data").unwrap();
        b.at(&path("d/l")).unwrap().symlink("/etc/passwd").unwrap();
        b.at(&path("d/p")).unwrap().make_node(SFlag::S_IFIFO, 0o600, 0).unwrap();
        let first = b.at(&path("d/f")).unwrap();
        b.at(&path("g")).unwrap().hard_link_to(&first).unwrap();
        let at = b.at(&path("d/f")).unwrap();
        at.set_mode(0o640).unwrap();
        at.set_times(1_500_000_000_000_000_007).unwrap();
        at.set_xattr("user.k", b"v").unwrap();
        b.at(&path("d/p")).unwrap().set_mode(0o604).unwrap();
        b.at(&TreePath::root()).unwrap().set_mode(0o711).unwrap();
        let m = fs::metadata(root.join("d/f")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.nlink(), m.mtime_nsec()), (0o640, 2, 7));
        assert_eq!(xattr::get(root.join("d/f"), "user.k").unwrap().unwrap(), b"v");
        assert!(fs::metadata(root.join("d/p")).unwrap().file_type().is_fifo());
        assert_eq!(fs::metadata(root.join("d/p")).unwrap().mode() & 0o777, 0o604);
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o711);
        assert_eq!(fs::read_link(root.join("d/l")).unwrap(), Path::new("/etc/passwd"));
        // Changing a symlink changes the link, never /etc/passwd.
        let link = b.at(&path("d/l")).unwrap();
        refused(link.set_mode(0o777));
        link.set_times(1).unwrap();
        assert_eq!(fs::symlink_metadata(root.join("d/l")).unwrap().mtime(), 0);
        assert_ne!(fs::metadata("/etc/passwd").unwrap().mtime(), 0);
        // A name already there is never opened as a new file.
        assert!(b.at(&path("d/l")).unwrap().create_file(0o600).is_err());
        assert!(b.at(&path("d/f")).unwrap().create_file(0o600).is_err());
        assert!(b.at(&path("d/f")).unwrap().create_dir(0o700).is_err());
        assert_eq!(b.at(&path("d/f")).unwrap().read_regular().unwrap().unwrap(), b"data");
        assert_eq!(
            b.at(&path("d/p")).unwrap().read_regular().unwrap(),
            None,
            "a fifo is not read"
        );
        assert_eq!(b.at(&path("d/none")).unwrap().read_regular().unwrap(), None);
        b.at(&path("d/f")).unwrap().rewrite_regular(b"new").unwrap();
        assert_eq!(fs::read(root.join("g")).unwrap(), b"new", "the inode is kept");
        assert!(b.at(&path("d/p")).unwrap().rewrite_regular(b"x").is_err());
    }

    #[test]
    fn nothing_is_written_through_a_symlink() {
        let (_tmp, root, outside) = world();
        let b = Beneath::open(&root).unwrap();
        // x -> outside (absolute), then x/f, x/d, x/n, x/s.
        std::os::unix::fs::symlink(&outside, root.join("x")).unwrap();
        // up -> .. (relative, out of the root); slash -> /.
        std::os::unix::fs::symlink("..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/", root.join("slash")).unwrap();
        std::os::unix::fs::symlink(".", root.join("self")).unwrap();
        for parent in ["x", "up/outside", "slash/tmp", "self"] {
            let msg = refused(b.at(&path(&format!("{parent}/f"))));
            assert!(msg.contains(&format!("/{parent}/f")), "{msg}");
        }
        // Even a symlink that stays inside is not followed.
        fs::create_dir(root.join("in")).unwrap();
        std::os::unix::fs::symlink("in", root.join("alias")).unwrap();
        refused(b.at(&path("alias/f")));
        // A hard link's source is an `At` too: resolved beneath the root.
        fs::write(outside.join("passwd"), b"secret").unwrap();
        refused(b.at(&path("x/passwd")));
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1, "only the test's own file");
        assert_eq!(fs::read_dir(root.join("in")).unwrap().count(), 0);
    }

    #[test]
    fn a_parent_swapped_for_a_symlink_between_steps_is_refused() {
        let (_tmp, root, outside) = world();
        let b = Beneath::open(&root).unwrap();
        b.at(&path("d")).unwrap().create_dir(0o755).unwrap();
        // Resolved now, used after the swap: the held directory is the
        // one that was resolved, wherever its name now points.
        let held = b.at(&path("d/early")).unwrap();
        fs::rename(root.join("d"), root.join("d.moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        held.create_file(0o600).unwrap();
        assert!(root.join("d.moved/early").exists());
        // Resolved after the swap: refused.
        refused(b.at(&path("d/late")));
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing outside");
        // The root itself swapped: the descriptor still names the
        // directory that was opened.
        fs::rename(&root, root.with_extension("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, &root).unwrap();
        b.at(&path("after")).unwrap().create_dir(0o755).unwrap();
        assert!(root.with_extension("moved").join("after").is_dir());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing outside");
    }

    #[test]
    fn a_root_that_is_a_symlink_is_refused() {
        let (tmp, _, outside) = world();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(Beneath::open(&link).is_err());
    }

    #[test]
    fn flat_names_are_single_components() {
        assert_eq!(flat_name(OsStr::new("pages-1.img")).unwrap().as_str(), "pages-1.img");
        for bad in ["", ".", "..", "a/b", "/etc"] {
            assert!(flat_name(OsStr::new(bad)).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_of_nodes_goes_on_the_node() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test makes device nodes and changes owners: run it as root");
        }
        let (_tmp, root, _) = world();
        let b = Beneath::open(&root).unwrap();
        let at = b.at(&path("null")).unwrap();
        at.make_node(SFlag::S_IFCHR, 0o600, nix::sys::stat::makedev(1, 3))
            .unwrap();
        at.set_owner(1000, 100).unwrap();
        at.set_mode(0o620).unwrap();
        at.set_xattr("trusted.k", b"v").unwrap();
        let m = fs::symlink_metadata(root.join("null")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (1000, 100, 0o620));
        assert_eq!(xattr::get(root.join("null"), "trusted.k").unwrap().unwrap(), b"v");
        let l = b.at(&path("l")).unwrap();
        l.symlink("/etc/shadow").unwrap();
        l.set_owner(1000, 100).unwrap();
        l.set_xattr("trusted.k", b"w").unwrap();
        let m = fs::symlink_metadata(root.join("l")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 100));
        assert_eq!(fs::metadata("/etc/shadow").unwrap().uid(), 0, "the target is untouched");
        assert!(xattr::get("/etc/shadow", "trusted.k").unwrap().is_none());
    }
}
