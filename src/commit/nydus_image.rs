//! Nydus images of commits: the layers and config of a Nydus image made
//! from a commit's layer tars, on a Nydus base image (its blobs reused, its
//! bootstrap the parent) or an OCI base image (its layers converted to Nydus
//! blobs, in parallel). The image is laid out as nydusify writes one: a data
//! blob layer per blob, then the bootstrap layer; the config's diff_ids
//! follow the layers. Registry access and job state belong to `commit`.
//!
//! A base image's manifest comes from containerd's content store or a
//! registry: its layer digests are parsed as [`Digest`]s before one names a
//! file, and every download is bounded by its descriptor's size. A base
//! blob is copied from the content store when it holds it (verified there,
//! see `content`), and fetched from the source registry only otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::commit::chain::{CommitLayer, Plan};
use crate::commit::image::{derive_config, BuiltLayer};
use crate::nydus::{self, LayerBuild, RafsOptions};
use crate::oci::content::ContentStore;
use crate::oci::credentials::RequestAuth;
use crate::oci::registry::{Digest, LayerData, LayerSource, PulledManifest, RegistryAuth, RegistryClient};

/// What the commit hands over to make its Nydus image.
#[derive(Debug, Clone)]
pub struct Input {
    pub source_image: String,
    pub target: String,
    pub target_insecure: bool,
    pub source_insecure: bool,
    pub snapshot_id: String,
    pub started: SystemTime,
    pub options: RafsOptions,
    /// The previous commit's bootstrap layer, for an incremental commit.
    pub previous_bootstrap: Option<CommitLayer>,
    /// Where OCI base layers converted to Nydus are kept for later commits.
    pub cache: Option<BaseCache>,
    /// containerd's content store, asked for base blobs before the source
    /// registry.
    pub base_store: Option<ContentStore>,
    /// The request's credentials, by registry.
    pub auth: RequestAuth,
}

/// Where OCI base layers converted to Nydus are kept, and how much room
/// they may take: past it, the least recently used go first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseCache {
    pub dir: PathBuf,
    pub limit_bytes: u64,
}

/// An entry used this recently may belong to a job still running: it is
/// never evicted.
const CACHE_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The image to push and the chain's new state, as a format's assembly
/// (OCI in `commit`, Nydus here) hands it to the push.
#[derive(Debug, Clone)]
pub struct Assembled {
    /// In manifest order.
    pub layers: Vec<LayerSource>,
    pub config: Vec<u8>,
    /// The commit layers (blobs, for Nydus) above the base image's.
    pub commit_layers: Vec<CommitLayer>,
    /// A Nydus image's bootstrap layer.
    pub bootstrap: Option<CommitLayer>,
}

/// A layer the image shares with an image already in a registry: fetched
/// from `from` only when the target lacks it.
#[derive(Debug, Clone)]
pub struct Reused {
    pub layer: LayerSource,
    pub from: String,
    pub insecure: bool,
}

impl Reused {
    /// A layer of the image `from` as its manifest describes it.
    pub fn of(descriptor: &crate::oci::registry::OciDescriptor, from: &str, insecure: bool) -> Reused {
        Reused {
            layer: LayerSource {
                media_type: descriptor.media_type.clone(),
                digest: descriptor.digest.clone(),
                size: descriptor.size.max(0) as u64,
                annotations: descriptor.annotations.clone().unwrap_or_default(),
                data: LayerData::InTarget,
            },
            from: from.to_string(),
            insecure,
        }
    }
}

/// Reports progress (fraction of the whole job, stage) to the job.
pub type Progress<'a> = &'a mut (dyn FnMut(f64, &str) + Send);

/// Makes the Nydus image: base blobs and bootstrap, the commit's blobs built
/// from `tars` (in image order, from the commit's plan) on top, the merged
/// bootstrap last.
#[allow(clippy::too_many_arguments)]
pub async fn assemble(
    input: &Input,
    plan: &Plan,
    base: &PulledManifest,
    tars: Vec<BuiltLayer>,
    source: &RegistryClient,
    target: &RegistryClient,
    work: &Path,
    progress: Progress<'_>,
) -> Result<Assembled, String> {
    let blob_dir = work.join("blobs");
    let (base_bootstrap, base_layers) = if is_nydus(&base.manifest.layers) {
        progress(0.2, "reading the base bootstrap");
        nydus_base(input, base, source, work).await?
    } else {
        convert_oci_base(input, base, source, work, &blob_dir, progress).await?
    };
    let base_diff_ids: Vec<String> = base_layers.iter().map(|r| r.layer.digest.clone()).collect();

    progress(0.5, "building the RAFS layer");
    let (mut parent, mut commit_layers) = match plan {
        Plan::Incremental { keep, .. } => {
            let bootstrap = input
                .previous_bootstrap
                .as_ref()
                .ok_or("the commit chain has no bootstrap to build on")?;
            let layer = work.join("previous-bootstrap.tar.gz");
            fetch_blob(
                target,
                bootstrap,
                &layer,
                &input.auth.for_reference(&bootstrap.pushed_to),
            )
            .await?;
            let boot = work.join("previous.boot");
            nydus::unpack_bootstrap_layer(&layer, &boot).map_err(|e| e.to_string())?;
            (boot, keep.clone())
        }
        Plan::Full | Plan::Merge { .. } => (base_bootstrap, Vec::new()),
    };
    let kept = commit_layers.len();
    let mut new_blobs = Vec::new();
    for (i, BuiltLayer { parts, created_by }) in tars.into_iter().enumerate() {
        // A commit that changed nothing since the last adds no blob.
        if parts.iter().all(|(blob, _)| blob.entries == 0) && plan.previous().is_some() {
            continue;
        }
        let options = input.options;
        let dir = blob_dir.clone();
        let out = work.join(format!("commit-{i}.boot"));
        let from = parent.clone();
        let tars: Vec<PathBuf> = parts.into_iter().map(|(_, path)| path).collect();
        let built =
            tokio::task::spawn_blocking(move || nydus::build_from_parts(&tars, Some(&from), &options, &out, &dir))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        parent = built.bootstrap;
        for blob in built.blobs {
            commit_layers.push(CommitLayer {
                media_type: nydus::BLOB_MEDIA_TYPE.to_string(),
                digest: blob.digest(),
                diff_id: blob.digest(),
                size: blob.size,
                pushed_to: input.target.clone(),
                insecure: input.target_insecure,
                created_by: created_by.clone(),
                created: input.started,
            });
            new_blobs.push(blob);
        }
    }

    progress(0.6, "fetching base layers");
    let mut reused = base_layers;
    reused.extend(commit_layers[..kept].iter().map(|l| Reused {
        layer: blob_source(l, LayerData::InTarget),
        from: l.pushed_to.clone(),
        insecure: l.insecure,
    }));
    let mut layers = resolve_reused(
        target,
        &input.target,
        reused,
        input.base_store.as_ref(),
        &input.auth,
        work,
        progress,
    )
    .await?;
    for blob in &new_blobs {
        // Every new blob was recorded in `commit_layers` above.
        let layer = commit_layers
            .iter()
            .find(|l| l.digest == blob.digest())
            .expect("new blob recorded");
        layers.push(blob_source(layer, LayerData::File(blob.path.clone())));
    }

    let packed = nydus::pack_bootstrap_layer(&parent, &work.join("bootstrap.tar.gz")).map_err(|e| e.to_string())?;
    let bootstrap = CommitLayer {
        media_type: nydus::BOOTSTRAP_MEDIA_TYPE.to_string(),
        digest: packed.digest.clone(),
        diff_id: packed.diff_id.clone(),
        size: packed.size,
        pushed_to: input.target.clone(),
        insecure: input.target_insecure,
        created_by: format!("seamless-commit {}: nydus bootstrap", input.snapshot_id),
        created: input.started,
    };
    let commit_blobs: Vec<&str> = commit_layers.iter().map(|l| l.digest.as_str()).collect();
    layers.push(LayerSource {
        media_type: bootstrap.media_type.clone(),
        digest: bootstrap.digest.clone(),
        size: bootstrap.size,
        annotations: BTreeMap::from([
            (nydus::ANNOTATION_BOOTSTRAP.to_string(), "true".to_string()),
            (
                nydus::ANNOTATION_FS_VERSION.to_string(),
                input.options.fs_version.to_string(),
            ),
            (nydus::ANNOTATION_COMMIT_BLOBS.to_string(), commit_blobs.join(",")),
        ]),
        data: LayerData::File(packed.path),
    });
    let mut on_top = commit_layers.clone();
    on_top.push(bootstrap.clone());
    let config = derive_config(&with_diff_ids(&base.config, &base_diff_ids)?, &on_top)?;
    Ok(Assembled {
        layers,
        config,
        commit_layers,
        bootstrap: Some(bootstrap),
    })
}

/// Whether a manifest's layers are a Nydus image's (one is a bootstrap).
pub fn is_nydus(layers: &[crate::oci::registry::OciDescriptor]) -> bool {
    layers.iter().any(|l| has_annotation(l, nydus::ANNOTATION_BOOTSTRAP))
}

fn has_annotation(layer: &crate::oci::registry::OciDescriptor, key: &str) -> bool {
    layer
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .is_some_and(|v| v == "true")
}

/// A Nydus base: its bootstrap (fetched) and its blob layers (reused).
async fn nydus_base(
    input: &Input,
    base: &PulledManifest,
    source: &RegistryClient,
    work: &Path,
) -> Result<(PathBuf, Vec<Reused>), String> {
    let descriptor = base
        .manifest
        .layers
        .iter()
        .rev()
        .find(|l| has_annotation(l, nydus::ANNOTATION_BOOTSTRAP))
        .ok_or("the base image has no Nydus bootstrap layer")?;
    let layer = work.join("base-bootstrap.tar.gz");
    let size = declared_size(input, descriptor)?;
    if !copy_from_store(input.base_store.as_ref(), &descriptor.digest, size, &layer).await {
        source
            .pull_blob_to(
                &input.source_image,
                &descriptor.digest,
                size,
                &layer,
                &input.auth.for_reference(&input.source_image),
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    let boot = work.join("base.boot");
    nydus::unpack_bootstrap_layer(&layer, &boot).map_err(|e| e.to_string())?;
    let version = nydus::bootstrap_fs_version(&boot).map_err(|e| e.to_string())?;
    let wanted = input.options.fs_version;
    if version != wanted {
        return Err(format!(
            "the base image {} is RAFS v{version}, a commit on it cannot be RAFS v{wanted}: use --fs-version {version}",
            input.source_image
        ));
    }
    let blobs = base
        .manifest
        .layers
        .iter()
        .filter(|l| has_annotation(l, nydus::ANNOTATION_BLOB))
        .map(|l| Reused::of(l, &input.source_image, input.source_insecure))
        .collect();
    Ok((boot, blobs))
}

/// An OCI base: every layer converted to a Nydus blob, on its own and in
/// parallel (one build per core), then merged into the base bootstrap.
async fn convert_oci_base(
    input: &Input,
    base: &PulledManifest,
    source: &RegistryClient,
    work: &Path,
    blob_dir: &Path,
    progress: Progress<'_>,
) -> Result<(PathBuf, Vec<Reused>), String> {
    let total = base.manifest.layers.len().max(1) as f64;
    // The digests name cache entries: checked before any is used.
    let digests = base
        .manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| Digest::parse(&l.digest).map_err(|e| format!("base image {} layer {i}: {e}", input.source_image)))
        .collect::<Result<Vec<Digest>, String>>()?;
    let cache_of = |digest: &Digest| {
        input.cache.as_ref().map(|cache| {
            cache.dir.join(format!(
                "{}-v{}-{}",
                digest.hex(),
                input.options.fs_version,
                input.options.compressor.as_str()
            ))
        })
    };
    // Per base layer: its converted parts, from the cache or to build.
    let mut converted: Vec<Option<Vec<LayerBuild>>> = Vec::new();
    let mut to_build: Vec<(usize, PathBuf)> = Vec::new();
    for (i, (descriptor, digest)) in base.manifest.layers.iter().zip(&digests).enumerate() {
        if let Some(cached) = cache_of(digest).and_then(|dir| load_cached(&dir)) {
            converted.push(Some(cached));
            continue;
        }
        converted.push(None);
        progress(0.15 + 0.1 * i as f64 / total, "fetching base layers to convert");
        let compressed = work.join(format!("base-{i}.blob"));
        let size = declared_size(input, descriptor)?;
        if !copy_from_store(input.base_store.as_ref(), digest.as_str(), size, &compressed).await {
            source
                .pull_blob_to(
                    &input.source_image,
                    digest.as_str(),
                    size,
                    &compressed,
                    &input.auth.for_reference(&input.source_image),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        let tar = work.join(format!("base-{i}.tar"));
        let media_type = descriptor.media_type.clone();
        let from = compressed.clone();
        let to = tar.clone();
        tokio::task::spawn_blocking(move || decompress_layer(&media_type, &from, &to))
            .await
            .map_err(|e| e.to_string())??;
        let _ = std::fs::remove_file(&compressed);
        to_build.push((i, tar));
    }
    progress(0.3, "converting base layers to RAFS");
    let options = input.options;
    let dir = blob_dir.to_path_buf();
    let parts_dir = work.join("base-parts");
    let built = tokio::task::spawn_blocking(move || -> Result<Vec<(usize, LayerBuild)>, String> {
        // Every layer, and every part of a big one, is built at once.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut parts = Vec::new();
        let mut owners = Vec::new();
        for (i, tar) in &to_build {
            let split = nydus::split_tar(tar, cores, nydus::MIN_PART_BYTES, &parts_dir.join(i.to_string()))
                .map_err(|e| e.to_string())?;
            owners.extend(std::iter::repeat_n(*i, split.len()));
            parts.extend(split);
        }
        let builds = nydus::build_layers_parallel(&parts, None, &options, &dir).map_err(|e| e.to_string())?;
        Ok(owners.into_iter().zip(builds).collect())
    })
    .await
    .map_err(|e| e.to_string())??;
    for (i, build) in built {
        converted[i].get_or_insert_with(Vec::new).push(build);
    }
    for (digest, builds) in digests.iter().zip(converted.iter_mut()) {
        if let (Some(dir), Some(list)) = (cache_of(digest), builds.as_mut()) {
            if !dir.exists() {
                match store_cached(&dir, list) {
                    Ok(moved) => *list = moved,
                    Err(e) => tracing::warn!(cache = %dir.display(), error = %e, "cannot keep a converted base layer"),
                }
            }
        }
    }
    if let Some(cache) = &input.cache {
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || evict_cached(&cache, std::time::SystemTime::now()))
            .await
            .map_err(|e| e.to_string())?;
    }
    let builds: Vec<LayerBuild> = converted.into_iter().flatten().flatten().collect();
    let boot = work.join("base.boot");
    let out = boot.clone();
    let merged = builds.clone();
    tokio::task::spawn_blocking(move || nydus::merge_layers(None, &merged, None, &out))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let reused = builds
        .into_iter()
        .filter_map(|b| b.blob)
        .map(|blob| Reused {
            layer: LayerSource {
                media_type: nydus::BLOB_MEDIA_TYPE.to_string(),
                digest: blob.digest(),
                size: blob.size,
                annotations: nydus::blob_annotations(&blob.digest()),
                data: LayerData::File(blob.path),
            },
            from: input.target.clone(),
            insecure: input.target_insecure,
        })
        .collect();
    Ok((boot, reused))
}

/// The size a base image's manifest declares for a layer, which bounds its
/// download.
fn declared_size(input: &Input, descriptor: &crate::oci::registry::OciDescriptor) -> Result<u64, String> {
    u64::try_from(descriptor.size).map_err(|_| {
        format!(
            "base image {} layer {} declares {} bytes",
            input.source_image, descriptor.digest, descriptor.size
        )
    })
}

/// One part of a converted base layer as kept in the cache.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CachedPart {
    bootstrap: String,
    blob: Option<(String, u64)>,
}

const CACHE_INDEX: &str = "parts.json";

/// The converted parts of a base layer kept in `dir`, if all are there;
/// marks the entry used now.
fn load_cached(dir: &Path) -> Option<Vec<LayerBuild>> {
    let index_path = dir.join(CACHE_INDEX);
    let index: Vec<CachedPart> = serde_json::from_slice(&std::fs::read(&index_path).ok()?).ok()?;
    // The index's mtime is the entry's last use, for eviction.
    if let Ok(file) = std::fs::File::options().write(true).open(&index_path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
    index
        .into_iter()
        .map(|part| {
            // Names this module wrote; anything else is not an entry of ours.
            let plain_name =
                !part.bootstrap.is_empty() && !part.bootstrap.starts_with('.') && !part.bootstrap.contains('/');
            if !plain_name {
                return None;
            }
            let bootstrap = dir.join(&part.bootstrap);
            let blob = match part.blob {
                Some((blob_id, size)) => {
                    let blob_id = nydus::BlobId::parse(&blob_id).ok()?.to_string();
                    let path = dir.join(&blob_id);
                    if std::fs::metadata(&path).ok()?.len() != size {
                        return None;
                    }
                    Some(nydus::RafsBlob { path, blob_id, size })
                }
                None => None,
            };
            bootstrap.is_file().then_some(LayerBuild { bootstrap, blob })
        })
        .collect()
}

/// Removes the least recently used entries of `cache` until the rest fit its
/// limit, sparing any used within [`CACHE_GRACE`] of `now`.
fn evict_cached(cache: &BaseCache, now: std::time::SystemTime) {
    let Ok(entries) = std::fs::read_dir(&cache.dir) else {
        return;
    };
    let mut kept: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let dir = e.path();
            let used = std::fs::metadata(dir.join(CACHE_INDEX)).ok()?.modified().ok()?;
            let size = std::fs::read_dir(&dir)
                .ok()?
                .filter_map(|f| f.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum();
            Some((used, size, dir))
        })
        .collect();
    let mut total: u64 = kept.iter().map(|(_, size, _)| size).sum();
    kept.sort();
    for (used, size, dir) in kept {
        if total <= cache.limit_bytes {
            break;
        }
        if now.duration_since(used).unwrap_or_default() < CACHE_GRACE {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                total -= size;
                tracing::info!(entry = %dir.display(), bytes = size, "evicted a converted base layer");
            }
            Err(e) => tracing::warn!(entry = %dir.display(), error = %e, "cannot evict a converted base layer"),
        }
    }
}

/// Moves freshly converted parts into the cache directory `dir` (made
/// whole under a temporary name, then renamed) and returns them there.
fn store_cached(dir: &Path, parts: &[LayerBuild]) -> std::io::Result<Vec<LayerBuild>> {
    let parent = dir.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent)?;
    let staging = parent.join(format!(
        ".staging-{}-{}",
        std::process::id(),
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging)?;
    let mut index = Vec::new();
    let mut moved = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let name = format!("part-{i}.boot");
        std::fs::copy(&part.bootstrap, staging.join(&name))?;
        let blob = match &part.blob {
            Some(blob) => {
                std::fs::copy(&blob.path, staging.join(&blob.blob_id))?;
                Some(blob.clone())
            }
            None => None,
        };
        index.push(CachedPart {
            bootstrap: name.clone(),
            blob: blob.as_ref().map(|b| (b.blob_id.clone(), b.size)),
        });
        moved.push(LayerBuild {
            bootstrap: dir.join(&name),
            blob: blob.map(|b| nydus::RafsBlob {
                path: dir.join(&b.blob_id),
                ..b
            }),
        });
    }
    let bytes = serde_json::to_vec(&index).map_err(std::io::Error::other)?;
    std::fs::write(staging.join(CACHE_INDEX), bytes)?;
    std::fs::rename(&staging, dir)?;
    Ok(moved)
}

/// Writes the uncompressed tar of a layer blob (gzip, zstd or none, by its
/// media type).
pub fn decompress_layer(media_type: &str, from: &Path, to: &Path) -> Result<(), String> {
    use crate::oci::compress::{Compression, Decoder};
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |e: std::io::Error| format!("{path}: {e}")
    };
    let input = std::fs::File::open(from).map_err(io(from))?;
    let mut output = std::fs::File::create(to).map_err(io(to))?;
    // By suffix: Docker's media types (`...rootfs.diff.tar.gzip`) too.
    let compression = if media_type.ends_with("gzip") {
        Compression::Gzip
    } else if media_type.ends_with("zstd") {
        Compression::Zstd
    } else if media_type.ends_with("tar") {
        Compression::None
    } else {
        return Err(format!("base layer media type {media_type} is not a tar layer"));
    };
    let mut reader = Decoder::new(input, compression).map_err(io(from))?;
    std::io::copy(&mut reader, &mut output).map_err(io(from))?;
    Ok(())
}

/// A base config with `rootfs.diff_ids` replaced.
fn with_diff_ids(config: &[u8], diff_ids: &[String]) -> Result<Vec<u8>, String> {
    let mut value: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| format!("base image config is not JSON: {e}"))?;
    let rootfs = value
        .get_mut("rootfs")
        .and_then(|r| r.as_object_mut())
        .ok_or("base image config has no rootfs")?;
    rootfs.insert("diff_ids".into(), serde_json::json!(diff_ids));
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// The pushable form of a recorded commit blob.
fn blob_source(layer: &CommitLayer, data: LayerData) -> LayerSource {
    LayerSource {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size,
        annotations: nydus::blob_annotations(&layer.digest),
        data,
    }
}

/// Downloads a recorded layer from where it was pushed, with the host
/// configuration and credentials of `target`'s client (`auth` when the
/// request gave its own).
async fn fetch_blob(
    target: &RegistryClient,
    layer: &CommitLayer,
    to: &Path,
    auth: &RegistryAuth,
) -> Result<(), String> {
    let client = RegistryClient::new(crate::oci::registry::RegistryOptions {
        insecure: layer.insecure,
        ..target.options().clone()
    });
    client
        .pull_blob_to(&layer.pushed_to, &layer.digest, layer.size, to, auth)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Copies base blob `digest` of `size` bytes from containerd's content
/// store to `dest`. False when there is no store, it lacks the blob, or its
/// copy is refused (logged): the registry is asked then.
pub async fn copy_from_store(store: Option<&ContentStore>, digest: &str, size: u64, dest: &Path) -> bool {
    let Some(store) = store else {
        return false;
    };
    let Ok(parsed) = Digest::parse(digest) else {
        // The registry path refuses it with its reason.
        return false;
    };
    match store.copy_blob_to(&parsed, size, dest).await {
        Ok(true) => {
            tracing::info!(digest, size, "base blob copied from containerd's content store");
            true
        }
        Ok(false) => {
            tracing::info!(
                digest,
                "base blob not in containerd's content store: fetching it from its registry"
            );
            false
        }
        Err(e) => {
            tracing::warn!(digest, error = %e, "base blob in containerd's content store refused: fetching it from its registry");
            false
        }
    }
}

/// The layers an image shares with images already pushed: referenced when
/// the target holds them (an earlier commit to the same repository pushed
/// them), otherwise copied from `base_store` (containerd's content store)
/// when it holds them, otherwise fetched from where they are (or pushed
/// from the local file they already are).
pub async fn resolve_reused(
    target: &RegistryClient,
    target_ref: &str,
    reused: Vec<Reused>,
    base_store: Option<&ContentStore>,
    auth: &RequestAuth,
    work: &Path,
    progress: Progress<'_>,
) -> Result<Vec<LayerSource>, String> {
    let text = |e: crate::oci::registry::RegistryError| e.to_string();
    let total = reused.len().max(1) as f64;
    // Layers already local are pushed from their file; the rest are checked
    // against the target in one session.
    let remote: Vec<&str> = reused
        .iter()
        .filter(|r| !matches!(r.layer.data, LayerData::File(_)))
        .map(|r| r.layer.digest.as_str())
        .collect();
    let present = target
        .blobs_present(target_ref, &remote, &auth.for_reference(target_ref))
        .await
        .map_err(text)?;
    let in_target: std::collections::HashSet<String> = remote
        .iter()
        .zip(present)
        .filter(|(_, present)| *present)
        .map(|(digest, _)| digest.to_string())
        .collect();
    let mut layers = Vec::new();
    for (i, mut reused) in reused.into_iter().enumerate() {
        let local = matches!(reused.layer.data, LayerData::File(_));
        let wanted = !local && !in_target.contains(&reused.layer.digest);
        // containerd's copy first: a blob it holds costs no registry call,
        // and a base image no registry holds still reaches the target.
        let stored = work.join(format!("reused-{i}"));
        if wanted && copy_from_store(base_store, &reused.layer.digest, reused.layer.size, &stored).await {
            reused.layer.data = LayerData::File(stored);
        } else if wanted {
            let path = work.join(format!("reused-{i}"));
            // The target's host configuration and credentials, with the
            // source's own insecure flag.
            let client = RegistryClient::new(crate::oci::registry::RegistryOptions {
                insecure: reused.insecure,
                ..target.options().clone()
            });
            client
                .pull_blob_to(
                    &reused.from,
                    &reused.layer.digest,
                    reused.layer.size,
                    &path,
                    &auth.for_reference(&reused.from),
                )
                .await
                .map_err(text)?;
            reused.layer.data = LayerData::File(path);
        }
        layers.push(reused.layer);
        progress(0.6 + 0.2 * (i + 1) as f64 / total, "fetching base layers");
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converted_base_layers_are_kept_and_found_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("a.layer"), b"bootstrap a").unwrap();
        std::fs::write(work.join("b.layer"), b"bootstrap b").unwrap();
        let blob_id = "b1".repeat(32);
        std::fs::write(work.join(&blob_id), b"blob data").unwrap();
        let parts = vec![
            LayerBuild {
                bootstrap: work.join("a.layer"),
                blob: Some(nydus::RafsBlob {
                    path: work.join(&blob_id),
                    blob_id: blob_id.clone(),
                    size: 9,
                }),
            },
            LayerBuild {
                bootstrap: work.join("b.layer"),
                blob: None,
            },
        ];
        let dir = tmp.path().join("cache/abc-v6-zstd");
        assert!(load_cached(&dir).is_none(), "nothing kept yet");
        let moved = store_cached(&dir, &parts).unwrap();
        assert!(moved.iter().all(|p| p.bootstrap.starts_with(&dir)), "{moved:?}");
        assert_eq!(load_cached(&dir).unwrap(), moved);
        assert_eq!(std::fs::read(&moved[0].bootstrap).unwrap(), b"bootstrap a");
        assert_eq!(
            std::fs::read(&moved[0].blob.as_ref().unwrap().path).unwrap(),
            b"blob data"
        );
        // An index naming a file outside its entry is a miss: its names
        // are checked before they are joined.
        let index = std::fs::read_to_string(dir.join(CACHE_INDEX)).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"blob data").unwrap();
        let traversing = format!("../../{}", "o".repeat(58));
        std::fs::write(tmp.path().join("o".repeat(58)), b"blob data").unwrap();
        for bad in [
            index.replace(&blob_id, &traversing),
            index.replace("part-0.boot", "../../outside"),
        ] {
            std::fs::write(dir.join(CACHE_INDEX), bad).unwrap();
            assert!(load_cached(&dir).is_none());
        }
        std::fs::write(dir.join(CACHE_INDEX), index).unwrap();
        assert_eq!(load_cached(&dir).unwrap(), moved);
        // A damaged entry is a miss, not a wrong image.
        std::fs::write(dir.join(&blob_id), b"short").unwrap();
        assert!(load_cached(&dir).is_none());
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("cache")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no staging directory left");
    }

    #[test]
    fn the_least_recently_used_entries_go_past_the_limit() {
        use std::time::{Duration, SystemTime};
        let tmp = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let hours = |h: u64| now - Duration::from_secs(h * 3600);
        // name, size of its blob, last use
        for (name, size, used) in [
            ("old", 1000, hours(5)),
            ("mid", 1000, hours(3)),
            ("new", 1000, hours(2)),
            ("busy", 5000, now),
        ] {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("blob"), vec![0u8; size]).unwrap();
            std::fs::write(dir.join(CACHE_INDEX), b"[]").unwrap();
            let index = std::fs::File::options()
                .write(true)
                .open(dir.join(CACHE_INDEX))
                .unwrap();
            index.set_modified(used).unwrap();
        }
        let cache = |limit_bytes| BaseCache {
            dir: tmp.path().to_path_buf(),
            limit_bytes,
        };
        let left = || {
            let mut names: Vec<String> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        evict_cached(&cache(1 << 20), now);
        assert_eq!(left(), ["busy", "mid", "new", "old"], "under the limit: nothing goes");
        evict_cached(&cache(7100), now);
        assert_eq!(left(), ["busy", "mid", "new"], "the oldest goes first");
        evict_cached(&cache(0), now);
        assert_eq!(left(), ["busy"], "an entry used within the grace period stays");
        // Loading an entry marks it used.
        assert!(load_cached(&tmp.path().join("busy")).is_some());
    }

    #[test]
    fn diff_ids_are_replaced() {
        let config = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:a"]},"config":{}}"#;
        let out = with_diff_ids(config, &["sha256:b".into(), "sha256:c".into()]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["rootfs"]["diff_ids"], serde_json::json!(["sha256:b", "sha256:c"]));
        assert!(with_diff_ids(b"{}", &[]).is_err());
    }

    #[test]
    fn layer_tars_are_decompressed_by_media_type() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let data = b"tar bytes".repeat(100);
        let gz = tmp.path().join("gz");
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), Default::default());
        enc.write_all(&data).unwrap();
        enc.finish().unwrap();
        let zst = tmp.path().join("zst");
        std::fs::write(&zst, zstd::encode_all(data.as_slice(), 3).unwrap()).unwrap();
        let plain = tmp.path().join("plain");
        std::fs::write(&plain, &data).unwrap();
        for (media_type, path) in [
            ("application/vnd.oci.image.layer.v1.tar+gzip", &gz),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", &gz),
            ("application/vnd.oci.image.layer.v1.tar+zstd", &zst),
            ("application/vnd.oci.image.layer.v1.tar", &plain),
        ] {
            let out = tmp.path().join("out");
            decompress_layer(media_type, path, &out).unwrap();
            assert_eq!(std::fs::read(&out).unwrap(), data, "{media_type}");
        }
        let err = decompress_layer(nydus::BLOB_MEDIA_TYPE, &plain, &tmp.path().join("x")).unwrap_err();
        assert!(err.contains("not a tar layer"), "{err}");
    }

    #[test]
    fn nydus_images_are_told_by_their_bootstrap_layer() {
        let mut layer = crate::oci::registry::OciDescriptor::default();
        assert!(!is_nydus(std::slice::from_ref(&layer)));
        layer.annotations = Some(BTreeMap::from([(
            nydus::ANNOTATION_BOOTSTRAP.to_string(),
            "true".to_string(),
        )]));
        assert!(is_nydus(&[layer]));
    }
}
