//! Building OCI image layers from captured overlay upper directories.
//!
//! Owns the translation of overlayfs's on-disk conventions into the OCI layer
//! format, the tar stream, its compression and both digests (`diff_id` of the
//! tar, `digest` of the blob), computed in the one pass that writes the blob.
//! It reads only the directories it is given (`upper`, `previous`, `lowers`),
//! never follows a symbolic link while walking them, and knows nothing about
//! snapshots, containers or registries.
//!
//! Translation, entry by entry of the upper directory:
//! - a whiteout (character device 0/0, or an empty regular file carrying
//!   `trusted.overlay.whiteout` / `user.overlay.whiteout`) becomes an empty
//!   file `.wh.<name>` in the same directory;
//! - an opaque directory (`overlay.opaque` = `y`) is emitted followed by
//!   `<dir>/.wh..wh..opq`;
//! - a renamed directory (`overlay.redirect`, mounted with `redirect_dir=on`)
//!   cannot be expressed as a rename in OCI terms, so it is emitted opaque with
//!   its full merged content: the upper's entries over the content of the
//!   redirect target in the lower directories. The old name needs no extra
//!   work: the kernel leaves a whiteout there, translated like any other;
//! - every `trusted.overlay.*` and `user.overlay.*` attribute is dropped, the
//!   others become PAX `SCHILY.xattr.<name>` records;
//! - regular files, directories, symbolic links, devices and fifos keep mode,
//!   owner and mtime (whole seconds); further names of a hard-linked inode
//!   become tar hard links to the first name written. Sockets are skipped.
//!
//! Entries are written depth first in byte order of names, so the same tree
//! always gives the same blob.
//!
//! An incremental layer (`previous`) describes the change from an earlier
//! capture of the same container's upper: entries that are new or whose
//! metadata changed (type, size, mode, owner, mtime with nanoseconds, link
//! count, symlink target, device number, attributes), a whiteout for a name
//! that disappeared (one for a whole directory), and the full description of a
//! directory that became opaque, was redirected or replaced a non-directory.
//!
//! Limits:
//! - a file rewritten with its size and mtime restored is taken as unchanged;
//! - the lower directories are read as overlayfs would, through whiteouts,
//!   opaque directories and redirects of the lower layers themselves, but
//!   metacopy files are refused (their data would be missing from the layer),
//!   and a redirect is looked up from the layer roots, not through redirected
//!   ancestors of the lower layers;
//! - hard links are recorded only among entries of the same layer: an
//!   incremental layer writes a new name of an unchanged inode as a copy
//!   unless the inode's link count changed (which re-emits all its names);
//! - excluding a path that lies inside an opaque or redirected directory
//!   drops that path's content from the resulting image;
//! - mtimes are stored in whole seconds, the tar header's resolution.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use tracing::{debug, info};

use crate::error::{io_err, Classify, ErrorKind, IoError};
pub use crate::oci::compress::{Compression, MEDIA_TYPE_TAR, MEDIA_TYPE_TAR_GZIP, MEDIA_TYPE_TAR_ZSTD};
use crate::oci::layer_tar::{whiteout_path, xattr_record, HeaderStyle, LayerTar, TarMember};
use crate::oci::overlay::{self, OPAQUE_MARKER};

const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("filter path {path:?}: {reason}")]
    InvalidFilterPath { path: String, reason: &'static str },
    #[error("layer source {path} is not a directory")]
    NotADirectory { path: String },
    #[error("extended attribute {name:?} of {path} is not UTF-8 and cannot be stored in a PAX record")]
    XattrName { path: String, name: String },
    #[error("{path} is an overlay metacopy file whose data lives in a lower layer; metacopy is not supported")]
    Metacopy { path: String },
    #[error("overlay redirect {redirect:?} of {path} is not a path inside the overlay")]
    BadRedirect { path: String, redirect: String },
    #[error("device number of {path} does not fit a tar header")]
    DeviceNumber { path: String },
}

impl Classify for LayerError {
    fn kind(&self) -> ErrorKind {
        match self {
            LayerError::InvalidFilterPath { .. } => ErrorKind::InvalidArgument,
            _ => ErrorKind::Internal,
        }
    }
}

/// Which paths of the container a layer covers (a commit's `with_paths` and
/// `without_paths`). Paths are absolute in the container's view (`/var/log`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathFilter {
    /// When not empty, only these subtrees (and the directories leading to
    /// them) are included.
    pub with_paths: Vec<PathBuf>,
    /// Subtrees left out, even inside a `with_paths` subtree.
    pub without_paths: Vec<PathBuf>,
}

impl PathFilter {
    /// Checks every path is absolute and free of `..`.
    pub fn validate(&self) -> Result<(), LayerError> {
        self.compile().map(|_| ())
    }

    fn compile(&self) -> Result<Scoper, LayerError> {
        let relative = |paths: &[PathBuf]| paths.iter().map(|p| container_path(p)).collect::<Result<Vec<_>, _>>();
        Ok(Scoper {
            with: relative(&self.with_paths)?,
            without: relative(&self.without_paths)?,
        })
    }
}

/// `/var/log` -> `var/log`, refusing what could name something outside the
/// container's root.
fn container_path(path: &Path) -> Result<PathBuf, LayerError> {
    let invalid = |reason| LayerError::InvalidFilterPath {
        path: path.display().to_string(),
        reason,
    };
    if !path.is_absolute() {
        return Err(invalid("not an absolute path"));
    }
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => relative.push(name),
            Component::ParentDir => return Err(invalid("contains \"..\"")),
            Component::Prefix(_) => return Err(invalid("not a container path")),
        }
    }
    Ok(relative)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// In the layer.
    Included,
    /// A directory leading to an included subtree: walked, its own entry
    /// written, but not made opaque.
    Ancestor,
    Excluded,
}

#[derive(Debug)]
struct Scoper {
    with: Vec<PathBuf>,
    without: Vec<PathBuf>,
}

impl Scoper {
    fn scope(&self, rel: &Path) -> Scope {
        if self.without.iter().any(|w| rel.starts_with(w)) {
            Scope::Excluded
        } else if self.with.is_empty() || self.with.iter().any(|w| rel.starts_with(w)) {
            Scope::Included
        } else if self.with.iter().any(|w| w.starts_with(rel)) {
            Scope::Ancestor
        } else {
            Scope::Excluded
        }
    }
}

/// What to build a layer from.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The captured overlay upper directory.
    pub upper: &'a Path,
    /// An earlier capture of the same container's upper: the layer then holds
    /// only the changes since it.
    pub previous: Option<&'a Path>,
    /// The container's lower directories, topmost first; read only for
    /// redirected directories.
    pub lowers: &'a [PathBuf],
    pub compression: Compression,
    pub filter: &'a PathFilter,
}

/// The layer blob written, as an OCI descriptor needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// `sha256:<hex>` of the blob as written (compressed).
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    pub media_type: &'static str,
    /// Tar entries written (files, directories, links, whiteouts, markers).
    pub entries: u64,
}

/// Writes the OCI layer for `ctx` to the file `out` (created or truncated,
/// synced before returning).
#[tracing::instrument(skip_all, fields(upper = %ctx.upper.display(), incremental = ctx.previous.is_some()))]
pub fn build_layer(ctx: &BuildContext<'_>, out: &Path) -> Result<LayerBlob, LayerError> {
    let items = plan_layer(ctx)?;
    let blob = write_blob(&items, out, ctx.compression)?;
    info!(digest = %blob.digest, size = blob.size, entries = blob.entries, "layer built");
    Ok(blob)
}

/// The entries of the layer for `ctx`, in archive order.
fn plan_layer(ctx: &BuildContext<'_>) -> Result<Vec<Item>, LayerError> {
    let scoper = ctx.filter.compile()?;
    require_dir(ctx.upper)?;
    if let Some(previous) = ctx.previous {
        require_dir(previous)?;
    }
    for lower in ctx.lowers {
        require_dir(lower)?;
    }
    let mut planner = Planner {
        lowers: ctx.lowers,
        scoper,
        items: Vec::new(),
    };
    match ctx.previous {
        None => planner.plan_upper_children(ctx.upper, Path::new(""))?,
        Some(previous) => planner.plan_diff(ctx.upper, previous, Path::new(""))?,
    }
    Ok(planner.items)
}

/// Writes the layer for `ctx` as up to `max_parts` tars (named by
/// `part_path(i)`), each with at least `min_part_bytes` of file data, that
/// stacked in order make the layer: regular files with data are spread over
/// the parts by size, directories are repeated in every part, and the rest
/// (whiteouts and opaque markers, which must come before anything a part
/// adds to their directory, hard-linked files, special files) stays in the
/// first. For builders that work on one tar per thread (Nydus RAFS).
pub fn build_layer_parts(
    ctx: &BuildContext<'_>,
    max_parts: usize,
    min_part_bytes: u64,
    part_path: impl Fn(usize) -> PathBuf,
) -> Result<Vec<(LayerBlob, PathBuf)>, LayerError> {
    let items = plan_layer(ctx)?;
    let movable = |item: &Item| match item {
        Item::Entry { node, .. } => {
            let meta = &node.meta;
            (meta.is_file() && meta.nlink() == 1 && meta.len() > 0).then_some(meta.len())
        }
        _ => None,
    };
    let total: u64 = items.iter().filter_map(movable).sum();
    let parts = ((total / min_part_bytes.max(1)) as usize).clamp(1, max_parts.max(1));
    let mut loads = vec![0u64; parts];
    let mut members: Vec<Vec<&Item>> = vec![Vec::new(); parts];
    for item in &items {
        if matches!(item, Item::Entry { node, .. } if node.is_dir()) {
            for part in &mut members {
                part.push(item);
            }
        } else if let Some(size) = movable(item) {
            let (part, _) = loads
                .iter()
                .enumerate()
                .min_by_key(|(_, load)| **load)
                .expect("at least one part");
            loads[part] += size;
            members[part].push(item);
        } else {
            members[0].push(item);
        }
    }
    let mut written = Vec::new();
    for (i, items) in members.into_iter().enumerate() {
        let path = part_path(i);
        let blob = write_blob(items, &path, ctx.compression)?;
        written.push((blob, path));
    }
    info!(parts, bytes = total, "layer built in parts");
    Ok(written)
}

fn require_dir(path: &Path) -> Result<(), LayerError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("inspecting", path))?;
    if !meta.is_dir() {
        return Err(LayerError::NotADirectory {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// One directory entry as found on disk.
#[derive(Debug)]
struct Node {
    name: OsString,
    path: PathBuf,
    meta: Metadata,
    /// Every extended attribute, overlay's included, sorted by name.
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Node {
    /// Reads `path` without following it if it is a symbolic link; `None` if
    /// it does not exist.
    fn read(path: PathBuf) -> Result<Option<Node>, LayerError> {
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("inspecting", &path)(e).into()),
        };
        let xattrs = read_xattrs(&path)?;
        let name = path.file_name().map(OsStr::to_owned).unwrap_or_default();
        Ok(Some(Node {
            name,
            path,
            meta,
            xattrs,
        }))
    }

    fn overlay_xattr(&self, key: &str) -> Option<&[u8]> {
        // overlayfs's names are ASCII: a name that is not text is not one.
        self.xattrs.iter().find_map(|(name, value)| {
            (name.to_str().and_then(overlay::overlay_key) == Some(key)).then_some(value.as_slice())
        })
    }

    fn is_dir(&self) -> bool {
        self.meta.is_dir()
    }

    fn is_whiteout(&self) -> bool {
        let file_type = self.meta.file_type();
        (file_type.is_char_device() && self.meta.rdev() == 0)
            || (file_type.is_file() && self.meta.len() == 0 && self.overlay_xattr("whiteout").is_some())
    }

    fn is_opaque(&self) -> bool {
        self.is_dir() && self.overlay_xattr("opaque") == Some(b"y")
    }

    fn redirect(&self) -> Option<&[u8]> {
        self.overlay_xattr("redirect").filter(|_| self.is_dir())
    }

    fn is_socket(&self) -> bool {
        self.meta.file_type().is_socket()
    }

    fn refuse_metacopy(&self) -> Result<(), LayerError> {
        if self.meta.is_file() && self.overlay_xattr("metacopy").is_some() {
            return Err(LayerError::Metacopy {
                path: self.path.display().to_string(),
            });
        }
        Ok(())
    }

    /// The attributes that belong in the layer: all but overlay's own.
    fn kept_xattrs(&self) -> impl Iterator<Item = &(OsString, Vec<u8>)> {
        self.xattrs
            .iter()
            .filter(|(name, _)| !name.to_str().is_some_and(overlay::is_overlay_xattr))
    }

    /// Whether `self` differs from `other`, an earlier state of the same path,
    /// in anything the layer records.
    fn differs_from(&self, other: &Node) -> Result<bool, LayerError> {
        let (a, b) = (&self.meta, &other.meta);
        if a.file_type() != b.file_type()
            || a.mode() != b.mode()
            || a.uid() != b.uid()
            || a.gid() != b.gid()
            || a.mtime() != b.mtime()
            || a.mtime_nsec() != b.mtime_nsec()
            || !self.kept_xattrs().eq(other.kept_xattrs())
        {
            return Ok(true);
        }
        let file_type = a.file_type();
        if file_type.is_file() {
            return Ok(a.len() != b.len() || a.nlink() != b.nlink());
        }
        if file_type.is_symlink() {
            let target = fs::read_link(&self.path).map_err(io_err("reading symbolic link", &self.path))?;
            let before = fs::read_link(&other.path).map_err(io_err("reading symbolic link", &other.path))?;
            return Ok(target != before);
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            return Ok(a.rdev() != b.rdev());
        }
        Ok(false)
    }
}

fn read_xattrs(path: &Path) -> Result<Vec<(OsString, Vec<u8>)>, LayerError> {
    Ok(overlay::read_xattrs(path)?)
}

/// The entries of directory `dir`, sorted by name.
fn read_children(dir: &Path) -> Result<Vec<Node>, LayerError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        names.push(entry.map_err(io_err("listing", dir))?.file_name());
    }
    names.sort();
    let mut nodes = Vec::with_capacity(names.len());
    for name in names {
        // Vanishing entries cannot happen in a read-only capture; tolerate them anyway.
        if let Some(node) = Node::read(dir.join(&name))? {
            nodes.push(node);
        }
    }
    Ok(nodes)
}

fn by_name(nodes: Vec<Node>) -> BTreeMap<OsString, Node> {
    nodes.into_iter().map(|node| (node.name.clone(), node)).collect()
}

/// One tar entry to write, in order.
#[derive(Debug)]
enum Item {
    /// `node` written under the archive path `rel`.
    Entry { rel: PathBuf, node: Box<Node> },
    /// An OCI whiteout for `rel`.
    Whiteout { rel: PathBuf },
    /// An OCI opaque marker inside directory `rel`.
    Opaque { rel: PathBuf },
}

impl Item {
    fn entry(rel: PathBuf, node: Node) -> Item {
        Item::Entry {
            rel,
            node: Box::new(node),
        }
    }
}

/// A directory of the merged lower view: the real directories making it up,
/// topmost first, as (index into the lowers, path inside that lower).
type LowerStack = Vec<(usize, PathBuf)>;

/// What to look up in the lower layers.
#[derive(Debug, Clone)]
enum Target {
    /// A name inside the directory whose stack is given.
    Child(OsString),
    /// A path from the root of every lower layer.
    Root(PathBuf),
}

/// Decides the entries of the layer, reading the trees but writing nothing.
struct Planner<'a> {
    lowers: &'a [PathBuf],
    scoper: Scoper,
    items: Vec<Item>,
}

impl Planner<'_> {
    fn plan_upper_children(&mut self, dir: &Path, rel: &Path) -> Result<(), LayerError> {
        for child in read_children(dir)? {
            let child_rel = rel.join(&child.name);
            self.plan_upper_node(child, child_rel)?;
        }
        Ok(())
    }

    /// Plans `node`, an entry of an upper directory at archive path `rel`, and
    /// everything below it, as a change over the lower layers.
    fn plan_upper_node(&mut self, node: Node, rel: PathBuf) -> Result<(), LayerError> {
        let scope = self.scoper.scope(&rel);
        if scope == Scope::Excluded {
            return Ok(());
        }
        if node.is_whiteout() {
            if scope == Scope::Included {
                self.items.push(Item::Whiteout { rel });
            }
            return Ok(());
        }
        if node.is_socket() {
            debug!(path = %node.path.display(), "socket left out of the layer");
            return Ok(());
        }
        node.refuse_metacopy()?;
        if !node.is_dir() {
            if scope == Scope::Included {
                self.items.push(Item::entry(rel, node));
            }
            return Ok(());
        }
        if let Some(redirect) = node.redirect() {
            let parent = self.stack_at(rel.parent().unwrap_or(Path::new("")))?;
            let stack = self.redirect_stack(&node.path, redirect, &parent)?;
            return self.plan_opaque_merge(node, rel, scope, &stack);
        }
        let opaque = node.is_opaque();
        let dir = node.path.clone();
        self.items.push(Item::entry(rel.clone(), node));
        if opaque && scope == Scope::Included {
            self.items.push(Item::Opaque { rel: rel.clone() });
        }
        self.plan_upper_children(&dir, &rel)
    }

    /// Plans directory `node` as opaque, with its upper content merged over
    /// the lower directories `stack`.
    fn plan_opaque_merge(
        &mut self,
        node: Node,
        rel: PathBuf,
        scope: Scope,
        stack: &LowerStack,
    ) -> Result<(), LayerError> {
        let dir = node.path.clone();
        self.items.push(Item::entry(rel.clone(), node));
        if scope == Scope::Included {
            self.items.push(Item::Opaque { rel: rel.clone() });
        }
        self.plan_merged(Some(&dir), stack, &rel)
    }

    /// Plans the full content of a directory whose parent is written opaque:
    /// the entries of `upper` (if any) over those of the lower `stack`.
    fn plan_merged(&mut self, upper: Option<&Path>, stack: &LowerStack, rel: &Path) -> Result<(), LayerError> {
        let mut upper_children = match upper {
            Some(dir) => by_name(read_children(dir)?),
            None => BTreeMap::new(),
        };
        let mut names: BTreeSet<OsString> = upper_children.keys().cloned().collect();
        for (layer, path) in stack {
            let dir = self.lowers[*layer].join(path);
            for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
                names.insert(entry.map_err(io_err("listing", &dir))?.file_name());
            }
        }
        for name in names {
            let child_rel = rel.join(&name);
            let scope = self.scoper.scope(&child_rel);
            if scope == Scope::Excluded {
                continue;
            }
            let (node, child_stack, from_upper) = match upper_children.remove(&name) {
                Some(node) if node.is_whiteout() => continue,
                Some(node) if node.is_dir() => {
                    let child_stack = if node.is_opaque() {
                        Vec::new()
                    } else if let Some(redirect) = node.redirect() {
                        self.redirect_stack(&node.path, redirect, stack)?
                    } else {
                        match self.lower_lookup(stack, Target::Child(name.clone()))? {
                            Some((lower, lower_stack)) if lower.is_dir() => lower_stack,
                            _ => Vec::new(),
                        }
                    };
                    (node, child_stack, true)
                }
                Some(node) => (node, Vec::new(), true),
                None => match self.lower_lookup(stack, Target::Child(name.clone()))? {
                    Some((node, lower_stack)) => (node, lower_stack, false),
                    None => continue,
                },
            };
            if node.is_socket() {
                continue;
            }
            node.refuse_metacopy()?;
            if node.is_dir() {
                let dir = node.path.clone();
                self.items.push(Item::entry(child_rel.clone(), node));
                self.plan_merged(from_upper.then_some(dir.as_path()), &child_stack, &child_rel)?;
            } else if scope == Scope::Included {
                self.items.push(Item::entry(child_rel, node));
            }
        }
        Ok(())
    }

    /// The lower stack of the directory at `rel`, looked up from the roots.
    fn stack_at(&self, rel: &Path) -> Result<LowerStack, LayerError> {
        if rel.as_os_str().is_empty() {
            return Ok((0..self.lowers.len()).map(|layer| (layer, PathBuf::new())).collect());
        }
        Ok(match self.lower_lookup(&Vec::new(), Target::Root(rel.to_owned()))? {
            Some((node, stack)) if node.is_dir() => stack,
            _ => Vec::new(),
        })
    }

    /// The lower stack a directory redirected to `redirect` merges with;
    /// `parent` is the lower stack of its parent directory.
    fn redirect_stack(&self, path: &Path, redirect: &[u8], parent: &LowerStack) -> Result<LowerStack, LayerError> {
        Ok(match self.lower_lookup(parent, redirect_target(path, redirect)?)? {
            Some((node, stack)) if node.is_dir() => stack,
            _ => Vec::new(),
        })
    }

    /// Looks `target` up through the lower layers as overlayfs does: the
    /// topmost entry found decides, a whiteout hides what is below, and a
    /// directory merges with the directories below it until one is opaque or
    /// something else than a directory is met. Returns the topmost entry and,
    /// for a directory, the stack of directories it is made of.
    fn lower_lookup(&self, parent: &LowerStack, target: Target) -> Result<Option<(Node, LowerStack)>, LayerError> {
        let mut target = target;
        let mut top: Option<Node> = None;
        let mut stack = Vec::new();
        for layer in 0..self.lowers.len() {
            let (node, rel) = match &target {
                Target::Child(name) => {
                    let Some((_, dir)) = parent.iter().find(|(l, _)| *l == layer) else {
                        continue;
                    };
                    let rel = dir.join(name);
                    (Node::read(self.lowers[layer].join(&rel))?, rel)
                }
                Target::Root(rel) => (self.lower_node_from_root(layer, rel)?, rel.clone()),
            };
            let Some(node) = node else {
                continue;
            };
            if node.is_whiteout() || (top.is_some() && !node.is_dir()) {
                break;
            }
            let is_dir = node.is_dir();
            let opaque = node.is_opaque();
            let redirect = match node.redirect() {
                Some(redirect) => Some(redirect_target(&node.path, redirect)?),
                None => None,
            };
            if top.is_none() {
                top = Some(node);
            }
            if !is_dir {
                break;
            }
            stack.push((layer, rel));
            if opaque {
                break;
            }
            if let Some(redirect) = redirect {
                target = redirect;
            }
        }
        Ok(top.map(|node| (node, stack)))
    }

    /// The entry at `rel` in lower `layer`, reached through real directories
    /// only (a symbolic link on the way means there is no such entry).
    fn lower_node_from_root(&self, layer: usize, rel: &Path) -> Result<Option<Node>, LayerError> {
        let mut path = self.lowers[layer].clone();
        let mut components = rel.components().peekable();
        while let Some(component) = components.next() {
            path.push(component);
            if components.peek().is_some() {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err("inspecting", &path)(e).into()),
                }
            }
        }
        Node::read(path)
    }

    /// Plans the changes from directory `prev` (an earlier capture) to `cur`.
    fn plan_diff(&mut self, cur: &Path, prev: &Path, rel: &Path) -> Result<(), LayerError> {
        let mut cur_children = by_name(read_children(cur)?);
        let mut prev_children = by_name(read_children(prev)?);
        let names: BTreeSet<OsString> = cur_children.keys().chain(prev_children.keys()).cloned().collect();
        for name in names {
            let child_rel = rel.join(&name);
            match (cur_children.remove(&name), prev_children.remove(&name)) {
                (Some(node), None) => self.plan_upper_node(node, child_rel)?,
                (None, Some(gone)) => {
                    if !gone.is_whiteout() && self.scoper.scope(&child_rel) == Scope::Included {
                        self.items.push(Item::Whiteout { rel: child_rel });
                    }
                }
                (Some(node), Some(before)) => self.plan_changed(node, before, child_rel)?,
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// Plans `node`, found in both captures at `rel`, `before` in the earlier.
    fn plan_changed(&mut self, node: Node, before: Node, rel: PathBuf) -> Result<(), LayerError> {
        let scope = self.scoper.scope(&rel);
        if scope == Scope::Excluded {
            return Ok(());
        }
        if node.is_whiteout() {
            if !before.is_whiteout() && scope == Scope::Included {
                self.items.push(Item::Whiteout { rel });
            }
            return Ok(());
        }
        if before.is_whiteout() || !node.is_dir() || !before.is_dir() {
            // New over a whiteout, changed, or a type replaced: appliers
            // replace an entry of another type by the one written.
            if node.is_dir() || before.is_whiteout() || node.differs_from(&before)? {
                self.plan_upper_node(node, rel)?;
            }
            return Ok(());
        }
        if node.redirect() != before.redirect() || (node.is_opaque() && !before.is_opaque()) {
            // Recreated or renamed since: describe it in full.
            return self.plan_upper_node(node, rel);
        }
        if before.is_opaque() && !node.is_opaque() {
            // Merges with the lower layers again: what the earlier layer hid
            // must come back, so write it opaque with its merged content.
            let stack = match node.redirect() {
                Some(_) => return self.plan_upper_node(node, rel),
                None => self.stack_at(&rel)?,
            };
            return self.plan_opaque_merge(node, rel, scope, &stack);
        }
        let changed = node.differs_from(&before)?;
        let (dir, before_dir) = (node.path.clone(), before.path.clone());
        if node.redirect().is_some() {
            // Content inside a redirected directory only makes sense merged
            // with its lower content: any change rewrites the directory.
            let mark = self.items.len();
            self.plan_diff(&dir, &before_dir, &rel)?;
            if changed || self.items.len() > mark {
                self.items.truncate(mark);
                self.plan_upper_node(node, rel)?;
            }
            return Ok(());
        }
        if changed {
            self.items.push(Item::entry(rel.clone(), node));
        }
        self.plan_diff(&dir, &before_dir, &rel)
    }
}

/// Parses an overlay redirect: absolute from the overlay root, or a name in
/// the same parent directory.
fn redirect_target(path: &Path, redirect: &[u8]) -> Result<Target, LayerError> {
    let bad = || LayerError::BadRedirect {
        path: path.display().to_string(),
        redirect: String::from_utf8_lossy(redirect).into_owned(),
    };
    let value = Path::new(OsStr::from_bytes(redirect));
    if let Ok(from_root) = value.strip_prefix("/") {
        let mut rel = PathBuf::new();
        for component in from_root.components() {
            match component {
                Component::Normal(name) => rel.push(name),
                _ => return Err(bad()),
            }
        }
        if rel.as_os_str().is_empty() {
            return Err(bad());
        }
        return Ok(Target::Root(rel));
    }
    let mut components = value.components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(name)), None) => Ok(Target::Child(name.to_owned())),
        _ => Err(bad()),
    }
}

/// Reads exactly the size announced in the tar header, failing if the file
/// is shorter (which would corrupt the archive) and ignoring any growth.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn write_blob<'a>(
    items: impl IntoIterator<Item = &'a Item>,
    out: &Path,
    compression: Compression,
) -> Result<LayerBlob, LayerError> {
    let blob_err = || io_err("writing layer blob", out);
    let file = File::create(out).map_err(blob_err())?;
    let buffered = BufWriter::with_capacity(1 << 20, file);
    let mut tar = LayerTar::new(buffered, compression, ZSTD_LEVEL, HeaderStyle::Gnu).map_err(blob_err())?;
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut entries = 0u64;
    for item in items {
        append_item(&mut tar, item, &mut links)?;
        entries += 1;
    }
    let (buffered, digests) = tar.finish().map_err(blob_err())?;
    let file = buffered.into_inner().map_err(|e| blob_err()(e.into_error()))?;
    file.sync_all().map_err(blob_err())?;
    Ok(LayerBlob {
        digest: digests.digest,
        size: digests.size,
        diff_id: digests.diff_id,
        media_type: compression.media_type(),
        entries,
    })
}

fn append_item(
    tar: &mut LayerTar<BufWriter<File>>,
    item: &Item,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), LayerError> {
    let (rel, node) = match item {
        Item::Entry { rel, node } => (rel, &**node),
        Item::Whiteout { rel } => {
            let marker = whiteout_path(rel).unwrap_or_default();
            return Ok(tar.whiteout(rel).map_err(io_err("archiving whiteout", &marker))?);
        }
        Item::Opaque { rel } => {
            let marker = rel.join(OPAQUE_MARKER);
            return Ok(tar.opaque(rel).map_err(io_err("archiving whiteout", &marker))?);
        }
    };
    let archive_err = || io_err("archiving", &node.path);
    let meta = &node.meta;
    let mut member = TarMember {
        path: rel,
        kind: tar::EntryType::Regular,
        mode: meta.mode() & 0o7777,
        uid: u64::from(meta.uid()),
        gid: u64::from(meta.gid()),
        mtime: u64::try_from(meta.mtime()).unwrap_or(0),
        size: 0,
        link: None,
        device: None,
    };
    let file_type = meta.file_type();

    if file_type.is_file() && meta.nlink() > 1 {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            let link = TarMember {
                kind: tar::EntryType::Link,
                link: Some(first),
                ..member
            };
            return Ok(tar.member(&link, &[], io::empty()).map_err(archive_err())?);
        }
        links.insert((meta.dev(), meta.ino()), rel.clone());
    }

    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, value) in node.kept_xattrs() {
        let Some(name) = name.to_str() else {
            return Err(LayerError::XattrName {
                path: node.path.display().to_string(),
                name: name.to_string_lossy().into_owned(),
            });
        };
        pax.push((xattr_record(name), value.to_vec()));
    }

    if file_type.is_dir() {
        let mut dir = rel.as_os_str().to_owned();
        dir.push("/");
        let dir = PathBuf::from(dir);
        let member = TarMember {
            path: &dir,
            kind: tar::EntryType::Directory,
            ..member
        };
        Ok(tar.member(&member, &pax, io::empty()).map_err(archive_err())?)
    } else if file_type.is_file() {
        member.size = meta.len();
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&node.path)
            .map_err(archive_err())?;
        let data = ExactReader {
            inner: file,
            remaining: meta.len(),
        };
        Ok(tar.member(&member, &pax, data).map_err(archive_err())?)
    } else if file_type.is_symlink() {
        let target = fs::read_link(&node.path).map_err(archive_err())?;
        let member = TarMember {
            kind: tar::EntryType::Symlink,
            link: Some(&target),
            ..member
        };
        Ok(tar.member(&member, &pax, io::empty()).map_err(archive_err())?)
    } else if file_type.is_char_device() || file_type.is_block_device() || file_type.is_fifo() {
        member.kind = if file_type.is_char_device() {
            tar::EntryType::Char
        } else if file_type.is_block_device() {
            tar::EntryType::Block
        } else {
            tar::EntryType::Fifo
        };
        // A fifo gets explicit zeros, as GNU tar writes: readers such as
        // the Nydus tar builder parse the device fields of every special file.
        member.device = Some(if file_type.is_fifo() {
            (0, 0)
        } else {
            (libc::major(meta.rdev()), libc::minor(meta.rdev()))
        });
        Ok(tar.member(&member, &pax, io::empty()).map_err(archive_err())?)
    } else {
        // Sockets are filtered out while planning; nothing else exists.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::layer_tar::PAX_XATTR_PREFIX;
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct TarEntry {
        path: String,
        kind: tar::EntryType,
        mode: u32,
        uid: u64,
        link: Option<String>,
        data: Vec<u8>,
        xattrs: Vec<(String, Vec<u8>)>,
    }

    fn sha256(bytes: &[u8]) -> String {
        let hex: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    fn decompress(blob: &[u8], compression: Compression) -> Vec<u8> {
        match compression {
            Compression::None => blob.to_vec(),
            Compression::Gzip => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(blob).read_to_end(&mut out).unwrap();
                out
            }
            Compression::Zstd => zstd::decode_all(blob).unwrap(),
        }
    }

    fn parse(tar_bytes: &[u8]) -> Vec<TarEntry> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut entries = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut xattrs = Vec::new();
            if let Some(pax) = entry.pax_extensions().unwrap() {
                for record in pax {
                    let record = record.unwrap();
                    let key = record.key().unwrap();
                    let name = key.strip_prefix(PAX_XATTR_PREFIX).expect("only xattr records");
                    xattrs.push((name.to_owned(), record.value_bytes().to_vec()));
                }
            }
            let header = entry.header().clone();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            entries.push(TarEntry {
                path: String::from_utf8(entry.path_bytes().into_owned()).unwrap(),
                kind: header.entry_type(),
                mode: header.mode().unwrap(),
                uid: header.uid().unwrap(),
                link: entry
                    .link_name_bytes()
                    .map(|l| String::from_utf8(l.into_owned()).unwrap()),
                data,
                xattrs,
            });
        }
        entries
    }

    #[test]
    fn a_layer_in_parts_spreads_file_data_and_keeps_the_rest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("dir/sub")).unwrap();
        for i in 0..6u8 {
            fs::write(upper.join(format!("dir/f{i}")), vec![i; 1000 + usize::from(i) * 10]).unwrap();
        }
        fs::write(upper.join("dir/linked"), b"linked").unwrap();
        fs::hard_link(upper.join("dir/linked"), upper.join("dir/hard")).unwrap();
        symlink("f0", upper.join("dir/sym")).unwrap();
        fs::write(upper.join("dir/empty"), b"").unwrap();
        let filter = PathFilter::default();
        let ctx = BuildContext {
            upper: &upper,
            previous: None,
            lowers: &[],
            compression: Compression::None,
            filter: &filter,
        };
        let (_, whole) = build_checked(&ctx, &tmp.path().join("whole"));
        let parts = build_layer_parts(&ctx, 3, 1000, |i| tmp.path().join(format!("part-{i}"))).unwrap();
        assert_eq!(parts.len(), 3);
        let parsed: Vec<Vec<TarEntry>> = parts
            .iter()
            .map(|(blob, path)| {
                let bytes = fs::read(path).unwrap();
                assert_eq!(blob.digest, sha256(&bytes));
                parse(&bytes)
            })
            .collect();
        let dirs: Vec<&TarEntry> = whole.iter().filter(|e| e.kind == tar::EntryType::Directory).collect();
        for part in &parsed {
            for dir in &dirs {
                assert!(part.contains(dir), "{} in every part", dir.path);
            }
        }
        let mut others: Vec<TarEntry> = parsed
            .iter()
            .flatten()
            .filter(|e| e.kind != tar::EntryType::Directory)
            .cloned()
            .collect();
        let mut expected: Vec<TarEntry> = whole
            .iter()
            .filter(|e| e.kind != tar::EntryType::Directory)
            .cloned()
            .collect();
        others.sort_by(|a, b| a.path.cmp(&b.path));
        expected.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(others, expected, "every other entry exactly once");
        for kept in ["dir/linked", "dir/hard", "dir/sym", "dir/empty"] {
            assert!(parsed[0].iter().any(|e| e.path == kept), "{kept} in the first part");
        }
        for part in &parsed {
            let data: usize = part.iter().map(|e| e.data.len()).sum();
            assert!(data >= 1000, "every part carries file data: {data}");
        }
        let one = build_layer_parts(&ctx, 3, 1 << 30, |i| tmp.path().join(format!("one-{i}"))).unwrap();
        assert_eq!(one.len(), 1, "too little data for parts");
    }

    /// Builds the layer and checks both digests, the size and the media type
    /// against the blob on disk; returns the blob and its parsed entries.
    fn build_checked(ctx: &BuildContext<'_>, out: &Path) -> (LayerBlob, Vec<TarEntry>) {
        let blob = build_layer(ctx, out).unwrap();
        let bytes = fs::read(out).unwrap();
        assert_eq!(blob.digest, sha256(&bytes));
        assert_eq!(blob.size, bytes.len() as u64);
        assert_eq!(blob.media_type, ctx.compression.media_type());
        let tar_bytes = decompress(&bytes, ctx.compression);
        assert_eq!(blob.diff_id, sha256(&tar_bytes));
        let entries = parse(&tar_bytes);
        assert_eq!(blob.entries, entries.len() as u64);
        (blob, entries)
    }

    fn ctx<'a>(upper: &'a Path, filter: &'a PathFilter) -> BuildContext<'a> {
        BuildContext {
            upper,
            previous: None,
            lowers: &[],
            compression: Compression::Gzip,
            filter,
        }
    }

    fn paths(entries: &[TarEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.path.as_str()).collect()
    }

    fn find<'e>(entries: &'e [TarEntry], path: &str) -> &'e TarEntry {
        entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path} not in {:?}", paths(entries)))
    }

    fn set_mtime(path: &Path, secs: i64) {
        let time = nix::sys::time::TimeSpec::new(secs, 0);
        nix::sys::stat::utimensat(
            None,
            path,
            &time,
            &time,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    /// A small upper: files, a directory tree, a symlink, two hard links,
    /// user attributes and an overlay attribute to strip.
    fn sample_upper(root: &Path) {
        fs::create_dir_all(root.join("etc/conf.d")).unwrap();
        fs::write(root.join("etc/passwd"), b"root:x:0:0\n").unwrap();
        fs::write(root.join("etc/conf.d/a.conf"), b"a=1\n").unwrap();
        fs::write(root.join("etc/secret"), b"hunter2").unwrap();
        fs::create_dir_all(root.join("var/log")).unwrap();
        fs::write(root.join("var/log/app.log"), b"started\n").unwrap();
        symlink("../etc/passwd", root.join("var/passwd-link")).unwrap();
        symlink("/etc", root.join("etc-abs")).unwrap();
        fs::write(root.join("hard1"), b"shared").unwrap();
        fs::hard_link(root.join("hard1"), root.join("hard2")).unwrap();
        xattr::set(root.join("etc/passwd"), "user.origin", b"test").unwrap();
        xattr::set(root.join("etc"), "user.overlay.impure", b"y").unwrap();
        fs::set_permissions(root.join("etc/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn full_layer_holds_files_dirs_links_and_attributes() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        sample_upper(&upper);
        let filter = PathFilter::default();
        let (_, entries) = build_checked(&ctx(&upper, &filter), &tmp.path().join("layer"));
        assert_eq!(
            paths(&entries),
            [
                "etc/",
                "etc/conf.d/",
                "etc/conf.d/a.conf",
                "etc/passwd",
                "etc/secret",
                "etc-abs",
                "hard1",
                "hard2",
                "var/",
                "var/log/",
                "var/log/app.log",
                "var/passwd-link",
            ]
        );
        let passwd = find(&entries, "etc/passwd");
        assert_eq!(passwd.kind, tar::EntryType::Regular);
        assert_eq!(passwd.data, b"root:x:0:0\n");
        assert_eq!(passwd.xattrs, [("user.origin".to_owned(), b"test".to_vec())]);
        // Overlay's own attributes never reach the layer.
        assert!(find(&entries, "etc/").xattrs.is_empty());
        assert_eq!(find(&entries, "etc/secret").mode, 0o600);
        assert_eq!(find(&entries, "etc/").kind, tar::EntryType::Directory);
        let link = find(&entries, "var/passwd-link");
        assert_eq!(link.kind, tar::EntryType::Symlink);
        assert_eq!(link.link.as_deref(), Some("../etc/passwd"));
        // A symlink to a directory is not followed.
        assert_eq!(find(&entries, "etc-abs").link.as_deref(), Some("/etc"));
        assert_eq!(find(&entries, "hard1").data, b"shared");
        let hard2 = find(&entries, "hard2");
        assert_eq!(hard2.kind, tar::EntryType::Link);
        assert_eq!(hard2.link.as_deref(), Some("hard1"));
        let uid = fs::metadata(&upper).unwrap().uid();
        assert!(entries.iter().all(|e| e.uid == u64::from(uid)));
    }

    #[test]
    fn every_compression_gives_matching_digests_and_reproducible_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        sample_upper(&upper);
        let filter = PathFilter::default();
        let mut diff_ids = BTreeSet::new();
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let ctx = BuildContext {
                compression,
                ..ctx(&upper, &filter)
            };
            let (first, entries) = build_checked(&ctx, &tmp.path().join("one"));
            let (second, _) = build_checked(&ctx, &tmp.path().join("two"));
            assert_eq!(first, second, "{compression:?}");
            assert_eq!(entries.len(), 12);
            if compression == Compression::None {
                assert_eq!(first.digest, first.diff_id);
            }
            diff_ids.insert(first.diff_id);
        }
        // The tar stream does not depend on the compression.
        assert_eq!(diff_ids.len(), 1);
    }

    #[test]
    fn overlay_whiteouts_and_opaque_directories_become_oci_markers() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("dir/sub")).unwrap();
        // Unprivileged overlay (userxattr) whiteout: an empty file with an attribute.
        fs::write(upper.join("dir/gone"), b"").unwrap();
        xattr::set(upper.join("dir/gone"), "user.overlay.whiteout", b"").unwrap();
        // Not a whiteout: the attribute on a non-empty file is just stripped.
        fs::write(upper.join("dir/kept"), b"x").unwrap();
        xattr::set(upper.join("dir/kept"), "user.overlay.whiteout", b"").unwrap();
        xattr::set(upper.join("dir/sub"), "user.overlay.opaque", b"y").unwrap();
        fs::write(upper.join("dir/sub/new"), b"new").unwrap();
        let filter = PathFilter::default();
        let (_, entries) = build_checked(&ctx(&upper, &filter), &tmp.path().join("layer"));
        assert_eq!(
            paths(&entries),
            [
                "dir/",
                "dir/.wh.gone",
                "dir/kept",
                "dir/sub/",
                "dir/sub/.wh..wh..opq",
                "dir/sub/new"
            ]
        );
        let whiteout = find(&entries, "dir/.wh.gone");
        assert_eq!(whiteout.kind, tar::EntryType::Regular);
        assert!(whiteout.data.is_empty());
        assert!(find(&entries, "dir/kept").xattrs.is_empty());
        assert!(find(&entries, "dir/sub/").xattrs.is_empty());
    }

    #[test]
    fn redirected_directory_is_written_opaque_with_its_lower_content() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, bottom) = (tmp.path().join("lower0"), tmp.path().join("lower1"));
        fs::create_dir_all(bottom.join("old/sub")).unwrap();
        fs::write(bottom.join("old/from-bottom"), b"b").unwrap();
        fs::write(bottom.join("old/hidden"), b"h").unwrap();
        fs::write(bottom.join("old/sub/deep"), b"d").unwrap();
        fs::write(bottom.join("old/replaced"), b"bottom").unwrap();
        fs::create_dir_all(top.join("old")).unwrap();
        fs::write(top.join("old/from-top"), b"t").unwrap();
        fs::write(top.join("old/replaced"), b"top").unwrap();
        fs::write(top.join("old/hidden"), b"").unwrap();
        xattr::set(top.join("old/hidden"), "user.overlay.whiteout", b"").unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("new/sub")).unwrap();
        xattr::set(upper.join("new"), "user.overlay.redirect", b"old").unwrap();
        fs::write(upper.join("new/added"), b"a").unwrap();
        fs::write(upper.join("new/sub/more"), b"m").unwrap();
        fs::write(upper.join("old"), b"").unwrap();
        xattr::set(upper.join("old"), "user.overlay.whiteout", b"").unwrap();
        // Moved to another parent: the redirect is absolute.
        fs::create_dir_all(upper.join("elsewhere/moved")).unwrap();
        xattr::set(upper.join("elsewhere/moved"), "user.overlay.redirect", b"/old/sub").unwrap();
        let lowers = [top.clone(), bottom.clone()];
        let filter = PathFilter::default();
        let ctx = BuildContext {
            lowers: &lowers,
            ..ctx(&upper, &filter)
        };
        let (_, entries) = build_checked(&ctx, &tmp.path().join("layer"));
        assert_eq!(
            paths(&entries),
            [
                "elsewhere/",
                "elsewhere/moved/",
                "elsewhere/moved/.wh..wh..opq",
                "elsewhere/moved/deep",
                "new/",
                "new/.wh..wh..opq",
                "new/added",
                "new/from-bottom",
                "new/from-top",
                "new/replaced",
                "new/sub/",
                "new/sub/deep",
                "new/sub/more",
                ".wh.old",
            ]
        );
        assert_eq!(find(&entries, "new/replaced").data, b"top");
        assert_eq!(find(&entries, "new/sub/deep").data, b"d");
        assert!(find(&entries, "new/").xattrs.is_empty());
    }

    #[test]
    fn bad_redirect_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("d")).unwrap();
        xattr::set(upper.join("d"), "user.overlay.redirect", b"/../etc").unwrap();
        let filter = PathFilter::default();
        let err = build_layer(&ctx(&upper, &filter), &tmp.path().join("layer")).unwrap_err();
        assert!(matches!(err, LayerError::BadRedirect { .. }), "{err}");
    }

    #[test]
    fn filters_select_and_exclude_subtrees() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        sample_upper(&upper);
        let filter = PathFilter {
            with_paths: vec!["/etc".into(), "/var/log/".into()],
            without_paths: vec!["/etc/secret".into(), "/./etc/conf.d".into()],
        };
        let (_, entries) = build_checked(&ctx(&upper, &filter), &tmp.path().join("layer"));
        assert_eq!(
            paths(&entries),
            ["etc/", "etc/passwd", "var/", "var/log/", "var/log/app.log"]
        );

        let everything_but_var = PathFilter {
            with_paths: vec!["/".into()],
            without_paths: vec!["/var".into(), "/hard1".into()],
        };
        let (_, entries) = build_checked(&ctx(&upper, &everything_but_var), &tmp.path().join("layer"));
        assert!(entries.iter().all(|e| !e.path.starts_with("var")));
        // The first name written of a hard-linked inode carries the data.
        assert_eq!(find(&entries, "hard2").kind, tar::EntryType::Regular);
        assert_eq!(find(&entries, "hard2").data, b"shared");
    }

    #[test]
    fn invalid_filter_paths_are_invalid_arguments() {
        let tmp = tempfile::tempdir().unwrap();
        for (with, without) in [
            (vec![PathBuf::from("etc")], vec![]),
            (vec![], vec![PathBuf::from("/var/../etc")]),
            (vec![PathBuf::new()], vec![]),
        ] {
            let filter = PathFilter {
                with_paths: with,
                without_paths: without,
            };
            assert!(filter.validate().is_err());
            let err = build_layer(&ctx(tmp.path(), &filter), &tmp.path().join("layer")).unwrap_err();
            assert!(matches!(err, LayerError::InvalidFilterPath { .. }), "{err}");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        }
    }

    #[test]
    fn upper_must_be_a_real_directory() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("dir")).unwrap();
        symlink(tmp.path().join("dir"), tmp.path().join("link")).unwrap();
        fs::write(tmp.path().join("file"), b"").unwrap();
        let filter = PathFilter::default();
        for name in ["link", "file"] {
            let err = build_layer(&ctx(&tmp.path().join(name), &filter), &tmp.path().join("layer")).unwrap_err();
            assert!(matches!(err, LayerError::NotADirectory { .. }), "{err}");
            assert_eq!(err.kind(), ErrorKind::Internal);
        }
        let err = build_layer(&ctx(&tmp.path().join("missing"), &filter), &tmp.path().join("layer")).unwrap_err();
        assert!(matches!(err, LayerError::Io(_)), "{err}");
    }

    /// Sets every mtime under `root` to a fixed time, so that later writes
    /// show as changes.
    fn age_tree(root: &Path) {
        for child in read_children(root).unwrap() {
            if child.is_dir() {
                age_tree(&child.path);
            }
            set_mtime(&child.path, 1_000_000);
        }
    }

    fn copy_tree(from: &Path, to: &Path) {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn incremental_layer_holds_only_changes_and_deletions() {
        let tmp = tempfile::tempdir().unwrap();
        let prev = tmp.path().join("prev");
        sample_upper(&prev);
        fs::create_dir_all(prev.join("doomed/inner")).unwrap();
        fs::write(prev.join("doomed/inner/file"), b"x").unwrap();
        fs::write(prev.join("becomes-dir"), b"file").unwrap();
        fs::create_dir_all(prev.join("becomes-opaque")).unwrap();
        fs::write(prev.join("becomes-opaque/old"), b"o").unwrap();
        fs::write(prev.join("was-whiteout"), b"").unwrap();
        xattr::set(prev.join("was-whiteout"), "user.overlay.whiteout", b"").unwrap();
        age_tree(&prev);
        let cur = tmp.path().join("cur");
        copy_tree(&prev, &cur);

        let filter = PathFilter::default();
        let unchanged = BuildContext {
            previous: Some(&prev),
            ..ctx(&cur, &filter)
        };
        let (_, entries) = build_checked(&unchanged, &tmp.path().join("layer"));
        assert_eq!(paths(&entries), Vec::<&str>::new());

        fs::write(cur.join("etc/passwd"), b"root:x:0:0\nuser:x:1000:1000\n").unwrap();
        fs::write(cur.join("etc/new"), b"new").unwrap();
        fs::remove_file(cur.join("etc/secret")).unwrap();
        fs::remove_dir_all(cur.join("doomed")).unwrap();
        fs::remove_file(cur.join("becomes-dir")).unwrap();
        fs::create_dir(cur.join("becomes-dir")).unwrap();
        fs::write(cur.join("becomes-dir/child"), b"c").unwrap();
        fs::remove_file(cur.join("becomes-opaque/old")).unwrap();
        fs::write(cur.join("becomes-opaque/fresh"), b"f").unwrap();
        xattr::set(cur.join("becomes-opaque"), "user.overlay.opaque", b"y").unwrap();
        fs::remove_file(cur.join("was-whiteout")).unwrap();
        fs::write(cur.join("was-whiteout"), b"").unwrap();
        fs::remove_file(cur.join("var/log/app.log")).unwrap();
        fs::write(cur.join("var/log/app.log"), b"").unwrap();
        xattr::set(cur.join("var/log/app.log"), "user.overlay.whiteout", b"").unwrap();
        xattr::set(cur.join("hard1"), "user.tag", b"1").unwrap();
        fs::set_permissions(cur.join("etc/conf.d/a.conf"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("elsewhere", cur.join("var/new-link")).unwrap();

        let incremental = BuildContext {
            previous: Some(&prev),
            compression: Compression::Zstd,
            ..ctx(&cur, &filter)
        };
        let (blob, entries) = build_checked(&incremental, &tmp.path().join("layer"));
        assert_eq!(
            paths(&entries),
            [
                "becomes-dir/",
                "becomes-dir/child",
                "becomes-opaque/",
                "becomes-opaque/.wh..wh..opq",
                "becomes-opaque/fresh",
                ".wh.doomed",
                "etc/",
                "etc/conf.d/a.conf",
                "etc/new",
                "etc/passwd",
                "etc/.wh.secret",
                "hard1",
                "hard2",
                "var/",
                "var/log/",
                "var/log/.wh.app.log",
                "var/new-link",
                "was-whiteout",
            ]
        );
        assert_eq!(find(&entries, "etc/passwd").data, b"root:x:0:0\nuser:x:1000:1000\n");
        // Both names of the retagged inode are written, linked together.
        assert_eq!(find(&entries, "hard2").link.as_deref(), Some("hard1"));
        let (again, _) = build_checked(&incremental, &tmp.path().join("again"));
        assert_eq!(blob, again);

        // The filter applies to changes as well.
        let only_etc = PathFilter {
            with_paths: vec!["/etc".into()],
            without_paths: vec!["/etc/new".into()],
        };
        let filtered = BuildContext {
            previous: Some(&prev),
            ..ctx(&cur, &only_etc)
        };
        let (_, entries) = build_checked(&filtered, &tmp.path().join("filtered"));
        assert_eq!(
            paths(&entries),
            ["etc/", "etc/conf.d/a.conf", "etc/passwd", "etc/.wh.secret"]
        );
    }
}
