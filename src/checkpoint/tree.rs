//! The filesystem side of a checkpoint as data: a [`Tree`] (every entry of
//! a container's writable layer, by path) and a [`Delta`] (what changed
//! from the parent's tree). Owns reading a captured upper directory into a
//! tree, and the algebra of deltas: applying, composing (what merge and
//! prune use to fold a checkpoint into its child) and comparing. It never
//! reads or writes file contents beyond hashing them: blobs are the
//! catalogue's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{io_err, IoError};
use crate::oci::digest::{hex, unhex};
use crate::oci::overlay;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("file name {path:?} is not UTF-8; checkpoints store UTF-8 paths only")]
    NonUtf8 { path: String },
    /// A path that is not plain and relative: it could name something
    /// outside the tree's root.
    #[error("tree path {path:?} refused: {reason}")]
    BadPath { path: String, reason: String },
    /// An entry beneath a symlink, file or other non-directory: writing it
    /// would follow that entry, possibly out of the root.
    #[error("tree entry /{path} refused: its ancestor /{ancestor} is {what}, not a directory")]
    Ancestor {
        path: String,
        ancestor: String,
        what: &'static str,
    },
    #[error("tree entry /{path} refused: hard link to {target:?}: {reason}")]
    Link {
        path: String,
        target: String,
        reason: String,
    },
    #[error("tree entry /{path} refused: {reason}")]
    Entry { path: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
    /// An overlay whiteout: the path is deleted from the image below.
    Whiteout,
}

/// One entry of a writable layer. `ctime_ns` only detects change (a file
/// whose ctime, size and mtime are those of the parent's entry is not read
/// again); it is never restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: EntryKind,
    /// Permission bits, setuid, setgid and sticky included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// sha256 (hex) of a regular file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Another path of the same inode, listed before this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardlink: Option<String>,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// A directory that hides the image's directory below it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opaque: bool,
    /// Extended attributes, values in hex.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Entry {
    /// Whether `self` describes the same content and metadata as `other`,
    /// as far as restoring is concerned.
    pub fn same_as(&self, other: &Entry) -> bool {
        self == other
    }

    /// Whether the file's data may be taken from `parent` without reading
    /// it: same inode metadata, ctime included.
    fn unchanged_since(&self, parent: &Entry) -> bool {
        self.kind == EntryKind::File
            && parent.kind == EntryKind::File
            && self.size == parent.size
            && self.mtime_ns == parent.mtime_ns
            && self.ctime_ns == parent.ctime_ns
            && parent.digest.is_some()
    }
}

/// Every entry of a writable layer by relative path ("etc/hosts"); the
/// layer's root itself is "".
pub type Tree = BTreeMap<String, Entry>;

/// Longest name of one path component or extended attribute (Linux's
/// NAME_MAX and XATTR_NAME_MAX).
const NAME_MAX: usize = 255;
/// Largest extended attribute value Linux stores (XATTR_SIZE_MAX).
const XATTR_VALUE_MAX: usize = 64 * 1024;

/// A path of a tree that stays beneath the tree's root: relative, its
/// components neither empty nor `.` or `..`, without NUL; "" is the root
/// itself. Only [`TreePath::new`] makes one, so what writes beneath a root
/// takes a `&TreePath` and is never handed `..` or `/etc`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TreePath(String);

impl TreePath {
    pub fn new(path: &str) -> Result<TreePath, TreeError> {
        let bad = |reason: String| TreeError::BadPath {
            path: path.to_string(),
            reason,
        };
        if path.is_empty() {
            return Ok(TreePath(String::new()));
        }
        if path.starts_with('/') {
            return Err(bad("it is absolute".into()));
        }
        if path.contains('\0') {
            return Err(bad("it holds a NUL byte".into()));
        }
        for part in path.split('/') {
            match part {
                "" => return Err(bad("it has an empty component".into())),
                "." | ".." => return Err(bad(format!("it has a {part:?} component"))),
                long if long.len() > NAME_MAX => {
                    return Err(bad(format!("a component is longer than {NAME_MAX} bytes")))
                }
                _ => {}
            }
        }
        Ok(TreePath(path.to_string()))
    }

    /// The tree's root.
    pub fn root() -> TreePath {
        TreePath(String::new())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent's path and the last component; None for the root.
    pub fn split_last(&self) -> Option<(&str, &str)> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.0.rsplit_once('/').unwrap_or(("", &self.0)))
    }

    /// Every proper ancestor, the root first.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        let ends = self.0.match_indices('/').map(|(i, _)| i);
        let root = (!self.0.is_empty()).then_some("");
        root.into_iter().chain(ends.map(|i| &self.0[..i]))
    }
}

impl std::fmt::Display for TreePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}", self.0)
    }
}

/// The order [`read_tree`] visits paths in (component by component, so a
/// directory's entries come right after it): a hard link names the first
/// path of its inode in this order, and a tree is written in it.
pub fn walk_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

/// The tree's paths in [`walk_order`].
pub fn in_walk_order(tree: &Tree) -> Vec<(&String, &Entry)> {
    let mut entries: Vec<(&String, &Entry)> = tree.iter().collect();
    entries.sort_by(|a, b| walk_order(a.0, b.0));
    entries
}

/// Whether `text` is a sha256 as trees keep it: 64 lowercase hex digits.
pub fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl EntryKind {
    /// The kind as a message names it.
    pub fn described(self) -> &'static str {
        match self {
            EntryKind::Dir => "a directory",
            EntryKind::File => "a regular file",
            EntryKind::Symlink => "a symlink",
            EntryKind::Fifo => "a fifo",
            EntryKind::Char => "a character device",
            EntryKind::Block => "a block device",
            EntryKind::Socket => "a socket",
            EntryKind::Whiteout => "an overlay whiteout",
        }
    }
}

/// Checks that `tree` can be written beneath a root without leaving it,
/// whatever its data came from (an archive, shared storage, another
/// node): every path a [`TreePath`]; the root, if any entry exists, a
/// directory; every entry's ancestors directories of the tree, so nothing
/// is written through a symlink or beneath a file; every hard link to a
/// regular file of the tree that is no link itself and comes before it in
/// [`walk_order`] (as [`read_tree`] names them); every field of the shape
/// its kind has. Says which path is refused and why.
pub fn validate_tree(tree: &Tree) -> Result<(), TreeError> {
    if !tree.is_empty() && !tree.contains_key("") {
        return Err(TreeError::Entry {
            path: String::new(),
            reason: "the tree has entries but no root directory".into(),
        });
    }
    for (path, entry) in tree {
        let at = TreePath::new(path)?;
        for ancestor in at.ancestors() {
            match tree.get(ancestor) {
                Some(above) if above.kind == EntryKind::Dir => {}
                found => {
                    return Err(TreeError::Ancestor {
                        path: path.clone(),
                        ancestor: ancestor.to_string(),
                        what: found.map_or("missing from the tree", |e| e.kind.described()),
                    })
                }
            }
        }
        validate_entry(path, entry)?;
        if let Some(target) = &entry.hardlink {
            validate_link(tree, path, target)?;
        }
    }
    Ok(())
}

fn validate_entry(path: &str, entry: &Entry) -> Result<(), TreeError> {
    let refuse = |reason: String| TreeError::Entry {
        path: path.to_string(),
        reason,
    };
    let kind = entry.kind;
    if path.is_empty() && kind != EntryKind::Dir {
        return Err(refuse(format!("the root is {}, not a directory", kind.described())));
    }
    if entry.mode & !0o7777 != 0 {
        return Err(refuse(format!("mode {:o} has bits beyond the permissions", entry.mode)));
    }
    match (&entry.digest, kind) {
        (Some(digest), EntryKind::File) if !is_digest(digest) => {
            return Err(refuse(format!("digest {digest:?} is not 64 lowercase hex digits")))
        }
        (Some(_), EntryKind::File) => {}
        (Some(_), other) => return Err(refuse(format!("{} with a content digest", other.described()))),
        (None, EntryKind::File) if entry.size != 0 && entry.hardlink.is_none() => {
            return Err(refuse("a non-empty file without content digest".into()))
        }
        (None, _) => {}
    }
    if kind != EntryKind::File && entry.size != 0 {
        return Err(refuse(format!("{} with a size", kind.described())));
    }
    if kind != EntryKind::File && entry.hardlink.is_some() {
        return Err(refuse(format!("{} cannot be a hard link", kind.described())));
    }
    match (&entry.target, kind) {
        (None, EntryKind::Symlink) => return Err(refuse("a symlink without target".into())),
        (Some(target), EntryKind::Symlink) if target.is_empty() || target.contains('\0') => {
            return Err(refuse("a symlink target empty or holding a NUL byte".into()))
        }
        (Some(_), EntryKind::Symlink) | (None, _) => {}
        (Some(_), other) => return Err(refuse(format!("{} with a symlink target", other.described()))),
    }
    if entry.rdev != 0 && !matches!(kind, EntryKind::Char | EntryKind::Block) {
        return Err(refuse(format!("{} with a device number", kind.described())));
    }
    if entry.opaque && kind != EntryKind::Dir {
        return Err(refuse(format!("{} marked opaque", kind.described())));
    }
    for (name, value) in &entry.xattrs {
        if name.is_empty() || name.len() > NAME_MAX || name.contains('\0') {
            return Err(refuse(format!(
                "extended attribute name {name:?} is empty, too long or holds NUL"
            )));
        }
        // overlayfs reads these from the upper directory (redirects,
        // origins, metacopy): a tree sets opacity through `opaque` only.
        if overlay::is_overlay_xattr(name) {
            return Err(refuse(format!("extended attribute {name} is overlayfs's own")));
        }
        match unhex(value) {
            Some(bytes) if bytes.len() <= XATTR_VALUE_MAX => {}
            Some(_) => return Err(refuse(format!("extended attribute {name} is larger than 64 KiB"))),
            None => return Err(refuse(format!("extended attribute {name}: value is not hex"))),
        }
    }
    Ok(())
}

fn validate_link(tree: &Tree, path: &str, target: &str) -> Result<(), TreeError> {
    let refuse = |reason: &str| TreeError::Link {
        path: path.to_string(),
        target: target.to_string(),
        reason: reason.to_string(),
    };
    if TreePath::new(target).is_err() || target.is_empty() {
        return Err(refuse("the target is not a plain relative path of the tree"));
    }
    if walk_order(target, path) != std::cmp::Ordering::Less {
        return Err(refuse("the target does not come before the link in the tree"));
    }
    match tree.get(target) {
        None => Err(refuse("the target is not in the tree")),
        Some(first) if first.kind != EntryKind::File => Err(TreeError::Link {
            path: path.to_string(),
            target: target.to_string(),
            reason: format!("the target is {}, not a regular file", first.kind.described()),
        }),
        Some(first) if first.hardlink.is_some() => Err(refuse("the target is a hard link itself")),
        Some(_) => Ok(()),
    }
}

impl Delta {
    /// Checks the paths a delta names (see [`validate_tree`] for the
    /// entries, checked once applied).
    pub fn validate_paths(&self) -> Result<(), TreeError> {
        for path in self.changed.keys().chain(&self.removed) {
            TreePath::new(path)?;
        }
        Ok(())
    }
}

/// What a checkpoint stores of its filesystem: the entries that differ
/// from its parent's tree (all of them for a checkpoint without parent),
/// and the paths of the parent's tree that are gone (with what is under
/// them). Applying removes first, then sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub changed: Tree,
    pub removed: BTreeSet<String>,
    /// Where the content of each digest of `changed` is stored (an object
    /// key of the catalogue's): checkpoints folded together may have
    /// stored their files differently.
    #[serde(default)]
    pub stored: BTreeMap<String, String>,
}

pub fn is_under(path: &str, dir: &str) -> bool {
    path == dir || dir.is_empty() || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

fn remove_subtree(tree: &mut Tree, dir: &str) {
    let doomed: Vec<String> = tree
        .range(dir.to_string()..)
        .take_while(|(p, _)| p.starts_with(dir))
        .filter(|(p, _)| is_under(p, dir))
        .map(|(p, _)| p.clone())
        .collect();
    for path in doomed {
        tree.remove(&path);
    }
}

impl Delta {
    /// The delta that turns `parent` into `current`.
    pub fn between(parent: &Tree, current: &Tree) -> Delta {
        let mut removed = BTreeSet::new();
        for path in parent.keys() {
            if current.contains_key(path) {
                continue;
            }
            // A removed directory covers what was under it.
            if removed.iter().any(|r: &String| is_under(path, r)) {
                continue;
            }
            removed.insert(path.clone());
        }
        let changed = current
            .iter()
            .filter(|(path, entry)| parent.get(*path).is_none_or(|p| !p.same_as(entry)))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        Delta {
            changed,
            removed,
            stored: BTreeMap::new(),
        }
    }

    pub fn apply(&self, tree: &mut Tree) {
        for path in &self.removed {
            remove_subtree(tree, path);
        }
        for (path, entry) in &self.changed {
            tree.insert(path.clone(), entry.clone());
        }
    }

    /// One delta doing what `self` then `next` do: folding a checkpoint
    /// into its child keeps the child's tree exactly.
    pub fn then(&self, next: &Delta) -> Delta {
        let mut changed = self.changed.clone();
        for path in &next.removed {
            remove_subtree(&mut changed, path);
        }
        for (path, entry) in &next.changed {
            changed.insert(path.clone(), entry.clone());
        }
        let removed = self.removed.union(&next.removed).cloned().collect();
        let mut stored = self.stored.clone();
        stored.extend(next.stored.iter().map(|(d, k)| (d.clone(), k.clone())));
        let mut composed = Delta {
            changed,
            removed,
            stored,
        };
        let used = composed.digests();
        composed.stored.retain(|digest, _| used.contains(digest));
        composed
    }

    /// The content digests the delta's files reference.
    pub fn digests(&self) -> BTreeSet<String> {
        self.changed.values().filter_map(|e| e.digest.clone()).collect()
    }

    /// Bytes of file content the delta's entries hold (hard links once).
    pub fn content_bytes(&self) -> u64 {
        self.changed
            .values()
            .filter(|e| e.kind == EntryKind::File && e.hardlink.is_none())
            .map(|e| e.size)
            .sum()
    }
}

/// How two trees differ, path by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeDiff {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Content bytes of `to` minus those of `from`.
    pub size_delta: i64,
}

pub fn diff(from: &Tree, to: &Tree) -> TreeDiff {
    let bytes = |t: &Tree| -> i64 {
        t.values()
            .filter(|e| e.kind == EntryKind::File && e.hardlink.is_none())
            .map(|e| e.size as i64)
            .sum()
    };
    let mut out = TreeDiff {
        size_delta: bytes(to) - bytes(from),
        ..TreeDiff::default()
    };
    for (path, entry) in to {
        match from.get(path) {
            None => out.added.push(path.clone()),
            Some(old) if !content_equal(old, entry) => out.changed.push(path.clone()),
            Some(_) => {}
        }
    }
    out.removed = from.keys().filter(|p| !to.contains_key(*p)).cloned().collect();
    out
}

/// Equal as a user sees them: ctime is not part of a file.
fn content_equal(a: &Entry, b: &Entry) -> bool {
    Entry {
        ctime_ns: 0,
        ..a.clone()
    } == Entry {
        ctime_ns: 0,
        ..b.clone()
    }
}

/// Reads the writable layer at `root` into a tree. Regular files are
/// hashed unless `parent` has them unchanged (same size, mtime and ctime);
/// `on_file` sees each file hashed (its path and digest), so the caller can
/// store its content.
/// Sees each file hashed: its path, digest and entry.
pub type OnFile<'a> = &'a mut dyn FnMut(&Path, &str, &Entry) -> Result<(), TreeError>;

pub fn read_tree(root: &Path, parent: Option<&Tree>, on_file: OnFile<'_>) -> Result<Tree, TreeError> {
    walk_tree(root, parent, Some(on_file))
}

/// [`read_tree`] without reading any file: regular files the parent does
/// not have unchanged are left without digest (and so are their hard
/// links), for the caller to hash, in parallel if it likes, and
/// [`fill_hardlink_digests`] after.
pub fn read_tree_unhashed(root: &Path, parent: Option<&Tree>) -> Result<Tree, TreeError> {
    walk_tree(root, parent, None)
}

/// Hard links take the digest of the path they link to.
pub fn fill_hardlink_digests(tree: &mut Tree) {
    let links: Vec<(String, String)> = tree
        .iter()
        .filter_map(|(path, e)| e.hardlink.clone().map(|first| (path.clone(), first)))
        .collect();
    for (path, first) in links {
        let digest = tree.get(&first).and_then(|e| e.digest.clone());
        if let Some(entry) = tree.get_mut(&path) {
            entry.digest = digest;
        }
    }
}

fn walk_tree(root: &Path, parent: Option<&Tree>, mut on_file: Option<OnFile<'_>>) -> Result<Tree, TreeError> {
    let mut tree = Tree::new();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    let mut pending = vec![(root.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        let ft = meta.file_type();
        let xattrs_all = read_xattrs(&path)?;
        // overlayfs's own xattrs describe the upper directory's relation to
        // its lowers, not the container's files: only opacity is kept.
        let opaque = ft.is_dir()
            && xattrs_all
                .iter()
                .any(|(name, value)| overlay::overlay_key(name) == Some("opaque") && value == "79");
        let xattrs: BTreeMap<String, String> = xattrs_all
            .into_iter()
            .filter(|(k, _)| !overlay::is_overlay_xattr(k))
            .collect();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            EntryKind::File
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else if ft.is_char_device() && meta.rdev() == 0 {
            EntryKind::Whiteout
        } else if ft.is_char_device() {
            EntryKind::Char
        } else if ft.is_block_device() {
            EntryKind::Block
        } else {
            EntryKind::Socket
        };
        let mut entry = Entry {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            size: 0,
            digest: None,
            hardlink: None,
            target: None,
            rdev: if matches!(kind, EntryKind::Char | EntryKind::Block) {
                meta.rdev()
            } else {
                0
            },
            opaque,
            xattrs,
        };
        match kind {
            EntryKind::Dir => {
                let mut children = Vec::new();
                for child in fs::read_dir(&path).map_err(io_err("read directory", &path))? {
                    let child = child.map_err(io_err("read directory", &path))?;
                    let name = child.file_name();
                    let name = name.to_str().ok_or_else(|| TreeError::NonUtf8 {
                        path: child.path().display().to_string(),
                    })?;
                    let child_rel = if rel.is_empty() {
                        name.to_string()
                    } else {
                        format!("{rel}/{name}")
                    };
                    children.push((child.path(), child_rel));
                }
                // Popped in name order, so hard links name their first path.
                children.sort_by(|a, b| b.1.cmp(&a.1));
                pending.extend(children);
            }
            EntryKind::Symlink => {
                let target = fs::read_link(&path).map_err(io_err("read link", &path))?;
                entry.target = Some(target.to_str().map(str::to_string).ok_or_else(|| TreeError::NonUtf8 {
                    path: path.display().to_string(),
                })?);
            }
            EntryKind::File => {
                entry.size = meta.len();
                let inode = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = inodes.get(&inode) {
                        entry.hardlink = Some(first.clone());
                        entry.digest = tree.get(first).and_then(|e: &Entry| e.digest.clone());
                        tree.insert(rel, entry);
                        continue;
                    }
                    inodes.insert(inode, rel.clone());
                }
                let known = parent
                    .and_then(|p| p.get(&rel))
                    .filter(|p| entry.unchanged_since(p))
                    .and_then(|p| p.digest.clone());
                entry.digest = match (known, on_file.as_mut()) {
                    (Some(digest), _) => Some(digest),
                    (None, Some(on_file)) => {
                        let digest = hash_file(&path)?;
                        on_file(&path, &digest, &entry)?;
                        Some(digest)
                    }
                    (None, None) => None,
                };
            }
            _ => {}
        }
        tree.insert(rel, entry);
    }
    Ok(tree)
}

/// Hashes (sha256) and counts what passes through, either way.
pub(crate) struct Hashing<T> {
    pub(crate) inner: T,
    pub(crate) hasher: Sha256,
    pub(crate) bytes: u64,
}

impl<T> Hashing<T> {
    pub(crate) fn new(inner: T) -> Hashing<T> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The stream, and the hex digest and count of what passed.
    pub(crate) fn into_parts(self) -> (T, String, u64) {
        (self.inner, hex(&self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

pub fn hash_file(path: &Path) -> Result<String, TreeError> {
    let mut file = fs::File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The xattrs of `path` whose names are text, values in hex.
fn read_xattrs(path: &Path) -> Result<BTreeMap<String, String>, TreeError> {
    let xattrs = overlay::read_xattrs(path)?;
    Ok(xattrs
        .into_iter()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, hex(&value))))
        .collect())
}

#[cfg(test)]
impl Entry {
    /// For tests: `kind` and `mode`, owned by root, with no times, size,
    /// content, link or attributes; tests fill in what they check.
    pub(crate) fn bare(kind: EntryKind, mode: u32) -> Entry {
        Entry {
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(digest: &str, size: u64) -> Entry {
        Entry {
            mtime_ns: 1,
            ctime_ns: 1,
            size,
            digest: Some(digest.into()),
            ..Entry::bare(EntryKind::File, 0o644)
        }
    }

    fn dir() -> Entry {
        Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            digest: None,
            size: 0,
            ..file("", 0)
        }
    }

    fn tree(entries: &[(&str, Entry)]) -> Tree {
        entries.iter().map(|(p, e)| (p.to_string(), e.clone())).collect()
    }

    #[test]
    fn deltas_apply_and_compose_to_the_same_tree() {
        let t0 = tree(&[
            ("", dir()),
            ("a", dir()),
            ("a/x", file("1", 1)),
            ("a/y", file("2", 2)),
            ("b", file("3", 3)),
        ]);
        let t1 = tree(&[("", dir()), ("b", file("4", 4)), ("c", dir()), ("c/z", file("5", 5))]);
        let t2 = tree(&[
            ("", dir()),
            ("a", dir()),
            ("a/x", file("6", 6)),
            ("b", file("4", 4)),
            ("c", dir()),
        ]);
        let d1 = Delta::between(&t0, &t1);
        assert_eq!(d1.removed, BTreeSet::from(["a".to_string()]), "a covers a/x and a/y");
        assert_eq!(d1.changed.keys().collect::<Vec<_>>(), vec!["b", "c", "c/z"]);
        let d2 = Delta::between(&t1, &t2);
        let mut applied = t0.clone();
        d1.apply(&mut applied);
        assert_eq!(applied, t1);
        d2.apply(&mut applied);
        assert_eq!(applied, t2);

        let folded = d1.then(&d2);
        let mut once = t0.clone();
        folded.apply(&mut once);
        assert_eq!(once, t2, "composition keeps the child's tree");
        // From nothing, a full delta is the tree.
        let full = Delta::between(&Tree::new(), &t0);
        let mut from_empty = Tree::new();
        full.then(&d1).then(&d2).apply(&mut from_empty);
        assert_eq!(from_empty, t2);
        assert_eq!(full.digests().len(), 3);
        assert_eq!(full.content_bytes(), 6);

        let d = diff(&t0, &t2);
        assert_eq!(d.added, vec!["c"]);
        assert_eq!(d.changed, vec!["a/x", "b"]);
        assert_eq!(d.removed, vec!["a/y"]);
        assert_eq!(d.size_delta, (6 + 4) - (1 + 2 + 3));
    }

    #[test]
    fn is_under_matches_whole_components() {
        assert!(is_under("a/b", "a"));
        assert!(is_under("a", "a"));
        assert!(!is_under("ab", "a"));
        assert!(is_under("anything", ""));
        let mut t = tree(&[("a", dir()), ("a/b", dir()), ("ab", dir()), ("a-c", dir())]);
        remove_subtree(&mut t, "a");
        assert_eq!(t.keys().collect::<Vec<_>>(), vec!["a-c", "ab"]);
    }

    #[test]
    fn trees_are_read_with_links_whiteouts_and_unchanged_files_not_rehashed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("upper");
        fs::create_dir_all(root.join("d/e")).unwrap();
        fs::write(root.join("d/f"), b"content").unwrap();
        fs::hard_link(root.join("d/f"), root.join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", root.join("link")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut hashed = Vec::new();
        let t = read_tree(&root, None, &mut |_, digest, _| {
            hashed.push(digest.to_string());
            Ok(())
        })
        .unwrap();
        let sha = hex(&Sha256::digest(b"content"));
        assert_eq!(hashed, vec![sha.clone()], "one inode hashed once");
        assert_eq!(t["d/f"].digest.as_deref(), Some(sha.as_str()));
        assert_eq!(t["g"].hardlink.as_deref(), Some("d/f"));
        assert_eq!(t["link"].target.as_deref(), Some("d/f"));
        assert_eq!(t["fifo"].kind, EntryKind::Fifo);
        assert_eq!(t["d/e"].kind, EntryKind::Dir);
        assert!(t.contains_key(""));

        let mut again = 0;
        let t2 = read_tree(&root, Some(&t), &mut |_, _, _| {
            again += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(again, 0, "unchanged files are not read again");
        assert_eq!(t2, t);
        fs::write(root.join("d/f"), b"changed").unwrap();
        let t3 = read_tree(&root, Some(&t), &mut |_, _, _| Ok(())).unwrap();
        assert_ne!(t3["d/f"].digest, t["d/f"].digest);
        let delta = Delta::between(&t, &t3);
        assert!(delta.changed.contains_key("d/f") && delta.removed.is_empty());
    }

    const D: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn symlink(target: &str) -> Entry {
        Entry {
            kind: EntryKind::Symlink,
            target: Some(target.into()),
            ..dir()
        }
    }

    fn link(to: &str) -> Entry {
        Entry {
            hardlink: Some(to.into()),
            ..file(D, 1)
        }
    }

    #[test]
    fn tree_paths_are_plain_and_relative() {
        for ok in ["", "a", "a/b", "a/.b", "..a", "a..b/c", "a b"] {
            assert_eq!(TreePath::new(ok).unwrap().as_str(), ok);
        }
        let long = "x".repeat(256);
        for bad in [
            "/a",
            "/",
            "a/",
            "a//b",
            ".",
            "..",
            "a/../b",
            "./a",
            "a/.",
            "a\0b",
            long.as_str(),
        ] {
            match TreePath::new(bad) {
                Err(TreeError::BadPath { path, .. }) => assert_eq!(path, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let p = TreePath::new("a/b/c").unwrap();
        assert_eq!(p.ancestors().collect::<Vec<_>>(), vec!["", "a", "a/b"]);
        assert_eq!(p.split_last(), Some(("a/b", "c")));
        assert_eq!(TreePath::new("a").unwrap().split_last(), Some(("", "a")));
        assert_eq!(TreePath::root().split_last(), None);
        assert_eq!(TreePath::root().ancestors().count(), 0);
        assert_eq!(p.to_string(), "/a/b/c");
        assert!(is_digest(D));
        for bad in [
            "",
            "d1",
            &D.to_uppercase(),
            &D[1..],
            &format!("{D}0"),
            &D.replace('2', "g"),
        ] {
            assert!(!is_digest(bad), "{bad}");
        }
    }

    #[test]
    fn walk_order_is_the_order_trees_are_read_in() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("upper");
        fs::create_dir_all(root.join("a/deep")).unwrap();
        fs::write(root.join("a/deep/x"), b"x").unwrap();
        // "a-b" sorts before "a/deep/x" as a string, after it in a walk.
        fs::hard_link(root.join("a/deep/x"), root.join("a-b")).unwrap();
        let t = read_tree(&root, None, &mut |_, _, _| Ok(())).unwrap();
        assert_eq!(t["a-b"].hardlink.as_deref(), Some("a/deep/x"));
        validate_tree(&t).unwrap();
        let order: Vec<&str> = in_walk_order(&t).into_iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(order, vec!["", "a", "a/deep", "a/deep/x", "a-b"]);
    }

    #[test]
    fn hostile_trees_are_refused_naming_the_paths() {
        let good = tree(&[
            ("", dir()),
            ("a", dir()),
            ("a/x", file(D, 1)),
            ("a-b", link("a/x")),
            ("s", symlink("/etc")),
            ("empty", file(D, 0)),
        ]);
        validate_tree(&good).unwrap();
        validate_tree(&Tree::new()).unwrap();
        let with = |entries: &[(&str, Entry)]| {
            let mut t = tree(&[("", dir())]);
            t.extend(tree(entries));
            t
        };
        let mut overlay = dir();
        overlay.xattrs.insert("trusted.overlay.redirect".into(), hex(b"/etc"));
        let mut odd_mode = file(D, 1);
        odd_mode.mode = 0o100644;
        let mut not_hex = file(D, 1);
        not_hex.xattrs.insert("user.k".into(), "zz".into());
        let no_target = Entry {
            target: None,
            ..symlink("x")
        };
        let cases: Vec<(Tree, &str)> = vec![
            (
                with(&[("x", symlink("/somewhere")), ("x/f", file(D, 1))]),
                "tree entry /x/f refused: its ancestor /x is a symlink, not a directory",
            ),
            (
                with(&[("r", symlink("/")), ("r/etc", dir())]),
                "tree entry /r/etc refused: its ancestor /r is a symlink",
            ),
            (
                with(&[("f", file(D, 1)), ("f/g", dir())]),
                "/f/g refused: its ancestor /f is a regular file",
            ),
            (
                with(&[
                    (
                        "w",
                        Entry {
                            kind: EntryKind::Whiteout,
                            ..dir()
                        },
                    ),
                    ("w/g", dir()),
                ]),
                "/w/g refused: its ancestor /w is an overlay whiteout",
            ),
            (
                with(&[("a/b", file(D, 1))]),
                "/a/b refused: its ancestor /a is missing from the tree",
            ),
            (tree(&[("a", dir())]), "no root directory"),
            (tree(&[("", file(D, 1))]), "the root is a regular file, not a directory"),
            (with(&[("../etc", dir())]), "tree path \"../etc\" refused"),
            (
                with(&[("/etc/passwd", file(D, 1))]),
                "tree path \"/etc/passwd\" refused: it is absolute",
            ),
            (
                with(&[("a/", dir())]),
                "tree path \"a/\" refused: it has an empty component",
            ),
            (
                with(&[("l", link("../../etc/passwd"))]),
                "/l refused: hard link to \"../../etc/passwd\": the target is not a plain relative path",
            ),
            (
                with(&[("l", link("/etc/passwd"))]),
                "/l refused: hard link to \"/etc/passwd\": the target is not a plain relative path",
            ),
            (
                with(&[("l", link("l"))]),
                "/l refused: hard link to \"l\": the target does not come before",
            ),
            (
                with(&[("a", link("b")), ("b", file(D, 1))]),
                "/a refused: hard link to \"b\": the target does not come before the link",
            ),
            (
                with(&[("z", link("a"))]),
                "/z refused: hard link to \"a\": the target is not in the tree",
            ),
            (
                with(&[("a", file(D, 1)), ("b", link("a")), ("c", link("b"))]),
                "/c refused: hard link to \"b\": the target is a hard link itself",
            ),
            (
                with(&[("a", symlink("/etc/passwd")), ("b", link("a"))]),
                "/b refused: hard link to \"a\": the target is a symlink, not a regular file",
            ),
            (
                with(&[("a", dir()), ("b", link("a"))]),
                "the target is a directory, not a regular file",
            ),
            (
                with(&[(
                    "d",
                    Entry {
                        hardlink: Some("x".into()),
                        ..dir()
                    },
                )]),
                "/d refused: a directory cannot be a hard link",
            ),
            (
                with(&[("f", file("d1", 1))]),
                "/f refused: digest \"d1\" is not 64 lowercase hex digits",
            ),
            (
                with(&[("f", file(&D.to_uppercase(), 1))]),
                "is not 64 lowercase hex digits",
            ),
            (
                with(&[(
                    "f",
                    Entry {
                        digest: None,
                        ..file(D, 3)
                    },
                )]),
                "/f refused: a non-empty file without content digest",
            ),
            (
                with(&[(
                    "s",
                    Entry {
                        digest: Some(D.into()),
                        ..symlink("x")
                    },
                )]),
                "a symlink with a content digest",
            ),
            (with(&[("s", no_target)]), "/s refused: a symlink without target"),
            (with(&[("s", symlink(""))]), "a symlink target empty"),
            (
                with(&[(
                    "d",
                    Entry {
                        target: Some("x".into()),
                        ..dir()
                    },
                )]),
                "a directory with a symlink target",
            ),
            (
                with(&[("o", overlay)]),
                "/o refused: extended attribute trusted.overlay.redirect is overlayfs's own",
            ),
            (
                with(&[("f", not_hex)]),
                "/f refused: extended attribute user.k: value is not hex",
            ),
            (
                with(&[("f", odd_mode)]),
                "/f refused: mode 100644 has bits beyond the permissions",
            ),
            (
                with(&[(
                    "f",
                    Entry {
                        opaque: true,
                        ..file(D, 1)
                    },
                )]),
                "a regular file marked opaque",
            ),
        ];
        for (t, expected) in cases {
            let err = validate_tree(&t).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} does not say {expected:?}");
        }
        let removing_up = Delta {
            removed: BTreeSet::from(["../x".to_string()]),
            ..Delta::default()
        };
        assert!(removing_up
            .validate_paths()
            .unwrap_err()
            .to_string()
            .contains("\"../x\""));
    }
}
