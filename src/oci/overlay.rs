//! overlayfs's conventions in an upper directory and their OCI spellings:
//! whiteout files and opaque markers in a layer tar, and the extended
//! attributes overlayfs keeps for itself (`trusted.overlay.*`, or
//! `user.overlay.*` when mounted with `userxattr`). Everything that reads or
//! writes an upper directory as layers or trees names them from here.

use std::ffi::OsString;
use std::path::Path;

use crate::error::{io_err, IoError};

/// Prefix of an OCI whiteout file's name.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the OCI marker that makes its directory opaque.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr namespaces overlayfs keeps for itself.
pub const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];
/// The xattr that marks a directory of an upper directory opaque, as
/// overlayfs mounted by this daemon (without `userxattr`) reads it.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Whether `name` is one of overlayfs's own xattrs.
pub fn is_overlay_xattr(name: &str) -> bool {
    OVERLAY_XATTR_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// The overlayfs key of xattr `name` (`opaque` of `trusted.overlay.opaque`),
/// if it is one of overlayfs's own.
pub fn overlay_key(name: &str) -> Option<&str> {
    OVERLAY_XATTR_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
}

/// The extended attributes of `path` itself (a symbolic link's own), sorted
/// by name; none on a filesystem without xattrs.
pub fn read_xattrs(path: &Path) -> Result<Vec<(OsString, Vec<u8>)>, IoError> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list extended attributes of", path)(e)),
    };
    let mut xattrs = Vec::new();
    for name in names {
        if let Some(value) = xattr::get(path, &name).map_err(io_err("read extended attribute of", path))? {
            xattrs.push((name, value));
        }
    }
    xattrs.sort();
    Ok(xattrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_xattrs_are_named_in_both_namespaces() {
        assert_eq!(overlay_key("trusted.overlay.opaque"), Some("opaque"));
        assert_eq!(overlay_key("user.overlay.redirect"), Some("redirect"));
        assert_eq!(overlay_key("user.origin"), None);
        assert!(is_overlay_xattr(OPAQUE_XATTR));
        assert!(!is_overlay_xattr("security.capability"));
    }

    #[test]
    fn xattrs_are_read_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        xattr::set(&file, "user.b", b"2").unwrap();
        xattr::set(&file, "user.a", b"1").unwrap();
        let xattrs = read_xattrs(&file).unwrap();
        assert_eq!(
            xattrs,
            vec![("user.a".into(), b"1".to_vec()), ("user.b".into(), b"2".to_vec())]
        );
    }
}
