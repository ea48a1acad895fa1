//! A container's commit chain: the commit layers already pushed on top of its
//! image, and the capture the newest of them was built from. Decides how the
//! next commit's layers are made: the whole upper when there is no usable
//! chain, only the change since the last capture when there is, and the older
//! commit layers merged into one when the chain would outgrow the commit's
//! `maximum_times`. Pure data and rules: reading captures, building layers and
//! persisting the chain belong to `commit`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One commit layer of a chain, as pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitLayer {
    pub media_type: String,
    /// `sha256:<hex>` of the blob as stored.
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    pub size: u64,
    /// An image reference in the repository the blob was pushed to, where a
    /// later commit to another repository fetches it from.
    pub pushed_to: String,
    /// The push went to that registry without verified TLS.
    pub insecure: bool,
    /// The image config's history entry for the layer.
    pub created_by: String,
    pub created: SystemTime,
}

/// What a container's chain is tied to: a commit continues the chain only
/// when all of it is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainOrigin {
    /// The container's active snapshot (a container recreated under the same
    /// id has another).
    pub snapshot_key: String,
    /// The image the container runs, whose layers the chain sits on.
    pub source_image: String,
    /// The commit's `with_paths` and `without_paths`: layers filtered
    /// differently do not stack.
    pub with_paths: Vec<PathBuf>,
    pub without_paths: Vec<PathBuf>,
    /// "oci", or "nydus-v<fs version>-<compressor>": layers of another
    /// format do not stack.
    #[serde(default)]
    pub image_format: String,
}

/// The chain as persisted, one per container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub origin: ChainOrigin,
    /// The read-only capture the newest layer was built from; kept until the
    /// next commit of the container has been pushed.
    pub head: PathBuf,
    /// Commit layers above the image's own, oldest first.
    pub layers: Vec<CommitLayer>,
    /// A Nydus chain's bootstrap layer, the parent of its next commit.
    #[serde(default)]
    pub bootstrap: Option<CommitLayer>,
}

/// How the next commit's layers are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// One layer holding the whole upper.
    Full,
    /// The chain's layers, then one holding the change since `previous`.
    Incremental { keep: Vec<CommitLayer>, previous: PathBuf },
    /// One layer holding the whole upper as of `previous` (the chain's layers
    /// merged), then one holding the change since it.
    Merge { merged: usize, previous: PathBuf },
}

impl Plan {
    /// A word for the job status and the logs.
    pub fn describe(&self) -> &'static str {
        match self {
            Plan::Full => "full",
            Plan::Incremental { .. } => "incremental",
            Plan::Merge { .. } => "merged",
        }
    }

    /// The earlier capture the new layer is a diff against, if any.
    pub fn previous(&self) -> Option<&Path> {
        match self {
            Plan::Full => None,
            Plan::Incremental { previous, .. } | Plan::Merge { previous, .. } => Some(previous),
        }
    }
}

/// Decides the layers of a commit of a container whose chain is `chain`
/// (`head_exists` tells whether its capture is still on disk), so that the
/// image has at most `maximum_times` commit layers.
pub fn plan(chain: Option<&Chain>, head_exists: bool, origin: &ChainOrigin, maximum_times: u32) -> Plan {
    let Some(chain) = chain.filter(|c| head_exists && &c.origin == origin && !c.layers.is_empty()) else {
        return Plan::Full;
    };
    let limit = maximum_times as usize;
    if limit <= 1 {
        // No room for a layer beside the merged one.
        return Plan::Full;
    }
    if chain.layers.len() < limit {
        Plan::Incremental {
            keep: chain.layers.clone(),
            previous: chain.head.clone(),
        }
    } else {
        Plan::Merge {
            merged: chain.layers.len(),
            previous: chain.head.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> ChainOrigin {
        ChainOrigin {
            snapshot_key: "ns/3/c".into(),
            source_image: "r/app:1".into(),
            with_paths: vec![],
            without_paths: vec!["/tmp".into()],
            image_format: "oci".into(),
        }
    }

    fn layer(n: u8) -> CommitLayer {
        CommitLayer {
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            digest: format!("sha256:{:064x}", n),
            diff_id: format!("sha256:{:064x}", n + 100),
            size: 10,
            pushed_to: "r/out:1".into(),
            insecure: true,
            created_by: format!("seamless-commit snapshot-{n}"),
            created: SystemTime::UNIX_EPOCH,
        }
    }

    fn chain(layers: usize) -> Chain {
        Chain {
            origin: origin(),
            head: "/root/captures/snapshot-9".into(),
            layers: (0..layers as u8).map(layer).collect(),
            bootstrap: None,
        }
    }

    #[test]
    fn first_commit_is_full() {
        assert_eq!(plan(None, false, &origin(), 10), Plan::Full);
    }

    #[test]
    fn a_chain_grows_by_the_change_until_the_limit_then_merges() {
        let c = chain(2);
        assert_eq!(
            plan(Some(&c), true, &origin(), 3),
            Plan::Incremental {
                keep: c.layers.clone(),
                previous: c.head.clone()
            }
        );
        let c = chain(3);
        let p = plan(Some(&c), true, &origin(), 3);
        assert_eq!(
            p,
            Plan::Merge {
                merged: 3,
                previous: c.head.clone()
            }
        );
        assert_eq!(p.previous(), Some(c.head.as_path()));
        // A lowered limit also merges a chain already longer than it.
        assert!(matches!(
            plan(Some(&chain(5)), true, &origin(), 2),
            Plan::Merge { merged: 5, .. }
        ));
        // One layer allowed: the whole upper each time.
        assert_eq!(plan(Some(&chain(1)), true, &origin(), 1), Plan::Full);
    }

    #[test]
    fn a_changed_origin_or_a_lost_capture_starts_over() {
        let c = chain(2);
        assert_eq!(plan(Some(&c), false, &origin(), 10), Plan::Full, "capture gone");
        for change in [
            (|o: &mut ChainOrigin| o.snapshot_key = "ns/4/c".into()) as fn(&mut ChainOrigin),
            |o| o.source_image = "r/app:2".into(),
            |o| o.with_paths = vec!["/data".into()],
            |o| o.without_paths.clear(),
            |o| o.image_format = "nydus-v6-lz4_block".into(),
        ] {
            let mut other = origin();
            change(&mut other);
            assert_eq!(plan(Some(&c), true, &other, 10), Plan::Full, "{other:?}");
        }
        assert_eq!(plan(Some(&chain(0)), true, &origin(), 10), Plan::Full, "empty chain");
    }
}
