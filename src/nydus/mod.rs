//! Nydus RAFS images: builds a RAFS v5 or v6 filesystem (a bootstrap and one
//! data blob) from an OCI layer tar, stacked on a parent bootstrap, with
//! nydus-builder; packs a bootstrap as the Nydus bootstrap layer; names the
//! media types and annotations nydusify writes. Knows nothing of registries,
//! containers or commit jobs.
//!
//! Each layer is built on its parent's bootstrap, so the bootstrap written is
//! the whole image's (the parent's tree with the layer applied, OCI whiteouts
//! and opaque directories honoured) and its blob table lists every blob of the
//! image, the new one last. Chunks the parent's blobs hold already are
//! referenced rather than written again (chunk-level deduplication).
//!
//! Uncompressed blobs are written with their chunks 4 KiB aligned, the layout
//! the kernel's erofs can mount directly with the blob as a device.
//!
//! Running Nydus images is [`mount`]'s (blob fetch and caches, an erofs
//! mount or a FUSE server of [`fuse`]: in-process, or the serving processes
//! of [`serving`] that outlive the daemon).

pub mod fuse;
pub mod mount;
pub mod serving;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nydus_api::ConfigV2;
use nydus_builder::{
    ArtifactStorage, BlobManager, BootstrapManager, BuildContext, Builder, ConversionType, Features, HashChunkDict,
    Merger, Prefetch, PrefetchPolicy, TarballBuilder, WhiteoutSpec,
};
use nydus_rafs::metadata::{RafsSuper, RafsSuperConfig, RafsVersion};
use nydus_utils::{compress, digest};
use sha2::{Digest as _, Sha256};

/// Media type of a Nydus data blob layer.
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// Media type of the bootstrap layer (a gzipped tar holding the bootstrap).
pub const BOOTSTRAP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Marks a layer as a Nydus data blob.
pub const ANNOTATION_BLOB: &str = "containerd.io/snapshot/nydus-blob";
/// Marks the layer holding the image's bootstrap.
pub const ANNOTATION_BOOTSTRAP: &str = "containerd.io/snapshot/nydus-bootstrap";
/// The RAFS version of the bootstrap ("5" or "6").
pub const ANNOTATION_FS_VERSION: &str = "containerd.io/snapshot/nydus-fs-version";
/// Blobs a commit added, as a JSON list of digests.
pub const ANNOTATION_COMMIT_BLOBS: &str = "containerd.io/snapshot/nydus-commit-blobs";
/// Digest of a layer's uncompressed content.
pub const ANNOTATION_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Where the bootstrap sits inside the bootstrap layer.
pub const BOOTSTRAP_IN_LAYER: &str = "image/image.boot";

/// Chunk size of every image we build (nydus-image's default).
const CHUNK_SIZE: u32 = 0x10_0000;
/// The largest bootstrap unpacked from a bootstrap layer: the bootstraps of
/// images of a million files stay within a few hundred MiB.
pub const MAX_BOOTSTRAP_BYTES: u64 = 1 << 30;
/// The largest tar member other than a regular file's data that a split
/// holds in memory (symlink targets and long names are far smaller).
const MAX_BUFFERED_MEMBER: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NydusError {
    #[error("compressor {0:?} is not one of none, lz4_block, zstd")]
    UnknownCompressor(String),
    #[error("RAFS version {0} is not 5 or 6")]
    UnknownVersion(u32),
    #[error("building RAFS from {source_path}: {message}")]
    Build { source_path: String, message: String },
    #[error("bootstrap {path} does not load: {message}")]
    InvalidBootstrap { path: String, message: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is larger than the {limit} bytes read of it: refused")]
    TooLarge { path: String, limit: u64 },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> NydusError + '_ {
    move |source| NydusError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Chunk compression of a data blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    None,
    Lz4Block,
    Zstd,
}

/// The RAFS versions this crate builds, as the CLI and the wire name them.
pub const FS_VERSIONS: [&str; 2] = ["5", "6"];

impl Compressor {
    /// Every compressor's name, as `parse` reads it.
    pub const NAMES: [&'static str; 3] = ["none", "lz4_block", "zstd"];

    pub fn parse(text: &str) -> Result<Compressor, NydusError> {
        match text {
            "none" => Ok(Compressor::None),
            "lz4_block" => Ok(Compressor::Lz4Block),
            "zstd" => Ok(Compressor::Zstd),
            other => Err(NydusError::UnknownCompressor(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compressor::None => "none",
            Compressor::Lz4Block => "lz4_block",
            Compressor::Zstd => "zstd",
        }
    }

    fn algorithm(self) -> compress::Algorithm {
        match self {
            Compressor::None => compress::Algorithm::None,
            Compressor::Lz4Block => compress::Algorithm::Lz4Block,
            Compressor::Zstd => compress::Algorithm::Zstd,
        }
    }
}

/// How images are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RafsOptions {
    /// 5 or 6.
    pub fs_version: u32,
    pub compressor: Compressor,
}

impl RafsOptions {
    fn version(&self) -> Result<RafsVersion, NydusError> {
        match self.fs_version {
            5 => Ok(RafsVersion::V5),
            6 => Ok(RafsVersion::V6),
            other => Err(NydusError::UnknownVersion(other)),
        }
    }
}

/// The id of a Nydus blob as a bootstrap's blob table or a layer digest
/// names it: the 64 lowercase hex of the blob's sha256. A bootstrap comes
/// from a registry and may name anything; [`BlobId::parse`] is the only way
/// to make one, so a `BlobId` is safe to use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobId(String);

/// A blob id that is not 64 lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid nydus blob id {id:?}: a blob id is the 64 lowercase hex of the blob's sha256")]
pub struct InvalidBlobId {
    /// The refused id, cut to 100 characters.
    pub id: String,
}

impl BlobId {
    pub fn parse(id: &str) -> Result<BlobId, InvalidBlobId> {
        if crate::oci::digest::is_sha256_hex(id) {
            Ok(BlobId(id.to_string()))
        } else {
            Err(InvalidBlobId {
                id: id.chars().take(100).collect(),
            })
        }
    }

    /// The blob whose layer digest is `digest` (`sha256:<id>`).
    pub fn from_digest(digest: &str) -> Result<BlobId, InvalidBlobId> {
        match digest.strip_prefix("sha256:") {
            Some(hex) => BlobId::parse(hex),
            None => Err(InvalidBlobId {
                id: digest.chars().take(100).collect(),
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A data blob written by a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RafsBlob {
    pub path: PathBuf,
    /// The blob id of the bootstrap's blob table: the hex sha256 of the file,
    /// so the layer's digest is `sha256:<blob_id>`.
    pub blob_id: String,
    pub size: u64,
}

impl RafsBlob {
    pub fn digest(&self) -> String {
        format!("sha256:{}", self.blob_id)
    }
}

/// What a build wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RafsBuild {
    /// The whole image's bootstrap.
    pub bootstrap: PathBuf,
    /// The layer's data blobs (one per part it was split into for a parallel
    /// build); none when the layer adds no file data.
    pub blobs: Vec<RafsBlob>,
    /// Blob ids of the bootstrap's blob table, in order.
    pub blob_ids: Vec<String>,
}

/// One layer built on its own: its bootstrap (its whiteouts kept as
/// entries, for a merge to apply) and its blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBuild {
    pub bootstrap: PathBuf,
    /// None when the layer adds no file data.
    pub blob: Option<RafsBlob>,
}

/// A layer is split for a parallel build only when each part gets at least
/// this much file data: below it, a thread costs more than it saves.
pub const MIN_PART_BYTES: u64 = 16 << 20;

/// Builds the RAFS filesystem of the OCI layer `tar` (plain, or gzip which
/// is built in one piece) on top of `parent` (a bootstrap, or none for a
/// first layer). Writes the whole image's bootstrap to `bootstrap` and the
/// blobs into `blob_dir`, named by their ids.
///
/// nydus-builder compresses on one thread, so a layer with enough file data
/// is split into one part per core (see [`split_tar`]), the parts are built
/// at once, each against the parent's chunks, and merged in order.
pub fn build_from_tar(
    tar: &Path,
    parent: Option<&Path>,
    options: &RafsOptions,
    bootstrap: &Path,
    blob_dir: &Path,
) -> Result<RafsBuild, NydusError> {
    options.version()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parts_dir = bootstrap.with_extension("parts");
    let built = split_tar(tar, cores, MIN_PART_BYTES, &parts_dir)
        .and_then(|parts| build_from_parts(&parts, parent, options, bootstrap, blob_dir));
    let _ = std::fs::remove_dir_all(&parts_dir);
    built
}

/// Builds the parts of one layer (tars that stacked in order make it, as
/// [`split_tar`] or the layer builder's parts write them) at once, each
/// against the parent's chunks, and merges them onto `parent`.
pub fn build_from_parts(
    parts: &[PathBuf],
    parent: Option<&Path>,
    options: &RafsOptions,
    bootstrap: &Path,
    blob_dir: &Path,
) -> Result<RafsBuild, NydusError> {
    let layers = build_layers_parallel(parts, parent, options, blob_dir)?;
    let merged = merge_layers(parent, &layers, parent, bootstrap);
    for layer in &layers {
        let _ = std::fs::remove_file(&layer.bootstrap);
    }
    Ok(RafsBuild {
        bootstrap: bootstrap.to_path_buf(),
        blobs: layers.into_iter().filter_map(|l| l.blob).collect(),
        blob_ids: merged?,
    })
}

/// Builds each tar as a layer of its own (against `chunk_dict`), as many at
/// once as there are cores; results in the tars' order.
pub fn build_layers_parallel(
    tars: &[PathBuf],
    chunk_dict: Option<&Path>,
    options: &RafsOptions,
    blob_dir: &Path,
) -> Result<Vec<LayerBuild>, NydusError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(tars.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<LayerBuild, NydusError>>>> = tars.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(tar) = tars.get(i) else { break };
                let built = build_layer(tar, chunk_dict, options, &tar.with_extension("layer"), blob_dir);
                // Only a panic in this closure could poison the slot, and
                // the scope re-raises that panic anyway.
                *results[i].lock().expect("result slot") = Some(built);
            });
        }
    });
    results
        .into_iter()
        .zip(tars)
        .map(|(slot, tar)| {
            slot.into_inner().expect("result slot").unwrap_or_else(|| {
                Err(NydusError::Build {
                    source_path: tar.display().to_string(),
                    message: "the build did not run".into(),
                })
            })
        })
        .collect()
}

/// Splits a plain layer tar into at most `max_parts` tars in `dir`, each
/// with at least `min_part_bytes` of file data, that,
/// built in order and merged, make the same filesystem: regular files with
/// data are spread over the parts by size; everything else (whiteouts and
/// opaque markers, which must apply before any part adds to a directory,
/// links and the files they link to, special files) stays in the first part;
/// every part repeats the directories, so no part makes one up with default
/// metadata. Returns `[tar]` itself when splitting does not pay.
pub fn split_tar(tar: &Path, max_parts: usize, min_part_bytes: u64, dir: &Path) -> Result<Vec<PathBuf>, NydusError> {
    let unsplit = Ok(vec![tar.to_path_buf()]);
    let mut magic = [0u8; 2];
    let mut file = std::fs::File::open(tar).map_err(io_error(tar))?;
    if file.read(&mut magic).map_err(io_error(tar))? == 2 && magic == [0x1f, 0x8b] {
        return unsplit;
    }
    // Pass 1: which entries can move, and how much data there is.
    let mut link_targets = std::collections::HashSet::new();
    let mut movable = Vec::new();
    {
        let mut archive = tar::Archive::new(std::fs::File::open(tar).map_err(io_error(tar))?);
        for (index, entry) in archive.entries().map_err(io_error(tar))?.enumerate() {
            let entry = entry.map_err(io_error(tar))?;
            let kind = entry.header().entry_type();
            if kind == tar::EntryType::Link {
                if let Some(target) = entry.link_name().map_err(io_error(tar))? {
                    link_targets.insert(target.into_owned());
                }
            }
            let path = entry.path().map_err(io_error(tar))?.into_owned();
            let whiteout = path
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b".wh."));
            if kind == tar::EntryType::Regular && entry.size() > 0 && !whiteout {
                movable.push((index, path, entry.size()));
            }
        }
    }
    movable.retain(|(_, path, _)| !link_targets.contains(path));
    let total: u64 = movable.iter().map(|(_, _, size)| size).sum();
    let parts = ((total / min_part_bytes.max(1)) as usize).clamp(1, max_parts.max(1));
    if parts == 1 {
        return unsplit;
    }
    // Largest first onto the emptiest part balances the parts' data.
    movable.sort_by_key(|m| std::cmp::Reverse(m.2));
    let mut loads = vec![0u64; parts];
    let mut part_of = std::collections::HashMap::new();
    for (index, _, size) in &movable {
        let (part, _) = loads
            .iter()
            .enumerate()
            .min_by_key(|(_, load)| **load)
            .expect("at least two parts");
        loads[part] += size;
        part_of.insert(*index, part);
    }

    // Pass 2: write the parts.
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let paths: Vec<PathBuf> = (0..parts).map(|i| dir.join(format!("part-{i}.tar"))).collect();
    let mut builders = Vec::new();
    for path in &paths {
        builders.push(tar::Builder::new(std::fs::File::create(path).map_err(io_error(path))?));
    }
    let mut archive = tar::Archive::new(std::fs::File::open(tar).map_err(io_error(tar))?);
    for (index, entry) in archive.entries().map_err(io_error(tar))?.enumerate() {
        let mut entry = entry.map_err(io_error(tar))?;
        let kind = entry.header().entry_type();
        let targets: Vec<usize> = if kind == tar::EntryType::Directory {
            (0..parts).collect()
        } else {
            vec![part_of.get(&index).copied().unwrap_or(0)]
        };
        let path = entry.path().map_err(io_error(tar))?.into_owned();
        let link = entry.link_name().map_err(io_error(tar))?.map(|l| l.into_owned());
        // Extended headers other than the ones the builder writes itself
        // (long names, sizes) carry xattrs, nanosecond times, big ids.
        let mut pax = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(io_error(tar))? {
            for extension in extensions {
                let extension = extension.map_err(io_error(tar))?;
                let key = extension.key().map_err(|e| io_error(tar)(std::io::Error::other(e)))?;
                if !matches!(key, "path" | "linkpath" | "size") {
                    pax.push((key.to_string(), extension.value_bytes().to_vec()));
                }
            }
        }
        let mut data = Vec::new();
        if kind == tar::EntryType::Regular && targets.len() == 1 {
            // Streamed below instead of buffered.
        } else if entry.size() > MAX_BUFFERED_MEMBER {
            return Err(NydusError::TooLarge {
                path: format!("{}: member {} (type {:?})", tar.display(), path.display(), kind),
                limit: MAX_BUFFERED_MEMBER,
            });
        } else {
            (&mut entry)
                .take(MAX_BUFFERED_MEMBER)
                .read_to_end(&mut data)
                .map_err(io_error(tar))?;
        }
        let mut header = entry.header().clone();
        for &part in &targets {
            let builder = &mut builders[part];
            let out = &paths[part];
            builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(io_error(out))?;
            let written = match (&link, kind) {
                (Some(target), tar::EntryType::Link | tar::EntryType::Symlink) => {
                    builder.append_link(&mut header, &path, target)
                }
                (_, tar::EntryType::Regular) if targets.len() == 1 => {
                    builder.append_data(&mut header, &path, &mut entry)
                }
                _ => builder.append_data(&mut header, &path, data.as_slice()),
            };
            written.map_err(io_error(out))?;
        }
    }
    for (builder, path) in builders.into_iter().zip(&paths) {
        builder
            .into_inner()
            .and_then(|mut f| f.flush())
            .map_err(io_error(path))?;
    }
    Ok(paths)
}

/// Builds the layer `tar` on its own into `bootstrap` and `blob_dir`. Chunks
/// that `chunk_dict` (a bootstrap) has are referenced, not written again; a
/// merge must then be given the same dictionary.
pub fn build_layer(
    tar: &Path,
    chunk_dict: Option<&Path>,
    options: &RafsOptions,
    bootstrap: &Path,
    blob_dir: &Path,
) -> Result<LayerBuild, NydusError> {
    let version = options.version()?;
    std::fs::create_dir_all(blob_dir).map_err(io_error(blob_dir))?;
    let failed = |e: anyhow::Error| NydusError::Build {
        source_path: tar.display().to_string(),
        message: format!("{e:#}"),
    };
    let (digester, dict_ids) = match chunk_dict {
        Some(dict) => {
            let rs = load_bootstrap(dict)?;
            let ids: Vec<String> = rs.superblock.get_blob_infos().iter().map(|b| b.blob_id()).collect();
            (rs.meta.get_digester(), ids)
        }
        None => (digest::Algorithm::Sha256, Vec::new()),
    };
    let mut ctx = build_context(options, version, digester, tar, blob_dir).map_err(failed)?;
    let mut bootstrap_mgr = BootstrapManager::new(Some(ArtifactStorage::SingleFile(bootstrap.to_path_buf())), None);
    let mut blob_mgr = BlobManager::new(digester, false);
    if let Some(dict) = chunk_dict {
        let config = RafsSuperConfig {
            compressor: options.compressor.algorithm(),
            digester,
            chunk_size: CHUNK_SIZE,
            batch_size: 0,
            explicit_uidgid: true,
            version,
            is_tarfs_mode: false,
        };
        let dict = HashChunkDict::from_bootstrap_file(dict, Arc::new(ConfigV2::default()), &config)
            .map_err(|e| failed(e.context("chunk dictionary")))?;
        blob_mgr.set_chunk_dict(Arc::new(dict));
    }
    let output = TarballBuilder::new(ConversionType::TarToRafs)
        .build(&mut ctx, &mut bootstrap_mgr, &mut blob_mgr)
        .map_err(failed)?;
    // The blob table lists the dictionary's blobs the layer's chunks share
    // too; the one not among them is the layer's own. The builder names it
    // by a hash of its own, but nydusd fetches a blob from a registry by its
    // id: it is renamed to the sha256 of the file (the layer digest), and the
    // merge writes that id into the bootstrap.
    let own: Vec<&String> = output.blobs.iter().filter(|id| !dict_ids.contains(id)).collect();
    let blob = match own.as_slice() {
        [] => None,
        [builder_id] => {
            let written = blob_dir.join(builder_id);
            let blob_id = sha256_file(&written)?;
            let path = blob_dir.join(&blob_id);
            std::fs::rename(&written, &path).map_err(io_error(&written))?;
            let size = std::fs::metadata(&path).map_err(io_error(&path))?.len();
            Some(RafsBlob { path, blob_id, size })
        }
        more => {
            return Err(NydusError::Build {
                source_path: tar.display().to_string(),
                message: format!("the build wrote {} blobs, one expected", more.len()),
            })
        }
    };
    Ok(LayerBuild {
        bootstrap: bootstrap.to_path_buf(),
        blob,
    })
}

/// Merges `layers` (bottom first) onto `parent` into the image bootstrap
/// `out`, as `nydus-image merge --blob-digests` does; returns the blob ids of
/// its blob table.
pub fn merge_layers(
    parent: Option<&Path>,
    layers: &[LayerBuild],
    chunk_dict: Option<&Path>,
    out: &Path,
) -> Result<Vec<String>, NydusError> {
    let failed = |e: anyhow::Error| NydusError::Build {
        source_path: out.display().to_string(),
        message: format!("merge: {e:#}"),
    };
    // Only layers with a blob of their own consult these lists.
    let no_blob = "0".repeat(64);
    let digests = layers
        .iter()
        .map(|l| l.blob.as_ref().map_or(no_blob.clone(), |b| b.blob_id.clone()))
        .collect();
    let sizes = layers.iter().map(|l| l.blob.as_ref().map_or(0, |b| b.size)).collect();
    // The merge takes version, compressor and digester from the layers.
    let options = RafsOptions {
        fs_version: 6,
        compressor: Compressor::None,
    };
    let mut ctx = build_context(
        &options,
        RafsVersion::V6,
        digest::Algorithm::Sha256,
        out,
        Path::new("/"),
    )
    .map_err(failed)?;
    let merged = Merger::merge(
        &mut ctx,
        parent.map(|p| p.display().to_string()),
        layers.iter().map(|l| l.bootstrap.clone()).collect(),
        Some(digests),
        None,
        Some(sizes),
        None,
        None,
        ArtifactStorage::SingleFile(out.to_path_buf()),
        chunk_dict.map(Path::to_path_buf),
        Arc::new(ConfigV2::default()),
    )
    .map_err(failed)?;
    Ok(merged.blobs)
}

fn build_context(
    options: &RafsOptions,
    version: RafsVersion,
    digester: digest::Algorithm,
    source: &Path,
    blob_dir: &Path,
) -> anyhow::Result<BuildContext> {
    let mut ctx = BuildContext::new(
        String::new(),
        // RAFS v6 addresses chunks in 4 KiB blocks of the uncompressed blob.
        version == RafsVersion::V6,
        0,
        options.compressor.algorithm(),
        digester,
        true,
        WhiteoutSpec::Oci,
        ConversionType::TarToRafs,
        source.to_path_buf(),
        Prefetch::new(PrefetchPolicy::None)?,
        Some(ArtifactStorage::FileDir((blob_dir.to_path_buf(), String::new()))),
        None,
        false,
        Features::try_from("blob-toc")?,
        false,
        Default::default(),
    );
    ctx.set_fs_version(version);
    ctx.set_chunk_size(CHUNK_SIZE);
    ctx.set_configuration(Arc::new(ConfigV2::default()));
    Ok(ctx)
}

/// Hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String, NydusError> {
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_error(path))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Loads and validates a bootstrap, as nydusd would.
pub fn load_bootstrap(path: &Path) -> Result<RafsSuper, NydusError> {
    RafsSuper::load_from_file(path, Arc::new(ConfigV2::default()), false)
        .map(|(rs, _)| rs)
        .map_err(|e| NydusError::InvalidBootstrap {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// The RAFS version (5 or 6) of a bootstrap.
pub fn bootstrap_fs_version(path: &Path) -> Result<u32, NydusError> {
    let rs = load_bootstrap(path)?;
    match RafsVersion::try_from(rs.meta.version) {
        Ok(RafsVersion::V5) => Ok(5),
        Ok(RafsVersion::V6) => Ok(6),
        Err(e) => Err(NydusError::InvalidBootstrap {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

/// The annotations of a data blob layer, as nydusify writes them (the blob
/// is stored uncompressed as a layer, so its uncompressed digest is its own).
pub fn blob_annotations(digest: &str) -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([
        (ANNOTATION_BLOB.to_string(), "true".to_string()),
        (ANNOTATION_UNCOMPRESSED.to_string(), digest.to_string()),
    ])
}

/// One entry of a bootstrap's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Absolute, "/" for the root.
    pub path: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Symlink target.
    pub target: Option<PathBuf>,
}

/// Every entry of the filesystem a bootstrap describes, depth first.
pub fn bootstrap_tree(path: &Path) -> Result<Vec<TreeEntry>, NydusError> {
    let rs = load_bootstrap(path)?;
    let mut entries = Vec::new();
    let root = rs.superblock.root_ino();
    rs.walk_directory::<PathBuf>(root, None, &mut |inode, path| {
        if path.file_name().is_some_and(|n| n == "." || n == "..") {
            return Ok(());
        }
        let attr = inode.get_attr();
        entries.push(TreeEntry {
            path: path.to_path_buf(),
            mode: attr.mode,
            uid: attr.uid,
            gid: attr.gid,
            size: attr.size,
            target: inode.is_symlink().then(|| inode.get_symlink()).transpose()?.map(|t| {
                use std::os::unix::ffi::OsStrExt;
                PathBuf::from(std::ffi::OsStr::from_bytes(t.as_bytes()))
            }),
        });
        Ok(())
    })
    .map_err(|e| NydusError::InvalidBootstrap {
        path: path.display().to_string(),
        message: format!("{e:#}"),
    })?;
    Ok(entries)
}

/// The bootstrap layer written by [`pack_bootstrap_layer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapLayer {
    pub path: PathBuf,
    /// `sha256:` of the gzipped tar.
    pub digest: String,
    /// `sha256:` of the tar.
    pub diff_id: String,
    pub size: u64,
}

/// Writes `bootstrap` as a gzipped tar holding `image/image.boot` to `out`,
/// reproducibly (fixed times and owners).
pub fn pack_bootstrap_layer(bootstrap: &Path, out: &Path) -> Result<BootstrapLayer, NydusError> {
    let data = std::fs::read(bootstrap).map_err(io_error(bootstrap))?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(0);
    let mut file = tar::Header::new_ustar();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o644);
    file.set_size(data.len() as u64);
    file.set_mtime(0);
    let appended = tar
        .append_data(&mut dir, "image/", std::io::empty())
        .and_then(|()| tar.append_data(&mut file, BOOTSTRAP_IN_LAYER, data.as_slice()))
        .and_then(|()| tar.into_inner());
    let tar_bytes = appended.map_err(io_error(out))?;
    let diff_id = format!("sha256:{:x}", Sha256::digest(&tar_bytes));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar_bytes).map_err(io_error(out))?;
    let compressed = gz.finish().map_err(io_error(out))?;
    std::fs::write(out, &compressed).map_err(io_error(out))?;
    Ok(BootstrapLayer {
        path: out.to_path_buf(),
        digest: format!("sha256:{:x}", Sha256::digest(&compressed)),
        diff_id,
        size: compressed.len() as u64,
    })
}

/// Reads the bootstrap out of a bootstrap layer (gzipped tar) into `out`.
pub fn unpack_bootstrap_layer(layer: &Path, out: &Path) -> Result<(), NydusError> {
    unpack_bootstrap_bounded(layer, out, MAX_BOOTSTRAP_BYTES)
}

fn unpack_bootstrap_bounded(layer: &Path, out: &Path, limit: u64) -> Result<(), NydusError> {
    let file = std::fs::File::open(layer).map_err(io_error(layer))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in archive.entries().map_err(io_error(layer))? {
        let mut entry = entry.map_err(io_error(layer))?;
        let path = entry.path().map_err(io_error(layer))?.into_owned();
        if path == Path::new(BOOTSTRAP_IN_LAYER) {
            // The layer comes from a registry: its gzip may inflate to
            // anything, so the copy stops one byte past the bound.
            let mut file = std::fs::File::create(out).map_err(io_error(out))?;
            let copied = std::io::copy(&mut (&mut entry).take(limit + 1), &mut file).map_err(io_error(layer))?;
            if copied > limit {
                drop(file);
                let _ = std::fs::remove_file(out);
                return Err(NydusError::TooLarge {
                    path: format!("{}:{BOOTSTRAP_IN_LAYER}", layer.display()),
                    limit,
                });
            }
            return file.sync_all().map_err(io_error(out));
        }
    }
    Err(NydusError::InvalidBootstrap {
        path: layer.display().to_string(),
        message: format!("the layer holds no {BOOTSTRAP_IN_LAYER}"),
    })
}

/// Incompressible test bytes (xorshift from `state`), so that a blob's size
/// shows whether it holds the data and a wrong chunk offset shows.
#[cfg(test)]
pub(crate) fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// One entry of a test tar: path, type, content, link target.
#[cfg(test)]
pub(crate) type TestEntry<'a> = (&'a str, tar::EntryType, &'a [u8], &'a str);

/// Writes a tar of `entries` owned by `owner` (uid, gid), directories 0755,
/// the rest 0644, for tests of the builders.
#[cfg(test)]
pub(crate) fn write_test_tar(path: &Path, entries: &[TestEntry<'_>], owner: (u64, u64)) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(*kind);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        builder.append_data(&mut h, name, *data).unwrap();
    }
    builder.finish().unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tar(path: &Path, entries: &[TestEntry<'_>]) {
        write_test_tar(path, entries, (1000, 1001));
    }

    #[test]
    fn blob_ids_are_64_lowercase_hex_and_nothing_else() {
        let good = "0123456789abcdef".repeat(4);
        assert_eq!(BlobId::parse(&good).unwrap().as_str(), good);
        assert_eq!(
            BlobId::from_digest(&format!("sha256:{good}")).unwrap().to_string(),
            good
        );
        let traversing = format!("../../../outside/{}", "x".repeat(47));
        for bad in [
            traversing.as_str(),
            "",
            "/etc/passwd",
            &good.to_uppercase(),
            &good[1..],
            &format!("{good}0"),
            &format!("{}/{}", &good[..31], &good[32..]),
            &format!("{}.", &good[..63]),
        ] {
            let err = BlobId::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "names the id: {err}");
        }
        assert!(BlobId::from_digest(&good).is_err(), "a digest has its algorithm");
        assert!(BlobId::from_digest(&format!("sha512:{good}")).is_err());
        let long = "a".repeat(1000);
        assert_eq!(BlobId::parse(&long).unwrap_err().id.len(), 100, "cut for messages");
    }

    #[test]
    fn a_bootstrap_layer_is_unpacked_whole_or_refused_when_it_inflates_past_the_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let boot = tmp.path().join("boot");
        std::fs::write(&boot, b"not really a bootstrap").unwrap();
        let layer = pack_bootstrap_layer(&boot, &tmp.path().join("layer.tar.gz")).unwrap();
        let out = tmp.path().join("out");
        unpack_bootstrap_layer(&layer.path, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"not really a bootstrap");

        // Past the bound (small here, for speed): the copy stops one byte
        // past it and leaves nothing.
        let big = tmp.path().join("big");
        std::fs::write(&big, vec![0u8; 3 << 20]).unwrap();
        let bomb = pack_bootstrap_layer(&big, &tmp.path().join("bomb.tar.gz")).unwrap();
        assert!(bomb.size < 1 << 20, "zeros compress: {}", bomb.size);
        unpack_bootstrap_bounded(&bomb.path, &out, 3 << 20).unwrap();
        let err = unpack_bootstrap_bounded(&bomb.path, &out, (3 << 20) - 1).unwrap_err();
        assert!(matches!(err, NydusError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains(BOOTSTRAP_IN_LAYER), "{err}");
        assert!(!out.exists(), "nothing left of a refused bootstrap");
    }

    fn paths(tree: &[TreeEntry]) -> Vec<String> {
        tree.iter().map(|e| e.path.display().to_string()).collect()
    }

    #[test]
    fn layers_stack_on_their_parent_bootstrap() {
        let tmp = tempfile::tempdir().unwrap();
        // Incompressible, so a blob's size shows whether it holds the data.
        let big = noise(CHUNK_SIZE as usize + 4096, 0x2545_f491_4f6c_dd1d);
        let base = tmp.path().join("base.tar");
        write_tar(
            &base,
            &[
                ("etc/", tar::EntryType::Directory, b"", ""),
                ("etc/hosts", tar::EntryType::Regular, b"127.0.0.1 localhost\n", ""),
                ("etc/gone", tar::EntryType::Regular, b"x", ""),
                ("data/", tar::EntryType::Directory, b"", ""),
                ("data/old", tar::EntryType::Regular, b"old", ""),
                ("big", tar::EntryType::Regular, &big, ""),
                ("link", tar::EntryType::Symlink, b"", "etc/hosts"),
            ],
        );
        for (fs_version, compressor) in [(6, Compressor::Lz4Block), (5, Compressor::Zstd), (6, Compressor::None)] {
            let options = RafsOptions { fs_version, compressor };
            let out = tmp.path().join(format!("v{fs_version}-{compressor:?}"));
            let blobs = out.join("blobs");
            let first = build_from_tar(&base, None, &options, &out.join("base.boot"), &blobs).unwrap();
            let blob = first.blobs.first().cloned().expect("file data makes a blob");
            let on_disk = std::fs::read(&blob.path).unwrap();
            assert_eq!(on_disk.len() as u64, blob.size);
            assert_eq!(
                format!("{:x}", Sha256::digest(&on_disk)),
                blob.blob_id,
                "blob id is its sha256"
            );
            assert_eq!(first.blob_ids, vec![blob.blob_id.clone()]);
            assert_eq!(bootstrap_fs_version(&first.bootstrap).unwrap(), fs_version);
            let tree = bootstrap_tree(&first.bootstrap).unwrap();
            let names = paths(&tree);
            for expected in ["/", "/etc", "/etc/hosts", "/data/old", "/big", "/link"] {
                assert!(names.contains(&expected.to_string()), "{expected} in {names:?}");
            }
            let hosts = tree.iter().find(|e| e.path == Path::new("/etc/hosts")).unwrap();
            assert_eq!(
                (hosts.uid, hosts.gid, hosts.mode & 0o7777, hosts.size),
                (1000, 1001, 0o644, 20)
            );
            let link = tree.iter().find(|e| e.path == Path::new("/link")).unwrap();
            assert_eq!(link.target.as_deref(), Some(Path::new("etc/hosts")));

            // A second layer: a whiteout, an opaque directory, a new file
            // and the big file again (deduplicated against the parent).
            let upper = tmp.path().join(format!("upper-{fs_version}-{compressor:?}.tar"));
            write_tar(
                &upper,
                &[
                    ("etc/.wh.gone", tar::EntryType::Regular, b"", ""),
                    ("data/", tar::EntryType::Directory, b"", ""),
                    ("data/.wh..wh..opq", tar::EntryType::Regular, b"", ""),
                    ("data/new", tar::EntryType::Regular, b"new", ""),
                    ("copy", tar::EntryType::Regular, &big, ""),
                ],
            );
            let second = build_from_tar(
                &upper,
                Some(&first.bootstrap),
                &options,
                &out.join("upper.boot"),
                &blobs,
            )
            .unwrap();
            let names = paths(&bootstrap_tree(&second.bootstrap).unwrap());
            assert!(!names.contains(&"/etc/gone".to_string()), "whiteout applied: {names:?}");
            assert!(
                !names.contains(&"/data/old".to_string()),
                "opaque dir applied: {names:?}"
            );
            for expected in ["/etc/hosts", "/data/new", "/copy", "/big"] {
                assert!(names.contains(&expected.to_string()), "{expected} in {names:?}");
            }
            // Built on their own (as base layers are, in parallel) and merged
            // in one go: the same tree.
            let alone = build_layer(&upper, None, &options, &out.join("alone.layer"), &blobs).unwrap();
            let base_alone = build_layer(&base, None, &options, &out.join("base.layer"), &blobs).unwrap();
            let merged = out.join("merged.boot");
            let ids = merge_layers(None, &[base_alone.clone(), alone.clone()], None, &merged).unwrap();
            assert_eq!(ids.len(), 2, "{ids:?}");
            assert_eq!(ids[0], base_alone.blob.unwrap().blob_id);
            assert_eq!(paths(&bootstrap_tree(&merged).unwrap()), names);

            let upper_blob = second.blobs.first().cloned().expect("new file data");
            assert_eq!(second.blob_ids, vec![blob.blob_id.clone(), upper_blob.blob_id.clone()]);
            assert!(
                upper_blob.size < blob.size / 2,
                "the copy of a parent file is deduplicated: {} vs {}",
                upper_blob.size,
                blob.size
            );
        }
    }

    #[test]
    fn a_split_layer_builds_the_same_filesystem_in_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let options = RafsOptions {
            fs_version: 6,
            compressor: Compressor::Zstd,
        };
        let base = tmp.path().join("base.tar");
        write_tar(
            &base,
            &[
                ("d/", tar::EntryType::Directory, b"", ""),
                ("d/gone", tar::EntryType::Regular, b"gone", ""),
                ("o/", tar::EntryType::Directory, b"", ""),
                ("o/old", tar::EntryType::Regular, b"old", ""),
            ],
        );
        let parent = build_from_tar(
            &base,
            None,
            &options,
            &tmp.path().join("base.boot"),
            &tmp.path().join("b"),
        )
        .unwrap();
        let files: Vec<(String, Vec<u8>)> = (0..8)
            .map(|i| (format!("o/f{i}"), vec![i as u8; 3000 + i * 100]))
            .collect();
        let mut entries: Vec<TestEntry<'_>> = vec![
            ("d/", tar::EntryType::Directory, b"", ""),
            ("d/.wh.gone", tar::EntryType::Regular, b"", ""),
            ("o/", tar::EntryType::Directory, b"", ""),
            ("o/.wh..wh..opq", tar::EntryType::Regular, b"", ""),
            ("o/sub/", tar::EntryType::Directory, b"", ""),
            ("o/target", tar::EntryType::Regular, b"linked", ""),
            ("o/hard", tar::EntryType::Link, b"", "o/target"),
            ("o/sym", tar::EntryType::Symlink, b"", "target"),
        ];
        for (name, data) in &files {
            entries.push((name, tar::EntryType::Regular, data, ""));
        }
        let upper = tmp.path().join("upper.tar");
        write_tar(&upper, &entries);

        let parts = split_tar(&upper, 3, 4000, &tmp.path().join("parts")).unwrap();
        assert_eq!(parts.len(), 3, "{parts:?}");
        let names = |tar: &Path| -> Vec<String> {
            tar::Archive::new(std::fs::File::open(tar).unwrap())
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().display().to_string())
                .collect()
        };
        let first = names(&parts[0]);
        for kept in ["d/.wh.gone", "o/.wh..wh..opq", "o/target", "o/hard", "o/sym"] {
            assert!(
                first.contains(&kept.to_string()),
                "{kept} stays in the first part: {first:?}"
            );
        }
        for part in &parts {
            let listed = names(part);
            for dir in ["d", "o", "o/sub"] {
                assert!(
                    listed.iter().any(|n| n.trim_end_matches('/') == dir),
                    "{dir} in every part: {listed:?}"
                );
            }
        }
        let spread: usize = parts[1..]
            .iter()
            .map(|p| names(p).iter().filter(|n| n.starts_with("o/f")).count())
            .sum();
        assert!(spread > 0, "files spread over the parts");
        assert_eq!(
            split_tar(&upper, 3, 1 << 30, &tmp.path().join("none")).unwrap(),
            vec![upper.clone()],
            "too little data: not split"
        );

        let layers = build_layers_parallel(&parts, Some(&parent.bootstrap), &options, &tmp.path().join("b")).unwrap();
        let split = tmp.path().join("split.boot");
        merge_layers(Some(&parent.bootstrap), &layers, Some(&parent.bootstrap), &split).unwrap();
        let whole = build_from_tar(
            &upper,
            Some(&parent.bootstrap),
            &options,
            &tmp.path().join("whole.boot"),
            &tmp.path().join("b"),
        )
        .unwrap();
        let split_tree = bootstrap_tree(&split).unwrap();
        assert_eq!(split_tree, bootstrap_tree(&whole.bootstrap).unwrap());
        let listed = paths(&split_tree);
        assert!(
            !listed.contains(&"/d/gone".to_string()) && !listed.contains(&"/o/old".to_string()),
            "{listed:?}"
        );
        assert!(
            listed.contains(&"/o/f7".to_string()) && listed.contains(&"/o/hard".to_string()),
            "{listed:?}"
        );
        assert_eq!(layers.iter().filter(|l| l.blob.is_some()).count(), 3, "a blob per part");
    }

    #[test]
    fn bootstrap_layer_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let boot = tmp.path().join("boot");
        std::fs::write(&boot, b"bootstrap bytes").unwrap();
        let layer = pack_bootstrap_layer(&boot, &tmp.path().join("layer.tar.gz")).unwrap();
        let again = pack_bootstrap_layer(&boot, &tmp.path().join("again.tar.gz")).unwrap();
        assert_eq!(layer.digest, again.digest, "reproducible");
        assert_eq!(layer.size, std::fs::metadata(&layer.path).unwrap().len());
        let out = tmp.path().join("out");
        unpack_bootstrap_layer(&layer.path, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"bootstrap bytes");
        let err = unpack_bootstrap_layer(&boot, &out).unwrap_err();
        assert!(matches!(err, NydusError::Io { .. }), "{err}");
    }

    #[test]
    fn options_are_checked() {
        assert_eq!(Compressor::parse("lz4_block").unwrap(), Compressor::Lz4Block);
        assert!(Compressor::parse("gzip").is_err());
        let tmp = tempfile::tempdir().unwrap();
        let err = build_from_tar(
            Path::new("/nonexistent.tar"),
            None,
            &RafsOptions {
                fs_version: 4,
                compressor: Compressor::None,
            },
            &tmp.path().join("b"),
            tmp.path(),
        )
        .unwrap_err();
        assert!(matches!(err, NydusError::UnknownVersion(4)), "{err}");
        let Err(err) = load_bootstrap(&tmp.path().join("missing")) else {
            panic!("a missing bootstrap loads");
        };
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
