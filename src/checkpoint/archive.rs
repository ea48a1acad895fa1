//! Checkpoint archives: a checkpoint's chain as one portable OCI image (an
//! image layout in a tar file, as `ctr images import` and `skopeo inspect
//! oci-archive:` read it), and such an archive back into a catalogue.
//!
//! Owns the format and nothing else: blobs, changes and metadata are
//! stored through the [`Catalogue`], metadata last, so an import that fails
//! leaves nothing listed (and deletes what it stored).
//!
//! The image has one layer per checkpoint of the chain, oldest first. A
//! layer is the checkpoint's change in OCI form:
//! - entries as tar members: directories, files with their content,
//!   symlinks, hard links (to the first path of their inode), fifos and
//!   devices; mode, owner, xattrs (PAX `SCHILY.xattr.*`) and times to the
//!   nanosecond (PAX `mtime` and `ctime`, so a tree comes back exactly);
//! - removed paths as `.wh.<name>` files;
//! - overlay opaque directories with a PAX `SEAMLESS.opaque` record, and a
//!   `<dir>/.wh..wh..opq` marker in the layer where the directory becomes
//!   opaque only: the flag hides the container image's directory, not
//!   what earlier checkpoints of the chain hold in it, and a marker in a
//!   later layer would hide those from other tools;
//! - overlay whiteouts and sockets (which tar cannot hold) as `.wh.<name>`
//!   too, marked with a PAX `SEAMLESS.kind` record and carrying their
//!   metadata: other tools see the path deleted, an import restores the
//!   entry.
//!
//! The checkpoints' metadata travels as `io.seamless.checkpoint.*`
//! annotations: the checkpoint's on the manifest, each layer's own on its
//! descriptor. An import accepts only archives that carry them: a foreign
//! image has no checkpoint to become.
//!
//! Memory stays bounded whatever the size: contents stream through the
//! tar writers and readers, layers are built in scratch files while their
//! digests are computed, and an import reads the archive's members in
//! place. Blocking: callers on a runtime use `spawn_blocking`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::catalogue::{
    self, Catalogue, CatalogueError, Checkpoint, Compression, ProcessState, StagedFile, IMAGE_CHUNK_SIZES,
};
use super::tree::{self, Delta, Entry, EntryKind, Tree};
use crate::oci::digest::{hex, sha256_hex, unhex};
use crate::oci::overlay::{OPAQUE_MARKER, WHITEOUT_PREFIX};

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// The name `ctr images import` gives the image (it keeps a name that
/// holds `/` or `:` as it is).
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const IMAGE_CREATED: &str = "org.opencontainers.image.created";

const ANNOTATION_PREFIX: &str = "io.seamless.checkpoint.";
/// Bumped when an older import could not read what an export writes.
const ARCHIVE_VERSION: &str = "1";

/// On a directory member: "1" when it is an overlay opaque directory.
const OPAQUE_RECORD: &str = "SEAMLESS.opaque";
/// On a `.wh.` member: the entry it stands for ("whiteout" or "socket").
const KIND_RECORD: &str = "SEAMLESS.kind";
const XATTR_RECORD: &str = "SCHILY.xattr.";

/// A member's PAX records: key, value.
type PaxRecords = Vec<(String, Vec<u8>)>;

/// Largest index, manifest or config an import reads into memory.
const MAX_DOCUMENT: u64 = 4 << 20;
/// Largest device number a ustar header holds (7 octal digits).
const MAX_DEVICE_NUMBER: u64 = 0o7777777;
/// Largest owner id a ustar header holds; larger ones go in PAX records.
const MAX_USTAR_ID: u32 = 0o7777777;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    #[error("archive path {path:?}: {reason}")]
    Path { path: String, reason: String },
    #[error("{path} exists already (replacing it takes --force)")]
    Exists { path: String },
    #[error("archive {path} is damaged: {reason}")]
    Damaged { path: String, reason: String },
    /// A tree that cannot be written beneath a root: an entry beneath a
    /// symlink or file, a hard link out of the tree or to a link, a path
    /// that is not plain. Refused before anything is stored.
    #[error("archive {path}: checkpoint {id} is refused: {source}")]
    UnsafeTree {
        path: String,
        id: String,
        source: tree::TreeError,
    },
    #[error("archive {path} is not a checkpoint archive: {reason}")]
    Foreign { path: String, reason: String },
    #[error("checkpoint {id} of archive {path} exists already in {storage}")]
    Taken { id: String, path: String, storage: String },
    #[error("checkpoint {id}: /{entry} cannot be exported: {reason}")]
    Unexportable { id: String, entry: String, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ArchiveError {
    let path = path.display().to_string();
    move |source| ArchiveError::Io { op, path, source }
}

// ----- OCI documents -------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ImageConfig {
    created: String,
    architecture: String,
    os: String,
    #[serde(default)]
    config: serde_json::Value,
    rootfs: RootFs,
    #[serde(default)]
    history: Vec<History>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct History {
    created: String,
    created_by: String,
    comment: String,
}

/// `architecture` of OCI platforms (Go's GOARCH names) for this host.
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

fn annotation(key: &str) -> String {
    format!("{ANNOTATION_PREFIX}{key}")
}

fn layer_media_type(compression: Compression) -> String {
    match compression {
        Compression::None => MEDIA_LAYER.to_string(),
        Compression::Gzip => format!("{MEDIA_LAYER}+gzip"),
        Compression::Zstd => format!("{MEDIA_LAYER}+zstd"),
    }
}

fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type.strip_prefix(MEDIA_LAYER)? {
        "" => Some(Compression::None),
        "+gzip" => Some(Compression::Gzip),
        "+zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// The image name of checkpoint `id` of `container`: a reference docker
/// and containerd accept (repository components are lower case).
pub fn image_reference(container: &str, id: &str) -> String {
    format!("seamless-checkpoint/{}:{id}", container.to_ascii_lowercase())
}

/// A PAX time: seconds, a dot and nine digits of nanoseconds.
fn pax_time(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let abs = ns.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

fn parse_pax_time(text: &str) -> Option<i64> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, fraction) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: String = fraction.chars().chain(std::iter::repeat('0')).take(9).collect();
    let total = secs
        .parse::<i64>()
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(nanos.parse::<i64>().ok()?)?;
    Some(if negative { -total } else { total })
}

// ----- streams ---------------------------------------------------------------

use super::tree::Hashing;

enum LayerEncoder<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
}

impl<W: Write> LayerEncoder<W> {
    fn new(inner: W, compression: Compression) -> io::Result<LayerEncoder<W>> {
        Ok(match compression {
            Compression::None => LayerEncoder::Plain(inner),
            Compression::Gzip => {
                LayerEncoder::Gzip(flate2::write::GzEncoder::new(inner, flate2::Compression::default()))
            }
            Compression::Zstd => LayerEncoder::Zstd(zstd::Encoder::new(inner, 3)?),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            LayerEncoder::Plain(w) => Ok(w),
            LayerEncoder::Gzip(e) => e.finish(),
            LayerEncoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for LayerEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LayerEncoder::Plain(w) => w.write(buf),
            LayerEncoder::Gzip(e) => e.write(buf),
            LayerEncoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LayerEncoder::Plain(w) => w.flush(),
            LayerEncoder::Gzip(e) => e.flush(),
            LayerEncoder::Zstd(e) => e.flush(),
        }
    }
}

enum LayerDecoder<R: Read> {
    Plain(R),
    Gzip(flate2::read::GzDecoder<R>),
    Zstd(zstd::Decoder<'static, BufReader<R>>),
}

impl<R: Read> LayerDecoder<R> {
    fn new(inner: R, compression: Compression) -> io::Result<LayerDecoder<R>> {
        Ok(match compression {
            Compression::None => LayerDecoder::Plain(inner),
            Compression::Gzip => LayerDecoder::Gzip(flate2::read::GzDecoder::new(inner)),
            Compression::Zstd => LayerDecoder::Zstd(zstd::Decoder::new(inner)?),
        })
    }

    /// The compressed stream. Bytes the decoder buffered are lost, which
    /// is fine below a [`Hashing`]: they were hashed when read.
    fn into_inner(self) -> R {
        match self {
            LayerDecoder::Plain(r) => r,
            LayerDecoder::Gzip(d) => d.into_inner(),
            LayerDecoder::Zstd(d) => d.finish().into_inner(),
        }
    }
}

impl<R: Read> Read for LayerDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LayerDecoder::Plain(r) => r.read(buf),
            LayerDecoder::Gzip(d) => d.read(buf),
            LayerDecoder::Zstd(d) => d.read(buf),
        }
    }
}

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

fn drain(reader: &mut impl Read) -> io::Result<u64> {
    io::copy(reader, &mut io::sink())
}

// ----- paths -----------------------------------------------------------------

/// Refuses what an archive may not be written to: a relative path, `.` or
/// `..` components, a missing parent directory, and anything already at
/// the path unless `overwrite`, and then only a regular file (replaced
/// atomically: readers see the old archive or the new one).
pub fn validate_target(path: &Path, overwrite: bool) -> Result<(), ArchiveError> {
    let refuse = |reason: &str| ArchiveError::Path {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    check_absolute_plain(path).map_err(|r| refuse(&r))?;
    let parent = path.parent().ok_or_else(|| refuse("has no parent directory"))?;
    match fs::metadata(parent) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(refuse("its parent is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(refuse("its parent directory does not exist")),
        Err(e) => return Err(io_err("stat", parent)(e)),
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e)),
        Ok(_) if !overwrite => Err(ArchiveError::Exists {
            path: path.display().to_string(),
        }),
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(_) => Err(refuse("is not a regular file; only a regular file is replaced")),
    }
}

/// Refuses an archive to read that is not an absolute path of plain
/// components naming a regular file (a symlink to one is fine).
pub fn validate_source(path: &Path) -> Result<(), ArchiveError> {
    let refuse = |reason: String| ArchiveError::Path {
        path: path.display().to_string(),
        reason,
    };
    check_absolute_plain(path).map_err(refuse)?;
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(refuse("is not a regular file".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(refuse("does not exist".into())),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

fn check_absolute_plain(path: &Path) -> Result<(), String> {
    let text = path.to_str().ok_or("is not UTF-8")?;
    if !text.starts_with('/') {
        return Err("must be absolute (checkpointctl resolves relative paths)".into());
    }
    if text.ends_with('/') {
        return Err("names a directory, not a file".into());
    }
    if text.split('/').any(|part| part == "." || part == "..") {
        return Err("must not have . or .. components".into());
    }
    Ok(())
}

/// A member path of a layer as a tree path: relative, without `.` and
/// empty components, never leaving the root.
fn tree_path(raw: &str) -> Result<String, String> {
    if raw.starts_with('/') {
        return Err(format!("member {raw:?} has an absolute path"));
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("member {raw:?} has a .. component")),
            other => parts.push(other),
        }
    }
    Ok(parts.join("/"))
}

fn split_parent(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

// ----- export ----------------------------------------------------------------

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
            diff_ids: layers.iter().map(|l| format!("sha256:{}", l.diff_id)).collect(),
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
        let write = |e| ArchiveError::Io {
            op: "write",
            path: target.display().to_string(),
            source: e,
        };
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

fn append_layout_member<W: Write>(
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
    let write = |e| ArchiveError::Io {
        op: "write the layer of checkpoint",
        path: checkpoint.id.clone(),
        source: e,
    };
    let file = staged.file.try_clone().map_err(io_err("open", &staged.path))?;
    let encoder = LayerEncoder::new(Hashing::new(BufWriter::new(file)), checkpoint.compression).map_err(write)?;
    let mut builder = tar::Builder::new(Hashing::new(encoder));
    write_change(&mut builder, catalogue, checkpoint, delta, below)?;
    let (encoder, diff_id, _) = builder.into_inner().map_err(write)?.into_parts();
    let (buffered, digest, size) = encoder.finish().map_err(write)?.into_parts();
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
    Ok(BuiltLayer {
        file: staged,
        descriptor: Descriptor {
            media_type: layer_media_type(checkpoint.compression),
            digest: format!("sha256:{digest}"),
            size,
            annotations,
            platform: None,
        },
        diff_id,
    })
}

/// One member of a layer.
struct Member<'a> {
    name: String,
    kind: tar::EntryType,
    /// The entry whose metadata the member carries; None for the markers
    /// of removed paths and opaque directories.
    meta: Option<&'a Entry>,
    link: Option<&'a str>,
    size: u64,
    /// The [`KIND_RECORD`] of a `.wh.` member that stands for an entry.
    stands_for: Option<&'static str>,
}

impl Member<'_> {
    fn marker(name: String) -> Member<'static> {
        Member {
            name,
            kind: tar::EntryType::Regular,
            meta: None,
            link: None,
            size: 0,
            stands_for: None,
        }
    }
}

/// The tar members of `delta`, the change over the tree `below`: removals
/// first (a whiteout hides what is below the layer, so a path removed and
/// set again in one change comes back), then entries in path order
/// (directories before what they hold), hard links last (their first path
/// may sort after them).
fn write_change<W: Write>(
    builder: &mut tar::Builder<W>,
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
    for path in &delta.removed {
        append_member(builder, checkpoint, &Member::marker(whiteout_name(path)?), io::empty())?;
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
            meta: Some(entry),
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
                    builder,
                    checkpoint,
                    &Member {
                        name,
                        ..member(tar::EntryType::Directory)
                    },
                    io::empty(),
                )?;
                if entry.opaque && !opaque_below(path) {
                    let marker = Member::marker(join(path, OPAQUE_MARKER));
                    append_member(builder, checkpoint, &marker, io::empty())?;
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
                append_member(builder, checkpoint, &file, content)?;
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
                append_member(builder, checkpoint, &symlink, io::empty())?;
            }
            EntryKind::Fifo => append_member(builder, checkpoint, &member(tar::EntryType::Fifo), io::empty())?,
            EntryKind::Char => append_member(builder, checkpoint, &member(tar::EntryType::Char), io::empty())?,
            EntryKind::Block => append_member(builder, checkpoint, &member(tar::EntryType::Block), io::empty())?,
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
                append_member(builder, checkpoint, &stands_for, io::empty())?;
            }
        }
    }
    for (path, entry) in links {
        let link = Member {
            name: path.clone(),
            kind: tar::EntryType::Link,
            meta: Some(entry),
            link: entry.hardlink.as_deref(),
            size: 0,
            stands_for: None,
        };
        append_member(builder, checkpoint, &link, io::empty())?;
    }
    Ok(())
}

/// Copies `value` into a ustar name field; returns whether it did not fit
/// (then a PAX record holds it and the field a truncated copy).
fn set_name_field(field: &mut [u8], value: &str) -> bool {
    let bytes = value.as_bytes();
    let n = bytes.len().min(field.len());
    field[..n].copy_from_slice(&bytes[..n]);
    field[n..].fill(0);
    bytes.len() > field.len()
}

fn append_member<W: Write>(
    builder: &mut tar::Builder<W>,
    checkpoint: &Checkpoint,
    member: &Member,
    data: impl Read,
) -> Result<(), ArchiveError> {
    let unexportable = |reason: String| ArchiveError::Unexportable {
        id: checkpoint.id.clone(),
        entry: member.name.trim_end_matches('/').to_string(),
        reason,
    };
    let mut header = tar::Header::new_ustar();
    let mut records = PaxRecords::new();
    if set_name_field(&mut header.as_old_mut().name, &member.name) {
        records.push(("path".into(), member.name.clone().into_bytes()));
    }
    if let Some(link) = member.link {
        if set_name_field(&mut header.as_old_mut().linkname, link) {
            records.push(("linkpath".into(), link.as_bytes().to_vec()));
        }
    }
    header.set_entry_type(member.kind);
    header.set_size(member.size);
    match member.meta {
        Some(entry) => {
            header.set_mode(entry.mode & 0o7777);
            header.set_uid(entry.uid.into());
            header.set_gid(entry.gid.into());
            if entry.uid > MAX_USTAR_ID {
                records.push(("uid".into(), entry.uid.to_string().into_bytes()));
            }
            if entry.gid > MAX_USTAR_ID {
                records.push(("gid".into(), entry.gid.to_string().into_bytes()));
            }
            header.set_mtime(entry.mtime_ns.div_euclid(1_000_000_000).max(0) as u64);
            records.push(("mtime".into(), pax_time(entry.mtime_ns).into_bytes()));
            records.push(("ctime".into(), pax_time(entry.ctime_ns).into_bytes()));
            for (name, hex) in &entry.xattrs {
                if name.is_empty() || name.contains(['=', '\0']) {
                    return Err(unexportable(format!("xattr name {name:?} cannot be a PAX record")));
                }
                let value = unhex(hex).ok_or_else(|| unexportable(format!("xattr {name} is not stored as hex")))?;
                records.push((format!("{XATTR_RECORD}{name}"), value));
            }
            if matches!(member.kind, tar::EntryType::Char | tar::EntryType::Block) {
                let (major, minor) = (nix::sys::stat::major(entry.rdev), nix::sys::stat::minor(entry.rdev));
                if major > MAX_DEVICE_NUMBER || minor > MAX_DEVICE_NUMBER {
                    return Err(unexportable(format!(
                        "device {major}:{minor} does not fit a tar header"
                    )));
                }
                let write = io_err("write the layer of checkpoint", Path::new(&checkpoint.id));
                header
                    .set_device_major(major as u32)
                    .and_then(|()| header.set_device_minor(minor as u32))
                    .map_err(write)?;
            }
        }
        None => {
            header.set_mode(0o600);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
        }
    }
    if let Some(kind) = member.stands_for {
        records.push((KIND_RECORD.into(), kind.as_bytes().to_vec()));
    }
    if member.kind == tar::EntryType::Directory && member.meta.is_some_and(|e| e.opaque) {
        records.push((OPAQUE_RECORD.into(), b"1".to_vec()));
    }
    let write = |e| ArchiveError::Io {
        op: "write the layer of checkpoint",
        path: checkpoint.id.clone(),
        source: e,
    };
    if !records.is_empty() {
        builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(write)?;
    }
    header.set_cksum();
    builder.append(&header, data).map_err(write)
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
            Err(e) => Err(io_err("link", to)(e)),
        },
        Err(e) => Err(io_err("rename", from)(io::Error::from(e))),
    }
}

// ----- import ----------------------------------------------------------------

/// The members of an archive file: where each one's data starts, and its
/// size. Members are read in place, in any order.
struct Layout {
    path: PathBuf,
    members: HashMap<String, (u64, u64)>,
}

impl Layout {
    fn damaged(&self, reason: impl Into<String>) -> ArchiveError {
        ArchiveError::Damaged {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    fn foreign(&self, reason: impl Into<String>) -> ArchiveError {
        ArchiveError::Foreign {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    fn scan(path: &Path) -> Result<Layout, ArchiveError> {
        let mut layout = Layout {
            path: path.to_path_buf(),
            members: HashMap::new(),
        };
        let file = File::open(path).map_err(io_err("open", path))?;
        let length = file.metadata().map_err(io_err("stat", path))?.len();
        let mut archive = tar::Archive::new(file);
        let entries = archive
            .entries_with_seek()
            .map_err(|e| layout.damaged(format!("not a tar file: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| layout.damaged(format!("not a tar file: {e}")))?;
            let raw = String::from_utf8(entry.path_bytes().into_owned())
                .map_err(|_| layout.damaged("a member's name is not UTF-8"))?;
            let name = tree_path(&raw).map_err(|reason| layout.damaged(reason))?;
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let (start, size) = (entry.raw_file_position(), entry.size());
                    if start.checked_add(size).is_none_or(|end| end > length) {
                        return Err(layout.damaged(format!(
                            "truncated: member {name} needs {size} bytes from byte {start}, past the end ({length} bytes)"
                        )));
                    }
                    if layout.members.insert(name.clone(), (start, size)).is_some() {
                        return Err(layout.damaged(format!("member {name} appears twice")));
                    }
                }
                tar::EntryType::Directory | tar::EntryType::XGlobalHeader => {}
                other => return Err(layout.damaged(format!("member {name} is a {other:?}, not a file"))),
            }
        }
        Ok(layout)
    }

    /// A reader of member `name`'s data, and its size.
    fn open(&self, name: &str) -> Result<(io::Take<BufReader<File>>, u64), ArchiveError> {
        let &(start, size) = self
            .members
            .get(name)
            .ok_or_else(|| self.damaged(format!("{name} is missing")))?;
        let mut file = File::open(&self.path).map_err(io_err("open", &self.path))?;
        file.seek(SeekFrom::Start(start)).map_err(io_err("seek", &self.path))?;
        Ok((BufReader::new(file).take(size), size))
    }

    /// Member `name`, whole (at most [`MAX_DOCUMENT`] bytes).
    fn read(&self, name: &str) -> Result<Vec<u8>, ArchiveError> {
        let (mut reader, size) = self.open(name)?;
        if size > MAX_DOCUMENT {
            return Err(self.damaged(format!("{name} is larger than {MAX_DOCUMENT} bytes")));
        }
        let mut data = Vec::with_capacity(size as usize);
        reader.read_to_end(&mut data).map_err(io_err("read", &self.path))?;
        if data.len() as u64 != size {
            return Err(self.damaged(format!("{name} is truncated")));
        }
        Ok(data)
    }

    /// The member of blob `digest` (`sha256:<hex>`).
    fn blob_name(&self, digest: &str) -> Result<String, ArchiveError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .ok_or_else(|| self.damaged(format!("digest {digest:?} is not a sha256 digest")))?;
        Ok(format!("blobs/sha256/{hex}"))
    }

    /// The JSON document `descriptor` points to, checked against it.
    fn document<T: serde::de::DeserializeOwned>(&self, descriptor: &Descriptor) -> Result<T, ArchiveError> {
        let name = self.blob_name(&descriptor.digest)?;
        let data = self.read(&name)?;
        if data.len() as u64 != descriptor.size || format!("sha256:{}", sha256_hex(&data)) != descriptor.digest {
            return Err(self.damaged(format!(
                "{name} ({}) does not match its digest and size",
                descriptor.media_type
            )));
        }
        serde_json::from_slice(&data).map_err(|e| self.damaged(format!("{name}: {e}")))
    }
}

/// A layer to import, with what its annotations say.
struct LayerPlan {
    descriptor: Descriptor,
    /// Hex sha256 of the uncompressed layer (the config's diff_id).
    diff_id: String,
    /// How the layer is compressed.
    encoding: Compression,
    id: String,
    created_unix: i64,
    labels: BTreeMap<String, String>,
    /// How the checkpoint stores its blobs.
    compression: Compression,
    pause_ns: u64,
}

/// What a layer's members said, before hard links are resolved.
#[derive(Default)]
struct LayerContent {
    delta: Delta,
    /// Hard links: path, first path, the link's own metadata.
    links: Vec<(String, String, Entry)>,
    opaque: BTreeSet<String>,
    seen: BTreeSet<String>,
    /// Bytes the storage took for new blobs.
    stored_bytes: u64,
}

/// Recreates the chain an archive holds as checkpoints of `catalogue`, in
/// `namespace`, oldest first, each with its id (none may exist in the
/// catalogue), labels, creation time, parent and compression. Contents are
/// stored content-addressed again; every layer is checked against the
/// digests of the manifest and the config as it is read. Nothing is
/// published before everything is stored, and what a failed import stored
/// is deleted.
pub fn import(catalogue: &Catalogue, source: &Path, namespace: &str) -> Result<Vec<Checkpoint>, ArchiveError> {
    validate_source(source)?;
    let layout = Layout::scan(source)?;
    if !layout.members.contains_key("oci-layout") {
        return Err(layout.foreign("it has no oci-layout file (an OCI image layout in a tar file is expected)"));
    }
    let oci_layout: serde_json::Value =
        serde_json::from_slice(&layout.read("oci-layout")?).map_err(|e| layout.damaged(format!("oci-layout: {e}")))?;
    if oci_layout["imageLayoutVersion"] != "1.0.0" {
        return Err(layout.foreign(format!("image layout version {}", oci_layout["imageLayoutVersion"])));
    }
    let index: Index =
        serde_json::from_slice(&layout.read("index.json")?).map_err(|e| layout.damaged(format!("index.json: {e}")))?;
    let [entry] = &index.manifests[..] else {
        return Err(layout.foreign(format!(
            "it holds {} images; a checkpoint archive holds one",
            index.manifests.len()
        )));
    };
    if entry.media_type != MEDIA_MANIFEST {
        return Err(layout.foreign(format!(
            "its image is a {}, not an OCI image manifest",
            entry.media_type
        )));
    }
    let manifest: Manifest = layout.document(entry)?;
    let plans = plan_layers(&layout, &manifest)?;
    let container = manifest
        .annotations
        .get(&annotation("container"))
        .filter(|c| !c.is_empty())
        .ok_or_else(|| layout.foreign(format!("the manifest has no {} annotation", annotation("container"))))?
        .clone();
    let image = manifest
        .annotations
        .get(&annotation("image"))
        .cloned()
        .unwrap_or_default();
    for plan in &plans {
        match catalogue.get(&plan.id) {
            Ok(_) => {
                return Err(ArchiveError::Taken {
                    id: plan.id.clone(),
                    path: source.display().to_string(),
                    storage: catalogue.describe(),
                })
            }
            Err(CatalogueError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }

    let scratch = catalogue.scratch_dir()?.to_path_buf();
    let mut created_keys = Vec::new();
    let result = (|| {
        let mut tree = Tree::new();
        let mut made: Vec<Checkpoint> = Vec::with_capacity(plans.len());
        for (n, plan) in plans.iter().enumerate() {
            let content = read_layer(catalogue, &layout, plan, &scratch, &mut created_keys).map_err(|e| match e {
                ArchiveError::Damaged { path, reason } => ArchiveError::Damaged {
                    path,
                    reason: format!("layer {} (checkpoint {}): {reason}", n + 1, plan.id),
                },
                other => other,
            })?;
            let stored_bytes = content.stored_bytes;
            let delta = complete_layer(catalogue, &layout, plan, content, &mut tree)?;
            let (delta_key, delta_digest, delta_size) = catalogue.write_delta(&plan.id, &delta)?;
            created_keys.push(delta_key.clone());
            let (process, container_key, process_bytes) =
                import_process(catalogue, &layout, plan, &scratch, &mut created_keys)?;
            made.push(Checkpoint {
                fs_only: process.is_none(),
                process,
                container_key,
                id: plan.id.clone(),
                namespace: namespace.to_string(),
                container: container.clone(),
                image: image.clone(),
                created_unix: plan.created_unix,
                size: stored_bytes + delta_size + process_bytes,
                content_size: delta.content_bytes(),
                labels: plan.labels.clone(),
                parent: made.last().map(|c| c.id.clone()),
                status: "ready".into(),
                compression: plan.compression,
                changed_entries: delta.changed.len() as u64,
                removed_entries: delta.removed.len() as u64,
                pause_ns: plan.pause_ns,
                delta_key,
                delta_digest,
            });
        }
        // Metadata last, oldest first: a parent is listed before its child.
        for (n, checkpoint) in made.iter().enumerate() {
            if let Err(e) = catalogue.publish(checkpoint) {
                for published in made[..=n].iter().rev() {
                    let _ = catalogue.unpublish(&published.id);
                }
                return Err(e.into());
            }
        }
        Ok(made)
    })();
    if result.is_err() {
        for key in created_keys.iter().rev() {
            let _ = catalogue.delete_object(key);
        }
    }
    result
}

/// The process state and container record a layer's annotations name,
/// stored in the catalogue from the layout's blobs (each checked against
/// its digest); returns them and the bytes stored.
fn import_process(
    catalogue: &Catalogue,
    layout: &Layout,
    plan: &LayerPlan,
    scratch: &Path,
    created_keys: &mut Vec<String>,
) -> Result<(Option<ProcessState>, Option<String>, u64), ArchiveError> {
    let annotations = &plan.descriptor.annotations;
    let mut stored_bytes = 0;
    // As create stored them: images chunked with zstd, else whole in the
    // checkpoint's compression; logs and records zstd.
    let mut store = |digest: &str, chunked: bool, compression: Compression| -> Result<String, ArchiveError> {
        let name = layout.blob_name(digest)?;
        let hex = digest.trim_start_matches("sha256:").to_string();
        let (mut reader, _) = layout.open(&name)?;
        let mut staged = StagedFile::create_named(scratch, "process").map_err(io_err("create a file in", scratch))?;
        let mut hashing = Hashing::new(&mut staged.file);
        io::copy(&mut reader, &mut hashing).map_err(io_err("read", &layout.path))?;
        let (_, actual, _) = hashing.into_parts();
        if actual != hex {
            return Err(layout.damaged(format!("{name} hashes to sha256:{actual}")));
        }
        let stored = if chunked {
            catalogue.store_chunked(&staged.path, &hex, IMAGE_CHUNK_SIZES)?
        } else {
            catalogue.store_blob(&staged.path, &hex, compression)?
        };
        if stored.new {
            created_keys.push(stored.key.clone());
        }
        stored_bytes += stored.written;
        Ok(stored.key)
    };
    let container_key = match annotations.get(&annotation("container-record")) {
        Some(digest) => Some(store(digest, false, Compression::Zstd)?),
        None => None,
    };
    let process = match annotations.get(&annotation("process")) {
        Some(text) => {
            let mut process: ProcessState = serde_json::from_str(text)
                .map_err(|e| layout.damaged(format!("checkpoint {}: process annotation: {e}", plan.id)))?;
            process.images = process
                .images
                .iter()
                .map(|digest| store(digest, plan.compression == Compression::Zstd, plan.compression))
                .collect::<Result<_, _>>()?;
            process.dump_log_key = store(&process.dump_log_key, false, Compression::Zstd)?;
            Some(process)
        }
        None => None,
    };
    Ok((process, container_key, stored_bytes))
}

/// The layers of `manifest`, with the metadata of their checkpoints.
fn plan_layers(layout: &Layout, manifest: &Manifest) -> Result<Vec<LayerPlan>, ArchiveError> {
    let version = manifest.annotations.get(&annotation("archive-version"));
    match version.map(String::as_str) {
        Some(ARCHIVE_VERSION) => {}
        Some(other) => {
            return Err(layout.foreign(format!(
                "archive version {other} is not {ARCHIVE_VERSION}, the one this daemon reads"
            )))
        }
        None => {
            return Err(layout.foreign(format!(
                "the manifest has no {}* annotations (images other than checkpoint archives are not imported)",
                ANNOTATION_PREFIX
            )))
        }
    }
    let config: ImageConfig = layout.document(&manifest.config)?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(layout.damaged(format!(
            "the config lists {} layers, the manifest {}",
            config.rootfs.diff_ids.len(),
            manifest.layers.len()
        )));
    }
    if manifest.layers.is_empty() {
        return Err(layout.damaged("the image has no layers"));
    }
    let mut plans = Vec::with_capacity(manifest.layers.len());
    let mut ids = BTreeSet::new();
    for (n, (descriptor, diff_id)) in manifest.layers.iter().zip(&config.rootfs.diff_ids).enumerate() {
        let bad = |what: &str| layout.damaged(format!("layer {}: {what}", n + 1));
        let get = |key: &str| descriptor.annotations.get(&annotation(key));
        let encoding = layer_compression(&descriptor.media_type)
            .ok_or_else(|| bad(&format!("media type {} is not an OCI layer", descriptor.media_type)))?;
        let diff_id = diff_id
            .strip_prefix("sha256:")
            .ok_or_else(|| bad(&format!("diff_id {diff_id} is not a sha256 digest")))?
            .to_string();
        let id = get("id").ok_or_else(|| bad(&format!("no {} annotation", annotation("id"))))?;
        catalogue::validate_id(id)?;
        if !ids.insert(id.clone()) {
            return Err(bad(&format!("checkpoint {id} has two layers")));
        }
        let created_unix = get("created")
            .and_then(|c| crate::time::parse_rfc3339(c))
            .ok_or_else(|| bad(&format!("{} is not YYYY-MM-DDTHH:MM:SSZ", annotation("created"))))?;
        let labels: BTreeMap<String, String> = match get("labels") {
            Some(json) => serde_json::from_str(json).map_err(|e| bad(&format!("labels: {e}")))?,
            None => BTreeMap::new(),
        };
        let as_flags: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let labels = catalogue::parse_labels(&as_flags)?;
        let compression = match get("compression") {
            Some(text) => Compression::parse(text)?,
            None => encoding,
        };
        let parent = plans.last().map(|p: &LayerPlan| &p.id);
        if get("parent").is_some_and(|p| Some(p) != parent) {
            return Err(bad(&format!(
                "its parent is not {parent:?}, the checkpoint of the layer below"
            )));
        }
        let pause_ns = match get("pause-ns") {
            Some(text) => text.parse().map_err(|_| bad(&format!("pause-ns {text:?}")))?,
            None => 0,
        };
        plans.push(LayerPlan {
            descriptor: descriptor.clone(),
            diff_id,
            encoding,
            id: id.clone(),
            created_unix,
            labels,
            compression,
            pause_ns,
        });
    }
    let tip = manifest.annotations.get(&annotation("id"));
    if tip != plans.last().map(|p| &p.id) {
        return Err(layout.damaged(format!(
            "the manifest names checkpoint {tip:?}, its last layer {:?}",
            plans.last().map(|p| &p.id)
        )));
    }
    Ok(plans)
}

/// Reads one layer: each file's content stored as a blob, the rest
/// collected; the layer checked against its digests at the end.
fn read_layer(
    catalogue: &Catalogue,
    layout: &Layout,
    plan: &LayerPlan,
    scratch: &Path,
    created_keys: &mut Vec<String>,
) -> Result<LayerContent, ArchiveError> {
    let name = layout.blob_name(&plan.descriptor.digest)?;
    let (reader, size) = layout.open(&name)?;
    if size != plan.descriptor.size {
        return Err(layout.damaged(format!(
            "{name} has {size} bytes, the manifest says {}",
            plan.descriptor.size
        )));
    }
    let decoder = LayerDecoder::new(Hashing::new(reader), plan.encoding)
        .map_err(|e| layout.damaged(format!("cannot decompress: {e}")))?;
    let mut archive = tar::Archive::new(Hashing::new(decoder));
    let mut content = LayerContent::default();
    let entries = archive
        .entries()
        .map_err(|e| layout.damaged(format!("not a tar stream: {e}")))?;
    for member in entries {
        let mut member = member.map_err(|e| layout.damaged(e.to_string()))?;
        read_member(
            catalogue,
            layout,
            plan,
            &mut member,
            scratch,
            &mut content,
            created_keys,
        )?;
    }
    let mut uncompressed = archive.into_inner();
    drain(&mut uncompressed).map_err(|e| layout.damaged(e.to_string()))?;
    let (decoder, diff_id, _) = uncompressed.into_parts();
    let mut compressed = decoder.into_inner();
    drain(&mut compressed).map_err(io_err("read", &layout.path))?;
    let (_, digest, bytes) = compressed.into_parts();
    if format!("sha256:{digest}") != plan.descriptor.digest || bytes != plan.descriptor.size {
        return Err(layout.damaged(format!(
            "its {bytes} bytes hash to sha256:{digest}, the manifest says {} bytes of {}",
            plan.descriptor.size, plan.descriptor.digest
        )));
    }
    if diff_id != plan.diff_id {
        return Err(layout.damaged(format!(
            "uncompressed, it hashes to sha256:{diff_id}, the config says sha256:{}",
            plan.diff_id
        )));
    }
    Ok(content)
}

/// The PAX records of a member, and the entry its header and records
/// describe (of kind `kind`).
fn member_entry<R: Read>(member: &mut tar::Entry<'_, R>, kind: EntryKind) -> Result<(Entry, PaxRecords), String> {
    let mut records = PaxRecords::new();
    if let Some(extensions) = member.pax_extensions().map_err(|e| e.to_string())? {
        for record in extensions {
            let record = record.map_err(|e| e.to_string())?;
            let key = record.key().map_err(|_| "a PAX record key is not UTF-8".to_string())?;
            records.push((key.to_string(), record.value_bytes().to_vec()));
        }
    }
    let record = |key: &str| {
        records
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    let header = member.header();
    let number = |value: io::Result<u64>, what: &str| value.map_err(|e| format!("{what}: {e}"));
    let mtime_ns = match record("mtime").and_then(parse_pax_time) {
        Some(ns) => ns,
        None => (number(header.mtime(), "mtime")? as i64).saturating_mul(1_000_000_000),
    };
    let ctime_ns = record("ctime").and_then(parse_pax_time).unwrap_or(mtime_ns);
    let rdev = if matches!(kind, EntryKind::Char | EntryKind::Block) {
        let major = header.device_major().map_err(|e| e.to_string())?.unwrap_or(0);
        let minor = header.device_minor().map_err(|e| e.to_string())?.unwrap_or(0);
        nix::sys::stat::makedev(major.into(), minor.into())
    } else {
        0
    };
    let id = |value: io::Result<u64>, what: &str| -> Result<u32, String> {
        u32::try_from(number(value, what)?).map_err(|_| format!("{what} does not fit 32 bits"))
    };
    let entry = Entry {
        kind,
        mode: header.mode().map_err(|e| format!("mode: {e}"))? & 0o7777,
        uid: id(header.uid(), "uid")?,
        gid: id(header.gid(), "gid")?,
        mtime_ns,
        ctime_ns,
        size: 0,
        digest: None,
        hardlink: None,
        target: None,
        rdev,
        opaque: kind == EntryKind::Dir && records.iter().any(|(k, v)| k == OPAQUE_RECORD && v == b"1"),
        xattrs: records
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(XATTR_RECORD)?.to_string(), hex(v))))
            .collect(),
    };
    Ok((entry, records))
}

fn read_member<R: Read>(
    catalogue: &Catalogue,
    layout: &Layout,
    plan: &LayerPlan,
    member: &mut tar::Entry<'_, R>,
    scratch: &Path,
    content: &mut LayerContent,
    created_keys: &mut Vec<String>,
) -> Result<(), ArchiveError> {
    let raw = String::from_utf8(member.path_bytes().into_owned())
        .map_err(|_| layout.damaged("a member's name is not UTF-8"))?;
    let path = tree_path(&raw).map_err(|reason| layout.damaged(reason))?;
    let bad = |reason: String| layout.damaged(format!("member {raw}: {reason}"));
    if member.header().entry_type() == tar::EntryType::XGlobalHeader {
        return Ok(());
    }
    if !content.seen.insert(path.clone()) {
        return Err(bad("appears twice".into()));
    }
    let (dir, name) = split_parent(&path);
    if name == OPAQUE_MARKER {
        content.opaque.insert(dir.to_string());
        return Ok(());
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty() {
            return Err(bad("a whiteout of nothing".into()));
        }
        let target = join(dir, hidden);
        let (entry, records) = member_entry(member, EntryKind::Whiteout).map_err(&bad)?;
        let stands_for = records
            .iter()
            .find(|(k, _)| k == KIND_RECORD)
            .map(|(_, v)| v.as_slice());
        let kind = match stands_for {
            None => {
                content.delta.removed.insert(target);
                return Ok(());
            }
            Some(b"whiteout") => EntryKind::Whiteout,
            Some(b"socket") => EntryKind::Socket,
            Some(other) => return Err(bad(format!("{KIND_RECORD} {:?}", String::from_utf8_lossy(other)))),
        };
        if !content.seen.insert(target.clone()) {
            return Err(bad(format!("/{target} appears twice")));
        }
        content.delta.changed.insert(target, Entry { kind, ..entry });
        return Ok(());
    }
    let kind = match member.header().entry_type() {
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
        tar::EntryType::Link => EntryKind::File,
        tar::EntryType::Symlink => EntryKind::Symlink,
        tar::EntryType::Fifo => EntryKind::Fifo,
        tar::EntryType::Char => EntryKind::Char,
        tar::EntryType::Block => EntryKind::Block,
        other => return Err(bad(format!("{other:?} members are not supported"))),
    };
    if path.is_empty() && kind != EntryKind::Dir {
        return Err(bad("the root is not a directory".into()));
    }
    let (mut entry, _) = member_entry(member, kind).map_err(&bad)?;
    let link_name = || -> Result<String, ArchiveError> {
        let raw = member
            .link_name_bytes()
            .ok_or_else(|| bad("a link without a target".into()))?;
        String::from_utf8(raw.into_owned()).map_err(|_| bad("the link target is not UTF-8".into()))
    };
    match member.header().entry_type() {
        tar::EntryType::Link => {
            let first = tree_path(&link_name()?).map_err(&bad)?;
            content.links.push((path, first, entry));
            return Ok(());
        }
        tar::EntryType::Symlink => entry.target = Some(link_name()?),
        _ => {}
    }
    if kind == EntryKind::File {
        let size = member.size();
        let staged = StagedFile::create_named(scratch, "import").map_err(io_err("create a file in", scratch))?;
        let file = staged.file.try_clone().map_err(io_err("open", &staged.path))?;
        let mut hashing = Hashing::new(BufWriter::new(file));
        let copied = io::copy(member, &mut hashing).map_err(|e| bad(e.to_string()))?;
        if copied != size {
            return Err(bad(format!("truncated: {copied} of {size} bytes")));
        }
        let (buffered, digest, _) = hashing.into_parts();
        buffered
            .into_inner()
            .map_err(|e| io_err("write", &staged.path)(e.into_error()))?;
        let stored = catalogue.store_blob(&staged.path, &digest, plan.compression)?;
        if stored.new {
            created_keys.push(stored.key.clone());
        }
        content.stored_bytes += stored.written;
        content.delta.stored.insert(digest.clone(), stored.key);
        entry.size = size;
        entry.digest = Some(digest);
    }
    content.delta.changed.insert(path, entry);
    Ok(())
}

/// The change a layer holds, complete: opaque markers checked, hard links
/// given the content of their first path (in this layer or below), and
/// every content digest given its blob. Applies it to `tree`, the tree of
/// the layers below.
fn complete_layer(
    catalogue: &Catalogue,
    layout: &Layout,
    plan: &LayerPlan,
    content: LayerContent,
    tree: &mut Tree,
) -> Result<Delta, ArchiveError> {
    let bad = |reason: String| layout.damaged(format!("layer of checkpoint {}: {reason}", plan.id));
    let LayerContent {
        mut delta,
        links,
        opaque,
        ..
    } = content;
    for dir in opaque {
        if !delta
            .changed
            .get(&dir)
            .is_some_and(|e| e.kind == EntryKind::Dir && e.opaque)
        {
            return Err(bad(format!(
                "an opaque marker in /{dir}, which the layer does not set as an opaque directory"
            )));
        }
    }
    let unsafe_tree = |source| ArchiveError::UnsafeTree {
        path: layout.path.display().to_string(),
        id: plan.id.clone(),
        source,
    };
    delta.validate_paths().map_err(unsafe_tree)?;
    delta.apply(tree);
    for (path, first, entry) in links {
        let target = tree
            .get(&first)
            .filter(|t| t.kind == EntryKind::File && t.hardlink.is_none() && t.digest.is_some())
            .ok_or_else(|| {
                bad(format!(
                    "/{path} links to /{first}, which is no file of the layer or below"
                ))
            })?;
        let link = Entry {
            kind: EntryKind::File,
            size: target.size,
            digest: target.digest.clone(),
            hardlink: Some(first),
            ..entry
        };
        tree.insert(path.clone(), link.clone());
        delta.changed.insert(path, link);
    }
    // The whole tree as restore would write it: what this layer adds may
    // sit beneath a symlink an earlier layer made.
    tree::validate_tree(tree).map_err(unsafe_tree)?;
    for digest in delta.digests() {
        if delta.stored.contains_key(&digest) {
            continue;
        }
        let key = catalogue
            .find_blob(&digest, plan.compression)?
            .ok_or_else(|| bad(format!("the content sha256:{digest} of a hard link is stored nowhere")))?;
        delta.stored.insert(digest, key);
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::catalogue::NewCheckpoint;
    use crate::checkpoint::objects::DirStore;
    use crate::snapshot::store::Store;
    use std::sync::Arc;
    use std::time::Duration;

    struct World {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        objects: PathBuf,
        catalogue: Catalogue,
    }

    fn world() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let objects = root.join("objects");
        let store = Arc::new(Store::open(&root.join("meta.redb")).unwrap());
        let catalogue = Catalogue::new(
            "local".into(),
            Arc::new(DirStore::open(&objects, "local").unwrap()),
            store,
            &root.join("work"),
        );
        World {
            _tmp: tmp,
            root,
            objects,
            catalogue,
        }
    }

    fn new(parent: Option<&str>, labels: &[&str], compression: Compression) -> NewCheckpoint {
        NewCheckpoint {
            namespace: "ns".into(),
            container: "Web-1".into(),
            image: "registry.local/app:1".into(),
            labels: catalogue::parse_labels(&labels.iter().map(|l| l.to_string()).collect::<Vec<_>>()).unwrap(),
            parent: parent.map(str::to_string),
            compression,
            pause: Duration::from_micros(1_500),
            process: None,
            container_key: None,
        }
    }

    /// Every object file under `dir` (temporaries a crash leaves aside).
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            let Ok(entries) = fs::read_dir(&d) else { continue };
            for entry in entries.flatten() {
                if entry.file_type().unwrap().is_dir() {
                    pending.push(entry.path());
                } else {
                    out.push(entry.path());
                }
            }
        }
        out.sort();
        out
    }

    /// A chain of three real checkpoints of an upper directory, one per
    /// compression: files (one duplicated), directories, a symlink, hard
    /// links (one to a file of an earlier checkpoint), a fifo, a removed
    /// file and a removed directory.
    fn chain_of_three(w: &World) -> Vec<Checkpoint> {
        let upper = w.root.join("upper");
        fs::create_dir_all(upper.join("data/sub")).unwrap();
        fs::write(upper.join("data/big"), vec![9u8; 200_000]).unwrap();
        fs::write(upper.join("data/small"), b"one").unwrap();
        fs::write(upper.join("data/sub/gone"), b"bye").unwrap();
        fs::write(upper.join("data/empty"), b"").unwrap();
        std::os::unix::fs::symlink("big", upper.join("data/link")).unwrap();
        nix::unistd::mkfifo(&upper.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
        let first = w
            .catalogue
            .create(
                "cp-20261201-100000",
                &upper,
                &new(None, &["golden", "env=prod"], Compression::None),
            )
            .unwrap();
        fs::write(upper.join("data/small"), b"two").unwrap();
        fs::write(upper.join("data/copy"), vec![9u8; 200_000]).unwrap();
        fs::hard_link(upper.join("data/big"), upper.join("data/big-again")).unwrap();
        fs::remove_dir_all(upper.join("data/sub")).unwrap();
        let second = w
            .catalogue
            .create(
                "cp-20261201-100100",
                &upper,
                &new(Some(&first.id), &[], Compression::Gzip),
            )
            .unwrap();
        fs::create_dir_all(upper.join("a/deep/er")).unwrap();
        fs::write(upper.join("a/deep/er/x"), b"x content").unwrap();
        // Sorts before a/deep/er/x, its first path.
        fs::hard_link(upper.join("a/deep/er/x"), upper.join("a-link")).unwrap();
        fs::remove_file(upper.join("data/empty")).unwrap();
        let third = w
            .catalogue
            .create(
                "cp-20261201-100200",
                &upper,
                &new(Some(&second.id), &["tip"], Compression::Zstd),
            )
            .unwrap();
        vec![first, second, third]
    }

    fn layout_members(archive: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut tar = tar::Archive::new(File::open(archive).unwrap());
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.insert(name, data);
        }
        out
    }

    fn decompress(data: &[u8], media_type: &str) -> Vec<u8> {
        let mut out = Vec::new();
        LayerDecoder::new(data, layer_compression(media_type).unwrap())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn process_state_travels_with_the_archive() {
        let w = world();
        let upper = w.root.join("upper");
        fs::create_dir_all(&upper).unwrap();
        fs::write(upper.join("count"), b"7").unwrap();
        let images = w.root.join("images");
        fs::create_dir_all(&images).unwrap();
        fs::write(images.join("pages-1.img"), vec![5u8; 300_000]).unwrap();
        fs::write(images.join("inventory.img"), b"inv").unwrap();
        let (image_key, _, _) =
            super::super::process::store_images(&w.catalogue, &images, Compression::Zstd, false).unwrap();
        let log_key = super::super::process::store_bytes(
            &w.catalogue,
            b"Dumping finished successfully\n",
            Compression::Zstd,
            "log",
        )
        .unwrap();
        let record_key =
            super::super::process::store_bytes(&w.catalogue, br#"{"id":"web"}"#, Compression::Zstd, "record").unwrap();
        let mut made = new(None, &["golden"], Compression::Zstd);
        made.process = Some(ProcessState {
            images: vec![image_key.clone()],
            dump_log_key: log_key.clone(),
            memory_bytes: 300_000,
            criu_version: "4.1.1".into(),
            ..ProcessState::default()
        });
        made.container_key = Some(record_key.clone());
        let checkpoint = w.catalogue.create("cp-20261201-110000", &upper, &made).unwrap();
        assert!(!checkpoint.fs_only);
        let archive = w.root.join("proc.tar");
        export(&w.catalogue, &checkpoint, &archive, false).unwrap();

        let other = world();
        let imported = import(&other.catalogue, &archive, "ns2").unwrap();
        let back = &imported[0];
        assert!(!back.fs_only);
        let process = back.process.as_ref().unwrap();
        assert_eq!(process.images, vec![image_key], "the same content, chunked the same");
        assert_eq!(process.memory_bytes, 300_000);
        assert_eq!(process.criu_version, "4.1.1");
        assert_eq!(process.dump_log_key, log_key);
        assert_eq!(back.container_key.as_deref(), Some(record_key.as_str()));
        let (checked, failures) = other.catalogue.verify(back).unwrap();
        assert!(failures.is_empty(), "{failures:?}");
        assert!(checked >= 4, "the process blobs are verified too: {checked}");
        let restored = other.root.join("restored");
        let dirs = super::super::process::unpack_images(&other.catalogue, &process.images, &restored, 1).unwrap();
        assert_eq!(fs::read(dirs[0].join("pages-1.img")).unwrap(), vec![5u8; 300_000]);

        // A process blob that does not match its digest: nothing imported.
        let members = layout_members(&archive);
        let manifest_name = members
            .keys()
            .find(|k| {
                k.starts_with("blobs/")
                    && serde_json::from_slice::<Manifest>(&members[*k]).is_ok_and(|m| !m.layers.is_empty())
            })
            .unwrap()
            .clone();
        let manifest: Manifest = serde_json::from_slice(&members[&manifest_name]).unwrap();
        let record = manifest.layers[0].annotations[&annotation("container-record")].clone();
        let damaged = w.root.join("damaged.tar");
        let mut builder = tar::Builder::new(fs::File::create(&damaged).unwrap());
        for (name, data) in &members {
            let mut data = data.clone();
            if name == &format!("blobs/sha256/{}", record.trim_start_matches("sha256:")) {
                data[0] ^= 1;
            }
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            builder.append_data(&mut header, name, &data[..]).unwrap();
        }
        builder.finish().unwrap();
        let third = world();
        assert!(import(&third.catalogue, &damaged, "ns3").is_err());
        assert!(third.catalogue.all().unwrap().is_empty());
    }

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
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 1000,
            gid: 3_000_000,
            mtime_ns: 1_764_583_872_123_456_789,
            ctime_ns: 1_764_583_873_000_000_001,
            size: 0,
            digest: None,
            hardlink: None,
            target: None,
            rdev: 0,
            opaque: false,
            xattrs: BTreeMap::new(),
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

    #[test]
    fn damaged_truncated_and_foreign_archives_are_refused_leaving_nothing() {
        let w = world();
        let chain = chain_of_three(&w);
        let archive = w.root.join("cp.tar");
        export(&w.catalogue, &chain[2], &archive, false).unwrap();
        let bytes = fs::read(&archive).unwrap();
        let members = layout_members(&archive);
        let index: Index = serde_json::from_slice(&members["index.json"]).unwrap();
        let manifest_name = format!(
            "blobs/sha256/{}",
            index.manifests[0].digest.trim_start_matches("sha256:")
        );
        let manifest: Manifest = serde_json::from_slice(&members[&manifest_name]).unwrap();
        // A byte inside the last layer's data (the uncompressed first layer
        // would do too; zstd has no checksum of its own by default).
        let layout = Layout::scan(&archive).unwrap();
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        for layer in &manifest.layers {
            let (start, size) = layout.members[&layout.blob_name(&layer.digest).unwrap()];
            let mut damaged = bytes.clone();
            damaged[(start + size / 2) as usize] ^= 0x20;
            cases.push(("a flipped byte", damaged));
        }
        cases.push(("truncated", bytes[..bytes.len() * 2 / 3].to_vec()));
        for (what, data) in cases {
            let other = world();
            let path = other.root.join("damaged.tar");
            fs::write(&path, &data).unwrap();
            let err = import(&other.catalogue, &path, "ns").unwrap_err();
            assert!(matches!(err, ArchiveError::Damaged { .. }), "{what}: {err}");
            assert!(other.catalogue.all().unwrap().is_empty(), "{what}: nothing is listed");
            assert!(
                files_under(&other.objects).is_empty(),
                "{what}: {:?} left",
                files_under(&other.objects)
            );
            assert!(files_under(&other.root.join("work")).is_empty(), "{what}");
        }

        // An image without the annotations is not a checkpoint archive.
        let foreign = w.root.join("foreign.tar");
        {
            let mut builder = tar::Builder::new(File::create(&foreign).unwrap());
            let config = br#"{"created":"2026-12-01T10:00:00Z","architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
            let config_digest = format!("sha256:{}", sha256_hex(config));
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len()},
                "layers": []
            }))
            .unwrap();
            let index = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": format!("sha256:{}", sha256_hex(&manifest)), "size": manifest.len()}]
            }))
            .unwrap();
            for (name, data) in [
                ("oci-layout".to_string(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
                ("index.json".to_string(), index),
                (format!("blobs/sha256/{}", sha256_hex(&manifest)), manifest),
                (format!("blobs/sha256/{}", sha256_hex(config)), config.to_vec()),
            ] {
                append_layout_member(
                    &mut builder,
                    &name,
                    tar::EntryType::Regular,
                    0,
                    data.len() as u64,
                    &data[..],
                )
                .unwrap();
            }
            builder.finish().unwrap();
        }
        let err = import(&w.catalogue, &foreign, "ns").unwrap_err();
        assert!(matches!(err, ArchiveError::Foreign { .. }), "{err}");
        assert!(err.to_string().contains("io.seamless.checkpoint"), "{err}");
    }

    #[test]
    fn archive_paths_are_checked_and_never_clobbered() {
        let w = world();
        let chain = chain_of_three(&w);
        let tip = &chain[2];
        for bad in ["relative.tar", "/tmp/../etc/x.tar", "/tmp/./x.tar", "/tmp/dir/"] {
            let err = export(&w.catalogue, tip, Path::new(bad), false).unwrap_err();
            assert!(matches!(err, ArchiveError::Path { .. }), "{bad}: {err}");
        }
        let missing_parent = w.root.join("no/such/dir/x.tar");
        assert!(matches!(
            export(&w.catalogue, tip, &missing_parent, false),
            Err(ArchiveError::Path { .. })
        ));
        let target = w.root.join("x.tar");
        fs::write(&target, b"precious").unwrap();
        let err = export(&w.catalogue, tip, &target, false).unwrap_err();
        assert!(matches!(err, ArchiveError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        // Replaced when asked: a regular file only.
        export(&w.catalogue, tip, &target, true).unwrap();
        assert_ne!(fs::read(&target).unwrap(), b"precious");
        let dir = w.root.join("a-dir");
        fs::create_dir(&dir).unwrap();
        assert!(matches!(
            export(&w.catalogue, tip, &dir, true),
            Err(ArchiveError::Path { .. })
        ));
        let link = w.root.join("link.tar");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            export(&w.catalogue, tip, &link, true),
            Err(ArchiveError::Path { .. })
        ));
        // And the same rules on the other side.
        assert!(matches!(
            import(&w.catalogue, Path::new("x.tar"), "ns"),
            Err(ArchiveError::Path { .. })
        ));
        assert!(matches!(
            import(&w.catalogue, &dir, "ns"),
            Err(ArchiveError::Path { .. })
        ));
        assert!(matches!(
            import(&w.catalogue, &w.root.join("absent.tar"), "ns"),
            Err(ArchiveError::Path { .. })
        ));
    }

    #[test]
    fn times_and_dates_round_trip() {
        for ns in [0, 1, -1, 1_764_583_872_123_456_789, -1_500_000_000, 999_999_999] {
            assert_eq!(parse_pax_time(&pax_time(ns)), Some(ns), "{ns}");
        }
        assert_eq!(pax_time(-1_500_000_000), "-1.500000000");
        assert_eq!(parse_pax_time("12"), Some(12_000_000_000));
        assert_eq!(parse_pax_time("1.5"), Some(1_500_000_000));
        assert_eq!(parse_pax_time("1.1234567891"), Some(1_123_456_789));
        for bad in ["", "x", "1.x", "-", ".5"] {
            assert_eq!(parse_pax_time(bad), None, "{bad:?}");
        }
        assert_eq!(
            image_reference("Web_1", "cp-20261201-101112"),
            "seamless-checkpoint/web_1:cp-20261201-101112"
        );
        assert_eq!(unhex("00ff"), Some(vec![0, 255]));
        assert_eq!(unhex("0"), None);
    }
}
