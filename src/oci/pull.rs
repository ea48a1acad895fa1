//! Pulling an image from a registry into containerd and unpacking it on a
//! snapshotter the way containerd's unpacker does when CRI pulls: each
//! layer's Prepare carries the labels a remote snapshotter needs (the
//! image reference, the layer's digest, the layer's `containerd.io/snapshot/`
//! annotations), so that the seamless snapshotter adopts Nydus data blobs
//! itself, answering AlreadyExists, and containerd applies only the layers
//! it is left with. containerd 1.6's `ctr images pull` passes none of them.
//!
//! Owns the order of the calls, the chain ids and the labels; the registry
//! client ([`crate::oci::registry`]) reads the registry within its bounds
//! and `host::containerd` makes the calls. Knows nothing of what a
//! snapshotter does with the labels.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tracing::{info, instrument, warn};

use crate::error::{Classify, ErrorKind, IoError};
use crate::host::containerd::{Containerd, ContainerdError, ContentDescriptor, ContentWrite, WRITE_CHUNK_BYTES};
use crate::oci::digest::hex;
use crate::oci::registry::{OciDescriptor, PulledManifest, RegistryAuth, RegistryClient, RegistryError};

/// The chain id a layer is committed as; containerd's unpacker sets it on
/// each Prepare so that a snapshotter may find the layer already there.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// The image reference, the layer's digest, the manifest's digest and the
/// image's layer digests, as containerd's CRI image handler adds them.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Layer annotations with this prefix reach the snapshotter as labels.
pub const SNAPSHOT_ANNOTATION_PREFIX: &str = "containerd.io/snapshot/";
/// containerd's cap on one label, key and value together; the CRI handler
/// cuts the list of layer digests to fit it.
const MAX_LABEL_BYTES: usize = 4096;
/// How long containerd keeps what the pull made if the pull dies before it
/// deletes its lease.
pub const LEASE_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error("image {reference}: {message}")]
    InvalidImage { reference: String, message: String },
    #[error("image {reference}: layer {digest} unpacked to {applied}, but its config names diff id {expected}")]
    DiffIdMismatch {
        reference: String,
        digest: String,
        expected: String,
        applied: String,
    },
    #[error(transparent)]
    Io(#[from] IoError),
}

impl Classify for PullError {
    fn kind(&self) -> ErrorKind {
        match self {
            PullError::Registry(e) => e.kind(),
            PullError::Containerd(e) => e.kind(),
            PullError::InvalidImage { .. } | PullError::DiffIdMismatch { .. } => ErrorKind::InvalidArgument,
            PullError::Io(_) => ErrorKind::Internal,
        }
    }
}

impl PullError {
    /// The registry refused the credentials (or gave none).
    pub fn is_permission(&self) -> bool {
        matches!(self, PullError::Registry(e) if e.is_permission())
    }

    /// The registry could not be reached or timed out.
    pub fn is_network(&self) -> bool {
        matches!(self, PullError::Registry(e) if e.is_network())
    }
}

/// What became of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The snapshotter answered the Prepare with AlreadyExists: it made the
    /// layer itself (a Nydus data blob), or another pull made it meanwhile.
    Adopted,
    /// Downloaded, applied by containerd's diff service and committed.
    Unpacked,
    /// The snapshot of its chain id was there before.
    Exists,
}

impl LayerOutcome {
    pub fn describe(self) -> &'static str {
        match self {
            LayerOutcome::Adopted => "adopted by the snapshotter",
            LayerOutcome::Unpacked => "unpacked",
            LayerOutcome::Exists => "exists",
        }
    }
}

/// One layer's report, in manifest order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    pub digest: String,
    pub size: u64,
    pub outcome: LayerOutcome,
}

/// Where to pull to.
#[derive(Debug, Clone)]
pub struct PullTarget {
    pub namespace: String,
    pub snapshotter: String,
}

/// What the images store holds after the pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    pub name: String,
    pub manifest_digest: String,
}

/// The part of an image config a pull reads.
#[derive(Debug, Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// The chain ids of layers with `diff_ids`, bottom first: the first is its
/// diff id, each next one `sha256(<previous chain id> + " " + <diff id>)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(previous) => {
                let mut hasher = Sha256::new();
                hasher.update(previous.as_bytes());
                hasher.update(b" ");
                hasher.update(diff_id.as_bytes());
                format!("sha256:{}", hex(&hasher.finalize()))
            }
        };
        chain.push(next);
    }
    chain
}

/// The labels of the Prepare of layer `index` of `manifest`: its chain id,
/// the image's details, and the layer's `containerd.io/snapshot/`
/// annotations.
pub fn layer_labels(
    reference: &str,
    manifest_digest: &str,
    layers: &[OciDescriptor],
    index: usize,
    chain_id: &str,
) -> HashMap<String, String> {
    let layer = &layers[index];
    let mut labels = HashMap::new();
    for (key, value) in layer.annotations.iter().flatten() {
        if key.starts_with(SNAPSHOT_ANNOTATION_PREFIX) {
            labels.insert(key.clone(), value.clone());
        }
    }
    labels.insert(LABEL_SNAPSHOT_REF.to_string(), chain_id.to_string());
    labels.insert(LABEL_IMAGE_REF.to_string(), reference.to_string());
    labels.insert(LABEL_LAYER_DIGEST.to_string(), layer.digest.clone());
    labels.insert(LABEL_MANIFEST_DIGEST.to_string(), manifest_digest.to_string());
    labels.insert(
        LABEL_IMAGE_LAYERS.to_string(),
        image_layers_label(LABEL_IMAGE_LAYERS, &layers[index..]),
    );
    labels
}

/// The digests of `layers` (this one and those above it), comma-separated,
/// as many as fit in one label, as containerd's CRI handler writes them.
fn image_layers_label(key: &str, layers: &[OciDescriptor]) -> String {
    let mut value = String::new();
    for layer in layers {
        let extra = usize::from(!value.is_empty()) + layer.digest.len();
        if key.len() + value.len() + extra > MAX_LABEL_BYTES {
            break;
        }
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(&layer.digest);
    }
    value
}

/// The garbage collection labels of the manifest: it keeps its config and
/// its layers' blobs.
pub fn manifest_labels(manifest: &PulledManifest) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(
        "containerd.io/gc.ref.content.config".to_string(),
        manifest.manifest.config.digest.clone(),
    );
    for (i, layer) in manifest.manifest.layers.iter().enumerate() {
        labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), layer.digest.clone());
    }
    labels
}

/// The media type of the manifest's record: the one it states, else OCI's.
fn manifest_media_type(manifest: &PulledManifest) -> String {
    manifest
        .manifest
        .media_type
        .clone()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_string())
}

/// A name no other pull of this host uses at the same time: the time, the
/// process and a counter.
fn unique_part() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{nanos}-{}-{n}", std::process::id())
}

/// The key of a layer's active snapshot while it is unpacked, in
/// containerd's `extract-<unique> <chain id>` form.
fn extract_key(chain_id: &str) -> String {
    format!("extract-{} {chain_id}", unique_part())
}

/// Pulls `reference` into containerd, unpacked on `target.snapshotter`,
/// and points image record `reference` at its manifest. `progress` hears of
/// each layer once it is done. Everything is made under a lease that
/// expires by itself: a failed pull leaves no image record, and containerd
/// collects what it made.
#[instrument(level = "info", err(level = "info"), skip_all, fields(reference = %reference, namespace = %target.namespace))]
pub async fn pull_image(
    registry: &RegistryClient,
    auth: &RegistryAuth,
    containerd: &Containerd,
    target: &PullTarget,
    reference: &str,
    progress: &mut (dyn FnMut(&LayerReport) + Send),
) -> Result<PulledImage, PullError> {
    let pulled = registry.pull_manifest_and_config(reference, auth).await?;
    let config: ImageConfig = serde_json::from_slice(&pulled.config).map_err(|e| PullError::InvalidImage {
        reference: reference.to_string(),
        message: format!("config {}: {e}", pulled.manifest.config.digest),
    })?;
    let layers = &pulled.manifest.layers;
    if config.rootfs.diff_ids.len() != layers.len() {
        return Err(PullError::InvalidImage {
            reference: reference.to_string(),
            message: format!(
                "the manifest has {} layers, its config {} diff ids",
                layers.len(),
                config.rootfs.diff_ids.len()
            ),
        });
    }
    for id in &config.rootfs.diff_ids {
        crate::oci::registry::Digest::parse(id).map_err(|e| PullError::InvalidImage {
            reference: reference.to_string(),
            message: format!("config diff id: {e}"),
        })?;
    }
    let chain = chain_ids(&config.rootfs.diff_ids);
    let lease = format!("seamless-pull-{}", unique_part());
    containerd
        .create_expiring_lease(&target.namespace, &lease, LEASE_LIFETIME, HashMap::new())
        .await?;
    let result = pull_under_lease(
        registry, auth, containerd, target, reference, &pulled, &chain, &config, &lease, progress,
    )
    .await;
    if let Err(e) = containerd.delete_lease(&target.namespace, &lease).await {
        warn!(lease, error = %e, "deleting the pull's lease; containerd drops it when it expires");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn pull_under_lease(
    registry: &RegistryClient,
    auth: &RegistryAuth,
    containerd: &Containerd,
    target: &PullTarget,
    reference: &str,
    pulled: &PulledManifest,
    chain: &[String],
    config: &ImageConfig,
    lease: &str,
    progress: &mut (dyn FnMut(&LayerReport) + Send),
) -> Result<PulledImage, PullError> {
    let ns = target.namespace.as_str();
    let mut config_labels = HashMap::new();
    if let Some(top) = chain.last() {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", target.snapshotter),
            top.clone(),
        );
    }
    write_small(
        containerd,
        ns,
        lease,
        &pulled.manifest.config.digest,
        &pulled.config,
        config_labels,
    )
    .await?;
    let work = tempfile::Builder::new()
        .prefix("seamless-pull-")
        .tempdir()
        .map_err(crate::error::io_err("create pull directory", &std::env::temp_dir()))?;
    for (i, layer) in pulled.manifest.layers.iter().enumerate() {
        let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        let outcome = unpack_layer(
            registry,
            auth,
            containerd,
            target,
            reference,
            pulled,
            i,
            &chain[i],
            parent,
            &config.rootfs.diff_ids[i],
            lease,
            work.path(),
        )
        .await?;
        let report = LayerReport {
            digest: layer.digest.clone(),
            size: u64::try_from(layer.size).unwrap_or(0),
            outcome,
        };
        info!(digest = %report.digest, outcome = outcome.describe(), "layer");
        progress(&report);
    }
    // The manifest last: its labels name blobs, which must all be there.
    write_small(
        containerd,
        ns,
        lease,
        &pulled.manifest_digest,
        &pulled.manifest_bytes,
        manifest_labels(pulled),
    )
    .await?;
    let manifest = ContentDescriptor {
        media_type: manifest_media_type(pulled),
        digest: pulled.manifest_digest.clone(),
        size: pulled.manifest_bytes.len() as i64,
    };
    containerd.put_image(ns, reference, &manifest).await?;
    Ok(PulledImage {
        name: reference.to_string(),
        manifest_digest: pulled.manifest_digest.clone(),
    })
}

async fn write_small(
    containerd: &Containerd,
    namespace: &str,
    lease: &str,
    digest: &str,
    bytes: &[u8],
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    let chunks: Vec<Vec<u8>> = bytes.chunks(WRITE_CHUNK_BYTES).map(<[u8]>::to_vec).collect();
    containerd
        .write_content(
            namespace,
            lease,
            &format!("seamless-pull-{digest}"),
            ContentWrite {
                digest: digest.to_string(),
                size: bytes.len() as i64,
                labels,
            },
            tokio_stream::iter(chunks),
        )
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn unpack_layer(
    registry: &RegistryClient,
    auth: &RegistryAuth,
    containerd: &Containerd,
    target: &PullTarget,
    reference: &str,
    pulled: &PulledManifest,
    index: usize,
    chain_id: &str,
    parent: &str,
    diff_id: &str,
    lease: &str,
    work: &Path,
) -> Result<LayerOutcome, PullError> {
    let ns = target.namespace.as_str();
    let sn = target.snapshotter.as_str();
    if containerd.snapshot_exists(ns, sn, chain_id).await? {
        return Ok(LayerOutcome::Exists);
    }
    let layers = &pulled.manifest.layers;
    let layer = &layers[index];
    let labels = layer_labels(reference, &pulled.manifest_digest, layers, index, chain_id);
    let key = extract_key(chain_id);
    let mounts = match containerd
        .prepare_labelled_snapshot(ns, lease, sn, &key, parent, labels.clone())
        .await
    {
        Ok(mounts) => mounts,
        Err(ContainerdError::Exists { .. }) => {
            if containerd.snapshot_exists(ns, sn, chain_id).await? {
                return Ok(LayerOutcome::Adopted);
            }
            return Err(PullError::InvalidImage {
                reference: reference.to_string(),
                message: format!(
                    "the snapshotter answered AlreadyExists for layer {}, yet has no snapshot {chain_id}",
                    layer.digest
                ),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let unpacked = fetch_apply_commit(
        registry, auth, containerd, target, reference, layer, diff_id, &key, chain_id, labels, mounts, lease, work,
    )
    .await;
    if unpacked.is_err() {
        if let Err(e) = containerd.remove_snapshot(ns, sn, &key).await {
            warn!(key, error = %e, "removing the snapshot of a failed unpack; the lease's expiry collects it");
        }
    }
    unpacked
}

#[allow(clippy::too_many_arguments)]
async fn fetch_apply_commit(
    registry: &RegistryClient,
    auth: &RegistryAuth,
    containerd: &Containerd,
    target: &PullTarget,
    reference: &str,
    layer: &OciDescriptor,
    diff_id: &str,
    key: &str,
    chain_id: &str,
    labels: HashMap<String, String>,
    mounts: Vec<containerd_client::types::Mount>,
    lease: &str,
    work: &Path,
) -> Result<LayerOutcome, PullError> {
    let ns = target.namespace.as_str();
    let size = u64::try_from(layer.size).map_err(|_| PullError::InvalidImage {
        reference: reference.to_string(),
        message: format!("layer {} has a negative size", layer.digest),
    })?;
    if containerd.content_size(ns, &layer.digest).await?.is_none() {
        let digest = crate::oci::registry::Digest::parse(&layer.digest).map_err(|e| PullError::InvalidImage {
            reference: reference.to_string(),
            message: format!("layer: {e}"),
        })?;
        let file = work.join(digest.hex());
        registry
            .pull_blob_to(reference, &layer.digest, size, &file, auth)
            .await?;
        let chunks = file_chunks(file.clone());
        let written = containerd
            .write_content(
                ns,
                lease,
                &format!("seamless-pull-{}", layer.digest),
                ContentWrite {
                    digest: layer.digest.clone(),
                    size: layer.size,
                    labels: HashMap::new(),
                },
                chunks,
            )
            .await;
        let _ = std::fs::remove_file(&file);
        written?;
    }
    let descriptor = ContentDescriptor {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size,
    };
    let applied = containerd.apply_layer(ns, lease, &descriptor, mounts).await?;
    if applied != diff_id {
        return Err(PullError::DiffIdMismatch {
            reference: reference.to_string(),
            digest: layer.digest.clone(),
            expected: diff_id.to_string(),
            applied,
        });
    }
    // Known uncompressed once applied, as containerd's unpacker records it.
    let uncompressed = HashMap::from([("containerd.io/uncompressed".to_string(), applied)]);
    containerd.label_content(ns, &layer.digest, uncompressed).await?;
    match containerd
        .commit_snapshot(ns, lease, &target.snapshotter, chain_id, key, labels)
        .await
    {
        Ok(()) => Ok(LayerOutcome::Unpacked),
        // Another pull committed the same layer meanwhile.
        Err(ContainerdError::Exists { .. }) => {
            if let Err(e) = containerd.remove_snapshot(ns, &target.snapshotter, key).await {
                warn!(key, error = %e, "removing a snapshot another pull beat; the lease's expiry collects it");
            }
            Ok(LayerOutcome::Exists)
        }
        Err(e) => Err(e.into()),
    }
}

/// The bytes of `file` in chunks, read on a blocking thread. A read error
/// ends the stream early, which the content store's size check refuses.
fn file_chunks(file: std::path::PathBuf) -> impl tokio_stream::Stream<Item = Vec<u8>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = match std::fs::File::open(&file) {
            Ok(f) => f,
            Err(e) => {
                warn!(file = %file.display(), error = %e, "opening a downloaded layer");
                return;
            }
        };
        loop {
            let mut chunk = vec![0u8; WRITE_CHUNK_BYTES];
            match f.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.blocking_send(chunk).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    warn!(file = %file.display(), error = %e, "reading a downloaded layer");
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(digest: &str, annotations: &[(&str, &str)]) -> OciDescriptor {
        OciDescriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: digest.into(),
            size: 10,
            urls: None,
            artifact_type: None,
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = format!("sha256:{}", "c".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(ids[0], a);
        let ab = format!(
            "sha256:{}",
            crate::oci::digest::sha256_hex(format!("{a} {b}").as_bytes())
        );
        assert_eq!(ids[1], ab);
        let abc = format!(
            "sha256:{}",
            crate::oci::digest::sha256_hex(format!("{ab} {c}").as_bytes())
        );
        assert_eq!(ids[2], abc);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn layer_labels_carry_the_image_and_the_snapshot_annotations() {
        let layers = vec![
            layer(
                "sha256:blob1",
                &[("containerd.io/snapshot/nydus-blob", "true"), ("org.other", "x")],
            ),
            layer("sha256:boot", &[("containerd.io/snapshot/nydus-bootstrap", "true")]),
        ];
        let labels = layer_labels("localhost:5000/app:nydus", "sha256:man", &layers, 0, "sha256:chain0");
        assert_eq!(labels[LABEL_SNAPSHOT_REF], "sha256:chain0");
        assert_eq!(labels[LABEL_IMAGE_REF], "localhost:5000/app:nydus");
        assert_eq!(labels[LABEL_LAYER_DIGEST], "sha256:blob1");
        assert_eq!(labels[LABEL_MANIFEST_DIGEST], "sha256:man");
        assert_eq!(labels[LABEL_IMAGE_LAYERS], "sha256:blob1,sha256:boot");
        assert_eq!(labels["containerd.io/snapshot/nydus-blob"], "true");
        assert!(
            !labels.contains_key("org.other"),
            "only snapshot annotations become labels"
        );
        let top = layer_labels("r", "sha256:man", &layers, 1, "sha256:chain1");
        assert_eq!(top[LABEL_IMAGE_LAYERS], "sha256:boot");
        assert_eq!(top["containerd.io/snapshot/nydus-bootstrap"], "true");
        assert!(!top.contains_key("containerd.io/snapshot/nydus-blob"));
    }

    #[test]
    fn the_image_layers_label_fits_in_one_label() {
        let many: Vec<OciDescriptor> = (0..200).map(|i| layer(&format!("sha256:{i:064x}"), &[])).collect();
        let value = image_layers_label(LABEL_IMAGE_LAYERS, &many);
        assert!(LABEL_IMAGE_LAYERS.len() + value.len() <= MAX_LABEL_BYTES);
        assert!(value.starts_with(&many[0].digest));
        assert!(!value.ends_with(','));
        assert_eq!(
            value.split(',').count(),
            (MAX_LABEL_BYTES - LABEL_IMAGE_LAYERS.len() + 1) / 72
        );
    }

    #[test]
    fn extract_keys_are_unique_and_name_the_chain_id() {
        let a = extract_key("sha256:c");
        let b = extract_key("sha256:c");
        assert_ne!(a, b);
        assert!(a.starts_with("extract-") && a.ends_with(" sha256:c"), "{a}");
    }
}
