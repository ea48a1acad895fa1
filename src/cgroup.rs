//! Finds the freezer of a process's cgroup: cgroup v1's freezer hierarchy
//! when the process is in one, otherwise the unified (v2) hierarchy. Reads
//! /proc only; freezing itself is `sys::SystemOps::freeze_cgroup`.

use std::path::{Path, PathBuf};

use crate::error::{Classify, ErrorKind};
use crate::sys::Freezer;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("process {pid} has no freezer: neither a cgroup v1 freezer nor a cgroup v2 hierarchy is mounted for it")]
    NoFreezer { pid: u32 },
}

impl Classify for CgroupError {
    fn kind(&self) -> ErrorKind {
        match self {
            CgroupError::Read { .. } => ErrorKind::NotFound,
            CgroupError::NoFreezer { .. } => ErrorKind::FailedPrecondition,
        }
    }
}

/// The freezer of process `pid`, from /proc/<pid>/cgroup and our mount table.
pub fn freezer_of(pid: u32) -> Result<Freezer, CgroupError> {
    let read = |path: String| std::fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source });
    let cgroups = read(format!("/proc/{pid}/cgroup"))?;
    let mountinfo = read("/proc/self/mountinfo".to_string())?;
    resolve(&cgroups, &mountinfo).ok_or(CgroupError::NoFreezer { pid })
}

/// Pure part of [`freezer_of`].
pub fn resolve(cgroups: &str, mountinfo: &str) -> Option<Freezer> {
    let mut v1 = None;
    let mut v2 = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "freezer") {
            v1 = Some(path.to_string());
        }
    }
    let mounts = parse_mounts(mountinfo);
    if let Some(path) = v1 {
        let m = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == "freezer"))?;
        return Some(Freezer::V1(join_cgroup(&m.mount_point, &m.root, &path)));
    }
    let path = v2?;
    let m = mounts.iter().find(|m| m.fstype == "cgroup2")?;
    Some(Freezer::V2(join_cgroup(&m.mount_point, &m.root, &path)))
}

struct MountEntry {
    root: String,
    mount_point: PathBuf,
    fstype: String,
    super_options: String,
}

fn parse_mounts(mountinfo: &str) -> Vec<MountEntry> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(MountEntry {
                root: unescape(pre.get(3)?),
                mount_point: PathBuf::from(unescape(pre.get(4)?)),
                fstype: post.first()?.to_string(),
                super_options: post.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The directory of cgroup `path` under a hierarchy mounted at `mount_point`
/// whose mount shows cgroup `root` (not "/" inside a cgroup namespace).
fn join_cgroup(mount_point: &Path, root: &str, path: &str) -> PathBuf {
    let relative = path.strip_prefix(root).unwrap_or(path).trim_start_matches('/');
    if relative.is_empty() {
        mount_point.to_path_buf()
    } else {
        mount_point.join(relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
35 28 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 35 0:35 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
41 35 0:36 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
45 35 0:40 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_freezer_wins_on_hybrid_hosts() {
        let cgroups = "7:freezer:/ns1/ctr1\n4:memory:/ns1/ctr1\n0::/ns1/ctr1\n";
        assert_eq!(
            resolve(cgroups, HYBRID_MOUNTS),
            Some(Freezer::V1(PathBuf::from("/sys/fs/cgroup/freezer/ns1/ctr1")))
        );
    }

    #[test]
    fn unified_hierarchy_alone() {
        let mounts = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            resolve("0::/system.slice/ctr.scope\n", mounts),
            Some(Freezer::V2(PathBuf::from("/sys/fs/cgroup/system.slice/ctr.scope")))
        );
        assert_eq!(
            resolve("0::/\n", mounts),
            Some(Freezer::V2(PathBuf::from("/sys/fs/cgroup")))
        );
    }

    #[test]
    fn namespaced_mount_root_is_stripped_and_escapes_decoded() {
        let mounts = "30 25 0:26 /outer /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            resolve("0::/outer/inner\n", mounts),
            Some(Freezer::V2(PathBuf::from("/sys/fs/cgroup x/inner")))
        );
    }

    #[test]
    fn no_hierarchy_no_freezer() {
        assert_eq!(
            resolve("7:freezer:/a\n", "30 25 0:26 / /x rw - ext4 /dev/vda rw\n"),
            None
        );
        assert_eq!(resolve("", HYBRID_MOUNTS), None);
    }
}
