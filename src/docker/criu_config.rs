//! CRIU's options for a restore through Docker's engine. The engine's
//! start-from-checkpoint passes runc no CRIU option, and runc restores
//! established TCP connections and file locks only when CRIU is told to.
//! runc reads CRIU options from one place a container without the
//! `org.criu.config` annotation (every Docker 20.10 container) cannot
//! escape: `/etc/criu/runc.conf`. So a restore whose images hold either
//! writes that file with the options they need for the length of the
//! engine's start, when no such file exists, and removes it after; a file
//! the host already has is never changed (a restore that needs an option
//! it lacks is refused, naming the line to add). A file left by a killed
//! run names its writer's pid and is removed by the next run.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::DockerCheckpointError;
use crate::error::io_err;

/// Where runc looks for CRIU's options.
pub const RUNC_CRIU_CONFIG: &str = "/etc/criu/runc.conf";
/// The first line of a file this module wrote, followed by its pid.
const OURS: &str = "# written by docker-checkpoint for the restore of process ";

/// The CRIU options restoring `images` (a checkpoint's CRIU files) needs.
pub fn restore_options(images: &[String]) -> Vec<&'static str> {
    let mut options = Vec::new();
    if images
        .iter()
        .any(|f| f.starts_with("tcp-stream-") && f.ends_with(".img"))
    {
        options.push("tcp-established");
    }
    if images.iter().any(|f| f == "filelocks.img") {
        options.push("file-locks");
    }
    options
}

/// The options file in place for one restore; removed when dropped if
/// this run wrote it.
#[derive(Debug)]
pub struct ConfigGuard {
    written: Option<PathBuf>,
}

impl Drop for ConfigGuard {
    fn drop(&mut self) {
        if let Some(path) = self.written.take() {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the CRIU options written for a restore");
            }
        }
    }
}

/// Makes `path` (runc's CRIU options file) give CRIU `options` until the
/// returned guard is dropped. Callers serialise through `lock`.
pub fn provide(path: &Path, options: &[&str]) -> Result<ConfigGuard, DockerCheckpointError> {
    remove_stale(path);
    if options.is_empty() {
        return Ok(ConfigGuard { written: None });
    }
    match fs::read_to_string(path) {
        Ok(existing) => {
            let lines: Vec<&str> = existing.lines().map(str::trim).collect();
            let missing: Vec<&&str> = options.iter().filter(|o| !lines.contains(o)).collect();
            if missing.is_empty() {
                return Ok(ConfigGuard { written: None });
            }
            Err(DockerCheckpointError::CriuConfig(format!(
                "the checkpoint needs CRIU's {} on restore, which runc reads from {}; that file exists without \
                 it, and is the host's: add the line(s) {} to it, or remove it",
                options.join(" and "),
                path.display(),
                missing.iter().map(|o| format!("{o:?}")).collect::<Vec<_>>().join(", ")
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            }
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(io_err("create", path))?;
            let text = format!("{OURS}{}\n{}\n", std::process::id(), options.join("\n"));
            file.write_all(text.as_bytes()).map_err(io_err("write", path))?;
            Ok(ConfigGuard {
                written: Some(path.to_path_buf()),
            })
        }
        Err(e) => Err(io_err("read", path)(e).into()),
    }
}

/// Removes a file of ours whose writer no longer runs.
fn remove_stale(path: &Path) {
    let Ok(text) = fs::read_to_string(path) else { return };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(OURS))
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let alive = pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    if !alive {
        tracing::warn!(path = %path.display(), pid, "removing CRIU options a killed restore left");
        let _ = fs::remove_file(path);
    }
}

/// An exclusive lock on `path` (created), held until dropped: one restore
/// at a time touches runc's options file.
pub fn lock(path: &Path) -> Result<fs::File, DockerCheckpointError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("create", path))?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    if rc != 0 {
        return Err(io_err("lock", path)(std::io::Error::last_os_error()).into());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn images_say_which_options_a_restore_needs() {
        assert!(restore_options(&names(&["core-1.img", "pages-1.img"])).is_empty());
        assert_eq!(
            restore_options(&names(&["tcp-stream-1b8ea8.img", "filelocks.img"])),
            ["tcp-established", "file-locks"]
        );
    }

    #[test]
    fn the_file_is_written_for_the_restore_and_a_hosts_file_never_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("criu/runc.conf");
        {
            let _guard = provide(&path, &["tcp-established"]).unwrap();
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.lines().any(|l| l == "tcp-established"), "{text}");
        }
        assert!(!path.exists(), "not removed after the restore");
        assert!(provide(&path, &[]).unwrap().written.is_none());
        assert!(!path.exists());

        fs::write(&path, "tcp-established\n").unwrap();
        drop(provide(&path, &["tcp-established"]).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "tcp-established\n");
        let err = provide(&path, &["tcp-established", "file-locks"]).unwrap_err();
        assert!(err.to_string().contains("\"file-locks\""), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "tcp-established\n");

        // Left by a run that no longer exists (pid beyond pid_max): removed.
        fs::write(&path, format!("{OURS}999999999\ntcp-established\n")).unwrap();
        drop(provide(&path, &["file-locks"]).unwrap());
        assert!(!path.exists());
    }
}
