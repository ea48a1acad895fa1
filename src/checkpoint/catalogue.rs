//! The catalogue of one storage: checkpoints' metadata (in the daemon's
//! store, for listing, and beside the data, so the storage describes
//! itself), their changes and the content-addressed blobs they reference.
//!
//! Layout in the object store:
//! - `blobs/sha256/<hex>.<raw|gz|zst>`: a file's content, named by the
//!   sha256 of the uncompressed bytes, so identical files are stored once
//!   across checkpoints and containers;
//! - `deltas/<id>-<n>.json.zst`: a checkpoint's change ([`Delta`]);
//! - `checkpoints/<id>.json`: its metadata, written last: a checkpoint
//!   exists once this object does.
//!
//! Blocking: callers on a runtime use `spawn_blocking`. Writers of one
//! storage are serialized by the caller.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::filter::{Filter, Subject};
use super::objects::{ObjectError, ObjectStore, PutBatch};
use super::tree::{self, Delta, Tree, TreeDiff, TreeError};
use crate::oci::digest::sha256_hex;
use crate::snapshot::store::{RecordKind, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("checkpoint catalogue: {0}")]
    Store(#[from] StoreError),
    #[error("checkpoint {id} not found in {storage}")]
    NotFound { storage: String, id: String },
    #[error("checkpoint {id}: {message}")]
    Corrupt { id: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// How blobs are compressed at rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn parse(text: &str) -> Result<Compression, CatalogueError> {
        match text {
            "" | "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            other => Err(CatalogueError::Invalid(format!(
                "compression {other:?} is not one of none, gzip, zstd"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Compression::None => "raw",
            Compression::Gzip => "gz",
            Compression::Zstd => "zst",
        }
    }

    fn from_extension(ext: &str) -> Option<Compression> {
        match ext {
            "raw" => Some(Compression::None),
            "gz" => Some(Compression::Gzip),
            "zst" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// A checkpoint's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    pub namespace: String,
    pub container: String,
    pub image: String,
    pub created_unix: i64,
    /// Bytes of storage its own data took when it was made (new blobs and
    /// its change); folding a parent into it adds the parent's.
    pub size: u64,
    /// Bytes of file content in its change.
    pub content_size: u64,
    pub labels: BTreeMap<String, String>,
    pub parent: Option<String>,
    pub status: String,
    pub compression: Compression,
    pub changed_entries: u64,
    pub removed_entries: u64,
    pub fs_only: bool,
    pub pause_ns: u64,
    /// Object key of its change, and the sha256 of that object.
    pub delta_key: String,
    pub delta_digest: String,
    /// The processes' state (CRIU images), when not `fs_only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessState>,
    /// Blob of the container's record (spec, runtime, snapshot parent) that
    /// restore recreates it from; checkpoints of older versions have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_key: Option<String>,
}

/// A CRIU dump of a checkpoint's processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    /// Blob keys of tar archives of CRIU image directories, oldest first:
    /// each is the parent (`--prev-images-dir`) of the next; the last is
    /// this checkpoint's dump. Blobs are shared, not copied, with the
    /// checkpoints whose dumps they are.
    pub images: Vec<String>,
    pub dump_log_key: String,
    pub stats: crate::host::criu::DumpStats,
    /// Anonymous memory of the container when dumped.
    pub memory_bytes: u64,
    /// Uncompressed bytes of this dump's own images.
    pub images_size: u64,
    /// Bytes its images added to the storage (chunks no earlier dump had).
    #[serde(default)]
    pub stored_bytes: u64,
    pub pre_dump: bool,
    pub pre_dump_pages_written: u64,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub leave_running: bool,
    pub criu_version: String,
    /// "<pid>:<start time>" of the container's init process when dumped:
    /// a later dump reuses these pages only for the same process.
    #[serde(default)]
    pub process_identity: String,
}

impl Checkpoint {
    /// Blobs this checkpoint references besides its change's files.
    pub fn own_blob_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.container_key.iter().cloned().collect();
        if let Some(process) = &self.process {
            keys.extend(process.images.iter().cloned());
            keys.push(process.dump_log_key.clone());
        }
        keys
    }

    pub fn age(&self, now: SystemTime) -> Duration {
        let now = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        Duration::from_secs(now.saturating_sub(self.created_unix).max(0) as u64)
    }
}

struct Subjected<'a>(&'a Checkpoint, SystemTime);

impl Subject for Subjected<'_> {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn age(&self) -> Duration {
        self.0.age(self.1)
    }
    fn labels(&self) -> &BTreeMap<String, String> {
        &self.0.labels
    }
    fn status(&self) -> &str {
        &self.0.status
    }
}

/// Parses `k=v` or bare `k` labels.
pub fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, CatalogueError> {
    let mut out = BTreeMap::new();
    for label in labels {
        let (key, value) = label.split_once('=').unwrap_or((label.as_str(), ""));
        let valid_key = !key.is_empty()
            && key.len() <= 128
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !valid_key {
            return Err(CatalogueError::Invalid(format!(
                "label {label:?}: the key must be 1-128 letters, digits or -_./"
            )));
        }
        if value.len() > 4096 || value.chars().any(char::is_control) {
            return Err(CatalogueError::Invalid(format!(
                "label {label:?}: the value must be printable and at most 4096 bytes"
            )));
        }
        out.insert(key.to_string(), value.to_string());
    }
    Ok(out)
}

/// `cp-YYYYMMDD-HHMMSS[-n]`.
pub fn validate_id(id: &str) -> Result<(), CatalogueError> {
    let valid = id.len() <= 40
        && id.starts_with("cp-")
        && id[3..].bytes().all(|b| b.is_ascii_digit() || b == b'-')
        && id.len() >= "cp-YYYYMMDD-HHMMSS".len();
    if valid {
        Ok(())
    } else {
        Err(CatalogueError::Invalid(format!(
            "checkpoint id {:?} is not of the form cp-YYYYMMDD-HHMMSS[-n]",
            id.chars().take(60).collect::<String>()
        )))
    }
}

/// What a create stores.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub namespace: String,
    pub container: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub parent: Option<String>,
    pub compression: Compression,
    pub pause: Duration,
    pub process: Option<ProcessState>,
    pub container_key: Option<String>,
}

/// The rules of a prune.
#[derive(Debug, Clone, Default)]
pub struct PrunePolicy {
    pub keep_latest: Option<u32>,
    pub keep_days: Option<u32>,
    pub exclude_labels: Vec<String>,
    pub max_storage: Option<u64>,
    pub prune_dangling: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrunePlan {
    /// Oldest first.
    pub removed: Vec<String>,
    pub folded: Vec<String>,
    pub freed_bytes: u64,
}

/// How a merge decides which checkpoints stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeStrategy {
    /// The newest checkpoint of each of the last `keep_daily` days and
    /// `keep_hourly` hours that have one (restic's `forget` rules, OR-ed).
    TimeBased,
    /// Every chain squashed into its newest checkpoint.
    Incremental,
    /// Checkpoints with labels stay; unlabelled ones are squashed.
    Tagged,
}

impl MergeStrategy {
    pub fn parse(text: &str) -> Result<MergeStrategy, CatalogueError> {
        match text {
            "time-based" => Ok(MergeStrategy::TimeBased),
            "incremental" => Ok(MergeStrategy::Incremental),
            "tagged" => Ok(MergeStrategy::Tagged),
            other => Err(CatalogueError::Invalid(format!(
                "merge strategy {other:?} is not one of time-based, incremental, tagged"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MergePolicy {
    pub strategy: MergeStrategy,
    pub keep_daily: Option<u32>,
    pub keep_hourly: Option<u32>,
    /// Checkpoints with any of these labels always stay.
    pub retain_labels: Vec<String>,
    /// Also split the large files of what stays into content-defined
    /// chunks, stored once across checkpoints and files.
    pub aggressive: bool,
}

/// Files from this size are split into chunks by an aggressive merge.
const CHUNKED_MIN_BYTES: u64 = 1 << 20;
/// Content-defined chunk sizes: min, average, max.
const CHUNK_SIZES: (usize, usize, usize) = (64 << 10, 256 << 10, 1 << 20);
/// Chunk sizes of CRIU images: smaller, since dirtied pages are scattered
/// and each one changes the chunk it falls in.
pub(super) const IMAGE_CHUNK_SIZES: (usize, usize, usize) = (16 << 10, 64 << 10, 256 << 10);

/// A file stored as chunks: `blobs/sha256/<digest>.chunks` lists them, each
/// `chunks/sha256/<hex>.zst`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChunkList {
    chunks: Vec<ChunkRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChunkRef {
    digest: String,
    size: u64,
}

fn chunk_key(hex: &str) -> String {
    format!("chunks/sha256/{hex}.zst")
}

fn is_chunked(key: &str) -> bool {
    key.ends_with(".chunks")
}

/// Chunks fetched and decompressed ahead of the reader.
const CHUNKS_AHEAD: usize = 8;

type ChunkReply = std::io::Result<Vec<u8>>;

/// The content of a chunked file: its chunks, decompressed, one after the
/// other. A few threads fetch and decompress the next ones while the caller
/// reads, at most `CHUNKS_AHEAD` at a time; they stop when it is dropped.
struct ChunkedReader {
    jobs: std::sync::mpsc::Sender<(ChunkRef, std::sync::mpsc::SyncSender<ChunkReply>)>,
    pending: std::collections::VecDeque<ChunkRef>,
    in_flight: std::collections::VecDeque<std::sync::mpsc::Receiver<ChunkReply>>,
    current: Vec<u8>,
    offset: usize,
}

impl ChunkedReader {
    fn new(objects: Arc<dyn ObjectStore>, chunks: std::collections::VecDeque<ChunkRef>) -> ChunkedReader {
        let (jobs, queue) = std::sync::mpsc::channel::<(ChunkRef, std::sync::mpsc::SyncSender<ChunkReply>)>();
        let queue = Arc::new(Mutex::new(queue));
        let fetchers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 4)
            .min(chunks.len());
        for _ in 0..fetchers {
            let (objects, queue) = (objects.clone(), queue.clone());
            std::thread::spawn(move || {
                // One context per fetcher, not one per chunk.
                let mut decompressor = zstd::bulk::Decompressor::new();
                loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((chunk, reply)) = job else { return };
                    let data = objects
                        .get(&chunk_key(&chunk.digest))
                        .map_err(std::io::Error::other)
                        .and_then(|packed| {
                            // No chunk is larger than CHUNK_SIZES' maximum: a list
                            // that says otherwise is damaged, not a reason to
                            // allocate what it says.
                            let capacity = usize::try_from(chunk.size)
                                .ok()
                                .filter(|size| *size <= CHUNK_SIZES.2)
                                .ok_or_else(|| {
                                    std::io::Error::other(format!(
                                        "the chunk list names chunk {} of {} bytes, more than any chunk",
                                        chunk.digest, chunk.size
                                    ))
                                })?;
                            decompressor
                                .as_mut()
                                .map_err(|e| std::io::Error::other(e.to_string()))?
                                .decompress(&packed, capacity)
                        });
                    let _ = reply.send(data);
                }
            });
        }
        let mut reader = ChunkedReader {
            jobs,
            pending: chunks,
            in_flight: Default::default(),
            current: Vec::new(),
            offset: 0,
        };
        reader.dispatch();
        reader
    }

    fn dispatch(&mut self) {
        while self.in_flight.len() < CHUNKS_AHEAD {
            let Some(chunk) = self.pending.pop_front() else { return };
            let (reply, answer) = std::sync::mpsc::sync_channel(1);
            // The fetchers live as long as `jobs`; a send cannot fail before.
            let _ = self.jobs.send((chunk, reply));
            self.in_flight.push_back(answer);
        }
    }
}

impl Read for ChunkedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.offset < self.current.len() || buf.is_empty() {
                let n = buf.len().min(self.current.len() - self.offset);
                buf[..n].copy_from_slice(&self.current[self.offset..self.offset + n]);
                self.offset += n;
                return Ok(n);
            }
            let Some(answer) = self.in_flight.pop_front() else {
                return Ok(0);
            };
            self.dispatch();
            self.current = answer
                .recv()
                .map_err(|_| std::io::Error::other("a chunk fetcher stopped"))??;
            self.offset = 0;
        }
    }
}

/// Blob content that is hashed as it is read; `finish` reads the rest and
/// checks the digest. What was read must not be trusted before then.
pub(super) struct VerifiedReader {
    key: String,
    digest: String,
    inner: tree::Hashing<Box<dyn Read>>,
}

impl Read for VerifiedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl VerifiedReader {
    /// Reads what the consumer left and checks the whole; returns its size.
    pub(super) fn finish(mut self) -> Result<u64, CatalogueError> {
        std::io::copy(&mut self.inner, &mut std::io::sink()).map_err(|source| CatalogueError::Io {
            op: "read blob",
            path: self.key.clone(),
            source,
        })?;
        let (_, actual, size) = self.inner.into_parts();
        if actual != self.digest {
            return Err(CatalogueError::Invalid(format!(
                "blob {}: content hashes to sha256:{actual}, not sha256:{}",
                self.key, self.digest
            )));
        }
        Ok(size)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergePlan {
    /// Checkpoints that stay, oldest first, and why.
    pub kept: Vec<(String, String)>,
    /// Checkpoints squashed into their children, oldest first.
    pub merged: Vec<String>,
    /// Kept checkpoints whose change grew by what was squashed into them.
    pub rebased: Vec<String>,
    pub freed_bytes: u64,
}

/// What a storage holds, read once for the plans of a prune or merge.
struct Holdings {
    /// Each checkpoint's change, by id.
    deltas: HashMap<String, Delta>,
    /// Every object's size, by key.
    sizes: HashMap<String, u64>,
    /// The chunk keys of each chunked blob.
    chunk_lists: HashMap<String, Vec<String>>,
}

/// The catalogue of one storage.
#[derive(Clone)]
pub struct Catalogue {
    /// Identifies the storage in the daemon's store ("local", "nfs:<path>").
    storage_id: String,
    objects: Arc<dyn ObjectStore>,
    store: Arc<Store>,
    /// Scratch space for compressing blobs before upload.
    work: std::path::PathBuf,
}

fn record_key(storage_id: &str, id: &str) -> String {
    format!("{storage_id}|{id}")
}

/// The sha256 (hex) a blob key (`blobs/sha256/<hex>.<form>`) names.
pub(super) fn blob_digest(key: &str) -> Option<&str> {
    key.rsplit('/').next()?.split_once('.').map(|(hex, _)| hex)
}

fn blob_key(digest: &str, compression: Compression) -> String {
    format!("blobs/sha256/{digest}.{}", compression.extension())
}

/// The key of the blob holding the content `digest` names in `delta`,
/// the change of `checkpoint`.
pub(super) fn content_key(checkpoint: &Checkpoint, delta: &Delta, digest: &str) -> String {
    delta
        .stored
        .get(digest)
        .cloned()
        .unwrap_or_else(|| blob_key(digest, checkpoint.compression))
}

/// Where [`Catalogue::store_blob`] put a file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoredBlob {
    pub key: String,
    /// Bytes written to the storage: 0 when the content was there already.
    pub written: u64,
    /// Whether this call stored it (it was not there before).
    pub new: bool,
}

impl Catalogue {
    pub fn new(storage_id: String, objects: Arc<dyn ObjectStore>, store: Arc<Store>, work: &Path) -> Catalogue {
        Catalogue {
            storage_id,
            objects,
            store,
            work: work.to_path_buf(),
        }
    }

    pub fn describe(&self) -> String {
        self.objects.describe()
    }

    /// Whether other daemons may write this storage (nfs, s3): its
    /// checkpoints' metadata objects are then the truth, and this daemon's
    /// index of them is refreshed from them before it is read.
    fn shared(&self) -> bool {
        self.storage_id != "local"
    }

    /// Reads metadata object `checkpoints/<id>.json`, if it exists.
    fn read_published(&self, id: &str) -> Result<Option<(Checkpoint, Vec<u8>)>, CatalogueError> {
        let key = format!("checkpoints/{id}.json");
        let bytes = match self.objects.get(&key) {
            Ok(bytes) => bytes,
            Err(super::objects::ObjectError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let checkpoint: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Corrupt {
            id: id.to_string(),
            message: format!("unreadable metadata object {key}: {e}"),
        })?;
        if checkpoint.id != id {
            return Err(CatalogueError::Corrupt {
                id: id.to_string(),
                message: format!("{key} describes checkpoint {}", checkpoint.id),
            });
        }
        Ok(Some((checkpoint, bytes)))
    }

    /// Records metadata read from the storage in this daemon's index,
    /// writing only when it differs (a read is far cheaper than a write).
    fn index(&self, record: &str, bytes: &[u8]) -> Result<(), CatalogueError> {
        if self.store.get_record(RecordKind::Checkpoints, record)?.as_deref() != Some(bytes) {
            self.store.put_record(RecordKind::Checkpoints, record, bytes)?;
        }
        Ok(())
    }

    /// Makes this daemon's index of a shared storage what the storage
    /// holds: checkpoints other daemons made, changed (by their prunes and
    /// merges) or removed.
    fn refresh(&self) -> Result<(), CatalogueError> {
        let prefix = format!("{}|", self.storage_id);
        let indexed: BTreeSet<String> = self
            .store
            .list_records(RecordKind::Checkpoints)?
            .into_iter()
            .filter_map(|(key, _)| key.strip_prefix(&prefix).map(str::to_string))
            .collect();
        let mut published = BTreeSet::new();
        for (key, _) in self.objects.list("checkpoints/")? {
            let Some(id) = key.strip_prefix("checkpoints/").and_then(|k| k.strip_suffix(".json")) else {
                continue;
            };
            if validate_id(id).is_err() {
                continue;
            }
            if let Some((_, bytes)) = self.read_published(id)? {
                self.index(&record_key(&self.storage_id, id), &bytes)?;
                published.insert(id.to_string());
            }
        }
        for gone in indexed.difference(&published) {
            self.store
                .remove_record(RecordKind::Checkpoints, &record_key(&self.storage_id, gone))?;
        }
        Ok(())
    }

    /// Every checkpoint of this storage, oldest first.
    pub fn all(&self) -> Result<Vec<Checkpoint>, CatalogueError> {
        if self.shared() {
            self.refresh()?;
        }
        let prefix = format!("{}|", self.storage_id);
        let mut out = Vec::new();
        for (key, bytes) in self.store.list_records(RecordKind::Checkpoints)? {
            if !key.starts_with(&prefix) {
                continue;
            }
            let checkpoint: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Corrupt {
                id: key.clone(),
                message: format!("unreadable record: {e}"),
            })?;
            out.push(checkpoint);
        }
        out.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Checkpoint, CatalogueError> {
        validate_id(id)?;
        if self.shared() {
            let record = record_key(&self.storage_id, id);
            return match self.read_published(id)? {
                Some((checkpoint, bytes)) => {
                    self.index(&record, &bytes)?;
                    Ok(checkpoint)
                }
                None => {
                    self.store.remove_record(RecordKind::Checkpoints, &record)?;
                    Err(CatalogueError::NotFound {
                        storage: self.describe(),
                        id: id.to_string(),
                    })
                }
            };
        }
        let bytes = self
            .store
            .get_record(RecordKind::Checkpoints, &record_key(&self.storage_id, id))?
            .ok_or_else(|| CatalogueError::NotFound {
                storage: self.describe(),
                id: id.to_string(),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Corrupt {
            id: id.to_string(),
            message: format!("unreadable record: {e}"),
        })
    }

    /// Checkpoints of `namespace` (and `container` if not empty) that pass
    /// `filter`, oldest first.
    pub fn list(
        &self,
        namespace: &str,
        container: &str,
        filter: Option<&Filter>,
    ) -> Result<Vec<Checkpoint>, CatalogueError> {
        let now = SystemTime::now();
        Ok(self
            .all()?
            .into_iter()
            .filter(|c| c.namespace == namespace && (container.is_empty() || c.container == container))
            .filter(|c| filter.is_none_or(|f| f.matches(&Subjected(c, now))))
            .collect())
    }

    /// A new id for a checkpoint made at `now`: `cp-YYYYMMDD-HHMMSS`, with
    /// `-2`, `-3`... when taken.
    pub fn new_id(&self, now: SystemTime) -> Result<String, CatalogueError> {
        let stamp = crate::time::rfc3339(now);
        // 2026-12-01T10:11:12Z -> 20261201-101112
        let digits: String = stamp.chars().filter(|c| c.is_ascii_digit()).collect();
        let base = format!("cp-{}-{}", &digits[..8], &digits[8..14]);
        let taken = |id: &str| -> Result<bool, CatalogueError> {
            if self.shared() && self.objects.size(&format!("checkpoints/{id}.json"))?.is_some() {
                return Ok(true);
            }
            Ok(self
                .store
                .get_record(RecordKind::Checkpoints, &record_key(&self.storage_id, id))?
                .is_some())
        };
        if !taken(&base)? {
            return Ok(base);
        }
        for n in 2.. {
            let id = format!("{base}-{n}");
            if !taken(&id)? {
                return Ok(id);
            }
        }
        unreachable!("some suffix is free")
    }

    pub(super) fn read_delta(&self, checkpoint: &Checkpoint) -> Result<Delta, CatalogueError> {
        let stored = self.objects.get(&checkpoint.delta_key)?;
        let corrupt = |message: String| CatalogueError::Corrupt {
            id: checkpoint.id.clone(),
            message,
        };
        if sha256_hex(&stored) != checkpoint.delta_digest {
            return Err(corrupt(format!("{} does not match its digest", checkpoint.delta_key)));
        }
        let json = zstd::decode_all(&stored[..]).map_err(|e| corrupt(format!("{}: {e}", checkpoint.delta_key)))?;
        serde_json::from_slice(&json).map_err(|e| corrupt(format!("{}: {e}", checkpoint.delta_key)))
    }

    /// Stores `delta` for checkpoint `id` under a key no other version of
    /// it used; returns (key, digest, size).
    pub(super) fn write_delta(&self, id: &str, delta: &Delta) -> Result<(String, String, u64), CatalogueError> {
        let json = serde_json::to_vec(delta).map_err(|e| CatalogueError::Invalid(e.to_string()))?;
        let stored = zstd::encode_all(&json[..], 3).map_err(|e| CatalogueError::Io {
            op: "compress",
            path: id.to_string(),
            source: e,
        })?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let key = format!("deltas/{id}-{nanos}.json.zst");
        self.objects.put(&key, &stored)?;
        Ok((key, sha256_hex(&stored), stored.len() as u64))
    }

    /// Makes `checkpoint` exist: its metadata beside the data (the commit
    /// point), then in the daemon's store.
    pub(super) fn publish(&self, checkpoint: &Checkpoint) -> Result<(), CatalogueError> {
        let json = serde_json::to_vec_pretty(checkpoint).map_err(|e| CatalogueError::Invalid(e.to_string()))?;
        self.objects
            .put(&format!("checkpoints/{}.json", checkpoint.id), &json)?;
        self.store.put_record(
            RecordKind::Checkpoints,
            &record_key(&self.storage_id, &checkpoint.id),
            &json,
        )?;
        Ok(())
    }

    pub(super) fn unpublish(&self, id: &str) -> Result<(), CatalogueError> {
        self.objects.delete(&format!("checkpoints/{id}.json"))?;
        self.store
            .remove_record(RecordKind::Checkpoints, &record_key(&self.storage_id, id))?;
        Ok(())
    }

    /// The chain of `checkpoint`: its ancestors, oldest first, then itself.
    pub fn chain(&self, checkpoint: &Checkpoint) -> Result<Vec<Checkpoint>, CatalogueError> {
        let mut chain = vec![checkpoint.clone()];
        let mut seen = BTreeSet::from([checkpoint.id.clone()]);
        while let Some(parent) = chain.last().and_then(|c| c.parent.clone()) {
            if !seen.insert(parent.clone()) {
                return Err(CatalogueError::Corrupt {
                    id: checkpoint.id.clone(),
                    message: format!("its chain loops at {parent}"),
                });
            }
            let found = self.get(&parent).map_err(|e| match e {
                CatalogueError::NotFound { .. } => CatalogueError::Corrupt {
                    id: checkpoint.id.clone(),
                    message: format!("its parent {parent} is missing"),
                },
                other => other,
            })?;
            chain.push(found);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The writable layer `checkpoint` holds.
    /// The whole tree of `checkpoint` and where each file content of it is
    /// stored (its blob key, by digest): what a restore writes back.
    pub fn restore_plan(&self, checkpoint: &Checkpoint) -> Result<(Tree, HashMap<String, String>), CatalogueError> {
        let mut tree = Tree::new();
        let mut keys = HashMap::new();
        for link in self.chain(checkpoint)? {
            let delta = self.read_delta(&link)?;
            delta.apply(&mut tree);
            for digest in delta.digests() {
                let key = content_key(&link, &delta, &digest);
                keys.insert(digest, key);
            }
        }
        Ok((tree, keys))
    }

    /// Copies blob `key`'s content into `out`, checking it against the
    /// digest the key names.
    pub fn copy_verified(&self, key: &str, digest: &str, out: &mut impl Write) -> Result<u64, CatalogueError> {
        let mut reader = self.open_verified(key, digest)?;
        std::io::copy(&mut reader, out).map_err(|source| CatalogueError::Io {
            op: "copy content of",
            path: key.to_string(),
            source,
        })?;
        reader.finish()
    }

    /// Blob `key`'s content, checked against `digest` by `finish`.
    pub(super) fn open_verified(&self, key: &str, digest: &str) -> Result<VerifiedReader, CatalogueError> {
        Ok(VerifiedReader {
            key: key.to_string(),
            digest: digest.to_string(),
            inner: tree::Hashing::new(self.open_content(key)?),
        })
    }

    pub fn tree_of(&self, checkpoint: &Checkpoint) -> Result<Tree, CatalogueError> {
        let mut tree = Tree::new();
        for link in self.chain(checkpoint)? {
            self.read_delta(&link)?.apply(&mut tree);
        }
        Ok(tree)
    }

    /// Stores the writable layer captured at `upper` as a checkpoint.
    pub fn create(&self, id: &str, upper: &Path, new: &NewCheckpoint) -> Result<Checkpoint, CatalogueError> {
        validate_id(id)?;
        let parent = match &new.parent {
            Some(parent_id) => {
                let parent = self.get(parent_id)?;
                if parent.namespace != new.namespace || parent.container != new.container {
                    return Err(CatalogueError::Invalid(format!(
                        "parent {parent_id} is a checkpoint of {}/{}, not of {}/{}",
                        parent.namespace, parent.container, new.namespace, new.container
                    )));
                }
                Some(parent)
            }
            None => None,
        };
        let parent_tree = match &parent {
            Some(p) => Some(self.tree_of(p)?),
            None => None,
        };
        self.scratch_dir()?;
        let mut tree = tree::read_tree_unhashed(upper, parent_tree.as_ref())?;
        let (mut stored_bytes, mut stored_keys) = self.hash_and_store(upper, &mut tree, new.compression)?;
        tree::fill_hardlink_digests(&mut tree);
        // Files the parent had unchanged are not read again, but their blob
        // may be stored with another compression: make sure it is here.
        let empty = Tree::new();
        let mut delta = Delta::between(parent_tree.as_ref().unwrap_or(&empty), &tree);
        for (path, entry) in &delta.changed {
            let Some(digest) = &entry.digest else { continue };
            if delta.stored.contains_key(digest) {
                continue;
            }
            // Hashed just now, its key is known; otherwise (content the
            // parent had) it is looked up, and stored if need be.
            let key = match stored_keys.remove(digest) {
                Some(key) => key,
                None => {
                    let stored = self.store_blob(&upper.join(path), digest, new.compression)?;
                    stored_bytes += stored.written;
                    stored.key
                }
            };
            delta.stored.insert(digest.clone(), key);
        }
        let (delta_key, delta_digest, delta_size) = self.write_delta(id, &delta)?;
        let checkpoint = Checkpoint {
            id: id.to_string(),
            namespace: new.namespace.clone(),
            container: new.container.clone(),
            image: new.image.clone(),
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64,
            // Process images are stored before: their new chunks count here.
            size: stored_bytes + delta_size + new.process.as_ref().map_or(0, |p| p.stored_bytes),
            content_size: delta.content_bytes(),
            labels: new.labels.clone(),
            parent: new.parent.clone(),
            status: "ready".into(),
            compression: new.compression,
            changed_entries: delta.changed.len() as u64,
            removed_entries: delta.removed.len() as u64,
            fs_only: new.process.is_none(),
            pause_ns: new.pause.as_nanos() as u64,
            delta_key,
            delta_digest,
            process: new.process.clone(),
            container_key: new.container_key.clone(),
        };
        self.publish(&checkpoint)?;
        Ok(checkpoint)
    }

    /// Hashes the files of `tree` that have no digest yet and stores their
    /// content (unless stored already), on as many threads as there are
    /// cores; returns the bytes written and the key of each digest.
    fn hash_and_store(
        &self,
        upper: &Path,
        tree: &mut Tree,
        compression: Compression,
    ) -> Result<(u64, HashMap<String, String>), CatalogueError> {
        let todo: Vec<String> = tree
            .iter()
            .filter(|(_, e)| e.kind == tree::EntryKind::File && e.hardlink.is_none() && e.digest.is_none())
            .map(|(p, _)| p.clone())
            .collect();
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
        let next = std::sync::atomic::AtomicUsize::new(0);
        // Per worker: (path, digest, key) of each file it hashed, and bytes written.
        type Hashed = Result<(Vec<(String, String, String)>, u64), CatalogueError>;
        let results: Vec<Hashed> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers.min(todo.len().max(1)))
                .map(|_| {
                    scope.spawn(|| {
                        let mut digests = Vec::new();
                        let mut written = 0;
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(rel) = todo.get(i) else { break };
                            let path = upper.join(rel);
                            let digest = tree::hash_file(&path)?;
                            let stored = self.store_blob(&path, &digest, compression)?;
                            written += stored.written;
                            digests.push((rel.clone(), digest, stored.key));
                        }
                        Ok((digests, written))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CatalogueError::Invalid("a hashing thread panicked".into())))
                })
                .collect()
        });
        let mut written = 0;
        let mut keys = HashMap::new();
        for result in results {
            let (digests, bytes) = result?;
            written += bytes;
            for (rel, digest, key) in digests {
                if let Some(entry) = tree.get_mut(&rel) {
                    entry.digest = Some(digest.clone());
                }
                keys.insert(digest, key);
            }
        }
        Ok((written, keys))
    }

    /// The scratch directory of this storage's writers, created if need be.
    pub(super) fn scratch_dir(&self) -> Result<&Path, CatalogueError> {
        std::fs::create_dir_all(&self.work).map_err(|source| CatalogueError::Io {
            op: "create directory",
            path: self.work.display().to_string(),
            source,
        })?;
        Ok(&self.work)
    }

    /// The key `digest`'s content is stored under already, in any
    /// compression (`preferred` first), if it is.
    pub(super) fn find_blob(&self, digest: &str, preferred: Compression) -> Result<Option<String>, CatalogueError> {
        let others = [Compression::Zstd, Compression::Gzip, Compression::None];
        for compression in std::iter::once(preferred).chain(others.into_iter().filter(|c| *c != preferred)) {
            let key = blob_key(digest, compression);
            if self.objects.size(&key)?.is_some() {
                return Ok(Some(key));
            }
        }
        let chunked = format!("blobs/sha256/{digest}.chunks");
        Ok(self.objects.size(&chunked)?.map(|_| chunked))
    }

    /// Stores the file at `path`, whose content hashes to `digest`, as a
    /// blob compressed with `compression`, unless that content is stored
    /// already (in any compression): identical content is stored once.
    pub(super) fn store_blob(
        &self,
        path: &Path,
        digest: &str,
        compression: Compression,
    ) -> Result<StoredBlob, CatalogueError> {
        if let Some(key) = self.find_blob(digest, compression)? {
            return Ok(StoredBlob {
                key,
                written: 0,
                new: false,
            });
        }
        let key = blob_key(digest, compression);
        let written = self.upload(path, &key, compression)?;
        Ok(StoredBlob {
            key,
            written,
            new: true,
        })
    }

    /// Deletes object `key` (a blob or change nothing references).
    pub(super) fn delete_object(&self, key: &str) -> Result<(), CatalogueError> {
        Ok(self.objects.delete(key)?)
    }

    /// A reader of the content blob `key` holds, decompressed as the
    /// extension of its name says.
    pub(super) fn open_content(&self, key: &str) -> Result<Box<dyn Read>, CatalogueError> {
        if is_chunked(key) {
            let list = self.read_chunk_list(key)?;
            return Ok(Box::new(ChunkedReader::new(self.objects.clone(), list.chunks.into())));
        }
        let compression = key
            .rsplit('/')
            .next()
            .and_then(|name| name.split_once('.'))
            .and_then(|(_, ext)| Compression::from_extension(ext))
            .ok_or_else(|| CatalogueError::Invalid(format!("{key} is not the key of a blob")))?;
        let reader = self.objects.open(key)?;
        Ok(match compression {
            Compression::None => reader,
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(reader)),
            Compression::Zstd => Box::new(zstd::Decoder::new(reader).map_err(|source| CatalogueError::Io {
                op: "decompress",
                path: key.to_string(),
                source,
            })?),
        })
    }

    /// Compresses `path` into blob `key`; returns the stored size.
    fn upload(&self, path: &Path, key: &str, compression: Compression) -> Result<u64, CatalogueError> {
        let io = |op: &'static str, p: &Path| {
            let p = p.display().to_string();
            move |source| CatalogueError::Io { op, path: p, source }
        };
        if compression == Compression::None {
            self.objects.put_file(key, path)?;
            return Ok(std::fs::metadata(path).map_err(io("stat", path))?.len());
        }
        let work = self.scratch_dir()?;
        let staged = StagedFile::create(work).map_err(io("create a file in", work))?;
        {
            let mut input = std::fs::File::open(path).map_err(io("open", path))?;
            let output = staged.file.try_clone().map_err(io("open", &staged.path))?;
            match compression {
                Compression::Zstd => {
                    let mut encoder = zstd::Encoder::new(output, 3).map_err(io("compress", path))?;
                    std::io::copy(&mut input, &mut encoder).map_err(io("compress", path))?;
                    encoder.finish().map_err(io("compress", path))?;
                }
                Compression::Gzip => {
                    let mut encoder = flate2::write::GzEncoder::new(output, flate2::Compression::default());
                    std::io::copy(&mut input, &mut encoder).map_err(io("compress", path))?;
                    encoder
                        .finish()
                        .map_err(io("compress", path))?
                        .flush()
                        .map_err(io("write", path))?;
                }
                Compression::None => unreachable!("stored as is above"),
            }
        }
        self.objects.put_file(key, &staged.path)?;
        Ok(std::fs::metadata(&staged.path).map_err(io("stat", &staged.path))?.len())
    }

    /// Reads blob `key` back, decompressed, and checks it against the
    /// digest in its name.
    /// Writes the content of blob `key` to a new file at `target`, checking
    /// it against the digest the key names; a mismatch leaves no file.
    pub(super) fn fetch_verified(&self, key: &str, target: &Path) -> Result<u64, CatalogueError> {
        let digest = blob_digest(key).ok_or_else(|| CatalogueError::Invalid(format!("{key} is not a blob name")))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map_err(|source| CatalogueError::Io {
                op: "create",
                path: target.display().to_string(),
                source,
            })?;
        let copied = self.copy_verified(key, digest, &mut file);
        if copied.is_err() {
            let _ = std::fs::remove_file(target);
        }
        copied
    }

    fn check_blob(&self, key: &str) -> Result<(), String> {
        let digest = blob_digest(key).ok_or("not a blob name")?;
        let reader = self.open_verified(key, digest).map_err(|e| e.to_string())?;
        reader.finish().map(drop).map_err(|e| e.to_string())
    }

    /// Every blob `checkpoint` needs of its own: its change's files, its
    /// process images and dump log, its container record.
    fn blob_keys(&self, checkpoint: &Checkpoint, delta: &Delta) -> BTreeSet<String> {
        let mut keys = self.delta_blob_keys(checkpoint, delta);
        keys.extend(checkpoint.own_blob_keys());
        keys
    }

    /// The blobs of the files `delta` (the change of `checkpoint`) sets.
    fn delta_blob_keys(&self, checkpoint: &Checkpoint, delta: &Delta) -> BTreeSet<String> {
        delta
            .digests()
            .iter()
            .map(|d| content_key(checkpoint, delta, d))
            .collect()
    }

    /// Re-hashes every blob and change `checkpoint` needs (its whole
    /// chain). Returns how many objects were checked and the failures.
    pub fn verify(&self, checkpoint: &Checkpoint) -> Result<(u64, Vec<String>), CatalogueError> {
        let mut failures = Vec::new();
        let mut keys = BTreeSet::new();
        let mut checked = 0;
        for link in self.chain(checkpoint)? {
            checked += 1;
            match self.read_delta(&link) {
                Ok(delta) => {
                    // What the tree needs, whichever checkpoint stored it.
                    keys.extend(self.blob_keys(&link, &delta));
                }
                Err(e) => failures.push(format!("{}: {e}", link.delta_key)),
            }
        }
        for key in keys {
            checked += 1;
            if let Err(reason) = self.check_blob(&key) {
                failures.push(format!("{key}: {reason}"));
            }
        }
        Ok((checked, failures))
    }

    pub fn diff(&self, from: &Checkpoint, to: &Checkpoint) -> Result<TreeDiff, CatalogueError> {
        Ok(tree::diff(&self.tree_of(from)?, &self.tree_of(to)?))
    }

    /// Blob keys the tree of `checkpoint` needs.
    pub fn blobs_needed(&self, checkpoint: &Checkpoint) -> Result<usize, CatalogueError> {
        let mut keys = BTreeSet::new();
        for link in self.chain(checkpoint)? {
            let delta = self.read_delta(&link)?;
            keys.extend(self.blob_keys(&link, &delta));
        }
        Ok(keys.len())
    }

    /// What `policy` removes of the checkpoints of `namespace`/`container`,
    /// and, unless `dry_run`, removes it: each removed checkpoint with a
    /// kept child is folded into that child first, so every kept checkpoint
    /// stays restorable; then whatever no checkpoint references goes.
    pub fn prune(
        &self,
        namespace: &str,
        container: &str,
        policy: &PrunePolicy,
        dry_run: bool,
    ) -> Result<PrunePlan, CatalogueError> {
        if policy.keep_latest.is_none()
            && policy.keep_days.is_none()
            && policy.max_storage.is_none()
            && !policy.prune_dangling
        {
            return Err(CatalogueError::Invalid(
                "nothing to prune by: give --keep-latest, --keep-days, --max-storage or --prune-dangling".into(),
            ));
        }
        let all = self.all()?;
        let ids: BTreeSet<&str> = all.iter().map(|c| c.id.as_str()).collect();
        let mine: Vec<&Checkpoint> = all
            .iter()
            .filter(|c| c.namespace == namespace && c.container == container)
            .collect();
        let now = SystemTime::now();
        let excluded = |c: &Checkpoint| policy.exclude_labels.iter().any(|l| c.labels.contains_key(l));
        // Dangling: a parent that is gone, or above one that is.
        let mut dangling = BTreeSet::new();
        for c in &mine {
            let mut at = (*c).clone();
            let mut hops = 0;
            while let Some(parent) = &at.parent {
                if !ids.contains(parent.as_str()) || hops > all.len() {
                    dangling.insert(c.id.clone());
                    break;
                }
                at = all
                    .iter()
                    .find(|x| &x.id == parent)
                    .cloned()
                    .expect("present: checked above");
                hops += 1;
            }
        }
        let by_rule = policy.keep_latest.is_some() || policy.keep_days.is_some();
        let mut doomed: BTreeSet<String> = BTreeSet::new();
        let newest_first: Vec<&&Checkpoint> = mine.iter().rev().collect();
        for (rank, c) in newest_first.iter().enumerate() {
            if policy.prune_dangling && dangling.contains(&c.id) {
                doomed.insert(c.id.clone());
                continue;
            }
            if !by_rule || excluded(c) {
                continue;
            }
            let latest = policy.keep_latest.is_some_and(|n| (rank as u32) < n);
            let recent = policy
                .keep_days
                .is_some_and(|d| c.age(now) < Duration::from_secs(u64::from(d) * 86_400));
            if !latest && !recent {
                doomed.insert(c.id.clone());
            }
        }
        let holdings = self.holdings(&all)?;
        // Storage: the oldest go first until the storage fits.
        if let Some(limit) = policy.max_storage {
            for c in &mine {
                if self.usage_without(&all, &holdings, &doomed)? <= limit {
                    break;
                }
                if !excluded(c) {
                    doomed.insert(c.id.clone());
                }
            }
        }
        let before = self.usage_without(&all, &holdings, &BTreeSet::new())?;
        let after = self.usage_without(&all, &holdings, &doomed)?;
        let removed: Vec<String> = mine
            .iter()
            .filter(|c| doomed.contains(&c.id))
            .map(|c| c.id.clone())
            .collect();
        let folded: Vec<String> = all
            .iter()
            .filter(|c| !doomed.contains(&c.id) && c.parent.as_ref().is_some_and(|p| doomed.contains(p)))
            .map(|c| c.id.clone())
            .collect();
        let plan = PrunePlan {
            removed,
            folded,
            freed_bytes: before.saturating_sub(after),
        };
        if dry_run {
            return Ok(plan);
        }
        self.remove_all(&all, &holdings, &doomed)?;
        self.collect_garbage()?;
        Ok(plan)
    }

    /// Squashes the chains of `namespace`/`container` per `policy`: every
    /// checkpoint a rule retains stays, as does the newest of each chain
    /// (nothing comes after it to squash it into); each other one is folded
    /// into its children, whose trees stay exactly what they were.
    pub fn merge(
        &self,
        namespace: &str,
        container: &str,
        policy: &MergePolicy,
        dry_run: bool,
    ) -> Result<MergePlan, CatalogueError> {
        if policy.strategy == MergeStrategy::TimeBased && policy.keep_daily.is_none() && policy.keep_hourly.is_none() {
            return Err(CatalogueError::Invalid(
                "the time-based strategy needs --keep-daily or --keep-hourly (or automerge.keep_daily in the config)"
                    .into(),
            ));
        }
        let all = self.all()?;
        let mine: Vec<&Checkpoint> = all
            .iter()
            .filter(|c| c.namespace == namespace && c.container == container)
            .collect();
        let mut reasons: BTreeMap<String, String> = BTreeMap::new();
        let has_children = |id: &str| all.iter().any(|c| c.parent.as_deref() == Some(id));
        for c in &mine {
            if !has_children(&c.id) {
                reasons.insert(c.id.clone(), "newest of its chain".into());
            }
            if let Some(label) = policy.retain_labels.iter().find(|l| c.labels.contains_key(*l)) {
                reasons.insert(c.id.clone(), format!("label {label}"));
            }
            if policy.strategy == MergeStrategy::Tagged && !c.labels.is_empty() {
                reasons.entry(c.id.clone()).or_insert_with(|| "labelled".into());
            }
        }
        if policy.strategy == MergeStrategy::TimeBased {
            let mut keep_period = |count: Option<u32>, width: i64, name: &str| {
                let Some(count) = count else { return };
                let mut periods = BTreeSet::new();
                for c in mine.iter().rev() {
                    let period = c.created_unix.div_euclid(width);
                    if periods.contains(&period) {
                        continue;
                    }
                    if periods.len() as u32 >= count {
                        break;
                    }
                    periods.insert(period);
                    reasons
                        .entry(c.id.clone())
                        .or_insert_with(|| format!("newest of its {name}"));
                }
            };
            keep_period(policy.keep_daily, 86_400, "day");
            keep_period(policy.keep_hourly, 3_600, "hour");
        }
        let merged: BTreeSet<String> = mine
            .iter()
            .filter(|c| !reasons.contains_key(&c.id))
            .map(|c| c.id.clone())
            .collect();
        let holdings = self.holdings(&all)?;
        let before = self.usage_without(&all, &holdings, &BTreeSet::new())?;
        let plan = MergePlan {
            kept: mine
                .iter()
                .filter_map(|c| reasons.get(&c.id).map(|r| (c.id.clone(), r.clone())))
                .collect(),
            merged: mine
                .iter()
                .filter(|c| merged.contains(&c.id))
                .map(|c| c.id.clone())
                .collect(),
            rebased: all
                .iter()
                .filter(|c| !merged.contains(&c.id) && c.parent.as_ref().is_some_and(|p| merged.contains(p)))
                .map(|c| c.id.clone())
                .collect(),
            freed_bytes: 0,
        };
        if dry_run {
            // Chunking is not simulated: a dry run reports what folding frees.
            let after = self.usage_without(&all, &holdings, &merged)?;
            return Ok(MergePlan {
                freed_bytes: before.saturating_sub(after),
                ..plan
            });
        }
        if !merged.is_empty() {
            self.remove_all(&all, &holdings, &merged)?;
        }
        if policy.aggressive {
            self.chunk_large_files()?;
        }
        self.collect_garbage()?;
        let now_all = self.all()?;
        let after = self.usage_without(&now_all, &self.holdings(&now_all)?, &BTreeSet::new())?;
        Ok(MergePlan {
            freed_bytes: before.saturating_sub(after),
            ..plan
        })
    }

    /// Splits every stored file of at least [`CHUNKED_MIN_BYTES`] into
    /// content-defined chunks, each stored once whatever files share it,
    /// and points every change that referenced the whole file at its chunk
    /// list. The whole files are left for the garbage collection: until it
    /// runs, both forms are complete.
    fn chunk_large_files(&self) -> Result<(), CatalogueError> {
        let all = self.all()?;
        let mut renamed: HashMap<String, String> = HashMap::new();
        let mut deltas = Vec::with_capacity(all.len());
        for c in &all {
            let delta = self.read_delta(c)?;
            // Process images stay whole: restore reads them as they are.
            for key in self.delta_blob_keys(c, &delta) {
                if is_chunked(&key) || renamed.contains_key(&key) {
                    continue;
                }
                if self.objects.size(&key)?.unwrap_or(0) < CHUNKED_MIN_BYTES {
                    continue;
                }
                let chunked = self.split_into_chunks(&key)?;
                renamed.insert(key, chunked);
            }
            deltas.push(delta);
        }
        for (c, mut delta) in all.into_iter().zip(deltas) {
            let mut changed = false;
            for digest in delta.digests() {
                let key = content_key(&c, &delta, &digest);
                if let Some(chunked) = renamed.get(&key) {
                    delta.stored.insert(digest, chunked.clone());
                    changed = true;
                }
            }
            if changed {
                let (delta_key, delta_digest, _) = self.write_delta(&c.id, &delta)?;
                self.publish(&Checkpoint {
                    delta_key,
                    delta_digest,
                    ..c
                })?;
            }
        }
        Ok(())
    }

    /// Stores the content of blob `key` as chunks; returns the key of the
    /// chunk list.
    fn split_into_chunks(&self, key: &str) -> Result<String, CatalogueError> {
        let name = key.rsplit('/').next().unwrap_or_default();
        let digest = name.split_once('.').map(|(d, _)| d).unwrap_or(name).to_string();
        let stored = self.store_chunks_from(self.open_content(key)?, CHUNK_SIZES, key, || Ok(digest))?;
        Ok(stored.key)
    }

    /// Stores the file at `path` (content `digest`) as content-defined
    /// chunks of `sizes`, each stored once whatever else shares it, unless
    /// it is stored already. Returns its key and the bytes written.
    pub(super) fn store_chunked(
        &self,
        path: &Path,
        digest: &str,
        sizes: (usize, usize, usize),
    ) -> Result<StoredBlob, CatalogueError> {
        let chunked = format!("blobs/sha256/{digest}.chunks");
        if self.objects.size(&chunked)?.is_some() {
            return Ok(StoredBlob {
                key: chunked,
                written: 0,
                new: false,
            });
        }
        let file = std::fs::File::open(path).map_err(|source| CatalogueError::Io {
            op: "open",
            path: path.display().to_string(),
            source,
        })?;
        let digest = digest.to_string();
        self.store_chunks_from(
            std::io::BufReader::new(file),
            sizes,
            &path.display().to_string(),
            || Ok(digest),
        )
    }

    /// Splits what `reader` yields into content-defined chunks of `sizes`
    /// and stores each one the storage lacks: hashed and compressed on every
    /// core, written as one batch. Then stores the list naming them, under
    /// the digest `digest` gives once everything was read (the reader may be
    /// a stream still being produced). `what` names the source in errors.
    /// Returns the list's key and the bytes written.
    pub(super) fn store_chunks_from(
        &self,
        reader: impl Read,
        sizes: (usize, usize, usize),
        what: &str,
        digest: impl FnOnce() -> Result<String, CatalogueError>,
    ) -> Result<StoredBlob, CatalogueError> {
        let io = |op: &'static str| {
            move |source| CatalogueError::Io {
                op,
                path: what.to_string(),
                source,
            }
        };
        let (min, avg, max) = sizes;
        let started = std::time::Instant::now();
        let batch = self.objects.batch();
        // One thread splits the file; the others hash, compress and write
        // chunks as they come, a bounded number in flight.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
        let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(workers * 2);
        let work_rx = Mutex::new(work_rx);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<(usize, ChunkRef, u64), CatalogueError>>();
        let failed = AtomicBool::new(false);
        // Chunks seen in this file: a repeated one is written once.
        let seen = Mutex::new(HashSet::new());
        let (chunks, mut written) = std::thread::scope(|scope| {
            for _ in 0..workers {
                let done_tx = done_tx.clone();
                let (work_rx, seen, failed, batch) = (&work_rx, &seen, &failed, &batch);
                scope.spawn(move || {
                    // One context per worker: making one per chunk cost more
                    // than compressing it.
                    let mut compressor = zstd::bulk::Compressor::new(3).map_err(|source| CatalogueError::Io {
                        op: "start compressing",
                        path: what.to_string(),
                        source,
                    });
                    loop {
                        let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((index, data)) = next else { return };
                        let stored = match &mut compressor {
                            Ok(compressor) => self.store_chunk(&data, seen, &**batch, compressor),
                            Err(e) => Err(CatalogueError::Invalid(e.to_string())),
                        };
                        let stored = stored.map(|(digest, written)| {
                            let size = data.len() as u64;
                            (index, ChunkRef { digest, size }, written)
                        });
                        if stored.is_err() {
                            failed.store(true, AtomicOrdering::Relaxed);
                        }
                        if done_tx.send(stored).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(done_tx);
            let mut split = Ok(());
            for (index, chunk) in fastcdc::v2020::StreamCDC::new(reader, min, avg, max).enumerate() {
                if failed.load(AtomicOrdering::Relaxed) {
                    break;
                }
                match chunk {
                    Ok(chunk) => {
                        if work_tx.send((index, chunk.data)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        split = Err(io("split into chunks")(std::io::Error::other(e.to_string())));
                        break;
                    }
                }
            }
            drop(work_tx);
            let mut chunks: Vec<Option<ChunkRef>> = Vec::new();
            let mut written = 0u64;
            for stored in done_rx {
                let (index, chunk, bytes) = stored?;
                if chunks.len() <= index {
                    chunks.resize(index + 1, None);
                }
                chunks[index] = Some(chunk);
                written += bytes;
            }
            split?;
            // Every index up to the last one was sent and answered.
            let chunks: Option<Vec<ChunkRef>> = chunks.into_iter().collect();
            let chunks = chunks.ok_or_else(|| CatalogueError::Invalid(format!("chunks of {what} went missing")))?;
            Ok::<_, CatalogueError>((chunks, written))
        })?;
        // The chunks are durable before the list that names them.
        let split_time = started.elapsed();
        batch.commit()?;
        tracing::info!(
            source = what,
            chunks = chunks.len(),
            written,
            split_seconds = split_time.as_secs_f64(),
            sync_seconds = (started.elapsed() - split_time).as_secs_f64(),
            "chunks stored"
        );
        let chunked = format!("blobs/sha256/{}.chunks", digest()?);
        let list = ChunkList { chunks };
        let json = serde_json::to_vec(&list).map_err(|e| CatalogueError::Invalid(e.to_string()))?;
        written += json.len() as u64;
        self.objects.put(&chunked, &json)?;
        Ok(StoredBlob {
            key: chunked,
            written,
            new: true,
        })
    }

    /// Hashes `data` and, unless this file or the storage already has it,
    /// compresses it into `batch`. Returns its digest and the bytes written.
    fn store_chunk(
        &self,
        data: &[u8],
        seen: &Mutex<HashSet<String>>,
        batch: &dyn PutBatch,
        compressor: &mut zstd::bulk::Compressor<'static>,
    ) -> Result<(String, u64), CatalogueError> {
        let hex = sha256_hex(data);
        let first = seen.lock().unwrap_or_else(|p| p.into_inner()).insert(hex.clone());
        let key = chunk_key(&hex);
        if !first || self.objects.size(&key)?.is_some() {
            return Ok((hex, 0));
        }
        let packed = compressor.compress(data).map_err(|source| CatalogueError::Io {
            op: "compress",
            path: key.clone(),
            source,
        })?;
        batch.put(&key, &packed)?;
        Ok((hex, packed.len() as u64))
    }

    fn read_chunk_list(&self, key: &str) -> Result<ChunkList, CatalogueError> {
        let bytes = self.objects.get(key)?;
        serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Corrupt {
            id: key.to_string(),
            message: format!("unreadable chunk list: {e}"),
        })
    }

    /// The chunk objects `keys` (blob keys) need.
    fn chunks_of(&self, keys: &BTreeSet<String>) -> Result<BTreeSet<String>, CatalogueError> {
        let mut chunks = BTreeSet::new();
        for key in keys.iter().filter(|k| is_chunked(k)) {
            chunks.extend(self.read_chunk_list(key)?.chunks.iter().map(|c| chunk_key(&c.digest)));
        }
        Ok(chunks)
    }

    /// What the catalogue would hold without `doomed`: every other
    /// checkpoint with its change, each removed one folded into its
    /// children (oldest first, so a child of several removed ancestors gets
    /// their composition). Nothing is written. Ordered oldest first.
    fn without(
        &self,
        all: &[Checkpoint],
        holdings: &Holdings,
        doomed: &BTreeSet<String>,
    ) -> Result<Vec<(Checkpoint, Delta)>, CatalogueError> {
        let mut current: Vec<(Checkpoint, Delta, bool)> = Vec::with_capacity(all.len());
        for c in all {
            let delta = holdings
                .deltas
                .get(&c.id)
                .cloned()
                .ok_or_else(|| CatalogueError::Corrupt {
                    id: c.id.clone(),
                    message: "its change was not read".into(),
                })?;
            current.push((c.clone(), delta, false));
        }
        for victim_index in 0..current.len() {
            if !doomed.contains(&current[victim_index].0.id) {
                continue;
            }
            let (victim, victim_delta, _) = current[victim_index].clone();
            for (child, delta, changed) in current.iter_mut() {
                if child.parent.as_deref() != Some(victim.id.as_str()) {
                    continue;
                }
                *delta = victim_delta.then(delta);
                child.parent = victim.parent.clone();
                child.size += victim.size;
                child.content_size = delta.content_bytes();
                child.changed_entries = delta.changed.len() as u64;
                child.removed_entries = delta.removed.len() as u64;
                *changed = true;
            }
        }
        Ok(current
            .into_iter()
            .filter(|(c, _, _)| !doomed.contains(&c.id))
            .map(|(c, d, changed)| {
                let c = if changed {
                    Checkpoint {
                        // Marks a change to write: no stored object has it.
                        delta_key: String::new(),
                        ..c
                    }
                } else {
                    c
                };
                (c, d)
            })
            .collect())
    }

    /// Removes `doomed` from the catalogue, folding each into its kept
    /// children. Each rewritten child is published (its new change under a
    /// new key first, then its metadata) before any removed one goes, so a
    /// crash leaves every checkpoint restorable.
    fn remove_all(
        &self,
        all: &[Checkpoint],
        holdings: &Holdings,
        doomed: &BTreeSet<String>,
    ) -> Result<(), CatalogueError> {
        for (checkpoint, delta) in self.without(all, holdings, doomed)? {
            if !checkpoint.delta_key.is_empty() {
                continue;
            }
            let (delta_key, delta_digest, _) = self.write_delta(&checkpoint.id, &delta)?;
            self.publish(&Checkpoint {
                delta_key,
                delta_digest,
                ..checkpoint
            })?;
        }
        for id in all.iter().map(|c| &c.id).filter(|id| doomed.contains(*id)) {
            self.unpublish(id)?;
        }
        Ok(())
    }

    /// Bytes the storage would hold without `doomed`, folded as
    /// [`Catalogue::without`] folds them: metadata, changes and the blobs
    /// still referenced.
    fn usage_without(
        &self,
        all: &[Checkpoint],
        holdings: &Holdings,
        doomed: &BTreeSet<String>,
    ) -> Result<u64, CatalogueError> {
        let size = |key: &str| holdings.sizes.get(key).copied().unwrap_or(0);
        let mut keys = BTreeSet::new();
        let mut total = 0u64;
        for (c, delta) in self.without(all, holdings, doomed)? {
            keys.extend(self.blob_keys(&c, &delta));
            total += if c.delta_key.is_empty() {
                let json = serde_json::to_vec(&delta).map_err(|e| CatalogueError::Invalid(e.to_string()))?;
                zstd::encode_all(&json[..], 3)
                    .map(|z| z.len() as u64)
                    .unwrap_or(json.len() as u64)
            } else {
                size(&c.delta_key)
            };
            total += size(&format!("checkpoints/{}.json", c.id));
        }
        let chunks: BTreeSet<&String> = keys
            .iter()
            .filter_map(|k| holdings.chunk_lists.get(k))
            .flatten()
            .collect();
        total += keys.iter().map(|k| size(k)).sum::<u64>() + chunks.into_iter().map(|k| size(k)).sum::<u64>();
        Ok(total)
    }

    /// Reads what the plans of a prune or merge need, once: every
    /// checkpoint's change, every object's size, every chunk list.
    fn holdings(&self, all: &[Checkpoint]) -> Result<Holdings, CatalogueError> {
        let mut deltas = HashMap::with_capacity(all.len());
        for c in all {
            deltas.insert(c.id.clone(), self.read_delta(c)?);
        }
        let mut sizes = HashMap::new();
        for prefix in ["blobs/", "chunks/", "deltas/", "checkpoints/"] {
            sizes.extend(self.objects.list(prefix)?);
        }
        let mut chunk_lists = HashMap::new();
        for key in sizes.keys().filter(|k| is_chunked(k)) {
            let chunks = self
                .read_chunk_list(key)?
                .chunks
                .iter()
                .map(|c| chunk_key(&c.digest))
                .collect();
            chunk_lists.insert(key.clone(), chunks);
        }
        Ok(Holdings {
            deltas,
            sizes,
            chunk_lists,
        })
    }

    /// Deletes every blob and change no checkpoint references: what prunes
    /// and merges free, and what an interrupted create left.
    pub fn collect_garbage(&self) -> Result<u64, CatalogueError> {
        let all = self.all()?;
        let mut keep = BTreeSet::new();
        for c in &all {
            keep.insert(c.delta_key.clone());
            keep.extend(self.blob_keys(c, &self.read_delta(c)?));
        }
        let chunks = self.chunks_of(&keep)?;
        keep.extend(chunks);
        let mut freed = 0;
        for prefix in ["blobs/", "deltas/", "chunks/"] {
            for (key, size) in self.objects.list(prefix)? {
                if !keep.contains(&key) {
                    self.objects.delete(&key)?;
                    freed += size;
                }
            }
        }
        Ok(freed)
    }
}

/// A private scratch file, deleted when dropped.
pub(super) struct StagedFile {
    pub path: std::path::PathBuf,
    pub file: std::fs::File,
}

impl StagedFile {
    fn create(dir: &Path) -> std::io::Result<StagedFile> {
        StagedFile::create_named(dir, "blob")
    }

    /// A new scratch file in `dir`, named `<prefix>-<pid>-<n>`.
    pub(super) fn create_named(dir: &Path, prefix: &str) -> std::io::Result<StagedFile> {
        use std::os::unix::fs::OpenOptionsExt;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{prefix}-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        Ok(StagedFile { path, file })
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::objects::DirStore;
    use std::fs;

    struct World {
        _tmp: tempfile::TempDir,
        upper: std::path::PathBuf,
        objects: std::path::PathBuf,
        catalogue: Catalogue,
    }

    fn world() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let objects = tmp.path().join("objects");
        let store = Arc::new(Store::open(&tmp.path().join("meta.redb")).unwrap());
        let catalogue = Catalogue::new(
            "local".into(),
            Arc::new(DirStore::open(&objects, "local").unwrap()),
            store,
            &tmp.path().join("work"),
        );
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("data")).unwrap();
        World {
            _tmp: tmp,
            upper,
            objects,
            catalogue,
        }
    }

    fn new(parent: Option<&str>, labels: &[&str], compression: Compression) -> NewCheckpoint {
        NewCheckpoint {
            namespace: "ns".into(),
            container: "c1".into(),
            image: "img".into(),
            labels: parse_labels(&labels.iter().map(|l| l.to_string()).collect::<Vec<_>>()).unwrap(),
            parent: parent.map(str::to_string),
            compression,
            pause: Duration::from_millis(2),
            process: None,
            container_key: None,
        }
    }

    fn blob_count(w: &World) -> usize {
        fs::read_dir(w.objects.join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    #[test]
    fn daemons_sharing_a_storage_see_each_others_checkpoints() {
        let w = world();
        let shared = w._tmp.path().join("export");
        // Two daemons: each its own metadata store, one shared directory.
        let daemon = |n: u32| {
            Catalogue::new(
                "nfs:/export".into(),
                Arc::new(DirStore::open(&shared, "nfs").unwrap()),
                Arc::new(Store::open(&w._tmp.path().join(format!("meta{n}.redb"))).unwrap()),
                &w._tmp.path().join(format!("work{n}")),
            )
        };
        let (a, b) = (daemon(1), daemon(2));
        fs::write(w.upper.join("data/f"), b"one").unwrap();
        let first = a
            .create("cp-20261201-100000", &w.upper, &new(None, &[], Compression::Zstd))
            .unwrap();
        assert_eq!(b.get(&first.id).unwrap(), first, "made by the other daemon");
        assert_eq!(b.all().unwrap(), vec![first.clone()]);
        assert_eq!(
            b.new_id(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_119_200))
                .unwrap(),
            "cp-20261201-100000-2",
            "an id the other daemon took is not reused"
        );
        fs::write(w.upper.join("data/f"), b"two").unwrap();
        let second = b
            .create(
                "cp-20261201-100100",
                &w.upper,
                &new(Some(&first.id), &[], Compression::Zstd),
            )
            .unwrap();
        assert_eq!(a.all().unwrap().len(), 2);
        assert_eq!(a.tree_of(&a.get(&second.id).unwrap()).unwrap()["data/f"].size, 3);
        // Removed by one daemon: gone for the other, and its garbage
        // collection keeps what the other's checkpoints need.
        a.unpublish(&second.id).unwrap();
        assert_eq!(
            b.all().unwrap().iter().map(|c| &c.id).collect::<Vec<_>>(),
            vec![&first.id]
        );
        assert!(matches!(b.get(&second.id), Err(CatalogueError::NotFound { .. })));
        a.collect_garbage().unwrap();
        let (_, failures) = b.verify(&b.get(&first.id).unwrap()).unwrap();
        assert!(failures.is_empty(), "{failures:?}");
    }

    #[test]
    fn incremental_checkpoints_store_only_what_changed_and_restore_whole_trees() {
        let w = world();
        let big = vec![7u8; 300_000];
        fs::write(w.upper.join("data/big"), &big).unwrap();
        fs::write(w.upper.join("data/small"), b"one").unwrap();
        fs::write(w.upper.join("data/gone"), b"bye").unwrap();
        let first = w
            .catalogue
            .create(
                "cp-20261201-100000",
                &w.upper,
                &new(None, &["golden"], Compression::Zstd),
            )
            .unwrap();
        assert_eq!(blob_count(&w), 3);
        assert!(first.size > 0 && first.size < 300_000, "compressed: {}", first.size);
        assert_eq!(first.content_size, 300_000 + 3 + 3);

        fs::write(w.upper.join("data/small"), b"two").unwrap();
        fs::remove_file(w.upper.join("data/gone")).unwrap();
        fs::write(w.upper.join("data/copy"), &big).unwrap();
        let second = w
            .catalogue
            .create(
                "cp-20261201-100100",
                &w.upper,
                &new(Some(&first.id), &["env=prod"], Compression::Zstd),
            )
            .unwrap();
        assert_eq!(
            blob_count(&w),
            4,
            "only the new content of small is stored; the copy is deduplicated"
        );
        assert_eq!(second.removed_entries, 1);
        assert_eq!(second.parent.as_deref(), Some(first.id.as_str()));
        let tree = w.catalogue.tree_of(&second).unwrap();
        assert!(tree.contains_key("data/copy") && !tree.contains_key("data/gone"));
        assert_eq!(w.catalogue.chain(&second).unwrap().len(), 2);
        let d = w.catalogue.diff(&first, &second).unwrap();
        assert_eq!(
            (d.added.clone(), d.removed.clone()),
            (vec!["data/copy".to_string()], vec!["data/gone".to_string()])
        );
        assert!(d.changed.contains(&"data/small".to_string()), "{d:?}");
        assert_eq!(d.size_delta, 300_000 - 3);

        // Listing, with filters.
        let f = Filter::parse("label=golden").unwrap();
        let listed = w.catalogue.list("ns", "", Some(&f)).unwrap();
        assert_eq!(
            listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            vec![first.id.as_str()]
        );
        let f = Filter::parse("label=env=prod && age<1h").unwrap();
        assert_eq!(w.catalogue.list("ns", "c1", Some(&f)).unwrap().len(), 1);
        assert_eq!(w.catalogue.list("other", "", None).unwrap().len(), 0);

        // Verify passes, then names a damaged blob.
        let (checked, failures) = w.catalogue.verify(&second).unwrap();
        assert!(checked >= 5 && failures.is_empty(), "{checked} {failures:?}");
        let small_digest = tree["data/small"].digest.clone().unwrap();
        let small_key = w.objects.join(format!("blobs/sha256/{small_digest}.zst"));
        fs::write(&small_key, zstd::encode_all(&b"tampered"[..], 3).unwrap()).unwrap();
        let (_, failures) = w.catalogue.verify(&second).unwrap();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains(&small_digest) && failures[0].contains("hashes to"),
            "{failures:?}"
        );
    }

    #[test]
    fn prune_folds_removed_parents_into_kept_children_and_frees_their_data() {
        let w = world();
        let mut ids = Vec::new();
        let mut trees = Vec::new();
        for i in 0..4 {
            fs::write(w.upper.join(format!("data/f{i}")), vec![i as u8; 50_000 + i]).unwrap();
            if i == 2 {
                fs::remove_file(w.upper.join("data/f0")).unwrap();
            }
            let parent = ids.last().map(String::as_str);
            let labels: &[&str] = if i == 1 { &["keep"] } else { &[] };
            let c = w
                .catalogue
                .create(
                    &format!("cp-20261201-10000{i}"),
                    &w.upper,
                    &new(parent, labels, Compression::Gzip),
                )
                .unwrap();
            trees.push(w.catalogue.tree_of(&c).unwrap());
            ids.push(c.id);
        }
        let keep_one = PrunePolicy {
            keep_latest: Some(1),
            exclude_labels: vec!["keep".into()],
            ..PrunePolicy::default()
        };
        let plan = w.catalogue.prune("ns", "c1", &keep_one, true).unwrap();
        assert_eq!(plan.removed, vec![ids[0].clone(), ids[2].clone()]);
        assert_eq!(plan.folded, vec![ids[1].clone(), ids[3].clone()]);
        assert!(plan.freed_bytes > 0, "the removed changes go: {plan:?}");
        assert_eq!(w.catalogue.all().unwrap().len(), 4, "a dry run changes nothing");

        let done = w.catalogue.prune("ns", "c1", &keep_one, false).unwrap();
        assert_eq!(done, plan);
        let left = w.catalogue.all().unwrap();
        assert_eq!(
            left.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
            vec![ids[1].clone(), ids[3].clone()]
        );
        assert_eq!(left[0].parent, None);
        assert_eq!(left[1].parent.as_deref(), Some(ids[1].as_str()));
        assert_eq!(
            w.catalogue.tree_of(&left[0]).unwrap(),
            trees[1],
            "folded trees are unchanged"
        );
        assert_eq!(w.catalogue.tree_of(&left[1]).unwrap(), trees[3]);
        for c in &left {
            assert!(w.catalogue.verify(c).unwrap().1.is_empty());
        }
        assert_eq!(blob_count(&w), 4, "the kept first tree still has f0");

        let err = w
            .catalogue
            .prune("ns", "c1", &PrunePolicy::default(), true)
            .unwrap_err();
        assert!(err.to_string().contains("--keep-latest"), "{err}");

        // Storage limit: the oldest goes until the rest fits.
        let plan = w
            .catalogue
            .prune(
                "ns",
                "c1",
                &PrunePolicy {
                    max_storage: Some(1),
                    ..PrunePolicy::default()
                },
                false,
            )
            .unwrap();
        assert_eq!(plan.removed.len(), 2);
        assert_eq!(blob_count(&w), 0);
        assert!(fs::read_dir(w.objects.join("deltas")).unwrap().next().is_none());
    }

    /// Five checkpoints of one chain, `f` rewritten each time; the
    /// second and fourth labelled. Returns ids and trees.
    fn chain_of_five(w: &World, created: &[i64; 5]) -> (Vec<String>, Vec<Tree>) {
        let mut ids: Vec<String> = Vec::new();
        let mut trees = Vec::new();
        for (i, at) in created.iter().enumerate() {
            fs::write(w.upper.join("data/f"), vec![i as u8 + 1; 40_000]).unwrap();
            fs::write(w.upper.join(format!("data/g{i}")), [i as u8]).unwrap();
            let labels: &[&str] = if i % 2 == 1 { &["tag"] } else { &[] };
            let c = w
                .catalogue
                .create(
                    &format!("cp-20261201-10000{i}"),
                    &w.upper,
                    &new(ids.last().map(String::as_str), labels, Compression::Zstd),
                )
                .unwrap();
            let c = Checkpoint { created_unix: *at, ..c };
            w.catalogue.publish(&c).unwrap();
            trees.push(w.catalogue.tree_of(&c).unwrap());
            ids.push(c.id);
        }
        (ids, trees)
    }

    #[test]
    fn merges_squash_chains_keeping_what_rules_retain_restorable() {
        let hour = 3_600;
        let day = 86_400;
        let base = 1_764_547_200; // a midnight
                                  // Two on day 0 (hours 1 and 2), one on day 1, two on day 2.
        let created = [
            base + hour,
            base + 2 * hour,
            base + day,
            base + 2 * day,
            base + 2 * day + hour,
        ];
        let policy = |strategy, keep_daily, keep_hourly| MergePolicy {
            strategy,
            keep_daily,
            keep_hourly,
            retain_labels: vec![],
            aggressive: false,
        };

        let w = world();
        let (ids, trees) = chain_of_five(&w, &created);
        let plan = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::TimeBased, Some(2), None), true)
            .unwrap();
        // Newest of each of the last two days that have one: 4 (day 2), 2 (day 1).
        assert_eq!(plan.merged, vec![ids[0].clone(), ids[1].clone(), ids[3].clone()]);
        assert_eq!(plan.rebased, vec![ids[2].clone(), ids[4].clone()]);
        assert!(plan.freed_bytes > 0, "f's squashed versions go: {plan:?}");
        assert_eq!(w.catalogue.all().unwrap().len(), 5, "a dry run changes nothing");
        let hourly = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::TimeBased, None, Some(3)), true)
            .unwrap();
        assert_eq!(
            hourly.merged,
            vec![ids[0].clone(), ids[1].clone()],
            "the three newest hours with one: {hourly:?}"
        );
        let err = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::TimeBased, None, None), true);
        assert!(err.is_err());

        let blobs_before = blob_count(&w);
        let done = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::TimeBased, Some(2), None), false)
            .unwrap();
        assert_eq!(done.merged, plan.merged);
        let left = w.catalogue.all().unwrap();
        assert_eq!(
            left.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
            vec![ids[2].clone(), ids[4].clone()]
        );
        assert_eq!(w.catalogue.tree_of(&left[0]).unwrap(), trees[2]);
        assert_eq!(w.catalogue.tree_of(&left[1]).unwrap(), trees[4]);
        for c in &left {
            assert!(w.catalogue.verify(c).unwrap().1.is_empty());
        }
        assert_eq!(blob_count(&w), blobs_before - 3, "versions 1, 2 and 4 of f are gone");

        // Tagged: labelled ones and the newest stay.
        let w = world();
        let (ids, trees) = chain_of_five(&w, &created);
        let done = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::Tagged, None, None), false)
            .unwrap();
        assert_eq!(done.merged, vec![ids[0].clone(), ids[2].clone()]);
        let kept: Vec<&str> = done.kept.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, vec![ids[1].as_str(), ids[3].as_str(), ids[4].as_str()]);
        for (c, tree) in w.catalogue.all().unwrap().iter().zip([&trees[1], &trees[3], &trees[4]]) {
            assert_eq!(&w.catalogue.tree_of(c).unwrap(), tree);
        }

        // Incremental: one checkpoint per chain, unless a label retains more.
        let w = world();
        let (ids, trees) = chain_of_five(&w, &created);
        let mut retain = policy(MergeStrategy::Incremental, None, None);
        retain.retain_labels = vec!["tag".into()];
        let plan = w.catalogue.merge("ns", "c1", &retain, true).unwrap();
        assert_eq!(plan.merged, vec![ids[0].clone(), ids[2].clone()]);
        let done = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::Incremental, None, None), false)
            .unwrap();
        assert_eq!(done.merged.len(), 4);
        let left = w.catalogue.all().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].parent, None);
        assert_eq!(w.catalogue.tree_of(&left[0]).unwrap(), trees[4]);
        assert!(w.catalogue.verify(&left[0]).unwrap().1.is_empty());
    }

    #[test]
    fn aggressive_merges_share_chunks_across_versions_of_a_file() {
        let w = world();
        let mut big = crate::nydus::noise(3 << 20, 0x9e37_79b9_7f4a_7c15);
        fs::write(w.upper.join("data/big"), &big).unwrap();
        let first = w
            .catalogue
            .create("cp-20261201-100000", &w.upper, &new(None, &["v1"], Compression::Zstd))
            .unwrap();
        // 64 KiB in the middle change: a new blob of the whole file.
        big.splice(1_500_000..1_500_000 + 65_536, crate::nydus::noise(65_536, 7));
        fs::write(w.upper.join("data/big"), &big).unwrap();
        let second = w
            .catalogue
            .create(
                "cp-20261201-100100",
                &w.upper,
                &new(Some(&first.id), &["v2"], Compression::Zstd),
            )
            .unwrap();
        let trees = [
            w.catalogue.tree_of(&first).unwrap(),
            w.catalogue.tree_of(&second).unwrap(),
        ];
        let stored = |w: &World| -> u64 {
            ["blobs", "chunks"]
                .iter()
                .flat_map(|d| walk(&w.objects.join(d)))
                .map(|p| fs::metadata(p).unwrap().len())
                .sum()
        };
        let before = stored(&w);
        assert!(before > 6_000_000, "two whole versions: {before}");
        let tagged = MergePolicy {
            strategy: MergeStrategy::Tagged,
            keep_daily: None,
            keep_hourly: None,
            retain_labels: vec![],
            aggressive: true,
        };
        let plan = w.catalogue.merge("ns", "c1", &tagged, false).unwrap();
        assert!(plan.merged.is_empty(), "both are labelled: {plan:?}");
        let after = stored(&w);
        assert!(
            after < 3_800_000,
            "the versions share all chunks but those around the change: {before} -> {after}"
        );
        assert!(plan.freed_bytes > 2_000_000, "{plan:?}");
        let left = w.catalogue.all().unwrap();
        for (c, tree) in left.iter().zip(&trees) {
            assert_eq!(&w.catalogue.tree_of(c).unwrap(), tree);
            let (_, failures) = w.catalogue.verify(c).unwrap();
            assert!(failures.is_empty(), "{failures:?}");
        }
        // The content reads back whole through its chunks.
        let digest = trees[1]["data/big"].digest.clone().unwrap();
        let mut content = Vec::new();
        w.catalogue
            .open_content(&format!("blobs/sha256/{digest}.chunks"))
            .unwrap()
            .read_to_end(&mut content)
            .unwrap();
        assert_eq!(content, big);
        // Stored again unchanged, the file is found in its chunked form.
        let third = w
            .catalogue
            .create("cp-20261201-100200", &w.upper, &new(None, &[], Compression::Zstd))
            .unwrap();
        assert!(
            third.size < 100_000,
            "deduplicated against the chunk list: {}",
            third.size
        );
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().unwrap().is_dir() {
                out.extend(walk(&entry.path()));
            } else {
                out.push(entry.path());
            }
        }
        out
    }

    #[test]
    fn what_an_interrupted_create_leaves_is_collected_by_the_next_prune() {
        let w = world();
        fs::write(w.upper.join("data/kept"), b"kept").unwrap();
        let kept = w
            .catalogue
            .create("cp-20261201-100000", &w.upper, &new(None, &[], Compression::Zstd))
            .unwrap();
        // Killed after uploading a blob and a change, before the metadata:
        // no checkpoint lists them.
        let objects = DirStore::open(&w.objects, "local").unwrap();
        objects
            .put(&format!("blobs/sha256/{}.zst", "ab".repeat(32)), b"orphan")
            .unwrap();
        objects.put("deltas/cp-20261201-100100-1.json.zst", b"orphan").unwrap();
        assert_eq!(w.catalogue.all().unwrap().len(), 1, "nothing half-written is listed");
        let plan = w
            .catalogue
            .prune(
                "ns",
                "c1",
                &PrunePolicy {
                    keep_latest: Some(5),
                    ..PrunePolicy::default()
                },
                false,
            )
            .unwrap();
        assert!(plan.removed.is_empty());
        assert!(objects
            .size(&format!("blobs/sha256/{}.zst", "ab".repeat(32)))
            .unwrap()
            .is_none());
        assert!(objects.size("deltas/cp-20261201-100100-1.json.zst").unwrap().is_none());
        assert!(w.catalogue.verify(&kept).unwrap().1.is_empty(), "the kept one is whole");
    }

    #[test]
    fn labels_ids_and_compressions_are_checked() {
        assert_eq!(
            parse_labels(&["a=b".into(), "bare".into(), "k=v=w".into()]).unwrap(),
            BTreeMap::from([
                ("a".to_string(), "b".to_string()),
                ("bare".to_string(), String::new()),
                ("k".to_string(), "v=w".to_string())
            ])
        );
        assert!(parse_labels(&["=x".into()]).is_err());
        assert!(parse_labels(&["a b=c".into()]).is_err());
        validate_id("cp-20261201-101112").unwrap();
        validate_id("cp-20261201-101112-3").unwrap();
        for bad in [
            "",
            "cp-1",
            "../cp-20261201-101112",
            "cp-20261201-1011xx",
            "\"cp-20261201-101112\"",
        ] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
        assert_eq!(Compression::parse("").unwrap(), Compression::Zstd);
        assert!(Compression::parse("lz4")
            .unwrap_err()
            .to_string()
            .contains("none, gzip, zstd"));
        let w = world();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_583_872);
        let id = w.catalogue.new_id(at).unwrap();
        assert_eq!(id, "cp-20251201-101112");
        w.catalogue
            .create(&id, &w.upper, &new(None, &[], Compression::None))
            .unwrap();
        assert_eq!(w.catalogue.new_id(at).unwrap(), "cp-20251201-101112-2");
        let err = w.catalogue.create(
            "cp-20251201-101113",
            &w.upper,
            &new(Some("cp-20200101-000000"), &[], Compression::None),
        );
        assert!(matches!(err, Err(CatalogueError::NotFound { .. })), "{err:?}");
    }
}
