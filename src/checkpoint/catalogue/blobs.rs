//! Content-addressed blobs: their keys (`blobs/sha256/<hex>.<raw|gz|zst>`,
//! or `.chunks` for a chunked one), storing a file's content once whatever
//! compression it was stored with, and reading it back decompressed and
//! checked against the digest its key names.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::chunks::{is_chunked, ChunkedReader};
use super::{Catalogue, CatalogueError, Checkpoint, Compression, StagedFile};
use crate::checkpoint::tree::{self, Delta};
use crate::error::io_err;
use crate::oci::compress::{Decoder, Encoder};

/// The zstd level of whole blobs.
const ZSTD_LEVEL: i32 = 3;

/// The extension of a blob key stored with `compression`.
fn blob_extension(compression: Compression) -> &'static str {
    match compression {
        Compression::None => "raw",
        Compression::Gzip => "gz",
        Compression::Zstd => "zst",
    }
}

fn extension_compression(ext: &str) -> Option<Compression> {
    match ext {
        "raw" => Some(Compression::None),
        "gz" => Some(Compression::Gzip),
        "zst" => Some(Compression::Zstd),
        _ => None,
    }
}

/// The sha256 (hex) a blob key (`blobs/sha256/<hex>.<form>`) names.
pub(in crate::checkpoint) fn blob_digest(key: &str) -> Option<&str> {
    key.rsplit('/').next()?.split_once('.').map(|(hex, _)| hex)
}

fn blob_key(digest: &str, compression: Compression) -> String {
    format!("blobs/sha256/{digest}.{}", blob_extension(compression))
}

/// The key of the blob holding the content `digest` names in `delta`,
/// the change of `checkpoint`.
pub(in crate::checkpoint) fn content_key(checkpoint: &Checkpoint, delta: &Delta, digest: &str) -> String {
    delta
        .stored
        .get(digest)
        .cloned()
        .unwrap_or_else(|| blob_key(digest, checkpoint.compression))
}

/// Where [`Catalogue::store_blob`] put a file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::checkpoint) struct StoredBlob {
    pub key: String,
    /// Bytes written to the storage: 0 when the content was there already.
    pub written: u64,
    /// Whether this call stored it (it was not there before).
    pub new: bool,
}

/// Blob content that is hashed as it is read; `finish` reads the rest and
/// checks the digest. What was read must not be trusted before then.
pub(in crate::checkpoint) struct VerifiedReader {
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
    pub(in crate::checkpoint) fn finish(mut self) -> Result<u64, CatalogueError> {
        std::io::copy(&mut self.inner, &mut std::io::sink()).map_err(io_err("read blob", Path::new(&self.key)))?;
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

impl Catalogue {
    /// Copies blob `key`'s content into `out`, checking it against the
    /// digest the key names.
    pub fn copy_verified(&self, key: &str, digest: &str, out: &mut impl Write) -> Result<u64, CatalogueError> {
        let mut reader = self.open_verified(key, digest)?;
        std::io::copy(&mut reader, out).map_err(io_err("copy content of", Path::new(key)))?;
        reader.finish()
    }

    /// Blob `key`'s content, checked against `digest` by `finish`.
    pub(in crate::checkpoint) fn open_verified(
        &self,
        key: &str,
        digest: &str,
    ) -> Result<VerifiedReader, CatalogueError> {
        Ok(VerifiedReader {
            key: key.to_string(),
            digest: digest.to_string(),
            inner: tree::Hashing::new(self.open_content(key)?),
        })
    }

    /// The key `digest`'s content is stored under already, in any
    /// compression (`preferred` first), if it is.
    pub(in crate::checkpoint) fn find_blob(
        &self,
        digest: &str,
        preferred: Compression,
    ) -> Result<Option<String>, CatalogueError> {
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
    pub(in crate::checkpoint) fn store_blob(
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
    pub(in crate::checkpoint) fn delete_object(&self, key: &str) -> Result<(), CatalogueError> {
        Ok(self.objects.delete(key)?)
    }

    /// A reader of the content blob `key` holds, decompressed as the
    /// extension of its name says.
    pub(in crate::checkpoint) fn open_content(&self, key: &str) -> Result<Box<dyn Read>, CatalogueError> {
        if is_chunked(key) {
            let list = self.read_chunk_list(key)?;
            return Ok(Box::new(ChunkedReader::new(self.objects.clone(), list.chunks.into())));
        }
        let compression = key
            .rsplit('/')
            .next()
            .and_then(|name| name.split_once('.'))
            .and_then(|(_, ext)| extension_compression(ext))
            .ok_or_else(|| CatalogueError::Invalid(format!("{key} is not the key of a blob")))?;
        let reader = self.objects.open(key)?;
        if compression == Compression::None {
            return Ok(reader);
        }
        Ok(Box::new(
            Decoder::new(reader, compression).map_err(io_err("decompress", Path::new(key)))?,
        ))
    }

    /// Compresses `path` into blob `key`; returns the stored size.
    fn upload(&self, path: &Path, key: &str, compression: Compression) -> Result<u64, CatalogueError> {
        if compression == Compression::None {
            self.objects.put_file(key, path)?;
            return Ok(std::fs::metadata(path).map_err(io_err("stat", path))?.len());
        }
        let work = self.scratch_dir()?;
        let staged = StagedFile::create(work).map_err(io_err("create a file in", work))?;
        {
            let mut input = std::fs::File::open(path).map_err(io_err("open", path))?;
            let output = staged.file.try_clone().map_err(io_err("open", &staged.path))?;
            let mut encoder = Encoder::new(output, compression, ZSTD_LEVEL).map_err(io_err("compress", path))?;
            std::io::copy(&mut input, &mut encoder).map_err(io_err("compress", path))?;
            encoder
                .finish()
                .map_err(io_err("compress", path))?
                .flush()
                .map_err(io_err("write", path))?;
        }
        self.objects.put_file(key, &staged.path)?;
        Ok(std::fs::metadata(&staged.path)
            .map_err(io_err("stat", &staged.path))?
            .len())
    }

    /// Writes the content of blob `key` to a new file at `target`, checking
    /// it against the digest the key names; a mismatch leaves no file.
    pub(in crate::checkpoint) fn fetch_verified(&self, key: &str, target: &Path) -> Result<u64, CatalogueError> {
        let digest = blob_digest(key).ok_or_else(|| CatalogueError::Invalid(format!("{key} is not a blob name")))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map_err(io_err("create", target))?;
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
    pub(super) fn blob_keys(&self, checkpoint: &Checkpoint, delta: &Delta) -> BTreeSet<String> {
        let mut keys = self.delta_blob_keys(checkpoint, delta);
        keys.extend(checkpoint.own_blob_keys());
        keys
    }

    /// The blobs of the files `delta` (the change of `checkpoint`) sets.
    pub(super) fn delta_blob_keys(&self, checkpoint: &Checkpoint, delta: &Delta) -> BTreeSet<String> {
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
}
