//! Files that hold secrets (node keys, tokens, passwords, TLS keys): a
//! regular file that only its owner may read. The one check every such file
//! the daemon or checkpointctl reads goes through, so the rule and its
//! message are the same everywhere.

use std::fs::{File, Metadata};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Why a file that holds secrets is refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("is not a regular file")]
    NotAFile,
    #[error("may be read by other users (mode {mode:04o}); make it 0600")]
    Exposed { mode: u32 },
}

/// Refuses metadata of anything but a regular file without group or other
/// permission bits.
pub fn check(meta: &Metadata) -> Result<(), PrivateFileError> {
    if !meta.is_file() {
        return Err(PrivateFileError::NotAFile);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Exposed { mode });
    }
    Ok(())
}

/// Opens `path` for reading if it is private. The opened file is what is
/// checked, so a file swapped in after the check is never read.
pub fn open(path: &Path) -> Result<(File, Metadata), PrivateFileError> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    check(&meta)?;
    Ok((file, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_of_mode_0600_or_less_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s").unwrap();
        for (mode, private) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o644, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            match open(&path) {
                Ok(_) => assert!(private, "{mode:o}"),
                Err(e) => {
                    assert!(!private, "{mode:o}");
                    assert_eq!(
                        e.to_string(),
                        format!("may be read by other users (mode {mode:04o}); make it 0600")
                    );
                }
            }
        }
        assert!(matches!(open(dir.path()), Err(PrivateFileError::NotAFile)));
        assert!(matches!(
            open(&dir.path().join("missing")),
            Err(PrivateFileError::Io(_))
        ));
    }
}
