//! Paths: where an archive may be written or read on the daemon's host
//! (absolute, plain, never clobbering what is not an archive), and member
//! paths of layers as tree paths that cannot leave the root.

use std::fs;
use std::io;
use std::path::Path;

use super::ArchiveError;
use crate::error::io_err;

/// Refuses what an archive may not be written to: a relative path, `.` or
/// `..` components, a missing parent directory, and anything already at
/// the path unless `overwrite`, and then only a regular file (replaced
/// atomically: readers see the old archive or the new one).
pub fn validate_target(path: &Path, overwrite: bool) -> Result<(), ArchiveError> {
    let refuse = |reason: &str| ArchiveError::Path {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    check_absolute_plain(path).map_err(|r| refuse(&r))?;
    let parent = path.parent().ok_or_else(|| refuse("has no parent directory"))?;
    match fs::metadata(parent) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(refuse("its parent is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(refuse("its parent directory does not exist")),
        Err(e) => return Err(io_err("stat", parent)(e).into()),
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e).into()),
        Ok(_) if !overwrite => Err(ArchiveError::Exists {
            path: path.display().to_string(),
        }),
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(_) => Err(refuse("is not a regular file; only a regular file is replaced")),
    }
}

/// Refuses an archive to read that is not an absolute path of plain
/// components naming a regular file (a symlink to one is fine).
pub fn validate_source(path: &Path) -> Result<(), ArchiveError> {
    let refuse = |reason: String| ArchiveError::Path {
        path: path.display().to_string(),
        reason,
    };
    check_absolute_plain(path).map_err(refuse)?;
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(refuse("is not a regular file".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(refuse("does not exist".into())),
        Err(e) => Err(io_err("stat", path)(e).into()),
    }
}

fn check_absolute_plain(path: &Path) -> Result<(), String> {
    let text = path.to_str().ok_or("is not UTF-8")?;
    if !text.starts_with('/') {
        return Err("must be absolute (checkpointctl resolves relative paths)".into());
    }
    if text.ends_with('/') {
        return Err("names a directory, not a file".into());
    }
    if text.split('/').any(|part| part == "." || part == "..") {
        return Err("must not have . or .. components".into());
    }
    Ok(())
}

/// A member path of a layer as a tree path: relative, without `.` and
/// empty components, never leaving the root.
pub(super) fn tree_path(raw: &str) -> Result<String, String> {
    if raw.starts_with('/') {
        return Err(format!("member {raw:?} has an absolute path"));
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("member {raw:?} has a .. component")),
            other => parts.push(other),
        }
    }
    Ok(parts.join("/"))
}

pub(super) fn split_parent(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

pub(super) fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::checkpoint::archive::{export, import};
    use std::fs;

    #[test]
    fn archive_paths_are_checked_and_never_clobbered() {
        let w = world();
        let chain = chain_of_three(&w);
        let tip = &chain[2];
        for bad in ["relative.tar", "/tmp/../etc/x.tar", "/tmp/./x.tar", "/tmp/dir/"] {
            let err = export(&w.catalogue, tip, Path::new(bad), false).unwrap_err();
            assert!(matches!(err, ArchiveError::Path { .. }), "{bad}: {err}");
        }
        let missing_parent = w.root.join("no/such/dir/x.tar");
        assert!(matches!(
            export(&w.catalogue, tip, &missing_parent, false),
            Err(ArchiveError::Path { .. })
        ));
        let target = w.root.join("x.tar");
        fs::write(&target, b"precious").unwrap();
        let err = export(&w.catalogue, tip, &target, false).unwrap_err();
        assert!(matches!(err, ArchiveError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        // Replaced when asked: a regular file only.
        export(&w.catalogue, tip, &target, true).unwrap();
        assert_ne!(fs::read(&target).unwrap(), b"precious");
        let dir = w.root.join("a-dir");
        fs::create_dir(&dir).unwrap();
        assert!(matches!(
            export(&w.catalogue, tip, &dir, true),
            Err(ArchiveError::Path { .. })
        ));
        let link = w.root.join("link.tar");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            export(&w.catalogue, tip, &link, true),
            Err(ArchiveError::Path { .. })
        ));
        // And the same rules on the other side.
        assert!(matches!(
            import(&w.catalogue, Path::new("x.tar"), "ns"),
            Err(ArchiveError::Path { .. })
        ));
        assert!(matches!(
            import(&w.catalogue, &dir, "ns"),
            Err(ArchiveError::Path { .. })
        ));
        assert!(matches!(
            import(&w.catalogue, &w.root.join("absent.tar"), "ns"),
            Err(ArchiveError::Path { .. })
        ));
    }
}
