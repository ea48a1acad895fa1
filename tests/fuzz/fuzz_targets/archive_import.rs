//! `checkpointctl import` of an archive from elsewhere: whatever the tar
//! holds, import refuses it or stores it, and never panics, hangs or writes
//! outside the catalogue's directories.
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use seamless_snapshotter::checkpoint::archive;
use seamless_snapshotter::checkpoint::objects::DirStore;
use seamless_snapshotter::checkpoint::Catalogue;
use seamless_snapshotter::snapshot::store::Store;

/// One metadata store for every run (opening one costs seconds under the
/// sanitizer); each run gets a storage of its own in it, so runs do not see
/// one another's checkpoints. On tmpfs, so that the store's syncs are free.
fn shared() -> &'static (tempfile::TempDir, Arc<Store>) {
    static SHARED: OnceLock<(tempfile::TempDir, Arc<Store>)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm").expect("a temporary directory on /dev/shm");
        let store = Arc::new(Store::open(&dir.path().join("meta.redb")).expect("a metadata store"));
        (dir, store)
    })
}

fuzz_target!(|data: &[u8]| {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let (dir, store) = shared();
    let root: PathBuf = dir.path().join(format!("run-{run}"));
    let objects = DirStore::open(&root.join("objects"), "local").expect("an object store");
    let catalogue = Catalogue::new(format!("fuzz-{run}"), Arc::new(objects), store.clone(), &root.join("work"));
    let source = root.join("archive.tar");
    std::fs::write(&source, data).expect("the archive written");
    if let Ok(imported) = archive::import(&catalogue, &source, "fuzz") {
        // What was accepted must restore to a plan without error.
        for checkpoint in &imported {
            if let Err(e) = catalogue.restore_plan(checkpoint) {
                panic!("imported checkpoint {} has no restore plan: {e}", checkpoint.id);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
});
