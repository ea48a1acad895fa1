//! The log of `automanage --daemonize` kept under `logging.max_size`: the
//! detached process writes its stdout and stderr to the log file; once the
//! file has grown past the size, it becomes `<log>.1` (the older ones move
//! up to `<log>.N`, the oldest beyond `max_backups` is deleted) and stdout
//! and stderr are pointed at a new, empty log. Checked between ticks, so a
//! line is never split across two files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRotation {
    log: PathBuf,
    max_size: u64,
    max_backups: u32,
}

impl LogRotation {
    pub fn new(log: PathBuf, max_size: u64, max_backups: u32) -> LogRotation {
        LogRotation {
            log,
            max_size,
            max_backups,
        }
    }

    /// `<log>.n`
    fn backup(&self, n: u32) -> PathBuf {
        let mut name = self.log.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    /// Rotates the files if the log is over the size; returns the new,
    /// empty log to write to, or None if it was not over.
    pub fn rotate_if_over(&self) -> io::Result<Option<File>> {
        match std::fs::metadata(&self.log) {
            Ok(meta) if meta.len() > self.max_size => {}
            Ok(_) => return Ok(None),
            // Removed by someone: the next write recreates nothing; the
            // next rotation starts afresh.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        if self.max_backups > 0 {
            remove_if_present(&self.backup(self.max_backups))?;
            for n in (1..self.max_backups).rev() {
                rename_if_present(&self.backup(n), &self.backup(n + 1))?;
            }
            std::fs::rename(&self.log, self.backup(1))?;
        } else {
            remove_if_present(&self.log)?;
        }
        open_log(&self.log).map(Some)
    }

    /// Rotates if over the size and points this process's stdout and
    /// stderr at the new log.
    pub fn check(&self) -> io::Result<bool> {
        let Some(new) = self.rotate_if_over()? else {
            return Ok(false);
        };
        for fd in [io::stdout().as_raw_fd(), io::stderr().as_raw_fd()] {
            nix::unistd::dup2(new.as_raw_fd(), fd).map_err(io::Error::from)?;
        }
        Ok(true)
    }
}

/// The log as `detach` opens it: appended to, created if missing.
pub fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_present(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read(path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    #[test]
    fn a_log_over_the_size_moves_up_and_the_oldest_goes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("automanage.log");
        let rotation = LogRotation::new(log.clone(), 10, 2);
        let backup = |n: u32| rotation.backup(n);
        assert_eq!(backup(1), dir.path().join("automanage.log.1"));

        // Not there, then under or at the size: nothing moves.
        assert!(rotation.rotate_if_over().unwrap().is_none());
        std::fs::write(&log, "0123456789").unwrap();
        assert!(rotation.rotate_if_over().unwrap().is_none());
        assert!(read(&backup(1)).is_none());

        for round in ["first line\n", "second line\n", "third line\n"] {
            let mut current = open_log(&log).unwrap();
            current.write_all(round.as_bytes()).unwrap();
            let mut new = rotation.rotate_if_over().unwrap().expect("over 10 bytes");
            new.write_all(b"x").unwrap();
            assert_eq!(read(&log).as_deref(), Some("x"), "a new log after {round:?}");
            std::fs::write(&log, "").unwrap();
        }
        // The first round's file (with the 10 bytes before it) was dropped.
        assert_eq!(read(&backup(1)).as_deref(), Some("third line\n"));
        assert_eq!(read(&backup(2)).as_deref(), Some("second line\n"));
        assert!(read(&backup(3)).is_none(), "only max_backups are kept");
    }

    #[test]
    fn no_backups_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        std::fs::write(&log, "more than four").unwrap();
        let rotation = LogRotation::new(log.clone(), 4, 0);
        assert!(rotation.rotate_if_over().unwrap().is_some());
        assert_eq!(read(&log).as_deref(), Some(""));
        assert!(read(&rotation.backup(1)).is_none());
    }
}
