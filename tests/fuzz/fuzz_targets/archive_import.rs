//! `checkpointctl import` of an archive from elsewhere: whatever the tar
//! holds, import refuses it or stores it, and never panics, hangs or writes
//! outside the catalogue's directories.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use seamless_snapshotter::checkpoint::archive;
use seamless_snapshotter::checkpoint::objects::DirStore;
use seamless_snapshotter::checkpoint::Catalogue;
use seamless_snapshotter::store::Store;

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let root = tmp.path();
    let store = Arc::new(Store::open(&root.join("meta.redb")).expect("a metadata store"));
    let objects = DirStore::open(&root.join("objects"), "local").expect("an object store");
    let catalogue = Catalogue::new("local".into(), Arc::new(objects), store, &root.join("work"));
    let source = root.join("archive.tar");
    std::fs::write(&source, data).expect("the archive written");
    if let Ok(imported) = archive::import(&catalogue, &source, "fuzz") {
        // What was accepted must restore to a plan without error.
        for checkpoint in &imported {
            let _ = catalogue.restore_plan(checkpoint);
        }
    }
});
