//! What the archive's tests share: a catalogue on a temporary local
//! storage, a chain of real checkpoints, and readers of what an export
//! wrote.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::catalogue::{self, Catalogue, Checkpoint, Compression, NewCheckpoint};
use crate::checkpoint::objects::DirStore;
use crate::oci::compress::Decoder;
use crate::snapshot::store::Store;

pub(super) struct World {
    pub(super) _tmp: tempfile::TempDir,
    pub(super) root: PathBuf,
    pub(super) objects: PathBuf,
    pub(super) catalogue: Catalogue,
}

pub(super) fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let objects = root.join("objects");
    let store = Arc::new(Store::open(&root.join("meta.redb")).unwrap());
    let catalogue = Catalogue::new(
        "local".into(),
        Arc::new(DirStore::open(&objects, "local").unwrap()),
        store,
        &root.join("work"),
    );
    World {
        _tmp: tmp,
        root,
        objects,
        catalogue,
    }
}

pub(super) fn new(parent: Option<&str>, labels: &[&str], compression: Compression) -> NewCheckpoint {
    NewCheckpoint {
        namespace: "ns".into(),
        container: "Web-1".into(),
        image: "registry.local/app:1".into(),
        labels: catalogue::parse_labels(&labels.iter().map(|l| l.to_string()).collect::<Vec<_>>()).unwrap(),
        parent: parent.map(str::to_string),
        compression,
        pause: Duration::from_micros(1_500),
        process: None,
        container_key: None,
        engine: String::new(),
    }
}

/// Every object file under `dir` (temporaries a crash leaves aside).
pub(super) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

/// A chain of three real checkpoints of an upper directory, one per
/// compression: files (one duplicated), directories, a symlink, hard
/// links (one to a file of an earlier checkpoint), a fifo, a removed
/// file and a removed directory.
pub(super) fn chain_of_three(w: &World) -> Vec<Checkpoint> {
    let upper = w.root.join("upper");
    fs::create_dir_all(upper.join("data/sub")).unwrap();
    fs::write(upper.join("data/big"), vec![9u8; 200_000]).unwrap();
    fs::write(upper.join("data/small"), b"one").unwrap();
    fs::write(upper.join("data/sub/gone"), b"bye").unwrap();
    fs::write(upper.join("data/empty"), b"").unwrap();
    std::os::unix::fs::symlink("big", upper.join("data/link")).unwrap();
    nix::unistd::mkfifo(&upper.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    let first = w
        .catalogue
        .create(
            "cp-20261201-100000",
            &upper,
            &new(None, &["golden", "env=prod"], Compression::None),
        )
        .unwrap();
    fs::write(upper.join("data/small"), b"two").unwrap();
    fs::write(upper.join("data/copy"), vec![9u8; 200_000]).unwrap();
    fs::hard_link(upper.join("data/big"), upper.join("data/big-again")).unwrap();
    fs::remove_dir_all(upper.join("data/sub")).unwrap();
    let second = w
        .catalogue
        .create(
            "cp-20261201-100100",
            &upper,
            &new(Some(&first.id), &[], Compression::Gzip),
        )
        .unwrap();
    fs::create_dir_all(upper.join("a/deep/er")).unwrap();
    fs::write(upper.join("a/deep/er/x"), b"x content").unwrap();
    // Sorts before a/deep/er/x, its first path.
    fs::hard_link(upper.join("a/deep/er/x"), upper.join("a-link")).unwrap();
    fs::remove_file(upper.join("data/empty")).unwrap();
    let third = w
        .catalogue
        .create(
            "cp-20261201-100200",
            &upper,
            &new(Some(&second.id), &["tip"], Compression::Zstd),
        )
        .unwrap();
    vec![first, second, third]
}

pub(super) fn layout_members(archive: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut tar = tar::Archive::new(File::open(archive).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.insert(name, data);
    }
    out
}

pub(super) fn decompress(data: &[u8], media_type: &str) -> Vec<u8> {
    let mut out = Vec::new();
    Decoder::new(data, Compression::of_media_type(media_type).unwrap())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}
