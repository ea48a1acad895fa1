//! Nydus images on the snapshotter side. Owns, under `<root>/nydus`:
//!
//! - `blobs/<hex>`: the data blobs of Nydus layers, fetched from the image's
//!   registry and verified against their digest (files 0600);
//! - `cache/<hex>`: each blob's chunks decompressed to their uncompressed
//!   offsets, the layout in which the kernel's erofs reads a RAFS v6 device,
//!   and `cache/<hex>.applied`, the bootstraps whose chunks it holds;
//! - `fuse-cache/<hex>.*`: the chunks of blob `<hex>` read so far by the
//!   FUSE server, at their uncompressed offsets, with nydus-storage's chunk
//!   map and the blob's chunk table;
//! - `mnt/<id>`: the read-only mount of the bootstrap of committed snapshot
//!   `id`, counted by the snapshots that use it and unmounted when the last
//!   one goes. Per [`FsDriver`], either the kernel's erofs with one cache
//!   file per blob as its devices, or the daemon's FUSE server reading
//!   chunks lazily (compressed blobs, RAFS v5).
//!
//! Every blob id reaches a path only as a [`BlobId`]: a bootstrap comes from
//! a registry, and one naming `../../etc/passwd` as a blob must be refused
//! before any file is opened, created or extended for it.
//!
//! It decides no snapshot rules: the snapshotter says which bootstrap to
//! mount for which snapshot, and which blobs are still referenced. Mounts go
//! through [`SystemOps`] and a [`FuseServer`], registry access through a
//! [`BlobSource`]. Every call blocks (downloads, decompression, mounts):
//! callers on an async runtime use `spawn_blocking`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use nydus_rafs::metadata::RafsSuper;
use nydus_utils::compress;
use nydus_utils::digest::{self, RafsDigest};
use tracing::{info, warn};

use crate::config::FsDriver;
use crate::error::{io_err, Classify, ErrorKind, IoError};
use crate::host::sys::{SysError, SystemOps};
use crate::nydus::fuse::{BlobBackend, FuseError, FuseServer, FuseSpec, LazyAuth, ServingProcess};
use crate::nydus::{self, BlobId, NydusError};
use crate::oci::registry::{RegistryAuth, RegistryClient, RegistryError, RegistryOptions, Scheme};

/// Blocks of RAFS v6 and of the kernel's view of a device.
const BLOCK_SIZE: u64 = 4096;
const BLOBS: &str = "blobs";
const CACHE: &str = "cache";
const FUSE_CACHE: &str = "fuse-cache";
pub(crate) const MOUNTS: &str = "mnt";

#[derive(Debug, thiserror::Error)]
pub enum RafsMountError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Nydus(#[from] NydusError),
    #[error(transparent)]
    Fuse(#[from] FuseError),
    #[error("fetching nydus blob {digest} of image {reference}: {source}")]
    Fetch {
        reference: String,
        digest: String,
        source: RegistryError,
    },
    #[error("invalid nydus blob digest {digest:?}: only sha256:<64 lowercase hex> is supported")]
    InvalidDigest { digest: String },
    #[error(
        "bootstrap {path} is RAFS v5, which the kernel cannot mount: only RAFS v6 Nydus images run on this snapshotter for now"
    )]
    UnsupportedVersion { path: String },
    #[error("bootstrap {path} cannot be served from blob cache files: {reason}")]
    UnsupportedBootstrap { path: String, reason: String },
    #[error("{context} names nydus blob id {id:?}, which is not the 64 lowercase hex of a sha256: refused")]
    InvalidBlobId { context: String, id: String },
    #[error("nydus blob {blob_id} is not on this host and no layer of the image says where to fetch it")]
    BlobMissing { blob_id: String },
    #[error("nydus blob {blob_id}: chunk at offset {offset}: {reason}")]
    CorruptChunk {
        blob_id: String,
        offset: u64,
        reason: String,
    },
}

impl Classify for RafsMountError {
    fn kind(&self) -> ErrorKind {
        match self {
            RafsMountError::Fetch { source, .. } => match source.kind() {
                // The layer's digest was malformed: the request's fault.
                ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
                ErrorKind::Unavailable => ErrorKind::Unavailable,
                _ => ErrorKind::FailedPrecondition,
            },
            RafsMountError::InvalidDigest { .. } | RafsMountError::InvalidBlobId { .. } => ErrorKind::InvalidArgument,
            RafsMountError::UnsupportedVersion { .. }
            | RafsMountError::UnsupportedBootstrap { .. }
            | RafsMountError::BlobMissing { .. } => ErrorKind::FailedPrecondition,
            RafsMountError::Io { .. }
            | RafsMountError::Sys(_)
            | RafsMountError::Nydus(_)
            | RafsMountError::Fuse(_)
            | RafsMountError::CorruptChunk { .. } => ErrorKind::Internal,
        }
    }
}

/// The hex of a `sha256:<hex>` digest.
pub fn digest_hex(digest: &str) -> Result<&str, RafsMountError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => Ok(hex),
        _ => Err(RafsMountError::InvalidDigest {
            digest: digest.chars().take(100).collect(),
        }),
    }
}

/// The blob of layer `digest` (`sha256:<hex>`).
fn blob_of_digest(digest: &str) -> Result<BlobId, RafsMountError> {
    BlobId::from_digest(digest).map_err(|_| RafsMountError::InvalidDigest {
        digest: digest.chars().take(100).collect(),
    })
}

/// The blob table of bootstrap `bootstrap` (of image `image`, when known),
/// in device order, every id checked before anything uses it.
fn bootstrap_blob_ids(rs: &RafsSuper, bootstrap: &Path, image: Option<&str>) -> Result<Vec<BlobId>, RafsMountError> {
    rs.superblock
        .get_blob_infos()
        .iter()
        .map(|info| {
            BlobId::parse(&info.blob_id()).map_err(|invalid| RafsMountError::InvalidBlobId {
                context: match image {
                    Some(image) => format!("bootstrap {} of image {image}", bootstrap.display()),
                    None => format!("bootstrap {}", bootstrap.display()),
                },
                id: invalid.id,
            })
        })
        .collect()
}

/// Where Nydus blobs come from.
pub trait BlobSource: Send + Sync + std::fmt::Debug {
    /// Writes blob `digest` of image `reference` to the new file `dest`,
    /// verified against the digest and bounded by the size the image
    /// declares for it; returns its size.
    fn fetch(&self, reference: &str, digest: &str, dest: &Path) -> Result<u64, RegistryError>;

    /// Where the FUSE server reads blobs of image `reference` chunk by
    /// chunk; None when blobs must be fetched whole first.
    fn lazy_backend(&self, _reference: &str) -> Option<BlobBackend> {
        None
    }
}

/// Blobs from the registry of the image they belong to, through the
/// endpoints its host configuration names, with the credentials its
/// credential source gives.
#[derive(Debug)]
pub struct RegistryBlobSource {
    secure: RegistryClient,
    insecure: RegistryClient,
    insecure_registries: Vec<String>,
}

impl RegistryBlobSource {
    /// `insecure_registries` ("host" or "host:port") are reached without
    /// trusted TLS (HTTPS with any certificate, then plain HTTP). Registries
    /// on loopback speak HTTPS or plain HTTP, as docker treats them: nothing
    /// can listen there but this host.
    pub fn new(insecure_registries: Vec<String>) -> Self {
        RegistryBlobSource::with_options(insecure_registries, RegistryOptions::default())
    }

    /// [`RegistryBlobSource::new`] with the host configuration and
    /// credential source of `options`.
    pub fn with_options(insecure_registries: Vec<String>, options: RegistryOptions) -> Self {
        RegistryBlobSource {
            secure: RegistryClient::new(RegistryOptions {
                insecure: false,
                ..options.clone()
            }),
            insecure: RegistryClient::new(RegistryOptions {
                insecure: true,
                ..options
            }),
            insecure_registries,
        }
    }

    fn is_insecure(&self, reference: &str) -> bool {
        let Ok(parsed) = oci_client::Reference::from_str(reference) else {
            // The pull reports the malformed reference.
            return false;
        };
        self.insecure_registries.iter().any(|r| r == parsed.registry())
    }
}

impl BlobSource for RegistryBlobSource {
    fn fetch(&self, reference: &str, digest: &str, dest: &Path) -> Result<u64, RegistryError> {
        let client = if self.is_insecure(reference) {
            &self.insecure
        } else {
            &self.secure
        };
        // The snapshotter's labels name the layer by digest only: its size,
        // the bound of the download, is the image manifest's.
        let pull = async {
            let size = client.layer_size(reference, digest, &RegistryAuth::Anonymous).await?;
            client
                .pull_blob_to(reference, digest, size, dest, &RegistryAuth::Anonymous)
                .await
        };
        // Called from the daemon's blocking pool, where the runtime's handle
        // may drive the download; tests and tools call it with no runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.block_on(pull),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io_err("blob file", dest))?
                .block_on(pull),
        }
    }

    /// The registry's one endpoint, read chunk by chunk, when nydus-storage
    /// can reach it as the registry client would, with the credentials the
    /// client's source gives for it. nydus-storage cannot be given a CA, a
    /// client certificate or a list of mirrors to fall back on: such images
    /// are fetched whole through the registry client, which can.
    fn lazy_backend(&self, reference: &str) -> Option<BlobBackend> {
        let parsed = oci_client::Reference::from_str(reference).ok()?;
        let insecure = self.is_insecure(reference);
        let client = if insecure { &self.insecure } else { &self.secure };
        let endpoints = client.endpoints_for(reference, false).ok()?;
        let [endpoint] = endpoints.as_slice() else {
            return None;
        };
        if !endpoint.ca.is_empty() || !endpoint.client.is_empty() {
            return None;
        }
        let auth = match &client.options().credentials {
            None => None,
            Some(source) => {
                let host = if endpoint.is_server {
                    parsed.registry()
                } else {
                    endpoint.host.as_str()
                };
                // A failing lookup is the whole fetch's to report.
                match source.credentials(host).ok()? {
                    None | Some(RegistryAuth::Anonymous) => None,
                    Some(RegistryAuth::Basic(user, password)) => {
                        Some(LazyAuth::Basic(base64(format!("{user}:{password}").as_bytes())))
                    }
                    Some(RegistryAuth::Bearer(token)) => Some(LazyAuth::Bearer(token)),
                }
            }
        };
        let (scheme, skip_verify) = match endpoint.scheme {
            Scheme::Http => ("http", false),
            // A loopback registry no file configures, as before host files.
            Scheme::Https if endpoint.http_fallback && !endpoint.skip_verify => ("http", false),
            Scheme::Https => ("https", insecure || endpoint.skip_verify),
        };
        Some(BlobBackend::Registry {
            host: endpoint.host.clone(),
            repository: parsed.repository().to_string(),
            scheme,
            skip_verify,
            auth,
        })
    }
}

/// Standard base64 with padding, as nydus-storage decodes its `auth`.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Where the blob layer `digest` of an image can be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobOrigin {
    pub reference: String,
    pub digest: String,
}

/// One chunk of a blob as a bootstrap references it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    pub compressed_offset: u64,
    pub compressed_size: u32,
    pub uncompressed_offset: u64,
    pub uncompressed_size: u32,
    pub compressed: bool,
    pub digest: RafsDigest,
}

/// The chunks of one blob that a bootstrap references, by uncompressed offset.
#[derive(Debug, Clone)]
pub struct BlobChunks {
    pub blob_id: BlobId,
    pub compressor: compress::Algorithm,
    pub digester: digest::Algorithm,
    pub uncompressed_size: u64,
    pub chunks: BTreeMap<u64, ChunkLocation>,
}

impl BlobChunks {
    /// Size of the cache file: the blob's uncompressed size, at least up to
    /// the end of its last chunk, in whole blocks.
    pub fn cache_size(&self) -> u64 {
        let end = self
            .chunks
            .values()
            .map(|c| c.uncompressed_offset + u64::from(c.uncompressed_size))
            .max()
            .unwrap_or(0);
        end.max(self.uncompressed_size).div_ceil(BLOCK_SIZE) * BLOCK_SIZE
    }
}

/// The blob table of a RAFS v6 bootstrap, in device order, with the chunks
/// the bootstrap's files use in each blob. RAFS v5 is refused: the kernel
/// cannot mount it.
pub fn read_chunk_table(bootstrap: &Path) -> Result<Vec<BlobChunks>, RafsMountError> {
    let rs = nydus::load_bootstrap(bootstrap)?;
    if rs.meta.is_v5() {
        return Err(RafsMountError::UnsupportedVersion {
            path: bootstrap.display().to_string(),
        });
    }
    let unsupported = |reason: String| RafsMountError::UnsupportedBootstrap {
        path: bootstrap.display().to_string(),
        reason,
    };
    let ids = bootstrap_blob_ids(&rs, bootstrap, None)?;
    let mut blobs: Vec<BlobChunks> = Vec::new();
    for (info, blob_id) in rs.superblock.get_blob_infos().iter().zip(ids) {
        if info.is_external() || info.cipher() != nydus_utils::crypt::Algorithm::None {
            return Err(unsupported(format!("blob {blob_id} is external or encrypted")));
        }
        blobs.push(BlobChunks {
            blob_id,
            compressor: info.compressor(),
            digester: info.digester(),
            uncompressed_size: info.uncompressed_size(),
            chunks: BTreeMap::new(),
        });
    }
    let mut problem = None;
    rs.walk_directory::<PathBuf>(rs.superblock.root_ino(), None, &mut |inode, path| {
        if !inode.is_reg() {
            return Ok(());
        }
        for idx in 0..inode.get_chunk_count() {
            let chunk = inode.get_chunk_info(idx)?;
            let Some(blob) = blobs.get_mut(chunk.blob_index() as usize) else {
                problem = Some(format!(
                    "{} has a chunk in blob {} past the blob table",
                    path.display(),
                    chunk.blob_index()
                ));
                return Ok(());
            };
            if chunk.is_batch() || chunk.is_encrypted() {
                problem = Some(format!("{} has batched or encrypted chunks", path.display()));
                return Ok(());
            }
            // Hard links and deduplicated files share chunks: kept once.
            blob.chunks.insert(
                chunk.uncompressed_offset(),
                ChunkLocation {
                    compressed_offset: chunk.compressed_offset(),
                    compressed_size: chunk.compressed_size(),
                    uncompressed_offset: chunk.uncompressed_offset(),
                    uncompressed_size: chunk.uncompressed_size(),
                    compressed: chunk.is_compressed(),
                    digest: *chunk.chunk_id(),
                },
            );
        }
        Ok(())
    })
    .map_err(|e| NydusError::InvalidBootstrap {
        path: bootstrap.display().to_string(),
        message: format!("{e:#}"),
    })?;
    if let Some(reason) = problem {
        return Err(unsupported(reason));
    }
    for blob in &blobs {
        if let Some(c) = blob.chunks.values().find(|c| c.uncompressed_offset % BLOCK_SIZE != 0) {
            return Err(unsupported(format!(
                "blob {} has a chunk at uncompressed offset {}, not {BLOCK_SIZE}-byte aligned as RAFS v6 needs",
                blob.blob_id, c.uncompressed_offset
            )));
        }
    }
    Ok(blobs)
}

/// Writes every chunk of `chunks` from the pushed blob `blob` (compressed or
/// packed without padding) into `cache` at its uncompressed offset, each
/// checked against its digest, so that `cache` is what the kernel reads as
/// the blob's device. Chunks already there are written again with the same
/// bytes, so the file may be filled for several bootstraps, even while one
/// of them is mounted.
pub fn build_cache_file(blob: &Path, chunks: &BlobChunks, cache: &Path) -> Result<(), RafsMountError> {
    let input = File::open(blob).map_err(io_err("open", blob))?;
    let output = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(cache)
        .map_err(io_err("open", cache))?;
    let size = chunks.cache_size();
    let current = output.metadata().map_err(io_err("stat", cache))?.len();
    if current < size {
        output.set_len(size).map_err(io_err("size", cache))?;
    }
    let corrupt = |c: &ChunkLocation, reason: String| RafsMountError::CorruptChunk {
        blob_id: chunks.blob_id.to_string(),
        offset: c.compressed_offset,
        reason,
    };
    let mut stored = Vec::new();
    let mut plain = Vec::new();
    for chunk in chunks.chunks.values() {
        stored.resize(chunk.compressed_size as usize, 0);
        input
            .read_exact_at(&mut stored, chunk.compressed_offset)
            .map_err(io_err("read", blob))?;
        let data: &[u8] = if chunk.compressed {
            plain.resize(chunk.uncompressed_size as usize, 0);
            let n = compress::decompress(&stored, &mut plain, chunks.compressor)
                .map_err(|e| corrupt(chunk, format!("does not decompress with {}: {e}", chunks.compressor)))?;
            if n != plain.len() {
                return Err(corrupt(
                    chunk,
                    format!("decompresses to {n} bytes, {} expected", plain.len()),
                ));
            }
            &plain
        } else {
            if chunk.compressed_size != chunk.uncompressed_size {
                return Err(corrupt(
                    chunk,
                    format!(
                        "is stored uncompressed in {} bytes but holds {}",
                        chunk.compressed_size, chunk.uncompressed_size
                    ),
                ));
            }
            &stored
        };
        if RafsDigest::from_buf(data, chunks.digester) != chunk.digest {
            return Err(corrupt(chunk, "does not match its digest".to_string()));
        }
        output
            .write_all_at(data, chunk.uncompressed_offset)
            .map_err(io_err("write", cache))?;
    }
    Ok(output.sync_all().map_err(io_err("sync", cache))?)
}

/// Creates `path` 0700 if missing and enforces the mode if present.
fn ensure_private_dir(path: &Path) -> Result<(), RafsMountError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err("create directory", path))?;
    Ok(fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", path))?)
}

fn remove_file_if_present(path: &Path) -> Result<(), RafsMountError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e).into()),
    }
}

/// Who holds a mount: snapshots by id, and creations under way (a snapshot
/// gets its id only once its record is written).
#[derive(Debug, Default)]
struct Users {
    snapshots: BTreeSet<u64>,
    pending: usize,
    /// The blobs of the mounted image: kept from cache eviction.
    blobs: Vec<BlobId>,
}

impl Users {
    fn is_empty(&self) -> bool {
        self.snapshots.is_empty() && self.pending == 0
    }
}

#[derive(Debug)]
pub struct RafsMounts {
    blobs: PathBuf,
    cache: PathBuf,
    fuse_cache: PathBuf,
    mounts: PathBuf,
    sys: Arc<dyn SystemOps>,
    source: Arc<dyn BlobSource>,
    driver: FsDriver,
    fuse: Arc<dyn FuseServer>,
    /// Bootstrap snapshot id -> its users. Held across mounting, unmounting
    /// and cache building, so a mount never goes while one is being taken.
    users: Mutex<HashMap<u64, Users>>,
    /// Held across a download and until its layer's record is written, so a
    /// sweep never deletes a blob that is about to be referenced. Taken after
    /// `users` when both are needed.
    fetching: Mutex<()>,
    /// Bytes the blobs and caches of images no container uses may take
    /// together with those in use; None: unbounded.
    cache_limit: Option<u64>,
}

/// How a RAFS mount point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    /// Served over FUSE by a process of ours.
    Served,
    /// Mounted with erofs (or a FUSE mount nobody of ours serves).
    Mounted,
    /// Its directory is there, nothing is mounted on it.
    NotMounted,
}

impl MountState {
    pub fn as_str(self) -> &'static str {
        match self {
            MountState::Served => "served",
            MountState::Mounted => "mounted",
            MountState::NotMounted => "not-mounted",
        }
    }
}

/// One RAFS mount point of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RafsMountStatus {
    pub bootstrap_id: u64,
    pub mountpoint: PathBuf,
    pub state: MountState,
    pub server: Option<ServingProcess>,
    /// Ids of the snapshots using it.
    pub users: Vec<u64>,
}

/// A blob on disk, kept from sweeps until this is dropped.
#[derive(Debug)]
pub struct FetchedBlob<'a> {
    pub path: PathBuf,
    _guard: MutexGuard<'a, ()>,
}

/// A reference to a mounted bootstrap taken before the snapshot using it has
/// an id: [`MountLease::bind`] hands it to the snapshot; dropped unbound, it
/// is released (and the mount goes if nothing else uses it).
#[derive(Debug)]
pub struct MountLease<'a> {
    mounts: &'a RafsMounts,
    bootstrap_id: u64,
    pub mountpoint: PathBuf,
    bound: bool,
}

impl MountLease<'_> {
    pub fn bind(mut self, snapshot_id: u64) {
        let mut users = self.mounts.lock_users();
        let entry = users.entry(self.bootstrap_id).or_default();
        entry.pending = entry.pending.saturating_sub(1);
        entry.snapshots.insert(snapshot_id);
        self.bound = true;
    }
}

impl Drop for MountLease<'_> {
    fn drop(&mut self) {
        if self.bound {
            return;
        }
        let mut users = self.mounts.lock_users();
        if let Some(entry) = users.get_mut(&self.bootstrap_id) {
            entry.pending = entry.pending.saturating_sub(1);
        }
        if let Err(e) = self.mounts.unmount_if_unused(&mut users, self.bootstrap_id) {
            warn!(bootstrap = self.bootstrap_id, error = %e, "RAFS mount left for cleanup");
        }
    }
}

impl RafsMounts {
    /// Opens (creating 0700) `<root>/nydus`. FUSE mounts a previous run
    /// left that `fuse` does not serve (it took over the serving processes
    /// still alive) are dead: they are detached, to be mounted again by
    /// whoever uses them.
    pub fn open(
        root: &Path,
        sys: Arc<dyn SystemOps>,
        source: Arc<dyn BlobSource>,
        driver: FsDriver,
        fuse: Arc<dyn FuseServer>,
    ) -> Result<RafsMounts, RafsMountError> {
        let base = root.join("nydus");
        let mounts = RafsMounts {
            blobs: base.join(BLOBS),
            cache: base.join(CACHE),
            fuse_cache: base.join(FUSE_CACHE),
            mounts: base.join(MOUNTS),
            sys,
            source,
            driver,
            fuse,
            users: Mutex::new(HashMap::new()),
            fetching: Mutex::new(()),
            cache_limit: None,
        };
        for dir in [&base, &mounts.blobs, &mounts.cache, &mounts.fuse_cache, &mounts.mounts] {
            ensure_private_dir(dir)?;
        }
        mounts.detach_dead_mounts()?;
        Ok(mounts)
    }

    /// Detaches the FUSE mounts under `mnt/` that no server of ours serves:
    /// their server (a previous run's) is gone. (A stat would not tell: the
    /// kernel answers from cached attributes for a while.)
    fn detach_dead_mounts(&self) -> Result<(), RafsMountError> {
        for path in self.sys.fuse_mounts_under(&self.mounts)? {
            if self.fuse.serves(&path) {
                continue;
            }
            self.sys.unmount(&path)?;
            warn!(mountpoint = %path.display(), "detached a RAFS FUSE mount left by a previous run");
        }
        Ok(())
    }

    /// Bounds what `<root>/nydus` keeps of blobs (whole blobs, erofs cache
    /// files, FUSE chunk caches) to `bytes`: past it, the blobs of images no
    /// container uses go, least recently used first (fetched again from
    /// their registry when an image needs them).
    pub fn with_cache_limit(mut self, bytes: u64) -> RafsMounts {
        self.cache_limit = Some(bytes);
        self
    }

    /// Whether blobs are fetched when their layer is pulled, rather than
    /// when (and as far as) an image's files are read.
    pub fn fetches_at_pull(&self) -> bool {
        self.driver == FsDriver::Erofs
    }

    /// Whether RAFS v5 images can run: only over FUSE.
    pub fn runs_rafs_v5(&self) -> bool {
        self.driver != FsDriver::Erofs
    }

    fn lock_users(&self) -> MutexGuard<'_, HashMap<u64, Users>> {
        // A panic while holding the map leaves it consistent: every change
        // is a single insert or removal.
        self.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_fetching(&self) -> MutexGuard<'_, ()> {
        self.fetching.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where the bootstrap of snapshot `bootstrap_id` is mounted.
    pub fn mountpoint(&self, bootstrap_id: u64) -> PathBuf {
        self.mounts.join(bootstrap_id.to_string())
    }

    pub fn blob_path(&self, blob_id: &BlobId) -> PathBuf {
        self.blobs.join(blob_id.as_str())
    }

    pub fn cache_path(&self, blob_id: &BlobId) -> PathBuf {
        self.cache.join(blob_id.as_str())
    }

    fn applied_path(&self, blob_id: &BlobId) -> PathBuf {
        self.cache.join(format!("{blob_id}.applied"))
    }

    /// Fetches blob `digest` of image `reference` unless it is here already.
    pub fn fetch_blob(&self, reference: &str, digest: &str) -> Result<FetchedBlob<'_>, RafsMountError> {
        let guard = self.lock_fetching();
        let path = self.fetch_locked(reference, digest)?;
        Ok(FetchedBlob { path, _guard: guard })
    }

    fn fetch_locked(&self, reference: &str, digest: &str) -> Result<PathBuf, RafsMountError> {
        let path = self.blob_path(&blob_of_digest(digest)?);
        if path.is_file() {
            return Ok(path);
        }
        let started = std::time::Instant::now();
        let size = self
            .source
            .fetch(reference, digest, &path)
            .map_err(|source| RafsMountError::Fetch {
                reference: reference.to_string(),
                digest: digest.to_string(),
                source,
            })?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", &path))?;
        info!(
            digest,
            reference,
            size,
            seconds = started.elapsed().as_secs_f64(),
            "fetched nydus blob"
        );
        Ok(path)
    }

    /// Mounts the RAFS v6 `bootstrap` of snapshot `bootstrap_id` unless it
    /// is mounted (after a restart, it may be gone), fetching missing blobs
    /// from `origins` and building their cache files, and counts a user.
    pub fn acquire(
        &self,
        bootstrap_id: u64,
        bootstrap: &Path,
        origins: &[BlobOrigin],
    ) -> Result<MountLease<'_>, RafsMountError> {
        let mut users = self.lock_users();
        let mountpoint = self.mountpoint(bootstrap_id);
        if !self.fuse.serves(&mountpoint) && !self.sys.is_mountpoint(&mountpoint)? {
            let rs = nydus::load_bootstrap(bootstrap)?;
            // Both servers name files after these ids (this module's cache
            // files, nydus-storage's chunk caches): checked before either.
            let image = origins.first().map(|o| o.reference.as_str());
            bootstrap_blob_ids(&rs, bootstrap, image)?;
            if self.serves_over_fuse(&rs, bootstrap)? {
                let backend = self.fuse_backend(&rs, bootstrap, origins)?;
                ensure_private_dir(&mountpoint)?;
                self.fuse.serve(&FuseSpec {
                    bootstrap: bootstrap.to_path_buf(),
                    backend,
                    cache_dir: self.fuse_cache.clone(),
                    mountpoint: mountpoint.clone(),
                })?;
            } else {
                let devices = self.prepare_devices(bootstrap, origins)?;
                ensure_private_dir(&mountpoint)?;
                let started = std::time::Instant::now();
                self.sys.mount_erofs(bootstrap, &devices, &mountpoint)?;
                info!(
                    bootstrap = %bootstrap.display(),
                    mountpoint = %mountpoint.display(),
                    blobs = devices.len(),
                    mount_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "mounted RAFS"
                );
            }
        }
        let entry = users.entry(bootstrap_id).or_default();
        entry.pending += 1;
        if entry.blobs.is_empty() {
            let image = origins.first().map(|o| o.reference.as_str());
            entry.blobs = bootstrap_blob_ids(&nydus::load_bootstrap(bootstrap)?, bootstrap, image)?;
        }
        if let Err(e) = self.evict_over_limit(&users) {
            warn!(error = %e, "cannot bound the nydus blob cache");
        }
        Ok(MountLease {
            mounts: self,
            bootstrap_id,
            mountpoint,
            bound: false,
        })
    }

    /// Whether `bootstrap` is served over FUSE rather than mounted with
    /// erofs, per the driver: "auto" leaves to erofs only what it mounts
    /// without a decompressed copy of each blob, RAFS v6 with blobs stored
    /// uncompressed.
    fn serves_over_fuse(&self, rs: &RafsSuper, bootstrap: &Path) -> Result<bool, RafsMountError> {
        let v5 = rs.meta.is_v5();
        Ok(match self.driver {
            FsDriver::Fuse => true,
            FsDriver::Erofs if v5 => {
                return Err(RafsMountError::UnsupportedVersion {
                    path: bootstrap.display().to_string(),
                })
            }
            FsDriver::Erofs => false,
            FsDriver::Auto => {
                v5 || rs
                    .superblock
                    .get_blob_infos()
                    .iter()
                    .any(|b| b.compressor() != compress::Algorithm::None)
            }
        })
    }

    /// Where the FUSE server reads the blobs of `bootstrap`: this host's
    /// blob directory when every blob is here; otherwise the registry of the
    /// image, chunk by chunk. Blobs of several repositories (or a source
    /// with no lazy access) are fetched whole first.
    fn fuse_backend(
        &self,
        rs: &RafsSuper,
        bootstrap: &Path,
        origins: &[BlobOrigin],
    ) -> Result<BlobBackend, RafsMountError> {
        let mut missing = Vec::new();
        let image = origins.first().map(|o| o.reference.as_str());
        for blob_id in bootstrap_blob_ids(rs, bootstrap, image)? {
            if self.blob_path(&blob_id).is_file() {
                continue;
            }
            let origin = origins
                .iter()
                .find(|o| o.digest.strip_prefix("sha256:") == Some(blob_id.as_str()))
                .ok_or_else(|| RafsMountError::BlobMissing {
                    blob_id: blob_id.to_string(),
                })?;
            missing.push(origin);
        }
        let local = BlobBackend::Local {
            dir: self.blobs.clone(),
        };
        let Some(first) = missing.first() else {
            return Ok(local);
        };
        if let Some(lazy) = self.source.lazy_backend(&first.reference) {
            if missing
                .iter()
                .all(|o| self.source.lazy_backend(&o.reference).as_ref() == Some(&lazy))
            {
                return Ok(lazy);
            }
        }
        let _guard = self.lock_fetching();
        for origin in missing {
            self.fetch_locked(&origin.reference, &origin.digest)?;
        }
        Ok(local)
    }

    /// The cache file of every blob of `bootstrap`, in device order, each
    /// holding the chunks the bootstrap uses.
    fn prepare_devices(&self, bootstrap: &Path, origins: &[BlobOrigin]) -> Result<Vec<PathBuf>, RafsMountError> {
        let table = read_chunk_table(bootstrap)?;
        let bootstrap_digest = nydus::sha256_file(bootstrap)?;
        let mut devices = Vec::with_capacity(table.len());
        for blob in &table {
            let blob_file = self.blob_path(&blob.blob_id);
            if !blob_file.is_file() {
                let origin = origins
                    .iter()
                    .find(|o| o.digest.strip_prefix("sha256:") == Some(blob.blob_id.as_str()))
                    .ok_or_else(|| RafsMountError::BlobMissing {
                        blob_id: blob.blob_id.to_string(),
                    })?;
                let _guard = self.lock_fetching();
                self.fetch_locked(&origin.reference, &origin.digest)?;
            }
            let cache = self.cache_path(&blob.blob_id);
            let applied_file = self.applied_path(&blob.blob_id);
            if !cache.is_file() {
                remove_file_if_present(&applied_file)?;
            }
            let mut applied = read_applied(&applied_file)?;
            if !applied.contains(&bootstrap_digest) {
                let started = std::time::Instant::now();
                build_cache_file(&blob_file, blob, &cache)?;
                applied.insert(bootstrap_digest.clone());
                write_applied(&applied_file, &applied)?;
                info!(
                    blob = %blob.blob_id,
                    chunks = blob.chunks.len(),
                    build_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "built nydus blob cache file"
                );
            }
            devices.push(cache);
        }
        Ok(devices)
    }

    /// Snapshot `snapshot_id` no longer uses its mount (removed, or
    /// committed); the mount goes with its last user.
    pub fn release(&self, snapshot_id: u64) -> Result<(), RafsMountError> {
        let mut users = self.lock_users();
        let held: Vec<u64> = users
            .iter_mut()
            .filter_map(|(id, u)| u.snapshots.remove(&snapshot_id).then_some(*id))
            .collect();
        for bootstrap_id in held {
            self.unmount_if_unused(&mut users, bootstrap_id)?;
        }
        Ok(())
    }

    /// The bootstrap snapshot `bootstrap_id` is gone: its mount goes too.
    pub fn forget(&self, bootstrap_id: u64) -> Result<(), RafsMountError> {
        let mut users = self.lock_users();
        if users.get(&bootstrap_id).is_some_and(|u| !u.is_empty()) {
            warn!(
                bootstrap = bootstrap_id,
                "removing the bootstrap of a RAFS mount still in use"
            );
        }
        users.remove(&bootstrap_id);
        self.unmount_if_unused(&mut users, bootstrap_id)
    }

    /// Every RAFS mount point of this daemon, by bootstrap snapshot id: how
    /// it is mounted, who serves it, and which snapshots use it.
    pub fn status(&self) -> Result<Vec<RafsMountStatus>, RafsMountError> {
        let users = self.lock_users();
        let mut list = Vec::new();
        for entry in fs::read_dir(&self.mounts).map_err(io_err("read directory", &self.mounts))? {
            let entry = entry.map_err(io_err("read directory", &self.mounts))?;
            let Some(bootstrap_id) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let mountpoint = entry.path();
            let server = self.fuse.server_of(&mountpoint);
            let state = match server {
                Some(_) => MountState::Served,
                None if self.sys.is_mountpoint(&mountpoint)? => MountState::Mounted,
                None => MountState::NotMounted,
            };
            list.push(RafsMountStatus {
                bootstrap_id,
                mountpoint,
                state,
                server,
                users: users
                    .get(&bootstrap_id)
                    .map(|u| u.snapshots.iter().copied().collect())
                    .unwrap_or_default(),
            });
        }
        list.sort_by_key(|m| m.bootstrap_id);
        Ok(list)
    }

    /// Bytes on disk of what this host keeps of the blobs of `bootstrap`:
    /// whole blobs, erofs cache files and FUSE chunk caches.
    pub fn cache_bytes(&self, bootstrap: &Path) -> Result<u64, RafsMountError> {
        let rs = nydus::load_bootstrap(bootstrap)?;
        let ids = bootstrap_blob_ids(&rs, bootstrap, None)?;
        let allocated = |path: &Path| fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0);
        let mut bytes = 0;
        for id in &ids {
            bytes += allocated(&self.blob_path(id)) + allocated(&self.cache_path(id));
        }
        for entry in fs::read_dir(&self.fuse_cache).map_err(io_err("read directory", &self.fuse_cache))? {
            let entry = entry.map_err(io_err("read directory", &self.fuse_cache))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.split('.').next().unwrap_or_default();
            if ids.iter().any(|b| b.as_str() == id) {
                bytes += allocated(&entry.path());
            }
        }
        Ok(bytes)
    }

    /// The snapshots using the mount of `bootstrap_id`.
    pub fn users_of(&self, bootstrap_id: u64) -> Vec<u64> {
        self.lock_users()
            .get(&bootstrap_id)
            .map(|u| u.snapshots.iter().copied().collect())
            .unwrap_or_default()
    }

    fn unmount_if_unused(&self, users: &mut HashMap<u64, Users>, bootstrap_id: u64) -> Result<(), RafsMountError> {
        if users.get(&bootstrap_id).is_some_and(|u| !u.is_empty()) {
            return Ok(());
        }
        if let Some(gone) = users.remove(&bootstrap_id) {
            // Last used now: the eviction order is by last use.
            for blob in &gone.blobs {
                self.mark_used(blob);
            }
            if let Err(e) = self.evict_over_limit(users) {
                warn!(error = %e, "cannot bound the nydus blob cache");
            }
        }
        let mountpoint = self.mountpoint(bootstrap_id);
        if self.fuse.stop(&mountpoint)? {
            // Unmounted by the FUSE server.
        } else if self.sys.is_mountpoint(&mountpoint)? {
            self.sys.unmount(&mountpoint)?;
            info!(mountpoint = %mountpoint.display(), "unmounted RAFS");
        }
        match fs::remove_dir(&mountpoint) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &mountpoint)(e).into()),
        }
    }

    /// Sets the access time of every file of `blob` to now.
    fn mark_used(&self, blob: &BlobId) {
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        let omit = nix::sys::time::TimeSpec::UTIME_OMIT;
        for path in self.files_of(blob) {
            let _ = nix::sys::stat::utimensat(
                None,
                &path,
                &now,
                &omit,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            );
        }
    }

    /// The files this host keeps of `blob`, in every directory.
    fn files_of(&self, blob: &BlobId) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for dir in [&self.blobs, &self.cache, &self.fuse_cache] {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().split('.').next() == Some(blob.as_str()) {
                    files.push(entry.path());
                }
            }
        }
        files
    }

    /// Removes the blobs of images no mount uses, least recently used
    /// first, until what `<root>/nydus` keeps of blobs is within the limit.
    /// Returns how many went.
    fn evict_over_limit(&self, users: &HashMap<u64, Users>) -> Result<usize, RafsMountError> {
        let Some(limit) = self.cache_limit else {
            return Ok(0);
        };
        // Blob id -> bytes on disk and last use (latest access time).
        let mut kept: BTreeMap<String, (u64, std::time::SystemTime)> = BTreeMap::new();
        for dir in [&self.blobs, &self.cache, &self.fuse_cache] {
            for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
                let entry = entry.map_err(io_err("read directory", dir))?;
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                let id = entry
                    .file_name()
                    .to_string_lossy()
                    .split('.')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let (bytes, used) = kept.entry(id).or_insert((0, std::time::UNIX_EPOCH));
                *bytes += meta.blocks() * 512;
                for time in [meta.accessed(), meta.modified()].into_iter().flatten() {
                    *used = (*used).max(time);
                }
            }
        }
        let mut total: u64 = kept.values().map(|(bytes, _)| bytes).sum();
        if total <= limit {
            return Ok(0);
        }
        let in_use: BTreeSet<&str> = users
            .values()
            .flat_map(|u| u.blobs.iter().map(BlobId::as_str))
            .collect();
        let mut idle: Vec<(std::time::SystemTime, String, u64)> = kept
            .into_iter()
            .filter(|(id, _)| !in_use.contains(id.as_str()))
            .map(|(id, (bytes, used))| (used, id, bytes))
            .collect();
        idle.sort();
        let _fetching = self.lock_fetching();
        let mut evicted = 0;
        for (_, id, bytes) in idle {
            if total <= limit {
                break;
            }
            let Ok(blob) = BlobId::parse(&id) else {
                continue;
            };
            self.remove_blob_files(&blob)?;
            total = total.saturating_sub(bytes);
            evicted += 1;
            info!(blob = %blob, bytes, "evicted from the nydus blob cache (least recently used, no container uses it)");
        }
        if total > limit {
            warn!(
                bytes = total,
                limit, "the nydus blob cache is over its bound with blobs of images in use"
            );
        }
        Ok(evicted)
    }

    /// Deletes blob `blob_id` and its cache file: no layer references it.
    pub fn remove_blob(&self, blob_id: &str) -> Result<(), RafsMountError> {
        let blob_id = BlobId::parse(blob_id).map_err(|invalid| RafsMountError::InvalidBlobId {
            context: "the removal of a layer".to_string(),
            id: invalid.id,
        })?;
        let _users = self.lock_users();
        let _fetching = self.lock_fetching();
        self.remove_blob_files(&blob_id)
    }

    fn remove_blob_files(&self, blob_id: &BlobId) -> Result<(), RafsMountError> {
        remove_file_if_present(&self.blob_path(blob_id))?;
        remove_file_if_present(&self.applied_path(blob_id))?;
        remove_file_if_present(&self.cache_path(blob_id))?;
        for entry in fs::read_dir(&self.fuse_cache).map_err(io_err("read directory", &self.fuse_cache))? {
            let entry = entry.map_err(io_err("read directory", &self.fuse_cache))?;
            if entry.file_name().to_string_lossy().split('.').next() == Some(blob_id.as_str()) {
                remove_file_if_present(&entry.path())?;
            }
        }
        info!(blob = %blob_id, "removed nydus blob");
        Ok(())
    }

    /// Removes what a crash or a failed removal left: mounts nobody uses and
    /// blobs (with their cache files) not in `referenced` (hex ids). Returns
    /// how many of each went.
    pub fn sweep(&self, referenced: &BTreeSet<String>) -> Result<(usize, usize), RafsMountError> {
        let mut users = self.lock_users();
        let mut unmounted = 0;
        for entry in fs::read_dir(&self.mounts).map_err(io_err("read directory", &self.mounts))? {
            let entry = entry.map_err(io_err("read directory", &self.mounts))?;
            let id = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
            match id {
                Some(id) if users.get(&id).is_some_and(|u| !u.is_empty()) => {}
                Some(id) => {
                    self.unmount_if_unused(&mut users, id)?;
                    unmounted += 1;
                }
                None => warn!(path = %entry.path().display(), "unexpected entry among RAFS mounts"),
            }
        }
        let _fetching = self.lock_fetching();
        let mut removed = BTreeSet::new();
        for dir in [&self.blobs, &self.cache, &self.fuse_cache] {
            for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
                let entry = entry.map_err(io_err("read directory", dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // `<hex>`, `<hex>.applied`, `<hex>.chunk_map` (and other
                // files of nydus-storage's cache), and what a killed
                // download or list update left (`<hex>.<suffix>`).
                let id = name.split('.').next().unwrap_or_default().to_string();
                if !referenced.contains(&id) {
                    remove_file_if_present(&entry.path())?;
                    removed.insert(id);
                }
            }
        }
        if !removed.is_empty() {
            info!(blobs = ?removed, "removed unreferenced nydus blobs");
        }
        let removed = removed.len();
        Ok((unmounted, removed))
    }
}

fn read_applied(path: &Path) -> Result<BTreeSet<String>, RafsMountError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(io_err("read", path)(e).into()),
    }
}

/// Replaces the list atomically: a crash leaves the old list, and the
/// bootstrap is applied again (rewriting the same bytes).
fn write_applied(path: &Path, applied: &BTreeSet<String>) -> Result<(), RafsMountError> {
    let partial = path.with_extension("applied.new");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io_err("create", &partial))?;
    for digest in applied {
        writeln!(file, "{digest}").map_err(io_err("write", &partial))?;
    }
    file.sync_all().map_err(io_err("sync", &partial))?;
    Ok(fs::rename(&partial, path).map_err(io_err("rename", &partial))?)
}

/// A small Nydus image built from tars, and a blob source serving its blobs,
/// for the tests of this module and of the snapshotter.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::BlobSource;
    use crate::nydus::fuse::BlobBackend;
    use crate::nydus::{self, Compressor, RafsOptions};
    use crate::oci::registry::RegistryError;

    pub struct TestImage {
        /// The merged bootstrap of both layers.
        pub bootstrap: PathBuf,
        /// Digests of the blobs, in blob table order.
        pub blob_digests: Vec<String>,
        pub blob_dir: PathBuf,
        /// Regular files of the image's tree and their content.
        pub files: BTreeMap<String, Vec<u8>>,
    }

    use crate::nydus::noise;

    fn write_tar(path: &Path, entries: &[crate::nydus::TestEntry<'_>]) {
        crate::nydus::write_test_tar(path, entries, (0, 0));
    }

    /// Two layers built on their own and merged, as an OCI image converts:
    /// a file of two and a half chunks, small files, a hard link, a
    /// symlink, an empty file; the second layer whites out a file and adds
    /// a copy of the big one.
    pub fn build(dir: &Path, compressor: Compressor, fs_version: u32) -> TestImage {
        std::fs::create_dir_all(dir).unwrap();
        let big = noise((5 << 20) / 2, 0x2545_f491_4f6c_dd1d);
        let text = b"text compresses well ".repeat(3000);
        let base = dir.join("base.tar");
        write_tar(
            &base,
            &[
                ("etc/", tar::EntryType::Directory, b"", ""),
                ("etc/hosts", tar::EntryType::Regular, b"127.0.0.1 localhost\n", ""),
                ("etc/gone", tar::EntryType::Regular, b"whited out later", ""),
                ("usr/", tar::EntryType::Directory, b"", ""),
                ("usr/big", tar::EntryType::Regular, &big, ""),
                ("usr/text", tar::EntryType::Regular, &text, ""),
                ("usr/empty", tar::EntryType::Regular, b"", ""),
                ("usr/hard", tar::EntryType::Link, b"", "usr/text"),
                ("usr/link", tar::EntryType::Symlink, b"", "text"),
            ],
        );
        let small = noise(70_000, 7);
        let upper = dir.join("upper.tar");
        write_tar(
            &upper,
            &[
                ("etc/", tar::EntryType::Directory, b"", ""),
                ("etc/.wh.gone", tar::EntryType::Regular, b"", ""),
                ("srv/", tar::EntryType::Directory, b"", ""),
                ("srv/small", tar::EntryType::Regular, &small, ""),
                ("srv/big-copy", tar::EntryType::Regular, &big, ""),
            ],
        );
        let options = RafsOptions { fs_version, compressor };
        let blob_dir = dir.join("blobs");
        let layers: Vec<_> = [&base, &upper]
            .iter()
            .map(|tar| nydus::build_layer(tar, None, &options, &tar.with_extension("layer"), &blob_dir).unwrap())
            .collect();
        let bootstrap = dir.join("image.boot");
        let ids = nydus::merge_layers(None, &layers, None, &bootstrap).unwrap();
        let files = BTreeMap::from([
            ("/etc/hosts".to_string(), b"127.0.0.1 localhost\n".to_vec()),
            ("/usr/big".to_string(), big.clone()),
            ("/usr/text".to_string(), text.clone()),
            ("/usr/hard".to_string(), text),
            ("/usr/empty".to_string(), Vec::new()),
            ("/srv/small".to_string(), small),
            ("/srv/big-copy".to_string(), big),
        ]);
        TestImage {
            bootstrap,
            blob_digests: ids.iter().map(|id| format!("sha256:{id}")).collect(),
            blob_dir,
            files,
        }
    }

    /// Serves blobs from a directory (named by their hex digest), recording
    /// each fetch.
    #[derive(Debug)]
    pub struct DirBlobSource {
        pub dir: PathBuf,
        pub fetched: Mutex<Vec<String>>,
        /// Offer the FUSE server lazy access to the registry the reference
        /// names (plain HTTP).
        pub lazy: bool,
    }

    impl DirBlobSource {
        pub fn new(dir: &Path) -> DirBlobSource {
            DirBlobSource {
                dir: dir.to_path_buf(),
                fetched: Mutex::new(Vec::new()),
                lazy: false,
            }
        }

        pub fn fetched(&self) -> Vec<String> {
            self.fetched.lock().unwrap().clone()
        }
    }

    impl BlobSource for DirBlobSource {
        fn fetch(&self, reference: &str, digest: &str, dest: &Path) -> Result<u64, RegistryError> {
            self.fetched.lock().unwrap().push(format!("{reference} {digest}"));
            let from = self.dir.join(digest.trim_start_matches("sha256:"));
            std::fs::copy(&from, dest).map_err(|source| RegistryError::NotFound {
                object: format!("blob {digest}"),
                message: source.to_string(),
            })
        }

        fn lazy_backend(&self, reference: &str) -> Option<BlobBackend> {
            let (host, rest) = reference.split_once('/')?;
            let repository = rest.rsplit_once(':').map_or(rest, |(repo, _)| repo);
            self.lazy.then(|| BlobBackend::Registry {
                host: host.to_string(),
                repository: repository.to_string(),
                scheme: "http",
                skip_verify: false,
                auth: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{self, DirBlobSource};
    use super::*;
    use crate::host::sys::RecordingSystem;
    use crate::nydus::fuse::RecordingFuse;
    use crate::nydus::Compressor;

    /// Each regular file's content read back from the cache files at the
    /// uncompressed offsets of its chunks, as the kernel reads it.
    fn files_from_cache(bootstrap: &Path, caches: &[PathBuf]) -> BTreeMap<String, Vec<u8>> {
        let rs = nydus::load_bootstrap(bootstrap).unwrap();
        let mut files = BTreeMap::new();
        rs.walk_directory::<PathBuf>(rs.superblock.root_ino(), None, &mut |inode, path| {
            if !inode.is_reg() {
                return Ok(());
            }
            let mut content = Vec::new();
            for idx in 0..inode.get_chunk_count() {
                let chunk = inode.get_chunk_info(idx)?;
                let cache = File::open(&caches[chunk.blob_index() as usize])?;
                let mut data = vec![0; chunk.uncompressed_size() as usize];
                cache.read_exact_at(&mut data, chunk.uncompressed_offset())?;
                content.extend_from_slice(&data);
            }
            content.truncate(inode.size() as usize);
            files.insert(path.display().to_string(), content);
            Ok(())
        })
        .unwrap();
        files
    }

    #[test]
    fn cache_files_hold_each_files_data_at_its_chunk_offsets() {
        let tmp = tempfile::tempdir().unwrap();
        for compressor in [Compressor::None, Compressor::Lz4Block, Compressor::Zstd] {
            let dir = tmp.path().join(format!("{compressor:?}"));
            let image = testing::build(&dir, compressor, 6);
            let table = read_chunk_table(&image.bootstrap).unwrap();
            let ids: Vec<&str> = table.iter().map(|b| b.blob_id.as_str()).collect();
            let expected_ids: Vec<&str> = image.blob_digests.iter().map(|d| &d[7..]).collect();
            assert_eq!(ids, expected_ids, "device order is the blob table's");
            let mut caches = Vec::new();
            for blob in &table {
                let cache = dir.join(format!("{}.cache", blob.blob_id));
                build_cache_file(&image.blob_dir.join(blob.blob_id.as_str()), blob, &cache).unwrap();
                let size = fs::metadata(&cache).unwrap().len();
                assert_eq!(size, blob.cache_size(), "{compressor:?}");
                assert_eq!(size % BLOCK_SIZE, 0);
                assert_eq!(fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o600);
                caches.push(cache);
            }
            if compressor != Compressor::None {
                let pushed: u64 = table
                    .iter()
                    .map(|b| fs::metadata(image.blob_dir.join(b.blob_id.as_str())).unwrap().len())
                    .sum();
                let cached: u64 = caches.iter().map(|c| fs::metadata(c).unwrap().len()).sum();
                assert!(
                    pushed < cached,
                    "{compressor:?}: the pushed blobs are compressed: {pushed} vs {cached}"
                );
            }
            assert_eq!(
                files_from_cache(&image.bootstrap, &caches),
                image.files,
                "{compressor:?}"
            );
            // Applying the bootstrap again rewrites the same bytes.
            build_cache_file(&image.blob_dir.join(table[0].blob_id.as_str()), &table[0], &caches[0]).unwrap();
            assert_eq!(files_from_cache(&image.bootstrap, &caches), image.files);
        }
    }

    #[test]
    fn damaged_blobs_and_v5_bootstraps_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let image = testing::build(&tmp.path().join("v6"), Compressor::None, 6);
        let table = read_chunk_table(&image.bootstrap).unwrap();
        let blob = &table[0];
        let chunk = blob.chunks.values().next().unwrap();
        let damaged = tmp.path().join("damaged");
        let mut bytes = fs::read(image.blob_dir.join(blob.blob_id.as_str())).unwrap();
        bytes[chunk.compressed_offset as usize] ^= 0xff;
        fs::write(&damaged, bytes).unwrap();
        let err = build_cache_file(&damaged, blob, &tmp.path().join("cache")).unwrap_err();
        assert!(
            matches!(&err, RafsMountError::CorruptChunk { reason, .. } if reason.contains("digest")),
            "{err}"
        );

        let v5 = testing::build(&tmp.path().join("v5"), Compressor::Zstd, 5);
        let err = read_chunk_table(&v5.bootstrap).unwrap_err();
        assert!(matches!(err, RafsMountError::UnsupportedVersion { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("RAFS v5"), "{err}");
    }

    #[test]
    fn the_blob_cache_keeps_its_bound_by_evicting_idle_images_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let images: Vec<testing::TestImage> = [Compressor::None, Compressor::Lz4Block, Compressor::Zstd]
            .into_iter()
            .map(|c| testing::build(&tmp.path().join(format!("{c:?}")), c, 6))
            .collect();
        let all_blobs = tmp.path().join("all-blobs");
        fs::create_dir(&all_blobs).unwrap();
        for image in &images {
            for entry in fs::read_dir(&image.blob_dir).unwrap() {
                let entry = entry.unwrap();
                fs::copy(entry.path(), all_blobs.join(entry.file_name())).unwrap();
            }
        }
        let origins = |image: &testing::TestImage| -> Vec<BlobOrigin> {
            image
                .blob_digests
                .iter()
                .map(|d| BlobOrigin {
                    reference: "127.0.0.1:5000/app:1".into(),
                    digest: d.clone(),
                })
                .collect()
        };
        let root = tmp.path().join("root");
        let open = |limit: u64| {
            RafsMounts::open(
                &root,
                Arc::new(RecordingSystem::plain()),
                Arc::new(DirBlobSource::new(&all_blobs)),
                FsDriver::Erofs,
                Arc::new(RecordingFuse::default()),
            )
            .unwrap()
            .with_cache_limit(limit)
        };
        let kept = |image: &testing::TestImage, mounts: &RafsMounts| -> usize {
            image
                .blob_digests
                .iter()
                .map(|d| mounts.files_of(&BlobId::parse(&d[7..]).unwrap()).len())
                .sum()
        };
        let use_once = |mounts: &RafsMounts, at: usize| {
            let id = at as u64 + 1;
            mounts
                .acquire(id, &images[at].bootstrap, &origins(&images[at]))
                .unwrap()
                .bind(id * 10);
            mounts.release(id * 10).unwrap();
        };

        // Measured without a bound: what each image takes.
        let mounts = open(u64::MAX);
        let bytes: Vec<u64> = (0..3)
            .map(|at| {
                use_once(&mounts, at);
                mounts.cache_bytes(&images[at].bootstrap).unwrap()
            })
            .collect();
        for digest in images.iter().flat_map(|i| &i.blob_digests) {
            mounts.remove_blob_files(&BlobId::parse(&digest[7..]).unwrap()).unwrap();
        }
        let (none, lz4, zstd) = (bytes[0], bytes[1], bytes[2]);
        assert!(
            zstd <= none,
            "the case below needs the third image no larger than the first: {bytes:?}"
        );

        // Both idle images fit; the third in use does not fit with both:
        // the least recently used (the first) goes, the other stays.
        let mounts = open(none + lz4);
        use_once(&mounts, 0);
        use_once(&mounts, 1);
        assert!(
            kept(&images[0], &mounts) > 0 && kept(&images[1], &mounts) > 0,
            "within the bound"
        );
        mounts
            .acquire(3, &images[2].bootstrap, &origins(&images[2]))
            .unwrap()
            .bind(30);
        assert_eq!(kept(&images[0], &mounts), 0, "the least recently used idle image went");
        assert!(kept(&images[1], &mounts) > 0, "the more recently used one stays");
        assert!(kept(&images[2], &mounts) > 0, "the one in use stays");

        // Bound below what the image in use takes: idle ones go, it stays.
        let mounts = open(zstd / 2);
        mounts
            .acquire(3, &images[2].bootstrap, &origins(&images[2]))
            .unwrap()
            .bind(31);
        assert_eq!(kept(&images[1], &mounts), 0);
        assert!(kept(&images[2], &mounts) > 0, "never the image in use");
        mounts.release(31).unwrap();
        assert_eq!(
            kept(&images[2], &mounts),
            0,
            "idle and over the bound by itself, it goes too"
        );

        // An evicted image is fetched again when a container needs it.
        use_once(&mounts, 0);
        mounts
            .acquire(1, &images[0].bootstrap, &origins(&images[0]))
            .unwrap()
            .bind(11);
        assert_eq!(mounts.cache_bytes(&images[0].bootstrap).unwrap(), none);
    }

    #[test]
    fn mounts_are_counted_and_go_with_their_last_user() {
        let tmp = tempfile::tempdir().unwrap();
        let image = testing::build(&tmp.path().join("image"), Compressor::Lz4Block, 6);
        let sys = Arc::new(RecordingSystem::plain());
        let source = Arc::new(DirBlobSource::new(&image.blob_dir));
        let root = tmp.path().join("root");
        let mounts = RafsMounts::open(
            &root,
            sys.clone(),
            source.clone(),
            FsDriver::Erofs,
            Arc::new(RecordingFuse::default()),
        )
        .unwrap();
        let reference = "127.0.0.1:5000/app:1";
        let origins: Vec<BlobOrigin> = image
            .blob_digests
            .iter()
            .map(|d| BlobOrigin {
                reference: reference.into(),
                digest: d.clone(),
            })
            .collect();
        // The first blob was fetched when its layer was pulled; the second
        // is fetched at mount time from its origin.
        let fetched = mounts.fetch_blob(reference, &image.blob_digests[0]).unwrap();
        assert_eq!(fetched.path, root.join("nydus/blobs").join(&image.blob_digests[0][7..]));
        assert_eq!(fs::metadata(&fetched.path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(fetched);
        mounts.fetch_blob(reference, &image.blob_digests[0]).unwrap();
        assert_eq!(source.fetched().len(), 1, "a blob on disk is not fetched again");

        let mountpoint = root.join("nydus/mnt/7");
        let caches: Vec<String> = image
            .blob_digests
            .iter()
            .map(|d| root.join("nydus/cache").join(&d[7..]).display().to_string())
            .collect();
        let expected_mount = format!(
            "mount -t erofs -o ro,device={},device={} {} {}",
            caches[0],
            caches[1],
            image.bootstrap.display(),
            mountpoint.display()
        );
        let lease = mounts.acquire(7, &image.bootstrap, &origins).unwrap();
        assert_eq!(lease.mountpoint, mountpoint);
        lease.bind(100);
        assert_eq!(sys.calls(), vec![expected_mount.clone()]);
        assert_eq!(
            source.fetched(),
            vec![
                format!("{reference} {}", image.blob_digests[0]),
                format!("{reference} {}", image.blob_digests[1])
            ]
        );
        assert_eq!(fs::metadata(&mountpoint).unwrap().permissions().mode() & 0o777, 0o700);
        mounts.acquire(7, &image.bootstrap, &origins).unwrap().bind(101);
        assert_eq!(sys.calls().len(), 1, "mounted once for both users");
        assert_eq!(mounts.users_of(7), vec![100, 101]);

        mounts.release(100).unwrap();
        assert_eq!(sys.calls().len(), 1, "a user is left");
        mounts.release(101).unwrap();
        assert_eq!(sys.calls().last().unwrap(), &format!("umount {}", mountpoint.display()));
        assert!(!mountpoint.exists());

        // A lease dropped before its snapshot existed releases the mount.
        drop(mounts.acquire(7, &image.bootstrap, &origins).unwrap());
        let calls = sys.calls();
        assert_eq!(calls[calls.len() - 2], expected_mount);
        assert_eq!(calls[calls.len() - 1], format!("umount {}", mountpoint.display()));

        // A failed mount leaves nothing counted.
        sys.fail_calls_starting_with("mount -t erofs");
        let err = mounts.acquire(7, &image.bootstrap, &origins).unwrap_err();
        assert!(matches!(err, RafsMountError::Sys(_)), "{err}");
        assert!(mounts.users_of(7).is_empty());
    }

    #[test]
    fn missing_blobs_without_origin_and_sweeps() {
        let tmp = tempfile::tempdir().unwrap();
        let image = testing::build(&tmp.path().join("image"), Compressor::Zstd, 6);
        let sys = Arc::new(RecordingSystem::plain());
        let root = tmp.path().join("root");
        let mounts = RafsMounts::open(
            &root,
            sys.clone(),
            Arc::new(DirBlobSource::new(&image.blob_dir)),
            FsDriver::Erofs,
            Arc::new(RecordingFuse::default()),
        )
        .unwrap();
        let err = mounts.acquire(3, &image.bootstrap, &[]).unwrap_err();
        assert!(matches!(err, RafsMountError::BlobMissing { .. }), "{err}");
        assert!(sys.calls().is_empty());

        for digest in &image.blob_digests {
            mounts.fetch_blob("localhost/app:1", digest).unwrap();
        }
        mounts.acquire(3, &image.bootstrap, &[]).unwrap().bind(30);
        let first = image.blob_digests[0][7..].to_string();
        let second = image.blob_digests[1][7..].to_string();
        assert!(root.join("nydus/cache").join(&first).is_file());
        // A leftover mount directory of a crashed run, and a download cut
        // short.
        fs::create_dir(root.join("nydus/mnt/99")).unwrap();
        fs::write(root.join(format!("nydus/blobs/{}.partial", "0".repeat(64))), b"x").unwrap();
        // What the FUSE server cached of both blobs.
        for hex in [&first, &second] {
            for suffix in ["blob.data", "chunk_map", "blob.meta"] {
                fs::write(root.join(format!("nydus/fuse-cache/{hex}.{suffix}")), b"x").unwrap();
            }
        }
        let (unmounted, removed) = mounts.sweep(&BTreeSet::from([first.clone()])).unwrap();
        assert_eq!((unmounted, removed), (1, 2));
        assert!(root.join("nydus/mnt/3").exists(), "a mount in use stays");
        assert!(!root.join("nydus/mnt/99").exists());
        assert!(root.join("nydus/blobs").join(&first).is_file());
        assert!(!root.join("nydus/blobs").join(&second).exists());
        assert!(!root.join("nydus/cache").join(&second).exists());
        assert_eq!(fs::read_dir(root.join("nydus/blobs")).unwrap().count(), 1);
        assert_eq!(
            fs::read_dir(root.join("nydus/fuse-cache")).unwrap().count(),
            3,
            "the first blob's stay"
        );

        mounts.remove_blob(&first).unwrap();
        assert!(!root.join("nydus/blobs").join(&first).exists());
        assert!(!root.join("nydus/cache").join(&first).exists());
        assert!(!root.join(format!("nydus/cache/{first}.applied")).exists());
        assert_eq!(fs::read_dir(root.join("nydus/fuse-cache")).unwrap().count(), 0);
    }

    #[test]
    fn fuse_mounts_of_a_previous_run_are_detached_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let dead = root.join("nydus/mnt/5");
        let sys = Arc::new(RecordingSystem::plain());
        sys.fuse_mounts
            .lock()
            .unwrap()
            .extend([dead.clone(), tmp.path().join("other/fuse")]);
        RafsMounts::open(
            &root,
            sys.clone(),
            Arc::new(DirBlobSource::new(tmp.path())),
            FsDriver::Auto,
            Arc::new(RecordingFuse::default()),
        )
        .unwrap();
        assert_eq!(sys.calls(), vec![format!("umount {}", dead.display())]);
    }

    #[test]
    fn base64_is_the_standard_padded_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b"user:s3cret"), "dXNlcjpzM2NyZXQ=");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn lazy_reads_carry_the_sources_credentials_and_leave_cas_and_mirrors_to_whole_fetches() {
        #[derive(Debug)]
        struct Private;
        impl crate::oci::registry::CredentialSource for Private {
            fn credentials(&self, host: &str) -> Result<Option<RegistryAuth>, String> {
                Ok((host == "private.example").then(|| RegistryAuth::Basic("user".into(), "s3cret".into())))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        for (host, text) in [
            ("mirrored.example", "[host.\"https://mirror.example\"]\n"),
            ("ca.example", "ca = \"ca.crt\"\n"),
        ] {
            std::fs::create_dir_all(dir.path().join(host)).unwrap();
            std::fs::write(dir.path().join(host).join("hosts.toml"), text).unwrap();
        }
        std::fs::write(
            dir.path().join("ca.example/ca.crt"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let source = RegistryBlobSource::with_options(
            Vec::new(),
            RegistryOptions {
                hosts: crate::oci::registry::RegistryHosts::at(dir.path()),
                credentials: Some(Arc::new(Private)),
                ..RegistryOptions::default()
            },
        );
        match source.lazy_backend("private.example/app:1") {
            Some(BlobBackend::Registry {
                auth: Some(LazyAuth::Basic(basic)),
                scheme: "https",
                ref host,
                ..
            }) if host == "private.example" => assert_eq!(basic, "dXNlcjpzM2NyZXQ="),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            source.lazy_backend("public.example/app:1"),
            Some(BlobBackend::Registry { auth: None, .. })
        ));
        assert_eq!(
            source.lazy_backend("mirrored.example/app:1"),
            None,
            "mirrors need fallback"
        );
        assert_eq!(
            source.lazy_backend("ca.example/app:1"),
            None,
            "nydus-storage takes no CA"
        );
        // Nor a client certificate.
        let client_dir = dir.path().join("client.example");
        std::fs::create_dir_all(&client_dir).unwrap();
        crate::oci::registry::hosts::testing::client_files(&client_dir);
        std::fs::write(client_dir.join("hosts.toml"), "client = [[\"c.crt\", \"c.key\"]]\n").unwrap();
        assert_eq!(
            source.lazy_backend("client.example/app:1"),
            None,
            "nydus-storage takes no client certificate"
        );
    }

    #[test]
    fn loopback_registries_are_reached_without_tls() {
        for registry in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:5000",
            "[::1]:5000",
            "127.5.0.1",
        ] {
            assert!(crate::oci::registry::is_loopback_registry(registry), "{registry}");
        }
        for registry in [
            "docker.io",
            "10.0.0.1:5000",
            "registry.local:5000",
            "[2001:db8::1]:5000",
        ] {
            assert!(!crate::oci::registry::is_loopback_registry(registry), "{registry}");
        }
        let source = RegistryBlobSource::new(vec!["registry.local:5000".into()]);
        assert!(source.is_insecure("registry.local:5000/app:1"));
        // Loopback needs no flag: its lazy reads are plain HTTP.
        assert!(matches!(
            source.lazy_backend("127.0.0.1:5000/app:1"),
            Some(BlobBackend::Registry {
                scheme: "http",
                skip_verify: false,
                ..
            })
        ));
        assert!(matches!(
            source.lazy_backend("registry.local:5000/app:1"),
            Some(BlobBackend::Registry {
                scheme: "https",
                skip_verify: true,
                ..
            })
        ));
        assert!(matches!(
            source.lazy_backend("docker.io/library/busybox:latest"),
            Some(BlobBackend::Registry { scheme: "https", skip_verify: false, ref host, .. }) if host == "registry-1.docker.io"
        ));
        assert!(!source.is_insecure("registry.local:5001/app:1"));
        assert!(!source.is_insecure("docker.io/library/busybox:latest"));
        assert!(digest_hex("sha256:abc").is_err());
        assert_eq!(
            digest_hex(&format!("sha256:{}", "a".repeat(64))).unwrap(),
            "a".repeat(64)
        );
    }
}
