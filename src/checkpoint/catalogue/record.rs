//! The catalogue's record model: a checkpoint's metadata ([`Checkpoint`],
//! [`ProcessState`]) as it is stored beside the data and in the daemon's
//! store, the checks of ids and labels, and what create, prune and merge
//! are asked ([`NewCheckpoint`], the policies) and answer (the plans).
//! Changing a serialized field changes the storage format.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{CatalogueError, Compression};
use crate::checkpoint::filter::Subject;

impl Compression {
    /// The compression a checkpoint request names; empty means zstd, the
    /// catalogue's default (layers default to gzip).
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
    /// The engine whose container it is: empty for containerd's,
    /// [`ENGINE_DOCKER`] for Docker's (its record is then the engine's
    /// inspect answer).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub engine: String,
}

/// [`Checkpoint::engine`] of a Docker Engine container's checkpoint.
pub const ENGINE_DOCKER: &str = "docker";

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

pub(super) struct Subjected<'a>(pub(super) &'a Checkpoint, pub(super) SystemTime);

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

/// What a create stores. Serialised in the journal of a dump that stops
/// its container (`checkpoint::journal`), before the dump: without its
/// process state then, the pause in nanoseconds as `pause_ns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewCheckpoint {
    pub namespace: String,
    pub container: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub parent: Option<String>,
    pub compression: Compression,
    #[serde(rename = "pause_ns", with = "duration_ns")]
    pub pause: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessState>,
    pub container_key: Option<String>,
    /// See [`Checkpoint::engine`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub engine: String,
}

/// A duration as whole nanoseconds (saturating at `u64::MAX`).
mod duration_ns {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_nanos)
    }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    /// The name [`MergeStrategy::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            MergeStrategy::TimeBased => "time-based",
            MergeStrategy::Incremental => "incremental",
            MergeStrategy::Tagged => "tagged",
        }
    }

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

/// Serialised in a schedule's record (its automerge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl MergePolicy {
    /// Whether the policy can decide anything: time-based needs a window.
    pub fn check(&self) -> Result<(), CatalogueError> {
        if self.strategy == MergeStrategy::TimeBased && self.keep_daily.is_none() && self.keep_hourly.is_none() {
            return Err(CatalogueError::Invalid(
                "the time-based strategy needs --keep-daily or --keep-hourly (or automerge.keep_daily in the config)"
                    .into(),
            ));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use super::*;

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
