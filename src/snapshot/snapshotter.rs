//! containerd's snapshotter semantics on overlayfs: what Prepare, View,
//! Mounts, Commit, Remove, Stat, Update, Usage, List and Cleanup do, matching
//! containerd's built-in overlayfs snapshotter. Validates every request before
//! it reaches the store. Layers of Nydus images are taken in as remote
//! snapshotters take them: a blob layer is fetched and committed here (the
//! unpacker then adopts it), and the RAFS mount of the image's bootstrap
//! layer (owned by `nydus::mount`) is the lower layer of what is stacked on it.
//! Blocking: callers on an async runtime use `spawn_blocking`. Knows nothing
//! of gRPC.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::error::{Classify, ErrorKind};
use crate::host::sys::SystemOps;
use crate::nydus;
use crate::nydus::fuse::{FuseServer, InProcessFuse};
use crate::nydus::mount::{
    digest_hex, BlobOrigin, BlobSource, MountLease, RafsMountError, RafsMountStatus, RafsMounts, RegistryBlobSource,
};
use crate::snapshot::filter::{Fields, FilterError, FilterSet};
use crate::snapshot::model::{Info, Kind, Labels, Mount, Usage};
use crate::snapshot::storage::{DirKind, Storage, StorageError, StorageKind};
use crate::snapshot::store::{LabelUpdate, Record, Store, StoreError};

/// containerd's cap on one label, key and value together.
pub const MAX_LABEL_BYTES: usize = 4096;
/// Set by containerd's unpacker (and `oci::pull`): the chain id a prepared
/// layer will be committed as.
pub use crate::oci::pull::LABEL_SNAPSHOT_REF;
/// Reported on Stat, Update and List when `upperdir_label` is configured.
pub const LABEL_UPPERDIR: &str = "containerd.io/snapshot/overlay.upperdir";
/// Set on every layer by containerd's client when the image handler adds
/// the image's details (`snapshotters.AppendInfoHandlerWrapper`, as CRI and
/// nerdctl pull, and `oci::pull`): the image reference and the layer's digest.
pub use crate::oci::pull::{LABEL_IMAGE_REF, LABEL_LAYER_DIGEST};
const METADATA_FILE: &str = "metadata.redb";
/// The name containers must give as their snapshotter to be captured here:
/// the proxy plugin's name in containerd's configuration.
pub const SNAPSHOTTER_NAME: &str = "seamless";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid {what} {key:?}: {reason}")]
    InvalidKey {
        what: &'static str,
        key: String,
        reason: &'static str,
    },
    #[error("invalid label {key:?}: {reason}")]
    InvalidLabel { key: String, reason: String },
    #[error("target snapshot {target} already exists")]
    TargetExists { target: String },
    #[error("snapshot {key} is committed: mounts exist only for active and view snapshots")]
    NoMounts { key: String },
    #[error("usage of {path}: {source}")]
    Usage { path: String, source: std::io::Error },
    #[error("no active snapshot {key} of namespace {namespace} in this snapshotter")]
    ContainerSnapshotNotFound { namespace: String, key: String },
    #[error(
        "nydus blob layer {key} carries no label {label}: pull with containerd's client and the image handler that adds \
         the image's details to layers (CRI, nerdctl, or integration/rpull), not `ctr images pull`"
    )]
    NydusLabelMissing { key: String, label: &'static str },
    #[error(
        "nydus bootstrap layer {key} is RAFS v{version}: this snapshotter runs RAFS v6, and v5 unless [nydus] fs_driver is \"erofs\""
    )]
    UnsupportedRafsVersion { key: String, version: String },
    #[error("the RAFS mount {mountpoint} below snapshot {key} is missing: it could not be mounted again (see the daemon's log)")]
    RafsNotMounted { key: String, mountpoint: String },
    #[error(transparent)]
    Rafs(#[from] RafsMountError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Classify for SnapshotError {
    fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::InvalidKey { .. } | SnapshotError::InvalidLabel { .. } | SnapshotError::Filter(_) => {
                ErrorKind::InvalidArgument
            }
            SnapshotError::TargetExists { .. } => ErrorKind::AlreadyExists,
            SnapshotError::ContainerSnapshotNotFound { .. } => ErrorKind::NotFound,
            SnapshotError::NydusLabelMissing { .. } => ErrorKind::InvalidArgument,
            SnapshotError::UnsupportedRafsVersion { .. } | SnapshotError::RafsNotMounted { .. } => {
                ErrorKind::FailedPrecondition
            }
            SnapshotError::Rafs(e) => e.kind(),
            SnapshotError::NoMounts { .. } => ErrorKind::FailedPrecondition,
            SnapshotError::Usage { .. } | SnapshotError::Config(_) => ErrorKind::Internal,
            SnapshotError::Store(e) => e.kind(),
            SnapshotError::Storage(e) => e.kind(),
        }
    }
}

/// Overlay options that depend on the kernel and the namespace we run in.
#[derive(Debug, Clone, Copy)]
pub struct OverlayFeatures {
    pub index_off: bool,
    pub userxattr: bool,
    /// Renaming a directory that came from a lower layer needs redirects;
    /// without them rename(2) answers EXDEV. containerd applies layers into
    /// the upper directory and diffs by walking mounted views, so redirects
    /// never leak into images it builds.
    pub redirect_dir: bool,
}

impl OverlayFeatures {
    pub fn detect() -> Self {
        OverlayFeatures {
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            userxattr: running_in_user_namespace(),
            redirect_dir: Path::new("/sys/module/overlay/parameters/redirect_dir").exists(),
        }
    }
}

/// True unless uid 0 maps to the host's full id range.
fn running_in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

/// How a request's keys are formed, which decides what a valid key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// No namespace on the request: containerd 1.6 prefixes every key as
    /// `<ns>/<n>/<name>`, so a `/`-rooted key is malformed.
    Prefixed,
    /// The request names its namespace (gRPC header `containerd-namespace`):
    /// keys are opaque names and may be path-like, as containerd's own
    /// conformance suite sends them.
    Namespaced,
}

/// See [`Snapshotter::capture_site`].
#[derive(Debug, Clone)]
pub struct CaptureSite {
    pub subvolume: PathBuf,
    pub dest: PathBuf,
    pub snapshots: bool,
}

#[derive(Debug)]
pub struct Snapshotter {
    store: Arc<Store>,
    storage: Storage,
    sys: Arc<dyn SystemOps>,
    overlay: OverlayFeatures,
    upperdir_label: bool,
    rafs: RafsMounts,
    /// Namespaces whose committed layers one another may adopt.
    shared_namespaces: Vec<String>,
}

fn validate_key(style: KeyStyle, what: &'static str, key: &str) -> Result<(), SnapshotError> {
    let reason = if key.is_empty() {
        Some("must not be empty")
    } else if style == KeyStyle::Prefixed && key.starts_with('/') {
        Some("must not start with '/' (containerd sends <namespace>/<n>/<name>)")
    } else if key.contains('\0') {
        Some("must not contain NUL")
    } else if key.split('/').any(|part| part == "..") {
        Some("must not contain a '..' path element")
    } else if key.len() > 4096 {
        Some("is longer than 4096 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SnapshotError::InvalidKey {
            what,
            key: key.chars().take(256).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

fn validate_labels(labels: &Labels) -> Result<(), SnapshotError> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(SnapshotError::InvalidLabel {
                key: k.clone(),
                reason: "label key must not be empty".into(),
            });
        }
        if k.len() + v.len() > MAX_LABEL_BYTES {
            return Err(SnapshotError::InvalidLabel {
                key: k.chars().take(256).collect(),
                reason: format!(
                    "label key and value are {} bytes, more than the maximum of {MAX_LABEL_BYTES}",
                    k.len() + v.len()
                ),
            });
        }
    }
    Ok(())
}

fn label_is_true(labels: &Labels, label: &str) -> bool {
    labels.get(label).is_some_and(|v| v == "true")
}

/// A Nydus data blob layer this snapshotter committed itself.
fn is_nydus_blob(record: &Record) -> bool {
    record.kind == Kind::Committed && label_is_true(&record.labels, nydus::ANNOTATION_BLOB)
}

/// Where the blob of a Nydus blob layer came from.
fn blob_origin(record: &Record) -> Option<BlobOrigin> {
    if !is_nydus_blob(record) {
        return None;
    }
    Some(BlobOrigin {
        reference: record.labels.get(LABEL_IMAGE_REF)?.clone(),
        digest: record.labels.get(LABEL_LAYER_DIGEST)?.clone(),
    })
}

/// Whether a request with key `key` may adopt the committed snapshot named
/// `name`: both of one namespace, or of namespaces the operator lets share
/// (`snapshotter.shared_namespaces`). containerd 1.6 prefixes every name
/// with `<ns>/<n>/`; names of requests that carry their namespace in a
/// header are opaque and tell no namespace apart.
fn may_adopt(style: KeyStyle, key: &str, name: &str, shared: &[String]) -> bool {
    match style {
        KeyStyle::Prefixed => {
            let namespace = |s: &str| s.split_once('/').map(|(ns, _)| ns.to_string());
            let (Some(mine), Some(theirs)) = (namespace(key), namespace(name)) else {
                return false;
            };
            let listed = |ns: &str| shared.iter().any(|s| s == "*" || s == ns);
            mine == theirs || (listed(&mine) && listed(&theirs))
        }
        KeyStyle::Namespaced => true,
    }
}

/// The name of a layer the snapshotter commits itself: the chain id
/// containerd asked for, under the request's `<ns>/<n>/` prefix when keys
/// carry one (containerd allocated that `<n>` for this very request, so none
/// of its later keys can take the name).
fn adopted_name(style: KeyStyle, key: &str, target: &str) -> String {
    if style == KeyStyle::Prefixed {
        let mut parts = key.splitn(3, '/');
        if let (Some(ns), Some(n), Some(_)) = (parts.next(), parts.next(), parts.next()) {
            if !ns.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                return format!("{ns}/{n}/{target}");
            }
        }
    }
    target.to_string()
}

/// Disk usage of a tree as containerd counts it: allocated blocks and inodes,
/// hard links once.
pub fn disk_usage(root: &Path) -> Result<Usage, SnapshotError> {
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| SnapshotError::Usage { path, source }
    };
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(err(&path))?;
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += meta.blocks() as i64 * 512;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(err(&path))? {
                stack.push(entry.map_err(err(&path))?.path());
            }
        }
    }
    Ok(usage)
}

struct InfoFields<'a>(&'a Info);

impl Fields for InfoFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        let info = self.0;
        match path.first()?.as_str() {
            "kind" => Some(info.kind.as_str().to_string()),
            "name" => Some(info.name.clone()),
            "parent" => Some(info.parent.clone()),
            "labels" if !info.labels.is_empty() => info.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

/// A RAFS mount as [`Snapshotter::rafs_mounts`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RafsMountInfo {
    pub status: RafsMountStatus,
    pub bootstrap_key: String,
    /// The image reference of the bootstrap layer.
    pub image: String,
    /// Keys of the snapshots using the mount.
    pub users: Vec<String>,
    pub cache_bytes: u64,
}

impl Snapshotter {
    /// Opens the snapshotter under `root` and recovers: directories that no
    /// metadata references (a crash mid-Prepare or mid-Remove) are deleted,
    /// and the RAFS mounts of Nydus images in use are mounted again if gone.
    /// Nydus blobs come from their image's registry; only registries on
    /// loopback are reached without trusted TLS.
    /// RAFS images are served over FUSE by threads of this process.
    pub fn open(root: &Path, config: &Config, sys: Arc<dyn SystemOps>) -> Result<Snapshotter, SnapshotError> {
        Snapshotter::open_with_fuse(root, config, sys, Arc::new(InProcessFuse::new()))
    }

    /// [`Snapshotter::open`] with RAFS images served over FUSE by `fuse`
    /// (the daemon's: serving processes that outlive it).
    pub fn open_with_fuse(
        root: &Path,
        config: &Config,
        sys: Arc<dyn SystemOps>,
        fuse: Arc<dyn FuseServer>,
    ) -> Result<Snapshotter, SnapshotError> {
        let source = RegistryBlobSource::with_options(
            config.nydus.insecure_registries.clone(),
            crate::oci::registry::RegistryOptions::from_config(&config.registry),
        );
        Snapshotter::open_with_nydus_io(root, config, sys, Arc::new(source), fuse)
    }

    /// [`Snapshotter::open`] with Nydus blobs fetched through `blobs` and
    /// served over FUSE by `fuse`.
    pub fn open_with_nydus_io(
        root: &Path,
        config: &Config,
        sys: Arc<dyn SystemOps>,
        blobs: Arc<dyn BlobSource>,
        fuse: Arc<dyn FuseServer>,
    ) -> Result<Snapshotter, SnapshotError> {
        let storage = Storage::open(root, config.storage.backend, config.pool_size()?, sys.clone())?;
        let store = Arc::new(Store::open(&root.join(METADATA_FILE))?);
        let nydus_dir = root.join("nydus");
        let filesystem = sys.total_bytes(root).map_err(RafsMountError::from)?;
        let cache_limit = config.nydus_cache_bound()?.bytes(filesystem);
        let rafs =
            RafsMounts::open(root, sys.clone(), blobs, config.nydus.fs_driver, fuse)?.with_cache_limit(cache_limit);
        info!(dir = %nydus_dir.display(), cache_limit, "nydus blob cache bounded");
        let snapshotter = Snapshotter {
            store,
            storage,
            sys,
            overlay: OverlayFeatures::detect(),
            upperdir_label: config.snapshotter.upperdir_label,
            rafs,
            shared_namespaces: config.snapshotter.shared_namespaces.clone(),
        };
        snapshotter.recover_rafs_mounts()?;
        let removed = snapshotter.cleanup()?;
        info!(
            storage = snapshotter.storage.kind().as_str(),
            snapshots_dir = %snapshotter.storage.snapshots_dir().display(),
            removed_orphans = removed,
            "snapshotter ready"
        );
        if snapshotter.storage.kind() == StorageKind::Directory {
            warn!("storage is plain directories: a writable layer cannot be snapshotted in O(1) here; use a btrfs root or the pool for seamless commit");
        }
        Ok(snapshotter)
    }

    /// Where background jobs build what they build, unless told otherwise:
    /// 0700 beneath the daemon's root.
    pub fn scratch_dir(&self) -> &Path {
        self.storage.scratch_dir()
    }

    pub fn storage_kind(&self) -> StorageKind {
        self.storage.kind()
    }

    pub fn prepare(
        &self,
        style: KeyStyle,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(style, Kind::Active, key, parent, labels)
    }

    pub fn view(&self, style: KeyStyle, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>, SnapshotError> {
        self.create(style, Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        style: KeyStyle,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        validate_key(style, "key", key)?;
        if !parent.is_empty() {
            validate_key(style, "parent", parent)?;
        }
        validate_labels(&labels)?;
        if let Some(target) = labels.get(LABEL_SNAPSHOT_REF) {
            self.refuse_existing_target(style, key, target, parent)?;
        }
        if kind == Kind::Active && label_is_true(&labels, nydus::ANNOTATION_BLOB) {
            let target = self.adopt_nydus_blob(style, key, parent, labels)?;
            return Err(SnapshotError::TargetExists { target });
        }
        if label_is_true(&labels, nydus::ANNOTATION_BOOTSTRAP) {
            // Refused before anything is fetched or created: the pull fails
            // with the reason instead of every container start.
            if let Some(version) = labels
                .get(nydus::ANNOTATION_FS_VERSION)
                .filter(|v| v.as_str() != "6" && !(v.as_str() == "5" && self.rafs.runs_rafs_v5()))
            {
                return Err(SnapshotError::UnsupportedRafsVersion {
                    key: key.to_string(),
                    version: version.clone(),
                });
            }
        }
        let chain = self.store.ancestors(parent)?;
        // Mounted before the record exists (the lease keeps it until the
        // record has an id), so that the store's write transaction never
        // waits on a download or a cache build.
        let lease = self.take_rafs_mount(&chain)?;
        let dir_kind = if kind == Kind::Active {
            DirKind::Active
        } else {
            DirKind::View
        };
        let lowers = self.lowers_of(&chain);
        let created = self.store.create(key, parent, kind, labels, |id, _| {
            // The nearest lower: for a Nydus image, the root of its RAFS.
            let owner = match lowers.first() {
                Some(lower) => {
                    let meta = std::fs::metadata(lower).map_err(|source| SnapshotError::Usage {
                        path: lower.display().to_string(),
                        source,
                    })?;
                    Some((meta.uid(), meta.gid()))
                }
                None => None,
            };
            self.storage.create_snapshot_dir(id, dir_kind, owner)?;
            Ok::<(), SnapshotError>(())
        })?;
        if let Some(lease) = lease {
            lease.bind(created.record.id);
        }
        Ok(self.mounts_of(created.record.kind, created.record.id, &lowers))
    }

    /// A Nydus data blob is not a tar: containerd cannot apply it. As remote
    /// snapshotters do, the blob is fetched here and the layer committed
    /// under the chain id containerd asked for; the AlreadyExists that
    /// follows makes containerd adopt the layer without downloading or
    /// applying anything. The layer's directory stays empty: its data is
    /// served by the RAFS mount of the image's bootstrap. Returns the target.
    fn adopt_nydus_blob(
        &self,
        style: KeyStyle,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<String, SnapshotError> {
        let required = |label: &'static str| {
            labels
                .get(label)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| SnapshotError::NydusLabelMissing {
                    key: key.to_string(),
                    label,
                })
        };
        let target = required(LABEL_SNAPSHOT_REF)?;
        let digest = required(LABEL_LAYER_DIGEST)?;
        let reference = required(LABEL_IMAGE_REF)?;
        digest_hex(&digest)?;
        // Held until the layer's record references the blob, so a Cleanup
        // meanwhile cannot take it for garbage. Unless the driver wants
        // blobs whole, nothing is fetched now: the image's files are read
        // from the registry as they are used.
        let blob = if self.rafs.fetches_at_pull() {
            Some(self.rafs.fetch_blob(&reference, &digest)?)
        } else {
            None
        };
        let name = adopted_name(style, key, &target);
        let created = self.store.create(&name, parent, Kind::Committed, labels, |id, _| {
            self.storage.create_snapshot_dir(id, DirKind::View, None)?;
            Ok::<(), SnapshotError>(())
        })?;
        drop(blob);
        info!(
            key,
            name,
            digest,
            id = created.record.id,
            "nydus blob layer committed; containerd adopts it on AlreadyExists"
        );
        Ok(target)
    }

    /// The file of a bootstrap layer's bootstrap.
    /// Every RAFS mount of the daemon with the names containerd knows: the
    /// bootstrap layer's key and image, the keys of the snapshots using it,
    /// and the bytes this host keeps of its blobs.
    pub fn rafs_mounts(&self) -> Result<Vec<RafsMountInfo>, SnapshotError> {
        let records = self.store.list()?;
        let key_of = |id: u64| records.iter().find(|(_, r)| r.id == id);
        let mut mounts = Vec::new();
        for status in self.rafs.status()? {
            let (bootstrap_key, image) = match key_of(status.bootstrap_id) {
                Some((key, record)) => (
                    key.clone(),
                    record.labels.get(LABEL_IMAGE_REF).cloned().unwrap_or_default(),
                ),
                None => (String::new(), String::new()),
            };
            let users = status
                .users
                .iter()
                .filter_map(|id| key_of(*id).map(|(key, _)| key.clone()))
                .collect();
            // A bootstrap that cannot be read shows no cache rather than
            // hiding the mount.
            let cache_bytes = self
                .rafs
                .cache_bytes(&self.bootstrap_file(status.bootstrap_id))
                .unwrap_or(0);
            mounts.push(RafsMountInfo {
                status,
                bootstrap_key,
                image,
                users,
                cache_bytes,
            });
        }
        Ok(mounts)
    }

    fn bootstrap_file(&self, id: u64) -> PathBuf {
        self.storage.upper_dir(id).join(nydus::BOOTSTRAP_IN_LAYER)
    }

    /// Whether layer `at` of `chain` (nearest first) is a Nydus bootstrap
    /// layer: labelled so by the unpacker, or (a Commit that dropped the
    /// labels) holding a bootstrap right above a blob layer.
    fn is_nydus_bootstrap(&self, chain: &[(String, Record)], at: usize) -> bool {
        let record = &chain[at].1;
        if record.kind != Kind::Committed {
            return false;
        }
        if label_is_true(&record.labels, nydus::ANNOTATION_BOOTSTRAP) {
            return true;
        }
        chain.get(at + 1).is_some_and(|(_, below)| is_nydus_blob(below)) && self.bootstrap_file(record.id).is_file()
    }

    /// Where in `chain` (nearest first) the nearest Nydus bootstrap layer is.
    fn bootstrap_index(&self, chain: &[(String, Record)]) -> Option<usize> {
        (0..chain.len()).find(|at| self.is_nydus_bootstrap(chain, *at))
    }

    /// The lower directories of a snapshot whose ancestors are `chain`,
    /// nearest first: each layer's directory down to a Nydus bootstrap
    /// layer, whose RAFS mount stands for it and for every layer below
    /// (blob layers, whose directories are empty).
    fn lowers_of(&self, chain: &[(String, Record)]) -> Vec<PathBuf> {
        match self.bootstrap_index(chain) {
            Some(at) => chain[..at]
                .iter()
                .map(|(_, r)| self.storage.upper_dir(r.id))
                .chain(std::iter::once(self.rafs.mountpoint(chain[at].1.id)))
                .collect(),
            None => chain.iter().map(|(_, r)| self.storage.upper_dir(r.id)).collect(),
        }
    }

    /// Mounts (or counts a user of) the RAFS of the nearest bootstrap layer
    /// in `chain`, if there is one.
    fn take_rafs_mount(&self, chain: &[(String, Record)]) -> Result<Option<MountLease<'_>>, SnapshotError> {
        let Some(at) = self.bootstrap_index(chain) else {
            return Ok(None);
        };
        let bootstrap = &chain[at].1;
        // Blob layers shared with an image pulled earlier name that image;
        // the bootstrap layer's image references every blob below it, so
        // its repository holds them all, and one repository lets the FUSE
        // server read every blob lazily.
        let image_ref = bootstrap.labels.get(LABEL_IMAGE_REF).filter(|r| !r.is_empty());
        let origins: Vec<BlobOrigin> = chain[at + 1..]
            .iter()
            .filter_map(|(_, r)| blob_origin(r))
            .map(|origin| match image_ref {
                Some(reference) => BlobOrigin {
                    reference: reference.clone(),
                    ..origin
                },
                None => origin,
            })
            .collect();
        let lease = self
            .rafs
            .acquire(bootstrap.id, &self.bootstrap_file(bootstrap.id), &origins)?;
        Ok(Some(lease))
    }

    /// Takes the RAFS mounts of active and view snapshots over from a
    /// previous run: counted again, and mounted again where gone (a reboot,
    /// or an unmount behind our back). A broken image must not keep the
    /// daemon from starting: its snapshot's Mounts reports the mount missing.
    fn recover_rafs_mounts(&self) -> Result<(), SnapshotError> {
        for (name, record) in self.store.list()? {
            if record.kind == Kind::Committed {
                continue;
            }
            let taken = self
                .store
                .ancestors(&record.parent)
                .map_err(SnapshotError::from)
                .and_then(|chain| self.take_rafs_mount(&chain));
            match taken {
                Ok(Some(lease)) => lease.bind(record.id),
                Ok(None) => {}
                Err(e) => warn!(key = name, error = %e, "cannot mount the Nydus image below snapshot"),
            }
        }
        Ok(())
    }

    /// What a snapshot held of Nydus images goes with it: its use of a RAFS
    /// mount, the mount of a bootstrap layer, the blob of a blob layer that
    /// no other layer has. A failure leaves files or mounts to Cleanup.
    fn release_nydus(&self, key: &str, record: &Record) {
        let released = match record.kind {
            Kind::Active | Kind::View => self.rafs.release(record.id),
            Kind::Committed if self.rafs.mountpoint(record.id).exists() => self.rafs.forget(record.id),
            Kind::Committed => Ok(()),
        };
        if let Err(e) = released {
            warn!(key, id = record.id, error = %e, "RAFS mount left for cleanup");
        }
        let Some(origin) = blob_origin(record) else {
            return;
        };
        let Ok(hex) = digest_hex(&origin.digest) else {
            return;
        };
        let still_used = self.store.list().map(|all| {
            all.iter()
                .any(|(_, r)| blob_origin(r).is_some_and(|o| o.digest == origin.digest))
        });
        match still_used {
            Ok(true) => {}
            Ok(false) => {
                if let Err(e) = self.rafs.remove_blob(hex) {
                    warn!(key, blob = hex, error = %e, "nydus blob left for cleanup");
                }
            }
            Err(e) => warn!(key, error = %e, "nydus blob left for cleanup"),
        }
    }

    /// containerd's unpacker labels a layer with the chain id it will be
    /// committed as; when that layer exists already (committed in the same
    /// namespace, with the same parent) containerd reuses it on
    /// AlreadyExists instead of unpacking again.
    ///
    /// Only within a namespace, or among namespaces the operator lists as
    /// sharing: a chain id is no proof of holding the layer's content (it is
    /// computed from diff ids an image config merely claims), so adopting
    /// another namespace's layer by it would hand one tenant another's
    /// private files without ever fetching them.
    fn refuse_existing_target(
        &self,
        style: KeyStyle,
        key: &str,
        target: &str,
        parent: &str,
    ) -> Result<(), SnapshotError> {
        let exists = self.store.list()?.into_iter().any(|(name, r)| {
            r.kind == Kind::Committed
                && r.parent == parent
                && may_adopt(style, key, &name, &self.shared_namespaces)
                && (name == target || r.labels.get(LABEL_SNAPSHOT_REF).map(String::as_str) == Some(target))
        });
        if exists {
            return Err(SnapshotError::TargetExists {
                target: target.to_string(),
            });
        }
        Ok(())
    }

    /// Never blocks on more than metadata and a stat: containerd calls it
    /// on its hot path, so a RAFS mount found missing is reported, not
    /// mounted here (start-up and the next Prepare mount it).
    pub fn mounts(&self, style: KeyStyle, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        validate_key(style, "key", key)?;
        let (record, chain) = self.store.get_with_ancestors(key)?;
        if record.kind == Kind::Committed {
            return Err(SnapshotError::NoMounts { key: key.to_string() });
        }
        if let Some(at) = self.bootstrap_index(&chain) {
            let mountpoint = self.rafs.mountpoint(chain[at].1.id);
            if !self.sys.is_mountpoint(&mountpoint).unwrap_or(false) {
                return Err(SnapshotError::RafsNotMounted {
                    key: key.to_string(),
                    mountpoint: mountpoint.display().to_string(),
                });
            }
        }
        Ok(self.mounts_of(record.kind, record.id, &self.lowers_of(&chain)))
    }

    fn mounts_of(&self, kind: Kind, id: u64, lowers: &[PathBuf]) -> Vec<Mount> {
        let path = |p: &Path| p.display().to_string();
        let bind = |source: String, mode: &str| Mount {
            fs_type: "bind".into(),
            source,
            options: vec![mode.into(), "rbind".into()],
        };
        if lowers.is_empty() {
            let mode = if kind == Kind::View { "ro" } else { "rw" };
            return vec![bind(path(&self.storage.upper_dir(id)), mode)];
        }
        if kind == Kind::View && lowers.len() == 1 {
            return vec![bind(path(&lowers[0]), "ro")];
        }
        let mut options = Vec::new();
        if self.overlay.index_off {
            options.push("index=off".to_string());
        }
        if self.overlay.userxattr {
            options.push("userxattr".to_string());
        }
        if self.overlay.redirect_dir {
            options.push("redirect_dir=on".to_string());
        }
        if kind == Kind::Active {
            options.push(format!("workdir={}", path(&self.storage.work_dir(id))));
            options.push(format!("upperdir={}", path(&self.storage.upper_dir(id))));
        }
        // Every layer lives under one directory, so containerd can shorten an
        // option string longer than a page to relative paths (128+ layers).
        let lowers: Vec<String> = lowers.iter().map(|p| path(p)).collect();
        options.push(format!("lowerdir={}", lowers.join(":")));
        vec![Mount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }

    pub fn commit(&self, style: KeyStyle, name: &str, key: &str, labels: Labels) -> Result<(), SnapshotError> {
        validate_key(style, "name", name)?;
        validate_key(style, "key", key)?;
        validate_labels(&labels)?;
        let active = self.store.get(key)?;
        if active.kind != Kind::Active {
            return Err(StoreError::NotActive { key: key.to_string() }.into());
        }
        let usage = disk_usage(&self.storage.upper_dir(active.id))?;
        self.store.commit_active(key, name, labels, usage)?;
        // A committed layer is never mounted: its use of a RAFS mount ends.
        if let Err(e) = self.rafs.release(active.id) {
            warn!(key, id = active.id, error = %e, "RAFS mount left for cleanup");
        }
        Ok(())
    }

    pub fn remove(&self, style: KeyStyle, key: &str) -> Result<(), SnapshotError> {
        validate_key(style, "key", key)?;
        let record = self.store.remove(key)?;
        // The metadata is gone; a directory that fails to go now is an
        // orphan that Cleanup or the next start removes.
        if let Err(e) = self.storage.remove_snapshot_dir(record.id) {
            warn!(key, id = record.id, error = %e, "snapshot directory left for cleanup");
        }
        self.release_nydus(key, &record);
        Ok(())
    }

    pub fn stat(&self, style: KeyStyle, key: &str) -> Result<Info, SnapshotError> {
        validate_key(style, "key", key)?;
        let record = self.store.get(key)?;
        Ok(self.info_of(key, &record))
    }

    fn info_of(&self, name: &str, record: &Record) -> Info {
        let mut info = record.info(name);
        if self.upperdir_label {
            info.labels.insert(
                LABEL_UPPERDIR.into(),
                self.storage.upper_dir(record.id).display().to_string(),
            );
        }
        info
    }

    /// Changes labels; `fieldpaths` empty replaces them all.
    pub fn update(
        &self,
        style: KeyStyle,
        name: &str,
        labels: Labels,
        fieldpaths: Vec<String>,
    ) -> Result<Info, SnapshotError> {
        validate_key(style, "key", name)?;
        validate_labels(&labels)?;
        let update = if fieldpaths.is_empty() {
            LabelUpdate::ReplaceAll(labels)
        } else {
            LabelUpdate::Paths {
                paths: fieldpaths,
                labels,
            }
        };
        let record = self.store.update_labels(name, update)?;
        Ok(self.info_of(name, &record))
    }

    /// Active snapshots are measured now; committed ones report what was
    /// measured at commit.
    pub fn usage(&self, style: KeyStyle, key: &str) -> Result<Usage, SnapshotError> {
        validate_key(style, "key", key)?;
        let record = self.store.get(key)?;
        if record.kind == Kind::Active {
            return disk_usage(&self.storage.upper_dir(record.id));
        }
        Ok(record.usage)
    }

    /// Every snapshot matching any of `filters` (containerd's syntax).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError> {
        let filter = FilterSet::parse_all(filters)?;
        Ok(self
            .store
            .list()?
            .into_iter()
            .map(|(name, record)| self.info_of(&name, &record))
            .filter(|info| filter.matches(&InfoFields(info)))
            .collect())
    }

    /// The active snapshot containerd knows in `namespace` as `key`:
    /// containerd 1.6 stores it here as `<namespace>/<n>/<key>`, a client
    /// that sends the namespace header as `key` itself.
    pub fn container_snapshot(&self, namespace: &str, key: &str) -> Result<(String, u64), SnapshotError> {
        let prefix = format!("{namespace}/");
        let suffix = format!("/{key}");
        let found = self.store.list()?.into_iter().find(|(name, record)| {
            record.kind == Kind::Active
                && (name == key
                    || name
                        .strip_prefix(&prefix)
                        .and_then(|rest| rest.strip_suffix(&suffix))
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
        });
        found
            .map(|(name, record)| (name, record.id))
            .ok_or_else(|| SnapshotError::ContainerSnapshotNotFound {
                namespace: namespace.to_string(),
                key: key.to_string(),
            })
    }

    /// Where active snapshot `id` is captured as `capture_name`: its
    /// snapshot directory (holding the upper `fs` and `work`), the capture's
    /// destination under the captures directory, and whether this storage
    /// snapshots it in O(1) (else the capture copies it).
    pub fn capture_site(&self, id: u64, capture_name: &str) -> Result<CaptureSite, SnapshotError> {
        validate_key(KeyStyle::Prefixed, "capture name", capture_name)?;
        if capture_name.contains('/') {
            return Err(SnapshotError::InvalidKey {
                what: "capture name",
                key: capture_name.to_string(),
                reason: "must be a single path element",
            });
        }
        Ok(CaptureSite {
            subvolume: self.storage.snapshot_dir(id),
            dest: self.storage.captures_dir().join(capture_name),
            snapshots: self.storage.supports_capture(),
        })
    }

    /// The system calls this snapshotter makes go through.
    pub fn system(&self) -> &Arc<dyn SystemOps> {
        &self.sys
    }

    /// The metadata database, for the record tables subsystems above keep
    /// beside the snapshots: each builds its own typed
    /// [`crate::snapshot::store::Records`] from it once, at start.
    pub fn record_store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Whether snapshot `key` exists.
    pub fn has_snapshot(&self, key: &str) -> bool {
        self.store.get(key).is_ok()
    }

    /// The lower directories of active snapshot `key`, nearest first (a
    /// Nydus image's RAFS mount in place of its layers).
    pub fn lower_dirs(&self, key: &str) -> Result<Vec<std::path::PathBuf>, SnapshotError> {
        let (_, chain) = self.store.get_with_ancestors(key)?;
        Ok(self.lowers_of(&chain))
    }

    /// Every capture on disk.
    pub fn captures(&self) -> Result<Vec<std::path::PathBuf>, SnapshotError> {
        Ok(self.storage.captures_on_disk()?)
    }

    /// Deletes a capture (see [`crate::snapshot::snapshotter::Snapshotter::capture_site`]).
    pub fn remove_capture(&self, capture: &Path) -> Result<(), SnapshotError> {
        if capture.parent() != Some(self.storage.captures_dir()) {
            return Err(SnapshotError::InvalidKey {
                what: "capture",
                key: capture.display().to_string(),
                reason: "is not under the captures directory",
            });
        }
        self.storage.remove_orphan(capture)?;
        Ok(())
    }

    /// The upper directory of snapshot `id` (the container's live writes).
    pub fn upper_dir(&self, id: u64) -> std::path::PathBuf {
        self.storage.upper_dir(id)
    }

    /// Removes directories that no snapshot references; returns how many.
    pub fn cleanup(&self) -> Result<usize, SnapshotError> {
        let removed = self.store.with_referenced_ids(|ids| {
            let mut removed = 0;
            for orphan in self.storage.unreferenced_dirs(ids)? {
                match self.storage.remove_orphan(&orphan) {
                    Ok(()) => removed += 1,
                    Err(e) => warn!(path = %orphan.display(), error = %e, "cannot remove orphaned snapshot directory"),
                }
            }
            Ok::<usize, StorageError>(removed)
        })??;
        if removed > 0 {
            info!(removed, "removed orphaned snapshot directories");
        }
        let referenced: BTreeSet<String> = self
            .store
            .list()?
            .iter()
            .filter_map(|(_, r)| blob_origin(r))
            .filter_map(|o| digest_hex(&o.digest).ok().map(str::to_string))
            .collect();
        // Leftovers of Nydus images must not fail a Cleanup or a start.
        match self.rafs.sweep(&referenced) {
            Ok((0, 0)) => {}
            Ok((mounts, blobs)) => info!(mounts, blobs, "removed unused RAFS mounts and nydus blobs"),
            Err(e) => warn!(error = %e, "cannot remove unused RAFS mounts or nydus blobs"),
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendChoice;
    use crate::config::FsDriver;
    use crate::host::sys::RecordingSystem;
    use crate::nydus::fuse::RecordingFuse;

    fn open(upperdir_label: bool) -> (tempfile::TempDir, Snapshotter) {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.storage.backend = BackendChoice::Directory;
        config.snapshotter.upperdir_label = upperdir_label;
        let s = Snapshotter::open(tmp.path(), &config, Arc::new(RecordingSystem::plain())).unwrap();
        (tmp, s)
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn upper(s: &Snapshotter, key: &str) -> String {
        s.storage.upper_dir(s.store.get(key).unwrap().id).display().to_string()
    }

    #[test]
    fn mounts_follow_containerd_overlayfs() {
        let (_t, s) = open(false);
        let m = s.prepare(KeyStyle::Prefixed, "a", "", Labels::new()).unwrap();
        assert_eq!(m[0].fs_type, "bind");
        assert_eq!(m[0].options, vec!["rw", "rbind"]);
        let a_upper = upper(&s, "a");
        s.commit(KeyStyle::Prefixed, "A", "a", Labels::new()).unwrap();
        let v = s.view(KeyStyle::Prefixed, "v1", "A", Labels::new()).unwrap();
        assert_eq!(v[0].fs_type, "bind");
        assert_eq!(v[0].source, a_upper);
        assert_eq!(v[0].options, vec!["ro", "rbind"]);
        let m = s.prepare(KeyStyle::Prefixed, "b", "A", Labels::new()).unwrap();
        let b_upper = upper(&s, "b");
        assert_eq!(m[0].fs_type, "overlay");
        let opts = &m[0].options;
        assert!(opts.contains(&format!("upperdir={b_upper}")), "{opts:?}");
        assert!(
            opts.iter().any(|o| o.starts_with("workdir=") && o.ends_with("/work")),
            "{opts:?}"
        );
        assert_eq!(opts.last().unwrap(), &format!("lowerdir={a_upper}"));
        assert_eq!(s.mounts(KeyStyle::Prefixed, "b").unwrap(), m);
        s.commit(KeyStyle::Prefixed, "B", "b", Labels::new()).unwrap();
        let v = s.view(KeyStyle::Prefixed, "v2", "B", Labels::new()).unwrap();
        assert!(!v[0].options.iter().any(|o| o.starts_with("upperdir")));
        assert_eq!(
            v[0].options.last().unwrap(),
            &format!("lowerdir={}:{a_upper}", upper(&s, "B"))
        );
        assert_eq!(
            s.mounts(KeyStyle::Prefixed, "A").unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
    }

    #[test]
    fn bad_input_gets_clear_kinds() {
        let (_t, s) = open(false);
        for key in ["", "/abs", "a/../b", "..", "nul\0"] {
            let e = s.prepare(KeyStyle::Prefixed, key, "", Labels::new()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{key:?}: {e}");
        }
        let big = "x".repeat(MAX_LABEL_BYTES);
        // A client that names its namespace may use path-like keys.
        s.prepare(KeyStyle::Namespaced, "/work/preparing", "", Labels::new())
            .unwrap();
        let e = s
            .prepare(KeyStyle::Namespaced, "/work/../x", "", Labels::new())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = s
            .prepare(KeyStyle::Prefixed, "k", "", labels(&[("key", &big)]))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("maximum of 4096"), "{e}");
        let prepare_fails = |key: &str, parent: &str| {
            s.prepare(KeyStyle::Prefixed, key, parent, Labels::new())
                .unwrap_err()
                .kind()
        };
        assert_eq!(prepare_fails("k", "missing"), ErrorKind::NotFound);
        s.prepare(KeyStyle::Prefixed, "k", "", Labels::new()).unwrap();
        assert_eq!(prepare_fails("k", ""), ErrorKind::AlreadyExists);
        assert_eq!(prepare_fails("c", "k"), ErrorKind::InvalidArgument);
        s.view(KeyStyle::Prefixed, "v", "", Labels::new()).unwrap();
        assert_eq!(
            s.commit(KeyStyle::Prefixed, "V", "v", Labels::new())
                .unwrap_err()
                .kind(),
            ErrorKind::FailedPrecondition
        );
        s.commit(KeyStyle::Prefixed, "K", "k", Labels::new()).unwrap();
        s.prepare(KeyStyle::Prefixed, "child", "K", Labels::new()).unwrap();
        assert_eq!(
            s.remove(KeyStyle::Prefixed, "K").unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(
            s.list(&["name=K".into()]).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            s.stat(KeyStyle::Prefixed, "nope").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn snapshot_ref_of_existing_layer_answers_already_exists() {
        let (_t, s) = open(false);
        let ref_label = labels(&[(LABEL_SNAPSHOT_REF, "sha256:chain1")]);
        s.prepare(
            KeyStyle::Prefixed,
            "ns1/1/extract-1 sha256:chain1",
            "",
            ref_label.clone(),
        )
        .unwrap();
        s.commit(
            KeyStyle::Prefixed,
            "ns1/2/sha256:chain1",
            "ns1/1/extract-1 sha256:chain1",
            ref_label.clone(),
        )
        .unwrap();
        let e = s
            .prepare(
                KeyStyle::Prefixed,
                "ns1/3/extract-2 sha256:chain1",
                "",
                ref_label.clone(),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        // containerd then looks the layer up with this exact filter.
        let found = s
            .list(&[r#"labels."containerd.io/snapshot.ref"==sha256:chain1,parent=="""#.into()])
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "ns1/2/sha256:chain1");
        // Another parent is another layer: prepared normally.
        s.prepare(
            KeyStyle::Prefixed,
            "ns1/4/extract-3 sha256:chain1",
            "ns1/2/sha256:chain1",
            ref_label.clone(),
        )
        .unwrap();
        // Another namespace claiming the same chain id does not get the
        // layer: it unpacks its own, as with containerd's own snapshotters.
        s.prepare(KeyStyle::Prefixed, "ns2/5/extract-4 sha256:chain1", "", ref_label)
            .unwrap();
    }

    #[test]
    fn only_namespaces_listed_as_sharing_adopt_one_anothers_layers() {
        let shared = ["k8s.io".to_string(), "moby".to_string()];
        let name = "k8s.io/7/sha256:chain1";
        assert!(may_adopt(KeyStyle::Prefixed, "k8s.io/9/extract", name, &[]));
        assert!(!may_adopt(KeyStyle::Prefixed, "moby/9/extract", name, &[]));
        assert!(may_adopt(KeyStyle::Prefixed, "moby/9/extract", name, &shared));
        assert!(!may_adopt(KeyStyle::Prefixed, "tenant/9/extract", name, &shared));
        assert!(may_adopt(
            KeyStyle::Prefixed,
            "tenant/9/extract",
            name,
            &["*".to_string()]
        ));
        // A name without a namespace is nobody's to adopt.
        assert!(!may_adopt(
            KeyStyle::Prefixed,
            "tenant/9/extract",
            "sha256:chain1",
            &["*".to_string()]
        ));
    }

    /// Labels containerd's unpacker sends for a layer of a Nydus image
    /// pulled with the image handler that adds the image's details.
    fn nydus_layer_labels(reference: &str, digest: &str, chain_id: &str, kind: &str) -> Labels {
        let mut l = labels(&[
            (LABEL_SNAPSHOT_REF, chain_id),
            (LABEL_IMAGE_REF, reference),
            (LABEL_LAYER_DIGEST, digest),
        ]);
        match kind {
            "blob" => l.insert(nydus::ANNOTATION_BLOB.into(), "true".into()),
            _ => {
                l.insert(nydus::ANNOTATION_FS_VERSION.into(), kind.into());
                l.insert(nydus::ANNOTATION_BOOTSTRAP.into(), "true".into())
            }
        };
        l
    }

    struct NydusWorld {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        sys: Arc<RecordingSystem>,
        source: Arc<crate::nydus::mount::testing::DirBlobSource>,
        fuse: Arc<RecordingFuse>,
        image: crate::nydus::mount::testing::TestImage,
        s: Snapshotter,
        /// The committed bootstrap layer.
        top: String,
    }

    const NYDUS_REF: &str = "127.0.0.1:5000/nydus/app:1";

    /// Pulls a Nydus image as containerd's unpacker does: each blob layer's
    /// Prepare answered AlreadyExists, the bootstrap layer applied (its
    /// bootstrap written into the layer) and committed with its labels.
    fn pull_nydus_image(
        compressor: crate::nydus::Compressor,
        fs_version: u32,
        driver: FsDriver,
        lazy_source: bool,
    ) -> NydusWorld {
        let tmp = tempfile::tempdir().unwrap();
        let image = crate::nydus::mount::testing::build(&tmp.path().join("image"), compressor, fs_version);
        let root = tmp.path().join("root");
        let mut config = Config::default();
        config.storage.backend = BackendChoice::Directory;
        config.nydus.fs_driver = driver;
        let sys = Arc::new(RecordingSystem::plain());
        let mut source = crate::nydus::mount::testing::DirBlobSource::new(&image.blob_dir);
        source.lazy = lazy_source;
        let source = Arc::new(source);
        let fuse = Arc::new(RecordingFuse::default());
        let s = Snapshotter::open_with_nydus_io(&root, &config, sys.clone(), source.clone(), fuse.clone()).unwrap();
        let mut parent = String::new();
        for (i, digest) in image.blob_digests.iter().enumerate() {
            let chain = format!("sha256:chain{i}");
            let l = nydus_layer_labels(NYDUS_REF, digest, &chain, "blob");
            let key = format!("ns/{}/extract-{i} {chain}", 10 + i);
            let e = s.prepare(KeyStyle::Prefixed, &key, &parent, l.clone()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
            let name = format!("ns/{}/{chain}", 10 + i);
            let info = s.stat(KeyStyle::Prefixed, &name).unwrap();
            assert_eq!(
                (info.kind, info.parent.as_str(), &info.labels),
                (Kind::Committed, parent.as_str(), &l)
            );
            assert!(s.store.get(&key).is_err(), "no active snapshot is left for the Prepare");
            parent = name;
        }
        let chain = "sha256:chain-boot";
        let l = nydus_layer_labels(NYDUS_REF, "sha256:bootstraplayer", chain, &fs_version.to_string());
        let key = format!("ns/20/extract-boot {chain}");
        if fs_version == 5 && driver == FsDriver::Erofs {
            let e = s.prepare(KeyStyle::Prefixed, &key, &parent, l).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
            assert!(e.to_string().contains("RAFS v5"), "{e}");
            return NydusWorld {
                _tmp: tmp,
                root,
                sys,
                source,
                fuse,
                image,
                s,
                top: String::new(),
            };
        }
        let m = s.prepare(KeyStyle::Prefixed, &key, &parent, l.clone()).unwrap();
        // The applier unpacks the bootstrap layer over the (empty) blob layers.
        let blob_uppers: Vec<String> = (0..image.blob_digests.len())
            .rev()
            .map(|i| upper(&s, &format!("ns/{}/sha256:chain{i}", 10 + i)))
            .collect();
        assert_eq!(
            m[0].options.last().unwrap(),
            &format!("lowerdir={}", blob_uppers.join(":"))
        );
        let boot_upper = PathBuf::from(upper(&s, &key));
        std::fs::create_dir_all(boot_upper.join("image")).unwrap();
        std::fs::copy(&image.bootstrap, boot_upper.join(nydus::BOOTSTRAP_IN_LAYER)).unwrap();
        let top = format!("ns/21/{chain}");
        s.commit(KeyStyle::Prefixed, &top, &key, l).unwrap();
        assert!(
            sys.calls().is_empty(),
            "no mount before a container needs one: {:?}",
            sys.calls()
        );
        NydusWorld {
            _tmp: tmp,
            root,
            sys,
            source,
            fuse,
            image,
            s,
            top,
        }
    }

    #[test]
    fn nydus_blob_layers_are_fetched_and_adopted() {
        let w = pull_nydus_image(crate::nydus::Compressor::Zstd, 6, FsDriver::Erofs, false);
        let fetched = w.source.fetched();
        let expected: Vec<String> = w
            .image
            .blob_digests
            .iter()
            .map(|d| format!("{NYDUS_REF} {d}"))
            .collect();
        assert_eq!(fetched, expected);
        for digest in &w.image.blob_digests {
            let blob = w.root.join("nydus/blobs").join(&digest[7..]);
            assert_eq!(
                std::fs::read(&blob).unwrap(),
                std::fs::read(w.image.blob_dir.join(&digest[7..])).unwrap()
            );
        }
        // The layers' directories hold nothing: the data is in the blobs.
        let first = w.s.store.get("ns/10/sha256:chain0").unwrap();
        assert_eq!(std::fs::read_dir(w.s.storage.upper_dir(first.id)).unwrap().count(), 0);

        // Another namespace pulling the same image adopts the same layer
        // (containerd finds it by its label) and fetches nothing.
        let l = nydus_layer_labels(NYDUS_REF, &w.image.blob_digests[0], "sha256:chain0", "blob");
        let e =
            w.s.prepare(KeyStyle::Prefixed, "other/3/extract-x sha256:chain0", "", l.clone())
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(w.source.fetched().len(), expected.len());

        // Without the image's details nothing says where the blob is.
        for missing in [LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_SNAPSHOT_REF] {
            let mut l = l.clone();
            l.remove(missing);
            l.insert(LABEL_SNAPSHOT_REF.into(), "sha256:elsewhere".into());
            if missing == LABEL_SNAPSHOT_REF {
                l.remove(LABEL_SNAPSHOT_REF);
            }
            let e = w.s.prepare(KeyStyle::Prefixed, "ns/40/extract-y", "", l).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{missing}: {e}");
            assert!(e.to_string().contains(missing), "{e}");
        }
        // A registry that does not have the blob: the Prepare fails, nothing
        // is created.
        let l = nydus_layer_labels(
            NYDUS_REF,
            &format!("sha256:{}", "e".repeat(64)),
            "sha256:chain9",
            "blob",
        );
        let e =
            w.s.prepare(KeyStyle::Prefixed, "ns/41/extract-z sha256:chain9", "", l)
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        assert!(w
            .s
            .list(&[r#"labels."containerd.io/snapshot.ref"==sha256:chain9"#.into()])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn containers_of_nydus_images_run_on_the_rafs_mount() {
        let w = pull_nydus_image(crate::nydus::Compressor::Lz4Block, 6, FsDriver::Erofs, false);
        let s = &w.s;
        let boot_id = s.store.get(&w.top).unwrap().id;
        let mountpoint = w.root.join(format!("nydus/mnt/{boot_id}"));
        let caches: Vec<String> = w
            .image
            .blob_digests
            .iter()
            .map(|d| format!("device={}", w.root.join("nydus/cache").join(&d[7..]).display()))
            .collect();
        let mount_call = format!(
            "mount -t erofs -o ro,{} {} {}",
            caches.join(","),
            PathBuf::from(upper(s, &w.top))
                .join(nydus::BOOTSTRAP_IN_LAYER)
                .display(),
            mountpoint.display()
        );
        let m = s
            .prepare(KeyStyle::Prefixed, "ns/30/c1", &w.top, Labels::new())
            .unwrap();
        assert_eq!(w.sys.calls(), vec![mount_call.clone()]);
        assert_eq!(m[0].fs_type, "overlay");
        let c1_upper = upper(s, "ns/30/c1");
        assert!(
            m[0].options.contains(&format!("upperdir={c1_upper}")),
            "{:?}",
            m[0].options
        );
        assert_eq!(
            m[0].options.last().unwrap(),
            &format!("lowerdir={}", mountpoint.display())
        );
        assert_eq!(s.mounts(KeyStyle::Prefixed, "ns/30/c1").unwrap(), m);
        assert_eq!(s.lower_dirs("ns/30/c1").unwrap(), vec![mountpoint.clone()]);

        // A view of the image is the RAFS itself, read-only.
        let v = s.view(KeyStyle::Prefixed, "ns/31/v", &w.top, Labels::new()).unwrap();
        assert_eq!(v[0].fs_type, "bind");
        assert_eq!(v[0].source, mountpoint.display().to_string());
        assert_eq!(v[0].options, vec!["ro", "rbind"]);
        // An ordinary layer above the bootstrap stacks on the RAFS.
        s.prepare(KeyStyle::Prefixed, "ns/32/extract-app", &w.top, Labels::new())
            .unwrap();
        let app_upper = upper(s, "ns/32/extract-app");
        s.commit(KeyStyle::Prefixed, "ns/33/app", "ns/32/extract-app", Labels::new())
            .unwrap();
        let m = s
            .prepare(KeyStyle::Prefixed, "ns/34/c2", "ns/33/app", Labels::new())
            .unwrap();
        assert_eq!(
            m[0].options.last().unwrap(),
            &format!("lowerdir={app_upper}:{}", mountpoint.display())
        );
        assert_eq!(w.sys.calls(), vec![mount_call.clone()], "one mount for every user");
        assert_eq!(
            s.rafs.users_of(boot_id).len(),
            3,
            "c1, v and c2; the committed app layer let go"
        );

        // The mount goes with its last user.
        for key in ["ns/30/c1", "ns/31/v"] {
            s.remove(KeyStyle::Prefixed, key).unwrap();
            assert_eq!(w.sys.calls().len(), 1, "{key} was not the last user");
        }
        s.remove(KeyStyle::Prefixed, "ns/34/c2").unwrap();
        assert_eq!(
            w.sys.calls(),
            vec![mount_call.clone(), format!("umount {}", mountpoint.display())]
        );
        assert!(!mountpoint.exists());
        // A new container mounts it again.
        s.prepare(KeyStyle::Prefixed, "ns/35/c3", &w.top, Labels::new())
            .unwrap();
        assert_eq!(w.sys.calls().last().unwrap(), &mount_call);
    }

    #[test]
    fn rafs_mounts_come_back_after_a_restart_and_blobs_go_with_their_layers() {
        let w = pull_nydus_image(crate::nydus::Compressor::None, 6, FsDriver::Erofs, false);
        let boot_id = w.s.store.get(&w.top).unwrap().id;
        let mountpoint = w.root.join(format!("nydus/mnt/{boot_id}"));
        w.s.prepare(KeyStyle::Prefixed, "ns/30/c1", &w.top, Labels::new())
            .unwrap();
        let mount_call = w.sys.calls()[0].clone();
        let mut config = Config::default();
        config.storage.backend = BackendChoice::Directory;
        config.nydus.fs_driver = FsDriver::Erofs;
        let no_fuse = || Arc::new(RecordingFuse::default());
        let NydusWorld {
            _tmp,
            root,
            source,
            image,
            s,
            top,
            ..
        } = w;
        drop(s);

        // The host rebooted: the mount is gone (a fresh fake has none); the
        // container's snapshot is still there, so the daemon mounts again.
        let sys = Arc::new(RecordingSystem::plain());
        let s = Snapshotter::open_with_nydus_io(&root, &config, sys.clone(), source.clone(), no_fuse()).unwrap();
        assert_eq!(sys.calls(), vec![mount_call.clone()]);
        assert_eq!(
            s.mounts(KeyStyle::Prefixed, "ns/30/c1").unwrap()[0]
                .options
                .last()
                .unwrap(),
            &format!("lowerdir={}", mountpoint.display())
        );
        // Still mounted (the daemon alone restarted): nothing to do.
        drop(s);
        let s = Snapshotter::open_with_nydus_io(&root, &config, sys.clone(), source.clone(), no_fuse()).unwrap();
        assert_eq!(sys.calls().len(), 1);
        assert_eq!(s.rafs.users_of(boot_id), vec![s.store.get("ns/30/c1").unwrap().id]);

        // A mount that cannot come back is reported, not served empty.
        drop(s);
        let gone = Arc::new(RecordingSystem::plain());
        gone.fail_calls_starting_with("mount -t erofs");
        let s = Snapshotter::open_with_nydus_io(&root, &config, gone.clone(), source.clone(), no_fuse()).unwrap();
        let e = s.mounts(KeyStyle::Prefixed, "ns/30/c1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        assert!(e.to_string().contains(&mountpoint.display().to_string()), "{e}");
        drop(s);

        let s = Snapshotter::open_with_nydus_io(&root, &config, sys.clone(), source, no_fuse()).unwrap();
        s.remove(KeyStyle::Prefixed, "ns/30/c1").unwrap();
        // containerd's garbage collector removes the image's layers, top
        // first; each blob goes with the last layer that has it.
        s.remove(KeyStyle::Prefixed, &top).unwrap();
        let blobs = root.join("nydus/blobs");
        for i in (0..image.blob_digests.len()).rev() {
            let hex = &image.blob_digests[i][7..];
            assert!(blobs.join(hex).is_file());
            assert!(root.join("nydus/cache").join(hex).is_file());
            s.remove(KeyStyle::Prefixed, &format!("ns/{}/sha256:chain{i}", 10 + i))
                .unwrap();
            assert!(!blobs.join(hex).exists(), "blob {i} went with its layer");
            assert!(!root.join("nydus/cache").join(hex).exists());
        }
        assert_eq!(std::fs::read_dir(root.join("nydus/mnt")).unwrap().count(), 0);
    }

    #[test]
    fn compressed_and_v5_images_are_served_lazily_over_fuse() {
        for (compressor, fs_version) in [
            (crate::nydus::Compressor::Lz4Block, 6),
            (crate::nydus::Compressor::Zstd, 5),
        ] {
            let w = pull_nydus_image(compressor, fs_version, FsDriver::Auto, true);
            assert!(w.source.fetched().is_empty(), "nothing is fetched at pull time");
            assert_eq!(std::fs::read_dir(w.root.join("nydus/blobs")).unwrap().count(), 0);
            let boot = w.s.store.get(&w.top).unwrap();
            let mountpoint = w.root.join(format!("nydus/mnt/{}", boot.id));
            let m =
                w.s.prepare(KeyStyle::Prefixed, "ns/30/c1", &w.top, Labels::new())
                    .unwrap();
            assert_eq!(
                m[0].options.last().unwrap(),
                &format!("lowerdir={}", mountpoint.display())
            );
            let expected = crate::nydus::fuse::FuseSpec {
                bootstrap: w.s.storage.upper_dir(boot.id).join(nydus::BOOTSTRAP_IN_LAYER),
                backend: crate::nydus::fuse::BlobBackend::Registry {
                    host: "127.0.0.1:5000".into(),
                    repository: "nydus/app".into(),
                    scheme: "http",
                    skip_verify: false,
                    auth: None,
                },
                cache_dir: w.root.join("nydus/fuse-cache"),
                mountpoint: mountpoint.clone(),
            };
            assert_eq!(*w.fuse.served.lock().unwrap(), vec![expected], "v{fs_version}");
            assert!(w.sys.calls().is_empty(), "no erofs mount: {:?}", w.sys.calls());
            assert!(w.source.fetched().is_empty(), "chunks are read as they are used");
            // Counted like any mount: served once, stopped with the last user.
            w.s.prepare(KeyStyle::Prefixed, "ns/31/c2", &w.top, Labels::new())
                .unwrap();
            assert_eq!(w.fuse.served.lock().unwrap().len(), 1);
            w.s.remove(KeyStyle::Prefixed, "ns/30/c1").unwrap();
            assert!(w.fuse.stopped.lock().unwrap().is_empty());
            w.s.remove(KeyStyle::Prefixed, "ns/31/c2").unwrap();
            assert_eq!(*w.fuse.stopped.lock().unwrap(), vec![mountpoint.clone()]);
            assert!(!mountpoint.exists());
        }

        // A source without lazy access: the blobs are fetched whole, then
        // read from this host.
        let w = pull_nydus_image(crate::nydus::Compressor::Lz4Block, 6, FsDriver::Auto, false);
        w.s.prepare(KeyStyle::Prefixed, "ns/30/c1", &w.top, Labels::new())
            .unwrap();
        assert_eq!(w.source.fetched().len(), w.image.blob_digests.len());
        assert_eq!(
            w.fuse.served.lock().unwrap()[0].backend,
            crate::nydus::fuse::BlobBackend::Local {
                dir: w.root.join("nydus/blobs")
            }
        );

        // Blobs stored uncompressed: "auto" mounts them with erofs.
        let w = pull_nydus_image(crate::nydus::Compressor::None, 6, FsDriver::Auto, true);
        w.s.prepare(KeyStyle::Prefixed, "ns/30/c1", &w.top, Labels::new())
            .unwrap();
        assert!(w.fuse.served.lock().unwrap().is_empty());
        assert!(w.sys.calls()[0].starts_with("mount -t erofs"), "{:?}", w.sys.calls());
    }

    #[test]
    fn rafs_v5_images_are_refused_with_the_reason() {
        let w = pull_nydus_image(crate::nydus::Compressor::Zstd, 5, FsDriver::Erofs, false);
        // Pulled without the fs-version label, the bootstrap layer commits,
        // and the container's Prepare says why it cannot run.
        let parent = format!(
            "ns/{}/sha256:chain{}",
            10 + w.image.blob_digests.len() - 1,
            w.image.blob_digests.len() - 1
        );
        let mut l = nydus_layer_labels(NYDUS_REF, "sha256:bootstraplayer", "sha256:chain-boot", "5");
        l.remove(nydus::ANNOTATION_FS_VERSION);
        w.s.prepare(KeyStyle::Prefixed, "ns/20/extract-boot", &parent, l.clone())
            .unwrap();
        let boot_upper = PathBuf::from(upper(&w.s, "ns/20/extract-boot"));
        std::fs::create_dir_all(boot_upper.join("image")).unwrap();
        std::fs::copy(&w.image.bootstrap, boot_upper.join(nydus::BOOTSTRAP_IN_LAYER)).unwrap();
        w.s.commit(KeyStyle::Prefixed, "ns/21/boot", "ns/20/extract-boot", l)
            .unwrap();
        let e =
            w.s.prepare(KeyStyle::Prefixed, "ns/30/c1", "ns/21/boot", Labels::new())
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        assert!(e.to_string().contains("RAFS v5"), "{e}");
        assert!(w.s.store.get("ns/30/c1").is_err());
        assert!(w.sys.calls().is_empty());
    }

    #[test]
    fn adopted_layers_are_named_in_the_requests_namespace() {
        assert_eq!(
            adopted_name(KeyStyle::Prefixed, "ns/12/extract-1 sha256:c", "sha256:c"),
            "ns/12/sha256:c"
        );
        assert_eq!(adopted_name(KeyStyle::Prefixed, "odd-key", "sha256:c"), "sha256:c");
        assert_eq!(adopted_name(KeyStyle::Prefixed, "ns/x/key", "sha256:c"), "sha256:c");
        assert_eq!(adopted_name(KeyStyle::Namespaced, "ns/12/key", "sha256:c"), "sha256:c");
    }

    #[test]
    fn usage_counts_active_and_keeps_committed() {
        let (_t, s) = open(true);
        s.prepare(KeyStyle::Prefixed, "a", "", Labels::new()).unwrap();
        let up = upper(&s, "a");
        std::fs::write(format!("{up}/f"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(format!("{up}/f"), format!("{up}/g")).unwrap();
        let u = s.usage(KeyStyle::Prefixed, "a").unwrap();
        assert_eq!(u.inodes, 2, "root dir and one file, hard link once");
        assert!(u.size >= 64 * 1024, "{u:?}");
        s.commit(KeyStyle::Prefixed, "A", "a", Labels::new()).unwrap();
        assert_eq!(s.usage(KeyStyle::Prefixed, "A").unwrap(), u);
        let info = s.stat(KeyStyle::Prefixed, "A").unwrap();
        assert_eq!(info.labels.get(LABEL_UPPERDIR), Some(&up));
        assert_eq!(info.kind, Kind::Committed);
    }

    #[test]
    fn list_filters_and_update() {
        let (_t, s) = open(false);
        s.prepare(KeyStyle::Prefixed, "a", "", labels(&[("x", "1")])).unwrap();
        s.commit(KeyStyle::Prefixed, "A", "a", labels(&[("x", "1")])).unwrap();
        s.prepare(KeyStyle::Prefixed, "b", "A", labels(&[("x", "2")])).unwrap();
        let names = |f: &[&str]| -> Vec<String> {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            s.list(&f).unwrap().into_iter().map(|i| i.name).collect()
        };
        assert_eq!(names(&[]), vec!["A", "b"]);
        assert_eq!(names(&["kind==active"]), vec!["b"]);
        assert_eq!(names(&["parent==A"]), vec!["b"]);
        assert_eq!(names(&["labels.x==1", "kind==active"]), vec!["A", "b"]);
        let info = s
            .update(KeyStyle::Prefixed, "b", labels(&[("y", "3")]), vec!["labels.y".into()])
            .unwrap();
        assert_eq!(info.labels, labels(&[("x", "2"), ("y", "3")]));
        assert!(info.updated > info.created);
    }

    #[test]
    fn container_snapshot_is_found_in_both_key_styles_and_captured() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = Arc::new(RecordingSystem::btrfs());
        let s = Snapshotter::open(tmp.path(), &Config::default(), fake.clone()).unwrap();
        s.prepare(KeyStyle::Prefixed, "base", "", Labels::new()).unwrap();
        s.commit(KeyStyle::Prefixed, "ns1/1/sha256:l1", "base", Labels::new())
            .unwrap();
        s.prepare(KeyStyle::Prefixed, "ns1/7/web", "ns1/1/sha256:l1", Labels::new())
            .unwrap();
        s.prepare(KeyStyle::Prefixed, "ns2/8/web", "ns1/1/sha256:l1", Labels::new())
            .unwrap();
        s.prepare(KeyStyle::Namespaced, "db", "", Labels::new()).unwrap();
        let (key, id) = s.container_snapshot("ns1", "web").unwrap();
        assert_eq!(key, "ns1/7/web");
        assert_eq!(s.container_snapshot("ns2", "web").unwrap().0, "ns2/8/web");
        assert_eq!(s.container_snapshot("any", "db").unwrap().0, "db");
        let e = s.container_snapshot("ns1", "sha256:l1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "committed layers are not containers");
        assert_eq!(
            s.container_snapshot("ns3", "web").unwrap_err().kind(),
            ErrorKind::NotFound
        );

        let site = s.capture_site(id, "snapshot-ns1-1").unwrap();
        assert_eq!(site.dest, tmp.path().join("captures/snapshot-ns1-1"));
        assert_eq!(site.subvolume, s.storage.snapshot_dir(id));
        assert!(site.snapshots, "btrfs snapshots in O(1)");
        for bad in ["../escape", "a/b", ""] {
            let e = s.capture_site(id, bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn restart_removes_orphans_and_keeps_snapshots() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.storage.backend = BackendChoice::Directory;
        let sys: Arc<dyn SystemOps> = Arc::new(RecordingSystem::plain());
        let kept = {
            let s = Snapshotter::open(tmp.path(), &config, sys.clone()).unwrap();
            s.prepare(KeyStyle::Prefixed, "a", "", Labels::new()).unwrap();
            let up = upper(&s, "a");
            std::fs::write(format!("{up}/data"), b"kept").unwrap();
            s.commit(KeyStyle::Prefixed, "A", "a", Labels::new()).unwrap();
            // As if a Prepare crashed after making its directory.
            std::fs::create_dir_all(s.storage.snapshots_dir().join("99/fs")).unwrap();
            up
        };
        let s = Snapshotter::open(tmp.path(), &config, sys).unwrap();
        assert!(!s.storage.snapshots_dir().join("99").exists());
        assert_eq!(std::fs::read(format!("{kept}/data")).unwrap(), b"kept");
        assert_eq!(s.stat(KeyStyle::Prefixed, "A").unwrap().kind, Kind::Committed);
    }
}
