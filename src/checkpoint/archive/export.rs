//! Export: the chain of a checkpoint written as one OCI image layout in a
//! tar file, one layer per checkpoint built in a scratch file while its
//! digests are computed, blob contents checked on their way in, and the
//! archive renamed into place only once whole.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use sha2::Digest;

use super::format::{
    annotation, oci_architecture, pax_time, Descriptor, History, ImageConfig, Index, Manifest, PaxRecords, Platform,
    RootFs, ARCHIVE_VERSION, IMAGE_CREATED, KIND_RECORD, MEDIA_CONFIG, MEDIA_INDEX, MEDIA_MANIFEST, OPAQUE_RECORD,
    REF_NAME,
};
use super::paths::{join, split_parent, validate_target};
use super::{image_reference, ArchiveError};
use crate::checkpoint::catalogue::{self, Catalogue, CatalogueError, Checkpoint, StagedFile};
use crate::checkpoint::tree::{self, Delta, Entry, EntryKind, Hashing, Tree};
use crate::error::io_err;
use crate::oci::digest::{hex, sha256_hex, unhex};
use crate::oci::layer_tar::{xattr_record, HeaderStyle, LayerTar, TarMember};
use crate::oci::overlay::WHITEOUT_PREFIX;

/// The zstd level of layers.
const ZSTD_LEVEL: i32 = 3;
/// Largest device number a ustar header holds (7 octal digits).
const MAX_DEVICE_NUMBER: u64 = 0o7777777;

/// A blob's content on its way into a layer: exactly `size` bytes that
/// hash to `digest`, or an error at the end, so that a damaged blob never
/// becomes a well-formed archive.
struct CheckedContent<R> {
    inner: Hashing<R>,
    key: String,
    digest: String,
    size: u64,
}

impl<R: Read> Read for CheckedContent<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.inner.bytes > self.size {
            return Err(io::Error::other(format!(
                "blob {} holds more than the {} bytes of its file",
                self.key, self.size
            )));
        }
        if n == 0 && !buf.is_empty() {
            let actual = hex(&self.inner.hasher.clone().finalize());
            if self.inner.bytes != self.size || actual != self.digest {
                return Err(io::Error::other(format!(
                    "blob {} holds {} bytes hashing to sha256:{actual}, not the {} bytes of sha256:{}",
                    self.key, self.inner.bytes, self.size, self.digest
                )));
            }
        }
        Ok(n)
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub path: PathBuf,
    /// Size of the archive.
    pub bytes: u64,
    /// The checkpoints the image's layers hold, oldest first.
    pub layers: Vec<String>,
    /// The image name the archive carries (`ctr images import` uses it).
    pub reference: String,
    /// `sha256:<hex>` of the image manifest.
    pub manifest_digest: String,
}

/// A layer built in a scratch file.
struct BuiltLayer {
    file: StagedFile,
    descriptor: Descriptor,
    diff_id: String,
}

/// Writes the chain of `checkpoint` as an OCI archive at `target`, which
/// [`validate_target`] accepts: built beside it under a temporary name
/// (0600) and renamed into place once whole.
pub fn export(
    catalogue: &Catalogue,
    checkpoint: &Checkpoint,
    target: &Path,
    overwrite: bool,
) -> Result<Exported, ArchiveError> {
    validate_target(target, overwrite)?;
    let chain = catalogue.chain(checkpoint)?;
    let scratch = catalogue.scratch_dir()?.to_path_buf();
    let mut layers = Vec::with_capacity(chain.len());
    // The tree below each layer: what decides where opaque markers go.
    let mut below = Tree::new();
    // Process images, dump logs and container records travel as blobs of
    // the layout, named in their layer's annotations.
    let mut process_blobs: BTreeMap<String, StagedFile> = BTreeMap::new();
    for link in &chain {
        let delta = catalogue.read_delta(link)?;
        let mut layer = build_layer(catalogue, link, &delta, &below, &scratch)?;
        delta.apply(&mut below);
        let mut fetch = |key: &str| -> Result<String, ArchiveError> {
            let hex = catalogue::blob_digest(key)
                .ok_or_else(|| CatalogueError::Invalid(format!("{key} is not the key of a blob")))?
                .to_string();
            if !process_blobs.contains_key(&hex) {
                let mut staged =
                    StagedFile::create_named(&scratch, "process").map_err(io_err("create a file in", &scratch))?;
                catalogue.copy_verified(key, &hex, &mut staged.file)?;
                process_blobs.insert(hex.clone(), staged);
            }
            Ok(format!("sha256:{hex}"))
        };
        if let Some(key) = &link.container_key {
            let digest = fetch(key)?;
            layer
                .descriptor
                .annotations
                .insert(annotation("container-record"), digest);
        }
        if let Some(process) = &link.process {
            let mut carried = process.clone();
            carried.images = process.images.iter().map(|k| fetch(k)).collect::<Result<_, _>>()?;
            carried.dump_log_key = fetch(&process.dump_log_key)?;
            layer
                .descriptor
                .annotations
                .insert(annotation("process"), to_json_text(&carried)?);
        }
        layers.push(layer);
    }
    let created = crate::time::rfc3339_of_unix(checkpoint.created_unix);
    let config = ImageConfig {
        created: created.clone(),
        architecture: oci_architecture().into(),
        os: "linux".into(),
        config: serde_json::json!({}),
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
        },
        history: chain
            .iter()
            .map(|c| History {
                created: crate::time::rfc3339_of_unix(c.created_unix),
                created_by: format!("seamless checkpoint {}", c.id),
                comment: format!("writable layer of container {}/{}", c.namespace, c.container),
            })
            .collect(),
    };
    let config_json = to_json(&config)?;
    let mut annotations = BTreeMap::from([
        (annotation("archive-version"), ARCHIVE_VERSION.to_string()),
        (annotation("id"), checkpoint.id.clone()),
        (annotation("namespace"), checkpoint.namespace.clone()),
        (annotation("container"), checkpoint.container.clone()),
        (annotation("image"), checkpoint.image.clone()),
        (annotation("created"), created.clone()),
        (annotation("labels"), to_json_text(&checkpoint.labels)?),
        (annotation("compression"), checkpoint.compression.as_str().to_string()),
        (IMAGE_CREATED.to_string(), created),
    ]);
    annotations.retain(|_, v| !v.is_empty());
    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_MANIFEST.into(),
        config: Descriptor {
            media_type: MEDIA_CONFIG.into(),
            digest: format!("sha256:{}", sha256_hex(&config_json)),
            size: config_json.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
        },
        layers: layers.iter().map(|l| l.descriptor.clone()).collect(),
        annotations,
    };
    let manifest_json = to_json(&manifest)?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest_json));
    let reference = image_reference(&checkpoint.container, &checkpoint.id);
    let index = Index {
        schema_version: 2,
        media_type: MEDIA_INDEX.into(),
        manifests: vec![Descriptor {
            media_type: MEDIA_MANIFEST.into(),
            digest: manifest_digest.clone(),
            size: manifest_json.len() as u64,
            annotations: BTreeMap::from([(REF_NAME.to_string(), reference.clone())]),
            platform: Some(Platform {
                architecture: oci_architecture().into(),
                os: "linux".into(),
            }),
        }],
    };
    let index_json = to_json(&index)?;

    let mtime = checkpoint.created_unix.max(0) as u64;
    let mut pending = PendingArchive::create(target)?;
    {
        let mut builder = tar::Builder::new(BufWriter::new(&mut pending.file));
        let write = |e| ArchiveError::from(io_err("write", target)(e));
        for dir in ["blobs/", "blobs/sha256/"] {
            append_layout_member(&mut builder, dir, tar::EntryType::Directory, mtime, 0, io::empty()).map_err(write)?;
        }
        let documents: [(String, &[u8]); 4] = [
            ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
            ("index.json".into(), &index_json),
            (format!("blobs/sha256/{}", sha256_hex(&manifest_json)), &manifest_json),
            (format!("blobs/sha256/{}", sha256_hex(&config_json)), &config_json),
        ];
        for (name, data) in documents {
            append_layout_member(
                &mut builder,
                &name,
                tar::EntryType::Regular,
                mtime,
                data.len() as u64,
                data,
            )
            .map_err(write)?;
        }
        let mut written = BTreeSet::new();
        for layer in &layers {
            // Two checkpoints with the same change share one blob.
            if !written.insert(layer.descriptor.digest.clone()) {
                continue;
            }
            let hex = layer.descriptor.digest.trim_start_matches("sha256:");
            let file = File::open(&layer.file.path).map_err(io_err("open", &layer.file.path))?;
            append_layout_member(
                &mut builder,
                &format!("blobs/sha256/{hex}"),
                tar::EntryType::Regular,
                mtime,
                layer.descriptor.size,
                BufReader::new(file).take(layer.descriptor.size),
            )
            .map_err(write)?;
        }
        for (hex, staged) in &process_blobs {
            if !written.insert(format!("sha256:{hex}")) {
                continue;
            }
            let size = std::fs::metadata(&staged.path)
                .map_err(io_err("stat", &staged.path))?
                .len();
            let file = File::open(&staged.path).map_err(io_err("open", &staged.path))?;
            append_layout_member(
                &mut builder,
                &format!("blobs/sha256/{hex}"),
                tar::EntryType::Regular,
                mtime,
                size,
                BufReader::new(file).take(size),
            )
            .map_err(write)?;
        }
        builder.into_inner().and_then(|mut w| w.flush()).map_err(write)?;
    }
    let bytes = pending.commit(target, overwrite)?;
    Ok(Exported {
        path: target.to_path_buf(),
        bytes,
        layers: chain.into_iter().map(|c| c.id).collect(),
        reference,
        manifest_digest,
    })
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, ArchiveError> {
    serde_json::to_vec(value).map_err(|e| CatalogueError::Invalid(format!("encoding an OCI document: {e}")).into())
}

fn to_json_text<T: Serialize>(value: &T) -> Result<String, ArchiveError> {
    serde_json::to_string(value).map_err(|e| CatalogueError::Invalid(format!("encoding an annotation: {e}")).into())
}

pub(super) fn append_layout_member<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &str,
    kind: tar::EntryType,
    mtime: u64,
    size: u64,
    data: impl Read,
) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_entry_type(kind);
    header.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_size(size);
    header.set_cksum();
    builder.append(&header, data)
}

/// Builds the layer of `checkpoint`'s change `delta` over the tree
/// `below` in a scratch file, hashing it compressed and not.
fn build_layer(
    catalogue: &Catalogue,
    checkpoint: &Checkpoint,
    delta: &Delta,
    below: &Tree,
    scratch: &Path,
) -> Result<BuiltLayer, ArchiveError> {
    let staged = StagedFile::create_named(scratch, "layer").map_err(io_err("create a file in", scratch))?;
    let write = |e| ArchiveError::from(io_err("write the layer of checkpoint", Path::new(&checkpoint.id))(e));
    let file = staged.file.try_clone().map_err(io_err("open", &staged.path))?;
    let mut tar = LayerTar::new(
        BufWriter::new(file),
        checkpoint.compression,
        ZSTD_LEVEL,
        HeaderStyle::Ustar,
    )
    .map_err(write)?;
    write_change(&mut tar, catalogue, checkpoint, delta, below)?;
    let (buffered, digests) = tar.finish().map_err(write)?;
    buffered.into_inner().map_err(|e| write(e.into_error()))?;
    let mut annotations = BTreeMap::from([
        (annotation("id"), checkpoint.id.clone()),
        (
            annotation("created"),
            crate::time::rfc3339_of_unix(checkpoint.created_unix),
        ),
        (annotation("labels"), to_json_text(&checkpoint.labels)?),
        (annotation("compression"), checkpoint.compression.as_str().to_string()),
        (annotation("pause-ns"), checkpoint.pause_ns.to_string()),
    ]);
    if let Some(parent) = &checkpoint.parent {
        annotations.insert(annotation("parent"), parent.clone());
    }
    if !checkpoint.engine.is_empty() {
        annotations.insert(annotation("engine"), checkpoint.engine.clone());
    }
    Ok(BuiltLayer {
        file: staged,
        descriptor: Descriptor {
            media_type: checkpoint.compression.media_type().to_string(),
            digest: digests.digest,
            size: digests.size,
            annotations,
            platform: None,
        },
        diff_id: digests.diff_id,
    })
}

/// One member of a layer that stands for an entry (the markers of removed
/// paths and opaque directories are [`LayerTar::whiteout`] and
/// [`LayerTar::opaque`]).
struct Member<'a> {
    name: String,
    kind: tar::EntryType,
    /// The entry whose metadata the member carries.
    meta: &'a Entry,
    link: Option<&'a str>,
    size: u64,
    /// The [`KIND_RECORD`] of a `.wh.` member that stands for an entry.
    stands_for: Option<&'static str>,
}

/// The tar members of `delta`, the change over the tree `below`: removals
/// first (a whiteout hides what is below the layer, so a path removed and
/// set again in one change comes back), then entries in path order
/// (directories before what they hold), hard links last (their first path
/// may sort after them).
fn write_change<W: Write>(
    tar: &mut LayerTar<W>,
    catalogue: &Catalogue,
    checkpoint: &Checkpoint,
    delta: &Delta,
    below: &Tree,
) -> Result<(), ArchiveError> {
    // Opaque already in the layers below (and not removed in this one).
    let opaque_below = |path: &str| {
        !delta.removed.iter().any(|r| tree::is_under(path, r))
            && below.get(path).is_some_and(|e| e.kind == EntryKind::Dir && e.opaque)
    };
    let unexportable = |entry: &str, reason: &str| ArchiveError::Unexportable {
        id: checkpoint.id.clone(),
        entry: entry.to_string(),
        reason: reason.to_string(),
    };
    let whiteout_name = |path: &str| -> Result<String, ArchiveError> {
        let (dir, name) = split_parent(path);
        if name.is_empty() {
            return Err(unexportable(path, "the root cannot be removed"));
        }
        Ok(join(dir, &format!("{WHITEOUT_PREFIX}{name}")))
    };
    let write = |e| ArchiveError::from(io_err("write the layer of checkpoint", Path::new(&checkpoint.id))(e));
    for path in &delta.removed {
        whiteout_name(path)?; // refuses the root
        tar.whiteout(Path::new(path)).map_err(write)?;
    }
    let mut links = Vec::new();
    for (path, entry) in &delta.changed {
        if split_parent(path).1.starts_with(WHITEOUT_PREFIX) {
            return Err(unexportable(
                path,
                "OCI layers keep names starting with .wh. for whiteouts",
            ));
        }
        let member = |kind| Member {
            name: path.clone(),
            kind,
            meta: entry,
            link: None,
            size: 0,
            stands_for: None,
        };
        match entry.kind {
            EntryKind::Dir => {
                let name = if path.is_empty() {
                    "./".to_string()
                } else {
                    format!("{path}/")
                };
                append_member(
                    tar,
                    checkpoint,
                    &Member {
                        name,
                        ..member(tar::EntryType::Directory)
                    },
                    io::empty(),
                )?;
                if entry.opaque && !opaque_below(path) {
                    tar.opaque(Path::new(path)).map_err(write)?;
                }
            }
            EntryKind::File if entry.hardlink.is_some() => links.push((path, entry)),
            EntryKind::File => {
                let digest = entry
                    .digest
                    .as_deref()
                    .ok_or_else(|| unexportable(path, "the file has no content digest"))?;
                let key = catalogue::content_key(checkpoint, delta, digest);
                let content = CheckedContent {
                    inner: Hashing::new(catalogue.open_content(&key)?),
                    key,
                    digest: digest.to_string(),
                    size: entry.size,
                };
                let file = Member {
                    size: entry.size,
                    ..member(tar::EntryType::Regular)
                };
                append_member(tar, checkpoint, &file, content)?;
            }
            EntryKind::Symlink => {
                let target = entry
                    .target
                    .as_deref()
                    .ok_or_else(|| unexportable(path, "the symlink has no target"))?;
                let symlink = Member {
                    link: Some(target),
                    ..member(tar::EntryType::Symlink)
                };
                append_member(tar, checkpoint, &symlink, io::empty())?;
            }
            EntryKind::Fifo => append_member(tar, checkpoint, &member(tar::EntryType::Fifo), io::empty())?,
            EntryKind::Char => append_member(tar, checkpoint, &member(tar::EntryType::Char), io::empty())?,
            EntryKind::Block => append_member(tar, checkpoint, &member(tar::EntryType::Block), io::empty())?,
            EntryKind::Whiteout | EntryKind::Socket => {
                let stands_for = Member {
                    name: whiteout_name(path)?,
                    stands_for: Some(if entry.kind == EntryKind::Socket {
                        "socket"
                    } else {
                        "whiteout"
                    }),
                    ..member(tar::EntryType::Regular)
                };
                append_member(tar, checkpoint, &stands_for, io::empty())?;
            }
        }
    }
    for (path, entry) in links {
        let link = Member {
            name: path.clone(),
            kind: tar::EntryType::Link,
            meta: entry,
            link: entry.hardlink.as_deref(),
            size: 0,
            stands_for: None,
        };
        append_member(tar, checkpoint, &link, io::empty())?;
    }
    Ok(())
}

fn append_member<W: Write>(
    tar: &mut LayerTar<W>,
    checkpoint: &Checkpoint,
    member: &Member,
    data: impl Read,
) -> Result<(), ArchiveError> {
    let unexportable = |reason: String| ArchiveError::Unexportable {
        id: checkpoint.id.clone(),
        entry: member.name.trim_end_matches('/').to_string(),
        reason,
    };
    let entry = member.meta;
    let mut records = PaxRecords::new();
    records.push(("mtime".into(), pax_time(entry.mtime_ns).into_bytes()));
    records.push(("ctime".into(), pax_time(entry.ctime_ns).into_bytes()));
    for (name, hex) in &entry.xattrs {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(unexportable(format!("xattr name {name:?} cannot be a PAX record")));
        }
        let value = unhex(hex).ok_or_else(|| unexportable(format!("xattr {name} is not stored as hex")))?;
        records.push((xattr_record(name), value));
    }
    let mut device = None;
    if matches!(member.kind, tar::EntryType::Char | tar::EntryType::Block) {
        let (major, minor) = (nix::sys::stat::major(entry.rdev), nix::sys::stat::minor(entry.rdev));
        if major > MAX_DEVICE_NUMBER || minor > MAX_DEVICE_NUMBER {
            return Err(unexportable(format!(
                "device {major}:{minor} does not fit a tar header"
            )));
        }
        device = Some((major as u32, minor as u32));
    }
    if let Some(kind) = member.stands_for {
        records.push((KIND_RECORD.into(), kind.as_bytes().to_vec()));
    }
    if member.kind == tar::EntryType::Directory && entry.opaque {
        records.push((OPAQUE_RECORD.into(), b"1".to_vec()));
    }
    let header = TarMember {
        path: Path::new(&member.name),
        kind: member.kind,
        mode: entry.mode & 0o7777,
        uid: entry.uid.into(),
        gid: entry.gid.into(),
        mtime: entry.mtime_ns.div_euclid(1_000_000_000).max(0) as u64,
        size: member.size,
        link: member.link.map(Path::new),
        device,
    };
    let write = io_err("write the layer of checkpoint", Path::new(&checkpoint.id));
    tar.member(&header, &records, data).map_err(|e| write(e).into())
}

/// The archive being written: a 0600 file beside the target, deleted
/// unless [`PendingArchive::commit`] moves it into place.
struct PendingArchive {
    temporary: PathBuf,
    file: File,
    committed: bool,
}

impl PendingArchive {
    fn create(target: &Path) -> Result<PendingArchive, ArchiveError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = target.parent().unwrap_or(Path::new("/"));
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("archive");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temporary = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_err("create", &temporary))?;
        let pending = PendingArchive {
            temporary,
            file,
            committed: false,
        };
        // The umask may have taken bits off; it cannot have added any.
        pending
            .file
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", &pending.temporary))?;
        Ok(pending)
    }

    /// Flushes the archive and renames it to `target`: over a file there
    /// when `overwrite`, else only if nothing is there (checked by the
    /// rename itself, so a file created meanwhile is never replaced).
    /// Returns the archive's size.
    fn commit(mut self, target: &Path, overwrite: bool) -> Result<u64, ArchiveError> {
        self.file.sync_all().map_err(io_err("sync", &self.temporary))?;
        let bytes = self.file.metadata().map_err(io_err("stat", &self.temporary))?.len();
        if overwrite {
            fs::rename(&self.temporary, target).map_err(io_err("rename", &self.temporary))?;
        } else {
            rename_without_replacing(&self.temporary, target)?;
        }
        self.committed = true;
        if let Some(dir) = target.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", dir))?;
        }
        Ok(bytes)
    }
}

impl Drop for PendingArchive {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temporary);
        }
    }
}

fn rename_without_replacing(from: &Path, to: &Path) -> Result<(), ArchiveError> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    let exists = || ArchiveError::Exists {
        path: to.display().to_string(),
    };
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => Err(exists()),
        // Filesystems without RENAME_NOREPLACE (NFS among them): a hard
        // link fails as well when the name is taken.
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => match fs::hard_link(from, to) {
            Ok(()) => {
                let _ = fs::remove_file(from);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
            Err(e) => Err(io_err("link", to)(e).into()),
        },
        Err(e) => Err(io_err("rename", from)(io::Error::from(e)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::checkpoint::archive::import;
    use crate::oci::compress::Compression;

    #[test]
    fn chains_round_trip_through_an_oci_archive_tree_for_tree() {
        let w = world();
        let chain = chain_of_three(&w);
        let tip = chain.last().unwrap();
        let out = w.root.join("out");
        fs::create_dir_all(&out).unwrap();
        let archive = out.join("cp.tar");
        let exported = export(&w.catalogue, tip, &archive, false).unwrap();
        assert_eq!(exported.layers, chain.iter().map(|c| c.id.clone()).collect::<Vec<_>>());
        assert_eq!(exported.reference, "seamless-checkpoint/web-1:cp-20261201-100200");
        let meta = fs::metadata(&archive).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), exported.bytes);
        assert_eq!(fs::read_dir(&out).unwrap().count(), 1, "no temporary is left");
        assert!(files_under(&w.root.join("work")).is_empty(), "no scratch file is left");

        // The layout: one image, its layers the chain, oldest first.
        let members = layout_members(&archive);
        assert_eq!(members["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: Index = serde_json::from_slice(&members["index.json"]).unwrap();
        assert_eq!(index.manifests.len(), 1);
        assert_eq!(index.manifests[0].annotations[REF_NAME], exported.reference);
        assert_eq!(index.manifests[0].digest, exported.manifest_digest);
        let blob = |digest: &str| &members[&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))];
        let manifest: Manifest = serde_json::from_slice(blob(&exported.manifest_digest)).unwrap();
        assert_eq!(manifest.annotations[&annotation("id")], tip.id);
        assert_eq!(manifest.annotations[&annotation("container")], "Web-1");
        assert_eq!(manifest.annotations[&annotation("namespace")], "ns");
        assert_eq!(manifest.annotations[&annotation("labels")], r#"{"tip":""}"#);
        let media: Vec<&str> = manifest.layers.iter().map(|l| l.media_type.as_str()).collect();
        assert_eq!(
            media,
            vec![
                "application/vnd.oci.image.layer.v1.tar",
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.oci.image.layer.v1.tar+zstd"
            ]
        );
        let config: ImageConfig = serde_json::from_slice(blob(&manifest.config.digest)).unwrap();
        assert_eq!(
            (config.os.as_str(), config.architecture.as_str()),
            ("linux", oci_architecture())
        );
        assert_eq!(config.history.len(), 3);
        for ((layer, diff_id), c) in manifest.layers.iter().zip(&config.rootfs.diff_ids).zip(&chain) {
            assert_eq!(layer.annotations[&annotation("id")], c.id);
            let data = blob(&layer.digest);
            assert_eq!(format!("sha256:{}", sha256_hex(data)), layer.digest);
            assert_eq!(
                &format!("sha256:{}", sha256_hex(&decompress(data, &layer.media_type))),
                diff_id
            );
        }
        // The second layer in OCI form.
        let second = decompress(blob(&manifest.layers[1].digest), &manifest.layers[1].media_type);
        let names: Vec<String> = tar::Archive::new(&second[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"data/.wh.sub".to_string()), "{names:?}");
        assert_eq!(
            names.last().map(String::as_str),
            Some("data/big-again"),
            "links last: {names:?}"
        );

        // Imported into another storage: the same checkpoints, tree for tree.
        let other = world();
        let imported = import(&other.catalogue, &archive, "elsewhere").unwrap();
        assert_eq!(imported.len(), 3);
        for (original, copy) in chain.iter().zip(&imported) {
            assert_eq!(copy.id, original.id);
            assert_eq!(copy.parent, original.parent);
            assert_eq!(copy.labels, original.labels);
            assert_eq!(copy.created_unix, original.created_unix);
            assert_eq!(copy.compression, original.compression);
            assert_eq!(copy.pause_ns, original.pause_ns);
            assert_eq!(
                (copy.container.as_str(), copy.image.as_str()),
                ("Web-1", "registry.local/app:1")
            );
            assert_eq!(copy.namespace, "elsewhere");
            assert_eq!(
                (copy.changed_entries, copy.removed_entries, copy.content_size),
                (
                    original.changed_entries,
                    original.removed_entries,
                    original.content_size
                )
            );
            assert_eq!(
                other.catalogue.tree_of(copy).unwrap(),
                w.catalogue.tree_of(original).unwrap(),
                "tree of {}",
                copy.id
            );
            let (_, failures) = other.catalogue.verify(copy).unwrap();
            assert!(failures.is_empty(), "{failures:?}");
            assert_eq!(other.catalogue.get(&copy.id).unwrap(), *copy, "listed as returned");
        }
        // Content-addressed again: the copy of big is not stored twice.
        let blobs = |world: &World| files_under(&world.objects.join("blobs")).len();
        assert_eq!(blobs(&other), blobs(&w));
        assert!(files_under(&other.root.join("work")).is_empty());

        // Not twice into one storage.
        let err = import(&other.catalogue, &archive, "elsewhere").unwrap_err();
        assert!(
            matches!(err, ArchiveError::Taken { ref id, .. } if id == "cp-20261201-100000"),
            "{err}"
        );
        assert_eq!(other.catalogue.all().unwrap().len(), 3);

        // An export of the middle checkpoint holds its chain only.
        let middle = out.join("middle.tar");
        let exported = export(&w.catalogue, &chain[1], &middle, false).unwrap();
        assert_eq!(exported.layers, vec![chain[0].id.clone(), chain[1].id.clone()]);
    }

    #[test]
    fn every_kind_of_entry_comes_back_exactly() {
        // Built by hand: overlay whiteouts, opaque directories, devices and
        // sockets need root and overlayfs to make for real.
        let w = world();
        let content = w.root.join("content");
        fs::write(&content, b"hello").unwrap();
        let digest = tree::hash_file(&content).unwrap();
        let stored = w.catalogue.store_blob(&content, &digest, Compression::Gzip).unwrap();
        let base = Entry {
            uid: 1000,
            gid: 3_000_000,
            mtime_ns: 1_764_583_872_123_456_789,
            ctime_ns: 1_764_583_873_000_000_001,
            ..Entry::bare(EntryKind::Dir, 0o755)
        };
        let long_dir = "l".repeat(120);
        let file = Entry {
            kind: EntryKind::File,
            mode: 0o4755,
            size: 5,
            digest: Some(digest.clone()),
            xattrs: BTreeMap::from([
                ("user.comment".to_string(), hex(b"caf\xc3\xa9")),
                ("security.capability".to_string(), hex(&[1, 0, 0, 2, 0, 0xff])),
            ]),
            ..base.clone()
        };
        let changed = Tree::from([
            (
                String::new(),
                Entry {
                    mtime_ns: -1_500_000_000,
                    ..base.clone()
                },
            ),
            (
                "opaque".to_string(),
                Entry {
                    opaque: true,
                    ..base.clone()
                },
            ),
            ("opaque/f".to_string(), file.clone()),
            ("a-first".to_string(), file.clone()),
            (
                "z-link".to_string(),
                Entry {
                    hardlink: Some("a-first".into()),
                    mode: 0o644,
                    ..file.clone()
                },
            ),
            (long_dir.clone(), base.clone()),
            (
                format!("{long_dir}/{}", "n".repeat(150)),
                Entry {
                    kind: EntryKind::Symlink,
                    target: Some(format!("/{}", "t".repeat(200))),
                    ..base.clone()
                },
            ),
            (
                "dev-null".to_string(),
                Entry {
                    kind: EntryKind::Char,
                    rdev: nix::sys::stat::makedev(1, 3),
                    ..base.clone()
                },
            ),
            (
                "loop9".to_string(),
                Entry {
                    kind: EntryKind::Block,
                    rdev: nix::sys::stat::makedev(7, 1_048_575),
                    ..base.clone()
                },
            ),
            (
                "pipe".to_string(),
                Entry {
                    kind: EntryKind::Fifo,
                    mode: 0o600,
                    ..base.clone()
                },
            ),
            (
                "hidden".to_string(),
                Entry {
                    kind: EntryKind::Whiteout,
                    mode: 0,
                    ..base.clone()
                },
            ),
            (
                "sock".to_string(),
                Entry {
                    kind: EntryKind::Socket,
                    mode: 0o777,
                    ..base.clone()
                },
            ),
        ]);
        let first = Delta {
            changed,
            removed: BTreeSet::from(["gone".to_string(), "opaque/old".to_string()]),
            stored: BTreeMap::from([(digest.clone(), stored.key.clone())]),
        };
        // The second links to a file of the first, and sets a path it removes.
        let second = Delta {
            changed: Tree::from([
                (
                    "again".to_string(),
                    Entry {
                        hardlink: Some("a-first".into()),
                        ..file.clone()
                    },
                ),
                (
                    "pipe".to_string(),
                    Entry {
                        kind: EntryKind::Dir,
                        ..base.clone()
                    },
                ),
                // Opaque since the first layer: no marker again.
                (
                    "opaque".to_string(),
                    Entry {
                        opaque: true,
                        mtime_ns: 2_000_000_000_000_000_000,
                        ..base.clone()
                    },
                ),
                // Opaque from this layer on: a marker here.
                (
                    "pipe/new".to_string(),
                    Entry {
                        opaque: true,
                        ..base.clone()
                    },
                ),
            ]),
            removed: BTreeSet::from(["pipe".to_string(), "sock".to_string()]),
            stored: BTreeMap::new(),
        };
        let mut chain = Vec::new();
        for (n, (delta, compression)) in [(first, Compression::Gzip), (second, Compression::None)]
            .into_iter()
            .enumerate()
        {
            let id = format!("cp-20261201-10000{n}");
            let (delta_key, delta_digest, _) = w.catalogue.write_delta(&id, &delta).unwrap();
            let checkpoint = Checkpoint {
                id,
                namespace: "ns".into(),
                container: "c".into(),
                image: String::new(),
                created_unix: 1_764_583_872 + n as i64,
                size: 1,
                content_size: delta.content_bytes(),
                labels: BTreeMap::new(),
                parent: chain.last().map(|c: &Checkpoint| c.id.clone()),
                status: "ready".into(),
                compression,
                changed_entries: delta.changed.len() as u64,
                removed_entries: delta.removed.len() as u64,
                fs_only: true,
                pause_ns: 0,
                delta_key,
                delta_digest,
                process: None,
                container_key: None,
                engine: String::new(),
            };
            w.catalogue.publish(&checkpoint).unwrap();
            chain.push(checkpoint);
        }
        let archive = w.root.join("all.tar");
        export(&w.catalogue, &chain[1], &archive, false).unwrap();
        let other = world();
        let imported = import(&other.catalogue, &archive, "ns").unwrap();
        for (original, copy) in chain.iter().zip(&imported) {
            assert_eq!(
                other.catalogue.read_delta(copy).unwrap().changed,
                w.catalogue.read_delta(original).unwrap().changed
            );
            assert_eq!(
                other.catalogue.read_delta(copy).unwrap().removed,
                w.catalogue.read_delta(original).unwrap().removed
            );
            assert_eq!(
                other.catalogue.tree_of(copy).unwrap(),
                w.catalogue.tree_of(original).unwrap()
            );
        }
        let members = layout_members(&archive);
        let index: Index = serde_json::from_slice(&members["index.json"]).unwrap();
        let blob = |digest: &str| &members[&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))];
        let manifest: Manifest = serde_json::from_slice(blob(&index.manifests[0].digest)).unwrap();
        let layer_names = |n: usize| -> Vec<String> {
            let layer = &manifest.layers[n];
            let data = decompress(blob(&layer.digest), &layer.media_type);
            tar::Archive::new(&data[..])
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().display().to_string())
                .collect()
        };
        assert!(layer_names(0).contains(&"opaque/.wh..wh..opq".to_string()));
        let second_names = layer_names(1);
        assert!(
            !second_names.contains(&"opaque/.wh..wh..opq".to_string()),
            "{second_names:?}"
        );
        assert!(
            second_names.contains(&"pipe/new/.wh..wh..opq".to_string()),
            "{second_names:?}"
        );
        assert_eq!(&second_names[..2], [".wh.pipe", ".wh.sock"], "removals first");

        let tree = other.catalogue.tree_of(&imported[1]).unwrap();
        assert!(tree["opaque"].opaque && tree["pipe/new"].opaque);
        assert_eq!(tree["pipe"].kind, EntryKind::Dir);
        assert!(!tree.contains_key("sock"));
        assert_eq!(tree["again"].digest.as_deref(), Some(digest.as_str()));
    }
}
