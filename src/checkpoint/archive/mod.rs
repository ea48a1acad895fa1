//! Checkpoint archives: a checkpoint's chain as one portable OCI image (an
//! image layout in a tar file, as `ctr images import` and `skopeo inspect
//! oci-archive:` read it), and such an archive back into a catalogue.
//!
//! Owns the format and nothing else: blobs, changes and metadata are
//! stored through the [`Catalogue`](crate::checkpoint::Catalogue), metadata last, so an import that fails
//! leaves nothing listed (and deletes what it stored).
//!
//! The image has one layer per checkpoint of the chain, oldest first. A
//! layer is the checkpoint's change in OCI form:
//! - entries as tar members: directories, files with their content,
//!   symlinks, hard links (to the first path of their inode), fifos and
//!   devices; mode, owner, xattrs (PAX `SCHILY.xattr.*`) and times to the
//!   nanosecond (PAX `mtime` and `ctime`, so a tree comes back exactly);
//! - removed paths as `.wh.<name>` files;
//! - overlay opaque directories with a PAX `SEAMLESS.opaque` record, and a
//!   `<dir>/.wh..wh..opq` marker in the layer where the directory becomes
//!   opaque only: the flag hides the container image's directory, not
//!   what earlier checkpoints of the chain hold in it, and a marker in a
//!   later layer would hide those from other tools;
//! - overlay whiteouts and sockets (which tar cannot hold) as `.wh.<name>`
//!   too, marked with a PAX `SEAMLESS.kind` record and carrying their
//!   metadata: other tools see the path deleted, an import restores the
//!   entry.
//!
//! The checkpoints' metadata travels as `io.seamless.checkpoint.*`
//! annotations: the checkpoint's on the manifest, each layer's own on its
//! descriptor. An import accepts only archives that carry them: a foreign
//! image has no checkpoint to become.
//!
//! Memory stays bounded whatever the size: contents stream through the
//! tar writers and readers, layers are built in scratch files while their
//! digests are computed, and an import reads the archive's members in
//! place. Blocking: callers on a runtime use `spawn_blocking`.
//!
//! Files: `format` (OCI documents, annotations, PAX records), `paths`
//! (archive and member paths), `export` and `import`.

mod export;
mod format;
mod import;
mod paths;
#[cfg(test)]
mod testing;

use crate::checkpoint::catalogue::CatalogueError;
use crate::checkpoint::tree;
use crate::error::IoError;

pub use export::{export, Exported};
pub use format::image_reference;
pub use import::import;
pub use paths::{validate_source, validate_target};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    #[error("archive path {path:?}: {reason}")]
    Path { path: String, reason: String },
    #[error("{path} exists already (replacing it takes --force)")]
    Exists { path: String },
    #[error("archive {path} is damaged: {reason}")]
    Damaged { path: String, reason: String },
    /// A tree that cannot be written beneath a root: an entry beneath a
    /// symlink or file, a hard link out of the tree or to a link, a path
    /// that is not plain. Refused before anything is stored.
    #[error("archive {path}: checkpoint {id} is refused: {source}")]
    UnsafeTree {
        path: String,
        id: String,
        source: tree::TreeError,
    },
    #[error("archive {path} is not a checkpoint archive: {reason}")]
    Foreign { path: String, reason: String },
    #[error("checkpoint {id} of archive {path} exists already in {storage}")]
    Taken { id: String, path: String, storage: String },
    #[error("checkpoint {id}: /{entry} cannot be exported: {reason}")]
    Unexportable { id: String, entry: String, reason: String },
    #[error(transparent)]
    Io(#[from] IoError),
}
