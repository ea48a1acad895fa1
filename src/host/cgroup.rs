//! Finds the freezer of a process's cgroup: cgroup v1's freezer hierarchy
//! when the process is in one, otherwise the unified (v2) hierarchy. Reads
//! /proc only; freezing itself is `sys::SystemOps::freeze_cgroup`.

use std::path::{Path, PathBuf};

use crate::error::{io_err, Classify, ErrorKind, IoError};
use crate::host::sys::Freezer;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("process {pid} has no freezer: neither a cgroup v1 freezer nor a cgroup v2 hierarchy is mounted for it")]
    NoFreezer { pid: u32 },
    #[error("process {pid} has no memory cgroup: neither a cgroup v1 memory hierarchy nor a cgroup v2 one is mounted for it")]
    NoMemoryCgroup { pid: u32 },
    #[error("process {pid} has no CPU accounting: neither a cgroup v1 cpuacct hierarchy nor a cgroup v2 one is mounted for it")]
    NoCpuCgroup { pid: u32 },
}

impl Classify for CgroupError {
    fn kind(&self) -> ErrorKind {
        match self {
            CgroupError::Io(_) => ErrorKind::NotFound,
            CgroupError::NoFreezer { .. } | CgroupError::NoMemoryCgroup { .. } | CgroupError::NoCpuCgroup { .. } => {
                ErrorKind::FailedPrecondition
            }
        }
    }
}

/// The freezer of process `pid`, from /proc/<pid>/cgroup and our mount table.
pub fn freezer_of(pid: u32) -> Result<Freezer, CgroupError> {
    let read = |path: String| std::fs::read_to_string(&path).map_err(io_err("read", Path::new(&path)));
    let cgroups = read(format!("/proc/{pid}/cgroup"))?;
    let mountinfo = read("/proc/self/mountinfo".to_string())?;
    resolve(&cgroups, &mountinfo).ok_or(CgroupError::NoFreezer { pid })
}

/// Pure part of [`freezer_of`].
pub fn resolve(cgroups: &str, mountinfo: &str) -> Option<Freezer> {
    Some(match resolve_controller(cgroups, mountinfo, "freezer")? {
        (true, dir) => Freezer::V1(dir),
        (false, dir) => Freezer::V2(dir),
    })
}

/// Where a process's memory accounting is: cgroup v1's memory hierarchy,
/// or the unified one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryCgroup {
    V1(PathBuf),
    V2(PathBuf),
}

impl MemoryCgroup {
    /// Memory the cgroup uses (page cache included), bytes.
    pub fn current(&self) -> Result<u64, CgroupError> {
        let path = match self {
            MemoryCgroup::V1(dir) => dir.join("memory.usage_in_bytes"),
            MemoryCgroup::V2(dir) => dir.join("memory.current"),
        };
        let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
        Ok(text.trim().parse().unwrap_or(0))
    }

    /// Anonymous memory of the cgroup (what a CRIU dump writes, roughly),
    /// and its limit if it has one, in bytes.
    pub fn usage(&self) -> Result<(u64, Option<u64>), CgroupError> {
        let read = |path: PathBuf| std::fs::read_to_string(&path).map_err(io_err("read", &path));
        let (dir, anon_key, limit_file) = match self {
            MemoryCgroup::V1(dir) => (dir, "total_rss", "memory.limit_in_bytes"),
            MemoryCgroup::V2(dir) => (dir, "anon", "memory.max"),
        };
        let stat = read(dir.join("memory.stat"))?;
        let anon = stat
            .lines()
            .find_map(|line| line.strip_prefix(anon_key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0);
        // v1 says "no limit" with a huge number, v2 with "max".
        let limit = read(dir.join(limit_file))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .filter(|limit| *limit < (1 << 62));
        Ok((anon, limit))
    }
}

/// The memory cgroup of process `pid`.
pub fn memory_of(pid: u32) -> Result<MemoryCgroup, CgroupError> {
    let read = |path: String| std::fs::read_to_string(&path).map_err(io_err("read", Path::new(&path)));
    let cgroups = read(format!("/proc/{pid}/cgroup"))?;
    let mountinfo = read("/proc/self/mountinfo".to_string())?;
    resolve_memory(&cgroups, &mountinfo).ok_or(CgroupError::NoMemoryCgroup { pid })
}

/// Pure part of [`memory_of`].
pub fn resolve_memory(cgroups: &str, mountinfo: &str) -> Option<MemoryCgroup> {
    Some(match resolve_controller(cgroups, mountinfo, "memory")? {
        (true, dir) => MemoryCgroup::V1(dir),
        (false, dir) => MemoryCgroup::V2(dir),
    })
}

/// The directory of a process's cgroup for `controller`: in the v1
/// hierarchy that has it (true), else in the unified one (false).
fn resolve_controller(cgroups: &str, mountinfo: &str, controller: &str) -> Option<(bool, PathBuf)> {
    let mut v1 = None;
    let mut v2 = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == controller) {
            v1 = Some(path.to_string());
        }
    }
    let mounts = parse_mounts(mountinfo);
    if let Some(path) = v1 {
        if let Some(m) = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == controller))
        {
            return Some((true, join_cgroup(&m.mount_point, &m.root, &path)));
        }
    }
    let path = v2?;
    let m = mounts.iter().find(|m| m.fstype == "cgroup2")?;
    Some((false, join_cgroup(&m.mount_point, &m.root, &path)))
}

/// Cumulative CPU time of process `pid`'s cgroup, nanoseconds.
pub fn cpu_usage_ns(pid: u32) -> Result<u64, CgroupError> {
    let read = |path: String| std::fs::read_to_string(&path).map_err(io_err("read", Path::new(&path)));
    let cgroups = read(format!("/proc/{pid}/cgroup"))?;
    let mountinfo = read("/proc/self/mountinfo".to_string())?;
    match resolve_controller(&cgroups, &mountinfo, "cpuacct") {
        Some((true, dir)) => Ok(read(dir.join("cpuacct.usage").display().to_string())?
            .trim()
            .parse()
            .unwrap_or(0)),
        Some((false, dir)) => Ok(parse_usage_usec(&read(dir.join("cpu.stat").display().to_string())?) * 1000),
        None => Err(CgroupError::NoCpuCgroup { pid }),
    }
}

fn parse_usage_usec(cpu_stat: &str) -> u64 {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
        .unwrap_or(0)
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
    fn memory_cgroup_on_hybrid_and_unified_hosts() {
        let cgroups = "12:memory:/ns/c1\n5:freezer:/ns/c1\n0::/ns/c1\n";
        assert_eq!(
            resolve_memory(cgroups, HYBRID_MOUNTS),
            Some(MemoryCgroup::V1(PathBuf::from("/sys/fs/cgroup/memory/ns/c1")))
        );
        let unified = "30 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            resolve_memory("0::/ns/c1\n", unified),
            Some(MemoryCgroup::V2(PathBuf::from("/sys/fs/cgroup/ns/c1")))
        );
        assert_eq!(resolve_memory("0::/ns/c1\n", ""), None);
    }

    #[test]
    fn cpu_accounting_on_both_hierarchies() {
        let mounts = "41 35 0:36 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                      45 35 0:40 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            resolve_controller("4:cpu,cpuacct:/ns/c\n0::/ns/c\n", mounts, "cpuacct"),
            Some((true, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/ns/c")))
        );
        assert_eq!(
            resolve_controller("0::/ns/c\n", mounts, "cpuacct"),
            Some((false, PathBuf::from("/sys/fs/cgroup/unified/ns/c")))
        );
        assert_eq!(parse_usage_usec("usage_usec 1500\nuser_usec 1000\n"), 1500);
        assert!(cpu_usage_ns(std::process::id()).is_ok());
    }

    #[test]
    fn memory_usage_reads_anonymous_memory_and_limit() {
        let dir = std::env::temp_dir().join(format!("seamless-memcg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.stat"), "cache 4096\nrss 100\ntotal_rss 8192\n").unwrap();
        std::fs::write(dir.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(MemoryCgroup::V1(dir.clone()).usage().unwrap(), (8192, None));
        std::fs::write(dir.join("memory.stat"), "anon 12288\nfile 5\n").unwrap();
        std::fs::write(dir.join("memory.max"), "1048576\n").unwrap();
        assert_eq!(MemoryCgroup::V2(dir.clone()).usage().unwrap(), (12288, Some(1048576)));
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        assert_eq!(MemoryCgroup::V2(dir.clone()).usage().unwrap(), (12288, None));
        std::fs::remove_dir_all(&dir).unwrap();
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
