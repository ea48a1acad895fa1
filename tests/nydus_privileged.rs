//! Privileged checks of RAFS v6 serving against the real kernel: an image is
//! built with the crate's Nydus builder from two layer directories (for each
//! compressor), its blobs turned into cache files, and the bootstrap mounted
//! as erofs through `RealSystem` with the cache files as devices; the mounted
//! tree must be the layers applied one on the other, byte for byte, and a
//! cache file that does not fit must be refused with the kernel's reason.
//! The same images, RAFS v5 too, served over FUSE by the daemon's in-process
//! server: the same tree, chunks read only as files are.
//! A bootstrap whose blob table names a traversing blob id is refused by the
//! daemon's mount path, erofs and FUSE, before any file outside
//! `<root>/nydus` is created, opened or extended.
//! Root only: the tests fail (never skip) without it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use std::sync::Arc;

use seamless_snapshotter::config::FsDriver;
use seamless_snapshotter::error::io_err;
use seamless_snapshotter::host::sys::{RealSystem, SysError, SystemOps};
use seamless_snapshotter::nydus::fuse::{BlobBackend, FuseServer, FuseSpec, InProcessFuse};
use seamless_snapshotter::nydus::mount::{
    build_cache_file, read_chunk_table, BlobOrigin, BlobSource, RafsMountError, RafsMounts,
};
use seamless_snapshotter::nydus::{self, Compressor, RafsOptions};
use seamless_snapshotter::oci::registry::RegistryError;

fn require_root_and_erofs() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (erofs mounts, device nodes, ownership): run them as root, as .ci/test does"
    );
    let _ = Command::new("modprobe").arg("erofs").status();
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    assert!(
        filesystems.split_whitespace().any(|f| f == "erofs"),
        "the kernel has no erofs (CONFIG_EROFS_FS, with file-backed mounts): RAFS v6 images cannot be served"
    );
}

/// A mount made by a test, unmounted when dropped, pass or fail.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = RealSystem.unmount(&self.0);
    }
}

/// Deterministic incompressible bytes.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn write(path: &Path, data: &[u8], mode: u32, owner: (u32, u32)) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1)).unwrap();
}

/// The base layer: files across chunk boundaries, an empty file, modes and
/// owners, a hard link, symlinks, a fifo, a character device, a deep path.
fn base_layer(dir: &Path) {
    write(&dir.join("etc/hosts"), b"127.0.0.1 localhost\n", 0o644, (0, 0));
    write(&dir.join("etc/gone"), b"removed by the upper layer", 0o600, (0, 0));
    write(
        &dir.join("usr/bin/big"),
        &noise(3 * 1024 * 1024 + 12345, 1),
        0o755,
        (0, 0),
    );
    write(
        &dir.join("usr/share/text"),
        &b"a line that compresses well\n".repeat(20_000),
        0o644,
        (1000, 1001),
    );
    write(&dir.join("usr/share/empty"), b"", 0o400, (0, 0));
    write(
        &dir.join("home/user/.profile"),
        b"export PS1='$ '\n",
        0o640,
        (1000, 1000),
    );
    write(&dir.join("a/b/c/d/e/deep"), b"deep", 0o644, (0, 0));
    fs::hard_link(dir.join("usr/share/text"), dir.join("usr/share/text-link")).unwrap();
    symlink("../share/text", dir.join("usr/bin/text")).unwrap();
    symlink("/nonexistent/target", dir.join("dangling")).unwrap();
    nix::unistd::mkfifo(&dir.join("run-fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    nix::sys::stat::mknod(
        &dir.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    fs::set_permissions(dir.join("home/user"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::lchown(dir.join("home/user"), Some(1000), Some(1000)).unwrap();
}

/// The upper layer: a whiteout, a replaced file, new files (one a copy of
/// the base's big file).
fn upper_layer(dir: &Path) {
    write(&dir.join("etc/.wh.gone"), b"", 0o644, (0, 0));
    write(&dir.join("etc/hosts"), b"10.0.0.1 replaced\n", 0o644, (0, 0));
    write(&dir.join("srv/data"), &noise(200_000, 9), 0o600, (33, 33));
    write(
        &dir.join("srv/big-copy"),
        &noise(3 * 1024 * 1024 + 12345, 1),
        0o644,
        (0, 0),
    );
}

/// A tar of `dir` as an image layer: parents before children, a second
/// name of an inode as a hard link entry, owners and modes kept.
fn tar_of(dir: &Path, out: &Path) {
    let mut builder = tar::Builder::new(fs::File::create(out).unwrap());
    builder.follow_symlinks(false);
    let mut seen: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let mut entries: Vec<PathBuf> = fs::read_dir(&current).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let name = path.strip_prefix(dir).unwrap().to_path_buf();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_file() && meta.nlink() > 1 {
                if let Some(first) = seen.get(&(meta.dev(), meta.ino())) {
                    let mut header = tar::Header::new_gnu();
                    header.set_metadata(&meta);
                    header.set_entry_type(tar::EntryType::Link);
                    header.set_size(0);
                    builder.append_link(&mut header, &name, first).unwrap();
                    continue;
                }
                seen.insert((meta.dev(), meta.ino()), name.clone());
            }
            if meta.file_type().is_symlink() {
                // Absolute targets are common in images; the tar crate's
                // path helpers refuse them.
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&meta);
                header.set_size(0);
                header
                    .set_link_name_literal(fs::read_link(&path).unwrap().as_os_str().as_encoded_bytes())
                    .unwrap();
                builder.append_data(&mut header, &name, std::io::empty()).unwrap();
                continue;
            }
            let special = if meta.file_type().is_fifo() {
                Some(tar::EntryType::Fifo)
            } else if meta.file_type().is_char_device() {
                Some(tar::EntryType::Char)
            } else {
                None
            };
            if let Some(kind) = special {
                // The tar crate names special files by their host path.
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&meta);
                header.set_entry_type(kind);
                header.set_size(0);
                let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
                header.set_device_major(major).unwrap();
                header.set_device_minor(minor).unwrap();
                builder.append_data(&mut header, &name, std::io::empty()).unwrap();
                continue;
            }
            builder.append_path_with_name(&path, &name).unwrap();
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    builder.finish().unwrap();
}

/// `upper` applied on `base` with OCI whiteouts, as the image's tree.
fn expected_tree(base: &Path, upper: &Path, out: &Path) {
    let cp = |from: &Path| {
        let status = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", from.display()))
            .arg(out)
            .status()
            .unwrap();
        assert!(status.success(), "cp -a {}", from.display());
    };
    fs::create_dir_all(out).unwrap();
    cp(base);
    cp(upper);
    fs::remove_file(out.join("etc/.wh.gone")).unwrap();
    fs::remove_file(out.join("etc/gone")).unwrap();
}

/// Every entry under `root`: type, mode, owner, size and content, link
/// target, device number, link count.
fn tree_of(root: &Path) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut tree = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let what = if ft.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if ft.is_file() {
                let data = fs::read(&path).unwrap();
                format!(
                    "file {} bytes sha256 {:x} nlink {}",
                    data.len(),
                    sha2::Sha256::digest(&data),
                    meta.nlink()
                )
            } else if ft.is_fifo() {
                "fifo".to_string()
            } else if ft.is_char_device() {
                format!("char {}", meta.rdev())
            } else {
                "other".to_string()
            };
            tree.insert(
                path.strip_prefix(root).unwrap().display().to_string(),
                format!(
                    "{what} mode {:o} owner {}:{}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                ),
            );
        }
    }
    tree
}

fn diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("missing {k}: {v}")),
            Some(w) if w != v => out.push(format!("{k}: expected {v}, mounted {w}")),
            _ => {}
        }
    }
    out.extend(b.keys().filter(|k| !a.contains_key(*k)).map(|k| format!("extra {k}")));
    out
}

/// The two layers as directories and tars, and the tree they make.
struct Layers {
    base: PathBuf,
    expected: BTreeMap<String, String>,
    tars: [PathBuf; 2],
}

fn layers(dir: &Path) -> Layers {
    let base = dir.join("base");
    let upper = dir.join("upper");
    base_layer(&base);
    upper_layer(&upper);
    let expected_dir = dir.join("expected");
    expected_tree(&base, &upper, &expected_dir);
    let tars = [dir.join("base.tar"), dir.join("upper.tar")];
    tar_of(&base, &tars[0]);
    tar_of(&upper, &tars[1]);
    Layers {
        base,
        expected: tree_of(&expected_dir),
        tars,
    }
}

/// An image of `tars` built layer by layer and merged, as a conversion
/// does: blobs in `work/blobs`, the bootstrap returned.
fn build_image(tars: &[&PathBuf], fs_version: u32, compressor: Compressor, work: &Path) -> PathBuf {
    let options = RafsOptions { fs_version, compressor };
    let built: Vec<_> = tars
        .iter()
        .enumerate()
        .map(|(i, tar)| {
            nydus::build_layer(
                tar,
                None,
                &options,
                &work.join(format!("layer-{i}.boot")),
                &work.join("blobs"),
            )
            .unwrap()
        })
        .collect();
    let bootstrap = work.join("image.boot");
    nydus::merge_layers(None, &built, None, &bootstrap).unwrap();
    bootstrap
}

#[test]
fn rafs_v6_images_mount_as_erofs_from_blob_cache_files() {
    require_root_and_erofs();
    let tmp = tempfile::tempdir().unwrap();
    let Layers {
        base,
        expected,
        tars: [base_tar, upper_tar],
    } = layers(tmp.path());

    for compressor in [Compressor::None, Compressor::Lz4Block, Compressor::Zstd] {
        let work = tmp.path().join(format!("{compressor:?}"));
        let blob_dir = work.join("blobs");
        let bootstrap = build_image(&[&base_tar, &upper_tar], 6, compressor, &work);

        let table = read_chunk_table(&bootstrap).unwrap();
        assert_eq!(table.len(), 2, "{compressor:?}: one blob per layer");
        let mut caches = Vec::new();
        let started = std::time::Instant::now();
        for blob in &table {
            let cache = work.join(format!("cache-{}", blob.blob_id));
            build_cache_file(&blob_dir.join(blob.blob_id.as_str()), blob, &cache).unwrap();
            caches.push(cache);
        }
        let built = started.elapsed();

        let target = work.join("mnt");
        fs::create_dir(&target).unwrap();
        let started = std::time::Instant::now();
        RealSystem
            .mount_erofs(&bootstrap, &caches, &target)
            .unwrap_or_else(|e| panic!("{compressor:?}: {e}"));
        let mounted = Mounted(target.clone());
        eprintln!(
            "{compressor:?}: cache files built in {:.1} ms, mounted in {:.1} ms",
            built.as_secs_f64() * 1000.0,
            started.elapsed().as_secs_f64() * 1000.0
        );
        assert!(RealSystem.is_mountpoint(&target).unwrap());
        let differences = diff(&expected, &tree_of(&target));
        assert!(
            differences.is_empty(),
            "{compressor:?}: the mounted RAFS differs from the layers applied:\n{}",
            differences.join("\n")
        );
        assert!(
            fs::write(target.join("new"), b"x").is_err(),
            "{compressor:?}: the mount is read-only"
        );
        drop(mounted);
        assert!(!RealSystem.is_mountpoint(&target).unwrap());

        // The pushed blobs are not the layout the kernel reads: mounting
        // with them as devices must not show the files' content.
        if compressor != Compressor::None {
            let raw: Vec<PathBuf> = table.iter().map(|b| blob_dir.join(b.blob_id.as_str())).collect();
            if RealSystem.mount_erofs(&bootstrap, &raw, &target).is_ok() {
                let _mounted = Mounted(target.clone());
                let big = fs::read(target.join("usr/bin/big"));
                assert!(
                    big.map_or(true, |data| data != fs::read(base.join("usr/bin/big")).unwrap()),
                    "{compressor:?}: compressed blobs read as plain data"
                );
            }
        }
    }
}

#[test]
fn erofs_mount_failures_carry_the_kernels_reason() {
    require_root_and_erofs();
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layer");
    write(&layer.join("file"), &noise(10_000, 3), 0o644, (0, 0));
    let tar = tmp.path().join("layer.tar");
    tar_of(&layer, &tar);
    let options = RafsOptions {
        fs_version: 6,
        compressor: Compressor::Zstd,
    };
    let blob_dir = tmp.path().join("blobs");
    let built = nydus::build_layer(&tar, None, &options, &tmp.path().join("layer.boot"), &blob_dir).unwrap();
    let bootstrap = tmp.path().join("image.boot");
    nydus::merge_layers(None, &[built], None, &bootstrap).unwrap();
    let target = tmp.path().join("mnt");
    fs::create_dir(&target).unwrap();
    // One device in the bootstrap's table, two given.
    let cache = tmp.path().join("cache");
    fs::write(&cache, vec![0; 4096]).unwrap();
    let err = RealSystem
        .mount_erofs(&bootstrap, &[cache.clone(), cache], &target)
        .unwrap_err();
    let _ = RealSystem.unmount(&target);
    assert!(matches!(err, SysError::Mount { fs_type: "erofs", .. }), "{err}");
    assert!(err.to_string().contains(&target.display().to_string()), "{err}");
    eprintln!("kernel's reason: {err}");
    let missing = tmp.path().join("missing-device");
    let err = RealSystem
        .mount_erofs(&bootstrap, std::slice::from_ref(&missing), &target)
        .unwrap_err();
    let _ = RealSystem.unmount(&target);
    assert!(matches!(err, SysError::Mount { .. }), "{err}");
    eprintln!("kernel's reasons: {err}");
}

/// Bytes the files of `dir` take on disk (sparse files count what is written).
fn allocated_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

#[test]
fn rafs_images_are_served_over_fuse_reading_chunks_as_files_are_read() {
    require_root_and_erofs();
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the kernel has no FUSE (modprobe fuse)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let Layers {
        base: _,
        expected,
        tars: [base_tar, upper_tar],
    } = layers(tmp.path());
    let server = InProcessFuse::new();

    for (fs_version, compressor) in [(6, Compressor::Lz4Block), (5, Compressor::Zstd), (5, Compressor::None)] {
        let what = format!("v{fs_version} {compressor:?}");
        let work = tmp.path().join(format!("fuse-{fs_version}-{compressor:?}"));
        let blob_dir = work.join("blobs");
        let bootstrap = build_image(&[&base_tar, &upper_tar], fs_version, compressor, &work);
        let mountpoint = work.join("mnt");
        fs::create_dir(&mountpoint).unwrap();
        let cache_dir = work.join("fuse-cache");
        let spec = FuseSpec {
            bootstrap: bootstrap.clone(),
            backend: BlobBackend::Local { dir: blob_dir.clone() },
            cache_dir: cache_dir.clone(),
            mountpoint: mountpoint.clone(),
        };
        let started = std::time::Instant::now();
        server.serve(&spec).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mounted = Mounted(mountpoint.clone());
        eprintln!("{what}: served in {:.1} ms", started.elapsed().as_secs_f64() * 1000.0);
        assert!(server.serves(&mountpoint));
        assert!(RealSystem.is_mountpoint(&mountpoint).unwrap());

        // A small file read: the 3 MB files' chunks stay unread.
        assert_eq!(fs::read(mountpoint.join("etc/hosts")).unwrap(), b"10.0.0.1 replaced\n");
        let cached = allocated_bytes(&cache_dir);
        assert!(
            cached < 1 << 20,
            "{what}: reading one small file cached {cached} bytes of the blobs"
        );

        let differences = diff(&expected, &tree_of(&mountpoint));
        assert!(
            differences.is_empty(),
            "{what}: the served RAFS differs from the layers applied:\n{}",
            differences.join("\n")
        );
        assert!(
            allocated_bytes(&cache_dir) >= 3 << 20,
            "{what}: the chunks read are kept in the cache"
        );
        assert!(
            fs::write(mountpoint.join("new"), b"x").is_err(),
            "{what}: the mount is read-only"
        );
        assert!(server.stop(&mountpoint).unwrap());
        assert!(!server.serves(&mountpoint));
        assert!(!RealSystem.is_mountpoint(&mountpoint).unwrap(), "{what}: unmounted");
        assert!(!server.stop(&mountpoint).unwrap(), "stopping twice is a no-op");
        drop(mounted);
    }
}

/// Blobs from a directory, named by their id, as a registry would serve them.
#[derive(Debug)]
struct DirSource(PathBuf);

impl BlobSource for DirSource {
    fn fetch(&self, _reference: &str, digest: &str, dest: &Path) -> Result<u64, RegistryError> {
        fs::copy(self.0.join(digest.trim_start_matches("sha256:")), dest)
            .map_err(|source| RegistryError::Io(io_err("blob file", dest)(source)))
    }
}

/// Every entry under `dir` except those under `skip`: its content for a
/// file, its target for a symlink, its mode and size for the rest.
fn entries_outside(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
    let mut entries = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.starts_with(skip) {
                continue;
            }
            let meta = fs::symlink_metadata(&path).unwrap();
            let what = if meta.is_dir() {
                pending.push(path.clone());
                format!("dir {:o}", meta.mode())
            } else if meta.file_type().is_symlink() {
                format!("symlink {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_file() {
                let data = fs::read(&path).unwrap();
                format!(
                    "file {:o} {} bytes {:?}",
                    meta.mode(),
                    data.len(),
                    String::from_utf8_lossy(&data)
                )
            } else {
                format!("other {:o} {}", meta.mode(), meta.len())
            };
            entries.insert(path, what);
        }
    }
    entries
}

#[test]
fn a_bootstrap_naming_a_traversing_blob_id_is_refused_with_nothing_touched_outside() {
    require_root_and_erofs();
    let tmp = tempfile::tempdir().unwrap();
    let Layers {
        base: _,
        expected: _,
        tars: [base_tar, upper_tar],
    } = layers(tmp.path());
    let image = "127.0.0.1:1/evil:1";
    // From `<root>/nydus/{blobs,cache,fuse-cache}/`, three `..` are the
    // directory holding `<root>`: the id names a file beside it, 64 bytes
    // long like a real id, so the bootstrap's layout stays valid.
    let name = "x".repeat(47);
    let evil_id = format!("../../../outside/{name}");
    assert_eq!(evil_id.len(), 64);

    for (driver, compressor) in [
        (FsDriver::Erofs, Compressor::None),
        (FsDriver::Fuse, Compressor::Lz4Block),
    ] {
        let what = format!("{driver:?}");
        let case = tmp.path().join(&what);
        let work = case.join("work");
        let bootstrap = build_image(&[&base_tar, &upper_tar], 6, compressor, &work);
        let ids: Vec<String> = nydus::load_bootstrap(&bootstrap)
            .unwrap()
            .superblock
            .get_blob_infos()
            .iter()
            .map(|b| b.blob_id())
            .collect();
        assert_eq!(ids.len(), 2, "{what}");

        // The first blob's id, in the blob table and the device table,
        // becomes the traversing one.
        let mut bytes = fs::read(&bootstrap).unwrap();
        let mut replaced = 0;
        let mut at = 0;
        while let Some(found) = bytes[at..].windows(64).position(|w| w == ids[0].as_bytes()) {
            let start = at + found;
            bytes[start..start + 64].copy_from_slice(evil_id.as_bytes());
            replaced += 1;
            at = start + 64;
        }
        assert!(replaced >= 1, "{what}: the blob id is in the bootstrap");
        let evil = work.join("evil.boot");
        fs::write(&evil, &bytes).unwrap();
        let loaded: Vec<String> = nydus::load_bootstrap(&evil)
            .unwrap()
            .superblock
            .get_blob_infos()
            .iter()
            .map(|b| b.blob_id())
            .collect();
        assert_eq!(
            loaded[0], evil_id,
            "{what}: the tampered bootstrap loads, naming the traversing id"
        );

        // The file the id names exists, so that only the id's check keeps
        // the daemon from opening, extending or writing it.
        let outside = case.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join(&name), b"sentinel: must stay as it is\n").unwrap();

        let root = case.join("root");
        let mounts = RafsMounts::open(
            &root,
            Arc::new(RealSystem),
            Arc::new(DirSource(work.join("blobs"))),
            driver,
            Arc::new(InProcessFuse::new()),
        )
        .unwrap();
        let origins: Vec<BlobOrigin> = ids
            .iter()
            .map(|id| BlobOrigin {
                reference: image.to_string(),
                digest: format!("sha256:{id}"),
            })
            .collect();
        let before = entries_outside(&case, &root.join("nydus"));
        let _unmount = Mounted(mounts.mountpoint(1));
        let result = mounts.acquire(1, &evil, &origins).map(|lease| lease.mountpoint.clone());
        let after = entries_outside(&case, &root.join("nydus"));
        let touched: Vec<String> = after
            .iter()
            .filter(|(path, what)| before.get(*path) != Some(*what))
            .map(|(path, what)| format!("{}: {}", path.display(), what.chars().take(80).collect::<String>()))
            .collect();
        assert!(
            touched.is_empty() && after.len() == before.len(),
            "{what}: created or changed outside <root>/nydus: {touched:#?}"
        );
        let err = result.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, RafsMountError::InvalidBlobId { .. }), "{what}: {message}");
        assert!(
            message.contains(&evil_id) && message.contains(image) && message.contains("refused"),
            "{what}: the error names the id and the image: {message}"
        );
        assert!(!RealSystem.is_mountpoint(&mounts.mountpoint(1)).unwrap_or(false));

        // The FUSE server refuses it too, whoever calls it.
        if driver == FsDriver::Fuse {
            let mountpoint = case.join("direct");
            fs::create_dir(&mountpoint).unwrap();
            let server = InProcessFuse::new();
            let _unmount = Mounted(mountpoint.clone());
            let before = entries_outside(&case, &root.join("nydus"));
            let err = server
                .serve(&FuseSpec {
                    bootstrap: evil.clone(),
                    backend: BlobBackend::Local {
                        dir: root.join("nydus/blobs"),
                    },
                    cache_dir: root.join("nydus/fuse-cache"),
                    mountpoint: mountpoint.clone(),
                })
                .unwrap_err();
            assert_eq!(
                entries_outside(&case, &root.join("nydus")),
                before,
                "{what}: direct serve"
            );
            assert!(err.to_string().contains(&evil_id), "{what}: {err}");
            assert!(!server.serves(&mountpoint));
        }

        // The same daemon state still mounts the genuine image.
        let _unmount = Mounted(mounts.mountpoint(2));
        let lease = mounts.acquire(2, &bootstrap, &origins).unwrap();
        assert_eq!(
            fs::read(lease.mountpoint.join("etc/hosts")).unwrap(),
            b"10.0.0.1 replaced\n",
            "{what}"
        );
        lease.bind(20);
        mounts.release(20).unwrap();
        assert!(
            !RealSystem.is_mountpoint(&mounts.mountpoint(2)).unwrap_or(false),
            "{what}"
        );
    }
}

/// Reads every file under `root` again and again until `stop`, each read
/// going to the FUSE server (the page cache of the file is dropped after
/// it), and compares the tree with `expected`, counting `rounds`. Returns
/// the failures.
fn read_continuously(
    root: PathBuf,
    expected: BTreeMap<String, String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    counted: Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let (mut rounds, mut failures) = (0, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let round = std::panic::catch_unwind(|| {
                let tree = tree_of(&root);
                drop_page_cache(&root);
                tree
            });
            match round {
                Ok(tree) => {
                    let differences = diff(&expected, &tree);
                    if !differences.is_empty() {
                        failures.push(format!("round {rounds}: {}", differences.join("; ")));
                    }
                }
                Err(_) => failures.push(format!("round {rounds}: a read failed (see the panic above)")),
            }
            rounds += 1;
            counted.store(rounds, std::sync::atomic::Ordering::Relaxed);
        }
        failures
    })
}

/// Drops the page cache of every file under `dir`, so the next read asks
/// the filesystem.
fn drop_page_cache(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            drop_page_cache(&path);
        } else if meta.is_file() {
            let file = fs::File::open(&path).unwrap();
            nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .unwrap();
        }
    }
}

/// Waits up to 60 s for `condition`.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn serving_processes_survive_a_kill_a_new_supervisor_and_an_upgrade_while_files_are_read() {
    use seamless_snapshotter::nydus::serving::supervisor::ProcessFuse;
    require_root_and_erofs();
    let tmp = tempfile::tempdir().unwrap();
    let Layers {
        base: _,
        expected,
        tars: [base_tar, upper_tar],
    } = layers(tmp.path());
    let work = tmp.path().join("image");
    let bootstrap = build_image(&[&base_tar, &upper_tar], 6, Compressor::Zstd, &work);
    let nydus_dir = tmp.path().join("root/nydus");
    let mountpoint = nydus_dir.join("mnt/1");
    fs::create_dir_all(&mountpoint).unwrap();
    let spec = FuseSpec {
        bootstrap,
        backend: BlobBackend::Local {
            dir: work.join("blobs"),
        },
        cache_dir: nydus_dir.join("fuse-cache"),
        mountpoint: mountpoint.clone(),
    };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_containerd-seamless-grpc"));
    let sys = Arc::new(RealSystem);
    let _unmount = Mounted(mountpoint.clone());

    let first = ProcessFuse::open(&exe, &nydus_dir, sys.clone()).unwrap();
    first.serve(&spec).unwrap();
    assert!(first.serves(&mountpoint));
    let pid = first.served()[0].pid;
    assert_eq!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32)))
            .unwrap()
            .as_raw(),
        pid as i32,
        "a serving process leads a session of its own"
    );
    assert!(nydus_dir.join(format!("servers/{pid}.sock")).exists());
    assert_eq!(diff(&expected, &tree_of(&mountpoint)), Vec::<String>::new());
    // A file kept open across every change below.
    let mut held = fs::File::open(mountpoint.join("etc/hosts")).unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = read_continuously(mountpoint.clone(), expected.clone(), stop.clone(), rounds.clone());
    // Each step below happens while a round reads, and the next round must
    // read the whole tree right.
    let read_on = |what: &str| {
        let at = rounds.load(std::sync::atomic::Ordering::Relaxed);
        wait_until(&format!("two more full reads after {what}"), || {
            rounds.load(std::sync::atomic::Ordering::Relaxed) >= at + 2
        });
    };
    let read_held = |held: &mut fs::File| {
        use std::io::{Read, Seek};
        held.rewind().unwrap();
        let mut text = String::new();
        held.read_to_string(&mut text).unwrap();
        assert_eq!(text, "10.0.0.1 replaced\n");
    };
    read_on("the start");

    // kill -9 of the serving process: another takes the connection.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL).unwrap();
    wait_until("a serving process in place of the killed one", || {
        first.served().first().is_some_and(|s| s.pid != pid && s.restarts == 1)
    });
    let restarted = first.served()[0].pid;
    read_held(&mut held);
    read_on("the kill");

    // The daemon goes (its supervisor lets go) and a new one finds the
    // serving process and takes a copy of its connection.
    first.abandon();
    drop(first);
    let second = ProcessFuse::open(&exe, &nydus_dir, sys.clone()).unwrap();
    assert_eq!(second.served().len(), 1);
    assert_eq!(second.served()[0].pid, restarted, "the same process, adopted");
    assert!(second.serves(&mountpoint));
    read_held(&mut held);
    read_on("the new supervisor");

    // An upgrade: the daemon's binary at another path replaces the process.
    second.abandon();
    drop(second);
    let upgraded_exe = tmp.path().join("containerd-seamless-grpc.new");
    fs::copy(&exe, &upgraded_exe).unwrap();
    let third = ProcessFuse::open(&upgraded_exe, &nydus_dir, sys.clone()).unwrap();
    let successor = third.served()[0].pid;
    assert_ne!(successor, restarted, "replaced by a process of the new binary");
    assert_eq!(
        fs::read_link(format!("/proc/{successor}/exe")).unwrap(),
        upgraded_exe,
        "the successor runs the new binary"
    );
    wait_until("the predecessor to exit", || {
        !Path::new(&format!("/proc/{restarted}")).exists()
    });
    read_held(&mut held);
    read_on("the upgrade");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failures = reader.join().unwrap();
    assert!(failures.is_empty(), "reads failed or differed: {failures:#?}");
    eprintln!(
        "serving processes: {} full reads of the tree, no failure",
        rounds.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(held);

    // The last user goes: unmounted, and the process ends.
    assert!(third.stop(&mountpoint).unwrap());
    assert!(!RealSystem.is_mountpoint(&mountpoint).unwrap());
    wait_until("the serving process to exit", || {
        !Path::new(&format!("/proc/{successor}")).exists()
    });
    wait_until("its control socket to go", || {
        fs::read_dir(nydus_dir.join("servers")).unwrap().count() == 0
    });
}

#[test]
fn a_serving_process_no_snapshot_uses_is_stopped_by_the_next_daemon() {
    use seamless_snapshotter::nydus::serving::supervisor::ProcessFuse;
    require_root_and_erofs();
    let tmp = tempfile::tempdir().unwrap();
    let Layers {
        base: _,
        expected: _,
        tars: [base_tar, upper_tar],
    } = layers(tmp.path());
    let work = tmp.path().join("image");
    let bootstrap = build_image(&[&base_tar, &upper_tar], 6, Compressor::Lz4Block, &work);
    let origins: Vec<BlobOrigin> = nydus::load_bootstrap(&bootstrap)
        .unwrap()
        .superblock
        .get_blob_infos()
        .iter()
        .map(|b| BlobOrigin {
            reference: "127.0.0.1:1/app:1".to_string(),
            digest: format!("sha256:{}", b.blob_id()),
        })
        .collect();
    let root = tmp.path().join("root");
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_containerd-seamless-grpc"));
    let sys = Arc::new(RealSystem);
    let open = |fuse: &ProcessFuse| {
        RafsMounts::open(
            &root,
            sys.clone(),
            Arc::new(DirSource(work.join("blobs"))),
            FsDriver::Fuse,
            Arc::new(fuse.clone()),
        )
        .unwrap()
    };

    let first = ProcessFuse::open(&exe, &root.join("nydus"), sys.clone()).unwrap();
    let mounts = open(&first);
    let _unmount = Mounted(mounts.mountpoint(1));
    let lease = mounts.acquire(1, &bootstrap, &origins).unwrap();
    assert_eq!(
        fs::read(lease.mountpoint.join("etc/hosts")).unwrap(),
        b"10.0.0.1 replaced\n"
    );
    lease.bind(10);
    let status = mounts.status().unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].users, vec![10]);
    let pid = status[0].server.expect("served by a process").pid;
    assert!(mounts.cache_bytes(&bootstrap).unwrap() > 0, "the blobs fetched count");

    // The daemon dies; while it is down its snapshot goes (nothing uses the
    // mount now). The next daemon takes the process over, finds no user,
    // and stops it.
    first.abandon();
    drop(mounts);
    let second = ProcessFuse::open(&exe, &root.join("nydus"), sys.clone()).unwrap();
    assert_eq!(second.served()[0].pid, pid, "taken over");
    let mounts = open(&second);
    let (unmounted, _) = mounts.sweep(&std::collections::BTreeSet::new()).unwrap();
    assert_eq!(unmounted, 1);
    assert!(!RealSystem.is_mountpoint(&mounts.mountpoint(1)).unwrap_or(false));
    wait_until("the serving process to exit", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(second.served().is_empty());
    assert!(mounts.status().unwrap().is_empty(), "its mount point went too");
}
