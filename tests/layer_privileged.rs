//! Privileged checks of layer building against the real overlayfs: an overlay
//! is mounted over a lower directory, changed through its merged view
//! (deletions, a recreated directory, renamed directories, a device, a fifo,
//! attributes, ownership), and the layer built from its upper must, applied
//! with OCI whiteout semantics on top of the lower, give back the merged view.
//! Root only: the tests fail (never skip) without it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use seamless_snapshotter::oci::layer::{build_layer, BuildContext, Compression, LayerBlob, PathFilter};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (overlay mounts, device nodes, trusted.* attributes): run them as root, as .ci/test does"
    );
}

/// An overlay mounted over `lower` with its own upper, work and merged
/// directories; unmounted when dropped, pass or fail.
struct Overlay {
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
    mounted: bool,
}

impl Overlay {
    fn new(base: &Path) -> Overlay {
        let overlay = Overlay {
            lower: base.join("lower"),
            upper: base.join("upper"),
            work: base.join("work"),
            merged: base.join("merged"),
            mounted: false,
        };
        for dir in [&overlay.lower, &overlay.upper, &overlay.work, &overlay.merged] {
            fs::create_dir_all(dir).unwrap();
        }
        overlay
    }

    fn mount(&mut self) {
        let options = format!(
            "lowerdir={},upperdir={},workdir={},index=off,redirect_dir=on",
            self.lower.display(),
            self.upper.display(),
            self.work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &self.merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting overlay with {options}: {e}"));
        self.mounted = true;
    }

    fn unmount(&mut self) {
        nix::mount::umount2(&self.merged, MntFlags::empty()).unwrap();
        self.mounted = false;
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.merged, MntFlags::MNT_DETACH);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    Char(u64),
    Block(u64),
    Fifo,
}

/// What applying a layer must reproduce of one entry (mtimes aside: a
/// directory's changes with every entry written into it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recorded {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn is_overlay_xattr(name: &str) -> bool {
    name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.")
}

/// Every entry under `root`, symbolic links not followed.
fn record(root: &Path) -> BTreeMap<PathBuf, Recorded> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Recorded>) {
        let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let meta = fs::symlink_metadata(&path).unwrap();
            let file_type = meta.file_type();
            let kind = if file_type.is_dir() {
                Kind::Dir
            } else if file_type.is_file() {
                Kind::File(fs::read(&path).unwrap())
            } else if file_type.is_symlink() {
                Kind::Symlink(fs::read_link(&path).unwrap())
            } else if file_type.is_char_device() {
                Kind::Char(meta.rdev())
            } else if file_type.is_block_device() {
                Kind::Block(meta.rdev())
            } else if file_type.is_fifo() {
                Kind::Fifo
            } else {
                panic!("unexpected entry {}", path.display());
            };
            let mut xattrs = BTreeMap::new();
            for attr in xattr::list(&path).unwrap() {
                let attr = attr.into_string().unwrap();
                if !is_overlay_xattr(&attr) {
                    xattrs.insert(attr.clone(), xattr::get(&path, &attr).unwrap().unwrap_or_default());
                }
            }
            let mode = if file_type.is_symlink() {
                0
            } else {
                meta.mode() & 0o7777
            };
            out.insert(
                path.strip_prefix(root).unwrap().to_owned(),
                Recorded {
                    kind,
                    mode,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    xattrs,
                },
            );
            if file_type.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

/// One entry of a layer tar, read fully.
struct LayerEntry {
    path: PathBuf,
    header: tar::Header,
    link: Option<PathBuf>,
    data: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn read_layer(blob: &LayerBlob, out: &Path) -> Vec<LayerEntry> {
    let bytes = fs::read(out).unwrap();
    let tar_bytes = match blob.media_type {
        "application/vnd.oci.image.layer.v1.tar+gzip" => {
            let mut tar_bytes = Vec::new();
            flate2::read::GzDecoder::new(bytes.as_slice())
                .read_to_end(&mut tar_bytes)
                .unwrap();
            tar_bytes
        }
        "application/vnd.oci.image.layer.v1.tar+zstd" => zstd::decode_all(bytes.as_slice()).unwrap(),
        _ => bytes,
    };
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut entries = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().unwrap() {
            for record in pax {
                let record = record.unwrap();
                let name = record.key().unwrap().strip_prefix("SCHILY.xattr.").unwrap().to_owned();
                xattrs.push((name, record.value_bytes().to_vec()));
            }
        }
        let path = entry.path().unwrap().into_owned();
        let link = entry.link_name().unwrap().map(|l| l.into_owned());
        let header = entry.header().clone();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        entries.push(LayerEntry {
            path,
            header,
            link,
            data,
            xattrs,
        });
    }
    entries
}

fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).unwrap(),
        Ok(_) => fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// Applies a layer on `root` as the OCI image spec describes: whiteouts and
/// opaque markers remove what the layers below hold, then every other entry
/// is written, replacing an existing entry unless both are directories.
fn apply_layer(root: &Path, entries: &[LayerEntry]) {
    for entry in entries {
        let name = entry.path.file_name().unwrap().to_str().unwrap();
        let dir = root.join(entry.path.parent().unwrap());
        if name == ".wh..wh..opq" {
            if dir.is_dir() {
                for child in fs::read_dir(&dir).unwrap() {
                    remove_any(&child.unwrap().path());
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            remove_any(&dir.join(hidden));
        }
    }
    for entry in entries {
        let name = entry.path.file_name().unwrap().to_str().unwrap();
        if name.starts_with(".wh.") {
            continue;
        }
        let target = root.join(&entry.path);
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        let kind = entry.header.entry_type();
        let existing = fs::symlink_metadata(&target).ok();
        if !(kind.is_dir() && existing.as_ref().is_some_and(|m| m.is_dir())) {
            remove_any(&target);
        }
        let mode = entry.header.mode().unwrap();
        let device = || {
            makedev(
                u64::from(entry.header.device_major().unwrap().unwrap()),
                u64::from(entry.header.device_minor().unwrap().unwrap()),
            )
        };
        match kind {
            tar::EntryType::Directory => {
                if existing.is_none_or(|m| !m.is_dir()) {
                    fs::create_dir(&target).unwrap();
                }
            }
            tar::EntryType::Regular => fs::write(&target, &entry.data).unwrap(),
            tar::EntryType::Link => {
                fs::hard_link(root.join(entry.link.as_ref().unwrap()), &target).unwrap();
                continue;
            }
            tar::EntryType::Symlink => std::os::unix::fs::symlink(entry.link.as_ref().unwrap(), &target).unwrap(),
            tar::EntryType::Char => mknod(&target, SFlag::S_IFCHR, Mode::from_bits_truncate(mode), device()).unwrap(),
            tar::EntryType::Block => mknod(&target, SFlag::S_IFBLK, Mode::from_bits_truncate(mode), device()).unwrap(),
            tar::EntryType::Fifo => nix::unistd::mkfifo(&target, Mode::from_bits_truncate(mode)).unwrap(),
            other => panic!("unexpected entry type {other:?} for {}", entry.path.display()),
        }
        let uid = u32::try_from(entry.header.uid().unwrap()).unwrap();
        let gid = u32::try_from(entry.header.gid().unwrap()).unwrap();
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).unwrap();
        if kind != tar::EntryType::Symlink {
            fs::set_permissions(&target, fs::Permissions::from_mode(mode)).unwrap();
        }
        for (name, value) in &entry.xattrs {
            xattr::set(&target, name, value).unwrap();
        }
    }
}

fn assert_same_tree(expected: &BTreeMap<PathBuf, Recorded>, actual: &BTreeMap<PathBuf, Recorded>) {
    let missing: Vec<_> = expected.keys().filter(|p| !actual.contains_key(*p)).collect();
    let extra: Vec<_> = actual.keys().filter(|p| !expected.contains_key(*p)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?}"
    );
    for (path, want) in expected {
        assert_eq!(&actual[path], want, "{}", path.display());
    }
}

fn assert_no_overlay_xattrs(entries: &[LayerEntry]) {
    for entry in entries {
        for (name, _) in &entry.xattrs {
            assert!(!is_overlay_xattr(name), "{name} on {}", entry.path.display());
        }
    }
}

fn layer_paths(entries: &[LayerEntry]) -> Vec<String> {
    entries.iter().map(|e| e.path.display().to_string()).collect()
}

fn populate_lower(lower: &Path) {
    fs::create_dir_all(lower.join("etc")).unwrap();
    fs::write(lower.join("etc/passwd"), b"root:x:0:0\n").unwrap();
    fs::write(lower.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    fs::create_dir_all(lower.join("del")).unwrap();
    fs::write(lower.join("del/file"), b"deleted").unwrap();
    fs::write(lower.join("del/keep"), b"kept").unwrap();
    fs::create_dir_all(lower.join("gone/sub")).unwrap();
    fs::write(lower.join("gone/a"), b"a").unwrap();
    fs::write(lower.join("gone/sub/b"), b"b").unwrap();
    fs::create_dir_all(lower.join("olddir/sub")).unwrap();
    fs::write(lower.join("olddir/x"), b"x").unwrap();
    fs::write(lower.join("olddir/sub/y"), b"y").unwrap();
    fs::set_permissions(lower.join("olddir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::create_dir_all(lower.join("moveme")).unwrap();
    fs::write(lower.join("moveme/z"), b"z").unwrap();
    std::os::unix::fs::symlink("etc/passwd", lower.join("link")).unwrap();
    fs::write(lower.join("owned"), b"owned").unwrap();
}

fn overlay_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(path, format!("trusted.overlay.{name}")).unwrap()
}

/// The first round of changes through the merged view; checks the upper
/// holds what each change is meant to exercise.
fn change_merged(overlay: &Overlay) {
    let m = &overlay.merged;
    fs::remove_file(m.join("del/file")).unwrap();
    fs::remove_dir_all(m.join("gone")).unwrap();
    fs::create_dir(m.join("gone")).unwrap();
    fs::write(m.join("gone/new"), b"new").unwrap();
    fs::rename(m.join("olddir"), m.join("newdir")).unwrap();
    fs::write(m.join("newdir/added"), b"added").unwrap();
    fs::rename(m.join("moveme"), m.join("etc/moved")).unwrap();
    mknod(
        &m.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    nix::unistd::mkfifo(&m.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
    xattr::set(m.join("etc/hosts"), "trusted.foo", b"trusted-value").unwrap();
    xattr::set(m.join("etc/passwd"), "user.bar", b"user-value").unwrap();
    fs::set_permissions(m.join("etc/passwd"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(m.join("owned"), Some(1234), Some(5678)).unwrap();
    fs::write(m.join("newfile"), b"linked").unwrap();
    fs::hard_link(m.join("newfile"), m.join("newlink")).unwrap();

    let u = &overlay.upper;
    let whiteout = fs::symlink_metadata(u.join("del/file")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    assert_eq!(overlay_xattr(&u.join("gone"), "opaque").as_deref(), Some(&b"y"[..]));
    assert_eq!(
        overlay_xattr(&u.join("newdir"), "redirect").as_deref(),
        Some(&b"olddir"[..])
    );
    assert_eq!(
        overlay_xattr(&u.join("etc/moved"), "redirect").as_deref(),
        Some(&b"/moveme"[..])
    );
}

fn build(ctx: &BuildContext<'_>, out: &Path) -> (LayerBlob, Vec<LayerEntry>) {
    let blob = build_layer(ctx, out).unwrap();
    let entries = read_layer(&blob, out);
    assert_eq!(blob.entries, entries.len() as u64);
    assert_no_overlay_xattrs(&entries);
    (blob, entries)
}

#[test]
fn overlay_upper_applied_as_layer_gives_back_the_merged_view() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let mut overlay = Overlay::new(tmp.path());
    populate_lower(&overlay.lower);
    overlay.mount();
    change_merged(&overlay);
    let merged = record(&overlay.merged);
    overlay.unmount();

    let lowers = [overlay.lower.clone()];
    let filter = PathFilter::default();
    let ctx = BuildContext {
        upper: &overlay.upper,
        previous: None,
        lowers: &lowers,
        compression: Compression::Gzip,
        filter: &filter,
    };
    let out = tmp.path().join("layer.tar.gz");
    let (_, entries) = build(&ctx, &out);
    let paths = layer_paths(&entries);
    for expected in [
        "del/.wh.file",
        "gone/.wh..wh..opq",
        "newdir/.wh..wh..opq",
        "newdir/sub/y",
        ".wh.olddir",
        "etc/moved/.wh..wh..opq",
        "etc/moved/z",
        ".wh.moveme",
    ] {
        assert!(paths.iter().any(|p| p == expected), "{expected} not in {paths:?}");
    }
    let hosts = entries.iter().find(|e| e.path == Path::new("etc/hosts")).unwrap();
    assert_eq!(hosts.xattrs, [("trusted.foo".to_owned(), b"trusted-value".to_vec())]);

    let applied = tmp.path().join("applied");
    copy_tree(&overlay.lower, &applied);
    apply_layer(&applied, &entries);
    assert_same_tree(&merged, &record(&applied));
    let (a, b) = (
        fs::metadata(applied.join("newfile")).unwrap(),
        fs::metadata(applied.join("newlink")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "hard links stay linked");
}

#[test]
fn incremental_layer_over_the_first_gives_back_the_later_merged_view() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let mut overlay = Overlay::new(tmp.path());
    populate_lower(&overlay.lower);
    overlay.mount();
    change_merged(&overlay);
    overlay.unmount();

    let lowers = [overlay.lower.clone()];
    let upper = overlay.upper.clone();
    let filter = PathFilter::default();
    let first_out = tmp.path().join("first.tar");
    let first_ctx = BuildContext {
        upper: &upper,
        previous: None,
        lowers: &lowers,
        compression: Compression::None,
        filter: &filter,
    };
    let (_, first) = build(&first_ctx, &first_out);
    // The earlier capture, as the daemon's read-only snapshot would keep it.
    let previous = tmp.path().join("previous");
    copy_tree(&overlay.upper, &previous);

    overlay.mount();
    let m = &overlay.merged;
    fs::remove_file(m.join("etc/hosts")).unwrap();
    fs::write(m.join("newdir/x"), b"x, rewritten").unwrap();
    fs::remove_file(m.join("newfile")).unwrap();
    fs::create_dir(m.join("del/file")).unwrap();
    fs::write(m.join("del/file/inside"), b"inside").unwrap();
    fs::remove_dir_all(m.join("gone")).unwrap();
    fs::write(m.join("owned"), b"owned, rewritten").unwrap();
    fs::create_dir_all(m.join("fresh/with")).unwrap();
    fs::write(m.join("fresh/with/file"), b"fresh").unwrap();
    let merged = record(m);
    overlay.unmount();

    let second_out = tmp.path().join("second.tar.zst");
    let second_ctx = BuildContext {
        previous: Some(&previous),
        compression: Compression::Zstd,
        ..first_ctx
    };
    let (_, second) = build(&second_ctx, &second_out);
    let paths = layer_paths(&second);
    for expected in [
        "etc/.wh.hosts",
        "newdir/.wh..wh..opq",
        "newdir/x",
        ".wh.newfile",
        "del/file/.wh..wh..opq",
        "del/file/inside",
        ".wh.gone",
        "owned",
        "fresh/with/file",
        // Its link count dropped with `newfile`.
        "newlink",
    ] {
        assert!(paths.iter().any(|p| p == expected), "{expected} not in {paths:?}");
    }
    for unchanged in ["etc/passwd", "null", "fifo", "etc/moved/z"] {
        assert!(!paths.iter().any(|p| p == unchanged), "{unchanged} in {paths:?}");
    }

    let applied = tmp.path().join("applied");
    copy_tree(&overlay.lower, &applied);
    apply_layer(&applied, &first);
    apply_layer(&applied, &second);
    assert_same_tree(&merged, &record(&applied));
}
