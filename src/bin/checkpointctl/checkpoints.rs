//! What the checkpoint subcommands share: the machine-readable view of a
//! checkpoint (`-o json|yaml`, stable field names), human sizes, and ids
//! as scripts pass them (`jq '.[-1].id'` prints them in JSON quotes).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use seamless_snapshotter::proto::{Checkpoint, ProcessState};
use seamless_snapshotter::time::rfc3339;

use crate::CliError;

/// A checkpoint as `list -o json|yaml` and `info --metadata` print it.
#[derive(Debug, Serialize)]
pub struct View {
    pub id: String,
    pub namespace: String,
    pub container: String,
    pub image: String,
    /// ISO 8601, UTC: YYYY-MM-DDTHH:MM:SSZ.
    pub created: String,
    /// Bytes of storage its own data takes.
    pub size: u64,
    /// Bytes of file content in its change.
    pub content_size: u64,
    pub labels: BTreeMap<String, String>,
    pub parent: Option<String>,
    pub status: String,
    pub compression: String,
    pub changed_entries: u64,
    pub removed_entries: u64,
    pub fs_only: bool,
    pub pause_ms: f64,
    pub delta_digest: String,
    /// The CRIU dump; null for a filesystem-only checkpoint.
    pub process: Option<ProcessView>,
    /// Whose container: "containerd" or "docker".
    pub engine: String,
}

/// A checkpoint's process state: what CRIU reported of the dump.
#[derive(Debug, Serialize)]
pub struct ProcessView {
    pub criu_version: String,
    /// Anonymous memory of the container when dumped.
    pub memory_bytes: u64,
    /// Bytes this dump's own images take uncompressed.
    pub images_size: u64,
    /// Bytes the images added to the storage (new chunks of memory).
    pub stored_bytes: u64,
    /// How long the processes were frozen for the final dump.
    pub frozen_ms: f64,
    pub freezing_ms: f64,
    pub memdump_ms: f64,
    pub memwrite_ms: f64,
    pub pages_scanned: u64,
    pub pages_written: u64,
    /// Pages left to the parent images (the pre-dump's or the parent checkpoint's).
    pub pages_skipped_parent: u64,
    pub pre_dump: bool,
    pub pre_dump_pages_written: u64,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub leave_running: bool,
    /// Storage keys of the image sets a restore reads, oldest first.
    pub images: Vec<String>,
    pub dump_log_key: String,
}

impl ProcessView {
    pub fn of(p: &ProcessState) -> ProcessView {
        ProcessView {
            criu_version: p.criu_version.clone(),
            memory_bytes: p.memory_bytes,
            images_size: p.images_size,
            stored_bytes: p.stored_bytes,
            frozen_ms: micros_as_ms(p.frozen_time_us),
            freezing_ms: micros_as_ms(p.freezing_time_us),
            memdump_ms: micros_as_ms(p.memdump_time_us),
            memwrite_ms: micros_as_ms(p.memwrite_time_us),
            pages_scanned: p.pages_scanned,
            pages_written: p.pages_written,
            pages_skipped_parent: p.pages_skipped_parent,
            pre_dump: p.pre_dump,
            pre_dump_pages_written: p.pre_dump_pages_written,
            tcp_established: p.tcp_established,
            file_locks: p.file_locks,
            leave_running: p.leave_running,
            images: p.images.clone(),
            dump_log_key: p.dump_log_key.clone(),
        }
    }
}

/// Milliseconds to two decimals.
fn micros_as_ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

/// The process state of a checkpoint that has one.
pub fn process_state(c: &Checkpoint) -> Option<&ProcessState> {
    c.process.as_ref().filter(|_| !c.fs_only)
}

impl View {
    pub fn of(c: &Checkpoint) -> View {
        View {
            engine: if c.engine.is_empty() {
                "containerd".into()
            } else {
                c.engine.clone()
            },
            id: c.id.clone(),
            namespace: c.namespace.clone(),
            container: c.container.clone(),
            image: c.image.clone(),
            created: created(c),
            size: c.size,
            content_size: c.content_size,
            labels: c.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            parent: Some(c.parent.clone()).filter(|p| !p.is_empty()),
            status: c.status.clone(),
            compression: c.compression.clone(),
            changed_entries: c.changed_entries,
            removed_entries: c.removed_entries,
            fs_only: c.fs_only,
            pause_ms: (c.pause_time_ns as f64 / 1e4).round() / 100.0,
            delta_digest: c.delta_digest.clone(),
            process: process_state(c).map(ProcessView::of),
        }
    }
}

pub fn created(c: &Checkpoint) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(c.created_unix.max(0) as u64))
}

/// `k=v` and bare `k` labels, sorted, comma-separated.
pub fn labels_text(c: &Checkpoint) -> String {
    let labels: BTreeMap<_, _> = c.labels.iter().collect();
    labels
        .into_iter()
        .map(|(k, v)| if v.is_empty() { k.clone() } else { format!("{k}={v}") })
        .collect::<Vec<_>>()
        .join(",")
}

pub use seamless_snapshotter::units::human_size;

/// An id as given: surrounding white space and JSON double quotes go.
pub fn checkpoint_id(raw: &str) -> Result<String, CliError> {
    let trimmed = raw.trim();
    let id = trimmed
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(trimmed);
    if id.is_empty() {
        return Err(CliError::Usage("a checkpoint id is required".into()));
    }
    Ok(id.to_string())
}

/// A file to create, as the daemon needs it: absolute, through the real
/// path of its directory (which must exist), so `..` and symlinks are
/// resolved here, where the path was typed.
pub fn new_file_path(raw: &Path) -> Result<PathBuf, CliError> {
    let usage = |reason: String| CliError::Usage(format!("{}: {reason}", raw.display()));
    let name = match raw.components().next_back() {
        Some(Component::Normal(name)) if !raw.as_os_str().as_encoded_bytes().ends_with(b"/") => name,
        _ => return Err(usage("does not name a file".into())),
    };
    let dir = match raw.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).map_err(|e| usage(format!("its directory {}: {e}", dir.display())))?;
    Ok(dir.join(name))
}

/// An existing file, as the daemon needs it: its absolute real path.
pub fn existing_file_path(raw: &Path) -> Result<PathBuf, CliError> {
    std::fs::canonicalize(raw).map_err(|e| CliError::Usage(format!("{}: {e}", raw.display())))
}

/// `rows` under `headers` in columns two spaces apart, each as wide as its
/// widest cell; the last column is not padded.
pub fn columns<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(str::len);
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut out = line(&headers.map(String::from));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

pub fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing plain data to JSON cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_default()
}

pub fn to_yaml<T: Serialize>(value: &T) -> String {
    serde_yaml_ng::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_out_of_json_quotes() {
        assert_eq!(checkpoint_id("\"cp-20261201-101112\"\n").unwrap(), "cp-20261201-101112");
        assert_eq!(checkpoint_id(" cp-20261201-101112 ").unwrap(), "cp-20261201-101112");
        assert!(checkpoint_id("\"\"").is_err());
    }

    #[test]
    fn file_paths_become_absolute_and_real() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(real.join("sub")).unwrap();
        let through_dots = real.join("sub/../out.tar");
        assert_eq!(new_file_path(&through_dots).unwrap(), real.join("out.tar"));
        assert!(new_file_path(&real.join("missing/out.tar")).is_err());
        assert!(new_file_path(&real.join("sub/")).is_err());
        assert!(new_file_path(&real.join("sub/..")).is_err());
        assert!(new_file_path(Path::new("relative.tar")).unwrap().is_absolute());
        std::fs::write(real.join("a.tar"), b"").unwrap();
        assert_eq!(
            existing_file_path(&real.join("sub/../a.tar")).unwrap(),
            real.join("a.tar")
        );
        assert!(existing_file_path(&real.join("b.tar")).is_err());
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(320), "320 B");
        assert_eq!(human_size(1536), "1.5 KB");
        assert_eq!(human_size(5 << 30), "5.0 GB");
    }

    #[test]
    fn views_carry_iso_dates_and_null_parents() {
        let c = Checkpoint {
            id: "cp-20261201-101112".into(),
            created_unix: 1_764_583_872,
            pause_time_ns: 1_234_567,
            ..Checkpoint::default()
        };
        let json: serde_json::Value = serde_json::from_str(&to_json(&View::of(&c))).unwrap();
        assert_eq!(json["created"], "2025-12-01T10:11:12Z");
        assert!(json["parent"].is_null());
        assert_eq!(json["pause_ms"], 1.23);
        assert!(to_yaml(&View::of(&c)).contains("id: cp-20261201-101112"));
    }

    #[test]
    fn views_carry_process_state_unless_filesystem_only() {
        let process = ProcessState {
            frozen_time_us: 41_237,
            pages_written: 12,
            criu_version: "4.1.1".into(),
            ..ProcessState::default()
        };
        let with = Checkpoint {
            process: Some(process.clone()),
            ..Checkpoint::default()
        };
        let json: serde_json::Value = serde_json::from_str(&to_json(&View::of(&with))).unwrap();
        assert_eq!(json["process"]["frozen_ms"], 41.24);
        assert_eq!(json["process"]["pages_written"], 12);
        assert_eq!(json["process"]["criu_version"], "4.1.1");
        let fs_only = Checkpoint {
            fs_only: true,
            process: Some(process),
            ..Checkpoint::default()
        };
        let json: serde_json::Value = serde_json::from_str(&to_json(&View::of(&fs_only))).unwrap();
        assert!(json["process"].is_null(), "{json}");
    }
}
