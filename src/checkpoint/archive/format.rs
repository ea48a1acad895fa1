//! The archive format that export writes and import reads: the OCI
//! documents (index, manifest, config), the media types and annotation
//! names, the PAX records beyond POSIX that carry what tar has no field
//! for, and PAX times. Changing any of these changes the archive format
//! ([`ARCHIVE_VERSION`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Media types of the documents; a layer's is its compression's
/// ([`Compression::media_type`](crate::oci::compress::Compression::media_type)).
pub(super) const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// The name `ctr images import` gives the image (it keeps a name that
/// holds `/` or `:` as it is).
pub(super) const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub(super) const IMAGE_CREATED: &str = "org.opencontainers.image.created";

pub(super) const ANNOTATION_PREFIX: &str = "io.seamless.checkpoint.";

/// Bumped when an older import could not read what an export writes.
pub(super) const ARCHIVE_VERSION: &str = "1";

/// On a directory member: "1" when it is an overlay opaque directory.
pub(super) const OPAQUE_RECORD: &str = "SEAMLESS.opaque";
/// On a `.wh.` member: the entry it stands for ("whiteout" or "socket").
pub(super) const KIND_RECORD: &str = "SEAMLESS.kind";
pub(super) const XATTR_RECORD: &str = crate::oci::layer_tar::PAX_XATTR_PREFIX;

/// A member's PAX records: key, value.
pub(super) type PaxRecords = Vec<(String, Vec<u8>)>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Descriptor {
    #[serde(rename = "mediaType")]
    pub(super) media_type: String,
    pub(super) digest: String,
    pub(super) size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Platform {
    pub(super) architecture: String,
    pub(super) os: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Index {
    #[serde(rename = "schemaVersion")]
    pub(super) schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    pub(super) manifests: Vec<Descriptor>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub(super) schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    pub(super) config: Descriptor,
    pub(super) layers: Vec<Descriptor>,
    #[serde(default)]
    pub(super) annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ImageConfig {
    pub(super) created: String,
    pub(super) architecture: String,
    pub(super) os: String,
    #[serde(default)]
    pub(super) config: serde_json::Value,
    pub(super) rootfs: RootFs,
    #[serde(default)]
    pub(super) history: Vec<History>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct RootFs {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) diff_ids: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct History {
    pub(super) created: String,
    pub(super) created_by: String,
    pub(super) comment: String,
}

/// `architecture` of OCI platforms (Go's GOARCH names) for this host.
pub(super) fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

pub(super) fn annotation(key: &str) -> String {
    format!("{ANNOTATION_PREFIX}{key}")
}

/// The image name of checkpoint `id` of `container`: a reference docker
/// and containerd accept (repository components are lower case).
pub fn image_reference(container: &str, id: &str) -> String {
    format!("seamless-checkpoint/{}:{id}", container.to_ascii_lowercase())
}

/// A PAX time: seconds, a dot and nine digits of nanoseconds.
pub(super) fn pax_time(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let abs = ns.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

pub(super) fn parse_pax_time(text: &str) -> Option<i64> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, fraction) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: String = fraction.chars().chain(std::iter::repeat('0')).take(9).collect();
    let total = secs
        .parse::<i64>()
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(nanos.parse::<i64>().ok()?)?;
    Some(if negative { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::unhex;

    #[test]
    fn times_and_dates_round_trip() {
        for ns in [0, 1, -1, 1_764_583_872_123_456_789, -1_500_000_000, 999_999_999] {
            assert_eq!(parse_pax_time(&pax_time(ns)), Some(ns), "{ns}");
        }
        assert_eq!(pax_time(-1_500_000_000), "-1.500000000");
        assert_eq!(parse_pax_time("12"), Some(12_000_000_000));
        assert_eq!(parse_pax_time("1.5"), Some(1_500_000_000));
        assert_eq!(parse_pax_time("1.1234567891"), Some(1_123_456_789));
        for bad in ["", "x", "1.x", "-", ".5"] {
            assert_eq!(parse_pax_time(bad), None, "{bad:?}");
        }
        assert_eq!(
            image_reference("Web_1", "cp-20261201-101112"),
            "seamless-checkpoint/web_1:cp-20261201-101112"
        );
        assert_eq!(unhex("00ff"), Some(vec![0, 255]));
        assert_eq!(unhex("0"), None);
    }
}
