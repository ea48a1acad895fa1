//! Import: an archive's chain recreated as checkpoints of a catalogue.
//! Members are read in place; each layer is checked against the digests
//! of the manifest and the config as it is read, its tree refused if it
//! could not be written beneath a root; metadata is published last, and
//! what a failed import stored is deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::format::{
    annotation, parse_pax_time, Descriptor, ImageConfig, Index, Manifest, PaxRecords, ANNOTATION_PREFIX,
    ARCHIVE_VERSION, KIND_RECORD, MEDIA_MANIFEST, OPAQUE_RECORD, XATTR_RECORD,
};
use super::paths::{join, split_parent, tree_path, validate_source};
use super::ArchiveError;
use crate::checkpoint::catalogue::{
    self, Catalogue, CatalogueError, Checkpoint, Compression, ProcessState, StagedFile, IMAGE_CHUNK_SIZES,
};
use crate::checkpoint::tree::{self, Delta, Entry, EntryKind, Hashing, Tree};
use crate::error::io_err;
use crate::oci::compress::Decoder;
use crate::oci::digest::{hex, sha256_hex};
use crate::oci::overlay::{OPAQUE_MARKER, WHITEOUT_PREFIX};

/// Largest index, manifest or config an import reads into memory.
const MAX_DOCUMENT: u64 = 4 << 20;

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
    /// See `Checkpoint::engine`: empty, or a Docker container's.
    engine: String,
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
                engine: plan.engine.clone(),
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
        let encoding = Compression::of_media_type(&descriptor.media_type)
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
        let engine = match get("engine") {
            None => String::new(),
            Some(e) if e == catalogue::ENGINE_DOCKER => e.clone(),
            Some(e) => return Err(bad(&format!("engine {e:?} is not one of ours"))),
        };
        plans.push(LayerPlan {
            engine,
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
    let decoder = Decoder::new(Hashing::new(reader), plan.encoding)
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

fn drain(reader: &mut impl Read) -> io::Result<u64> {
    io::copy(reader, &mut io::sink())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::checkpoint::archive::export;
    use crate::checkpoint::archive::export::append_layout_member;
    use crate::checkpoint::archive::format::{MEDIA_CONFIG, MEDIA_MANIFEST};
    use std::fs;

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
            crate::checkpoint::process::store_images(&w.catalogue, &images, Compression::Zstd, false).unwrap();
        let log_key = crate::checkpoint::process::store_bytes(
            &w.catalogue,
            b"Dumping finished successfully\n",
            Compression::Zstd,
            "log",
        )
        .unwrap();
        let record_key =
            crate::checkpoint::process::store_bytes(&w.catalogue, br#"{"id":"web"}"#, Compression::Zstd, "record")
                .unwrap();
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
        let dirs = crate::checkpoint::process::unpack_images(&other.catalogue, &process.images, &restored, 1).unwrap();
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
}
