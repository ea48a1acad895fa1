//! A container's image as containerd's content store holds it: the image
//! manifest (the running platform's, when the image names an index), its
//! config, and its layer blobs copied to files. A commit reads its base
//! here first, so an image that was imported, built or loaded locally (and
//! that no registry may hold) can be committed, and a registry is asked
//! only for what the store lacks.
//!
//! What containerd's store holds is read as untrusted as a registry's
//! answer: a manifest within [`MAX_MANIFEST_BYTES`], a config within
//! [`MAX_CONFIG_BYTES`], every blob checked against its descriptor's digest
//! and size while it streams (a blob longer than declared is cut off at the
//! first byte past it), every digest parsed as a [`Digest`] before it names
//! anything. Content the store lacks is `None` / `false`, never an error,
//! so that the caller can fetch it elsewhere. Knows nothing of registries
//! or of commits.

use std::io::Write;
use std::path::Path;

use oci_client::manifest::{OciImageManifest, OciManifest};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::error::{io_err, IoError};
use crate::host::containerd::{Containerd, ContainerdError};
use crate::oci::registry::{Digest, InvalidDigest, PulledManifest, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES};

/// Chunks in flight between containerd's stream and the file writer.
const CHUNKS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error("{object} in containerd's content store: {source}")]
    InvalidDigest { object: String, source: InvalidDigest },
    #[error("{object} in containerd's content store declares {size} bytes")]
    InvalidSize { object: String, size: i64 },
    #[error("{object} in containerd's content store is larger than the {limit} bytes read: refused")]
    TooLarge { object: String, limit: u64 },
    #[error("{object} in containerd's content store has {actual} bytes, {expected} declared: refused")]
    SizeMismatch { object: String, expected: u64, actual: u64 },
    #[error("{object} in containerd's content store does not match its digest (got {actual}): refused")]
    DigestMismatch { object: String, actual: String },
    #[error("{object} in containerd's content store is not a usable manifest: {message}")]
    InvalidManifest { object: String, message: String },
    /// Its op is "blob file", whatever the call: the message names the
    /// file, not the system call.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// One namespace's view of containerd's images and content; cheap to clone.
#[derive(Debug, Clone)]
pub struct ContentStore {
    containerd: Containerd,
    namespace: String,
}

impl ContentStore {
    pub fn new(containerd: Containerd, namespace: &str) -> ContentStore {
        ContentStore {
            containerd,
            namespace: namespace.to_string(),
        }
    }

    /// Connects to containerd at `address`.
    pub async fn connect(address: &Path, namespace: &str) -> Result<ContentStore, ContentError> {
        Ok(ContentStore::new(Containerd::connect(address).await?, namespace))
    }

    /// Image `name`'s manifest for the running platform and its config, or
    /// None when the store lacks the image or any of those.
    pub async fn image(&self, name: &str) -> Result<Option<PulledManifest>, ContentError> {
        let Some(target) = self.containerd.image_target(&self.namespace, name).await? else {
            return Ok(None);
        };
        let object = format!("image {name}");
        let digest = parse_digest(&object, &target.digest)?;
        let size = declared_size(&object, target.size)?;
        let object = format!("manifest {digest} of image {name}");
        let Some(body) = self.read_small(&digest, size, MAX_MANIFEST_BYTES, &object).await? else {
            return Ok(None);
        };
        let (manifest, digest, body) = match parse_manifest(&body, &object)? {
            OciManifest::Image(manifest) => (manifest, digest, body),
            OciManifest::ImageIndex(index) => {
                let chosen = oci_client::client::current_platform_resolver(&index.manifests).ok_or_else(|| {
                    ContentError::InvalidManifest {
                        object: object.clone(),
                        message: "the index has no manifest for this platform".into(),
                    }
                })?;
                let entry = index.manifests.iter().find(|m| m.digest == chosen).ok_or_else(|| {
                    ContentError::InvalidManifest {
                        object: object.clone(),
                        message: format!("the index names {chosen} for this platform, yet lists no such entry"),
                    }
                })?;
                let digest = parse_digest(&object, &entry.digest)?;
                let object = format!("manifest {digest} of image {name}");
                let size = declared_size(&object, entry.size)?;
                let Some(body) = self.read_small(&digest, size, MAX_MANIFEST_BYTES, &object).await? else {
                    return Ok(None);
                };
                match parse_manifest(&body, &object)? {
                    OciManifest::Image(manifest) => (manifest, digest, body),
                    OciManifest::ImageIndex(_) => {
                        return Err(ContentError::InvalidManifest {
                            object,
                            message: "an index names another index for this platform".into(),
                        })
                    }
                }
            }
        };
        let Some(config) = self.config(name, &manifest).await? else {
            return Ok(None);
        };
        Ok(Some(PulledManifest {
            manifest,
            manifest_digest: digest.to_string(),
            manifest_bytes: body,
            config,
        }))
    }

    async fn config(&self, name: &str, manifest: &OciImageManifest) -> Result<Option<Vec<u8>>, ContentError> {
        let object = format!("config of image {name}");
        let digest = parse_digest(&object, &manifest.config.digest)?;
        let size = declared_size(&object, manifest.config.size)?;
        self.read_small(
            &digest,
            size,
            MAX_CONFIG_BYTES,
            &format!("config {digest} of image {name}"),
        )
        .await
    }

    /// Copies blob `digest` of `size` bytes (its descriptor's) to `dest`,
    /// verified. The file appears at `dest` only whole and verified.
    /// Returns false, writing nothing, when the store lacks the blob.
    pub async fn copy_blob_to(&self, digest: &Digest, size: u64, dest: &Path) -> Result<bool, ContentError> {
        let object = format!("blob {digest}");
        if !self.holds(digest, size, &object).await? {
            return Ok(false);
        }
        let partial = crate::oci::registry::partial_path(dest);
        match self.stream_to(digest, size, &object, &partial).await {
            Ok(()) => {
                std::fs::rename(&partial, dest).map_err(io_err("blob file", dest))?;
                Ok(true)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }

    /// Whether the store holds blob `digest`; one of another size than
    /// `size` is refused before a byte of it is read.
    async fn holds(&self, digest: &Digest, size: u64, object: &str) -> Result<bool, ContentError> {
        let Some(held) = self.containerd.content_size(&self.namespace, digest.as_str()).await? else {
            return Ok(false);
        };
        if u64::try_from(held).ok() != Some(size) {
            return Err(ContentError::SizeMismatch {
                object: object.to_string(),
                expected: size,
                actual: held.max(0) as u64,
            });
        }
        Ok(true)
    }

    /// Streams the blob into `path` on a blocking thread that checks it.
    async fn stream_to(&self, digest: &Digest, size: u64, object: &str, path: &Path) -> Result<(), ContentError> {
        let mut reader = self.containerd.read_content(&self.namespace, digest.as_str()).await?;
        let (sender, mut receiver) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let mut check = BlobCheck::new(object, digest, size);
        let file_path = path.to_path_buf();
        let writer = tokio::task::spawn_blocking(move || -> Result<(), ContentError> {
            let mut file = std::fs::File::create(&file_path).map_err(io_err("blob file", &file_path))?;
            while let Some(chunk) = receiver.blocking_recv() {
                check.add(&chunk)?;
                file.write_all(&chunk).map_err(io_err("blob file", &file_path))?;
            }
            check.finish()?;
            Ok(file.sync_all().map_err(io_err("blob file", &file_path))?)
        });
        let mut read_error = None;
        loop {
            match reader.next_chunk().await {
                Ok(Some(chunk)) => {
                    if sender.send(chunk).await.is_err() {
                        break; // The writer refused the blob; it says why below.
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
        }
        drop(sender);
        let written = writer
            .await
            .map_err(|join| io_err("blob file", path)(std::io::Error::other(join)))?;
        if let Some(e) = read_error {
            return Err(e.into());
        }
        written
    }

    /// A small blob (manifest, config) into memory, refused past `limit`.
    async fn read_small(
        &self,
        digest: &Digest,
        size: u64,
        limit: u64,
        object: &str,
    ) -> Result<Option<Vec<u8>>, ContentError> {
        if size > limit {
            return Err(ContentError::TooLarge {
                object: format!("{object} ({size} bytes declared)"),
                limit,
            });
        }
        if !self.holds(digest, size, object).await? {
            return Ok(None);
        }
        let mut reader = self.containerd.read_content(&self.namespace, digest.as_str()).await?;
        let mut check = BlobCheck::new(object, digest, size);
        let mut data = Vec::new();
        while let Some(chunk) = reader.next_chunk().await? {
            check.add(&chunk)?;
            data.extend_from_slice(&chunk);
        }
        check.finish()?;
        Ok(Some(data))
    }
}

/// Checks a blob's bytes, as they stream, against its descriptor: no byte
/// past its size is accepted, and at the end its size and digest must be
/// the descriptor's.
#[derive(Debug)]
pub struct BlobCheck {
    object: String,
    digest: Digest,
    size: u64,
    received: u64,
    hasher: Sha256,
}

impl BlobCheck {
    pub fn new(object: &str, digest: &Digest, size: u64) -> BlobCheck {
        BlobCheck {
            object: object.to_string(),
            digest: digest.clone(),
            size,
            received: 0,
            hasher: Sha256::new(),
        }
    }

    /// Takes the next chunk; refuses one that goes past the declared size.
    pub fn add(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        self.received = self.received.saturating_add(chunk.len() as u64);
        if self.received > self.size {
            return Err(ContentError::SizeMismatch {
                object: self.object.clone(),
                expected: self.size,
                actual: self.received,
            });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Whether the bytes taken are the declared size and digest.
    pub fn finish(self) -> Result<(), ContentError> {
        if self.received != self.size {
            return Err(ContentError::SizeMismatch {
                object: self.object,
                expected: self.size,
                actual: self.received,
            });
        }
        let actual: String = self.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if actual != self.digest.hex() {
            return Err(ContentError::DigestMismatch {
                object: self.object,
                actual: format!("sha256:{actual}"),
            });
        }
        Ok(())
    }
}

fn parse_digest(object: &str, digest: &str) -> Result<Digest, ContentError> {
    Digest::parse(digest).map_err(|source| ContentError::InvalidDigest {
        object: object.to_string(),
        source,
    })
}

/// A descriptor's size, which JSON and protobuf let be negative.
fn declared_size(object: &str, size: i64) -> Result<u64, ContentError> {
    u64::try_from(size).map_err(|_| ContentError::InvalidSize {
        object: object.to_string(),
        size,
    })
}

fn parse_manifest(body: &[u8], object: &str) -> Result<OciManifest, ContentError> {
    crate::oci::registry::manifest_v2(body).map_err(|message| ContentError::InvalidManifest {
        object: object.to_string(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> Digest {
        let hex: String = Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect();
        Digest::parse(&format!("sha256:{hex}")).unwrap()
    }

    #[test]
    fn a_blob_is_accepted_only_as_its_descriptor_says() {
        let data = b"layer bytes".repeat(1000);
        let digest = digest_of(&data);
        let size = data.len() as u64;
        let whole = |chunks: &[&[u8]]| -> Result<(), ContentError> {
            let mut check = BlobCheck::new("blob", &digest, size);
            for chunk in chunks {
                check.add(chunk)?;
            }
            check.finish()
        };
        let (a, b) = data.split_at(4000);
        whole(&[a, b]).unwrap();

        // The same length, other bytes: the digest tells.
        let mut tampered = data.clone();
        tampered[10] ^= 1;
        let e = whole(&[&tampered]).unwrap_err();
        assert!(matches!(e, ContentError::DigestMismatch { .. }), "{e}");
        assert!(e.to_string().contains("refused"), "{e}");

        // Longer: refused at the chunk that goes past the size.
        let mut check = BlobCheck::new("blob", &digest, size);
        check.add(&data).unwrap();
        let e = check.add(b"x").unwrap_err();
        assert!(
            matches!(e, ContentError::SizeMismatch { expected, actual, .. } if expected == size && actual == size + 1),
            "{e}"
        );

        // Shorter: refused at the end.
        let e = whole(&[a]).unwrap_err();
        assert!(matches!(e, ContentError::SizeMismatch { actual: 4000, .. }), "{e}");
    }

    #[test]
    fn manifests_are_parsed_with_their_schema_version() {
        let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},
            "layers":[]}"#;
        assert!(matches!(parse_manifest(image, "m").unwrap(), OciManifest::Image(_)));
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(matches!(
            parse_manifest(index, "m").unwrap(),
            OciManifest::ImageIndex(_)
        ));
        let old = image.to_vec();
        let old = String::from_utf8(old)
            .unwrap()
            .replace("\"schemaVersion\":2", "\"schemaVersion\":1");
        assert!(parse_manifest(old.as_bytes(), "m").is_err());
        assert!(parse_manifest(b"[]", "m").is_err());
        assert!(declared_size("x", -1).is_err());
        assert!(parse_digest("x", "sha256:../../etc/passwd").is_err());
    }
}
