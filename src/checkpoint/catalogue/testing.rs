//! What the catalogue's tests share: a catalogue on a temporary local
//! storage, with an upper directory to checkpoint.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use super::{parse_labels, Catalogue, Compression, NewCheckpoint};
use crate::checkpoint::objects::DirStore;
use crate::snapshot::store::Store;

pub(super) struct World {
    pub(super) _tmp: tempfile::TempDir,
    pub(super) upper: std::path::PathBuf,
    pub(super) objects: std::path::PathBuf,
    pub(super) catalogue: Catalogue,
}

pub(super) fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let objects = tmp.path().join("objects");
    let store = Arc::new(Store::open(&tmp.path().join("meta.redb")).unwrap());
    let catalogue = Catalogue::new(
        "local".into(),
        Arc::new(DirStore::open(&objects, "local").unwrap()),
        store,
        &tmp.path().join("work"),
    );
    let upper = tmp.path().join("upper");
    fs::create_dir_all(upper.join("data")).unwrap();
    World {
        _tmp: tmp,
        upper,
        objects,
        catalogue,
    }
}

pub(super) fn new(parent: Option<&str>, labels: &[&str], compression: Compression) -> NewCheckpoint {
    NewCheckpoint {
        namespace: "ns".into(),
        container: "c1".into(),
        image: "img".into(),
        labels: parse_labels(&labels.iter().map(|l| l.to_string()).collect::<Vec<_>>()).unwrap(),
        parent: parent.map(str::to_string),
        compression,
        pause: Duration::from_millis(2),
        process: None,
        container_key: None,
        engine: String::new(),
    }
}

pub(super) fn blob_count(w: &World) -> usize {
    fs::read_dir(w.objects.join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub(super) fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().unwrap().is_dir() {
            out.extend(walk(&entry.path()));
        } else {
            out.push(entry.path());
        }
    }
    out
}
