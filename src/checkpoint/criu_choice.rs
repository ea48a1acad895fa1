//! A caller's choice of CRIU binary (`checkpointctl --criu-path`, or
//! `criu_path` in its config): the daemon runs CRIU as root, so a path a
//! client names is run only if the daemon's own config lists it in
//! `[criu] allowed_paths` and the file is one only root can change: a
//! regular executable file owned by root, neither group- nor
//! other-writable, in directories owned by root that neither group nor
//! others may write (a sticky directory such as /tmp is fine: there only
//! the owner may replace a file). Checked at every request, so a binary
//! that became writable since it was listed is refused. Owns that rule and
//! nothing else: which binary runs without a choice is `CriuSettings`'.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Classify, ErrorKind};

/// The daemon's config key that lists the binaries callers may name.
pub const ALLOWED_PATHS_KEY: &str = "criu.allowed_paths";

#[derive(Debug, thiserror::Error)]
pub enum CriuChoiceError {
    #[error("criu path {path:?} must be an absolute path without '..'")]
    NotAbsolute { path: String },
    #[error(
        "criu binary {path} is refused: the daemon runs only the criu binaries its config lists in \
         [criu] allowed_paths ({ALLOWED_PATHS_KEY}), and {listed}"
    )]
    NotAllowed { path: String, listed: String },
    #[error("criu binary {path} is refused although {ALLOWED_PATHS_KEY} lists it: {reason}")]
    Untrusted { path: String, reason: String },
}

impl Classify for CriuChoiceError {
    fn kind(&self) -> ErrorKind {
        match self {
            CriuChoiceError::NotAbsolute { .. } => ErrorKind::InvalidArgument,
            CriuChoiceError::NotAllowed { .. } | CriuChoiceError::Untrusted { .. } => ErrorKind::FailedPrecondition,
        }
    }
}

/// The binary to run for a caller who named `requested`: its real path,
/// once `allowed` lists it and only root can change it.
pub fn caller_criu(allowed: &[PathBuf], requested: &str) -> Result<PathBuf, CriuChoiceError> {
    choose(allowed, requested, &[0])
}

fn choose(allowed: &[PathBuf], requested: &str, owners: &[u32]) -> Result<PathBuf, CriuChoiceError> {
    let path = Path::new(requested);
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(CriuChoiceError::NotAbsolute {
            path: requested.to_string(),
        });
    }
    if !allowed.iter().any(|a| a == path) {
        let listed = if allowed.is_empty() {
            "it lists none".to_string()
        } else {
            format!("this is not one of the {} it lists", allowed.len())
        };
        return Err(CriuChoiceError::NotAllowed {
            path: requested.to_string(),
            listed,
        });
    }
    check_owned_by(path, owners).map_err(|reason| CriuChoiceError::Untrusted {
        path: requested.to_string(),
        reason,
    })
}

/// Resolves `path` and checks that only `owners` can change what it runs:
/// the file and every directory above it. Returns the real path, which is
/// what runs (a symlink swapped later changes nothing).
fn check_owned_by(path: &Path, owners: &[u32]) -> Result<PathBuf, String> {
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", real.display()));
    }
    if meta.mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", real.display()));
    }
    let trusted = |uid: u32| owners.contains(&uid);
    let loose = |what: &Path, meta: &std::fs::Metadata, is_dir: bool| -> Option<String> {
        let mode = meta.mode();
        if !trusted(meta.uid()) {
            return Some(format!(
                "{} is owned by uid {}, not by root",
                what.display(),
                meta.uid()
            ));
        }
        // In a sticky directory only a file's owner may replace it.
        let sticky = is_dir && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky {
            return Some(format!(
                "{} is mode {:04o}: group or others may write it",
                what.display(),
                mode & 0o7777
            ));
        }
        None
    };
    if let Some(reason) = loose(&real, &meta, false) {
        return Err(reason);
    }
    for dir in real.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some(reason) = loose(dir, &meta, true) {
            return Err(reason);
        }
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Root and the user running the tests, who owns what they create.
    fn us() -> [u32; 2] {
        [0, nix::unistd::getuid().as_raw()]
    }

    /// An executable under a private temporary directory, mode `mode`.
    fn binary(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn only_a_listed_binary_is_run() {
        let dir = private_dir();
        let criu = binary(dir.path(), "criu", 0o755);
        let other = binary(dir.path(), "other", 0o755);
        let allowed = [criu.clone()];
        let text = |p: &Path| p.to_str().unwrap().to_string();
        assert_eq!(
            choose(&allowed, &text(&criu), &us()).unwrap(),
            std::fs::canonicalize(&criu).unwrap()
        );
        let e = choose(&allowed, &text(&other), &us()).unwrap_err();
        assert!(matches!(e, CriuChoiceError::NotAllowed { .. }), "{e}");
        assert!(e.to_string().contains("criu.allowed_paths"), "{e}");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let e = choose(&[], &text(&criu), &us()).unwrap_err();
        assert!(e.to_string().contains("it lists none"), "{e}");
        // Not a listed path spelled another way.
        let dotted = format!(
            "{}/../{}/criu",
            dir.path().display(),
            dir.path().file_name().unwrap().to_str().unwrap()
        );
        let e = choose(&allowed, &dotted, &us()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        let e = choose(&allowed, "criu", &us()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    }

    #[test]
    fn a_listed_binary_others_could_change_is_refused() {
        let dir = private_dir();
        let text = |p: &Path| p.to_str().unwrap().to_string();
        for (mode, why) in [(0o775, "mode 0775"), (0o757, "mode 0757"), (0o644, "not executable")] {
            let path = binary(dir.path(), &format!("criu-{mode:o}"), mode);
            let e = choose(std::slice::from_ref(&path), &text(&path), &us()).unwrap_err();
            assert!(matches!(e, CriuChoiceError::Untrusted { .. }), "{e}");
            assert!(e.to_string().contains(why), "{mode:o}: {e}");
        }
        // A directory others may write: the binary could be replaced.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = binary(&open, "criu", 0o755);
        let e = choose(std::slice::from_ref(&path), &text(&path), &us()).unwrap_err();
        assert!(e.to_string().contains("open is mode 0777"), "{e}");
        // Sticky, as /tmp: only the owner replaces the file.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        choose(std::slice::from_ref(&path), &text(&path), &us()).unwrap();
        // A directory not a file.
        let e = choose(std::slice::from_ref(&open), &text(&open), &us()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_symlink_runs_its_target_which_is_checked() {
        let dir = private_dir();
        let target = binary(dir.path(), "criu-real", 0o755);
        let link = dir.path().join("criu");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let text = link.to_str().unwrap().to_string();
        let real = choose(std::slice::from_ref(&link), &text, &us()).unwrap();
        assert_eq!(real, std::fs::canonicalize(&target).unwrap());
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = choose(std::slice::from_ref(&link), &text, &us()).unwrap_err();
        assert!(e.to_string().contains("criu-real is mode 0777"), "{e}");
    }

    #[test]
    fn a_binary_of_another_owner_is_refused() {
        let dir = private_dir();
        let path = binary(dir.path(), "criu", 0o755);
        let someone_else = nix::unistd::getuid().as_raw() + 1;
        let e = choose(std::slice::from_ref(&path), path.to_str().unwrap(), &[someone_else]).unwrap_err();
        assert!(e.to_string().contains("not by root"), "{e}");
    }
}
