//! Writes the seed archives of the `archive_import` target: a checkpoint
//! and its child exported as `checkpointctl export` does, from a small
//! writable layer with a file, a hard link, a symlink and a deletion.
//!   cargo run --manifest-path tests/fuzz/Cargo.toml --example make_seeds
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use seamless_snapshotter::checkpoint::archive;
use seamless_snapshotter::checkpoint::catalogue::{Compression, NewCheckpoint};
use seamless_snapshotter::checkpoint::objects::DirStore;
use seamless_snapshotter::checkpoint::Catalogue;
use seamless_snapshotter::snapshot::store::Store;

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/archive_import");
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let root = tmp.path();
    let store = Arc::new(Store::open(&root.join("meta.redb")).expect("a metadata store"));
    let objects = DirStore::open(&root.join("objects"), "local").expect("an object store");
    let catalogue = Catalogue::new("local".into(), Arc::new(objects), store, &root.join("work"));
    let upper = root.join("upper");
    fs::create_dir_all(upper.join("etc")).expect("etc");
    fs::write(upper.join("etc/app.conf"), b"port = 8080\n").expect("a file");
    fs::hard_link(upper.join("etc/app.conf"), upper.join("etc/app.link")).expect("a hard link");
    std::os::unix::fs::symlink("etc/app.conf", upper.join("conf")).expect("a symlink");
    let new = |parent: Option<String>| NewCheckpoint {
        namespace: "fuzz".into(),
        container: "web-1".into(),
        image: "registry.local/app:1".into(),
        labels: Default::default(),
        parent,
        compression: Compression::Zstd,
        pause: Duration::from_micros(1_500),
        process: None,
        container_key: None,
    };
    let id = catalogue.new_id(SystemTime::now()).expect("an id");
    let first = catalogue.create(&id, &upper, &new(None)).expect("the first checkpoint");
    fs::remove_file(upper.join("conf")).expect("the symlink removed");
    fs::write(upper.join("etc/app.conf"), b"port = 9090\n").expect("a changed file");
    let id = catalogue.new_id(SystemTime::now() + Duration::from_secs(1)).expect("an id");
    let second = catalogue.create(&id, &upper, &new(Some(first.id.clone()))).expect("the second checkpoint");
    fs::create_dir_all(&seeds).expect("the seed directory");
    for (name, checkpoint) in [("one.tar", &first), ("chain.tar", &second)] {
        archive::export(&catalogue, checkpoint, &seeds.join(name), true).expect("an export");
    }
    println!("seeds written to {}", seeds.display());
}
