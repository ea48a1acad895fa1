//! The image a commit pushes: its layers as built tars and its config, the
//! base image's with the commit layers on top. Shared by the OCI and the
//! Nydus assembly.

use super::*;

/// A layer of the commit written as tars.
#[derive(Debug)]
pub struct BuiltLayer {
    /// Tars that stacked in order make the layer (one unless asked for more).
    pub parts: Vec<(LayerBlob, PathBuf)>,
    /// The history entry's `created_by`.
    pub created_by: String,
}

/// The base image's config with the commit layers on top: their diff_ids
/// appended to `rootfs.diff_ids`, a history entry each, and the newest
/// layer's creation time.
pub fn derive_config(base: &[u8], commit_layers: &[CommitLayer]) -> Result<Vec<u8>, String> {
    let mut config: serde_json::Value =
        serde_json::from_slice(base).map_err(|e| format!("base image config is not JSON: {e}"))?;
    let object = config.as_object_mut().ok_or("base image config is not a JSON object")?;
    let rootfs = object
        .entry("rootfs")
        .or_insert_with(|| serde_json::json!({"type": "layers", "diff_ids": []}));
    let diff_ids = rootfs
        .get_mut("diff_ids")
        .and_then(|d| d.as_array_mut())
        .ok_or("base image config has no rootfs.diff_ids")?;
    diff_ids.extend(
        commit_layers
            .iter()
            .map(|l| serde_json::Value::String(l.diff_id.clone())),
    );
    let history = object.entry("history").or_insert_with(|| serde_json::json!([]));
    if let Some(history) = history.as_array_mut() {
        history.extend(commit_layers.iter().map(|l| {
            serde_json::json!({
                "created": rfc3339(l.created),
                "created_by": l.created_by,
                "comment": "committed by seamless-snapshotter while the container ran",
            })
        }));
    }
    if let Some(newest) = commit_layers.iter().map(|l| l.created).max() {
        object.insert("created".into(), serde_json::Value::String(rfc3339(newest)));
    }
    serde_json::to_vec(&config).map_err(|e| e.to_string())
}
