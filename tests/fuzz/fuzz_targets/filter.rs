//! The filter languages: `checkpointctl list --filter` / prune expressions
//! and containerd-style filters on the snapshotter's Walk.
#![no_main]

use std::collections::BTreeMap;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use seamless_snapshotter::checkpoint::filter::{parse_duration, parse_size, Filter, Subject};
use seamless_snapshotter::snapshot::filter::{Fields, FilterSet};

struct Checkpoint {
    labels: BTreeMap<String, String>,
}

impl Subject for Checkpoint {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn age(&self) -> Duration {
        Duration::from_secs(3600)
    }
    fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
    fn status(&self) -> &str {
        "ready"
    }
}

struct Snapshot;

impl Fields for Snapshot {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("name") => Some("ns/1/sha256:abc".into()),
            Some("kind") => Some("committed".into()),
            Some("labels") => path.get(1).map(|l| format!("value of {l}")),
            _ => None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let checkpoint = Checkpoint {
        labels: BTreeMap::from([("app".into(), "web".into()), ("tier".into(), String::new())]),
    };
    if let Ok(filter) = Filter::parse(text) {
        let _ = filter.matches(&checkpoint);
    }
    let filters: Vec<&str> = text.split('\n').collect();
    if let Ok(set) = FilterSet::parse_all(&filters) {
        let _ = set.matches(&Snapshot);
    }
    let _ = parse_size(text);
    let _ = parse_duration(text);
});
