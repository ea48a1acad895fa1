//! Content-defined chunking: large files (by an aggressive merge) and CRIU
//! images (as a dump stores them) split into chunks stored once across
//! files and checkpoints (`chunks/sha256/<hex>.zst`, listed by
//! `blobs/sha256/<digest>.chunks`), and the reader that puts a chunked
//! file back together, fetching ahead on a few threads.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::blobs::{content_key, StoredBlob};
use super::{Catalogue, CatalogueError, Checkpoint};
use crate::checkpoint::objects::{ObjectStore, PutBatch};
use crate::error::io_err;
use crate::oci::digest::sha256_hex;

/// Files from this size are split into chunks by an aggressive merge.
const CHUNKED_MIN_BYTES: u64 = 1 << 20;

/// Content-defined chunk sizes: min, average, max.
const CHUNK_SIZES: (usize, usize, usize) = (64 << 10, 256 << 10, 1 << 20);

/// Chunk sizes of CRIU images: smaller, since dirtied pages are scattered
/// and each one changes the chunk it falls in.
pub(in crate::checkpoint) const IMAGE_CHUNK_SIZES: (usize, usize, usize) = (16 << 10, 64 << 10, 256 << 10);

/// A file stored as chunks: `blobs/sha256/<digest>.chunks` lists them, each
/// `chunks/sha256/<hex>.zst`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ChunkList {
    pub(super) chunks: Vec<ChunkRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ChunkRef {
    pub(super) digest: String,
    pub(super) size: u64,
}

pub(super) fn chunk_key(hex: &str) -> String {
    format!("chunks/sha256/{hex}.zst")
}

pub(super) fn is_chunked(key: &str) -> bool {
    key.ends_with(".chunks")
}

/// Chunks fetched and decompressed ahead of the reader.
const CHUNKS_AHEAD: usize = 8;

type ChunkReply = std::io::Result<Vec<u8>>;

/// The content of a chunked file: its chunks, decompressed, one after the
/// other. A few threads fetch and decompress the next ones while the caller
/// reads, at most `CHUNKS_AHEAD` at a time; they stop when it is dropped.
pub(super) struct ChunkedReader {
    jobs: std::sync::mpsc::Sender<(ChunkRef, std::sync::mpsc::SyncSender<ChunkReply>)>,
    pending: std::collections::VecDeque<ChunkRef>,
    in_flight: std::collections::VecDeque<std::sync::mpsc::Receiver<ChunkReply>>,
    current: Vec<u8>,
    offset: usize,
}

impl ChunkedReader {
    pub(super) fn new(objects: Arc<dyn ObjectStore>, chunks: std::collections::VecDeque<ChunkRef>) -> ChunkedReader {
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

impl Catalogue {
    /// Splits every stored file of at least [`CHUNKED_MIN_BYTES`] into
    /// content-defined chunks, each stored once whatever files share it,
    /// and points every change that referenced the whole file at its chunk
    /// list. The whole files are left for the garbage collection: until it
    /// runs, both forms are complete.
    pub(super) fn chunk_large_files(&self) -> Result<(), CatalogueError> {
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
    pub(in crate::checkpoint) fn store_chunked(
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
        let file = std::fs::File::open(path).map_err(io_err("open", path))?;
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
    pub(in crate::checkpoint) fn store_chunks_from(
        &self,
        reader: impl Read,
        sizes: (usize, usize, usize),
        what: &str,
        digest: impl FnOnce() -> Result<String, CatalogueError>,
    ) -> Result<StoredBlob, CatalogueError> {
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
                    let mut compressor =
                        zstd::bulk::Compressor::new(3).map_err(io_err("start compressing", Path::new(what)));
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
            let mut split: Result<(), CatalogueError> = Ok(());
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
                        split = Err(
                            io_err("split into chunks", Path::new(what))(std::io::Error::other(e.to_string())).into(),
                        );
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
        let packed = compressor.compress(data).map_err(io_err("compress", Path::new(&key)))?;
        batch.put(&key, &packed)?;
        Ok((hex, packed.len() as u64))
    }

    pub(super) fn read_chunk_list(&self, key: &str) -> Result<ChunkList, CatalogueError> {
        let bytes = self.objects.get(key)?;
        serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Corrupt {
            id: key.to_string(),
            message: format!("unreadable chunk list: {e}"),
        })
    }

    /// The chunk objects `keys` (blob keys) need.
    pub(super) fn chunks_of(&self, keys: &BTreeSet<String>) -> Result<BTreeSet<String>, CatalogueError> {
        let mut chunks = BTreeSet::new();
        for key in keys.iter().filter(|k| is_chunked(k)) {
            chunks.extend(self.read_chunk_list(key)?.chunks.iter().map(|c| chunk_key(&c.digest)));
        }
        Ok(chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use super::*;
    use std::fs;

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
}
