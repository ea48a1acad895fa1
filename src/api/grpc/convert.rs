//! Wire <-> domain conversions for containerd's snapshots API (the Control
//! API's are in `control_convert`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_snapshots::api::snapshots::v1 as api;
use containerd_snapshots::api::types::Mount as ApiMount;

use crate::snapshot::model::{Info, Kind, Labels, Mount};
use crate::snapshot::snapshotter::KeyStyle;

/// The gRPC header containerd (1.7+) and its proxy client use to name the namespace.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Requests that name their namespace carry opaque keys; others carry
/// containerd 1.6's `<ns>/<n>/<name>` keys.
pub fn key_style<T>(request: &tonic::Request<T>) -> KeyStyle {
    match request.metadata().get(NAMESPACE_HEADER) {
        Some(ns) if !ns.is_empty() => KeyStyle::Namespaced,
        _ => KeyStyle::Prefixed,
    }
}

pub fn labels_from_wire(labels: std::collections::HashMap<String, String>) -> Labels {
    labels.into_iter().collect()
}

pub fn mounts_to_wire(mounts: Vec<Mount>) -> Vec<ApiMount> {
    mounts
        .into_iter()
        .map(|m| ApiMount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn kind_to_wire(kind: Kind) -> api::Kind {
    match kind {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    }
}

fn time_to_wire(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn info_to_wire(info: Info) -> api::Info {
    api::Info {
        name: info.name,
        parent: info.parent,
        kind: kind_to_wire(info.kind) as i32,
        created_at: Some(time_to_wire(info.created)),
        updated_at: Some(time_to_wire(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_round_trips_fields() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        let wire = info_to_wire(Info {
            name: "n".into(),
            parent: "p".into(),
            kind: Kind::Committed,
            labels: [("a".to_string(), "b".to_string())].into(),
            created: t,
            updated: t,
        });
        assert_eq!(wire.kind, api::Kind::Committed as i32);
        assert_eq!(wire.created_at.unwrap().seconds, 1_700_000_000);
        assert_eq!(wire.updated_at.unwrap().nanos, 123);
        assert_eq!(wire.labels.get("a").map(String::as_str), Some("b"));
    }
}
