//! The catalogue of one storage: checkpoints' metadata (in the daemon's
//! store, for listing, and beside the data, so the storage describes
//! itself), their changes and the content-addressed blobs they reference.
//!
//! Layout in the object store:
//! - `blobs/sha256/<hex>.<raw|gz|zst>`: a file's content, named by the
//!   sha256 of the uncompressed bytes, so identical files are stored once
//!   across checkpoints and containers;
//! - `chunks/sha256/<hex>.zst`: a chunk of a large file or of CRIU images,
//!   stored once; `blobs/sha256/<digest>.chunks` lists a file's chunks;
//! - `deltas/<id>-<n>.json.zst`: a checkpoint's change ([`Delta`](super::tree::Delta));
//! - `checkpoints/<id>.json`: its metadata, written last: a checkpoint
//!   exists once this object does.
//!
//! Blocking: callers on a runtime use `spawn_blocking`. Writers of one
//! storage are serialized by the caller.
//!
//! Files by concern: `record` (the metadata model, ids, labels, policies),
//! `checkpoints` (create, get, list, chains), `blobs` (content-addressed
//! blobs, verified reads), `chunks` (content-defined chunking),
//! `retention` (prune, merge, garbage collection), `staging` (scratch
//! files).

mod blobs;
mod checkpoints;
mod chunks;
mod record;
mod retention;
mod staging;
#[cfg(test)]
mod testing;

use std::path::Path;
use std::sync::Arc;

use super::objects::{ObjectError, ObjectStore};
use super::tree::TreeError;
use crate::error::IoError;
use crate::snapshot::store::{Store, StoreError};

pub use crate::oci::compress::Compression;
pub(super) use blobs::{blob_digest, content_key};
pub(super) use chunks::IMAGE_CHUNK_SIZES;
pub use record::{
    parse_labels, validate_id, Checkpoint, MergePlan, MergePolicy, MergeStrategy, NewCheckpoint, ProcessState,
    PrunePlan, PrunePolicy, ENGINE_DOCKER,
};
pub(super) use staging::StagedFile;

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
    #[error(transparent)]
    Io(#[from] IoError),
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
}
